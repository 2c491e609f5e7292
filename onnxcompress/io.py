"""Loading and saving models, safely.

Loading treats every model as untrusted:

* the protobuf is parsed *without* external data; every external-data reference (initializers,
  ``Constant`` attributes, subgraphs at any depth, functions) is then checked before a byte is read:
  only the keys ``location/offset/length/checksum``; a relative ``location`` with no ``..``
  component that resolves, through symlinks, to a regular file inside the model's folder; and
  ``offset + length`` inside that file, with ``length`` equal to the size the tensor declares;
* declared tensor sizes are checked against a memory budget (``max_memory``) before anything is
  allocated, and absurd subgraph nesting or node counts are refused;
* external tensors are then read lazily, one tensor at a time, from the checked file region.

Saving never overwrites the input model nor its external-data file, never writes through a symlink,
and is atomic: files are written into a temporary folder next to the output, flushed, then renamed
into place. Models whose tensors exceed the 2 GB protobuf limit are written with external data
automatically (or on request), streaming tensors one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import OnnxCompressError
from .graph import Model, constant_placement, in_topological_order, iter_graphs, tensor_nbytes

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Above this many bytes of tensor data a model is written with external data automatically.
AUTO_EXTERNAL_BYTES = 1_800_000_000
# Tensors smaller than this stay inside the .onnx file when writing external data.
EXTERNAL_MIN_BYTES = 1024
EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}
MAX_SUBGRAPH_DEPTH = 64
MAX_NODES = 5_000_000
TMP_PREFIX = ".onnxcompress-tmp-"
_ABS_KEY = "onnxcompress_abs_location"
# Inline initializers of at least this many bytes are not read at load: their bytes stay in the file
# and are read when a pass asks for the values (or copied straight to the output when saving).
LAZY_MIN_BYTES = 4096
_INLINE_KEY = "onnxcompress_inline"  # marks such a tensor; its value is the file's stat signature


def default_max_memory() -> int:
    """The default memory budget: 75% of physical RAM (4 GiB if RAM cannot be read)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        return int(pages * page * 0.75)
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def trim_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    numpy arrays of a few MB are carved from the heap once glibc's dynamic mmap threshold has risen
    (it follows the largest block freed, up to 32 MB); freed, their pages stay resident between live
    blocks and count again under the next stage's peak. Callers trim between the stages of a
    memory-heavy step (validation slices, GPTQ factorisations, transport coding). About 1 ms per call.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def parse_size(text: str) -> int:
    """Parse ``'8G'``, ``'512M'``, ``'1.5GB'`` or a byte count."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise OnnxCompressError(f"bad size {text!r}: use a byte count or a number with K, M or G") from None
    if value <= 0:
        raise OnnxCompressError(f"bad size {text!r}: must be positive")
    return int(value)


# --------------------------------------------------------------------------- tensors in protos


def _iter_graph_tensors(graph: onnx.GraphProto, depth: int = 0) -> Iterator[tuple[onnx.TensorProto, int]]:
    """Yield every TensorProto in a graph proto (initializers, sparse values, node attributes,
    subgraphs), with the subgraph depth."""
    if depth > MAX_SUBGRAPH_DEPTH:
        raise OnnxCompressError(f"model refused: subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels")
    for t in graph.initializer:
        yield t, depth
    for st in graph.sparse_initializer:
        yield st.values, depth
        yield st.indices, depth
    for node in graph.node:
        for attr in node.attribute:
            yield from _iter_attr_tensors(attr, depth)


def _iter_attr_tensors(attr: onnx.AttributeProto, depth: int) -> Iterator[tuple[onnx.TensorProto, int]]:
    if attr.HasField("t"):
        yield attr.t, depth
    for t in attr.tensors:
        yield t, depth
    if attr.HasField("sparse_tensor"):
        yield attr.sparse_tensor.values, depth
        yield attr.sparse_tensor.indices, depth
    if attr.HasField("g"):
        yield from _iter_graph_tensors(attr.g, depth + 1)
    for g in attr.graphs:
        yield from _iter_graph_tensors(g, depth + 1)


def iter_model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: all graphs, subgraphs and function bodies."""
    for t, _ in _iter_graph_tensors(model.graph):
        yield t
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                for t, _ in _iter_attr_tensors(attr, 1):
                    yield t


def _require_text(*values: object) -> None:
    """Raise UnicodeDecodeError-like failure when protobuf handed back bytes (invalid UTF-8)."""
    for v in values:
        if not isinstance(v, str):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "invalid UTF-8 in a string field")


_VALID_ELEM_TYPES = frozenset(onnx.TensorProto.DataType.values())
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _typed_field(data_type: int) -> tuple[str, int]:
    """The TensorProto field holding values of ``data_type`` and how many entries one value takes."""
    T = onnx.TensorProto
    if data_type in (T.FLOAT,):
        return "float_data", 1
    if data_type == T.COMPLEX64:
        return "float_data", 2
    if data_type == T.INT64:
        return "int64_data", 1
    if data_type == T.DOUBLE:
        return "double_data", 1
    if data_type == T.COMPLEX128:
        return "double_data", 2
    if data_type in (T.UINT32, T.UINT64):
        return "uint64_data", 1
    if data_type == T.STRING:
        return "string_data", 1
    return "int32_data", 1


def _check_typed_data(tensor: onnx.TensorProto) -> None:
    """A tensor stored in typed fields must hold exactly as many values as its dims declare."""
    if tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    count = 1
    for d in tensor.dims:
        count *= int(d)
    field, per_value = _typed_field(tensor.data_type)
    name = onnx.TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in _VALID_ELEM_TYPES else ""
    if name in ("INT4", "UINT4", "FLOAT4E2M1"):
        expected = (count + 1) // 2
    elif name in ("INT2", "UINT2"):
        expected = (count + 3) // 4
    else:
        expected = count * per_value
    held = len(getattr(tensor, field))
    others = [f for f in _TYPED_FIELDS if f != field and len(getattr(tensor, f))]
    if held != expected or others:
        raise OnnxCompressError(
            f"model refused: tensor {tensor.name!r} declares {count} values but its data does not match"
        )


