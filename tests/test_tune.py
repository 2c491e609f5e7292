"""tune: per-layer mixed precision search (the smallest int4/int8/fp16/fp32 mixture within tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress.cli as cli
from onnxcompress import io
from onnxcompress.cli_tune import register
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.tune import (
    TuneConfig,
    TunePass,
    Tuner,
    TuneTolerance,
    only,
    overshoot,
    parse_tolerances,
    tune,
    tune_config,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
MINILM = MODELS / "cache" / "minilm" / "minilm.onnx"
WIDTH = 64


def mlp(seed: int = 0, sensitive: int = 2) -> onnx.ModelProto:
    """x[N, 64] -> 4 x (MatMul W_i -> Tanh) -> y; layer ``sensitive`` has outlier rows (int4
    blocks around them lose the rest of their values), so it must stay precise; the last layers need not."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(1, 5):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        if i == sensitive:
            w[::7, :] *= 40.0  # outliers in every block along K: int4 steps become coarse
            w /= 8.0
        inits.append(nh.from_array(w, f"W{i}"))
        out = "y" if i == 4 else f"t{i}"
        nodes += [
            h.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"),
            h.make_node("Tanh", [f"mm{i}"], [out], name=f"tanh{i}"),
        ]
        prev = out
    g = h.make_graph(
        nodes,
        "mlp",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", WIDTH])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", WIDTH])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)}]


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _worst_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture()
def mlp_files(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    np.savez(tmp_path / "mlp.calibration.npz", **_feeds(64, 1)[0])
    np.savez(tmp_path / "mlp.inputs.npz", **_feeds(48, 2)[0])
    return path


def test_tolerances_parse_and_tighten() -> None:
    t = TuneTolerance.parse("cosine>=0.99")
    assert t.tightened(0.5).value == pytest.approx(0.995)
    assert TuneTolerance.parse("relative_accuracy_drop<=0.02").tol.metric == "relative_accuracy_drop"
    assert TuneTolerance.parse("max_abs<=0.1").tightened(0.5).value == pytest.approx(0.05)
    assert TuneTolerance.parse("snr_db>=20").tightened(0.1).value == pytest.approx(30.0)
    for bad in ("cosine", "cosine>=abc", "relative_accuracy_drop<=x", "bogus>=1"):
        with pytest.raises(OnnxCompressError):
            TuneTolerance.parse(bad)
    with pytest.raises(OnnxCompressError):
        parse_tolerances([])


def test_only_pattern_excludes_everything_else() -> None:
    from onnxcompress.passes.base import is_excluded

    pats = only({"a.b", "c(1)"})
    assert not is_excluded("a.b", "MatMul", pats)
    assert not is_excluded("c(1)", "MatMul", pats)
    assert is_excluded("axb", "MatMul", pats)  # the names are literal, not regexes
    assert is_excluded("", "MatMul", pats)
    assert is_excluded("anything", "Conv", only(set()))


def test_search_keeps_the_sensitive_layer_precise_and_the_rest_int4(mlp_files: Path) -> None:
    model = io.load(mlp_files)
    calib = _feeds(64, 1)
    tols = parse_tolerances(["cosine>=0.99"])
    built, result, _ = tune(model, PassContext(calibration=calib), tols, TuneConfig(seed=0))
    prec = result.assignment
    assert prec["W2"] != "int4", result.to_dict()["layers"]
    assert sum(p == "int4" for p in prec.values()) >= 2
    assert all(la.why for la in result.layers)
    # The built model computes what the search measured: the tolerance holds on the calibration data.
    out = Path(mlp_files.parent / "built.onnx")
    io.save(built, out)
    ref, cand = _run(mlp_files, calib[0]), _run(out, calib[0])
    assert _worst_cos(ref, cand) >= 0.99
    # And it is smaller than float32.
    assert out.stat().st_size < 0.6 * mlp_files.stat().st_size


def test_evaluation_matches_the_built_model(mlp_files: Path) -> None:
    """Weights fed as inputs give the same outputs as the model the passes build (same codes)."""
    model = io.load(mlp_files)
    calib = _feeds(32, 1)
    with Tuner(model, calib, parse_tolerances(["cosine>=0.9"])) as tuner:
        assignment = {"W1": "int4", "W2": "int8", "W3": "fp16", "W4": "fp32"}
        for la in tuner.layers:
            la.precision = assignment[la.tensor]
        fed = tuner._run(tuner._weights(assignment), calib)["y"][0]
        built, reports = tuner.build(PassContext(calibration=calib))
    out = mlp_files.parent / "mixture.onnx"
    io.save(built, out)
    np.testing.assert_allclose(_run(out, calib[0]), fed, atol=2e-5)
    assert [r.name for r in reports] == ["int4", "int8-weights", "fp16"]
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "Floor" in ops  # int4 unpacking
    assert onnx.load(out).graph.output[0].name == "y"


def test_deterministic_for_a_seed(mlp_files: Path) -> None:
    calib = _feeds(64, 1)
    tols = parse_tolerances(["cosine>=0.999"])
    a = tune(io.load(mlp_files), PassContext(calibration=calib), tols, TuneConfig(seed=3))[1].assignment
    b = tune(io.load(mlp_files), PassContext(calibration=calib), tols, TuneConfig(seed=3))[1].assignment
    assert a == b


def test_exclude_keeps_float(mlp_files: Path) -> None:
    calib = _feeds(64, 1)
    _, result, _ = tune(
        io.load(mlp_files),
        PassContext(calibration=calib, exclude=("matmul3",)),
        parse_tolerances(["cosine>=0.9"]),
    )
    assert "W3" not in result.assignment
    assert any(f["tensor"] == "W3" and "exclude" in f["why"] for f in result.fixed)


def test_overshoot_measures_the_failing_fraction() -> None:
    from onnxcompress.validate import OutputDiff, ValidationReport

    rep = ValidationReport(
        passed=False,
        outputs={"y": OutputDiff(name="y", shape=[1], dtype="float32", cosine=0.97)},
        tolerances=["cosine>=0.99"],
        num_feeds=1,
        num_samples=1,
        failures=["y: cosine"],
    )
    assert overshoot(parse_tolerances(["cosine>=0.99"]), rep) == pytest.approx(3.0)


def test_cli_tune_writes_only_when_it_holds(mlp_files: Path, tmp_path: Path) -> None:
    register(cli.app)
    out, rep = tmp_path / "tuned.onnx", tmp_path / "r.json"
    code = cli.main([
        "tune", str(mlp_files), "-o", str(out), "--tolerance", "cosine>=0.995", "--report", str(rep), "--json",
    ])  # fmt: skip
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["written"] and out.exists()
    assert data["validation"]["passed"]
    assert {la["tensor"] for la in data["tune"]["layers"]} == {"W1", "W2", "W3", "W4"}
    assert all(la["precision"] in ("int4", "int8", "fp16", "fp32") and la["why"] for la in data["tune"]["layers"])
    assert data["size_ratio"] < 0.7
    feed = dict(np.load(mlp_files.parent / "mlp.inputs.npz"))
    assert _worst_cos(_run(mlp_files, feed), _run(out, feed)) >= 0.995


@pytest.mark.parametrize(
    "args",
    [
        ["--tolerance", "cosine>>0.9"],
        ["--tolerance", "nonsense"],
        ["--tolerance", "accuracy_drop<=0.01"],  # no labels
        ["--objective", "speed"],
    ],
)
def test_cli_bad_input_exit_2_nothing_written(mlp_files: Path, tmp_path: Path, args: list[str]) -> None:
    register(cli.app)
    out = tmp_path / "tuned.onnx"
    assert cli.main(["tune", str(mlp_files), "-o", str(out), *args]) == 2
    assert not out.exists()


def test_cli_labels_count_mismatch_exit_2(tmp_path: Path) -> None:
    register(cli.app)
    model = MODELS / "digits_cnn.onnx"
    labels = tmp_path / "labels.npy"
    np.save(labels, np.load(MODELS / "digits_cnn.labels.npy")[:-5])
    out = tmp_path / "d.onnx"
    code = cli.main([
        "tune", str(model), "-o", str(out), "--inputs", str(MODELS / "digits_cnn.inputs.npz"),
        "--labels", str(labels), "--tolerance", "accuracy_drop<=0.005",
    ])  # fmt: skip
    assert code == 2
    assert not out.exists()


def test_digits_cnn_accuracy_drop_smaller_than_int8(tmp_path: Path) -> None:
    """digits_cnn with labels: the tuned model is smaller than int8-weights and keeps the accuracy;
    with the html extra, --html writes the page with the per-layer precision map."""
    import importlib.util

    from onnxcompress import api

    has_html = all(importlib.util.find_spec(m) for m in ("jinja2", "matplotlib"))
    html = ["--html", str(tmp_path / "d.html")] if has_html else []

    register(cli.app)
    model = MODELS / "digits_cnn.onnx"
    out, rep = tmp_path / "d.onnx", tmp_path / "d.json"
    code = cli.main([
        "tune", str(model), "-o", str(out), "--inputs", str(MODELS / "digits_cnn.inputs.npz"),
        "--labels", str(MODELS / "digits_cnn.labels.npy"), "--tolerance", "accuracy_drop<=0.005",
        "--report", str(rep), "--json", *html,
    ])  # fmt: skip
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["validation"]["accuracy"]["drop"] <= 0.005
    int8 = api.compress(model, tmp_path / "int8.onnx", ["int8-weights"], tolerances=["cosine>=0.9"])
    assert data["output"]["size_bytes"] < int8.output["size_bytes"]
    assert any(la["precision"] == "int4" for la in data["tune"]["layers"])
    if html:  # the page's precision map lists every tuned layer with its precision
        import re

        page = (tmp_path / "d.html").read_text()
        section = page[page.index('id="precision-map"') :]
        for la in data["tune"]["layers"]:
            row = re.search(re.escape(la["tensor"]) + r".{0,400}?" + la["precision"], section, re.S)
            assert row, la["tensor"]


def test_relative_accuracy_drop_and_search_on_calibration(tmp_path: Path) -> None:
    register(cli.app)
    model = MODELS / "digits_cnn.onnx"
    out, rep = tmp_path / "d.onnx", tmp_path / "d.json"
    code = cli.main([
        "tune", str(model), "-o", str(out), "--inputs", str(MODELS / "digits_cnn.inputs.npz"),
        "--labels", str(MODELS / "digits_cnn.labels.npy"), "--tolerance", "relative_accuracy_drop<=0.01",
        "--search-on", "calibration", "--report", str(rep), "--json",
    ])  # fmt: skip
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["tune"]["search"]["judged_on"] == "calibration"
    assert data["validation"]["accuracy"]["relative_drop"] <= 0.01
    assert "relative_accuracy_drop<=0.01" in data["validation"]["tolerances"]


def test_tune_pass_for_recipes(mlp_files: Path) -> None:
    params = Params({"tune_tolerance": "cosine>=0.999", "tune_seed": "1"})
    p = TunePass(tune_config(params))
    assert not params.unused()
    model = io.load(mlp_files)
    report = p.run(model, PassContext(calibration=_feeds(64, 1)))
    assert report.modified
    assert {la["tensor"] for la in report.stats["layers"]} == {"W1", "W2", "W3", "W4"}
    assert report.stats["bytes_after"] < report.stats["bytes_before"]
    with pytest.raises(OnnxCompressError):
        TunePass(tune_config(Params({"tune_tolerance": "cosine"})))
    with pytest.raises(OnnxCompressError):
        TunePass().run(io.load(mlp_files), PassContext())


@pytest.mark.slow
@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM is not downloaded (models/cache is gitignored)")
def test_minilm_cosine_099(tmp_path: Path) -> None:
    register(cli.app)
    out, rep = tmp_path / "m.onnx", tmp_path / "m.json"
    code = cli.main([
        "tune", str(MINILM), "-o", str(out), "--tolerance", "cosine>=0.99",
        "--calibration", str(MINILM.with_name("minilm.calibration.npz")), "--report", str(rep), "--json",
    ])  # fmt: skip
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["size_ratio"] <= 0.19
    assert data["validation"]["outputs"]["sentence_embedding"]["cosine"] >= 0.99
    assert len(data["tune"]["layers"]) >= 37


# --------------------------------------------------------------------------- --objective transport


def test_transport_mixture_is_what_the_search_measured(mlp_files: Path) -> None:
    """Weights fed as inputs (bit ladder, GPTQ) equal the model the int8-weights pass builds, and the
    coded-bytes estimate is close to the package."""
    from onnxcompress.transport import packed_size

    model = io.load(mlp_files)
    calib = _feeds(64, 1)
    cfg = TuneConfig(objective="transport", precisions=("q4", "q5", "q6", "q8", "fp16", "fp32"))
    with Tuner(model, calib, parse_tolerances(["cosine>=0.9"]), cfg) as tuner:
        assert all(la.ladder == ["q4", "q5", "q6", "q8", "fp16", "fp32"] for la in tuner.layers)
        assert all(la.method == "gptq" for la in tuner.layers)
        assert all(la.bytes["q4"] < la.bytes["q6"] < la.bytes["q8"] < la.bytes["fp16"] for la in tuner.layers)
        assignment = {"W1": "q4", "W2": "q6", "W3": "fp16", "W4": "q5"}
        for la in tuner.layers:
            la.precision = assignment[la.tensor]
        fed = tuner._run(tuner._weights(assignment), calib)["y"][0]
        built, reports = tuner.build(PassContext(calibration=calib))
        estimate = tuner.bytes_of(assignment)
    out = mlp_files.parent / "transport.onnx"
    io.save(built, out)
    np.testing.assert_allclose(_run(out, calib[0]), fed, atol=2e-5)
    assert [r.name for r in reports] == ["int8-weights", "fp16"]
    assert reports[0].stats["gptq_layers"] == 3
    symbols = {i.name: nh.to_array(i) for i in onnx.load(out).graph.initializer if i.data_type == T.INT8}
    assert len(symbols) == 3 and max(int(np.abs(q).max()) for q in symbols.values()) <= 127
    # The estimate counts the tuned weights only; the package adds the graph and the headers.
    assert estimate < packed_size(out) < estimate + 6000


def test_transport_search_trades_bits_for_fidelity(mlp_files: Path) -> None:
    calib = _feeds(64, 1)
    sizes = {}
    for tol in ("cosine>=0.99", "cosine>=0.9999"):
        built, result, _ = tune(
            io.load(mlp_files),
            PassContext(calibration=calib),
            parse_tolerances([tol]),
            TuneConfig(objective="transport"),
        )
        assert result.search_passed
        assert all(la.precision.startswith("q") or la.precision in ("fp16", "fp32") for la in result.layers)
        assert any("half of the calibration" in n for n in result.notes)
        sizes[tol] = sum(la.bytes[la.precision] for la in result.layers)
        out = mlp_files.parent / f"t{len(sizes)}.onnx"
        io.save(built, out)
        held = _feeds(48, 2)[0]
        assert _worst_cos(_run(mlp_files, held), _run(out, held)) >= float(tol.split(">=")[1]) - 2e-3
    assert sizes["cosine>=0.99"] < sizes["cosine>=0.9999"]


def test_cli_tune_transport_packs(mlp_files: Path, tmp_path: Path) -> None:
    register(cli.app)
    out, rep = tmp_path / "tuned.onnx", tmp_path / "r.json"
    code = cli.main([
        "tune", str(mlp_files), "-o", str(out), "--tolerance", "cosine>=0.99", "--objective", "transport",
        "--search-on", "calibration", "--ecr-lambda", "0.02", "--pack", "--report", str(rep), "--json",
    ])  # fmt: skip
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["objective"] == "transport" and data["validation"]["passed"]
    package = out.with_suffix(".ocpk")
    assert package.exists() and data["output"]["transport_bytes"] == package.stat().st_size
    assert data["output"]["transport_ratio"] < 0.3
    assert all(la["precision"][0] in "qf" for la in data["tune"]["layers"])
    # Bad transport settings: exit 2 before any work.
    assert cli.main(["tune", str(mlp_files), "-o", str(tmp_path / "x.onnx"), "--objective", "transport",
                     "--precisions", "q9"]) == 2  # fmt: skip
    assert cli.main(["tune", str(mlp_files), "-o", str(tmp_path / "x.onnx"), "--objective", "transport",
                     "--ecr-lambda", "-1"]) == 2  # fmt: skip


def test_tune_pass_transport_objective(mlp_files: Path) -> None:
    params = Params({"tune_tolerance": "cosine>=0.99", "tune_objective": "transport"})
    p = TunePass(tune_config(params))
    assert not params.unused()
    report = p.run(io.load(mlp_files), PassContext(calibration=_feeds(64, 1)))
    assert report.modified
    assert all(la["scheme"][0] in "qf" for la in report.stats["layers"])


@pytest.mark.slow
@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM is not downloaded (models/cache is gitignored)")
def test_minilm_transport_package_under_014(tmp_path: Path) -> None:
    """Issue 12: at worst held-out cosine >= 0.99 the package is <= 0.14 of the float32 file (searched on
    calibration data only, so the 53 held-out sentences stay held out)."""
    register(cli.app)
    out, rep = tmp_path / "m.onnx", tmp_path / "m.json"
    code = cli.main([
        "tune", str(MINILM), "-o", str(out), "--tolerance", "cosine>=0.99", "--objective", "transport",
        "--search-on", "calibration", "--calibration", str(MINILM.with_name("minilm.calibration.npz")),
        "--pack", "--report", str(rep), "--json",
    ])  # fmt: skip
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["output"]["transport_ratio"] <= 0.14
    assert data["validation"]["outputs"]["sentence_embedding"]["cosine"] >= 0.99
    assert out.with_suffix(".ocpk").stat().st_size == data["output"]["transport_bytes"]
