"""int8-weights with ``base``: a new version quantized consistently with the previous release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import conv_model, embedding_model, matmul_model, run, save
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.quantize import Int8WeightsConfig, Int8WeightsPass, rebase, weights
from onnxcompress.transport import diff


def _v2(model: onnx.ModelProto, rel: float = 0.001, seed: int = 7) -> onnx.ModelProto:
    """A "fine-tuned" copy: every float initializer plus noise of ``rel`` times its std."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        a = nh.to_array(t)
        if a.dtype == np.float32 and a.size >= 256:
            a = a + rng.standard_normal(a.shape).astype(np.float32) * np.float32(rel * a.std())
            m.graph.initializer[i].CopyFrom(nh.from_array(a.astype(np.float32), t.name))
    return m


def _quantize(src: Path, out: Path, **cfg: object) -> tuple[Path, oc.PassReport]:
    model = oc.load(src)
    report = Int8WeightsPass(Int8WeightsConfig(**cfg)).run(model, PassContext())  # type: ignore[arg-type]
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out, report


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


CASES = {
    "matmul-block": (lambda: matmul_model(k=256, n=128), {"granularity": "block"}, "x", (8, 4, 256)),
    "matmul-channel": (lambda: matmul_model(k=256, n=128), {}, "x", (8, 4, 256)),
    "conv": (conv_model, {}, "x", None),
    "embedding": (lambda: embedding_model(vocab=200, dim=64), {"granularity": "block"}, "ids", None),
}


