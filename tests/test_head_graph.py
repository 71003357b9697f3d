"""The head as an ONNX graph (lookalike.models.head_graph): what a head model saved by
`lookalike tune` runs. A head with every part (the MLP, the kept base, the posterior,
the colour), random but of the shipped shapes' kind, run by ONNX Runtime against
`Head.apply`."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from lookalike.encoders.colour import DIM as COLOUR_DIM
from lookalike.encoders.runtime import file_sha256, l2_normalise, make_session
from lookalike.errors import ModelError
from lookalike.models.head_graph import COLOUR_INPUT, INPUT, OUTPUT, write_head_graph
from lookalike.models.tuned import Head, TunedEncoder

D_IN, HIDDEN, D_OUT, CLASSES = 96, 64, 32, 7


def _head(**parts: float) -> Head:
    rng = np.random.default_rng(3)
    return Head(
        mean=rng.normal(size=D_IN).astype(np.float32) * 0.05,
        weights=[rng.normal(size=(D_IN, HIDDEN)).astype(np.float32) / np.sqrt(D_IN),
                 rng.normal(size=(HIDDEN, D_OUT)).astype(np.float32) / np.sqrt(HIDDEN)],
        biases=[rng.normal(size=HIDDEN).astype(np.float32) * 0.1,
                rng.normal(size=D_OUT).astype(np.float32) * 0.1],
        classifier=rng.normal(size=(D_IN, CLASSES)).astype(np.float32) * 3,
        classifier_bias=rng.normal(size=CLASSES).astype(np.float32),
        **parts,
    )  # fmt: skip


def _inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = l2_normalise(rng.normal(size=(n, D_IN)) + 0.3)
    colour = l2_normalise(np.abs(rng.normal(size=(n, COLOUR_DIM))))
    return x, colour


def _run(path, head: Head, x: np.ndarray, colour: np.ndarray) -> np.ndarray:
    feeds = {INPUT: x, COLOUR_INPUT: colour} if head.needs_colour else {INPUT: x}
    return make_session(path, threads=1).run([OUTPUT], feeds)[0]


ALL_PARTS = {"keep_base": 1.0, "class_weight": 0.5, "colour_weight": 0.7}


@pytest.mark.parametrize("parts", [{}, {"keep_base": 1.25}, ALL_PARTS], ids=["mlp", "kept", "all"])
def test_the_graph_computes_what_the_head_does(tmp_path, parts):
    head = _head(**parts)
    x, colour = _inputs(40)
    want = head.apply(x, colour if head.needs_colour else None)
    write_head_graph(head, tmp_path / "float.onnx", int8=False)
    np.testing.assert_allclose(_run(tmp_path / "float.onnx", head, x, colour), want, atol=2e-6)
    write_head_graph(head, tmp_path / "int8.onnx")
    got = _run(tmp_path / "int8.onnx", head, x, colour)
    assert got.shape == want.shape == (40, head.dim)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cos = (got * want).sum(axis=1)
    assert cos.min() > 0.999 and not np.array_equal(got, want), cos.min()
    # 8 bits, not coarser: 4-bit codes would be 16 times further off (0.005 at most here,
    # 0.002 on a real grocery head and real photos)
    assert np.abs(got - want).max() < 0.01


def test_a_row_does_not_depend_on_its_batch(tmp_path):
    """A catalog image embedded among thousands and a query embedded alone must come out
    the same: each row is quantised by its own scale, not its batch's."""
    head = _head(**ALL_PARTS)
    x, colour = _inputs(30)
    x[7] *= 50  # a row far larger than the rest would set a batch-wide scale
    path = tmp_path / "int8.onnx"
    write_head_graph(head, path)
    batch = _run(path, head, x, colour)
    alone = np.concatenate([_run(path, head, x[i : i + 1], colour[i : i + 1]) for i in range(30)])
    np.testing.assert_array_equal(batch, alone)


def test_the_same_head_gives_the_same_graph(tmp_path):
    head = _head(**ALL_PARTS)
    write_head_graph(head, tmp_path / "a.onnx")
    write_head_graph(_head(**ALL_PARTS), tmp_path / "b.onnx")
    digests = {
        hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.onnx", "b.onnx")
    }
    assert len(digests) == 1
    write_head_graph(_head(keep_base=1.0), tmp_path / "c.onnx")
    assert hashlib.sha256((tmp_path / "c.onnx").read_bytes()).hexdigest() not in digests
    weights = (tmp_path / "a.onnx").stat().st_size
    write_head_graph(head, tmp_path / "f.onnx", int8=False)
    assert weights < 0.4 * (tmp_path / "f.onnx").stat().st_size  # a quarter of the bytes


@pytest.mark.parametrize("graph", [False, True], ids=["numpy", "int8-graph"])
def test_a_colour_head_without_colour_rows_is_a_clear_error(tmp_path, graph):
    """A head that reads the colour descriptor, given none or the wrong number of rows,
    says so (ModelError) on both paths, the numpy head and its INT8 graph, instead of an
    ONNX Runtime shape error or a numpy one."""
    head = _head(**ALL_PARTS)
    info, path = {}, None
    if graph:
        path = tmp_path / "head.onnx"
        write_head_graph(head, path)
        info = {"head_graph_sha256": file_sha256(path, None)}
    base = SimpleNamespace(name="base", dim=D_IN, stamp="base", input_size=260)
    enc = TunedEncoder(base, head, "v1", info=info, graph=path)
    x, colour = _inputs(6)
    assert enc.from_base_vectors(x, colour).shape == (6, head.dim)
    for bad in (None, colour[:5]):
        with pytest.raises(ModelError, match="colour descriptor"):
            enc.from_base_vectors(x, bad)
