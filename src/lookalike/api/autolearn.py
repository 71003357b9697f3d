"""`serve --keep-photos N` with `--calibrate-every M` and/or `--tune-every T`: the server
learns from the photos it keeps, in a child process at a lower CPU priority (nice 10), so
searches keep the cores first and the server's own encoder is not shared.

- Every M newly kept photos, once at least `MIN_TO_CALIBRATE` are kept, it runs `lookalike
  calibrate HOME/query-photos` (fewer photos give a centre that costs recall:
  `benchmarks/bench_calibrate_size.py`). The query pipeline re-reads `query_centre.npz`
  when it changes, so the next searches use it.
- Every T newly kept photos, once at least `MIN_TO_TUNE` are kept, it runs `lookalike
  tune --photos HOME/query-photos` (plus `--field NAME` when the active model was tuned on
  that catalog field, so what the shop taught it is kept); fewer photos tune a model that
  is no better than the calibrated base (`benchmarks/bench_tune_size.py`). The tune saves
  a new version in the registry and makes it active; the server follows the switch at its
  next search, and removes the older automatic tunes' versions past KEEP_VERSIONS. A
  home whose model was tuned on labelled photos is not tuned again automatically: that
  would replace what the labels taught with pseudo-labels.

One child at a time in a home, whichever server started it: the child holds
`HOME/learning.lock` (an flock it inherits, so it is held until the child exits even if
its server dies), and a server that finds it held waits for the next photo. A tune that
is due goes before a calibration. A failed one is logged and tried again after M (or T)
more photos; one under way when the server stops is stopped and writes nothing."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import ModelError, UsageError
from ..keptphotos import MIN_TO_CALIBRATE, MIN_TO_TUNE, KeptPhotos
from ..models import active_version, list_models, model_info, remove_model

CALIBRATE_TUNED = False
"""A home with a tuned model active is not calibrated automatically: on both burst splits of
train.csv, a tuned model's centre adds Recall@1 and costs Recall@5 (up to 1.0 point at
700 and 1,000 photos; docs/quality.md, `benchmarks/bench_tune_size.py`)."""
NICE = 10
LEARN_LOCK = "learning.lock"
KEEP_VERSIONS = 3
"""Automatic tunes keep this many of their versions (the newest, active one included):
each is a few MB (8.5 for grocery's head), and one is made every T kept photos."""

log = logging.getLogger("lookalike.api")


class AutoLearn:
    """Counts kept photos; calibrates every `calibrate_every` and tunes every `tune_every`
    of them (0: never)."""

    def __init__(
        self,
        home: Path,
        kept: KeptPhotos,
        calibrate_every: int = 0,
        tune_every: int = 0,
        model: str | None = None,
        nice: int = NICE,
    ):
        for flag, every, floor in (
            ("--calibrate-every (LOOKALIKE_CALIBRATE_EVERY)", calibrate_every, MIN_TO_CALIBRATE),
            ("--tune-every (LOOKALIKE_TUNE_EVERY)", tune_every, MIN_TO_TUNE),
        ):
            if every < 0:
                raise UsageError(f"{flag} must be >= 0 photos, not {every}")
            if every and kept.limit < floor:
                raise UsageError(
                    f"{flag} needs --keep-photos (LOOKALIKE_KEEP_PHOTOS) of at least {floor}:"
                    f" it learns from the kept photos, and only once {floor} are kept"
                )
        if tune_every and model:
            raise UsageError(
                "--tune-every cannot go with --model: a server given a model serves that one,"
                " so it would never use the models it tunes"
            )
        self.home, self.kept, self.model, self.nice = home, kept, model, nice
        self.every = {"calibrate": calibrate_every, "tune": tune_every}
        self.runs = {"calibrate": 0, "tune": 0}  # children finished, ok or not
        self.last: dict[str, dict | None] = {"calibrate": None, "tune": None}  # last good run
        self._since = {"calibrate": 0, "tune": 0}
        self._skipped: set[str] = set()  # reasons already logged
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._waiter: threading.Thread | None = None

    def photo_kept(self) -> None:
        """Called after each photo kept: maybe start a tune or a calibration."""
        if not any(self.every.values()):
            return
        with self._lock:
            for job in self._since:
                self._since[job] += 1
            if self._proc is not None:
                return
            kept: int | None = None  # the folder is read once, and only when a job is due
            for job, floor in (("tune", MIN_TO_TUNE), ("calibrate", MIN_TO_CALIBRATE)):
                every = self.every[job]
                if not every or self._since[job] < every:
                    continue
                kept = self.kept.count() if kept is None else kept
                if kept < floor:
                    continue
                args = self._tune_args() if job == "tune" else self._calibrate_args()
                if args is None:
                    continue
                slot = self._home_slot()
                if slot is None:  # another server's child is at work: look again next photo
                    return
                self._since[job] = 0
                self._start(job, args, slot, kept)
                return

    def _home_slot(self) -> int | None:
        """An fd holding the home's learning lock for the child to inherit; -1 when the
        lock file cannot be made (a read-only home: the child runs unlocked); None when
        another process holds it."""
        try:
            fd = os.open(self.home / LEARN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._skip_once(f"cannot make {self.home / LEARN_LOCK} ({exc}): learning unlocked")
            return -1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._skip_once("another server on this home is calibrating or tuning: waiting")
            return None
        return fd

    def _calibrate_args(self) -> list[str] | None:
        if not CALIBRATE_TUNED and active_version(self.home) is not None:
            self._skip("calibrate", "not calibrating: the home's model is tuned (docs/api.md)")
            return None
        return ["calibrate", str(self.kept.folder), "--json"]

    def _tune_args(self) -> list[str] | None:
        args = ["tune", "--photos", str(self.kept.folder), "--json"]
        version = active_version(self.home)
        if version is None:
            return args
        try:
            sources = model_info(self.home, version).get("sources") or {}
        except Exception as exc:  # an unreadable model.json: tune from the base again
            log.warning("tuning anew: cannot read the active model's sources: %s", exc)
            return args
        if "labels" in (sources.get("used") or []):
            self._skip(
                "tune",
                f"not tuning: the home's model ({version}) was tuned on labelled photos;"
                f" tune by hand with --labels and --photos {self.kept.folder}",
            )
            return None
        field = (sources.get("field") or {}).get("name")
        return args + ["--field", str(field)] if field else args

    def _skip(self, job: str, reason: str) -> None:
        self._since[job] = 0  # looked at again after another interval
        self._skip_once(reason)

    def _skip_once(self, reason: str) -> None:
        if reason not in self._skipped:
            self._skipped.add(reason)
            log.info("%s", reason)

    def _start(self, job: str, args: list[str], slot: int, kept: int) -> None:
        command = [sys.executable, "-m", "lookalike", "--home", str(self.home), "-q"]
        if self.model:
            command += ["--model", self.model]
        try:
            self._proc = subprocess.Popen(
                command + args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=(slot,) if slot >= 0 else (),
            )
        except OSError as exc:
            log.warning("could not start a %s: %s", _NOUN[job], exc)
            return
        finally:
            if slot >= 0:
                os.close(slot)  # the child's copy holds the lock until it exits
        # lowered at once, before the child has loaded its model and started the threads
        # that inherit it (no preexec_fn: it is unsafe in a threaded server)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, self.nice)
        log.info("%s on the %s kept photos", _VERB[job], kept)
        self._waiter = threading.Thread(
            target=self._wait, args=(job, self._proc), name=f"lookalike-{job}", daemon=True
        )
        self._waiter.start()

    def _wait(self, job: str, proc: subprocess.Popen) -> None:
        out, err = proc.communicate()
        with self._lock:
            self._proc = None
            self.runs[job] += 1
            if proc.returncode < 0:  # stopped by close()
                return
            if proc.returncode > 0:
                log.warning(
                    "%s failed (exit %s): %s", _NOUN[job], proc.returncode, err.strip()[-500:]
                )
                return
            summary = _json_of(out)
            self.last[job] = summary or None
            log.info("%s", _done_line(job, summary))
            if job == "tune":
                self._drop_old_versions()

    def _drop_old_versions(self) -> None:
        """Remove the automatic tunes' versions (tuned on the kept folder) older than the
        newest KEEP_VERSIONS; a version tuned by hand on other photos is never touched."""
        mine = [m["version"] for m in list_models(self.home)
                if ((m.get("sources") or {}).get("photos") or {}).get("sources")
                == [str(self.kept.folder)]]  # fmt: skip
        active = active_version(self.home)
        old = [v for v in mine[:-KEEP_VERSIONS] if v != active]
        for version in old:
            try:
                remove_model(self.home, version)
            except (ModelError, OSError) as exc:
                log.warning("could not remove the old tuned model %s: %s", version, exc)
        if old:
            log.info("removed %s older automatic tune(s): %s", len(old), ", ".join(old))

    def close(self) -> None:
        """Stop a child under way (the server is stopping): it writes nothing."""
        with self._lock:
            proc, waiter = self._proc, self._waiter
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if waiter is not None:
            waiter.join(10)


def _json_of(out: str) -> dict:
    """The child's --json report: the whole output (calibrate prints it indented), else its
    last line (anything printed before it); {} when there is none."""
    for text in (out, (out.strip().splitlines() or [""])[-1]):
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


_NOUN = {"calibrate": "calibration", "tune": "tune"}
_VERB = {"calibrate": "calibrating", "tune": "tuning"}


def _done_line(job: str, summary: dict) -> str:
    """The log's one sentence on a finished child."""
    if job == "calibrate":
        hub = summary.get("hub_correction") or {}
        scores = f", hub scores of {hub['images']} catalog images" if hub else ""
        where = summary.get("path", "?")
        return f"calibrated on {summary.get('photos', '?')} photos{scores}: {where}"
    photos = ((summary.get("sources") or {}).get("photos") or {}).get("photos", "?")
    return f"tuned on {photos} kept photos: model {summary.get('version', '?')} is active"
