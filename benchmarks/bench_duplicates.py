"""Duplicate detection on real catalog photos with planted copies, beside imagededup.

    .venv/bin/python benchmarks/bench_duplicates.py \
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
(copies follow their original); thresholds are chosen on the `tune` half and the figures
are for the `test` half only: lookalike's is the most permissive whose tune precision
reaches 0.99 (the default of `lookalike duplicates`), imagededup's the distance with
its best tune F1 (the rule most favourable to it).
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

PRECISION = 0.99  # lookalike's threshold rule on the tune half
_PIXELS: dict[Path, np.ndarray] = {}


def _pixels(path: Path) -> np.ndarray:
    if path not in _PIXELS:
        _PIXELS[path] = np.asarray(Image.open(path).convert("RGB"), np.int16)
    return _PIXELS[path]


class Truth:
    """Who duplicates whom. Families: an original, its copies, and the originals that
    are its pixel twins (found among the pairs any method reported: same size, mean
    absolute pixel difference <= 4)."""

    def __init__(self, items: list[dup_data.Item]):
        self.items = items
        self.index = {it.product_id: i for i, it in enumerate(items)}
        self.source = np.array([self.index[it.source] for it in items])
        self.copy = np.array([bool(it.transform) for it in items])
        self.split = np.array([dup_data.split_of(it.source) for it in items])
        self.transform = np.array([it.transform for it in items])
        self.family = self.source.copy()
        self._sizes: dict[int, tuple[int, int]] = {}

    def _size(self, i: int) -> tuple[int, int]:
        if i not in self._sizes:
            self._sizes[i] = Image.open(self.items[i].path).size
        return self._sizes[i]

    def add_twins(self, pairs: np.ndarray) -> int:
        """Merge the families of sampled originals with their pixel twins among `pairs`."""
        a, b = pairs[:, 0], pairs[:, 1]
        mixed = self.copy[a] != self.copy[b]
        copy_side = np.where(self.copy[a], a, b)[mixed]
        other = np.where(self.copy[a], b, a)[mixed]
        src = self.source[copy_side]
        todo = {(int(x), int(y)) for x, y in zip(src, other, strict=True) if x != y}
        twins = 0
        for x, y in sorted(todo):
            if self._size(x) == self._size(y):
                if (
                    float(np.abs(_pixels(self.items[x].path) - _pixels(self.items[y].path)).mean())
                    <= 4
                ):
                    self.family[self.family == self.family[y]] = self.family[x]
                    twins += 1
        return twins

    def positives(self, split: str) -> dict[str, int]:
        """True pairs with at least one copy in the split, 'all' and by transformation."""
        members = np.nonzero(self.split == split)[0]
        return _count_pairs(self, [members[self.family[members] == f] for f in
                                   np.unique(self.family[members])])  # fmt: skip


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def _count_pairs(truth: Truth, groups: list[np.ndarray]) -> dict[str, int]:
    """Pairs inside each group that involve a copy: 'all', and per transformation those
    with at least one endpoint copied with it."""
    out: dict[str, int] = {"all": 0}
    for g in groups:
        n = g.size
        originals = int((~truth.copy[g]).sum())
        out["all"] += _pairs(n) - _pairs(originals)
        names, counts = np.unique(truth.transform[g][truth.copy[g]], return_counts=True)
        for name, m in zip(names.tolist(), counts.tolist(), strict=True):
            out[name] = out.get(name, 0) + _pairs(n) - _pairs(n - m)
    return out


def components(n: int, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Connected components (size >= 2) of the graph with these edges."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[ry] = rx
    roots = np.array([find(i) for i in range(n)])
    order = np.argsort(roots, kind="stable")
    cuts = np.nonzero(np.diff(roots[order]))[0] + 1
    return [g for g in np.split(order, cuts) if g.size > 1]


def evaluate(truth: Truth, scored: np.ndarray, threshold: float, split: str) -> dict:
    """scored: rows (a, b, score), higher = more surely a duplicate; pairs are closed
    into groups (union-find) as `lookalike duplicates` reports them."""
    a, b = scored[:, 0].astype(np.int64), scored[:, 1].astype(np.int64)
    keep = (scored[:, 2] >= threshold) & (truth.split[a] == split) & (truth.split[b] == split)
    groups = components(len(truth.items), a[keep], b[keep])
    found = _count_pairs(truth, groups)
    good = _count_pairs(
        truth, [g[truth.family[g] == f] for g in groups for f in np.unique(truth.family[g])]
    )
    positives = truth.positives(split)
    rows: dict[str, dict] = {}
    for key, total in positives.items():
        tp, reported = good.get(key, 0), found.get(key, 0)
        p = tp / reported if reported else 1.0
        r = tp / total if total else 1.0
        rows[key] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
    rows["all"]["original_pairs"] = sum(_pairs(int((~truth.copy[g]).sum())) for g in groups)
    return rows


def best_threshold(truth: Truth, scored: np.ndarray, grid, precision: float | None) -> float:
    """On the tune half: with `precision`, the most permissive threshold whose precision
    reaches it (a review tool: a missed copy costs more than a pair to dismiss); else, or
    when none reaches it, the one with the best F1."""
    best = (-1.0, grid[0])
    permissive = None
    for t in grid:
        row = evaluate(truth, scored, t, "tune")["all"]
        if row["f1"] > best[0]:
            best = (row["f1"], t)
        if precision is not None and permissive is None and row["precision"] >= precision:
            permissive = t
    return permissive if permissive is not None else best[1]


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
    ap.add_argument("--max-distance", type=int, default=12)
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument(
        "--reuse-lookalike",
        action="store_true",
        help="take lookalike's scored pairs from an earlier run on the same data",
    )
    ap.add_argument(
        "--reuse-imagededup",
        action="store_true",
        help="take imagededup's pairs from an earlier run on the same files",
    )
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if (workdir / "home").exists() and not args.reuse_lookalike:
        import shutil

        shutil.rmtree(workdir / "home")
    items = dup_data.build(workdir / "data", n_sources=args.sources)
    truth = Truth(items)
    print(
        f"# {len(items)} images ({sum(truth.copy)} planted copies of {args.sources} originals)"
        f" on {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    saved = workdir / "lookalike-pairs.json"
    if args.reuse_lookalike and saved.exists():
        scored, timing = json.loads(saved.read_text())  # an earlier run on the same data
    else:
        scored, timing = run_lookalike(workdir / "home", items, truth)
        saved.write_text(json.dumps([scored, timing]))
    methods = {"lookalike": (scored, timing)}
    if args.dedup_python:
        dedup = run_imagededup(
            args.dedup_python, items, workdir, args.max_distance, args.reuse_imagededup
        )
        for name, res in dedup.items():
            pairs = np.asarray(res.pop("pairs"), dtype=np.float64).reshape(-1, 3)
            pairs[:, 2] *= -1  # a distance: higher score = closer
            methods[f"imagededup {name}"] = (
                pairs,
                {"seconds": res["encode_seconds"] + res["search_seconds"], **res},
            )
    arrays = {k: np.asarray(v[0], dtype=np.float64).reshape(-1, 3) for k, v in methods.items()}
    # twin candidates: what either side calls very close (not the loosest settings)
    close = [x[x[:, 2] >= (0.9 if k == "lookalike" else -4), :2] for k, x in arrays.items()]
    twins = truth.add_twins(np.concatenate(close).astype(np.int64))
    print(f"# pixel twins among the originals, joined to their families: {twins}")
    results = {}
    for name, (_, tim) in methods.items():
        pairs = arrays[name]
        if name == "lookalike":
            grid = [round(x, 3) for x in np.arange(0.80, 0.9951, 0.0025)]
        else:
            grid = [-float(d) for d in range(args.max_distance, -1, -1)]
        rule = PRECISION if name == "lookalike" else None  # imagededup: its best F1
        threshold = best_threshold(truth, pairs, grid, rule)
        rows = evaluate(truth, pairs, threshold, "test")
        results[name] = {"threshold": threshold, "rows": rows, "seconds": tim["seconds"]}
        extra = ""
        if name == "lookalike":
            extra = (
                f" ({tim['pairs']:,} candidate pairs in {tim['candidates_s']:.1f} s, verified in"
                f" {tim['verify_s']:.1f} s; indexing beforehand {tim['index_s']:.1f} s)"
            )
        if name == "lookalike":
            label = f"score >= {threshold} (the most permissive with precision >= {PRECISION}"
        else:
            label = f"distance <= {-threshold:g} (the best F1"
        print(f"\n## {name}: {label} on the tune half)")
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
