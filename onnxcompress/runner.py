"""Run a split model (a folder written by ``onnxcompress.split``) part after part in onnxruntime.

``SplitModel(outdir, resident=K)`` reads ``manifest.json``; each run feeds the parts in order, every
part getting the graph inputs and earlier activations it names. Before a part is loaded its files are
checked against the manifest's sha256 (and by the model loader's safety checks); with ``resident=1``
only one part is in memory at a time and it is freed after use. With ``K > 1`` the first ``K - 1``
parts stay loaded across runs and the others take turns in the last slot (with ``K >= parts`` all stay).
After each part, activations no later part reads are dropped.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import io
from .errors import OnnxCompressError
from .feeds import InputSpec, check_feed
from .split import FORMAT, MANIFEST, sha256_file
from .validate import make_session, run_session

log = logging.getLogger(__name__)


def _bad(outdir: Path, why: str) -> OnnxCompressError:
    return OnnxCompressError(f"{outdir / MANIFEST}: {why}; re-run onnxcompress split")


def _plain_name(outdir: Path, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or ":" in name:
        raise _bad(outdir, f"part file name {name!r} is not a plain file name in the folder")
    return name


def read_manifest(outdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the structure of ``OUTDIR/manifest.json``.

    Raises:
        OnnxCompressError: no manifest, not JSON, not a split manifest, or malformed entries.
    """
    outdir = Path(outdir)
    path = outdir / MANIFEST
    if not outdir.is_dir():
        raise OnnxCompressError(f"{outdir} is not a folder written by onnxcompress split")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OnnxCompressError(f"{outdir} has no {MANIFEST}: not a folder written by onnxcompress split") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _bad(outdir, f"cannot read it ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(outdir, "not an onnxcompress split manifest")
    parts = data.get("parts")
    if not isinstance(parts, list) or not parts:
        raise _bad(outdir, "it lists no parts")
    for key in ("inputs", "outputs"):
        if not isinstance(data.get(key), list) or not all(isinstance(v, dict) and "name" in v for v in data[key]):
            raise _bad(outdir, f"malformed {key!r}")
    for p in parts:
        if not isinstance(p, dict):
            raise _bad(outdir, "malformed part entry")
        files = p.get("files")
        if not isinstance(files, list) or not files:
            raise _bad(outdir, f"part {p.get('file')!r} lists no files")
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("sha256"), str):
                raise _bad(outdir, f"part {p.get('file')!r} has a file without sha256")
            _plain_name(outdir, f.get("name"))
        if _plain_name(outdir, p.get("file")) != files[0]["name"]:
            raise _bad(outdir, f"part {p.get('file')!r}: its first file must be the model")
        for key in ("inputs", "outputs"):
            if not isinstance(p.get(key), list) or not all(isinstance(n, str) for n in p[key]):
                raise _bad(outdir, f"part {p['file']!r} has malformed {key!r}")
    return data


def _np_dtype(name: str | None) -> np.dtype:
    try:
        code = onnx.TensorProto.DataType.Value(name or "")
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code))
    except (ValueError, KeyError, TypeError):
        return np.dtype(object)


