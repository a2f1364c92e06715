"""The demo study: real NIfTI FA images, tbss_2_reg -n lines, a stand-in fsl_reg that says so."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tbss_queue.errors import ConfigError
from tbss_queue.fsl.demo import make_demo
from tbss_queue.fsl.outputs import read_msf

from .conftest import tbss_queue


def test_demo_writes_fa_images_and_the_all_to_all_commands(tmp_path: Path) -> None:
    res = tbss_queue("demo", str(tmp_path / "s"), "--subjects", "3", "--seconds", "0")
    assert res.returncode == 0, res.stderr
    assert "NOT FSL" in res.stderr
    fa = tmp_path / "s" / "FA"
    images = sorted(p.name for p in fa.glob("*_FA.nii.gz"))
    assert images == ["sub01_FA.nii.gz", "sub02_FA.nii.gz", "sub03_FA.nii.gz"]
    data = nib.load(fa / "sub02_FA.nii.gz").get_fdata()
    assert data.min() >= 0 and data.max() <= 1 and (data > 0.5).sum() > 100
    lines = (fa / ".commands").read_text().splitlines()
    fsl_reg = f"{tmp_path / 's'}/fsl-standin/bin/fsl_reg"
    # outer loop over the reference, inner over the moving image, self-pairs included
    assert lines[:4] == [
        f"{fsl_reg} sub01_FA sub01_FA sub01_FA_to_sub01_FA -e -FA",
        f"{fsl_reg} sub02_FA sub01_FA sub02_FA_to_sub01_FA -e -FA",
        f"{fsl_reg} sub03_FA sub01_FA sub03_FA_to_sub01_FA -e -FA",
        f"{fsl_reg} sub01_FA sub02_FA sub01_FA_to_sub02_FA -e -FA",
    ]
    assert len(lines) == 9


def test_standin_writes_what_fsl_reg_writes(tmp_path: Path) -> None:
    study = make_demo(tmp_path / "s", subjects=2, seconds=0.1)
    fa = Path(study.fa_dir)
    fsl_reg = f"{study.fsldir}/bin/fsl_reg"
    subprocess.run([fsl_reg, "sub01_FA", "sub02_FA", "a_to_b", "-e", "-FA"], cwd=fa, check=True)
    subprocess.run([fsl_reg, "sub01_FA", "sub01_FA", "self", "-e", "-FA"], cwd=fa, check=True)
    for name in ("a_to_b.mat", "a_to_b.log", "a_to_b_warp.nii.gz", "a_to_b_warp.msf"):
        assert (fa / name).exists(), name
    score, self_score = read_msf(fa / "a_to_b_warp.msf"), read_msf(fa / "self_warp.msf")
    assert score is not None and self_score is not None
    assert self_score[0] < score[0]
    assert np.loadtxt(fa / "a_to_b.mat").shape == (4, 4)


def test_standin_like_fsl_reg_exits_0_without_output_on_a_missing_image(tmp_path: Path) -> None:
    study = make_demo(tmp_path / "s", subjects=2, seconds=0)
    res = subprocess.run(
        [f"{study.fsldir}/bin/fsl_reg", "nope_FA", "sub01_FA", "x", "-e"],
        cwd=study.fa_dir,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "nope_FA" in res.stderr
    assert not (Path(study.fa_dir) / "x_warp.msf").exists()


def test_demo_refuses_a_non_empty_study(tmp_path: Path) -> None:
    make_demo(tmp_path / "s", subjects=2, seconds=0)
    with pytest.raises(ConfigError, match="not empty"):
        make_demo(tmp_path / "s", subjects=2, seconds=0)
