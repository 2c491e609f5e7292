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

Tolerances are strings ``[output:]metric OP value`` with OP in ``>= <= > <``, e.g. ``cosine>=0.999``,
``top1>=0.99``, ``max_abs<=1e-3``, ``logits:snr_db>=30``, ``accuracy_drop<=0.005``. Each is checked on
every output where the metric applies.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OnnxCompressError

SNR_CAP = 300.0
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
        return f"{prefix}{self.metric}{self.op}{self.value:g}"

    def holds(self, value: float) -> bool:
        """Whether ``value`` satisfies this bound (NaN never does)."""
        return not math.isnan(value) and _OPS[self.op](value, self.value)


@dataclasses.dataclass
class OutputDiff:
    """Differences on one output; ``None`` where a metric does not apply."""

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
    diff = OutputDiff(name=name, shape=list(ref0.shape), dtype=str(ref0.dtype))
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


def _accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    preds = np.concatenate([np.argmax(o, axis=-1).reshape(-1) for o in outputs])
    if preds.size != labels.size:
        raise OnnxCompressError(
            f"labels: {labels.size} labels but the model gives {preds.size} predictions on the inputs"
        )
    return float(np.mean(preds == labels))


# --------------------------------------------------------------------------- running


def make_session(path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session opened from a file path.

    Raises:
        OnnxCompressError: with onnxruntime's first line when the model cannot be run.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors are raised as exceptions; keep stderr to one line
    if threads:
        opts.intra_op_num_threads = threads
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


def run_session(session: Any, feeds: list[dict[str, np.ndarray]], label: str) -> dict[str, list[np.ndarray]]:
    """Run every feed; return ``{output name: [array per feed]}``."""
    names = [o.name for o in session.get_outputs()]
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, feed in enumerate(feeds):
        try:
            outs = session.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise OnnxCompressError(
                f"onnxruntime failed to run the {label} model on feed {i}: {_first_line(exc)}"
            ) from None
        for n, o in zip(names, outs):
            results[n].append(np.asarray(o))
    return results


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
    """
    import time

    start = time.perf_counter()
    tols = [t if isinstance(t, Tolerance) else Tolerance.parse(t) for t in tolerances]
    ref = reference if reference is not None else run_session(make_session(original), feeds, "original")
    try:
        cand_session = make_session(candidate)
        cand_names = [o.name for o in cand_session.get_outputs()]
        if cand_names != list(ref):
            raise OnnxCompressError(f"the models' outputs differ: original {list(ref)}, candidate {cand_names}")
        cand = run_session(cand_session, feeds, "candidate")
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
    outputs = {name: output_diff(name, ref[name], cand[name]) for name in ref}
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
            if value is None:
                continue
            if not t.holds(float(value)):
                diff.passed = False
                diff.failures.append(f"{t.metric}={float(value):.6g} fails {t}")
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
