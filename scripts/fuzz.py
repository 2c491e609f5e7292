"""Long fuzz campaign for the ``onnxcompress`` command line.

Every case is a small folder of generated files (a model, maybe an ``.npz`` feed) and one command,
``inspect --json``, ``compress -q int8-weights``, ``compress --fold`` or ``validate A A``, run
in-process as ``onnxcompress.cli.main([...])`` inside a worker process, so that a hang can be killed
(each case must finish within ``--timeout`` seconds, 10 by default). For every case:

* the exit code is 0, 1 or 2, and on 2 exactly one non-blank line was written to stderr;
* stderr never holds ``Traceback`` nor ``internal error``;
* no partial output: the output path is absent, or is a model that passes
  ``onnx.checker.check_model``; nothing but the output (and its ``.data`` file) is in the output
  folder, in particular no ``.onnxcompress-tmp-*`` folder; the input files are unchanged.

stderr is captured at the file-descriptor level (what a user of the console script would see,
onnxruntime's C++ log lines included).

Generators: ``truncate`` (protobufs cut at every length class), ``bitflip``, ``wrong_types``
(attributes and tensors whose declared type does not match their value), ``odd_graph`` (valid
protobufs built with ``onnx.helper`` but odd graphs: empty graph, zero-size tensors, duplicate names,
dangling inputs, cycles, unknown domains, bfloat16/float8/int4/string tensors, rank-0 outputs,
opsets 7..23), ``bad_npz`` (wrong names/dtypes/shapes, pickled objects, not a zip) and
``bad_tolerance``.

Usage::

    python scripts/fuzz.py [--cases 10000] [--seed 0] [--jobs N] [--timeout 10] [--json FILE]
                           [--repro-dir DIR] [--generators truncate,bitflip,...]
    python scripts/fuzz.py --replay DIR      # rerun one reproducer folder written by a failing run

Prints a summary table; exits 1 if any case broke a rule (each one is written as a reproducer folder
holding its files and ``case.json`` with the exact argv).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h

TMP_PREFIX = ".onnxcompress-tmp-"
COMMANDS = [
    "inspect", "compress-q", "compress-fold", "validate", "compress-dynamic", "compress-static", "compress-int4",
    "compress-fp16", "batch",
]  # fmt: skip
GENERATORS = ["truncate", "bitflip", "wrong_types", "odd_graph", "bad_npz", "bad_tolerance", "bad_recipe"]


# --------------------------------------------------------------------------- seed models


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, ir: int | None = None, domains=()) -> onnx.ModelProto:
    graph = h.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    opsets = [h.make_opsetid("", opset)] + [h.make_opsetid(d, 1) for d in domains]
    m = h.make_model(graph, opset_imports=opsets, producer_name="fuzz")
    m.ir_version = ir if ir is not None else _ir_for(opset)
    return m


def _ir_for(opset: int) -> int:
    table = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
    return table.get(opset, 10)


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def mlp_model(seed: int = 0, opset: int = 17, k: int = 64, n: int = 32) -> onnx.ModelProto:
    """x[?, k] @ W + b -> Relu -> @ W2, weights large enough to be quantized."""
    rng = np.random.default_rng(seed)
    inits = [
        onnx.numpy_helper.from_array(_w(rng, k, n), "W"),
        onnx.numpy_helper.from_array(_w(rng, n), "b"),
        onnx.numpy_helper.from_array(_w(rng, n, 16), "W2"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        h.make_node("Add", ["mm", "b"], ["add"], name="add"),
        h.make_node("Relu", ["add"], ["relu"], name="relu"),
        h.make_node("MatMul", ["relu", "W2"], ["y"], name="mm2"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        inits,
        opset,
    )


def if_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = onnx.numpy_helper.from_array(_w(rng, 32, 32), "W")

    def branch(name: str, op: str) -> onnx.GraphProto:
        return h.make_graph(
            [h.make_node("MatMul", ["x", "W"], ["t"]), h.make_node(op, ["t"], [f"{name}_y"])],
            name,
            [],
            [h.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
        )

    node = h.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=branch("then", "Relu"), else_branch=branch("else", "Sigmoid")
    )
    return _model(
        [node],
        [
            h.make_tensor_value_info("cond", TensorProto.BOOL, []),
            h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]),
        ],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [w],
    )


def constant_model(seed: int = 0) -> onnx.ModelProto:
    """Constant nodes and a shape chain (food for --fold)."""
    rng = np.random.default_rng(seed)
    c = onnx.numpy_helper.from_array(_w(rng, 8, 8), "c")
    nodes = [
        h.make_node("Constant", [], ["C"], value=c, name="const"),
        h.make_node("Shape", ["x"], ["s"], name="shape"),
        h.make_node("ConstantOfShape", ["s"], ["z"], value=h.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        h.make_node("Mul", ["x", "z"], ["xz"]),
        h.make_node("MatMul", ["xz", "C"], ["y"]),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
    )


SEED_MODELS = {"mlp": mlp_model, "if": if_model, "const": constant_model}


# --------------------------------------------------------------------------- generators


@dataclass
class Case:
    """One generated case: files to write into the case folder and the command to run."""

    generator: str
    files: dict[str, bytes]
    command: str
    model: str = "m.onnx"
    extra: list[str] = field(default_factory=list)
    note: str = ""


def _ser(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _seed_bytes(rng: random.Random) -> tuple[str, bytes]:
    name = rng.choice(sorted(SEED_MODELS))
    return name, _ser(SEED_MODELS[name](rng.randrange(4)))


def gen_truncate(rng: random.Random) -> Case:
    name, data = _seed_bytes(rng)
    n = len(data)
    cls = rng.choice(["zero", "tiny", "small", "lowhalf", "highhalf", "minus_few", "minus_one"])
    cut = {
        "zero": 0,
        "tiny": rng.randint(1, 8),
        "small": rng.randint(9, 64),
        "lowhalf": rng.randint(65, n // 2),
        "highhalf": rng.randint(n // 2, n - 9),
        "minus_few": rng.randint(n - 8, n - 2),
        "minus_one": n - 1,
    }[cls]
    return Case("truncate", {"m.onnx": data[:cut]}, rng.choice(COMMANDS), note=f"{name} cut {cut}/{n} ({cls})")


def gen_bitflip(rng: random.Random) -> Case:
    name, data = _seed_bytes(rng)
    buf = bytearray(data)
    flips = [(rng.randrange(len(buf)), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
    for pos, bit in flips:
        buf[pos] ^= 1 << bit
    if rng.random() < 0.2:  # also a byte overwritten with a protobuf-significant value
        buf[rng.randrange(len(buf))] = rng.choice([0x00, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x80, 0xFF])
    return Case("bitflip", {"m.onnx": bytes(buf)}, rng.choice(COMMANDS), note=f"{name} flips {flips}")


def _mutate_attribute(m: onnx.ModelProto, rng: random.Random) -> str:
    nodes = [n for n in m.graph.node if n.attribute] or list(m.graph.node)
    node = rng.choice(nodes)
    sub = h.make_graph([], "sub", [], [])
    kind = rng.choice(
        [
            "float_holding_graph",
            "graph_holding_floats",
            "ints_holding_tensor",
            "tensor_holding_string",
            "undefined",
            "graphs_with_int_type",
            "string_holding_graph",
            "bad_type_code",
            "type_proto_holding_graph",
        ]
    )
    a = onnx.AttributeProto()
    a.name = node.attribute[0].name if node.attribute and rng.random() < 0.6 else rng.choice(["value", "axis", "x"])
    if kind == "float_holding_graph":
        a.type = onnx.AttributeProto.FLOAT
        a.g.CopyFrom(sub)
    elif kind == "graph_holding_floats":
        a.type = onnx.AttributeProto.GRAPH
        a.floats.extend([1.0, 2.0])
    elif kind == "ints_holding_tensor":
        a.type = onnx.AttributeProto.INTS
        a.t.CopyFrom(h.make_tensor("t", TensorProto.FLOAT, [1], [1.0]))
    elif kind == "tensor_holding_string":
        a.type = onnx.AttributeProto.TENSOR
        a.s = b"hello"
    elif kind == "undefined":
        a.type = onnx.AttributeProto.UNDEFINED
        a.i = 3
    elif kind == "graphs_with_int_type":
        a.type = onnx.AttributeProto.INT
        a.graphs.extend([sub, sub])
    elif kind == "string_holding_graph":
        a.type = onnx.AttributeProto.STRING
        a.g.CopyFrom(sub)
        a.s = b"\xff\xfe"
    elif kind == "bad_type_code":
        a.type = rng.choice([14, 13, 5, 10])
        a.f = 1.0
    else:
        a.type = onnx.AttributeProto.TYPE_PROTO
        a.g.CopyFrom(sub)
    if node.attribute and rng.random() < 0.6:
        node.attribute[0].CopyFrom(a)
    else:
        node.attribute.append(a)
    return f"attr {kind} on {node.op_type}"


def _mutate_tensor(m: onnx.ModelProto, rng: random.Random) -> str:
    if not m.graph.initializer:
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "extra"))
    t = rng.choice(list(m.graph.initializer))
    kind = rng.choice(["int64_in_float", "type_code", "dims_negative", "dims_huge", "raw_short", "string_raw", "ext"])
    if kind == "int64_in_float":
        t.ClearField("raw_data")
        t.int64_data.extend([1, 2, 3])
    elif kind == "type_code":
        t.data_type = rng.choice([0, 8, 16, 17, 21, 22, 23, 24, 25, 26, 99, 1000])
    elif kind == "dims_negative":
        t.dims[0] = -rng.randint(1, 5) if t.dims else -1
    elif kind == "dims_huge":
        t.dims.append(rng.choice([2**31, 2**40, 2**62]))
    elif kind == "raw_short":
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    elif kind == "string_raw":
        t.data_type = TensorProto.STRING
    else:
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", rng.choice(["m.onnx", "nope.bin", "../x", "/etc/hostname", ""])
    return f"tensor {kind} on {t.name}"


def gen_wrong_types(rng: random.Random) -> Case:
    name = rng.choice(sorted(SEED_MODELS))
    m = SEED_MODELS[name](rng.randrange(4))
    notes = [(_mutate_attribute if rng.random() < 0.6 else _mutate_tensor)(m, rng) for _ in range(rng.randint(1, 2))]
    return Case("wrong_types", {"m.onnx": _ser(m)}, rng.choice(COMMANDS), note=f"{name}: {'; '.join(notes)}")


_ODD_DTYPES = [
    TensorProto.BFLOAT16,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
    TensorProto.INT4,
    TensorProto.UINT4,
    TensorProto.STRING,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.BOOL,
    TensorProto.UINT64,
    TensorProto.COMPLEX64,
]


def _odd_tensor(dtype: int, name: str, rng: random.Random, dims: list[int]) -> onnx.TensorProto:
    count = int(np.prod(dims)) if dims else 1
    if dtype == TensorProto.STRING:
        return h.make_tensor(name, dtype, dims, [f"s{i}".encode() for i in range(count)])
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return h.make_tensor(name, dtype, dims, [rng.randint(0, 7) for _ in range(count)])
    if dtype == TensorProto.BOOL:
        return h.make_tensor(name, dtype, dims, [rng.random() < 0.5 for _ in range(count)])
    if dtype == TensorProto.COMPLEX64:
        return h.make_tensor(name, dtype, dims, [complex(0.5, -0.5)] * count)
    if dtype == TensorProto.UINT64:
        return h.make_tensor(name, dtype, dims, [rng.randint(0, 9) for _ in range(count)])
    return h.make_tensor(name, dtype, dims, [rng.uniform(-2, 2) for _ in range(count)])


def _odd_graph(rng: random.Random) -> tuple[onnx.ModelProto, str]:
    f = TensorProto.FLOAT
    vi = h.make_tensor_value_info
    kind = rng.choice(
        [
            "empty",
            "passthrough",
            "zero_size",
            "duplicate_outputs",
            "duplicate_inits",
            "input_is_init",
            "dangling",
            "unused_input",
            "cycle",
            "unknown_domain",
            "odd_dtype",
            "odd_dtype_cast",
            "scalar_out",
            "constant_only",
            "opset",
            "constant_of_shape",
            "no_opset",
            "ir_zero",
            "if_scalar",
            "loop",
        ]
    )
    if kind == "empty":
        return _model([], [], [], opset=rng.randint(7, 23)), kind
    if kind == "passthrough":
        return _model([], [vi("x", f, [2])], [vi("x", f, [2])]), kind
    if kind == "zero_size":
        dims = rng.choice([[0, 4], [4, 0], [0]])
        w = onnx.numpy_helper.from_array(np.zeros(dims, np.float32), "W")
        if len(dims) == 2:
            node = h.make_node("MatMul", ["x", "W"], ["y"])
            return _model([node], [vi("x", f, [2, dims[0]])], [vi("y", f, [2, dims[1]])], [w]), kind
        return _model([h.make_node("Add", ["x", "W"], ["y"])], [vi("x", f, [0])], [vi("y", f, [0])], [w]), kind
    if kind == "duplicate_outputs":
        nodes = [h.make_node("Relu", ["x"], ["y"], name="a"), h.make_node("Neg", ["x"], ["y"], name="a")]
        return _model(nodes, [vi("x", f, [2])], [vi("y", f, [2])]), kind
    if kind == "duplicate_inits":
        w1 = onnx.numpy_helper.from_array(np.ones((2,), np.float32), "W")
        w2 = onnx.numpy_helper.from_array(np.zeros((3,), np.float32), "W")
        return _model([h.make_node("Add", ["x", "W"], ["y"])], [vi("x", f, [2])], [vi("y", f, [2])], [w1, w2]), kind
    if kind == "input_is_init":
        w = onnx.numpy_helper.from_array(np.ones((2,), np.float32), "x")
        return _model([h.make_node("Relu", ["x"], ["y"])], [vi("x", f, [2])], [vi("y", f, [2])], [w]), kind
    if kind == "dangling":
        nodes = [h.make_node("Add", ["x", "ghost"], ["y"])]
        return _model(nodes, [vi("x", f, [2])], [vi(rng.choice(["y", "z"]), f, [2])]), kind
    if kind == "unused_input":
        nodes = [h.make_node("Relu", ["x"], ["y"])]
        return _model(nodes, [vi("x", f, [2]), vi("u", TensorProto.INT64, ["n", 3])], [vi("y", f, [2])]), kind
    if kind == "cycle":
        nodes = [h.make_node("Add", ["x", "b"], ["a"]), h.make_node("Relu", ["a"], ["b"])]
        return _model(nodes, [vi("x", f, [2])], [vi("a", f, [2])]), kind
    if kind == "unknown_domain":
        dom = rng.choice(["com.example", "ai.onnx.ml", "com.microsoft", "x" * 300])
        declare = rng.random() < 0.5
        nodes = [h.make_node(rng.choice(["Bar", "Relu", "Gelu"]), ["x"], ["y"], domain=dom)]
        return _model(nodes, [vi("x", f, [2])], [vi("y", f, [2])], domains=[dom] if declare else ()), kind
    if kind in ("odd_dtype", "odd_dtype_cast"):
        dtype = rng.choice(_ODD_DTYPES)
        dims = rng.choice([[], [0], [3], [2, 2]])
        t = _odd_tensor(dtype, "T", rng, dims)
        if kind == "odd_dtype":
            node = h.make_node("Identity", ["T"], ["y"])
            return _model([node], [], [vi("y", dtype, dims)], [t], opset=rng.choice([13, 19, 21, 23])), kind
        node = h.make_node("Cast", ["x"], ["y"], to=dtype)
        return _model([node], [vi("x", f, dims)], [vi("y", dtype, dims)], opset=rng.choice([13, 19, 21, 23])), kind
    if kind == "scalar_out":
        nodes = [h.make_node("ReduceSum", ["x"], ["y"], keepdims=0)]
        return _model(nodes, [vi("x", f, [3, 4])], [vi("y", f, [])], opset=rng.choice([11, 13, 18])), kind
    if kind == "constant_only":
        c = h.make_tensor("c", f, [], [rng.uniform(-1, 1)])
        return _model([h.make_node("Constant", [], ["y"], value=c)], [], [vi("y", f, [])]), kind
    if kind == "opset":
        opset = rng.randint(7, 23)
        m = mlp_model(rng.randrange(4), opset=opset)
        if rng.random() < 0.3:
            m.ir_version = rng.randint(1, 12)
        return m, f"opset {opset} ir {m.ir_version}"
    if kind == "constant_of_shape":
        n = rng.choice([0, 1, 7, 1000, 10**6])
        shape = onnx.numpy_helper.from_array(np.array([n], np.int64), "shape")
        value = h.make_tensor("v", f, [1], [1.5])
        nodes = [h.make_node("ConstantOfShape", ["shape"], ["c"], value=value), h.make_node("Relu", ["c"], ["y"])]
        return _model(nodes, [], [vi("y", f, [n])], [shape]), f"{kind} {n}"
    if kind == "no_opset":
        m = mlp_model()
        del m.opset_import[:]
        return m, kind
    if kind == "ir_zero":
        m = mlp_model()
        m.ir_version = 0
        return m, kind
    if kind == "if_scalar":
        return if_model(rng.randrange(4)), kind
    body = h.make_graph(
        [h.make_node("Add", ["v", "one"], ["v2"]), h.make_node("Identity", ["c"], ["c2"])],
        "body",
        [vi("i", TensorProto.INT64, []), vi("c", TensorProto.BOOL, []), vi("v", f, [2])],
        [vi("c2", TensorProto.BOOL, []), vi("v2", f, [2])],
        [onnx.numpy_helper.from_array(np.ones(2, np.float32), "one")],
    )
    trip = onnx.numpy_helper.from_array(np.array(rng.choice([0, 3, 1000]), np.int64), "trip")
    cond = onnx.numpy_helper.from_array(np.array(True), "cond")
    node = h.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)
    return _model([node], [vi("x", f, [2])], [vi("y", f, [2])], [trip, cond]), kind


def gen_odd_graph(rng: random.Random) -> Case:
    m, note = _odd_graph(rng)
    return Case("odd_graph", {"m.onnx": _ser(m)}, rng.choice(COMMANDS), note=note)


def _npz_bytes(arrays: dict[str, Any], allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def gen_bad_npz(rng: random.Random) -> Case:
    m = mlp_model(rng.randrange(4))
    kind = rng.choice(
        [
            "wrong_name",
            "extra_name",
            "wrong_dtype",
            "wrong_rank",
            "wrong_width",
            "zero_batch",
            "object",
            "not_zip",
            "truncated_zip",
            "empty_zip",
            "nan",
            "huge_batch",
            "not_npy_member",
            "empty_file",
            "folder",
        ]
    )
    x = np.ones((2, 64), np.float32)
    files: dict[str, bytes] = {"m.onnx": _ser(m)}
    feed = "feed.npz"
    if kind == "wrong_name":
        data = _npz_bytes({"nope": x})
    elif kind == "extra_name":
        data = _npz_bytes({"x": x, "extra": x})
    elif kind == "wrong_dtype":
        data = _npz_bytes({"x": x.astype(rng.choice([np.int64, np.float64, np.bool_, np.uint8, np.complex64]))})
    elif kind == "wrong_rank":
        data = _npz_bytes({"x": np.ones(rng.choice([(64,), (2, 64, 1), ()]), np.float32)})
    elif kind == "wrong_width":
        data = _npz_bytes({"x": np.ones((2, rng.choice([0, 1, 63, 65])), np.float32)})
    elif kind == "zero_batch":
        data = _npz_bytes({"x": np.ones((0, 64), np.float32)})
    elif kind == "object":
        data = _npz_bytes({"x": np.array([{"a": 1}, None], dtype=object)})
    elif kind == "not_zip":
        data = rng.choice([b"hello world", os.urandom(200), pickle.dumps({"x": x})])
    elif kind == "truncated_zip":
        full = _npz_bytes({"x": x})
        data = full[: rng.randrange(1, len(full))]
    elif kind == "empty_zip":
        buf = io.BytesIO()
        zipfile.ZipFile(buf, "w").close()
        data = buf.getvalue()
    elif kind == "nan":
        data = _npz_bytes({"x": np.full((2, 64), rng.choice([np.nan, np.inf]), np.float32)})
    elif kind == "huge_batch":
        data = _npz_bytes({"x": np.ones((4096, 64), np.float32)})
    elif kind == "not_npy_member":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("x.npy", os.urandom(64))
        data = buf.getvalue()
    elif kind == "empty_file":
        data = b""
    else:
        feed = "feeds"
        data = b""
    if kind == "folder":
        files["feeds/a.npz"] = _npz_bytes({"x": x})
        files["feeds/b.npz"] = b"garbage"
    else:
        files[feed] = data
    cmd = rng.choice(["compress-q", "compress-fold", "validate"])
    return Case("bad_npz", files, cmd, extra=["--inputs", feed], note=kind)


_TOL_PIECES = [
    "cosine>=0.999",
    "cosine>=",
    "cosine=1",
    "cosine>=abc",
    "cosine>=nan",
    "cosine>=inf",
    "cosine>=-1e400",
    "top1>=2",
    "max_abs<=1e-3",
    "max_abs>=1",
    "snr_db>=30",
    "accuracy_drop<=0.005",
    "y:cosine>=0.9",
    "nope:cosine>=0.9",
    ":cosine>=0.9",
    "y:",
    "::",
    "foo<=1",
    "",
    " ",
    ">=",
    "<=<=",
    "cosine>=0.9,top1>=0.9",
    "\x00",
    "é>=1",
    "cosine >= 0.5",
    "1e309",
    "cosine>=0x10",
    "-" * 3,
]


def gen_bad_tolerance(rng: random.Random) -> Case:
    m = mlp_model(rng.randrange(4))
    extra: list[str] = []
    for _ in range(rng.randint(1, 3)):
        tol = rng.choice(_TOL_PIECES)
        if rng.random() < 0.3:
            tol = "".join(rng.choice("cosinemax_<=>:.0123456789e-+") for _ in range(rng.randint(0, 14)))
        extra += ["-t", tol]
    cmd = rng.choice(["compress-q", "compress-fold", "validate"])
    return Case("bad_tolerance", {"m.onnx": _ser(m)}, cmd, extra=extra, note=repr(extra))


_RECIPE_LINES = [
    '[[pass]]\nname = "fold"\n',
    '[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\n',
    '[[pass]]\nname = "quantize"\nmode = "int9"\n',
    '[[pass]]\nname = "quantize"\nmode = 8\n',
    '[[pass]]\nname = "prune"\n',
    '[[pass]]\nname = "quantize"\nmode = "int4"\nparams = { block_size = 33 }\n',
    '[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\nexclude = "notalist"\n',
    '[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\nexclude = ["(unclosed"]\n',
    'target = "tpu"\n',
    'target = "onnxruntime"\n',
    'calibration = "/nonexistent/calib.npz"\n',
    '[validate]\ntolerance = ["cosine>=0.5"]\n',
    '[validate]\ntolerance = "cosine"\n',
    '[validate]\nshapes = { x = [-1, "a"] }\n',
    "[params]\nnot_a_setting = 1\n",
    "unknown_key = 3\n",
    '[[pass]\nname = "fold"\n',
    "name = \x00\n",
    '"""\n',
    "[[pass]]\n",
]


