"""Models with external data through load -> int8 weights -> save, with bounded memory.

The slow tests build a >2 GB float32 model (``scripts/big_model.py``: a MatMul/Relu chain whose
weights are streamed into an external-data file) and measure the round trip in a fresh subprocess,
so its peak RSS (VmHWM) is the round trip's alone. The fast tests do the same on ~20 MB.

Run the slow ones with ``pytest -m slow tests/test_big_model.py`` (about 2.5 GB of RAM, 6 GB of
disk under the pytest temp folder, removed afterwards).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxcompress as oc
from onnxcompress import io
from onnxcompress.passes.quantize import Int8WeightsPass

ROOT = Path(__file__).resolve().parents[1]
BIG_BYTES = 2.3e9
RSS_RATIO_MAX = 1.6
COSINE_MIN = 0.99


def _load_big_model():
    spec = importlib.util.spec_from_file_location("big_model", ROOT / "scripts" / "big_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("big_model", module)
    spec.loader.exec_module(module)
    return module


bm = _load_big_model()


def _assert_output_ok(src: Path, out: Path, check: dict, *, external: bool) -> None:
    """The properties every round trip must have (``check`` is ``bm.check_output``'s result)."""
    data = out.with_name(out.name + ".data")
    if external:
        assert data.is_file(), f"no external data file next to {out}"
        assert check["external_files"] == [data.name]
        assert out.stat().st_size < 100_000, "the .onnx file should hold only the graph"
    else:
        assert not data.exists()
        assert check["external_files"] == []
    ratio = bm.model_bytes(out) / bm.model_bytes(src)
    assert 0.24 <= ratio <= 0.26, f"int8 output is {ratio:.4f}x the float32 model"
    assert check["checker_ok"]
    assert check["ops"].get("DequantizeLinear", 0) + check["ops"].get("Cast", 0) == check["ops"]["MatMul"]
    assert check["ref_finite"]
    assert check["cosine"] >= COSINE_MIN, check


# --------------------------------------------------------------------------- fast


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return bm.build_big_model(tmp_path / "src", total_bytes=20e6, seed=3, dim=1024)


def test_build_streams_weights_to_external_data(small_model: Path) -> None:
    data = small_model.with_name(small_model.name + ".data")
    assert data.is_file()
    assert small_model.stat().st_size < 10_000
    proto = onnx.load(str(small_model))  # with its external data
    onnx.checker.check_model(str(small_model))
    weights = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    assert len(weights) == 5 and all(w.shape == (1024, 1024) and w.dtype == np.float32 for w in weights)
    assert sum(w.nbytes for w in weights) >= 20e6
    rng = np.random.default_rng(3)
    first = rng.standard_normal((1024, 1024), dtype=np.float32) * np.float32(np.sqrt(2.0 / 1024))
    np.testing.assert_array_equal(weights[0], first)
    bare = onnx.load(str(small_model), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in bare.graph.initializer)


def test_small_external_roundtrip(small_model: Path, tmp_path: Path) -> None:
    before = small_model.with_name(small_model.name + ".data").read_bytes()
    model = oc.load(small_model)
    # Loaded lazily: no weight is read before the pass needs it.
    weights = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
    assert len(weights) == 5 and all(isinstance(t._values, io.ExternalValues) for t in weights)
    reports = oc.Pipeline([Int8WeightsPass()]).run(model)
    assert reports[0].stats["tensors_changed"] == 5
    (tmp_path / "out").mkdir()
    out = oc.save(model, tmp_path / "out" / "m.int8.onnx", external=True)
    check = bm.check_output(small_model, out)
    _assert_output_ok(small_model, out, check, external=True)
    # The input model and its data are untouched.
    assert small_model.with_name(small_model.name + ".data").read_bytes() == before
    # The output reloads through the safe loader too.
    assert oc.load(out).graph.nodes


def test_int8_pass_does_not_keep_float_weights(small_model: Path) -> None:
    model = oc.load(small_model)
    weights = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
    oc.Pipeline([Int8WeightsPass()]).run(model)
    # The replaced float tensors must still be lazy: read once, quantized, and let go.
    assert all(isinstance(t._values, io.ExternalValues) for t in weights)


def test_measure_roundtrip_small(small_model: Path, tmp_path: Path) -> None:
    """The measuring code itself (subprocesses, report keys) on a model small enough to be fast."""
    r = bm.measure_roundtrip(small_model, tmp_path / "out", external=True)
    for key in ("fp32_bytes", "output_bytes", "size_ratio", "peak_rss", "rss_ratio", "wall_s", "load_s", "cosine"):
        assert key in r, key
    assert r["tensors_changed"] == 5
    assert r["peak_rss"] >= r["baseline_rss"] > 0
    _assert_output_ok(small_model, Path(r["output"]), r, external=True)
    assert "peak RSS" in bm.format_table(r)


# --------------------------------------------------------------------------- slow: over 2 GB


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("big_model")
    try:
        path = bm.build_big_model(folder / "src", total_bytes=BIG_BYTES, seed=0)
        assert bm.model_bytes(path) > 2**31, "the model must be over the 2 GB protobuf limit"
        assert path.stat().st_size < 100_000
        yield path, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # pytest keeps temp folders: do not leave GBs behind


def _roundtrip(big_model: tuple[Path, Path], name: str, external: bool | None) -> tuple[Path, dict]:
    src, folder = big_model
    r = bm.measure_roundtrip(src, folder / name, external=external)
    print("\n" + bm.format_table(r))
    return src, r


@pytest.mark.slow
def test_big_model_int8_external_data(big_model: tuple[Path, Path]) -> None:
    """>2 GB in, int8 weights, saved with external data: 0.25x, valid, same outputs, bounded RSS."""
    src, r = _roundtrip(big_model, "external", external=True)
    out = Path(r["output"])
    try:
        _assert_output_ok(src, out, r, external=True)
        assert r["rss_ratio"] <= RSS_RATIO_MAX, (
            f"peak RSS {r['peak_rss'] / 1e9:.2f} GB is {r['rss_ratio']:.2f}x the float32 model "
            f"({r['fp32_bytes'] / 1e9:.2f} GB); phases: {r['phases']}"
        )
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


@pytest.mark.slow
def test_big_model_int8_auto_external(big_model: tuple[Path, Path]) -> None:
    """The same with ``save(external=None)``: the output keeps the input's external-data layout."""
    src, r = _roundtrip(big_model, "auto", external=None)
    out = Path(r["output"])
    try:
        _assert_output_ok(src, out, r, external=True)
        assert r["rss_ratio"] <= RSS_RATIO_MAX, (
            f"peak RSS {r['peak_rss'] / 1e9:.2f} GB is {r['rss_ratio']:.2f}x the float32 model "
            f"({r['fp32_bytes'] / 1e9:.2f} GB); phases: {r['phases']}"
        )
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
