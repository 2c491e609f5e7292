"""onnxcompress: compress ONNX models and prove the result still computes the same thing.

Public API::

    import onnxcompress as oc
    report = oc.compress("model.onnx", "model.int8.onnx", ["int8-weights"])
    print(report.size_ratio, report.validation.passed)
    v = oc.validate("model.onnx", "model.int8.onnx", tolerances=["cosine>=0.999"])
"""

from __future__ import annotations

from .api import CompressionReport, FeedOptions, compress, load, validate
from .errors import OnnxCompressError, ValidationFailed
from .graph import Model
from .io import save
from .passes.base import PassContext, PassReport
from .pipeline import Pipeline
from .recipes import PASSES
from .runner import SplitModel
from .split import SplitReport, split_model
from .stats import ModelSummary, summarize
from .validate import OutputDiff, Tolerance, ValidationReport

__version__ = "0.1.0"

__all__ = [
    "PASSES",
    "CompressionReport",
    "FeedOptions",
    "Model",
    "ModelSummary",
    "OnnxCompressError",
    "OutputDiff",
    "PassContext",
    "PassReport",
    "Pipeline",
    "SplitModel",
    "SplitReport",
    "Tolerance",
    "ValidationFailed",
    "ValidationReport",
    "__version__",
    "compress",
    "load",
    "save",
    "split_model",
    "summarize",
    "validate",
]
