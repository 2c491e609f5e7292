"""Tiny seeded models built with onnx.helper, and shared assertions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def matmul_model(m: int = 4, k: int = 64, n: int = 32, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[?, m, k] @ W[k, n] + b -> Relu -> @ W2[n, 10]."""
    rng = _rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    w2 = rng.standard_normal((n, 10)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["mm"], name="mm1"),
        h.make_node("Add", ["mm", "b"], ["add"], name="add1"),
        h.make_node("Relu", ["add"], ["relu"], name="relu1"),
        h.make_node("MatMul", ["relu", "W2"], ["y"], name="mm2"),
    ]
    g = h.make_graph(
        nodes,
        "matmul",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", m, k])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", m, 10])],
        [nh.from_array(w, "W"), nh.from_array(b, "b"), nh.from_array(w2, "W2")],
    )
    return _model(g, opset)


def conv_model(seed: int = 0, opset: int = 17, constant_nodes: bool = False) -> onnx.ModelProto:
    """Conv(3->16, 3x3) -> Relu -> ConvTranspose(16->8) -> Flatten -> Gemm(transB=1) -> logits[?, 10]."""
    rng = _rng(seed)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 2, 2)) * 0.3).astype(np.float32)
    wg = (rng.standard_normal((10, 8 * 12 * 12)) * 0.05).astype(np.float32)
    bg = rng.standard_normal(10).astype(np.float32)
    consts = {"W1": w1, "B1": b1, "W2": w2, "WG": wg, "BG": bg}
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("ConvTranspose", ["r1", "W2"], ["c2"], name="deconv", strides=[2, 2]),
        h.make_node("Flatten", ["c2"], ["f"], name="flatten", axis=1),
        h.make_node("Gemm", ["f", "WG", "BG"], ["logits"], name="gemm", transB=1),
    ]
    inits = []
    if constant_nodes:
        nodes = [
            h.make_node("Constant", [], [k], name=f"const_{k}", value=nh.from_array(v, k + "_value"))
            for k, v in consts.items()
        ] + nodes
    else:
        inits = [nh.from_array(v, k) for k, v in consts.items()]
    g = h.make_graph(
        nodes,
        "conv",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 6, 6])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["N", 10])],
        inits,
    )
    return _model(g, opset)


def if_model(seed: int = 0, shared: bool = True) -> onnx.ModelProto:
    """If(cond) with MatMul weights in both branches; ``shared`` puts one outer weight in both."""
    rng = _rng(seed)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w_else = rng.standard_normal((32, 16)).astype(np.float32)
    then_g = h.make_graph(
        [h.make_node("MatMul", ["x", "W"], ["t_out"], name="then_mm")],
        "then",
        [],
        [h.make_tensor_value_info("t_out", T.FLOAT, None)],
    )
    else_inits = [] if shared else [nh.from_array(w_else, "W_else")]
    else_nodes = [
        h.make_node("MatMul", ["x", "W" if shared else "W_else"], ["e_mm"], name="else_mm"),
        h.make_node("Neg", ["e_mm"], ["e_out"], name="else_neg"),
    ]
    else_g = h.make_graph(else_nodes, "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)], else_inits)
    g = h.make_graph(
        [h.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "ifm",
        [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, ["N", 32])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
        [nh.from_array(w, "W")],
    )
    return _model(g)


def custom_op_model() -> onnx.ModelProto:
    """A model with an op nobody defines (domain my.custom)."""
    g = h.make_graph(
        [h.make_node("Frobnicate", ["x"], ["y"], domain="my.custom")],
        "custom",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("my.custom", 1)])
    m.ir_version = 8
    return m


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    """Save with onnx itself (the reference writer), optionally with external data."""
    path = Path(path)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def tiny_transformer_split(
    calib_rows: int = 48, held_from: int = 64
) -> tuple[Path, list[dict[str, np.ndarray]], dict[str, np.ndarray], np.ndarray]:
    """The bundled tiny transformer, a calibration feed (its first ``calib_rows`` samples), the
    held-out samples from ``held_from`` on, and the float model's first output on those."""
    src = Path(__file__).resolve().parent.parent / "models" / "tiny_transformer.onnx"
    feeds = dict(np.load(src.with_suffix(".inputs.npz")))
    calib = [{k: v[:calib_rows] for k, v in feeds.items()}]
    held = {k: v[held_from:] for k, v in feeds.items()}
    return src, calib, held, run(src, held)[0]


def run(path: Path | str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model file in onnxruntime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_equivalent(
    original: Path | str,
    candidate: Path | str,
    feeds: list[dict[str, np.ndarray]],
    atol: float = 0.0,
    rtol: float = 0.0,
) -> None:
    """Both models give the same outputs on every feed, within atol/rtol."""
    for feed in feeds:
        for a, b in zip(run(original, feed), run(candidate, feed)):
            np.testing.assert_allclose(b, a, atol=atol, rtol=rtol)


def embedding_model(vocab: int = 100, dim: int = 64, seed: int = 0, tied: bool = False) -> onnx.ModelProto:
    """ids[N, T] -> Gather(E[vocab, dim]) -> MatMul(W[dim, 16]); ``tied`` also reads E in a MatMul."""
    rng = _rng(seed)
    e = rng.standard_normal((vocab, dim)).astype(np.float32)
    w = rng.standard_normal((dim, 16)).astype(np.float32)
    nodes = [
        h.make_node("Gather", ["E", "ids"], ["emb"], name="embed", axis=0),
        h.make_node("MatMul", ["emb", "W"], ["y"], name="proj"),
    ]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, ["N", "T", 16])]
    if tied:
        nodes += [
            h.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
            h.make_node("MatMul", ["emb", "Et"], ["logits"], name="lm_head"),
        ]
        outputs.append(h.make_tensor_value_info("logits", T.FLOAT, ["N", "T", vocab]))
    g = h.make_graph(
        nodes,
        "embed",
        [h.make_tensor_value_info("ids", T.INT64, ["N", "T"])],
        outputs,
        [nh.from_array(e, "E"), nh.from_array(w, "W")],
    )
    return _model(g)


