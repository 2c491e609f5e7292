"""Memory bounds of ``compress`` and the mechanisms behind them.

* loading leaves large inline initializers in the file (``io.InlineValues``), read when a pass asks;
* saving streams the initializers one at a time (no whole-model protobuf or serialized copy);
* validation runs one model at a time, in slices of a few samples along the batch axis;
* calibration taps cut feeds the same way.

The end-to-end check runs ``onnxcompress compress`` on a generated ~100 MB model in a subprocess and
bounds its peak RSS above the RSS after imports (``VmHWM`` minus ``VmRSS``): the fixed cost of
Python and onnxruntime is not the model's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from _models import cli_peak_rss, matmul_model, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcompress import io
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.calibrate import ActivationTap
from onnxcompress.validate import (
    VALIDATION_ROWS,
    _rows_for,
    _run_feed,
    batch_rows,
    compare,
    make_session,
    run_session,
)

MB = 2**20


def _big_model(path: Path, layers: int = 6, width: int = 2048, seed: int = 0) -> int:
    """x[batch, width] -> (MatMul W_i -> Add b_i -> Relu) x layers: ``layers * width^2 * 4`` bytes of weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        b = rng.standard_normal(width).astype(np.float32) * 0.01
        inits += [nh.from_array(w, f"W{i}"), nh.from_array(b, f"b{i}")]
        out = "y" if i == layers - 1 else f"r{i}"
        nodes += [
            h.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
            h.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
            h.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"),
        ]
        prev = out
    g = h.make_graph(
        nodes,
        "big",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", width])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", width])],
        inits,
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    np.savez(path.with_name(path.stem + ".inputs.npz"), x=rng.standard_normal((32, width)).astype(np.float32))
    return path.stat().st_size


# Measured: 1.4x for both (before this work: 4.2x fp16, 5.4x int8-weights).
@pytest.mark.parametrize(("mode", "bound"), [("fp16", 2.0), ("int8-weights", 2.0)])
def test_compress_peak_rss_above_imports_is_bounded(tmp_path: Path, mode: str, bound: float) -> None:
    model = tmp_path / "big.onnx"
    size = _big_model(model)
    assert size > 95 * MB
    argv = [str(model), "-o", str(tmp_path / "out.onnx"), "-q", mode, "--no-transport-size", "--force"]
    code, delta, stderr = cli_peak_rss(["compress", *argv], tmp_path / "rss.json")
    assert code == 0, stderr
    # The whole run (load, fold, the pass, write, onnx's checker, two onnxruntime sessions one after
    # the other) above the imports: the peak is the session on the fp32 original (from an
    # external-data copy: its weights once).
    assert delta < bound * size, f"peak RSS {delta / MB:.0f} MB above imports for a {size / MB:.0f} MB model"


# --------------------------------------------------------------------------- lazy load, streamed save


