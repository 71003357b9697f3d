"""Measure retrieval quality: Recall@K / mAP@K on labelled query photos, leave-one-out
precision@K on a catalog's own metadata, and a contact sheet of the worst misses.

Two ways to evaluate a catalog (the engine's home folder):

- Labelled queries (`run_eval`): a CSV with `image,product_id` (image paths relative to
  the CSV). Each photo is searched as a shopper would search it (`Engine.search`, one
  query at a time, so the time per query is the single-query latency). Recall@K is the
  share of queries whose labelled product is among the top K products; AP@K is the
  average precision of the ranking cut at K (with one labelled product per query it is
  1/rank, or 0 past K), and mAP@K its mean.
- Leave-one-out (`run_leave_one_out`): no separate queries; each catalog image queries
  all the other products with its stored vector, and precision@K is the share of the top
  K *other* products that share the query product's value of a field (e.g. category).

Rankings are product-level: a product appears once, at the rank of its best image.
Everything a user can get wrong (bad label file, unknown product, unknown field) raises
a typed error from `lookalike.errors`.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputPathError, MetadataError, UsageError

DEFAULT_KS = (1, 5, 10)

# --------------------------------------------------------------------------- metrics


def first_rank(ranking: Sequence[str], relevant: str | Iterable[str]) -> int | None:
    """1-based rank of the first relevant item in `ranking`, or None if absent."""
    rel = {relevant} if isinstance(relevant, str) else set(relevant)
    for rank, item in enumerate(ranking, start=1):
        if item in rel:
            return rank
    return None


def recall_at_k(ranking: Sequence[str], relevant: str | Iterable[str], k: int) -> float:
    """1.0 if any relevant item is among the first k of `ranking`, else 0.0."""
    _check_k(k)
    rank = first_rank(ranking[:k], relevant)
    return 0.0 if rank is None else 1.0


def average_precision_at_k(ranking: Sequence[str], relevant: str | Iterable[str], k: int) -> float:
    """AP@k: the mean of precision@i over the ranks i <= k that hold a relevant item,
    divided by min(k, number of relevant items). Duplicates in `ranking` count once."""
    _check_k(k)
    rel = {relevant} if isinstance(relevant, str) else set(relevant)
    if not rel:
        raise UsageError("average precision needs at least one relevant item")
    hits = 0
    total = 0.0
    seen: set[str] = set()
    for i, item in enumerate(ranking[:k], start=1):
        if item in rel and item not in seen:
            hits += 1
            total += hits / i
        seen.add(item)
    return total / min(k, len(rel))


def precision_at_k(ranking: Sequence[Any], is_relevant: Callable[[Any], bool], k: int) -> float:
    """Share of the first k items of `ranking` that are relevant. A ranking shorter
    than k counts the missing places as misses (the catalog could not fill them)."""
    _check_k(k)
    return sum(1 for item in ranking[:k] if is_relevant(item)) / k


def unique_in_order(items: Iterable[str]) -> list[str]:
    """Items in first-seen order, each once (an image ranking to a product ranking)."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise UsageError(f"K must be a positive whole number, not {k!r}")


