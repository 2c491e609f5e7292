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


# --------------------------------------------------------------------------- bits, steps, ECR, GPTQ


def _mm_feeds(n: int, seed: int, k: int = 64) -> list[dict[str, np.ndarray]]:
    mix = np.random.default_rng(99).standard_normal((k, k)).astype(np.float32)  # correlated: GPTQ has work
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((n, 4, k)).astype(np.float32) @ mix)}]


def _symbols(path: Path, name: str = "W_quantized") -> np.ndarray:
    return _initializers(path)[name]


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_bits_bound_the_symbols_and_the_error(tmp_path: Path, bits: int) -> None:
    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", bits=bits)
    qmax = 2 ** (bits - 1) - 1
    q = _symbols(out)
    assert q.dtype == np.int8 and np.abs(q).max() == qmax
    w = _initializers(src)["W"]
    deq = _dequantized(out, ["W_dequantized"], MM_FEED, tmp_path)["W_dequantized"]
    s = np.abs(w).max(axis=0) / qmax
    assert np.all(np.abs(w - deq) <= s / 2 + 1e-6)
    assert report.stats["bits"] == bits


def test_default_is_the_plain_int8_pass(tmp_path: Path) -> None:
    """bits=8, step=max reproduce the historical symbols exactly."""
    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    out, _ = _quantize(src, tmp_path / "q.onnx")
    w = _initializers(src)["W"]
    s = symmetric_scales(w, 1, 127)
    np.testing.assert_array_equal(_symbols(out), quantize_symmetric(w, s, 1, 127, np.int8))


def test_rms_step_follows_the_spread_not_the_outliers(tmp_path: Path) -> None:
    """step=max gives a channel with one outlier a step many times coarser than its spread; step=rms
    keeps every channel's relative error alike, and the outlier keeps a large symbol (no clipping)."""
    rng = np.random.default_rng(0)
    model = matmul_model(k=256, n=64)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    w[7, ::4] = 20.0  # one outlier in every 4th output channel
    model.graph.initializer[0].CopyFrom(nh.from_array(w, "W"))
    src = save(model, tmp_path / "m.onnx")
    feed = {"x": np.ones((1, 4, 256), np.float32)}
    ratios = {}
    for step in ("max", "rms"):
        out, _ = _quantize(src, tmp_path / f"{step}.onnx", bits=6, step=step)
        deq = _dequantized(out, ["W_dequantized"], feed, tmp_path)["W_dequantized"]
        rel = np.sum((w - deq) ** 2, axis=0) / np.sum(w**2, axis=0)
        ratios[step] = float(np.mean(rel[::4]) / np.mean(rel[1::4]))
        if step == "rms":
            assert np.abs(_symbols(out)).max() > 31
    assert ratios["max"] > 10 and ratios["rms"] < 4, ratios


def test_half_bits_need_the_rms_step() -> None:
    from onnxcompress.errors import OnnxCompressError
    from onnxcompress.passes.base import Params
    from onnxcompress.passes.quantize.weights import int8_weights_config

    cfg = int8_weights_config(Params({"bits": "4.5", "step": "rms", "ecr_lambda": "0.05"}))
    assert cfg.bits == 4.5 and cfg.step == "rms" and cfg.ecr_lambda == 0.05
    for bad in ({"bits": "4.5"}, {"bits": "9"}, {"bits": "1"}, {"step": "median"}, {"ecr_lambda": "-1"}):
        with pytest.raises(OnnxCompressError):
            int8_weights_config(Params(bad))
    assert int8_weights_config(Params({}), granularity="block").granularity == "block"


def test_bits_by_tensor_and_ecr(tmp_path: Path) -> None:
    from onnxcompress.passes.quantize.entropy import coded_bits

    src = save(matmul_model(k=256, n=64), tmp_path / "m.onnx")
    out, _ = _quantize(src, tmp_path / "q.onnx", bits=8, bits_by_tensor=(("W", 3.0),))
    assert np.abs(_symbols(out)).max() == 3 and np.abs(_symbols(out, "W2_quantized")).max() == 127
    plain, _ = _quantize(src, tmp_path / "p.onnx", bits=3.5, step="rms")
    ecr, _ = _quantize(src, tmp_path / "e.onnx", bits=3.5, step="rms", ecr_lambda=0.1)
    qp, qe = _symbols(plain), _symbols(ecr)
    assert coded_bits(qe) < coded_bits(qp)
    assert np.all(np.abs(qe.astype(int) - qp.astype(int)) <= 1)


def test_gptq_needs_calibration_and_lowers_the_output_error(tmp_path: Path) -> None:
    from onnxcompress.errors import OnnxCompressError

    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    with pytest.raises(OnnxCompressError, match="calibration"):
        Int8WeightsPass(Int8WeightsConfig(bits=4, gptq=True)).run(oc.load(src), PassContext())
    calib, test = _mm_feeds(64, 1), _mm_feeds(64, 2)[0]
    errs = {}
    for use in (False, True):
        model = oc.load(src)
        report = Int8WeightsPass(Int8WeightsConfig(bits=4, step="rms", gptq=use)).run(
            model, PassContext(calibration=calib)
        )
        out = tmp_path / f"g{use}.onnx"
        oc.save(model, out)
        assert report.stats["gptq_layers"] == (2 if use else 0)
        ref, cand = run(src, test)[0], run(out, test)[0]
        errs[use] = float(np.mean((ref - cand) ** 2))
    assert errs[True] < 0.8 * errs[False], errs


def test_gptq_skips_what_it_cannot_fit(tmp_path: Path) -> None:
    """Tables (Gather) and convolutions are rounded to nearest; the pass still runs."""
    src = save(conv_model(), tmp_path / "c.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    model = oc.load(src)
    report = Int8WeightsPass(Int8WeightsConfig(bits=6, step="rms", gptq=True)).run(
        model, PassContext(calibration=[feed])
    )
    assert report.stats["tensors_changed"] >= 2
    out = tmp_path / "q.onnx"
    oc.save(model, out)
    a, b = run(src, feed)[0], run(out, feed)[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
