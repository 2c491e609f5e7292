"""Crash trials: SIGKILL ``onnxcompress compress`` and ``batch`` at random moments, and fill the disk.

Kill trials: a MatMul/Relu chain with ``--mb`` MB of float32 weights in external data (built with
``scripts/big_model.py``) is compressed (``compress -q int8-weights``) by a subprocess that gets
SIGKILL after a random delay of 0.05 to 1.0 times the time of an uninterrupted run. Afterwards:

* the output path holds nothing, or a complete model (``onnx.checker.check_model`` passes and it
  loads in onnxruntime), never a partial file;
* what else is in the output folder is counted (``.onnxcompress-tmp-*`` folders are expected after
  a SIGKILL: no process can clean up after SIGKILL; a lone ``.data`` file is reported);
* the next run, a successful compress into the same folder, exits 0 and leaves no
  ``.onnxcompress-tmp-*`` behind (stale temp folders of dead processes are cleaned).

Disk-full trial: the child runs with ``RLIMIT_FSIZE`` set low and SIGXFSZ ignored, so writes fail
with EFBIG: it must exit 2 with one line on stderr and leave nothing in the output folder.

Usage::

    python scripts/crash_trials.py [--trials 20] [--mb 300] [--seed 0] [--workdir DIR] [--json FILE]

Exits 1 if any trial broke a rule.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

TMP_PREFIX = ".onnxcompress-tmp-"
HERE = Path(__file__).resolve().parent


def build_model(folder: Path, mb: float, dim: int = 1024, seed: int = 0) -> Path:
    """A MatMul/Relu chain with ``mb`` MB of float32 weights in ``model.onnx.data``."""
    sys.path.insert(0, str(HERE))
    from big_model import build_big_model

    return build_big_model(folder, total_bytes=mb * 1e6, seed=seed, dim=dim, name="model.onnx")


def compress_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onnxcompress", "compress", str(src), "-o", str(out), "-q", "int8-weights", *extra]


def check_output(out: Path) -> tuple[str, str]:
    """``('absent'|'valid'|'partial', detail)`` for an output path, checked in a fresh process."""
    if not out.exists():
        return "absent", ""
    code = (
        "import onnx, onnxruntime as ort, sys\n"
        "onnx.checker.check_model(sys.argv[1])\n"
        "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    if r.returncode == 0:
        return "valid", ""
    lines = r.stderr.strip().splitlines()
    return "partial", lines[-1] if lines else f"exit {r.returncode}"


def folder_state(folder: Path, out: Path) -> dict[str, Any]:
    names = sorted(p.name for p in folder.iterdir())
    return {
        "tmp_dirs": [n for n in names if n.startswith(TMP_PREFIX)],
        "orphan_data": (out.name + ".data") in names and out.name not in names,
        "files": names,
    }


def timed_run(argv: list[str], **kw: Any) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    return r, time.perf_counter() - t


def kill_trial(src: Path, folder: Path, delay: float) -> dict[str, Any]:
    """One trial: start compress into ``folder``, SIGKILL it after ``delay`` s, then check and rerun."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "o.onnx"
    p = subprocess.Popen(
        compress_argv(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    time.sleep(delay)
    finished = p.poll() is not None
    if not finished:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    state, detail = check_output(out)
    after_kill = folder_state(folder, out)
    violations = []
    if state == "partial":
        violations.append(f"partial output after kill: {detail}")
    if finished and after_kill["tmp_dirs"]:
        violations.append("temp folder left by a run that finished")
    # The next run: a successful compress into the same folder.
    r, secs = timed_run(compress_argv(src, out, "--force"))
    after_rerun = folder_state(folder, out)
    rerun_state, rerun_detail = check_output(out)
    if r.returncode != 0:
        violations.append(f"rerun exit {r.returncode}: {r.stderr.strip()[-300:]}")
    if after_rerun["tmp_dirs"]:
        violations.append(f"rerun left temp folders {after_rerun['tmp_dirs']}")
    if rerun_state != "valid":
        violations.append(f"rerun output {rerun_state}: {rerun_detail}")
    data = [f for f in after_rerun["files"] if f != "o.onnx"]
    if len(data) > 1 or any(not re.fullmatch(r"o\.onnx(\.[0-9a-f]{8})?\.data", f) for f in data):
        violations.append(f"stray files after rerun: {after_rerun['files']}")
    return {
        "delay_s": round(delay, 3),
        "killed": not finished,
        "output_after_kill": state,
        "tmp_dirs_after_kill": len(after_kill["tmp_dirs"]),
        "orphan_data_after_kill": after_kill["orphan_data"],
        "rerun_exit": r.returncode,
        "rerun_s": round(secs, 2),
        "tmp_dirs_after_rerun": len(after_rerun["tmp_dirs"]),
        "violations": violations,
    }


def batch_argv(inputs: Path, outdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onnxcompress", "batch", str(inputs), "-o", str(outdir), "-r", "edge-int8", *extra]


def build_batch_inputs(folder: Path, count: int) -> Path:
    """``count`` copies of the bundled models (with their sidecars) in a tree under ``folder``."""
    models = HERE.parent / "models"
    stems = ["digits_cnn", "digits_keras", "tiny_transformer", "resnet_cnn"]
    for i in range(count):
        stem = stems[i % len(stems)]
        sub = folder / f"group{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in models.glob(f"{stem}.*"):
            shutil.copy(f, sub / f.name.replace(stem, f"{stem}_{i}", 1))
    return folder


def batch_kill_trial(inputs: Path, folder: Path, delay: float) -> dict[str, Any]:
    """SIGKILL ``batch`` after ``delay`` s; every output is absent or valid; the rerun resumes and completes."""
    folder.mkdir(parents=True, exist_ok=True)
    outdir = folder / "out"
    p = subprocess.Popen(
        batch_argv(inputs, outdir, "--jobs", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(delay)
    finished = p.poll() is not None
    if not finished:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    violations = []
    outputs = sorted(outdir.rglob("*.onnx")) if outdir.exists() else []
    states = Counter()
    for out in outputs:
        state, detail = check_output(out)
        states[state] += 1
        if state == "partial":
            violations.append(f"partial output after kill: {out.name}: {detail}")
    r, secs = timed_run(batch_argv(inputs, outdir, "--jobs", "2"))
    if r.returncode != 0:
        violations.append(f"rerun exit {r.returncode}: {r.stderr.strip()[-300:]}")
    expected = sorted(p.relative_to(inputs) for p in inputs.rglob("*.onnx"))
    got = sorted(p.relative_to(outdir) for p in outdir.rglob("*.onnx"))
    if got != expected:
        violations.append(f"rerun outputs {len(got)} != inputs {len(expected)}")
    for out in outdir.rglob("*.onnx"):
        state, detail = check_output(out)
        if state != "valid":
            violations.append(f"rerun output {out.name} {state}: {detail}")
    tmp = [str(t) for t in outdir.rglob(f"{TMP_PREFIX}*")]
    if tmp:
        violations.append(f"rerun left temp folders {tmp}")
    return {
        "delay_s": round(delay, 3),
        "killed": not finished,
        "outputs_after_kill": dict(states),
        "rerun_exit": r.returncode,
        "rerun_s": round(secs, 2),
        "violations": violations,
    }


def _limit_fsize(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an ignored disposition survives exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def disk_full_trial(src: Path, folder: Path, limit: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """compress with writes limited to ``limit`` bytes per file: exit 2, one line, nothing left."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "o.onnx"
    r = subprocess.run(
        compress_argv(src, out, *extra), capture_output=True, text=True, preexec_fn=_limit_fsize(limit), timeout=300
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    left = sorted(p.name for p in folder.iterdir())
    violations = []
    if r.returncode != 2:
        violations.append(f"exit {r.returncode} (expected 2)")
    if len(lines) != 1:
        violations.append(f"{len(lines)} stderr lines")
    if "Traceback" in r.stderr or "internal error" in r.stderr:
        violations.append("traceback or internal error")
    if left:
        violations.append(f"left behind: {left}")
    return {
        "limit_bytes": limit,
        "args": list(extra),
        "exit": r.returncode,
        "stderr": r.stderr.strip()[-300:],
        "left": left,
        "violations": violations,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--mb", type=float, default=300.0, help="MB of float32 weights in the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="default: a temp folder, removed afterwards")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--batch-trials", type=int, default=20, help="SIGKILL trials of `batch` (0: none)")
    ap.add_argument("--batch-models", type=int, default=8, help="models in the batch of the batch trials")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="onnxcompress-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        src = build_model(work / "src", args.mb)
        print(f"model: {args.mb:.0f} MB of weights built in {time.perf_counter() - t:.1f}s")
        (work / "ref").mkdir(exist_ok=True)
        ref, full_s = timed_run(compress_argv(src, work / "ref" / "o.onnx"))
        if ref.returncode != 0:
            print(f"reference run failed: {ref.stderr.strip()}")
            return 1
        print(f"uninterrupted compress: {full_s:.2f}s; killing at uniform random delays in [0.05, 1.0] x that")
        trials = []
        for i in range(args.trials):
            res = kill_trial(src, work / f"t{i}", rng.uniform(0.05, 1.0) * full_s)
            trials.append(res)
            print(
                f"trial {i:3d}: delay {res['delay_s']:.2f}s killed={res['killed']!s:5} output={res['output_after_kill']:7} "
                f"tmp_after_kill={res['tmp_dirs_after_kill']} orphan_data={res['orphan_data_after_kill']!s:5} "
                f"rerun_exit={res['rerun_exit']} tmp_after_rerun={res['tmp_dirs_after_rerun']} {res['violations'] or ''}",
                flush=True,
            )
            shutil.rmtree(work / f"t{i}", ignore_errors=True)
        disk = [
            disk_full_trial(src, work / "full1", 1 << 20),
            disk_full_trial(src, work / "full2", 40 << 20),
            disk_full_trial(src, work / "full3", 1 << 20, ("--no-external-data",)),
        ]
        for d in disk:
            print(
                f"disk full (RLIMIT_FSIZE {d['limit_bytes']} {d['args']}): exit {d['exit']}, left {d['left']}, {d['stderr']!r}"
            )
            if d["violations"]:
                print(f"  VIOLATION {d['violations']}")
        batch_trials = []
        if args.batch_trials:
            inputs = build_batch_inputs(work / "batch-in", args.batch_models)
            ref_b, batch_s = timed_run(batch_argv(inputs, work / "batch-ref", "--jobs", "2"))
            if ref_b.returncode != 0:
                print(f"reference batch failed: {ref_b.stderr.strip()[-300:]}")
                return 1
            print(f"uninterrupted batch of {args.batch_models} models: {batch_s:.2f}s")
            for i in range(args.batch_trials):
                res = batch_kill_trial(inputs, work / f"b{i}", rng.uniform(0.05, 1.0) * batch_s)
                batch_trials.append(res)
                print(
                    f"batch trial {i:3d}: delay {res['delay_s']:.2f}s killed={res['killed']!s:5} "
                    f"outputs={res['outputs_after_kill']} rerun_exit={res['rerun_exit']} {res['violations'] or ''}",
                    flush=True,
                )
                shutil.rmtree(work / f"b{i}", ignore_errors=True)
        summary = {
            "batch_trials": len(batch_trials),
            "batch_killed": sum(t["killed"] for t in batch_trials),
            "batch_violations": sum(len(t["violations"]) for t in batch_trials),
            "batch_details": batch_trials,
            "trials": len(trials),
            "model_weights_mb": args.mb,
            "uninterrupted_s": round(full_s, 2),
            "killed": sum(t["killed"] for t in trials),
            "output_after_kill": dict(Counter(t["output_after_kill"] for t in trials)),
            "trials_with_tmp_after_kill": sum(t["tmp_dirs_after_kill"] > 0 for t in trials),
            "trials_with_orphan_data_after_kill": sum(t["orphan_data_after_kill"] for t in trials),
            "reruns_ok": sum(t["rerun_exit"] == 0 for t in trials),
            "tmp_after_rerun": sum(t["tmp_dirs_after_rerun"] for t in trials),
            "violations": sum(len(t["violations"]) for t in trials)
            + sum(len(d["violations"]) for d in disk)
            + sum(len(t["violations"]) for t in batch_trials),
            "disk_full": disk,
            "details": trials,
        }
        print()
        for k in (
            "trials",
            "killed",
            "output_after_kill",
            "trials_with_tmp_after_kill",
            "trials_with_orphan_data_after_kill",
            "reruns_ok",
            "tmp_after_rerun",
            "batch_trials",
            "batch_killed",
            "batch_violations",
            "violations",
        ):
            print(f"{k}: {summary[k]}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 1 if summary["violations"] else 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
