"""Per-layer error localisation: which layer of a compressed model loses the accuracy.

``diagnose(original, candidate, feeds)`` compares the two models tensor by tensor and ranks the
layers by the error each one *adds*, so that the first culprit is named, not every layer after it.

**Matching.** A tensor produced by a node of the main graph under the same name in both models is
the same quantity: onnxcompress's passes keep the names of the tensors they rewrite (``int8-static``:
the DequantizeLinear output keeps the tensor's name and the float value before it is
``<name>_float``; ``int8-dynamic``, ``int4``, ``int8-weights``: the rewritten node's output keeps its
name, the new tensors get suffixes such as ``_quantized``, ``_scale``, ``_MatMulInteger``, ``_int32``,
``_float``, ``_dequantized``; ``fp16``/``bf16``: the same name, possibly holding half values, which
are compared as float). onnxruntime's own quantizers keep the producer's output name too (their
``QuantizeLinear``/``DequantizeLinear`` outputs get ``_QuantizeLinear_Output``/``_DequantizeLinear_Output``).
So matched = same name, produced by a node in both main graphs. Tensors that exist in one model only
(fused intermediates, the new suffixed tensors) are internal to a layer; weights (constants) are not
compared, their effect shows in the layer that reads them. Inner tensors of ``If``/``Loop``/``Scan``
bodies are not compared (they cannot be graph outputs).

**Capture.** The matched tensors are processed in chunks (the candidate's topological order, at most
``chunk_bytes`` of estimated activations per feed: sizes from ONNX shape inference with the first
feed's input shapes). For each chunk, each model is cut down to the nodes that compute the chunk's
tensors, starting from the matched tensors of earlier chunks (fed with that model's own values of
them, kept from the earlier chunks) and the graph inputs, and run once per feed. So each node of
each model runs about once per feed in all, and memory holds one chunk of one feed plus the
"frontier": the earlier tensors that later chunks still read (e.g. the residual stream), per feed.
Per-tensor statistics are accumulated and the arrays dropped.

**Local error.** A third model per chunk, the *cut* candidate: the candidate's nodes that compute the
chunk's tensors, where every read of any matched tensor is replaced by a graph input fed with the
*original's* value of that tensor. Each chunk tensor is then computed by its own layer (the candidate
nodes between matched tensors, e.g. ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` or
``Conv -> QuantizeLinear -> DequantizeLinear``) from exact inputs: its error is the error that layer
adds, not the error it inherits. With ``a`` the original's values and ``d_local`` the cut candidate's
difference from them, ``local_error = sqrt(sum d_local^2 / sum a^2)`` (a relative RMS error, equal to
``10^(-local_snr_db / 20)``). ``cosine`` (worst sample), ``snr_db`` and ``max_abs`` are the ordinary,
accumulated errors of the full candidate at that tensor (see ``validate``). Layers are ranked by
``local_error``, largest first. (Where onnxruntime fuses nodes across a cut differently, values
differ from a whole-model run by float rounding, ~1e-7 relative.)

``changed_by`` names the technique that changed a layer. Given the ``compress`` JSON report that
made the candidate (``compress_report``), it is exact: the passes whose ``tensor_map`` (``{new
name: original name}``, recorded by every pass) names a tensor the layer's candidate nodes read or
write. Otherwise it is inferred from the op types of the layer's candidate nodes
(``QuantizeLinear`` on activations: ``int8-static``; ``DynamicQuantizeLinear``/``MatMulInteger``:
``int8-dynamic``; ``MatMulNBits``/``GatherBlockQuantized`` or 4-bit unpacking: ``int4``; a
``DequantizeLinear`` or an 8/4-bit initializer: ``weight quantization``; a half initializer or a
``Cast`` to half: ``fp16/bf16``; ``rewritten`` for other changes such as ``fold``'s fusions); ``None`` when the
layer's nodes and weights are the original's.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import OnnxCompressError
from .validate import SNR_CAP, make_session

DEFAULT_CHUNK_BYTES = 64 * 2**20
REF_SUFFIX = "__onnxcompress_ref"
_PROTO_LIMIT = 2**31 - 2**24


@dataclasses.dataclass
class LayerError:
    """One matched tensor: the layer producing it, its local error and its accumulated error.

    A *layer* is the group of nodes computing the tensor from other matched tensors:
    ``original_nodes`` in the original (e.g. ``Conv, BatchNormalization, Relu`` when the candidate
    fused them), ``candidate_ops`` the op types of the candidate's. ``node``/``op_type`` name the
    original's main node of the layer: the first that reads a weight (Conv, Gemm, MatMul, Gather, ...,
    in that priority), else the tensor's producer.
    """

    node: str
    op_type: str
    tensor: str
    local_error: float | None
    cosine: float | None
    snr_db: float | None
    max_abs: float | None
    local_cosine: float | None = None
    local_snr_db: float | None = None
    local_max_abs: float | None = None
    changed_by: str | None = None
    original_nodes: list[str] = dataclasses.field(default_factory=list)
    candidate_ops: list[str] = dataclasses.field(default_factory=list)
    shape: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DiagnoseReport:
    """The ranking (``layers``, largest ``local_error`` first) and how it was obtained."""

    layers: list[LayerError]
    original: str
    candidate: str
    num_feeds: int
    feeds_source: str
    matched: int
    unmatched_original: int
    chunks: int
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``layers`` and its keys are a public contract; non-finite floats become null)."""
        return _clean(dataclasses.asdict(self))


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return round(f, 8) if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- graph helpers


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            used |= _outer_refs(sub)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def _node_reads(node: onnx.NodeProto) -> list[str]:
    reads = [n for n in node.input if n]
    for sub in _subgraphs(node):
        reads.extend(sorted(_outer_refs(sub)))
    return reads


