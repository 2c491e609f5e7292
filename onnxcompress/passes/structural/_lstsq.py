"""Least-squares maths shared by the structural passes: layer Hessians, SparseGPT, weighted SVD.

Layout: a weight is handled as ``W [N, K]`` (rows = output channels, columns = the reduction axis
``K``), so that the layer computes ``y = x W^T`` for an input row ``x [K]``. For ``n`` calibration
input rows ``X [n, K]`` the squared output error of a replacement ``W'`` is::

    E(W') = ||X W^T - X W'^T||_F^2 = tr((W - W') H (W - W')^T),      H = X^T X  [K, K]

Everything below minimises ``E`` (the layer-wise reconstruction objective) with ``H`` damped as
``H + damp * mean(diag H) * I`` (``damp`` 0.01 by default), so that it is positive definite even
when calibration rows are fewer than ``K`` or columns are dead.

* :func:`sparsegpt` (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): columns are processed left to right with ``U = cholesky(H^-1)^T`` (upper).
  Within a block of ``B`` columns, the mask is chosen by the OBS saliency ``w_ij^2 / U_jj^2``
  (unstructured: the smallest ``sparsity`` fraction of the block; N:M: the ``M - N`` smallest of each
  group of ``M`` consecutive columns, row by row). Column ``j`` is then pruned, its error
  ``e = (w_j - w'_j) / U_jj`` and the columns to its right absorb the optimal OBS update
  ``w_k -= e U_jk`` (exactly the GPTQ recursion, with "set to zero" as the quantizer). The kept weights
  are thereby refitted by least squares to the layer's own calibration inputs; ``E`` after SparseGPT
  is never worse than plain magnitude pruning on the damped objective in practice (the tests check it
  on correlated inputs).
* :func:`weighted_svd`: the rank-``r`` ``W'`` minimising ``E`` is ``W' = [W S]_r S^-1`` with ``S`` the
  symmetric square root of the damped ``H`` (``S^2 = H``): ``E(W') = ||(W - W') S||_F^2``, and
  Eckart-Young on ``W S`` gives the best rank-``r`` approximation in that norm. Without ``H``
  (``S = I``) this is the plain truncated SVD.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import Model, constant_meta, iter_nodes
from ..base import is_excluded

STANDARD_DOMAINS = ("", "ai.onnx", None)


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """``H + damp * mean(diag H) * I`` in float64 (dead columns get a unit diagonal)."""
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.diag(h).copy()
    dead = diag <= 0
    if dead.any():
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += max(damp, 1e-8) * (mean if mean > 0 else 1.0)
    return h


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """``U`` upper-triangular with ``U^T U = H^-1`` (``H`` positive definite).

    Raises:
        np.linalg.LinAlgError: when ``H`` is not positive definite.
    """
    lower = np.linalg.cholesky(h)
    eye = np.eye(h.shape[0])
    inv_lower = np.linalg.solve(lower, eye)  # L^-1 (lower)
    hinv = inv_lower.T @ inv_lower
    return np.linalg.cholesky(hinv).T


def output_error(x: np.ndarray, w: np.ndarray, w2: np.ndarray) -> float:
    """``||X W^T - X W'^T||_F^2`` (for tests and reports)."""
    d = x.astype(np.float64) @ (w.astype(np.float64) - w2.astype(np.float64)).T
    return float(np.sum(d * d))


def hessian_error(h: np.ndarray, w: np.ndarray, w2: np.ndarray) -> float:
    """``tr((W - W') H (W - W')^T)``: the output error from the Hessian alone."""
    d = w.astype(np.float64) - w2.astype(np.float64)
    return float(np.sum((d @ h) * d))


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Pruning mask (True = pruned) keeping the ``n`` highest of every ``m`` consecutive columns per row.

    ``scores [N, K]`` with ``K`` a multiple of ``m``.
    """
    rows, k = scores.shape
    groups = scores.reshape(rows, k // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[..., : m - n], True, axis=-1)
    return mask.reshape(rows, k)


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Pruning mask (True = pruned) of the ``round(sparsity * size)`` smallest magnitudes of ``w``."""
    count = int(round(sparsity * w.size))
    mask = np.zeros(w.size, dtype=bool)
    if count > 0:
        idx = np.argpartition(np.abs(w).reshape(-1), count - 1)[:count]
        mask[idx] = True
    return mask.reshape(w.shape)


