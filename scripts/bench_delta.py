"""Delta updates between model releases: ``compress v2 --base v1c`` vs independent compression.

For each model with versions in ``models/cache/versions/`` (``scripts/make_versions.py``):

1. ``v1c`` = ``compress v1 -q int8-weights``; ``v2c`` = ``compress v2 -q int8-weights`` (independent);
   ``v2cb`` = the same with ``Int8WeightsConfig(base=v1c)`` (the released ``v1c`` as base; delta step
   chosen per tensor unless ``--step``, see ``onnxcompress/passes/quantize/rebase.py``).
2. Patch bytes: ``onnxcompress diff v1c v2cb`` (ours) vs ``zstd -19 --long=31 --patch-from=v1c v2c`` (the
   anchor: zstd's own delta between independently compressed files; the zstd CLI, or python
   ``zstandard`` with v1c as a raw-content dictionary if the CLI is absent), plus ``diff v1c v2c``.
3. Full download: the packed size of ``v2cb`` and ``v2c`` (``onnxcompress pack``), and the file sizes.
4. Fidelity of v2 against its own fp32 on ``v2.inputs.npz``: worst-sample cosine, relative output error
   ``||y - y_fp32|| / ||y_fp32||`` (and accuracy with labels), with base vs independent; v1 fp32 against
   v2 fp32 for scale (what shipping nothing would give).

Usage::

    python scripts/bench_delta.py [--models digits_cnn minilm] [--slack 0.06] [--step 0] [--budget 0.25]
        [--json bench-results/delta.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
import onnxruntime as ort
import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxcompress import api, recipes  # noqa: E402
from onnxcompress.errors import ValidationFailed  # noqa: E402
from onnxcompress.passes.quantize import Int8WeightsConfig, Int8WeightsPass, rebase, weights  # noqa: E402
from onnxcompress.passes.quantize.rebase import BUDGET, SLACK, STEP  # noqa: E402
from onnxcompress.transport import diff, packed_size  # noqa: E402

VERSIONS = REPO / "models" / "cache" / "versions"
MODE = "int8-weights"


def _cpu_info() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module.cpu_info()


def _zstd_patch(old: Path, new: Path, tmp: Path) -> tuple[int, str]:
    """Bytes of zstd's delta of ``new`` against ``old`` (level 19, long window)."""
    out = tmp / (new.name + ".zst")
    if shutil.which("zstd"):
        subprocess.run(
            ["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={old}", str(new), "-o", str(out)], check=True
        )
        return out.stat().st_size, "zstd CLI -19 --long=31 --patch-from"
    dict_ = zstandard.ZstdCompressionDict(old.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27, enable_ldm=True)
    data = zstandard.ZstdCompressor(dict_data=dict_, compression_params=params).compress(new.read_bytes())
    return len(data), "python zstandard -19 raw-content dict (prefix)"


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n] for n in names})[0]


def _worst_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def _relerr(ref: np.ndarray, out: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(out.astype(np.float64) - ref64) / np.linalg.norm(ref64))


def _compress(
    src: Path, out: Path, base: Path | None, slack: float, step: int = STEP, budget: float = BUDGET
) -> dict[str, Any]:
    saved = recipes.PASSES[MODE]
    saved_requantize = weights.requantize
    if base is not None:
        fields = {f.name for f in dataclasses.fields(Int8WeightsConfig)}
        extra: dict[str, Any] = {"base_step": step, "base_budget": budget} if "base_step" in fields else {}
        recipes.PASSES[MODE] = lambda params: Int8WeightsPass(
            Int8WeightsConfig(granularity="block", base=str(base), base_slack=slack, **extra)
        )
        if not extra:  # step/budget not (yet) Int8WeightsConfig fields: bind them for this run
            weights.requantize = functools.partial(rebase.requantize, step=step, budget=budget)
    try:
        t0 = time.perf_counter()
        try:
            report = api.compress(src, out, [MODE], force=True)
        except ValidationFailed as exc:  # written anyway (force); reported as failed
            report = exc.report
        seconds = time.perf_counter() - t0
    finally:
        recipes.PASSES[MODE] = saved
        weights.requantize = saved_requantize
    stats = next((p.stats for p in report.passes if p.name == MODE), {}) if hasattr(report, "passes") else {}
    passed = bool(getattr(report, "passed", False))
    return {"seconds": seconds, "validation_passed": passed, "base_stats": stats.get("base")}


