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

``--fold`` runs only the fold comparison (also part of the full run, without onnx's light models, unless
``--no-fold`` or ``--quick``): onnxcompress's lossless ``fold`` -- through ``compress(..., ["fold"],
tolerances=["max_abs<=1e-4"], force=True)`` (``oc-fold``, its validation included) and the pass alone,
load + fold + save (``oc-fold-pass``) -- against ``onnxsim.simplify``, ``onnxslim.slim`` and
``onnxoptimizer.optimize`` with ``get_fuse_and_elimination_passes()`` (all with their defaults, in the
anchor interpreter), each in its own subprocess. Models: the bench models, onnx's
``backend/test/data/light/light_*.onnx`` and three models the bench builds (Paddle-style Constant weights
with Conv+BN+Relu and Identity/Dropout leftovers; tf2onnx-style NHWC Transposes, Shape->Gather->Unsqueeze->
Concat->Reshape and Reshape chains; an ``If`` with MatMul weights and Identity nodes in its branches).
Per model and tool: nodes before/after (subgraphs included), output size, the tool's wall time and peak
RSS, and whether the output still matches the original in onnxruntime on the model's feeds (sidecar or
``generate_feeds``); a tool that crashes or breaks the model is a row with its error line. Then the
verdicts: fold nodes <= the fewest nodes of an anchor with a correct output, and fold time (the pass
alone, load and save included) <= onnxslim's. JSON: ``bench-results/bench-fold.json`` (``fold`` key).

Usage::

    python scripts/bench.py                       # all models, all techniques, anchors
    python scripts/bench.py --quick               # smoke check: few runs
    python scripts/bench.py --model m.onnx --no-default-models --technique int8-weights
    python scripts/bench.py --anchor-python /path/venv/bin/python   # anchors from another env
    python scripts/bench.py --fold --anchor-python /path/venv/bin/python   # fold vs onnxsim/onnxslim/onnxoptimizer
    python scripts/bench.py --fold --filter synthetic --fold-tool oc-fold --fold-tool onnxslim

Suites with their own scripts (each prints the CPU it ran on and markdown tables, and writes JSON under
``bench-results/``): ``python scripts/bench.py split|batch|structural|prune-channels|transport|tune [options]``
runs ``scripts/bench_<suite>.py`` (``--help`` for its options).

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
import re
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
DEFAULT_FOLD_JSON = REPO / "bench-results" / "bench-fold.json"
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


def format_header(
    env: dict[str, Any], anchor_env: dict[str, Any] | None, args: argparse.Namespace, quantization: bool = True
) -> str:
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
    ]
    if quantization:
        lines.append(
            f"latency: intra_op_num_threads=1, median of {args.runs} samples after {args.warmup} warm-up calls, "
            f"ABBA-interleaved, batch {args.batch}"
        )
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
        "try:\n"
        "    from onnxconverter_common import float16\n"
        "    out['float16'] = None\n"
        "except Exception as e:\n"
        "    out['float16'] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        msg = f"cannot run {python}: {exc}"
        info = {"quantize_dynamic": msg, "matmul_nbits": msg, "float16": msg}
    info["python"] = python
    return info


# Extra onnxcompress rows: a technique with another target or settings ({label: (technique, params)}).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "int8-dynamic@ort": ("int8-dynamic", {"target": "onnxruntime"}),
    "int8-dynamic/row": ("int8-dynamic", {"params": {"activations": "row"}}),
    "int8-dynamic/row+outliers": ("int8-dynamic", {"params": {"activations": "row", "outliers": "2"}}),
    "int8-dynamic/tensor": ("int8-dynamic", {"params": {"activations": "tensor", "smooth": "0", "gptq": "false"}}),
    "int4-rtn": ("int4", {"params": {"method": "rtn"}}),
    "int4@ort": ("int4", {"target": "onnxruntime"}),
}


def select_tools(args: argparse.Namespace, anchor_env: dict[str, Any] | None, notes: list[str]) -> list[ToolSpec]:
    """The onnxcompress techniques (from the registry) and the available anchors."""
    from onnxcompress.recipes import PASSES

    # The structural passes and tune have their own suites (``bench.py structural|prune-channels|tune``):
    # the default quantization comparison runs them only when named with --technique.
    own_suite = {"prune", "prune-channels", "lowrank", "cluster", "tune"}
    names = args.technique or [n for n in PASSES if n not in own_suite]
    names = [n for n in names if n not in VARIANTS] + [VARIANTS[n][0] for n in names if n in VARIANTS]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise SystemExit(f"unknown technique(s) {unknown}; choose from {', '.join(PASSES)}")
    tools = [ToolSpec(n, "onnxcompress", "onnxcompress", {"technique": n}, n, sys.executable) for n in names]
    for label, (technique, extra) in VARIANTS.items():
        if technique in names and (args.technique is None or label in args.technique or technique in args.technique):
            tools.append(
                ToolSpec(
                    label, "onnxcompress", "onnxcompress", {"technique": technique, **extra}, technique, sys.executable
                )
            )
    if anchor_env is None:
        return tools
    anchors = anchor_specs(anchor_env["python"])
    if args.anchor:
        bad = [a for a in args.anchor if a not in {t.name for t in anchors}]
        if bad:
            raise SystemExit(f"unknown anchor(s) {bad}; choose from {', '.join(t.name for t in anchors)}")
        anchors = [t for t in anchors if t.name in args.anchor]
    checks = (
        ("ort-dynamic", "quantize_dynamic"),
        ("ort-static", "quantize_dynamic"),
        ("ort-nbits", "matmul_nbits"),
        ("ort-fp16", "float16"),
    )
    for worker, key in checks:
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
            "int4",
            python,
        ),
        ToolSpec(
            "ort-nbits4-b32-gather",
            "anchor",
            "ort-nbits",
            {"bits": 4, "block_size": 32, "symmetric": False, "gather": True},
            "int4",
            python,
        ),
        ToolSpec("ort-static-qdq", "anchor", "ort-static", {}, "int8-static", python),
        ToolSpec("ort-fp16", "anchor", "ort-fp16", {}, "fp16", python),
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
        report = oc.compress(
            model,
            output,
            [params["technique"]],
            feeds=feed_opts,
            force=True,
            target=params.get("target", "standard"),
            params=params.get("params"),
        )
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
    # "gather": embeddings too (Gather -> GatherBlockQuantized, blocks along the hidden axis).
    ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))}
    extra = ops if params.get("gather") else {}
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits, **extra)
    quant = MatMulNBitsQuantizer(
        onnx.load(model), bits=bits, block_size=block, is_symmetric=sym, algo_config=config, **extra
    )
    quant.process()
    quant.model.save_model_to_file(output, _total_size(Path(model)) > EXTERNAL_DATA_BYTES)
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import}


