"""Text from commands is shown with its control characters made visible (issue 27, point 8)."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.views.visible import copy_visible, visible, visible_lines

from .conftest import Worker, settings_env, tbss_queue, write_commands

# a window title, a colour, a cursor move up and a line erase, and rich markup, on stderr
NASTY = r"\x1b]0;pwned\x07\x1b[31mred\x1b[1A\x1b[2K[bold]fake[/] \u202eevil"
SAY = f"import sys; sys.stderr.write('{NASTY}' + chr(10)); sys.exit(3)"


def test_visible_escapes_controls_and_keeps_text() -> None:
    assert visible("plain text, ünïcode") == "plain text, ünïcode"
    assert visible("a\x1b[31mb\x07\n") == "a\\x1b[31mb\\x07\\x0a"
    assert visible_lines("a\tb\nc\x9bd\u202e") == "a\tb\nc\\x9bd\\u202e"
    out = io.BytesIO()
    copy_visible(io.BytesIO(b"ok\n\x1b]0;t\x07\xff\xc3"), out)
    assert out.getvalue() == b"ok\n\\x1b]0;t\\x07\\xff\\xc3"


def test_no_view_passes_a_commands_escape_sequences_to_the_terminal(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a failed command whose stderr holds terminal escape sequences
    workers("w1", 1)
    cmds = write_commands(tmp_path / "cmds", [f'{sys.executable} -c "{SAY}"'])
    batch = api.submit(cmds, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=60).failed == 1
    env = settings_env(settings, run_tag)
    # When it is shown by failures, status and logs (to a pipe, as a terminal would get it)
    shown = {
        "failures": tbss_queue("failures", batch.id, env=env),
        "status": tbss_queue("status", batch.id, env=env),
        "logs": tbss_queue("logs", batch.id, "1", "--stderr", env=env),
    }
    # Then no ESC, BEL, CSI or bidi override comes out, each is shown escaped, markup as text
    for view, res in shown.items():
        assert res.returncode in (0, 1), (view, res.stderr)
        text = res.stdout + res.stderr
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in text, (view, text)
        assert "\\x1b]0;pwned\\x07\\x1b[31mred" in text, (view, text)
        assert "[bold]fake[/]" in text, (view, text)
    # and `logs --raw` gives the bytes as they were written
    raw = tbss_queue("logs", batch.id, "1", "--stderr", "--raw", env=env)
    assert "\x1b]0;pwned\x07" in raw.stdout
