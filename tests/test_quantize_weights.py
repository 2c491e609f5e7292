"""Weight-only int8: structure, the error bound from the maths, subgraphs, old opsets, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import conv_model, embedding_model, if_model, matmul_model, run, save
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.quantize import Int8WeightsConfig, Int8WeightsPass
from onnxcompress.passes.quantize._math import quantize_symmetric, symmetric_scales


def _quantize(src: Path, out: Path, **cfg: object) -> tuple[Path, oc.PassReport]:
    model = oc.load(src)
    report = Int8WeightsPass(Int8WeightsConfig(**cfg)).run(model, PassContext())  # type: ignore[arg-type]
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out, report


def _dequantized(path: Path, names: list[str], feed: dict[str, np.ndarray], tmp: Path) -> dict[str, np.ndarray]:
    """The values onnxruntime computes for the dequantized weights ``names`` (exposed as outputs)."""
    m = onnx.load(str(path))
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = tmp / "probe.onnx"
    onnx.save(m, str(probe))
    values = run(probe, feed)
    return dict(zip(names, values[-len(names) :]))


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in onnx.load(str(path)).graph.initializer}


MM_FEED = {"x": np.ones((1, 4, 64), np.float32)}


@pytest.mark.parametrize("form", ["load", "runtime"])
def test_per_channel_structure_and_error_bound(tmp_path: Path, form: str) -> None:
    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", form=form)
    m = onnx.load(str(out))
    ops = Counter(n.op_type for n in m.graph.node)
    if form == "runtime":
        assert ops["DequantizeLinear"] == 2 and ops["Cast"] == 0
    else:
        assert ops["DequantizeLinear"] == 0 and ops["Cast"] == 2 and ops["Mul"] == 2
    dtypes = {i.name: i.data_type for i in m.graph.initializer}
    assert dtypes["W_quantized"] == onnx.TensorProto.INT8 and dtypes["W2_quantized"] == onnx.TensorProto.INT8
    assert dtypes["b"] == onnx.TensorProto.FLOAT  # the bias stays float
    assert report.stats["tensors_changed"] == 2
    assert report.tensor_map == {"W_dequantized": "W", "W2_dequantized": "W2"}
    original = _initializers(src)
    deq = _dequantized(out, list(report.tensor_map), MM_FEED, tmp_path)
    for new, name in report.tensor_map.items():
        w = original[name]
        scale = np.abs(w).max(axis=0) / 127  # per output column
        assert np.all(np.abs(deq[new] - w) <= scale / 2 + 1e-7)
    assert report.stats["bytes_after"] < 0.3 * report.stats["bytes_before"]


def test_block_granularity_error_bound(tmp_path: Path) -> None:
    src = save(matmul_model(k=256, n=32), tmp_path / "m.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", granularity="block", block_size=32)
    assert report.stats["forms"] == {"load-block": 1, "load": 1}  # W2 has K=32: one block -> per channel
    inits = _initializers(out)
    assert inits["W_quantized"].shape == (8, 32, 32) and inits["W_scale"].dtype == np.float16
    w = _initializers(src)["W"]
    deq = _dequantized(out, ["W_dequantized"], {"x": np.ones((1, 4, 256), np.float32)}, tmp_path)["W_dequantized"]
    block_scale = np.repeat(np.abs(w.reshape(8, 32, 32)).max(axis=1) / 127, 32, axis=0)
    # Rounding with the float16 scale: half a step plus the float16 rounding of the scale at the clip.
    assert np.all(np.abs(deq - w) <= 0.57 * block_scale)
    per_channel_err = np.abs(w - np.rint(w / (np.abs(w).max(0) / 127)) * (np.abs(w).max(0) / 127)).mean()
    assert np.abs(deq - w).mean() < per_channel_err


def test_per_tensor_option(tmp_path: Path) -> None:
    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", granularity="tensor", form="runtime")
    m = onnx.load(str(out))
    scales = [i for i in m.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(len(s.dims) == 0 for s in scales)
    original = _initializers(src)
    deq = _dequantized(out, list(report.tensor_map), MM_FEED, tmp_path)
    for new, name in report.tensor_map.items():
        w = original[name]
        assert np.abs(deq[new] - w).max() <= np.abs(w).max() / 127 / 2 + 1e-7


def test_conv_convtranspose_gemm_axes(tmp_path: Path) -> None:
    src = save(conv_model(), tmp_path / "c.onnx")
    out, _ = _quantize(src, tmp_path / "q.onnx", form="runtime")
    m = onnx.load(str(out))
    axes = {
        n.input[0]: next(a.i for a in n.attribute if a.name == "axis")
        for n in m.graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert axes == {"W1_quantized": 0, "W2_quantized": 1, "WG_quantized": 0}
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)
    a, b = run(src, {"x": x})[0], run(out, {"x": x})[0]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999


@pytest.mark.parametrize("form", ["load", "runtime"])
def test_old_opset_constant_nodes(tmp_path: Path, form: str) -> None:
    src = save(conv_model(opset=11, constant_nodes=True), tmp_path / "c11.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", form=form)
    m = onnx.load(str(out))
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["DequantizeLinear"] == 0 and ops["Cast"] == 3 and ops["Mul"] == 3  # per-axis DQ needs opset 13
    assert report.stats["forms"] == {"load": 3}
    assert m.opset_import[0].version == 11
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)
    a, b = run(src, {"x": x})[0], run(out, {"x": x})[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert report.stats["bytes_after"] < 0.3 * report.stats["bytes_before"]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_if_subgraph_weights_are_quantized(tmp_path: Path, shared: bool, granularity: str) -> None:
    src = save(if_model(shared=shared), tmp_path / "if.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", granularity=granularity, block_size=16)
    assert report.stats["tensors_changed"] == (1 if shared else 2)
    m = onnx.load(str(out))
    all_inits = list(m.graph.initializer) + [i for a in m.graph.node[-1].attribute for i in a.g.initializer]
    assert {i.data_type for i in all_inits if i.name.endswith("_quantized")} == {onnx.TensorProto.INT8}
    assert not any(i.data_type == onnx.TensorProto.FLOAT and i.name in ("W", "W_else") for i in all_inits)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    for cond in (True, False):
        a = run(src, {"cond": np.array(cond), "x": x})[0]
        b = run(out, {"cond": np.array(cond), "x": x})[0]
        cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.999


def test_skips_are_reported(tmp_path: Path) -> None:
    src = save(matmul_model(k=8, n=8), tmp_path / "m.onnx")  # W is 64 elements, W2 80
    _, report = _quantize(src, tmp_path / "q.onnx")
    assert not report.modified
    reasons = dict(report.skipped)
    assert reasons["W"] == "too small (64 elements < 256)"
    _, report = _quantize(src, tmp_path / "q2.onnx", min_elements=1, exclude=("W2",))
    assert report.tensor_map == {"W_dequantized": "W"}
    assert dict(report.skipped)["W2"] == "excluded by configuration"


@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_quantizing_twice_changes_nothing_and_is_deterministic(tmp_path: Path, granularity: str) -> None:
    src = save(conv_model(), tmp_path / "c.onnx")
    once, _ = _quantize(src, tmp_path / "q1.onnx", granularity=granularity)
    twice, report = _quantize(once, tmp_path / "q2.onnx", granularity=granularity)
    assert not report.modified
    assert onnx.load(str(once)).graph == onnx.load(str(twice)).graph
    again, _ = _quantize(src, tmp_path / "q3.onnx", granularity=granularity)
    assert again.read_bytes() == once.read_bytes()


def test_load_form_is_folded_by_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    src = save(conv_model(), tmp_path / "c.onnx")
    out, _ = _quantize(src, tmp_path / "q.onnx", granularity="block", block_size=16)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["Cast"] == 0 and ops["Mul"] == 0 and ops["Reshape"] == 0


def test_math_symmetric_range_and_zero_channel() -> None:
    w = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0]], np.float32)  # channel 0 is all zero
    s = symmetric_scales(w, axis=0, qmax=127)
    assert s[0] == 1.0 and s[1] == pytest.approx(2 / 127)
    q = quantize_symmetric(w, s, 0, 127, np.int8)
    assert q[0].tolist() == [0, 0, 0]
    assert q[1].tolist() == [64, -127, 127]
    assert quantize_symmetric(-w, s, 0, 127, np.int8).tolist() == (-q).tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_tables_are_gathered_before_dequantizing(tmp_path: Path, tied: bool) -> None:
    src = save(embedding_model(tied=tied), tmp_path / "e.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx")
    m = onnx.load(str(out))
    assert {i.name: i.data_type for i in m.graph.initializer}["E_quantized"] == onnx.TensorProto.INT8
    forms = report.stats["forms"]
    if tied:  # the table also feeds a Transpose: it is dequantized whole, per row
        assert forms == {"load": 2}
    else:
        assert forms == {"gather": 1, "load": 1}
        gathers = [n for n in m.graph.node if n.op_type == "Gather"]
        assert {n.input[0] for n in gathers} == {"E_quantized", "E_scale"}
    ids = np.random.default_rng(0).integers(0, 100, size=(3, 7)).astype(np.int64)
    a, b = run(src, {"ids": ids}), run(out, {"ids": ids})
    for x, y in zip(a, b):
        cos = np.sum(x * y, axis=-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
        assert cos.min() > 0.999
