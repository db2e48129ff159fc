"""Serving the custodian's page: on 127.0.0.1 unless told otherwise, with a fresh random token
each start. The socket is bound before serving, so the URL printed is the one that works (and
port 0 picks a free one). The token is also written, readable by the custodian only, to
`<storage>/ui.json`, for when the console that printed it is gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from fedpod.pod.custodian import PodFolder

UI_FILE = "ui.json"


@dataclass(frozen=True)
class PageAddress:
    url: str
    token: str


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class _Server:
    """uvicorn's server without its signal handlers: the pod (or the CLI) owns the signals."""

    def __init__(self, folder: PodFolder, token: str) -> None:
        import uvicorn

        from fedpod.pod.ui.app import create_app

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        config = uvicorn.Config(create_app(folder, token), log_level="warning", access_log=False, lifespan="off")
        self.server = Quiet(config)

    async def serve(self, sock: socket.socket, stop: asyncio.Event) -> None:
        serving = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        self.server.should_exit = True
        stopping.cancel()
        await serving


def open_page(folder: PodFolder, host: str = "127.0.0.1", port: int = 8765) -> tuple[socket.socket, PageAddress]:
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    address = PageAddress(f"http://{shown_host}:{bound_port}/", secrets.token_urlsafe(24))
    path = folder.storage / UI_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"url": address.url, "token": address.token, "pid": os.getpid()}, handle)
    return sock, address


async def serve_page(folder: PodFolder, sock: socket.socket, address: PageAddress, stop: asyncio.Event) -> None:
    try:
        await _Server(folder, address.token).serve(sock, stop)
    finally:
        (folder.storage / UI_FILE).unlink(missing_ok=True)
