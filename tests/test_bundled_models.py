"""The real exported models in models/: lossless round trip and the int8-weights acceptance figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxcompress as oc
from onnxcompress.feeds import input_signature, load_feeds

MODELS = Path(__file__).resolve().parent.parent / "models"
BUNDLED = ["digits_cnn", "digits_keras", "tiny_transformer"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_has_sidecars(name: str) -> None:
    model = oc.load(MODELS / f"{name}.onnx")
    feeds = load_feeds(MODELS / f"{name}.inputs.npz", input_signature(model))
    labels = np.load(MODELS / f"{name}.labels.npy")
    assert len(labels) == next(iter(feeds[0].values())).shape[0]


@pytest.mark.parametrize("name", BUNDLED)
def test_roundtrip_is_lossless(name: str, tmp_path: Path) -> None:
    src = MODELS / f"{name}.onnx"
    out = oc.save(oc.load(src), tmp_path / f"{name}.onnx")
    report = oc.validate(src, out, tolerances=["max_abs<=0"])
    assert report.passed, report.failures


@pytest.mark.parametrize("name", BUNDLED)
def test_int8_weights_acceptance(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.int8.onnx"
    report = oc.compress(
        MODELS / f"{name}.onnx", out, ["int8-weights"], tolerances=["cosine>=0.999", "accuracy_drop<=0.005"]
    )
    assert out.exists()
    assert report.size_ratio <= 0.30
    v = report.validation
    assert v is not None and v.passed, v.failures
    assert v.accuracy is not None and v.accuracy["original"] >= 0.95
    assert abs(v.accuracy["drop"]) <= 0.005
    assert min(d.cosine for d in v.outputs.values() if d.cosine is not None) >= 0.999
    assert report.passes[-1].stats["tensors_changed"] >= 3


MINILM = MODELS / "cache" / "minilm" / "minilm.onnx"


@pytest.mark.skipif(not MINILM.exists(), reason="run scripts/export_minilm.py first (needs the export extra)")
def test_minilm_int8_weights_acceptance(tmp_path: Path) -> None:
    report = oc.compress(MINILM, tmp_path / "minilm.int8.onnx", ["int8-weights"], tolerances=["cosine>=0.999"])
    assert report.size_ratio <= 0.30
    v = report.validation
    assert v is not None and v.passed and v.num_samples >= 48
    assert v.outputs["sentence_embedding"].cosine >= 0.999
