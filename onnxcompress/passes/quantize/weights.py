"""Weight-only int8: store the weights of Conv/ConvTranspose/Gemm/MatMul/Gather as int8 + scales.

Each float32 weight ``W`` (an initializer or a ``Constant`` node output, in the main graph or any
subgraph) becomes ``q`` (int8) plus float32 scales, with symmetric rounding (see ``_math``):
``W' = q * s`` and ``|W - W'| <= s / 2`` element-wise, ``s`` being the scale of the element's group.

Groups (``granularity``):

* ``channel``: one scale per output channel. Output axis per consumer: Conv ``[O, I/g, kh, kw]`` -> 0;
  ConvTranspose ``[I, O/g, ...]`` -> 1; Gemm ``B`` -> 1 (0 when ``transB=1``); MatMul ``B [.., K, N]``
  -> rank-1; a constant MatMul ``A [.., M, K]`` -> rank-2; Gather tables -> 0 (one scale per row).
* ``block``: for 2-D MatMul/Gemm weights, one scale per ``block_size`` consecutive values along the
  reduction axis ``K`` of each output channel (``K`` divisible by the block; otherwise per channel);
  other weights per channel. Block scales are stored as float16 when representable (6.25% more
  bytes than the int8 values at blocks of 32; the rounding uses the float16 scale, so the bound
  holds for the stored scale). With the MatMul weights of all-MiniLM-L6-v2 quantized, blocks of
  32 give a worst-sample embedding cosine of 0.9995 where per-channel scales give 0.9983.
* ``tensor``: one scale per tensor.

A weight read by consumers that disagree on the axis is quantized per tensor.

Forms (``form``), i.e. how the graph turns ``q`` back into ``W'``:

* ``load`` (default): ``Reshape(Cast(q, float) * s)`` on constants only, standard ONNX at every opset.
  Runtimes fold it once when the model is loaded (onnxruntime's constant folding does), so the file
  holds int8 while inference computes in float32 at the original speed with exactly ``W'``.
* ``runtime``: ``DequantizeLinear(q, s, 0)`` (per-axis needs opset 13; block granularity falls back to
  per channel), so the weights stay int8 in memory at run time. onnxruntime then fuses
  DequantizeLinear+MatMul into its int8 ``MatMulNBits`` kernel, which also quantizes activations
  (lower fidelity), and runs DequantizeLinear before each Conv at every call (slower on CNNs).
  Below opset 13 the ``load`` form is used.

Embedding tables (the constant ``data`` of a ``Gather`` on axis 0, per-row scales) are gathered
*before* dequantizing in both forms: ``Cast(Gather(q, ids), float) * Gather(s[V, 1], ids)``, the
same values as gathering from ``W'``, without materialising the float table.

Biases, float16/float64 weights, non-finite weights and tensors with fewer than ``min_elements``
values stay float, each skip recorded with its reason.

Bit widths and steps (``bits``, ``step``), for packages (``onnxcompress pack``) rather than files:
symbols are stored in int8 whatever ``bits`` is, so a narrower width only pays once the symbols are
entropy coded (the transport coder gets within a few percent of their entropy; rate model and
maths: :mod:`.entropy`).

* ``step=max`` (default): ``s = max|w| / qmax`` with ``qmax = 2^(bits-1) - 1`` per group (``bits=8``
  is the plain int8 pass).
* ``step=rms``: ``s = max(4 rms(w) / 2^(bits-1), max|w| / 127)`` per group (``bits`` may be a
  half, e.g. 4.5: a step ``sqrt 2`` finer, about half a bit more once coded): ``bits`` buys the
  range of a Gaussian's +-4 standard deviations, and the rare values beyond it take larger symbols
  (up to 127, so nothing is clipped) that cost few bits once coded. On all-MiniLM-L6-v2 (only the
  word embeddings quantized, per row) ``rms`` at 4 bits codes to 4.5 MB at worst cosine 0.9937 where
  ``max`` at 4 bits gives 4.8 MB at 0.959 and ``max`` at 5 bits 6.3 MB at 0.9964: a row's maximum is
  a poor measure of its spread.
* ``ecr_lambda`` > 0: entropy-constrained rounding (:func:`.entropy.ecr_round`): a value near the
  midpoint of two symbols goes to the more probable one when ``lam`` times the bits saved exceeds
  the squared error added (in steps^2).
* ``gptq=true`` (needs calibration data): 2-D MatMul/Gemm weights at ``channel`` granularity are
  rounded column by column with GPTQ's error feedback (:func:`.entropy.gptq_round`, damping
  ``gptq_damp``), from ``sum X^T X`` of their activations on the calibration feeds.
* ``bits_by_tensor``: per-weight widths (the transport tuner builds its mixture with it).

Releases (``base``): given the previously released model compressed by this pass, each weight whose
int8 counterpart exists there with the same layout reuses its scales where the new weights still fit
them; a weight that moved by less than a step keeps its symbols where the new weight rounds to them
within ``(1 + base_slack) * s / 2``, one that moved by several steps changes its symbols by multiples
of a step ``k`` chosen per tensor (error energy <= ``base_budget`` x the update's), so the patch
between the two releases stays small (rules and rate/distortion reasoning: ``rebase``).
Without ``base`` the output is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import (
    GraphTree,
    Model,
    all_tensor_names,
    constant_meta,
    constant_value,
    fresh_name,
    iter_nodes,
)
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ..calibrate import ActivationTap, has_batch_axis, split_feed, tappable
from ._common import refuse_quantized
from .entropy import ecr_round, gptq_round
from .gptq import prepare_hessian
from .int4 import _token_mask
from .rebase import BUDGET as BASE_BUDGET
from .rebase import MIN_FILL, OVERFLOW, SLACK, BaseWeights, requantize
from .rebase import STEP as BASE_STEP

QMAX = 127
TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
GRANULARITIES = ("channel", "block", "tensor")
FORMS = ("load", "runtime")
STEPS = ("max", "rms")
RMS_RANGE = 4.0  # step=rms: bits cover +-4 RMS
DEFAULT_DAMP = 0.1
CALIBRATION_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Int8WeightsConfig:
    """Options for :class:`Int8WeightsPass` (see the module docstring).

    Attributes:
        granularity: ``channel``, ``block`` or ``tensor``.
        block_size: Values per scale along ``K`` for ``block`` granularity.
        form: ``load`` (dequantized once when the model is loaded) or ``runtime`` (DequantizeLinear).
        min_elements: Weights with fewer values stay float.
        op_types: Which consumer ops have their weights quantized.
        exclude: Tensor or node names to leave untouched.
        base: Path of the previous release of this model, compressed by this pass (``None``: quantize
            independently). Its scales and symbols are reused where the new weights fit them.
        base_slack: With ``base``: keep an old symbol while the new weight is within
            ``(1 + base_slack) * scale / 2`` of it (0 = plain rounding with the old scales).
        base_min_fill: With ``base``: keep an old scale only while the group's ``max |w|`` is at least
            ``base_min_fill * 127 * scale`` (a group that shrank more gets a fresh scale).
        base_overflow: With ``base``: keep an old scale while the group's ``max |w|`` is at most
            ``(127.5 + base_overflow) * scale``, clipping the few values beyond ``127 * scale``.
        base_step: With ``base``: symbols move by multiples of this step in every tensor (1 = the
            ``base_slack`` rule everywhere), or 0 (default) to choose it per tensor.
        base_budget: With ``base_step=0``: the largest step whose error energy is at most this fraction
            of the update's energy (``||W - W_old'||^2``).
    """

    granularity: str = "channel"
    block_size: int = 32
    form: str = "load"
    min_elements: int = 256
    op_types: tuple[str, ...] = TARGET_OPS
    exclude: tuple[str, ...] = ()
    base: str | None = None
    base_slack: float = SLACK
    base_min_fill: float = MIN_FILL
    base_overflow: float = OVERFLOW
    base_step: int = BASE_STEP
    base_budget: float = BASE_BUDGET
    bits: float = 8
    step: str = "max"
    ecr_lambda: float = 0.0
    gptq: bool = False
    gptq_damp: float = DEFAULT_DAMP
    bits_by_tensor: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}")
        if self.block_size < 2:
            raise ValueError("block_size must be >= 2")
        if not 0.0 <= self.base_slack <= 1.0:
            raise ValueError("base_slack must be in [0, 1]")
        if not 0.0 <= self.base_min_fill <= 1.0:
            raise ValueError("base_min_fill must be in [0, 1]")
        if not 0.0 <= self.base_overflow <= 8.0:
            raise ValueError("base_overflow must be in [0, 8]")
        if not 0 <= self.base_step <= 16:
            raise ValueError("base_step must be in [0, 16] (0: chosen per tensor)")
        if not 0.0 <= self.base_budget <= 1.0:
            raise ValueError("base_budget must be in [0, 1]")
        widths = [self.bits, *(b for _, b in self.bits_by_tensor)]
        if not all(2 <= b <= 8 and float(2 * b).is_integer() for b in widths):
            raise ValueError("bits must be in [2, 8] (halves allowed with step=rms)")
        if self.step == "max" and not all(float(b).is_integer() for b in widths):
            raise ValueError("step=max needs whole bits (half bits need step=rms)")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}")
        if not 0.0 <= self.ecr_lambda <= 10.0:
            raise ValueError("ecr_lambda must be in [0, 10]")
        if not 0.0 <= self.gptq_damp <= 10.0:
            raise ValueError("gptq_damp must be in [0, 10]")
        if (self.bits < 8 or self.step != "max" or self.ecr_lambda or self.gptq) and self.base is not None:
            raise ValueError("base (releases) works with plain 8-bit max-step rounding only")

    def bits_of(self, tensor: str) -> float:
        """The width of one weight (``bits_by_tensor`` first)."""
        for name, b in self.bits_by_tensor:
            if name == tensor:
                return b
        return self.bits


def int8_weights_config(params: Params, **defaults: Any) -> Int8WeightsConfig:
    """From ``--param`` settings (every key read unconditionally): ``granularity``, ``block_size``,
    ``bits`` (2..8), ``step`` (max|rms), ``ecr_lambda``, ``gptq`` (needs calibration), ``damp``.
    ``defaults`` are the recipe's own choices (e.g. ``granularity="block"``).

    Raises:
        OnnxCompressError: on a value out of range.
    """
    base = Int8WeightsConfig(**defaults)
    granularity = params.get_str("granularity", base.granularity, GRANULARITIES)
    block = params.get_int("block_size", base.block_size)
    bits = params.get_float("bits", base.bits)
    step = params.get_str("step", base.step, STEPS)
    lam = params.get_float("ecr_lambda", base.ecr_lambda)
    use_gptq = params.get_bool("gptq", base.gptq)
    damp = params.get_float("damp", base.gptq_damp)
    base_slack = params.get_float("base_slack", base.base_slack)
    base_step = params.get_int("base_step", base.base_step)
    base_budget = params.get_float("base_budget", base.base_budget)
    try:
        return dataclasses.replace(
            base, granularity=granularity, block_size=block, bits=bits, step=step, ecr_lambda=lam, gptq=use_gptq,
            gptq_damp=damp, base_slack=base_slack, base_step=base_step, base_budget=base_budget,
        )  # fmt: skip
    except ValueError as exc:
        raise OnnxCompressError(f"int8-weights: {exc}") from None


@dataclasses.dataclass(frozen=True)
class _Slot:
    """What one consumer wants: the output-channel axis and the reduction axis (for blocks)."""

    out_axis: int | None
    red_axis: int | None
    activation: str | None = dataclasses.field(default=None, compare=False)  # GPTQ input (X of X @ W)


def _weight_slots(node: gs.Node) -> list[tuple[int, int, int | None]]:
    """``[(input index, output axis, reduction axis)]`` of a target node's weight inputs (axes may be
    negative; the reduction axis is None where blocks do not apply)."""
    op = node.op
    if op == "Conv" and len(node.inputs) > 1:
        return [(1, 0, None)]
    if op == "ConvTranspose" and len(node.inputs) > 1:
        return [(1, 1, None)]
    if op == "Gemm" and len(node.inputs) > 1:
        return [(1, 0, 1) if node.attrs.get("transB", 0) else (1, 1, 0)]
    if op == "MatMul" and len(node.inputs) == 2:
        return [(1, -1, -2), (0, -2, -1)]
    if op == "Gather" and len(node.inputs) == 2 and int(node.attrs.get("axis", 0)) == 0:
        return [(0, 0, None)]
    return []


def scales_for(w: np.ndarray, reduce: tuple[int, ...] | None, bits: float, step: str) -> np.ndarray:
    """Symmetric steps of ``w`` over the axes ``reduce`` (None: the whole tensor), keepdims, float32."""
    if reduce != ():
        # max |w| as max(max w, -min w): the same values without an |w| copy of the weight (MiniLM's
        # 47 MB embedding table: -47 MB); "+ 0" turns a -0.0 (all-zero slice) into the 0.0 of |w|
        amax = np.maximum(w.max(axis=reduce, keepdims=True), -w.min(axis=reduce, keepdims=True)) + 0
    else:
        amax = np.abs(w)
    qmax = int(2 ** (bits - 1)) - 1
    if step == "rms":
        sq = np.square(w, dtype=np.float64)
        rms = np.sqrt(sq.mean(axis=reduce, keepdims=True)) if reduce != () else np.sqrt(sq)
        scale = np.maximum(RMS_RANGE * rms / 2 ** (bits - 1), amax / np.float64(QMAX))
    else:
        scale = amax / np.float32(qmax)  # float32 division: the plain int8 pass's exact scales
    scale = scale.astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(
    w: np.ndarray,
    granularity: str,
    axis: int | None,
    red: int | None,
    *,
    bits: float = 8,
    step: str = "max",
    block_size: int = 32,
    ecr_lambda: float = 0.0,
    gptq_u: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The int8 symbols and scales of one weight (module docstring): ``(q, scale, w_grouped)``.

    ``block`` granularity returns ``q`` and ``w_grouped`` split as ``[..., K / b, b, ...]`` (scales
    float16 when representable); otherwise ``q`` has ``w``'s shape and ``scale`` broadcasts to it.
    ``gptq_u`` (``channel`` granularity with a reduction axis ``red``): the upper Cholesky factor of
    the damped ``H^-1`` of the weight's activations (:func:`.gptq.prepare_hessian` without
    reordering), for GPTQ rounding.
    """
    qmax = QMAX if step == "rms" else int(2 ** (bits - 1)) - 1
    if granularity == "block":
        assert axis is not None and red is not None
        b = block_size
        split = list(w.shape[:red]) + [w.shape[red] // b, b] + list(w.shape[red + 1 :])
        wb = w.reshape(split)
        scale = scales_for(wb, (red + 1,), bits, step)
        with np.errstate(over="ignore", under="ignore"):
            half = scale.astype(np.float16)
        if np.all(np.isfinite(half)) and np.all(half >= np.finfo(np.float16).tiny):
            scale = half  # block scales in float16: half the overhead, 0.05% scale error
        x = wb / scale.astype(np.float32)
        q = ecr_round(x, qmax, ecr_lambda) if ecr_lambda > 0 else np.clip(np.rint(x), -qmax, qmax)
        return q.astype(np.int8), scale, wb
    if granularity == "channel" and axis is not None:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = scales_for(w, reduce, bits, step)
    else:
        axis = None
        scale = scales_for(w, None, bits, step).reshape(())
    if gptq_u is not None and red is not None and w.ndim == 2 and axis is not None:
        rows = np.ascontiguousarray(w.T) if red == 0 else w
        srows = scale.T if red == 0 else scale
        q = gptq_round(rows, srows, gptq_u, qmax, ecr_lambda)
        q = q.T if red == 0 else q
    elif ecr_lambda > 0:
        q = ecr_round(w / scale, qmax, ecr_lambda, channel_axis=axis)
    else:
        return _round_plain(w, scale, qmax), scale, w
    return q.astype(np.int8), scale, w


ROUND_SLAB = 1 << 18  # elements rounded at a time by the plain path (a 1 MB float temporary)


def _round_plain(w: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(rint(w / scale), -qmax, qmax)`` as int8, a slab of rows at a time (elementwise: the same
    values as over the whole), so that one slab's float temporary sits beside ``w``, not one of its
    size (MiniLM's 47 MB embedding table: 47 MB -> 1 MB). ``scale`` broadcasts to ``w``."""
    if w.ndim == 0 or w.size <= ROUND_SLAB:
        x = w / scale
        np.rint(x, out=x)
        np.clip(x, -qmax, qmax, out=x)
        return x.astype(np.int8)
    rows = w.shape[0]
    per_row = scale.ndim == w.ndim and scale.shape[0] == rows and rows > 1
    q = np.empty(w.shape, np.int8)
    step = max(1, ROUND_SLAB // max(1, w.size // rows))
    for r0 in range(0, rows, step):
        x = w[r0 : r0 + step] / (scale[r0 : r0 + step] if per_row else scale)
        np.rint(x, out=x)
        np.clip(x, -qmax, qmax, out=x)
        q[r0 : r0 + step] = x
        del x  # not beside the next slab's
    return q


def weight_hessians(
    model: Model, activations: list[str], feeds: list[dict[str, np.ndarray]], rows: int = CALIBRATION_ROWS
) -> dict[str, np.ndarray]:
    """``{activation: sum X^T X}`` (float64, ``X`` the activation as ``[-1, K]``) over ``feeds``; for token
    models (a ``*mask*`` input, see the int4 pass) only the unpadded tokens count."""
    names = list(dict.fromkeys(activations))
    sums: dict[str, np.ndarray] = {}
    batch_axis = has_batch_axis(model)
    with ActivationTap(model, names) as tap:
        for feed in feeds:
            for part in split_feed(feed, rows if batch_axis else 0):
                values = tap.run(part)
                mask = _token_mask(part)
                for name in names:
                    a = np.asarray(values[name])
                    if a.dtype != np.float32 or a.ndim == 0:
                        continue
                    if mask is not None and a.ndim == 3 and a.shape[:2] == mask.shape:
                        x = a[mask].astype(np.float64)  # padding tokens carry no signal
                    else:
                        x = a.reshape(-1, a.shape[-1]).astype(np.float64)
                    xtx = x.T @ x
                    prev = sums.get(name)
                    if prev is None:
                        sums[name] = xtx
                    elif prev.shape == xtx.shape:
                        prev += xtx
                del values
    return sums


def gptq_factor(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray | None:
    """The upper Cholesky factor of the damped ``H^-1`` in column order (None if it does not exist)."""
    if not np.all(np.isfinite(h)):
        return None
    try:
        return prepare_hessian(h, 1, damp, False).u
    except ValueError:
        return None


class Int8WeightsPass:
    """Weight-only symmetric int8 quantization (see module docstring)."""

    name = "int8-weights"

    def __init__(self, config: Int8WeightsConfig | None = None, name: str | None = None) -> None:
        self.config = config or Int8WeightsConfig()
        if name:
            self.name = name

    def run(self, model: Model, ctx: PassContext, *, check_quantized: bool = True) -> PassReport:
        """Quantize the weights of the target ops in every graph of ``model``.

        ``check_quantized=False`` lets another quantization pass reuse this one on a model it has
        already partly quantized.
        """
        if check_quantized:
            refuse_quantized(model, self.name)
        cfg = self.config
        report = PassReport(self.name)
        before = GraphSize.of(model)
        base = BaseWeights(cfg.base) if cfg.base is not None else None
        base_counts: dict[str, int] = {}
        weights = self._collect(model, report, ctx.exclude)
        tree = GraphTree(model.graph) if weights else None
        names = all_tensor_names(model.graph) if weights else set()
        factors = self._gptq_factors(model, ctx, weights, report) if cfg.gptq else {}
        changed = 0
        forms: dict[str, int] = {}
        for t, slots in weights.values():
            reason = self._skip_reason(t, cfg, model.opset)
            if reason:
                report.skipped.append((t.name, reason))
                continue
            w = constant_value(t, cache=False)  # read one weight at a time; never keep the float copy
            assert w is not None
            if not np.all(np.isfinite(w)):
                report.skipped.append((t.name, "weight has non-finite values"))
                continue
            assert tree is not None
            new_name, form = self._replace(
                t, w, slots, tree, names, model.opset, base, base_counts, gptq_u=factors.get(t.name)
            )
            forms[form] = forms.get(form, 0) + 1
            report.tensor_map[new_name] = t.name
            changed += 1
            del w
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = changed > 0
        report.stats = before.stats(model, changed > 0, tensors_changed=changed, forms=forms)
        if base is not None:
            report.stats["base"] = {"path": str(base.path), **base_counts}
        report.stats.update(
            bits=cfg.bits, step=cfg.step, ecr_lambda=cfg.ecr_lambda, gptq_layers=len(factors), nonstandard_ops=[]
        )
        return report

    def _gptq_factors(
        self, model: Model, ctx: PassContext, weights: dict[int, tuple[gs.Tensor, list[_Slot]]], report: PassReport
    ) -> dict[str, np.ndarray]:
        """``{weight: U}`` for the weights GPTQ can round (one Hessian per activation, summed over consumers)."""
        cfg = self.config
        if not ctx.calibration:
            raise OnnxCompressError(
                f"{self.name}: gptq=true needs calibration data (--calibration DATA or <model>.calibration.npz)"
            )
        available = tappable(model)
        todo: dict[str, tuple[gs.Tensor, list[str]]] = {}
        for t, slots in weights.values():
            acts = [s.activation for s in slots]
            if self._skip_reason(t, cfg, model.opset) or not slots or any(a is None for a in acts):
                continue
            if any(a not in available for a in acts):
                report.skipped.append((t.name, "gptq: activation not tappable (rounded to nearest)"))
                continue
            todo[t.name] = (t, [a for a in acts if a is not None])
        if not todo:
            return {}
        hess = weight_hessians(model, [a for _, acts in todo.values() for a in acts], ctx.calibration)
        out: dict[str, np.ndarray] = {}
        for name, (t, acts) in todo.items():
            meta = constant_meta(t)
            assert meta is not None
            red = weights[id(t)][1][0].red_axis
            k = int(meta[0][red or 0])
            hs = [hess.get(a) for a in acts]
            if any(h is None or h.shape != (k, k) for h in hs):
                report.skipped.append((name, "gptq: activation width does not match K (rounded to nearest)"))
                continue
            u = gptq_factor(np.sum(hs, axis=0), cfg.gptq_damp)
            if u is None:
                report.skipped.append((name, "gptq: singular Hessian (rounded to nearest)"))
                continue
            out[name] = u
        return out

    def _collect(
        self, model: Model, report: PassReport, exclude: tuple[str, ...] = ()
    ) -> dict[int, tuple[gs.Tensor, list[_Slot]]]:
        """Weights of target nodes, with what each consumer wants of them."""
        cfg = self.config
        weights: dict[int, tuple[gs.Tensor, list[_Slot]]] = {}
        main_ids = {id(n) for n in model.graph.nodes}
        for _, node in iter_nodes(model.graph):
            if node.op not in cfg.op_types or node.domain not in ("", "ai.onnx", None):
                continue
            if node.name in cfg.exclude or is_excluded(node.name, node.op, exclude):
                report.skipped.append((node.name or node.op, "excluded by configuration"))
                continue
            slots = _weight_slots(node)
            found = False
            for idx, out_axis, red_axis in slots:
                t = node.inputs[idx]
                meta = constant_meta(t)
                if meta is None:
                    continue
                if node.op == "MatMul" and idx == 0 and constant_meta(node.inputs[1]) is not None:
                    continue  # both constant: leave to constant folding
                found = True
                rank = len(meta[0])
                ok = rank >= (2 if out_axis < 0 else 1)
                out = out_axis % rank if ok else None
                red = red_axis % rank if ok and red_axis is not None and rank == 2 else None
                act = None
                if red is not None and node.op == "MatMul" and idx == 1 and red == 0:
                    act = node.inputs[0].name
                elif red is not None and node.op == "Gemm" and not node.attrs.get("transA", 0):
                    act = node.inputs[0].name
                if id(node) not in main_ids:
                    act = None
                weights.setdefault(id(t), (t, []))[1].append(_Slot(out, red, act))
            if not found and slots:
                report.skipped.append((node.name or node.op, "no constant weight input (computed at run time)"))
        return weights

    @staticmethod
    def _skip_reason(t: gs.Tensor, cfg: Int8WeightsConfig, opset: int) -> str | None:
        if t.name in cfg.exclude:
            return "excluded by configuration"
        if opset < 7:
            return f"opset {opset} < 7: Mul broadcasts only from opset 7 (onnxruntime has no Mul before 7)"
        meta = constant_meta(t)
        assert meta is not None
        shape, dtype = meta
        if dtype != np.float32:
            return f"dtype {dtype} (only float32 weights are quantized)"
        size = int(np.prod(shape)) if shape else 1
        if size < cfg.min_elements:
            return f"too small ({size} elements < {cfg.min_elements})"
        return None

    def _plan(self, w: np.ndarray, slots: list[_Slot], opset: int) -> tuple[str, int | None, int | None]:
        """Choose ``(granularity, output axis, reduction axis)`` for one weight."""
        cfg = self.config
        agree = all((s.out_axis, s.red_axis) == (slots[0].out_axis, slots[0].red_axis) for s in slots)
        if cfg.granularity == "tensor" or not agree or slots[0].out_axis is None:
            return "tensor", None, None
        slot = slots[0]
        blocks_ok = (
            cfg.granularity == "block"
            and cfg.form == "load"
            and slot.red_axis is not None
            and w.shape[slot.red_axis] % cfg.block_size == 0
            and w.shape[slot.red_axis] > cfg.block_size
        )
        if blocks_ok:
            return "block", slot.out_axis, slot.red_axis
        return "channel", slot.out_axis, slot.red_axis  # the reduction axis serves GPTQ

    def _replace(
        self,
        t: gs.Tensor,
        w: np.ndarray,
        slots: list[_Slot],
        tree: GraphTree,
        names: set[str],
        opset: int,
        base_weights: BaseWeights | None = None,
        base_counts: dict[str, int] | None = None,
        gptq_u: np.ndarray | None = None,
    ) -> tuple[str, str]:
        """Insert the int8 weight and its dequantization; rewire every consumer.

        Returns:
            The name of the tensor standing for ``W`` (the int8 one for gathered tables) and the form
            used (``load``, ``load-block``, ``dequantize`` or ``gather``).
        """
        cfg = self.config
        owner = tree.owner_of_users(t)
        granularity, axis, red = self._plan(w, slots, opset)
        if granularity != "channel" or red is None:
            gptq_u = None
        base = t.name
        consumers = list(t.outputs)
        bits = cfg.bits_of(t.name)
        q, scale, wb = quantize_weight(
            w, granularity, axis, red, bits=bits, step=cfg.step, block_size=cfg.block_size, ecr_lambda=cfg.ecr_lambda,
            gptq_u=gptq_u,
        )  # fmt: skip
        if base_weights is not None:
            counts = base_counts if base_counts is not None else {}
            q, scale = self._rebase(t.name, wb, q, scale, base_weights, counts)
        q_const = gs.Constant(fresh_name(names, f"{base}_quantized"), q)
        if (
            granularity == "channel"
            and axis == 0
            and w.ndim >= 2
            and consumers
            and all(_is_table_gather(c, t) for c in consumers)
        ):
            s_const = gs.Constant(fresh_name(names, f"{base}_scale"), scale)
            for c in consumers:
                self._gather_then_dequantize(c, q_const, s_const, tree, names)
            return q_const.name, "gather"
        out = gs.Variable(fresh_name(names, f"{base}_dequantized"), dtype=np.float32, shape=list(w.shape))
        use_dq = cfg.form == "runtime" and granularity != "block" and (axis is None or opset >= 13) and opset >= 10
        if use_dq:
            flat = scale.reshape(-1) if axis is not None else scale.reshape(())
            s_const = gs.Constant(fresh_name(names, f"{base}_scale"), flat)
            zp = np.zeros(flat.shape, dtype=np.int8)
            zp_const = gs.Constant(fresh_name(names, f"{base}_zero_point"), zp)
            attrs: dict[str, Any] = {} if axis is None else {"axis": int(axis)}
            nodes = [
                gs.Node(
                    "DequantizeLinear",
                    name=fresh_name(names, f"{base}_DequantizeLinear"),
                    attrs=attrs,
                    inputs=[q_const, s_const, zp_const],
                    outputs=[out],
                )
            ]
            form = "dequantize"
        else:
            s_const = gs.Constant(fresh_name(names, f"{base}_scale"), scale)
            cast_out = gs.Variable(fresh_name(names, f"{base}_cast"), dtype=np.float32, shape=list(q.shape))
            nodes = [
                gs.Node(
                    "Cast",
                    name=fresh_name(names, f"{base}_Cast"),
                    attrs={"to": 1},
                    inputs=[q_const],
                    outputs=[cast_out],
                )
            ]
            if granularity == "block":
                mul_out = gs.Variable(fresh_name(names, f"{base}_blocks"), dtype=np.float32, shape=list(q.shape))
                shape_const = gs.Constant(fresh_name(names, f"{base}_shape"), np.array(w.shape, dtype=np.int64))
                if scale.dtype == np.float16:
                    s16 = s_const
                    s_const = gs.Variable(fresh_name(names, f"{base}_scale_float"), dtype=np.float32)
                    nodes.append(
                        gs.Node(
                            "Cast",
                            name=fresh_name(names, f"{base}_scale_Cast"),
                            attrs={"to": 1},
                            inputs=[s16],
                            outputs=[s_const],
                        )
                    )
                nodes += [
                    gs.Node(
                        "Mul", name=fresh_name(names, f"{base}_Mul"), inputs=[cast_out, s_const], outputs=[mul_out]
                    ),
                    gs.Node(
                        "Reshape",
                        name=fresh_name(names, f"{base}_Reshape"),
                        inputs=[mul_out, shape_const],
                        outputs=[out],
                    ),
                ]
                form = "load-block"
            else:
                nodes.append(
                    gs.Node("Mul", name=fresh_name(names, f"{base}_Mul"), inputs=[cast_out, s_const], outputs=[out])
                )
                form = "load"
        for consumer in consumers:
            for i, inp in enumerate(consumer.inputs):
                if inp is t:
                    consumer.inputs[i] = out
        owner.nodes.extend(nodes)
        return out.name, form

    def _rebase(
        self, name: str, wb: np.ndarray, q: np.ndarray, scale: np.ndarray, base: BaseWeights, counts: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Requantize one weight against its counterpart in the base release (unchanged when it has none
        or its layout differs); counts what was kept."""
        old = base.lookup(name)
        res = (
            None
            if old is None
            else requantize(
                wb,
                scale,
                old,
                QMAX,
                slack=self.config.base_slack,
                min_fill=self.config.base_min_fill,
                overflow=self.config.base_overflow,
                step=self.config.base_step,
                budget=self.config.base_budget,
            )
        )
        if res is None:
            key = "tensors_not_in_base" if old is None else "tensors_layout_changed"
            counts[key] = counts.get(key, 0) + 1
            return q, scale
        q_new, s_new, kept = res
        counts["tensors_rebased"] = counts.get("tensors_rebased", 0) + 1
        for k, v in kept.items():
            counts[k] = counts.get(k, 0) + v
        return q_new, s_new

    @staticmethod
    def _gather_then_dequantize(
        gather: gs.Node, q: gs.Constant, s: gs.Constant, tree: GraphTree, names: set[str]
    ) -> None:
        """Rewrite ``Gather(W, ids)`` as ``Cast(Gather(q, ids)) * Gather(s, ids)``."""
        graph = tree.node_graph[id(gather)]
        ids, out = gather.inputs[1], gather.outputs[0]
        base = gather.name or out.name
        gq = gs.Variable(fresh_name(names, f"{base}_q"), dtype=np.int8)
        gs_out = gs.Variable(fresh_name(names, f"{base}_row_scale"), dtype=np.float32)
        cast_out = gs.Variable(fresh_name(names, f"{base}_rows"), dtype=np.float32)
        gather.inputs[0] = q
        gather.outputs[0] = gq
        graph.nodes.extend(
            [
                gs.Node(
                    "Gather",
                    name=fresh_name(names, f"{base}_scale_Gather"),
                    attrs={"axis": 0},
                    inputs=[s, ids],
                    outputs=[gs_out],
                ),
                gs.Node(
                    "Cast", name=fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[gq], outputs=[cast_out]
                ),
                gs.Node("Mul", name=fresh_name(names, f"{base}_Mul"), inputs=[cast_out, gs_out], outputs=[out]),
            ]
        )


def _is_table_gather(node: gs.Node, table: gs.Tensor) -> bool:
    return (
        node.op == "Gather"
        and node.domain in ("", "ai.onnx", None)
        and node.inputs[0] is table
        and table not in node.inputs[1:]
        and int(node.attrs.get("axis", 0)) == 0
    )
