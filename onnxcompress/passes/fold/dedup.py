"""Deduplication: byte-identical constants shared, identical nodes computed once.

* ``DedupConstantsPass``: constants with the same dtype, shape and bytes (found by a CRC-32 of their
  bytes, after grouping by dtype/shape so most tensors are never read, and confirmed byte for byte:
  a CRC collision never merges different tensors) are replaced by one of them. The survivor is written in the lowest graph that encloses all its readers, so a weight
  duplicated in two ``If`` branches ends up once in the parent. Exact: the values are identical.
* ``CommonSubexpressionPass``: nodes of one graph with the same op, domain, attributes and the very
  same input tensors compute the same outputs (ONNX ops are pure, random ops excepted); the later
  ones are removed and their readers read the first one's outputs. Graph outputs keep their names.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import (
    GraphTree,
    Model,
    constant_value,
    detach_node,
    in_topological_order,
    iter_graphs,
    replace_tensor,
)
from ..base import GraphSize, PassContext, PassReport

NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Options for :class:`DedupConstantsPass` (none yet: the pass is exact)."""


class DedupConstantsPass:
    """Share byte-identical constants (see module docstring)."""

    name = "dedup-constants"

    def __init__(self, config: DedupConfig | None = None) -> None:
        self.config = config or DedupConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Merge identical constants across all graphs."""
        report = PassReport(self.name)
        before = GraphSize.of(model)
        tree = GraphTree(model.graph)
        outputs = {id(t) for g in tree.graphs.values() for t in g.outputs}
        consts: dict[int, gs.Constant] = {}
        for g in iter_graphs(model.graph):
            for n in g.nodes:
                for t in n.inputs:
                    if isinstance(t, gs.Constant) and id(t) not in outputs:
                        consts.setdefault(id(t), t)
        groups: dict[tuple[str, tuple[int, ...]], list[gs.Constant]] = {}
        for c in consts.values():
            values = c._values
            key = (str(values.dtype), tuple(int(d) for d in values.shape))
            groups.setdefault(key, []).append(c)
        merged = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            seen: dict[int, list[gs.Constant]] = {}
            for c in members:
                raw = _raw(c)  # one tensor in memory at a time (two on a CRC match)
                same = seen.setdefault(zlib.crc32(raw), [])
                keep = next((k for k in same if np.array_equal(_raw(k), raw)), None)
                if keep is None:
                    same.append(c)
                    continue
                for consumer in list(c.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is c:
                            consumer.inputs[i] = keep
                merged += 1
        if merged:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = merged > 0
        report.stats = before.stats(model, merged > 0, merged=merged)
        return report


class CommonSubexpressionPass:
    """Compute identical nodes once (see module docstring)."""

    name = "cse"

    def __init__(self, config: DedupConfig | None = None) -> None:
        self.config = config or DedupConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Merge identical nodes within each graph."""
        report = PassReport(self.name)
        before = GraphSize.of(model)
        tree = GraphTree(model.graph)
        merged = 0
        for g in iter_graphs(model.graph):
            if not in_topological_order(g):
                g.toposort(recurse_subgraphs=False)
            seen: dict[tuple[Any, ...], gs.Node] = {}
            for node in list(g.nodes):
                key = _node_key(node)
                if key is None:
                    continue
                first = seen.setdefault(key, node)
                if first is node:
                    continue
                if all(replace_tensor(tree, dup, keep) for dup, keep in zip(node.outputs, first.outputs)):
                    detach_node(node)
                    merged += 1
        if merged:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = merged > 0
        report.stats = before.stats(model, merged > 0, merged=merged)
        return report


def _raw(c: gs.Constant) -> np.ndarray:
    """The bytes of a constant's value as a flat uint8 array (read afresh, not cached)."""
    arr = np.ascontiguousarray(constant_value(c, cache=False))
    return arr.view(np.uint8).reshape(-1) if arr.size else np.zeros(0, np.uint8)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (gs.Graph, gs.Tensor)):
        raise TypeError
    if isinstance(value, type):
        return value.__name__
    return value


def _node_key(node: gs.Node) -> tuple[Any, ...] | None:
    if node.op in NONDETERMINISTIC or not node.outputs or any(t.is_empty() for t in node.outputs):
        return None
    try:
        attrs = tuple(sorted((k, _freeze(v)) for k, v in node.attrs.items()))
    except TypeError:
        return None
    return (
        node.op,
        node.domain or "",
        attrs,
        tuple(id(t) if not t.is_empty() else None for t in node.inputs),
        len(node.outputs),
    )
