"""BatchStore: every read and write of the queue's state in Redis, one class made of its
concerns, each in its own module: staging.py (submissions, commit, hold, cancel), leases.py
(claims, leases, hand-backs), records.py (outcomes, the run log, every read), retention.py
(ending and expiry), nodes.py (heartbeats, quarantine, faults). keys.py holds the layout of
every key; store.py the scripts (lua/) they run."""

from __future__ import annotations

from tbss_queue.queue.leases import Leases
from tbss_queue.queue.nodes import Nodes
from tbss_queue.queue.records import Records
from tbss_queue.queue.retention import Retention
from tbss_queue.queue.staging import Submissions


class BatchStore(Submissions, Leases, Records, Retention, Nodes):
    """Reads and writes batch records on one Redis. Cheap to create; safe after fork."""
