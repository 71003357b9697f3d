"""Batch ingest rate of real product photos, with an interruption and a resume.

Runs the real `lookalike index` command (both cores: decoding threads beside ONNX
Runtime) on the fashion-footwear catalog (2,836 photos + metadata), kills it with
SIGKILL part-way (a crash, not a clean stop), runs the same command again and checks
that the second run only embeds what the first did not commit, and that the catalog
and the vector store end up complete and consistent.

    python benchmarks/bench_scale_ingest.py [--images 2836] [--kill-at 0.4]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / "../shared/data").resolve()


def subset(n: int, folder: Path) -> tuple[Path, Path]:
    """Symlinks to the first n fashion-footwear photos and their metadata rows (the data
    stays where it is)."""
    src = DATA / "fashion-footwear"
    images = folder / "images"
    images.mkdir(parents=True)
    with open(src / "catalog.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    for row in rows:
        (images / Path(row["image"]).name).symlink_to(src / row["image"])
    meta = folder / "catalog.csv"
    with open(meta, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for row in rows:
            w.writerow({**row, "image": str(images / Path(row["image"]).name)})
    return images, meta


def cli(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lookalike", "--home", str(home), "-q", *args]


def info(home: Path) -> dict:
    out = subprocess.run(cli(home, "info", "--json"), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def embedded(home: Path) -> int:
    """Images with a committed vector in the catalog (read-only, while ingest runs)."""
    db = home / "catalog.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM images WHERE vector IS NOT NULL").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2836)
    ap.add_argument(
        "--kill-at", type=float, default=0.4, help="SIGKILL once this fraction is committed"
    )
    ap.add_argument("--model", default=None, help="encoder spec (default: lookalike's)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory(prefix="lk-ingest-") as tmp:
        tmp_path = Path(tmp)
        images, meta = subset(args.images, tmp_path / "data")
        home = tmp_path / "home"
        base = cli(home, *(["--model", args.model] if args.model else []))
        # warm the model cache (ONNX export happens once a machine) outside the timing
        subprocess.run(base + ["info"], env=env, capture_output=True)
        cmd = base + ["index", str(images), "--metadata", str(meta), "--json"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        killed = False
        while proc.poll() is None:
            time.sleep(0.5)
            if embedded(home) >= args.kill_at * args.images:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
        first_s = time.perf_counter() - t0
        committed = embedded(home)
        t1 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        second_s = time.perf_counter() - t1
        if done.returncode != 0:
            raise SystemExit(f"resume failed: {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        final = info(home)
    total_s = first_s + second_s
    vectors = final.get("vector_store", {}).get("vectors")
    print(
        f"# {args.images} fashion-footwear photos, {os.cpu_count()} CPUs "
        f"({platform.machine()}), load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"first run: {'killed (SIGKILL)' if killed else 'finished'} after {first_s:.1f} s, "
        f"{committed} images committed ({committed / first_s:.1f} images/s)"
    )
    print(
        f"resume: {second_s:.1f} s, embedded {report.get('encoded')} (the rest were committed "
        f"before the kill: unchanged {report.get('unchanged')}); "
        f"{report.get('images_per_second')} images/s by its own count"
    )
    print(f"final catalog: {final.get('images')} images, vector store {vectors} vectors")
    print(f"overall: {args.images / total_s:.1f} images/s ({total_s:.0f} s wall, both runs)")


if __name__ == "__main__":
    main()
