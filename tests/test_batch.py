"""Batch conversion: input expansion, isolation of failures, validated outputs, resume, reports,
exit codes, interruption and memory-aware scheduling."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import matmul_model, run, save

from onnxcompress import batch as B
from onnxcompress import cli, cli_batch, io
from onnxcompress import recipe as R
from onnxcompress.errors import OnnxCompressError

MODELS = Path(__file__).resolve().parent.parent / "models"
RECIPE = R.recipe_from_options(quantize="int8-weights")


def _mm(folder: Path, name: str, seed: int, external: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = save(matmul_model(k=64, n=32, seed=seed), folder / f"{name}.onnx", external=external)
    x = np.random.default_rng(seed).standard_normal((4, 4, 64)).astype(np.float32)
    np.savez(folder / f"{name}.inputs.npz", x=x)
    return path


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """3 good models in a tree (one with external data), a truncated model and a text file."""
    root = tmp_path / "zoo"
    _mm(root / "a", "m1", 1)
    _mm(root / "a" / "deep", "m2", 2)
    _mm(root / "b", "m3", 3, external=True)
    (root / "broken.onnx").write_bytes((root / "a" / "m1.onnx").read_bytes()[:300])
    (root / "notes.onnx").write_text("not a model\n")
    (root / "readme.txt").write_text("ignored")
    return root


def _statuses(report: B.BatchReport) -> dict[str, str]:
    return {r.rel: r.status for r in report.results}


def _check_outputs(zoo: Path, out: Path, rels: list[str]) -> None:
    """Each output is valid ONNX, smaller than its input, and numerically close to it."""
    for rel in rels:
        src, dst = zoo / rel, out / rel
        onnx.checker.check_model(str(dst))
        x = np.load(src.with_name(src.stem + ".inputs.npz"))["x"]
        a, b = run(src, {"x": x})[0], run(dst, {"x": x})[0]
        cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos > 0.99, (rel, cos)
        assert np.abs(a - b).max() > 0  # it was really quantized


GOOD = ["a/m1.onnx", "a/deep/m2.onnx", "b/m3.onnx"]


# --------------------------------------------------------------------------- planning


def test_expand_inputs(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rels = [rel for _, rel in B.expand_inputs([zoo], out)]
    assert rels == ["a/deep/m2.onnx", "a/m1.onnx", "b/m3.onnx", "broken.onnx", "notes.onnx"]
    # a file maps to its name, a glob to the path below its fixed prefix; duplicates once
    got = B.expand_inputs([zoo / "a" / "m1.onnx", str(zoo / "a" / "**" / "*.onnx"), zoo / "a"], out)
    assert [rel for _, rel in got] == ["m1.onnx", "deep/m2.onnx"]
    # outputs inside an input folder are never inputs
    inner = zoo / "out"
    _mm(inner / "a", "m1", 1)
    assert "out/a/m1.onnx" not in [rel for _, rel in B.expand_inputs([zoo], inner)]
    with pytest.raises(OnnxCompressError, match="no such file"):
        B.expand_inputs([tmp_path / "missing"], out)
    with pytest.raises(OnnxCompressError, match="matches no model"):
        B.expand_inputs([str(tmp_path / "*.nothing")], out)
    with pytest.raises(OnnxCompressError, match="both be written"):
        B.expand_inputs([zoo / "a" / "m1.onnx", zoo / "b" / "m3.onnx", _mm(tmp_path / "c", "m1", 5)], out)


def test_outdir_onto_input_refused(zoo: Path) -> None:
    with pytest.raises(OnnxCompressError, match="overwrite its input"):
        B.run_batch([zoo / "a"], zoo / "a", RECIPE, executor="inline")


# --------------------------------------------------------------------------- the batch


def test_batch_isolates_failures_and_resumes(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = B.run_batch([zoo], out, RECIPE, jobs=2)
    st = _statuses(report)
    assert st == {**dict.fromkeys(GOOD, B.OK), "broken.onnx": B.ERROR, "notes.onnx": B.ERROR}
    assert report.exit_code == 2
    for r in report.results:
        if r.status == B.ERROR:
            assert "not a valid ONNX model" in r.reason and "\n" not in r.reason
            assert not Path(r.output).exists()
        else:
            assert r.fidelity is not None and r.fidelity > 0.99 and r.size_ratio < 0.5 and r.key
    _check_outputs(zoo, out, GOOD)
    assert (out / "b" / "m3.onnx.data").is_file()  # external data kept next to its model
    assert not list(out.rglob(io.TMP_PREFIX + "*"))

    data = json.loads((out / B.REPORT_JSON).read_text())
    assert data["exit_code"] == 2 and data["summary"]["ok"] == 3 and data["summary"]["error"] == 2
    assert R.parse_recipe(data["recipe"]) == RECIPE
    rows = list(csv.DictReader((out / B.REPORT_CSV).open()))
    assert [r["status"] for r in rows] == [report.results[i].status for i in range(5)]

    # second run: everything up to date, nothing recompressed (no worker pool even starts)
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in GOOD}
    again = B.run_batch([zoo], out, RECIPE, jobs=2)
    assert all(r.resumed for r in again.results) and _statuses(again) == st
    assert again.seconds < 0.5 * report.seconds
    assert {rel: (out / rel).stat().st_mtime_ns for rel in GOOD} == mtimes

    # a changed input (here: its external data), a changed recipe, or a deleted output reruns
    data_file = zoo / "b" / "m3.onnx.data"
    raw = bytearray(data_file.read_bytes())
    raw[-4:] = np.float32(0.5).tobytes()
    data_file.write_bytes(bytes(raw))
    (out / "a" / "m1.onnx").unlink()
    third = B.run_batch([zoo], out, RECIPE, executor="inline")
    assert {r.rel for r in third.results if not r.resumed} == {"b/m3.onnx", "a/m1.onnx"}
    fourth = B.run_batch([zoo / "a"], tmp_path / "out2", R.recipe_from_options(quantize="fp16"), executor="inline")
    assert not any(r.resumed for r in fourth.results)
    forced = B.run_batch(
        [zoo / "a"], tmp_path / "out2", R.recipe_from_options(quantize="fp16"), force=True, executor="inline"
    )
    assert not any(r.resumed for r in forced.results) and forced.exit_code == 0


def test_validation_failure_exit_1_and_not_written(zoo: Path, tmp_path: Path) -> None:
    strict = R.recipe_from_options(quantize="int8-weights", tolerance=["max_abs<=0"])
    report = B.run_batch([zoo / "a"], tmp_path / "out", strict, executor="inline")
    assert set(_statuses(report).values()) == {B.VALIDATION_FAILED}
    assert report.exit_code == 1
    r = report.results[0]
    assert "validation failed" in r.reason and r.size_after and r.fidelity is not None
    assert not list((tmp_path / "out").rglob("*.onnx"))


def test_existing_foreign_output_needs_force(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "m1.onnx").write_text("precious")
    report = B.run_batch([zoo / "a"], out / "a", RECIPE, executor="inline")
    assert _statuses(report)["m1.onnx"] == B.ERROR and "--force" in report.results[1].reason
    assert (out / "a" / "m1.onnx").read_text() == "precious"
    report = B.run_batch([zoo / "a"], out / "a", RECIPE, executor="inline", force=True)
    assert report.exit_code == 0


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_interrupt_writes_report_and_leaves_no_partial_output(zoo: Path, tmp_path: Path, executor: str) -> None:
    out = tmp_path / "out"
    seen = []

    def on_event(event: str, job: B.Job, result: B.ModelResult | None) -> None:
        if event == "done":
            seen.append(job.rel)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        B.run_batch([zoo], out, RECIPE, jobs=2, executor=executor, on_event=on_event)
    data = json.loads((out / B.REPORT_JSON).read_text())
    assert data["interrupted"] is True and data["exit_code"] == 2
    statuses = {m["rel"]: m["status"] for m in data["models"]}
    assert statuses[seen[0]] in (B.OK, B.ERROR)
    assert B.NOT_RUN in statuses.values()
    assert not list(out.rglob(io.TMP_PREFIX + "*"))
    for f in out.rglob("*.onnx"):
        onnx.checker.check_model(str(f))  # whatever is there is whole
    # the next run finishes the rest and keeps what was done
    report = B.run_batch([zoo], out, RECIPE, executor="inline")
    assert report.exit_code == 2 and _statuses(report)["a/m1.onnx"] == B.OK


def test_memory_aware_scheduling() -> None:
    def job(rel: str, size: int) -> B.Job:
        return B.Job(Path(rel), Path(rel), rel, size=size)

    runner = B._Runner(RECIPE, None, jobs=4, budget=3 * B.MEM_BASE, note=lambda *a: None, finished=lambda *a: None)
    small = [job(f"s{i}", 0) for i in range(5)]
    running: dict = {}
    picked = []
    while (j := runner._pick([s for s in small if s not in picked], running)) is not None:
        picked.append(j)
        running[object()] = j
    assert len(picked) == 3  # the memory budget, not the job count, limits
    huge = job("huge", 10**12)
    assert runner._pick([huge], {}) is huge  # too big for any budget: runs alone
    assert runner._pick([huge], {object(): small[0]}) is None
    assert runner._pick([huge, small[1]], {object(): small[0]}) is small[1]  # smaller ones backfill


# --------------------------------------------------------------------------- the command


def test_batch_command(capsys: pytest.CaptureFixture[str], zoo: Path, tmp_path: Path) -> None:
    cli_batch.register(cli.app)
    cli_batch.register(cli.app)  # idempotent
    recipe = tmp_path / "r.toml"
    recipe.write_text(R.to_toml(RECIPE))
    out = tmp_path / "out"
    code = cli.main(
        ["batch", str(zoo / "a"), str(zoo / "notes.onnx"), "-o", str(out), "--recipe", str(recipe), "-j", "1"]
    )
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "notes.onnx: " in captured.out and "not a valid ONNX model" in captured.out
    assert "ok 2," in captured.out and "Traceback" not in captured.err
    code = cli.main(["batch", str(zoo / "a"), "-o", str(tmp_path / "out2"), "--recipe", "fp16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["summary"]["ok"] == 2
    code = cli.main(["batch", str(zoo / "a"), "-o", str(out), "--recipe", "nosuch"])
    assert code == 2 and "no such preset" in capsys.readouterr().err


def test_bundled_models_batch(tmp_path: Path) -> None:
    """Bundled models with their sidecars, under the edge-int8 preset."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for stem in ("digits_cnn", "tiny_transformer"):
        for f in MODELS.glob(stem + ".*"):
            shutil.copy(f, zoo / f.name)
    report = B.run_batch([zoo], tmp_path / "out", R.load_recipe("edge-int8"), executor="inline")
    assert report.exit_code == 0, [r.reason for r in report.results]
    for r in report.results:
        assert r.size_ratio < 0.4 and r.fidelity > 0.99