def sparsegpt(
    w: np.ndarray,
    h: np.ndarray,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block: int = 128,
    damp: float = 0.01,
) -> np.ndarray:
    """Prune ``W [N, K]`` to ``sparsity`` (or N:M along ``K``) with the SparseGPT OBS update (module docstring).

    Args:
        w: The weight, rows = output channels (not modified).
        h: ``X^T X`` of the layer's calibration inputs, ``[K, K]``.
        sparsity: Fraction of weights set to zero (unstructured).
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive columns (``K`` a multiple of ``m``).
        block: Columns per lazy-update block (a multiple of ``m`` for N:M).
        damp: Damping of ``H`` (fraction of its mean diagonal).

    Returns:
        The pruned, error-compensated weight (float32), exact zeros where pruned.

    Raises:
        np.linalg.LinAlgError: when the damped Hessian cannot be factorised.
    """
    rows, k = w.shape
    hd = damped(h, damp)
    dead = np.diag(np.asarray(h, dtype=np.float64)) <= 0
    wf = np.array(w, dtype=np.float64, copy=True)
    wf[:, dead] = 0.0
    u = inverse_cholesky_upper(hd)
    if nm is not None:
        block = max(nm[1], (block // nm[1]) * nm[1])
    out = np.zeros_like(wf)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wf[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        d1 = np.diag(u1)
        err = np.zeros_like(w1)
        if nm is None:
            score = w1 * w1 / (d1 * d1)[None, :]
            mask1 = magnitude_mask(np.sqrt(score), sparsity)
        else:
            mask1 = np.zeros_like(w1, dtype=bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                seg = w1[:, j : j + nm[1]]
                sc = seg * seg / (d1[j : j + nm[1]] ** 2)[None, :]
                mask1[:, j : j + nm[1]] = nm_mask(sc, nm[0], nm[1])
            col = w1[:, j]
            q = np.where(mask1[:, j], 0.0, col)
            e = (col - q) / d1[j]
            out[:, i1 + j] = q
            w1[:, j:] -= np.outer(e, u1[j, j:])
            err[:, j] = e
        if i2 < k:
            wf[:, i2:] -= err @ u[i1:i2, i2:]
    return out.astype(np.float32)


def sqrt_and_inverse(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(S, S^-1)`` with ``S`` the symmetric square root of the damped ``H``."""
    hd = damped(h, damp)
    vals, vecs = np.linalg.eigh(hd)
    vals = np.maximum(vals, vals.max() * 1e-12)
    root = np.sqrt(vals)
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def weighted_svd(
    w: np.ndarray, h: np.ndarray | None, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """SVD of ``W S`` (``W [N, K]``; ``S = I`` without ``H``): ``(U, s, Vt, S^-1 or None)``.

    The rank-``r`` factors are ``W' = (U_r sqrt(s_r)) (sqrt(s_r) Vt_r S^-1)``.
    """
    w64 = np.asarray(w, dtype=np.float64)
    if h is None:
        u, s, vt = np.linalg.svd(w64, full_matrices=False)
        return u, s, vt, None
    root, inv_root = sqrt_and_inverse(h, damp)
    u, s, vt = np.linalg.svd(w64 @ root, full_matrices=False)
    return u, s, vt, inv_root


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)`` (at least 1)."""
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(len(s), max(1, np.searchsorted(e / e[-1], energy - 1e-12) + 1)))


def split_rows(n: int, rows: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``rows`` each (``rows <= 0``: one slice)."""
    if rows <= 0 or n <= rows:
        yield slice(0, n)
        return
    for i in range(0, n, rows):
        yield slice(i, min(n, i + rows))


# -- layer views: a weight as rows [N, K] --------------------------------------------------------------

LAYOUTS = ("kn", "nk", "conv", "batched")


def to_rows(value: np.ndarray, layout: str, channels_last: bool = False) -> np.ndarray:
    """The weight as ``[N, K]`` (a copy where needed).

    Layouts: ``kn`` (MatMul ``B [K, N]``, Gemm ``transB=0``), ``nk`` (Gemm ``transB=1``), ``conv``
    (``[O, C/g, kh, kw]`` -> ``[O, C/g * kh * kw]``; ``channels_last`` orders ``K`` as ``kh, kw, C/g`` so
    that consecutive columns run along the input channels) and ``batched`` (MatMul ``B [..., K, N]``
    -> ``[batch * N, K]``).
    """
    if layout == "nk":
        return np.array(value, copy=True)
    if layout == "kn":
        return np.ascontiguousarray(value.T)
    if layout == "conv":
        if channels_last and value.ndim > 2:
            return np.ascontiguousarray(np.moveaxis(value, 1, -1).reshape(value.shape[0], -1))
        return np.ascontiguousarray(value.reshape(value.shape[0], -1))
    k, n = value.shape[-2:]
    return np.ascontiguousarray(value.reshape(-1, k, n).transpose(0, 2, 1).reshape(-1, k))


def to_rows_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """``(N, K)`` of :func:`to_rows` for a weight of ``shape``."""
    if layout == "nk":
        return int(shape[0]), int(shape[1])
    if layout == "kn":
        return int(shape[1]), int(shape[0])
    if layout == "conv":
        return int(shape[0]), int(np.prod(shape[1:]))
    return int(np.prod(shape[:-2], dtype=np.int64) * shape[-1]), int(shape[-2])


def from_rows(rows: np.ndarray, layout: str, shape: tuple[int, ...], channels_last: bool = False) -> np.ndarray:
    """Inverse of :func:`to_rows`."""
    if layout == "nk":
        return np.ascontiguousarray(rows.reshape(shape))
    if layout == "kn":
        return np.ascontiguousarray(rows.T)
    if layout == "conv":
        if channels_last and len(shape) > 2:
            moved = (shape[0], *shape[2:], shape[1])
            return np.ascontiguousarray(np.moveaxis(rows.reshape(moved), -1, 1))
        return np.ascontiguousarray(rows.reshape(shape))
    k, n = shape[-2:]
    return np.ascontiguousarray(rows.reshape(-1, n, k).transpose(0, 2, 1).reshape(shape))


def split_feed(feed: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """``feed`` cut into slices of ``rows`` samples along axis 0 when all inputs share that axis' size."""
    arrays = list(feed.values())
    n = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
    if rows <= 0 or n <= rows or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        yield feed
        return
    for r0 in range(0, n, rows):
        yield {k: v[r0 : r0 + rows] for k, v in feed.items()}


def batch_axis(graph_inputs: list) -> bool:
    """Whether every graph input has a dynamic leading dimension (feeds can be split on it)."""
    if not graph_inputs:
        return False
    for t in graph_inputs:
        shape = getattr(t, "shape", None)
        if not shape or (isinstance(shape[0], int) and shape[0] > 0):
            return False
    return True


def accumulate_hessian(sums: dict[str, np.ndarray], name: str, a: np.ndarray, k: int) -> None:
    """Add ``X^T X`` of activation ``a`` (rows along its last axis of width ``k``) to ``sums[name]``."""
    a = np.asarray(a)
    if a.dtype != np.float32 or a.ndim == 0 or a.shape[-1] != k:
        return
    x = a.reshape(-1, k)
    if not np.all(np.isfinite(x)):
        return
    xtx = (x.T @ x).astype(np.float64)
    prev = sums.get(name)
    if prev is None:
        sums[name] = xtx
    elif prev.shape == xtx.shape:
        prev += xtx


# -- weights and the activations they multiply ----------------------------------------------------------


@dataclasses.dataclass
class Use:
    """One consumer of a weight.

    Attributes:
        node: The consumer.
        graph: The graph that holds it.
        layout: How the weight maps to rows ``[N, K]`` (see :func:`to_rows`).
        activation: The input the weight multiplies (None: unknown or not a plain row product).
        channels_first: The activation's ``K`` axis is 1 (a 1x1 Conv), else the last axis.
    """

    node: gs.Node
    graph: gs.Graph
    layout: str
    activation: gs.Tensor | None
    channels_first: bool = False


@dataclasses.dataclass
class Weight:
    """A constant weight and every consumer reading it."""

    tensor: gs.Tensor
    uses: list[Use]

    @property
    def layout(self) -> str:
        return self.uses[0].layout

    def keys(self) -> list[tuple[str, bool]]:
        """Distinct ``(activation name, channels_first)`` of its consumers (empty if any is unknown)."""
        if any(u.activation is None for u in self.uses):
            return []
        return list(dict.fromkeys((u.activation.name, u.channels_first) for u in self.uses))  # type: ignore[union-attr]


def use_of(node: gs.Node, graph: gs.Graph, conv: bool = True) -> tuple[Use | None, gs.Tensor | None, str | None]:
    """How ``node`` reads a constant weight: ``(use, weight, skip reason)``; all None when it reads none.

    MatMul ``B`` (2-D ``kn``, higher rank ``batched``), Gemm ``B`` (``kn``/``nk``) and, with ``conv``,
    Conv ``W`` (``conv``; a 1x1 ungrouped Conv also names its activation).
    """
    op = node.op
    if node.domain not in STANDARD_DOMAINS or len(node.inputs) < 2:
        return None, None, None
    if op == "Conv" and conv:
        w = node.inputs[1]
        meta = constant_meta(w)
        if meta is None:
            return None, None, "no constant weight input (computed at run time)"
        if len(meta[0]) < 3:
            return None, None, f"rank-{len(meta[0])} Conv weight"
        one_by_one = all(d == 1 for d in meta[0][2:]) and int(node.attrs.get("group", 1)) == 1
        act = node.inputs[0] if one_by_one and constant_meta(node.inputs[0]) is None else None
        return Use(node, graph, "conv", act, channels_first=True), w, None
    if op not in ("MatMul", "Gemm"):
        return None, None, None
    a, b = node.inputs[0], node.inputs[1]
    a_const, b_meta = constant_meta(a) is not None, constant_meta(b)
    if b_meta is None:
        if a_const:
            return None, None, "constant first input (weight on the left) is left as is"
        return None, None, "no constant weight input (computed at run time)"
    if a_const:
        return None, None, "both inputs constant: left to constant folding"
    if a is b:
        return None, None, "the weight is also the activation"
    rank = len(b_meta[0])
    if rank < 2 or (op == "Gemm" and rank != 2):
        return None, None, f"rank-{rank} weight left as is"
    if op == "MatMul":
        return Use(node, graph, "kn" if rank == 2 else "batched", a if rank == 2 else None), b, None
    layout = "nk" if node.attrs.get("transB", 0) else "kn"
    return Use(node, graph, layout, None if node.attrs.get("transA", 0) else a), b, None


def collect_weights(
    model: Model, ops: tuple[str, ...], exclude: tuple[str, ...], skipped: list[tuple[str, str]], conv: bool = True
) -> list[Weight]:
    """Constant float weights of the ``ops`` consumers, each with all its uses (agreeing layouts only).

    A weight also read by a node that is not a recognised use (or read along different layouts) is
    skipped with its reason: changing it would change that reader too.
    """
    found: dict[int, Weight] = {}
    for graph, node in iter_nodes(model.graph):
        if node.op not in ops or node.domain not in STANDARD_DOMAINS:
            continue
        label = node.name or node.op
        if is_excluded(node.name, node.op, exclude):
            skipped.append((label, "excluded by configuration"))
            continue
        use, weight, reason = use_of(node, graph, conv=conv)
        if reason:
            skipped.append((label, reason))
        if use is None or weight is None:
            continue
        found.setdefault(id(weight), Weight(weight, [])).uses.append(use)
    out = []
    for w in found.values():
        readers = _readers(w.tensor)
        known = {id(u.node) for u in w.uses}
        other = [n for n in readers if id(n) not in known]
        if other:
            skipped.append((w.tensor.name, f"also read by {other[0].op} {other[0].name!r}"))
        elif len({u.layout for u in w.uses}) > 1:
            skipped.append((w.tensor.name, "consumers read the weight along different axes"))
        else:
            out.append(w)
    return out


def _readers(t: gs.Tensor) -> list[gs.Node]:
    """Nodes reading ``t`` (for a Constant-node output, the readers of that output)."""
    return list(t.outputs)


def set_value(t: gs.Tensor, value: np.ndarray) -> None:
    """Replace the value of a constant (an initializer or a ``Constant`` node's ``value``) in place."""
    if isinstance(t, gs.Constant):
        t.values = value
        return
    t.inputs[0].attrs["value"] = gs.Constant(t.inputs[0].attrs["value"].name or t.name, value)


def token_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The padding mask of a token model's feed: the first 2-D integer/bool input named ``*mask*``, as bool."""
    for name, value in feed.items():
        a = np.asarray(value)
        if "mask" in name.lower() and a.ndim == 2 and (a.dtype == bool or np.issubdtype(a.dtype, np.integer)):
            m = a != 0
            return m if m.any() else None
    return None


def token_rows(a: np.ndarray, mask: np.ndarray | None, weighting: bool) -> np.ndarray:
    """Activation ``a [B, T, ..., K]`` with the padded tokens (``mask [B, T]`` False) dropped.

    ``weighting``: each sample's tokens are scaled by ``sqrt(T / tokens)`` so that every sample
    weighs the same in ``X^T X`` whatever its length (as in a mean-pooled output). Activations whose
    leading axes are not ``[B, T]`` are returned as they are.
    """
    if mask is None or a.ndim < 3 or a.shape[:2] != mask.shape:
        return a
    x = a[mask]
    if weighting:
        counts = mask.sum(axis=1, keepdims=True)
        root = np.sqrt(np.float32(mask.shape[1]) / np.maximum(counts, 1), dtype=np.float32)
        scale = np.broadcast_to(root, mask.shape)[mask]
        x = x * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return x


def collect_hessians(
    model: Model,
    keys: list[tuple[str, bool]],
    widths: dict[tuple[str, bool], int],
    feeds: list,
    rows: int = 8,
    *,
    mask_padding: bool = True,
    sample_weighting: bool = True,
) -> dict[tuple[str, bool], np.ndarray]:
    """``{(activation, channels_first): sum X^T X}`` over the calibration feeds (float64), one tap.

    Token models (a feed with a 2-D integer input named ``*mask*`` matching an activation's leading
    ``[batch, tokens]`` axes): ``mask_padding`` leaves padded tokens out, ``sample_weighting`` makes
    every sample weigh the same (see :func:`token_rows`).

    Raises:
        OnnxCompressError: when onnxruntime cannot run the model on a feed.
    """
    from ..calibrate import ActivationTap  # local: keeps the maths importable without onnxruntime

    names = list(dict.fromkeys(n for n, _ in keys))
    sums: dict[tuple[str, bool], np.ndarray] = {}
    split = rows if batch_axis(list(model.graph.inputs)) else 0
    with ActivationTap(model, names) as tap:
        for feed in feeds:
            for part in split_feed(feed, split):
                values = tap.run(part)
                mask = token_mask(part) if mask_padding else None
                for key in keys:
                    name, first = key
                    a = np.asarray(values[name])
                    if first and a.ndim >= 2:
                        a = np.moveaxis(a, 1, -1)
                    elif a.dtype == np.float32:
                        a = token_rows(a, mask, sample_weighting)
                    acc: dict[str, np.ndarray] = {}
                    if key in sums:
                        acc["k"] = sums[key]
                    accumulate_hessian(acc, "k", a, widths[key])
                    if "k" in acc:
                        sums[key] = acc["k"]
                del values
    return sums


def tappable_keys(model: Model, w: Weight) -> list[tuple[str, bool]] | str:
    """The Hessian keys of ``w``, or why its activations cannot be read."""
    from ..calibrate import tappable

    if w.layout not in ("kn", "nk", "conv"):
        return "batched weight: no per-layer Hessian"
    keys = w.keys()
    if not keys:
        return "an activation is unknown (transposed Gemm input or a spatial Conv)"
    if any(u.graph is not model.graph for u in w.uses):
        return "a consumer sits inside a subgraph (its input cannot be tapped)"
    available = tappable(model)
    if any(n not in available for n, _ in keys):
        return "an activation cannot be tapped"
    return keys


def gptq_codebook(
    w: np.ndarray, h: np.ndarray, codebook: np.ndarray, *, block: int = 128, damp: float = 0.01
) -> np.ndarray:
    """Indices of ``W [N, K]`` into sorted per-row codebooks ``[N or 1, C]``, with the GPTQ/OBS update.

    Column by column, each value goes to its nearest centroid and the not-yet-assigned columns absorb
    the error (``w_k -= e U_jk``, ``e = (w_j - c[i_j]) / U_jj``; ``U = cholesky(H^-1)^T``), so the layer's
    output error on the calibration inputs, not the weight error, is what the assignment minimises.
    """
    rows, k = w.shape
    hd = damped(h, damp)
    dead = np.diag(np.asarray(h, dtype=np.float64)) <= 0
    wf = np.array(w, dtype=np.float64, copy=True)
    wf[:, dead] = 0.0
    u = inverse_cholesky_upper(hd)
    cb = np.broadcast_to(np.asarray(codebook, dtype=np.float64), (rows, codebook.shape[1]))
    mid = (cb[:, 1:] + cb[:, :-1]) * 0.5
    shared = codebook.shape[0] == 1  # one codebook: a binary search per value
    ar = np.arange(rows)
    out = np.zeros((rows, k), dtype=np.int64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wf[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        err = np.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            idx = np.searchsorted(mid[0], col, side="left") if shared else (mid < col[:, None]).sum(axis=1)
            q = cb[ar, idx]
            e = (col - q) / u1[j, j]
            out[:, i1 + j] = idx
            w1[:, j:] -= np.outer(e, u1[j, j:])
            err[:, j] = e
        if i2 < k:
            wf[:, i2:] -= err @ u[i1:i2, i2:]
    return out


def hessian_groups(plans: list[tuple[Weight, list[tuple[str, bool]]]], budget: int, sequential: bool = False) -> list:
    """Consecutive ``(weight, keys)`` whose distinct Hessians (float64 ``K x K``) fit ``budget`` bytes.

    ``sequential``: a new group also starts whenever a weight's activation was not in the group yet
    and the group already holds a weight (so later weights see the rewritten earlier ones); weights
    that share an activation (Q/K/V) stay in one group.
    """
    groups: list[list[tuple[Weight, list[tuple[str, bool]]]]] = []
    group: list[tuple[Weight, list[tuple[str, bool]]]] = []
    seen: set[tuple[str, bool]] = set()
    used = 0
    for w, keys in plans:
        k = to_rows_shape(constant_meta(w.tensor)[0], w.layout)[1]  # type: ignore[index]
        new = [key for key in keys if key not in seen]
        extra = 8 * k * k * len(new)
        if group and (used + extra > budget or (sequential and new)):
            groups.append(group)
            group, seen, used = [], set(), 0
            extra = 8 * k * k * len(keys)
        group.append((w, keys))
        seen.update(keys)
        used += extra
    if group:
        groups.append(group)
    return groups
