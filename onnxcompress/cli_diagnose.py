"""The ``onnxcompress diagnose`` command: rank a candidate model's layers by the error each adds.

``register(app)`` adds the command to the CLI's typer app (``cli.py`` calls it once). Options for the
inputs are the same as ``validate``'s. No logic lives here: the work is ``onnxcompress.diagnose``.
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def register(app: typer.Typer) -> None:
    """Add ``diagnose`` to ``app`` (idempotent).

    (No ``from __future__ import annotations`` in this module: typer reads the option annotations,
    which name the shared options of ``cli``, imported here to avoid an import cycle.)
    """
    if any(getattr(c, "name", None) == "diagnose" for c in app.registered_commands):
        return
    from . import api, cli, html_report
    from . import feeds as feeds_mod
    from .diagnose import diagnose as run_diagnose
    from .errors import OnnxCompressError
    from .report import to_json, write_json

    @app.command(name="diagnose")
    def diagnose(
        original: Annotated[Path, typer.Argument(help="The reference model.")],
        candidate: Annotated[Path, typer.Argument(help="The compressed model to examine.")],
        inputs: cli.InputsOpt = None,
        shape: cli.ShapeOpt = None,
        int_high: cli.IntHighOpt = 100,
        top: Annotated[int, typer.Option("--top", min=1, help="How many layers to print.")] = 10,
        report: cli.ReportOpt = None,
        html: cli.HtmlOpt = None,
        json_out: cli.JsonOpt = False,
        max_memory: cli.MaxMemoryOpt = None,
        compress_report: Annotated[
            Path | None,
            typer.Option(
                "--compress-report",
                help="The --report JSON of the compress run that made CANDIDATE: names the pass that changed "
                "each layer exactly (otherwise inferred from op types).",
            ),
        ] = None,
        chunk: Annotated[
            str,
            typer.Option(
                "--chunk",
                help="Activations captured at once per feed, e.g. 64M (peak memory grows by about 5x this; smaller is "
                "slower).",
            ),
        ] = "64M",
    ) -> None:
        """Find the layers that lose the accuracy: each layer's error when fed the original's inputs."""
        if html:
            html_report.check_available()
        mem = cli.parse_size(max_memory) if max_memory else None
        a = api.load(original, max_memory=mem)
        api.check_runnable(a)
        b = api.load(candidate, max_memory=mem)
        api.check_runnable(b)
        feed_list, source, _labels = api.resolve_feeds(
            a, original, api.FeedOptions(inputs=inputs, shapes=feeds_mod.parse_shapes(shape), int_high=int_high)
        )
        if feed_list:
            feeds_mod.check_feed(feed_list[0], feeds_mod.input_signature(b), "candidate inputs")
        del a, b
        made_by = None
        if compress_report is not None:
            try:
                made_by = json.loads(compress_report.read_text())
            except (OSError, ValueError) as exc:
                raise OnnxCompressError(f"--compress-report {compress_report}: cannot read it ({exc})") from None
            if not isinstance(made_by, dict):
                raise OnnxCompressError(f"--compress-report {compress_report}: not a compress report")
        with cli._status() as update:
            update("capturing tensors in onnxruntime")
            r = run_diagnose(
                original,
                candidate,
                feed_list,
                feeds_source=source,
                chunk_bytes=cli.parse_size(chunk),
                compress_report=made_by,
            )
        data = r.to_dict()
        if report:
            write_json(data, report)
        if html:
            html_report.write_html(html, "diagnose", data)
        if json_out:
            cli.out.print_json(to_json(data))
            return
        table = Table(
            title=f"Layers by local error ({r.matched} matched tensors, {r.num_feeds} feed(s), {r.feeds_source})",
            caption="local_error: relative RMS error the layer adds when fed the original's inputs; "
            "cosine (worst sample), snr_db: the error it carries. Full list: --report FILE.",
        )
        for col in ("#", "node (op)", "tensor", "local_error", "cosine", "snr_db", "changed by"):
            text = col in ("node (op)", "tensor", "changed by")
            table.add_column(col, justify="left" if text else "right", overflow="fold", no_wrap=not text)
        for i, layer in enumerate(r.layers[:top], 1):
            table.add_row(
                str(i),
                f"{layer.node} ({layer.op_type})",
                layer.tensor,
                _fmt(layer.local_error, ".4g"),
                _fmt(layer.cosine, ".5f"),
                _fmt(layer.snr_db, ".1f"),
                layer.changed_by or "-",
            )
        cli.out.print(table)
        for note in r.notes[:5]:
            cli.out.print(f"note: {note}", markup=False)
        cli.out.print(f"diagnosed in {r.seconds:.2f}s ({r.chunks} chunk(s))")
