"""Quantization passes: int8 weight-only, dynamic and static, int4 (GPTQ), fp16/bf16, and ``auto``."""

from .weights import Int8WeightsConfig, Int8WeightsPass

__all__ = ["Int8WeightsConfig", "Int8WeightsPass"]
