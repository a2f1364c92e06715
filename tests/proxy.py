"""A loopback TCP proxy in front of redis-server that holds one request until told to let go,
lets one request through and holds its reply until told to let go, or lets one request
through and loses its reply.

It holds a race window open deterministically: the client that sent the request waits for the
reply exactly as long as the test wants (as it would behind a slow link, or a Redis busy with
another client), while every other request, of that client or any other, goes through. With
`reply`, Redis carries the request out at once and only its reply is late. With `drop`,
Redis carries the request out and the connection is cut before the client reads the reply:
the client cannot tell whether it happened (a cable pulled, a failover).
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
from collections.abc import Iterator

from tbss_queue.redis_server import free_port


class HoldingProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target. The first client request whose bytes match
    `hold` (a regex) is kept back, with everything after it on that connection, until
    `release()`; `caught` is set when it is. With `every`, each matching request until then
    is held (a client that gives up on one and asks again waits again: a long stall)."""

    def __init__(
        self,
        target: int,
        hold: bytes,
        *,
        drop: bool = False,
        every: bool = False,
        reply: bool = False,
    ) -> None:
        self.target, self.pattern, self.drop = target, re.compile(hold), drop
        self.every, self.reply = every, reply
        self.port = free_port()
        self.caught, self.released = threading.Event(), threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> HoldingProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.released.set()
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=5)
        for s in self._sockets:
            s.close()

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                client.close()
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, server]
            cut = threading.Event()  # this connection's next reply is to be lost (or held)
            self._spawn(self._pump, client, server, True, cut)
            self._spawn(self._pump, server, client, False, cut)

    def _pump(
        self, src: socket.socket, dst: socket.socket, requests: bool, cut: threading.Event
    ) -> None:
        # the other direction's pump may close both sockets first: select then says ValueError
        with contextlib.suppress(OSError, ValueError):
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                first = not self.caught.is_set() or (self.every and not self.released.is_set())
                if requests and first and self.pattern.search(data):
                    if self.drop or self.reply:
                        cut.set()
                    self.caught.set()
                    if not (self.drop or self.reply):
                        self.released.wait()
                if not requests and cut.is_set() and self.reply:
                    self.released.wait()  # carried out; its reply arrives only now
                elif not requests and cut.is_set():
                    break  # the reply goes nowhere, and the connection with it
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def holding(
    target: int, hold: bytes, *, drop: bool = False, every: bool = False, reply: bool = False
) -> Iterator[HoldingProxy]:
    with HoldingProxy(target, hold, drop=drop, every=every, reply=reply) as proxy:
        yield proxy