def shape_chain_model(seed: int = 0) -> onnx.ModelProto:
    """x[N, 4, 8]: static Shape->Gather->Unsqueeze->Concat->Reshape, a constant subgraph (Transpose,
    Mul), a ConstantOfShape bomb guarded by size, and a Constant node."""
    rng = _rng(seed)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [
        h.make_node("Shape", ["x"], ["shp"], name="shape"),
        h.make_node("Constant", [], ["idx"], name="const_idx", value=nh.from_array(np.array([1, 2], np.int64))),
        h.make_node("Gather", ["shp", "idx"], ["dims"], name="gather", axis=0),  # [4, 8]: static
        h.make_node("ReduceProd", ["dims"], ["prod"], name="prod", keepdims=1),  # [32]
        h.make_node("Constant", [], ["minus1"], name="const_m1", value=nh.from_array(np.array([-1], np.int64))),
        h.make_node("Concat", ["minus1", "prod"], ["newshape"], name="concat", axis=0),
        h.make_node("Reshape", ["x", "newshape"], ["flat"], name="reshape"),  # [N, 32]
        h.make_node("Transpose", ["Wt"], ["W"], name="transpose_w", perm=[1, 0]),  # constant subgraph
        h.make_node("Mul", ["W", "two"], ["W2"], name="scale_w"),
        h.make_node("MatMul", ["flat", "W2"], ["y"], name="mm"),
        h.make_node(
            "ConstantOfShape", ["big_shape"], ["zeros"], name="bomb", value=nh.from_array(np.array([0.0], np.float32))
        ),
        h.make_node("ReduceSum", ["zeros"], ["zsum"], name="zsum", keepdims=0),
        h.make_node("Add", ["y", "zsum"], ["out"], name="add"),
    ]
    g = h.make_graph(
        nodes,
        "shapes",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 8])],
        [h.make_tensor_value_info("out", T.FLOAT, ["N", 8])],
        [
            nh.from_array(np.ascontiguousarray(w.T), "Wt"),
            nh.from_array(np.array(2.0, np.float32), "two"),
            nh.from_array(np.array([1000, 1000], np.int64), "big_shape"),
        ],
    )
    return _model(g)


# --- fusion builders (tests/test_fold_fusions.py) ---------------------------------------------------


def conv_bn_model(
    op: str = "Conv",
    group: int = 1,
    bias: bool = True,
    seed: int = 0,
    opset: int = 17,
    constant_nodes: bool = False,
    extra_reader: bool = False,
    dynamic_mean: bool = False,
) -> onnx.ModelProto:
    """x[N, 4, 6, 6] -> ``op`` (Conv or ConvTranspose, 4 -> 6 channels, 3x3, ``group``) -> BatchNormalization
    -> Relu -> y. ``extra_reader`` also returns the conv output as ``c``; ``dynamic_mean`` makes the
    BatchNormalization mean a graph input; ``constant_nodes`` gives the weights as Constant nodes."""
    rng = _rng(seed)
    cin, cout = 4, 6
    wshape = (cout, cin // group, 3, 3) if op == "Conv" else (cin, cout // group, 3, 3)
    consts = {"W": (rng.standard_normal(wshape) * 0.3).astype(np.float32)}
    if bias:
        consts["B"] = rng.standard_normal(cout).astype(np.float32)
    consts["gamma"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    consts["beta"] = rng.standard_normal(cout).astype(np.float32)
    if not dynamic_mean:
        consts["mean"] = rng.standard_normal(cout).astype(np.float32)
    consts["var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    conv_inputs = ["x", "W"] + (["B"] if bias else [])
    nodes = [
        h.make_node(op, conv_inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn", epsilon=1e-3),
        h.make_node("Relu", ["bn"], ["y"], name="relu"),
    ]
    inits = []
    if constant_nodes:
        nodes = [
            h.make_node("Constant", [], [k], name=f"const_{k}", value=nh.from_array(v, k + "_value"))
            for k, v in consts.items()
        ] + nodes
    else:
        inits = [nh.from_array(v, k) for k, v in consts.items()]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["N", cin, 6, 6])]
    if dynamic_mean:
        inputs.append(h.make_tensor_value_info("mean", T.FLOAT, [cout]))
    outputs = [h.make_tensor_value_info("y", T.FLOAT, ["N", cout, 6, 6])]
    if extra_reader:
        outputs.append(h.make_tensor_value_info("c", T.FLOAT, ["N", cout, 6, 6]))
    return _model(h.make_graph(nodes, "conv_bn", inputs, outputs, inits), opset)


_RSS_DRIVER = """
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import numpy, onnx, onnxruntime
from onnxcompress import cli
base = status("VmRSS")
code = cli.main(sys.argv[2:])
json.dump({"code": code, "base": base, "peak": status("VmHWM")}, open(sys.argv[1], "w"))
"""


def cli_peak_rss(argv: list[str], result: Path, timeout: float = 120) -> tuple[int, int, str]:
    """Run ``onnxcompress ARGV`` in a fresh process: ``(exit code, peak RSS above the RSS after the
    imports in bytes, stderr)`` (``VmHWM`` - ``VmRSS`` once numpy, onnx, onnxruntime and the CLI are in)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_DRIVER, str(result), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if not result.exists():
        return -1, 0, proc.stderr[-2000:]
    data = json.loads(result.read_text())
    return int(data["code"]), int(data["peak"] - data["base"]), proc.stderr[-2000:]