_ATTR_FIELDS = {
    onnx.AttributeProto.GRAPH: "g",
    onnx.AttributeProto.TENSOR: "t",
    onnx.AttributeProto.SPARSE_TENSOR: "sparse_tensor",
    onnx.AttributeProto.TYPE_PROTO: "tp",
}


def _check_attribute(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
    """The attribute's declared type must match the field it fills."""
    label = node.name or node.op_type
    _require_text(attr.name, attr.ref_attr_name)
    bad = attr.type == onnx.AttributeProto.UNDEFINED and not attr.ref_attr_name
    for kind, field in _ATTR_FIELDS.items():
        if attr.HasField(field) != (attr.type == kind) and not attr.ref_attr_name:
            bad = True
    if (len(attr.graphs) > 0) and attr.type != onnx.AttributeProto.GRAPHS:
        bad = True
    if bad:
        raise OnnxCompressError(
            f"model refused: attribute {attr.name!r} of node {label!r} has a type that does not match its value"
        )


def _check_graph_refs(graph: onnx.GraphProto, outer: set[str], where: str = "main graph") -> None:
    """Every name must be valid UTF-8 and every node input defined before use (in scope)."""
    try:
        _require_text(graph.name, *(i.name for i in graph.input), *(o.name for o in graph.output))
        _require_text(*(t.name for t in graph.initializer))
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in _VALID_ELEM_TYPES:
                raise OnnxCompressError(
                    f"model refused: {vi.name!r} in the {where} has an unknown element type "
                    f"{vi.type.tensor_type.elem_type}"
                )
        known = set(outer)
        known.update(i.name for i in graph.input)
        known.update(t.name for t in graph.initializer)
        known.update(st.values.name for st in graph.sparse_initializer)
        for node in graph.node:
            _require_text(node.op_type, node.domain, node.name, *node.input, *node.output)
            for name in node.input:
                if name and name not in known:
                    label = node.name or node.op_type
                    raise OnnxCompressError(
                        f"model refused: node {label!r} in the {where} reads {name!r}, which nothing defines before it"
                    )
            for attr in node.attribute:
                _check_attribute(node, attr)
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for sub in subs:
                    _check_graph_refs(sub, known, f"subgraph {sub.name!r}")
            known.update(o for o in node.output if o)
        for o in graph.output:
            if o.name not in known:
                raise OnnxCompressError(f"model refused: output {o.name!r} of the {where} is never computed")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise OnnxCompressError("model refused: a name in the model is not valid UTF-8 (corrupted file?)") from None


def any_node(model: onnx.ModelProto, predicate: Callable[[onnx.NodeProto], bool]) -> bool:
    """Whether ``predicate`` holds for any node of ``model`` (subgraphs and functions included)."""

    def walk(nodes: Iterable[onnx.NodeProto]) -> bool:
        for node in nodes:
            if predicate(node):
                return True
            for attr in node.attribute:
                if (attr.HasField("g") and walk(attr.g.node)) or any(walk(g.node) for g in attr.graphs):
                    return True
        return False

    return walk(model.graph.node) or any(walk(f.node) for f in model.functions)


def _uses_default_domain(model: onnx.ModelProto) -> bool:
    """Whether any node (subgraphs and functions included) is an op of the default ONNX domain."""
    return any_node(model, lambda node: node.domain in ("", "ai.onnx"))


def _count_nodes(graph: onnx.GraphProto) -> int:
    n = len(graph.node)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                n += _count_nodes(attr.g)
            for g in attr.graphs:
                n += _count_nodes(g)
    return n


def declared_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor declares through its dims and dtype (4-bit types packed two per byte)."""
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise OnnxCompressError(f"model refused: tensor {tensor.name!r} has a negative dimension {d}")
        count *= int(d)
    if tensor.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return 0
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        raise OnnxCompressError(
            f"model refused: tensor {tensor.name!r} has unknown data type {tensor.data_type}"
        ) from None
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if name in ("INT4", "UINT4", "FLOAT4E2M1"):
        return (count + 1) // 2
    if name in ("INT2", "UINT2"):
        return (count + 3) // 4
    return count * np.dtype(np_dtype).itemsize


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _set_external_info(tensor: onnx.TensorProto, info: dict[str, str]) -> None:
    del tensor.external_data[:]
    for k, v in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = k, str(v)


def resolve_external(tensor: onnx.TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """Check an external-data reference and return ``(file, offset, length)``.

    Raises:
        OnnxCompressError: for unknown keys, absolute or ``..`` locations, a location that resolves
            (through symlinks) outside ``base_dir`` or to a non-regular file, a missing file, or an
            offset/length outside the file or not matching the declared tensor size.
    """
    info = _external_info(tensor)
    name = tensor.name or "<unnamed>"
    unknown = set(info) - EXTERNAL_KEYS
    if unknown:
        raise OnnxCompressError(f"model refused: tensor {name!r} has unknown external-data keys {sorted(unknown)}")
    location = info.get("location", "")
    if not location:
        raise OnnxCompressError(f"model refused: tensor {name!r} has external data without a location")
    parts = Path(location.replace("\\", "/")).parts
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location or ".." in parts:
        raise OnnxCompressError(
            f"model refused: external data of tensor {name!r} points outside the model folder ({location!r})"
        )
    base = base_dir.resolve()
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise OnnxCompressError(
            f"model refused: external data of tensor {name!r} resolves outside the model folder "
            f"through a symlink ({location!r})"
        )
    try:
        st = target.stat()
    except FileNotFoundError:
        raise OnnxCompressError(
            f"external data file {location!r} of tensor {name!r} is missing: copy it next to the model"
        ) from None
    except OSError as exc:
        raise OnnxCompressError(f"cannot read external data file {location!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxCompressError(f"model refused: external data of tensor {name!r} is not a regular file ({location!r})")
    try:
        offset = int(info.get("offset", "0"))
        expected = declared_nbytes(tensor)
        length = int(info["length"]) if "length" in info else expected
    except ValueError:
        raise OnnxCompressError(f"model refused: tensor {name!r} has a non-numeric external offset/length") from None
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise OnnxCompressError(
            f"model refused: external data of tensor {name!r} (offset {offset}, length {length}) "
            f"lies beyond the end of {location!r} ({st.st_size} bytes)"
        )
    if length != expected:
        raise OnnxCompressError(
            f"model refused: tensor {name!r} declares {expected} bytes but its external data has {length}"
        )
    return target, offset, length


def _file_signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _check_unchanged(path: Path, signature: str | None) -> None:
    if signature is None:
        return
    try:
        now = _file_signature(path)
    except OSError:
        now = ""
    if now != signature:
        raise OnnxCompressError(f"{path} changed or disappeared since the model was loaded: load it again")


class ExternalValues(LazyValues):
    """Lazy values read from a checked region of an external-data file, one tensor at a time."""

    def __init__(self, tensor: onnx.TensorProto, path: Path, offset: int, length: int) -> None:
        super().__init__(tensor)
        self.path, self.offset, self.length = path, offset, length

    def load(self) -> np.ndarray:
        """Read the tensor from its file region (never more than ``length`` bytes)."""
        return _read_region(self.tensor, self.path, self.offset, self.length)


class InlineValues(LazyValues):
    """Lazy values of an initializer stored inside the ``.onnx`` file itself (see ``LAZY_MIN_BYTES``):
    read from the file region of its ``raw_data`` when first needed. Refuses to read if the file
    changed since it was loaded."""

    def __init__(self, tensor: onnx.TensorProto, path: Path, offset: int, length: int, signature: str) -> None:
        super().__init__(tensor)
        self.path, self.offset, self.length, self.signature = path, offset, length, signature

    def load(self) -> np.ndarray:
        """Read the tensor from its file region."""
        _check_unchanged(self.path, self.signature)
        return _read_region(self.tensor, self.path, self.offset, self.length)


def _read_region(tensor: onnx.TensorProto, path: Path, offset: int, length: int) -> np.ndarray:
    """A tensor's values from ``length`` bytes at ``offset`` of ``path`` (its ``raw_data`` layout)."""
    np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    with open(path, "rb") as f:
        f.seek(offset)
        if np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)) == length and np_dtype.kind in "fiub":
            arr = np.fromfile(f, dtype=np_dtype.newbyteorder("<"), count=int(np.prod(shape, dtype=np.int64)))
            return arr.astype(np_dtype, copy=False).reshape(shape)
        raw = f.read(length)
    proto = onnx.TensorProto()
    proto.CopyFrom(tensor)
    del proto.external_data[:]
    proto.data_location = onnx.TensorProto.DEFAULT
    proto.raw_data = raw
    return np.array(onnx.numpy_helper.to_array(proto))


