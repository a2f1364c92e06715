"""opening.py: directories opened below an anchor with no symlink followed, by openat2 and by
the O_NOFOLLOW walk that stands in for it on older kernels; regular files only, never blocking."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbss_queue import opening


@pytest.fixture(params=["openat2", "walk"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "walk":
        monkeypatch.setattr(opening, "_HAS_OPENAT2", False)
    yield request.param


def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "link").symlink_to(outside)
    (root / "a" / "b" / "f").write_text("0.5 0.2\n")
    os.mkfifo(root / "a" / "fifo")
    (root / "a" / "flink").symlink_to(root / "a" / "b" / "f")
    return root, outside


def test_a_directory_opens_below_its_anchor_and_never_through_a_symlink(
    tmp_path: Path, way: str
) -> None:
    root, outside = tree(tmp_path)
    with opening.opened_workdir(str(root / "a" / "b"), [str(root)]) as wd:
        assert wd.path == str(root / "a" / "b")
        assert os.path.samestat(os.fstat(wd.fd), os.stat(root / "a" / "b"))
    base = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel in ("a/link", "a/link/x", "../root", "/etc", "a/../.."):
            with pytest.raises(OSError) as err:
                os.close(opening.open_beneath(base, rel))
            assert err.value.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR), rel
    finally:
        os.close(base)
    # a working directory whose real path is outside every root is not opened
    with (
        pytest.raises(OSError) as err,
        opening.opened_workdir(str(root / "a" / "link"), [str(root)]),
    ):
        pass
    assert err.value.errno == errno.EXDEV


def test_only_regular_files_are_read_and_a_fifo_never_blocks(tmp_path: Path, way: str) -> None:
    root, _ = tree(tmp_path)
    base = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert opening.read_regular(base, "a/b/f") == b"0.5 0.2\n"
        assert opening.read_regular(base, "a/b/f", cap=3) == b"0.5"
        for rel, what in (("a/fifo", "a FIFO"), ("a/flink", "a symlink"), ("a/b", "a directory")):
            with pytest.raises(opening.UnsafeFile, match=what):
                opening.read_regular(base, rel)
        with pytest.raises(FileNotFoundError):
            opening.read_regular(base, "a/missing")
        assert opening.read_regular_path(str(root / "a" / "b" / "f")) == b"0.5 0.2\n"
        # unlink removes the link itself, and never goes through one
        (tmp_path / "outside" / "victim").write_text("keep")
        with pytest.raises(OSError):
            opening.unlink_beneath(base, "a/link/victim")
        assert (tmp_path / "outside" / "victim").exists()
        assert opening.unlink_beneath(base, "a/flink") and (root / "a" / "b" / "f").exists()
        assert not opening.unlink_beneath(base, "a/flink")
    finally:
        os.close(base)


@pytest.mark.timeout(20)
def test_submit_side_readers_never_block_on_a_fifo(tmp_path: Path) -> None:
    # a FIFO planted as a score file or as FA/all.msf reads as "no score", at once
    from tbss_queue.fsl.matrix import _all_msf
    from tbss_queue.fsl.outputs import FslReg, read_msf, reg_done

    os.mkfifo(tmp_path / "a_to_b_warp.msf")
    os.mkfifo(tmp_path / "all.msf")
    (tmp_path / "a_to_b_warp.nii.gz").write_bytes(b"warp")
    assert read_msf(tmp_path / "a_to_b_warp.msf") is None
    assert not reg_done(FslReg("a", "b", "a_to_b"), str(tmp_path))
    assert _all_msf(tmp_path / "all.msf") == []
