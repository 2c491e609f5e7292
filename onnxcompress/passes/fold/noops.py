"""No-op elimination: remove nodes whose output equals one of their inputs, value for value.

Every rule below names the input ``x`` that the node's output ``y`` equals, element for element, with
the same dtype and shape; the node is then removed and its readers read ``x``. Rules, and why each
is exact:

* ``Identity``: ``y = x`` by definition.
* ``Dropout`` in inference: with no ``training_mode`` input (or a constant false one; opsets 7-11
  have no training mode, opsets 1-6 need ``is_test=1``) the spec defines ``y = x``. The ``mask``
  output must be absent or unused, since removing the node removes it.
* ``Cast`` to the dtype ``x`` already has (``CastLike`` to a tensor of the same dtype): converting a
  value to its own type returns it unchanged (``saturate`` only matters between types).
* ``Reshape`` when the target keeps every dimension: each entry of the constant shape copies ``x``'s
  dimension (``0`` without ``allowzero``), equals its static size, or is the single ``-1`` while
  every other dimension is static and non-zero (so it can only be inferred as ``x``'s own size); or
  when ``x`` and ``y`` have fully static, equal shapes. Reshape never reorders elements.
* ``Flatten`` of a rank-2 ``x`` at ``axis=1``: the output shape ``(d0, d1)`` is ``x``'s own; or fully
  static, equal shapes.
* ``Transpose`` with the identity ``perm`` (or no ``perm`` on rank <= 1, where reversing the axes
  changes nothing): ``y[i] = x[perm(i)] = x[i]``.
* ``Pad`` whose pads (the constant input, or the ``pads``/``paddings`` attribute below opset 11) are
  all zero: nothing is added or cropped, so the mode and the pad value never apply.
* ``Mul``/``Div`` by ones, ``Add``/``Sub`` of zeros (``x * 1``, ``1 * x``, ``x / 1``, ``x + 0``,
  ``0 + x``, ``x - 0``) with a constant ``c`` whose broadcast cannot grow ``x``: rank(c) <= rank(x)
  and each of ``c``'s dimensions, aligned from the right, is 1 or equals ``x``'s static size. Then
  ``y`` has ``x``'s shape; the dtype is the same because both inputs share the type ``T``. In IEEE
  arithmetic ``x * 1 = x / 1 = x`` and ``x - (+0) = x + (-0) = x`` exactly, NaN and infinities
  included. ``x + (+0)`` and ``x - (-0)`` are exact too except that ``-0`` becomes ``+0`` (equal
  values, but ``1 / y`` would tell them apart); like onnxsim and onnxscript these are removed unless
  ``EliminateNoOpsConfig.signed_zeros`` is set, which keeps them. The same for booleans:
  ``x and True = x``, ``x or False = x``.
* ``Expand`` to a constant shape that broadcasts into ``x``'s shape without growing it (the same
  condition as above): ``y = broadcast(x, shape)`` has ``x``'s shape, so it is ``x``.
* ``Concat`` of a single input and ``Split`` into a single output: the one piece is the whole.
* ``Slice`` that covers everything: constant ``steps`` of 1, ``starts`` that clamp to 0 (0, or
  ``<= -dim`` on a static dimension) and ``ends`` that clamp to the dimension (``>= dim`` on a static
  one, or INT64_MAX on any) on every sliced axis.
* ``Unsqueeze`` with an empty (constant) ``axes``: no dimension is inserted.
* ``Squeeze`` with no ``axes`` or an empty one removes *every* dimension of size 1 (onnxruntime's
  behaviour; onnx's shape inference treats an empty list as "none"), so it is a no-op only when
  ``x``'s shape is fully static with no dimension of size 1 (a symbolic one could be 1 at run time).

Rules that need a dtype or a shape read them from onnx shape inference (``shapes.infer_shapes``),
run at most once per pass and only when such a rule meets a computed tensor; the annotations it
writes are put back as they were, so the pass changes nothing but the nodes it removes. Shapes are
trusted as onnx infers them, like every simplifier does.

Rewiring uses ``graph.replace_tensor``: graph outputs keep their names, dtypes and shapes (the
surviving tensor takes the output's name and declared type), and a surviving tensor without a
shape annotation takes the removed output's (onnxruntime fuses differently without them: dropping
them moves tiny_transformer's outputs by 2e-6). A node stays, with a ``skipped`` entry, when its
removal would connect a graph input, a constant, an outer-scope value or another graph output
straight to a graph output: ONNX needs a node there (an ``Identity``), and a subgraph output renamed
into an outer scope would break the outer graph. Each graph's nodes are visited last first, so in a
topologically ordered graph consumers go before producers: a chain of no-ops into an output collapses
in one run, and a ``Dropout`` whose mask fed only removed nodes goes too; the pass is idempotent.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import (
    GraphTree,
    Model,
    constant_meta,
    constant_value,
    detach_node,
    is_graph_io,
    iter_graphs,
    replace_tensor,
)
from ...shapes import Shape, TensorFacts
from ..base import GraphSize, PassContext, PassReport

INT64_MAX = 2**63 - 1
_ONNX_DOMAINS = ("", "ai.onnx", None)


@dataclasses.dataclass(frozen=True)
class EliminateNoOpsConfig:
    """Options for :class:`EliminateNoOpsPass`.

    Attributes:
        signed_zeros: Keep ``x + 0`` and ``x - (-0)`` on floats, which turn ``-0`` into ``+0`` (the
            values compare equal; only sign-sensitive maths such as ``1 / y`` tells them apart).
        exclude: Node names to leave untouched.
    """

    signed_zeros: bool = False
    exclude: tuple[str, ...] = ()


def _is_static(shape: Shape | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _ints(value: np.ndarray | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        return None
    return [int(v) for v in arr.reshape(-1)]


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` if given (optional inputs may be missing or named "")."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _broadcast_keeps(small: Sequence[int], shape: Shape | None) -> bool:
    """Whether broadcasting a tensor of shape ``small`` against ``shape`` leaves ``shape`` unchanged."""
    if shape is None or len(small) > len(shape):
        return False
    for i in range(1, len(small) + 1):
        s, d = small[-i], shape[-i]
        if s != 1 and (d is None or s != d):
            return False
    return True


Rule = Callable[["_Rules", gs.Node], "int | str | None"]


class _Rules:
    """One method per op. Each returns the index of the input the output equals, a reason to keep
    the node worth reporting, or None when the node is not a no-op."""

    def __init__(self, facts: TensorFacts, opset: int, config: EliminateNoOpsConfig) -> None:
        self.facts = facts
        self.opset = opset
        self.config = config

    def identity(self, node: gs.Node) -> int | str | None:
        return 0

    def dropout(self, node: gs.Node) -> int | str | None:
        if self.opset < 7 and not int(node.attrs.get("is_test", 0)):
            return None
        mode = _present(node, 2)
        if mode is not None:
            value = constant_value(mode)
            if value is None:
                return "Dropout with a training_mode computed at run time kept"
            if np.asarray(value).any():
                return "Dropout in training mode kept"
        return 0  # the mask is checked when the node is removed: other removals may free it

    def cast(self, node: gs.Node) -> int | str | None:
        to = node.attrs.get("to")
        dtype = self.facts.dtype(node.inputs[0])
        return 0 if to is not None and dtype is not None and int(to) == dtype else None

    def cast_like(self, node: gs.Node) -> int | str | None:
        if len(node.inputs) < 2:
            return None
        a, b = self.facts.dtype(node.inputs[0]), self.facts.dtype(node.inputs[1])
        return 0 if a is not None and a == b else None

    def _static_same(self, node: gs.Node) -> bool:
        x = self.facts.shape(node.inputs[0])
        return _is_static(x) and x == self.facts.shape(node.outputs[0])

    def reshape(self, node: gs.Node) -> int | str | None:
        x = self.facts.shape(node.inputs[0])
        target = _ints(constant_value(node.inputs[1])) if len(node.inputs) > 1 else None
        if target is not None and x is not None and len(target) == len(x):
            allowzero = int(node.attrs.get("allowzero", 0))
            wild = []
            for i, (s, d) in enumerate(zip(target, x)):
                if (s == 0 and not allowzero) or (d is not None and s == d):
                    continue
                if s == -1:
                    wild.append(i)
                    continue
                break
            else:
                others = [d for i, d in enumerate(x) if i not in wild]
                if not wild or (len(wild) == 1 and all(d is not None and d > 0 for d in others)):
                    return 0
        return 0 if self._static_same(node) else None

    def flatten(self, node: gs.Node) -> int | str | None:
        x = self.facts.shape(node.inputs[0])
        axis = int(node.attrs.get("axis", 1))
        if x is not None and len(x) == 2 and axis in (1, -1):
            return 0
        return 0 if self._static_same(node) else None

    def transpose(self, node: gs.Node) -> int | str | None:
        perm = node.attrs.get("perm")
        if perm is not None:
            return 0 if list(perm) == list(range(len(perm))) else None
        x = self.facts.shape(node.inputs[0])
        return 0 if x is not None and len(x) <= 1 else None

    def pad(self, node: gs.Node) -> int | str | None:
        if self.opset < 11:
            pads = _ints(node.attrs.get("pads", node.attrs.get("paddings")))
        else:
            given = _present(node, 1)
            pads = _ints(constant_value(given)) if given is not None else None
        return 0 if pads is not None and not any(pads) else None

    def arithmetic(self, node: gs.Node) -> int | str | None:
        if len(node.inputs) != 2:
            return None
        op = node.op
        neutral = 1 if op in ("Mul", "Div", "And") else 0
        # (index of x, index of the constant): Mul, Add, And and Or commute; Sub and Div take it second.
        sides = [(0, 1), (1, 0)] if op in ("Mul", "Add", "And", "Or") else [(0, 1)]
        for xi, ci in sides:
            meta = constant_meta(node.inputs[ci])
            if meta is None:
                continue
            if not _broadcast_keeps(meta[0], self.facts.shape(node.inputs[xi])):
                continue
            value = np.asarray(constant_value(node.inputs[ci], cache=False))
            if not np.all(value == neutral):
                continue
            if neutral == 0 and self.config.signed_zeros and value.dtype.kind not in "iub":
                # x + (-0) and x - (+0) keep the sign of a zero x; x + (+0) and x - (-0) do not.
                negative = np.signbit(value.astype(np.float32))
                if not np.all(negative if op == "Add" else ~negative):
                    continue
            return xi
        return None

    def expand(self, node: gs.Node) -> int | str | None:
        target = _ints(constant_value(node.inputs[1])) if len(node.inputs) > 1 else None
        if target is None:
            return None
        return 0 if _broadcast_keeps(target, self.facts.shape(node.inputs[0])) else None

    def concat(self, node: gs.Node) -> int | str | None:
        return 0 if len(node.inputs) == 1 else None

    def split(self, node: gs.Node) -> int | str | None:
        return 0 if len(node.outputs) == 1 else None

    def slice(self, node: gs.Node) -> int | str | None:
        if self.opset < 10:
            starts, ends = _ints(node.attrs.get("starts")), _ints(node.attrs.get("ends"))
            axes, steps = _ints(node.attrs.get("axes")), None
            if "axes" in node.attrs and axes is None:
                return None
        else:
            if len(node.inputs) < 3:
                return None
            starts, ends = _ints(constant_value(node.inputs[1])), _ints(constant_value(node.inputs[2]))
            axes_t, steps_t = _present(node, 3), _present(node, 4)
            axes = _ints(constant_value(axes_t)) if axes_t is not None else None
            steps = _ints(constant_value(steps_t)) if steps_t is not None else None
            if (axes_t is not None and axes is None) or (steps_t is not None and steps is None):
                return None
        if starts is None or ends is None or len(starts) != len(ends):
            return None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        if len(axes) != len(starts) or len(steps) != len(starts) or any(s != 1 for s in steps):
            return None
        x: Shape | None = None
        for axis, start, end in zip(axes, starts, ends):
            if start == 0 and end >= INT64_MAX:
                if axis >= 0:
                    continue  # covers any dimension: no shape needed
            if x is None:
                x = self.facts.shape(node.inputs[0])
                if x is None:
                    return None
            if not -len(x) <= axis < len(x):
                return None
            dim = x[axis]
            start_ok = start == 0 or (dim is not None and start <= -dim)
            end_ok = end >= INT64_MAX or (dim is not None and end >= dim)
            if not (start_ok and end_ok):
                return None
        return 0

    def _axes(self, node: gs.Node) -> list[int] | str | None:
        """The constant axes of (Un)Squeeze: a list, "absent", or None when computed at run time."""
        if self.opset < 13:
            return _ints(node.attrs["axes"]) if "axes" in node.attrs else "absent"
        given = _present(node, 1)
        if given is None:
            return "absent"
        return _ints(constant_value(given))

    def squeeze(self, node: gs.Node) -> int | str | None:
        axes = self._axes(node)
        if axes is None or (isinstance(axes, list) and axes):
            return None
        x = self.facts.shape(node.inputs[0])
        # No axes (or empty ones): every size-1 dimension goes, so only a static shape without 1s stays.
        return 0 if _is_static(x) and 1 not in x else None  # type: ignore[operator]

    def unsqueeze(self, node: gs.Node) -> int | str | None:
        axes = self._axes(node)
        return 0 if isinstance(axes, list) and not axes else None


RULES: dict[str, Rule] = {
    "Identity": _Rules.identity,
    "Dropout": _Rules.dropout,
    "Cast": _Rules.cast,
    "CastLike": _Rules.cast_like,
    "Reshape": _Rules.reshape,
    "Flatten": _Rules.flatten,
    "Transpose": _Rules.transpose,
    "Pad": _Rules.pad,
    "Mul": _Rules.arithmetic,
    "Div": _Rules.arithmetic,
    "Add": _Rules.arithmetic,
    "Sub": _Rules.arithmetic,
    "And": _Rules.arithmetic,
    "Or": _Rules.arithmetic,
    "Expand": _Rules.expand,
    "Concat": _Rules.concat,
    "Split": _Rules.split,
    "Slice": _Rules.slice,
    "Squeeze": _Rules.squeeze,
    "Unsqueeze": _Rules.unsqueeze,
}


def _mask_in_use(tree: GraphTree, node: gs.Node) -> bool:
    """Whether a Dropout's ``mask`` output is read by a node or is a graph output."""
    if len(node.outputs) < 2 or not node.outputs[1].name:
        return False
    mask = node.outputs[1]
    return bool(mask.outputs) or is_graph_io(tree, mask)


