"""Constant folding: replace nodes whose inputs are all known by their computed outputs.

Three steps per graph (main graph first, then every subgraph, which may read outer constants):

1. ``Constant`` nodes become initializers (no evaluation needed).
2. Shape folding: with the shapes from onnx's shape inference, ``Shape(x)`` / ``Size(x)`` of a fully
   static ``x``, and ``Gather``/``Slice`` of a ``Shape`` that only pick static dimensions, become
   constants; a ``Reshape`` whose computed target is known but for one (dynamic) dimension gets a
   constant target with ``-1`` there; dynamic (symbolic) dimensions stay dynamic.
3. Waves of evaluation: every node whose inputs are all constants is evaluated in onnxruntime (all
   graph optimizations off, so each op computes exactly its ONNX definition), one session per wave
   for all the wave's nodes, until no node is left to fold.

The **size guard** keeps files from growing. Before evaluation, onnx shape inference on the wave
gives every output's size; after evaluation the real size is checked again. A node is folded only if

    out_bytes <= max_growth * freed_bytes        (default 1.0)

where ``freed_bytes`` counts the constant inputs that the node alone reads (they disappear with it),
or, for outputs of at most ``small_bytes`` (1 KiB: shape vectors, per-channel parameters), if the
bytes they add fit the growth budget: ``max_total_growth`` (10%) of the model's size, shared by all
rounds of one ``fold``. A folded value identical to a constant already in the model adds nothing
(deduplication merges them), and the node's own bytes are credited.
So ``ConstantOfShape``/``Expand``/``Tile``/``Range`` producing a large tensor from a small shape,
``Cast``/``DequantizeLinear`` that would undo weight compression, and a ``Transpose`` of a weight that
is also used elsewhere are left unfolded, each with its reason in the report. Nodes whose output
size cannot be known before evaluation are only evaluated when their op cannot grow its data.

Not folded: random ops, ops with subgraphs, quantization ops (``QuantizeLinear``,
``DequantizeLinear``, ``DynamicQuantizeLinear``: folding them would undo quantization), sequence and
optional ops, and ops outside the default domain. An op onnxruntime cannot evaluate keeps its node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import (
    GraphTree,
    Model,
    all_tensor_names,
    constant_value,
    fresh_name,
    is_constant,
    iter_graphs,
    tensor_nbytes,
)
from ...io import export_model, stage
from ...shapes import data_prop_is_safe, infer_shapes
from ..base import GraphSize, PassContext, PassReport

log = logging.getLogger(__name__)

NEVER_FOLD = frozenset(
    {
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
        "If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceAt", "SequenceErase", "SequenceLength",
        "SplitToSequence", "ConcatFromSequence", "SequenceMap", "Optional", "OptionalGetElement",
        "OptionalHasElement", "Constant",
    }
)  # fmt: skip
# Ops whose output can be much larger than their inputs: evaluated only when inference sized them.
MAY_GROW = frozenset(
    {
        "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "MatMul",
        "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less",
        "GreaterOrEqual", "LessOrEqual", "Where", "Max", "Min", "Sum", "Mean", "BitShift", "Mod",
        "Einsum", "EyeLike", "Cast", "CastLike", "DepthToSpace", "SpaceToDepth", "Col2Im",
    }
)  # fmt: skip


_NODE_BYTES = 64  # rough serialized size of a node, to estimate a model's size without writing it


def _value_key(value: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    arr = np.asarray(value)
    data = arr.tobytes() if arr.dtype.kind not in "OSU" else repr(arr.tolist()).encode()
    return arr.dtype.str, arr.shape, hashlib.sha256(data).digest()


def _small_constant_keys(model: Model, limit: int) -> set[tuple[str, tuple[int, ...], bytes]]:
    """Keys of the constants of at most ``limit`` bytes already in the model."""
    keys = set()
    for g in iter_graphs(model.graph):
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant) and tensor_nbytes(t) <= limit:
                    try:
                        keys.add(_value_key(constant_value(t, cache=False)))
                    except (ValueError, TypeError):  # packed types numpy cannot hold (int2, int4, ...)
                        continue
    return keys


@dataclasses.dataclass(frozen=True)
class FoldConstantsConfig:
    """Options for :class:`FoldConstantsPass`.

    Attributes:
        small_bytes: Outputs up to this size may be folded from the growth budget.
        max_growth: Otherwise an output may be at most this many times the bytes it frees.
        max_total_growth: The growth budget, as a fraction of the model's size.
        max_wave_bytes: Upper bound on the bytes one evaluation session may produce.
    """

    small_bytes: int = 1024
    max_growth: float = 1.0
    max_total_growth: float = 0.10
    max_wave_bytes: int = 512 * 2**20


def _is_default_domain(node: gs.Node) -> bool:
    return node.domain in ("", "ai.onnx", None)


def _static(shape: Any) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


class FoldConstantsPass:
    """Constant and shape folding with a size guard (see module docstring)."""

    name = "fold-constants"

    def __init__(self, config: FoldConstantsConfig | None = None) -> None:
        self.config = config or FoldConstantsConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Fold every foldable node of every graph of ``model``."""
        report = PassReport(self.name)
        before = GraphSize.of(model)
        # One growth budget for all rounds of a fold (the rounds share the context).
        size = before.bytes + _NODE_BYTES * before.nodes
        self._budget = ctx.options.setdefault("fold_growth_budget", [self.config.max_total_growth * size])
        self._seen = _small_constant_keys(model, self.config.small_bytes)
        folded: dict[str, int] = {}
        changed = self._constant_nodes(model, folded)
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        warnings = infer_shapes(model)
        for w in warnings:
            report.skipped.append(("(shape inference)", w))
        if self._shapes(model, folded):
            changed = True
            model.graph.cleanup(remove_unused_graph_inputs=False)
        refused: dict[int, str] = {}
        while True:
            wave_changed = self._wave(model, folded, refused)
            changed |= wave_changed
            if not wave_changed:
                break
        for reason in refused.values():
            where, why = reason.split("\0", 1)
            report.skipped.append((where, why))
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = changed
        report.stats = before.stats(model, changed, folded=dict(sorted(folded.items())))
        return report

    # ----------------------------------------------------------------------------------- steps

    @staticmethod
    def _constant_nodes(model: Model, folded: dict[str, int]) -> bool:
        changed = False
        tree = GraphTree(model.graph)
        for g in iter_graphs(model.graph):
            for node in list(g.nodes):
                if node.op != "Constant" or not _is_default_domain(node) or len(node.outputs) != 1:
                    continue
                value = _constant_attr_value(node)
                if value is None:
                    continue
                if _replace_with_constant(tree, g, node.outputs[0], value, node):
                    folded["Constant"] = folded.get("Constant", 0) + 1
                    changed = True
        return changed

    @staticmethod
    def _shapes(model: Model, folded: dict[str, int]) -> bool:
        changed = False
        tree = GraphTree(model.graph)
        names = all_tensor_names(model.graph)
        for g in iter_graphs(model.graph):
            for node in list(g.nodes):
                if not _is_default_domain(node) or not node.outputs:
                    continue
                target = _reshape_target(node)
                if target is not None:
                    node.inputs[1] = gs.Constant(fresh_name(names, f"{node.outputs[0].name}_shape"), target)
                    folded["Reshape(shape)"] = folded.get("Reshape(shape)", 0) + 1
                    changed = True
                    continue
                value = _shape_value(node)
                if value is not None and _replace_with_constant(tree, g, node.outputs[0], value, node):
                    folded[f"{node.op}(shape)"] = folded.get(f"{node.op}(shape)", 0) + 1
                    changed = True
        return changed

    def _wave(self, model: Model, folded: dict[str, int], refused: dict[int, str]) -> bool:
        """Evaluate one wave of all-constant nodes in every graph; True if anything was folded."""
        cfg = self.config
        tree = GraphTree(model.graph)
        candidates: list[tuple[gs.Graph, gs.Node]] = []
        for g in iter_graphs(model.graph):
            for node in g.nodes:
                if id(node) in refused or node.op in NEVER_FOLD or not _is_default_domain(node):
                    continue
                if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                    continue
                if not node.outputs or not all(t.is_empty() or is_constant(t) for t in node.inputs):
                    continue
                if any(_is_subgraph_output(tree, g, o) for o in node.outputs):
                    refused[id(node)] = f"{node.name or node.op}\0output of a subgraph kept as a node"
                    continue
                candidates.append((g, node))
        if not candidates:
            return False
        sizes = _infer_output_bytes([n for _, n in candidates], model)
        chosen: list[tuple[gs.Graph, gs.Node]] = []
        budget = cfg.max_wave_bytes
        for g, node in candidates:
            est = sizes.get(id(node))
            if est is None and node.op in MAY_GROW:
                refused[id(node)] = (
                    f"{node.name or node.op}\0output size unknown before evaluation ({node.op} may grow)"
                )
                continue
            if est is not None and not self._within_guard(node, est):
                refused[id(node)] = f"{node.name or node.op}\0size guard: output {est} bytes > bytes it frees"
                continue
            if est is not None:
                if est > budget:
                    continue  # next wave
                budget -= est
            chosen.append((g, node))
        if not chosen:
            return False
        results = self._evaluate([n for _, n in chosen], model, refused)
        changed = False
        for g, node in chosen:
            values = results.get(id(node))
            if values is None:
                continue
            nbytes = sum(v.nbytes for v in values)
            if not self._within_guard(node, nbytes, values):
                refused[id(node)] = f"{node.name or node.op}\0size guard: output {nbytes} bytes > bytes it frees"
                continue
            ok = True
            # ``values`` holds the non-empty outputs only (omitted optional outputs are empty).
            for out, value in zip([o for o in node.outputs if not o.is_empty()], values):
                ok &= _replace_with_constant(tree, g, out, value, None)
            if ok:
                _detach(node)
                folded[node.op] = folded.get(node.op, 0) + 1
                changed = True
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        return changed

    def _within_guard(self, node: gs.Node, out_bytes: int, values: list[np.ndarray] | None = None) -> bool:
        """The size guard (see module docstring). With ``values``, small outputs are charged."""
        cfg = self.config
        freed = 0
        for t in node.inputs:
            if isinstance(t, gs.Constant) and all(c is node for c in t.outputs):
                freed += tensor_nbytes(t)
        if out_bytes <= cfg.max_growth * freed:
            return True
        if out_bytes > cfg.small_bytes:
            return False
        if values is None:
            return True  # before evaluation: small enough to be worth computing
        keys = [_value_key(v) for v in values]
        added = sum(v.nbytes for v, k in zip(values, keys) if k not in self._seen)
        growth = added - freed - _NODE_BYTES
        if growth > self._budget[0]:
            return False
        self._budget[0] -= max(growth, 0)
        self._seen.update(keys)
        return True

    @staticmethod
    def _evaluate(nodes: list[gs.Node], model: Model, refused: dict[int, str]) -> dict[int, list[np.ndarray]]:
        """Run ``nodes`` (all inputs constant) in one onnxruntime session; per-node on failure."""
        try:
            return _run_nodes(nodes, model)
        except _EvalError:
            pass
        results: dict[int, list[np.ndarray]] = {}
        for node in nodes:
            try:
                results.update(_run_nodes([node], model))
            except _EvalError as exc:
                refused[id(node)] = f"{node.name or node.op}\0onnxruntime cannot evaluate it: {exc}"
        return results


