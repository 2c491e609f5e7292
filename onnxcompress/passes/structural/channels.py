"""Structured channel pruning: really remove output channels of Conv/ConvTranspose/Gemm/MatMul.

**Sources.** A *source* is a node whose output channels are set by a constant weight: ``Conv`` and
``ConvTranspose`` with ``group=1`` (``W[O, I, ...]`` / ``W[I, O, ...]``), ``Gemm`` (``B[K, N]``, or
``B[N, K]`` with ``transB``) and ``MatMul`` with a constant 2-D ``B[K, N]``. Each output channel of a
source is an *element*.

**Dependency graph** (the idea of torch-pruning's ``DependencyGraph``, on ONNX). Every tensor that
carries source channels gets a *label*: the channel axis and, for each position along it, the element
it holds. Labels flow forward in topological order:

* per-channel ops keep the label: unary element-wise ops (Relu, Clip, Sigmoid, ...), pooling,
  ``GlobalAveragePool``, ``Resize``/``Upsample`` (unit scale on the channel axis; ``sizes`` rewritten),
  ``Pad`` (no padding of channels), ``BatchNormalization``/``InstanceNormalization`` (their per-channel
  parameters are sliced), ``LRN`` (window over fewer channels: an approximation, like any pruning),
  ``Transpose`` (the axis moves), ``Squeeze``/``Unsqueeze``/``Reduce*``/``Softmax`` off the channel axis;
* binary/variadic element-wise ops (``Add``, ``Sum``, ``Mul``, ``Div``, ``Max``, ``PRelu``, ...) *couple*
  their operands: the elements at the same position are united (union-find), so a residual ``Add``
  makes its branches one group; a constant operand with one value per channel is sliced;
* ``Concat`` on the channel axis concatenates labels (DenseNet, Inception), ``Split`` slices them (its
  sizes are rewritten); a depthwise ``Conv`` (``group == C``) maps channel ``c`` to outputs
  ``c*m .. c*m+m-1`` (its ``group`` becomes the kept count);
* ``Flatten``/``Reshape`` that merge a run of axes holding the channel axis (``[N, C, H, W] -> [N, C*H*W]``,
  also after a ``Transpose`` to NHWC) turn channel ``c`` into a block of features: the label keeps the
  block shape, so the consumer ``Gemm``/``MatMul`` drops exactly the rows of pruned channels;
* *sinks* absorb a label: the input-channel axis of ``Conv`` (``W[:, keep]``), ``ConvTranspose``
  (``W[keep]``), ``Gemm`` (rows of ``B`` along ``K``) and ``MatMul`` (rows of ``B``).

Anything else that reads a labelled tensor (a graph output, a subgraph, ``Shape``, a grouped ``Conv``,
a ``Reshape`` that splits channels, an op we do not model, an excluded node) *pins* its elements: they
are never pruned. So the pass only prunes what it can prove consistent, and the graph stays valid.

**Selection.** Sources whose elements are united form a *group*; its coupled channels (union-find
components) are ranked by importance and the ``ratio`` least important are removed. Importance of an
element, normalised per source by its mean: ``l1`` = ``sum |W[o]| / |W[o]|``; ``l2`` = ``||W[o]||_2``;
``bn`` = ``|gamma_o|`` of the ``BatchNormalization`` reading the source (``l2`` where there is none);
``activation`` = mean ``|a_o|`` over the calibration data of the source's output after its chain of
per-channel ops (BatchNormalization, Relu, ...). A component's importance is the sum over its elements.
Every tensor keeps at least one channel.

**Reconstruction** (training-free, layer-wise, from the original model). For each sink whose input
channels were pruned (``Conv`` with ``group=1``, ``Gemm``, ``MatMul``), in topological order, the pass
reads its input ``X'`` in the *pruned* model (earlier sinks already refitted) and its output ``Y`` in
the *original* model on the calibration feeds, and refits ``W', b' = argmin ||X' W' + b' - Y||^2 +
lambda ||W'||^2`` (ridge least squares via the normal equations, ``lambda = 1e-4 * mean(diag(X'^T X'))``;
convolutions through im2col with up to ``max_rows`` sampled output positions). Output channels pruned at
the sink itself are dropped from ``Y``. A MatMul's intercept goes into the constant of the ``Add`` that
follows it, if any.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import Model, all_tensor_names, constant_meta, constant_value, fresh_name
from ...shapes import TensorFacts
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ..calibrate import ActivationTap, require_calibration
from ..quantize._common import refuse_quantized

IMPORTANCES = ("l1", "l2", "bn", "activation")
RECONSTRUCT = ("auto", "on", "off")
STANDARD = ("", "ai.onnx", None)

UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
        "Softsign", "ThresholdedRelu", "Gelu", "Mish", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
        "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Clip", "Dropout", "Cast", "Swish",
    }
)  # fmt: skip
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "LRN"})
REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd"})
# Ops whose outputs a source's channels reach one-to-one: the activation importance is read after them.
CHAIN = frozenset({"BatchNormalization", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish", "Identity"})


@dataclasses.dataclass(frozen=True)
class ChannelsConfig:
    """Options for :class:`PruneChannelsPass` (see the module docstring).

    Attributes:
        ratio: Fraction of each coupled group's channels to remove, in ``[0, 1)``.
        importance: ``l1``, ``l2``, ``bn`` or ``activation`` (needs calibration).
        reconstruct: ``auto`` (when calibration data is given), ``on`` (required) or ``off``.
        min_channels: Sources with fewer output channels are not pruned.
        max_rows: Rows (samples x output positions) used per layer for the least-squares refit.
        max_features: Sinks with more inputs than this (``C * kh * kw``) are not refitted.
        seed: Seed of the row sampling.
    """

    ratio: float = 0.3
    importance: str = "l1"
    reconstruct: str = "auto"
    min_channels: int = 2
    max_rows: int = 16384
    max_features: int = 4608
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise OnnxCompressError(f"--param prune_channels_ratio={self.ratio}: must be in [0, 1)")
        if self.importance not in IMPORTANCES:
            raise OnnxCompressError(
                f"--param prune_channels_importance={self.importance}: choose from {', '.join(IMPORTANCES)}"
            )
        if self.reconstruct not in RECONSTRUCT:
            raise OnnxCompressError(
                f"--param prune_channels_reconstruct={self.reconstruct}: choose from {', '.join(RECONSTRUCT)}"
            )
        if self.min_channels < 1:
            raise OnnxCompressError(f"--param prune_channels_min_channels={self.min_channels}: must be >= 1")


def channels_config(params: Params) -> ChannelsConfig:
    """Build the config from ``--param`` settings (all keys are read, always).

    Keys: ``prune_channels_ratio`` (0.3), ``prune_channels_importance`` (l1|l2|bn|activation),
    ``prune_channels_reconstruct`` (auto|on|off), ``prune_channels_min_channels`` (2).
    """
    ratio = params.get_float("prune_channels_ratio", ChannelsConfig.ratio)
    importance = params.get_str("prune_channels_importance", ChannelsConfig.importance, IMPORTANCES)
    reconstruct = params.get_str("prune_channels_reconstruct", ChannelsConfig.reconstruct, RECONSTRUCT)
    min_channels = params.get_int("prune_channels_min_channels", ChannelsConfig.min_channels)
    if not np.isfinite(ratio):
        raise OnnxCompressError(f"--param prune_channels_ratio={ratio}: must be in [0, 1)")
    return ChannelsConfig(ratio=ratio, importance=importance, reconstruct=reconstruct, min_channels=min_channels)


@dataclasses.dataclass(frozen=True)
class _Label:
    """Which source channel each position along ``axis`` of a tensor holds.

    ``elems[c]`` is the element of channel ``c``; after a flatten, the axis holds ``prod(fshape)``
    features laid out as ``fshape`` with the channel at position ``fpos``.
    """

    axis: int
    rank: int
    elems: np.ndarray
    fshape: tuple[int, ...]
    fpos: int

    @classmethod
    def plain(cls, axis: int, rank: int, elems: np.ndarray) -> _Label:
        return cls(axis, rank, elems, (len(elems),), 0)

    @property
    def size(self) -> int:
        """Length of the labelled axis."""
        return int(np.prod(self.fshape))

    @property
    def is_plain(self) -> bool:
        return len(self.fshape) == 1

    def moved(self, axis: int, rank: int) -> _Label:
        return _Label(axis, rank, self.elems, self.fshape, self.fpos)

    def same_layout(self, other: _Label) -> bool:
        return self.fshape == other.fshape and self.fpos == other.fpos

    def mask(self, keep: np.ndarray) -> np.ndarray:
        """Boolean mask along the labelled axis given per-element ``keep``."""
        m = keep[self.elems]
        if self.is_plain:
            return m
        shape = [1] * len(self.fshape)
        shape[self.fpos] = -1
        return np.broadcast_to(m.reshape(shape), self.fshape).reshape(-1)


@dataclasses.dataclass
class _Source:
    node: gs.Node
    out_axis: int  # output-channel axis of the weight
    elems: np.ndarray
    output: gs.Tensor


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _attr_int(node: gs.Node, name: str, default: int) -> int:
    value = node.attrs.get(name, default)
    return int(value) if value is not None else default


def _const_ints(t: gs.Tensor | None) -> list[int] | None:
    if t is None:
        return None
    v = constant_value(t)
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _is_empty(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Variable) and not t.name


def _filled(t: gs.Tensor) -> tuple[tuple[int, ...], gs.Node] | None:
    """``(shape, node)`` when ``t`` is a ``ConstantOfShape`` of a constant shape (a uniform weight)."""
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "ConstantOfShape" or node.domain not in STANDARD or not node.inputs:
        return None
    shape = _const_ints(node.inputs[0]) if isinstance(node.inputs[0], gs.Constant) else None
    if shape is None or any(d < 0 for d in shape):
        return None
    return tuple(shape), node


def _weight_meta(t: gs.Tensor) -> tuple[tuple[int, ...], Any] | None:
    """Shape (and dtype) of a constant or of a ``ConstantOfShape`` weight, without loading values."""
    meta = constant_meta(t)
    if meta is not None:
        return meta
    filled = _filled(t)
    return None if filled is None else (filled[0], t.dtype)


def _axes(node: gs.Node, opset: int, input_since: int) -> list[int] | None:
    """Constant ``axes`` (attribute before ``input_since``, second input from it), or None if absent."""
    if opset >= input_since:
        if len(node.inputs) > 1 and not _is_empty(node.inputs[1]):
            return _const_ints(node.inputs[1])
        return None
    value = node.attrs.get("axes")
    return None if value is None else [int(a) for a in value]


class _Analysis:
    """The labels, couplings and pins of one graph (see the module docstring)."""

    def __init__(self, model: Model, cfg: ChannelsConfig, exclude: tuple[str, ...], report: PassReport) -> None:
        self.model = model
        self.cfg = cfg
        self.exclude = exclude
        self.report = report
        self.opset = model.opset
        self.facts = TensorFacts(model)
        self.uf = _UnionFind()
        self.pinned: list[np.ndarray] = []
        self.labels: dict[int, _Label] = {}
        self.tensors: dict[int, gs.Tensor] = {}
        self.sources: list[_Source] = []
        # (id(node), input index) -> (node, index, [(axis, label)]): constant inputs to slice.
        self.slices: dict[tuple[int, int], tuple[gs.Node, int, list[tuple[int, _Label]]]] = {}
        self.edits: list[tuple[str, gs.Node, Any]] = []
        self.sinks: list[gs.Node] = []
        self.bn_of: dict[int, gs.Node] = {}
        self.main_nodes = {id(n) for n in model.graph.nodes}

    # -- bookkeeping -------------------------------------------------------------------------
    def label(self, t: gs.Tensor) -> _Label | None:
        return self.labels.get(id(t))

    def set_label(self, t: gs.Tensor, lab: _Label) -> None:
        self.labels[id(t)] = lab
        self.tensors[id(t)] = t

    def pin(self, lab: _Label | None, node: gs.Node | None = None, why: str = "") -> None:
        if lab is None:
            return
        self.pinned.append(lab.elems)
        if node is not None and why:
            self.report.skipped.append((node.name or node.op, f"channels kept: {why}"))

    def slice_input(self, node: gs.Node, idx: int, axis: int, lab: _Label) -> None:
        entry = self.slices.setdefault((id(node), idx), (node, idx, []))
        entry[2].append((axis, lab))

    def shape(self, t: gs.Tensor) -> tuple[int | None, ...] | None:
        meta = _weight_meta(t)
        if meta is not None:
            return tuple(meta[0])
        return self.facts.shape(t)

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> None:
        graph = self.model.graph
        for node in _topological(graph):
            labelled = [(i, self.label(t)) for i, t in enumerate(node.inputs)]
            labelled = [(i, lab) for i, lab in labelled if lab is not None]
            handled: set[int] = set()
            excluded = is_excluded(node.name, node.op, self.exclude)
            if node.domain not in STANDARD or excluded:
                why = "excluded by configuration" if excluded else f"custom-domain op {node.domain}::{node.op}"
                for _, lab in labelled:
                    self.pin(lab)
                if labelled or (excluded and node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")):
                    self.report.skipped.append((node.name or node.op, why))
                continue
            try:
                handled = self.visit(node, dict(labelled))
            except _Pin as exc:
                for _, lab in labelled:
                    self.pin(lab, node, str(exc))
                for t in node.outputs:
                    lab = self.labels.pop(id(t), None)
                    self.pin(lab)
                continue
            for i, lab in labelled:
                if i not in handled:
                    self.pin(lab, node, f"{node.op} reads channels on input {i}")
        outputs = {id(t) for t in graph.outputs}
        for tid, t in self.tensors.items():
            lab = self.labels.get(tid)
            if lab is None:
                continue
            if tid in outputs:
                self.pin(lab, None)
                self.report.skipped.append((t.name, "channels kept: graph output"))
            elif any(id(c) not in self.main_nodes for c in t.outputs):
                self.pin(lab, None)
                self.report.skipped.append((t.name, "channels kept: read inside a subgraph"))

    def visit(self, node: gs.Node, labs: dict[int, _Label]) -> set[int]:
        """Label the outputs of ``node``; returns the input indices whose labels it handled."""
        op = node.op
        handled: set[int] = set()
        if op in ("Conv", "ConvTranspose"):
            handled = self._conv(node, labs)
        elif op in ("Gemm", "MatMul"):
            handled = self._linear(node, labs)
        if not labs:
            return handled
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return handled
        lab0 = labs.get(0)
        if op == "Concat":
            return self._concat(node, labs)
        if op in UNARY:
            if lab0 is None or len(labs) > 1:
                raise _Pin(f"{op} with channels on a parameter input")
            if op == "Cast" and np.dtype(self._np_dtype(node.attrs.get("to"))).kind != "f":
                raise _Pin("Cast to a non-float type")
            self._pass(node, lab0)
            return {0}
        if op in ELEMENTWISE:
            return self._elementwise(node, labs)
        if lab0 is None or len(labs) > 1:
            raise _Pin(f"{op} with channels on a parameter input")
        if op in POOLS or op in ("BatchNormalization", "InstanceNormalization", "Resize", "Upsample", "Pad"):
            self._per_channel(node, lab0)
        elif op == "Transpose":
            perm = node.attrs.get("perm") or list(range(lab0.rank))[::-1]
            self.set_label(node.outputs[0], lab0.moved(list(perm).index(lab0.axis), lab0.rank))
        elif op in ("Flatten", "Reshape"):
            self._reshape(node, lab0)
        elif op in ("Squeeze", "Unsqueeze"):
            self._squeeze(node, lab0)
        elif op in REDUCES:
            self._reduce(node, lab0)
        elif op in ("Softmax", "LogSoftmax"):
            axis = _attr_int(node, "axis", -1 if self.opset >= 13 else 1) % lab0.rank
            if self.opset < 13 or axis == lab0.axis:
                raise _Pin(f"{op} over the channel axis (or before opset 13)")
            self._pass(node, lab0)
        elif op == "Split":
            self._split(node, lab0)
        else:
            raise _Pin(f"{op} is not modelled")
        return {0}

    @staticmethod
    def _np_dtype(code: Any) -> Any:
        import onnx

        try:
            return onnx.helper.tensor_dtype_to_np_dtype(int(code))
        except (KeyError, TypeError, ValueError):
            return np.dtype(object)

    def _pass(self, node: gs.Node, lab: _Label) -> None:
        self.set_label(node.outputs[0], lab)
        for extra in node.outputs[1:]:
            if extra.outputs or any(extra is o for o in self.model.graph.outputs):
                raise _Pin(f"{node.op} second output is used")

    # -- sources and sinks -------------------------------------------------------------------
    def _conv(self, node: gs.Node, labs: dict[int, _Label]) -> set[int]:
        handled: set[int] = set()
        if len(node.inputs) < 2:
            raise _Pin("Conv without weight")
        wmeta = _weight_meta(node.inputs[1])
        if wmeta is None or len(wmeta[0]) < 3 or any(i > 0 for i in labs if i != 0):
            raise _Pin("Conv weight is computed at run time")
        wshape = wmeta[0]
        group = _attr_int(node, "group", 1)
        transpose = node.op == "ConvTranspose"
        bias = node.inputs[2] if len(node.inputs) > 2 and not _is_empty(node.inputs[2]) else None
        if bias is not None and _weight_meta(bias) is None:
            raise _Pin("Conv bias is computed at run time")
        lab = labs.get(0)
        rank = len(wshape)
        if lab is not None:
            if lab.axis != 1 or not lab.is_plain or lab.rank != rank:
                raise _Pin("Conv input channels are not on axis 1")
            if group == 1:
                self.slice_input(node, 1, 0 if transpose else 1, lab)
                self.sinks.append(node)
                handled.add(0)
            elif not transpose and group == len(lab.elems) and wshape[1] == 1 and wshape[0] % group == 0:
                # Depthwise: output channel o reads input channel o // m.
                m = wshape[0] // group
                out = _Label.plain(1, rank, np.repeat(lab.elems, m))
                self.slice_input(node, 1, 0, out)
                if bias is not None:
                    self.slice_input(node, 2, 0, out)
                self.edits.append(("group", node, lab))
                self.set_label(node.outputs[0], out)
                return {0}
            elif not transpose and len(lab.elems) % group == 0 and len(lab.elems) // group == wshape[1]:
                # Grouped: input position j of every group is pruned together, so groups stay equal.
                cg = wshape[1]
                for k in range(1, group):
                    self.uf.union(lab.elems[:cg], lab.elems[k * cg : (k + 1) * cg])
                self.slice_input(node, 1, 1, _Label.plain(1, rank, lab.elems[:cg]))
                self.sinks.append(node)
                handled.add(0)
            else:
                raise _Pin(f"grouped {node.op} (group={group})")
        extra = [(2, 0)] if bias is not None else []
        if group == 1:
            out_axis = 1 if transpose else 0
            self._add_source(node, out_axis, wshape[out_axis], rank, 1, extra)
        elif not transpose and wshape[0] % group == 0 and wshape[0] // group >= self.cfg.min_channels:
            lab_out = self._add_source(node, 0, wshape[0], rank, 1, extra)
            if lab_out is not None:
                og = wshape[0] // group
                for k in range(1, group):
                    self.uf.union(lab_out.elems[:og], lab_out.elems[k * og : (k + 1) * og])
        return handled

    def _linear(self, node: gs.Node, labs: dict[int, _Label]) -> set[int]:
        if any(i > 0 for i in labs):
            raise _Pin(f"{node.op} with channels on its weight input")
        wmeta = _weight_meta(node.inputs[1]) if len(node.inputs) > 1 else None
        lab = labs.get(0)
        if node.op == "Gemm":
            trans_a, trans_b = _attr_int(node, "transA", 0), _attr_int(node, "transB", 0)
            cmeta = None
            if len(node.inputs) > 2 and not _is_empty(node.inputs[2]):
                cmeta = _weight_meta(node.inputs[2])
                if cmeta is None:
                    raise _Pin("Gemm bias is computed at run time")
            if wmeta is None or len(wmeta[0]) != 2:
                raise _Pin("Gemm weight is computed at run time")
            handled: set[int] = set()
            if lab is not None:
                if lab.rank != 2 or lab.axis != (0 if trans_a else 1):
                    raise _Pin("Gemm input channels are not on its K axis")
                self.slice_input(node, 1, 1 if trans_b else 0, lab)
                self.sinks.append(node)
                handled.add(0)
            n_out = wmeta[0][0 if trans_b else 1]
            bias_slices = []
            if cmeta is not None:
                cshape = cmeta[0]
                if len(cshape) >= 1 and cshape[-1] == n_out and n_out > 1:
                    bias_slices.append((2, len(cshape) - 1))
            self._add_source(node, 0 if trans_b else 1, n_out, 2, 1, bias_slices)
            return handled
        # MatMul
        if wmeta is None or len(wmeta[0]) != 2:
            if lab is not None:
                raise _Pin("MatMul weight is computed at run time")
            return set()
        rank = lab.rank if lab is not None else self.facts.rank(node.inputs[0])
        handled = set()
        if lab is not None:
            if rank < 2 or lab.axis != rank - 1:
                raise _Pin("MatMul input channels are not on its last axis")
            self.slice_input(node, 1, 0, lab)
            self.sinks.append(node)
            handled.add(0)
        if rank is not None and rank >= 2:
            self._add_source(node, 1, wmeta[0][1], rank, rank - 1, [])
        return handled

    def _add_source(
        self, node: gs.Node, out_axis: int, n: int, rank: int, axis: int, extra: list[tuple[int, int]]
    ) -> _Label | None:
        if n < self.cfg.min_channels:
            return None
        out = node.outputs[0]
        elems = self.uf.add(n)
        lab = _Label.plain(axis, rank, elems)
        self.slice_input(node, 1, out_axis, lab)
        for idx, ax in extra:
            self.slice_input(node, idx, ax, lab)
        self.sources.append(_Source(node, out_axis, elems, out))
        self.set_label(out, lab)
        return lab

    # -- per-channel ops ---------------------------------------------------------------------
    def _per_channel(self, node: gs.Node, lab: _Label) -> None:
        op = node.op
        if lab.axis != 1 or not lab.is_plain:
            raise _Pin(f"{op} channels are not on axis 1")
        if op == "BatchNormalization" or op == "InstanceNormalization":
            n_params = 4 if op == "BatchNormalization" else 2
            for idx in range(1, 1 + n_params):
                if idx >= len(node.inputs) or _weight_meta(node.inputs[idx]) is None:
                    raise _Pin(f"{op} parameters are computed at run time")
                self.slice_input(node, idx, 0, lab)
            if op == "BatchNormalization":
                self.bn_of.setdefault(id(node.inputs[0]), node)
        elif op in ("Resize", "Upsample"):
            self._resize(node, lab)
        elif op == "Pad":
            self._pad(node, lab)
        elif lab.rank < 3:
            raise _Pin(f"{op} on a rank-{lab.rank} tensor")
        self._pass(node, lab)

    def _resize(self, node: gs.Node, lab: _Label) -> None:
        if node.op == "Upsample" and "scales" in node.attrs:
            scales: list[float] | None = [float(s) for s in node.attrs["scales"]]
        else:
            idx = 1 if node.op == "Upsample" or self.opset < 11 else 2
            scales = None
            if len(node.inputs) > idx and not _is_empty(node.inputs[idx]):
                v = constant_value(node.inputs[idx])
                if v is None:
                    raise _Pin("Resize scales are computed at run time")
                scales = [float(s) for s in v.reshape(-1)] or None
        if scales is not None:
            if len(scales) != lab.rank or scales[1] != 1.0:
                raise _Pin("Resize scales the channel axis")
            return
        if node.op == "Resize" and self.opset >= 11 and len(node.inputs) > 3 and not _is_empty(node.inputs[3]):
            sizes = _const_ints(node.inputs[3])
            if sizes is None or len(sizes) != lab.rank or "axes" in node.attrs:
                raise _Pin("Resize sizes are computed at run time")
            self.edits.append(("resize", node, lab))
            return
        raise _Pin("Resize without scales or sizes")

    def _pad(self, node: gs.Node, lab: _Label) -> None:
        if self.opset < 11:
            pads = [int(p) for p in node.attrs.get("pads", node.attrs.get("paddings", []))]
        else:
            if len(node.inputs) > 3 and not _is_empty(node.inputs[3]):
                raise _Pin("Pad with axes")
            pads = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            if len(node.inputs) > 2 and not _is_empty(node.inputs[2]) and node.inputs[2].shape not in (None, [], ()):
                if _weight_meta(node.inputs[2]) is None or int(np.prod(_weight_meta(node.inputs[2])[0])) != 1:
                    raise _Pin("Pad value is not a scalar")
        if pads is None or len(pads) != 2 * lab.rank or pads[lab.axis] or pads[lab.axis + lab.rank]:
            raise _Pin("Pad pads the channel axis")

    def _elementwise(self, node: gs.Node, labs: dict[int, _Label]) -> set[int]:
        ranks: list[int | None] = []
        shapes: list[tuple[int | None, ...] | None] = []
        for i, t in enumerate(node.inputs):
            if i in labs:
                ranks.append(labs[i].rank)
                shapes.append(self.shape(t))
            else:
                shp = self.shape(t)
                shapes.append(shp)
                ranks.append(None if shp is None else len(shp))
        if any(r is None for r in ranks):
            raise _Pin(f"{node.op} operand rank unknown")
        out_rank = max(r for r in ranks if r is not None)
        if node.op == "PRelu" and self.opset < 7:
            raise _Pin("PRelu before opset 7")
        first: _Label | None = None
        out_axis = -1
        for lab in labs.values():
            ax = lab.axis + out_rank - lab.rank
            if first is None:
                first, out_axis = lab, ax
            elif ax != out_axis or not lab.same_layout(first):
                raise _Pin(f"{node.op} operands carry channels on different axes")
        assert first is not None
        for lab in labs.values():
            if lab is not first:
                self.uf.union(first.elems, lab.elems)
        size = first.size
        out_lab = first.moved(out_axis, out_rank)
        for i, t in enumerate(node.inputs):
            if i in labs:
                continue
            shp = shapes[i]
            rank = ranks[i]
            assert rank is not None
            j = out_axis - (out_rank - rank)
            if j < 0:
                continue
            dim = shp[j] if shp is not None else None
            if dim == 1:
                continue
            if dim == size and _weight_meta(t) is not None:
                self.slice_input(node, i, j, out_lab.moved(j, rank))
                continue
            raise _Pin(f"{node.op} operand {i} has per-channel values computed at run time")
        self._pass(node, out_lab)
        return set(labs)

    def _concat(self, node: gs.Node, labs: dict[int, _Label]) -> set[int]:
        first = next(iter(labs.values()))
        axis = _attr_int(node, "axis", 0) % first.rank
        if axis != first.axis:
            raise _Pin("Concat off the channel axis")
        parts = []
        for i, t in enumerate(node.inputs):
            lab = labs.get(i)
            if lab is not None:
                if lab.axis != axis or not lab.is_plain or lab.rank != first.rank:
                    raise _Pin("Concat inputs carry channels differently")
                parts.append(lab.elems)
                continue
            shp = self.shape(t)
            if shp is None or len(shp) != first.rank or shp[axis] is None:
                raise _Pin("Concat input of unknown size")
            fixed = self.uf.add(int(shp[axis]))
            self.pinned.append(fixed)
            parts.append(fixed)
        self._pass(node, _Label.plain(axis, first.rank, np.concatenate(parts)))
        return set(labs)

    def _split(self, node: gs.Node, lab: _Label) -> None:
        axis = _attr_int(node, "axis", 0) % lab.rank
        if axis != lab.axis:
            for out in node.outputs:
                self.set_label(out, lab)
            return
        if not lab.is_plain:
            raise _Pin("Split of flattened channels")
        sizes = []
        for out in node.outputs:
            shp = self.shape(out)
            if shp is None or len(shp) != lab.rank or shp[axis] is None:
                raise _Pin("Split output of unknown size")
            sizes.append(int(shp[axis]))
        if sum(sizes) != len(lab.elems):
            raise _Pin("Split sizes do not add up")
        start = 0
        outs = []
        for out, n in zip(node.outputs, sizes):
            sub = _Label.plain(axis, lab.rank, lab.elems[start : start + n])
            self.set_label(out, sub)
            outs.append(sub)
            start += n
        self.edits.append(("split", node, outs))

    def _reshape(self, node: gs.Node, lab: _Label) -> None:
        in_shape = self.shape(node.inputs[0])
        if in_shape is None or len(in_shape) != lab.rank:
            raise _Pin(f"{node.op} input shape unknown")
        if node.op == "Flatten":
            f = _attr_int(node, "axis", 1) % (lab.rank + 1) if lab.rank else 0
            if f < 1 or lab.axis < f:
                raise _Pin("Flatten merges the batch axis with channels")
            a, b, entry = f, lab.rank - 1, None
            out_rank = 2
            new_axis = 1
        else:
            spec = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            if spec is None:
                raise _Pin("Reshape shape is computed at run time")
            allowzero = _attr_int(node, "allowzero", 0)
            if allowzero and 0 in spec:
                raise _Pin("Reshape with allowzero and a 0 entry")
            merge = _merge_range(in_shape, spec, lab.axis)
            if merge is None:
                raise _Pin("Reshape does not merge a run of axes holding the channels")
            a, b = merge
            out_rank = len(spec)
            new_axis = a
            entry = a
        dims = in_shape[a : b + 1]
        if any(d is None for d in dims[: lab.axis - a]) or any(d is None for d in dims[lab.axis - a + 1 :]):
            raise _Pin(f"{node.op} merges axes of unknown size")
        left = tuple(int(d) for d in in_shape[a : lab.axis])  # type: ignore[arg-type]
        right = tuple(int(d) for d in in_shape[lab.axis + 1 : b + 1])  # type: ignore[arg-type]
        out = _Label(new_axis, out_rank, lab.elems, left + lab.fshape + right, len(left) + lab.fpos)
        if entry is not None:
            self.edits.append(("reshape", node, (entry, out)))
        self.set_label(node.outputs[0], out)

    def _squeeze(self, node: gs.Node, lab: _Label) -> None:
        axes = _axes(node, self.opset, 13)
        squeeze = node.op == "Squeeze"
        if axes is None:
            if not squeeze:
                raise _Pin("Unsqueeze axes unknown")
            shp = self.shape(node.inputs[0])
            if shp is None or any(d is None for d in shp):
                raise _Pin("Squeeze axes unknown")
            axes = [i for i, d in enumerate(shp) if d == 1]
        if squeeze:
            axes = [x % lab.rank for x in axes]
            if lab.axis in axes:
                raise _Pin("Squeeze of the channel axis")
            new = lab.moved(lab.axis - sum(x < lab.axis for x in axes), lab.rank - len(axes))
        else:
            out_rank = lab.rank + len(axes)
            axes = sorted(x % out_rank for x in axes)
            pos = [i for i in range(out_rank) if i not in axes]
            new = lab.moved(pos[lab.axis], out_rank)
        self._pass(node, new)

    def _reduce(self, node: gs.Node, lab: _Label) -> None:
        since = 13 if node.op == "ReduceSum" else 18
        axes = _axes(node, self.opset, since)
        if axes is None:
            raise _Pin(f"{node.op} over all axes")
        axes = [x % lab.rank for x in axes]
        if lab.axis in axes:
            raise _Pin(f"{node.op} over the channel axis")
        if _attr_int(node, "keepdims", 1):
            self._pass(node, lab)
        else:
            self._pass(node, lab.moved(lab.axis - sum(x < lab.axis for x in axes), lab.rank - len(axes)))


class _Pin(Exception):
    """A node's channel coupling cannot be modelled: pin every label it touches."""


