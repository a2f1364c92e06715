"""The execution path stays readable: no function of tbss_queue/execution/ grows past 60 lines
or 7 parameters (a frozen object passes between the stages instead)."""

from __future__ import annotations

import ast
from pathlib import Path

EXECUTION = Path(__file__).parent.parent / "tbss_queue" / "execution"
MAX_LINES, MAX_PARAMS = 60, 7


def _functions(path: Path) -> list[tuple[str, int, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            n = len(params) + bool(a.vararg) + bool(a.kwarg)
            n -= bool(params) and params[0].arg in ("self", "cls")
            assert node.end_lineno is not None
            found.append(
                (f"{path.name}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1, n)
            )
    return found


def test_no_function_of_the_execution_path_is_long_or_wide() -> None:
    # Given every module of the execution path
    modules = sorted(EXECUTION.glob("*.py"))
    assert {"attempt.py", "lease.py", "record.py", "runner.py"} <= {m.name for m in modules}
    # Then none of its functions is over the limits
    over = [
        f"{where}: {lines} lines, {params} parameters"
        for m in modules
        for where, lines, params in _functions(m)
        if lines > MAX_LINES or params > MAX_PARAMS
    ]
    assert over == []
