"""Quantization passes: weight-only int8 today; dynamic, static, int4 and fp16 join here."""

from .weights import Int8WeightsConfig, Int8WeightsPass

__all__ = ["Int8WeightsConfig", "Int8WeightsPass"]
