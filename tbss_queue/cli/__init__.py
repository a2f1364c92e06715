"""The `tbss-queue` command: parses options, builds Settings, calls the API, renders the result.

No logic lives here; every verb is a few lines over a function of `tbss_queue.api`. One module
per verb group; importing them registers their verbs on the group.
"""

from tbss_queue.cli import autoalloc, batches, fsl, logs, nodes  # noqa: F401  (registers the verbs)
from tbss_queue.cli.app import cli, main

__all__ = ["cli", "main"]
