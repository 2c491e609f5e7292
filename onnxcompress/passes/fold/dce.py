"""Dead-code elimination and a stable topological order.

Nodes, constants and graph-internal tensors that no graph output depends on are removed (in every
subgraph too); the inferred shape annotations of intermediate tensors are dropped so the written
model carries no stale ``value_info`` (graph inputs and outputs keep theirs); nodes are put in a
topological order. Graph inputs are kept even when unused: they are the model's interface.
"""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from ...graph import Model, iter_graphs
from ..base import GraphSize, PassContext, PassReport


@dataclasses.dataclass(frozen=True)
class DeadCodeConfig:
    """Options for :class:`DeadCodePass`.

    Attributes:
        strip_value_info: Drop shape annotations of intermediate tensors.
    """

    strip_value_info: bool = True


class DeadCodePass:
    """Remove what no output needs; sort topologically (see module docstring)."""

    name = "dce"

    def __init__(self, config: DeadCodeConfig | None = None) -> None:
        self.config = config or DeadCodeConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Clean up every graph of ``model``."""
        report = PassReport(self.name)
        before = GraphSize.of(model)
        model.graph.cleanup(remove_unused_graph_inputs=False, remove_unused_node_outputs=False)
        model.graph.toposort(recurse_subgraphs=True)
        if self.config.strip_value_info:
            for g in iter_graphs(model.graph):
                io = {id(t) for t in list(g.inputs) + list(g.outputs)}
                for n in g.nodes:
                    for t in n.outputs:
                        if isinstance(t, gs.Variable) and id(t) not in io:
                            t.dtype, t.shape = None, None
        report.stats = before.stats(model)
        report.modified = report.stats["nodes_after"] != before.nodes or report.stats["bytes_after"] != before.bytes
        return report
