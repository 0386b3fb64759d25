"""Listening sockets: a taken port is a clear error before anything slow starts."""
from __future__ import annotations

from llmcycle.core.errors import UserError


def listen(host: str, port: int):
    """A bound, listening socket, so a taken port is a clear error before the model is loaded."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        import errno

        sock.close()
        if exc.errno == errno.EADDRINUSE:  # the common case gets a message that says just that
            raise UserError(f"port {port} on {host} is in use; pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port)") from None
    sock.listen(2048)
    return sock
