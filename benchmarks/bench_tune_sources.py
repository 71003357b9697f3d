"""`lookalike tune` from each source: unlabelled shopper photos (`--photos`) on grocery,
catalog metadata (`--field category`) on fashion-footwear; the figures of docs/quality.md.

    .venv/bin/python benchmarks/bench_tune_sources.py
        [--part all|photos|field] [--selection [--split burst|block] [--split-salt S]]
        [--method auto|finetune|head] [--session-views N] [--photos-field NAME]
        [--set NAME=VALUE ...] [--features-from DIR]
        [--queries 60] [--workdir DIR] [--json FILE]

photos: a home indexed with the grocery catalog is tuned with `photos=[train.csv]` (only
its image column is read) and scored once on val.csv through `Engine.search`, beside a
base home (Recall@1/@5 and category precision@5, the share of the top 5 in the query
product's category); single-query latency of both is timed interleaved (base, tuned, base, ...).
With `--selection` the photos are instead split by burst (a burst is ten consecutive
file numbers of one product; a quarter of the bursts, by a hash of the burst id, are
held out): tuned on the other bursts' images, scored on the held-out bursts; val.csv is
not read. That is the split the method was chosen on; `--split-salt b2` hashes "b2" +
the burst id instead: a second, fresh split to confirm a choice on. `--split block`
holds out, for each product, the last 30 % of its file numbers instead (820 photos): a
later stretch of the capture, the nearest thing train.csv has to another session.
`--session-views N` overrides the tune's `session_views` (lookalike.tuning.augment).
`--photos-field category` tunes on the photos and the catalog's `category` column in one
run, as `tune --photos ... --field category` does. `--set NAME=VALUE` sets a field of
TuneSettings for either part's run (read as its default's type, true/false for a flag; a field whose
default is None, as an int if VALUE is all digits, else a float);
`--features-from DIR` starts the tuned home with the feature cache an earlier `--workdir
DIR` run left (keyed by file content, so only the time changes).

field: fashion-footwear's products are split product-disjointly (a fifth of them, by a
hash of the id, held out). A home indexed with the other 80 % is tuned with
`field="category"`; the held-out products are then indexed (embedded with the tuned
model) and each queries the other held-out products (leave-one-out precision@10 of
category and colour), beside the base model. A second home is tuned on the full catalog
and searched with the red stiletto (footwear300/search_image_01.jpg): how many of its top
10 are Heels and how many Red. Latency of the base and the tuned fashion homes is timed
interleaved on the stiletto and footwear300's product shots (not catalog images, which would
take the content-hash shortcut).

The field part also measures what the catalog's labels allow (`label_ceiling`): each
product's kind as its own title names it (the last of "heels", "flats", "sandals", ...;
`title_kind`), how the category column agrees with it, and the category precision@10 on
the held-out products of a search that knew every product's kind (or brand and kind)
exactly and ranked the products of the query's group first, in random order. The kind is
also an attribute in the homes (`kind`), so base and tuned precision are reported
against it too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lookalike.engine import Engine  # noqa: E402
from lookalike.evaluate import run_leave_one_out  # noqa: E402
from lookalike.tuning import TuneSettings, train_tuned_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import latency  # noqa: E402  (the same interleaved timing as bench_tune)

DATA = ROOT / "../shared/data"
GROCERY = DATA / "grocery"
FASHION = DATA / "fashion-footwear"
STILETTO = DATA / "footwear300" / "search_image_01.jpg"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, fields: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def recall(engine: Engine, rows: list[dict[str, str]]) -> dict[str, float]:
    """Recall@1/@5 of each row's product, and category precision@5: the share of the top 5
    whose catalog category is the row's product's (43 of grocery's categories hold one
    product, the largest 10)."""
    category = {r["product_id"]: r["category"] for r in _rows(GROCERY / "catalog.csv")}
    hits1 = hits5 = same = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        results = engine.search([r["image"] for r in chunk], k=5)
        for row, res in zip(chunk, results, strict=True):
            ids = [r.product_id for r in res]
            hits1 += bool(ids) and ids[0] == row["product_id"]
            hits5 += row["product_id"] in ids
            same += sum(category.get(i) == category[row["product_id"]] for i in ids)
    n = len(rows)
    return {"recall@1": round(hits1 / n, 4), "recall@5": round(hits5 / n, 4),
            "category_precision@5": round(same / (5 * n), 4)}  # fmt: skip


def burst_split(rows: list[dict[str, str]], salt: str = "") -> tuple[list[dict], list[dict]]:
    """(kept, held): bursts of ten consecutive file numbers of one product; a quarter of
    them (by a hash of `salt` + the burst id) held out."""
    kept, held = [], []
    for r in rows:
        burst = f"{r['product_id']}/{(_file_number(r['image']) - 1) // 10}"
        hashed = int(hashlib.md5((salt + burst).encode()).hexdigest(), 16)
        (held if hashed % 4 == 0 else kept).append(r)
    return kept, held


def block_split(
    rows: list[dict[str, str]], held_share: float = 0.3
) -> tuple[list[dict], list[dict]]:
    """(kept, held): for each product, its photos in order of file number; the last
    `held_share` of them held out (the first int((1 - held_share) n) kept)."""
    by_product: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_product.setdefault(r["product_id"], []).append(r)
    kept, held = [], []
    for group in by_product.values():
        group = sorted(group, key=lambda r: _file_number(r["image"]))
        cut = int((1 - held_share) * len(group))
        kept += group[:cut]
        held += group[cut:]
    return kept, held


def _file_number(image: str) -> int:
    return int(re.search(r"_(\d+)\.\w+$", image).group(1))


def bench_photos(work: Path, args: argparse.Namespace) -> dict:
    train = [{**r, "image": str(GROCERY / r["image"])} for r in _rows(GROCERY / "train.csv")]
    if args.selection and args.split == "block":
        photos, queries = block_split(train)
        scored_on = f"each product's last 30 % of train.csv ({len(queries)} photos)"
    elif args.selection:
        photos, queries = burst_split(train, args.split_salt)
        salted = f", salt {args.split_salt!r}" if args.split_salt else ""
        scored_on = f"held-out bursts of train.csv{salted} ({len(queries)} photos)"
    else:
        photos, queries = train, [{**r, "image": str(GROCERY / r["image"])}
                                  for r in _rows(GROCERY / "val.csv")]  # fmt: skip
        scored_on = f"val.csv ({len(queries)} photos)"
    photo_list = _write(work / "photos.csv", ["image"], photos)  # no label column at all
    if args.features_from:  # the feature cache is keyed by file content: safe to share
        shutil.copytree(Path(args.features_from) / "grocery-tuned" / "models" / "features",
                        work / "grocery-tuned" / "models" / "features",
                        dirs_exist_ok=True)  # fmt: skip
    engines = {name: Engine(work / f"grocery-{name}") for name in ("base", "tuned")}
    try:
        for engine in engines.values():
            engine.index([], metadata=GROCERY / "catalog.csv", progress=False)
        before = recall(engines["base"], queries)
        settings = TuneSettings(method=args.method, seed=0)
        if args.session_views is not None:
            settings = replace(settings, session_views=args.session_views)
        overrides = _overrides(args.set)
        settings = replace(settings, **overrides)
        t0 = time.perf_counter()
        report = train_tuned_model(engines["tuned"], photos=[photo_list], progress=True,
                                   field=args.photos_field, settings=settings,
                                   log=print)  # fmt: skip
        seconds = time.perf_counter() - t0
        after = recall(engines["tuned"], queries)
        lat = latency(engines, [q["image"] for q in queries[: args.queries]])
    finally:
        for engine in engines.values():
            engine.close()
    return {"scored_on": scored_on, "unlabelled_photos": report.photos_used,
            "field": args.photos_field, "overrides": overrides,
            "method": report.settings["method"], "base": before, "tuned": after,
            "settings": {k: report.settings[k] for k in ("keep_base", "class_weight",
                                                         "colour_weight", "field_weight")},
            "tune_seconds": round(seconds, 1), "tune_seconds_parts": report.seconds,
            "pseudo_labels": report.sources.get("photos"), "latency": lat}  # fmt: skip


def _overrides(pairs: list[str]) -> dict:
    """--set NAME=VALUE pairs as TuneSettings fields, each VALUE read as its default's type."""
    out: dict = {}
    defaults = TuneSettings()
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not hasattr(defaults, name) or not value:
            raise SystemExit(f"--set {pair!r}: give NAME=VALUE of a TuneSettings field")
        default = getattr(defaults, name)
        kind = (int if value.isdigit() else float) if default is None else type(default)
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"--set {pair!r}: {name} is true or false")
            out[name] = value.lower() == "true"
            continue
        out[name] = value if kind is str else kind(float(value)) if kind is int else kind(value)
    return out


