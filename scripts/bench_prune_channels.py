"""Benchmark structured channel pruning (``prune-channels``): accuracy, size, speed, robustness.

Three tables, each printed as markdown and written to ``bench-results/bench-prune-channels.json``:

1. **digits**: ``digits_cnn`` and ``digits_keras`` (``models/``), 30% of the channels pruned with and
   without least-squares reconstruction. Accuracy is measured on the held-out sidecar inputs/labels;
   calibration is ``models/<stem>.calibration.npz`` (drawn from the digits *training* split by
   ``scripts/export_models.py``), never the held-out feeds.
2. **resnet50**: onnx's ``light_resnet50.onnx`` with its ``ConstantOfShape`` weights materialised as
   seeded random initializers (He-normal convolutions, BatchNormalization with unit variance and
   gamma in [0.5, 1.5]), 50% pruning: parameter ratio, worst-sample cosine and onnxruntime latency
   ratio at 1 intra-op thread (median of ``--runs`` after warm-up), measured in the same process.
3. **light**: every model of onnx's ``backend/test/data/light`` folder, materialised the same way and
   pruned at 50%: onnx.checker, onnxruntime run with the original input shapes, output shapes kept,
   fraction of conv channels pruned.

Every compression runs through ``onnxcompress.compress`` (fold first, as the CLI does) in a forked
child so that its wall time and peak RSS are its own. Usage::

    python scripts/bench_prune_channels.py [--only digits,resnet50,light] [--runs 10] [--ratio-light 0.5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

PASS = "prune-channels"
LIGHT = (
    "resnet50",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "bvlc_alexnet",
    "zfnet512",
)


def ensure_registered() -> None:
    """Register the pass for this process if the lead has not added it to ``recipes.PASSES`` yet."""
    from onnxcompress import recipes
    from onnxcompress.passes.structural.channels import PruneChannelsPass, channels_config

    recipes.PASSES.setdefault(PASS, lambda params: PruneChannelsPass(channels_config(params)))


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def materialise(src: Path, dst: Path, seed: int = 0) -> None:
    """Replace every ``ConstantOfShape`` with a constant shape by a seeded random initializer.

    The value depends on what reads it: convolution/Gemm weights He-normal (``std = sqrt(2 / fan_in)``),
    biases ``0.01 * N(0, 1)``, BatchNormalization scale ``U(0.5, 1.5)``, bias ``0.1 * N``, mean ``0``,
    variance ``1``; ``Mul``/``Add`` affine parameters (through an ``Unsqueeze``) ``U(0.5, 1.5)``/``0.1 * N``.
    Initializers and unused inputs are dropped from the graph inputs (IR version raised to 7).
    """
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            users.setdefault(name, []).append((n, i))

    def role(name: str) -> tuple[str, int]:
        for n, i in users.get(name, []):
            if n.op_type == "Unsqueeze":
                return role(n.output[0])
            return n.op_type, i
        return "", -1

    new_nodes, new_inits = [], []
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            new_nodes.append(n)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]))
        op, idx = role(n.output[0])
        trans_b = 0
        for u, _ in users.get(n.output[0], []):
            for a in u.attribute:
                if a.name == "transB":
                    trans_b = a.i
        if op in ("Conv", "ConvTranspose") and idx == 1:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif op == "Gemm" and idx == 1:
            fan_in = shape[1] if trans_b else shape[0]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif op == "BatchNormalization":
            value = {
                1: rng.uniform(0.5, 1.5, shape),
                2: 0.1 * rng.standard_normal(shape),
                3: np.zeros(shape),
                4: np.ones(shape),
            }.get(idx, np.ones(shape))
        elif op == "Mul":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = 0.01 * rng.standard_normal(shape)
        new_inits.append(numpy_helper.from_array(value.astype(np.float32), n.output[0]))
    used = {i for n in new_nodes for i in n.input}
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep_inits + new_inits)
    init_names = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names and i.name in used]
    del g.input[:]
    g.input.extend(inputs)
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def n_params(path: Path) -> int:
    model = onnx.load(str(path))
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in (1, 10, 11, 16))
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (1, 10, 11, 16):
                    total += int(np.prod(a.t.dims))
    return total


def conv_channels(path: Path) -> int:
    model = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in shapes:
            total += shapes[n.input[1]][0]
    return total


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def random_feed(sess: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def latency_ms(path: Path, feed: dict[str, np.ndarray], runs: int) -> float:
    sess = session(path)
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30
    return float((num / den).min())


def _child(conn: Any, src: str, out: str, params: dict[str, str]) -> None:
    try:
        ensure_registered()
        import onnxcompress

        t = time.perf_counter()
        report = onnxcompress.compress(src, out, [PASS], params=params, validate=False, force=True)
        seconds = time.perf_counter() - t
        stats = next(p.stats for p in report.passes if p.name == PASS)
        skipped = next(len(p.skipped) for p in report.passes if p.name == PASS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats = {k: v for k, v in stats.items() if k != "layers"}
        conn.send({"ok": True, "seconds": seconds, "peak_rss": peak, "stats": stats, "skipped": skipped})
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    finally:
        conn.close()


def compress(src: Path, out: Path, params: dict[str, str]) -> dict[str, Any]:
    """Run the pass through ``onnxcompress.compress`` in a forked child; wall time and peak RSS."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, str(src), str(out), params))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    if not result["ok"]:
        raise RuntimeError(result["error"])
    return result


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    sess = session(path, threads=1)
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((out.argmax(1) == y).mean()), out


