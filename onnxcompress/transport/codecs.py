"""Lossless coders for tensor payloads, chosen by the kind of tensor and by measured size.

Every tensor is coded in chunks of whole rows (so memory stays bounded on any model), and every chunk
is coded by the cheapest of a few candidates, measured on that chunk:

* **Float and wide integer tensors** (float32/16, bfloat16, float64, int16..int64): the bytes are split
  into byte planes (plane ``j`` holds byte ``j`` of every element, "shuffle"). Low mantissa planes are
  close to noise; the plane holding sign and exponent has a few bits of entropy. Each plane is stored
  raw, zstd-coded, or coded with an order-0 rANS coder (``constriction``) whose frequency table
  travels with it; the smallest wins. With ``n`` symbols of empirical distribution ``p`` the rANS
  size is ``n * H(p) / 8`` bytes plus the table, within a few bytes of it.
* **Integer symbols** (int8/uint8, packed int4/uint4 with two symbols per byte): each row (or each
  column: per-channel quantization puts one scale per output channel) has its own spread; rows are
  grouped into ``G`` classes by the standard deviation of their symbols and each class gets its own
  frequency table. The code length is ``sum_g n_g * H(p_g)`` plus ``G`` tables and the row classes.
  Candidates are ``G`` in {1, 4, 16} on rows or columns, bytes or nibbles (MatMulNBits packs 4-bit
  symbols into uint8); the estimate picks one, and zstd wins when it is smaller (runs, repeats).
  The empirical per-row entropy is a lower bound no decodable code reaches: a row of ``n`` symbols
  over ``k`` letters has an entropy estimate biased low by about ``(k - 1) / (2 n ln 2)`` bits per
  symbol (Miller-Madow), 0.3-0.5 bits for rows of 384 int8 symbols.
* **8-bit symbols with context** (container version 2): two more candidates, kept when smaller.
  *Context tables*: the chunk seen as a matrix of the tensor's innermost axis; the symbol at (r, c)
  follows a discretised Student-t law whose variance is ``2^((u_r + w_c) / 4)`` (a rank-1 fit of the
  squared symbols: a row's and a column's spread, e.g. smoothing and per-channel scales), ``u`` and
  ``w`` sent once per row and column; the decoder computes the tables, none travels.
  *Row prediction*: each row coded as the residual from ``beta * row[j]`` of its most similar earlier
  row (cosine search among the rows of earlier 32-row blocks; a probe of the last rows skips the
  search when it cannot pay), with the context tables on the residuals. Embedding tables have many
  rows like another (related tokens): MiniLM's int8 word embeddings take 7.18 bits per symbol
  instead of 7.37 with per-row tables (zstd -19: 7.42; their per-tensor entropy: 7.37).
* **Deltas** (``diff``): the chunk is first transformed against the same element range of the old
  tensor (subtraction modulo 2^8 per symbol for integer symbols, XOR for floats: unchanged
  values become zeros), then coded as above; the plain coding is kept when it is smaller.

Each chunk starts with its codec id; decoding needs only the chunk, the element type and the row
length (and the old chunk for deltas).
"""

from __future__ import annotations

import struct
from typing import Any

import constriction
import numpy as np
import zstandard

from .. import cores
from ..errors import OnnxCompressError
from ..io import trim_heap

# chunk codecs (CONTEXT: container version 2 and later)
RAW, ZSTD, PLANES, SYMBOLS, CONTEXT, NEIGHBOUR = 0, 1, 2, 3, 4, 5
CODEC_NAMES = {
    RAW: "raw",
    ZSTD: "zstd",
    PLANES: "planes",
    SYMBOLS: "symbols-rans",
    CONTEXT: "symbols-context",
    NEIGHBOUR: "symbols-neighbour",
}
# plane methods
P_RAW, P_ZSTD, P_ANS = 0, 1, 2

ZSTD_LEVEL = 3
TRIM_MIN_BYTES = 1 << 20  # chunks from this size on: the heap is trimmed after each coder
CHUNK_BYTES = 16 * 2**20
_ONE_BYTE = {2, 3}  # UINT8, INT8
_NIBBLES = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1
_WIDE = {1: 4, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}  # data type -> itemsize


class CodecError(OnnxCompressError):
    """A chunk cannot be decoded (corrupt package)."""


def element_kind(data_type: int) -> tuple[str, int]:
    """``("planes", itemsize)``, ``("bytes", 1)``, ``("nibbles", 1)`` or ``("opaque", 1)``."""
    if data_type in _WIDE:
        return "planes", _WIDE[data_type]
    if data_type in _ONE_BYTE:
        return "bytes", 1
    if data_type in _NIBBLES:
        return "nibbles", 1
    return "opaque", 1


