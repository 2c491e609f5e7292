"""Fusions: affine ops folded into the weights of the layer before them; layout chains merged.

**Affine folding.** A layer computes ``y = W ⊛ x + b`` (``⊛`` a convolution or a matrix product, both
linear in ``W``), one output channel per slice of ``W``: Conv ``W[O, I/g, k...]`` slice ``W[o]``;
ConvTranspose ``W[I, O/g, k...]``, where ``W[i, j]`` feeds output channel
``o = (i // (I/g)) * (O/g) + j`` (so with groups the scale is applied per group block); Gemm
``B[K, N]`` column ``n`` (row ``n`` of ``B[N, K]`` when ``transB=1``); MatMul ``W[K, N]`` column ``n``.
A per-channel affine map after it, ``z = s * y + t`` (``s``, ``t`` vectors over the output
channels, broadcast along the channel axis only), equals the layer with

    W' = W * s    (every weight of output channel c scaled by s[c])
    b' = s * b + t

computed in float64 and stored as new float32 constants. For Gemm ``y = alpha * A B + beta * C``:
``C' = s * (beta * C) + t`` with ``beta`` set to 1 (``alpha`` stays). The results re-associate float
arithmetic, so they match the original within float32 rounding, not bit for bit.

* ``FuseBatchNormPass`` (``fuse-batchnorm``): inference BatchNormalization
  ``z = gamma * (y - mean) / sqrt(var + eps) + beta`` is that map with ``s = gamma / sqrt(var + eps)``
  and ``t = beta - mean * s``, i.e. ``W' = W * gamma / sqrt(var + eps)`` per output channel and
  ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. BatchNormalization normalizes axis 1, the
  channel axis of Conv/ConvTranspose outputs and of a Gemm's ``[N, C]`` output; after
  ``MatMul(x, W[K, N])`` (optionally followed by the ``Add`` of a constant bias) it is folded only when
  ``x`` is known to be 2-D, so that axis 1 is the MatMul's column (without a bias the
  BatchNormalization node becomes ``Add(y, t)``). Only the inference form qualifies: one output,
  constant float32 ``scale``/``B``/``mean``/``var``, ``spatial=1``. Every BatchNormalization left in
  place is reported in ``skipped`` with the reason.
* ``FuseConstantAffinePass`` (``fuse-affine``): ``Mul(y, s)`` (``s`` per channel or scalar),
  ``Div(y, d)`` (``s = 1 / d``, only for finite non-zero ``d``), ``Add(y, c)`` and ``Sub(y, c)``
  (``t = ±c``) after Conv, ConvTranspose, Gemm, or a MatMul with a constant 2-D weight (Add/Sub only
  when the MatMul already has its bias ``Add``: a lone ``MatMul + Add`` is the layer's own bias). The
  constant must broadcast along the output channel axis only, so ``z`` has ``y``'s shape.
* ``FuseMatMulAddPass`` (``fuse-matmul-add``): ``MatMul(x, W) + c`` is ``Gemm(x, W, c)``
  (``alpha = beta = 1``) when ``x`` is known to be 2-D (onnx shape inference), ``W`` is a constant
  2-D float weight and ``c`` a constant broadcastable to ``[N]`` (``[]``, ``[1]``, ``[N]``, ``[1, N]``).

In all three the intermediate ``y`` must have no other reader and not be a graph output; a weight
that other nodes also read is left alone unless ``copy_shared`` is set (folding would store a
second, scaled copy of it).

**Layout chains** (exact: no arithmetic).

* ``FuseTransposesPass`` (``fuse-transposes``): ``Transpose(Transpose(x, p), q)`` reads
  ``out[i] = x[p[q[i]]]``, i.e. one ``Transpose(x, p[q])``; a chain composes the same way and is
  removed when the composition is the identity. A Transpose of a constant becomes a new constant
  holding ``transpose(value, perm)`` under the Transpose output's name, when that frees the original
  constant (it has no other reader) or is at most ``small_bytes``; otherwise the file would hold the
  weight twice, so the node stays (reported) unless ``copy_shared`` is set.
* ``FuseReshapesPass`` (``fuse-reshapes``): ``Reshape(r(x), s) = Reshape(x, s)`` for any ``r`` that
  only reshapes (Reshape, Flatten, Squeeze, Unsqueeze keep the row-major element order), provided
  ``s`` copies no dimension from its input: ``allowzero=1``, or a constant ``s`` without ``0``.
  ``Squeeze(Unsqueeze(x, a), a)`` and ``Unsqueeze(Squeeze(x, a), a)`` are ``x`` (axes as attribute
  below opset 13 or as a constant input; negative axes are normalized with the rank, from shape
  inference when needed).

A removed node's readers are rewired with ``graph.replace_tensor``; when its output is a graph output
that cannot take over the source's name (a graph input, a constant, an outer-scope value), the node
becomes an ``Identity`` instead. Fused layers write the fused op's output tensor, so graph outputs
keep their names, dtypes and shapes. Every pass recurses into subgraphs (fusing only within one
graph), is deterministic, and is idempotent: each repeats its matching until nothing more fuses, so
a second run changes nothing. Shape inference runs at most once per run, only when a candidate needs
a rank, and its annotations are put back afterwards.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import (
    GraphTree,
    Model,
    all_tensor_names,
    constant_meta,
    constant_value,
    detach_node,
    fresh_name,
    is_constant,
    is_graph_io,
    iter_nodes,
    replace_tensor,
)
from ...shapes import TensorFacts
from ..base import GraphSize, PassContext, PassReport

_ONNX_DOMAINS = ("", "ai.onnx", None)
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_AFFINE = ("Mul", "Div", "Add", "Sub")
_PURE_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_GEMM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_F32 = np.dtype(np.float32)

# What one attempt at a node returns: True (fused), a reason worth reporting, or None (no pattern).
Outcome = bool | str | None


# ----------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class FuseBatchNormConfig:
    """Options for :class:`FuseBatchNormPass`.

    Attributes:
        copy_shared: Fold into a weight that other nodes also read, storing a scaled copy of it.
    """

    copy_shared: bool = False


@dataclasses.dataclass(frozen=True)
class FuseConstantAffineConfig:
    """Options for :class:`FuseConstantAffinePass`.

    Attributes:
        copy_shared: Fold into a weight that other nodes also read, storing a scaled copy of it.
    """

    copy_shared: bool = False


@dataclasses.dataclass(frozen=True)
class FuseMatMulAddConfig:
    """Options for :class:`FuseMatMulAddPass` (none yet)."""


@dataclasses.dataclass(frozen=True)
class FuseTransposesConfig:
    """Options for :class:`FuseTransposesPass`.

    Attributes:
        small_bytes: A transposed constant up to this size is always folded.
        copy_shared: Fold a Transpose of a constant that other nodes also read (stores it twice).
    """

    small_bytes: int = 1024
    copy_shared: bool = False


@dataclasses.dataclass(frozen=True)
class FuseReshapesConfig:
    """Options for :class:`FuseReshapesPass` (none yet)."""


# ----------------------------------------------------------------------------------- helpers


def _std(node: gs.Node | None) -> bool:
    return node is not None and node.domain in _ONNX_DOMAINS


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _producer_op(t: gs.Tensor) -> str | None:
    p = _producer(t)
    return None if p is None else p.op


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` if given (optional inputs may be missing or named "")."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)


def _fused_name(base: str) -> str:
    return re.sub(r"_fused(_\d+)?$", "", base) + "_fused"


def _ints(value: Any) -> list[int] | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        return None
    return [int(v) for v in arr.reshape(-1)]


def _channel_vector(value: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as a float64 vector over the channels, if it broadcasts along ``axis`` only.

    With ``rank`` unknown the channel axis must be the last one and ``value`` at most 1-D.
    """
    shape = value.shape
    if rank is None:
        if axis != -1 or value.ndim > 1:
            return None
        along = shape[0] if shape else 1
    else:
        if value.ndim > rank:
            return None
        padded = (1,) * (rank - value.ndim) + tuple(shape)
        ax = axis % rank
        if any(d != 1 for i, d in enumerate(padded) if i != ax):
            return None
        along = padded[ax]
    if along not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,))


