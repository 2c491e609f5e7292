"""The pass protocol and the report every pass returns.

A pass is a small object built from a frozen ``XxxConfig`` dataclass with one method,
``run(model, ctx) -> PassReport``, that rewrites ``model.graph`` in place. The report says what
changed (node and byte counts before/after, tensors changed), what was skipped and why (so a user can
ask "why was this layer not quantized?"), and ``tensor_map`` ``{new name: original name}`` for every
tensor a pass renamed or replaced, so diagnostics can match layers across any pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Protocol

from ..errors import OnnxCompressError
from ..graph import Model, constant_bytes, count_nodes

TARGETS = ("standard", "onnxruntime")


def is_excluded(node_name: str, op_type: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a node matches an ``--exclude`` pattern: its name, its op type, or a regex on its name."""
    for pat in patterns:
        if pat in (node_name, op_type):
            return True
        try:
            if re.fullmatch(pat, node_name or ""):
                return True
        except re.error:
            continue
    return False


@dataclasses.dataclass
class PassContext:
    """What a pass may need besides the graph.

    Attributes:
        feeds: Validation feeds (list of ``{input name: array}``), if any. Passes must not fit
            anything to them (they judge the result); use ``calibration``.
        calibration: Calibration feeds (``--calibration`` or ``<model>.calibration.npz``), if any.
        target: ``standard`` (only standard ONNX ops in the output, runs on any runtime) or
            ``onnxruntime`` (onnxruntime contrib ops such as MatMulNBits allowed).
        exclude: Node names, op types or regular expressions (``re.fullmatch`` on node names) that
            lossy passes must leave in float.
        options: Free-form options shared by passes.
        log: Logger for progress messages.
    """

    feeds: list[dict[str, Any]] | None = None
    calibration: list[dict[str, Any]] | None = None
    target: str = "standard"
    exclude: tuple[str, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("onnxcompress"))


@dataclasses.dataclass
class PassReport:
    """What one pass did.

    Attributes:
        name: The pass name as used in recipes (e.g. ``int8-weights``).
        modified: Whether the graph changed.
        seconds: Wall time of the pass (filled by the pipeline).
        stats: ``nodes_before/after``, ``bytes_before/after``, ``tensors_changed`` and pass-specific counts.
        skipped: ``[(node or tensor name, reason)]``.
        tensor_map: ``{new tensor name: original tensor name}``.
    """

    name: str
    modified: bool = False
    seconds: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    tensor_map: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``changed`` mirrors ``modified`` (the public report key)."""
        return {
            "name": self.name,
            "changed": self.modified,
            "seconds": round(self.seconds, 4),
            "stats": self.stats,
            "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
            "tensor_map": self.tensor_map,
        }


class Pass(Protocol):
    """A graph transform. ``name`` is its recipe name."""

    name: str

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Rewrite ``model.graph`` in place and report what changed."""
        ...


@dataclasses.dataclass(frozen=True)
class GraphSize:
    """Node count and constant bytes of a model, taken before a pass runs."""

    nodes: int
    bytes: int

    @classmethod
    def of(cls, model: Model) -> GraphSize:
        """Measure ``model`` now (subgraphs included; lazy weights are not loaded)."""
        return cls(count_nodes(model.graph), constant_bytes(model.graph))

    def stats(self, model: Model, changed: bool = True, **extra: Any) -> dict[str, Any]:
        """``nodes_before/after`` and ``bytes_before/after`` (re-measured only if ``changed``), plus ``extra``."""
        after = GraphSize.of(model) if changed else self
        return {
            "nodes_before": self.nodes,
            "nodes_after": after.nodes,
            "bytes_before": self.bytes,
            "bytes_after": after.bytes,
            **extra,
        }


class Params:
    """``--param KEY=VALUE`` settings, read by pass factories with a type and a default.

    Every key read is remembered so that :func:`onnxcompress.recipes.build_passes` can refuse keys no
    pass used (a typo must not be silently ignored). Bad values raise a one-line error.
    """

    def __init__(self, items: dict[str, str] | None = None) -> None:
        self.items = dict(items or {})
        self.used: set[str] = set()

    @classmethod
    def parse(cls, pairs: list[str] | None) -> Params:
        """From ``["block_size=64", ...]``."""
        items: dict[str, str] = {}
        for pair in pairs or []:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise OnnxCompressError(f"bad --param {pair!r}: expected KEY=VALUE")
            items[key.strip()] = value.strip()
        return cls(items)

    def _raw(self, key: str) -> str | None:
        self.used.add(key)
        return self.items.get(key)

    def get_str(self, key: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        """A string setting, optionally one of ``choices``."""
        raw = self._raw(key)
        value = default if raw is None else raw
        if choices is not None and value not in choices:
            raise OnnxCompressError(f"--param {key}={value}: choose from {', '.join(choices)}")
        return value

    def get_int(self, key: str, default: int, choices: tuple[int, ...] | None = None) -> int:
        """An integer setting, optionally one of ``choices``."""
        raw = self._raw(key)
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            raise OnnxCompressError(f"--param {key}={raw}: expected an integer") from None
        if choices is not None and value not in choices:
            raise OnnxCompressError(f"--param {key}={value}: choose from {', '.join(map(str, choices))}")
        return value

    def get_float(self, key: str, default: float) -> float:
        """A float setting."""
        raw = self._raw(key)
        try:
            return default if raw is None else float(raw)
        except ValueError:
            raise OnnxCompressError(f"--param {key}={raw}: expected a number") from None

    def get_bool(self, key: str, default: bool) -> bool:
        """A boolean setting (true/false, yes/no, on/off, 1/0)."""
        raw = self._raw(key)
        if raw is None:
            return default
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OnnxCompressError(f"--param {key}={raw}: expected true or false")

    def unused(self) -> list[str]:
        """Keys given but never read."""
        return sorted(set(self.items) - self.used)
