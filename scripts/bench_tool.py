"""Tool speed and memory: the whole ``onnxcompress compress`` process vs the anchors' whole processes.

Each measurement is a fresh subprocess (this script re-run with ``--child``): it imports what the
tool needs (onnxcompress's CLI, onnx, numpy, onnxruntime; the anchor's library for an anchor),
records its RSS, runs the tool, and reports its peak RSS (``VmHWM``, which ``exec`` resets, unlike
``ru_maxrss``) and the peak of any children. Wall time is the whole process measured from outside
(spawn to exit, interpreter start and imports included); CPU seconds are the child's user + system
time (with its own children's). Variants run interleaved (ABBA order across repeats) because the
machine may be shared; the table gives medians.

Memory is read as **peak RSS above the RSS after imports** (``delta``): the fixed cost of Python,
onnxruntime and its session arenas dominates small models, so the target (at most 2x the fp32 model
bytes) is about weight-dominated models such as MiniLM.

Bytecode: every tool is measured as installed, reading compiled bytecode. The libraries (numpy, onnx,
onnxruntime, the anchors' packages) were compiled by their ``pip install``; our package (and a
``--baseline`` folder) is compiled once at the start (``python -m compileall``, into its ``__pycache__``
folders, :func:`compile_packages`), so a ``PYTHONDONTWRITEBYTECODE`` environment does not charge our
runs ~0.2 s of compiling per start that an installed package never pays.

Usage::

    python scripts/bench_tool.py                       # MiniLM + digits_cnn + resnet_cnn, every mode
    python scripts/bench_tool.py --models minilm --modes fp16,int4 --repeats 3
    python scripts/bench_tool.py --no-anchors --out /tmp/t.json
    python scripts/bench_tool.py --models minilm --modes int4-rtn,int8-dynamic/tensor --repeats 3 \
        --skip-validation-only --baseline /tmp/old   # before/after: /tmp/old/onnxcompress = a copy
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "minilm": ROOT / "models/cache/minilm/minilm.onnx",
    "digits_cnn": ROOT / "models/digits_cnn.onnx",
    "resnet_cnn": ROOT / "models/resnet_cnn.onnx",
}
# mode label -> (technique, extra CLI arguments)
MODES: dict[str, tuple[str, list[str]]] = {
    "int8-weights": ("int8-weights", []),
    "int8-dynamic": ("int8-dynamic", []),
    "int8-dynamic/tensor": (
        "int8-dynamic",
        ["--param", "activations=tensor", "--param", "smooth=0", "--param", "gptq=false"],
    ),
    "int4": ("int4", []),
    "int4-rtn": ("int4", ["--param", "method=rtn"]),
    "fp16": ("fp16", []),
    "bf16": ("bf16", []),
    "int8-static": ("int8-static", []),
}
# mode label -> anchor name (see _ANCHORS); None: no anchor
ANCHOR_OF = {
    "int8-weights": "ort-nbits8",
    "int8-dynamic": "ort-dynamic",
    "int8-dynamic/tensor": "ort-dynamic",
    "int4": "ort-nbits4-gather",
    "int4-rtn": "ort-nbits4-gather",
    "fp16": "float16-converter",
    "bf16": "float16-converter",
    "int8-static": "ort-static",
}
BENCH_PYTHON = Path("/work/venv-bench/bin/python")  # has onnxconverter_common (the fp16 anchor)


# --------------------------------------------------------------------------- child side


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _calibration_feeds(model: str, rows: int = 32) -> list[dict[str, Any]]:
    import numpy as np

    path = Path(model).with_name(Path(model).stem + ".calibration.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    total = min(a.shape[0] for a in arrays.values())
    return [{k: a[i : i + rows] for k, a in arrays.items()} for i in range(0, total, rows)]


def _anchor(name: str, model: str, output: str) -> None:
    """Run one anchor in this process (its imports are done by :func:`_anchor_imports`)."""
    import onnx

    if name == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model, output, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})
    elif name.startswith("ort-nbits"):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        bits = 8 if name.startswith("ort-nbits8") else 4
        extra: dict[str, Any] = {}
        if name.endswith("-gather"):
            extra = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))}
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, **extra)
        quant = MatMulNBitsQuantizer(
            onnx.load(model), bits=bits, block_size=32, is_symmetric=True, algo_config=config, **extra
        )
        quant.process()
        quant.model.save_model_to_file(output, False)
    elif name == "ort-static":
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

        feeds = _calibration_feeds(model)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

        quantize_static(
            model,
            output,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    elif name == "float16-converter":
        from onnxconverter_common import float16

        onnx.save(float16.convert_float_to_float16(onnx.load(model), keep_io_types=True), output)
    else:
        raise SystemExit(f"unknown anchor {name}")


def _anchor_imports(name: str) -> None:
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    if name == "float16-converter":
        import onnxconverter_common.float16  # noqa: F401
    elif name.startswith("ort-nbits"):
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    else:
        import onnxruntime.quantization  # noqa: F401


def child(spec: dict[str, Any]) -> None:
    """Imports, RSS after imports, run the tool, peak RSS; writes the JSON result to spec['result']."""
    logging_off = os.environ.setdefault("PYTHONWARNINGS", "ignore")  # noqa: F841
    if spec["kind"] == "ours":
        if spec.get("env", {}).get("PYTHONPATH"):
            # an editable install's import hook would win over PYTHONPATH: the baseline must be imported
            sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        from onnxcompress import cli

        rss_import = _status_kib("VmRSS")
        start = time.perf_counter()
        sys.argv = ["onnxcompress", *spec["argv"]]  # as the console script runs it: main() reads sys.argv
        code = cli.main()
    else:
        import logging

        logging.disable(logging.WARNING)
        _anchor_imports(spec["anchor"])
        rss_import = _status_kib("VmRSS")
        start = time.perf_counter()
        _anchor(spec["anchor"], spec["model"], spec["output"])
        code = 0
    seconds = time.perf_counter() - start
    result = {
        "code": code,
        "tool_seconds": seconds,
        "rss_after_import_kib": rss_import,
        "peak_rss_kib": _status_kib("VmHWM"),
        "children_peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent side


def compile_packages(folders: list[Path]) -> None:
    """Bytecode for our package(s) as an install has it, in their ``__pycache__`` folders.

    ``pip install`` compiles every module; a source checkout run with ``PYTHONDONTWRITEBYTECODE`` (as
    in some sandboxes) would recompile each of our modules at every start (~0.2 s of the wall time,
    which no anchor pays: onnxruntime's and the other libraries' modules are installed with theirs).
    So our folders are compiled once here and every run reads the same bytecode; the runs themselves
    keep the environment's ``PYTHONDONTWRITEBYTECODE`` (they only read). ``PYTHONPYCACHEPREFIX`` is
    dropped, so that every interpreter reads the ``__pycache__`` folders the installs wrote.
    """
    os.environ.pop("PYTHONPYCACHEPREFIX", None)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for folder in folders:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(folder)], env=env, check=False)


def _run(spec: dict[str, Any], python: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-tool-") as tmp:
        spec = dict(spec, result=str(Path(tmp) / "result.json"))
        env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
        env.update(spec.get("env", {}))
        start = time.perf_counter()
        proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp,
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        # The rusage of this child (and its children) only: the waited-for process's own counters.
        usage = _last_child_usage()
        try:
            result = json.loads(Path(spec["result"]).read_text())
        except (OSError, ValueError):
            tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
            return {"ok": False, "error": " | ".join(tail) or f"exit {proc.returncode}"}
        # Exit 1: validation failed, the output written anyway (--force): the run itself is complete.
        result.update(
            ok=result["code"] in (0, 1),
            validation_failed=result["code"] == 1,
            error=None if result["code"] in (0, 1) else stderr.decode(errors="replace").strip()[-300:],
            wall_seconds=wall,
            cpu_seconds=usage,
        )
        return result


_CHILD_CPU = [0.0]


def _last_child_usage() -> float:
    """CPU seconds (user + system) of the children reaped since the previous call."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ru.ru_utime + ru.ru_stime
    used, _CHILD_CPU[0] = total - _CHILD_CPU[0], total
    return used


