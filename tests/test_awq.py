"""Activation-aware channel scaling (AWQ) of int4 weights: the search, the emitted forms, params."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.quantize import awq
from onnxcompress.passes.quantize.gptq import output_error, quantize_rtn
from onnxcompress.passes.quantize.int4 import DEFAULT_AWQ, Int4Config, Int4Pass, int4_config

MODELS = Path(__file__).resolve().parent.parent / "models"


def _salient(n: int, k: int, seed: int = 0, rows_seed: int = 0) -> np.ndarray:
    """Activations whose channels differ in scale by three orders of magnitude (a few large ones)."""
    scale = np.exp(np.random.default_rng(seed).uniform(np.log(0.02), np.log(20.0), k)).astype(np.float32)
    rows = np.random.default_rng(100 + rows_seed).standard_normal((n, k)).astype(np.float32)
    return rows * scale


def _two_consumers(k: int = 96, n: int = 48, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """``y = x @ W`` (MatMul) and ``z = Gemm(x, G, transB=1)``: both read the same activation ``x [batch, k]``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = rng.standard_normal((n, k)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        h.make_node("Gemm", ["x", "G"], ["z"], name="gemm", transB=1),
    ]
    graph = h.make_graph(
        nodes,
        "two",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", k])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", n]), h.make_tensor_value_info("z", T.FLOAT, ["batch", n])],
        [nh.from_array(w, "W"), nh.from_array(g, "G")],
    )
    return _model(graph, opset)


def _quantize(src: Path, out: Path, ctx: PassContext, **cfg: object) -> tuple[Path, oc.PassReport]:
    model = oc.load(src)
    report = Int4Pass(Int4Config(min_elements=1, **cfg)).run(model, ctx)  # type: ignore[arg-type]
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out, report


# -- maths ------------------------------------------------------------------------------------------


def test_channel_scales_and_the_search_objective() -> None:
    k, n = 64, 40
    x = _salient(500, k)
    hess = (x.T @ x).astype(np.float64)
    diag = np.diagonal(hess).copy()
    diag[5] = 0.0  # a dead channel keeps the factor 1
    inv = awq.channel_inverse(diag, 0.5, rows=500)
    assert inv.dtype == np.float32 and np.array_equal(inv.astype(np.float16).astype(np.float32), inv)
    assert inv[5] == 1.0 and np.all(inv > 0)
    c = 1.0 / inv[diag > 0].astype(np.float64)
    assert 0.98 < np.sqrt(c.max() * c.min()) < 1.02  # normalised around 1
    rms = np.sqrt(diag / 500)
    assert np.corrcoef(np.log(c), np.log(rms[diag > 0]))[0, 1] > 0.999  # c = rms ** 0.5 (up to float16)
    assert np.array_equal(awq.channel_inverse(diag, 0.0), np.ones(k, np.float32))
    # The objective is the output error on the calibration rows, and the search never does worse than alpha 0.
    w = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    q = quantize_rtn(w, 32).dequantize()
    assert awq.layer_error(q - w, hess) == pytest.approx(output_error(x, w, q), rel=1e-3)

    def quantize(ws: np.ndarray, cw: np.ndarray) -> np.ndarray:
        return quantize_rtn(ws, 32, True, True, 16, cw).dequantize()

    found = awq.search(w, x.T @ x, quantize)
    assert set(found.errors) <= set(awq.ALPHAS) and len(found.errors) == 8 and 0.0 in found.errors
    assert found.alpha > 0 and found.errors[found.alpha] == min(found.errors.values())
    assert found.errors[found.alpha] < 0.95 * found.errors[0.0]  # salient channels: a gain (0.88 here)
    wq = quantize(w * found.factor, np.diagonal(x.T @ x) * found.inverse**2) * found.inverse
    assert output_error(x, w, wq) == pytest.approx(found.errors[found.alpha], rel=1e-3)
    # Held-out rows of the same distribution gain too.
    x2 = _salient(300, k, rows_seed=1)
    plain = quantize_rtn(w, 32, True, True, 16, np.diagonal(x.T @ x)).dequantize()
    assert output_error(x2, w, wq) < 0.95 * output_error(x2, w, plain)  # 0.86 here


