"""Block-wise 4-bit quantization maths: round-to-nearest with a clipping search, and GPTQ.

Layout: a weight is handled as ``W [N, K]`` (rows = output channels, columns = the reduction axis
``K``), split along ``K`` into blocks of ``b`` columns; ``K`` is zero-padded to a multiple of ``b``
(:func:`pad_columns`; padded columns quantize to exactly zero and are dropped again by the caller).
Every block of every row has a scale ``s`` and a zero point ``z``; codes are unsigned nibbles::

    u  = clip(round(w / s) + z, 0, 15)
    w' = (u - z) * s

* symmetric: ``z = 8`` (codes -8..7 around zero). Candidate scales are ``s = -e * r / 8`` with ``e``
  the block's value of largest magnitude *with its sign*, so that for ``r = 1`` that value lands
  exactly on the code ``-8`` (the side of the range with 8 levels; a negative scale is legal in every
  consumer), and ``s = e * r / 7``.
* asymmetric: ``s = (max - min) * r / 15`` and ``z = clip(round(-min * r / s), 0, 15)``.

Scales are float16 (``scale_bits=16``), or (``scale_bits=8``) int8 codes ``c`` times a per-row float16
step ``d`` (``s = c * d``, ``|c| <= 127``, ``d = max|w_row| * 1.1 / (7 * 127)``): 1 byte per block
instead of 2, i.e. 0.25 instead of 0.5 bits per weight at block 32 (:func:`snap_scales`; the product
of an int8 and a float16 is exact in float32, so a file storing ``c`` and ``d`` dequantizes to exactly
``w'``). The clipping search and GPTQ see the snapped candidates, so the codes fit the stored scales.

Clipping search (``clip_search``): the ratio ``r`` is chosen per block from a small grid in
``[0.6, 1]`` to minimise the block's (optionally column-weighted) squared error
``sum_k h_k (w_k - w'_k)^2``; ``r = 1`` (plain min/max) is always a candidate, so the search never
does worse than min/max on that objective. Scales are rounded to float16 before the codes are
computed (:func:`round_scales`), so a file storing them in float16 dequantizes to exactly ``w'``.

GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") minimises the layer's output error on calibration inputs ``X [n, K]``,
``||X W^T - X W'^T||^2 = tr((W - W') H (W - W')^T)`` with ``H = X^T X``, one column at a time:

1. dead columns (``H_kk = 0``) are zeroed; optional shrinkage toward the diagonal,
   ``H = (1 - shrink) H + shrink diag(H)`` (the off-diagonal terms scaled by ``1 - shrink``: a few
   hundred calibration tokens estimate ``H`` poorly; ``shrink = 1`` quantizes every column on its own);
   then ``H += damp * mean(diag H) * I``;
2. optional act-order: columns are processed by decreasing ``H_kk`` (the block structure still
   follows the original column order: a block's scales are computed when its first column is reached);
3. ``U = cholesky(H^-1)^T`` (upper); for column ``k``: ``q_k = quant(w_k)``,
   ``e_k = (w_k - q_k) / U_kk`` and the not-yet-quantized columns ``j > k`` absorb the error,
   ``w_j -= e_k U_kj`` (the optimal update of the OBS framework);
4. lazy batch updates: the updates inside a batch of ``B`` columns are applied column by column,
   those to the columns after the batch at once (``W[:, after] -= E U[batch, after]``, one GEMM);
5. a block's scales are computed from its columns' *current* (error-compensated) values, weighted by
   ``diag H`` in the clipping search, when the first of its columns is reached.

Everything is vectorised over rows; the loop runs over columns (``K`` iterations of ``O(N B)``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ... import cores
from ...io import trim_heap

QMAX_U4 = 15
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
ROW_CHUNK = 256  # rows per chunk in the clipping search: its temporaries stay in cache (rows are independent)
ROW_THREADS = 0  # 0: ONNXCOMPRESS_THREADS if set, else every usable core (at most 4); 1: no threads
SEARCH_CHUNK = 1 << 18  # values per chunk of rows in the clipping search (at most; its buffers stay near L2)
MIN_CHUNK_ROWS = 64  # a weight is split for the threads only into chunks of at least this many rows
SPARSE_SEARCH = 0.5  # a candidate alive on at most this share of the blocks is evaluated on those blocks only
SCALE_BITS = (8, 16)
SCALE_CODE_MAX = 127  # int8 scale codes (scale_bits=8)
SCALE_HEADROOM = 1.1  # the step leaves room for GPTQ-updated values beyond the row's original maximum


@dataclasses.dataclass
class Quantized:
    """A block-quantized weight in ``[N, K_pad]`` layout.

    Attributes:
        codes: uint8 nibbles ``u`` in ``[0, 15]``, shape ``[N, K_pad]`` (``K_pad`` a multiple of the block).
        scales: float32 scales (float16-representable), shape ``[N, K_pad / block]``.
        zero_points: uint8 zero points, shape ``[N, K_pad / block]`` (all 8 when symmetric).
        k: The true ``K`` (columns beyond it are padding).
        block: The block size.
        bits: 4 (codes in ``[0, 15]``) or 8 (codes in ``[1, 255]``, zero point 128: see :func:`quantize_int8`).
        scale_step: With ``scale_bits=8``: the per-row float16-representable step ``[N]`` (float32);
            every scale is an integer multiple ``c * step`` with ``|c| <= 127`` (:meth:`scale_codes`).
            None: the scales are float16 values.
        col_scale: Activation-aware scaling (:mod:`.awq`): a float16-representable multiplier ``[K]`` of
            the dequantized columns (the codes quantize ``W / col_scale``). None: no scaling.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    block: int
    bits: int = 4
    scale_step: np.ndarray | None = None
    col_scale: np.ndarray | None = None

    def scale_codes(self) -> np.ndarray:
        """The int8 scale codes ``[N, K_pad / block]`` (``scales / scale_step``, exact); needs ``scale_step``."""
        assert self.scale_step is not None
        return np.rint(self.scales / self.scale_step[:, None]).astype(np.int8)

    def dequantize(self) -> np.ndarray:
        """``W' [N, K]`` (float32), padding dropped."""
        n, kp = self.codes.shape
        nb = kp // self.block
        u = self.codes.reshape(n, nb, self.block).astype(np.float32)
        z = self.zero_points.astype(np.float32)[:, :, None]
        w = (u - z) * self.scales[:, :, None]
        w = w.reshape(n, kp)[:, : self.k]
        if self.col_scale is not None:
            w *= self.col_scale[None, :]
        return w


