"""A batch's resource request against the nodes' budgets: what `submit` refuses (more than any
node that ever joined can give) and what `status` says of queued commands no online node can
take. Nodes announce their budget in their facts (resources.budget_facts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tbss_queue.sizes import human


def largest(facts: Mapping[str, Mapping[str, Any]], key: str) -> tuple[int, str] | None:
    """The largest `key` (mem_budget, slots) any of these nodes announced, and whose it is."""
    known = [(int(f[key]), node) for node, f in facts.items() if f.get(key)]
    return max(known) if known else None


def capacity(facts: Mapping[str, Any]) -> str:
    """What a node said it can run at once, as `nodes` shows it: '4 slots, 1 GiB'."""
    parts = []
    if facts.get("slots"):
        parts.append(f"{int(facts['slots'])} slots")
    if facts.get("mem_budget"):
        parts.append(human(int(facts["mem_budget"])))
    return ", ".join(parts) or "-"


def beyond(
    mem: int | None, threads: int | None, facts: Mapping[str, Mapping[str, Any]]
) -> tuple[str, str] | None:
    """(which, why) if the request exceeds every node in `facts`: which is 'mem' or 'threads';
    None if some node can take it, or no node announced a budget (nothing to judge by)."""
    top = largest(facts, "mem_budget")
    if mem and top is not None and mem > top[0]:
        return "mem", f"needs {human(mem)}, largest {human(top[0])}"
    top = largest(facts, "slots")
    if threads and threads > 1 and top is not None and threads > top[0]:
        return "threads", f"needs {threads} slots, largest {top[0]}"
    return None


def refusal(
    mem: int | None,
    threads: int | None,
    facts: Mapping[str, Mapping[str, Any]],
    names: tuple[str, str] = ("--mem", "--threads"),
) -> str | None:
    """submit's one line when no worker node that ever joined could run the batch."""
    found = beyond(mem, threads, facts)
    if found is None:
        return None
    which, why = found
    option = names[0] if which == "mem" else names[1]
    return f"{option}: no worker node that ever joined can take it ({why}); nothing queued"


def unplaceable(
    meta: Mapping[str, Any], facts: Mapping[str, Mapping[str, Any]], online: Sequence[str]
) -> str | None:
    """status's line for a batch whose request no online node can take, else None."""
    found = beyond(meta.get("mem"), meta.get("threads"), {n: facts.get(n, {}) for n in online})
    return None if found is None else f"no node can take it ({found[1]})"
