"""Weight clustering (weight sharing): each weight stored as ``K`` shared values + per-value indices.

Every float32 weight of ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul`` and ``Gather`` (embedding
tables) with at least ``min_elements`` values — initializers and ``Constant`` nodes, main graph and
subgraphs — is replaced by a codebook ``c`` and indices ``i`` with ``W' = c[i]``:

* ``per_channel=False``: one codebook of ``K`` values for the tensor; ``True``: one per output
  channel (Conv 0, ConvTranspose 1, Gemm ``B`` 1 or 0 with ``transB``, MatMul ``B`` last axis, tables
  row 0), codebook ``[C, K]`` indexed by ``i + K * channel``.
* 1-D k-means (Lloyd) with k-means++ initialisation, vectorised over channels: a seeded uniform
  sample of at most ``sample`` values per codebook is clustered; assignment is a ``searchsorted``
  against the sorted centroids' midpoints (channels are separated by adding ``channel * span`` so one
  ``searchsorted`` serves all), updates are ``bincount`` sums. After ``iterations`` Lloyd steps on
  the sample, one step on all values refits the centroids, and every value is assigned to its
  nearest centroid (which minimises ``|w - c[i]|`` for the final codebook). Memory: one tensor at a
  time, assignment in chunks.
* Pruned weights: when at least ``zero_fraction`` of a tensor's values are exactly zero, centroid 0
  is pinned at exactly ``0.0`` (and zero values never move the others), so sparsity is kept exactly.

Storage (``K <= 16``: 4-bit indices, two per byte; else ``uint8``) and reconstruction, all standard
ONNX on constants, folded once by onnxruntime at session load (inference runs in float32 at the
original speed; the file holds ``log2(K)`` bits per weight plus the codebooks):

* ``uint8``: ``Gather(c, Cast(i, int64))`` (per channel: ``Gather(c_flat, Cast(i) + offsets)``);
  when a per-tensor codebook is uniform (``c_k = (k - z) s`` to float precision, e.g. a weight that
  already holds a uniform grid) ``(Cast(i, float) - z) * s`` instead, with no codebook. (Not
  ``DequantizeLinear``: onnxruntime fuses ``DequantizeLinear`` + ``MatMul`` into an int8 kernel that
  also quantizes the activations, measured 0.35 max-abs error on a 64x32 test layer where the folded
  affine form is exact.)
* 4-bit: byte ``j`` of the packed array holds index ``j`` in its low nibble and ``j + P`` in its high
  nibble (``P`` = half the padded count): ``f = Cast(p, float)``, ``hi = Floor(f / 16)``,
  ``lo = f - 16 hi``, ``Concat(lo, hi)``, ``Cast(int64)`` (a ``Slice`` drops the odd padding, opset >= 10),
  ``Reshape`` to the weight's shape, then the ``Gather`` above. (``BitShift``/``BitwiseAnd`` need opsets
  11/18 and the arithmetic form folds the same.)

Size budget (``budget``, ``--param cluster_budget=0.19``; default 0 = every tensor at ``k``): the
constant bytes after the pass are projected with every tensor at ``k``, then tensors are upgraded to
``high_k`` (256) centroids, most error per extra byte first (the relative error of a ``k``-centroid fit
on a sample of the tensor, ``diag H``-weighted where calibration gives a Hessian), while the
projection stays within ``budget`` times the constant bytes before the pass; ``stats["budget"]`` lists
the upgraded tensors. (MiniLM, K=16, budget 0.19: the 36 MatMul weights and the small position and
token-type tables get 256 centroids, the 30522 x 384 word-embedding table 16; worst held-out
sentence cosine 0.996 at 0.187x the fp32 file, against 0.902 at 0.127x with every tensor at 16.)

Calibration Hessians of token models leave padded tokens out (a 2-D integer feed named ``*mask*``,
see :func:`._lstsq.collect_hessians`).

Errors: per value, ``|w - w'|`` is at most half the gap between adjacent centroids (nearest
assignment); ``stats["layers"]`` gives each tensor's mean squared error relative to its energy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import GraphTree, Model, all_tensor_names, constant_meta, constant_value, fresh_name, iter_nodes
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ..quantize._common import refuse_quantized
from . import _lstsq as L

TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
STANDARD_DOMAINS = ("", "ai.onnx", None)
ASSIGN_CHUNK = 1 << 21  # values per searchsorted chunk
METHODS = ("auto", "kmeans", "gptq")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Options for :class:`ClusterPass` (see the module docstring).

    Attributes:
        k: Centroids per codebook, 2..256 (<= 16: packed 4-bit indices).
        per_channel: One codebook per output channel instead of per tensor.
        iterations: Lloyd iterations on the sample.
        sample: Values sampled per codebook for the fit.
        zero_fraction: Pin an exact zero centroid when at least this share of values is zero.
        min_elements: Weights with fewer values stay as they are.
        seed: Seed of the sampling and the k-means++ draws.
        method: ``auto`` (GPTQ assignment with calibration data), ``kmeans`` or ``gptq``.
        damp: Hessian damping of the GPTQ assignment.
        calibration_rows: Samples per onnxruntime run when collecting Hessians.
        hessian_bytes: Memory for the Hessians gathered in one pass over the calibration data.
        budget: Size budget (fraction of the constant bytes before the pass; 0 = off), see module docstring.
        high_k: Centroids of the tensors the budget upgrades.
        mask_padding: Leave padded tokens out of the Hessians (token models).
        sample_weighting: Weight each sample's tokens by ``1 / its token count`` in the Hessians.
    """

    k: int = 256
    per_channel: bool = False
    iterations: int = 25
    sample: int = 1 << 16
    zero_fraction: float = 0.01
    min_elements: int = 256
    seed: int = 0
    method: str = "auto"
    damp: float = 0.01
    calibration_rows: int = 8
    hessian_bytes: int = 128 << 20
    budget: float = 0.0
    high_k: int = 256
    mask_padding: bool = True
    sample_weighting: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget < 1.0:
            raise ValueError("budget must be in [0, 1)")
        if not 2 <= self.k <= 256:
            raise ValueError("k must be in [2, 256]")
        if self.iterations < 0:
            raise ValueError("iterations must be >= 0")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")


