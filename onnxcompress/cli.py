"""The ``onnxcompress`` command line: parse options, call the API, print. No logic lives here.

Exit codes, everywhere: 0 ok, 1 validation failed, 2 bad input or usage (one line on stderr, never a
traceback).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import api, cli_batch
from . import recipe as recipe_mod
from .cli_diagnose import register as register_diagnose
from .cli_split import register as register_split
from .cli_transport import register as register_transport
from .cli_tune import register as register_tune
from .errors import OnnxCompressError, ValidationFailed
from .feeds import parse_shapes
from .io import parse_size
from .passes.base import Params
from .recipes import PASSES
from .report import to_json, write_json
from .stats import summarize
from .validate import ValidationReport

app = typer.Typer(
    name="onnxcompress",
    help="Compress ONNX models (quantize, fold, prune, ...) and validate the result in onnxruntime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# Shared options, defined once.
InputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        help="A .npz of named inputs (one feed) or a folder of them. Default: <model>.inputs.npz beside the model, else generated.",
    ),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        help="Dims for a dynamic input of generated feeds, e.g. input=1x3x224x224 (repeatable). Unset dynamic dims are 1.",
    ),
]
IntHighOpt = Annotated[int, typer.Option("--int-high", help="Generated integer inputs are drawn from [0, INT_HIGH).")]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        help="Integer labels (.npy) for accuracy. Default: <model>.labels.npy beside the model with its sidecar inputs.",
    ),
]
LabelOutputOpt = Annotated[
    str | None,
    typer.Option("--label-output", help="Output holding class scores for --labels (default: the first output)."),
]
ToleranceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tolerance",
        "-t",
        help="A bound such as cosine>=0.999, top1>=0.99, max_abs<=1e-3, snr_db>=30, accuracy_drop<=0.005; optionally OUTPUT:metric... (repeatable). Default: the technique's.",
    ),
]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the full JSON report here.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report instead of tables.")]
HtmlOpt = Annotated[
    Path | None,
    typer.Option(
        "--html",
        help="Also write a self-contained HTML report (charts included; opens offline). "
        "Needs the html extra: pip install 'onnxcompress[html]'.",
    ),
]
PartsOpt = Annotated[
    bool,
    typer.Option(
        "--parts/--no-parts",
        help="Also compare each concatenated part of outputs produced by a Concat (e.g. boxes next to scores) "
        "and gate the tolerances on the worst part.",
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option("--max-memory", help="Memory budget for declared tensor sizes, e.g. 8G (default: 75% of RAM)."),
]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _feed_options(
    inputs: Path | None, shape: list[str] | None, int_high: int, labels: Path | None, label_output: str | None
) -> api.FeedOptions:
    return api.FeedOptions(
        inputs=inputs, shapes=parse_shapes(shape), int_high=int_high, labels=labels, label_output=label_output
    )


@contextlib.contextmanager
def _status() -> Iterator[Callable[[str], None]]:
    """A spinner on stderr with the current stage, when stderr is a terminal (silent otherwise)."""
    if not err.is_terminal:
        yield lambda _message: None
        return
    with err.status("starting") as status:
        yield lambda message: status.update(message)


def _html_outputs(html: Path | None) -> tuple[dict[str, Any], Callable[..., None] | None]:
    """For ``--html``: check the extra is installed (before any work), and a validation hook that keeps
    each output's per-sample errors for the report's histograms."""
    if html is None:
        return {}, None
    from . import html_report  # only for --html: its imports are not paid by other runs

    html_report.check_available()
    errors: dict[str, Any] = {}

    def keep(ref: dict[str, list[Any]], cand: dict[str, list[Any]]) -> None:
        errors.update({n: html_report.sample_errors(ref[n], cand[n]) for n in ref if n in cand})

    return errors, keep


def _fmt(value: Any, spec: str = ".6g") -> str:
    return "-" if value is None else format(value, spec)


def _validation_table(report: ValidationReport) -> Table:
    table = Table(
        title=f"Validation on {report.num_feeds} feed(s), {report.num_samples} sample(s) ({report.feeds_source})"
    )
    for col in ("output", "max_abs", "mean_abs", "cosine (worst)", "snr_db", "top1", "result"):
        table.add_column(col, justify="right" if col not in ("output", "result") else "left", overflow="fold")
    for d in report.outputs.values():
        table.add_row(
            d.name,
            _fmt(d.max_abs, ".3g"),
            _fmt(d.mean_abs, ".3g"),
            _fmt(d.cosine, ".6f"),
            _fmt(d.snr_db, ".1f"),
            _fmt(d.top1_agreement, ".4f"),
            "pass" if d.passed else "FAIL",
        )
        for p in d.parts:
            table.add_row(
                escape(f"  [{p.index}] {p.tensor} {p.slice}"),
                _fmt(p.max_abs, ".3g"),
                _fmt(p.mean_abs, ".3g"),
                _fmt(p.cosine, ".6f"),
                _fmt(p.snr_db, ".1f"),
                _fmt(p.top1_agreement, ".4f"),
                "pass" if p.passed else "FAIL",
            )
    return table


def _print_validation(report: ValidationReport) -> None:
    out.print(_validation_table(report))
    if report.accuracy is not None:
        acc = report.accuracy
        out.print(
            f"accuracy ({acc['output']}): original {acc['original']:.4f}, candidate {acc['candidate']:.4f}, "
            f"drop {acc['drop'] * 100:+.2f} points"
        )
    out.print(f"tolerances: {', '.join(report.tolerances)}")
    out.print("validation: [green]passed[/]" if report.passed else "validation: [red]FAILED[/]")


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="The .onnx model.")],
    json_out: JsonOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Show sizes, parameters, bytes by dtype, ops, opsets, inputs/outputs and largest weights."""
    m = api.load(model, max_memory=parse_size(max_memory) if max_memory else None)
    s = summarize(m)
    if json_out:
        out.print_json(to_json(s.to_dict()))
        return
    out.print(
        f"[bold]{s.path}[/]: {s.size_bytes:,} bytes ({s.external_data_bytes:,} external), "
        f"{s.parameters:,} parameters, {s.nodes} nodes, {s.subgraphs} subgraphs, IR {s.ir_version}, "
        f"opsets {', '.join(f'{k}={v}' for k, v in s.opsets.items())}"
    )
    io_table = Table(title="Inputs and outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind, items in (("input", s.inputs), ("output", s.outputs)):
        for t in items:
            shape = (
                "?" if t["shape"] is None else "[" + ", ".join("?" if d is None else str(d) for d in t["shape"]) + "]"
            )
            io_table.add_row(kind, t["name"], t["dtype"], shape)
    out.print(io_table)
    dt = Table(title="Bytes by dtype")
    dt.add_column("dtype")
    dt.add_column("bytes", justify="right")
    for k, v in s.bytes_by_dtype.items():
        dt.add_row(k, f"{v:,}")
    out.print(dt)
    ops = Table(title="Ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for k, v in s.ops.items():
        ops.add_row(k, str(v))
    out.print(ops)
    big = Table(title="Largest initializers")
    for col in ("name", "dtype", "shape", "bytes"):
        big.add_column(col, justify="right" if col == "bytes" else "left")
    for t in s.largest_initializers:
        big.add_row(t["name"], t["dtype"], str(t["shape"]), f"{t['bytes']:,}")
    out.print(big)


@app.command()
def validate(
    original: Annotated[Path, typer.Argument(help="The reference model.")],
    candidate: Annotated[Path, typer.Argument(help="The model to check against it.")],
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    int_high: IntHighOpt = 100,
    labels: LabelsOpt = None,
    label_output: LabelOutputOpt = None,
    tolerance: ToleranceOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    max_memory: MaxMemoryOpt = None,
    parts: PartsOpt = True,
    html: HtmlOpt = None,
) -> None:
    """Run both models in onnxruntime on the same inputs and compare every output (exit 1 on failure)."""
    errors, keep = _html_outputs(html)
    r = api.validate(
        original,
        candidate,
        feeds=_feed_options(inputs, shape, int_high, labels, label_output),
        tolerances=tolerance,
        max_memory=parse_size(max_memory) if max_memory else None,
        parts=parts,
        on_outputs=keep,
    )
    if report:
        write_json(r.to_dict(), report)
    if html:
        extra = {"original": original, "candidate": candidate, "errors": errors}
        from . import html_report

        html_report.write_html(html, "validate", r.to_dict(), extra=extra)
    if json_out:
        out.print_json(to_json(r.to_dict()))
    else:
        _print_validation(r)
    if not r.passed:
        raise ValidationFailed(f"validation failed: {r.failures[0]}", r)


@app.command()
def compress(
    model: Annotated[Path | None, typer.Argument(help="The .onnx model to compress (never modified).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the compressed model.")] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            "-r",
            help="A recipe TOML file, or a preset: edge-int8, edge-int4, fp16, max-compression. It sets the "
            "passes; --calibration, --target, --inputs, --tolerance and the other data options override it.",
        ),
    ] = None,
    print_recipe: Annotated[
        bool,
        typer.Option("--print-recipe", help="Print these options as a recipe (TOML) and exit; run it with --recipe."),
    ] = False,
    fold: Annotated[
        bool | None,
        typer.Option(
            "--fold/--no-fold",
            help="Simplify the graph (constant folding, fusions, dead code; lossless). Alone: fold only. "
            "With other techniques it runs first by default; --no-fold skips it.",
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            "-q",
            help="Quantization mode: int8-dynamic (integer MatMul kernels), int8-static (QDQ, needs --calibration), "
            "int4 (block-wise; GPTQ with --calibration), fp16, bf16, auto, int8-weights (blocks of 32, "
            "dequantized at load), int8-weights-qdq or int8-weights-per-tensor.",
        ),
    ] = None,
    technique: Annotated[
        list[str] | None,
        typer.Option("--technique", help=f"Any registered pass, in order (repeatable): {', '.join(PASSES)}."),
    ] = None,
    prune: Annotated[
        float | None,
        typer.Option(
            "--prune",
            help="Prune this fraction of the weights (unstructured, per layer; e.g. 0.5), or of the channels "
            "with --prune-mode channels. Never biases or norm parameters. Refits with --calibration.",
        ),
    ] = None,
    prune_mode: Annotated[
        str | None,
        typer.Option(
            "--prune-mode",
            help="unstructured (default), 2:4 or 4:8 (N:M along the reduction axis), or channels "
            "(structured: removes whole channels/neurons and what depends on them).",
        ),
    ] = None,
    lowrank: Annotated[
        str | None,
        typer.Option(
            "--lowrank",
            help="SVD factorisation of MatMul/Gemm (and 1x1 Conv) weights where it saves parameters: "
            "energy=0.95 (keep that share of the spectrum), ratio=0.5 (of the full rank) or rank=N; "
            "activation-weighted with --calibration.",
        ),
    ] = None,
    cluster: Annotated[
        int | None,
        typer.Option(
            "--cluster",
            help="Weight sharing: k-means with K centroids per tensor (2..256; K<=16 packs 4-bit indices).",
        ),
    ] = None,
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    int_high: Annotated[
        int | None,
        typer.Option("--int-high", help="Generated integer inputs are drawn from [0, INT_HIGH) (default 100)."),
    ] = None,
    labels: LabelsOpt = None,
    label_output: LabelOutputOpt = None,
    tolerance: ToleranceOpt = None,
    report: ReportOpt = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration inputs for int8-static / GPTQ (.npz of named inputs or a folder of them). "
            "Default: <model>.calibration.npz beside the model. Keep it separate from the validation --inputs.",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="standard: only standard ONNX ops (runs on any ONNX runtime); onnxruntime: also onnxruntime "
            "contrib ops (MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul, ...). Default: standard.",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            "--keep-float",
            help="Leave matching nodes in float (repeatable): a node name, an op type, or a regex on node names.",
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="A technique setting KEY=VALUE (repeatable), e.g. block_size=64, method=entropy; see the README.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing output, and write it even if validation fails.")
    ] = False,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Store tensors in OUTPUT.data (default: as the input model, and always over ~1.8 GB).",
        ),
    ] = None,
    skip_validation: Annotated[
        bool, typer.Option("--skip-validation", help="Write without validating (not recommended).")
    ] = False,
    json_out: JsonOpt = False,
    max_memory: MaxMemoryOpt = None,
    parts: PartsOpt = True,
    html: HtmlOpt = None,
    split_max_part_size: Annotated[
        str | None,
        typer.Option(
            "--split-max-part-size",
            help="Then split the written model into parts of at most SIZE of weights each (e.g. 50MB), in "
            "OUTPUT's folder as <output stem>.parts/ (see `onnxcompress split`; run them with `onnxcompress run`).",
        ),
    ] = None,
    split_dir: Annotated[
        Path | None,
        typer.Option("--split-dir", help="Where --split-max-part-size writes the parts (default: OUTPUT.parts/)."),
    ] = None,
    write_compressed: Annotated[
        list[str] | None,
        typer.Option(
            "--write-compressed",
            help="Also write OUTPUT.gz (gzip -9) or OUTPUT.zst (zstd -19; needs zstandard) beside the output "
            "(repeatable), for download-size-bound deployments; their bytes are in the report (output.compressed).",
        ),
    ] = None,
    pack: Annotated[
        bool,
        typer.Option(
            "--pack",
            help="Also write the transport package OUTPUT.ocpk beside the output (entropy-coded; "
            "`onnxcompress unpack` restores the output bit for bit).",
        ),
    ] = False,
    transport_size: Annotated[
        bool,
        typer.Option(
            "--transport-size/--no-transport-size",
            help="Report output.transport_bytes, the packed size (a coding pass: ~0.5-1 s of CPU per 45-90 MB of float weights, ~5 s for 23 MB of int8 symbols).",
        ),
    ] = True,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="The previous release's compressed model (with -q int8-weights): reuse its scales and keep its "
            "int8 symbols where the new weights round to them, so `onnxcompress diff OLD NEW` patches are small.",
        ),
    ] = None,
) -> None:
    """Compress MODEL into OUTPUT, validate it against MODEL, and write it only if it passes."""
    if split_dir is not None and split_max_part_size is None:
        raise OnnxCompressError("--split-dir goes with --split-max-part-size")
    split_opts = (
        api.SplitOptions(max_part_size=split_max_part_size, outdir=str(split_dir) if split_dir else None)
        if split_max_part_size is not None
        else None
    )
    if split_opts is not None:
        split_opts.check()
    data_options = {
        "calibration": calibration,
        "target": target,
        "tolerance": tolerance,
        "inputs": inputs,
        "shape": shape,
        "int_high": int_high,
        "labels": labels,
        "label_output": label_output,
        "skip_validation": skip_validation,
        "external_data": external_data,
        "split": split_opts,
        "write_compressed": list(write_compressed or []),
        "pack": pack,
        "transport_size": transport_size,
        "base": base,
    }
    structural, structural_params = recipe_mod.structural_options(
        prune=prune, prune_mode=prune_mode, lowrank=lowrank, cluster=cluster
    )
    # Pipeline order: fold (added below unless --no-fold), structural passes, quantization, --technique.
    ordered = structural + ([quantize] if quantize else []) + list(technique or [])
    all_params = structural_params + list(param or [])
    rec: recipe_mod.Recipe | None = None
    if recipe is not None:
        given = [
            flag
            for flag, v in (
                ("--fold/--no-fold", fold),
                ("--quantize", quantize),
                ("--technique", technique),
                ("--prune/--prune-mode", prune is not None or prune_mode is not None),
                ("--lowrank", lowrank),
                ("--cluster", cluster is not None),
                ("--exclude", exclude),
                ("--param", param),
            )
            if v
        ]
        if fold is not None and "--fold/--no-fold" not in given:
            given.insert(0, "--fold/--no-fold")
        if given:
            raise OnnxCompressError(f"--recipe sets the passes: drop {given[0]} or put it in the recipe")
        rec = recipe_mod.override(recipe_mod.load_recipe(recipe), **data_options)
    elif print_recipe:
        rec = recipe_mod.recipe_from_options(
            fold=fold, technique=ordered, exclude=exclude, param=all_params, **data_options
        )
    if print_recipe:
        assert rec is not None
        sys.stdout.write(recipe_mod.to_toml(rec))
        return
    if model is None or output is None:
        raise OnnxCompressError("missing " + ("MODEL" if model is None else "--output/-o") + ": see --help")
    errors, keep = _html_outputs(html)
    failed: ValidationFailed | None = None
    try:
        with _status() as update:
            if rec is not None:
                r = recipe_mod.compress(
                    rec,
                    model,
                    output,
                    force=force,
                    max_memory=parse_size(max_memory) if max_memory else None,
                    progress=update,
                    parts=parts,
                    on_outputs=keep,
                )
            else:
                techniques = (["fold"] if fold else []) + ordered
                if not techniques:
                    raise OnnxCompressError("nothing to do: choose a technique, e.g. --quantize int8-weights")
                r = api.compress(
                    model,
                    output,
                    techniques,
                    feeds=_feed_options(inputs, shape, 100 if int_high is None else int_high, labels, label_output),
                    tolerances=tolerance,
                    force=force,
                    external_data=external_data,
                    max_memory=parse_size(max_memory) if max_memory else None,
                    validate=not skip_validation,
                    progress=update,
                    calibration=calibration,
                    target=target or "standard",
                    exclude=list(exclude or []),
                    fold=fold is not False,
                    params=Params.parse(all_params).items,
                    parts=parts,
                    on_outputs=keep,
                    split=split_opts,
                    write_compressed=list(write_compressed or []),
                    pack=pack,
                    transport_size=transport_size,
                    base=base,
                )
    except ValidationFailed as exc:
        failed, r = exc, exc.report
    if report:
        write_json(r.to_dict(), report)
    if html:
        extra = {"original": model, "candidate": output, "errors": errors}
        from . import html_report

        html_report.write_html(html, "compress", r.to_dict(), extra=extra)
    if json_out:
        out.print_json(to_json(r.to_dict()))
    else:
        t = Table(title="Compression")
        for col in ("pass", "changed", "seconds", "nodes", "weight bytes", "skipped"):
            t.add_column(col, justify="left" if col == "pass" else "right")
        for p in r.passes:
            st = p.stats
            t.add_row(
                p.name,
                "yes" if p.modified else "no",
                f"{p.seconds:.3f}",
                f"{st.get('nodes_before', '?')} -> {st.get('nodes_after', '?')}",
                f"{st.get('bytes_before', 0):,} -> {st.get('bytes_after', 0):,}",
                str(len(p.skipped)),
            )
        out.print(t)
        out.print(
            f"size: {r.input['size_bytes']:,} -> {r.output['size_bytes']:,} bytes "
            f"(ratio {r.size_ratio:.3f}) in {r.seconds:.2f}s"
        )
        if r.validation is not None:
            _print_validation(r.validation)
        out.print(f"written: {r.output['path']}" if r.written else "[red]not written[/]")
        if r.output.get("transport_bytes") is not None:
            tb = r.output["transport_bytes"]
            where = f": {r.output['package']['path']}" if r.output.get("package") else " (--pack writes it)"
            out.print(f"transport package: {tb:,} bytes (ratio {tb / r.input['size_bytes']:.3f} to the input){where}")
        for fmt, c in (r.output.get("compressed") or {}).items():
            out.print(
                f"{fmt} copy: {c['bytes']:,} bytes (ratio {c['ratio']:.3f} to the input): {', '.join(c['files'])}"
            )
        if r.split is not None:
            sizes = [p.get("weight_bytes", 0) for p in r.split.get("parts", [])]
            out.print(
                f"split into {len(sizes)} parts (largest {max(sizes, default=0):,} bytes of weights): {r.split['outdir']}"
            )
    if failed is not None:
        raise failed


