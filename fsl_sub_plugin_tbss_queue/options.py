"""fsl_sub options tbss-queue cannot honour: refused with a reason, never silently ignored.

A refusal is raised as fsl_sub's BadSubmission, which fsl_sub prints as
"Error submitting job - <reason>" and exits 2, as for its own submission errors. Hints that
only pick a queue or notify (-q, -p, -m/-M, -a, --extra, --project) mean nothing to a single
queue and are accepted; -T is a hint too unless `set_time_limit` is on. -R (GB) and -s (pe,N)
are each task's memory and threads (`submit --mem/--threads`), refused only when they exceed
every worker node that ever joined.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any


def unsupported(command: Sequence[str], array_task: bool, options: dict[str, Any]) -> str | None:
    """Why tbss-queue refuses this submission, or None when it can run it as asked."""
    if options.get("array_specifier"):
        return (
            f"--array_native {options['array_specifier']} is not supported by tbss-queue: give "
            "the tasks as a task file (-t FILE, one command a line)"
        )
    if options.get("coprocessor"):
        return (
            f"co-processor '{options['coprocessor']}' requested (-c), but tbss-queue workers "
            "run no co-processor tasks: it would run on a CPU-only node. Submit it where "
            "fsl_sub has a back end with that co-processor"
        )
    if options.get("array_limit"):
        return (
            f"-x/--array_limit {options['array_limit']} is not supported by tbss-queue: how many "
            "tasks run at once is set by each worker's --concurrency"
        )
    if options.get("usescript"):
        return "-F/--usescript is not supported by tbss-queue (it reads no scheduler directives)"
    if options.get("resources"):
        return f"-r/--resource {' '.join(options['resources'])} is not supported by tbss-queue"
    if options.get("requeueable") is False:
        return (
            "--not_requeueable is not supported by tbss-queue: a task whose worker is lost is "
            "run again on another worker"
        )
    return None


def requests(options: dict[str, Any]) -> tuple[int | None, int | None]:
    """(bytes, threads) asked with -R (GB, fsl_sub's ram_units) and -s (pe,N)."""
    ram, threads = options.get("jobram"), options.get("threads")
    mem = int(float(ram) * 2**30) if ram else None
    return mem, (int(threads) if threads and int(threads) > 1 else None)


def coprocessor_asked(options: dict[str, Any]) -> str | None:
    """The co-processor asked for. fsl_sub's own command line drops -c when its configuration
    lists no co-processor (its help says "ignored"), so a GPU task would reach a CPU worker
    unnoticed; fsl_sub's own parser reads the command line again to see it."""
    if options.get("coprocessor"):
        return str(options["coprocessor"])
    if os.path.basename(sys.argv[0]) != "fsl_sub":
        return None
    with contextlib.suppress(Exception, SystemExit):
        from fsl_sub.cmdline import build_parser

        parsed, _ = build_parser().parse_known_args(sys.argv[1:])
        return parsed.coprocessor or None
    return None