class _Run:
    """The state of one pass run: report, names, graph tree, counters, and the rewiring helpers."""

    def __init__(self, model: Model, name: str) -> None:
        self.model = model
        self.report = PassReport(name)
        self.before = GraphSize.of(model)
        self.tree = GraphTree(model.graph)
        self.names = all_tensor_names(model.graph)
        self.ranks = TensorFacts(model)
        self.fused: Counter[str] = Counter()

    def nodes(self, ops: Sequence[str]) -> list[tuple[gs.Graph, gs.Node]]:
        return [(g, n) for g, n in iter_nodes(self.model.graph) if n.op in ops and _std(n)]

    def infer_if(self, needed: bool) -> None:
        if needed:
            self.ranks.infer()
            self.report.skipped.extend(("shape inference", w) for w in self.ranks.warnings)

    def graph_of(self, node: gs.Node) -> gs.Graph | None:
        return self.tree.node_graph.get(id(node))

    def local_producer(self, t: gs.Tensor, g: gs.Graph, ops: Sequence[str]) -> gs.Node | None:
        """The node of graph ``g`` computing ``t``, if its op is one of ``ops``."""
        p = _producer(t)
        if p is None or p.op not in ops or not _std(p) or self.graph_of(p) is not g:
            return None
        return p

    def is_output(self, t: gs.Tensor) -> bool:
        return any(o is t for g in self.tree.graphs.values() for o in g.outputs)

    def sole_reader(self, t: gs.Tensor, node: gs.Node) -> bool:
        """Whether ``node`` is the only reader of ``t`` and ``t`` is no graph output."""
        return len(t.outputs) == 1 and t.outputs[0] is node and not self.is_output(t)

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(self.names, base), np.asarray(value, order="C"))

    def renamed(self, new: str, old: str) -> None:
        self.report.tensor_map[new] = self.report.tensor_map.pop(old, old)

    def bypass(self, g: gs.Graph, node: gs.Node, source: gs.Tensor) -> None:
        """Make the readers of ``node``'s output read ``source`` and drop ``node``.

        A graph output keeps its name, dtype and shape: ``source`` takes them over when it is a value
        computed in the same graph; otherwise ``node`` becomes ``Identity(source)``.
        """
        out = node.outputs[0]
        owners = [h for h in self.tree.graphs.values() if any(o is out for o in h.outputs)]
        if owners:
            p = _producer(source)
            movable = (
                isinstance(source, gs.Variable)
                and p is not None
                and all(h is g for h in owners)
                and self.graph_of(p) is g
                and not is_graph_io(self.tree, source)
            )
            before, dtype, shape = source.name, out.dtype, out.shape
            if movable and replace_tensor(self.tree, out, source):
                source.dtype, source.shape = dtype, shape
                self.renamed(source.name, before)
                detach_node(node)
                return
            node.op = "Identity"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.append(source)
            return
        replace_tensor(self.tree, out, source)
        detach_node(node)

    def until_stable(self, candidates: list[tuple[gs.Graph, gs.Node]], attempt: Callable[..., Outcome]) -> None:
        """Try every candidate until a round fuses nothing; report the reasons of that last round."""
        reasons: list[tuple[str, str]] = []
        for _ in range(len(candidates) + 1):
            progress = False
            reasons = []
            for g, node in candidates:
                if not node.outputs:
                    continue  # fused and detached
                outcome = attempt(self, g, node)
                if outcome is True:
                    progress = True
                elif isinstance(outcome, str):
                    reasons.append((node.name or node.op, outcome))
            if not progress:
                break
        self.report.skipped.extend(reasons)

    def finish(self) -> PassReport:
        report = self.report
        if self.fused:
            self.model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = bool(self.fused)
        report.stats = self.before.stats(
            self.model, bool(self.fused), fused=dict(sorted(self.fused.items())), fusions=sum(self.fused.values())
        )
        return report


