"""Scale and rounding maths shared by the quantization passes.

Symmetric linear quantization to ``b`` bits with ``qmax = 2**(b-1) - 1`` (127 for int8):

    s_c = max_i |W[c, i]| / qmax        (per channel c; over the whole tensor when per-tensor)
    q   = clip(round(W / s_c), -qmax, qmax)
    W'  = q * s_c                       (DequantizeLinear with zero point 0)

so every element's error is at most ``s_c / 2``. The range is kept symmetric (``-qmax``, not
``-qmax - 1``) so that ``-W`` quantizes exactly to ``-q``. An all-zero channel gets ``s_c = 1``.
"""

from __future__ import annotations

import numpy as np


def symmetric_scales(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Per-channel (``axis``) or per-tensor (``axis=None``) symmetric scales, float32."""
    a = np.abs(w)
    if axis is None:
        amax = np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = a.max(axis=reduce) if reduce else a
    scale = (amax / np.float32(qmax)).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_symmetric(w: np.ndarray, scale: np.ndarray, axis: int | None, qmax: int, dtype: type) -> np.ndarray:
    """Round ``w / scale`` (broadcast along ``axis``) to the nearest integer in ``[-qmax, qmax]``."""
    s = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    q = np.rint(w / s)
    np.clip(q, -qmax, qmax, out=q)
    return q.astype(dtype)