def read_external_bytes(tensor: onnx.TensorProto, chunk: int = 64 * 2**20) -> Iterator[bytes]:
    """Stream the bytes of a loaded external tensor (one whose location was resolved at load)."""
    info = _external_info(tensor)
    path = info[_ABS_KEY] if _ABS_KEY in info else info["location"]
    _check_unchanged(Path(path), info.get(_INLINE_KEY))
    offset, length = int(info.get("offset", "0")), int(info["length"])
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                raise OnnxCompressError(f"external data of tensor {tensor.name!r} ended early in {path}")
            left -= len(block)
            yield block


# --------------------------------------------------------------------------- load


def _check_file(path: Path) -> None:
    if not path.exists():
        raise OnnxCompressError(f"model file not found: {path}")
    if path.is_dir():
        raise OnnxCompressError(f"{path} is a folder, not an .onnx model file")
    if not stat.S_ISREG(path.stat().st_mode):
        raise OnnxCompressError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        raise OnnxCompressError(f"{path} is empty, not an ONNX model")
    if path.stat().st_size > PROTOBUF_LIMIT:
        raise OnnxCompressError(f"{path} is over 2 GB; protobuf cannot parse it: save the model with external data")


class _NotPlain(Exception):
    """The file's wire layout is not the plain one :func:`_skeleton` handles (parse it whole)."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotPlain
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field, wire type, start, payload start, end)`` of each field of the message in ``[pos, end)``."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(buf, pos, end)
        elif wire == 1:
            stop = pos + 8
        elif wire == 5:
            stop = pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        else:  # groups: not in ONNX
            raise _NotPlain
        if stop > end or field == 0:
            raise _NotPlain
        yield field, wire, start, pos, stop
        pos = stop


def _skeleton(buf: memoryview) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The model's bytes without the ``raw_data`` payloads of its large main-graph initializers.

    Returns the skeleton and, per main-graph initializer in order, the ``(offset, length)`` of the
    payload left in the file (``None`` for one kept whole).

    Raises:
        _NotPlain: the layout is not the plain one (one graph field, one ``raw_data`` per tensor, ...).
    """
    out = bytearray()
    spans: list[tuple[int, int] | None] = []
    graphs = 0
    for field, wire, start, body, stop in _fields(buf, 0, len(buf)):
        if field == 7 and wire == 2:  # ModelProto.graph
            graphs += 1
            if graphs > 1:
                raise _NotPlain
            graph = bytearray()
            for g_field, g_wire, g_start, g_body, g_stop in _fields(buf, body, stop):
                if g_field == 5 and g_wire == 2:  # GraphProto.initializer
                    tensor, span = _tensor_skeleton(buf, g_body, g_stop)
                    spans.append(span)
                    graph += buf[g_start:g_body] if span is None else _encode_varint(5 << 3 | 2)
                    graph += buf[g_body:g_stop] if span is None else _encode_varint(len(tensor)) + tensor
                else:
                    graph += buf[g_start:g_stop]
            out += _encode_varint(7 << 3 | 2) + _encode_varint(len(graph)) + graph
        else:
            out += buf[start:stop]
    return bytes(out), spans


