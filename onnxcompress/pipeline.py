"""Run an ordered list of passes over a model, timing each and collecting its report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .graph import Model
from .passes.base import Pass, PassContext, PassReport

log = logging.getLogger(__name__)


class Pipeline:
    """An ordered list of passes.

    Args:
        passes: The passes, run in order.
        on_pass: Called after each pass with its report (progress display, per-pass validation).
    """

    def __init__(self, passes: Sequence[Pass], on_pass: Callable[[PassReport], None] | None = None) -> None:
        self.passes = list(passes)
        self.on_pass = on_pass

    def run(self, model: Model, ctx: PassContext | None = None) -> list[PassReport]:
        """Run every pass on ``model`` (in place) and return their reports in order."""
        ctx = ctx or PassContext()
        reports = []
        for p in self.passes:
            log.info("running pass %s", p.name)
            start = time.perf_counter()
            report = p.run(model, ctx)
            report.seconds = time.perf_counter() - start
            log.info("pass %s: changed=%s in %.3fs", p.name, report.modified, report.seconds)
            reports.append(report)
            if self.on_pass:
                self.on_pass(report)
        return reports
