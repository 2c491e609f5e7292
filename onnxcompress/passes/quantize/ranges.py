"""Activation range estimators for static quantization, fed one calibration batch at a time.

A :class:`RangeCollector` keeps, per tensor, the exact minimum and maximum and a histogram of
``2 * bins`` bins of width ``w`` over ``[-bins w, bins w)`` (``bins = 2048`` per sign, so a ReLU
output still gets 2048 bins). A batch that exceeds the span doubles ``w`` as often as needed
(adjacent bins merged pairwise, so the counts stay exact), hence at least half of the bins of the
wider side cover the data and memory stays ``O(bins)`` per tensor however many batches are seen.
A batch of more than ``SAMPLE`` (2^20) values enters the histogram through an even stride (the
histogram is a statistical estimate anyway); the minimum and maximum always see every value.

From the collected data a method picks a clipping range ``[lo, hi]`` (``lo <= 0 <= hi``):

* ``minmax``: the exact extremes.
* ``percentile``: ``hi`` is the ``p``-th percentile of ``x`` and ``lo`` the ``(100 - p)``-th
  (symmetric: ``hi = -lo`` = the ``p``-th percentile of ``|x|``), linear within a bin.
* ``entropy``: TensorRT's KL-divergence calibration on the 2048-bin histogram of ``|x|``: for each
  candidate threshold ``t_i`` (bin edge ``i >= L``), ``P`` is the histogram clipped at ``i`` (the
  outliers added to its last bin) and ``Q`` is ``P``'s first ``i`` bins merged into ``L`` levels
  and spread back over the non-empty bins; the threshold minimising ``KL(P || Q)`` wins. ``L`` is
  256 for a non-negative tensor quantized asymmetrically (uint8 over ``[0, t]``), else 128 (one
  side of int8). The range is ``[max(min, -t), min(max, t)]``.
* ``mse``: the expected squared error of quantizing the histogram to ``[a lo0, a hi0]``
  (``[lo0, hi0]`` = min/max, ``a`` on a grid of 100 values in ``(0, 1]``) with ``levels`` levels,
  step ``s = (hi - lo) / (levels - 1)``: ``sum_b n_b (s^2 / 12)`` over the bins inside the range
  (uniform rounding noise) plus ``sum_b n_b (c_b - clip(c_b))^2`` over the
  bins outside (``c_b`` the bin centre). The ``a`` with the least error wins.

:func:`scale_zero_point` turns a range into a scale and a zero point the way onnxruntime does:
``s = (hi - lo) / (qmax - qmin)``, ``z = round(qmin - lo / s)`` clipped to ``[qmin, qmax]``
(asymmetric, uint8 ``[0, 255]``), or ``s = max(|lo|, |hi|) / 127``, ``z = 0`` (symmetric int8).
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048
# Histograms take at most this many values per batch (evenly strided); min and max are always exact.
SAMPLE = 1 << 20


class RangeCollector:
    """Streams one tensor's batches; :meth:`range` gives a clipping range by any method.

    The histogram has ``2 * bins`` bins of width ``w``, bin ``k`` covering ``[(k - bins) w, (k - bins + 1) w)``;
    the first batch sets ``w = max|x| / bins`` and a later, wider batch doubles ``w`` as often as needed.

    Args:
        histogram: Keep a histogram (needed by every method but ``minmax``).
        bins: Histogram bins per sign.
    """

    def __init__(self, histogram: bool = True, bins: int = BINS) -> None:
        if bins & (bins - 1):
            raise ValueError("bins must be a power of two")
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.histogram = histogram
        self.bins = bins
        self.width = 0.0
        self.hist = np.zeros(2 * bins, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """Add one batch (non-finite values are ignored)."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(x.size)
        if self.histogram:
            stride = -(-x.size // SAMPLE)
            self._add(x[::stride] if stride > 1 else x, max(-lo, hi))

    def _add(self, x: np.ndarray, top: float) -> None:
        n = self.bins
        if top == 0.0 and self.width == 0.0:
            self.hist[n] += x.size  # all zeros: bin [0, w) whatever w becomes
            return
        if self.width == 0.0:
            self.width = max(top / n, float(np.finfo(np.float32).tiny))
        elif top >= self.width * n:
            f = 1 << max(1, int(np.ceil(np.log2(top / (self.width * n)))))
            while top >= self.width * f * n:  # float rounding at the edge
                f *= 2
            pos, neg = self.hist[n:], self.hist[:n][::-1]
            if f <= n:
                pos, neg = pos.reshape(-1, f).sum(axis=1), neg.reshape(-1, f).sum(axis=1)
            else:
                pos, neg = pos.sum(keepdims=True), neg.sum(keepdims=True)
            self.hist = np.zeros(2 * n, dtype=np.int64)
            self.hist[n : n + pos.size] = pos
            self.hist[n - neg.size : n] = neg[::-1]
            self.width *= f
        idx = x / np.float32(self.width)
        np.floor(idx, out=idx)
        idx += n
        np.clip(idx, 0, 2 * n - 1, out=idx)
        self.hist += np.bincount(idx.astype(np.int32), minlength=2 * n)

    @property
    def seen(self) -> bool:
        """Whether any finite value was collected."""
        return self.count > 0

    def range(self, method: str = "minmax", symmetric: bool = False, percentile: float = 99.999) -> tuple[float, float]:
        """The clipping range ``[lo, hi]`` (always containing 0) chosen by ``method``."""
        if not self.seen:
            return 0.0, 0.0
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if method == "minmax" or (lo == 0.0 and hi == 0.0):
            pass
        elif method == "percentile":
            lo, hi = self._percentile(percentile, symmetric)
        elif method == "entropy":
            levels = 256 if (not symmetric and self.min >= 0) else 128
            t = kl_threshold(*self._abs_hist(), levels)
            lo, hi = max(lo, -t), min(hi, t)
        elif method == "mse":
            lo, hi = self._mse(symmetric)
        else:
            raise ValueError(f"unknown range method {method!r}")
        if symmetric:
            a = max(-lo, hi)
            return -a, a
        return lo, hi

    # -------------------------------------------------------------------------------- methods

    def _signed_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lower edges, upper edges, counts)`` of the histogram, ascending."""
        edges = (np.arange(2 * self.bins + 1) - self.bins) * max(self.width, 1e-30)
        return edges[:-1], edges[1:], self.hist.astype(np.float64)

    def _quantile(self, q: float) -> float:
        lows, highs, counts = self._signed_bins()
        cum = np.cumsum(counts)
        target = q * cum[-1]
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, counts.size - 1)
        before = cum[i] - counts[i]
        frac = 0.0 if counts[i] == 0 else (target - before) / counts[i]
        return float(lows[i] + frac * (highs[i] - lows[i]))

    def _percentile(self, p: float, symmetric: bool) -> tuple[float, float]:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if symmetric:
            hist, width = self._abs_hist()
            cum = np.cumsum(hist)
            target = p / 100.0 * cum[-1]
            i = min(int(np.searchsorted(cum, target, side="left")), hist.size - 1)
            before = cum[i] - hist[i]
            frac = 0.0 if hist[i] == 0 else (target - before) / hist[i]
            a = min(max(-lo, hi), (i + frac) * width)
            return -a, a
        q_hi = self._quantile(p / 100.0)
        q_lo = self._quantile(1.0 - p / 100.0)
        return max(lo, min(q_lo, 0.0)), min(hi, max(q_hi, 0.0))

    def _abs_hist(self) -> tuple[np.ndarray, float]:
        """Histogram of ``|x|`` (bin ``k`` covers ``[k w, (k + 1) w)``) and ``w``."""
        n = self.bins
        return (self.hist[n:] + self.hist[:n][::-1]).astype(np.float64), max(self.width, 1e-30)

    def _mse(self, symmetric: bool) -> tuple[float, float]:
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        lows, highs, counts = self._signed_bins()
        keep = counts > 0
        centers = (0.5 * (lows + highs))[keep]
        counts = counts[keep]
        alphas = np.linspace(0.01, 1.0, 100)[:, None]
        if symmetric:
            a = max(-lo0, hi0)
            lo, hi, levels = -alphas * a, alphas * a, 255
        else:
            lo, hi, levels = alphas * lo0, alphas * hi0, 256
        step = (hi - lo) / (levels - 1)
        clipped = np.clip(centers[None, :], lo, hi)
        inside = (centers[None, :] >= lo) & (centers[None, :] <= hi)
        err = np.where(inside, step**2 / 12.0, (centers - clipped) ** 2)
        best = int(np.argmin((err * counts).sum(axis=1)))
        return float(lo[best, 0]), float(hi[best, 0])


def kl_threshold(hist: np.ndarray, width: float, levels: int = 128) -> float:
    """TensorRT's entropy calibration: the clipping threshold of ``|x|`` minimising ``KL(P || Q)``.

    ``hist`` is the histogram of ``|x|`` on edges ``k * width``. Candidates are searched every 16
    bins, then bin by bin around the best.
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    if n <= levels or hist.sum() == 0:
        return n * width
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])

    def divergence(i: int) -> float:
        p = hist[:i].copy()
        p[-1] += tail[i]
        nonzero = p != 0
        starts = (np.arange(levels) * i) // levels
        sums = np.add.reduceat(hist[:i], starts)
        used = np.add.reduceat(nonzero.astype(np.float64), starts)
        per = np.divide(sums, used, out=np.zeros_like(sums), where=used > 0)
        q = np.repeat(per, np.diff(np.append(starts, i))) * nonzero
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            return np.inf
        p, q = p / ps, q / qs
        m = p > 0
        return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))

    coarse = list(range(levels, n + 1, 16))
    if coarse[-1] != n:
        coarse.append(n)
    best = min(coarse, key=divergence)
    fine = range(max(levels, best - 15), min(n, best + 15) + 1)
    best = min(fine, key=divergence)
    return best * width


def scale_zero_point(lo: float, hi: float, symmetric: bool) -> tuple[np.float32, int]:
    """Scale and zero point of a range: uint8 asymmetric, or int8 symmetric (zero point 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        a = max(-lo, hi)
        scale = np.float32(a / 127.0)
        if not np.isfinite(scale) or scale < np.finfo(np.float32).tiny:
            return np.float32(1.0), 0
        return scale, 0
    scale = np.float32((hi - lo) / 255.0)
    if not np.isfinite(scale) or scale < np.finfo(np.float32).tiny:
        return np.float32(1.0), 0
    zp = int(np.clip(np.rint(-lo / float(scale)), 0, 255))
    return scale, zp
