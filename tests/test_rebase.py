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
from onnxcompress.passes.quantize import Int8WeightsConfig, Int8WeightsPass
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
    assert diff(c1, c2b, tmp_path / "b.ocpd")["package_bytes"] < diff(c1, c2, tmp_path / "i.ocpd")["package_bytes"]
    x = np.load(VERSIONS / "digits_cnn.v2.inputs.npz")["input"]
    y = np.load(VERSIONS / "digits_cnn.v2.labels.npy")
    acc_i = float((run(c2, {"input": x})[0].argmax(-1) == y).mean())
    acc_b = float((run(c2b, {"input": x})[0].argmax(-1) == y).mean())
    assert acc_b >= acc_i - 0.002


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