def _precision(engine: Engine, ids: set[str] | None) -> dict[str, float]:
    """Leave-one-out precision@10 of category, colour and the title's kind among products
    `ids` (None: all)."""
    return {name: round(run_leave_one_out(engine, name, 10, among=ids)["precision"], 4)
            for name in ("category", "colour", "kind")}  # fmt: skip


KINDS = (
    "flip flops",
    "sports shoes",
    "casual shoes",
    "flats",
    "heels",
    "sandals",
    "wedges",
    "pumps",
    "ballerinas",
    "slippers",
    "boots",
    "sneakers",
    "loafers",
    "moccasins",
    "shoes",
)
_KIND_RE = re.compile("|".join(KINDS))


def title_kind(title: str) -> str:
    """The kind of shoe a product's title names (the last kind word in it), or "other"."""
    found = _KIND_RE.findall(title.lower())
    return found[-1] if found else "other"


def label_ceiling(rows: list[dict[str, str]], held: set[str], k: int = 10) -> dict:
    """How far the category column follows what the products are (their titles' kind),
    and the expected leave-one-out category precision@k over the `held` products of a
    search that knew each product's kind (or its brand and kind) exactly: the products
    sharing the query's brand and kind first, then its kind, then the others, each tier
    in random order."""
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        row = table.setdefault(title_kind(r["title"]), {})
        row[r["category"]] = row.get(r["category"], 0) + 1
    out: dict = {"kind_by_category": table}
    held_rows = [r for r in rows if r["product_id"] in held]
    tiers = {
        "kind": [lambda r: title_kind(r["title"])],
        "brand_and_kind": [
            lambda r: (r["title"].split()[0], title_kind(r["title"])),
            lambda r: title_kind(r["title"]),
        ],
    }
    for name, keys in tiers.items():
        total = 0.0
        for q in held_rows:
            others = [r for r in held_rows if r is not q]
            taken, hits = 0, 0.0
            for key in [*keys, lambda r: None]:  # the last tier: every product left
                tier = [r for r in others if key(r) == key(q)]
                others = [r for r in others if key(r) != key(q)]
                if not tier:
                    continue
                share = sum(r["category"] == q["category"] for r in tier) / len(tier)
                n = min(k - taken, len(tier))
                hits += n * share
                taken += n
                if taken == k:
                    break
            total += hits / k
        out[f"oracle_{name}"] = round(total / len(held_rows), 4)
    return out


