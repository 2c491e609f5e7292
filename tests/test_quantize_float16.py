"""fp16/bf16: storage and compute modes, Cast placement, block list, subgraphs, overflow, old opsets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from _models import conv_model, if_model, matmul_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.cli import main
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext, PassReport
from onnxcompress.passes.quantize.float16 import DEFAULT_BLOCK_OPS, FloatPass, float_config

MODELS = Path(__file__).resolve().parent.parent / "models"
MINILM = MODELS / "cache" / "minilm" / "minilm.onnx"
RNG = np.random.default_rng(0)


def _convert(
    proto: onnx.ModelProto, tmp: Path, dtype: str = "float16", exclude: tuple[str, ...] = (), **params: str
) -> tuple[Path, onnx.ModelProto, PassReport]:
    src = save(proto, tmp / "src.onnx")
    model = oc.load(src)
    report = FloatPass(float_config(Params(params), dtype)).run(model, PassContext(exclude=exclude))
    out = oc.save(model, tmp / f"out_{dtype}.onnx", force=True)
    onnx.checker.check_model(str(out), full_check=True)
    return out, onnx.load(str(out)), report


def _ops(m: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in m.graph.node)


def _inits(m: onnx.ModelProto) -> dict[str, int]:
    return {i.name: i.data_type for i in m.graph.initializer}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _no_cancelling_casts(m: onnx.ModelProto) -> None:
    """No Cast reads the output of a Cast that it undoes, and no tensor is cast twice to one type."""
    producer = {o: n for n in m.graph.node for o in n.output}
    seen = set()
    for n in m.graph.node:
        if n.op_type != "Cast":
            continue
        key = (n.input[0], n.attribute[0].i)
        assert key not in seen, f"{n.input[0]} cast twice"
        seen.add(key)
        p = producer.get(n.input[0])
        assert p is None or p.op_type != "Cast", f"Cast {n.name} undoes {p.name}"


MM_FEED = {"x": RNG.standard_normal((2, 4, 64)).astype(np.float32)}


def test_storage_mode_default_halves_weights_and_keeps_float32_compute(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "m.onnx")
    out, m, report = _convert(matmul_model(), tmp_path)
    inits = _inits(m)
    assert inits["W_float16"] == T.FLOAT16 and inits["W2_float16"] == T.FLOAT16 and inits["b_float16"] == T.FLOAT16
    ops = _ops(m)
    assert ops["Cast"] == 3 and ops["MatMul"] == 2  # one Cast back to float32 per weight, folded at load
    assert report.stats["compute"] == "float32" and report.stats["constants_converted"] == 3
    assert report.tensor_map == {"W_float16_float32": "W", "W2_float16_float32": "W2", "b_float16_float32": "b"}
    assert report.stats["bytes_after"] * 2 == pytest.approx(report.stats["bytes_before"], rel=0.01)
    assert report.stats["nonstandard_ops"] == []
    ref, got = run(src, MM_FEED)[0], run(out, MM_FEED)[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    assert _cosine(ref, got) > 0.99999


def test_compute_mode_converts_nodes_and_constants_directly(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "m.onnx")
    out, m, report = _convert(matmul_model(), tmp_path, compute="float16")
    inits = _inits(m)
    assert inits == {"W": T.FLOAT16, "b": T.FLOAT16, "W2": T.FLOAT16}  # converted in place, names kept
    ops = _ops(m)
    assert ops["Cast"] == 2  # one at the input, one at the output: keep_io_types
    assert report.stats["ops_converted"] == {"Add": 1, "MatMul": 2, "Relu": 1}
    assert m.graph.input[0].type.tensor_type.elem_type == T.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == T.FLOAT and m.graph.output[0].name == "y"
    _no_cancelling_casts(m)
    ref, got = run(src, MM_FEED)[0], run(out, MM_FEED)[0]
    assert got.dtype == np.float32 and _cosine(ref, got) > 0.9999


def test_keep_io_types_false(tmp_path: Path) -> None:
    out, m, _ = _convert(matmul_model(), tmp_path, compute="float16", keep_io_types="false")
    assert m.graph.input[0].type.tensor_type.elem_type == T.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == T.FLOAT16
    assert _ops(m)["Cast"] == 0
    got = run(out, {"x": MM_FEED["x"].astype(np.float16)})[0]
    assert got.dtype == np.float16


@pytest.mark.parametrize("compute", ["float32", "float16"])
def test_conv_model(tmp_path: Path, compute: str) -> None:
    src = save(conv_model(), tmp_path / "c.onnx")
    out, m, _ = _convert(conv_model(), tmp_path, compute=compute)
    for init in m.graph.initializer:  # storage mode leaves constants under min_elements (16) float32
        big = int(np.prod(init.dims)) >= 16 or compute == "float16"
        assert init.data_type == (T.FLOAT16 if big else T.FLOAT), init.name
    x = RNG.standard_normal((3, 3, 6, 6)).astype(np.float32)
    ref, got = run(src, {"x": x})[0], run(out, {"x": x})[0]
    for r, g in zip(ref, got):
        assert _cosine(r, g) > 0.9999


def _norm_model() -> onnx.ModelProto:
    """x -> LayerNorm -> MatMul -> Softmax -> ReduceMean(keepdims) and -> Add; two readers of one blocked output."""
    rng = np.random.default_rng(1)
    d = 16
    nodes = [
        h.make_node("LayerNormalization", ["x", "g", "bt"], ["ln"], name="ln", axis=-1),
        h.make_node("MatMul", ["ln", "W"], ["mm"], name="mm"),
        h.make_node("Softmax", ["mm"], ["sm"], name="softmax", axis=-1),
        h.make_node("ReduceMean", ["sm"], ["rm"], name="rmean", axes=[-1], keepdims=1),
        h.make_node("Add", ["rm", "sm"], ["a1"], name="add1"),
        h.make_node("Mul", ["rm", "sm"], ["y"], name="mul1"),
        h.make_node("Sub", ["a1", "y"], ["z"], name="sub1"),
    ]
    g = h.make_graph(
        nodes,
        "norm",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", d])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", d]), h.make_tensor_value_info("z", T.FLOAT, ["N", d])],
        [
            nh.from_array(rng.uniform(0.5, 1.5, d).astype(np.float32), "g"),
            nh.from_array(rng.standard_normal(d).astype(np.float32), "bt"),
            nh.from_array(rng.standard_normal((d, d)).astype(np.float32), "W"),
        ],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_block_list_layernorm_softmax_and_shared_casts(tmp_path: Path) -> None:
    src = save(_norm_model(), tmp_path / "n.onnx")
    out, m, report = _convert(_norm_model(), tmp_path, compute="float16")
    assert "ReduceMean" in DEFAULT_BLOCK_OPS
    assert report.stats["ops_converted"] == {
        "Add": 1,
        "LayerNormalization": 1,
        "MatMul": 1,
        "Mul": 1,
        "Softmax": 1,
        "Sub": 1,
    }
    assert ("rmean", "ReduceMean is numerically sensitive (block_ops): kept float32") in report.skipped
    # casts: x in; sm up for ReduceMean; rm down once for both Add and Mul; y and z out
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert sorted(n.input[0] for n in casts) == sorted(["x", "sm", "rm", "y_float16", "z_float16"])
    _no_cancelling_casts(m)
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    for r, g in zip(run(src, {"x": x}), run(out, {"x": x})):
        np.testing.assert_allclose(g, r, atol=5e-3, rtol=5e-3)
    # override: block Softmax, nothing else
    _, m2, report2 = _convert(_norm_model(), tmp_path, compute="float16", block_ops="Softmax")
    assert "Softmax" not in report2.stats["ops_converted"] and "ReduceMean" in report2.stats["ops_converted"]
    # excluded by name keeps the node float32
    _, _, report3 = _convert(_norm_model(), tmp_path, exclude=("mm",), compute="float16")
    assert "MatMul" not in report3.stats["ops_converted"] and ("mm", "excluded by configuration") in report3.skipped


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("compute", ["float32", "float16"])
def test_if_subgraph_bodies_are_converted(tmp_path: Path, shared: bool, compute: str) -> None:
    src = save(if_model(shared=shared), tmp_path / "if.onnx")
    out, m, report = _convert(if_model(shared=shared), tmp_path, compute=compute)
    if_node = next(n for n in m.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in if_node.attribute}
    all_inits = dict(_inits(m))
    for g in branches.values():
        all_inits.update(_inits(onnx.ModelProto(graph=g)))
        assert g.output[0].type.tensor_type.elem_type == T.FLOAT  # subgraph outputs keep float32
    assert all(dt == T.FLOAT16 for dt in all_inits.values()), all_inits
    if compute == "float16":
        assert report.stats["ops_converted"]["MatMul"] == 2
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        assert _cosine(run(src, feed)[0], run(out, feed)[0]) > 0.9999


def _loop_model() -> onnx.ModelProto:
    """Loop 3 times: acc = acc @ W (W outer) + c (Constant node inside the body)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
    body = h.make_graph(
        [
            h.make_node("Constant", [], ["c"], name="body_c", value=nh.from_array(np.full((8,), 0.5, np.float32))),
            h.make_node("MatMul", ["acc_in", "W"], ["mm"], name="body_mm"),
            h.make_node("Add", ["mm", "c"], ["acc_out"], name="body_add"),
            h.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id"),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("acc_in", T.FLOAT, ["N", 8]),
        ],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, ["N", 8])],
    )
    g = h.make_graph(
        [h.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)],
        "loopm",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
        [nh.from_array(np.array(3, np.int64), "n"), nh.from_array(w, "W")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_loop_body_and_constant_node(tmp_path: Path) -> None:
    src = save(_loop_model(), tmp_path / "loop.onnx")
    out, m, report = _convert(_loop_model(), tmp_path, compute="float16", min_elements="1")
    body = next(n for n in m.graph.node if n.op_type == "Loop").attribute[0].g
    const = next(n for n in body.node if n.op_type == "Constant")
    assert const.attribute[0].t.data_type == T.FLOAT16  # converted in place, no Cast
    assert report.stats["ops_converted"] == {"Add": 1, "MatMul": 1}
    assert ("loop", "Loop has subgraphs: its inputs/outputs stay float32, its bodies convert") in report.skipped
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    assert _cosine(run(src, {"x": x})[0], run(out, {"x": x})[0]) > 0.9999


def _overflow_model(opset: int = 17) -> onnx.ModelProto:
    """y = MatMul(x, W) * big + mask, big = 1e5 (overflows float16), mask = -3.4e38."""
    rng = np.random.default_rng(1)
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        h.make_node("Mul", ["mm", "big"], ["scaled"], name="mul_big"),
        h.make_node("Add", ["scaled", "eps"], ["y"], name="add_eps"),
    ]
    g = h.make_graph(
        nodes,
        "ovf",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 32])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 32])],
        [
            nh.from_array((rng.standard_normal((32, 32)) * 0.1).astype(np.float32), "W"),
            nh.from_array(np.full((32,), 1e5, np.float32), "big"),
            nh.from_array(np.array(1e-9, np.float32), "eps"),
        ],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def test_overflowing_and_underflowing_constants(tmp_path: Path) -> None:
    src = save(_overflow_model(), tmp_path / "o.onnx")
    x = RNG.standard_normal((4, 32)).astype(np.float32)
    ref = run(src, {"x": x})[0]
    for compute in ("float32", "float16"):
        out, m, report = _convert(_overflow_model(), tmp_path, compute=compute)
        assert _inits(m)["big"] == T.FLOAT and not any(np.isinf(nh.to_array(i)).any() for i in m.graph.initializer)
        reasons = dict(report.skipped)
        assert "overflow float16" in reasons["big"]
        got = run(out, {"x": x})[0]
        assert np.isfinite(got).all() and _cosine(ref, got) > 0.9999
    assert (
        "underflow" in reasons["eps"] and "does not fit" in reasons["mul_big"] and "does not fit" in reasons["add_eps"]
    )
    _, m, report = _convert(_overflow_model(), tmp_path, compute="float16", overflow="clamp")
    big = next(nh.to_array(i) for i in m.graph.initializer if i.name == "big")
    assert big.dtype == np.float16 and float(big.max()) == 65504.0
    assert report.stats["constants_clamped"] == 1


