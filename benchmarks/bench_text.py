"""Photo and words (issue 14): quality and speed of the words index and of the fusion.

    .venv/bin/python benchmarks/bench_text.py quality
    .venv/bin/python benchmarks/bench_text.py words --products N
    .venv/bin/python benchmarks/bench_text.py fused

quality: on fashion-footwear (2,836 products; indexed into --home first if it is empty)
  - `"red heels"` alone: how many of the top 10 are Heels whose colour is Red;
  - the red stiletto photo (footwear300/search_image_01.jpg) with `heels`;
  - leave-one-out: each catalog image (its stored vector; its own product left out)
    with its category's name as words, category and colour precision@10 for the photo
    alone and for each fusion method and weight.
words: a catalog of N generated products (titles drawn from the real vocabulary of
  fashion-footwear/styles.csv: brand, article type, colour, usage, season words), the
  words index built on it (seconds), and p50/p90 of words-alone queries.
fused: p50 of photo alone vs photo + words at 3k products (the whole query path:
  decode, encode, search; words add the fusion).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = (ROOT / "../shared/data").resolve()

from lookalike import fusion, textindex  # noqa: E402
from lookalike.catalog import Catalog  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.search import rank_products  # noqa: E402

STILETTO = DATA / "footwear300/search_image_01.jpg"


def machine() -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def fashion_engine(home: Path) -> Engine:
    engine = Engine(home)
    if engine.catalog.count_products() == 0:
        report = engine.index([], metadata=DATA / "fashion-footwear/catalog.csv", progress=False)
        print(report.summary())
    return engine


def red_heels(result) -> bool:
    return result.category == "Heels" and result.attributes.get("colour") == "Red"


def cmd_quality(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = fashion_engine(Path(args.home) if args.home else Path(tmp) / "home")
        catalog, store = engine.catalog, engine.store
        print(f"catalog: {catalog.count_products()} products")
        words = fusion.words_alone(catalog, "red heels", k=10)
        print(
            '"red heels" alone: top 10 Heels with colour Red:'
            f" {sum(red_heels(r) for r in words.results)}/10"
        )
        query = engine.embed_queries([STILETTO])
        photo = rank_products(catalog, store, query, 10)[0]
        print(
            "stiletto photo alone: Heels"
            f" {sum(r.category == 'Heels' for r in photo)}/10,"
            f" Red {sum(r.attributes.get('colour') == 'Red' for r in photo)}/10"
        )
        for weight in args.weights:
            both = fusion.photo_and_words(catalog, store, query, "heels", 10, text_weight=weight)
            res = both[0].results
            print(
                f"stiletto photo + heels (text_weight {weight}): Heels"
                f" {sum(r.category == 'Heels' for r in res)}/10,"
                f" Red {sum(r.attributes.get('colour') == 'Red' for r in res)}/10"
            )
        leave_one_out(catalog, store, args.weights, args.limit)


def leave_one_out(catalog: Catalog, store, weights: list[float], limit: int | None) -> None:
    """Category and colour precision@10, photo alone vs photo + the category's name."""
    rows = [row for batch in catalog.iter_images() for row in batch][:limit]
    products = catalog.products([row.product_id for row in rows])
    methods = ["photo", "filter", "rrf", *(f"fused {w}" for w in weights)]
    methods += [f"fused {w} no-neighbours" for w in weights]
    hits: dict[str, list[tuple[float, float | None]]] = {m: [] for m in methods}
    started = time.perf_counter()
    for row in rows:
        product = products[row.product_id]
        vector = catalog.vectors([row.image_id])
        words = textindex.parse_words(product.category)
        cands, _ = fusion.gather(catalog, store, vector, words, exclude={row.product_id})
        colour = product.attributes.get("colour")

        def score(top, product=product, colour=colour):
            cat = np.mean([c.result.category == product.category for c in top])
            col = (
                None
                if colour is None
                else np.mean([c.result.attributes.get("colour") == colour for c in top])
            )
            return cat, col

        by_visual = sorted(cands, key=lambda c: -c.result.score)
        hits["photo"].append(score(by_visual[:10]))
        full = [c for c in by_visual if len(c.matched) == len(words)]
        rest = [c for c in by_visual if len(c.matched) != len(words)]
        hits["filter"].append(score((full + rest)[:10]))
        by_text = sorted(cands, key=lambda c: (-c.text, -c.result.score))
        rank_t = {id(c): i for i, c in enumerate(by_text) if c.text > 0}
        rrf = sorted(
            enumerate(by_visual),
            key=lambda ic: -(1 / (60 + ic[0]) + 1 / (60 + rank_t.get(id(ic[1]), 10**6))),
        )
        hits["rrf"].append(score([c for _, c in rrf][:10]))
        for w in weights:
            hits[f"fused {w}"].append(score([c for _, c in fusion.fuse(cands, w)][:10]))
            plain = fusion.fuse(cands, w, neighbour_weight=0.0)
            hits[f"fused {w} no-neighbours"].append(score([c for _, c in plain][:10]))
    seconds = time.perf_counter() - started
    print(f"leave-one-out, {len(rows)} queries (photo + its category's name), {seconds:.0f}s:")
    print(f"  {'method':<28} category P@10  colour P@10")
    for method in methods:
        cat = np.mean([c for c, _ in hits[method]])
        col = np.mean([c for _, c in hits[method] if c is not None])
        print(f"  {method:<28} {cat:.4f}         {col:.4f}")


