"""Rate estimates of int8 symbols and entropy-constrained rounding (onnxcompress.passes.quantize.entropy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcompress.passes.quantize.entropy import (
    RTN_SLOPE,
    classes_of,
    coded_bits,
    coded_bytes,
    ecr_round,
    entropy_bits,
    gptq_round,
)
from onnxcompress.passes.quantize.gptq import prepare_hessian
from onnxcompress.transport import packed_size


def _laplace_symbols(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spread = np.linspace(0.5, 12.0, cols)[None, :]  # per-column spread, as per-channel steps give
    return np.clip(np.rint(rng.laplace(size=(rows, cols)) * spread), -127, 127).astype(np.int8)


def _int8_model(q: np.ndarray, path: Path) -> Path:
    """A model holding ``q`` as an int8 initializer (Cast to float -> output)."""
    g = h.make_graph(
        [h.make_node("Cast", ["Q"], ["y"], to=T.FLOAT)],
        "g",
        [],
        [h.make_tensor_value_info("y", T.FLOAT, list(q.shape))],
        [nh.from_array(q, "Q")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(m, path)
    return path


def test_entropy_bits_of_known_distributions() -> None:
    assert entropy_bits(np.array([5, 5])) == pytest.approx(10.0)
    assert entropy_bits(np.array([8, 0, 0])) == pytest.approx(0.0)
    assert entropy_bits(np.array([[1, 1, 1, 1], [4, 0, 0, 0]])) == pytest.approx(8.0)


def test_coded_bytes_predicts_the_package(tmp_path: Path) -> None:
    """The estimate is what ``pack`` spends on the symbols, within a few percent."""
    q = _laplace_symbols(512, 384)
    model = _int8_model(q, tmp_path / "q.onnx")
    overhead = packed_size(_int8_model(np.zeros((1, 1), np.int8), tmp_path / "empty.onnx"))
    actual = packed_size(model) - overhead
    est = coded_bytes(q)
    assert abs(est - actual) / actual < 0.04, (est, actual)
    # Per-column classes matter: the estimate beats one table for the whole tensor.
    counts = np.bincount(q.astype(np.int64).ravel() + 128, minlength=256)
    assert coded_bits(q) < 0.97 * entropy_bits(counts)


def test_coded_bits_samples_large_tensors_consistently() -> None:
    q = _laplace_symbols(6000, 384, seed=1)  # 2.3 M symbols: estimated on a sample of rows
    full = sum(coded_bits(q[i : i + 1000]) for i in range(0, 6000, 1000))
    assert coded_bits(q) == pytest.approx(full, rel=0.03)


def test_classes_follow_the_spread() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((256, 64)) * np.linspace(0.1, 10, 256)[:, None]
    cls = classes_of(rows, 4)
    assert np.all(cls[:32] == 0) and np.all(cls[-32:] == 3)
    assert np.all(classes_of(rows, 1) == 0)


def test_ecr_zero_lambda_is_round_to_nearest() -> None:
    x = np.random.default_rng(0).standard_normal((64, 32)) * 5
    np.testing.assert_array_equal(ecr_round(x, 127, 0.0), np.rint(x))
    np.testing.assert_array_equal(ecr_round(x, 3, 0.0), np.clip(np.rint(x), -3, 3))


def test_ecr_trades_distortion_for_rate_by_the_rule() -> None:
    rng = np.random.default_rng(1)
    x = rng.laplace(size=(384, 384)) * 1.0  # about 2.5 bits per symbol: where ECR pays
    rtn = np.rint(x)
    rates, dists = [], []
    for lam in (0.0, 0.05, 0.1, 0.2):
        q = ecr_round(x, 127, lam, channel_axis=1)
        assert np.all(np.abs(q - x) < 1.0)  # only the two neighbours
        moved = q != rtn
        # A moved value goes to the more probable neighbour: nearly always towards zero (the mode);
        # only in the sparse tails can the histogram say otherwise.
        if moved.any():
            assert np.mean(np.abs(q[moved]) < np.abs(rtn[moved])) > 0.98
        rates.append(coded_bits(q.astype(np.int8)))
        dists.append(float(np.mean((x - q) ** 2)))
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.95 * rates[0]
    assert dists == sorted(dists)
    # Below the round-to-nearest slope, ECR buys bits more cheaply than a coarser step would.
    lam = 0.05
    assert lam < RTN_SLOPE
    d_bits = rates[0] - rates[1]
    d_dist = (dists[1] - dists[0]) * x.size
    assert d_dist / d_bits < RTN_SLOPE


def test_ecr_importance_protects_weighted_elements() -> None:
    rng = np.random.default_rng(2)
    x = rng.laplace(size=(128, 256)) * 2.0
    imp = np.ones((1, 256))
    imp[:, :128] = 100.0  # the first half matters a lot
    q = ecr_round(x, 127, 0.3, importance=imp, channel_axis=0)
    moved = q != np.rint(x)
    assert moved[:, 128:].sum() > 20 * max(1, moved[:, :128].sum())


def test_gptq_round_lowers_the_output_error() -> None:
    rng = np.random.default_rng(3)
    n, k = 48, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((512, k)) @ rng.standard_normal((k, k))  # correlated activations
    hess = x.T @ x
    s = np.full((n, 1), 0.25, np.float32)
    u = prepare_hessian(hess, 1, 0.01).u
    q = gptq_round(w, s, u, 127)
    rtn = np.rint(w / s)

    def out_err(qq: np.ndarray) -> float:
        e = w - qq * s
        return float(np.sum((e @ hess) * e))

    assert out_err(q) < 0.7 * out_err(rtn)
    # With an identity Hessian GPTQ has nothing to compensate: it is round to nearest.
    np.testing.assert_array_equal(gptq_round(w, s, prepare_hessian(np.eye(k), 1, 0.0).u, 127), rtn)
    # ECR inside GPTQ lowers the rate.
    q_ecr = gptq_round(w, s, u, 127, 0.2)
    assert coded_bits(q_ecr.astype(np.int8)) < coded_bits(q.astype(np.int8))
