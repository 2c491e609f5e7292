"""No-op elimination: every rule positive and negative, graph outputs, subgraphs, idempotence, real models.

Each case is checked for structure (which ops went), ``onnx.checker`` on the written model, unchanged
graph inputs/outputs, and bit-for-bit equal outputs in onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from _models import _model, assert_equivalent, matmul_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress import shapes
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.fold.noops import EliminateNoOpsConfig, EliminateNoOpsPass

MODELS = Path(__file__).resolve().parent.parent / "models"
BUNDLED = ["digits_cnn", "digits_keras", "tiny_transformer"]
INT64_MAX = 2**63 - 1
DIMS = {"N": 2, "T": 4, "M": 2}  # sizes fed for symbolic dimensions


# --------------------------------------------------------------------------- builders and harness


def _graph_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, Any] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    g = h.make_graph(
        nodes, "noops", inputs, outputs, [nh.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(m).graph.output}
    for out in m.graph.output:  # outputs declared without a shape take the inferred one
        if not out.type.tensor_type.HasField("shape") and inferred[out.name].type.tensor_type.HasField("shape"):
            out.CopyFrom(inferred[out.name])
    _check(m)
    return m


def _check(model: onnx.ModelProto) -> None:
    """``onnx.checker``, with strict shape inference unless an output's rank is unknown."""
    full = all(o.type.tensor_type.HasField("shape") for o in model.graph.output)
    onnx.checker.check_model(model, full_check=full)


def _chain(
    op: str,
    x_shape: list[Any],
    extra: tuple[str, ...] = (),
    inits: dict[str, Any] | None = None,
    opset: int = 17,
    dtype: int = T.FLOAT,
    out_dtype: int | None = None,
    outputs: tuple[str, ...] = ("b",),
    out_shape: list[Any] | None = None,
    **attrs: Any,
) -> onnx.ModelProto:
    """``x -> Neg -> a -> op(a, *extra) -> b -> Neg -> y``: the node under test sits between two others."""
    nodes = [
        h.make_node("Neg", ["x"], ["a"], name="pre"),
        h.make_node(op, ["a", *extra], list(outputs), name="target", **attrs),
        h.make_node("Neg", ["b"], ["y"], name="post"),
    ]
    return _graph_model(
        nodes,
        [h.make_tensor_value_info("x", dtype, x_shape)],
        [h.make_tensor_value_info("y", out_dtype or dtype, out_shape)],
        inits,
        opset,
    )


