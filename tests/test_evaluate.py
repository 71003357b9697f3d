"""lookalike.evaluate: metric functions on fixed rankings, label parsing, leave-one-out on
vectors whose answer is known, and `run_eval` on a tiny real catalog whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import InputPathError, MetadataError, UsageError
from lookalike.evaluate import (
    average_precision_at_k,
    draw_failures,
    first_rank,
    format_report,
    leave_one_out_precision,
    parse_ks,
    precision_at_k,
    read_labels,
    recall_at_k,
    report_json,
    summarise_ranks,
    unique_in_order,
    worst_misses,
)

# --------------------------------------------------------------------------- metrics


def test_recall_at_k_on_a_fixed_ranking():
    ranking = ["b", "c", "a", "d"]
    assert recall_at_k(ranking, "a", 1) == 0.0
    assert recall_at_k(ranking, "a", 2) == 0.0
    assert recall_at_k(ranking, "a", 3) == 1.0
    assert recall_at_k(ranking, "a", 10) == 1.0
    assert recall_at_k(ranking, "z", 10) == 0.0
    assert recall_at_k(ranking, {"z", "c"}, 2) == 1.0


def test_first_rank_is_one_based_and_none_when_absent():
    assert first_rank(["x", "y"], "x") == 1
    assert first_rank(["x", "y"], "y") == 2
    assert first_rank(["x", "y"], "q") is None


def test_average_precision_single_relevant_is_reciprocal_rank_within_k():
    ranking = ["b", "c", "a", "d"]
    assert average_precision_at_k(ranking, "a", 10) == pytest.approx(1 / 3)
    assert average_precision_at_k(ranking, "b", 10) == 1.0
    assert average_precision_at_k(ranking, "a", 2) == 0.0


def test_average_precision_several_relevant():
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision_at_k(["a", "x", "b", "y"], {"a", "b"}, 4) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    # only one of two relevant fits in k=2: (1/1) / min(2, 2)
    assert average_precision_at_k(["a", "x", "b"], {"a", "b"}, 2) == pytest.approx(0.5)
    # a duplicated relevant item is counted once
    assert average_precision_at_k(["a", "a", "b"], {"a", "b"}, 3) == pytest.approx((1 + 2 / 3) / 2)


def test_precision_at_k_counts_short_rankings_as_misses():
    assert precision_at_k([1, 2, 3, 4], lambda x: x % 2 == 0, 4) == 0.5
    assert precision_at_k([2], lambda x: True, 4) == 0.25


def test_summarise_ranks_recall_and_map():
    ranks = [1, 2, None, 6, 1]
    out = summarise_ranks(ranks, [1, 5, 10])
    assert out["recall"] == {"1": 0.4, "5": 0.6, "10": 0.8}
    assert out["map"]["1"] == pytest.approx(2 / 5)
    assert out["map"]["5"] == pytest.approx((1 + 0.5 + 1) / 5)
    assert out["map"]["10"] == pytest.approx((1 + 0.5 + 1 / 6 + 1) / 5)


def test_parse_ks():
    assert parse_ks("10,1,5,5") == [1, 5, 10]
    assert parse_ks([3]) == [3]
    for bad in ("", "a", "0", "1,-2"):
        with pytest.raises(UsageError):
            parse_ks(bad)
    with pytest.raises(UsageError):
        recall_at_k(["a"], "a", 0)


def test_unique_in_order():
    assert unique_in_order(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


# --------------------------------------------------------------------------- leave-one-out


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_leave_one_out_on_known_vectors():
    # Two clusters; p1 has two images (its own second image must not count as a neighbour).
    vectors = _unit(
        [
            [1.0, 0.0, 0.0],  # p1 heels
            [0.99, 0.1, 0.0],  # p1 heels (same product)
            [0.95, 0.2, 0.0],  # p2 heels
            [0.9, 0.3, 0.0],  # p3 flats (near the heels)
            [0.0, 1.0, 0.0],  # p4 flats
            [0.0, 0.95, 0.2],  # p5 flats
        ]
    )
    pids = ["p1", "p1", "p2", "p3", "p4", "p5"]
    values = ["heels", "heels", "heels", "flats", "flats", "flats"]
    out = leave_one_out_precision(vectors, pids, values, k=1)
    # nearest other product: p1a->p2 (heels, hit), p1b->p2 (hit), p2->p1 (hit),
    # p3->p2 (flats vs heels: miss), p4->p5 (hit), p5->p4 (hit)
    assert out["queries"] == 6
    assert out["precision"] == pytest.approx(5 / 6)
    assert out["per_value"]["flats"] == pytest.approx(2 / 3)
    assert out["per_value"]["heels"] == 1.0
    out2 = leave_one_out_precision(vectors, pids, values, k=2)
    # p1a: p2 (hit), p3 (miss) -> 0.5; p1b same; p2: p1 (hit), p3 (miss) -> .5
    # p3: p2, p1 -> 0 ; p4: p5 (hit), then p3 (hit) -> 1; p5: p4, p3 -> 1
    assert out2["precision"] == pytest.approx((0.5 + 0.5 + 0.5 + 0 + 1 + 1) / 6)


def test_leave_one_out_skips_images_without_a_value():
    vectors = _unit([[1, 0], [0.9, 0.1], [0, 1]])
    out = leave_one_out_precision(vectors, ["a", "b", "c"], ["x", None, "x"], k=1)
    assert out["skipped"] == 1
    # a's nearest other product is b (no value: never a match); c's nearest is b too.
    assert out["precision"] == 0.0


# --------------------------------------------------------------------------- labels


def _write_image(path: Path, colour=(200, 30, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)


def test_read_labels_resolves_paths_relative_to_the_csv(tmp_path):
    _write_image(tmp_path / "photos" / "a.jpg")
    (tmp_path / "labels.csv").write_text("image,product_id\nphotos/a.jpg,P1\n\n")
    labels = read_labels(tmp_path / "labels.csv")
    assert len(labels) == 1
    assert labels[0].image == (tmp_path / "photos" / "a.jpg").resolve()
    assert labels[0].product_id == "P1"
    assert labels[0].line == 2


def test_read_labels_reports_file_and_line(tmp_path):
    _write_image(tmp_path / "a.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,product_id\na.jpg,P1\nmissing.jpg,P2\na.jpg,\n")
    with pytest.raises(MetadataError) as err:
        read_labels(labels)
    text = str(err.value)
    assert f"{labels}:3: image not found: missing.jpg" in text
    assert f"{labels}:4: empty product_id" in text


def test_read_labels_needs_the_columns_and_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,P1\n")
    with pytest.raises(MetadataError, match="image,product_id"):
        read_labels(bad)
    with pytest.raises(InputPathError):
        read_labels(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("image,product_id\n")
    with pytest.raises(MetadataError, match="no labelled queries"):
        read_labels(empty)


# --------------------------------------------------------------------------- reports


def _report(per_query):
    ranks = [q["rank"] for q in per_query]
    return {
        "mode": "queries",
        "labels": "labels.csv",
        "queries": len(per_query),
        "products": 3,
        "k": [1, 5],
        **summarise_ranks(ranks, [1, 5]),
        "ms_per_query": 12.0,
        "p50_ms": 11.0,
        "p95_ms": 20.0,
        "per_query": per_query,
    }


def test_worst_misses_order_and_formatting(tmp_path):
    _write_image(tmp_path / "q1.png")
    _write_image(tmp_path / "c1.png", (20, 200, 20))
    per_query = [
        {"image": str(tmp_path / "q1.png"), "product_id": "A", "rank": 1, "top": ["A"],
         "top_score": 0.9, "top_image": str(tmp_path / "c1.png"), "right_score": 0.9,
         "right_image": str(tmp_path / "c1.png")},
        {"image": str(tmp_path / "q1.png"), "product_id": "B", "rank": 2, "top": ["A", "B"],
         "top_score": 0.8, "top_image": str(tmp_path / "c1.png"), "right_score": 0.7,
         "right_image": str(tmp_path / "c1.png")},
        {"image": str(tmp_path / "q1.png"), "product_id": "C", "rank": None, "top": ["A"],
         "top_score": 0.5, "top_image": str(tmp_path / "c1.png"), "right_score": None,
         "right_image": None},
    ]  # fmt: skip
    report = _report(per_query)
    assert [q["product_id"] for q in worst_misses(report)] == ["C", "B"]
    text = format_report(report)
    assert "3 queries against 3 products" in text
    assert "0.3333" in text  # Recall@1
    data = json.loads(report_json(report))
    assert data["recall"]["5"] == pytest.approx(2 / 3)
    assert "per_query" not in data
    assert len(json.loads(report_json(report, per_query=True))["per_query"]) == 3
    out = draw_failures(report, tmp_path / "fail.png")
    from PIL import Image

    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.height > 2 * 160  # two miss rows
        # the query thumbnail (red) was drawn into the first column of the first row
        r, g, b = sheet.convert("RGB").getpixel((8 + 80, 24 + 80))
        assert r > 150 and g < 80


# --------------------------------------------------------------------------- real engine


def _pattern(kind: str, size: int = 200):
    """Three images a CNN tells apart easily: a red disc, blue stripes, a green checker."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    if kind == "disc":
        draw.ellipse((30, 30, size - 30, size - 30), fill=(220, 20, 20))
    elif kind == "stripes":
        for x in range(0, size, 20):
            draw.rectangle((x, 0, x + 9, size), fill=(20, 40, 200))
    else:
        for y in range(0, size, 25):
            for x in range(0, size, 25):
                if (x // 25 + y // 25) % 2:
                    draw.rectangle((x, y, x + 24, y + 24), fill=(20, 160, 40))
    return img


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from lookalike.engine import Engine

    root = tmp_path_factory.mktemp("tiny-eval")
    catalog = root / "catalog"
    catalog.mkdir()
    rows = ["product_id,image,title,category"]
    for pid, kind, category in (
        ("DISC", "disc", "round"),
        ("STRIPES", "stripes", "lined"),
        ("CHECKER", "checker", "lined"),
    ):
        _pattern(kind).save(catalog / f"{pid}.png")
        rows.append(f"{pid},{pid}.png,{kind},{category}")
    (catalog / "catalog.csv").write_text("\n".join(rows) + "\n")
    engine = Engine(root / "home")
    engine.index(metadata=catalog / "catalog.csv", progress=False)
    yield engine, root
    engine.close()


def test_run_eval_gives_exactly_the_expected_recall(tiny_engine):
    from lookalike.evaluate import run_eval

    engine, root = tiny_engine
    queries = root / "queries"
    queries.mkdir(exist_ok=True)
    _pattern("disc").save(queries / "disc.jpg", quality=95)
    _pattern("stripes").save(queries / "stripes.jpg", quality=95)
    _pattern("checker").save(queries / "checker.jpg", quality=95)
    # The fourth photo shows the disc but is labelled STRIPES: it must miss at K=1.
    (queries / "labels.csv").write_text(
        "image,product_id\ndisc.jpg,DISC\nstripes.jpg,STRIPES\nchecker.jpg,CHECKER\n"
        "disc.jpg,STRIPES\n"
    )
    report = run_eval(engine, queries / "labels.csv", [1, 3])
    assert report["queries"] == 4
    assert report["products"] == 3
    assert report["recall"]["1"] == 0.75
    assert report["recall"]["3"] == 1.0  # only three products: all are returned
    ranks = [q["rank"] for q in report["per_query"]]
    assert ranks[:3] == [1, 1, 1]
    assert ranks[3] in (2, 3)
    assert report["map"]["1"] == 0.75
    assert report["map"]["3"] == pytest.approx((3 + 1 / ranks[3]) / 4)
    assert report["per_query"][3]["top"][0] == "DISC"
    assert report["p50_ms"] > 0


def test_run_eval_names_unknown_products(tiny_engine, tmp_path):
    from lookalike.evaluate import run_eval

    engine, _ = tiny_engine
    _pattern("disc").save(tmp_path / "q.png")
    (tmp_path / "labels.csv").write_text("image,product_id\nq.png,DISC\nq.png,NOPE\n")
    with pytest.raises(MetadataError, match=r"labels.csv:3: product 'NOPE' is not in the catalog"):
        run_eval(engine, tmp_path / "labels.csv")


def test_leave_one_out_on_the_tiny_catalog(tiny_engine):
    from lookalike.evaluate import run_leave_one_out

    engine, _ = tiny_engine
    report = run_leave_one_out(engine, "category", k=2)
    assert report["queries"] == 3
    # DISC (round): no other round product -> 0 of 2. STRIPES/CHECKER (lined): each
    # has one other lined product among the 2 others -> 1/2 each.
    assert report["precision"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    # among the two lined products only: each finds the other first -> 1/1 at k=1
    lined = run_leave_one_out(engine, "category", k=1, among={"STRIPES", "CHECKER"})
    assert lined["queries"] == 2 and lined["images"] == 2 and lined["precision"] == 1.0
    with pytest.raises(UsageError, match="no product has a field"):
        run_leave_one_out(engine, "no-such-field", k=2)


def test_cli_eval_prints_json_and_draws_failures(tiny_engine, tmp_path, capsys):
    from lookalike.cli import main

    engine, root = tiny_engine
    home = engine.home
    engine.close()  # the CLI opens the home itself
    _pattern("disc").save(tmp_path / "q.png")
    (tmp_path / "labels.csv").write_text("image,product_id\nq.png,DISC\nq.png,CHECKER\n")
    code = main(
        ["--home", str(home), "eval", "--queries", str(tmp_path / "labels.csv"), "-k", "1",
         "--json", "--failures", str(tmp_path / "miss.png")]
    )  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recall"] == {"1": 0.5}
    assert (tmp_path / "miss.png").stat().st_size > 0
    code = main(["--home", str(home), "eval", "--leave-one-out", "--field", "category", "-k", "2"])
    assert code == 0
    assert "precision@2" in capsys.readouterr().out
    assert main(["--home", str(home), "eval", "--queries", str(tmp_path / "nope.csv")]) == 3


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def grocery_engine(tmp_path_factory):
    from conftest import require_data

    from lookalike.engine import Engine

    grocery = require_data("grocery")
    engine = Engine(tmp_path_factory.mktemp("grocery-eval") / "home")
    engine.index(metadata=grocery / "catalog.csv", progress=False)
    yield engine, grocery
    engine.close()


def test_eval_on_real_grocery_photos(grocery_engine, tmp_path):
    from lookalike.evaluate import run_eval

    engine, grocery = grocery_engine
    # Each catalog image searched for itself must come first: Recall@1 is exactly 1.
    rows = (grocery / "catalog.csv").read_text().splitlines()[1:]
    own = tmp_path / "own.csv"
    own.write_text(
        "image,product_id\n"
        + "\n".join(f"{grocery / r.split(',')[1]},{r.split(',')[0]}" for r in rows[:20])
    )
    report = run_eval(engine, own, [1])
    assert report["queries"] == 20
    assert report["recall"]["1"] == 1.0
    # Real shopper photos (paths relative to the CSV): a sane, non-trivial report.
    val = (grocery / "val.csv").read_text().splitlines()
    subset = tmp_path / "val30.csv"
    subset.write_text(
        "image,product_id\n" + "\n".join(f"{grocery / line}" for line in val[1:][::10])
    )
    report = run_eval(engine, subset, [1, 5, 10])
    assert report["queries"] == 30
    assert 0.0 < report["recall"]["1"] <= report["recall"]["5"] <= report["recall"]["10"] <= 1.0
    assert report["map"]["10"] <= report["recall"]["10"]


def test_leave_one_out_on_real_fashion_subset(tmp_path):
    from conftest import require_data

    from lookalike.engine import Engine
    from lookalike.evaluate import run_leave_one_out

    fashion = require_data("fashion-footwear")
    lines = (fashion / "catalog.csv").read_text().splitlines()
    subset = tmp_path / "catalog.csv"
    subset.write_text(
        "\n".join(
            [lines[0]]
            + [line.replace("images/", f"{fashion}/images/", 1) for line in lines[1:][::20]]
        )  # fmt: skip
    )
    with Engine(tmp_path / "home") as engine:
        engine.index(metadata=subset, progress=False)
        report = run_leave_one_out(engine, "category", k=5)
    assert report["queries"] == len(lines[1:][::20])
    # far better than picking neighbours at random: the chance that another product
    # shares the query's category is sum n_c (n_c - 1) / n (n - 1) (0.24 here)
    counts = np.array(list(report["per_value_count"].values()), dtype=float)
    chance = (counts * (counts - 1)).sum() / (counts.sum() * (counts.sum() - 1))
    assert report["precision"] > 1.8 * chance, (report["precision"], chance)
    with Engine(tmp_path / "home") as engine:
        by_colour = run_leave_one_out(engine, "colour", k=5)  # an attribute column
    assert by_colour["field"] == "colour"
    assert 0.0 < by_colour["precision"] < 1.0
    assert "Black" in by_colour["per_value"]
    assert set(report["per_value"]) <= {
        "Heels", "Flats", "Sports Shoes", "Casual Shoes", "Flip Flops", "Sports Sandals", "Sandals"
    }  # fmt: skip
