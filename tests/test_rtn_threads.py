"""The int4 clipping search, rewritten for speed (transposed layout, pruned candidates, row chunks on
threads): bit-identical to the search as first written, frozen in tests/_rtn_reference.py as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from _rtn_reference import ref_block_params as _ref_block_params
from _rtn_reference import ref_quantize_rtn as _ref_quantize_rtn

from onnxcompress.passes.quantize import gptq as g

# --------------------------------------------------------------------------- data


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Rows of very different scales, heavy tails, all-zero blocks, exact +-max ties and repeated values."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, (rows, 1))).astype(np.float32)
    w[rng.random(w.shape) < 0.05] *= 20.0  # outliers: low clipping ratios matter
    w[3, :] = 0.0  # all-zero blocks (every magnitude ties)
    if rows > 9:
        w[7, 0], w[7, 1] = 2.5, -2.5  # +- tie on the largest magnitude: the first one wins
        w[8, :] = np.round(w[8, :] * 4) / 4  # repeated values
        w[9, :32] = np.linspace(-1e-30, 1e-31, min(cols, 32))  # tiny blocks: round_scales' special cases
    return w


def _same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("n", [*range(1, 40), 63, 64, 65, 127, 128, 129, 136, 255, 256, 257, 300])
def test_pairwise_sum_is_numpys_sum(n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((257, n)) ** 2 * rng.uniform(0, 3, (257, 1))).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    got = g._pairwise_sum(np.ascontiguousarray(x.T))
    np.testing.assert_array_equal(got, x.sum(axis=-1))
    np.testing.assert_array_equal(got, x.reshape(1, 257, n).sum(axis=-1)[0])  # as the blocks of a 3-D chunk


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip_search", [True, False])
@pytest.mark.parametrize("int8_scales", [False, True])
def test_block_params_equals_the_reference(symmetric: bool, clip_search: bool, int8_scales: bool) -> None:
    rng = np.random.default_rng(11)
    for seed, (rows, nb, b) in enumerate([(300, 3, 32), (37, 5, 16), (12, 2, 64), (9, 1, 128)]):
        w = _weights(rows, nb * b, seed)
        wb = w.reshape(rows, nb, b)
        step = g.row_scale_step(w)[:, None] if int8_scales else None
        for weights in (
            None,
            rng.uniform(0.0, 2.0, (nb, b)).astype(np.float32),
            rng.uniform(0.0, 2.0, b),  # float64: the product is rounded to float32 as before
        ):
            got = g.block_params(wb, symmetric, clip_search, weights, step)
            assert _same(got, _ref_block_params(wb, symmetric, clip_search, weights, step))
        # GPTQ's layout: one block column [N, b], per-row steps [N]
        cur = np.ascontiguousarray(w[:, :b])
        st = g.row_scale_step(w) if int8_scales else None
        wts = rng.uniform(0.0, 2.0, b).astype(np.float32)
        assert _same(
            g.block_params(cur, symmetric, clip_search, wts, st),
            _ref_block_params(cur, symmetric, clip_search, wts, st),
        )


def test_the_pruned_and_the_gathered_paths_are_exercised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate evaluated everywhere (no pruning, no gathering) gives the same as the default."""
    w = _weights(400, 96, 5)
    wb = w.reshape(400, 3, 32)
    calls = {"sparse": 0, "dense": 0}
    real = g._squared_errors

    def spy(x, s, z, symmetric, weights, u):  # type: ignore[no-untyped-def]
        if x.ndim == 2 and x.shape[1] < wb.shape[0] * wb.shape[1]:
            calls["sparse"] += 1
        else:
            calls["dense"] += 1
        return real(x, s, z, symmetric, weights, u)

    monkeypatch.setattr(g, "_squared_errors", spy)
    want = g.block_params(wb)
    assert calls["sparse"] > 0 and calls["dense"] > 0
    monkeypatch.setattr(g, "SPARSE_SEARCH", -1.0)  # never gathered
    assert _same(g.block_params(wb), want)
    assert _same(want, _ref_block_params(wb))


@pytest.mark.parametrize("scale_bits", [16, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_rtn_on_threads_equals_serial_and_the_reference(
    monkeypatch: pytest.MonkeyPatch, scale_bits: int, symmetric: bool
) -> None:
    w = _weights(1000, 200, 2)  # K padded to 224
    col_weight = np.random.default_rng(3).uniform(0.0, 1.0, 200).astype(np.float32)
    monkeypatch.setattr(g, "SEARCH_CHUNK", 40 * 224)  # 25 chunks of 40 rows
    for cw in (None, col_weight):
        want = _ref_quantize_rtn(w, 32, symmetric, True, scale_bits, cw)
        results = []
        for threads in (1, 3):
            monkeypatch.setattr(g, "ROW_THREADS", threads)
            results.append(g.quantize_rtn(w, 32, symmetric, True, scale_bits, cw))
        for q in results:
            assert np.array_equal(q.codes, want.codes) and q.codes.dtype == np.uint8
            assert np.array_equal(q.scales, want.scales)
            assert np.array_equal(q.zero_points, want.zero_points)
            assert (q.scale_step is None) == (want.scale_step is None)


def test_search_threads_and_for_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(g, "ROW_THREADS", 0)
    monkeypatch.setenv("ONNXCOMPRESS_THREADS", "1")
    assert g.search_threads() == 1
    monkeypatch.setenv("ONNXCOMPRESS_THREADS", "64")
    assert 1 <= g.search_threads() <= 4
    monkeypatch.setenv("ONNXCOMPRESS_THREADS", "junk")
    assert 1 <= g.search_threads() <= 4
    monkeypatch.setattr(g, "ROW_THREADS", 2)
    seen: list[int] = []
    g.for_each(seen.append, range(0, 50, 5))
    assert sorted(seen) == list(range(0, 50, 5))

    def boom(start: int) -> None:
        if start == 10:
            raise ValueError("chunk 10")

    with pytest.raises(ValueError, match="chunk 10"):
        g.for_each(boom, range(0, 50, 5))


def test_round_scales_fast_equals_round_scales() -> None:
    tiny = float(np.finfo(np.float16).tiny)
    special = np.array(
        [0.0, -0.0, 1e-30, -1e-30, tiny, -tiny, tiny / 2, 65504.0, 65520.0, 1e6, np.inf, -np.inf, np.nan]
    )
    rng = np.random.default_rng(0)
    for s in (rng.standard_normal(1000).astype(np.float32), special.astype(np.float32), rng.standard_normal(50)):
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(g._round_scales_fast(s), g.round_scales(s))
    assert g._round_scales_fast(np.zeros(0, np.float32)).shape == (0,)


def _quantize_in_child(queue) -> None:  # type: ignore[no-untyped-def]
    w = _weights(600, 64, 4)
    queue.put(g.quantize_rtn(w, 32).codes.sum())


def test_a_forked_child_does_not_reuse_its_parents_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Process pools fork: the parent's executor has no threads in the child (it would wait forever)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(g, "ROW_THREADS", 2)
    monkeypatch.setattr(g, "SEARCH_CHUNK", 64 * 64)
    want = g.quantize_rtn(_weights(600, 64, 4), 32).codes.sum()  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_quantize_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on its parent's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5) == want
