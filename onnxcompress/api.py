"""The public operations: compress a model file, validate one model against another.

``compress`` is load -> pipeline of passes -> stage the output beside its final path -> validate the
staged file against the original in onnxruntime -> rename into place only if validation passes (or
``force``) -> report. The input model is never written; a failed run leaves no output behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx.defs

from . import feeds as feeds_mod
from . import io
from .errors import OnnxCompressError, ValidationFailed
from .graph import Model, unsupported_ops
from .passes.base import TARGETS, Params, PassContext, PassReport
from .pipeline import Pipeline
from .recipes import build_passes, default_tolerances
from .validate import Tolerance, ValidationReport, compare, release_memory

log = logging.getLogger(__name__)

MIN_OPSET = 7
# ``validate`` without tolerances: the worst sample's cosine. (top-1 agreement is not a default: on
# hidden-state outputs the argmax over the hidden axis is noise.)
DEFAULT_VALIDATE_TOLERANCES = ("cosine>=0.999",)


@dataclasses.dataclass
class FeedOptions:
    """Where validation inputs come from (see ``onnxcompress.feeds``).

    Attributes:
        inputs: A ``.npz`` file or a folder of them; ``None`` uses the model's sidecar or generates.
        shapes: ``{input: dims}`` for dynamic dimensions of generated inputs.
        int_high: Generated integer inputs are drawn from ``[0, int_high)``.
        labels: Integer labels (``.npy``) for accuracy; ``None`` uses the sidecar if any.
        label_output: The output holding class scores (default: the first output).
        num_generated: How many feeds to generate when none are given.
        seed: Seed of generated feeds.
    """

    inputs: str | Path | None = None
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    int_high: int = 100
    labels: str | Path | None = None
    label_output: str | None = None
    num_generated: int = feeds_mod.DEFAULT_GENERATED_FEEDS
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """Split the written model into parts (``compress --split-max-part-size``, a recipe's ``[split]``).

    Exactly one of ``max_part_size`` (bytes, or a size such as ``"50MB"``) and ``parts`` is given;
    ``outdir`` defaults to the output's path with the suffix ``.parts``.
    """

    max_part_size: int | str | None = None
    parts: int | None = None
    balance: str = "size"
    outdir: str | None = None

    def folder(self, output: Path) -> Path:
        return Path(self.outdir) if self.outdir else output.with_suffix(".parts")

    def check(self) -> None:
        """Raises OnnxCompressError for settings that cannot work (before any work is done)."""
        if (self.max_part_size is None) == (self.parts is None):
            raise OnnxCompressError("split: give exactly one of max_part_size and parts")
        if isinstance(self.max_part_size, str):
            io.parse_size(self.max_part_size)
        if self.parts is not None and self.parts < 1:
            raise OnnxCompressError(f"split: parts must be at least 1, got {self.parts}")
        if self.balance not in ("size", "flops"):
            raise OnnxCompressError(f"split: unknown balance {self.balance!r}: choose size or flops")


@dataclasses.dataclass
class CompressionReport:
    """What ``compress`` did: sizes, passes, validation, and where the output went."""

    input: dict[str, Any]
    output: dict[str, Any]
    size_ratio: float
    techniques: list[str]
    passes: list[PassReport]
    validation: ValidationReport | None
    seconds: float
    written: bool
    target: str = "standard"
    calibration: str | None = None
    split: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        """Whether validation passed (True when validation was skipped)."""
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (keys are a public contract)."""
        return {
            "input": self.input,
            "output": self.output,
            "size_ratio": round(self.size_ratio, 6),
            "techniques": self.techniques,
            "passes": [p.to_dict() for p in self.passes],
            "validation": self.validation.to_dict() if self.validation is not None else None,
            "seconds": round(self.seconds, 3),
            "written": self.written,
            "target": self.target,
            "calibration": self.calibration,
            "split": self.split,
        }


def check_runnable(model: Model) -> None:
    """Refuse models onnxruntime cannot run: opset out of range or ops nobody defines.

    Raises:
        OnnxCompressError: naming the opset or the first unknown op.
    """
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= model.opset <= max_opset:
        raise OnnxCompressError(
            f"unsupported opset {model.opset}: onnxcompress handles opsets {MIN_OPSET} to {max_opset}"
        )
    bad = unsupported_ops(model)
    if bad:
        node, op, domain = bad[0]
        where = f"{domain}::{op}" if domain else op
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise OnnxCompressError(
            f"unsupported op {where} in node {node!r}{more}: onnxruntime has no kernel for it; "
            "register the custom op or remove it before compressing"
        )


def resolve_feeds(
    model: Model, model_path: Path, opts: FeedOptions
) -> tuple[list[dict[str, np.ndarray]], str, np.ndarray | None]:
    """Feeds, their source description, and labels, per :class:`FeedOptions`."""
    signature = feeds_mod.input_signature(model)
    source_path = Path(opts.inputs) if opts.inputs is not None else feeds_mod.sidecar_inputs(model_path)
    if source_path is not None:
        feeds = feeds_mod.load_feeds(source_path, signature)
        source = str(source_path)
        labels_path = (
            opts.labels
            if opts.labels is not None
            else (feeds_mod.sidecar_labels(model_path) if opts.inputs is None else None)
        )
    else:
        if opts.labels is not None:
            raise OnnxCompressError("--labels needs --inputs: labels must belong to given inputs")
        feeds = feeds_mod.generate_feeds(
            signature, opts.shapes, count=opts.num_generated, int_high=opts.int_high, seed=opts.seed
        )
        source, labels_path = "generated", None
    labels = feeds_mod.load_labels(labels_path) if labels_path is not None else None
    return feeds, source, labels


def compress(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    techniques: list[str],
    *,
    feeds: FeedOptions | None = None,
    tolerances: list[str] | None = None,
    force: bool = False,
    external_data: bool | None = None,
    max_memory: int | None = None,
    validate: bool = True,
    progress: Callable[[str], None] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    target: str = "standard",
    exclude: list[str] | tuple[str, ...] = (),
    fold: bool = True,
    params: dict[str, str] | None = None,
    parts: bool = True,
    on_outputs: Callable[[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]], None] | None = None,
    split: SplitOptions | None = None,
    write_compressed: tuple[str, ...] | list[str] = (),
    pack: bool = False,
    transport_size: bool = True,
    base: str | os.PathLike[str] | None = None,
) -> CompressionReport:
    """Compress a model file and validate the result against the original.

    Args:
        model_path: The input ``.onnx`` (never modified).
        output: Where to write the compressed model (``<output>.data`` too for external data).
        techniques: Pass names from ``recipes.PASSES``, run in order.
        feeds: Validation inputs (default: sidecar ``<stem>.inputs.npz`` or generated).
        tolerances: Bounds like ``cosine>=0.999``; default: the techniques' defaults.
        force: Overwrite an existing output, and write it even if validation fails.
        external_data: Force external data on/off (default: as the input, and always over ~1.8 GB).
        max_memory: Memory budget in bytes for the loader's checks.
        validate: Set False to skip validation (the model is then written unchecked).
        progress: Called with a short message as each stage starts (load, each pass, write, validate).
        calibration: Calibration inputs (``.npz`` or a folder of them) for passes that fit to
            activations; default: ``<stem>.calibration.npz`` (or folder) beside the model, if any.
        target: ``standard`` (standard ONNX ops only) or ``onnxruntime`` (contrib ops allowed).
        exclude: Node names, op types or regexes that lossy passes leave in float.
        fold: Run the lossless ``fold`` simplifier first (unless ``techniques`` already has it).
        params: Pass settings (``{"block_size": "64"}``); a key no pass reads is an error.
        parts: Validate each concatenated part of Concat-produced outputs too (see ``validate``).
        on_outputs: Passed to :func:`onnxcompress.validate.compare` (both models' validation outputs).
        split: Also split the written model into parts (see :func:`onnxcompress.split.split_model`);
            the parts are checked against the written model (``max_abs<=1e-5`` on the feeds) and
            described under the report's ``split`` key.
        write_compressed: Also write each output file compressed beside it (``gz``: ``OUT.onnx.gz``,
            gzip -9; ``zst``: ``OUT.onnx.zst``, zstd -19), for download-size-bound deployments; the
            report's ``output.compressed`` gives their bytes and ratio to the input.
        pack: Also write the transport package ``OUT.ocpk`` (see :mod:`onnxcompress.transport`;
            ``onnxcompress unpack`` restores the output bit for bit).
        transport_size: Report ``output.transport_bytes``, the size of that package (computed
            without writing it unless ``pack``; a full coding pass: MiniLM's float16 output about
            0.5 s of CPU, its int8 outputs about 5 s, most of it the row search of the word embeddings).
        base: The previous release's compressed model: ``int8-weights`` reuses its scales and keeps
            its int8 symbols where the new weights round to them within tolerance, so the patch
            between the releases (``onnxcompress diff``) is small (see ``passes/quantize/rebase.py``).

    Returns:
        The report. If validation fails and not ``force``, raises :class:`ValidationFailed` carrying it.
    """
    start = time.perf_counter()
    in_path, out_path = Path(model_path), Path(output)
    io.check_output_path(out_path, force=force, protect=(in_path,))
    io.check_compressed_formats(write_compressed)
    if split is not None:
        split.check()
        split_dir = split.folder(out_path)
        if split_dir.exists() and not force:
            raise OnnxCompressError(f"split folder {split_dir} exists: pass --force to replace it")
    if target not in TARGETS:
        raise OnnxCompressError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    techniques = list(techniques)
    if fold and techniques and "fold" not in techniques:
        techniques.insert(0, "fold")
    tols = [Tolerance.parse(t) for t in (tolerances or default_tolerances(techniques))]
    passes = build_passes(techniques, Params(params))
    if base is not None:
        _use_base(passes, Path(base), in_path, out_path)
    note = progress or (lambda _message: None)
    note(f"loading {in_path.name}")
    model = io.load(in_path, max_memory=max_memory)
    check_runnable(model)
    in_size = _model_size(model)
    # Output parts need the original's graph re-read in validation: only when an output has any.
    parts = parts and _has_concat_output(model)
    feed_opts = feeds or FeedOptions()
    feed_list, source, labels = resolve_feeds(model, in_path, feed_opts) if validate else ([], "none", None)
    calib_path = Path(calibration) if calibration is not None else feeds_mod.sidecar_calibration(in_path)
    calib = (
        feeds_mod.load_feeds(calib_path, feeds_mod.input_signature(model), what="calibration")
        if calib_path is not None
        else None
    )
    ctx = PassContext(feeds=feed_list, calibration=calib, target=target, exclude=tuple(exclude))
    pass_reports = Pipeline(passes, on_start=lambda p: note(f"running {p.name}")).run(model, ctx)
    del passes, ctx  # passes may keep per-run state (Hessians, caches): free it before writing
    note(f"writing {out_path.name}")
    staged = io.stage(model, out_path, external=external_data, force=force, protect=(in_path,), check=False)
    del model
    release_memory()  # graphsurgeon graphs hold reference cycles: free the weights before validation
    try:
        io.check_written(staged.path)  # onnx's checker re-reads the file: after the graph is freed
        release_memory()
        report_v = None
        if validate:
            note("validating in onnxruntime")
            report_v = compare(
                in_path,
                staged.path,
                feed_list,
                tols,
                labels=labels,
                label_output=feed_opts.label_output,
                feeds_source=source,
                parts=parts,
                on_outputs=on_outputs,
            )
        out_size = sum((staged.tmpdir / f).stat().st_size for f in staged.files)
        write = report_v is None or report_v.passed or force
        if write:
            staged.commit()
        else:
            staged.discard()
    except BaseException:
        staged.discard()
        raise
    compressed: dict[str, Any] = {}
    transport_bytes: int | None = None
    packed: dict[str, Any] | None = None
    if write and (pack or transport_size):
        from . import transport

        release_memory()  # validation's freed session memory: not counted again under the coding pass
        if pack:
            note(f"packing {out_path.with_suffix('.ocpk').name}")
            stats = transport.pack(out_path, out_path.with_suffix(".ocpk"), force=force)
            transport_bytes = int(stats["package_bytes"])
            packed = {"path": str(out_path.with_suffix(".ocpk")), "bytes": transport_bytes}
        else:
            note("measuring the transport size")
            try:
                transport_bytes = transport.packed_size(out_path)
            except Exception as exc:  # the size is extra detail: never fail a written model on it
                log.warning("transport size not measured: %s: %s", type(exc).__name__, exc)
    if write:
        for fmt in dict.fromkeys(write_compressed):
            note(f"writing {out_path.name}.{fmt}")
            files = [io.write_compressed(out_path.parent / f, fmt) for f in staged.files]
            size = sum(f.stat().st_size for f in files)
            compressed[fmt] = {
                "files": [str(f) for f in files],
                "bytes": size,
                "ratio": round(size / in_size, 6) if in_size else None,
            }
    split_info = None
    if split is not None and write:
        from .runner import SplitModel
        from .split import split_model

        note(f"splitting {out_path.name}")
        split_dir = split.folder(out_path)
        sr = split_model(
            out_path,
            split_dir,
            max_part_size=split.max_part_size,
            parts=split.parts,
            balance=split.balance,
            force=force,
            max_memory=max_memory,
        )
        split_info = sr.to_dict()
        if validate and feed_list:
            note("checking the parts against the written model")
            sv = compare(
                out_path,
                split_dir,
                feed_list,
                ["max_abs<=1e-5"],
                feeds_source=source,
                parts=False,
                candidate_runner=SplitModel(split_dir).run_many,
            )
            split_info["validation"] = sv.to_dict()
            if not sv.passed:
                raise OnnxCompressError(f"the parts in {split_dir} differ from {out_path}: {sv.failures[0]}")
    report = CompressionReport(
        input={"path": str(in_path), "size_bytes": in_size},
        output={
            "path": str(out_path),
            "size_bytes": out_size,
            "written": write,
            "files": [str(out_path.parent / f) for f in staged.files],
            "transport_bytes": transport_bytes,
            **({"package": packed} if packed else {}),
            **({"compressed": compressed} if compressed else {}),
        },
        size_ratio=out_size / in_size if in_size else 1.0,
        techniques=list(techniques),
        passes=pass_reports,
        validation=report_v,
        seconds=time.perf_counter() - start,
        written=write,
        target=target,
        calibration=str(calib_path) if calib_path is not None else None,
        split=split_info,
    )
    if report_v is not None and not report_v.passed:
        what = "written anyway (--force)" if write else "not written"
        raise ValidationFailed(f"validation failed ({report_v.failures[0]}); {out_path} {what}", report)
    return report


