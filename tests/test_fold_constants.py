"""Constant/shape folding, deduplication, CSE and dead code: structure, exact numerics, the size guard."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, assert_equivalent, conv_model, matmul_model, run, save, shape_chain_model
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.fold.constants import FoldConstantsPass
from onnxcompress.passes.fold.dedup import CommonSubexpressionPass, DedupConstantsPass
from onnxcompress.recipes import PASSES

MODELS = Path(__file__).resolve().parent.parent / "models"


def _fold(src: Path, out: Path, technique: str = "fold") -> tuple[Path, oc.PassReport]:
    model = oc.load(src)
    report = PASSES[technique](Params()).run(model, PassContext())
    oc.save(model, out, force=True)
    onnx.checker.check_model(str(out), full_check=True)
    return out, report


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_shape_chain_and_constant_subgraph_fold_bomb_stays(tmp_path: Path) -> None:
    src = save(shape_chain_model(), tmp_path / "m.onnx")
    out, report = _fold(src, tmp_path / "f.onnx")
    assert _ops(out) == Counter({"ConstantOfShape": 1, "ReduceSum": 1, "Reshape": 1, "MatMul": 1, "Add": 1})
    assert ("bomb", "size guard: output 4000000 bytes > bytes it frees") in report.skipped
    assert out.stat().st_size < 1.1 * src.stat().st_size
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((n, 4, 8)).astype(np.float32)} for i, n in enumerate((1, 3))
    ]
    assert_equivalent(src, out, feeds, atol=1e-6)
    m = onnx.load(str(out))
    assert [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input] == [
        ("x", ["N", 4, 8])
    ]


def test_fold_is_idempotent(tmp_path: Path) -> None:
    src = save(shape_chain_model(), tmp_path / "m.onnx")
    once, _ = _fold(src, tmp_path / "f1.onnx")
    twice, report = _fold(once, tmp_path / "f2.onnx")
    assert not report.modified
    assert once.read_bytes() == twice.read_bytes()


def test_dynamic_shape_stays_dynamic(tmp_path: Path) -> None:
    # Reshape(x, Shape(x)) on a dynamic x: nothing may be folded.
    g = h.make_graph(
        [h.make_node("Shape", ["x"], ["s"]), h.make_node("Reshape", ["x", "s"], ["y"])],
        "dyn",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", "M"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", "M"])],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    out, report = _fold(src, tmp_path / "f.onnx", "fold")
    assert _ops(out) == Counter({"Shape": 1, "Reshape": 1})


def test_shared_weight_transpose_is_not_duplicated(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    g = h.make_graph(
        [
            h.make_node("MatMul", ["x", "W"], ["a"]),
            h.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
            h.make_node("MatMul", ["x", "Wt"], ["b"]),
            h.make_node("Add", ["a", "b"], ["y"]),
        ],
        "shared",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 64])],
        [nh.from_array(w, "W")],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    out, report = _fold(src, tmp_path / "f.onnx")
    assert _ops(out)["Transpose"] == 1
    assert out.stat().st_size <= src.stat().st_size * 1.1
    assert any("size guard" in reason for _, reason in report.skipped)


@pytest.mark.parametrize("technique", ["int8-weights", "int8-weights-qdq"])
def test_fold_after_quantization_keeps_the_weights_int8(tmp_path: Path, technique: str) -> None:
    src = save(conv_model(), tmp_path / "c.onnx")
    model = oc.load(src)
    PASSES[technique](Params()).run(model, PassContext())
    q = oc.save(model, tmp_path / "q.onnx")
    out, report = _fold(q, tmp_path / "qf.onnx")
    assert out.stat().st_size <= q.stat().st_size * 1.01
    assert _ops(out)["Cast"] + _ops(out)["DequantizeLinear"] >= 3
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert_equivalent(q, out, [{"x": x}], atol=1e-6)


def test_constants_fold_inside_if_branches(tmp_path: Path) -> None:
    then_g = h.make_graph(
        [
            h.make_node("Constant", [], ["k"], value=nh.from_array(np.array([2.0], np.float32))),
            h.make_node("Mul", ["k", "three"], ["k3"]),  # constant inside the branch, outer constant "three"
            h.make_node("Mul", ["x", "k3"], ["t_out"]),
        ],
        "then",
        [],
        [h.make_tensor_value_info("t_out", T.FLOAT, None)],
    )
    else_g = h.make_graph(
        [h.make_node("Neg", ["x"], ["e_out"])], "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)]
    )
    g = h.make_graph(
        [h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "ifc",
        [h.make_tensor_value_info("c", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [4])],
        [h.make_tensor_value_info("y", T.FLOAT, [4])],
        [nh.from_array(np.array([3.0], np.float32), "three")],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    out, report = _fold(src, tmp_path / "f.onnx")
    branches = {a.name: a.g for a in onnx.load(str(out)).graph.node[0].attribute}
    then_nodes = [n.op_type for n in branches["then_branch"].node]
    assert then_nodes == ["Mul"]
    x = np.arange(4, dtype=np.float32)
    assert_equivalent(src, out, [{"c": np.array(True), "x": x}, {"c": np.array(False), "x": x}])


def test_constant_graph_output(tmp_path: Path) -> None:
    g = h.make_graph(
        [h.make_node("Shape", ["x"], ["s"]), h.make_node("Relu", ["x"], ["r"])],
        "shape_out",
        [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
        [h.make_tensor_value_info("s", T.INT64, [2]), h.make_tensor_value_info("r", T.FLOAT, [2, 3])],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    out, _ = _fold(src, tmp_path / "f.onnx")
    m = onnx.load(str(out))
    assert [o.name for o in m.graph.output] == ["s", "r"]
    assert [i.name for i in m.graph.initializer] == ["s"]
    assert_equivalent(src, out, [{"x": np.ones((2, 3), np.float32)}])


def test_dedup_and_cse(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    g = h.make_graph(
        [
            h.make_node("MatMul", ["x", "W1"], ["a"]),
            h.make_node("MatMul", ["x", "W2"], ["b"]),  # W2 is a byte-identical copy of W1
            h.make_node("Relu", ["a"], ["ra"]),
            h.make_node("Relu", ["a"], ["ra2"]),  # the same node twice
            h.make_node("Add", ["ra", "ra2"], ["s"]),
            h.make_node("Add", ["s", "b"], ["y"]),
        ],
        "dup",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
        [nh.from_array(w, "W1"), nh.from_array(w.copy(), "W2")],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    model = oc.load(src)
    r1 = DedupConstantsPass().run(model, PassContext())
    r2 = CommonSubexpressionPass().run(model, PassContext())
    r3 = CommonSubexpressionPass().run(model, PassContext())  # the MatMuls now match too
    out = oc.save(model, tmp_path / "f.onnx")
    assert r1.stats["merged"] == 1 and r2.modified and not r3.modified or r3.modified
    m = onnx.load(str(out))
    assert len(m.graph.initializer) == 1
    assert Counter(n.op_type for n in m.graph.node) == Counter({"MatMul": 1, "Relu": 1, "Add": 2})
    assert_equivalent(src, out, [{"x": np.ones((2, 16), np.float32)}], atol=1e-6)


def test_dedup_confirms_bytes_on_a_hash_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor hashes alike here: only the byte-identical pair may be merged."""
    from onnxcompress.passes.fold import dedup

    monkeypatch.setattr(dedup.zlib, "crc32", lambda raw: 7)
    rng = np.random.default_rng(1)
    w, v = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    g = h.make_graph(
        [h.make_node("MatMul", ["x", n], [n + "_y"]) for n in ("W1", "W2", "V")]
        + [h.make_node("Sum", ["W1_y", "W2_y", "V_y"], ["y"])],
        "dup",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
        [nh.from_array(w, "W1"), nh.from_array(v, "V"), nh.from_array(w.copy(), "W2")],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    model = oc.load(src)
    report = DedupConstantsPass().run(model, PassContext())
    out = oc.save(model, tmp_path / "f.onnx")
    assert report.stats["merged"] == 1
    assert sorted(i.name for i in onnx.load(str(out)).graph.initializer) == ["V", "W1"]
    assert_equivalent(src, out, [{"x": np.ones((2, 16), np.float32)}], atol=1e-6)


def test_fold_constant_nodes_become_initializers(tmp_path: Path) -> None:
    src = save(conv_model(opset=11, constant_nodes=True), tmp_path / "c.onnx")
    model = oc.load(src)
    report = FoldConstantsPass().run(model, PassContext())
    out = oc.save(model, tmp_path / "f.onnx")
    assert report.stats["folded"]["Constant"] == 5
    assert "Constant" not in _ops(out)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert_equivalent(src, out, [{"x": x}])


@pytest.mark.parametrize("name", ["digits_cnn", "digits_keras", "tiny_transformer"])
def test_fold_bundled_models_exact(name: str, tmp_path: Path) -> None:
    report = oc.compress(MODELS / f"{name}.onnx", tmp_path / "f.onnx", ["fold"], tolerances=["max_abs<=1e-5"])
    assert report.validation is not None and report.validation.passed
    assert report.passes[0].stats["nodes_after"] <= report.passes[0].stats["nodes_before"]
    assert report.size_ratio <= 1.001


def test_fold_matmul_model_unchanged(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "m.onnx")
    _, report = _fold(src, tmp_path / "f.onnx")
    assert not report.modified


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_constant_condition_is_inlined(tmp_path: Path, cond: bool) -> None:
    then_g = h.make_graph(
        [h.make_node("Mul", ["x", "two"], ["t1"], name="t_mul"), h.make_node("Relu", ["t1"], ["t_out"], name="t_relu")],
        "then",
        [],
        [h.make_tensor_value_info("t_out", T.FLOAT, None)],
        [nh.from_array(np.array(2.0, np.float32), "two")],
    )
    else_g = h.make_graph(
        [h.make_node("Identity", ["x"], ["e_out"], name="e_id")],
        "else",
        [],
        [h.make_tensor_value_info("e_out", T.FLOAT, None)],
    )
    g = h.make_graph(
        [
            h.make_node("Not", ["flag"], ["c"], name="not"),
            h.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
            h.make_node("Neg", ["y"], ["z"], name="neg"),
        ],
        "ifconst",
        [h.make_tensor_value_info("x", T.FLOAT, [4])],
        [h.make_tensor_value_info("y", T.FLOAT, [4]), h.make_tensor_value_info("z", T.FLOAT, [4])],
        [nh.from_array(np.array(not cond), "flag")],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    out, report = _fold(src, tmp_path / "f.onnx")
    ops = _ops(out)
    assert "If" not in ops
    assert ops == (Counter({"Mul": 1, "Relu": 1, "Neg": 1}) if cond else Counter({"Identity": 1, "Neg": 1}))
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["y", "z"]
    assert_equivalent(src, out, [{"x": np.array([-1.0, 0.0, 1.5, 3.0], np.float32)}])


def test_folded_scalars_stay_scalars(tmp_path: Path) -> None:
    g = h.make_graph(
        [
            h.make_node("Shape", ["x"], ["s"]),
            h.make_node("Gather", ["s", "i"], ["d"], axis=0),  # a scalar: 8
            h.make_node("Unsqueeze", ["d", "ax"], ["u"]),
            h.make_node("Concat", ["m1", "u"], ["shape"], axis=0),
            h.make_node("Reshape", ["x", "shape"], ["r"]),
            h.make_node("ReduceSum", ["c44"], ["total"], keepdims=0),  # evaluated in onnxruntime: a scalar
            h.make_node("Mul", ["r", "total"], ["y"]),
        ],
        "scalars",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
        [
            nh.from_array(np.array(1, np.int64), "i"),
            nh.from_array(np.array([0], np.int64), "ax"),
            nh.from_array(np.array([-1], np.int64), "m1"),
            nh.from_array(np.ones((4, 4), np.float32), "c44"),
        ],
    )
    src = save(_model(g, opset=13), tmp_path / "m.onnx")
    out, _ = _fold(src, tmp_path / "f.onnx")
    m = onnx.load(str(out))
    total = next(i for i in m.graph.initializer if i.name == "total")
    assert list(total.dims) == []
    assert_equivalent(src, out, [{"x": np.ones((3, 8), np.float32)}])


LIGHT = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("light_*.onnx"))


@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_light_models_never_grow(tmp_path: Path, path: Path) -> None:
    """onnx's light_* models make their weights with ConstantOfShape: the size guard keeps them small."""
    out, report = _fold(path, tmp_path / "f.onnx")
    assert out.stat().st_size <= 1.1 * path.stat().st_size
    assert report.stats["nodes_after"] <= report.stats["nodes_before"]


def test_size_guard_can_be_lifted_when_asked(tmp_path: Path) -> None:
    src = save(shape_chain_model(), tmp_path / "m.onnx")
    model = oc.load(src)
    PASSES["fold"](Params({"fold_max_growth": "inf"})).run(model, PassContext())
    out = tmp_path / "f.onnx"
    oc.save(model, out, force=True)
    # the 4 MB ConstantOfShape is materialised (as onnxsim would) and its ReduceSum folded with it
    assert _ops(out)["ConstantOfShape"] == 0 and _ops(out)["ReduceSum"] == 0
    x = {"x": np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)[0], run(src, x)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(oc.OnnxCompressError, match="fold_max_growth"):
        PASSES["fold"](Params({"fold_max_growth": "lots"}))
