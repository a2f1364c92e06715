"""One vocabulary of causes, in words that name the file or the exit, shared by the terminal
(`submit --wait`, `failures`), `logs` and the report; long text wraps, never cut."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, tbss_queue, write_commands

NO_OUTPUT_FSL_REG = """#!{python}
import sys
print("fsl_reg " + " ".join(sys.argv[1:]))
print("flirt: cannot read image " + sys.argv[1], file=sys.stderr)
"""
LONG = "x" * 400 + " END-OF-THE-LONG-LINE"

MISSING = (
    "exit code 0 but sub05_FA_to_sub01_FA_warp.msf (two numbers) and its warp image is "
    "missing or empty"
)


class _Cells(HTMLParser):
    """The text of every cell of the report's failures table, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_table = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", "failures") in attrs:
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_every_view_says_why_in_the_same_words_whole(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given an fsl_reg that exits 0 but writes no outputs, and a command that exits 3 with a
    # 421-character last line of stderr
    (tmp_path / "bin").mkdir()
    fsl_reg = tmp_path / "bin" / "fsl_reg"
    fsl_reg.write_text(NO_OUTPUT_FSL_REG.format(python=sys.executable))
    fsl_reg.chmod(0o755)
    fa = tmp_path / "FA"
    fa.mkdir()
    say_long = f"import sys; print({LONG!r}, file=sys.stderr); sys.exit(3)"
    lines = [
        f"{fsl_reg} sub05_FA sub01_FA sub05_FA_to_sub01_FA -e -FA",
        f"{sys.executable} -c {shlex.quote(say_long)}",
    ]
    workers("w1", 2)
    env = {**settings_env(settings, run_tag), "COLUMNS": "80"}
    # When it runs under `submit --wait`
    res = tbss_queue("submit", str(write_commands(fa / ".commands", lines)), "--wait", env=env)
    assert res.returncode == 1, res.stderr
    batch = api.status(settings=settings).batch
    # Then the terminal says the cause in words naming the file and the exit, not the codes
    for shown in (res.stderr, tbss_queue("failures", env=env).stdout):
        assert "missing output 0" not in shown, shown
        assert re.search(r"line 1 \(sub05_FA→sub01_FA\) on w1@\S+: " + re.escape(MISSING), shown)
        assert re.search(r"line 2 on w1@\S+: exit code 3\n", shown), shown
        # and the long stderr line is there whole, not cut
        assert f"stderr: {LONG}\n" in shown + "\n", shown
        assert "stderr: flirt: cannot read image sub05_FA" in shown
    # and `logs` says the same words of the attempt it shows
    header = tbss_queue("logs", batch, "1", env=env).stderr.splitlines()[0]
    assert f": failed: {MISSING}:" in header, header
    header = tbss_queue("logs", batch, "2", env=env).stderr.splitlines()[0]
    assert ": failed: exit code 3:" in header, header
    # and the report's failures table says them too, with the stderr line whole
    out = tmp_path / "report.html"
    assert tbss_queue("report", "-o", str(out), env=env).returncode == 0
    cells = _Cells()
    cells.feed(out.read_text())
    head, *rows = cells.rows
    assert head[:3] == ["line", "command", "cause"], head
    by_line = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    assert by_line["1"]["cause"] == MISSING
    assert by_line["2"]["cause"] == "exit code 3"
    assert by_line["2"]["stderr (last line)"] == LONG
    assert by_line["1"]["stderr (last line)"] == "flirt: cannot read image sub05_FA"


def test_a_long_refusal_is_said_whole(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a worker allowed to run `touch` only, and a command it refuses
    workers("w1", 1, "--allow", "touch", "--root", str(tmp_path))
    cmds = write_commands(tmp_path / "cmds", ["mkdir canary"])
    batch = api.submit(cmds, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=60).failed == 1
    [failed] = api.failures(batch.id, settings=settings)
    assert len(failed.message) > 200, failed.message  # longer than the terminal's old cut
    # When `failures` shows it
    shown = tbss_queue("failures", env={**settings_env(settings, run_tag), "COLUMNS": "80"})
    # Then the refusal is said whole, to its last word
    assert f": {failed.message}\n" in shown.stdout, shown.stdout
