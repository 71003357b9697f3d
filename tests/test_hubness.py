"""The hubness correction `lookalike calibrate` ships for base models (lookalike.hubness):
r(c) stored with the query centre, photo searches ranked by cos - beta r(c), exactly; on
the real bundled encoder, the real grocery catalog and real shopper photos of train.csv."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from lookalike.calibration import save_centre
from lookalike.hubness import HUB_BETA, HUB_K, HubCorrection, hub_scores
from lookalike.query import CENTRE_FILE, QualitySettings, QueryCentre, query_pipeline


def _train_photos(grocery, start: int, step: int, n: int) -> list[str]:
    with open(grocery / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [str(grocery / r["image"]) for r in rows[start::step][:n]]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A grocery home indexed with the default base pipeline and calibrated (the CLI) on
    60 train photos; 24 other train photos as queries."""
    from conftest import require_data

    from lookalike.cli import main

    grocery = require_data("grocery")
    root = tmp_path_factory.mktemp("hub")
    home = root / "home"
    assert main(["--home", str(home), "-q", "index", "--metadata",
                 str(grocery / "catalog.csv")]) == 0  # fmt: skip
    calib = _train_photos(grocery, 0, 44, 60)
    queries = _train_photos(grocery, 7, 110, 24)
    assert not set(calib) & set(queries)
    listing = root / "calib.csv"
    listing.write_text("image,product_id\n" + "".join(f"{p},LABEL-NOT-READ\n" for p in calib))
    assert main(["--home", str(home), "calibrate", str(listing), "--json"]) == 0
    pristine = root / "pristine"
    shutil.copytree(home, pristine)
    return {"home": home, "pristine": pristine, "calib": calib, "queries": queries,
            "grocery": grocery, "root": root}  # fmt: skip


def _fresh(calibrated, name):
    home = calibrated["root"] / name
    shutil.copytree(calibrated["pristine"], home)
    return home


def _catalog_state(engine):
    ids = engine.catalog.embedded_ids(engine.encoder.stamp)
    vectors = engine.catalog.vectors(ids.tolist()).astype(np.float32)
    owners = engine.catalog.image_products(ids.tolist())
    return ids, vectors, [owners[int(i)][0] for i in ids]


def _brute_force(query, ids, vectors, owners, penalty, k):
    """Top-k (product, cosine of its best image) by the best image's cos - penalty, over
    every catalog image."""
    cos = vectors @ query
    corrected = cos - penalty
    best: dict[str, tuple[float, float]] = {}
    for j in np.argsort(-corrected, kind="stable"):
        best.setdefault(owners[j], (float(corrected[j]), float(cos[j])))
    top = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(pid, c, s) for pid, (c, s) in top]


def test_calibrate_stores_r_of_every_catalog_image(calibrated, capsys):
    from lookalike.engine import Engine

    centre = QueryCentre.load(calibrated["home"] / CENTRE_FILE)
    assert centre.photos == 60 and centre.hub_k == HUB_K
    with Engine(calibrated["home"]) as engine:
        ids, vectors, _ = _catalog_state(engine)
        assert np.array_equal(np.sort(centre.hub_ids), np.sort(ids))
        # r = mean cosine to the 10 nearest calibration photos, embedded as queries are
        pool = engine.embed_queries(calibrated["calib"])
        pipeline = query_pipeline(engine.home, engine.encoder)
    order = np.argsort(centre.hub_ids)
    direct = np.sort(vectors @ pool.T, axis=1)[:, -HUB_K:].mean(axis=1)
    np.testing.assert_allclose(centre.hub_r[order], direct[np.argsort(ids)], atol=1e-5)
    np.testing.assert_allclose(hub_scores(vectors, pool, HUB_K), direct, atol=1e-6)
    assert float(direct.max() - direct.min()) > 0.05  # a real spread, not a constant
    assert pipeline.hub is not None and pipeline.hub.beta == HUB_BETA
    assert pipeline.hub.ids.size == ids.size


