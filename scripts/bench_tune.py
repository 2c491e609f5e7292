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
    python scripts/bench_tune.py --transport        # MiniLM packages: tune --objective transport vs anchors
    python scripts/bench_tune.py --ecr              # MiniLM: rate saved by entropy-constrained rounding

``--transport`` rows report the package (``onnxcompress pack``) and ``zstd -19`` of the file as
fractions of the float32 file, with the worst held-out cosine; ``--ecr`` writes
``bench-results/bench-ecr.json``.
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


def _packages(path: Path) -> dict[str, int]:
    """``{"pack": package bytes, "zstd19": zstd -19 bytes}`` of a model file (and its external data)."""
    import zstandard

    from onnxcompress.transport import packed_size

    files = sorted(p for p in path.parent.glob(path.name + "*") if p.is_file() and p.suffix != ".ocpk")
    z = sum(len(zstandard.ZstdCompressor(level=19).compress(f.read_bytes())) for f in files)
    return {"pack": packed_size(path), "zstd19": z}


def run_transport(out_dir: Path) -> list[dict[str, Any]]:
    """MiniLM: ``tune --objective transport`` in both search modes, and the anchors, as packages."""
    from onnxcompress import feeds as feeds_mod
    from onnxcompress import io
    from onnxcompress.validate import compare

    if not MINILM.exists():
        print("MiniLM is not downloaded: nothing to do")
        return []
    cal = str(MINILM.with_name("minilm.calibration.npz"))
    oc = [sys.executable, "-c", "import sys; from onnxcompress.cli import run; sys.argv[0]='onnxcompress'; run()"]
    tune_cmd = [
        sys.executable,
        "-c",
        "import sys, onnxcompress.cli as c; from onnxcompress.cli_tune import register; register(c.app); "
        "sys.exit(c.main(sys.argv[1:]))",
    ]
    base = ["--tolerance", "cosine>=0.99", "--calibration", cal]
    tools: list[tuple[str, list[str]]] = [
        ("tune transport (search on inputs)", ["tune", *base, "--objective", "transport"]),
        (
            "tune transport (search on calibration)",
            ["tune", *base, "--objective", "transport", "--search-on", "calibration"],
        ),  # fmt: skip
        ("tune size (search on inputs)", ["tune", *base]),
        ("int8-weights", ["compress", "-q", "int8-weights", "-t", "cosine>=0"]),
        ("int4 (GPTQ)", ["compress", "-q", "int4", "--calibration", cal, "-t", "cosine>=0"]),
        ("ort quantize_dynamic (anchor)", []),
    ]
    m = io.load(MINILM)
    feeds = feeds_mod.load_feeds(feeds_mod.sidecar_inputs(MINILM), feeds_mod.input_signature(m))  # type: ignore[arg-type]
    del m
    fp32 = _size(MINILM)
    rows: list[dict[str, Any]] = []
    for label, args in tools:
        out = out_dir / f"minilm-{len(rows)}.onnx"
        if not args:
            cmd = _ort_dynamic(MINILM, out)
        else:
            cmd = (tune_cmd if args[0] == "tune" else oc) + [args[0], str(MINILM), "-o", str(out), *args[1:], "--force"]
            if args[0] == "tune":
                cmd += ["--report", str(out.with_suffix(".json"))]
        code, wall, rss, err = _timed(cmd)
        row: dict[str, Any] = {"model": "minilm", "tool": label, "exit": code, "wall_s": round(wall, 1),
                               "peak_rss_mb": rss // 1024}  # fmt: skip
        if code != 0 or not out.exists():
            row["error"] = err
            rows.append(row)
            continue
        rep = compare(MINILM, out, feeds, ["cosine>=0.99"])
        sizes = _packages(out)
        row.update(
            file_ratio=round(_size(out) / fp32, 4),
            package_bytes=sizes["pack"],
            package_ratio=round(sizes["pack"] / fp32, 4),
            zstd19_ratio=round(sizes["zstd19"] / fp32, 4),
            worst_cosine=next(iter(rep.outputs.values())).cosine,
            holds=rep.passed,
        )
        if args and args[0] == "tune":
            row["precisions"] = json.loads(out.with_suffix(".json").read_text())["tune"]["precisions"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_ecr(
    out_dir: Path, lambdas: tuple[float, ...] = (0.0, 0.03, 0.1), bits: tuple[float, ...] = (5.0, 5.5, 6.0)
) -> list[dict[str, Any]]:
    """Rate of MiniLM packages (all weights ``int8-weights`` step=rms, GPTQ, embeddings 1.5 bits lower)
    with and without entropy-constrained rounding; the saving at equal fidelity is read off the
    round-to-nearest curve (log of 1 - worst cosine against package bytes, interpolated)."""
    import onnxruntime as ort

    from onnxcompress import io
    from onnxcompress.passes.base import PassContext
    from onnxcompress.passes.quantize.weights import Int8WeightsConfig, Int8WeightsPass
    from onnxcompress.recipes import build_passes
    from onnxcompress.transport import packed_size

    if not MINILM.exists():
        print("MiniLM is not downloaded: nothing to do")
        return []
    held = dict(np.load(MINILM.with_name("minilm.inputs.npz")))
    cal = dict(np.load(MINILM.with_name("minilm.calibration.npz")))
    calib = [{k: v[i : i + 16] for k, v in cal.items()} for i in range(0, len(cal["input_ids"]), 16)]
    ref = ort.InferenceSession(str(MINILM)).run(None, held)[0].astype(np.float64)
    fp32 = _size(MINILM)
    rows: list[dict[str, Any]] = []
    for b in bits:
        for lam in lambdas:
            m = io.load(MINILM)
            ctx = PassContext(calibration=calib)
            for p in build_passes(["fold"]):
                p.run(m, ctx)
            emb = "encoder.embeddings.word_embeddings.weight"
            cfg = Int8WeightsConfig(bits=b, step="rms", gptq=True, ecr_lambda=lam, bits_by_tensor=((emb, b - 1.5),))
            Int8WeightsPass(cfg).run(m, ctx)
            out = out_dir / f"ecr-{b}-{lam}.onnx"
            io.save(m, out)
            o = ort.InferenceSession(str(out)).run(None, held)[0].astype(np.float64)
            cos = float(np.min(np.sum(ref * o, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(o, axis=1)))
            row = {"bits": b, "ecr_lambda": lam, "package_bytes": packed_size(out), "worst_cosine": cos}
            row["package_ratio"] = round(row["package_bytes"] / fp32, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = sorted((r for r in rows if r["ecr_lambda"] == 0), key=lambda r: r["package_bytes"])
    xs = [np.log(1 - r["worst_cosine"]) for r in base]
    for r in rows:
        if r["ecr_lambda"] and len(base) >= 2:
            # bytes round-to-nearest needs for the same fidelity (linear in log(1 - cos), extrapolated at the ends)
            x = np.log(1 - r["worst_cosine"])
            i = 0 if x > xs[1] else len(base) - 2
            for j in range(len(base) - 1):
                if min(xs[j], xs[j + 1]) <= x <= max(xs[j], xs[j + 1]):
                    i = j
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            same = base[i]["package_bytes"] + t * (base[i + 1]["package_bytes"] - base[i]["package_bytes"])
            r["rtn_bytes_at_equal_fidelity"] = int(same)
            r["saved_fraction"] = round(1 - r["package_bytes"] / same, 4)
    return rows


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
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--transport", action="store_true", help="MiniLM packages: tune --objective transport and anchors")
    ap.add_argument("--ecr", action="store_true", help="MiniLM: rate saved by entropy-constrained rounding")
    ap.add_argument("--ecr-bits", type=float, nargs="+", default=[5.0, 5.5, 6.0], help="--ecr: widths (rms steps)")
    ap.add_argument("--ecr-lambdas", type=float, nargs="+", default=[0.0, 0.03, 0.1], help="--ecr: multipliers")
    args = ap.parse_args(argv)
    bench = _bench_module()
    cpu = bench.cpu_info()
    print(f"CPU: {cpu.get('model')} ({cpu.get('logical_cores', '?')} logical cores); flags: {cpu.get('flags')}")
    if args.transport or args.ecr:
        tmp = Path(tempfile.mkdtemp(prefix="bench-transport-"))
        try:
            rows = run_transport(tmp) if args.transport else run_ecr(tmp, tuple(args.ecr_lambdas), tuple(args.ecr_bits))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cols = (
            ["tool", "package_ratio", "package_bytes", "zstd19_ratio", "file_ratio", "worst_cosine", "holds", "wall_s",
             "peak_rss_mb"]
            if args.transport
            else ["bits", "ecr_lambda", "package_ratio", "package_bytes", "worst_cosine", "rtn_bytes_at_equal_fidelity",
                  "saved_fraction"]
        )  # fmt: skip
        print("\n| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            cells = ["-" if r.get(c) is None else (f"{r[c]:.5f}" if c == "worst_cosine" else str(r[c])) for c in cols]
            print("| " + " | ".join(cells) + " |")
        out = args.out or ROOT / "bench-results" / ("bench-transport-tune.json" if args.transport else "bench-ecr.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2, default=str) + "\n")
        print(f"wrote {out}")
        return 0
    args.out = args.out or ROOT / "bench-results" / "bench-tune.json"
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
