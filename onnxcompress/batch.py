"""Batch conversion: one recipe over many models, each isolated, resumable, in a process pool.

:func:`run_batch` expands the inputs (files, folders searched recursively for ``*.onnx``, globs),
mirrors them under ``OUTDIR`` (``OUTDIR/<path relative to the input folder>``; external data stays
next to its model), and compresses each model with the recipe:

* **isolation**: every failure of one model (unreadable file, not ONNX, bad op, validation failure,
  out of memory, even a crashed worker process) is caught and reported in one line; the rest go on;
* **resume**: each model's key is a SHA-256 of its bytes (model file, external-data files, the
  sidecar inputs/calibration/labels the recipe would use) and of the recipe's canonical text. The key
  is recorded in ``OUTDIR/batch-report.json``; a later run skips a model whose key is unchanged and
  whose output files are still there with the recorded hash, and a model that failed for a
  deterministic reason (bad input, validation failure) with the same key. ``force`` reruns all;
* **parallelism**: a process pool of ``jobs`` workers (default: the usable cores), never running
  more models at once than fit in available RAM by a per-model estimate
  (``MEM_FACTOR`` x the model's bytes + ``MEM_BASE``); a model too big for the budget runs alone;
* **interruption**: Ctrl-C stops the workers (each discards its staged files: outputs are only ever
  renamed into place whole), and the report of what finished is written before
  ``KeyboardInterrupt`` propagates. The report is also rewritten after every model, so it survives
  even a killed parent;
* **reports**: ``batch-report.json`` (a public contract: see :meth:`BatchReport.to_dict`) and
  ``batch-report.csv`` (one row per model);
* **exit code** (:attr:`BatchReport.exit_code`): 0 all ok, 1 some failed validation (and none worse),
  2 some could not be processed (or the run was interrupted).

* **executors**: ``process`` (the local pool above), ``inline`` (this process, one model at a time)
  and ``dask`` (:class:`_DaskRunner`: each model is a task on an existing Dask distributed cluster,
  the ``dask`` extra). On a cluster whose workers share the filesystem, workers read the inputs and
  stage the outputs in place exactly as the local pool does; with ``ship=True`` the model's bytes
  (its file, external data and sidecars) travel with the task and the output bytes travel back, and
  this process writes them (the same staged-then-renamed way). Outputs are the same bytes either way.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import onnx

from . import feeds as feeds_mod
from . import io
from . import recipe as recipe_mod
from .errors import OnnxCompressError, ValidationFailed

log = logging.getLogger(__name__)

REPORT_JSON = "batch-report.json"
REPORT_CSV = "batch-report.csv"
REPORT_VERSION = 1
# Peak memory of one compression, estimated: the model is held as a graph, written, then loaded by
# two onnxruntime sessions for validation; plus the worker's own imports.
MEM_FACTOR = 6
MEM_BASE = 400 * 2**20

OK = "ok"
VALIDATION_FAILED = "validation-failed"
ERROR = "error"
INTERRUPTED = "interrupted"
NOT_RUN = "not-run"
STATUSES = (OK, VALIDATION_FAILED, ERROR, INTERRUPTED, NOT_RUN)
CSV_COLUMNS = (
    "input",
    "output",
    "status",
    "reason",
    "size_before",
    "size_after",
    "size_ratio",
    "transport_bytes",
    "fidelity",
    "seconds",
    "resumed",
    "key",
)


@dataclasses.dataclass
class Job:
    """One model to convert."""

    src: Path
    out: Path
    rel: str
    size: int = 0
    key: str | None = None
    attempts: int = 0

    @property
    def memory(self) -> int:
        """Estimated peak memory of compressing this model, in bytes."""
        return MEM_FACTOR * self.size + MEM_BASE


@dataclasses.dataclass
class ModelResult:
    """What happened to one model (one row of the reports).

    ``fidelity`` is the worst output's worst-sample cosine similarity (``None`` without validation).
    ``deterministic`` says whether a failure would recur with the same bytes and recipe (so resume
    may skip it). ``resumed`` marks a result carried over from an earlier run.
    """

    input: str
    output: str
    rel: str
    status: str
    reason: str = ""
    size_before: int = 0
    size_after: int | None = None
    size_ratio: float | None = None
    transport_bytes: int | None = None
    fidelity: float | None = None
    seconds: float = 0.0
    key: str | None = None
    resumed: bool = False
    deterministic: bool = False
    files: list[str] = dataclasses.field(default_factory=list)
    output_sha256: str | None = None
    validation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seconds"] = round(self.seconds, 3)
        if self.size_ratio is not None:
            d["size_ratio"] = round(self.size_ratio, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class BatchReport:
    """The batch's results, in input order."""

    outdir: str
    results: list[ModelResult]
    recipe_text: str
    jobs: int
    seconds: float = 0.0
    interrupted: bool = False

    def counts(self) -> dict[str, int]:
        c = {s: 0 for s in STATUSES}
        for r in self.results:
            c[r.status] += 1
        c["resumed"] = sum(r.resumed for r in self.results)
        c["total"] = len(self.results)
        return c

    @property
    def exit_code(self) -> int:
        """0 all ok; 1 some failed validation; 2 some could not be processed (or interrupted)."""
        statuses = {r.status for r in self.results}
        if self.interrupted or statuses & {ERROR, INTERRUPTED, NOT_RUN}:
            return 2
        return 1 if VALIDATION_FAILED in statuses else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "outdir": self.outdir,
            "recipe": self.recipe_text,
            "recipe_sha256": hashlib.sha256(self.recipe_text.encode()).hexdigest(),
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
            "summary": self.counts(),
            "models": [r.to_dict() for r in self.results],
        }


