"""Reliability figures for one home used by several processes (docs/reliability.md).

    .venv/bin/python benchmarks/bench_reliability.py \
        [--section kill-index|kill-api|beside|all] [--kills 24] [--seed 1] [--json FILE]

Every section runs the real CLI and a real `lookalike serve` as subprocesses on the
footwear300 images (../shared/data) and ends with the same check of the home
(`verify`): the catalog's products are exactly the ones that should be there; the vector
store holds exactly the catalog's image ids, each with the catalog's vector; and every
catalog vector equals a fresh embedding of its file (cosine > 0.9999).

- kill-index: a folder that changes between rounds (files rewritten with another photo,
  deleted, added); each round starts `lookalike index` on it and kills it with kill -9 at a
  random moment; then one last `index` resumes to the end.
- kill-api: `lookalike serve` takes API writes (add, patch, delete) from a client and is
  killed with kill -9 at a random moment, then restarted, again and again. A write the
  server acknowledged must survive (0 lost); one that was cut off may or may not have.
- beside: `lookalike index` of a new folder in a second process while the server takes
  API adds and deletes; then how long until the server answers for the indexed products.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
DATA = (ROOT / "../shared/data").resolve()

from live import Serve, lookalike, lookalike_bg  # noqa: E402

from lookalike.engine import Engine  # noqa: E402
from lookalike.images import load_image  # noqa: E402


def verify(home: Path, want_products: set[str]) -> dict:
    """Check a home against its files (see module doc); counts of every disagreement."""
    with Engine(home) as engine:
        catalog, encoder = engine.catalog, engine.encoder
        ids = np.sort(catalog.embedded_ids(encoder.stamp))
        rows = [catalog.image(int(i)) for i in ids]
        products = {row.product_id for row in rows}
        store_ids = np.sort(engine.store.ids())
        truth = catalog.vectors(ids.tolist()) if len(ids) else np.zeros((0, encoder.dim))
        common = np.intersect1d(ids, store_ids)
        stored = engine.store.get(common) if len(common) else np.zeros((0, encoder.dim))
        by_id = {int(i): k for k, i in enumerate(ids)}
        wrong_in_store = int(
            sum(
                np.max(np.abs(stored[k] - truth[by_id[int(i)]])) > 1e-6
                for k, i in enumerate(common)
            )
        )
        stale = 0
        for row, vector in zip(rows, truth, strict=True):
            image = load_image(Path(row.source), draft_size=encoder.draft_size)
            fresh = encoder.embed(encoder.prepare(image)[None])[0]
            stale += float(np.dot(fresh, vector)) < 0.9999
    return {
        "images": int(len(ids)),
        "products_missing": len(want_products - products),
        "products_extra": len(products - want_products),
        "store_missing": int(len(np.setdiff1d(ids, store_ids))),
        "store_extra": int(len(np.setdiff1d(store_ids, ids))),
        "store_vector_wrong": wrong_in_store,
        "catalog_vector_stale": int(stale),
        "disagreements": int(
            len(want_products ^ products)
            + len(np.setxor1d(ids, store_ids))
            + wrong_in_store
            + stale
        ),
    }


def footwear() -> list[Path]:
    files = sorted((DATA / "footwear300" / "data").glob("*.jpg"))
    if len(files) < 200:
        raise SystemExit(f"footwear300 not found under {DATA}")
    return files


# --------------------------------------------------------------------------- kill -9 of index


def mutate(folder: Path, pool: list[Path], rng: random.Random, names: list[str]) -> None:
    """Between rounds: 25 files get another photo, 5 go, 8 new ones come. Every new photo
    is a fresh random crop of a catalog one, so each is encoded, not copied."""
    present = sorted(p.stem for p in folder.glob("*.jpg"))
    for name in rng.sample(present, min(25, len(present))):
        variant(rng.choice(pool), folder, rng, name)
    for name in rng.sample(present, 5):
        (folder / f"{name}.jpg").unlink(missing_ok=True)
    for _ in range(8):
        name = f"p{len(names):04d}"
        names.append(name)
        variant(rng.choice(pool), folder, rng, name)


def landed(home: Path) -> tuple[bool, tuple]:
    """Where a kill landed, read from the catalog: inside a write (the clean mark is
    empty while a writer holds the home) and what the catalog's images look like."""
    import sqlite3

    db = sqlite3.connect(f"file:{home / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        mark = db.execute("SELECT value FROM meta WHERE key='store_clean'").fetchone()
        shape = db.execute(
            "SELECT count(*), coalesce(max(image_id), 0), coalesce(sum(unicode(sha256)), 0)"
            " FROM images"
        ).fetchone()
    finally:
        db.close()
    return (mark is not None and mark[0] == ""), tuple(shape)


def timed_index(home: Path, folder: Path) -> float:
    started = time.monotonic()
    done = lookalike("--home", str(home), "index", str(folder))
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started


def kill_index(work: Path, kills: int, rng: random.Random) -> dict:
    """Kill -9 `index` at random moments of runs over a changing folder (see module doc)
    until `kills` runs were killed before they finished; then resume and verify."""
    pool = footwear()
    folder = work / "shop"
    folder.mkdir()
    names: list[str] = []
    for path in pool[:150]:
        name = f"p{len(names):04d}"
        names.append(name)
        shutil.copy(path, folder / f"{name}.jpg")
    home = work / "home"
    full = timed_index(home, folder)
    mutate(folder, pool, rng, names)
    round_s = timed_index(home, folder)  # what one round's run takes, start-up included
    delays, finished, inside, wrote = [], 0, 0, 0
    while len(delays) < kills and finished < 3 * kills:
        mutate(folder, pool, rng, names)
        delay = rng.uniform(0.2, 1.0) * round_s
        before = landed(home)[1]
        proc = lookalike_bg("--home", str(home), "index", str(folder), log=work / "index.log")
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            delays.append(round(delay, 2))
            in_write, after = landed(home)
            inside += in_write
            wrote += after != before
        else:
            finished += 1
        proc.wait()
    timed_index(home, folder)  # resume to the end
    report = verify(home, {p.stem for p in folder.glob("*.jpg")})
    report.update(
        kills=len(delays),
        kills_inside_a_write=inside,
        kills_after_the_run_had_written=wrote,
        runs_that_finished_first=finished,
        kill_at_s=delays,
        first_index_s=round(full, 1),
        round_index_s=round(round_s, 1),
    )
    return report


# --------------------------------------------------------------------------- kill -9 of serve


def variant(photo: Path, folder: Path, rng: random.Random, name: str) -> Path:
    """A new photo from a catalog one (random crop): every API product its own bytes."""
    from PIL import Image

    with Image.open(photo) as image:
        image = image.convert("RGB")
        w, h = image.size
        dx, dy = rng.randint(0, w // 8), rng.randint(0, h // 8)
        image = image.crop((dx, dy, w - rng.randint(0, w // 8), h - rng.randint(0, h // 8)))
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
    return path


class Writer(threading.Thread):
    """API writes until stopped (70% adds of a new product, 15% price patches, 15%
    deletes); `state` records what the server acknowledged and what was in flight."""

    def __init__(self, server: Serve, pool: list[Path], rng: random.Random, state: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.pool, self.rng, self.state = server, pool, rng, state
        self.stop = threading.Event()

    def run(self) -> None:
        state, rng = self.state, self.rng
        while not self.stop.is_set():
            try:
                roll = rng.random()
                if roll < 0.7 or not state["live"]:
                    pid = f"api{state['next']:04d}"
                    state["next"] += 1
                    photo = variant(rng.choice(self.pool), state["photos"], rng, pid)
                    state["in_flight"] = pid
                    got = self.server.add(pid, photo)
                    if got.status_code == 201:
                        state["live"].add(pid)
                        state["acked"] += 1
                elif roll < 0.85:
                    pid = rng.choice(sorted(state["live"]))
                    got = self.server.client.patch(
                        f"/products/{pid}", json={"price": rng.randint(1, 99)}, headers=auth()
                    )
                    state["acked"] += got.status_code == 200
                else:
                    pid = rng.choice(sorted(state["live"]))
                    state["live"].discard(pid)
                    state["in_flight"] = pid
                    got = self.server.client.delete(f"/products/{pid}", headers=auth())
                    if got.status_code in (200, 204):
                        state["deleted"].add(pid)
                        state["acked"] += 1
                state["in_flight"] = None
            except Exception:  # noqa: BLE001 - the server was killed under the request
                return


def auth() -> dict:
    from live import API_KEY

    return {"Authorization": f"Bearer {API_KEY}"}


def reconcile(state: dict, listed: set[str]) -> tuple[int, int]:
    """After a restart: acknowledged products that are gone (lost) and acknowledged
    deletes that came back; then the listing is the truth (the write in flight when the
    server died may have gone either way)."""
    lost = len(state["live"] - listed)
    back = len(state["deleted"] & listed)
    state["live"] = {p for p in listed if p.startswith("api")}
    state["in_flight"] = None
    return lost, back


def kill_api(work: Path, kills: int, rng: random.Random) -> dict:
    pool = footwear()
    home = work / "home"
    seed = work / "seed"
    seed.mkdir()
    for path in pool[:30]:
        shutil.copy(path, seed / path.name)
    assert lookalike("--home", str(home), "index", str(seed)).returncode == 0
    state = {"next": 0, "live": set(), "deleted": set(), "acked": 0, "in_flight": None}
    state["photos"] = work / "photos"
    state["photos"].mkdir()
    delays, lost, back, inside = [], 0, 0, 0
    for _ in range(kills):
        server = Serve(home, work / "serve.log")
        got_lost, got_back = reconcile(state, products_of(server))
        lost, back = lost + got_lost, back + got_back
        writer = Writer(server, pool[30:], rng, state)
        writer.start()
        delay = rng.uniform(0.5, 4.0)
        time.sleep(delay)
        server.kill()  # kill -9, mid-request most of the time
        inside += landed(home)[0]
        writer.stop.set()
        writer.join(30)
        delays.append(round(delay, 2))
    server = Serve(home, work / "serve.log")
    got_lost, got_back = reconcile(state, products_of(server))
    server.stop()
    report = verify(home, {p.stem for p in pool[:30]} | state["live"])
    report.update(
        kills=kills,
        kills_inside_a_write=inside,
        acked_writes=state["acked"],
        lost=lost + got_lost,
        deletes_undone=back + got_back,
        kill_delays_s=delays,
    )
    return report


def products_of(server: Serve) -> set[str]:
    out: set[str] = set()
    offset = 0
    while True:
        got = server.client.get("/products", params={"limit": 500, "offset": offset})
        got.raise_for_status()
        items = got.json()["products"]
        out |= {p["product_id"] for p in items}
        if len(items) < 500:
            return out
        offset += 500


# --------------------------------------------------------------------------- index beside serve


def beside(work: Path, rng: random.Random) -> dict:
    pool = footwear()
    home = work / "home"
    first, nightly = work / "first", work / "nightly"
    for folder, files in ((first, pool[:50]), (nightly, pool[50:250])):
        folder.mkdir()
        for path in files:
            shutil.copy(path, folder / path.name)
    assert lookalike("--home", str(home), "index", str(first)).returncode == 0
    api = pool[250:300]
    deleted: set[str] = set()
    with Serve(home, work / "serve.log") as server:
        job = lookalike_bg("--home", str(home), "index", str(nightly), log=work / "index.log")
        acked, waits = 0, []
        for image in api:
            started = time.monotonic()
            got = server.add(image.stem, image)
            waits.append(time.monotonic() - started)
            acked += got.status_code == 201
            if rng.random() < 0.2:
                victim = rng.choice(pool[:50]).stem
                if victim not in deleted:
                    got = server.client.delete(f"/products/{victim}", headers=auth())
                    if got.status_code in (200, 204):
                        deleted.add(victim)
        assert job.wait(1800) == 0, (work / "index.log").read_text()[-2000:]
        index_done = time.monotonic()
        probe = pool[50:250:10]
        while not all(seen(server, p) for p in probe):
            if time.monotonic() - index_done > 60:
                break
            time.sleep(0.2)
        followed = time.monotonic() - index_done
        missing = sum(not seen(server, p) for p in pool[50:300])
    want = {p.stem for p in pool[:300]} - deleted
    report = verify(home, want)
    report.update(
        api_adds_acked=acked,
        api_deletes=len(deleted),
        lost=missing,
        followed_within_s=round(followed, 2),
        api_add_p50_ms=round(float(np.median(waits)) * 1000, 1),
        api_add_max_ms=round(max(waits) * 1000, 1),
    )
    return report


def seen(server: Serve, image: Path) -> bool:
    return any(r["product_id"] == image.stem and r["score"] > 0.99 for r in server.search(image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--section", default="all", choices=["all", "kill-index", "kill-api", "beside"]
    )
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("LOOKALIKE_MODELS", str(Path(tempfile.gettempdir()) / "lookalike-models"))
    sections = ["kill-index", "kill-api", "beside"] if args.section == "all" else [args.section]
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "seed": args.seed,
    }
    for name in sections:
        rng = random.Random(f"{args.seed}-{name}")
        work = Path(tempfile.mkdtemp(prefix=f"lookalike-rel-{name}-"))
        started = time.monotonic()
        try:
            if name == "kill-index":
                figures = kill_index(work, args.kills, rng)
            elif name == "kill-api":
                figures = kill_api(work, args.kills, rng)
            else:
                figures = beside(work, rng)
        except Exception as exc:  # noqa: BLE001 - reported, and the other sections still run
            import traceback

            figures = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        figures["seconds"] = round(time.monotonic() - started, 1)
        out[name] = figures
        print(json.dumps({name: figures}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
