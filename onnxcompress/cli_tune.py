"""The ``onnxcompress tune`` command: the smallest per-layer int4/int8/fp16/fp32 mixture within tolerance.

``register(app)`` adds the command to the CLI's typer app (``cli.py`` calls it once). No logic lives
here: the search is ``onnxcompress.tune``.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add ``tune`` to ``app`` (idempotent).

    (No ``from __future__ import annotations`` in this module: typer reads the option annotations,
    which name the shared options of ``cli``, imported here to avoid an import cycle.)
    """
    if any(getattr(c, "name", None) == "tune" for c in app.registered_commands):
        return
    from . import api, cli, html_report
    from . import feeds as feeds_mod
    from . import tune as tune_mod
    from .errors import OnnxCompressError, ValidationFailed
    from .passes.base import TARGETS
    from .recipes import build_passes
    from .report import to_json, write_json

    @app.command(name="tune")
    def tune(
        model: Annotated[Path, typer.Argument(help="The float .onnx model (never modified).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the tuned model.")],
        tolerance: Annotated[
            list[str] | None,
            typer.Option(
                "--tolerance",
                "-t",
                help="What must hold on the validation inputs (repeatable): cosine>=0.99, snr_db>=30, top1>=0.99, "
                "max_abs<=1e-2, accuracy_drop<=0.01 or relative_accuracy_drop<=0.01 (with --labels), "
                "optionally OUTPUT:metric... Default: cosine>=0.99.",
            ),
        ] = None,
        calibration: Annotated[
            Path | None,
            typer.Option(
                "--calibration",
                help="Inputs the search measures on (.npz of named inputs or a folder of them). Default: "
                "<model>.calibration.npz beside the model. Keep it separate from --inputs.",
            ),
        ] = None,
        inputs: cli.InputsOpt = None,
        shape: cli.ShapeOpt = None,
        int_high: cli.IntHighOpt = 100,
        labels: cli.LabelsOpt = None,
        label_output: cli.LabelOutputOpt = None,
        objective: Annotated[
            str,
            typer.Option(
                "--objective",
                help="size: fewest bytes. latency: the same forms (dequantized at load, float32 speed), and the "
                "result is timed against the original; a slower result is reported as such. transport: fewest "
                "packed bytes (onnxcompress pack): a ladder of entropy-coded bit widths q3..q8 per layer.",
            ),
        ] = "size",
        budget_seconds: Annotated[
            float | None,
            typer.Option("--budget-seconds", help="Stop refining the mixture after this many seconds."),
        ] = None,
        search_on: Annotated[
            str,
            typer.Option(
                "--search-on",
                help="inputs: raise precision until the tolerance holds on the validation inputs (sensitivity and "
                "GPTQ from the calibration data). calibration: judge on calibration data only (with --margin); the "
                "validation inputs stay a held-out final check.",
            ),
        ] = "inputs",
        seed: Annotated[
            int, typer.Option("--seed", help="Seed of the sensitivity samples (same seed, same model).")
        ] = 0,
        margin: Annotated[
            float,
            typer.Option(
                "--margin",
                help="Fraction of each tolerance's error allowance the search may use on the calibration data "
                "(the rest is headroom for the validation inputs).",
            ),
        ] = 0.8,
        precisions: Annotated[
            str,
            typer.Option(
                "--precisions",
                help="Precisions layers may take, comma-separated (fp32 always). Default: int4,int8,fp16,fp32; "
                "with --objective transport q3,q3.5,...,q8,fp16,fp32.",
            ),
        ] = "",
        ecr_lambda: Annotated[
            float,
            typer.Option(
                "--ecr-lambda",
                help="transport: entropy-constrained rounding multiplier in step^2 per bit (0: round to nearest).",
            ),
        ] = 0.0,
        pack: Annotated[
            bool,
            typer.Option("--pack", help="Also write the transport package OUTPUT.ocpk beside the output."),
        ] = False,
        target: Annotated[
            str,
            typer.Option("--target", help="standard (standard ONNX ops only) or onnxruntime (MatMulNBits, ...)."),
        ] = "standard",
        exclude: Annotated[
            list[str] | None,
            typer.Option("--exclude", "--keep-float", help="Keep matching nodes float32 (name, op type or regex)."),
        ] = None,
        fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Simplify the graph first (lossless).")] = True,
        report: cli.ReportOpt = None,
        json_out: cli.JsonOpt = False,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
        max_memory: cli.MaxMemoryOpt = None,
        parts: cli.PartsOpt = True,
        html: cli.HtmlOpt = None,
    ) -> None:
        """Find the smallest per-layer mixture of int4/int8/fp16/fp32 weights that holds the tolerances."""
        if html is not None:
            html_report.check_available()  # before any work
        tols = list(tolerance or ["cosine>=0.99"])
        tune_mod.parse_tolerances(tols)  # bad tolerances: exit 2 before any work
        if target not in TARGETS:
            raise OnnxCompressError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
        config = tune_mod.TuneConfig(
            objective=objective,
            seed=seed,
            margin=margin,
            budget_seconds=budget_seconds,
            precisions=tuple(p.strip() for p in precisions.split(",") if p.strip())
            or (tune_mod.TRANSPORT_PRECISIONS if objective == "transport" else tune_mod.PRECISIONS),
            ecr_lambda=ecr_lambda,
        )
        mem = cli.parse_size(max_memory) if max_memory else None
        m = api.load(model, max_memory=mem)
        api.check_runnable(m)
        feed_list, source, label_values = api.resolve_feeds(
            m,
            model,
            api.FeedOptions(
                inputs=inputs,
                shapes=feeds_mod.parse_shapes(shape),
                int_high=int_high,
                labels=labels,
                label_output=label_output,
            ),
        )
        calib_path = calibration if calibration is not None else feeds_mod.sidecar_calibration(model)
        calib = (
            feeds_mod.load_feeds(calib_path, feeds_mod.input_signature(m), what="calibration")
            if calib_path is not None
            else None
        )
        del m
        failed: ValidationFailed | None = None
        try:
            with cli._status() as update:
                r = tune_mod.tune_file(
                    model,
                    output,
                    tols,
                    feeds=feed_list,
                    calibration=calib,
                    labels=label_values,
                    label_output=label_output,
                    feeds_source=source,
                    calibration_source=str(calib_path) if calib_path is not None else None,
                    config=config,
                    target=target,
                    exclude=tuple(exclude or ()),
                    before=build_passes(["fold"]) if fold else [],
                    force=force,
                    parts=parts,
                    max_memory=mem,
                    progress=update,
                    search_on=search_on,
                )
        except ValidationFailed as exc:
            failed, r = exc, exc.report
        if r is None:
            raise failed  # type: ignore[misc]
        if pack and r.written:
            from . import transport

            stats = transport.pack(output, output.with_suffix(".ocpk"), force=force)
            r.output["package"] = str(output.with_suffix(".ocpk"))
            r.output["transport_bytes"] = int(stats["package_bytes"])
            r.output["transport_ratio"] = round(int(stats["package_bytes"]) / r.input["size_bytes"], 6)
        data = r.to_dict()
        if report:
            write_json(data, report)
        if html is not None:
            errors = html_report.errors_from_models(model, output, feed_list) if r.written else {}
            precision_map = [
                {"layer": la["tensor"], "op": la["op"], "precision": la["precision"], "reason": la["why"],
                 "bytes": la["bytes"]}
                for la in data["tune"]["layers"]
            ]  # fmt: skip
            html_report.write_html(
                html,
                "tune",
                {**data, "layers": precision_map},
                extra={"original": model, "candidate": output, "errors": errors},
            )
        if json_out:
            sys.stdout.write(to_json(data) + "\n")
        else:
            table = Table(title=f"Per-layer precision ({len(r.result.layers)} layers)")
            for col in ("tensor", "op", "shape", "precision", "bytes", "why"):
                table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
            for la in r.result.layers:
                table.add_row(
                    la.tensor,
                    la.op,
                    "x".join(map(str, la.shape)),
                    la.precision,
                    f"{la.bytes.get(la.precision, 0):,}",
                    la.why,
                )
            for f in r.result.fixed:
                table.add_row(f["tensor"], "-", "-", f["precision"], "-", f["why"])
            cli.out.print(table)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(r.result.precision_counts().items()))
            cli.out.print(
                f"size: {r.input['size_bytes']:,} -> {r.output['size_bytes']:,} bytes (ratio {r.size_ratio:.3f}); "
                f"layers: {counts}; {r.result.evaluations} evaluations in {r.seconds:.1f}s"
            )
            if r.output.get("transport_bytes") is not None:
                cli.out.print(
                    f"package: {r.output['transport_bytes']:,} bytes (ratio {r.output['transport_ratio']:.4f} of the "
                    "input file)"
                )
            if r.latency:
                cli.out.print(f"latency ratio (1 thread): {r.latency['ratio']:.3f}")
            for w in r.warnings:
                cli.out.print(f"[yellow]warning:[/] {w}")
            if r.validation is not None:
                cli._print_validation(r.validation)
            cli.out.print(f"written: {r.output['path']}" if r.written else "[red]not written[/]")
        if failed is not None:
            raise failed
