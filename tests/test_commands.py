"""Parsing commands files: one command per line, POSIX quoting, never a shell."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tbss_queue.commands import parse_bytes, parse_commands_file, parse_text
from tbss_queue.errors import CommandsFileError

DATA = Path(__file__).parent / "data"


def test_tbss_lines_are_split_into_argv_not_words_of_the_file() -> None:
    # Given the lines tbss_2_reg -n writes
    text = (
        "/usr/local/fsl/bin/fsl_reg s1_FA s2_FA s1_FA_to_s2_FA -e -FA\n"
        "/usr/local/fsl/bin/fsl_reg s2_FA s2_FA s2_FA_to_s2_FA -e -FA \n"
    )
    # When parsed
    parsed = parse_text(text)
    # Then each line is one command with its own argv (a trailing space is harmless)
    assert [c.argv for c in parsed.commands] == [
        ("/usr/local/fsl/bin/fsl_reg", "s1_FA", "s2_FA", "s1_FA_to_s2_FA", "-e", "-FA"),
        ("/usr/local/fsl/bin/fsl_reg", "s2_FA", "s2_FA", "s2_FA_to_s2_FA", "-e", "-FA"),
    ]
    assert [c.line for c in parsed.commands] == [1, 2]


def test_blank_lines_and_comments_are_skipped_and_quotes_follow_posix() -> None:
    parsed = parse_text('# header\n\n  \nfsl_reg a b c -flirt "-dof 12"\n')
    assert parsed.commands[0].argv == ("fsl_reg", "a", "b", "c", "-flirt", "-dof 12")
    assert parsed.commands[0].line == 4


def test_duplicates_are_kept_once_and_reported_with_both_lines() -> None:
    parsed = parse_text("touch a\ntouch  b\ntouch a\ntouch 'b'\n")
    assert [c.argv for c in parsed.commands] == [("touch", "a"), ("touch", "b")]
    assert parsed.duplicates == ((3, 1), (4, 2))


def test_identity_ignores_spacing_and_quoting_but_not_the_directory() -> None:
    a, b = parse_text("touch  'x'\n").commands[0], parse_text("touch x\n").commands[0]
    assert a.key("/study/FA") == b.key("/study/FA")
    assert a.key("/study/FA") != a.key("/other/FA")


@pytest.mark.parametrize(
    ("name", "line", "words"),
    [
        ("unbalanced_line7.commands", 7, "unbalanced quote"),
        ("empty.commands", None, "no commands"),
        ("comments_only.commands", None, "no commands"),
        ("binary.commands", 2, "binary"),
    ],
)
def test_bad_files_name_the_file_and_line(name: str, line: int | None, words: str) -> None:
    with pytest.raises(CommandsFileError) as info:
        parse_commands_file(DATA / name)
    message = str(info.value)
    assert str(DATA / name) in message and words in message
    assert info.value.line == line
    if line is not None:
        assert f"{name}:{line}:" in message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CommandsFileError, match="no such file"):
        parse_commands_file(tmp_path / "nope")
    with pytest.raises(CommandsFileError, match="directory"):
        parse_commands_file(tmp_path)


@pytest.mark.parametrize(
    "line",
    [
        "a; b",
        "a | b",
        "a && b",
        "a > out",
        "echo $HOME",
        "echo `id`",
        "ls *.nii",
        "cat ~/x",
        'echo "$(id)"',
    ],
)
def test_shell_syntax_is_refused_with_a_reason(line: str) -> None:
    with pytest.raises(CommandsFileError, match="without a shell"):
        parse_text(line + "\n", "f")


def test_quoted_metacharacters_are_plain_arguments() -> None:
    assert parse_text("echo 'a;b' \"x|y\" 'costs $5'\n").commands[0].argv == (
        "echo",
        "a;b",
        "x|y",
        "costs $5",
    )


@given(st.binary(max_size=400))
def test_parser_never_crashes_on_random_bytes(data: bytes) -> None:
    try:
        parse_bytes(data, "fuzz")
    except CommandsFileError as exc:
        assert str(exc).startswith("fuzz")


_near = st.lists(
    st.text(alphabet=st.sampled_from(list("ab -'\"\\#;$|*\t~")), max_size=30), max_size=8
).map("\n".join)


@given(_near)
def test_parser_never_crashes_on_near_valid_lines(text: str) -> None:
    try:
        parsed = parse_text(text, "fuzz")
    except CommandsFileError as exc:
        assert str(exc).startswith("fuzz")
    else:
        assert all(c.argv for c in parsed.commands)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_fast_split_agrees_with_shlex(text: str) -> None:
    """The shortcut for plain lines returns exactly what POSIX shlex would."""
    import shlex

    from tbss_queue.commands import split_line

    lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        expected: tuple[str, ...] | None = tuple(lexer)
    except ValueError:
        expected = None
    try:
        got: tuple[str, ...] | None = split_line(text)
    except ValueError:
        return  # refused (a metacharacter, or a quote shlex also rejects)
    assert got == expected


# --- lines end at \n only: line numbers are those of editors, `sed -n Np` and fsl_sub logs ---

_SAFE_WORD = st.text(
    alphabet=st.sampled_from(
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=+,:@%")
    ),
    min_size=1,
    max_size=12,
)

_REFUSED = [
    # what Python's splitlines() (and some editors) would have taken for a line break
    ("\r", "control character U+000D (carriage return)"),
    ("\x0b", "control character U+000B (vertical tab)"),
    ("\x0c", "control character U+000C (form feed)"),
    ("\x1c", "control character U+001C (file separator)"),
    ("\x1d", "control character U+001D (group separator)"),
    ("\x1e", "control character U+001E (record separator)"),
    ("\x85", "control character U+0085 (next line)"),
    ("\u2028", "character U+2028 (line separator)"),
    ("\u2029", "character U+2029 (paragraph separator)"),
    # other control characters: C0, DEL, C1
    ("\x01", "control character U+0001 (start of heading)"),
    ("\x08", "control character U+0008 (backspace)"),
    ("\x1b", "control character U+001B (escape)"),
    ("\x1f", "control character U+001F (unit separator)"),
    ("\x7f", "control character U+007F (delete)"),
    ("\x80", "control character U+0080 (C1 control)"),
    ("\x9b", "control character U+009B (control sequence introducer)"),
    ("\x9f", "control character U+009F (C1 control)"),
]


def _study_file(tmp_path: Path, line7: str, newline: str = "\n") -> Path:
    """A commands file whose 7th line (as `sed -n 7p` counts) is line7."""
    lines = [
        "# tbss_2_reg -n",
        "fsl_reg s1_FA s2_FA s1_FA_to_s2_FA -e -FA",
        "",
        "fsl_reg s2_FA s2_FA s2_FA_to_s2_FA -e -FA",
        "   ",
        "# the next one is damaged",
        line7,
        "fsl_reg s4_FA s2_FA s4_FA_to_s2_FA -e -FA",
    ]
    path = tmp_path / ".commands"
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


@pytest.mark.parametrize(("char", "named"), _REFUSED, ids=[f"U+{ord(c):04X}" for c, _ in _REFUSED])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_separators_and_control_characters_are_refused_on_their_line(
    tmp_path: Path, char: str, named: str, newline: str
) -> None:
    # Given a commands file whose 7th line holds the character between two words
    path = _study_file(tmp_path, f"fsl_reg s3_FA{char}s2_FA s3_FA_to_s2_FA -e -FA", newline)
    assert char.encode() in path.read_bytes().split(b"\n")[6]  # line 7 as sed -n 7p reads it
    # When it is parsed
    with pytest.raises(CommandsFileError) as info:
        parse_commands_file(path)
    # Then the user is told the file, line 7 and the character, in one line
    assert str(info.value) == f"{path}:7: {named} inside the line: not allowed"


@pytest.mark.parametrize(
    "line7",
    [
        "\x0bfsl_reg s3_FA s2_FA out -e -FA",  # at the start (strip() would have hidden it)
        "fsl_reg s3_FA s2_FA out -e -FA\x0b",  # at the end
        "# a comment\x0bfsl_reg s3_FA s2_FA out",  # in a comment: still a line break elsewhere
        "fsl_reg s3_FA s2_FA 'out\x0bfile'",  # inside quotes
    ],
    ids=["start", "end", "comment", "quoted"],
)
def test_a_vertical_tab_anywhere_in_the_line_is_refused(tmp_path: Path, line7: str) -> None:
    # Given a vertical tab somewhere else in line 7
    path = _study_file(tmp_path, line7)
    # When parsed / Then line 7 is named
    with pytest.raises(CommandsFileError, match=r":7: control character U\+000B \(vertical tab\)"):
        parse_commands_file(path)


def test_the_first_bad_line_is_the_one_reported(tmp_path: Path) -> None:
    # Given an unbalanced quote on line 2 and a form feed on line 7
    path = _study_file(tmp_path, "fsl_reg a\x0cb")
    path.write_text(path.read_text().replace("s1_FA_to_s2_FA", "'s1_FA_to_s2_FA", 1))
    # When parsed / Then the problem the user meets first is the one named
    with pytest.raises(CommandsFileError) as info:
        parse_commands_file(path)
    assert str(info.value) == f"{path}:2: unbalanced quote"


def test_a_lone_carriage_return_in_a_crlf_file_is_refused(tmp_path: Path) -> None:
    # Given a CRLF file (accepted) with a stray old-Mac line break inside line 7
    path = _study_file(tmp_path, "fsl_reg s3_FA s2_FA out -e -FA\rfsl_reg x y z", "\r\n")
    # When parsed / Then line 7 is refused, not split into two commands
    with pytest.raises(CommandsFileError) as info:
        parse_commands_file(path)
    assert str(info.value) == (
        f"{path}:7: control character U+000D (carriage return) inside the line: not allowed"
    )


def test_a_carriage_return_at_the_very_end_without_a_newline_is_refused() -> None:
    with pytest.raises(CommandsFileError) as info:
        parse_bytes(b"touch a\ntouch b\r", "f")
    assert (
        str(info.value)
        == "f:2: control character U+000D (carriage return) inside the line: not allowed"
    )


def test_crlf_files_parse_like_lf_files_with_the_same_line_numbers(tmp_path: Path) -> None:
    # Given the same commands file saved with LF and with CRLF line endings
    lf = _study_file(tmp_path, "fsl_reg s3_FA s2_FA s3_FA_to_s2_FA -e -FA")
    crlf = tmp_path / "crlf.commands"
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    assert crlf.read_bytes().count(b"\r\n") == 8
    # When both are parsed
    a, b = parse_commands_file(lf), parse_commands_file(crlf)
    # Then the commands, their argv (no stray \r) and their line numbers are the same
    assert [c.line for c in b.commands] == [c.line for c in a.commands] == [2, 4, 7, 8]
    assert [c.argv for c in b.commands] == [c.argv for c in a.commands]
    assert b.commands[-1].argv[-1] == "-FA"
    # and so is the identity used to recognise a command across submissions
    assert [c.key("/s/FA") for c in b.commands] == [c.key("/s/FA") for c in a.commands]


def test_a_crlf_file_without_a_final_newline_is_fine() -> None:
    parsed = parse_bytes(b"touch a\r\n\r\ntouch b", "f")
    assert [(c.line, c.argv) for c in parsed.commands] == [(1, ("touch", "a")), (3, ("touch", "b"))]


def test_tabs_between_words_are_ordinary_whitespace() -> None:
    # Given words separated by tabs and spaces, and a tab-indented line
    parsed = parse_text("fsl_reg\ts1_FA \t s2_FA\t\tout -e -FA\t\n\tfsl_reg\ta b c\n", "f")
    # Then they split like spaces do
    assert [(c.line, c.argv) for c in parsed.commands] == [
        (1, ("fsl_reg", "s1_FA", "s2_FA", "out", "-e", "-FA")),
        (2, ("fsl_reg", "a", "b", "c")),
    ]


@st.composite
def _commands_file(draw: st.DrawFn) -> tuple[str, list[tuple[int, tuple[str, ...]]]]:
    """Random safe lines (commands, blanks, comments) and the commands expected per line."""
    blank = st.text(alphabet=" \t", max_size=3)
    lines: list[str] = []
    expected: list[tuple[int, tuple[str, ...]]] = []
    for number in range(1, draw(st.integers(1, 25)) + 1):
        kind = draw(st.sampled_from(["command", "command", "blank", "comment"]))
        if kind == "command":
            words = draw(st.lists(_SAFE_WORD, min_size=1, max_size=6))
            gap = st.sampled_from([" ", "\t", "  ", " \t "])
            gaps = draw(st.lists(gap, min_size=len(words), max_size=len(words)))
            line = draw(blank) + "".join(w + g for w, g in zip(words, gaps, strict=True))
            line += draw(blank)
            expected.append((number, tuple(words)))
        elif kind == "comment":
            line = draw(blank) + "#" + " ".join(draw(st.lists(_SAFE_WORD, max_size=4)))
        else:
            line = draw(blank)
        lines.append(line)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline])), expected


@given(_commands_file())
def test_line_numbers_are_counted_by_newlines_only(
    case: tuple[str, list[tuple[int, tuple[str, ...]]]],
) -> None:
    # Given a file of safe lines joined by \n (or \r\n)
    text, expected = case
    assume(expected)  # a file without commands is refused, tested above
    # When it is parsed
    parsed = parse_bytes(text.encode(), "f")
    # Then every command line is reported under its 1-based number as counted by \n
    first = {argv: number for number, argv in reversed(expected)}
    assert [(c.line, c.argv) for c in parsed.commands] == [
        (n, a) for n, a in expected if first[a] == n
    ]
    assert list(parsed.duplicates) == [(n, first[a]) for n, a in expected if first[a] != n]
    for number, argv in expected:
        assert text.split("\n")[number - 1].split() == list(argv)


@given(_commands_file(), st.sampled_from([c for c, _ in _REFUSED]), st.data())
def test_a_bad_character_anywhere_is_reported_on_its_line(
    case: tuple[str, list[tuple[int, tuple[str, ...]]]], char: str, data: st.DataObject
) -> None:
    # Given a valid file with one refused character put anywhere (a CR not before a \n)
    text, _ = case
    at = data.draw(st.integers(0, len(text)))
    damaged = text[:at] + (char + "x" if char == "\r" else char) + text[at:]
    # When parsed / Then the line named is the one where it stands, counting \n
    with pytest.raises(CommandsFileError) as info:
        parse_bytes(damaged.encode(), "f")
    assert info.value.line == damaged[:at].count("\n") + 1
    assert "inside the line: not allowed" in str(info.value)


# --- lines execve(2) would refuse (E2BIG) are refused at submit, not on a worker ---

_MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGE_SIZE")


def _runs(argv: list[str]) -> bool:
    """Whether this system can exec argv at all (the program is `true`)."""
    try:
        subprocess.run(argv, env={}, check=True)
    except OSError as exc:
        assert exc.errno == errno.E2BIG
        return False
    return True


def test_a_line_longer_than_the_argument_limit_is_refused_with_its_line_number(
    tmp_path: Path,
) -> None:
    # Given a 10 MB command on line 3 (accepted before, then "not found" on the worker)
    true = shutil.which("true") or "/bin/true"
    words = [true] + ["sub01_FA_to_sub02_FA"] * 500_000
    path = tmp_path / ".commands"
    path.write_text("# study\nfsl_reg a b c -e -FA\n" + " ".join(words) + "\n")
    assert not _runs(words)  # this system cannot run it
    # When it is submitted
    with pytest.raises(CommandsFileError) as info:
        parse_commands_file(path)
    # Then line 3 is refused, with its size and this system's limit
    message = str(info.value)
    found = re.fullmatch(
        rf"{re.escape(str(path))}:3: command line of ([\d,]+) bytes exceeds "
        r"this system's argument limit \(([\d,]+) bytes\)",
        message,
    )
    assert found, message
    size, limit = (int(n.replace(",", "")) for n in found.groups())
    assert size == sum(len(w) + 1 for w in words) + 8 * (len(words) + 1)
    assert limit < size and limit <= os.sysconf("SC_ARG_MAX") - 64 * 1024


def _argument_limit_shown() -> int:
    """The whole-line limit the parser names, read from its message for an 8 MiB line."""
    with pytest.raises(CommandsFileError) as info:
        parse_text("echo " + "x" * 8 * 1024 * 1024, "f")
    found = re.search(r"argument limit \(([\d,]+) bytes\)", str(info.value))
    assert found, str(info.value)
    return int(found[1].replace(",", ""))


def test_the_longest_accepted_line_really_runs_and_one_word_more_is_refused() -> None:
    # Given a command as long as the limit the parser names allows
    limit, true = _argument_limit_shown(), shutil.which("true") or "/bin/true"
    words, size = [true], len(true) + 1 + 8 * 2  # program, its pointer, argv's NULL
    while size + 4001 + 8 <= limit:
        words.append("x" * 4000)
        size += 4001 + 8
    # When parsed / Then it is accepted, and this system can indeed execute it
    assert parse_text(" ".join(words) + "\n", "f").commands[0].argv == tuple(words)
    assert _runs(words)
    # and the same line with one word more is refused, with its size
    with pytest.raises(CommandsFileError) as info:
        parse_text(" ".join(words) + " " + "x" * 4000 + "\n", "f")
    assert str(info.value) == (
        f"f:1: command line of {size + 4009:,} bytes exceeds this system's argument limit "
        f"({limit:,} bytes)"
    )


@pytest.mark.parametrize(
    ("word", "size"),
    [
        ("x" * _MAX_ARG_STRLEN, _MAX_ARG_STRLEN),
        ("'" + "é" * (_MAX_ARG_STRLEN // 2) + "'", _MAX_ARG_STRLEN),  # bytes, not characters
    ],
    ids=["ascii", "utf8-quoted"],
)
def test_a_word_over_the_per_argument_limit_is_refused(word: str, size: int) -> None:
    # Given a word one byte too long to be a single argument of execve (MAX_ARG_STRLEN)
    text = "fsl_reg a b c -e -FA\necho " + word + "\n"
    # When parsed / Then its line and word are named with the limit
    with pytest.raises(CommandsFileError) as info:
        parse_text(text, "f")
    assert str(info.value) == (
        f"f:2: word 2 of {size:,} bytes exceeds this system's per-argument limit "
        f"({_MAX_ARG_STRLEN - 1:,} bytes)"
    )


def test_the_longest_accepted_word_really_runs() -> None:
    # Given a word of MAX_ARG_STRLEN - 1 bytes (its NUL makes it fit exactly)
    true = shutil.which("true") or "/bin/true"
    longest = "x" * (_MAX_ARG_STRLEN - 1)
    # Then it is accepted and runs, while one byte more cannot be executed at all
    assert parse_text(f"{true} {longest}\n").commands[0].argv == (true, longest)
    assert _runs([true, longest])
    assert not _runs([true, longest + "x"])


def test_the_cli_refuses_a_bad_file_with_exit_2_before_touching_the_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a damaged file and a broker nobody listens on (touching it would exit 3)
    from tbss_queue.cli import main

    path = _study_file(tmp_path, "fsl_reg s3_FA\x0bs2_FA out -e -FA")
    # When it is submitted
    with pytest.raises(SystemExit) as exited:
        main(["submit", "--broker", "redis://127.0.0.1:1/0", str(path)])
    # Then one line names the file, line and character, and the exit code is 2
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"tbss-queue: error: {path}:7: control character U+000B (vertical tab) "
        "inside the line: not allowed\n"
    )
