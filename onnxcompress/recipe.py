"""Recipes: one reproducible TOML description of how a model is compressed and checked.

A recipe holds the ordered passes with their options, the compression target and calibration data,
and the validation inputs and tolerances::

    description = "int8 for CPUs"
    target = "standard"             # or "onnxruntime"
    exclude = ["/classifier/.*"]    # node names, op types or regexes every lossy pass leaves in float

    [params]                        # settings read by any pass (like --param KEY=VALUE)
    smooth = 0.5

    [[pass]]
    name = "fold"

    [[pass]]
    name = "quantize"
    mode = "int8-dynamic"           # any quantization technique (compress --quantize)
    exclude = ["Gather"]
    params = { gptq = false }       # settings of this pass only

    [validate]
    tolerance = ["cosine>=0.99"]    # default: the passes' default tolerances
    inputs = "feeds/"               # default: <model>.inputs.npz beside each model, else generated

Passes run exactly as listed (a recipe that wants ``fold`` lists it). Relative paths are relative to
the recipe file's folder. Every ``compress`` flag combination maps onto a recipe
(:func:`recipe_from_options`, shown by ``compress --print-recipe``) and :func:`to_toml` writes one
back. Presets ship as TOML files in ``onnxcompress/presets/`` and load by name (``edge-int8``, ...).

Errors are :class:`OnnxCompressError` naming the recipe file, the line where it can be found, and the
key path (``pass[2].mode``; indices count from 1: ``pass[1]`` is the first ``[[pass]]`` table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from . import api, io
from .errors import OnnxCompressError
from .feeds import parse_shapes
from .passes.base import TARGETS, Params
from .recipes import PASSES, default_tolerances
from .validate import Tolerance

PRESETS_DIR = Path(__file__).with_name("presets")
QUANTIZE = "quantize"
LOSSLESS = frozenset({"fold"})
# Lossy passes that are not quantization modes: a recipe names them directly (``name = "prune"``).
NAMED = frozenset({"prune", "prune-channels", "lowrank", "cluster", "tune"})
_TOP_KEYS = (
    "description",
    "target",
    "calibration",
    "exclude",
    "external_data",
    "write_compressed",
    "pack",
    "transport_size",
    "base",
    "params",
    "pass",
    "validate",
    "split",
)
_SPLIT_KEYS = ("max_part_size", "parts", "balance", "outdir")
_PASS_KEYS = ("name", "mode", "exclude", "params")
_VALIDATE_KEYS = ("skip", "tolerance", "inputs", "shapes", "int_high", "labels", "label_output")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One pass of a recipe.

    Attributes:
        name: A registered technique (``recipes.PASSES``), e.g. ``fold`` or ``int8-dynamic``.
        exclude: Nodes this pass leaves in float (see :attr:`Recipe.exclude`).
        params: ``(key, value)`` settings of this pass only, in order.
    """

    name: str
    exclude: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class ValidateSpec:
    """How the result is checked (the ``[validate]`` table)."""

    skip: bool = False
    tolerance: tuple[str, ...] | None = None
    inputs: str | None = None
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    int_high: int = 100
    labels: str | None = None
    label_output: str | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ordered list of passes with their options, target, calibration and validation settings."""

    passes: tuple[PassSpec, ...]
    target: str = "standard"
    calibration: str | None = None
    exclude: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    external_data: bool | None = None
    validate: ValidateSpec = dataclasses.field(default_factory=ValidateSpec)
    description: str = ""
    source: str = dataclasses.field(default="<options>", compare=False)
    split: api.SplitOptions | None = None
    write_compressed: tuple[str, ...] = ()
    pack: bool = False
    transport_size: bool = True
    base: str | None = None

    @property
    def techniques(self) -> list[str]:
        """The pass names, in order."""
        return [p.name for p in self.passes]

    def all_exclude(self) -> list[str]:
        """The exclude list handed to the compressor: the recipe's plus its passes' (checked to agree)."""
        out = list(self.exclude)
        for p in self.passes:
            out.extend(x for x in p.exclude if x not in out)
        return out

    def all_params(self) -> dict[str, str]:
        """Every setting, the recipe's and its passes' (checked not to collide)."""
        out = dict(self.params)
        for p in self.passes:
            out.update(p.params)
        return out

    def tolerances(self) -> list[str]:
        """The tolerances applied: the recipe's, else the passes' defaults."""
        if self.validate.tolerance is not None:
            return list(self.validate.tolerance)
        return default_tolerances(self.techniques)

    def compress_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`onnxcompress.api.compress` that run this recipe."""
        v = self.validate
        return {
            "techniques": self.techniques,
            "feeds": api.FeedOptions(
                inputs=v.inputs,
                shapes={k: list(d) for k, d in v.shapes},
                int_high=v.int_high,
                labels=v.labels,
                label_output=v.label_output,
            ),
            "tolerances": list(v.tolerance) if v.tolerance is not None else None,
            "validate": not v.skip,
            "calibration": self.calibration,
            "target": self.target,
            "exclude": self.all_exclude(),
            "fold": False,  # a recipe lists fold explicitly
            "params": self.all_params(),
            "external_data": self.external_data,
            "split": self.split,
            "write_compressed": self.write_compressed,
            "pack": self.pack,
            "transport_size": self.transport_size,
            "base": self.base,
        }


