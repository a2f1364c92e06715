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
    # Given one pair done (a score and its warp) and one placeholder left by an interrupted run
    (study / "FA" / "s2_FA_to_s1_FA_warp.msf").write_text("0.5 0.25\n")
    (study / "FA" / "s2_FA_to_s1_FA_warp.nii.gz").write_bytes(b"warp")
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
            (fa / f"{g}_FA_to_{f}_FA_warp.nii.gz").write_bytes(b"warp")


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
    # and an all.msf from an earlier run, which tbss_3_postreg removes before anything else
    (fa / "all.msf").write_text("c_FA .1 .1\n")
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


def _tbss_2_reg_would_queue(fa: Path, lines: list[str]) -> list[str]:
    """FSL's tbss_2_reg rule for a pair of a line: queued only when OUT_warp.msf is no file."""
    return [line for line in lines if not (fa / f"{line.split()[3]}_warp.msf").is_file()]


def test_plan_lists_subjects_as_imglob_on_the_shell_glob(study: Path, tmp_path: Path) -> None:
    # Given the same study twice, one with macOS AppleDouble files beside the images
    other = tmp_path / "other"
    (other / "FA").mkdir(parents=True)
    for p in (study / "FA").iterdir():
        (other / "FA" / p.name).write_bytes(p.read_bytes())
    for name in ("._s1_FA.nii.gz", "._s2_FA.nii.gz", ".s9_FA.nii"):
        (other / "FA" / name).write_bytes(b"\x00\x05\x16\x07")
    # When both are planned
    plan(study, mode="-n", fsldir="/fsl")
    plan(other, mode="-n", fsldir="/fsl")
    # Then dotfiles are no subjects (the shell's glob skips them): the same nine lines
    assert (other / "FA" / ".commands").read_text() == (study / "FA" / ".commands").read_text()
    assert len((study / "FA" / ".commands").read_text().splitlines()) == 9
    # and a bzip2-compressed image is a subject, as fslpy's imglob accepts .nii.bz2
    (study / "FA" / "s4_FA.nii.bz2").write_bytes(b"x")
    result = plan(study, mode="-n", fsldir="/fsl")
    assert "/fsl/bin/fsl_reg s4_FA s1_FA s4_FA_to_s1_FA -e -FA" in result.lines
    assert len(result.lines) == 16


def test_plan_queues_again_what_the_worker_would_not_call_done(study: Path) -> None:
    fa = study / "FA"
    # Given a done pair, one whose .msf holds error text, one with a score but no warp
    (fa / "s1_FA_to_s1_FA_warp.msf").write_text("0.1 0.05\n")
    (fa / "s1_FA_to_s1_FA_warp.nii.gz").write_bytes(b"warp")
    (fa / "s2_FA_to_s1_FA_warp.msf").write_text("Image Exception : #22 :: Failed to read\n")
    (fa / "s3_FA_to_s1_FA_warp.msf").write_text("0.2 0.1\n")
    result = plan(study, mode="-n", fsldir="/fsl")
    # Then only the done pair is left out; the other two are planned again
    assert result.done == ("s1_FA_to_s1_FA",)
    queued = [line.split()[3] for line in result.lines]
    assert "s2_FA_to_s1_FA" in queued and "s3_FA_to_s1_FA" in queued and len(queued) == 8


def test_plan_touches_the_placeholders_tbss_2_reg_touches(study: Path) -> None:
    fa = study / "FA"
    result = plan(study, mode="-n", fsldir="/fsl")
    # Then every queued pair has its empty _warp.msf, as tbss_2_reg leaves it
    for line in result.lines:
        assert (fa / f"{line.split()[3]}_warp.msf").read_bytes() == b""
    # so FSL's own tbss_2_reg, run while the batch runs, queues none of them again
    assert _tbss_2_reg_would_queue(fa, list(result.lines)) == []
    # and a line like tbss_2_reg's is appended to the study's .tbsslog
    [log] = (study / ".tbsslog").read_text().splitlines()
    assert log.startswith("[") and log.endswith(f"[{study.resolve()}] [tbss-queue plan -n]")


def test_plan_copies_the_target_as_imcp_does(study: Path) -> None:
    import nibabel as nib
    import numpy as np

    # Given an uncompressed target image (and an old FA/target.nii from some earlier copy)
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), study / "mytemplate.nii")
    (study / "FA" / "target.nii").write_bytes(b"old")
    plan(study, mode="-t", target="mytemplate.nii", fsldir="/opt/fsl")
    # Then FA/target is written in FSLOUTPUTTYPE's default type, .nii.gz, with the same image
    assert not (study / "FA" / "target.nii").exists()
    copied = nib.load(study / "FA" / "target.nii.gz")
    assert np.array_equal(np.asanyarray(copied.dataobj), data)


def test_best_target_refuses_a_score_whose_warp_is_gone(tmp_path: Path) -> None:
    # tbss_3_postreg's applywarp needs f_to_BEST_warp: a score alone is not a result
    fa = tmp_path / "FA"
    _matrix(fa)
    (fa / "a_FA_to_b_FA_warp.nii.gz").unlink()
    with pytest.raises(IncompleteMatrix, match=r"a_FA_to_b_FA_warp.msf \(its warp"):
        best_target(fa)
    assert not (fa / "all.msf").exists()