def gen_bad_recipe(rng: random.Random) -> Case:
    m = mlp_model(rng.randrange(4))
    lines = [rng.choice(_RECIPE_LINES) for _ in range(rng.randint(1, 4))]
    text = "".join(lines)
    if rng.random() < 0.3:
        cut = rng.randrange(len(text) + 1)
        text = text[:cut]
    if rng.random() < 0.2:
        text = "".join(rng.choice('[]=."#\n abcdefgpassnamemode{}') for _ in range(rng.randint(0, 60)))
    cmd = rng.choice(["compress-recipe", "batch"])
    extra = ["--recipe", "r.toml"] if cmd == "batch" else []
    return Case(
        "bad_recipe",
        {"m.onnx": _ser(m), "r.toml": text.encode("utf-8", "surrogatepass")},
        cmd,
        extra=extra,
        note=text[:80],
    )


GEN_FUNCS = {
    "truncate": gen_truncate,
    "bitflip": gen_bitflip,
    "wrong_types": gen_wrong_types,
    "odd_graph": gen_odd_graph,
    "bad_npz": gen_bad_npz,
    "bad_tolerance": gen_bad_tolerance,
    "bad_recipe": gen_bad_recipe,
}


def make_case(index: int, seed: int, generators: list[str]) -> Case:
    """The case number ``index`` of a campaign: deterministic in (seed, index)."""
    rng = random.Random(f"{seed}-{index}")
    return GEN_FUNCS[generators[index % len(generators)]](rng)


