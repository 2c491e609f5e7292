"""Compare an original and a candidate model in onnxruntime on the same feeds.

Per output, over all feeds (``a`` = original, ``b`` = candidate, ``d = b - a``):

* ``max_abs = max|d|``, ``mean_abs = mean|d|``;
* ``max_rel = max |d| / max(|a|, 1e-3 * max|a|)`` (the floor keeps near-zero references from
  dominating);
* ``cosine``: the **worst sample's** cosine similarity, a sample being one row along axis 0 of an
  output of rank >= 2 (one sentence, one image) or one whole output otherwise; ``cosine_mean`` is the
  mean over samples and ``worst_sample`` the index of the worst one;
* ``snr_db = 10 log10(sum a^2 / sum d^2)``, capped at 300 dB for identical outputs;
* ``top1_agreement``: for float outputs of rank >= 2, the fraction of positions whose argmax over the
  last axis agrees;
* non-float outputs: ``equal_fraction`` (and ``max_abs`` for integers).

With labels, ``accuracy`` of both models (argmax over the last axis of the label output) and
``accuracy_drop`` (original - candidate) are reported.

**Running.** The two models run one after the other, each session dropped before the next is
opened, so one model's weights and activations are in memory at a time. A feed of many samples runs
in slices of ``VALIDATION_ROWS`` along the batch axis when the original has at least
``SLICE_MIN_BYTES`` and the model declares a batch axis (every input and output shares one symbolic
first dimension that does not read as a sequence axis, see ``batch_rows``); the slices' outputs are
concatenated, so the metrics are those of the whole feed, and memory stays bounded whatever the
number of samples. Graphs with dynamic quantization (``DynamicQuantizeLinear``, onnxruntime's
``DynamicQuantizeMatMul``) are sliced too: their per-tensor activation scale is then computed per
run of ``VALIDATION_ROWS`` samples, as a deployment running batches of that size computes it
(MiniLM int8-dynamic, worst sentence cosine 0.99439 in one batch of 53, 0.99447 in slices of 8).
Between the slices of a run the heap is trimmed and the pages of mapped external-data weights that
the run read are unmapped (``drop_mapped_pages``; a scratch copy is kept out of the page cache too,
``evict_cached``), so the pages of an embedding table read a few rows at a time do not pile up.
For such an original both sessions are also opened without onnxruntime's constant folding
and layout optimisations (``make_session(..., fold=False)``; small models keep the defaults, which
run convolutions faster): the candidate's compressed weights are dequantized at each run
instead of being kept in float32 beside the compressed copy (up to 4x the compressed bytes), and the
original gets the same settings so that both run the same kernels. A large inline original runs from
an external-data copy written beside the candidate (``EXTERNAL_COPY_BYTES``; onnxruntime holds an
inline model's weights twice while it opens it).

**Output parts.** When a graph output is produced by a ``Concat`` (directly or through ``Identity``,
``Transpose``, ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``), e.g. a detector head
``Concat(boxes in pixels, sigmoid scores)``, the whole-output cosine is dominated by the large part and
hides a collapse of the small one. Each concatenated part is then compared on its own
(``OutputDiff.parts[i]``: the producing tensor's name, the part's ``slice`` of the output, the same
metrics) and every output tolerance is checked on each part too, so the output passes only if its
worst part does. The parts are found in the *original* model's graph (read without its weights);
the concat inputs' sizes come from ONNX shape inference with the feed's input shapes (or, when that
cannot tell, one extra run of the original on the first feed of that input shape); the part
positions are then traced through the chain by relabelling (``Transpose`` permutes, the other ops
keep row-major order). ``compare(..., parts=False)`` turns this off.

Tolerances are strings ``[output:]metric OP value`` with OP in ``>= <= > <``, e.g. ``cosine>=0.999``,
``top1>=0.99``, ``max_abs<=1e-3``, ``logits:snr_db>=30``, ``accuracy_drop<=0.005``. Each is checked on
every output where the metric applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import operator
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import OnnxCompressError
from .io import trim_heap as _io_trim_heap

SNR_CAP = 300.0
_M = TypeVar("_M", bound="Metrics")
METRIC_ALIASES = {
    "top1": "top1_agreement",
    "snr": "snr_db",
    "cos": "cosine",
    "acc_drop": "accuracy_drop",
    "max_abs_diff": "max_abs",
}
OUTPUT_METRICS = {
    "max_abs",
    "mean_abs",
    "max_rel",
    "cosine",
    "cosine_mean",
    "snr_db",
    "top1_agreement",
    "equal_fraction",
}
MODEL_METRICS = {"accuracy_drop", "accuracy"}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_TOL_RE = re.compile(
    r"^\s*(?:(?P<output>[^:<>=]+):)?\s*(?P<metric>[A-Za-z_0-9]+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>\S+)\s*$"
)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """One bound: ``metric op value``, optionally on a single output."""

    metric: str
    op: str
    value: float
    output: str | None = None

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """Parse ``[output:]metric OP value``.

        Raises:
            OnnxCompressError: for malformed text or an unknown metric.
        """
        m = _TOL_RE.match(text)
        if not m:
            raise OnnxCompressError(f"bad tolerance {text!r}: use e.g. cosine>=0.999, top1>=0.99 or max_abs<=1e-3")
        metric = METRIC_ALIASES.get(m["metric"].lower(), m["metric"].lower())
        if metric not in OUTPUT_METRICS | MODEL_METRICS:
            known = ", ".join(sorted(OUTPUT_METRICS | MODEL_METRICS | set(METRIC_ALIASES)))
            raise OnnxCompressError(f"bad tolerance {text!r}: unknown metric {m['metric']!r} (known: {known})")
        try:
            value = float(m["value"])
        except ValueError:
            raise OnnxCompressError(f"bad tolerance {text!r}: {m['value']!r} is not a number") from None
        if math.isnan(value):
            raise OnnxCompressError(f"bad tolerance {text!r}: the bound is NaN")
        return cls(metric, m["op"], value, m["output"].strip() if m["output"] else None)

    def __str__(self) -> str:
        prefix = f"{self.output}:" if self.output else ""
        return f"{prefix}{self.metric}{self.op}{self.value:.12g}"  # cosine>=0.9999999 must not print as >=1

    def holds(self, value: float) -> bool:
        """Whether ``value`` satisfies this bound (NaN never does)."""
        return not math.isnan(value) and _OPS[self.op](value, self.value)


@dataclasses.dataclass
class Metrics:
    """Differences on one output (or one part of it); ``None`` where a metric does not apply."""

    name: str
    shape: list[int]
    dtype: str
    max_abs: float | None = None
    mean_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    cosine_mean: float | None = None
    worst_sample: int | None = None
    snr_db: float | None = None
    top1_agreement: float | None = None
    equal_fraction: float | None = None
    nonfinite_mismatch: int = 0
    passed: bool = True
    failures: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed


@dataclasses.dataclass
class PartDiff(Metrics):
    """One concatenated part of an output: ``tensor`` (the Concat input producing it) and ``slice``.

    ``slice`` is numpy-style in the output's coordinates, e.g. ``[:, :, 4:84]``; a part that is not a
    box of the output (a Reshape interleaved it) is described as ``mask of N elements``. ``shape``
    is the part's own shape (per feed, the first feed's).
    """

    index: int = 0
    tensor: str = ""
    slice: str = ""


@dataclasses.dataclass
class OutputDiff(Metrics):
    """Differences on one output, and on each concatenated part of it (see the module docstring).

    ``parts_note`` says why an output produced by a Concat has no ``parts`` (e.g. unknown sizes).
    """

    parts: list[PartDiff] = dataclasses.field(default_factory=list)
    parts_note: str | None = None


@dataclasses.dataclass
class ValidationReport:
    """The comparison of two models over a set of feeds."""

    passed: bool
    outputs: dict[str, OutputDiff]
    tolerances: list[str]
    num_feeds: int
    num_samples: int
    feeds_source: str = "generated"
    accuracy: dict[str, float] | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with finite floats (non-finite become null)."""
        return _clean(dataclasses.asdict(self))


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return round(f, 8) if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- metrics