def pad_columns(w: np.ndarray, block: int) -> np.ndarray:
    """``w [N, K]`` zero-padded on the right to a multiple of ``block`` columns (no copy if not needed)."""
    k = w.shape[1]
    pad = (-k) % block
    if not pad:
        return w
    return np.concatenate([w, np.zeros((w.shape[0], pad), dtype=w.dtype)], axis=1)


def round_scales(s: np.ndarray) -> np.ndarray:
    """Scales rounded to float16-representable float32 values; tiny or zero scales become 1 or the float16 floor."""
    s = np.where(np.isfinite(s) & (s != 0), s, np.float32(1.0)).astype(np.float32)
    tiny = np.float32(np.finfo(np.float16).tiny)
    s = np.where(np.abs(s) < tiny, np.copysign(tiny, s), s)
    with np.errstate(over="ignore"):
        half = s.astype(np.float16)
    return np.where(np.isfinite(half), half.astype(np.float32), s).astype(np.float32)


def _round_scales_fast(s: np.ndarray) -> np.ndarray:
    """:func:`round_scales` in fewer passes when no value needs its special cases (zero, tiny, non-finite
    or beyond float16): then it is the float16 rounding alone; else :func:`round_scales` itself."""
    s = s.astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        out = s.astype(np.float16).astype(np.float32)
    mag = np.abs(s)
    if mag.size and mag.min() >= np.finfo(np.float16).tiny and np.isfinite(out).all():  # NaN fails the first test
        return out
    return round_scales(s)


def row_scale_step(w: np.ndarray) -> np.ndarray:
    """The per-row step ``[N]`` of int8 scale codes for ``w [N, K]`` (float16-representable float32)."""
    w = np.asarray(w, dtype=np.float32)
    peak = np.zeros(w.shape[0], np.float32)
    if w.size:  # in row chunks: no |w| copy of a whole embedding table
        for r0 in range(0, w.shape[0], ROW_CHUNK):
            peak[r0 : r0 + ROW_CHUNK] = np.abs(w[r0 : r0 + ROW_CHUNK]).max(axis=1)
    return round_scales(peak * np.float32(SCALE_HEADROOM / (7.0 * SCALE_CODE_MAX)))


def snap_scales(s: np.ndarray, step: np.ndarray, up: bool = False) -> np.ndarray:
    """Scales ``s`` rounded to nonzero multiples ``c * step`` with ``|c| <= 127`` (``step`` broadcast to ``s``);
    ``up``: rounded away from zero (the smallest ``|c|`` with ``|c| * step >= |s|``, within the code range)."""
    c = s / step
    c = np.sign(c) * np.ceil(np.abs(c)) if up else np.rint(c)
    c = np.clip(c, -SCALE_CODE_MAX, SCALE_CODE_MAX)
    c = np.where(c == 0, np.where(s < 0, -1.0, 1.0), c)
    return (c * step).astype(np.float32)


