"""Input data for validation and calibration.

A *feed* is one ``{input name: array}`` dict, one onnxruntime run. Feeds come from

* a ``.npz`` file whose keys are the model's input names (one feed), or a folder of such files
  (one feed each, in name order); loaded with ``allow_pickle=False``, checked against the model's
  input signature (names, dtypes, ranks and static dimensions);
* sidecars next to the model: ``<stem>.inputs.npz`` (or a ``<stem>.inputs/`` folder) and
  ``<stem>.labels.npy`` for the labels, used when no ``--inputs`` is given;
* otherwise generated from the input signature with a fixed seed: floats standard normal, integers
  uniform in ``[0, int_high)``, booleans uniform; dynamic dimensions from ``shapes`` or 1.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OnnxCompressError
from .graph import Model

DEFAULT_GENERATED_FEEDS = 8


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (ints, or str/None for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_signature(model: Model) -> list[InputSpec]:
    """The model's graph inputs (initializers excluded)."""
    specs = []
    for t in model.graph.inputs:
        if t.dtype is None:
            raise OnnxCompressError(f"model input {t.name!r} has no declared dtype; cannot build feeds for it")
        try:
            dtype = np.dtype(t.dtype if not isinstance(t.dtype, int) else _onnx_to_np(t.dtype))
        except (TypeError, KeyError, ValueError):
            raise OnnxCompressError(
                f"model input {t.name!r} is not a tensor onnxcompress can feed (type {(str(t.dtype).split() or ['?'])[0]!s})"
            ) from None
        shape = None if t.shape is None else tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in t.shape)
        specs.append(InputSpec(t.name, dtype, shape))
    return specs


def _onnx_to_np(code: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code))


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ``["input=1x3x224x224", ...]`` into ``{name: [dims]}``."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        if not sep or not name:
            raise OnnxCompressError(f"bad --shape {item!r}: use NAME=1x3x224x224")
        try:
            values = [int(d) for d in dims.lower().replace(",", "x").split("x")] if dims else []
        except ValueError:
            raise OnnxCompressError(f"bad --shape {item!r}: dimensions must be integers like 1x3x224x224") from None
        if any(v < 0 for v in values):
            raise OnnxCompressError(f"bad --shape {item!r}: dimensions must be >= 0")
        shapes[name] = values
    return shapes


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise OnnxCompressError(f"inputs file {path} is a .npy array, not a .npz of named inputs")
            return {k: data[k] for k in data.files}
    except OnnxCompressError:
        raise
    except FileNotFoundError:
        raise OnnxCompressError(f"inputs file not found: {path}") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxCompressError(f"cannot read inputs file {path}: {msg}") from None


