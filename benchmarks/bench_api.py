"""POST /search latency of a real `lookalike serve` process on loopback.

Indexes the 2,836-product fashion-footwear catalog from ../shared/data (once; later runs
reuse the home folder, indexing is incremental), starts `python -m lookalike serve` on a
free loopback port, and sends real product photos (footwear300, none of them in the
catalog) as multipart uploads from 1, 4 and 16 concurrent keep-alive clients. Each phase
is bounded by a request count. A last phase repeats 4 clients while a fifth client adds
and deletes products through the API the whole time.

Prints one table row per phase: requests, errors, client-side latency p50/p90/p99/max,
the server's own took_ms p50, throughput; plus the machine (CPU, cores, load average,
which matters on a shared box). `--json FILE` also writes the figures.

    .venv/bin/python benchmarks/bench_api.py                  # defaults below
    .venv/bin/python benchmarks/bench_api.py --clients 1,4 --requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
CATALOG = DATA / "fashion-footwear" / "catalog.csv"
QUERIES = DATA / "footwear300" / "data"


@dataclass
class Phase:
    name: str
    clients: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    server_ms: list[float] = field(default_factory=list, repr=False)
    error_samples: list[str] = field(default_factory=list)
    writes: int = 0
    write_errors: int = 0
    write_ms: list[float] = field(default_factory=list, repr=False)
    load_before: float = 0.0
    load_after: float = 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms or [np.nan])
        out = {
            "phase": self.name,
            "clients": self.clients,
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p90_ms": round(float(np.percentile(lat, 90)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1),
            "server_p50_ms": round(float(np.median(self.server_ms or [np.nan])), 1),
            "req_per_s": round(self.requests / self.seconds, 1) if self.seconds else None,
            "load_avg_1m": [round(self.load_before, 2), round(self.load_after, 2)],
        }
        if self.writes or self.write_errors:
            out["writes"] = self.writes
            out["write_errors"] = self.write_errors
            out["write_p50_ms"] = round(float(np.median(self.write_ms or [np.nan])), 1)
        if self.error_samples:
            out["error_samples"] = self.error_samples[:5]
        return out


def ensure_catalog(home: Path, model: str | None) -> dict:
    from lookalike.engine import Engine

    if not CATALOG.exists():
        sys.exit(f"fashion-footwear catalog not found: {CATALOG.resolve()}")
    with Engine.open(home, model=model) as engine:
        report = engine.index([], metadata=CATALOG, progress=True)
        print(report.summary(), file=sys.stderr)
        return engine.info()


def forward_pass_cpu_ms(home: Path, queries: list[tuple[str, bytes]], n: int = 40) -> float:
    """CPU time of one encoder forward pass on one thread, as the server runs it (the
    process's CPU time, so other jobs on the machine hardly change it)."""
    from lookalike.api import tune_encoder_for_serving
    from lookalike.engine import Engine
    from lookalike.images import load_image

    with Engine.open(home) as engine:
        encoder = engine.encoder
        tune_encoder_for_serving(encoder, 1)
        batches = [np.stack([encoder.prepare(load_image(data))]) for _, data in queries[:n]]
        encoder.embed(batches[0])
        started = time.process_time()
        for batch in batches:
            encoder.embed(batch)
        return (time.process_time() - started) * 1000 / len(batches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    home: Path, key: str, slots: int | None, threads: int | None, log_path: Path
) -> tuple:
    port = free_port()
    env = {**os.environ, "LOOKALIKE_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    if slots:
        env["LOOKALIKE_MAX_CONCURRENT_SEARCHES"] = str(slots)
    if threads is not None:
        env["LOOKALIKE_ENCODER_THREADS"] = str(threads)
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookalike", "--home", str(home), "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    sys.exit(f"server not ready after 300 s; see {log_path}")


def load_queries(limit: int) -> list[tuple[str, bytes]]:
    files = sorted(QUERIES.glob("*.jpg"))[:limit]
    if not files:
        sys.exit(f"no query photos in {QUERIES.resolve()}")
    return [(f.name, f.read_bytes()) for f in files]


def run_phase(
    base: str,
    phase: Phase,
    queries: list[tuple[str, bytes]],
    k: int,
    key: str | None = None,
    write_photos: list[bytes] | None = None,
) -> Phase:
    counter = iter(range(10**9))
    lock = threading.Lock()
    stop_writes = threading.Event()
    budget = phase.requests
    phase.requests = 0

    def next_index() -> int | None:
        with lock:
            i = next(counter)
        return i if i < budget else None

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            for warm in range(2):  # connection set up, not measured
                name, data = queries[warm % len(queries)]
                http.post("/search", files={"image": (name, data, "image/jpeg")}, data={"k": k})
            while (i := next_index()) is not None:
                name, data = queries[i % len(queries)]
                started = time.perf_counter()
                try:
                    r = http.post(
                        "/search", files={"image": (name, data, "image/jpeg")}, data={"k": k}
                    )
                    ms = (time.perf_counter() - started) * 1000
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                except Exception as exc:  # a benchmark counts failures, it does not stop
                    ms, ok, r = (time.perf_counter() - started) * 1000, False, exc
                with lock:
                    phase.requests += 1
                    phase.latencies_ms.append(ms)
                    if ok:
                        phase.server_ms.append(r.json()["took_ms"])
                    else:
                        phase.errors += 1
                        detail = r.text[:200] if isinstance(r, httpx.Response) else repr(r)
                        phase.error_samples.append(detail)

    def writer() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        n = 0
        with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
            while not stop_writes.is_set():
                photo = write_photos[n % len(write_photos)]
                pid = f"bench-churn-{n}"
                n += 1
                started = time.perf_counter()
                added = http.post(
                    "/products",
                    data={"product_id": pid, "title": "churn", "category": "Heels"},
                    files={"images": ("p.jpg", photo, "image/jpeg")},
                )
                removed = http.delete(f"/products/{pid}") if added.status_code == 201 else None
                ms = (time.perf_counter() - started) * 1000
                with lock:
                    if (
                        added.status_code == 201
                        and removed is not None
                        and removed.status_code == 204
                    ):
                        phase.writes += 2
                        phase.write_ms.append(ms / 2)
                    else:
                        phase.write_errors += 1
                        phase.error_samples.append(f"write: {added.status_code} {added.text[:200]}")

    phase.load_before = os.getloadavg()[0]
    threads = [threading.Thread(target=client) for _ in range(phase.clients)]
    write_thread = threading.Thread(target=writer) if write_photos else None
    started = time.perf_counter()
    if write_thread:
        write_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.seconds = time.perf_counter() - started
    stop_writes.set()
    if write_thread:
        write_thread.join()
    phase.load_after = os.getloadavg()[0]
    return phase


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="catalog home to (re)use (default: a folder per model in the system temp dir)",
    )
    parser.add_argument(
        "--model", default=None, help="encoder to index with (default: the engine's default)"
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=300, help="requests per phase")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-churn", action="store_true", help="skip the add/delete phase")
    parser.add_argument(
        "--search-slots", type=int, default=None, help="server's LOOKALIKE_MAX_CONCURRENT_SEARCHES"
    )
    parser.add_argument(
        "--encoder-threads",
        type=int,
        default=None,
        help="server's LOOKALIKE_ENCODER_THREADS (-1: the engine's own ORT session)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    if args.home is None:
        bench_dir = Path(tempfile.gettempdir()) / "lookalike-bench-api"
        args.home = bench_dir / ("home" if args.model is None else f"home-{args.model}")
    args.home.mkdir(parents=True, exist_ok=True)
    info = ensure_catalog(args.home, args.model)
    queries = load_queries(300)
    forward_ms = forward_pass_cpu_ms(args.home, queries)
    print(f"encoder forward pass: {forward_ms:.1f} ms CPU per image on 1 thread", file=sys.stderr)
    key = secrets.token_urlsafe(16)
    log_path = args.home.parent / f"serve-{args.home.name}.log"
    proc, base = start_server(args.home, key, args.search_slots, args.encoder_threads, log_path)
    write_photos = [data for _, data in queries[-20:]]
    phases: list[Phase] = []
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            phase = run_phase(
                base, Phase(f"{clients} clients", clients, args.requests), queries, args.k
            )
            phases.append(phase)
            print(json.dumps(phase.summary()), file=sys.stderr)
        if not args.no_churn:
            phase = run_phase(
                base,
                Phase("4 clients + add/delete", 4, args.requests),
                queries,
                args.k,
                key=key,
                write_photos=write_photos,
            )
            phases.append(phase)
            print(json.dumps(phase.summary()), file=sys.stderr)
        total = httpx.get(base + "/products", params={"limit": 1}).json()["total"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    env = machine()
    print(
        f"\nPOST /search, k={args.k}, catalog: {info['products']:,} products / {info['images']:,}"
        f" images, model {info['model']}, {env['cores']} cores ({env['cpu']}),"
        f" search slots {args.search_slots or 'default (cores)'},"
        " encoder threads "
        + ("default (cores / slots)" if args.encoder_threads is None else str(args.encoder_threads))
    )
    print(
        "| phase | requests | errors | p50 ms | p90 ms | p99 ms | max ms | server p50 ms"
        " | req/s | load avg (1 min) before/after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase in phases:
        s = phase.summary()
        name = s["phase"]
        if "writes" in s:
            name += (
                f" ({s['writes']} writes, {s['write_errors']} failed, p50 {s['write_p50_ms']} ms)"
            )
        print(
            f"| {name} | {s['requests']} | {s['errors']} | {s['p50_ms']} | {s['p90_ms']} |"
            f" {s['p99_ms']} | {s['max_ms']} | {s['server_p50_ms']} | {s['req_per_s']} |"
            f" {s['load_avg_1m'][0]} / {s['load_avg_1m'][1]} |"
        )
    print(f"catalog after the run: {total:,} products (churn products all removed)")
    print(f"encoder forward pass alone: {forward_ms:.1f} ms of CPU per image on one thread")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": env,
                    "catalog": {k: info[k] for k in ("products", "images", "model")},
                    "k": args.k,
                    "forward_pass_cpu_ms": round(forward_ms, 2),
                    "search_slots": args.search_slots,
                    "encoder_threads": args.encoder_threads,
                    "phases": [p.summary() for p in phases],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
