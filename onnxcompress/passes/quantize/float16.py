"""Half precision: store float32 weights as float16 or bfloat16, optionally compute in it too.

Conversion is a rounding ``W' = round_nearest_even(W)`` to the target type: relative error
``|W - W'| <= 2^-11 |W|`` for float16 (10 mantissa bits) and ``2^-8 |W|`` for bfloat16 (7 bits),
for values inside the target's normal range. float16 tops out at ``65504`` and has no normal
values below ``6.1e-5`` (subnormals down to ``6e-8``); bfloat16 has float32's exponent range but
rounds float32's largest values (``|x| > 3.3895e38``, e.g. ``finfo(float32).min`` used as an
attention-mask constant) to infinity.

Two modes (``--param compute=``):

* ``float32`` (default): *storage* only. Each float32 constant of at least ``min_elements`` values
  that a node reads as data becomes a half constant plus one ``Cast`` back to float32 shared by all
  its readers. Runtimes fold that Cast once when the model is loaded (onnxruntime's constant
  folding does), so the file is half the size and inference runs the float32 kernels at the
  original speed, on weights rounded as above. On all-MiniLM-L6-v2 with onnxruntime CPU this gives
  size 0.50, worst embedding cosine 0.999999 and latency 1.00x; true float16 compute (below) gives
  about 1.07x: onnxruntime's CPU execution provider has float16 kernels for few ops and wraps the
  others in Casts at every call. bfloat16 compute cannot run at all on onnxruntime's CPU provider
  (no bfloat16 Add, MatMul, ... kernels), so storage is the only mode a CPU user can run.
* ``float16`` / ``bfloat16`` (the pass's own type): *compute*. Every node whose ONNX schema, at the
  model's opset, allows the target type where it reads or writes float32 computes in it: its
  float32 constants are converted directly (no Cast node), ``Cast(to=float)`` becomes
  ``Cast(to=target)``, and a ``Cast`` is inserted at each boundary between a float32 tensor and a
  half reader (or the reverse): one per tensor and type, shared by every reader, placed in the graph
  that computes the tensor, and never a pair that cancels (casting a tensor back reuses its source).
  This is what GPU users want (tensor-core MatMul/Conv, half the activation memory).

Kept in float32 in compute mode, each with its reason in ``report.skipped``:

* ops in ``block_ops`` (default ``DEFAULT_BLOCK_OPS``; ``--param block_ops=Op1,Op2`` replaces the
  list, ``block_ops=`` empties it): numerically sensitive ones, namely

  - long reductions and accumulations (``ReduceSum``, ``ReduceMean``, ``ReduceSumSquare``,
    ``ReduceL1``, ``ReduceL2``, ``ReduceLogSum``, ``ReduceLogSumExp``, ``ReduceProd``, ``CumSum``,
    losses): a float16 sum of ``n`` terms has relative error up to ``n * 2^-11`` and sums of
    squares overflow 65504 from inputs of 256;
  - normalisations that compute a variance in the input type (``InstanceNormalization``,
    ``GroupNormalization``, ``MeanVarianceNormalization``, ``LpNormalization``).
    ``LayerNormalization`` is not blocked: its ``stash_type`` (default float32) makes it compute
    mean and variance in float32 whatever its input type; ``BatchNormalization`` at inference is a
    per-channel affine map;
  - ``Pow`` and ``Exp`` (overflow: ``x^2`` above 256, ``e^x`` above 11.1);
  - ``RoiAlign`` and ``TopK`` (box coordinates above 2048 lose integer precision; near ties reorder);
  - ``Range`` (index arithmetic);
* nodes excluded by ``--exclude`` (name, op type or regex);
* ops whose type constraint does not list the target type at the model's opset (checked with
  ``onnx.defs`` schemas; bfloat16 support is much narrower and most ops only gained it at opset 13+);
* ops on sequences or optionals (their element type is tied to the tensors they hold);
* ops outside the standard domain, ops with subgraphs (If/Loop/Scan: their own inputs and outputs
  stay float32 while the nodes of their bodies are converted like any other), and ops whose output
  type is set by an attribute (``ConstantOfShape``, ``RandomNormal``, ``EyeLike``, ...);
* index arithmetic: nodes whose float32 results only feed ``Cast`` to integer types (directly or
  through other such nodes), e.g. ``Shape -> Cast -> Mul -> Floor -> Cast``: float16 has integer
  precision only up to 2048;
* nodes that read a constant which would overflow to infinity (``|x| > 65504`` for float16) or,
  for constants of at most ``SMALL_CONSTANT`` values (epsilons, scalars), underflow from nonzero to
  zero. With ``--param overflow=clamp`` overflowing constants are clipped to the largest finite
  value instead (a mask constant ``-3.4e38`` becomes ``-65504``, which still zeroes a softmax).

In storage mode the same overflow rule keeps such constants float32; weights of every reader are
stored in half, blocked ops included (only the compute is sensitive, not a ``2^-11`` rounding of a
weight). Only data operands are stored in half: inputs whose schema type allows float16 (so not
``Resize`` scales or other fixed-float32 operands, whose rounding could change output shapes);
the reader's own bfloat16 support does not matter there, since it reads float32 again.

Graph inputs and outputs keep float32 (``keep_io_types=true``, default); ``keep_io_types=false``
makes every float32 input and output of the main graph float16/bfloat16 (callers then feed and
receive half arrays). Subgraph inputs and outputs always keep their types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.defs
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import (
    GraphTree,
    Model,
    all_tensor_names,
    constant_meta,
    constant_value,
    fresh_name,
    is_graph_io,
    iter_graphs,
)
from ...shapes import TensorFacts
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ._common import refuse_quantized

FLOAT = onnx.TensorProto.FLOAT
DTYPES = {
    "float16": (onnx.TensorProto.FLOAT16, np.dtype(np.float16)),
    "bfloat16": (onnx.TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
}
PASS_NAMES = {"float16": "fp16", "bfloat16": "bf16"}
DEFAULT_BLOCK_OPS = (
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss",
    "InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization", "LpNormalization",
    "Pow", "Exp", "RoiAlign", "TopK", "Range",
)  # fmt: skip
# Ops whose output type is fixed by an attribute (or that make values): never converted.
ATTRIBUTE_TYPED_OPS = frozenset(
    {
        "Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
        "Multinomial", "Bernoulli", "EyeLike",
    }
)  # fmt: skip
# Ops that read only the shape of their input: they take it in whatever type it has (no Cast).
METADATA_OPS = frozenset({"Shape", "Size"})
SMALL_CONSTANT = 16  # constants up to this size must not underflow from nonzero to zero
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class FloatConfig:
    """Options for :class:`FloatPass` (see the module docstring).

    Attributes:
        dtype: ``float16`` or ``bfloat16``.
        compute: ``float32`` (half storage, float32 compute) or the target type (half compute).
        keep_io_types: Keep the main graph's float32 inputs and outputs.
        block_ops: Op types kept in float32 in compute mode.
        overflow: ``keep`` (leave overflowing constants and their readers in float32) or ``clamp``.
        min_elements: In storage mode, constants with fewer values stay float32.
    """

    dtype: str = "float16"
    compute: str = "float32"
    keep_io_types: bool = True
    block_ops: tuple[str, ...] = DEFAULT_BLOCK_OPS
    overflow: str = "keep"
    min_elements: int = 16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}")
        if self.compute not in ("float32", self.dtype):
            raise ValueError(f"compute must be float32 or {self.dtype}")
        if self.overflow not in ("keep", "clamp"):
            raise ValueError("overflow must be keep or clamp")


def float_config(params: Params, dtype: str) -> FloatConfig:
    """The config from ``--param`` settings (``compute``, ``keep_io_types``, ``block_ops``, ``overflow``,
    ``min_elements``)."""
    compute = params.get_str("compute", "float32", ("float32", dtype))
    keep_io = params.get_bool("keep_io_types", True)
    raw_block = params.get_str("block_ops", ",".join(DEFAULT_BLOCK_OPS))
    overflow = params.get_str("overflow", "keep", ("keep", "clamp"))
    min_elements = params.get_int("min_elements", FloatConfig.min_elements)
    if min_elements < 1:
        raise OnnxCompressError(f"--param min_elements={min_elements}: must be >= 1")
    block = tuple(op.strip() for op in raw_block.split(",") if op.strip())
    return FloatConfig(dtype, compute, keep_io, block, overflow, min_elements)


@dataclasses.dataclass
class _ConstInfo:
    """What converting one constant would do to it."""

    overflow: bool
    underflow: bool


class FloatPass:
    """float32 -> float16/bfloat16 storage or compute (see module docstring)."""

    def __init__(self, config: FloatConfig | None = None) -> None:
        self.config = config or FloatConfig()
        self.name = PASS_NAMES[self.config.dtype]

    # ----------------------------------------------------------------------------------- driver

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Convert ``model`` in place (every graph, subgraphs included)."""
        refuse_quantized(model, self.name)
        cfg = self.config
        report = PassReport(self.name)
        before = GraphSize.of(model)
        rw = _Rewriter(model, cfg, ctx, report)
        if rw.unsupported:
            report.skipped.append(("<model>", rw.unsupported))
            report.stats = before.stats(model, False, nonstandard_ops=[], layers=[])
            return report
        changed = rw.rewrite()
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = changed
        report.stats = before.stats(model, changed, **rw.stats())
        return report