def _tensor_skeleton(buf: memoryview, pos: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without a large ``raw_data`` (field 9) and the payload's place."""
    raw: tuple[int, int, int] | None = None
    for field, wire, start, body, stop in _fields(buf, pos, end):
        if field == 9:
            if raw is not None or wire != 2:
                raise _NotPlain
            raw = (start, body, stop)
        elif field in (13, 14):  # external_data, data_location: leave such tensors to the checks
            return b"", None
    if raw is None or raw[2] - raw[1] < LAZY_MIN_BYTES:
        return b"", None
    start, body, stop = raw
    return bytes(buf[pos:start]) + bytes(buf[stop:end]), (body, stop - body)


def _parse_lazily(path: Path) -> tuple[onnx.ModelProto, list[tuple[int, int] | None]] | None:
    """Parse ``path`` leaving the large inline initializers' bytes in the file, or None when its
    layout is not plain (then the caller parses it whole)."""
    if ":" in path.name or path.is_symlink() or path.resolve().parent != path.parent.resolve():
        return None  # an external-data location could not name it (checked like any other)
    with open(path, "rb") as f:
        try:
            import mmap

            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    data, spans = _skeleton(view)
                finally:
                    view.release()
        except (_NotPlain, ValueError, OSError):
            return None
    if not any(spans):
        return None
    model = onnx.ModelProto()
    model.ParseFromString(data)
    if len(model.graph.initializer) != len(spans):
        return None
    return model, spans


def _mark_lazy(model: onnx.ModelProto, path: Path, spans: list[tuple[int, int] | None]) -> None:
    """Declare each cut initializer as external data in ``path`` (checked then like any other)."""
    for tensor, span in zip(model.graph.initializer, spans):
        if span is None:
            continue
        try:
            ok = tensor.data_type != onnx.TensorProto.STRING and declared_nbytes(tensor) == span[1]
        except OnnxCompressError:
            ok = False
        if not ok:  # let the checks refuse it with the inline tensor's message
            raise _NotPlain
        tensor.data_location = onnx.TensorProto.EXTERNAL
        _set_external_info(tensor, {"location": path.name, "offset": span[0], "length": span[1]})


def read_proto(path: str | os.PathLike[str], max_memory: int | None = None, *, lazy: bool = False) -> onnx.ModelProto:
    """Parse and check a model file without reading external data.

    External-data references are checked (see module docstring) and their ``location`` is resolved
    to the checked absolute path, kept in a private key for lazy reading.

    With ``lazy``, the ``raw_data`` of main-graph initializers of at least ``LAZY_MIN_BYTES`` is not
    read either: such a tensor is declared as external data in the model file itself (marked with a
    private key holding the file's stat signature), so the parsed proto holds the graph, not the
    weights (see :class:`InlineValues`).

    Raises:
        OnnxCompressError: on any unreadable, malformed or unsafe model.
    """
    path = Path(path)
    _check_file(path)
    budget = max_memory if max_memory is not None else default_max_memory()
    model = onnx.ModelProto()
    spans: list[tuple[int, int] | None] = []
    try:
        parsed = None
        if lazy:
            try:
                signature = _file_signature(path)
                parsed = _parse_lazily(path)
                if parsed is not None:
                    _mark_lazy(*parsed[:1], path, parsed[1])
            except _NotPlain:
                parsed = None
        if parsed is not None:
            model, spans = parsed
        else:
            with open(path, "rb") as f:
                model.ParseFromString(f.read())
    except DecodeError:
        raise OnnxCompressError(f"{path} is not a valid ONNX model (truncated or not a protobuf file)") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise OnnxCompressError(f"cannot read {path}: {exc}") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise OnnxCompressError(f"{path} is not an ONNX model (no IR version or graph in the file)")
    if _count_nodes(model.graph) > MAX_NODES:
        raise OnnxCompressError(f"model refused: more than {MAX_NODES} nodes")
    try:
        _require_text(*(o.domain for o in model.opset_import))
        _require_text(model.producer_name, model.producer_version, model.domain, model.doc_string)
        _require_text(*(p.key for p in model.metadata_props), *(p.value for p in model.metadata_props))
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise OnnxCompressError("model refused: a name in the model is not valid UTF-8 (corrupted file?)") from None
    if (
        model.ir_version >= 3
        and not any(o.domain in ("", "ai.onnx") for o in model.opset_import)
        and (not model.opset_import or _uses_default_domain(model))
    ):
        raise OnnxCompressError(f"{path} declares no ONNX opset (opset_import): truncated or malformed model")
    _check_graph_refs(model.graph, set())
    total = 0
    base_dir = path.parent
    for tensor in iter_model_tensors(model):
        size = declared_nbytes(tensor)
        if size > budget:
            raise OnnxCompressError(
                f"model refused: tensor {tensor.name!r} declares {size / 2**30:.1f} GiB, over the memory "
                f"budget of {budget / 2**30:.1f} GiB (raise it with --max-memory)"
            )
        total += size
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if tensor.HasField("raw_data"):
                raise OnnxCompressError(f"model refused: tensor {tensor.name!r} has both external and inline data")
            target, offset, length = resolve_external(tensor, base_dir)
            info = _external_info(tensor)
            info.pop("checksum", None)
            info.update({_ABS_KEY: str(target), "offset": str(offset), "length": str(length)})
            _set_external_info(tensor, info)
        elif not tensor.HasField("raw_data"):
            _check_typed_data(tensor)
        elif tensor.data_type == onnx.TensorProto.STRING:
            raise OnnxCompressError(f"model refused: string tensor {tensor.name!r} holds raw data")
        elif len(tensor.raw_data) != size and tensor.data_type != onnx.TensorProto.STRING:
            raise OnnxCompressError(
                f"model refused: tensor {tensor.name!r} declares {size} bytes but holds {len(tensor.raw_data)}"
            )
    if total > budget:
        raise OnnxCompressError(
            f"model refused: its tensors declare {total / 2**30:.1f} GiB, over the memory budget of "
            f"{budget / 2**30:.1f} GiB (raise it with --max-memory)"
        )
    for tensor, span in zip(model.graph.initializer, spans):
        if span is not None:
            tensor.external_data.add(key=_INLINE_KEY, value=signature)
    return model


def _attach_external_values(graph: gs.Graph) -> None:
    """Replace graphsurgeon's LazyValues of external tensors by bounded readers."""

    def fix(const: gs.Constant) -> None:
        values = const._values
        if isinstance(values, LazyValues) and not isinstance(values, (ExternalValues, InlineValues)):
            proto = values.tensor
            if isinstance(proto, onnx.TensorProto) and proto.data_location == onnx.TensorProto.EXTERNAL:
                info = _external_info(proto)
                where = (Path(info[_ABS_KEY]), int(info["offset"]), int(info["length"]))
                if _INLINE_KEY in info:
                    const._values = InlineValues(proto, *where, info[_INLINE_KEY])
                    const.data_location = None  # stored inline: new values are written inline too
                else:
                    const._values = ExternalValues(proto, *where)

    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                fix(t)
        for node in g.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Constant):
                    fix(v)