class _EvalError(Exception):
    pass


def _sub_model(nodes: list[gs.Node], model: Model) -> Model:
    outputs = [t for n in nodes for t in n.outputs if not t.is_empty()]
    graph = gs.Graph(
        nodes=list(nodes),
        inputs=[],
        outputs=outputs,
        opset=model.graph.opset,
        import_domains=model.graph.import_domains,
        name="fold",
    )
    return Model(graph=graph, ir_version=model.ir_version)


def _infer_output_bytes(nodes: list[gs.Node], model: Model) -> dict[int, int]:
    """Output bytes of each node as inferred on the sub-model of the candidates (missing: unknown)."""
    sub = _sub_model(nodes, model)
    saved = [(t, t.dtype, t.shape) for n in nodes for t in n.outputs]
    for t, _, _ in saved:
        t.dtype, t.shape = None, None
    try:
        from ...shapes import skeleton

        proto = skeleton(sub)
        for o in proto.graph.output:
            o.type.Clear()
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=data_prop_is_safe(proto))
    except Exception:  # inference failures only mean "unknown"
        return {}
    finally:
        for t, dtype, shape in saved:
            t.dtype, t.shape = dtype, shape
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    sizes: dict[int, int] = {}
    for n in nodes:
        total = 0
        for t in n.outputs:
            if t.is_empty():
                continue
            vi = info.get(t.name)
            if vi is None or not vi.type.tensor_type.elem_type or not vi.type.tensor_type.HasField("shape"):
                total = -1
                break
            dims = vi.type.tensor_type.shape.dim
            if not all(d.HasField("dim_value") for d in dims):
                total = -1
                break
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).itemsize
            except (KeyError, ValueError, TypeError):
                total = -1
                break
            total += int(np.prod([d.dim_value for d in dims], dtype=np.int64)) * itemsize
        if total >= 0:
            sizes[id(n)] = total
    return sizes