def parse_ks(text: str | Sequence[int]) -> list[int]:
    """ "1,5,10" -> [1, 5, 10] (sorted, unique); UsageError on anything else."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            ks = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"-k takes whole numbers separated by commas, not {text!r}") from None
    else:
        ks = [int(k) for k in text]
    if not ks or any(k < 1 for k in ks):
        raise UsageError(f"-k takes positive whole numbers, not {text!r}")
    return sorted(set(ks))


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelledQuery:
    image: Path | None  # absolute; None for words alone
    product_id: str
    line: int  # line in the label file (for messages)
    text: str | None = None  # words searched with (or without) the photo


def read_labels(path: str | Path) -> list[LabelledQuery]:
    """Parse an `image,product_id[,text]` CSV (image paths relative to the CSV). With a
    `text` column, a row's words go with its photo, and a row with words may have no
    photo (words alone).

    Raises InputPathError if the file is missing, MetadataError naming FILE:LINE for a
    row without a query (image or text) or product id, or whose image file does not
    exist."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputPathError(f"label file not found: {path}")
    base = path.resolve().parent
    out: list[LabelledQuery] = []
    problems: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("image", "product_id") if c not in header]
            if "text" in header and "product_id" in header:
                missing = []
            if missing:
                raise MetadataError(
                    f"{path}:1: label file needs columns image,product_id (or text,product_id)"
                    f" (missing {', '.join(missing)})"
                )
            reader.fieldnames = header
            for row in reader:
                line = reader.line_num
                image = (row.get("image") or "").strip()
                product = (row.get("product_id") or "").strip()
                text = (row.get("text") or "").strip() or None
                if not image and not product and not any((v or "").strip() for v in row.values()):
                    continue  # blank line
                if not image and text is None:
                    problems.append(
                        f"{path}:{line}: empty image" + (" and text" * ("text" in header))
                    )
                    continue
                if not product:
                    problems.append(f"{path}:{line}: empty product_id")
                    continue
                if not image:
                    out.append(LabelledQuery(None, product, line, text))
                    continue
                image_path = Path(image).expanduser()
                if not image_path.is_absolute():
                    image_path = base / image_path
                if not image_path.is_file():
                    problems.append(f"{path}:{line}: image not found: {image}")
                    continue
                out.append(LabelledQuery(image_path, product, line, text))
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise MetadataError(f"{path}: not a readable CSV file ({exc})") from None
    if problems:
        raise MetadataError(_summarise(problems))
    if not out:
        raise MetadataError(f"{path}: no labelled queries")
    return out


def check_known_products(labels: Sequence[LabelledQuery], known: set[str], path: Path) -> None:
    """MetadataError naming FILE:LINE for each label whose product is not in the catalog
    (an unknown label cannot be found, so it would silently count as a miss)."""
    problems = [
        f"{path}:{q.line}: product {q.product_id!r} is not in the catalog"
        for q in labels
        if q.product_id not in known
    ]
    if problems:
        raise MetadataError(_summarise(problems))


def _summarise(problems: list[str], show: int = 5) -> str:
    text = "\n".join(problems[:show])
    if len(problems) > show:
        text += f"\n... and {len(problems) - show} more"
    return f"{len(problems)} bad label row(s):\n{text}"


# --------------------------------------------------------------------------- evaluation


