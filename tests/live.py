"""Real `lookalike` processes for the multi-process tests and benchmarks/bench_reliability.py:
the CLI as a subprocess, and `lookalike serve` on a free port, ready when /readyz says so.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "reliability-key"


def env(**extra: str) -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), out.get("PYTHONPATH", "")])
    out["PYTHONUNBUFFERED"] = "1"
    out.update(extra)
    return out


def lookalike(
    *args: str, timeout: float = 900, env_extra: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """The CLI in a new process (`-q`), this worktree's code, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "lookalike", "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(**(env_extra or {})),
        cwd=ROOT,
        **kw,
    )


def lookalike_bg(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lookalike", "-q", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=ROOT,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`lookalike --home HOME serve` in its own process, writes allowed with API_KEY."""

    def __init__(self, home: Path, log: Path, *extra: str) -> None:
        self.home = Path(home)
        self.log = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lookalike", "--home", str(home), *extra,
                 "serve", "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env(LOOKALIKE_API_KEY=API_KEY),
                cwd=ROOT,
            )  # fmt: skip
        self.client = httpx.Client(base_url=self.base, timeout=120)
        deadline = time.monotonic() + 240
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve not ready in 240 s:\n{self.output()}")
            time.sleep(0.25)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def add(self, product_id: str, image: Path) -> httpx.Response:
        with open(image, "rb") as fh:
            return self.client.post(
                "/products",
                data={"product_id": product_id},
                files=[("images", (image.name, fh.read(), "image/jpeg"))],
                headers={"Authorization": f"Bearer {API_KEY}"},
            )

    def search(self, image: Path, k: int = 3) -> list[dict]:
        with open(image, "rb") as fh:
            got = self.client.post(
                "/search", data={"k": str(k)}, files={"image": (image.name, fh.read())}
            )
        got.raise_for_status()
        return got.json()["results"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_home(home: Path, want_products: set[str] | None = None) -> dict:
    """What a home holds against its files: the store has exactly the catalog's image
    ids, each with the catalog's vector (`mismatched` counts the others), and each catalog
    vector is a fresh embedding of its file (`min_cosine`); the catalog's products are
    `want_products` when given."""
    from lookalike.engine import Engine
    from lookalike.images import load_image

    with Engine(home, create=False) as engine:
        catalog, encoder = engine.catalog, engine.encoder
        ids = np.sort(catalog.embedded_ids(encoder.stamp))
        products = {catalog.image(int(i)).product_id for i in ids}
        if want_products is not None:
            assert products == want_products, sorted(products ^ want_products)[:10]
        assert np.array_equal(np.sort(engine.store.ids()), ids)
        stored, truth = engine.store.get(ids), catalog.vectors(ids.tolist())
        mismatched = int(np.sum(np.max(np.abs(stored - truth), axis=1) > 1e-6))
        fresh = []
        for i in ids:
            image = load_image(Path(catalog.image(int(i)).source), draft_size=encoder.draft_size)
            fresh.append(encoder.embed(encoder.prepare(image)[None])[0])
        cosine = np.sum(np.asarray(fresh) * truth, axis=1) if len(ids) else np.ones(1)
        return {"images": len(ids), "mismatched": mismatched, "min_cosine": float(cosine.min())}
