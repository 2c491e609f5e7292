"""Batch throughput: ``onnxcompress batch --jobs 1`` vs ``--jobs 2`` on a folder of medium models.

Builds (seeded, numpy) a folder of transformer-like MLP models (LayerNorm -> MatMul -> Relu -> MatMul
-> residual Add, stacked; default 8 models of about 34 MB each, each with held-out inputs, and
calibration sidecars with ``--calibration``), then runs the CLI batch over it with ``--jobs 1`` and ``--jobs 2`` alternately,
``--rounds`` times, in fresh output folders, and reports the median wall times and their ratio
(throughput of 2 jobs over 1 job). Prints the CPU it ran on; compares only times measured in this run.

    python scripts/bench_batch.py [--models 8] [--layers 4] [--dim 512] [--rounds 3] [--recipe edge-int8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def mlp_model(layers: int, dim: int, seed: int) -> onnx.ModelProto:
    """x[B, S, dim] through ``layers`` pre-norm MLP blocks (4x expansion) with residuals."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "x"
    for i in range(layers):
        w1 = (rng.standard_normal((dim, 4 * dim)) / np.sqrt(dim)).astype(np.float32)
        w2 = (rng.standard_normal((4 * dim, dim)) / np.sqrt(4 * dim)).astype(np.float32)
        g = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
        b = (0.1 * rng.standard_normal(dim)).astype(np.float32)
        inits += [nh.from_array(a, f"{n}{i}") for a, n in ((w1, "w1_"), (w2, "w2_"), (g, "g"), (b, "b"))]
        nodes += [
            h.make_node("LayerNormalization", [cur, f"g{i}", f"b{i}"], [f"ln{i}"], name=f"ln{i}", axis=-1),
            h.make_node("MatMul", [f"ln{i}", f"w1_{i}"], [f"up{i}"], name=f"up{i}"),
            h.make_node("Relu", [f"up{i}"], [f"act{i}"], name=f"act{i}"),
            h.make_node("MatMul", [f"act{i}", f"w2_{i}"], [f"down{i}"], name=f"down{i}"),
            h.make_node("Add", [cur, f"down{i}"], [f"res{i}"], name=f"res{i}"),
        ]
        cur = f"res{i}"
    nodes.append(h.make_node("Identity", [cur], ["y"], name="out"))
    graph = h.make_graph(
        nodes,
        "mlp",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", dim])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", dim])],
        inits,
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def build_zoo(folder: Path, models: int, layers: int, dim: int, calibration: bool) -> int:
    """Write the models with their sidecars; return the total model bytes."""
    total = 0
    for i in range(models):
        sub = folder / f"group{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"mlp_{i:02d}.onnx"
        onnx.save(mlp_model(layers, dim, seed=i), str(path))
        rng = np.random.default_rng(1000 + i)
        np.savez(path.with_name(path.stem + ".inputs.npz"), x=rng.standard_normal((4, 32, dim)).astype(np.float32))
        if calibration:
            cal = rng.standard_normal((8, 32, dim)).astype(np.float32)
            np.savez(path.with_name(path.stem + ".calibration.npz"), x=cal)
        total += path.stat().st_size
    return total


def run_batch(zoo: Path, out: Path, jobs: int, recipe: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxcompress", "batch", str(zoo), "-o", str(out), "--recipe", recipe]
    cmd += ["--jobs", str(jobs), "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"batch --jobs {jobs} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recipe", default="edge-int8")
    p.add_argument("--calibration", action="store_true", help="Also write calibration sidecars (GPTQ-style modes).")
    p.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench-batch.json")
    args = p.parse_args(argv)
    from bench import cpu_info

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, flags {cpu['flags']}")
    with tempfile.TemporaryDirectory(prefix="oc-bench-batch-") as d:
        zoo = Path(d) / "zoo"
        total = build_zoo(zoo, args.models, args.layers, args.dim, args.calibration)
        print(f"{args.models} models, {total / args.models / 1e6:.1f} MB each, recipe {args.recipe}")
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for jobs in (1, 2) if r % 2 == 0 else (2, 1):
                times[jobs].append(run_batch(zoo, Path(d) / f"out{jobs}", jobs, args.recipe))
                print(f"round {r + 1} --jobs {jobs}: {times[jobs][-1]:.2f} s", flush=True)
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    result = {
        "cpu": cpu,
        "models": args.models,
        "model_mb": round(total / args.models / 1e6, 1),
        "recipe": args.recipe,
        "jobs1_s": times[1],
        "jobs2_s": times[2],
        "median_jobs1_s": m1,
        "median_jobs2_s": m2,
        "throughput_ratio": m1 / m2,
    }
    print("\n| --jobs 1 (median s) | --jobs 2 (median s) | throughput ratio |\n|---|---|---|")
    print(f"| {m1:.2f} | {m2:.2f} | **{m1 / m2:.2f}x** |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
