"""pack/unpack, diff/patch: bit-identical round trips, coding by kind, and refusal of bad input."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import conv_model, if_model, matmul_model, run, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcompress import cli, cli_transport
from onnxcompress.errors import OnnxCompressError
from onnxcompress.transport import codecs, container, diff, pack, packed_size, patch, unpack

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ["digits_cnn", "digits_keras", "tiny_transformer", "resnet_cnn"]
MINILM = ROOT / "models" / "cache" / "minilm" / "minilm.onnx"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _main(args: list[str]) -> int:
    cli_transport.register(cli.app)
    return cli.main([str(a) for a in args])


def _typed_model(seed: int = 0) -> onnx.ModelProto:
    """Initializers of every coded kind: float32/16, int8, uint8, packed int4, int64, a Constant node."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 96)) * 0.05).astype(np.float32)
    w16 = (rng.standard_normal((96, 32)) * 0.05).astype(np.float16)
    q8 = np.round(rng.standard_normal((256, 128)) * rng.uniform(5, 40, (256, 1))).clip(-127, 127).astype(np.int8)
    u8 = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    i4 = onnx.helper.make_tensor("I4", T.INT4, [64, 64], rng.integers(-8, 8, 64 * 64).tolist())
    idx = rng.integers(0, 1000, 600).astype(np.int64)
    const = h.make_node("Constant", [], ["C"], value=nh.from_array(w[:32].copy(), "Cval"), name="const")
    nodes = [
        const,
        h.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        h.make_node("Identity", ["C"], ["c_out"], name="idc"),
    ]
    g = h.make_graph(
        nodes,
        "typed",
        [h.make_tensor_value_info("x", T.FLOAT, [2, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, [2, 96]), h.make_tensor_value_info("c_out", T.FLOAT, [32, 96])],
        [
            nh.from_array(w, "W"),
            nh.from_array(w16, "W16"),
            nh.from_array(q8, "Q8"),
            nh.from_array(u8, "U8"),
            i4,
            nh.from_array(idx, "IDX"),
        ],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _roundtrip(src: Path, tmp: Path) -> tuple[dict, Path]:
    pkg = tmp / "m.ocpk"
    stats = pack(src, pkg)
    out_dir = tmp / "restored"
    out_dir.mkdir()
    out = out_dir / src.name
    unpack(pkg, out)
    assert _sha(out) == _sha(src)
    return stats, out


@pytest.mark.parametrize("stem", BUNDLED)
def test_bundled_models_roundtrip_bit_identical(stem: str, tmp_path: Path) -> None:
    src = ROOT / "models" / f"{stem}.onnx"
    stats, out = _roundtrip(src, tmp_path)
    assert stats["package_bytes"] < 0.9 * src.stat().st_size
    assert stats["package_bytes"] == (tmp_path / "m.ocpk").stat().st_size == packed_size(src)
    feed = dict(np.load(ROOT / "models" / f"{stem}.inputs.npz"))
    for a, b in zip(run(src, feed), run(out, feed)):
        np.testing.assert_array_equal(a, b)


def test_every_kind_roundtrips_and_uses_its_codec(tmp_path: Path) -> None:
    src = tmp_path / "typed.onnx"
    src.write_bytes(_typed_model().SerializeToString())
    stats, _out = _roundtrip(src, tmp_path)
    assert stats["tensors"] >= 6  # the Constant node's tensor included
    assert "planes" in stats["bytes_by_codec"]  # float32/16 and int64
    # int8 symbols: per-row-class tables or context tables, whichever is smaller
    assert {"symbols-rans", "symbols-context"} & set(stats["bytes_by_codec"])


def test_external_data_roundtrip_restores_every_file(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    (src_dir / "weights").mkdir(parents=True)
    m = matmul_model(k=256, n=128)
    onnx.save_model(m, src_dir / "m.onnx", save_as_external_data=True, location="weights/m.bin", size_threshold=0)
    data = src_dir / "weights" / "m.bin"
    with open(data, "ab") as f:  # bytes no tensor references must come back too
        f.write(b"trailing-bytes" * 10)
    pkg = tmp_path / "m.ocpk"
    stats = pack(src_dir / "m.onnx", pkg)
    assert [f["name"] for f in stats["files"]] == ["", "weights/m.bin"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    unpack(pkg, out_dir / "restored.onnx")
    assert _sha(out_dir / "restored.onnx") == _sha(src_dir / "m.onnx")
    assert _sha(out_dir / "weights" / "m.bin") == _sha(data)
    x = {"x": np.ones((1, 4, 256), np.float32)}
    np.testing.assert_array_equal(run(src_dir / "m.onnx", x)[0], run(out_dir / "restored.onnx", x)[0])


def test_subgraph_tensors_are_coded(tmp_path: Path) -> None:
    src = save(if_model(), tmp_path / "if.onnx")
    stats, _ = _roundtrip(src, tmp_path)
    assert stats["package_bytes"] > 0


@pytest.mark.parametrize("data_type", [T.FLOAT, T.FLOAT16, T.INT8, T.UINT8, T.INT4, T.INT64, T.BOOL])
def test_chunk_codecs_roundtrip_plain_and_delta(data_type: int) -> None:
    rng = np.random.default_rng(data_type)
    nbytes = 96 * 80
    if data_type in (T.INT8, T.UINT8, T.INT4):
        data = np.clip(rng.normal(128, 20, nbytes), 0, 255).astype(np.uint8)
    else:
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    base = data.copy()
    base[::7] ^= 3
    for old in (None, base.tobytes()):
        body = codecs.encode_chunk(data.tobytes(), data_type, 80, old)
        assert codecs.decode_chunk(body, nbytes, data_type, old) == data.tobytes()
    # a delta against nearly equal data is far smaller than the plain coding
    plain = codecs.encode_chunk(data.tobytes(), data_type, 80)
    delta = codecs.encode_chunk(data.tobytes(), data_type, 80, base.tobytes())
    assert len(delta) < 0.6 * len(plain)


def test_int8_symbols_beat_zstd(tmp_path: Path) -> None:
    """Per-row spreads differ: class tables code below zstd -19 of the same bytes."""
    import zstandard

    rng = np.random.default_rng(0)
    scale = rng.uniform(5, 60, (256, 1))
    q = np.clip(np.round(rng.standard_normal((256, 512)) * scale), -127, 127).astype(np.int8)
    body = codecs.encode_chunk(q.tobytes(), T.INT8, 512)
    z19 = zstandard.ZstdCompressor(level=19).compress(q.tobytes())
    assert len(body) < 0.97 * len(z19)
    assert codecs.decode_chunk(body, q.size, T.INT8) == q.tobytes()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _bad_cases(pkg: Path, tmp: Path) -> dict[str, Path]:
    raw = pkg.read_bytes()
    cases = {}
    cases["truncated"] = tmp / "truncated.ocpk"
    cases["truncated"].write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0x10
    cases["bit-flipped"] = tmp / "flipped.ocpk"
    cases["bit-flipped"].write_bytes(bytes(flipped))
    v99 = bytearray(raw)
    struct.pack_into("<H", v99, 4, 99)
    cases["unknown-version"] = tmp / "v99.ocpk"
    cases["unknown-version"].write_bytes(bytes(v99))
    # tampered: a tensor chunk changed and the whole-package hash recomputed (per-tensor hash catches it)
    tampered = bytearray(raw[:-32])
    tampered[-200] ^= 0x01
    tampered += hashlib.sha256(bytes(tampered)).digest()
    cases["tampered"] = tmp / "tampered.ocpk"
    cases["tampered"].write_bytes(bytes(tampered))
    cases["not-a-package"] = tmp / "plain.ocpk"
    cases["not-a-package"].write_bytes(b"hello world, not a package at all" * 3)
    return cases


def test_bad_packages_are_refused_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "typed.onnx"
    src.write_bytes(_typed_model().SerializeToString())
    pkg = tmp_path / "m.ocpk"
    assert _main(["pack", src, "-o", pkg]) == 0
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for label, case in _bad_cases(pkg, bad_dir).items():
        capsys.readouterr()
        assert _main(["unpack", case, "-o", out_dir / "x.onnx"]) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, (label, err)
        assert _files(out_dir) == set(), label
    # the clean package still unpacks
    assert _main(["unpack", pkg, "-o", out_dir / "x.onnx"]) == 0
    assert _sha(out_dir / "x.onnx") == _sha(src)
    # an existing output is not overwritten without --force
    assert _main(["unpack", pkg, "-o", out_dir / "x.onnx"]) == 2
    assert _main(["unpack", pkg, "-o", out_dir / "x.onnx", "--force"]) == 0


def test_unsafe_names_in_a_package_are_refused(tmp_path: Path) -> None:
    src = save(matmul_model(k=128, n=64), tmp_path / "m.onnx")
    files = container.model_layout(src)
    evil = container.FileLayout("../evil.bin", src, src.stat().st_size)
    pkg = tmp_path / "evil.ocpk"
    with open(pkg, "wb") as f:
        container.write_package(files + [evil], f)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OnnxCompressError, match="unsafe file path"):
        unpack(pkg, out_dir / "x.onnx")
    assert not (tmp_path / "evil.bin").exists() and _files(out_dir) == set()


def test_pack_refuses_non_models_and_unsafe_external_data(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xff\xff\xff not a model")
    assert _main(["pack", junk, "-o", tmp_path / "j.ocpk"]) == 2
    m = matmul_model()
    t = m.graph.initializer[0]
    t.data_location = T.EXTERNAL
    t.ClearField("raw_data")
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", str(64 * 32 * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(m.SerializeToString())
    with pytest.raises(OnnxCompressError, match="outside the model folder"):
        pack(bad, tmp_path / "b.ocpk")
    assert not (tmp_path / "b.ocpk").exists()


def _finetuned(model: onnx.ModelProto, step: float, seed: int) -> onnx.ModelProto:
    """A 'new version': every float weight nudged, one int8 tensor with a few symbols changed."""
    rng = np.random.default_rng(seed)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for t in new.graph.initializer:
        a = nh.to_array(t)
        if a.dtype == np.float32:
            a = a + (rng.standard_normal(a.shape) * step * np.abs(a)).astype(np.float32)
        elif a.dtype == np.int8:
            a = a.copy()
            a.flat[::97] += 1
        else:
            continue
        t.CopyFrom(nh.from_array(a, t.name))
    return new


def test_diff_patch_restores_new_exactly_and_is_small(tmp_path: Path) -> None:
    old = tmp_path / "v1.onnx"
    old.write_bytes(_typed_model().SerializeToString())
    new = tmp_path / "v2.onnx"
    new.write_bytes(_finetuned(_typed_model(), 1e-3, 1).SerializeToString())
    pd = tmp_path / "v1-v2.ocpd"
    assert _main(["diff", old, new, "-o", pd]) == 0
    out = tmp_path / "out"
    out.mkdir()
    assert _main(["patch", old, pd, "-o", out / "v2.onnx"]) == 0
    assert _sha(out / "v2.onnx") == _sha(new)
    assert pd.stat().st_size < 0.9 * packed_size(new)
    # identical versions: the patch is a few KB whatever the model size
    same = diff(old, old, tmp_path / "same.ocpd")
    assert same["package_bytes"] < 2500
    patch(old, tmp_path / "same.ocpd", out / "same.onnx")
    assert _sha(out / "same.onnx") == _sha(old)


def test_patch_on_wrong_base_or_as_package_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = save(conv_model(seed=0), tmp_path / "v1.onnx")
    new = save(conv_model(seed=1), tmp_path / "v2.onnx")
    other = save(conv_model(seed=2), tmp_path / "other.onnx")
    pd = tmp_path / "p.ocpd"
    diff(old, new, pd)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert _main(["patch", other, pd, "-o", out / "v2.onnx"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert _main(["unpack", pd, "-o", out / "v2.onnx"]) == 2  # a patch is not a package
    raw = bytearray(pd.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    (tmp_path / "bad.ocpd").write_bytes(bytes(raw))
    assert _main(["patch", old, tmp_path / "bad.ocpd", "-o", out / "v2.onnx"]) == 2
    assert _files(out) == set()
    assert _main(["patch", old, pd, "-o", out / "v2.onnx"]) == 0
    assert _sha(out / "v2.onnx") == _sha(new)


def test_pack_never_overwrites_its_input(tmp_path: Path) -> None:
    src = save(matmul_model(), tmp_path / "m.onnx")
    before = _sha(src)
    with pytest.raises(OnnxCompressError):
        pack(src, src, force=True)
    assert _sha(src) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnxcompress-tmp-")]


@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM export absent (gitignored)")
def test_minilm_fp32_packs_under_083(tmp_path: Path) -> None:
    stats, _ = _roundtrip(MINILM, tmp_path)
    assert stats["ratio"] <= 0.83


# --------------------------------------------------------------------------- context and row-prediction coders


def _rank1_int8(rows: int, cols: int, seed: int) -> np.ndarray:
    """int8 symbols whose spread is a row factor times a column factor (a smoothed, per-channel weight)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.3, 1.0, (rows, 1)) * rng.lognormal(0, 0.5, (1, cols)) * 25
    return np.clip(np.round(rng.standard_normal((rows, cols)) * sigma), -127, 127).astype(np.int8)


def test_context_tables_are_fixed_integers() -> None:
    """The decoder rebuilds the tables; they must be the same integers on every machine (golden sha256)."""
    digest = hashlib.sha256()
    for nu_code in range(len(codecs.CTX_NUS)):
        for half in (128, codecs.NB_HALF):
            t = codecs._ctx_tables(nu_code, half)
            assert t.min() >= 1 and t.max() == 65537 and np.all(t == np.round(t))
            digest.update(t.astype("<u4").tobytes())
    assert digest.hexdigest() == CTX_TABLES_SHA256


CTX_TABLES_SHA256 = "99f0117269e41532d1777be2f04d9a0a542abdcf5138351bd7156839c8004596"


def test_context_coder_beats_row_classes_on_row_times_column_spreads() -> None:
    q = _rank1_int8(384, 384, 0)
    raw = q.tobytes()
    body = codecs.encode_chunk(raw, T.INT8, 384)
    assert body[1] == codecs.CONTEXT
    assert codecs.decode_chunk(body, q.size, T.INT8) == raw
    classes = codecs._encode_symbols(np.frombuffer(raw, np.uint8), 384, "bytes", True)
    assert len(body) < 0.985 * len(classes)
    # uint8 symbols centred on 128 (a zero point) are centred before coding
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    ub = codecs.encode_chunk(u.tobytes(), T.UINT8, 384)
    assert ub[1] == codecs.CONTEXT and codecs.decode_chunk(ub, u.size, T.UINT8) == u.tobytes()
    assert abs(len(ub) - len(body)) < 0.002 * len(body)


def test_blocked_weights_are_modelled_on_their_innermost_axis() -> None:
    q = _rank1_int8(384, 256, 1).reshape(12, 32, 256)  # [blocks, block, N] as int8-weights writes them
    raw = q.tobytes()
    flat = codecs.encode_chunk(raw, T.INT8, 32 * 256)
    hinted = codecs.encode_chunk(raw, T.INT8, 32 * 256, inner=256)
    assert codecs.decode_chunk(hinted, q.size, T.INT8) == raw
    assert len(hinted) < len(flat)


def _embedding_like(rows: int, cols: int, seed: int) -> np.ndarray:
    """Rows that resemble earlier rows (related tokens), each scaled to the int8 range."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols))
    block = codecs.NB_BLOCK
    for r in range(block, rows):
        j = rng.integers(0, r // block * block)  # a row the decoder has when it reaches row r
        x[r] = 0.95 * x[j] * rng.choice([-1.0, 1.0]) + 0.3 * x[r]
    return np.round(x / np.abs(x).max(axis=1, keepdims=True) * 127).astype(np.int8)


def test_rows_predicted_from_similar_earlier_rows() -> None:
    q = _embedding_like(1024, 128, 2)
    raw = q.tobytes()
    body = codecs.encode_chunk(raw, T.INT8, 128)
    assert body[1] == codecs.NEIGHBOUR
    assert codecs.decode_chunk(body, q.size, T.INT8) == raw
    context = codecs._encode_context(np.frombuffer(raw, np.uint8), 128, None)
    assert context is not None and len(body) < 0.88 * len(context)
    # an int8 table with no similar rows keeps the plain context coding
    plain = _rank1_int8(1024, 128, 3)
    assert codecs.encode_chunk(plain.tobytes(), T.INT8, 128)[1] != codecs.NEIGHBOUR


@pytest.mark.parametrize("which", ["context", "neighbour"])
def test_corrupt_context_chunks_raise_codec_errors(which: str) -> None:
    q = _embedding_like(768, 96, 4) if which == "neighbour" else _rank1_int8(256, 96, 4)
    raw = q.tobytes()
    body = codecs.encode_chunk(raw, T.INT8, 96)
    assert body[1] == (codecs.NEIGHBOUR if which == "neighbour" else codecs.CONTEXT)
    rng = np.random.default_rng(5)
    for _ in range(60):
        bad = bytearray(body)
        pos = int(rng.integers(2, min(len(bad), 400)))
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = codecs.decode_chunk(bytes(bad), q.size, T.INT8)
        except codecs.CodecError:
            continue
        assert len(out) == q.size  # undetected here: the tensor's sha256 refuses it
    with pytest.raises(codecs.CodecError):
        codecs.decode_chunk(body[: len(body) // 2], q.size, T.INT8)


def _record_kinds(pkg: Path) -> list[str]:
    f, end, _version = container._open_package(pkg, container.MAGIC_PACK)
    with f:
        return [kind for kind, _body in container._records(f, end)]


def test_version_1_packages_still_unpack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package written as version 1 wrote (no context chunks, version 1 header) restores exactly."""
    src = tmp_path / "typed.onnx"
    src.write_bytes(_typed_model().SerializeToString())
    # small chunks: the 32 KB int8 tensor is 2 chunks in version 1 and 1 in version 2 (8-bit chunks doubled)
    monkeypatch.setattr(codecs, "CHUNK_BYTES", 2**16)
    with monkeypatch.context() as mp:
        mp.setattr(container, "VERSION", 1)
        mp.setattr(codecs, "_encode_context", lambda *a: None)
        mp.setattr(codecs, "_encode_neighbour", lambda *a: None)
        pack(src, tmp_path / "v1.ocpk")
    raw = (tmp_path / "v1.ocpk").read_bytes()
    assert struct.unpack_from("<H", raw, 4)[0] == 1
    out = tmp_path / "out"
    out.mkdir()
    chunks = _record_kinds(tmp_path / "v1.ocpk")
    unpack(tmp_path / "v1.ocpk", out / "m.onnx")
    assert _sha(out / "m.onnx") == _sha(src)
    # the current writer says version 2
    pack(src, tmp_path / "v2.ocpk")
    assert struct.unpack_from("<H", (tmp_path / "v2.ocpk").read_bytes(), 4)[0] == container.VERSION == 2
    chunks2 = _record_kinds(tmp_path / "v2.ocpk")
    assert chunks.count("C") == chunks2.count("C") + 1
    unpack(tmp_path / "v2.ocpk", out / "m2.onnx")
    assert _sha(out / "m2.onnx") == _sha(src)