def _calibration_feeds(model: str, rows: int = 32) -> list[dict[str, Any]]:
    """The model's ``<stem>.calibration.npz`` sidecar, cut into feeds of ``rows`` samples."""
    import numpy as np

    path = Path(model).with_name(Path(model).stem + ".calibration.npz")
    if not path.exists():
        raise RuntimeError(f"no calibration data ({path.name}) for the static anchor")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    total = min(a.shape[0] for a in arrays.values())
    return [{k: a[i : i + rows] for k, a in arrays.items()} for i in range(0, total, rows)]


def _work_ort_static(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``quantize_static(QDQ, per_channel=True, MinMax)`` on the model's calibration sidecar."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    logging.getLogger().setLevel(logging.WARNING)
    feeds = _calibration_feeds(model)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    quantize_static(
        model,
        output,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=_total_size(Path(model)) > EXTERNAL_DATA_BYTES,
    )
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import}


def _work_ort_fp16(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``."""
    import onnx
    from onnxconverter_common import float16

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    converted = float16.convert_float_to_float16(onnx.load(model), keep_io_types=True)
    _save_proto(converted, output)
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


def _save_proto(proto: Any, output: str) -> None:
    """``onnx.save``, with external data when the model is too large for one protobuf."""
    import onnx

    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(proto, output, save_as_external_data=True, location=Path(output).name + ".data")
    else:
        onnx.save(proto, output)


def _work_fold_compress(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``onnxcompress.compress(model, out, ["fold"], tolerances=..., force=True)``: load, fold, save, validate."""
    import onnxcompress as oc

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        report = oc.compress(
            model, output, ["fold"], tolerances=list(params["tolerances"]), force=True, params=params.get("params")
        )
        validation_failed = False
    except oc.ValidationFailed as exc:
        report, validation_failed = exc.report, True
    seconds = time.perf_counter() - start
    rep = report.to_dict()
    fold = next((p for p in rep["passes"] if p["name"] == "fold"), {})
    validation = rep.get("validation") or {}
    return {
        "seconds": seconds,
        "rss_after_import": rss_import,
        "pass_seconds": fold.get("seconds"),
        "validation_seconds": validation.get("seconds"),
        "validation_passed": validation.get("passed"),
        "validation_failures": validation.get("failures"),
        "validation_failed": validation_failed,
        "stats": {k: v for k, v in (fold.get("stats") or {}).items() if k != "tensor_map"},
    }


def _work_fold_pass(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """The ``fold`` pass alone: ``onnxcompress.load`` -> fold -> ``onnxcompress.save``, no validation."""
    import onnxcompress as oc
    from onnxcompress.passes.base import PassContext
    from onnxcompress.recipes import build_passes

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    m = oc.load(model)
    loaded = time.perf_counter()
    (fold,) = build_passes(["fold"])
    report = fold.run(m, PassContext())
    folded = time.perf_counter()
    oc.save(m, output, force=True)
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "rss_after_import": rss_import,
        "load_seconds": loaded - start,
        "pass_seconds": folded - loaded,
        "save_seconds": end - folded,
        "stats": report.stats,
    }


def _work_onnxsim(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``onnx.load`` -> ``onnxsim.simplify`` (its defaults) -> ``onnx.save``."""
    import onnx
    import onnxsim

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    simplified, check = onnxsim.simplify(onnx.load(model))
    _save_proto(simplified, output)
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import, "check": bool(check)}


def _work_onnxslim(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``onnxslim.slim(model, output_model=out)`` (its defaults: it loads and saves itself)."""
    import onnxslim

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    onnxslim.slim(model, output_model=output, save_as_external_data=_total_size(Path(model)) > EXTERNAL_DATA_BYTES)
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import}


def _work_onnxoptimizer(model: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """``onnx.load`` -> ``onnxoptimizer.optimize(m, get_fuse_and_elimination_passes())`` -> ``onnx.save``."""
    import onnx
    import onnxoptimizer

    rss_import = _peak_rss_bytes(resource.RUSAGE_SELF)
    start = time.perf_counter()
    passes = onnxoptimizer.get_fuse_and_elimination_passes()
    optimized = onnxoptimizer.optimize(onnx.load(model), passes)
    _save_proto(optimized, output)
    return {"seconds": time.perf_counter() - start, "rss_after_import": rss_import, "passes": list(passes)}


WORKERS: dict[str, Callable[[str, str, dict[str, Any]], dict[str, Any]]] = {
    "onnxcompress": _work_onnxcompress,
    "ort-dynamic": _work_ort_dynamic,
    "ort-nbits": _work_ort_nbits,
    "ort-static": _work_ort_static,
    "ort-fp16": _work_ort_fp16,
    "big-build": _work_big_build,
    "big-roundtrip": _work_big_roundtrip,
    "fold-compress": _work_fold_compress,
    "fold-pass": _work_fold_pass,
    "onnxsim": _work_onnxsim,
    "onnxslim": _work_onnxslim,
    "onnxoptimizer": _work_onnxoptimizer,
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


# --------------------------------------------------------------------------- fold comparison
#
# ``--fold``: onnxcompress's lossless ``fold`` recipe side by side with the graph simplifiers onnxsim,
# onnxslim and onnxoptimizer. Every tool runs in its own subprocess (anchors in ``--anchor-python``);
# this process counts the nodes of each output (subgraphs included), measures its size and checks it
# against the original in onnxruntime on the model's feeds.

FOLD_TOLERANCES = ["max_abs<=1e-4"]  # what ``compress(..., ["fold"])`` validates against in its worker
FOLD_ATOL = 1e-4  # the bench's own verdict on every tool: |diff| <= ATOL + RTOL * max|original output|
FOLD_RTOL = 1e-5
FOLD_ANCHOR_MODULES = ("onnxsim", "onnxslim", "onnxoptimizer")
FOLD_REPEAT = 3  # runs of a tool whose first run is quicker than FOLD_REPEAT_BELOW_S (median reported)
FOLD_REPEAT_BELOW_S = 2.0


@dataclasses.dataclass(frozen=True)
class FoldTool:
    """One graph simplifier run in the fold comparison.

    Attributes:
        name: Row label.
        kind: ``onnxcompress`` or ``anchor``.
        worker: Key of its worker function in :data:`WORKERS`.
        python: Interpreter that runs the worker.
        module: The module the anchor needs in that interpreter (``None`` for onnxcompress).
    """

    name: str
    kind: str
    worker: str
    python: str
    module: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def fold_tools(anchor_python: str | None) -> list[FoldTool]:
    """onnxcompress's fold (through ``compress``, and the pass alone), then the anchors."""
    tools = [
        FoldTool("oc-fold", "onnxcompress", "fold-compress", sys.executable),
        FoldTool("oc-fold-pass", "onnxcompress", "fold-pass", sys.executable),
        # The size guard lifted (--param fold_max_growth=inf): what fold does when asked to materialise
        # every constant, as the anchors do.
        FoldTool(
            "oc-fold-unguarded",
            "onnxcompress",
            "fold-compress",
            sys.executable,
            params={"params": {"fold_max_growth": "inf"}},
        ),
    ]
    if anchor_python is not None:
        tools += [FoldTool(m, "anchor", m, anchor_python, m) for m in FOLD_ANCHOR_MODULES]
    return tools


@dataclasses.dataclass
class GraphStats:
    """Node count (every subgraph included), op histogram and on-disk size of a model file."""

    nodes: int
    ops: dict[str, int]
    size_bytes: int
    opset: int | None
    ir_version: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldCase:
    """A model of the fold comparison with its feeds and reference outputs."""

    name: str
    path: Path
    origin: str  # bench | onnx-light | synthetic | extra
    stats: GraphStats | None = None
    feeds: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    feeds_source: str = ""
    reference: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON summary (no arrays)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "origin": self.origin,
            "stats": self.stats.to_dict() if self.stats else None,
            "feeds_source": self.feeds_source,
            "num_feeds": len(self.feeds),
            "feed_shapes": {k: list(v.shape) for k, v in (self.feeds[0] if self.feeds else {}).items()},
        }


@dataclasses.dataclass
class FoldFidelity:
    """How a tool's output compares with the original on the model's feeds (worst over the outputs)."""

    ok: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine_min: float | None = None
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FoldRow:
    """The result of one simplifier on one model."""

    model: str
    tool: str
    kind: str
    ran: bool = False
    error: str | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    size_before: int | None = None
    size_bytes: int | None = None
    seconds: float | None = None
    process_seconds: float | None = None
    peak_rss_mb: float | None = None
    fidelity: FoldFidelity | None = None
    ops_delta: dict[str, int] | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def good(self) -> bool:
        """Ran, wrote a model, and that model still computes the original's outputs."""
        return self.ran and self.fidelity is not None and self.fidelity.ok

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = _finite(dataclasses.asdict(self))
        out["good"] = self.good
        return out


def _graph_ops(graph: Any, ops: dict[str, int]) -> int:
    """Count ``graph``'s nodes into ``ops`` (``domain::op`` keys), recursing into subgraph attributes."""
    import onnx

    n = 0
    for node in graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        ops[key] = ops.get(key, 0) + 1
        n += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                n += _graph_ops(attr.g, ops)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                n += sum(_graph_ops(g, ops) for g in attr.graphs)
    return n


def _graph_tensors(graph: Any) -> Iterable[Any]:
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


def graph_stats(path: Path) -> GraphStats:
    """Nodes (recursive), op histogram, file size plus the external-data files it references."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    nodes = _graph_ops(proto.graph, ops)
    files = {
        entry.value
        for t in _graph_tensors(proto.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return GraphStats(nodes, dict(sorted(ops.items())), size, opset, proto.ir_version)


def probe_fold_anchors(python: str) -> dict[str, Any]:
    """Versions of onnx, onnxruntime and the simplifiers in the anchor interpreter (or why not)."""
    code = (
        "import json, importlib\n"
        "out = {}\n"
        f"for name in ('onnx', 'onnxruntime') + {FOLD_ANCHOR_MODULES!r}:\n"
        "    try:\n"
        "        mod = importlib.import_module(name)\n"
        "        out[name] = {'version': str(getattr(mod, '__version__', '?')), 'error': None}\n"
        "    except Exception as e:\n"
        "        out[name] = {'version': None, 'error': f'{type(e).__name__}: {e}'}\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        msg = f"cannot run {python}: {exc}"
        info = {m: {"version": None, "error": msg} for m in ("onnx", "onnxruntime", *FOLD_ANCHOR_MODULES)}
    info["python"] = python
    return info


def onnx_light_models() -> list[Path]:
    """``onnx/backend/test/data/light/light_*.onnx`` of this interpreter's onnx package."""
    spec = importlib.util.find_spec("onnx")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(p for r in roots for p in (Path(r) / "backend" / "test" / "data" / "light").glob("light_*.onnx"))


# ----- synthetic models, built by the bench in a temp folder


def _model_proto(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], **kw: Any) -> Any:
    """``helper.make_model`` + ``check_model`` with the opset / IR version / producer in ``kw``."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, kw.pop("graph_name", "main"), inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", kw.pop("opset"))],
        ir_version=kw.pop("ir_version"),
        producer_name=kw.pop("producer"),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _constant(name: str, array: np.ndarray) -> Any:
    """A ``Constant`` node producing ``name``."""
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], name=f"{name}__const", value=numpy_helper.from_array(array, name))


def build_paddle_style(path: Path) -> None:
    """Paddle2ONNX-like: opset 11, every weight a ``Constant`` node, Conv+BatchNormalization+Relu stacks,
    ``Identity``/``Dropout`` leftovers, a ``scale`` op exported as Mul 1 / Add 0, and a classifier head."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(11)
    f32 = np.float32
    nodes = [helper.make_node("Identity", ["x"], ["feed_0.tmp"], name="feed_identity")]
    cur, cin = "feed_0.tmp", 3
    for i, (cout, stride) in enumerate([(16, 1), (16, 2), (32, 1), (32, 2)]):
        p = f"conv2d_{i}"
        nodes += [
            _constant(f"{p}.w_0", (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(f32)),
            _constant(f"{p}.b_0", (0.1 * rng.standard_normal(cout)).astype(f32)),
            _constant(f"bn_{i}.w_0", rng.uniform(0.5, 1.5, cout).astype(f32)),
            _constant(f"bn_{i}.b_0", (0.1 * rng.standard_normal(cout)).astype(f32)),
            _constant(f"bn_{i}.w_1", (0.1 * rng.standard_normal(cout)).astype(f32)),
            _constant(f"bn_{i}.w_2", rng.uniform(0.5, 2.0, cout).astype(f32)),
            helper.make_node(
                "Conv",
                [cur, f"{p}.w_0", f"{p}.b_0"],
                [f"{p}.tmp_1"],
                name=f"{p}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node(
                "BatchNormalization",
                [f"{p}.tmp_1", f"bn_{i}.w_0", f"bn_{i}.b_0", f"bn_{i}.w_1", f"bn_{i}.w_2"],
                [f"bn_{i}.tmp_3"],
                name=f"bn_{i}",
                epsilon=1e-5,
                momentum=0.9,
            ),
            helper.make_node("Relu", [f"bn_{i}.tmp_3"], [f"relu_{i}.tmp_0"], name=f"relu_{i}"),
        ]
        leftover = ("Dropout", {"ratio": 0.5}) if i % 2 == 0 else ("Identity", {})
        nodes.append(
            helper.make_node(leftover[0], [f"relu_{i}.tmp_0"], [f"block_{i}.out"], name=f"leftover_{i}", **leftover[1])
        )
        cur, cin = f"block_{i}.out", cout
    nodes += [
        helper.make_node("GlobalAveragePool", [cur], ["pool.tmp_0"], name="pool"),
        _constant("flatten.shape", np.array([0, -1], np.int64)),
        helper.make_node("Reshape", ["pool.tmp_0", "flatten.shape"], ["flatten.tmp_0"], name="flatten"),
        _constant("fc.w_0", (rng.standard_normal((cin, 10)) / np.sqrt(cin)).astype(f32)),
        _constant("fc.b_0", (0.1 * rng.standard_normal(10)).astype(f32)),
        helper.make_node("MatMul", ["flatten.tmp_0", "fc.w_0"], ["fc.tmp_0"], name="fc_matmul"),
        helper.make_node("Add", ["fc.tmp_0", "fc.b_0"], ["fc.tmp_1"], name="fc_add"),
        _constant("scale.scale", np.array([1.0], f32)),
        _constant("scale.bias", np.array([0.0], f32)),
        helper.make_node("Mul", ["fc.tmp_1", "scale.scale"], ["scale.tmp_0"], name="scale_mul"),
        helper.make_node("Add", ["scale.tmp_0", "scale.bias"], ["scale.tmp_1"], name="scale_add"),
        helper.make_node("Softmax", ["scale.tmp_1"], ["softmax.tmp_0"], name="softmax", axis=1),
        helper.make_node("Identity", ["softmax.tmp_0"], ["save_infer_model/scale_0.tmp_0"], name="fetch_identity"),
    ]
    model = _model_proto(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_0", TensorProto.FLOAT, ["N", 10])],
        [],
        opset=11,
        ir_version=6,
        producer="PaddlePaddle",
        graph_name="paddle-infer",
    )
    onnx.save(model, str(path))


def build_tf2onnx_style(path: Path) -> None:
    """tf2onnx-like: NHWC input, Transpose to NCHW around each Conv and back, a
    Shape->Gather->Unsqueeze->Concat->Reshape on static dims (dynamic batch), Reshape chains, a dense head."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(13)
    f32 = np.float32
    weights = {
        "sequential/conv2d/Conv2D/ReadVariableOp:0": (rng.standard_normal((8, 3, 3, 3)) * 0.27).astype(f32),
        "sequential/conv2d/BiasAdd/ReadVariableOp:0": (0.1 * rng.standard_normal(8)).astype(f32),
        "sequential/conv2d_1/Conv2D/ReadVariableOp:0": (rng.standard_normal((16, 8, 3, 3)) * 0.17).astype(f32),
        "sequential/conv2d_1/BiasAdd/ReadVariableOp:0": (0.1 * rng.standard_normal(16)).astype(f32),
        "sequential/dense/MatMul/ReadVariableOp:0": (rng.standard_normal((1024, 10)) / 32).astype(f32),
        "sequential/dense/BiasAdd/ReadVariableOp:0": (0.1 * rng.standard_normal(10)).astype(f32),
        "const_axes__12": np.array([0], np.int64),
        "const_fold_opt__20": np.array([-1], np.int64),
        "const_starts__1": np.array(1, np.int64),
        "const_starts__2": np.array(2, np.int64),
        "const_starts__3": np.array(3, np.int64),
        "new_shape__30": np.array([-1, 64, 16], np.int64),
        "new_shape__31": np.array([-1, 1024], np.int64),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    nodes = []
    cur = "input_1"
    for i, (layer, stride) in enumerate([("conv2d", 1), ("conv2d_1", 2)]):
        pre = f"sequential/{layer}"
        nodes += [
            helper.make_node(
                "Transpose", [cur], [f"{pre}/Conv2D__{i}:0"], name=f"{pre}/Conv2D__{i}", perm=[0, 3, 1, 2]
            ),
            helper.make_node(
                "Conv",
                [f"{pre}/Conv2D__{i}:0", f"{pre}/Conv2D/ReadVariableOp:0", f"{pre}/BiasAdd/ReadVariableOp:0"],
                [f"{pre}/BiasAdd:0"],
                name=f"{pre}/BiasAdd",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node("Relu", [f"{pre}/BiasAdd:0"], [f"{pre}/Relu:0"], name=f"{pre}/Relu"),
            helper.make_node(
                "Transpose", [f"{pre}/Relu:0"], [f"{pre}/Relu__{i}:0"], name=f"{pre}/Relu__{i}", perm=[0, 2, 3, 1]
            ),
        ]
        cur = f"{pre}/Relu__{i}:0"
    shape = "sequential/reshape/Shape:0"
    nodes.append(helper.make_node("Shape", [cur], [shape], name="sequential/reshape/Shape"))
    dims = []
    for k in (1, 2, 3):
        g, u = f"sequential/reshape/strided_slice_{k}:0", f"sequential/reshape/Unsqueeze_{k}:0"
        nodes += [
            helper.make_node("Gather", [shape, f"const_starts__{k}"], [g], name=g[:-2], axis=0),
            helper.make_node("Unsqueeze", [g, "const_axes__12"], [u], name=u[:-2]),
        ]
        dims.append(u)
    nodes += [
        helper.make_node(
            "Concat",
            ["const_fold_opt__20", *dims],
            ["sequential/reshape/shape:0"],
            name="sequential/reshape/shape",
            axis=0,
        ),
        helper.make_node(
            "Reshape", [cur, "sequential/reshape/shape:0"], ["sequential/reshape/Reshape:0"], name="sequential/reshape"
        ),
        helper.make_node(
            "Reshape", ["sequential/reshape/Reshape:0", "new_shape__30"], ["sequential/reshape_1/Reshape:0"], name="r1"
        ),
        helper.make_node(
            "Reshape", ["sequential/reshape_1/Reshape:0", "new_shape__31"], ["sequential/flatten/Reshape:0"], name="r2"
        ),
        helper.make_node(
            "MatMul",
            ["sequential/flatten/Reshape:0", "sequential/dense/MatMul/ReadVariableOp:0"],
            ["sequential/dense/MatMul:0"],
            name="sequential/dense/MatMul",
        ),
        helper.make_node(
            "Add",
            ["sequential/dense/MatMul:0", "sequential/dense/BiasAdd/ReadVariableOp:0"],
            ["sequential/dense/BiasAdd:0"],
            name="sequential/dense/BiasAdd",
        ),
        helper.make_node(
            "Softmax", ["sequential/dense/BiasAdd:0"], ["dense"], name="sequential/dense/Softmax", axis=-1
        ),
    ]
    model = _model_proto(
        nodes,
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__6", 16, 16, 3])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__7", 10])],
        inits,
        opset=13,
        ir_version=7,
        producer="tf2onnx",
        graph_name="tf2onnx",
    )
    onnx.save(model, str(path))


def build_if_branches(path: Path) -> None:
    """An ``If`` on a data-dependent condition whose branches hold MatMul weights (a subgraph
    initializer behind a foldable Transpose, a ``Constant`` node) and ``Identity`` nodes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(17)
    f32 = np.float32
    w1t = (rng.standard_normal((16, 16)) / 4).astype(f32)
    then_branch = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["then/x"], name="then/identity_in"),
            helper.make_node("Transpose", ["then/w1t"], ["then/w1"], name="then/transpose_w", perm=[1, 0]),
            helper.make_node("MatMul", ["then/x", "then/w1"], ["then/mm"], name="then/matmul"),
            helper.make_node("Identity", ["then/mm"], ["then/mm_id"], name="then/identity_mid"),
            _constant("then/b1", (0.1 * rng.standard_normal(16)).astype(f32)),
            helper.make_node("Add", ["then/mm_id", "then/b1"], ["then_out"], name="then/add"),
        ],
        "then_branch",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", 16])],
        initializer=[numpy_helper.from_array(w1t, "then/w1t")],
    )
    else_branch = helper.make_graph(
        [
            _constant("else/w2", (rng.standard_normal((16, 16)) / 4).astype(f32)),
            helper.make_node("MatMul", ["x", "else/w2"], ["else/mm"], name="else/matmul"),
            helper.make_node("Identity", ["else/mm"], ["else/mm_id"], name="else/identity_mid"),
            helper.make_node("Relu", ["else/mm_id"], ["else/relu"], name="else/relu"),
            helper.make_node("Identity", ["else/relu"], ["else_out"], name="else/identity_out"),
        ],
        "else_branch",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", 16])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["sum"], name="reduce", keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["branch_out"], name="if", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Identity", ["branch_out"], ["branch_out_id"], name="identity_after_if"),
        helper.make_node("MatMul", ["branch_out_id", "w3"], ["y"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.0, f32), "zero"),
        numpy_helper.from_array((rng.standard_normal((16, 4)) / 4).astype(f32), "w3"),
    ]
    model = _model_proto(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
        opset=13,
        ir_version=7,
        producer="bench",
        graph_name="if_branches",
    )
    onnx.save(model, str(path))