# --transport-size: off (every run of ours passes --no-transport-size), on (compress's default:
# output.transport_bytes is measured, a coding pass), or both (the default runs and the
# --no-transport-size runs, interleaved).
TRANSPORT_SIZE = ["off"]


def _ours_spec(model: Path, mode: str, out: Path, validate: bool, transport: bool | None = None) -> dict[str, Any]:
    technique, extra = MODES[mode]
    argv = ["compress", str(model), "-o", str(out), "-q", technique, "--force", *extra]
    if not (TRANSPORT_SIZE[0] != "off" if transport is None else transport):
        argv.append("--no-transport-size")
    if not validate:
        argv.append("--skip-validation")
    # this script's own package (its tree, compiled by compile_packages), not whatever an editable
    # install of the venv points at: a copy of the repository measures its own code
    return {"kind": "ours", "argv": argv, "env": {"PYTHONPATH": str(ROOT)}}


def _our_variants() -> list[tuple[str, bool, bool]]:
    """(label suffix, validate, transport size) of ours for the --transport-size setting."""
    if TRANSPORT_SIZE[0] == "both":
        return [
            ("", True, True),
            (" --no-transport-size", True, False),
            (" --skip-validation", False, True),
            (" --skip-validation --no-transport-size", False, False),
        ]
    on = TRANSPORT_SIZE[0] == "on"
    return [("", True, on), (" --skip-validation", False, on)]


