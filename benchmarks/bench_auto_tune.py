"""`serve --keep-photos N --tune-every T` end to end, and what its tune costs the searches:
a real `lookalike serve` on a fresh grocery home (81 products), sent MIN_TO_TUNE distinct
shopper photos (grocery train.csv, never val.csv) back to back by one client; the last of
them starts the tune (`tune --photos HOME/query-photos` in a child process at nice 10).
Before that last photo, the same photos are searched again (kept already: no keep, no
count), 500 of them, as the base line. After it, the client goes on searching back to back
(photos kept already) until `/readyz` says the server's model is tuned, then 500 searches
more.

Prints search latency p50 / p90 while keeping new photos, before the tune (the base model,
nothing running beside it), while the child tunes, and after (the tuned model); the
tune's wall time from the photo that started it to the first search on the new model; and
the server's log lines about it.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_auto_tune.py
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GROCERY = ROOT / "../shared/data/grocery"

from live_server import LiveServer  # noqa: E402

from lookalike.engine import Engine  # noqa: E402
from lookalike.keptphotos import MIN_TO_TUNE  # noqa: E402


def _line(name: str, t: list[float]) -> str:
    a = np.array(t)
    return (
        f"{name:>7}: {len(a):5} searches, p50 {np.percentile(a, 50):5.1f} ms,"
        f" p90 {np.percentile(a, 90):5.1f} ms"
    )


def main() -> int:
    with (GROCERY / "train.csv").open(newline="") as fh:
        photos = [GROCERY / r["image"] for r in csv.DictReader(fh)][:MIN_TO_TUNE]
    assert len(photos) == MIN_TO_TUNE, "grocery train.csv has too few photos"
    times: dict[str, list[float]] = {"keeping": [], "before": [], "during": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        with Engine.open(home) as engine:
            engine.index([], metadata=GROCERY / "catalog.csv", progress=False)
        env = {"LOOKALIKE_KEEP_PHOTOS": str(MIN_TO_TUNE), "LOOKALIKE_TUNE_EVERY": str(MIN_TO_TUNE)}
        with LiveServer(home, env=env) as server, httpx.Client(timeout=120) as client:

            def search(photo: Path, phase: str) -> None:
                started = time.perf_counter()
                r = client.post(
                    server.url + "/search", files={"image": (photo.name, photo.read_bytes())}
                )
                times[phase].append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200, r.text

            def tuned() -> bool:
                return bool(client.get(server.url + "/readyz").json().get("tuned"))

            for photo in photos[:-1]:
                search(photo, "keeping")
            for j in range(500):
                search(photos[j], "before")
            started = time.perf_counter()
            search(photos[-1], "during")  # the MIN_TO_TUNE-th kept photo: the tune starts
            i = 0
            while not tuned():
                search(photos[i % len(photos)], "during")
                i += 1
                if time.perf_counter() - started > 1800:
                    print(server.output()[-3000:])
                    raise SystemExit("no tuned model after 30 minutes")
            wall = time.perf_counter() - started
            for j in range(500):
                search(photos[j], "after")
            readiness = client.get(server.url + "/readyz").json()
            server.output()  # flushes the log
            lines = server.log_path.read_text(errors="replace").splitlines()
            log = [line for line in lines if "tuning on" in line or "tuned on" in line]
        shutil.rmtree(home, ignore_errors=True)
    for phase, t in times.items():
        print(_line(phase, t))
    print(f"tune: {wall:.0f} s from the photo that started it to the tuned model's first search")
    print(f"readyz: model {readiness.get('model')}, tuned {readiness.get('tuned')},"
          f" tuned on {readiness.get('tuned_on')!r}")  # fmt: skip
    print("server log:", *log[-4:], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
