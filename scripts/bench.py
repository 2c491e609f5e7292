"""Benchmark onnxcompress against the closest onnxruntime.quantization configurations.

For every model (``models/*.onnx``, ``models/cache/minilm/minilm.onnx`` if present, and ``--model``
paths) and every tool -- each pass of ``onnxcompress.recipes.PASSES`` run through
``onnxcompress.compress``, plus the anchors ``quantize_dynamic`` (QInt8, per channel and per tensor)
and ``MatMulNBitsQuantizer`` (8 and 4 bits, where this onnxruntime has it) -- one row reports:

* size ratio: output bytes (external data included) / input bytes;
* latency ratio: onnxruntime CPU, ``intra_op_num_threads=1``, candidate / original, each the median of
  ``--runs`` timed samples after warm-up; both sessions live in this process and are timed alternately
  (ABBA order) on the same feed, each sample averaging enough calls to last a few milliseconds;
* fidelity on the model's feeds (sidecar ``<stem>.inputs.npz`` or generated, exactly as ``compress``
  picks them), with onnxcompress's own metrics (``onnxcompress.validate``): worst-sample cosine, mean
  cosine, max_abs, SNR, top-1 agreement -- each the worst over the model's outputs -- and accuracy of
  the original and the candidate when ``<stem>.labels.npy`` exists;
* the tool's wall time and peak RSS, measured in a fresh subprocess per tool run (so the RSS is that
  tool's own; for onnxcompress it includes ``compress``'s built-in validation).

``--big`` adds the >2 GB round trip of ``scripts/big_model.py`` (when that module exists).

Usage::

    python scripts/bench.py                       # all models, all techniques, anchors
    python scripts/bench.py --quick               # smoke check: few runs
    python scripts/bench.py --model m.onnx --no-default-models --technique int8-weights
    python scripts/bench.py --anchor-python /path/venv/bin/python   # anchors from another env

Anchors run in the interpreter given by ``--anchor-python`` (default: ``$BENCH_ANCHOR_PYTHON`` or this
one). ``MatMulNBitsQuantizer`` needs the ``onnx-ir`` package in that interpreter; without it those rows
are skipped with a note.

This is a development tool: the onnxcompress package never imports it. Its top level imports only the
standard library so that ``--worker`` subprocesses (which may run in another interpreter) load only
what the measured tool needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEFAULT_JSON = REPO / "bench-results" / "bench.json"
MINILM = REPO / "models" / "cache" / "minilm" / "minilm.onnx"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx")
DEFAULT_RUNS = 20
QUICK_RUNS = 5
DEFAULT_TOOL_TIMEOUT = 1800
EXTERNAL_DATA_BYTES = 1_800_000_000


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One way of compressing a model.

    Attributes:
        name: Row label (an onnxcompress technique name, or ``ort-...`` for an anchor).
        kind: ``onnxcompress`` or ``anchor``.
        worker: Key of the worker function in :data:`WORKERS` that runs it in a subprocess.
        params: Arguments for the worker (JSON-serialisable).
        tolerances_of: Technique whose default tolerances judge the result (anchors borrow the
            closest onnxcompress technique's).
        python: Interpreter that runs the worker.
    """

    name: str
    kind: str
    worker: str
    params: dict[str, Any]
    tolerances_of: str
    python: str


@dataclasses.dataclass
class ModelCase:
    """A model to benchmark, with its feeds and reference outputs (filled by :func:`prepare_model`)."""

    name: str
    path: Path
    size_bytes: int = 0
    feeds: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    feeds_source: str = ""
    labels: np.ndarray | None = None
    reference: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    latency_feed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON summary (no arrays)."""
        first = next(iter(self.latency_feed.values()), None)
        return {
            "name": self.name,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "feeds_source": self.feeds_source,
            "num_feeds": len(self.feeds),
            "has_labels": self.labels is not None,
            "latency_feed_shapes": {k: list(v.shape) for k, v in self.latency_feed.items()},
            "latency_batch": int(first.shape[0]) if first is not None and first.ndim else None,
        }


@dataclasses.dataclass
class Row:
    """The result of one tool on one model."""

    model: str
    tool: str
    kind: str
    ok: bool = False
    error: str | None = None
    size_bytes: int | None = None
    size_ratio: float | None = None
    latency: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    passes: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return _finite(dataclasses.asdict(self))


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None, recursively (JSON has no NaN/Inf)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- environment


def cpu_info() -> dict[str, Any]:
    """CPU model name, logical core count and the SIMD/matrix flags that matter for int8 kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    present = {f: f in flags for f in CPU_FLAGS if f != "amx"}
    amx = sorted(f for f in flags if f.startswith("amx"))
    present["amx"] = bool(amx)
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "flags": present,
        "amx_flags": amx,
        "flags_read": bool(flags),
    }