def bench_model(stem: str, slack: float, tmp: Path, step: int = STEP, budget: float = BUDGET) -> dict[str, Any] | None:
    v1, v2 = VERSIONS / f"{stem}.v1.onnx", VERSIONS / f"{stem}.v2.onnx"
    if not (v1.exists() and v2.exists()):
        print(f"skip {stem}: {v1} / {v2} missing (run scripts/make_versions.py)")
        return None
    v1c, v2c, v2cb = tmp / f"{stem}.v1c.onnx", tmp / f"{stem}.v2c.onnx", tmp / f"{stem}.v2cb.onnx"
    _compress(v1, v1c, None, slack)
    indep = _compress(v2, v2c, None, slack)
    based = _compress(v2, v2cb, v1c, slack, step, budget)
    t0 = time.perf_counter()
    ours = diff(v1c, v2cb, tmp / f"{stem}.base.ocpd", force=True)["package_bytes"]
    diff_seconds = time.perf_counter() - t0
    ours_indep = diff(v1c, v2c, tmp / f"{stem}.indep.ocpd", force=True)["package_bytes"]
    zstd_bytes, zstd_how = _zstd_patch(v1c, v2c, tmp)
    feeds = dict(np.load(VERSIONS / f"{stem}.v2.inputs.npz"))
    ref = _outputs(v2, feeds)
    out_i, out_b, out_1 = _outputs(v2c, feeds), _outputs(v2cb, feeds), _outputs(v1, feeds)
    row: dict[str, Any] = {
        "model": stem,
        "fp32_bytes": v2.stat().st_size,
        "v2c_bytes": v2c.stat().st_size,
        "v2cb_bytes": v2cb.stat().st_size,
        "v2c_packed": packed_size(v2c),
        "v2cb_packed": packed_size(v2cb),
        "patch_base": ours,
        "patch_indep_ours": ours_indep,
        "patch_zstd": zstd_bytes,
        "zstd_how": zstd_how,
        "patch_ratio_vs_zstd": ours / zstd_bytes,
        "diff_seconds": diff_seconds,
        "cos_indep": _worst_cos(ref, out_i),
        "cos_base": _worst_cos(ref, out_b),
        "cos_v1_fp32": _worst_cos(ref, out_1),
        "relerr_indep": _relerr(ref, out_i),
        "relerr_base": _relerr(ref, out_b),
        "relerr_v1_fp32": _relerr(ref, out_1),
        "compress_seconds_indep": indep["seconds"],
        "compress_seconds_base": based["seconds"],
        "validation_passed_base": based["validation_passed"],
        "base_stats": based["base_stats"],
    }
    labels = VERSIONS / f"{stem}.v2.labels.npy"
    if labels.exists():
        y = np.load(labels)
        row["acc_fp32"] = float((ref.argmax(-1) == y).mean())
        row["acc_indep"] = float((out_i.argmax(-1) == y).mean())
        row["acc_base"] = float((out_b.argmax(-1) == y).mean())
        row["acc_v1_fp32"] = float((out_1.argmax(-1) == y).mean())
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "minilm"])
    ap.add_argument("--slack", type=float, default=SLACK, help="Int8WeightsConfig.base_slack")
    ap.add_argument("--step", type=int, default=STEP, help="delta step k for every tensor (0: per tensor, rule 4)")
    ap.add_argument("--budget", type=float, default=BUDGET, help="with --step 0: error energy / update energy")
    ap.add_argument("--json", type=Path, default=REPO / "bench-results" / "delta.json")
    args = ap.parse_args(argv)
    cpu = _cpu_info()
    print(f"CPU: {cpu}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for stem in args.models:
            row = bench_model(stem, args.slack, Path(d), args.step, args.budget)
            if row:
                rows.append(row)
    print(f"\nmode {MODE}, base_slack {args.slack}, step {args.step or 'per tensor'}, budget {args.budget}\n")
    print(
        "| model | patch `diff v1c v2c_base` | zstd --patch-from v1c v2c | ratio (<= 0.25) | `diff v1c v2c` (indep) "
        "| v2 package base / indep | v2 file (fp32) | worst cos base / indep (gap) | rel. error base / indep "
        "| acc base / indep | v1 fp32 vs v2: cos, rel. error, acc | steps (tensors) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['acc_base']:.4f} / {r['acc_indep']:.4f}" if "acc_base" in r else "-"
        v1acc = f", {r['acc_v1_fp32']:.4f}" if "acc_v1_fp32" in r else ""
        steps = " ".join(
            f"{k.rsplit('_', 1)[1]}x{v}"
            for k, v in sorted((r["base_stats"] or {}).items())
            if k.startswith("tensors_step_")
        )
        print(
            f"| {r['model']} | {r['patch_base']:,} | {r['patch_zstd']:,} | {r['patch_ratio_vs_zstd']:.3f} "
            f"| {r['patch_indep_ours']:,} | {r['v2cb_packed']:,} / {r['v2c_packed']:,} | {r['fp32_bytes']:,} "
            f"| {r['cos_base']:.5f} / {r['cos_indep']:.5f} ({r['cos_indep'] - r['cos_base']:.5f}) "
            f"| {r['relerr_base']:.4f} / {r['relerr_indep']:.4f} | {acc} "
            f"| {r['cos_v1_fp32']:.4f}, {r['relerr_v1_fp32']:.4f}{v1acc} | {steps} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"cpu": cpu, "slack": args.slack, "step": args.step, "budget": args.budget, "rows": rows}, indent=2)
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