def chunk_rows(nbytes: int, row_bytes: int, data_type: int = 0, version: int = 2) -> int:
    """Bytes per chunk: a whole number of rows near ``CHUNK_BYTES`` (for symbols, whose coding takes
    20-30 bytes of working memory per symbol: a quarter, and for 8-bit symbols from container version 2
    on a half, so that more earlier rows can predict a row), at least one row."""
    kind = element_kind(data_type)[0]
    if kind in ("planes", "opaque"):
        chunk_bytes = CHUNK_BYTES
    elif kind == "bytes" and version >= 2:
        chunk_bytes = CHUNK_BYTES // 2
    else:
        chunk_bytes = CHUNK_BYTES // 4
    if row_bytes <= 0 or row_bytes > chunk_bytes:
        return min(nbytes, chunk_bytes) or 1
    return max(1, chunk_bytes // row_bytes) * row_bytes


# --------------------------------------------------------------------------- helpers


def _zc(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def _zd(data: bytes | memoryview, size: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt package: a zstd block does not decode ({exc})") from None
    if len(out) != size:
        raise CodecError("corrupt package: a zstd block decodes to the wrong size")
    return out


def _entropy_bits(counts: np.ndarray) -> float:
    """Total code length in bits of the symbols counted in ``counts`` (last axis: the alphabet)."""
    c = counts.astype(np.float64)
    n = c.sum(axis=-1, keepdims=True)
    p = np.where(c > 0, c / np.maximum(n, 1), 1.0)
    return float(-(c * np.log2(p)).sum())


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError("corrupt package: a chunk ends early")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def blob(self) -> memoryview:
        (n,) = self.unpack("<Q")
        return self.take(n)


def _blob(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


# --------------------------------------------------------------------------- rANS with class tables


def _quantized_table(counts: np.ndarray) -> tuple[np.ndarray, bytes, float]:
    """The cheapest transmitted frequency table for ``counts`` ([groups, alphabet]).

    Counts are rescaled per class to a total near ``T`` (each seen symbol keeps at least 1) for
    ``T`` in {256, 1024, 4096, exact}; a coarse table is cheaper to send and costs a little more
    per symbol (the cross-entropy of the data under the rescaled table). Returns the table, its
    zstd-coded bytes and the estimated total bits (table + symbols).
    """
    c = counts.astype(np.float64)
    n = c.sum(axis=1, keepdims=True)
    cands = []  # (symbol bits, position, rescaled counts)
    for pos, total in enumerate((256, 1024, 4096, 0)):
        if total:
            q = np.where(c > 0, np.maximum(1, np.round(c * total / np.maximum(n, 1))), 0)
        else:
            q = c
        if q.max(initial=0) >= 2**32:
            continue
        p = np.where(q > 0, q / np.maximum(q.sum(axis=1, keepdims=True), 1), 1.0)
        cands.append((float(-(c * np.log2(p)).sum()), pos, q))
    # The first cheapest in the order above; a table is zstd-coded only while its symbols alone (plus
    # the blob's width byte) may still beat the best total: the others cannot win.
    best: tuple[np.ndarray, bytes, float] | None = None
    best_pos = -1
    for symbol_bits, pos, q in sorted(cands, key=lambda t: (t[0], t[1])):
        if best is not None and symbol_bits + 8 > best[2]:
            break
        table = q.astype("<u4")
        width = "<u1" if q.max(initial=0) < 256 else "<u2" if q.max(initial=0) < 65536 else "<u4"
        blob = bytes([np.dtype(width).itemsize]) + _zc(table.astype(width).tobytes(), 19)
        bits = symbol_bits + 8 * len(blob)
        if best is None or bits < best[2] or (bits == best[2] and pos < best_pos):
            best, best_pos = (table, blob, bits), pos
    assert best is not None
    return best


SLAB = 2**20  # symbols widened, counted or sorted at a time (bounds the temporary arrays)


def _histogram(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """``np.bincount(symbols, minlength=alphabet)[:alphabet]``, counted a slab at a time (bincount widens
    its input to 8 bytes per symbol)."""
    counts = np.zeros(alphabet, np.int64)
    for a in range(0, symbols.size, SLAB):
        counts += np.bincount(symbols[a : a + SLAB], minlength=alphabet)[:alphabet]
    return counts


def _encode_reverse(coder: Any, symbols: np.ndarray, model: Any, offset: int = 0) -> None:
    """``coder.encode_reverse(symbols + offset, model)`` with the symbols widened to int32 a slab at a time:
    the same pushes in the same order (the last slab first), so the same words."""
    if symbols.dtype == np.int32 and not offset and symbols.size <= SLAB:
        coder.encode_reverse(symbols, model)
        return
    for a in reversed(range(0, symbols.size, SLAB)):
        part = symbols[a : a + SLAB].astype(np.int32)
        if offset:
            part += offset
        coder.encode_reverse(part, model)


def _words(coder: Any) -> bytes:
    """The coder's compressed words as little-endian bytes (the coder's array is not copied once more
    on a little-endian machine)."""
    words = coder.get_compressed()
    return np.asarray(words, dtype="<u4").tobytes()


def _ans_encode(streams: list[tuple[np.ndarray, np.ndarray, int]]) -> bytes:
    """Code several symbol streams with one rANS stack.

    Args:
        streams: ``(symbols, classes, alphabet)``; symbols (any integer type), 1-D with one class per
            symbol or 2-D (C-contiguous) with one class per row, are grouped by their class (stable,
            in row-major order), each class with its own table. The decoder knows the classes (and
            so the number of symbols in each). The list is emptied as it is read: a stream's symbols
            are not held beyond their grouped copy.

    Returns: per stream its table, then the rANS words.
    """
    coder = constriction.stream.stack.AnsCoder()
    head = []
    plan = []
    count = len(streams)
    streams.reverse()
    while streams:
        symbols, classes, alphabet = streams.pop()
        groups = int(classes.max()) + 1 if classes.size else 1
        if groups == 1:
            parts = [symbols.reshape(-1)]
        else:  # per-row classes select whole rows: the symbols of per-symbol classes, in the same order
            parts = [symbols[classes == g].reshape(-1) for g in range(groups)]
        del symbols, classes
        counts = np.stack([_histogram(p, alphabet) for p in parts])
        table, blob, _bits = _quantized_table(counts)
        head.append(struct.pack("<II", groups, alphabet) + _blob(blob))
        plan.append((parts, table))
    for parts, table in reversed(plan):
        for g in reversed(range(table.shape[0])):
            part = parts[g]
            if part.size:
                model = constriction.stream.model.Categorical(table[g].astype(np.float64), perfect=False)
                _encode_reverse(coder, part, model)
    words = _words(coder)
    return struct.pack("<I", count) + b"".join(head) + _blob(words)


def _ans_decode(r: _Reader, classes_per_stream: list[np.ndarray]) -> list[np.ndarray]:
    (count,) = r.unpack("<I")
    if count != len(classes_per_stream):
        raise CodecError("corrupt package: wrong number of symbol streams")
    tables = []
    for _ in range(count):
        groups, alphabet = r.unpack("<II")
        if groups * alphabet > 2**20 or groups == 0 or alphabet == 0:
            raise CodecError("corrupt package: symbol table too large")
        blob = r.blob()
        if not len(blob) or blob[0] not in (1, 2, 4):
            raise CodecError("corrupt package: bad symbol table")
        width = {1: "<u1", 2: "<u2", 4: "<u4"}[blob[0]]
        raw = np.frombuffer(_zd(blob[1:], groups * alphabet * blob[0]), dtype=width)
        tables.append(raw.reshape(groups, alphabet).astype(np.float64))
    words = np.frombuffer(bytes(r.blob()), dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    out = []
    for table, classes in zip(tables, classes_per_stream):
        groups = table.shape[0]
        if classes.size and int(classes.max()) >= groups:
            raise CodecError("corrupt package: symbol classes do not match the chunk")
        sizes = np.bincount(classes, minlength=groups) if groups > 1 else np.array([classes.size])
        parts = []
        for g in range(groups):
            if sizes[g]:
                if not table[g].any():
                    raise CodecError("corrupt package: empty symbol table")
                model = constriction.stream.model.Categorical(table[g], perfect=False)
                try:
                    parts.append(coder.decode(model, int(sizes[g])))
                except Exception as exc:  # constriction raises its own errors on garbage
                    raise CodecError(f"corrupt package: rANS data does not decode ({exc})") from None
        if groups == 1:
            symbols = parts[0] if parts else np.zeros(0, np.int32)
        else:
            symbols = np.empty(classes.size, np.int32)
            it = iter(parts)
            for g in range(groups):
                if sizes[g]:
                    symbols[classes == g] = next(it)
        out.append(symbols)
    return out


# --------------------------------------------------------------------------- planes


def _encode_planes(data: np.ndarray, itemsize: int) -> bytes:
    planes = data.reshape(-1, itemsize)
    out = [struct.pack("<B", itemsize)]
    for j in range(itemsize):
        plane = np.ascontiguousarray(planes[:, j])
        raw = plane.tobytes()
        best = (len(raw), P_RAW, raw)
        z = _zc(raw)
        if len(z) < best[0]:
            best = (len(z), P_ZSTD, z)
        counts = _histogram(plane, 256)
        estimate = _quantized_table(counts[None])[2] / 8
        if estimate < 0.98 * best[0]:
            a = _ans_encode([(plane, np.zeros(plane.size, np.int8), 256)])
            if len(a) < best[0]:
                best = (len(a), P_ANS, a)
        out.append(struct.pack("<B", best[1]) + _blob(best[2]))
    return b"".join(out)


def _decode_planes(r: _Reader, nbytes: int) -> np.ndarray:
    (itemsize,) = r.unpack("<B")
    if itemsize == 0 or nbytes % itemsize:
        raise CodecError("corrupt package: bad plane layout")
    n = nbytes // itemsize
    planes = np.empty((n, itemsize), dtype=np.uint8)
    for j in range(itemsize):
        (method,) = r.unpack("<B")
        body = r.blob()
        if method == P_RAW:
            if len(body) != n:
                raise CodecError("corrupt package: plane size mismatch")
            planes[:, j] = np.frombuffer(body, dtype=np.uint8)
        elif method == P_ZSTD:
            planes[:, j] = np.frombuffer(_zd(body, n), dtype=np.uint8)
        elif method == P_ANS:
            (sym,) = _ans_decode(_Reader(body), [np.zeros(n, np.int8)])
            planes[:, j] = sym.astype(np.uint8)
        else:
            raise CodecError(f"corrupt package: unknown plane method {method}")
    return planes.reshape(-1)


# --------------------------------------------------------------------------- symbols


def _row_spread(values: np.ndarray) -> np.ndarray:
    """The standard deviation of each row (axis 0 of ``values``, 2-D), in float32."""
    return values.astype(np.float32).std(axis=1)


def _row_spreads(m: np.ndarray, alphabet: int, signed: bool) -> np.ndarray:
    """``_row_spread(_spread_values(m, alphabet, signed))``, a slab of rows at a time: the same floats
    without full-size copies (a chunk of 8 MB of symbols: 72 MB of int8 and float32 temporaries).

    Each row's deviation is its own reduction and a slab keeps ``m``'s layout, so numpy sums every
    row the way it does over the whole: pairwise along a contiguous row, one column after another
    along a transposed one (then no slab is a single row, which numpy would sum pairwise).
    """
    rows, cols = m.shape
    if rows * cols <= SLAB or rows < 4:
        return _row_spread(_spread_values(m, alphabet, signed))
    out = np.empty(rows, np.float32)
    step = max(2, SLAB // max(1, cols))
    starts = list(range(0, rows, step))
    if rows - starts[-1] == 1:  # no single-row slab (see above): the last row joins the slab before
        starts.pop()
    for i, r0 in enumerate(starts):
        r1 = starts[i + 1] if i + 1 < len(starts) else rows
        out[r0:r1] = _row_spread(_spread_values(m[r0:r1], alphabet, signed))
    return out


def _row_classes(values: np.ndarray, groups: int, spread: np.ndarray | None = None) -> np.ndarray:
    """Class of each row (axis 0 of ``values``, 2-D) by the quantile of its standard deviation
    (``spread``: that deviation when already computed by :func:`_row_spread`)."""
    if groups == 1 or values.shape[0] < groups:
        return np.zeros(values.shape[0], np.uint8)
    if spread is None:
        spread = _row_spread(values)
    edges = np.quantile(spread, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, spread, side="right").astype(np.uint8)


def _streams(data: np.ndarray, mode: str, signed: bool) -> list[np.ndarray]:
    """Symbol streams (uint8 with values in [0, alphabet)): the bytes, or their low and high nibbles."""
    return [_stream(data, mode, k) for k in range(1 if mode == "bytes" else 2)]


def _stream(data: np.ndarray, mode: str, k: int) -> np.ndarray:
    """Stream ``k`` of :func:`_streams` alone."""
    if mode == "bytes":
        return data
    return data & 0x0F if k == 0 else data >> 4


def _spread_values(stream: np.ndarray, alphabet: int, signed: bool) -> np.ndarray:
    """The symbols as values (signed: ``s - alphabet`` for ``s >= alphabet / 2``), in the narrowest type."""
    if signed and alphabet == 256:
        return stream.astype(np.int8)  # wraps modulo 2^8: the same values as the two's complement reading
    if signed and alphabet == 16:
        return (stream.astype(np.int8) ^ 8) - np.int8(8)
    if signed:
        half = alphabet // 2
        return np.where(stream >= half, stream - alphabet, stream)
    return stream


def _layout(size: int, row_len: int) -> tuple[int, int]:
    """``(rows, row_len)`` for a chunk: its rows, or blocks of 4096 symbols for 1-D data."""
    rows = size // row_len if row_len and size % row_len == 0 else 1
    if rows == 1:
        row_len = min(size, 4096)
        rows = size // row_len
        if rows * row_len != size:
            row_len, rows = size, 1
    return rows, row_len


ESTIMATE_SYMBOLS = 2**20


def _symbol_candidates(data: np.ndarray, row_len: int, kind: str, signed: bool) -> list[tuple[float, str, int, int]]:
    """Estimated bits for each (mode, axis, groups) choice, cheapest first.

    Estimated on an even sample of rows when the chunk is large (the choice, not the coding).
    """
    rows, row_len = _layout(data.size, row_len)
    m_all = data.reshape(rows, row_len)
    if data.size > ESTIMATE_SYMBOLS and rows > 64:
        step = max(1, (data.size // ESTIMATE_SYMBOLS))
        m_all = m_all[::step]
    scale = rows / m_all.shape[0]
    rows_or_cols = (rows, row_len)
    modes = ["bytes", "nibbles"] if kind == "bytes" and not signed else ["bytes"] if kind == "bytes" else ["nibbles"]
    out = []
    for mode in modes:
        alphabet = 256 if mode == "bytes" else 16
        streams = _streams(m_all, mode, signed)
        spreads: dict[tuple[int, int], np.ndarray] = {}  # (stream, axis) -> row spreads, shared by the groups
        for axis in (0, 1):
            for groups in (1, 4, 16):
                if (groups == 1 and axis == 1) or (groups > 1 and m_all.shape[axis] < 64 * groups):
                    continue
                bits = 0.0
                for k, s in enumerate(streams):
                    m = s.T if axis else s
                    if groups > 1 and m.shape[0] >= groups and (k, axis) not in spreads:
                        spreads[(k, axis)] = _row_spread(_spread_values(m, alphabet, signed))
                    classes = _row_classes(m, groups, spreads.get((k, axis)))
                    counts = np.bincount(
                        (classes.astype(np.int32)[:, None] * alphabet + m).ravel(), minlength=groups * alphabet
                    ).reshape(groups, alphabet)
                    symbol_bits = _entropy_bits(counts)
                    table_bits = _quantized_table(counts)[2] - symbol_bits
                    bits += symbol_bits * scale + table_bits + rows_or_cols[axis] * np.log2(groups)
                out.append((bits, mode, axis, groups))
    out.sort(key=lambda c: c[0])
    return out


def _encode_symbols(data: np.ndarray, row_len: int, kind: str, signed: bool) -> bytes | None:
    cands = _symbol_candidates(data, row_len, kind, signed)
    _bits, mode, axis, groups = cands[0]
    rows, row_len = _layout(data.size, row_len)
    alphabet = 256 if mode == "bytes" else 16
    streams = []
    class_blobs = []
    # One stream at a time, each as a C-contiguous matrix with one class per row (not a per-symbol copy
    # of the classes): a chunk of 8 MB of symbols takes ~40 MB here instead of ~75 MB.
    for k in range(1 if mode == "bytes" else 2):
        m = _stream(data, mode, k).reshape(rows, -1)
        if axis:
            m = m.T
        spread = _row_spreads(m, alphabet, signed) if groups > 1 and m.shape[0] >= groups else None
        classes = _row_classes(m, groups, spread)
        del spread
        if groups > 1:
            class_blobs.append(_zc(classes.tobytes(), 19))
        streams.append((np.ascontiguousarray(m), classes, alphabet))
        del m
    body = _ans_encode(streams)
    head = struct.pack("<BBBQQ", 0 if mode == "bytes" else 1, axis, groups, rows, row_len)
    return head + b"".join(_blob(c) for c in class_blobs) + _blob(body)


def _decode_symbols(r: _Reader, nbytes: int) -> np.ndarray:
    mode, axis, groups, rows, row_len = r.unpack("<BBBQQ")
    if rows * row_len != nbytes or mode > 1 or axis > 1 or groups == 0:
        raise CodecError("corrupt package: bad symbol layout")
    nstreams = 1 if mode == 0 else 2
    classes = []
    for _ in range(nstreams):
        n = row_len if axis else rows
        c = np.frombuffer(_zd(r.blob(), n), dtype=np.uint8) if groups > 1 else np.zeros(n, np.uint8)
        width = rows if axis else row_len
        classes.append(np.repeat(c, width))
    streams = _ans_decode(_Reader(r.blob()), classes)
    out = []
    for s in streams:
        m = s.reshape((row_len, rows) if axis else (rows, row_len))
        out.append((m.T if axis else m).reshape(-1))
    if mode == 0:
        return out[0].astype(np.uint8)
    return (out[0] | (out[1] << 4)).astype(np.uint8)


# --------------------------------------------------------------------------- symbols with context tables
#
# A weight matrix's int8 symbols are close to independent, but their spread is not the same everywhere:
# per-channel quantization fixes each output column's range, smoothing or the layer's statistics give
# each input row its own spread. Model: the symbol at (r, c) follows a discretised Student-t law whose
# variance is ``2^((u_r + w_c) / 4)``, with ``u`` and ``w`` integers sent once per row and column (a
# rank-1 fit of the squared symbols on a quarter-octave grid). Every distinct ``u_r + w_c`` names one
# table, computed by the decoder from that integer alone, so no table travels; the tail weight
# (degrees of freedom 3..63) is one byte per chunk. The tables are built with additions, products,
# quotients and squarings only (IEEE-exact operations, no exp/log/pow), so the decoder rebuilds the
# very same integer frequencies on any machine.

CTX_KMIN, CTX_KMAX = -16, 64  # context = log2 of the symbol variance in quarter octaves, clipped
CTX_NUS = (3, 7, 15, 31, 63)  # Student-t degrees of freedom; (nu + 1) / 2 is a power of two
_QUARTER_OCTAVES = (1.0, 1.189207115002721, 1.4142135623730951, 1.681792830507429)  # 2^(j/4), as literals
CTX_SIDE_LEVEL = 19


def _ctx_tables(nu_code: int, half: int = 128) -> np.ndarray:
    """Integer frequency tables ``[contexts, 2 * half]`` (symbols -half..half-1 at index +half), one per context.

    ``p(x) ~ (1 + x^2 / ((nu - 2) v))^(-(nu + 1) / 2)`` with variance ``v = 2^(k/4)``, scaled so the
    peak (``x = 0``, exactly 1) becomes 65536, plus 1 so that every symbol can be coded.
    """
    nu = CTX_NUS[nu_code]
    ks = np.arange(CTX_KMIN, CTX_KMAX + 1)
    frac = np.array(_QUARTER_OCTAVES)[ks % 4]
    var = np.ldexp(frac, ks // 4)  # exact
    x = np.arange(-half, half, dtype=np.float64)
    base = 1.0 + (x * x)[None, :] / ((nu - 2) * var)[:, None]
    power = base
    for _ in range(nu_code + 1):  # base^((nu + 1) / 2) by squaring
        power = power * power
    return np.floor(65536.0 / power) + 1.0


_CTX_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _ctx_table_set(nu_code: int, half: int = 128) -> np.ndarray:
    if (nu_code, half) not in _CTX_CACHE:
        _CTX_CACHE[(nu_code, half)] = _ctx_tables(nu_code, half)
    return _CTX_CACHE[(nu_code, half)]


def _ctx_log2p(nu_code: int, half: int = 128) -> np.ndarray:
    t = _ctx_table_set(nu_code, half)
    return np.log2(t) - np.log2(t.sum(axis=1, keepdims=True))


def _ctx_energy(v: np.ndarray) -> np.ndarray:
    """``v^2 + 1/4`` in float32: what :func:`_ctx_fit` fits the spreads to."""
    e = v.astype(np.float32)
    e *= e
    e += 0.25
    return e


def _ctx_row_means(v: np.ndarray, col_scale: np.ndarray | None = None) -> np.ndarray:
    """``(energy / col_scale).mean(axis=1)`` of :func:`_ctx_energy` of ``v``, a slab of rows at a time
    (each row's mean is its own reduction: the same floats as over the whole)."""
    rows, cols = v.shape
    out = np.empty(rows, np.float32)
    step = max(1, SLAB // max(1, cols))
    for r0 in range(0, rows, step):
        e = _ctx_energy(v[r0 : r0 + step])
        if col_scale is not None:
            e = e / col_scale[None, :]
        out[r0 : r0 + step] = e.mean(axis=1)
    return out


def _ctx_col_means(v: np.ndarray, row_scale: np.ndarray | None = None) -> np.ndarray:
    """``(energy / row_scale[:, None]).mean(axis=0)`` of :func:`_ctx_energy` of ``v``, a slab of rows at a
    time. numpy sums along the first axis row after row, so each slab's sum continues from the sum so
    far (passed as the slab's first row): the same floats as over the whole, without a full-size copy."""
    rows, cols = v.shape
    step = max(1, SLAB // max(1, cols))
    total: np.ndarray | None = None
    for r0 in range(0, rows, step):
        e = _ctx_energy(v[r0 : r0 + step])
        if row_scale is not None:
            e = e / row_scale[r0 : r0 + step, None]
        total = np.add.reduce(e if total is None else np.concatenate([total[None, :], e]), axis=0)
    assert total is not None
    return np.true_divide(total, rows, out=total, casting="unsafe")


def _ctx_fit(v: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column context offsets (int16, quarter octaves of variance) for ``mode`` rc / r / c.

    Fitted to ``v^2 + 1/4`` (float32), computed a slab of rows at a time (no full-size float copies).
    """
    rows, cols = v.shape
    if mode == "r":
        return np.round(4 * np.log2(_ctx_row_means(v))).astype(np.int16), np.zeros(cols, np.int16)
    if mode == "c":
        return np.zeros(rows, np.int16), np.round(4 * np.log2(_ctx_col_means(v))).astype(np.int16)
    r = _ctx_row_means(v)
    c = np.ones(cols)
    for _ in range(3):
        c = _ctx_col_means(v, r)
        r = _ctx_row_means(v, c)
    qc = np.round(4 * np.log2(c))
    shift = np.median(qc)
    return np.round(4 * np.log2(r) + shift).astype(np.int16), (qc - shift).astype(np.int16)


def _ctx_index(qr: np.ndarray, qc: np.ndarray) -> np.ndarray:
    """Table index of every symbol (uint8, row-major), computed a slab of rows at a time."""
    out = np.empty((qr.size, qc.size), np.uint8)
    col = qc.astype(np.int32)[None, :]
    step = max(1, SLAB // max(1, qc.size))
    for r0 in range(0, qr.size, step):
        k = qr[r0 : r0 + step].astype(np.int32)[:, None] + col
        np.clip(k, CTX_KMIN, CTX_KMAX, out=k)
        k -= CTX_KMIN
        out[r0 : r0 + step] = k
    return out


def _ctx_matrix(size: int, row_len: int, inner: int | None) -> tuple[int, int] | None:
    """``(rows, cols)``: the chunk as a matrix of its innermost axis when known, else of its rows."""
    for cols in (inner, row_len):
        if cols and 1 < cols < size and size % cols == 0:
            return size // cols, cols
    return None


def _ctx_side(q: np.ndarray) -> bytes:
    """Row or column context offsets: their minimum, then zstd of the offsets from it (1 or 2 bytes each)."""
    low = int(q.min(initial=0))
    span = int(q.max(initial=0)) - low
    width = 1 if span < 256 else 2
    body = (q.astype(np.int32) - low).astype("<u1" if width == 1 else "<u2").tobytes()
    return struct.pack("<hB", low, width) + _zc(body, CTX_SIDE_LEVEL)


def _ctx_side_decode(blob: memoryview, n: int) -> np.ndarray:
    r = _Reader(blob)
    low, width = r.unpack("<hB")
    if width not in (1, 2):
        raise CodecError("corrupt package: bad context side information")
    raw = _zd(r.take(len(r.data) - r.pos), n * width)
    return (np.frombuffer(raw, dtype="<u1" if width == 1 else "<u2").astype(np.int32) + low).astype(np.int16)


def _ctx_choose(
    values: np.ndarray, half: int, modes: tuple[str, ...]
) -> tuple[float, int, np.ndarray, np.ndarray, list[bytes]]:
    """The cheapest (estimated bits, tail code, row offsets, column offsets, side blobs) for ``values``."""
    rows = values.shape[0]
    sample = slice(None, None, max(1, values.size // ESTIMATE_SYMBOLS))
    s = values[sample].astype(np.int32) + half  # only the sampled rows are estimated on
    width = 2 * half
    best = None
    for mode in modes:
        qr, qc = _ctx_fit(values, mode)
        side = [_ctx_side(qr), _ctx_side(qc)]
        idx = _ctx_index(qr[sample], qc)
        scale = rows / idx.shape[0]
        # The code length summed over a histogram of (context, symbol) pairs, not symbol by symbol.
        pairs = idx.astype(np.int32) * width
        pairs += s
        counts = np.bincount(pairs.ravel(), minlength=(CTX_KMAX - CTX_KMIN + 1) * width)
        del pairs
        counts = counts.reshape(-1, width).astype(np.float64)
        for nu_code in range(len(CTX_NUS)):
            bits = -float((counts * _ctx_log2p(nu_code, half)).sum()) * scale + 8 * sum(len(b) for b in side)
            if best is None or bits < best[0]:
                best = (bits, nu_code, qr, qc, side)
    assert best is not None
    return best


def _group_by(sym: np.ndarray, idx: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sym stably ordered by idx, count per idx value)``, for flat ``sym`` and ``idx`` (uint8).

    Sorted a slab of ``SLAB`` symbols at a time and merged group by group: the same order as one
    stable sort of the whole, with index arrays of one slab (not 8 bytes per symbol of the whole).
    """
    n = idx.size
    if n <= SLAB:
        return sym[np.argsort(idx, kind="stable")], np.bincount(idx, minlength=groups)
    counts = np.zeros(groups, np.int64)
    for a in range(0, n, SLAB):
        counts += np.bincount(idx[a : a + SLAB], minlength=groups)
    pos = np.cumsum(counts) - counts
    out = np.empty(n, sym.dtype)
    for a in range(0, n, SLAB):
        part = idx[a : a + SLAB]
        ordered = sym[a : a + SLAB][np.argsort(part, kind="stable")]
        c = np.bincount(part, minlength=groups)
        ends = np.cumsum(c)
        for k in np.flatnonzero(c):
            out[pos[k] : pos[k] + c[k]] = ordered[ends[k] - c[k] : ends[k]]
            pos[k] += c[k]
    return out, counts


def _ctx_encode_groups(coder: Any, sym: np.ndarray, idx: np.ndarray, tables: np.ndarray, offset: int = 0) -> None:
    """Push ``sym + offset`` (flat) onto the rANS stack, grouped by context (decoded back in increasing
    context); ``sym`` may be narrower than int32 (each group is widened as it is coded)."""
    sorted_sym, counts = _group_by(sym, idx, tables.shape[0])
    ends = np.cumsum(counts)
    for k in reversed(np.flatnonzero(counts)):
        model = constriction.stream.model.Categorical(tables[k], perfect=False)
        _encode_reverse(coder, sorted_sym[ends[k] - counts[k] : ends[k]], model, offset)


def _ctx_decode_groups(coder: Any, idx: np.ndarray, tables: np.ndarray) -> np.ndarray:
    order = np.argsort(idx, kind="stable")
    counts = np.bincount(idx, minlength=tables.shape[0])
    parts = []
    try:
        for k in np.flatnonzero(counts):
            model = constriction.stream.model.Categorical(tables[k], perfect=False)
            parts.append(coder.decode(model, int(counts[k])))
    except Exception as exc:  # constriction raises its own errors on garbage
        raise CodecError(f"corrupt package: rANS data does not decode ({exc})") from None
    sym = np.empty(idx.size, np.int32)
    sym[order] = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return sym


def _centered(data: np.ndarray, rows: int, cols: int, signed: bool) -> tuple[int, np.ndarray]:
    """The byte the symbols centre on (their rounded mean, read as int8 or uint8) and the symbols minus it,
    as int8."""
    center = int(np.round((data.view(np.int8) if signed else data).mean())) & 0xFF
    return center, (data - np.uint8(center)).view(np.int8).reshape(rows, cols)


def _uncentered(v: np.ndarray, center: int) -> np.ndarray:
    return (v.astype(np.int8).view(np.uint8).reshape(-1) + np.uint8(center)).astype(np.uint8)


def _encode_context(data: np.ndarray, row_len: int, inner: int | None, signed: bool = True) -> bytes | None:
    """The context coding of a chunk of 8-bit symbols, or None when it does not apply."""
    shape = _ctx_matrix(data.size, row_len, inner)
    if shape is None or min(shape) < 16:
        return None
    rows, cols = shape
    center, v = _centered(data, rows, cols, signed)
    _bits, nu_code, qr, qc, side = _ctx_choose(v, 128, ("rc", "r", "c"))
    coder = constriction.stream.stack.AnsCoder()
    _ctx_encode_groups(coder, v.ravel(), _ctx_index(qr, qc).ravel(), _ctx_table_set(nu_code), offset=128)
    words = _words(coder)
    head = struct.pack("<BBQQ", center, nu_code, rows, cols)
    return head + b"".join(_blob(b) for b in side) + _blob(words)


def _decode_context(r: _Reader, nbytes: int) -> np.ndarray:
    center, nu_code, rows, cols = r.unpack("<BBQQ")
    if rows * cols != nbytes or nu_code >= len(CTX_NUS):
        raise CodecError("corrupt package: bad context layout")
    qr = _ctx_side_decode(r.blob(), rows)
    qc = _ctx_side_decode(r.blob(), cols)
    words = np.frombuffer(bytes(r.blob()), dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    sym = _ctx_decode_groups(coder, _ctx_index(qr, qc).ravel(), _ctx_table_set(nu_code))
    return _uncentered(sym - 128, center)


# --------------------------------------------------------------------------- symbols predicted from an earlier row
#
# Rows of an embedding table are close to independent symbol by symbol, but many rows resemble another
# row (related tokens): a row predicted as ``beta * row[j]`` of its most similar earlier row leaves a
# residual of smaller spread. Each row sends its reference ``j`` and ``beta`` in 1/32 steps (0: no
# reference, when the saving would not pay for them); the residuals are coded with the context tables
# above. Rows are coded in blocks; a row refers only to rows of earlier blocks, so the decoder rebuilds
# a whole block at a time.

NB_BLOCK = 32  # rows decoded together (smaller: earlier rows to refer to, more coder calls)
NB_MIN_ROWS = 512
NB_PROBE = 128  # rows probed before the full search
NB_MIN_GAIN = 0.01  # bits per symbol the probe must promise
NB_BETA = 64  # |beta| <= 2 in 1/32 steps
NB_HALF = 512  # residuals lie in -384..384
NB_SIDE_BITS = 24.0  # about what a row's reference and beta cost
NB_MIN_COLS = 64  # shorter rows do not pay for a reference
NB_WORK = 1e11  # multiply-adds the search may spend per chunk (a few s): bounds the rows searched


def _predict(v: np.ndarray, refs: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """``round(beta / 32 * v[ref])`` per row, in integers (exact on any machine)."""
    return (betas.astype(np.int32)[:, None] * v[refs].astype(np.int32) + 16) >> 5


def _unit_rows(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(xn, norm2)``: the rows of ``v`` (2-D) in float32 scaled to unit length, and their squared norms
    (computed a slab of rows at a time: no float32 copy of ``v`` beside ``xn``)."""
    rows = v.shape[0]
    xn = np.empty(v.shape, np.float32)
    norm2 = np.empty(rows, np.float32)
    step = max(1, SLAB // max(1, v.shape[1]))
    for r0 in range(0, rows, step):
        x = v[r0 : r0 + step].astype(np.float32)
        norm2[r0 : r0 + step] = (x * x).sum(axis=1)
        np.divide(x, np.sqrt(norm2[r0 : r0 + step] + 1e-12)[:, None], out=xn[r0 : r0 + step])
    return xn, norm2


def _neighbour_gain(xn: np.ndarray) -> float:
    """Estimated bits per symbol row prediction saves, from the last ``NB_PROBE`` rows searched among the
    rows before them (so that tables without similar rows skip the full search); ``xn``: unit rows."""
    rows, cols = xn.shape
    pool = max(NB_BLOCK, int(NB_WORK / (rows * cols)))
    first = rows - NB_PROBE
    sim = xn[first:] @ xn[max(0, first - pool) : first].T
    c = np.abs(sim).max(axis=1).astype(np.float64)
    gain = 0.5 * cols * np.log2(1.0 / np.maximum(1.0 - c * c, 1e-9)) - NB_SIDE_BITS
    return float(np.maximum(gain, 0).mean() / cols)


NB_SUPER = 4  # blocks searched by one matrix product (a taller product runs faster per row)


NEIGHBOUR_THREADS = 0  # 0: ONNXCOMPRESS_THREADS if set, else every usable core (at most 4); 1: no threads


def _search_cores() -> int:
    """Threads for the row search (its matrix products release the GIL): ``NEIGHBOUR_THREADS``, else
    ``ONNXCOMPRESS_THREADS``, else the usable cores; at most 4 (:func:`onnxcompress.cores.search_threads`).
    The result does not depend on it (each super-block is searched on its own)."""
    return cores.search_threads(NEIGHBOUR_THREADS)


def _neighbours(v: np.ndarray, xn: np.ndarray, norm2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the earlier-block row with the largest |cosine| and beta (in 1/32), or beta 0.

    ``v``: the int8 symbols (2-D); ``xn``, ``norm2``: from :func:`_unit_rows`. Each block's rows are
    compared with the ``pool`` rows before the block; ``NB_SUPER`` blocks share one matrix product (the
    columns each block may use are a window of it), and super-blocks run on several threads.
    """
    import threading

    rows, cols = v.shape
    refs = np.zeros(rows, np.int64)
    betas = np.zeros(rows, np.int8)
    pool = max(NB_BLOCK, int(NB_WORK / (rows * cols)))  # earlier rows searched
    span = NB_SUPER * NB_BLOCK
    local = threading.local()  # one product buffer per thread, reused by its super-blocks

    def search(s0: int) -> None:
        s1 = min(rows, s0 + span)
        blocks = range(s0, s1, NB_BLOCK)
        left = max(0, s0 - pool)
        a, b = xn[s0:s1], xn[left : blocks[-1]]
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(span * min(rows, pool + span), np.float32)
        sim = np.matmul(a, b.T, out=buf[: a.shape[0] * b.shape[0]].reshape(a.shape[0], b.shape[0]))
        np.abs(sim, out=sim)  # only |cosine| is used (its square, and the argmax of |cosine|)
        for b0 in blocks:
            b1 = min(rows, b0 + NB_BLOCK)
            first = max(0, b0 - pool)
            window = sim[b0 - s0 : b1 - s0, first - left : b0 - left]
            j = np.argmax(window, axis=1) + first
            c = window[np.arange(b1 - b0), j - first].astype(np.float64)
            x = v[b0:b1].astype(np.float32)
            beta = (x * v[j].astype(np.float32)).sum(axis=1) / np.maximum(norm2[j], 1e-12)
            bq = np.clip(np.round(beta * 32), -NB_BETA, NB_BETA).astype(np.int8)
            gain = 0.5 * cols * np.log2(1.0 / np.maximum(1.0 - c * c, 1e-9))
            use = (gain > NB_SIDE_BITS) & (bq != 0)
            refs[b0:b1] = np.where(use, j, 0)
            betas[b0:b1] = np.where(use, bq, 0)

    starts = range(NB_BLOCK, rows, NB_SUPER * NB_BLOCK)
    threads = min(_search_cores(), len(starts))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="onnxcompress-rows") as ex:
            for _ in ex.map(search, starts):
                pass
    else:
        for s0 in starts:
            search(s0)
    return refs, betas


def _encode_neighbour(data: np.ndarray, row_len: int, inner: int | None, signed: bool = True) -> bytes | None:
    """The row-prediction coding of a chunk of 8-bit symbols, or None when it does not apply."""
    shape = _ctx_matrix(data.size, row_len, inner)
    if shape is None or shape[0] < NB_MIN_ROWS or shape[1] < NB_MIN_COLS:
        return None
    rows, cols = shape
    center, v = _centered(data, rows, cols, signed)
    xn, norm2 = _unit_rows(v)
    if _neighbour_gain(xn) < NB_MIN_GAIN:
        return None
    refs, betas = _neighbours(v, xn, norm2)
    del xn
    if data.size >= TRIM_MIN_BYTES:
        trim_heap()  # the unit rows (4 bytes per symbol) and the search threads' buffers
    if not betas.any():
        return None
    d = np.empty((rows, cols), np.int16)  # residuals lie in -384..384
    step = max(1, SLAB // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        np.subtract(v[r0:r1], _predict(v, refs[r0:r1], betas[r0:r1]), out=d[r0:r1], casting="unsafe")
    del v
    _bits, nu_code, qr, qc, side = _ctx_choose(d, NB_HALF, ("rc", "r"))
    idx = _ctx_index(qr, qc)
    tables = _ctx_table_set(nu_code, NB_HALF)
    coder = constriction.stream.stack.AnsCoder()
    for b0 in reversed(range(0, rows, NB_BLOCK)):
        b1 = min(rows, b0 + NB_BLOCK)
        _ctx_encode_groups(coder, d[b0:b1].ravel(), idx[b0:b1].ravel(), tables, offset=NB_HALF)
    del d, idx  # not beside the coded words' copies below
    used = betas != 0  # their references: uniform over the rows before their block, decoded first
    starts = (np.arange(rows) // NB_BLOCK * NB_BLOCK)[used].astype(np.int32)
    coder.encode_reverse(refs[used].astype(np.int32), constriction.stream.model.Uniform(), starts)
    words = _words(coder)
    head = struct.pack("<BBQQI", center, nu_code, rows, cols, NB_BLOCK)
    side += [_zc(betas.tobytes(), CTX_SIDE_LEVEL)]
    return head + b"".join(_blob(b) for b in side) + _blob(words)


def _decode_neighbour(r: _Reader, nbytes: int) -> np.ndarray:
    center, nu_code, rows, cols, block = r.unpack("<BBQQI")
    if rows * cols != nbytes or nu_code >= len(CTX_NUS) or block == 0:
        raise CodecError("corrupt package: bad row-prediction layout")
    qr = _ctx_side_decode(r.blob(), rows)
    qc = _ctx_side_decode(r.blob(), cols)
    betas = np.frombuffer(_zd(r.blob(), rows), dtype=np.int8)
    starts = (np.arange(rows) // block * block).astype(np.int32)
    used = betas != 0
    if np.any(used & (starts < 2)) or np.any(np.abs(betas.astype(np.int32)) > NB_BETA) or rows >= 2**24:
        raise CodecError("corrupt package: a row refers to a row not yet decoded")
    idx = _ctx_index(qr, qc)
    tables = _ctx_table_set(nu_code, NB_HALF)
    words = np.frombuffer(bytes(r.blob()), dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    refs = np.zeros(rows, np.int64)
    try:
        refs[used] = coder.decode(constriction.stream.model.Uniform(), starts[used])
    except Exception as exc:  # constriction raises its own errors on garbage
        raise CodecError(f"corrupt package: rANS data does not decode ({exc})") from None
    if np.any(refs >= np.maximum(starts, 1)):
        raise CodecError("corrupt package: a row refers to a row not yet decoded")
    v = np.zeros((rows, cols), np.int8)
    for b0 in range(0, rows, block):
        b1 = min(rows, b0 + block)
        d = _ctx_decode_groups(coder, idx[b0:b1].ravel(), tables).reshape(b1 - b0, cols) - NB_HALF
        x = d + _predict(v, refs[b0:b1], betas[b0:b1])
        if x.size and (x.min() < -128 or x.max() > 127):
            raise CodecError("corrupt package: a predicted row leaves the int8 range")
        v[b0:b1] = x
    return _uncentered(v, center)


# --------------------------------------------------------------------------- chunks


def _transform(data: np.ndarray, base: np.ndarray, kind: str, forward: bool) -> np.ndarray:
    """Delta against the old bytes: per-symbol subtraction mod 2^8 (mod 16 per nibble), else XOR."""
    if kind == "bytes":
        return (data - base) if forward else (data + base)
    if kind == "nibbles":
        sign = 1 if forward else -1
        lo = ((data & 0x0F).astype(np.int16) - sign * (base & 0x0F).astype(np.int16)) & 0x0F
        hi = ((data >> 4).astype(np.int16) - sign * (base >> 4).astype(np.int16)) & 0x0F
        return (lo | (hi << 4)).astype(np.uint8)
    return data ^ base


def encode_chunk(
    data: bytes | memoryview,
    data_type: int,
    row_len: int,
    base: bytes | memoryview | None = None,
    *,
    inner: int | None = None,
) -> bytes:
    """Code one chunk of a tensor's bytes (``row_len`` in bytes); with ``base``, as a delta against it.

    ``inner`` (bytes of the tensor's innermost axis, optional) lets 8-bit symbols be modelled as a
    matrix of that axis (blocked weights ``[blocks, block, N]`` as ``[K, N]``); decoding does not need it.

    Returns: the chunk body (first byte: 0 plain / 1 delta; second: the codec id).
    """
    kind, itemsize = element_kind(data_type)
    arr = np.frombuffer(data, dtype=np.uint8)
    best = _encode_plain(arr, kind, itemsize, data_type, row_len, inner=inner)
    out = b"\x00" + best
    if base is not None and len(base) == len(data):
        delta = _transform(arr, np.frombuffer(base, dtype=np.uint8), kind, True)
        d = _encode_plain(delta, kind, itemsize, data_type, row_len, signed=True, inner=inner)
        if len(d) + 1 < len(out):
            out = b"\x01" + d
    return out


def _encode_plain(
    arr: np.ndarray,
    kind: str,
    itemsize: int,
    data_type: int,
    row_len: int,
    signed: bool | None = None,
    inner: int | None = None,
) -> bytes:
    # Each candidate is dropped as soon as it is compared: one coded chunk is held beside the best.
    # After each coder of a large chunk the heap is trimmed: its temporaries (tens of MB for 8 MB of
    # symbols) would otherwise stay resident under the next coder's and the next chunk's.
    trim = arr.size >= TRIM_MIN_BYTES
    z = _zc(arr)  # the array's buffer: no copy of the chunk
    best = bytes([RAW]) + arr.tobytes() if arr.size <= len(z) else bytes([ZSTD]) + z
    del z
    if arr.size < 64:
        return best
    if kind == "planes" and arr.size % itemsize == 0:
        p = bytes([PLANES]) + _encode_planes(arr, itemsize)
        if len(p) < len(best):
            best = p
        del p
        if trim:
            trim_heap()
    elif kind in ("bytes", "nibbles"):
        sgn = signed if signed is not None else data_type in (3, 22)
        coders = [(SYMBOLS, lambda: _encode_symbols(arr, row_len, kind, sgn))]
        if kind == "bytes":
            coders.append((CONTEXT, lambda: _encode_context(arr, row_len, inner, sgn)))
            coders.append((NEIGHBOUR, lambda: _encode_neighbour(arr, row_len, inner, sgn)))
        for codec, encode in coders:
            body = encode()
            if body is not None and len(body) + 1 < len(best):
                best = bytes([codec]) + body
            del body
            if trim:
                trim_heap()
    return best


def decode_chunk(
    body: bytes | memoryview, nbytes: int, data_type: int, base: bytes | memoryview | None = None
) -> bytes:
    """Decode a chunk made by :func:`encode_chunk` into exactly ``nbytes`` bytes."""
    r = _Reader(body)
    delta, codec = r.unpack("<BB")
    if delta and (base is None or len(base) != nbytes):
        raise CodecError("corrupt package: a delta chunk has no matching base tensor")
    if codec == RAW:
        rest = r.take(len(r.data) - r.pos)
        if len(rest) != nbytes:
            raise CodecError("corrupt package: raw chunk size mismatch")
        arr = np.frombuffer(rest, dtype=np.uint8)
    elif codec == ZSTD:
        arr = np.frombuffer(_zd(r.take(len(r.data) - r.pos), nbytes), dtype=np.uint8)
    elif codec == PLANES:
        arr = _decode_planes(r, nbytes)
    elif codec == SYMBOLS:
        arr = _decode_symbols(r, nbytes)
    elif codec == CONTEXT:
        arr = _decode_context(r, nbytes)
    elif codec == NEIGHBOUR:
        arr = _decode_neighbour(r, nbytes)
    else:
        raise CodecError(f"corrupt package: unknown codec {codec}")
    if arr.size != nbytes:
        raise CodecError("corrupt package: chunk decodes to the wrong size")
    if delta:
        kind, _ = element_kind(data_type)
        arr = _transform(arr, np.frombuffer(base, np.uint8), kind, False)
    return arr.tobytes()
