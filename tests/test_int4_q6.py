"""int4 hot rows: the most used rows of a Gather table get an 8-bit correction of their int4 error (budget runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import _model, run, save, tiny_transformer_split
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError
from onnxcompress.passes.base import Params, PassContext
from onnxcompress.passes.quantize.gptq import quantize_rtn, stored_bytes
from onnxcompress.passes.quantize.int4 import (
    BUDGET_MARGIN,
    DEFAULT_HOT_ROWS,
    HOT_COVERAGE,
    HOT_TABLE_BLOCK,
    NODE_BYTES,
    Int4Config,
    Int4Pass,
    dequantize_rows,
    hot_bytes,
    hot_residual,
    int4_config,
    token_shares,
)

VOCAB, DIM, OUT = 600, 256, 16
HOT = [3, 7, VOCAB - 1]  # in every calibration sample (the last one read as -1)


def _table_model(opset: int = 17, computed_ids: bool = False) -> onnx.ModelProto:
    """ids, attention_mask [N, T] -> emb = Gather(E, ids) (also an output) -> y = emb @ W."""
    rng = np.random.default_rng(5)
    e = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    w = (rng.standard_normal((DIM, OUT)) * 0.1).astype(np.float32)
    nodes = []
    inits = [nh.from_array(e, "E"), nh.from_array(w, "W")]
    ids = "ids"
    if computed_ids:  # indices computed in the graph: tapped in onnxruntime
        nodes.append(h.make_node("Add", ["ids", "zero"], ["ids_plus"], name="shift"))
        inits.append(nh.from_array(np.array(0, np.int64), "zero"))
        ids = "ids_plus"
    nodes += [
        h.make_node("Gather", ["E", ids], ["emb"], name="embed", axis=0),
        h.make_node("MatMul", ["emb", "W"], ["y"], name="proj"),
    ]
    g = h.make_graph(
        nodes,
        "table",
        [
            h.make_tensor_value_info("ids", T.INT64, ["N", "T"]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["N", "T"]),
        ],
        [
            h.make_tensor_value_info("y", T.FLOAT, ["N", "T", OUT]),
            h.make_tensor_value_info("emb", T.FLOAT, ["N", "T", DIM]),
        ],
        inits,
    )
    return _model(g, opset)


def _calibration(seed: int = 0, n: int = 24, t: int = 10) -> list[dict[str, np.ndarray]]:
    """Samples of 4..t tokens (right-padded with id 0): the HOT ids in each, the others drawn at random
    (the HOT rows' share: 0.43 at t=10, 0.1 at t=60)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, t), np.int64)
    mask = np.zeros((n, t), np.int64)
    for i in range(n):
        length = int(rng.integers(4, t + 1))
        ids[i, :length] = rng.integers(10, VOCAB - 10, length)
        ids[i, :3] = HOT
        ids[i, 2] = -1 if i % 2 else VOCAB - 1  # a negative index counts from the end
        mask[i, :length] = 1
    return [{"ids": ids, "attention_mask": mask}]


def _budget(hot_rows: int, table_block: int = HOT_TABLE_BLOCK) -> float:
    """A budget whose room holds the hot rows' correction and W in 8 bits, not the table in 8 bits."""
    before = VOCAB * DIM * 4 + DIM * OUT * 4
    e4 = stored_bytes(VOCAB, DIM, table_block, 4)
    w4 = stored_bytes(OUT, DIM, 32, 4)
    projected = e4 + w4 + 2 * NODE_BYTES
    room = hot_bytes(hot_rows, DIM) + (stored_bytes(OUT, DIM, 128, 8) - w4) + 2000
    return (projected + room) / before / (1 - BUDGET_MARGIN)


def test_token_shares_weigh_each_sample_equally(tmp_path: Path) -> None:
    for computed in (False, True):
        proto = _table_model(computed_ids=computed)
        model = oc.load(save(proto, tmp_path / "t.onnx"))
        feeds = _calibration()
        name = "ids_plus" if computed else "ids"
        shares = token_shares(model, [name], {name: VOCAB}, feeds, rows=5)[name]
        ids, mask = feeds[0]["ids"], feeds[0]["attention_mask"].astype(bool)
        expected = np.zeros(VOCAB)
        for row, keep in zip(ids, mask):
            np.add.at(expected, row[keep] % VOCAB, 1.0 / keep.sum())
        expected /= len(ids)
        np.testing.assert_allclose(shares, expected, rtol=1e-12, atol=1e-15)
        assert shares.sum() == pytest.approx(1.0) and shares[0] == 0.0  # padding left out
        assert set(np.argsort(-shares)[:3].tolist()) == set(HOT)


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
@pytest.mark.parametrize("opset", [11, 17])
def test_hot_rows_are_corrected_in_8_bits(tmp_path: Path, target: str, opset: int) -> None:
    proto = _table_model(opset)
    src = save(proto, tmp_path / "t.onnx")
    model = oc.load(src)
    cfg = Int4Config(budget=_budget(len(HOT)), scale_bits=16, hot_rows=0.05)
    report = Int4Pass(cfg).run(model, PassContext(calibration=_calibration(), target=target))
    out = tmp_path / "q.onnx"
    oc.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    st = report.stats
    assert st["hot_rows"] == [{"tensor": "E", "rows": len(HOT)}]
    assert st["hot_rows_bytes"] == hot_bytes(len(HOT), DIM)
    layer = {la["tensor"]: la for la in st["layers"]}["E"]
    assert layer["scheme"] == f"int4-rtn-b{HOT_TABLE_BLOCK}-sym" and layer["hot_rows"] == len(HOT)
    assert st["bytes_after"] <= cfg.budget * st["bytes_before"]
    e = nh.to_array(proto.graph.initializer[0])
    q = quantize_rtn(e, HOT_TABLE_BLOCK, True, True, 16)
    table = q.dequantize()
    codes, scales = hot_residual(e[HOT], dequantize_rows(q, np.array(HOT)))
    np.testing.assert_array_equal(dequantize_rows(q, np.array(HOT)), table[HOT])
    corrected = table.copy()
    corrected[HOT] += codes.astype(np.float32) * scales[:, None]
    ids = np.array([[3, 7, -1, 12, 0], [VOCAB - 1, 40, 3, -600, 599]], np.int64)
    got = run(out, {"ids": ids, "attention_mask": np.ones_like(ids)})[1]
    np.testing.assert_allclose(got, corrected[ids], rtol=0, atol=1e-5)
    err_hot = np.abs(corrected[HOT] - e[HOT]).max()
    assert err_hot < np.abs(table[HOT] - e[HOT]).max() / 50  # 8-bit precision on the hot rows
    assert not np.allclose(table[12], e[12], atol=1e-3)  # the other rows: int4
    names = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"Equal", "Where", "MatMul"} <= names
    if target == "onnxruntime":
        assert "GatherBlockQuantized" in names


