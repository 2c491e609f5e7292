"""Static int8 quantization: QuantizeLinear/DequantizeLinear (QDQ) pairs with calibrated activation ranges.

Activations ``x`` are quantized with a scale ``s`` and zero point ``z`` fitted to a calibration range
``[lo, hi]`` (see ``ranges``; uint8 asymmetric ``s = (hi - lo) / 255``, ``z = round(-lo / s)``, or int8
symmetric ``s = max|.| / 127``, ``z = 0``)::

    x' = DequantizeLinear(QuantizeLinear(x, s, z), s, z) = (clip(round(x / s) + z, qmin, qmax) - z) s

Weights ``W`` are int8, symmetric, one scale per output channel (Conv ``[O, I, k..]`` axis 0,
ConvTranspose axis 1, Gemm ``B`` axis 1, or 0 with ``transB``, MatMul ``B [K, N]`` axis 1; per tensor
below opset 13, which has no per-axis DequantizeLinear). A Conv/Gemm bias ``b`` becomes int32 with the
scale ``s_x s_w[c]`` of the accumulator (as onnxruntime does)::

    b_q[c] = round(b[c] / (s_x s_w[c]))   so that  sum_i q_x q_w + b_q  is the int32 accumulator,

and where ``|b_q|`` would overflow int32 the channel's weight scale is raised until it fits.

Placement follows onnxruntime's QDQ node units, so that its CPU provider swaps each
``DQ -> op -> Q`` for an integer kernel (QLinearConv, QLinearMatMul / MatMulIntegerToFloat, QGemm,
QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool) and drops the
pairs around data-movement ops:

* quantized nodes: Conv, ConvTranspose, Gemm and MatMul with a constant float weight, and Add/Mul of
  two activations (residuals). Their activation inputs are quantized; their output too (Gemm/MatMul:
  only where a consumer is quantized, so a final layer keeps a float output and its float-output
  integer kernel).
* a Relu, or a Clip with a lower bound of 0, that is the only reader of a quantized node's output is
  fused (asymmetric activations only): the output range starts at 0, so ``z = 0`` and the
  QuantizeLinear clips exactly like the activation, which is removed. One Q/DQ pair then sits after
  the activation, none between. If the final scale cannot clip exactly (a shared range reaching
  below 0, or above Clip's upper bound) the activation stays.
* shared-scale nodes: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Resize, Reshape,
  Transpose, Flatten, Squeeze, Unsqueeze, Concat, and Relu/Clip that are not fused. When an input is
  quantized the output is quantized with the same scale and zero point (the range covers all of
  them), so no requantization happens; the quantization also spreads backwards into an input read by
  nothing else (e.g. the NHWC->NCHW Transpose after a graph input).

Each quantized tensor gets exactly one QuantizeLinear and one DequantizeLinear; the DequantizeLinear
output keeps the tensor's name (diagnostics match it), the float value gets ``<name>_float``.
Graph outputs of a final Gemm/MatMul stay float. MatMul of two activations (attention scores), Add/Mul
with a constant operand, other ops and every node inside If/Loop/Scan bodies (their activations cannot
be tapped) stay float, with the reason in ``report.skipped``.

Calibration (required): each calibration feed runs once through an :class:`ActivationTap` on the model
as it is now, in slices of a few samples (as many as keep the tapped tensors of one slice within
``calibrate.TAP_BYTES``); every candidate tensor's slice streams into a ``RangeCollector`` (bounded
histograms), so memory holds one slice's activations (MiniLM: 152 tensors, 2 sentences per run; peak RSS
of ``compress`` 2.5x -> 1.85x the fp32 model, the ranges unchanged).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import Model, all_tensor_names, constant_meta, constant_value, fresh_name, iter_graphs
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ..calibrate import ActivationTap, require_calibration
from ._common import refuse_quantized
from ._math import quantize_symmetric, symmetric_scales
from .ranges import METHODS, RangeCollector, scale_zero_point

log = logging.getLogger(__name__)

QMAX = 127
INT32_MAX = 2**31 - 1
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BINARY_OPS = ("Add", "Mul")
# Ops whose integer kernel needs a quantized output (no float-output variant in onnxruntime's CPU provider).
OUTPUT_Q_OPS = ("Conv", "ConvTranspose", "Add", "Mul")
SHARED_OPS = (
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Reshape", "Transpose",
    "Flatten", "Squeeze", "Unsqueeze", "Concat", "Relu", "Clip",
)  # fmt: skip
# Averages: their integer kernels requantize for free and the mean's range is narrower than the input's,
# so the output gets its own scale (measured: resnet_cnn worst cosine 0.9986 shared -> see README).
OWN_SCALE_OPS = ("AveragePool", "GlobalAveragePool")
FUSABLE = ("Relu", "Clip")
STANDARD = ("", "ai.onnx", None)


@dataclasses.dataclass(frozen=True)
class Int8StaticConfig:
    """Options for :class:`Int8StaticPass` (see the module docstring).

    Attributes:
        method: Activation range method: ``minmax`` (default), ``percentile``, ``entropy`` or ``mse``.
            On digits_cnn, digits_keras and resnet_cnn minmax, percentile and mse give the same worst
            cosine within 1e-4 (entropy clips too hard: 0.91 on resnet_cnn); minmax needs no
            histograms (fastest) and keeps the outlier channels of transformer activations.
        percentile: Percentile for ``method=percentile``.
        activation_symmetric: int8 symmetric activations (zero point 0) instead of uint8 asymmetric.
        per_channel: One weight scale per output channel (opset >= 13) instead of one per tensor.
        bias: ``int32`` (DequantizeLinear of an int32 bias with scale ``s_x s_w``) or ``float``.
    """

    method: str = "minmax"
    percentile: float = 99.999
    activation_symmetric: bool = False
    per_channel: bool = True
    bias: str = "int32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OnnxCompressError(f"--param method={self.method}: choose from {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise OnnxCompressError(f"--param percentile={self.percentile}: expected a value in (50, 100]")
        if self.bias not in ("int32", "float"):
            raise OnnxCompressError(f"--param bias={self.bias}: choose from int32, float")


def int8_static_config(params: Params) -> Int8StaticConfig:
    """Build the config from ``--param`` settings (``method``, ``percentile``, ``activation_symmetric``,
    ``per_channel``, ``bias``)."""
    default = Int8StaticConfig()
    return Int8StaticConfig(
        method=params.get_str("method", default.method, METHODS),
        percentile=params.get_float("percentile", default.percentile),
        activation_symmetric=params.get_bool("activation_symmetric", default.activation_symmetric),
        per_channel=params.get_bool("per_channel", default.per_channel),
        bias=params.get_str("bias", default.bias, ("int32", "float")),
    )


@dataclasses.dataclass
class _Unit:
    """A quantized node, with the activation fused after it (if any)."""

    node: gs.Node
    weight: int | None  # input index of the constant weight
    act: gs.Node | None = None
    x_name: str = ""  # the activation input's name before rewriting (its scale is the bias's)

    @property
    def output(self) -> gs.Tensor:
        return (self.act or self.node).outputs[0]

    def activations(self) -> list[gs.Tensor]:
        """The activation (non-constant) inputs to quantize."""
        if self.node.op in BINARY_OPS:
            return [self.node.inputs[0], self.node.inputs[1]]
        return [self.node.inputs[0]]


class _Groups:
    """Union-find over tensor names: tensors that share one scale and zero point."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _is_variable(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Variable) and constant_meta(t) is None and bool(t.name)


