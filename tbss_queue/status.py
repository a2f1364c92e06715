"""From the counters of a batch to counts, throughput and ETA (a pure function, no Redis)."""

from __future__ import annotations

from typing import Any

from .models import BatchStatus, NodeStatus

MIN_RECENT = 3
"""Fewer commands than this in the recent window: the ETA uses the overall rate instead."""


def compute(batch_id: str, snap: dict[str, Any]) -> BatchStatus:
    meta, counts = snap["meta"], snap["counts"]
    now, window = snap["now"], snap["window"]
    first = meta.get("first_started")
    last = meta.get("last_ended")
    finished_runs = counts.get("succeeded", 0) + counts.get("failed", 0)
    elapsed = (now - float(first)) if first else 0.0
    rate_overall = 60.0 * finished_runs / elapsed if elapsed > 0 else 0.0
    span = min(window, elapsed) if elapsed > 0 else window
    rate_recent = 60.0 * snap["recent"] / span if span > 0 else 0.0
    remaining = counts.get("queued", 0) + counts.get("running", 0)
    rate = rate_recent if snap["recent"] >= MIN_RECENT else rate_overall
    eta = 60.0 * remaining / rate if remaining and rate > 0 else (0.0 if not remaining else None)
    return BatchStatus(
        batch=batch_id,
        path=str(meta.get("path", "")),
        cwd=str(meta.get("cwd", "")),
        submitted=float(meta.get("submitted", 0.0)),
        total=int(meta.get("total", 0)),
        queued=counts.get("queued", 0),
        running=counts.get("running", 0),
        succeeded=counts.get("succeeded", 0),
        failed=counts.get("failed", 0),
        skipped=counts.get("skipped", 0),
        cancelled=counts.get("cancelled", 0),
        rate_recent=round(rate_recent, 3),
        rate_overall=round(rate_overall, 3),
        eta_seconds=round(eta, 1) if eta is not None else None,
        first_started=float(first) if first else None,
        last_ended=float(last) if last else None,
        nodes=_nodes(snap["nodes"]),
        applying=bool(snap.get("applying")),
    )


def fsl_version_warning(facts: dict[str, dict[str, Any]]) -> str | None:
    """A warning when the nodes of one batch ran different FSL versions (or some unknown)."""
    by_version: dict[str, list[str]] = {}
    for node, f in sorted(facts.items()):
        by_version.setdefault(str(f.get("fsl_version") or "none"), []).append(node)
    if len(by_version) < 2:
        return None
    listed = "; ".join(f"FSL {v} on {', '.join(n)}" for v, n in sorted(by_version.items()))
    return (
        f"workers of this batch run different FSL versions ({listed}): results are not "
        "reproducible across them"
    )


def _nodes(raw: dict[str, str]) -> tuple[NodeStatus, ...]:
    by_node: dict[str, dict[str, str]] = {}
    for key, value in raw.items():
        node, _, fld = key.rpartition("|")
        by_node.setdefault(node, {})[fld] = value
    return tuple(
        NodeStatus(
            node=node,
            running=max(0, int(f.get("running", 0))),
            succeeded=int(f.get("succeeded", 0)),
            failed=int(f.get("failed", 0)),
            busy_seconds=float(f.get("busy", 0.0)),
            last_seen=float(f["seen"]) if "seen" in f else None,
        )
        for node, f in sorted(by_node.items())
    )