def vocabulary() -> dict[str, list[str]]:
    """The real words of fashion-footwear/styles.csv, by role."""
    with open(DATA / "fashion-footwear/styles.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    roles: dict[str, set[str]] = {k: set() for k in ("brand", "word", "colour", "article")}
    for row in rows:
        name = row["productDisplayName"].split()
        if name:
            roles["brand"].add(name[0])
        roles["word"].update(w for w in name[1:] if w.isalpha() and len(w) > 2)
        roles["colour"].add(row["baseColour"])
        roles["article"].add(row["articleType"])
    out = {k: sorted(v) for k, v in roles.items()}
    out["season"] = sorted({r["season"] for r in rows if r["season"]})
    out["usage"] = sorted({r["usage"] for r in rows if r["usage"]})
    out["year"] = sorted({r["year"] for r in rows if r["year"]})
    return out


def generated_rows(n: int, vocab: dict[str, list[str]], seed: int = 0):
    """n products: title "Brand Women w1 [w2] Colour Article", the article type as
    category, colour/season/year/usage as attributes."""
    import json

    rng = np.random.default_rng(seed)
    pick = {k: rng.integers(0, len(v), n) for k, v in vocab.items()}
    extra = rng.integers(0, len(vocab["word"]), n)
    two = rng.random(n) < 0.5
    for i in range(n):
        colour = vocab["colour"][pick["colour"][i]]
        article = vocab["article"][pick["article"][i]]
        words = [vocab["word"][pick["word"][i]]] + ([vocab["word"][extra[i]]] if two[i] else [])
        title = " ".join([vocab["brand"][pick["brand"][i]], "Women", *words, colour, article])
        attrs = {
            "colour": colour,
            "season": vocab["season"][pick["season"][i]],
            "year": vocab["year"][pick["year"][i]],
            "usage": vocab["usage"][pick["usage"][i]],
        }
        yield (f"g{i}", title, article, 1, json.dumps(attrs, sort_keys=True))


def word_queries(vocab: dict[str, list[str]], n: int, seed: int = 1) -> list[str]:
    """A mix of what shoppers type: colour + kind, brand, brand + kind, kind, a word,
    usage + kind, and a prefix of a word."""
    rng = np.random.default_rng(seed)

    def one(key: str) -> str:
        return vocab[key][rng.integers(len(vocab[key]))]

    makers = [
        lambda: f"{one('colour')} {one('article')}",
        lambda: one("brand"),
        lambda: f"{one('brand')} {one('article')}",
        lambda: one("article"),
        lambda: one("word"),
        lambda: f"{one('usage')} {one('article')}",
        lambda: one("word")[:4],
    ]
    return [makers[i % len(makers)]() for i in range(n)]


def cmd_words(args: argparse.Namespace) -> None:
    vocab = vocabulary()
    print("vocabulary from styles.csv: " + ", ".join(f"{len(v)} {k}s" for k, v in vocab.items()))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "catalog.sqlite"
        catalog = Catalog(path)
        started = time.perf_counter()
        with catalog.transaction():
            catalog._db.executemany(
                "INSERT INTO products(product_id, title, category, in_stock, attributes)"
                " VALUES(?, ?, ?, ?, ?)",
                generated_rows(args.products, vocab),
            )
        written = time.perf_counter() - started
        print(
            f"{args.products:,} products written with their words (one transaction,"
            f" triggers): {written:.1f}s"
        )
        started = time.perf_counter()
        catalog.rebuild_text_index()
        print(f"words index rebuilt from the products table: {time.perf_counter() - started:.1f}s")
        catalog._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        print(f"catalog file: {path.stat().st_size / 1e6:.0f} MB")
        queries = word_queries(vocab, args.queries)
        for q in queries[:20]:  # warm the page cache
            fusion.words_alone(catalog, q, k=10)
        times, windowed = [], 0
        for q in queries:
            t0 = time.perf_counter()
            report = fusion.words_alone(catalog, q, k=10)
            times.append(time.perf_counter() - t0)
            windowed += catalog.text_search(q, 10).ranked_window
        ms = np.array(times) * 1000
        if args.slowest:
            for i in np.argsort(-ms)[: args.slowest]:
                print(f"  {ms[i]:7.2f} ms  {queries[i]!r}")
        print(
            f"words alone, k=10, {len(queries)} queries: p50 {np.percentile(ms, 50):.2f} ms,"
            f" p90 {np.percentile(ms, 90):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"
            f" ({windowed} ranked within the first {textindex.RANK_WINDOW:,} matches)"
        )
        del report
        catalog.close()


def cmd_fused(args: argparse.Namespace) -> None:
    """Photo alone vs photo + words on fashion-footwear: the whole query path (decode,
    encode, search) and the ranking alone (query vectors embedded beforehand)."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = fashion_engine(Path(args.home) if args.home else Path(tmp) / "home")
        catalog, store = engine.catalog, engine.store
        print(f"catalog: {catalog.count_products()} products")
        fashion = sorted((DATA / "fashion-footwear/images").glob("*.jpg"))
        footwear = sorted((DATA / "footwear300/data").glob("*.jpg"))
        rng = np.random.default_rng(0)
        half = args.queries // 2
        images = [fashion[i] for i in rng.choice(len(fashion), half, replace=False)]
        images += [footwear[i] for i in rng.choice(len(footwear), args.queries - half, False)]
        words = ["heels", "red heels", "black flats", "sports shoes", "casual", "flip flops"]
        texts = [words[i % len(words)] for i in range(len(images))]
        for img, text in list(zip(images, texts, strict=True))[:10]:  # warm up
            engine.find([img], text, k=10)
        whole: dict[str, list[float]] = {"photo": [], "photo + words": []}
        ranking: dict[str, list[float]] = {"photo": [], "photo + words": []}
        for img, text in zip(images, texts, strict=True):
            for mode, t in (("photo", None), ("photo + words", text)):
                t0 = time.perf_counter()
                engine.find([img], t, k=10)
                whole[mode].append(time.perf_counter() - t0)
            vector = engine.embed_queries([img])
            t0 = time.perf_counter()
            rank_products(catalog, store, vector, 10)
            ranking["photo"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fusion.photo_and_words(catalog, store, vector, text, 10)
            ranking["photo + words"].append(time.perf_counter() - t0)
        for label, times in (("whole query path", whole), ("ranking only", ranking)):
            p50 = {m: float(np.percentile(np.array(v) * 1000, 50)) for m, v in times.items()}
            p90 = {m: float(np.percentile(np.array(v) * 1000, 90)) for m, v in times.items()}
            print(
                f"{label}, {len(images)} queries, k=10: photo p50 {p50['photo']:.2f} ms"
                f" (p90 {p90['photo']:.2f}), photo + words p50 {p50['photo + words']:.2f} ms"
                f" (p90 {p90['photo + words']:.2f}): words add"
                f" {p50['photo + words'] - p50['photo']:.2f} ms p50"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--home", help="an indexed fashion-footwear home (default: a temp one)")
    q.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.2, 0.3, 0.4, 0.5, 0.6])  # fmt: skip
    q.add_argument("--limit", type=int, help="leave-one-out: only the first N images")
    w = sub.add_parser("words")
    w.add_argument("--products", type=int, default=100_000)
    w.add_argument("--queries", type=int, default=300)
    w.add_argument("--tmp", help="folder for the generated catalog (default: the system's)")
    w.add_argument("--slowest", type=int, default=0, help="also list the N slowest queries")
    f = sub.add_parser("fused")
    f.add_argument("--home", help="an indexed fashion-footwear home (default: a temp one)")
    f.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    print(machine())
    {"quality": cmd_quality, "words": cmd_words, "fused": cmd_fused}[args.cmd](args)


if __name__ == "__main__":
    main()
