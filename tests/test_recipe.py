"""Recipes: TOML parsing with line/key errors, presets, the flag -> recipe mapping, and round trips
that must give the same output bytes as the flags they came from."""

from __future__ import annotations

import hashlib
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
from _models import matmul_model, save

from onnxcompress import api, cli
from onnxcompress import recipe as R
from onnxcompress.errors import OnnxCompressError
from onnxcompress.validate import Tolerance

MODELS = Path(__file__).resolve().parent.parent / "models"
HAS_RECIPE_OPTIONS = "print_recipe" in inspect.signature(cli.compress).parameters
needs_cli = pytest.mark.skipif(
    not HAS_RECIPE_OPTIONS, reason="compress --recipe/--print-recipe not wired into cli.py yet"
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mm(tmp_path: Path) -> Path:
    path = save(matmul_model(k=64, n=32), tmp_path / "mm.onnx")
    x = np.random.default_rng(0).standard_normal((8, 4, 64)).astype(np.float32)
    np.savez(tmp_path / "mm.inputs.npz", x=x)
    return path


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["edge-int8", "edge-int4", "fp16", "max-compression"])
def test_presets_load_and_round_trip(name: str) -> None:
    r = R.load_recipe(name)
    assert r.passes[0].name == "fold" and len(r.passes) == 2
    assert r.description
    for tol in r.tolerances():
        Tolerance.parse(tol)
    assert R.parse_recipe(R.to_toml(r)) == r


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(OnnxCompressError, match="no such preset.*edge-int8"):
        R.load_recipe("edge-int3")


# --------------------------------------------------------------------------- errors name line and key


