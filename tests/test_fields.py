"""A forged task message must not make the worker write files anywhere: every field is checked,
and log files are opened without following symlinks."""

from __future__ import annotations

import math
import os
import pickle
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tbss_queue.execution.fields import (
    RefusedField,
    TaskFields,
    check_fields,
    log_names,
    log_paths,
    open_logs,
)

BATCH = "0a1b2c3d"
COMMAND = "6b7c1f1e2f554d0c"
ARGV = ["fsl_reg", "FA/s1_FA", "target", "FA/s1_FA_to_target", "-e", "-FA"]
STUDY = "/data/study"
ARG_MAX = os.sysconf("SC_ARG_MAX")
KNOWN = ["time_limit", "retries", "done_if_exists", "log_dir", "job_name", "line"]


def check(roots: tuple[str, ...] = (), **changes: Any) -> TaskFields:
    """check_fields on a good message with some top-level fields or options replaced."""
    top = {"batch_id": BATCH, "command_id": COMMAND, "argv": ARGV, "cwd": STUDY}
    options = {k: v for k, v in changes.items() if k not in top}
    top.update({k: v for k, v in changes.items() if k in top})
    return check_fields(
        top["batch_id"], top["command_id"], top["argv"], top["cwd"], options, roots=roots
    )


def refused(**changes: Any) -> RefusedField:
    with pytest.raises(RefusedField) as caught:
        check(**changes)
    return caught.value


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- check_fields: good messages ------------------------------------------------------------


def test_an_fsl_sub_like_message_passes_with_its_values() -> None:
    # Given the fields fsl_sub sends for line 3 of tbss_2_reg's commands, with -l logs
    # When they are checked
    options: dict[str, Any] = {
        "log_dir": "logs",
        "job_name": "tbss_2_reg",
        "line": 3,
        "time_limit": 3600,
    }
    fields = check(retries=2, done_if_exists="{out}_warp.msf", **options)
    # Then every value comes through, and the logs are fsl_sub's names in <cwd>/logs
    assert fields == TaskFields(
        BATCH, COMMAND, tuple(ARGV), STUDY, 3600.0, 2, "{out}_warp.msf", "logs", "tbss_2_reg", 3
    )
    assert log_paths(fields) == (
        f"{STUDY}/logs/tbss_2_reg.o{BATCH}.3",
        f"{STUDY}/logs/tbss_2_reg.e{BATCH}.3",
    )


def test_missing_options_get_defaults_and_no_logs() -> None:
    # Given a message with no options at all
    fields = check()
    # Then the options are unset, retries is 0, and there are no log files
    assert (fields.time_limit, fields.retries, fields.done_if_exists) == (None, 0, None)
    assert (fields.log_dir, fields.job_name, fields.line) == (None, None, None)
    assert log_paths(fields) is None and log_names(fields) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"argv": ("fsl_reg", "a")},
        {"argv": ["fsl_reg", ""]},
        {"argv": ["x"] * 100_000},
        {"argv": ["fsl_reg", "é中"]},
        {"cwd": "/"},
        {"time_limit": 0.5},
        {"time_limit": 30 * 86400},
        {"retries": 0},
        {"retries": 100},
        {"retries": None},
        {"done_if_exists": "reg/{out}*.nii.gz"},
        {"done_if_exists": "./x/"},
        {"log_dir": "."},
        {"log_dir": "a/b/c"},
        {"log_dir": "/somewhere/logs"},
        {"log_dir": "logs", "job_name": "x" * 200, "line": 10_000_000},
        {"job_name": ".hidden"},
        {"line": 1},
    ],
)
def test_good_values_pass(changes: dict[str, Any]) -> None:
    # Given a message with one unusual but valid value; Then it is accepted
    assert isinstance(check(**changes), TaskFields)


def test_default_log_name_and_no_line() -> None:
    # Given a log dir (absolute) but no job name and no line number
    fields = check(log_dir="/logs")
    # Then the logs are named like fsl_sub's default: tbss-queue.o<batch>
    assert log_paths(fields) == (f"/logs/tbss-queue.o{BATCH}", f"/logs/tbss-queue.e{BATCH}")


# --- check_fields: refusals ---------------------------------------------------------------