def _candidate_table(
    wb: np.ndarray,
    symmetric: bool,
    ratios: tuple[float, ...],
    step: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    xt: np.ndarray | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray | None]:
    """The candidates of :func:`_candidates`, and per block the values ``[..., p]`` of probe elements (the
    value of largest magnitude; asymmetric: the minimum and the maximum) with their ``weights`` (broadcast
    to ``wb``; None: unweighted), whose error terms bound a candidate's error from below (:func:`block_params`).

    ``xt``: ``wb`` as ``[b, blocks]`` (contiguous), where the extremes are found along the first axis.
    The scales of every ratio are computed at once, stacked (``[C, ...]``): the same float32 operations
    per element as one ratio at a time, in a few calls instead of a few per ratio.
    """

    def rounded(x: np.ndarray) -> np.ndarray:
        return _round_scales_fast(x) if step is None else snap_scales(x, step)

    def by_ratio(x: np.ndarray, factors: list[float]) -> np.ndarray:
        """``x * np.float32(f)`` for each ``f``, stacked on a new first axis."""
        f = np.array(factors, dtype=np.float32).reshape((len(factors),) + (1,) * x.ndim)
        return x[None] * f

    shape = wb.shape[:-1]
    if xt is None:
        xt = np.ascontiguousarray(wb.reshape(-1, wb.shape[-1]).T)
    out = []
    pw = None
    if symmetric:
        if weights is None:  # the first value of largest magnitude, from the maximum and the minimum
            mx, mn = xt.max(axis=0), xt.min(axis=0)
            neg = -mn
            extreme = np.where(mx > neg, mx, mn)
            tie = ~((mx > neg) | (neg > mx))  # equal magnitudes (e.g. all-zero blocks), NaN: as argmax does
            if tie.any():
                at = np.flatnonzero(tie)
                rows = wb.reshape(-1, wb.shape[-1])[at]
                extreme[at] = np.take_along_axis(rows, np.abs(rows).argmax(axis=-1)[:, None], axis=-1)[:, 0]
            extreme = extreme.reshape(shape)
            px = extreme[..., None]
        else:
            idx = np.abs(wb).argmax(axis=-1)[..., None]
            px = np.take_along_axis(wb, idx, axis=-1)
            pw = np.take_along_axis(np.broadcast_to(weights, wb.shape), idx, axis=-1)
            extreme = px[..., 0]
        z = np.full(extreme.shape, 8, dtype=np.float32)
        scales = np.concatenate(
            [by_ratio(-extreme, [r / 8.0 for r in ratios]), by_ratio(extreme, [r / 7.0 for r in ratios[:3]])]
        )
        for s in rounded(scales):
            out.append((s, z))
        if step is not None:  # int8 codes are coarse: also the smallest code that clips nothing
            out.append((snap_scales(-extreme / np.float32(8.0), step, up=True), z))
            out.append((snap_scales(extreme / np.float32(7.0), step, up=True), z))
    else:
        wmin, wmax = xt.min(axis=0).reshape(shape), xt.max(axis=0).reshape(shape)
        if weights is None:
            px = np.stack([wmin, wmax], axis=-1)
        else:
            idx = np.stack([wb.argmin(axis=-1), wb.argmax(axis=-1)], axis=-1)
            px = np.take_along_axis(wb, idx, axis=-1)
            pw = np.take_along_axis(np.broadcast_to(weights, wb.shape), idx, axis=-1)
        lo = np.minimum(wmin, 0.0)
        hi = np.maximum(wmax, 0.0)
        spans = list(rounded(by_ratio(hi - lo, [r / QMAX_U4 for r in ratios])))
        if step is not None:
            spans.append(snap_scales((hi - lo) / np.float32(QMAX_U4), step, up=True))
        for r, s in zip((*ratios, 1.0), spans):
            z = np.clip(np.rint(-lo * np.float32(r) / s), 0, QMAX_U4).astype(np.float32)
            out.append((s, z))
    return out, px, pw