def test_photo_search_is_the_brute_force_corrected_ranking(calibrated):
    from lookalike.engine import Engine

    with Engine(calibrated["home"]) as engine:
        ids, vectors, owners = _catalog_state(engine)
        hub = query_pipeline(engine.home, engine.encoder).hub
        penalty = hub.penalty(ids)
        queries = calibrated["queries"]
        vectors_q = engine.embed_queries(queries)
        changed = 0
        for k in (1, 5, 20):
            got = engine.search(queries, k=k)
            for q, results in zip(vectors_q, got, strict=True):
                want = _brute_force(q, ids, vectors, owners, penalty, k)
                assert [r.product_id for r in results] == [pid for pid, _, _ in want]
                # the score shown is the cosine of the image that ranked the product
                np.testing.assert_allclose([r.score for r in results],
                                           [s for _, _, s in want], atol=1e-5)  # fmt: skip
                ranks = [r.score - hub.penalty(np.array([r.image_id]))[0] for r in results]
                assert ranks == sorted(ranks, reverse=True)
                plain = _brute_force(q, ids, vectors, owners, 0 * penalty, k)
                changed += [p for p, _, _ in plain] != [p for p, _, _ in want]
        assert changed > 0  # the correction did reorder real results
        # min_score still filters the cosine
        floor = float(np.median([r.score for r in engine.search(queries[:1], k=20)[0]]))
        kept = engine.search(queries[:1], k=20, min_score=floor)[0]
        want = [w for w in _brute_force(vectors_q[0], ids, vectors, owners, penalty, 81)
                if w[2] >= floor]  # fmt: skip
        assert [r.product_id for r in kept] == [pid for pid, _, _ in want][:20]
        # a catalog image's own bytes still find it first, at score 1
        source = engine.catalog.image(int(ids[3])).source
        first = engine.search([source], k=3)[0][0]
        assert first.product_id == owners[3] and first.score == pytest.approx(1.0, abs=1e-5)


def test_a_strong_correction_widens_the_search_to_stay_exact(calibrated, monkeypatch):
    """beta 3: the corrected top products lie beyond the first candidates fetched by
    cosine (32 images for k 1, with the larger first fetch of a hub-corrected search
    turned off: grocery's 81 images would otherwise all be fetched at once), so only
    the widening keeps the ranking exact."""
    from lookalike import search
    from lookalike.engine import Engine

    monkeypatch.setattr(search, "HUB_FETCH", 1)

    home = _fresh(calibrated, "strong")
    (home / "quality.json").write_text(json.dumps({"hub_correction": 3}))
    queries = calibrated["queries"]
    with Engine(home) as engine:
        ids, vectors, owners = _catalog_state(engine)
        hub = query_pipeline(home, engine.encoder).hub
        assert hub.beta == 3
        penalty = hub.penalty(ids)
        vq = engine.embed_queries(queries)
        beyond = 0
        for k in (1, 3):
            for q, results in zip(vq, engine.search(queries, k=k), strict=True):
                want = _brute_force(q, ids, vectors, owners, penalty, k)
                assert [r.product_id for r in results] == [pid for pid, _, _ in want]
                cos_rank = {owners[j]: n for n, j in enumerate(np.argsort(-(vectors @ q)))}
                beyond += any(cos_rank[pid] >= 32 for pid, _, _ in want)
        assert beyond > 0


