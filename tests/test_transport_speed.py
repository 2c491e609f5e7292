"""The transport coder's faster, leaner paths write the very bytes of the straightforward ones.

Each optimised helper of ``transport.codecs`` (slabbed sorting, counting and widening, the slabbed
context fit, the histogram estimate, the super-block row search on threads, the pruned table choice)
is checked against a plain reference implementation (the code it replaced) on the same data, and
whole chunks are coded with small slabs and with the default ones: same bytes, and they decode.
"""

from __future__ import annotations

import tracemalloc

import constriction
import numpy as np
import pytest
from onnx import TensorProto as T

from onnxcompress.transport import codecs

# --------------------------------------------------------------------------- references (the replaced code)


def _ref_spread_values(stream: np.ndarray, alphabet: int, signed: bool) -> np.ndarray:
    stream = stream.astype(np.int32)
    if signed:
        half = alphabet // 2
        return np.where(stream >= half, stream - alphabet, stream)
    return stream


def _ref_ctx_fit(v: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    e = v.astype(np.float32)
    e *= e
    e += 0.25
    rows, cols = e.shape
    if mode == "r":
        return np.round(4 * np.log2(e.mean(axis=1))).astype(np.int16), np.zeros(cols, np.int16)
    if mode == "c":
        return np.zeros(rows, np.int16), np.round(4 * np.log2(e.mean(axis=0))).astype(np.int16)
    r = e.mean(axis=1)
    c = np.ones(cols)
    for _ in range(3):
        c = (e / r[:, None]).mean(axis=0)
        r = (e / c[None, :]).mean(axis=1)
    qc = np.round(4 * np.log2(c))
    shift = np.median(qc)
    return np.round(4 * np.log2(r) + shift).astype(np.int16), (qc - shift).astype(np.int16)


def _ref_ctx_index(qr: np.ndarray, qc: np.ndarray) -> np.ndarray:
    k = qr.astype(np.int32)[:, None] + qc.astype(np.int32)[None, :]
    return (np.clip(k, codecs.CTX_KMIN, codecs.CTX_KMAX) - codecs.CTX_KMIN).astype(np.uint8)


def _ref_ctx_choose(values: np.ndarray, half: int, modes: tuple[str, ...]) -> tuple:
    rows = values.shape[0]
    sym = values.astype(np.int32) + half
    sample = slice(None, None, max(1, values.size // codecs.ESTIMATE_SYMBOLS))
    best = None
    for mode in modes:
        qr, qc = _ref_ctx_fit(values, mode)
        side = [codecs._ctx_side(qr), codecs._ctx_side(qc)]
        idx = _ref_ctx_index(qr, qc)[sample]
        s = sym[sample]
        scale = rows / idx.shape[0]
        for nu_code in range(len(codecs.CTX_NUS)):
            t = codecs._ctx_table_set(nu_code, half)
            log2p = np.log2(t) - np.log2(t.sum(axis=1, keepdims=True))
            bits = -float(log2p[idx, s].sum()) * scale + 8 * sum(len(b) for b in side)
            if best is None or bits < best[0]:
                best = (bits, nu_code, qr, qc, side)
    return best


def _ref_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = x.shape
    norm2 = (x * x).sum(axis=1)
    xn = x / np.sqrt(norm2 + 1e-12)[:, None]
    refs = np.zeros(rows, np.int64)
    betas = np.zeros(rows, np.int8)
    pool = max(codecs.NB_BLOCK, int(codecs.NB_WORK / (rows * cols)))
    for b0 in range(codecs.NB_BLOCK, rows, codecs.NB_BLOCK):
        b1 = min(rows, b0 + codecs.NB_BLOCK)
        first = max(0, b0 - pool)
        sim = xn[b0:b1] @ xn[first:b0].T
        j = np.argmax(np.abs(sim), axis=1) + first
        c = sim[np.arange(b1 - b0), j - first].astype(np.float64)
        beta = (x[b0:b1] * x[j]).sum(axis=1) / np.maximum(norm2[j], 1e-12)
        bq = np.clip(np.round(beta * 32), -codecs.NB_BETA, codecs.NB_BETA).astype(np.int8)
        gain = 0.5 * cols * np.log2(1.0 / np.maximum(1.0 - c * c, 1e-9))
        use = (gain > codecs.NB_SIDE_BITS) & (bq != 0)
        refs[b0:b1] = np.where(use, j, 0)
        betas[b0:b1] = np.where(use, bq, 0)
    return refs, betas


def _ref_quantized_table(counts: np.ndarray) -> tuple[np.ndarray, bytes, float]:
    c = counts.astype(np.float64)
    n = c.sum(axis=1, keepdims=True)
    best = None
    for total in (256, 1024, 4096, 0):
        q = np.where(c > 0, np.maximum(1, np.round(c * total / np.maximum(n, 1))), 0) if total else c
        if q.max(initial=0) >= 2**32:
            continue
        table = q.astype("<u4")
        width = "<u1" if q.max(initial=0) < 256 else "<u2" if q.max(initial=0) < 65536 else "<u4"
        blob = bytes([np.dtype(width).itemsize]) + codecs._zc(table.astype(width).tobytes(), 19)
        p = np.where(q > 0, q / np.maximum(q.sum(axis=1, keepdims=True), 1), 1.0)
        bits = float(-(c * np.log2(p)).sum()) + 8 * len(blob)
        if best is None or bits < best[2]:
            best = (table, blob, bits)
    return best


# --------------------------------------------------------------------------- data


def _spread_matrix(rows: int, cols: int, seed: int, limit: int = 127) -> np.ndarray:
    """Student-t symbols with a spread per row and per column (int16, within +-limit)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(rows, cols)) * rng.uniform(1, 25, size=(rows, 1)) * rng.uniform(0.5, 2, size=(1, cols))
    return np.clip(np.round(x), -limit, limit).astype(np.int16)


def _similar_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """int8 rows that resemble earlier rows (an embedding table), some repeated exactly."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols))
    for r in range(codecs.NB_BLOCK, rows):
        j = rng.integers(0, r // codecs.NB_BLOCK * codecs.NB_BLOCK)
        x[r] = x[j] if r % 97 == 0 else 0.9 * x[j] * rng.choice([-1.0, 1.0]) + 0.4 * x[r]
    return np.round(x / np.abs(x).max(axis=1, keepdims=True) * 127).astype(np.int8)


# --------------------------------------------------------------------------- helpers against references


def test_spread_values_match_the_two_complement_reading() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(40, 70), dtype=np.uint8)
    for stream, alphabet in ((data, 256), (data & 0x0F, 16), (data >> 4, 16)):
        for signed in (True, False):
            got = codecs._spread_values(stream, alphabet, signed)
            ref = _ref_spread_values(stream, alphabet, signed)
            assert np.array_equal(got.astype(np.int32), ref)
            assert np.array_equal(codecs._row_spread(got), codecs._row_spread(ref))
            assert np.array_equal(codecs._row_spread(got.T), codecs._row_spread(ref.T))


@pytest.mark.parametrize("shape", [(3000, 384), (700, 96), (40, 5000), (9000, 16)])
def test_slabbed_context_fit_is_bit_identical(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    v = _spread_matrix(*shape, seed=shape[0])
    monkeypatch.setattr(codecs, "SLAB", 50_000)  # many slabs, a ragged last one
    for dtype in (np.int8, np.int16):
        vv = v.astype(dtype) if dtype == np.int16 else np.clip(v, -128, 127).astype(np.int8)
        for mode in ("rc", "r", "c"):
            got, ref = codecs._ctx_fit(vv, mode), _ref_ctx_fit(vv, mode)
            assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), mode
        qr, qc = codecs._ctx_fit(vv, "rc")
        assert np.array_equal(codecs._ctx_index(qr, qc), _ref_ctx_index(qr, qc))


@pytest.mark.parametrize("half", [128, codecs.NB_HALF])
def test_histogram_estimate_chooses_as_the_per_symbol_sum(half: int) -> None:
    for seed, shape in enumerate([(3000, 384), (2048, 700), (300, 64)]):
        v = _spread_matrix(*shape, seed=seed, limit=127 if half == 128 else 384)
        if half == 128:
            v = v.astype(np.int8)
        modes = ("rc", "r", "c") if half == 128 else ("rc", "r")
        got, ref = codecs._ctx_choose(v, half, modes), _ref_ctx_choose(v, half, modes)
        assert got[1] == ref[1] and got[4] == ref[4]
        assert np.array_equal(got[2], ref[2]) and np.array_equal(got[3], ref[3])
        assert got[0] == pytest.approx(ref[0], rel=1e-9)


def test_group_by_is_one_stable_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 81, size=250_001).astype(np.uint8)
    idx[1000:60000] = 7  # long runs of one context across slab edges
    sym = rng.integers(-300, 300, size=idx.size).astype(np.int16)
    monkeypatch.setattr(codecs, "SLAB", 40_000)
    got, counts = codecs._group_by(sym, idx, 81)
    assert np.array_equal(got, sym[np.argsort(idx, kind="stable")])
    assert np.array_equal(counts, np.bincount(idx, minlength=81))
    assert np.array_equal(codecs._histogram(idx, 81), np.bincount(idx, minlength=81))


def test_slabbed_encode_reverse_gives_the_same_words(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    sym = rng.integers(0, 200, size=100_003).astype(np.uint8)
    table = np.bincount(sym, minlength=256).astype(np.float64) + 1
    model = constriction.stream.model.Categorical(table, perfect=False)
    whole = constriction.stream.stack.AnsCoder()
    whole.encode_reverse((sym.astype(np.int32) + 3) % 256, model)
    monkeypatch.setattr(codecs, "SLAB", 7_000)
    slabbed = constriction.stream.stack.AnsCoder()
    codecs._encode_reverse(slabbed, ((sym.astype(np.int16) + 3) % 256).astype(np.int16), model)
    assert np.array_equal(whole.get_compressed(), slabbed.get_compressed())
    offset = constriction.stream.stack.AnsCoder()
    codecs._encode_reverse(offset, sym, model, offset=0)
    plain = constriction.stream.stack.AnsCoder()
    plain.encode_reverse(sym.astype(np.int32), model)
    assert np.array_equal(offset.get_compressed(), plain.get_compressed())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_search_matches_the_block_loop(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    v = _similar_rows(1500, 96, 5)
    monkeypatch.setattr(codecs, "NB_WORK", 96 * 1500 * 300.0)  # a pool of 300 rows: windows slide
    monkeypatch.setattr(codecs, "NEIGHBOUR_THREADS", threads)
    xn, norm2 = codecs._unit_rows(v)
    refs, betas = codecs._neighbours(v, xn, norm2)
    ref_refs, ref_betas = _ref_neighbours(v.astype(np.float32))
    assert np.array_equal(refs, ref_refs) and np.array_equal(betas, ref_betas)
    assert betas.any()
    x = v.astype(np.float32)
    assert np.array_equal(xn, x / np.sqrt((x * x).sum(axis=1) + 1e-12)[:, None])


def test_pruned_table_choice_matches_trying_every_table() -> None:
    rng = np.random.default_rng(6)
    cases = [
        np.bincount(rng.integers(0, 256, 50), minlength=256)[None],  # few symbols: a coarse table wins
        np.stack(
            [
                np.bincount(np.clip(rng.normal(128, s, 200_000), 0, 255).astype(int), minlength=256)
                for s in (3, 9, 30, 60)
            ]
        ),
        np.bincount(np.clip(rng.normal(8, 2, 3000), 0, 15).astype(int), minlength=16)[None],
        np.zeros((1, 16), np.int64),
    ]
    for counts in cases:
        got, ref = codecs._quantized_table(counts), _ref_quantized_table(counts)
        assert np.array_equal(got[0], ref[0]) and got[1] == ref[1] and got[2] == ref[2]


# --------------------------------------------------------------------------- whole chunks


def _chunks() -> list[tuple[bytes, int, int, int | None]]:
    rng = np.random.default_rng(7)
    emb = _similar_rows(1100, 128, 8)
    ctx = np.clip(_spread_matrix(600, 200, 9), -128, 127).astype(np.int8)
    blocked = np.clip(_spread_matrix(384, 256, 10), -128, 127).astype(np.int8).reshape(12, 32, 256)
    packed4 = rng.integers(0, 256, size=(300, 160), dtype=np.uint8)
    u8 = (ctx.astype(np.int16) + 128).astype(np.uint8)
    f32 = (rng.standard_normal((200, 300)) * 0.05).astype(np.float32)
    return [
        (emb.tobytes(), T.INT8, 128, None),
        (ctx.tobytes(), T.INT8, 200, None),
        (blocked.tobytes(), T.INT8, 32 * 256, 256),
        (packed4.tobytes(), T.UINT8, 160, None),
        (packed4.tobytes(), T.INT4, 160, None),
        (u8.tobytes(), T.UINT8, 200, None),
        (f32.tobytes(), T.FLOAT, 1200, None),
    ]


def test_chunks_code_to_the_same_bytes_with_small_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slab sizes and threads change how the coder works, never what it writes; every chunk decodes."""
    default = [codecs.encode_chunk(d, t, r, inner=i) for d, t, r, i in _chunks()]
    assert {b[1] for b in default} >= {codecs.NEIGHBOUR, codecs.CONTEXT, codecs.PLANES}
    monkeypatch.setattr(codecs, "SLAB", 9_999)
    monkeypatch.setattr(codecs, "NEIGHBOUR_THREADS", 1)
    small = [codecs.encode_chunk(d, t, r, inner=i) for d, t, r, i in _chunks()]
    assert small == default
    for (data, data_type, _r, _i), body in zip(_chunks(), default):
        assert codecs.decode_chunk(body, len(data), data_type) == data
    # deltas too (diff): the same bytes both ways, and they restore the new chunk
    data, data_type, row, _ = _chunks()[1]
    old = bytes((np.frombuffer(data, np.uint8) ^ (np.arange(len(data)) % 7 == 0)).astype(np.uint8))
    monkeypatch.setattr(codecs, "SLAB", 2**20)
    delta = codecs.encode_chunk(data, data_type, row, old)
    monkeypatch.setattr(codecs, "SLAB", 9_999)
    assert codecs.encode_chunk(data, data_type, row, old) == delta
    assert codecs.decode_chunk(delta, len(data), data_type, old) == data


def test_int8_chunk_working_memory_is_bounded() -> None:
    """Coding a 2 MiB int8 embedding-like chunk (every candidate, row search included) holds at most
    18 bytes per symbol of numpy/Python memory (measured 13-16; the replaced code: 27-29)."""
    q = _similar_rows(4096, 512, 11)
    raw = q.tobytes()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        body = codecs.encode_chunk(raw, T.INT8, 512)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert body[1] == codecs.NEIGHBOUR
    assert peak < 18 * q.size, f"{peak / q.size:.1f} bytes per symbol"
