"""The subject matrix of a `tbss_2_reg -n` study: a broken subject named, the best target
marked, in the report (headless Chromium), `status --matrix` and `--json`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.fsl.matrix import subject_matrix
from tbss_queue.models import TaskRecord

from .browser import ARTIFACTS, browser, screenshot  # noqa: F401 - the fixture
from .conftest import REPO, Worker, settings_env, tbss_queue

BROKEN = "sub05: 5 of 5 pairs failed as moving, 5 of 5 as reference: check its FA image"


def test_a_broken_subject_is_named_and_the_best_target_marked(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    run_tag: str,
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    env = settings_env(settings, run_tag)
    # Given a 6-subject demo study whose sub05 FA image is cut short, run on two nodes
    res = tbss_queue(
        "demo", str(tmp_path / "study"), "--seconds", "0.2", "--broken", "sub05", env=env
    )
    assert res.returncode == 0, res.stderr
    fa = tmp_path / "study" / "FA"
    workers("w1", 2)
    workers("w2", 2)
    res = tbss_queue("submit", str(fa / ".commands"), "--wait", env=env, timeout=240)
    assert res.returncode == 1, res.stderr  # 11 pairs failed
    batch = api.status(settings=settings).batch

    # When the report is written and opened
    out = tmp_path / "report.html"
    res = tbss_queue("report", batch, "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr
    browser.get(out.as_uri())
    # Then the matrix has 36 cells: sub05's row and column (11 pairs) failed, the rest done
    cells = browser.find_elements(By.CSS_SELECTOR, "#matrix td.cell")
    states = [c.get_attribute("data-state") for c in cells]
    assert len(states) == 36 and states.count("failed") == 11, states
    assert states.count("succeeded") == 25
    assert all(c.get_attribute("data-state") == "failed" for c in cells[4 * 6 : 5 * 6])
    assert all(cells[i * 6 + 4].get_attribute("data-state") == "failed" for i in range(6))
    # and the summary names sub05 and nothing else
    summary = browser.find_element(By.ID, "matrix-summary").text
    assert BROKEN in summary, summary
    assert "other pairs failed" not in summary
    # and a failed cell says why on hover
    assert "sub05 → sub01: failed" in cells[4 * 6].get_attribute("title")
    browser.set_window_size(1400, 1100)
    screenshot(browser, "report-subject-matrix")

    # and the terminal and --json say the same
    res = tbss_queue("status", batch, "--matrix", env={**env, "COLUMNS": "120"})
    assert res.returncode == 0, res.stderr
    assert "subject matrix" in res.stdout and BROKEN in res.stdout, res.stdout
    (ARTIFACTS / "status-matrix.txt").write_text(res.stdout)
    # (and README shows that output, as printed)
    shown = res.stdout[res.stdout.index("subject matrix") :].splitlines()
    assert "\n".join(x.rstrip() for x in shown) in (REPO / "README.md").read_text()
    res = tbss_queue("status", batch, "--matrix", "--json", env=env)
    data = json.loads(res.stdout)["matrix"]
    assert data["broken"] == ["sub05_FA"] and BROKEN in data["summary"]
    assert data["counts"][4]["moving_failed"] == 5 and data["counts"][0]["moving_failed"] == 1
    assert api.report(batch, settings=settings)["matrix"] == data

    # When sub05's image is replaced and its pairs retried, and best-target picks a target
    shutil.copy(fa / "sub04_FA.nii.gz", fa / "sub05_FA.nii.gz")
    res = tbss_queue("retry", batch, "--wait", env=env, timeout=240)
    assert res.returncode == 0, res.stderr
    res = tbss_queue("best-target", str(fa), env=env)
    assert res.returncode == 0, res.stderr
    best = res.stdout.strip()
    # Then every cell is done and coloured by its cost, and the best target is marked
    m = api.matrix(batch, settings=settings)
    assert m is not None and m.broken == () and m.best_target == best
    assert m.best_from == "all.msf"
    costs = [c.cost for row in m.cells for c in row]
    assert all(c is not None for c in costs)
    res = tbss_queue("status", batch, "--matrix", env={**env, "COLUMNS": "120"})
    assert "no pair failed" in res.stdout and "36 of 36 pairs done" in res.stdout
    assert f"best target: {best.removesuffix('_FA')} (best-target's choice" in res.stdout
    assert "★" + best.removesuffix("_FA") in res.stdout


def test_no_matrix_for_other_batches(tmp_path: Path) -> None:
    """A -T study (every subject onto `target`) and plain commands have none."""
    fsl_reg = "/opt/fsl/bin/fsl_reg"
    to_target = [
        TaskRecord(str(i), i, (fsl_reg, f"s{i}_FA", "target", f"s{i}_FA_to_target"), "queued")
        for i in range(3)
    ]
    assert subject_matrix(to_target, str(tmp_path)) is None
    plain = [TaskRecord("1", 1, ("touch", "x"), "queued")]
    assert subject_matrix(plain, str(tmp_path)) is None
