"""Cut a model into contiguous parts that fit a memory or download budget (the runner is ``runner.py``).

The main graph's nodes are taken in their (checked) topological order ``n_0 .. n_{N-1}``; a *cut* at
position ``c`` puts ``n_0 .. n_{c-1}`` before it and the rest after. Weights (initializers and
``Constant`` nodes) never cross a cut: each part gets a copy of every weight its nodes read, so a
weight read on both sides of a cut is duplicated (and reported). Control-flow nodes (``If``, ``Loop``,
``Scan``) are single nodes of the main graph, so they always land whole in one part, with the outer
names their subgraphs read as inputs of that part.

For every candidate cut ``c`` the planner estimates the bytes of activations crossing it::

    cross(c) = sum of bytes(t) over tensors t with producer(t) < c <= last_consumer(t)

(graph inputs count as produced at -1; bytes from dtype and shape, symbolic dims set to 1 unless
``shapes`` fixes them). A part ``[a, b)`` has ``weight(a, b)`` = bytes of the distinct weights its nodes
read and ``flops(a, b)`` = estimated MatMul/Gemm/Conv FLOPs (``2*M*N*K``; ``2*|out|*Cin/g*prod(kernel)``).

The plan is a dynamic programme over the candidate positions ``P_0 = 0 < P_1 < ... < P_m = N``:

1. *Balance* (``--parts n``): ``M* = min over plans of max_i cost(part_i)``, with cost = weight bytes
   (``--balance size``) or FLOPs (``--balance flops``), computed by the min-max recurrence
   ``g_p(a) = min_b max(cost(a, b), g_{p-1}(b))``. With ``--max-part-size`` alone, ``n`` is the
   fewest parts for which every part's weights fit the budget.
2. *Cut quality*: among plans with ``n`` parts, every part's weights within the budget and every part's
   cost within ``B = M* + slack * mean`` (``slack`` = 0.1 of the mean part), choose the one with the
   fewest activation bytes crossing the cuts, ``h_p(a) = min_b cross(P_b) + h_{p-1}(b)``; ties go to
   the more balanced plan (smaller sum of squared part costs).

So between two transformer layers (the hidden state and the expanded mask cross) is preferred to a
cut inside an attention block (queries, keys, values and shape side-chains cross), as long as the
parts stay within 10% of the mean of the best balance.

Each part is written as its own model (same IR version, opsets and functions), its inputs and
outputs typed from the original graph's declarations or onnx's shape inference (symbolic dims kept),
into a temporary folder that is renamed to ``OUTDIR`` only when every part and ``manifest.json`` are
written. Weights are copied one part at a time; external data is streamed, never held whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import io
from .errors import OnnxCompressError
from .shapes import STUB_BYTES, data_prop_is_safe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "onnxcompress-split"
FORMAT_VERSION = 1
MAX_CANDIDATES = 1000  # cut positions the programme considers (the best-placed ones when there are more)
DEFAULT_SLACK = 0.1
BALANCES = ("size", "flops")
CONTROL_FLOW = ("If", "Loop", "Scan")
_UNKNOWN_ELEMENTS = 1024  # elements assumed for a tensor of unknown rank
_FLOP_OPS = ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "Conv", "ConvInteger", "QLinearConv", "ConvTranspose")


# --------------------------------------------------------------------------- analysis


def _attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def free_names(graph: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads from its enclosing scopes, in first-use order."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    free: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                free.setdefault(name)
        for attr in node.attribute:
            for g in _attr_graphs(attr):
                for name in free_names(g):
                    if name not in defined:
                        free.setdefault(name)
        defined.update(o for o in node.output if o)
    for o in graph.output:
        if o.name not in defined:
            free.setdefault(o.name)
    return list(free)


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs and the outer names its subgraphs read, deduplicated."""
    names: dict[str, None] = {n: None for n in node.input if n}
    for attr in node.attribute:
        for g in _attr_graphs(attr):
            for n in free_names(g):
                names.setdefault(n)
    return list(names)


def _is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input and len(node.output) == 1


def _constant_meta(node: onnx.NodeProto) -> tuple[int, list[int]]:
    """(bytes, dims) of a Constant node's value."""
    for a in node.attribute:
        if a.HasField("t"):
            return io.declared_nbytes(a.t), [int(d) for d in a.t.dims]
        if a.HasField("sparse_tensor"):
            st = a.sparse_tensor
            return io.declared_nbytes(st.values) + io.declared_nbytes(st.indices), [int(d) for d in st.dims]
        if a.floats or a.ints:
            n = len(a.floats) or len(a.ints)
            return n * (4 if a.floats else 8), [n]
        if a.strings:
            return sum(len(s) for s in a.strings), [len(a.strings)]
    return 8, []