def test_hot_rows_params_and_off(tmp_path: Path) -> None:
    assert int4_config(Params({})).hot_rows == DEFAULT_HOT_ROWS
    assert int4_config(Params({"hot_rows": "0"})).hot_rows == 0.0
    with pytest.raises(OnnxCompressError, match="hot_rows"):
        int4_config(Params({"hot_rows": "2"}))
    with pytest.raises(ValueError, match="hot_rows"):
        Int4Config(hot_rows=-0.1)
    proto = _table_model()
    src = save(proto, tmp_path / "t.onnx")
    for kwargs, block, hot, length in (
        ({"hot_rows": 0.0}, 32, None, 10),  # off: the table keeps block_size, no correction
        ({"hot_rows": 0.05, "embedding_block": 32}, 32, len(HOT), 10),  # explicit table block
        ({"hot_rows": 0.05, "method": "rtn"}, 32, None, 10),  # no calibration run: int4 only
        ({"hot_rows": 0.9}, 32, None, 10),  # no row that hot
        ({"hot_rows": 0.02}, 32, len(HOT), 60),  # long samples: the hot rows hold < HOT_COVERAGE
        (
            {"hot_rows": 0.02, "embedding_block": 0},
            HOT_TABLE_BLOCK,
            len(HOT),
            10,
        ),  # short ones: more (the coarser table)
    ):
        model = oc.load(src)
        calib = None if kwargs.get("method") == "rtn" else _calibration(t=length)
        cfg = Int4Config(budget=_budget(len(HOT), block), scale_bits=16, **kwargs)  # type: ignore[arg-type]
        st = Int4Pass(cfg).run(model, PassContext(calibration=calib)).stats
        layer = {la["tensor"]: la for la in st["layers"]}["E"]
        assert layer["scheme"].endswith(f"-b{block}-sym")
        assert (st.get("hot_rows") or [{"rows": None}])[0]["rows"] == hot
        assert layer["hot_rows"] == (hot or 0)
    shares = token_shares(oc.load(src), ["ids"], {"ids": VOCAB}, _calibration(t=60), rows=8)["ids"]
    assert (
        shares[HOT].sum()
        < HOT_COVERAGE
        < token_shares(oc.load(src), ["ids"], {"ids": VOCAB}, _calibration(), rows=8)["ids"][HOT].sum()
    )


