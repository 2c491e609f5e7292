"""Fuzzed model files: every command ends with exit 0, 1 or 2, one line on stderr, and no partial output.

The CI budget is a fixed number of examples per strategy (``FUZZ_EXAMPLES``); ``scripts/fuzz.py`` (the
reliability issue) runs the long campaign.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import pytest
from _models import conv_model, if_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcompress.cli import main

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SEEDS = {"conv": conv_model().SerializeToString(), "if": if_model().SerializeToString()}


def _check_run(capsys: pytest.CaptureFixture[str], data: bytes, command: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "m.onnx"
        src.write_bytes(data)
        out = Path(d) / "out" / "q.onnx"
        out.parent.mkdir()
        if command == "inspect":
            args = ["inspect", str(src), "--json"]
        else:
            args = ["compress", str(src), "-o", str(out), "-q", "int8-weights", "--skip-validation"]
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 1, 2), err
        assert "Traceback" not in err
        assert "internal error" not in err, err
        if code == 2:
            assert len([line for line in err.splitlines() if line.strip()]) == 1, err
        leftovers = sorted(p.name for p in out.parent.iterdir())
        if out.exists():
            onnx.checker.check_model(str(out))
            assert leftovers in (["q.onnx"], ["q.onnx", "q.onnx.data"])
        else:
            assert leftovers == [], leftovers


_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@_settings
@given(seed=st.sampled_from(sorted(SEEDS)), cut=st.floats(0, 1), command=st.sampled_from(["inspect", "compress"]))
def test_truncated_models(capsys: pytest.CaptureFixture[str], seed: str, cut: float, command: str) -> None:
    data = SEEDS[seed]
    _check_run(capsys, data[: int(len(data) * cut)], command)


@_settings
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8),
    command=st.sampled_from(["inspect", "compress"]),
)
def test_bit_flipped_models(
    capsys: pytest.CaptureFixture[str], seed: str, flips: list[tuple[float, int]], command: str
) -> None:
    data = bytearray(SEEDS[seed])
    for pos, bit in flips:
        data[int(pos * len(data))] ^= 1 << bit
    _check_run(capsys, bytes(data), command)


def test_fuzz_campaign_sample(tmp_path: Path) -> None:
    """A sample of ``scripts/fuzz.py``'s campaign (every generator, every command, bad recipes and feeds
    included) in CI: with the hypothesis strategies above, >= 500 fuzzed cases per CI run."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"
    report = tmp_path / "fuzz.json"
    argv = ["--cases", "210", "--seed", "7", "--jobs", "2", "--json", str(report), "--repro-dir", str(tmp_path / "r")]
    r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600)
    summary = json.loads(report.read_text())
    assert r.returncode == 0 and not summary["violations"], r.stdout[-2000:]