def _variants(
    model_name: str, modes: list[str], anchors: bool, baseline: str | None = None
) -> list[tuple[str, str, dict[str, Any], str]]:
    """(mode, variant label, spec, python) for one model; anchors shared between modes run once.

    ``baseline``: a folder holding another ``onnxcompress`` package (e.g. the previous commit's),
    run as the variants ``before`` on ``PYTHONPATH`` (interleaved with the others).
    """
    model = MODELS[model_name]
    out = Path(tempfile.gettempdir()) / f"bench-tool-{os.getpid()}-{model_name}.onnx"
    rows: list[tuple[str, str, dict[str, Any], str]] = []
    seen: set[str] = set()
    for mode in modes:
        for suffix, check, transport in _our_variants():
            rows.append((mode, "ours" + suffix, _ours_spec(model, mode, out, check, transport), sys.executable))
        if baseline:
            for suffix, check, transport in _our_variants():
                spec = dict(_ours_spec(model, mode, out, check, transport), env={"PYTHONPATH": baseline})
                rows.append((mode, "before" + suffix, spec, sys.executable))
        anchor = ANCHOR_OF.get(mode)
        if anchors and anchor and anchor not in seen:
            seen.add(anchor)
            # venv-bench has onnxconverter_common and onnx_ir (MatMulNBitsQuantizer's dependency)
            python = (
                str(BENCH_PYTHON)
                if anchor in ("float16-converter", "ort-nbits8", "ort-nbits4-gather")
                else sys.executable
            )
            spec = {"kind": "anchor", "anchor": anchor, "model": str(model), "output": str(out)}
            rows.append((mode, f"anchor {anchor}", spec, python))
    return rows