def summarise_ranks(ranks: Sequence[int | None], ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """Recall@K and mAP@K for queries with exactly one relevant product each, given the
    1-based rank of that product (None when it was not returned)."""
    n = len(ranks)
    if n == 0:
        raise UsageError("no queries to summarise")
    recall = {}
    mean_ap = {}
    for k in ks:
        recall[str(k)] = sum(1 for r in ranks if r is not None and r <= k) / n
        mean_ap[str(k)] = sum(1.0 / r for r in ranks if r is not None and r <= k) / n
    return {"recall": recall, "map": mean_ap}


def run_eval(
    engine: Any,
    labels_csv: str | Path,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    progress: bool = False,
    keep_rankings: int = 10,
    text_weight: float | None = None,
) -> dict[str, Any]:
    """Search every labelled photo against the engine's catalog; return a report dict:
    queries, k, recall{K}, map{K}, ms_per_query (mean), p50_ms, p95_ms, and `per_query`
    (image, product_id, rank, top product ids, top score, right product's score) that
    `draw_failures` and the text formatter use."""
    ks = parse_ks(ks)
    labels_path = Path(labels_csv).expanduser()
    labels = read_labels(labels_path)
    known = _catalog_product_ids(engine)
    check_known_products(labels, known, labels_path)
    depth = max(max(ks), keep_rankings)
    per_query: list[dict[str, Any]] = []
    times: list[float] = []
    iterator: Iterable[LabelledQuery] = labels
    if progress:
        from tqdm import tqdm

        iterator = tqdm(labels, desc="eval", unit="query")
    for q in iterator:
        t0 = time.perf_counter()
        if q.text is None:
            results = engine.search([q.image], k=depth)[0]
        else:  # photo and words, or words alone
            photos = [q.image] if q.image is not None else []
            results = engine.find(photos, q.text, k=depth, text_weight=text_weight)[0].results
        times.append((time.perf_counter() - t0) * 1000.0)
        ranking = [r.product_id for r in results]
        rank = first_rank(ranking, q.product_id)
        right = next((r for r in results if r.product_id == q.product_id), None)
        per_query.append(
            {
                "image": None if q.image is None else str(q.image),
                "text": q.text,
                "product_id": q.product_id,
                "rank": rank,
                "top": ranking[:keep_rankings],
                "top_score": float(results[0].score) if results else None,
                "top_image": str(results[0].image) if results else None,
                "right_score": float(right.score) if right is not None else None,
                "right_image": str(right.image) if right is not None else None,
            }
        )
    ranks = [p["rank"] for p in per_query]
    report: dict[str, Any] = {
        "mode": "queries",
        "labels": str(labels_path),
        "queries": len(per_query),
        "products": len(known),
        "k": ks,
        **summarise_ranks(ranks, ks),
        "ms_per_query": statistics.fmean(times),
        "p50_ms": _percentile(times, 50),
        "p95_ms": _percentile(times, 95),
        "pipeline": _pipeline_description(engine),
        "per_query": per_query,
    }
    return report


def leave_one_out_precision(
    vectors: np.ndarray,
    product_ids: Sequence[str],
    values: Sequence[str | None],
    k: int,
    *,
    chunk: int = 1024,
) -> dict[str, Any]:
    """Each image queries every *other* product (its own product's images are left
    out); a product counts once, at its best image's score. Precision@k is the share of
    the top k products whose field value equals the query product's value.

    vectors: (N, D) L2-normalised, one row per image; product_ids / values: per image
    (values of a product's images must agree; None = the product has no value and is
    not used as a query, and never counts as a match). Returns queries, skipped,
    precision (mean over queries) and per-value precision."""
    _check_k(k)
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n != len(product_ids) or n != len(values):
        raise UsageError("vectors, product_ids and values must have one entry per image")
    products = sorted(set(product_ids))
    pindex = {p: i for i, p in enumerate(products)}
    img_prod = np.array([pindex[p] for p in product_ids], dtype=np.int64)
    n_products = len(products)
    if n_products < 2:
        raise UsageError("leave-one-out needs at least two products")
    prod_value: list[str | None] = [None] * n_products
    for p, v in zip(img_prod, values, strict=True):
        if prod_value[p] is None:
            prod_value[p] = v if v not in ("", None) else None
    value_ids = {v: i for i, v in enumerate(sorted({v for v in prod_value if v is not None}))}
    pval = np.array([value_ids.get(v, -1) if v is not None else -1 for v in prod_value])
    kk = min(k, n_products - 1)
    hits_all: list[float] = []
    per_value: dict[str, list[float]] = {}
    skipped = 0
    for start in range(0, n, chunk):
        sims = vectors[start : start + chunk] @ vectors.T  # (c, N)
        # product-level max: scatter image scores into product columns
        best = np.full((len(sims), n_products), -np.inf, dtype=np.float32)
        _scatter_max(best, sims, img_prod)
        rows = np.arange(len(sims))
        own = img_prod[start : start + chunk]
        best[rows, own] = -np.inf
        top = np.argpartition(-best, kk - 1, axis=1)[:, :kk] if kk < n_products else None
        for r in range(len(sims)):
            qv = pval[own[r]]
            if qv < 0:
                skipped += 1
                continue
            if top is not None:
                cand = top[r]
                cand = cand[np.argsort(-best[r, cand], kind="stable")]
            else:
                cand = np.argsort(-best[r], kind="stable")[:kk]
            p = float(np.sum(pval[cand] == qv)) / k
            hits_all.append(p)
            per_value.setdefault(prod_value[own[r]] or "", []).append(p)
    if not hits_all:
        raise UsageError("no catalog image has a value for that field")
    return {
        "queries": len(hits_all),
        "skipped": skipped,
        "precision": float(np.mean(hits_all)),
        "per_value": {v: float(np.mean(ps)) for v, ps in sorted(per_value.items())},
        "per_value_count": {v: len(ps) for v, ps in sorted(per_value.items())},
    }


def _scatter_max(best: np.ndarray, sims: np.ndarray, img_prod: np.ndarray) -> None:
    """best[:, img_prod[j]] = max(best[:, img_prod[j]], sims[:, j]) for every column j."""
    order = np.argsort(img_prod, kind="stable")
    groups = img_prod[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    reduced = np.maximum.reduceat(sims[:, order], starts, axis=1)
    best[:, groups[starts]] = np.maximum(best[:, groups[starts]], reduced)


def run_leave_one_out(
    engine: Any, field: str, k: int = 10, among: set[str] | None = None
) -> dict[str, Any]:
    """Leave-one-out precision@k over the engine's catalog using its stored vectors.
    `field` is category, title, price, in_stock or an attribute name; with `among`, only
    those products' images query, and are searched, (e.g. products a model never saw)."""
    _check_k(k)
    t0 = time.perf_counter()
    image_ids, product_ids, vectors = _catalog_vectors(engine, among)
    products = _catalog_products(engine, sorted(set(product_ids)))
    values = []
    column = field in ("category", "title", "price", "in_stock")
    found = column
    for pid in product_ids:
        prod = products[pid]
        value = getattr(prod, field) if column else prod.attributes.get(field)
        if value is not None:
            found = True
        values.append(None if value is None or value == "" else str(value))
    if not found:
        raise UsageError(
            f"no product has a field {field!r} (try category, or an attribute from the metadata)"
        )
    result = leave_one_out_precision(vectors, product_ids, values, k)
    return {
        "mode": "leave-one-out",
        "field": field,
        "k": k,
        "images": len(image_ids),
        "products": len(products),
        **result,
        "seconds": time.perf_counter() - t0,
        "pipeline": {  # stored catalog vectors only: the query pipeline plays no part
            "model": engine.catalog.get_meta("model"),
            "stamp": engine.catalog.get_meta("stamp"),
        },
    }


# --------------------------------------------------------------------------- engine access


def _catalog_product_ids(engine: Any) -> set[str]:
    catalog = engine.catalog
    ids: set[str] = set()
    for batch in catalog.iter_images():
        ids.update(row.product_id for row in batch)
    return ids


def _catalog_vectors(
    engine: Any, among: set[str] | None = None
) -> tuple[list[int], list[str], np.ndarray]:
    """Every catalog image (of the products `among`, None: all) that holds a vector of
    the catalog's current model."""
    catalog = engine.catalog
    stamp = catalog.get_meta("stamp")
    embedded = set(catalog.embedded_ids(stamp).tolist()) if stamp else set()
    image_ids: list[int] = []
    product_ids: list[str] = []
    for batch in catalog.iter_images():
        for row in batch:
            if row.image_id in embedded and (among is None or row.product_id in among):
                image_ids.append(row.image_id)
                product_ids.append(row.product_id)
    if not image_ids:
        raise UsageError("the catalog has no embedded images: index some images first")
    vectors = catalog.vectors(image_ids)
    return image_ids, product_ids, vectors


def _catalog_products(engine: Any, product_ids: Sequence[str]) -> dict[str, Any]:
    return engine.catalog.products(list(product_ids))


def _pipeline_description(engine: Any) -> dict[str, Any]:
    from .query import describe, query_pipeline

    try:
        encoder = engine.encoder
        pipeline = query_pipeline(engine.home, encoder)
        return {"model": encoder.name, "stamp": encoder.stamp, **describe(pipeline)}
    except Exception:  # noqa: BLE001 - a description is optional in a report
        return {}


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


# --------------------------------------------------------------------------- output


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of a report from run_eval / run_leave_one_out."""
    lines: list[str] = []
    if report.get("mode") == "leave-one-out":
        lines.append(
            f"leave-one-out on {report['field']}: {report['queries']} queries"
            f" ({report['images']} images, {report['products']} products"
            + (f", {report['skipped']} without a value skipped" if report["skipped"] else "")
            + ")"
        )
        lines.append(f"precision@{report['k']}  {report['precision']:.4f}")
        width = max((len(v) for v in report["per_value"]), default=0)
        for value, p in report["per_value"].items():
            n = report["per_value_count"][value]
            lines.append(f"  {value:<{width}}  {p:.4f}  ({n} queries)")
        return "\n".join(lines)
    lines.append(
        f"{report['queries']} queries against {report['products']} products ({report['labels']})"
    )
    lines.append("  K   Recall@K   mAP@K")
    for k in report["k"]:
        lines.append(f"{k:>3}   {report['recall'][str(k)]:.4f}     {report['map'][str(k)]:.4f}")
    lines.append(
        f"time per query: mean {report['ms_per_query']:.1f} ms,"
        f" p50 {report['p50_ms']:.1f} ms, p95 {report['p95_ms']:.1f} ms"
    )
    return "\n".join(lines)


def report_json(report: dict[str, Any], *, per_query: bool = False) -> str:
    """The report as JSON (per-query rows only when asked: they can be long)."""
    data = dict(report)
    if not per_query:
        data.pop("per_query", None)
    return json.dumps(data, indent=2, sort_keys=False)


def worst_misses(report: dict[str, Any], limit: int = 12) -> list[dict[str, Any]]:
    """Queries whose labelled product did not come first, worst first: not returned at
    all, then by rank, then by how far the wrong first answer out-scored the right one."""
    misses = [q for q in report.get("per_query", []) if q["rank"] != 1]

    def badness(q: dict[str, Any]) -> tuple[float, float]:
        rank = q["rank"] if q["rank"] is not None else 10**9
        gap = (q["top_score"] or 0.0) - (q["right_score"] or 0.0)
        return (-rank, -gap)

    return sorted(misses, key=badness)[:limit]


def draw_failures(
    report: dict[str, Any],
    out_path: str | Path,
    engine: Any = None,
    *,
    limit: int = 12,
    thumb: int = 160,
) -> Path:
    """Write a PNG contact sheet of the worst misses: one row per miss with the query
    photo, an image of the right product, and what came first instead. Returns the path.
    `engine` is used to find an image of the right product when the search did not
    return it; without an engine that cell says so."""
    from PIL import Image, ImageDraw, ImageOps

    from .images import load_image

    misses = worst_misses(report, limit)
    out_path = Path(out_path).expanduser()
    cols = ("query", "right product", "came first")
    pad, text_h = 8, 34
    width = pad + len(cols) * (thumb + pad)
    header = 24
    height = header + max(1, len(misses)) * (thumb + text_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(cols):
        draw.text((pad + c * (thumb + pad), 6), title, fill="black")
    if not misses:
        draw.text((pad, header + 10), "no misses: every query's product came first", fill="black")

    def cell(path: str | None, x: int, y: int, caption: str) -> None:
        img = None
        if path:
            try:
                img = load_image(Path(path))
            except Exception:  # noqa: BLE001 - a missing picture must not stop the sheet
                img = None
        if img is not None:
            img = ImageOps.contain(img, (thumb, thumb))
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        else:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline="grey")
            draw.text((x + 6, y + thumb // 2 - 6), "(no image)", fill="grey")
        for i, line in enumerate(_wrap(caption, thumb // 6)[:2]):
            draw.text((x, y + thumb + 2 + 14 * i), line, fill="black")

    for row, q in enumerate(misses):
        y = header + row * (thumb + text_h + pad)
        rank = "not found" if q["rank"] is None else f"rank {q['rank']}"
        right_image = q.get("right_image") or _an_image_of(engine, q["product_id"])
        right_caption = q["product_id"] + (
            f" {q['right_score']:.3f}" if q.get("right_score") is not None else ""
        )
        first = q["top"][0] if q["top"] else "(nothing)"
        first_caption = first + (f" {q['top_score']:.3f}" if q.get("top_score") is not None else "")
        name = Path(q["image"]).name if q.get("image") else f'"{q.get("text")}"'
        cell(q["image"], pad, y, f"{name} ({rank})")
        cell(right_image, pad + (thumb + pad), y, right_caption)
        cell(q.get("top_image"), pad + 2 * (thumb + pad), y, first_caption)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return out_path


def _an_image_of(engine: Any, product_id: str) -> str | None:
    if engine is None:
        return None
    try:
        rows = engine.catalog.images_of(product_id)
    except Exception:  # noqa: BLE001
        return None
    return rows[0].source if rows else None


def _wrap(text: str, width: int) -> list[str]:
    width = max(4, width)
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]