def _candidates(
    wb: np.ndarray, symmetric: bool, ratios: tuple[float, ...], step: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(scale, zero point)]`` candidates for blocks ``wb [..., b]`` (each ``[...]``), best guess first.

    ``step`` (broadcastable to ``wb.shape[:-1]``): snap the scales to int8 multiples of it (else float16).
    """
    return _candidate_table(wb, symmetric, ratios, step)[0]


def _codes(wb: np.ndarray, s: np.ndarray, z: np.ndarray, axis: int = -1) -> np.ndarray:
    """The codes ``clip(rint(w / s) + z, 0, 15)`` (float32) of blocks along ``axis`` of ``wb`` (the last
    axis: ``s``, ``z`` are ``wb.shape[:-1]``; the first: ``s``, ``z`` are ``wb.shape[1:]``)."""
    if axis == -1:
        s, z = s[..., None], z[..., None]
    u = np.rint(wb / s)
    u += z
    np.clip(u, 0, QMAX_U4, out=u)
    return u


def _squared_errors(
    x: np.ndarray, s: np.ndarray, z: np.ndarray, symmetric: bool, weights: np.ndarray | None, u: np.ndarray
) -> np.ndarray:
    """The (weighted) squared error terms of the values ``x`` quantized with scales ``s`` and zero points
    ``z`` (both broadcast to ``x``), computed in ``u`` (``x``'s shape) and returned.

    The clipping search's arithmetic: one sequence of float32 operations per element (whatever the
    layout), so a term computed on its own equals the same term computed within its block."""
    np.divide(x, s, out=u)
    np.rint(u, out=u)
    if symmetric:  # z == 8 for every candidate: clip(u + 8, 0, 15) - 8 == clip(u, -8, 7) exactly
        np.clip(u, -8, 7, out=u)
    else:
        u += z
        np.clip(u, 0, QMAX_U4, out=u)
        u -= z
    u *= s
    u -= x
    np.square(u, out=u)
    if weights is not None:
        u *= weights
    return u


def _pairwise_sum(t: np.ndarray) -> np.ndarray:
    """The sums of the columns of ``t [n, m]``, bit-identical to numpy's ``sum`` of the rows of ``t.T``.

    numpy sums a contiguous float32 row by pairwise summation: up to 8 values one by one; up to 128
    values in 8 interleaved partial sums, combined as ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``,
    then the remaining ``n % 8`` values one by one; beyond 128 the two halves (the first a multiple of 8
    values) summed apart and added. Here every step runs across all ``m`` columns at once (contiguous
    rows), instead of one short row after another (``tests/test_rtn_threads.py`` checks the identity
    against numpy for every ``n`` up to 300)."""
    n = t.shape[0]
    if n < 8:
        res = np.zeros(t.shape[1:], t.dtype)
        for i in range(n):
            res += t[i]
        return res
    if n <= 128:
        tail = n - n % 8
        r = t[0:8] + t[8:16] if tail >= 16 else t[0:8].copy()
        for i in range(16, tail, 8):
            r += t[i : i + 8]
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for i in range(tail, n):
            res += t[i]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(t[:half]) + _pairwise_sum(t[half:])


def block_params(
    wb: np.ndarray,
    symmetric: bool = True,
    clip_search: bool = True,
    weights: np.ndarray | None = None,
    step: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points (float32, shape ``wb.shape[:-1]``) for blocks ``wb [..., b]``.

    ``weights`` (broadcastable to ``wb``, e.g. ``diag H`` of the block's columns) weight the squared
    error minimised by the clipping search. ``step`` (broadcastable to ``wb.shape[:-1]``): int8 scale
    codes on that step (:func:`snap_scales`) instead of float16 scales.

    The search keeps, per block, the first candidate of least error (a later one wins only if its
    error is strictly smaller), with the float32 arithmetic of :func:`_squared_errors` and numpy's
    summation (:func:`_pairwise_sum`), on the blocks transposed to ``[b, blocks]`` so that every
    operation runs along long contiguous rows. A candidate is not evaluated on a block where it
    provably cannot win: the error is a float32 sum of non-negative terms, which (rounding being
    monotone) is at least any one of its terms, so a probe element's term (the block's extreme
    values, computed by the same operations) at least as large as the best error so far rules the
    candidate out; a candidate left alive on few blocks is evaluated on those only. The result is
    bit-identical to evaluating every candidate on every block.
    """
    s, z, _ = _search(wb, symmetric, clip_search, weights, step, codes=False)
    return s, z


