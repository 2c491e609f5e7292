"""Block-wise int4: GPTQ maths, block scales, packing, Gather, subgraphs, old opsets, both targets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, embedding_model, if_model, matmul_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.cli import main
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.quantize.gptq import gptq, output_error, quantize_rtn
from onnxcompress.passes.quantize.int4 import Int4Config, Int4Pass, int4_config, pack_halves, pack_pairs

MODELS = Path(__file__).resolve().parent.parent / "models"
MINILM = MODELS / "cache" / "minilm"


def _quantize(src: Path, out: Path, ctx: PassContext | None = None, **cfg: object) -> tuple[Path, oc.PassReport]:
    model = oc.load(src)
    report = Int4Pass(Int4Config(**cfg)).run(model, ctx or PassContext())  # type: ignore[arg-type]
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out, report


def _ops(path: Path) -> Counter[str]:
    m = onnx.load(str(path))
    return Counter(n.op_type for n in m.graph.node)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in model.graph.initializer}


def _correlated(n: int, k: int, seed: int, rows_seed: int = 0) -> np.ndarray:
    """Activations with correlated channels of very different scales (as in real layers); ``seed`` fixes
    the distribution, ``rows_seed`` the samples drawn from it."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.float32(np.sqrt(k))
    scale = rng.uniform(0.1, 3.0, k).astype(np.float32)
    rows = np.random.default_rng(1000 + rows_seed).standard_normal((n, k)).astype(np.float32)
    return ((rows @ mix) * scale).astype(np.float32)


# -- maths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_on_calibration_data_is_below_rtn(symmetric: bool, act_order: bool) -> None:
    rng = np.random.default_rng(0)
    k, n = 96, 48  # K not a multiple of the block: padded
    x = _correlated(800, k, 1)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    hess = x.T.astype(np.float64) @ x
    for clip in (False, True):
        rtn = quantize_rtn(w, 64, symmetric, clip)
        q = gptq(w, hess, 64, symmetric=symmetric, clip_search=clip, act_order=act_order)
        e_rtn, e_gptq = output_error(x, w, rtn.dequantize()), output_error(x, w, q.dequantize())
        assert e_gptq < 0.9 * e_rtn, (clip, e_gptq, e_rtn)
        assert q.codes.shape == (n, 128) and q.codes.max() <= 15
        assert np.all(q.codes[:, k:] == q.zero_points[:, -1:])  # padded columns dequantize to 0


