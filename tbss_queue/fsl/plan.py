"""TBSS's own steps around the queue: plan the registrations, then pick the best target.

`plan` writes FA/.commands as `tbss_2_reg` would, without starting any registration: the same
subjects (imglob on the shell glob), lines and order, the same empty `_warp.msf` placeholder for
every pair it queues (so FSL's own tbss_2_reg, run meanwhile, queues none of them again), the
target copied as imcp copies it, a line in `.tbsslog`. Unlike tbss_2_reg, which skips any pair
whose .msf exists, a pair counts as done only as the worker judges it (outputs.reg_done: two
numbers in the .msf and the warp there), so a failed registration is planned again.
`best_target` scores subjects as `tbss_3_postreg -S` does, but refuses an incomplete matrix:
FSL's script counts a missing or empty .msf as 0 (a perfect registration), which favours the
target with holes.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

from tbss_queue.errors import ConfigError, TbssQueueError
from tbss_queue.fsl.images import IMGLOB_SUFFIXES, image_exists, imcp, imglob
from tbss_queue.fsl.outputs import FslReg, read_msf, reg_done, reg_lines
from tbss_queue.opening import read_regular_path

STANDARD_TARGET = "data/standard/FMRIB58_FA_1mm"
POSTREG_GLOBS = ("*_FA.nii*", "*_FA.img*", "*_FA.hdr*")
"""What tbss_3_postreg hands imglob (tbss_2_reg hands it `*_FA.*`)."""


class IncompleteMatrix(TbssQueueError):
    """Raised by best-target when some registrations have no valid .msf score."""

    exit_code = 1


def tbsslog(root: Path, command: str) -> None:
    """Append the line tbss_2_reg and tbss_3_postreg append to STUDY/.tbsslog:
    [date] [hostname] [uname -a] [pwd] [command]."""
    uname = os.uname()
    system = " ".join((uname.sysname, uname.nodename, uname.release, uname.version, uname.machine))
    when = time.strftime("%a %b %e %H:%M:%S %Z %Y")
    line = f"[{when}] [{socket.gethostname()}] [{system}] [{root.resolve()}] [{command}]\n"
    with open(root / ".tbsslog", "a") as log:
        log.write(line)


@dataclass(frozen=True)
class Plan:
    """The commands `plan` wrote: the lines and the pairs left out because they are done."""

    commands: str
    lines: tuple[str, ...]
    done: tuple[str, ...] = field(default=())
    target: str | None = None


def plan(
    study: str | os.PathLike[str],
    *,
    mode: str,
    target: str | None = None,
    fsldir: str | None = None,
) -> Plan:
    """Write STUDY/FA/.commands for tbss_2_reg mode '-n', '-T' or '-t' (with `target`)."""
    root = Path(study)
    fa = root / "FA"
    if not fa.is_dir():
        raise ConfigError(f"{fa} does not exist: run tbss_1_preproc in {root} first")
    fsldir = fsldir or os.environ.get("FSLDIR")
    if not fsldir:
        raise ConfigError(
            "FSLDIR is not set (it is written into every line): set it or give --fsldir"
        )
    images = imglob(fa)
    if not images:
        raise ConfigError(f"no *_FA images in {fa}: run tbss_1_preproc first")
    if mode == "-n":
        refs: list[str] | None = None
    elif mode in ("-T", "-t"):
        source = (
            os.path.join(fsldir, STANDARD_TARGET)
            if mode == "-T"
            else str(target if os.path.isabs(str(target)) else root / str(target))
        )
        try:
            imcp(source, fa / "target")
        except FileNotFoundError:
            raise ConfigError(
                f"target image {source} not found (tried {', '.join(IMGLOB_SUFFIXES)})"
            ) from None
        refs = ["target"]
    else:
        raise ConfigError(f"unknown mode {mode!r}: use -n, -T or -t TARGET")
    tbsslog(root, f"tbss-queue plan {mode}" + (f" {target}" if mode == "-t" else ""))
    lines, done = [], []
    pairs = [(g, f) for f in (images if refs is None else refs) for g in images]
    for line, (g, f) in zip(reg_lines(fsldir, images, refs), pairs, strict=True):
        reg = FslReg(g, f, f"{g}_to_{f}")
        if reg_done(reg, str(fa)):
            done.append(reg.output)
        else:
            lines.append(line)
            reg.msf(str(fa)).touch()  # tbss_2_reg's placeholder: queued, not done
    commands = fa / ".commands"
    commands.unlink(missing_ok=True)
    if lines:
        commands.write_text("".join(line + "\n" for line in lines))
    return Plan(str(commands), tuple(lines), tuple(done), "target" if refs else None)


@dataclass(frozen=True)
class TargetScore:
    subject: str
    mean: Decimal
    median: Decimal

    def line(self) -> str:
        return f"{self.subject} {_dc(self.mean)} {_dc(self.median)}"


@dataclass(frozen=True)
class BestTarget:
    """The ranking (best first), the all.msf written, and FSL's own caveat if it applies."""

    best: str
    ranking: tuple[TargetScore, ...]
    all_msf: str
    target_exists: bool