# -- the pass ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
def test_rtn_with_awq_matches_the_scaled_weights(tmp_path: Path, target: str) -> None:
    k, n = 96, 48
    proto = _two_consumers(k, n)
    src = save(proto, tmp_path / "m.onnx")
    calib = [{"x": _salient(256, k)}]
    held = {"x": _salient(128, k, rows_seed=2)}
    ctx = PassContext(calibration=calib, target=target)
    out, report = _quantize(src, tmp_path / "q.onnx", ctx, method="rtn", awq="true", clip_search=False)
    plain, _ = _quantize(src, tmp_path / "p.onnx", ctx, method="rtn", clip_search=False)
    st = report.stats
    assert st["awq"] is True and st["awq_scaled"] == 2 and st["method"] == "rtn"
    layers = {la["tensor"]: la for la in st["layers"]}
    assert {la["scheme"] for la in layers.values()} == {"int4-awq-rtn-b32-sym"}
    # Expected: the weights as the quantizer rounds them, with the exponent the pass reports.
    x = calib[0]["x"].astype(np.float64)
    diag = np.diagonal(x.T @ x)
    ws = {i.name: nh.to_array(i) for i in proto.graph.initializer}
    eff = {}
    for name, rows in (("W", ws["W"].T), ("G", ws["G"])):
        inv = awq.channel_inverse(diag, layers[name]["awq_alpha"])
        q = quantize_rtn(rows * (1.0 / inv), 32, True, False, 16, diag * inv.astype(np.float64) ** 2)
        eff[name] = q.dequantize() * inv
        wide = 4 if target == "onnxruntime" and name == "W" else 2  # MatMulNBits: float32 scales
        assert layers[name]["bytes_after"] == q.codes.size // 2 + wide * (q.scales.size + k)
    got_y, got_z = run(out, held)
    np.testing.assert_allclose(got_y, held["x"] @ eff["W"].T, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(got_z, held["x"] @ eff["G"].T, rtol=1e-4, atol=2e-3)
    ref = run(src, held)
    err = sum(float(np.sum((a - b) ** 2)) for a, b in zip(run(out, held), ref))
    err_plain = sum(float(np.sum((a - b) ** 2)) for a, b in zip(run(plain, held), ref))
    assert err < 0.7 * err_plain
    ops = [nd.op_type for nd in onnx.load(str(out)).graph.node]
    if target == "onnxruntime":
        assert ops.count("MatMulNBits") == 1 and st["nonstandard_ops"] == ["MatMulNBits"]
    else:
        assert "MatMulNBits" not in ops and st["nonstandard_ops"] == []


@pytest.mark.parametrize("opset", [11, 13])
def test_gptq_with_awq_beats_gptq_and_old_opsets(tmp_path: Path, opset: int) -> None:
    k, n = 96, 48
    src = save(_two_consumers(k, n, opset=opset), tmp_path / "m.onnx")
    ctx = PassContext(calibration=[{"x": _salient(256, k)}])
    held = {"x": _salient(128, k, rows_seed=2)}
    out, report = _quantize(src, tmp_path / "q.onnx", ctx, awq="true", damp=0.01)
    plain, plain_report = _quantize(src, tmp_path / "p.onnx", ctx, damp=0.01)
    assert report.stats["method"] == "gptq" and report.stats["awq_scaled"] == 2
    assert {la["scheme"] for la in report.stats["layers"]} == {"int4-awq-gptq-b32-sym"}
    assert plain_report.stats["awq"] is False and "awq_scaled" not in plain_report.stats  # Int4Config default
    ref = run(src, held)
    err = sum(float(np.sum((a - b) ** 2)) for a, b in zip(run(out, held), ref))
    err_plain = sum(float(np.sum((a - b) ** 2)) for a, b in zip(run(plain, held), ref))
    assert err < err_plain
    assert onnx.load(str(out)).opset_import[0].version == opset


def test_awq_off_without_calibration_and_for_tables(tmp_path: Path) -> None:
    src = save(_two_consumers(), tmp_path / "m.onnx")
    _, report = _quantize(src, tmp_path / "q.onnx", PassContext(), awq="auto")
    assert report.stats["method"] == "rtn" and report.stats["awq"] is False
    assert all(la["awq_alpha"] == 0.0 for la in report.stats["layers"])
    with pytest.raises(OnnxCompressError, match="calibration"):
        _quantize(src, tmp_path / "q2.onnx", PassContext(), awq="true")
    # auto: on for round-to-nearest given calibration data, off with GPTQ
    ctx = PassContext(calibration=[{"x": _salient(64, 96)}])
    _, rtn = _quantize(src, tmp_path / "q3.onnx", ctx, method="rtn", awq="auto")
    assert rtn.stats["awq"] is True and {la["scheme"] for la in rtn.stats["layers"]} == {"int4-awq-rtn-b32-sym"}
    _, gptq = _quantize(src, tmp_path / "q4.onnx", ctx, awq="auto")
    assert gptq.stats["awq"] is False and {la["scheme"] for la in gptq.stats["layers"]} == {"int4-gptq-b32-sym"}


def test_params() -> None:
    assert DEFAULT_AWQ == "false" and int4_config(Params({})).awq == "false"
    assert int4_config(Params({"awq": "auto"})).awq == "auto"
    assert Int4Config().awq == "false"
    cfg = int4_config(Params({"awq": "0.5"}))
    assert cfg.awq == "true" and cfg.awq_alphas == (0.5,)
    assert int4_config(Params({"awq": "0,0.25,0.5"})).awq_alphas == (0.0, 0.25, 0.5)
    assert int4_config(Params({"awq": "off"})).awq == "false"
    for bad in ("maybe", "1.5", "", "0,x"):
        with pytest.raises(OnnxCompressError, match="--param awq"):
            int4_config(Params({"awq": bad}))
    with pytest.raises(ValueError):
        Int4Config(awq="yes")


def test_tiny_transformer_awq_and_budget(tmp_path: Path) -> None:
    src = MODELS / "tiny_transformer.onnx"
    feeds = dict(np.load(MODELS / "tiny_transformer.inputs.npz"))
    calib = [{k: v[: len(v) // 2] for k, v in feeds.items()}]
    for budget in (0.0, 0.3):
        model = oc.load(src)
        cfg = int4_config(Params({"int4_budget": str(budget), "awq": "true"}))
        report = Int4Pass(dataclasses_replace(cfg, min_elements=1)).run(model, PassContext(calibration=calib))
        out = tmp_path / f"q{budget}.onnx"
        oc.save(model, out)
        st = report.stats
        assert st["awq"] is True and st["awq_scaled"] >= 1
        if budget:
            assert st["bytes_after"] <= budget * st["bytes_before"]
        held = {k: v[len(v) // 2 :] for k, v in feeds.items()}
        for got, want in zip(run(out, held), run(src, held)):
            assert np.all(np.isfinite(got)) and got.shape == want.shape


def dataclasses_replace(cfg: Int4Config, **changes: object) -> Int4Config:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
