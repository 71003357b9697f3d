"""lookalike.encoders: the bundled EfficientNet-Lite on ONNX Runtime and `onnx:PATH` models.

The ONNX export runs once per test session into a temporary cache folder.
"""

from __future__ import annotations

import csv
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from lookalike.encoders import Encoder, load_encoder
from lookalike.encoders import efficientnet as effnet
from lookalike.errors import InputPathError, ModelError, UsageError
from lookalike.images import load_image

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
GROCERY = DATA / "grocery"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")

GRANNY_SMITH, BANANA = 948, 954  # ImageNet-1k class indices


def grocery_catalog_image(product_id: str) -> Path:
    with (GROCERY / "catalog.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["product_id"] == product_id:
                return GROCERY / row["image"]
    raise LookupError(product_id)


@pytest.fixture(scope="session")
def cache_dir(shared_model_cache) -> Path:
    """The session's model cache (tests/conftest.py), shared with the engine tests."""
    return shared_model_cache


@pytest.fixture(scope="session")
def lite2(cache_dir):
    return load_encoder("efficientnet-lite2", cache_dir)


@pytest.fixture(scope="session")
def sample_batch(lite2) -> np.ndarray:
    """Four real catalog/shopper images (or generated ones without the data folder)."""
    if DATA.is_dir():
        paths = [
            grocery_catalog_image("Granny-Smith"),
            grocery_catalog_image("Banana"),
            GROCERY / "dataset/val/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg",
            DATA / "fashion-footwear/images/59051.jpg",
        ]
        return np.stack([lite2.prepare(load_image(p)) for p in paths])
    rng = np.random.default_rng(0)
    s = lite2.input_size
    return rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8)


def test_bundled_encoder_follows_the_contract(lite2, sample_batch):
    assert isinstance(lite2, Encoder)
    assert lite2.name == "efficientnet-lite2"
    assert lite2.input_size == 260
    assert lite2.dim == 1280 + 352
    name, digest, preprocess = lite2.stamp.split(":")
    assert name == "efficientnet-lite2" and len(digest) == 16
    assert preprocess.startswith(lite2.fit) and "260" in preprocess
    vecs = lite2.embed(sample_batch)
    assert vecs.shape == (4, 1632) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert (vecs[:, :1280] >= 0).all()  # the head part averages ReLU6 features
    assert lite2.embed(sample_batch[:0]).shape == (0, 1632)


def test_set_threads_keeps_the_vectors(cache_dir, sample_batch):
    enc = load_encoder("efficientnet-lite2", cache_dir, threads=1)
    before = enc.embed(sample_batch[:2])
    enc.set_threads(2, spinning=False)
    assert np.allclose(enc.embed(sample_batch[:2]), before, atol=1e-5)


def test_batch_and_single_embeddings_agree(lite2, sample_batch):
    batched = lite2.embed(sample_batch)
    singles = np.concatenate([lite2.embed(sample_batch[i : i + 1]) for i in range(4)])
    assert np.allclose(batched, singles, atol=1e-5)
    # different images really get different vectors
    sims = batched @ batched.T
    assert sims[0, 1] < 0.95


