"""`tbss-queue report`: one self-contained HTML file, checked in headless Chromium."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.views.report import RASTERIZE_ABOVE, Runs, timeline_svg

from .browser import browser, screenshot  # noqa: F401 - the fixture
from .conftest import Worker, settings_env, tbss_queue, write_commands
from .test_reliability import job


def test_report_of_a_batch_with_a_failure(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    run_tag: str,
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    # Given a 12-command batch, one of which fails, run by two worker nodes
    log = tmp_path / "log"
    lines = [job(i, log, "--sleep", "0.5") for i in range(11)]
    lines.insert(4, job("bad", log, "--exit", "7", "--stderr", "registration exploded"))
    cmds = write_commands(tmp_path / "cmds", lines)
    workers("w1", 2)
    workers("w2", 2)
    batch = api.submit(cmds, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=90).failed == 1
    env = settings_env(settings, run_tag)
    # When the report is written
    out = tmp_path / "report.html"
    res = tbss_queue("report", batch.id, "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    # Then it needs nothing from the network: no scripts, no external images, fonts or styles
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "fetches something"
    # and Chromium shows both workers' slots in the timeline and the failed command
    browser.get(out.as_uri())
    timeline = browser.find_element(By.ID, "timeline").text
    assert re.search(r"w1@\S+ #\d", timeline) and re.search(r"w2@\S+ #\d", timeline), timeline
    rows = browser.find_elements(By.CSS_SELECTOR, "#failures tr")
    assert len(rows) == 2  # header + the one failure
    assert "bad --log" in rows[1].text and "registration exploded" in rows[1].text
    assert "7" in rows[1].text
    summary = browser.find_element(By.ID, "summary").text
    assert "succeeded\n11" in summary and "failed\n1" in summary
    for plot in ("throughput", "timeline", "durations"):
        size = browser.find_element(By.CSS_SELECTOR, f"#{plot} svg").size
        assert size["width"] > 300 and size["height"] > 100, (plot, size)
    screenshot(browser, "report")
    # The same data for notebooks and scripts: the API and --json
    data = api.report(batch.id, settings=settings)
    assert {(r["node"].split("@")[0]) for r in data["timeline"]} == {"w1", "w2"}
    assert len(data["timeline"]) == 12 and data["summary"]["failed"] == 1
    res = tbss_queue("report", batch.id, "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout) == data


def test_report_of_a_batch_that_has_not_started(tmp_path: Path, settings: Settings) -> None:
    batch = api.submit(write_commands(tmp_path / "c", ["true"]), settings=settings)
    out = tmp_path / "r.html"
    api.report(batch.id, path=out, settings=settings)
    assert "nothing to plot" in out.read_text()


def test_the_report_shows_every_attempt_and_only_the_failures_that_stand(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a command that fails, is fixed and retried, beside one that keeps failing
    flag = tmp_path / "fixed"
    cmds = write_commands(tmp_path / "cmds", [f"test -e {flag}", "false", "true"])
    workers("w1", 2)
    batch = api.submit(cmds, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=90).failed == 2
    flag.touch()
    api.retry(batch.id, settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=90)
    assert (final.succeeded, final.failed) == (2, 1)
    # Then the timeline holds each attempt (line 1 twice: failed, then succeeded) ...
    data = api.report(batch.id, settings=settings)
    attempts = [(r["line"], r["state"]) for r in data["timeline"]]
    assert sorted(attempts) == [
        (1, "failed"),
        (1, "succeeded"),
        (2, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    # ... and the failures are the one command failed now, as `failures` says
    assert [f["line"] for f in data["failures"]] == [2]
    assert [r.line for r in api.failures(batch.id, settings=settings)] == [2]


def test_a_timeline_of_many_attempts_is_drawn_as_an_image() -> None:
    # Given more attempts than SVG bars would carry (a 1,000-subject study's worth is 1e6)
    n = RASTERIZE_ABOVE + 1
    lines = [
        f"{i}\tw{i % 8}@h\t{i // 8 % 2}\t{1000.0 + i * 0.01:.3f}\t{1003.0 + i * 0.01:.3f}\t"
        + ("failed" if i % 97 == 0 else "succeeded")
        for i in range(n)
    ]
    runs = Runs.parse(lines)
    assert len(runs) == n and len(runs.rows) == 16
    # When the timeline is drawn, it is one embedded image on 16 labelled rows
    svg = timeline_svg(runs)
    assert svg.count("<image") == 1
    assert all(f"w{k}@h #{s}" in svg for k in range(8) for s in (0, 1))


FAIL_ONCE = """import os, sys, time
mark = sys.argv[1]
time.sleep(float(sys.argv[2]))
if not os.path.exists(mark):
    open(mark, "w").close()
    sys.exit("first attempt fails")