def _with_kind(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**r, "kind": title_kind(r["title"])} for r in rows]


def _stiletto(engine: Engine) -> dict:
    res = engine.search([str(STILETTO)], k=10)[0]
    prods = engine.catalog.products([r.product_id for r in res])
    top = [(prods[r.product_id].category, prods[r.product_id].attributes.get("colour"))
           for r in res]  # fmt: skip
    return {"heels": sum(c == "Heels" for c, _ in top), "red": sum(c == "Red" for _, c in top),
            "top10": [f"{c}/{col}" for c, col in top]}  # fmt: skip


def _shop_shots(n: int) -> list[str]:
    """Queries for timing the fashion homes: the stiletto and footwear300's product shots
    (another shop's; a catalog image as the query would take the content-hash shortcut
    and skip the network)."""
    shots = sorted(str(p) for p in (DATA / "footwear300" / "data").glob("*.jpg"))
    return ([str(STILETTO)] + shots[:: max(1, len(shots) // n)])[:n]


def bench_field(work: Path, args: argparse.Namespace) -> dict:
    rows = [{**r, "image": str(FASHION / r["image"])} for r in _rows(FASHION / "catalog.csv")]
    rows = _with_kind(rows)
    fields = list(rows[0])
    held = {
        r["product_id"]
        for r in rows
        if int(hashlib.md5(("s" + r["product_id"]).encode()).hexdigest(), 16) % 5 == 0
    }
    learn_csv = _write(work / "learn.csv", fields, [r for r in rows if r["product_id"] not in held])
    held_csv = _write(work / "held.csv", fields, [r for r in rows if r["product_id"] in held])
    all_csv = _write(work / "catalog.csv", fields, rows)
    settings = TuneSettings(method="head" if args.method == "auto" else args.method, seed=0)
    overrides = _overrides(args.set)  # --set applies to this part too
    settings = replace(settings, **overrides)
    out: dict = {"learn_products": len(rows) - len(held), "held_products": len(held),
                 "method": settings.method, "overrides": overrides,
                 "labels": label_ceiling(rows, held)}  # fmt: skip
    with Engine(work / "fashion-base") as base:
        base.index([], metadata=all_csv, progress=False)
        out["base_held"] = _precision(base, held)
        out["base_full_catalog"] = _precision(base, None)
        out["base_stiletto"] = _stiletto(base)
        with Engine(work / "fashion-split") as split:
            split.index([], metadata=learn_csv, progress=False)
            t0 = time.perf_counter()
            report = train_tuned_model(split, field="category", progress=True,
                                       settings=settings, log=print)  # fmt: skip
            out["tune_seconds_split"] = round(time.perf_counter() - t0, 1)
            split.index([], metadata=held_csv, progress=False)  # unseen products arrive
            out["tuned_held"] = _precision(split, held)
        full_home = work / "fashion-full"
        # the split home's feature cache (by file content) spares computing it again
        shutil.copytree(work / "fashion-split" / "models" / "features",
                        full_home / "models" / "features", dirs_exist_ok=True)  # fmt: skip
        with Engine(full_home) as full:
            full.index([], metadata=all_csv, progress=False)
            t0 = time.perf_counter()
            full_report = train_tuned_model(full, field="category", progress=True,
                                            settings=settings, log=print)  # fmt: skip
            out["tune_seconds_full"] = round(time.perf_counter() - t0, 1)
            out["tune_seconds_full_parts"] = full_report.seconds
            out["tuned_full_catalog"] = _precision(full, None)
            out["tuned_stiletto"] = _stiletto(full)
            out["latency"] = latency({"base": base, "tuned": full}, _shop_shots(args.queries))
    out["settings"] = report.settings
    return out


def latency_only(work: Path, args: argparse.Namespace) -> int:
    """Time base and tuned homes kept by an earlier run (--workdir), interleaved (--part
    photos: the grocery homes only, field: the fashion ones)."""
    val = [str(GROCERY / r["image"]) for r in _rows(GROCERY / "val.csv")][: args.queries]
    out = {}
    parts = {"grocery": ("all", "photos"), "fashion": ("all", "field")}
    for name, paths in (("grocery", val), ("fashion", _shop_shots(args.queries))):
        if args.part not in parts[name]:
            continue
        homes = {
            "base": work / f"{name}-base",
            "tuned": work / ("grocery-tuned" if name == "grocery" else "fashion-full"),
        }
        engines = {k: Engine(h) for k, h in homes.items()}
        try:
            out[name] = latency(engines, paths)
        finally:
            for engine in engines.values():
                engine.close()
        print(name, {k: str(e) for k, e in homes.items()}, out[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["all", "photos", "field"])
    ap.add_argument(
        "--selection",
        action="store_true",
        help="photos: the burst split of train.csv instead of val.csv",
    )
    ap.add_argument("--split-salt", default="", help="--selection: salt of the burst hash")
    ap.add_argument(
        "--split",
        default="burst",
        choices=["burst", "block"],
        help="--selection: held-out bursts, or each product's last 30 %% of file numbers",
    )
    ap.add_argument(
        "--session-views", type=int, help="photos: the tune's session_views (default: its own)"
    )
    ap.add_argument(
        "--photos-field",
        help="photos: tune with this catalog field too (--photos --field NAME in one run)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a TuneSettings field for either part's run (e.g. colour_weight=0); repeatable",
    )
    ap.add_argument(
        "--features-from",
        metavar="DIR",
        help="photos: start the tuned home with the feature cache of an earlier --workdir",
    )
    ap.add_argument(
        "--method",
        default="auto",
        choices=["auto", "finetune", "head"],
        help="photos: auto = finetune; field: auto = head",
    )
    ap.add_argument("--queries", type=int, default=60, help="queries for the latency test")
    ap.add_argument("--workdir", help="keep the homes here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only time the homes a previous run left in --workdir",
    )
    args = ap.parse_args()
    if args.latency_only:
        return latency_only(Path(args.workdir), args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sources-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    }
    try:
        if args.part in ("all", "photos"):
            figures["photos"] = bench_photos(work, args)
            print(json.dumps(figures["photos"]), flush=True)
        if args.part in ("all", "field"):
            figures["field"] = bench_field(work, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    figures["load_average"] = os.getloadavg()
    _print(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _print(f: dict) -> None:
    print()
    p = f.get("photos")
    if p:
        with_field = f", --field {p['field']}" if p.get("field") else ""
        print(f"--photos ({p['unlabelled_photos']} unlabelled photos{with_field}, {p['method']});"
              f" scored on {p['scored_on']}")  # fmt: skip
        print(
            f"  Recall@1 {p['base']['recall@1']:.3f} -> {p['tuned']['recall@1']:.3f},"
            f" Recall@5 {p['base']['recall@5']:.3f} -> {p['tuned']['recall@5']:.3f},"
            f" category precision@5 {p['base']['category_precision@5']:.3f}"
            f" -> {p['tuned']['category_precision@5']:.3f}"
        )
        lat = p["latency"]
        print(
            f"  tuning {p['tune_seconds']:.0f}s; query median ms base"
            f" {lat['base']['median_ms']} / tuned {lat['tuned']['median_ms']}"
        )
    d = f.get("field")
    if d:
        print(f"--field category ({d['method']}); {d['held_products']} held-out products:")
        for key in ("base_held", "tuned_held", "base_full_catalog", "tuned_full_catalog"):
            print(
                f"  {key:20} category P@10 {d[key]['category']:.3f}"
                f"  colour P@10 {d[key]['colour']:.3f}  kind P@10 {d[key]['kind']:.3f}"
            )
        lab = d["labels"]
        print(
            f"  the labels allow: category P@10 {lab['oracle_kind']:.3f} knowing"
            f" each kind, {lab['oracle_brand_and_kind']:.3f} knowing brand and kind"
        )
        for key in ("base_stiletto", "tuned_stiletto"):
            print(f"  {key:20} heels {d[key]['heels']}/10, red {d[key]['red']}/10")
        lat = d["latency"]
        print(
            f"  tuning {d['tune_seconds_full']:.0f}s (full catalog); query median ms base"
            f" {lat['base']['median_ms']} / tuned {lat['tuned']['median_ms']}"
        )
    print(f"machine: {f['machine']}; load average {f['load_average']}")


if __name__ == "__main__":
    sys.exit(main())
