"""The ``.ocpk`` transport container: pack a model (``.onnx`` plus external data) and restore it exactly.

Layout (all integers little-endian)::

    magic "OCPK" (a patch: "OCPD") | u16 format version (2; 1 is still read) | u16 flags (0)
    records: u8 type | u64 body length | body
        B  (patches only) JSON: the base model's files, sizes and sha256
        F  one per output file: u32 JSON length | JSON | zstd gap stream
           JSON = {name, size, sha256, segments: [[0, n] gap bytes | [1, i] tensor i], tensors: [...]}
        C  one per chunk of a tensor, in segment order (see ``codecs``)
        T  after a tensor's chunks: its 32-byte sha256
        E  JSON summary
    sha256 of everything above (32 bytes)

A model file is cut into segments: the payload bytes of each tensor (``raw_data`` inside the
``.onnx``, found by walking the protobuf wire format, or a region of an external-data file) and the
bytes between them. The bytes between tensors of the ``.onnx`` (the graph without its payloads) and
the padding of data files form each file's gap stream, coded with zstd; each tensor is coded in
chunks by ``codecs``. Unpacking writes the segments back in order, so the files come back
bit-identical, and checks the whole-package hash before decoding, every tensor's hash and every
file's size and hash after, in a temp folder beside the output; nothing lands unless all match.

Memory stays bounded on any model size: the ``.onnx`` is memory-mapped and walked without parsing
its payloads, tensors are read and coded one chunk (16 MB) at a time, and only the compressed gap
streams are held in memory.

Hashes catch corruption and truncation, not a deliberate forgery (anyone can recompute them): sign
packages out of band when that matters.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import zstandard

from ..errors import OnnxCompressError
from ..io import PROTOBUF_LIMIT, TMP_PREFIX, resolve_external, trim_heap
from . import codecs
from .wire import TensorRef, WireError, find_tensors, has_graph

VERSION = 2  # 2: 8-bit symbols in chunks of CHUNK_BYTES / 2, context and row-prediction coders (codecs)
READABLE_VERSIONS = (1, 2)  # version 1 packages still unpack (chunk sizes follow the version)
MAGIC_PACK = b"OCPK"
MAGIC_PATCH = b"OCPD"
HEADER = struct.Struct("<4sHH")
RECORD = struct.Struct("<BQ")
HASH_BYTES = 32
MIN_TENSOR_BYTES = 2048  # smaller payloads stay in the gap stream
GAP_LEVEL = 19
IO_CHUNK = 16 * 2**20
MAX_JSON = 256 * 2**20


class PackageError(OnnxCompressError):
    """A package (or patch) is corrupt, truncated, tampered with, or of an unknown version."""


# --------------------------------------------------------------------------- layout


@dataclass
class TensorSlot:
    """A tensor payload to code: where it lies and how to code it."""

    name: str
    data_type: int
    offset: int
    nbytes: int
    row_bytes: int
    inner_bytes: int = 0  # bytes of the innermost axis (a hint for the coder; not needed to decode)

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "data_type": self.data_type, "nbytes": self.nbytes, "row_bytes": self.row_bytes}


@dataclass
class FileLayout:
    """One file of a model: its name in the package ("" for the ``.onnx``), path, size and tensors."""

    name: str
    path: Path
    size: int
    tensors: list[TensorSlot] = field(default_factory=list)

    def segments(self) -> list[tuple[int, int, int]]:
        """``(kind, start, length_or_index)``: kind 0 = gap bytes at ``start``, 1 = tensor index."""
        out = []
        pos = 0
        for i, t in enumerate(self.tensors):
            if t.offset > pos:
                out.append((0, pos, t.offset - pos))
            out.append((1, t.offset, i))
            pos = t.offset + t.nbytes
        if self.size > pos:
            out.append((0, pos, self.size - pos))
        return out


def _row_bytes(ref: TensorRef, nbytes: int) -> int:
    if len(ref.dims) >= 2 and ref.dims[0] > 0 and nbytes % ref.dims[0] == 0:
        return nbytes // ref.dims[0]
    return nbytes


def _inner_bytes(ref: TensorRef, nbytes: int) -> int:
    if ref.dims and ref.dims[-1] > 0 and nbytes % ref.dims[-1] == 0:
        return nbytes // max(1, _count(ref.dims)) * ref.dims[-1]
    return 0


def _count(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= max(d, 0)
    return n


def _non_overlapping(slots: list[TensorSlot], size: int) -> list[TensorSlot]:
    slots = sorted(slots, key=lambda s: (s.offset, -s.nbytes))
    out: list[TensorSlot] = []
    end = 0
    for s in slots:
        if s.offset >= end and s.offset + s.nbytes <= size and s.nbytes >= MIN_TENSOR_BYTES:
            out.append(s)
            end = s.offset + s.nbytes
    return out


def _check_model_file(path: Path) -> None:
    if not path.exists():
        raise OnnxCompressError(f"model file not found: {path}")
    if not path.is_file():
        raise OnnxCompressError(f"{path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise OnnxCompressError(f"{path} is empty, not an ONNX model")
    if size > PROTOBUF_LIMIT:
        raise OnnxCompressError(f"{path} is over 2 GB; protobuf cannot parse it: save the model with external data")


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            yield view
        finally:
            view.release()


def model_layout(path: str | os.PathLike[str]) -> list[FileLayout]:
    """The files of a model and the tensors in each, from the ``.onnx`` wire format.

    External-data references are checked like ``io.load`` checks them (inside the model folder, no
    symlink escape, inside the file).

    Raises:
        OnnxCompressError: the file is not an ONNX model or an external reference is unsafe.
    """
    path = Path(path)
    _check_model_file(path)
    main = FileLayout("", path, path.stat().st_size)
    external: dict[str, FileLayout] = {}
    with _mapped(path) as buf:
        try:
            if not has_graph(buf):
                raise OnnxCompressError(f"{path} is not an ONNX model (no IR version or graph in the file)")
            refs = find_tensors(buf)
        except WireError as exc:
            raise OnnxCompressError(f"{path} is not a valid ONNX model ({exc})") from None
        for ref in refs:
            if ref.data_location == onnx.TensorProto.EXTERNAL or ref.external:
                proto = onnx.TensorProto.FromString(bytes(buf[ref.start : ref.end]))
                target, offset, length = resolve_external(proto, path.parent)
                name = os.path.relpath(target, path.parent.resolve()).replace(os.sep, "/")
                lay = external.get(name)
                if lay is None:
                    lay = external[name] = FileLayout(name, target, target.stat().st_size)
                lay.tensors.append(
                    TensorSlot(
                        ref.name,
                        ref.data_type,
                        offset,
                        length,
                        _row_bytes(ref, length),
                        _inner_bytes(ref, length),
                    )
                )
            elif ref.payload is not None:
                offset, length = ref.payload
                if ref.payload_field == 4:
                    dtype = onnx.TensorProto.FLOAT if ref.data_type != onnx.TensorProto.COMPLEX64 else 0
                elif ref.payload_field == 10:
                    dtype = onnx.TensorProto.DOUBLE if ref.data_type != onnx.TensorProto.COMPLEX128 else 0
                else:
                    dtype = ref.data_type
                main.tensors.append(
                    TensorSlot(ref.name, dtype, offset, length, _row_bytes(ref, length), _inner_bytes(ref, length))
                )
    main.tensors = _non_overlapping(main.tensors, main.size)
    files = [main]
    for name in sorted(external):
        lay = external[name]
        lay.tensors = _non_overlapping(lay.tensors, lay.size)
        files.append(lay)
    return files


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(IO_CHUNK):
            h.update(block)
    return h.hexdigest()


def _read_range(f: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    f.seek(start)
    left = length
    while left > 0:
        block = f.read(min(IO_CHUNK, left))
        if not block:
            raise OnnxCompressError(f"{getattr(f, 'name', 'file')} changed while it was read")
        left -= len(block)
        yield block


def _gap_bytes(lay: FileLayout) -> Iterator[bytes]:
    with open(lay.path, "rb") as f:
        for kind, start, n in lay.segments():
            if kind == 0:
                yield from _read_range(f, start, n)


# --------------------------------------------------------------------------- base (for patches)


@dataclass
class Base:
    """An old model a patch codes against: its files (by package name), hashes and tensors by name."""

    files: list[FileLayout]
    hashes: dict[str, str]
    sizes: dict[str, int]
    by_name: dict[str, tuple[str, TensorSlot]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for lay in reversed(self.files):
            for t in reversed(lay.tensors):
                self.by_name[t.name] = (lay.name, t)

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Base:
        files = model_layout(path)
        return cls(files, {f.name: _file_sha256(f.path) for f in files}, {f.name: f.size for f in files})

    def gap_dict(self, name: str) -> zstandard.ZstdCompressionDict | None:
        lay = next((f for f in self.files if f.name == name), None)
        if lay is None:
            return None
        data = b"".join(_gap_bytes(lay))
        if not data:
            return None
        return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)

    def find(self, slot: TensorSlot) -> tuple[str, int] | None:
        """``(file name, offset)`` of the old tensor with the same name, type and size."""
        hit = self.by_name.get(slot.name)
        if hit is None or hit[1].data_type != slot.data_type or hit[1].nbytes != slot.nbytes:
            return None
        return hit[0], hit[1].offset

    def path_of(self, name: str) -> Path:
        for lay in self.files:
            if lay.name == name:
                return lay.path
        raise PackageError(f"corrupt patch: it reads a base file {name!r} the base model does not have")


# --------------------------------------------------------------------------- writing


class _Sink:
    """Writes records to a file, hashing and counting every byte."""

    def __init__(self, f: BinaryIO | None) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0
        self.by_type: dict[str, int] = {}

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        if self.f is not None:
            self.f.write(data)

    def record(self, kind: bytes, body: bytes, label: str) -> None:
        self.write(RECORD.pack(kind[0], len(body)))
        self.write(body)
        self.by_type[label] = self.by_type.get(label, 0) + RECORD.size + len(body)


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def write_package(files: list[FileLayout], sink_file: BinaryIO | None, *, base: Base | None = None) -> dict[str, Any]:
    """Code ``files`` into ``sink_file`` (or only count the bytes when it is None) and return stats."""
    t0 = time.perf_counter()
    sink = _Sink(sink_file)
    sink.write(HEADER.pack(MAGIC_PATCH if base else MAGIC_PACK, VERSION, 0))
    if base is not None:
        sink.record(
            b"B",
            _json({"files": [{"name": n, "size": base.sizes[n], "sha256": h} for n, h in base.hashes.items()]}),
            "base",
        )
    codec_bytes: dict[str, int] = {}
    tensors = 0
    tensor_stats: list[dict[str, Any]] = []
    deltas = 0
    summary_files = []
    for lay in files:
        digest = _file_sha256(lay.path)
        trim_heap()  # the 16 MB blocks just hashed: their pages would stay resident under the coding (~22 MB)
        summary_files.append({"name": lay.name, "size": lay.size, "sha256": digest})
        cdict = base.gap_dict(lay.name) if base is not None else None
        gap_total = sum(n for kind, _start, n in lay.segments() if kind == 0)
        level = GAP_LEVEL if gap_total <= 32 * 2**20 else 9  # zstd -19 runs at a few MB/s
        gap = io.BytesIO()
        cctx = zstandard.ZstdCompressor(level=level, dict_data=cdict)
        with cctx.stream_writer(gap, closefd=False) as w:
            for block in _gap_bytes(lay):
                w.write(block)
        del cctx, w  # zstd -19's tables take ~80 MB: freed before the tensors are coded,
        trim_heap()  # and their pages handed back (the heap kept ~24 MB of them: MiniLM int8)
        segments = [[kind, n] for kind, _start, n in lay.segments()]
        metas = []
        bases = []
        for t in lay.tensors:
            m = t.meta()
            found = base.find(t) if base is not None else None
            if found is not None:
                m["base"] = list(found)
            bases.append(found)
            metas.append(m)
        head = _json(
            {
                "name": lay.name,
                "size": lay.size,
                "sha256": digest,
                "segments": segments,
                "tensors": metas,
                "gap_dict": cdict is not None,
            }
        )
        sink.record(b"F", struct.pack("<I", len(head)) + head + gap.getvalue(), "graph" if lay.name == "" else "gaps")
        with open(lay.path, "rb") as f:
            for t, found in zip(lay.tensors, bases):
                h = hashlib.sha256()
                coded = 0
                step = codecs.chunk_rows(t.nbytes, t.row_bytes, t.data_type, VERSION)
                old = open(base.path_of(found[0]), "rb") if found is not None else None  # noqa: SIM115
                try:
                    for start in range(0, t.nbytes, step):
                        n = min(step, t.nbytes - start)
                        f.seek(t.offset + start)
                        data = f.read(n)
                        if len(data) != n:
                            raise OnnxCompressError(f"{lay.path} changed while it was packed")
                        h.update(data)
                        old_data = None
                        if old is not None:
                            old.seek(found[1] + start)
                            old_data = old.read(n)
                        body = codecs.encode_chunk(
                            data, t.data_type, t.row_bytes, old_data, inner=t.inner_bytes or None
                        )
                        label = codecs.CODEC_NAMES[body[1]] + ("+delta" if body[0] else "")
                        deltas += body[0]
                        codec_bytes[label] = codec_bytes.get(label, 0) + len(body) + RECORD.size
                        coded += len(body) + RECORD.size
                        sink.record(b"C", body, "tensors")
                finally:
                    if old is not None:
                        old.close()
                sink.record(b"T", h.digest(), "hashes")
                tensors += 1
                tensor_stats.append(
                    {
                        "name": t.name,
                        "data_type": t.data_type,
                        "nbytes": t.nbytes,
                        "coded_bytes": coded,
                        "file": lay.name,
                    }
                )
    sink.record(b"E", _json({"files": summary_files, "tensors": tensors, "format": VERSION}), "end")
    sink.write(sink.hash.digest())
    in_bytes = sum(f["size"] for f in summary_files)
    return {
        "input_bytes": in_bytes,
        "package_bytes": sink.size,
        "ratio": sink.size / in_bytes if in_bytes else None,
        "files": summary_files,
        "tensors": tensors,
        "delta_chunks": deltas,
        "bytes_by_record": sink.by_type,
        "bytes_by_codec": codec_bytes,
        "tensor_stats": tensor_stats,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- reading


def _check_name(name: str) -> str:
    """A file name from a package: relative, inside the output folder, no odd parts."""
    if name == "":
        return name
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or ":" in name
        or "\0" in name
        or any(p in ("", ".", "..") for p in parts)
        or len(name) > 4096
    ):
        raise PackageError(f"package refused: it names an unsafe file path {name[:200]!r}")
    return name


def _open_package(path: Path, magic: bytes) -> tuple[BinaryIO, int, int]:
    """Open and verify a package: magic, version and whole-file hash. Returns (file, end of records, version)."""
    what = "patch" if magic == MAGIC_PATCH else "package"
    if not path.exists():
        raise OnnxCompressError(f"{what} not found: {path}")
    if not path.is_file():
        raise OnnxCompressError(f"{path} is not a regular file")
    size = path.stat().st_size
    f = open(path, "rb")  # noqa: SIM115
    try:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise PackageError(f"{path} is not an onnxcompress {what} (too short: truncated?)")
        got, version, _flags = HEADER.unpack(head)
        if got != magic:
            other = {MAGIC_PACK: "a package (use unpack)", MAGIC_PATCH: "a patch (use patch)"}.get(got)
            hint = f": it is {other}" if other else ""
            raise PackageError(f"{path} is not an onnxcompress {what}{hint}")
        if version not in READABLE_VERSIONS:
            known = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise PackageError(
                f"{path} has container version {version}; this onnxcompress reads versions {known}: upgrade it"
            )
        if size < HEADER.size + HASH_BYTES:
            raise PackageError(f"{path} is truncated")
        end = size - HASH_BYTES
        h = hashlib.sha256(head)
        left = end - HEADER.size
        while left > 0:
            block = f.read(min(IO_CHUNK, left))
            if not block:
                raise PackageError(f"{path} is truncated")
            h.update(block)
            left -= len(block)
        if f.read(HASH_BYTES) != h.digest():
            raise PackageError(f"{path} is corrupt or truncated (its sha256 does not match): download it again")
        f.seek(HEADER.size)
        return f, end, version
    except BaseException:
        f.close()
        raise


def _records(f: BinaryIO, end: int) -> Iterator[tuple[str, bytes]]:
    while f.tell() < end:
        head = f.read(RECORD.size)
        if len(head) != RECORD.size:
            raise PackageError("corrupt package: a record header is cut")
        kind, n = RECORD.unpack(head)
        if f.tell() + n > end:
            raise PackageError("corrupt package: a record runs past the end")
        yield chr(kind), f.read(n)


def _read_exact(reader: Any, n: int) -> Iterator[bytes]:
    left = n
    while left > 0:
        block = reader.read(min(IO_CHUNK, left))
        if not block:
            raise PackageError("corrupt package: a gap stream ends early")
        left -= len(block)
        yield block


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise PackageError("corrupt package: a header does not parse") from None


def read_package(
    path: Path, tmpdir: Path, main_name: str, *, magic: bytes = MAGIC_PACK, base: Base | None = None
) -> dict[str, Any]:
    """Decode a package into ``tmpdir`` (the ``.onnx`` as ``main_name``), checking every hash.

    Returns: the summary (files written, relative to ``tmpdir``, with sizes and hashes).
    """
    t0 = time.perf_counter()
    f, end, version = _open_package(path, magic)
    written: list[dict[str, Any]] = []
    with f:
        recs = _records(f, end)
        summary = None
        base_checked = False
        for kind, body in recs:
            if kind == "B":
                if magic != MAGIC_PATCH or base_checked:
                    raise PackageError("corrupt package: an unexpected base record")
                info = _load_json(body)
                _check_base(info, base)
                base_checked = True
            elif magic == MAGIC_PATCH and not base_checked:
                raise PackageError("corrupt patch: it does not name the base model it applies to")
            elif kind == "F":
                if len(body) < 4:
                    raise PackageError("corrupt package: a file record is cut")
                (n,) = struct.unpack_from("<I", body)
                head = _load_json(body[4 : 4 + n])
                written.append(_write_file(head, body[4 + n :], recs, tmpdir, main_name, base, version))
            elif kind == "E":
                summary = _load_json(body)
            else:
                raise PackageError(f"corrupt package: unexpected record {kind!r}")
        if summary is None:
            raise PackageError("corrupt package: no end record (truncated?)")
        expected = [(x.get("name"), x.get("size"), x.get("sha256")) for x in summary.get("files", [])]
        got = [(w["name"], w["size"], w["sha256"]) for w in written]
        if expected != got:
            raise PackageError("corrupt package: the restored files do not match its summary")
    return {"files": written, "tensors": summary.get("tensors"), "seconds": time.perf_counter() - t0}


def _check_base(info: Any, base: Base | None) -> None:
    if base is None or not isinstance(info, dict):
        raise PackageError("corrupt patch: no base model to apply it to")
    for entry in info.get("files", []):
        name = entry.get("name")
        if name not in base.hashes:
            raise OnnxCompressError(f"patch does not apply: the base model lacks the file {name!r} it was made from")
        if base.hashes[name] != entry.get("sha256") or base.sizes[name] != entry.get("size"):
            what = "the .onnx" if name == "" else repr(name)
            raise OnnxCompressError(
                f"patch does not apply: {what} of the base model is not the one the patch was made from "
                "(sha256 mismatch): give the exact OLD model used with diff"
            )


def _write_file(
    head: Any,
    gap_blob: bytes,
    recs: Iterator[tuple[str, bytes]],
    tmpdir: Path,
    main_name: str,
    base: Base | None,
    version: int,
) -> dict[str, Any]:
    try:
        name = _check_name(str(head["name"]))
        size = int(head["size"])
        segments = [(int(k), int(v)) for k, v in head["segments"]]
        metas = head["tensors"]
        digest = str(head["sha256"])
    except (KeyError, TypeError, ValueError):
        raise PackageError("corrupt package: a file header is malformed") from None
    out_name = main_name if name == "" else name
    if name and name == main_name:
        raise OnnxCompressError(
            f"cannot restore: the model's data file {name!r} has the output's name; choose another -o"
        )
    target = tmpdir / out_name
    target.parent.mkdir(parents=True, exist_ok=True)
    cdict = base.gap_dict(name) if (head.get("gap_dict") and base is not None) else None
    if head.get("gap_dict") and cdict is None:
        raise PackageError("corrupt patch: its graph is coded against a base file that is missing")
    dctx = zstandard.ZstdDecompressor(dict_data=cdict)
    file_hash = hashlib.sha256()
    total = 0
    try:
        with open(target, "xb") as out, dctx.stream_reader(io.BytesIO(gap_blob)) as gaps:
            for kind, value in segments:
                if kind == 0:
                    for block in _read_exact(gaps, value):
                        out.write(block)
                        file_hash.update(block)
                        total += len(block)
                elif kind == 1:
                    meta = metas[value]
                    for block in _decode_tensor(meta, recs, base, version):
                        out.write(block)
                        file_hash.update(block)
                        total += len(block)
                else:
                    raise PackageError("corrupt package: unknown segment kind")
    except zstandard.ZstdError as exc:
        raise PackageError(f"corrupt package: a gap stream does not decode ({exc})") from None
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise PackageError(f"corrupt package: malformed tensor header ({type(exc).__name__})") from None
    if total != size or file_hash.hexdigest() != digest:
        what = "the .onnx" if name == "" else repr(name)
        raise PackageError(f"corrupt package: {what} does not restore to its recorded size and sha256")
    return {"name": name, "path": out_name, "size": size, "sha256": digest}


def _decode_tensor(
    meta: dict[str, Any], recs: Iterator[tuple[str, bytes]], base: Base | None, version: int
) -> Iterator[bytes]:
    nbytes, row_bytes, data_type = int(meta["nbytes"]), int(meta["row_bytes"]), int(meta["data_type"])
    found = meta.get("base")
    old = None
    if found is not None:
        if base is None:
            raise PackageError("corrupt package: a tensor refers to a base model")
        old = open(base.path_of(str(found[0])), "rb")  # noqa: SIM115
    h = hashlib.sha256()
    step = codecs.chunk_rows(nbytes, row_bytes, data_type, version)
    try:
        for start in range(0, nbytes, step):
            n = min(step, nbytes - start)
            kind, body = next(recs, ("", b""))
            if kind != "C":
                raise PackageError("corrupt package: a tensor chunk is missing")
            old_data = None
            if old is not None and body[:1] == b"\x01":
                old.seek(int(found[1]) + start)
                old_data = old.read(n)
            data = codecs.decode_chunk(body, n, data_type, old_data)
            h.update(data)
            yield data
    finally:
        if old is not None:
            old.close()
    kind, body = next(recs, ("", b""))
    if kind != "T" or body != h.digest():
        raise PackageError(f"corrupt package: tensor {str(meta.get('name'))[:100]!r} fails its sha256 check")


# --------------------------------------------------------------------------- public API


def _check_out(out: Path, force: bool, protect: list[Path]) -> None:
    for p in protect:
        if os.path.abspath(out) == os.path.abspath(p) or (out.exists() and p.exists() and os.path.samefile(out, p)):
            raise OnnxCompressError(f"output path {out} is an input: choose another output path")
    if out.is_symlink():
        raise OnnxCompressError(f"output path {out} is a symlink: refusing to write through it")
    if out.exists() and out.is_dir():
        raise OnnxCompressError(f"output path {out} is a folder: give a file name")
    if out.exists() and not force:
        raise OnnxCompressError(f"output file {out} exists: pass --force to overwrite it")
    if not out.parent.exists():
        raise OnnxCompressError(f"output folder {out.parent} does not exist")


def _tmpdir(folder: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise OnnxCompressError(f"cannot write to {folder}: {exc.strerror}") from None


def write_atomic(out: Path, files: list[FileLayout], *, base: Base | None = None) -> dict[str, Any]:
    """Write a package (or patch) for ``files`` to ``out`` through a temp file."""
    tmp = _tmpdir(out.parent)
    try:
        with open(tmp / "pkg", "wb") as f:
            stats = write_package(files, f, base=base)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / "pkg", out)
    except OSError as exc:
        raise OnnxCompressError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def pack(path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any]:
    """Pack a model (``.onnx`` and its external data) into ``out_path``.

    Returns: stats: ``input_bytes``, ``package_bytes``, ``ratio``, ``files`` (name, size, sha256),
    ``tensors``, ``bytes_by_record``, ``bytes_by_codec``, ``seconds``.

    Raises:
        OnnxCompressError: unreadable or unsafe model, or an output path that would lose data.
    """
    path, out = Path(path), Path(out_path)
    files = model_layout(path)
    _check_out(out, force, [f.path for f in files])
    stats = write_atomic(out, files)
    stats["output"] = str(out)
    return stats


def packed_size(path: str | os.PathLike[str]) -> int:
    """The size in bytes of the package :func:`pack` would write for this model (nothing is written)."""
    return int(write_package(model_layout(Path(path)), None)["package_bytes"])


def commit_files(tmpdir: Path, written: list[dict[str, Any]], out: Path, force: bool, protect: list[Path]) -> list[str]:
    """Move decoded files from ``tmpdir`` into ``out``'s folder: data files first, the ``.onnx`` last."""
    targets = []
    for w in written:
        dest = out if w["name"] == "" else out.parent / w["path"]
        sub = dest.parent
        while sub != out.parent:  # data files in subfolders: existing parts must be real folders
            if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
                raise OnnxCompressError(f"cannot write {dest}: {sub} is not a plain folder")
            sub = sub.parent
        if dest.parent.exists():
            _check_out(dest, force, protect)
        for p in protect:
            if os.path.abspath(dest) == os.path.abspath(p):
                raise OnnxCompressError(f"output path {dest} is an input: choose another output path")
        if dest.exists() and not stat.S_ISREG(dest.stat().st_mode):
            raise OnnxCompressError(f"output path {dest} is not a regular file")
        targets.append((tmpdir / w["path"], dest))
    for src, dest in sorted(targets, key=lambda t: t[1] == out):
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    return [str(d) for _s, d in targets]


def unpack(
    pkg_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, force: bool = False
) -> dict[str, Any]:
    """Restore the model in a package: ``out_path`` (the ``.onnx``) and its data files beside it.

    Every hash is checked in a temp folder first; on any mismatch nothing is written.

    Raises:
        OnnxCompressError: a corrupt, truncated or tampered package, an unknown version, or an
            output path that would lose data.
    """
    pkg, out = Path(pkg_path), Path(out_path)
    _check_out(out, force, [pkg])
    tmp = _tmpdir(out.parent)
    try:
        result = read_package(pkg, tmp, out.name)
        result["written"] = commit_files(tmp, result["files"], out, force, [pkg])
    except OSError as exc:
        raise OnnxCompressError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["output"] = str(out)
    return result
