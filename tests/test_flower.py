"""Flower for the configured broker, seen in headless Chromium: workers, commands, metrics."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.redis_server import RedisServer, free_port

from .browser import browser, screenshot  # noqa: F401 - the fixture
from .conftest import REPO, Worker, settings_env, tbss_queue, write_commands


@contextmanager
def flower(env: dict[str, str], tmp_path: Path, *args: str) -> Iterator[str]:
    """`tbss-queue flower` on a free loopback port; yields its base URL, always stopped."""
    port = free_port()
    log = tmp_path / "flower.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tbss_queue", "flower", "--port", str(port), *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=tmp_path,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(base + "/healthcheck")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield base
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def fetch(url: str) -> str:
    """GET a page of the Flower this test started (http on loopback only)."""
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - checked just above
        return str(r.read().decode())


def workers_seen(base: str) -> set[str]:
    """Node names Flower lists (the JSON its Workers page is drawn from)."""
    rows = json.loads(fetch(base + "/workers?json=1"))["data"]
    return {row["hostname"].split("@")[0] for row in rows}


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def wait_for_task_events(*nodes: Worker) -> None:
    """Workers send task events once Flower has asked them to (within 5 s of its start)."""
    wait_for(
        lambda: all("Events of group {task} enabled by remote" in w.log.read_text() for w in nodes),
        "Flower to switch task events on",
    )


def test_flower_shows_workers_commands_and_metrics(
    tmp_path: Path,
    workers: Callable[..., Worker],
    settings: Settings,
    run_tag: str,
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    # Given a password-protected Redis, two worker nodes and Flower
    password = "pw-" + os.urandom(8).hex()
    server = RedisServer(tmp_path / "redis", port=free_port(), persistent=False, password=password)
    server.start()
    try:
        env = {**settings_env(settings, run_tag), "TBSS_QUEUE_BROKER": server.url}
        nodes = [workers(name, 2, env={"TBSS_QUEUE_BROKER": server.url}) for name in ("w1", "w2")]
        with flower(env, tmp_path, "--db", str(tmp_path / "flower.db")) as base:
            wait_for(lambda: workers_seen(base) == {"w1", "w2"}, "Flower to see both workers")
            wait_for_task_events(*nodes)
            # When a 20-command batch runs
            cmds = write_commands(tmp_path / "cmds", [f"touch out{i:02d}" for i in range(20)])
            res = tbss_queue("submit", str(cmds), "--wait", env=env)
            assert res.returncode == 0, res.stderr

            # Then /metrics counts 20 succeeded tasks
            def succeeded() -> float:
                text = fetch(base + "/metrics")
                found = re.findall(
                    r'flower_events_total\{[^}]*type="task-succeeded"[^}]*\} (\S+)', text
                )
                return sum(float(x) for x in found)

            wait_for(lambda: succeeded() == 20, "20 task-succeeded events in /metrics")
            # and the Workers page lists both nodes
            browser.get(base + "/workers")
            WebDriverWait(browser, 30).until(
                lambda d: (
                    "w1@" in d.find_element(By.ID, "workers-table").text
                    and "w2@" in d.find_element(By.ID, "workers-table").text
                )
            )
            screenshot(browser, "flower-workers")
            # and the Tasks page shows 20 succeeded tasks, each named by its command
            browser.get(base + "/tasks?state=SUCCESS")
            WebDriverWait(browser, 30).until(
                lambda d: "out19" in d.find_element(By.ID, "tasks-table").text
            )
            # (the table pages by 15: show 50 a page)
            Select(browser.find_element(By.CSS_SELECTOR, "select[name$=_length]")).select_by_value(
                "50"
            )
            rows_css = "#tasks-table tbody tr"
            WebDriverWait(browser, 30).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, rows_css)) == 20
            )
            texts = [r.text for r in browser.find_elements(By.CSS_SELECTOR, rows_css)]
            commands = {m for t in texts for m in re.findall(r"touch out\d\d", t)}
            assert commands == {f"touch out{i:02d}" for i in range(20)}, texts
            assert all("SUCCESS" in t for t in texts)
            screenshot(browser, "flower-tasks")
            # and no page shows the broker's password
            pages = ["/workers", "/tasks", "/broker", "/metrics", "/workers?json=1"]
            for page in pages:
                browser.get(base + page)
                assert password not in browser.page_source, page
    finally:
        server.stop()


def test_the_grafana_dashboard_uses_metrics_flower_exports(
    tmp_path: Path, settings: Settings, run_tag: str, workers: Callable[..., Worker]
) -> None:
    """The provisioned dashboard and Prometheus's scrape target match what Flower serves."""
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/tbss-queue.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(flower_[a-z_]+)", e)}
    assert used
    prometheus = yaml.safe_load((REPO / "deploy/prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["flower:5555"]
    # a real Flower, after one command, serves every metric the dashboard queries
    w1 = workers("w1", 1)
    env = settings_env(settings, run_tag)
    with flower(env, tmp_path) as base:
        wait_for_task_events(w1)
        res = tbss_queue("submit", str(write_commands(tmp_path / "c", ["true"])), "--wait", env=env)
        assert res.returncode == 0, res.stderr

        def served() -> set[str]:
            return set(re.findall(r"^(flower_[a-z_]+)", fetch(base + "/metrics"), re.M))

        # worker gauges appear with the first worker heartbeat Flower receives (every 2 s)
        wait_for(lambda: used <= served(), "every metric the dashboard queries")
        # runtime buckets fit 3-5 minute registrations
        assert 'le="300.0"' in fetch(base + "/metrics")


def fetch_as(url: str, user_password: str | None) -> tuple[int, str]:
    """GET with HTTP basic auth (None: without); (status, body), 401 included."""
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url)  # noqa: S310 - loopback http only, checked above
    if user_password:
        token = base64.b64encode(user_password.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_flower_throughput_page_during_a_batch(
    tmp_path: Path,
    workers: Callable[..., Worker],
    settings: Settings,
    run_tag: str,
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    env = settings_env(settings, run_tag)
    # Given an 8-subject demo study (64 registrations), two nodes and Flower with a password
    res = tbss_queue("demo", str(tmp_path / "study"), "--subjects", "8", "--seconds", "1", env=env)
    assert res.returncode == 0, res.stderr
    w1, w2 = workers("w1", 2), workers("w2", 2)
    auth = "lab:" + os.urandom(6).hex()
    with flower(env, tmp_path, "--basic-auth", auth) as base:
        page = base + "/throughput"
        # the page is behind the same password as Flower's own pages
        assert fetch_as(page, None)[0] == 401 and fetch_as(base + "/workers", None)[0] == 401
        assert fetch_as(page, "lab:wrong")[0] == 401
        wait_for_task_events(w1, w2)
        # When the batch runs
        batch = api.submit(tmp_path / "study" / "FA" / ".commands", settings=settings)

        def figures() -> dict[str, Any]:
            status, body = fetch_as(page + "?json=1", auth)
            assert status == 200
            return dict(json.loads(body))

        wait_for(
            lambda: figures()["total"] >= 24 and len(figures()["nodes"]) == 2,
            "a third of the batch finished on both nodes",
            timeout=120,
        )
        # Then Flower's Workers page links to it, and it draws overall and per-node lines
        user, password = auth.split(":")
        browser.get(base.replace("://", f"://{user}:{password}@") + "/workers")
        browser.find_element(By.ID, "nav-throughput").click()
        WebDriverWait(browser, 30).until(lambda d: d.current_url.endswith("/throughput"))
        series = {
            e.get_attribute("data-node")
            for e in browser.find_elements(By.CSS_SELECTOR, "#throughput-chart polyline.series")
        }
        assert series == {"all nodes", f"w1@{socket.gethostname()}", f"w2@{socket.gethostname()}"}
        caption = browser.find_element(By.ID, "throughput-caption").text
        assert "running batches: " + batch.id in caption, caption
        chart = browser.find_element(By.CSS_SELECTOR, "#throughput-chart svg").size
        assert chart["width"] > 600 and chart["height"] > 200
        screenshot(browser, "flower-throughput")
        # and when the batch is done, its figures are our records': 64 commands, by node
        assert api.wait(batch.id, settings=settings, timeout=240).succeeded == 64
        final = figures()
        by_node = Counter(r["node"] for r in api.report(batch.id, settings=settings)["timeline"])
        assert final["total"] == 64
        assert {n: sum(c) for n, c in final["nodes"].items()} == dict(by_node)
        rates = final["overall_per_minute"]
        assert max(rates) > 0 and sum(final["overall"]) == 64


def test_flower_rows_after_a_retry_are_one_per_attempt(
    tmp_path: Path,
    workers: Callable[..., Worker],
    settings: Settings,
    run_tag: str,
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    env = settings_env(settings, run_tag)
    # Given a 2-subject demo study whose sub02 image is cut short, a node and Flower
    res = tbss_queue(
        "demo", str(tmp_path / "s"), "--subjects", "2", "--seconds", "0", "--broken", "sub02"
    )
    assert res.returncode == 0, res.stderr
    fa = tmp_path / "s" / "FA"
    w1 = workers("w1", 2)
    with flower(env, tmp_path) as base:
        wait_for_task_events(w1)
        # When its pairs fail, the image is replaced and the batch retried
        res = tbss_queue("submit", str(fa / ".commands"), "--wait", env=env)
        assert res.returncode == 1, res.stderr
        shutil.copy(fa / "sub01_FA.nii.gz", fa / "sub02_FA.nii.gz")
        res = tbss_queue("retry", "--wait", env=env)
        assert res.returncode == 0, res.stderr
        # Then Flower's Tasks page shows each pair by name, one row per attempt: the failed
        # attempt with its error, the successful one with none
        browser.get(base + "/tasks")
        rows_css = "#tasks-table tbody tr"
        WebDriverWait(browser, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, rows_css)) == 7
        )
        rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, rows_css)]
        pair = [r for r in rows if "sub02_FA→sub01_FA" in r]
        assert len(pair) == 2, rows
        [failed] = [r for r in pair if "FAILURE" in r]
        [succeeded] = [r for r in pair if "SUCCESS" in r]
        assert "CommandFailed" in failed
        assert "CommandFailed" not in succeeded and "Failed" not in succeeded
        assert sum("SUCCESS" in r for r in rows) == 4 and sum("FAILURE" in r for r in rows) == 3
        # and the failed attempt's exception text wraps inside the page, not off its edge
        wraps = "return getComputedStyle(arguments[0]).whiteSpace"
        assert [
            browser.execute_script(wraps, c)
            for c in browser.find_elements(By.CSS_SELECTOR, f"{rows_css} td:nth-child(7)")
        ] == ["normal"] * 7
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert all(
            c.rect["x"] + c.rect["width"] <= width
            for c in browser.find_elements(By.CSS_SELECTOR, f"{rows_css} td:nth-child(7)")
        )
        screenshot(browser, "flower-tasks-after-retry")
