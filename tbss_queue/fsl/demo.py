"""A small synthetic TBSS study to try tbss-queue on: FA images and FA/.commands.

The images are real NIfTI files (nibabel) with plausible FA values: a brain-shaped ellipsoid of
grey matter (FA ~0.15-0.25) crossed by white-matter tracts (FA ~0.5-0.8), each subject a little
shifted, scaled and noisy. FA/.commands holds exactly what `tbss_2_reg -n` writes.

Where FSL is installed ($FSLDIR/bin/fsl_reg exists) the commands call it. Elsewhere they call
a stand-in `fsl_reg` written into DIR/fsl-standin/bin: NOT FSL. It does a real CPU-bound
least-squares affine fit of one image to the other for about --seconds and writes the files
fsl_reg writes, so that every later step (skip-done, best target) can be tried.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tbss_queue.errors import ConfigError
from tbss_queue.fsl.outputs import reg_lines

SHAPE = (40, 48, 40)
CUT_SHORT_TO = 2000
"""Bytes a broken subject's FA image keeps: its header reads, its data does not."""
VOXEL_MM = 2.0


@dataclass(frozen=True)
class DemoStudy:
    """What `demo` wrote."""

    root: str
    fa_dir: str
    commands: str
    subjects: tuple[str, ...]
    fsldir: str
    standin: bool

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "subjects": list(self.subjects)}


def make_demo(
    root: str | os.PathLike[str],
    subjects: int = 6,
    seconds: float = 2.0,
    seed: int = 0,
    broken: Sequence[str] = (),
) -> DemoStudy:
    """Write the study under `root` (created; refuses a non-empty FA/). The FA images of the
    `broken` subjects (e.g. "sub05") are cut short, as an interrupted copy leaves them: every
    registration that reads one fails, which the subject matrix then shows."""
    if subjects < 2:
        raise ConfigError("--subjects must be at least 2")
    if seconds < 0:
        raise ConfigError("--seconds must not be negative")
    base = Path(root).resolve()
    fa = base / "FA"
    if fa.exists() and any(fa.iterdir()):
        raise ConfigError(f"{fa} already exists and is not empty; choose another DIR")
    fa.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"sub{i + 1:02d}" for i in range(subjects)]
    unknown = sorted(set(broken) - set(names))
    if unknown:
        raise ConfigError(f"--broken {unknown[0]}: not a subject ({names[0]}..{names[-1]})")
    for name in names:
        image, mask = synthetic_fa(rng)
        affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
        nib.save(nib.Nifti1Image(image, affine), fa / f"{name}_FA.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), fa / f"{name}_FA_mask.nii.gz")
        if name in broken:
            image_file = fa / f"{name}_FA.nii.gz"
            image_file.write_bytes(image_file.read_bytes()[:CUT_SHORT_TO])
    fsldir, standin = _fsldir(base, seconds)
    lines = reg_lines(fsldir, [f"{n}_FA" for n in names], targets=None)
    commands = fa / ".commands"
    commands.write_text("".join(line + "\n" for line in lines))
    return DemoStudy(str(base), str(fa), str(commands), tuple(names), fsldir, standin)


def synthetic_fa(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One subject's FA map and brain mask."""
    grid = np.indices(SHAPE, dtype=np.float32)
    centre = np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2
    centre = centre + rng.normal(0, 1.0, size=(3, 1, 1, 1)).astype(np.float32)
    scale = rng.uniform(0.92, 1.08)
    radii = np.array([16, 20, 15], dtype=np.float32)[:, None, None, None] * scale
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(axis=0))
    brain = r < 1.0
    fa = np.where(brain, 0.18 + 0.04 * rng.standard_normal(SHAPE), 0.0)
    x, y, z = grid - centre
    # corpus callosum: an arch across the midline; corticospinal tracts: two vertical tubes
    arch = (np.abs(np.hypot(y, z + 2) - 9 * scale) < 2.2) & (np.abs(x) < 12 * scale) & (z > -4)
    tubes = (np.hypot(np.abs(x) - 6 * scale, y + 1) < 2.0) & (z < 2)
    wm = (arch | tubes) & brain
    fa = np.where(wm, rng.uniform(0.55, 0.75) + 0.05 * rng.standard_normal(SHAPE), fa)
    return np.clip(fa, 0.0, 1.0).astype(np.float32), brain.astype(np.uint8)


def _fsldir(base: Path, seconds: float) -> tuple[str, bool]:
    real = os.environ.get("FSLDIR")
    if real and os.access(os.path.join(real, "bin", "fsl_reg"), os.X_OK):
        return real, False
    standin = base / "fsl-standin"
    (standin / "bin").mkdir(parents=True, exist_ok=True)
    (standin / "etc").mkdir(exist_ok=True)
    (standin / "etc" / "standin.json").write_text(json.dumps({"seconds": seconds}))
    script = standin / "bin" / "fsl_reg"
    script.write_text(
        f"#!{sys.executable}\n"
        "# tbss-queue demo stand-in for FSL's fsl_reg: NOT FSL (see tbss_queue/standin.py)\n"
        "import sys\nfrom tbss_queue.fsl.standin import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(standin), True