SYNTHETIC_MODELS: dict[str, Callable[[Path], None]] = {
    "synthetic_paddle": build_paddle_style,
    "synthetic_tf2onnx": build_tf2onnx_style,
    "synthetic_if_branches": build_if_branches,
}


def fold_model_list(args: argparse.Namespace, builddir: Path, notes: list[str]) -> list[tuple[Path, str]]:
    """(path, origin) of every model of the fold comparison; the synthetic ones are built in ``builddir``."""
    defaults = discover_models([], True) if not args.no_default_models else []
    models = [(p, "bench") for p in defaults]
    known = {p.resolve() for p in defaults}
    models += [(p, "extra") for p in discover_models(args.model, False) if p.resolve() not in known]
    if not args.no_default_models and args.fold:
        light = onnx_light_models()
        if not light:
            notes.append("fold: no onnx/backend/test/data/light/light_*.onnx in this onnx package")
        models += [(p, "onnx-light") for p in light]
    if not args.no_default_models:
        for name, build in SYNTHETIC_MODELS.items():
            path = builddir / f"{name}.onnx"
            try:
                build(path)
                models.append((path, "synthetic"))
            except Exception as exc:  # a builder bug must not stop the benchmark
                notes.append(f"fold: cannot build {name}: {type(exc).__name__}: {_first_line(str(exc))}")
    if args.filter:
        models = [(p, o) for p, o in models if any(f in p.stem for f in args.filter)]
    return models


