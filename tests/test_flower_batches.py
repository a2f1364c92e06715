"""Flower says what `status` says (issue 29, point 5): a Batches page read from Redis, right for
work done before Flower started, and each task named as its pair with its batch and study."""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tbss_queue import api
from tbss_queue.config import Settings

from .browser import browser, screenshot  # noqa: F401 - the fixture
from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import job
from .test_flower import fetch_as, flower, wait_for, wait_for_task_events
from .test_fsl_outputs import FAKE_FSL_REG

COUNTS = ("total", "queued", "running", "succeeded", "failed", "skipped", "cancelled")


class Rows(HTMLParser):
    """The cells of each <tr id="batch-ID"> of the Batches page, by their class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._row: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and (a.get("id") or "").startswith("batch-"):
            self._row = (a["id"] or "")[len("batch-") :]
            self.rows[self._row] = {}
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class") or ""
            self.rows[self._row][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self.rows[self._row][self._cell] += data.strip()


def test_flower_batches_page_agrees_with_status_for_work_done_before_it_started(
    tmp_path: Path,
    workers: Callable[..., Worker],
    settings: Settings,
    run_tag: str,
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    env = settings_env(settings, run_tag)
    # Given two studies' batches that ended before Flower started: one with a failure
    for study in ("study1", "study5"):
        (tmp_path / study / "FA").mkdir(parents=True)
    w1 = workers("w1", 2)
    lines = [f"touch out{i}" for i in range(5)] + ["false"]
    one = api.submit(write_commands(tmp_path / "study1" / "FA" / "c", lines), settings=settings)
    five = api.submit(
        write_commands(tmp_path / "study5" / "FA" / "c", lines[:3]), settings=settings
    )
    for b in (one, five):
        api.wait(b.id, settings=settings, timeout=60)
    auth = "lab:" + os.urandom(6).hex()
    with flower(env, tmp_path, "--basic-auth", auth) as base:
        page = base + "/batches"
        # Then the Batches page is behind Flower's password
        assert fetch_as(page, None)[0] == 401 and fetch_as(page, "lab:wrong")[0] == 401
        code, body = fetch_as(page, auth)
        assert code == 200
        # and lists both batches, with their study and the very counts `status` gives
        assert 'id="nav-batches"' in body and 'id="nav-throughput"' in body
        parser = Rows()
        parser.feed(body)
        for b, study in ((one, "study1"), (five, "study5")):
            shown = parser.rows[b.id]
            status = api.status(b.id, settings=settings)
            assert {c: int(shown[c]) for c in COUNTS} == {c: getattr(status, c) for c in COUNTS}
            assert shown["study"] == study, shown
            assert shown["state"].startswith("ended"), shown
        assert (parser.rows[one.id]["failed"], parser.rows[five.id]["failed"]) == ("1", "0")
        status_out = tbss_queue("status", one.id, env=env).stdout
        assert re.search(r"\b6\s+0\s+0\s+5\s+1\s+0\s+0\b", status_out), status_out
        # and Flower's own pages, empty of that work, point to it rather than say nothing ran
        for own in ("/workers", "/tasks"):
            text = fetch_as(base + own, auth)[1]
            note = re.search(r'<p[^>]*id="tbssq-since"[^>]*>(.*?)</p>', text, re.S)
            assert note is not None, text
            assert "since this Flower started" in note[1] and 'href="/batches"' in note[1]
        # and a person finds it from Flower's Workers page, in Chromium
        user, password = auth.split(":")
        browser.get(base.replace("://", f"://{user}:{password}@") + "/workers")
        browser.find_element(By.ID, "nav-batches").click()
        WebDriverWait(browser, 30).until(lambda d: d.current_url.endswith("/batches"))
        row = browser.find_element(By.ID, f"batch-{one.id}")
        assert row.find_element(By.CSS_SELECTOR, "td.failed").text == "1"
        assert row.find_element(By.CSS_SELECTOR, "td.study").text == "study1"
        screenshot(browser, "flower-batches")
        # and its JSON is `batches --json`
        code, text = fetch_as(page + "?json=1", auth)
        assert {d["batch"]: d["succeeded"] for d in json.loads(text)["batches"]} == {
            one.id: 5,
            five.id: 3,
        }

        # When a pair runs while Flower watches
        wait_for_task_events(w1)
        fa = tmp_path / "study5" / "FA"
        tool = tmp_path / "fsl" / "bin" / "fsl_reg"
        tool.parent.mkdir(parents=True)
        tool.write_text(FAKE_FSL_REG)
        tool.chmod(0o755)
        pair = api.submit(
            write_commands(fa / "pairs", [f"{tool} sub01_FA sub02_FA sub01_FA_to_sub02_FA -e -FA"]),
            settings=settings,
        )
        api.wait(pair.id, settings=settings, timeout=60)
        # Then Flower names its task as the pair, with its batch and study
        query = urllib.parse.urlencode(
            {"draw": 1, "start": 0, "length": 50, "order[0][column]": 0, "columns[0][data]": "name"}
        )

        def names() -> list[str]:
            code, text = fetch_as(base + "/tasks/datatable?" + query, auth)
            return [row["name"] for row in json.loads(text)["data"]] if code == 200 else []

        wait_for(lambda: any("sub01_FA→sub02_FA" in n for n in names()), "the pair's task")
        [name] = [n for n in names() if "sub01_FA→sub02_FA" in n]
        assert name == f"sub01_FA→sub02_FA · batch {pair.id} · study5", name


def test_flower_shows_a_dropped_duplicate_as_such_not_as_running_or_cancelled(
    tmp_path: Path, workers: Callable[..., Worker], settings: Settings, run_tag: str
) -> None:
    from tbss_queue.queue.app import make_app
    from tbss_queue.queue.batches import BatchStore
    from tbss_queue.queue.broker import connect
    from tbss_queue.queue.recovery import republish

    env = settings_env(settings, run_tag)
    # Given a command that succeeded while Flower watched
    w1 = workers("w1", 2)
    auth = "lab:" + os.urandom(6).hex()
    with flower(env, tmp_path, "--basic-auth", auth) as base:
        wait_for_task_events(w1)
        batch = api.submit(write_commands(tmp_path / "c", ["touch once.out"]), settings=settings)
        assert api.wait(batch.id, settings=settings, timeout=60).succeeded == 1
        # When a second message of it arrives (a duplicate, as a redelivery makes one)
        [record] = api.tasks(batch.id, settings=settings)
        store = BatchStore(connect(settings))
        assert republish(make_app(settings), store, settings, batch.id, record.task_id)
        query = urllib.parse.urlencode(
            {"draw": 1, "start": 0, "length": 50, "order[0][column]": 0, "columns[0][data]": "name"}
        )

        def states() -> list[str]:
            code, text = fetch_as(base + "/tasks/datatable?" + query, auth)
            assert code == 200
            return sorted(row["state"] for row in json.loads(text)["data"])

        wait_for(lambda: len(states()) == 2, "both messages in Flower")
        wait_for(lambda: "w1" in w1.log.read_text() and "SUCCESS" in states(), "the first")
        # Then Flower shows the first as its success and the duplicate as dropped, in words
        wait_for(lambda: "DUPLICATE" in states(), f"the duplicate said so: {states()}", timeout=20)
        assert states() == ["DUPLICATE", "SUCCESS"], states()
        # and status agrees: one command, succeeded
        assert api.status(batch.id, settings=settings).succeeded == 1


def test_flower_shows_a_stopped_worker_running_nothing(
    tmp_path: Path, workers: Callable[..., Worker], settings: Settings, run_tag: str
) -> None:
    env = settings_env(settings, run_tag)
    # Given a worker running a long command while Flower watches
    w1 = workers("w1", 1)
    auth = "lab:" + os.urandom(6).hex()
    with flower(env, tmp_path, "--basic-auth", auth) as base:
        wait_for_task_events(w1)
        long = job(1, tmp_path / "log", "--sleep", "600")
        api.submit(write_commands(tmp_path / "c", [long]), settings=settings)

        def shown() -> dict[str, object]:
            code, text = fetch_as(base + "/workers?json=1", auth)
            assert code == 200
            [row] = [r for r in json.loads(text)["data"] if r["hostname"].startswith("w1@")]
            return dict(row)

        wait_for(lambda: shown().get("active") == 1, "Flower to see the command running")
        # When the worker is stopped (its machine goes down: no goodbye)
        w1.stop()
        # Then, once Flower calls it offline, it shows it running nothing
        wait_for(lambda: shown()["status"] is False, "Flower to call w1 offline", timeout=60)
        assert shown()["active"] == 0, shown()
        # and so does the page itself (status False: Flower's script words it Offline)
        page = fetch_as(base + "/workers", auth)[1]
        row = re.search(r'<tr id="w1%40[^"]*">(.*?)</tr>', page, re.S)
        assert row is not None, page
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", row[1])]
        assert cells[1] == "False" and cells[2] != "1", cells
