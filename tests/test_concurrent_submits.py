"""Two submits at once: of the same file (two people, or a script and a person), or of two
files that share lines. Whoever commits first, every command runs once.

Both submitters are held at a barrier once each has staged its submission, so that both have
planned against a queue that holds neither before either commits: the interleaving that busy
labs produce on their own, forced every time. Real redis-server, a real worker, marker files.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.models import Batch
from tbss_queue.queue.batches import BatchStore

from .conftest import Worker, write_commands
from .faults import Markers, job

pytestmark = pytest.mark.slow


@pytest.fixture
def commits_together(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The first two commits (of two submitting threads) each wait for the other: both
    submissions are staged before either commits. Later commits go straight through."""
    barrier, lock, first = threading.Barrier(2, timeout=60), threading.Lock(), [2]
    real = BatchStore.commit

    def commit(self: BatchStore, *args: Any, **kwargs: Any) -> int:
        with lock:
            wait, first[0] = first[0] > 0, first[0] - 1
        if wait:
            barrier.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BatchStore, "commit", commit)
    yield


def submit_together(paths: list[Path], settings: Settings) -> list[Batch]:
    results: list[Batch | BaseException] = [RuntimeError("not run")] * len(paths)

    def one(i: int) -> None:
        try:
            results[i] = api.submit(paths[i], settings=settings)
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, Batch)]


def test_two_submits_of_the_same_file_at_once_run_every_command_once(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    commits_together: None,
) -> None:
    # Given a commands file, submitted twice at the same moment (both staged before either
    # commits)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    ids = [str(i) for i in range(6)]
    cmds = write_commands(tmp_path / "cmds", [job(i, log, "--marker", str(marks.dir)) for i in ids])
    first, second = submit_together([cmds, cmds], settings)
    # Then both name one batch, and the commands were queued once between them
    assert first.id == second.id
    assert sorted([first.queued, second.queued]) == [0, 6]
    # And a copy of the file submitted later (the same lines in the same directory) finds
    # them all in that batch: the loser of the commit left the command index alone
    copy = tmp_path / "cmds-copy"
    shutil.copy(cmds, copy)
    again = api.submit(copy, settings=settings)
    assert (again.queued, again.skipped) == (0, 6)
    # When a worker runs everything
    workers("w1", 3)
    final = api.wait(first.id, settings=settings, timeout=60)
    # Then every command ran exactly once
    assert (final.succeeded, final.failed, final.queued) == (6, 0, 0)
    marks.assert_exactly_once(ids)


def test_two_files_sharing_lines_submitted_at_once_run_the_shared_lines_once(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    commits_together: None,
) -> None:
    # Given two commands files in one directory that share 6 lines and have 2 of their own
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"

    def line(i: str) -> str:
        return job(i, log, "--marker", str(marks.dir))

    shared = [str(i) for i in range(6)]
    a = write_commands(tmp_path / "a.cmds", [line(i) for i in [*shared, "a1", "a2"]])
    b = write_commands(tmp_path / "b.cmds", [line(i) for i in ["b1", "b2", *shared]])
    # When both are submitted at the same moment (both planned before either committed)
    batch_a, batch_b = submit_together([a, b], settings)
    # Then the shared lines are queued in one batch only, and skipped in the other, saying where
    assert batch_a.id != batch_b.id
    assert batch_a.queued + batch_b.queued == 6 + 4
    loser = batch_b if batch_a.queued == 8 else batch_a
    assert loser.skipped == 6
    assert any("queued by another submission meanwhile" in w for w in loser.warnings)
    # When a worker runs both batches
    workers("w1", 4)
    finals = [api.wait(b.id, settings=settings, timeout=60) for b in (batch_a, batch_b)]
    # Then every command, shared or not, ran exactly once
    assert sum(f.succeeded for f in finals) == 10 and sum(f.skipped for f in finals) == 6
    marks.assert_exactly_once([*shared, "a1", "a2", "b1", "b2"])
    notes = [t.message for t in api.tasks(loser.id, settings=settings) if t.state == "skipped"]
    assert len(notes) == 6 and all(n.startswith("already queued in batch ") for n in notes)
