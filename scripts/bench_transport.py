"""Benchmark the transport container: package bytes against zstd/gzip/xz, entropy, speed, memory.

For every bundled model, the exported MiniLM (fp32) and each quantized MiniLM output (made here with
``onnxcompress compress -q MODE --skip-validation``, cached in ``--work``), in one run:

* the file's bytes and its size under ``zstd -19``, ``gzip -9`` and ``xz -9`` (the anchors, Python's
  zstandard/gzip/lzma bindings, one thread), as ratios of the file;
* ``pack``'s bytes (ratio of the file and of zstd -19), pack and unpack time (wall and CPU seconds
  of this process: the machine may be shared), and whether unpack restores every file bit-identical
  (sha256);
* for models with integer symbols (int8/uint8/int4 tensors): the per-row empirical entropy of the
  symbols (each row of ``dims[0]`` coded with its own histogram; for uint8 also read as two 4-bit
  symbols per byte, the lower kept), the same with the Miller-Madow bias correction
  (``+ (k - 1) / (2 n ln 2)`` bits per symbol for a row of ``n`` symbols using ``k`` letters), the
  per-tensor entropy, the per-row entropy of the same symbols shuffled across the whole tensor (what
  that statistic reads on data with no row structure at all: the gap to the unshuffled value is all
  that row-wise modelling can gain; the rest of its distance below the tensor entropy is estimator
  bias), and the bytes our package spends on those tensors.

With ``models/cache/versions`` (``scripts/make_versions.py``): for digits_cnn and MiniLM v1 -> v2, the
bytes of our patch (``diff``) against ``zstd -19 --patch-from`` (the zstd CLI), for the fp32 files and
for v1 and v2 compressed independently with each ``--versions`` mode (checked: ``patch`` restores v2).

Then a generated external-data model of ``--big-gb`` GB (``scripts/big_model.py``) is packed and
unpacked in child processes, recording their peak RSS against the model's bytes, and checked
bit-identical.

Usage::

    python scripts/bench_transport.py [--work DIR] [--anchors zstd,gzip,xz] [--modes ...] [--versions ...]
                                      [--big-gb 2.4] [--json FILE]

Prints a markdown table and writes JSON (default ``bench-results/bench-transport.json``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import lzma
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxcompress.transport import container, pack, unpack  # noqa: E402

BUNDLED = ["digits_cnn", "digits_keras", "tiny_transformer", "resnet_cnn"]
MINILM = REPO / "models" / "cache" / "minilm" / "minilm.onnx"
MODES = ["int8-dynamic", "int8-weights", "int8-weights-qdq", "int4", "fp16", "bf16", "int8-static"]
SYMBOL_TYPES = {2: "uint8", 3: "int8", 21: "uint4", 22: "int4"}


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _files_of(model: Path) -> list[Path]:
    return [f.path for f in container.model_layout(model)]


def _read_all(paths: list[Path]) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- entropy of symbols


def _row_entropy_bits(sym: np.ndarray, alphabet: int) -> tuple[float, float]:
    """(per-row empirical entropy, Miller-Madow corrected) in bits, rows on axis 0."""
    rows, n = sym.shape
    idx = (np.arange(rows, dtype=np.int64)[:, None] * alphabet + sym).ravel()
    c = np.bincount(idx, minlength=rows * alphabet).reshape(rows, alphabet).astype(np.float64)
    p = np.where(c > 0, c / n, 1.0)
    h = float(-(c * np.log2(p)).sum())
    k = (c > 0).sum(axis=1)
    return h, h + float(((k - 1) / (2 * math.log(2))).sum())


def _tensor_entropy_bits(sym: np.ndarray, alphabet: int) -> float:
    c = np.bincount(sym.ravel(), minlength=alphabet).astype(np.float64)
    p = np.where(c > 0, c / sym.size, 1.0)
    return float(-(c * np.log2(p)).sum())


def symbol_entropy(model: Path, tensor_stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Entropies of the integer-symbol tensors of ``model`` and the bytes our package spends on them."""
    files = {f.name: f for f in container.model_layout(model)}
    coded = {(t["file"], t["name"]): t["coded_bytes"] for t in tensor_stats}
    out = {"symbols": 0, "bytes": 0, "row_entropy_bytes": 0.0, "row_entropy_mm_bytes": 0.0, "tensor_entropy_bytes": 0.0}
    out["ours_bytes"] = 0
    out["shuffled_row_entropy_bytes"] = 0.0
    rng = np.random.default_rng(0)
    found = False
    for lay in files.values():
        with open(lay.path, "rb") as f:
            for t in lay.tensors:
                if t.data_type not in SYMBOL_TYPES or (lay.name, t.name) not in coded:
                    continue
                f.seek(t.offset)
                raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
                rows = max(1, t.nbytes // t.row_bytes) if t.row_bytes else 1
                views = []
                if t.data_type in (2, 3):
                    views.append((raw.reshape(rows, -1).astype(np.int64), 256, raw.size))
                if t.data_type != 3:  # nibbles last: they win a tie
                    nib = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(rows, -1).astype(np.int64)
                    views.append((nib, 16, nib.size))
                # A uint8 tensor holds packed 4-bit symbols when its two nibbles are independent (the byte
                # entropy is twice the nibble entropy); judge on the whole tensor, whose estimate is unbiased.
                best = None
                for sym, alphabet, count in views:
                    h, hmm = _row_entropy_bits(sym, alphabet)
                    ht = _tensor_entropy_bits(sym, alphabet)
                    if best is None or ht <= best[2] * 1.005:
                        best = (h, hmm, ht, count, sym, alphabet)
                assert best is not None
                shuffled = rng.permutation(best[4].ravel()).reshape(best[4].shape)
                out["shuffled_row_entropy_bytes"] += _row_entropy_bits(shuffled, best[5])[0] / 8
                found = True
                out["symbols"] += best[3]
                out["bytes"] += t.nbytes
                out["row_entropy_bytes"] += best[0] / 8
                out["row_entropy_mm_bytes"] += best[1] / 8
                out["tensor_entropy_bytes"] += best[2] / 8
                out["ours_bytes"] += coded[(lay.name, t.name)]
    if not found:
        return None
    for key in ("row_entropy_bytes", "row_entropy_mm_bytes", "tensor_entropy_bytes", "shuffled_row_entropy_bytes"):
        out[key.replace("_bytes", "_bits_per_symbol")] = out[key] * 8 / out["symbols"]
    out["ours_bits_per_symbol"] = out["ours_bytes"] * 8 / out["symbols"]
    out["ours_vs_row_entropy"] = out["ours_bytes"] / out["row_entropy_bytes"]
    out["ours_vs_row_entropy_mm"] = out["ours_bytes"] / out["row_entropy_mm_bytes"]
    out["ours_vs_tensor_entropy"] = out["ours_bytes"] / out["tensor_entropy_bytes"]
    out["ours_vs_shuffled_row_entropy"] = out["ours_bytes"] / out["shuffled_row_entropy_bytes"]
    return out


# --------------------------------------------------------------------------- one model


def anchors(data: bytes, which: list[str]) -> dict[str, int]:
    """Compressed sizes of ``data`` under the anchor tools."""
    out = {}
    if "zstd" in which:
        out["zstd-19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    if "gzip" in which:
        out["gzip-9"] = len(gzip.compress(data, compresslevel=9, mtime=0))
    if "xz" in which:
        out["xz-9"] = len(lzma.compress(data, preset=9))
    return out


def measure(model: Path, label: str, work: Path, which: list[str]) -> dict[str, Any]:
    """Pack, unpack and compare one model."""
    files = _files_of(model)
    size = sum(p.stat().st_size for p in files)
    row: dict[str, Any] = {"model": label, "path": str(model), "bytes": size}
    row["anchors"] = anchors(_read_all(files), which)
    pkg = work / f"{label}.ocpk"
    t0, c0 = time.perf_counter(), time.process_time()
    stats = pack(model, pkg, force=True)
    row["pack_s"], row["pack_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    out_dir = work / f"{label}.restored"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    t0, c0 = time.perf_counter(), time.process_time()
    unpack(pkg, out_dir / model.name)
    row["unpack_s"], row["unpack_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    restored = [out_dir / model.name] + [out_dir / f["name"] for f in stats["files"][1:]]
    row["identical"] = all(_sha(a) == _sha(b) for a, b in zip(files, restored)) and len(files) == len(restored)
    shutil.rmtree(out_dir, ignore_errors=True)
    row["package_bytes"] = stats["package_bytes"]
    row["ratio"] = stats["package_bytes"] / size
    row["bytes_by_codec"] = stats["bytes_by_codec"]
    row["bytes_by_record"] = stats["bytes_by_record"]
    for name, n in row["anchors"].items():
        row[f"ratio_{name}"] = n / size
    if "zstd-19" in row["anchors"]:
        row["ours_vs_zstd19"] = stats["package_bytes"] / row["anchors"]["zstd-19"]
    row["symbols"] = symbol_entropy(model, stats["tensor_stats"])
    pkg.unlink()
    return row


def quantized_models(work: Path, modes: list[str]) -> list[tuple[Path, str]]:
    """MiniLM compressed with each mode (cached in ``work``)."""
    out = []
    for mode in modes:
        dest = work / f"minilm.{mode}.onnx"
        if not dest.exists():
            cmd = [sys.executable, "-m", "onnxcompress", "compress", str(MINILM), "-o", str(dest), "-q", mode]
            cmd += ["--skip-validation", "--force"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not dest.exists():
                print(f"note: compress -q {mode} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
                continue
        out.append((dest, f"minilm {mode}"))
    return out


# --------------------------------------------------------------------------- versions (delta updates)

VERSIONS = REPO / "models" / "cache" / "versions"


def _patch_from(old: Path, new: Path, work: Path) -> int | None:
    """Bytes of ``zstd -19 --patch-from OLD NEW`` (the zstd CLI), or None without it."""
    exe = shutil.which("zstd")
    if exe is None:
        return None
    out = work / "patch-from.zst"
    cmd = [exe, "-q", "-f", "-19", "--long=31", f"--patch-from={old}", str(new), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    size = out.stat().st_size
    out.unlink()
    return size


def version_pairs(work: Path, modes: list[str]) -> list[dict[str, Any]]:
    """For each v1/v2 pair in models/cache/versions (scripts/make_versions.py): full package of v2, our
    patch v1 -> v2 and ``zstd --patch-from``, for the fp32 files and for v1/v2 compressed independently."""
    from onnxcompress.transport import diff, packed_size, patch

    rows = []
    for stem in ("digits_cnn", "minilm"):
        v1, v2 = VERSIONS / f"{stem}.v1.onnx", VERSIONS / f"{stem}.v2.onnx"
        if not (v1.exists() and v2.exists()):
            continue
        pairs = [("fp32", v1, v2)]
        for mode in modes:
            q = []
            for v in (v1, v2):
                dest = work / f"{v.stem}.{mode}.onnx"
                if not dest.exists():
                    cmd = [sys.executable, "-m", "onnxcompress", "compress", str(v), "-o", str(dest), "-q", mode]
                    subprocess.run(cmd + ["--skip-validation", "--force"], capture_output=True, text=True)
                q.append(dest)
            if all(p.exists() for p in q):
                pairs.append((f"{mode} (independent)", q[0], q[1]))
        for label, a, b in pairs:
            pd = work / "v.ocpd"
            d = diff(a, b, pd, force=True)
            restored = work / "v2.restored.onnx"
            patch(a, pd, restored, force=True)
            ok = _sha(restored) == _sha(b)
            restored.unlink()
            pd.unlink()
            rows.append(
                {
                    "model": stem,
                    "what": label,
                    "v2_bytes": b.stat().st_size,
                    "v2_package_bytes": packed_size(b),
                    "patch_bytes": d["package_bytes"],
                    "zstd_patch_from_bytes": _patch_from(a, b, work),
                    "patch_restores_v2": ok,
                }
            )
    return rows


# --------------------------------------------------------------------------- the big model

_CHILD = """
import json, sys, time
from onnxcompress.transport import pack, unpack
op, a, b = sys.argv[1:4]
t = time.perf_counter()
r = pack(a, b, force=True) if op == "pack" else unpack(a, b, force=True)
seconds = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork/exec, so it would report the parent's peak.
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": hwm, "package_bytes": r.get("package_bytes")}))
"""


def _child(op: str, a: Path, b: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, op, str(a), str(b)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def big_roundtrip(work: Path, gb: float, keep: bool) -> dict[str, Any]:
    """Pack and unpack a generated external-data model in child processes; peak RSS vs model bytes."""
    big = _load_script("big_model")
    src_dir = work / "big"
    model = src_dir / big.MODEL_NAME
    if not model.exists() or big.model_bytes(model) < gb * 1e9 * 0.99:
        shutil.rmtree(src_dir, ignore_errors=True)
        model = big.build_big_model(src_dir, gb * 1e9)
    size = big.model_bytes(model)
    pkg = work / "big.ocpk"
    out_dir = work / "big.restored"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    try:
        p = _child("pack", model, pkg)
        u = _child("unpack", pkg, out_dir / model.name)
        identical = all(_sha(src_dir / n) == _sha(out_dir / n) for n in (model.name, model.name + ".data"))
    finally:
        pkg.unlink(missing_ok=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        if not keep:
            shutil.rmtree(src_dir, ignore_errors=True)
    return {
        "model_bytes": size,
        "package_bytes": p["package_bytes"],
        "ratio": p["package_bytes"] / size,
        "pack_s": p["seconds"],
        "unpack_s": u["seconds"],
        "pack_peak_rss": p["peak_rss"],
        "unpack_peak_rss": u["peak_rss"],
        "pack_rss_ratio": p["peak_rss"] / size,
        "unpack_rss_ratio": u["peak_rss"] / size,
        "identical": identical,
    }


# --------------------------------------------------------------------------- output


def _f(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_tables(result: dict[str, Any]) -> str:
    lines = [
        "| model | file bytes | zstd -19 | gzip -9 | xz -9 | pack | pack / zstd-19 | pack s (cpu) | unpack s (cpu) | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["models"]:
        lines.append(
            f"| {r['model']} | {r['bytes']:,} | {_f(r.get('ratio_zstd-19'))} | {_f(r.get('ratio_gzip-9'))} | "
            f"{_f(r.get('ratio_xz-9'))} | **{r['ratio']:.3f}** | {_f(r.get('ours_vs_zstd19'))} | "
            f"{r['pack_s']:.2f} ({r['pack_cpu_s']:.2f}) | {r['unpack_s']:.2f} ({r['unpack_cpu_s']:.2f}) | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    lines += [
        "",
        "Integer symbols (bits per symbol): per-row empirical entropy, the same Miller-Madow corrected, the "
        "per-row entropy of the symbols shuffled across each tensor (no row structure left), per-tensor "
        "entropy, and what the package spends on those tensors.",
        "",
        "| model | symbols | row entropy | row entropy (MM) | row entropy, shuffled | tensor entropy | ours | "
        "ours / row | ours / row (MM) | ours / row, shuffled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        s = r.get("symbols")
        if not s:
            continue
        lines.append(
            f"| {r['model']} | {s['symbols']:,} | {s['row_entropy_bits_per_symbol']:.3f} | "
            f"{s['row_entropy_mm_bits_per_symbol']:.3f} | {s['shuffled_row_entropy_bits_per_symbol']:.3f} | "
            f"{s['tensor_entropy_bits_per_symbol']:.3f} | {s['ours_bits_per_symbol']:.3f} | "
            f"{s['ours_vs_row_entropy']:.3f} | {s['ours_vs_row_entropy_mm']:.3f} | "
            f"{s['ours_vs_shuffled_row_entropy']:.3f} |"
        )
    if result.get("versions"):
        lines += [
            "",
            "Delta updates v1 -> v2 (models/cache/versions): bytes of the v2 file, its package, our patch and "
            "zstd -19 --patch-from.",
            "",
            "| model | what | v2 file | v2 package | our patch | zstd --patch-from | ours / patch-from | exact |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for v in result["versions"]:
            pf = v["zstd_patch_from_bytes"]
            lines.append(
                f"| {v['model']} | {v['what']} | {v['v2_bytes']:,} | {v['v2_package_bytes']:,} | {v['patch_bytes']:,} | "
                f"{'-' if pf is None else f'{pf:,}'} | {'-' if not pf else format(v['patch_bytes'] / pf, '.3f')} | "
                f"{'yes' if v['patch_restores_v2'] else 'NO'} |"
            )
    b = result.get("big")
    if b:
        lines += [
            "",
            f"Generated external-data model, {b['model_bytes'] / 1e9:.2f} GB: package ratio {b['ratio']:.3f}, "
            f"pack {b['pack_s']:.1f}s peak RSS {b['pack_peak_rss'] / 2**20:.0f} MiB ({b['pack_rss_ratio']:.3f}x), "
            f"unpack {b['unpack_s']:.1f}s peak RSS {b['unpack_peak_rss'] / 2**20:.0f} MiB "
            f"({b['unpack_rss_ratio']:.3f}x), bit-identical: {'yes' if b['identical'] else 'NO'}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=None, help="Folder for quantized models and scratch (default: a temp dir)."
    )
    ap.add_argument("--anchors", default="zstd,gzip,xz", help="Comma-separated anchors: zstd,gzip,xz (or none).")
    ap.add_argument("--modes", default=",".join(MODES), help="compress -q modes applied to MiniLM (comma-separated).")
    ap.add_argument("--models", nargs="*", default=None, help="Models to measure (default: bundled + MiniLM).")
    ap.add_argument("--big-gb", type=float, default=2.4, help="Size of the generated external-data model (0: skip).")
    ap.add_argument(
        "--versions",
        default="int8-dynamic",
        help="compress -q modes for the v1/v2 delta table (comma-separated; 'none' skips the table).",
    )
    ap.add_argument("--keep", action="store_true", help="Keep the generated big model in --work.")
    ap.add_argument("--json", type=Path, default=REPO / "bench-results" / "bench-transport.json")
    args = ap.parse_args(argv)

    bench = _load_script("bench")
    env = bench.environment_info()
    print(bench.format_header(env, None, args, quantization=False))
    which = [a for a in args.anchors.split(",") if a and a != "none"]
    tmp = None
    if args.work is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-transport-"))
        work = tmp
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        targets: list[tuple[Path, str]] = []
        if args.models is not None:
            targets = [(Path(m), Path(m).stem) for m in args.models]
        else:
            targets = [(REPO / "models" / f"{s}.onnx", s) for s in BUNDLED]
            if MINILM.exists():
                targets.append((MINILM, "minilm fp32"))
                modes = [m for m in args.modes.split(",") if m]
                targets += quantized_models(work, modes)
            else:
                print("note: MiniLM absent (models/cache/minilm): run scripts/export_minilm.py", file=sys.stderr)
        rows = []
        for path, label in targets:
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            rows.append(measure(path, label, work, which))
        result: dict[str, Any] = {"environment": env, "models": rows}
        if args.versions != "none":
            print("version pairs ...", file=sys.stderr, flush=True)
            result["versions"] = version_pairs(work, [m for m in args.versions.split(",") if m])
        if args.big_gb > 0:
            print(f"generated {args.big_gb} GB model round trip ...", file=sys.stderr, flush=True)
            result["big"] = big_roundtrip(work, args.big_gb, args.keep)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_tables(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=float))
    print(f"JSON: {args.json}")
    ok = all(r["identical"] for r in rows) and (not result.get("big") or result["big"]["identical"])
    ok = ok and all(v["patch_restores_v2"] for v in result.get("versions", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
