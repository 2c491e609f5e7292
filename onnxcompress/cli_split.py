"""The ``onnxcompress split`` and ``onnxcompress run`` commands.

``register(app)`` adds both to the CLI's typer app (``cli.py`` calls it once). No logic lives here: the
work is ``onnxcompress.split`` (planning, writing) and ``onnxcompress.runner`` (running the parts).
"""

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    """Add ``split`` and ``run`` to ``app`` (idempotent).

    (No ``from __future__ import annotations`` in this module: typer reads the option annotations,
    which name the shared options of ``cli``, imported here to avoid an import cycle.)
    """
    if any(getattr(c, "name", None) == "split" for c in app.registered_commands):
        return
    from . import cli
    from . import feeds as feeds_mod
    from .errors import OnnxCompressError
    from .report import to_json, write_json
    from .runner import SplitModel
    from .split import BALANCES, describe, split_model

    @app.command(name="split")
    def split(
        model: Annotated[Path, typer.Argument(help="The .onnx model to split (never modified).")],
        output: Annotated[
            Path, typer.Option("--output", "-o", help="The folder to write the parts and manifest.json into.")
        ],
        max_part_size: Annotated[
            str | None,
            typer.Option("--max-part-size", help="Most weight bytes per part, e.g. 50MB, 300MB, 1.5GB."),
        ] = None,
        parts: Annotated[int | None, typer.Option("--parts", help="Exact number of parts.")] = None,
        balance: Annotated[
            str,
            typer.Option("--balance", help="Balance --parts by weight bytes (size) or estimated FLOPs (flops)."),
        ] = "size",
        shape: cli.ShapeOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Replace OUTDIR when it holds an earlier split.")] = False,
        report: cli.ReportOpt = None,
        json_out: cli.JsonOpt = False,
        max_memory: cli.MaxMemoryOpt = None,
    ) -> None:
        """Cut a model into parts that fit a size budget (or N balanced parts), cutting where few activations cross."""
        if balance not in BALANCES:
            raise OnnxCompressError(f"--balance {balance!r}: use one of {', '.join(BALANCES)}")
        if max_part_size is None and parts is None:
            raise OnnxCompressError("split needs --max-part-size SIZE or --parts N")
        with cli._status() as update:
            update("planning and writing parts")
            r = split_model(
                model,
                output,
                max_part_size=cli.parse_size(max_part_size) if max_part_size else None,
                parts=parts,
                balance=balance,
                force=force,
                shapes=feeds_mod.parse_shapes(shape),
                max_memory=cli.parse_size(max_memory) if max_memory else None,
            )
        data = r.to_dict()
        if report:
            write_json(data, report)
        if json_out:
            cli.out.print_json(to_json(data))
            return
        m = r.manifest
        table = Table(
            title=f"{model.name} split into {len(m['parts'])} parts in {output}",
            caption="crossing: estimated bytes of activations passed to later parts (symbolic dims as 1).",
        )
        for col in ("part", "nodes", "weights", "GFLOPs", "first .. last node", "crossing after", "tensors crossing"):
            table.add_column(col, justify="left" if "node" in col or "tensors" in col else "right", overflow="fold")
        for row in describe(m):
            table.add_row(
                str(row["part"]),
                str(row["nodes"]),
                _mb(row["weight_bytes"]),
                f"{row['flops'] / 1e9:.3f}",
                f"{row['first_node']} .. {row['last_node']}",
                "-" if row["cut_after_bytes"] is None else f"{row['cut_after_bytes']:.0f} B",
                ", ".join(row["cut_after_tensors"][:6]) + (" ..." if len(row["cut_after_tensors"]) > 6 else ""),
            )
        cli.out.print(table)
        st = m["stats"]
        shared = m["shared_weights"]
        cli.out.print(
            f"largest part {_mb(st['largest_part_bytes'])} (mean {_mb(st['mean_part_bytes'])}); "
            f"{len(shared)} shared weight(s) duplicated ({_mb(st['duplicated_bytes'])}); {r.seconds:.2f}s",
            markup=False,
        )

    @app.command(name="run")
    def run_split(
        splitdir: Annotated[Path, typer.Argument(help="A folder written by onnxcompress split.")],
        inputs: Annotated[
            Path, typer.Option("--inputs", help="A .npz of named inputs (one feed) or a folder of them.")
        ],
        resident: Annotated[
            int,
            typer.Option("--resident", min=1, help="Parts kept loaded at once (1: one at a time, freed after use)."),
        ] = 1,
        output: Annotated[
            Path | None,
            typer.Option(
                "--output", help="Write the outputs to this .npz (keys: output names; NAME.i per feed when several)."
            ),
        ] = None,
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Run a split model part after part in onnxruntime (each part's hash checked before it loads)."""
        model = SplitModel(splitdir, resident=resident)
        feed_list = feeds_mod.load_feeds(inputs, model.input_signature())
        results = model.run_many(feed_list)
        model.close()
        if output is not None:
            if output.suffix != ".npz":
                raise OnnxCompressError(f"--output {output}: give a .npz file name")
            if len(feed_list) == 1:
                arrays = {name: values[0] for name, values in results.items()}
            else:
                arrays = {f"{name}.{i}": v for name, values in results.items() for i, v in enumerate(values)}
            try:
                np.savez(output, **arrays)  # type: ignore[arg-type]
            except OSError as exc:
                raise OnnxCompressError(f"cannot write {output}: {exc.strerror or exc}") from None
        summary = {
            "parts": len(model),
            "loads": model.loads,
            "feeds": len(feed_list),
            "outputs": {n: [list(v.shape) for v in values] for n, values in results.items()},
        }
        if json_out:
            cli.out.print_json(to_json(summary))
            return
        table = Table(title=f"{splitdir}: {len(model)} parts, {len(feed_list)} feed(s), {model.loads} part loads")
        for col in ("output", "dtype", "shape (first feed)"):
            table.add_column(col)
        for name, values in results.items():
            table.add_row(name, str(values[0].dtype), str(list(values[0].shape)))
        cli.out.print(table)
        if output is not None:
            cli.out.print(f"wrote {output}", markup=False)