def _crash_on_m1(job: B.Job, recipe: R.Recipe, max_memory: int | None) -> B.ModelResult:
    """Runs in a worker process: dies like a segfault on m1, works normally otherwise."""
    if job.rel.endswith("m1.onnx"):
        import os

        os._exit(139)
    return B._run_job(job, recipe, max_memory)


def test_crashed_worker_is_isolated(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results: dict[str, B.ModelResult] = {}
    jobs = [B.Job(src, out / rel, rel, size=src.stat().st_size) for src, rel in B.expand_inputs([zoo / "a"], out)]
    runner = B._Runner(
        RECIPE,
        None,
        jobs=2,
        budget=2**40,
        note=lambda *a: None,
        finished=lambda job, r: results.__setitem__(job.rel, r),
        work=_crash_on_m1,
    )
    runner.run(jobs)
    assert results["m1.onnx"].status == B.ERROR and "worker process died" in results["m1.onnx"].reason
    assert results["deep/m2.onnx"].status == B.OK  # retried alone on a fresh pool if the crash took it down
    assert (out / "deep" / "m2.onnx").is_file() and not (out / "m1.onnx").exists()


def test_temp_folders_of_killed_runs_are_cleaned(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after a SIGKILL
    stale = out / "a" / f".onnxcompress-tmp-{dead.pid}-batch-x1y2"
    stale.mkdir(parents=True)
    (stale / "m1.onnx").write_bytes(b"half written")
    report = B.run_batch([zoo / "a"], out / "a", RECIPE, executor="inline")
    assert not stale.exists()
    assert all(not p.name.startswith(".onnxcompress-tmp-") for p in (out / "a").rglob("*"))
    assert report.results


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_temp_folder_of_a_zombie_worker_is_cleaned(zoo: Path, tmp_path: Path) -> None:
    """A killed worker nobody reaped yet (a container whose init never reaps) counts as dead."""
    import time

    out = tmp_path / "out"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and "Z" not in Path(f"/proc/{zombie.pid}/stat").read_text().split()[2]:
        time.sleep(0.05)
    stale = out / "a" / f".onnxcompress-tmp-{zombie.pid}-batch-z0"
    stale.mkdir(parents=True)
    B.run_batch([zoo / "a"], out / "a", RECIPE, executor="inline")
    assert not stale.exists()
    zombie.wait()
