"""Block-wise int4: GPTQ maths, block scales, packing, Gather, subgraphs, old opsets, both targets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, embedding_model, if_model, matmul_model, run, save
from _rtn_reference import ref_block_params
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.cli import main
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.quantize.gptq import gptq, output_error, quantize_int8, quantize_rtn, stored_bytes
from onnxcompress.passes.quantize.int4 import (
    BUDGET_MARGIN,
    DEFAULT_BUDGET,
    DEFAULT_DAMP,
    NODE_BYTES,
    Int4Config,
    Int4Pass,
    int4_config,
    pack_halves,
    pack_pairs,
)

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


# -- 8-bit blocks inside the int4 mode (mixed precision within a size budget) ----------------------------


def test_int8_blocks_bound_and_sizes() -> None:
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((12, 200)) * rng.uniform(0.01, 2, (12, 1))).astype(np.float32)
    q = quantize_int8(w, 128)  # K padded to 256
    assert q.bits == 8 and q.codes.shape == (12, 256) and q.codes.min() >= 1
    assert np.all(q.codes[:, 200:] == 128) and np.all(q.zero_points == 128)
    step = np.repeat(q.scales, 128, axis=1)[:, :200]
    assert np.all(np.abs(w - q.dequantize()) <= step * 0.5 + 1e-7)
    assert np.abs(w - q.dequantize()).max() < np.abs(w - quantize_rtn(w, 32).dequantize()).max() / 4
    assert stored_bytes(12, 200, 128, 8) == 12 * 256 + 2 * 12 * 2
    assert stored_bytes(12, 200, 32, 4, symmetric=False, scale_bytes=4) == 12 * 224 // 2 + 5 * 7 * 12


def _two_layer(k: int = 128, n: int = 64) -> onnx.ModelProto:
    """``z = x W_a + 0.001 (x W_b)``: W_a is far more sensitive than W_b (same size)."""
    rng = np.random.default_rng(11)
    wa, wb = (rng.standard_normal((2, k, n)) * 0.1).astype(np.float32)
    g = h.make_graph(
        [
            h.make_node("MatMul", ["x", "Wa"], ["ya"], name="mm_a"),
            h.make_node("MatMul", ["x", "Wb"], ["yb"], name="mm_b"),
            h.make_node("Mul", ["yb", "tiny"], ["yb_small"], name="scale"),
            h.make_node("Add", ["ya", "yb_small"], ["z"], name="add"),
        ],
        "two",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", k])],
        [h.make_tensor_value_info("z", T.FLOAT, ["N", n])],
        [nh.from_array(wa, "Wa"), nh.from_array(wb, "Wb"), nh.from_array(np.array(0.001, np.float32), "tiny")],
    )
    return _model(g)


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
def test_budget_gives_8_bits_to_the_sensitive_weight(tmp_path: Path, target: str) -> None:
    k, n = 128, 64
    proto = _two_layer(k, n)
    src = save(proto, tmp_path / "two.onnx")
    calib = [{"x": _correlated(400, k, 12)}]
    held_out = {"x": _correlated(200, k, 12, rows_seed=3)}
    bytes_before = sum(v.nbytes for v in _weights(proto).values())
    scale = 4 if target == "onnxruntime" else 2
    int4 = stored_bytes(n, k, 32, 4, scale_bytes=scale)
    one_upgrade = stored_bytes(n, k, 128, 8, scale_bytes=scale) - int4
    projected = bytes_before - 2 * (4 * k * n - int4) + 2 * NODE_BYTES
    budget = (projected + 1.5 * one_upgrade) / bytes_before / (1 - BUDGET_MARGIN)  # room for one 8-bit weight
    ctx = PassContext(calibration=calib, target=target)
    out, report = _quantize(src, tmp_path / "q.onnx", ctx, budget=budget)
    plain, plain_report = _quantize(src, tmp_path / "p.onnx", ctx)
    st = report.stats
    assert [t["tensor"] for t in st["int8_tensors"]] == ["Wa"] and st["int8_candidates"] == 2
    schemes = {layer["tensor"]: (layer["scheme"], layer["bits"]) for layer in st["layers"]}
    assert schemes == {"Wa": ("int8-b128-sym", 8), "Wb": ("int4-gptq-b32-sym", 4)}
    assert "int8_tensors" not in plain_report.stats  # budget 0 (the Int4Config default): int4 only
    assert st["bytes_after"] <= budget * st["bytes_before"]
    # The 8-bit weight is stored as 8-bit codes and computed exactly as quantize_int8 rounds it.
    wa = _weights(proto)["Wa"]
    x = held_out["x"]
    expected_a = x @ quantize_int8(wa.T, 128).dequantize().T
    ops = _ops(out)
    if target == "onnxruntime":
        nbits = [nd for nd in onnx.load(str(out)).graph.node if nd.op_type == "MatMulNBits"]
        assert sorted(a.i for nd in nbits for a in nd.attribute if a.name == "bits") == [4, 8]
    else:
        assert ops["MatMulNBits"] == 0 and st["nonstandard_ops"] == []
    only_a = save(_two_layer(k, n), tmp_path / "a.onnx")
    m = oc.load(only_a)
    Int4Pass(Int4Config(budget=1.0)).run(m, PassContext(calibration=calib, target=target, exclude=("mm_b",)))
    oc.save(m, tmp_path / "a_q.onnx")
    got_a = run(tmp_path / "a_q.onnx", held_out)[0] - 0.001 * (x @ _weights(proto)["Wb"])
    np.testing.assert_allclose(got_a, expected_a, rtol=1e-4, atol=1e-4)
    (ref,) = run(src, held_out)
    err = float(np.sum((run(out, held_out)[0] - ref) ** 2))
    err_plain = float(np.sum((run(plain, held_out)[0] - ref) ** 2))
    assert err < 0.2 * err_plain


def test_budget_params_and_no_room(tmp_path: Path) -> None:
    cfg = int4_config(Params({}))
    assert cfg.budget == DEFAULT_BUDGET and cfg.damp == DEFAULT_DAMP
    assert int4_config(Params({"int4_budget": "0", "int8_block": "64"})).int8_block == 64
    with pytest.raises(OnnxCompressError, match="int4_budget"):
        int4_config(Params({"int4_budget": "1.5"}))
    src = save(_two_layer(), tmp_path / "two.onnx")
    calib = [{"x": _correlated(300, 128, 12)}]
    _, report = _quantize(src, tmp_path / "q.onnx", PassContext(calibration=calib), budget=0.1)
    assert report.stats["int8_room_bytes"] < 0 and "int8_tensors" not in report.stats
    assert all(layer["bits"] == 4 for layer in report.stats["layers"])
    _, rtn = _quantize(src, tmp_path / "r.onnx", method="rtn", budget=0.5)  # no calibration: no measurement
    assert all(layer["bits"] == 4 for layer in rtn.stats["layers"])


def test_padding_tokens_are_left_out_of_the_hessians(tmp_path: Path) -> None:
    k, n = 64, 32
    w = (np.random.default_rng(13).standard_normal((k, n)) * 0.1).astype(np.float32)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "tok",
        [
            h.make_tensor_value_info("x", T.FLOAT, ["B", "T", k]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["B", "T"]),
        ],
        [h.make_tensor_value_info("y", T.FLOAT, ["B", "T", n])],
        [nh.from_array(w, "W")],
    )
    src = save(_model(g), tmp_path / "tok.onnx")
    tokens = _correlated(60, k, 14).reshape(3, 20, k)
    mask = np.ones((3, 20), np.int64)
    mask[:, 12:] = 0
    padded = tokens.copy()
    padded[:, 12:] = 50.0  # garbage in padded positions
    trimmed = [{"x": tokens[i : i + 1, :12], "attention_mask": mask[i : i + 1, :12]} for i in range(3)]
    fitted = {}
    for label, feeds, masking in [
        ("masked", [{"x": padded, "attention_mask": mask}], True),
        ("trimmed", trimmed, True),
        ("unmasked", [{"x": padded, "attention_mask": mask}], False),
    ]:
        _, report = _quantize(src, tmp_path / f"{label}.onnx", PassContext(calibration=feeds), mask_padding=masking)
        fitted[label] = _initializers(tmp_path / f"{label}.onnx")
    same = [np.array_equal(fitted["masked"][key], fitted["trimmed"][key]) for key in fitted["masked"]]
    assert all(same)
    assert not all(np.array_equal(fitted["masked"][key], fitted["unmasked"][key]) for key in fitted["masked"])


def test_sensitivity_feeds_are_trimmed_token_slices() -> None:
    from onnxcompress.passes.quantize.int4 import _trimmed

    mask = np.zeros((5, 10), np.int64)
    for i, n in enumerate([3, 10, 2, 7, 4]):
        mask[i, :n] = 1
    ids = np.arange(50).reshape(5, 10)
    parts = list(_trimmed({"input_ids": ids, "attention_mask": mask}, 2))
    assert [p["input_ids"].shape for p in parts] == [(2, 3), (2, 7), (1, 10)]
    assert sorted(int(r[0]) for p in parts for r in p["input_ids"]) == [0, 10, 20, 30, 40]
    assert all(np.array_equal(p["attention_mask"].sum(1) > 0, np.ones(len(p["attention_mask"]), bool)) for p in parts)
    plain = {"x": np.ones((5, 10), np.float32)}
    assert list(_trimmed(plain, 2)) == [plain]


# -- int8 scale codes (scale_bits=8) ------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_scale_codes_are_exact_multiples_of_a_row_step(symmetric: bool) -> None:
    rng = np.random.default_rng(21)
    w = (rng.standard_normal((40, 96)) * rng.uniform(0.001, 3, (40, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero row
    x = _correlated(256, 96, seed=5)
    for q in (quantize_rtn(w, 32, symmetric, scale_bits=8), gptq(w, x.T @ x, 32, symmetric=symmetric, scale_bits=8)):
        assert q.scale_step is not None and q.scale_step.shape == (40,)
        assert np.array_equal(q.scale_step.astype(np.float16).astype(np.float32), q.scale_step)  # float16-exact
        codes = q.scale_codes()
        assert codes.dtype == np.int8 and np.all(codes != 0) and np.all(np.abs(codes.astype(int)) <= 127)
        # int8 code x float16 step is exact in float32: the file's Cast/Mul reproduces the scales bit for bit
        assert np.array_equal(codes.astype(np.float32) * q.scale_step[:, None], q.scales)
        assert np.all(q.dequantize()[3] == 0)
    fp16 = quantize_rtn(w, 32, symmetric)
    snapped = quantize_rtn(w, 32, symmetric, scale_bits=8)
    err = lambda q: float(((w - q.dequantize()) ** 2).sum())  # noqa: E731
    assert err(snapped) <= 1.1 * err(fp16)  # the int8 codes cost little precision
    assert stored_bytes(40, 96, 32, 4, scale_bytes=1, row_bytes=2) == 40 * 48 + 40 * 3 + 80
    with pytest.raises(ValueError):
        quantize_rtn(w, 32, scale_bits=4)


def _gemm_model(k: int = 128, n: int = 24) -> onnx.ModelProto:
    rng = np.random.default_rng(22)
    wg = (rng.standard_normal((n, k)) * 0.2).astype(np.float32)
    graph = h.make_graph(
        [h.make_node("Gemm", ["x", "WG"], ["y"], name="gemm", transB=1)],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [2, k])],
        [h.make_tensor_value_info("y", T.FLOAT, [2, n])],
        [nh.from_array(wg, "WG")],
    )
    return _model(graph)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_scale_codes_in_every_standard_form(tmp_path: Path, symmetric: bool) -> None:
    """MatMul ``[K, N]`` (column layout), Gemm ``transB`` (row layout) and a Gather table (gathered
    codes and steps) with ``scale_bits=8``: outputs equal the quantizer's values, files are smaller."""
    rng = np.random.default_rng(23)
    cases = [
        (matmul_model(k=80, n=48), {"x": rng.standard_normal((2, 4, 80)).astype(np.float32)}),
        (_gemm_model(), {"x": rng.standard_normal((2, 128)).astype(np.float32)}),
        (embedding_model(vocab=100, dim=100), {"ids": np.array([[0, 5, 99, -1], [3, 3, 7, 42]], np.int64)}),
    ]
    for i, (proto, feed) in enumerate(cases):
        src = save(proto, tmp_path / f"m{i}.onnx")
        sizes = {}
        for bits in (16, 8):
            out, report = _quantize(
                src, tmp_path / f"q{i}_{bits}.onnx", symmetric=symmetric, min_elements=1, scale_bits=bits
            )
            assert report.stats["scale_bits"] == bits
            # int8 codes where a row has more than 2 blocks (else the row's step costs what they save)
            for la in report.stats["layers"]:
                value = _weights(proto)[la["tensor"]]
                k = value.shape[1] if la["tensor"] in ("E", "WG") else value.shape[0]
                assert la["scale_bits"] == (8 if bits == 8 and k > 64 else 16), la
            sizes[bits] = sum(la["bytes_after"] for la in report.stats["layers"])
            if bits == 8:
                inits = onnx.load(str(out)).graph.initializer
                assert any(t.data_type == T.INT8 for t in inits)  # the scale codes
        # Expected: the float graph with every weight as quantize_rtn(scale_bits=8) rounds it.
        ws = _weights(proto)
        deq = {}
        for name, value in ws.items():
            if value.ndim != 2:
                continue
            rows = value.T if name != "E" and name != "WG" else value
            sb = 8 if rows.shape[1] > 64 else 16
            d = quantize_rtn(np.ascontiguousarray(rows), 32, symmetric, scale_bits=sb).dequantize()
            deq[name] = d.T if name != "E" and name != "WG" else d
        expected = run(save(_replace(proto, deq), tmp_path / f"e{i}.onnx"), feed)
        got = run(tmp_path / f"q{i}_8.onnx", feed)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
        assert sizes[8] < sizes[16]