class _Rewriter:
    """One conversion of one model: the plan (which node positions take the target type), then the edit."""

    def __init__(self, model: Model, cfg: FloatConfig, ctx: PassContext, report: PassReport) -> None:
        self.model, self.cfg, self.ctx, self.report = model, cfg, ctx, report
        self.code, self.np_dtype = DTYPES[cfg.dtype]
        self.type_str = f"tensor({cfg.dtype})"
        self.compute = cfg.compute != "float32"
        self.opset = model.opset
        self.unsupported = self._cast_support()
        self.facts = TensorFacts(model)
        self.tree = GraphTree(model.graph)
        self.names = all_tensor_names(model.graph)
        self._orig: dict[int, int | None] = {}
        self.new_type: dict[int, int] = {}  # id(tensor) -> its type after the rewrite, where changed
        self.casts: dict[tuple[int, int], gs.Tensor] = {}  # (id(tensor), type) -> tensor holding it in that type
        self.const_info: dict[int, _ConstInfo] = {}
        self.done: set[tuple[int, int]] = set()  # reader positions rewired to a converted constant
        self.home: dict[int, gs.Graph] = {}
        for g in self.tree.graphs.values():
            for t in g.inputs:
                self.home[id(t)] = g
        self.counts = {"nodes_converted": 0, "casts_inserted": 0, "constants_converted": 0, "constants_clamped": 0}
        self.layers: list[dict[str, Any]] = []
        self.op_counts: dict[str, int] = {}

    # --------------------------------------------------------------------------------- helpers

    def _cast_support(self) -> str | None:
        """Why no conversion is possible at this opset (Cast must accept the target type), or None."""
        allowed = _allowed(_schema("Cast", self.opset), "input", 0)
        if allowed is None or self.type_str not in allowed:
            return f"opset {self.opset}: Cast does not accept {self.cfg.dtype} (bfloat16 needs opset 13)"
        return None

    def orig(self, t: gs.Tensor) -> int | None:
        """The tensor's ONNX type before the rewrite (None if unknown)."""
        if not t.name:
            return None
        key = id(t)
        if key not in self._orig:
            self._orig[key] = self.facts.dtype(t)
        return self._orig[key]

    def _record_types(self) -> None:
        """Read every tensor's type once, before anything changes."""
        self.facts.infer()
        for g in self.tree.graphs.values():
            for t in list(g.inputs) + list(g.outputs):
                self.orig(t)
            for node in g.nodes:
                for t in list(node.inputs) + list(node.outputs):
                    self.orig(t)

    def now(self, t: gs.Tensor) -> int | None:
        return self.new_type.get(id(t), self.orig(t))

    def _home_graph(self, t: gs.Tensor) -> gs.Graph:
        if t.inputs:
            return self.tree.node_graph.get(id(t.inputs[0]), self.tree.root)
        return self.home.get(id(t), self.tree.root)

    def _np(self, code: int) -> Any:
        """The dtype to give a graphsurgeon Variable of type ``code`` (bfloat16 as its ONNX code)."""
        if code == FLOAT:
            return np.float32
        return np.float16 if code == onnx.TensorProto.FLOAT16 else code

    def cast(self, t: gs.Tensor, to: int) -> gs.Tensor:
        """``t`` in type ``to``: one shared Cast per tensor and type, placed where ``t`` is computed."""
        key = (id(t), to)
        if key in self.casts:
            return self.casts[key]
        src_type = self.now(t)
        suffix = "float32" if to == FLOAT else self.cfg.dtype
        out = gs.Variable(fresh_name(self.names, f"{t.name}_{suffix}"), dtype=self._np(to), shape=t.shape)
        node = gs.Node("Cast", name=fresh_name(self.names, f"{t.name}_Cast_{suffix}"), attrs={"to": to})
        node.inputs.append(t)
        node.outputs.append(out)
        graph = self._home_graph(t)
        graph.nodes.append(node)
        self.tree.node_graph[id(node)] = graph
        self.done.add((id(node), 0))
        self.new_type[id(out)] = to
        self.casts[key] = out
        if src_type is not None:
            self.casts[(id(out), src_type)] = t  # casting back reuses the source: no cancelling pair
        self.counts["casts_inserted"] += 1
        return out

    def convert_array(self, w: np.ndarray) -> np.ndarray:
        """``w`` in the target type (clipped to its finite range with ``overflow=clamp``)."""
        if self.cfg.overflow == "clamp":
            top = float(ml_dtypes.finfo(self.np_dtype).max)
            w = np.where(np.isfinite(w), np.clip(w, -top, top), w)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            return w.astype(self.np_dtype)

    def info(self, t: gs.Tensor, w: np.ndarray | None = None) -> _ConstInfo:
        """Whether converting the float32 constant ``t`` (value ``w`` if already read) would overflow
        (``|x|`` above the target's largest finite value) or, for small ones, underflow to zero."""
        key = id(t)
        if key not in self.const_info:
            if w is None:
                w = constant_value(t, cache=False)
            assert w is not None
            top = float(ml_dtypes.finfo(self.np_dtype).max)
            with np.errstate(invalid="ignore"):
                amax = float(np.max(np.abs(w), where=np.isfinite(w), initial=0.0)) if w.size else 0.0
            overflow = amax > top
            underflow = False
            if w.size <= SMALL_CONSTANT:
                with np.errstate(over="ignore", under="ignore"):
                    underflow = bool(np.any((w.astype(self.np_dtype) == 0) & (w != 0)))
            if overflow:
                what = (
                    "tensor and readers kept float32"
                    if self.cfg.overflow == "keep"
                    else f"clipped to +-{top:.6g} (overflow=clamp)"
                )
                self.report.skipped.append((t.name, f"values up to {amax:.4g} overflow {self.cfg.dtype}: {what}"))
            elif underflow:
                self.report.skipped.append(
                    (t.name, f"small nonzero values underflow to 0 in {self.cfg.dtype}: kept float32")
                )
            self.const_info[key] = _ConstInfo(overflow, underflow)
        return self.const_info[key]

    # ------------------------------------------------------------------------------------ plan

    def plan(self) -> dict[tuple[int, int], bool]:
        """``{(id(node), input index): True}`` for every input position that takes the target type;
        records the converted nodes' outputs in ``new_type``."""
        want: dict[tuple[int, int], bool] = {}
        self._record_types()
        graphs = list(iter_graphs(self.model.graph))
        for g in graphs:
            try:
                g.toposort(recurse_subgraphs=False)
            except Exception:  # noqa: BLE001 - a cyclic/odd graph: plan without the index-arithmetic rule
                pass
        index_nodes = self._index_arithmetic(graphs)
        for g in graphs:
            for node in g.nodes:
                if self.compute:
                    self._plan_compute(node, want, index_nodes)
                else:
                    self._plan_storage(node, want)
        return want

    def _index_arithmetic(self, graphs: Iterable[gs.Graph]) -> set[int]:
        """Nodes whose float32 results only feed Casts to non-float types (directly or through such nodes)."""
        marked: set[int] = set()
        if not self.compute:
            return marked
        for g in graphs:
            outs = {id(t) for t in g.outputs}
            for node in reversed(g.nodes):
                floats = [t for t in node.outputs if self.orig(t) == FLOAT]
                if not floats or any(id(t) in outs for t in floats):
                    continue
                readers = [c for t in floats for c in t.outputs]
                if readers and all(
                    self.tree.node_graph.get(id(c)) is g and (id(c) in marked or _casts_to_integer(c)) for c in readers
                ):
                    marked.add(id(node))
        return marked

    def _float_positions(self, node: gs.Node, schema: Any) -> list[tuple[str, int, gs.Tensor, set[str] | None, str]]:
        """``[(side, index, tensor, allowed type strings, type parameter)]`` for every non-empty position."""
        out = []
        for side, tensors in (("input", node.inputs), ("output", node.outputs)):
            for i, t in enumerate(tensors):
                if not t.name:
                    continue
                formal = _formal(schema, side, i)
                if formal is None:
                    out.append((side, i, t, None, ""))
                    continue
                out.append((side, i, t, _allowed(schema, side, i), formal.type_str))
        return out

    def _skip(self, node: gs.Node, reason: str) -> None:
        self.report.skipped.append((node.name or node.op, reason))

    def _plan_compute(self, node: gs.Node, want: dict[tuple[int, int], bool], index_nodes: set[int]) -> None:
        floats_in = [t for t in node.inputs if t.name and self.orig(t) == FLOAT]
        floats_out = [t for t in node.outputs if self.orig(t) == FLOAT]
        if (not floats_in and not floats_out) or node.op in METADATA_OPS:
            return None
        if node.domain not in STANDARD_DOMAINS and node.domain is not None:
            return self._skip(node, f"domain {node.domain!r}: not a standard op, kept float32")
        if is_excluded(node.name, node.op, self.ctx.exclude):
            return self._skip(node, "excluded by configuration")
        if node.op in self.cfg.block_ops:
            return self._skip(node, f"{node.op} is numerically sensitive (block_ops): kept float32")
        if any(isinstance(v, gs.Graph) or _is_graph_list(v) for v in node.attrs.values()):
            return self._skip(node, f"{node.op} has subgraphs: its inputs/outputs stay float32, its bodies convert")
        if node.op in ATTRIBUTE_TYPED_OPS:
            if node.op == "Constant" or not floats_out:
                return None
            return self._skip(node, f"{node.op} output type is set by an attribute: kept float32")
        if id(node) in index_nodes:
            return self._skip(node, "index arithmetic (results only feed Casts to integers): kept float32")
        if node.op == "Cast":
            return self._plan_cast(node, want)
        schema = _schema(node.op, self.opset)
        if schema is None:
            return self._skip(node, f"no schema for {node.op} at opset {self.opset}: kept float32")
        positions = self._float_positions(node, schema)
        if any(a and all(x.startswith(("seq(", "optional(")) for x in a) for *_r, a, _p in positions):
            return self._skip(node, f"{node.op} reads or writes sequences/optionals: kept float32")
        params: set[str] = set()
        for _side, _i, t, allowed, param in positions:
            if allowed is not None and self.type_str in allowed and self.orig(t) == FLOAT:
                params.add(param)
        if not params:
            return self._skip(node, f"{node.op}-{schema.since_version} does not accept {self.cfg.dtype}: kept float32")
        chosen = [p for p in positions if p[4] in params]
        if any(self.orig(t) is None for _s, _i, t, _a, _p in chosen):
            return self._skip(node, "type of an input or output unknown (shape inference): kept float32")
        if any(p[3] is None for p in positions):
            return self._skip(node, "more inputs/outputs than its schema declares: kept float32")
        for side, _i, t, _a, _p in chosen:
            if side == "input" and constant_meta(t) is not None and constant_meta(t)[1] == np.float32:
                info = self.info(t)
                if info.overflow and self.cfg.overflow == "keep" or info.underflow:
                    return self._skip(node, f"reads constant {t.name!r} that does not fit {self.cfg.dtype}")
        for side, i, t, _a, _p in chosen:
            if side == "input":
                want[(id(node), i)] = True
            else:
                self.new_type[id(t)] = self.code
                t.dtype = self._np(self.code)
        self._converted(node)

    def _plan_cast(self, node: gs.Node, want: dict[tuple[int, int], bool]) -> None:
        """A Cast computing float32 computes the target type instead; its input is read as it is."""
        out = node.outputs[0]
        if self.orig(out) != FLOAT or not node.inputs:
            return
        allowed = _allowed(_schema("Cast", self.opset), "output", 0)
        if allowed is None or self.type_str not in allowed:
            return
        node.attrs["to"] = self.code
        if self.orig(node.inputs[0]) == FLOAT:
            want[(id(node), 0)] = True
        self.new_type[id(out)] = self.code
        out.dtype = self._np(self.code)
        self._converted(node)

    def _converted(self, node: gs.Node) -> None:
        self.counts["nodes_converted"] += 1
        self.op_counts[node.op] = self.op_counts.get(node.op, 0) + 1

    def _plan_storage(self, node: gs.Node, want: dict[tuple[int, int], bool]) -> None:
        """Storage mode: data inputs that are big enough float32 constants take the target type."""
        if node.domain not in STANDARD_DOMAINS and node.domain is not None:
            return
        consts = [
            (i, t)
            for i, t in enumerate(node.inputs)
            if t.name and (meta := constant_meta(t)) is not None and meta[1] == np.float32
        ]
        if not consts or any(isinstance(v, gs.Graph) or _is_graph_list(v) for v in node.attrs.values()):
            return
        if is_excluded(node.name, node.op, self.ctx.exclude):
            return self._skip(node, "excluded by configuration")
        schema = _schema(node.op, self.opset)
        for i, t in consts:
            allowed = _allowed(schema, "input", i) if schema is not None else None
            if allowed is None or "tensor(float16)" not in allowed:
                # Not a data operand (Resize scales, ...): rounding could change shapes. The reader
                # gets float32 back, so float16 support (not bfloat16) is what marks data operands.
                continue
            size = int(np.prod(constant_meta(t)[0]))  # type: ignore[index]
            if size < self.cfg.min_elements:
                continue
            want[(id(node), i)] = True  # overflow is checked when the value is read, in _convert_constant

    # --------------------------------------------------------------------------------- rewrite

    def rewrite(self) -> bool:
        want = self.plan()
        self._io_types()
        self._constants(want)
        for g in list(self.tree.graphs.values()):
            for node in list(g.nodes):
                if node.op in METADATA_OPS and node.domain in STANDARD_DOMAINS:
                    continue
                for i, t in enumerate(list(node.inputs)):
                    if not t.name or constant_meta(t) is not None or (id(node), i) in self.done:
                        continue
                    now = self.now(t)
                    if now not in (FLOAT, self.code):
                        continue
                    wanted = self.code if want.get((id(node), i)) else self._reader_type(t)
                    if now != wanted:
                        node.inputs[i] = self.cast(t, wanted)
        return bool(
            self.counts["nodes_converted"] or self.counts["casts_inserted"] or self.counts["constants_converted"]
        )

    def _reader_type(self, t: gs.Tensor) -> int:
        """What a reader that is not converted expects: the tensor's original type."""
        orig = self.orig(t)
        return orig if orig is not None else FLOAT

    def _io_types(self) -> None:
        """Graph inputs/outputs: main graph per ``keep_io_types``, subgraphs always keep their types."""
        root = self.tree.root
        if not self.cfg.keep_io_types:
            for t in root.inputs:
                if self.orig(t) == FLOAT:
                    t.dtype = self._np(self.code)
                    self.new_type[id(t)] = self.code
        for g in self.tree.graphs.values():
            for t in list(g.outputs):
                if isinstance(t, gs.Constant) or not t.inputs:
                    continue
                orig = self.orig(t)
                if orig != FLOAT:
                    continue
                wanted = self.code if (g is root and not self.cfg.keep_io_types) else FLOAT
                now = self.now(t)
                if now != wanted:
                    self._retype_output(t, now, wanted)

    def _retype_output(self, t: gs.Tensor, now: int, wanted: int) -> None:
        """The producer of graph output ``t`` writes a new tensor; a Cast writes ``t`` (name kept)."""
        suffix = "float32" if now == FLOAT else self.cfg.dtype
        inner = gs.Variable(fresh_name(self.names, f"{t.name}_{suffix}"), dtype=self._np(now), shape=t.shape)
        producer = t.inputs[0]
        graph = self.tree.node_graph.get(id(producer), self.tree.root)
        for reader in list(t.outputs):
            for i, x in enumerate(reader.inputs):
                if x is t:
                    reader.inputs[i] = inner
        producer.outputs[producer.outputs.index(t)] = inner
        node = gs.Node("Cast", name=fresh_name(self.names, f"{t.name}_Cast_output"), attrs={"to": wanted})
        node.inputs.append(inner)
        node.outputs.append(t)
        graph.nodes.append(node)
        self.tree.node_graph[id(node)] = graph
        self.done.add((id(node), 0))
        t.dtype = self._np(wanted)
        self.new_type[id(t)] = wanted
        self.new_type[id(inner)] = now
        self.casts[(id(t), now)] = inner
        self.facts_alias(inner, t)
        self.counts["casts_inserted"] += 1

    def facts_alias(self, new: gs.Tensor, old: gs.Tensor) -> None:
        """Record ``new``'s original type as ``old``'s (it is the same value under a new name)."""
        inferred = self.facts.infer()
        if id(old) in inferred:
            inferred[id(new)] = inferred[id(old)]

    def _constants(self, want: dict[tuple[int, int], bool]) -> None:
        """Convert float32 constants read at target positions: in place when every reader wants the
        target type, else a converted copy (with a Cast back for float32 readers of big ones)."""
        uses: dict[int, tuple[gs.Tensor, list[tuple[gs.Node, int, bool]]]] = {}
        for g in self.tree.graphs.values():
            for node in g.nodes:
                for i, t in enumerate(node.inputs):
                    if not t.name:
                        continue
                    meta = constant_meta(t)
                    if meta is None or meta[1] != np.float32:
                        continue
                    uses.setdefault(id(t), (t, []))[1].append((node, i, bool(want.get((id(node), i)))))
        for t, readers in uses.values():
            if not any(w for _n, _i, w in readers):
                continue
            self._convert_constant(t, readers)

    def _convert_constant(self, t: gs.Tensor, readers: list[tuple[gs.Node, int, bool]]) -> None:
        w = constant_value(t, cache=False)
        assert w is not None
        if not self.compute and self.info(t, w).overflow and self.cfg.overflow == "keep":
            return
        half = self.convert_array(w)
        bytes_before = int(w.nbytes)
        big = w.size >= self.cfg.min_elements
        all_half = all(wh for _n, _i, wh in readers) and not is_graph_io(self.tree, t)
        if not self.compute:
            # storage: one half constant, one Cast back to float32 shared by every reader
            const = gs.Constant(fresh_name(self.names, f"{t.name}_{self.cfg.dtype}"), half)
            self.new_type[id(const)] = self.code
            up = self.cast(const, FLOAT)
            for node, i, wh in readers:
                if wh:
                    node.inputs[i] = up
                    self.done.add((id(node), i))
            self.report.tensor_map[up.name] = t.name
        elif all_half:
            self._replace_in_place(t, half)
        else:
            const = gs.Constant(fresh_name(self.names, f"{t.name}_{self.cfg.dtype}"), half)
            self.new_type[id(const)] = self.code
            self.report.tensor_map[const.name] = t.name
            up = self.cast(const, FLOAT) if big else None
            for node, i, wh in readers:
                if wh:
                    node.inputs[i] = const
                elif up is not None:
                    node.inputs[i] = up
                    self.done.add((id(node), i))
        del w
        if self.cfg.overflow == "clamp" and self.const_info.get(id(t), _ConstInfo(False, False)).overflow:
            self.counts["constants_clamped"] += 1
        self.counts["constants_converted"] += 1
        node0 = readers[0][0]
        self.layers.append(
            {
                "node": node0.name,
                "op": node0.op,
                "tensor": t.name,
                "bytes_before": bytes_before,
                "bytes_after": int(half.nbytes)
                if (all_half or not self.compute or big)
                else bytes_before + half.nbytes,
                "scheme": self.cfg.dtype if self.compute else f"{self.cfg.dtype}-storage",
            }
        )

    def _replace_in_place(self, t: gs.Tensor, half: np.ndarray) -> None:
        """Give constant ``t`` (an initializer or a Constant node's output) the target type, name kept."""
        if isinstance(t, gs.Constant):
            t.values = half
        else:
            producer = t.inputs[0]
            value = producer.attrs["value"]
            producer.attrs["value"] = gs.Constant(value.name, half)
            t.dtype = self._np(self.code)
        self.new_type[id(t)] = self.code

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "dtype": self.cfg.dtype,
            "compute": self.cfg.compute,
            "ops_converted": dict(sorted(self.op_counts.items())),
            "layers": self.layers,
            "nonstandard_ops": [],
        }


# ------------------------------------------------------------------------------------ schemas


def _schema(op: str, opset: int) -> Any:
    try:
        return onnx.defs.get_schema(op, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        return None


def _formal(schema: Any, side: str, index: int) -> Any:
    formals = schema.inputs if side == "input" else schema.outputs
    if not formals:
        return None
    if index < len(formals):
        return formals[index]
    last = formals[-1]
    return last if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None


def _allowed(schema: Any, side: str, index: int) -> set[str] | None:
    """The type strings a schema allows at a position, or None if the position is not declared."""
    if schema is None:
        return None
    formal = _formal(schema, side, index)
    if formal is None:
        return None
    for c in schema.type_constraints:
        if c.type_param_str == formal.type_str:
            return set(c.allowed_type_strs)
    return {formal.type_str}


def _casts_to_integer(node: gs.Node) -> bool:
    if node.op != "Cast" or node.domain not in STANDARD_DOMAINS and node.domain is not None:
        return False
    to = int(node.attrs.get("to", 0))
    return to not in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    )


def _is_graph_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, gs.Graph) for v in value)
