"""Reliability figures of the API side (issue 12), each against a real `lookalike serve`
subprocess (tests/live_server.py) on a copy of a home indexed from ../shared/data:

- hostile: every kind in tests/hostile_uploads.py (bombs in each supported format,
  truncations, wrong types, polyglots) to POST /search and POST /products; statuses,
  5xx count, the server's RSS before and its peak RSS (VmHWM) after;
- load: 16 concurrent keep-alive clients searching for 60 s (real photos from
  footwear300) while a writer adds and deletes products through the API; errors and
  client-side p50/p90/p99/max latency;
- schema: schemathesis against the live server's /openapi.json (checks: no 5xx, status
  code, content type, headers and response-schema conformance);
- fuzz: the hypothesis properties of tests/test_fuzz_inputs.py with more examples.

    .venv/bin/python benchmarks/bench_reliability_api.py
    ... --only hostile,schema --seconds 30 --clients 16 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_api import machine  # noqa: E402
from hostile_uploads import hostile_uploads  # noqa: E402
from live_server import LiveServer  # noqa: E402

DATA = ROOT / "../shared/data"
FASHION = DATA / "fashion-footwear"
QUERIES = DATA / "footwear300" / "data"
KEY = "bench-reliability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORK = Path(os.environ.get("LOOKALIKE_BENCH_DIR") or "/tmp/lookalike-bench-relapi")


def base_home(products: int) -> Path:
    """A home indexed from the first `products` fashion-footwear products (kept)."""
    from lookalike.engine import Engine

    home = WORK / f"home-{products}"
    if (home / "ready").exists():
        return home
    with open(FASHION / "catalog.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:products]
    meta = WORK / f"meta-{products}.csv"
    WORK.mkdir(parents=True, exist_ok=True)
    with meta.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": str((FASHION / row["image"]).resolve())})
    with Engine.open(home) as engine:
        report = engine.index([], metadata=meta, progress=False)
        assert report.ok, report.summary()
    (home / "ready").write_text("")
    return home


def fresh_copy(home: Path, name: str) -> Path:
    copy = WORK / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(home, copy)
    return copy


# ----------------------------------------------------------------- hostile uploads


def run_hostile(home: Path) -> dict:
    kinds = hostile_uploads(WORK / "hostile-cache")
    rows, server_errors, unexpected = [], 0, 0
    with LiveServer(fresh_copy(home, "hostile-home"), {"LOOKALIKE_API_KEY": KEY}) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            client.get("/healthz")
            before = server.memory_kb()
            server.reset_peak()
            for kind in kinds:
                upload = (kind.filename, kind.data, kind.content_type)
                started = time.perf_counter()
                search = client.post("/search", files={"image": upload}).status_code
                add = client.post(
                    "/products",
                    files={"images": upload},
                    data={"product_id": f"hostile-{kind.name}"},
                    headers=AUTH,
                ).status_code
                took = (time.perf_counter() - started) * 1000
                alive = client.get("/healthz").status_code == 200
                server_errors += (search >= 500) + (add >= 500) + (not alive)
                unexpected += (search not in kind.expect) + (add not in kind.expect)
                rows.append(
                    {
                        "kind": kind.name,
                        "bytes": len(kind.data),
                        "search": search,
                        "add": add,
                        "ms": round(took, 1),
                    }
                )
            after = server.memory_kb()
    return {
        "kinds": len(kinds),
        "requests": 2 * len(kinds),
        "server_errors_5xx": server_errors,
        "unexpected_status": unexpected,
        "rss_before_mb": round(before["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(after["VmHWM"] / 1024, 1),
        "peak_growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
        "rows": rows,
    }


# ------------------------------------------------------------- load during writes


def run_load(home: Path, clients: int, seconds: float) -> dict:
    photos = sorted(QUERIES.glob("*.jpg"))
    queries = [p.read_bytes() for p in photos[:64]]
    writes = [p.read_bytes() for p in photos[64:]]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    write_ms: list[float] = []
    write_errors: list[str] = []
    stop = threading.Event()

    def searcher(n: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            i = n
            while not stop.is_set():
                data = queries[i % len(queries)]
                i += clients
                started = time.perf_counter()
                try:
                    r = client.post(
                        "/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": 10}
                    )
                    if r.status_code != 200 or not r.json()["results"]:
                        errors.append(f"{r.status_code} {r.text[:120]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                latencies[n].append((time.perf_counter() - started) * 1000)

    def writer(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            i = 0
            while not stop.is_set():
                pid = f"load-{i}"
                files = {"images": ("w.jpg", writes[i % len(writes)], "image/jpeg")}
                for method, path, kw in (
                    ("POST", "/products", {"files": files, "data": {"product_id": pid}}),
                    ("PATCH", f"/products/{pid}", {"json": {"title": "t"}}),
                    ("DELETE", f"/products/{pid}", {}),
                ):
                    started = time.perf_counter()
                    try:
                        r = client.request(method, path, headers=AUTH, **kw)
                        if r.status_code >= 300:
                            write_errors.append(f"{r.status_code} {r.text[:120]}")
                    except httpx.HTTPError as exc:
                        write_errors.append(repr(exc))
                    write_ms.append((time.perf_counter() - started) * 1000)
                i += 1

    with LiveServer(fresh_copy(home, "load-home"), {"LOOKALIKE_API_KEY": KEY}) as server:
        load_before = os.getloadavg()[0]
        threads = [threading.Thread(target=searcher, args=(n, server.url)) for n in range(clients)]
        threads.append(threading.Thread(target=writer, args=(server.url,)))
        started = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        peak = server.memory_kb()["VmHWM"]
    lat = np.asarray([x for per in latencies for x in per] or [np.nan])
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "searches": int(lat.size),
        "search_errors": len(errors),
        "error_samples": errors[:5],
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "searches_per_s": round(lat.size / elapsed, 1),
        "writes": len(write_ms),
        "write_errors": len(write_errors),
        "write_error_samples": write_errors[:5],
        "write_p50_ms": round(float(np.percentile(write_ms or [np.nan], 50)), 1),
        "server_peak_rss_mb": round(peak / 1024, 1),
        "load_avg_before": round(load_before, 2),
    }


# ------------------------------------------------------------------- schemathesis

SCHEMA_CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)


def run_schema(home: Path, examples: int, seed: int) -> dict:
    cli = Path(sys.executable).with_name("schemathesis")
    with LiveServer(fresh_copy(home, "schema-home"), {"LOOKALIKE_API_KEY": KEY}) as server:
        command = [
            str(cli), "run", server.url + "/openapi.json",
            "--checks", SCHEMA_CHECKS,
            "--header", f"Authorization: Bearer {KEY}",
            "--max-examples", str(examples),
            "--seed", str(seed),
            "--workers", "1",
            "--no-color",
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        elapsed = time.perf_counter() - started
    out = done.stdout + done.stderr
    generated = re.search(r"(\d+) generated", out)
    failed = re.search(r"(\d+) unique failures", out)
    failures = re.findall(r"^- (.+)$", out, flags=re.M)
    (WORK / "schemathesis.log").write_text(out)
    return {
        "command": "schemathesis run URL/openapi.json --checks "
        + SCHEMA_CHECKS
        + f" --max-examples {examples} --seed {seed} --workers 1 -H 'Authorization: Bearer …'",
        "exit_code": done.returncode,
        "operations": (re.search(r"Tested: (\d+)", out) or [None, "?"])[1],
        "test_cases": int(generated[1]) if generated else None,
        "unique_failures": int(failed[1]) if failed else 0,
        "failure_kinds": sorted(set(failures))[:20],
        "seconds": round(elapsed, 1),
        "log": str(WORK / "schemathesis.log"),
    }


# ------------------------------------------------------------------------ fuzzing


def run_fuzz(examples: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LOOKALIKE_FUZZ_EXAMPLES": str(examples)}
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests/test_fuzz_inputs.py"),
               "-p", "no:cacheprovider", "-W", "ignore",
               "--hypothesis-show-statistics"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - started
    out = done.stdout + done.stderr
    (WORK / "fuzz.log").write_text(out)
    summary = re.findall(r"(\d+) (passed|failed|error)", out)
    tests = re.findall(r"test_fuzz_inputs.py::(\w+):", out)
    counts = re.findall(r"(\d+) passing, (\d+) failing, and (\d+) invalid", out)
    return {
        "examples_per_test": examples,
        "property_tests": len(tests),
        "examples_passing": sum(int(c[0]) for c in counts),
        "examples_failing": sum(int(c[1]) for c in counts),
        "examples_invalid": sum(int(c[2]) for c in counts),
        "result": {kind: int(n) for n, kind in summary},
        "exit_code": done.returncode,
        "seconds": round(elapsed, 1),
        "log": str(WORK / "fuzz.log"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="hostile,load,schema,fuzz")
    parser.add_argument("--products", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--schema-examples", type=int, default=100)
    parser.add_argument("--fuzz-examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    out: dict = {"machine": machine()}
    home = base_home(args.products) if parts - {"fuzz"} else None
    if "hostile" in parts:
        out["hostile"] = run_hostile(home)
        print(json.dumps({k: v for k, v in out["hostile"].items() if k != "rows"}))
        for row in out["hostile"]["rows"]:
            print(f"  {row['kind']:<22} {row['bytes']:>10,} B  search {row['search']}"
                  f"  add {row['add']}  {row['ms']:>8.1f} ms")  # fmt: skip
    if "load" in parts:
        out["load"] = run_load(home, args.clients, args.seconds)
        print(json.dumps(out["load"]))
    if "schema" in parts:
        out["schema"] = run_schema(home, args.schema_examples, args.seed)
        print(json.dumps(out["schema"]))
    if "fuzz" in parts:
        out["fuzz"] = run_fuzz(args.fuzz_examples)
        print(json.dumps(out["fuzz"]))
    out["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out["machine"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
