"""The few helpers over onnx-graphsurgeon that every pass needs.

All non-trivial graphsurgeon calls live here and in ``io.py``, so the IR could be swapped without
touching the passes. A :class:`Model` is a graphsurgeon graph plus the model-level fields that
graphsurgeon does not keep (metadata, doc string, model version).

Graphsurgeon traps handled here:
* tensors compare by *name*; identity checks here use ``id()``;
* ``Graph.tensors()`` of a subgraph includes outer-scope tensors, so exporting with graphsurgeon
  copies an outer weight into every branch that uses it. ``io.export_model`` places each constant
  in the lowest graph that encloses all its users instead (see :func:`constant_placement`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

FLOAT_DTYPES = (np.float32, np.float16, np.float64)


@dataclasses.dataclass
class Model:
    """A loaded model: the graphsurgeon graph and the model-level fields around it.

    Attributes:
        graph: The main graph (subgraphs hang off node attributes).
        path: The file it was loaded from, if any.
        ir_version: The ONNX IR version to write back.
        metadata: Model-level fields graphsurgeon drops (``metadata_props``, ``doc_string``,
            ``model_version``, ``domain``).
        external_data: Whether the source kept tensors in external files (saving keeps that layout
            unless told otherwise).
    """

    graph: gs.Graph
    path: Any = None
    ir_version: int | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    external_data: bool = False

    @property
    def opset(self) -> int:
        """The opset version of the default ONNX domain."""
        return int(self.graph.opset)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Yield ``graph`` and every subgraph below it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield from iter_graphs(attr)
            elif isinstance(attr, (list, tuple)):
                for item in attr:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)


def iter_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """Yield ``(owning graph, node)`` for every node in ``graph`` and all its subgraphs."""
    for g in iter_graphs(graph):
        for node in g.nodes:
            yield g, node


def in_topological_order(graph: gs.Graph) -> bool:
    """Whether every node of ``graph`` comes after the nodes of ``graph`` that compute its inputs.

    A cheap check (one walk) to skip graphsurgeon's ``toposort`` where the order is already valid.
    False when a node holds subgraphs: their reads of outer-scope tensors are not followed here.
    """
    pending = {id(t) for n in graph.nodes for t in n.outputs}
    for node in graph.nodes:
        for v in node.attrs.values():
            if isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v)):
                return False
        if any(id(t) in pending for t in node.inputs):
            return False
        for t in node.outputs:
            pending.discard(id(t))
    return True


def count_nodes(graph: gs.Graph) -> int:
    """Number of nodes, subgraphs included."""
    return sum(len(g.nodes) for g in iter_graphs(graph))


def _subgraph_children(graph: gs.Graph) -> Iterator[gs.Graph]:
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield attr
            elif isinstance(attr, (list, tuple)):
                yield from (a for a in attr if isinstance(a, gs.Graph))


class GraphTree:
    """Parent links between a graph and its subgraphs, for placing shared tensors and nodes."""

    def __init__(self, graph: gs.Graph) -> None:
        self.root = graph
        self.parent: dict[int, gs.Graph | None] = {id(graph): None}
        self.depth: dict[int, int] = {id(graph): 0}
        self.graphs: dict[int, gs.Graph] = {id(graph): graph}
        self.node_graph: dict[int, gs.Graph] = {}
        stack = [graph]
        while stack:
            g = stack.pop()
            for node in g.nodes:
                self.node_graph[id(node)] = g
            for child in _subgraph_children(g):
                self.parent[id(child)] = g
                self.depth[id(child)] = self.depth[id(g)] + 1
                self.graphs[id(child)] = child
                stack.append(child)

    def lca(self, a: gs.Graph, b: gs.Graph) -> gs.Graph:
        """The lowest graph that encloses both ``a`` and ``b``."""
        depth, parent = self.depth, self.parent
        while depth[id(a)] > depth[id(b)]:
            a = parent[id(a)]  # type: ignore[assignment]
        while depth[id(b)] > depth[id(a)]:
            b = parent[id(b)]  # type: ignore[assignment]
        while a is not b:
            a, b = parent[id(a)], parent[id(b)]  # type: ignore[assignment]
        return a

    def owner_of_users(self, tensor: gs.Tensor) -> gs.Graph:
        """The lowest graph enclosing every node that reads ``tensor`` (the root if none)."""
        owner: gs.Graph | None = None
        for node in tensor.outputs:
            g = self.node_graph.get(id(node))
            if g is None:
                continue
            owner = g if owner is None else self.lca(owner, g)
        return owner if owner is not None else self.root


def constant_placement(graph: gs.Graph) -> dict[int, list[gs.Constant]]:
    """Decide which graph owns each constant: the lowest common ancestor of all graphs using it.

    Returns:
        ``{id(graph): [constants to write as that graph's initializers]}``.
    """
    tree = GraphTree(graph)
    owner: dict[int, gs.Graph] = {}
    consts: dict[int, gs.Constant] = {}
    for g in tree.graphs.values():
        used = [t for n in g.nodes for t in n.inputs] + list(g.outputs)
        for t in used:
            if isinstance(t, gs.Constant):
                consts[id(t)] = t
                owner[id(t)] = g if id(t) not in owner else tree.lca(owner[id(t)], g)
    placement: dict[int, list[gs.Constant]] = {gid: [] for gid in tree.graphs}
    seen_names: dict[int, set[str]] = {gid: set() for gid in tree.graphs}
    for cid, g in owner.items():
        const = consts[cid]
        if const.name in seen_names[id(g)]:
            continue
        seen_names[id(g)].add(const.name)
        placement[id(g)].append(const)
    return placement


def _const_values(const: gs.Constant, cache: bool) -> np.ndarray:
    if not cache and isinstance(const._values, LazyValues):
        return const._values.load()
    return const.values


def constant_value(tensor: gs.Tensor, *, cache: bool = True) -> np.ndarray | None:
    """The value of ``tensor`` if it is constant (an initializer or a ``Constant`` node output).

    A lazily loaded value (external data, or an initializer graphsurgeon has not decoded yet) is
    kept on the tensor once read, unless ``cache=False``: then it is read for this call only, so a
    pass that reads big weights one after another holds one at a time.
    """
    if isinstance(tensor, gs.Constant):
        return _const_values(tensor, cache)
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Constant" and producer.domain in ("", "ai.onnx", None):
            value = producer.attrs.get("value")
            if isinstance(value, gs.Constant):
                return _const_values(value, cache)
    return None


def is_constant(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` holds a value known before run time (without loading it)."""
    if isinstance(tensor, gs.Constant):
        return True
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        return producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant)
    return False


def constant_meta(tensor: gs.Tensor) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of a constant tensor without loading its values, or None."""
    const = tensor
    if not isinstance(tensor, gs.Constant):
        if not is_constant(tensor):
            return None
        const = tensor.inputs[0].attrs["value"]
    values = const._values
    shape = tuple(int(d) for d in values.shape)
    dtype = values.dtype
    if isinstance(dtype, int):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return shape, np.dtype(dtype)


def tensor_nbytes(tensor: gs.Constant) -> int:
    """Bytes the constant occupies, without loading lazy values."""
    values = tensor._values
    nbytes = getattr(values, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    return int(np.asarray(values).nbytes)


def fresh_name(names: set[str], base: str) -> str:
    """A name not in ``names`` derived from ``base``; it is added to ``names``."""
    if base not in names:
        names.add(base)
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    names.add(f"{base}_{i}")
    return f"{base}_{i}"


def all_tensor_names(graph: gs.Graph) -> set[str]:
    """Every tensor name in ``graph`` and its subgraphs (for collision-free renaming)."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        names.update(g.tensors().keys())
        names.update(t.name for t in g.inputs)
    return names


KNOWN_RUNTIME_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc")


def constant_bytes(graph: gs.Graph) -> int:
    """Bytes of all constants (subgraphs and Constant nodes included), without loading lazy values."""
    seen: set[int] = set()
    total = 0
    for g in iter_graphs(graph):
        for n in g.nodes:
            for t in list(n.inputs) + [v for v in n.attrs.values() if isinstance(v, gs.Constant)]:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    total += tensor_nbytes(t)
    return total


def unsupported_ops(model: Model) -> list[tuple[str, str, str]]:
    """Nodes whose op no schema or model-local function defines: ``[(node, op, domain)]``.

    Standard domains are checked against onnx's schemas at the model's opset; onnxruntime's own
    domains (``com.microsoft``) are left for onnxruntime to judge.
    """
    import onnx.defs

    local = {(f.domain or "", f.name) for f in model.graph.functions}
    versions = {(d.domain or ""): int(d.version) for d in (model.graph.import_domains or [])}
    bad = []
    for _, node in iter_nodes(model.graph):
        domain = node.domain or ""
        if domain == "ai.onnx":
            domain = ""
        if (domain, node.op) in local or domain in KNOWN_RUNTIME_DOMAINS:
            continue
        if domain in ("", "ai.onnx.ml", "ai.onnx.preview.training"):
            version = versions.get(domain, model.opset if domain == "" else 1)
            try:
                onnx.defs.get_schema(node.op, max_inclusive_version=version, domain=domain)
                continue
            except onnx.defs.SchemaError:
                pass
        bad.append((node.name or "<unnamed>", node.op, domain))
    return bad


def is_graph_io(tree: GraphTree, tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is an input or output of any graph in ``tree``."""
    return any(tensor is t for g in tree.graphs.values() for t in list(g.inputs) + list(g.outputs))


def replace_tensor(tree: GraphTree, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every reader of ``old`` read ``new`` instead; graph outputs keep their names.

    When ``old`` is a graph output, ``new`` takes over its name; that is impossible when ``new`` is a
    constant, a graph input or already a graph output, and then nothing changes.

    Returns:
        Whether the replacement was made.
    """
    if old is new:
        return False
    out_graphs = [g for g in tree.graphs.values() if any(o is old for o in g.outputs)]
    if out_graphs and (isinstance(new, gs.Constant) or not new.inputs or is_graph_io(tree, new)):
        return False
    for g in out_graphs:
        # A subgraph output can only take over a tensor computed inside that subgraph: renaming an
        # outer tensor would change the name every other reader sees.
        if g is not tree.root and tree.node_graph.get(id(new.inputs[0])) is not g:
            return False
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    if out_graphs:
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
        for g in out_graphs:
            g.outputs = [new if o is old else o for o in g.outputs]
    return True


def detach_node(node: gs.Node) -> None:
    """Disconnect ``node`` (inputs and outputs cleared); the next ``cleanup()`` drops it."""
    node.inputs.clear()
    node.outputs.clear()
