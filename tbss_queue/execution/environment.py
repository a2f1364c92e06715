"""The environment a command runs in: built from an allowlist, never the worker's own.

The worker's environment holds its secrets (the broker URL with its password, the signing
key's path, a Sentinel password). A command copying it would hand them to whatever runs, and
with them Redis and the key that signs tasks for every worker. So a command gets only FSL's
variables, what a program needs to run (PATH, HOME, the locale, TMPDIR...) and what the
operator names with `worker --pass-env NAME`; of tbss-queue's own variables only the
non-secret ids and process tags the worker sets for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from tbss_queue.errors import ConfigError
from tbss_queue.execution.procs import TAG_VAR as RUN_TAG_VAR
from tbss_queue.paths import fsl_env

PASSED = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    RUN_TAG_VAR,  # a random tag `run` and the test suite find their processes by: no secret
)
"""Variables a command gets from the worker's environment, when set there."""

PASSED_PREFIXES = ("FSL", "LC_")
"""And every variable starting with one of these: FSL's own ($FSLDIR, $FSLOUTPUTTYPE,
$FSLMULTIFILEQUIT, $FSL_SKIP_GLOBAL...) and the locale's."""

OWN_PREFIX = "TBSS_QUEUE_"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def pass_env_names(names: Sequence[str]) -> tuple[str, ...]:
    """`--pass-env` names, checked: a valid name, and none of tbss-queue's (they hold its
    broker password and signing key)."""
    for name in names:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"--pass-env {name!r}: not a variable name")
        if name.startswith(OWN_PREFIX):
            raise ConfigError(f"--pass-env {name}: tbss-queue's own variables are never passed")
    return tuple(names)


def command_env(
    source: Mapping[str, str], batch_id: str, task_id: str, extra: Sequence[str] = ()
) -> dict[str, str]:
    """A command's environment: the allowlisted part of `source` (the worker's), FSL's
    defaults, one thread per registration, and the command's batch and task ids."""
    env = {
        k: v
        for k, v in source.items()
        if (k in PASSED or k.startswith(PASSED_PREFIXES) or k in extra)
        and (not k.startswith(OWN_PREFIX) or k == RUN_TAG_VAR)
    }
    env.setdefault("PATH", os.defpath)
    # FSL refuses to write images with FSLOUTPUTTYPE unset; $FSLDIR/bin goes first on PATH
    env = fsl_env(env)
    # one registration per slot: keep OpenMP/BLAS builds from oversubscribing the cores
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env["TBSS_QUEUE_BATCH"] = batch_id
    env["TBSS_QUEUE_TASK"] = task_id
    return env