# ------------------------------------------------------------------------- affine folding


@dataclasses.dataclass
class _Target:
    """A layer whose output channels an affine map can be folded into.

    Attributes:
        layer: The Conv/ConvTranspose/Gemm/MatMul node.
        channels: Number of output channels.
        rank: Rank of the layer's output, if known.
        axis: The output's channel axis (-1, the last, when the rank is unknown).
        bias_node: The node holding the bias: the layer, the ``Add`` after a MatMul, or None.
        bias_index: The bias input index on ``bias_node``.
        out: The tensor the affine op reads (the layer's output, or the bias Add's).
    """

    layer: gs.Node
    channels: int
    rank: int | None
    axis: int
    bias_node: gs.Node | None
    bias_index: int
    out: gs.Tensor


def _layer(run: _Run, p: gs.Node) -> _Target | str | None:
    """``p`` as a fold target; a reason if it is a layer that cannot take a fold; None if no layer."""
    if len(p.inputs) < 2 or len(p.outputs) != 1:
        return None
    op, w = p.op, p.inputs[1]
    meta = constant_meta(w)
    if meta is None:
        return None if op == "MatMul" else f"{op} weight is computed at run time"
    shape, dtype = meta
    if dtype != _F32:
        return f"{op} weight is {dtype} (only float32 weights are folded)"
    if op == "MatMul":
        if len(shape) != 2 or is_constant(p.inputs[0]):
            return None
        rank = run.ranks.rank(p.inputs[0])
        return _Target(p, shape[1], rank, -1 if rank is None else rank - 1, None, 0, p.outputs[0])
    if op == "Gemm":
        if len(shape) != 2:
            return "Gemm weight is not 2-D"
        channels = shape[0] if int(p.attrs.get("transB", 0)) else shape[1]
        return _Target(p, channels, 2, 1, p, 2, p.outputs[0])
    if len(shape) < 3:
        return f"{op} weight has rank {len(shape)}"
    channels = shape[0]
    if op == "ConvTranspose":
        group = int(p.attrs.get("group", 1))
        if group < 1 or shape[0] % group:
            return f"ConvTranspose weight of {shape[0]} input channels in {group} groups"
        channels = shape[1] * group
    return _Target(p, channels, len(shape), 1, p, 2, p.outputs[0])


