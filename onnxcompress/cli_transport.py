"""The ``pack``, ``unpack``, ``diff`` and ``patch`` commands: ship a model in the fewest bytes.

``register(app)`` adds them to the CLI's typer app (``cli.py`` calls it once). No logic lives here:
the work is ``onnxcompress.transport``. Errors (corrupt package, wrong base, existing output) are
``OnnxCompressError``: one line, exit 2, nothing written.
"""

import time
from pathlib import Path
from typing import Annotated, Any

import typer

ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]


def _size(n: int) -> str:
    return f"{n:,} bytes"


def register(app: typer.Typer) -> None:
    """Add ``pack``, ``unpack``, ``diff`` and ``patch`` to ``app`` (idempotent).

    (No ``from __future__ import annotations`` here: typer reads the annotations at runtime.)
    """
    if any(getattr(c, "name", None) == "pack" for c in app.registered_commands):
        return
    import importlib

    from . import cli
    from .report import to_json, write_json

    def tr() -> Any:
        """onnxcompress.transport (its codecs), imported when one of these commands runs."""
        return importlib.import_module(".transport", __package__)

    def _finish(data: dict[str, Any], report: Path | None, json_out: bool, lines: list[str]) -> None:
        if report:
            write_json(data, report)
        if json_out:
            cli.out.print_json(to_json(data))
            return
        for line in lines:
            cli.out.print(line, markup=False)

    @app.command(name="pack")
    def pack(
        model: Annotated[Path, typer.Argument(help="The .onnx model to pack (its external data comes along).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="The package to write (e.g. MODEL.ocpk).")],
        force: ForceOpt = False,
        report: cli.ReportOpt = None,
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Pack MODEL into a transport package: every tensor entropy-coded by kind, restored bit-identical."""
        s = tr().pack(model, output, force=force)
        _finish(
            s,
            report,
            json_out,
            [
                f"packed {len(s['files'])} file(s), {s['tensors']} tensors: {_size(s['input_bytes'])} -> "
                f"{_size(s['package_bytes'])} (ratio {s['ratio']:.4f}) in {s['seconds']:.2f}s",
                f"written: {output}",
            ],
        )

    @app.command(name="unpack")
    def unpack(
        package: Annotated[Path, typer.Argument(help="A package written by pack.")],
        output: Annotated[
            Path, typer.Option("--output", "-o", help="The .onnx file to restore (data files beside it).")
        ],
        force: ForceOpt = False,
        report: cli.ReportOpt = None,
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Restore the model in PACKAGE, checking every tensor and file hash (nothing is written on a mismatch)."""
        t0 = time.perf_counter()
        r = tr().unpack(package, output, force=force)
        _finish(
            r,
            report,
            json_out,
            [f"restored {len(r['files'])} file(s), sha256 verified, in {time.perf_counter() - t0:.2f}s"]
            + [f"written: {p}" for p in r["written"]],
        )

    @app.command(name="diff")
    def diff(
        old: Annotated[Path, typer.Argument(help="The model devices already have.")],
        new: Annotated[Path, typer.Argument(help="The new version to ship.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="The patch to write (e.g. PATCH.ocpd).")],
        force: ForceOpt = False,
        report: cli.ReportOpt = None,
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Write a patch that turns OLD into NEW exactly (tensors coded as deltas against OLD's)."""
        s = tr().diff(old, new, output, force=force)
        _finish(
            s,
            report,
            json_out,
            [
                f"patch: {_size(s['package_bytes'])} for {_size(s['input_bytes'])} of NEW "
                f"(ratio {s['ratio']:.4f}; {s['delta_chunks']} chunk(s) coded against OLD) in {s['seconds']:.2f}s",
                f"written: {output}",
            ],
        )

    @app.command(name="patch")
    def patch(
        old: Annotated[Path, typer.Argument(help="The model the patch was made from (checked by sha256).")],
        patch_file: Annotated[Path, typer.Argument(metavar="patch", help="A patch written by diff.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="The new .onnx file to write.")],
        force: ForceOpt = False,
        report: cli.ReportOpt = None,
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Apply PATCH to OLD and write NEW, bit-identical to the model diff was given (hashes checked)."""
        t0 = time.perf_counter()
        r = tr().patch(old, patch_file, output, force=force)
        _finish(
            r,
            report,
            json_out,
            [f"patched {len(r['files'])} file(s), sha256 verified, in {time.perf_counter() - t0:.2f}s"]
            + [f"written: {p}" for p in r["written"]],
        )
