"""Runs the app with uvicorn on a socket the caller bound, and stops the engine when a signal stops the server,
so that streaming answers end at once rather than hold the shutdown."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

GRACE_SECONDS = 3  # for answers still being written when the server stops


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv6 for a host with a colon); OSError if the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig, frame) -> None:
        self.on_stop()
        super().handle_exit(sig, frame)


def run_server(app, sock: socket.socket, on_stop: Callable[[], None]) -> None:
    """Serves until SIGINT or SIGTERM; uvicorn re-raises the signal afterwards (the caller turns it into
    a clean exit)."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACE_SECONDS, ws="none", http="h11")
    _Server(config, on_stop).run(sockets=[sock])