def test_gptq_dead_columns_and_shared_hessian() -> None:
    rng = np.random.default_rng(1)
    x = _correlated(300, 64, 2)
    x[:, 5] = 0.0  # a channel never active: H_kk = 0
    w = rng.standard_normal((16, 64)).astype(np.float32)
    q = gptq(w, x.T.astype(np.float64) @ x, 32)
    assert q.dequantize()[:, 5].tolist() == [0.0] * 16
    with pytest.raises(ValueError):
        gptq(w, np.zeros((10, 10)), 32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_scales_and_rounding_bound(symmetric: bool) -> None:
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((24, 96)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
    q = quantize_rtn(w, 32, symmetric, clip_search=False)
    assert q.scales.shape == (24, 3) and q.zero_points.shape == (24, 3)
    assert np.array_equal(q.scales.astype(np.float16).astype(np.float32), q.scales)  # float16-exact
    if symmetric:
        assert np.all(q.zero_points == 8)
    deq = q.dequantize()
    step = np.repeat(np.abs(q.scales), 32, axis=1)
    assert np.all(np.abs(w - deq) <= step * (1.0 if symmetric else 0.5) + 1e-7)
    # Each block's scale only depends on that block: changing one block leaves the others alone.
    w2 = w.copy()
    w2[:, :32] *= 10
    q2 = quantize_rtn(w2, 32, symmetric, clip_search=False)
    assert np.array_equal(q2.scales[:, 1:], q.scales[:, 1:])
    # The clipping search never does worse than min/max on the squared error it minimises.
    searched = quantize_rtn(w, 32, symmetric, clip_search=True)
    err = lambda d: ((w - d) ** 2).reshape(24, 3, 32).sum(-1)  # noqa: E731
    assert np.all(err(searched.dequantize()) <= err(deq) * (1 + 1e-5) + 1e-9)


def test_packing_layouts_round_trip() -> None:
    codes = np.random.default_rng(3).integers(0, 16, (5, 64)).astype(np.uint8)
    halves = pack_halves(codes, 32)  # [5, 2, 16]
    lo, hi = halves & 15, halves >> 4
    assert np.array_equal(np.concatenate([lo, hi], axis=-1).reshape(5, 64), codes)
    pairs = pack_pairs(codes)  # [5, 32]
    assert np.array_equal(np.stack([pairs & 15, pairs >> 4], axis=-1).reshape(5, 64), codes)


# -- the pass ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 80])
def test_matmul_outputs_match_the_quantized_weights(tmp_path: Path, target: str, symmetric: bool, k: int) -> None:
    proto = matmul_model(k=k, n=48)
    src = save(proto, tmp_path / "m.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", PassContext(target=target), symmetric=symmetric, min_elements=1)
    ws = _weights(proto)
    x = np.random.default_rng(4).standard_normal((2, 4, k)).astype(np.float32)
    # Expected: the float graph computed in numpy with the weights as the quantizer rounds them.
    w1 = quantize_rtn(ws["W"].T, 32, symmetric).dequantize().T
    w2 = quantize_rtn(ws["W2"].T, 32, symmetric).dequantize().T
    expected = np.maximum(x @ w1 + ws["b"], 0) @ w2
    (got,) = run(out, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    ops = _ops(out)
    if target == "onnxruntime":
        assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0
        assert report.stats["nonstandard_ops"] == ["MatMulNBits"]
    else:
        assert ops["MatMulNBits"] == 0 and report.stats["nonstandard_ops"] == []
        assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out)).graph.node)
    inits = _initializers(out)
    assert not any(v.dtype == np.float32 and v.size >= k * 48 for v in inits.values())  # no float copy kept
    stored = sum(v.nbytes for v in inits.values())
    assert stored < 0.2 * (k * 48 + 48 * 10) * 4 + 48 * 4 + 200
    assert report.stats["layers"][0]["bytes_after"] < report.stats["layers"][0]["bytes_before"] / 5
    assert report.stats["method"] == "rtn" and len(report.tensor_map) == 2


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
@pytest.mark.parametrize("dim", [64, 40])
def test_gather_table_gathers_packed_rows(tmp_path: Path, target: str, dim: int) -> None:
    proto = embedding_model(vocab=100, dim=dim)
    src = save(proto, tmp_path / "e.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", PassContext(target=target, exclude=("proj",)), min_elements=1)
    table = quantize_rtn(_weights(proto)["E"], 32).dequantize()
    ids = np.array([[0, 5, 99, -1], [3, 3, 7, 42]], np.int64)
    (got,) = run(out, {"ids": ids})
    np.testing.assert_allclose(got, table[ids] @ _weights(proto)["W"], rtol=1e-5, atol=1e-5)
    m = onnx.load(str(out))
    gathers = [n for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")]
    inits = {i.name: i for i in m.graph.initializer}
    gathered = {inits[n.input[0]].data_type for n in gathers}
    assert T.UINT8 in gathered and gathered <= {T.UINT8, T.FLOAT16}  # packed rows and their scales
    assert not any(i.data_type == T.FLOAT and np.prod(i.dims) >= 100 * dim for i in inits.values())
    form = report.stats["forms"]
    if target == "onnxruntime" and dim % 32 == 0:
        assert form == {"GatherBlockQuantized": 1}
    else:
        assert form == {"gather-load": 1}
    assert ("proj", "excluded by configuration") in report.skipped


@pytest.mark.parametrize("shared", [True, False])
def test_if_subgraph_weights(tmp_path: Path, shared: bool) -> None:
    src = save(if_model(shared=shared), tmp_path / "if.onnx")
    x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    calib = [{"cond": np.array(True), "x": x}]
    out, report = _quantize(src, tmp_path / "q.onnx", PassContext(calibration=calib), min_elements=1)
    assert report.stats["tensors_changed"] == (1 if shared else 2)
    assert report.stats["method"] == "gptq" and report.stats["gptq_layers"] == 0
    assert all("subgraph" in f["reason"] for f in report.stats["gptq_fallback"])
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        (ref,), (got,) = run(src, feed), run(out, feed)
        cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cos > 0.99 and not np.array_equal(ref, got)


def _constant_node_model(opset: int, k: int) -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((k, 16)).astype(np.float32)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    nodes = [
        h.make_node("Constant", [], ["W"], value=nh.from_array(w, "Wv"), name="cw"),
        h.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        h.make_node("Gather", ["E", "ids"], ["emb"], name="embed", axis=0),
    ]
    g = h.make_graph(
        nodes,
        "c",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", k]), h.make_tensor_value_info("ids", T.INT64, ["N"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16]), h.make_tensor_value_info("emb", T.FLOAT, ["N", 64])],
        [nh.from_array(table, "E")],
    )
    return _model(g, opset)


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_old_opsets_and_constant_nodes(tmp_path: Path, opset: int) -> None:
    for k in (64, 40):
        src = save(_constant_node_model(opset, k), tmp_path / f"c{k}.onnx")
        out, report = _quantize(src, tmp_path / f"q{k}.onnx", min_elements=1)
        m = onnx.load(str(out))
        assert m.opset_import[0].version == opset  # never raised
        if opset < 10 and k == 40:
            assert any("opset 9 < 10" in r for _, r in report.skipped)
            assert report.stats["tensors_changed"] == 1
        else:
            assert "Constant" not in _ops(out)
            assert report.stats["tensors_changed"] == 2
        feed = {"x": np.ones((2, k), np.float32), "ids": np.array([1, 49], np.int64)}
        for ref, got in zip(run(src, feed), run(out, feed)):
            assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98
        expected_gather = "gather-load" if opset >= 11 else "load"
        assert expected_gather in report.stats["forms"]


def test_skips_with_reasons(tmp_path: Path) -> None:
    proto = matmul_model(k=8, n=8)
    src = save(proto, tmp_path / "s.onnx")
    _, report = _quantize(src, tmp_path / "q.onnx")
    assert not report.modified
    assert all("too small" in r for _, r in report.skipped)


def test_params_and_gptq_without_calibration(tmp_path: Path) -> None:
    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    with pytest.raises(OnnxCompressError, match="calibration"):
        Int4Pass(Int4Config(method="gptq", min_elements=1)).run(oc.load(src), PassContext())
    with pytest.raises(OnnxCompressError, match="block_size"):
        int4_config(Params({"block_size": "48"}))
    params = Params({"block_size": "64", "symmetric": "false", "method": "rtn", "damp": "0.1", "act_order": "true"})
    cfg = int4_config(params)
    assert (cfg.block_size, cfg.symmetric, cfg.method, cfg.damp, cfg.act_order) == (64, False, "rtn", 0.1, True)
    assert not params.unused()


def test_refuses_quantized_model(tmp_path: Path) -> None:
    src = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    once, _ = _quantize(src, tmp_path / "q.onnx", PassContext(target="onnxruntime"), min_elements=1)
    with pytest.raises(OnnxCompressError, match="already quantized"):
        Int4Pass().run(oc.load(once), PassContext())


def test_gptq_through_the_pass_beats_rtn(tmp_path: Path) -> None:
    """On a layer whose input channels are correlated, GPTQ's output error on held-out data is lower."""
    k, n = 128, 64
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", k])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", n])],
        [nh.from_array(w, "W")],
    )
    src = save(_model(g), tmp_path / "l.onnx")
    calib = [{"x": _correlated(2000, k, 8)}]
    held_out = {"x": _correlated(500, k, 8, rows_seed=1)}
    gq, report = _quantize(src, tmp_path / "g.onnx", PassContext(calibration=calib))
    rq, _ = _quantize(src, tmp_path / "r.onnx", PassContext(calibration=calib), method="rtn")
    assert report.stats["gptq_layers"] == 1 and report.stats["layers"][0]["scheme"].startswith("int4-gptq")
    (ref,) = run(src, held_out)
    err_g = float(np.sum((run(gq, held_out)[0] - ref) ** 2))
    err_r = float(np.sum((run(rq, held_out)[0] - ref) ** 2))
    assert err_g < 0.8 * err_r


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
def test_tiny_transformer_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str) -> None:
    out, rep = tmp_path / "t.onnx", tmp_path / "r.json"
    args = ["compress", str(MODELS / "tiny_transformer.onnx"), "-o", str(out), "-q", "int4", "--report", str(rep)]
    code = main([*args, "--target", target])
    assert code == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    stats = next(p for p in report["passes"] if p["name"] == "int4")["stats"]
    assert stats["method"] == "gptq" and stats["gptq_layers"] >= 10  # the sidecar calibration data
    assert report["size_ratio"] < 0.2
    assert report["validation"]["passed"]
    ops = _ops(out)
    if target == "onnxruntime":
        assert ops["MatMulNBits"] >= 10 and ops["GatherBlockQuantized"] == 1
    else:
        assert ops["MatMulNBits"] == 0 and stats["nonstandard_ops"] == []


