"""Accuracy-aware mixed precision: the smallest per-layer mixture of int4/int8/fp16/fp32 that holds.

A *layer* is one float32 weight (an initializer of the main graph with at least ``MIN_ELEMENTS``
values) and the nodes reading it: a ``MatMul``/``Gemm`` weight, a ``Gather`` table (axis 0, 2-D), a
``Conv``/``ConvTranspose`` kernel. Each layer has a *ladder* of precisions, lowest first, built from
the existing passes' forms (all standard ONNX, dequantized once at load, so latency stays the
original's):

* ``int4``: :mod:`.passes.quantize.int4` (blocks of 32 along the reduction axis, float16 scales;
  GPTQ with calibration data for MatMul/Gemm weights, round-to-nearest with a clipping search for
  tables), 2-D MatMul/Gemm weights and Gather tables only;
* ``int8``: :mod:`.passes.quantize.weights` (``int8-weights``: blocks of 32 for MatMul/Gemm, per
  channel otherwise, per row for tables);
* ``fp16``: :mod:`.passes.quantize.float16` in storage mode;
* ``fp32``: the original weight.

**Sensitivity.** Every precision of every layer is computed once, as the float32 weight ``W_p`` the
pass would produce (the same maths and the same calibration Hessians, so the values match the built
model). One onnxruntime session runs the model with the layer weights turned into graph inputs, so a
mixture is evaluated by feeding the chosen ``W_p``, without rebuilding the model. With ``a`` the
reference output of sample ``s`` and ``b`` the output with only layer ``i`` at precision ``p``, the
layer's noise is ``e_ip[s] = ||b - a||^2 / ||a||^2`` (per output and sample; one run per layer and
precision on a subset of the calibration samples; for fp16, which adds about ``2^-11`` relative
error, ``e`` is scaled from int8's by the ratio of the weights' squared rounding errors). Noise from
different layers adds up to first order (independent errors), and ``1 - cosine ~= e / 2`` for small
errors, so the predicted noise of a mixture ``c`` is ``E_c[s] = sum_i e_i,c(i)[s]``.

**Search.** For a noise budget ``T``, ``greedy(T)`` starts from every layer at its lowest precision
and, while ``max_s E_c[s] > T``, raises one layer one step: the one that removes the most excess
noise ``sum_s max(0, E_c[s] - T)`` per byte added (``--objective size``). ``T`` is then chosen by a
bisection in log space on the *measured* tolerances (the mixture run on all calibration samples,
every tolerance tightened by ``margin``: an error bound ``x`` becomes ``margin * x``, a
``cosine >= x`` becomes ``1 - cosine <= margin * (1 - x)``, ``snr_db >= x`` becomes
``x - 10 log10(margin)``), so the order comes from the additive model and the decision from real
outputs. Then every raised layer is tried one step lower again, largest saving per predicted noise
first, and kept lower where the measured tolerances still hold (the headroom the additive model
could not see). Accuracy tolerances are checked on calibration data without labels through
top-1 agreement with the original: ``accuracy_drop <= 1 - top1_agreement`` on the same samples.

**Build and gate.** The mixture is built by running the passes with ``exclude`` = every node not
assigned to them (int4 first, on the float model, so its GPTQ Hessians are the ones the search
used; then int8; then fp16), and the result is validated against the original on the validation
inputs. If it fails there, the search continues from a tighter budget (``T / 4``, never lowering a
layer) until it holds; the model is written only when it holds. Deterministic for a fixed seed (the
seed picks the sensitivity samples; ties go to the earlier layer).

**Objective transport** (``--objective transport``: the fewest bytes *shipped*, i.e. the size of
``onnxcompress pack``'s package, not of the file). The ladder is ``q3, q3.5, ..., q7, q8`` (tables from
``q3``, other weights from ``q4``), then ``fp16`` and ``fp32``: ``qb`` is ``int8-weights`` with
``bits=b, step=rms`` per output channel (step ``4 rms / 2^(b-1)``, symbols up to +-127 in int8, each half
bit a step ``sqrt 2`` finer), GPTQ-rounded for MatMul/Gemm weights whose activations can be tapped,
optionally with entropy-constrained rounding (``ecr_lambda``). A rung's cost is its *coded* bytes
(:func:`.passes.quantize.entropy.coded_bytes`: the class-conditional entropy the transport coder
reaches, within about 1% of the package on MiniLM) plus its float32 scales; fp16 and fp32 cost 0.85
and 0.823 of their bytes (their measured plane coding). The greedy then buys noise reduction per
*coded* byte. GPTQ judged on the samples it was fitted to looks 2.5x better than on other sentences
(MiniLM, 64 calibration sentences), so the transport search fits GPTQ on the first half of the
calibration samples and measures sensitivities (and, with ``search_on=calibration``, mixtures) on
the other half; the build reuses those GPTQ factors, so the built weights are the measured ones.
Activation-aware steps (a per-input-row factor ``diag(H)^(-1/4)`` or ``^(-1/2)``) were tried on MiniLM
and did not help on top of GPTQ (worst cosine 0.984-0.990 vs 0.983-0.992 at equal bytes), so they are
not used.

Memory: the search holds the float32 values of every tuned weight at up to three precisions
(about 3x the tuned weights' size) plus one calibration feed's activations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import io
from .errors import OnnxCompressError
from .graph import Model, constant_meta, constant_value
from .passes.base import GraphSize, Params, PassContext, PassReport, is_excluded
from .passes.calibrate import has_batch_axis, tappable
from .passes.quantize._common import refuse_quantized
from .passes.quantize._math import quantize_symmetric, symmetric_scales
from .passes.quantize.entropy import coded_bytes
from .passes.quantize.float16 import FloatConfig, FloatPass
from .passes.quantize.gptq import Quantized, gptq, prepare_hessian, quantize_rtn
from .passes.quantize.int4 import Int4Config, Int4Pass, collect_hessians, summed_hessian
from .passes.quantize.weights import (
    Int8WeightsConfig,
    Int8WeightsPass,
    gptq_factor,
    quantize_weight,
    weight_hessians,
)
from .validate import Tolerance, make_session, output_diff, run_session

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp16", "fp32")
OBJECTIVES = ("size", "latency", "transport")
# --objective transport: int8-weights symbols of b bits (step=rms, GPTQ with calibration), then fp16, fp32.
TRANSPORT_PRECISIONS = ("q3", "q3.5", "q4", "q4.5", "q5", "q5.5", "q6", "q6.5", "q7", "q8", "fp16", "fp32")
TRANSPORT_MIN_BITS = {"gather": 3.0}  # tables go lower than MatMul/Gemm/Conv weights (4)
FP16_CODED = 0.85  # packed bytes per stored byte, measured on MiniLM (planes + rANS)
FP32_CODED = 0.823
MIN_ELEMENTS = 256  # the int4 and int8 passes leave smaller weights float
INT8_QMAX = 127
RELATIVE_ACCURACY_DROP = "relative_accuracy_drop"
SEARCH_ON = ("inputs", "calibration")
INPUTS_MARGIN = 0.98  # judged on the validation inputs: keep a little room for float rounding of the build
# Metrics where larger is better and 1 is perfect; tightening scales their distance from 1.
_UNIT_METRICS = {"cosine", "cosine_mean", "top1_agreement", "equal_fraction", "accuracy"}


# --------------------------------------------------------------------------- tolerances


@dataclasses.dataclass(frozen=True)
class TuneTolerance:
    """A tolerance of ``validate`` (:class:`Tolerance`) or ``relative_accuracy_drop<=x``.

    ``relative_accuracy_drop`` is ``(original accuracy - candidate accuracy) / original accuracy``.
    """

    tol: Tolerance

    @classmethod
    def parse(cls, text: str) -> TuneTolerance:
        """Parse one tolerance string.

        Raises:
            OnnxCompressError: for text that does not parse.
        """
        m = re.match(r"^\s*relative_accuracy_drop\s*(<=|<)\s*(\S+)\s*$", text or "")
        if m:
            try:
                value = float(m.group(2))
            except ValueError:
                raise OnnxCompressError(f"bad tolerance {text!r}: {m.group(2)!r} is not a number") from None
            if not math.isfinite(value):
                raise OnnxCompressError(f"bad tolerance {text!r}: the bound must be finite")
            return cls(Tolerance(RELATIVE_ACCURACY_DROP, m.group(1), value))
        return cls(Tolerance.parse(text))

    @property
    def needs_labels(self) -> bool:
        return self.tol.metric in ("accuracy", "accuracy_drop", RELATIVE_ACCURACY_DROP)

    def __str__(self) -> str:
        return str(self.tol)

    def tightened(self, margin: float) -> Tolerance:
        """The bound with ``margin`` of its error allowance (see the module docstring)."""
        t = self.tol
        if margin >= 1.0:
            return t
        if t.metric in _UNIT_METRICS and t.op in (">=", ">"):
            return dataclasses.replace(t, value=1.0 - (1.0 - t.value) * margin)
        if t.metric == "snr_db" and t.op in (">=", ">"):
            return dataclasses.replace(t, value=t.value - 10.0 * math.log10(margin))
        if t.op in ("<=", "<") and t.value > 0:
            return dataclasses.replace(t, value=t.value * margin)
        return t


def parse_tolerances(texts: list[str]) -> list[TuneTolerance]:
    """Parse every tolerance (raises :class:`OnnxCompressError` on the first bad one)."""
    if not texts:
        raise OnnxCompressError("tune needs at least one --tolerance, e.g. cosine>=0.99 or accuracy_drop<=0.01")
    return [TuneTolerance.parse(t) for t in texts]


# --------------------------------------------------------------------------- config and results


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Options of the search.

    Attributes:
        objective: ``size`` (fewest bytes) or ``latency`` (the same search over forms that are
            dequantized at load, i.e. never slower than float32, plus a latency measurement that
            the report states), or ``transport`` (fewest *packed* bytes: a ladder of entropy-coded
            bit widths, see the module docstring).
        ecr_lambda: ``transport``: entropy-constrained rounding multiplier (0: off; see
            :mod:`.passes.quantize.entropy`).
        seed: Picks the sensitivity samples.
        margin: Fraction of each tolerance's error allowance the search may use on calibration data.
        budget_seconds: Stop refining (bisection, lowering) after this many seconds; the best
            mixture found so far that holds is used.
        sensitivity_samples: Calibration samples used to measure each layer's sensitivity.
        precisions: The precisions layers may take (fp32 is always allowed).
        block_size: int4 block size.
        lower_trials: At most this many single-layer lowering trials after the bisection.
        bisect_steps: Steps of the bisection on the noise budget.
        damp: GPTQ damping (fraction of the mean of ``diag H``). Higher than the int4 pass's default
            0.01: on all-MiniLM-L6-v2 with 64 calibration sentences, 0.01 fits the FFN output weights
            (K = 1536) to the calibration set (their error on held-out sentences is 10-20x their error
            on the calibration sentences); 0.1 lowers their held-out error by about 40%.
    """

    objective: str = "size"
    seed: int = 0
    margin: float = 0.8
    budget_seconds: float | None = None
    sensitivity_samples: int = 16
    precisions: tuple[str, ...] = PRECISIONS
    block_size: int = 32
    lower_trials: int = 8
    bisect_steps: int = 8
    damp: float = 0.1
    ecr_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise OnnxCompressError(f"objective {self.objective!r}: choose from {', '.join(OBJECTIVES)}")
        if not 0.0 < self.margin <= 1.0:
            raise OnnxCompressError(f"margin {self.margin}: expected a fraction in (0, 1]")
        known = TRANSPORT_PRECISIONS if self.objective == "transport" else PRECISIONS
        bad = [p for p in self.precisions if p not in known and p not in PRECISIONS]
        if bad:
            raise OnnxCompressError(f"precision {bad[0]!r}: choose from {', '.join(known)}")
        if not 0.0 <= self.ecr_lambda <= 10.0:
            raise OnnxCompressError(f"ecr_lambda {self.ecr_lambda}: expected a value in [0, 10] (step^2 per bit)")

    @property
    def transport_ladder(self) -> tuple[str, ...]:
        """The precisions of ``--objective transport`` (default: all of :data:`TRANSPORT_PRECISIONS`)."""
        mine = tuple(p for p in TRANSPORT_PRECISIONS if p in self.precisions and p.startswith("q"))
        floats = tuple(p for p in ("fp16", "fp32") if p in self.precisions or p == "fp32")
        return (mine or tuple(p for p in TRANSPORT_PRECISIONS if p.startswith("q"))) + floats
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise OnnxCompressError("--budget-seconds must be positive")


