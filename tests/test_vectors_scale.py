"""The FAISS store past exact search: index choice, rebuilds, deletes, selective filters.

Vectors: 4,000 real-looking 512-d vectors drawn around the 300 real VGG16 embeddings of
the footwear300 catalog (a seed moved towards another plus noise). The exact-search
limit is lowered so these small catalogs take the approximate path a large one would.
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from lookalike.vectors import open_store
from lookalike.vectors.faiss_index import exact_topk
from lookalike.vectors.faiss_store import FaissStore
from lookalike.vectors.planning import choose_index

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
VGG = DATA / "footwear300/models/feature_vector_store.p"
N = 4000
EXACT_LIMIT = 1000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    if not VGG.exists():
        pytest.skip(f"real data not found at {DATA}")
    with open(VGG, "rb") as fh:
        seeds = np.asarray(pickle.load(fh), dtype=np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    rng = np.random.default_rng(0)

    def draw(n: int) -> np.ndarray:
        a, b = rng.integers(0, len(seeds), (2, n))
        t = rng.uniform(0, 0.5, (n, 1)).astype(np.float32)
        x = seeds[a] * (1 - t) + seeds[b] * t
        x += 0.03 * rng.standard_normal(x.shape).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(N), draw(60)


def recall10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def grown_store(path: Path, x: np.ndarray, **kw) -> FaissStore:
    store = FaissStore(path, x.shape[1], "vgg", background=False, exact_limit=EXACT_LIMIT, **kw)
    for lo in range(0, len(x), 500):
        store.add(np.arange(lo, lo + 500), x[lo : lo + 500])
    return store


@pytest.fixture(scope="module")
def approx_dir(tmp_path_factory, data) -> Path:
    x, _ = data
    path = tmp_path_factory.mktemp("approx") / "vectors"
    grown_store(path, x).close()
    return path


def test_index_follows_catalog_size_and_says_why(approx_dir: Path, data) -> None:
    x, q = data
    store = FaissStore(approx_dir, 512, "vgg", background=False, exact_limit=EXACT_LIMIT)
    info = store.describe()
    assert info["index_type"] == "ivf-pq-sq8"
    # trained when the catalog passed the exact limit (1,500 after three batches of 500),
    # retrained when it had more than doubled (3,500), not since
    assert f"vectors > {EXACT_LIMIT:,} for exact search" in info["index_reason"]
    assert info["index_params"]["trained_for"] == 3500
    assert "grew from 1,500 to 3,500" in info["last_rebuild"]["reason"]
    assert info["index_params"]["nprobe"] >= 1
    assert info["index_params"]["tuned_recall_at_10"] >= 0.9
    assert info["last_rebuild"]["ok"] is True
    assert info["pending_rebuild"] is None
    assert (approx_dir / info_index_file(approx_dir)).exists()
    _, got = store.search(q, 10)
    _, want = exact_topk(q, x, np.arange(N), 10)
    assert recall10(got, want) >= 0.9


def info_index_file(directory: Path) -> str:
    import json

    return json.loads((directory / "store.json").read_text())["index_file"]


def test_deletes_and_updates_on_approximate_index(tmp_path: Path, data) -> None:
    x, q = data
    store = grown_store(tmp_path / "v", x)
    assert store.describe()["index_type"] == "ivf-pq-sq8"
    # a few removals: tombstones excluded inside FAISS, no rebuild
    gone = np.arange(0, N, 40)
    store.remove(gone)
    assert store.describe()["tombstones"] == len(gone)
    _, got = store.search(np.concatenate([q, x[gone]]), 50)
    assert not np.isin(got, gone).any()
    # an update moves id 1 to the vector of id 2001: a search for it finds both
    store.add(np.array([1]), x[2001:2002])
    _, got = store.search(x[2001:2002], 2)
    assert set(got[0]) == {1, 2001}
    # many removals trigger a compacting rebuild; still never returned
    many = np.arange(1, N, 2)
    store.remove(many)
    info = store.describe()
    assert info["tombstones"] == 0 and info["vectors"] == N - len(gone) - len(many)
    assert "compaction" in info["last_rebuild"]["reason"]
    _, got = store.search(np.concatenate([q, x[many[:50]]]), 50)
    assert not np.isin(got, np.concatenate([gone, many])).any()


def test_selective_filter_is_exact_and_broad_filter_stays_inside(approx_dir, data) -> None:
    x, q = data
    store = FaissStore(approx_dir, 512, "vgg", background=False, exact_limit=EXACT_LIMIT)
    rng = np.random.default_rng(3)
    allowed = rng.choice(N, N // 100, replace=False)  # 1%: searched exactly
    s, got = store.search(q, 10, allowed_ids=allowed)
    ws, want = exact_topk(q, x[np.sort(allowed)], np.sort(allowed), 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(s, ws, rtol=1e-5, atol=1e-6)
    broad = rng.choice(N, N // 2, replace=False)  # 50%: inside the index
    _, got = store.search(q, 10, allowed_ids=broad)
    assert np.isin(got, broad).all()
    _, want = exact_topk(q, x[np.sort(broad)], np.sort(broad), 10)
    assert recall10(got, want) >= 0.85


def test_reopen_replays_the_log_tail(tmp_path: Path, data) -> None:
    x, q = data
    store = grown_store(tmp_path / "v", x[:2500])
    store.save()
    before = store.search(q, 10)[1]
    index_file = info_index_file(tmp_path / "v")
    # a small tail that is saved in the log but not (yet) in the index file
    store.add(np.arange(2500, 2700), x[2500:2700])
    store.save()
    assert info_index_file(tmp_path / "v") == index_file
    after = store.search(q, 10)[1]
    store.close()
    again = FaissStore(tmp_path / "v", 512, "vgg", background=False, exact_limit=EXACT_LIMIT)
    assert len(again) == 2700
    np.testing.assert_array_equal(again.search(q, 10)[1], after)
    assert again.search(x[2600:2601], 1)[1][0, 0] == 2600
    assert before.shape == after.shape


def test_rebuild_runs_in_background_and_catches_up(tmp_path: Path, data) -> None:
    x, q = data
    store = grown_store(tmp_path / "v", x[:2000])
    store.background = True
    gate, reached = threading.Event(), threading.Event()

    def hook(stage: str) -> None:
        if stage == "built":
            reached.set()
            assert gate.wait(60)

    store._rebuild_hook = hook
    store.rebuild("test", wait=False)
    assert reached.wait(60) and store.rebuilding
    # while the new index waits to be swapped in, the live one serves and takes updates
    _, got = store.search(q, 10)
    assert (got >= 0).all()
    store.add(np.arange(2000, 2100), x[2000:2100])
    store.remove(np.array([5, 6, 2050]))
    assert store.search(x[2010:2011], 1)[1][0, 0] == 2010
    gate.set()
    assert store.wait_for_rebuild(60)
    info = store.describe()
    assert info["last_rebuild"]["ok"] and info["vectors"] == 2097
    assert store.search(x[2020:2021], 1)[1][0, 0] == 2020  # added during the rebuild
    _, got = store.search(x[[5, 6, 2050]], 20)
    assert not np.isin(got, [5, 6, 2050]).any()  # removed during the rebuild
    store.close()


def test_failed_rebuild_leaves_last_good_index(tmp_path: Path, data) -> None:
    x, q = data
    store = grown_store(tmp_path / "v", x[:2000])
    store.save()
    plan_before = store.describe()["index_params"]
    want = store.search(q, 10)

    def crash(stage: str) -> None:
        if stage == "trained":
            raise MemoryError("simulated crash during the rebuild")

    store._rebuild_hook = crash
    store.rebuild("test")
    info = store.describe()
    assert info["last_rebuild"]["ok"] is False and "simulated" in info["last_rebuild"]["error"]
    assert info["index_params"] == plan_before
    got = store.search(q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    store._rebuild_hook = None
    store.close()
    files = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert len([f for f in files if f.startswith("raw-")]) == 1, files
    again = FaissStore(tmp_path / "v", 512, "vgg", background=False, exact_limit=EXACT_LIMIT)
    np.testing.assert_array_equal(again.search(q, 10)[1], want[1])


def test_memory_budget_chooses_the_index() -> None:
    gib = 1 << 30
    assert choose_index(5_000, 1280).kind == "flat"
    big = choose_index(1_000_000, 1280, 8 * gib)
    assert big.kind == "ivf-pq-sq8" and "budget" in big.reason
    assert big.params["bytes_per_vector"] <= 1.5 * 1024
    assert choose_index(1_000_000, 1280, 1 * gib).kind == "ivf-pq-sq4"
    small = choose_index(1_000_000, 1280, 200 << 20)
    assert small.kind == "opq-ivf-pq"
    over = choose_index(100_000_000, 1280, 200 << 20)
    assert "raise --memory-budget" in over.reason
    # exact search also needs its vectors to fit
    assert choose_index(5_000, 1280, 10 << 20).kind != "flat"
    # hysteresis: an approximate index stays until the catalog is well below the limit
    assert choose_index(11_000, 1280, current=big).kind == "ivf-pq-sq8"
    assert choose_index(5_000, 1280, current=big).kind == "flat"
    # the default model's 1,632-d: the 8-bit re-rank copy would pass 1.5 KB a vector
    wide = choose_index(1_000_000, 1632, 8 * gib)
    assert wide.kind == "ivf-pq-sq6" and wide.params["bytes_per_vector"] <= 1.5 * 1024


def test_six_bit_rerank_store_for_wide_vectors(tmp_path: Path, data) -> None:
    """A 1,632-d catalog gets the 6-bit re-rank index; it finds the exact neighbours
    and honours removals like the others."""
    x, q = data
    rng = np.random.default_rng(1)
    lift = rng.standard_normal((512, 1632)).astype(np.float32) / np.sqrt(512)
    wide = x @ lift
    wide /= np.linalg.norm(wide, axis=1, keepdims=True)
    wq = q @ lift
    wq /= np.linalg.norm(wq, axis=1, keepdims=True)
    store = grown_store(tmp_path / "v", wide)
    assert store.describe()["index_type"] == "ivf-pq-sq6"
    truth = exact_topk(wq, wide, np.arange(len(wide)), 10)[1]
    assert recall10(store.search(wq, 10)[1], truth) >= 0.95
    store.remove(truth[:, 0])
    assert not np.isin(store.search(wq, 10)[1], truth[:, 0]).any()
    store.close()


def test_open_store_passes_the_memory_budget(tmp_path: Path) -> None:
    store = open_store(None, tmp_path, 64, "s", memory_budget_bytes=123 << 20)
    assert store.describe()["memory_budget_bytes"] == 123 << 20
    assert "123 MiB budget" in store.describe()["index_reason"]


def test_tiny_budget_compressed_index_reranks_from_the_log(tmp_path: Path, data) -> None:
    x, q = data
    x = x[:2500]  # one (slow) OPQ training, at 1,500
    store = grown_store(tmp_path / "v", x, memory_budget_bytes=9_000_000)
    info = store.describe()
    assert info["index_type"] == "opq-ivf-pq", info["index_reason"]
    assert "9 MiB budget" in info["index_reason"]
    assert info["index_params"]["bytes_per_vector"] < 200  # vs 2,048 B exact
    _, got = store.search(q, 10)
    _, want = exact_topk(q, x, np.arange(len(x)), 10)
    assert recall10(got, want) >= 0.9  # candidates re-scored exactly from the log
    store.remove(np.arange(0, len(x), 3))
    _, got = store.search(q, 10)
    assert not np.isin(got, np.arange(0, len(x), 3)).any() and (got >= 0).all()
