"""The engine the app serves: given (tests, embedding) or opened from its home on a
background thread, warmed up and set up for serving before the first search."""

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import NotReadyError

log = logging.getLogger("lookalike.api")


def default_home() -> Path:
    return Path(os.environ.get("LOOKALIKE_HOME", "lookalike-home"))


class EngineHolder:
    """Owns the engine for the app: given one (tests, embedding), or opened from `home`
    on a background thread at startup so /healthz answers while the model loads."""

    def __init__(
        self,
        engine: Any | None,
        home: Path | None,
        opener: Callable[..., Any] | None,
        threads: int | None = None,
    ):
        self.threads = threads
        self.engine = engine
        self.home = home
        self.owned = engine is None
        self.error: str | None = None
        self._opener = opener
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        if engine is not None:
            self._ready.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.engine is not None:  # given: usable at once, warmed in the background
            target = self._warm_given
        else:
            target = self._open
        self._thread = threading.Thread(target=target, name="lookalike-open", daemon=True)
        self._thread.start()

    def _warm_given(self) -> None:
        try:
            warm_up(self.engine, self.threads)
        except Exception:  # the real calls will report it
            log.exception("warming up the engine failed")

    def _open(self) -> None:
        try:
            opener = self._opener
            if opener is None:
                from ..engine import Engine

                opener = Engine.open
            started = time.perf_counter()
            engine = opener(self.home)
            warm_up(engine, self.threads)
            self.engine = engine
            log.info("engine ready in %.1fs (home %s)", time.perf_counter() - started, self.home)
        except Exception as exc:  # reported by /readyz and every engine call
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("cannot open the catalog at %s", self.home)
        finally:
            self._ready.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the engine is open (or failed to open) and warmed up."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._ready.wait(timeout)

    def get(self) -> Any:
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise NotReadyError(f"the catalog could not be opened: {self.error}")
        raise NotReadyError("the model and catalog are still loading; retry in a moment")

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=60)  # never close an engine that is still opening
        if self.owned and self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None


def warm_up(engine: Any, threads: int | None = None) -> None:
    """Load the model and the vector store, set the encoder up for serving, and run one
    query through it, so the first real search is as fast as the rest."""
    _ = engine.store
    if threads is not None:
        tune_encoder_for_serving(engine.encoder, threads)
    engine.embed_queries([Image.new("RGB", (64, 64), "white")])


def tune_encoder_for_serving(encoder: Any, threads: int) -> bool:
    """Give the encoder's ONNX Runtime session `threads` intra-op threads that do not
    spin-wait. A one-off CLI search wants every core on one image; a server runs several
    searches at once, and the spinning threads of one then steal the cores the others
    need (docs/api.md: about half the latency with searches side by side). Returns
    whether it was done (encoders without `set_threads` are left as they are)."""
    target, set_threads = encoder, None
    for _ in range(5):  # quality and tuned encoders wrap the ONNX one as `.base`
        set_threads = getattr(target, "set_threads", None)
        if set_threads is not None:
            break
        target = getattr(target, "base", None)
        if target is None:
            return False
    if set_threads is None:
        return False
    try:
        set_threads(threads, spinning=False)
    except Exception:  # keep the working session
        log.exception("could not resize the encoder's session for serving")
        return False
    log.info("encoder: %d intra-op thread(s) per search, no spin-wait", threads)
    return True
