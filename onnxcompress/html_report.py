"""The ``--html FILE`` report: one self-contained HTML page for ``compress``, ``validate``, ``diagnose`` and ``tune``.

``write_html(path, kind, report, extra=...)`` renders the JSON report dict the command writes with
``--report`` (the same dict, nothing recomputed from it) through the jinja2 template
``templates/report.html.j2``; charts are drawn with matplotlib into inline SVG. The page has no
script, no stylesheet or image link and no font download: it opens offline. Every number in a table
carries its JSON value in a ``data-value`` attribute (``data-key`` names the field), so the page can
be checked against the report mechanically.

Sections (each present for the kinds it belongs to; where its data is missing it says what to pass):

* ``summary``: sizes, ratio, latency if measured, validation verdict, and the report's other scalars;
* ``tolerances``: pass/fail of each tolerance with the worst measured value (outputs and parts);
* ``outputs``: per-output metrics, and per concatenated part (``validation.outputs.<name>.parts``);
* ``passes``: what each pass did (compress, tune);
* ``size-by-op``: weight bytes before/after by the op type that reads them (needs the models:
  ``extra["original"]``/``extra["candidate"]``), with a chart;
* ``largest-layers``: the 20 largest layers before/after (from the passes' ``stats.layers`` and, when
  the models are given, every layer's weights);
* ``local-error``: per-layer local error chart and table (a diagnose report, or ``extra["diagnose"]``);
* ``error-histogram``: histograms of per-sample cosine distance and absolute output error
  (``extra["errors"]``, see :func:`sample_errors`);
* ``precision-map``: tune's per-layer precision (``report["layers"]`` of
  ``{"layer", "op", "precision", "reason", "bytes"}``).

``extra`` keys (all optional):

* ``original``, ``candidate``: model paths, for the size breakdown (loaded without their weights);
* ``errors``: ``{output name: {"cosine": per-sample cosines, "abs": |candidate - original| values}}``
  as 1-D arrays (any length; ``abs`` is subsampled for plotting), e.g. from :func:`sample_errors` or
  :func:`errors_from_models`;
* ``diagnose``: a diagnose report dict, to show its local-error chart in a compress/tune page;
* ``latency``: ``{"original_ms": float, "candidate_ms": float, ...}`` (also read from ``report["latency"]``);
* ``title``: the page title.

jinja2 and matplotlib are the optional ``html`` extra; without them :func:`write_html` raises
:class:`~onnxcompress.errors.OnnxCompressError` with the install hint (call :func:`check_available`
before long work so the user learns it at once).
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OnnxCompressError

KINDS = ("compress", "validate", "diagnose", "tune")
INSTALL_HINT = "--html needs the html extra: pip install 'onnxcompress[html]'"
LARGEST_LAYERS = 20
CHART_LAYERS = 30  # bars in the local-error chart
TABLE_LAYERS = 300  # rows in the diagnose / precision tables
HIST_SAMPLES = 200_000  # absolute errors plotted (a deterministic stride subsample beyond this)
OUTPUT_METRICS = ("cosine", "cosine_mean", "snr_db", "max_abs", "mean_abs", "max_rel", "top1_agreement")
PRECISION_ORDER = ("int2", "int3", "int4", "int8", "fp8", "bf16", "fp16", "fp32", "float32", "float")
PRECISION_COLORS = {
    "int4": "#d95f02",
    "int8": "#1b9e77",
    "fp16": "#7570b3",
    "bf16": "#66a61e",
    "fp32": "#666666",
}
# Quantized kernels count as the op they replace in the by-op-type breakdown.
CANONICAL_OPS = {
    "MatMulNBits": "MatMul",
    "MatMulInteger": "MatMul",
    "DynamicQuantizeMatMul": "MatMul",
    "QLinearMatMul": "MatMul",
    "MatMulIntegerToFloat": "MatMul",
    "FusedMatMul": "MatMul",
    "ConvInteger": "Conv",
    "QLinearConv": "Conv",
    "QGemm": "Gemm",
    "GatherBlockQuantized": "Gather",
}
_TOL_RE = re.compile(
    r"^\s*(?:(?P<output>[^:<>=]+):)?\s*(?P<metric>[A-Za-z_0-9]+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>\S+)\s*$"
)


# --------------------------------------------------------------------------- entry points


def check_available() -> None:
    """Raise the install hint unless jinja2 and matplotlib import.

    Raises:
        OnnxCompressError: ``--html needs the html extra: ...`` (the CLI maps it to exit 2).
    """
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError:
        raise OnnxCompressError(INSTALL_HINT) from None


def write_html(
    path: str | os.PathLike[str], kind: str, report: dict[str, Any], *, extra: dict[str, Any] | None = None
) -> None:
    """Render ``report`` (the ``--report`` JSON dict of command ``kind``) to a self-contained HTML file.

    Args:
        path: The ``.html`` file to write (atomically; an existing file is replaced, a symlink refused).
        kind: ``compress``, ``validate``, ``diagnose`` or ``tune``.
        report: The JSON report dict of that command (``CompressionReport.to_dict()``, ...).
        extra: Optional data the JSON does not hold (see the module docstring).

    Raises:
        OnnxCompressError: unknown ``kind``, missing ``html`` extra, or the file cannot be written.
    """
    text = render_html(kind, report, extra=extra)
    _write_text(Path(path), text)


def render_html(kind: str, report: dict[str, Any], *, extra: dict[str, Any] | None = None) -> str:
    """The HTML text of :func:`write_html`."""
    if kind not in KINDS:
        raise OnnxCompressError(f"unknown report kind {kind!r}: choose from {', '.join(KINDS)}")
    if not isinstance(report, dict):
        raise OnnxCompressError("the HTML report needs the JSON report as a dict")
    check_available()
    import jinja2

    context = build_context(kind, report, dict(extra or {}))
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("onnxcompress", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    env.filters["raw"] = raw_value
    return env.get_template("report.html.j2").render(**context)


def sample_errors(refs: list[np.ndarray], cands: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sample cosines and absolute errors of one output over all feeds (the ``extra["errors"]`` values).

    A sample is one row along axis 0 of an output of rank >= 2 (as in ``validate``), else one whole
    output. Non-finite values are zeroed (as in ``validate``); ``abs`` is subsampled to at most
    :data:`HIST_SAMPLES` values. Non-float outputs give empty arrays.
    """
    cos: list[np.ndarray] = []
    absd: list[np.ndarray] = []
    total = sum(int(np.size(r)) for r in refs)
    stride = max(1, math.ceil(total / HIST_SAMPLES))
    for a_full, b_full in zip(refs, cands):
        a_full, b_full = np.asarray(a_full), np.asarray(b_full)
        if a_full.dtype.kind != "f" or a_full.shape != b_full.shape:
            continue
        rows = a_full.shape[0] if a_full.ndim >= 2 and a_full.shape[0] > 0 else 1
        a = np.nan_to_num(a_full.reshape(rows, -1).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        b = np.nan_to_num(b_full.reshape(rows, -1).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.einsum("ij,ij->i", a, b) / (na * nb)
        c = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, c))
        cos.append(np.clip(c, -1.0, 1.0))
        absd.append(np.abs(b - a).reshape(-1)[::stride].astype(np.float32))
    return {
        "cosine": np.concatenate(cos) if cos else np.zeros(0),
        "abs": np.concatenate(absd) if absd else np.zeros(0, np.float32),
    }