def test_index_arithmetic_stays_float32(tmp_path: Path) -> None:
    """Shape -> Cast(float) -> Mul(1.5) -> Floor -> Cast(int64) -> Reshape target: kept float32."""
    nodes = [
        h.make_node("Shape", ["x"], ["s"], name="shape"),
        h.make_node("Cast", ["s"], ["sf"], name="to_float", to=T.FLOAT),
        h.make_node("Mul", ["sf", "k"], ["sk"], name="scale"),
        h.make_node("Floor", ["sk"], ["fl"], name="floor"),
        h.make_node("Cast", ["fl"], ["si"], name="to_int", to=T.INT64),
        h.make_node("ConstantOfShape", ["si"], ["y"], name="cos", value=nh.from_array(np.array([1.0], np.float32))),
    ]
    g = h.make_graph(
        nodes,
        "idx",
        [h.make_tensor_value_info("x", T.FLOAT, [4099])],
        [h.make_tensor_value_info("y", T.FLOAT, ["M"])],
        [nh.from_array(np.array([1.5], np.float32), "k")],
    )
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    out, m, report = _convert(proto, tmp_path, compute="float16")
    assert report.stats["nodes_converted"] == 0
    assert run(out, {"x": np.zeros(4099, np.float32)})[0].shape == (6148,)  # float16: 4099 -> 4100, * 1.5 -> 6152