def test_tiny_transformer_api_rtn(tmp_path: Path) -> None:
    report = oc.compress(
        MODELS / "tiny_transformer.onnx",
        tmp_path / "t.onnx",
        ["int4"],
        params={"method": "rtn", "block_size": "64"},
        tolerances=["cosine>=0.97"],
        calibration=None,
    )
    assert report.validation is not None and report.validation.passed
    stats = next(p for p in report.passes if p.name == "int4").stats
    assert stats["method"] == "rtn"
    assert all(layer["scheme"] == "int4-rtn-b64-sym" for layer in stats["layers"])


@pytest.mark.skipif(not (MINILM / "minilm.onnx").exists(), reason="models/cache/minilm absent (gitignored)")
def test_minilm_rtn_size_and_accuracy(tmp_path: Path) -> None:
    report = oc.compress(
        MINILM / "minilm.onnx",
        tmp_path / "m.onnx",
        ["int4"],
        params={"method": "rtn"},
        tolerances=["cosine>=0.90"],
    )
    assert report.size_ratio <= 0.16
    assert report.validation is not None and report.validation.passed


def test_batched_matmul_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    w = rng.standard_normal((3, 40, 16)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="bmm")],
        "b",
        [h.make_tensor_value_info("x", T.FLOAT, [3, 4, 40])],
        [h.make_tensor_value_info("y", T.FLOAT, [3, 4, 16])],
        [nh.from_array(w, "W")],
    )
    src = save(_model(g), tmp_path / "b.onnx")
    x = rng.standard_normal((3, 4, 40)).astype(np.float32)
    out, report = _quantize(src, tmp_path / "q.onnx", PassContext(calibration=[{"x": x}], target="onnxruntime"))
    assert report.stats["forms"] == {"load": 1} and "batched" in report.stats["gptq_fallback"][0]["reason"]
    rows = quantize_rtn(w.transpose(0, 2, 1).reshape(-1, 40), 32).dequantize()
    expected = x @ rows.reshape(3, 16, 40).transpose(0, 2, 1)
    np.testing.assert_allclose(run(out, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