def _feeds(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Two seeded feeds; float inputs start with -0.0, +0.0, inf and nan to expose sign and NaN changes."""
    sizes = {**DIMS, **(dims or {})}
    inits = {i.name for i in model.graph.initializer}
    feeds = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in tt.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if dtype == np.bool_:
                value = rng.integers(0, 2, size=shape).astype(bool)
            elif np.issubdtype(dtype, np.integer):
                value = rng.integers(-50, 50, size=shape).astype(dtype)
            else:
                value = rng.standard_normal(shape).astype(dtype)
                flat = value.reshape(-1)
                special = np.array([-0.0, 0.0, np.inf, np.nan], dtype=dtype)[: flat.size]
                flat[: special.size] = special
            feed[vi.name] = value
        feeds.append(feed)
    return feeds


def _io(model: onnx.ModelProto) -> list[tuple[str, int, list[Any]]]:
    def sig(vi: onnx.ValueInfoProto) -> tuple[str, int, list[Any]]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        return vi.name, tt.elem_type, dims if tt.HasField("shape") else None

    return [sig(v) for v in model.graph.input] + [sig(v) for v in model.graph.output]


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _eliminate(
    tmp_path: Path,
    proto: onnx.ModelProto,
    dims: dict[str, int] | None = None,
    name: str = "m",
    **cfg: Any,
) -> tuple[onnx.ModelProto, oc.PassReport, Path]:
    """Run the pass on ``proto``; check the written model and its outputs against the original."""
    src = save(proto, tmp_path / f"{name}.onnx")
    model = oc.load(src)
    report = EliminateNoOpsPass(EliminateNoOpsConfig(**cfg)).run(model, PassContext())
    out = oc.save(model, tmp_path / f"{name}.noops.onnx")
    result = onnx.load(str(out))
    _check(result)
    assert _io(result) == _io(proto)
    assert_equivalent(src, out, _feeds(proto, dims))
    return result, report, out


ONES4 = np.ones(4, np.float32)
ZEROS4 = np.zeros(4, np.float32)

# (id, model, ops removed)
CASES = [
    ("identity", _chain("Identity", [2, 3]), {"Identity": 1}),
    # Dropout
    ("dropout-ratio", _chain("Dropout", [2, 3], ("ratio",), {"ratio": np.float32(0.5)}), {"Dropout": 1}),
    (
        "dropout-training-false",
        _chain("Dropout", [2, 3], ("ratio", "mode"), {"ratio": np.float32(0.5), "mode": np.array(False)}),
        {"Dropout": 1},
    ),
    (
        "dropout-training-true",  # ratio 0 keeps the output deterministic for the comparison
        _chain("Dropout", [2, 3], ("ratio", "mode"), {"ratio": np.float32(0.0), "mode": np.array(True)}),
        {},
    ),
    ("dropout-opset11", _chain("Dropout", [2, 3], opset=11, ratio=0.3), {"Dropout": 1}),
    ("dropout-mask-unused", _chain("Dropout", [2, 3], outputs=("b", "mask")), {"Dropout": 1}),
    # Cast
    ("cast-same", _chain("Cast", ["N", 3], to=T.FLOAT), {"Cast": 1}),
    ("cast-int-same", _chain("Cast", ["N", 3], dtype=T.INT64, to=T.INT64), {"Cast": 1}),
    ("cast-other", _chain("Cast", ["N", 3], out_dtype=T.DOUBLE, to=T.DOUBLE), {}),
    ("castlike-same", _chain("CastLike", [2, 3], ("like",), {"like": np.zeros(1, np.float32)}), {"CastLike": 1}),
    (
        "castlike-other",
        _chain("CastLike", [2, 3], ("like",), {"like": np.zeros(1, np.float64)}, out_dtype=T.DOUBLE),
        {},
    ),
    # Reshape / Flatten
    ("reshape-static-same", _chain("Reshape", [2, 3, 4], ("s",), {"s": np.array([2, 3, 4])}), {"Reshape": 1}),
    ("reshape-static-other", _chain("Reshape", [2, 3, 4], ("s",), {"s": np.array([6, 4])}), {}),
    ("reshape-copy-dims", _chain("Reshape", ["N", 3, 4], ("s",), {"s": np.array([0, 3, 4])}), {"Reshape": 1}),
    # -1 next to a dynamic dimension: that dimension could be 0, leaving -1 undetermined
    ("reshape-copy-and-infer", _chain("Reshape", ["N", 3, 4], ("s",), {"s": np.array([0, 3, -1])}), {}),
    ("reshape-infer-dynamic", _chain("Reshape", ["N", 3, 4], ("s",), {"s": np.array([-1, 3, 4])}), {"Reshape": 1}),
    ("reshape-dynamic-other", _chain("Reshape", ["N", "T"], ("s",), {"s": np.array([-1, 2])}), {}),
    ("reshape-dynamic-wild", _chain("Reshape", ["N", "T", 4], ("s",), {"s": np.array([0, -1, 4])}), {}),
    ("reshape-allowzero-same", _chain("Reshape", [2, 3], ("s",), {"s": np.array([2, 3])}, allowzero=1), {"Reshape": 1}),
    ("flatten-rank2", _chain("Flatten", ["N", 6], axis=1), {"Flatten": 1}),
    ("flatten-rank3", _chain("Flatten", [2, 3, 4], axis=1), {}),
    ("flatten-axis0", _chain("Flatten", [2, 3], axis=0), {}),
    # Transpose
    ("transpose-identity", _chain("Transpose", ["N", 3, 4], perm=[0, 1, 2]), {"Transpose": 1}),
    ("transpose-swap", _chain("Transpose", ["N", 3, 4], perm=[0, 2, 1]), {}),
    ("transpose-default-rank1", _chain("Transpose", [5]), {"Transpose": 1}),
    ("transpose-default-rank2", _chain("Transpose", [2, 3]), {}),
    # Pad
    ("pad-zero-reflect", _chain("Pad", [2, 3], ("p",), {"p": np.zeros(4, np.int64)}, mode="reflect"), {"Pad": 1}),
    ("pad-nonzero", _chain("Pad", [2, 3], ("p",), {"p": np.array([0, 1, 0, 1])}), {}),
    ("pad-opset10-zero", _chain("Pad", [2, 3], opset=10, pads=[0, 0, 0, 0]), {"Pad": 1}),
    ("pad-opset10-nonzero", _chain("Pad", [2, 3], opset=10, pads=[0, 1, 0, 0]), {}),
    # Mul / Div / Add / Sub
    ("mul-ones-vector", _chain("Mul", ["N", 3, 4], ("c",), {"c": ONES4}), {"Mul": 1}),
    ("mul-ones-full", _chain("Mul", [2, 3, 4], ("c",), {"c": np.ones((2, 3, 4), np.float32)}), {"Mul": 1}),
    ("mul-ones-scalar", _chain("Mul", ["N", "T"], ("c",), {"c": np.float32(1)}), {"Mul": 1}),
    ("mul-ones-grows-dim", _chain("Mul", ["N", 1, 4], ("c",), {"c": np.ones((3, 4), np.float32)}), {}),
    ("mul-ones-grows-rank", _chain("Mul", [3, 4], ("c",), {"c": np.ones((1, 3, 4), np.float32)}), {}),
    ("mul-ones-unknown-dim", _chain("Mul", ["N", 4], ("c",), {"c": np.ones((2, 4), np.float32)}), {}),
    ("mul-two", _chain("Mul", [2, 4], ("c",), {"c": np.float32(2)}), {}),
    ("mul-almost-ones", _chain("Mul", [2, 4], ("c",), {"c": np.array([1, 1, 1, 1.0000001], np.float32)}), {}),
    ("div-one", _chain("Div", ["N", 4], ("c",), {"c": ONES4}), {"Div": 1}),
    ("add-zeros", _chain("Add", ["N", 4], ("c",), {"c": ZEROS4}), {"Add": 1}),
    ("add-zero-int", _chain("Add", ["N", 4], ("c",), {"c": np.int64(0)}, dtype=T.INT64), {"Add": 1}),
    ("add-one", _chain("Add", ["N", 4], ("c",), {"c": np.float32(1)}), {}),
    ("sub-zero", _chain("Sub", ["N", 4], ("c",), {"c": np.float32(0)}), {"Sub": 1}),
    # Expand
    ("expand-ones", _chain("Expand", ["N", 3], ("s",), {"s": np.array([1, 3])}), {"Expand": 1}),
    ("expand-lower-rank", _chain("Expand", [2, 3], ("s",), {"s": np.array([3])}), {"Expand": 1}),
    ("expand-grows-rank", _chain("Expand", [2, 3], ("s",), {"s": np.array([4, 2, 3])}), {}),
    ("expand-grows-dim", _chain("Expand", ["N", 1], ("s",), {"s": np.array([1, 3])}), {}),
    # Concat / Split
    ("concat-single", _chain("Concat", [2, 3], axis=0), {"Concat": 1}),
    ("concat-two", _chain("Concat", [2, 3], ("a",), axis=0), {}),
    ("split-single", _chain("Split", [2, 3], axis=1), {"Split": 1}),
    ("split-two", _chain("Split", [2, 4], axis=1, outputs=("b", "b2")), {}),
    # Slice
    (
        "slice-full-dynamic",
        _chain("Slice", ["N", 4], ("st", "en", "ax"), {"st": [0], "en": [INT64_MAX], "ax": [0]}),
        {"Slice": 1},
    ),
    (
        "slice-full-static",
        _chain("Slice", [2, 4], ("st", "en", "ax"), {"st": [0, -4], "en": [2, 10], "ax": [0, -1]}),
        {"Slice": 1},
    ),
    (
        "slice-steps-one",
        _chain("Slice", [2, 4], ("st", "en", "ax", "sp"), {"st": [0], "en": [4], "ax": [1], "sp": [1]}),
        {"Slice": 1},
    ),
    ("slice-partial", _chain("Slice", [2, 4], ("st", "en", "ax"), {"st": [0], "en": [3], "ax": [1]}), {}),
    ("slice-offset", _chain("Slice", [2, 4], ("st", "en", "ax"), {"st": [1], "en": [4], "ax": [1]}), {}),
    (
        "slice-step2",
        _chain("Slice", [2, 4], ("st", "en", "ax", "sp"), {"st": [0], "en": [4], "ax": [1], "sp": [2]}),
        {},
    ),
    (
        "slice-reverse",
        _chain("Slice", [2, 4], ("st", "en", "ax", "sp"), {"st": [-1], "en": [-INT64_MAX], "ax": [1], "sp": [-1]}),
        {},
    ),
    ("slice-dynamic-end", _chain("Slice", ["N", 4], ("st", "en", "ax"), {"st": [0], "en": [5], "ax": [0]}), {}),
    ("slice-opset9", _chain("Slice", [2, 4], opset=9, starts=[0], ends=[4], axes=[1]), {"Slice": 1}),
    ("slice-opset9-partial", _chain("Slice", [2, 4], opset=9, starts=[1], ends=[4], axes=[1]), {}),
    # Squeeze / Unsqueeze
    ("squeeze-no-axes-static", _chain("Squeeze", [2, 3]), {"Squeeze": 1}),
    ("squeeze-no-axes-with-1", _chain("Squeeze", [2, 1, 3]), {}),
    ("squeeze-no-axes-dynamic", _chain("Squeeze", ["N", 3], out_shape=["N", 3]), {}),
    ("squeeze-empty-axes-static", _chain("Squeeze", [2, 3], ("ax",), {"ax": np.zeros(0, np.int64)}), {"Squeeze": 1}),
    ("squeeze-empty-axes-with-1", _chain("Squeeze", [2, 1, 3], ("ax",), {"ax": np.zeros(0, np.int64)}), {}),
    ("squeeze-axes", _chain("Squeeze", [2, 1, 3], ("ax",), {"ax": np.array([1])}), {}),
    ("squeeze-opset11-no-axes", _chain("Squeeze", [2, 3], opset=11), {"Squeeze": 1}),
    ("unsqueeze-empty", _chain("Unsqueeze", ["N", 3], ("ax",), {"ax": np.zeros(0, np.int64)}), {"Unsqueeze": 1}),
    ("unsqueeze-axes", _chain("Unsqueeze", ["N", 3], ("ax",), {"ax": np.array([0])}), {}),
]


@pytest.mark.parametrize(("model", "removed"), [pytest.param(m, r, id=i) for i, m, r in CASES])
def test_rule(tmp_path: Path, model: onnx.ModelProto, removed: dict[str, int]) -> None:
    result, report, _ = _eliminate(tmp_path, model)
    assert report.stats["removed"] == removed
    assert report.modified == bool(removed)
    expected = _ops(model) - Counter(removed)
    assert _ops(result) == expected
    assert report.stats["nodes_after"] == report.stats["nodes_before"] - sum(removed.values())
    assert report.stats["nodes_removed"] == sum(removed.values())


def test_commuted_and_constant_node_operands(tmp_path: Path) -> None:
    """``1 * x`` and ``0 + x`` (constant first), a ``Constant`` node operand, and the ones that stay."""
    nodes = [
        h.make_node("Neg", ["x"], ["a"]),
        h.make_node("Mul", ["one", "a"], ["b"], name="one_times"),
        h.make_node("Add", ["zero", "b"], ["c"], name="zero_plus"),
        h.make_node("Constant", [], ["k"], value=nh.from_array(np.ones((1, 4), np.float32), "k_value")),
        h.make_node("Div", ["c", "k"], ["d"], name="div_const_node"),
        h.make_node("Div", ["one", "d"], ["e"], name="one_over"),
        h.make_node("Sub", ["zero", "e"], ["y"], name="zero_minus"),
    ]
    model = _graph_model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        {"one": np.ones((1, 1), np.float32), "zero": np.float32(0)},
    )
    result, report, _ = _eliminate(tmp_path, model)
    assert report.stats["removed"] == {"Add": 1, "Div": 1, "Mul": 1}
    assert [n.name for n in result.graph.node] == ["", "one_over", "zero_minus"]  # Constant node gone too


@pytest.mark.parametrize("signed_zeros", [False, True])
def test_signed_zeros(tmp_path: Path, signed_zeros: bool) -> None:
    """``x + 0`` and ``x - (-0)`` map -0 to +0; with ``signed_zeros`` they stay and every sign survives."""
    nodes = [h.make_node("Neg", ["x"], ["a"], name="neg")]
    for i, (op, zero, name) in enumerate(
        [("Add", "pz", "add_pos"), ("Add", "nz", "add_neg"), ("Sub", "pz", "sub_pos"), ("Sub", "nz", "sub_neg")], 1
    ):
        nodes += [
            h.make_node(op, ["a", zero], [f"z{i}"], name=name),
            h.make_node("Neg", [f"z{i}"], [f"y{i}"], name=f"out{i}"),  # Neg keeps the sign information
        ]
    model = _graph_model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, [4])],
        [h.make_tensor_value_info(f"y{i}", T.FLOAT, [4]) for i in range(1, 5)],
        {"pz": np.float32(0.0), "nz": np.float32(-0.0)},
    )
    result, report, out = _eliminate(tmp_path, model, signed_zeros=signed_zeros)
    kept = {n.name for n in result.graph.node if not n.name.startswith(("neg", "out"))}
    if signed_zeros:
        assert kept == {"add_pos", "sub_neg"}
        x = np.array([-0.0, 0.0, -1.0, 2.0], np.float32)
        for a, b in zip(run(tmp_path / "m.onnx", {"x": x}), run(out, {"x": x})):
            assert np.array_equal(np.signbit(a), np.signbit(b))
    else:
        assert kept == set()
        assert report.stats["removed"] == {"Add": 2, "Sub": 2}


def test_chain_into_graph_output_keeps_names(tmp_path: Path) -> None:
    nodes = [
        h.make_node("Neg", ["x"], ["a"], name="neg"),
        h.make_node("Identity", ["a"], ["i1"], name="id1"),
        h.make_node("Transpose", ["i1"], ["i2"], name="tr", perm=[0, 1]),
        h.make_node("Identity", ["i2"], ["y"], name="id2"),
        h.make_node("Identity", ["x"], ["passthrough"], name="id_input"),
    ]
    model = _graph_model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3])],
        [h.make_tensor_value_info("y", T.FLOAT, ["B", 3]), h.make_tensor_value_info("passthrough", T.FLOAT, ["N", 3])],
    )
    result, report, _ = _eliminate(tmp_path, model)
    assert [(n.name, list(n.output)) for n in result.graph.node] == [("neg", ["y"]), ("id_input", ["passthrough"])]
    assert report.stats["removed"] == {"Identity": 2, "Transpose": 1}
    assert ("id_input", "Identity between graph input and graph output kept") in report.skipped


def test_outputs_sharing_a_value_and_constant_outputs(tmp_path: Path) -> None:
    nodes = [
        h.make_node("Neg", ["x"], ["a"], name="neg"),
        h.make_node("Identity", ["a"], ["y1"], name="id1"),
        h.make_node("Identity", ["a"], ["y2"], name="id2"),
        h.make_node("Identity", ["c"], ["y3"], name="id_const"),
    ]
    model = _graph_model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, [3])],
        [h.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("y1", "y2", "y3")],
        {"c": np.arange(3, dtype=np.float32)},
    )
    result, report, _ = _eliminate(tmp_path, model)
    assert _ops(result) == Counter({"Neg": 1, "Identity": 2})
    reasons = dict(report.skipped)
    assert reasons["id1"] == "Identity between two graph outputs kept"  # consumers first: id2 went
    assert reasons["id_const"] == "Identity between a constant and graph output kept"


def _dropout_mask_model(mask_use: str) -> onnx.ModelProto:
    nodes = [
        h.make_node("Neg", ["x"], ["a"], name="neg"),
        h.make_node("Dropout", ["a"], ["b", "mask"], name="drop"),
        h.make_node("Identity", ["b"], ["y"], name="id"),
    ]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, [2, 3])]
    if mask_use == "output":
        outputs.append(h.make_tensor_value_info("mask", T.BOOL, [2, 3]))
    elif mask_use == "dead":  # read only by a node nothing needs
        nodes.append(h.make_node("Not", ["mask"], ["unused"], name="not"))
    elif mask_use == "noop":  # read only by a no-op whose output is unused
        nodes.append(h.make_node("Identity", ["mask"], ["unused"], name="id_mask"))
    elif mask_use == "used":
        nodes += [
            h.make_node("Cast", ["mask"], ["m"], name="cast", to=T.FLOAT),
            h.make_node("Add", ["m", "a"], ["z"], name="add"),
        ]
        outputs.append(h.make_tensor_value_info("z", T.FLOAT, [2, 3]))
    return _graph_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 3])], outputs)


@pytest.mark.parametrize("mask_use", ["output", "used", "dead", "noop"])
def test_dropout_mask(tmp_path: Path, mask_use: str) -> None:
    result, report, out = _eliminate(tmp_path, _dropout_mask_model(mask_use))
    kept = mask_use in ("output", "used")
    assert ("Dropout" in _ops(result)) == kept
    assert (("drop", "Dropout whose mask output is used kept") in report.skipped) == kept
    again = EliminateNoOpsPass().run(oc.load(out), PassContext())
    assert not again.modified


def test_dropout_training_mode_is_reported(tmp_path: Path) -> None:
    model = _chain("Dropout", [2, 3], ("ratio", "mode"), {"ratio": np.float32(0.5), "mode": np.array(True)})
    _, report, _ = _eliminate(tmp_path, model)
    assert report.skipped == [("target", "Dropout in training mode kept")]


def _if_model() -> onnx.ModelProto:
    """xn = Neg(x); If(cond): then = Identity(Neg(xn)) [removed]; else = Identity(xn) [outer value: kept]."""
    then_g = h.make_graph(
        [
            h.make_node("Neg", ["xn"], ["t_neg"], name="then_neg"),
            h.make_node("Identity", ["t_neg"], ["t_out"], name="then_id"),
        ],
        "then",
        [],
        [h.make_tensor_value_info("t_out", T.FLOAT, None)],
    )
    else_g = h.make_graph(
        [h.make_node("Identity", ["xn"], ["e_out"], name="else_id")],
        "else",
        [],
        [h.make_tensor_value_info("e_out", T.FLOAT, None)],
    )
    nodes = [
        h.make_node("Neg", ["x"], ["xn"], name="neg"),  # read only inside the branches
        h.make_node("If", ["cond"], ["r"], name="if", then_branch=then_g, else_branch=else_g),
        h.make_node("Identity", ["r"], ["y"], name="after_if"),
    ]
    return _graph_model(
        nodes,
        [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, ["N", 3])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])],
    )


def test_identity_inside_if_branch_is_removed(tmp_path: Path) -> None:
    model = _if_model()
    result, report, out = _eliminate(tmp_path, model)
    assert report.stats["removed"] == {"Identity": 2}
    assert ("else_id", "Identity between an outer-scope value and a subgraph output kept") in report.skipped
    assert [n.name for n in result.graph.node] == ["neg", "if"]
    if_node = result.graph.node[1]
    branches = {a.name: a.g for a in if_node.attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Neg"]
    assert [o.name for o in branches["then_branch"].output] == ["t_out"]
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        assert_equivalent(tmp_path / "m.onnx", out, [{"cond": np.array(cond), "x": x}])


def test_loop_body(tmp_path: Path) -> None:
    """The body's ``cond_out = Identity(cond_in)`` must stay; a computed Identity goes."""
    body = h.make_graph(
        [
            h.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id"),
            h.make_node("Add", ["v_in", "one"], ["v_add"], name="body_add"),
            h.make_node("Mul", ["v_add", "one"], ["v_mul"], name="body_mul_one"),
            h.make_node("Identity", ["v_mul"], ["v_out"], name="body_id"),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("v_in", T.FLOAT, [3]),
        ],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [3])],
    )
    nodes = [h.make_node("Loop", ["n", "c", "x"], ["y"], name="loop", body=body)]
    model = _graph_model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, [3])],
        [h.make_tensor_value_info("y", T.FLOAT, [3])],
        {"n": np.int64(4), "c": np.array(True), "one": np.float32(1)},
    )
    result, report, _ = _eliminate(tmp_path, model)
    assert report.stats["removed"] == {"Identity": 1, "Mul": 1}
    assert ("cond_id", "Identity between graph input and graph output kept") in report.skipped
    body_out = next(a.g for a in result.graph.node[0].attribute if a.name == "body")
    assert [n.name for n in body_out.node] == ["cond_id", "body_add"]
    assert [o.name for o in body_out.output] == ["cond_out", "v_out"]


