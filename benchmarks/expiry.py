"""What it costs Redis when an ended batch's records expire, with lazy freeing on and off.

    python -m benchmarks.expiry                        # 1,000,000 commands (about 5 min)
    python -m benchmarks.expiry --commands 100000

For each setting of `lazyfree-lazy-expire`, on a fresh redis-server (the one tbss-queue starts:
a jemalloc build when there is one): submit a file of fsl_reg lines, cancel the batch (it ends
and gets its retention TTL), then shorten that TTL to 0.2 s and wait until Redis has expired
every key of it. Expiring is not a command, so SLOWLOG does not see it: Redis's latency monitor
does (events `expire-del`, `expire-cycle`, and any command that met an expired key). Results go
to stdout as markdown; docs/benchmarks.md keeps them with the machine and date.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.broker import connect
from tbss_queue.queue.keys import batch_key

from .ops import submit_process
from .run import _commands_file, machine
from .systems import fresh_redis


def longest_stall(workdir: Path, path: Path, lazy: str) -> tuple[str, int]:
    """(allocator, longest latency event in ms) while a submitted batch's keys expire."""
    server = fresh_redis(workdir)
    try:
        settings = Settings.resolve(env={}, broker=server.url)
        client = connect(settings)
        submit_process(path, server.url)
        batch = api.status(settings=settings).batch
        api.cancel(batch, settings=settings)
        client.config_set("lazyfree-lazy-expire", lazy)
        client.config_set("latency-monitor-threshold", 1)
        client.execute_command("LATENCY", "RESET")
        names = [batch_key(batch), *client.scan_iter(match=batch_key(batch, "*"), count=1000)]
        for name in names:
            client.pexpire(name, 200)
        deadline = time.monotonic() + 60
        while client.exists(*names) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # the background thread, if any, has its own time
        events = client.execute_command("LATENCY", "LATEST")
        allocator = str(client.info("memory")["mem_allocator"])
        return allocator, max((int(e[3]) for e in events), default=0)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"{machine()}; started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| lazyfree-lazy-expire | allocator | longest stall while the batch expired |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tbssq-expiry-") as tmp:
        path = _commands_file(Path(tmp), args.commands)
        for lazy in ("no", "yes"):
            allocator, ms = longest_stall(Path(tmp), path, lazy)
            shown = f"{ms} ms" if ms else "none of 1 ms or more"
            print(f"| {lazy} | {allocator} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
