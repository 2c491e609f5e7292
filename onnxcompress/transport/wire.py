"""Locate tensor payloads inside a serialized ONNX model, byte for byte, without parsing it whole.

A package must restore the ``.onnx`` file bit-identical, which re-serialising a parsed ``ModelProto``
does not promise (field order, unknown fields, packed or unpacked repeated fields are all the
writer's choice). So the container works on the file's bytes: this module walks the protobuf wire
format (``tag = field << 3 | wire_type``; varints; length-delimited fields) down the paths where
``TensorProto`` messages live (graph initializers, sparse initializers, ``Constant``-style node
attributes, subgraphs at any depth, function bodies, training-info graphs) and reports, for every
tensor, where its ``raw_data`` (or packed ``float_data``/``double_data``) payload lies in the file,
plus the few header fields needed to code it (dims, data type, name, external-data entries).

Everything outside those payloads (the "skeleton": graph structure, names, attributes, small typed
fields) is left to the caller to code as one stream. Wire-format errors raise ``WireError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_DEPTH = 64


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class TensorRef:
    """A tensor found in the file.

    Attributes:
        name: The tensor's name.
        data_type: ONNX ``TensorProto.DataType`` value.
        dims: The tensor's dims.
        payload: ``(offset, length)`` of its inline payload bytes in the file, or None.
        payload_field: 9 (raw_data), 4 (packed float_data) or 10 (packed double_data).
        external: The ``external_data`` key/value entries (empty when inline).
        start, end: The span of the TensorProto message itself.
    """

    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    payload: tuple[int, int] | None = None
    payload_field: int = 0
    external: dict[str, str] = field(default_factory=dict)
    data_location: int = 0
    start: int = 0
    end: int = 0


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def iter_fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field_number, wire_type, value_or_offset, length)`` for each field of a message.

    For varints ``value_or_offset`` is the value (length 0); for length-delimited fields it is the
    payload's offset; fixed32/64 give their offset and 4/8.
    """
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, 0
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError("length-delimited field runs past its message")
            yield number, wire, pos, length
            pos += length
        elif wire == 1:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            yield number, wire, pos, 8
            pos += 8
        elif wire == 5:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            yield number, wire, pos, 4
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
    if pos != end:
        raise WireError("message overruns its length")


def _tensor(buf: memoryview, start: int, end: int) -> TensorRef:
    ref = TensorRef(start=start, end=end)
    for number, wire, off, length in iter_fields(buf, start, end):
        if number == 1:
            if wire == 0:
                ref.dims.append(off)
            elif wire == 2:
                p, e = off, off + length
                while p < e:
                    v, p = _varint(buf, p, e)
                    ref.dims.append(v)
        elif number == 2 and wire == 0:
            ref.data_type = off
        elif number == 8 and wire == 2:
            ref.name = bytes(buf[off : off + length]).decode("utf-8", "replace")
        elif number == 9 and wire == 2:
            ref.payload, ref.payload_field = (off, length), 9
        elif number in (4, 10) and wire == 2 and ref.payload is None:
            ref.payload, ref.payload_field = (off, length), number
        elif number == 13 and wire == 2:
            key = value = ""
            for n2, w2, o2, l2 in iter_fields(buf, off, off + length):
                if w2 == 2 and n2 in (1, 2):
                    text = bytes(buf[o2 : o2 + l2]).decode("utf-8", "replace")
                    key, value = (text, value) if n2 == 1 else (key, text)
            ref.external[key] = value
        elif number == 14 and wire == 0:
            ref.data_location = off
    return ref


# message kind -> {field number: child kind}
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def find_tensors(buf: memoryview) -> list[TensorRef]:
    """All tensors of a serialized ``ModelProto`` in file order (raises ``WireError`` if malformed)."""
    found: list[TensorRef] = []

    def walk(kind: str, start: int, end: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise WireError("messages nested too deep")
        children = _SCHEMA[kind]
        for number, wire, off, length in iter_fields(buf, start, end):
            child = children.get(number)
            if child is None or wire != 2:
                continue
            if child == "tensor":
                found.append(_tensor(buf, off, off + length))
            else:
                walk(child, off, off + length, depth + 1)

    walk("model", 0, len(buf), 0)
    return found


def has_graph(buf: memoryview) -> bool:
    """Whether the top-level message has an ir_version and a graph (a quick ONNX-ness check)."""
    seen = set()
    for number, wire, _off, _len in iter_fields(buf, 0, len(buf)):
        if (number, wire) in ((1, 0), (7, 2)):
            seen.add(number)
    return seen == {1, 7}