def test_exclude(tmp_path: Path) -> None:
    _, report, _ = _eliminate(tmp_path, _chain("Identity", [2, 3]), exclude=("target",))
    assert not report.modified


def _kitchen_sink() -> onnx.ModelProto:
    """Many no-ops in a row, some feeding outputs, plus an If with one inside."""
    then_g = h.make_graph(
        [h.make_node("Neg", ["x"], ["t_neg"]), h.make_node("Identity", ["t_neg"], ["t_out"])],
        "then",
        [],
        [h.make_tensor_value_info("t_out", T.FLOAT, None)],
    )
    else_g = h.make_graph(
        [h.make_node("Abs", ["x"], ["e_out"])], "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)]
    )
    nodes = [
        h.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g),
        h.make_node("Identity", ["r"], ["a1"]),
        h.make_node("Mul", ["a1", "one"], ["a2"]),
        h.make_node("Reshape", ["a2", "shape"], ["a3"]),
        h.make_node("Transpose", ["a3"], ["a4"], perm=[0, 1, 2]),
        h.make_node("Cast", ["a4"], ["a5"], to=T.FLOAT),
        h.make_node("Dropout", ["a5"], ["a6"]),
        h.make_node("Slice", ["a6", "st", "en"], ["a7"]),
        h.make_node("Squeeze", ["a7"], ["a8"]),
        h.make_node("Identity", ["a8"], ["y"]),
        h.make_node("Identity", ["a4"], ["y2"]),
        h.make_node("Relu", ["a8"], ["y3"]),
    ]
    return _graph_model(
        nodes,
        [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4])],
        [h.make_tensor_value_info(n, T.FLOAT, [2, 3, 4]) for n in ("y", "y2", "y3")],
        {"one": np.float32(1), "shape": np.array([2, 3, 4]), "st": [0], "en": [INT64_MAX]},
    )