def _run_nodes(nodes: list[gs.Node], model: Model) -> dict[int, list[np.ndarray]]:
    import onnxruntime as ort

    sub = _sub_model(nodes, model)
    saved = [(t, t.dtype, t.shape) for n in nodes for t in n.outputs]
    try:
        for t, _, _ in saved:
            t.dtype, t.shape = None, None
        proto = export_model(sub, type_check=False)
        inferred = onnx.shape_inference.infer_shapes(proto)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        del proto.graph.output[:]
        for t in sub.graph.outputs:
            vi = known.get(t.name)
            if vi is None or not vi.type.tensor_type.elem_type:
                raise _EvalError(f"no type inferred for {t.name}")
            out = onnx.ValueInfoProto(name=t.name)
            out.type.tensor_type.elem_type = vi.type.tensor_type.elem_type
            proto.graph.output.append(out)
        with tempfile.TemporaryDirectory(prefix="onnxcompress-fold-") as d:
            staged = stage(proto, Path(d) / "fold.onnx", check=False)
            path = staged.commit()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.log_severity_level = 4
            opts.intra_op_num_threads = 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            values = dict(zip(names, session.run(names, {})))
    except _EvalError:
        raise
    except Exception as exc:  # onnxruntime / onnx raise assorted exception types
        text = str(exc).strip().splitlines()
        raise _EvalError(text[0][:200] if text else type(exc).__name__) from None
    finally:
        for t, dtype, shape in saved:
            t.dtype, t.shape = dtype, shape
    return {id(n): [np.asarray(values[t.name]) for t in n.outputs if not t.is_empty()] for n in nodes}


