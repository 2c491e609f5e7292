"""Dynamic int8: integer MatMul kernels with activations quantized at run time.

Every ``MatMul`` (and ``Gemm`` with ``alpha=1``, ``transA=0``) whose second input is a constant
float32 matrix ``W [K, N]`` and whose first input is computed at run time becomes (target
``standard``, standard ONNX at opset >= 11)::

    a_q, a_s, a_zp = DynamicQuantizeLinear(A)          # uint8, per tensor, once per activation
    y = Cast(MatMulInteger(a_q, W_q, a_zp), float)     # int8 weights, one scale per column
    Y = y * (a_s * w_s)                                # (+ C for Gemm)

onnxruntime fuses this into its ``DynamicQuantizeMatMul`` kernel (u8 x s8, VNNI where the CPU has
it). With ``--target onnxruntime`` the contrib op is written directly. Weights are symmetric int8
per output column (``|W - W'| <= w_s / 2``); an activation read by several MatMuls (the Q, K and V
projections) is quantized once.

Left in float on purpose:

* MatMuls whose two inputs are both computed at run time (attention scores ``Q K^T``, ``P V``):
  quantizing both sides costs more accuracy than it saves time at typical sequence lengths
  (``--param attention=true`` quantizes them too, both sides per tensor).
* Convolutions: ``ConvInteger`` with dynamic activations is several times *slower* than float
  convolution in onnxruntime. Their weights are stored int8 per channel and dequantized when the
  model is loaded (as ``int8-weights``), so a CNN shrinks without slowing down
  (``--param conv=float`` leaves them as they are).

Embedding tables (``Gather`` on axis 0) are stored int8 with one scale per row and gathered before
dequantizing (see ``weights.py``), so the float table is never materialised.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import Model, all_tensor_names, constant_meta, constant_value, fresh_name, iter_graphs
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ._common import refuse_quantized
from ._math import quantize_symmetric, symmetric_scales
from .weights import Int8WeightsConfig, Int8WeightsPass

QMAX = 127
MIN_OPSET = 11  # DynamicQuantizeLinear


@dataclasses.dataclass(frozen=True)
class Int8DynamicConfig:
    """Options for :class:`Int8DynamicPass` (see the module docstring).

    Attributes:
        min_elements: Weights with fewer values stay float.
        attention: Also quantize MatMuls with two run-time inputs.
        conv: ``weights`` (int8 storage, float compute) or ``float`` (untouched).
        embeddings: Quantize Gather tables (int8 rows).
    """

    min_elements: int = 4096
    activations: str = "tensor"
    attention: bool = False
    conv: str = "weights"
    embeddings: bool = True


def int8_dynamic_config(params: Params) -> Int8DynamicConfig:
    """The config from ``--param`` settings."""
    return Int8DynamicConfig(
        min_elements=params.get_int("min_elements", Int8DynamicConfig.min_elements),
        activations=params.get_str("activations", "tensor", ("tensor", "row")),
        attention=params.get_bool("attention", False),
        conv=params.get_str("conv", "weights", ("weights", "float")),
        embeddings=params.get_bool("embeddings", True),
    )


@dataclasses.dataclass
class _Weight:
    q: gs.Constant
    scale: gs.Constant  # float32 [N]


class Int8DynamicPass:
    """Dynamic int8 MatMul/Gemm quantization (see module docstring)."""

    name = "int8-dynamic"

    def __init__(self, config: Int8DynamicConfig | None = None) -> None:
        self.config = config or Int8DynamicConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Quantize every eligible MatMul/Gemm of every graph, then Gather tables and Conv weights."""
        refuse_quantized(model, self.name)
        cfg = self.config
        self._opset = model.opset
        report = PassReport(self.name)
        before = GraphSize.of(model)
        ops: dict[str, int] = {}
        layers: list[dict[str, object]] = []
        if model.opset < MIN_OPSET:
            report.skipped.append(("*", f"opset {model.opset} < {MIN_OPSET}: no DynamicQuantizeLinear"))
        else:
            names = all_tensor_names(model.graph)
            weights: dict[int, _Weight] = {}
            for graph in list(iter_graphs(model.graph)):
                quantized_acts: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]] = {}
                for node in list(graph.nodes):
                    reason = self._eligible(node, ctx)
                    if reason == "":
                        continue
                    if reason:
                        report.skipped.append((node.name or node.op, reason))
                        continue
                    self._rewrite(node, graph, names, weights, quantized_acts, ctx, layers, report)
                    ops[node.op] = ops.get(node.op, 0) + 1
            if ops:
                model.graph.cleanup(remove_unused_graph_inputs=False)
        extra_ops = (["Gather"] if cfg.embeddings else []) + (
            ["Conv", "ConvTranspose"] if cfg.conv == "weights" else []
        )
        if extra_ops:
            sub = Int8WeightsPass(
                Int8WeightsConfig(
                    granularity="channel", op_types=tuple(extra_ops), min_elements=min(256, cfg.min_elements)
                )
            )
            sub_report = sub.run(model, ctx, check_quantized=False)
            report.skipped += [
                (n, r) for n, r in sub_report.skipped if r != "no constant weight input (computed at run time)"
            ]
            report.tensor_map.update(sub_report.tensor_map)
            if sub_report.modified:
                ops["weights-only"] = sub_report.stats.get("tensors_changed", 0)
        report.modified = bool(ops)
        nonstandard = (
            ["DynamicQuantizeMatMul"]
            if ctx.target == "onnxruntime" and ops.get("MatMul", 0) + ops.get("Gemm", 0)
            else []
        )
        report.stats = before.stats(
            model, report.modified, nodes_quantized=ops, layers=layers, nonstandard_ops=nonstandard
        )
        return report

    def _eligible(self, node: gs.Node, ctx: PassContext) -> str | None:
        """``None`` if ``node`` is to be quantized, ``""`` to ignore it silently, else the skip reason."""
        if node.op not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx", None):
            return ""
        if is_excluded(node.name, node.op, ctx.exclude):
            return "excluded (--exclude)"
        if len(node.inputs) < 2:
            return ""
        a, b = node.inputs[0], node.inputs[1]
        meta_b, meta_a = constant_meta(b), constant_meta(a)
        if meta_a is not None:
            return "" if meta_b is not None else "constant first input (left to int8-weights)"
        if meta_b is None:
            return None if self.config.attention and node.op == "MatMul" else "two run-time inputs (attention-style)"
        shape, dtype = meta_b
        if dtype != np.float32:
            return f"weight dtype {dtype} (only float32 is quantized)"
        if len(shape) != 2:
            return f"weight of rank {len(shape)} (only 2-D weights use MatMulInteger)"
        if int(np.prod(shape)) < self.config.min_elements:
            return f"too small ({int(np.prod(shape))} elements < {self.config.min_elements})"
        if node.op == "Gemm":
            if float(node.attrs.get("alpha", 1.0)) != 1.0 or int(node.attrs.get("transA", 0)):
                return "Gemm with alpha != 1 or transA"
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                if float(node.attrs.get("beta", 1.0)) != 1.0:
                    return "Gemm with beta != 1"
        return None

    def _weight(self, node: gs.Node, names: set[str], weights: dict[int, _Weight]) -> _Weight:
        b = node.inputs[1]
        trans = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        key = id(b) * 2 + int(bool(trans))
        if key not in weights:
            w = constant_value(b, cache=False)
            assert w is not None
            if trans:
                w = np.ascontiguousarray(w.T)
            scale = symmetric_scales(w, 1, QMAX)
            q = quantize_symmetric(w, scale, 1, QMAX, np.int8)
            weights[key] = _Weight(
                gs.Constant(fresh_name(names, f"{b.name}_quantized"), q),
                gs.Constant(fresh_name(names, f"{b.name}_scale"), scale),
            )
        return weights[key]

    def _rewrite(
        self,
        node: gs.Node,
        graph: gs.Graph,
        names: set[str],
        weights: dict[int, _Weight],
        quantized_acts: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        ctx: PassContext,
        layers: list[dict[str, object]],
        report: PassReport,
    ) -> None:
        base = node.name or node.outputs[0].name
        out = node.outputs[0]
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        a = node.inputs[0]
        new_nodes: list[gs.Node] = []
        if constant_meta(node.inputs[1]) is None:  # attention-style: both sides per tensor
            qa = self._quantize_activation(a, graph, names, quantized_acts, new_nodes)
            qb = self._quantize_activation(node.inputs[1], graph, names, quantized_acts, new_nodes)
            y_i = gs.Variable(fresh_name(names, f"{base}_int32"), dtype=np.int32)
            y_f = gs.Variable(fresh_name(names, f"{base}_float"), dtype=np.float32)
            s = gs.Variable(fresh_name(names, f"{base}_scales"), dtype=np.float32)
            new_nodes += [
                gs.Node(
                    "MatMulInteger",
                    fresh_name(names, f"{base}_MatMulInteger"),
                    inputs=[qa[0], qb[0], qa[2], qb[2]],
                    outputs=[y_i],
                ),
                gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[y_i], outputs=[y_f]),
                gs.Node("Mul", fresh_name(names, f"{base}_scale_Mul"), inputs=[qa[1], qb[1]], outputs=[s]),
                gs.Node("Mul", fresh_name(names, f"{base}_Mul"), inputs=[y_f, s], outputs=[out]),
            ]
            layers.append({"node": node.name, "op": node.op, "scheme": "dynamic-both-per-tensor"})
        else:
            wq = self._weight(node, names, weights)
            bytes_before = int(np.prod(wq.q.values.shape)) * 4
            matmul_out = out if bias is None else gs.Variable(fresh_name(names, f"{base}_nobias"), dtype=np.float32)
            if ctx.target == "onnxruntime":
                new_nodes.append(
                    gs.Node(
                        "DynamicQuantizeMatMul",
                        fresh_name(names, f"{base}_DynamicQuantizeMatMul"),
                        domain="com.microsoft",
                        inputs=[a, wq.q, wq.scale],
                        outputs=[matmul_out],
                    )
                )
            elif self.config.activations == "row":
                q, s_row, zp = self._quantize_rows(a, names, quantized_acts, new_nodes, model_opset=self._opset)
                y_i = gs.Variable(fresh_name(names, f"{base}_int32"), dtype=np.int32)
                y_f = gs.Variable(fresh_name(names, f"{base}_float"), dtype=np.float32)
                y_r = gs.Variable(fresh_name(names, f"{base}_rows"), dtype=np.float32)
                new_nodes += [
                    gs.Node(
                        "MatMulInteger", fresh_name(names, f"{base}_MatMulInteger"), inputs=[q, wq.q, zp], outputs=[y_i]
                    ),
                    gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[y_i], outputs=[y_f]),
                    gs.Node("Mul", fresh_name(names, f"{base}_row_Mul"), inputs=[y_f, s_row], outputs=[y_r]),
                    gs.Node("Mul", fresh_name(names, f"{base}_Mul"), inputs=[y_r, wq.scale], outputs=[matmul_out]),
                ]
            else:
                qa = self._quantize_activation(a, graph, names, quantized_acts, new_nodes)
                y_i = gs.Variable(fresh_name(names, f"{base}_int32"), dtype=np.int32)
                y_f = gs.Variable(fresh_name(names, f"{base}_float"), dtype=np.float32)
                s = gs.Variable(fresh_name(names, f"{base}_scales"), dtype=np.float32)
                new_nodes += [
                    gs.Node(
                        "MatMulInteger",
                        fresh_name(names, f"{base}_MatMulInteger"),
                        inputs=[qa[0], wq.q, qa[2]],
                        outputs=[y_i],
                    ),
                    gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 1}, inputs=[y_i], outputs=[y_f]),
                    gs.Node("Mul", fresh_name(names, f"{base}_scale_Mul"), inputs=[qa[1], wq.scale], outputs=[s]),
                    gs.Node("Mul", fresh_name(names, f"{base}_Mul"), inputs=[y_f, s], outputs=[matmul_out]),
                ]
            if bias is not None:
                new_nodes.append(
                    gs.Node("Add", fresh_name(names, f"{base}_bias_Add"), inputs=[matmul_out, bias], outputs=[out])
                )
            layers.append(
                {
                    "node": node.name,
                    "op": node.op,
                    "tensor": node.inputs[1].name,
                    "bytes_before": bytes_before,
                    "bytes_after": bytes_before // 4 + int(wq.scale.values.nbytes),
                    "scheme": "int8 per-column weights, uint8 per-tensor dynamic activations",
                }
            )
            report.tensor_map[wq.q.name] = node.inputs[1].name
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.extend(new_nodes)  # the rewrite stays inside ``graph``; export sorts the nodes

    @staticmethod
    def _quantize_rows(
        a: gs.Tensor,
        names: set[str],
        done: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        new_nodes: list[gs.Node],
        model_opset: int,
    ) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
        """Symmetric per-row (per token) quantization of ``a`` into uint8 around 128."""
        if id(a) in done:
            return done[id(a)]
        base = a.name or "activation"

        def v(suffix: str, dtype: type = np.float32) -> gs.Variable:
            return gs.Variable(fresh_name(names, f"{base}_{suffix}"), dtype=dtype)

        def c(suffix: str, value: np.ndarray) -> gs.Constant:
            return gs.Constant(fresh_name(names, f"{base}_{suffix}"), value)

        absx, amax, amax_c, s, t, r, cl, u, q = (
            v(x) for x in ("abs", "amax", "amax_c", "row_scale", "div", "round", "clip", "shift", "q")
        )
        q.dtype = np.uint8
        if model_opset >= 18:
            reduce = gs.Node(
                "ReduceMax",
                fresh_name(names, f"{base}_ReduceMax"),
                attrs={"keepdims": 1},
                inputs=[absx, c("axes", np.array([-1], np.int64))],
                outputs=[amax],
            )
        else:
            reduce = gs.Node(
                "ReduceMax",
                fresh_name(names, f"{base}_ReduceMax"),
                attrs={"keepdims": 1, "axes": [-1]},
                inputs=[absx],
                outputs=[amax],
            )
        zp = c("zero_point", np.array(128, np.uint8))
        new_nodes += [
            gs.Node("Abs", fresh_name(names, f"{base}_Abs"), inputs=[a], outputs=[absx]),
            reduce,
            gs.Node(
                "Max",
                fresh_name(names, f"{base}_Max"),
                inputs=[amax, c("eps", np.array(1e-30, np.float32))],
                outputs=[amax_c],
            ),
            gs.Node(
                "Div",
                fresh_name(names, f"{base}_scale_Div"),
                inputs=[amax_c, c("qmax", np.array(127, np.float32))],
                outputs=[s],
            ),
            gs.Node("Div", fresh_name(names, f"{base}_Div"), inputs=[a, s], outputs=[t]),
            gs.Node("Round", fresh_name(names, f"{base}_Round"), inputs=[t], outputs=[r]),
            gs.Node(
                "Add", fresh_name(names, f"{base}_Add"), inputs=[r, c("offset", np.array(128, np.float32))], outputs=[u]
            ),
            gs.Node("Cast", fresh_name(names, f"{base}_Cast"), attrs={"to": 2}, inputs=[u], outputs=[q]),
        ]
        del cl
        done[id(a)] = (q, s, zp)
        return done[id(a)]

    @staticmethod
    def _quantize_activation(
        a: gs.Tensor,
        graph: gs.Graph,
        names: set[str],
        done: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]],
        new_nodes: list[gs.Node],
    ) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
        """``DynamicQuantizeLinear(a)``, shared by every MatMul of ``graph`` that reads ``a``."""
        if id(a) not in done:
            base = a.name or "activation"
            q = gs.Variable(fresh_name(names, f"{base}_quantized"), dtype=np.uint8)
            s = gs.Variable(fresh_name(names, f"{base}_scale"), dtype=np.float32, shape=[])
            zp = gs.Variable(fresh_name(names, f"{base}_zero_point"), dtype=np.uint8, shape=[])
            new_nodes.append(
                gs.Node(
                    "DynamicQuantizeLinear",
                    fresh_name(names, f"{base}_DynamicQuantizeLinear"),
                    inputs=[a],
                    outputs=[q, s, zp],
                )
            )
            done[id(a)] = (q, s, zp)
        return done[id(a)]