def from_proto(proto: onnx.ModelProto, path: Path | None = None) -> Model:
    """Import a checked ModelProto into a :class:`Model` (the proto can be dropped afterwards)."""
    try:
        graph = gs.import_onnx(proto)
    except Exception as exc:  # graphsurgeon raises bare exceptions on malformed graphs
        raise OnnxCompressError(
            f"cannot import model graph: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    _attach_external_values(graph)
    metadata = {
        "metadata_props": {p.key: p.value for p in proto.metadata_props},
        "doc_string": proto.doc_string,
        "model_version": proto.model_version,
        "domain": proto.domain,
    }
    external = any(
        t.data_location == onnx.TensorProto.EXTERNAL and _INLINE_KEY not in _external_info(t)
        for t in iter_model_tensors(proto)
    )
    return Model(graph=graph, path=path, ir_version=proto.ir_version, metadata=metadata, external_data=external)


def load(path: str | os.PathLike[str], *, max_memory: int | None = None) -> Model:
    """Load a model from disk, checking it as untrusted input.

    Args:
        path: The ``.onnx`` file; external data is read from its folder, lazily, per tensor.
        max_memory: Memory budget in bytes for declared tensor sizes (default 75% of RAM).

    Raises:
        OnnxCompressError: the file is missing, not ONNX, truncated, or unsafe.
    """
    path = Path(path)
    proto = read_proto(path, max_memory=max_memory, lazy=True)
    return from_proto(proto, path=path)


# --------------------------------------------------------------------------- export


class _Exporter:
    """Scope-aware export of a graphsurgeon graph (see graph.py for why graphsurgeon's is not used)."""

    def __init__(self, graph: gs.Graph, stub_bytes: int | None = None) -> None:
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        self._gs = OnnxExporter
        self._placement = constant_placement(graph)
        self._stub_bytes = stub_bytes

    def tensor(self, t: gs.Constant) -> onnx.TensorProto:
        """The TensorProto of a constant; over ``stub_bytes`` only its dtype/dims (a skeleton)."""
        if self._stub_bytes is not None and tensor_nbytes(t) > self._stub_bytes:
            dtype = t._values.dtype if isinstance(t._values, LazyValues) else t.values.dtype
            code = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            stub = onnx.TensorProto(name=t.name, data_type=code, dims=[int(d) for d in t.shape])
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="__onnxcompress_stub__")
            return stub
        if not isinstance(t._values, LazyValues) and np.asarray(t._values).dtype.kind in "OSU":
            # graphsurgeon writes raw_data, which cannot hold strings
            return onnx.numpy_helper.from_array(np.asarray(t._values, dtype=object), t.name)
        proto = self._gs.export_tensor_proto(t)
        if proto.data_location == onnx.TensorProto.EXTERNAL and proto.HasField("raw_data"):
            # new values of a constant that was loaded from external data: they are inline now
            proto.ClearField("data_location")
            del proto.external_data[:]
        return proto

    def graph(self, graph: gs.Graph, do_type_check: bool, initializers: bool = True) -> onnx.GraphProto:
        ex = self._gs
        nodes = [self.node(n) for n in graph.nodes]
        inputs = [ex.export_value_info_proto(t, do_type_check) for t in graph.inputs]
        outputs = [ex.export_value_info_proto(t, do_type_check) for t in graph.outputs]
        io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        initializer = self.initializers(graph) if initializers else []
        value_info = [
            ex.export_value_info_proto(t, do_type_check)
            for n in graph.nodes
            for t in n.outputs
            if isinstance(t, gs.Variable) and t.name not in io_names and (t.dtype is not None or t.shape is not None)
        ]
        return onnx.helper.make_graph(
            nodes=nodes,
            name=graph.name,
            inputs=inputs,
            outputs=outputs,
            initializer=initializer,
            doc_string=graph.doc_string,
            value_info=value_info,
        )

    def initializers(self, graph: gs.Graph) -> Iterator[onnx.TensorProto]:
        """The TensorProtos of the constants placed in ``graph``, built one at a time."""
        input_names = {i.name for i in graph.inputs}
        for t in self._placement.get(id(graph), []):
            if t.name not in input_names:
                yield self.tensor(t)

    def node(self, node: gs.Node) -> onnx.NodeProto:
        proto = onnx.helper.make_node(
            node.op,
            inputs=[t.name for t in node.inputs],
            outputs=[t.name for t in node.outputs],
            name=node.name,
            domain=node.domain,
        )
        for key, val in node.attrs.items():
            if isinstance(val, gs.Graph):
                proto.attribute.append(onnx.helper.make_attribute(key, self.graph(val, do_type_check=False)))
            elif isinstance(val, (list, tuple)) and val and all(isinstance(v, gs.Graph) for v in val):
                graphs = [self.graph(v, do_type_check=False) for v in val]
                proto.attribute.append(onnx.helper.make_attribute(key, graphs))
            elif isinstance(val, gs.Constant):
                proto.attribute.append(onnx.helper.make_attribute(key, self.tensor(val)))
            else:
                proto.attribute.extend(self._gs.export_attributes({key: val}))
        return proto


