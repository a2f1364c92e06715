"""Can this node start a command at all? Faults of the node, not of the command.

A working directory that is not there (the study is not mounted, a wrong --path-map), an
executable that is missing (no FSL here) or a command this node's policy refuses say nothing
about the command: another node may run it. attempt.py hands such a command back, behind what
waits, and the node takes every other command (lua/node_fault.lua records the fault for its
scope alone); the command fails only when every node taking commands refused it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tbss_queue.execution.policy import Policy, resolve
from tbss_queue.execution.runner import CAUSE_NO_CWD, CAUSE_NOT_FOUND

CAUSE_REFUSED = "refused"
CAUSE_LATE = "late renewals"
"""A node whose runners keep losing their leases by renewing late: quarantined until it is
resumed or restarted, never let out because it is the last node standing."""


def admit(
    argv: Sequence[str], cwd: str, env: Mapping[str, str], policy: Policy | None
) -> tuple[dict[str, Any] | None, str]:
    """(the node fault or None, the real file to execute): the file the policy judged, found
    once; the worker runs it and no other (no second PATH search, no link followed again)."""
    if policy is not None:
        refused, resolved = policy.judge(argv, cwd, env)
        if refused is not None:
            return fault(CAUSE_REFUSED, f"refused: {refused}", None), ""
    else:
        resolved = resolve(argv[0], cwd, env)
    if resolved is None:
        where = os.path.join(cwd, argv[0]) if "/" in argv[0] else argv[0]
        path = where if os.path.isabs(where) else None
        return fault(CAUSE_NOT_FOUND, f"executable {argv[0]} not found on this node", path), ""
    return None, resolved


def workdir_fault(cwd: str, exc: OSError, roots: Sequence[str]) -> dict[str, Any]:
    """The fault of a working directory that opening.opened_workdir could not open."""
    if isinstance(exc, FileNotFoundError) or (
        exc.errno == errno.ENOTDIR and not os.path.isdir(cwd)
    ):
        return fault(CAUSE_NO_CWD, f"working directory {cwd} not found on this node", cwd)
    if exc.errno == errno.EXDEV:
        why = f"working directory {cwd} is outside this worker's --root ({', '.join(roots)})"
    else:  # ELOOP, ENOTDIR: a component became a symlink or a file after it was resolved
        why = f"working directory {cwd} changed while it was opened ({exc.strerror})"
    return fault(CAUSE_REFUSED, f"refused: {why}", None)


def fault(cause: str, message: str, path: str | None) -> dict[str, Any]:
    """A node fault as tasks hand it to lua/node_fault.lua: cause, message, and the path whose
    appearance ends it (None: only `nodes resume` or a restart does)."""
    return {"cause": cause, "message": message, "path": path}
