"""TBSS's own steps around the queue: plan the registrations, then pick the best target.

`plan` writes FA/.commands exactly as `tbss_2_reg` would, without starting any registration.
`best_target` scores subjects as `tbss_3_postreg -S` does, but refuses an incomplete matrix:
FSL's script counts a missing or empty .msf as 0 (a perfect registration), which favours the
target with holes.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

from tbss_queue.errors import ConfigError, TbssQueueError

from .outputs import IMAGE_SUFFIXES, read_msf, reg_lines

STANDARD_TARGET = "data/standard/FMRIB58_FA_1mm"


class IncompleteMatrix(TbssQueueError):
    """Raised by best-target when some registrations have no valid .msf score."""

    exit_code = 1


def imglob(fa_dir: Path, pattern: str = r".*_FA") -> list[str]:
    """Image basenames (no extension) in fa_dir whose name matches `pattern`, sorted as imglob
    sorts them; masks (`*_FA_mask`) and non-image files (`.mat`, `.msf`) do not match."""
    names = set()
    for entry in os.listdir(fa_dir):
        for suffix in IMAGE_SUFFIXES:
            if entry.endswith(suffix):
                base = entry[: -len(suffix)]
                if re.fullmatch(pattern, base):
                    names.add(base)
                break
    return sorted(names)


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
        _copy_image(source, fa / "target")
        refs = ["target"]
    else:
        raise ConfigError(f"unknown mode {mode!r}: use -n, -T or -t TARGET")
    lines, done = [], []
    for line in reg_lines(fsldir, images, refs):
        output = line.split()[3]
        msf = fa / f"{output}_warp.msf"
        # tbss_2_reg skips a pair whose .msf exists; its own empty placeholder means not done
        if msf.exists() and msf.stat().st_size > 0:
            done.append(output)
        else:
            lines.append(line)
    commands = fa / ".commands"
    commands.unlink(missing_ok=True)
    if lines:
        commands.write_text("".join(line + "\n" for line in lines))
    return Plan(str(commands), tuple(lines), tuple(done), "target" if refs else None)


def _copy_image(source: str, dest_base: Path) -> None:
    for suffix in IMAGE_SUFFIXES:
        candidate = source if source.endswith(suffix) else source + suffix
        if os.path.isfile(candidate):
            for old in IMAGE_SUFFIXES:
                Path(f"{dest_base}{old}").unlink(missing_ok=True)
            used = next(s for s in IMAGE_SUFFIXES if candidate.endswith(s))
            shutil.copyfile(candidate, f"{dest_base}{used}")
            return
    raise ConfigError(f"target image {source} not found (tried {', '.join(IMAGE_SUFFIXES)})")


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
    subjects = imglob(fa)
    if len(subjects) < 2:
        raise ConfigError(f"fewer than two *_FA images in {fa}")
    missing, scores = [], {}
    for f in subjects:
        for g in subjects:
            path = fa / f"{g}_to_{f}_warp.msf"
            if not path.exists():
                missing.append(f"{path.name} (missing)")
            elif read_msf(path) is None:
                missing.append(f"{path.name} (empty or not two numbers)")
            else:
                first, second = path.read_text().split()
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
    target_exists = any((fa / f"target{s}").exists() for s in IMAGE_SUFFIXES)
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