def test_large_initializers_stay_in_the_file_until_read(tmp_path: Path) -> None:
    path = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")  # W: 8 KB (lazy), b: 128 B, W2: 1280 B
    model = io.load(path)
    consts = {t.name: t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)}
    assert isinstance(consts["W"]._values, io.InlineValues)
    assert not isinstance(consts["b"]._values, io.InlineValues)  # small ones are parsed as usual
    assert not model.external_data
    original = {t.name: nh.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name, c in consts.items():
        np.testing.assert_array_equal(c.values, original[name])


@pytest.mark.parametrize("external", [False, True])
def test_streamed_save_roundtrips(tmp_path: Path, external: bool) -> None:
    path = save(matmul_model(k=256, n=64), tmp_path / "m.onnx")
    model = io.load(path)
    w2 = next(t for t in model.graph.tensors().values() if t.name == "W2")
    w2.values = (w2.values * 2).astype(np.float32)  # one changed weight, the others still lazy
    out = io.save(model, tmp_path / "out.onnx", external=external)
    onnx.checker.check_model(str(out))
    a, b = onnx.load(str(path)), onnx.load(str(out))
    got = {t.name: nh.to_array(t) for t in b.graph.initializer}
    for t in a.graph.initializer:
        expect = nh.to_array(t) * (2 if t.name == "W2" else 1)
        np.testing.assert_array_equal(got[t.name], expect)
    assert [n.op_type for n in b.graph.node] == [n.op_type for n in a.graph.node]
    assert (tmp_path / "out.onnx.data").exists() == external
    # Saving twice gives the same bytes, and the model loads back lazily again.
    again = io.save(io.load(out), tmp_path / "again.onnx", external=external)
    assert onnx.load(str(again)) == b


def test_source_changed_after_load_is_refused(tmp_path: Path) -> None:
    path = save(matmul_model(k=64, n=32), tmp_path / "m.onnx")
    model = io.load(path)
    save(matmul_model(k=64, n=32, seed=1), path)  # replaced under the loaded model
    os.utime(path, ns=(1, 1))
    with pytest.raises(OnnxCompressError, match="changed"):
        io.save(model, tmp_path / "out.onnx")


def test_symlinked_model_loads_whole(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    real = save(matmul_model(k=64, n=32), tmp_path / "real" / "m.onnx")
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    model = io.load(link)  # an external-data reference could not name the file: parsed whole
    consts = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
    assert not any(isinstance(t._values, io.InlineValues) for t in consts)
    io.save(model, tmp_path / "out.onnx")
    np.testing.assert_array_equal(
        nh.to_array(onnx.load(str(tmp_path / "out.onnx")).graph.initializer[0]),
        nh.to_array(onnx.load(str(real)).graph.initializer[0]),
    )


# --------------------------------------------------------------------------- sliced runs


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_batch_rows_needs_one_symbolic_batch_axis() -> None:
    assert batch_rows(_session(matmul_model())) > 0
    seq = matmul_model()
    for vi in (seq.graph.input[0], seq.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "sequence"
    assert batch_rows(_session(seq)) == 0
    fixed = matmul_model()
    for vi in (fixed.graph.input[0], fixed.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 5
    assert batch_rows(_session(fixed)) == 0


def test_sliced_run_equals_whole_run() -> None:
    sess = _session(matmul_model())
    feed = {"x": np.random.default_rng(0).standard_normal((11, 4, 64)).astype(np.float32)}
    whole = run_session(sess, [feed], "m")
    sliced = run_session(sess, [feed], "m", rows=3)
    np.testing.assert_allclose(sliced["y"][0], whole["y"][0], rtol=1e-5, atol=1e-5)
    assert sliced["y"][0].shape == (11, 4, 10)


def test_output_without_the_batch_axis_falls_back_to_the_whole_feed() -> None:
    # The output claims the batch axis but sums over it: slices would give a different answer.
    g = h.make_graph(
        [h.make_node("ReduceSum", ["x"], ["y"], keepdims=1)],
        "sum",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 1])],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    sess = _session(model)
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    out = _run_feed(sess, ["y"], {"x": x}, rows=4)
    np.testing.assert_allclose(out[0], x.sum().reshape(1, 1))


def test_compare_sliced_matches_whole(tmp_path: Path) -> None:
    a = save(matmul_model(), tmp_path / "a.onnx")
    b = save(matmul_model(seed=3), tmp_path / "b.onnx")
    feeds = [{"x": np.random.default_rng(1).standard_normal((20, 4, 64)).astype(np.float32)}]
    report = compare(a, b, feeds, ["cosine>=-1"])
    ref = run_session(make_session(a), feeds, "a")
    cand = run_session(make_session(b), feeds, "b")
    flat = [(r.reshape(20, -1), c.reshape(20, -1)) for r, c in zip(ref["y"], cand["y"])]
    cos = min(
        float(np.dot(r[i], c[i]) / np.linalg.norm(r[i]) / np.linalg.norm(c[i])) for r, c in flat for i in range(20)
    )
    assert report.outputs["y"].cosine == pytest.approx(cos, abs=1e-5)


def test_activation_tap_iterates_in_slices(tmp_path: Path) -> None:
    model = io.load(save(matmul_model(), tmp_path / "m.onnx"))
    feed = {"x": np.random.default_rng(2).standard_normal((10, 4, 64)).astype(np.float32)}
    with ActivationTap(model, ["relu"], rows=4) as tap:
        whole = tap.run(feed)["relu"]
        parts = [acts["relu"] for acts in tap.iterate([feed])]
    assert [p.shape[0] for p in parts] == [4, 4, 2]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-6)


def test_dynamic_quantization_is_validated_in_slices(tmp_path: Path) -> None:
    # DynamicQuantizeLinear scales over its run: validation slices it like any other model (bounded
    # memory for any number of samples), so each slice of VALIDATION_ROWS gets its own scale.
    g = h.make_graph(
        [
            h.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "dql",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    dql = save(model, tmp_path / "dql.onnx")
    # The original: y = x, with 9 MB of (unused) weights so that its feeds are sliced.
    pad = nh.from_array(np.zeros(9 * MB // 4, np.float32), "pad")
    ident = h.make_graph(
        [h.make_node("Identity", ["x"], ["y"])],
        "ident",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])],
        [pad],
    )
    original = save(h.make_model(ident, opset_imports=[h.make_opsetid("", 17)], ir_version=8), tmp_path / "id.onnx")
    sess = make_session(dql)
    assert batch_rows(sess) == VALIDATION_ROWS
    assert _rows_for(sess, original) == VALIDATION_ROWS  # a large original: sliced, DQL or not
    assert _rows_for(sess, dql) == 0  # a small original: whole feeds
    assert _rows_for(make_session(plain := save(matmul_model(), tmp_path / "plain.onnx")), plain) == 0
    rng = np.random.default_rng(3)
    n = 2 * VALIDATION_ROWS + 3
    x = (rng.standard_normal((n, 4)) * np.repeat([1.0, 100.0, 5.0], [8, 8, 3])[:, None]).astype(np.float32)
    whole = sess.run(None, {"x": x})[0]
    sliced = np.concatenate(
        [sess.run(None, {"x": x[r : r + VALIDATION_ROWS]})[0] for r in range(0, n, VALIDATION_ROWS)]
    )
    assert not np.allclose(sliced, whole)  # the slices' scales differ from the whole run's
    np.testing.assert_array_equal(_run_feed(sess, ["y"], {"x": x}, rows=VALIDATION_ROWS)[0], sliced)
    report = compare(original, dql, [{"x": x}], ["cosine>=0"], parts=False)
    assert report.outputs["y"].max_abs == pytest.approx(float(np.max(np.abs(sliced - x))), rel=1e-6)
    assert report.outputs["y"].max_abs != pytest.approx(float(np.max(np.abs(whole - x))), rel=1e-3)
