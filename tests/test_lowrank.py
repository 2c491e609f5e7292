"""Low-rank factorisation: rank choice, the saving rule, error bound, data-aware SVD, Gemm/Conv forms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, conv_model, if_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.structural import LowRankConfig, LowRankPass, lowrank_config
from onnxcompress.passes.structural import _lstsq as L


def _lowrank_weight(k: int, n: int, r: int, seed: int, noise: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) + noise * rng.standard_normal((k, n))).astype(
        np.float32
    )


def _mlp(k: int = 64, n: int = 48, r: int = 8, gemm: bool = False) -> onnx.ModelProto:
    w = _lowrank_weight(k, n, r, 0)
    b = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    if gemm:
        nodes = [h.make_node("Gemm", ["x", "W", "b"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)]
        inits = [nh.from_array(np.ascontiguousarray(w.T), "W"), nh.from_array(b, "b")]
        x = h.make_tensor_value_info("x", T.FLOAT, ["N", k])
        y = h.make_tensor_value_info("y", T.FLOAT, ["N", n])
    else:
        nodes = [h.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), h.make_node("Add", ["mm", "b"], ["y"], name="a")]
        inits = [nh.from_array(w, "W"), nh.from_array(b, "b")]
        x = h.make_tensor_value_info("x", T.FLOAT, ["N", 3, k])
        y = h.make_tensor_value_info("y", T.FLOAT, ["N", 3, n])
    return _model(h.make_graph(nodes, "mlp", [x], [y], inits))


def _run_pass(src: onnx.ModelProto, tmp: Path, ctx: PassContext | None = None, **cfg: object):
    path = save(src, tmp / "in.onnx")
    model = oc.load(path)
    report = LowRankPass(LowRankConfig(**cfg)).run(model, ctx or PassContext())  # type: ignore[arg-type]
    out = tmp / "out.onnx"
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return path, out, report


def test_energy_rank_and_error_bound(tmp_path: Path) -> None:
    src, out, report = _run_pass(_mlp(), tmp_path, energy=0.99)
    (layer,) = report.stats["layers"]
    assert layer["rank"] == 8
    assert report.stats["params_after"] == 8 * (64 + 48)
    x = np.random.default_rng(2).standard_normal((5, 3, 64)).astype(np.float32)
    ref, got = run(src, {"x": x})[0], run(out, {"x": x})[0]
    # ||x (W - W')|| <= ||x|| * s_{r+1} (spectral norm of the discarded part)
    s = np.linalg.svd(_lowrank_weight(64, 48, 8, 0), compute_uv=False)
    bound = np.linalg.norm(x.reshape(-1, 64), axis=1) * s[8] * 1.001 + 1e-4
    assert np.all(np.linalg.norm((got - ref).reshape(-1, 48), axis=1) <= np.repeat(bound, 1))
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["MatMul"] == 2


def test_skips_when_no_saving(tmp_path: Path) -> None:
    _, _, report = _run_pass(_mlp(), tmp_path, energy=1.0)
    assert not report.modified
    assert "no saving" in dict(report.skipped)["W"]


def test_ratio_and_fixed_rank(tmp_path: Path) -> None:
    _, _, report = _run_pass(_mlp(), tmp_path, ratio=0.5)
    assert report.stats["layers"][0]["rank"] == int(0.5 * 64 * 48 / (64 + 48))
    (tmp_path / "r").mkdir()
    _, _, report = _run_pass(_mlp(), tmp_path / "r", rank=3)
    assert report.stats["layers"][0]["rank"] == 3


def test_gemm_keeps_alpha_beta_and_bias(tmp_path: Path) -> None:
    src, out, report = _run_pass(_mlp(gemm=True), tmp_path, rank=8)
    assert report.modified
    x = np.random.default_rng(3).standard_normal((7, 64)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(src, {"x": x})[0], atol=0.05 * 8, rtol=0.02)


def test_conv_1x1_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = _lowrank_weight(32, 24, 4, 5).T.reshape(24, 32, 1, 1)
    nodes = [h.make_node("Conv", ["x", "W", "B"], ["y"], name="c", pads=[1, 1, 1, 1], strides=[2, 2])]
    g = h.make_graph(
        nodes,
        "c",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 32, 5, 5])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 24, 4, 4])],
        [nh.from_array(w, "W"), nh.from_array(rng.standard_normal(24).astype(np.float32), "B")],
    )
    src, out, report = _run_pass(_model(g), tmp_path, rank=4)
    assert report.modified
    x = rng.standard_normal((2, 32, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(src, {"x": x})[0], atol=0.2)
    (tmp_path / "c").mkdir()
    _, _, report = _run_pass(conv_model(), tmp_path / "c", rank=1)
    assert "only 1x1" in dict(report.skipped)["W1"]


def test_data_aware_beats_plain_at_equal_rank(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    k, n = 64, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    mix = rng.standard_normal((k, k)) / 8
    scale = np.geomspace(0.01, 5, k)
    x = ((rng.standard_normal((512, k)) @ mix) * scale).astype(np.float32)
    hess = (x.T @ x).astype(np.float64)
    rows = w.T
    errors = []
    for weighted in (False, True):
        u, s, vt, inv = L.weighted_svd(rows, hess if weighted else None)
        approx = (u[:, :8] * s[:8]) @ vt[:8]
        if inv is not None:
            approx = approx @ inv
        errors.append(L.output_error(x, rows, approx.astype(np.float32)))
    assert errors[1] < 0.8 * errors[0]
    # through the pass: calibration switches the method
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    g = h.make_graph(
        nodes, "m", [h.make_tensor_value_info("x", T.FLOAT, ["N", k])], [h.make_tensor_value_info("y", T.FLOAT, ["N", n])],
        [nh.from_array(w, "W")],
    )  # fmt: skip
    m = _model(g)
    src, plain, _ = _run_pass(m, tmp_path, rank=8)
    (tmp_path / "d").mkdir()
    _, data, report = _run_pass(m, tmp_path / "d", PassContext(calibration=[{"x": x[:256]}]), rank=8)
    assert report.stats["method"] == "data"
    test = {"x": x[256:]}
    ref = run(src, test)[0]
    assert np.linalg.norm(run(data, test)[0] - ref) < 0.9 * np.linalg.norm(run(plain, test)[0] - ref)


def test_subgraph_weight_shared_factors(tmp_path: Path) -> None:
    src, out, report = _run_pass(if_model(shared=True), tmp_path, rank=2)
    assert report.stats["tensors_changed"] == 1 and report.stats["nodes_factorised"] == 2
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        assert run(out, feed)[0].shape == run(src, feed)[0].shape


@pytest.mark.parametrize(
    ("params", "msg"),
    [
        ({"lowrank_rank": "0"}, "lowrank_rank"),
        ({"lowrank_rank": "-3"}, "lowrank_rank"),
        ({"lowrank_ratio": "1.5"}, "lowrank_ratio"),
        ({"lowrank_energy": "0"}, "lowrank_energy"),
    ],
)
def test_bad_params(params: dict[str, str], msg: str) -> None:
    with pytest.raises(OnnxCompressError, match=msg):
        lowrank_config(Params(params))