def _merge_range(in_shape: tuple[int | None, ...], spec: list[int], axis: int) -> tuple[int, int] | None:
    """``(a, b)`` when ``Reshape(spec)`` merges input axes ``a..b`` (holding ``axis``) into output axis ``a``."""
    r_in, r_out = len(in_shape), len(spec)
    minus = spec.count(-1)
    if minus > 1:
        return None
    a = 0
    while a < min(axis, r_out) and (spec[a] in (0, -1) or spec[a] == in_shape[a]):
        a += 1
    k = 0
    while k < r_in - 1 - axis and k < r_out - 1 - a:
        s, d = spec[r_out - 1 - k], in_shape[r_in - 1 - k]
        if not (s == -1 or (d is not None and s == d)):
            break
        k += 1
    b = r_in - 1 - k
    if r_out - 1 - k != a:
        return None
    if minus and spec[a] == -1:
        # The merged axis itself is inferred: fine only if every other entry is explicit.
        if any(s in (0,) for s in spec) or any(d is None for d in in_shape[a : b + 1]):
            return None
        return a, b
    if spec[a] == 0:
        return (a, b) if a == b else None
    dims = in_shape[a : b + 1]
    if any(d is None for d in dims):
        return None
    if spec[a] != int(np.prod([int(d) for d in dims])):  # type: ignore[arg-type]
        return None
    return a, b


