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
* **Deltas** (``diff``): the chunk is first transformed against the same element range of the old
  tensor (subtraction modulo 2^8 per symbol for integer symbols, XOR for floats: unchanged
  values become zeros), then coded as above; the plain coding is kept when it is smaller.

Each chunk starts with its codec id; decoding needs only the chunk, the element type and the row
length (and the old chunk for deltas).
"""

from __future__ import annotations

import struct

import constriction
import numpy as np
import zstandard

from ..errors import OnnxCompressError

# chunk codecs
RAW, ZSTD, PLANES, SYMBOLS = 0, 1, 2, 3
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd", PLANES: "planes", SYMBOLS: "symbols-rans"}
# plane methods
P_RAW, P_ZSTD, P_ANS = 0, 1, 2

ZSTD_LEVEL = 3
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


def chunk_rows(nbytes: int, row_bytes: int, data_type: int = 0) -> int:
    """Bytes per chunk: a whole number of rows near ``CHUNK_BYTES`` (a quarter for symbols, whose
    coding takes about 25 bytes of working memory per symbol), at least one row."""
    chunk_bytes = CHUNK_BYTES if element_kind(data_type)[0] in ("planes", "opaque") else CHUNK_BYTES // 4
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
    best: tuple[np.ndarray, bytes, float] | None = None
    for total in (256, 1024, 4096, 0):
        if total:
            q = np.where(c > 0, np.maximum(1, np.round(c * total / np.maximum(n, 1))), 0)
        else:
            q = c
        if q.max(initial=0) >= 2**32:
            continue
        table = q.astype("<u4")
        width = "<u1" if q.max(initial=0) < 256 else "<u2" if q.max(initial=0) < 65536 else "<u4"
        blob = bytes([np.dtype(width).itemsize]) + _zc(table.astype(width).tobytes(), 19)
        p = np.where(q > 0, q / np.maximum(q.sum(axis=1, keepdims=True), 1), 1.0)
        bits = float(-(c * np.log2(p)).sum()) + 8 * len(blob)
        if best is None or bits < best[2]:
            best = (table, blob, bits)
    assert best is not None
    return best


def _ans_encode(streams: list[tuple[np.ndarray, np.ndarray, int]]) -> bytes:
    """Code several symbol streams with one rANS stack.

    Args:
        streams: ``(symbols, classes, alphabet)``; symbols (int32) are grouped by their class
            (stable), each class with its own table. The decoder knows the classes (and so the
            number of symbols in each).

    Returns: per stream its table, then the rANS words.
    """
    coder = constriction.stream.stack.AnsCoder()
    head = []
    plan = []
    for symbols, classes, alphabet in streams:
        groups = int(classes.max()) + 1 if classes.size else 1
        parts = [symbols] if groups == 1 else [symbols[classes == g] for g in range(groups)]
        counts = np.stack([np.bincount(p, minlength=alphabet)[:alphabet] for p in parts])
        table, blob, _bits = _quantized_table(counts)
        head.append(struct.pack("<II", groups, alphabet) + _blob(blob))
        plan.append((parts, table))
    for parts, table in reversed(plan):
        for g in reversed(range(table.shape[0])):
            part = parts[g]
            if part.size:
                model = constriction.stream.model.Categorical(table[g].astype(np.float64), perfect=False)
                coder.encode_reverse(part, model)
    words = coder.get_compressed().astype("<u4").tobytes()
    return struct.pack("<I", len(streams)) + b"".join(head) + _blob(words)


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
        counts = np.bincount(plane, minlength=256)
        estimate = _quantized_table(counts[None])[2] / 8
        if estimate < 0.98 * best[0]:
            a = _ans_encode([(plane.astype(np.int32), np.zeros(plane.size, np.int8), 256)])
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


def _row_classes(values: np.ndarray, groups: int) -> np.ndarray:
    """Class of each row (axis 0 of ``values``, 2-D) by the quantile of its standard deviation."""
    if groups == 1 or values.shape[0] < groups:
        return np.zeros(values.shape[0], np.uint8)
    spread = values.astype(np.float32).std(axis=1)
    edges = np.quantile(spread, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, spread, side="right").astype(np.uint8)


def _streams(data: np.ndarray, mode: str, signed: bool) -> list[np.ndarray]:
    """Symbol streams (each int32 with values in [0, alphabet)) and the values used for spreads."""
    if mode == "bytes":
        return [data.astype(np.int32)]
    return [(data & 0x0F).astype(np.int32), (data >> 4).astype(np.int32)]


def _spread_values(stream: np.ndarray, alphabet: int, signed: bool) -> np.ndarray:
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
        for axis in (0, 1):
            for groups in (1, 4, 16):
                if (groups == 1 and axis == 1) or (groups > 1 and m_all.shape[axis] < 64 * groups):
                    continue
                bits = 0.0
                for s in streams:
                    m = s.T if axis else s
                    classes = _row_classes(_spread_values(m, alphabet, signed), groups)
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
    for s in _streams(data, mode, signed):
        m = s.reshape(rows, -1)
        if axis:
            m = m.T
        classes = _row_classes(_spread_values(m, alphabet, signed), groups)
        if groups > 1:
            class_blobs.append(_zc(classes.tobytes(), 19))
        streams.append((np.ascontiguousarray(m).ravel(), np.repeat(classes, m.shape[1]), alphabet))
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
    data: bytes | memoryview, data_type: int, row_len: int, base: bytes | memoryview | None = None
) -> bytes:
    """Code one chunk of a tensor's bytes (``row_len`` in bytes); with ``base``, as a delta against it.

    Returns: the chunk body (first byte: 0 plain / 1 delta; second: the codec id).
    """
    kind, itemsize = element_kind(data_type)
    arr = np.frombuffer(data, dtype=np.uint8)
    best = _encode_plain(arr, kind, itemsize, data_type, row_len)
    out = b"\x00" + best
    if base is not None and len(base) == len(data):
        delta = _transform(arr, np.frombuffer(base, dtype=np.uint8), kind, True)
        d = _encode_plain(delta, kind, itemsize, data_type, row_len, signed=True)
        if len(d) + 1 < len(out):
            out = b"\x01" + d
    return out


def _encode_plain(
    arr: np.ndarray, kind: str, itemsize: int, data_type: int, row_len: int, signed: bool | None = None
) -> bytes:
    raw = arr.tobytes()
    z = _zc(raw)
    best = bytes([RAW]) + raw if len(raw) <= len(z) else bytes([ZSTD]) + z
    if arr.size < 64:
        return best
    if kind == "planes" and arr.size % itemsize == 0:
        p = bytes([PLANES]) + _encode_planes(arr, itemsize)
        if len(p) < len(best):
            best = p
    elif kind in ("bytes", "nibbles"):
        sgn = signed if signed is not None else data_type in (3, 22)
        s = _encode_symbols(arr, row_len, kind, sgn)
        if s is not None and len(s) + 1 < len(best):
            best = bytes([SYMBOLS]) + s
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
    else:
        raise CodecError(f"corrupt package: unknown codec {codec}")
    if arr.size != nbytes:
        raise CodecError("corrupt package: chunk decodes to the wrong size")
    if delta:
        kind, _ = element_kind(data_type)
        arr = _transform(arr, np.frombuffer(base, np.uint8), kind, False)
    return arr.tobytes()
