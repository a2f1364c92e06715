"""A stand-in command for tests: logs its id, sleeps, writes its output, exits as told."""

import argparse
import os
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("id")
p.add_argument("--log", help="append the id to this file when done")
p.add_argument("--out", help="write this output file when done")
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--linger", type=float, default=0.0, help="seconds to sleep after the output")
p.add_argument("--exit", type=int, default=0)
p.add_argument("--stderr", default="")
p.add_argument("--child", action="store_true", help="start a long-running child first")
p.add_argument("--pidfile", help="write pid (and child pid) here at start")
p.add_argument("--fail-unless", help="exit 1 unless this file exists")
p.add_argument("--kill-parent", action="store_true", help="SIGKILL the worker process")
p.add_argument("--marker", help="append 'start', 'out' and 'done' lines (PID TIME) to DIR/ID")
p.add_argument("--grandchild", action="store_true", help="start a child that starts a child")
p.add_argument("--ticks", type=int, default=0, help="mark tick N times, 0.1 s apart")
p.add_argument("--gate", help="then mark tick every 0.1 s until this file exists")
p.add_argument("--on-term", action="store_true", help="mark 'term' on SIGTERM, then exit 143")
p.add_argument("--until-file", help="after --sleep, wait until this file exists")
p.add_argument("--env-to", help="write the environment as JSON to this file at start")
p.add_argument(
    "--child-alloc", type=int, default=0, help="a child holds this many MiB; exit 1 if it fails"
)
p.add_argument("--alloc", type=int, default=0, help="hold this many MiB (touched) while asleep")
a = p.parse_args()


def mark(what: str) -> None:
    if a.marker:
        with open(os.path.join(a.marker, a.id), "a") as f:
            f.write(f"{what} {os.getpid()} {time.time():.3f}\n")


mark("start")
if a.on_term:
    import signal

    def _term(signum: int, frame: object) -> None:
        mark("term")
        sys.exit(143)

    signal.signal(signal.SIGTERM, _term)
if a.env_to:
    import json

    with open(a.env_to, "w") as f:
        json.dump(dict(os.environ), f)

pids = [os.getpid()]
if a.child:
    pids.append(subprocess.Popen(["sleep", "600"]).pid)
if a.grandchild:
    # like fsl_reg -> fnirt: a child that starts its own child; both write their pids
    code = (
        "import os,subprocess,sys,time; g=subprocess.Popen(['sleep','600']); "
        "open(sys.argv[1],'a').write(f'{os.getpid()} {g.pid}\\n'); time.sleep(600)"
    )
    subprocess.Popen([sys.executable, "-c", code, a.pidfile])
if a.pidfile:
    with open(a.pidfile, "a") as f:
        f.write(" ".join(map(str, pids)) + "\n")
if a.kill_parent:
    os.kill(os.getppid(), 9)
for _ in range(a.ticks):  # work that stops while the process is stopped (SIGSTOP)
    time.sleep(0.1)
    mark("tick")
while a.gate and not os.path.exists(a.gate):
    time.sleep(0.1)
    mark("tick")
if a.child_alloc:  # like fsl_reg running fnirt: the script outlives its child's death
    child = [sys.executable, __file__, a.id + "-child", "--alloc", str(a.child_alloc)]
    if subprocess.run([*child, "--sleep", str(a.sleep)]).returncode != 0:
        print("fnirt failed", file=sys.stderr)
        sys.exit(1)
held = []
for _ in range(a.alloc // 16):  # 16 MiB at a time, as a registration grows its fields
    held.append(b"\1" * (16 << 20))
    time.sleep(0.01)
time.sleep(a.sleep)
while a.until_file and not os.path.exists(a.until_file):
    time.sleep(0.05)
if a.fail_unless and not os.path.exists(a.fail_unless):
    print(f"{a.fail_unless} is missing", file=sys.stderr)
    sys.exit(1)
if a.stderr:
    print(a.stderr, file=sys.stderr)
if a.exit == 0:
    if a.out:
        with open(a.out, "w") as f:
            f.write(a.id + "\n")
        mark("out")
        time.sleep(a.linger)
    if a.log:
        with open(a.log, "a") as f:
            f.write(a.id + "\n")
    mark("done")
sys.exit(a.exit)
