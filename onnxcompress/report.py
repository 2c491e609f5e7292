"""Rendering of reports: JSON files, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import OnnxCompressError


def to_json(data: dict[str, Any]) -> str:
    """Stable, indented JSON (no NaN/Infinity: reports carry only finite numbers or null)."""
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=str)


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    if path.is_symlink():
        raise OnnxCompressError(f"report path {path} is a symlink: refusing to write through it")
    if not path.parent.exists():
        raise OnnxCompressError(f"report folder {path.parent} does not exist")
    text = to_json(data)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxcompress-report-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxCompressError(f"cannot write report {path}: {exc.strerror or exc}") from None
    return path