cli_batch.register(app)
register_diagnose(app)
register_tune(app)
register_transport(app)
register_split(app)


def _one_line(exc: BaseException) -> str:
    """The message on one line: names taken from a model may hold newlines or control characters."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(exc))


_FROZEN = [False]


def _freeze_imports() -> None:
    """Move the objects alive now (the imported modules: numpy, onnx, typer, ...) out of the garbage
    collector's sight, once per process: each full collection of a run (``release_memory`` runs a few:
    MiniLM ~30 ms each) then scans only the objects made since, never the imports' ~50k.
    Only for the command line itself (``main()`` reading ``sys.argv``): a process that calls ``main``
    with arguments (tests, scripts) may hold garbage that freezing would keep forever."""
    if not _FROZEN[0]:
        _FROZEN[0] = True
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every error becomes one line on stderr.

    Usage errors are reported by typer (exit 2); errors from the library are caught here.
    """
    if argv is None:
        _freeze_imports()
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="onnxcompress", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except ValidationFailed as exc:
        err.print(f"onnxcompress: {_one_line(exc)}", markup=False, soft_wrap=True)
        return 1
    except OnnxCompressError as exc:
        err.print(f"error: {_one_line(exc)}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("onnxcompress: interrupted")
        return 2
    except MemoryError:
        err.print("error: out of memory: lower the work size or raise the available memory", soft_wrap=True)
        return 2
    except Exception as exc:  # last resort: one line, never a traceback
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"error: internal error ({type(exc).__name__}: {first}); rerun with -v and report it",
            markup=False,
            soft_wrap=True,
        )
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