REFUSED = [
    ("batch_id", {"batch_id": "0A1B2C3D"}),
    ("batch_id", {"batch_id": "0a1b2c3"}),
    ("batch_id", {"batch_id": "0a1b2c3d\n"}),
    ("batch_id", {"batch_id": "../../x1"}),
    ("batch_id", {"batch_id": 12345678}),
    ("command_id", {"command_id": COMMAND.upper()}),
    ("command_id", {"command_id": "{" + COMMAND + "}"}),
    ("command_id", {"command_id": COMMAND + "0"}),
    ("command_id", {"command_id": None}),
    ("argv", {"argv": []}),
    ("argv", {"argv": "fsl_reg a b"}),
    ("argv", {"argv": [""]}),
    ("argv", {"argv": ["fsl_reg", "a\0b"]}),
    ("argv", {"argv": ["fsl_reg", 5]}),
    ("argv", {"argv": ["fsl_reg", "\ud800"]}),
    ("argv", {"argv": ["x"] * 100_001}),
    ("cwd", {"cwd": "data/study"}),
    ("cwd", {"cwd": "/data/../etc"}),
    ("cwd", {"cwd": "/data//study"}),
    ("cwd", {"cwd": "//data"}),
    ("cwd", {"cwd": "/data/study/"}),
    ("cwd", {"cwd": "/data/./study"}),
    ("cwd", {"cwd": "/da\0ta"}),
    ("cwd", {"cwd": ""}),
    ("cwd", {"cwd": b"/data"}),
    ("shell", {"shell": "rm -rf /"}),
    ("time_limit", {"time_limit": True}),
    ("time_limit", {"time_limit": "60"}),
    ("time_limit", {"time_limit": 0}),
    ("time_limit", {"time_limit": -1.0}),
    ("time_limit", {"time_limit": math.nan}),
    ("time_limit", {"time_limit": math.inf}),
    ("time_limit", {"time_limit": 10**400}),
    ("time_limit", {"time_limit": 30 * 86400 + 1}),
    ("retries", {"retries": True}),
    ("retries", {"retries": -1}),
    ("retries", {"retries": 101}),
    ("retries", {"retries": 2.0}),
    ("retries", {"retries": "2"}),
    ("done_if_exists", {"done_if_exists": "/etc/passwd"}),
    ("done_if_exists", {"done_if_exists": "../x"}),
    ("done_if_exists", {"done_if_exists": "a/../../b"}),
    ("done_if_exists", {"done_if_exists": "a\0"}),
    ("done_if_exists", {"done_if_exists": ""}),
    ("done_if_exists", {"done_if_exists": 5}),
    ("log_dir", {"log_dir": "../../victim"}),
    ("log_dir", {"log_dir": "a/.."}),
    ("log_dir", {"log_dir": "logs/"}),
    ("log_dir", {"log_dir": "a//b"}),
    ("log_dir", {"log_dir": "./logs"}),
    ("log_dir", {"log_dir": ""}),
    ("log_dir", {"log_dir": "lo\0gs"}),
    ("log_dir", {"log_dir": "\udcff"}),
    ("log_dir", {"log_dir": ["logs"]}),
    ("job_name", {"job_name": ""}),
    ("job_name", {"job_name": "a/b"}),
    ("job_name", {"job_name": "../x"}),
    ("job_name", {"job_name": "."}),
    ("job_name", {"job_name": ".."}),
    ("job_name", {"job_name": "a\nb"}),
    ("job_name", {"job_name": "a\x1b[2Jb"}),
    ("job_name", {"job_name": "a\x85b"}),
    ("job_name", {"job_name": "x" * 256}),
    ("job_name", {"job_name": 5}),
    ("job_name", {"log_dir": "logs", "job_name": "x" * 250, "line": 3}),  # log name > 255
    ("line", {"line": "x/../victim.txt"}),
    ("line", {"line": True}),
    ("line", {"line": 0}),
    ("line", {"line": 10_000_001}),
    ("line", {"line": 3.0}),
    ("line", {"line": "3"}),
    ("mem", {"mem": "2G"}),
    ("mem", {"mem": 0}),
    ("mem", {"mem": -1}),
    ("mem", {"mem": 2**50 + 1}),
    ("mem", {"mem": 1.5}),
    ("threads", {"threads": 0}),
    ("threads", {"threads": 4097}),
    ("threads", {"threads": True}),
]