def _feed(case: str, path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    if case == "embedding":
        return {"ids": rng.integers(0, 200, (8, 5)).astype(np.int64)}
    inp = onnx.load(str(path)).graph.input[0]
    shape = [d.dim_value or 8 for d in inp.type.tensor_type.shape.dim]
    return {inp.name: rng.standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("case", list(CASES))
def test_patch_much_smaller_with_base_and_fidelity_close(tmp_path: Path, case: str) -> None:
    build, cfg, _, _ = CASES[case]
    v1 = build()
    p1, p2 = save(v1, tmp_path / "v1.onnx"), save(_v2(v1), tmp_path / "v2.onnx")
    c1, _ = _quantize(p1, tmp_path / "v1c.onnx", **cfg)
    c2, _ = _quantize(p2, tmp_path / "v2c.onnx", **cfg)
    c2b, rep = _quantize(p2, tmp_path / "v2cb.onnx", base=str(c1), **cfg)
    base = rep.stats["base"]
    assert base["tensors_rebased"] == rep.stats["tensors_changed"] and "tensors_not_in_base" not in base
    assert base["symbols_kept"] > 0.8 * base["symbols"]
    indep = diff(c1, c2, tmp_path / "indep.ocpd")["package_bytes"]
    rebased = diff(c1, c2b, tmp_path / "base.ocpd")["package_bytes"]
    assert rebased < 0.8 * indep, (rebased, indep)  # tiny models: the graph bytes are a large share
    old, new_i, new_b = _inits(c1), _inits(c2), _inits(c2b)
    changed_i = sum(int(np.count_nonzero(new_i[k] != old[k])) for k in old if k.endswith("_quantized"))
    changed_b = sum(int(np.count_nonzero(new_b[k] != old[k])) for k in old if k.endswith("_quantized"))
    assert changed_b < 0.5 * changed_i, (changed_b, changed_i)
    feed = _feed(case, p2)
    ref = run(p2, feed)[0]
    cos_indep, cos_base = _cos(ref, run(c2, feed)[0]), _cos(ref, run(c2b, feed)[0])
    assert cos_base > cos_indep - 0.002, (cos_base, cos_indep)


def test_error_bound_with_slack(tmp_path: Path) -> None:
    """Every dequantized weight is within (1 + slack) * s / 2 of the new weight; kept scales fit."""
    v1 = matmul_model(k=256, n=128)
    v2 = _v2(v1, rel=0.01)
    p1, p2 = save(v1, tmp_path / "v1.onnx"), save(v2, tmp_path / "v2.onnx")
    c1, _ = _quantize(p1, tmp_path / "v1c.onnx", granularity="block")
    for slack in (0.0, 0.5):
        c2b, _ = _quantize(p2, tmp_path / f"v2cb{slack}.onnx", granularity="block", base=str(c1), base_slack=slack)
        new, old = _inits(c2b), _inits(c1)
        w = nh.to_array(next(t for t in v2.graph.initializer if t.name == "W"))
        q, s = new["W_quantized"].astype(np.float32), new["W_scale"].astype(np.float32)
        wb = w.reshape(q.shape)
        err = np.abs(wb - q * s)
        inside = np.abs(q) < 127  # at +-127 a kept scale may clip by up to (0.5 + base_overflow) * s
        bound = np.broadcast_to((1 + slack) * s / 2 * (1 + 1e-5) + 1e-12, q.shape)
        assert np.all(err[inside] <= bound[inside])
        assert np.all(err <= 2.0 * s * (1 + 1e-5) + 1e-12)
        kept = s == old["W_scale"].astype(np.float32)
        assert kept.mean() > 0.5  # most blocks keep their scale
        if slack == 0.0:  # plain rounding with the (kept or fresh) scales
            np.testing.assert_array_equal(q, np.clip(np.rint(wb / s), -127, 127))


def test_rebase_on_itself_is_identity(tmp_path: Path) -> None:
    """Compressing v1 against its own compressed file gives the same file."""
    p1 = save(conv_model(), tmp_path / "v1.onnx")
    c1, _ = _quantize(p1, tmp_path / "v1c.onnx")
    c1b, rep = _quantize(p1, tmp_path / "v1cb.onnx", base=str(c1))
    assert rep.stats["base"]["symbols_kept"] == rep.stats["base"]["symbols"]
    assert c1.read_bytes() == c1b.read_bytes()


def test_base_with_external_data(tmp_path: Path) -> None:
    """A base saved with external data gives the same result as the same base in one file."""
    v1 = matmul_model(k=256, n=128)
    p1, p2 = save(v1, tmp_path / "v1.onnx"), save(_v2(v1), tmp_path / "v2.onnx")
    c1, _ = _quantize(p1, tmp_path / "v1c.onnx", granularity="block")
    ext = tmp_path / "ext"
    ext.mkdir()
    save(onnx.load(str(c1)), ext / "v1c.onnx", external=True)
    a, _ = _quantize(p2, tmp_path / "a.onnx", granularity="block", base=str(c1))
    b, rep = _quantize(p2, tmp_path / "b.onnx", granularity="block", base=str(ext / "v1c.onnx"))
    assert rep.stats["base"]["tensors_rebased"] == 2
    assert a.read_bytes() == b.read_bytes()


VERSIONS = Path(__file__).resolve().parents[1] / "models" / "cache" / "versions"


@pytest.mark.skipif(not (VERSIONS / "digits_cnn.v2.onnx").exists(), reason="model versions not built (gitignored)")
def test_digits_versions(tmp_path: Path) -> None:
    """Real fine-tuned v1 -> v2: patch no larger than independent, accuracy unchanged."""
    v1, v2 = VERSIONS / "digits_cnn.v1.onnx", VERSIONS / "digits_cnn.v2.onnx"
    c1, _ = _quantize(v1, tmp_path / "v1c.onnx", granularity="block")
    c2, _ = _quantize(v2, tmp_path / "v2c.onnx", granularity="block")
    c2b, rep = _quantize(v2, tmp_path / "v2cb.onnx", granularity="block", base=str(c1))
    assert rep.stats["base"]["tensors_rebased"] == rep.stats["tensors_changed"]
    x = np.load(VERSIONS / "digits_cnn.v2.inputs.npz")["input"]
    y = np.load(VERSIONS / "digits_cnn.v2.labels.npy")
    ref = run(v2, {"input": x})[0]
    out_i, out_b = run(c2, {"input": x})[0], run(c2b, {"input": x})[0]
    acc_i = float((out_i.argmax(-1) == y).mean())
    acc_b = float((out_b.argmax(-1) == y).mean())
    assert acc_b >= acc_i - 0.002
    # v2 moved ~4 steps per weight: coarse steps (rule 4) on conv2, conv3, fc1, fc2; conv1 stays fine
    steps = {k: v for k, v in rep.stats["base"].items() if k.startswith("tensors_step_")}
    assert sum(v for k, v in steps.items() if k != "tensors_step_1") >= 3, steps
    patch_b = diff(c1, c2b, tmp_path / "b.ocpd")["package_bytes"]
    patch_i = diff(c1, c2, tmp_path / "i.ocpd")["package_bytes"]
    assert patch_b < 0.45 * patch_i, (patch_b, patch_i)  # measured 25,985 / 66,989
    assert _cos(ref, out_b) > 0.997  # measured 0.99862 (independent 0.99981, v1 fp32 0.916)
    ref1 = run(v1, {"input": x})[0]
    assert np.linalg.norm(out_b - ref) < 0.2 * np.linalg.norm(ref1 - ref)  # the update is delivered


def test_unmatched_base_falls_back_to_independent(tmp_path: Path) -> None:
    """Other names or another layout (channel vs block) in the base: quantized as without base."""
    p1 = save(matmul_model(k=256, n=128), tmp_path / "v1.onnx")
    other = save(conv_model(), tmp_path / "other.onnx")
    c_other, _ = _quantize(other, tmp_path / "otherc.onnx")
    c_chan, _ = _quantize(p1, tmp_path / "chan.onnx")
    ref, _ = _quantize(p1, tmp_path / "ref.onnx", granularity="block")
    a, rep_a = _quantize(p1, tmp_path / "a.onnx", granularity="block", base=str(c_other))
    b, rep_b = _quantize(p1, tmp_path / "b.onnx", granularity="block", base=str(c_chan))
    assert rep_a.stats["base"]["tensors_not_in_base"] == 1  # W; W2 is a conv weight there
    assert rep_a.stats["base"]["tensors_layout_changed"] == 1
    assert rep_b.stats["base"]["tensors_layout_changed"] == 2
    assert a.read_bytes() == ref.read_bytes() == b.read_bytes()


def test_bad_base_and_bad_config(tmp_path: Path) -> None:
    p1 = save(matmul_model(), tmp_path / "v1.onnx")
    with pytest.raises(OnnxCompressError, match="does not exist"):
        _quantize(p1, tmp_path / "x.onnx", base=str(tmp_path / "missing.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(OnnxCompressError, match="cannot read base model"):
        _quantize(p1, tmp_path / "x.onnx", base=str(junk))
    with pytest.raises(ValueError):
        Int8WeightsConfig(base_slack=2.0)


def _drifted(rows: int, k: int, drift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(w_new, scale, q_old, s_old)`` in block layout ``[rows, k // 32, 32]``: OLD quantized by
    rounding, NEW = OLD + ``drift`` steps (std) of noise."""
    rng = np.random.default_rng(seed)
    w_old = rng.standard_normal((rows, k // 32, 32)).astype(np.float32)
    s_old = (np.abs(w_old).max(axis=2, keepdims=True) / 127).astype(np.float16)
    q_old = np.clip(np.rint(w_old / s_old.astype(np.float32)), -127, 127).astype(np.int8)
    w = w_old + rng.standard_normal(w_old.shape).astype(np.float32) * np.float32(drift) * s_old.astype(np.float32)
    scale = (np.abs(w).max(axis=2, keepdims=True) / 127).astype(np.float16)
    return w, scale, q_old, s_old


@pytest.mark.parametrize("k", [2, 4, 7])
def test_coarse_step_moves_symbols_by_multiples_of_k(k: int) -> None:
    """Rule 3: in kept-scale groups q - q_old is a multiple of k (unless clipped at +-127), and the
    error is at most k * s / 2 there; re-scaled groups are plain rounding with their new scale."""
    w, scale, q_old, s_old = _drifted(64, 256, 4.0)
    q, s, counts = rebase.requantize(w, scale, (q_old, s_old), 127, step=k)
    assert counts[f"tensors_step_{k}"] == 1
    s32 = s.astype(np.float32)
    kept = np.broadcast_to(s == s_old, q.shape)
    assert kept.mean() > 0.9
    free = kept & (np.abs(q) < 127)
    delta = q.astype(np.int32) - q_old.astype(np.int32)
    assert np.all(delta[free] % k == 0)
    assert np.count_nonzero(delta[free]) > 0.3 * free.sum()  # the update is delivered, not dropped
    err = np.abs(w - q * s32)
    assert np.all(err[free] <= (k * s32 / 2 * (1 + 1e-5) + 1e-7).repeat(32, axis=2)[free])
    fresh = ~kept
    np.testing.assert_array_equal(q[fresh], np.clip(np.rint(w / s32), -127, 127)[fresh])


def test_step_choice_follows_the_budget() -> None:
    """Rule 4: the largest step whose error energy is within budget * the update's energy; a small
    drift stays at step 1 (the fine rule), budget 0 always gives step 1."""
    w, scale, q_old, s_old = _drifted(64, 256, 4.0)
    update = float(np.sum((w - q_old * s_old.astype(np.float32)) ** 2))

    def err(q: np.ndarray, s: np.ndarray) -> float:
        return float(np.sum((w - q * s.astype(np.float32)) ** 2))

    q, s, counts = rebase.requantize(w, scale, (q_old, s_old), 127)
    (chosen,) = [int(key.rsplit("_", 1)[1]) for key in counts if key.startswith("tensors_step_")]
    assert chosen >= 4  # ~4 steps of drift: k^2 / 12 <= 0.25 * 16 for k <= 6
    assert err(q, s) <= rebase.BUDGET * update
    nxt = rebase.STEPS[rebase.STEPS.index(chosen) + 1]
    q2, s2, _ = rebase.requantize(w, scale, (q_old, s_old), 127, step=nxt)
    assert err(q2, s2) > rebase.BUDGET * update  # the next step would exceed the budget
    q0, _, c0 = rebase.requantize(w, scale, (q_old, s_old), 127, budget=0.0)
    assert c0["tensors_step_1"] == 1
    q1, _, _ = rebase.requantize(w, scale, (q_old, s_old), 127, step=1)
    np.testing.assert_array_equal(q0, q1)
    ws, scale_s, _, _ = _drifted(64, 256, 0.2)
    _, _, cs = rebase.requantize(ws, scale_s, (q_old, s_old), 127)
    assert cs["tensors_step_1"] == 1  # a fine-tune that moved weights by a fraction of a step
    with pytest.raises(ValueError):
        rebase.requantize(w, scale, (q_old, s_old), 127, step=-1)


def test_large_update_coarse_patch_and_fidelity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A v2 that moved ~3 steps per weight: the per-tensor step (default) gives a much smaller patch
    than step 1, and its output error stays well under the update's own size (v1 vs v2)."""
    v1 = matmul_model(k=256, n=128)
    p1, p2 = save(v1, tmp_path / "v1.onnx"), save(_v2(v1, rel=0.05), tmp_path / "v2.onnx")
    c1, _ = _quantize(p1, tmp_path / "v1c.onnx", granularity="block")
    c2, _ = _quantize(p2, tmp_path / "v2c.onnx", granularity="block")
    auto, rep = _quantize(p2, tmp_path / "auto.onnx", granularity="block", base=str(c1))
    assert not rep.stats["base"].get("tensors_step_1")  # both weights moved by several steps
    with monkeypatch.context() as m:
        m.setattr(weights, "requantize", lambda *a, **kw: rebase.requantize(*a, **{**kw, "step": 1}))
        fine, _ = _quantize(p2, tmp_path / "fine.onnx", granularity="block", base=str(c1))
    patch = {n: diff(c1, c, tmp_path / f"{n}.ocpd")["package_bytes"] for n, c in (("a", auto), ("f", fine), ("i", c2))}
    assert patch["a"] < 0.7 * patch["f"] and patch["f"] <= patch["i"] * 1.05, patch
    feed = _feed("matmul-block", p2)
    ref, out1 = run(p2, feed)[0], run(p1, feed)[0]
    update = np.linalg.norm(out1 - ref)
    assert np.linalg.norm(run(auto, feed)[0] - ref) < 0.6 * update  # error RMS <= 0.5 x the update's
    assert np.linalg.norm(run(fine, feed)[0] - ref) < 0.3 * update


@pytest.mark.parametrize("step", [1, 5, 0])
def test_sliced_work_gives_the_same_symbols(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The element-wise work runs in slices of CHUNK values (memory bound): any slicing gives the
    same result, for block, per-row (tables) and per-column (shape[0] == 1 scales) layouts."""
    w, scale, q_old, s_old = _drifted(40, 256, 3.0, seed=2)
    rng = np.random.default_rng(5)
    rows_w = rng.standard_normal((300, 64)).astype(np.float32)
    rows_q = np.clip(np.rint(rows_w / (np.abs(rows_w).max(1, keepdims=True) / 127)), -127, 127).astype(np.int8)
    rows_s = (np.abs(rows_w).max(1, keepdims=True) / 127).astype(np.float32)
    cols_s = (np.abs(rows_w).max(0, keepdims=True) / 127).astype(np.float32)
    cols_q = np.clip(np.rint(rows_w / cols_s), -127, 127).astype(np.int8)
    drift = rows_w + 0.05 * rng.standard_normal(rows_w.shape).astype(np.float32)
    cases = [
        (w, scale, (q_old, s_old)),
        (drift, rows_s, (rows_q, rows_s)),
        (drift, cols_s, (cols_q, cols_s)),
    ]
    whole = [rebase.requantize(a, s, o, 127, step=step) for a, s, o in cases]
    monkeypatch.setattr(rebase, "CHUNK", 200)  # one row per slice (blocks), three rows (64-wide tables)
    for (a, s, o), ref in zip(cases, whole):
        got = rebase.requantize(a, s, o, 127, step=step)
        assert got is not None and ref is not None
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert got[2] == ref[2]