def _bypass(tree: GraphTree, graph: gs.Graph, node: gs.Node, source: gs.Tensor) -> str | None:
    """Make the readers of ``node``'s output read ``source``; a reason if that cannot be done."""
    out = node.outputs[0]
    owners = [g for g in tree.graphs.values() if any(o is out for o in g.outputs)]
    if owners:
        op = node.op
        if any(g is not graph for g in owners):
            return f"{op} output returned by another graph kept"
        if isinstance(source, gs.Constant):
            return f"{op} between a constant and graph output kept"
        if any(t is source for t in graph.inputs):
            return f"{op} between graph input and graph output kept"
        if not source.inputs or tree.node_graph.get(id(source.inputs[0])) is not graph:
            return f"{op} between an outer-scope value and a subgraph output kept"
        if is_graph_io(tree, source):
            return f"{op} between two graph outputs kept"
        dtype, shape = out.dtype, out.shape
        if not replace_tensor(tree, out, source):
            return f"{op} feeding a graph output kept"
        source.dtype, source.shape = dtype, shape  # the graph output keeps its declared type
        return None
    replace_tensor(tree, out, source)
    if isinstance(source, gs.Variable) and source.inputs:
        # Keep the file's annotation of the value (onnxruntime fuses more with shapes known); graph
        # inputs keep their declaration.
        if source.dtype is None:
            source.dtype = out.dtype
        if source.shape is None:
            source.shape = out.shape
    return None


