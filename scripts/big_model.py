"""Build a model over 2 GB and measure its int8 round trip with bounded memory.

``build_big_model`` writes a chain of ``MatMul`` layers ``x[?, dim] @ W_i[dim, dim]`` with ``Relu``
between them. The weights are seeded float32 (He-scaled, so activations stay finite through the
chain), generated and **streamed into one external-data file a tensor at a time**: the ModelProto's
initializers only carry ``location/offset/length`` entries, so the ``.onnx`` file stays a few KB
and at most one weight is ever in memory.

``measure_roundtrip`` runs, in a fresh subprocess, ``onnxcompress.load`` ->
``Pipeline([Int8WeightsPass()]).run`` -> ``onnxcompress.save(..., external=None)`` and reports its
wall time and peak RSS (``VmHWM``), then, in a second subprocess, checks the output: it parses
without its data, passes ``onnx.checker.check_model(path)``, and its onnxruntime output on one
small input matches the original's (cosine).

Usage::

    python scripts/big_model.py --out DIR [--gb 2.3] [--measure] [--json FILE] [--keep]

The benchmark (``scripts/bench.py``) imports ``build_big_model`` and ``measure_roundtrip``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h

DEFAULT_DIM = 4096
ALIGN = 4096  # byte alignment of each tensor in the data file
RSS_RATIO_TARGET = 1.6
MODEL_NAME = "big.onnx"
OUTPUT_NAME = "big.int8.onnx"
INPUT_ROWS = 2


# --------------------------------------------------------------------------- building


def build_big_model(
    folder: str | os.PathLike[str],
    total_bytes: float = 2.3e9,
    seed: int = 0,
    *,
    dim: int = DEFAULT_DIM,
    name: str = MODEL_NAME,
) -> Path:
    """Write a MatMul/Relu chain with at least ``total_bytes`` of float32 weights, external data.

    Each weight ``W_i`` is ``[dim, dim]`` float32 (64 MiB for ``dim=4096``), drawn from
    ``N(0, 2/dim)`` with ``numpy.random.default_rng(seed)``, and written straight to
    ``<name>.data`` (aligned to 4 KiB) before the next one is drawn.

    Returns:
        The path of the ``.onnx`` file (its data file lies beside it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layer_bytes = dim * dim * 4
    layers = max(1, math.ceil(float(total_bytes) / layer_bytes))
    path = folder / name
    data_name = name + ".data"
    rng = np.random.default_rng(seed)
    std = np.float32(math.sqrt(2.0 / dim))

    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    current = "x"
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((dim, dim), dtype=np.float32)
            w *= std
            pad = (-offset) % ALIGN
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(memoryview(np.ascontiguousarray(w, dtype="<f4")).cast("B"))
            del w
            t = TensorProto()
            t.name = f"W{i}"
            t.data_type = TensorProto.FLOAT
            t.dims.extend([dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", layer_bytes)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(t)
            offset += layer_bytes
            mm = f"mm{i}"
            nodes.append(h.make_node("MatMul", [current, t.name], [mm], name=f"matmul{i}"))
            if i < layers - 1:
                nodes.append(h.make_node("Relu", [mm], [f"relu{i}"], name=f"relu{i}"))
                current = f"relu{i}"
            else:
                nodes.append(h.make_node("Identity", [mm], ["y"], name="output"))
        f.flush()
        os.fsync(f.fileno())

    graph = h.make_graph(
        nodes,
        "big_matmul_chain",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="big_model.py")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of ``path`` plus the external-data files it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files = {
        e.value
        for t in proto.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


# --------------------------------------------------------------------------- child processes


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in out:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = r if sys.platform == "darwin" else r * 1024
        out.setdefault("VmRSS", out["VmHWM"])
    return out


def _child_roundtrip(model_path: str, out_path: str, external: str = "auto") -> dict[str, Any]:
    """load -> int8 weights -> save (auto external data), with RSS after each phase."""
    base = _proc_status()
    import onnxcompress as oc
    from onnxcompress.passes.quantize import Int8WeightsPass

    phases: dict[str, Any] = {"start": base, "imported": _proc_status()}
    t0 = time.perf_counter()
    model = oc.load(model_path)
    t1 = time.perf_counter()
    phases["loaded"] = _proc_status()
    reports = oc.Pipeline([Int8WeightsPass()]).run(model)
    t2 = time.perf_counter()
    phases["quantized"] = _proc_status()
    oc.save(model, out_path, external={"auto": None, "true": True, "false": False}[external])
    t3 = time.perf_counter()
    phases["saved"] = _proc_status()
    del model
    return {
        "load_s": t1 - t0,
        "quantize_s": t2 - t1,
        "save_s": t3 - t2,
        "roundtrip_s": t3 - t0,
        "tensors_changed": reports[0].stats.get("tensors_changed"),
        "baseline_rss": phases["imported"]["VmRSS"],
        "peak_rss": phases["saved"]["VmHWM"],
        "phases": phases,
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def check_output(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str], seed: int = 1) -> dict[str, Any]:
    """Check a round-tripped model against its original (in this process).

    The output must parse without its data, pass ``onnx.checker.check_model`` by path, and give the
    original's onnxruntime output on one ``[2, dim]`` input (cosine, max abs diff reported).
    """
    import onnxruntime as ort

    out_path = Path(out_path)
    proto = onnx.load(str(out_path), load_external_data=False)
    external = sorted(
        {
            e.value
            for t in proto.graph.initializer
            if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data
            if e.key == "location"
        }
    )
    dim = int(proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    del proto
    t0 = time.perf_counter()
    onnx.checker.check_model(str(out_path))
    checker_s = time.perf_counter() - t0

    x = np.random.default_rng(seed).standard_normal((INPUT_ROWS, dim)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    outputs = []
    ort_s = []
    for p in (model_path, out_path):
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        outputs.append(sess.run(None, {"x": x})[0])
        ort_s.append(time.perf_counter() - t0)
        del sess
    ref, got = outputs
    return {
        "external_files": external,
        "ops": ops,
        "checker_ok": True,
        "checker_s": checker_s,
        "cosine": cosine(ref, got),
        "max_abs_diff": float(np.max(np.abs(ref.astype(np.float64) - got))),
        "ref_finite": bool(np.all(np.isfinite(ref))),
        "ort_original_s": ort_s[0],
        "ort_output_s": ort_s[1],
        "verify_peak_rss": _proc_status()["VmHWM"],
    }


def _run_child(args: list[str], timeout: float | None) -> tuple[dict[str, Any], float, int]:
    """Run this file with ``args`` in a fresh interpreter; return its JSON, wall time, ru_maxrss."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{args[0]} subprocess printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return json.loads(lines[-1]), wall, children_maxrss


# --------------------------------------------------------------------------- measuring


def measure_roundtrip(
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    verify: bool = True,
    external: bool | None = None,
    timeout: float | None = 3600,
) -> dict[str, Any]:
    """Measure load -> int8 weights -> save of ``model_path`` in a fresh subprocess.

    The output goes to ``out_dir/<stem>.int8.onnx`` (replacing an earlier one). With ``verify``, a
    second subprocess (so it cannot inflate the measured peak) checks the output against the
    original (see :func:`check_output`). ``external`` is passed to ``onnxcompress.save`` (``None``:
    automatic, by size).

    Returns:
        A JSON-able dict: ``fp32_bytes``, ``output_bytes``, ``size_ratio``, ``peak_rss`` (VmHWM of
        the round-trip process, bytes), ``rss_ratio`` (peak_rss / fp32_bytes), ``wall_s`` (the
        subprocess, interpreter start included), ``roundtrip_s`` and per-phase times, the output
        files, and with ``verify`` the check results (``cosine``, ``checker_ok``, ...).
    """
    model_path = Path(model_path).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = (out_dir / (model_path.stem + ".int8.onnx")).resolve()
    for p in (out_path, out_path.with_name(out_path.name + ".data")):
        p.unlink(missing_ok=True)
    fp32 = model_bytes(model_path)

    child, wall, children_maxrss = _run_child(
        ["_roundtrip", str(model_path), str(out_path), {None: "auto", True: "true", False: "false"}[external]], timeout
    )
    data_path = out_path.with_name(out_path.name + ".data")
    result: dict[str, Any] = {
        "model": str(model_path),
        "output": str(out_path),
        "output_data": str(data_path) if data_path.exists() else None,
        "fp32_bytes": fp32,
        "output_bytes": model_bytes(out_path),
        "onnx_file_bytes": out_path.stat().st_size,
        "wall_s": wall,
        **{k: child[k] for k in ("load_s", "quantize_s", "save_s", "roundtrip_s", "tensors_changed")},
        "baseline_rss": child["baseline_rss"],
        "peak_rss": child["peak_rss"],
        "children_maxrss": children_maxrss,
        "phases": child["phases"],
    }
    result["size_ratio"] = result["output_bytes"] / fp32
    result["rss_ratio"] = result["peak_rss"] / fp32
    result["rss_ratio_target"] = RSS_RATIO_TARGET
    if verify:
        check, verify_wall, _ = _run_child(["_verify", str(model_path), str(out_path)], timeout)
        result.update(check)
        result["verify_wall_s"] = verify_wall
    return result


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def format_table(r: dict[str, Any]) -> str:
    """A short human-readable table of a :func:`measure_roundtrip` result."""
    rows = [
        ("fp32 model (onnx + data)", _gb(r["fp32_bytes"])),
        ("int8 output (onnx + data)", f"{_gb(r['output_bytes'])}  ({r['size_ratio']:.4f}x)"),
        ("output external data", r["output_data"] or "NONE"),
        ("output .onnx file", f"{r['onnx_file_bytes'] / 1e3:.1f} KB"),
        ("round trip wall (subprocess)", f"{r['wall_s']:.1f} s"),
        ("  load / quantize / save", f"{r['load_s']:.1f} / {r['quantize_s']:.1f} / {r['save_s']:.1f} s"),
        ("baseline RSS (after imports)", _gb(r["baseline_rss"])),
        ("peak RSS (VmHWM)", _gb(r["peak_rss"])),
        (
            "peak RSS / fp32 size",
            f"{r['rss_ratio']:.3f}  (target <= {r['rss_ratio_target']}: "
            f"{'OK' if r['rss_ratio'] <= r['rss_ratio_target'] else 'OVER'})",
        ),
    ]
    for phase in ("loaded", "quantized", "saved"):
        p = r["phases"][phase]
        rows.append((f"  RSS after {phase} (cur / peak)", f"{_gb(p['VmRSS'])} / {_gb(p['VmHWM'])}"))
    if "cosine" in r:
        rows += [
            ("checker.check_model(path)", "OK" if r["checker_ok"] else "FAILED"),
            ("ORT cosine vs original", f"{r['cosine']:.6f}  (max |diff| {r['max_abs_diff']:.3g})"),
            ("ORT original / output", f"{r['ort_original_s']:.1f} / {r['ort_output_s']:.1f} s"),
            ("verify wall / peak RSS", f"{r['verify_wall_s']:.1f} s / {_gb(r['verify_peak_rss'])}"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_roundtrip", "_verify"):  # child processes of measure_roundtrip
        fn = _child_roundtrip if argv[0] == "_roundtrip" else check_output
        print(json.dumps(fn(*argv[1:])), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the model (and the int8 output)")
    ap.add_argument("--gb", type=float, default=2.3, help="float32 weight bytes, in GB (1e9), default 2.3")
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM, help="layer width (weights are dim x dim)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="measure the int8 round trip and check the output")
    ap.add_argument("--no-verify", action="store_true", help="with --measure: skip the onnxruntime check")
    ap.add_argument("--json", type=Path, help="write the measurements to this JSON file")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    path = build_big_model(args.out, total_bytes=args.gb * 1e9, seed=args.seed, dim=args.dim)
    build_s = time.perf_counter() - t0
    size = model_bytes(path)
    print(f"built {path} ({_gb(size)}, .onnx {path.stat().st_size / 1e3:.1f} KB) in {build_s:.1f} s", flush=True)
    result: dict[str, Any] = {"model": str(path), "fp32_bytes": size, "build_s": build_s}
    if args.measure:
        result.update(measure_roundtrip(path, args.out, verify=not args.no_verify))
        result["build_s"] = build_s
        print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = not args.measure or (
        result["rss_ratio"] <= RSS_RATIO_TARGET and result.get("cosine", 1.0) >= 0.99 and result["output_data"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
