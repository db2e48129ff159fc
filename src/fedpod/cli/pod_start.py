"""`fedpod pod start`, served apart from the rest of the command line.

A pod runs for months in the process this command starts, so what the command imports stays in
every pod's memory: the full CLI (its other commands, rich's tables, the custodian's tools) is
~3 MiB of an idle pod's ~57. `fedpod.cli.entry` runs this module's one-command app for `pod
start`, and the full app registers the same command for `fedpod pod --help`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from fedpod.cli.options import ConfigPath
from fedpod.pod.config import PodConfig
from fedpod.pod.custodian import PodFolder
from fedpod.pod.memory_cap import cap_process
from fedpod.pod.ui.server import PageAddress, open_page, serve_page

UiHost = Annotated[str, typer.Option("--ui-host", help="address the page listens on (keep it local)")]
UiPort = Annotated[int, typer.Option("--ui-port", help="port of the page (0: any free one)")]


def resolve_beside(config: Path, value: str) -> Path:
    """A path from a pod config, relative to the config's folder."""
    path = Path(value)
    return path if path.is_absolute() else config.parent / path


def pod_storage(config: Path) -> Path:
    return resolve_beside(config, PodConfig.load(config).storage)


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def announce_page(address: PageAddress) -> None:
    print(f"custodian's page: {address.url}  access token: {address.token}", flush=True)


def pod_start(
    config: ConfigPath = Path("pod.yaml"),
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    ui: Annotated[bool, typer.Option("--ui", help="also serve the custodian's page")] = False,
    ui_host: UiHost = "127.0.0.1", ui_port: UiPort = 8765,
) -> None:
    """Run the pod until Ctrl-C / SIGTERM. It connects out to the broker; it opens no port
    (unless --ui: the custodian's page, on 127.0.0.1). One line per task (who, dataset, kind,
    decision; then duration and what left the pod) on the console and in <storage>/pod.log."""
    from fedpod.pod import logs
    from fedpod.pod.service import Pod

    settings = PodConfig.load(config)
    logs.configure(pod_storage(config), log_level)
    logging.getLogger("fedpod.pod").info("%s", cap_process(settings))  # before any task can allocate
    pod = Pod(settings, config)
    page = open_page(PodFolder(config), ui_host, ui_port) if ui else None

    async def main() -> None:
        stop = stop_on_signals()
        ready = asyncio.Event()
        runner = asyncio.create_task(pod.run(stop, ready))
        waiter = asyncio.create_task(ready.wait())
        server = asyncio.create_task(serve_page(PodFolder(config), *page, stop)) if page else None
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            print(f"pod {settings.name} ({pod.fingerprint}) ready on {settings.broker.url} "
                  f"serving {', '.join(d.name for d in settings.datasets) or 'no datasets'}", flush=True)
            if page:
                announce_page(page[1])
        try:
            await runner
        finally:
            stop.set()
            if server is not None:
                await server

    asyncio.run(main())


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(pod_start)