def test_embed_rejects_wrong_shape_or_dtype(lite2):
    with pytest.raises(ValueError, match="uint8"):
        lite2.embed(np.zeros((1, 224, 224, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        lite2.embed(np.zeros((1, 260, 260, 3), np.float32))


@needs_data
@pytest.mark.parametrize(("product", "klass"), [("Granny-Smith", GRANNY_SMITH), ("Banana", BANANA)])
def test_imagenet_head_recognises_grocery_catalog_images(lite2, product, klass):
    pixels = lite2.prepare(load_image(grocery_catalog_image(product)))[None]
    logits = lite2.logits(pixels)[0]
    top5 = np.argsort(-logits)[:5]
    assert klass in top5, f"{product}: top-5 {top5.tolist()}"


def test_torch_eager_and_onnx_runtime_agree(lite2, sample_batch):
    torch = pytest.importorskip("torch")
    module = effnet.build_torch_model("efficientnet-lite2")
    with torch.no_grad():
        emb, logits, feats = module(torch.from_numpy(sample_batch))
    ort_emb = lite2.embed(sample_batch)
    cos = (emb.numpy() * ort_emb).sum(axis=1)
    assert cos.min() > 0.9999, cos
    assert np.allclose(emb.numpy(), ort_emb, atol=1e-4)
    assert np.allclose(logits.numpy(), lite2.logits(sample_batch), atol=1e-2)
    ort_feats = lite2.features(sample_batch)
    assert ort_feats.shape == tuple(feats.shape) == (4, 1632, 9, 9)
    assert np.allclose(feats.numpy(), ort_feats, atol=1e-3)
    # the head's 1280 channels, then the last MBConv block's 352, scaled
    last = []
    hook = module.net._blocks[-1].register_forward_hook(lambda m, i, out: last.append(out))
    with torch.no_grad():
        module(torch.from_numpy(sample_batch))
    hook.remove()
    block = effnet.BLOCK_WEIGHT * last[0].numpy()
    assert np.allclose(ort_feats[:, 1280:], block, atol=1e-3)
    assert (ort_feats[:, :1280] >= 0).all()  # ReLU6
    # the embedding is the normalised global average of the feature map
    pooled = ort_feats.mean(axis=(2, 3))
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.allclose(pooled, ort_emb, atol=1e-5)


def test_second_load_reuses_the_exported_file(lite2, cache_dir):
    files = [f for f in cache_dir.glob("efficientnet-lite2-*.onnx") if "-int8-" not in f.name]
    assert len(files) == 1
    before = (effnet.EXPORT_COUNT, files[0].stat().st_mtime_ns)
    again = load_encoder("efficientnet-lite2", cache_dir)
    assert (effnet.EXPORT_COUNT, files[0].stat().st_mtime_ns) == before
    assert again.stamp == lite2.stamp
    assert again.model_path == files[0]
    assert not list(cache_dir.glob("*.tmp"))  # no leftovers of the atomic export


@pytest.fixture(scope="session")
def lite2_int8(cache_dir, lite2):
    return load_encoder("efficientnet-lite2-int8", cache_dir)


def test_int8_model_agrees_with_float32(lite2, lite2_int8, sample_batch):
    assert isinstance(lite2_int8, Encoder)
    assert (lite2_int8.input_size, lite2_int8.dim) == (lite2.input_size, lite2.dim)
    name, digest, preprocess = lite2_int8.stamp.split(":")
    assert name == "efficientnet-lite2-int8" and preprocess == lite2.stamp.split(":")[2]
    assert digest != lite2.stamp.split(":")[1]  # its own vector space: never mixed
    assert lite2_int8.model_path.stat().st_size < lite2.model_path.stat().st_size / 3
    vecs = lite2_int8.embed(sample_batch)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cos = (vecs * lite2.embed(sample_batch)).sum(axis=1)
    assert cos.min() > 0.98, cos
    # still the same network: different images stay apart
    assert (vecs @ vecs.T)[0, 1] < 0.95


@needs_data
def test_int8_agrees_with_float32_on_real_catalog_images(lite2, lite2_int8, monkeypatch):
    """On an x86 CPU without VNNI (AVX2 alone), ONNX Runtime's default u8s8 kernels
    saturate: there the INT8 Lite2 gave fashion-footwear embeddings at cosine 0.91 to
    float32 on average, 0.67 at worst. Sessions there ask for exact arithmetic
    (runtime.X64_QUANT_PRECISION); on a VNNI CPU the fast kernels are exact already, and
    give the exact path's embeddings bit for bit."""
    fashion = DATA / "fashion-footwear"
    with (fashion / "catalog.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[::60]
    imgs = [load_image(fashion / r["image"], draft_size=lite2.draft_size) for r in rows]
    batch = np.stack([lite2.prepare(img) for img in imgs])
    cos = (lite2_int8.embed(batch) * lite2.embed(batch)).sum(axis=1)
    assert len(cos) >= 40 and cos.mean() > 0.99 and cos.min() > 0.97, (cos.mean(), cos.min())
    from lookalike.encoders import runtime

    assert _exact_int8_asked(lite2_int8.session) == runtime.needs_exact_int8()
    if not runtime.needs_exact_int8():  # VNNI: the option would only make it slower
        fast, fast_session = lite2_int8.embed(batch), lite2_int8.session
        try:
            monkeypatch.setattr(runtime, "_cpu_kind", lambda *_: "no vnni")
            lite2_int8.session = runtime.make_session(lite2_int8.model_path)
            assert _exact_int8_asked(lite2_int8.session)
            assert np.array_equal(lite2_int8.embed(batch), fast)
        finally:  # the fixture is the session's
            lite2_int8.session = fast_session


def _exact_int8_asked(session) -> bool:
    options = session.get_session_options()
    try:
        return options.get_session_config_entry("session.x64quantprecision") == "1"
    except Exception:  # ORT raises for a key that was never set
        return False


def test_exact_int8_is_asked_for_only_where_the_fast_kernels_saturate(lite2_int8, monkeypatch):
    from lookalike.encoders import runtime

    assert runtime.needs_exact_int8(AVX2_ONLY, "x86_64")
    assert runtime.needs_exact_int8("processor : 0\n", "x86_64")  # unknown: the safe side
    assert not runtime.needs_exact_int8(AVX512_VNNI, "x86_64")
    assert not runtime.needs_exact_int8(AVX2_ONLY, "aarch64")
    for kind, asked in (("no vnni", True), ("unknown", True), ("vnni", False)):
        monkeypatch.setattr(runtime, "_cpu_kind", lambda *_, kind=kind: kind)
        assert _exact_int8_asked(runtime.make_session(lite2_int8.model_path)) is asked, kind
    monkeypatch.setattr(runtime, "X64_QUANT_PRECISION", False)
    assert not runtime.needs_exact_int8()  # the switch turns it off everywhere


# the flags lines of two real /proc/cpuinfo files, shortened: an AMD EPYC with AVX2 alone
# (this project's CI machine) and an Intel Xeon with AVX-512 VNNI
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx f16c avx2 bmi2\n"
AVX512_VNNI = "processor\t: 0\nflags\t\t: fpu avx avx2 avx512f avx512bw avx512_vnni\n"


def test_int8_kernels_tells_a_cpu_without_vnni(monkeypatch):
    """`lookalike info` says which INT8 arithmetic this CPU gets: INT8's speed edge over
    float32 depends on it (docs/models.md)."""
    from lookalike.encoders import runtime

    assert runtime.int8_kernels(AVX2_ONLY, "x86_64") == "exact u8u8, no VNNI"
    assert runtime.int8_kernels(AVX512_VNNI, "x86_64") == "vnni"
    assert runtime.int8_kernels("flags : avx2 avx_vnni\n", "AMD64") == "vnni"  # Alder Lake
    assert runtime.int8_kernels(AVX2_ONLY, "aarch64") == "not x86"
    assert runtime.int8_kernels("processor : 0\n", "x86_64") == "unknown"
    monkeypatch.setattr(runtime, "X64_QUANT_PRECISION", False)
    assert runtime.int8_kernels(AVX2_ONLY, "x86_64") == "saturating u8s8, no VNNI"
    monkeypatch.undo()
    # this machine, read from /proc/cpuinfo, agrees with what numpy detected
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_cpu

    here = runtime.int8_kernels()
    if numpy_cpu.get("AVX512VNNI"):
        assert here == "vnni"
    elif numpy_cpu.get("AVX2"):
        assert here in ("vnni", "exact u8u8, no VNNI")  # numpy does not list AVX-VNNI


@needs_data
def test_int8_imagenet_head_still_recognises_the_apple(lite2_int8):
    pixels = lite2_int8.prepare(load_image(grocery_catalog_image("Granny-Smith")))[None]
    assert GRANNY_SMITH in np.argsort(-lite2_int8.logits(pixels)[0])[:5]


def test_int8_build_is_deterministic(lite2, lite2_int8, tmp_path):
    """The stamp is computed before the file is built, so every build must give the
    same bytes: rebuild from the same float32 graph in another folder and compare."""
    import shutil

    from lookalike.encoders import quantize

    assert np.array_equal(quantize.calibration_batch(64)[:4], quantize.calibration_batch(64)[:4])
    shutil.copy(lite2.model_path, tmp_path / lite2.model_path.name)
    again = load_encoder("efficientnet-lite2-int8", tmp_path)
    assert again.stamp == lite2_int8.stamp
    assert again.model_path.read_bytes() == lite2_int8.model_path.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_int8_stamp_follows_the_recipe(cache_dir, lite2, monkeypatch):
    from lookalike.encoders import quantize

    model = effnet.BUNDLED["efficientnet-lite2-int8"]
    before = effnet.content_hash(model, cache_dir)
    monkeypatch.setattr(quantize, "QUANT_VERSION", "test")
    assert effnet.content_hash(model, cache_dir) != before


def test_fit_option_changes_the_stamp(cache_dir, lite2):
    other_fit = "pad" if lite2.fit != "pad" else "crop"
    other = load_encoder("efficientnet-lite2", cache_dir, fit=other_fit)
    assert other.fit == other_fit and other.stamp != lite2.stamp
    assert other.stamp.split(":")[:2] == lite2.stamp.split(":")[:2]


def test_unwritable_model_folder_is_a_model_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the model folder should be")
    with pytest.raises(ModelError, match="not writable"):
        load_encoder("efficientnet-lite0", blocker / "models")


def test_unknown_model_and_bad_options(cache_dir, tmp_path):
    with pytest.raises(UsageError, match="unknown model"):
        load_encoder("resnet-50", cache_dir)
    with pytest.raises(InputPathError):
        load_encoder(f"onnx:{tmp_path / 'missing.onnx'}", cache_dir)
    with pytest.raises(UsageError, match="unknown option"):
        load_encoder("onnx:/x.onnx?colour=1", cache_dir)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_encoder(f"onnx:{bad}", cache_dir)


# ---------------------------------------------------------------- onnx:PATH


@pytest.fixture(scope="session")
def float_nchw_feature_model(tmp_path_factory) -> Path:
    """The bundled network exported the way a user would bring a model: float NCHW input,
    normalised outside the graph, un-pooled (N, 1280, h, w) feature map as output."""
    torch = pytest.importorskip("torch")
    net = effnet.build_torch_model("efficientnet-lite2").net

    class FeatureMap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x)

    path = tmp_path_factory.mktemp("user") / "lite2-features.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and folding notes
        torch.onnx.export(
            FeatureMap().eval(),
            (torch.zeros(1, 3, 260, 260),),
            str(path),
            input_names=["x"],
            output_names=["fmap"],
            dynamic_axes={"x": {0: "n"}, "fmap": {0: "n"}},
            opset_version=effnet.OPSET,
            dynamo=False,
        )
    return path


def test_onnx_file_encoder_matches_bundled(
    float_nchw_feature_model, lite2, sample_batch, cache_dir
):
    model = float_nchw_feature_model
    spec = f"onnx:{model}?mean=127,127,127&std=128,128,128&fit={lite2.fit}"
    user = load_encoder(spec, cache_dir)
    assert user.input_size == 260  # read from the model's static input shape
    assert user.dim == 1280
    assert user.name == spec
    assert user.stamp.startswith("onnx:") and user.stamp != lite2.stamp
    vecs = user.embed(sample_batch)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # the bundled graph's head features, pooled the same way
    head = lite2.features(sample_batch)[:, :1280].mean(axis=(2, 3))
    head /= np.linalg.norm(head, axis=1, keepdims=True)
    assert ((vecs * head).sum(axis=1) > 0.9999).all()
    # same options as keyword arguments -> same vector space
    kw = load_encoder(
        f"onnx:{model}",
        cache_dir,
        mean="127",
        std=(128, 128, 128),
        fit=lite2.fit,
    )
    assert kw.stamp == user.stamp
    # different normalisation -> different stamp and different vectors
    other = load_encoder(f"onnx:{model}", cache_dir, fit=lite2.fit)
    assert other.stamp != user.stamp
    assert not np.allclose(other.embed(sample_batch[:1]), vecs[:1], atol=1e-3)


def test_onnx_file_with_uint8_input_gets_raw_pixels(lite2, sample_batch, cache_dir):
    # the bundled graph itself takes uint8 NHWC and normalises inside
    user = load_encoder(f"onnx:{lite2.model_path}?fit={lite2.fit}", cache_dir)
    assert user.input_spec.raw_uint8
    assert np.allclose(user.embed(sample_batch), lite2.embed(sample_batch), atol=1e-6)
    logits = load_encoder(f"onnx:{lite2.model_path}?output=logits", cache_dir)
    assert logits.dim == 1000
    with pytest.raises(ModelError, match="no output named"):
        load_encoder(f"onnx:{lite2.model_path}?output=nope", cache_dir)


def test_onnx_spec_parsing():
    from lookalike.encoders.onnx_file import parse_spec

    path, opts = parse_spec("onnx:/m/clip.onnx?size=224&mean=0.48,0.45,0.40&layout=NHWC")
    assert path == Path("/m/clip.onnx")
    assert opts == {"size": "224", "mean": "0.48,0.45,0.40", "layout": "NHWC"}
    with pytest.raises(UsageError, match="needs a path"):
        parse_spec("onnx:")


@pytest.fixture(scope="session")
def lite0_concurrent(tmp_path_factory):
    """Three threads load lite0 at once into a fresh cache that holds the temp file of an
    export that was killed: (cache dir, encoders, exports run, the stale temp file)."""
    cache = tmp_path_factory.mktemp("lite0")
    name = "efficientnet-lite0"
    dest = cache / f"{name}-{effnet.content_hash(effnet.BUNDLED[name], cache)}.onnx"
    stale = cache / f".{dest.name}.killed.tmp"
    stale.write_bytes(b"half an export")
    before = effnet.EXPORT_COUNT
    with ThreadPoolExecutor(3) as pool:
        encoders = list(pool.map(lambda _: load_encoder(name, cache), range(3)))
    return cache, encoders, effnet.EXPORT_COUNT - before, stale


def test_concurrent_first_loads_export_once(lite0_concurrent):
    cache, encoders, exports, stale = lite0_concurrent
    assert exports == 1
    assert len({e.stamp for e in encoders}) == 1
    assert [p.name for p in cache.glob("*.onnx")] == [encoders[0].model_path.name]
    assert not stale.exists() and not list(cache.glob("*.tmp"))


@needs_data
def test_lite0_head_and_size(lite0_concurrent):
    lite0 = lite0_concurrent[1][0]
    assert lite0.input_size == 224 and lite0.dim == 1280 + 320
    assert lite0.stamp.startswith("efficientnet-lite0:")
    pixels = lite0.prepare(load_image(grocery_catalog_image("Banana")))[None]
    assert BANANA in np.argsort(-lite0.logits(pixels)[0])[:5]


def mean_colour_model(path: Path, layout: str, size: int = 16) -> Path:
    """A tiny hand-built ONNX model: float image batch -> per-channel spatial mean (N, 3)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    shape = ["n", size, size, 3] if layout == "NHWC" else ["n", 3, size, size]
    axes = [1, 2] if layout == "NHWC" else [2, 3]
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["axes"], value_ints=axes),
            helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_onnx_file_layout_and_normalisation(tmp_path, layout):
    path = mean_colour_model(tmp_path / f"mean-{layout}.onnx", layout)
    enc = load_encoder(f"onnx:{path}?mean=0,0.5,0&std=1,0.5,1", tmp_path)
    assert enc.input_spec.layout == layout  # guessed from the input shape
    assert enc.input_size == 16 and enc.dim == 3
    pixels = np.zeros((2, 16, 16, 3), np.uint8)
    pixels[0, ..., 0] = 255  # red: (1, (0-0.5)/0.5, 0) = (1, -1, 0)
    pixels[1, ..., 2] = 255  # blue: (0, -1, 1)
    vecs = enc.embed(pixels)
    s = 1 / np.sqrt(2)
    assert np.allclose(vecs, [[s, -s, 0], [0, -s, s]], atol=1e-6)
    # the stamp names the file by content and the preprocessing
    other = load_encoder(f"onnx:{path}?mean=0,0.5,0&std=1,0.5,1&fit=stretch", tmp_path)
    assert other.stamp.split(":")[1] == enc.stamp.split(":")[1]
    assert other.stamp != enc.stamp