def compress(
    recipe: Recipe,
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    max_memory: int | None = None,
    progress: Callable[[str], None] | None = None,
    parts: bool = True,
    on_outputs: Callable[[dict[str, list[Any]], dict[str, list[Any]]], None] | None = None,
) -> api.CompressionReport:
    """Compress ``model`` into ``output`` as ``recipe`` says (see :func:`onnxcompress.api.compress`)."""
    return api.compress(
        model,
        output,
        force=force,
        max_memory=max_memory,
        progress=progress,
        parts=parts,
        on_outputs=on_outputs,
        **recipe.compress_kwargs(),
    )


# --------------------------------------------------------------------------- presets and loading


def preset_names() -> list[str]:
    """The names of the shipped presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_recipe(path_or_name: str | os.PathLike[str]) -> Recipe:
    """A recipe from a TOML file, or a preset by name (``edge-int8``, ``edge-int4``, ``fp16``, ...).

    Raises:
        OnnxCompressError: the file is missing or unreadable, a TOML syntax error (with its line), or
            a bad key or value (with its line and key path).
    """
    text_name = os.fspath(path_or_name)
    path = Path(text_name)
    if not path.exists() and re.fullmatch(r"[A-Za-z0-9_-]+", text_name):
        preset = PRESETS_DIR / f"{text_name}.toml"
        if not preset.is_file():
            raise OnnxCompressError(
                f"recipe {text_name!r}: no such file and no such preset; presets: {', '.join(preset_names())}"
            )
        path = preset
    if not path.is_file():
        raise OnnxCompressError(f"recipe {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxCompressError(f"recipe {path}: cannot read it ({exc})") from None
    base = None if path.parent == PRESETS_DIR else path.parent
    return parse_recipe(text, source=str(path), base=base)


def parse_recipe(text: str, *, source: str = "<recipe>", base: Path | None = None) -> Recipe:
    """A recipe from TOML text; relative paths are taken relative to ``base`` (default: as given)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OnnxCompressError(f"recipe {source}: TOML syntax error: {exc}") from None
    return _Reader(text, source, base).recipe(data)


