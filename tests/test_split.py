"""Split: planning, part extraction, the manifest, the runner and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _models import conv_model, embedding_model, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcompress import cli, cli_split
from onnxcompress import io as oc_io
from onnxcompress.errors import OnnxCompressError
from onnxcompress.runner import SplitModel
from onnxcompress.split import MANIFEST, Analysis, plan_cuts, split_model

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "models" / "cache" / "minilm" / "minilm.onnx"


# --------------------------------------------------------------------------- models


def mlp_model(layers: int = 6, dim: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x[batch, dim] -> (MatMul W_i -> Add b_i -> Relu) x layers -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        inits += [
            nh.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), f"W{i}"),
            nh.from_array(rng.standard_normal(dim).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            h.make_node("MatMul", [cur, f"W{i}"], [f"mm{i}"], name=f"mm{i}"),
            h.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
            h.make_node("Relu", [f"add{i}"], [f"h{i}" if i < layers - 1 else "y"], name=f"relu{i}"),
        ]
        cur = f"h{i}"
    g = h.make_graph(
        nodes,
        "mlp",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", dim])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", dim])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def resnet_model(seed: int = 0, width: int = 8, blocks: int = 2) -> onnx.ModelProto:
    """A ResNet-style CNN: stem conv, 3 stages of residual blocks (channels x2, spatial /2), pool, Gemm."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        i = count[0] = count[0] + 1
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.extend([nh.from_array(w, f"conv{i}.w"), nh.from_array(np.zeros(cout, np.float32), f"conv{i}.b")])
        pad = k // 2
        nodes.append(
            h.make_node(
                "Conv",
                [x, f"conv{i}.w", f"conv{i}.b"],
                [f"c{i}"],
                name=f"conv{i}",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        if not relu:
            return f"c{i}"
        nodes.append(h.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        return f"r{i}"

    x = conv("x", 3, width, 3)
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            y = conv(x, cin, cout, 3, stride)
            y = conv(y, cout, cout, 3, 1, relu=False)
            skip = conv(x, cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else x
            name = f"s{stage}b{b}"
            nodes += [
                h.make_node("Add", [y, skip], [name + "_add"], name=name + "_add"),
                h.make_node("Relu", [name + "_add"], [name], name=name + "_relu"),
            ]
            x, cin = name, cout
    nodes.append(h.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(h.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    inits.append(nh.from_array(rng.standard_normal((cin, 10)).astype(np.float32) * 0.1, "fc.w"))
    nodes.append(h.make_node("Gemm", ["flat", "fc.w"], ["logits"], name="fc"))
    g = h.make_graph(
        nodes,
        "resnet",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 32, 32])],
        [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def if_chain_model(seed: int = 0) -> onnx.ModelProto:
    """MatMul -> Relu -> If(cond: MatMul with outer weight W1 | Neg) -> MatMul -> Relu -> MatMul."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(4)]
    then_g = h.make_graph(
        [h.make_node("MatMul", ["r0", "W1"], ["t_out"], name="then_mm")],
        "then",
        [],
        [h.make_tensor_value_info("t_out", T.FLOAT, None)],
    )
    else_g = h.make_graph(
        [h.make_node("Neg", ["r0"], ["e_out"], name="else_neg")],
        "else",
        [],
        [h.make_tensor_value_info("e_out", T.FLOAT, None)],
    )
    nodes = [
        h.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"),
        h.make_node("Relu", ["m0"], ["r0"], name="relu0"),
        h.make_node("If", ["cond"], ["branch"], name="the_if", then_branch=then_g, else_branch=else_g),
        h.make_node("MatMul", ["branch", "W2"], ["m2"], name="mm2"),
        h.make_node("Relu", ["m2"], ["r2"], name="relu2"),
        h.make_node("MatMul", ["r2", "W3"], ["y"], name="mm3"),
    ]
    g = h.make_graph(
        nodes,
        "ifchain",
        [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
        [nh.from_array(w, f"W{i}") for i, w in enumerate(ws)],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ort(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def _check_parts(outdir: Path) -> dict:
    manifest = json.loads((outdir / MANIFEST).read_text())
    for p in manifest["parts"]:
        onnx.checker.check_model(str(outdir / p["file"]))
        sess = ort.InferenceSession(str(outdir / p["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == p["inputs"]
        assert [o.name for o in sess.get_outputs()] == p["outputs"]
    return manifest


# --------------------------------------------------------------------------- behaviour


@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM not downloaded (models/cache is gitignored)")
def test_minilm_four_parts_cut_between_layers(tmp_path: Path) -> None:
    out = tmp_path / "minilm.split"
    split_model(MINILM, out, parts=4)
    manifest = _check_parts(out)
    assert len(manifest["parts"]) == 4
    feeds = {k: v[:12] for k, v in np.load(MINILM.with_name("minilm.inputs.npz")).items()}
    ref = _ort(MINILM, feeds)
    got = SplitModel(out).run(feeds)
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape
        assert float(np.max(np.abs(got[name] - ref[name]))) <= 1e-5
    for cut in manifest["cuts"]:
        big = [t for t in cut["tensors"] if t["shape"] and len(t["shape"]) >= 3]
        # between layers: the hidden state [batch, seq, 384] and the expanded mask [batch, 1, seq, seq]
        hidden = [t for t in big if t["shape"][-1] == 384]
        assert len(hidden) == 1, cut
        assert all(t["shape"][-1] == 384 or t["shape"][1] == 1 for t in big), cut
        assert not any(t["shape"][1] == 12 for t in big), cut  # no per-head query/key/value tensors
        assert len(big) <= 2, cut
    assert manifest["stats"]["largest_part_bytes"] == max(p["weight_bytes"] for p in manifest["parts"])


def test_external_data_mlp_budget_and_runner(tmp_path: Path) -> None:
    src = save(mlp_model(layers=8, dim=64), tmp_path / "mlp.onnx", external=True)
    budget = 3 * (64 * 64 * 4 + 64 * 4)  # three layers per part
    out = tmp_path / "mlp.split"
    report = split_model(src, out, max_part_size=budget)
    manifest = _check_parts(out)
    assert len(manifest["parts"]) == 3  # 8 layers, at most 3 per part
    assert all(p["weight_bytes"] <= budget for p in manifest["parts"])
    assert all(len(p["files"]) == 2 for p in manifest["parts"])  # .onnx and its .data
    assert manifest["source"]["data_files"][0]["name"] == "mlp.onnx.data"
    assert report.manifest["cuts"][0]["tensors"][0]["shape"] == ["batch", 64]  # symbolic dims kept
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    ref = _ort(src, {"x": x})["y"]
    model = SplitModel(out, resident=1)
    got = model.run({"x": x})["y"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert model.loads == 3 and not model._sessions  # each part freed after use
    many = model.run_many([{"x": x}, {"x": x[:2]}])["y"]
    np.testing.assert_allclose(many[1], ref[:2], atol=1e-5, rtol=0)
    assert model.loads == 6


def test_parts_balance_flops_resnet(tmp_path: Path) -> None:
    src = save(resnet_model(), tmp_path / "resnet.onnx")
    out = tmp_path / "resnet.split"
    manifest = split_model(src, out, parts=3, balance="flops").manifest
    _check_parts(out)
    flops = [p["flops"] for p in manifest["parts"]]
    assert len(flops) == 3 and min(flops) > 0
    assert max(flops) <= 1.2 * np.mean(flops)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(SplitModel(out).run({"x": x})["logits"], _ort(src, {"x": x})["logits"], atol=1e-5)


def test_if_node_stays_whole(tmp_path: Path) -> None:
    src = save(if_chain_model(), tmp_path / "if.onnx")
    out = tmp_path / "if.split"
    manifest = split_model(src, out, parts=3).manifest
    _check_parts(out)
    holders = [p for p in manifest["parts"] if p["control_flow_nodes"] == ["the_if"]]
    assert len(holders) == 1
    # the subgraph's outer names (r0, W1) are in that part: r0 as an input or computed there, W1 as a weight
    part = onnx.load(str(out / holders[0]["file"]))
    assert "W1" in {t.name for t in part.graph.initializer}
    model = SplitModel(out)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        np.testing.assert_allclose(model.run(feed)["y"], _ort(src, feed)["y"], rtol=1e-6, atol=1e-5)


def test_shared_weight_duplicated_and_reported(tmp_path: Path) -> None:
    src = save(embedding_model(tied=True), tmp_path / "tied.onnx")
    out = tmp_path / "tied.split"
    manifest = split_model(src, out, parts=2).manifest
    _check_parts(out)
    assert [s["name"] for s in manifest["shared_weights"]] == ["E"]
    assert manifest["stats"]["duplicated_bytes"] == 100 * 64 * 4
    ids = np.random.default_rng(0).integers(0, 100, (2, 5)).astype(np.int64)
    ref, got = _ort(src, {"ids": ids}), SplitModel(out).run({"ids": ids})
    assert list(got) == ["y", "logits"]
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])


def test_constant_node_weights_go_with_their_readers(tmp_path: Path) -> None:
    src = save(conv_model(constant_nodes=True), tmp_path / "c.onnx")
    out = tmp_path / "c.split"
    manifest = split_model(src, out, max_part_size=10 * 8 * 12 * 12 * 4 + 10 * 4).manifest
    _check_parts(out)
    assert len(manifest["parts"]) == 2  # the Gemm's weight and bias (45 KiB) alone in the last part
    assert all(p["weight_bytes"] <= manifest["options"]["max_part_size"] for p in manifest["parts"])
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(SplitModel(out).run({"x": x})["logits"], _ort(src, {"x": x})["logits"], atol=1e-5)


def test_plan_prefers_single_tensor_cuts() -> None:
    """A residual block: a cut inside it carries two tensors, after it one."""
    an = Analysis(resnet_model())
    plan = plan_cuts(an, parts=2, balance="size")
    cut = plan.cuts[0]
    assert len(an.crossing_tensors(cut)) == 1


def test_resident_parts(tmp_path: Path) -> None:
    src = save(mlp_model(layers=6), tmp_path / "mlp.onnx")
    out = tmp_path / "s"
    split_model(src, out, parts=3)
    x = np.ones((1, 64), np.float32)
    pinned = SplitModel(out, resident=2)
    pinned.run({"x": x})
    pinned.run({"x": x})
    assert pinned.loads == 5  # part 1 stays, parts 2 and 3 take turns in the other slot
    everything = SplitModel(out, resident=3)
    everything.run({"x": x})
    everything.run({"x": x})
    assert everything.loads == 3


# --------------------------------------------------------------------------- bad input


def test_budget_below_largest_tensor_names_it(tmp_path: Path) -> None:
    src = save(mlp_model(layers=3), tmp_path / "mlp.onnx")
    out = tmp_path / "s"
    with pytest.raises(OnnxCompressError, match="'W0'"):
        split_model(src, out, max_part_size=1000)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(oc_io.TMP_PREFIX)]


def test_too_many_parts(tmp_path: Path) -> None:
    src = save(mlp_model(layers=2), tmp_path / "mlp.onnx")
    with pytest.raises(OnnxCompressError, match="--parts 7 is more than"):
        split_model(src, tmp_path / "s", parts=7)
    split_model(src, tmp_path / "s", parts=6)  # one node per part is the limit
    assert len(SplitModel(tmp_path / "s")) == 6


def test_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save(mlp_model(layers=4), tmp_path / "mlp.onnx")
    out = tmp_path / "s"
    real_stage, calls = oc_io.stage, []

    def failing_stage(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise OnnxCompressError("disk full (simulated)")
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(oc_io, "stage", failing_stage)
    with pytest.raises(OnnxCompressError, match="simulated"):
        split_model(src, out, parts=2)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
    monkeypatch.undo()
    split_model(src, out, parts=2)
    with pytest.raises(OnnxCompressError, match="exists"):
        split_model(src, out, parts=2)
    split_model(src, out, parts=3, force=True)
    assert len(SplitModel(out)) == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OnnxCompressError, match="no manifest.json"):
        split_model(src, other, parts=2, force=True)
    assert (other / "keep.txt").exists()


def test_hash_mismatch_and_missing_part(tmp_path: Path) -> None:
    src = save(mlp_model(layers=4), tmp_path / "mlp.onnx")
    out = tmp_path / "s"
    manifest = split_model(src, out, parts=2).manifest
    x = {"x": np.ones((1, 64), np.float32)}
    second = out / manifest["parts"][1]["file"]
    data = bytearray(second.read_bytes())
    data[-5] ^= 0xFF
    second.write_bytes(bytes(data))
    model = SplitModel(out)
    with pytest.raises(OnnxCompressError, match="does not match the sha256"):
        model.run(x)
    second.unlink()
    with pytest.raises(OnnxCompressError, match="missing"):
        SplitModel(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(OnnxCompressError, match="manifest.json"):
        SplitModel(out)


def test_manifest_paths_stay_inside(tmp_path: Path) -> None:
    src = save(mlp_model(layers=2), tmp_path / "mlp.onnx")
    out = tmp_path / "s"
    split_model(src, out, parts=2)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["parts"][0]["file"] = "../mlp.onnx"
    manifest["parts"][0]["files"][0]["name"] = "../mlp.onnx"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OnnxCompressError, match="not a plain file name"):
        SplitModel(out)


# --------------------------------------------------------------------------- CLI


def test_cli_split_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_split.register(cli.app)
    cli_split.register(cli.app)  # idempotent
    src = save(mlp_model(layers=4), tmp_path / "mlp.onnx")
    out = tmp_path / "s"
    report = tmp_path / "r.json"
    assert cli.main(["split", str(src), "-o", str(out), "--parts", "2", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["stats"]["num_parts"] == 2
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    res = tmp_path / "out.npz"
    assert cli.main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--output", str(res)]) == 0
    with np.load(res) as got:
        np.testing.assert_allclose(got["y"], _ort(src, {"x": x})["y"], atol=1e-5)
    capsys.readouterr()
    assert cli.main(["split", str(src), "-o", str(tmp_path / "t"), "--max-part-size", "1KB"]) == 2
    assert "'W0'" in capsys.readouterr().err
    assert cli.main(["split", str(src), "-o", str(tmp_path / "t")]) == 2
    assert cli.main(["split", str(src), "-o", str(tmp_path / "t"), "--parts", "2", "--balance", "speed"]) == 2
    assert cli.main(["split", str(src), "-o", str(tmp_path / "t"), "--parts", "99"]) == 2
    assert not (tmp_path / "t").exists()
    (out / "part02.onnx").unlink()
    assert cli.main(["run", str(out), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "missing" in capsys.readouterr().err
