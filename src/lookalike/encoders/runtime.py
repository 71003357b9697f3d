"""The ONNX Runtime side shared by every encoder: session, input conversion, pooling."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.errors import ModelError
from lookalike.images import FIT_MODES, fit_square

DEFAULT_FIT = "crop"
"""Chosen by benchmarks/bench_preprocess_fit.py (see docs/preprocessing.md)."""
X64_QUANT_PRECISION = True
"""Ask ONNX Runtime for exact INT8 arithmetic on x86 CPUs without VNNI (AVX2, or AVX-512
without VNNI). There its fast u8s8 kernels add pairs of uint8 x int8 products in 16-bit
lanes, which saturate for weights outside [-64, 63]: on such a CPU the INT8 Lite2's
embeddings fell to cosine 0.91 on average (0.67 at worst) to float32 on fashion-footwear
images, and grocery Recall@1 per burst from 0.43 to 0.36. Session option
`session.x64quantprecision` makes ORT run those weights as u8u8 instead. Cost on the AVX2
machine: 20.9 -> 27.3 ms a Lite2-INT8 pass at batch 1, against 31.0 ms for float32
(docs/models.md, benchmarks/bench_int8_precision.py). It is set only where it is needed
(`needs_exact_int8`): on a CPU with VNNI the fast kernels are exact already, and the
option would still take the u8u8 path, bit-identical and 2.6x slower (8.2 against 21.2 ms
a pass on an AVX-512 VNNI Xeon, bench_int8_precision.py)."""


def cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.lru_cache(maxsize=8)
def _cpu_kind(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The CPU as INT8 sees it: "vnni", "no vnni", "not x86" or "unknown" (an x86 CPU
    whose flags cannot be read). Cached: every session asks, /proc/cpuinfo is read once."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in _X86:
        return "not x86"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "unknown"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    if not flags:
        return "unknown"
    return "vnni" if flags.intersection(_VNNI_FLAGS) else "no vnni"


def needs_exact_int8(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether sessions here ask ORT for exact INT8 arithmetic (X64_QUANT_PRECISION): on an
    x86 CPU without VNNI, or one whose flags cannot be read (exact is the safe side).
    `cpuinfo` and `machine` stand in for /proc/cpuinfo's text and platform.machine()."""
    return X64_QUANT_PRECISION and _cpu_kind(cpuinfo, machine) in ("no vnni", "unknown")