class SplitModel:
    """A split model, run part after part (see the module docstring).

    Args:
        outdir: The folder written by ``onnxcompress split``.
        resident: How many parts may be loaded at once (1: one at a time, freed after use).
        threads: onnxruntime intra-op threads (0: its default).

    Raises:
        OnnxCompressError: a missing or malformed manifest, or a part file missing from the folder.
    """

    def __init__(self, outdir: str | os.PathLike[str], resident: int = 1, threads: int = 0) -> None:
        if resident < 1:
            raise OnnxCompressError(f"--resident {resident}: must be at least 1")
        self.outdir = Path(outdir)
        self.manifest = read_manifest(self.outdir)
        self.parts: list[dict[str, Any]] = self.manifest["parts"]
        self.resident = resident
        self.threads = threads
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        for p in self.parts:
            for f in p["files"]:
                if not (self.outdir / f["name"]).is_file():
                    raise OnnxCompressError(f"split part file {f['name']} is missing from {self.outdir}")
        produced = set(self.input_names)
        self._last_read: dict[str, int] = {}
        for i, p in enumerate(self.parts):
            for name in p["inputs"]:
                if name not in produced:
                    raise _bad(self.outdir, f"part {p['file']!r} reads {name!r}, which no earlier part gives")
                self._last_read[name] = i
            produced.update(p["outputs"])
        missing = [n for n in self.output_names if n not in produced]
        if missing:
            raise _bad(self.outdir, f"no part computes output {missing[0]!r}")
        self._sessions: dict[int, Any] = {}
        self.loads = 0  # parts loaded so far (for tests and benchmarks)

    # ---- information

    def input_signature(self) -> list[InputSpec]:
        """The original model's graph inputs (names, numpy dtypes, shapes with symbolic dims)."""
        return [
            InputSpec(i["name"], _np_dtype(i.get("dtype")), None if i.get("shape") is None else tuple(i["shape"]))
            for i in self.manifest["inputs"]
        ]

    def __len__(self) -> int:
        return len(self.parts)

    # ---- sessions

    def verify(self, index: int) -> None:
        """Check part ``index``'s files against the manifest's sha256 and the loader's safety checks."""
        part = self.parts[index]
        for f in part["files"]:
            path = self.outdir / f["name"]
            if path.is_symlink() or not path.is_file():
                raise OnnxCompressError(f"split part file {f['name']} is missing from {self.outdir}")
            if sha256_file(path) != f["sha256"]:
                raise OnnxCompressError(
                    f"split part file {f['name']} does not match the sha256 in {MANIFEST} "
                    "(modified or corrupted): re-run onnxcompress split"
                )
        proto = io.read_proto(self.outdir / part["file"])  # external-data paths stay inside the folder
        del proto

    def _pinned(self, index: int) -> bool:
        return self.resident >= len(self.parts) or index < self.resident - 1

    def _session(self, index: int) -> Any:
        if index in self._sessions:
            return self._sessions[index]
        self.verify(index)
        for i in [i for i in self._sessions if not self._pinned(i)]:
            del self._sessions[i]
        gc.collect()
        session = make_session(self.outdir / self.parts[index]["file"], threads=self.threads)
        self.loads += 1
        self._sessions[index] = session
        return session

    def _release(self, index: int) -> None:
        """Free part ``index`` unless it stays resident."""
        if not self._pinned(index) and self._sessions.pop(index, None) is not None:
            gc.collect()

    def close(self) -> None:
        """Free every loaded part."""
        self._sessions.clear()
        gc.collect()

    # ---- running

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one feed; returns ``{output name: array}`` in the original model's output order."""
        out = self.run_many([feeds])
        return {name: values[0] for name, values in out.items()}

    def run_many(self, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """Run several feeds, loading each part once for all of them.

        Returns:
            ``{output name: [array per feed]}`` in the original model's output order.

        Raises:
            OnnxCompressError: a feed lacks an input or has the wrong dtype/rank, a part's hash does
                not match, or onnxruntime fails on a part.
        """
        signature = self.input_signature()
        envs = [dict(check_feed(f, signature, f"inputs (feed {i})")) for i, f in enumerate(feeds)]
        outputs = set(self.output_names)
        for index, part in enumerate(self.parts):
            session = self._session(index)
            try:
                results = run_session(
                    session, [{n: env[n] for n in part["inputs"]} for env in envs], f"part {index + 1}"
                )
            finally:
                del session
                self._release(index)
            for name, values in results.items():
                for env, value in zip(envs, values):
                    env[name] = value
            for name in [n for n, last in self._last_read.items() if last == index and n not in outputs]:
                for env in envs:
                    env.pop(name, None)
        return {name: [env[name] for env in envs] for name in self.output_names}
