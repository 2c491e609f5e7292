"""Benchmark ``onnxcompress tune`` against single-precision configurations and onnxruntime's anchors.

Rows per model: ``tune`` at each tolerance, ``compress -q int8-weights``, ``compress -q int4`` (GPTQ with
the calibration data) and onnxruntime's ``quantize_dynamic`` (QInt8, per channel). Each tool runs in its
own subprocess under ``/usr/bin/time`` (wall time, peak RSS); every output is then compared with the
original in onnxruntime on the model's validation inputs (sidecar ``<stem>.inputs.npz``) with
``onnxcompress.validate.compare`` (worst-sample cosine, accuracy with labels) and timed (1 intra-op
thread, median of alternating runs after warm-up). Prints a markdown table, writes
``bench-results/bench-tune.json``.

Usage::

    python scripts/bench_tune.py                    # MiniLM (if downloaded) and digits_cnn
    python scripts/bench_tune.py --models digits    # digits_cnn only (fast)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MINILM = MODELS / "cache" / "minilm" / "minilm.onnx"


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("oc_bench", ROOT / "scripts" / "bench.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _timed(cmd: list[str]) -> tuple[int, float, int, str]:
    """Run ``cmd`` under /usr/bin/time: (exit code, wall seconds, peak RSS KB, last stderr line)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", tf.name, *cmd], capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - start
        text = Path(tf.name).read_text().strip().splitlines()
    rss = int(text[-1]) if text and text[-1].isdigit() else 0
    err = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, wall, rss, err


def _latency(original: Path, candidate: Path, feed: dict[str, np.ndarray], runs: int = 15) -> float:
    from onnxcompress.validate import make_session

    a, b = make_session(original, threads=1), make_session(candidate, threads=1)
    a.run(None, feed)
    b.run(None, feed)
    ta, tb = [], []
    for _ in range(runs):
        for sess, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            acc.append(time.perf_counter() - t0)
    return float(np.median(tb) / np.median(ta))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _ort_dynamic(model: Path, out: Path) -> list[str]:
    code = (
        "import sys; from onnxruntime.quantization import quantize_dynamic, QuantType; "
        "quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, per_channel=True)"
    )
    return [sys.executable, "-c", code, str(model), str(out)]


def run(models: list[str], out_dir: Path) -> list[dict[str, Any]]:
    from onnxcompress import feeds as feeds_mod
    from onnxcompress import io
    from onnxcompress.validate import compare

    oc = [sys.executable, "-c", "import sys; from onnxcompress.cli import run; sys.argv[0]='onnxcompress'; run()"]
    tune_cmd = [
        sys.executable,
        "-c",
        "import sys, onnxcompress.cli as c; from onnxcompress.cli_tune import register; register(c.app); "
        "sys.exit(c.main(sys.argv[1:]))",
    ]
    plans: list[tuple[str, Path, list[tuple[str, list[str], list[str]]]]] = []
    if "minilm" in models and MINILM.exists():
        cal = str(MINILM.with_name("minilm.calibration.npz"))
        plans.append(
            (
                "minilm",
                MINILM,
                [
                    (
                        "tune cosine>=0.99",
                        ["tune", "--tolerance", "cosine>=0.99", "--calibration", cal],
                        ["cosine>=0.99"],
                    ),
                    (
                        "tune cosine>=0.999",
                        ["tune", "--tolerance", "cosine>=0.999", "--calibration", cal],
                        ["cosine>=0.999"],
                    ),
                    ("int8-weights", ["compress", "-q", "int8-weights", "-t", "cosine>=0"], ["cosine>=0.99"]),
                    (
                        "int4 (GPTQ)",
                        ["compress", "-q", "int4", "--calibration", cal, "-t", "cosine>=0"],
                        ["cosine>=0.99"],
                    ),
                    ("ort quantize_dynamic", [], ["cosine>=0.99"]),
                ],
            )
        )
    if "digits" in models:
        d = MODELS / "digits_cnn.onnx"
        lab = ["--labels", str(MODELS / "digits_cnn.labels.npy"), "--inputs", str(MODELS / "digits_cnn.inputs.npz")]
        plans.append(
            (
                "digits_cnn",
                d,
                [
                    (
                        "tune accuracy_drop<=0.005",
                        ["tune", "--tolerance", "accuracy_drop<=0.005", *lab],
                        ["accuracy_drop<=0.005"],
                    ),
                    ("int8-weights", ["compress", "-q", "int8-weights", "-t", "cosine>=0"], ["accuracy_drop<=0.005"]),
                    ("ort quantize_dynamic", [], ["accuracy_drop<=0.005"]),
                ],
            )
        )
    rows: list[dict[str, Any]] = []
    for name, model, tools in plans:
        m = io.load(model)
        sig = feeds_mod.input_signature(m)
        del m
        feeds = feeds_mod.load_feeds(feeds_mod.sidecar_inputs(model), sig)  # type: ignore[arg-type]
        lpath = feeds_mod.sidecar_labels(model)
        labels = feeds_mod.load_labels(lpath) if lpath else None
        for label, args, tols in tools:
            out = out_dir / f"{name}-{label.split()[0]}-{len(rows)}.onnx"
            if not args:
                cmd = _ort_dynamic(model, out)
            else:
                cmd = (tune_cmd if args[0] == "tune" else oc) + [
                    args[0],
                    str(model),
                    "-o",
                    str(out),
                    *args[1:],
                    "--force",
                ]
                if args[0] == "tune":
                    cmd += ["--report", str(out.with_suffix(".json"))]
            code, wall, rss, err = _timed(cmd)
            row: dict[str, Any] = {
                "model": name,
                "tool": label,
                "exit": code,
                "wall_s": round(wall, 1),
                "peak_rss_mb": rss // 1024,
            }
            if code != 0 or not out.exists():
                row["error"] = err
                rows.append(row)
                continue
            rep = compare(model, out, feeds, tols, labels=labels)
            diff = next(iter(rep.outputs.values()))
            row.update(
                size_ratio=round(_size(out) / _size(model), 4),
                worst_cosine=diff.cosine,
                accuracy_drop=(rep.accuracy or {}).get("drop"),
                holds=rep.passed,
                latency_ratio=round(_latency(model, out, feeds[0]), 3),
            )
            if args and args[0] == "tune":
                data = json.loads(out.with_suffix(".json").read_text())
                row["precisions"] = data["tune"]["precisions"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "digits"], choices=["minilm", "digits"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench-tune.json")
    args = ap.parse_args(argv)
    bench = _bench_module()
    cpu = bench.cpu_info()
    print(f"CPU: {cpu.get('model')} ({cpu.get('logical_cores', '?')} logical cores); flags: {cpu.get('flags')}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    try:
        rows = run(args.models, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = [
        "model",
        "tool",
        "size_ratio",
        "worst_cosine",
        "accuracy_drop",
        "holds",
        "latency_ratio",
        "wall_s",
        "peak_rss_mb",
    ]
    print("\n| " + " | ".join(cols) + " | precisions |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = ["-" if r.get(c) is None else (f"{r[c]:.5f}" if c == "worst_cosine" else str(r[c])) for c in cols]
        print("| " + " | ".join(cells) + f" | {r.get('precisions', r.get('error', ''))} |")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