"""


def test_the_report_counts_failed_attempts_and_says_what_became_of_them(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a 16-command batch whose first 12 commands failed once, then succeeded on retry
    (tmp_path / "fail_once.py").write_text(FAIL_ONCE)
    script = tmp_path / "fail_once.py"
    lines = [f"python3 {script} {tmp_path}/m{i} 0.3" for i in range(12)]
    lines += [f"python3 {script} {tmp_path}/keep 0.3{i}" for i in range(4)]
    (tmp_path / "keep").write_text("")
    workers("w1", 2)
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=90).failed == 12
    api.retry(batch.id, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=90).ok
    # When its report is written
    out = tmp_path / "report.html"
    res = tbss_queue("report", batch.id, "-o", str(out), env=settings_env(settings, run_tag))
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    text = " ".join(re.sub(r"<[^>]+>", " ", page[page.index("<h2>Failures") :]).split())
    # Then it does not say that nothing failed: it counts the 12 failed attempts and says
    # what became of them
    assert "No command failed" not in page and "Failures (0)" not in page
    assert "12 failed attempts: 12 failed, then succeeded on retry" in text, text
    data = api.report(batch.id, settings=settings)
    assert data["summary"]["failed_attempts"] == 12
    assert data["summary"]["failed_then_succeeded"] == 12
    # and the throughput chart's bins fit the batch: a few attempts each, covering its length,
    # with rates that are per minute of that bin (not a second's count times 60)
    bins = data["throughput"]
    assert 1 <= len(bins["per_minute"]) <= 28 // 4, bins
    span = bins["bin_seconds"] * len(bins["per_minute"])
    assert abs(span - bins["span_seconds"]) < 0.01, bins
    assert sum(bins["counts"]) == 28
    assert f"28 attempts ended, in {len(bins['counts'])} bin" in page


def test_a_failure_retried_by_retries_is_counted_and_shown(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given 3 commands that fail once, submitted with --retries 1, so that each is retried by
    # the worker itself (not by `tbss-queue retry`) and then succeeds
    (tmp_path / "fail_once.py").write_text(FAIL_ONCE)
    script = tmp_path / "fail_once.py"
    workers("w1", 2)
    lines = [f"python3 {script} {tmp_path}/m{i} 0.2" for i in range(3)]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings, retries=1)
    assert api.wait(batch.id, settings=settings, timeout=90).succeeded == 3
    # When its report is written
    out = tmp_path / "report.html"
    res = tbss_queue("report", batch.id, "-o", str(out), env=settings_env(settings, run_tag))
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    text = " ".join(re.sub(r"<[^>]+>", " ", page[page.index("<h2>Failures") :]).split())
    # Then the 3 failed attempts are counted, and said to have succeeded on retry
    assert "3 failed attempts: 3 failed, then succeeded on retry" in text, text
    data = api.report(batch.id, settings=settings)
    assert (data["summary"]["failed_attempts"], data["summary"]["failed_then_succeeded"]) == (3, 3)
    assert sum(data["throughput"]["counts"]) == 6
