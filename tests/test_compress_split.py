"""compress --split-max-part-size and a recipe's [split] table: compress, then split the written model
into parts that run with the runner and equal the written model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcompress import SplitModel, cli
from onnxcompress import recipe as R
from onnxcompress.validate import make_session

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = MODELS / "tiny_transformer.onnx"


def _feeds() -> dict[str, np.ndarray]:
    data = np.load(MODELS / "tiny_transformer.inputs.npz")
    return {k: data[k] for k in data.files}


def _same_outputs(model: Path, parts: Path) -> None:
    feed = _feeds()
    s = make_session(model)
    ref = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
    got = SplitModel(parts).run(feed)
    assert list(got) == list(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5)


def test_compress_then_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    code = cli.main(
        [
            "compress", str(MODEL), "-o", str(out), "-q", "int8-weights",
            "--split-max-part-size", "200KB", "--report", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr()
    parts = tmp_path / "m.parts"
    manifest = json.loads((parts / "manifest.json").read_text())
    assert len(manifest["parts"]) >= 2
    assert all(p["weight_bytes"] <= 200 * 1000 for p in manifest["parts"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["split"]["outdir"] == str(parts)
    assert report["split"]["validation"]["passed"] is True
    _same_outputs(out, parts)
    # the folder exists now: a second run needs --force
    again = cli.main(["compress", str(MODEL), "-o", str(tmp_path / "n.onnx"), "-q", "int8-weights",
                      "--split-max-part-size", "200KB", "--split-dir", str(parts)])  # fmt: skip
    assert again == 2 and "exists" in capsys.readouterr().err
    assert not (tmp_path / "n.onnx").exists()


def test_recipe_split_table_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["compress", "-q", "fp16", "--split-max-part-size", "300KB", "--print-recipe"])
    text = capsys.readouterr().out
    assert code == 0 and "[split]" in text and 'max_part_size = "300KB"' in text
    recipe = R.parse_recipe(text)
    assert recipe.split is not None and recipe.split.max_part_size == "300KB"
    assert R.parse_recipe(R.to_toml(recipe)) == recipe
    path = tmp_path / "r.toml"
    path.write_text(text.replace('max_part_size = "300KB"', "parts = 3"))
    out = tmp_path / "m.onnx"
    assert cli.main(["compress", str(MODEL), "-o", str(out), "--recipe", str(path)]) == 0, capsys.readouterr()
    assert len(json.loads((tmp_path / "m.parts" / "manifest.json").read_text())["parts"]) == 3
    _same_outputs(out, tmp_path / "m.parts")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[split]\nbalance = "size"\n', "exactly one of max_part_size and parts"),
        ('[split]\nparts = 2\nbalance = "speed"\n', "unknown balance"),
        ("[split]\nparts = true\n", "expected an integer"),
        ('[split]\nmax_part_size = "lots"\n', "lots"),
        ("[split]\nparts = 2\ncolour = 1\n", "colour"),
    ],
)
def test_bad_split_table(table: str, message: str) -> None:
    text = '[[pass]]\nname = "quantize"\nmode = "fp16"\n\n' + table
    with pytest.raises(Exception, match=message):
        R.parse_recipe(text)


def test_split_dir_needs_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["compress", str(MODEL), "-o", str(tmp_path / "m.onnx"), "-q", "fp16", "--split-dir", str(tmp_path)]
    )
    assert code == 2 and "--split-dir goes with --split-max-part-size" in capsys.readouterr().err