def _find_target(run: _Run, g: gs.Graph, y: gs.Tensor) -> _Target | str | None:
    """The layer computing ``y``, directly or through the bias ``Add`` of a MatMul."""
    p = _producer(y)
    if p is None or not _std(p) or p.op not in _LAYERS + ("Add",):
        return None
    if run.graph_of(p) is not g:
        return f"input computed by {p.op} in an enclosing graph"
    if p.op in _LAYERS:
        return _layer(run, p)
    if p.op != "Add" or len(p.inputs) != 2:
        return None
    for i in (0, 1):
        mm_out, bias = p.inputs[i], p.inputs[1 - i]
        q = run.local_producer(mm_out, g, ("MatMul",))
        if q is None or not is_constant(bias):
            continue
        inner = _layer(run, q)
        if not isinstance(inner, _Target):
            return inner
        meta = constant_meta(bias)
        assert meta is not None
        if meta[1] != _F32:
            return f"MatMul bias is {meta[1]} (only float32 is folded)"
        if _channel_vector(np.zeros(meta[0], np.float32), inner.rank, inner.axis, inner.channels) is None:
            return None  # not a per-column bias
        if not run.sole_reader(mm_out, p):
            return "MatMul output is also read by other nodes"
        return dataclasses.replace(inner, bias_node=p, bias_index=1 - i, out=y)
    return None


