"""The registry of passes and the default tolerances of each technique.

``PASSES`` is an explicit dict: adding a technique means writing its module under ``passes/`` and
adding one line here. Nothing is registered by import side effects.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import OnnxCompressError
from .passes.base import Pass
from .passes.fold.branches import FoldIfPass
from .passes.fold.constants import FoldConstantsPass
from .passes.fold.dce import DeadCodePass
from .passes.fold.dedup import CommonSubexpressionPass, DedupConstantsPass
from .passes.fold.fusions import (
    FuseBatchNormPass,
    FuseConstantAffinePass,
    FuseMatMulAddPass,
    FuseReshapesPass,
    FuseTransposesPass,
)
from .passes.fold.noops import EliminateNoOpsPass
from .passes.quantize import Int8WeightsConfig, Int8WeightsPass
from .pipeline import FixedPointPass


def fold_pass() -> Pass:
    """The lossless simplifier: its passes repeated until a round changes nothing."""
    return FixedPointPass(
        "fold",
        [
            FoldConstantsPass(),
            FoldIfPass(),
            EliminateNoOpsPass(),
            FuseBatchNormPass(),
            FuseConstantAffinePass(),
            FuseMatMulAddPass(),
            FuseTransposesPass(),
            FuseReshapesPass(),
            DedupConstantsPass(),
            CommonSubexpressionPass(),
            DeadCodePass(),
        ],
    )


PASSES: dict[str, Callable[[], Pass]] = {
    "fold": fold_pass,
    # Blocks of 32 along K for MatMul/Gemm, per channel for Conv, per row for embeddings; dequantized
    # once at load (standard Cast/Mul/Reshape that runtimes constant-fold).
    "int8-weights": lambda: Int8WeightsPass(Int8WeightsConfig(granularity="block")),
    # Per output channel, DequantizeLinear kept at run time (int8 weights in memory).
    "int8-weights-qdq": lambda: Int8WeightsPass(Int8WeightsConfig(form="runtime"), name="int8-weights-qdq"),
    "int8-weights-per-tensor": lambda: Int8WeightsPass(
        Int8WeightsConfig(granularity="tensor", form="runtime"), name="int8-weights-per-tensor"
    ),
}

# Tolerances applied when the user gives none: the loosest that still marks a broken model.
# cosine is the worst sample's cosine similarity; accuracy_drop applies only when labels are given.
DEFAULT_TOLERANCES: dict[str, list[str]] = {
    "int8-weights": ["cosine>=0.99", "accuracy_drop<=0.005"],
    "int8-weights-qdq": ["cosine>=0.99", "accuracy_drop<=0.005"],
    "int8-weights-per-tensor": ["cosine>=0.98", "accuracy_drop<=0.02"],
}
LOSSLESS_TOLERANCES = ["max_abs<=1e-4"]


def build_passes(names: list[str]) -> list[Pass]:
    """Instantiate the passes named in ``names``, in order.

    Raises:
        OnnxCompressError: for an unknown pass name.
    """
    passes = []
    for name in names:
        if name not in PASSES:
            raise OnnxCompressError(f"unknown technique {name!r}: choose from {', '.join(sorted(PASSES))}")
        passes.append(PASSES[name]())
    return passes


def default_tolerances(names: list[str]) -> list[str]:
    """Default tolerances for a list of passes: the union of each lossy pass's defaults."""
    out: list[str] = []
    for name in names:
        for tol in DEFAULT_TOLERANCES.get(name, []):
            if tol not in out:
                out.append(tol)
    return out or list(LOSSLESS_TOLERANCES)