def best_target(fa_dir: str | os.PathLike[str]) -> BestTarget:
    """Score every subject as target like `tbss_3_postreg -S`; refuse when a score is missing."""
    fa = Path(fa_dir)
    subjects = imglob(fa, *POSTREG_GLOBS)
    if len(subjects) < 2:
        raise ConfigError(f"fewer than two *_FA images in {fa}")
    tbsslog(fa.parent, "tbss-queue best-target")
    # as tbss_3_postreg: an all.msf from an earlier run never outlives this one
    (fa / "all.msf").unlink(missing_ok=True)
    missing, scores = [], {}
    for f in subjects:
        for g in subjects:
            reg = FslReg(g, f, f"{g}_to_{f}")
            path = reg.msf(str(fa))
            score = read_msf(path)
            if not path.exists():
                missing.append(f"{path.name} (missing)")
            elif score is None:
                missing.append(f"{path.name} (empty or not two numbers)")
            elif not reg_done(reg, str(fa)):
                missing.append(f"{path.name} (its warp {reg.output}_warp is missing)")
            else:
                # the same non-blocking, regular-only read: a FIFO swapped in can't hang it
                first, second = read_regular_path(str(path)).decode().split()
                scores[(g, f)] = (Decimal(first), Decimal(second))
    if missing:
        shown = ", ".join(sorted(missing)[:20])
        raise IncompleteMatrix(
            f"{len(missing)} of {len(subjects) ** 2} registrations have no score in {fa}: "
            f"{shown}{' ...' if len(missing) > 20 else ''}; finish them before choosing a target"
        )
    n = Decimal(len(subjects))
    ranking = []
    for f in subjects:
        mean = sum((scores[(g, f)][0] for g in subjects), Decimal(0))
        median = sum((scores[(g, f)][1] for g in subjects), Decimal(0))
        ranking.append(TargetScore(f, _trunc(mean / n), _trunc(median / n)))
    all_msf = fa / "all.msf"
    all_msf.write_text("".join(s.line() + "\n" for s in ranking))
    # `sort -k 2 -n all.msf | head -n 1`: by mean; ties fall back to the whole line
    ordered = sorted(ranking, key=lambda s: (s.mean, s.line()))
    target_exists = image_exists(fa / "target")
    return BestTarget(ordered[0].subject, tuple(ordered), str(all_msf), target_exists)


def _trunc(value: Decimal) -> Decimal:
    """dc with scale 10 truncates a quotient to 10 decimals."""
    return value.quantize(Decimal("1E-10"), rounding=ROUND_DOWN)


def _dc(value: Decimal) -> str:
    """Print as dc does: no leading zero before the point (.5000000000, -.25...)."""
    text = f"{value:f}"
    if text.startswith("0."):
        return text[1:]
    if text.startswith("-0."):
        return "-" + text[2:]
    return text
