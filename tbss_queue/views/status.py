"""From the counters of a batch to counts, throughput and ETA (a pure function, no Redis).

One definition of the figures, used by status, batches, --watch, the report and the API:
- rate_overall: commands finished (succeeded or failed) per minute, from the first command's
  start to `as_of`;
- rate_recent: commands that ended in the 10 minutes before `as_of`, per minute of that window
  (or of the time since the first start, when shorter);
- ETA: what is queued or running, at the recent rate (the overall one while fewer than
  MIN_RECENT ended recently);
- `as_of` is now while the batch runs and its last command's end once it has ended: an ended
  batch's figures are frozen there.
"""

from __future__ import annotations

from typing import Any

from tbss_queue.models import BatchStatus, Fleet, NodeStatus

MIN_RECENT = 3
"""Fewer commands than this in the recent window: the ETA uses the overall rate instead."""


def compute(batch_id: str, snap: dict[str, Any], fleet: Fleet | None = None) -> BatchStatus:
    meta, counts = snap["meta"], snap["counts"]
    until, window = snap.get("until", snap["now"]), snap["window"]
    first = meta.get("first_started")
    last = meta.get("last_ended")
    finished_runs = counts.get("succeeded", 0) + counts.get("failed", 0)
    elapsed = (until - float(first)) if first else 0.0
    rate_overall = 60.0 * finished_runs / elapsed if elapsed > 0 else 0.0
    span = min(window, elapsed) if elapsed > 0 else window
    rate_recent = 60.0 * snap["recent"] / span if span > 0 else 0.0
    remaining = counts.get("queued", 0) + counts.get("running", 0)
    rate = rate_recent if snap["recent"] >= MIN_RECENT else rate_overall
    eta = 60.0 * remaining / rate if remaining and rate > 0 else (0.0 if not remaining else None)
    nodes = _nodes(snap["nodes"], fleet, counts.get("running", 0))
    online = fleet.online() if fleet else []
    submitted = float(meta.get("submitted", 0.0))
    silent = None
    if fleet is not None and not online:
        silent = round(fleet.silent_for(float(meta.get("last_submitted") or submitted)), 1)
    ended_at = meta.get("ended_at")
    return BatchStatus(
        batch=batch_id,
        path=str(meta.get("path", "")),
        cwd=str(meta.get("cwd", "")),
        submitted=submitted,
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
        nodes=nodes,
        applying=bool(snap.get("applying")),
        as_of=until,
        ended_at=float(ended_at) if ended_at else None,
        requeued=int(snap.get("requeued", 0)),
        lost=int(snap.get("lost", 0)),
        workers_online=len(online),
        no_worker_for=silent,
        peak_rss=int(meta["peak_rss"]) if meta.get("peak_rss") else None,
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


def _nodes(raw: dict[str, str], fleet: Fleet | None, running_now: int) -> tuple[NodeStatus, ...]:
    """Each node's part in the batch. A node's running count is never more than the batch's:
    a cancel takes its commands out of the batch's count at once, while the node's own count
    falls only when its runner reports, seconds later (or never, if it was killed first)."""
    by_node: dict[str, dict[str, str]] = {}
    for key, value in raw.items():
        node, _, fld = key.rpartition("|")
        by_node.setdefault(node, {})[fld] = value
    if fleet is not None:  # nodes online that have not worked on this batch are shown too
        for node in fleet.online():
            by_node.setdefault(node, {})
    out = []
    for node, f in sorted(by_node.items()):
        running = min(max(0, int(f.get("running", 0))), running_now)
        out.append(
            NodeStatus(
                node=node,
                running=running,
                succeeded=int(f.get("succeeded", 0)),
                failed=int(f.get("failed", 0)),
                busy_seconds=float(f.get("busy", 0.0)),
                last_seen=float(f["seen"]) if "seen" in f else None,
                quarantined=fleet.quarantine.get(node) if fleet else None,
                cannot=fleet.faults.get(node, ()) if fleet else (),
                paused=fleet.paused.get(node) if fleet else None,
                state=fleet.state(node, running) if fleet else "",
                heartbeat_age=fleet.heartbeat_age(node) if fleet else None,
                requeued=int(f.get("requeued", 0)),
            )
        )
    return tuple(out)