def errors_from_models(
    original: str | os.PathLike[str], candidate: str | os.PathLike[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """``extra["errors"]`` by running both models in onnxruntime on ``feeds`` (one extra run of each).

    Prefer :func:`sample_errors` on the outputs validation already computed when they are at hand.
    """
    from .validate import make_session, run_session

    ref = run_session(make_session(original), feeds, "original")
    cand = run_session(make_session(candidate), feeds, "candidate")
    return {name: sample_errors(ref[name], cand[name]) for name in ref if name in cand}


# --------------------------------------------------------------------------- formatting


def format_number(value: Any, key: str = "") -> str:
    """Display text of a report value: bytes with units, ratios and metrics to 6 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if "bytes" in key or key in ("before", "after", "size"):
            return f"{v:,} B ({_human(v)})" if abs(v) >= 1024 else f"{v:,} B"
        return f"{v:,}"
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            return str(f)
        if key.endswith("seconds") or key == "seconds":
            return f"{f:.3f} s"
        if key.endswith("_ms"):
            return f"{f:.3f} ms"
        return f"{f:.6g}"
    return str(value)


def raw_value(value: Any) -> str:
    """The JSON text of a value, for ``data-value`` attributes."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(value, default=str)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.4g} TiB"


def _cell(key: str, value: Any) -> dict[str, Any]:
    return {"key": key, "value": value, "numeric": isinstance(value, (int, float, np.number)) or value is None}


# --------------------------------------------------------------------------- context


def build_context(kind: str, report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Everything the template shows, as plain data (sections in page order)."""
    __version__ = _version()
    validation = report.get("validation") if kind in ("compress", "tune") else report
    if kind == "diagnose" or not isinstance(validation, dict) or "outputs" not in validation:
        validation = None
    sections: list[dict[str, Any]] = [_summary(kind, report, validation, extra)]
    if kind != "diagnose":
        sections.append(_tolerances(validation))
        sections.append(_outputs(validation))
    if kind in ("compress", "tune"):
        sections.append(_passes(report))
    if kind != "diagnose":
        sizes = _model_layers(extra)
        sections.append(_size_by_op(sizes))
        sections.append(_largest_layers(report, sizes))
    diag = report if kind == "diagnose" else extra.get("diagnose")
    if kind == "diagnose" or isinstance(diag, dict):
        sections.append(_local_error(diag if isinstance(diag, dict) else {}))
    if kind != "diagnose":
        sections.append(_histograms(extra.get("errors")))
    if kind == "tune":
        sections.append(_precision_map(report))
    headline = _headline(sections[0], validation)
    default_title = {
        "compress": "Compression report",
        "validate": "Validation report",
        "diagnose": "Per-layer error report",
        "tune": "Mixed-precision tuning report",
    }[kind]
    verdict = None
    if kind == "diagnose":
        verdict = None
    elif validation is not None:
        verdict = bool(validation.get("passed"))
    return {
        "title": str(extra.get("title") or default_title),
        "kind": kind,
        "version": __version__,
        "verdict": verdict,
        "headline": headline,
        "sections": sections,
    }


HEADLINE_KEYS = {
    "size_ratio": "size ratio",
    "output.size_bytes": "output size",
    "input.size_bytes": "original size",
    "extra.original.size_bytes": "original size",
    "extra.candidate.size_bytes": "candidate size",
    "latency.ratio": "latency ratio",
    "validation.accuracy.drop": "accuracy drop",
    "layers[0].local_error": "largest local error",
    "matched": "matched layers",
}


def _headline(summary: dict[str, Any], validation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The few numbers shown as cards at the top: size, ratio, worst cosine, accuracy drop, latency."""
    cards = [
        {"label": HEADLINE_KEYS[r["cell"]["key"]], "cell": r["cell"]}
        for r in summary["rows"]
        if r["cell"]["key"] in HEADLINE_KEYS and r["cell"]["value"] is not None
    ]
    cosines = [
        (float(od["cosine"]), name)
        for name, od in ((validation or {}).get("outputs") or {}).items()
        if isinstance(od, dict) and isinstance(od.get("cosine"), (int, float))
    ]
    if cosines:
        worst, name = min(cosines)
        cards.append({"label": f"worst-sample cosine ({_short(name, 24)})", "cell": _cell("cosine", worst)})
    return cards


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxcompress")
    except PackageNotFoundError:
        return "(source tree)"


def _section(sid: str, title: str, **kw: Any) -> dict[str, Any]:
    base = {"id": sid, "title": title, "note": None, "rows": [], "columns": [], "charts": [], "blocks": []}
    base.update(kw)
    return base


def _summary(kind: str, report: dict[str, Any], validation: dict[str, Any] | None, extra: dict[str, Any]) -> dict:
    rows: list[dict[str, Any]] = []
    shown: set[str] = set()

    def add(label: str, key: str, value: Any, top: str | None = None) -> None:
        rows.append({"label": label, "cell": _cell(key, value)})
        if top:
            shown.add(top)

    if kind in ("compress", "tune"):
        inp, out = report.get("input") or {}, report.get("output") or {}
        if isinstance(inp, dict):
            add("original", "input.path", inp.get("path"), "input")
            add("original size", "input.size_bytes", inp.get("size_bytes"))
        if isinstance(out, dict):
            add("output", "output.path", out.get("path"), "output")
            add("output size", "output.size_bytes", out.get("size_bytes"))
        if "size_ratio" in report:
            add("size ratio", "size_ratio", report.get("size_ratio"), "size_ratio")
        if "techniques" in report:
            add("techniques", "techniques", ", ".join(map(str, report.get("techniques") or [])), "techniques")
    elif kind == "validate":
        for label, key in (("original", "original"), ("candidate", "candidate")):
            p = extra.get(key)
            if p is not None:
                add(label, f"extra.{key}", str(p))
                size = _file_size(p)
                if size is not None:
                    add(f"{label} size", f"extra.{key}.size_bytes", size)
    else:
        for key in ("original", "candidate"):
            add(key, key, report.get(key), key)
        layers = report.get("layers") or []
        if layers and isinstance(layers[0], dict):
            first = layers[0]
            add("first culprit", "layers[0].node", f"{first.get('node')} ({first.get('op_type')})")
            add("its local error", "layers[0].local_error", first.get("local_error"))
        shown.add("layers")
    latency = extra.get("latency") if extra.get("latency") is not None else report.get("latency")
    shown.add("latency")
    if isinstance(latency, dict):
        for k, v in latency.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                add(f"latency {k}", f"latency.{k}", v)
        a, b = latency.get("original_ms"), latency.get("candidate_ms")
        if "ratio" not in latency and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0:
            add("latency ratio (candidate / original)", "latency.ratio", b / a)
    if validation is not None:
        add("validation", "validation.passed", "PASSED" if validation.get("passed") else "FAILED")
        add("feeds", "validation.feeds_source", validation.get("feeds_source"))
        add("number of feeds", "validation.num_feeds", validation.get("num_feeds"))
        add("number of samples", "validation.num_samples", validation.get("num_samples"))
        acc = validation.get("accuracy")
        if isinstance(acc, dict):
            for k in ("original", "candidate", "drop"):
                add(f"accuracy {k}", f"validation.accuracy.{k}", acc.get(k))
        if kind == "validate":
            shown.update(("passed", "feeds_source", "num_feeds", "num_samples", "accuracy"))
    shown.update(("validation", "passes", "outputs", "tolerances", "failures"))
    # The report's remaining top-level scalars (tune's objective, seconds, target, ...).
    for k, v in report.items():
        if k in shown:
            continue
        if isinstance(v, (int, float, str, bool)) or v is None:
            add(k.replace("_", " "), k, v)
    notes = [str(n) for n in (report.get("notes") or [])] if kind == "diagnose" else []
    failures = [str(f) for f in (validation or {}).get("failures") or []]
    return _section(
        "summary", "Summary", rows=rows, blocks=[{"title": "notes", "items": notes}] if notes else [], failures=failures
    )


def _file_size(path: Any) -> int | None:
    try:
        p = Path(path)
        size = p.stat().st_size
    except (OSError, TypeError, ValueError):
        return None
    try:
        from . import io
        from .stats import model_size

        return model_size(io.load(p))
    except Exception:  # the size of an unreadable model: its file size is still worth showing
        return size


def _parse_tolerance(text: str) -> tuple[str | None, str, str, float] | None:
    m = _TOL_RE.match(text)
    if not m:
        return None
    from .validate import METRIC_ALIASES

    metric = METRIC_ALIASES.get(m["metric"].lower(), m["metric"].lower())
    try:
        value = float(m["value"])
    except ValueError:
        return None
    return (m["output"].strip() if m["output"] else None, metric, m["op"], value)


def _tolerances(validation: dict[str, Any] | None) -> dict[str, Any]:
    if validation is None:
        return _section("tolerances", "Tolerances", note="No validation in this report.")
    failures = [str(f) for f in validation.get("failures") or []]
    outputs = validation.get("outputs") or {}
    acc = validation.get("accuracy") if isinstance(validation.get("accuracy"), dict) else None
    rows = []
    for tol in validation.get("tolerances") or []:
        tol = str(tol)
        parsed = _parse_tolerance(tol)
        measured, where = None, None
        if parsed is not None:
            out_name, metric, op, _value = parsed
            if metric in ("accuracy_drop", "accuracy", "relative_accuracy_drop") and acc is not None:
                if metric == "accuracy_drop":
                    measured = acc.get("drop")
                elif metric == "accuracy":
                    measured = acc.get("candidate")
                elif acc.get("original"):
                    measured = float(acc.get("drop", 0.0)) / float(acc["original"])
                where = str(acc.get("output"))
            else:
                worst_first = op in (">=", ">")
                for name, od in outputs.items():
                    if out_name is not None and name != out_name:
                        continue
                    cands = [(name, od)] + [
                        (f"{name} part {p.get('index')}", p) for p in od.get("parts") or [] if isinstance(p, dict)
                    ]
                    for label, d in cands:
                        v = d.get(metric)
                        if not isinstance(v, (int, float)):
                            continue
                        if measured is None or (v < measured if worst_first else v > measured):
                            measured, where = v, label
        failed = any(f.endswith(f"fails {tol}") for f in failures)
        status = "FAIL" if failed else ("PASS" if measured is not None else "n/a")
        rows.append({"tolerance": tol, "measured": _cell("measured", measured), "where": where, "status": status})
    return _section("tolerances", "Tolerances", rows=rows, note=None if rows else "No tolerances were checked.")


def _outputs(validation: dict[str, Any] | None) -> dict[str, Any]:
    if validation is None:
        return _section("outputs", "Per-output metrics", note="No validation in this report.")
    rows = []
    for name, od in (validation.get("outputs") or {}).items():
        if not isinstance(od, dict):
            continue
        rows.append(
            {
                "row": name,
                "label": name,
                "part": False,
                "shape": od.get("shape"),
                "slice": "",
                "passed": bool(od.get("passed", True)),
                "cells": [_cell(m, od.get(m)) for m in OUTPUT_METRICS],
                "failures": list(od.get("failures") or []),
                "note": od.get("parts_note"),
            }
        )
        for p in od.get("parts") or []:
            rows.append(
                {
                    "row": f"{name}#part{p.get('index')}",
                    "label": f"part {p.get('index')}: {p.get('tensor')}",
                    "part": True,
                    "shape": p.get("shape"),
                    "slice": p.get("slice"),
                    "passed": bool(p.get("passed", True)),
                    "cells": [_cell(m, p.get(m)) for m in OUTPUT_METRICS],
                    "failures": list(p.get("failures") or []),
                    "note": None,
                }
            )
    note = None if rows else "The candidate produced no comparable outputs (see the failures in the summary)."
    return _section("outputs", "Per-output metrics", rows=rows, columns=list(OUTPUT_METRICS), note=note)


def _passes(report: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for p in report.get("passes") or []:
        if not isinstance(p, dict):
            continue
        st = p.get("stats") or {}
        rows.append(
            {
                "row": str(p.get("name")),
                "name": str(p.get("name")),
                "changed": bool(p.get("changed")),
                "cells": [
                    _cell("seconds", p.get("seconds")),
                    _cell("nodes_before", st.get("nodes_before")),
                    _cell("nodes_after", st.get("nodes_after")),
                    _cell("bytes_before", st.get("bytes_before")),
                    _cell("bytes_after", st.get("bytes_after")),
                    _cell("skipped", len(p.get("skipped") or [])),
                ],
                "skipped": [f"{s.get('node')}: {s.get('reason')}" for s in (p.get("skipped") or [])[:50]],
                "more_skipped": max(0, len(p.get("skipped") or []) - 50),
            }
        )
    return _section("passes", "Passes", rows=rows, note=None if rows else "This report lists no passes.")


# --------------------------------------------------------------------------- sizes


def layer_weight_bytes(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Weight bytes per layer of a model file: ``[{"node", "op", "bytes"}]`` (values are not loaded).

    Each constant (as :func:`onnxcompress.graph.constant_bytes` counts them) is charged to the node that consumes it, looking
    through nodes that compute only from constants (``DequantizeLinear``, ``Cast``, ``Reshape``, ... of a
    weight), so a quantized weight is charged to the ``MatMul``/``Conv`` that reads it. A constant no
    node reads is charged to ``(unused)``.
    """
    import onnx_graphsurgeon as gs

    from . import io
    from .graph import iter_graphs, tensor_nbytes

    model = io.load(path)
    graphs = list(iter_graphs(model.graph))
    derived: set[int] = set()  # ids of tensors computed only from constants
    consts: dict[int, tuple[Any, int]] = {}  # id -> (tensor whose readers are charged, bytes), each constant once
    owner: dict[int, tuple[str, str]] = {}  # attribute constants: charged to their node itself
    for g in graphs:
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    derived.add(id(t))
                    consts.setdefault(id(t), (t, tensor_nbytes(t)))
            for v in node.attrs.values():
                if not isinstance(v, gs.Constant) or id(v) in consts:
                    continue
                consts[id(v)] = (v, tensor_nbytes(v))
                if node.op == "Constant" and node.outputs:
                    derived.update(id(o) for o in node.outputs)
                    consts[id(v)] = (node.outputs[0], consts[id(v)][1])  # charged to the output's readers
                else:
                    owner[id(v)] = (str(node.name or f"({node.op})"), str(node.op))
    # Constant-only nodes (graphs are topologically sorted; a second sweep catches any out-of-order node).
    for _ in range(2):
        for g in graphs:
            for node in g.nodes:
                if node.op == "Constant" or _has_subgraph(node):
                    continue
                ins = [i for i in node.inputs if i is not None and i.name]
                if ins and all(id(i) in derived for i in ins):
                    derived.update(id(o) for o in node.outputs)
    totals: dict[tuple[str, str], int] = {}
    for cid, (tensor, nbytes) in consts.items():
        if nbytes <= 0:
            continue
        key = owner[cid] if cid in owner else _consumer(tensor, derived)
        totals[key] = totals.get(key, 0) + nbytes
    rows = [{"node": n, "op": op, "bytes": b} for (n, op), b in totals.items()]
    rows.sort(key=lambda r: (-r["bytes"], r["node"]))
    return rows


def _has_subgraph(node: Any) -> bool:
    import onnx_graphsurgeon as gs

    for v in node.attrs.values():
        if isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v)):
            return True
    return False


def _consumer(tensor: Any, derived: set[int]) -> tuple[str, str]:
    seen: set[int] = set()
    frontier = [tensor]
    while frontier:
        t = frontier.pop(0)
        if id(t) in seen:
            continue
        seen.add(id(t))
        for node in t.outputs:
            outs = [o for o in node.outputs if o is not None]
            if outs and all(id(o) in derived for o in outs) and any(o.outputs for o in outs):
                frontier.extend(outs)
                continue
            return str(node.name or f"({node.op})"), str(node.op)
    return "(unused)", "(unused)"


def _model_layers(extra: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | str:
    """Per-layer weight bytes of ``extra["original"]`` and ``extra["candidate"]``, or why they are not available."""
    orig, cand = extra.get("original"), extra.get("candidate")
    if orig is None or cand is None:
        return "the models were not given to the report (extra original/candidate)"
    missing = [str(p) for p in (orig, cand) if not Path(p).exists()]
    if missing:
        return f"{missing[0]} does not exist (not written?)"
    try:
        return layer_weight_bytes(orig), layer_weight_bytes(cand)
    except Exception as exc:  # the breakdown is extra detail: a model the loader rejects just omits it
        return _one_line(exc)


def _size_by_op(sizes: tuple[list[dict[str, Any]], list[dict[str, Any]]] | str) -> dict[str, Any]:
    if isinstance(sizes, str):
        return _section("size-by-op", "Weight bytes by op type", note=f"Not available: {sizes}.")
    before_layers, after_layers = sizes
    before, after = _by_op(before_layers), _by_op(after_layers)
    tb, ta = sum(before.values()), sum(after.values())
    ops = sorted(set(before) | set(after), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o))
    rows = []
    for op in ops:
        b, a = before.get(op, 0), after.get(op, 0)
        rows.append(
            {
                "row": op,
                "label": op,
                "cells": [_cell("bytes_before", b), _cell("bytes_after", a), _cell("ratio", a / b if b else None)],
            }
        )
    rows.append(
        {
            "row": "(total)",
            "label": "total",
            "cells": [_cell("bytes_before", tb), _cell("bytes_after", ta), _cell("ratio", ta / tb if tb else None)],
        }
    )
    big = [o for o in ops if max(before.get(o, 0), after.get(o, 0)) >= 0.005 * max(tb, ta, 1)][:15]
    chart = _bar_pairs_svg(
        big,
        [before.get(o, 0) for o in big],
        [after.get(o, 0) for o in big],
        title="weight bytes by consuming op type (ops over 0.5% of the total)",
        salt="size-by-op",
    )
    note = (
        "Constants charged to the node that reads them, through weight-only nodes (DequantizeLinear, Cast, ...); "
        "quantized kernels count as the op they replace (MatMulNBits, MatMulInteger as MatMul; ConvInteger as Conv)."
    )
    return _section("size-by-op", "Weight bytes by op type", rows=rows, charts=[chart], note=note)


def _by_op(layers: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in layers:
        op = CANONICAL_OPS.get(r["op"], r["op"])
        out[op] = out.get(op, 0) + int(r["bytes"])
    return out


def _largest_layers(
    report: dict[str, Any], sizes: tuple[list[dict[str, Any]], list[dict[str, Any]]] | str
) -> dict[str, Any]:
    layers: dict[str, dict[str, Any]] = {}
    for p in report.get("passes") or []:
        if not isinstance(p, dict):
            continue
        for layer in (p.get("stats") or {}).get("layers") or []:
            if not isinstance(layer, dict) or layer.get("node") is None:
                continue
            key = str(layer["node"])
            row = layers.get(key)
            if row is None:
                layers[key] = {
                    "node": key,
                    "op": layer.get("op"),
                    "tensor": layer.get("tensor"),
                    "before": layer.get("bytes_before"),
                    "after": layer.get("bytes_after"),
                    "scheme": layer.get("scheme"),
                    "source": str(p.get("name")),
                }
            else:  # a later pass changed it again: keep the first "before", the last "after"
                row["after"] = layer.get("bytes_after")
                row["scheme"] = layer.get("scheme") or row["scheme"]
                row["source"] += f", {p.get('name')}"
    from_models = False
    if not isinstance(sizes, str):
        after = {r["node"]: r["bytes"] for r in sizes[1]}
        for r in sizes[0]:
            if r["node"] in layers or r["node"] == "(unused)":
                continue
            layers[r["node"]] = {
                "node": r["node"],
                "op": r["op"],
                "tensor": None,
                "before": r["bytes"],
                "after": after.get(r["node"]),
                "scheme": None,
                "source": "models",
            }
            from_models = True
    if not layers:
        return _section(
            "largest-layers",
            f"{LARGEST_LAYERS} largest layers",
            note="Not available: no pass recorded per-layer sizes and the models were not given to the report.",
        )
    ordered = sorted(layers.values(), key=lambda r: (-(r["before"] or 0), r["node"]))[:LARGEST_LAYERS]
    rows = [
        {
            "row": r["node"],
            "label": r["node"],
            "op": r["op"],
            "tensor": r["tensor"],
            "scheme": r["scheme"],
            "source": r["source"],
            "cells": [
                _cell("bytes_before", r["before"]),
                _cell("bytes_after", r["after"]),
                _cell(
                    "ratio",
                    r["after"] / r["before"]
                    if isinstance(r["before"], (int, float)) and r["before"] and isinstance(r["after"], (int, float))
                    else None,
                ),
            ],
        }
        for r in ordered
    ]
    chart = _bar_pairs_svg(
        [f"{_short(r['node'], 40)} ({r['op']})" for r in ordered],
        [r["before"] or 0 for r in ordered],
        [r["after"] or 0 for r in ordered],
        title=f"{len(ordered)} largest layers: weight bytes",
        salt="largest-layers",
    )
    note = "Sizes of quantized layers come from the passes' stats.layers; " + (
        "the other layers' from the models (weights charged to the node that reads them; "
        "after '–': no candidate node of that name, e.g. fused into another layer)."
        if from_models
        else "give the models to the report for the unchanged layers too."
    )
    return _section("largest-layers", f"{LARGEST_LAYERS} largest layers", rows=rows, charts=[chart], note=note)


# --------------------------------------------------------------------------- diagnose, histograms, precision


def _local_error(diag: dict[str, Any]) -> dict[str, Any]:
    layers = [x for x in diag.get("layers") or [] if isinstance(x, dict)]
    if not layers:
        return _section("local-error", "Per-layer local error", note="No matched layers in the diagnose report.")
    rows = []
    for i, x in enumerate(layers[:TABLE_LAYERS], 1):
        rows.append(
            {
                "row": str(x.get("tensor")),
                "rank": i,
                "node": x.get("node"),
                "op": x.get("op_type"),
                "tensor": x.get("tensor"),
                "changed_by": x.get("changed_by"),
                "cells": [
                    _cell("local_error", x.get("local_error")),
                    _cell("cosine", x.get("cosine")),
                    _cell("snr_db", x.get("snr_db")),
                    _cell("max_abs", x.get("max_abs")),
                ],
            }
        )
    ranked = [x for x in layers if isinstance(x.get("local_error"), (int, float)) and x["local_error"] > 0]
    charts = [_local_error_svg(ranked[:CHART_LAYERS])] if ranked else []
    note = ("The chart shows the layers that add any error. " if ranked else "No layer adds any error. ") + (
        "local error: the relative RMS error a layer adds when fed the original model's inputs "
        "(largest first); cosine (worst sample), SNR and max |error|: the error it carries from all layers before."
    )
    if len(layers) > TABLE_LAYERS:
        note += f" Table: the first {TABLE_LAYERS} of {len(layers)} layers (all are in the JSON report)."
    return _section("local-error", "Per-layer local error", rows=rows, charts=charts, note=note)


def _histograms(errors: Any) -> dict[str, Any]:
    if not isinstance(errors, Mapping) or not errors:
        return _section(
            "error-histogram",
            "Output error histograms",
            note="Not available: the per-sample errors were not given to the report (extra errors).",
        )
    blocks, charts = [], []
    for name, e in errors.items():
        if not isinstance(e, Mapping):
            continue
        cos = np.asarray(e.get("cosine", []), dtype=np.float64).reshape(-1)
        absd = np.asarray(e.get("abs", []), dtype=np.float64).reshape(-1)
        cos, absd = cos[np.isfinite(cos)], absd[np.isfinite(absd)]
        if cos.size == 0 and absd.size == 0:
            continue
        stats = [
            _cell("samples", int(cos.size)),
            _cell("worst_cosine", float(cos.min()) if cos.size else None),
            _cell("median_cosine", float(np.median(cos)) if cos.size else None),
            _cell("p99_abs", float(np.quantile(absd, 0.99)) if absd.size else None),
            _cell("max_abs_plotted", float(absd.max()) if absd.size else None),
        ]
        blocks.append({"row": str(name), "label": str(name), "cells": stats})
        charts.append(_histogram_svg(str(name), cos, absd))
    if not blocks:
        return _section("error-histogram", "Output error histograms", note="No float output errors were given.")
    note = (
        "Left: 1 - cosine per sample (one row along axis 0: a sentence, an image); right: |candidate - original| "
        f"per element (at most {HIST_SAMPLES:,} values, evenly strided). Both on log scales."
    )
    return _section("error-histogram", "Output error histograms", rows=blocks, charts=charts, note=note)


def _precision_key(p: str) -> tuple[int, str]:
    low = p.lower()
    return (PRECISION_ORDER.index(low) if low in PRECISION_ORDER else len(PRECISION_ORDER), low)


def _precision_map(report: dict[str, Any]) -> dict[str, Any]:
    layers = [x for x in report.get("layers") or [] if isinstance(x, dict)]
    if not layers:
        return _section("precision-map", "Per-layer precision", note="The tune report lists no layers.")
    rows = []
    for x in layers[:TABLE_LAYERS]:
        prec = str(x.get("precision"))
        rows.append(
            {
                "row": str(x.get("layer")),
                "layer": x.get("layer"),
                "op": x.get("op"),
                "precision": prec,
                "css": re.sub(r"[^a-z0-9]", "", prec.lower()),
                "reason": x.get("reason"),
                "cells": [_cell("bytes", x.get("bytes"))],
            }
        )
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for x in layers:
        p = str(x.get("precision"))
        counts[p] = counts.get(p, 0) + 1
        b = x.get("bytes")
        sizes[p] = sizes.get(p, 0) + (int(b) if isinstance(b, (int, float)) else 0)
    precs = sorted(counts, key=_precision_key)
    summary = [{"row": p, "label": p, "cells": [_cell("layers", counts[p]), _cell("bytes", sizes[p])]} for p in precs]
    chart = _precision_svg(precs, [counts[p] for p in precs], [sizes[p] for p in precs])
    note = None
    if len(layers) > TABLE_LAYERS:
        note = f"Table: the first {TABLE_LAYERS} of {len(layers)} layers (all are in the JSON report)."
    return _section("precision-map", "Per-layer precision", rows=rows, charts=[chart], note=note, summary=summary)


# --------------------------------------------------------------------------- charts (matplotlib -> inline SVG)


def _short(text: Any, n: int) -> str:
    s = str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def _label(text: Any, n: int = 48) -> str:
    """A chart label: shortened, with ``$`` escaped (matplotlib would parse it as math)."""
    return _short(text, n).replace("$", r"\$")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _svg(fig: Any, salt: str, alt: str) -> dict[str, str]:
    import matplotlib

    buf = _io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"onnxcompress-{salt}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    # Scale with the page: drop the fixed size (the viewBox keeps the aspect ratio).
    text = re.sub(r'^<svg([^>]*?)\swidth="[^"]*"\sheight="[^"]*"', r"<svg\1", text, count=1)
    text = text.replace("<svg", f'<svg class="chart" role="img" aria-label="{_attr(alt)}"', 1)
    return {"svg": text, "alt": alt}


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def _bar_pairs_svg(labels: list[str], before: list[float], after: list[float], *, title: str, salt: str) -> dict:
    n = len(labels)
    fig = _figure(9.0, 1.2 + 0.28 * max(n, 1))
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y - 0.2, before, height=0.4, label="before", color="#9e9e9e")
    ax.barh(y + 0.2, after, height=0.4, label="after", color="#1f77b4")
    ax.set_yticks(y, [_label(s) for s in labels])
    ax.invert_yaxis()
    ax.set_xlabel("bytes")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    _byte_axis(ax.xaxis, max(max(before, default=0), max(after, default=0), 1))
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig, salt, title)


def _byte_axis(axis: Any, top: float) -> None:
    """Ticks at round multiples of B/KiB/MiB/GiB on a bytes axis that reaches ``top``."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    unit = 1.0
    while top / unit >= 1024 and unit < 1024.0**4:
        unit *= 1024
    raw = max(top / unit / 5, 1e-9)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    axis.set_major_locator(MultipleLocator(step * unit))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _human(v) if v else "0"))


def _local_error_svg(layers: list[dict[str, Any]]) -> dict[str, str]:
    n = len(layers)
    fig = _figure(9.0, 1.3 + 0.26 * n)
    ax = fig.add_subplot()
    vals = np.array([float(x["local_error"]) for x in layers])
    by = [str(x.get("changed_by") or "unchanged") for x in layers]
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
    kinds = list(dict.fromkeys(by))
    colors = {k: palette[i % len(palette)] for i, k in enumerate(kinds)}
    y = np.arange(n)
    for k in kinds:
        idx = [i for i, b in enumerate(by) if b == k]
        ax.barh(y[idx], vals[idx], color=colors[k], label=_label(k, 30))
    ax.set_yticks(y, [_label(f"{x.get('node')} ({x.get('op_type')})", 44) for x in layers])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("local error (relative RMS error the layer adds)")
    ax.set_title(f"{n} layers with the largest local error", fontsize=10)
    ax.set_xlim(float(vals.min()) / 3, float(vals.max()) * 3)
    ax.legend(loc="best", fontsize=8, title="changed by", title_fontsize=8)
    ax.grid(axis="x", alpha=0.3, which="both")
    return _svg(fig, "local-error", "per-layer local error")


def _log_bins(values: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Values clipped to ``floor`` (counted as ``zeros``) and log-spaced bins over them."""
    zeros = int(np.sum(values <= floor))
    v = np.maximum(values, floor)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo * 10
    return v, np.logspace(math.log10(lo), math.log10(hi), 41), zeros


def _histogram_svg(name: str, cos: np.ndarray, absd: np.ndarray) -> dict[str, str]:
    fig = _figure(9.0, 2.8)
    axes = fig.subplots(1, 2)
    if cos.size:
        v, bins, zeros = _log_bins(1.0 - cos, 1e-9)
        axes[0].hist(v, bins=bins, color="#1f77b4")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("1 - cosine (per sample)" + (f"; {zeros} exact" if zeros else ""))
        axes[0].set_ylabel("samples")
        axes[0].axvline(float(v.max()), color="#d62728", lw=1, ls="--", label=f"worst {float(cos.min()):.6g}")
        axes[0].legend(fontsize=8)
    else:
        axes[0].set_axis_off()
    if absd.size:
        v, bins, zeros = _log_bins(absd, 1e-12)
        axes[1].hist(v, bins=bins, color="#ff7f0e")
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("|candidate - original| (per element)" + (f"; {zeros} exact" if zeros else ""))
        axes[1].set_ylabel("elements")
    else:
        axes[1].set_axis_off()
    fig.suptitle(f"output {_label(name, 60)}", fontsize=10)
    return _svg(fig, f"hist-{name}", f"error histograms of output {name}")


def _precision_svg(precs: list[str], counts: list[int], sizes: list[int]) -> dict[str, str]:
    fig = _figure(9.0, 2.4)
    axes = fig.subplots(1, 2)
    colors = [PRECISION_COLORS.get(p.lower(), "#999999") for p in precs]
    labels = [_label(p, 12) for p in precs]
    axes[0].bar(labels, counts, color=colors)
    axes[0].set_ylabel("layers")
    axes[1].bar(labels, sizes, color=colors)
    axes[1].set_ylabel("bytes")
    _byte_axis(axes[1].yaxis, max(max(sizes, default=0), 1))
    fig.suptitle("layers and bytes by final precision", fontsize=10)
    return _svg(fig, "precision", "layers and bytes by precision")


# --------------------------------------------------------------------------- writing


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _write_text(path: Path, text: str) -> None:
    if path.is_symlink():
        raise OnnxCompressError(f"HTML report path {path} is a symlink: refusing to write through it")
    if not path.parent.exists():
        raise OnnxCompressError(f"HTML report folder {path.parent} does not exist")
    if path.is_dir():
        raise OnnxCompressError(f"HTML report path {path} is a folder")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxcompress-html-", suffix=".html", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OnnxCompressError(f"cannot write HTML report {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