ERRORS = {
    "unknown pass": (
        '[[pass]]\nname = "fold"\n\n[[pass]]\nname = "shrink"\n',
        ":5: pass[2].name: unknown pass 'shrink'",
    ),
    "bad mode": ('[[pass]]\nname = "fold"\n[[pass]]\nname = "quantize"\nmode = "int9"\n', ":5: pass[2].mode: unknown"),
    "missing mode": ('[[pass]]\nname = "quantize"\n', ":1: pass[1]: missing key 'mode'"),
    "mode without quantize": ('[[pass]]\nname = "fold"\nmode = "int4"\n', ":3: pass[1].mode:"),
    "bad option value": (
        '[[pass]]\nname = "quantize"\nmode = "int4"\nparams = { block_size = 33 }\n',
        ":4: pass[1].params.block_size: block_size=33: choose from",
    ),
    "bad option type": (
        '[[pass]]\nname = "quantize"\nmode = "int4"\n[pass.params]\nblock_size = "big"\n',
        ":5: pass[1].params.block_size: block_size=big: expected an integer",
    ),
    "unknown option": (
        '[[pass]]\nname = "fold"\n[[pass]]\nname = "quantize"\nmode = "int4"\nparams = { blok = 3 }\n',
        ":6: pass[2].params.blok: not a setting of int4",
    ),
    "unknown top-level param": ('[params]\nfoo = 1\n[[pass]]\nname = "fold"\n', ":2: params.foo: not a setting"),
    "bad type": ('exclude = 3\n[[pass]]\nname = "fold"\n', ":1: exclude: expected a list of strings"),
    "unknown key": ('targett = "x"\n[[pass]]\nname = "fold"\n', ":1: targett: unknown key"),
    "unknown target": ('target = "gpu"\n[[pass]]\nname = "fold"\n', ":1: target: unknown target 'gpu'"),
    "bad tolerance": (
        '[[pass]]\nname = "fold"\n[validate]\ntolerance = ["cosine>=0.9", "cosin>1"]\n',
        ":4: validate.tolerance[2]: bad tolerance",
    ),
    "bad shapes": ('[[pass]]\nname = "fold"\n[validate]\nshapes = { x = [1, "a"] }\n', ":4: validate.shapes.x:"),
    "exclude on fold": ('[[pass]]\nname = "fold"\nexclude = ["x"]\n', ":3: pass[1].exclude: fold is lossless"),
    "no passes": ('target = "standard"\n', "pass: a recipe needs at least one"),
    "shared option": (
        '[[pass]]\nname = "quantize"\nmode = "fp16"\nparams = { min_elements = 16 }\n'
        '[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\n',
        ":4: pass[1].params.min_elements: int8-dynamic (pass[2]) reads this setting too",
    ),
    "same option twice": (
        '[[pass]]\nname = "quantize"\nmode = "int4"\nparams = { damp = 0.1 }\n'
        '[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\nparams = { damp = 0.2 }\n',
        ":8: pass[2].params.damp: also set by pass[1]",
    ),
    "different excludes": (
        '[[pass]]\nname = "quantize"\nmode = "fp16"\nexclude = ["a"]\n'
        '[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\nexclude = ["b"]\n',
        ":8: pass[2].exclude: differs from pass[1].exclude",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_line_and_key(case: str, tmp_path: Path) -> None:
    text, expected = ERRORS[case]
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(OnnxCompressError) as info:
        R.load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"recipe {path}"), message
    assert expected in message, message
    assert "\n" not in message


def test_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('target = "standard"\n[[pass]]\nname = fold\n')
    with pytest.raises(OnnxCompressError, match=r"TOML syntax error: .*line 3"):
        R.load_recipe(path)


def test_missing_file() -> None:
    with pytest.raises(OnnxCompressError, match="no such file"):
        R.load_recipe("/nonexistent/recipe.toml")


# --------------------------------------------------------------------------- the format


def test_issue_example_parses(tmp_path: Path) -> None:
    (tmp_path / "feeds").mkdir()
    path = tmp_path / "r.toml"
    path.write_text(
        '[[pass]]\nname = "fold"\n\n[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\nexclude = ["/classifier/.*"]\n'
        'params = { gptq = false, smooth = 0.25 }\n\n[validate]\ntolerance = ["cosine>=0.999"]\ninputs = "feeds"\n'
        'shapes = { x = "1x4x64" }\n'
    )
    r = R.load_recipe(path)
    kw = r.compress_kwargs()
    assert kw["techniques"] == ["fold", "int8-dynamic"]
    assert kw["exclude"] == ["/classifier/.*"]
    assert kw["params"] == {"gptq": "false", "smooth": "0.25"}
    assert kw["tolerances"] == ["cosine>=0.999"]
    assert kw["fold"] is False
    assert Path(kw["feeds"].inputs) == tmp_path / "feeds"  # relative to the recipe file
    assert kw["feeds"].shapes == {"x": [1, 4, 64]}


def test_odd_strings_round_trip() -> None:
    r = R.Recipe(
        passes=(R.PassSpec("fold"), R.PassSpec("int8-dynamic", exclude=('a"b\\c', "é\x7f\t", "/x.*"))),
        params=(("smooth", "0.5"), ("activations", "row")),
        description='multi\nline "quoted"',
        validate=R.ValidateSpec(shapes=(("in put", (1, 2)),), tolerance=("out:cosine>=0.9",), int_high=7),
        external_data=True,
        calibration="/tmp/c d.npz",
    )
    assert R.parse_recipe(R.to_toml(r)) == r


@pytest.mark.parametrize(
    "flags, techniques",
    [
        ({"quantize": "int8-dynamic"}, ["fold", "int8-dynamic"]),
        ({"quantize": "int4", "fold": False}, ["int4"]),
        ({"fold": True}, ["fold"]),
        ({"technique": ["int8-weights", "fold"]}, ["int8-weights", "fold"]),
        ({"fold": True, "quantize": "fp16", "technique": ["fold"]}, ["fold", "fp16", "fold"]),
    ],
)
def test_flags_map_onto_recipe(flags: dict, techniques: list[str]) -> None:
    r = R.recipe_from_options(**flags)
    assert r.techniques == techniques
    assert R.parse_recipe(R.to_toml(r)) == r


def test_flags_errors_like_compress() -> None:
    with pytest.raises(OnnxCompressError, match="nothing to do"):
        R.recipe_from_options()
    with pytest.raises(OnnxCompressError, match="unknown technique"):
        R.recipe_from_options(quantize="int9")
    with pytest.raises(OnnxCompressError, match="block_size"):
        R.recipe_from_options(quantize="int4", param=["block_size=7"])
    with pytest.raises(OnnxCompressError, match="nope"):
        R.recipe_from_options(quantize="int4", param=["nope=1"])


def test_round_trip_gives_same_bytes(mm: Path, tmp_path: Path) -> None:
    """compress with flags == compress with the printed recipe read back (API level)."""
    flags = {
        "quantize": "int8-dynamic",
        "param": ["smooth=0", "activations=row"],
        "exclude": ["mm2"],
        "tolerance": ["cosine>=0.99"],
        "target": "onnxruntime",
    }
    a = api.compress(
        mm,
        tmp_path / "a.onnx",
        ["int8-dynamic"],
        params={"smooth": "0", "activations": "row"},
        exclude=["mm2"],
        tolerances=["cosine>=0.99"],
        target="onnxruntime",
    )
    assert a.written
    text = R.to_toml(R.recipe_from_options(**flags))
    (tmp_path / "r.toml").write_text(text)
    b = R.compress(R.load_recipe(tmp_path / "r.toml"), mm, tmp_path / "b.onnx")
    assert b.techniques == a.techniques
    assert _sha(tmp_path / "a.onnx") == _sha(tmp_path / "b.onnx")
    # and a second run of the same recipe is byte-identical (determinism)
    R.compress(R.load_recipe(tmp_path / "r.toml"), mm, tmp_path / "c.onnx")
    assert _sha(tmp_path / "c.onnx") == _sha(tmp_path / "b.onnx")


def test_override_replaces_data_options(tmp_path: Path) -> None:
    r = R.override(R.load_recipe("fp16"), target="onnxruntime", tolerance=["cosine>=0.5"], calibration="c.npz")
    assert r.target == "onnxruntime" and r.validate.tolerance == ("cosine>=0.5",)
    assert r.calibration == str(Path("c.npz").resolve())
    assert r.passes == R.load_recipe("fp16").passes


# --------------------------------------------------------------------------- the CLI (once cli.py has the options)


@needs_cli
def test_cli_print_recipe_round_trip(capsys: pytest.CaptureFixture[str], mm: Path, tmp_path: Path) -> None:
    flags = ["-q", "int8-dynamic", "--param", "smooth=0", "--exclude", "mm2", "-t", "cosine>=0.99"]
    assert cli.main(["compress", str(mm), "-o", str(tmp_path / "a.onnx"), *flags]) == 0
    capsys.readouterr()
    assert cli.main(["compress", *flags, "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert R.parse_recipe(text) == R.recipe_from_options(
        quantize="int8-dynamic", param=["smooth=0"], exclude=["mm2"], tolerance=["cosine>=0.99"]
    )
    (tmp_path / "r.toml").write_text(text)
    assert cli.main(["compress", str(mm), "-o", str(tmp_path / "b.onnx"), "--recipe", str(tmp_path / "r.toml")]) == 0
    assert _sha(tmp_path / "a.onnx") == _sha(tmp_path / "b.onnx")


@needs_cli
def test_cli_preset_and_conflicts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "digits_cnn.onnx"
    for f in MODELS.glob("digits_cnn.*"):
        shutil.copy(f, tmp_path / f.name)
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "a.onnx"), "--recipe", "fp16"]) == 0
    assert (tmp_path / "a.onnx").stat().st_size < 0.6 * src.stat().st_size
    capsys.readouterr()
    code = cli.main(["compress", str(src), "-o", str(tmp_path / "b.onnx"), "--recipe", "fp16", "-q", "int4"])
    err = capsys.readouterr().err
    assert code == 2 and "--recipe sets the passes" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pass]]\nname = "quantize"\nmode = "int9"\n')
    code = cli.main(["compress", str(src), "-o", str(tmp_path / "c.onnx"), "--recipe", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:3: pass[1].mode" in err
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "c.onnx").exists()
