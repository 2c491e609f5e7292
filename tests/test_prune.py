"""Unstructured / N:M pruning: masks, SparseGPT reconstruction, scopes, exclusions, subgraphs, bad params."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import conv_model, if_model, matmul_model, run, save
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.structural import PruneConfig, PrunePass, prune_config
from onnxcompress.passes.structural import _lstsq as L

MINILM = Path(__file__).resolve().parent.parent / "models" / "cache" / "minilm"


def _correlated(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    scale = rng.uniform(0.1, 3.0, k)
    return ((rng.standard_normal((n, k)) @ mix) * scale).astype(np.float32)


def _prune(src: onnx.ModelProto, tmp: Path, ctx: PassContext | None = None, **cfg: object):
    path = save(src, tmp / "in.onnx")
    model = oc.load(path)
    report = PrunePass(PruneConfig(**cfg)).run(model, ctx or PassContext())  # type: ignore[arg-type]
    out = tmp / "out.onnx"
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return path, out, report


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_nm_mask_keeps_n_largest_of_each_group() -> None:
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    mask = L.nm_mask(np.abs(w), 2, 4)
    groups = mask.reshape(8, 4, 4)
    assert np.all(groups.sum(-1) == 2)
    kept = np.abs(np.where(mask, 0, w)).reshape(8, 4, 4)
    pruned = np.abs(np.where(mask, w, 0)).reshape(8, 4, 4)
    assert np.all(kept.max(-1) >= pruned.max(-1))
    assert np.all(np.sort(kept, -1)[..., -2] >= pruned.max(-1))


def test_sparsegpt_beats_magnitude_on_correlated_inputs() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    x = _correlated(512, 64, 2)
    h = (x.T @ x).astype(np.float64)
    for nm in (None, (2, 4)):
        sg = L.sparsegpt(w, h, sparsity=0.5, nm=nm)
        mask = L.nm_mask(np.abs(w), 2, 4) if nm else L.magnitude_mask(w, 0.5)
        mag = np.where(mask, 0, w)
        assert np.mean(sg == 0) == pytest.approx(0.5, abs=0.01)
        if nm:
            assert np.all((sg.reshape(32, 16, 4) != 0).sum(-1) <= 2)
        assert L.output_error(x, w, sg) < 0.6 * L.output_error(x, w, mag)


def test_unstructured_layer_scope_exact_sparsity_and_outputs_close(tmp_path: Path) -> None:
    src, out, report = _prune(matmul_model(k=64, n=32), tmp_path, sparsity=0.3)
    w = _inits(out)
    assert np.mean(w["W"] == 0) == pytest.approx(0.3, abs=1e-3)
    assert np.mean(w["W2"] == 0) == pytest.approx(0.3, abs=1e-3)
    np.testing.assert_array_equal(w["b"], _inits(src)["b"])  # biases never pruned
    layers = {la["tensor"]: la for la in report.stats["layers"]}
    assert layers["W"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    # the kept values are the original ones (magnitude pruning without calibration)
    orig = _inits(src)["W"]
    np.testing.assert_array_equal(w["W"][w["W"] != 0], orig[w["W"] != 0])
    assert np.abs(orig[w["W"] == 0]).max() <= np.abs(orig[w["W"] != 0]).min()


def test_global_scope_one_threshold(tmp_path: Path) -> None:
    m = matmul_model(k=64, n=32)
    # scale W2 down: a global threshold prunes it much more than W
    for init in m.graph.initializer:
        if init.name == "W2":
            init.CopyFrom(nh.from_array(nh.to_array(init) * 0.1, "W2"))
    _, out, report = _prune(m, tmp_path, sparsity=0.5, scope="global")
    layers = {la["tensor"]: la["sparsity"] for la in report.stats["layers"]}
    assert layers["W2"] > 0.9 and layers["W"] < 0.5
    assert report.stats["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_nm_on_conv_along_input_channels_and_skip_when_not_divisible(tmp_path: Path) -> None:
    _, out, report = _prune(conv_model(), tmp_path, mode="2:4", min_elements=1)
    w = _inits(out)
    wg = w["WG"]  # Gemm transB=1 [10, 1152]: groups along K
    assert np.all((wg.reshape(10, -1, 4) != 0).sum(-1) <= 2)
    skipped = dict(report.skipped)
    assert "not a multiple of 4" in skipped["W1"]  # Conv with 3 input channels
    assert "ConvTranspose" not in {la["op"] for la in report.stats["layers"]}


def test_reconstruction_beats_magnitude_end_to_end(tmp_path: Path) -> None:
    m = matmul_model(m=4, k=64, n=32)
    rng = np.random.default_rng(3)
    calib = [{"x": _correlated(64, 64, 4).reshape(16, 4, 64)}]
    test = {"x": _correlated(32, 64, 4).reshape(8, 4, 64) + 0 * rng.standard_normal((8, 4, 64)).astype(np.float32)}
    src, plain, _ = _prune(m, tmp_path, sparsity=0.5, reconstruct="off")
    (tmp_path / "b").mkdir()
    _, rec, report = _prune(m, tmp_path / "b", PassContext(calibration=calib), sparsity=0.5)
    assert report.stats["reconstructed_layers"] == 2
    ref = run(src, test)[0]
    err_plain = np.linalg.norm(run(plain, test)[0] - ref)
    err_rec = np.linalg.norm(run(rec, test)[0] - ref)
    assert err_rec < 0.7 * err_plain
    assert np.mean(_inits(rec)["W"] == 0) == pytest.approx(0.5, abs=0.01)


def test_subgraph_weights_and_exclusions(tmp_path: Path) -> None:
    _, out, report = _prune(if_model(shared=False), tmp_path, sparsity=0.5)
    m = onnx.load(str(out))
    found = {i.name: nh.to_array(i) for a in m.graph.node[0].attribute for i in a.g.initializer}
    found.update(_inits(out))
    assert np.mean(found["W_else"] == 0) == pytest.approx(0.5, abs=0.01)
    assert np.mean(found["W"] == 0) == pytest.approx(0.5, abs=0.01)
    assert report.stats["tensors_changed"] == 2
    (tmp_path / "x").mkdir()
    _, out2, report2 = _prune(matmul_model(), tmp_path / "x", PassContext(exclude=("mm2",)), sparsity=0.5)
    assert not np.any(_inits(out2)["W2"] == 0)
    assert ("mm2", "excluded by configuration") in report2.skipped


def test_constant_node_weights(tmp_path: Path) -> None:
    _, out, report = _prune(conv_model(constant_nodes=True), tmp_path, sparsity=0.5)
    assert report.modified
    m = onnx.load(str(out))
    consts = {n.output[0]: nh.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"}
    assert np.mean(consts["WG"] == 0) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("params", "msg"),
    [
        ({"prune_sparsity": "1"}, "prune_sparsity"),
        ({"prune_sparsity": "-0.1"}, "prune_sparsity"),
        ({"prune_mode": "3:4"}, "prune_mode"),
        ({"prune_scope": "net"}, "prune_scope"),
    ],
)
def test_bad_params_are_one_line_errors(params: dict[str, str], msg: str) -> None:
    with pytest.raises(OnnxCompressError, match=msg) as exc:
        prune_config(Params(params))
    assert "\n" not in str(exc.value)


def test_reconstruct_on_requires_calibration(tmp_path: Path) -> None:
    model = oc.load(save(matmul_model(), tmp_path / "m.onnx"))
    with pytest.raises(OnnxCompressError, match="calibration"):
        PrunePass(prune_config(Params({"prune_reconstruct": "on"}))).run(model, PassContext())


@pytest.mark.skipif(not (MINILM / "minilm.onnx").exists(), reason="MiniLM not downloaded")
def test_minilm_24_reconstruction_improves_fidelity(tmp_path: Path) -> None:
    """2:4 on the first layer's FFN weights with and without SparseGPT (held-out sentences)."""
    feeds = dict(np.load(MINILM / "minilm.inputs.npz"))
    cal = dict(np.load(MINILM / "minilm.calibration.npz"))
    cal = {k: v[:16] for k, v in cal.items()}
    ref = run(MINILM / "minilm.onnx", feeds)[0]
    worst = {}
    for name, ctx in (("plain", PassContext()), ("sparsegpt", PassContext(calibration=[cal]))):
        model = oc.load(MINILM / "minilm.onnx")
        names = [n.name for n in model.graph.nodes if n.op == "MatMul"][:12]
        keep = {"node_MatMul_103", "node_MatMul_112"}
        ctx.exclude = tuple(n for n in names if n not in keep) + (r"node_MatMul_1[2-9]\d|node_MatMul_[2-9]\d\d",)
        report = PrunePass(PruneConfig(mode="2:4")).run(model, ctx)
        assert report.stats["tensors_changed"] == 2
        out = tmp_path / f"{name}.onnx"
        oc.save(model, out)
        got = run(out, feeds)[0]
        worst[name] = float(np.min(np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)))
    assert worst["sparsegpt"] > worst["plain"]


def test_hessians_leave_padding_out_and_weigh_samples_equally(tmp_path: Path) -> None:
    m = matmul_model(m=6, k=16, n=8)
    m.graph.input.append(onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", 6]))
    path = save(m, tmp_path / "in.onnx")
    model = oc.load(path)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], np.int64)
    feed = {"x": x, "attention_mask": mask}
    key = ("x", False)
    h = L.collect_hessians(model, [key], {key: 16}, [feed], sample_weighting=False)[key]
    keep = x[mask > 0].astype(np.float64)
    np.testing.assert_allclose(h, keep.T @ keep, rtol=1e-5, atol=1e-4)
    hw = L.collect_hessians(model, [key], {key: 16}, [feed])[key]
    want = sum(6 / mask[b].sum() * x[b, mask[b] > 0].T.astype(np.float64) @ x[b, mask[b] > 0] for b in range(3))
    np.testing.assert_allclose(hw, want, rtol=1e-5, atol=1e-4)
    plain = L.collect_hessians(model, [key], {key: 16}, [feed], mask_padding=False)[key]
    full = x.reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(plain, full.T @ full, rtol=1e-5, atol=1e-4)
    assert L.token_mask({"x": x}) is None
