"""int8-static: QDQ placement, range estimators, opsets, calibration errors, bundled models end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, conv_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress
from onnxcompress.cli import main
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.quantize.ranges import RangeCollector, kl_threshold, scale_zero_point
from onnxcompress.passes.quantize.static import Int8StaticConfig, Int8StaticPass, int8_static_config

MODELS = Path(__file__).resolve().parents[1] / "models"


def conv_relu_chain(opset: int = 17, clip: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv+Relu -> Conv+Relu(or Clip 0..6) -> MaxPool -> Flatten -> Gemm -> y[N,10]."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    b2 = (rng.standard_normal(16) * 0.1).astype(np.float32)
    wg = (rng.standard_normal((10, 16 * 4 * 4)) * 0.1).astype(np.float32)
    bg = (rng.standard_normal(10) * 0.1).astype(np.float32)
    act2 = (
        h.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip2")
        if clip
        else h.make_node("Relu", ["c2"], ["r2"], name="relu2")
    )
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        act2,
        h.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        h.make_node("Gemm", ["f", "WG", "BG"], ["y"], name="gemm", transB=1),
    ]
    inits = [nh.from_array(v, k) for k, v in {"W1": w1, "B1": b1, "W2": w2, "B2": b2, "WG": wg, "BG": bg}.items()]
    if clip:
        inits += [nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(6.0, np.float32), "hi")]
    g = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])],
        inits,
    )
    return _model(g, opset)


def _feeds(seed: int, n: int = 32, shape: tuple[int, ...] = (3, 8, 8), name: str = "x") -> dict[str, np.ndarray]:
    return {name: np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def _quantize(
    proto: onnx.ModelProto, tmp_path: Path, calib: list | None, **cfg: object
) -> tuple[Path, Path, onnxcompress.PassReport]:
    src = save(proto, tmp_path / "model.onnx")
    model = onnxcompress.load(src)
    report = Int8StaticPass(Int8StaticConfig(**cfg)).run(model, PassContext(calibration=calib))  # type: ignore[arg-type]
    out = tmp_path / "model.int8.onnx"
    onnxcompress.save(model, out)
    onnx.checker.check_model(str(out))
    return src, out, report


def _worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# ----------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("clip", [False, True])
def test_conv_relu_chain_one_qdq_per_boundary(tmp_path: Path, clip: bool) -> None:
    src, out, report = _quantize(conv_relu_chain(clip=clip), tmp_path, [_feeds(1)])
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    # Relu/Clip fused into the Q after each Conv; boundaries: x, r1, r2, p (MaxPool), f (Flatten) -> 5 pairs;
    # the final Gemm keeps a float output. DQ also for 3 weights and 3 int32 biases.
    assert ops["Relu"] == 0 and ops["Clip"] == 0, ops
    assert ops["QuantizeLinear"] == 5, ops
    assert ops["DequantizeLinear"] == 5 + 3 + 3, ops
    assert report.stats["activations_fused"] == 2 and report.stats["biases_int32"] == 3
    graph = onnx.load(str(out)).graph
    inits = {i.name: nh.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):  # every input of a quantized node comes from a DequantizeLinear
            assert all(producers[i].op_type == "DequantizeLinear" for i in node.input), node.name
        if node.op_type == "QuantizeLinear" and producers.get(node.input[0], None) is not None:
            if producers[node.input[0]].op_type == "Conv":  # fused Relu: zero point is uint8 0
                assert inits[node.input[2]].dtype == np.uint8 and int(inits[node.input[2]]) == 0
    # MaxPool/Flatten share their input's scale: no requantization.
    q_scales = {n.input[0]: float(inits[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert len({round(v, 12) for k, v in q_scales.items() if k.startswith(("r2", "p", "f"))}) == 1, q_scales
    held_out = _feeds(2)
    ref, got = run(src, held_out)[0], run(out, held_out)[0]
    assert _worst_cosine(got, ref) > 0.995


def test_residual_add_and_global_pool(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32)
    nodes = [
        h.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c", "x"], ["a"], name="add"),
        h.make_node("Relu", ["a"], ["r"], name="relu"),
        h.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    g = h.make_graph(
        nodes,
        "res",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 6, 6])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 1, 1])],
        [nh.from_array(w, "W")],
    )
    src, out, report = _quantize(_model(g), tmp_path, [_feeds(0, shape=(4, 6, 6))])
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["Relu"] == 0 and report.stats["ops"] == {"Conv": 1, "Add": 1}
    assert ops["QuantizeLinear"] == 4, ops  # x, c, r (Add+Relu), y (the pool's own scale)
    feed = _feeds(5, shape=(4, 6, 6))
    assert _worst_cosine(run(out, feed)[0], run(src, feed)[0]) > 0.995


def test_constant_node_weights_and_exclude(tmp_path: Path) -> None:
    calib = [_feeds(0, shape=(3, 6, 6))]
    src, out, report = _quantize(conv_model(constant_nodes=True), tmp_path, calib)
    assert report.stats["ops"].get("Conv") == 1 and report.stats["ops"].get("Gemm") == 1
    feed = _feeds(9, shape=(3, 6, 6))
    assert _worst_cosine(run(out, feed)[0], run(src, feed)[0]) > 0.99
    model = onnxcompress.load(src)
    ctx = PassContext(calibration=calib, exclude=("conv1",))
    report = Int8StaticPass().run(model, ctx)
    assert ("conv1", "excluded by configuration") in report.skipped
    assert "Conv" not in report.stats["ops"]


def test_opset11_uses_per_tensor_weights(tmp_path: Path) -> None:
    src, out, report = _quantize(conv_relu_chain(opset=11), tmp_path, [_feeds(1)])
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == 11
    graph = proto.graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(not n.attribute for n in dq)  # no axis attribute below opset 13
    assert all(lay["scheme"] == "int8 per-tensor" for lay in report.stats["layers"])
    feed = _feeds(2)
    assert _worst_cosine(run(out, feed)[0], run(src, feed)[0]) > 0.99


def test_symmetric_activations(tmp_path: Path) -> None:
    src, out, _ = _quantize(conv_relu_chain(), tmp_path, [_feeds(1)], activation_symmetric=True)
    graph = onnx.load(str(out)).graph
    inits = {i.name: nh.to_array(i) for i in graph.initializer}
    zps = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    feed = _feeds(2)
    assert _worst_cosine(run(out, feed)[0], run(src, feed)[0]) > 0.99


# ------------------------------------------------------------------------------------------- errors


def test_missing_calibration_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxCompressError, match="calibration"):
        _quantize(conv_relu_chain(), tmp_path, None)


def test_already_quantized_is_refused(tmp_path: Path) -> None:
    _, out, _ = _quantize(conv_relu_chain(), tmp_path, [_feeds(1)])
    with pytest.raises(OnnxCompressError, match="already quantized"):
        Int8StaticPass().run(onnxcompress.load(out), PassContext(calibration=[_feeds(1)]))


def test_params() -> None:
    cfg = int8_static_config(Params({"method": "mse", "activation_symmetric": "true", "percentile": "99.9"}))
    assert (cfg.method, cfg.activation_symmetric, cfg.percentile) == ("mse", True, 99.9)
    with pytest.raises(OnnxCompressError):
        int8_static_config(Params({"method": "kmeans"}))


# ------------------------------------------------------------------------------------------- ranges


def test_ranges_on_known_distributions() -> None:
    rng = np.random.default_rng(0)
    gauss = RangeCollector()
    for scale in (1.0, 2.0, 4.0):  # widening batches double the bin width on the way
        gauss.update(rng.standard_normal(200_000) * scale)
    assert gauss.hist.sum() == gauss.count == 600_000
    lo, hi = gauss.range("minmax")
    assert (lo, hi) == (gauss.min, gauss.max)
    plo, phi = gauss.range("percentile", percentile=99.0)
    assert 0.9 * 2.576 * 2.6 < phi < 1.1 * 2.576 * 3.4 and plo < 0  # mixture's 99th percentile
    assert gauss.range("percentile", symmetric=True)[0] == -gauss.range("percentile", symmetric=True)[1]
    for method in ("entropy", "mse"):
        mlo, mhi = gauss.range(method)
        assert lo <= mlo < 0 < mhi <= hi and mhi < 0.95 * hi, method  # clips the long tails
    uniform = RangeCollector()
    uniform.update(rng.uniform(0, 1, 500_000))
    assert uniform.range("mse")[1] > 0.97  # nothing to gain from clipping a uniform distribution
    assert uniform.range("percentile", percentile=99.0)[1] == pytest.approx(0.99, abs=0.002)
    # KL on a half-normal |x| histogram over [0, 10) with one far outlier clips the outlier.
    hist, _ = np.histogram(np.abs(rng.standard_normal(1_000_000)), bins=2048, range=(0, 10))
    hist[1950] += 1
    assert 3.0 < kl_threshold(hist.astype(np.float64), 10 / 2048) < 6.0


def test_scale_zero_point() -> None:
    s, z = scale_zero_point(-1.0, 3.0, symmetric=False)
    assert s == np.float32(4.0 / 255) and z == 64
    assert scale_zero_point(0.0, 2.55, symmetric=False)[1] == 0
    s, z = scale_zero_point(-1.0, 2.54, symmetric=True)
    assert s == np.float32(2.54 / 127) and z == 0
    assert scale_zero_point(0.0, 0.0, symmetric=False) == (1.0, 0)


# ------------------------------------------------------------------------------------- bundled models


@pytest.mark.parametrize("stem", ["digits_cnn", "digits_keras"])
def test_bundled_digits_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path, stem: str) -> None:
    out, rep = tmp_path / f"{stem}.onnx", tmp_path / "report.json"
    code = main(["compress", str(MODELS / f"{stem}.onnx"), "-o", str(out), "-q", "int8-static", "--report", str(rep)])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["calibration"].endswith(f"{stem}.calibration.npz")
    feed = dict(np.load(MODELS / f"{stem}.inputs.npz"))
    labels = np.load(MODELS / f"{stem}.labels.npy")
    ref, got = run(MODELS / f"{stem}.onnx", feed)[0], run(out, feed)[0]
    assert abs(np.mean(ref.argmax(1) == labels) - np.mean(got.argmax(1) == labels)) <= 0.005
    assert _worst_cosine(got, ref) > 0.999
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["Relu"] == 0 and ops["QuantizeLinear"] > 0


def test_tiny_transformer_stays_valid(tmp_path: Path) -> None:
    src = MODELS / "tiny_transformer.onnx"
    out = tmp_path / "t.onnx"
    report = onnxcompress.compress(src, out, ["int8-static"], force=True)
    assert report.validation is not None and report.validation.passed
    assert any("activations" in reason for _, reason in report.passes[-1].skipped)  # attention MatMuls float


def test_cli_bad_calibration_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = MODELS / "digits_cnn.onnx"
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 1, 8, 8), np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, input=np.zeros((2, 1, 8, 8), np.int64))
    for calib in (bad, empty, wrong_dtype):
        code = main(
            ["compress", str(src), "-o", str(tmp_path / "o.onnx"), "-q", "int8-static", "--calibration", str(calib)]
        )
        assert code == 2, capsys.readouterr().err
        capsys.readouterr()
