"""The ``onnxcompress batch`` command: a recipe over many models, with progress and a summary.

``register(app)`` adds the command to the main typer app (``onnxcompress.cli``). The work is done by
:func:`onnxcompress.batch.run_batch`; this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import recipe as recipe_mod
from .io import parse_size
from .report import to_json

if TYPE_CHECKING:
    from . import batch as batch_mod

# onnxcompress.batch (multiprocessing, process pools) and rich.progress are imported by the command
# itself: every other command of the CLI starts without them.

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# batch_mod.OK, VALIDATION_FAILED, ERROR, INTERRUPTED, NOT_RUN (tests/test_cli_startup.py checks the keys)
_STYLE = {"ok": "green", "validation-failed": "yellow", "error": "red", "interrupted": "red", "not-run": "dim"}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _status(r: batch_mod.ModelResult) -> str:
    text = r.status + (" (resumed)" if r.resumed else "")
    return f"[{_STYLE.get(r.status, 'white')}]{text}[/]"


def _line(r: batch_mod.ModelResult) -> str:
    fid = f"cos {r.fidelity:.5f}" if r.fidelity is not None else "cos -"
    ratio = f"x{r.size_ratio:.3f}" if r.size_ratio is not None else ""
    head = f"{_status(r)} {r.rel}: {_size(r.size_before)} -> {_size(r.size_after)} {ratio} {fid} {r.seconds:.1f}s"
    return head + (f" [dim]({r.reason})[/]" if r.reason and r.status != "ok" else "")


def summary_table(report: batch_mod.BatchReport) -> Table:
    """One row per model: status, sizes, fidelity (worst-sample cosine), time."""
    t = Table(title=f"Batch: {len(report.results)} model(s) in {report.seconds:.1f}s, {report.jobs} job(s)")
    t.add_column("model", overflow="fold")
    t.add_column("status", no_wrap=True)
    for col in ("before", "after", "ratio", "cosine", "seconds"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in report.results:
        t.add_row(
            r.rel,
            _status(r),
            _size(r.size_before),
            _size(r.size_after),
            "-" if r.size_ratio is None else f"{r.size_ratio:.3f}",
            "-" if r.fidelity is None else f"{r.fidelity:.5f}",
            f"{r.seconds:.1f}",
        )
    return t


def batch(
    inputs: Annotated[
        list[str], typer.Argument(help="Model files, folders (searched recursively for *.onnx) or glob patterns.")
    ],
    outdir: Annotated[Path, typer.Option("--output", "-o", help="Output folder; outputs mirror the inputs' trees.")],
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            "-r",
            help=f"A recipe TOML file or a preset: {', '.join(recipe_mod.preset_names())}.",
        ),
    ],
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", help="Models compressed at once (default: the cores; fewer if RAM is short)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Recompress up-to-date models and overwrite outputs no batch run wrote."),
    ] = False,
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", help="Loader memory budget per model, e.g. 8G.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of tables.")] = False,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="process: a local pool of --jobs workers; dask: tasks on a Dask cluster (--scheduler); "
            "inline: this process, one at a time.",
        ),
    ] = "process",
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", help="The Dask scheduler's address for --executor dask, e.g. tcp://host:8786."),
    ] = None,
    ship_bytes: Annotated[
        bool,
        typer.Option(
            "--ship-bytes",
            help="With --executor dask: send each model's bytes to the workers and the outputs back "
            "(for workers that do not share this filesystem).",
        ),
    ] = False,
) -> None:
    """Compress many models with one recipe; resumable; writes OUTDIR/batch-report.json and .csv.

    Exit code: 0 all ok, 1 some failed validation, 2 some could not be processed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import batch as batch_mod

    r = recipe_mod.load_recipe(recipe)
    show = not json_out
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not (show and err.is_terminal),
    )
    running: set[str] = set()
    task: Any = None

    def on_event(event: str, job: batch_mod.Job, result: batch_mod.ModelResult | None) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("converting", total=0)
        if event == "queued":
            progress.update(task, total=(progress.tasks[0].total or 0) + 1)
        elif event == "start":
            running.add(job.rel)
        elif event == "done" and result is not None:
            running.discard(job.rel)
            progress.advance(task)
            if show:
                progress.console.print(_line(result), soft_wrap=True)
        if running:
            names = ", ".join(sorted(running)[:3]) + (" ..." if len(running) > 3 else "")
            progress.update(task, description=f"converting {names}")

    with progress:
        report = batch_mod.run_batch(
            inputs,
            outdir,
            r,
            jobs=jobs,
            force=force,
            max_memory=parse_size(max_memory) if max_memory else None,
            executor=executor,
            scheduler=scheduler,
            ship=ship_bytes,
            on_event=on_event,
        )
    if json_out:
        out.print_json(to_json(report.to_dict()))
    else:
        out.print(summary_table(report))
        for r in report.results:
            if r.status != batch_mod.OK:
                out.print(f"[{_STYLE.get(r.status, 'white')}]{r.status}[/] {r.rel}: {r.reason}", soft_wrap=True)
        c = report.counts()
        out.print(
            f"ok {c[batch_mod.OK]}, failed validation {c[batch_mod.VALIDATION_FAILED]}, "
            f"errors {c[batch_mod.ERROR]}, resumed {c['resumed']}; reports: "
            f"{Path(report.outdir) / batch_mod.REPORT_JSON}, {Path(report.outdir) / batch_mod.REPORT_CSV}"
        )
    if report.exit_code:
        raise typer.Exit(code=report.exit_code)


def register(app: typer.Typer) -> None:
    """Add the ``batch`` command to ``app`` (idempotent)."""
    if any(getattr(c, "name", None) == "batch" for c in app.registered_commands):
        return
    app.command(name="batch")(batch)