def _summary(results: list[dict[str, Any]], model_bytes: int) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return {"ok": False, "error": results[0].get("error") if results else "not run", "runs": results}
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    peak = max(r["peak_rss_kib"] for r in ok) * 1024
    base = statistics.median(r["rss_after_import_kib"] for r in ok) * 1024
    delta = max((r["peak_rss_kib"] - r["rss_after_import_kib"]) for r in ok) * 1024
    return {
        "ok": True,
        "wall_seconds": med("wall_seconds"),
        "cpu_seconds": med("cpu_seconds"),
        "tool_seconds": med("tool_seconds"),
        "peak_rss_mb": peak / 2**20,
        "rss_after_import_mb": base / 2**20,
        "delta_rss_mb": delta / 2**20,
        "delta_over_model": delta / model_bytes if model_bytes else None,
        "children_peak_rss_mb": max(r["children_peak_rss_kib"] for r in ok) / 1024,
        "runs": results,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the rows (medians; delta = peak RSS above the RSS after imports)."""
    lines = [
        "| model | mode | variant | wall s | CPU s | peak RSS MB | RSS after imports MB | delta MB | delta / fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | failed: {r['error']} ||||||")
            continue
        note = " (validation failed)" if any(x.get("validation_failed") for x in r["runs"]) else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['variant']}{note} | {r['wall_seconds']:.2f} | {r['cpu_seconds']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_after_import_mb']:.0f} | {r['delta_rss_mb']:.0f} | "
            f"{r['delta_over_model']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (median reported)")
    parser.add_argument("--no-anchors", action="store_true", help="skip the anchors")
    parser.add_argument("--no-skip-validation", action="store_true", help="only the validating runs of ours")
    parser.add_argument(
        "--skip-validation-only",
        action="store_true",
        help="only the --skip-validation runs of ours (like for like: the anchors do not validate)",
    )
    parser.add_argument(
        "--transport-size",
        nargs="?",
        const="on",
        default="off",
        choices=("off", "on", "both"),
        help="let compress measure output.transport_bytes (its default; off here: a separate coding pass); "
        "'both': the runs with and without it, interleaved",
    )
    parser.add_argument(
        "--baseline", help="folder with another onnxcompress package to compare (variants 'before', on PYTHONPATH)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--out", default=str(ROOT / "bench-results/bench-tool.json"), help="JSON results")
    parser.add_argument(
        "--append", action="store_true", help="keep the rows of --out for models/modes/variants not run now"
    )
    parser.add_argument("--print", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.print:
        print(format_table(json.loads(Path(args.out).read_text())["rows"]))
        return 0
    TRANSPORT_SIZE[0] = args.transport_size
    compile_packages([ROOT / "onnxcompress"] + ([Path(args.baseline)] if args.baseline else []))
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import cpu_info

    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs)")
    print("     " + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items()))
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    started = time.perf_counter()
    rows = []
    _last_child_usage()
    for model_name in [m for m in args.models.split(",") if m]:
        model = MODELS[model_name]
        if not model.exists():
            print(f"skipping {model_name}: {model} absent", flush=True)
            continue
        model_bytes = model.stat().st_size
        modes = [m for m in args.modes.split(",") if m]
        variants = _variants(model_name, modes, not args.no_anchors, args.baseline)
        if args.no_skip_validation:
            variants = [v for v in variants if "skip" not in v[1]]
        if args.skip_validation_only:
            variants = [v for v in variants if "skip" in v[1] or v[1].startswith("anchor")]
        runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(variants))}
        for rep in range(args.repeats):
            order = list(range(len(variants)))
            for i in order if rep % 2 == 0 else order[::-1]:  # ABBA across repeats
                mode, label, spec, python = variants[i]
                r = _run(spec, python, args.timeout)
                runs[i].append(r)
                state = f"{r['wall_seconds']:.2f} s" if r.get("ok") else f"FAILED: {r.get('error')}"
                print(f"  [{model_name} {mode} | {label}] run {rep + 1}: {state}", file=sys.stderr, flush=True)
        for i, (mode, label, _spec, _python) in enumerate(variants):
            rows.append(
                {"model": model_name, "model_bytes": model_bytes, "mode": mode, "variant": label}
                | _summary(runs[i], model_bytes)
            )
    if args.append and Path(args.out).exists():
        done = {(r["model"], r["mode"], r["variant"]) for r in rows}
        old_rows = json.loads(Path(args.out).read_text()).get("rows", [])
        rows = [r for r in old_rows if (r["model"], r["mode"], r["variant"]) not in done] + rows
    data = {
        "schema": 1,
        "env": {
            "cpu": cpu,
            "python": platform.python_version(),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_average_after": os.getloadavg()[0],
        },
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "notes": "wall = whole process from outside; delta = peak RSS (VmHWM) - RSS after imports; "
        "bytecode as installed (our package compiled once with compileall, see compile_packages)",
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    print()
    print(format_table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
