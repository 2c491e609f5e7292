"""Rate of quantized weights under the transport coder, and entropy-constrained rounding (ECR).

**Rate model.** ``onnxcompress pack`` codes int8 symbols with rANS, one frequency table per *class*
of rows or columns (classes by the standard deviation of the symbols; ``G`` in {1, 4, 16}), so a
weight's coded size is close to ``sum_g n_g H(p_g)`` bits, ``p_g`` the empirical distribution of
class ``g``, plus the tables. :func:`coded_bits` computes that estimate on either axis of a 2-D
symbol array and keeps the cheapest, as the coder does (within 1-2% of the package, measured on
MiniLM). A uniform quantizer of step ``D`` on a smooth density has, at high rate,
``R ~= h(W) - log2 D`` bits and distortion ``D^2 / 12`` per weight: halving the step costs one bit
per weight whatever the bit width, which is why the bit width (the clipping range,
``qmax = 2^(b-1) - 1``) is nearly free once the symbols are entropy coded and the step is what
counts.

**Entropy-constrained rounding.** The decoder is fixed (``w' = q * s``), but the encoder may pick
any symbol. With ``x = w / s`` (the weight in steps), ``L(q) = -log2 p(q)`` the code length of
symbol ``q`` under its class's distribution and ``h >= 0`` an importance weight (1, or the GPTQ
error weight), ECR minimises per weight the Lagrangian

    J(q) = h (x - q)^2 + lam * L(q)        over q in {floor(x), ceil(x)} (within [-qmax, qmax])

(distortion in units of ``s^2``, ``lam`` in step^2 per bit). Rounding to nearest is ``lam = 0``.
With ``f = |x - round(x)| <= 1/2`` the far neighbour costs ``h (1 - 2f)`` more distortion, so a
weight moves exactly when ``h (1 - 2f) < lam (L(near) - L(far))``: only towards the more probable
symbol (towards the mode, zero for weights), only near the midpoint, and never by more than
one step. The distribution ``p`` depends on the choices; :func:`ecr_round` alternates (the
Chou-Lookabaugh-Gray iteration of entropy-constrained scalar quantization): start from
round-to-nearest, re-estimate ``p`` per class, re-decide, a few times (each step lowers
``sum J``, so it converges).

When is it worth it? For round-to-nearest at step ``s``, ``D = s^2/12`` and ``R = h - log2 s``, so
a coarser step buys bits at ``-dD/dR = 2 ln 2 * D = (ln 2 / 6) s^2 ~= 0.116 s^2`` per bit. ECR
with ``lam`` below that buys bits more cheaply at the margin (each flip costs at most
``lam * dL`` of distortion); the gain is largest at low rates (3-5 bit steps), where a
dead zone around zero removes many ``+-1`` symbols, and vanishes at high rate, where a uniform
quantizer followed by entropy coding is already within 0.25 bit of the rate-distortion bound.
Measured on all-MiniLM-L6-v2 (``scripts/bench_tune.py --ecr``: every weight ``step=rms`` with GPTQ,
MatMuls at 5.5 or 6 bits, the word embeddings 1.5 bits lower): ``lam`` = 0.03 / 0.1 shrink the
package by 0.1-0.4%, and the worst held-out cosine moves by +-0.0015 (GPTQ's error feedback turns
every changed decision into a different rounding path), i.e. -0.5% to +1.7% of the bytes at equal
fidelity: within the noise of the measurement. At these 5-7 bit steps the quantizer is in the high
rate regime; ECR is an option (default off), not what reaches the package target.
"""

from __future__ import annotations

import numpy as np

LN2 = float(np.log(2.0))
CLASS_CHOICES = (1, 4, 16)  # the transport coder's class counts
TABLE_BITS_PER_SYMBOL = 12.0  # an order-of-magnitude cost of one frequency-table entry (zstd-coded counts)
RTN_SLOPE = LN2 / 6.0
ESTIMATE_SYMBOLS = 2**21  # -dD/dR of round-to-nearest, in step^2 per bit