def _replace(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for init in m.graph.initializer:
        if init.name in values:
            init.CopyFrom(nh.from_array(np.ascontiguousarray(values[init.name], dtype=np.float32), init.name))
    return m


def test_int8_scale_codes_params_and_contrib_target(tmp_path: Path) -> None:
    assert int4_config(Params({})).scale_bits == 0 and Int4Config().scale_bits == 16  # CLI: auto
    assert int4_config(Params({"scale_bits": "8"})).scale_bits == 8
    with pytest.raises(OnnxCompressError, match="scale_bits"):
        int4_config(Params({"scale_bits": "4"}))
    # auto: int8 codes only when GPTQ spends the saved bytes on 8-bit blocks (budget > 0)
    src = save(matmul_model(k=128, n=48), tmp_path / "a.onnx")
    x = np.random.default_rng(24).standard_normal((8, 4, 128)).astype(np.float32)
    for i, (budget, calib, expected) in enumerate([(0.3, [{"x": x}], 8), (0.0, [{"x": x}], 16), (0.3, None, 16)]):
        ctx = PassContext(calibration=calib)
        _, rep = _quantize(src, tmp_path / f"a{i}.onnx", ctx, min_elements=1, scale_bits=0, budget=budget)
        assert rep.stats["scale_bits"] == expected, (budget, calib)
    with pytest.raises(ValueError):
        Int4Config(scale_bits=12)
    # MatMulNBits takes float32 scales: with target onnxruntime the option changes nothing.
    src = save(matmul_model(k=64, n=48), tmp_path / "m.onnx")
    out, report = _quantize(src, tmp_path / "q.onnx", PassContext(target="onnxruntime"), min_elements=1, scale_bits=8)
    assert report.stats["scale_bits"] == 16 and _ops(out)["MatMulNBits"] == 2


def test_int8_scale_codes_on_a_batched_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    w = rng.standard_normal((3, 100, 16)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="bmm")],
        "b",
        [h.make_tensor_value_info("x", T.FLOAT, [3, 4, 100])],
        [h.make_tensor_value_info("y", T.FLOAT, [3, 4, 16])],
        [nh.from_array(w, "W")],
    )
    src = save(_model(g), tmp_path / "b.onnx")
    x = rng.standard_normal((3, 4, 100)).astype(np.float32)
    out, report = _quantize(src, tmp_path / "q.onnx", scale_bits=8)
    assert report.stats["forms"] == {"load": 1} and report.stats["layers"][0]["scale_bits"] == 8
    rows = quantize_rtn(w.transpose(0, 2, 1).reshape(-1, 100), 32, scale_bits=8).dequantize()
    expected = x @ rows.reshape(3, 16, 100).transpose(0, 2, 1)
    np.testing.assert_allclose(run(out, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- memory / speed rewrites (bit-identical)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("int8_scales", [False, True])
def test_block_params_matches_the_reference_bit_for_bit(symmetric: bool, int8_scales: bool) -> None:
    from onnxcompress.passes.quantize.gptq import block_params, row_scale_step

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((300, 96)) * rng.uniform(0.01, 3.0, (300, 1))).astype(np.float32)
    w[5, :32] = 0.0  # an all-zero block
    wb = w.reshape(300, 3, 32)
    weights = rng.uniform(0.0, 2.0, (3, 32)).astype(np.float32)
    step = row_scale_step(w)[:, None] if int8_scales else None
    for wts in (None, weights):
        got = block_params(wb, symmetric, True, wts, step)
        want = ref_block_params(wb, symmetric, True, wts, step)  # frozen in tests/_rtn_reference.py
        assert all(np.array_equal(g, r) for g, r in zip(got, want))


def test_row_scale_step_in_chunks_equals_the_whole_table() -> None:
    from onnxcompress.passes.quantize.gptq import (
        ROW_CHUNK,
        SCALE_CODE_MAX,
        SCALE_HEADROOM,
        round_scales,
        row_scale_step,
    )

    w = np.random.default_rng(4).standard_normal((2 * ROW_CHUNK + 7, 40)).astype(np.float32)
    want = round_scales(np.abs(w).max(axis=1) * np.float32(SCALE_HEADROOM / (7.0 * SCALE_CODE_MAX)))
    np.testing.assert_array_equal(row_scale_step(w), want)
    assert row_scale_step(np.zeros((3, 0), np.float32)).shape == (3,)


def test_prepare_hessian_frees_its_copy_and_keeps_the_factor() -> None:
    from onnxcompress.passes.quantize.gptq import _inverse_cholesky_upper, prepare_hessian

    x = _correlated(200, 40, 5)
    hm = (x.T @ x).astype(np.float32)
    hm[7, :] = hm[:, 7] = 0.0  # a dead column
    prep = prepare_hessian(hm, 16, 0.1)
    kp = 48
    hp = np.zeros((kp, kp), np.float64)
    hp[:40, :40] = hm
    dead = np.diagonal(hp) <= 0
    hp[dead, dead] = 1.0
    hp[np.diag_indices(kp)] += 0.1 * float(np.mean(np.diagonal(hp)))
    np.testing.assert_array_equal(prep.u, _inverse_cholesky_upper(hp))
    holder = [hp.copy()]
    np.testing.assert_array_equal(_inverse_cholesky_upper(holder), prep.u)
    assert holder == []  # released once factored
    assert np.array_equal(prep.dead, dead)
    assert np.allclose(prep.u.T.astype(np.float64) @ prep.u, np.linalg.inv(hp), rtol=1e-3, atol=1e-6)


def test_collect_hessians_masks_weights_and_packs(tmp_path: Path) -> None:
    from onnxcompress.passes.quantize.int4 import collect_hessians, summed_hessian

    k, n = 16, 8
    w = np.random.default_rng(6).standard_normal((k, n)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "tok",
        [
            h.make_tensor_value_info("x", T.FLOAT, ["B", "T", k]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["B", "T"]),
        ],
        [h.make_tensor_value_info("y", T.FLOAT, ["B", "T", n])],
        [nh.from_array(w, "W")],
    )
    model = oc.load(save(_model(g), tmp_path / "tok.onnx"))
    x = np.random.default_rng(7).standard_normal((3, 6, k)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], np.int64)
    feeds = [{"x": x, "attention_mask": mask}]
    key = ("x", False)
    plain = collect_hessians(model, [key], feeds, 8, mask_padding=True, sample_weighting=False)[key]
    keep = x[mask > 0]
    np.testing.assert_array_equal(plain.matrix(), keep.T @ keep)  # bit for bit: one slice, one product
    weighted = collect_hessians(model, [key], feeds, 8)[key].matrix()
    want = sum(6 / mask[b].sum() * x[b, mask[b] > 0].T.astype(np.float64) @ x[b, mask[b] > 0] for b in range(3))
    np.testing.assert_allclose(weighted, want, rtol=1e-5, atol=1e-4)
    sliced = collect_hessians(model, [key], feeds, 2, mask_padding=False, sample_weighting=False)[key]
    full = x.reshape(-1, k).astype(np.float64)
    np.testing.assert_allclose(sliced.matrix(), full.T @ full, rtol=1e-5, atol=1e-4)
    hs = {key: plain}
    wide = summed_hessian(hs, [key], k)
    assert isinstance(wide, np.ndarray) and wide.dtype == np.float64
    narrow = summed_hessian(hs, [key], k, wide=False)
    assert isinstance(narrow, np.ndarray) and narrow.dtype == np.float32
    np.testing.assert_array_equal(narrow.astype(np.float64), wide)
    assert summed_hessian(hs, [key], k + 1) == "activation width does not match K"
    twice = summed_hessian(hs, [key, key], k)
    np.testing.assert_array_equal(twice, wide * 2)


def test_hessian_groups_count_packed_bytes() -> None:
    import onnx_graphsurgeon as gs

    from onnxcompress.passes.quantize.int4 import HESSIAN_BYTES, _groups, _Use, _Weight

    def weight(name: str, k: int) -> _Weight:
        t = gs.Constant(name, np.zeros((k, 4), np.float32))
        return _Weight(t, [_Use(gs.Node("MatMul"), gs.Graph(), 0, None)])

    k = 1024  # packed 2 k (k + 1) bytes: ~2.1 MB each (a full float32 matrix: 4.2 MB)
    plans = [(weight(f"w{i}", k), [(f"a{i}", False)]) for i in range(4)]
    sizes = [len(g) for g in _groups(plans, 3 * 2 * k * (k + 1))]
    assert sizes == [3, 1]
    assert HESSIAN_BYTES >= 2 * 1536 * 1537  # the widest MiniLM Hessian fits on its own