# ----- measuring


def prepare_fold_case(path: Path, origin: str) -> FoldCase:
    """Graph stats, feeds (sidecar ``<stem>.inputs.npz``, else ``generate_feeds`` from the input
    signature, exactly as ``compress`` picks them) and the original's outputs in onnxruntime."""
    import onnxcompress as oc
    from onnxcompress.api import resolve_feeds
    from onnxcompress.validate import make_session, run_session

    case = FoldCase(name=path.stem, path=path, origin=origin)
    case.stats = graph_stats(path)
    model = oc.load(path)
    case.feeds, case.feeds_source, _ = resolve_feeds(model, path, oc.FeedOptions())
    del model
    case.reference = run_session(make_session(path), case.feeds, "original")
    return case


def _output_ok(diff: Any, ref: list[np.ndarray]) -> tuple[bool, float]:
    """Whether one output agrees within ``FOLD_ATOL + FOLD_RTOL * max|ref|`` (exactly, for non-floats)."""
    import numpy as np

    if not diff.passed:  # shape or dtype changed
        return False, 0.0
    if ref[0].dtype.kind != "f":
        return diff.equal_fraction in (None, 1.0) and (diff.max_abs or 0.0) == 0.0, 0.0
    finite = [np.abs(r[np.isfinite(r)]) for r in ref]
    scale = max((float(f.max()) for f in finite if f.size), default=0.0)
    bound = FOLD_ATOL + FOLD_RTOL * scale
    return (diff.nonfinite_mismatch == 0 and (diff.max_abs or 0.0) <= bound), bound


