"""Text from commands made safe to show: control characters become visible escapes.

A command's output, its command line and the messages built from them reach terminals
(`failures`, `status`, `logs`, `nodes`). An ESC there is an instruction to the terminal, not
text: `ESC ]0;...` retitles the window, `ESC [31m` recolours, other sequences move the cursor
over earlier lines or, in some terminals, do worse. So every view passes such text through
`visible`: C0 and C1 controls (but newline and tab where lines are kept) and the Unicode
bidirectional overrides become `\\x1b`, `\\u202e`..., whatever the output is (a pipe too).
"""

from __future__ import annotations

import codecs
import unicodedata
from typing import IO

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_CHUNK = 1 << 16


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _hidden(c: str, keep: str) -> bool:
    return c not in keep and (unicodedata.category(c) == "Cc" or c in _BIDI)


def visible(text: str, keep: str = "") -> str:
    """`text` with every control character (but those in `keep`, e.g. "\\n\\t") escaped."""
    if text.isprintable() and not any(c in _BIDI for c in text):
        return text  # the usual case, at C speed
    return "".join(_escape(c) if _hidden(c, keep) else c for c in text)


def visible_lines(text: str) -> str:
    """visible(), keeping newlines and tabs: for multi-line output."""
    return visible(text, "\n\t")


def copy_visible(source: IO[bytes], out: IO[bytes]) -> None:
    """Copy a log a chunk at a time with its control characters made visible (newline and tab
    kept; bytes that are not UTF-8 shown as \\xNN)."""
    decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")
    while True:
        data = source.read(_CHUNK)
        text = decoder.decode(data, final=not data)
        if text:
            out.write(visible_lines(text).encode("utf-8"))
        if not data:
            return
