"""The registry of passes and the default tolerances of each technique.

``PASSES`` is an explicit dict: adding a technique means writing its module under ``passes/`` and
adding one line here. Nothing is registered by import side effects.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import OnnxCompressError
from .passes.base import Params, Pass
from .passes.fold.branches import FoldIfPass
from .passes.fold.constants import FoldConstantsConfig, FoldConstantsPass
from .passes.fold.dce import AnnotateShapesPass, DeadCodePass
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
from .passes.quantize.auto import AutoPass, auto_config
from .passes.quantize.dynamic import Int8DynamicPass, int8_dynamic_config
from .passes.quantize.float16 import FloatPass, float_config
from .passes.quantize.int4 import Int4Pass, int4_config
from .passes.quantize.static import Int8StaticPass, int8_static_config
from .passes.quantize.weights import int8_weights_config
from .passes.structural import ClusterPass, LowRankPass, PrunePass, cluster_config, lowrank_config, prune_config
from .passes.structural.channels import PruneChannelsPass, channels_config
from .pipeline import FixedPointPass
from .tune import TunePass, tune_config


def fold_pass(params: Params | None = None) -> Pass:
    """The lossless simplifier: its passes repeated until a round changes nothing.

    Size guard settings (``--param``): ``fold_max_growth`` (an output may be this many times the
    bytes it frees, default 1; ``inf`` folds everything, as onnxsim does) and ``fold_growth_budget``
    (small outputs may grow the model by this fraction in all, default 0.10).
    """
    params = params or Params()
    config = FoldConstantsConfig(
        max_growth=params.get_float("fold_max_growth", FoldConstantsConfig.max_growth),
        max_total_growth=params.get_float("fold_growth_budget", FoldConstantsConfig.max_total_growth),
    )
    return FixedPointPass(
        "fold",
        [
            FoldConstantsPass(config),
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
        finish=[AnnotateShapesPass()],
    )


# A factory builds a pass from the ``--param KEY=VALUE`` settings (it reads the keys it knows).
PassFactory = Callable[[Params], Pass]

PASSES: dict[str, PassFactory] = {
    "fold": fold_pass,
    # Blocks of 32 along K for MatMul/Gemm, per channel for Conv, per row for embeddings; dequantized
    # once at load (standard Cast/Mul/Reshape that runtimes constant-fold).
    "int8-weights": lambda params: Int8WeightsPass(int8_weights_config(params, granularity="block")),
    # Per output channel, DequantizeLinear kept at run time (int8 weights in memory).
    "int8-weights-qdq": lambda params: Int8WeightsPass(Int8WeightsConfig(form="runtime"), name="int8-weights-qdq"),
    "int8-weights-per-tensor": lambda params: Int8WeightsPass(
        Int8WeightsConfig(granularity="tensor", form="runtime"), name="int8-weights-per-tensor"
    ),
    # Dynamic activation quantization of MatMul/Gemm (integer kernels), Gather tables int8.
    "int8-dynamic": lambda params: Int8DynamicPass(int8_dynamic_config(params)),
    # QDQ with calibration (MinMax / Percentile / Entropy / MSE ranges).
    "int8-static": lambda params: Int8StaticPass(int8_static_config(params)),
    # Block-wise int4 weights (GPTQ with calibration data, round-to-nearest without).
    "int4": lambda params: Int4Pass(int4_config(params)),
    "fp16": lambda params: FloatPass(float_config(params, "float16")),
    "bf16": lambda params: FloatPass(float_config(params, "bfloat16")),
    # int8-static for convolution-dominated graphs (int8-weights without calibration), int8-dynamic
    # for MatMul-dominated ones; falls back to int8-weights when the result measures slower.
    "auto": lambda params: AutoPass(auto_config(params)),
    # Structured pruning: removes whole channels/neurons (dependency groups), refits the next layers
    # by least squares on calibration data.
    "prune-channels": lambda params: PruneChannelsPass(channels_config(params)),
    # Magnitude / N:M pruning (SparseGPT refit with calibration data); the file stays dense: the gain
    # is in the transport (compressed download) size.
    "prune": lambda params: PrunePass(prune_config(params)),
    # SVD factorisation W ~ A.B where it saves parameters (activation-weighted with calibration data).
    "lowrank": lambda params: LowRankPass(lowrank_config(params)),
    # k-means weight sharing: uint8 (K <= 256) or packed 4-bit (K <= 16) indices + a codebook.
    "cluster": lambda params: ClusterPass(cluster_config(params)),
    # Per-layer mixed precision (int4 / int8 / fp16 / fp32) searched against a tolerance on
    # calibration data (the `tune` command searches on the validation inputs).
    "tune": lambda params: TunePass(tune_config(params)),
}

# Tolerances applied when the user gives none: the loosest that still marks a broken model.
# cosine is the worst sample's cosine similarity; accuracy_drop applies only when labels are given.
DEFAULT_TOLERANCES: dict[str, list[str]] = {
    "int8-weights": ["cosine>=0.99", "accuracy_drop<=0.005"],
    "int8-weights-qdq": ["cosine>=0.99", "accuracy_drop<=0.005"],
    "int8-weights-per-tensor": ["cosine>=0.98", "accuracy_drop<=0.02"],
    "int8-dynamic": ["cosine>=0.99", "accuracy_drop<=0.01"],
    "int8-static": ["cosine>=0.99", "accuracy_drop<=0.01"],
    "int4": ["cosine>=0.9", "accuracy_drop<=0.03"],
    "fp16": ["cosine>=0.999", "accuracy_drop<=0.005"],
    "bf16": ["cosine>=0.995", "accuracy_drop<=0.01"],
    "auto": ["cosine>=0.99", "accuracy_drop<=0.01"],
    "prune-channels": ["cosine>=0.9", "accuracy_drop<=0.02"],
    "prune": ["cosine>=0.95", "accuracy_drop<=0.03"],
    "lowrank": ["cosine>=0.95", "accuracy_drop<=0.03"],
    "cluster": ["cosine>=0.99", "accuracy_drop<=0.01"],
    "tune": ["cosine>=0.99", "accuracy_drop<=0.01"],
}
LOSSLESS_TOLERANCES = ["max_abs<=1e-4"]


def build_passes(names: list[str], params: Params | None = None) -> list[Pass]:
    """Instantiate the passes named in ``names``, in order, configured by ``params``.

    Raises:
        OnnxCompressError: for an unknown pass name, or a ``--param`` no pass reads.
    """
    params = params or Params()
    passes = []
    for name in names:
        if name not in PASSES:
            raise OnnxCompressError(f"unknown technique {name!r}: choose from {', '.join(sorted(PASSES))}")
        passes.append(PASSES[name](params))
    unused = params.unused()
    if unused:
        raise OnnxCompressError(f"--param {unused[0]} is not a setting of {', '.join(names)}")
    return passes


def default_tolerances(names: list[str]) -> list[str]:
    """Default tolerances for a list of passes: the union of each lossy pass's defaults."""
    out: list[str] = []
    for name in names:
        for tol in DEFAULT_TOLERANCES.get(name, []):
            if tol not in out:
                out.append(tol)
    return out or list(LOSSLESS_TOLERANCES)
