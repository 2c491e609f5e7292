"""diagnose: per-layer error localisation ranks the layer that adds the error, not those after it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress.cli as cli
from onnxcompress.cli_diagnose import register
from onnxcompress.diagnose import diagnose
from onnxcompress.errors import OnnxCompressError

LAYERS = 6
DAMAGED = 3  # 1-based: mm3
WIDTH = 32


def chain(seed: int = 0) -> onnx.ModelProto:
    """x[N, 32] -> 6 x (MatMul W_i -> Add b_i -> Tanh) -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(1, LAYERS + 1):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH) * 1.5).astype(np.float32)
        inits += [
            nh.from_array(w, f"W{i}"),
            nh.from_array(rng.standard_normal(WIDTH).astype(np.float32) * 0.1, f"b{i}"),
        ]
        out = "y" if i == LAYERS else f"t{i}"
        nodes += [
            h.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"),
            h.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
            h.make_node("Tanh", [f"add{i}"], [out], name=f"tanh{i}"),
        ]
        prev = out
    g = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", WIDTH])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", WIDTH])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def weight_quantized(model: onnx.ModelProto, bits: dict[int, int]) -> onnx.ModelProto:
    """Every MatMul weight as int8 codes + DequantizeLinear (per tensor, symmetric) with ``bits`` per layer."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, dq_nodes = [], []
    for t in m.graph.initializer:
        if not t.name.startswith("W"):
            keep.append(t)
            continue
        i = int(t.name[1:])
        w = nh.to_array(t)
        qmax = 2 ** (bits.get(i, 8) - 1) - 1
        scale = np.float32(np.abs(w).max() / max(qmax, 1))
        q = np.clip(np.round(w / scale), -qmax - 1, qmax).astype(np.int8)
        keep += [
            nh.from_array(q, f"{t.name}_quantized"),
            nh.from_array(np.array(scale, np.float32), f"{t.name}_scale"),
        ]
        dq_nodes.append(
            h.make_node(
                "DequantizeLinear",
                [f"{t.name}_quantized", f"{t.name}_scale"],
                [f"{t.name}_dequantized"],
                name=f"{t.name}_DequantizeLinear",
            )
        )
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    nodes = list(m.graph.node)
    for node in nodes:
        if node.op_type == "MatMul":
            node.input[1] = node.input[1] + "_dequantized"
    del m.graph.node[:]
    m.graph.node.extend(dq_nodes + nodes)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    d = tmp_path_factory.mktemp("chain")
    src, cand = d / "chain.onnx", d / "chain_q.onnx"
    m = chain()
    onnx.save(m, str(src))
    onnx.save(weight_quantized(m, {DAMAGED: 2}), str(cand))
    feeds = [{"x": np.random.default_rng(i).standard_normal((16, WIDTH)).astype(np.float32)} for i in range(3)]
    np.savez(d / "inputs.npz", **feeds[0])
    return src, cand, feeds


def test_damaged_layer_ranks_first(models: tuple[Path, Path, list[dict[str, np.ndarray]]]) -> None:
    src, cand, feeds = models
    r = diagnose(src, cand, feeds)
    top = r.layers[0]
    assert (top.node, top.op_type, top.tensor) == (f"matmul{DAMAGED}", "MatMul", f"mm{DAMAGED}")
    assert top.changed_by == "weight quantization"
    order = [x.tensor for x in r.layers]
    for i in range(DAMAGED + 1, LAYERS + 1):  # later layers (inheriting its error) rank below it
        assert order.index(f"mm{i}") > 0
    # The inherited error grows after the damaged layer, the local error does not.
    by = {x.tensor: x for x in r.layers}
    assert by[f"mm{DAMAGED + 1}"].cosine < by[f"mm{DAMAGED - 1}"].cosine
    assert by[f"mm{DAMAGED + 1}"].local_error < top.local_error / 4
    # Elementwise layers fed the original's inputs add nothing.
    assert by[f"t{DAMAGED}"].local_error == pytest.approx(0.0, abs=1e-6)
    assert by[f"add{DAMAGED}"].local_error == pytest.approx(0.0, abs=1e-6)
    assert r.matched == 3 * LAYERS


def test_local_error_is_the_layer_alone(models: tuple[Path, Path, list[dict[str, np.ndarray]]]) -> None:
    """local_error of mm3 = ||x2 @ (W3' - W3)|| / ||x2 @ W3|| with x2 the original's input to it."""
    import onnxruntime as ort

    src, cand, feeds = models
    m, q = onnx.load(str(src)), onnx.load(str(cand))
    w = {t.name: nh.to_array(t) for t in m.graph.initializer}
    qi = {t.name: nh.to_array(t) for t in q.graph.initializer}
    w3q = qi["W3_quantized"].astype(np.float32) * qi["W3_scale"]
    tapped = onnx.load(str(src))
    tapped.graph.output.append(onnx.ValueInfoProto(name="t2"))
    sess = ort.InferenceSession(tapped.SerializeToString())
    num = den = 0.0
    for feed in feeds:
        x2 = sess.run(["t2"], feed)[0].astype(np.float64)
        num += float(np.sum((x2 @ (w3q - w["W3"])) ** 2))
        den += float(np.sum((x2 @ w["W3"]) ** 2))
    r = diagnose(src, cand, feeds)
    mm3 = next(x for x in r.layers if x.tensor == "mm3")
    assert mm3.local_error == pytest.approx(np.sqrt(num / den), rel=1e-3)


def test_chunks_give_the_same_answer(models: tuple[Path, Path, list[dict[str, np.ndarray]]]) -> None:
    src, cand, feeds = models
    one = diagnose(src, cand, feeds)
    many = diagnose(src, cand, feeds, chunk_bytes=1)  # one tensor per chunk
    assert many.chunks == one.matched and one.chunks == 1
    a = {x.tensor: (x.local_error, x.cosine, x.max_abs) for x in one.layers}
    b = {x.tensor: (x.local_error, x.cosine, x.max_abs) for x in many.layers}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)  # onnxruntime fuses differently per slice


def test_identical_models_have_no_error(models: tuple[Path, Path, list[dict[str, np.ndarray]]]) -> None:
    src, _, feeds = models
    r = diagnose(src, src, feeds[:1])
    assert all(x.local_error == 0 and x.changed_by is None for x in r.layers)


def test_mismatched_outputs_are_refused(models: tuple[Path, Path, list[dict[str, np.ndarray]]], tmp_path: Path) -> None:
    src, _, feeds = models
    m = chain()
    m.graph.output[0].name = "z"
    m.graph.node[-1].output[0] = "z"
    other = tmp_path / "other.onnx"
    onnx.save(m, str(other))
    with pytest.raises(OnnxCompressError, match="inputs or outputs differ"):
        diagnose(src, other, feeds)


def test_cli_diagnose(models: tuple[Path, Path, list[dict[str, np.ndarray]]], tmp_path: Path, capsys) -> None:
    register(cli.app)
    register(cli.app)  # idempotent
    src, cand, _ = models
    report = tmp_path / "d.json"
    code = cli.main(["diagnose", str(src), str(cand), "--inputs", str(src.parent / "inputs.npz"), "--top", "3",
                     "--report", str(report)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"matmul{DAMAGED}" in printed and "Layers by local error" in printed
    data = json.loads(report.read_text())
    first = data["layers"][0]
    assert {"node", "op_type", "tensor", "local_error", "cosine", "snr_db", "max_abs"} <= first.keys()
    assert first["node"] == f"matmul{DAMAGED}"
    errors = [x["local_error"] for x in data["layers"]]
    assert errors == sorted(errors, reverse=True)
    other = tmp_path / "o.onnx"
    m = chain()
    m.graph.output[0].name = "z"
    m.graph.node[-1].output[0] = "z"
    onnx.save(m, str(other))
    assert cli.main(["diagnose", str(src), str(other), "--inputs", str(src.parent / "inputs.npz")]) == 2


@pytest.mark.parametrize("technique", ["int8-dynamic", "int8-static"])
def test_our_passes_outputs_are_matched(
    models: tuple[Path, Path, list[dict[str, np.ndarray]]], tmp_path: Path, technique: str
) -> None:
    """Tensor names survive our passes: every MatMul layer is matched and attributed to a quantization."""
    import onnxcompress as oc

    src, _, feeds = models
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(9).standard_normal((64, WIDTH)).astype(np.float32))
    out = tmp_path / f"{technique}.onnx"
    params = {"min_elements": "16"} if technique == "int8-dynamic" else None
    oc.compress(src, out, [technique], calibration=calib, validate=False, force=True, params=params)
    r = diagnose(src, out, feeds)
    by = {x.tensor: x for x in r.layers}
    assert not r.notes and all(x.local_error is not None for x in r.layers)
    # fold turns MatMul + Add into Gemm: the layer's tensor is then the Add's output.
    layers = [by[f"mm{i}"] if f"mm{i}" in by else by[f"add{i}"] for i in range(1, LAYERS + 1)]
    assert all(x.node == f"matmul{i}" for i, x in enumerate(layers, 1))
    # int8-static: the input's Q/DQ belongs to the layer producing the input; this one only has weight DQ.
    allowed = {technique, "weight quantization"}
    assert all(x.changed_by in allowed and 0 < x.local_error < 0.05 for x in layers), layers
    assert any(x.changed_by == technique for x in r.layers)


def test_compress_report_names_the_pass(models: tuple[Path, Path, list[dict[str, np.ndarray]]], tmp_path: Path) -> None:
    import onnxcompress as oc

    register(cli.app)
    src, _, feeds = models
    out, rep = tmp_path / "w.onnx", tmp_path / "r.json"
    r = oc.compress(src, out, ["int8-weights-qdq"], validate=False, force=True)
    rep.write_text(json.dumps(r.to_dict()))
    d = diagnose(src, out, feeds, compress_report=json.loads(rep.read_text()))
    quantized = [x for x in d.layers if x.changed_by and "int8-weights-qdq" in x.changed_by]
    assert {x.node for x in quantized} == {f"matmul{i}" for i in range(1, LAYERS + 1)}
    assert all(x.changed_by is None for x in d.layers if x.op_type == "Tanh")
    code = cli.main(["diagnose", str(src), str(out), "--inputs", str(src.parent / "inputs.npz"), "--compress-report",
                     str(rep), "--report", str(tmp_path / "d.json")])  # fmt: skip
    assert code == 0
    assert "int8-weights-qdq" in json.loads((tmp_path / "d.json").read_text())["layers"][0]["changed_by"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1")
    assert cli.main(["diagnose", str(src), str(out), "--compress-report", str(bad)]) == 2