def entropy_bits(counts: np.ndarray) -> float:
    """Total code length (bits) of the symbols counted in ``counts`` (last axis: the alphabet)."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum(axis=-1, keepdims=True)
    p = np.where(c > 0, c / np.maximum(n, 1.0), 1.0)
    return float(-(c * np.log2(p)).sum())


def classes_of(q: np.ndarray, groups: int) -> np.ndarray:
    """Class (0..groups-1) of each row of the 2-D ``q``, by the quantile of its standard deviation
    (the transport coder's grouping)."""
    if groups <= 1 or q.shape[0] < groups:
        return np.zeros(q.shape[0], dtype=np.int64)
    spread = q.astype(np.float32).std(axis=1)
    edges = np.quantile(spread, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, spread, side="right").astype(np.int64)


def class_counts(q: np.ndarray, classes: np.ndarray, groups: int) -> np.ndarray:
    """Histograms ``[groups, 256]`` of the int symbols of ``q`` (rows of 2-D ``q`` by ``classes``)."""
    sym = q.astype(np.int64) + 128
    idx = (classes[:, None] * 256 + sym).ravel()
    return np.bincount(idx, minlength=groups * 256).reshape(groups, 256)


def _as_2d(q: np.ndarray) -> np.ndarray:
    if q.ndim == 2:
        return q
    if q.ndim < 2:
        return q.reshape(1, -1)
    return q.reshape(q.shape[0], -1)


def coded_bits(q: np.ndarray) -> float:
    """Estimated transport-coded size in bits of the integer symbols ``q`` (values in [-128, 127]).

    Rows are ``q``'s first axis (the coder's rows); above ``ESTIMATE_SYMBOLS`` symbols the histograms
    come from an even sample of rows, scaled up. The estimate is the cheapest of 1, 4 or 16
    classes on rows or on columns: ``sum_g n_g H(p_g)`` + ``log2 G`` bits per row or column + a
    table cost per used symbol and class.
    """
    m = _as_2d(np.asarray(q))
    full_rows = m.shape[0]
    scale = 1.0
    if m.size > ESTIMATE_SYMBOLS and m.shape[0] > 64:
        step = max(1, m.size // ESTIMATE_SYMBOLS)
        m = m[::step]  # an even sample of rows, as the coder estimates its choice
        scale = full_rows / m.shape[0]
    best = float("inf")
    for axis in (0, 1):
        mm = m.T if axis else m
        for groups in CLASS_CHOICES:
            if (groups == 1 and axis == 1) or (groups > 1 and mm.shape[0] < 64 * groups):
                continue
            cls = classes_of(mm, groups)
            counts = class_counts(mm, cls, groups)
            lines = full_rows if axis == 0 else mm.shape[0]
            bits = entropy_bits(counts) * scale + lines * np.log2(groups)
            bits += TABLE_BITS_PER_SYMBOL * float(np.count_nonzero(counts))
            best = min(best, bits)
    return best


def coded_bytes(q: np.ndarray) -> int:
    """:func:`coded_bits` in whole bytes."""
    return int(np.ceil(coded_bits(q) / 8.0))


def code_lengths(q2: np.ndarray, classes: np.ndarray, groups: int, floor: float = 1e-3) -> np.ndarray:
    """``L[g, sym + 128] = -log2 p_g(sym)`` per class (unseen symbols get ``floor`` of a count)."""
    counts = class_counts(q2, classes, groups).astype(np.float64)
    counts = np.maximum(counts, floor)
    p = counts / counts.sum(axis=1, keepdims=True)
    return -np.log2(p)


def _decide(
    x: np.ndarray, len_table: np.ndarray, cls: np.ndarray, qmax: int, lam: float, importance: np.ndarray | float
) -> np.ndarray:
    """ECR decision for 2-D ``x`` (rows by class ``cls``) with code lengths ``len_table [G, 256]``."""
    near = np.clip(np.rint(x), -qmax, qmax)
    lo = np.clip(np.floor(x), -qmax, qmax)
    far = np.where(near == lo, np.minimum(lo + 1, qmax), lo)
    rows = cls[:, None]
    l_near = len_table[rows, (near + 128).astype(np.int64)]
    l_far = len_table[rows, (far + 128).astype(np.int64)]
    d_near = (x - near) ** 2
    d_far = (x - far) ** 2
    move = importance * (d_far - d_near) < lam * (l_near - l_far)
    return np.where(move, far, near)


def ecr_round(
    x: np.ndarray,
    qmax: int,
    lam: float,
    *,
    importance: np.ndarray | float = 1.0,
    channel_axis: int | None = None,
    groups: int = 16,
    iterations: int = 3,
) -> np.ndarray:
    """Entropy-constrained rounding of ``x`` (the weight divided by its scales) to integers in
    ``[-qmax, qmax]`` (float64 array of whole numbers, ``x``'s shape).

    Args:
        x: Weights in units of their step.
        qmax: Largest symbol magnitude.
        lam: Lagrange multiplier in step^2 per bit (0: round to nearest).
        importance: Weight of each element's squared error (broadcastable to ``x``).
        channel_axis: The axis whose slices share a distribution (one class per slice, classes by
            spread as the coder groups them); None: one distribution for the whole tensor.
        groups: Number of classes (the coder uses up to 16).
        iterations: Re-estimations of the distribution.
    """
    x = np.asarray(x, dtype=np.float64)
    q = np.clip(np.rint(x), -qmax, qmax)
    if lam <= 0 or x.size == 0:
        return q
    if channel_axis is None:
        x2 = x.reshape(1, -1)
    else:
        x2 = np.moveaxis(x, channel_axis, 0).reshape(x.shape[channel_axis], -1)
    imp = np.broadcast_to(np.asarray(importance, dtype=np.float64), x.shape)
    imp2 = imp.reshape(1, -1) if channel_axis is None else np.moveaxis(imp, channel_axis, 0).reshape(x2.shape)
    q2 = np.clip(np.rint(x2), -qmax, qmax)
    g = groups if channel_axis is not None else 1
    cls = classes_of(q2, g)
    g = int(cls.max()) + 1 if cls.size else 1
    for _ in range(max(1, iterations)):
        table = code_lengths(q2, cls, g)
        new = _decide(x2, table, cls, qmax, lam, imp2)
        if np.array_equal(new, q2):
            break
        q2 = new
    if channel_axis is None:
        return q2.reshape(x.shape)
    shape = [x.shape[channel_axis]] + [s for i, s in enumerate(x.shape) if i != channel_axis]
    return np.moveaxis(q2.reshape(shape), 0, channel_axis)


def gptq_round(
    w_rows: np.ndarray,
    scales: np.ndarray,
    u: np.ndarray,
    qmax: int,
    lam: float = 0.0,
    *,
    groups: int = 16,
    batch: int = 128,
) -> np.ndarray:
    """GPTQ (see :mod:`.gptq`) with fixed scales and optional ECR decisions: the integer symbols of
    ``w_rows [N, K]`` (rows: output channels, columns: the reduction axis).

    Args:
        w_rows: The weight, ``[N, K]``.
        scales: The step of every element, broadcastable to ``[N, K]`` (fixed before the loop).
        u: Upper Cholesky factor of the damped ``H^-1`` (``[K, K]``, ``prepare_hessian(..).u`` without
            reordering).
        qmax: Largest symbol magnitude.
        lam: ECR multiplier (0: round to nearest); code lengths come from the round-to-nearest symbols'
            class distributions (classes over rows, as :func:`ecr_round`).

    Each column ``k`` is rounded (nearest, or by the ECR rule with importance ``1``: the GPTQ error of a
    column is weighted by the same ``1 / U_kk^2`` for every row, so it only rescales ``lam``), and the
    columns not yet rounded absorb its error ``(w_k - q_k s_k) / U_kk`` through ``U``, as in GPTQ.
    """
    n, k = w_rows.shape
    s = np.broadcast_to(np.asarray(scales, dtype=np.float32), (n, k))
    wq = np.array(w_rows, dtype=np.float32, copy=True)
    q = np.zeros((n, k), dtype=np.float32)
    table = cls = None
    if lam > 0:
        q0 = np.clip(np.rint(wq / s), -qmax, qmax)
        cls = classes_of(q0, groups)
        table = code_lengths(q0, cls, int(cls.max()) + 1 if cls.size else 1)
    for i1 in range(0, k, batch):
        i2 = min(i1 + batch, k)
        w1 = wq[:, i1:i2].copy()
        err = np.zeros((n, i2 - i1), dtype=np.float32)
        for i in range(i2 - i1):
            col = i1 + i
            x = w1[:, i] / s[:, col]
            if table is not None:
                qc = _decide(x[:, None].astype(np.float64), table, cls, qmax, lam, 1.0)[:, 0]  # type: ignore[arg-type]
            else:
                qc = np.clip(np.rint(x), -qmax, qmax)
            q[:, col] = qc
            e = (w1[:, i] - qc * s[:, col]) / u[col, col]
            w1[:, i:] -= np.outer(e, u[col, col:i2])
            err[:, i] = e
        if i2 < k:
            wq[:, i2:] -= err @ u[i1:i2, i2:]
    return q