def _scale_weight(layer: gs.Node, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` with the weights of each output channel ``c`` multiplied by ``scale[c]`` (float64)."""
    w64 = w.astype(np.float64)
    if layer.op == "Conv":
        return w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        per_group_in, per_group_out = w.shape[0] // group, w.shape[1]
        blocks = w64.reshape(group, per_group_in, per_group_out, -1)
        return (blocks * scale.reshape(group, 1, per_group_out, 1)).reshape(w.shape)
    if layer.op == "Gemm" and int(layer.attrs.get("transB", 0)):
        return w64 * scale[:, None]
    return w64 * scale[None, :]


def _fold(
    run: _Run, target: _Target, node: gs.Node, scale: np.ndarray | None, shift: np.ndarray | None, copy_shared: bool
) -> str | None:
    """Fold ``z = scale * y + shift`` (``node`` computes ``z`` from ``target.out``) into the layer.

    Returns:
        A reason when the fold is impossible (nothing changed then), else None.
    """
    layer = target.layer
    weight = layer.inputs[1]
    if scale is not None and not copy_shared and any(o is not layer for o in weight.outputs):
        return f"{layer.op} weight {weight.name!r} is also read by other nodes (folding would copy it)"
    bias_t = _present(target.bias_node, target.bias_index) if target.bias_node is not None else None
    if bias_t is not None:
        meta = constant_meta(bias_t)
        if meta is None:
            return f"{layer.op} bias is computed at run time"
        if meta[1] != _F32:
            return f"{layer.op} bias is {meta[1]} (only float32 is folded)"
    if not (scale is None or np.all(np.isfinite(scale))) or not (shift is None or np.all(np.isfinite(shift))):
        return "the folded scale or shift is not finite"
    # Everything is checked: rewrite.
    if scale is not None:
        w = constant_value(weight)
        assert w is not None
        new_w = _scale_weight(layer, w, scale).astype(np.float32)
        layer.inputs[1] = run.constant(_fused_name(weight.name), new_w)
    bias: np.ndarray | None = None
    if bias_t is not None:
        bias = np.asarray(constant_value(bias_t), dtype=np.float64)
        if layer.op == "Gemm":
            bias = bias * float(layer.attrs.get("beta", 1.0))
        if scale is not None:
            bias = bias * scale
    if shift is not None:
        bias = shift if bias is None else bias + shift
    z, y = node.outputs[0], target.out
    if bias is not None:
        base = bias_t.name if bias_t is not None else f"{layer.name or weight.name}_bias"
        bias_c = run.constant(_fused_name(base), bias.astype(np.float32))
        if target.bias_node is None:  # a MatMul without bias: the affine node becomes its bias Add
            node.op = "Add"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.extend([y, bias_c])
            return None
        _set_input(target.bias_node, target.bias_index, bias_c)
        if layer.op == "Gemm":
            layer.attrs["beta"] = 1.0
    producer = y.inputs[0]
    detach_node(node)
    producer.outputs[0] = z
    return None


def _batchnorm(run: _Run, g: gs.Graph, bn: gs.Node, copy_shared: bool) -> Outcome:
    if bn.op != "BatchNormalization":
        return None
    if int(bn.attrs.get("training_mode", 0)) or any(not o.is_empty() for o in bn.outputs[1:]):
        return "training mode (running statistics are outputs)"
    if int(bn.attrs.get("spatial", 1)) != 1:
        return "spatial=0 (statistics per activation, not per channel)"
    if len(bn.inputs) != 5:
        return "not the 5-input inference form"
    for t in bn.inputs[1:]:
        meta = constant_meta(t)
        if meta is None:
            return "scale/bias/mean/var are computed at run time"
        if meta[1] != _F32:
            return f"statistics are {meta[1]} (only float32 is folded)"
    y = bn.inputs[0]
    p = _producer(y)
    target = _find_target(run, g, y)
    if target is None:
        if p is None:
            return "input is a graph input or constant (no layer to fold into)"
        if p.op in ("MatMul", "Add"):
            return f"input computed by {p.op}, not a MatMul by a constant 2-D float32 weight (+ constant bias)"
        return f"input computed by {p.op} (folds only into Conv, ConvTranspose, Gemm, MatMul)"
    if isinstance(target, str):
        return target
    if target.rank != 2 and target.layer.op == "MatMul":
        return "MatMul input is not known to be 2-D (BatchNormalization's axis 1 must be its column)"
    gamma, beta, mean, var = (np.asarray(constant_value(t), dtype=np.float64).reshape(-1) for t in bn.inputs[1:])
    if not gamma.size == beta.size == mean.size == var.size == target.channels:
        return f"{gamma.size} statistics for {target.channels} channels of {target.layer.op}"
    if not run.sole_reader(y, bn):
        return f"{p.op if p else 'input'} output is also read by other nodes or is a graph output"
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    reason = _fold(run, target, bn, scale, beta - mean * scale, copy_shared)
    if reason:
        return reason
    run.fused[f"{target.layer.op}+BatchNormalization"] += 1
    return True


class FuseBatchNormPass:
    """Fold inference BatchNormalization into the preceding layer (see module docstring)."""

    name = "fuse-batchnorm"

    def __init__(self, config: FuseBatchNormConfig | None = None) -> None:
        self.config = config or FuseBatchNormConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Fuse every foldable BatchNormalization in every graph of ``model``."""
        run = _Run(model, self.name)
        bns = run.nodes(("BatchNormalization",))
        run.infer_if(any(bn.inputs and _producer_op(bn.inputs[0]) in ("MatMul", "Add") for _, bn in bns))
        copy = self.config.copy_shared
        run.until_stable(bns, lambda r, g, n: _batchnorm(r, g, n, copy))
        return run.finish()


def _affine(run: _Run, g: gs.Graph, node: gs.Node, copy_shared: bool) -> Outcome:
    op = node.op
    if op not in _AFFINE or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    sides = ((0, 1), (1, 0)) if op in ("Mul", "Add") else ((0, 1),)
    for yi, ci in sides:
        y, c = node.inputs[yi], node.inputs[ci]
        if not is_constant(c) or is_constant(y):
            continue
        target = _find_target(run, g, y)
        if target is None:
            continue
        if isinstance(target, str):
            return target
        if op in ("Add", "Sub") and target.bias_node is None:
            return None  # MatMul + Add: the layer's own bias, nothing to fold into
        value = constant_value(c)
        assert value is not None
        if value.dtype != _F32:
            return f"constant is {value.dtype} (only float32 is folded)"
        vec = _channel_vector(value, target.rank, target.axis, target.channels)
        if vec is None:
            return f"constant of shape {list(value.shape)} does not broadcast along the output channels only"
        if not run.sole_reader(y, node):
            return f"{_producer_op(y)} output is also read by other nodes or is a graph output"
        scale = shift = None
        if op == "Mul":
            scale = vec
        elif op == "Div":
            if not np.all(vec != 0) or not np.all(np.isfinite(vec)):
                return "division by zero or a non-finite constant"
            scale = 1.0 / vec
        else:
            shift = vec if op == "Add" else -vec
        reason = _fold(run, target, node, scale, shift, copy_shared)
        if reason:
            return reason
        run.fused[f"{target.layer.op}+{op}"] += 1
        return True
    return None


def _affine_needs_ranks(node: gs.Node) -> bool:
    """Whether a MatMul output's rank decides this affine node (a constant of rank >= 2 after it)."""
    for t in node.inputs:
        meta = constant_meta(t)
        if meta is not None and len(meta[0]) >= 2:
            return any(_producer_op(o) in ("MatMul", "Add") for o in node.inputs)
    return False


class FuseConstantAffinePass:
    """Fold constant per-channel Mul/Div/Add/Sub into the preceding layer (see module docstring)."""

    name = "fuse-affine"

    def __init__(self, config: FuseConstantAffineConfig | None = None) -> None:
        self.config = config or FuseConstantAffineConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Fold every foldable affine op in every graph of ``model``."""
        run = _Run(model, self.name)
        nodes = run.nodes(_AFFINE)
        run.infer_if(any(_affine_needs_ranks(n) for _, n in nodes))
        copy = self.config.copy_shared
        run.until_stable(nodes, lambda r, g, n: _affine(r, g, n, copy))
        return run.finish()


# ---------------------------------------------------------------------------- MatMul + Add


def _matmul_add(run: _Run, g: gs.Graph, add: gs.Node) -> Outcome:
    if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    for i in (0, 1):
        mm_out, bias = add.inputs[i], add.inputs[1 - i]
        mm = run.local_producer(mm_out, g, ("MatMul",))
        if mm is None or len(mm.inputs) != 2 or not is_constant(bias):
            continue
        w_meta, b_meta = constant_meta(mm.inputs[1]), constant_meta(bias)
        assert b_meta is not None
        if w_meta is None or len(w_meta[0]) != 2 or is_constant(mm.inputs[0]):
            continue
        if w_meta[1] not in _GEMM_DTYPES or b_meta[1] != w_meta[1]:
            return f"weight {w_meta[1]} and bias {b_meta[1]} (Gemm takes matching float types)"
        n = w_meta[0][1]
        padded = (1,) * (2 - len(b_meta[0])) + tuple(b_meta[0])
        if len(padded) != 2 or padded[0] != 1 or padded[1] not in (1, n):
            return f"bias of shape {list(b_meta[0])} does not broadcast to [{n}]"
        rank = run.ranks.rank(mm.inputs[0])
        if rank != 2:
            what = "unknown" if rank is None else str(rank)
            return f"MatMul input rank is {what} (Gemm takes a 2-D input)"
        if run.model.opset < 7:
            return "opset < 7 (Gemm without unidirectional broadcasting)"
        if not run.sole_reader(mm_out, add):
            return "MatMul output is also read by other nodes or is a graph output"
        z = add.outputs[0]
        detach_node(add)
        mm.op = "Gemm"
        mm.inputs.append(bias)
        mm.outputs[0] = z
        run.fused["MatMul+Add"] += 1
        return True
    return None


class FuseMatMulAddPass:
    """MatMul of a 2-D input by a constant weight plus a constant bias -> Gemm (see module docstring)."""

    name = "fuse-matmul-add"

    def __init__(self, config: FuseMatMulAddConfig | None = None) -> None:
        self.config = config or FuseMatMulAddConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Fuse every MatMul + Add pair that qualifies, in every graph of ``model``."""
        run = _Run(model, self.name)
        adds = run.nodes(("Add",))
        run.infer_if(any(_producer_op(t) == "MatMul" for _, a in adds for t in a.inputs))
        run.until_stable(adds, _matmul_add)
        return run.finish()


# ------------------------------------------------------------------------------ Transposes


def _transpose(run: _Run, g: gs.Graph, t: gs.Node, cfg: FuseTransposesConfig) -> Outcome:
    if t.op != "Transpose" or len(t.inputs) != 1 or len(t.outputs) != 1:
        return None
    out = t.outputs[0]
    if not out.outputs and not run.is_output(out):
        return None  # dead: the cleanup drops it
    chain = [t]  # the Transposes from ``t`` up to the first non-Transpose value, ``root``
    root = t.inputs[0]
    while (p := run.local_producer(root, g, ("Transpose",))) is not None and len(p.inputs) == 1:
        chain.append(p)
        root = p.inputs[0]
    perms = [n.attrs.get("perm") for n in chain]
    rank = next((len(p) for p in perms if p is not None), None)
    if rank is None:
        rank = run.ranks.rank(root)
        if rank is None:
            return "Transpose without perm on a tensor of unknown rank" if len(chain) > 1 else None
    composed = np.arange(rank)
    for perm in perms:  # out = T_t(T_p1(...)): perm(t) applied last, so compose upwards
        composed = (np.arange(rank)[::-1] if perm is None else np.asarray(perm, dtype=np.int64))[composed]
    identity = bool(np.all(composed == np.arange(rank)))
    if is_constant(root) and not identity:
        frees = all(run.sole_reader(n.inputs[0], n) for n in chain)
        meta = constant_meta(root)
        assert meta is not None
        nbytes = int(np.prod(meta[0], dtype=np.int64)) * meta[1].itemsize
        if run.is_output(out):
            reason = "Transpose of a constant returned as a graph output"
        elif frees or nbytes <= cfg.small_bytes or cfg.copy_shared:
            value = constant_value(root)
            assert value is not None
            name = out.name
            out.name = fresh_name(run.names, f"{name}__folded")
            replace_tensor(run.tree, out, gs.Constant(name, np.asarray(np.transpose(value, composed), order="C")))
            detach_node(t)
            run.fused["Transpose(constant)"] += 1
            return True
        else:
            reason = f"Transpose of a constant read by other nodes (folding would store {nbytes} more bytes)"
        if len(chain) == 1:
            return reason
    if len(chain) == 1:
        return None
    if identity:
        run.bypass(g, t, root)
    else:
        t.inputs[0] = root
        t.attrs["perm"] = [int(i) for i in composed]
    run.fused["Transpose+Transpose"] += 1
    return True


class FuseTransposesPass:
    """Compose Transpose chains; fold Transposes of constants (see module docstring)."""

    name = "fuse-transposes"

    def __init__(self, config: FuseTransposesConfig | None = None) -> None:
        self.config = config or FuseTransposesConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Fuse Transposes in every graph of ``model``."""
        run = _Run(model, self.name)
        nodes = run.nodes(("Transpose",))
        run.infer_if(any("perm" not in n.attrs for _, n in nodes))
        cfg = self.config
        run.until_stable(nodes, lambda r, g, n: _transpose(r, g, n, cfg))
        return run.finish()


# -------------------------------------------------------------------------------- Reshapes


def _axes(node: gs.Node) -> list[int] | str:
    """Constant (Un)Squeeze axes (attribute below opset 13, input from 13), or why they are unknown."""
    given = _present(node, 1)
    if given is not None:
        axes = _ints(constant_value(given))
        return "axes computed at run time" if axes is None else axes
    if "axes" in node.attrs:
        return _ints(node.attrs["axes"]) or []
    return "Squeeze without axes (removes whichever dimensions are 1)"


def _reshape(run: _Run, g: gs.Graph, node: gs.Node) -> Outcome:
    src = node.inputs[0] if node.inputs else None
    if src is None or len(node.outputs) != 1:
        return None
    if node.op == "Reshape":
        p = run.local_producer(src, g, _PURE_RESHAPES)
        if p is None or len(node.inputs) < 2:
            return None
        if not int(node.attrs.get("allowzero", 0)):
            shape = _ints(constant_value(node.inputs[1]))
            if shape is None:
                return "target shape computed at run time (a 0 in it would copy a dimension of the input)"
            if 0 in shape:
                return "target shape has 0 entries, which copy dimensions of the input"
        first = p.op
        while p is not None:
            src = p.inputs[0]
            p = run.local_producer(src, g, _PURE_RESHAPES)
        node.inputs[0] = src
        run.fused[f"{first}+Reshape"] += 1
        return True
    if node.op == "Unsqueeze":
        merged = _merge_unsqueezes(run, g, node)
        if merged is not None:
            return merged
    inner_op = "Unsqueeze" if node.op == "Squeeze" else "Squeeze"
    p = run.local_producer(src, g, (inner_op,))
    if p is None or not p.inputs:
        return None
    outer_axes, inner_axes = _axes(node), _axes(p)
    for axes in (outer_axes, inner_axes):
        if isinstance(axes, str):
            return axes
    assert isinstance(outer_axes, list) and isinstance(inner_axes, list)
    x = p.inputs[0]
    if min(outer_axes + inner_axes, default=0) < 0:
        rank = run.ranks.rank(x)
        if rank is None:
            return "negative axes on a tensor of unknown rank"
        big = rank + len(inner_axes) if inner_op == "Unsqueeze" else rank
        outer_axes = [a % big for a in outer_axes]
        inner_axes = [a % big for a in inner_axes]
    if sorted(outer_axes) != sorted(inner_axes) or len(set(outer_axes)) != len(outer_axes) or not outer_axes:
        return None
    run.bypass(g, node, x)
    run.fused[f"{inner_op}+{node.op}"] += 1
    return True


def _unsqueeze_positions(base_rank: int, first: list[int], second: list[int]) -> list[int]:
    """Where the dimensions inserted by two successive Unsqueezes end up (non-negative axes)."""
    dims: list[str] = ["x"] * base_rank
    for axes, mark in ((first, "a"), (second, "b")):
        out: list[str] = []
        it = iter(dims)
        for i in range(len(dims) + len(axes)):
            out.append(mark if i in axes else next(it))
        dims = out
    return [i for i, d in enumerate(dims) if d != "x"]


def _merge_unsqueezes(run: _Run, g: gs.Graph, node: gs.Node) -> Outcome:
    """``Unsqueeze(Unsqueeze(x, a), b)`` -> ``Unsqueeze(x, c)``, c the final positions of both.

    Done when every reader of the inner Unsqueeze is an Unsqueeze, so the inner one disappears once all
    are merged and no work is duplicated."""
    p = run.local_producer(node.inputs[0], g, ("Unsqueeze",))
    mid = node.inputs[0]
    # Every reader of the inner Unsqueeze must be an Unsqueeze too: each gets merged, the inner dies.
    readers_ok = all(c.op == "Unsqueeze" and _std(c) and run.graph_of(c) is g for c in mid.outputs)
    if p is None or not p.inputs or run.is_output(mid) or not readers_ok:
        return None
    inner, outer = _axes(p), _axes(node)
    if isinstance(inner, str) or isinstance(outer, str) or not inner or not outer:
        return None
    x = p.inputs[0]
    rank = run.ranks.rank(x) if min(inner + outer) < 0 else None
    if min(inner + outer) < 0:
        if rank is None:
            return "negative axes on a tensor of unknown rank"
        inner = [a % (rank + len(inner)) for a in inner]
        outer = [a % (rank + len(inner) + len(outer)) for a in outer]
    base = rank if rank is not None else max(inner + outer) + 1
    if len(set(inner)) != len(inner) or len(set(outer)) != len(outer):
        return None
    if max(inner) >= base + len(inner) or max(outer) >= base + len(inner) + len(outer):
        return None
    combined = np.array(_unsqueeze_positions(base, inner, outer), dtype=np.int64)
    node.inputs[0] = x
    if _present(node, 1) is not None:
        _set_input(node, 1, run.constant("unsqueeze_axes", combined))
    else:
        node.attrs["axes"] = [int(a) for a in combined]
    run.fused["Unsqueeze+Unsqueeze"] += 1
    return True


def _reshape_needs_ranks(node: gs.Node) -> bool:
    if node.op == "Reshape":
        return False
    axes = _axes(node)
    return isinstance(axes, list) and min(axes, default=0) < 0


class FuseReshapesPass:
    """Merge Reshape chains; cancel Squeeze/Unsqueeze pairs (see module docstring)."""

    name = "fuse-reshapes"

    def __init__(self, config: FuseReshapesConfig | None = None) -> None:
        self.config = config or FuseReshapesConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Fuse reshapes in every graph of ``model``."""
        run = _Run(model, self.name)
        nodes = run.nodes(("Reshape", "Squeeze", "Unsqueeze"))
        run.infer_if(any(_reshape_needs_ranks(n) for _, n in nodes))
        run.until_stable(nodes, _reshape)
        return run.finish()
