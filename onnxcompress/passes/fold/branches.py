"""Inline an ``If`` whose condition is a constant: the taken branch replaces the node.

The branch's nodes move into the graph that holds the ``If`` (tensor names that would collide with a
name anywhere in the model are renamed first), and every reader of the ``If``'s i-th output reads the
branch's i-th output instead; when that output is a graph output its name is kept (an ``Identity``
is inserted where the branch output is an outer value or a constant, which cannot take the name).
Exact: the inlined graph computes what the ``If`` computed for that condition, which can never change.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import (
    GraphTree,
    Model,
    all_tensor_names,
    constant_value,
    detach_node,
    fresh_name,
    iter_graphs,
    replace_tensor,
)
from ..base import GraphSize, PassContext, PassReport


@dataclasses.dataclass(frozen=True)
class FoldIfConfig:
    """Options for :class:`FoldIfPass` (none: the rewrite is exact)."""


class FoldIfPass:
    """Replace constant-condition ``If`` nodes by their taken branch (see module docstring)."""

    name = "fold-if"

    def __init__(self, config: FoldIfConfig | None = None) -> None:
        self.config = config or FoldIfConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Inline every ``If`` with a constant condition, outermost first."""
        report = PassReport(self.name)
        before = GraphSize.of(model)
        inlined = 0
        while True:
            target = self._find(model)
            if target is None:
                break
            graph, node, taken = target
            if not self._inline(model, graph, node, taken):
                report.skipped.append((node.name or "If", "branch output count does not match the If node"))
                break
            inlined += 1
        if inlined:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = inlined > 0
        report.stats = before.stats(model, inlined > 0, inlined=inlined)
        return report

    @staticmethod
    def _find(model: Model) -> tuple[gs.Graph, gs.Node, gs.Graph] | None:
        for g in iter_graphs(model.graph):
            for node in g.nodes:
                if node.op != "If" or node.domain not in ("", "ai.onnx", None) or not node.inputs:
                    continue
                cond = constant_value(node.inputs[0])
                if cond is None or np.asarray(cond).size != 1:
                    continue
                branch = node.attrs.get("then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")
                if isinstance(branch, gs.Graph):
                    return g, node, branch
        return None

    @staticmethod
    def _inline(model: Model, graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> bool:
        if len(branch.outputs) != len(node.outputs):
            return False
        names = all_tensor_names(model.graph) - set(branch.tensors().keys())
        local = {id(t) for n in branch.nodes for t in n.outputs}
        for n in branch.nodes:
            for t in n.outputs:
                if t.name in names:
                    t.name = fresh_name(names, t.name)
                else:
                    names.add(t.name)
        for n in branch.nodes:
            n.name = fresh_name(names, n.name) if n.name else n.name
        graph.nodes.extend(branch.nodes)
        outs = list(zip(node.outputs, branch.outputs))
        detach_node(node)
        node.attrs.clear()  # the dead If must not count as holding the branch any more
        branch.nodes = []
        for if_out, _ in outs:
            for consumer in [c for c in if_out.outputs if c.op == "Range"]:
                # Range reads one element of each input. Inside an If body a [1]-shaped value runs
                # (shape inference does not see its shape there); inlined, onnxruntime's load-time
                # inference sees [1] and refuses the model. A Reshape to [] for the Range alone keeps
                # the value (found by the onnx backend case test_affine_grid_2d_expanded).
                scalar = gs.Variable(fresh_name(names, f"{if_out.name}_scalar"), dtype=if_out.dtype, shape=[])
                target = gs.Constant(fresh_name(names, f"{if_out.name}_scalar_shape"), np.zeros(0, dtype=np.int64))
                graph.nodes.append(
                    gs.Node(
                        "Reshape",
                        name=fresh_name(names, f"{if_out.name}_Reshape"),
                        inputs=[if_out, target],
                        outputs=[scalar],
                    )
                )
                for i, t in enumerate(consumer.inputs):
                    if t is if_out:
                        consumer.inputs[i] = scalar
        tree = GraphTree(model.graph)
        for if_out, b_out in outs:
            if id(b_out) in local and replace_tensor(tree, if_out, b_out):
                continue
            # The branch returns an outer value or a constant: keep the If output's name via Identity.
            graph.nodes.append(
                gs.Node("Identity", name=fresh_name(names, f"{if_out.name}_Identity"), inputs=[b_out], outputs=[if_out])
            )
        return True
