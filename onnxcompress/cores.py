"""How many threads a numpy-heavy search may use (numpy releases the GIL in its loops)."""

from __future__ import annotations

import os


def search_threads(override: int = 0, cap: int = 4) -> int:
    """``override`` if positive, else ``ONNXCOMPRESS_THREADS`` (the batch runner's share of the cores)
    if set, else the usable cores; never more than the usable cores or ``cap``, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    wanted = override
    if wanted <= 0:
        try:
            wanted = int(os.environ.get("ONNXCOMPRESS_THREADS", "0") or 0)
        except ValueError:
            wanted = 0
    return max(1, min(cap, cores, wanted if wanted > 0 else cores))
