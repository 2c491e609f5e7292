"""Validation engine: metrics against hand-computed values, tolerances, worst-sample judging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import matmul_model, run, save
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.validate import Tolerance, compare, output_diff


def test_metrics_match_hand_computation() -> None:
    a = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    b = np.array([[1.0, 0.1, 0.0], [0.0, 2.0, 0.0]], np.float32)
    d = output_diff("y", [a], [b])
    assert d.max_abs == pytest.approx(0.1)
    assert d.mean_abs == pytest.approx(0.1 / 6)
    cos0 = 1.0 / np.sqrt(1.01)
    assert d.cosine == pytest.approx(cos0)  # the worst row, not the mean
    assert d.cosine_mean == pytest.approx((cos0 + 1.0) / 2)
    assert d.worst_sample == 0
    assert d.snr_db == pytest.approx(10 * np.log10(5.0 / 0.01), rel=1e-6)
    assert d.top1_agreement == 1.0
    assert d.max_rel == pytest.approx(0.1 / (1e-3 * 2.0), rel=1e-5)  # floor at 1e-3 * max|a|


def test_worst_sample_is_reported_not_mean() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((100, 16)).astype(np.float32)
    b = a.copy()
    b[37] = -b[37]  # one sample flipped
    d = output_diff("y", [a], [b])
    assert d.cosine == pytest.approx(-1.0)
    assert d.cosine_mean > 0.97
    assert d.worst_sample == 37
    assert d.top1_agreement < 1.0


def test_identical_outputs_and_nonfinite() -> None:
    a = np.array([[1.0, np.nan, np.inf]], np.float32)
    same = output_diff("y", [a], [a.copy()])
    assert same.max_abs == 0 and same.snr_db == 300.0 and same.nonfinite_mismatch == 0
    b = np.array([[1.0, 2.0, np.inf]], np.float32)
    assert output_diff("y", [a], [b]).nonfinite_mismatch == 1


def test_integer_and_shape_mismatch() -> None:
    a = np.array([1, 2, 3], np.int64)
    d = output_diff("ids", [a], [np.array([1, 2, 4], np.int64)])
    assert d.equal_fraction == pytest.approx(2 / 3) and d.max_abs == 1 and d.cosine is None
    d = output_diff("y", [np.zeros((2, 3), np.float32)], [np.zeros((3, 2), np.float32)])
    assert not d.passed and "shape" in d.failures[0]


@pytest.mark.parametrize(
    ("text", "metric", "op", "value", "output"),
    [
        ("cosine>=0.999", "cosine", ">=", 0.999, None),
        ("top1>=0.99", "top1_agreement", ">=", 0.99, None),
        ("max_abs<=1e-3", "max_abs", "<=", 1e-3, None),
        ("logits:snr>=30", "snr_db", ">=", 30.0, "logits"),
    ],
)
def test_tolerance_parsing(text: str, metric: str, op: str, value: float, output: str | None) -> None:
    t = Tolerance.parse(text)
    assert (t.metric, t.op, t.value, t.output) == (metric, op, value, output)


@pytest.mark.parametrize("text", ["cosine=0.9", "bogus>=1", "cosine>=abc", "cosine>=nan", ""])
def test_bad_tolerance(text: str) -> None:
    with pytest.raises(OnnxCompressError, match="bad tolerance"):
        Tolerance.parse(text)


def _damaged_copy(src: Path, dst: Path, factor: float) -> Path:
    m = onnx.load(str(src))
    w = m.graph.initializer[0]
    w.CopyFrom(nh.from_array(nh.to_array(w) * factor, w.name))
    onnx.save(m, str(dst))
    return dst


def test_compare_same_model_passes_and_damaged_fails(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "a.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 4, 64)).astype(np.float32)} for i in range(3)]
    ok = compare(src, src, feeds, ["cosine>=0.999999", "max_abs<=0"])
    assert ok.passed and ok.outputs["y"].max_abs == 0
    bad = _damaged_copy(src, tmp_path / "b.onnx", -1.0)
    report = compare(src, bad, feeds, ["cosine>=0.99"])
    assert not report.passed
    assert report.failures[0].startswith("y: cosine=")
    assert report.to_dict()["outputs"]["y"]["passed"] is False


def test_accuracy_with_labels(tmp_path: Path) -> None:
    src = save(matmul_model(m=1), tmp_path / "a.onnx")
    x = np.random.default_rng(0).standard_normal((20, 1, 64)).astype(np.float32)
    ref = run(src, {"x": x})[0]
    labels = ref.argmax(-1).reshape(-1)
    labels[:5] = (labels[:5] + 1) % 10  # 5 of 20 wrong
    report = compare(src, src, [{"x": x}], ["accuracy_drop<=0"], labels=labels)
    assert report.accuracy["original"] == pytest.approx(0.75)
    assert report.accuracy["drop"] == 0 and report.passed
    with pytest.raises(OnnxCompressError, match="labels"):
        compare(src, src, [{"x": x}], [], labels=labels[:3])


def test_validate_api_uses_sidecar_inputs(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "a.onnx")
    np.savez(tmp_path / "a.inputs.npz", x=np.ones((5, 4, 64), np.float32))
    report = oc.validate(src, src)
    assert report.feeds_source.endswith("a.inputs.npz") and report.num_samples == 5


def test_candidate_onnxruntime_cannot_run_fails_validation(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "a.onnx")
    m = onnx.load(str(src))
    m.graph.node[0].op_type = "Conv"  # a MatMul turned into a malformed Conv: onnxruntime refuses it
    bad = tmp_path / "b.onnx"
    onnx.save(m, str(bad))
    feeds = [{"x": np.ones((2, 4, 64), np.float32)}]
    report = compare(src, bad, feeds, ["cosine>=0.99"])
    assert not report.passed and report.failures[0].startswith("candidate: onnxruntime cannot load")
