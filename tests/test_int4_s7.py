"""int4 GPTQ: shrinkage of the Hessian toward its diagonal (``--param shrink``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _models import run, tiny_transformer_split

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.quantize.gptq import gptq, output_error, prepare_hessian, quantize_rtn
from onnxcompress.passes.quantize.int4 import DEFAULT_SHRINK, Int4Config, Int4Pass, int4_config

K, N = 96, 40


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, object]:
    """A weight ``[N, K]``, a draw of correlated inputs ``x(n) [n, K]`` (loud and quiet channels)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32)
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)
    gain = np.linspace(0.2, 3.0, K)

    def draw(n: int) -> np.ndarray:
        return ((rng.standard_normal((n, K)) @ mix) * gain).astype(np.float32)

    return w, mix, draw


def _h(x: np.ndarray) -> np.ndarray:
    return x.T.astype(np.float64) @ x.astype(np.float64)


def test_prepare_hessian_shrink_is_the_convex_combination_with_the_diagonal() -> None:
    _, _, draw = _data()
    h = _h(draw(48))
    for a in (0.0, 0.3, 1.0):
        want = (1.0 - a) * h + a * np.diag(np.diag(h))
        got = prepare_hessian(h, 32, 0.1, shrink=a)
        ref = prepare_hessian(want, 32, 0.1)
        np.testing.assert_allclose(got.u, ref.u, rtol=1e-5, atol=1e-6)
    # 0 (the default) changes nothing: bit-identical factor
    np.testing.assert_array_equal(prepare_hessian(h, 32, 0.1).u, prepare_hessian(h, 32, 0.1, shrink=0.0).u)
    # with act-order the permuted matrix is shrunk alike (the diagonal, hence the order, is kept)
    got = prepare_hessian(h, 32, 0.1, act_order=True, shrink=0.5)
    ref = prepare_hessian(0.5 * h + 0.5 * np.diag(np.diag(h)), 32, 0.1, act_order=True)
    np.testing.assert_array_equal(got.perm, ref.perm)
    np.testing.assert_allclose(got.u, ref.u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_full_shrink_is_weighted_round_to_nearest(scale_bits: int) -> None:
    """``shrink=1``: a diagonal Hessian propagates no error, so GPTQ is the ``diag H``-weighted clipping search."""
    w, _, draw = _data(1)
    h = _h(draw(48))
    q = gptq(w, h, 32, damp=0.1, shrink=1.0, scale_bits=scale_bits)
    r = quantize_rtn(w, 32, col_weight=np.diag(h).astype(np.float32), scale_bits=scale_bits)
    np.testing.assert_array_equal(q.codes, r.codes)
    np.testing.assert_array_equal(q.scales, r.scales)
    # and plain GPTQ does differ (the test would notice shrink being ignored)
    assert not np.array_equal(gptq(w, h, 32, damp=0.1, scale_bits=scale_bits).codes, r.codes)


def test_shrink_helps_held_out_inputs_when_calibration_is_rank_deficient() -> None:
    """48 samples for K = 96: plain GPTQ fits the calibration inputs, shrinkage generalises better."""
    w, _, draw = _data(0)
    x = draw(48)
    h = _h(x)
    held = draw(2000)
    err = {a: output_error(held, w, gptq(w, h, 32, damp=0.1, shrink=a).dequantize()) for a in (0.0, 0.3)}
    fit = {a: output_error(x, w, gptq(w, h, 32, damp=0.1, shrink=a).dequantize()) for a in (0.0, 0.3)}
    assert fit[0.0] < fit[0.3]  # on the calibration inputs themselves, no shrinkage fits best
    assert err[0.3] < 0.9 * err[0.0]


def test_shrink_param() -> None:
    assert int4_config(Params({})).shrink == DEFAULT_SHRINK
    assert int4_config(Params({"shrink": "0.25"})).shrink == 0.25
    for bad in ("-0.1", "1.5"):
        with pytest.raises(OnnxCompressError, match="shrink"):
            int4_config(Params({"shrink": bad}))
    with pytest.raises(ValueError, match="shrink"):
        Int4Config(shrink=2.0)


def test_shrink_reaches_gptq_in_the_pass(tmp_path: Path) -> None:
    src, calib, held, ref = tiny_transformer_split()
    outs = {}
    for a in ("0", "0.3", "1"):
        model = oc.load(src)
        cfg = int4_config(Params({"shrink": a, "int4_budget": "0"}))
        report = Int4Pass(cfg).run(model, PassContext(calibration=calib))
        assert report.stats["method"] == "gptq" and report.stats["gptq_layers"] > 0
        oc.save(model, tmp_path / f"q{a}.onnx")
        (outs[a],) = run(tmp_path / f"q{a}.onnx", held)[:1]
        err = float(np.sum((outs[a] - ref) ** 2) / np.sum(ref**2))
        assert err < 0.02, (a, err)
    assert not np.array_equal(outs["0"], outs["0.3"])
    assert not np.array_equal(outs["0.3"], outs["1"])