def export_model(model: Model, stub_bytes: int | None = None, type_check: bool = True) -> onnx.ModelProto:
    """Build a ModelProto from a :class:`Model`; external tensors stay references (not read).

    Args:
        model: The model.
        stub_bytes: If set, constants larger than this are written as declarations only (dtype and
            dims, no data): a skeleton for shape inference, not a loadable model.
        type_check: Require dtypes on graph inputs and outputs.

    Raises:
        OnnxCompressError: when graphsurgeon's exporter fails on a malformed model the loader let through.
    """
    try:
        return _export_model(model, stub_bytes, type_check)
    except (ValueError, TypeError, KeyError, UnboundLocalError, AttributeError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise OnnxCompressError(
            f"malformed model: it cannot be written back ({type(exc).__name__}: {first}); check it with onnx.checker"
        ) from None


def _export_model(model: Model, stub_bytes: int | None, type_check: bool) -> onnx.ModelProto:
    proto, initializers = _export_split(model, stub_bytes, type_check)
    # The main graph's tensors go straight into the model, one at a time: building them into the
    # GraphProto first would hold the weights twice (make_graph and make_model both copy).
    for tensor in initializers:
        proto.graph.initializer.append(tensor)
    return proto


def _export_split(
    model: Model, stub_bytes: int | None, type_check: bool
) -> tuple[onnx.ModelProto, Iterator[onnx.TensorProto]]:
    """The ModelProto without the main graph's initializers, and those built one at a time.

    A tensor whose values are still lazy is the loader's own proto (shared: copy it before changing it).
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

    graph = model.graph
    if stub_bytes is None or not in_topological_order(graph):
        # a skeleton (shape inference) only needs a valid order; a saved model gets graphsurgeon's
        graph.toposort(recurse_subgraphs=True)
    exporter = _Exporter(graph, stub_bytes)
    graph_proto = exporter.graph(graph, do_type_check=type_check, initializers=False)
    functions = [OnnxExporter.export_function(f) for f in graph.functions]
    proto = onnx.helper.make_model(graph_proto, opset_imports=update_import_domains(graph), functions=functions)
    del graph_proto
    proto.producer_name = graph.producer_name or "onnxcompress"
    proto.producer_version = graph.producer_version or ""
    if model.ir_version:
        proto.ir_version = max(int(model.ir_version), 7)
    meta = model.metadata
    for k, v in meta.get("metadata_props", {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = meta.get("doc_string", "") or ""
    proto.model_version = int(meta.get("model_version", 0) or 0)
    proto.domain = meta.get("domain", "") or ""
    return proto, exporter.initializers(graph)


# --------------------------------------------------------------------------- save


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _source_files(proto: onnx.ModelProto) -> set[Path]:
    files = set()
    for t in iter_model_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = _external_info(t)
            if _ABS_KEY in info:
                files.add(Path(info[_ABS_KEY]))
    return files


def check_output_path(out: Path, *, force: bool, protect: list[Path] | tuple[Path, ...] = ()) -> None:
    """Refuse output paths that would lose data.

    Raises:
        OnnxCompressError: the output is an input (or its data file), a folder, a symlink, or exists
            without ``force``, or its folder is missing.
    """
    for p in protect:
        if p is not None and (Path(os.path.abspath(out)) == Path(os.path.abspath(p)) or _same_file(out, Path(p))):
            raise OnnxCompressError(f"output path {out} is the input model: choose another output path")
    if out.is_symlink():
        raise OnnxCompressError(f"output path {out} is a symlink: refusing to write through it")
    if out.exists() and out.is_dir():
        raise OnnxCompressError(f"output path {out} is a folder: give a file name ending in .onnx")
    if out.exists() and not force:
        raise OnnxCompressError(f"output file {out} exists: pass --force to overwrite it")
    if not out.parent.exists():
        raise OnnxCompressError(f"output folder {out.parent} does not exist")


def _total_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for t in iter_model_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(_external_info(t).get("length", "0"))
        else:
            total += len(t.raw_data) if t.HasField("raw_data") else 0
    return total


def _inline_external(proto: onnx.ModelProto) -> None:
    for t in iter_model_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.raw_data = b"".join(read_external_bytes(t))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT


def _write_external(proto: onnx.ModelProto, data_path: Path, first: Iterable[onnx.TensorProto] = ()) -> None:
    """Move every tensor of at least EXTERNAL_MIN_BYTES into ``data_path``, streaming.

    ``first``: main-graph initializers not yet in ``proto`` (see :func:`_export_split`), written
    first, one at a time, then added to ``proto`` without their data.
    """
    location = data_path.name
    offset = 0
    done: list[onnx.TensorProto] = []
    with open(data_path, "wb") as f:

        def put(t: onnx.TensorProto) -> None:
            nonlocal offset
            if t.data_location == onnx.TensorProto.EXTERNAL:
                pad = (-offset) % 64
                f.write(b"\0" * pad)
                offset += pad
                length = 0
                for block in read_external_bytes(t):
                    f.write(block)
                    length += len(block)
            elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                pad = (-offset) % 64
                f.write(b"\0" * pad)
                offset += pad
                length = len(t.raw_data)
                f.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                return
            _set_external_info(t, {"location": location, "offset": offset, "length": length})
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += length

        for t in first:
            if t.data_location == onnx.TensorProto.EXTERNAL or t.HasField("raw_data"):
                # maybe the loaded model's own proto (a lazily loaded tensor): ``put`` rewrites what it
                # moves, so it works on a copy and the model can still be saved again
                copy = onnx.TensorProto()
                copy.CopyFrom(t)
                t = copy
            put(t)
            done.append(t)
        for t in iter_model_tensors(proto):
            put(t)
        f.flush()
        os.fsync(f.fileno())
    proto.graph.initializer.extend(done)


def _write_initializer(f: BinaryIO, t: onnx.TensorProto) -> int:
    """Write ``t`` as a ``GraphProto.initializer`` field (its data inline); returns the bytes written.

    An external (or lazily loaded) tensor's bytes are copied from its file in blocks, never whole.
    """
    if t.data_location != onnx.TensorProto.EXTERNAL:
        body = t.SerializeToString()
        prefix = _encode_varint(5 << 3 | 2) + _encode_varint(len(body))
        f.write(prefix)
        f.write(body)
        return len(prefix) + len(body)
    info = _external_info(t)
    length = int(info["length"])
    header = onnx.TensorProto()
    header.CopyFrom(t)
    del header.external_data[:]
    if _INLINE_KEY in info:
        header.ClearField("data_location")  # as it was in the file it came from
    else:
        header.data_location = onnx.TensorProto.DEFAULT
    head = header.SerializeToString() + _encode_varint(9 << 3 | 2) + _encode_varint(length)
    prefix = _encode_varint(5 << 3 | 2) + _encode_varint(len(head) + length)
    f.write(prefix + head)
    written = 0
    for block in read_external_bytes(t):
        f.write(block)
        written += len(block)
    if written != length:
        raise OnnxCompressError(f"external data of tensor {t.name!r} ended early")
    return len(prefix) + len(head) + length


def _write_streamed(proto: onnx.ModelProto, initializers: Iterable[onnx.TensorProto], path: Path) -> None:
    """Write ``proto`` plus the main-graph ``initializers`` to ``path`` without ever holding the
    weights in a protobuf message or a serialized copy: the initializers are written one at a time
    to a side file, then the model's fields, the graph's fields and the side file are concatenated
    (the initializers come last inside the graph field; protobuf fields may come in any order).
    ``proto`` loses its graph.
    """
    side_path = path.with_name(path.name + ".initializers")
    with open(side_path, "w+b") as side:
        inits = sum(_write_initializer(side, t) for t in initializers)
        try:
            graph = proto.graph.SerializeToString()
            proto.ClearField("graph")
            head = proto.SerializeToString()
        except ValueError:
            raise OnnxCompressError("model is over 2 GB: save it with external data (--external-data)") from None
        size = len(graph) + inits
        field = _encode_varint(7 << 3 | 2) + _encode_varint(size)
        if len(head) + len(field) + size > PROTOBUF_LIMIT:
            raise OnnxCompressError("model is over 2 GB: save it with external data (--external-data)")
        with open(path, "wb") as f:
            f.write(head)
            f.write(field)
            f.write(graph)
            del graph
            side.seek(0)
            shutil.copyfileobj(side, f, 16 * 2**20)
            f.flush()
            os.fsync(f.fileno())
    side_path.unlink()


def check_written(path: str | os.PathLike[str]) -> None:
    """Run onnx's checker on a written (or staged) model file; see :func:`stage` (``check=False``).

    Raises:
        OnnxCompressError: the file is not valid ONNX.
    """
    _check_written(Path(path))


def _check_written(path: Path) -> None:
    """Every written model must pass onnx's checker; otherwise nothing is written.

    The loader refuses most malformed models; what it lets through and the checker rejects (an
    unknown attribute, say) would otherwise come out as an invalid file.
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise OnnxCompressError(
            f"the output would not be valid ONNX ({first[:200]}); check the input with onnx.checker"
        ) from None


def _owned_data_files(out: Path) -> list[Path]:
    """External-data files named after output ``out`` (``OUT.data``, ``OUT.<8 hex>.data``)."""
    pattern = re.compile(re.escape(out.name) + r"(\.[0-9a-f]{8})?\.data")
    try:
        return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    except OSError:
        return []


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie (killed, not yet reaped: containers whose init never reaps) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return not any(line.startswith("State:") and "Z" in line.split()[1:2] for line in status.splitlines())


def clean_stale_temp(folder: Path) -> None:
    """Remove temp folders left in ``folder`` by onnxcompress processes that no longer run."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            pid = int(entry.name[len(TMP_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid():
            if _process_alive(pid):
                continue
        elif entry.exists():
            continue
        shutil.rmtree(entry, ignore_errors=True)


class StagedModel:
    """A model written to a temp folder beside its final path, not yet visible there.

    Use :meth:`commit` to rename it into place (atomic per file) or :meth:`discard`.
    """

    def __init__(self, out: Path, tmpdir: Path, files: list[str], keep: tuple[Path, ...] = ()) -> None:
        self.out, self.tmpdir, self.files = out, tmpdir, files
        self.keep = keep  # files that must survive the clean-up (the input model's data)

    @property
    def path(self) -> Path:
        """Where the staged .onnx file lies now (to validate it before committing)."""
        return self.tmpdir / self.out.name

    def commit(self) -> Path:
        """Rename the staged files into place: the data file first, the .onnx file last.

        The data file never replaces one an existing output still reads (``stage`` picks a fresh
        name then), so at every moment the ``.onnx`` on disk has its data; data files of earlier
        versions of this output are deleted once the new ``.onnx`` is in place.
        """
        for name in sorted(self.files, key=lambda n: n == self.out.name):
            os.replace(self.tmpdir / name, self.out.parent / name)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        for old in _owned_data_files(self.out):
            if old.name not in self.files and not any(_same_file(old, k) for k in self.keep):
                with contextlib.suppress(OSError):
                    old.unlink()
        return self.out

    def discard(self) -> None:
        """Delete the staged files."""
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def stage(
    model: Model | onnx.ModelProto,
    out: str | os.PathLike[str],
    *,
    external: bool | None = None,
    force: bool = False,
    protect: tuple[Path, ...] = (),
    check: bool = True,
    type_check: bool = True,
    extra_outputs: Iterable[str] = (),
) -> StagedModel:
    """Write ``model`` into a temp folder next to ``out`` (see :class:`StagedModel`).

    Args:
        model: The model to write.
        out: The final path.
        external: Write tensors to ``<out>.data``; ``None`` keeps the source model's layout (external
            if it had external data) and switches to external data over ~1.8 GB of tensors.
        force: Allow replacing an existing output file.
        protect: Paths that must never be written (the input model).
        check: Run onnx's checker on the written file (off only for internal scratch models).
        type_check: Require dtypes on the graph's inputs and outputs (a :class:`Model`).
        extra_outputs: Names of tensors to add as graph outputs, without a type (a :class:`Model`;
            scratch models that read activations, see ``passes.calibrate``).

    A :class:`Model` is written without building its weights into one protobuf message: the
    main graph's initializers are exported and written one at a time (see ``_write_streamed``).
    """
    out = Path(out)
    check_output_path(out, force=force, protect=protect)
    streamed = isinstance(model, Model)
    initializers: Iterable[onnx.TensorProto] = ()
    try:
        if isinstance(model, Model):
            # The main graph's initializers are built one at a time while they are written.
            proto, built = _export_split(model, None, type_check)
            existing = {o.name for o in proto.graph.output}
            for name in dict.fromkeys(extra_outputs):
                if name not in existing:
                    proto.graph.output.append(onnx.ValueInfoProto(name=name))
            initializers = _export_errors(built, out)
            pending_bytes, pending_sources = _pending_initializers(model)
        else:
            proto, pending_bytes, pending_sources = model, 0, set()
    except (ValueError, TypeError, KeyError, UnboundLocalError, AttributeError, UnicodeDecodeError) as exc:
        # graphsurgeon's exporter fails on some malformed inputs that loading let through
        raise OnnxCompressError(f"cannot write {out.name}: the model cannot be exported ({exc})") from None
    data_name = out.name + ".data"
    if (out.parent / data_name).exists():
        # An existing output (or the input) may still read OUT.data: never overwrite it in place
        # (see StagedModel.commit).
        data_name = f"{out.name}.{secrets.token_hex(4)}.data"
    sources = _source_files(proto) | pending_sources
    if external is None:
        from_external = isinstance(model, Model) and model.external_data
        external = from_external or _total_bytes(proto) + pending_bytes > AUTO_EXTERNAL_BYTES
    clean_stale_temp(out.parent)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise OnnxCompressError(f"cannot write to {out.parent}: {exc.strerror}") from None
    files = [out.name]
    try:
        if external:
            _write_external(proto, tmpdir / data_name, first=initializers)
            files.append(data_name)
        else:
            _inline_external(proto)
        if streamed and not external:
            _write_streamed(proto, initializers, tmpdir / out.name)
        else:
            try:
                data = proto.SerializeToString()
            except ValueError:
                data = b""
            if not data or len(data) > PROTOBUF_LIMIT:
                raise OnnxCompressError("model is over 2 GB: save it with external data (--external-data)")
            with open(tmpdir / out.name, "wb") as f:
                f.write(data)
                del data
                f.flush()
                os.fsync(f.fileno())
        del proto  # the checker below reads the file: do not hold the model twice
        if check:
            _check_written(tmpdir / out.name)
    except OSError as exc:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise OnnxCompressError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    keep = tuple(sources) + tuple(Path(p) for p in protect if p)
    return StagedModel(out, tmpdir, files, keep=keep)


def _export_errors(tensors: Iterator[onnx.TensorProto], out: Path) -> Iterator[onnx.TensorProto]:
    """``tensors``, with graphsurgeon's export errors turned into OnnxCompressError."""
    try:
        yield from tensors
    except (ValueError, TypeError, KeyError, UnboundLocalError, AttributeError, UnicodeDecodeError) as exc:
        raise OnnxCompressError(f"cannot write {out.name}: the model cannot be exported ({exc})") from None


