"""Per-output-part validation: an output produced by a Concat is also compared part by part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import ValidationFailed
from onnxcompress.validate import compare

ANCHORS = 64  # 8 x 8 grid
CLASSES = 10


def detector(seed: int = 0) -> onnx.ModelProto:
    """x[N,16,8,8] -> Conv+Relu -> {boxes: Sigmoid(Conv) * 640, scores: Sigmoid(Conv)} -> Concat(axis 1) -> Transpose."""
    rng = np.random.default_rng(seed)
    inits = [
        nh.from_array((rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32), "W0"),
        nh.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "B0"),
        nh.from_array((rng.standard_normal((4, 16, 1, 1)) * 0.3).astype(np.float32), "WB"),
        nh.from_array((rng.standard_normal((CLASSES, 16, 1, 1)) * 0.5).astype(np.float32), "WS"),
        nh.from_array(np.array(640.0, np.float32), "scale640"),
        nh.from_array(np.array([0, 4, -1], np.int64), "shape_box"),
        nh.from_array(np.array([0, CLASSES, -1], np.int64), "shape_cls"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W0", "B0"], ["c0"], name="stem"),
        h.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
        h.make_node("Conv", ["r0", "WB"], ["cb"], name="box_conv"),
        h.make_node("Sigmoid", ["cb"], ["sb"], name="box_sigmoid"),
        h.make_node("Mul", ["sb", "scale640"], ["boxes_px"], name="box_scale"),
        h.make_node("Reshape", ["boxes_px", "shape_box"], ["boxes"], name="box_reshape"),
        h.make_node("Conv", ["r0", "WS"], ["cs"], name="cls_conv"),
        h.make_node("Sigmoid", ["cs"], ["ss"], name="cls_sigmoid"),
        h.make_node("Reshape", ["ss", "shape_cls"], ["scores"], name="cls_reshape"),
        h.make_node("Concat", ["boxes", "scores"], ["head"], name="head_concat", axis=1),
        h.make_node("Transpose", ["head"], ["output0"], name="head_transpose", perm=[0, 2, 1]),
    ]
    g = h.make_graph(
        nodes,
        "detector",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 16, 8, 8])],
        [h.make_tensor_value_info("output0", T.FLOAT, ["N", ANCHORS, 4 + CLASSES])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def one_scale_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's static quantizer on the head: one uint8 scale for the whole Concat output ([0, 640])."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    scale = 640.0 / 255.0
    m.graph.initializer.extend(
        [nh.from_array(np.array(scale, np.float32), "head_scale"), nh.from_array(np.array(0, np.uint8), "head_zp")]
    )
    for node in m.graph.node:
        if node.name == "head_transpose":
            node.input[0] = "head_dq"
    m.graph.node.extend(
        [
            h.make_node("QuantizeLinear", ["head", "head_scale", "head_zp"], ["head_q"], name="head_Q"),
            h.make_node("DequantizeLinear", ["head_q", "head_scale", "head_zp"], ["head_dq"], name="head_DQ"),
        ]
    )
    sorted_nodes = _toposort(m.graph)
    del m.graph.node[:]
    m.graph.node.extend(sorted_nodes)
    return m


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    pending, out = list(graph.node), []
    while pending:
        for node in pending:
            if all(n in known for n in node.input if n):
                out.append(node)
                known.update(node.output)
                pending.remove(node)
                break
    return out


def _feeds(seed: int, n: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("det")
    path = d / "det.onnx"
    onnx.save(detector(), str(path))
    return path


def test_one_scale_concat_fails_on_the_score_part(det: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    onnx.save(one_scale_quantized(onnx.load(str(det))), str(bad))
    feeds = [_feeds(1), _feeds(2)]
    report = compare(det, bad, feeds, ["cosine>=0.99"])
    out = report.outputs["output0"]
    assert out.cosine > 0.99  # the whole output hides it
    assert [p.tensor for p in out.parts] == ["boxes", "scores"]
    assert [p.slice for p in out.parts] == ["[:, :, 0:4]", "[:, :, 4:14]"]
    boxes, scores = out.parts
    assert boxes.passed and boxes.cosine > 0.99
    assert not scores.passed and scores.cosine < 0.5
    assert not report.passed and "part 1 (scores [:, :, 4:14])" in report.failures[0]
    d = report.to_dict()["outputs"]["output0"]["parts"][1]
    assert d["tensor"] == "scores" and d["slice"] == "[:, :, 4:14]" and d["passed"] is False
    assert d["cosine"] == pytest.approx(scores.cosine)
    # Switched off: the whole output alone passes.
    off = compare(det, bad, feeds, ["cosine>=0.99"], parts=False)
    assert off.passed and off.outputs["output0"].parts == []


def test_part_metrics_equal_a_manual_slice(det: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    bad = tmp_path / "bad.onnx"
    onnx.save(one_scale_quantized(onnx.load(str(det))), str(bad))
    feed = _feeds(3)
    a = ort.InferenceSession(str(det)).run(None, feed)[0]
    b = ort.InferenceSession(str(bad)).run(None, feed)[0]
    report = compare(det, bad, [feed], ["cosine>=0.99"])
    scores = report.outputs["output0"].parts[1]
    assert scores.max_abs == pytest.approx(float(np.abs(a[..., 4:] - b[..., 4:]).max()), rel=1e-6)
    assert scores.shape == [4, ANCHORS, CLASSES]


def test_our_int8_static_keeps_the_scores(det: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, **_feeds(10, 16))
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **_feeds(20, 8))
    try:
        r = oc.compress(
            det,
            tmp_path / "q.onnx",
            ["int8-static"],
            calibration=calib,
            feeds=oc.FeedOptions(inputs=inputs),
            tolerances=["cosine>=0.99"],
            force=True,
        )
    except ValidationFailed as exc:
        r = exc.report
    out = r.validation.outputs["output0"]
    assert [p.tensor for p in out.parts] == ["boxes", "scores"]
    assert out.parts[1].cosine >= 0.99, r.validation.failures
    assert r.validation.passed


def _concat_reshape_model(axis: int, shape: list[int]) -> onnx.ModelProto:
    nodes = [
        h.make_node("Relu", ["a"], ["ra"], name="ra"),
        h.make_node("Neg", ["b"], ["nb"], name="nb"),
        h.make_node("Concat", ["ra", "nb"], ["cat"], name="cat", axis=axis),
        h.make_node("Reshape", ["cat", "shp"], ["y"], name="flat"),
    ]
    g = h.make_graph(
        nodes,
        "cr",
        [h.make_tensor_value_info("a", T.FLOAT, [2, 3, 4]), h.make_tensor_value_info("b", T.FLOAT, [2, 3, 2])],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        [nh.from_array(np.array(shape, np.int64), "shp")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_parts_through_reshape_box_and_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feed = {
        "a": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "b": rng.standard_normal((2, 3, 2)).astype(np.float32),
    }
    # Concat on the last axis then flatten per sample: the parts interleave (a mask, same per sample).
    src = tmp_path / "m.onnx"
    onnx.save(_concat_reshape_model(2, [2, 18]), str(src))
    cand = tmp_path / "c.onnx"
    m = _concat_reshape_model(2, [2, 18])
    m.graph.node[1].op_type = "Identity"  # the b part changes sign, the a part is exact
    onnx.save(m, str(cand))
    out = compare(src, cand, [feed], ["cosine>=0.99"]).outputs["y"]
    assert [p.slice for p in out.parts] == ["mask of 24 elements", "mask of 12 elements"]
    assert out.parts[0].max_abs == 0 and out.parts[0].shape == [2, 12]
    assert out.parts[1].cosine == pytest.approx(-1.0)
    # The same model with parts contiguous after the reshape: boxes along axis 1.
    m2 = _concat_reshape_model(1, [2, 24])
    feed2 = {"a": feed["a"], "b": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    m2.graph.input[1].CopyFrom(h.make_tensor_value_info("b", T.FLOAT, [2, 3, 4]))
    onnx.save(m2, str(src))
    out = compare(src, src, [feed2], ["cosine>=0.99"]).outputs["y"]
    assert [p.slice for p in out.parts] == ["[:, 0:12]", "[:, 12:24]"]


def test_part_sizes_from_a_run_when_shape_inference_cannot_tell(tmp_path: Path) -> None:
    """The Concat input's shape depends on an input's values: the sizes come from one run of the original."""
    nodes = [
        h.make_node("Reshape", ["a", "s"], ["ra"], name="dyn_reshape"),
        h.make_node("Concat", ["ra", "b"], ["y"], name="cat", axis=1),
    ]
    g = h.make_graph(
        nodes,
        "dyn",
        [
            h.make_tensor_value_info("a", T.FLOAT, [2, 12]),
            h.make_tensor_value_info("s", T.INT64, [3]),
            h.make_tensor_value_info("b", T.FLOAT, [2, "k", 4]),
        ],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "dyn.onnx"
    onnx.save(m, str(src))
    rng = np.random.default_rng(0)
    feed = {
        "a": rng.standard_normal((2, 12)).astype(np.float32),
        "s": np.array([2, 3, 4], np.int64),
        "b": rng.standard_normal((2, 5, 4)).astype(np.float32),
    }
    out = compare(src, src, [feed], ["cosine>=0.99"]).outputs["y"]
    assert out.parts_note is None
    assert [(p.tensor, p.slice) for p in out.parts] == [("ra", "[:, 0:3, :]"), ("b", "[:, 3:8, :]")]
