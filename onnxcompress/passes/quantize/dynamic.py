"""Dynamic int8: integer MatMul kernels with activations quantized at run time.

Every ``MatMul`` (and ``Gemm`` with ``alpha=1``, ``transA=0``) whose second input is a constant
float32 matrix ``W [K, N]`` and whose first input is computed at run time becomes (target
``standard``, standard ONNX at opset >= 11)::

    a_q, a_s, a_zp = DynamicQuantizeLinear(A)          # uint8, per tensor, once per activation
    y = Cast(MatMulInteger(a_q, W_q, a_zp), float)     # int8 weights, one scale per column
    Y = y * (a_s * w_s)                                # (+ C for Gemm)

onnxruntime fuses this into its ``DynamicQuantizeMatMul`` kernel (u8 x s8, VNNI where the CPU has
it). With ``--target onnxruntime`` the contrib op is written directly. Weights are symmetric int8
per output column; an activation read by several MatMuls (the Q, K and V projections) is quantized
once.

With calibration data (``--calibration`` or ``<model>.calibration.npz``), three refinements, each
measured on all-MiniLM-L6-v2 (worst sentence cosine of 53 held-out sentences; onnxruntime's
per-channel ``quantize_dynamic`` gives 0.971 in the same run, plain per-tensor here 0.977):

* **smoothing** (``smooth``, SmoothQuant's alpha, default 0.5): per input channel ``k``,
  ``s_k = max|A_k|**alpha / max|W_k|**(1-alpha)``; ``A`` is divided by ``s`` (one Mul before the
  quantizer) and ``W``'s rows multiplied by it, so outlier channels stop dominating the activation
  range. ``smooth=0`` turns it off.
* **skewed activations per row** (``activations=auto``, the default): an activation whose calibrated
  range is mostly positive (GELU/ReLU outputs feeding the FFN down-projection) is shifted to be
  non-negative per channel and quantized per row (token) over ``[0, max]`` with 255 levels; the
  shift is subtracted exactly after the product (``- shift @ W'``). ``activations=row`` quantizes
  every activation per row (symmetric rows when not skewed: more accurate, slower),
  ``activations=tensor`` never. Per row costs ``Abs``/``ReduceMax`` and one per-axis
  ``QuantizeLinear`` on the ``[rows, K]`` view (opset >= 13; older opsets: ``Div``, ``Round``,
  ``Cast``); the product is written as ``Cast(MatMulInteger) * (one * w_s)`` with ``one`` a run-time
  1.0 so onnxruntime fuses it into ``MatMulIntegerToFloat``, then one ``Mul`` by the row scales.
* **outlier channels** (``outliers=N``, default 0 = off): up to ``N`` input channels per activation
  whose calibrated ``max |A_k|`` is at least 4x the median channel's stay in float: they are zeroed
  by the smoothing ``Mul`` (and their int8 weight rows are zero), and ``A[..., idx] @ W[idx, :]`` is
  added back by one small ``Gemm`` (weights stored float16). In BERT-style encoders these are a
  handful of channels (MiniLM: channel 99 of the LayerNorm outputs, one GELU channel) where the
  ``[CLS]`` token reaches 20-30 while other tokens stay within about 4; they set the per-row scale
  of that token and the per-tensor scale of the whole batch.
* **GPTQ** (``gptq``, default on): the int8 weights are chosen with Hessian-based error feedback on
  the calibration inputs (``gptq_int8``) instead of rounding to nearest.

Column scales are stored as float16 when every scale of a weight fits its normal range (the codes
are chosen for the rounded scales; onnxruntime folds the ``Cast`` when it loads the model).

Where the error comes from (MiniLM, worst sentences are the two 7-token ones, "yes, of course."):
weights alone (smoothed GPTQ int8, float activations) 0.9992; embeddings alone 0.9998; the rest is
activations, spread over every layer's Q/K/V and FFN inputs. Per-tensor activation ranges are
taken over the whole batch, and validation fed 53 sentences padded to 72 tokens in one batch (until
session 6; it now runs them in slices of 8, like any large model: default 0.99439 -> 0.99447):
padding tokens and the ``[CLS]`` outliers set the range. Per tensor with 4 outlier channels (a
fake-quantization probe) scores 0.9984 with each sentence run alone (no padding) but 0.9939 in the
padded batch; per row does not depend on the batch. Measured in one run (size; worst cosine as
``compress`` validated then, one batch of 53; latency vs fp32 on one thread, batch 8 of the padded
inputs, all models interleaved in alternating order; a loaded 2-core machine, interquartile spread
about +-0.04):

    ====================================  ======  ==========  ===========
    MiniLM, worst of 53 sentences         size    worst cos   latency
    ====================================  ======  ==========  ===========
    onnxruntime quantize_dynamic (chan.)  0.2531  0.9711      0.46
    default (auto)                        0.2549  0.9944      0.47
    ``activations=row``                   0.2554  0.9968      0.52
    ``activations=row``, ``outliers=2``   0.2565  0.9989      0.56
    ``outliers=2`` (auto)                 0.2560  0.9971      0.53
    ====================================  ======  ==========  ===========

The default's worst cosine moves by about +-0.001 with any tiny change of the int8 codes (float16
vs float32 column scales: 0.9944 vs 0.9960; rounding ties); ``row`` + ``outliers=2`` stays at
0.9988-0.9989.

onnxruntime's fused kernels take one scale per tensor for ``A`` (``MatMulIntegerToFloat``,
``DynamicQuantizeMatMul``), so per-row scales and the outlier ``Gemm`` each cost whole passes over
the output; no standard-op form found here reaches 0.998 at the anchor's latency.

Left in float on purpose:

* MatMuls whose two inputs are both computed at run time (attention scores ``Q K^T``, ``P V``):
  quantizing both sides costs more accuracy than it saves time at typical sequence lengths
  (``--param attention=true`` quantizes them too, both sides per tensor).
* Convolutions: ``ConvInteger`` with dynamic activations is several times *slower* than float
  convolution in onnxruntime. Their weights are stored int8 per channel and dequantized when the
  model is loaded (as ``int8-weights``), so a CNN shrinks without slowing down
  (``--param conv=float`` leaves them as they are).

Embedding tables (``Gather`` on axis 0) are stored int8 with one scale per row and gathered before
dequantizing (see ``weights.py``), so the float table is never materialised.

Memory with calibration: each activation's Hessian is held as its packed upper triangle (float32) and
smoothed only when a weight needs it, smoothed weights are computed when they are quantized (never all in
float at once), and the heap is trimmed after each GPTQ weight. The calibration drops each tapped tensor
once read (a slice's outputs are not alive while the next slice runs), and GPTQ gets the smoothed
float64 Hessian as an array-like that it frees once copied (:class:`_MatrixOf`). MiniLM, peak RSS above
the imports, in units of the fp32 model: calibration 1.65x, GPTQ 1.8x (its float64 factorisation at
``K = 1536``), validation 1.5x (sliced like any model since session 6); the written model is
byte-identical. The whole pass peaks at 2.27x in the Gather sub-pass (``weights.quantize_weight`` on the
47 MB embedding table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ...errors import OnnxCompressError
from ...graph import Model, all_tensor_names, constant_meta, constant_value, fresh_name, iter_graphs
from ...validate import release_memory
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ..calibrate import ActivationTap, trim_heap
from ._common import refuse_quantized
from ._math import quantize_symmetric, symmetric_scales
from .gptq import PackedHessian, PreparedHessian, prepare_hessian
from .weights import Int8WeightsConfig, Int8WeightsPass

QMAX = 127
MIN_OPSET = 11  # DynamicQuantizeLinear


@dataclasses.dataclass(frozen=True)
class Int8DynamicConfig:
    """Options for :class:`Int8DynamicPass` (see the module docstring).

    Attributes:
        min_elements: Weights with fewer values stay float.
        attention: Also quantize MatMuls with two run-time inputs.
        conv: ``weights`` (int8 storage, float compute) or ``float`` (untouched).
        embeddings: Quantize Gather tables (int8 rows).
    """

    min_elements: int = 4096
    activations: str = "auto"
    smooth: float = 0.5
    outliers: int = 0
    gptq: bool = True
    damp: float = 0.01
    attention: bool = False
    conv: str = "weights"
    embeddings: bool = True


def int8_dynamic_config(params: Params) -> Int8DynamicConfig:
    """The config from ``--param`` settings."""
    outliers = params.get_int("outliers", Int8DynamicConfig.outliers)
    if outliers < 0:
        raise OnnxCompressError(f"--param outliers={outliers}: expected a channel count >= 0 (0 turns it off)")
    return Int8DynamicConfig(
        min_elements=params.get_int("min_elements", Int8DynamicConfig.min_elements),
        activations=params.get_str("activations", "auto", ("auto", "tensor", "row")),
        smooth=params.get_float("smooth", Int8DynamicConfig.smooth),
        outliers=outliers,
        gptq=params.get_bool("gptq", True),
        damp=params.get_float("damp", Int8DynamicConfig.damp),
        attention=params.get_bool("attention", False),
        conv=params.get_str("conv", "weights", ("weights", "float")),
        embeddings=params.get_bool("embeddings", True),
    )


@dataclasses.dataclass
class _Weight:
    q: gs.Constant
    scale: gs.Constant  # float32 [N] (values exact in float16 when ``scale16`` is set)
    scale16: gs.Constant | None = None  # what is stored: float16 [N], Cast to float32 in the graph


class _SmoothedValues(LazyValues):
    """A smoothed weight, computed when read: ``W' = W * s[:, None]`` (``W [K, N]``; ``W^T`` for a
    ``transB`` Gemm, transposed back), with the outlier rows ``outl`` zeroed.

    Every weight of the model is smoothed before the first is quantized; kept as arrays, the
    smoothed float copies would all be in memory at once (MiniLM: 42 MB). ``tensor`` (what an export
    would write) is built from the values, so the constant stays correct wherever it goes.
    """

    def __init__(self, source: gs.Tensor, scale: np.ndarray, outl: np.ndarray, trans: bool) -> None:
        meta = constant_meta(source)
        assert meta is not None
        self.source, self.scale, self.outl, self.trans = source, scale, outl, trans
        self.shape = meta[0]
        self.dtype = np.dtype(np.float32)
        self.nbytes = int(np.prod(self.shape)) * 4

    def load(self) -> np.ndarray:
        w = constant_value(self.source, cache=False)
        assert w is not None
        m = w.T if self.trans else w
        scaled = m * self.scale[:, None]
        if len(self.outl):
            scaled[self.outl] = 0.0
        return np.ascontiguousarray(scaled.T if self.trans else scaled)

    @property
    def tensor(self) -> onnx.TensorProto:  # type: ignore[override]
        return onnx.numpy_helper.from_array(self.load())


class _MatrixOf:
    """``h.matrix()`` for :func:`~.gptq.prepare_hessian`, computed when it is copied into the padded
    float64 buffer and freed right after (an array-like: ``shape`` and ``__array__``).

    Passed as ``prepare_hessian(h.matrix(), ...)``, the smoothed float64 ``K x K`` matrix would stay
    referenced by the call for the whole factorisation, next to the float64 copies that it makes
    (MiniLM, ``K = 1536``: 19 MB more at the peak of the GPTQ phase). The values are the same.
    """

    def __init__(self, h: PackedHessian) -> None:
        self.h = h
        self.shape = (h.k, h.k)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        m = self.h.matrix()
        return m if dtype is None else m.astype(dtype, copy=False)


class Int8DynamicPass:
    """Dynamic int8 MatMul/Gemm quantization (see module docstring)."""

    name = "int8-dynamic"

    def __init__(self, config: Int8DynamicConfig | None = None) -> None:
        self.config = config or Int8DynamicConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Quantize every eligible MatMul/Gemm of every graph, then Gather tables and Conv weights."""
        refuse_quantized(model, self.name)
        cfg = self.config
        self._opset = model.opset
        self._ranges: dict[str, tuple[float, float]] = {}
        self._chan_min: dict[str, np.ndarray] = {}
        self._hessians: dict[int, PackedHessian] = {}
        self._prepared: dict[int, PreparedHessian] = {}
        self._gptq_weights = 0
        self._outliers: dict[int, tuple[gs.Tensor, np.ndarray, np.ndarray]] = {}
        self._outlier_count = 0
        report = PassReport(self.name)
        before = GraphSize.of(model)
        ops: dict[str, int] = {}
        layers: list[dict[str, object]] = []
        smoothed = 0
        if model.opset < MIN_OPSET:
            report.skipped.append(("*", f"opset {model.opset} < {MIN_OPSET}: no DynamicQuantizeLinear"))
        else:
            names = all_tensor_names(model.graph)
            weights: dict[int, _Weight] = {}
            if (cfg.smooth > 0 or cfg.gptq or cfg.outliers > 0) and ctx.calibration:
                smoothed = self._smooth(model, ctx, names)
                release_memory()  # the calibration's and the smoothing's temporaries (MiniLM: -37 MB)
            for graph in list(iter_graphs(model.graph)):
                quantized_acts: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]] = {}
                for node in list(graph.nodes):
                    reason = self._eligible(node, ctx)
                    if reason == "":
                        continue
                    if reason:
                        report.skipped.append((node.name or node.op, reason))
                        continue
                    self._rewrite(node, graph, names, weights, quantized_acts, ctx, layers, report)
                    ops[node.op] = ops.get(node.op, 0) + 1
            if ops:
                model.graph.cleanup(remove_unused_graph_inputs=False)
        extra_ops = (["Gather"] if cfg.embeddings else []) + (
            ["Conv", "ConvTranspose"] if cfg.conv == "weights" else []
        )
        # The float weights replaced above sit in graphsurgeon's reference cycles until collected.
        release_memory()
        if extra_ops:
            sub = Int8WeightsPass(
                Int8WeightsConfig(
                    granularity="channel", op_types=tuple(extra_ops), min_elements=min(256, cfg.min_elements)
                )
            )
            sub_report = sub.run(model, ctx, check_quantized=False)
            report.skipped += [
                (n, r) for n, r in sub_report.skipped if r != "no constant weight input (computed at run time)"
            ]
            report.tensor_map.update(sub_report.tensor_map)
            if sub_report.modified:
                ops["weights-only"] = sub_report.stats.get("tensors_changed", 0)
        self._hessians.clear()
        self._prepared.clear()
        PackedHessian.release()
        report.modified = bool(ops)
        nonstandard = (
            ["DynamicQuantizeMatMul"]
            if ctx.target == "onnxruntime" and ops.get("MatMul", 0) + ops.get("Gemm", 0)
            else []
        )
        report.stats = before.stats(
            model,
            report.modified,
            nodes_quantized=ops,
            layers=layers,
            nonstandard_ops=nonstandard,
            smoothed_activations=smoothed,
            outlier_channels=self._outlier_count,
            gptq_weights=self._gptq_weights,
        )
        return report

    def _smooth(self, model: Model, ctx: PassContext, names: set[str]) -> int:
        """SmoothQuant-style migration of activation outliers into the weights (calibrated).

        For each activation ``A`` read by quantizable MatMuls of the main graph, with per-channel
        ranges ``a_k = max |A[..., k]|`` over the calibration feeds and ``w_k = max_n |W[k, n]|`` over
        its consumers, ``s_k = a_k**alpha / w_k**(1 - alpha)``; ``A`` is divided by ``s`` (one Mul
        before the quantizer) and each weight's row ``k`` multiplied by ``s_k`` -- the product is
        unchanged, but the channels that dominate the per-tensor activation range shrink.
        """
        alpha = self.config.smooth
        groups: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
        for node in model.graph.nodes:
            if self._eligible(node, ctx) is None and constant_meta(node.inputs[1]) is not None:
                a = node.inputs[0]
                groups.setdefault(id(a), (a, []))[1].append(node)
        groups = {k: v for k, v in groups.items() if v[0].name}
        if not groups:
            return 0
        amax: dict[str, np.ndarray] = {}
        hess: dict[str, PackedHessian] = {}
        with ActivationTap(model, [a.name for a, _ in groups.values()]) as tap:
            for acts in tap.iterate(ctx.calibration or []):
                for name in list(acts):
                    value = acts.pop(name)  # freed once read
                    if not value.size:
                        continue
                    if self.config.gptq:
                        x = np.ascontiguousarray(value.reshape(-1, value.shape[-1]), dtype=np.float32)
                        hess.setdefault(name, PackedHessian(x.shape[1])).add(x)
                        del x
                    v = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                    amax[name] = v if name not in amax else np.maximum(amax[name], v)
                    cmin = value.reshape(-1, value.shape[-1]).min(axis=0)
                    self._chan_min[name] = (
                        cmin if name not in self._chan_min else np.minimum(self._chan_min[name], cmin)
                    )
                    lo, hi = float(value.min()), float(value.max())
                    old = self._ranges.get(name, (lo, hi))
                    self._ranges[name] = (min(lo, old[0]), max(hi, old[1]))
                    del value
                del acts  # nothing of this slice is alive while the next one runs
        PackedHessian.release()
        done = 0
        for a, consumers in groups.values():
            if a.name not in amax:
                continue
            mats = []
            for node in consumers:
                w = constant_value(node.inputs[1], cache=False)
                trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
                mats.append(w.T if trans else w)
            if any(m.shape[0] != amax[a.name].shape[0] for m in mats):
                continue
            outl = _outlier_channels(amax[a.name], self.config.outliers)
            if alpha <= 0 and not len(outl):  # no smoothing: only the Hessians
                for node in consumers:
                    if a.name in hess:
                        self._hessians[id(node.inputs[1])] = hess[a.name]
                hess.pop(a.name, None)
                continue
            if alpha > 0:
                w_max = np.max([np.abs(m).max(axis=1) for m in mats], axis=0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    scale = np.power(amax[a.name], alpha) / np.power(w_max, 1.0 - alpha)
                scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
                scale = np.clip(scale, 1e-4, 1e4).astype(np.float32)
            else:
                scale = np.ones(amax[a.name].shape, np.float32)
            inv_s = (1.0 / scale).astype(np.float32)
            inv_s[outl] = 0.0  # outlier channels leave the quantized path (added back in float)
            self._outlier_count += len(outl)
            inv = gs.Constant(fresh_name(names, f"{a.name}_smooth"), inv_s)
            smooth_out = gs.Variable(fresh_name(names, f"{a.name}_smoothed"), dtype=np.float32)
            if a.name in self._ranges:  # dividing by s > 0 keeps each channel's sign pattern
                self._ranges[smooth_out.name] = self._ranges[a.name]
                self._chan_min[smooth_out.name] = self._chan_min[a.name] * inv_s
            model.graph.nodes.append(
                gs.Node("Mul", fresh_name(names, f"{a.name}_smooth_Mul"), inputs=[a, inv], outputs=[smooth_out])
            )
            h_smooth = hess.pop(a.name, None)
            if h_smooth is not None:
                h_smooth.smooth = inv_s  # applied when a weight needs it (see PackedHessian.matrix)
            for node, m in zip(consumers, mats):
                trans = bool(node.op == "Gemm" and int(node.attrs.get("transB", 0)))
                if len(outl):
                    self._outliers[id(node)] = (a, outl.astype(np.int64), np.ascontiguousarray(m[outl], np.float32))
                # Computed when the weight is quantized (see _SmoothedValues): no float copy is kept.
                node.inputs[1] = gs.Constant(
                    fresh_name(names, f"{node.inputs[1].name}_smoothed"),
                    _SmoothedValues(node.inputs[1], scale, outl, trans),
                )
                node.inputs[0] = smooth_out
                if h_smooth is not None:
                    self._hessians[id(node.inputs[1])] = h_smooth
            done += 1
        return done

    def _shift(self, a: gs.Tensor) -> np.ndarray | None:
        """For an activation whose calibrated range is mostly positive (GELU/ReLU outputs), the
        per-channel shift that makes it non-negative; None otherwise (or without calibration)."""
        if a.name not in self._chan_min:
            return None
        lo, hi = self._ranges[a.name]
        if not (hi > 0 and lo >= -0.25 * hi):
            return None
        return np.maximum(-self._chan_min[a.name], 0.0).astype(np.float32)

    def _eligible(self, node: gs.Node, ctx: PassContext) -> str | None:
        """``None`` if ``node`` is to be quantized, ``""`` to ignore it silently, else the skip reason."""
        if node.op not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx", None):
            return ""
        if is_excluded(node.name, node.op, ctx.exclude):
            return "excluded (--exclude)"
        if len(node.inputs) < 2:
            return ""
        a, b = node.inputs[0], node.inputs[1]
        meta_b, meta_a = constant_meta(b), constant_meta(a)
        if meta_a is not None:
            return "" if meta_b is not None else "constant first input (left to int8-weights)"
        if meta_b is None:
            return None if self.config.attention and node.op == "MatMul" else "two run-time inputs (attention-style)"
        shape, dtype = meta_b
        if dtype != np.float32:
            return f"weight dtype {dtype} (only float32 is quantized)"
        if len(shape) != 2:
            return f"weight of rank {len(shape)} (only 2-D weights use MatMulInteger)"
        if int(np.prod(shape)) < self.config.min_elements:
            return f"too small ({int(np.prod(shape))} elements < {self.config.min_elements})"
        if node.op == "Gemm":
            if float(node.attrs.get("alpha", 1.0)) != 1.0 or int(node.attrs.get("transA", 0)):
                return "Gemm with alpha != 1 or transA"
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                if float(node.attrs.get("beta", 1.0)) != 1.0:
                    return "Gemm with beta != 1"
        return None

    def _weight(self, node: gs.Node, names: set[str], weights: dict[int, _Weight]) -> _Weight:
        b = node.inputs[1]
        trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        key = id(b) * 2 + int(bool(trans))
        if key not in weights:
            w = constant_value(b, cache=False)
            assert w is not None
            if trans:
                w = np.ascontiguousarray(w.T)
            scale = symmetric_scales(w, 1, QMAX)
            # Column scales stored as float16 when they fit its normal range (half the bytes; the codes
            # are chosen for the rounded scales, so nothing is lost). onnxruntime folds the Cast at load.
            half = None
            if np.all((scale >= 2.0**-14) & (scale <= 60000.0)):
                half = scale.astype(np.float16)
                scale = half.astype(np.float32)
            h = self._hessians.pop(id(b), None)
            if h is not None and h.k == w.shape[0]:
                self._gptq_weights += 1
                if id(h) not in self._prepared:  # weights reading one activation share its factorisation
                    self._prepared[id(h)] = prepare_hessian(_MatrixOf(h), 1, self.config.damp)  # type: ignore[arg-type]
                q = gptq_int8(w, self._prepared[id(h)], scale)
                if not any(other is h for other in self._hessians.values()):
                    del self._prepared[id(h)]  # its last reader is done: free the K x K matrices
                # GPTQ's float64 K x K temporaries raise glibc's mmap threshold, so the next ones land in
                # the heap: give their pages back before the next weight (MiniLM: -40 MB by the last).
                trim_heap()
            else:
                q = quantize_symmetric(w, scale, 1, QMAX, np.int8)
            weights[key] = _Weight(
                gs.Constant(fresh_name(names, f"{b.name}_quantized"), q),
                gs.Constant(fresh_name(names, f"{b.name}_scale"), scale),
                None if half is None else gs.Constant(fresh_name(names, f"{b.name}_scale_fp16"), half),
            )
        return weights[key]

    @staticmethod
    def _scale_input(wq: _Weight, base: str, names: set[str], new_nodes: list[gs.Node]) -> gs.Tensor:
        """The column scales as a float32 graph tensor (a Cast of the float16 constant when stored so)."""
        if wq.scale16 is None:
            return wq.scale
        out = gs.Variable(fresh_name(names, f"{base}_column_scale"), dtype=np.float32)
        new_nodes.append(
            gs.Node(
                "Cast", fresh_name(names, f"{base}_scale_Cast"), attrs={"to": 1}, inputs=[wq.scale16], outputs=[out]
            )
        )
        return out

    def _rewrite(
        self,
        node: gs.Node,
        graph: gs.Graph,
        names: set[str],
        weights: dict[int, _Weight],
        quantized_acts: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        ctx: PassContext,
        layers: list[dict[str, object]],
        report: PassReport,
    ) -> None:
        base = node.name or node.outputs[0].name
        out = node.outputs[0]
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        a = node.inputs[0]
        new_nodes: list[gs.Node] = []
        if constant_meta(node.inputs[1]) is None:  # attention-style: both sides per tensor
            qa = self._quantize_activation(a, graph, names, quantized_acts, new_nodes)
            qb = self._quantize_activation(node.inputs[1], graph, names, quantized_acts, new_nodes)
            y_i = gs.Variable(fresh_name(names, f"{base}_int32"), dtype=np.int32)
            y_f = gs.Variable(fresh_name(names, f"{base}_float"), dtype=np.float32)
            s = gs.Variable(fresh_name(names, f"{base}_scales"), dtype=np.float32)
            new_nodes += [
                gs.Node(
                    "MatMulInteger",
                    fresh_name(names, f"{base}_MatMulInteger"),
                    inputs=[qa[0], qb[0], qa[2], qb[2]],
                    outputs=[y_i],
                ),
                gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[y_i], outputs=[y_f]),
                gs.Node("Mul", fresh_name(names, f"{base}_scale_Mul"), inputs=[qa[1], qb[1]], outputs=[s]),
                gs.Node("Mul", fresh_name(names, f"{base}_Mul"), inputs=[y_f, s], outputs=[out]),
            ]
            layers.append({"node": node.name, "op": node.op, "scheme": "dynamic-both-per-tensor"})
        else:
            wq = self._weight(node, names, weights)
            w_scale = self._scale_input(wq, base, names, new_nodes)
            bytes_before = int(np.prod(wq.q.values.shape)) * 4
            outlier = self._outliers.get(id(node))
            act_scheme = "per-tensor"
            matmul_out = (
                out
                if bias is None and outlier is None
                else gs.Variable(fresh_name(names, f"{base}_nobias"), dtype=np.float32)
            )
            if ctx.target == "onnxruntime":
                new_nodes.append(
                    gs.Node(
                        "DynamicQuantizeMatMul",
                        fresh_name(names, f"{base}_DynamicQuantizeMatMul"),
                        domain="com.microsoft",
                        inputs=[a, wq.q, w_scale],
                        outputs=[matmul_out],
                    )
                )
            elif self.config.activations == "row" or (self.config.activations == "auto" and self._shift(a) is not None):
                act_scheme = "per-row" if self._shift(a) is None else "per-row shifted"
                shift = self._shift(a)
                q, s_row, zp = self._quantize_rows(
                    a, names, quantized_acts, new_nodes, model_opset=self._opset, shift=shift
                )
                y_i = gs.Variable(fresh_name(names, f"{base}_int32"), dtype=np.int32)
                y_f = gs.Variable(fresh_name(names, f"{base}_float"), dtype=np.float32)
                y_r = gs.Variable(fresh_name(names, f"{base}_rows"), dtype=np.float32)
                new_nodes += [
                    gs.Node(
                        "MatMulInteger", fresh_name(names, f"{base}_MatMulInteger"), inputs=[q, wq.q, zp], outputs=[y_i]
                    ),
                    gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[y_i], outputs=[y_f]),
                ]
                # Column scales first, as ``y * (one * w_scale)`` with ``one`` a run-time 1.0: onnxruntime
                # fuses MatMulInteger + Cast + Mul(Mul(a_scale, b_scale)) into one MatMulIntegerToFloat
                # kernel (a constant product would be folded away before the fusion sees it).
                one = self._runtime_one(s_row, names, quantized_acts, new_nodes)
                w_s = gs.Variable(fresh_name(names, f"{base}_column_scales"), dtype=np.float32)
                new_nodes += [
                    gs.Node("Mul", fresh_name(names, f"{base}_scale_Mul"), inputs=[one, w_scale], outputs=[w_s]),
                    gs.Node("Mul", fresh_name(names, f"{base}_Mul"), inputs=[y_f, w_s], outputs=[y_r]),
                ]
                if shift is None:
                    new_nodes.append(
                        gs.Node("Mul", fresh_name(names, f"{base}_row_Mul"), inputs=[y_r, s_row], outputs=[matmul_out])
                    )
                else:  # undo the shift: (a + c) W' - c W'
                    w_deq = wq.q.values.astype(np.float32) * wq.scale.values
                    corr = gs.Constant(
                        fresh_name(names, f"{base}_shift_correction"), -(shift @ w_deq).astype(np.float32)
                    )
                    y_s = gs.Variable(fresh_name(names, f"{base}_shifted"), dtype=np.float32)
                    new_nodes += [
                        gs.Node("Mul", fresh_name(names, f"{base}_row_Mul"), inputs=[y_r, s_row], outputs=[y_s]),
                        gs.Node(
                            "Add", fresh_name(names, f"{base}_shift_Add"), inputs=[y_s, corr], outputs=[matmul_out]
                        ),
                    ]
            else:
                qa = self._quantize_activation(a, graph, names, quantized_acts, new_nodes)
                y_i = gs.Variable(fresh_name(names, f"{base}_int32"), dtype=np.int32)
                y_f = gs.Variable(fresh_name(names, f"{base}_float"), dtype=np.float32)
                s = gs.Variable(fresh_name(names, f"{base}_scales"), dtype=np.float32)
                new_nodes += [
                    gs.Node(
                        "MatMulInteger",
                        fresh_name(names, f"{base}_MatMulInteger"),
                        inputs=[qa[0], wq.q, qa[2]],
                        outputs=[y_i],
                    ),
                    gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[y_i], outputs=[y_f]),
                    gs.Node("Mul", fresh_name(names, f"{base}_scale_Mul"), inputs=[qa[1], w_scale], outputs=[s]),
                    gs.Node("Mul", fresh_name(names, f"{base}_Mul"), inputs=[y_f, s], outputs=[matmul_out]),
                ]
            if outlier is not None:
                self._add_outliers(base, outlier, matmul_out, bias, out, names, new_nodes)
            elif bias is not None:
                new_nodes.append(
                    gs.Node("Add", fresh_name(names, f"{base}_bias_Add"), inputs=[matmul_out, bias], outputs=[out])
                )
            layers.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "tensor": node.inputs[1].name,
                    "bytes_before": bytes_before,
                    "bytes_after": bytes_before // 4
                    + int((wq.scale16 if wq.scale16 is not None else wq.scale).values.nbytes),
                    "scheme": f"int8 per-column weights, uint8 {act_scheme} dynamic activations"
                    + (f", {len(outlier[1])} outlier channels in float" if outlier is not None else ""),
                }
            )
            report.tensor_map[wq.q.name] = node.inputs[1].name
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.extend(new_nodes)  # the rewrite stays inside ``graph``; export sorts the nodes

    @staticmethod
    def _runtime_one(
        s_row: gs.Tensor,
        names: set[str],
        done: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        new_nodes: list[gs.Node],
    ) -> gs.Tensor:
        """A scalar 1.0 computed at run time from the (positive) row scales, shared per activation."""
        key = -id(s_row)
        if key not in done:
            peak = gs.Variable(fresh_name(names, f"{s_row.name}_peak"), dtype=np.float32)
            one = gs.Variable(fresh_name(names, f"{s_row.name}_one"), dtype=np.float32)
            new_nodes += [
                gs.Node(
                    "ReduceMax",
                    fresh_name(names, f"{s_row.name}_ReduceMax"),
                    attrs={"keepdims": 0},
                    inputs=[s_row],
                    outputs=[peak],
                ),
                gs.Node("Div", fresh_name(names, f"{s_row.name}_Div"), inputs=[peak, peak], outputs=[one]),
            ]
            done[key] = (one, one, one)
        return done[key][0]

    @staticmethod
    def _add_outliers(
        base: str,
        outlier: tuple[gs.Tensor, np.ndarray, np.ndarray],
        matmul_out: gs.Tensor,
        bias: gs.Tensor | None,
        out: gs.Tensor,
        names: set[str],
        new_nodes: list[gs.Node],
    ) -> None:
        """``out = matmul_out + A[..., idx] @ W[idx, :] (+ bias)``: the outlier channels in float.

        One ``Gemm`` on the gathered channels (a ``[rows, k]`` matrix, ``k`` a handful) adds the bias
        too, so the float path costs one write and one ``Add`` over the output.
        """
        src, idx, w_out = outlier

        v, c, node = _builders(names, base)

        picked, flat, partial, shaped, shape = (
            v("outlier_channels"),
            v("outlier_rows"),
            v("outlier_product"),
            v("outlier_shaped"),
            v("out_shape", np.int64),
        )
        # float16 storage (exact enough next to int8; onnxruntime folds the Cast when it loads the model)
        w16, w32 = c("outlier_weight", w_out.astype(np.float16)), v("outlier_weight_float")
        new_nodes += [
            node("Cast", [w16], w32, to=1),
            node("Gather", [src, c("outlier_index", idx)], picked, axis=-1),
            node("Reshape", [picked, c("outlier_2d", np.array([-1, len(idx)], np.int64))], flat),
            node("Gemm", [flat, w32] + ([bias] if bias is not None else []), partial),
            node("Shape", [matmul_out], shape),
            node("Reshape", [partial, shape], shaped),
            node("Add", [matmul_out, shaped], out),
        ]

    @staticmethod
    def _quantize_rows(
        a: gs.Tensor,
        names: set[str],
        done: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        new_nodes: list[gs.Node],
        model_opset: int,
        shift: np.ndarray | None = None,
    ) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
        """Per-row (per token) quantization of ``a`` to uint8; returns ``(q, row scale, zero point)``.

        Without ``shift``: symmetric, ``q = round(a / s) + 128`` with ``s = max|a_row| / 127``.
        With a per-channel ``shift >= 0`` (skewed activations such as GELU outputs, whose calibrated
        minimum is a small negative number): ``a + shift >= 0`` is quantized over ``[0, max]`` with
        255 levels and zero point 0; the caller subtracts ``shift @ W`` afterwards.
        """
        if id(a) in done:
            return done[id(a)]
        base = a.name or "activation"

        v, c, node = _builders(names, base)

        nodes: list[gs.Node] = []
        if shift is not None:
            src = v("shifted")
            nodes.append(node("Add", [a, c("shift", shift.astype(np.float32))], src))
            mag, levels = src, 255.0
        else:
            src = a
            mag, levels = v("abs"), 127.0
            nodes.append(node("Abs", [a], mag))
        amax, amax_c, s, t, r, q = (v(x) for x in ("amax", "amax_c", "row_scale", "div", "round", "q"))
        q.dtype = np.uint8
        if model_opset >= 18:
            nodes.append(node("ReduceMax", [mag, c("axes", np.array([-1], np.int64))], amax, keepdims=1))
        else:
            nodes.append(node("ReduceMax", [mag], amax, keepdims=1, axes=[-1]))
        nodes += [
            node("Max", [amax, c("eps", np.array(1e-30, np.float32))], amax_c),
            node("Div", [amax_c, c("levels", np.array(levels, np.float32))], s),
        ]
        zero = 0 if shift is not None else 128
        zp = c("zero_point", np.array(zero, np.uint8))
        if model_opset >= 13:  # one per-axis QuantizeLinear on the [rows, K] view: scale per row
            flat, s_flat, rows, zp_flat, q_flat, shape = (
                v(x) for x in ("rows_view", "row_scale_flat", "rows", "row_zero_point", "q_rows", "shape")
            )
            rows.dtype = shape.dtype = np.int64
            zp_flat.dtype = q_flat.dtype = np.uint8
            nodes += [
                node("Flatten", [src], flat, axis=-1),
                node("Reshape", [s, c("flat", np.array([-1], np.int64))], s_flat),
                node("Shape", [s_flat], rows),
                node(
                    "ConstantOfShape",
                    [rows],
                    zp_flat,
                    value=gs.Constant(f"{base}_zero_value", np.array([zero], np.uint8)),
                ),
                node("QuantizeLinear", [flat, s_flat, zp_flat], q_flat, axis=0),
                node("Shape", [src], shape),
                node("Reshape", [q_flat, shape], q),
            ]
        else:
            nodes += [node("Div", [src, s], t), node("Round", [t], r)]
            if shift is not None:
                cl = v("clip")
                lo, hi = c("lo", np.array(0, np.float32)), c("hi", np.array(255, np.float32))
                nodes += [node("Clip", [r, lo, hi], cl), node("Cast", [cl], q, to=2)]
            else:
                u = v("offset")
                nodes += [node("Add", [r, c("offset", np.array(128, np.float32))], u), node("Cast", [u], q, to=2)]
        new_nodes += nodes
        done[id(a)] = (q, s, zp)
        return done[id(a)]

    @staticmethod
    def _quantize_activation(
        a: gs.Tensor,
        graph: gs.Graph,
        names: set[str],
        done: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        new_nodes: list[gs.Node],
    ) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
        """``DynamicQuantizeLinear(a)``, shared by every MatMul of ``graph`` that reads ``a``."""
        if id(a) not in done:
            base = a.name or "activation"
            q = gs.Variable(fresh_name(names, f"{base}_quantized"), dtype=np.uint8)
            s = gs.Variable(fresh_name(names, f"{base}_scale"), dtype=np.float32, shape=[])
            zp = gs.Variable(fresh_name(names, f"{base}_zero_point"), dtype=np.uint8, shape=[])
            new_nodes.append(
                gs.Node(
                    "DynamicQuantizeLinear",
                    fresh_name(names, f"{base}_DynamicQuantizeLinear"),
                    inputs=[a],
                    outputs=[q, s, zp],
                )
            )
            done[id(a)] = (q, s, zp)
        return done[id(a)]


