"""A real `lookalike serve` in a subprocess, for tests and benchmarks that need real
HTTP (raw sockets, chunked bodies, slow clients) and the server's own memory: any
environment (limits, key), the peak RSS from /proc, raw connections. `live.Serve` is
the multi-process tests' simpler one."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from live import env as live_env
from live import free_port


class LiveServer:
    """`python -m lookalike --home HOME serve` on a free port, with `env` added to the
    environment (LOOKALIKE_* limits, the API key). Use as a context manager."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, log: Path | None = None):
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = live_env(**(env or {}))
        self.log_path = log or self.home.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LiveServer:
        self.log = open(self.log_path, "wb")
        command = [sys.executable, "-m", "lookalike", "--home", str(self.home), "serve"]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def memory_kb(self) -> dict[str, int]:
        """The server process's VmRSS and VmHWM (peak RSS) in kB, from /proc."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
        return out

    def reset_peak(self) -> None:
        """Start a new VmHWM measurement (Linux: writing 5 to clear_refs resets it)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)
