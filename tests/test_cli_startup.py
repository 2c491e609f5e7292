"""What starting the CLI costs: modules a ``compress`` run does not need are imported by their commands."""

from __future__ import annotations

import json
import subprocess
import sys

from onnxcompress import batch, cli_batch


def test_cli_import_leaves_out_the_batch_and_transport_modules() -> None:
    code = (
        "import json, sys\nimport onnxcompress.cli\nprint(json.dumps(sorted(m for m in sys.modules if m in WATCH)))\n"
    ).replace(
        "WATCH",
        repr(
            {
                "onnxcompress.batch",
                "onnxcompress.transport",
                "rich.progress",
                "multiprocessing",
                "concurrent.futures.thread",
            }
        ),
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_batch_status_styles_cover_every_status() -> None:
    statuses = {batch.OK, batch.VALIDATION_FAILED, batch.ERROR, batch.INTERRUPTED, batch.NOT_RUN}
    assert set(cli_batch._STYLE) == statuses


def test_the_command_line_freezes_the_imports_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from onnxcompress import cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "_FROZEN", [False])
    monkeypatch.setattr(cli.gc, "freeze", lambda: calls.append(1))
    assert cli.main(["--help"]) == 0  # called with arguments (tests, scripts): nothing frozen
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["onnxcompress", "--help"])
    assert cli.main() == 0
    assert cli.main() == 0
    assert calls == [1]
