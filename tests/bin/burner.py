"""A synthetic load for the owner-policy tests: reads lines on stdin; 'start' starts one
process that burns a CPU, 'stop' kills them all; at EOF it kills them and exits. Its pid is
the worker's --load-scope, so only the load it makes counts (the suite shares its machine)."""

import subprocess
import sys

burners: list[subprocess.Popen[bytes]] = []
BURN = "while True: pass"


def stop() -> None:
    for b in burners:
        b.kill()
        b.wait()
    burners.clear()


for line in sys.stdin:
    if line.strip() == "start":
        burners.append(subprocess.Popen([sys.executable, "-c", BURN]))
    elif line.strip() == "stop":
        stop()
    print("ok", flush=True)
stop()
