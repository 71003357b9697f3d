"""What `serve --keep-photos` costs a search: two real `lookalike serve` processes side by
side on copies of one grocery home (81 products), one keeping photos and one not, sent the
same real shopper photos (grocery train.csv, each once) in alternation by one client.

Prints client-side latency p50/p90 for each server and their ratio, the time
`KeptPhotos.keep` takes per photo in this process, and the disk bytes per kept photo.
Keeping runs after the answer is sent (a background task), so the ratio should be ~1.
Then the search latency while `--calibrate-every`'s child process calibrates (another
home, on the kept photos) at nice 10 as it ships, and at normal priority.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_keep_photos.py [--photos 300]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GROCERY = ROOT / "../shared/data/grocery"

from live_server import LiveServer  # noqa: E402

from lookalike.api.autolearn import NICE, AutoLearn  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.keptphotos import KEPT_DIR, KeptPhotos  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=300, help="photos sent to each server")
    args = ap.parse_args()
    with open(GROCERY / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    photos = [GROCERY / r["image"] for r in rows[:: max(1, len(rows) // args.photos)]]
    photos = photos[: args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        with Engine.open(base) as engine:
            engine.index([], metadata=GROCERY / "catalog.csv", progress=False)
        homes = {"off": Path(tmp) / "off", "keep": Path(tmp) / "keep"}
        for home in homes.values():
            shutil.copytree(base, home)
        times: dict[str, list[float]] = {"off": [], "keep": []}
        env = {"off": {"LOOKALIKE_KEEP_PHOTOS": "0"}, "keep": {"LOOKALIKE_KEEP_PHOTOS": "100000"}}
        with (
            LiveServer(homes["off"], env=env["off"]) as off,
            LiveServer(homes["keep"], env=env["keep"]) as keep,
            httpx.Client(timeout=60) as client,
        ):
            servers = {"off": off, "keep": keep}
            warm = photos[0].read_bytes()  # the first photo, kept once: warms both servers
            for _ in range(10):
                for server in servers.values():
                    client.post(server.url + "/search", files={"image": ("w.jpg", warm)})
            for i, photo in enumerate(photos):
                data = photo.read_bytes()
                order = ("off", "keep") if i % 2 else ("keep", "off")
                for name in order:
                    started = time.perf_counter()
                    r = client.post(
                        servers[name].url + "/search", files={"image": (photo.name, data)}
                    )
                    times[name].append((time.perf_counter() - started) * 1000)
                    assert r.status_code == 200, r.text
            time.sleep(1.0)  # the last background keep
            # searches while `--calibrate-every` calibrates in its child process (nice 10,
            # as AutoLearn starts it) and, for comparison, at normal priority
            during = {}
            for nice in (NICE, 0):
                kept_there = KeptPhotos(homes["keep"] / KEPT_DIR, 10**6)
                calibrating = AutoLearn(base, kept_there, calibrate_every=1, nice=nice)
                calibrating.photo_kept()  # >= MIN_TO_CALIBRATE kept there: it starts
                during[nice] = []
                i = 0
                while calibrating._proc is not None:
                    photo = photos[i % len(photos)]
                    started = time.perf_counter()
                    r = client.post(
                        off.url + "/search", files={"image": (photo.name, photo.read_bytes())}
                    )
                    during[nice].append((time.perf_counter() - started) * 1000)
                    i += 1
                calibrating.close()
                assert calibrating.last["calibrate"], "the calibration failed"
        kept = sorted((homes["keep"] / KEPT_DIR).rglob("*.jpg"))
        disk = sum(p.stat().st_size for p in kept)
        # the keep itself, in this process: decode is the server's, so time only the keep
        direct = KeptPhotos(Path(tmp) / "direct", 100000)
        imgs = [Image.open(p).convert("RGB") for p in photos[:100]]
        started = time.perf_counter()
        for i, img in enumerate(imgs):
            direct.keep(img, f"{i:016x}")
        per_keep = (time.perf_counter() - started) * 1000 / len(imgs)
    for name in ("off", "keep"):
        t = np.array(times[name])
        print(
            f"{name:>5}: {len(t)} searches, p50 {np.percentile(t, 50):.1f} ms,"
            f" p90 {np.percentile(t, 90):.1f} ms"
        )
    for nice, t in during.items():
        print(
            f"during a calibration at nice {nice}: {len(t)} searches, p50"
            f" {np.percentile(t, 50):.1f} ms, p90 {np.percentile(t, 90):.1f} ms"
        )
    ratio = statistics.median(times["keep"]) / statistics.median(times["off"])
    print(f"p50 keep / off: {ratio:.3f}")
    each = disk / max(1, len(kept)) / 1024
    print(f"kept {len(kept)} of {len(photos)} photos, {each:.1f} KiB each")
    print(f"KeptPhotos.keep: {per_keep:.2f} ms a photo (348 px JPEG, quality 90)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