def _rename_reads(node: onnx.NodeProto, names: dict[str, str]) -> None:
    for i, n in enumerate(node.input):
        if n in names:
            node.input[i] = names[n]
    for sub in _subgraphs(node):
        local = (
            {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
        )
        inner = {k: v for k, v in names.items() if k not in local}
        for n in sub.node:
            _rename_reads(n, inner)
        for o in sub.output:
            if o.name in inner:
                # A subgraph output that is an outer tensor: route it through an Identity.
                src = inner[o.name]
                sub.node.append(onnx.helper.make_node("Identity", [src], [o.name]))


class _Graph:
    """Index of a model's main graph: producers, topological order, initializers, inputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for o in node.output:
                if o:
                    self.producer[o] = i
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {i.name: i for i in g.input if i.name not in self.inits}

    def closure(self, targets: Iterable[str], cut: set[str] = frozenset()) -> tuple[list[int], set[str], set[str]]:
        """Nodes computing ``targets`` (stopping at tensors in ``cut``), and the inits and cut tensors read."""
        seen: set[int] = set()
        inits: set[str] = set()
        boundary: set[str] = set()
        stack = [self.producer[t] for t in targets if t in self.producer]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            for name in _node_reads(self.nodes[i]):
                if name in cut:
                    boundary.add(name)
                elif name in self.inits:
                    inits.add(name)
                elif name in self.producer:
                    stack.append(self.producer[name])
        return sorted(seen), inits, boundary

    def build(
        self,
        node_ids: list[int],
        inits: set[str],
        outputs: list[str],
        extra_inputs: dict[str, tuple[int, tuple[int, ...]]] | None = None,
        rename: dict[str, str] | None = None,
    ) -> onnx.ModelProto:
        """A model of the given nodes; ``extra_inputs`` ``{name: (elem_type, shape)}``; reads renamed by ``rename``.

        Extra inputs get their rank with symbolic dims, or their (first feed's) dims where the nodes
        have subgraphs: onnxruntime needs them to type ``Scan`` bodies' outputs.
        """
        src = self.model
        g = onnx.GraphProto(name="diagnose")
        for i in node_ids:
            node = g.node.add()
            node.CopyFrom(self.nodes[i])
            if rename:
                _rename_reads(node, rename)
        reads = {n for node in g.node for n in _node_reads(node)}
        for name, vi in self.inputs.items():
            if name in reads:
                g.input.append(vi)
        concrete = any(True for node in g.node for _ in _subgraphs(node))
        for name, (elem, shape) in (extra_inputs or {}).items():
            dims = list(shape) if concrete else [f"{name}_dim{i}" for i in range(len(shape))]
            g.input.append(onnx.helper.make_tensor_value_info(name, elem, dims))
        for name in sorted(inits):
            g.initializer.append(self.inits[name])
        g.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
        m = onnx.helper.make_model(g, opset_imports=list(src.opset_import))
        m.ir_version = src.ir_version
        m.functions.extend(src.functions)
        return m


class _Sessions:
    """onnxruntime sessions on in-memory models (a scratch file when over protobuf's 2 GB)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.dir: Path | None = None

    def open(self, model: onnx.ModelProto, label: str) -> Any:
        import onnxruntime as ort

        if model.ByteSize() < _PROTO_LIMIT:
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            if self.threads:
                opts.intra_op_num_threads = self.threads
            try:
                return ort.InferenceSession(
                    model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise OnnxCompressError(f"diagnose: onnxruntime cannot load the {label}: {_first(exc)}") from None
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="onnxcompress-diagnose-"))
        path = self.dir / f"{label.replace(' ', '_')}.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
        return make_session(path, threads=self.threads)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _cut(
    boundary: set[str], dtypes: dict[str, tuple[int, tuple[int, ...]]]
) -> tuple[dict[str, tuple[int, tuple[int, ...]]], dict[str, str]]:
    """``extra_inputs`` and ``rename`` for a model cut at ``boundary``."""
    return {n + REF_SUFFIX: dtypes[n] for n in sorted(boundary)}, {n: n + REF_SUFFIX for n in boundary}


def _cut_feed(
    feed: dict[str, np.ndarray], values: dict[str, np.ndarray], boundary: set[str], session: Any
) -> dict[str, np.ndarray]:
    """The feed of a cut model: the graph inputs it reads and the boundary tensors' ``values``."""
    out = _subset(feed, session)
    out.update({n + REF_SUFFIX: values[n] for n in boundary})
    return out


def _subset(feed: dict[str, np.ndarray], session: Any) -> dict[str, np.ndarray]:
    """The part of ``feed`` that a (sliced) model reads."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# --------------------------------------------------------------------------- statistics


class _Acc:
    """Streaming error statistics of one tensor (against the original's values)."""

    __slots__ = ("signal", "noise", "max_abs", "cos_min", "n")

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.cos_min = 1.0
        self.n = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        # float32 with BLAS/pairwise sums: the statistics need ~4 significant digits, not float64 copies.
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = np.where(ok, a, 0.0).astype(np.float32), np.where(ok, b, 0.0).astype(np.float32)
        rows = a.shape[0] if a.ndim >= 2 and a.shape[0] > 0 else 1
        a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
        d = b2 - a2
        aa = np.einsum("ij,ij->i", a2, a2).astype(np.float64)
        bb = np.einsum("ij,ij->i", b2, b2).astype(np.float64)
        ab = np.einsum("ij,ij->i", a2, b2).astype(np.float64)
        dd = np.einsum("ij,ij->i", d, d).astype(np.float64)
        self.signal += float(aa.sum())
        self.noise += float(dd.sum())
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
        na, nb = np.sqrt(aa), np.sqrt(bb)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = ab / (na * nb)
        cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
        if cos.size:
            self.cos_min = min(self.cos_min, float(np.clip(cos, -1, 1).min()))
        self.n += 1

    @property
    def snr_db(self) -> float:
        if self.noise == 0:
            return SNR_CAP
        return float(min(SNR_CAP, 10 * np.log10(max(self.signal, 1e-300) / self.noise)))

    @property
    def relative(self) -> float:
        if self.noise == 0:
            return 0.0
        return float(math.sqrt(self.noise / max(self.signal, 1e-30)))


# --------------------------------------------------------------------------- attribution

_DYNAMIC_OPS = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
_INT4_OPS = {"MatMulNBits", "GatherBlockQuantized"}


def _changed_by(ops: list[onnx.NodeProto], int_inits: set[str], half_inits: set[str]) -> str:
    """The technique that made the candidate nodes ``ops`` (``int_inits``/``half_inits``: such initializers)."""
    types = {n.op_type for n in ops}
    if types & _DYNAMIC_OPS:
        return "int8-dynamic"
    if types & _INT4_OPS or {"Floor", "Concat"} <= types and "Cast" in types:
        return "int4"
    if "QuantizeLinear" in types:
        return "int8-static"
    if "DequantizeLinear" in types or any(i in int_inits for n in ops for i in n.input):
        return "weight quantization"
    if any(i in half_inits for n in ops for i in n.input) or any(
        n.op_type == "Cast"
        and any(a.name == "to" and a.i in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for a in n.attribute)
        for n in ops
    ):
        return "fp16/bf16"
    return "rewritten"


def _by_report(ops: list[onnx.NodeProto], pass_maps: list[tuple[str, set[str]]]) -> str | None:
    """The passes (in order) whose ``tensor_map`` names a tensor the candidate nodes ``ops`` read or write."""
    names = {n for node in ops for n in list(node.input) + list(node.output)}
    found = [name for name, keys in pass_maps if names & keys]
    return ", ".join(dict.fromkeys(found)) or None


_WEIGHTED_OPS = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Gather",
    "Einsum",
    "LSTM",
    "GRU",
    "RNN",
    "Attention",
    "MultiHeadAttention",
    "LayerNormalization",
    "BatchNormalization",
)


def _main_node(nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """The node that names a layer: the first that reads a weight, by op priority, else the last."""
    for op in _WEIGHTED_OPS:
        for node in nodes:
            if node.op_type == op and any(i in inits for i in node.input[1:]):
                return node
    return nodes[-1]


# --------------------------------------------------------------------------- main


def _estimated_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: set[str]) -> dict[str, int]:
    """Bytes of each tensor for ``feed`` by ONNX shape inference (weights stripped; unknown: absent)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(model.graph.node)
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and int(np.prod(t.dims)) <= 64:
            g.initializer.append(t)  # shape operands: keep for data propagation
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for inp in model.graph.input:
        if inp.name in feed:
            g.input.append(
                onnx.helper.make_tensor_value_info(
                    inp.name, inp.type.tensor_type.elem_type, list(np.shape(feed[inp.name]))
                )
            )
        elif all(inp.name != t.name for t in model.graph.initializer):
            g.input.append(inp)
    g.output.extend(model.graph.output)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # shape inference raises on models it cannot handle
        return {}
    sizes = {}
    for vi in inferred.graph.value_info:
        if vi.name not in names or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            try:
                item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
            except (KeyError, TypeError):
                item = 4
            sizes[vi.name] = int(np.prod([d.dim_value for d in tt.shape.dim])) * item
    return sizes


def _chunks(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    default = max(sizes.values(), default=2**20)
    chunks: list[list[str]] = [[]]
    used = 0
    for n in names:
        b = sizes.get(n, default)
        if chunks[-1] and used + b > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += b
    return [c for c in chunks if c]


def diagnose(
    original: str | Path,
    candidate: str | Path,
    feeds: list[dict[str, np.ndarray]],
    *,
    feeds_source: str = "given",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = 0,
    compress_report: dict[str, Any] | None = None,
) -> DiagnoseReport:
    """Rank the candidate's layers by the error each adds (see the module docstring).

    Args:
        original: The reference model file.
        candidate: The compressed model file (same graph inputs and outputs).
        feeds: Inputs, one dict per run (at least one).
        feeds_source: Where the feeds came from, for the report.
        chunk_bytes: Estimated activation bytes per feed captured at once.
        threads: onnxruntime intra-op threads (0: its default).
        compress_report: The JSON report of the ``compress`` run that made the candidate; its passes'
            ``tensor_map`` names the passes that changed each layer exactly (instead of inferring it).

    Raises:
        OnnxCompressError: when the models' inputs or outputs differ, there are no feeds, or
            onnxruntime cannot run the original.
    """
    start = time.perf_counter()
    if not feeds:
        raise OnnxCompressError("diagnose needs at least one input feed")
    a_model, b_model = onnx.load(str(original)), onnx.load(str(candidate))
    a, b = _Graph(a_model), _Graph(b_model)
    if list(a.inputs) != list(b.inputs) or [o.name for o in a_model.graph.output] != [
        o.name for o in b_model.graph.output
    ]:
        raise OnnxCompressError(
            f"the models' inputs or outputs differ: original {list(a.inputs)} -> "
            f"{[o.name for o in a_model.graph.output]}, candidate {list(b.inputs)} -> {[o.name for o in b_model.graph.output]}"
        )
    # Matched: produced by a node under the same name in both main graphs (candidate topological order).
    matched = [n for n in sorted(b.producer, key=lambda n: b.producer[n]) if n in a.producer]
    matched_set = set(matched)
    unmatched = sum(1 for n in a.producer if n not in matched_set)
    sizes = _estimated_bytes(a_model, feeds[0], matched_set)
    chunks = _chunks(matched, sizes, chunk_bytes)
    notes: list[str] = []
    glob: dict[str, _Acc] = {}
    local: dict[str, _Acc] = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, tuple[int, tuple[int, ...]]] = {}  # the candidate's (element type, shape) of matched tensors
    a_dtypes: dict[str, tuple[int, tuple[int, ...]]] = {}  # the original's
    skip: set[str] = set()
    # Per chunk k: the original's and the candidate's own values come from their nodes computing the
    # chunk, cut at matched tensors of earlier chunks (fed with each model's values of them, kept from
    # earlier chunks: the "frontier"); the local values from the candidate's nodes cut at every matched
    # tensor, fed with the original's values.
    done: set[str] = set()
    plans = []
    for chunk in chunks:
        a_plan = a.closure(chunk, cut=done)
        b_plan = b.closure(chunk, cut=done)
        l_plan = b.closure(chunk, cut=matched_set)
        plans.append((a_plan, b_plan, l_plan))
        done.update(chunk)
    last_a: dict[str, int] = {}
    last_b: dict[str, int] = {}
    for k, (a_plan, b_plan, l_plan) in enumerate(plans):
        for n in a_plan[2] | l_plan[2]:
            last_a[n] = k
        for n in b_plan[2]:
            last_b[n] = k
    frontier_a: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    frontier_b: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    sessions = _Sessions(threads)
    try:
        for k, (chunk, (a_plan, b_plan, l_plan)) in enumerate(zip(chunks, plans)):
            names = list(chunk)
            a_sess = sessions.open(a.build(a_plan[0], a_plan[1], names, *_cut(a_plan[2], a_dtypes)), "original")
            b_sess = sessions.open(b.build(b_plan[0], b_plan[1], names, *_cut(b_plan[2], dtypes)), "candidate")
            l_sess: Any = None
            for f, feed in enumerate(feeds):
                try:
                    a_vals = dict(zip(names, a_sess.run(names, _cut_feed(feed, frontier_a[f], a_plan[2], a_sess))))
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise OnnxCompressError(
                        f"diagnose: onnxruntime failed to run the original: {_first(exc)}"
                    ) from None
                try:
                    b_vals = dict(zip(names, b_sess.run(names, _cut_feed(feed, frontier_b[f], b_plan[2], b_sess))))
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise OnnxCompressError(
                        f"diagnose: onnxruntime failed to run the candidate: {_first(exc)}"
                    ) from None
                if f == 0:
                    for n in names:
                        dtypes[n] = (onnx.helper.np_dtype_to_tensor_dtype(b_vals[n].dtype), b_vals[n].shape)
                        a_dtypes[n] = (onnx.helper.np_dtype_to_tensor_dtype(a_vals[n].dtype), a_vals[n].shape)
                        shapes[n] = list(a_vals[n].shape)
                        if a_vals[n].dtype.kind not in "fc" or b_vals[n].dtype.kind not in "fc":
                            skip.add(n)
                    try:
                        l_sess = sessions.open(
                            b.build(l_plan[0], l_plan[1], names, *_cut(l_plan[2], dtypes)), "cut candidate"
                        )
                    except OnnxCompressError as exc:
                        notes.append(f"local errors of {len(names)} tensor(s) unavailable: {exc}")
                local_vals: dict[str, np.ndarray] = {}
                if l_sess is not None:
                    source = {**frontier_a[f], **a_vals}
                    ref = {
                        n: source[n].astype(onnx.helper.tensor_dtype_to_np_dtype(dtypes[n][0]), copy=False)
                        for n in l_plan[2]
                    }
                    try:
                        local_vals = dict(zip(names, l_sess.run(names, _cut_feed(feed, ref, l_plan[2], l_sess))))
                    except Exception as exc:  # onnxruntime raises its own exception types
                        notes.append(f"local errors of {len(names)} tensor(s) unavailable: {_first(exc)}")
                        l_sess = None
                for n in names:
                    if n in skip:
                        continue
                    if a_vals[n].shape != b_vals[n].shape:
                        notes.append(f"{n}: shape {list(b_vals[n].shape)} differs from the original's")
                        skip.add(n)
                        continue
                    glob.setdefault(n, _Acc()).add(a_vals[n], b_vals[n])
                    if n in local_vals:
                        local.setdefault(n, _Acc()).add(a_vals[n], local_vals[n])
                # Keep what later chunks read; drop what they no longer need.
                frontier_a[f].update({n: a_vals[n] for n in names if last_a.get(n, -1) > k})
                frontier_b[f].update({n: b_vals[n] for n in names if last_b.get(n, -1) > k})
                for fr, last in ((frontier_a[f], last_a), (frontier_b[f], last_b)):
                    for n in [n for n in fr if last.get(n, -1) <= k]:
                        del fr[n]
                del a_vals, b_vals, local_vals
            del a_sess, b_sess, l_sess
    finally:
        sessions.close()
    small_ints = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    int_inits = {name for name, t in b.inits.items() if t.data_type in small_ints}
    half_types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    half_inits = {name for name, t in b.inits.items() if t.data_type in half_types}
    pass_maps = [
        (str(p.get("name")), set(p.get("tensor_map") or {}))
        for p in (compress_report or {}).get("passes", [])
        if isinstance(p, dict)
    ]
    layers = []
    for n in matched:
        if n in skip or n not in glob:
            continue
        g, loc = glob[n], local.get(n)
        seg_ids, seg_inits, _ = b.closure([n], cut=matched_set)
        seg = [b.nodes[i] for i in seg_ids]
        a_ids, a_seg_inits, _ = a.closure([n], cut=matched_set)
        a_seg = [a.nodes[i] for i in a_ids]
        a_node = _main_node(a_seg, a.inits)
        same = sorted(x.op_type for x in seg) == sorted(x.op_type for x in a_seg) and seg_inits == a_seg_inits
        layers.append(
            LayerError(
                node=a_node.name,
                op_type=a_node.op_type,
                tensor=n,
                local_error=loc.relative if loc is not None and loc.n == g.n else None,
                cosine=g.cos_min,
                snr_db=g.snr_db,
                max_abs=g.max_abs,
                local_cosine=loc.cos_min if loc is not None else None,
                local_snr_db=loc.snr_db if loc is not None else None,
                local_max_abs=loc.max_abs if loc is not None else None,
                changed_by=_by_report(seg, pass_maps) or (None if same else _changed_by(seg, int_inits, half_inits)),
                original_nodes=[x.name for x in a_seg],
                candidate_ops=sorted({x.op_type for x in seg}),
                shape=shapes.get(n, []),
            )
        )
    layers.sort(key=lambda x: (x.local_error is None, -(x.local_error or 0.0)))
    return DiagnoseReport(
        layers=layers,
        original=str(original),
        candidate=str(candidate),
        num_feeds=len(feeds),
        feeds_source=feeds_source,
        matched=len(layers),
        unmatched_original=unmatched,
        chunks=len(chunks),
        seconds=time.perf_counter() - start,
        notes=notes,
    )
