"""A real Milvus standalone server for the tests and benchmarks, from PyPI.

The `milvus` package (PyPI, "milvus-server", 2.3.5) bundles the Milvus standalone
binary (proxy, coordinators, query/data/index nodes in one process) with embedded etcd,
RocksMQ and local disk storage: no docker, no network. `start_milvus(folder)` runs one
in `folder` on free ports and returns it once its health check answers; `.uri` is what
`--vector-store` takes. Raises MilvusUnavailable (with the reason, and the server's log
tail when it started but failed) when it cannot run here.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class MilvusUnavailable(RuntimeError):
    """The server cannot run or did not start (a failure in CI: see conftest.py)."""


class MilvusNotForThisPlatform(MilvusUnavailable):
    """The PyPI server exists only for Linux x86_64."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServer:
    def __init__(
        self, cmd: list[str], env: dict, uri: str, folder: Path, log: Path, health: str
    ) -> None:
        self.cmd = cmd
        self.env = env
        self.uri = uri
        self.folder = folder
        self.log = log
        self.health = health
        self.proc: subprocess.Popen | None = None

    def launch(self, timeout: float = 240.0) -> None:
        """Start the server process (again: same folder, ports and data) and wait until
        its health check answers; MilvusUnavailable when it does not."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MilvusUnavailable(
                    f"Milvus exited with status {self.proc.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.health, timeout=5) as r:
                    if b"OK" in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise MilvusUnavailable(
            f"Milvus did not become healthy in {timeout:.0f} s:\n{self.log_tail()}"
        )

    def restart(self, timeout: float = 240.0) -> None:
        self.stop()
        self.launch(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # a graceful stop takes Milvus long: kill after a while
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_milvus(folder: Path, timeout: float = 240.0) -> MilvusServer:
    """Start a Milvus standalone server with its data, logs and binaries in `folder`."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise MilvusNotForThisPlatform(
            f"the PyPI Milvus server is built for Linux x86_64, not "
            f"{platform.system()} {platform.machine()}"
        )
    try:
        import milvus  # the PyPI package "milvus": a bundled Milvus standalone
    except ImportError as exc:
        raise MilvusUnavailable(
            "the Milvus standalone server is not installed (pip install 'milvus==2.3.5', "
            "part of lookalike's dev extras)"
        ) from exc
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = milvus.MilvusServerConfig(data_dir=str(folder))
    # every listening port free (another server may run beside this one): the package
    # picks free ports for what its template names; embedded etcd's own client and peer
    # ports are not in the template, so they come from an etcd config file
    for key in list(config.configurable_items):
        if key.endswith("_port"):
            config.set(key, _free_port())
    etcd_client, etcd_peer, metrics = _free_port(), _free_port(), _free_port()
    config.set("etcd_port", etcd_client)
    config.resolve()  # writes configs/milvus.yaml
    etcd_yaml = folder / "configs" / "embedEtcd.yaml"
    etcd_yaml.write_text(
        f"name: lookalike-test\n"
        f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-cluster: lookalike-test=http://127.0.0.1:{etcd_peer}\n"
    )
    milvus_yaml = folder / "configs" / "milvus.yaml"
    text = milvus_yaml.read_text()
    text = text.replace("etcd:\n", f"etcd:\n  config:\n    path: {etcd_yaml}\n", 1)
    milvus_yaml.write_text(text)
    milvus._initialize_data_files(str(folder))  # unpack the binary and its libraries
    exe = folder / "bin" / "milvus"
    env = dict(os.environ)
    env.update(
        DEPLOY_MODE="STANDALONE",
        METRICS_PORT=str(metrics),
        MILVUS_RUN_DIR=str(folder / "run"),
        LD_LIBRARY_PATH=f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
    )
    log = folder / "logs" / "milvus-stdout.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proxy_port = config.configurable_items["proxy_port"][1]
    server = MilvusServer(
        [str(exe), "run", "standalone"],
        env,
        f"milvus://127.0.0.1:{proxy_port}",
        folder,
        log,
        f"http://127.0.0.1:{metrics}/healthz",
    )
    server.launch(timeout)
    return server
