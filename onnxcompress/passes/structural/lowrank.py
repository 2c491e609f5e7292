"""Low-rank factorisation: ``W (m x n) ~ A (m x r) B (r x n)`` for MatMul/Gemm weights and 1x1 Conv.

Each float32 weight, seen as rows ``W [N, K]`` (``y = x W^T``; see :mod:`._lstsq`), is replaced by
two factors where that saves parameters, ``r (N + K) < N K``:

* plain (no calibration data): the truncated SVD ``W = U diag(s) V^T``, ``W' = U_r s_r V_r^T``
  (Eckart-Young: the best rank-``r`` approximation in Frobenius norm, error ``sum_{i>r} s_i^2``);
* data-aware (``method=auto`` with calibration data, or ``data``): the activation-weighted SVD that
  minimises the layer's output error on calibration inputs ``X``, ``||X (W - W')^T||_F``: with ``S``
  the symmetric square root of the damped ``H = X^T X``, ``W' = [W S]_r S^-1``
  (:func:`._lstsq.weighted_svd`), so directions the inputs never excite cost nothing.

Rank (per weight): ``rank`` (a fixed rank, capped at ``min(N, K)``), else ``energy`` (the smallest
``r`` keeping that fraction of ``sum s_i^2`` — the weighted spectrum for data-aware, i.e. of the
layer's output energy), else ``ratio`` (the factors keep at most that fraction of the weight's
parameters: ``r = floor(ratio * N K / (N + K))``). A weight is factorised only if
``r (N + K) < N K``; otherwise it is skipped with its rank in the reason.

Factors are balanced, ``A = U_r sqrt(s_r)``, ``B = sqrt(s_r) V_r^T (S^-1)``, and emitted as standard
ops at every opset: ``MatMul(x, W)`` -> ``MatMul(MatMul(x, B^T), A^T)``; ``Gemm(x, W, C)`` (no
``transA``) -> ``Gemm(MatMul(x, B^T), A^T, C)`` with ``alpha``/``beta`` kept; a 1x1 ungrouped
``Conv(x, W, b)`` -> ``Conv(Conv(x, B[:, :, None, None]), A[:, :, None, None], b)`` (strides, pads and
dilations on the first, which has no bias: padded positions stay zero, so the result is unchanged).
A weight shared by several consumers is factorised once; its consumers share ``A`` and ``B``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import GraphTree, Model, all_tensor_names, constant_meta, constant_value, fresh_name
from ..base import GraphSize, Params, PassContext, PassReport
from ..quantize._common import refuse_quantized
from . import _lstsq as L

METHODS = ("auto", "svd", "data")
TARGET_OPS = ("MatMul", "Gemm", "Conv")


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Options for :class:`LowRankPass` (see the module docstring).

    Attributes:
        energy: Fraction of the (weighted) spectrum's energy kept, in ``(0, 1]``; used when ``rank`` is 0.
        ratio: Fraction of parameters kept, in ``(0, 1)``; used instead of ``energy`` when set.
        rank: A fixed rank (0: choose by ``energy``/``ratio``).
        method: ``auto`` (data-aware with calibration data), ``svd`` or ``data`` (calibration required).
        damp: Hessian damping, a fraction of its mean diagonal.
        min_elements: Weights with fewer values are left as they are.
        calibration_rows: Samples per onnxruntime run when collecting Hessians.
        hessian_bytes: Memory for the Hessians gathered in one pass over the calibration data.
    """

    energy: float = 0.95
    ratio: float | None = None
    rank: int = 0
    method: str = "auto"
    damp: float = 0.01
    min_elements: int = 256
    calibration_rows: int = 8
    hessian_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError("energy must be in (0, 1]")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError("ratio must be in (0, 1)")
        if self.rank < 0:
            raise ValueError("rank must be >= 0")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")


def lowrank_config(params: Params) -> LowRankConfig:
    """Build the config from ``--param`` settings (every key read unconditionally).

    Keys: ``lowrank_energy`` (default 0.95), ``lowrank_ratio`` (parameter fraction; overrides the
    energy), ``lowrank_rank`` (a fixed rank > 0; overrides both), ``lowrank_method``
    (auto|svd|data), ``lowrank_damp``.
    """
    energy = params.get_float("lowrank_energy", 0.95)
    ratio_raw = params.get_str("lowrank_ratio", "")
    rank_raw = params.get_str("lowrank_rank", "")
    method = params.get_str("lowrank_method", "auto", METHODS)
    damp = params.get_float("lowrank_damp", 0.01)
    if not (0.0 < energy <= 1.0):
        raise OnnxCompressError(f"--param lowrank_energy={energy}: expected a fraction in (0, 1] (e.g. 0.95)")
    ratio = None
    if ratio_raw:
        try:
            ratio = float(ratio_raw)
        except ValueError:
            raise OnnxCompressError(f"--param lowrank_ratio={ratio_raw}: expected a number") from None
        if not (0.0 < ratio < 1.0):
            raise OnnxCompressError(f"--param lowrank_ratio={ratio_raw}: expected a fraction in (0, 1) (e.g. 0.5)")
    rank = 0
    if rank_raw:
        try:
            rank = int(rank_raw)
        except ValueError:
            raise OnnxCompressError(f"--param lowrank_rank={rank_raw}: expected an integer") from None
        if rank <= 0:
            raise OnnxCompressError(f"--param lowrank_rank={rank}: the rank must be > 0")
    if not 0.0 < damp <= 10.0:
        raise OnnxCompressError(f"--param lowrank_damp={damp}: expected a value in (0, 10] (default 0.01)")
    return LowRankConfig(energy=energy, ratio=ratio, rank=rank, method=method, damp=damp)