def cluster_config(params: Params) -> ClusterConfig:
    """Build the config from ``--param`` settings (every key read unconditionally).

    Keys: ``cluster_k`` (2..256, default 256), ``cluster_per_channel`` (bool), ``cluster_iterations``,
    ``cluster_method`` (auto|kmeans|gptq), ``cluster_budget`` (fraction of the constant bytes, default 0 =
    every tensor at ``cluster_k``; else tensors are upgraded to 256 centroids while the projected size
    fits), ``cluster_damp`` (GPTQ Hessian damping, default 0.01).
    """
    k = params.get_int("cluster_k", 256)
    per_channel = params.get_bool("cluster_per_channel", False)
    iterations = params.get_int("cluster_iterations", 25)
    method = params.get_str("cluster_method", "auto", METHODS)
    budget = params.get_float("cluster_budget", 0.0)
    damp = params.get_float("cluster_damp", 0.01)
    if not (0.0 <= budget < 1.0) or not np.isfinite(budget):
        raise OnnxCompressError(
            f"--param cluster_budget={budget}: expected a fraction of the constant bytes in [0, 1) (0 = off)"
        )
    if not 0.0 < damp <= 10.0:
        raise OnnxCompressError(f"--param cluster_damp={damp}: expected a value in (0, 10] (default 0.01)")
    if not 2 <= k <= 256:
        raise OnnxCompressError(f"--param cluster_k={k}: expected 2..256 centroids (<= 16 stores 4-bit indices)")
    if not 0 <= iterations <= 1000:
        raise OnnxCompressError(f"--param cluster_iterations={iterations}: expected 0..1000")
    return ClusterConfig(k=k, per_channel=per_channel, iterations=iterations, method=method, budget=budget, damp=damp)


# -- k-means --------------------------------------------------------------------------------------------


