"""Dead-code elimination and a stable topological order.

Nodes, constants and graph-internal tensors that no graph output depends on are removed (in every
subgraph too); nodes are put in a topological order. Shape annotations are kept: the lossless passes
never change the value of a surviving tensor, so its annotated dtype and shape stay true, and the
exporter's symbolic names (``batch``, ``sequence``) are what onnxruntime's fusions match on
(``strip_value_info`` drops them). ``AnnotateShapesPass`` fills in the tensors that fold created. Graph inputs are kept even when unused: they are the model's interface.
"""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from ...graph import Model, iter_graphs
from ...shapes import infer_shapes
from ..base import GraphSize, PassContext, PassReport


@dataclasses.dataclass(frozen=True)
class DeadCodeConfig:
    """Options for :class:`DeadCodePass`.

    Attributes:
        strip_value_info: Drop shape annotations of intermediate tensors.
    """

    strip_value_info: bool = False


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


class AnnotateShapesPass:
    """Re-run shape inference so every intermediate tensor carries its dtype and shape again.

    Dead-code elimination drops stale annotations; runtimes need fresh ones: onnxruntime's
    fusions (``SkipLayerNormalization``, attention) only match where shapes are known, so a
    simplified model without them would run *slower* than its source. Failures only warn.
    """

    name = "annotate-shapes"

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Annotate ``model`` in place (the graph's structure is unchanged)."""
        report = PassReport(self.name)
        for warning in infer_shapes(model):
            report.skipped.append(("*", warning))
        return report