def _search(
    wb: np.ndarray,
    symmetric: bool,
    clip_search: bool,
    weights: np.ndarray | None,
    step: np.ndarray | None,
    codes: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`block_params`, and with ``codes`` the codes of the chosen scales, ``[b, blocks]`` (float32)."""
    shape, b = wb.shape[:-1], wb.shape[-1]
    m = int(np.prod(shape))
    flat = wb.reshape(m, b)
    xt = np.ascontiguousarray(flat.T)  # [b, m]
    ratios = CLIP_RATIOS if clip_search else (1.0,)
    cands, px, pw = _candidate_table(wb, symmetric, ratios, step, weights, xt)
    if len(cands) == 1 or wb.size == 0:
        s, z = cands[0]
        return s, z, (_codes(xt, s.reshape(m), z.reshape(m), 0) if codes else None)
    wts = None if weights is None else np.broadcast_to(weights, wb.shape)
    wt = None if wts is None else np.ascontiguousarray(wts.reshape(m, b).T)
    buf = np.empty(b * m, np.float32)  # one buffer for every candidate
    # lower bounds of every candidate's error per block: the largest probe term
    scales = np.stack([s for s, _ in cands])
    zeros = np.stack([z for _, z in cands]) if not symmetric else scales
    terms = np.empty((len(cands), *px.shape), np.float32)
    _squared_errors(np.broadcast_to(px, terms.shape), scales[..., None], zeros[..., None], symmetric, pw, terms)
    bounds = terms.max(axis=-1).reshape(len(cands), m)
    del terms, px, pw
    scales = scales.reshape(len(cands), m)
    zeros = zeros.reshape(len(cands), m)
    best_s = scales[0].copy()
    best_z = zeros[0].copy() if not symmetric else np.full(m, 8, np.float32)
    best_err = _pairwise_sum(_squared_errors(xt, scales[0], zeros[0], symmetric, wt, buf.reshape(b, m)))
    for c in range(1, len(cands)):
        alive = ~(bounds[c] >= best_err)  # NaN bounds stay alive
        k = int(np.count_nonzero(alive))
        if k == 0:
            continue
        s, z = scales[c], zeros[c]
        if k > SPARSE_SEARCH * m:
            err = _pairwise_sum(_squared_errors(xt, s, z, symmetric, wt, buf.reshape(b, m)))
            better = err < best_err
            np.copyto(best_err, err, where=better)
            np.copyto(best_s, s, where=better)
            if not symmetric:
                np.copyto(best_z, z, where=better)
            continue
        sel = np.flatnonzero(alive)
        w_sel = None if wt is None else np.take(wt, sel, axis=1)
        x_sel = np.take(xt, sel, axis=1)
        err = _pairwise_sum(_squared_errors(x_sel, s[sel], z[sel], symmetric, w_sel, buf[: b * k].reshape(b, k)))
        better = err < best_err[sel]
        won = sel[better]
        best_err[won] = err[better]
        best_s[won] = s[won]
        if not symmetric:
            best_z[won] = z[won]
    return best_s.reshape(shape), best_z.reshape(shape), (_codes(xt, best_s, best_z, 0) if codes else None)


def search_threads() -> int:
    """Threads for the clipping search (numpy releases the GIL in its loops): ``ROW_THREADS``, else
    ``ONNXCOMPRESS_THREADS``, else the usable cores; at most 4 (:func:`onnxcompress.cores.search_threads`).
    The results do not depend on it (rows are searched independently)."""
    return cores.search_threads(ROW_THREADS)


_POOL: dict[tuple[int, int], Any] = {}  # (process id, threads) -> a ThreadPoolExecutor kept for reuse


def for_each(fn: Callable[[int], None], starts: Sequence[int]) -> None:
    """``fn(start)`` for every start, on :func:`search_threads` threads when there are several starts."""
    threads = min(search_threads(), len(starts))
    if threads <= 1:
        for start in starts:
            fn(start)
        return
    key = (os.getpid(), threads)  # a forked child (process pools) has none of its parent's threads
    if key not in _POOL:
        from concurrent.futures import ThreadPoolExecutor  # imported by the first weight that needs it

        _POOL[key] = ThreadPoolExecutor(threads, thread_name_prefix="onnxcompress-search")
    for _ in _POOL[key].map(fn, starts):  # re-raises a chunk's exception
        pass


def _check_scale_bits(scale_bits: int) -> None:
    if scale_bits not in SCALE_BITS:
        raise ValueError(f"scale_bits must be one of {SCALE_BITS}")


def quantize_rtn(
    w: np.ndarray,
    block: int,
    symmetric: bool = True,
    clip_search: bool = True,
    scale_bits: int = 16,
    col_weight: np.ndarray | None = None,
) -> Quantized:
    """Round-to-nearest block quantization of ``w [N, K]``, its rows searched in chunks of about
    ``SEARCH_CHUNK`` values, on :func:`search_threads` threads (the result does not depend on either).

    ``scale_bits``: 16 (float16 scales) or 8 (int8 codes times a per-row step, module docstring).
    ``col_weight`` (``[K]``, e.g. ``diag H``): weights of the clipping search's squared error per column.
    """
    _check_scale_bits(scale_bits)
    n, k = w.shape
    step = row_scale_step(w) if scale_bits == 8 else None
    wp = pad_columns(np.asarray(w, dtype=np.float32), block)
    nb = wp.shape[1] // block
    cw = None
    if col_weight is not None:
        cw = np.zeros(nb * block, dtype=np.float32)
        cw[:k] = col_weight
        cw = cw.reshape(nb, block)
    codes = np.empty((n, nb * block), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    zeros = np.empty((n, nb), dtype=np.uint8)
    rows = max(1, SEARCH_CHUNK // max(1, nb * block))
    chunks = max(-(-n // rows), min(search_threads(), n // MIN_CHUNK_ROWS))  # every thread busy when worth it
    rows = max(1, -(-n // max(1, chunks)))  # chunks of equal size

    def chunk(r0: int) -> None:  # rows are independent: chunks run on several threads (same results)
        r1 = r0 + rows
        wb = wp[r0:r1].reshape(-1, nb, block)
        st = None if step is None else step[r0:r1, None]
        s, z, u = _search(wb, symmetric, clip_search, cw, st, codes=True)
        codes[r0:r1].reshape(-1, block)[...] = u.astype(np.uint8).T  # integral 0..15: exact
        scales[r0:r1] = s
        zeros[r0:r1] = z

    for_each(chunk, range(0, n, rows))
    return Quantized(codes, scales, zeros, k, block, scale_step=step)


def quantize_int8(w: np.ndarray, block: int) -> Quantized:
    """Symmetric 8-bit blocks of ``w [N, K]``: ``u = clip(round(w / s), -127, 127) + 128``, ``s = max|w| / 127``
    per block (float16-representable), zero point 128 (the default of ``MatMulNBits`` with ``bits=8``)."""
    n, k = w.shape
    wp = pad_columns(np.asarray(w, dtype=np.float32), block)
    nb = wp.shape[1] // block
    codes = np.empty((n, nb * block), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    for r0 in range(0, n, ROW_CHUNK):
        wb = wp[r0 : r0 + ROW_CHUNK].reshape(-1, nb, block)
        s = round_scales(np.abs(wb).max(axis=-1) / np.float32(127.0))
        u = np.clip(np.rint(wb / s[..., None]), -127, 127) + 128
        codes[r0 : r0 + ROW_CHUNK] = u.reshape(-1, nb * block)
        scales[r0 : r0 + ROW_CHUNK] = s
    return Quantized(codes, scales, np.full((n, nb), 128, dtype=np.uint8), k, block, bits=8)


def stored_bytes(
    n: int, k: int, block: int, bits: int, symmetric: bool = True, scale_bytes: int = 2, row_bytes: int = 0
) -> int:
    """Bytes of codes (packed), scales (float16: 2 bytes; int8 codes: 1) and (asymmetric 4-bit) zero points
    of an ``[N, K]`` weight, plus ``row_bytes`` per row (the float16 step of int8 scale codes: 2)."""
    kp = k + (-k) % block
    nb = kp // block
    codes = n * kp * bits // 8
    return codes + scale_bytes * n * nb + (0 if symmetric or bits == 8 else n * nb) + row_bytes * n


class PackedHessian:
    """``H = sum X^T X`` of one activation ``X [rows, K]``, accumulated over the calibration slices.

    Stored as its upper triangle, row by row (float32, ``K (K + 1) / 2`` values): numpy computes
    ``X^T X`` as a symmetric rank-k update, so the matrix is exactly symmetric and the triangle loses
    nothing (:meth:`matrix` equals the float32 sum of the full products bit for bit), while the
    Hessians of every activation of the model are held at once (MiniLM: 67 -> 34 MB). The smoothing
    of the activation (``smooth``: ``1 / s`` per channel, int8-dynamic) is applied when a weight asks
    for the matrix, one activation at a time, instead of keeping a float64 copy of each.
    """

    _scratch: dict[int, np.ndarray] = {}  # K -> the [K, K] buffer of ``add`` (see release)

    def __init__(self, k: int) -> None:
        self.k = k
        self.upper = np.zeros(k * (k + 1) // 2, dtype=np.float32)
        self.smooth: np.ndarray | None = None

    def _rows(self) -> Iterator[tuple[int, int, int]]:
        """``(row, start, end)``: row ``i``'s part ``[i, K)`` of the triangle is ``upper[start:end]``."""
        start = 0
        for i in range(self.k):
            end = start + self.k - i
            yield i, start, end
            start = end

    def add(self, x: np.ndarray) -> None:
        """Add ``x^T x`` of one slice ``x [rows, K]`` (float32), through a scratch buffer kept per ``K``
        (a few MB; allocated and freed per slice, such buffers fragment the heap)."""
        k = self.k
        if k not in self._scratch:
            self._scratch[k] = np.empty((k, k), dtype=np.float32)
        full = np.matmul(x.T, x, out=self._scratch[k])
        for i, a, b in self._rows():
            self.upper[a:b] += full[i, i:]

    def matrix(self) -> np.ndarray:
        """The full ``[K, K]`` matrix: float32, or float64 once smoothed (``H * outer(1/s, 1/s)``)."""
        full = np.empty((self.k, self.k), dtype=np.float32)
        for i, a, b in self._rows():
            full[i, i:] = self.upper[a:b]
            full[i:, i] = self.upper[a:b]  # the mirror image below the diagonal
        if self.smooth is None:
            return full
        # ``full * outer.astype(float64)``, the product written into the float64 outer product (the same
        # floats; one float64 K x K array instead of two: 19 MB fewer at K = 1536)
        outer = np.outer(self.smooth, self.smooth).astype(np.float64)
        return np.multiply(full, outer, out=outer)

    @property
    def nbytes(self) -> int:
        return int(self.upper.nbytes)

    @classmethod
    def release(cls) -> None:
        """Drop the scratch buffers (end of the calibration)."""
        cls._scratch = {}


@dataclasses.dataclass
class PreparedHessian:
    """What GPTQ needs from ``H`` (shared by every weight multiplied by the same activations).

    Attributes:
        perm: Processing order of the (padded) columns.
        u: Upper Cholesky factor of the damped ``H^-1``, in processing order, float32.
        dead: Columns with ``H_kk = 0`` (never activated: their weights are zeroed).
        col_weight: ``diag H`` in the original order (weights of the clipping search), float32.
    """

    perm: np.ndarray
    u: np.ndarray
    dead: np.ndarray
    col_weight: np.ndarray


def prepare_hessian(
    h: np.ndarray, block: int, damp: float = 0.01, act_order: bool = False, shrink: float = 0.0
) -> PreparedHessian:
    """Pad ``h [K, K]`` to a multiple of ``block``, shrink it toward its diagonal (``shrink`` in ``[0, 1]``:
    the off-diagonal terms times ``1 - shrink``), damp it and factor its inverse.

    Memory: one float64 ``K_pad x K_pad`` copy (permuted only with ``act_order``; none when ``h`` is
    an array-like whose fresh float64 array can be taken over, see :func:`_padded_float64`) plus what
    the factorisation needs (:func:`_inverse_cholesky_upper` drops each intermediate, the damped copy
    included, as soon as it can, and trims the heap between its steps);
    callers should not hold a float64 ``h`` across the call when they can avoid it.

    Raises:
        ValueError: if ``h`` is not square or stays singular after damping.
    """
    k = h.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} is not square")
    kp = k + (-k) % block
    hp = _padded_float64(h, kp)
    del h
    diag = np.diagonal(hp).copy()
    dead = diag <= 0
    hp[dead, dead] = 1.0
    diag[dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(kp)
    if act_order:  # the identity permutation would copy hp for nothing
        hp = hp[np.ix_(perm, perm)]
    shrink = min(max(float(shrink), 0.0), 1.0)
    if shrink > 0.0:  # (1 - a) H + a diag(H), in place: the diagonal is kept, the rest scaled
        kept = np.diagonal(hp).copy()
        hp *= 1.0 - shrink
        hp[np.diag_indices(kp)] = kept
        del kept
    hp[np.diag_indices(kp)] += max(damp, 0.0) * float(np.mean(np.diagonal(hp)))
    holder = [hp]
    del hp  # the factorisation drops it once factored (see _inverse_cholesky_upper)
    u = _inverse_cholesky_upper(holder)
    return PreparedHessian(perm, u, dead, diag.astype(np.float32))


def _lone_refcount() -> int:
    """``sys.getrefcount`` of an array held by one local name only (2 on CPython 3.11; measured, not assumed)."""
    a = np.empty(1)
    return sys.getrefcount(a)


_LONE_REFS = _lone_refcount()
TRIM_MIN_BYTES = 4 << 20  # float64 K x K matrices from this size on: the heap is trimmed between the steps


def _padded_float64(h: np.ndarray, kp: int) -> np.ndarray:
    """``h`` zero-padded to a float64 ``kp x kp`` array that :func:`prepare_hessian` may modify.

    An ndarray is copied. An array-like (``__array__``, read once: ``dynamic._MatrixOf``,
    ``int4._Once``) whose array is already float64 ``kp x kp``, owns its memory and is referenced
    nowhere else (made for this call) is taken as it is: no second float64 ``K x K`` copy beside it
    (MiniLM, ``K = 1536``: 19 MB). The values are the same either way.
    """
    k = h.shape[0]
    src = h if isinstance(h, np.ndarray) else np.asarray(h, dtype=np.float64)
    if (
        src is not h
        and src.shape == (kp, kp)
        and src.dtype == np.float64
        and src.base is None
        and src.flags.c_contiguous
        and src.flags.writeable
        and sys.getrefcount(src) <= _LONE_REFS  # as many as a local array that nothing else holds
    ):
        return src
    hp = np.zeros((kp, kp), dtype=np.float64)
    hp[:k, :k] = src
    return hp


def gptq(
    w: np.ndarray,
    h: np.ndarray | PreparedHessian,
    block: int,
    *,
    symmetric: bool = True,
    clip_search: bool = True,
    damp: float = 0.01,
    act_order: bool = False,
    batch: int = 128,
    scale_bits: int = 16,
    shrink: float = 0.0,
) -> Quantized:
    """GPTQ of ``w [N, K]`` given ``h [K, K] = sum X^T X`` over calibration inputs (module docstring).

    ``h`` may be a :class:`PreparedHessian` (then ``damp``, ``act_order`` and ``shrink`` are those it was made with).
    ``scale_bits``: 16 (float16 scales) or 8 (int8 codes times a per-row step).

    Raises:
        ValueError: if ``h`` does not match ``K`` or stays singular after damping, or ``scale_bits`` is not 8 or 16.
    """
    _check_scale_bits(scale_bits)
    n, k = w.shape
    step = row_scale_step(w) if scale_bits == 8 else None
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(h, block, damp, act_order, shrink)
    wp = pad_columns(np.asarray(w, dtype=np.float32), block)
    kp = wp.shape[1]
    nb = kp // block
    if prep.u.shape != (kp, kp):
        raise ValueError(f"Hessian shape {prep.u.shape} does not match K={k} padded to {kp}")
    perm, u, col_weight = prep.perm, prep.u, prep.col_weight
    wq = wp.copy()  # the working copy that absorbs the errors
    wq[:, prep.dead] = 0.0
    wq = wq[:, perm]
    pos_of = np.empty(kp, dtype=np.int64)
    pos_of[perm] = np.arange(kp)

    codes = np.zeros((n, kp), dtype=np.uint8)  # original column order
    scales = np.zeros((n, nb), dtype=np.float32)
    zeros = np.zeros((n, nb), dtype=np.float32)
    have = np.zeros(nb, dtype=bool)
    batch = max(block, batch)
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        w1 = wq[:, i1:i2].copy()
        err = np.zeros((n, i2 - i1), dtype=np.float32)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block
            if not have[g]:
                pos = pos_of[g * block : (g + 1) * block]
                cur = np.empty((n, block), dtype=np.float32)
                inside = pos < i2
                cur[:, inside] = w1[:, pos[inside] - i1]
                if not inside.all():
                    out = pos[~inside]
                    cur[:, ~inside] = wq[:, out] - err[:, :i] @ u[i1 : i1 + i, out]
                s, z = block_params(cur, symmetric, clip_search, col_weight[g * block : (g + 1) * block], step)
                scales[:, g], zeros[:, g] = s, z
                have[g] = True
            s, z = scales[:, g], zeros[:, g]
            wcol = w1[:, i]
            q = np.clip(np.rint(wcol / s) + z, 0, QMAX_U4)
            codes[:, col] = q
            e = (wcol - (q - z) * s) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        wq[:, i2:] -= err @ u[i1:i2, i2:]
    return Quantized(codes, scales, zeros.astype(np.uint8), k, block, scale_step=step)


def _inverse_cholesky_upper(h: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Upper ``U`` (float32) with ``H^-1 = U^T U``, from one Cholesky factorisation.

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and
    ``J L^-1 J`` is upper triangular with a positive diagonal, so it is the Cholesky factor sought.
    ``h`` may be a one-element list holding ``H``: it is emptied once ``L`` is computed, so that
    ``H`` is freed before the inverse (float64 ``K x K`` arrays: 18 MB at ``K = 1536``).

    Raises:
        ValueError: if ``H`` is not positive definite.
    """
    # Large factorisations trim the heap between their steps: numpy's float64 K x K buffers (four at
    # once in ``inv``) land in the heap once glibc's mmap threshold has risen, and the pages of the
    # ones just freed would otherwise stay resident under the next step's (MiniLM, K = 1536: ~30 MB).
    trim = (h[0] if isinstance(h, list) else h).nbytes >= TRIM_MIN_BYTES
    if trim:
        trim_heap()
    try:
        if isinstance(h, list):
            low = np.linalg.cholesky(h[0][::-1, ::-1])
            h.clear()
        else:
            low = np.linalg.cholesky(h[::-1, ::-1])
        if trim:
            trim_heap()
        inv = np.linalg.inv(low)
        del low
    except np.linalg.LinAlgError:
        raise ValueError("the Hessian is not positive definite even after damping") from None
    if trim:
        trim_heap()
    u = np.ascontiguousarray(inv[::-1, ::-1], dtype=np.float32)
    del inv
    if trim:
        trim_heap()
    if not np.all(np.isfinite(u)):
        raise ValueError("the Hessian is too ill-conditioned for GPTQ")
    return u


def output_error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    """``||x w^T - x wq^T||_F^2`` for ``x [n, K]`` and weights ``[N, K]`` (for tests and reports)."""
    d = x.astype(np.float64) @ (w.astype(np.float64) - wq.astype(np.float64)).T
    return float(np.sum(d * d))
