"""Docs can't drift: every command is in the README with an example and has --help text."""

from __future__ import annotations

import re
from pathlib import Path

import tbss_queue
from tbss_queue.cli import cli

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_subcommand_is_documented_with_an_example_and_help() -> None:
    for name, command in cli.commands.items():
        assert f"### {name}" in README, f"README has no section for `{name}`"
        assert re.search(rf"^tbss-queue {name}\b", README, re.M), f"no example of `{name}`"
        assert command.help and "Example:" in command.help, f"`{name}` --help lacks an example"


def test_readme_setup_commands_are_the_ci_ones() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "./scripts/test" in README and "./scripts/test" in ci
    assert "tbss-queue demo demo-study --subjects 6 && tbss-queue run" in README


def test_public_api_is_pinned() -> None:
    assert sorted(tbss_queue.__all__) == sorted(
        [
            "Batch",
            "BatchStatus",
            "CommandLog",
            "NodeInfo",
            "NodeStatus",
            "Settings",
            "TaskRecord",
            "TbssQueueError",
            "__version__",
            "cancel",
            "failures",
            "forget",
            "joblog",
            "list_batches",
            "logs",
            "matrix",
            "nodes",
            "report",
            "resume_node",
            "retry",
            "status",
            "submit",
            "tasks",
            "wait",
        ]
    )


def test_every_test_the_guarantees_name_exists() -> None:
    # README's "What is tested" table names the test behind each guarantee: they must exist
    tests_dir = Path(__file__).parent
    section = README.split("## How it works, and what it guarantees")[1].split("\n## ")[0]
    named, module = [], None
    for m in re.finditer(r"(test_\w+\.py)?::(test_\w+)", section):
        module = m.group(1) or module
        named.append((module, m.group(2)))
    assert len(named) >= 10
    for module, test in named:
        assert module is not None
        assert f"def {test}(" in (tests_dir / module).read_text(), f"{module}::{test} missing"


def test_only_the_cli_imports_click() -> None:
    package = Path(tbss_queue.__file__).parent
    offenders = [
        p.name
        for p in package.rglob("*.py")
        if "cli" not in p.relative_to(package).parts[:1]
        and re.search(r"^\s*(import|from) click", p.read_text(), re.M)
    ]
    assert offenders == []


def test_every_test_the_threat_model_names_exists() -> None:
    # the README's threat model names the test behind each row: they must exist
    tests_dir = Path(__file__).parent
    table = README.split("**Threat model**")[1].split("\n\n")[1]
    named = re.findall(r"(test_\w+\.py)::(test_\w+)", table)
    assert len(named) >= 10
    for module, test in named:
        assert f"def {test}(" in (tests_dir / module).read_text(), f"{module}::{test} missing"


def test_the_stages_of_an_attempt_are_those_the_pipeline_runs_in_that_order() -> None:
    # README's stage table names each stage of an attempt and its modules: the pipeline in
    # execution/attempt.py calls them in that order, and every module named exists
    package = Path(tbss_queue.__file__).parent
    rows = re.findall(r"^\| (\d) \| (\w+) \| .+ \| (.+) \|$", README, re.M)
    assert [int(n) for n, _, _ in rows] == list(range(1, 8))
    pipeline = (package / "execution" / "attempt.py").read_text()
    body = pipeline.split("def run_attempt(")[1].split("\ndef ")[0]
    calls = [body.index(f"{stage}(") for _, stage, _ in rows if f"{stage}(" in body]
    assert len(calls) == 7 and calls == sorted(calls)
    for _, _, modules in rows:
        for path in re.findall(r"`([\w/]+\.(?:py|lua))`", modules):
            assert (package / path).exists(), path