def fold_fidelity(case: FoldCase, candidate: Path) -> FoldFidelity:
    """Run ``candidate`` on the case's feeds in onnxruntime and compare with the original's outputs."""
    from onnxcompress.validate import make_session, output_diff, run_session

    try:
        session = make_session(candidate)
        names = [i.name for i in session.get_inputs()]
        notes = []
        dropped = [k for k in case.feeds[0] if k not in names] if case.feeds else []
        missing = [n for n in names if case.feeds and n not in case.feeds[0]]
        if missing:
            return FoldFidelity(False, error=f"the output needs inputs the original does not have: {missing}")
        if dropped:
            notes.append(f"inputs removed: {dropped}")
        feeds = [{k: v for k, v in f.items() if k in names} for f in case.feeds]
        outs = [o.name for o in session.get_outputs()]
        if sorted(outs) != sorted(case.reference):
            return FoldFidelity(False, error=f"outputs changed: original {list(case.reference)}, candidate {outs}")
        if outs != list(case.reference):
            notes.append("outputs reordered")
        cand = run_session(session, feeds, "candidate")
    except Exception as exc:  # the tool broke the model: record onnxruntime's complaint
        return FoldFidelity(False, error=f"{type(exc).__name__}: {_first_line(str(exc))}")
    fid = FoldFidelity(True, max_abs=0.0, max_rel=0.0, cosine_min=1.0, notes=notes)
    for name, ref in case.reference.items():
        diff = output_diff(name, ref, cand[name])
        ok, bound = _output_ok(diff, ref)
        fid.ok &= ok
        fid.outputs[name] = {
            "ok": ok,
            "bound": bound,
            "failures": diff.failures,
            **{k: getattr(diff, k) for k in ("max_abs", "max_rel", "cosine", "equal_fraction", "nonfinite_mismatch")},
        }
        fid.max_abs = max(fid.max_abs or 0.0, diff.max_abs or 0.0)
        fid.max_rel = max(fid.max_rel or 0.0, diff.max_rel or 0.0)
        if diff.cosine is not None:
            fid.cosine_min = min(fid.cosine_min if fid.cosine_min is not None else 1.0, diff.cosine)
        if diff.failures or diff.nonfinite_mismatch:
            fid.notes.append(f"{name}: {'; '.join(diff.failures) or f'{diff.nonfinite_mismatch} NaN/Inf mismatches'}")
    return fid