def test_hot_rows_skip_old_opsets_and_tables_cheaper_in_8_bits(tmp_path: Path) -> None:
    proto = _table_model(opset=10)
    src = save(proto, tmp_path / "t.onnx")
    model = oc.load(src)
    st = (
        Int4Pass(Int4Config(budget=_budget(len(HOT)), scale_bits=16, hot_rows=0.05))
        .run(model, PassContext(calibration=_calibration()))
        .stats
    )
    assert "hot_rows" not in st  # Gather of packed rows and the correction need opset 11
    # A 2-row table: its correction would cost more than the whole table in 8 bits.
    rng = np.random.default_rng(1)
    g = h.make_graph(
        [
            h.make_node("Gather", ["E", "ids"], ["emb"], name="embed", axis=0),
            h.make_node("MatMul", ["emb", "W"], ["y"], name="proj"),
        ],
        "small",
        [
            h.make_tensor_value_info("ids", T.INT64, ["N", "T"]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["N", "T"]),
        ],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", "T", OUT])],
        [
            nh.from_array(rng.standard_normal((2, DIM)).astype(np.float32), "E"),
            nh.from_array(rng.standard_normal((DIM, OUT)).astype(np.float32), "W"),
        ],
    )
    src = save(_model(g), tmp_path / "s.onnx")
    model = oc.load(src)
    ids = np.zeros((8, 6), np.int64)
    calib = [{"ids": ids, "attention_mask": np.ones_like(ids)}]
    st = Int4Pass(Int4Config(budget=0.5, min_elements=1)).run(model, PassContext(calibration=calib)).stats
    assert "hot_rows" not in st and any(t["tensor"] == "E" for t in st["int8_tensors"])


def test_tiny_transformer_default_budget_with_hot_rows(tmp_path: Path) -> None:
    src, calib, held, ref = tiny_transformer_split()
    errs = {}
    for hot in (0.0, DEFAULT_HOT_ROWS):
        model = oc.load(src)
        cfg = int4_config(Params({"hot_rows": str(hot), "int4_budget": "0.2"}))  # int4 alone: 0.168
        report = Int4Pass(cfg).run(model, PassContext(calibration=calib))
        oc.save(model, tmp_path / f"q{hot}.onnx")
        assert report.stats["bytes_after"] <= cfg.budget * report.stats["bytes_before"]
        (got,) = run(tmp_path / f"q{hot}.onnx", held)[:1]
        errs[hot] = float(np.sum((got - ref) ** 2) / np.sum(ref**2))
        assert bool(report.stats.get("hot_rows")) == (hot > 0)
    # Synthetic tokens (no Zipf law): the hot rows hold ~10% of the tokens, the table keeps block 32; the output
    # error stays about the same (the measured gain is on MiniLM, see the int4 module docstring).
    assert errs[DEFAULT_HOT_ROWS] < 1.5 * errs[0.0] < 0.01