# --------------------------------------------------------------------------- planning


def _has_magic(text: str) -> bool:
    return re.search(r"[*?[]", text) is not None


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _skip(path: Path, outdir: Path) -> bool:
    if any(part.startswith(io.TMP_PREFIX) for part in path.parts):
        return True
    try:
        path.resolve().relative_to(outdir)
        return True
    except ValueError:
        return False


def _models_under(folder: Path, outdir: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.onnx") if p.is_file() and not _skip(p, outdir))


def expand_inputs(inputs: list[str | os.PathLike[str]], outdir: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """``(model path, path relative to OUTDIR)`` for every model the inputs name, in order, once each.

    Files map to their name, folders to the path below the folder, globs to the path below the
    pattern's fixed prefix. Files inside ``outdir`` and onnxcompress temp folders are left out.

    Raises:
        OnnxCompressError: an input that does not exist or matches nothing, or two models that would
            be written to the same output.
    """
    out_abs = Path(outdir).resolve()
    found: list[tuple[Path, str]] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            models = [(p, p.relative_to(path).as_posix()) for p in _models_under(path, out_abs)]
            if not models:
                raise OnnxCompressError(f"input folder {path} holds no .onnx files")
        elif path.is_file():
            models = [(path, path.name)]
        elif _has_magic(text):
            root = _glob_root(text)
            models = []
            for match in sorted(glob.glob(text, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    models += [(p, p.relative_to(root).as_posix()) for p in _models_under(m, out_abs)]
                elif m.is_file() and not _skip(m, out_abs):
                    models.append((m, m.relative_to(root).as_posix()))
            if not models:
                raise OnnxCompressError(f"input pattern {text!r} matches no model file")
        else:
            raise OnnxCompressError(f"input {text}: no such file or folder")
        found += models
    seen: set[Path] = set()
    by_rel: dict[str, Path] = {}
    out: list[tuple[Path, str]] = []
    for src, rel in found:
        real = src.resolve()
        if real in seen:
            continue
        seen.add(real)
        if rel in by_rel:
            raise OnnxCompressError(
                f"{by_rel[rel]} and {src} would both be written to {Path(outdir) / rel}: batch them separately"
            )
        by_rel[rel] = src
        out.append((src, rel))
    return out


def _external_files(model_path: Path) -> list[Path]:
    """The external-data files a model names that lie inside its folder (unparseable: none)."""
    if not _mentions(model_path, b"location"):
        return []  # every external tensor names its file under the key "location": none here
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:
        return []
    folder = model_path.parent.resolve()
    files: set[Path] = set()
    for t in io.iter_model_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            continue
        p = (model_path.parent / loc).resolve()
        if p.is_file() and (p.parent == folder or folder in p.parents):
            files.add(p)
    return sorted(files)


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain ``needle`` (read in blocks; True if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            tail = b""
            while block := f.read(1 << 22):
                if needle in tail + block[: len(needle) - 1] or needle in block:
                    return True
                tail = block[-(len(needle) - 1) :]
    except OSError:
        return True
    return False


def _sidecars(model_path: Path, recipe: recipe_mod.Recipe) -> list[Path]:
    """Files the recipe reads for this model besides the model (sidecars and explicit paths)."""
    v = recipe.validate
    cands: list[Path | None] = [
        Path(recipe.calibration) if recipe.calibration else feeds_mod.sidecar_calibration(model_path)
    ]
    if not v.skip:
        cands.append(Path(v.inputs) if v.inputs else feeds_mod.sidecar_inputs(model_path))
        cands.append(Path(v.labels) if v.labels else feeds_mod.sidecar_labels(model_path) if not v.inputs else None)
    out: list[Path] = []
    for c in cands:
        if c is None:
            continue
        if c.is_dir():
            out += sorted(p for p in c.rglob("*") if p.is_file())
        elif c.is_file():
            out.append(c)
    return out


def _hash_files(h: Any, files: list[Path], tag: str) -> int:
    total = 0
    for f in files:
        size = f.stat().st_size
        h.update(f"\0{tag}\0{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        total += size
    return total


def model_key(model_path: Path, recipe_text: str, recipe: recipe_mod.Recipe) -> tuple[str, int]:
    """The resume key (SHA-256 hex) of a model under a recipe, and the model's bytes (with external data).

    Raises:
        OSError: a file cannot be read.
    """
    from . import __version__

    h = hashlib.sha256()
    h.update(f"onnxcompress-batch {REPORT_VERSION} {__version__}\0".encode())
    h.update(recipe_text.encode())
    size = _hash_files(h, [model_path], "model")
    size += _hash_files(h, _external_files(model_path), "data")
    _hash_files(h, _sidecars(model_path, recipe), "side")
    return h.hexdigest(), size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_previous(outdir: Path) -> dict[str, ModelResult]:
    """The results of an earlier run recorded in ``OUTDIR/batch-report.json``, by relative path."""
    path = outdir / REPORT_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {m["rel"]: ModelResult.from_dict(m) for m in data.get("models", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _up_to_date(job: Job, prev: ModelResult | None) -> bool:
    if prev is None or job.key is None or prev.key != job.key:
        return False
    if prev.status == OK:
        files = [Path(f) for f in prev.files]
        if not files or not all(f.is_file() for f in files) or not job.out.is_file():
            return False
        try:
            return prev.output_sha256 == _sha256(job.out)
        except OSError:
            return False
    return prev.status in (ERROR, VALIDATION_FAILED) and prev.deterministic


# --------------------------------------------------------------------------- one model (in a worker)

_IN_JOB = False


def _on_sigint(signum: int, frame: Any) -> None:
    if _IN_JOB:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: let the clean-up run
        raise KeyboardInterrupt


def _worker_init() -> None:
    signal.signal(signal.SIGINT, _on_sigint)
    logging.basicConfig(level=logging.WARNING)


def _warm_up() -> None:
    """Run in each new worker first: import what a job needs while the parent plans."""
    import onnxruntime  # noqa: F401

    from . import api  # noqa: F401


def _owned_data(out: Path) -> list[Path]:
    pattern = re.compile(re.escape(out.name) + r"(\.[0-9a-f]{8})?\.data")
    try:
        return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    except OSError:
        return []


def _fidelity(validation: Any) -> float | None:
    if validation is None:
        return None
    cos = [d.cosine for d in validation.outputs.values() if d.cosine is not None]
    return float(min(cos)) if cos else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run_job(job: Job, recipe: recipe_mod.Recipe, max_memory: int | None) -> ModelResult:
    """Compress one model into a private temp folder beside its output, then rename it into place.

    Never raises: every failure becomes the result's status and one-line reason.
    """
    global _IN_JOB
    start = time.perf_counter()
    res = ModelResult(
        input=str(job.src), output=str(job.out), rel=job.rel, status=ERROR, size_before=job.size, key=job.key
    )
    tmp: Path | None = None
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        and multiprocessing.parent_process() is not None
    ):
        signal.signal(signal.SIGINT, _on_sigint)
    _IN_JOB = True
    try:
        try:
            job.out.parent.mkdir(parents=True, exist_ok=True)
            io.check_output_path(job.out, force=True, protect=(job.src,))
            tmp = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{os.getpid()}-batch-", dir=job.out.parent))
            report = None
            try:
                report = recipe_mod.compress(recipe, job.src, tmp / job.out.name, max_memory=max_memory)
                res.status = OK
            except ValidationFailed as exc:
                report = exc.report
                res.status, res.reason, res.deterministic = VALIDATION_FAILED, _one_line(exc), True
            if report is not None:
                res.size_after = int(report.output["size_bytes"])
                res.size_ratio = res.size_after / job.size if job.size else None
                res.transport_bytes = report.output.get("transport_bytes")
                res.fidelity = _fidelity(report.validation)
                res.validation = report.validation.to_dict() if report.validation is not None else None
            if res.status == OK:
                names = [Path(f).name for f in report.output["files"]]
                for name in sorted(names, key=lambda n: n == job.out.name):  # data first, .onnx last
                    os.replace(tmp / name, job.out.parent / name)
                for old in _owned_data(job.out):
                    if old.name not in names:
                        with contextlib.suppress(OSError):
                            old.unlink()
                res.files = [str(job.out.parent / n) for n in names]
                res.output_sha256 = _sha256(job.out)
        except OnnxCompressError as exc:
            res.status, res.reason, res.deterministic = ERROR, _one_line(exc), True
        except MemoryError:
            res.status, res.reason = ERROR, "out of memory: run fewer jobs or raise the available memory"
        except OSError as exc:
            res.status, res.reason = ERROR, f"cannot read or write a file: {exc.strerror or exc}"
        except Exception as exc:  # isolation: one model's bug must not stop the batch
            log.debug("internal error on %s", job.src, exc_info=True)
            res.status, res.reason = ERROR, f"internal error ({type(exc).__name__}: {_one_line(exc)})"
    except KeyboardInterrupt:
        res.status, res.reason, res.deterministic = INTERRUPTED, "interrupted", False
    finally:
        _IN_JOB = False
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        res.seconds = time.perf_counter() - start
    return res


# --------------------------------------------------------------------------- the batch


def available_memory() -> int:
    """Memory available for new work (``MemAvailable``), or 75% of RAM if it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return io.default_max_memory()


def default_jobs() -> int:
    """The number of usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


Event = Callable[[str, Job, "ModelResult | None"], None]


def _write_reports(report: BatchReport, outdir: Path) -> None:
    """Write both reports atomically (temp file, then rename)."""
    data = json.dumps(report.to_dict(), indent=2, allow_nan=False, default=str) + "\n"
    tmp = outdir / f".{REPORT_JSON}.{os.getpid()}.tmp"
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, outdir / REPORT_JSON)
    tmp = outdir / f".{REPORT_CSV}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in report.results:
            d = r.to_dict()
            w.writerow(["" if d[c] is None else d[c] for c in CSV_COLUMNS])
    os.replace(tmp, outdir / REPORT_CSV)


def run_batch(
    inputs: list[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    recipe: recipe_mod.Recipe,
    *,
    jobs: int | None = None,
    force: bool = False,
    max_memory: int | None = None,
    memory_budget: int | None = None,
    executor: str = "process",
    scheduler: Any = None,
    ship: bool = False,
    on_event: Event | None = None,
) -> BatchReport:
    """Compress every model the inputs name into ``outdir`` with ``recipe`` (see the module doc).

    Args:
        inputs: Files, folders (searched recursively for ``*.onnx``) and glob patterns.
        outdir: The output folder (created); outputs mirror the inputs' trees below it.
        recipe: The recipe (see :mod:`onnxcompress.recipe`).
        jobs: Models compressed at once (default: the usable cores).
        force: Recompress models whose outputs are up to date, and overwrite outputs no earlier
            batch run wrote.
        max_memory: The loader's memory budget per model (see ``api.compress``).
        memory_budget: Bytes the concurrent jobs may use together (default: available RAM).
        executor: ``process`` (a pool of worker processes), ``inline`` (this process, one at a
            time; no protection from crashes) or ``dask`` (tasks on a Dask distributed cluster).
        scheduler: For ``dask``: the scheduler address (``tcp://host:8786``), or a
            ``distributed.Client`` / ``LocalCluster`` object (the API's way to test in-process).
        ship: For ``dask``: send the model bytes with each task and receive the outputs back
            (workers without the shared filesystem). Paths a recipe names explicitly (calibration,
            validation inputs outside the model's folder) must still be readable by the workers.
        on_event: Called in this process as ``(event, job, result)``: ``queued`` (result ``None``),
            ``start`` (``None``), ``done`` (the result; ``resumed`` when skipped).

    Returns:
        The report (also written to ``OUTDIR/batch-report.json`` and ``.csv``). Raises
        ``KeyboardInterrupt`` after writing the report when interrupted.

    Raises:
        OnnxCompressError: bad inputs, an output folder that is a file or overlaps an input model.
    """
    start = time.perf_counter()
    if executor not in ("process", "inline", "dask"):
        raise OnnxCompressError(f"unknown executor {executor!r}: choose process, inline or dask")
    if executor == "dask" and scheduler is None:
        raise OnnxCompressError("--executor dask needs --scheduler tcp://HOST:PORT (the Dask scheduler's address)")
    if executor != "dask" and (scheduler is not None or ship):
        raise OnnxCompressError("--scheduler and --ship-bytes go with --executor dask")
    client, own_client = _dask_client(scheduler) if executor == "dask" else (None, False)
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise OnnxCompressError(f"--jobs {jobs}: must be at least 1")
    out_root = Path(outdir)
    if out_root.exists() and not out_root.is_dir():
        raise OnnxCompressError(f"output folder {out_root} is a file")
    for item in inputs:
        p = Path(os.fspath(item))
        if p.is_dir() and (p.resolve() == out_root.resolve() or out_root.resolve() in p.resolve().parents):
            raise OnnxCompressError(f"output folder {out_root} would overwrite its input {p}: choose another one")
    planned = expand_inputs(inputs, out_root)
    if not planned:
        raise OnnxCompressError("no models to convert")
    for src, rel in planned:
        if (out_root / rel).resolve() == src.resolve():
            raise OnnxCompressError(f"output {out_root / rel} would overwrite its input: choose another output folder")
    out_root.mkdir(parents=True, exist_ok=True)
    # Temp folders of killed runs (SIGKILL leaves them; no process can clean up after it).
    for folder in {(out_root / rel).parent for _, rel in planned} | {out_root}:
        if folder.is_dir():
            io.clean_stale_temp(folder)
    recipe_text = recipe_mod.to_toml(recipe)
    prev = {} if force else load_previous(out_root)
    note = on_event or (lambda _e, _j, _r: None)
    budget = memory_budget if memory_budget is not None else int(available_memory() * 0.9)
    runner: _Runner | None = None
    if executor == "process" and not prev:
        # A first run (nothing to resume): start the workers now, so that their imports overlap the
        # hashing of the inputs below. A resumed run starts none unless something is left to do.
        runner = _Runner(recipe, max_memory, jobs, budget, note, lambda _j, _r: None)
        runner.start()

    all_jobs = [Job(src=src, out=out_root / rel, rel=rel) for src, rel in planned]
    results: dict[str, ModelResult] = {}
    todo: list[Job] = []
    for job in all_jobs:
        note("queued", job, None)
    for job in all_jobs:
        try:
            job.key, job.size = model_key(job.src, recipe_text, recipe)
        except OSError as exc:
            job.size = job.src.stat().st_size if job.src.exists() else 0
            log.debug("cannot hash %s: %s", job.src, exc)
        p = prev.get(job.rel)
        if p is not None and _up_to_date(job, p):
            r = dataclasses.replace(p, resumed=True, input=str(job.src), output=str(job.out))
            results[job.rel] = r
            note("done", job, r)
        elif job.out.exists() and p is None and not force:
            r = ModelResult(
                input=str(job.src),
                output=str(job.out),
                rel=job.rel,
                status=ERROR,
                reason=f"output {job.out} exists and no earlier batch run wrote it: pass --force to overwrite it",
                size_before=job.size,
                key=job.key,
            )
            results[job.rel] = r
            note("done", job, r)
        else:
            todo.append(job)

    report = BatchReport(outdir=str(out_root), results=[], recipe_text=recipe_text, jobs=jobs)

    def flush() -> None:
        report.results = [
            results.get(j.rel) or ModelResult(str(j.src), str(j.out), j.rel, NOT_RUN, size_before=j.size, key=j.key)
            for j in all_jobs
        ]
        report.seconds = time.perf_counter() - start
        _write_reports(report, out_root)

    def finished(job: Job, r: ModelResult) -> None:
        results[job.rel] = r
        note("done", job, r)
        flush()

    try:
        if executor == "dask" and todo:
            _DaskRunner(client, recipe, max_memory, ship, note, finished).run(todo)
        elif executor == "inline" or not todo:
            for job in todo:
                note("start", job, None)
                r = _run_job(job, recipe, max_memory)
                finished(job, r)
                if r.status == INTERRUPTED:
                    raise KeyboardInterrupt
        else:
            runner = runner or _Runner(recipe, max_memory, jobs, budget, note, finished)
            runner.finished = finished
            runner.run(todo)
    except KeyboardInterrupt:
        for job in todo:
            r = results.get(job.rel)
            if r is None:
                results[job.rel] = ModelResult(
                    str(job.src), str(job.out), job.rel, NOT_RUN, "interrupted before it started", job.size, key=job.key
                )
        report.interrupted = True
        flush()
        raise
    finally:
        if runner is not None:
            runner.stop()
        if own_client:
            with contextlib.suppress(Exception):
                client.close()
    flush()
    return report


# Each worker gets its share of the cores: numpy's BLAS and onnxruntime's sessions (validate.make_session
# reads ONNXCOMPRESS_THREADS), so N jobs do not fight over the same cores.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ONNXCOMPRESS_THREADS")


class _Runner:
    """Schedules jobs on a process pool within the job count and the memory budget.

    A worker that dies (a crash in native code, the OOM killer) breaks the pool: the models it held
    are retried alone on a fresh pool, and reported as errors if they kill it again.
    """

    def __init__(
        self,
        recipe: recipe_mod.Recipe,
        max_memory: int | None,
        jobs: int,
        budget: int,
        note: Event,
        finished: Callable[[Job, ModelResult], None],
        work: Callable[[Job, recipe_mod.Recipe, int | None], ModelResult] = _run_job,
    ) -> None:
        self.recipe, self.max_memory, self.jobs, self.budget = recipe, max_memory, jobs, budget
        self.note, self.finished, self.work = note, finished, work
        self.pool: cf.ProcessPoolExecutor | None = None
        self._saved_env: dict[str, str | None] | None = None

    def start(self) -> None:
        """Spawn the workers now (each imports the stack once), with their share of the cores.

        Workers inherit the environment at spawn: each gets cores/N threads for numpy's BLAS and
        onnxruntime (unless the user set them), so that N jobs do not fight over the cores. The
        variables stay set until :meth:`stop` (a pool rebuilt after a crash spawns with them too).
        """
        if self._saved_env is None:
            share = str(max(1, default_jobs() // self.jobs))
            self._saved_env = {k: os.environ.get(k) for k in _THREAD_VARS}
            for k in _THREAD_VARS:
                os.environ.setdefault(k, share)
        pool = self._pool()
        for _ in range(self.jobs):
            pool.submit(_warm_up)

    def stop(self) -> None:
        """Shut the pool down and restore the environment."""
        self._close(cancel=True)
        if self._saved_env is not None:
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._saved_env = None

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = cf.ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
            )
        return self.pool

    def _pick(self, pending: list[Job], running: dict[cf.Future[ModelResult], Job]) -> Job | None:
        if len(running) >= self.jobs:
            return None
        if any(j.attempts for j in running.values()):
            return None  # a retried job runs alone
        used = sum(j.memory for j in running.values())
        for job in pending:
            if job.attempts and running:
                continue
            if not running or used + job.memory <= self.budget:
                return job
        return None

    def run(self, todo: list[Job]) -> None:
        self.start()
        try:
            self._run(todo)
        finally:
            self.stop()

    def _run(self, todo: list[Job]) -> None:
        pending = list(todo)
        running: dict[cf.Future[ModelResult], Job] = {}
        try:
            while pending or running:
                while (job := self._pick(pending, running)) is not None:
                    pending.remove(job)
                    self.note("start", job, None)
                    running[self._pool().submit(self.work, job, self.recipe, self.max_memory)] = job
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                broken = False
                for fut in done:
                    job = running.pop(fut)
                    try:
                        r = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        if job.attempts >= 1:
                            self.finished(job, self._died(job))
                        else:
                            job.attempts += 1
                            pending.insert(0, job)
                        continue
                    except Exception as exc:  # pickling trouble and the like
                        r = ModelResult(
                            str(job.src), str(job.out), job.rel, ERROR, f"internal error ({_one_line(exc)})", job.size
                        )
                    self.finished(job, r)
                    if r.status == INTERRUPTED:
                        raise KeyboardInterrupt
                if broken:
                    for fut, job in list(running.items()):
                        running.pop(fut)
                        job.attempts += 1
                        pending.insert(0, job)
                    self._close(cancel=True)
        except KeyboardInterrupt:
            self._interrupt(running)
            raise
        finally:
            self._close(cancel=True)

    def _died(self, job: Job) -> ModelResult:
        return ModelResult(
            str(job.src),
            str(job.out),
            job.rel,
            ERROR,
            "the worker process died (a crash in native code, or killed for memory)",
            job.size,
            key=job.key,
        )

    def _interrupt(self, running: dict[cf.Future[ModelResult], Job]) -> None:
        """Stop the running workers and record what they finished or abandoned."""
        pool = self.pool
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    os.kill(proc.pid, signal.SIGINT)
        for fut, job in running.items():
            try:
                r = fut.result(timeout=60)
            except Exception:
                r = ModelResult(str(job.src), str(job.out), job.rel, INTERRUPTED, "interrupted", job.size, key=job.key)
            self.finished(job, r)

    def _close(self, cancel: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None


# --------------------------------------------------------------------------- Dask


def _dask_client(scheduler: Any) -> tuple[Any, bool]:
    """A ``distributed.Client`` for ``scheduler`` (an address, a Client or a cluster) and whether we own it.

    Raises:
        OnnxCompressError: ``distributed`` is not installed, or the scheduler cannot be reached.
    """
    try:
        import distributed
    except ImportError:
        raise OnnxCompressError("--executor dask needs the dask extra: pip install 'onnxcompress[dask]'") from None
    if isinstance(scheduler, distributed.Client):
        return scheduler, False
    try:
        if isinstance(scheduler, str):
            return distributed.Client(scheduler, timeout="20s", set_as_default=False), True
        return distributed.Client(scheduler, set_as_default=False), True  # a cluster object
    except (OSError, TimeoutError) as exc:
        raise OnnxCompressError(f"cannot reach the Dask scheduler {scheduler}: {_one_line(exc)}") from None


def _shipped_files(src: Path, recipe: recipe_mod.Recipe) -> list[Path]:
    """The files a worker needs beside the model: its external data and the sidecars in its folder."""
    folder = src.parent.resolve()
    extra = _external_files(src) + _sidecars(src, recipe)
    return [f for f in extra if f.resolve().parent == folder or folder in f.resolve().parents]


def _read_payload(job: Job, recipe: recipe_mod.Recipe) -> dict[str, bytes]:
    """The model's bytes and its companions', by path relative to the model's folder."""
    folder = job.src.parent.resolve()
    payload = {job.src.name: job.src.read_bytes()}
    for f in _shipped_files(job.src, recipe):
        payload[f.resolve().relative_to(folder).as_posix()] = f.read_bytes()
    return payload


def _run_shipped(
    job: Job, payload: dict[str, bytes], recipe: recipe_mod.Recipe, max_memory: int | None
) -> tuple[ModelResult, dict[str, bytes]]:
    """On a worker: rebuild the model's folder privately, compress it, return the result and output bytes."""
    with tempfile.TemporaryDirectory(prefix=f"{io.TMP_PREFIX}dask-") as d:
        root = Path(d)
        for rel, data in payload.items():
            p = root / "in" / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        local = dataclasses.replace(job, src=root / "in" / job.src.name, out=root / "out" / job.out.name)
        res = _run_job(local, recipe, max_memory)
        files = {Path(f).name: Path(f).read_bytes() for f in res.files} if res.status == OK else {}
    return res, files


def _place_shipped(job: Job, res: ModelResult, files: dict[str, bytes]) -> ModelResult:
    """Write a shipped result's output files beside ``job.out``: staged, then renamed (data first)."""
    res = dataclasses.replace(res, input=str(job.src), output=str(job.out), files=[])
    if res.status != OK:
        return res
    job.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{os.getpid()}-batch-", dir=job.out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for name in sorted(files, key=lambda n: n == job.out.name):
            os.replace(tmp / name, job.out.parent / name)
        for old in _owned_data(job.out):
            if old.name not in files:
                with contextlib.suppress(OSError):
                    old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.files = [str(job.out.parent / n) for n in files]
    res.output_sha256 = _sha256(job.out)
    return res


class _DaskRunner:
    """Runs each model as a task on a Dask distributed cluster; same results and reports as the pool.

    The cluster schedules the tasks (its workers' resources decide how many run at once). A worker
    that dies is retried by Dask; a model that keeps killing workers is reported as an error.
    """

    def __init__(
        self,
        client: Any,
        recipe: recipe_mod.Recipe,
        max_memory: int | None,
        ship: bool,
        note: Event,
        finished: Callable[[Job, ModelResult], None],
    ) -> None:
        self.client, self.recipe, self.max_memory, self.ship = client, recipe, max_memory, ship
        self.note, self.finished = note, finished

    def _submit(self, job: Job) -> Any:
        key = f"onnxcompress-{job.rel}-{os.urandom(4).hex()}"
        if self.ship:
            payload = _read_payload(job, self.recipe)
            return self.client.submit(_run_shipped, job, payload, self.recipe, self.max_memory, key=key, pure=False)
        return self.client.submit(_run_job, job, self.recipe, self.max_memory, key=key, pure=False)

    def run(self, todo: list[Job]) -> None:
        from distributed import as_completed

        futures: dict[Any, Job] = {}
        try:
            for job in todo:
                self.note("start", job, None)
                try:
                    futures[self._submit(job)] = job
                except OSError as exc:
                    self.finished(job, self._error(job, f"cannot read the model: {exc.strerror or exc}"))
            for fut in as_completed(list(futures), loop=self.client.loop):
                job = futures.pop(fut)
                try:
                    out = fut.result()
                    r = _place_shipped(job, *out) if self.ship else out
                except OSError as exc:
                    r = self._error(job, f"cannot write the output: {exc.strerror or exc}")
                except Exception as exc:  # KilledWorker, a lost scheduler, pickling trouble
                    r = self._error(job, f"the Dask task failed ({type(exc).__name__}: {_one_line(exc)})")
                self.finished(job, r)
        except KeyboardInterrupt:
            for fut, job in futures.items():
                with contextlib.suppress(Exception):
                    fut.cancel()
                self.finished(
                    job,
                    ModelResult(str(job.src), str(job.out), job.rel, INTERRUPTED, "interrupted", job.size, key=job.key),
                )
            raise

    @staticmethod
    def _error(job: Job, reason: str) -> ModelResult:
        return ModelResult(str(job.src), str(job.out), job.rel, ERROR, reason, job.size, key=job.key)
