"""The command line: outputs, reports, exit codes, and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import conv_model, custom_op_model, matmul_model, save
from onnx import numpy_helper as nh

from onnxcompress.cli import main


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(err: str, code: int, expected: int = 2) -> None:
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err


@pytest.fixture
def conv(tmp_path: Path) -> Path:
    path = save(conv_model(), tmp_path / "conv.onnx")
    x = np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "conv.inputs.npz", x=x)
    return path


def test_compress_writes_model_and_report(capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capsys, "compress", conv, "-o", out, "--quantize", "int8-weights", "--report", report)
    assert code == 0, err
    onnx.checker.check_model(str(out))
    r = json.loads(report.read_text())
    assert r["input"]["size_bytes"] == conv.stat().st_size
    assert r["output"]["size_bytes"] == out.stat().st_size
    assert r["size_ratio"] == pytest.approx(out.stat().st_size / conv.stat().st_size, rel=1e-5)
    assert r["size_ratio"] < 0.3
    # fold runs first by default, then the requested technique
    assert [p["name"] for p in r["passes"]] == ["fold", "int8-weights"] and r["techniques"] == ["fold", "int8-weights"]
    assert r["passes"][1]["changed"] is True
    assert "seconds" in r["passes"][1]
    assert r["target"] == "standard" and r["calibration"] is None
    assert r["validation"]["passed"] is True
    logits = r["validation"]["outputs"]["logits"]
    for key in ("max_abs", "mean_abs", "cosine", "snr_db", "top1_agreement"):
        assert isinstance(logits[key], float)
    assert r["validation"]["feeds_source"].endswith("conv.inputs.npz")
    assert "validation: passed" in stdout


def test_no_fold_and_calibration_errors(capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, _, err = cli(capsys, "compress", conv, "-o", out, "-q", "int8-weights", "--no-fold", "--report", report)
    assert code == 0, err
    assert [p["name"] for p in json.loads(report.read_text())["passes"]] == ["int8-weights"]
    empty = tmp_path / "calib"
    empty.mkdir()
    for bad, needle in ((empty, "no .npz"), (tmp_path / "missing.npz", "not found")):
        out2 = tmp_path / "q2.onnx"
        code, _, err = cli(capsys, "compress", conv, "-o", out2, "-q", "int8-weights", "--calibration", bad)
        assert code == 2 and "calibration" in err and needle in err and len(err.strip().splitlines()) == 1
        assert not out2.exists()
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 3, 6, 6), np.float32))
    code, _, err = cli(
        capsys, "compress", conv, "-o", out2, "-q", "int8-weights", "--calibration", tmp_path / "wrong.npz"
    )
    assert code == 2 and "calibration" in err and not out2.exists()
    code, _, err = cli(capsys, "compress", conv, "-o", out2, "-q", "int8-weights", "--target", "tensorrt")
    assert code == 2 and "unknown target" in err and not out2.exists()


def test_compress_failing_tolerance_writes_nothing(
    capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path
) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, _, err = cli(
        capsys, "compress", conv, "-o", out, "-q", "int8-weights", "--tolerance", "max_abs<=1e-9", "--report", report
    )
    _assert_one_line_error(err, code, expected=1)
    assert "logits" in err and not out.exists()
    assert json.loads(report.read_text())["validation"]["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.inputs.npz", "conv.onnx", "r.json"]
    code, _, err = cli(
        capsys, "compress", conv, "-o", out, "-q", "int8-weights", "--tolerance", "max_abs<=1e-9", "--force"
    )
    assert code == 1 and out.exists() and "written anyway" in err


def test_validate_exit_codes(capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path) -> None:
    code, stdout, err = cli(capsys, "validate", conv, conv)
    assert code == 0, err
    m = onnx.load(str(conv))
    w = next(i for i in m.graph.initializer if i.name == "WG")
    w.CopyFrom(nh.from_array(-nh.to_array(w), "WG"))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(m, str(damaged))
    code, _, err = cli(capsys, "validate", conv, damaged, "--report", tmp_path / "v.json")
    _assert_one_line_error(err, code, expected=1)
    assert "logits" in err
    assert json.loads((tmp_path / "v.json").read_text())["outputs"]["logits"]["passed"] is False


def test_inspect_json(capsys: pytest.CaptureFixture[str], conv: Path) -> None:
    code, stdout, _ = cli(capsys, "inspect", conv, "--json")
    assert code == 0
    s = json.loads(stdout)
    assert s["parameters"] == 16 * 27 + 16 + 16 * 8 * 4 + 10 * 1152 + 10
    assert s["ops"] == {"Conv": 1, "Relu": 1, "ConvTranspose": 1, "Flatten": 1, "Gemm": 1}
    assert s["opsets"] == {"ai.onnx": 17}
    assert s["bytes_by_dtype"] == {"float32": 4 * s["parameters"]}
    assert s["largest_initializers"][0]["name"] == "WG"
    assert s["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["N", 3, 6, 6]}
    assert s["size_bytes"] == conv.stat().st_size


def _external_without_data(tmp_path: Path) -> Path:
    p = save(matmul_model(), tmp_path / "ext.onnx", external=True)
    (tmp_path / "ext.onnx.data").unlink()
    return p


BAD_MODELS = {
    "missing file": (lambda tmp: tmp / "nope.onnx", "not found"),
    "text file": (lambda tmp: (tmp / "t.onnx").write_text("hello, I am text\n") and tmp / "t.onnx", "not a valid ONNX"),
    "truncated": (
        lambda tmp: (
            (tmp / "tr.onnx").write_bytes(save(conv_model(), tmp / "full.onnx").read_bytes()[:700]) and tmp / "tr.onnx"
        ),
        "not a valid ONNX",
    ),
    "missing external data": (_external_without_data, "is missing"),
    "custom op": (lambda tmp: save(custom_op_model(), tmp / "custom.onnx"), "unsupported op my.custom::Frobnicate"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_models(capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str) -> None:
    make, message = BAD_MODELS[case]
    model = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(capsys, "compress", model, "-o", tmp_path / "out.onnx", "-q", "int8-weights")
    _assert_one_line_error(err, code)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    p = tmp_path / "feed.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"wrong": np.zeros((1, 3, 6, 6), np.float32)}, "unknown input 'wrong'"),
        ({"x": np.zeros((1, 3, 7, 6), np.float32)}, "has shape [1, 3, 7, 6]"),
        ({"x": np.zeros((3, 6, 6), np.float32)}, "expects rank 4"),
        ({"x": np.zeros((1, 3, 6, 6), np.float64)}, "has dtype float64"),
    ],
)
def test_bad_inputs(capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path, arrays: dict, message: str) -> None:
    feed = _npz(tmp_path, **arrays)
    code, _, err = cli(capsys, "compress", conv, "-o", tmp_path / "out.onnx", "-q", "int8-weights", "--inputs", feed)
    _assert_one_line_error(err, code)
    assert message in err
    assert not (tmp_path / "out.onnx").exists()


def test_bad_inputs_file_content(capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    code, _, err = cli(capsys, "validate", conv, conv, "--inputs", bad)
    _assert_one_line_error(err, code)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    code, _, err = cli(capsys, "validate", conv, conv, "--inputs", pickled)
    _assert_one_line_error(err, code)


def test_existing_output_and_output_equals_input(
    capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"precious")
    code, _, err = cli(capsys, "compress", conv, "-o", existing, "-q", "int8-weights")
    _assert_one_line_error(err, code)
    assert "--force" in err and existing.read_bytes() == b"precious"
    original = conv.read_bytes()
    code, _, err = cli(capsys, "compress", conv, "-o", conv, "-q", "int8-weights", "--force")
    _assert_one_line_error(err, code)
    assert "is the input model" in err and conv.read_bytes() == original


@pytest.mark.parametrize(
    "args",
    [
        ["compress", "{m}", "-o", "{o}", "-q", "int3-magic"],
        ["compress", "{m}", "-o", "{o}"],
        ["compress", "{m}", "-o", "{o}", "-q", "int8-weights", "--tolerance", "cosine=1"],
        ["compress", "{m}", "-o", "{o}", "-q", "int8-weights", "--shape", "x=1xfoo"],
        ["validate", "{m}", "{m}", "--shape", "nope=1x3x6x6"],
        ["compress", "{m}", "-o", "{o}", "-q", "int8-weights", "--max-memory", "lots"],
    ],
)
def test_bad_usage(capsys: pytest.CaptureFixture[str], conv: Path, tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "conv.inputs.npz").unlink()
    argv = [a.format(m=conv, o=tmp_path / "o.onnx") for a in args]
    code, _, err = cli(capsys, *argv)
    _assert_one_line_error(err, code)
    assert not (tmp_path / "o.onnx").exists()


def test_generated_feeds_with_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = save(matmul_model(k=256, n=64), tmp_path / "m.onnx")
    code, stdout, err = cli(
        capsys, "compress", model, "-o", tmp_path / "q.onnx", "-q", "int8-weights", "--shape", "x=3x4x256", "--json"
    )
    assert code == 0, err
    r = json.loads(stdout)
    assert r["validation"]["feeds_source"] == "generated" and r["validation"]["num_samples"] == 8 * 3


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "onnxcompress", "inspect", str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: model file not found: {tmp_path / 'missing.onnx'}"
