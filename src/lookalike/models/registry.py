"""Which tuned model a home uses: the versions saved under `<home>/models/tuned/`, the
active one, and loading it.

A tuned model lives in `<home>/models/tuned/<version>/` (`model.onnx` + `tail.onnx` for
finetune, `head.npz` + its INT8 graph `head.onnx` for head, and `model.json` with the
base model stamp, the model's hashes, the label file hash, the training settings and the
validation figures);
`<home>/models/tuned/active.json` names the active one. Writing versions is
lookalike.tuning's job; the engine only asks `active_encoder`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..fsutil import atomic_write
from .tuned import is_tuned, open_tuned

TUNED_DIR = Path("models") / "tuned"
ACTIVE_FILE = "active.json"


def tuned_root(home: str | os.PathLike) -> Path:
    """The folder holding a home's tuned models."""
    return Path(home) / TUNED_DIR


def active_version(home: str | os.PathLike) -> str | None:
    """The version named in `<home>/models/tuned/active.json`, if any."""
    path = tuned_root(home) / ACTIVE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) and version else None


def set_active(home: str | os.PathLike, version: str | None) -> None:
    """Name `version` in active.json (None: remove it, back to the base model). Only the
    pointer: re-embedding the catalog is lookalike.tuning.use_model's job."""
    root = tuned_root(home)
    path = root / ACTIVE_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    root.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"version": version}, indent=2).encode()
    atomic_write(path, lambda fh: fh.write(payload))


def model_info(home: str | os.PathLike, version: str) -> dict[str, Any]:
    """The model.json of tuned model `version`."""
    path = tuned_root(home) / version / "model.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"tuned model {version}: cannot read {path}: {exc}") from None


def list_models(home: str | os.PathLike) -> list[dict[str, Any]]:
    """Every tuned model saved in this home, oldest first."""
    root = tuned_root(home)
    out = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if (p / "model.json").is_file()):
            try:
                out.append(model_info(home, d.name))
            except ModelError:
                continue
    return out


def remove_model(home: str | os.PathLike, version: str) -> None:
    """Delete the saved tuned model `version` (not the active one: ModelError)."""
    if version == active_version(home):
        raise ModelError(f"tuned model {version} is active: `tune --use` another or --reset first")
    folder = tuned_root(home) / version
    if not (folder / "model.json").is_file():
        raise ModelError(f"no tuned model {version} in {tuned_root(home)}")
    shutil.rmtree(folder)
    resolved = str(Path(home).resolve())
    with _LOADED_LOCK:
        for key in [k for k in _LOADED if k[:2] == (resolved, version)]:
            del _LOADED[key]


_LOADED: dict[tuple[str, str, str], Any] = {}
_LOADED_LOCK = threading.Lock()


def load_tuned(home: str | os.PathLike, version: str, base: Any) -> Any:
    """The tuned encoder `version` (a TunedEncoder or a FinetunedEncoder) on top of
    `base` (which must be the model it was trained on)."""
    info = model_info(home, version)
    if info.get("base_stamp") != base.stamp:
        raise ModelError(
            f"tuned model {version} was trained on {info.get('base_stamp')}, not on {base.stamp}"
        )
    key = (str(Path(home).resolve()), version, base.stamp)
    with _LOADED_LOCK:
        cached = _LOADED.get(key)
        if cached is not None and cached.base is base:
            return cached
    encoder = open_tuned(base, tuned_root(home) / version, version, info)
    with _LOADED_LOCK:
        _LOADED[key] = encoder
    return encoder


def active_encoder(home: str | os.PathLike, base: Any) -> Any:
    """What Engine searches with: the active tuned model when one was trained for this
    base model, else `base`. A tuned model for another base model (the catalog was
    switched to another --model since) is ignored."""
    version = active_version(home)
    if version is None:
        return base
    try:
        return load_tuned(home, version, base)
    except ModelError as exc:
        if "was trained on" in str(exc):
            return base
        raise


def describe_active(home: str | os.PathLike, encoder: Any) -> dict[str, Any]:
    """What `tune --status` (and `info`) can show about the active model."""
    if is_tuned(encoder):
        info = encoder.info
        return {
            "model": "tuned",
            "method": info.get("kind", "head"),
            "version": encoder.version,
            "stamp": encoder.stamp,
            "base_stamp": encoder.base.stamp,
            "labels_sha256": info.get("labels_sha256"),
            "sources": info.get("sources"),
            "photo_prototypes": info.get("photo_prototypes"),
            "validation": info.get("validation"),
        }
    return {"model": "base", "stamp": encoder.stamp, "tuned_versions": len(list_models(home))}