class _Reader:
    """Turns parsed TOML into a :class:`Recipe`, naming line and key path in every error."""

    def __init__(self, text: str, source: str, base: Path | None) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.base = base

    # -- errors

    def _line(self, path: tuple[str | int, ...]) -> int | None:
        """Best-effort line number (1-based) of a key path in the TOML text."""
        header = re.compile(r"^\s*\[")
        start, end = 0, len(self.lines)
        keys = list(path)
        if keys and keys[0] == "pass" and len(keys) >= 2 and isinstance(keys[1], int):
            heads = [i for i, ln in enumerate(self.lines) if re.match(r"^\s*\[\[\s*pass\s*\]\]", ln)]
            if keys[1] - 1 >= len(heads):
                return None
            start = heads[keys[1] - 1]
            end = next((i for i in range(start + 1, len(self.lines)) if re.match(r"^\s*\[\[", self.lines[i])), end)
            keys = keys[2:]
            if not keys:
                return start + 1
            if keys[0] == "params" and len(keys) > 1:
                sub = next(
                    (i for i in range(start, end) if re.match(r"^\s*\[\s*pass\s*\.\s*params\s*\]", self.lines[i])),
                    None,
                )
                if sub is not None:
                    start, keys = sub, keys[1:]
        elif keys and keys[0] in ("validate", "params") and len(keys) >= 2:
            sub = next(
                (i for i, ln in enumerate(self.lines) if re.match(rf"^\s*\[\s*{keys[0]}\s*\]", ln)),
                None,
            )
            if sub is not None:
                start = sub
                end = next((i for i in range(sub + 1, len(self.lines)) if header.match(self.lines[i])), end)
                keys = keys[1:]
        else:
            end = next((i for i, ln in enumerate(self.lines) if header.match(ln)), end)
        key = next((k for k in keys if isinstance(k, str)), None)
        if key is None:
            return start + 1 if start else None
        pattern = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=|[{{,]\s*(\"?){re.escape(key)}\2\s*=")
        for i in range(start, end):
            if pattern.search(self.lines[i]):
                return i + 1
        return None

    def error(self, path: tuple[str | int, ...], message: str) -> OnnxCompressError:
        line = self._line(path)
        where = f"{self.source}:{line}" if line else self.source
        return OnnxCompressError(f"recipe {where}: {_key_path(path)}: {message}")

    # -- typed getters

    def _check_keys(self, table: dict[str, Any], allowed: tuple[str, ...], path: tuple[str | int, ...]) -> None:
        for key in table:
            if key not in allowed:
                raise self.error((*path, key), f"unknown key; expected one of {', '.join(allowed)}")

    def _str(self, value: Any, path: tuple[str | int, ...]) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_type_name(value)}")
        return value

    def _str_list(self, value: Any, path: tuple[str | int, ...]) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of strings, got {_type_name(value)}")
        return tuple(self._str(v, (*path, i)) for i, v in enumerate(value, 1))

    def _bool(self, value: Any, path: tuple[str | int, ...]) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {_type_name(value)}")
        return value

    def _path(self, value: Any, path: tuple[str | int, ...]) -> str:
        p = self._str(value, path)
        if self.base is not None and not os.path.isabs(p):
            p = os.path.normpath(os.path.join(self.base, p))
        return p

    def _params(self, value: Any, path: tuple[str | int, ...]) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table of settings, got {_type_name(value)}")
        out = []
        for key, v in value.items():
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, (int, float, str)):
                text = str(v)
            else:
                raise self.error((*path, key), f"expected a string, number or boolean, got {_type_name(v)}")
            out.append((key, text))
        return tuple(out)

    # -- the tables

    def recipe(self, data: dict[str, Any]) -> Recipe:
        self._check_keys(data, _TOP_KEYS, ())
        if "pass" not in data:
            raise self.error(("pass",), "a recipe needs at least one [[pass]] table")
        raw_passes = data["pass"]
        if not isinstance(raw_passes, list) or not raw_passes:
            raise self.error(("pass",), "expected one or more [[pass]] tables")
        passes = tuple(self._pass(p, i + 1) for i, p in enumerate(raw_passes))
        target = self._str(data.get("target", "standard"), ("target",))
        if target not in TARGETS:
            raise self.error(("target",), f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
        recipe = Recipe(
            passes=passes,
            target=target,
            calibration=self._path(data["calibration"], ("calibration",)) if "calibration" in data else None,
            exclude=self._str_list(data.get("exclude", []), ("exclude",)),
            params=self._params(data.get("params", {}), ("params",)),
            external_data=self._bool(data["external_data"], ("external_data",)) if "external_data" in data else None,
            validate=self._validate(data.get("validate", {})),
            description=self._str(data.get("description", ""), ("description",)),
            source=self.source,
            split=self._split(data["split"]) if "split" in data else None,
            write_compressed=self._formats(data.get("write_compressed", []), ("write_compressed",)),
            pack=self._bool(data.get("pack", False), ("pack",)),
            transport_size=self._bool(data.get("transport_size", True), ("transport_size",)),
            base=self._path(data["base"], ("base",)) if "base" in data else None,
        )
        check_recipe(recipe, self.error)
        return recipe

    def _pass(self, table: Any, index: int) -> PassSpec:
        path: tuple[str | int, ...] = ("pass", index)
        if not isinstance(table, dict):
            raise self.error(path, "expected a table")
        self._check_keys(table, _PASS_KEYS, path)
        if "name" not in table:
            raise self.error(path, "missing key 'name' (a technique, or \"quantize\" with a mode)")
        name = self._str(table["name"], (*path, "name"))
        modes = [n for n in PASSES if n not in LOSSLESS and n not in NAMED]
        if name == QUANTIZE:
            if "mode" not in table:
                raise self.error(path, f"missing key 'mode' for quantize: choose from {', '.join(modes)}")
            mode = self._str(table["mode"], (*path, "mode"))
            if mode not in modes:
                raise self.error((*path, "mode"), f"unknown quantization mode {mode!r}: choose from {', '.join(modes)}")
            name = mode
        elif "mode" in table:
            raise self.error((*path, "mode"), f"'mode' belongs to name = \"quantize\", not to {name!r}")
        elif name not in PASSES:
            raise self.error(
                (*path, "name"), f"unknown pass {name!r}: choose from quantize, {', '.join(sorted(PASSES))}"
            )
        return PassSpec(
            name=name,
            exclude=self._str_list(table.get("exclude", []), (*path, "exclude")),
            params=self._params(table.get("params", {}), (*path, "params")),
        )

    def _formats(self, value: Any, path: tuple[str | int, ...]) -> tuple[str, ...]:
        formats = self._str_list(value, path)
        for i, fmt in enumerate(formats, 1):
            if fmt not in io.COMPRESSED_FORMATS:
                raise self.error((*path, i), f"unknown compressed format {fmt!r}: choose gz or zst")
        return formats

    def _split(self, table: Any) -> api.SplitOptions:
        path: tuple[str | int, ...] = ("split",)
        if not isinstance(table, dict):
            raise self.error(path, "expected a table")
        self._check_keys(table, _SPLIT_KEYS, path)
        size = table.get("max_part_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, str))):
            raise self.error((*path, "max_part_size"), f'expected a size such as "50MB", got {_type_name(size)}')
        parts = table.get("parts")
        if parts is not None and (isinstance(parts, bool) or not isinstance(parts, int)):
            raise self.error((*path, "parts"), f"expected an integer, got {_type_name(parts)}")
        spec = api.SplitOptions(
            max_part_size=size,
            parts=parts,
            balance=self._str(table.get("balance", "size"), (*path, "balance")),
            outdir=self._path(table["outdir"], (*path, "outdir")) if "outdir" in table else None,
        )
        try:
            spec.check()
        except OnnxCompressError as exc:
            raise self.error(path, str(exc)) from None
        return spec

    def _validate(self, table: Any) -> ValidateSpec:
        path: tuple[str | int, ...] = ("validate",)
        if not isinstance(table, dict):
            raise self.error(path, "expected a table")
        self._check_keys(table, _VALIDATE_KEYS, path)
        tol = None
        if "tolerance" in table:
            tol = self._str_list(table["tolerance"], (*path, "tolerance"))
            for i, t in enumerate(tol, 1):
                try:
                    Tolerance.parse(t)
                except OnnxCompressError as exc:
                    raise self.error((*path, "tolerance", i), str(exc)) from None
        shapes: list[tuple[str, tuple[int, ...]]] = []
        raw_shapes = table.get("shapes", {})
        if not isinstance(raw_shapes, dict):
            raise self.error((*path, "shapes"), f"expected a table of input = [dims], got {_type_name(raw_shapes)}")
        for name, dims in raw_shapes.items():
            where = (*path, "shapes", name)
            if isinstance(dims, str):
                try:
                    dims = parse_shapes([f"{name}={dims}"])[name]
                except OnnxCompressError as exc:
                    raise self.error(where, str(exc)) from None
            if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                raise self.error(where, "expected a list of integers such as [1, 3, 224, 224]")
            if any(d < 0 for d in dims):
                raise self.error(where, "dimensions must be >= 0")
            shapes.append((name, tuple(dims)))
        int_high = table.get("int_high", 100)
        if not isinstance(int_high, int) or isinstance(int_high, bool) or int_high < 1:
            raise self.error((*path, "int_high"), f"expected a positive integer, got {int_high!r}")
        return ValidateSpec(
            skip=self._bool(table.get("skip", False), (*path, "skip")),
            tolerance=tol,
            inputs=self._path(table["inputs"], (*path, "inputs")) if "inputs" in table else None,
            shapes=tuple(shapes),
            int_high=int_high,
            labels=self._path(table["labels"], (*path, "labels")) if "labels" in table else None,
            label_output=self._str(table["label_output"], (*path, "label_output")) if "label_output" in table else None,
        )


def _plain_error(path: tuple[str | int, ...], message: str) -> OnnxCompressError:
    return OnnxCompressError(f"{_key_path(path)}: {message}")


def check_recipe(
    recipe: Recipe, error: Callable[[tuple[str | int, ...], str], OnnxCompressError] = _plain_error
) -> None:
    """Check what a recipe means (not just its types): every setting is read by the pass it is given
    to and by no other, per-pass exclude lists can be honoured, the passes can be built.

    Raises:
        OnnxCompressError: from ``error(key_path, message)``.
    """
    own: dict[str, int] = {}  # per-pass key -> pass index (1-based)
    for i, spec in enumerate(recipe.passes, 1):
        for key, _ in spec.params:
            if key in own:
                raise error(
                    ("pass", i, "params", key), f"also set by pass[{own[key]}]; put it in the top-level [params]"
                )
            if key in dict(recipe.params):
                raise error(("pass", i, "params", key), "also set in the top-level [params]")
            own[key] = i
        if spec.exclude and spec.name in LOSSLESS:
            raise error(("pass", i, "exclude"), f"{spec.name} is lossless and takes no exclude list")
    merged = recipe.all_params()
    for i, spec in enumerate(recipe.passes, 1):
        params = Params(merged)
        try:
            PASSES[spec.name](params)
        except OnnxCompressError as exc:
            key = next((k for k in merged if f"param {k}=" in str(exc)), None)
            if key is not None and key in own:
                where: tuple[str | int, ...] = ("pass", own[key], "params", key)
            elif key is not None:
                where = ("params", key)
            else:
                where = ("pass", i)
            raise error(where, str(exc).replace("--param ", "")) from None
        for key in params.used:
            if key in own and own[key] != i:
                raise error(
                    ("pass", own[key], "params", key),
                    f"{spec.name} (pass[{i}]) reads this setting too; put it in the top-level [params]",
                )
        for key, _ in spec.params:
            if key not in params.used:
                raise error(("pass", i, "params", key), f"not a setting of {spec.name}")
    used: set[str] = set()
    for spec in recipe.passes:
        params = Params(merged)
        PASSES[spec.name](params)
        used |= params.used
    for key, _ in recipe.params:
        if key not in used:
            raise error(("params", key), f"not a setting of {', '.join(recipe.techniques)}")
    lossy = [(i, p) for i, p in enumerate(recipe.passes, 1) if p.name not in LOSSLESS]
    with_exclude = [(i, p) for i, p in lossy if p.exclude]
    if with_exclude and len(lossy) > 1:
        first_i, first = with_exclude[0]
        for i, p in lossy:
            if p.exclude != first.exclude:
                raise error(
                    ("pass", i, "exclude"),
                    f"differs from pass[{first_i}].exclude: one exclude list applies to every lossy pass; "
                    "give the same list to each or put it in the top-level exclude",
                )


# --------------------------------------------------------------------------- from CLI options


def structural_options(
    *,
    prune: float | None = None,
    prune_mode: str | None = None,
    lowrank: str | None = None,
    cluster: int | None = None,
) -> tuple[list[str], list[str]]:
    """The techniques and ``KEY=VALUE`` settings of ``compress``'s structural flags, in pipeline order
    (pruning, then low-rank, then clustering; quantization comes after them).

    ``--prune R [--prune-mode unstructured|2:4|4:8|channels]``, ``--lowrank energy=E|ratio=R|rank=N``,
    ``--cluster K``. The values are checked by the passes' own settings (one-line errors).

    Raises:
        OnnxCompressError: an unknown prune mode, or a ``--lowrank`` value that is not KEY=VALUE.
    """
    techniques: list[str] = []
    params: list[str] = []
    if prune is not None or prune_mode is not None:
        mode = prune_mode or "unstructured"
        if mode == "channels":
            techniques.append("prune-channels")
            if prune is not None:
                params.append(f"prune_channels_ratio={prune!r}")
        elif mode in ("unstructured", "2:4", "4:8"):
            techniques.append("prune")
            params.append(f"prune_mode={mode}")
            if prune is not None:
                params.append(f"prune_sparsity={prune!r}")
        else:
            raise OnnxCompressError(f"--prune-mode {mode!r}: choose unstructured, 2:4, 4:8 or channels")
    if lowrank is not None:
        key, sep, value = lowrank.partition("=")
        if not sep or key not in ("energy", "ratio", "rank") or not value:
            raise OnnxCompressError(
                f"--lowrank {lowrank!r}: expected energy=E (e.g. 0.95), ratio=R (e.g. 0.5) or rank=N"
            )
        techniques.append("lowrank")
        params.append(f"lowrank_{key}={value}")
    if cluster is not None:
        techniques.append("cluster")
        params.append(f"cluster_k={cluster}")
    return techniques, params


def recipe_from_options(
    *,
    fold: bool | None = None,
    quantize: str | None = None,
    technique: list[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    target: str | None = None,
    exclude: list[str] | None = None,
    param: list[str] | None = None,
    tolerance: list[str] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    shape: list[str] | None = None,
    int_high: int | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_output: str | None = None,
    skip_validation: bool = False,
    external_data: bool | None = None,
    split: api.SplitOptions | None = None,
    write_compressed: list[str] | tuple[str, ...] = (),
    pack: bool = False,
    transport_size: bool = True,
    base: str | os.PathLike[str] | None = None,
) -> Recipe:
    """The recipe equivalent to a ``compress`` flag combination (same passes, in the same order).

    Paths become absolute, so the printed recipe works from any folder.

    Raises:
        OnnxCompressError: no technique, an unknown one, or a bad setting (as ``compress`` would).
    """
    techniques = (["fold"] if fold else []) + ([quantize] if quantize else []) + list(technique or [])
    if not techniques:
        raise OnnxCompressError("nothing to do: choose a technique, e.g. --quantize int8-weights")
    if fold is not False and "fold" not in techniques:
        techniques.insert(0, "fold")
    for name in techniques:
        if name not in PASSES:
            raise OnnxCompressError(f"unknown technique {name!r}: choose from {', '.join(sorted(PASSES))}")
    tgt = target if target is not None else "standard"
    if tgt not in TARGETS:
        raise OnnxCompressError(f"unknown target {tgt!r}: choose from {', '.join(TARGETS)}")
    for t in tolerance or []:
        Tolerance.parse(t)
    shapes = parse_shapes(shape)
    recipe = Recipe(
        passes=tuple(PassSpec(n) for n in techniques),
        target=tgt,
        calibration=_abs(calibration),
        exclude=tuple(exclude or ()),
        params=tuple(Params.parse(param).items.items()),
        external_data=external_data,
        validate=ValidateSpec(
            skip=skip_validation,
            tolerance=tuple(tolerance) if tolerance else None,
            inputs=_abs(inputs),
            shapes=tuple((k, tuple(v)) for k, v in shapes.items()),
            int_high=int_high if int_high is not None else 100,
            labels=_abs(labels),
            label_output=label_output,
        ),
        split=_abs_split(split),
        write_compressed=_formats(write_compressed),
        pack=pack,
        transport_size=transport_size,
        base=_abs(base),
    )
    check_recipe(recipe, lambda path, msg: OnnxCompressError(f"--param {_key_path(path[-1:])}: {msg}"))
    return recipe


def override(
    recipe: Recipe,
    *,
    calibration: str | os.PathLike[str] | None = None,
    target: str | None = None,
    tolerance: list[str] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    shape: list[str] | None = None,
    int_high: int | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_output: str | None = None,
    skip_validation: bool = False,
    external_data: bool | None = None,
    split: api.SplitOptions | None = None,
    write_compressed: list[str] | tuple[str, ...] = (),
    pack: bool = False,
    transport_size: bool = True,
    base: str | os.PathLike[str] | None = None,
) -> Recipe:
    """``recipe`` with the data and validation options a user gave beside ``--recipe`` replacing its own."""
    if target is not None and target not in TARGETS:
        raise OnnxCompressError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    for t in tolerance or []:
        Tolerance.parse(t)
    v = recipe.validate
    shapes = parse_shapes(shape)
    new_v = dataclasses.replace(
        v,
        skip=v.skip or skip_validation,
        tolerance=tuple(tolerance) if tolerance else v.tolerance,
        inputs=_abs(inputs) if inputs is not None else v.inputs,
        shapes=tuple((k, tuple(d)) for k, d in shapes.items()) if shapes else v.shapes,
        int_high=int_high if int_high is not None else v.int_high,
        labels=_abs(labels) if labels is not None else v.labels,
        label_output=label_output if label_output is not None else v.label_output,
    )
    return dataclasses.replace(
        recipe,
        calibration=_abs(calibration) if calibration is not None else recipe.calibration,
        target=target if target is not None else recipe.target,
        external_data=external_data if external_data is not None else recipe.external_data,
        validate=new_v,
        split=_abs_split(split) if split is not None else recipe.split,
        write_compressed=_formats(write_compressed) if write_compressed else recipe.write_compressed,
        pack=pack or recipe.pack,
        transport_size=transport_size and recipe.transport_size,
        base=_abs(base) if base is not None else recipe.base,
    )


def _abs(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))


def _formats(formats: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    for fmt in formats:
        if fmt not in io.COMPRESSED_FORMATS:
            raise OnnxCompressError(f"unknown compressed format {fmt!r}: choose gz or zst")
    return tuple(dict.fromkeys(formats))


def _abs_split(split: api.SplitOptions | None) -> api.SplitOptions | None:
    if split is None:
        return None
    split.check()
    return dataclasses.replace(split, outdir=_abs(split.outdir))


# --------------------------------------------------------------------------- writing


def to_toml(recipe: Recipe) -> str:
    """The recipe as TOML text that :func:`parse_recipe` reads back into an equal recipe."""
    lines = ["# onnxcompress recipe (onnxcompress compress MODEL -o OUT --recipe THIS_FILE)"]
    if recipe.description:
        lines.append(f"description = {_toml_str(recipe.description)}")
    lines.append(f"target = {_toml_str(recipe.target)}")
    if recipe.calibration is not None:
        lines.append(f"calibration = {_toml_str(recipe.calibration)}")
    if recipe.exclude:
        lines.append(f"exclude = {_toml_list(recipe.exclude)}")
    if recipe.external_data is not None:
        lines.append(f"external_data = {_toml_bool(recipe.external_data)}")
    if recipe.write_compressed:
        lines.append(f"write_compressed = {_toml_list(recipe.write_compressed)}")
    if recipe.pack:
        lines.append("pack = true")
    if not recipe.transport_size:
        lines.append("transport_size = false")
    if recipe.base is not None:
        lines.append(f"base = {_toml_str(recipe.base)}")
    if recipe.params:
        lines += ["", "[params]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in recipe.params]
    for spec in recipe.passes:
        lines += ["", "[[pass]]"]
        if spec.name in LOSSLESS or spec.name in NAMED:
            lines.append(f"name = {_toml_str(spec.name)}")
        else:
            lines += [f"name = {_toml_str(QUANTIZE)}", f"mode = {_toml_str(spec.name)}"]
        if spec.exclude:
            lines.append(f"exclude = {_toml_list(spec.exclude)}")
        if spec.params:
            inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in spec.params)
            lines.append(f"params = {{ {inner} }}")
    v = recipe.validate
    lines += ["", "[validate]"]
    if v.skip:
        lines.append("skip = true")
    if v.tolerance is not None:
        lines.append(f"tolerance = {_toml_list(v.tolerance)}")
    else:
        lines.append(f"# tolerance: the passes' defaults, {_toml_list(recipe.tolerances())}")
    if v.inputs is not None:
        lines.append(f"inputs = {_toml_str(v.inputs)}")
    if v.int_high != 100:
        lines.append(f"int_high = {v.int_high}")
    if v.labels is not None:
        lines.append(f"labels = {_toml_str(v.labels)}")
    if v.label_output is not None:
        lines.append(f"label_output = {_toml_str(v.label_output)}")
    if v.shapes:
        inner = ", ".join(f"{_toml_key(k)} = [{', '.join(map(str, d))}]" for k, d in v.shapes)
        lines.append(f"shapes = {{ {inner} }}")
    sp = recipe.split
    if sp is not None:
        lines += ["", "[split]"]
        if sp.max_part_size is not None:
            size = sp.max_part_size
            lines.append(f"max_part_size = {_toml_str(size) if isinstance(size, str) else size}")
        if sp.parts is not None:
            lines.append(f"parts = {sp.parts}")
        lines.append(f"balance = {_toml_str(sp.balance)}")
        if sp.outdir is not None:
            lines.append(f"outdir = {_toml_str(sp.outdir)}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; TOML also wants DEL escaped.
    return json.dumps(s).replace("\x7f", "\\u007f")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_bool(b: bool) -> str:
    return "true" if b else "false"


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(_toml_str(x) for x in items) + "]"


def _toml_value(text: str) -> str:
    """A setting as a TOML number or boolean when that reads back to the same text, else a string."""
    if text in ("true", "false"):
        return text
    if re.fullmatch(r"-?[0-9]+", text) and str(int(text)) == text:
        return text
    try:
        f = float(text)
    except ValueError:
        return _toml_str(text)
    if math.isfinite(f) and repr(f) == text and re.fullmatch(r"-?[0-9]+\.[0-9]+(e-?[0-9]+)?", text):
        return text
    return _toml_str(text)


def _key_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
