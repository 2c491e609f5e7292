"""Delta updates: ``diff OLD NEW -> PATCH.ocpd`` and ``patch OLD PATCH.ocpd -> NEW``, exact.

A patch is a package of NEW (same container, magic ``OCPD``) in which

* each tensor whose name, element type and size match a tensor of OLD is coded, chunk by chunk, as a
  delta against the same byte range of the old tensor when that is smaller: integer symbols as
  ``(new - old) mod 2^8`` per symbol (``mod 16`` per nibble), floats as ``new XOR old``. Symbols a
  re-quantization kept turn into zeros, which the rANS coder stores in a fraction of a bit each;
* the graph bytes (and the padding of data files) are zstd-coded with the old file's graph bytes
  as a raw-content dictionary, so unchanged nodes and names cost a few bytes per match.

The patch records the sha256 and size of every OLD file it was made from; ``patch`` checks them
before decoding anything (a wrong base is refused), then restores NEW and checks every tensor and
file hash like ``unpack`` does. Nothing is written unless every check passes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import OnnxCompressError
from .container import MAGIC_PATCH, Base, _check_out, _tmpdir, commit_files, model_layout, read_package, write_atomic


def diff(
    old_path: str | os.PathLike[str],
    new_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Write a patch that turns model OLD into model NEW.

    Returns: stats like :func:`~onnxcompress.transport.pack`'s, plus ``delta_chunks`` (chunks coded
    against OLD).
    """
    old, new, out = Path(old_path), Path(new_path), Path(out_path)
    base = Base.of(old)
    files = model_layout(new)
    _check_out(out, force, [f.path for f in files] + [f.path for f in base.files])
    stats = write_atomic(out, files, base=base)
    stats["output"] = str(out)
    return stats


def patch(
    old_path: str | os.PathLike[str],
    patch_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Restore NEW from OLD and a patch made by :func:`diff`; every hash is checked first.

    Raises:
        OnnxCompressError: OLD is not the model the patch was made from, or the patch is corrupt.
    """
    old, pkg, out = Path(old_path), Path(patch_path), Path(out_path)
    base = Base.of(old)
    protect = [pkg] + [f.path for f in base.files]
    _check_out(out, force, protect)
    tmp = _tmpdir(out.parent)
    try:
        result = read_package(pkg, tmp, out.name, magic=MAGIC_PATCH, base=base)
        result["written"] = commit_files(tmp, result["files"], out, force, protect)
    except OSError as exc:
        raise OnnxCompressError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["output"] = str(out)
    return result
