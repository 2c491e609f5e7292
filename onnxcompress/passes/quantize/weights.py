"""Weight-only int8: store the weights of Conv/ConvTranspose/Gemm/MatMul as int8 + scales.

Each float32 weight ``W`` (an initializer or a ``Constant`` node output, in the main graph or any
subgraph) becomes ``q`` (int8) feeding ``DequantizeLinear(q, s, 0)``; the dequantized tensor keeps
the weight's name, so every consumer reads ``W' = q * s``. Scales are symmetric (see ``_math``):
per output channel by default, ``|W - W'| <= s_c / 2`` element-wise.

Output-channel axis per consumer: Conv ``[O, I/g, kh, kw]`` -> 0; ConvTranspose ``[I, O/g, ...]``
-> 1; Gemm ``B`` -> 1 (0 when ``transB=1``); MatMul ``B [.., K, N]`` -> rank-1; a constant MatMul
``A [.., M, K]`` -> rank-2. A weight read by consumers that disagree on the axis is quantized
per tensor.

Embedding tables (the constant ``data`` of a ``Gather`` on axis 0) get one scale per row and are
gathered *before* dequantizing: ``Cast(Gather(q, ids), float) * Gather(s[V, 1], ids)``, the same
values as gathering from ``W'``, without dequantizing the whole table at every run.

Per-axis ``DequantizeLinear`` needs opset 13. On older opsets (Paddle2ONNX exports use 11/12) the
same arithmetic is written as ``Cast(q, float) * s`` with ``s`` shaped to broadcast, which every
opset runs. Biases, float16/float64 weights, non-finite weights and tensors with fewer than
``min_elements`` values stay float, each skip recorded with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import (
    GraphTree,
    Model,
    all_tensor_names,
    constant_meta,
    constant_value,
    count_nodes,
    fresh_name,
    iter_nodes,
)
from ..base import PassContext, PassReport
from ._math import quantize_symmetric, symmetric_scales

QMAX = 127
TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@dataclasses.dataclass(frozen=True)
class Int8WeightsConfig:
    """Options for :class:`Int8WeightsPass`.

    Attributes:
        per_channel: One scale per output channel (default) or one per tensor.
        min_elements: Weights with fewer values stay float.
        op_types: Which consumer ops have their weights quantized.
        exclude: Tensor or node names to leave untouched.
    """

    per_channel: bool = True
    min_elements: int = 256
    op_types: tuple[str, ...] = TARGET_OPS
    exclude: tuple[str, ...] = ()


def _weight_slots(node: gs.Node) -> list[tuple[int, int | None]]:
    """``[(input index, output-channel axis)]`` of the weight inputs of a target node."""
    op = node.op
    if op == "Conv" and len(node.inputs) > 1:
        return [(1, 0)]
    if op == "ConvTranspose" and len(node.inputs) > 1:
        return [(1, 1)]
    if op == "Gemm" and len(node.inputs) > 1:
        return [(1, 0 if node.attrs.get("transB", 0) else 1)]
    if op == "MatMul" and len(node.inputs) == 2:
        return [(1, -1), (0, -2)]
    if op == "Gather" and len(node.inputs) == 2 and int(node.attrs.get("axis", 0)) == 0:
        return [(0, 0)]
    return []


def constant_bytes(model: Model) -> int:
    """Bytes of all constants in the model (subgraphs included), without loading lazy values."""
    from ...graph import iter_graphs, tensor_nbytes

    seen: set[int] = set()
    total = 0
    for g in iter_graphs(model.graph):
        for n in g.nodes:
            tensors = list(n.inputs) + [v for v in n.attrs.values() if isinstance(v, gs.Constant)]
            for t in tensors:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    total += tensor_nbytes(t)
    return total


class Int8WeightsPass:
    """Weight-only symmetric int8 quantization (see module docstring)."""

    name = "int8-weights"

    def __init__(self, config: Int8WeightsConfig | None = None) -> None:
        self.config = config or Int8WeightsConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Quantize the weights of the target ops in every graph of ``model``."""
        cfg = self.config
        report = PassReport(self.name)
        nodes_before, bytes_before = count_nodes(model.graph), constant_bytes(model)
        # Collect weights and the axis each consumer wants.
        weights: dict[int, tuple[gs.Tensor, list[int | None]]] = {}
        for _, node in iter_nodes(model.graph):
            if node.op not in cfg.op_types or node.domain not in ("", "ai.onnx", None):
                continue
            if node.name in cfg.exclude:
                report.skipped.append((node.name, "excluded by configuration"))
                continue
            slots = _weight_slots(node)
            found = False
            for idx, axis in slots:
                t = node.inputs[idx]
                meta = constant_meta(t)
                if meta is None:
                    continue
                if node.op == "MatMul" and idx == 0 and constant_meta(node.inputs[1]) is not None:
                    continue  # both constant: leave to constant folding
                found = True
                shape, _ = meta
                ax = axis % len(shape) if len(shape) >= (2 if axis < 0 else 1) else None
                entry = weights.setdefault(id(t), (t, []))
                entry[1].append(ax)
            if not found and slots:
                report.skipped.append((node.name or node.op, "no constant weight input (computed at run time)"))

        if not weights:
            report.stats = {
                "nodes_before": nodes_before,
                "nodes_after": nodes_before,
                "bytes_before": bytes_before,
                "bytes_after": bytes_before,
                "tensors_changed": 0,
            }
            return report

        tree = GraphTree(model.graph)
        names = all_tensor_names(model.graph)
        opset = model.opset
        changed = 0
        forms: dict[str, int] = {}
        for t, axes in weights.values():
            reason = self._skip_reason(t, cfg, opset)
            if reason:
                report.skipped.append((t.name, reason))
                continue
            w = constant_value(t, cache=False)  # read one weight at a time; never keep the float copy
            assert w is not None
            if not np.all(np.isfinite(w)):
                report.skipped.append((t.name, "weight has non-finite values"))
                continue
            axis = axes[0] if cfg.per_channel and all(a == axes[0] for a in axes) else None
            new_name, form = self._replace(t, w, axis, tree, names, opset)
            forms[form] = forms.get(form, 0) + 1
            report.tensor_map[new_name] = t.name
            changed += 1
            del w
        model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = changed > 0
        report.stats = {
            "nodes_before": nodes_before,
            "nodes_after": count_nodes(model.graph),
            "bytes_before": bytes_before,
            "bytes_after": constant_bytes(model),
            "tensors_changed": changed,
            "forms": forms,
        }
        return report

    @staticmethod
    def _skip_reason(t: gs.Tensor, cfg: Int8WeightsConfig, opset: int) -> str | None:
        if t.name in cfg.exclude:
            return "excluded by configuration"
        meta = constant_meta(t)
        assert meta is not None
        shape, dtype = meta
        if dtype != np.float32:
            return f"dtype {dtype} (only float32 weights are quantized)"
        size = int(np.prod(shape)) if shape else 1
        if size < cfg.min_elements:
            return f"too small ({size} elements < {cfg.min_elements})"
        if opset < 10:
            return f"opset {opset} < 10 has no DequantizeLinear"
        return None

    def _replace(
        self,
        t: gs.Tensor,
        w: np.ndarray,
        axis: int | None,
        tree: GraphTree,
        names: set[str],
        opset: int,
    ) -> tuple[str, str]:
        """Insert the int8 weight and its dequantization; rewire every consumer.

        Returns:
            The name of the dequantized tensor and the form used (``dequantize``, ``cast-mul`` or
            ``gather``).
        """
        owner = tree.owner_of_users(t)
        scale = symmetric_scales(w, axis, QMAX)
        q = quantize_symmetric(w, scale, axis, QMAX, np.int8)
        base = t.name
        q_const = gs.Constant(fresh_name(names, f"{base}_quantized"), q)
        consumers = list(t.outputs)
        if axis == 0 and w.ndim >= 2 and consumers and all(_is_table_gather(c, t) for c in consumers):
            s_const = gs.Constant(fresh_name(names, f"{base}_scale"), scale.reshape([-1] + [1] * (w.ndim - 1)))
            for c in consumers:
                self._gather_then_dequantize(c, q_const, s_const, tree, names)
            return q_const.name, "gather"
        out = gs.Variable(fresh_name(names, f"{base}_dequantized"), dtype=np.float32, shape=list(w.shape))
        if axis is None or opset >= 13:
            s_const = gs.Constant(fresh_name(names, f"{base}_scale"), scale.reshape(()) if axis is None else scale)
            zp = np.zeros(scale.shape if axis is not None else (), dtype=np.int8)
            zp_const = gs.Constant(fresh_name(names, f"{base}_zero_point"), zp)
            attrs: dict[str, Any] = {} if axis is None else {"axis": int(axis)}
            node = gs.Node(
                "DequantizeLinear",
                name=fresh_name(names, f"{base}_DequantizeLinear"),
                attrs=attrs,
                inputs=[q_const, s_const, zp_const],
                outputs=[out],
            )
            nodes = [node]
            form = "dequantize"
        else:
            bshape = [-1 if i == axis else 1 for i in range(w.ndim)]
            s_const = gs.Constant(fresh_name(names, f"{base}_scale"), scale.reshape(bshape))
            cast_out = gs.Variable(fresh_name(names, f"{base}_cast"), dtype=np.float32, shape=list(w.shape))
            cast = gs.Node(
                "Cast", name=fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[q_const], outputs=[cast_out]
            )
            mul = gs.Node("Mul", name=fresh_name(names, f"{base}_Mul"), inputs=[cast_out, s_const], outputs=[out])
            nodes = [cast, mul]
            form = "cast-mul"
        for consumer in list(t.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is t:
                    consumer.inputs[i] = out
        owner.nodes.extend(nodes)
        return out.name, form

    @staticmethod
    def _gather_then_dequantize(
        gather: gs.Node, q: gs.Constant, s: gs.Constant, tree: GraphTree, names: set[str]
    ) -> None:
        """Rewrite ``Gather(W, ids)`` as ``Cast(Gather(q, ids)) * Gather(s, ids)``."""
        graph = tree.node_graph[id(gather)]
        ids, out = gather.inputs[1], gather.outputs[0]
        base = gather.name or out.name
        gq = gs.Variable(fresh_name(names, f"{base}_q"), dtype=np.int8)
        gs_out = gs.Variable(fresh_name(names, f"{base}_row_scale"), dtype=np.float32)
        cast_out = gs.Variable(fresh_name(names, f"{base}_rows"), dtype=np.float32)
        gather.inputs[0] = q
        gather.outputs[0] = gq
        graph.nodes.extend(
            [
                gs.Node(
                    "Gather",
                    name=fresh_name(names, f"{base}_scale_Gather"),
                    attrs={"axis": 0},
                    inputs=[s, ids],
                    outputs=[gs_out],
                ),
                gs.Node(
                    "Cast", name=fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[gq], outputs=[cast_out]
                ),
                gs.Node("Mul", name=fresh_name(names, f"{base}_Mul"), inputs=[cast_out, gs_out], outputs=[out]),
            ]
        )


def _is_table_gather(node: gs.Node, table: gs.Tensor) -> bool:
    return (
        node.op == "Gather"
        and node.domain in ("", "ai.onnx", None)
        and node.inputs[0] is table
        and table not in node.inputs[1:]
        and int(node.attrs.get("axis", 0)) == 0
    )
