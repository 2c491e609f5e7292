"""The int4 clipping search and round-to-nearest as first written, frozen: the reference that the
rewritten search in :mod:`onnxcompress.passes.quantize.gptq` must match bit for bit."""

from __future__ import annotations

import numpy as np

from onnxcompress.passes.quantize import gptq as g


def ref_candidates(wb, symmetric, ratios, step=None):  # type: ignore[no-untyped-def]
    def rounded(x):  # type: ignore[no-untyped-def]
        return g.round_scales(x) if step is None else g.snap_scales(x, step)

    out = []
    if symmetric:
        idx = np.abs(wb).argmax(axis=-1)
        extreme = np.take_along_axis(wb, idx[..., None], axis=-1)[..., 0]
        z = np.full(extreme.shape, 8, dtype=np.float32)
        for r in ratios:
            out.append((rounded(-extreme * np.float32(r / 8.0)), z))
        for r in ratios[:3]:
            out.append((rounded(extreme * np.float32(r / 7.0)), z))
        if step is not None:
            out.append((g.snap_scales(-extreme / np.float32(8.0), step, up=True), z))
            out.append((g.snap_scales(extreme / np.float32(7.0), step, up=True), z))
    else:
        lo = np.minimum(wb.min(axis=-1), 0.0)
        hi = np.maximum(wb.max(axis=-1), 0.0)
        spans = [rounded((hi - lo) * np.float32(r / g.QMAX_U4)) for r in ratios]
        if step is not None:
            spans.append(g.snap_scales((hi - lo) / np.float32(g.QMAX_U4), step, up=True))
        for r, s in zip((*ratios, 1.0), spans):
            z = np.clip(np.rint(-lo * np.float32(r) / s), 0, g.QMAX_U4).astype(np.float32)
            out.append((s, z))
    return out


def ref_block_params(wb, symmetric=True, clip_search=True, weights=None, step=None):  # type: ignore[no-untyped-def]
    cands = ref_candidates(wb, symmetric, g.CLIP_RATIOS if clip_search else (1.0,), step)
    best_s, best_z = cands[0]
    if len(cands) == 1:
        return best_s, best_z
    best_s, best_z = best_s.copy(), best_z.copy()
    best_err = None
    for s, z in cands:
        u = np.rint(wb / s[..., None])
        u += z[..., None]
        np.clip(u, 0, g.QMAX_U4, out=u)
        u -= z[..., None]
        u *= s[..., None]
        u -= wb
        np.square(u, out=u)
        if weights is not None:
            u *= weights
        err = u.sum(axis=-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s.astype(np.float32), best_z.astype(np.float32)


def ref_quantize_rtn(w, block, symmetric=True, clip_search=True, scale_bits=16, col_weight=None):  # type: ignore[no-untyped-def]
    n, k = w.shape
    step = g.row_scale_step(w) if scale_bits == 8 else None
    wp = g.pad_columns(np.asarray(w, dtype=np.float32), block)
    nb = wp.shape[1] // block
    cw = None
    if col_weight is not None:
        cw = np.zeros(nb * block, dtype=np.float32)
        cw[:k] = col_weight
        cw = cw.reshape(nb, block)
    codes = np.empty((n, nb * block), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    zeros = np.empty((n, nb), dtype=np.uint8)
    for r0 in range(0, n, 256):
        wb = wp[r0 : r0 + 256].reshape(-1, nb, block)
        st = None if step is None else step[r0 : r0 + 256, None]
        s, z = ref_block_params(wb, symmetric, clip_search, cw, step=st)
        u = np.rint(wb / s[..., None]) + z[..., None]
        codes[r0 : r0 + 256] = np.clip(u, 0, g.QMAX_U4).reshape(-1, nb * block)
        scales[r0 : r0 + 256] = s
        zeros[r0 : r0 + 256] = z
    return g.Quantized(codes, scales, zeros, k, block, scale_step=step)
