"""Starting Flower for the configured broker, locked down by default.

Flower's API can launch tasks, i.e. run commands on every worker, so it always runs
--read-only; it binds to 127.0.0.1 unless told otherwise, and refuses another address without
authentication. Its /metrics page (Prometheus) is never authenticated: keep the port private.
It gains Batches and Throughput pages (flower_pages.py) drawn from our records in Redis, and
names each task as its pair with its batch and study (publish.shadow_name).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import ConfigError
from tbss_queue.queue.app import make_app
from tbss_queue.queue.broker import connect

RUNTIME_BUCKETS = "30,60,120,180,240,300,450,600,900,1800,3600"
"""Seconds: Flower's default histogram stops at 10 s, useless for 3-5 minute registrations."""
TASK_COLUMNS = "name,state,worker,received,started,runtime,exception,uuid"
"""The tasks page: each task's name is its command's label (publish.label: the pair for
fsl_reg, else the command) with its batch and study (publish.shadow_name), one row per
attempt."""


@dataclass(frozen=True)
class FlowerOptions:
    address: str = "127.0.0.1"
    port: int = 5555
    basic_auth: str | None = None
    db: str = "flower.db"
    max_tasks: int = 100_000
    url_prefix: str | None = None


def _loopback(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_argv(options: FlowerOptions) -> list[str]:
    """Flower's arguments; refuses a reachable address without authentication."""
    if not _loopback(options.address) and not options.basic_auth:
        raise ConfigError(
            f"--address {options.address or '(all interfaces)'}: refusing to serve Flower "
            "beyond this machine without --basic-auth USER:PASSWORD (its pages show every "
            "command and its API could reach the workers)"
        )
    if options.basic_auth is not None and ":" not in options.basic_auth:
        raise ConfigError("--basic-auth: expected USER:PASSWORD")
    Path(options.db).parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "flower",
        f"--address={options.address}",
        f"--port={options.port}",
        "--read_only=True",
        "--persistent=True",
        # workers send task events only when asked (app.py): Flower asks every 5 s
        "--enable_events=True",
        f"--db={options.db}",
        "--state_save_interval=60000",
        f"--max_tasks={options.max_tasks}",
        f"--task_runtime_metric_buckets={RUNTIME_BUCKETS}",
        f"--tasks_columns={TASK_COLUMNS}",
        "--purge_offline_workers=86400",
    ]
    if options.basic_auth:
        argv.append(f"--basic_auth={options.basic_auth}")
    if options.url_prefix:
        argv.append(f"--url_prefix={options.url_prefix}")
    return argv


def run_flower(settings: Settings, options: FlowerOptions) -> None:
    """Run Flower in this process until stopped."""
    from tbss_queue.views.flower_pages import install

    argv = flower_argv(options)
    install(
        connect(settings),
        settings,
        lambda: api.list_batches(settings=settings),
        lambda: api.nodes(settings=settings),
    )
    make_app(settings).start(argv=argv)
