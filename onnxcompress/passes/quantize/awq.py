"""Activation-aware channel scaling for block-wise 4-bit weights (AWQ-like), the maths.

AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration") protects the input channels that carry large activations: a weight ``W [N, K]``
(rows = output channels, ``K`` = the reduction axis) read as ``y = x W^T`` is rewritten as
``y = (x / c) (W c)^T`` with a positive factor ``c_k`` per input channel; quantizing ``W c`` instead
of ``W`` gives the salient channels (large ``c_k``) a finer grid inside their block. The effective
weight is ``W'[n, k] = Q(W c)[n, k] / c_k``: this module stores ``1 / c_k`` (float16-representable,
:attr:`Scaling.inverse`) and the caller multiplies the dequantized weight by it (``load`` form: one
more ``Mul`` on constants, folded at session load) or the activation (contrib ``MatMulNBits``).

The factors come from the calibration Hessian ``H = X^T X`` (whose diagonal is ``sum x_k^2``)::

    c_k = rms_k ** alpha / sqrt(max_j rms_j ** alpha * min_j rms_j ** alpha),   rms_k = sqrt(H_kk / n)

(normalised around 1; dead channels, ``H_kk = 0``, get ``c_k = 1``), and ``alpha`` is searched per
weight on a grid in ``[0, 1]`` (``alpha = 0`` is plain quantization, so the search never does worse
on its objective) to minimise the layer's output error on the calibration inputs::

    tr((W' - W) H (W' - W)^T)

with ``W'`` the round-to-nearest (clipping search weighted by ``diag H``) quantization of ``W c``
divided by ``c``. GPTQ then runs on ``W c`` with the scaled Hessian ``H' = C^-1 H C^-1``
(:func:`scaled_hessian`), the activations it sees being ``x / c``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .gptq import round_scales

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # the AWQ paper's grid (20 points) halved
COARSE_FROM = 6  # grids longer than this are searched coarse to fine (every other point, then the best's neighbours)
RATIO_LIMIT = 1e4  # largest c_max / c_min kept (float16 range of 1 / c, and conditioning of H')


@dataclasses.dataclass(frozen=True)
class Scaling:
    """The chosen channel scaling of one weight.

    Attributes:
        alpha: The exponent chosen (0: no scaling).
        inverse: ``1 / c_k`` per input channel ``[K]``, float16-representable float32 (all ones when ``alpha = 0``).
        errors: The objective per grid point ``{alpha: tr(dW H dW^T)}`` (for reports).
    """

    alpha: float
    inverse: np.ndarray
    errors: dict[float, float]

    @property
    def factor(self) -> np.ndarray:
        """``c_k = 1 / inverse_k`` (float32): the weight's columns are multiplied by it before quantization."""
        return (np.float32(1.0) / self.inverse).astype(np.float32)


def channel_inverse(h_diag: np.ndarray, alpha: float, rows: float = 1.0) -> np.ndarray:
    """``1 / c_k`` (float16-representable float32, ``[K]``) for the exponent ``alpha`` (module docstring).

    ``h_diag``: ``diag H`` (``sum x_k^2`` over ``rows`` calibration rows; the scale of ``H`` cancels out
    in the normalisation, ``rows`` only keeps the intermediate values in range).
    """
    d = np.asarray(h_diag, dtype=np.float64)
    alive = np.isfinite(d) & (d > 0)
    if alpha == 0 or not alive.any():
        return np.ones(d.shape, dtype=np.float32)
    rms = np.sqrt(np.where(alive, d, 1.0) / max(rows, 1.0))
    c = rms**alpha
    lo, hi = float(c[alive].min()), float(c[alive].max())
    c = c / np.sqrt(lo * hi)
    bound = np.sqrt(RATIO_LIMIT)
    c = np.clip(np.where(alive, c, 1.0), 1.0 / bound, bound)
    return round_scales((1.0 / c).astype(np.float32))


def layer_error(dw: np.ndarray, h: np.ndarray) -> float:
    """``tr(dW H dW^T)`` for ``dW [N, K]`` and ``H [K, K]`` (float64 accumulation)."""
    d = np.asarray(dw, dtype=np.float32)
    return float(np.einsum("nk,nk->", (d @ np.asarray(h, dtype=np.float32)).astype(np.float64), d))


def scaled_hessian(h: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``H' = C^-1 H C^-1`` (the Hessian of the activations ``x / c``), same dtype as ``h``."""
    inv = np.asarray(inverse, dtype=h.dtype)
    return h * inv[:, None] * inv[None, :]


def search(
    w: np.ndarray,
    h: np.ndarray,
    quantize: object,
    alphas: tuple[float, ...] = ALPHAS,
) -> Scaling:
    """The ``alpha`` of ``alphas`` minimising ``tr(dW H dW^T)`` for ``w [N, K]`` (module docstring).

    A grid of more than ``COARSE_FROM`` points is searched coarse to fine: every other point (and the
    last), then the two neighbours of the best one (8 of the 11 default points; the objective is
    close to unimodal in ``alpha``). ``errors`` holds the points evaluated.

    ``quantize(w_scaled, col_weight) -> dequantized [N, K]`` quantizes the scaled weight with the
    clipping search weighted by ``col_weight`` (``diag H'``); called once per grid point.
    """
    w = np.asarray(w, dtype=np.float32)
    h32 = np.asarray(h, dtype=np.float32)
    diag = np.diagonal(h32).astype(np.float64)
    errors: dict[float, float] = {}
    best: list[tuple[float, float, np.ndarray]] = []

    def evaluate(alpha: float) -> None:
        inv = channel_inverse(diag, alpha)
        fac = (np.float32(1.0) / inv).astype(np.float32)
        deq = quantize(w * fac[None, :], (diag * inv.astype(np.float64) ** 2).astype(np.float32))  # type: ignore[operator]
        err = layer_error(deq * inv[None, :] - w, h32)
        errors[float(alpha)] = err
        if not best or err < best[0][0]:
            best[:] = [(err, float(alpha), inv)]

    grid = sorted(dict.fromkeys(float(a) for a in alphas))
    coarse = grid if len(grid) <= COARSE_FROM else grid[::2] + ([grid[-1]] if len(grid) % 2 == 0 else [])
    for alpha in coarse:
        evaluate(alpha)
    if len(coarse) < len(grid):  # coarse to fine: the skipped neighbours of the best coarse point
        i = grid.index(best[0][1])
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid) and grid[j] not in errors:
                evaluate(grid[j])
    return Scaling(best[0][1], best[0][2], errors)