@pytest.mark.parametrize(("field", "changes"), REFUSED)
def test_each_bad_field_is_refused_by_name(field: str, changes: dict[str, Any]) -> None:
    # Given a message with one bad field; When it is checked; Then that field is named
    exc = refused(**changes)
    assert exc.field == field
    assert str(exc).startswith(f"field {field!r}: ") and "\n" not in str(exc)


@pytest.mark.parametrize(
    ("field", "changes", "says"),
    [
        ("line", {"line": "x/../victim.txt", "log_dir": "logs"}, "integer"),
        ("log_dir", {"log_dir": "../../victim"}, "'..' is not allowed"),
        ("log_dir", {"log_dir": "/etc", "roots": (STUDY,)}, "outside"),
        ("job_name", {"log_dir": "logs", "job_name": "../x"}, "single file name"),
        ("job_name", {"log_dir": "logs", "job_name": "a/b"}, "single file name"),
        ("shell", {"shell": "curl evil | sh"}, "unknown option"),
        ("argv", {"argv": ["fsl_reg", "in\0put"]}, "NUL"),
        ("argv", {"argv": ["fsl_reg", "x" * 10_000_000]}, "MAX_ARG_STRLEN"),
        ("argv", {"argv": ["fsl_reg"] + ["x" * 100_000] * (ARG_MAX // 100_000 + 1)}, "ARG_MAX"),
        ("cwd", {"cwd": "/data/../etc"}, "'..' is not allowed"),
    ],
)
def test_the_reported_forgeries_are_refused(field: str, changes: dict[str, Any], says: str) -> None:
    # Given the forged messages of the report ("a forged message writes files anywhere")
    # When the worker checks them
    exc = refused(**changes)
    # Then each is refused, naming the field and why
    assert (exc.field, says in exc.reason) == (field, True)


def test_roots_contain_cwd_and_absolute_log_dirs_component_wise() -> None:
    # Given a worker started with --root /data and --root /scratch
    roots = ("/data", "/scratch")
    # Then cwd and an absolute log dir must lie under one of them, component by component
    assert check(roots, cwd="/data/study", log_dir="/scratch/logs").log_dir == "/scratch/logs"
    assert check(roots, cwd="/data", log_dir="logs").cwd == "/data"
    assert refused(roots=roots, cwd="/database/study").field == "cwd"
    assert refused(roots=roots, cwd="/etc").field == "cwd"
    assert refused(roots=roots, log_dir="/scratchpad/logs").field == "log_dir"
    assert refused(roots=roots, log_dir="/").field == "log_dir"


def test_messages_quote_at_most_200_characters_of_a_forged_value() -> None:
    # Given a log dir of a megabyte, with a newline and an escape sequence in it
    exc = refused(log_dir="../\n\x1b[31m" + "x" * 1_000_000)
    # Then the message is one short line, cut with an ellipsis
    assert "\n" not in str(exc) and "\x1b" not in str(exc)
    assert len(str(exc)) < 400 and str(exc).endswith("…)")


def test_a_refusal_survives_pickling() -> None:
    # Given a refusal (Celery pickles a task's exceptions)
    exc = refused(log_dir="../x")
    # When it is pickled and back; Then it is the same refusal
    back = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
    assert (back.field, back.reason, str(back)) == (exc.field, exc.reason, str(exc))
    assert str(exc) == "field 'log_dir': '..' is not allowed (got '../x')"


# --- open_logs ------------------------------------------------------------------------------


@pytest.fixture
def study(tmp_path: Path) -> Iterator[Path]:
    """<tmp>/study (the --root) beside <tmp>/outside, which holds a canary file."""
    root = Path(os.path.realpath(tmp_path))
    (root / "study").mkdir()
    (root / "outside").mkdir()
    (root / "outside" / "canary.txt").write_bytes(b"precious")
    yield root / "study"


def test_open_logs_creates_nested_dirs_and_readable_files(study: Path) -> None:
    # Given a study with no log dir yet, and an old log from an earlier attempt elsewhere
    names = (f"tbss_2_reg.o{BATCH}.3", f"tbss_2_reg.e{BATCH}.3")
    # When the logs are opened in logs/a/b under it
    out, err = open_logs(str(study), "logs/a/b", names, roots=[str(study)])
    with out, err:
        out.write(b"stdout")
        out.seek(0)
        # Then the folders are made, and the files are writable and readable back
        assert out.read() == b"stdout"
    folder = study / "logs" / "a" / "b"
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((folder / names[1]).stat().st_mode) == 0o644 & ~umask


def test_open_logs_truncates_an_earlier_attempts_log(study: Path) -> None:
    # Given a log left by an earlier attempt
    (study / "logs").mkdir()
    (study / "logs" / "job.o1").write_bytes(b"old output")
    # When it is opened again (no roots: anchored at cwd); Then it is empty
    out, err = open_logs(str(study), "logs", ("job.o1", "job.e1"))
    with out, err:
        assert out.read() == b""


def test_open_logs_writes_an_absolute_log_dir_outside_cwd(study: Path) -> None:
    # Given an absolute log dir beside the study, and no roots (anchored at /)
    logs = study.parent / "logs"
    # When the logs are opened; Then they are there
    out, err = open_logs(str(study), str(logs), ("j.o1", "j.e1"))
    out.close()
    err.close()
    assert sorted(p.name for p in logs.iterdir()) == ["j.e1", "j.o1"]


def test_open_logs_refuses_a_symlinked_directory_pointing_outside(study: Path) -> None:
    # Given a symlink inside the study to a directory outside it
    outside = study.parent / "outside"
    (study / "logs").symlink_to(outside, target_is_directory=True)
    for cwd, log_dir in [(study, "logs"), (study, "logs/deeper"), (study / "logs", "x")]:
        # When the logs would go through it
        with pytest.raises(RefusedField) as caught:
            open_logs(str(cwd), log_dir, ("j.o1", "j.e1"), roots=[str(study)])
        # Then the log dir is refused, and nothing is written outside
        assert caught.value.field == "log_dir" and "symlink" in caught.value.reason
        assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]


def test_open_logs_refuses_a_symlink_above_cwd_below_the_root(study: Path) -> None:
    # Given a cwd reached through a symlink below the root (study/sub -> outside)
    (study / "sub").symlink_to(study.parent / "outside")
    # When logs are opened in that cwd; Then the symlink is refused, not followed
    with pytest.raises(RefusedField):
        open_logs(str(study / "sub"), ".", ("j.o1", "j.e1"), roots=[str(study)])
    assert sorted(p.name for p in (study.parent / "outside").iterdir()) == ["canary.txt"]


@pytest.mark.parametrize("which", [0, 1])
def test_open_logs_refuses_a_symlink_as_the_log_file(study: Path, which: int) -> None:
    # Given one log file name already a symlink to a file outside the study
    canary = study.parent / "outside" / "canary.txt"
    names = ("j.o1", "j.e1")
    (study / names[which]).symlink_to(canary)
    # When the logs are opened
    with pytest.raises(RefusedField) as caught:
        open_logs(str(study), ".", names, roots=[str(study)])
    # Then it is refused, and the target is not truncated
    assert caught.value.field == "job_name" and "symlink" in caught.value.reason
    assert canary.read_bytes() == b"precious"


def test_open_logs_refuses_a_dangling_symlink_and_a_hard_link(study: Path) -> None:
    # Given a dangling symlink to a file outside, and a hard link to the canary
    outside = study.parent / "outside"
    (study / "j.o1").symlink_to(outside / "new.txt")
    os.link(outside / "canary.txt", study / "k.o1")
    # When logs are opened through either; Then both are refused and nothing changes
    for names in [("j.o1", "j.e1"), ("k.o1", "k.e1")]:
        with pytest.raises(RefusedField):
            open_logs(str(study), ".", names)
    assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert (outside / "canary.txt").read_bytes() == b"precious"


def test_open_logs_refuses_what_check_fields_would(study: Path) -> None:
    # Given names and dirs a caller should never pass; Then open_logs refuses them itself
    root = [str(study)]
    for args, field in [
        ((str(study), "../outside", ("j.o1", "j.e1")), "log_dir"),
        ((str(study), str(study.parent / "outside"), ("j.o1", "j.e1")), "log_dir"),
        ((str(study), "logs", ("../j.o1", "j.e1")), "job_name"),
        ((str(study), "logs", ("j.o1", "")), "job_name"),
        ((str(study) + "/../outside", ".", ("j.o1", "j.e1")), "cwd"),
    ]:
        with pytest.raises(RefusedField) as caught:
            open_logs(*args, roots=root)
        assert caught.value.field == field
    assert sorted(p.name for p in study.parent.joinpath("outside").iterdir()) == ["canary.txt"]


def test_open_logs_does_not_create_a_missing_cwd(study: Path) -> None:
    # Given a cwd that does not exist under the root
    # When logs are opened there; Then it fails and makes nothing
    with pytest.raises(FileNotFoundError):
        open_logs(str(study / "gone"), "logs", ("j.o1", "j.e1"), roots=[str(study)])
    assert list(study.iterdir()) == []


def test_open_logs_leaks_no_file_descriptors(study: Path) -> None:
    # Given the number of open fds, and a symlink that will be refused
    (study / "bad").symlink_to(study.parent / "outside")
    before = open_fds()
    # When logs are opened and closed, refused, and fail, many times
    for i in range(20):
        out, err = open_logs(str(study), f"logs/{i}", ("j.o1", "j.e1"), roots=[str(study)])
        out.close()
        err.close()
        with pytest.raises(RefusedField):
            open_logs(str(study), "bad/x", ("j.o1", "j.e1"), roots=[str(study)])
        with pytest.raises(RefusedField):
            open_logs(str(study), f"logs/{i}", ("j.o1", "j.o1/x"), roots=[str(study)])
        (study / "logs" / str(i) / "j.e1").unlink()
        (study / "logs" / str(i) / "j.e1").symlink_to("/nonexistent")  # second file refused
        with pytest.raises(RefusedField):
            open_logs(str(study), f"logs/{i}", ("j.o1", "j.e1"), roots=[str(study)])
        with pytest.raises(FileNotFoundError):
            open_logs(str(study / "gone"), "x", ("j.o1", "j.e1"), roots=[str(study)])
    # Then as many fds are open as before
    assert open_fds() == before


# --- property: whatever the message, nothing outside the study is written --------------------

PIECES = st.one_of(
    st.sampled_from(["logs", "..", ".", "", "link", "outside", "a", "\0", "\ud800", "x\ny"]),
    st.text(max_size=6),
)
REL = st.lists(PIECES, max_size=4).map("/".join)
GOOD_REL = st.lists(st.sampled_from(["a", "logs", "link", "sub dir"]), min_size=1, max_size=3).map(
    "/".join
)
ABS = st.builds(
    lambda base, rest: f"{base}/{rest}",
    st.sampled_from(["{study}", "{outside}", "{parent}", "/etc", ""]),
    st.one_of(GOOD_REL, REL),
)
VALUES = st.one_of(
    st.text(max_size=10),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
    st.sampled_from([1, 3, 60.0, "logs", "{study}/logs", "{outside}", "link", "../x"]),
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """good three times in four: enough messages pass to exercise open_logs."""
    return st.integers(0, 3).flatmap(lambda n: bad if n == 0 else good)


# arbitrary options (known keys or random text) laid over the message
NOISE = mostly(
    st.just({}),
    st.dictionaries(st.one_of(st.sampled_from(KNOWN), st.text(max_size=6)), VALUES, max_size=2),
)
# the forgeries of the report, and ways around a lexical check (a symlink, a longer name)
FORGED_CWD = st.sampled_from(
    ["{outside}", "{parent}", "/etc", "/", "{study}/../outside", "{study}x", "{study}/link/x"]
)
FORGED_LOG_DIR = st.sampled_from(
    ["..", "../../victim", "{outside}", "{outside}/new", "{parent}", "/etc", "/", "{study}x/l"]
    + ["{study}/../outside", "{study}/link", "link", "link/new", "logs/../../outside"]
)
CWD = mostly(
    st.one_of(st.just("{study}"), GOOD_REL.map("{study}/".__add__)),
    st.one_of(FORGED_CWD, REL.map("{study}/".__add__), ABS, REL),
)
LOG_DIR = st.one_of(
    st.sampled_from([".", "logs", "{study}", "{study}/logs"]),
    GOOD_REL,
    GOOD_REL.map("{study}/".__add__),
    FORGED_LOG_DIR,
    FORGED_LOG_DIR,
    st.one_of(REL, ABS, st.text(max_size=10)),
)
JOB = st.one_of(
    st.none(), st.sampled_from(["tbss_2_reg", "../x", "a/b", "link", ".."]), st.text(max_size=8)
)
LINE = st.one_of(st.none(), st.just(3), st.integers(-1, 5), st.sampled_from(["x/../victim", 2.0]))


def snapshot(parent: str, study: str) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything under parent but not in study."""
    seen = {}
    for top, dirs, files in os.walk(parent):
        if top == parent:
            dirs.remove("study")
        for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
            info = os.lstat(name)
            seen[name] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return seen


def make_real_dirs(study: str, cwd: str) -> None:
    """mkdir -p cwd below study, stopping at a symlink or any trouble (never following one)."""
    path = study
    for part in os.path.relpath(cwd, study).split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path) or part in ("", "."):
            return
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except (OSError, ValueError):
            return


def inside(path: str, root: str) -> bool:
    path = os.path.normpath(path)
    return path == root or path.startswith(root + "/")


@settings(max_examples=200, deadline=None)
@given(cwd=CWD, log_dir=LOG_DIR, job_name=JOB, line=LINE, noise=NOISE)
def test_no_message_writes_outside_the_root(
    cwd: str, log_dir: str, job_name: str | None, line: object, noise: Mapping[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Given a parent dir with study/ (the worker's --root) and outside/ with a canary,
        # a symlink study/link -> outside, and in study/ and study/logs/ the log names of
        # line 3 symlinked to the canary, and of no line hard-linked to it
        parent = os.path.realpath(tmp)
        study, outside = f"{parent}/study", f"{parent}/outside"
        canary = Path(outside, "canary.txt")
        os.makedirs(f"{study}/logs")
        os.mkdir(outside)
        canary.write_bytes(b"precious")
        os.symlink(outside, f"{study}/link")
        for folder in (study, f"{study}/logs"):
            for job in ("tbss-queue", "tbss_2_reg"):
                os.symlink(canary, f"{folder}/{job}.o{BATCH}.3")
                os.link(canary, f"{folder}/{job}.o{BATCH}")

        def fill(value: Any) -> Any:
            if not isinstance(value, str):
                return value
            for token, path in [("{study}", study), ("{outside}", outside), ("{parent}", parent)]:
                value = value.replace(token, path)
            return value

        # and a message with some cwd, log dir, job name and line, and arbitrary options on top
        message = {"log_dir": fill(log_dir), "job_name": job_name, "line": line}
        message = {k: v for k, v in message.items() if v is not None}
        message.update({k: fill(v) for k, v in noise.items()})
        before = snapshot(parent, study)
        # When the worker checks it
        try:
            fields = check_fields(BATCH, COMMAND, ["fsl_reg"], fill(cwd), message, roots=[study])
        except RefusedField as exc:
            assert isinstance(exc.field, str) and "\n" not in str(exc)
            event(f"refused: {exc.field if exc.field in [*KNOWN, 'cwd'] else 'unknown option'}")
            return
        # Then what passes has its logs inside the root
        paths, names = log_paths(fields), log_names(fields)
        if paths is None or names is None or fields.log_dir is None:
            event("passed: no log_dir")
            return
        assert all(inside(p, study) for p in paths)
        # and opening them (cwd made first, as a study's would exist) writes nothing outside
        make_real_dirs(study, fields.cwd)
        try:
            out, err = open_logs(fields.cwd, fields.log_dir, names, roots=[study])
        except (RefusedField, OSError) as exc:
            event(f"open_logs: {type(exc).__name__}")
        else:
            event("open_logs: opened")
            out.write(b"x")
            out.close()
            err.close()
        assert snapshot(parent, study) == before
        assert canary.read_bytes() == b"precious"