def _cosines(refs: list[np.ndarray], cands: list[np.ndarray]) -> np.ndarray:
    out = []
    for a_full, b_full in zip(refs, cands):
        if a_full.ndim >= 2 and a_full.shape[0] > 0:
            a = a_full.reshape(a_full.shape[0], -1).astype(np.float64)
            b = b_full.reshape(b_full.shape[0], -1).astype(np.float64)
        else:
            a = a_full.reshape(1, -1).astype(np.float64)
            b = b_full.reshape(1, -1).astype(np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        dot = np.einsum("ij,ij->i", a, b)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = dot / (na * nb)
        both_zero = (na == 0) & (nb == 0)
        cos = np.where(both_zero, 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
        out.append(np.clip(cos, -1.0, 1.0))
    return np.concatenate(out) if out else np.zeros(0)


def output_diff(name: str, refs: list[np.ndarray], cands: list[np.ndarray]) -> OutputDiff:
    """Metrics for one output over all feeds (see module docstring)."""
    ref0 = refs[0]
    return _fill(OutputDiff(name=name, shape=list(ref0.shape), dtype=str(ref0.dtype)), refs, cands)


def _fill(diff: _M, refs: list[np.ndarray], cands: list[np.ndarray]) -> _M:
    """Compute the metrics of ``refs`` vs ``cands`` into ``diff``."""
    ref0 = refs[0]
    for a, b in zip(refs, cands):
        if a.shape != b.shape:
            diff.passed = False
            diff.failures.append(f"shape {list(b.shape)} differs from the original's {list(a.shape)}")
            return diff
        if a.dtype != b.dtype:
            diff.passed = False
            diff.failures.append(f"dtype {b.dtype} differs from the original's {a.dtype}")
            return diff
    if ref0.dtype.kind not in "fiub":
        eq = [np.array_equal(a, b) for a, b in zip(refs, cands)]
        diff.equal_fraction = float(np.mean(eq)) if eq else 1.0
        return diff
    a = np.concatenate([r.reshape(-1) for r in refs]).astype(np.float64)
    b = np.concatenate([c.reshape(-1) for c in cands]).astype(np.float64)
    if ref0.dtype.kind in "iub":
        diff.equal_fraction = float(np.mean(a == b)) if a.size else 1.0
        diff.max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
        diff.mean_abs = float(np.mean(np.abs(a - b))) if a.size else 0.0
        return diff
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    # Same non-finite values in the same places are agreement; anything else is a mismatch.
    same_nonfinite = ~finite_a & ~finite_b & ((a == b) | (np.isnan(a) & np.isnan(b)))
    diff.nonfinite_mismatch = int(np.sum((~finite_a | ~finite_b) & ~same_nonfinite))
    mask = finite_a & finite_b
    a_f, b_f = a[mask], b[mask]
    d = np.abs(b_f - a_f)
    if d.size:
        diff.max_abs = float(d.max())
        diff.mean_abs = float(d.mean())
        floor = max(1e-3 * float(np.abs(a_f).max()), np.finfo(np.float32).tiny)
        diff.max_rel = float(np.max(d / np.maximum(np.abs(a_f), floor)))
        signal, noise = float(np.sum(a_f**2)), float(np.sum(d**2))
        diff.snr_db = SNR_CAP if noise == 0 else float(min(SNR_CAP, 10 * np.log10(max(signal, 1e-300) / noise)))
    else:
        diff.max_abs = diff.mean_abs = diff.max_rel = 0.0
        diff.snr_db = SNR_CAP
    clean = [np.where(np.isfinite(r), r, 0.0) for r in refs]
    clean_c = [np.where(np.isfinite(c), c, 0.0) for c in cands]
    cos = _cosines(clean, clean_c)
    if cos.size:
        diff.cosine = float(cos.min())
        diff.cosine_mean = float(cos.mean())
        diff.worst_sample = int(cos.argmin())
    if ref0.ndim >= 2 and ref0.shape[-1] > 1:
        agree = [np.argmax(r, axis=-1) == np.argmax(c, axis=-1) for r, c in zip(refs, cands)]
        flat = np.concatenate([x.reshape(-1) for x in agree])
        diff.top1_agreement = float(flat.mean()) if flat.size else 1.0
    return diff


# --------------------------------------------------------------------------- output parts

PART_CHAIN_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclasses.dataclass
class _Part:
    """Where one concatenated part sits in an output: a box (``index``) or a boolean ``mask``."""

    tensor: str
    index: tuple[slice, ...] | None
    mask: np.ndarray | None
    text: str


@dataclasses.dataclass
class _Chain:
    """An output produced by ``concat`` through ``chain`` (from the Concat towards the output)."""

    output: str
    concat: Any  # onnx.NodeProto
    chain: list[Any]


def _concat_chains(proto: Any) -> dict[str, _Chain]:
    """``{output: chain}`` for every main-graph output produced by a standard-domain Concat of >= 2 inputs."""
    graph = proto.graph
    producer = {o: node for node in graph.node for o in node.output if o}
    found: dict[str, _Chain] = {}
    for out in graph.output:
        name, chain = out.name, []
        node = producer.get(name)
        while node is not None and node.domain in ("", "ai.onnx") and node.op_type in PART_CHAIN_OPS:
            chain.append(node)
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.domain in ("", "ai.onnx") and node.op_type == "Concat" and len(node.input) >= 2:
            found[name] = _Chain(name, node, chain[::-1])
    return found


def _concat_axis(node: Any) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 0


def _perm(node: Any, rank: int) -> list[int]:
    for a in node.attribute:
        if a.name == "perm":
            return [int(p) for p in a.ints]
    return list(range(rank))[::-1]


def _inferred_shapes(proto: Any, feed: dict[str, np.ndarray], names: set[str]) -> dict[str, list[int]]:
    """Concrete shapes of ``names`` by ONNX shape inference with the feed's input shapes (where known)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for inp in model.graph.input:
        if inp.name in feed and inp.type.HasField("tensor_type"):
            dims = inp.type.tensor_type.shape
            del dims.dim[:]
            for d in np.shape(feed[inp.name]):
                dims.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference raises on models it cannot handle; then nothing is known
        return {}
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.name not in names or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [int(d.dim_value) for d in dims]
    return shapes


def _tapped_shapes(path: Path, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, list[int]]:
    """Shapes of ``names`` from one run of the original with them added as outputs (models < 2 GB)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    if model.ByteSize() > 2**31 - 2**24:
        return {}
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    del model
    values = session.run(names, feed)
    return {n: list(v.shape) for n, v in zip(names, values)}


def _box_text(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    items = [":" if (s.start, s.stop) == (0, n) else f"{s.start}:{s.stop}" for s, n in zip(index, shape)]
    return "[" + ", ".join(items) + "]"


def _locate_parts(chain: _Chain, in_shapes: list[list[int]], out_shape: tuple[int, ...]) -> list[_Part] | str:
    """Trace each Concat input's positions to the output by relabelling; a reason string on failure."""
    rank = len(in_shapes[0])
    axis = _concat_axis(chain.concat)
    axis = axis + rank if axis < 0 else axis
    if any(len(s) != rank for s in in_shapes) or not 0 <= axis < rank:
        return "the Concat inputs' ranks do not match"
    labels = np.concatenate([np.full(s, i, dtype=np.int32) for i, s in enumerate(in_shapes)], axis=axis)
    # Shapes of every tensor after the Concat, backwards from the output's (Transpose: inverse perm).
    shapes: list[tuple[int, ...] | None] = [None] * len(chain.chain)
    known: tuple[int, ...] | None = tuple(out_shape)
    for k in range(len(chain.chain) - 1, -1, -1):
        shapes[k] = known
        node = chain.chain[k]
        if node.op_type == "Transpose" and known is not None:
            perm = _perm(node, len(known))
            before = [0] * len(known)
            for i, p in enumerate(perm):
                before[p] = known[i]
            known = tuple(before)
        elif node.op_type != "Identity":
            known = None
    for node, shape in zip(chain.chain, shapes):
        if node.op_type == "Transpose":
            perm = _perm(node, labels.ndim)
            if sorted(perm) != list(range(labels.ndim)):
                return f"Transpose {node.name!r} has a perm that does not fit"
            labels = np.transpose(labels, perm)
        elif node.op_type != "Identity":
            if shape is None or int(np.prod(shape)) != labels.size:
                return f"cannot trace the parts through {node.op_type} {node.name!r}"
            labels = labels.reshape(shape)
    if labels.shape != tuple(out_shape):
        return "the traced parts do not have the output's shape"
    parts = []
    for i, tensor in enumerate(chain.concat.input):
        mask = labels == i
        count = int(mask.sum())
        if count == 0:
            parts.append(_Part(tensor, tuple(slice(0, 0) for _ in out_shape), None, "empty"))
            continue
        nz = np.nonzero(mask)
        index = tuple(slice(int(x.min()), int(x.max()) + 1) for x in nz)
        if int(np.prod([s.stop - s.start for s in index])) == count:
            parts.append(_Part(tensor, index, None, _box_text(index, tuple(out_shape))))
        else:
            parts.append(_Part(tensor, None, mask, f"mask of {count} elements"))
    return parts


def _drop_weights(proto: Any, keep_bytes: int = 4096) -> None:
    """Replace the data of the main graph's large initializers by an external-data declaration: the
    part finder needs the graph and the shapes, not the weights (shape inference reads only dims)."""
    import onnx

    for t in proto.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > keep_bytes:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value="__onnxcompress_dropped__")


class _PartFinder:
    """Finds the concatenated parts of the original's outputs, once per distinct input shape."""

    def __init__(self, original: Path) -> None:
        import onnx

        self.path = original
        self.proto = onnx.load(str(original), load_external_data=False)
        _drop_weights(self.proto)
        self.chains = _concat_chains(self.proto)
        self._cache: dict[tuple[Any, ...], dict[str, list[_Part] | str]] = {}

    def parts(
        self, feed: dict[str, np.ndarray], out_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, list[_Part] | str]:
        key = (
            tuple(sorted((k, np.shape(v)) for k, v in feed.items())),
            tuple(sorted((k, tuple(v)) for k, v in out_shapes.items() if k in self.chains)),
        )
        if key not in self._cache:
            self._cache[key] = self._find(feed, out_shapes)
        return self._cache[key]

    def _find(
        self, feed: dict[str, np.ndarray], out_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, list[_Part] | str]:
        wanted = {n for c in self.chains.values() for n in c.concat.input}
        shapes = _inferred_shapes(self.proto, feed, wanted)
        missing = sorted(wanted - set(shapes))
        if missing:
            try:
                shapes.update(_tapped_shapes(self.path, feed, missing))
            except Exception as exc:  # onnxruntime raises its own exception types
                note = f"part sizes unknown ({_first_line(exc)})"
                return {name: note for name in self.chains}
        result: dict[str, list[_Part] | str] = {}
        for name, chain in self.chains.items():
            if name not in out_shapes:
                continue
            in_shapes = [shapes.get(t) for t in chain.concat.input]
            if any(s is None for s in in_shapes):
                result[name] = "the sizes of the Concat inputs are unknown"
                continue
            result[name] = _locate_parts(chain, in_shapes, out_shapes[name])  # type: ignore[arg-type]
        return result


def _part_values(part: _Part, value: np.ndarray) -> np.ndarray:
    if part.index is not None:
        return value[part.index]
    assert part.mask is not None
    if value.ndim >= 2 and np.array_equal(part.mask, np.broadcast_to(part.mask[:1], part.mask.shape)):
        return value.reshape(value.shape[0], -1)[:, part.mask[0].reshape(-1)]
    return value[part.mask]


def _add_parts(
    outputs: dict[str, OutputDiff],
    finder: _PartFinder,
    feeds: list[dict[str, np.ndarray]],
    ref: dict[str, list[np.ndarray]],
    cand: dict[str, list[np.ndarray]],
) -> None:
    """Fill ``parts`` of every output produced by a Concat (see the module docstring)."""
    for name in finder.chains:
        diff = outputs.get(name)
        if diff is None or diff.failures or ref[name][0].dtype.kind not in "fc":
            continue
        per_part: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        plan0: list[_Part] | None = None
        for f, feed in enumerate(feeds):
            found = finder.parts(feed, {n: ref[n][f].shape for n in ref})
            plan = found.get(name, "no parts")
            if isinstance(plan, str):
                diff.parts_note = plan
                per_part = {}
                break
            plan0 = plan0 or plan
            for i, part in enumerate(plan):
                refs, cands = per_part.setdefault(i, ([], []))
                refs.append(_part_values(part, ref[name][f]))
                cands.append(_part_values(part, cand[name][f]))
        if plan0 is None or not per_part:
            continue
        for i, part in enumerate(plan0):
            refs, cands = per_part[i]
            if refs[0].size == 0:
                continue
            pd = PartDiff(
                name=f"{name}[{i}]",
                shape=list(refs[0].shape),
                dtype=str(refs[0].dtype),
                index=i,
                tensor=part.tensor,
                slice=part.text,
            )
            diff.parts.append(_fill(pd, refs, cands))


def _accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    preds = np.concatenate([np.argmax(o, axis=-1).reshape(-1) for o in outputs])
    if preds.size != labels.size:
        raise OnnxCompressError(
            f"labels: {labels.size} labels but the model gives {preds.size} predictions on the inputs"
        )
    return float(np.mean(preds == labels))


# --------------------------------------------------------------------------- running


def make_session(path: str | Path, threads: int = 0, fold: bool = True, arena: bool = True) -> Any:
    """An onnxruntime CPU session opened from a file path.

    Args:
        path: The model file.
        threads: Intra-op threads (0: ``ONNXCOMPRESS_THREADS`` or onnxruntime's default).
        fold: Let onnxruntime fold constant subgraphs and apply its layout optimisations at load
            (its default, ``ORT_ENABLE_ALL``). Without (``ORT_ENABLE_EXTENDED`` less
            ``ConstantFolding``), a compressed weight's ``DequantizeLinear``/``Cast`` runs at each
            call instead of being kept in float32 beside the compressed copy: the same values, a
            fraction of the memory (MiniLM int8-weights: +40 MB instead of +190 MB at load; float16
            weights are expanded by the layout level too). If the model cannot be loaded that way,
            it is loaded with the defaults.
        arena: Keep onnxruntime's CPU memory arena. Without, a run's buffers go back when it ends and
            outputs handed to numpy do not pin arena chunks (calibration taps: MiniLM -30 MB).

    The intra-op threads do not spin between operators (``session.intra_op.allow_spinning=0``): a
    spinning pool keeps the cores busy while Python slices and concatenates the feeds between runs,
    and on a shared or busy machine it competes with the other work for the cores (MiniLM, 7 runs
    of 8 sentences, 2 threads, a loaded 2-core machine: 1.2 s instead of 1.8 s; the same outputs).

    Raises:
        OnnxCompressError: with onnxruntime's first line when the model cannot be run.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors are raised as exceptions; keep stderr to one line
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not threads:  # the batch runner gives each worker its share of the cores
        with contextlib.suppress(ValueError):
            threads = max(0, int(os.environ.get("ONNXCOMPRESS_THREADS", "0") or 0))
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    if not fold:
        lean = ort.SessionOptions()
        lean.log_severity_level = 4
        lean.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        lean.enable_cpu_mem_arena = False  # a run's buffers go back when it ends (MiniLM fp16: -24 MB)
        lean.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            lean.intra_op_num_threads = threads
        try:
            return ort.InferenceSession(
                str(path),
                sess_options=lean,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=["ConstantFolding"],
            )
        except Exception:  # onnxruntime raises its own exception types; retried with folding below
            pass
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxCompressError(f"onnxruntime cannot load {Path(path).name}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", line)[:400]
    return type(exc).__name__


# Samples per onnxruntime run in ``compare``: a feed of many samples is run in slices of this many
# rows along its batch axis (see ``batch_rows``), so the activations in memory are those of a few
# samples, not of the whole feed (MiniLM, 53 sentences: 150 MB of activations whole, 40 MB by 8).
VALIDATION_ROWS = 8
_NOT_BATCH = re.compile(r"seq|len|time|token|step|frame|word|char|width|height", re.IGNORECASE)


def batch_rows(session: Any, rows: int = VALIDATION_ROWS) -> int:
    """``rows`` when ``session``'s model declares a batch axis, else 0 (run feeds whole).

    A batch axis: every input and every output has rank >= 1 and the same *symbolic* first
    dimension, whose name does not read as a sequence or spatial axis (``seq``, ``len``, ``time``,
    ...): the first axis then flows from the inputs to the outputs sample by sample.
    """
    try:
        dims = [t.shape[0] if t.shape else None for t in [*session.get_inputs(), *session.get_outputs()]]
    except Exception:  # onnxruntime raises its own exception types on odd metadata
        return 0
    if not dims or not isinstance(dims[0], str) or any(d != dims[0] for d in dims):
        return 0
    return 0 if _NOT_BATCH.search(dims[0]) else max(0, int(rows))


# Feeds of an original smaller than this run whole: small models have small activations, and many
# short runs cost more than they save.
SLICE_MIN_BYTES = 8 * 2**20


def _rows_for(session: Any, original: str | Path) -> int:
    """Samples per run for ``session`` (0: whole feeds): ``VALIDATION_ROWS`` along a batch axis when
    the original is large (:func:`_is_large`). Graphs with dynamic quantization are sliced as well (a
    run's activation scale then covers the samples of one slice, see the module docstring): memory
    must stay bounded for any number of samples."""
    return batch_rows(session) if _is_large(original) else 0


def _run_feed(
    session: Any,
    names: list[str],
    feed: dict[str, np.ndarray],
    rows: int,
    between: Callable[[], object] | None = None,
) -> list[Any]:
    """One feed's outputs, computed in slices of ``rows`` samples when every input shares the first
    axis (and every output comes back with that axis); the slices' outputs are concatenated.
    ``between`` is called after each slice's run (see :func:`run_session`)."""
    arrays = list(feed.values())
    n = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
    if rows <= 0 or n <= rows or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        return session.run(names, feed)
    pieces: list[list[Any]] = []
    for r0 in range(0, n, rows):
        outs = session.run(names, {k: v[r0 : r0 + rows] for k, v in feed.items()})
        m = min(rows, n - r0)
        if any(np.ndim(o) == 0 or np.shape(o)[0] != m for o in outs):
            del pieces, outs
            return session.run(names, feed)  # an output without the batch axis: run the feed whole
        pieces.append(outs)
        del outs
        if between is not None:
            between()
    return [np.concatenate([p[i] for p in pieces]) for i in range(len(names))]


def run_session(
    session: Any,
    feeds: list[dict[str, np.ndarray]],
    label: str,
    rows: int = 0,
    between: Callable[[], object] | None = None,
) -> dict[str, list[np.ndarray]]:
    """Run every feed; return ``{output name: [array per feed]}``.

    Args:
        session: An onnxruntime session (see :func:`make_session`).
        feeds: The inputs, one dict per run.
        label: Names the model in errors (``original``, ``candidate``).
        rows: If > 0, run each feed in slices of this many samples along the shared first axis and
            concatenate the outputs (see :func:`batch_rows`); 0 runs each feed whole.
        between: Called after each run of a slice, before the next (``compare`` hands back the
            memory that the run left resident: see :func:`_release_runs`).
    """
    names = [o.name for o in session.get_outputs()]
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, feed in enumerate(feeds):
        try:
            outs = _run_feed(session, names, feed, rows, between)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise OnnxCompressError(
                f"onnxruntime failed to run the {label} model on feed {i}: {_first_line(exc)}"
            ) from None
        for n, o in zip(names, outs):
            results[n].append(np.asarray(o))
    return results


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (:func:`trim_heap`), so that
    memory freed by one stage (a graph, a session) is not counted again under the next one."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc ``malloc_trim``; a no-op elsewhere;
    :func:`onnxcompress.io.trim_heap`).

    onnxruntime's outputs and numpy temporaries of a few MB are carved from the heap once glibc's
    dynamic mmap threshold has risen; freed, they stay resident between live blocks. Trimming after
    each calibration slice keeps that from accumulating (MiniLM, int8-dynamic: -45 MB).
    """
    _io_trim_heap()


# Mapped weights of at least this many resident bytes are handed back by drop_mapped_pages.
DROP_MIN_BYTES = 1 << 20


def drop_mapped_pages(folder: str | Path, evict: bool = False) -> int:
    """Unmap the resident pages of the files under ``folder`` that onnxruntime mapped (external-data
    weights), and return how many bytes were resident; a no-op (0) where ``/proc/self/smaps`` or
    ``madvise`` is missing. ``evict``: then also drop the files' pages from the page cache
    (:func:`evict_cached`; for scratch copies only).

    onnxruntime maps a model's external-data weights (privately) and reads them in place. A
    ``Gather`` on an embedding table faults in the pages around every row it reads, so over the runs
    of a calibration or a validation most of the table becomes resident (MiniLM: 45 MB of 47).
    ``MADV_DONTNEED`` hands those pages back; a later read faults them in again from the file's
    page cache, with the same bytes. Only mappings with no copy-on-write page (``Anonymous: 0 kB``:
    nothing was written to them; a page of a file written moments ago counts as ``Private_Dirty``
    until the kernel writes it back, yet it is the file's own page) and at least ``DROP_MIN_BYTES``
    resident are touched, so no value can change. Call it between runs (not while one is running).
    """
    global _MADVISE
    prefix = os.path.join(str(Path(folder).resolve()), "")  # the folder's files, not /a/bc for /a/b
    if _MADVISE is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _MADVISE = libc.madvise
        except (OSError, AttributeError):
            _MADVISE = False
    if not _MADVISE:
        return 0
    try:
        with open("/proc/self/maps") as f:  # cheap: look for the folder's mappings first
            heads = [line for line in f.read().splitlines() if f" {prefix}" in line]
        big = {h.split(" ", 1)[0] for h in heads if _span(h) >= DROP_MIN_BYTES}
        if not big:
            return 0
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return 0
    dropped = 0
    for span in big:
        at = text.find(f"\n{span} ") + 1  # its block: the header line, then one "Key: value" per line
        if not at and not text.startswith(f"{span} "):
            continue
        stop = _NEXT_MAPPING.search(text, text.find("\n", at) + 1)
        kb = {}
        for line in text[at : stop.start() if stop else len(text)].splitlines()[1:]:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous") and rest.split():
                kb[key] = int(rest.split()[0]) * 1024
        if kb.get("Rss", 0) < DROP_MIN_BYTES or kb.get("Anonymous", 1):
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        if _MADVISE(lo, hi - lo, MADV_DONTNEED) == 0:
            dropped += kb["Rss"]
    if evict and dropped:
        evict_cached(folder)
    return dropped


def evict_cached(folder: str | Path) -> None:
    """Drop the page-cache pages of the files in ``folder`` (written back first; ``posix_fadvise``
    ``DONTNEED``; a no-op where it is missing). For scratch copies that onnxruntime maps.

    A fault on a mapped file maps not only the page it needs but every neighbour already in the page
    cache (fault-around, large folios): with a freshly written copy, all of it. MiniLM's embedding
    table, 8 calibration sentences: 15-23 MB of pages per run from the cache, 2-3 MB once the copy
    is evicted (each fault then reads what it needs from the file). Costs a write-back of the copy
    (MiniLM: about 15 ms) and the reads.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        files = [p for p in Path(folder).iterdir() if p.is_file()]
    except OSError:
        return
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _span(head: str) -> int:
    """Bytes of the mapping on one ``/proc/self/maps`` line."""
    lo, _, hi = head.split(" ", 1)[0].partition("-")
    return int(hi, 16) - int(lo, 16)


_NEXT_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ", re.MULTILINE)


MADV_DONTNEED = 4
_MADVISE: Any = None


# An original with more inline weight bytes than this is run from a scratch copy with external data.
EXTERNAL_COPY_BYTES = 32 * 2**20


@contextlib.contextmanager
def _session_path(path: str | Path, scratch: str | Path | None) -> Iterator[Path]:
    """``path``, or a copy of it in ``scratch`` with its weights in an external-data file.

    onnxruntime loads an inline model by parsing the whole protobuf and then copying every weight
    out of it (about twice the weights' bytes while the session opens); from external data it reads
    (or maps) each weight once. The copy streams the weights file to file (see ``io.stage``).
    """
    path = Path(path)
    if scratch is None or not path.is_file() or path.stat().st_size < EXTERNAL_COPY_BYTES:
        yield path
        return
    from . import io

    tmp: Path | None = None
    try:
        model = io.load(path)
        if model.external_data:
            del model
            yield path
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{os.getpid()}-validate-", dir=scratch))
        copy = io.stage(model, tmp / path.name, external=True, check=False, protect=(path,)).commit()
        del model
    except (OnnxCompressError, OSError):
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        yield path  # the copy is an optimisation: run the file itself
        return
    try:
        yield copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_large(original: str | Path) -> bool:
    """Whether the original has at least ``SLICE_MIN_BYTES``: then feeds are sliced and sessions lean."""
    try:
        return Path(original).stat().st_size >= SLICE_MIN_BYTES
    except OSError:
        return True


def _release_runs(path: str | Path, scratch: bool = False) -> Callable[[], None]:
    """What to call between the sliced runs of a session on the model at ``path``: the heap pages
    that a run freed (:func:`trim_heap`; onnxruntime's worker threads allocate from their own glibc
    arenas, which grow run after run) and the pages of the model's mapped external-data weights that
    it faulted in (:func:`drop_mapped_pages`: an embedding table's pages, a few rows at a time,
    would all become resident), evicted from the page cache too for a ``scratch`` copy (ours: see
    :func:`evict_cached`)."""
    folder = Path(path).parent

    def release() -> None:
        trim_heap()
        drop_mapped_pages(folder, evict=scratch)

    return release


def _run_model(
    path: str | Path, feeds: list[dict[str, np.ndarray]], label: str, scratch: str | Path | None = None
) -> dict[str, list[np.ndarray]]:
    """Open a session on ``path``, run the feeds (sliced along a batch axis) and drop the session, so
    that only one model's weights and activations are in memory at a time. With ``scratch`` (a
    writable folder), a large inline model runs from an external-data copy written there."""
    with _session_path(path, scratch) as run_path:
        session = make_session(run_path, fold=not _is_large(path))  # as the candidate's: the same kernels
        copy = Path(run_path) != Path(path)
        if copy:
            evict_cached(Path(run_path).parent)  # faults then map what they read, not the cached neighbours
        try:
            rows = _rows_for(session, path)
            return run_session(session, feeds, label, rows=rows, between=_release_runs(run_path, scratch=copy))
        finally:
            del session
            release_memory()


def compare(
    original: str | Path,
    candidate: str | Path,
    feeds: list[dict[str, np.ndarray]],
    tolerances: list[str] | list[Tolerance],
    *,
    labels: np.ndarray | None = None,
    label_output: str | None = None,
    feeds_source: str = "generated",
    reference: dict[str, list[np.ndarray]] | None = None,
    parts: bool = True,
    on_outputs: Callable[[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]], None] | None = None,
    candidate_runner: Callable[[list[dict[str, np.ndarray]]], dict[str, list[np.ndarray]]] | None = None,
) -> ValidationReport:
    """Run both models on ``feeds`` and check ``tolerances`` (see module docstring).

    Args:
        original: Path of the reference model.
        candidate: Path of the model under test.
        feeds: The inputs, one dict per run.
        tolerances: Bounds to check; strings are parsed with :meth:`Tolerance.parse`.
        labels: Integer labels for the accuracy of ``label_output`` (default: the first output).
        label_output: Which output holds the class scores.
        feeds_source: Where the feeds came from, for the report.
        reference: The original's outputs when already computed (skips running the original).
        parts: Also compare each concatenated part of outputs produced by a Concat, and gate the
            tolerances on the worst part (see the module docstring).
        on_outputs: Called once with both models' outputs ``(original's, candidate's)``, each
            ``{output name: [array per feed]}`` (e.g. for the HTML report's error histograms).
        candidate_runner: Computes the candidate's outputs ``{name: [array per feed]}`` instead of an
            onnxruntime session on ``candidate`` (a split model's ``SplitModel.run_many``).
    """
    import time

    start = time.perf_counter()
    tols = [t if isinstance(t, Tolerance) else Tolerance.parse(t) for t in tolerances]
    scratch = Path(candidate).parent if candidate_runner is None else None  # beside the candidate: writable
    ref = reference if reference is not None else _run_model(original, feeds, "original", scratch)
    try:
        if candidate_runner is not None:
            cand = candidate_runner(feeds)
            cand_names = list(cand)
        else:
            # Large models: no constant folding, the compressed weights are not materialised in float32.
            cand_session = make_session(candidate, fold=not _is_large(original))
            cand_names = [o.name for o in cand_session.get_outputs()]
        if cand_names != list(ref):
            raise OnnxCompressError(f"the models' outputs differ: original {list(ref)}, candidate {cand_names}")
        if candidate_runner is None:
            rows = _rows_for(cand_session, original)
            cand = run_session(cand_session, feeds, "candidate", rows=rows, between=_release_runs(candidate))
            del cand_session  # free its weights before the parts are examined
            release_memory()
    except OnnxCompressError as exc:
        # The candidate is what is being judged: a candidate onnxruntime cannot run fails validation.
        return ValidationReport(
            passed=False,
            outputs={},
            tolerances=[str(t) for t in tols],
            num_feeds=len(feeds),
            num_samples=_count_samples(feeds),
            feeds_source=feeds_source,
            failures=[f"candidate: {exc}"],
            seconds=time.perf_counter() - start,
        )
    if on_outputs is not None:
        on_outputs(ref, cand)
    outputs = {name: output_diff(name, ref[name], cand[name]) for name in ref}
    if parts and feeds:
        try:
            finder = _PartFinder(Path(original))
        except Exception as exc:  # a structure the parser rejects: validate the whole outputs only
            finder = None
            for diff in outputs.values():
                diff.parts_note = f"parts not examined ({_first_line(exc)})"
        if finder is not None and finder.chains:
            try:
                _add_parts(outputs, finder, feeds, ref, cand)
            except Exception as exc:  # the parts are extra detail: never let them break validation
                for name in finder.chains:
                    if name in outputs:
                        outputs[name].parts = []
                        outputs[name].parts_note = f"parts not examined ({type(exc).__name__}: {_first_line(exc)})"
    report = ValidationReport(
        passed=True,
        outputs=outputs,
        tolerances=[str(t) for t in tols],
        num_feeds=len(feeds),
        num_samples=_count_samples(feeds),
        feeds_source=feeds_source,
    )
    for t in tols:
        if t.output is not None and t.output not in outputs:
            raise OnnxCompressError(f"tolerance {t} names unknown output {t.output!r}; outputs: {', '.join(outputs)}")
    if labels is not None:
        out_name = label_output or next(iter(ref))
        if out_name not in ref:
            raise OnnxCompressError(f"--label-output {out_name!r} is not an output; outputs: {', '.join(ref)}")
        acc_a, acc_b = _accuracy(ref[out_name], labels), _accuracy(cand[out_name], labels)
        report.accuracy = {"output": out_name, "original": acc_a, "candidate": acc_b, "drop": acc_a - acc_b}  # type: ignore[dict-item]
    _check(report, tols)
    report.seconds = time.perf_counter() - start
    return report


def _count_samples(feeds: list[dict[str, np.ndarray]]) -> int:
    """Samples = rows along axis 0 of the first input of each feed (1 for a scalar or empty feed)."""
    total = 0
    for f in feeds:
        first = next(iter(f.values()), None)
        total += int(first.shape[0]) if first is not None and first.ndim else 1
    return total


def _check(report: ValidationReport, tols: list[Tolerance]) -> None:
    for diff in report.outputs.values():
        if diff.nonfinite_mismatch:
            diff.passed = False
            diff.failures.append(f"{diff.nonfinite_mismatch} NaN/Inf values where the original has other values")
        for t in tols:
            if t.metric in MODEL_METRICS or (t.output is not None and t.output != diff.name):
                continue
            value = getattr(diff, t.metric)
            if value is not None and not t.holds(float(value)):
                diff.passed = False
                diff.failures.append(f"{t.metric}={float(value):.6g} fails {t}")
            for part in diff.parts:
                value = getattr(part, t.metric)
                if value is not None and not t.holds(float(value)):
                    part.passed = diff.passed = False
                    text = f"{t.metric}={float(value):.6g} fails {t}"
                    part.failures.append(text)
                    diff.failures.append(f"part {part.index} ({part.tensor} {part.slice}): {text}")
        for f in diff.failures:
            report.failures.append(f"{diff.name}: {f}")
    if report.accuracy is not None:
        acc = report.accuracy
        for t in tols:
            if t.metric == "accuracy_drop" and not t.holds(float(acc["drop"])):
                report.failures.append(f"accuracy drop {float(acc['drop']):.4f} fails {t}")
            if t.metric == "accuracy" and not t.holds(float(acc["candidate"])):
                report.failures.append(f"accuracy {float(acc['candidate']):.4f} fails {t}")
    report.passed = not report.failures
