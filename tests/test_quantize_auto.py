"""auto: the mode follows the model's work, and a slower result falls back to int8-weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from onnxcompress import api

MODELS = Path(__file__).resolve().parent.parent / "models"


def _auto(report: api.CompressionReport) -> dict:
    (p,) = [p for p in report.passes if p.name == "auto"]
    return p.stats


def test_cnn_with_calibration_gets_int8_static(tmp_path: Path) -> None:
    r = api.compress(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", ["auto"])
    stats = _auto(r)
    assert stats["macs"]["conv"] > stats["macs"]["matmul"]
    # int8-static, unless it measured slower on this machine (then int8-weights, and the report says so)
    assert stats["chosen"] == "int8-static" or ("fallback" in stats and stats["chosen"] == "int8-weights")
    assert r.passed and r.size_ratio < 0.35 and r.calibration is not None


def test_cnn_without_calibration_never_goes_dynamic(tmp_path: Path) -> None:
    for suffix in (".onnx", ".inputs.npz", ".labels.npy"):
        shutil.copy(MODELS / f"digits_cnn{suffix}", tmp_path / f"cnn{suffix}")
    r = api.compress(tmp_path / "cnn.onnx", tmp_path / "q.onnx", ["auto"])
    assert _auto(r)["chosen"] == "int8-weights" and r.passed


def test_transformer_gets_int8_dynamic(tmp_path: Path) -> None:
    r = api.compress(MODELS / "tiny_transformer.onnx", tmp_path / "q.onnx", ["auto"])
    stats = _auto(r)
    assert stats["macs"]["matmul"] > stats["macs"]["conv"]
    assert stats["chosen"] in ("int8-dynamic", "int8-weights") and r.passed
    if stats["chosen"] == "int8-weights":  # only when the dynamic model measured slower here
        assert "fallback" in stats


def test_slower_result_falls_back_and_says_so(tmp_path: Path) -> None:
    r = api.compress(MODELS / "tiny_transformer.onnx", tmp_path / "q.onnx", ["auto"], params={"max_slowdown": "0.01"})
    stats = _auto(r)
    assert stats["chosen"] == "int8-weights" and "used int8-weights instead" in stats["fallback"]
    assert r.passed and any("int8-weights instead" in why for _, why in r.passes[-1].skipped)


@pytest.mark.parametrize("bad", ["max_slowdown=fast", "measure=maybe"])
def test_bad_params(tmp_path: Path, bad: str) -> None:
    key, value = bad.split("=")
    with pytest.raises(api.OnnxCompressError, match=key):
        api.compress(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", ["auto"], params={key: value})
