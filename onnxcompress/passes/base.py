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
from typing import Any, Protocol

from ..graph import Model, constant_bytes, count_nodes


@dataclasses.dataclass
class PassContext:
    """What a pass may need besides the graph.

    Attributes:
        feeds: Calibration/validation feeds (list of ``{input name: array}``), if any.
        options: Free-form options shared by passes.
        log: Logger for progress messages.
    """

    feeds: list[dict[str, Any]] | None = None
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