def _ops_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per op: count after - count before, non-zero only."""
    keys = sorted(set(before) | set(after))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


def run_fold_worker(tool: FoldTool, model: Path, output: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the tool's worker; a run under ``FOLD_REPEAT_BELOW_S`` is repeated (``--fold-repeat`` runs in
    all) and ``seconds`` is the median, so sub-second comparisons are not one noisy sample. The RSS
    and the other figures are the first run's."""
    params = {"tolerances": FOLD_TOLERANCES, **tool.params}
    res = run_worker(tool.python, tool.worker, model, output, params, args.tool_timeout)
    samples = [res["seconds"]] if res.get("ok") and res.get("seconds") is not None else []
    while samples and samples[0] < FOLD_REPEAT_BELOW_S and len(samples) < args.fold_repeat:
        again = run_worker(tool.python, tool.worker, model, output, params, args.tool_timeout)
        if not again.get("ok") or again.get("seconds") is None:
            break
        samples.append(again["seconds"])
    if len(samples) > 1:
        res["seconds"] = statistics.median(samples)
        res["seconds_samples"] = samples
    return res


def bench_fold_tool(case: FoldCase, tool: FoldTool, workdir: Path, args: argparse.Namespace) -> FoldRow:
    """Run one simplifier on one model in a subprocess; count, size and check its output here."""
    assert case.stats is not None
    row = FoldRow(
        model=case.name,
        tool=tool.name,
        kind=tool.kind,
        nodes_before=case.stats.nodes,
        size_before=case.stats.size_bytes,
    )
    outdir = workdir / f"{case.name}--{tool.name}"
    outdir.mkdir(parents=True, exist_ok=True)
    output = outdir / f"{case.name}.onnx"
    res = run_fold_worker(tool, case.path, output, args)
    row.seconds = res.get("seconds")
    row.process_seconds = res.get("process_seconds")
    row.peak_rss_mb = res["peak_rss"] / 2**20 if "peak_rss" in res else None
    skip = {"ok", "error", "seconds", "process_seconds", "peak_rss", "peak_rss_children", "rss_after_import"}
    row.details = {k: v for k, v in res.items() if k not in skip}
    if "rss_after_import" in res:
        row.details["rss_after_import_mb"] = res["rss_after_import"] / 2**20
    try:
        if not res.get("ok"):
            row.error = res.get("error", "unknown failure")
            return row
        if not output.exists():
            row.error = "the tool wrote no output file"
            return row
        row.ran = True
        stats = graph_stats(output)
        row.nodes_after, row.size_bytes = stats.nodes, stats.size_bytes
        row.ops_delta = _ops_delta(case.stats.ops, stats.ops)
        row.fidelity = fold_fidelity(case, output)
    except Exception as exc:  # an unreadable output is the tool's failure, not the bench's
        row.error = f"{type(exc).__name__}: {_first_line(str(exc))}"
        row.fidelity = FoldFidelity(False, error=row.error)
    finally:
        if args.keep_outputs is None:
            shutil.rmtree(outdir, ignore_errors=True)
    return row


