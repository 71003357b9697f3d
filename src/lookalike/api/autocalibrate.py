"""`serve --keep-photos N --calibrate-every M`: the server calibrates its home again on the
photos it keeps, every M new ones, once it has kept at least `MIN_PHOTOS` (fewer photos
give a centre that costs recall: docs/quality.md, `benchmarks/bench_calibrate_size.py`).

Each calibration is `lookalike calibrate HOME/query-photos` in a child process at a lower
CPU priority (nice 10), so searches keep the cores first and the server's own encoder is
not shared. The running server picks the new centre up at its next search (the query
pipeline re-reads `query_centre.npz` when it changes). One calibration at a time; a
failed one is logged and the next is tried after M more photos."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import UsageError
from ..keptphotos import KeptPhotos

MIN_PHOTOS = 100
"""No automatic calibration on fewer kept photos: on both burst splits of train.csv, calibrating
on 100 or more photos is not below uncalibrated, on 32 or 64 it is (docs/api.md)."""
NICE = 10

log = logging.getLogger("lookalike.api")


class AutoCalibrate:
    """Counts kept photos and starts a calibration every `every` of them (0: never)."""

    def __init__(
        self,
        home: Path,
        kept: KeptPhotos,
        every: int,
        model: str | None = None,
        nice: int = NICE,
    ):
        if every < 0:
            raise UsageError(f"the calibration interval must be >= 0 photos, not {every}")
        if every and kept.limit < MIN_PHOTOS:
            raise UsageError(
                f"--calibrate-every (LOOKALIKE_CALIBRATE_EVERY) needs --keep-photos"
                f" (LOOKALIKE_KEEP_PHOTOS) of at least {MIN_PHOTOS}: it calibrates on the kept"
                f" photos, and only once {MIN_PHOTOS} are kept"
            )
        self.home, self.kept, self.every, self.model, self.nice = home, kept, every, model, nice
        self.runs = 0  # calibrations finished, ok or not
        self.last: dict | None = None  # the last successful calibration's summary
        self._since = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._waiter: threading.Thread | None = None

    def photo_kept(self) -> None:
        """Called after each photo kept: maybe start a calibration."""
        if not self.every:
            return
        with self._lock:
            self._since += 1
            if self._since < self.every or self._proc is not None:
                return
            if self.kept.count() < MIN_PHOTOS:
                return
            self._since = 0
            self._start()

    def _start(self) -> None:
        command = [sys.executable, "-m", "lookalike", "--home", str(self.home), "-q"]
        if self.model:
            command += ["--model", self.model]
        command += ["calibrate", str(self.kept.folder), "--json"]
        try:
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        except OSError as exc:
            log.warning("could not start a calibration: %s", exc)
            return
        # lowered at once, before the child has loaded its model and started the threads
        # that inherit it (no preexec_fn: it is unsafe in a threaded server)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, self.nice)
        log.info("calibrating on the %s kept photos", self.kept.count())
        self._waiter = threading.Thread(
            target=self._wait, args=(self._proc,), name="lookalike-calibrate", daemon=True
        )
        self._waiter.start()

    def _wait(self, proc: subprocess.Popen) -> None:
        out, err = proc.communicate()
        with self._lock:
            self._proc = None
            self.runs += 1
            if proc.returncode == 0:
                try:
                    self.last = json.loads(out)
                except ValueError:
                    self.last = None
                summary = self.last or {}
                hub = summary.get("hub_correction") or {}
                log.info(
                    "calibrated on %s photos%s: %s",
                    summary.get("photos", "?"),
                    f", hub scores of {hub['images']} catalog images" if hub else "",
                    summary.get("path", "?"),
                )
            elif proc.returncode > 0:  # < 0: stopped by close()
                log.warning("calibration failed (exit %s): %s", proc.returncode, err.strip()[-500:])

    def close(self) -> None:
        """Stop a calibration under way (the server is stopping); its centre is not written."""
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