def argv_for(case: Case, folder: Path) -> list[str]:
    m = str(folder / case.model)
    o = str(folder / "out" / "o.onnx")
    base = {
        "inspect": ["inspect", m, "--json"],
        "compress-q": ["compress", m, "-o", o, "-q", "int8-weights"],
        "compress-fold": ["compress", m, "-o", o, "--fold"],
        "validate": ["validate", m, m],
        "compress-dynamic": ["compress", m, "-o", o, "-q", "int8-dynamic"],
        "compress-static": ["compress", m, "-o", o, "-q", "int8-static"],
        "compress-int4": ["compress", m, "-o", o, "-q", "int4"],
        "compress-fp16": ["compress", m, "-o", o, "-q", "fp16"],
        "compress-recipe": ["compress", m, "-o", o, "--recipe", str(folder / "r.toml")],
        "batch": ["batch", m, "-o", str(folder / "out" / "b"), "--recipe", "edge-int8", "--jobs", "1"],
    }[case.command]
    if case.command == "batch" and "--recipe" in case.extra:
        base = base[:-4] + ["--jobs", "1"]
    extra = [
        str(folder / e) if i > 0 and case.extra[i - 1] in ("--inputs", "--recipe") else e
        for i, e in enumerate(case.extra)
    ]
    return base + extra


