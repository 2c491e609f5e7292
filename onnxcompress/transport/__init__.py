"""Transport: pack a model into the fewest bytes and restore it exactly; diff and patch versions.

``pack``/``unpack`` (``container``) code every tensor by kind (``codecs``) and restore the files
bit-identical; ``diff``/``patch`` (``delta``) code a new version against an old one.
"""

from __future__ import annotations

from .container import PackageError, pack, packed_size, unpack
from .delta import diff, patch

__all__ = ["PackageError", "diff", "pack", "packed_size", "patch", "unpack"]
