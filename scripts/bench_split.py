"""Benchmark ``onnxcompress split`` and the split runner.

Three cases, each printed as a markdown table and written to ``bench-results/split.json``:

1. **MiniLM, 4 parts** (``models/cache/minilm/minilm.onnx``; skipped when absent): where the cuts
   fall, the tensors crossing each, part sizes, and the runner's max |diff| against onnxruntime on the
   sidecar inputs (53 sentences).
2. **A generated 2.4 GB MLP** (external data, ``scripts/big_model.py``'s generator) split with
   ``--max-part-size 300MB``: every part's weight bytes, and in *separate subprocesses* the peak RSS
   (``VmHWM``) and time of (a) the unsplit model in onnxruntime, (b) the runner with ``resident=1``,
   (c) the split itself; outputs compared (max |diff|).
3. **A ResNet-18-style CNN** split with ``--parts 3 --balance flops``: FLOPs per part, largest/mean.

Timings use one intra-op thread. Usage::

    python scripts/bench_split.py [--work DIR] [--gb 2.4] [--skip-big] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MINILM = ROOT / "models" / "cache" / "minilm" / "minilm.onnx"
RSS_TARGET = 0.35
FLOPS_TARGET = 1.2


# --------------------------------------------------------------------------- child processes


def _hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_unsplit(model: str, x_path: str, out_path: str) -> dict[str, Any]:
    import onnxruntime as ort

    x = np.load(x_path)
    base = _hwm()
    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    y = sess.run(None, {"x": x})[0]
    t2 = time.perf_counter()
    np.save(out_path, y)
    return {"load_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0, "peak_rss": _hwm(), "baseline_rss": base}


def _child_runner(splitdir: str, x_path: str, out_path: str) -> dict[str, Any]:
    from onnxcompress.runner import SplitModel

    x = np.load(x_path)
    base = _hwm()
    t0 = time.perf_counter()
    model = SplitModel(splitdir, resident=1, threads=1)
    y = model.run({"x": x})["y"]
    t1 = time.perf_counter()
    np.save(out_path, y)
    return {"total_s": t1 - t0, "loads": model.loads, "peak_rss": _hwm(), "baseline_rss": base}


def _child_split(model: str, outdir: str, size: str) -> dict[str, Any]:
    from onnxcompress.split import split_model

    t0 = time.perf_counter()
    r = split_model(model, outdir, max_part_size=size, force=True)
    return {"split_s": time.perf_counter() - t0, "peak_rss": _hwm(), "parts": len(r.manifest["parts"])}


CHILDREN = {"_unsplit": _child_unsplit, "_runner": _child_runner, "_split": _child_split}


def _run_child(*args: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- models


def resnet18_model(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """ResNet-18-style: 7x7/2 stem, max pool, 4 stages x 2 basic blocks (64..512 channels), pool, Gemm."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        i = count[0] = count[0] + 1
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.extend([nh.from_array(w, f"conv{i}.w"), nh.from_array(np.zeros(cout, np.float32), f"conv{i}.b")])
        nodes.append(
            h.make_node(
                "Conv",
                [x, f"conv{i}.w", f"conv{i}.b"],
                [f"c{i}"],
                name=f"conv{i}",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        if not relu:
            return f"c{i}"
        nodes.append(h.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        return f"r{i}"

    x = conv("x", 3, 64, 7, 2)
    nodes.append(
        h.make_node("MaxPool", [x], ["pool0"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    x, cin = "pool0", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stride = 2 if stage > 0 and b == 0 else 1
            y = conv(conv(x, cin, cout, 3, stride), cout, cout, 3, 1, relu=False)
            skip = conv(x, cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else x
            name = f"s{stage}b{b}"
            nodes += [
                h.make_node("Add", [y, skip], [name + "_add"], name=name + "_add"),
                h.make_node("Relu", [name + "_add"], [name], name=name + "_relu"),
            ]
            x, cin = name, cout
    nodes.append(h.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(h.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits.append(nh.from_array((rng.standard_normal((cin, 1000)) * 0.01).astype(np.float32), "fc.w"))
    nodes.append(h.make_node("Gemm", ["flat", "fc.w"], ["logits"], name="fc"))
    g = h.make_graph(
        nodes,
        "resnet18_style",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, size, size])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["N", 1000])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# --------------------------------------------------------------------------- cases


def _ort_outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def bench_minilm(work: Path) -> dict[str, Any] | None:
    from onnxcompress.runner import SplitModel
    from onnxcompress.split import split_model

    if not MINILM.exists():
        return None
    out = work / "minilm.split"
    t0 = time.perf_counter()
    r = split_model(MINILM, out, parts=4, force=True)
    split_s = time.perf_counter() - t0
    with np.load(MINILM.with_name("minilm.inputs.npz")) as data:
        feed = {k: data[k] for k in data.files}
    ref = _ort_outputs(MINILM, feed)[0]
    t0 = time.perf_counter()
    got = SplitModel(out, threads=1).run(feed)["sentence_embedding"]
    run_s = time.perf_counter() - t0
    m = r.manifest
    return {
        "split_s": split_s,
        "runner_s": run_s,
        "max_abs": float(np.max(np.abs(got.astype(np.float64) - ref))),
        "parts": [{k: p[k] for k in ("file", "weight_bytes", "nodes", "first_node", "last_node")} for p in m["parts"]],
        "cuts": [
            {
                "after": c["after_node"],
                "before": c["before_node"],
                "tensors": [f"{t['name']}{t['shape']}" for t in c["tensors"]],
            }
            for c in m["cuts"]
        ],
    }


def bench_big(work: Path, gb: float, size: str) -> dict[str, Any]:
    from big_model import build_big_model, model_bytes

    folder = work / "big"
    t0 = time.perf_counter()
    path = build_big_model(folder, total_bytes=gb * 1e9, name="mlp.onnx")
    build_s = time.perf_counter() - t0
    fp32 = model_bytes(path)
    outdir = work / "big.split"
    split = _run_child("_split", str(path), str(outdir), size)
    manifest = json.loads((outdir / "manifest.json").read_text())
    x = np.random.default_rng(1).standard_normal((2, 4096)).astype(np.float32)
    x_path = work / "x.npy"
    np.save(x_path, x)
    unsplit = _run_child("_unsplit", str(path), str(x_path), str(work / "y_ref.npy"))
    runner = _run_child("_runner", str(outdir), str(x_path), str(work / "y_split.npy"))
    ref, got = np.load(work / "y_ref.npy"), np.load(work / "y_split.npy")
    return {
        "model_bytes": fp32,
        "build_s": build_s,
        "max_part_size": size,
        "parts": len(manifest["parts"]),
        "part_weight_bytes": [p["weight_bytes"] for p in manifest["parts"]],
        "split": split,
        "unsplit": unsplit,
        "runner": runner,
        "rss_ratio": runner["peak_rss"] / unsplit["peak_rss"],
        "max_abs": float(np.max(np.abs(got.astype(np.float64) - ref))),
        "ref_scale": float(np.max(np.abs(ref))),
    }


def bench_resnet(work: Path) -> dict[str, Any]:
    from onnxcompress.runner import SplitModel
    from onnxcompress.split import split_model

    path = work / "resnet18.onnx"
    onnx.save(resnet18_model(), str(path))
    t0 = time.perf_counter()
    m = split_model(path, work / "resnet.split", parts=3, balance="flops", force=True, shapes={"x": [1, 3, 224, 224]})
    split_s = time.perf_counter() - t0
    flops = [p["flops"] for p in m.manifest["parts"]]
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = _ort_outputs(path, {"x": x})[0]
    got = SplitModel(work / "resnet.split", threads=1).run({"x": x})["logits"]
    return {
        "split_s": split_s,
        "flops": flops,
        "largest_over_mean": max(flops) / float(np.mean(flops)),
        "weight_bytes": [p["weight_bytes"] for p in m.manifest["parts"]],
        "cuts": [[t["name"] for t in c["tensors"]] for c in m.manifest["cuts"]],
        "max_abs": float(np.max(np.abs(got.astype(np.float64) - ref))),
    }


def cpu_flags() -> dict[str, Any]:
    try:
        from bench import cpu_info

        return cpu_info()
    except Exception:  # bench.py's helper is optional here
        return {"model": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        print(json.dumps(CHILDREN[argv[0]](*argv[1:])), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--gb", type=float, default=2.4, help="weights of the generated MLP, in GB (1e9)")
    ap.add_argument("--max-part-size", default="300MB")
    ap.add_argument("--skip-big", action="store_true", help="skip the generated MLP (needs ~5 GB of disk)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "split.json")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_split-"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_flags()
    print(f"CPU: {cpu.get('model')} ({cpu.get('cores', os.cpu_count())} cores) flags: {cpu.get('flags', {})}")
    results: dict[str, Any] = {"cpu": cpu}
    ok = True
    try:
        mini = bench_minilm(work)
        results["minilm"] = mini
        if mini:
            print("\n### MiniLM split into 4 parts\n")
            print("| part | weights | nodes | first .. last node |\n|---|---|---|---|")
            for i, p in enumerate(mini["parts"], 1):
                print(f"| {i} | {_mb(p['weight_bytes'])} | {p['nodes']} | {p['first_node']} .. {p['last_node']} |")
            print("\n| cut | after -> before | tensors crossing |\n|---|---|---|")
            for i, c in enumerate(mini["cuts"], 1):
                print(f"| {i} | {c['after']} -> {c['before']} | {', '.join(c['tensors'])} |")
            print(
                f"\nrunner vs onnxruntime on 53 sentences: max_abs {mini['max_abs']:.3g} (target <= 1e-5); "
                f"split {mini['split_s']:.1f}s, runner {mini['runner_s']:.2f}s"
            )
            ok &= mini["max_abs"] <= 1e-5
        res = bench_resnet(work)
        results["resnet_flops"] = res
        print("\n### ResNet-18-style CNN, --parts 3 --balance flops\n")
        print("| part | GFLOPs | weights |\n|---|---|---|")
        for i, (f, w) in enumerate(zip(res["flops"], res["weight_bytes"]), 1):
            print(f"| {i} | {f / 1e9:.3f} | {_mb(w)} |")
        print(
            f"\nlargest/mean FLOPs {res['largest_over_mean']:.3f} (target <= {FLOPS_TARGET}); cuts cross "
            f"{res['cuts']}; max_abs {res['max_abs']:.3g}"
        )
        ok &= res["largest_over_mean"] <= FLOPS_TARGET
        if not args.skip_big:
            big = bench_big(work, args.gb, args.max_part_size)
            results["big_mlp"] = big
            print(
                f"\n### Generated {big['model_bytes'] / 1e9:.2f} GB MLP (external data), "
                f"--max-part-size {big['max_part_size']}\n"
            )
            print(f"{big['parts']} parts, weights per part: largest {_mb(max(big['part_weight_bytes']))}\n")
            print("| run (own subprocess) | peak RSS | time |\n|---|---|---|")
            u, r, s = big["unsplit"], big["runner"], big["split"]
            print(
                f"| onnxruntime, unsplit | {_mb(u['peak_rss'])} | load {u['load_s']:.1f}s + run {u['run_s']:.2f}s "
                f"(wall {u['wall_s']:.1f}s) |"
            )
            print(
                f"| SplitModel resident=1 | {_mb(r['peak_rss'])} | {r['total_s']:.1f}s, {r['loads']} loads "
                f"(wall {r['wall_s']:.1f}s) |"
            )
            print(
                f"| split (planning + writing) | {_mb(s['peak_rss'])} | {s['split_s']:.1f}s (wall {s['wall_s']:.1f}s) |"
            )
            budget = big["part_weight_bytes"]
            from onnxcompress.io import parse_size

            fits = max(budget) <= parse_size(big["max_part_size"])
            print(
                f"\nrunner/unsplit peak RSS {big['rss_ratio']:.3f} (target <= {RSS_TARGET}); every part within "
                f"budget: {fits}; max_abs {big['max_abs']:.3g} (output scale {big['ref_scale']:.3g})"
            )
            ok &= big["rss_ratio"] <= RSS_TARGET and fits and big["max_abs"] <= 1e-5
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
