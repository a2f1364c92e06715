"""plan writes what tbss_2_reg writes; best-target computes what tbss_3_postreg -S computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbss_queue.errors import ConfigError
from tbss_queue.fsl.plan import IncompleteMatrix, best_target, plan

from .conftest import tbss_queue


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """What tbss_1_preproc leaves: FA images, masks; plus leftovers imglob must ignore."""
    fa = tmp_path / "study" / "FA"
    fa.mkdir(parents=True)
    for name in (
        "s1_FA.nii.gz",
        "s2_FA.nii.gz",
        "s3_FA.nii.gz",
        "s1_FA_mask.nii.gz",
        "s2_FA_mask.nii.gz",
        "s1_FA_to_s2_FA.mat",
        "notes.txt",
    ):
        (fa / name).write_bytes(b"x")
    return tmp_path / "study"


def test_plan_n_writes_all_pairs_grouped_by_reference(study: Path) -> None:
    # Given one pair done (non-empty .msf) and one placeholder left by an interrupted run
    (study / "FA" / "s2_FA_to_s1_FA_warp.msf").write_text("0.5 0.25\n")
    (study / "FA" / "s3_FA_to_s1_FA_warp.msf").write_text("")
    result = plan(study, mode="-n", fsldir="/usr/local/fsl")
    r = "/usr/local/fsl/bin/fsl_reg"
    assert (study / "FA" / ".commands").read_text().splitlines() == [
        f"{r} s1_FA s1_FA s1_FA_to_s1_FA -e -FA",
        f"{r} s3_FA s1_FA s3_FA_to_s1_FA -e -FA",
        f"{r} s1_FA s2_FA s1_FA_to_s2_FA -e -FA",
        f"{r} s2_FA s2_FA s2_FA_to_s2_FA -e -FA",
        f"{r} s3_FA s2_FA s3_FA_to_s2_FA -e -FA",
        f"{r} s1_FA s3_FA s1_FA_to_s3_FA -e -FA",
        f"{r} s2_FA s3_FA s2_FA_to_s3_FA -e -FA",
        f"{r} s3_FA s3_FA s3_FA_to_s3_FA -e -FA",
    ]
    assert result.done == ("s2_FA_to_s1_FA",)


def test_plan_T_copies_the_standard_target_and_registers_to_it(study: Path, tmp_path: Path) -> None:
    fsl = tmp_path / "fsl"
    (fsl / "data" / "standard").mkdir(parents=True)
    (fsl / "data" / "standard" / "FMRIB58_FA_1mm.nii.gz").write_bytes(b"standard")
    plan(study, mode="-T", fsldir=str(fsl) + "/")
    assert (study / "FA" / "target.nii.gz").read_bytes() == b"standard"
    # $FSLDIR is pasted as is: a trailing slash gives // as in tbss_2_reg
    assert (study / "FA" / ".commands").read_text().splitlines() == [
        f"{fsl}//bin/fsl_reg s{i}_FA target s{i}_FA_to_target -e -FA" for i in (1, 2, 3)
    ]


def test_plan_t_uses_the_given_image_relative_to_the_study(study: Path) -> None:
    (study / "mytemplate.nii.gz").write_bytes(b"mine")
    plan(study, mode="-t", target="mytemplate", fsldir="/opt/fsl")
    assert (study / "FA" / "target.nii.gz").read_bytes() == b"mine"
    assert (study / "FA" / ".commands").read_text().splitlines()[0] == (
        "/opt/fsl/bin/fsl_reg s1_FA target s1_FA_to_target -e -FA"
    )


def test_plan_refuses_without_fa_or_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tbss_1_preproc"):
        plan(tmp_path, mode="-n", fsldir="/fsl")
    (tmp_path / "FA").mkdir()
    with pytest.raises(ConfigError, match="no \\*_FA images"):
        plan(tmp_path, mode="-n", fsldir="/fsl")
    res = tbss_queue("plan", str(tmp_path), "-n", "--fsldir", "/fsl")
    assert res.returncode == 2 and "no *_FA images" in res.stderr


SCORES = {  # moving -> reference -> mean score (median = mean / 2)
    "a": {"a": "0", "b": "1.0", "c": "2"},
    "b": {"a": "1.5", "b": "0", "c": "1"},
    "c": {"a": "2.25", "b": "1.0", "c": "0"},
}


def _matrix(fa: Path) -> None:
    fa.mkdir(parents=True, exist_ok=True)
    for g, row in SCORES.items():
        (fa / f"{g}_FA.nii.gz").write_bytes(b"x")
        for f, mean in row.items():
            (fa / f"{g}_FA_to_{f}_FA_warp.msf").write_text(f"{mean} {float(mean) / 2}\n")


def test_best_target_matches_fsl_arithmetic(tmp_path: Path) -> None:
    fa = tmp_path / "FA"
    _matrix(fa)
    result = best_target(fa)
    # per target: sum of the first column over all moving images / n, dc scale 10 truncation
    assert (fa / "all.msf").read_text().splitlines() == [
        "a_FA 1.2500000000 .6250000000",
        "b_FA .6666666666 .3333333333",
        "c_FA 1.0000000000 .5000000000",
    ]
    assert result.best == "b_FA"
    assert [s.subject for s in result.ranking] == ["b_FA", "c_FA", "a_FA"]


def test_best_target_refuses_a_matrix_with_holes(tmp_path: Path) -> None:
    # FSL would count these as 0 and pick c_FA (score .3333333333): a wrong target
    fa = tmp_path / "FA"
    _matrix(fa)
    (fa / "a_FA_to_c_FA_warp.msf").unlink()
    (fa / "b_FA_to_c_FA_warp.msf").write_text("")
    with pytest.raises(IncompleteMatrix) as info:
        best_target(fa)
    assert "a_FA_to_c_FA_warp.msf (missing)" in str(info.value)
    assert "b_FA_to_c_FA_warp.msf (empty" in str(info.value)
    res = tbss_queue("best-target", str(fa))
    assert res.returncode == 1 and "a_FA_to_c_FA_warp.msf" in res.stderr
    assert not (fa / "all.msf").exists()


def test_best_target_warns_when_fa_target_exists(tmp_path: Path) -> None:
    fa = tmp_path / "FA"
    _matrix(fa)
    (fa / "target.nii.gz").write_bytes(b"old")
    res = tbss_queue("best-target", str(fa))
    assert res.returncode == 0 and res.stdout.strip() == "b_FA"
    assert "target exists" in res.stderr
