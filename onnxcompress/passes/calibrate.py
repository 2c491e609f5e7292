"""Calibration: run a model in onnxruntime and read intermediate activations.

Passes that need activations (static quantization ranges, GPTQ Hessians, bias correction, layer-wise
reconstruction) open an :class:`ActivationTap` on the model as it is *now* (with any rewrites done
so far), naming the main-graph tensors they want. The tap writes a scratch copy of the model with
those tensors added as graph outputs and keeps one onnxruntime session open; ``run(feed)`` returns
the tensors for one feed. Feeds are streamed one at a time (``iterate`` cuts each into slices of a few
samples along its batch axis, as many as keep the tapped tensors of one slice within ``TAP_BYTES``),
so memory holds one slice's activations, never the whole calibration set's.

Memory: the scratch copy keeps its weights in an external-data file, which onnxruntime maps (the
weights are in memory once, not parsed out of a protobuf and then copied), and the session has no
memory arena (a run's buffers are freed when it ends; outputs do not pin arena chunks). Between
slices :meth:`ActivationTap.release` trims the heap and unmaps the weight pages that the run read
(an embedding ``Gather`` faults in pages around every row it reads: MiniLM, 45 MB of its 47 MB table
after 8 slices); the copy is kept out of the page cache, so that a run maps only what it reads.
Consumers should drop a slice's tensors before asking for the next (``acts.pop(name)``, ``del acts``):
else two slices' outputs are alive while the next one runs.

Tensors produced inside ``If``/``Loop``/``Scan`` bodies cannot be graph outputs; asking for one is
an error (:meth:`ActivationTap.available` tells which names can be tapped).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OnnxCompressError
from ..graph import Model, constant_bytes
from ..io import stage
from ..validate import drop_mapped_pages, evict_cached, make_session, release_memory, trim_heap

# Samples per onnxruntime run in ActivationTap.iterate: tapping every activation of a whole feed
# (MiniLM, 64 calibration sentences) would hold hundreds of MB at once.
CALIBRATION_ROWS = 8
# ... fewer when one slice's tapped tensors would exceed this many bytes (MiniLM, every activation
# of 8 sentences of 38 tokens: 72 MB; int8-static then runs 2 at a time).
TAP_BYTES = 24 * 2**20
# A scratch model with more weight bytes than this keeps them in an external-data file.
EXTERNAL_BYTES = 8 * 2**20


def tappable(model: Model) -> set[str]:
    """Names of main-graph tensors that an :class:`ActivationTap` can read (not constants)."""
    names = {t.name for t in model.graph.inputs}
    for node in model.graph.nodes:
        names.update(t.name for t in node.outputs if t.name)
    return names


class ActivationTap:
    """An onnxruntime session on ``model`` that also returns the tensors ``names``.

    Use as a context manager (the scratch copy is removed on exit)::

        with ActivationTap(model, ["conv1_out"]) as tap:
            for feed in feeds:
                acts = tap.run(feed)  # {"conv1_out": array, ...}
    """

    def __init__(
        self,
        model: Model,
        names: Sequence[str],
        *,
        threads: int = 0,
        rows: int = CALIBRATION_ROWS,
        max_bytes: int = TAP_BYTES,
    ) -> None:
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in tappable(model)]
        if unknown:
            raise OnnxCompressError(f"calibration: tensor {unknown[0]!r} is not an activation of the main graph")
        self.outputs = [t.name for t in model.graph.outputs]
        self.names = wanted
        self.rows = rows if has_batch_axis(model) else 0
        self.max_bytes = max_bytes
        self._row_bytes: dict[tuple[Any, ...], int] = {}  # tapped bytes of one sample, per sample shape
        self._dir = Path(tempfile.mkdtemp(prefix="onnxcompress-calib-"))
        try:
            # Written straight from the graph, weights one at a time; the tapped tensors are added as
            # outputs without a type (onnxruntime infers it; shape inference may not know every one).
            # Over EXTERNAL_BYTES of weights, they go to an external-data file that onnxruntime maps.
            external = constant_bytes(model.graph) >= EXTERNAL_BYTES
            staged = stage(
                model, self._dir / "tap.onnx", external=external, check=False, type_check=False, extra_outputs=wanted
            )
            self._session = make_session(staged.commit(), threads=threads, arena=False)
            if external:
                evict_cached(self._dir)  # the runs map only the weight pages that they read (see release)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tapped tensors for one feed."""
        try:
            values = self._session.run(self.names, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxCompressError(f"calibration: onnxruntime failed to run the model: {first[:300]}") from None
        return dict(zip(self.names, values))

    def iterate(self, feeds: Sequence[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """``run`` over each feed in turn, a feed cut into slices of at most ``rows`` samples along its
        batch axis (when the model has one, see :func:`has_batch_axis`), fewer when the tapped
        tensors of ``rows`` samples would exceed ``max_bytes`` (see :meth:`slice_rows`): one
        slice's activations are in memory at a time, so statistics must accumulate over what this
        yields (ranges, sums)."""
        for feed in feeds:
            for part in split_feed(feed, self.slice_rows(feed)):
                yield self.run(part)
                self.release()

    def release(self) -> None:
        """Hand back what the last run left resident: freed heap pages (the slice's outputs and the
        consumer's temporaries, once it has dropped them: see :meth:`iterate`) and the pages of the
        mapped scratch weights that the run faulted in, evicted from the page cache as well
        (:func:`~onnxcompress.validate.drop_mapped_pages`, :func:`~onnxcompress.validate.evict_cached`;
        MiniLM: the embedding table's pages grew to 45 MB over 8 slices, now 2-3 MB per slice)."""
        trim_heap()
        drop_mapped_pages(self._dir, evict=True)

    def slice_rows(self, feed: dict[str, np.ndarray]) -> int:
        """Samples per run for ``feed``: ``rows``, or fewer so that one run's tapped tensors stay
        within ``max_bytes`` (measured on the feed's first sample, run once more on its own)."""
        if self.rows <= 1 or self.max_bytes <= 0:
            return self.rows
        probe = next(split_feed(feed, 1))
        if probe is feed:  # not splittable (or a single sample): run whole
            return self.rows
        key = tuple((k, v.shape[1:], v.dtype.str) for k, v in feed.items())  # feeds of one sample shape
        if key not in self._row_bytes:
            self._row_bytes[key] = sum(np.asarray(v).nbytes for v in self.run(probe).values())
        return max(1, min(self.rows, self.max_bytes // max(self._row_bytes[key], 1)))

    def close(self) -> None:
        """Drop the session and the scratch copy, and hand the freed memory back (see
        :func:`~onnxcompress.validate.release_memory`)."""
        self._session = None
        shutil.rmtree(self._dir, ignore_errors=True)
        release_memory()

    def __enter__(self) -> ActivationTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def require_calibration(feeds: list[dict[str, np.ndarray]] | None, technique: str) -> list[dict[str, np.ndarray]]:
    """The calibration feeds, or a clear error naming how to provide them."""
    if not feeds:
        raise OnnxCompressError(
            f"{technique} needs calibration data: pass --calibration DATA (a .npz of named inputs or a folder "
            "of them) or put <model>.calibration.npz beside the model"
        )
    return feeds


def has_batch_axis(model: Model) -> bool:
    """Whether every graph input has a dynamic leading dimension (a batch axis the feeds can be split on)."""
    inputs = list(model.graph.inputs)
    if not inputs:
        return False
    for t in inputs:
        shape = getattr(t, "shape", None)
        if not shape or isinstance(shape[0], int) and shape[0] > 0:
            return False
    return True


def split_feed(feed: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """``feed`` cut into slices of ``rows`` samples along axis 0 when all inputs share that axis' size
    (one slice, the feed itself, otherwise or when ``rows <= 0``)."""
    arrays = list(feed.values())
    n = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
    if rows <= 0 or n <= rows or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        yield feed
        return
    for r0 in range(0, n, rows):
        yield {k: v[r0 : r0 + rows] for k, v in feed.items()}
