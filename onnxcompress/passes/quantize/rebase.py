"""Quantize a new version of a weight consistently with a previous release (``int8-weights`` ``base``).

Given the previously released *compressed* model OLD (made by ``int8-weights``), each weight ``W`` of
NEW whose int8 counterpart exists in OLD (``<name>_quantized`` and ``<name>_scale``, the names
``weights.py`` gives them, in any graph, as initializers or ``Constant`` nodes) with the same layout
(same symbol shape, same number of scales, i.e. same granularity and block size) is quantized as:

1. **Scales.** Per group (block, channel or tensor) the old scale ``s_old`` is kept when NEW's group
   still fits it: ``amax <= (qmax + 1/2 + overflow) * s_old`` (values beyond ``qmax * s`` are clipped to
   ``+-qmax``, an error of at most ``(1/2 + overflow) * s`` on those few elements) and
   ``amax >= min_fill * qmax * s_old`` (the group has not shrunk so much that the old step wastes
   resolution). Otherwise the group gets a new scale ``amax / qmax`` like an independent quantization
   (stored in OLD's scale dtype). On MiniLM v1 -> v2 (200 fine-tuning steps) 3.9 % of the blocks of 32
   grow their ``amax`` past ``127.5 * s_old``, nearly all by less than 2 %: ``overflow = 1.5`` keeps
   99.98 % of the scales.
2. **Symbols.** In a group that kept its scale, the old symbol ``q_old`` is kept wherever
   ``|W - q_old * s| <= (1 + slack) * s / 2``; elsewhere (and in re-scaled groups) ``q = round(W / s)``.

Rate/distortion. The patch between the two releases codes each symbol as ``(q_new - q_old) mod 256``
with an adaptive entropy coder, so its rate is about ``n * H(p)`` where ``p`` is the fraction of
changed symbols (a kept symbol costs a small fraction of a bit; a changed one ~``log2(1/p)`` + a few
bits for the delta's value); a changed scale changes every symbol of its group, hence rule 1. A
fine-tuned weight drifts by ``delta`` with ``|delta| << s``: independent rounding flips ``q`` for the
~``|delta|/s`` fraction of elements near a rounding boundary (and for *every* element of a group whose
``amax`` moved its scale). With the hysteresis of rule 2 an element only changes symbol once it has
drifted more than ``slack * s / 2`` past the boundary, so for small drifts nearly every symbol is kept.
Distortion: a kept element's error is at most ``(1 + slack) * s / 2`` instead of ``s / 2``, only on
the elements that drifted across a boundary. But that extra error is not noise: it points from NEW back
to OLD (``-delta``), i.e. it undoes part of the fine-tuning coherently across every weight, so it costs
far more output fidelity than its size suggests. Measured on MiniLM v1 -> v2 (worst-sentence cosine of
v2 vs its fp32; v1 vs v2 fp32 is 0.919; independent int8 0.99950): slack 0 -> 0.99952, 0.03 -> 0.99932,
0.06 -> 0.99864, 0.1 -> 0.9973, 0.25 -> 0.989, 0.5 -> 0.974. Hence the small default ``slack = 0.06``;
``slack = 0`` is plain rounding with OLD's scales (the scale reuse alone already keeps ~90 % of the
symbols there, and its error is uncorrelated with ``delta``).
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


def requantize(
    w: np.ndarray,
    scale: np.ndarray,
    old: tuple[np.ndarray, np.ndarray],
    qmax: int,
    *,
    slack: float = SLACK,
    min_fill: float = MIN_FILL,
    overflow: float = OVERFLOW,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]] | None:
    """Quantize ``w`` against OLD's symbols and scales (see module docstring).

    Args:
        w: The weight, already in the symbol layout (e.g. split into blocks), float32.
        scale: The scale an independent quantization would use, broadcastable to ``w`` (its dtype,
            float16 or float32, is the one stored).
        old: ``(q_old, s_old)`` read from OLD.
        qmax: Largest symbol magnitude.

    Returns:
        ``(q, scale, counts)`` with ``scale`` in ``scale``'s shape and OLD's dtype, or None when OLD's
        layout does not match (different shape/granularity) or new scales are not representable.
    """
    q_old, s_old = old
    if q_old.shape != w.shape or s_old.size != scale.size:
        return None
    s_old = s_old.reshape(scale.shape)
    if not np.all(np.isfinite(s_old)) or not np.all(s_old > 0):
        return None
    s_old32 = s_old.astype(np.float32)
    shape = scale.shape if scale.ndim == w.ndim else (1,) * w.ndim
    s_old32 = s_old32.reshape(shape)
    axes = tuple(i for i in range(w.ndim) if shape[i] == 1 and w.shape[i] != 1)
    amax = np.abs(w).max(axis=axes, keepdims=True) if axes else np.abs(w)
    fits = (amax <= np.float32(qmax + 0.5 + overflow) * s_old32) & (amax >= np.float32(min_fill * qmax) * s_old32)
    fresh = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        fresh = fresh.astype(s_old.dtype)
    if s_old.dtype == np.float16 and not (
        np.all(np.isfinite(fresh)) and np.all(fresh.astype(np.float32) >= np.finfo(np.float16).tiny)
    ):
        return None
    s_new = np.where(fits, s_old.reshape(shape), fresh)
    s32 = s_new.astype(np.float32)
    q_round = np.clip(np.rint(w / s32), -qmax, qmax)
    err = np.abs(w - q_old.astype(np.float32) * s32)
    keep = fits & (err <= np.float32(0.5 * (1.0 + slack)) * s32)
    q = np.where(keep, q_old, q_round.astype(np.int8)).astype(np.int8)
    counts = {
        "symbols": int(q.size),
        "symbols_kept": int(np.count_nonzero(q == q_old)),
        "scales": int(s_new.size),
        "scales_kept": int(np.count_nonzero(fits)),
    }
    return q, s_new.reshape(scale.shape).astype(s_old.dtype), counts
