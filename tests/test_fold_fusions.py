"""Fusions: BatchNorm/affine folding, MatMul+Add -> Gemm, Transpose and Reshape chains.

Each case checks the structure (op counts), ``onnx.checker`` on the saved model, numerics against the
original in onnxruntime (re-associated float arithmetic: ``rtol=1e-5``, ``atol=1e-5 * max|ref|``),
unchanged graph inputs/outputs, and idempotence (a second run reports ``modified=False``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from _models import _model, conv_bn_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.fold.fusions import (
    FuseBatchNormConfig,
    FuseBatchNormPass,
    FuseConstantAffinePass,
    FuseMatMulAddPass,
    FuseReshapesPass,
    FuseTransposesConfig,
    FuseTransposesPass,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
ALL_PASSES = [FuseBatchNormPass, FuseConstantAffinePass, FuseMatMulAddPass, FuseTransposesPass, FuseReshapesPass]


def _apply(p: Any, src: Path, out: Path) -> tuple[Path, oc.PassReport]:
    model = oc.load(src)
    report = p.run(model, PassContext())
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out, report


def _rerun(p: Any, path: Path) -> oc.PassReport:
    return p.run(oc.load(path), PassContext())


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _signature(path: Path) -> list[tuple[str, int, list[Any]]]:
    g = onnx.load(str(path)).graph
    return [
        (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in list(g.input) + list(g.output)
    ]


def _assert_close(src: Path, out: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    for feed in feeds:
        for a, b in zip(run(src, feed), run(out, feed)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def _fused(p: Any, src: Path, tmp: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[Path, oc.PassReport]:
    """Run ``p`` on ``src``, check validity, numerics, I/O and idempotence; return the output and report."""
    out, report = _apply(p, src, tmp / f"{src.stem}.{p.name}.onnx")
    _assert_close(src, out, feeds)
    assert _signature(out) == _signature(src)
    again = _rerun(p, out)
    assert not again.modified, again.stats
    return out, report


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CONV_FEEDS = [{"x": _x(2, 4, 6, 6)}, {"x": _x(1, 4, 6, 6, seed=1)}]


# ------------------------------------------------------------------------------ BatchNorm


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_batchnorm_is_folded(tmp_path: Path, op: str, group: int, bias: bool) -> None:
    src = save(conv_bn_model(op, group=group, bias=bias), tmp_path / "m.onnx")
    out, report = _fused(FuseBatchNormPass(), src, tmp_path, CONV_FEEDS)
    assert _ops(out) == Counter({op: 1, "Relu": 1})
    assert report.stats["fused"] == {f"{op}+BatchNormalization": 1}
    assert report.stats["nodes_after"] == report.stats["nodes_before"] - 1
    assert report.stats["bytes_after"] < report.stats["bytes_before"]  # the four statistics are gone
    conv = next(n for n in onnx.load(str(out)).graph.node if n.op_type == op)
    assert len(conv.input) == 3 and conv.output[0] == "bn"  # a bias is added; the BN output name stays


def test_constant_nodes_and_old_opset(tmp_path: Path) -> None:
    src = save(conv_bn_model(opset=11, constant_nodes=True), tmp_path / "m.onnx")
    out, _ = _fused(FuseBatchNormPass(), src, tmp_path, CONV_FEEDS)
    assert _ops(out) == Counter({"Conv": 1, "Relu": 1})


def test_batchnorm_negative_cases_are_reported(tmp_path: Path) -> None:
    for kwargs, reason in [
        ({"extra_reader": True}, "Conv output is also read by other nodes or is a graph output"),
        ({"dynamic_mean": True}, "scale/bias/mean/var are computed at run time"),
    ]:
        src = save(conv_bn_model(**kwargs), tmp_path / "m.onnx")  # type: ignore[arg-type]
        out, report = _apply(FuseBatchNormPass(), src, tmp_path / f"o{len(kwargs)}{reason[:3]}.onnx")
        assert not report.modified
        assert _ops(out)["BatchNormalization"] == 1
        assert report.skipped == [("bn", reason)]


def _bn_graph(
    nodes: list[onnx.NodeProto], inputs: list[Any], inits: list[Any], channels: int, out_shape: list[Any]
) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    stats = [
        nh.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "gamma"),
        nh.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
        nh.from_array(rng.standard_normal(channels).astype(np.float32), "mean"),
        nh.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), "var"),
    ]
    nodes = nodes + [h.make_node("BatchNormalization", ["pre", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    return _model(h.make_graph(nodes, "bn", inputs, [h.make_tensor_value_info("y", T.FLOAT, out_shape)], inits + stats))


def test_batchnorm_on_graph_input_is_reported(tmp_path: Path) -> None:
    m = _bn_graph(
        [h.make_node("Relu", ["x"], ["pre"], name="relu")],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3])],
        [],
        3,
        ["N", 3],
    )
    src = save(m, tmp_path / "m.onnx")
    _, report = _apply(FuseBatchNormPass(), src, tmp_path / "o.onnx")
    assert report.skipped == [("bn", "input computed by Relu (folds only into Conv, ConvTranspose, Gemm, MatMul)")]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_batchnorm(tmp_path: Path, trans_b: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 8) if trans_b else (8, 5)).astype(np.float32)
    c = rng.standard_normal((1, 5)).astype(np.float32)
    m = _bn_graph(
        [h.make_node("Gemm", ["x", "W", "C"], ["pre"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0)],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [nh.from_array(w, "W"), nh.from_array(c, "C")],
        5,
        ["N", 5],
    )
    src = save(m, tmp_path / "m.onnx")
    out, report = _fused(FuseBatchNormPass(), src, tmp_path, [{"x": _x(3, 8)}])
    assert _ops(out) == Counter({"Gemm": 1})
    gemm = onnx.load(str(out)).graph.node[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}["beta"] == 1.0


@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_batchnorm(tmp_path: Path, with_bias: bool) -> None:
    rng = np.random.default_rng(2)
    nodes = [h.make_node("MatMul", ["x", "W"], ["mm" if with_bias else "pre"], name="mm")]
    inits = [nh.from_array(rng.standard_normal((8, 5)).astype(np.float32), "W")]
    if with_bias:
        nodes.append(h.make_node("Add", ["b", "mm"], ["pre"], name="add"))
        inits.append(nh.from_array(rng.standard_normal(5).astype(np.float32), "b"))
    m = _bn_graph(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])], inits, 5, ["N", 5])
    src = save(m, tmp_path / "m.onnx")
    out, report = _fused(FuseBatchNormPass(), src, tmp_path, [{"x": _x(3, 8)}])
    assert _ops(out) == Counter({"MatMul": 1, "Add": 1})
    assert report.stats["fused"] == {"MatMul+BatchNormalization": 1}


def test_matmul_batchnorm_on_3d_input_is_not_folded(tmp_path: Path) -> None:
    # x[N, 5, 8] @ W[8, 5]: BatchNormalization normalizes axis 1 (the 5 rows), not the MatMul's columns.
    w = np.random.default_rng(2).standard_normal((8, 5)).astype(np.float32)
    m = _bn_graph(
        [h.make_node("Relu", ["x"], ["r"]), h.make_node("MatMul", ["r", "W"], ["pre"], name="mm")],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 5, 8])],
        [nh.from_array(w, "W")],
        5,
        ["N", 5, 5],
    )
    src = save(m, tmp_path / "m.onnx")
    out, report = _apply(FuseBatchNormPass(), src, tmp_path / "o.onnx")
    assert not report.modified and _ops(out)["BatchNormalization"] == 1
    assert "not known to be 2-D" in dict(report.skipped)["bn"]


def test_shared_weight_is_copied_only_when_allowed(tmp_path: Path) -> None:
    m = conv_bn_model()
    m.graph.node.append(h.make_node("Conv", ["x", "W"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    m.graph.output.append(h.make_tensor_value_info("c2", T.FLOAT, ["N", 6, 6, 6]))
    src = save(m, tmp_path / "m.onnx")
    _, report = _apply(FuseBatchNormPass(), src, tmp_path / "o.onnx")
    assert not report.modified
    assert "also read by other nodes (folding would copy it)" in dict(report.skipped)["bn"]
    out, report = _fused(FuseBatchNormPass(FuseBatchNormConfig(copy_shared=True)), src, tmp_path, CONV_FEEDS)
    assert _ops(out)["BatchNormalization"] == 0
    assert report.stats["bytes_after"] > report.stats["bytes_before"]


def _if_conv_bn_model() -> onnx.ModelProto:
    """If(cond): then Conv+BatchNormalization, else Conv+Relu, each branch with its own weights."""
    inner = conv_bn_model(bias=False).graph
    then_g = h.make_graph(
        [n for n in inner.node if n.op_type != "Relu"],
        "then",
        [],
        [h.make_tensor_value_info("bn", T.FLOAT, None)],
        list(inner.initializer),
    )
    w2 = (np.random.default_rng(9).standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32)
    else_g = h.make_graph(
        [h.make_node("Conv", ["x", "W2"], ["e"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["e"], ["e_out"])],
        "else",
        [],
        [h.make_tensor_value_info("e_out", T.FLOAT, None)],
        [nh.from_array(w2, "W2")],
    )
    g = h.make_graph(
        [h.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "if_bn",
        [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 6, 6])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 6, 6, 6])],
    )
    return _model(g)


def test_batchnorm_inside_if_branch(tmp_path: Path) -> None:
    src = save(_if_conv_bn_model(), tmp_path / "m.onnx")
    x = _x(2, 4, 6, 6)
    out, report = _fused(FuseBatchNormPass(), src, tmp_path, [{"cond": np.array(c), "x": x} for c in (True, False)])
    assert report.stats["fused"] == {"Conv+BatchNormalization": 1}
    branches = {a.name: a.g for a in onnx.load(str(out)).graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Conv"]


# --------------------------------------------------------------------------------- affine


def test_conv_mul_add_chain_is_folded(tmp_path: Path) -> None:
    m = conv_bn_model()
    rng = np.random.default_rng(4)
    del m.graph.node[1:]  # keep the Conv: c = Conv(x) -> Mul(s) -> Add(t) -> Sub(u) -> Relu
    m.graph.node.extend(
        [
            h.make_node("Mul", ["s", "c"], ["m"], name="mul"),
            h.make_node("Add", ["m", "t"], ["a"], name="add"),
            h.make_node("Div", ["a", "d"], ["q"], name="div"),
            h.make_node("Sub", ["q", "u"], ["r"], name="sub"),
            h.make_node("Relu", ["r"], ["y"], name="relu"),
        ]
    )
    m.graph.initializer.extend(
        [
            nh.from_array(rng.uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32), "s"),
            nh.from_array(rng.standard_normal((6, 1, 1)).astype(np.float32), "t"),
            nh.from_array(np.array(1.5, np.float32), "d"),
            nh.from_array(rng.standard_normal((1, 6, 1, 1)).astype(np.float32), "u"),
        ]
    )
    src = save(_model(m.graph), tmp_path / "m.onnx")
    out, report = _fused(FuseConstantAffinePass(), src, tmp_path, CONV_FEEDS)
    assert _ops(out) == Counter({"Conv": 1, "Relu": 1})
    assert report.stats["fused"] == {"Conv+Add": 1, "Conv+Div": 1, "Conv+Mul": 1, "Conv+Sub": 1}


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((1, 1, 6, 6), "does not broadcast along the output channels only"),
        ((6,), "does not broadcast along the output channels only"),  # the last axis (width), not channels
        ((2, 6, 1, 1), "does not broadcast along the output channels only"),
    ],
)
def test_affine_constant_must_be_per_channel(tmp_path: Path, shape: tuple[int, ...], reason: str) -> None:
    m = conv_bn_model()
    del m.graph.node[1:]
    m.graph.node.append(h.make_node("Mul", ["c", "s"], ["y"], name="mul"))
    m.graph.initializer.append(nh.from_array(np.full(shape, 2.0, np.float32), "s"))
    src = save(_model(m.graph), tmp_path / "m.onnx")
    out, report = _apply(FuseConstantAffinePass(), src, tmp_path / "o.onnx")
    assert not report.modified and _ops(out)["Mul"] == 1
    assert reason in dict(report.skipped)["mul"]


def test_affine_negative_cases(tmp_path: Path) -> None:
    m = conv_bn_model()
    del m.graph.node[1:]
    m.graph.node.extend(
        [
            h.make_node("Div", ["c", "zero"], ["d"], name="div_zero"),  # division by zero is not folded
            h.make_node("Mul", ["c", "two"], ["e"], name="shared"),  # c has two readers
        ]
    )
    m.graph.output.pop()
    m.graph.output.extend([h.make_tensor_value_info(n, T.FLOAT, ["N", 6, 6, 6]) for n in ("d", "e")])
    m.graph.initializer.extend([nh.from_array(np.zeros(6, np.float32).reshape(6, 1, 1), "zero")])
    m.graph.initializer.extend([nh.from_array(np.array(2.0, np.float32), "two")])
    src = save(_model(m.graph), tmp_path / "m.onnx")
    _, report = _apply(FuseConstantAffinePass(), src, tmp_path / "o.onnx")
    assert not report.modified
    assert set(dict(report.skipped)) == {"div_zero", "shared"}


def test_gemm_and_matmul_bias_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    nodes = [
        h.make_node("Gemm", ["x", "WG"], ["g"], name="gemm", transB=1),  # no C: the Add creates it
        h.make_node("Div", ["g", "dg"], ["g2"], name="div"),
        h.make_node("Add", ["g2", "cg"], ["y1"], name="add_g"),
        h.make_node("MatMul", ["x", "WM"], ["mm"], name="mm"),
        h.make_node("Add", ["mm", "bm"], ["mb"], name="bias"),
        h.make_node("Mul", ["mb", "sm"], ["ms"], name="mul_m"),
        h.make_node("Sub", ["ms", "cm"], ["y2"], name="sub_m"),
    ]
    inits = [
        nh.from_array(rng.standard_normal((5, 8)).astype(np.float32), "WG"),
        nh.from_array(rng.uniform(1, 2, 5).astype(np.float32), "dg"),
        nh.from_array(rng.standard_normal((1, 5)).astype(np.float32), "cg"),
        nh.from_array(rng.standard_normal((8, 4)).astype(np.float32), "WM"),
        nh.from_array(rng.standard_normal(4).astype(np.float32), "bm"),
        nh.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "sm"),
        nh.from_array(np.array([0.25], np.float32), "cm"),
    ]
    g = h.make_graph(
        nodes,
        "affine",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y1", T.FLOAT, ["N", 5]), h.make_tensor_value_info("y2", T.FLOAT, ["N", 4])],
        inits,
    )
    src = save(_model(g), tmp_path / "m.onnx")
    out, report = _fused(FuseConstantAffinePass(), src, tmp_path, [{"x": _x(3, 8)}])
    assert _ops(out) == Counter({"Gemm": 1, "MatMul": 1, "Add": 1})
    assert report.stats["fused"] == {"Gemm+Add": 1, "Gemm+Div": 1, "MatMul+Mul": 1, "MatMul+Sub": 1}


# ------------------------------------------------------------------------------- MatMul+Add


def _matmul_add_model(x_shape: list[Any], bias_shape: tuple[int, ...], extra_reader: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    nodes = [
        h.make_node("Relu", ["x"], ["r"], name="relu"),  # a computed input: its rank needs shape inference
        h.make_node("MatMul", ["r", "W"], ["mm"], name="mm"),
        h.make_node("Add", ["mm", "b"], ["y"], name="add"),
    ]
    out_shape = x_shape[:-1] + [5]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, out_shape)]
    if extra_reader:
        outputs.append(h.make_tensor_value_info("mm", T.FLOAT, out_shape))
    g = h.make_graph(
        nodes,
        "mm_add",
        [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
        outputs,
        [
            nh.from_array(rng.standard_normal((8, 5)).astype(np.float32), "W"),
            nh.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b"),
        ],
    )
    return _model(g)


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (), (1,)])
def test_matmul_add_becomes_gemm(tmp_path: Path, bias_shape: tuple[int, ...]) -> None:
    src = save(_matmul_add_model(["N", 8], bias_shape), tmp_path / "m.onnx")
    out, report = _fused(FuseMatMulAddPass(), src, tmp_path, [{"x": _x(3, 8)}, {"x": _x(1, 8, seed=1)}])
    assert _ops(out) == Counter({"Relu": 1, "Gemm": 1})
    assert report.stats["fused"] == {"MatMul+Add": 1}
    assert onnx.load(str(out)).graph.node[-1].output == ["y"]


@pytest.mark.parametrize(
    ("x_shape", "bias_shape", "extra", "reason"),
    [
        (["N", 3, 8], (5,), False, "MatMul input rank is 3 (Gemm takes a 2-D input)"),
        (["N", 8], (3, 5), False, "bias of shape [3, 5] does not broadcast to [5]"),
        (["N", 8], (5,), True, "MatMul output is also read by other nodes or is a graph output"),
    ],
)
def test_matmul_add_negative(
    tmp_path: Path, x_shape: list[Any], bias_shape: tuple[int, ...], extra: bool, reason: str
) -> None:
    src = save(_matmul_add_model(x_shape, bias_shape, extra), tmp_path / "m.onnx")
    out, report = _apply(FuseMatMulAddPass(), src, tmp_path / "o.onnx")
    assert not report.modified and _ops(out)["Gemm"] == 0
    assert report.skipped == [("add", reason)]


# ------------------------------------------------------------------------------ Transposes


def _transpose_model(perms: list[list[int]], relu_first: bool = True) -> onnx.ModelProto:
    nodes = [h.make_node("Relu", ["x"], ["t0"], name="relu")] if relu_first else []
    prev = "t0" if relu_first else "x"
    shape = np.array(["N", 2, 3, 4], dtype=object)
    for i, perm in enumerate(perms):
        shape = shape[perm]
        name = "y" if i == len(perms) - 1 else f"t{i + 1}"
        nodes.append(h.make_node("Transpose", [prev], [name], name=f"tr{i}", perm=perm))
        prev = name
    g = h.make_graph(
        nodes,
        "tr",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, list(shape))],
    )
    return _model(g)


TR_FEEDS = [{"x": _x(2, 2, 3, 4)}]


def test_transpose_chain_composes_into_one(tmp_path: Path) -> None:
    src = save(_transpose_model([[0, 2, 3, 1], [0, 2, 1, 3], [3, 2, 1, 0]]), tmp_path / "m.onnx")
    out, report = _fused(FuseTransposesPass(), src, tmp_path, TR_FEEDS)
    assert _ops(out) == Counter({"Relu": 1, "Transpose": 1})
    perm = onnx.load(str(out)).graph.node[-1].attribute[0].ints
    assert list(perm) == list(np.array([0, 2, 3, 1])[np.array([0, 2, 1, 3])][np.array([3, 2, 1, 0])])


def test_inverse_transposes_vanish_and_the_output_keeps_its_name(tmp_path: Path) -> None:
    src = save(_transpose_model([[0, 2, 3, 1], [0, 3, 1, 2]]), tmp_path / "m.onnx")
    out, report = _fused(FuseTransposesPass(), src, tmp_path, TR_FEEDS)
    m = onnx.load(str(out))
    assert [(n.op_type, list(n.output)) for n in m.graph.node] == [("Relu", ["y"])]
    assert report.tensor_map == {"y": "t0"}  # the Relu output now carries the graph output's name


def test_inverse_transposes_between_graph_input_and_output_leave_an_identity(tmp_path: Path) -> None:
    src = save(_transpose_model([[0, 2, 3, 1], [0, 3, 1, 2]], relu_first=False), tmp_path / "m.onnx")
    out, _ = _fused(FuseTransposesPass(), src, tmp_path, TR_FEEDS)
    assert _ops(out) == Counter({"Identity": 1})


def _constant_transpose_model(shared: bool) -> onnx.ModelProto:
    w = np.random.default_rng(7).standard_normal((16, 32)).astype(np.float32)  # 2 KB: above small_bytes
    nodes = [
        h.make_node("Transpose", ["W"], ["Wt"], name="tw", perm=[1, 0]),
        h.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"),
    ]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])]
    if shared:
        nodes.append(h.make_node("MatMul", ["x2", "W"], ["y2"], name="mm2"))
        outputs.append(h.make_tensor_value_info("y2", T.FLOAT, ["N", 32]))
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["N", 32]), h.make_tensor_value_info("x2", T.FLOAT, ["N", 16])]
    return _model(h.make_graph(nodes, "ct", inputs, outputs, [nh.from_array(w, "W")]))


def test_transpose_of_constant_is_folded(tmp_path: Path) -> None:
    src = save(_constant_transpose_model(shared=False), tmp_path / "m.onnx")
    feeds = [{"x": _x(3, 32), "x2": _x(3, 16)}]
    out, report = _fused(FuseTransposesPass(), src, tmp_path, feeds)
    assert _ops(out) == Counter({"MatMul": 1})
    assert [i.name for i in onnx.load(str(out)).graph.initializer] == ["Wt"]
    assert report.stats["bytes_after"] == report.stats["bytes_before"]


def test_transpose_of_shared_constant_is_kept_unless_allowed(tmp_path: Path) -> None:
    src = save(_constant_transpose_model(shared=True), tmp_path / "m.onnx")
    feeds = [{"x": _x(3, 32), "x2": _x(3, 16)}]
    out, report = _apply(FuseTransposesPass(), src, tmp_path / "o.onnx")
    assert not report.modified and _ops(out)["Transpose"] == 1
    assert "folding would store 2048 more bytes" in dict(report.skipped)["tw"]
    out, report = _fused(FuseTransposesPass(FuseTransposesConfig(copy_shared=True)), src, tmp_path, feeds)
    assert _ops(out) == Counter({"MatMul": 2})
    assert report.stats["bytes_after"] == 2 * report.stats["bytes_before"]


# -------------------------------------------------------------------------------- Reshapes


def _reshape_model(second: list[int], allowzero: int = 0, via: str = "Reshape") -> onnx.ModelProto:
    first = (
        h.make_node("Reshape", ["r", "s1"], ["mid"], name="first")
        if via == "Reshape"
        else h.make_node("Flatten", ["r"], ["mid"], name="first", axis=2)
    )
    nodes = [
        h.make_node("Relu", ["x"], ["r"], name="relu"),
        first,
        h.make_node("Reshape", ["mid", "s2"], ["y"], name="second", allowzero=allowzero),
    ]
    g = h.make_graph(
        nodes,
        "rs",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [f"d{i}" for i in range(len(second))])],
        [nh.from_array(np.array([0, 6, 4], np.int64), "s1"), nh.from_array(np.array(second, np.int64), "s2")],
    )
    return _model(g)


@pytest.mark.parametrize("via", ["Reshape", "Flatten"])
def test_reshape_chain(tmp_path: Path, via: str) -> None:
    src = save(_reshape_model([-1, 4, 6], via=via), tmp_path / "m.onnx")
    out, report = _fused(FuseReshapesPass(), src, tmp_path, TR_FEEDS)
    assert _ops(out) == Counter({"Relu": 1, "Reshape": 1})
    assert report.stats["fused"] == {f"{via}+Reshape": 1}


def test_reshape_with_copied_dimension_is_kept(tmp_path: Path) -> None:
    src = save(_reshape_model([0, 4, 6]), tmp_path / "m.onnx")
    out, report = _apply(FuseReshapesPass(), src, tmp_path / "o.onnx")
    assert not report.modified and _ops(out)["Reshape"] == 2
    assert report.skipped == [("second", "target shape has 0 entries, which copy dimensions of the input")]


def test_reshape_with_allowzero_is_fused(tmp_path: Path) -> None:
    # allowzero=1: a 0 means a dimension of size 0, never a copy, so the first Reshape is irrelevant.
    src = save(_reshape_model([2, -1, 12], allowzero=1), tmp_path / "m.onnx")
    out, _ = _fused(FuseReshapesPass(), src, tmp_path, [{"x": _x(1, 2, 3, 4)}])
    assert _ops(out)["Reshape"] == 1


def _squeeze_model(
    opset: int, first: str, axes1: list[int], axes2: list[int], out_shape: list[Any] | None = None
) -> onnx.ModelProto:
    second = "Squeeze" if first == "Unsqueeze" else "Unsqueeze"
    inits = []
    if opset >= 13:
        n1 = h.make_node(first, ["r", "a1"], ["mid"], name="first")
        n2 = h.make_node(second, ["mid", "a2"], ["y"], name="second")
        inits = [nh.from_array(np.array(axes1, np.int64), "a1"), nh.from_array(np.array(axes2, np.int64), "a2")]
    else:
        n1 = h.make_node(first, ["r"], ["mid"], name="first", axes=axes1)
        n2 = h.make_node(second, ["mid"], ["y"], name="second", axes=axes2)
    shape = ["N", 1, 3, 1] if first == "Squeeze" else ["N", 2, 3]
    g = h.make_graph(
        [h.make_node("Relu", ["x"], ["r"], name="relu"), n1, n2],
        "sq",
        [h.make_tensor_value_info("x", T.FLOAT, shape)],
        [h.make_tensor_value_info("y", T.FLOAT, out_shape or shape)],
        inits,
    )
    return _model(g, opset)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(
    ("first", "axes1", "axes2"),
    [("Unsqueeze", [1, 3], [3, 1]), ("Unsqueeze", [-1], [3]), ("Squeeze", [1, -1], [3, 1])],
)
def test_squeeze_unsqueeze_pairs_cancel(
    tmp_path: Path, opset: int, first: str, axes1: list[int], axes2: list[int]
) -> None:
    src = save(_squeeze_model(opset, first, axes1, axes2), tmp_path / "m.onnx")
    shape = (2, 1, 3, 1) if first == "Squeeze" else (2, 2, 3)
    out, report = _fused(FuseReshapesPass(), src, tmp_path, [{"x": _x(*shape)}])
    assert _ops(out) == Counter({"Relu": 1})
    assert report.tensor_map == {"y": "r"}


def test_squeeze_unsqueeze_on_different_axes_stay(tmp_path: Path) -> None:
    src = save(_squeeze_model(13, "Squeeze", [1], [2], ["N", 3, 1, 1]), tmp_path / "m.onnx")
    _, report = _apply(FuseReshapesPass(), src, tmp_path / "o.onnx")
    assert not report.modified and not report.skipped


# ------------------------------------------------------------------------ all, real models


def _all_passes(src: Path, out: Path) -> list[oc.PassReport]:
    model = oc.load(src)
    reports = [p().run(model, PassContext()) for p in ALL_PASSES]
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return reports


@pytest.mark.parametrize("name", ["digits_cnn", "digits_keras", "tiny_transformer"])
def test_bundled_models_still_validate(tmp_path: Path, name: str) -> None:
    src = MODELS / f"{name}.onnx"
    out = tmp_path / f"{name}.fused.onnx"
    reports = _all_passes(src, out)
    v = oc.validate(src, out, tolerances=["max_abs<=1e-4"])
    assert v.passed, v.failures
    assert _signature(out) == _signature(src)
    fused = {p.name: r.stats["fusions"] for p, r in zip(ALL_PASSES, reports)}
    if name == "digits_cnn":  # Conv+BatchNormalization x3 as exported by PyTorch
        assert fused["fuse-batchnorm"] == 3 and _ops(out)["BatchNormalization"] == 0
    if name == "digits_keras":  # MatMul+Add x2 on the flattened 2-D activations
        assert fused["fuse-matmul-add"] == 2
    model = oc.load(out)
    assert not any(p().run(model, PassContext()).modified for p in ALL_PASSES)


def test_deterministic(tmp_path: Path) -> None:
    src = save(conv_bn_model(op="ConvTranspose", group=2), tmp_path / "m.onnx")
    a = tmp_path / "a.onnx"
    b = tmp_path / "b.onnx"
    _all_passes(src, a)
    _all_passes(src, b)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    ("opset", "first", "second"),
    [(13, [0], [2]), (13, [1], [0]), (13, [-1], [0, -1]), (11, [0], [2]), (11, [2, 0], [1])],
)
def test_unsqueeze_chains_merge(tmp_path: Path, opset: int, first: list[int], second: list[int]) -> None:
    def unsqueeze(src: str, dst: str, axes: list[int], name: str) -> list[onnx.NodeProto]:
        if opset >= 13:
            const = h.make_node("Constant", [], [f"{name}_axes"], value=nh.from_array(np.array(axes, np.int64)))
            return [const, h.make_node("Unsqueeze", [src, f"{name}_axes"], [dst], name=name)]
        return [h.make_node("Unsqueeze", [src], [dst], name=name, axes=axes)]

    nodes = unsqueeze("x", "u1", first, "u1") + unsqueeze("u1", "u2", second, "u2")
    rank = 2 + len(first) + len(second)
    g = h.make_graph(
        nodes,
        "uu",
        [h.make_tensor_value_info("x", T.FLOAT, [3, 4])],
        [h.make_tensor_value_info("u2", T.FLOAT, [None] * rank)],
    )
    src = tmp_path / "m.onnx"
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, str(src))
    model = oc.load(src)
    report = FuseReshapesPass().run(model, PassContext())
    out = oc.save(model, tmp_path / "f.onnx")
    assert report.modified
    assert [n.op_type for n in onnx.load(str(out)).graph.node if n.op_type == "Unsqueeze"] == ["Unsqueeze"]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    a, b = run(src, {"x": x})[0], run(out, {"x": x})[0]
    assert a.shape == b.shape and np.array_equal(a, b)


def test_unsqueeze_read_by_two_unsqueezes_merges_into_both(tmp_path: Path) -> None:
    axes = {k: nh.from_array(np.array(v, np.int64), k) for k, v in {"a0": [0], "a1": [1], "a3": [3]}.items()}
    g = h.make_graph(
        [
            h.make_node("Unsqueeze", ["x", "a0"], ["u"], name="inner"),
            h.make_node("Unsqueeze", ["u", "a1"], ["p"], name="outer1"),
            h.make_node("Unsqueeze", ["u", "a3"], ["q"], name="outer2"),
        ],
        "shared",
        [h.make_tensor_value_info("x", T.FLOAT, [3, 4])],
        [h.make_tensor_value_info("p", T.FLOAT, [1, 1, 3, 4]), h.make_tensor_value_info("q", T.FLOAT, [1, 3, 4, 1])],
        list(axes.values()),
    )
    src = save(_model(g), tmp_path / "m.onnx")
    model = oc.load(src)
    FuseReshapesPass().run(model, PassContext())
    out = oc.save(model, tmp_path / "f.onnx")
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node) == Counter({"Unsqueeze": 2})
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for a, b in zip(run(src, {"x": x}), run(out, {"x": x})):
        assert a.shape == b.shape and np.array_equal(a, b)