def bench_digits(tmp: Path, ratio: float) -> list[dict[str, Any]]:
    rows = []
    for stem in ("digits_cnn", "digits_keras"):
        src = REPO / "models" / f"{stem}.onnx"
        x = np.load(REPO / "models" / f"{stem}.inputs.npz")["input"]
        y = np.load(REPO / "models" / f"{stem}.labels.npy")
        base_acc, base_out = accuracy(src, x, y)
        for rec in ("off", "on"):
            for imp in ("l1", "activation"):
                out = tmp / f"{stem}-{rec}-{imp}.onnx"
                params = {
                    "prune_channels_ratio": str(ratio),
                    "prune_channels_reconstruct": rec,
                    "prune_channels_importance": imp,
                }
                r = compress(src, out, params)
                acc, outs = accuracy(out, x, y)
                rows.append(
                    {
                        "model": stem,
                        "ratio": ratio,
                        "importance": imp,
                        "reconstruct": rec,
                        "accuracy_fp32": base_acc,
                        "accuracy": acc,
                        "drop_points": round(100 * (base_acc - acc), 2),
                        "cosine_worst": cosine(base_out, outs),
                        "params_ratio": n_params(out) / n_params(src),
                        "size_ratio": out.stat().st_size / src.stat().st_size,
                        "channels_pruned": f"{r['stats']['channels_pruned']}/{r['stats']['channels_before']}",
                        "seconds": r["seconds"],
                        "peak_rss_mb": r["peak_rss"] / 2**20,
                    }
                )
    return rows


def bench_light(tmp: Path, names: tuple[str, ...], ratio: float, runs: int, timing: bool) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        src = tmp / f"{name}.onnx"
        materialise(light_dir() / f"light_{name}.onnx", src)
        out = tmp / f"{name}-pruned.onnx"
        row: dict[str, Any] = {"model": name, "ratio": ratio}
        try:
            r = compress(src, out, {"prune_channels_ratio": str(ratio), "prune_channels_reconstruct": "off"})
        except RuntimeError as exc:
            row.update(ok=False, error=str(exc))
            rows.append(row)
            continue
        checker = "ok"
        try:
            onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        except Exception as exc:  # report any checker failure
            checker = f"FAIL {str(exc).splitlines()[0][:120]}"
        a, b = session(src), session(out)
        feed = random_feed(a)
        ya, yb = a.run(None, feed), b.run(None, feed)
        shapes_kept = [x.shape for x in ya] == [x.shape for x in yb] and [i.shape for i in a.get_inputs()] == [
            i.shape for i in b.get_inputs()
        ]
        before, after = conv_channels(src), conv_channels(out)
        row.update(
            ok=checker == "ok" and shapes_kept,
            checker=checker,
            shapes_kept=shapes_kept,
            conv_channels_before=before,
            conv_channels_after=after,
            conv_channels_pruned_frac=1 - after / before if before else 0.0,
            params_ratio=n_params(out) / n_params(src),
            cosine_worst=cosine(ya[0], yb[0]),
            seconds=r["seconds"],
            peak_rss_mb=r["peak_rss"] / 2**20,
            groups=r["stats"].get("groups"),
            skipped=r["skipped"],
        )
        if timing:
            t0 = latency_ms(src, feed, runs)
            t1 = latency_ms(out, feed, runs)
            row.update(latency_ms_fp32=t0, latency_ms_pruned=t1, latency_ratio=t1 / t0)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="digits,resnet50,light", help="comma list of sections")
    ap.add_argument("--ratio-digits", type=float, default=0.3)
    ap.add_argument("--ratio-light", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per latency (median)")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "bench-prune-channels.json"))
    args = ap.parse_args(argv)
    sections = set(args.only.split(","))
    try:
        from bench import cpu_info

        cpu = cpu_info()
        print(
            f"CPU: {cpu['model']} ({cpu['logical_cores']} logical)  "
            + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
        )
    except Exception:  # the helper is optional
        cpu = {}
    result: dict[str, Any] = {"cpu": cpu}
    with tempfile.TemporaryDirectory(prefix="bench-prune-channels-") as d:
        tmp = Path(d)
        if "digits" in sections:
            rows = bench_digits(tmp, args.ratio_digits)
            result["digits"] = rows
            print(f"\n## digits: {args.ratio_digits:.0%} of channels, held-out accuracy\n")
            print(table(rows, ["model", "importance", "reconstruct", "accuracy_fp32", "accuracy", "drop_points",
                               "cosine_worst", "params_ratio", "size_ratio", "channels_pruned", "seconds",
                               "peak_rss_mb"]))  # fmt: skip
        if "resnet50" in sections:
            rows = bench_light(tmp, ("resnet50",), args.ratio_light, args.runs, timing=True)
            result["resnet50"] = rows
            print(f"\n## ResNet-50 (light, seeded random weights): {args.ratio_light:.0%} pruning, 1 thread\n")
            print(table(rows, ["model", "ok", "params_ratio", "conv_channels_pruned_frac", "cosine_worst",
                               "latency_ms_fp32", "latency_ms_pruned", "latency_ratio", "seconds", "peak_rss_mb"]))  # fmt: skip
        if "light" in sections:
            names = tuple(n for n in LIGHT if not ("resnet50" in sections and n == "resnet50" and "resnet50" in result))
            rows = bench_light(tmp, names, args.ratio_light, args.runs, timing=False)
            result["light"] = rows
            print(f"\n## light models: {args.ratio_light:.0%} pruning, structural robustness\n")
            print(table(rows, ["model", "ok", "checker", "shapes_kept", "conv_channels_before",
                               "conv_channels_after", "conv_channels_pruned_frac", "params_ratio", "groups",
                               "skipped", "seconds", "peak_rss_mb", "error"]))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