def check_feed(feed: dict[str, Any], signature: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    """Check a feed's names, dtypes, ranks and static dims against the signature.

    Raises:
        OnnxCompressError: naming the offending input and what was expected.
    """
    expected = {s.name: s for s in signature}
    names = ", ".join(expected) or "(none)"
    for key in feed:
        if key not in expected:
            raise OnnxCompressError(f"{source}: unknown input {key!r}; the model's inputs are: {names}")
    out = {}
    for spec in signature:
        if spec.name not in feed:
            raise OnnxCompressError(f"{source}: missing input {spec.name!r}; the model's inputs are: {names}")
        arr = np.asarray(feed[spec.name])
        if arr.dtype != spec.dtype:
            raise OnnxCompressError(
                f"{source}: input {spec.name!r} has dtype {arr.dtype}, the model expects {spec.dtype}"
            )
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise OnnxCompressError(
                    f"{source}: input {spec.name!r} has shape {list(arr.shape)}, the model expects rank "
                    f"{len(spec.shape)} {_fmt_shape(spec.shape)}"
                )
            for got, want in zip(arr.shape, spec.shape):
                if isinstance(want, int) and got != want:
                    raise OnnxCompressError(
                        f"{source}: input {spec.name!r} has shape {list(arr.shape)}, the model expects "
                        f"{_fmt_shape(spec.shape)}"
                    )
        out[spec.name] = arr
    return out


def _fmt_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def load_feeds(path: str | Path, signature: list[InputSpec], what: str = "inputs") -> list[dict[str, np.ndarray]]:
    """Load feeds from a ``.npz`` file or a folder of them, checked against ``signature``.

    ``what`` names the data in errors (``inputs`` or ``calibration``).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise OnnxCompressError(f"{what} folder {path} has no .npz files")
    elif path.exists():
        files = [path]
    else:
        raise OnnxCompressError(f"{what} file not found: {path}")
    return [check_feed(_read_npz(f), signature, f"{what} {f.name}") for f in files]


def load_labels(path: str | Path) -> np.ndarray:
    """Load integer labels (a 1-D ``.npy``, or a ``.npz`` with one array)."""
    path = Path(path)
    if not path.exists():
        raise OnnxCompressError(f"labels file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if len(data.files) != 1:
                    raise OnnxCompressError(f"labels file {path} must hold exactly one array")
                data = data[data.files[0]]
    except OnnxCompressError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise OnnxCompressError(f"cannot read labels file {path}: {str(exc).splitlines()[0]}") from None
    labels = np.asarray(data)
    if labels.dtype.kind not in "iu":
        raise OnnxCompressError(f"labels in {path} must be integers, got {labels.dtype}")
    return labels.reshape(-1).astype(np.int64)


def sidecar_inputs(model_path: str | Path) -> Path | None:
    """``<stem>.inputs.npz`` or a ``<stem>.inputs/`` folder next to the model, if present."""
    p = Path(model_path)
    for cand in (p.with_name(p.stem + ".inputs.npz"), p.with_name(p.stem + ".inputs")):
        if cand.exists():
            return cand
    return None


def sidecar_calibration(model_path: str | Path) -> Path | None:
    """``<stem>.calibration.npz`` or a ``<stem>.calibration/`` folder next to the model, if present."""
    p = Path(model_path)
    for cand in (p.with_name(p.stem + ".calibration.npz"), p.with_name(p.stem + ".calibration")):
        if cand.exists():
            return cand
    return None


def sidecar_labels(model_path: str | Path) -> Path | None:
    """``<stem>.labels.npy`` next to the model, if present."""
    p = Path(model_path)
    cand = p.with_name(p.stem + ".labels.npy")
    return cand if cand.exists() else None


def generate_feeds(
    signature: list[InputSpec],
    shapes: dict[str, list[int]] | None = None,
    *,
    count: int = DEFAULT_GENERATED_FEEDS,
    int_high: int = 100,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Random feeds from the input signature (see module docstring)."""
    shapes = shapes or {}
    unknown = set(shapes) - {s.name for s in signature}
    if unknown:
        names = ", ".join(s.name for s in signature)
        raise OnnxCompressError(f"--shape names unknown input {sorted(unknown)[0]!r}; the model's inputs are: {names}")
    if int_high < 1:
        raise OnnxCompressError("--int-high must be >= 1")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in signature:
            if spec.name in shapes:
                dims = shapes[spec.name]
                if spec.shape is not None and len(dims) != len(spec.shape):
                    raise OnnxCompressError(
                        f"--shape {spec.name}: rank {len(dims)} but the model expects {_fmt_shape(spec.shape)}"
                    )
                if spec.shape is not None:
                    for got, want in zip(dims, spec.shape):
                        if isinstance(want, int) and got != want:
                            raise OnnxCompressError(
                                f"--shape {spec.name}: {dims} conflicts with the model's {_fmt_shape(spec.shape)}"
                            )
            else:
                dims = [d if isinstance(d, int) else 1 for d in (spec.shape or ())]
            feed[spec.name] = _random(rng, spec.dtype, dims, int_high)
        feeds.append(feed)
    return feeds


def _random(rng: np.random.Generator, dtype: np.dtype, dims: list[int], int_high: int) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=dims).astype(np.bool_)
    if dtype.kind in "iu":
        high = min(int_high, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, high, size=dims).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(size=dims).astype(dtype)
    if dtype.kind == "U" or dtype.kind == "O":
        return np.array(rng.integers(0, int_high, size=dims).astype(str), dtype=object)
    raise OnnxCompressError(f"cannot generate inputs of dtype {dtype}: pass --inputs")
