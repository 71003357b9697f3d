"""Milvus Lite across processes, as a user meets it: a file made by one `lookalike`
process is reopened and searched by the next one; filter values in any Unicode (and with
quotes, backslashes, line breaks) reach Milvus intact; a second process opening a file
that another process holds gets one clear line naming the fix, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, fashion_products
from live import env, lookalike

from lookalike.errors import BusyError
from lookalike.vectors.milvus_store import MilvusStore, filters_to_expr

# values a shop's metadata may hold: accents, CJK, emoji, quotes, backslashes, control
# characters, a Unicode line separator, and text that looks like an escape
TRICKY = [
    "Café",
    "靴",
    "👠 heels",
    'say "hi"',
    "it's",
    "back\\slash",
    "tab\there",
    "two\nlines",
    "cr\rlf",
    "nul\x00byte",
    "\u2028sep",
    "\\u00e9",
    "plain",
]


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=ROOT,
    )


def test_filter_values_are_quoted_as_milvus_reads_them() -> None:
    assert filters_to_expr({"category": "Café"}) == 'category == "Café"'  # no \\u escapes
    expr = filters_to_expr({"category": ['a"b', "c\\d"], "attrs": {"k": "x\ny"}})
    assert expr == 'category in ["a\\"b", "c\\\\d"] and attrs["k"] == "x\\ny"'


def test_any_unicode_filter_value_finds_exactly_its_rows(tmp_path: Path) -> None:
    store = MilvusStore(str(tmp_path / "u.db"), 4, "t")
    try:
        n = len(TRICKY)
        vecs = np.tile(np.array([[1, 0, 0, 0]], dtype=np.float32), (n, 1))
        rows = [{"category": v, "attrs": {"colour": v}} for v in TRICKY]
        store.add(np.arange(n), vecs, payload=rows)
        for i, value in enumerate(TRICKY):
            for f in ({"category": value}, {"attrs": {"colour": value}}):
                _, got = store.search(vecs[:1], 5, expr=filters_to_expr(f))
                assert got[0].tolist() == [i, -1, -1, -1, -1], (value, f)
        _, got = store.search(vecs[:1], 5, expr=filters_to_expr({"category": TRICKY[:3]}))
        assert sorted(got[0][got[0] >= 0].tolist()) == [0, 1, 2]
    finally:
        store.close()


def test_a_file_made_by_one_process_is_reopened_and_searched_by_another(tmp_path: Path) -> None:
    db = tmp_path / "v.db"
    made = run_python(
        f"""
        import numpy as np
        from lookalike.vectors.milvus_store import MilvusStore
        rng = np.random.default_rng(0)
        v = rng.standard_normal((200, 16)).astype("float32")
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        s = MilvusStore({str(db)!r}, 16, "stamp")
        s.add(np.arange(200) * 7, v, payload=[{{"category": "Café" if i % 2 else "靴"}}
                                               for i in range(200)])
        s.save()
        s.close()
        """
    )
    assert made.returncode == 0, made.stderr
    rng = np.random.default_rng(0)
    v = rng.standard_normal((200, 16)).astype("float32")
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.save(tmp_path / "v.npy", v)
    searched = run_python(
        f"""
        import json, numpy as np
        from lookalike.vectors.milvus_store import MilvusStore, filters_to_expr
        v = np.load({str(tmp_path / "v.npy")!r})
        s = MilvusStore({str(db)!r}, 16, "stamp")
        _, top = s.search(v[:20], 1)
        _, cafe = s.search(v[:1], 5, expr=filters_to_expr({{"category": "Café"}}))
        got = s.get(np.array([7 * 3]))
        print(json.dumps({{"n": len(s), "top": top[:, 0].tolist(), "cafe": cafe[0].tolist(),
                          "err": float(np.abs(got[0] - v[3]).max())}}))
        s.close()
        """
    )
    assert searched.returncode == 0, searched.stderr
    out = json.loads(searched.stdout.strip().splitlines()[-1])
    assert out["n"] == 200
    assert out["top"] == [7 * i for i in range(20)]  # each vector finds itself
    assert out["cafe"] and all(i % 2 for i in (j // 7 for j in out["cafe"]))
    assert out["err"] < 1e-6


def test_cli_index_then_search_in_new_processes_with_unicode_categories(tmp_path: Path) -> None:
    """The issue's report: `index` into v.db succeeds, the next command on v.db died with
    "Collection ... is in state 'released'"; `--category "Café"` crashed."""
    meta = tmp_path / "products.csv"
    rows = fashion_products(meta, 12, category=lambda i: "Café" if i % 2 else '靴 "x"')
    home = tmp_path / "home"
    base = ["--home", str(home), "--vector-store", "v.db"]
    done = lookalike(*base, "index", "--metadata", str(meta))
    assert done.returncode == 0, done.stderr
    for category, parity in (("Café", 1), ('靴 "x"', 0)):
        got = lookalike(*base, "search", rows[0]["image"], "-k", "3", "--json",
                        "--category", category)  # fmt: skip
        assert got.returncode == 0, got.stderr
        hits = json.loads(got.stdout)["results"]
        want = {r["product_id"] for i, r in enumerate(rows) if i % 2 == parity}
        assert len(hits) == 3 and {h["product_id"] for h in hits} <= want
        assert {h["category"] for h in hits} == {category}
    info = lookalike(*base, "info", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["vector_store"]["vectors"] == 12


def hold(db: Path) -> subprocess.Popen:
    """A process that opens `db` (as `serve` does) and keeps it open until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pymilvus import MilvusClient
            client = MilvusClient({str(db)!r})
            print("open", flush=True)
            time.sleep(600)
            """)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )  # fmt: skip
    line = proc.stdout.readline()
    if line.strip() != "open":
        proc.kill()
        pytest.fail(f"the holder did not open {db}: {proc.stderr.read()}")
    return proc


def test_a_second_process_gets_one_clear_error_naming_the_fix(tmp_path: Path) -> None:
    db = tmp_path / "held.db"
    holder = hold(db)
    try:
        with pytest.raises(BusyError) as caught:
            MilvusStore(str(db), 4, "t")
        msg = str(caught.value)
        assert str(db) in msg and "another process" in msg and "milvus://HOST:PORT" in msg
        assert "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    again = MilvusStore(str(db), 4, "t")  # the lock goes with its process
    assert len(again) == 0
    again.close()


def test_cli_beside_a_process_holding_the_file_exits_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    meta = tmp_path / "products.csv"
    rows = fashion_products(meta, 3)
    base = ["--home", str(home), "--vector-store", "v.db"]
    assert lookalike(*base, "index", "--metadata", str(meta)).returncode == 0
    holder = hold(home / "v.db")
    try:
        for args in (("info",), ("search", rows[0]["image"])):
            got = lookalike(*base, *args)
            assert got.returncode == BusyError.exit_code, (args, got.stderr)
            lines = got.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("lookalike: "), got.stderr
            assert "milvus://HOST:PORT" in lines[0]
    finally:
        holder.kill()
        holder.wait()