def run_fold(args: argparse.Namespace, anchor_env: dict[str, Any] | None, notes: list[str]) -> dict[str, Any]:
    """The fold comparison over all its models; returns the JSON section (cases, rows, verdicts)."""
    tools = fold_tools(None if anchor_env is None else anchor_env["python"])
    if anchor_env is not None:
        for t in [t for t in tools if t.module and anchor_env.get(t.module, {}).get("error")]:
            notes.append(f"fold: skipped {t.name}: {anchor_env[t.module]['error']} in {anchor_env['python']}")
            tools.remove(t)
    if args.fold_tool:
        tools = [t for t in tools if t.name in args.fold_tool]
    if not args.fold and not args.no_default_models:
        notes.append("fold comparison without onnx's light_*.onnx models (they add ~3 minutes): run --fold for them")
    cases: list[FoldCase] = []
    case_dicts: list[dict[str, Any]] = []
    rows: list[FoldRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
        builddir = Path(tmp) / "models"
        builddir.mkdir()
        workdir = (args.keep_outputs / "fold") if args.keep_outputs is not None else Path(tmp) / "out"
        for path, origin in fold_model_list(args, builddir, notes):
            try:
                case = prepare_fold_case(path, origin)
            except Exception as exc:  # an original onnxruntime cannot run: report, go on
                notes.append(f"fold: cannot prepare {path.stem}: {type(exc).__name__}: {_first_line(str(exc))}")
                continue
            cases.append(case)
            for tool in tools:
                print(f"  fold {case.name}: {tool.name} ...", end="", flush=True, file=sys.stderr)
                t0 = time.perf_counter()
                row = bench_fold_tool(case, tool, workdir, args)
                status = ("ok" if row.good else "BROKEN OUTPUT") if row.ran else f"error: {row.error}"
                print(f" {status} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
                rows.append(row)
            if args.keep_outputs is not None and origin == "synthetic":
                shutil.copy2(path, workdir / path.name)
            case_dicts.append(case.to_dict())
            case.feeds, case.reference = [], {}  # free the arrays
    return {
        "tools": [dataclasses.asdict(t) for t in tools],
        "tolerance": {"atol": FOLD_ATOL, "rtol": FOLD_RTOL, "compress_tolerances": FOLD_TOLERANCES},
        "repeat": args.fold_repeat,
        "repeat_below_seconds": FOLD_REPEAT_BELOW_S,
        "models": case_dicts,
        "rows": [r.to_dict() for r in rows],
        "verdicts": fold_verdicts(cases, rows),
        "_rows": rows,  # dropped before writing the JSON
    }


@dataclasses.dataclass
class FoldVerdict:
    """The two acceptance checks on one model: fold's node count and its wall time against the anchors."""

    model: str
    nodes_ok: bool | None
    nodes_fold: int | None
    nodes_min_anchor: int | None
    min_anchor: str | None
    size_fold: int | None
    size_min_anchor: int | None
    time_ok: bool | None
    fold_pass_seconds: float | None
    fold_compress_seconds: float | None
    onnxslim_seconds: float | None
    note: str = ""
    nodes_unguarded: int | None = None
    nodes_unguarded_ok: bool | None = None


def fold_verdicts(cases: list[FoldCase], rows: list[FoldRow]) -> list[dict[str, Any]]:
    """Per model: fold nodes <= the fewest nodes of an anchor whose output is correct; fold pass time
    (load + fold + save, no validation) <= onnxslim's (load + slim + save)."""
    out = []
    for case in cases:
        by = {r.tool: r for r in rows if r.model == case.name}
        fold, alone, slim = by.get("oc-fold"), by.get("oc-fold-pass"), by.get("onnxslim")
        unguarded = by.get("oc-fold-unguarded")
        good = [r for r in by.values() if r.kind == "anchor" and r.good and r.nodes_after is not None]
        best = min(good, key=lambda r: r.nodes_after or 0, default=None)
        bad = [r.tool for r in by.values() if r.kind == "anchor" and not r.good]
        v = FoldVerdict(
            model=case.name,
            nodes_ok=None,
            nodes_fold=fold.nodes_after if fold else None,
            nodes_min_anchor=best.nodes_after if best else None,
            min_anchor=best.tool if best else None,
            size_fold=fold.size_bytes if fold else None,
            size_min_anchor=best.size_bytes if best else None,
            time_ok=None,
            fold_pass_seconds=alone.seconds if alone and alone.ran else None,
            fold_compress_seconds=fold.seconds if fold and fold.ran else None,
            onnxslim_seconds=slim.seconds if slim and slim.ran else None,
            note=f"anchors excluded (failed or broke the model): {', '.join(bad)}" if bad else "",
        )
        if unguarded is not None and unguarded.good and best is not None:
            v.nodes_unguarded = unguarded.nodes_after
            v.nodes_unguarded_ok = (unguarded.nodes_after or 0) <= (best.nodes_after or 0)
        if fold is not None and not fold.good:
            v.nodes_ok = False
            v.note = "onnxcompress fold failed or broke the model" + (f"; {v.note}" if v.note else "")
        elif fold is not None and best is not None:
            v.nodes_ok = (fold.nodes_after or 0) <= (best.nodes_after or 0)
        if v.fold_pass_seconds is not None and v.onnxslim_seconds is not None:
            v.time_ok = v.fold_pass_seconds <= v.onnxslim_seconds
        out.append(dataclasses.asdict(v))
    return out


# ----- output


NOTE_WIDTH = 140
FOLD_COLUMNS = ("tool", "nodes before->after", "size", "seconds", "RSS MB", "fidelity", "max_abs", "cos min", "note")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _short_paths(text: str) -> str:
    """``/tmp/x/y/model.onnx`` -> ``model.onnx`` (table cells only; the JSON keeps the full message)."""
    return re.sub(r"(?:/[^/\s:]+)+/([^/\s:]+)", r"\1", text)


def fold_row_cells(row: FoldRow) -> list[str]:
    """The cells of one fold row."""
    fid = row.fidelity
    seconds = _fmt(row.seconds, ".2f")
    if row.tool == "oc-fold" and row.details.get("pass_seconds") is not None:
        seconds += f" (pass {row.details['pass_seconds']:.2f})"
    if not row.ran:
        error = _short_paths(row.error or "")[:NOTE_WIDTH]
        return [
            row.tool,
            f"{row.nodes_before} -> -",
            "-",
            seconds,
            _fmt(row.peak_rss_mb, ".0f"),
            "CRASH",
            "-",
            "-",
            error,
        ]
    note = ""
    if fid is not None and fid.error:
        note = fid.error
    elif fid is not None and fid.notes:
        note = "; ".join(fid.notes)
    if row.details.get("validation_passed") is False:
        note = (note + "; " if note else "") + "own validation failed"
    cos = fid.cosine_min if fid else None
    return [
        row.tool,
        f"{row.nodes_before} -> {row.nodes_after}",
        _fmt_bytes(row.size_bytes),
        seconds,
        _fmt(row.peak_rss_mb, ".0f"),
        ("ok" if fid.ok else "BROKEN") if fid else "-",
        _fmt(fid.max_abs, ".2g") if fid else "-",
        ("1.000000" if cos is not None and cos >= 0.9999995 else _fmt(cos, ".6f")) if fid else "-",
        _short_paths(note)[:NOTE_WIDTH],
    ]


def _plain_grid(headers: Iterable[str], cells: list[list[str]], left: int = 1) -> str:
    """Aligned text: the first ``left`` columns and the last one left-aligned, the others right-aligned."""
    headers = list(headers)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    last = len(headers) - 1

    def line(vals: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i < left or i == last else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def format_fold(section: dict[str, Any]) -> str:
    """One table per model, then the summary lines."""
    rows: list[FoldRow] = section["_rows"]
    blocks = []
    for m in section["models"]:
        s = m["stats"] or {}
        title = (
            f"== {m['name']} ({m['origin']}; opset {s.get('opset')}, {s.get('nodes')} nodes, "
            f"{_fmt_bytes(s.get('size_bytes'))}; feeds: {m['feeds_source'] if m['feeds_source'] == 'generated' else 'sidecar'}"
            f" x{m['num_feeds']})"
        )
        cells = [fold_row_cells(r) for r in rows if r.model == m["name"]]
        blocks.append(title + "\n" + _plain_grid(FOLD_COLUMNS, cells))
    blocks.append(
        f"seconds: the tool's own call in a fresh subprocess (load + transform + save; oc-fold is compress(), its "
        f"validation included, pass alone in brackets; oc-fold-pass is load + fold + save), imports excluded;\n"
        f"median of up to {section['repeat']} runs when the first takes under {FOLD_REPEAT_BELOW_S:g} s.\n"
        f"RSS MB: the worker's VmHWM. fidelity: onnxruntime on the model's feeds, every output within "
        f"{FOLD_ATOL:g} + {FOLD_RTOL:g} x max|original| (non-float outputs exactly); nodes include subgraphs."
    )
    verdicts = section["verdicts"]

    def yn(v: bool | None) -> str:
        return "n/a" if v is None else ("yes" if v else "NO")

    lines = ["onnxcompress fold nodes <= min(anchors):"]
    for v in verdicts:
        fold = f"fold {_fmt(v['nodes_fold'], 'd')} ({_fmt_bytes(v['size_fold'])})"
        best = (
            f"min {v['nodes_min_anchor']} by {v['min_anchor']} ({_fmt_bytes(v['size_min_anchor'])})"
            if v["min_anchor"]
            else "no anchor with a correct output"
        )
        detail = f"{fold}, {best}"
        if v.get("nodes_unguarded") is not None:
            detail += f"; unguarded fold {v['nodes_unguarded']} ({yn(v['nodes_unguarded_ok'])})"
        lines.append(f"  {v['model']}: {yn(v['nodes_ok'])}  [{detail}]" + (f"  {v['note']}" if v["note"] else ""))
    lines.append("fold time <= onnxslim time (fold pass: load + fold + save, no validation):")
    for v in verdicts:
        lines.append(
            f"  {v['model']}: {yn(v['time_ok'])}  [fold pass {_fmt(v['fold_pass_seconds'], '.2f')} s, "
            f"compress {_fmt(v['fold_compress_seconds'], '.2f')} s, onnxslim {_fmt(v['onnxslim_seconds'], '.2f')} s]"
        )
    node_vals = [v["nodes_ok"] for v in verdicts]
    time_vals = [v["time_ok"] for v in verdicts]
    lines.append(
        f"all models: fold nodes <= min(anchors): {yn(all(node_vals) if None not in node_vals and node_vals else None)}"
        f" ({sum(1 for x in node_vals if x)}/{len(node_vals)}); fold time <= onnxslim time: "
        f"{yn(all(time_vals) if None not in time_vals and time_vals else None)} "
        f"({sum(1 for x in time_vals if x)}/{len(time_vals)})"
    )
    blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


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
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"Where to write the JSON results (default {DEFAULT_JSON.relative_to(REPO)}).",
    )
    p.add_argument("--plain", action="store_true", help="Plain-text table even when rich is installed.")
    p.add_argument("--keep-outputs", type=Path, default=None, help="Keep the compressed models in this folder.")
    p.add_argument("--tool-timeout", type=float, default=DEFAULT_TOOL_TIMEOUT, help="Seconds per tool run.")
    p.add_argument("--big", action="store_true", help="Also measure the >2 GB round trip of scripts/big_model.py.")
    p.add_argument("--big-bytes", type=float, default=2.3e9, help="Size of the --big model (default 2.3e9).")
    p.add_argument("--big-dir", default=None, help="Where to build the --big model (default: the temp folder).")
    p.add_argument(
        "--fold",
        action="store_true",
        help="Only the fold comparison: onnxcompress fold vs onnxsim, onnxslim, onnxoptimizer on the bench\n"
        "models, onnx's light_*.onnx and three synthetic exporter-style models (default JSON: "
        f"{DEFAULT_FOLD_JSON.relative_to(REPO)}).",
    )
    p.add_argument("--no-fold", action="store_true", help="Skip the fold comparison in the full run.")
    p.add_argument(
        "--fold-tool",
        action="append",
        help="Fold comparison tool to run (repeatable): oc-fold, oc-fold-pass, " + ", ".join(FOLD_ANCHOR_MODULES) + ".",
    )
    p.add_argument(
        "--fold-repeat",
        type=int,
        default=None,
        help=f"Runs of each fold tool quicker than {FOLD_REPEAT_BELOW_S:g} s; its time is their median\n"
        f"(default {FOLD_REPEAT} with --fold, 1 in the full run).",
    )
    p.add_argument("--filter", action="append", help="Only models whose file stem contains this text (repeatable).")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.sample_ms = args.sample_ms or (2.0 if args.quick else 10.0)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    args.fold_repeat = args.fold_repeat or (FOLD_REPEAT if args.fold else 1)
    if args.fold_repeat < 1:
        p.error("--fold-repeat must be >= 1")
    if args.fold and args.no_fold:
        p.error("--fold and --no-fold contradict each other")
    args.json = args.json or (DEFAULT_FOLD_JSON if args.fold else DEFAULT_JSON)
    return args


def run_quantization(
    args: argparse.Namespace, anchor_env: dict[str, Any] | None, notes: list[str]
) -> tuple[list[ModelCase], list[Row]]:
    """The techniques and the onnxruntime.quantization anchors on every model; prints the table."""
    tools = select_tools(args, anchor_env, notes)
    models = discover_models(args.model, not args.no_default_models)
    if args.filter:
        models = [p for p in models if any(f in p.stem for f in args.filter)]
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
    return cases, rows


# Suites with their own script: ``python scripts/bench.py SUITE [its options]`` runs scripts/bench_SUITE.py.
SUITES = ("split", "batch", "structural", "prune_channels", "transport", "tune", "tool", "delta")


def run_suite(name: str, argv: list[str]) -> int:
    """Run ``scripts/bench_<name>.py``'s ``main(argv)`` (each suite prints its CPU and tables)."""
    path = Path(__file__).resolve().parent / f"bench_{name}.py"
    if not path.is_file():
        print(f"bench: suite {name} is not available ({path.name} missing)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].replace("-", "_") in SUITES:
        return run_suite(argv[0].replace("-", "_"), argv[1:])
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    started = time.perf_counter()
    notes: list[str] = []
    env = environment_info()
    quantization = not args.fold
    with_fold = args.fold or not (args.no_fold or args.quick)
    anchor_env = None if args.no_anchors or not quantization else probe_anchor_python(args.anchor_python)
    fold_env = None if args.no_anchors or not with_fold else probe_fold_anchors(args.anchor_python)
    print(format_header(env, anchor_env, args, quantization), flush=True)
    if fold_env is not None:
        versions = ", ".join(f"{m} {fold_env.get(m, {}).get('version') or 'missing'}" for m in FOLD_ANCHOR_MODULES)
        print(f"fold anchors run in {fold_env['python']}: {versions}", flush=True)
    cases, rows = run_quantization(args, anchor_env, notes) if quantization else ([], [])
    big = run_big(args, notes) if args.big else None
    if big:
        print(format_big(big))
    fold = run_fold(args, fold_env, notes) if with_fold else None
    if fold is not None:
        print()
        print(format_fold(fold))
    for note in notes:
        print(f"note: {note}")
    seconds = time.perf_counter() - started
    fold_rows: list[FoldRow] = fold.pop("_rows") if fold is not None else []
    if fold is not None:
        fold["anchor_env"] = fold_env
    payload = {
        "schema": 2,
        "env": env,
        "anchor_env": anchor_env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "models": [c.to_dict() for c in cases],
        "rows": [r.to_dict() for r in rows],
        "big": big,
        "fold": fold,
        "notes": notes,
        "seconds": seconds,
    }
    write_json(args.json, payload)
    print(f"wrote {args.json} in {seconds:.1f} s")
    fold_ok = all(r.good for r in fold_rows if r.kind == "onnxcompress")
    return 0 if all(r.ok for r in rows) and fold_ok else 1


if __name__ == "__main__":
    sys.exit(main())