def test_old_opset_and_bf16(tmp_path: Path) -> None:
    x = RNG.standard_normal((4, 32)).astype(np.float32)
    src = save(_overflow_model(11), tmp_path / "o11.onnx")
    ref = run(src, {"x": x})[0]
    for compute in ("float32", "float16"):
        out, _, report = _convert(_overflow_model(11), tmp_path, compute=compute)
        assert report.modified and _cosine(ref, run(out, {"x": x})[0]) > 0.9999
    # bfloat16 needs Cast-13: at opset 11 nothing changes, with the reason
    _, m, report = _convert(_overflow_model(11), tmp_path, "bfloat16")
    assert not report.modified and "bfloat16 needs opset 13" in report.skipped[0][1]
    # opset 17: storage runs in onnxruntime CPU; compute writes a valid bfloat16 model
    src17 = save(matmul_model(), tmp_path / "m17.onnx")
    out, m, report = _convert(matmul_model(), tmp_path, "bfloat16")
    assert report.name == "bf16" and _inits(m)["W_bfloat16"] == T.BFLOAT16
    assert _cosine(run(src17, MM_FEED)[0], run(out, MM_FEED)[0]) > 0.999
    _, m, report = _convert(matmul_model(), tmp_path, "bfloat16", compute="bfloat16")
    assert _inits(m) == {"W": T.BFLOAT16, "b": T.BFLOAT16, "W2": T.BFLOAT16}
    w = nh.to_array(next(i for i in m.graph.initializer if i.name == "W"))
    ref_w = nh.to_array(matmul_model().graph.initializer[0])
    assert np.all(np.abs(w.astype(np.float32) - ref_w) <= np.abs(ref_w) * 2.0**-8)
    assert w.dtype == ml_dtypes.bfloat16