def _clip_bounds(node: gs.Node) -> tuple[float | None, float | None] | None:
    """Clip's ``(min, max)`` if constant (None for an absent bound), else None."""
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return node.attrs.get("min"), node.attrs.get("max")
    bounds: list[float | None] = []
    for i in (1, 2):
        if len(node.inputs) <= i or not node.inputs[i].name:
            bounds.append(None)
            continue
        v = constant_value(node.inputs[i])
        if v is None or v.size != 1:
            return None
        bounds.append(float(v.reshape(())))
    return bounds[0], bounds[1]


class Int8StaticPass:
    """Static int8 QDQ quantization with calibrated activation ranges (see module docstring)."""

    name = "int8-static"

    def __init__(self, config: Int8StaticConfig | None = None) -> None:
        self.config = config or Int8StaticConfig()

    # ------------------------------------------------------------------------------------ run

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Quantize ``model.graph`` in place."""
        refuse_quantized(model, self.name)
        report = PassReport(self.name)
        before = GraphSize.of(model)
        if model.opset < 10:
            report.skipped.append(("<model>", f"opset {model.opset} < 10 has no QuantizeLinear/DequantizeLinear"))
            report.stats = before.stats(model, False)
            return report
        graph = model.graph
        try:
            graph.toposort()
        except Exception as exc:  # noqa: BLE001 - graphsurgeon raises plain exceptions on cycles
            report.skipped.append(("<model>", f"graph cannot be sorted: {exc}"))
            report.stats = before.stats(model, False)
            return report
        units, shared = self._select(model, ctx, report)
        if not units:
            report.stats = before.stats(model, False)
            return report
        feeds = ctx.calibration
        if not feeds and not graph.inputs:
            feeds = [{}]  # nothing is fed: the activations are what they are
        feeds = require_calibration(feeds, self.name)
        wanted = self._candidates(units, shared)
        collectors: dict[str, RangeCollector] = {}
        dtypes: dict[str, np.dtype] = {}
        plan = None
        while wanted:
            try:
                self._calibrate(model, wanted, feeds, collectors, dtypes)
            except OnnxCompressError as exc:
                report.skipped.append(("<model>", f"calibration failed: {exc}"))
                report.stats = before.stats(model, False)
                return report
            plan = self._plan(units, shared, collectors, dtypes, [t.name for t in graph.outputs], report)
            # Undone fusions need their pre-activation tensors: one more calibration run for those.
            wanted = [n for n in self._candidates(units, shared) if n not in dtypes]
        if plan is None:
            report.stats = before.stats(model, False)
            return report
        stats = self._rewrite(model, units, plan, report)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        report.modified = True
        report.stats = before.stats(model, True, **stats)
        return report

    # ------------------------------------------------------------------------------ selection

    def _select(self, model: Model, ctx: PassContext, report: PassReport) -> tuple[list[_Unit], list[gs.Node]]:
        """The main-graph nodes to quantize and the shared-scale nodes (fusion tentatively applied)."""
        cfg = self.config
        graph = model.graph
        units: list[_Unit] = []
        shared: list[gs.Node] = []
        for g in iter_graphs(graph):
            if g is graph:
                continue
            for node in g.nodes:
                if node.op in WEIGHT_OPS + BINARY_OPS and node.domain in STANDARD:
                    report.skipped.append(
                        (node.name or node.op, "inside an If/Loop/Scan body: its activations cannot be tapped")
                    )
        for node in graph.nodes:
            if node.domain not in STANDARD or node.op not in WEIGHT_OPS + BINARY_OPS + SHARED_OPS:
                continue
            if is_excluded(node.name, node.op, ctx.exclude):
                report.skipped.append((node.name or node.op, "excluded by configuration"))
                continue
            if node.op in SHARED_OPS:
                shared.append(node)
                continue
            reason, weight = self._check(node)
            if reason:
                report.skipped.append((node.name or node.op, reason))
                continue
            units.append(_Unit(node, weight))
        units = self._residuals_only(graph, units, shared, report)
        if not cfg.activation_symmetric:
            shared_ids = {id(n) for n in shared}
            for unit in units:
                out = unit.node.outputs[0]
                readers = list(out.outputs)
                if len(readers) != 1 or out in graph.outputs or id(readers[0]) not in shared_ids:
                    continue
                act = readers[0]
                if act.op == "Relu" or (act.op == "Clip" and self._fusable_clip(act)):
                    unit.act = act
        return units, shared

    @staticmethod
    def _residuals_only(graph: gs.Graph, units: list[_Unit], shared: list[gs.Node], report: PassReport) -> list[_Unit]:
        """Keep an Add/Mul only where both operands are quantized anyway (outputs of Conv or of another
        kept Add/Mul, possibly through shared-scale ops, Relu/Clip included): residual joins in CNNs. An
        Add/Mul fed by a float-output MatMul (transformer residuals, masks, GELU) would add rounding
        error without saving a requantization, and attention masks (-1e4) would wreck the scale."""
        by_node = {id(u.node): u for u in units}
        shared_ids = {id(n) for n in shared}
        quantized = {id(t) for u in units if u.node.op in WEIGHT_OPS for t in u.activations()}
        kept: list[_Unit] = []
        for node in graph.nodes:
            unit = by_node.get(id(node))
            if unit is not None and node.op in BINARY_OPS:
                if not all(id(t) in quantized for t in node.inputs):
                    report.skipped.append(
                        (node.name or node.op, "operand not quantized (not a residual join): kept float")
                    )
                    continue
            if unit is not None and node.op in OUTPUT_Q_OPS:
                quantized.update(id(t) for t in node.outputs)
            elif id(node) in shared_ids and node.inputs and id(node.inputs[0]) in quantized:
                quantized.update(id(t) for t in node.outputs)
            if unit is not None:
                kept.append(unit)
        return kept

    @staticmethod
    def _fusable_clip(node: gs.Node) -> bool:
        bounds = _clip_bounds(node)
        return bounds is not None and bounds[0] == 0.0

    def _check(self, node: gs.Node) -> tuple[str | None, int | None]:
        """Why ``node`` cannot be quantized (None if it can), and its weight input index."""
        op = node.op
        if op in BINARY_OPS:
            if len(node.inputs) != 2 or not all(_is_variable(t) for t in node.inputs):
                return "constant operand: kept float", None
            if node.inputs[0] is node.inputs[1]:
                return "same tensor on both operands: kept float", None
            return None, None
        if len(node.inputs) < 2 or not _is_variable(node.inputs[0]):
            return "no activation input", None
        meta = constant_meta(node.inputs[1])
        if meta is None:
            if op == "MatMul":
                return "both operands are activations (e.g. attention scores): kept float", None
            return "weight computed at run time", None
        shape, dtype = meta
        if dtype != np.float32:
            return f"weight dtype {dtype} (only float32 is quantized)", None
        if op == "MatMul" and len(shape) < 2:
            return "1-D MatMul weight", None
        if op == "Gemm" and int(node.attrs.get("transA", 0)):
            return "Gemm with transA=1", None
        return None, 1

    @staticmethod
    def _candidates(units: list[_Unit], shared: list[gs.Node]) -> list[str]:
        names: list[str] = []
        for unit in units:
            names += [t.name for t in unit.activations()]
            # A fused activation's input is tapped only if the fusion has to be undone (see run).
            names.append(unit.output.name)
        for node in shared:
            names += [t.name for t in node.inputs[: None if node.op == "Concat" else 1] if _is_variable(t)]
            names += [t.name for t in node.outputs[:1]]
        return list(dict.fromkeys(n for n in names if n))

    # ---------------------------------------------------------------------------- calibration

    def _calibrate(
        self,
        model: Model,
        names: list[str],
        feeds: list[dict[str, np.ndarray]],
        collectors: dict[str, RangeCollector],
        dtypes: dict[str, np.dtype],
    ) -> None:
        """Stream the feeds through a tap; one bounded collector per float32 tensor (filled in place)."""
        histogram = self.config.method != "minmax"
        with ActivationTap(model, names) as tap:
            for acts in tap.iterate(feeds):
                for name, value in acts.items():
                    value = np.asarray(value) if isinstance(value, np.ndarray) else None
                    if value is None:
                        dtypes[name] = np.dtype(object)
                        continue
                    dtypes.setdefault(name, value.dtype)
                    if value.dtype != np.float32 or dtypes[name] != np.float32:
                        dtypes[name] = value.dtype if value.dtype != np.float32 else dtypes[name]
                        continue
                    collectors.setdefault(name, RangeCollector(histogram)).update(value)
                del acts

    # -------------------------------------------------------------------------------- planning

    def _plan(
        self,
        units: list[_Unit],
        shared: list[gs.Node],
        collectors: dict[str, RangeCollector],
        dtypes: dict[str, np.dtype],
        graph_outputs: list[str],
        report: PassReport,
    ) -> dict[str, tuple[np.float32, int]] | None:
        """``{tensor name: (scale, zero point)}`` of every tensor to quantize; drops units that cannot be."""
        cfg = self.config

        def ok(t: gs.Tensor) -> bool:
            return t.name in collectors and dtypes.get(t.name) == np.float32 and collectors[t.name].seen

        kept = []
        for unit in units:
            tensors = unit.activations() + [unit.output]
            bad = next((t for t in tensors if not ok(t)), None)
            if bad is not None:
                what = dtypes.get(bad.name)
                why = f"dtype {what}" if what is not None and what != np.float32 else "no finite calibration values"
                report.skipped.append((unit.node.name or unit.node.op, f"tensor {bad.name!r}: {why}"))
                continue
            if unit.act is not None and not ok(unit.act.outputs[0]):
                unit.act = None
            kept.append(unit)
        units[:] = kept
        if not units:
            return None
        for _ in range(3):  # un-fusing an activation changes the plan; converges in one or two rounds
            groups, members = self._groups(units, shared, ok, graph_outputs)
            if any(name not in collectors for name in members):
                return None  # an undone fusion's input is not calibrated yet
            params = self._params(groups, members, collectors)
            unfused = False
            for unit in units:
                if unit.act is None:
                    continue
                scale, zp = params[unit.output.name]
                exact = zp == 0 and not cfg.activation_symmetric
                if exact and unit.act.op == "Clip":
                    hi = _clip_bounds(unit.act)[1]  # type: ignore[index]
                    top = float(scale) * 255
                    exact = hi is None or top <= hi * (1 + 1e-6) + 1e-12
                if not exact:
                    unit.act = None
                    unfused = True
            if not unfused:
                return params
        return params

    def _groups(
        self, units: list[_Unit], shared: list[gs.Node], ok: Any, graph_outputs: list[str]
    ) -> tuple[_Groups, set[str]]:
        """Which tensors to quantize (``members``) and which share a scale (``groups``)."""
        groups = _Groups()
        members: set[str] = set()
        outputs = set(graph_outputs)
        fused = {id(u.act) for u in units if u.act is not None}
        consumer_q: set[str] = set()
        for unit in units:
            for t in unit.activations():
                members.add(t.name)
                consumer_q.add(t.name)
        for unit in units:
            out = unit.output
            if unit.node.op in OUTPUT_Q_OPS or unit.act is not None or out.name in consumer_q:
                members.add(out.name)
        by_name = {}
        for n in shared:
            if id(n) in fused:
                continue
            by_name[id(n)] = n
        changed = True
        while changed:
            changed = False
            for node in by_name.values():
                data = [t for t in node.inputs[: None if node.op == "Concat" else 1] if t.name]
                out = node.outputs[0] if node.outputs else None
                if out is None or not data or not all(_is_variable(t) and ok(t) for t in data) or not ok(out):
                    continue
                forward = any(t.name in members for t in data)
                backward = out.name in members and all(len(t.outputs) == 1 and t.name not in outputs for t in data)
                if not (forward or backward):
                    continue
                for t in [*data, out]:
                    if t.name not in members:
                        members.add(t.name)
                        changed = True
                    if node.op in OWN_SCALE_OPS:
                        continue
                    if groups.find(t.name) != groups.find(out.name):
                        groups.union(out.name, t.name)
                        changed = True
        for name in members:
            groups.find(name)
        return groups, members

    def _params(
        self, groups: _Groups, members: set[str], collectors: dict[str, RangeCollector]
    ) -> dict[str, tuple[np.float32, int]]:
        cfg = self.config
        ranges: dict[str, tuple[float, float]] = {}
        for name in members:
            lo, hi = collectors[name].range(cfg.method, cfg.activation_symmetric, cfg.percentile)
            root = groups.find(name)
            if root in ranges:
                lo, hi = min(lo, ranges[root][0]), max(hi, ranges[root][1])
            ranges[root] = (lo, hi)
        out = {}
        for name in members:
            lo, hi = ranges[groups.find(name)]
            scale, zp = scale_zero_point(lo, hi, cfg.activation_symmetric)
            out[name] = (scale, zp)
        return out

    # ------------------------------------------------------------------------------- rewriting

    def _rewrite(
        self, model: Model, units: list[_Unit], plan: dict[str, tuple[np.float32, int]], report: PassReport
    ) -> dict[str, Any]:
        """Insert the Q/DQ pairs, quantize weights and biases, remove the fused activations."""
        cfg = self.config
        graph = model.graph
        names = all_tensor_names(graph)
        tensors = graph.tensors()
        qtype = np.int8 if cfg.activation_symmetric else np.uint8
        new_nodes: list[gs.Node] = []
        params: dict[tuple[float, int], tuple[gs.Constant, gs.Constant]] = {}
        fused = 0
        for unit in units:
            unit.x_name = unit.node.inputs[0].name
            if unit.act is not None:
                out = unit.act.outputs[0]
                unit.act.inputs.clear()
                unit.act.outputs.clear()
                unit.node.outputs[0] = out
                fused += 1

        def qparams(name: str) -> tuple[gs.Constant, gs.Constant]:
            scale, zp = plan[name]
            key = (float(scale), int(zp) + (0 if qtype is np.uint8 else 1000))
            if key not in params:
                s = gs.Constant(fresh_name(names, f"{name}_scale"), np.array(scale, dtype=np.float32))
                z = gs.Constant(fresh_name(names, f"{name}_zero_point"), np.array(zp, dtype=qtype))
                params[key] = (s, z)
            return params[key]

        pairs = 0
        input_names = {t.name for t in graph.inputs}
        for name in sorted(plan):
            t = tensors[name]
            s, z = qparams(name)
            q8 = gs.Variable(fresh_name(names, f"{name}_quantized"), dtype=qtype, shape=t.shape)
            if name in input_names or not t.inputs:
                dq = gs.Variable(fresh_name(names, f"{name}_dequantized"), dtype=np.float32, shape=t.shape)
                for reader in list(t.outputs):
                    if reader.op == "QuantizeLinear" and reader in new_nodes:
                        continue
                    for i, inp in enumerate(reader.inputs):
                        if inp is t:
                            reader.inputs[i] = dq
                src = t
                report.tensor_map[dq.name] = name
            else:
                producer = t.inputs[0]
                src = gs.Variable(fresh_name(names, f"{name}_float"), dtype=np.float32, shape=t.shape)
                k = next(i for i, o in enumerate(producer.outputs) if o is t)
                producer.outputs[k] = src
                dq = t
                report.tensor_map[src.name] = name
            new_nodes.append(
                gs.Node(
                    "QuantizeLinear", name=fresh_name(names, f"{name}_QuantizeLinear"), inputs=[src, s, z], outputs=[q8]
                )
            )
            new_nodes.append(
                gs.Node(
                    "DequantizeLinear",
                    name=fresh_name(names, f"{name}_DequantizeLinear"),
                    inputs=[q8, s, z],
                    outputs=[dq],
                )
            )
            pairs += 1
        graph.nodes.extend(new_nodes)
        layers, counts, bias_int32 = self._weights(model, units, plan, names, report)
        return {
            "method": cfg.method,
            "activation_symmetric": cfg.activation_symmetric,
            "nodes_quantized": sum(counts.values()),
            "ops": counts,
            "qdq_pairs": pairs,
            "activations_fused": fused,
            "biases_int32": bias_int32,
            "tensors_changed": len(layers),
            "layers": layers,
            "nonstandard_ops": [],
        }

    def _weights(
        self,
        model: Model,
        units: list[_Unit],
        plan: dict[str, tuple[np.float32, int]],
        names: set[str],
        report: PassReport,
    ) -> tuple[list[dict[str, Any]], dict[str, int], int]:
        """Quantize each unit's weight (per channel, shared between units) and bias (int32)."""
        cfg = self.config
        per_axis_ok = model.opset >= 13 and cfg.per_channel
        done: dict[tuple[int, int | None, bytes], gs.Tensor] = {}
        layers: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        bias_int32 = 0
        for unit in units:
            node = unit.node
            counts[node.op] = counts.get(node.op, 0) + 1
            if unit.weight is None:
                continue
            wt = node.inputs[unit.weight]
            w = constant_value(wt, cache=False)
            assert w is not None
            if not np.all(np.isfinite(w)):
                report.skipped.append((wt.name, "weight has non-finite values: kept float"))
                continue
            axis = self._axis(node, w.ndim) if per_axis_ok else None
            scale = symmetric_scales(w, axis, QMAX)
            bias_idx = 2 if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 else None
            bias = None
            x_scale = float(plan[unit.x_name][0])
            if bias_idx is not None and node.inputs[bias_idx].name:
                bias = self._bias_value(node, bias_idx, axis, w, report)
            if bias is not None:
                # Raise a channel's weight scale where its int32 bias would overflow.
                need = np.abs(bias) / (x_scale * INT32_MAX * 0.5)
                scale = np.maximum(scale, need.astype(np.float32) if axis is not None else np.float32(need.max()))
                scale = np.asarray(scale, dtype=np.float32)
            key = (id(wt), axis, scale.tobytes())
            if key in done:
                node.inputs[unit.weight] = done[key]
            else:
                q = quantize_symmetric(w, scale, axis, QMAX, np.int8)
                base = wt.name
                qc = gs.Constant(fresh_name(names, f"{base}_quantized"), q)
                sc = gs.Constant(fresh_name(names, f"{base}_scale"), scale.reshape(-1 if axis is not None else ()))
                zc = gs.Constant(fresh_name(names, f"{base}_zero_point"), np.zeros(sc.values.shape, dtype=np.int8))
                out = gs.Variable(fresh_name(names, f"{base}_dequantized"), dtype=np.float32, shape=list(w.shape))
                attrs = {} if axis is None else {"axis": int(axis)}
                model.graph.nodes.append(
                    gs.Node(
                        "DequantizeLinear",
                        name=fresh_name(names, f"{base}_DequantizeLinear"),
                        attrs=attrs,
                        inputs=[qc, sc, zc],
                        outputs=[out],
                    )
                )
                node.inputs[unit.weight] = out
                done[key] = out
                report.tensor_map[out.name] = wt.name
                layers.append(
                    {
                        "node": node.name,
                        "op": node.op,
                        "tensor": wt.name,
                        "bytes_before": int(w.nbytes),
                        "bytes_after": int(q.nbytes + scale.nbytes + scale.size),
                        "scheme": "int8 per-channel" if axis is not None else "int8 per-tensor",
                    }
                )
            if bias is not None and bias_idx is not None:
                bscale = np.asarray(np.float32(x_scale) * scale, dtype=np.float32)
                bq = np.rint(bias / (bscale if axis is not None else bscale.reshape(()))).astype(np.int32)
                bt = node.inputs[bias_idx]
                base = bt.name
                bc = gs.Constant(fresh_name(names, f"{base}_quantized"), bq)
                bs = gs.Constant(fresh_name(names, f"{base}_scale"), bscale.reshape(-1 if axis is not None else ()))
                bz = gs.Constant(fresh_name(names, f"{base}_zero_point"), np.zeros(bs.values.shape, dtype=np.int32))
                bout = gs.Variable(fresh_name(names, f"{base}_dequantized"), dtype=np.float32, shape=list(bq.shape))
                model.graph.nodes.append(
                    gs.Node(
                        "DequantizeLinear",
                        name=fresh_name(names, f"{base}_DequantizeLinear"),
                        attrs={} if axis is None else {"axis": 0},
                        inputs=[bc, bs, bz],
                        outputs=[bout],
                    )
                )
                node.inputs[bias_idx] = bout
                report.tensor_map[bout.name] = bt.name
                bias_int32 += 1
        return layers, counts, bias_int32

    def _bias_value(
        self, node: gs.Node, idx: int, axis: int | None, w: np.ndarray, report: PassReport
    ) -> np.ndarray | None:
        """The float bias to store as int32, or None (kept float, reason recorded)."""
        if self.config.bias == "float":
            return None
        t = node.inputs[idx]
        meta = constant_meta(t)
        label = node.name or node.op
        if meta is None:
            report.skipped.append((label, "bias computed at run time: kept float"))
            return None
        shape, dtype = meta
        channels = w.shape[self._axis(node, w.ndim)]
        if dtype != np.float32 or len(shape) != 1 or shape[0] != channels:
            report.skipped.append((label, f"bias shape {list(shape)} / dtype {dtype}: kept float"))
            return None
        if node.op == "Gemm" and (
            float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0
        ):
            report.skipped.append((label, "Gemm alpha/beta != 1: bias kept float"))
            return None
        if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            report.skipped.append((label, "grouped ConvTranspose: bias kept float"))
            return None
        b = constant_value(t, cache=False)
        assert b is not None
        if not np.all(np.isfinite(b)):
            report.skipped.append((label, "bias has non-finite values: kept float"))
            return None
        return b.astype(np.float32)

    @staticmethod
    def _axis(node: gs.Node, rank: int) -> int | None:
        """Output-channel axis of a weight of rank ``rank`` (None: per tensor)."""
        op = node.op
        if rank < 2:
            return None
        if op == "Conv":
            return 0
        if op == "ConvTranspose":
            return 1 if int(node.attrs.get("group", 1)) == 1 else None
        if op == "Gemm":
            return 0 if int(node.attrs.get("transB", 0)) else 1
        if op == "MatMul":
            return 1 if rank == 2 else None
        return None
