"""Parsing commands files: one command per line, POSIX quoting, never a shell."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
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