def _assign(x: np.ndarray, c: np.ndarray, span: float) -> np.ndarray:
    """Nearest centroid index for ``x [R, L]`` given sorted centroids ``c [R, K]`` (per row), in chunks."""
    rows, k = c.shape
    if k == 1:
        return np.zeros(x.shape, dtype=np.int64)
    offsets = np.arange(rows, dtype=np.float64) * span
    mid = ((c[:, 1:] + c[:, :-1]) * 0.5 + offsets[:, None]).reshape(-1)
    out = np.empty(x.shape, dtype=np.int64)
    cols = min(x.shape[1], ASSIGN_CHUNK)
    per = max(1, ASSIGN_CHUNK // max(1, cols))
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        for c0 in range(0, x.shape[1], cols):
            c1 = min(x.shape[1], c0 + cols)
            shifted = x[r0:r1, c0:c1].astype(np.float64) + offsets[r0:r1, None]
            idx = np.searchsorted(mid, shifted, side="left")
            out[r0:r1, c0:c1] = idx - np.arange(r0, r1)[:, None] * (k - 1)
    return out


def _update(x: np.ndarray, idx: np.ndarray, c: np.ndarray, pin_zero: bool, wt: np.ndarray | None = None) -> np.ndarray:
    """One Lloyd update: each centroid becomes the (``wt``-weighted) mean of its values (empty ones stay)."""
    rows, k = c.shape
    flat = (idx + np.arange(rows)[:, None] * k).reshape(-1)
    wfull = None if wt is None else np.broadcast_to(wt, x.shape).reshape(-1)
    xs = x.reshape(-1).astype(np.float64)
    sums = np.bincount(flat, weights=xs if wfull is None else xs * wfull, minlength=rows * k).reshape(rows, k)
    counts = np.bincount(flat, weights=wfull, minlength=rows * k).reshape(rows, k)
    new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
    if pin_zero:
        new = _pin(new)
    return np.sort(new, axis=1)


def _pin(c: np.ndarray) -> np.ndarray:
    """Set each row's centroid closest to zero to exactly 0."""
    c = c.copy()
    c[np.arange(c.shape[0]), np.argmin(np.abs(c), axis=1)] = 0.0
    return c


def _kmeans_pp(
    x: np.ndarray, k: int, rng: np.random.Generator, pin_zero: bool, wt: np.ndarray | None = None
) -> np.ndarray:
    """k-means++ seeds per row of ``x [R, S]`` (the first seed is 0 when ``pin_zero``), sorted ``[R, K]``."""
    rows, s = x.shape
    x64 = x.astype(np.float64)
    c = np.zeros((rows, k), dtype=np.float64)
    ar = np.arange(rows)
    if pin_zero:
        c[:, 0] = 0.0
    else:
        c[:, 0] = x64[ar, rng.integers(0, s, rows)]
    scale = np.ones((1, s)) if wt is None else np.asarray(wt, dtype=np.float64).reshape(1, s)
    dist = (x64 - c[:, :1]) ** 2 * scale
    for j in range(1, k):
        total = dist.sum(axis=1)
        u = rng.random(rows) * total
        cum = np.cumsum(dist, axis=1)
        pick = np.minimum((cum < u[:, None]).sum(axis=1), s - 1)
        # rows whose values are all already seeds (total 0): repeat a seed; duplicates stay harmless
        c[:, j] = x64[ar, pick]
        dist = np.minimum(dist, (x64 - c[:, j : j + 1]) ** 2 * scale)
    return np.sort(c, axis=1)


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    iterations: int = 25,
    sample: int = 1 << 16,
    seed: int = 0,
    pin_zero: bool = False,
    refine: int = 2,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each row of ``x [R, L]`` into ``k`` values: ``(codebook [R, k] sorted, indices [R, L])``.

    ``weights [L]`` (optional, per column, >= 0) weight each value's squared error (e.g. ``diag H``).
    """
    rows, length = x.shape
    rng = np.random.default_rng(seed)
    per_row = max(4 * k, sample // max(rows, 1))
    if length > per_row:
        # a uniform sample plus each row's most extreme values: rare outliers carry most of the
        # squared error, and a uniform sample would miss them
        tails = min(length, k)
        order = np.argpartition(np.abs(x), length - tails, axis=1)[:, length - tails :]
        cols = rng.choice(length, per_row, replace=False)
        xs = np.concatenate([x[:, cols], np.take_along_axis(x, order, axis=1)], axis=1)
        ws = None
        if weights is not None:
            # tails differ per row: give them the mean weight
            ws = np.concatenate([weights[cols], np.full(tails, float(np.mean(weights)))])
    else:
        xs, ws = x, weights
    lo, hi = float(np.min(x)), float(np.max(x))
    span = 2.0 * (hi - lo) + 1.0
    c = _kmeans_pp(xs, k, rng, pin_zero, ws)
    for _ in range(iterations):
        idx = _assign(xs, c, span)
        new = _update(xs, idx, c, pin_zero, ws)
        if np.array_equal(new, c):
            break
        c = new
    for _ in range(refine):  # Lloyd steps on all values
        idx = _assign(x, c, span)
        c = _update(x, idx, c, pin_zero, weights)
    idx = _assign(x, c, span)
    return c.astype(np.float32), idx


# -- the pass -------------------------------------------------------------------------------------------


def _out_axis(node: gs.Node, t: gs.Tensor, rank: int) -> int | None:
    """The output-channel axis of weight ``t`` for consumer ``node`` (None if it is not its weight)."""
    op = node.op
    if op == "Conv" and len(node.inputs) > 1 and node.inputs[1] is t:
        return 0
    if op == "ConvTranspose" and len(node.inputs) > 1 and node.inputs[1] is t:
        return 1 if rank > 1 else None
    if op == "Gemm" and len(node.inputs) > 1 and node.inputs[1] is t and rank == 2:
        return 0 if node.attrs.get("transB", 0) else 1
    if op == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is t and node.inputs[0] is not t and rank >= 2:
        return rank - 1
    if op == "Gather" and node.inputs[0] is t and t not in node.inputs[1:] and rank >= 1:
        return 0 if int(node.attrs.get("axis", 0)) % rank == 0 else None
    return None


class ClusterPass:
    """k-means weight sharing (see module docstring)."""

    name = "cluster"

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Cluster the weights of the target ops in every graph of ``model``."""
        refuse_quantized(model, self.name)
        cfg = self.config
        report = PassReport(self.name)
        before = GraphSize.of(model)
        if cfg.method == "gptq" and not ctx.calibration:
            raise OnnxCompressError(
                "cluster with cluster_method=gptq needs calibration data: pass --calibration DATA or put "
                "<model>.calibration.npz beside the model"
            )
        weights = self._collect(model, report, ctx.exclude)
        data = cfg.method == "gptq" or (cfg.method == "auto" and bool(ctx.calibration))
        stats: dict[str, Any] = {"method": "gptq" if data else "kmeans", "gptq_fallback": []}
        hessians: dict[int, tuple[np.ndarray, str]] = {}
        if data and weights:
            start = time.perf_counter()
            hessians = self._hessians(model, ctx, stats)
            stats["hessian_seconds"] = round(time.perf_counter() - start, 3)
        tree = GraphTree(model.graph) if weights else None
        names = all_tensor_names(model.graph) if weights else set()
        layers: list[dict[str, Any]] = []
        forms: dict[str, int] = {}
        items: list[tuple[gs.Tensor, int | None]] = []
        for t, axes in weights.values():
            reason = self._skip_reason(t, model.opset)
            if reason:
                report.skipped.append((t.name, reason))
                continue
            value = constant_value(t, cache=False)
            assert value is not None
            finite = bool(np.all(np.isfinite(value)))
            del value
            if not finite:
                report.skipped.append((t.name, "weight has non-finite values"))
                continue
            axis = axes[0] if cfg.per_channel and len(set(axes)) == 1 and axes[0] is not None else None
            if cfg.per_channel and axis is None:
                report.skipped.append((t.name, "consumers disagree on the channel axis: one codebook per tensor"))
            items.append((t, axis))
        ks = self._choose_k(items, hessians, before.bytes, stats)
        for t, axis in items:
            value = constant_value(t, cache=False)
            assert value is not None and tree is not None
            h, layout = hessians.pop(id(t), (None, None))
            layer = self._replace(t, value, axis, tree, names, model.opset, report, h, layout, ks[id(t)])
            forms[layer["form"]] = forms.get(layer["form"], 0) + 1
            layers.append(layer)
            del value
        if layers:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = bool(layers)
        report.stats = before.stats(
            model,
            bool(layers),
            tensors_changed=len(layers),
            k=cfg.k,
            forms=forms,
            layers=layers,
            nonstandard_ops=[],
            **stats,
        )
        return report

    def _choose_k(
        self,
        items: list[tuple[gs.Tensor, int | None]],
        hessians: dict[int, tuple[np.ndarray, str]],
        model_bytes: int,
        stats: dict[str, Any],
    ) -> dict[int, int]:
        """``{id(weight): K}``: ``k`` for all, or (``budget``) ``high_k`` for the tensors worth it that fit.

        The size after the pass is projected (constants left alone + every clustered tensor's indices and
        codebook at ``k``); tensors are upgraded to ``high_k`` centroids in order of error per extra
        byte (the relative error at ``k`` of a sampled fit, ``diag H``-weighted where a Hessian is known,
        over the bytes the upgrade adds) while the projection stays within ``budget * bytes before``.
        """
        cfg = self.config
        ks = {id(t): cfg.k for t, _ in items}
        if cfg.budget <= 0 or cfg.high_k <= cfg.k or not items:
            return ks
        projected = model_bytes
        cands = []
        for t, axis in items:
            shape = constant_meta(t)[0]  # type: ignore[index]
            n = int(np.prod(shape))
            channels = int(shape[axis]) if axis is not None else 1
            low, high = stored_bytes(n, channels, cfg.k), stored_bytes(n, channels, cfg.high_k)
            projected += low - 4 * n
            if n <= cfg.high_k:
                continue
            err = self._error_proxy(t, axis, hessians.get(id(t)))
            cands.append((err / max(high - low, 1), err, high - low, t))
        limit = cfg.budget * model_bytes
        upgraded = []
        for _, err, extra, t in sorted(cands, key=lambda c: -c[0]):
            if projected + extra <= limit:
                ks[id(t)] = cfg.high_k
                projected += extra
                upgraded.append({"tensor": t.name, "relative_error_at_k": round(err, 6), "extra_bytes": extra})
        stats["budget"] = {
            "fraction": cfg.budget,
            "high_k": cfg.high_k,
            "projected_bytes": int(projected),
            "projected_fraction": round(projected / max(model_bytes, 1), 4),
            "upgraded": upgraded,
        }
        return ks

    def _error_proxy(self, t: gs.Tensor, axis: int | None, hl: tuple[np.ndarray, str] | None) -> float:
        """Relative (``diag H``-weighted) squared error of ``k`` centroids fitted on a sample of ``t``."""
        cfg = self.config
        value = constant_value(t, cache=False)
        assert value is not None
        rng = np.random.default_rng(cfg.seed)
        wt = None
        if hl is not None:
            h, layout = hl
            rows = L.to_rows(value, layout)
            diag = np.maximum(np.diag(h), 0.0)
            wt = diag / diag.mean() if diag.mean() > 0 else None
        elif axis is not None:
            rows = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
        else:
            rows = value.reshape(1, -1)
        del value
        if axis is not None:  # per channel: a few whole channels
            take = rng.choice(rows.shape[0], min(rows.shape[0], 32), replace=False)
            x = rows[np.sort(take)]
        else:  # per tensor: a uniform sample of all values
            flat = rows.reshape(-1)
            pick = rng.choice(flat.size, min(flat.size, 1 << 15), replace=False)
            x = flat[pick].reshape(1, -1)
            wt = None if wt is None else np.tile(wt, rows.shape[0])[pick]
        c, idx = kmeans(x, cfg.k, iterations=10, sample=x.size, seed=cfg.seed, refine=0, weights=wt)
        rec = np.take_along_axis(c, idx, axis=1).astype(np.float64)
        scale = np.ones(x.shape[1]) if wt is None else wt
        den = float(np.sum(scale * x.astype(np.float64) ** 2))
        return float(np.sum(scale * (rec - x) ** 2) / den) if den > 0 else 0.0

    def _hessians(self, model: Model, ctx: PassContext, stats: dict[str, Any]) -> dict[int, tuple[np.ndarray, str]]:
        """``{id(weight): (H, layout)}`` for MatMul/Gemm weights whose inputs can be tapped."""
        cfg = self.config
        fallback: list[dict[str, str]] = stats["gptq_fallback"]
        plans = []
        for w in L.collect_weights(model, ("MatMul", "Gemm"), ctx.exclude, [], conv=False):
            keys = L.tappable_keys(model, w)
            meta = constant_meta(w.tensor)
            if isinstance(keys, str):
                fallback.append({"tensor": w.tensor.name, "reason": keys})
            elif meta is not None and meta[1] == np.float32 and int(np.prod(meta[0])) >= cfg.min_elements:
                plans.append((w, keys))
        out: dict[int, tuple[np.ndarray, str]] = {}
        for group in L.hessian_groups(plans, cfg.hessian_bytes):
            keys = list(dict.fromkeys(k for _, ks in group for k in ks))
            widths = {}
            for w, ks in group:
                widths.update(dict.fromkeys(ks, L.to_rows_shape(constant_meta(w.tensor)[0], w.layout)[1]))  # type: ignore[index]
            try:
                sums = L.collect_hessians(
                    model,
                    keys,
                    widths,
                    ctx.calibration or [],
                    cfg.calibration_rows,
                    mask_padding=cfg.mask_padding,
                    sample_weighting=cfg.sample_weighting,
                )
            except OnnxCompressError as exc:
                if cfg.method == "gptq":
                    raise
                fallback.extend({"tensor": w.tensor.name, "reason": f"calibration failed: {exc}"} for w, _ in group)
                continue
            for w, ks in group:
                hs = [sums.get(k) for k in ks]
                kdim = widths[ks[0]]
                if any(h is None or h.shape != (kdim, kdim) for h in hs):
                    fallback.append({"tensor": w.tensor.name, "reason": "activation width does not match K"})
                    continue
                out[id(w.tensor)] = (np.sum(hs, axis=0), w.layout)
        return out

    def _collect(
        self, model: Model, report: PassReport, exclude: tuple[str, ...]
    ) -> dict[int, tuple[gs.Tensor, list[int | None]]]:
        """``{id(weight): (tensor, [channel axis per consumer])}``."""
        found: dict[int, tuple[gs.Tensor, list[int | None]]] = {}
        for _, node in iter_nodes(model.graph):
            if node.op not in TARGET_OPS or node.domain not in STANDARD_DOMAINS:
                continue
            if is_excluded(node.name, node.op, exclude):
                report.skipped.append((node.name or node.op, "excluded by configuration"))
                continue
            idx = (0,) if node.op == "Gather" else (1,)
            for i in idx:
                if i >= len(node.inputs):
                    continue
                t = node.inputs[i]
                meta = constant_meta(t)
                if meta is None:
                    continue
                if node.op == "Gather" and constant_meta(node.inputs[1]) is not None:
                    continue  # constant indices: left to constant folding
                if node.op in ("MatMul", "Gemm") and constant_meta(node.inputs[0]) is not None:
                    continue  # both constant
                axis = _out_axis(node, t, len(meta[0]))
                found.setdefault(id(t), (t, []))[1].append(axis)
        # a weight also read by a node that is not one of its weight consumers keeps its value, but
        # clustering replaces the tensor for every reader (``W'`` is a drop-in float value), so no skip.
        return found

    def _skip_reason(self, t: gs.Tensor, opset: int) -> str | None:
        meta = constant_meta(t)
        assert meta is not None
        shape, dtype = meta
        if dtype != np.float32:
            return f"dtype {dtype} (only float32 weights are clustered)"
        if opset < 7:
            return f"opset {opset} < 7: Add/Mul broadcast only from opset 7"
        size = int(np.prod(shape)) if shape else 1
        if size < self.config.min_elements:
            return f"too small ({size} elements < {self.config.min_elements})"
        if size <= self.config.k:
            return f"{size} values <= k={self.config.k} centroids: nothing to share"
        return None

    def _replace(
        self,
        t: gs.Tensor,
        w: np.ndarray,
        axis: int | None,
        tree: GraphTree,
        names: set[str],
        opset: int,
        report: PassReport,
        h: np.ndarray | None = None,
        layout: str | None = None,
        k: int | None = None,
    ) -> dict[str, Any]:
        """Fit ``k`` centroids (default the config's), emit indices + codebook + reconstruction, rewire ``t``."""
        cfg = self.config
        k = k or cfg.k
        shape = w.shape
        if axis is None:
            rows = w.reshape(1, -1)
        else:
            rows = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
        pin = float(np.mean(w == 0)) >= cfg.zero_fraction and k >= 2
        fit = dict(iterations=cfg.iterations, sample=cfg.sample, seed=cfg.seed, pin_zero=pin)
        scheme = "kmeans"
        if h is not None and layout is not None:
            rows = L.to_rows(w, layout)  # [N, K]; row n is output channel n
            diag = np.maximum(np.diag(h), 0.0)
            diag = diag / diag.mean() if diag.mean() > 0 else np.ones_like(diag)
            if axis is None:
                codebook, _ = kmeans(rows.reshape(1, -1), k, weights=np.tile(diag, rows.shape[0]), **fit)
            else:
                codebook, _ = kmeans(rows, k, weights=diag, **fit)
            idx_rows = L.gptq_codebook(rows, h, codebook, damp=cfg.damp)
            rec = np.take_along_axis(np.broadcast_to(codebook, (rows.shape[0], k)), idx_rows, axis=1)
            err = L.hessian_error(h, rows, rec) / max(L.hessian_error(h, rows, np.zeros_like(rows)), 1e-30)
            idx = L.from_rows(idx_rows, layout, shape)
            scheme = "kmeans-gptq"
        else:
            if axis is None:
                rows = w.reshape(1, -1)
            else:
                rows = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
            codebook, idx = kmeans(rows, k, **fit)
            rec = np.take_along_axis(codebook, idx, axis=1)
            err = float(np.sum((rec.astype(np.float64) - rows) ** 2) / max(np.sum(rows.astype(np.float64) ** 2), 1e-30))
            if axis is not None:
                idx = np.moveaxis(idx.reshape((shape[axis],) + tuple(np.delete(shape, axis))), 0, axis)
            else:
                idx = idx.reshape(shape)
        base = t.name
        owner = tree.owner_of_users(t)
        nodes: list[gs.Node] = []

        def var(suffix: str, dtype: Any = np.float32) -> gs.Variable:
            return gs.Variable(fresh_name(names, f"{base}_{suffix}"), dtype=dtype)

        def const(suffix: str, value: np.ndarray) -> gs.Constant:
            return gs.Constant(fresh_name(names, f"{base}_{suffix}"), value)

        def node(op: str, inputs: list[gs.Tensor], out: gs.Tensor, **attrs: Any) -> gs.Tensor:
            nodes.append(gs.Node(op, name=fresh_name(names, f"{base}_{op}"), attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        out = gs.Variable(fresh_name(names, f"{base}_clustered"), dtype=np.float32, shape=list(shape))
        packed = k <= 16
        uniform = None if (packed or axis is not None) else _uniform_grid(codebook[0])
        stored = codebook.nbytes
        if uniform is not None:
            scale, zero = uniform
            q = const("indices", idx.astype(np.uint8))
            f = node("Cast", [q], var("indices_float"), to=1)
            centred = node("Sub", [f, const("zero_point", np.array(zero, np.float32))], var("centred"))
            node("Mul", [centred, const("scale", np.array(scale, dtype=np.float32))], out)
            form = "affine"
            stored = q.values.nbytes + 8
        else:
            if packed and (idx.size % 2 == 0 or opset >= 10):
                flat = idx.reshape(-1).astype(np.uint8)
                if flat.size % 2:
                    flat = np.concatenate([flat, np.zeros(1, np.uint8)])
                half = flat.size // 2
                p = const("indices_packed", (flat[:half] | (flat[half:] << 4)).astype(np.uint8))
                stored += p.values.nbytes
                f = node("Cast", [p], var("packed_float"), to=1)
                hi = node(
                    "Floor", [node("Div", [f, const("sixteen", np.array(16, np.float32))], var("div"))], var("hi")
                )
                lo = node("Sub", [f, node("Mul", [hi, const("sixteen_m", np.array(16, np.float32))], var("hi16"))],
                          var("lo"))  # fmt: skip
                both = node("Concat", [lo, hi], var("codes_float"), axis=0)
                codes = node("Cast", [both], var("codes", np.int64), to=7)
                if idx.size % 2:
                    sliced = var("codes_sliced", np.int64)
                    node("Slice", [codes, const("start", np.array([0], np.int64)),
                                   const("end", np.array([idx.size], np.int64))], sliced)  # fmt: skip
                    codes = sliced
                codes = node(
                    "Reshape", [codes, const("shape", np.array(shape, np.int64))], var("codes_shaped", np.int64)
                )
                form = "gather-4bit"
            else:
                q = const("indices", idx.astype(np.uint8))
                stored += q.values.nbytes
                codes = node("Cast", [q], var("codes", np.int64), to=7)
                form = "gather-uint8"
            if axis is None:
                table = const("codebook", codebook.reshape(-1))
            else:
                offsets = (np.arange(shape[axis], dtype=np.int64) * k).reshape(
                    [-1 if i == axis else 1 for i in range(len(shape))]
                )
                codes = node("Add", [codes, const("offsets", offsets)], var("codes_offset", np.int64))
                table = const("codebook", codebook.reshape(-1))
                form += "-per-channel"
            node("Gather", [table, codes], out, axis=0)
        first = next(iter(t.outputs), None)
        for consumer in list(t.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is t:
                    consumer.inputs[i] = out
        owner.nodes.extend(nodes)
        report.tensor_map[out.name] = t.name
        return {
            "node": first.name if first is not None else "",
            "op": first.op if first is not None else "",
            "tensor": t.name,
            "bytes_before": int(w.nbytes),
            "bytes_after": int(stored),
            "scheme": f"cluster-{scheme}-k{k}-{'channel' if axis is not None else 'tensor'}",
            "form": form,
            "relative_error": round(float(err), 8),
            "zero_pinned": pin,
            "k": k,
        }


def stored_bytes(n: int, channels: int, k: int) -> int:
    """Bytes of ``n`` indices (4-bit packed for ``k <= 16``, else uint8) plus ``channels`` float32 codebooks.

    Per channel (``channels > 1``) the int64 index offsets of the channels are counted too.
    """
    offsets = 8 * channels if channels > 1 else 0
    return ((n + 1) // 2 if k <= 16 else n) + 4 * channels * k + offsets


def _uniform_grid(c: np.ndarray) -> tuple[float, int] | None:
    """``(s, z)`` when the sorted codebook ``c`` is ``(k - z) s`` (float32 exact enough) for k = 0..K-1."""
    k = c.size
    if k < 2:
        return None
    s = float(c[-1] - c[0]) / (k - 1)
    if not s > 0:
        return None
    z = int(round(-float(c[0]) / s))
    if not 0 <= z <= 255:
        return None
    grid = (np.arange(k, dtype=np.float64) - z) * np.float32(s)
    if np.max(np.abs(grid - c)) > 1e-6 * max(float(np.max(np.abs(c))), 1e-30):
        return None
    return float(np.float32(s)), z
