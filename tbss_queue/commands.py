"""Reading a commands file (TBSS's FA/.commands): one command per line, never a shell."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tbss_queue.errors import CommandsFileError

_POINTER_SIZE = 8
"""Bytes each argv pointer takes on the stack of a 64-bit exec."""
_ENVIRONMENT_RESERVE = 64 * 1024
"""Left of ARG_MAX for the environment the worker passes along with argv."""
_LINUX_ARGV_CAP = 6 * 1024 * 1024
"""Linux never allows more than 3/4 of its 8 MiB _STK_LIM for argv+envp, whatever
`ulimit -s` says (sysconf(_SC_ARG_MAX) reports rlimit/4 even when unlimited)."""


def _sysconf(name: str, default: int) -> int:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return default
    return value if value > 0 else default


@dataclass(frozen=True)
class ExecLimits:
    """What execve(2) on this system accepts: per argument and for the whole argv. Judged
    once, at submit (commands.py: the line number is known there), and again by the worker for
    what a message carries (fields.py)."""

    word: int  # MAX_ARG_STRLEN (32 pages): one argument's bytes including its NUL
    argv: int  # bytes of all arguments (with NULs) and their pointers
    quick: int  # lines of at most this many characters are within both limits

    @classmethod
    @functools.cache
    def of_this_system(cls) -> ExecLimits:
        word = 32 * _sysconf("SC_PAGE_SIZE", 4096)
        argv = min(_sysconf("SC_ARG_MAX", 131072), _LINUX_ARGV_CAP) - _ENVIRONMENT_RESERVE
        # a word has at most 4 UTF-8 bytes per character of the line (quotes only remove
        # characters), and a line of n characters has at most (n + 1) / 2 words
        return cls(word, argv, min((word - 1) // 4, (argv - 2 * _POINTER_SIZE) // 9))

    @staticmethod
    def size(argv: Sequence[str]) -> int:
        """The bytes execve counts for argv: each word with its NUL, and the pointers."""
        return sum(len(w.encode("utf-8", "surrogatepass")) + 1 for w in argv) + _POINTER_SIZE * (
            len(argv) + 1
        )

    def refusal(self, argv: tuple[str, ...]) -> str | None:
        """Why execve would fail with E2BIG for this argv, or None if it fits."""
        sizes = [len(w.encode("utf-8", "surrogatepass")) + 1 for w in argv]
        total = self.size(argv)
        if total > self.argv:
            return (
                f"command line of {total:,} bytes exceeds this system's argument limit "
                f"({self.argv:,} bytes)"
            )
        for index, size in enumerate(sizes, start=1):
            if size > self.word:
                return (
                    f"word {index} of {size - 1:,} bytes exceeds this system's per-argument "
                    f"limit ({self.word - 1:,} bytes)"
                )
        return None


SHELL_METACHARACTERS = frozenset(";|&<>`$()*?[]")
"""Characters a shell would interpret. Without a shell they would be passed on literally,
which is never what the author of such a line meant, so a line holding one unquoted is refused."""


@dataclass(frozen=True)
class Command:
    """One line of a commands file, split into the argv that will be executed."""

    line: int
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        """The normalized command line: identical for lines that differ only in spacing/quoting."""
        return shlex.join(self.argv)

    def key(self, cwd: str) -> str:
        """Identity of a command across submissions: its normalized text + working directory."""
        return hashlib.sha1(f"{cwd}\0{self.text}".encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class ParsedFile:
    """A validated commands file: how many unique commands it holds, the lines that repeated
    one, and its text, from which the commands are read again when needed, a chunk at a time
    (a million commands as Python objects would take a gigabyte)."""

    path: str
    text: str = field(repr=False)
    count: int
    duplicates: tuple[tuple[int, int], ...]  # (line, line of its first occurrence)

    def __iter__(self) -> Iterator[Command]:
        """The unique commands in file order."""
        repeated = {line for line, _ in self.duplicates}
        return (c for c in _commands(self.text, self.path) if c.line not in repeated)

    @property
    def commands(self) -> tuple[Command, ...]:
        return tuple(self)

    def chunks(self, size: int) -> Iterator[list[Command]]:
        """The unique commands in lists of at most `size`."""
        chunk: list[Command] = []
        for command in self:
            chunk.append(command)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


_CONTROL_NAMES = dict(
    enumerate(
        (
            "null", "start of heading", "start of text", "end of text", "end of transmission",
            "enquiry", "acknowledge", "bell", "backspace", "tab", "line feed", "vertical tab",
            "form feed", "carriage return", "shift out", "shift in", "data link escape",
            "device control one", "device control two", "device control three",
            "device control four", "negative acknowledge", "synchronous idle",
            "end of transmission block", "cancel", "end of medium", "substitute", "escape",
            "file separator", "group separator", "record separator", "unit separator",
        )
    )
) | {
    0x7F: "delete",
    0x85: "next line",
    0x9B: "control sequence introducer",
    0x9D: "operating system command",
    0x2028: "line separator",
    0x2029: "paragraph separator",
}  # fmt: skip
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
"""What may not stand inside a line: every control character (C0 but TAB, LF and CR; DEL; C1)
and the Unicode line/paragraph separators. Lines end at \\n only, as editors, `sed -n Np`
and `wc -l` count them; a CR is accepted only right before it (CRLF files)."""
_FORBIDDEN = re.compile(_FORBIDDEN_CHARS.pattern + r"|\r(?!\n)")
_ASCII_ALLOWED = bytes(range(0x20, 0x7F)) + b"\t\n\r"


def _first_forbidden(text: str) -> re.Match[str] | None:
    """The first character that may not stand inside a line, if any.

    The regular expression alone reads a 1,000,000-line file at ~70 MB/s; an ASCII file
    (the usual one) is cleared ten times faster by deleting its allowed bytes.
    """
    if text.isascii():
        suspect = bool(text.encode("ascii").translate(None, _ASCII_ALLOWED))
    else:
        suspect = _FORBIDDEN_CHARS.search(text) is not None
    if suspect or text.count("\r") != text.count("\r\n"):
        return _FORBIDDEN.search(text)
    return None


def _describe(ch: str) -> str:
    """Why a forbidden character is refused, naming it: 'control character U+000B (...)'."""
    code = ord(ch)
    kind = "character" if code in (0x2028, 0x2029) else "control character"
    name = _CONTROL_NAMES.get(code, "C1 control")
    return f"{kind} U+{code:04X} ({name}) inside the line: not allowed"


_PLAIN_BREAKERS = SHELL_METACHARACTERS | frozenset("'\"\\~")
"""Characters after which a line is not just words between blanks (quoting, escapes, shell)."""
_BLANKS = re.compile(r"[ \t\r\n]+")


def split_line(text: str) -> tuple[str, ...]:
    """Split one command line with POSIX quoting; ValueError names the problem."""
    if _PLAIN_BREAKERS.isdisjoint(text):
        # the usual fsl_reg line: what shlex would return, ten times faster (100,000-line files)
        return tuple(word for word in _BLANKS.split(text) if word)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        words = tuple(lexer)
    except ValueError as exc:
        raise ValueError(
            str(exc).lower().replace("no closing quotation", "unbalanced quote")
        ) from None
    _refuse_metacharacters(text)
    return words


def _refuse_metacharacters(text: str) -> None:
    """Reject characters a shell would act on when they stand outside quotes."""
    quote: str | None = None
    escaped = False
    previous = " "
    for ch in text:
        at_word_start, previous = previous.isspace(), ch
        if escaped:
            escaped = False
        elif quote == "'":
            if ch == "'":
                quote = None
        elif ch == "\\":
            escaped = True
        elif quote == '"':
            if ch == '"':
                quote = None
            elif ch in "$`":
                raise ValueError(
                    f"shell syntax {ch!r} is not supported: commands run without a shell"
                )
        elif ch in "'\"":
            quote = ch
        elif ch in SHELL_METACHARACTERS or (ch == "~" and at_word_start):
            raise ValueError(
                f"shell syntax {ch!r} is not supported: commands run without a shell "
                "(quote it if it is meant literally)"
            )


def parse_text(text: str, path: str = "<commands>") -> ParsedFile:
    """Parse the text of a commands file. Raises CommandsFileError naming the line at fault.

    Lines end at \\n only (a CR right before it is dropped), so line numbers are those of
    editors and `sed -n`; control characters and Unicode line separators inside a line,
    and lines too long for execve(2), are refused here rather than failing on a worker.
    """
    first_seen: dict[bytes, int] = {}  # a digest of each argv: lean at a million lines
    duplicates: list[tuple[int, int]] = []
    for command in _commands(text, path):
        digest = hashlib.blake2b("\0".join(command.argv).encode(), digest_size=12).digest()
        if digest in first_seen:
            duplicates.append((command.line, first_seen[digest]))
        else:
            first_seen[digest] = command.line
    if not first_seen:
        raise CommandsFileError(path, "no commands in file (empty, or only comments)")
    return ParsedFile(path, text, len(first_seen), tuple(duplicates))


def _commands(text: str, path: str) -> Iterator[Command]:
    """Every command line of a text, checked, in order (duplicates included)."""
    limits = ExecLimits.of_this_system()
    # one C-speed scan of the whole text; refused on its line, unless an earlier line is bad
    bad = _first_forbidden(text)
    bad_line = text.count("\n", 0, bad.start()) + 1 if bad else 0
    for number, raw in enumerate(_lines(text), start=1):
        if number == bad_line and bad:
            raise CommandsFileError(path, _describe(bad.group()[0]), number)
        stripped = raw.strip()  # and the CR of a CRLF line ending
        if not stripped or stripped.startswith("#"):
            continue
        try:
            argv = split_line(stripped)
        except ValueError as exc:
            raise CommandsFileError(path, str(exc), number) from None
        if not argv:
            continue
        if len(stripped) > limits.quick and (too_long := limits.refusal(argv)):
            raise CommandsFileError(path, too_long, number)
        yield Command(number, argv)


def _lines(text: str) -> Iterator[str]:
    """The lines of a text, split at \\n only (not splitlines()), one at a time."""
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def parse_commands_file(path: str | os.PathLike[str]) -> ParsedFile:
    """Read and parse a commands file; every problem is a CommandsFileError, never a traceback."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise CommandsFileError(name, "no such file")
    if p.is_dir():
        raise CommandsFileError(name, "is a directory, not a commands file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CommandsFileError(name, f"cannot read: {exc.strerror or exc}") from None
    return parse_bytes(data, name)


def parse_bytes(data: bytes, path: str = "<commands>") -> ParsedFile:
    """Decode and parse; binary content is refused with the line where it starts."""
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise CommandsFileError(path, "binary content (NUL byte): not a text commands file", line)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CommandsFileError(path, "not UTF-8 text (binary file?)", line) from None
    return parse_text(text, path)