def _elem_size(elem_type: int) -> float:
    name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else ""
    if name in ("INT4", "UINT4", "FLOAT4E2M1"):
        return 0.5
    if name in ("INT2", "UINT2"):
        return 0.25
    try:
        return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8.0


def _dims(vi: onnx.ValueInfoProto | None) -> list[int] | None:
    """Dims of a tensor value info, unknown/symbolic as 1; None when the rank is unknown."""
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]


def _is_typed_tensor(vi: onnx.ValueInfoProto | None) -> bool:
    return vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type != 0


@dataclasses.dataclass
class Weight:
    """An initializer or a Constant node's value, copied into every part that reads it."""

    name: str
    nbytes: int
    dims: list[int]
    kind: str  # "initializer", "sparse" or "constant"


class Analysis:
    """What the planner needs to know about a model proto (external data is never read)."""

    def __init__(self, proto: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> None:
        graph = proto.graph
        self.proto = proto
        self.weights: dict[str, Weight] = {}
        for t in graph.initializer:
            self.weights[t.name] = Weight(t.name, io.declared_nbytes(t), [int(d) for d in t.dims], "initializer")
        for st in graph.sparse_initializer:
            nbytes = io.declared_nbytes(st.values) + io.declared_nbytes(st.indices)
            self.weights[st.values.name] = Weight(st.values.name, nbytes, [int(d) for d in st.dims], "sparse")
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if _is_constant_node(node):
                nbytes, dims = _constant_meta(node)
                self.constant_nodes[node.output[0]] = node
                self.weights[node.output[0]] = Weight(node.output[0], nbytes, dims, "constant")
            else:
                self.nodes.append(node)
        self.reads = [_node_reads(n) for n in self.nodes]
        self.graph_inputs = {i.name: i for i in graph.input if i.name not in self.weights}
        self.graph_outputs = {o.name: o for o in graph.output}
        self.producer: dict[str, int] = {name: -1 for name in self.graph_inputs}
        for pos, node in enumerate(self.nodes):
            for o in node.output:
                if o:
                    self.producer[o] = pos
        self.last_use: dict[str, int] = {}
        for pos, names in enumerate(self.reads):
            for name in names:
                if name not in self.weights:
                    self.last_use[name] = pos
        self.value_info = self._infer(proto, None)
        self.sized_info = self._infer(proto, shapes) if shapes else self.value_info
        self.flops = np.array([self._node_flops(n) for n in self.nodes], dtype=np.float64)

    # ---- shapes

    @staticmethod
    def _skeleton(proto: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
        """The model with large initializers declared (dtype, dims), not stored."""
        skel = onnx.ModelProto()
        skel.ir_version = proto.ir_version
        skel.opset_import.extend(proto.opset_import)
        skel.functions.extend(proto.functions)
        g = skel.graph
        g.name = proto.graph.name
        g.node.extend(proto.graph.node)
        g.input.extend(proto.graph.input)
        g.output.extend(proto.graph.output)
        g.value_info.extend(proto.graph.value_info)
        g.sparse_initializer.extend(proto.graph.sparse_initializer)
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or io.declared_nbytes(t) > STUB_BYTES:
                stub = g.initializer.add()
                stub.name, stub.data_type = t.name, t.data_type
                stub.dims.extend(t.dims)
                stub.data_location = onnx.TensorProto.EXTERNAL
                stub.external_data.add(key="location", value="__onnxcompress_stub__")
            else:
                g.initializer.append(t)
        for vi in g.input:
            if vi.name in (shapes or {}) and vi.type.HasField("tensor_type"):
                dims = vi.type.tensor_type.shape.dim
                wanted = shapes[vi.name]  # type: ignore[index]
                if len(dims) == len(wanted):
                    for d, v in zip(dims, wanted):
                        d.Clear()
                        d.dim_value = int(v)
        return skel

    def _infer(self, proto: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> dict[str, onnx.ValueInfoProto]:
        skel = self._skeleton(proto, shapes)
        info: dict[str, onnx.ValueInfoProto] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(
                skel, check_type=False, strict_mode=False, data_prop=data_prop_is_safe(skel)
            )
            info.update({v.name: v for v in inferred.graph.value_info})
            info.update({v.name: v for v in inferred.graph.output})
        except Exception as exc:  # onnx raises InferenceError and assorted C++ errors
            log.warning("shape inference failed: %s", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        info.update({v.name: v for v in proto.graph.value_info if _is_typed_tensor(v) and v.name not in info})
        info.update({v.name: v for v in skel.graph.input})
        info.update({v.name: v for v in proto.graph.output})
        return info

    def tensor_bytes(self, name: str) -> float:
        """Estimated bytes of an activation (symbolic dims as 1, or as ``shapes`` fixes them)."""
        vi = self.sized_info.get(name) or self.value_info.get(name)
        if not _is_typed_tensor(vi):
            return float(_UNKNOWN_ELEMENTS * 4)
        dims = _dims(vi)
        count = _UNKNOWN_ELEMENTS if dims is None else int(np.prod(dims, dtype=np.float64))
        return count * _elem_size(vi.type.tensor_type.elem_type)  # type: ignore[union-attr]

    def _shape(self, name: str) -> list[int] | None:
        if name in self.weights:
            return self.weights[name].dims
        return _dims(self.sized_info.get(name))

    def _node_flops(self, node: onnx.NodeProto) -> float:
        op = node.op_type
        if op not in _FLOP_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            return 0.0
        ins = list(node.input)
        out = self._shape(node.output[0]) if node.output else None
        if out is None:
            return 0.0
        out_n = float(np.prod(out, dtype=np.float64))
        if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            a = self._shape(ins[0]) if ins else None
            return 2.0 * out_n * (a[-1] if a else 1)
        if op == "Gemm":
            a = self._shape(ins[0])
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = (a[0] if trans_a else a[-1]) if a and len(a) == 2 else 1
            return 2.0 * out_n * k
        w_name = ins[3] if op == "QLinearConv" else ins[1] if len(ins) > 1 else ""
        w = self._shape(w_name) if w_name else None
        if not w or len(w) < 2:
            return 0.0
        per = float(np.prod(w[1:], dtype=np.float64))
        if op == "ConvTranspose":
            x = self._shape(ins[0])
            return 2.0 * float(np.prod(x, dtype=np.float64)) * per if x else 0.0
        return 2.0 * out_n * per

    # ---- cuts

    def activations(self) -> Iterator[tuple[str, int, int]]:
        """(name, producer position, last consumer position) of every tensor read across nodes."""
        for name, last in self.last_use.items():
            first = self.producer.get(name)
            if first is not None and last > first:
                yield name, first, last

    def crossing(self) -> tuple[np.ndarray, np.ndarray]:
        """Bytes crossing each position 0..N and whether a cut there is allowed."""
        n = len(self.nodes)
        diff = np.zeros(n + 2, dtype=np.float64)
        bad = np.zeros(n + 2, dtype=np.int64)
        for name, first, last in self.activations():
            lo, hi = first + 1, last  # the cut positions it crosses: lo..hi
            diff[lo] += self.tensor_bytes(name)
            diff[hi + 1] -= self.tensor_bytes(name)
            vi = self.value_info.get(name)
            if not _is_typed_tensor(vi) or not vi.type.tensor_type.HasField("shape"):  # type: ignore[union-attr]
                # a part's input needs a type onnx's checker accepts: element type and (maybe symbolic) shape
                bad[lo] += 1
                bad[hi + 1] -= 1
        cross = np.cumsum(diff)[: n + 1]
        allowed = np.cumsum(bad)[: n + 1] == 0
        allowed[0] = allowed[n] = True
        return cross, allowed

    def crossing_tensors(self, cut: int) -> list[str]:
        """The tensors crossing position ``cut``, in producer order."""
        found = [(first, name) for name, first, last in self.activations() if first < cut <= last]
        return [name for _, name in sorted(found)]


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass
class SplitPlan:
    """The chosen cut positions (node indices) and the numbers behind them."""

    cuts: list[int]
    part_bytes: list[int]
    part_flops: list[float]
    cross_bytes: list[float]
    bound: float
    floor: float
    best_max: float
    candidates: int
    balance: str

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``[start, stop)`` node positions of each part."""
        edges = [0, *self.cuts, self._n]
        return list(zip(edges[:-1], edges[1:]))

    _n: int = 0


def _candidates(cross: np.ndarray, allowed: np.ndarray, n: int, limit: int) -> np.ndarray:
    """Positions 0 < c < n where a cut may fall; with more than ``limit``, the least-crossed of each window."""
    pos = np.flatnonzero(allowed[1:n]) + 1
    if len(pos) > limit:
        windows = np.array_split(pos, limit)
        pos = np.array([w[np.argmin(cross[w])] for w in windows if len(w)], dtype=np.int64)
    return np.concatenate([[0], pos, [n]]).astype(np.int64)


def _part_matrices(an: Analysis, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W[a, b]`` weight bytes and ``F[a, b]`` FLOPs of the part from ``P[a]`` to ``P[b]``.

    A weight read at positions ``u_1 < ... < u_k`` is inside ``[P[a], P[b])`` iff its first read at or
    after ``P[a]`` is before ``P[b]``: sweeping ``a`` downwards keeps that "next read" per weight, and
    a histogram of it by position gives a whole row at once.
    """
    m, n = len(P), len(an.nodes)
    names = list(an.weights)
    index = {name: i for i, name in enumerate(names)}
    nbytes = np.array([an.weights[w].nbytes for w in names], dtype=np.float64)
    per_node = [np.array([index[r] for r in reads if r in index], dtype=np.int64) for reads in an.reads]
    nxt = np.full(len(names), n + 1, dtype=np.int64)
    W = np.zeros((m, m), dtype=np.float64)
    for a in range(m - 2, -1, -1):
        for pos in range(int(P[a + 1]) - 1, int(P[a]) - 1, -1):
            nxt[per_node[pos]] = pos
        hist = np.bincount(nxt, weights=nbytes, minlength=n + 2)
        below = np.concatenate([[0.0], np.cumsum(hist)])  # below[p] = bytes of weights next read before p
        W[a, a + 1 :] = below[P[a + 1 :]]
    prefix = np.concatenate([[0.0], np.cumsum(an.flops)])
    F = prefix[P][None, :] - prefix[P][:, None]
    return W, F


def plan_cuts(
    an: Analysis,
    *,
    max_part_size: int | None = None,
    parts: int | None = None,
    balance: str = "size",
    slack: float = DEFAULT_SLACK,
    max_candidates: int = MAX_CANDIDATES,
) -> SplitPlan:
    """Choose the cuts (see the module docstring).

    Raises:
        OnnxCompressError: a weight or node larger than the budget, more parts than cut points, or no
            plan meeting the constraints.
    """
    if balance not in BALANCES:
        raise OnnxCompressError(f"--balance {balance!r}: use one of {', '.join(BALANCES)}")
    if max_part_size is None and parts is None:
        raise OnnxCompressError("split needs --max-part-size SIZE or --parts N")
    if parts is not None and parts < 1:
        raise OnnxCompressError(f"--parts {parts}: must be at least 1")
    n = len(an.nodes)
    if n == 0:
        raise OnnxCompressError("the model has no nodes to split")
    if max_part_size is not None:
        _check_budget(an, max_part_size)
    cross, allowed = an.crossing()
    P = _candidates(cross, allowed, n, max_candidates)
    m = len(P)
    if parts is not None and parts > m - 1:
        raise OnnxCompressError(
            f"--parts {parts} is more than this model can be cut into: {m - 2} possible cut points, "
            f"so at most {m - 1} parts"
        )
    W, F = _part_matrices(an, P)
    C = W if balance == "size" else F
    upper = np.triu(np.ones((m, m), dtype=bool), k=1)
    feasible = upper & (W <= max_part_size) if max_part_size is not None else upper
    if parts is None:
        count = _fewest_parts(W, feasible)
        if count is None:
            raise OnnxCompressError(f"no split fits --max-part-size {_fmt_bytes(max_part_size or 0)}")
        parts = count
    best_max = _minimax(C, feasible, parts)
    if not np.isfinite(best_max):
        raise OnnxCompressError(
            f"no split into {parts} parts keeps every part within --max-part-size {_fmt_bytes(max_part_size or 0)}"
        )
    best_min = _maximin(C, feasible, parts)
    margin = slack * float(C[0, m - 1]) / parts
    bound = best_max + margin
    within = feasible & (C <= bound * (1 + 1e-12) + 1e-9)
    floor = best_min - margin
    try:
        chosen = _least_crossing(C, cross[P], within & (C >= floor * (1 - 1e-12) - 1e-9), parts)
    except OnnxCompressError:  # the best max and the best min cannot hold at once: drop the floor
        floor = 0.0
        chosen = _least_crossing(C, cross[P], within, parts)
    cuts = [int(P[i]) for i in chosen[1:-1]]
    plan = SplitPlan(
        cuts=cuts,
        part_bytes=[int(W[a, b]) for a, b in zip(chosen[:-1], chosen[1:])],
        part_flops=[float(F[a, b]) for a, b in zip(chosen[:-1], chosen[1:])],
        cross_bytes=[float(cross[c]) for c in cuts],
        bound=bound,
        floor=floor,
        best_max=best_max,
        candidates=m - 2,
        balance=balance,
    )
    plan._n = n
    return plan


def _check_budget(an: Analysis, budget: int) -> None:
    big = max(an.weights.values(), key=lambda w: w.nbytes, default=None)
    if big is not None and big.nbytes > budget:
        raise OnnxCompressError(
            f"--max-part-size {_fmt_bytes(budget)} is smaller than weight {big.name!r} "
            f"({_fmt_bytes(big.nbytes)}): no part can hold it; raise the budget to at least that"
        )
    for node, reads in zip(an.nodes, an.reads):
        total = sum(an.weights[r].nbytes for r in reads if r in an.weights)
        if total > budget:
            raise OnnxCompressError(
                f"--max-part-size {_fmt_bytes(budget)} is smaller than the weights node "
                f"{node.name or node.op_type!r} reads ({_fmt_bytes(total)}); raise the budget to at least that"
            )


def _fewest_parts(W: np.ndarray, feasible: np.ndarray) -> int | None:
    """The smallest part count for which a plan within ``feasible`` exists.

    A part's weights only grow as it takes more nodes, so filling each part as far as it goes is
    optimal for the count (the greedy plan is used for nothing else).
    """
    m = W.shape[0]
    a, count = 0, 0
    while a != m - 1:
        reach = np.flatnonzero(feasible[a])
        if not len(reach):
            return None
        a, count = int(reach.max()), count + 1
    return count


def _minimax(C: np.ndarray, feasible: np.ndarray, parts: int) -> float:
    """``min over plans of max part cost`` with exactly ``parts`` parts."""
    m = C.shape[0]
    cost = np.where(feasible, C, np.inf)
    g = cost[:, m - 1].copy()
    for _ in range(parts - 1):
        g = np.min(np.maximum(cost, g[None, :]), axis=1)
    return float(g[0])


def _maximin(C: np.ndarray, feasible: np.ndarray, parts: int) -> float:
    """``max over plans of min part cost`` with exactly ``parts`` parts."""
    m = C.shape[0]
    cost = np.where(feasible, C, -np.inf)
    g = cost[:, m - 1].copy()
    for _ in range(parts - 1):
        g = np.max(np.minimum(cost, g[None, :]), axis=1)
    return float(g[0])


def _least_crossing(C: np.ndarray, cross: np.ndarray, feasible: np.ndarray, parts: int) -> list[int]:
    """Candidate indices ``[0, c_1, .., m-1]`` of the feasible plan with least crossing, then best balance."""
    m = C.shape[0]
    total = float(C[0, m - 1]) or 1.0
    sq = np.where(feasible, (C / total) ** 2, np.inf)
    h = np.where(feasible[:, m - 1], 0.0, np.inf)
    s = np.where(feasible[:, m - 1], sq[:, m - 1], np.inf)
    choices = []
    for _ in range(parts - 1):
        key = np.where(feasible, cross[None, :] + h[None, :], np.inf)
        tie = sq + s[None, :]
        # lexicographic: crossing bytes first, then the sum of squared part shares (<= 1)
        best = key.min(axis=1, keepdims=True)
        scored = np.where(key <= best * (1 + 1e-12), tie, np.inf)
        b = np.argmin(scored, axis=1)
        rows = np.arange(m)
        h, s = key[rows, b], scored[rows, b]
        choices.append(b)
    if not np.isfinite(h[0]):
        raise OnnxCompressError(f"no split into {parts} parts meets the constraints")
    path, a = [0], 0
    for b in reversed(choices):
        a = int(b[a])
        path.append(a)
    if path[-1] != m - 1:
        path.append(m - 1)
    return path


# --------------------------------------------------------------------------- extraction


def _part_proto(an: Analysis, start: int, stop: int, index: int, total: int, outputs: list[str]) -> onnx.ModelProto:
    """A model of nodes ``[start, stop)``: weights copied, inputs/outputs typed."""
    src = an.proto
    nodes = an.nodes[start:stop]
    produced = {o for node in nodes for o in node.output if o}
    reads: dict[str, None] = {}
    for names in an.reads[start:stop]:
        for name in names:
            reads.setdefault(name)
    weights = [r for r in reads if r in an.weights]
    for name in outputs:
        if name in an.weights and name not in weights:
            weights.append(name)
    inputs = [r for r in reads if r not in an.weights and r not in produced]
    part = onnx.ModelProto()
    part.ir_version = src.ir_version
    part.opset_import.extend(src.opset_import)
    part.functions.extend(src.functions)
    part.producer_name = "onnxcompress"
    part.doc_string = f"part {index + 1} of {total} of {src.graph.name or 'model'} (onnxcompress split)"
    for p in src.metadata_props:
        part.metadata_props.add(key=p.key, value=p.value)
    part.metadata_props.add(key="onnxcompress.split.part", value=f"{index + 1}/{total}")
    g = part.graph
    g.name = f"{src.graph.name or 'model'}_part{index + 1}"
    wanted = set(weights)
    for node_name in weights:
        if node_name in an.constant_nodes:
            g.node.append(an.constant_nodes[node_name])
    g.node.extend(nodes)
    for t in src.graph.initializer:
        if t.name in wanted:
            g.initializer.append(t)  # a copy; external tensors stay references until written
    for st in src.graph.sparse_initializer:
        if st.values.name in wanted:
            g.sparse_initializer.append(st)
    declared_inputs = {i.name: i for i in src.graph.input}
    for name in inputs:
        vi = declared_inputs.get(name) or an.value_info.get(name)
        if vi is None:
            raise OnnxCompressError(f"cannot type tensor {name!r} at a cut: shape inference gave nothing")
        g.input.append(vi)
    if src.ir_version < 4:  # initializers must be graph inputs too
        g.input.extend(declared_inputs[w] for w in weights if w in declared_inputs)
    for name in outputs:
        vi = an.graph_outputs.get(name) or an.value_info.get(name)
        if vi is None:
            raise OnnxCompressError(f"cannot type tensor {name!r} at a cut: shape inference gave nothing")
        g.output.append(vi)
    io_names = set(inputs) | set(outputs)
    g.value_info.extend(v for v in src.graph.value_info if v.name in produced and v.name not in io_names)
    return part


def _part_outputs(an: Analysis, start: int, stop: int, last: bool) -> list[str]:
    """Tensors of ``[start, stop)`` that later parts read or that are graph outputs."""
    outs: dict[str, None] = {}
    for node in an.nodes[start:stop]:
        for o in node.output:
            if o and (o in an.graph_outputs or an.last_use.get(o, -1) >= stop):
                outs.setdefault(o)
    if last:  # graph outputs no node computes (a weight given back as is)
        for name in an.graph_outputs:
            if name in an.weights:
                outs.setdefault(name)
    if not outs and stop > start:  # a part nothing later reads: keep it a valid model
        node = an.nodes[stop - 1]
        outs.setdefault(next(o for o in node.output if o))
    return list(outs)


# --------------------------------------------------------------------------- writing


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _source_files(path: Path, proto: onnx.ModelProto) -> list[Path]:
    files: dict[Path, None] = {path: None}
    for t in io.iter_model_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            if "onnxcompress_abs_location" in info:
                files.setdefault(Path(info["onnxcompress_abs_location"]))
    return list(files)


def _type_dict(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    tt = vi.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _check_outdir(outdir: Path, model_path: Path, force: bool) -> None:
    if outdir.is_symlink():
        raise OnnxCompressError(f"output folder {outdir} is a symlink: refusing to write through it")
    if not outdir.parent.exists():
        raise OnnxCompressError(f"folder {outdir.parent} does not exist")
    src = model_path.resolve()
    if outdir.resolve() == src.parent or outdir.resolve() in src.parents:
        raise OnnxCompressError(f"output folder {outdir} holds the input model: choose another folder")
    if outdir.exists():
        if not outdir.is_dir():
            raise OnnxCompressError(f"output path {outdir} is a file: give a folder name")
        if not force:
            raise OnnxCompressError(f"output folder {outdir} exists: pass --force to replace it")
        if any(outdir.iterdir()) and not (outdir / MANIFEST).is_file():
            raise OnnxCompressError(
                f"output folder {outdir} is not empty and holds no {MANIFEST}: refusing to replace it"
            )


@dataclasses.dataclass
class SplitReport:
    """What ``split_model`` wrote: the folder, its manifest (a dict) and the time it took."""

    outdir: Path
    manifest: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the manifest plus ``outdir`` and ``seconds``."""
        return {"outdir": str(self.outdir), "seconds": self.seconds, **self.manifest}


def split_model(
    model_path: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    max_part_size: int | str | None = None,
    parts: int | None = None,
    balance: str = "size",
    force: bool = False,
    shapes: dict[str, list[int]] | None = None,
    slack: float = DEFAULT_SLACK,
    max_memory: int | None = None,
) -> SplitReport:
    """Split ``model_path`` into parts in ``outdir`` (with ``manifest.json``); see the module docstring.

    Args:
        model_path: The ``.onnx`` file (external data beside it is streamed, never loaded whole).
        outdir: The folder to create (replaced with ``force`` when it holds an earlier split or nothing).
        max_part_size: Largest weight bytes per part (int or a size like ``"300MB"``).
        parts: Exact number of parts (with ``max_part_size`` too: both hold).
        balance: ``"size"`` (weight bytes) or ``"flops"`` for ``parts``.
        force: Replace an existing ``outdir``.
        shapes: Dims for dynamic graph inputs, used only to estimate activation bytes and FLOPs.
        slack: Parts may exceed the best achievable largest part by this fraction of the mean part,
            to place cuts where fewer activations cross.
        max_memory: The loader's memory budget (see ``onnxcompress.io``).

    Raises:
        OnnxCompressError: bad options, a budget below the largest weight, too many parts, an unwritable
            folder. Nothing is left in ``outdir`` then.
    """
    start_time = time.perf_counter()
    model_path = Path(model_path)
    outdir = Path(outdir)
    budget = io.parse_size(max_part_size) if isinstance(max_part_size, str) else max_part_size
    if budget is not None and budget <= 0:
        raise OnnxCompressError("--max-part-size must be positive")
    proto = io.read_proto(model_path, max_memory=max_memory)
    _check_outdir(outdir, model_path, force)
    an = Analysis(proto, shapes)
    plan = plan_cuts(an, max_part_size=budget, parts=parts, balance=balance, slack=slack)
    planning_s = time.perf_counter() - start_time
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in io.iter_model_tensors(proto))

    io.clean_stale_temp(outdir.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{os.getpid()}-", dir=outdir.parent))
    except OSError as exc:
        raise OnnxCompressError(f"cannot write to {outdir.parent}: {exc.strerror}") from None
    try:
        manifest = _write_parts(an, plan, tmp, model_path, external, budget, parts, planning_s)
        _replace_dir(tmp, outdir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OnnxCompressError(f"cannot write {outdir}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SplitReport(outdir=outdir, manifest=manifest, seconds=time.perf_counter() - start_time)


def _write_parts(
    an: Analysis,
    plan: SplitPlan,
    tmp: Path,
    model_path: Path,
    external: bool,
    budget: int | None,
    parts_requested: int | None,
    planning_s: float,
) -> dict[str, Any]:
    bounds = plan.bounds
    total = len(bounds)
    width = max(2, len(str(total)))
    made_by: dict[str, int] = {name: -1 for name in an.graph_inputs}
    part_entries: list[dict[str, Any]] = []
    weight_parts: dict[str, list[int]] = {}
    write_start = time.perf_counter()
    for i, (a, b) in enumerate(bounds):
        outputs = _part_outputs(an, a, b, last=i == total - 1)
        proto = _part_proto(an, a, b, i, total, outputs)
        part_weights = [t.name for t in proto.graph.initializer] + [
            s.values.name for s in proto.graph.sparse_initializer
        ]
        part_weights += [n.output[0] for n in proto.graph.node if _is_constant_node(n) and n.output[0] in an.weights]
        for w in part_weights:
            weight_parts.setdefault(w, []).append(i)
        inputs = [vi.name for vi in proto.graph.input if vi.name not in an.weights]
        weight_bytes = sum(an.weights[w].nbytes for w in part_weights)
        ext = external or weight_bytes > io.AUTO_EXTERNAL_BYTES
        name = f"part{i + 1:0{width}d}.onnx"
        staged = io.stage(proto, tmp / name, external=ext, force=False, check=True)
        del proto
        staged.commit()
        files = [{"name": f, "sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in staged.files]
        needs = {n: ("input" if made_by.get(n, -1) < 0 else made_by[n]) for n in inputs}
        for o in outputs:
            made_by[o] = i
        part_entries.append(
            {
                "index": i,
                "file": name,
                "sha256": files[0]["sha256"],
                "files": files,
                "weight_bytes": weight_bytes,
                "flops": plan.part_flops[i],
                "nodes": b - a,
                "first_node": an.nodes[a].name or an.nodes[a].op_type,
                "last_node": an.nodes[b - 1].name or an.nodes[b - 1].op_type,
                "control_flow_nodes": [n.name or n.op_type for n in an.nodes[a:b] if n.op_type in CONTROL_FLOW],
                "inputs": inputs,
                "outputs": outputs,
                "needs": needs,
            }
        )
        log.info("wrote %s (%s of weights)", name, _fmt_bytes(weight_bytes))
    cuts = []
    for c, nbytes in zip(plan.cuts, plan.cross_bytes):
        tensors = []
        for t in an.crossing_tensors(c):
            vi = an.value_info.get(t)
            info = _type_dict(vi) if _is_typed_tensor(vi) else {"name": t, "dtype": None, "shape": None}
            tensors.append({**info, "bytes": an.tensor_bytes(t), "graph_input": t in an.graph_inputs})
        cuts.append(
            {
                "position": c,
                "after_node": an.nodes[c - 1].name or an.nodes[c - 1].op_type,
                "before_node": an.nodes[c].name or an.nodes[c].op_type,
                "bytes": nbytes,
                "tensors": tensors,
            }
        )
    shared = [{"name": w, "bytes": an.weights[w].nbytes, "parts": ps} for w, ps in weight_parts.items() if len(ps) > 1]
    sizes = [p["weight_bytes"] for p in part_entries]
    flops = [p["flops"] for p in part_entries]
    src_files = _source_files(model_path, an.proto)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": {
            "file": model_path.name,
            "sha256": sha256_file(model_path),
            "data_files": [{"name": f.name, "sha256": sha256_file(f)} for f in src_files[1:]],
        },
        "inputs": [_type_dict(vi) for vi in an.proto.graph.input if vi.name in an.graph_inputs],
        "outputs": [_type_dict(vi) for vi in an.proto.graph.output],
        "options": {
            "max_part_size": budget,
            "parts": parts_requested,
            "balance": plan.balance,
        },
        "parts": part_entries,
        "cuts": cuts,
        "shared_weights": shared,
        "stats": {
            "num_parts": total,
            "total_weight_bytes": sum(w.nbytes for w in an.weights.values()),
            "largest_part_bytes": max(sizes),
            "mean_part_bytes": float(np.mean(sizes)),
            "largest_part_flops": max(flops),
            "mean_part_flops": float(np.mean(flops)),
            "duplicated_bytes": sum(s["bytes"] * (len(s["parts"]) - 1) for s in shared),
            "crossing_bytes": [c["bytes"] for c in cuts],
            "crossing_bytes_total": float(sum(c["bytes"] for c in cuts)),
            "candidate_cuts": plan.candidates,
            "balance_bound": plan.bound,
            "balance_floor": plan.floor,
            "best_largest_part": plan.best_max,
            "planning_s": planning_s,
            "writing_s": time.perf_counter() - write_start,
            "activation_bytes_note": "estimated with symbolic dims as 1 unless --shape fixes them",
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _replace_dir(tmp: Path, outdir: Path) -> None:
    """Move the finished ``tmp`` folder to ``outdir`` (an earlier split there is removed afterwards)."""
    old = None
    if outdir.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{os.getpid()}-old-", dir=outdir.parent))
        os.replace(outdir, old / "previous")
    try:
        os.replace(tmp, outdir)
    except OSError:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old / "previous", outdir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_split_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by :func:`split_model` (it holds ``manifest.json``)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def describe(manifest: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """One row per part for tables: index, file, nodes, weight bytes, FLOPs, inputs, crossing bytes."""
    cuts = manifest.get("cuts", [])
    for i, p in enumerate(manifest.get("parts", [])):
        yield {
            "part": i + 1,
            "file": p["file"],
            "nodes": p["nodes"],
            "weight_bytes": p["weight_bytes"],
            "flops": p["flops"],
            "first_node": p["first_node"],
            "last_node": p["last_node"],
            "cut_after_bytes": cuts[i]["bytes"] if i < len(cuts) else None,
            "cut_after_tensors": [t["name"] for t in cuts[i]["tensors"]] if i < len(cuts) else [],
        }
