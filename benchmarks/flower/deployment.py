"""Run a Flower App on Flower's deployment engine, on this machine, the way Flower documents it:
one `flower-superlink`, N `flower-supernode`s and `flwr run`, all from benchmarks/flower/.venv
(made by benchmarks/flower/setup.sh). Used by the benchmarks that compare fedpod with Flower
in the same run; the processes are children of the caller, so PeakMemory counts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).parent
VENV_BIN = HERE / ".venv" / "bin"
APP = HERE / "app"


def ensure_installed() -> None:
    if not (VENV_BIN / "flower-superlink").exists():
        subprocess.run([str(HERE / "setup.sh")], check=True)


def _ports() -> Iterator[int]:
    """Free ports for the federation's listeners, counted up from below the ephemeral range: a
    port the kernel hands out as free is also where outgoing connections (the supernodes' own)
    take theirs, and one of 30 supernodes lost its port that way before binding it."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    below = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for port in range(10_000 + os.getpid() % 500 * 40, below):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        yield port
    raise RuntimeError("no free port below the ephemeral range")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


class FlowerFederation:
    """A superlink and `nodes` supernodes (each with its own node-config), stopped on exit."""

    def __init__(self, nodes: int, work: Path, node_configs: list[dict[str, object]] | None = None) -> None:
        self.nodes = nodes
        self.work = work
        self.logs = work / "logs"
        self.node_configs = node_configs or [{} for _ in range(nodes)]
        self._free_ports = _ports()
        self.port = next(self._free_ports)
        self.env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"),
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("PYTHONPATH", None)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> FlowerFederation:
        ensure_installed()
        self.logs.mkdir(parents=True, exist_ok=True)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            # Apps run in this venv (it has fedpod and torch), not in a per-run environment.
            self._start("superlink", ["flower-superlink", "--insecure", "--port", str(self.port),
                                      "--disable-runtime-dependency-installation",
                                      "--health-server-address", f"127.0.0.1:{next(self._free_ports)}"])
            self._wait_for_superlink()
            for index, extra in enumerate(self.node_configs):
                config = {"partition-id": index, "num-partitions": self.nodes, **extra}
                self._start(f"supernode{index}", [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(next(self._free_ports)),
                    "--health-server-address", f"127.0.0.1:{next(self._free_ports)}",
                    "--node-config", " ".join(f"{key}={_toml(value)}" for key, value in config.items())])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, name: str, command: list[str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            self._processes[name] = subprocess.Popen([str(VENV_BIN / command[0]), *command[1:]], cwd=self.work,
                                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                     start_new_session=True)

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if name != "flwr-run" and process.poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.logs / f'{name}.log').read_text()[-2000:]}")

    def _wait_for_superlink(self, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"flower-superlink not listening on {self.port} after {deadline_s}s")

    def run(self, out: Path, run_config: dict[str, object], timeout_s: float = 1800) -> list[float]:
        """`flwr run` the app and wait for the ServerApp's final weights; returns the timestamps
        it wrote (one before the first round, then one after each round)."""
        out.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(f"{key}={_toml(value)}" for key, value in {**run_config, "out": str(out)}.items())
        self._start("flwr-run", ["flwr", "run", str(APP), "bench", "--stream", "--run-config", overrides])
        run = self._processes["flwr-run"]
        deadline = time.monotonic() + timeout_s
        while not (out / "final.safetensors").exists():
            self._check_alive()
            if run.poll() is not None and not (out / "final.safetensors").exists():
                raise RuntimeError(f"Flower run ended without a result: "
                                   f"{(self.logs / 'flwr-run.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flower run did not finish in {timeout_s}s; see {self.logs}")
            time.sleep(0.2)
        return [float(stamp) for stamp in json.loads((out / "rounds.json").read_text())]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for process in reversed(self._processes.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