def _topological(graph: gs.Graph) -> list[gs.Node]:
    """Main-graph nodes in a topological order (without reordering the graph)."""
    nodes = list(graph.nodes)
    producer = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    indeg = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for j, n in enumerate(nodes):
        deps = {producer[id(t)] for t in n.inputs if id(t) in producer}
        for i in deps:
            users[i].append(j)
        indeg[j] = len(deps)
    ready = [j for j in range(len(nodes)) if indeg[j] == 0][::-1]
    order = []
    while ready:
        j = ready.pop()
        order.append(nodes[j])
        for u in users[j]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):  # a cycle (invalid graph): fall back to the stored order
        return nodes
    return order


class PruneChannelsPass:
    """Remove the least important coupled channels of Conv/Gemm/MatMul producers (see module docstring)."""

    name = "prune-channels"

    def __init__(self, config: ChannelsConfig | None = None) -> None:
        self.config = config or ChannelsConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Prune ``model`` in place."""
        refuse_quantized(model, self.name)
        cfg = self.config
        report = PassReport(self.name)
        before = GraphSize.of(model)
        reconstruct = cfg.reconstruct == "on" or (cfg.reconstruct == "auto" and bool(ctx.calibration))
        if cfg.reconstruct == "on" or cfg.importance == "activation":
            require_calibration(
                ctx.calibration,
                f"{self.name} ({'activation importance' if cfg.importance == 'activation' else 'reconstruction'})",
            )
        stats: dict[str, Any] = {"sources": 0, "groups": 0, "channels_before": 0, "channels_pruned": 0}
        if cfg.ratio <= 0:
            report.stats = before.stats(model, False, **stats, layers=[], nonstandard_ops=[])
            return report
        ana = _Analysis(model, cfg, ctx.exclude, report)
        ana.run()
        if not ana.sources:
            report.stats = before.stats(model, False, **stats, layers=[], nonstandard_ops=[])
            return report
        keep, groups = self._select(ana, ctx)
        prunable_conv = sum(len(s.elems) for s in ana.sources if s.node.op in ("Conv", "ConvTranspose"))
        stats.update(
            sources=len(ana.sources),
            groups=groups,
            channels_before=int(sum(len(s.elems) for s in ana.sources)),
            channels_pruned=int(sum(int((~keep[s.elems]).sum()) for s in ana.sources)),
            conv_channels_pruned=int(
                sum(int((~keep[s.elems]).sum()) for s in ana.sources if s.node.op != "Gemm" and s.node.op != "MatMul")
            ),
            conv_channels_sources=prunable_conv,
        )
        if stats["channels_pruned"] == 0:
            report.stats = before.stats(model, False, **stats, layers=[], nonstandard_ops=[])
            return report
        sinks = [n for n in ana.sinks if self._sink_changed(ana, n, keep)]
        tap = None
        if reconstruct and sinks:
            names = [n.outputs[0].name for n in sinks]
            tap = ActivationTap(model, names, threads=1)
        try:
            layers = _Apply(model, ana, keep, report).run()
            if tap is not None:
                stats["reconstructed"] = _Reconstruct(model, ana, keep, tap, ctx.calibration or [], cfg, report).run(
                    sinks
                )
        finally:
            if tap is not None:
                tap.close()
        stats["reconstruction"] = bool(tap is not None)
        report.modified = True
        report.stats = before.stats(model, True, **stats, layers=layers, nonstandard_ops=[])
        return report

    @staticmethod
    def _sink_changed(ana: _Analysis, node: gs.Node, keep: np.ndarray) -> bool:
        lab = ana.label(node.inputs[0])
        return lab is not None and not bool(keep[lab.elems].all())

    def _select(self, ana: _Analysis, ctx: PassContext) -> tuple[np.ndarray, int]:
        cfg = self.config
        n = len(ana.uf.parent)
        roots = ana.uf.roots()
        pinned_roots = np.zeros(n, dtype=bool)
        for p in ana.pinned:
            pinned_roots[roots[p]] = True
        imp = np.zeros(n, dtype=np.float64)
        acts = self._activation_importance(ana, ctx) if cfg.importance == "activation" else {}
        for src in ana.sources:
            score = acts.get(id(src.node))
            if score is None:
                score = self._weight_importance(ana, src)
            score = np.asarray(score, dtype=np.float64)
            imp[src.elems] = score / (float(score.mean()) + 1e-12)
        comp_imp = np.zeros(n, dtype=np.float64)
        np.add.at(comp_imp, roots, imp)
        # Source-level groups: sources sharing a component.
        src_root = list(range(len(ana.sources)))

        def find(i: int) -> int:
            while src_root[i] != i:
                src_root[i] = src_root[src_root[i]]
                i = src_root[i]
            return i

        owner: dict[int, int] = {}
        for si, src in enumerate(ana.sources):
            for r in np.unique(roots[src.elems]).tolist():
                if r in owner:
                    a, b = find(owner[r]), find(si)
                    if a != b:
                        src_root[max(a, b)] = min(a, b)
                else:
                    owner[r] = si
        group_comps: dict[int, set[int]] = {}
        for r, si in owner.items():
            group_comps.setdefault(find(si), set()).add(r)
        prune_root = np.zeros(n, dtype=bool)
        for comps in group_comps.values():
            comp = np.array(sorted(comps), dtype=np.int64)
            free = comp[~pinned_roots[comp]]
            k = min(int(np.floor(cfg.ratio * len(comp) + 1e-9)), len(free))
            if k <= 0:
                continue
            order = np.argsort(comp_imp[free], kind="stable")
            prune_root[free[order[:k]]] = True
        keep = ~prune_root[roots]
        # Every labelled tensor keeps at least one channel.
        for lab in list(ana.labels.values()) + [_Label.plain(0, 1, s.elems) for s in ana.sources]:
            if len(lab.elems) and not keep[lab.elems].any():
                best = lab.elems[int(np.argmax(comp_imp[roots[lab.elems]]))]
                keep[roots == roots[best]] = True
        return keep, len(group_comps)

    def _weight_importance(self, ana: _Analysis, src: _Source) -> np.ndarray:
        cfg = self.config
        if cfg.importance == "bn":
            bn = ana.bn_of.get(id(src.output))
            if bn is not None:
                gamma = constant_value(bn.inputs[1])
                if gamma is not None and gamma.shape == (len(src.elems),):
                    return np.abs(gamma.astype(np.float64))
        w = constant_value(src.node.inputs[1], cache=False)
        if w is None:  # a ConstantOfShape weight: every channel alike
            return np.ones(len(src.elems))
        w = np.moveaxis(w.astype(np.float64), src.out_axis, 0).reshape(len(src.elems), -1)
        if cfg.importance == "l1":
            return np.abs(w).mean(axis=1)
        return np.sqrt((w * w).sum(axis=1))

    def _activation_importance(self, ana: _Analysis, ctx: PassContext) -> dict[int, np.ndarray]:
        """Mean |activation| per channel of each source, read after its chain of per-channel ops."""
        taps: dict[int, tuple[str, int]] = {}
        for src in ana.sources:
            t = src.output
            while len(t.outputs) == 1 and t.outputs[0].op in CHAIN and id(t.outputs[0]) in ana.main_nodes:
                nxt = t.outputs[0].outputs[0]
                if ana.label(nxt) is None:
                    break
                t = nxt
            lab = ana.label(t)
            if lab is None or not lab.is_plain:
                continue
            taps[id(src.node)] = (t.name, lab.axis)
        if not taps:
            return {}
        names = sorted({name for name, _ in taps.values()})
        sums: dict[str, np.ndarray] = {}
        with ActivationTap(ana.model, names, threads=1) as tap:
            for feed in ctx.calibration or []:
                values = tap.run(feed)
                for name, axis in {v for v in taps.values()}:
                    a = np.abs(np.asarray(values[name], dtype=np.float64))
                    red = tuple(i for i in range(a.ndim) if i != axis)
                    part = a.mean(axis=red) if red else a
                    sums[name] = sums.get(name, 0) + part
        return {nid: sums[name] for nid, (name, _) in taps.items() if name in sums}


class _Apply:
    """Slice the weights and rewrite the attributes the kept channels decide."""

    def __init__(self, model: Model, ana: _Analysis, keep: np.ndarray, report: PassReport) -> None:
        self.model = model
        self.ana = ana
        self.keep = keep
        self.report = report
        self.names = all_tensor_names(model.graph)
        self.cache: dict[tuple[Any, ...], gs.Constant] = {}

    def run(self) -> list[dict[str, Any]]:
        layers = []
        for node, idx, cuts in self.ana.slices.values():
            t = node.inputs[idx]
            filled = _filled(t)
            w = constant_value(t, cache=False)
            shape = w.shape if w is not None else filled[0] if filled is not None else None
            if shape is None:
                continue
            masks = []
            for axis, lab in cuts:
                m = lab.mask(self.keep)
                if len(shape) <= axis or shape[axis] != len(m):
                    raise AssertionError(f"{node.name}: cannot slice {t.name} {shape} on axis {axis} by {len(m)}")
                if not m.all():
                    masks.append((axis, m))
            if not masks:
                continue
            key = (id(t),) + tuple((a, m.tobytes()) for a, m in masks)
            new = self.cache.get(key)
            if new is None and w is None:
                assert filled is not None
                new = self._refill(t, filled[1], shape, masks)
                self.cache[key] = new
            elif new is None:
                out = w
                for axis, m in masks:
                    out = np.compress(m, out, axis=axis)
                new = gs.Constant(fresh_name(self.names, f"{t.name}_pruned"), np.ascontiguousarray(out))
                self.cache[key] = new
                self.report.tensor_map[new.name] = t.name
                layers.append(
                    {
                        "node": node.name,
                        "op": node.op,
                        "tensor": t.name,
                        "shape_before": list(w.shape),
                        "shape_after": list(out.shape),
                        "bytes_before": int(w.nbytes),
                        "bytes_after": int(out.nbytes),
                        "scheme": "channels",
                    }
                )
            node.inputs[idx] = new
        for kind, node, data in self.ana.edits:
            getattr(self, f"_edit_{kind}")(node, data)
        for tid, lab in self.ana.labels.items():
            t = self.ana.tensors[tid]
            m = lab.mask(self.keep)
            if m.all() or t.shape is None or len(t.shape) != lab.rank:
                continue
            shape = list(t.shape)
            shape[lab.axis] = int(m.sum())
            t.shape = shape
        self.model.graph.cleanup(remove_unused_graph_inputs=False)
        self.model.graph.toposort()
        return layers

    def _refill(
        self, t: gs.Tensor, producer: gs.Node, shape: tuple[int, ...], masks: list[tuple[int, np.ndarray]]
    ) -> gs.Tensor:
        """A new ``ConstantOfShape`` (same fill value) with the pruned shape."""
        new_shape = list(shape)
        for axis, m in masks:
            new_shape[axis] = int(m.sum())
        attrs = dict(producer.attrs)
        value = attrs.get("value")
        dtype = t.dtype or (value.dtype if isinstance(value, gs.Constant) else np.float32)
        out = gs.Variable(fresh_name(self.names, f"{t.name}_pruned"), dtype=dtype, shape=new_shape)
        dims = self._const(f"{t.name}_pruned_shape", np.array(new_shape, dtype=np.int64))
        node = gs.Node(
            "ConstantOfShape", fresh_name(self.names, f"{producer.name or t.name}_pruned"), attrs, [dims], [out]
        )
        self.model.graph.nodes.append(node)
        self.report.tensor_map[out.name] = t.name
        return out

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(self.names, base), value)

    def _edit_group(self, node: gs.Node, lab: _Label) -> None:
        node.attrs["group"] = int(self.keep[lab.elems].sum())

    def _edit_split(self, node: gs.Node, outs: list[_Label]) -> None:
        sizes = np.array([int(self.keep[o.elems].sum()) for o in outs], dtype=np.int64)
        if sizes.sum() == sum(len(o.elems) for o in outs):
            return
        if self.ana.opset >= 13:
            node.attrs.pop("num_outputs", None)
            const = self._const(f"{node.name or 'split'}_sizes", sizes)
            if len(node.inputs) > 1:
                node.inputs[1] = const
            else:
                node.inputs.append(const)
        else:
            node.attrs["split"] = [int(s) for s in sizes]

    def _edit_reshape(self, node: gs.Node, data: tuple[int, _Label]) -> None:
        entry, lab = data
        spec = _const_ints(node.inputs[1])
        assert spec is not None
        if spec[entry] <= 0:
            return
        new = int(lab.mask(self.keep).sum())
        if new == spec[entry]:
            return
        spec[entry] = new
        node.inputs[1] = self._const(f"{node.inputs[1].name}_pruned", np.array(spec, dtype=np.int64))

    def _edit_resize(self, node: gs.Node, lab: _Label) -> None:
        sizes = _const_ints(node.inputs[3])
        assert sizes is not None
        sizes[lab.axis] = int(self.keep[lab.elems].sum())
        node.inputs[3] = self._const(f"{node.inputs[3].name}_pruned", np.array(sizes, dtype=np.int64))


class _Reconstruct:
    """Refit the pruned sinks' weights by least squares (see the module docstring)."""

    def __init__(
        self,
        model: Model,
        ana: _Analysis,
        keep: np.ndarray,
        tap: ActivationTap,
        feeds: list[dict[str, np.ndarray]],
        cfg: ChannelsConfig,
        report: PassReport,
    ) -> None:
        self.model = model
        self.ana = ana
        self.keep = keep
        self.tap = tap
        self.feeds = feeds
        self.cfg = cfg
        self.report = report
        self.rng = np.random.default_rng(cfg.seed)
        self.names = all_tensor_names(model.graph)
        self.src_of = {id(s.node): s for s in ana.sources}

    def run(self, sinks: list[gs.Node]) -> int:
        order = {id(n): i for i, n in enumerate(_topological(self.model.graph))}
        done = 0
        for node in sorted(sinks, key=lambda n: order.get(id(n), 0)):
            reason = self._refit(node)
            if reason:
                self.report.skipped.append((node.name or node.op, f"not reconstructed: {reason}"))
            else:
                done += 1
        return done

    def _out_mask(self, node: gs.Node) -> np.ndarray | None:
        src = self.src_of.get(id(node))
        return None if src is None else self.keep[src.elems]

    def _pairs(self, node: gs.Node) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with ActivationTap(self.model, [node.inputs[0].name], threads=1) as tap:
            for feed in self.feeds:
                x = tap.run(feed)[node.inputs[0].name]
                y = self.tap._session.run([node.outputs[0].name], feed)[0]
                yield x, y

    def _refit(self, node: gs.Node) -> str | None:
        w = constant_value(node.inputs[1])
        if w is None or w.dtype != np.float32:
            return "weight is not float32"
        op = node.op
        if op == "Conv":
            return self._refit_conv(node, w)
        if op == "Gemm":
            return self._refit_gemm(node, w)
        if op == "MatMul":
            return self._refit_matmul(node, w)
        return f"{op} is not refitted"

    def _solve(self, xtx: np.ndarray, xty: np.ndarray, intercept: bool) -> np.ndarray:
        f = xtx.shape[0] - (1 if intercept else 0)
        diag = np.diag(xtx)[:f]
        lam = 1e-4 * float(diag.mean()) + 1e-12
        reg = xtx.copy()
        reg[np.arange(f), np.arange(f)] += lam
        try:
            return np.linalg.solve(reg, xty)
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(reg, xty, rcond=None)[0]

    def _accumulate(self, rows: Iterator[tuple[np.ndarray, np.ndarray]], intercept: bool) -> tuple[Any, Any, int]:
        xtx = xty = None
        count = 0
        for x, y in rows:
            if intercept:
                x = np.concatenate([x, np.ones((x.shape[0], 1), dtype=x.dtype)], axis=1)
            # float32 products (twice as fast), summed over feeds in float64.
            x = np.ascontiguousarray(x, dtype=np.float32)
            y = np.ascontiguousarray(y, dtype=np.float32)
            a, b = (x.T @ x).astype(np.float64), (x.T @ y).astype(np.float64)
            xtx = a if xtx is None else xtx + a
            xty = b if xty is None else xty + b
            count += x.shape[0]
        return xtx, xty, count

    def _budget(self, n: int) -> np.ndarray | None:
        per_feed = max(1, self.cfg.max_rows // max(1, len(self.feeds)))
        if n <= per_feed:
            return None
        return np.sort(self.rng.choice(n, per_feed, replace=False))

    def _refit_conv(self, node: gs.Node, w: np.ndarray) -> str | None:
        if _attr_int(node, "group", 1) != 1 or w.ndim != 4:
            return "only 2-D convolutions with group=1"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "auto_pad"
        o, c, kh, kw = w.shape
        if c * kh * kw + 1 > self.cfg.max_features:
            return f"{c * kh * kw} inputs > max_features {self.cfg.max_features}"
        strides = list(node.attrs.get("strides", [1, 1]))
        dil = list(node.attrs.get("dilations", [1, 1]))
        pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
        out_mask = self._out_mask(node)

        def rows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for x, y in self._pairs(node):
                cols = _im2col(x, (kh, kw), strides, dil, pads)  # [N*OH*OW, C*kh*kw]
                yy = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
                if out_mask is not None:
                    yy = yy[:, out_mask]
                if cols.shape[0] != yy.shape[0]:
                    raise _Pin("im2col does not match the convolution output")
                pick = self._budget(cols.shape[0])
                if pick is not None:
                    cols, yy = cols[pick], yy[pick]
                yield cols, yy

        try:
            xtx, xty, count = self._accumulate(rows(), True)
        except _Pin as exc:
            return str(exc)
        if xtx is None or count < 2:
            return "no calibration rows"
        sol = self._solve(xtx, xty, True)
        new_w = sol[:-1].T.reshape(o, c, kh, kw).astype(np.float32)
        new_b = sol[-1].astype(np.float32)
        base = node.inputs[1].name
        node.inputs[1] = gs.Constant(fresh_name(self.names, f"{base}_refit"), new_w)
        bias = gs.Constant(fresh_name(self.names, f"{base}_bias_refit"), new_b)
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
        return None

    def _refit_gemm(self, node: gs.Node, w: np.ndarray) -> str | None:
        if _attr_int(node, "transA", 0):
            return "transA"
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        trans_b = _attr_int(node, "transB", 0)
        k = w.shape[1] if trans_b else w.shape[0]
        if k + 1 > self.cfg.max_features:
            return f"{k} inputs > max_features {self.cfg.max_features}"
        c = None
        if len(node.inputs) > 2 and not _is_empty(node.inputs[2]):
            c = constant_value(node.inputs[2])
        intercept = beta != 0 and (c is None or (c.ndim >= 1 and c.size == c.shape[-1]))
        fixed = 0.0 if (intercept or c is None) else beta * c.astype(np.float64)
        out_mask = self._out_mask(node)

        def rows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for x, y in self._pairs(node):
                if out_mask is not None:
                    y = y[:, out_mask]
                yield x.reshape(x.shape[0], -1), (y - fixed) / alpha

        xtx, xty, count = self._accumulate(rows(), intercept)
        if xtx is None or count < 2:
            return "no calibration rows"
        sol = self._solve(xtx, xty, intercept)
        new_w = sol[:k] if not intercept else sol[:-1]
        new_w = (new_w.T if trans_b else new_w).astype(np.float32)
        base = node.inputs[1].name
        node.inputs[1] = gs.Constant(fresh_name(self.names, f"{base}_refit"), new_w)
        if intercept:
            b = (sol[-1] * alpha / beta).astype(np.float32)
            if c is not None:
                b = b.reshape(c.shape)
            bias = gs.Constant(fresh_name(self.names, f"{base}_bias_refit"), b)
            if len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
        return None

    def _refit_matmul(self, node: gs.Node, w: np.ndarray) -> str | None:
        k, n = w.shape
        if k + 1 > self.cfg.max_features:
            return f"{k} inputs > max_features {self.cfg.max_features}"
        out = node.outputs[0]
        add = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == "Add" else None
        bias_idx = None
        if add is not None and len(add.inputs) == 2 and not any(out is g for g in self.model.graph.outputs):
            bias_idx = 1 if add.inputs[0] is out else 0
            meta = constant_meta(add.inputs[bias_idx])
            if meta is None or tuple(meta[0]) != (n,):
                bias_idx = None
        intercept = bias_idx is not None
        out_mask = self._out_mask(node)

        def rows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for x, y in self._pairs(node):
                x2 = x.reshape(-1, x.shape[-1])
                y2 = y.reshape(-1, y.shape[-1])
                if out_mask is not None:
                    y2 = y2[:, out_mask]
                pick = self._budget(x2.shape[0])
                if pick is not None:
                    x2, y2 = x2[pick], y2[pick]
                yield x2, y2

        xtx, xty, count = self._accumulate(rows(), intercept)
        if xtx is None or count < 2:
            return "no calibration rows"
        sol = self._solve(xtx, xty, intercept)
        base = node.inputs[1].name
        node.inputs[1] = gs.Constant(fresh_name(self.names, f"{base}_refit"), sol[:k].astype(np.float32))
        if intercept:
            assert add is not None and bias_idx is not None
            old = constant_value(add.inputs[bias_idx])
            assert old is not None
            add.inputs[bias_idx] = gs.Constant(
                fresh_name(self.names, f"{add.inputs[bias_idx].name}_refit"), (old + sol[k]).astype(old.dtype)
            )
        return None


def _im2col(x: np.ndarray, kernel: tuple[int, int], strides: list[int], dil: list[int], pads: list[int]) -> np.ndarray:
    """Patches of ``x[N, C, H, W]`` as rows ``[N*OH*OW, C*kh*kw]`` (ONNX Conv semantics)."""
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, w = xp.shape
    oh = (h - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w - dil[1] * (kw - 1) - 1) // strides[1] + 1
    sn, sc, sh, sw = xp.strides
    view = np.lib.stride_tricks.as_strided(
        xp,
        shape=(n, oh, ow, c, kh, kw),
        strides=(sn, sh * strides[0], sw * strides[1], sc, sh * dil[0], sw * dil[1]),
        writeable=False,
    )
    return view.reshape(n * oh * ow, c * kh * kw)
