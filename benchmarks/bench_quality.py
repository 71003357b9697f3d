"""Retrieval quality of each pipeline choice, as the table in docs/quality.md.

    .venv/bin/python benchmarks/bench_quality.py [--calib 500] [--no-fashion] [--latency 40]
        [--queries CSV]

Grocery (../shared/data/grocery): the 296 val.csv shopper photos search the 81 catalog
images (`--queries`: other labelled photos, e.g. a part of train.csv to try the script
without reading val); Recall@1/@5 (with a 95 % bootstrap interval over queries). Query
centring is calibrated on `--calib` photos sampled from train.csv, reading only its `image` column
(no labels). Fashion-footwear: leave-one-out category precision@10 over the 2,836
catalog images (query-side choices leave it unchanged: it compares stored catalog
vectors). Cost: forward passes per query and the measured p50 of embedding one query
(decode excluded) on this machine, single queries, as `lookalike search` runs them.

Every row runs the shipped code (lookalike.query.QueryPipeline around the default
encoder, INT8 EfficientNet-Lite2 on ONNX Runtime, or `--model`); the rows marked "not
shipped" pool the encoder's feature map (`features` output) the way the retrieval
literature suggests. The "head only" rows pool just the head conv's 1280 channels of
that map: the embedding of export version 1, before the last block's channels joined.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = (ROOT / "../shared/data").resolve()
STILETTO = DATA / "footwear300" / "search_image_01.jpg"

from lookalike.calibration import calibrate, calibrate_queries  # noqa: E402
from lookalike.encoders import DEFAULT_MODEL, load_encoder  # noqa: E402
from lookalike.evaluate import leave_one_out_precision  # noqa: E402
from lookalike.hubness import HUB_BETA, HUB_K, hub_scores  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.views import (  # noqa: E402
    DEFAULT_CATALOG_VIEWS,
    DEFAULT_POWER,
    TURNED_VIEWS,
    CatalogViewEncoder,
    power_normalise,
)
from lookalike.query import (  # noqa: E402
    QUERY_VIEWS,
    QualitySettings,
    QueryCentre,
    QueryPipeline,
    with_margin,
)

BATCH = 16
CENTRE_VIEWS = ("centre90", "centre80", "centre70", "centre60")
SINGLE_VIEWS = ("full", "flip", *CENTRE_VIEWS)
HEAD = 1280
"""The head conv's channels at the front of the bundled encoders' `features` map."""


def l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def decode(paths: list[Path], draft: int) -> list:
    return [load_image(p, draft_size=draft) for p in paths]


def embed_prepared(encoder, images, prepare) -> np.ndarray:
    out = []
    for i in range(0, len(images), BATCH):
        out.append(encoder.embed(np.stack([prepare(img) for img in images[i : i + BATCH]])))
    return np.concatenate(out)


def features(base, images, prepare=None) -> np.ndarray:
    prepare = prepare or base.prepare
    out = []
    for i in range(0, len(images), BATCH):
        out.append(base.features(np.stack([prepare(img) for img in images[i : i + BATCH]])))
    return np.concatenate(out)


def recall_with_ci(scores: np.ndarray, truth: np.ndarray, k: int, boot: np.ndarray):
    order = np.argsort(-scores, axis=1)
    ranks = np.argmax(order == truth[:, None], axis=1) + 1
    hits = (ranks <= k).astype(np.float64)
    sample = hits[boot].mean(axis=1)
    return hits.mean(), np.quantile(sample, 0.025), np.quantile(sample, 0.975)


def gem(maps: np.ndarray, p: float = 3.0) -> np.ndarray:
    return (np.clip(maps, 1e-6, None) ** p).mean(axis=(2, 3)) ** (1.0 / p)


def rmac(maps: np.ndarray, sizes=(9, 6)) -> np.ndarray:
    """Sum of L2-normalised average-pooled square regions (50 % overlap), normalised."""
    n, c, h, w = maps.shape
    total = np.zeros((n, c), dtype=np.float32)
    for s in sizes:
        s = min(s, h, w)
        step = max(1, s // 2)
        for y in range(0, h - s + 1, step):
            for x in range(0, w - s + 1, step):
                total += l2(maps[:, :, y : y + s, x : x + s].mean(axis=(2, 3)))
    return l2(total)


def single_query_ms(encoder: QueryPipeline, images: list) -> float:
    encoder.embed_queries(images[:1])  # warm-up
    times = []
    for img in images:
        t0 = time.perf_counter()
        encoder.embed_queries([img])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=500, help="unlabelled train photos")
    parser.add_argument("--latency", type=int, default=40, help="single queries timed per row")
    parser.add_argument("--no-fashion", action="store_true", help="skip fashion-footwear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"encoder (default {DEFAULT_MODEL})")
    parser.add_argument("--queries", type=Path, help="labelled photos (default: grocery val.csv)")
    args = parser.parse_args()

    grocery = DATA / "grocery"
    if not grocery.is_dir():
        sys.exit(f"real data not found: {grocery}")
    models = Path(os.environ.get("LOOKALIKE_MODELS") or Path(tempfile.gettempdir()) / "lk-models")
    base = load_encoder(args.model, models)
    draft = 2 * base.input_size
    t_start = time.time()

    cat_rows = rows(grocery / "catalog.csv")
    val_rows = rows(args.queries or grocery / "val.csv")
    train_images = [r["image"] for r in rows(grocery / "train.csv")]  # labels never read
    rng = np.random.default_rng(args.seed)
    pick = sorted(rng.choice(len(train_images), min(args.calib, len(train_images)), replace=False))
    calib_paths = [grocery / train_images[i] for i in pick]
    cat_ids = [r["product_id"] for r in cat_rows]
    truth = np.array([cat_ids.index(r["product_id"]) for r in val_rows])
    cat_images = decode([grocery / r["image"] for r in cat_rows], draft)
    val_images = decode([grocery / r["image"] for r in val_rows], draft)
    boot = np.random.default_rng(1).integers(0, len(truth), (2000, len(truth)))

    # catalog vectors per margin; raw query view vectors per view; centre per view set
    catalog: dict[float, np.ndarray] = {}

    def framing(fill: float):
        return lambda img: base.prepare(with_margin(img, fill))

    for fill in (1.0, 0.7):
        catalog[fill] = embed_prepared(base, cat_images, framing(fill))
    # what `lookalike index` stores with `catalog_views` set: each image's views averaged
    viewed = CatalogViewEncoder(base, TURNED_VIEWS)
    cat_viewed = embed_prepared(viewed, cat_images, viewed.prepare)
    cv_label = "+".join(TURNED_VIEWS)
    # a new home's default: the image + DEFAULT_CATALOG_VIEWS, power-normalised, queries too
    shipped_side = CatalogViewEncoder(base, DEFAULT_CATALOG_VIEWS, DEFAULT_POWER)
    cat_new = embed_prepared(shipped_side, cat_images, shipped_side.prepare)
    new_label = f"catalog image+{'+'.join(DEFAULT_CATALOG_VIEWS)}, power {DEFAULT_POWER} both sides"
    views: dict[str, np.ndarray] = {}
    for view in SINGLE_VIEWS:
        enc = QueryPipeline(base, QualitySettings(query_views=(view,)))
        views[view] = enc.raw_query_views(val_images)[:, 0]
    # calibration: the view vectors of the unlabelled photos, once per view; a view
    # set's centre is their mean over its views (what `calibrate` computes, checked below)
    calib_images = decode(calib_paths, draft)
    calib_views = {
        view: QueryPipeline(base, QualitySettings(query_views=(view,))).raw_query_views(
            calib_images
        )[:, 0]
        for view in views
    }
    centres: dict[tuple[str, ...], QueryCentre] = {}

    def centre_for(view_set: tuple[str, ...]) -> QueryCentre:
        if view_set not in centres:
            mean = np.concatenate([calib_views[v] for v in view_set]).mean(axis=0)
            centres[view_set] = QueryCentre(mean, base.stamp, len(calib_images), view_set)
        return centres[view_set]

    def query_vectors(view_set: tuple[str, ...], centred: bool) -> np.ndarray:
        stack = np.stack([views[v] for v in view_set], axis=1)
        if centred:
            stack = l2(stack - centre_for(view_set).mean[None, None, :])
        return l2(stack.sum(axis=1))

    def powered_queries(view: str, centred: bool) -> np.ndarray:
        """The new default's query vectors: power-normalised views, centred by a centre
        calibrated in that space (what `calibrate` stores for such a home)."""
        q = power_normalise(views[view], DEFAULT_POWER)
        if centred:
            q = l2(q - power_normalise(calib_views[view], DEFAULT_POWER).mean(axis=0))
        return q

    # this table's shortcuts give the shipped code's vectors: `calibrate` on the photos
    # and `embed_queries` of the pipeline it feeds
    default = QueryPipeline(base).views
    real, _ = calibrate(QueryPipeline(base, QualitySettings()), calib_paths[:32], limit=None)
    assert np.allclose(real.mean, calib_views[default[0]][:32].mean(axis=0), atol=1e-5)
    check = QueryPipeline(base, QualitySettings(query_views=("full", "centre80")))
    check.set_centre(centre_for(("full", "centre80")))
    direct = check.embed_queries(val_images[:8])
    assert np.allclose(direct, query_vectors(("full", "centre80"), True)[:8], atol=1e-4)
    powered = QueryPipeline(shipped_side, QualitySettings(centre=False))
    assert powered.views == default
    direct = powered.embed_queries(val_images[:8])
    assert np.allclose(direct, powered_queries(default[0], False)[:8], atol=1e-4)
    # the hubness correction's r(c) (lookalike.hubness): the calibration photos, centred
    # as queries are in the default's space, against the default's catalog vectors
    p = power_normalise(calib_views[default[0]], DEFAULT_POWER)
    calib_centred = l2(p - p.mean(axis=0))
    hub_r = hub_scores(cat_new, calib_centred, HUB_K)
    _, _, few_q = calibrate_queries(QueryPipeline(shipped_side), calib_paths[:32], limit=None)
    p32 = p[:32]
    assert np.allclose(few_q, l2(p32 - p32.mean(axis=0)), atol=1e-4)  # what calibrate uses

    fashion: dict[float, float] = {}
    stiletto: dict[str, tuple[int, int]] = {}
    fashion_images = None
    if not args.no_fashion and (DATA / "fashion-footwear").is_dir():
        frows = rows(DATA / "fashion-footwear" / "catalog.csv")
        fashion_images = decode([DATA / "fashion-footwear" / r["image"] for r in frows], draft)
        fashion_ids = [r["product_id"] for r in frows]
        fashion_cats = [r["category"] or None for r in frows]

        def fashion_p10(vectors: np.ndarray) -> float:
            return leave_one_out_precision(vectors, fashion_ids, fashion_cats, 10)["precision"]

        # one pass over the feature maps gives the GAP vectors (what `embed` returns) and GeM
        pooled = {"gap": [], "gem": [], "head": []}
        for i in range(0, len(fashion_images), BATCH):
            maps = features(base, fashion_images[i : i + BATCH])
            pooled["gap"].append(l2(maps.mean(axis=(2, 3))))
            pooled["gem"].append(l2(gem(maps[:, :HEAD])))
            pooled["head"].append(l2(maps[:, :HEAD].mean(axis=(2, 3))))
        fashion_gap = np.concatenate(pooled["gap"])
        fashion_gem = np.concatenate(pooled["gem"])
        fashion_head = np.concatenate(pooled["head"])
        assert np.allclose(fashion_gap[:16], base.embed(np.stack(
            [base.prepare(im) for im in fashion_images[:16]])), atol=1e-4)  # fmt: skip
        fashion[1.0] = fashion_p10(fashion_gap)
        fashion_viewed = embed_prepared(viewed, fashion_images, viewed.prepare)
        fashion_cv = fashion_p10(fashion_viewed)
        fashion_new = embed_prepared(shipped_side, fashion_images, shipped_side.prepare)
        colour_p10 = {
            name: leave_one_out_precision(vectors, fashion_ids, [r["colour"] or None
                                          for r in frows], 10)["precision"]
            for name, vectors in (("image alone", fashion_gap), (cv_label, fashion_viewed),
                                  (new_label, fashion_new))
        }  # fmt: skip
        fashion[0.7] = fashion_p10(embed_prepared(base, fashion_images, framing(0.7)))
        # the red stiletto of `make run` against the stored fashion vectors, per view
        colours = [r["colour"] for r in frows]
        stiletto_img = load_image(STILETTO, draft_size=draft)
        for view in SINGLE_VIEWS:
            pipe = QueryPipeline(base, QualitySettings(query_views=(view,), centre=False))
            top = np.argsort(-(fashion_gap @ pipe.embed_queries([stiletto_img])[0]))[:10]
            stiletto[view] = (
                sum(fashion_cats[i] == "Heels" for i in top),
                sum(colours[i] == "Red" for i in top),
            )
        pipe = QueryPipeline(base, QualitySettings(centre=False))
        top = np.argsort(-(fashion_viewed @ pipe.embed_queries([stiletto_img])[0]))[:10]
        stiletto[f"{pipe.views[0]}, catalog views {cv_label}"] = (
            sum(fashion_cats[i] == "Heels" for i in top),
            sum(colours[i] == "Red" for i in top),
        )
        top = np.argsort(-(fashion_new @ powered.embed_queries([stiletto_img])[0]))[:10]
        stiletto[f"{pipe.views[0]}, {new_label} (the default)"] = (
            sum(fashion_cats[i] == "Heels" for i in top),
            sum(colours[i] == "Red" for i in top),
        )

    table: list[tuple[str, str, np.ndarray, float | None, int, float | None]] = []

    def add(label, status, scores, fill=1.0, forwards=1, settings=None, fashion_p=None):
        ms = None
        if settings is not None and args.latency:
            enc = QueryPipeline(base, settings)
            if settings.centre:
                enc.set_centre(centre_for(settings.query_views))
            ms = single_query_ms(enc, val_images[: args.latency])
        fp = fashion_p if fashion_p is not None else fashion.get(fill)
        table.append((label, status, scores, fp, forwards, ms))

    full, crop, flip = ("full",), ("full", "centre80"), ("full", "flip")
    p10_new = fashion_p10(fashion_new) if fashion_images is not None else None
    cat = catalog[1.0]
    n_cal = len(calib_paths)
    add(
        "plain: full photo, head + last block GAP, cosine",
        "plain before",
        query_vectors(full, False) @ cat.T,
        settings=QualitySettings(query_views=full, centre=False),
    )
    add(
        f"query centring (calibrated on {n_cal} unlabelled photos), full photo",
        "calibrated before",
        query_vectors(full, True) @ cat.T,
        settings=QualitySettings(query_views=full),
    )
    for centred in (False, True):
        add(
            f"{default[0]} + query centring, {new_label}"
            if centred
            else f"plain: {default[0]}, {new_label}",
            "calibrated, hub_correction false" if centred else "**default**",
            powered_queries(default[0], centred) @ cat_new.T,
            fashion_p=p10_new if fashion_images is not None else None,
        )
        if centred:
            add(
                f"{default[0]} + query centring + hub correction (beta {HUB_BETA}, k {HUB_K}),"
                f" {new_label}",
                "**default, calibrated**",
                powered_queries(default[0], True) @ cat_new.T - HUB_BETA * hub_r[None, :],
                fashion_p=p10_new if fashion_images is not None else None,
            )
        add(
            f"{default[0]} + query centring, catalog views {cv_label} (mean)"
            if centred
            else f"plain: {default[0]}, catalog views {cv_label} (mean, one vector per image)",
            "option, calibrated: catalog_views" if centred else "option: catalog_views",
            query_vectors(default, centred) @ cat_viewed.T,
            fashion_p=fashion_cv if fashion_images is not None else None,
        )
        for view in CENTRE_VIEWS:
            shipped = (view,) == default
            add(
                f"central {view[6:]} % square + query centring (its own views)"
                if centred
                else f"plain: central {view[6:]} % square only",
                ("default before, calibrated" if centred else "default before")
                if shipped
                else "option",
                query_vectors((view,), centred) @ cat.T,
                settings=QualitySettings(query_views=(view,), centre=centred) if shipped else None,
            )
    add(
        f"{default[0]} + a centre calibrated with `full` (stored before the default changed)",
        "old centre",
        l2(query_vectors(default, False) - centre_for(full).mean) @ cat.T,
    )
    few = 32
    few_mean = calib_views["full"][:few].mean(axis=0)  # the full photo, as before
    add(
        f"query centring, calibrated on only {few} photos",
        "calibrated before, fewer photos",
        l2(views["full"] - few_mean) @ cat.T,
    )
    add(
        "centring + centre-80 % crop view",
        "option",
        query_vectors(crop, True) @ cat.T,
        forwards=2,
        settings=QualitySettings(query_views=crop),
    )
    add(
        "centring + flipped view",
        "option",
        query_vectors(flip, True) @ cat.T,
        forwards=2,
        settings=QualitySettings(query_views=flip),
    )
    add(
        "centre-80 % crop view, no centring",
        "option",
        query_vectors(crop, False) @ cat.T,
        forwards=2,
        settings=QualitySettings(query_views=crop, centre=False),
    )
    add(
        "flipped view, no centring",
        "option",
        query_vectors(flip, False) @ cat.T,
        forwards=2,
        settings=QualitySettings(query_views=flip, centre=False),
    )
    add(
        "catalog margin (fill 0.7), no centring",
        "not shipped",
        query_vectors(full, False) @ catalog[0.7].T,
        fill=0.7,
    )
    add(
        "catalog margin (fill 0.7) + centring",
        "not shipped",
        query_vectors(full, True) @ catalog[0.7].T,
        fill=0.7,
    )

    # not shipped: feature-map pooling and re-ranking
    if hasattr(base, "features"):
        qmaps = features(base, val_images)
        cmaps = features(base, cat_images)
        cat_gap = catalog[1.0]
        q_head, c_head = (
            l2(qmaps[:, :HEAD].mean(axis=(2, 3))),
            l2(cmaps[:, :HEAD].mean(axis=(2, 3))),
        )
        calib_head = l2(features(base, calib_images)[:, :HEAD].mean(axis=(2, 3))).mean(axis=0)
        add("head only (export v1 embedding), plain", "before (v1)", q_head @ c_head.T)
        add(
            "head only (export v1 embedding) + centring",
            "before (v1)",
            l2(q_head - calib_head) @ c_head.T,
        )
        if fashion_images is not None:
            for back in (2, 1):
                label, status, scores, _, fw, ms = table[-back]
                table[-back] = (label, status, scores, fashion_p10(fashion_head), fw, ms)
        qmaps, cmaps = qmaps[:, :HEAD], cmaps[:, :HEAD]
        c_head_gap = c_head
        add(
            "query GeM p=3, head channels (catalog head GAP)",
            "not shipped",
            l2(gem(qmaps)) @ c_head_gap.T,
        )
        add(
            "GeM p=3 on both sides, head channels", "not shipped", l2(gem(qmaps)) @ l2(gem(cmaps)).T
        )
        add(
            "query R-MAC regions (9x9 + 6x6 cells), head channels",
            "not shipped",
            rmac(qmaps) @ c_head_gap.T,
        )
        q = query_vectors(("full",), True)
        sims = q @ cat_gap.T
        top = np.argsort(-sims, axis=1)[:, :2]
        weights = np.take_along_axis(sims, top, axis=1).clip(0) ** 3
        qe = l2(q + (cat_gap[top] * weights[..., None]).sum(axis=1))
        add("centring + alpha-QE (top 2, alpha 3)", "not shipped", qe @ cat_gap.T)
        csims = cat_gap @ cat_gap.T
        dba = l2(cat_gap[np.argsort(-csims, axis=1)[:, :2]].sum(axis=1))
        add("catalog DBA (top 2)", "not shipped", query_vectors(full, False) @ dba.T)
        if fashion_images is not None:
            label, status, scores, _, fw, ms = table[-4]
            table[-4] = (label, status, scores, fashion_p10(fashion_gem), fw, ms)
            fs = fashion_gap @ fashion_gap.T
            np.fill_diagonal(fs, -np.inf)
            fdba = l2(fashion_gap + fashion_gap[np.argmax(fs, axis=1)])
            label, status, scores, _, fw, ms = table[-1]
            table[-1] = (label, status, scores, fashion_p10(fdba), fw, ms)

    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()},"
        f" ONNX Runtime, {args.model} @ {base.input_size} px; {len(truth)} grocery val"
        f" photos vs {len(cat_ids)} catalog images; {time.time() - t_start:.0f} s in all."
    )
    print()
    print(
        "| pipeline | status | grocery R@1 | grocery R@5 | fashion P@10 | forwards / query"
        " | p50 ms / query |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, status, scores, fp, forwards, ms in table:
        r1 = recall_with_ci(scores, truth, 1, boot)
        r5 = recall_with_ci(scores, truth, 5, boot)
        print(
            f"| {label} | {status} | {r1[0]:.3f} ({r1[1]:.2f}–{r1[2]:.2f})"
            f" | {r5[0]:.3f} ({r5[1]:.2f}–{r5[2]:.2f})"
            f" | {'—' if fp is None else f'{fp:.3f}'} | {forwards}"
            f" | {'—' if ms is None else f'{ms:.0f}'} |"
        )
    if fashion_images is not None:
        print()
        print("fashion-footwear leave-one-out colour precision@10, catalog views: "
              + ", ".join(f"{k} {v:.3f}" for k, v in colour_p10.items()))  # fmt: skip
    if stiletto:
        print()
        print("Red stiletto (footwear300/search_image_01.jpg) vs fashion-footwear, top 10, plain:")
        for view, (heels, red) in stiletto.items():
            print(f"- {view}: {heels} Heels, {red} Red")


if __name__ == "__main__":
    assert set(QUERY_VIEWS) >= set(SINGLE_VIEWS)
    main()