# --------------------------------------------------------------------------------- helpers


def _detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()


def _is_subgraph_output(tree: GraphTree, g: gs.Graph, t: gs.Tensor) -> bool:
    return g is not tree.root and any(o is t for o in g.outputs)


def _replace_with_constant(
    tree: GraphTree, g: gs.Graph, var: gs.Tensor, value: np.ndarray, node: gs.Node | None
) -> bool:
    """Replace variable ``var`` by a constant of the same name holding ``value``."""
    if not isinstance(var, gs.Variable):
        return False
    if _is_subgraph_output(tree, g, var):
        return False
    name = var.name
    const = gs.Constant(name, np.asarray(value, order="C"))
    var.name = f"{name}__folded"
    for consumer in list(var.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is var:
                consumer.inputs[i] = const
    for graph in tree.graphs.values():
        if any(o is var for o in graph.outputs):
            graph.outputs = [const if o is var else o for o in graph.outputs]
    if node is not None:
        _detach(node)
    return True


def _constant_attr_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return attrs["value"].values
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def _reshape_target(node: gs.Node) -> np.ndarray | None:
    """A constant target for a Reshape whose computed target is known but for one dimension.

    The inferred output shape gives every static dimension; one unknown (symbolic) dimension
    becomes -1, which Reshape computes back from the element count. Not when a static dimension is
    0 without ``allowzero`` (0 would mean "copy the input's dimension").
    """
    if node.op != "Reshape" or len(node.inputs) != 2 or is_constant(node.inputs[1]):
        return None
    shape = node.outputs[0].shape
    if shape is None:
        return None
    dims = [d if isinstance(d, int) and d >= 0 else None for d in shape]
    if sum(d is None for d in dims) > 1 or (0 in dims and not node.attrs.get("allowzero", 0)):
        return None
    return np.array([-1 if d is None else d for d in dims], dtype=np.int64)


def _shape_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Shape/Size node, or of Gather/Slice over a Shape, when the dims are static."""
    op = node.op
    if op in ("Shape", "Size") and node.inputs:
        shape = node.inputs[0].shape
        if op == "Size":
            return np.array(int(np.prod(shape)), dtype=np.int64) if _static(shape) else None
        if shape is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        dims = list(shape)[slice(start, end)]
        return np.array(dims, dtype=np.int64) if _static(dims) else None
    if op in ("Gather", "Slice") and node.inputs and len(node.inputs[0].inputs) == 1:
        producer = node.inputs[0].inputs[0]
        if producer.op != "Shape" or not producer.inputs or producer.inputs[0].shape is None:
            return None
        start, end = producer.attrs.get("start", 0), producer.attrs.get("end", None)
        dims = list(producer.inputs[0].shape)[slice(start, end)]
        positions = np.arange(len(dims))
        try:
            if op == "Gather" and len(node.inputs) == 2:
                idx = constant_value(node.inputs[1])
                if idx is None or int(node.attrs.get("axis", 0)) != 0:
                    return None
                picked = np.take(positions, idx.astype(np.int64))
            elif op == "Slice" and len(node.inputs) >= 3:
                vals = [constant_value(t) if not t.is_empty() else None for t in node.inputs[1:]]
                if any(v is None for v in vals[:2]) or (len(vals) > 2 and vals[2] is not None and int(vals[2][0]) != 0):
                    return None
                starts, ends = int(vals[0][0]), int(vals[1][0])
                steps = int(vals[3][0]) if len(vals) > 3 and vals[3] is not None else 1
                picked = positions[slice(starts, ends, steps)]
            else:
                return None
        except (IndexError, ValueError, TypeError):
            return None
        selected = [dims[int(i)] for i in np.atleast_1d(picked)]
        if not _static(selected):
            return None
        return np.array(selected, dtype=np.int64).reshape(np.shape(picked))
    return None
