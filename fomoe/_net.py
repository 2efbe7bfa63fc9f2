"""Address and socket helpers shared by the TCP transport and the link-shaping relay."""

from __future__ import annotations

import socket


def listen(host: str, port: int, who: str = "fomoe", backlog: int = 64) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), IPv6 when ``host`` is one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"{who} cannot listen on {host}:{port}: {exc} (is another run using the port, or is {host} "
                      f"not an address of this machine?)") from exc
    sock.listen(backlog)
    return sock


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port), with a clear error."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad address {text!r}: use host:port")
    return host.strip("[]"), int(port)
