"""Checks and helpers shared by the quantization passes."""

from __future__ import annotations

from ...errors import OnnxCompressError
from ...graph import Model, iter_nodes

# Ops that mean the model is already quantized: quantizing it again would stack errors.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
        "QLinearConv", "QLinearMatMul", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat", "QGemm", "QAttention", "QLinearAdd", "QLinearMul",
    }
)  # fmt: skip


def refuse_quantized(model: Model, technique: str) -> None:
    """Raise if ``model`` already holds quantization ops (a QDQ or integer-kernel model).

    Raises:
        OnnxCompressError: naming the first such node.
    """
    for _, node in iter_nodes(model.graph):
        if node.op in QUANTIZED_OPS:
            raise OnnxCompressError(
                f"{technique}: the model is already quantized (node {node.name!r} is {node.op}); "
                "compress the float original instead"
            )