def test_off_and_a_centre_file_without_r(calibrated, capsys):
    from lookalike.cli import main
    from lookalike.engine import Engine

    home = _fresh(calibrated, "old")
    queries = calibrated["queries"][:8]
    centre = QueryCentre.load(home / CENTRE_FILE)
    old = QueryCentre(centre.mean, centre.stamp, centre.photos, centre.views, centre.created)
    save_centre(home, old)  # the file an older lookalike wrote: no hub_* arrays
    with np.load(home / CENTRE_FILE) as data:
        assert "hub_r" not in data.files
    with Engine(home) as engine:
        ids, vectors, owners = _catalog_state(engine)
        pipeline = query_pipeline(home, engine.encoder)
        assert pipeline.centre is not None and pipeline.hub is None
        vq = engine.embed_queries(queries)
        for q, results in zip(vq, engine.search(queries, k=5), strict=True):
            want = _brute_force(q, ids, vectors, owners, np.zeros(len(ids)), 5)
            assert [r.product_id for r in results] == [pid for pid, _, _ in want]
        # an engine that stays open (a running server) follows calibrate and --off
        listing = calibrated["root"] / "calib.csv"
        assert main(["--home", str(home), "calibrate", str(listing)]) == 0
        hub = query_pipeline(home, engine.encoder).hub
        assert hub is not None and hub.ids.size == len(ids)
        results = engine.search(queries[:1], k=5)[0]
        want = _brute_force(vq[0], ids, vectors, owners, hub.penalty(ids), 5)
        assert [r.product_id for r in results] == [pid for pid, _, _ in want]
        assert main(["--home", str(home), "calibrate", "--off"]) == 0
        assert not (home / CENTRE_FILE).exists()
        assert query_pipeline(home, engine.encoder).hub is None
        assert query_pipeline(home, engine.encoder).centre is None


def test_quality_json_sets_beta_or_turns_it_off(calibrated):
    from lookalike.engine import Engine
    from lookalike.errors import UsageError

    home = _fresh(calibrated, "beta")
    (home / "quality.json").write_text(json.dumps({"hub_correction": 0.25}))
    with Engine(home) as engine:
        assert query_pipeline(home, engine.encoder).hub.beta == 0.25
        (home / "quality.json").write_text(json.dumps({"hub_correction": False}))
        assert query_pipeline(home, engine.encoder).hub is None
        (home / "quality.json").write_text(json.dumps({"hub_correction": True, "centre": False}))
        assert query_pipeline(home, engine.encoder).hub is None  # r is of centred photos
    assert QualitySettings(hub_correction=True).hub_correction == HUB_BETA
    with pytest.raises(UsageError, match="hub_correction"):
        QualitySettings(hub_correction="yes")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="hub_correction"):
        QualitySettings(hub_correction=-1)


def test_catalog_changes_follow_without_recalibrating(calibrated):
    from lookalike.engine import Engine

    home = _fresh(calibrated, "changes")
    grocery = calibrated["grocery"]
    queries = calibrated["queries"]
    with Engine(home) as engine:
        before, _, owners = _catalog_state(engine)
        hub = query_pipeline(home, engine.encoder).hub
        # a product added after calibrate: its image gets the median r
        photo = _train_photos(grocery, 3, 97, 1)[0]
        engine.add_product({"product_id": "NEW-1", "title": "new"}, [photo])
        (new,) = [row.image_id for row in engine.catalog.images_of("NEW-1")]
        assert new not in set(before.tolist())
        assert hub.penalty(np.array([new]))[0] == pytest.approx(HUB_BETA * hub.median)
        assert hub.median == pytest.approx(float(np.median(hub.r)))
        gone = owners[0]
        engine.remove([gone])
        ids, vectors, owners = _catalog_state(engine)
        penalty = hub.penalty(ids)
        vq = engine.embed_queries(queries)
        for q, results in zip(vq, engine.search(queries, k=10), strict=True):
            want = _brute_force(q, ids, vectors, owners, penalty, 10)
            assert [r.product_id for r in results] == [pid for pid, _, _ in want]
            assert gone not in [r.product_id for r in results]
        # the new product's own photo finds it first (its stored vector, uncorrected)
        assert engine.search([photo], k=1)[0][0].product_id == "NEW-1"


def test_hub_correction_lookup_and_bound():
    corr = HubCorrection.of(np.array([9, 2, 5]), np.array([0.3, 0.1, 0.2]), 0.5)
    np.testing.assert_allclose(corr.penalty(np.array([2, 5, 9, 7, 100])),
                               [0.05, 0.1, 0.15, 0.1, 0.1], atol=1e-7)  # fmt: skip
    assert corr.least == pytest.approx(0.05)
    assert HubCorrection.of(np.array([1]), np.array([0.2]), 0.0) is None
    assert HubCorrection.of(np.array([], dtype=np.int64), np.array([]), 0.5) is None