def test_params_and_idempotence(tmp_path: Path) -> None:
    with pytest.raises(OnnxCompressError, match="compute"):
        float_config(Params({"compute": "bfloat16"}), "float16")
    with pytest.raises(OnnxCompressError, match="overflow"):
        float_config(Params({"overflow": "wrap"}), "float16")
    assert float_config(Params({"block_ops": ""}), "float16").block_ops == ()
    out, _, _ = _convert(matmul_model(), tmp_path)
    model = oc.load(out)
    again = FloatPass(float_config(Params(), "float16")).run(model, PassContext())
    assert not again.modified
    with pytest.raises(OnnxCompressError, match="already quantized"):
        q = tmp_path / "q.onnx"
        oc.compress(save(matmul_model(), tmp_path / "mm.onnx"), q, ["int8-weights-qdq"], validate=False)
        FloatPass().run(oc.load(q), PassContext())


@pytest.mark.parametrize("name", ["digits_cnn", "digits_keras", "tiny_transformer"])
@pytest.mark.parametrize("technique", ["fp16", "bf16"])
def test_bundled_models(tmp_path: Path, name: str, technique: str) -> None:
    out = tmp_path / f"{name}.{technique}.onnx"
    report = oc.compress(MODELS / f"{name}.onnx", out, [technique])  # default tolerances, labels
    assert report.validation is not None and report.validation.passed
    assert report.validation.accuracy is not None and report.validation.accuracy["drop"] <= 0.0
    assert 0.45 <= report.size_ratio <= 0.55


@pytest.mark.parametrize("name", ["digits_cnn", "tiny_transformer"])
def test_bundled_models_compute_via_cli(tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.fp16c.onnx"
    code = main(["compress", str(MODELS / f"{name}.onnx"), "-o", str(out), "-q", "fp16", "--param", "compute=float16"])
    assert code == 0
    m = onnx.load(str(out))
    assert sum(i.data_type == T.FLOAT16 for i in m.graph.initializer) >= 4


@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM is not in the checkout (models/cache is gitignored)")
def test_minilm_acceptance(tmp_path: Path) -> None:
    out = tmp_path / "minilm.fp16.onnx"
    report = oc.compress(MINILM, out, ["fp16"], tolerances=["cosine>=0.9999"])  # sidecar inputs: 53 sentences
    assert report.size_ratio <= 0.51
    assert report.validation is not None and report.validation.passed