class EliminateNoOpsPass:
    """Remove nodes that compute their input unchanged (see module docstring)."""

    name = "eliminate-noops"

    def __init__(self, config: EliminateNoOpsConfig | None = None) -> None:
        self.config = config or EliminateNoOpsConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Remove no-op nodes in every graph of ``model``, subgraphs included."""
        report = PassReport(self.name)
        before = GraphSize.of(model)
        facts = TensorFacts(model)
        found = self._find(model, facts, report)
        for warning in facts.warnings:
            report.skipped.append(("shape inference", warning))
        removed: Counter[str] = Counter()
        if found:
            tree = GraphTree(model.graph)
            held = self._remove(tree, found, removed, report)
            if removed:
                model.graph.cleanup(remove_unused_graph_inputs=False)
                if held:
                    # A mask read only by dead nodes is free after the cleanup (rare): one more sweep
                    # keeps the pass idempotent.
                    still = self._remove(tree, held, removed, report)
                    if len(still) < len(held):
                        model.graph.cleanup(remove_unused_graph_inputs=False)
                    held = still
            for node, _ in held.values():
                report.skipped.append((node.name or node.op, "Dropout whose mask output is used kept"))
        report.modified = bool(removed)
        report.stats = before.stats(
            model, bool(removed), nodes_removed=sum(removed.values()), removed=dict(sorted(removed.items()))
        )
        return report

    def _find(self, model: Model, facts: TensorFacts, report: PassReport) -> dict[int, tuple[gs.Node, int]]:
        """Every no-op node: ``{id(node): (node, index of the input it passes on)}``; nothing is changed."""
        rules = _Rules(facts, model.opset, self.config)
        found: dict[int, tuple[gs.Node, int]] = {}
        for g in iter_graphs(model.graph):
            for node in g.nodes:
                rule = RULES.get(node.op)
                if rule is None or node.domain not in _ONNX_DOMAINS or not node.inputs or not node.outputs:
                    continue
                if node.name and node.name in self.config.exclude:
                    continue
                verdict = rule(rules, node)
                if isinstance(verdict, str):
                    report.skipped.append((node.name or node.op, verdict))
                elif verdict is not None:
                    found[id(node)] = (node, verdict)
        return found

    @staticmethod
    def _remove(
        tree: GraphTree, found: dict[int, tuple[gs.Node, int]], removed: Counter[str], report: PassReport
    ) -> dict[int, tuple[gs.Node, int]]:
        """Bypass and detach the found nodes, each graph's last node first (consumers before producers).

        Returns:
            The Dropouts kept because their mask is read, in the form of ``found``.
        """
        held: dict[int, tuple[gs.Node, int]] = {}
        for g in tree.graphs.values():
            for node in reversed(list(g.nodes)):
                if id(node) not in found:
                    continue
                if node.op == "Dropout" and _mask_in_use(tree, node):
                    held[id(node)] = found[id(node)]
                    continue
                reason = _bypass(tree, g, node, node.inputs[found[id(node)][1]])
                if reason is not None:
                    report.skipped.append((node.name or node.op, reason))
                    continue
                detach_node(node)
                removed[node.op] += 1
        return held