def int8_kernels(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """Which INT8 arithmetic ONNX Runtime's CPU kernels do here (`lookalike info`): "vnni"
    (exact and fast), "exact u8u8, no VNNI" (the X64_QUANT_PRECISION path: exact, INT8
    about 1.1x the float32 speed), "saturating u8s8, no VNNI" (that switch off),
    "not x86" (ARM and others: ORT's kernels there do not saturate), or "unknown" (an
    x86 CPU whose flags cannot be read: /proc/cpuinfo is Linux's). `cpuinfo` and
    `machine` stand in for /proc/cpuinfo's text and platform.machine() (tests)."""
    kind = _cpu_kind(cpuinfo, machine)
    if kind != "no vnni":
        return kind
    return "exact u8u8, no VNNI" if X64_QUANT_PRECISION else "saturating u8s8, no VNNI"


def file_sha256(path: Path, cache_dir: Path | None) -> str:
    """sha256 of a (possibly large) model file, remembered in `cache_dir` by path, size and
    mtime so a 300 MB model is not re-read on every start."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = Path(cache_dir) / "sha256-memo.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo_path:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            memo[key] = digest
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=0))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return digest


def make_session(
    path: Path | bytes, threads: int | None = None, spinning: bool = False
):  # -> onnxruntime.InferenceSession
    """An ORT CPU session (of a file, or of a serialised model) with all graph
    optimisations and `threads` intra-op threads (default one per core). Worker threads
    do not spin-wait by default: on this 2-core box, with other work running, spinning
    halved batch-1 throughput (18.0 -> 9.4 img/s,
    benchmarks/bench_preprocess_fit.py); `spinning=True` brings it back for a caller
    that knows it has the cores to itself."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_count()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if needs_exact_int8():
        opts.add_session_config_entry("session.x64quantprecision", "1")
    try:
        model = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        what = "serialised model" if isinstance(path, bytes) else path
        raise ModelError(f"{what}: cannot load ONNX model: {exc}") from exc


@dataclass(frozen=True)
class InputSpec:
    """How uint8 (N, S, S, 3) pixels become the graph's input tensor.

    `mean`/`std` are per-channel RGB in the 0..1 pixel scale (pixel / 255), as CLIP and
    torchvision publish them. `raw_uint8`: the graph takes uint8 NHWC itself and
    normalises inside (the bundled EfficientNet-Lite graphs do this).
    """

    size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    raw_uint8: bool = False

    def to_tensor(self, batch: np.ndarray) -> np.ndarray:
        if self.raw_uint8:
            return np.ascontiguousarray(batch, dtype=np.uint8)
        # (x/255 - mean)/std == x * a + b, one fused pass in float32.
        a = (1.0 / (255.0 * np.asarray(self.std, dtype=np.float32))).astype(np.float32)
        b = (-np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, np.float32)).astype(
            np.float32
        )
        x = batch.astype(np.float32) * a + b
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def ident(self) -> str:
        if self.raw_uint8:
            return "u8"
        fmt = ",".join
        return (
            f"m{fmt(f'{v:g}' for v in self.mean)}-s{fmt(f'{v:g}' for v in self.std)}"
            f"-{self.layout.lower()}"
        )


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """`x` as float32 scaled to unit L2 norm along its last axis (rows of (N, D), or each
    view of each photo of (N, V, D))."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def pool_output(out: np.ndarray, layout: str = "NCHW", token_pool: str = "cls") -> np.ndarray:
    """Reduce a model output to (N, D): average a 4-D feature map over its spatial axes,
    take the first (CLS) token or the token mean of a 3-D sequence, flatten the rest."""
    out = np.asarray(out)
    if out.ndim == 4:
        axes = (2, 3) if layout == "NCHW" else (1, 2)
        return out.mean(axis=axes)
    if out.ndim == 3:
        return out[:, 0, :] if token_pool == "cls" else out.mean(axis=1)
    return out.reshape(out.shape[0], -1)


class OnnxEncoder:
    """An encoder that runs an ONNX graph on ONNX Runtime (see the package docstring)."""

    def __init__(
        self,
        *,
        name: str,
        stamp: str,
        model_path: Path,
        input_spec: InputSpec,
        fit: str = DEFAULT_FIT,
        output: str | None = None,
        token_pool: str = "cls",
        threads: int | None = None,
        session=None,
    ) -> None:
        if fit not in FIT_MODES:
            raise ModelError(f"fit mode must be one of {', '.join(FIT_MODES)}, not {fit!r}")
        self.name = name
        self.stamp = stamp
        self.model_path = Path(model_path)
        self.input_spec = input_spec
        self.input_size = input_spec.size
        self.fit = fit
        self.token_pool = token_pool
        self.session = session or make_session(self.model_path, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(
                f"{model_path}: image models must have exactly one input, not {len(inputs)}"
            )
        self._input_name = inputs[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in outputs:
            raise ModelError(f"{model_path}: no output named {output!r}; outputs: {outputs}")
        self._output_name = output or outputs[0]
        self.output_names: Sequence[str] = outputs
        self.draft_size = 2 * self.input_size
        """Pass as `load_image(..., draft_size=)`: JPEGs then decode at >= 2x the input."""
        probe = np.full((1, self.input_size, self.input_size, 3), 128, dtype=np.uint8)
        self.dim = int(self.embed(probe).shape[1])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.stamp} dim={self.dim}>"

    def set_threads(self, threads: int | None, spinning: bool = False) -> None:
        """Replace the ORT session with one of `threads` intra-op threads (None: cores)."""
        self.session = make_session(self.model_path, threads, spinning)

    def prepare(self, img: Image.Image) -> np.ndarray:
        """RGB image -> uint8 (S, S, 3) with this encoder's fit mode."""
        return fit_square(img, self.input_size, self.fit)

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        s = self.input_size
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 (N, {s}, {s}, 3), got {batch.shape}")
        if batch.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {batch.dtype}")
        return batch

    def run(self, batch: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """Raw graph outputs for uint8 (N, S, S, 3) pixels."""
        batch = self._check_batch(batch)
        if len(batch) == 0:
            raise ValueError("empty batch")
        feed = {self._input_name: self.input_spec.to_tensor(batch)}
        return self.session.run(list(outputs), feed)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim), rows L2-normalised."""
        batch = self._check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self.run(batch, [self._output_name])
        return l2_normalise(pool_output(out, self.input_spec.layout, self.token_pool))
