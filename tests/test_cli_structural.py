"""compress's structural flags (--prune, --prune-mode, --lowrank, --cluster) map onto the registered
passes and their settings, in pipeline order, and round-trip through --print-recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxcompress import cli
from onnxcompress import recipe as R
from onnxcompress.errors import OnnxCompressError
from onnxcompress.recipes import PASSES

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_structural_options_order_and_settings() -> None:
    assert R.structural_options() == ([], [])
    assert R.structural_options(prune=0.3, prune_mode="channels") == (["prune-channels"], ["prune_channels_ratio=0.3"])
    tech, params = R.structural_options(prune=0.5, lowrank="energy=0.95", cluster=16)
    assert tech == ["prune", "lowrank", "cluster"]
    assert params == ["prune_mode=unstructured", "prune_sparsity=0.5", "lowrank_energy=0.95", "cluster_k=16"]
    assert R.structural_options(prune_mode="2:4") == (["prune"], ["prune_mode=2:4"])
    with pytest.raises(OnnxCompressError, match="--prune-mode 'diagonal'"):
        R.structural_options(prune=0.5, prune_mode="diagonal")
    for bad in ("0.95", "energy", "size=3", "energy="):
        with pytest.raises(OnnxCompressError, match="--lowrank"):
            R.structural_options(lowrank=bad)


def test_prune_channels_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.onnx"
    args = ["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--prune", "0.3", "--prune-mode", "channels"]
    code = cli.main([*args, "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["techniques"] == ["fold", "prune-channels"]
    assert report["size_ratio"] < 0.8 and report["validation"]["passed"]
    capsys.readouterr()
    assert cli.main([*args, "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert 'name = "prune-channels"' in text and "prune_channels_ratio = 0.3" in text
    assert R.parse_recipe(text).techniques == ["fold", "prune-channels"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune", "1.5", "--prune-mode", "channels"], "prune_channels_ratio"),
        (["--prune", "-0.1", "--prune-mode", "channels"], "prune_channels_ratio"),
        (["--prune-mode", "diagonal"], "--prune-mode"),
        (["--lowrank", "0.9"], "--lowrank"),
    ],
)
def test_bad_structural_values_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, message) -> None:
    out = tmp_path / "p.onnx"
    code = cli.main(["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.skipif(not {"prune", "lowrank", "cluster"} <= set(PASSES), reason="passes not registered")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune", "1.0"], "prune_sparsity"),
        (["--cluster", "1"], "cluster_k"),
        (["--cluster", "300"], "cluster_k"),
        (["--lowrank", "rank=0"], "lowrank_rank"),
        (["--lowrank", "ratio=-1"], "lowrank_ratio"),
    ],
)
def test_bad_values_of_the_other_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, message) -> None:
    out = tmp_path / "p.onnx"
    code = cli.main(["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_write_compressed_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--write-compressed gz/zst: the copies decompress to the written bytes; their sizes are reported."""
    import gzip
    import importlib.util

    formats = ["gz"] + (["zst"] if importlib.util.find_spec("zstandard") else [])
    out = tmp_path / "p.onnx"
    flags = [x for f in formats for x in ("--write-compressed", f)]
    args = ["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "-q", "int8-weights", *flags]
    assert cli.main([*args, "--report", str(tmp_path / "r.json")]) == 0, capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())["output"]["compressed"]
    assert sorted(report) == sorted(formats)
    assert gzip.decompress((tmp_path / "p.onnx.gz").read_bytes()) == out.read_bytes()
    assert report["gz"]["bytes"] == (tmp_path / "p.onnx.gz").stat().st_size < out.stat().st_size
    if "zst" in formats:
        import zstandard

        assert zstandard.ZstdDecompressor().decompress((tmp_path / "p.onnx.zst").read_bytes()) == out.read_bytes()
    capsys.readouterr()
    assert cli.main([*args, "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert R.parse_recipe(text).write_compressed == tuple(formats)
    assert not list(tmp_path.glob(".onnxcompress-tmp-*"))


def test_write_compressed_bad_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.onnx"
    code = cli.main(
        ["compress", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "-q", "fp16", "--write-compressed", "7z"]
    )
    assert code == 2 and "unknown compressed format '7z'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(OnnxCompressError, match="write_compressed"):
        R.parse_recipe('write_compressed = ["rar"]\n[[pass]]\nname = "fold"\n')