def test_idempotent_and_deterministic(tmp_path: Path) -> None:
    src = save(_kitchen_sink(), tmp_path / "k.onnx")
    model = oc.load(src)
    report = EliminateNoOpsPass().run(model, PassContext())
    once = oc.save(model, tmp_path / "once.onnx")
    assert report.stats["removed"] == {
        "Dropout": 1, "Identity": 4, "Mul": 1, "Reshape": 1, "Slice": 1, "Squeeze": 1, "Transpose": 1,
    }  # fmt: skip
    # y and y2 hold the same value: one node must stay between them (here the Cast).
    assert ("Cast", "Cast between two graph outputs kept") in report.skipped
    feeds = [{"cond": np.array(c), "x": f["x"]} for c in (True, False) for f in _feeds(_kitchen_sink())]
    assert_equivalent(src, once, feeds)

    model = oc.load(once)
    again = EliminateNoOpsPass().run(model, PassContext())
    twice = oc.save(model, tmp_path / "twice.onnx")
    assert not again.modified and again.stats["removed"] == {}
    assert twice.read_bytes() == once.read_bytes()

    model = oc.load(src)
    EliminateNoOpsPass().run(model, PassContext())
    assert oc.save(model, tmp_path / "once_again.onnx").read_bytes() == once.read_bytes()