@dataclasses.dataclass
class Layer:
    """One tunable weight and what each precision costs and does."""

    tensor: str
    nodes: list[str]
    op: str
    shape: list[int]
    ladder: list[str]
    bytes: dict[str, int]
    precision: str = "fp32"
    noise: dict[str, float] = dataclasses.field(default_factory=dict)  # worst-sample noise alone
    why: str = ""
    method: str = ""  # int4: gptq or rtn
    not_allowed: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "nodes": self.nodes,
            "op": self.op,
            "shape": self.shape,
            "precision": self.precision,
            "bytes": self.bytes.get(self.precision, 0),
            "bytes_fp32": self.bytes.get("fp32", 0),
            "options": {p: {"bytes": self.bytes[p], "noise": self.noise.get(p)} for p in self.ladder},
            "not_allowed": self.not_allowed,
            "int4_method": self.method or None,
            "why": self.why,
        }


@dataclasses.dataclass
class TuneResult:
    """What the search chose and how it got there."""

    layers: list[Layer]
    fixed: list[dict[str, str]]
    history: list[dict[str, Any]]
    evaluations: int
    search_passed: bool
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    search_on: str = "calibration"

    @property
    def assignment(self) -> dict[str, str]:
        return {la.tensor: la.precision for la in self.layers}

    def precision_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for la in self.layers:
            out[la.precision] = out.get(la.precision, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [la.to_dict() for la in self.layers],
            "not_tuned": self.fixed,
            "precisions": self.precision_counts(),
            "weight_bytes": sum(la.bytes.get(la.precision, 0) for la in self.layers),
            "weight_bytes_fp32": sum(la.bytes.get("fp32", 0) for la in self.layers),
            "search": {
                "history": self.history,
                "evaluations": self.evaluations,
                "judged_on": self.search_on,
                "passed": self.search_passed,
                "seconds": round(self.seconds, 3),
            },
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- layers


@dataclasses.dataclass
class _Use:
    node: Any  # gs.Node
    kind: str  # matmul, gemm, gather, conv, convtranspose
    red_axis: int | None  # axis of W along which int4/int8 blocks run
    out_axis: int  # int8 per-channel axis
    activation: str | None  # GPTQ input (None: not tappable)
    trans_a: bool = False


def _use_of(node: Any, tensor: Any) -> _Use | None:
    """How ``node`` reads the weight ``tensor`` (None: not as a weight the passes quantize)."""
    op = node.op
    if node.domain not in ("", "ai.onnx", None):
        return None
    ins = list(node.inputs)
    rank = len(constant_meta(tensor)[0])  # type: ignore[index]
    if op == "MatMul" and len(ins) == 2 and ins[1] is tensor and ins[0] is not tensor and rank == 2:
        if constant_meta(ins[0]) is not None:
            return None
        return _Use(node, "matmul", 0, 1, ins[0].name)
    if op == "Gemm" and len(ins) >= 2 and ins[1] is tensor and ins[0] is not tensor and rank == 2:
        if constant_meta(ins[0]) is not None:
            return None
        trans_b = bool(node.attrs.get("transB", 0))
        return _Use(
            node, "gemm", 1 if trans_b else 0, 0 if trans_b else 1, ins[0].name, bool(node.attrs.get("transA", 0))
        )
    if op == "Gather" and len(ins) == 2 and ins[0] is tensor and ins[1] is not tensor and rank == 2:
        if int(node.attrs.get("axis", 0)) % 2 != 0 or constant_meta(ins[1]) is not None:
            return None
        return _Use(node, "gather", 1, 0, None)
    if op in ("Conv", "ConvTranspose") and len(ins) >= 2 and ins[1] is tensor and ins[0] is not tensor and rank >= 3:
        return _Use(node, op.lower(), None, 0 if op == "Conv" else 1, None)
    return None


def _collect(model: Model, exclude: tuple[str, ...]) -> tuple[list[tuple[Any, list[_Use]]], list[dict[str, str]]]:
    """Tunable weights of the main graph with their uses, and the weights left alone (with why)."""
    import onnx_graphsurgeon as gs

    graph = model.graph
    fixed: list[dict[str, str]] = []
    found: dict[int, tuple[Any, list[_Use]]] = {}
    readers: dict[int, list[Any]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                readers.setdefault(id(t), []).append(node)
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose"):
            continue
        for t in node.inputs[:2]:
            if not isinstance(t, gs.Constant) or id(t) in found:
                continue
            meta = constant_meta(t)
            if meta is None or meta[1] != np.float32 or int(np.prod(meta[0])) < MIN_ELEMENTS:
                continue
            uses = [_use_of(r, t) for r in readers.get(id(t), [])]
            why = None
            if any(u is None for u in uses):
                others = sorted({r.op for r, u in zip(readers[id(t)], uses) if u is None})
                why = f"also read by {', '.join(others)} (not as a weight the passes quantize)"
            elif len({(u.kind, u.red_axis, u.out_axis) for u in uses if u}) > 1:  # type: ignore[union-attr]
                why = "consumers read it along different axes"
            elif any(is_excluded(u.node.name, u.node.op, exclude) for u in uses if u):
                why = "excluded by --exclude"
            if why:
                if not any(f["tensor"] == t.name for f in fixed):
                    fixed.append({"tensor": t.name, "precision": "fp32", "why": why})
                continue
            found[id(t)] = (t, [u for u in uses if u is not None])
    return list(found.values()), fixed


def _name_nodes(model: Model) -> None:
    """Give every main-graph node a unique, non-empty name (exclusions address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.nodes):
        if not node.name or node.name in seen:
            base = f"tune_{node.op}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(node.name)


def only(names: list[str] | set[str]) -> tuple[str, ...]:
    """An ``exclude`` pattern list that excludes every node *except* ``names`` (exact names)."""
    alts = "|".join(re.escape(n) for n in sorted(names))
    return (f"(?!(?:{alts})$).*",) if alts else (".*",)


# --------------------------------------------------------------------------- quantized values


def _int8_value(w: np.ndarray, use: _Use, block: int = 32) -> tuple[np.ndarray, int]:
    """The weight ``int8-weights`` (blocks of 32, ``load`` form) produces, and the bytes it stores."""
    red = use.red_axis if use.kind in ("matmul", "gemm") else None
    if red is not None and w.shape[red] % block == 0 and w.shape[red] > block:
        split = list(w.shape[:red]) + [w.shape[red] // block, block] + list(w.shape[red + 1 :])
        wb = w.reshape(split)
        amax = np.abs(wb).max(axis=red + 1, keepdims=True)
        scale = np.where(amax > 0, amax / np.float32(INT8_QMAX), np.float32(1.0)).astype(np.float32)
        with np.errstate(over="ignore", under="ignore"):
            half = scale.astype(np.float16)
        if np.all(np.isfinite(half)) and np.all(half >= np.finfo(np.float16).tiny):
            scale = half
        s32 = scale.astype(np.float32)
        q = np.clip(np.rint(wb / s32), -INT8_QMAX, INT8_QMAX)
        return (q * s32).reshape(w.shape).astype(np.float32), int(w.size + scale.nbytes)
    axis = use.out_axis
    scale = symmetric_scales(w, axis, INT8_QMAX)
    q = quantize_symmetric(w, scale, axis, INT8_QMAX, np.int8)
    shaped = scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    return (q.astype(np.float32) * shaped).astype(np.float32), int(w.size + scale.nbytes)


def _rows(w: np.ndarray, red: int) -> np.ndarray:
    """``W`` as ``[N, K]`` (``K`` the reduction axis), as the int4 pass lays it out."""
    return np.ascontiguousarray(w.T) if red == 0 else w


def _int4_value(q: Quantized, red: int) -> tuple[np.ndarray, int]:
    deq = q.dequantize()
    w = np.ascontiguousarray(deq.T) if red == 0 else deq
    half = q.scales.astype(np.float16)
    scale_bytes = 2 if np.array_equal(half.astype(np.float32), q.scales) else 4
    return w.astype(np.float32), int(q.codes.size // 2 + q.scales.size * scale_bytes)


# --------------------------------------------------------------------------- the search


@dataclasses.dataclass
class _Symbols:
    """A transport rung kept as its int8 symbols and scales (``q * scale`` is the weight the pass makes)."""

    q: np.ndarray
    scale: np.ndarray


def _dense(v: Any) -> np.ndarray:
    return (v.q.astype(np.float32) * v.scale).astype(np.float32) if isinstance(v, _Symbols) else v


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


class Tuner:
    """The search over one (folded, float) model; see the module docstring.

    Args:
        model: The model to tune (node names are made unique in place; weights are not changed).
        calibration: Feeds the search measures on (never the validation feeds).
        tolerances: What must hold.
        config: Search options.
        exclude: Node patterns kept float32 (``--exclude``).
        target: ``standard`` or ``onnxruntime`` (forms of the int4 pass).
        labels_accuracy: The original's accuracy on the labelled validation inputs (for
            ``relative_accuracy_drop`` through top-1 agreement), if known.
        label_output: The output holding class scores.
    """

    def __init__(
        self,
        model: Model,
        calibration: list[dict[str, np.ndarray]],
        tolerances: list[TuneTolerance],
        config: TuneConfig | None = None,
        *,
        exclude: tuple[str, ...] = (),
        target: str = "standard",
        labels_accuracy: float | None = None,
        label_output: str | None = None,
        check_feeds: list[dict[str, np.ndarray]] | None = None,
        check_margin: float | None = None,
        check_labels: np.ndarray | None = None,
    ) -> None:
        self.cfg = config or TuneConfig()
        self.check_feeds = check_feeds or calibration
        self.check_labels = check_labels if check_feeds else None
        self.start = time.perf_counter()
        self.deadline = _Deadline(self.cfg.budget_seconds)
        self.model = model
        self.feeds = calibration
        self.fit_feeds = calibration  # what GPTQ fits (transport: see _split_for_transport)
        self.tolerances = tolerances
        self.exclude = exclude
        self.target = target
        self.labels_accuracy = labels_accuracy
        self.label_output = label_output
        self.notes: list[str] = []
        if self.cfg.objective == "transport":
            self._split_for_transport(calibration, judge=not check_feeds)
        self.history: list[dict[str, Any]] = []
        self.evaluations = 0
        self._dir = Path(tempfile.mkdtemp(prefix="onnxcompress-tune-"))
        self._session: Any = None
        self._cache: dict[tuple[str, ...], tuple[dict[str, Any], float]] = {}
        self.margin = self.cfg.margin if check_margin is None else check_margin
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------------

    def _prepare(self) -> None:
        refuse_quantized(self.model, "tune")
        _name_nodes(self.model)
        weights, self.fixed = _collect(self.model, self.exclude)
        self.uses = {t.name: uses for t, uses in weights}
        proto = io.export_model(self.model, type_check=False)
        self.folded = io.stage(proto, self._dir / "folded.onnx", check=False).commit()
        names = {t.name for t, _ in weights}
        keep = [t for t in proto.graph.initializer if t.name not in names]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        for t, _ in weights:
            shape, _dtype = constant_meta(t)  # type: ignore[misc]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(shape)))
        self.eval_path = io.stage(proto, self._dir / "eval.onnx", check=False).commit()
        del proto, keep
        self.layers: list[Layer] = []
        self.values: dict[str, dict[str, np.ndarray]] = {}
        self._quantize(weights)
        if not self.layers:
            return
        self._session = make_session(self.eval_path)
        self.out_names = [o.name for o in self._session.get_outputs()]
        self.reference = self._run(self._weights({}), self.check_feeds)
        self._sens_feeds = self._sensitivity_feeds()
        self._sens_reference = self._run(self._weights({}), self._sens_feeds)

    def _quantize(self, weights: list[tuple[Any, list[_Use]]]) -> None:
        """Every allowed precision of every layer: its float32 values and stored bytes."""
        if self.cfg.objective == "transport":
            self._quantize_transport(weights)
            return
        cfg = self.cfg
        allowed = set(cfg.precisions) | {"fp32"}
        calib = bool(self.feeds)
        available = tappable(self.model)
        plans: list[tuple[Any, list[_Use], list[tuple[str, bool]] | None]] = []
        for t, uses in weights:
            acts: list[tuple[str, bool]] | None = []
            for u in uses:
                if u.activation is None or u.activation not in available or not calib:
                    acts = None
                    break
                acts.append((u.activation, u.trans_a))  # type: ignore[union-attr]
            plans.append((t, uses, list(dict.fromkeys(acts)) if acts is not None else None))
        int4_ok = "int4" in allowed and self.model.opset >= 7
        gptq_plans = [p for p in plans if p[2] and p[1][0].kind in ("matmul", "gemm")] if int4_ok else []
        fitted: dict[str, Quantized] = {}
        reasons: dict[str, str] = {}
        if gptq_plans:
            fitted, reasons = self._fit_gptq(gptq_plans)
        self.fitted = fitted  # GPTQ codes, reused by the build (the int4 pass would refit the same)
        for t, uses, _acts in plans:
            w = constant_value(t, cache=False)
            assert w is not None
            w = np.asarray(w, dtype=np.float32)
            u = uses[0]
            shape = list(w.shape)
            layer = Layer(t.name, [x.node.name for x in uses], u.node.op, shape, [], {})
            vals: dict[str, np.ndarray] = {}
            if not np.all(np.isfinite(w)):
                self.fixed.append({"tensor": t.name, "precision": "fp32", "why": "weight has non-finite values"})
                continue
            if "int4" in allowed:
                if u.kind not in ("matmul", "gemm", "gather"):
                    layer.not_allowed["int4"] = f"{u.node.op} weights have no int4 form"
                elif not int4_ok:
                    layer.not_allowed["int4"] = f"opset {self.model.opset} < 7"
                elif (w.shape[1 if u.red_axis == 1 else 0] % cfg.block_size) and self.model.opset < 10:
                    layer.not_allowed["int4"] = "K is not a multiple of the block and opset < 10 has no Slice"
                else:
                    q = fitted.get(t.name)
                    layer.method = "gptq" if q is not None else "rtn"
                    if q is None and t.name in reasons:
                        layer.method = f"rtn ({reasons[t.name]})"
                    if q is None:
                        q = quantize_rtn(_rows(w, u.red_axis or 0), cfg.block_size, True, True)
                    vals["int4"], layer.bytes["int4"] = _int4_value(q, u.red_axis or 0)
                    del q
            if "int8" in allowed:
                if self.model.opset < 7:
                    layer.not_allowed["int8"] = f"opset {self.model.opset} < 7"
                else:
                    vals["int8"], layer.bytes["int8"] = _int8_value(w, u)
            if "fp16" in allowed:
                if np.abs(w).max(initial=0.0) > float(np.finfo(np.float16).max):
                    layer.not_allowed["fp16"] = "values overflow float16"
                else:
                    layer.bytes["fp16"] = int(w.size * 2)
            vals["fp32"] = w
            layer.bytes["fp32"] = int(w.nbytes)
            layer.ladder = [p for p in PRECISIONS if p in layer.bytes]
            layer.precision = layer.ladder[0]
            self.layers.append(layer)
            self.values[t.name] = vals

    def _split_for_transport(self, calibration: list[dict[str, np.ndarray]], judge: bool) -> None:
        """Judged on calibration data, GPTQ would be judged on the samples it fitted (on MiniLM its
        error there is 2.5x smaller than on held-out sentences, so the search undershoots and the
        sensitivities favour GPTQ layers over tables). The transport search therefore fits GPTQ on
        the first half of the calibration samples and measures sensitivities (and, with ``judge``,
        mixtures) on the other half."""
        fit: list[dict[str, np.ndarray]] = []
        held: list[dict[str, np.ndarray]] = []
        batch = has_batch_axis(self.model)
        for feed in calibration:
            arrays = list(feed.values())
            n = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
            if batch and n >= 2 and all(a.ndim and a.shape[0] == n for a in arrays):
                fit.append({k: v[: n // 2] for k, v in feed.items()})
                held.append({k: v[n // 2 :] for k, v in feed.items()})
            else:
                (fit if len(fit) <= len(held) else held).append(feed)
        if fit and held:
            self.fit_feeds, self.feeds = fit, held
            if judge:
                self.check_feeds = held
            self.notes.append(
                "GPTQ fitted on half of the calibration samples; sensitivities"
                + (" and mixtures" if judge else "")
                + " measured on the other half"
            )

    def _quantize_transport(self, weights: list[tuple[Any, list[_Use]]]) -> None:
        """``--objective transport``: every bit width of every layer as ``int8-weights`` would make it
        (``step=rms``, per channel, GPTQ from the same Hessians where the activations can be tapped),
        with the *coded* bytes of its symbols (:func:`.entropy.coded_bytes`) plus float32 scales."""
        cfg = self.cfg
        ladder = cfg.transport_ladder
        available = tappable(self.model)
        acts_of: dict[str, list[str]] = {}
        for t, uses in weights:
            if (
                self.feeds
                and uses[0].kind in ("matmul", "gemm")
                and all(u.activation in available and not u.trans_a for u in uses)
            ):
                acts_of[t.name] = [str(u.activation) for u in uses]
        names = sorted({a for v in acts_of.values() for a in v})
        hess = weight_hessians(self.model, names, self.fit_feeds) if names else {}
        self.importance: dict[str, np.ndarray] = {}
        self.factors: dict[str, np.ndarray] = {}
        for t, uses in weights:
            w = np.asarray(constant_value(t, cache=False), dtype=np.float32)
            u = uses[0]
            layer = Layer(t.name, [x.node.name for x in uses], u.node.op, list(w.shape), [], {})
            if not np.all(np.isfinite(w)):
                self.fixed.append({"tensor": t.name, "precision": "fp32", "why": "weight has non-finite values"})
                continue
            factor = None
            if t.name in acts_of and u.red_axis is not None:
                k = w.shape[u.red_axis]
                hs = [hess.get(a) for a in acts_of[t.name]]
                if all(h is not None and h.shape == (k, k) for h in hs):
                    h = np.sum(hs, axis=0)
                    factor = gptq_factor(h, cfg.damp)
                    if factor is not None:
                        self.factors[t.name] = factor
                    diag = np.maximum(np.diagonal(h), 0.0)
                    shape = [-1 if i == u.red_axis else 1 for i in range(w.ndim)]
                    self.importance[t.name] = (diag / max(float(diag.mean()), 1e-30)).reshape(shape)
            layer.method = "gptq" if factor is not None else "rtn"
            vals: dict[str, np.ndarray] = {}
            low = TRANSPORT_MIN_BITS.get(u.kind, 4.0)
            if self.model.opset >= 7:
                for p in ladder:
                    if not p.startswith("q") or float(p[1:]) < low:
                        continue
                    q, scale, _ = quantize_weight(
                        w, "channel", u.out_axis, u.red_axis, bits=float(p[1:]), step="rms",
                        ecr_lambda=cfg.ecr_lambda, gptq_u=factor,
                    )  # fmt: skip
                    vals[p] = _Symbols(q, scale)  # dequantized when fed: int8 keeps the ladder small
                    layer.bytes[p] = coded_bytes(q) + int(scale.nbytes)
                    del q
            else:
                layer.not_allowed["q"] = f"opset {self.model.opset} < 7"
            if "fp16" in ladder:
                if np.abs(w).max(initial=0.0) > float(np.finfo(np.float16).max):
                    layer.not_allowed["fp16"] = "values overflow float16"
                else:
                    layer.bytes["fp16"] = int(w.size * 2 * FP16_CODED)
            vals["fp32"] = w
            layer.bytes["fp32"] = int(w.nbytes * FP32_CODED)
            layer.ladder = [p for p in ladder if p in layer.bytes]
            layer.precision = layer.ladder[0]
            self.layers.append(layer)
            self.values[t.name] = vals
        self.fitted = {}
        del hess

    def _fit_gptq(
        self, plans: list[tuple[Any, list[_Use], list[tuple[str, bool]] | None]]
    ) -> tuple[dict[str, Quantized], dict[str, str]]:
        """GPTQ int4 weights, from the same Hessians the int4 pass computes (:func:`.int4.collect_hessians`)."""
        defaults = Int4Config()
        out: dict[str, Quantized] = {}
        reasons: dict[str, str] = {}
        group: list[tuple[Any, list[_Use], list[tuple[str, bool]]]] = []
        used, seen = 0, set()

        def flush() -> None:
            if not group:
                return
            acts = list(dict.fromkeys(a for _, _, acts in group for a in acts))
            try:  # exactly the int4 pass's Hessians (padding mask, per-sample weighting)
                hess = collect_hessians(
                    self.model,
                    acts,
                    self.feeds,
                    defaults.calibration_rows,
                    mask_padding=defaults.mask_padding,
                    sample_weighting=defaults.sample_weighting,
                )
            except OnnxCompressError as exc:
                for t, _, _ in group:
                    reasons[t.name] = f"calibration failed: {exc}"
                return
            prepared: dict[tuple[tuple[str, bool], ...], Any] = {}  # Q, K and V share one
            for t, uses, acts_t in group:
                w = np.asarray(constant_value(t, cache=False), dtype=np.float32)
                red = uses[0].red_axis or 0
                k = w.shape[red]
                key = tuple(acts_t)
                if key not in prepared:
                    h = summed_hessian(hess, acts_t, k, wide=False)
                    if isinstance(h, str):
                        prepared[key] = h
                    else:
                        try:
                            prepared[key] = prepare_hessian(h, self.cfg.block_size, self.cfg.damp, defaults.act_order)
                        except ValueError as exc:
                            prepared[key] = str(exc)
                        del h
                prep = prepared[key]
                if isinstance(prep, str):
                    reasons[t.name] = prep
                    continue
                try:
                    out[t.name] = gptq(
                        _rows(w, red), prep, self.cfg.block_size, symmetric=True, clip_search=defaults.clip_search
                    )
                except ValueError as exc:
                    reasons[t.name] = str(exc)
            del prepared, hess

        for t, uses, acts in plans:
            assert acts is not None
            k = int(constant_meta(t)[0][uses[0].red_axis or 0])  # type: ignore[index]
            extra = sum(2 * k * (k + 1) for a in acts if a not in seen)  # packed, as the int4 pass counts
            if group and used + extra > defaults.hessian_bytes:
                flush()
                group, seen, used = [], set(), 0
                extra = 2 * k * (k + 1) * len(acts)
            group.append((t, uses, acts))
            seen.update(acts)
            used += extra
        flush()
        return out, reasons

    def _sensitivity_feeds(self) -> list[dict[str, np.ndarray]]:
        """A seeded subset of ``sensitivity_samples`` calibration samples (rows along axis 0)."""
        rng = np.random.default_rng(self.cfg.seed)
        out: list[dict[str, np.ndarray]] = []
        budget = self.cfg.sensitivity_samples
        for feed in self.feeds:
            arrays = list(feed.values())
            n = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
            splittable = n > 0 and all(a.ndim and a.shape[0] == n for a in arrays) and has_batch_axis(self.model)
            if not splittable:
                out.append(feed)
                budget -= 1
            else:
                take = min(n, max(budget, 0))
                if take == 0:
                    break
                rows = np.sort(rng.choice(n, size=take, replace=False))
                out.append({k: v[rows] for k, v in feed.items()})
                budget -= take
            if budget <= 0:
                break
        return out or self.feeds[:1]

    # -- evaluation -----------------------------------------------------------------------------

    def _weights(self, assignment: dict[str, str]) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for la in self.layers:
            p = assignment.get(la.tensor, "fp32")
            vals = self.values[la.tensor]
            if p == "fp16":
                feed[la.tensor] = vals["fp32"].astype(np.float16).astype(np.float32)
            else:
                feed[la.tensor] = _dense(vals[p])
        return feed

    def _run(self, weights: dict[str, np.ndarray], feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
        self.evaluations += 1
        return run_session(self._session, [{**f, **weights} for f in feeds], "tuned")

    def _noise(self, ref: dict[str, list[np.ndarray]], out: dict[str, list[np.ndarray]]) -> np.ndarray:
        """Relative noise power per (float output, sample): ``||b - a||^2 / ||a||^2``."""
        parts = []
        for name in self.out_names:
            for a, b in zip(ref[name], out[name]):
                if a.dtype.kind != "f":
                    continue
                a2 = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
                b2 = b.reshape(a2.shape)
                a64, d = a2.astype(np.float64), b2.astype(np.float64) - a2
                d = np.where(np.isfinite(d), d, 1e30)
                num, den = np.sum(d * d, axis=1), np.sum(a64 * a64, axis=1)
                parts.append(num / np.maximum(den, 1e-30))
        return np.concatenate(parts) if parts else np.zeros(1)

    def _holds(self, diffs: dict[str, Any], margin: float) -> tuple[bool, list[str]]:
        """Whether the (tightened) tolerances hold for the output differences ``diffs``."""
        failures: list[str] = []
        for tt in self.tolerances:
            t = tt.tightened(margin)
            if tt.needs_labels and "__accuracy__" in diffs:
                orig, cand = diffs["__accuracy__"]
                value = {"accuracy": cand, "accuracy_drop": orig - cand}.get(t.metric)
                if value is None:
                    value = (orig - cand) / orig if orig > 0 else 0.0
                if not t.holds(value):
                    failures.append(f"{t.metric}={value:.4g} fails {t}")
                continue
            if tt.needs_labels:
                name = self.label_output or self.out_names[0]
                top1 = diffs[name].top1_agreement
                if top1 is None:
                    failures.append(f"{t}: no top-1 agreement on {name}")
                    continue
                disagree = 1.0 - top1
                if t.metric == "accuracy_drop":
                    value = disagree
                elif t.metric == RELATIVE_ACCURACY_DROP:
                    value = disagree / max(self.labels_accuracy or 1.0, 1e-9)
                else:  # accuracy >= x: the original's accuracy minus the disagreement
                    value = (self.labels_accuracy or 1.0) - disagree
                if not t.holds(value):
                    failures.append(f"{t.metric}<={value:.4g} (via top-1 agreement) fails {t}")
                continue
            for name, diff in diffs.items():
                if name == "__accuracy__" or (t.output is not None and t.output != name):
                    continue
                if diff.failures or diff.nonfinite_mismatch:
                    failures.append(f"{name}: {'; '.join(diff.failures) or 'non-finite values'}")
                    continue
                value = getattr(diff, t.metric, None)
                if value is not None and not t.holds(float(value)):
                    failures.append(f"{name}: {t.metric}={float(value):.6g} fails {t}")
        return not failures, failures

    def _accuracy(self, out: dict[str, list[np.ndarray]]) -> tuple[float, float]:
        """``(original, candidate)`` accuracy on the labelled check feeds."""
        name = self.label_output or self.out_names[0]
        labels = self.check_labels
        assert labels is not None

        def acc(outputs: list[np.ndarray]) -> float:
            preds = np.concatenate([np.argmax(o, axis=-1).reshape(-1) for o in outputs])
            return float(np.mean(preds == labels)) if preds.size == labels.size else 0.0

        return acc(self.reference[name]), acc(out[name])

    def evaluate(self, assignment: dict[str, str], label: str) -> bool:
        """Run the mixture on all calibration feeds; record it in the history; whether it holds.

        The comparison with the reference is kept per mixture, so a later, tighter ``margin``
        re-judges it without running it again.
        """
        key = tuple(assignment.get(la.tensor, "fp32") for la in self.layers)
        cached = self._cache.get(key)
        if cached is None:
            out = self._run(self._weights(assignment), self.check_feeds)
            diffs = {n: output_diff(n, self.reference[n], out[n]) for n in self.out_names}
            if self.check_labels is not None:
                diffs["__accuracy__"] = self._accuracy(out)
            cached = (diffs, float(self._noise(self.reference, out).max()))
            self._cache[key] = cached
            del out
        ok, failures = self._holds(cached[0], self.margin)
        self.history.append(
            {
                "step": label,
                "bytes": self.bytes_of(assignment),
                "worst_noise": cached[1],
                "holds": ok,
                "failure": failures[0] if failures else None,
                "precisions": _counts(key),
                "at_seconds": round(time.perf_counter() - self.start, 2),
            }
        )
        log.info("tune %s: %d bytes, holds=%s", label, self.bytes_of(assignment), ok)
        return ok

    def bytes_of(self, assignment: dict[str, str]) -> int:
        return sum(la.bytes[assignment.get(la.tensor, "fp32")] for la in self.layers)

    # -- sensitivity ----------------------------------------------------------------------------

    def sensitivity(self) -> None:
        """``e_ip`` for every layer: measured at its lowest precision, scaled for the higher ones.

        A higher precision ``q`` of a layer gets ``e_iq = e_ip * ||W_q - W||^2 / ||W_p - W||^2``
        (output noise is, to first order, proportional to the weight's squared rounding error).
        """
        self.e: dict[tuple[str, str], np.ndarray] = {}
        base = {x.tensor: "fp32" for x in self.layers}
        for la in self.layers:
            w32 = self.values[la.tensor]["fp32"]
            low = la.ladder[0]
            if low == "fp32":
                continue
            out = self._run(self._weights({**base, la.tensor: low}), self._sens_feeds)
            e_low = self._noise(self._sens_reference, out)
            self.e[(la.tensor, low)] = e_low
            imp = getattr(self, "importance", {}).get(la.tensor, 1.0)  # diag H: output-weighted error
            d_low = float(np.sum(imp * (self._value(la, low) - w32).astype(np.float64) ** 2))
            for q in la.ladder[1:]:
                if q == "fp32":
                    continue
                d_q = float(np.sum(imp * (self._value(la, q) - w32).astype(np.float64) ** 2))
                self.e[(la.tensor, q)] = e_low * min(d_q / max(d_low, 1e-300), 1.0)
        zero = np.zeros_like(next(iter(self.e.values()))) if self.e else np.zeros(1)
        for la in self.layers:
            self.e[(la.tensor, "fp32")] = zero
            for p in la.ladder:
                la.noise[p] = float(self.e[(la.tensor, p)].max())

    def _value(self, la: Layer, p: str) -> np.ndarray:
        vals = self.values[la.tensor]
        return vals["fp32"].astype(np.float16).astype(np.float32) if p == "fp16" else _dense(vals[p])

    def predicted(self, assignment: dict[str, str]) -> np.ndarray:
        total = None
        for la in self.layers:
            e = self.e[(la.tensor, assignment.get(la.tensor, "fp32"))]
            total = e.copy() if total is None else total + e
        return total if total is not None else np.zeros(1)

    def _cost(self, la: Layer, p: str, q: str) -> float:
        return max(float(la.bytes[q] - la.bytes[p]), 1.0)

    def greedy(self, budget: float, floor: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
        """The mixture for noise budget ``T`` (see the module docstring) and the order of raises."""
        cur = {la.tensor: la.ladder[0] for la in self.layers}
        for t, p in (floor or {}).items():
            cur[t] = p
        pred = self.predicted(cur)
        order: list[str] = []
        for _ in range(sum(len(la.ladder) for la in self.layers)):
            if pred.max() <= budget:
                break
            excess = np.maximum(pred - budget, 0).sum()
            best, best_score, best_pred = None, 0.0, None
            fallback, fallback_gain, fallback_pred = None, 0.0, None
            worst = int(np.argmax(pred))
            for la in self.layers:
                p = cur[la.tensor]
                i = la.ladder.index(p)
                if i + 1 >= len(la.ladder):
                    continue
                q = la.ladder[i + 1]
                new = pred - self.e[(la.tensor, p)] + self.e[(la.tensor, q)]
                gain = excess - np.maximum(new - budget, 0).sum()
                score = gain / self._cost(la, p, q)
                if gain > 0 and score > best_score:
                    best, best_score, best_pred = la, score, new
                g2 = pred[worst] - new[worst]
                if g2 > fallback_gain:
                    fallback, fallback_gain, fallback_pred = la, g2, new
            if best is None:
                best, best_pred = fallback, fallback_pred
            if best is None:
                break
            cur[best.tensor] = best.ladder[best.ladder.index(cur[best.tensor]) + 1]
            pred = best_pred  # type: ignore[assignment]
            order.append(best.tensor)
        return cur, order

    # -- the whole search ----------------------------------------------------------------------

    def search(self, floor: dict[str, str] | None = None) -> TuneResult:
        """Sensitivity (once), bisection on the noise budget, then lowering where it still holds."""
        if not self.layers:
            return self._result(True)
        if not hasattr(self, "e"):
            self.sensitivity()
            self.history.append(
                {
                    "step": f"sensitivity of {len(self.layers)} layers on {len(self._sens_feeds)} feed(s)",
                    "at_seconds": round(time.perf_counter() - self.start, 2),
                }
            )
        floor = dict(floor or {})
        lowest, _ = self.greedy(math.inf, floor)
        if self.evaluate(lowest, "lowest"):
            self._assign(lowest, {}, "the lowest precision holds")
            return self._result(True)
        hi = float(self.predicted(lowest).max())
        full = {la.tensor: "fp32" for la in self.layers}
        lo = hi * 1e-3
        best: dict[str, str] | None = None
        best_order: list[str] = []
        for _ in range(4):
            cand, order = self.greedy(lo, floor)
            if self.evaluate(cand, f"budget {lo:.3g}"):
                best, best_order = cand, order
                break
            lo *= 1e-3
        if best is None:
            if not self.evaluate(full, "all float32"):
                self.notes.append("even the all-float32 weights fail the tightened tolerances on calibration data")
                self._assign(full, {}, "nothing smaller holds")
                return self._result(False)
            best, best_order = full, []
            lo = 0.0
        # Bisection in log space between a failing (hi) and a holding (lo) budget.
        for step in range(self.cfg.bisect_steps):
            if self.deadline.passed() or lo <= 0:
                break
            mid = math.sqrt(lo * hi)
            cand, order = self.greedy(mid, floor)
            if self.bytes_of(cand) >= self.bytes_of(best):
                lo = mid
                continue
            if self.evaluate(cand, f"budget {mid:.3g} (bisection {step + 1})"):
                best, best_order, lo = cand, order, mid
            else:
                hi = mid
            if hi / max(lo, 1e-300) < 1.3:
                break
        self.budget = lo
        best = self._lower(best, floor, hi)
        self._assign(best, self._raise_reasons(best_order), "")
        return self._result(True)

    def all_float(self, why: str) -> TuneResult:
        """Every layer float32 (the last resort)."""
        full = {la.tensor: "fp32" for la in self.layers}
        ok = self.evaluate(full, "all float32")
        self.lowered = set()
        self._assign(full, {}, why)
        return self._result(ok)

    def _lower(self, best: dict[str, str], floor: dict[str, str], fail_budget: float) -> dict[str, str]:
        """Try each raised layer one step lower, most bytes saved per predicted noise first."""
        tried = 0
        self.lowered: set[str] = set()
        improved = True
        while improved and tried < self.cfg.lower_trials and not self.deadline.passed():
            improved = False
            cands = []
            for la in self.layers:
                p = best[la.tensor]
                i = la.ladder.index(p)
                low = floor.get(la.tensor)
                if i == 0 or (low is not None and la.ladder.index(low) >= i):
                    continue
                q = la.ladder[i - 1]
                trial = {**best, la.tensor: q}
                if float(self.predicted(trial).max()) > fail_budget:
                    continue  # predicted to fail: the bisection saw a smaller budget fail
                added = float((self.e[(la.tensor, q)] - self.e[(la.tensor, p)]).max())
                saved = la.bytes[p] - la.bytes[q]
                cands.append((-(saved / max(added, 1e-12)), self.layers.index(la), la, q))
            cands.sort(key=lambda c: (c[0], c[1]))
            for _, _, la, q in cands:
                if tried >= self.cfg.lower_trials or self.deadline.passed():
                    break
                trial = {**best, la.tensor: q}
                tried += 1
                if self.evaluate(trial, f"lower {la.tensor} to {q}"):
                    best = trial
                    self.lowered.add(la.tensor)
                    improved = True
                    break
        return best

    def _raise_reasons(self, order: list[str]) -> dict[str, int]:
        ranks: dict[str, int] = {}
        for i, t in enumerate(order, 1):
            ranks.setdefault(t, i)
        return ranks

    def _assign(
        self, assignment: dict[str, str], ranks: dict[str, int], why: str, raised_after: set[str] | None = None
    ) -> None:
        lowered = getattr(self, "lowered", set())
        keep = {la.tensor: la.why for la in self.layers}
        by_noise = sorted(self.layers, key=lambda la: -la.noise.get(la.ladder[0], 0.0))
        sens_rank = {la.tensor: i for i, la in enumerate(by_noise, 1)}
        n = len(self.layers)
        for la in self.layers:
            p = assignment[la.tensor]
            la.precision = p
            low = la.ladder[0]
            alone = la.noise.get(low, 0.0)
            text = f"{low} alone adds worst-sample noise {alone:.3g} (sensitivity rank {sens_rank[la.tensor]}/{n})"
            if why:
                la.why = f"{p}: {why}; {text}"
            elif p == low:
                la.why = f"{p}: lowest precision kept; {text}" + (
                    "; lowered back after the search" if la.tensor in lowered else ""
                )
            elif raised_after is not None:
                la.why = (
                    f"{p}: raised after the validation inputs failed; {text}"
                    if la.tensor in raised_after
                    else keep[la.tensor]
                )
            else:
                extra = f"; raised as the {_ordinal(ranks[la.tensor])} upgrade" if la.tensor in ranks else ""
                note = "; lowered one step back after the search" if la.tensor in lowered else ""
                la.why = (
                    f"{p}: {text}; {p} adds {la.noise.get(p, 0.0):.3g} for "
                    f"{la.bytes[p] - la.bytes[low]:+,} bytes over {low}{extra}{note}"
                )

    def _result(self, passed: bool) -> TuneResult:
        return TuneResult(
            layers=self.layers,
            fixed=self.fixed,
            history=self.history,
            evaluations=self.evaluations,
            search_passed=passed,
            seconds=time.perf_counter() - self.start,
            notes=self.notes,
        )

    # -- build ---------------------------------------------------------------------------------

    def build(self, ctx: PassContext) -> tuple[Model, list[PassReport]]:
        """The mixture as a model: the passes run on a fresh copy of the float model with exclusions."""
        model = io.load(self.folded)
        groups: dict[str, set[str]] = {p: set() for p in PRECISIONS}
        reports: list[PassReport] = []

        def sub(names: set[str]) -> PassContext:
            return dataclasses.replace(ctx, exclude=only(names) + tuple(self.exclude))

        if self.cfg.objective == "transport":
            coded = [la for la in self.layers if la.precision.startswith("q")]
            if coded:
                cfg8 = Int8WeightsConfig(
                    granularity="channel",
                    step="rms",
                    ecr_lambda=self.cfg.ecr_lambda,
                    gptq=bool(ctx.calibration) and any(la.method == "gptq" for la in coded),
                    gptq_damp=self.cfg.damp,
                    bits_by_tensor=tuple((la.tensor, float(la.precision[1:])) for la in coded),
                )
                nodes = {n for la in coded for n in la.nodes}
                pass8 = _FittedInt8Pass(cfg8, getattr(self, "factors", {}))
                reports.append(pass8.run(model, sub(nodes), check_quantized=False))
        for la in self.layers:
            if la.precision in groups:
                groups[la.precision].update(la.nodes)

        order = ["int4", "int8", "fp16"] if self.target == "standard" else ["fp16", "int4", "int8"]
        for p in order:
            if not groups[p]:
                continue
            if p == "int4":
                cfg = Int4Config(block_size=self.cfg.block_size, damp=self.cfg.damp)
                reports.append(_FittedInt4Pass(cfg, self.fitted).run(model, sub(groups[p])))
            elif p == "int8":
                pass8 = Int8WeightsPass(Int8WeightsConfig(granularity="block"))
                reports.append(pass8.run(model, sub(groups[p]), check_quantized=False))
            else:
                reports.append(FloatPass(FloatConfig(min_elements=16)).run(model, sub(groups[p])))
        self._check_applied(reports)
        return model, reports

    def _check_applied(self, reports: list[PassReport]) -> None:
        """Mark layers a pass did not change (it skipped them) as float32, with the pass's reason."""
        done: dict[str, set[str]] = {"int4": set(), "int8": set(), "fp16": set()}
        why: dict[str, str] = {}
        for r in reports:
            key = {"int4": "int4", "int8-weights": "int8", "fp16": "fp16"}.get(r.name)
            if key is None:
                continue
            done[key].update(r.tensor_map.values())
            for la in r.stats.get("layers", []) or []:
                done[key].add(la.get("tensor"))
            for n, reason in r.skipped:
                why.setdefault(n, reason)
        for la in self.layers:
            key = "int8" if la.precision.startswith("q") else la.precision
            if key in done and la.tensor not in done[key]:
                reason = why.get(la.tensor) or next((why[n] for n in la.nodes if n in why), "not changed")
                self.notes.append(f"{la.tensor}: assigned {la.precision} but the pass left it float32 ({reason})")
                la.why = f"fp32: the {la.precision} pass skipped it ({reason})"
                la.precision = "fp32"

    def close(self) -> None:
        """Drop the session and the scratch files."""
        self._session = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Tuner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _FittedInt8Pass(Int8WeightsPass):
    """``int8-weights`` with the GPTQ factors the transport search used (fitted on its own share of
    the calibration data), so the built weights are exactly the ones it measured."""

    def __init__(self, config: Int8WeightsConfig, factors: dict[str, np.ndarray]) -> None:
        super().__init__(config)
        self.factors = factors

    def _gptq_factors(self, model, ctx, weights, report):  # type: ignore[no-untyped-def]
        return {t.name: self.factors[t.name] for t, _ in weights.values() if t.name in self.factors}


class _FittedInt4Pass(Int4Pass):
    """The int4 pass with the GPTQ codes the search already fitted (same model, same calibration
    data, same Hessians: refitting would give the same codes and cost the same time again).

    Workaround until :class:`Int4Pass` takes pre-fitted codes itself: overrides its GPTQ step.
    """

    def __init__(self, config: Int4Config, fitted: dict[str, Quantized]) -> None:
        super().__init__(config)
        self.fitted = fitted

    def _fit_gptq(self, model, tree, todo, ctx, stats, strict):  # type: ignore[no-untyped-def]
        out = {id(w.tensor): self.fitted[w.tensor.name] for w in todo if w.tensor.name in self.fitted}
        rest = [w for w in todo if w.tensor.name not in self.fitted]
        if rest:
            out.update(super()._fit_gptq(model, tree, rest, ctx, stats, strict))
        stats["gptq_layers"] = len(out)
        stats["gptq_reused"] = len(todo) - len(rest)
        return out


def _counts(key: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in key:
        out[p] = out.get(p, 0) + 1
    return out


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --------------------------------------------------------------------------- driver


Verifier = Callable[[Model], tuple[bool, Any]]


def tune(
    model: Model,
    ctx: PassContext,
    tolerances: list[TuneTolerance],
    config: TuneConfig | None = None,
    *,
    verify: Verifier | None = None,
    labels_accuracy: float | None = None,
    label_output: str | None = None,
    max_rounds: int = 4,
    check_feeds: list[dict[str, np.ndarray]] | None = None,
    check_labels: np.ndarray | None = None,
    check_margin: float | None = None,
) -> tuple[Model, TuneResult, Any]:
    """Search the mixture on ``ctx.calibration``, build it, and gate it with ``verify``.

    Args:
        model: The float model (folded); it is not modified (a built copy is returned).
        ctx: ``calibration`` (required), ``target``, ``exclude``.
        tolerances: What must hold.
        config: Search options.
        verify: ``verify(built) -> (holds, report)`` on the validation inputs; when it fails, the
            search continues from a tighter budget with every layer at least where it was.
        labels_accuracy: The original's accuracy on the labelled inputs (``relative_accuracy_drop``).
        label_output: The output holding class scores.
        max_rounds: Builds tried before giving up.
        check_feeds: Feeds the bisection and the lowering judge mixtures on (default: the calibration).
        check_labels: Labels of ``check_feeds`` (accuracy measured directly instead of via top-1 agreement).
        check_margin: The margin on ``check_feeds`` (default: ``config.margin``).

    Returns:
        ``(built model, result, the last verify report)``. ``result.search_passed`` and the verify
        report say whether it holds.

    Raises:
        OnnxCompressError: without calibration data, or on a model that is already quantized.
    """
    cfg = config or TuneConfig()
    if not ctx.calibration:
        raise OnnxCompressError(
            "tune needs calibration data to search on: pass --calibration DATA (a .npz of named inputs or a "
            "folder of them) or put <model>.calibration.npz beside the model"
        )
    with Tuner(
        model,
        ctx.calibration,
        tolerances,
        cfg,
        exclude=tuple(ctx.exclude),
        target=ctx.target,
        labels_accuracy=labels_accuracy,
        label_output=label_output,
        check_feeds=check_feeds,
        check_labels=check_labels,
        check_margin=check_margin,
    ) as tuner:
        result = tuner.search()
        built, reports = tuner.build(ctx)
        report = None
        for rnd in range(1, max_rounds + 1):
            if verify is None:
                break
            ok, report = verify(built)
            tuner.history.append(
                {
                    "step": f"verify build {rnd} on the validation inputs",
                    "holds": bool(ok),
                    "failure": (report.failures[0] if report is not None and report.failures else None),
                    "at_seconds": round(time.perf_counter() - tuner.start, 2),
                }
            )
            if ok or rnd == max_rounds or all(la.precision == "fp32" for la in tuner.layers):
                break
            over = overshoot(tolerances, report)
            if rnd == max_rounds - 1 or not math.isfinite(over):
                result = tuner.all_float("float32: smaller mixtures failed on the validation inputs")
            else:
                tuner.margin = tuner.margin / max(over, 1.25) * 0.9
                tuner.notes.append(
                    f"build {rnd} failed on the validation inputs (error {over:.2f}x the allowance): searching again "
                    f"with margin {tuner.margin:.3g}"
                )
                result = tuner.search()
            del built
            built, reports = tuner.build(ctx)
        result = tuner._result(result.search_passed)
        result.passes = reports
        result.notes = tuner.notes
    return built, result, report


def _fraction(t: Tolerance, value: float) -> float:
    """How much of the error allowance of ``t`` the observed ``value`` uses (> 1: it fails)."""
    if not math.isfinite(value):
        return math.inf
    if t.metric in _UNIT_METRICS and t.op in (">=", ">"):
        return (1.0 - value) / max(1.0 - t.value, 1e-12)
    if t.metric == "snr_db" and t.op in (">=", ">"):
        return float(10.0 ** ((t.value - value) / 10.0))
    if t.op in ("<=", "<"):
        return value / t.value if t.value > 0 else (math.inf if value > t.value else 0.0)
    return 1.0 if t.holds(value) else math.inf


def overshoot(tolerances: list[TuneTolerance], report: Any) -> float:
    """The largest fraction of a tolerance's allowance a validation report uses (> 1: it fails)."""
    if report is None:
        return math.inf
    worst = 0.0
    for tt in tolerances:
        t = tt.tol
        values: list[float] = []
        if t.metric in ("accuracy", "accuracy_drop", RELATIVE_ACCURACY_DROP):
            acc = report.accuracy or {}
            key = {"accuracy": "candidate", "accuracy_drop": "drop", RELATIVE_ACCURACY_DROP: "relative_drop"}[t.metric]
            if key in acc:
                values.append(float(acc[key]))
        else:
            for name, diff in (report.outputs or {}).items():
                if t.output is not None and t.output != name:
                    continue
                for d in [diff, *getattr(diff, "parts", [])]:
                    v = getattr(d, t.metric, None)
                    if v is not None:
                        values.append(float(v))
        for v in values:
            worst = max(worst, _fraction(t, v))
    if report.failures and worst <= 1.0:
        return 2.0  # failed on something the tolerances do not measure (a part, non-finite values)
    return worst


# --------------------------------------------------------------------------- the recipe pass


@dataclasses.dataclass(frozen=True)
class TunePassConfig:
    """Settings of the ``tune`` pass (``[[pass]] name = "tune"`` in recipes, or ``--param``)."""

    tolerances: tuple[str, ...] = ("cosine>=0.99",)
    search: TuneConfig = TuneConfig()


def tune_config(params: Params) -> TunePassConfig:
    """From ``--param`` settings: ``tune_tolerance`` (``;``-separated), ``tune_objective``, ``tune_seed``,
    ``tune_margin``, ``tune_budget_seconds``, ``tune_precisions`` (comma-separated)."""
    tol = params.get_str("tune_tolerance", "cosine>=0.99")
    objective = params.get_str("tune_objective", "size", OBJECTIVES)
    seed = params.get_int("tune_seed", 0)
    margin = params.get_float("tune_margin", 0.8)
    budget = params.get_float("tune_budget_seconds", 0.0)
    precisions = params.get_str("tune_precisions", ",".join(PRECISIONS))
    texts = tuple(t.strip() for t in tol.split(";") if t.strip())
    parse_tolerances(list(texts))
    search = TuneConfig(
        objective=objective,
        seed=seed,
        margin=margin,
        budget_seconds=budget or None,
        precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
    )
    return TunePassConfig(texts, search)


class TunePass:
    """The search as a pipeline pass: the model becomes the mixture found on ``ctx.calibration``.

    The pipeline's own validation (on the validation inputs) then gates the result, as for any pass.
    """

    name = "tune"

    def __init__(self, config: TunePassConfig | None = None) -> None:
        self.config = config or TunePassConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Replace ``model.graph`` with the tuned mixture."""
        refuse_quantized(model, self.name)
        before = GraphSize.of(model)
        report = PassReport(self.name)
        if not ctx.calibration:
            raise OnnxCompressError(
                "tune needs calibration data: pass --calibration DATA or put <model>.calibration.npz beside the model"
            )
        tols = parse_tolerances(list(self.config.tolerances))
        if any(t.needs_labels for t in tols):
            report.skipped.append(("*", "accuracy tolerances are checked through top-1 agreement on calibration data"))
        try:
            built, result, _ = tune(model, ctx, tols, self.config.search)
        except OnnxCompressError as exc:
            if "already quantized" in str(exc):
                raise
            report.skipped.append(("*", f"not tuned: {exc}"))
            report.stats = before.stats(model, False, layers=[], nonstandard_ops=[])
            return report
        model.graph = built.graph
        for p in result.passes:
            report.tensor_map.update(p.tensor_map)
        for f in result.fixed:
            report.skipped.append((f["tensor"], f["why"]))
        if not result.search_passed:
            report.skipped.append(("*", "no mixture holds the tolerances on the calibration data"))
        nonstandard = sorted({op for p in result.passes for op in p.stats.get("nonstandard_ops", [])})
        changed = any(p.modified for p in result.passes)
        report.modified = changed
        report.stats = before.stats(
            model,
            changed,
            tune=result.to_dict(),
            layers=[
                {
                    "node": la.nodes[0],
                    "op": la.op,
                    "tensor": la.tensor,
                    "bytes_before": la.bytes["fp32"],
                    "bytes_after": la.bytes[la.precision],
                    "scheme": la.precision,
                }
                for la in result.layers
            ],
            nonstandard_ops=nonstandard,
        )
        return report


# --------------------------------------------------------------------------- a model file


@dataclasses.dataclass
class TuneReport:
    """What ``tune_file`` did: the result of the search, the validation of the written model."""

    input: dict[str, Any]
    output: dict[str, Any]
    size_ratio: float
    tolerances: list[str]
    objective: str
    result: TuneResult
    validation: Any  # ValidationReport of the last build
    written: bool
    seconds: float
    latency: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    calibration: str | None = None

    @property
    def passed(self) -> bool:
        return self.validation is not None and self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (``tune.layers`` lists every layer's precision and why)."""
        return {
            "input": self.input,
            "output": self.output,
            "size_ratio": round(self.size_ratio, 6),
            "tolerances": self.tolerances,
            "objective": self.objective,
            "tune": self.result.to_dict(),
            "passes": [p.to_dict() for p in self.result.passes],
            "validation": self.validation.to_dict() if self.validation is not None else None,
            "latency": self.latency,
            "warnings": self.warnings,
            "written": self.written,
            "seconds": round(self.seconds, 3),
            "calibration": self.calibration,
        }


def _latency(path: Path, feed: dict[str, np.ndarray], budget: float = 3.0) -> float:
    """Median seconds of one run (1 intra-op thread, after a warm-up)."""
    sess = make_session(path, threads=1)
    sess.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < 5 or (len(times) < 25 and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _predictions(outputs: list[np.ndarray]) -> int:
    return int(sum(np.argmax(o, axis=-1).size for o in outputs))


def tune_file(
    model_path: str | Path,
    output: str | Path,
    tolerances: list[str],
    *,
    feeds: list[dict[str, np.ndarray]],
    calibration: list[dict[str, np.ndarray]] | None,
    labels: np.ndarray | None = None,
    label_output: str | None = None,
    feeds_source: str = "given",
    calibration_source: str | None = None,
    config: TuneConfig | None = None,
    target: str = "standard",
    exclude: tuple[str, ...] = (),
    before: list[Any] | None = None,
    force: bool = False,
    parts: bool = True,
    max_memory: int | None = None,
    progress: Callable[[str], None] | None = None,
    search_on: str = "inputs",
) -> TuneReport:
    """Tune a model file and write the mixture to ``output`` only if it holds on ``feeds``.

    Args:
        model_path: The float model (never modified).
        output: Where the tuned model goes.
        tolerances: Tolerance strings (``validate``'s forms and ``relative_accuracy_drop<=x``).
        feeds: Validation inputs (the gate; never searched on).
        calibration: Inputs the search measures on.
        labels: Integer labels of ``feeds`` (for accuracy tolerances).
        label_output: The output holding class scores (default: the first).
        feeds_source: Where ``feeds`` came from, for the report.
        calibration_source: Where the calibration came from, for the report.
        config: Search options.
        target: ``standard`` or ``onnxruntime``.
        exclude: Node patterns kept float32.
        before: Passes run first (e.g. ``fold``), lossless.
        force: Overwrite an existing output.
        parts: Validate concatenated output parts too (see ``validate``).
        max_memory: The loader's memory budget.
        progress: Called with a short message as each stage starts.
        search_on: ``inputs``: the bisection and the lowering judge mixtures on the validation
            inputs (the issue's rule: raise precision until the tolerance holds on them), at
            ``INPUTS_MARGIN`` of the allowance; the sensitivities and GPTQ still come from the
            calibration data only. ``calibration``: judge on calibration data at ``config.margin``;
            the validation inputs are then only the final, held-out gate.

    Raises:
        OnnxCompressError: bad tolerances, labels that do not match the inputs, no calibration data.
        ValidationFailed: when no mixture holds on the validation inputs (nothing is written).
    """
    from .errors import ValidationFailed
    from .stats import model_size
    from .validate import compare

    start = time.perf_counter()
    note = progress or (lambda _m: None)
    cfg = config or TuneConfig()
    tols = parse_tolerances(list(tolerances))
    in_path, out_path = Path(model_path), Path(output)
    io.check_output_path(out_path, force=force, protect=(in_path,))
    if not feeds:
        raise OnnxCompressError("tune needs validation inputs (--inputs, a sidecar, or generated feeds)")
    if any(t.needs_labels for t in tols) and labels is None:
        raise OnnxCompressError("accuracy tolerances need --labels (integer labels of the --inputs)")
    if not calibration:
        raise OnnxCompressError(
            "tune needs calibration data to search on: pass --calibration DATA (a .npz of named inputs or a "
            "folder of them) or put <model>.calibration.npz beside the model"
        )
    note("running the original")
    reference = run_session(make_session(in_path), feeds, "original")
    names = list(reference)
    label_name = label_output or names[0]
    if label_output is not None and label_output not in reference:
        raise OnnxCompressError(f"--label-output {label_output!r} is not an output; outputs: {', '.join(names)}")
    accuracy = None
    if labels is not None:
        count = _predictions(reference[label_name])
        if count != labels.size:
            raise OnnxCompressError(
                f"labels: {labels.size} labels but the model gives {count} predictions on the inputs ({feeds_source})"
            )
        preds = np.concatenate([np.argmax(o, axis=-1).reshape(-1) for o in reference[label_name]])
        accuracy = float(np.mean(preds == labels))
    std_tols = [t.tol for t in tols if t.tol.metric != RELATIVE_ACCURACY_DROP]
    rel_tols = [t.tol for t in tols if t.tol.metric == RELATIVE_ACCURACY_DROP]
    note(f"loading {in_path.name}")
    model = io.load(in_path, max_memory=max_memory)
    in_size = model_size(model)
    ctx = PassContext(calibration=calibration, target=target, exclude=tuple(exclude))
    for p in before or []:
        note(f"running {p.name}")
        p.run(model, ctx)
    staged: list[Any] = []

    def verify(built: Model) -> tuple[bool, Any]:
        note("validating the mixture on the validation inputs")
        for s in staged:
            s.discard()
        staged.clear()
        s = io.stage(built, out_path, force=force, protect=(in_path,))
        staged.append(s)
        rep = compare(
            in_path,
            s.path,
            feeds,
            std_tols,
            labels=labels,
            label_output=label_output,
            feeds_source=feeds_source,
            reference=reference,
            parts=parts,
        )
        if rel_tols and rep.accuracy is not None:
            orig = float(rep.accuracy["original"])
            rel = float(rep.accuracy["drop"]) / orig if orig > 0 else 0.0
            rep.accuracy["relative_drop"] = rel
            for t in rel_tols:
                rep.tolerances.append(str(t))
                if not t.holds(rel):
                    rep.failures.append(f"relative accuracy drop {rel:.4f} fails {t}")
            rep.passed = not rep.failures
        return rep.passed, rep

    try:
        note("searching the mixture")
        if search_on not in SEARCH_ON:
            raise OnnxCompressError(f"search_on {search_on!r}: choose from {', '.join(SEARCH_ON)}")
        on_inputs = search_on == "inputs"
        built, result, validation = tune(
            model,
            ctx,
            tols,
            cfg,
            verify=verify,
            labels_accuracy=accuracy,
            label_output=label_output,
            check_feeds=feeds if on_inputs else None,
            check_labels=labels if on_inputs else None,
            check_margin=INPUTS_MARGIN if on_inputs else None,
        )
        result.search_on = search_on
        del model
        out_size = sum((staged[0].tmpdir / f).stat().st_size for f in staged[0].files) if staged else 0
        latency = None
        warnings: list[str] = []
        if cfg.objective == "latency" and staged and validation is not None and validation.passed:
            note("timing the original and the mixture")
            t_orig = _latency(in_path, feeds[0])
            t_new = _latency(staged[0].path, feeds[0])
            latency = {"original_s": t_orig, "tuned_s": t_new, "ratio": round(t_new / t_orig, 3), "threads": 1}
            if t_new > t_orig * 1.05:
                warnings.append(
                    f"the tuned model measured {t_new / t_orig:.2f}x the original's latency (1 thread, first feed): "
                    "it is slower than the original"
                )
        written = bool(staged) and validation is not None and validation.passed
        transport_bytes = None
        if cfg.objective == "transport" and written:
            from .transport import packed_size

            note("measuring the package size")
            transport_bytes = packed_size(staged[0].path)
        if written:
            staged[0].commit()
        else:
            for s in staged:
                s.discard()
    except BaseException:
        for s in staged:
            s.discard()
        raise
    output_info: dict[str, Any] = {"path": str(out_path), "size_bytes": out_size, "written": written}
    if transport_bytes is not None:
        output_info["transport_bytes"] = int(transport_bytes)
        output_info["transport_ratio"] = round(transport_bytes / in_size, 6) if in_size else None
    report = TuneReport(
        input={"path": str(in_path), "size_bytes": in_size},
        output=output_info,
        size_ratio=out_size / in_size if in_size else 1.0,
        tolerances=[str(t) for t in tols],
        objective=cfg.objective,
        result=result,
        validation=validation,
        written=written,
        seconds=time.perf_counter() - start,
        latency=latency,
        warnings=warnings,
        calibration=calibration_source,
    )
    if not written:
        first = validation.failures[0] if validation is not None and validation.failures else "no mixture holds"
        raise ValidationFailed(
            f"tune: no mixture holds on the validation inputs ({first}); {out_path} not written", report
        )
    return report
