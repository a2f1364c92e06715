"""A loopback TCP proxy in front of Redis that holds one request until the test lets it go.

It holds a window open deterministically: a worker that sends a request matching `pattern` is
stuck at exactly that point of its code (waiting for the reply) until `release()`, and
`held` is set the moment it got there. No sleep, no timing guess.
"""

from __future__ import annotations

import re
import socket
import threading
from types import TracebackType


class HoldingProxy:
    """127.0.0.1:<port> -> upstream; the first client chunk matching `pattern` is held."""

    def __init__(self, upstream: tuple[str, int], pattern: bytes) -> None:
        self.upstream, self.pattern = upstream, re.compile(pattern)
        self.held, self._release = threading.Event(), threading.Event()
        self._matched = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def release(self) -> None:
        self._release.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            for src, dst, watch in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if watch and not self._matched and self.pattern.search(data):
                    with self._lock:
                        first = not self._matched
                        self._matched = True
                    if first:
                        self.held.set()
                        self._release.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._release.set()
        self.listener.close()
        with self._lock:
            for s in self._socks:
                s.close()

    def __enter__(self) -> HoldingProxy:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# the worker's read of an attempt's number (logfiles.attempt_of): after its policy check and
# done check, before it opens the log files and starts the command
ATTEMPT_READ = rb"HGET\r\n\$\d+\r\n[^\r]*:attempts\r\n"
