"""``auto``: choose the int8 mode from what the model spends its time on, and check it pays.

1. Estimate the multiply-accumulates of convolutions and of matrix products with constant weights
   (shapes from onnx inference; symbolic dimensions count as 1).
2. Convolution-dominated (CNNs): ``int8-static`` when calibration data is available (QDQ runs on
   onnxruntime's integer convolution kernels); without calibration ``int8-weights`` (int8 storage,
   float compute) -- dynamic quantization of convolutions is never chosen: ``ConvInteger`` with
   run-time activation quantization is several times slower than float convolution.
   MatMul-dominated (transformers, MLPs): ``int8-dynamic``.
3. When validation feeds are available, time the original and the result in onnxruntime (one
   thread, median of a few runs on the first feed). If the result is slower than the original by
   more than ``max_slowdown``, fall back to ``int8-weights`` (never slower: weights are dequantized
   once at load) and say so in the report (``stats["fallback"]``); the measured ratios are in
   ``stats["latency_ratio"]``.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...graph import Model, constant_meta, iter_nodes
from ...io import export_model, stage
from ...io import load as load_model
from ...shapes import infer_shapes
from ...validate import make_session
from ..base import GraphSize, Params, PassContext, PassReport
from ._common import refuse_quantized
from .dynamic import Int8DynamicPass, int8_dynamic_config
from .static import Int8StaticPass, int8_static_config
from .weights import Int8WeightsConfig, Int8WeightsPass


@dataclasses.dataclass(frozen=True)
class AutoConfig:
    """Options for :class:`AutoPass`.

    Attributes:
        measure: Time the result against the original (needs validation feeds).
        max_slowdown: Latency ratio above which the choice falls back to ``int8-weights``.
        dynamic: Config of the dynamic pass; static: config of the static pass.
    """

    measure: bool = True
    max_slowdown: float = 1.05
    dynamic: Any = None
    static: Any = None


def auto_config(params: Params) -> AutoConfig:
    """The config from ``--param`` settings (the chosen pass's settings are accepted too)."""
    return AutoConfig(
        measure=params.get_bool("measure", True),
        max_slowdown=params.get_float("max_slowdown", 1.05),
        dynamic=int8_dynamic_config(params),
        static=int8_static_config(params),
    )


def macs(model: Model) -> dict[str, float]:
    """Multiply-accumulates per kind (``conv``, ``matmul``) for one sample, weights constant."""
    infer_shapes(model)
    out = {"conv": 0.0, "matmul": 0.0}
    for _, node in iter_nodes(model.graph):
        if len(node.inputs) < 2:
            continue
        meta = constant_meta(node.inputs[1])
        if meta is None:
            continue
        w_elems = float(np.prod(meta[0])) if meta[0] else 1.0
        if node.op in ("Conv", "ConvTranspose"):
            shape = node.outputs[0].shape if node.op == "Conv" else node.inputs[0].shape
            spatial = [d if isinstance(d, int) and d > 0 else 1 for d in (shape or [])[2:]]
            out["conv"] += w_elems * float(np.prod(spatial) if spatial else 1.0)
        elif node.op in ("MatMul", "Gemm"):
            shape = node.inputs[0].shape or []
            rows = [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:-1]]
            out["matmul"] += w_elems * float(np.prod(rows) if rows else 1.0)
    return out


def _latency(path: Path, feed: dict[str, np.ndarray], budget: float = 2.0) -> float:
    sess = make_session(path, threads=1)
    sess.run(None, feed)  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < 3 or (len(times) < 15 and time.perf_counter() < deadline):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class AutoPass:
    """Pick int8-static, int8-dynamic or int8-weights for this model (see module docstring)."""

    name = "auto"

    def __init__(self, config: AutoConfig | None = None) -> None:
        self.config = config or AutoConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Choose, run the chosen pass, and check the result is not slower."""
        refuse_quantized(model, self.name)
        cfg = self.config
        before = GraphSize.of(model)
        work = macs(model)
        conv_dominated = work["conv"] >= work["matmul"]
        if conv_dominated and ctx.calibration:
            choice = Int8StaticPass(cfg.static)
        elif conv_dominated:
            choice = Int8WeightsPass(Int8WeightsConfig(granularity="block"))
        else:
            choice = Int8DynamicPass(cfg.dynamic)
        feed = ctx.feeds[0] if ctx.feeds else None
        tmp = Path(tempfile.mkdtemp(prefix="onnxcompress-auto-"))
        try:
            original = None
            if cfg.measure and feed is not None and not isinstance(choice, Int8WeightsPass):
                original = stage(export_model(model), tmp / "original.onnx", check=False).commit()
            sub = choice.run(model, ctx)
            stats: dict[str, Any] = {"chosen": choice.name, "macs": work}
            if original is not None and feed is not None:
                candidate = stage(export_model(model), tmp / "candidate.onnx", check=False).commit()
                ratio = _latency(candidate, feed) / _latency(original, feed)
                stats["latency_ratio"] = round(ratio, 3)
                if ratio > cfg.max_slowdown:
                    stats["fallback"] = (
                        f"{choice.name} measured {ratio:.2f}x the original's latency on this machine; "
                        "used int8-weights instead (never slower)"
                    )
                    model.graph = load_model(original).graph
                    choice = Int8WeightsPass(Int8WeightsConfig(granularity="block"))
                    sub = choice.run(model, ctx)
                    stats["chosen"] = choice.name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report = PassReport(self.name, modified=sub.modified, skipped=sub.skipped, tensor_map=sub.tensor_map)
        report.stats = before.stats(model, sub.modified, **{**sub.stats, **stats})
        if "fallback" in stats:
            report.skipped.append(("*", stats["fallback"]))
        return report
