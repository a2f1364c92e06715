"""A test hook (tests/test_checked_exec.py): the process stops itself (SIGSTOP) right before it
unlinks a file named $TBSS_QUEUE_TEST_PAUSE_UNLINK, once, so that a test can change the tree
at exactly that point and then SIGCONT it. Loaded only by workers a test starts with this
folder first on PYTHONPATH."""

import os
import signal

_NAME = os.environ.get("TBSS_QUEUE_TEST_PAUSE_UNLINK")
_unlink = os.unlink
_paused = []


def _pausing_unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    if not _paused and os.path.basename(os.fsdecode(path)) == _NAME:
        _paused.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return _unlink(path, *args, **kwargs)


if _NAME:
    os.unlink = _pausing_unlink
