"""Shape and dtype inference for a loaded model, without serialising its weights.

onnx's shape inference runs on a *skeleton* of the model: constants over ``STUB_BYTES`` are replaced by
tensors that declare their dtype and dims but point at an external location that is never read, so
inference sees every shape while the skeleton stays a few KB whatever the model's size. Small
constants (shape vectors, axes, scalars) keep their values, so data propagation can compute the
values of shape subgraphs. The inferred dtypes and shapes are written onto the graphsurgeon tensors
of every graph, subgraphs included. Inference failures never stop the caller: they are returned as
warnings naming the node when onnx says which one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Model, constant_meta, iter_graphs
from .io import export_model

log = logging.getLogger(__name__)

STUB_BYTES = 4096


def skeleton(model: Model) -> onnx.ModelProto:
    """The model as a proto whose large constants are declared, not stored."""
    proto = export_model(model, stub_bytes=STUB_BYTES, type_check=False)
    return proto


MAX_PROPAGATED_VALUES = 1 << 20


def data_prop_is_safe(proto: onnx.ModelProto) -> bool:
    """Whether onnx's data propagation can run without materialising a huge tensor.

    Data propagation computes the *values* of small 1-D tensors; for a ``ConstantOfShape`` or
    ``Range`` whose constant inputs ask for millions of elements it would build them element by
    element (a 10^12-element request exhausts memory), so inference then runs without it.
    """
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    consts[node.output[0]] = a.t
    for node in proto.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
            dims = onnx.numpy_helper.to_array(consts[node.input[0]]).reshape(-1)
            if dims.size and np.prod(dims.astype(np.float64)) > MAX_PROPAGATED_VALUES:
                return False
        if node.op_type == "Range" and len(node.input) == 3 and all(i in consts for i in node.input):
            start, limit, delta = (float(onnx.numpy_helper.to_array(consts[i]).reshape(-1)[0]) for i in node.input)
            if delta == 0 or abs((limit - start) / delta) > MAX_PROPAGATED_VALUES:
                return False
    return True


def infer_shapes(model: Model) -> list[str]:
    """Annotate every variable of ``model`` with the dtype/shape onnx infers.

    Returns:
        Warnings (empty when inference succeeded).
    """
    proto = skeleton(model)
    warnings: list[str] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=data_prop_is_safe(proto)
        )
    except Exception as exc:  # onnx raises InferenceError and assorted C++ errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.append(f"shape inference failed: {msg}")
        log.warning("shape inference failed: %s", msg)
        return warnings
    infos: list[dict[str, onnx.ValueInfoProto]] = []
    _collect(inferred.graph, infos)
    graphs = list(iter_graphs(model.graph))
    # Graphs come out in the same depth-first order as iter_graphs walks them.
    for g, info in zip(graphs, infos):
        _apply(g, info)
    del proto
    return warnings


def _collect(graph: onnx.GraphProto, out: list[dict[str, onnx.ValueInfoProto]]) -> None:
    info = {v.name: v for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    out.append(info)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _collect(attr.g, out)
            for g in attr.graphs:
                _collect(g, out)


def _apply(graph: gs.Graph, info: dict[str, onnx.ValueInfoProto]) -> None:
    for node in graph.nodes:
        for t in node.outputs:
            if not isinstance(t, gs.Variable) or t.name not in info:
                continue
            vi = info[t.name]
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                try:
                    t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                except (KeyError, ValueError, TypeError):
                    pass
            if tt.HasField("shape"):
                t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


Dim = int | None
Shape = tuple[Dim, ...]


def onnx_dtype(dtype: Any) -> int | None:
    """The ONNX ``TensorProto`` data type code of a graphsurgeon/numpy dtype, or None if unknown."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)  # graphsurgeon keeps the ONNX code for types numpy lacks (bfloat16, ...)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return None


def normalize_shape(shape: Any) -> Shape | None:
    """A shape as a tuple of ints, with None for symbolic or unknown dims."""
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)


class TensorFacts:
    """Dtypes, shapes and ranks of tensors, with onnx shape inference run lazily and at most once.

    Inference runs the first time someone asks about a tensor that a node computes; the annotations
    it writes on the graph are recorded here and then put back, so the model is left as it was.
    Constants answer from their values' metadata, graph inputs from their declarations.
    """

    def __init__(self, model: Model) -> None:
        self._model = model
        self._inferred: dict[int, tuple[Any, Any]] | None = None
        self.warnings: list[str] = []

    def infer(self) -> dict[int, tuple[Any, Any]]:
        """Run inference now (once); returns ``{id(tensor): (dtype, shape)}`` of computed tensors."""
        if self._inferred is None:
            computed = [
                t
                for g in iter_graphs(self._model.graph)
                for n in g.nodes
                for t in n.outputs
                if isinstance(t, gs.Variable)
            ]
            saved = [(t.dtype, t.shape) for t in computed]
            self.warnings = infer_shapes(self._model)
            self._inferred = {id(t): (t.dtype, t.shape) for t in computed}
            for t, (dtype, shape) in zip(computed, saved):
                t.dtype, t.shape = dtype, shape
        return self._inferred

    def _meta(self, t: gs.Tensor) -> tuple[Any, Any]:
        meta = constant_meta(t)
        if meta is not None:
            return meta[1], meta[0]
        if t.inputs:  # computed by a node: ask inference
            return self.infer().get(id(t), (t.dtype, t.shape))
        return t.dtype, t.shape  # a graph input: its declaration

    def dtype(self, t: gs.Tensor) -> int | None:
        """The ONNX dtype code of ``t``, or None."""
        return onnx_dtype(self._meta(t)[0])

    def shape(self, t: gs.Tensor) -> Shape | None:
        """The shape of ``t`` (None dims for symbolic ones), or None if unknown."""
        return normalize_shape(self._meta(t)[1])

    def rank(self, t: gs.Tensor) -> int | None:
        """The rank of ``t``, or None if unknown."""
        shape = self.shape(t)
        return None if shape is None else len(shape)