def _use_base(passes: list[Any], base: Path, in_path: Path, out_path: Path) -> None:
    """Give ``base`` to the int8 weight passes (``compress --base``).

    Raises:
        OnnxCompressError: no such file, the base is the input or the output, or no pass can use it.
    """
    from .passes.quantize import Int8WeightsPass

    if not base.is_file():
        raise OnnxCompressError(f"--base {base}: no such file (the previous release's compressed model)")
    if base.resolve() in (in_path.resolve(), out_path.resolve()):
        raise OnnxCompressError(
            f"--base {base}: must be the previous release's compressed model, not the input or output"
        )
    users = [p for p in passes if isinstance(p, Int8WeightsPass)]
    if not users:
        raise OnnxCompressError("--base needs -q int8-weights (or int8-weights-qdq): only they reuse a base's symbols")
    for p in users:
        if p.config.bits != 8 or p.config.bits_by_tensor:
            raise OnnxCompressError("--base reuses 8-bit symbols: drop --param bits / bits_by_tensor (int8-weights)")
        p.config = dataclasses.replace(p.config, base=str(base))


def _has_concat_output(model: Model) -> bool:
    """Whether a main-graph output is produced by a ``Concat`` (through the ops ``validate`` traces)."""
    from .validate import PART_CHAIN_OPS

    for out in model.graph.outputs:
        t = out
        while t.inputs:  # the producing node, if any
            node = t.inputs[0]
            if (node.domain or "") not in ("", "ai.onnx"):
                break
            if node.op == "Concat":
                return len(node.inputs) >= 2
            if node.op not in PART_CHAIN_OPS or not node.inputs:
                break
            t = node.inputs[0]
    return False


