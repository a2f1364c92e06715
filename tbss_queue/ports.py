"""Whether a server (Flower) can listen where it is told to, asked before it starts."""

from __future__ import annotations

import socket

from tbss_queue.errors import ConfigError


def check_port_free(address: str, port: int) -> None:
    """Raise ConfigError, in one line, when `address:port` cannot be listened on (in use, or
    not an address of this machine), before a server starts and dies with a traceback."""
    try:
        infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--address {address}: {exc.strerror or exc}") from None
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            raise ConfigError(
                f"--port {port}: cannot listen on {address}:{port} ({exc.strerror or exc}); "
                "another program (another Flower?) may hold it: choose another --port"
            ) from None