def _outlier_channels(amax: np.ndarray, count: int, ratio: float = 4.0) -> np.ndarray:
    """Up to ``count`` input channels whose calibrated ``max |A_k|`` is at least ``ratio`` times the
    median channel's (the largest first); empty when ``count <= 0`` or no channel stands out."""
    if count <= 0 or amax.size <= count:
        return np.zeros(0, dtype=np.int64)
    floor = ratio * float(np.median(amax))
    top = np.argsort(amax)[::-1][:count]
    return np.sort(top[amax[top] >= floor]).astype(np.int64)


def _builders(
    names: set[str], base: str
) -> tuple[Callable[..., gs.Variable], Callable[[str, np.ndarray], gs.Constant], Callable[..., gs.Node]]:
    """Makers of fresh variables, constants and nodes named ``<base>_<suffix>`` (unique in ``names``)."""

    def v(suffix: str, dtype: type = np.float32) -> gs.Variable:
        return gs.Variable(fresh_name(names, f"{base}_{suffix}"), dtype=dtype)

    def c(suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(names, f"{base}_{suffix}"), value)

    def node(op: str, inputs: list[gs.Tensor], output: gs.Tensor, **attrs: object) -> gs.Node:
        return gs.Node(op, fresh_name(names, f"{base}_{op}"), attrs=attrs, inputs=inputs, outputs=[output])

    return v, c, node