class LowRankPass:
    """SVD / activation-weighted SVD factorisation (see module docstring)."""

    name = "lowrank"

    def __init__(self, config: LowRankConfig | None = None) -> None:
        self.config = config or LowRankConfig()

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Factorise the MatMul/Gemm/1x1-Conv weights of every graph of ``model``."""
        refuse_quantized(model, self.name)
        cfg = self.config
        if cfg.method == "data" and not ctx.calibration:
            raise OnnxCompressError(
                "lowrank with lowrank_method=data needs calibration data: pass --calibration DATA or put "
                "<model>.calibration.npz beside the model"
            )
        data_aware = cfg.method == "data" or (cfg.method == "auto" and bool(ctx.calibration))
        report = PassReport(self.name)
        before = GraphSize.of(model)
        weights = L.collect_weights(model, TARGET_OPS, ctx.exclude, report.skipped)
        todo = []
        for w in weights:
            reason = self._skip_reason(w)
            if reason:
                report.skipped.append((w.tensor.name, reason))
            else:
                todo.append(w)
        stats: dict[str, Any] = {"method": "data" if data_aware else "svd", "data_fallback": []}
        hessians: dict[int, np.ndarray] = {}
        if data_aware and todo:
            start = time.perf_counter()
            hessians = self._hessians(model, todo, ctx, stats)
            stats["hessian_seconds"] = round(time.perf_counter() - start, 3)
        tree = GraphTree(model.graph) if todo else None
        names = all_tensor_names(model.graph) if todo else set()
        layers: list[dict[str, Any]] = []
        params_before = params_after = 0
        for w in todo:
            value = constant_value(w.tensor, cache=False)
            assert value is not None
            if not np.all(np.isfinite(value)):
                report.skipped.append((w.tensor.name, "weight has non-finite values"))
                continue
            rows = L.to_rows(value, w.layout)  # [N, K]
            n, k = rows.shape
            h = hessians.pop(id(w.tensor), None)
            try:
                u, s, vt, inv_root = L.weighted_svd(rows, h, cfg.damp)
            except np.linalg.LinAlgError:
                report.skipped.append((w.tensor.name, "SVD did not converge"))
                continue
            r = self._rank(s, n, k)
            if r * (n + k) >= n * k:
                report.skipped.append((w.tensor.name, f"rank {r}: r(m+n)={r * (n + k)} >= m*n={n * k} (no saving)"))
                continue
            root = np.sqrt(s[:r])
            a = (u[:, :r] * root).astype(np.float32)  # [N, r]
            b = root[:, None] * vt[:r]  # [r, K]
            if inv_root is not None:
                b = b @ inv_root
            b = b.astype(np.float32)
            kept = float(np.sum(s[:r] ** 2) / np.sum(s**2)) if np.sum(s**2) > 0 else 1.0
            assert tree is not None
            self._emit(w, a, b, tree, names, report)
            params_before += n * k
            params_after += r * (n + k)
            layers.append(
                {
                    "node": w.uses[0].node.name,
                    "op": w.uses[0].node.op,
                    "tensor": w.tensor.name,
                    "bytes_before": 4 * n * k,
                    "bytes_after": 4 * r * (n + k),
                    "rank": r,
                    "full_rank": min(n, k),
                    "energy_kept": round(kept, 6),
                    "scheme": f"lowrank-{'data' if h is not None else 'svd'}",
                }
            )
            del value, rows, u, s, vt
        if layers:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        report.modified = bool(layers)
        report.stats = before.stats(
            model,
            bool(layers),
            tensors_changed=len(layers),
            nodes_factorised=sum(len(w.uses) for w in todo if w.tensor.name in {la["tensor"] for la in layers}),
            params_before=params_before,
            params_after=params_after,
            layers=layers,
            nonstandard_ops=[],
            **stats,
        )
        return report

    def _skip_reason(self, w: L.Weight) -> str | None:
        meta = constant_meta(w.tensor)
        assert meta is not None
        shape, dtype = meta
        if dtype != np.float32:
            return f"dtype {dtype} (only float32 weights are factorised)"
        if w.layout == "batched":
            return "batched MatMul weight (rank > 2) left as is"
        if w.layout == "conv":
            node = w.uses[0].node
            if any(d != 1 for d in shape[2:]) or int(node.attrs.get("group", 1)) != 1:
                return "only 1x1 ungrouped Conv weights are factorised"
        for u in w.uses:
            if u.node.op == "Gemm" and u.node.attrs.get("transA", 0):
                return "Gemm with transA=1 left as is"
        size = int(np.prod(shape)) if shape else 1
        if size < self.config.min_elements:
            return f"too small ({size} elements < {self.config.min_elements})"
        return None

    def _rank(self, s: np.ndarray, n: int, k: int) -> int:
        cfg = self.config
        full = min(n, k)
        if cfg.rank > 0:
            return min(cfg.rank, full)
        if cfg.ratio is not None:
            return max(1, min(full, int(np.floor(cfg.ratio * n * k / (n + k)))))
        return L.rank_for_energy(s, cfg.energy)

    def _hessians(
        self, model: Model, todo: list[L.Weight], ctx: PassContext, stats: dict[str, Any]
    ) -> dict[int, np.ndarray]:
        """``{id(weight tensor): H}`` for the weights whose inputs can be tapped."""
        cfg = self.config
        fallback: list[dict[str, str]] = stats["data_fallback"]
        plans: list[tuple[L.Weight, list[tuple[str, bool]]]] = []
        for w in todo:
            keys = L.tappable_keys(model, w)
            if isinstance(keys, str):
                fallback.append({"tensor": w.tensor.name, "reason": keys})
            else:
                plans.append((w, keys))
        out: dict[int, np.ndarray] = {}
        batches = L.hessian_groups(plans, cfg.hessian_bytes)
        for group in batches:
            keys = list(dict.fromkeys(k for _, ks in group for k in ks))
            widths = {}
            for w, ks in group:
                kdim = L.to_rows_shape(constant_meta(w.tensor)[0], w.layout)[1]  # type: ignore[index]
                widths.update(dict.fromkeys(ks, kdim))
            try:
                sums = L.collect_hessians(model, keys, widths, ctx.calibration or [], cfg.calibration_rows)
            except OnnxCompressError as exc:
                if cfg.method == "data":
                    raise
                for w, _ in group:
                    fallback.append({"tensor": w.tensor.name, "reason": f"calibration failed: {exc}"})
                continue
            for w, ks in group:
                hs = [sums.get(k) for k in ks]
                kdim = widths[ks[0]]
                if any(h is None or h.shape != (kdim, kdim) for h in hs):
                    fallback.append({"tensor": w.tensor.name, "reason": "activation width does not match K"})
                    continue
                out[id(w.tensor)] = np.sum(hs, axis=0)
        return out

    @staticmethod
    def _emit(w: L.Weight, a: np.ndarray, b: np.ndarray, tree: GraphTree, names: set[str], report: PassReport) -> None:
        """Rewire every consumer of ``w`` onto the factors ``A [N, r]`` and ``B [r, K]``."""
        base = w.tensor.name
        if w.layout == "conv":
            first = gs.Constant(fresh_name(names, f"{base}_lowrank_in"), b[:, :, None, None].copy())
            second = gs.Constant(fresh_name(names, f"{base}_lowrank_out"), a[:, :, None, None].copy())
        else:
            first = gs.Constant(fresh_name(names, f"{base}_lowrank_in"), np.ascontiguousarray(b.T))  # [K, r]
            second_value = a if w.layout == "nk" else np.ascontiguousarray(a.T)  # Gemm transB: [N, r]
            second = gs.Constant(fresh_name(names, f"{base}_lowrank_out"), second_value)
        report.tensor_map[first.name] = base
        report.tensor_map[second.name] = base
        for use in w.uses:
            node = use.node
            graph = tree.node_graph.get(id(node), use.graph)
            label = node.name or base
            mid = gs.Variable(fresh_name(names, f"{label}_lowrank"), dtype=np.float32)
            if w.layout == "conv":
                attrs = dict(node.attrs)
                new = gs.Node("Conv", name=fresh_name(names, f"{label}_lowrank_Conv"), attrs=attrs,
                              inputs=[node.inputs[0], first], outputs=[mid])  # fmt: skip
                spatial = len(constant_meta(w.tensor)[0]) - 2  # type: ignore[index]
                node.attrs = {"kernel_shape": [1] * spatial} if "kernel_shape" in attrs else {}
            else:
                new = gs.Node("MatMul", name=fresh_name(names, f"{label}_lowrank_MatMul"),
                              inputs=[node.inputs[0], first], outputs=[mid])  # fmt: skip
            node.inputs[0] = mid
            node.inputs[1] = second
            index = next(i for i, n in enumerate(graph.nodes) if n is node)
            graph.nodes.insert(index, new)
