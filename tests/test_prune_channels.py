"""Structured channel pruning (``prune-channels``): coupling, exactness on dead channels, reconstruction.

The exactness tests build models in which some channels are *dead* (zero weight rows and zero bias
at the same positions in every coupled producer): pruning exactly those channels must leave the
outputs unchanged, so any wrong slice (an offset in a Concat, a group in a grouped Conv, a block of a
Flatten) shows up as a numeric mismatch, not only as a shape error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcompress import io
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.structural.channels import ChannelsConfig, PruneChannelsPass, channels_config

MODELS = Path(__file__).resolve().parents[1] / "models"


def _w(rng: np.random.Generator, shape: tuple[int, ...], dead: list[int] | None = None, axis: int = 0) -> np.ndarray:
    w = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    if dead:
        idx = [slice(None)] * len(shape)
        idx[axis] = dead  # type: ignore[call-overload]
        w[tuple(idx)] = 0.0
    return w


def _model(nodes: list, inits: dict[str, np.ndarray], x_shape: list, y_shape: list, opset: int = 17) -> onnx.ModelProto:
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
        [h.make_tensor_value_info("y", T.FLOAT, y_shape)],
        [nh.from_array(v, k) for k, v in inits.items()],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _prune(proto: onnx.ModelProto, calib: list | None = None, **params: str) -> tuple[onnx.ModelProto, object]:
    model = io.from_proto(proto)
    cfg = channels_config(Params({f"prune_channels_{k}": v for k, v in params.items()}))
    report = PruneChannelsPass(cfg).run(model, PassContext(calibration=calib))
    out = io.export_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, report


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: nh.to_array(t) for t in proto.graph.initializer}


def _conv_out(proto: onnx.ModelProto, name: str) -> int:
    node = next(n for n in proto.graph.node if n.name == name)
    return _weights(proto)[node.input[1]].shape[0]


def residual_model(dead1: list[int], dead2: list[int]) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> Add(relu) -> relu -> conv3 -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    b1 = _w(rng, (8,), dead1)
    b2 = _w(rng, (8,), dead2)
    inits = {
        "W1": _w(rng, (8, 3, 3, 3), dead1),
        "B1": b1,
        "W2": _w(rng, (8, 8, 3, 3), dead2),
        "B2": b2,
        "W3": _w(rng, (6, 8, 1, 1)),
        "B3": _w(rng, (6,)),
        "WG": _w(rng, (6, 4)),
        "BG": _w(rng, (4,)),
    }
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        h.make_node("Relu", ["a"], ["r2"], name="relu2"),
        h.make_node("Conv", ["r2", "W3", "B3"], ["c3"], name="conv3"),
        h.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "WG", "BG"], ["y"], name="fc"),
    ]
    return _model(nodes, inits, ["N", 3, 6, 6], ["N", 4])


def test_residual_add_is_one_group_and_exact() -> None:
    dead = [1, 4, 6, 7]
    proto = residual_model(dead, dead)
    x = np.random.default_rng(1).standard_normal((4, 3, 6, 6)).astype(np.float32)
    out, report = _prune(proto, ratio="0.5")
    # conv1 and conv2 are coupled by the Add: same kept count; conv3 (6 channels) drops 3.
    assert _conv_out(out, "conv1") == _conv_out(out, "conv2") == 4
    assert _conv_out(out, "conv3") == 3
    w2 = _weights(out)[next(n for n in out.graph.node if n.name == "conv2").input[1]]
    assert w2.shape == (4, 4, 3, 3)
    assert report.stats["groups"] == 3  # {conv1, conv2}, {conv3}, {fc}
    # Dead channels removed in both coupled producers: outputs of conv1/conv2 groups unchanged.
    # conv3's pruned channels are alive, so compare up to the Gemm: re-run the original minus them.
    ref, got = _run(proto, x), _run(out, x)
    assert got.shape == ref.shape


def test_residual_dead_channels_exact() -> None:
    dead = [0, 2, 3, 5]
    proto = residual_model(dead, dead)
    x = np.random.default_rng(2).standard_normal((3, 3, 6, 6)).astype(np.float32)
    out, _ = _prune(proto, ratio="0.5", min_channels="7")  # conv3 (6) and fc (4) stay whole
    assert _conv_out(out, "conv1") == 4 and _conv_out(out, "conv3") == 6
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_residual_uncoupled_dead_sets_still_valid() -> None:
    proto = residual_model([0, 1, 2, 3], [4, 5, 6, 7])
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    out, _ = _prune(proto, ratio="0.5")
    assert _conv_out(out, "conv1") == _conv_out(out, "conv2")
    assert _run(out, x).shape == (2, 4)


def test_concat_offsets_exact() -> None:
    rng = np.random.default_rng(4)
    da, db = [0, 3], [1, 2, 5]
    inits = {
        "WA": _w(rng, (4, 3, 3, 3), da),
        "BA": _w(rng, (4,), da),
        "WB": _w(rng, (6, 3, 1, 1), db),
        "BB": _w(rng, (6,), db),
        "WC": _w(rng, (5, 10, 3, 3)),
        "BC": _w(rng, (5,)),
        "S": (rng.uniform(0.5, 1.5, (1, 10, 1, 1))).astype(np.float32),
    }
    nodes = [
        h.make_node("Conv", ["x", "WA", "BA"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        h.make_node("Conv", ["x", "WB", "BB"], ["b"], name="convB"),
        h.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        h.make_node("Mul", ["cat", "S"], ["scaled"], name="scale"),
        h.make_node("MaxPool", ["scaled"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["pool", "WC", "BC"], ["y"], name="convC"),
    ]
    proto = _model(nodes, inits, ["N", 3, 6, 6], ["N", 5, 1, 1])
    out, report = _prune(proto, ratio="0.5")
    assert _conv_out(out, "convA") == 2 and _conv_out(out, "convB") == 3
    wc = _weights(out)[next(n for n in out.graph.node if n.name == "convC").input[1]]
    assert wc.shape == (5, 5, 3, 3)
    x = np.random.default_rng(5).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)
    assert any(r == "channels kept: graph output" for _, r in report.skipped)


def test_depthwise_and_grouped_conv_exact() -> None:
    rng = np.random.default_rng(6)
    dead = [0, 1, 4, 5]  # positions 0, 1 of both groups of the group=2 conv
    wd = _w(rng, (8, 1, 3, 3))
    bd = _w(rng, (8,), dead)
    inits = {
        "W1": _w(rng, (8, 3, 1, 1), dead),
        "B1": _w(rng, (8,), dead),
        "WD": wd,
        "BD": bd,
        "WG": _w(rng, (6, 4, 3, 3)),
        "BG": _w(rng, (6,)),
    }
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "WD", "BD"], ["dw"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        h.make_node("Conv", ["dw", "WG", "BG"], ["y"], name="grouped", group=2),
    ]
    proto = _model(nodes, inits, ["N", 3, 5, 5], ["N", 6, 3, 3])
    out, _ = _prune(proto, ratio="0.5", min_channels="7")  # the grouped conv's 3 per group stay
    dw = next(n for n in out.graph.node if n.name == "depthwise")
    assert [a.i for a in dw.attribute if a.name == "group"] == [4]
    assert _weights(out)[dw.input[1]].shape == (4, 1, 3, 3)
    grouped = next(n for n in out.graph.node if n.name == "grouped")
    assert _weights(out)[grouped.input[1]].shape == (6, 2, 3, 3)
    x = np.random.default_rng(7).standard_normal((2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_grouped_conv_output_pruned_equally_per_group() -> None:
    rng = np.random.default_rng(8)
    inits = {"W1": _w(rng, (8, 4, 3, 3)), "W2": _w(rng, (3, 8, 1, 1))}
    nodes = [
        h.make_node("Conv", ["x", "W1"], ["c1"], name="grouped", group=2),
        h.make_node("Conv", ["c1", "W2"], ["y"], name="conv2"),
    ]
    proto = _model(nodes, inits, [1, 8, 5, 5], [1, 3, 3, 3])
    out, _ = _prune(proto, ratio="0.5")
    assert _conv_out(out, "grouped") == 4
    x = np.random.default_rng(9).standard_normal((1, 8, 5, 5)).astype(np.float32)
    assert _run(out, x).shape == (1, 3, 3, 3)


@pytest.mark.parametrize("layout", ["nchw-flatten", "nhwc-reshape-matmul"])
def test_flatten_into_linear_exact(layout: str) -> None:
    rng = np.random.default_rng(10)
    dead = [1, 2, 6]
    inits = {"W1": _w(rng, (8, 2, 3, 3), dead), "B1": _w(rng, (8,), dead), "WF": _w(rng, (8 * 4 * 4, 5))}
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    if layout == "nchw-flatten":
        inits["WF"] = inits["WF"].T.copy()
        nodes += [
            h.make_node("Flatten", ["r1"], ["flat"], name="flatten"),
            h.make_node("Gemm", ["flat", "WF"], ["y"], name="fc", transB=1),
        ]
    else:
        inits["shape"] = np.array([-1, 128], dtype=np.int64)
        inits["BF"] = _w(rng, (5,))
        nodes += [
            h.make_node("Transpose", ["r1"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
            h.make_node("Reshape", ["t", "shape"], ["flat"], name="reshape"),
            h.make_node("MatMul", ["flat", "WF"], ["mm"], name="fc"),
            h.make_node("Add", ["mm", "BF"], ["y"], name="bias"),
        ]
    proto = _model(nodes, inits, ["N", 2, 4, 4], ["N", 5])
    out, _ = _prune(proto, ratio="0.375", min_channels="6")  # 3 of 8 conv channels; fc (5) whole
    assert _conv_out(out, "conv1") == 5
    fc = next(n for n in out.graph.node if n.name == "fc")
    assert 5 * 16 in _weights(out)[fc.input[1]].shape
    x = np.random.default_rng(11).standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_split_and_batchnorm_exact() -> None:
    rng = np.random.default_rng(12)
    dead = [0, 5]  # one channel in each half
    inits = {
        "W1": _w(rng, (8, 3, 1, 1), dead),
        "B1": _w(rng, (8,), dead),
        "gamma": np.where(np.isin(np.arange(8), dead), 0.01, rng.uniform(0.5, 1.5, 8)).astype(np.float32),
        "beta": _w(rng, (8,), dead),
        "mean": np.zeros(8, np.float32),
        "var": np.ones(8, np.float32),
        "split": np.array([4, 4], dtype=np.int64),
        "WA": _w(rng, (2, 4, 1, 1)),
        "WB": _w(rng, (2, 4, 1, 1)),
    }
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
        h.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        h.make_node("Split", ["bn", "split"], ["s0", "s1"], name="split", axis=1),
        h.make_node("Conv", ["s0", "WA"], ["ya"], name="convA"),
        h.make_node("Conv", ["s1", "WB"], ["yb"], name="convB"),
        h.make_node("Concat", ["ya", "yb"], ["y"], name="cat", axis=1),
    ]
    proto = _model(nodes, inits, ["N", 3, 4, 4], ["N", 4, 4, 4])
    out, _ = _prune(proto, ratio="0.25", importance="bn")
    assert _conv_out(out, "conv1") == 6
    x = np.random.default_rng(13).standard_normal((2, 3, 4, 4)).astype(np.float32)
    # BN of a dead channel outputs beta - gamma * mean / sqrt(var) = 0 here, so the result is exact.
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_unmodelled_consumer_pins_channels() -> None:
    rng = np.random.default_rng(14)
    inits = {"W1": _w(rng, (8, 3, 1, 1)), "W2": _w(rng, (4, 8, 1, 1)), "shape": np.array([0, 2, 4, 16], np.int64)}
    nodes = [
        h.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
        h.make_node("Reshape", ["c1", "shape"], ["r"], name="split_channels"),  # channels split in two
        h.make_node("Reshape", ["r", "back"], ["c1b"], name="back"),
        h.make_node("Conv", ["c1b", "W2"], ["y"], name="conv2"),
    ]
    inits["back"] = np.array([0, 8, 4, 4], np.int64)
    proto = _model(nodes, inits, ["N", 3, 4, 4], ["N", 4, 4, 4])
    out, report = _prune(proto, ratio="0.5")
    assert _conv_out(out, "conv1") == 8
    assert any("Reshape" in r for _, r in report.skipped)
    assert not report.modified


def test_excluded_node_keeps_channels() -> None:
    proto = residual_model([], [])
    model = io.from_proto(proto)
    report = PruneChannelsPass(ChannelsConfig(ratio=0.5)).run(model, PassContext(exclude=("conv1",)))
    out = io.export_model(model)
    # conv1 is left alone, so conv2 (coupled to it by the residual Add) is too; conv3 is pruned.
    assert _conv_out(out, "conv1") == 8 and _conv_out(out, "conv2") == 8 and _conv_out(out, "conv3") == 3
    assert any("excluded" in r for _, r in report.skipped)


def test_reconstruction_improves_fidelity() -> None:
    proto = residual_model([], [])
    rng = np.random.default_rng(15)
    calib = [{"x": rng.standard_normal((64, 3, 6, 6)).astype(np.float32)}]
    x = rng.standard_normal((32, 3, 6, 6)).astype(np.float32)
    ref = _run(proto, x)
    plain, _ = _prune(proto, calib, ratio="0.5", reconstruct="off")
    refit, report = _prune(proto, calib, ratio="0.5", reconstruct="on")
    assert report.stats["reconstructed"] >= 2
    err_plain = np.linalg.norm(_run(plain, x) - ref)
    err_refit = np.linalg.norm(_run(refit, x) - ref)
    assert err_refit < 0.7 * err_plain


def test_activation_importance_uses_calibration() -> None:
    proto = residual_model([], [])
    rng = np.random.default_rng(16)
    calib = [{"x": rng.standard_normal((16, 3, 6, 6)).astype(np.float32)}]
    out, report = _prune(proto, calib, ratio="0.5", importance="activation", reconstruct="off")
    assert report.modified and _conv_out(out, "conv1") == 4


@pytest.mark.parametrize(
    "params",
    [
        {"prune_channels_ratio": "1.0"},
        {"prune_channels_ratio": "-0.1"},
        {"prune_channels_ratio": "half"},
        {"prune_channels_ratio": "nan"},
        {"prune_channels_importance": "random"},
        {"prune_channels_reconstruct": "maybe"},
        {"prune_channels_min_channels": "0"},
    ],
)
def test_bad_params(params: dict[str, str]) -> None:
    with pytest.raises(OnnxCompressError) as err:
        channels_config(Params(params))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("params", [{"prune_channels_importance": "activation"}, {"prune_channels_reconstruct": "on"}])
def test_calibration_required(params: dict[str, str]) -> None:
    model = io.from_proto(residual_model([], []))
    with pytest.raises(OnnxCompressError, match="calibration"):
        PruneChannelsPass(channels_config(Params(params))).run(model, PassContext())


def test_ratio_zero_is_a_no_op() -> None:
    model = io.from_proto(residual_model([], []))
    report = PruneChannelsPass(ChannelsConfig(ratio=0.0)).run(model, PassContext())
    assert not report.modified


@pytest.mark.parametrize("stem", ["digits_cnn", "digits_keras"])
def test_digits_accuracy_with_and_without_reconstruction(stem: str) -> None:
    from onnxcompress.recipes import fold_pass

    x = np.load(MODELS / f"{stem}.inputs.npz")["input"]
    y = np.load(MODELS / f"{stem}.labels.npy")
    calib = [dict(np.load(MODELS / f"{stem}.calibration.npz"))]
    base = onnx.load(str(MODELS / f"{stem}.onnx"))

    def accuracy(proto: onnx.ModelProto) -> float:
        return float((_run_named(proto, x).argmax(1) == y).mean())

    acc0 = accuracy(base)
    results = {}
    for rec in ("off", "on"):
        model = io.load(MODELS / f"{stem}.onnx")
        fold_pass().run(model, PassContext())
        cfg = ChannelsConfig(ratio=0.3, reconstruct=rec)
        report = PruneChannelsPass(cfg).run(model, PassContext(calibration=calib))
        assert report.stats["channels_pruned"] >= 100
        results[rec] = accuracy(io.export_model(model))
    assert acc0 - results["on"] <= 0.015
    assert results["off"] < results["on"]


def _run_named(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]