def gptq_int8(
    w: np.ndarray, h: np.ndarray | PreparedHessian, scale: np.ndarray, damp: float = 0.01, batch: int = 128
) -> np.ndarray:
    """GPTQ of ``w [K, N]`` to symmetric int8 with fixed per-column ``scale [N]`` (see ``gptq.py``).

    ``h [K, K] = sum X^T X`` over the calibration inputs. Columns of ``w`` are output channels, so the
    sweep runs over the ``K`` rows; each row's rounding error is spread over the rows not yet
    quantized, which minimises ``||X W - X W'||^2`` instead of ``||W - W'||^2``.
    """
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(h, 1, damp)
    u = prep.u
    wq = np.asarray(w, dtype=np.float32).T.copy()  # [N, K]
    wq[:, prep.dead] = 0.0
    n, k = wq.shape
    codes = np.empty((n, k), dtype=np.int8)
    s = scale.astype(np.float32)
    for i1 in range(0, k, batch):
        i2 = min(i1 + batch, k)
        w1 = wq[:, i1:i2].copy()
        err = np.zeros((n, i2 - i1), dtype=np.float32)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = np.clip(np.rint(w1[:, i] / s), -QMAX, QMAX)
            codes[:, i1 + i] = q
            e = (w1[:, i] - q * s) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        wq[:, i2:] -= err @ u[i1:i2, i2:]
    return np.ascontiguousarray(codes.T)
