"""Run an ordered list of passes over a model, timing each and collecting its report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .graph import Model, constant_bytes, count_nodes
from .passes.base import Pass, PassContext, PassReport

log = logging.getLogger(__name__)


class Pipeline:
    """An ordered list of passes.

    Args:
        passes: The passes, run in order.
        on_pass: Called after each pass with its report (progress display, per-pass validation).
        on_start: Called with each pass before it runs (progress display).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        on_pass: Callable[[PassReport], None] | None = None,
        on_start: Callable[[Pass], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.on_pass = on_pass
        self.on_start = on_start

    def run(self, model: Model, ctx: PassContext | None = None) -> list[PassReport]:
        """Run every pass on ``model`` (in place) and return their reports in order."""
        ctx = ctx or PassContext()
        reports = []
        for p in self.passes:
            log.info("running pass %s", p.name)
            if self.on_start:
                self.on_start(p)
            start = time.perf_counter()
            report = p.run(model, ctx)
            report.seconds = time.perf_counter() - start
            log.info("pass %s: changed=%s in %.3fs", p.name, report.modified, report.seconds)
            reports.append(report)
            if self.on_pass:
                self.on_pass(report)
        return reports


class FixedPointPass:
    """Run lossless passes in order, repeatedly, until a whole round changes nothing.

    Like onnxscript's ``PassManager(passes, steps=N, early_stop=True)``: the composite is itself a
    pass (registered in ``recipes.PASSES``), its report sums the sub-passes' work per name.

    Args:
        name: The recipe name (e.g. ``fold``).
        passes: The sub-passes, in order.
        max_steps: Upper bound on rounds.
        finish: Passes run once after the last round (e.g. re-annotating shapes), only if a round
            changed the model.
    """

    def __init__(self, name: str, passes: Sequence[Pass], max_steps: int = 8, finish: Sequence[Pass] = ()) -> None:
        self.name = name
        self.passes = list(passes)
        self.max_steps = max_steps
        self.finish = list(finish)

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Run rounds of the sub-passes until none modifies the model."""
        report = PassReport(self.name)
        nodes_before, bytes_before = count_nodes(model.graph), constant_bytes(model.graph)
        sub: dict[str, dict[str, float]] = {}
        steps = 0
        for steps in range(1, self.max_steps + 1):  # noqa: B007
            changed = False
            for p in self.passes:
                start = time.perf_counter()
                r = p.run(model, ctx)
                entry = sub.setdefault(p.name, {"rounds_changed": 0, "seconds": 0.0})
                entry["seconds"] += time.perf_counter() - start
                if r.modified:
                    changed = True
                    entry["rounds_changed"] += 1
                    for key, value in r.stats.items():
                        if isinstance(value, (int, float)) and key not in _SIZE_KEYS:
                            entry[key] = entry.get(key, 0) + value
                for item in r.skipped:
                    if item not in report.skipped:
                        report.skipped.append(item)
                report.tensor_map.update(r.tensor_map)
            report.modified |= changed
            if not changed:
                break
        if report.modified:
            for p in self.finish:
                start = time.perf_counter()
                r = p.run(model, ctx)
                sub.setdefault(p.name, {"seconds": 0.0})["seconds"] += time.perf_counter() - start
                report.skipped += [item for item in r.skipped if item not in report.skipped]
        report.stats = {
            "nodes_before": nodes_before,
            "nodes_after": count_nodes(model.graph),
            "bytes_before": bytes_before,
            "bytes_after": constant_bytes(model.graph),
            "rounds": steps,
            "sub_passes": {
                k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in sub.items()
            },
        }
        return report


_SIZE_KEYS = {"nodes_before", "nodes_after", "bytes_before", "bytes_after"}
