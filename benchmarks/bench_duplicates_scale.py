"""How the duplicate search scales: stage 1 (candidates from stored vectors) at 100k and 1M.

    .venv/bin/python benchmarks/bench_duplicates_scale.py \
        --n 100000 [--n 1000000] [--dim 1632] [--workdir /tmp/bench-dup-scale]

Encoding a million images is not what is measured here, so generated vectors stand in
for encoded ones: unit vectors around n/50 cluster centres (neighbours within a cluster
have cosine about 0.5, like similar products), and 1% of them planted as near-duplicates
of another vector at cosine 0.78-0.99 (the range bench_duplicates.py measures between real
photos and their transformed copies). They are written once to a float32 file on disk,
read through a memory map the way FaissStore's vector log is (`VectorSource`), and
`lookalike.duplicates.near_pairs` runs on them with its defaults. Each size runs in its
own process, so the peak memory (ru_maxrss) is that size's. Reported: seconds, peak RSS,
candidate pairs, and the recall of the planted pairs whose cosine reaches the default
candidate similarity. Stage 2 (pixel verification of the candidates) needs the image
files, so it is not part of this run; bench_duplicates.py reports its rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lookalike import duplicates  # noqa: E402

CHUNK = 50_000


def generate(path: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Write n vectors to `path` (float32 rows); returns the planted pairs (rows a, b)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 50)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x = centres[rng.integers(0, n_clusters, stop - start)] + noise
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    planted = rng.choice(n, size=(n // 100) * 2, replace=False).reshape(-1, 2)
    for start in range(0, planted.shape[0], CHUNK):
        a, b = planted[start : start + CHUNK, 0], planted[start : start + CHUNK, 1]
        target = rng.uniform(0.78, 0.99, a.size)  # the copy's cosine with its original
        h = rng.standard_normal((a.size, dim), dtype=np.float32)
        base = np.asarray(out[np.sort(a)])[np.argsort(np.argsort(a))]
        h -= (h * base).sum(1, keepdims=True) * base  # orthogonal to the original
        h /= np.linalg.norm(h, axis=1, keepdims=True)
        copy = base * target[:, None] + h * np.sqrt(1 - target**2)[:, None]
        out[b] = copy.astype(np.float32)
    out.flush()
    del out
    return np.sort(planted, axis=1)


class FileVectors:
    """Stored vectors in a float32 .npy file, read through a memory map."""

    def __init__(self, path: Path):
        self.data = np.load(path, mmap_mode="r")

    def ids(self) -> np.ndarray:
        return np.arange(self.data.shape[0], dtype=np.int64)

    def get(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        order = np.argsort(ids, kind="stable")
        rows = np.asarray(self.data[ids[order]])
        out = np.empty_like(rows)
        out[order] = rows
        return out


class AnonPeak:
    """The peak of the process's own memory (RssAnon: not the pages of the memory-mapped
    vector file, which the kernel can drop), sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def one(n: int, dim: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"vectors-{n}-{dim}.npy"
    planted_path = workdir / f"planted-{n}-{dim}.npy"
    if not (path.exists() and planted_path.exists()):
        np.save(planted_path, generate(path, n, dim))
    planted = np.load(planted_path)
    source = FileVectors(path)
    anon = AnonPeak()
    started = time.perf_counter()
    found = duplicates.near_pairs(source)
    seconds = time.perf_counter() - started
    anon_peak = anon.stop()
    vec = source.get(planted.ravel()).reshape(planted.shape[0], 2, dim)
    cos = (vec[:, 0] * vec[:, 1]).sum(1)
    reachable = planted[cos >= duplicates.MIN_SIMILARITY]
    got = set(zip(found.a.tolist(), found.b.tolist(), strict=True))
    hit = sum((int(a), int(b)) in got for a, b in reachable)
    return {
        "n": n,
        "dim": dim,
        "seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
        "peak_anon_gib": anon_peak / (1 << 30),
        "candidates": len(found),
        "planted": int(planted.shape[0]),
        "planted_recall": hit / max(1, len(reachable)),
        "cores": os.cpu_count(),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, action="append", help="catalog sizes (repeatable)")
    ap.add_argument("--dim", type=int, default=1632)
    ap.add_argument("--workdir", default="/tmp/bench-dup-scale")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = args.n or [100_000, 1_000_000]
    if args.one:
        print(json.dumps(one(sizes[0], args.dim, Path(args.workdir))))
        return
    print(
        "| images | seconds | peak RSS (with mapped vector pages) | peak own memory |"
        " candidate pairs | planted pairs found | load |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        cmd = [sys.executable, __file__, "--one", "--n", str(n), "--dim", str(args.dim)]
        res = subprocess.run(cmd + ["--workdir", args.workdir], capture_output=True, text=True)
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"| {n:,} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} GiB |"
            f" {r['peak_anon_gib']:.2f} GiB | {r['candidates']:,} |"
            f" {r['planted_recall']:.4f} of {r['planted']:,} | {r['load']:.1f} |"
        )


if __name__ == "__main__":
    main()