def _pending_initializers(model: Model) -> tuple[int, set[Path]]:
    """Bytes of the main graph's initializers and the files the lazy ones are read from."""
    graph = model.graph
    inputs = {t.name for t in graph.inputs}
    total, files = 0, set()
    for t in constant_placement(graph).get(id(graph), []):
        if t.name in inputs:
            continue
        values = t._values
        if isinstance(values, (ExternalValues, InlineValues)):
            total += values.length
            files.add(values.path)
        else:
            total += tensor_nbytes(t)
    return total, files


def save(
    model: Model | onnx.ModelProto,
    out: str | os.PathLike[str],
    *,
    external: bool | None = None,
    force: bool = False,
) -> Path:
    """Write a model atomically; never overwrites its source model.

    Args:
        model: The model to save.
        out: Output ``.onnx`` path. External data goes to ``<out>.data`` beside it.
        external: Force external data on/off; ``None`` (default) keeps the source's layout and uses
            it above ~1.8 GB of tensors.
        force: Replace an existing output file.

    Returns:
        The output path.
    """
    protect = (Path(model.path),) if isinstance(model, Model) and model.path else ()
    staged = stage(model, out, external=external, force=force, protect=protect)
    try:
        return staged.commit()
    except OSError as exc:
        staged.discard()
        raise OnnxCompressError(f"cannot write {out}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- compressed copies

COMPRESSED_FORMATS = ("gz", "zst")


def check_compressed_formats(formats: list[str] | tuple[str, ...]) -> None:
    """Refuse unknown formats, and ``zst`` without the ``zstandard`` package (before any work).

    Raises:
        OnnxCompressError: naming the format or the missing package.
    """
    for fmt in formats:
        if fmt not in COMPRESSED_FORMATS:
            raise OnnxCompressError(f"unknown compressed format {fmt!r}: choose gz or zst")
        if fmt == "zst":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise OnnxCompressError("zst copies need the zstandard package: pip install zstandard") from None


def write_compressed(path: Path, fmt: str, level: int | None = None) -> Path:
    """Write ``path`` compressed beside it (``PATH.gz``: gzip level 9; ``PATH.zst``: zstd level 19),
    streamed in chunks, to a temp file renamed into place. Returns the written path."""
    check_compressed_formats([fmt])
    out = path.with_name(path.name + "." + fmt)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{out.name}")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as raw:
            if fmt == "gz":
                import gzip

                with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, compresslevel=level or 9, mtime=0) as z:
                    while block := src.read(1 << 22):
                        z.write(block)
            else:
                import zstandard

                cctx = zstandard.ZstdCompressor(level=level or 19, threads=-1)
                with cctx.stream_writer(raw, size=path.stat().st_size, closefd=False) as z:
                    while block := src.read(1 << 22):
                        z.write(block)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return out
