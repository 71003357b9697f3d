"""Duplicate detection on real catalog photos with planted copies, beside imagededup.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_duplicates.py \
        [--sources 240] [--workdir /tmp/bench-dup] [--dedup-python /tmp/dedup-venv/bin/python]

Data (benchmarks/dup_data.py): every original of ../shared/data's fashion-footwear,
footwear300 and grocery catalogs, plus copies of a sample of them made with each
transformation (re-encode, resize, crop, pad, watermark, mirror, recolour), each copy its
own product. lookalike indexes them with the real Engine and runs
`lookalike.duplicates.find_duplicates`; imagededup's PHash, DHash, WHash and AHash run on
the same files in a separate venv (benchmarks/imagededup_runner.py, docs/duplicates.md).

Scoring. The truth: a copy duplicates its original, the other copies of it, and any
original that is a pixel twin of it (the source catalogs list some photos under two ids:
same size, mean absolute pixel difference <= 4). Scored pairs are those with at least one
planted copy; pairs between two originals are not scored (the catalogs' own duplicates
are unlabelled) but counted. Every method's pairs are closed into groups (union-find),
as `lookalike duplicates` reports them. Originals are split in two by a hash of their id
(copies follow their original): each method's threshold is the one with the best F1 on
the `tune` half, and the figures are for the `test` half only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
import dup_data  # noqa: E402

from lookalike import duplicates  # noqa: E402
from lookalike.engine import Engine  # noqa: E402


def pixel_twins(a: Path, b: Path) -> bool:
    x, y = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
    if x.size != y.size:
        return False
    diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
    return float(diff.mean()) <= 4.0


class Truth:
    def __init__(self, items: list[dup_data.Item]):
        self.items = items
        self.index = {it.product_id: i for i, it in enumerate(items)}
        self.source = [self.index[it.source] for it in items]
        self.copy = [bool(it.transform) for it in items]
        self.split = [dup_data.split_of(it.source) for it in items]
        self._twins: dict[tuple[int, int], bool] = {}

    def twins(self, a: int, b: int) -> bool:
        key = (min(a, b), max(a, b))
        if a == b:
            return True
        if key not in self._twins:
            self._twins[key] = pixel_twins(self.items[a].path, self.items[b].path)
        return self._twins[key]

    def same(self, a: int, b: int) -> bool:
        return self.twins(self.source[a], self.source[b])

    def positives(self, split: str, pairs_seen: set[tuple[int, int]]) -> dict[str, int]:
        """True pairs in the split (at least one copy), by transformation ('all' too)."""
        families: dict[int, list[int]] = {}
        for i, s in enumerate(self.source):
            if self.split[i] == split:
                families.setdefault(s, []).append(i)
        # twins of a sampled original join its family
        for a, b in pairs_seen:
            for x, y in ((a, b), (b, a)):
                if not self.copy[x] and self.copy[y] and self.split[x] == split:
                    src = self.source[y]
                    if x != src and x not in families.get(src, []) and self.twins(src, x):
                        families[src].append(x)
        counts: dict[str, int] = {"all": 0}
        for members in families.values():
            for ai, a in enumerate(members):
                for b in members[ai + 1 :]:
                    if not (self.copy[a] or self.copy[b]):
                        continue
                    counts["all"] += 1
                    for x in {a, b}:
                        if self.copy[x]:
                            t = self.items[x].transform
                            counts[t] = counts.get(t, 0) + 1
        return counts


def closure(pairs: list[tuple[int, int]]) -> set[tuple[int, int]]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    out = set()
    for members in groups.values():
        members.sort()
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                out.add((a, b))
    return out


def evaluate(truth: Truth, scored, threshold: float, split: str, seen) -> dict:
    """scored: (a, b, score) with higher = more surely a duplicate."""
    chosen = [
        (a, b)
        for a, b, s in scored
        if s >= threshold and truth.split[a] == split and truth.split[b] == split
    ]
    found = closure(chosen)
    positives = truth.positives(split, seen)
    tp: dict[str, int] = {}
    fp: dict[str, int] = {}
    originals = 0
    for a, b in found:
        if not (truth.copy[a] or truth.copy[b]):
            originals += 1
            continue
        good = truth.same(a, b)
        for key in {"all"} | {truth.items[x].transform for x in (a, b) if truth.copy[x]}:
            (tp if good else fp)[key] = (tp if good else fp).get(key, 0) + 1
    rows = {}
    for key, total in positives.items():
        t, f = tp.get(key, 0), fp.get(key, 0)
        p = t / (t + f) if t + f else 1.0
        r = t / total if total else 1.0
        rows[key] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
    rows["all"]["original_pairs"] = originals
    return rows


def best_threshold(truth: Truth, scored, candidates, seen) -> float:
    best = (-1.0, candidates[0])
    for t in candidates:
        f1 = evaluate(truth, scored, t, "tune", seen)["all"]["f1"]
        if f1 > best[0]:
            best = (f1, t)
    return best[1]


def run_lookalike(home: Path, items, truth: Truth) -> tuple[list, dict]:
    started = time.perf_counter()
    with Engine(home) as engine:
        engine.index([], metadata=home.parent / "data" / "catalog.csv", progress=False)
        indexed = time.perf_counter() - started
        catalog = engine.catalog
        started = time.perf_counter()
        report = duplicates.find_duplicates(catalog, engine.encoder.stamp, threshold=-1.0)
        seconds = time.perf_counter() - started
        owners = catalog.image_products(
            sorted({p.a for p in report.pairs} | {p.b for p in report.pairs})
        )
    scored = [
        (truth.index[owners[p.a][0]], truth.index[owners[p.b][0]], p.score) for p in report.pairs
    ]
    scored = [(min(a, b), max(a, b), s) for a, b, s in scored]
    timing = {
        "index_s": indexed,
        "seconds": seconds,
        "candidates_s": report.seconds["candidates"],
        "verify_s": report.seconds["verify"],
        "pairs": report.candidates,
    }
    return scored, timing


def run_imagededup(python: str, items, workdir: Path, max_distance: int, reuse: bool) -> dict:
    files = workdir / "files.json"
    listing = json.dumps([str(it.path) for it in items])
    out = workdir / "imagededup.json"
    if reuse and out.exists() and files.exists() and files.read_text() == listing:
        return json.loads(out.read_text())  # the same files, hashed by an earlier run
    files.write_text(listing)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [python, str(HERE / "imagededup_runner.py"), str(files), str(max_distance), str(out)],
        check=True,
        env=env,
    )
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=240)
    ap.add_argument("--workdir", default="/tmp/bench-dup")
    ap.add_argument("--dedup-python", default="/tmp/dedup-venv/bin/python")
    ap.add_argument("--max-distance", type=int, default=24)
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument(
        "--reuse-imagededup",
        action="store_true",
        help="take imagededup's pairs from an earlier run on the same files",
    )
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if (workdir / "home").exists():
        import shutil

        shutil.rmtree(workdir / "home")
    items = dup_data.build(workdir / "data", n_sources=args.sources)
    truth = Truth(items)
    print(
        f"# {len(items)} images ({sum(truth.copy)} planted copies of {args.sources} originals)"
        f" on {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    scored, timing = run_lookalike(workdir / "home", items, truth)
    methods = {"lookalike": (scored, timing)}
    if args.dedup_python:
        dedup = run_imagededup(
            args.dedup_python, items, workdir, args.max_distance, args.reuse_imagededup
        )
        for name, res in dedup.items():
            pairs = [(a, b, -float(d)) for a, b, d in res["pairs"]]
            methods[f"imagededup {name}"] = (
                pairs,
                {"seconds": res["encode_seconds"] + res["search_seconds"], **res},
            )
    seen = {(a, b) for pairs, _ in methods.values() for a, b, _ in pairs}
    results = {}
    for name, (pairs, tim) in methods.items():
        if name == "lookalike":
            grid = [round(x, 3) for x in np.arange(0.70, 0.995, 0.005)]
        else:
            grid = [-float(d) for d in range(args.max_distance, -1, -1)]
        threshold = best_threshold(truth, pairs, grid, seen)
        rows = evaluate(truth, pairs, threshold, "test", seen)
        results[name] = {"threshold": threshold, "rows": rows, "seconds": tim["seconds"]}
        extra = ""
        if name == "lookalike":
            extra = (
                f" ({tim['pairs']:,} candidate pairs in {tim['candidates_s']:.1f} s, verified in"
                f" {tim['verify_s']:.1f} s; indexing beforehand {tim['index_s']:.1f} s)"
            )
        print(f"\n## {name}: threshold {threshold} (best F1 on the tune half)")
        print(f"time {tim['seconds']:.1f} s" + extra)
        print("| transformation | precision | recall | F1 |\n|---|---|---|---|")
        for key in [*dup_data.TRANSFORMS, "all"]:
            r = rows.get(key)
            if r:
                print(f"| {key} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |")
        print(f"original-original pairs reported (not scored): {rows['all']['original_pairs']}")
    ours = results["lookalike"]["rows"]["all"]["f1"]
    others = {k: v["rows"]["all"]["f1"] for k, v in results.items() if k != "lookalike"}
    if others:
        best = max(others, key=others.get)
        print(
            f"\nF1 lookalike {ours:.3f}; best imagededup {best} {others[best]:.3f};"
            f" margin {ours - others[best]:+.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
