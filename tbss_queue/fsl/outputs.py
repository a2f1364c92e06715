"""What tbss-queue knows of FSL's TBSS files: fsl_reg lines, their outputs, when one is done.

Two FSL facts shape this module (see the project's notes on tbss_2_reg and fsl_reg):
- tbss_2_reg touches an EMPTY `OUT_warp.msf` for every pair it queues: empty means not done;
- fsl_reg exits 0 even when flirt or fnirt failed: success is judged by its outputs.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tbss_queue.opening import read_regular, read_regular_path, unlink_beneath
from tbss_queue.paths import within

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img", ".img.gz")


@dataclass(frozen=True)
class FslReg:
    """An `fsl_reg IN REF OUT [options]` command line."""

    input: str
    reference: str
    output: str

    def msf(self, cwd: str) -> Path:
        return Path(cwd) / f"{self.output}_warp.msf"

    def warp_exists(self, cwd: str) -> bool:
        return any((Path(cwd) / f"{self.output}_warp{s}").exists() for s in IMAGE_SUFFIXES)

    def stale_outputs(self, cwd: str) -> list[Path]:
        """Files an earlier attempt may have left (with an old warp, a failed fnirt looks fine)."""
        base = Path(cwd) / self.output
        found = [Path(p) for p in glob.glob(glob.escape(str(base)) + "_tmp.*")]
        candidates = [Path(f"{base}.mat"), Path(f"{base}.log"), self.msf(cwd)]
        candidates += [Path(f"{base}_warp{s}") for s in IMAGE_SUFFIXES]
        return found + [p for p in candidates if p.exists()]


def parse_fsl_reg(argv: Sequence[str]) -> FslReg | None:
    """The fsl_reg call in argv (identified by the program's base name), or None."""
    if len(argv) < 4 or os.path.basename(argv[0]) != "fsl_reg":
        return None
    return FslReg(_strip(argv[1]), _strip(argv[2]), _strip(argv[3]))


def _strip(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_msf(path: Path) -> tuple[float, float] | None:
    """The two numbers of a `.msf` score file, or None if it is missing, empty or garbled, or
    not a regular file (a FIFO there must not block the reader)."""
    try:
        return _scores(read_regular_path(str(path)))
    except OSError:
        return None


def _scores(raw: bytes) -> tuple[float, float] | None:
    try:
        words = raw.decode().split()
    except UnicodeDecodeError:
        return None
    if len(words) != 2:
        return None
    try:
        return float(words[0]), float(words[1])
    except ValueError:
        return None


def reg_done(reg: FslReg, cwd: str) -> bool:
    """A registration is done when its .msf holds two numbers and its warp exists."""
    return read_msf(reg.msf(cwd)) is not None and reg.warp_exists(cwd)


def reg_done_at(reg: FslReg, dir_fd: int) -> bool:
    """reg_done in the working directory the worker opened (`dir_fd`), no symlink followed
    to the .msf. UnsafeFile when the .msf is there but not a regular file."""
    msf = f"{reg.output}_warp.msf"
    try:
        scores = _scores(read_regular(dir_fd, msf))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return scores is not None and any(
        _exists_at(dir_fd, f"{reg.output}_warp{s}") for s in IMAGE_SUFFIXES
    )


def _exists_at(dir_fd: int, rel: str) -> bool:
    try:
        os.stat(rel, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def remove_stale(
    reg: FslReg, cwd: str, roots: Sequence[str] = (), dir_fd: int | None = None
) -> list[str]:
    """Delete what an earlier attempt left; returns the names removed. With `roots` (the
    worker's --root), nothing outside them is touched, whatever the line says. With `dir_fd`
    (the worker's opened cwd) every file is removed relative to it, its folder opened without
    following a symlink: a folder swapped for a link meanwhile is never left."""
    removed = []
    for path in reg.stale_outputs(cwd):
        if dir_fd is not None:
            rel = os.path.relpath(path, cwd)
            try:
                if unlink_beneath(dir_fd, rel):
                    removed.append(path.name)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                    raise
                # outside the folder, or its folder is a symlink now: not ours to touch
            continue
        if roots and not within(str(path), roots):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def reg_lines(fsldir: str, images: Sequence[str], targets: Sequence[str] | None) -> list[str]:
    """The lines `tbss_2_reg` writes: for -n (targets None) every image to every image, grouped
    by reference (outer loop), moving image inner, self-pairs included; else to each target."""
    refs = list(images) if targets is None else list(targets)
    return [f"{fsldir}/bin/fsl_reg {g} {f} {g}_to_{f} -e -FA" for f in refs for g in images]
