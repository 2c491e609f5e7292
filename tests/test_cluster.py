"""Weight clustering: k-means maths, 4-bit packing, per-channel codebooks, zeros kept, uniform grids, forms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import conv_model, embedding_model, if_model, matmul_model, run, save
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.structural import ClusterConfig, ClusterPass, cluster_config
from onnxcompress.passes.structural.cluster import kmeans


def _cluster(src: onnx.ModelProto, tmp: Path, ctx: PassContext | None = None, **cfg: object):
    path = save(src, tmp / "in.onnx")
    model = oc.load(path)
    report = ClusterPass(ClusterConfig(**cfg)).run(model, ctx or PassContext())  # type: ignore[arg-type]
    out = tmp / "out.onnx"
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return path, out, report


def test_kmeans_nearest_assignment_and_values() -> None:
    x = np.random.default_rng(0).standard_normal((3, 5000)).astype(np.float32)
    cb, idx = kmeans(x, 16, iterations=30)
    assert cb.shape == (3, 16) and np.all(np.diff(cb, axis=1) >= 0)
    rec = np.take_along_axis(cb, idx, axis=1)
    # every value is at its nearest centroid
    dist = np.abs(x[:, :, None] - cb[:, None, :])
    np.testing.assert_allclose(np.abs(x - rec), dist.min(-1), atol=1e-6)
    # Lloyd-Max for a Gaussian at 16 levels: relative MSE ~ 0.0095
    assert np.mean((x - rec) ** 2) / np.mean(x**2) < 0.012


def test_kmeans_exact_on_few_distinct_values_and_pinned_zero() -> None:
    rng = np.random.default_rng(1)
    levels = np.array([-1.5, -0.25, 0.5, 2.0], np.float32)
    x = levels[rng.integers(0, 4, (1, 4000))]
    cb, idx = kmeans(x, 4)
    np.testing.assert_array_equal(np.take_along_axis(cb, idx, axis=1), x)
    y = rng.standard_normal((2, 3000)).astype(np.float32)
    y[:, ::2] = 0
    cb, idx = kmeans(y, 8, pin_zero=True)
    rec = np.take_along_axis(cb, idx, axis=1)
    assert np.all(rec[y == 0] == 0) and np.any(cb == 0, axis=1).all()


@pytest.mark.parametrize("k", [16, 256])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matmul_model_outputs(tmp_path: Path, k: int, per_channel: bool) -> None:
    src, out, report = _cluster(matmul_model(k=64, n=32), tmp_path, k=k, per_channel=per_channel, min_elements=1)
    assert report.stats["tensors_changed"] == 2
    form = report.stats["layers"][0]["form"]
    assert form.startswith("gather-4bit" if k <= 16 else "gather-uint8")
    x = np.random.default_rng(2).standard_normal((3, 4, 64)).astype(np.float32)
    ref, got = run(src, {"x": x})[0], run(out, {"x": x})[0]
    cos = np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)
    assert cos > (0.99 if k == 16 else 0.9999)
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["Gather"] == 2 and all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out)).graph.node)
    if k <= 16:
        # 4-bit: half a byte per weight plus the codebook
        layer = next(la for la in report.stats["layers"] if la["tensor"] == "W")
        assert layer["bytes_after"] <= 64 * 32 // 2 + 4 * 16 * (32 if per_channel else 1)


def test_odd_size_slice_and_old_opset(tmp_path: Path) -> None:
    src, out, report = _cluster(matmul_model(k=63, n=33, opset=11), tmp_path, k=16, min_elements=1)
    assert report.modified
    x = np.random.default_rng(3).standard_normal((2, 4, 63)).astype(np.float32)
    ref, got = run(src, {"x": x})[0], run(out, {"x": x})[0]
    assert np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got) > 0.99


def test_uniform_codebook_uses_affine_form(tmp_path: Path) -> None:
    m = matmul_model(k=64, n=32)
    rng = np.random.default_rng(0)
    grid = ((rng.integers(0, 256, (64, 32)) - 128) * 0.01).astype(np.float32)
    for init in m.graph.initializer:
        if init.name == "W":
            init.CopyFrom(nh.from_array(grid, "W"))
    src, out, report = _cluster(m, tmp_path, PassContext(exclude=("mm2",)), k=256)
    forms = {la["tensor"]: la["form"] for la in report.stats["layers"]}
    assert forms == {"W": "affine"}
    assert "Gather" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    x = rng.standard_normal((2, 4, 64)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(src, {"x": x})[0], rtol=1e-5, atol=1e-4)


def test_conv_constant_nodes_embeddings_subgraphs(tmp_path: Path) -> None:
    src, out, report = _cluster(conv_model(constant_nodes=True), tmp_path, k=16, min_elements=1, per_channel=True)
    assert report.stats["tensors_changed"] == 3  # Conv, ConvTranspose, Gemm weights; biases stay
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ref, got = run(src, {"x": x})[0], run(out, {"x": x})[0]
    assert np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got) > 0.99
    (tmp_path / "e").mkdir()
    src, out, report = _cluster(embedding_model(), tmp_path / "e", k=256)
    assert report.modified
    (tmp_path / "i").mkdir()
    src, out, report = _cluster(if_model(shared=True), tmp_path / "i", k=256)
    assert report.stats["tensors_changed"] == 1
    xi = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": xi}
        np.testing.assert_allclose(run(out, feed)[0], run(src, feed)[0], atol=0.05)


def test_data_aware_gptq_codebook_beats_kmeans(tmp_path: Path) -> None:
    m = matmul_model(m=4, k=64, n=32)
    rng = np.random.default_rng(6)
    mix = rng.standard_normal((64, 64)) / 8
    xs = ((rng.standard_normal((96, 4, 64)) @ mix) * np.geomspace(0.05, 4, 64)).astype(np.float32)
    src, plain, _ = _cluster(m, tmp_path, k=4, method="kmeans", per_channel=True, min_elements=1)
    (tmp_path / "d").mkdir()
    _, data, report = _cluster(
        m, tmp_path / "d", PassContext(calibration=[{"x": xs[:64]}]), k=4, per_channel=True, min_elements=1
    )
    assert report.stats["method"] == "gptq"
    test = {"x": xs[64:]}
    ref = run(src, test)[0]
    assert np.linalg.norm(run(data, test)[0] - ref) < np.linalg.norm(run(plain, test)[0] - ref)


def test_deterministic(tmp_path: Path) -> None:
    _, a, _ = _cluster(matmul_model(), tmp_path, k=16, min_elements=1)
    (tmp_path / "b").mkdir()
    _, b, _ = _cluster(matmul_model(), tmp_path / "b", k=16, min_elements=1)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(("params", "msg"), [({"cluster_k": "1"}, "cluster_k"), ({"cluster_k": "257"}, "cluster_k")])
def test_bad_k(params: dict[str, str], msg: str) -> None:
    with pytest.raises(OnnxCompressError, match=msg):
        cluster_config(Params(params))


def test_budget_upgrades_tensors_to_256_within_the_size(tmp_path: Path) -> None:
    m = matmul_model(k=128, n=64)
    src, low, base = _cluster(m, tmp_path, k=4, min_elements=1)
    assert "budget" not in base.stats
    before, after = base.stats["bytes_before"], base.stats["bytes_after"]
    extra = {"W": 128 * 64 // 2 + 252 * 4, "W2": 64 * 10 // 2 + 252 * 4}  # uint8 instead of 4-bit, 252 more centroids
    x = np.random.default_rng(8).standard_normal((3, 4, 128)).astype(np.float32)
    ref = run(src, {"x": x})[0]
    cases = [(extra["W2"], {"W2": 256, "W": 4}, 0.9), (sum(extra.values()), {"W2": 256, "W": 256}, 0.2)]
    for i, (room, want, gain) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        budget = (after + room + 16) / before
        _, high, report = _cluster(m, tmp_path / str(i), k=4, min_elements=1, budget=budget)
        assert {u["tensor"] for u in report.stats["budget"]["upgraded"]} == {t for t, k in want.items() if k == 256}
        assert report.stats["bytes_after"] <= budget * before
        assert {la["tensor"]: la["k"] for la in report.stats["layers"]} == want
        assert np.linalg.norm(run(high, {"x": x})[0] - ref) < gain * np.linalg.norm(run(low, {"x": x})[0] - ref)
    with pytest.raises(OnnxCompressError, match="cluster_budget"):
        cluster_config(Params({"cluster_budget": "1.5"}))
