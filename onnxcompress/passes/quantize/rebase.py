"""Quantize a new version of a weight consistently with a previous release (``int8-weights`` ``base``).

Given the previously released *compressed* model OLD (made by ``int8-weights``), each weight ``W`` of
NEW whose int8 counterpart exists in OLD (``<name>_quantized`` and ``<name>_scale``, the names
``weights.py`` gives them, in any graph, as initializers or ``Constant`` nodes) with the same layout
(same symbol shape, same number of scales, i.e. same granularity and block size) is quantized as
follows (``s`` a group's scale, ``d = W / s - q_old`` the drift in steps):

1. **Scales.** Per group (block, channel or tensor) the old scale ``s_old`` is kept when NEW's group
   still fits it: ``amax <= (qmax + 1/2 + overflow) * s_old`` (values beyond ``qmax * s`` are clipped to
   ``+-qmax``, an error of at most ``(1/2 + overflow) * s`` on those few elements) and
   ``amax >= min_fill * qmax * s_old`` (the group has not shrunk so much that the old step wastes
   resolution). Otherwise the group gets a new scale ``amax / qmax`` like an independent quantization
   (stored in OLD's scale dtype). On MiniLM v1 -> v2 (200 fine-tuning steps) 3.9 % of the blocks of 32
   grow their ``amax`` past ``127.5 * s_old``, nearly all by less than 2 %: ``overflow = 1.5`` keeps
   99.98 % of the scales.
2. **Symbols, fine rule (step 1).** In a group that kept its scale, the old symbol ``q_old`` is kept
   wherever ``|W - q_old * s| <= (1 + slack) * s / 2``; elsewhere (and in re-scaled groups)
   ``q = round(W / s)``.
3. **Symbols, coarse rule (step k > 1).** In a group that kept its scale,
   ``q = clip(q_old + k * round(d / k), -qmax, qmax)``: the symbol moves by a multiple of ``k``. For these
   tensors the scale rule is widened to ``overflow = max(overflow, 3 k)``, ``min_fill / 2`` (a clipped
   value costs at most ``(1/2 + 3 k) * s``, and is counted in rule 4's error).
4. **Choice of k per tensor** (``step = 0``, the default): with the update's energy
   ``U = ||W - s_old * q_old||^2`` (NEW against OLD's dequantized weights) and ``E_k = ||W - s * q_k||^2``
   the error of rules 1-3 with step ``k``, the largest ``k`` of ``STEPS`` (tried in increasing order,
   stopping at the first that fails) with ``E_k <= budget * U``; ``k = 1`` is always allowed.
   ``budget = 0.25``: the error's RMS is at most half the RMS of the update that the release delivers.

Rate/distortion. The patch between the two releases codes each symbol as ``(q_new - q_old) mod 256``
with an adaptive entropy coder, so its rate is about the entropy of the symbol changes (a kept symbol
costs a small fraction of a bit); a changed scale changes every symbol of its group, hence rule 1.

*Small drift* (``|d| << 1``, MiniLM: 200 steps at lr 2e-5): independent rounding flips ``q`` for the
~``|d|`` fraction of elements near a rounding boundary (and for *every* element of a group whose
``amax`` moved its scale). With the hysteresis of rule 2 an element only changes symbol once it has
drifted more than ``slack * s / 2`` past the boundary, so nearly every symbol is kept. A kept element's
error is at most ``(1 + slack) * s / 2`` instead of ``s / 2``, only on the elements that drifted across
a boundary. But that extra error is not noise: it points from NEW back to OLD (``-d``), i.e. it undoes
part of the fine-tuning coherently across every weight, so it costs far more output fidelity than its
size suggests. Measured on MiniLM v1 -> v2 (worst-sentence cosine of v2 vs its fp32; v1 vs v2 fp32 is
0.919; independent int8 0.99950): slack 0 -> 0.99952, 0.03 -> 0.99932, 0.06 -> 0.99864, 0.1 -> 0.9973,
0.25 -> 0.989, 0.5 -> 0.974. Hence the small default ``slack = 0.06``; ``slack = 0`` is plain rounding
with OLD's scales (the scale reuse alone already keeps ~90 % of the symbols there, and its error is
uncorrelated with ``d``). Rule 4 keeps every such tensor at ``k = 1``: with ``|d| < 1``, ``k >= 2``
keeps nearly every symbol, so ``E_k ~ U > budget * U``.

*Large drift* (digits_cnn v2: ``d`` of standard deviation 3.7-5.4 steps in conv2..fc2, 2.2 in conv1;
80-90 % of the symbols change under any rounding, about 4 bits per weight): keeping symbols cannot help; coarsening the
change can. With ``d`` spread over several ``k`` (density smooth on the scale of ``k``) the change
``k * round(d / k)`` has entropy ``H ~ h(d) - log2 k`` bits (Gaussian ``d`` of std ``sigma``:
``log2(sigma / k) + 2.05``), so each doubling of ``k`` saves one bit per weight, and its error is
uniform on ``+-k s / 2`` (``k^2 s^2 / 12`` per element, 4x per doubling: the 6 dB per bit of any
scalar quantizer, here applied to the update instead of the weight). The same rule that hurt with
small drifts (elements with ``|d| < k / 2`` keep ``q_old``, error ``-d``) is balanced here by the
outer bins, where the density falls with ``|d|`` so more elements round away from OLD than towards
it: the error's component along the update, ``-<E, W - W_old'> / U``, measured 0.0-2.5 % on digits'
large layers. Rounding towards OLD (a dead zone of 0.1 step) saved 2 % of the patch and cost 10x in
``1 - cosine`` (worst cosine 0.9993 -> 0.9929), so there is none.

Measured on digits_cnn v1 -> v2 (patch bytes / ``zstd --patch-from`` between independently compressed
files, worst-sample cosine of v2 vs its fp32; independent int8: 0.99981, v1 fp32: 0.916):

=================  =========  =========  ===========================================================
rule               patch      cosine     note
=================  =========  =========  ===========================================================
k = 1 everywhere   0.555      0.99994    slack 0.06 (the small-drift rule)
k = 4 everywhere   0.314      0.99886
k = 7 everywhere   0.204      0.99778
k = 8 everywhere   0.182      0.98956    fails ``int8-weights`` validation (conv1 moved < 2 steps)
budget 0.10        0.324      0.99978
budget 0.20        0.247      0.99922
**budget 0.25**    **0.220**  0.99862    k = 1, 6, 6, 7, 8 (conv1, conv2, conv3, fc1, fc2); accuracy
                                         0.9917 as independent
budget 0.30        0.212      0.99821
budget 0.50        0.183      0.99432
=================  =========  =========  ===========================================================

A calibration Hessian does not pay for itself on the small-drift rule: GPTQ error feedback through
rule 2 (MiniLM, per-weight ``X^T X`` of 64 calibration sentences) turns the feedback into symbol
changes, costing more rate than it saves (patch / zstd, worst cosine): slack 0.06 -> 0.360, 0.99962;
0.6 -> 0.270, 0.99843; 1.0 -> 0.238, 0.99708, all worse than plain slack 0.06 (0.248, 0.99864).
Restricting the feedback's choice to ``q_old`` or NEW's own rounding (so it cannot add changes)
lets the error pile up instead: 0.222, 0.99570.

The yardstick is the weight-space error against the update (no calibration data needed); the
output's sensitivity to each layer is not used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import OnnxCompressError

SLACK = 0.06
MIN_FILL = 0.8
OVERFLOW = 1.5
STEP = 0  # 0: choose the step per tensor (rule 4); k >= 1: that step for every tensor
STEPS = (1, 2, 3, 4, 5, 6, 7, 8)
BUDGET = 0.25
COARSE_OVERFLOW = 3.0  # rule 3: a coarse tensor keeps a scale up to 3 k steps of overflow


class BaseWeights:
    """The int8 weights of a compressed OLD model, indexed by name; arrays are decoded on demand.

    External data is not loaded up front: each looked-up tensor is read from its data file when asked
    for, so memory holds OLD's graph plus one weight at a time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if not p.is_file():
            raise OnnxCompressError(f"base model {p} does not exist (give the previously compressed model)")
        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - any load failure is a user error here
            raise OnnxCompressError(f"cannot read base model {p}: {exc}".splitlines()[0]) from None
        self.path = p
        self._protos: dict[str, onnx.TensorProto] = {}
        self._index(model.graph)

    def _index(self, graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            self._protos.setdefault(t.name, t)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and node.output:
                        self._protos.setdefault(node.output[0], a.t)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self._index(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        self._index(g)

    def lookup(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(q_old int8, s_old)`` for the weight ``name`` of NEW, or None when OLD has none."""
        qp = self._protos.get(f"{name}_quantized")
        sp = self._protos.get(f"{name}_scale")
        if qp is None or sp is None or qp.data_type != onnx.TensorProto.INT8:
            return None
        if sp.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            return None
        return self._array(qp), self._array(sp)

    def _array(self, proto: onnx.TensorProto) -> np.ndarray:
        if not onnx.external_data_helper.uses_external_data(proto):
            return numpy_helper.to_array(proto)
        copy = onnx.TensorProto()
        copy.CopyFrom(proto)  # loading fills the proto: keep the index small
        try:
            return numpy_helper.to_array(copy, base_dir=str(self.path.parent))
        except (OSError, ValueError) as exc:
            raise OnnxCompressError(f"cannot read {proto.name} of base model {self.path}: {exc}") from None


def _layout(w: np.ndarray, scale: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The broadcast shape of the scales over ``w`` and the axes a group spans."""
    shape = scale.shape if scale.ndim == w.ndim else (1,) * w.ndim
    axes = tuple(i for i in range(w.ndim) if shape[i] == 1 and w.shape[i] != 1)
    return shape, axes


CHUNK = 1 << 20  # values per slice of the element-wise work: a few MB of float32 temporaries


def _slices(w: np.ndarray) -> list[slice]:
    """Slices of ``w``'s first axis holding about ``CHUNK`` values each."""
    rows = w.shape[0] if w.ndim else 1
    per_row = max(1, w.size // max(rows, 1))
    n = max(1, CHUNK // per_row)
    return [slice(i, i + n) for i in range(0, rows, n)]


def _rows(a: np.ndarray, w: np.ndarray, sl: slice) -> np.ndarray:
    """``a`` (broadcastable to ``w``) restricted to the rows ``sl`` of ``w``."""
    return a[sl] if a.ndim and a.shape[0] == w.shape[0] and w.shape[0] != 1 else a


def _squared_error(w: np.ndarray, q: np.ndarray, s32: np.ndarray) -> float:
    """``||w - q * s||^2`` in float64, computed slice by slice."""
    total = 0.0
    for sl in _slices(w):
        e = w[sl] - q[sl].astype(np.float32) * _rows(s32, w, sl)
        total += float(np.dot(e.ravel(), e.ravel()))
    return total


def _symbols(
    w: np.ndarray, q_old: np.ndarray, s32: np.ndarray, fits: np.ndarray, k: int, slack: float, qmax: int
) -> np.ndarray:
    """The int8 symbols of rules 2 (``k = 1``) and 3 (``k > 1``) with the group scales ``s32``; groups
    that do not keep their old scale (``~fits``) are rounded to nearest."""
    out = np.empty(w.shape, dtype=np.int8)
    kf = np.float32(k)
    for sl in _slices(w):
        ws, qo, ss, fs = w[sl], q_old[sl].astype(np.float32), _rows(s32, w, sl), _rows(fits, w, sl)
        q = np.clip(np.rint(ws / ss), -qmax, qmax)
        if k == 1:
            keep = fs & (np.abs(ws - qo * ss) <= np.float32(0.5 * (1.0 + slack)) * ss)
        else:
            qo = np.clip(qo + kf * np.rint((ws / ss - qo) / kf), -qmax, qmax)
            keep = np.broadcast_to(fs, ws.shape)
        out[sl] = np.where(keep, qo, q)
    return out


def requantize(
    w: np.ndarray,
    scale: np.ndarray,
    old: tuple[np.ndarray, np.ndarray],
    qmax: int,
    *,
    slack: float = SLACK,
    min_fill: float = MIN_FILL,
    overflow: float = OVERFLOW,
    step: int = STEP,
    budget: float = BUDGET,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]] | None:
    """Quantize ``w`` against OLD's symbols and scales (see module docstring).

    Args:
        w: The weight, already in the symbol layout (e.g. split into blocks), float32.
        scale: The scale an independent quantization would use, broadcastable to ``w`` (its dtype,
            float16 or float32, is the one stored).
        old: ``(q_old, s_old)`` read from OLD.
        qmax: Largest symbol magnitude.
        slack: Hysteresis of the fine rule (step 1), in half steps.
        min_fill, overflow: When an old scale is kept (rule 1; coarse steps widen both, rule 3).
        step: Delta step ``k`` for every tensor, or 0 to choose it per tensor (rule 4).
        budget: With ``step=0``: the largest ``||W' - W||^2 / ||W - W_old'||^2`` a step may cost.

    Returns:
        ``(q, scale, counts)`` with ``scale`` in ``scale``'s shape and OLD's dtype, or None when OLD's
        layout does not match (different shape/granularity) or new scales are not representable.
    """
    if step < 0 or budget < 0:
        raise ValueError("step and budget must be >= 0")
    q_old, s_old = old
    if q_old.shape != w.shape or s_old.size != scale.size:
        return None
    s_old = s_old.reshape(scale.shape)
    if not np.all(np.isfinite(s_old)) or not np.all(s_old > 0):
        return None
    shape, axes = _layout(w, scale)
    s_old_b = s_old.reshape(shape)
    s_old32 = s_old_b.astype(np.float32)
    amax = np.abs(w).max(axis=axes, keepdims=True) if axes else np.abs(w)
    fresh = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        fresh = fresh.astype(s_old.dtype)
    if s_old.dtype == np.float16 and not (
        np.all(np.isfinite(fresh)) and np.all(fresh.astype(np.float32) >= np.finfo(np.float16).tiny)
    ):
        return None
    candidates = [step] if step >= 1 else list(STEPS)
    update = _squared_error(w, q_old, s_old32)  # rule 4's yardstick: NEW against OLD's dequantized weights
    best: tuple[np.ndarray, np.ndarray, np.ndarray, int] | None = None
    for k in candidates:
        ovf, fill = (overflow, min_fill) if k == 1 else (max(overflow, COARSE_OVERFLOW * k), min_fill / 2)
        fits = (amax <= np.float32(qmax + 0.5 + ovf) * s_old32) & (amax >= np.float32(fill * qmax) * s_old32)
        s_new = np.where(fits, s_old_b, fresh)
        q = _symbols(w, q_old, s_new.astype(np.float32), fits, k, slack, qmax)
        if best is not None:
            if update <= 0.0 or _squared_error(w, q, s_new.astype(np.float32)) > budget * update:
                break
        best = (q, s_new, fits, k)
    assert best is not None
    q8, s_new, fits, k = best
    counts = {
        "symbols": int(q8.size),
        "symbols_kept": int(np.count_nonzero(q8 == q_old)),
        "scales": int(s_new.size),
        "scales_kept": int(np.count_nonzero(fits)),
        f"tensors_step_{k}": 1,
    }
    return q8, s_new.reshape(scale.shape).astype(s_old.dtype), counts
