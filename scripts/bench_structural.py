"""Benchmark the structural passes (prune, lowrank, cluster) on MiniLM: size, transport size, fidelity, latency.

Each configuration runs ``onnxcompress.api.compress`` (fold first, then the pass, validation on the
held-out ``minilm.inputs.npz``, calibration from ``minilm.calibration.npz`` unless the row says none)
in its own process, so wall time and peak RSS are the tool's own. Latency is candidate/original,
1 intra-op thread, ABBA-paired medians in one process (``scripts/bench.py``'s method); transport sizes
are the file compressed with zlib (level 9) and zstd (level 10), as a ratio of the fp32 file's raw size.

    python scripts/bench_structural.py [--only NAME ...] [--no-latency] [--out bench-results/bench-structural.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
MINILM = ROOT / "models" / "cache" / "minilm" / "minilm.onnx"

# name -> (technique, params, use calibration)
CONFIGS: dict[str, tuple[str, dict[str, str], bool]] = {
    "prune 50% magnitude": ("prune", {"prune_sparsity": "0.5"}, False),
    "prune 50% SparseGPT": ("prune", {"prune_sparsity": "0.5"}, True),
    "prune 2:4 magnitude": ("prune", {"prune_mode": "2:4"}, False),
    "prune 2:4 SparseGPT": ("prune", {"prune_mode": "2:4"}, True),
    "prune 30% SparseGPT": ("prune", {"prune_sparsity": "0.3"}, True),
    "lowrank energy 0.95 svd": ("lowrank", {"lowrank_energy": "0.95", "lowrank_method": "svd"}, False),
    "lowrank energy 0.95 data-aware": ("lowrank", {"lowrank_energy": "0.95"}, True),
    "lowrank ratio 0.8 svd": ("lowrank", {"lowrank_ratio": "0.8", "lowrank_method": "svd"}, False),
    "lowrank ratio 0.8 data-aware": ("lowrank", {"lowrank_ratio": "0.8"}, True),
    "cluster K=256": ("cluster", {"cluster_k": "256", "cluster_method": "kmeans"}, False),
    "cluster K=16 per tensor": ("cluster", {"cluster_k": "16", "cluster_method": "kmeans"}, False),
    "cluster K=16 per channel": ("cluster", {"cluster_k": "16", "cluster_per_channel": "true"}, False),
    "cluster K=16 per channel + GPTQ": ("cluster", {"cluster_k": "16", "cluster_per_channel": "true"}, True),
    "cluster K=16 per tensor + GPTQ": ("cluster", {"cluster_k": "16"}, True),
    "cluster K=16 budget 0.19 + GPTQ": ("cluster", {"cluster_k": "16", "cluster_budget": "0.19"}, True),
}


def transport_sizes(path: Path) -> dict[str, int]:
    """Bytes of the model file (plus its external data, if any) compressed with zlib -9 and zstd -10."""
    data = path.read_bytes()
    ext = path.with_name(path.name + ".data")
    if ext.exists():
        data += ext.read_bytes()
    out = {"raw": len(data), "zlib": len(zlib.compress(data, 9))}
    try:
        import zstandard

        out["zstd"] = len(zstandard.ZstdCompressor(level=10, threads=-1).compress(data))
    except ImportError:
        pass
    return out


def register() -> None:
    """Register the structural passes (until the lead adds them to ``recipes.PASSES``)."""
    import onnxcompress.recipes as recipes
    from onnxcompress.passes.structural import (
        ClusterPass,
        LowRankPass,
        PrunePass,
        cluster_config,
        lowrank_config,
        prune_config,
    )

    recipes.PASSES.setdefault("prune", lambda p: PrunePass(prune_config(p)))
    recipes.PASSES.setdefault("lowrank", lambda p: LowRankPass(lowrank_config(p)))
    recipes.PASSES.setdefault("cluster", lambda p: ClusterPass(cluster_config(p)))


def worker(name: str, output: str, result: str) -> None:
    """Compress MiniLM with one configuration; write the figures as JSON to ``result``."""
    from bench import _peak_rss_bytes, fidelity_summary

    from onnxcompress import api

    register()
    technique, params, calib = CONFIGS[name]
    src = MINILM
    if not calib:  # the same model and held-out inputs, without the calibration sidecar
        folder = Path(output).parent / "nocalib"
        folder.mkdir(exist_ok=True)
        for f in (MINILM, MINILM.with_name("minilm.inputs.npz")):
            dst = folder / f.name
            if not dst.exists():
                try:
                    os.link(f, dst)
                except OSError:
                    shutil.copyfile(f, dst)
        src = folder / MINILM.name
    start = time.perf_counter()
    report = api.compress(src, output, [technique], params=params, tolerances=["cosine>=0"], force=True)
    wall = time.perf_counter() - start
    d = report.to_dict()
    stats = next(p for p in d["passes"] if p["name"] == technique)["stats"]
    keep = {k: v for k, v in stats.items() if k not in ("layers",)}
    Path(result).write_text(
        json.dumps(
            {
                "wall_s": wall,
                "peak_rss": _peak_rss_bytes(),
                "size_ratio": d["size_ratio"],
                "fidelity": fidelity_summary(d.get("validation")),
                "stats": keep,
                "calibration": d.get("calibration"),
            },
            default=str,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)", default=None)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bench-structural.json"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from bench import cpu_info, measure_latency

    if not MINILM.exists():
        print(f"{MINILM} is missing (scripts/export_minilm.py)")
        return 1
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical), flags: "
          + ", ".join(f for f, on in cpu["flags"].items() if on))  # fmt: skip
    base = transport_sizes(MINILM)
    feeds = dict(np.load(MINILM.with_name("minilm.inputs.npz")))
    feed = {k: v[:8] for k, v in feeds.items()}
    rows = []
    names = args.only or list(CONFIGS)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / "out.onnx"
            res = Path(tmp) / "res.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, str(out), str(res)],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                rows.append({"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                print(f"{name}: failed: {rows[-1]['error']}")
                continue
            row = {"name": name, **json.loads(res.read_text())}
            t = transport_sizes(out)
            row["transport"] = {k: v / base["raw"] for k, v in t.items()}
            row["transport_fp32"] = {k: v / base["raw"] for k, v in base.items()}
            if not args.no_latency:
                row["latency"] = measure_latency(MINILM, out, feed, runs=7, warmup=2, sample_s=0.2)
            rows.append(row)
            print(f"{name}: done in {row['wall_s']:.1f} s", flush=True)
            for f in (out, res):
                f.unlink(missing_ok=True)
    print()
    print("| config | size | zlib | zstd | cos min | cos mean | latency | params/sparsity | tool s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| fp32 original | 1.000 | {base['zlib'] / base['raw']:.3f} | "
          f"{base.get('zstd', 0) / base['raw']:.3f} | 1 | 1 | 1.00 | | | |")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |||||||||")
            continue
        fid = r.get("fidelity") or {}
        st = r["stats"]
        extra = (
            f"sparsity {st['sparsity']:.3f}"
            if "sparsity" in st
            else f"params {st.get('params_after', 0) / max(st.get('params_before', 1), 1):.3f}"
            if "params_after" in st
            else st.get("method", "")
        )
        if "budget" in st:
            extra += f", {len(st['budget']['upgraded'])} tensors at K={st['budget']['high_k']}"
        lat = r.get("latency", {}).get("ratio")
        print(
            f"| {r['name']} | {r['size_ratio']:.3f} | {r['transport']['zlib']:.3f} | "
            f"{r['transport'].get('zstd', 0):.3f} | {fid.get('cosine_min', float('nan')):.4f} | "
            f"{fid.get('cosine_mean', float('nan')):.4f} | {lat if lat is None else round(lat, 2)} | {extra} | "
            f"{r['wall_s']:.1f} | {r['peak_rss'] / 2**20:.0f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "fp32_transport": base, "rows": rows}, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