def environment_info() -> dict[str, Any]:
    """Versions of the stack and the CPU description."""
    import numpy
    import onnx
    import onnxruntime

    import onnxcompress

    return {
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
        "onnxcompress": onnxcompress.__version__,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def format_header(env: dict[str, Any], anchor_env: dict[str, Any] | None, args: argparse.Namespace) -> str:
    """The lines printed before the benchmark starts."""
    cpu = env["cpu"]
    flags = "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    if cpu["amx_flags"]:
        flags += f" ({','.join(cpu['amx_flags'])})"
    if not cpu["flags_read"]:
        flags += "  [flags unknown: /proc/cpuinfo unreadable]"
    lines = [
        f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs)",
        f"     {flags}",
        f"python {env['python']}  onnxruntime {env['onnxruntime']}  onnx {env['onnx']}  numpy {env['numpy']}  "
        f"onnxcompress {env['onnxcompress']}",
        f"latency: intra_op_num_threads=1, median of {args.runs} samples after {args.warmup} warm-up calls, "
        f"ABBA-interleaved, batch {args.batch}",
    ]
    if anchor_env is not None:
        where = anchor_env["python"]
        ver = anchor_env.get("onnxruntime", "?")
        mismatch = "  ** differs from this process's onnxruntime **" if ver != env["onnxruntime"] else ""
        lines.append(f"anchors run in {where} (onnxruntime {ver}){mismatch}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- discovery


def discover_models(explicit: Iterable[str], include_defaults: bool) -> list[Path]:
    """``models/*.onnx``, the cached MiniLM if present, then the ``--model`` paths; deduplicated."""
    found: list[Path] = []
    if include_defaults:
        found += sorted((REPO / "models").glob("*.onnx"))
        if MINILM.exists():
            found.append(MINILM)
    found += [Path(p) for p in explicit]
    seen: set[Path] = set()
    out = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def probe_anchor_python(python: str) -> dict[str, Any]:
    """What the anchor interpreter offers: onnxruntime version, quantize_dynamic, MatMulNBitsQuantizer."""
    code = (
        "import json, importlib\n"
        "out = {}\n"
        "try:\n"
        "    import onnxruntime; out['onnxruntime'] = onnxruntime.__version__\n"
        "    from onnxruntime.quantization import quantize_dynamic; out['quantize_dynamic'] = None\n"
        "except Exception as e:\n"
        "    out['quantize_dynamic'] = f'{type(e).__name__}: {e}'\n"
        "try:\n"
        "    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer\n"
        "    out['matmul_nbits'] = None\n"
        "except Exception as e:\n"
        "    out['matmul_nbits'] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        msg = f"cannot run {python}: {exc}"
        info = {"quantize_dynamic": msg, "matmul_nbits": msg}
    info["python"] = python
    return info


def select_tools(args: argparse.Namespace, anchor_env: dict[str, Any] | None, notes: list[str]) -> list[ToolSpec]:
    """The onnxcompress techniques (from the registry) and the available anchors."""
    from onnxcompress.recipes import PASSES

    names = args.technique or list(PASSES)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise SystemExit(f"unknown technique(s) {unknown}; choose from {', '.join(PASSES)}")
    tools = [ToolSpec(n, "onnxcompress", "onnxcompress", {"technique": n}, n, sys.executable) for n in names]
    if anchor_env is None:
        return tools
    anchors = anchor_specs(anchor_env["python"])
    if args.anchor:
        bad = [a for a in args.anchor if a not in {t.name for t in anchors}]
        if bad:
            raise SystemExit(f"unknown anchor(s) {bad}; choose from {', '.join(t.name for t in anchors)}")
        anchors = [t for t in anchors if t.name in args.anchor]
    for worker, key in (("ort-dynamic", "quantize_dynamic"), ("ort-nbits", "matmul_nbits")):
        why = anchor_env.get(key)
        chosen = [t for t in anchors if t.worker == worker]
        if why and chosen:
            hint = " (pip install onnx-ir there, or pass --anchor-python)" if "onnx_ir" in why else ""
            notes.append(
                f"skipped {', '.join(t.name for t in chosen)}: not available in {anchor_env['python']}: {why}{hint}"
            )
            anchors = [t for t in anchors if t.worker != worker]
    return tools + anchors


def anchor_specs(python: str) -> list[ToolSpec]:
    """The onnxruntime.quantization configurations closest to onnxcompress's techniques."""
    return [
        ToolSpec("ort-dynamic-int8", "anchor", "ort-dynamic", {"per_channel": True}, "int8-weights", python),
        ToolSpec(
            "ort-dynamic-int8-per-tensor",
            "anchor",
            "ort-dynamic",
            {"per_channel": False},
            "int8-weights-per-tensor",
            python,
        ),
        ToolSpec(
            "ort-nbits8-b32",
            "anchor",
            "ort-nbits",
            {"bits": 8, "block_size": 32, "symmetric": True},
            "int8-weights",
            python,
        ),
        ToolSpec(
            "ort-nbits4-b32",
            "anchor",
            "ort-nbits",
            {"bits": 4, "block_size": 32, "symmetric": False},
            "int8-weights-per-tensor",
            python,
        ),
    ]


# --------------------------------------------------------------------------- subprocess workers


def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident memory in bytes.

    For this process it is ``VmHWM`` from ``/proc/self/status`` where there is one: Linux carries a
    parent's RSS into a spawned child's ``ru_maxrss`` (the high-water mark survives fork + exec), so
    ``ru_maxrss`` would read the benchmark's own memory. Elsewhere, and for ``RUSAGE_CHILDREN``, it
    is ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    if who == resource.RUSAGE_SELF:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    value = resource.getrusage(who).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)


def _work_onnxcompress(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``onnxcompress.compress`` with one technique; keep the report even when validation fails."""
    import onnxcompress as oc

    feed_opts = oc.FeedOptions(**params.get("feed_options", {}))
    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        report = oc.compress(model, output, [params["technique"]], feeds=feed_opts, force=True)
        validation_failed = False
    except oc.ValidationFailed as exc:
        report, validation_failed = exc.report, True
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rss_after_import": rss_import,
        "validation_failed": validation_failed,
        "report": report.to_dict() if report is not None else None,
    }


def _work_ort_dynamic(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``quantize_dynamic(weight_type=QInt8, per_channel=...)``."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.WARNING)
    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    quantize_dynamic(
        model,
        output,
        weight_type=QuantType.QInt8,
        per_channel=bool(params["per_channel"]),
        use_external_data_format=_total_size(Path(model)) > EXTERNAL_DATA_BYTES,
        # ORT's documented workaround for tensors its shape inference cannot type (contrib ops).
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import}


def _work_ort_nbits(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``MatMulNBitsQuantizer`` (weight-only, blockwise, MatMul only) with the default RTN algorithm."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    bits, block, sym = int(params["bits"]), int(params["block_size"]), bool(params["symmetric"])
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits)
    quant = MatMulNBitsQuantizer(onnx.load(model), bits=bits, block_size=block, is_symmetric=sym, algo_config=config)
    quant.process()
    quant.model.save_model_to_file(output, _total_size(Path(model)) > EXTERNAL_DATA_BYTES)
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import}


def _work_big_build(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``big_model.build_big_model(folder, total_bytes)``; ``output`` is the folder."""
    module = _load_big_model()
    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    path = module.build_big_model(Path(output), total_bytes=float(params["total_bytes"]))
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import, "path": str(path)}


def _work_big_roundtrip(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``big_model.measure_roundtrip(model_path, out_dir)``."""
    module = _load_big_model()
    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    figures = module.measure_roundtrip(Path(model), Path(output))
    return {
        "seconds": time.perf_counter() - start,
        "rss_after_import": rss_import,
        "figures": json.loads(json.dumps(figures, default=str)),
    }


WORKERS: dict[str, Callable[[str, str, dict[str, Any]], dict[str, Any]]] = {
    "onnxcompress": _work_onnxcompress,
    "ort-dynamic": _work_ort_dynamic,
    "ort-nbits": _work_ort_nbits,
    "big-build": _work_big_build,
    "big-roundtrip": _work_big_roundtrip,
}


def worker_main(spec_path: str) -> int:
    """Entry point of a ``--worker`` subprocess: run one tool, write its figures as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any]
    try:
        result = WORKERS[spec["worker"]](spec["model"], spec["output"], spec["params"])
        result["ok"] = True
    except BaseException as exc:  # report any failure of the measured tool to the parent
        result = {"ok": False, "error": f"{type(exc).__name__}: {_first_line(str(exc))}"}
    result["peak_rss"] = _peak_rss_bytes(resource.RUSAGE_SELF)
    result["peak_rss_children"] = _peak_rss_bytes(resource.RUSAGE_CHILDREN)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


def run_worker(
    python: str, worker: str, model: Path | str, output: Path, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run one worker in a fresh subprocess and return its figures plus the process wall time."""
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as d:
        spec_path, result_path = Path(d) / "spec.json", Path(d) / "result.json"
        spec = {"worker": worker, "model": str(model), "output": str(output), "params": params}
        spec["result"] = str(result_path)
        spec_path.write_text(json.dumps(spec))
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [python, str(SCRIPT), "--worker", str(spec_path)],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=str(REPO),
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "process_seconds": timeout}
        wall = time.perf_counter() - start
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()
            result = {"ok": False, "error": f"worker exited {proc.returncode}: {tail[-1] if tail else 'no output'}"}
        result["process_seconds"] = wall
        return result


# --------------------------------------------------------------------------- measuring in this process


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def _total_size(path: Path) -> int:
    """Bytes of a model file plus the external-data files it references (onnxcompress's loader)."""
    try:
        from onnxcompress.io import file_size
    except ImportError:  # in an anchor interpreter without onnxcompress: file plus a ``.data`` sibling
        data = path.with_name(path.name + ".data")
        return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return file_size(path)


def prepare_model(path: Path, batch: int) -> ModelCase:
    """Load feeds exactly as ``compress`` does, compute the reference outputs once, pick the latency feed."""
    import onnxcompress as oc
    from onnxcompress.api import resolve_feeds
    from onnxcompress.feeds import input_signature
    from onnxcompress.validate import make_session, run_session

    case = ModelCase(name=path.stem, path=path)
    case.size_bytes = _total_size(path)
    model = oc.load(path)
    case.feeds, case.feeds_source, case.labels = resolve_feeds(model, path, oc.FeedOptions())
    static_batch = {s.name for s in input_signature(model) if s.shape and isinstance(s.shape[0], int)}
    del model
    case.reference = run_session(make_session(path), case.feeds, "original")
    case.latency_feed = latency_feed(case.feeds[0], batch, static_batch) if case.feeds else {}
    return case


def latency_feed(feed: dict[str, np.ndarray], batch: int, static_batch: set[str]) -> dict[str, np.ndarray]:
    """The feed cut to ``batch`` samples along axis 0, except inputs whose axis 0 is static."""
    out = {}
    for name, arr in feed.items():
        cut = batch > 0 and arr.ndim >= 1 and name not in static_batch
        out[name] = arr[:batch].copy() if cut else arr
    return out


def _session(path: Path | str, threads: int = 1) -> Any:
    """A CPU session with ``threads`` intra-op threads, one inter-op thread, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def measure_latency(
    original: Path, candidate: Path, feed: dict[str, np.ndarray], runs: int, warmup: int, sample_s: float
) -> dict[str, Any]:
    """Median per-call latency of both models, timed alternately in this process.

    Each of the ``runs`` samples times ``inner`` consecutive calls (chosen so a sample lasts about
    ``sample_s``) and the order alternates A B, B A, ... so drift and cache warmth hit both alike.
    ``ratio`` is the median of the per-sample ratios candidate/original.
    """
    sessions = {"original": _session(original), "candidate": _session(candidate)}
    for s in sessions.values():
        for _ in range(max(warmup, 1)):
            s.run(None, feed)
    start = time.perf_counter()
    sessions["original"].run(None, feed)
    one = max(time.perf_counter() - start, 1e-6)
    inner = int(min(1000, max(1, math.ceil(sample_s / one))))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for i in range(runs):
        for key in order if i % 2 == 0 else order[::-1]:
            sess = sessions[key]
            t0 = time.perf_counter()
            for _ in range(inner):
                sess.run(None, feed)
            samples[key].append((time.perf_counter() - t0) / inner)
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Samples i of A and B are adjacent in time: the median of their ratios cancels slow drift.
    paired = statistics.median(b / a for a, b in zip(samples["original"], samples["candidate"]))
    return {
        "original_ms": med["original"] * 1e3,
        "candidate_ms": med["candidate"] * 1e3,
        "ratio": paired,
        "ratio_of_medians": med["candidate"] / med["original"],
        "original_spread": _spread(samples["original"]),
        "candidate_spread": _spread(samples["candidate"]),
        "runs": runs,
        "calls_per_sample": inner,
        "threads": 1,
    }


def _spread(values: list[float]) -> float:
    """Interquartile range relative to the median (a noise indicator)."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def fidelity_summary(validation: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metrics from a validation report dict (``ValidationReport.to_dict()``).

    Cosines, max_abs and SNR are the worst over the outputs; top-1 agreement is the label output's.
    """
    if validation is None:
        return None
    outs = list(validation["outputs"].values())

    def pick(key: str, fn: Callable[[list[float]], float]) -> float | None:
        vals = [float(o[key]) for o in outs if o.get(key) is not None]
        return fn(vals) if vals else None

    acc = validation.get("accuracy") or {}
    # top-1 only means something on class scores: the label output (default: the first output), not
    # e.g. a hidden state whose argmax over the feature axis is noise.
    label_output = acc.get("output") or (outs[0]["name"] if outs else None)
    top1 = next((o.get("top1_agreement") for o in outs if o["name"] == label_output), None)
    return {
        "cosine_min": pick("cosine", min),
        "cosine_mean": pick("cosine_mean", min),
        "max_abs": pick("max_abs", max),
        "snr_db": pick("snr_db", min),
        "top1": top1,
        "top1_output": label_output,
        "accuracy_original": acc.get("original"),
        "accuracy_candidate": acc.get("candidate"),
        "passed": validation["passed"],
        "failures": validation["failures"],
        "tolerances": validation["tolerances"],
        "outputs": {
            o["name"]: {k: o.get(k) for k in ("cosine", "cosine_mean", "max_abs", "snr_db", "top1_agreement")}
            for o in outs
        },
    }


def validate_anchor(case: ModelCase, candidate: Path, tolerances_of: str) -> dict[str, Any]:
    """Compare an anchor's output with the original on the model's feeds, with onnxcompress's metrics."""
    from onnxcompress.recipes import default_tolerances
    from onnxcompress.validate import compare

    report = compare(
        case.path,
        candidate,
        case.feeds,
        default_tolerances([tolerances_of]),
        labels=case.labels,
        feeds_source=case.feeds_source,
        reference=case.reference,
    )
    return report.to_dict()


def bench_tool(case: ModelCase, tool: ToolSpec, workdir: Path, args: argparse.Namespace) -> Row:
    """Run one tool on one model in a subprocess, then measure size, fidelity and latency here."""
    row = Row(model=case.name, tool=tool.name, kind=tool.kind)
    outdir = workdir / f"{case.name}--{tool.name}"
    outdir.mkdir(parents=True, exist_ok=True)
    output = outdir / f"{case.name}.onnx"
    res = run_worker(tool.python, tool.worker, case.path, output, tool.params, args.tool_timeout)
    row.run = {
        "seconds": res.get("seconds"),
        "process_seconds": res.get("process_seconds"),
        "peak_rss_mb": res["peak_rss"] / 2**20 if "peak_rss" in res else None,
        "rss_after_import_mb": res["rss_after_import"] / 2**20 if "rss_after_import" in res else None,
        "peak_rss_children_mb": res["peak_rss_children"] / 2**20 if "peak_rss_children" in res else None,
    }
    if not res.get("ok"):
        row.error = res.get("error", "unknown failure")
        return row
    try:
        validation: dict[str, Any] | None
        if tool.kind == "onnxcompress":
            report = res["report"]
            validation = report.get("validation")
            row.passes = report.get("passes")
            row.run["passes_seconds"] = sum(p.get("seconds", 0.0) for p in row.passes or [])
            row.run["validation_seconds"] = (validation or {}).get("seconds")
        else:
            validation = validate_anchor(case, output, tool.tolerances_of)
        row.size_bytes = _total_size(output)
        row.size_ratio = row.size_bytes / case.size_bytes if case.size_bytes else None
        row.fidelity = fidelity_summary(validation)
        row.latency = measure_latency(
            case.path, output, case.latency_feed, args.runs, args.warmup, args.sample_ms / 1e3
        )
        row.ok = True
    except Exception as exc:  # one broken candidate must not stop the benchmark
        row.error = f"{type(exc).__name__}: {_first_line(str(exc))}"
    finally:
        if args.keep_outputs is None:
            shutil.rmtree(outdir, ignore_errors=True)
    return row


def bench_model(
    path: Path, tools: list[ToolSpec], workdir: Path, args: argparse.Namespace
) -> tuple[ModelCase | None, list[Row]]:
    """All tools on one model; a model that cannot be prepared yields one error row."""
    try:
        case = prepare_model(path, args.batch)
    except Exception as exc:  # report and go on with the next model
        return None, [Row(model=path.stem, tool="(prepare)", kind="-", error=f"{type(exc).__name__}: {exc}")]
    rows = []
    for tool in tools:
        print(f"  {case.name}: {tool.name} ...", end="", flush=True, file=sys.stderr)
        t0 = time.perf_counter()
        row = bench_tool(case, tool, workdir, args)
        status = "ok" if row.ok else f"error: {row.error}"
        print(f" {status} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        rows.append(row)
    return case, rows


# --------------------------------------------------------------------------- big model


def _load_big_model() -> Any:
    """Import ``scripts/big_model.py`` by path (it is not a package module)."""
    path = SCRIPT.parent / "big_model.py"
    spec = importlib.util.spec_from_file_location("big_model", path)
    if spec is None or spec.loader is None or not path.exists():
        raise ImportError(f"{path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reported_peak_rss(figures: dict[str, Any]) -> int | None:
    """The peak RSS, in bytes, that ``measure_roundtrip`` reports (its ``peak_rss`` key)."""
    for key in ("peak_rss", "peak_rss_bytes"):
        value = figures.get(key)
        if isinstance(value, (int, float)):
            return int(value)
    if isinstance(figures.get("peak_rss_mb"), (int, float)):
        return int(figures["peak_rss_mb"] * 2**20)
    return None


def run_big(args: argparse.Namespace, notes: list[str]) -> dict[str, Any] | None:
    """Build the >2 GB model and measure its round trip, each in its own subprocess."""
    if not (SCRIPT.parent / "big_model.py").exists():
        notes.append("--big: scripts/big_model.py does not exist yet; big-model figures skipped")
        return None
    out: dict[str, Any] = {"total_bytes_requested": args.big_bytes}
    with tempfile.TemporaryDirectory(prefix="bench-big-", dir=args.big_dir) as d:
        folder = Path(d) / "model"
        folder.mkdir()
        print(f"  big model: building {args.big_bytes / 1e9:.2f} GB in {folder} ...", file=sys.stderr, flush=True)
        build = run_worker(sys.executable, "big-build", "", folder, {"total_bytes": args.big_bytes}, args.tool_timeout)
        out["build"] = {k: v for k, v in build.items() if k != "path"}
        if not build.get("ok"):
            notes.append(f"--big: build_big_model failed: {build.get('error')}")
            return out
        model = Path(build["path"])
        out["fp32_bytes"] = _total_size(model)
        print("  big model: measure_roundtrip ...", file=sys.stderr, flush=True)
        rt_dir = Path(d) / "out"
        rt_dir.mkdir()
        rt = run_worker(sys.executable, "big-roundtrip", model, rt_dir, {}, args.tool_timeout)
        out["roundtrip"] = {k: v for k, v in rt.items() if k != "figures"}
        if not rt.get("ok"):
            notes.append(f"--big: measure_roundtrip failed: {rt.get('error')}")
            return out
        figures = rt.get("figures") or {}
        reported = _reported_peak_rss(figures) if isinstance(figures, dict) else None
        out["figures"] = figures
        out["reported_peak_rss_bytes"] = reported
        out["reported_peak_rss_ratio"] = reported / out["fp32_bytes"] if reported else None
        out["process_peak_rss_bytes"] = max(rt.get("peak_rss", 0), rt.get("peak_rss_children", 0))
        out["process_peak_rss_ratio"] = out["process_peak_rss_bytes"] / out["fp32_bytes"]
        out["wall_seconds"] = rt.get("seconds")
    return out


def format_big(big: dict[str, Any]) -> str:
    """A few lines of the big-model figures."""
    if "fp32_bytes" not in big:
        return f"big model: build failed: {big.get('build', {}).get('error')}"
    build = big["build"]
    lines = [
        f"big model: fp32 {big['fp32_bytes'] / 1e9:.2f} GB, built in {build.get('seconds') or float('nan'):.1f} s "
        f"(builder peak RSS {build.get('peak_rss', 0) / 2**20:.0f} MB)"
    ]
    if big.get("wall_seconds") is None:
        return "\n".join(lines)
    f = big.get("figures") or {}
    nan = float("nan")
    lines.append(
        f"  measure_roundtrip: {big['wall_seconds']:.1f} s in all; load {f.get('load_s', nan):.1f} s, "
        f"quantize {f.get('quantize_s', nan):.1f} s, save {f.get('save_s', nan):.1f} s; "
        f"output {f.get('output_bytes', 0) / 1e9:.2f} GB (size x {f.get('size_ratio', nan):.3f})"
    )
    if big.get("reported_peak_rss_bytes"):
        target = f.get("rss_ratio_target")
        verdict = (
            ""
            if target is None
            else f" (target <= {target}: {'OK' if big['reported_peak_rss_ratio'] <= target else 'OVER'})"
        )
        lines.append(
            f"  round-trip peak RSS {big['reported_peak_rss_bytes'] / 2**20:.0f} MB = "
            f"{big['reported_peak_rss_ratio']:.2f} x fp32 size{verdict}"
        )
    lines.append(
        f"  largest process under measure_roundtrip (its verify step included) peak RSS "
        f"{big['process_peak_rss_bytes'] / 2**20:.0f} MB = "
        f"{big['process_peak_rss_ratio']:.2f} x fp32 size; output check: cosine {f.get('cosine', nan):.6f}, "
        f"checker_ok {f.get('checker_ok')}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


COLUMNS = (
    "model",
    "tool",
    "size x",
    "lat x",
    "orig ms",
    "cos min",
    "cos mean",
    "max_abs",
    "SNR dB",
    "top1",
    "acc orig>cand",
    "pass",
    "tool s",
    "RSS MB",
)


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def row_cells(row: Row) -> list[str]:
    """The table cells of one row."""
    run = row.run or {}
    if not row.ok:
        return (
            [row.model, row.tool, "error"]
            + [""] * (len(COLUMNS) - 5)
            + [
                _fmt(run.get("seconds"), ".2f"),
                _fmt(run.get("peak_rss_mb"), ".0f"),
            ]
        )
    fid, lat = row.fidelity or {}, row.latency or {}
    acc_a, acc_b = fid.get("accuracy_original"), fid.get("accuracy_candidate")
    acc = f"{acc_a:.3f}>{acc_b:.3f}" if acc_a is not None and acc_b is not None else "-"
    cos_min = fid.get("cosine_min")
    return [
        row.model,
        row.tool,
        _fmt(row.size_ratio, ".3f"),
        _fmt(lat.get("ratio"), ".2f"),
        _fmt(lat.get("original_ms"), ".3f"),
        _fmt(cos_min, ".6f") if cos_min is None or cos_min < 0.9999995 else "1.000000",
        _fmt(fid.get("cosine_mean"), ".6f"),
        _fmt(fid.get("max_abs"), ".3g"),
        _fmt(fid.get("snr_db"), ".1f"),
        _fmt(fid.get("top1"), ".4f"),
        acc,
        ("yes" if fid.get("passed") else "NO") if fid else "-",
        _fmt(run.get("seconds"), ".2f"),
        _fmt(run.get("peak_rss_mb"), ".0f"),
    ]


def print_table(rows: list[Row], plain: bool) -> None:
    """Print the results as a rich table, or aligned plain text."""
    cells = [row_cells(r) for r in rows]
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(COLUMNS)]
        print("  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)))
        print("  ".join("-" * w for w in widths))
        for c in cells:
            print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
        return
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
    table = Table(title="onnxcompress benchmark")
    for i, h in enumerate(COLUMNS):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i < 2)
    last = None
    for r, c in zip(rows, cells):
        if last is not None and r.model != last:
            table.add_section()
        last = r.model
        table.add_row(*c, style=None if r.ok else "red")
    console.print(table)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the results JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="Extra model path (repeatable).")
    p.add_argument(
        "--no-default-models", action="store_true", help="Skip models/*.onnx and the cached MiniLM; use --model only."
    )
    p.add_argument("--technique", action="append", help="onnxcompress technique to run (repeatable; default: all).")
    p.add_argument("--anchor", action="append", help="Anchor to run (repeatable; default: all available).")
    p.add_argument("--no-anchors", action="store_true", help="Skip the onnxruntime.quantization anchors.")
    p.add_argument(
        "--anchor-python",
        default=os.environ.get("BENCH_ANCHOR_PYTHON", sys.executable),
        help="Interpreter that runs the anchors (default: $BENCH_ANCHOR_PYTHON or this one).",
    )
    p.add_argument("--runs", type=int, default=None, help=f"Timed latency samples per row (default {DEFAULT_RUNS}).")
    p.add_argument("--warmup", type=int, default=None, help="Warm-up calls per session (default 5; quick: 1).")
    p.add_argument("--sample-ms", type=float, default=None, help="Target length of one latency sample (default 10).")
    p.add_argument("--batch", type=int, default=8, help="Samples per latency call, cut from the first feed (0: all).")
    p.add_argument("--quick", action="store_true", help=f"Smoke check: {QUICK_RUNS} runs, short samples.")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="Where to write the JSON results.")
    p.add_argument("--plain", action="store_true", help="Plain-text table even when rich is installed.")
    p.add_argument("--keep-outputs", type=Path, default=None, help="Keep the compressed models in this folder.")
    p.add_argument("--tool-timeout", type=float, default=DEFAULT_TOOL_TIMEOUT, help="Seconds per tool run.")
    p.add_argument("--big", action="store_true", help="Also measure the >2 GB round trip of scripts/big_model.py.")
    p.add_argument("--big-bytes", type=float, default=2.3e9, help="Size of the --big model (default 2.3e9).")
    p.add_argument("--big-dir", default=None, help="Where to build the --big model (default: the temp folder).")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.sample_ms = args.sample_ms or (2.0 if args.quick else 10.0)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    started = time.perf_counter()
    notes: list[str] = []
    env = environment_info()
    anchor_env = None if args.no_anchors else probe_anchor_python(args.anchor_python)
    print(format_header(env, anchor_env, args), flush=True)
    tools = select_tools(args, anchor_env, notes)
    models = discover_models(args.model, not args.no_default_models)
    if not models:
        notes.append("no models found: put .onnx files in models/ or pass --model")
    rows: list[Row] = []
    cases: list[ModelCase] = []
    workroot = args.keep_outputs
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = workroot if workroot is not None else Path(tmp)
        for path in models:
            case, model_rows = bench_model(path, tools, workdir, args)
            cases += [case] if case else []
            rows += model_rows
    big = run_big(args, notes) if args.big else None
    print()
    print_table(rows, args.plain)
    print(
        "size x = output/input bytes; lat x = candidate/original latency (median of paired samples); "
        "tool s and RSS MB: the tool alone in a fresh subprocess\n(onnxcompress's include its built-in "
        "validation; passes alone: run.passes_seconds in the JSON); cos/max_abs/SNR: worst over the outputs; "
        "top1: the label output's (first output)."
    )
    for r in rows:
        if not r.ok:
            print(f"error: {r.model} / {r.tool}: {r.error}")
    if big:
        print(format_big(big))
    for note in notes:
        print(f"note: {note}")
    seconds = time.perf_counter() - started
    payload = {
        "schema": 1,
        "env": env,
        "anchor_env": anchor_env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "models": [c.to_dict() for c in cases],
        "rows": [r.to_dict() for r in rows],
        "big": big,
        "notes": notes,
        "seconds": seconds,
    }
    write_json(args.json, payload)
    print(f"wrote {args.json} in {seconds:.1f} s")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