def test_shape_inference_runs_at_most_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = shapes.infer_shapes

    def counting(model: oc.Model) -> list[str]:
        calls.append(1)
        return real(model)

    monkeypatch.setattr(shapes, "infer_shapes", counting)
    EliminateNoOpsPass().run(oc.load(save(_kitchen_sink(), tmp_path / "k.onnx")), PassContext())
    assert len(calls) == 1
    calls.clear()
    EliminateNoOpsPass().run(oc.load(save(_chain("Identity", [2, 3]), tmp_path / "i.onnx")), PassContext())
    assert calls == []  # no rule needed a shape


def test_model_without_noops_is_untouched(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "mm.onnx")
    plain = oc.save(oc.load(src), tmp_path / "plain.onnx")
    model = oc.load(src)
    report = EliminateNoOpsPass().run(model, PassContext())
    assert not report.modified and report.skipped == []
    assert oc.save(model, tmp_path / "after.onnx").read_bytes() == plain.read_bytes()


def _with_identities(src: Path, dst: Path) -> int:
    """Copy a model with an Identity after every main-graph node output; returns how many."""
    m = onnx.load(str(src))
    nodes, added = [], 0
    for node in m.graph.node:
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name:
                node.output[i] = f"{name}__pre"
                nodes.append(h.make_node("Identity", [f"{name}__pre"], [name], name=f"{name}__identity"))
                added += 1
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst))
    return added


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_stay_exact(name: str, tmp_path: Path) -> None:
    src = MODELS / f"{name}.onnx"
    model = oc.load(src)
    report = EliminateNoOpsPass().run(model, PassContext())
    out = oc.save(model, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert oc.validate(src, out, tolerances=["max_abs<=0"]).passed
    assert report.stats["nodes_after"] <= report.stats["nodes_before"]

    injected = tmp_path / f"{name}.identities.onnx"
    added = _with_identities(src, injected)
    model = oc.load(injected)
    report = EliminateNoOpsPass().run(model, PassContext())
    assert report.stats["removed"] == {"Identity": added}
    out = oc.save(model, tmp_path / f"{name}.cleaned.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert _io(onnx.load(str(out))) == _io(onnx.load(str(src)))
    assert len(onnx.load(str(out)).graph.node) == len(onnx.load(str(src)).graph.node)
    v = oc.validate(src, out, tolerances=["max_abs<=0"])
    assert v.passed, v.failures


@pytest.mark.parametrize(("op", "value", "removed"), [("And", True, True), ("Or", False, True), ("And", False, False)])
def test_boolean_neutral_elements(tmp_path: Path, op: str, value: bool, removed: bool) -> None:
    g = h.make_graph(
        [h.make_node(op, ["c", "x"], ["l"], name="logic"), h.make_node("Not", ["l"], ["y"], name="not")],
        "logic",
        [h.make_tensor_value_info("x", T.BOOL, [2, 3])],
        [h.make_tensor_value_info("y", T.BOOL, [2, 3])],
        [nh.from_array(np.full((1, 3), value), "c")],
    )
    src = save(_model(g), tmp_path / "m.onnx")
    model = oc.load(src)
    report = EliminateNoOpsPass().run(model, PassContext())
    out = oc.save(model, tmp_path / "f.onnx")
    assert report.modified is removed
    x = np.array([[True, False, True], [False, False, True]])
    assert_equivalent(src, out, [{"x": x}])