def _model_size(model: Model) -> int:
    from .stats import model_size

    return model_size(model)


def validate(
    original: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    feeds: FeedOptions | None = None,
    tolerances: list[str] | None = None,
    max_memory: int | None = None,
    parts: bool = True,
    on_outputs: Callable[[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]], None] | None = None,
) -> ValidationReport:
    """Compare two model files in onnxruntime on the same feeds.

    Both files go through the loader's safety checks first. Returns the report whether it passed
    or not (the CLI maps ``passed=False`` to exit 1).
    """
    a_path, b_path = Path(original), Path(candidate)
    tols = [Tolerance.parse(t) for t in (tolerances or list(DEFAULT_VALIDATE_TOLERANCES))]
    a = io.load(a_path, max_memory=max_memory)
    check_runnable(a)
    from .split import is_split_dir

    runner = None
    if is_split_dir(b_path):  # a folder written by split: run its parts in turn
        from .runner import SplitModel

        split = SplitModel(b_path)
        signature, runner = split.input_signature(), split.run_many
    else:
        b = io.load(b_path, max_memory=max_memory)
        check_runnable(b)
        signature = feeds_mod.input_signature(b)
        del b
    feed_opts = feeds or FeedOptions()
    feed_list, source, labels = resolve_feeds(a, a_path, feed_opts)
    feeds_mod.check_feed(feed_list[0], signature, "candidate inputs") if feed_list else None
    del a
    return compare(
        a_path,
        b_path,
        feed_list,
        tols,
        labels=labels,
        label_output=feed_opts.label_output,
        feeds_source=source,
        parts=parts,
        on_outputs=on_outputs,
        candidate_runner=runner,
    )


def load(path: str | os.PathLike[str], *, max_memory: int | None = None) -> Model:
    """Load a model with the untrusted-input checks (see ``onnxcompress.io``)."""
    return io.load(path, max_memory=max_memory)
