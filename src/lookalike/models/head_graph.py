"""A tuned `Head` as an ONNX graph, its matrix products in INT8: what a "head" model
with an MLP saved by `lookalike tune` runs for every image, catalog and query alike
(`head.onnx` beside `head.npz`; a `--field` head alone has no MLP and stays in numpy).

The float head's products read 8.7 MB of float32 weights right after the network's
pass: the whole head took about 1 ms of a 10 ms query on a VNNI CPU. The INT8 graph
reads a quarter of those bytes on ORT's integer kernels, in a third of the time (0.34
against 1.00 ms; docs/quality.md, "The head in INT8"; benchmarks/bench_head_apply.py).
Weights are quantised per output column, symmetric; each row's input at run time by its
own largest value, so a vector does not depend on the other rows of its batch (ORT's
DynamicQuantizeLinear scales a whole batch by one value), nothing is calibrated, and the
same head always gives the same bytes. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.colour import DIM as COLOUR_DIM
from ..fsutil import atomic_write

INPUT = "x"
"""The graph's input: (N, D_in) base embeddings."""
COLOUR_INPUT = "colour"
"""Its second input, for a head with a colour part: (N, 64) colour descriptors."""
OUTPUT = "embedding"
"""Its output: (N, dim) L2-normalised, what `Head.apply` returns."""


def head_model(head: Any, int8: bool = True) -> Any:
    """`head` (lookalike.models.tuned.Head) as an onnx.ModelProto that computes what
    `Head.apply` does: the MLP, the kept base part, the posterior, the colour part, each
    normalised or scaled as there, joined and normalised; its products in INT8 (`int8`)
    or float32. Built node by node from its arrays."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    axes = "axes1"
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
    eps = const("eps", np.array(1e-12))

    def normalise(x: str, out: str) -> str:
        norm = node("ReduceL2", [x, axes], f"{out}_norm", keepdims=1)
        return node("Div", [x, node("Max", [norm, eps], f"{out}_den")], out)

    def scaled(x: str, weight: float, name: str) -> str:
        return node("Mul", [x, const(f"{name}_w", np.array(weight))], name)

    def matmul(x: str, w: np.ndarray, name: str, nonneg: bool) -> str:
        """x @ w: in float32, or (int8) with w quantised per column and x per row at run
        time, so that a row's result does not depend on its batch."""
        if not int8:
            return node("MatMul", [x, const(f"{name}_weight", w)], name)
        # weights: symmetric per column, stored + 128 as uint8 (the u8u8 kernels are exact
        # on every x86 CPU; u8s8 saturates without VNNI, runtime.X64_QUANT_PRECISION, and
        # was no faster here: 0.52 ms either way)
        top = np.maximum(np.abs(w).max(axis=0), 1e-12)
        wq = (np.rint(w / (top / 127)) + 128).astype(np.uint8)
        w_zero = const(f"{name}_wzero", np.array(128), np.uint8)
        # a non-negative x (after ReLU) uses all 256 levels from 0; else 255 around 128
        levels = 255.0 if nonneg else 127.0
        big = node("ReduceMax", [x if nonneg else node("Abs", [x], f"{name}_abs"), axes],
                   f"{name}_top", keepdims=1)  # fmt: skip
        step = node("Div", [node("Max", [big, eps], f"{name}_top1"),
                            const(f"{name}_levels", np.array(levels))], f"{name}_step")  # fmt: skip
        codes = node("Round", [node("Div", [x, step], f"{name}_ratio")], f"{name}_round")
        if not nonneg:
            codes = node("Add", [codes, const(f"{name}_mid", np.array(128.0))], f"{name}_codes")
        codes = node("Clip", [codes, const(f"{name}_lo", np.array(0.0)),
                              const(f"{name}_hi", np.array(255.0))], f"{name}_clip")  # fmt: skip
        codes = node("Cast", [codes], f"{name}_u8", to=TensorProto.UINT8)
        x_zero = const(f"{name}_xzero", np.array(0 if nonneg else 128), np.uint8)
        y = node("MatMulInteger", [codes, const(f"{name}_weight", wq, np.uint8), x_zero, w_zero],
                 f"{name}_int")  # fmt: skip
        y = node("Cast", [y], f"{name}_float", to=TensorProto.FLOAT)
        y = node("Mul", [y, step], f"{name}_rows")
        return node("Mul", [y, const(f"{name}_scale", top / 127)], name)

    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", head.in_dim])]
    parts: list[str] = []
    if head.weights:
        y = node("Sub", [INPUT, const("mean", head.mean)], "centred")
        for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
            if i:
                y = node("Relu", [y], f"relu{i}")
            y = matmul(y, w, f"matmul{i}", nonneg=bool(i))
            y = node("Add", [y, const(f"b{i}", b)], f"layer{i}")
        alone = head.dim == int(head.weights[-1].shape[1])  # no other part: Head.apply
        parts.append(normalise(y, OUTPUT if alone else "mlp"))
    if head.keep_base:
        parts.append(scaled(INPUT, head.keep_base, "kept"))
    if head.class_weight and head.classifier is not None:
        logits = matmul(INPUT, head.classifier, "logits0", nonneg=False)
        logits = node("Add", [logits, const("classifier_bias", head.classifier_bias)], "logits")
        posterior = node("Softmax", [logits], "posterior", axis=1)
        parts.append(scaled(posterior, head.class_weight, "classes"))
    if head.colour_weight:
        inputs.append(
            helper.make_tensor_value_info(COLOUR_INPUT, TensorProto.FLOAT, ["batch", COLOUR_DIM])
        )
        parts.append(scaled(COLOUR_INPUT, head.colour_weight, "colour_part"))
    if parts != [OUTPUT]:
        normalise(node("Concat", parts, "joined", axis=1), OUTPUT)
    output = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", head.dim])
    graph = helper.make_graph(nodes, "lookalike_head", inputs, [output], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="lookalike",
        ir_version=8,
    )  # fmt: skip
    onnx.checker.check_model(model)
    return model


def write_head_graph(head: Any, path: Path, int8: bool = True) -> None:
    """Write `head` as an ONNX graph to `path` (atomically): with `int8`, its matrix
    products in INT8 (head_model), else float32."""
    data = head_model(head, int8=int8).SerializeToString()
    atomic_write(path, lambda fh: fh.write(data))
