"""The demo's stand-in for FSL's `fsl_reg`. THIS IS NOT FSL and registers nothing for real.

It does a real, CPU-bound computation, a least-squares affine fit of the moving image's
intensity-weighted voxel cloud onto the reference's, repeated for about the configured number
of seconds, and writes the files fsl_reg writes, in the same order: OUT.mat, OUT.log,
OUT_warp.nii.gz, then OUT_warp.msf (two numbers: mean and median of the squared residual
displacement field, so a self-registration scores ~0 as with FSL).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

USAGE = "usage: fsl_reg <input> <reference> <output> [-e] [-a] [-FA]  (tbss-queue demo stand-in)"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(USAGE, file=sys.stderr)
        return 1
    moving, reference, out = argv[0], argv[1], argv[2]
    seconds = _configured_seconds()
    try:
        mov_img, ref_img = _load(moving), _load(reference)
        mov_data, ref_data = mov_img.get_fdata(), ref_img.get_fdata()
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        # like fsl_reg: complain, leave no .msf content, still exit 0 (success is in the outputs)
        print(f"Image Exception : {exc}", file=sys.stderr)
        return 0
    Path(f"{out}.log").write_text(f"stand-in fsl_reg {' '.join(argv)}\n")
    matrix, residual = _fit(mov_data, ref_data, seconds)
    np.savetxt(f"{out}.mat", matrix, fmt="%.6f")
    warp = nib.Nifti1Image(residual.astype(np.float32), ref_img.affine)
    nib.save(warp, f"{out}_warp.nii.gz")
    sq = (residual**2).mean(axis=-1)
    nonzero = sq[sq > 0]
    mean, median = (float(nonzero.mean()), float(np.median(nonzero))) if nonzero.size else (0, 0)
    Path(f"{out}_warp.msf").write_text(f"{mean:.6f} {median:.6f}\n")
    return 0


def _configured_seconds() -> float:
    config = Path(sys.argv[0]).resolve().parent.parent / "etc" / "standin.json"
    try:
        return float(json.loads(config.read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 1.0


def _load(name: str) -> nib.Nifti1Image:
    for candidate in (name, f"{name}.nii.gz", f"{name}.nii"):
        if Path(candidate).is_file():
            return cast(nib.Nifti1Image, nib.load(candidate))
    raise FileNotFoundError(f"{name}: no such image")


def _cloud(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(data > 0.3).astype(np.float64)
    return idx, data[data > 0.3]


def _fit(
    moving: np.ndarray, reference: np.ndarray, seconds: float
) -> tuple[np.ndarray, np.ndarray]:
    """Affine that maps the moving white-matter cloud onto the reference's, by least squares."""
    mov_pts, mov_w = _cloud(moving)
    ref_pts, ref_w = _cloud(reference)
    n = min(len(mov_pts), len(ref_pts))
    # pair points by rank along the principal axis: a crude but deterministic correspondence
    mov_order = np.argsort(mov_pts @ [0.57, 0.58, 0.58])[:n]
    ref_order = np.argsort(ref_pts @ [0.57, 0.58, 0.58])[:n]
    src = np.c_[mov_pts[mov_order], np.ones(n)]
    dst = ref_pts[ref_order]
    weights = np.sqrt(np.minimum(mov_w[mov_order], ref_w[ref_order]))[:, None]
    deadline = time.monotonic() + seconds
    matrix = np.eye(4)
    while True:
        solution, *_ = np.linalg.lstsq(src * weights, dst * weights, rcond=None)
        matrix[:3, :] = solution.T
        if time.monotonic() >= deadline:
            break
    grid = np.indices(reference.shape, dtype=np.float64).reshape(3, -1).T
    mapped = np.c_[grid, np.ones(len(grid))] @ matrix[:3, :].T
    displacement = (mapped - grid).reshape(*reference.shape, 3)
    displacement[reference <= 0] = 0.0
    return matrix, displacement