def write_case(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out").mkdir(exist_ok=True)
    for name, data in case.files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


# --------------------------------------------------------------------------- running one case


def _run_captured(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with fd 1 and 2 redirected to files (C++ output included)."""
    from onnxcompress.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        try:
            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fo.seek(0)
        fe.seek(0)
        return code, fo.read().decode(errors="replace"), fe.read().decode(errors="replace")


def check_case(case: Case, folder: Path) -> dict[str, Any]:
    """Run one case in ``folder`` (already written) and check every rule."""
    argv = argv_for(case, folder)
    start = time.perf_counter()
    try:
        code, _, err = _run_captured(argv)
    except BaseException as exc:  # main must never raise
        code, err = -1, f"main raised {type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    violations = []
    if code not in (0, 1, 2):
        violations.append(f"exit code {code}")
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2 and len(lines) != 1:
        violations.append(f"exit 2 with {len(lines)} stderr lines")
    tb = "Traceback" in err
    internal = "internal error" in err
    if tb:
        violations.append("traceback")
    if internal:
        violations.append("internal error")
    partial = False
    out_dir = folder / "out"
    batch_dir = out_dir / "b"
    if batch_dir.exists():  # batch: every model written is complete, no temp folder, reports allowed
        for p in batch_dir.rglob("*"):
            if p.name.startswith(TMP_PREFIX):
                partial = True
                violations.append(f"batch left a temp folder: {p.name}")
            elif p.suffix == ".onnx":
                try:
                    onnx.checker.check_model(str(p), full_check=False)
                except Exception as exc:  # noqa: BLE001
                    partial = True
                    violations.append(f"batch output fails check_model: {str(exc).splitlines()[0][:200]}")
        shutil.rmtree(batch_dir)
    left = sorted(p.name for p in out_dir.iterdir())
    out = out_dir / "o.onnx"
    if any(n.startswith(TMP_PREFIX) for n in left):
        partial = True
        violations.append(f"temp folder left: {left}")
    if out.exists():
        try:
            onnx.checker.check_model(str(out), full_check=False)
        except Exception as exc:  # noqa: BLE001 - any checker failure is a partial output
            partial = True
            violations.append(f"output fails check_model: {str(exc).splitlines()[0][:200]}")
        if code != 0:
            violations.append(f"output written but exit code {code}")
        if not set(left) <= {"o.onnx", "o.onnx.data"}:
            partial = True
            violations.append(f"stray files in output folder: {left}")
    elif left:
        partial = True
        violations.append(f"no output but files left: {left}")
    for name, data in case.files.items():
        p = folder / name
        if not p.exists() or (p.is_file() and p.read_bytes() != data):
            violations.append(f"input {name} modified")
    return {
        "code": code,
        "stderr": err[-2000:],
        "seconds": seconds,
        "traceback": tb,
        "internal": internal,
        "partial": partial,
        "violations": violations,
    }


def _worker(conn: Any, root: str) -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    import onnxcompress.cli  # noqa: F401 - import once, before the first case

    while True:
        msg = conn.recv()
        if msg is None:
            return
        index, case = msg
        folder = Path(tempfile.mkdtemp(prefix=f"case{index}-", dir=root))
        try:
            write_case(case, folder)
            result = check_case(case, folder)
        except Exception as exc:  # noqa: BLE001 - harness failure, reported as a violation
            result = {"code": -1, "stderr": "", "seconds": 0.0, "traceback": False, "internal": False}
            result.update(partial=False, violations=[f"harness error {type(exc).__name__}: {exc}"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        conn.send((index, result))


# --------------------------------------------------------------------------- campaign


class Pool:
    """Worker processes fed one case at a time; a worker past its deadline is killed and replaced."""

    def __init__(self, jobs: int, root: str) -> None:
        self.ctx = mp.get_context("spawn")
        self.root = root
        self.workers: list[dict[str, Any]] = [self._start() for _ in range(jobs)]

    def _start(self) -> dict[str, Any]:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child, self.root), daemon=False)
        p.start()
        child.close()
        return {"proc": p, "conn": parent, "case": None, "deadline": 0.0, "started": 0.0}

    def close(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(None)
            except OSError:
                pass
        for w in self.workers:
            w["proc"].join(5)
            if w["proc"].is_alive():
                w["proc"].kill()


def run_campaign(args: argparse.Namespace) -> dict[str, Any]:
    generators = args.generators.split(",") if args.generators else GENERATORS
    repro_dir = Path(args.repro_dir)
    root = tempfile.mkdtemp(prefix="onnxcompress-fuzz-")
    pool = Pool(args.jobs, root)
    per_gen: dict[str, Counter] = {g: Counter() for g in generators}
    codes: Counter = Counter()
    totals: Counter = Counter()
    violations: list[dict[str, Any]] = []
    slowest = 0.0
    start = time.perf_counter()
    next_index = 0
    done = 0
    # The first case of a fresh worker pays for onnxruntime's first session: allow startup time.
    startup_grace = 30.0

    def record(index: int, case: Case, result: dict[str, Any]) -> None:
        nonlocal done, slowest
        done += 1
        g = case.generator
        per_gen[g]["cases"] += 1
        per_gen[g][f"exit {result['code']}"] += 1
        codes[result["code"]] += 1
        totals["tracebacks"] += result["traceback"]
        totals["internal errors"] += result["internal"]
        totals["partial outputs"] += result["partial"]
        totals["hangs"] += result.get("hang", False)
        slowest = max(slowest, result["seconds"])
        if result["seconds"] >= args.timeout and not result.get("hang"):
            result["violations"].append(f"took {result['seconds']:.1f}s (limit {args.timeout}s)")
        if result["violations"]:
            per_gen[g]["violations"] += 1
            folder = repro_dir / f"case{index}-{g}"
            shutil.rmtree(folder, ignore_errors=True)
            write_case(case, folder)
            entry = {
                "index": index,
                "generator": g,
                "command": case.command,
                "note": case.note,
                "argv": argv_for(case, folder),
                "code": result["code"],
                "stderr": result["stderr"],
                "violations": result["violations"],
                "reproducer": str(folder),
            }
            (folder / "case.json").write_text(json.dumps(entry, indent=2))
            violations.append(entry)
            print(f"VIOLATION case {index} ({g}, {case.command}): {result['violations']} -> {folder}", flush=True)
        if args.progress and done % args.progress == 0:
            print(f"  {done}/{args.cases} cases, {time.perf_counter() - start:.0f}s", flush=True)

    try:
        while done < args.cases:
            for w in pool.workers:
                if w["case"] is None and next_index < args.cases:
                    case = make_case(next_index, args.seed, generators)
                    now = time.monotonic()
                    grace = startup_grace if not w.get("warm") else 0.0
                    w.update(case=(next_index, case), deadline=now + args.timeout + grace, started=now)
                    w["conn"].send((next_index, case))
                    next_index += 1
            busy = [w for w in pool.workers if w["case"] is not None]
            if not busy:
                break
            timeout = max(0.0, min(w["deadline"] for w in busy) - time.monotonic())
            ready = wait([w["conn"] for w in busy] + [w["proc"].sentinel for w in busy], timeout=timeout)
            for i, w in enumerate(pool.workers):
                if w["case"] is None:
                    continue
                index, case = w["case"]
                if w["conn"] in ready:
                    try:
                        got_index, result = w["conn"].recv()
                    except (EOFError, OSError):
                        result = None
                    if result is not None:
                        w["case"], w["warm"] = None, True
                        record(index, case, result)
                        continue
                dead = not w["proc"].is_alive()
                late = time.monotonic() > w["deadline"]
                if dead or late:
                    w["proc"].kill()
                    w["proc"].join()
                    secs = time.monotonic() - w["started"]
                    what = f"worker died (exit {w['proc'].exitcode})" if dead else f"hang: killed after {secs:.1f}s"
                    result = {"code": -9, "stderr": "", "seconds": secs, "traceback": False, "internal": False}
                    result.update(partial=False, hang=not dead, violations=[what])
                    pool.workers[i] = pool._start()
                    record(index, case, result)
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - start
    return {
        "cases": done,
        "seed": args.seed,
        "jobs": args.jobs,
        "timeout_s": args.timeout,
        "seconds": round(elapsed, 1),
        "slowest_case_s": round(slowest, 2),
        "per_generator": {g: dict(c) for g, c in per_gen.items()},
        "exit_codes": {str(k): v for k, v in sorted(codes.items())},
        "tracebacks": totals["tracebacks"],
        "internal_errors": totals["internal errors"],
        "hangs": totals["hangs"],
        "partial_outputs": totals["partial outputs"],
        "violations": violations,
    }


def print_summary(s: dict[str, Any]) -> None:
    cols = ["cases", "exit 0", "exit 1", "exit 2", "other", "violations"]
    print()
    print(f"{'generator':<15}" + "".join(f"{c:>11}" for c in cols))
    for g, c in s["per_generator"].items():
        other = c["cases"] - sum(c.get(f"exit {k}", 0) for k in (0, 1, 2)) if c else 0
        row = [c.get("cases", 0), c.get("exit 0", 0), c.get("exit 1", 0), c.get("exit 2", 0), other]
        print(f"{g:<15}" + "".join(f"{v:>11}" for v in row + [c.get("violations", 0)]))
    print()
    print(f"cases: {s['cases']}  exit codes: {s['exit_codes']}")
    print(
        f"tracebacks: {s['tracebacks']}  internal errors: {s['internal_errors']}  hangs: {s['hangs']}  "
        f"partial outputs: {s['partial_outputs']}  violations: {len(s['violations'])}"
    )
    print(f"seconds: {s['seconds']} (jobs {s['jobs']}, slowest case {s['slowest_case_s']}s, limit {s['timeout_s']}s)")


def replay(folder: Path) -> int:
    entry = json.loads((folder / "case.json").read_text())
    print("argv:", entry["argv"])
    from onnxcompress.cli import main

    for p in (folder / "out").iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return main(entry["argv"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-case limit in seconds")
    ap.add_argument("--json", type=Path, help="write the summary (and every violation) here")
    ap.add_argument("--repro-dir", default="fuzz-repro", help="where failing cases are written")
    ap.add_argument("--generators", help=f"comma-separated subset of {','.join(GENERATORS)}")
    ap.add_argument("--progress", type=int, default=1000, help="print progress every N cases (0: never)")
    ap.add_argument("--replay", type=Path, help="rerun one reproducer folder in this process")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    summary = run_campaign(args)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
