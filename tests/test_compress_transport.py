"""compress --pack / output.transport_bytes, and batch's transport_bytes column: the package restores the
written model bit for bit, and its size is what the report says."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from onnxcompress import batch as B
from onnxcompress import cli
from onnxcompress import recipe as R
from onnxcompress.transport import packed_size

MODELS = Path(__file__).resolve().parent.parent / "models"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_compress_pack_and_transport_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    args = ["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "-q", "int8-weights", "--pack"]
    assert cli.main([*args, "--report", str(tmp_path / "r.json")]) == 0, capsys.readouterr()
    o = json.loads((tmp_path / "r.json").read_text())["output"]
    pkg = tmp_path / "m.ocpk"
    assert o["package"]["path"] == str(pkg) and o["transport_bytes"] == pkg.stat().st_size == packed_size(out)
    assert o["transport_bytes"] < o["size_bytes"]
    assert cli.main(["unpack", str(pkg), "-o", str(tmp_path / "back.onnx")]) == 0, capsys.readouterr()
    assert _sha(tmp_path / "back.onnx") == _sha(out)
    capsys.readouterr()
    assert cli.main([*args, "--print-recipe", "--no-transport-size"]) == 0
    recipe = R.parse_recipe(capsys.readouterr().out)
    assert recipe.pack is True and recipe.transport_size is False


def test_no_transport_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    args = ["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "-q", "fp16", "--no-transport-size"]
    assert cli.main([*args, "--report", str(tmp_path / "r.json")]) == 0, capsys.readouterr()
    o = json.loads((tmp_path / "r.json").read_text())["output"]
    assert o["transport_bytes"] is None and "package" not in o and not (tmp_path / "m.ocpk").exists()


def test_batch_reports_transport_bytes(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for f in MODELS.glob("digits_cnn.*"):
        shutil.copy(f, zoo / f.name)
    report = B.run_batch([zoo], tmp_path / "out", R.recipe_from_options(quantize="int8-weights"), executor="inline")
    (r,) = report.results
    assert r.status == B.OK and r.transport_bytes == packed_size(tmp_path / "out" / "digits_cnn.onnx")
    rows = list(csv.DictReader((tmp_path / "out" / B.REPORT_CSV).open()))
    assert int(rows[0]["transport_bytes"]) == r.transport_bytes


def test_compress_base_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compress v2 --base v1-compressed: symbols reused (stats.base), a smaller patch than without, a
    recipe round trip; --base without int8-weights or with a missing file is refused (exit 2)."""
    import numpy as np
    from _models import matmul_model, save
    from onnx import numpy_helper as nh

    from onnxcompress.transport import diff

    v1 = matmul_model(k=256, n=128, seed=3)
    v2 = matmul_model(k=256, n=128, seed=3)
    rng = np.random.default_rng(0)
    for t in v2.graph.initializer:
        a = nh.to_array(t)
        t.CopyFrom(nh.from_array((a + 0.001 * rng.standard_normal(a.shape) * np.abs(a).mean()).astype(a.dtype), t.name))
    p1, p2 = save(v1, tmp_path / "v1.onnx"), save(v2, tmp_path / "v2.onnx")
    q = ["-q", "int8-weights", "--no-transport-size", "-t", "cosine>=0.99"]
    assert cli.main(["compress", str(p1), "-o", str(tmp_path / "v1c.onnx"), *q]) == 0, capsys.readouterr()
    assert cli.main(["compress", str(p2), "-o", str(tmp_path / "v2i.onnx"), *q]) == 0, capsys.readouterr()
    args = ["compress", str(p2), "-o", str(tmp_path / "v2b.onnx"), *q, "--base", str(tmp_path / "v1c.onnx")]
    assert cli.main([*args, "--report", str(tmp_path / "r.json")]) == 0, capsys.readouterr()
    stats = [p["stats"] for p in json.loads((tmp_path / "r.json").read_text())["passes"] if p["name"] == "int8-weights"]
    assert stats[0]["base"]["tensors_rebased"] >= 1
    with_base = diff(tmp_path / "v1c.onnx", tmp_path / "v2b.onnx", tmp_path / "b.ocpd")["package_bytes"]
    without = diff(tmp_path / "v1c.onnx", tmp_path / "v2i.onnx", tmp_path / "i.ocpd")["package_bytes"]
    assert with_base < without
    capsys.readouterr()
    assert cli.main([*args, "--print-recipe"]) == 0
    assert R.parse_recipe(capsys.readouterr().out).base == str((tmp_path / "v1c.onnx").resolve())
    bad = ["compress", str(p2), "-o", str(tmp_path / "x.onnx")]
    assert cli.main([*bad, "-q", "fp16", "--base", str(tmp_path / "v1c.onnx")]) == 2
    assert "--base needs -q int8-weights" in capsys.readouterr().err
    assert cli.main([*bad, "-q", "int8-weights", "--base", str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
