"""Block-wise int4 weights: MatMul/Gemm weights and Gather (embedding) tables, GPTQ or round-to-nearest.

Every float32 2-D weight ``W`` (initializer or ``Constant`` node, main graph or any subgraph) read by
a ``MatMul`` (as ``B [K, N]``), a ``Gemm`` (``B``, ``[N, K]`` when ``transB=1``) or a ``Gather`` on axis 0
(a table ``[V, D]``, blocks along ``D``) is quantized in blocks of ``block_size`` values along its
reduction axis to unsigned 4-bit codes with one scale (and zero point) per block; the maths
(round-to-nearest with a clipping search, and GPTQ) is in :mod:`.gptq`::

    W'[n, k] = (u[n, k] - z[n, k // b]) * s[n, k // b]      u in [0, 15]; z = 8 when symmetric

``method``: ``gptq`` fits the codes to calibration activations (``ctx.calibration``): the inputs of
every quantized MatMul/Gemm of the main graph are read with an :class:`ActivationTap`, one feed at a
time (a feed whose inputs share a dynamic leading batch axis is split into slices of
``calibration_rows`` samples), and ``H = sum X^T X`` is accumulated per activation tensor in float32
(Q, K and V projections share one); a weight read by several MatMuls gets the sum of their
Hessians. Hessians (packed triangles) are gathered for groups of weights whose Hessians fit ``hessian_bytes``, one pass
over the calibration data per group. Gather tables and weights whose activations cannot be tapped
(consumers inside If/Loop/Scan bodies) use round-to-nearest (``stats["gptq_fallback"]`` says why).
``rtn`` rounds to nearest; ``auto`` is ``gptq`` when calibration data is given, else ``rtn``.

Token models: when a feed has a 2-D integer input named ``*mask*`` (``attention_mask``) matching the
leading ``[batch, tokens]`` axes of an activation, padded tokens are left out of its Hessian
(``mask_padding``) and each sample's tokens are weighted by ``1 / (its token count)``
(``sample_weighting``), so that a 7-token sentence weighs as much as a 38-token one, as it does in a
mean-pooled output (MiniLM, MatMul weights only, worst of 53 held-out sentences: 0.954 -> 0.965).

Mixed precision inside the mode (``budget``, a fraction of the constant bytes before the pass; the
CLI default ``--param int4_budget=0.16``, ``Int4Config()`` default 0 = int4 only): with GPTQ, the
size after the pass is projected and the room left under the budget is spent on 8-bit blocks
(symmetric, ``int8_block`` values per float16 scale) for the 2-D main-graph MatMul/Gemm/Gather
initializers with the largest *measured* gain per extra byte: the candidates are made inputs of one
onnxruntime session, and each one's gain is the drop of the relative squared output error on the
calibration feeds when it alone is restored to float32 while the others hold their int4 values
(layer-local errors ``tr(dW H dW^T)`` do not predict this on MiniLM). ``stats["int8_tensors"]`` lists
the chosen ones with their gains; ``stats["layers"][i]["bits"]`` is 4 or 8.

Hot rows (``hot_rows``, default 0.005; with the budget, calibration data and opset >= 11): a Gather
table's error reaches the output once per gathered index, so the rows that most tokens read matter
most. The share of each row among the indices read on the calibration feeds is counted (each sample
weighs 1, spread over its unpadded tokens, as in a mean-pooled output: :func:`token_shares`; indices
that are not graph inputs are tapped), and the rows holding at least ``hot_rows`` of it (at most
``HOT_MAX_ROWS`` per table) keep their int4 codes plus an 8-bit correction of their error (int8 codes,
a float16 scale per row, :func:`hot_residual`), added after the gather::

    out = Gather(table4, ids) + Cast(Equal(Reshape(ids, [..., 1]), hot_ids), float) @ (codes * scale)

(negative ids wrapped; the ``[R, D]`` correction is computed from constants, folded at session load;
both targets). The bytes (``R (D + 10)`` plus the nodes) come out of the budget's room first; a table
cheaper to store whole in 8 bits, or one chosen for 8 bits, gets none. When the hot rows hold at least
``HOT_COVERAGE`` (0.25) of a table's tokens (natural language: MiniLM's 21 hot rows, ``[CLS]``,
``[SEP]``, ``.``, ``the``, .., hold 47%), the rest of that table is stored in blocks of
``HOT_TABLE_BLOCK`` (128) with ``--param embedding_block=0`` (auto; the default keeps ``block_size``, as
issue 4 asks for block 32), and the bytes saved buy 8-bit weights.
``stats["hot_rows"]``, ``stats["hot_rows_bytes"]``, ``stats["layers"][i]["hot_rows"]``. Measured on
MiniLM (session 6, the real pass; held-out worst / mean cosine; "subsets": refitted on 4 random
56-of-64 calibration subsets (seeds 0..3), mean and min of the held-out worst; "left-out": the worst
of the 8 calibration sentences each subset left out, mean over the 4, the figure used to choose):

* ``hot_rows=0`` (the session-5 default): 0.9829 / 0.9946 at 0.1597; subsets 0.9800, min 0.9762;
  left-out 0.9893 / 0.9945.
* ``hot_rows=0.005`` (default; word table b128 + 21 hot rows, position table b128 + 38 hot rows, 17
  tensors 8-bit): 0.9859 / 0.9955 at 0.1599; subsets 0.9833, min 0.9797 (each of the 4 draws +0.0022
  .. +0.0047); left-out 0.9906 / 0.9953. Seeds 0..7: held-out worst 0.9829 against 0.9791, every one
  of the 8 draws better (+0.0022 .. +0.0050). ``--target onnxruntime`` (float32 scales, less room):
  0.9809 against 0.9645 at 0.159. Cost: one more onnxruntime pass over the calibration data when
  the indices must be tapped (MiniLM's position ids: 0.5-1.6 s).
* simulated (same Hessians): hot rows with the table kept at block 32: subsets 0.9820, min 0.9787
  (left-out 0.9900 / 0.9948); thresholds 0.002 / 0.001 (75 / 250 rows): left-out 0.9904 / 0.9901,
  held-out no better; whole-table block 128 without hot rows: subsets 0.9791 (worse than block 32).
* Also measured and not kept (simulated): an exchange step at the budget edge (re-measure each
  candidate's gain given the greedy set, then the best swap): held-out worst +0.0010, +0.0004,
  +0.0010, +0.0002, -0.0014 on the 5 calibration sets, i.e. noise, for 38 more sensitivity runs; 8 bits
  for the output rows of a tensor with the largest GPTQ error: the gain is about proportional to the
  rows' share (top 25% rows: 21-39% of the tensor's gain), no better per byte than whole tensors;
  LayerNorm-gain-weighted clipping for the table (``col_weight = gamma ** 2``): +-0.0005, noise.

Scale storage (``scale_bits``, standard forms only): float16 scales cost 0.5 bits per weight at block
32, 11% of an int4 file. ``scale_bits=8`` stores each block's scale as an int8 code times a float16
step per row (:mod:`.gptq`; GPTQ and the clipping search pick among the representable scales,
including the smallest one that clips nothing), for weights with more than 2 blocks per row. The CLI
default ``0`` (auto) uses it when GPTQ runs with a budget, so the bytes saved buy more 8-bit blocks;
``Int4Config()`` defaults to 16. ``stats["scale_bits"]`` and ``stats["layers"][i]["scale_bits"]``
say what was written. Measured on MiniLM (53 held-out sentences, worst / mean cosine, size ratio;
session 4, ``onnxcompress compress ... -q int4`` with the sidecar calibration set):

* GPTQ, ``int4_budget=0.16``: ``scale_bits=16`` 0.9811 / 0.9940 at 0.1599 (12 tensors 8-bit);
  auto (8) 0.9829 / 0.9946 at 0.1597 (16 tensors 8-bit: 0.60 MB more room); without the
  no-clipping candidate the int8 codes cost that gain back (0.9809 / 0.9942).
* round-to-nearest (no calibration): 16: 0.9092 / 0.9653 at 0.1427; ``scale_bits=8``: 0.9075 / 0.9655
  at 0.1362 (onnxruntime's 4-bit anchor: 0.9064 at 0.1621), hence not the default there.

Activation-aware channel scaling (``awq``, :mod:`.awq`; AWQ, Lin et al. 2024): for the MatMul/Gemm
weights whose Hessians are gathered, each input channel ``k`` gets a factor ``c_k = rms(x_k) ** alpha``
(from ``diag H``, normalised around 1), ``alpha`` searched per weight on ``0, 0.1, .., 1`` (coarse to
fine, 8 points) for the least ``tr(dW H dW^T)`` of round-to-nearest on ``W c``; then GPTQ (or RTN)
quantizes ``W c`` with ``H' = C^-1 H C^-1``, and ``1 / c`` is stored (float16, ``K`` values per
weight): the ``load`` form multiplies the dequantized weight by it (one more ``Mul`` on constants,
folded at session load: no run-time cost), ``MatMulNBits`` gets a ``Mul`` on its activation input.
``stats["awq_scaled"]``, ``stats["awq_seconds"]``, ``stats["layers"][i]["awq_alpha"]``; the scheme
reads ``int4-awq-gptq``/``int4-awq-rtn``. ``--param awq=true|false|auto`` or an exponent grid
(``awq=0.5``, ``awq=0,0.1,0.2``); CLI default ``false``. Measured on MiniLM (session 5; held-out worst /
mean cosine; "subsets": the pass refitted on 4 random 56-of-64 calibration subsets (seeds 0..3), mean
and min of the worst):

* GPTQ, ``int4_budget=0.16`` (the default): off 0.9829 / 0.9946 (subsets 0.9798, min 0.9755);
  on 0.9811 / 0.9947 at 0.1594 (subsets 0.9784, min 0.9770; one 8-bit tensor fewer for the stored
  ``1 / c``); grid ``0,0.1,0.2`` 0.9787 on seed 0 (off: 0.9819).
* GPTQ, int4 only (``int4_budget=0``): off 0.9619 / 0.9853 (subsets 0.9583, min 0.9562); on 0.9534 /
  0.9865 (subsets 0.9562, min 0.9542): the mean cosine gains 0.0012..0.0016 on every draw, the worst
  (short) sentence loses: the channel statistics are those of the calibration tokens.
* ``method=rtn`` (full calibration set): int4 only 0.9092 / 0.9653 -> 0.9359 / 0.9789 at 0.1433;
  with the budget (16 tensors 8-bit) 0.9650 / 0.9927 at 0.1599: a large gain where nothing else
  compensates the errors, hence ``auto`` = on for ``method=rtn`` given calibration data.

Hence off by default; wall time: +8..30 s on MiniLM on this 2-core machine (the search runs RTN 8 times
per weight). Also measured and not kept (GPTQ, budget 0.16, subsets mean / min of the worst against
0.9798 / 0.9755): ``act_order=true`` 0.9796 / 0.9766; ``embedding_block=128`` (0.27 MB more 8-bit room)
0.9790 / 0.9753, ``64`` 0.9779 / 0.9729; the 8-bit choice on per-sentence relative errors squared
(emphasising the worst calibration sentence) 0.9801 / 0.9754; keeping the 8 or 32 most salient input
columns of each weight in float16 with GPTQ compensating into them (OWQ-like; int4 only, full
calibration set) 0.9641 / 0.9655 against 0.9630, for 0.33 / 1.33 MB: far less per byte than 8-bit
tensors.

The worst held-out sentences ("yes, of course." and the other 7-token reply) lose 2.4x more than any
calibration sentence (calibration worst 0.992 with the default); refitting GPTQ on 56-of-64
calibration subsets moves the held-out worst by up to 0.015 (0.950..0.965, int4 only), so
differences below ~0.005 between variants are not significant. Measured and not kept (worst /
mean, int4 MatMuls only, against 0.965 / 0.9886): asymmetric blocks 0.964 / 0.9892 (and 1 byte of
zero point per block), sequential GPTQ on quantized inputs 0.965, with drift correction (target the
float outputs) 0.63..0.95 (overfits ~1000 calibration tokens), least-squares scale refit after GPTQ
0.966 / 0.9890 (slow), sample weights ``1/len^2`` 0.968 / 0.9884, short crops of calibration
sentences 0.961..0.972, block 16 everywhere 0.973 / 0.9915 (+0.66 MB); with the table int4 too
(0.961 / 0.9875): damping 0.3 / 1.0 for the FFN-down layers (K=1536) 0.959 / 0.961, RTN there 0.943.

Hessian shrinkage (``shrink``, :func:`~.gptq.prepare_hessian`): ``H' = (1 - a) H + a diag(H)`` before the
damping. 64 calibration sentences are ~1000 tokens, fewer than ``K = 1536`` (FFN-down): ``H`` is rank-deficient
and GPTQ fits the calibration tokens (calibration worst 0.995 vs held-out 0.984); shrinking the off-diagonal
terms toward 0 regularises that fit. Measured on MiniLM (session 7, the default otherwise; 8 random 56-of-64
calibration subsets (seeds 0..7): "left-out" = worst / mean of the 8 calibration sentences each left out, mean
over the 8, the criterion to choose on; "subsets" = held-out worst, mean and min over the 8, and held-out mean;
"full" = held-out worst / mean fitted on all 64):

* ``shrink=0`` (default): left-out 0.9920 / 0.99509; subsets 0.9812, min 0.9786, mean 0.99470; full 0.9844 /
  0.99497.
* ``shrink=0.3`` (the real pass, 8-bit set re-chosen): left-out 0.9918 / 0.99546 (worst better on 3 of 8
  draws); subsets 0.9818, min 0.9774 (6 of 8 better), mean 0.99514 (every draw better); full 0.9811 / 0.99535.
* ``shrink=0.1`` (real pass): left-out 0.9926 / 0.99539 (worst better on 4 of 8 draws); subsets 0.9829,
  min 0.9805 (6 of 8 better), mean 0.99503 (every draw better); full 0.9820 / 0.99504.
* simulated (GPTQ refitted, the 8-bit set and tables of the default run kept): ``a`` = 0.05, 0.1, 0.2, 0.3,
  0.5: left-out worst 0.9908 .. 0.9924 against 0.9920 (0.9901 .. 0.9911 against 0.9901 on seeds 0..3),
  subsets 0.9820 .. 0.9831 against 0.9812, full 0.9821 .. 0.9838 against 0.9844; only for ``K = 1536``
  (0.3): 0.9926 / subsets 0.9823, min 0.9787 / full 0.9841; ``a`` estimated per activation (Ledoit-Wolf
  toward the diagonal, from per-token fourth moments: ``a`` = 0.02..0.12; from per-sentence ones: 0.02..0.19):
  subsets 0.9806 (seeds 0..3) and 0.9819, left-out 0.9922; sequential GPTQ (inputs from the quantized
  model) with ``a`` = 0, 0.2, 0.3 for ``K = 1536`` (seeds 0..3): subsets 0.9814, 0.9832, 0.9813 against
  0.9821 / 0.9825 / 0.9825 without; damping per ``K`` (384 / 1536) 0.1 / 0.3: left-out 0.9924, subsets
  0.9825, min 0.9768; 0.2 everywhere 0.9922 / 0.9814; 0.05 / 0.1 and 0.03 / 0.1: worse (0.9919 / 0.9802,
  0.9913 / 0.9789).
* the 8-bit choice with the measured gains shrunk toward the mean of their role over the 6 layers
  (``(1 - b) g + b mean``, then the pass's greedy; simulated, ``b = 0`` reproduces the real pass's choice and
  cosines exactly): ``b`` = 0.3 / 0.6 / 1: left-out 0.9920 / 0.9920 / 0.9908 against 0.9920, subsets 0.9813 /
  0.9816 / 0.9817 against 0.9812, mean 0.99474 / 0.99474 / 0.99351 against 0.99470.

So shrinkage raises the mean cosine on every draw (+0.0003..0.0004) and the subsets' worst a little, but the
left-out criterion moves by noise (+0.0006 / -0.0002, half the draws) and the full set's worst drops (the 8-bit
choice it changes swaps 1..4 tensors per run): not the default.

Output forms:

* target ``standard`` (standard ONNX only, every opset >= 7; the opset import is never changed): the
  ``load`` form. Each block of ``b`` codes is packed into ``b / 2`` bytes (byte ``j`` holds code ``j``
  in its low nibble and code ``j + b/2`` in its high nibble), scales are stored as float16 and
  unpacked with ``f = Cast(p)``, ``hi = Floor(f / 16)``, ``lo = f - 16 hi``, ``Concat(lo, hi)``,
  ``(u - z) * Cast(s)``, ``Reshape`` (and ``Slice`` when ``K`` was padded): all on constants, so
  onnxruntime folds it once at session load: the file holds 4.5 bits per weight, inference runs in
  float32 at the original speed. Embedding tables are unpacked *after* gathering:
  ``Gather`` of the packed rows and of the scales, then the same unpacking on the gathered rows only
  (opset >= 11), so the float table is never materialised. The other standard option,
  ``DequantizeLinear`` with ``block_size`` on int4 data, needs opset 21 and is not emitted: most
  models are older, onnxruntime runs a DequantizeLinear before a Gather at every call, and raising
  the opset import is not safe in general.
* target ``onnxruntime``: ``com.microsoft`` ``MatMulNBits`` (bits=4 (8 for 8-bit weights, codes unpacked), ``B`` packed ``[N, n_blocks, b/2]``,
  consecutive codes in low then high nibble, float32 scales, packed zero points only when asymmetric)
  for MatMul weights (int4 in memory at run time), and ``GatherBlockQuantized`` for tables whose
  width is a multiple of the block (note: it returns zeros for out-of-range ids where Gather fails).
  Gemm weights and other consumers use the ``load`` form. ``stats["nonstandard_ops"]`` lists the ops.

``K`` not a multiple of the block is zero-padded (padded codes dequantize to exactly 0; the ``load``
form slices them off, which needs opset >= 10). Batched MatMul weights ``[..., K, N]`` are quantized
slice by slice (round-to-nearest, ``load`` form). Non-float32, non-finite, rank-1 and
small (< ``min_elements``) weights stay float, each skip recorded with its reason.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...errors import OnnxCompressError
from ...graph import GraphTree, Model, all_tensor_names, constant_meta, constant_value, fresh_name, iter_nodes
from ...io import stage
from ...validate import drop_mapped_pages, make_session, release_memory
from ..base import GraphSize, Params, PassContext, PassReport, is_excluded
from ..calibrate import (
    ActivationTap,
    has_batch_axis,
    require_calibration,
    split_feed,
    tappable,
    trim_heap,
)
from ._common import refuse_quantized
from .awq import ALPHAS, Scaling, scaled_hessian
from .awq import search as awq_search
from .gptq import (
    SCALE_BITS,
    PackedHessian,
    PreparedHessian,
    Quantized,
    gptq,
    prepare_hessian,
    quantize_int8,
    quantize_rtn,
    round_scales,
    stored_bytes,
)

METHODS = ("auto", "gptq", "rtn")
BLOCK_SIZES = (16, 32, 64, 128, 256)
STANDARD_DOMAINS = ("", "ai.onnx", None)
DEFAULT_BUDGET = 0.16  # --param int4_budget default (the CLI's); Int4Config() itself defaults to 0 (int4 only)
NODE_BYTES = 1024  # file bytes per quantized weight besides its data (unpacking nodes, names), for the budget
BUDGET_MARGIN = 0.002  # fraction of the budget kept free (graph structure outside the constants)
SENSITIVITY_ROWS = 16  # samples per sensitivity run (token models: sorted by length, padding trimmed)
DEFAULT_DAMP = 0.1  # measured on MiniLM: 0.1 beats 0.01 (0.954 vs 0.950 worst cosine, int4 only)
DEFAULT_SHRINK = 0.0  # --param shrink default: no shrinkage of H toward its diagonal (measured: noise, see above)
SCALE_CHOICES = (0, *SCALE_BITS)  # 0: auto (8 when the budget spends the bytes saved on 8-bit blocks, else 16)
DEFAULT_SCALE_BITS = 0  # --param scale_bits default (auto); Int4Config() itself keeps float16 scales (16)
AWQ_MODES = ("auto", "true", "false")
HESSIAN_BYTES = 20 << 20  # packed Hessians per pass over the calibration data (MiniLM: 2 passes of 3 layers)
DEFAULT_AWQ = "false"  # --param awq default (measured: no gain with GPTQ on MiniLM's worst sentence, see above)
DEFAULT_HOT_ROWS = 0.005  # --param hot_rows default: table rows holding >= 0.5% of the calibration tokens' share
HOT_MAX_ROWS = 256  # at most this many hot rows per table
HOT_TABLE_BLOCK = 128  # int4 block of Gather tables whose hot rows are corrected and cover HOT_COVERAGE
HOT_COVERAGE = 0.25  # share of the calibration tokens the hot rows must hold for HOT_TABLE_BLOCK


@dataclasses.dataclass(frozen=True)
class Int4Config:
    """Options for :class:`Int4Pass` (see the module docstring).

    Attributes:
        block_size: Values per scale along the reduction axis (a power of two, 16..256).
        symmetric: Zero point fixed at 8 (True) or one zero point per block (False).
        method: ``auto``, ``gptq`` or ``rtn``.
        damp: GPTQ damping, as a fraction of the mean of ``diag(H)``.
        shrink: GPTQ Hessian shrinkage toward its diagonal, ``H' = (1 - shrink) H + shrink diag(H)`` (before
            ``damp``); 0 = none.
        act_order: GPTQ processes columns by decreasing ``H_kk``.
        clip_search: Choose each block's range by a squared-error search instead of min/max.
        embeddings: Quantize Gather tables too.
        embedding_block: Block size of tables read only by Gather (0: auto, ``HOT_TABLE_BLOCK`` when the run
            corrects hot rows (``budget``, ``hot_rows`` and calibration data given) and the rows are that wide,
            else ``block_size``).
        min_elements: Weights with fewer values stay float.
        calibration_rows: Samples per onnxruntime run when collecting Hessians (batched feeds are split).
        hessian_bytes: Memory for the Hessians gathered in one pass over the calibration data.
        mask_padding: Leave padded tokens out of the Hessians (a 2-D integer feed input named ``*mask*``).
        sample_weighting: With such a mask, weight each sample's tokens by ``1 / (its token count)`` in
            the Hessians, so that short sentences count as much as long ones (as in a pooled output).
        budget: Mixed precision inside the mode: total constant bytes allowed, as a fraction of the
            bytes before the pass (0 = off). With GPTQ, the weights whose measured sensitivity per extra
            byte is highest get 8-bit blocks while the projected size stays within the budget.
        int8_block: Block size of those 8-bit weights (the int4 block when ``K`` is smaller).
        max_candidates: At most this many weights are measured for 8 bits (in graph order).
        scale_bits: Int4 block scales as float16 (16) or as int8 codes times a float16 step per row (8),
            in the standard forms (target ``onnxruntime``: the contrib ops take float32 scales: always 16).
            0 (auto): 8 when GPTQ runs with a ``budget`` (the bytes saved buy 8-bit blocks), else 16.
        awq: Activation-aware channel scaling (:mod:`.awq`) of the MatMul/Gemm weights whose Hessians can be
            gathered: ``true`` (with either method; needs calibration data), ``false``, or ``auto``: on where
            it measured better, i.e. ``method=rtn`` given calibration data (Hessians gathered for it), off
            with GPTQ.
        awq_alphas: The grid of exponents searched per weight (0 = no scaling is always worth trying).
        hot_rows: With a ``budget``: the rows of a Gather table whose share of the calibration tokens (each
            sample's tokens weighing ``1 / its token count``) is at least this get an 8-bit correction of their
            int4 error (at most ``HOT_MAX_ROWS`` per table; 0 = off).
    """

    block_size: int = 32
    symmetric: bool = True
    method: str = "auto"
    damp: float = DEFAULT_DAMP
    shrink: float = DEFAULT_SHRINK
    act_order: bool = False
    clip_search: bool = True
    embeddings: bool = True
    embedding_block: int = 0
    min_elements: int = 256
    calibration_rows: int = 8
    hessian_bytes: int = HESSIAN_BYTES
    mask_padding: bool = True
    sample_weighting: bool = True
    budget: float = 0.0
    int8_block: int = 128
    max_candidates: int = 96
    scale_bits: int = 16
    awq: str = "false"
    awq_alphas: tuple[float, ...] = ALPHAS
    hot_rows: float = DEFAULT_HOT_ROWS

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if not 0.0 <= self.damp <= 10.0:
            raise ValueError("damp must be in [0, 10]")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError("shrink must be in [0, 1]")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError("budget must be in [0, 1]")
        if self.embedding_block and self.embedding_block not in BLOCK_SIZES:
            raise ValueError(f"embedding_block must be 0 or one of {BLOCK_SIZES}")
        if self.int8_block not in BLOCK_SIZES:
            raise ValueError(f"int8_block must be one of {BLOCK_SIZES}")
        if self.scale_bits not in SCALE_CHOICES:
            raise ValueError(f"scale_bits must be one of {SCALE_CHOICES}")
        if self.awq not in AWQ_MODES:
            raise ValueError(f"awq must be one of {AWQ_MODES}")
        if not self.awq_alphas or not all(0.0 <= a <= 1.0 for a in self.awq_alphas):
            raise ValueError("awq_alphas must be a non-empty list of exponents in [0, 1]")
        if not 0.0 <= self.hot_rows <= 1.0:
            raise ValueError("hot_rows must be a share in [0, 1]")


def int4_config(params: Params) -> Int4Config:
    """Build the config from ``--param`` settings (every key read unconditionally)."""
    block = params.get_int("block_size", 32, BLOCK_SIZES)
    symmetric = params.get_bool("symmetric", True)
    method = params.get_str("method", "auto", METHODS)
    damp = params.get_float("damp", DEFAULT_DAMP)
    shrink = params.get_float("shrink", DEFAULT_SHRINK)
    act_order = params.get_bool("act_order", False)
    clip_search = params.get_bool("clip_search", True)
    embeddings = params.get_bool("embeddings", True)
    mask_padding = params.get_bool("mask_padding", True)
    embedding_block = params.get_int("embedding_block", block, (0, *BLOCK_SIZES))  # default: block_size; 0: auto
    sample_weighting = params.get_bool("sample_weighting", True)
    budget = params.get_float("int4_budget", DEFAULT_BUDGET)
    int8_block = params.get_int("int8_block", 128, BLOCK_SIZES)
    scale_bits = params.get_int("scale_bits", DEFAULT_SCALE_BITS, SCALE_CHOICES)
    awq, alphas = _awq_param(params.get_str("awq", DEFAULT_AWQ))
    hot_rows = params.get_float("hot_rows", DEFAULT_HOT_ROWS)
    if not 0.0 <= damp <= 10.0:
        raise OnnxCompressError(f"--param damp={damp}: expected a fraction in [0, 10] (default {DEFAULT_DAMP})")
    if not 0.0 <= shrink <= 1.0:
        raise OnnxCompressError(
            f"--param shrink={shrink}: expected a fraction in [0, 1] (default {DEFAULT_SHRINK}; 0 = no shrinkage)"
        )
    if not 0.0 <= budget <= 1.0:
        raise OnnxCompressError(
            f"--param int4_budget={budget}: expected a size fraction in [0, 1] (default {DEFAULT_BUDGET}; 0 = int4 only)"
        )
    if not 0.0 <= hot_rows <= 1.0:
        raise OnnxCompressError(
            f"--param hot_rows={hot_rows}: expected a token share in [0, 1] (default {DEFAULT_HOT_ROWS}; 0 = off)"
        )
    return Int4Config(
        block_size=block,
        symmetric=symmetric,
        method=method,
        damp=damp,
        shrink=shrink,
        act_order=act_order,
        clip_search=clip_search,
        embeddings=embeddings,
        mask_padding=mask_padding,
        embedding_block=embedding_block,
        sample_weighting=sample_weighting,
        budget=budget,
        int8_block=int8_block,
        scale_bits=scale_bits,
        awq=awq,
        awq_alphas=alphas,
        hot_rows=hot_rows,
    )


def _awq_param(raw: str) -> tuple[str, tuple[float, ...]]:
    """``--param awq``: auto/true/false (on/off, yes/no), or the exponent grid itself (``0.5`` or ``0,0.25,0.5``)."""
    low = raw.strip().lower()
    words = {
        "auto": "auto",
        "true": "true",
        "on": "true",
        "yes": "true",
        "false": "false",
        "off": "false",
        "no": "false",
    }
    if low in words:
        return words[low], ALPHAS
    try:
        alphas = tuple(float(a) for a in low.replace(";", ",").split(",") if a.strip())
    except ValueError:
        alphas = ()
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise OnnxCompressError(
            f"--param awq={raw}: expected auto, true, false or exponents in [0, 1] (e.g. 0.5 or 0,0.25,0.5)"
        )
    return "true", alphas


@dataclasses.dataclass
class _Use:
    """One consumer of a weight: the node, its graph, the weight's reduction axis, the activation input."""

    node: gs.Node
    graph: gs.Graph
    red_axis: int  # 0: W is [K, N]; 1: W is [N, K] (Gemm transB, Gather tables)
    activation: gs.Tensor | None  # MatMul/Gemm input multiplied by W (None for Gather)
    trans_a: bool = False


@dataclasses.dataclass
class _Weight:
    tensor: gs.Tensor
    uses: list[_Use]


class Int4Pass:
    """Block-wise int4 weight quantization (see module docstring)."""

    name = "int4"

    def __init__(self, config: Int4Config | None = None) -> None:
        self.config = config or Int4Config()
        self._scale_bits = self.config.scale_bits or 16  # the run's (16 for target onnxruntime)
        self._gptq = True  # the run's fit: GPTQ (else round-to-nearest on the calibrated, AWQ-scaled weights)
        self._awq = False  # the run's channel scaling
        self._alphas: dict[str, float] = {}  # tensor name -> AWQ exponent chosen (nonzero only)
        self._hot: dict[int, np.ndarray] = {}  # id(table) -> its hot rows (8-bit corrected, see hot_rows)
        self._hot_tables = False  # the run corrects hot rows (budget, hot_rows, calibration data)
        self._coarse: set[int] = set()  # id(table): HOT_TABLE_BLOCK (embedding_block=0, hot rows cover enough)

    def run(self, model: Model, ctx: PassContext) -> PassReport:
        """Quantize the MatMul/Gemm weights and Gather tables of every graph of ``model``."""
        refuse_quantized(model, self.name)
        cfg = self.config
        self._alphas = {}
        self._hot = {}
        self._coarse = set()
        method = cfg.method
        if method == "gptq":
            require_calibration(ctx.calibration, "int4 with method=gptq")
        elif method == "auto":
            method = "gptq" if ctx.calibration else "rtn"
        self._awq = cfg.awq == "true" or (cfg.awq == "auto" and method == "rtn" and bool(ctx.calibration))
        if cfg.awq == "true":
            require_calibration(ctx.calibration, "int4 with awq=true")
        calibrated = method == "gptq" or self._awq  # Hessians are gathered
        self._hot_tables = calibrated and cfg.budget > 0 and cfg.hot_rows > 0 and model.opset >= 11
        report = PassReport(self.name)
        before = GraphSize.of(model)
        tree = GraphTree(model.graph)
        weights = self._collect(model, tree, report, ctx.exclude)
        todo: list[_Weight] = []
        for w in weights:
            reason = self._skip_reason(w, model.opset)
            if reason:
                report.skipped.append((w.tensor.name, reason))
            else:
                todo.append(w)
        # int8 scale codes only where the standard forms are written (the contrib ops take float32 scales)
        self._scale_bits = cfg.scale_bits or (8 if calibrated and cfg.budget > 0 else 16)
        if ctx.target != "standard":
            self._scale_bits = 16
        self._gptq = method == "gptq"
        stats: dict[str, Any] = {"method": method, "gptq_fallback": [], "scale_bits": self._scale_bits}
        stats["awq"] = self._awq
        fitted: dict[int, Quantized] = {}
        if calibrated and todo:
            start = time.perf_counter()
            fitted = self._fit_gptq(model, tree, todo, ctx, stats, strict=cfg.method == "gptq" or cfg.awq == "true")
            stats["gptq_seconds"] = round(time.perf_counter() - start, 3)
        wide: dict[int, int] = {}
        if calibrated and cfg.budget > 0 and fitted:
            start = time.perf_counter()
            wide = self._choose_int8(model, todo, fitted, ctx, stats, before.bytes)
            stats["sensitivity_seconds"] = round(time.perf_counter() - start, 3)
            release_memory()  # the session's and the dequantized copies' pages (MiniLM: -45 MB)
        names = all_tensor_names(model.graph) if todo else set()
        layers: list[dict[str, Any]] = []
        forms: dict[str, int] = {}
        nonstandard: set[str] = set()
        for w in todo:
            value = constant_value(w.tensor, cache=False)  # one weight at a time
            assert value is not None
            if not np.all(np.isfinite(value)):
                report.skipped.append((w.tensor.name, "weight has non-finite values"))
                continue
            red = w.uses[0].red_axis
            wk = _as_rows(value, red)  # [N, K]
            q = fitted.pop(id(w.tensor), None)
            block = self._block_of(w)
            fit = "rtn" if q is None or not self._gptq else "gptq"
            fit = f"awq-{fit}" if q is not None and q.col_scale is not None else fit
            scheme = f"int4-{fit}-b{block}-{'sym' if cfg.symmetric else 'asym'}"
            if id(w.tensor) in wide:
                q = quantize_int8(wk, wide[id(w.tensor)])
                scheme = f"int8-b{q.block}-sym"
            elif q is None:
                q = quantize_rtn(wk, block, cfg.symmetric, cfg.clip_search, self._scale_bits_of(w))
            hot = None
            rows = self._hot.get(id(w.tensor))
            if rows is not None and q.bits == 4:
                hot = (rows, *hot_residual(wk[rows], dequantize_rows(q, rows)))
                stats.setdefault("hot_rows", []).append({"tensor": w.tensor.name, "rows": int(rows.size)})
            del value, wk
            emitter = _Emitter(w, q, tree, names, model.opset, ctx.target, cfg.symmetric or q.bits == 8, hot)
            emitted = emitter.emit()
            for form, new_name, _ in emitted:
                forms[form] = forms.get(form, 0) + 1
                report.tensor_map[new_name] = w.tensor.name
                if form in ("MatMulNBits", "GatherBlockQuantized"):
                    nonstandard.add(form)
            shape = constant_meta(w.tensor)[0]  # type: ignore[index]
            layers.append(
                {
                    "node": w.uses[0].node.name,
                    "op": w.uses[0].node.op,
                    "tensor": w.tensor.name,
                    "bytes_before": int(np.prod(shape)) * 4,
                    "bytes_after": emitter.stored_bytes(),
                    "scheme": scheme,
                    "bits": q.bits,
                    "scale_bits": 8 if q.scale_step is not None else 16,
                    "awq_alpha": self._alphas.get(w.tensor.name, 0.0),
                    "hot_rows": 0 if hot is None else int(hot[0].size),
                    "forms": sorted({f for f, _, _ in emitted}),
                }
            )
        if layers:
            model.graph.cleanup(remove_unused_graph_inputs=False)
            if nonstandard:
                _ensure_domain(model.graph, "com.microsoft")
        report.modified = bool(layers)
        report.stats = before.stats(
            model,
            bool(layers),
            tensors_changed=len(layers),
            nodes_quantized=sum(len(w.uses) for w in todo if any(la["tensor"] == w.tensor.name for la in layers)),
            forms=forms,
            layers=layers,
            nonstandard_ops=sorted(nonstandard),
            **stats,
        )
        return report

    # -- collection -----------------------------------------------------------------------------

    def _collect(self, model: Model, tree: GraphTree, report: PassReport, exclude: tuple[str, ...]) -> list[_Weight]:
        """Constant weights of MatMul/Gemm/Gather nodes with how each consumer reads them."""
        cfg = self.config
        found: dict[int, _Weight] = {}
        for graph, node in iter_nodes(model.graph):
            if node.op not in ("MatMul", "Gemm", "Gather") or node.domain not in STANDARD_DOMAINS:
                continue
            label = node.name or node.op
            if is_excluded(node.name, node.op, exclude):
                report.skipped.append((label, "excluded by configuration"))
                continue
            use, weight, reason = _use_of(node, graph)
            if reason:
                report.skipped.append((label, reason))
                continue
            if use is None or weight is None:
                continue
            if node.op == "Gather" and not cfg.embeddings:
                report.skipped.append((label, "Gather table left float (embeddings=false)"))
                continue
            found.setdefault(id(weight), _Weight(weight, [])).uses.append(use)
        return list(found.values())

    def _block_of(self, w: _Weight) -> int:
        """The int4 block size of ``w``: ``embedding_block`` for tables read only by Gather (auto: see
        :class:`Int4Config`), else ``block_size``."""
        cfg = self.config
        if all(u.node.op == "Gather" for u in w.uses):
            if cfg.embedding_block:
                return cfg.embedding_block
            if id(w.tensor) in self._coarse and _k_of(constant_meta(w.tensor)[0], 1) >= HOT_TABLE_BLOCK:  # type: ignore[index]
                return HOT_TABLE_BLOCK
        return cfg.block_size

    def _scale_bits_of(self, w: _Weight) -> int:
        """The run's scale bits for ``w``: int8 codes only pay off with more than 2 blocks per row
        (a row saves 1 byte per block and spends 2 on its step)."""
        if self._scale_bits == 16:
            return 16
        k = _k_of(constant_meta(w.tensor)[0], w.uses[0].red_axis)  # type: ignore[index]
        return 8 if -(-k // self._block_of(w)) > 2 else 16

    def _skip_reason(self, w: _Weight, opset: int) -> str | None:
        cfg = self.config
        if opset < 7:
            return f"opset {opset} < 7: Mul broadcasts only from opset 7"
        if len({u.red_axis for u in w.uses}) > 1:
            return "consumers read the weight along different axes"
        meta = constant_meta(w.tensor)
        assert meta is not None
        shape, dtype = meta
        if dtype != np.float32:
            return f"dtype {dtype} (only float32 weights are quantized)"
        size = int(np.prod(shape)) if shape else 1
        if size < cfg.min_elements:
            return f"too small ({size} elements < {cfg.min_elements})"
        k = _k_of(shape, w.uses[0].red_axis)
        if k % self._block_of(w) and opset < 10:
            return f"K={k} is not a multiple of block_size={self._block_of(w)} and opset {opset} < 10 has no Slice"
        return None

    # -- GPTQ -------------------------------------------------------------------------------------

    def _fit_gptq(
        self,
        model: Model,
        tree: GraphTree,
        todo: list[_Weight],
        ctx: PassContext,
        stats: dict[str, Any],
        strict: bool,
    ) -> dict[int, Quantized]:
        """GPTQ for every weight whose MatMul/Gemm inputs can be tapped; ``{id(tensor): Quantized}``."""
        cfg = self.config
        fallback: list[dict[str, str]] = stats["gptq_fallback"]
        available = tappable(model)
        plans: list[tuple[_Weight, list[tuple[str, bool]]]] = []
        for w in todo:
            reason = None
            acts: list[tuple[str, bool]] = []
            for use in w.uses:
                if len(constant_meta(w.tensor)[0]) > 2:  # type: ignore[index]
                    reason = "batched weight (one Hessian per batch slice): round-to-nearest"
                elif use.activation is None:
                    reason = "Gather table (no Hessian): round-to-nearest"
                elif use.graph is not model.graph or use.activation.name not in available:
                    reason = "an input of a consumer cannot be tapped (inside a subgraph or a constant)"
                else:
                    acts.append((use.activation.name, use.trans_a))
            if reason:
                fallback.append({"tensor": w.tensor.name, "reason": reason})
            else:
                plans.append((w, list(dict.fromkeys(acts))))
        out: dict[int, Quantized] = {}
        layers = 0
        awq_seconds = 0.0
        for group in _groups(plans, cfg.hessian_bytes):
            try:
                hessians = self._hessians(model, group, ctx.calibration or [])
            except OnnxCompressError as exc:
                if strict:
                    raise
                for w, _ in group:
                    fallback.append({"tensor": w.tensor.name, "reason": f"calibration failed: {exc}"})
                continue
            last = {a: i for i, (_, acts) in enumerate(group) for a in acts}  # a Hessian's last reader
            summed: dict[tuple[tuple[str, bool], ...], np.ndarray | str | None] = {}  # None: prepared only
            prepared: dict[tuple[tuple[str, bool], ...], PreparedHessian | str] = {}
            for index, (w, acts) in enumerate(group):
                key = tuple(acts)
                if key not in summed:  # only the latest (Q, K and V are consecutive): bounded memory
                    summed, prepared = {}, {}
                    k = _k_of(constant_meta(w.tensor)[0], w.uses[0].red_axis)  # type: ignore[index]
                    summed = {key: summed_hessian(hessians, acts, k, wide=self._awq or not self._gptq)}
                for a in acts:  # consumed: free each Hessian after its last reader has summed it
                    if last[a] == index:
                        hessians.pop(a, None)
                h = summed[key]
                if isinstance(h, str):
                    fallback.append({"tensor": w.tensor.name, "reason": h})
                    continue
                value = constant_value(w.tensor, cache=False)
                assert value is not None
                if not np.all(np.isfinite(value)):
                    continue  # skipped (with its reason) when emitted
                wk = _as_rows(value, w.uses[0].red_axis)
                scaling: Scaling | None = None
                if self._awq:
                    assert h is not None  # kept for every reader when AWQ runs
                    start = time.perf_counter()
                    scaling = self._awq_search(w, wk, h)
                    awq_seconds += time.perf_counter() - start
                try:
                    if scaling is not None and scaling.alpha > 0:
                        wk = wk * scaling.factor[None, :]
                        h = scaled_hessian(h, scaling.inverse)
                        prep: PreparedHessian | str | None = None
                    else:
                        scaling = None
                        prep = prepared.get(key)
                    if self._gptq:
                        if prep is None:
                            assert h is not None  # dropped only once prepared
                            if scaling is None and not self._awq:  # the next readers of this Hessian need only prep
                                summed[key] = None
                                once, h = _Once(h), None  # freed inside prepare_hessian once copied
                                prep = self._prepare(once)  # type: ignore[arg-type]
                                del once
                            else:
                                prep = self._prepare(h)
                            if scaling is None:
                                prepared[key] = prep
                        h = None  # GPTQ reads prep only: the float64 matrix can go now
                        if isinstance(prep, str):
                            fallback.append({"tensor": w.tensor.name, "reason": prep})
                            continue
                        q = gptq(
                            wk,
                            prep,
                            cfg.block_size,
                            symmetric=cfg.symmetric,
                            clip_search=cfg.clip_search,
                            scale_bits=self._scale_bits_of(w),
                        )
                    else:
                        assert h is not None  # only GPTQ drops it
                        q = quantize_rtn(
                            wk,
                            cfg.block_size,
                            cfg.symmetric,
                            cfg.clip_search,
                            self._scale_bits_of(w),
                            np.diagonal(h).astype(np.float32),
                        )
                    if scaling is not None:
                        q.col_scale = scaling.inverse
                        self._alphas[w.tensor.name] = scaling.alpha
                    out[id(w.tensor)] = q
                    layers += 1
                except ValueError as exc:
                    fallback.append({"tensor": w.tensor.name, "reason": str(exc)})
                del value, wk
                trim_heap()  # the weight's float64 K x K temporaries (they raise glibc's mmap threshold)
            del prepared, summed
            del hessians
        stats["gptq_layers"] = layers
        if self._awq:
            stats["awq_seconds"] = round(awq_seconds, 3)
            stats["awq_scaled"] = len(self._alphas)
        return out

    def _prepare(self, h: np.ndarray) -> PreparedHessian | str:
        """The factored, damped Hessian for GPTQ, or why GPTQ cannot use it."""
        try:
            cfg = self.config
            return prepare_hessian(h, cfg.block_size, cfg.damp, cfg.act_order, cfg.shrink)
        except ValueError as exc:
            return str(exc)

    def _awq_search(self, w: _Weight, wk: np.ndarray, h: np.ndarray) -> Scaling:
        """The channel scaling of ``wk [N, K]`` with the least output error ``tr(dW H dW^T)`` (:mod:`.awq`)."""
        cfg = self.config
        bits = self._scale_bits_of(w)

        def quantize(x: np.ndarray, col_weight: np.ndarray) -> np.ndarray:
            return quantize_rtn(x, cfg.block_size, cfg.symmetric, cfg.clip_search, bits, col_weight).dequantize()

        return awq_search(wk, h, quantize, cfg.awq_alphas)

    # -- mixed precision ----------------------------------------------------------------------------

    def _choose_int8(
        self,
        model: Model,
        todo: list[_Weight],
        fitted: dict[int, Quantized],
        ctx: PassContext,
        stats: dict[str, Any],
        bytes_before: int,
    ) -> dict[int, int]:
        """Weights to store in 8-bit blocks within ``budget``: ``{id(tensor): int8 block size}``.

        The size after the pass is projected from the int4 sizes of ``todo``; the room left under
        ``budget * bytes_before`` is spent greedily on the 2-D main-graph MatMul/Gemm/Gather
        initializers with the largest measured gain per extra byte. Gain: the drop of the relative
        squared output error (summed over the float outputs, on the calibration feeds) when that one
        weight is restored to float32 while every other candidate holds its int4 value. The
        candidates are fed as inputs of one onnxruntime session (one run per candidate). The hot rows'
        corrections (``hot_rows``, module docstring) are reserved first, and the candidates' int4 values
        include them.
        """
        cfg = self.config
        start = time.perf_counter()
        hot = self._hot_rows(model, todo, ctx, stats) if self._hot_tables else {}
        if self._hot_tables:
            stats["hot_rows_seconds"] = round(time.perf_counter() - start, 3)
        room, extra, cands = self._room(model, todo, fitted, ctx, bytes_before)
        if hot:
            cost = 0
            for w in todo:
                rows = hot.get(id(w.tensor))
                if rows is None:
                    continue
                c = hot_bytes(rows.size, _k_of(constant_meta(w.tensor)[0], 1))  # type: ignore[index]
                if id(w.tensor) in extra and c >= extra[id(w.tensor)][0]:  # cheaper as a whole 8-bit table
                    del hot[id(w.tensor)]
                    self._coarse.discard(id(w.tensor))
                else:
                    cost += c
            if hot and cost > room and self._coarse:  # no room for the corrections: keep block_size after all
                self._coarse = set()
                room, extra, cands = self._room(model, todo, fitted, ctx, bytes_before)
            if hot and cost <= room:
                self._hot = hot
                room -= cost
                stats["hot_rows_bytes"] = cost
            self._coarse &= set(self._hot)
        stats["int8_room_bytes"] = room
        cands = [w for w in cands if extra[id(w.tensor)][0] <= room][: cfg.max_candidates]
        if not cands:
            return {}
        try:
            feeds = [part for feed in ctx.calibration or [] for part in _trimmed(feed, SENSITIVITY_ROWS)]
            gains = self._sensitivity(model, cands, fitted, feeds)
        except OnnxCompressError as exc:
            stats["int8_skipped"] = str(exc)
            return {}
        order = sorted(cands, key=lambda w: -gains[w.tensor.name] / max(extra[id(w.tensor)][0], 1))
        chosen: dict[int, int] = {}
        used = 0
        picked: list[dict[str, Any]] = []
        for w in order:
            cost, b8 = extra[id(w.tensor)]
            if gains[w.tensor.name] > 0 and used + cost <= room:
                chosen[id(w.tensor)] = b8
                used += cost
                picked.append({"tensor": w.tensor.name, "gain": gains[w.tensor.name], "extra_bytes": cost})
        stats["int8_tensors"] = picked
        stats["int8_candidates"] = len(cands)
        for key in chosen:  # an 8-bit table needs no correction (its reserved bytes stay unspent)
            self._hot.pop(key, None)
        return chosen

    def _room(
        self, model: Model, todo: list[_Weight], fitted: dict[int, Quantized], ctx: PassContext, bytes_before: int
    ) -> tuple[int, dict[int, tuple[int, int]], list[_Weight]]:
        """``(room, {id: (extra bytes, int8 block)}, candidates)``: the bytes left under the budget once ``todo``
        is int4, and what 8 bits would cost each 2-D main-graph MatMul/Gemm/Gather initializer."""
        cfg = self.config
        projected = bytes_before
        extra: dict[int, tuple[int, int]] = {}  # id -> (extra bytes, int8 block)
        cands: list[_Weight] = []
        ort = ctx.target == "onnxruntime"
        for w in todo:
            shape = constant_meta(w.tensor)[0]  # type: ignore[index]
            size = int(np.prod(shape))
            k = _k_of(shape, w.uses[0].red_axis)
            # MatMulNBits and GatherBlockQuantized store float32 scales; int8 scale codes: 1 byte + 2 per row
            scale_bytes = 4 if ort and any(u.node.op in ("MatMul", "Gather") for u in w.uses) else 2
            s8 = self._scale_bits_of(w) == 8
            b4 = stored_bytes(
                size // k, k, self._block_of(w), 4, cfg.symmetric, 1 if s8 else scale_bytes, 2 if s8 else 0
            )
            projected += b4 - 4 * size + NODE_BYTES
            fit = fitted.get(id(w.tensor))
            if fit is not None and fit.col_scale is not None:  # AWQ channel scales (dropped if it gets 8 bits)
                b4 += k * (4 if ort else 2)
                projected += k * (4 if ort else 2)
            if (
                isinstance(w.tensor, gs.Constant)
                and len(shape) == 2
                and all(u.node.op in ("MatMul", "Gemm", "Gather") and u.graph is model.graph for u in w.uses)
            ):
                b8 = cfg.int8_block if k >= cfg.int8_block else cfg.block_size
                extra[id(w.tensor)] = (stored_bytes(size // k, k, b8, 8, True, scale_bytes) - b4, b8)
                cands.append(w)
        return int(cfg.budget * (1.0 - BUDGET_MARGIN) * bytes_before) - projected, extra, cands

    def _hot_rows(
        self, model: Model, todo: list[_Weight], ctx: PassContext, stats: dict[str, Any]
    ) -> dict[int, np.ndarray]:
        """``{id(table): rows}``: the rows of each main-graph Gather table (read by Gather nodes only) whose share
        of the calibration tokens is at least ``hot_rows`` (:func:`token_shares`), most used first."""
        cfg = self.config
        if model.opset < 11 or not ctx.calibration:  # the correction needs Equal/Where on int64 (opset 11)
            return {}
        inputs = {t.name for t in model.graph.inputs}
        available = tappable(model)
        tables: dict[int, tuple[_Weight, list[str]]] = {}
        for w in todo:
            if not all(u.node.op == "Gather" and u.graph is model.graph for u in w.uses):
                continue
            ids = [u.node.inputs[1].name for u in w.uses]
            if all(i in inputs or i in available for i in ids):
                tables[id(w.tensor)] = (w, ids)
        if not tables:
            return {}
        names = list(dict.fromkeys(i for _, ids in tables.values() for i in ids))
        try:
            shares = token_shares(
                model,
                names,
                {n: int(constant_meta(w.tensor)[0][0]) for w, ids in tables.values() for n in ids},  # type: ignore[index]
                ctx.calibration,
                cfg.calibration_rows,
                mask_padding=cfg.mask_padding,
            )
        except OnnxCompressError as exc:
            stats["hot_rows_skipped"] = str(exc)
            return {}
        out: dict[int, np.ndarray] = {}
        for key, (_w, ids) in tables.items():
            share: np.ndarray | None = None
            for i in ids:
                if i in shares:
                    share = shares[i] if share is None else share + shares[i]
            if share is None:
                continue
            rows = np.flatnonzero(share >= cfg.hot_rows)
            rows = rows[np.argsort(-share[rows], kind="stable")][:HOT_MAX_ROWS]
            if rows.size:
                out[key] = np.sort(rows)
                if float(share[rows].sum()) >= HOT_COVERAGE * len(ids):  # Zipf-like: the rest may be coarser
                    self._coarse.add(key)
        return out

    def _sensitivity(
        self, model: Model, cands: list[_Weight], fitted: dict[int, Quantized], feeds: list[dict[str, np.ndarray]]
    ) -> dict[str, float]:
        """``{tensor name: output error with all candidates int4 - with that one float32}`` (see above)."""
        names = {w.tensor.name for w in cands}
        cfg = self.config

        def float_value(w: _Weight) -> np.ndarray:  # read again when needed: one float copy at a time
            return np.asarray(constant_value(w.tensor, cache=False), dtype=np.float32)

        folder = Path(tempfile.mkdtemp(prefix="onnxcompress-int4-"))
        try:
            # Written from the graph with the weights in an external-data file (onnxruntime maps it: the
            # weights are not parsed out of a protobuf and copied), then the candidates made graph inputs.
            full = stage(model, folder / "model.onnx", external=True, check=False, type_check=False).commit()
            path = _inputs_from_initializers(full, names, folder / "sensitivity.onnx")
            session = make_session(path, arena=False)
            outputs = [o.name for o in session.get_outputs()]

            def run(values: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
                try:
                    got = []
                    for feed in feeds:
                        got.append(session.run(outputs, {**feed, **values}))
                        # the pages of the mapped weights (embedding rows) it read: else all become resident
                        # what the run left resident: freed heap pages and the mapped weight pages it read
                        # (not evicted from the page cache: the many short runs would wait for the disk)
                        trim_heap()
                        drop_mapped_pages(folder)
                    return got
                except Exception as exc:  # onnxruntime raises its own exception types
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise OnnxCompressError(f"sensitivity run failed: {first[:200]}") from None

            ref = run({w.tensor.name: float_value(w) for w in cands})  # the float copies go after this run
            quant: dict[str, np.ndarray] = {}
            for w in cands:
                q = fitted.get(id(w.tensor))  # GPTQ; round-to-nearest for Gather tables and fallbacks
                if q is None:
                    rows = _as_rows(float_value(w), w.uses[0].red_axis)
                    q = quantize_rtn(rows, self._block_of(w), cfg.symmetric, cfg.clip_search, self._scale_bits_of(w))
                    del rows
                deq = q.dequantize()
                hot = self._hot.get(id(w.tensor))
                if hot is not None:  # the 8-bit correction of the hot rows (tables: [V, D] rows as they are)
                    codes, scales = hot_residual(float_value(w)[hot], deq[hot])
                    deq[hot] += codes.astype(np.float32) * scales[:, None]
                quant[w.tensor.name] = np.ascontiguousarray(deq.T if w.uses[0].red_axis == 0 else deq)
                del q, deq

            def error(values: dict[str, np.ndarray]) -> float:
                total = 0.0
                for got, want in zip(run(values), ref):
                    for y, r in zip(got, want):
                        if np.issubdtype(np.asarray(r).dtype, np.floating) and np.size(r):
                            r64 = np.asarray(r, np.float64)
                            d = float(np.sum((np.asarray(y, np.float64) - r64) ** 2))
                            total += d / max(float(np.sum(r64 * r64)), 1e-30)
                return total if np.isfinite(total) else float("inf")

            base = error(quant)
            gains = {}
            for w in cands:
                name = w.tensor.name
                gains[name] = base - error({**quant, name: float_value(w)})
            return gains
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _hessians(
        self, model: Model, group: list[tuple[_Weight, list[tuple[str, bool]]]], feeds: list[dict[str, np.ndarray]]
    ) -> dict[tuple[str, bool], PackedHessian]:
        """``{(activation, transposed): sum X^T X}`` over all calibration feeds (:func:`collect_hessians`)."""
        cfg = self.config
        wanted = list(dict.fromkeys(a for _, acts in group for a in acts))
        return collect_hessians(
            model,
            wanted,
            feeds,
            cfg.calibration_rows,
            mask_padding=cfg.mask_padding,
            sample_weighting=cfg.sample_weighting,
        )


def collect_hessians(
    model: Model,
    wanted: list[tuple[str, bool]],
    feeds: list[dict[str, np.ndarray]],
    rows: int,
    *,
    mask_padding: bool = True,
    sample_weighting: bool = True,
) -> dict[tuple[str, bool], PackedHessian]:
    """``{(activation, transposed): sum X^T X}`` over all calibration feeds, packed (float32 upper triangles).

    ``(name, transposed)``: ``X`` is the activation ``[..., K]`` read as ``[rows, K]``, or (transposed,
    a ``transA`` Gemm) a 2-D activation ``[K, rows]``. Feeds are cut into slices of ``rows`` samples
    when the model has a batch axis. ``mask_padding`` / ``sample_weighting``: see :class:`Int4Config`
    (token models with a 2-D ``*mask*`` input). Activations that are not float32 are left out.

    Raises:
        OnnxCompressError: if onnxruntime cannot run the model on a feed.
    """
    names = list(dict.fromkeys(n for n, _ in wanted))
    sums: dict[tuple[str, bool], PackedHessian] = {}
    batch_axis = has_batch_axis(model)
    with ActivationTap(model, names) as tap:
        for feed in feeds:
            for part in split_feed(feed, rows if batch_axis else 0):
                values = tap.run(part)
                mask = _token_mask(part) if mask_padding else None
                last = {name: i for i, (name, _) in enumerate(wanted)}
                for i, (name, trans) in enumerate(wanted):
                    a = np.asarray(values[name] if last[name] > i else values.pop(name))  # freed once read
                    if a.dtype != np.float32 or a.ndim == 0:
                        continue
                    if trans:
                        x = a.reshape(a.shape[0], -1).T if a.ndim == 2 else None
                    elif mask is not None and a.ndim == 3 and a.shape[:2] == mask.shape:
                        x = a[mask]
                        if sample_weighting:  # every sample weighs the same, whatever its length
                            counts = mask.sum(axis=1, keepdims=True)
                            root = np.sqrt(np.float32(mask.shape[1]) / np.maximum(counts, 1), dtype=np.float32)
                            x = x * np.broadcast_to(root, mask.shape)[mask][:, None]
                    else:
                        x = a.reshape(-1, a.shape[-1])
                    if x is None:
                        continue
                    prev = sums.get((name, trans))
                    if prev is None:
                        sums[(name, trans)] = prev = PackedHessian(x.shape[1])
                    if prev.k == x.shape[1]:
                        prev.add(x)
                    del x
                del values
                tap.release()  # the slice's outputs, temporaries and mapped weight pages (see ActivationTap.release)
    PackedHessian.release()
    trim_heap()  # the scratch buffers just dropped (the tap's own release ran before)
    return sums


class _Once:
    """An array handed to :func:`~.gptq.prepare_hessian` that lets go of it once read (an array-like:
    ``shape`` and ``__array__``): ``prepare_hessian`` copies ``H`` into its padded float64 buffer
    first, and would otherwise hold the argument through the whole factorisation (MiniLM,
    ``K = 1536``: a 9 MB float32 matrix beside the float64 ones at the GPTQ phase's peak).
    Read once only; the values are the same."""

    def __init__(self, m: np.ndarray) -> None:
        self.m: np.ndarray | None = m
        self.shape = m.shape

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        m, self.m = self.m, None
        if m is None:
            raise ValueError("_Once: read twice")
        return m if dtype is None else m.astype(dtype, copy=False)


def summed_hessian(
    hessians: dict[tuple[str, bool], PackedHessian], acts: list[tuple[str, bool]], k: int, wide: bool = True
) -> np.ndarray | str:
    """The Hessian of a weight read through ``acts`` (float64, the sum over its consumers), or why it cannot be used.

    ``wide=False``: a single consumer's Hessian is returned as float32 (the same values, half the bytes; for
    :func:`~.gptq.prepare_hessian`, which copies it into float64 anyway).
    """
    hs = [hessians.get(a) for a in acts]
    if any(h is None or h.k != k for h in hs):
        return "activation width does not match K"
    if not wide and len(hs) == 1:
        only = hs[0].matrix()  # type: ignore[union-attr]
        return only if np.all(np.isfinite(only)) else "non-finite calibration activations"
    total: np.ndarray | None = None
    for packed in hs:
        assert packed is not None
        m = packed.matrix()
        if total is None:
            total = m.astype(np.float64)
        else:
            total += m
        del m
    assert total is not None
    if not np.all(np.isfinite(total)):
        return "non-finite calibration activations"
    return total


def token_shares(
    model: Model,
    names: list[str],
    sizes: dict[str, int],
    feeds: list[dict[str, np.ndarray]],
    rows: int,
    *,
    mask_padding: bool = True,
) -> dict[str, np.ndarray]:
    """``{indices tensor: share [V]}``: the share of each table row among the indices a Gather reads on ``feeds``.

    Each sample (a slice along the batch axis; token models: its unpadded tokens, see :func:`_token_mask`)
    weighs 1, spread evenly over its indices, as in a mean-pooled output; the shares are averaged over
    the samples (they sum to 1). ``sizes``: the table's row count per indices tensor (negative indices
    count from the end, indices outside the table are ignored). Indices that are graph inputs are read
    from the feeds, others tapped in onnxruntime.

    Raises:
        OnnxCompressError: if onnxruntime cannot run the model on a feed.
    """
    inputs = {t.name for t in model.graph.inputs}
    tapped = [n for n in names if n not in inputs]
    sums = {n: np.zeros(sizes[n], np.float64) for n in names}
    samples = dict.fromkeys(names, 0)
    batch_axis = has_batch_axis(model)
    tap = ActivationTap(model, tapped) if tapped else None
    try:
        for feed in feeds:
            for part in split_feed(feed, rows if batch_axis else 0) if tap is not None else [feed]:
                values = tap.run(part) if tap is not None else {}
                mask = _token_mask(part) if mask_padding else None
                for name in names:
                    a = np.asarray(part[name] if name in part else values.get(name))
                    if not np.issubdtype(a.dtype, np.integer) or a.size == 0:
                        continue
                    keep = mask if mask is not None and a.shape == mask.shape else np.ones(a.shape, bool)
                    if a.ndim >= 2:  # a sample per leading row
                        per = keep.reshape(keep.shape[0], -1).sum(axis=1)
                        inverse = (1.0 / np.maximum(per, 1)).reshape((-1,) + (1,) * (a.ndim - 1))
                        weight = np.broadcast_to(inverse, a.shape)
                        n_samples = int(np.count_nonzero(per))
                    else:
                        weight = np.full(a.shape, 1.0 / a.size)
                        n_samples = 1
                    idx = a.astype(np.int64)
                    idx = np.where(idx < 0, idx + sizes[name], idx)
                    keep = keep & (idx >= 0) & (idx < sizes[name])
                    sums[name] += np.bincount(idx[keep], weights=weight[keep], minlength=sizes[name])
                    samples[name] += n_samples
                del values
                if tap is not None:
                    tap.release()  # the slice's outputs are gone: trim, drop mapped pages
    finally:
        if tap is not None:
            tap.close()
    return {n: sums[n] / samples[n] for n in names if samples[n]}


def hot_bytes(rows: int, width: int) -> int:
    """File bytes of the 8-bit correction of ``rows`` table rows of ``width`` values (codes, float16 scales,
    int64 row ids) plus its nodes."""
    return rows * (width + 2 + 8) + NODE_BYTES


def hot_residual(w: np.ndarray, deq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int4 error ``w - deq`` of some table rows ``[R, D]`` as int8 codes ``[R, D]`` times a float16-exact
    scale per row ``[R]`` (symmetric, ``max |error| / 127``)."""
    r = np.asarray(w, np.float32) - np.asarray(deq, np.float32)
    peak = np.abs(r).max(axis=1) if r.size else np.zeros(r.shape[0], np.float32)
    scales = round_scales(peak / np.float32(127.0))
    codes = np.clip(np.rint(r / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def dequantize_rows(q: Quantized, rows: np.ndarray) -> np.ndarray:
    """``q.dequantize()[rows]`` without dequantizing the other rows."""
    step = None if q.scale_step is None else q.scale_step[rows]
    sub = Quantized(q.codes[rows], q.scales[rows], q.zero_points[rows], q.k, q.block, q.bits, step, q.col_scale)
    return sub.dequantize()


def _inputs_from_initializers(path: Path, names: set[str], out: Path) -> Path:
    """Copy of the model ``path`` (external data, read in place) whose initializers ``names`` are graph inputs."""
    proto = onnx.load(str(path), load_external_data=False)
    kept = [i for i in proto.graph.initializer if i.name not in names]
    moved = [i for i in proto.graph.initializer if i.name in names]
    listed = {i.name for i in proto.graph.input}
    for i in moved:
        if i.name not in listed:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save(proto, str(out))
    return out


def _use_of(node: gs.Node, graph: gs.Graph) -> tuple[_Use | None, gs.Tensor | None, str | None]:
    """How ``node`` reads a constant weight: ``(use, weight, skip reason)``; all None if it reads none."""
    op = node.op
    if op == "Gather":
        if len(node.inputs) != 2 or constant_meta(node.inputs[0]) is None:
            return None, None, None
        table = node.inputs[0]
        if node.inputs[1] is table or constant_meta(node.inputs[1]) is not None:
            return None, None, "constant indices: left to constant folding"
        rank = len(constant_meta(table)[0])  # type: ignore[index]
        axis = int(node.attrs.get("axis", 0))
        if rank != 2 or axis % rank != 0:
            return None, None, f"Gather on axis {axis} of a rank-{rank} table (only 2-D tables on axis 0)"
        return _Use(node, graph, 1, None), table, None
    if len(node.inputs) < 2:
        return None, None, None
    a, b = node.inputs[0], node.inputs[1]
    a_const, b_meta = constant_meta(a) is not None, constant_meta(b)
    if b_meta is None:
        if a_const:
            return None, None, "constant first input (weight on the left) is not quantized"
        return None, None, "no constant weight input (computed at run time)"
    if a_const:
        return None, None, "both inputs constant: left to constant folding"
    if a is b:
        return None, None, "the weight is also the activation"
    rank = len(b_meta[0])
    if rank < 2 or (op == "Gemm" and rank != 2):
        return None, None, f"rank-{rank} weight left float"
    if op == "MatMul":
        return _Use(node, graph, 0, a), b, None
    trans_b = bool(node.attrs.get("transB", 0))
    return _Use(node, graph, 1 if trans_b else 0, a, bool(node.attrs.get("transA", 0))), b, None


def _k_of(shape: tuple[int, ...] | list[int], red_axis: int) -> int:
    """The reduction size of a weight: ``[..., K, N]`` (``red_axis`` 0) or ``[N, K]`` (1)."""
    return int(shape[-2] if red_axis == 0 else shape[1])


def _as_rows(value: np.ndarray, red_axis: int) -> np.ndarray:
    """The weight as ``[rows, K]``: ``[..., K, N]`` -> ``[batch * N, K]`` (a copy); ``[N, K]`` as is."""
    if red_axis == 1:
        return value
    k, n = value.shape[-2:]
    return value.reshape(-1, k, n).transpose(0, 2, 1).reshape(-1, k)


def _groups(
    plans: list[tuple[_Weight, list[tuple[str, bool]]]], budget: int
) -> Iterator[list[tuple[_Weight, list[tuple[str, bool]]]]]:
    """Consecutive weights whose distinct activations' Hessians (packed float32 triangles, ``2 K (K + 1)``
    bytes each: :class:`~.gptq.PackedHessian`) fit ``budget`` bytes."""
    group: list[tuple[_Weight, list[tuple[str, bool]]]] = []
    seen: set[tuple[str, bool]] = set()
    used = 0
    for w, acts in plans:
        k = _k_of(constant_meta(w.tensor)[0], w.uses[0].red_axis)  # type: ignore[index]
        extra = sum(2 * k * (k + 1) for a in acts if a not in seen)
        if group and used + extra > budget:
            yield group
            group, seen, used = [], set(), 0
            extra = 2 * k * (k + 1) * len(acts)
        group.append((w, acts))
        seen.update(acts)
        used += extra
    if group:
        yield group


def _trimmed(feed: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """A token model's feed as slices of ``rows`` samples of similar length, trailing padding cut off.

    Only when :func:`_token_mask` finds a mask and every input has the same leading ``[batch, tokens]``
    axes; otherwise the feed as is. Used for the sensitivity runs (about half the tokens on MiniLM's
    calibration set, which is padded to its longest sentence).
    """
    mask = _token_mask(feed)
    arrays = [np.asarray(v) for v in feed.values()]
    if mask is None or any(a.ndim < 2 or a.shape[:2] != mask.shape for a in arrays):
        yield feed
        return
    cols = np.arange(1, mask.shape[1] + 1)
    lengths = np.max(np.where(mask, cols, 0), axis=1)
    order = np.argsort(lengths, kind="stable")
    for r0 in range(0, len(order), rows):
        idx = order[r0 : r0 + rows]
        t = max(int(lengths[idx].max()), 1)
        yield {k: np.ascontiguousarray(np.asarray(v)[idx, :t]) for k, v in feed.items()}


def _token_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The padding mask of a token model's feed: the first 2-D integer/bool input named ``*mask*``, as bool."""
    for name, value in feed.items():
        a = np.asarray(value)
        if "mask" in name.lower() and a.ndim == 2 and (a.dtype == bool or np.issubdtype(a.dtype, np.integer)):
            m = a != 0
            return m if m.any() else None
    return None


def _ensure_domain(graph: gs.Graph, domain: str) -> None:
    """Add ``domain`` (version 1) to the model's opset imports if missing."""
    import onnx

    domains = list(graph.import_domains or [])
    if not any((d.domain or "") == domain for d in domains):
        domains.append(onnx.helper.make_opsetid(domain, 1))
        graph.import_domains = domains


# -- emission -------------------------------------------------------------------------------------


def pack_halves(codes: np.ndarray, block: int) -> np.ndarray:
    """Codes ``[..., nb * b]`` -> bytes ``[..., nb, b / 2]``: byte ``j`` = code ``j`` | code ``j + b/2`` << 4."""
    c = codes.reshape(*codes.shape[:-1], -1, 2, block // 2)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).astype(np.uint8)


def pack_pairs(codes: np.ndarray) -> np.ndarray:
    """Codes ``[..., 2m]`` -> bytes ``[..., m]``: byte ``j`` = code ``2j`` | code ``2j + 1`` << 4 (MatMulNBits)."""
    c = codes.reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)


def _pack_blocks(q: Quantized) -> np.ndarray:
    """Codes ``[N, nb * b]`` as bytes ``[N, nb, b / 2]`` (4-bit, :func:`pack_halves`) or ``[N, nb, b]`` (8-bit)."""
    if q.bits == 8:
        return q.codes.reshape(q.codes.shape[0], -1, q.block)
    return pack_halves(q.codes, q.block)


def _half_scales(s: np.ndarray) -> np.ndarray:
    """Scales as float16 when that is exact (they were rounded to float16 by the quantizer)."""
    with np.errstate(over="ignore"):
        h = s.astype(np.float16)
    return h if np.array_equal(h.astype(np.float32), s) else s.astype(np.float32)


class _Emitter:
    """Writes one quantized weight into the graph, in the form each consumer allows."""

    def __init__(
        self,
        w: _Weight,
        q: Quantized,
        tree: GraphTree,
        names: set[str],
        opset: int,
        target: str,
        symmetric: bool,
        hot: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.w, self.q, self.tree, self.names = w, q, tree, names
        self.hot = hot  # (rows, int8 codes [R, D], scales [R]): a table's hot-row correction (opset >= 11)
        self.opset, self.target, self.symmetric = opset, target, symmetric
        self.base = w.tensor.name
        self.shape = list(constant_meta(w.tensor)[0])  # type: ignore[index]
        self.red = w.uses[0].red_axis
        self._packed: dict[str, gs.Constant] = {}

    def stored_bytes(self) -> int:
        """Bytes of the packed codes, scales and zero points written for this weight."""
        return sum(int(c.values.nbytes) for c in self._packed.values())

    def name(self, suffix: str) -> str:
        return fresh_name(self.names, f"{self.base}_{suffix}")

    def const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(suffix), np.ascontiguousarray(value))

    def var(self, suffix: str, dtype: Any = np.float32) -> gs.Variable:
        return gs.Variable(self.name(suffix), dtype=dtype)

    def node(self, graph: gs.Graph, op: str, inputs: list[gs.Tensor], out: gs.Tensor, **attrs: Any) -> gs.Tensor:
        domain = "com.microsoft" if op in ("MatMulNBits", "GatherBlockQuantized") else None
        graph.nodes.append(gs.Node(op, self.name(op), attrs=attrs, inputs=inputs, outputs=[out], domain=domain))
        return out

    def emit(self) -> list[tuple[str, str, int]]:
        """Rewire every consumer; ``[(form, new tensor name, bytes stored)]``."""
        out: list[tuple[str, str, int]] = []
        shared: tuple[gs.Tensor, int] | None = None
        pending: list[gs.Node] = []
        for use in self.w.uses:
            ids = use.node.inputs[1] if use.node.op == "Gather" else None
            if self.target == "onnxruntime" and use.node.op == "MatMul" and self._nbits_ok(use):
                out.append(self._matmul_nbits(use))
            elif (
                self.target == "onnxruntime"
                and use.node.op == "Gather"
                and self.q.k % self.q.block == 0
                and self.q.bits == 4
            ):
                out.append(self._gather_block_quantized(use))
                self._hot_correction(use, ids)
            elif use.node.op == "Gather" and self.opset >= 11:
                out.append(self._gather_load(use))
                self._hot_correction(use, ids)
            else:
                pending.append(use.node)
        others: list[gs.Node] = []
        for n in self.w.tensor.outputs:
            if not any(n is u.node for u in self.w.uses) and not any(n is o for o in others):
                others.append(n)
        if pending or others:
            shared = self._load(self._owner(pending + others))
            for node in _unique(pending + others):
                for i, inp in enumerate(node.inputs):
                    if inp is self.w.tensor:
                        node.inputs[i] = shared[0]
            out.append(("load", shared[0].name, shared[1]))
        return out

    def _owner(self, nodes: list[gs.Node]) -> gs.Graph:
        """The lowest graph enclosing every node in ``nodes``."""
        owner: gs.Graph | None = None
        for n in nodes:
            g = self.tree.node_graph.get(id(n))
            if g is not None:
                owner = g if owner is None else self.tree.lca(owner, g)
        return owner if owner is not None else self.tree.root

    # -- standard: load form ----------------------------------------------------------------------

    def _packed_rows(self) -> tuple[gs.Constant, gs.Constant, gs.Constant | None, int]:
        """Packed codes ``[N, nb, b/2]``, scales ``[N, nb, 1]`` and zero points (or None), bytes stored."""
        if "rows" not in self._packed:
            q = self.q
            n = q.codes.shape[0]
            nb = q.codes.shape[1] // q.block
            p = self.const(f"int{q.bits}", _pack_blocks(q))
            z = None if self.symmetric else self.const("zero_point", q.zero_points.reshape(n, nb, 1))
            self._packed.update(rows=p)
            if q.scale_step is not None:
                self._packed["rows_s"] = self.const("scale_code", q.scale_codes().reshape(n, nb, 1))
                self._packed["rows_d"] = self.const("scale_step", q.scale_step.astype(np.float16).reshape(n, 1, 1))
            else:
                self._packed["rows_s"] = self.const("scale", _half_scales(q.scales).reshape(n, nb, 1))
            if z is not None:
                self._packed["rows_z"] = z
        p, s, z = self._packed["rows"], self._packed["rows_s"], self._packed.get("rows_z")
        d = self._packed.get("rows_d")
        nbytes = p.values.nbytes + s.values.nbytes + sum(t.values.nbytes for t in (z, d) if t is not None)
        return p, s, z, nbytes

    def _unpack(
        self,
        graph: gs.Graph,
        p: gs.Tensor,
        s: gs.Tensor,
        z: gs.Tensor | None,
        axis: int,
        d: gs.Tensor | None = None,
    ) -> gs.Tensor:
        """``(u - z) * s`` with ``u = Concat(lo, hi)`` of the bytes ``p`` along ``axis`` (8-bit: ``u = p``);
        with a step ``d``, ``s`` holds int8 codes and the scale is ``s * d``."""
        f = self.node(graph, "Cast", [p], self.var("bytes"), to=1)
        if self.q.bits == 8:
            u = f
        else:
            sixteen = self.const("sixteen", np.array(16.0, np.float32))
            hi = self.node(graph, "Floor", [self.node(graph, "Div", [f, sixteen], self.var("div"))], self.var("hi"))
            lo = self.node(graph, "Sub", [f, self.node(graph, "Mul", [hi, sixteen], self.var("hi16"))], self.var("lo"))
            u = self.node(graph, "Concat", [lo, hi], self.var("codes"), axis=axis)
        zt = (
            self.const("zero", np.array(8.0 if self.q.bits == 4 else 128.0, np.float32))
            if z is None
            else self.node(graph, "Cast", [z], self.var("zero_float"), to=1)
        )
        centred = self.node(graph, "Sub", [u, zt], self.var("centred"))
        scale = s if s.dtype == np.float32 else self.node(graph, "Cast", [s], self.var("scale_float"), to=1)
        if d is not None:
            step = self.node(graph, "Cast", [d], self.var("step_float"), to=1)
            scale = self.node(graph, "Mul", [scale, step], self.var("scale"))
        return self.node(graph, "Mul", [centred, scale], self.var("blocks"))

    def _load(self, graph: gs.Graph) -> tuple[gs.Tensor, int]:
        """The whole dequantized weight in its original layout; ``(tensor, bytes stored)``."""
        q = self.q
        n, kp = q.codes.shape
        nb = kp // q.block
        if self.red == 0:  # [..., K, N]: pack as [batch, nb, b/2, N], unpack along axis 2
            key = "cols"
            bt = n // self.shape[-1]
            nn = self.shape[-1]
            if key not in self._packed:
                packed = _pack_blocks(q)
                packed = packed.reshape(bt, nn, nb, packed.shape[-1]).transpose(0, 2, 3, 1)
                self._packed[key] = self.const(f"int{q.bits}", packed)
                if q.scale_step is not None:
                    codes = q.scale_codes().reshape(bt, nn, nb).transpose(0, 2, 1)
                    self._packed[key + "_s"] = self.const("scale_code", codes.reshape(bt, nb, 1, nn))
                    step = q.scale_step.astype(np.float16).reshape(bt, 1, 1, nn)
                    self._packed[key + "_d"] = self.const("scale_step", step)
                else:
                    scales = _half_scales(q.scales).reshape(bt, nn, nb).transpose(0, 2, 1)
                    self._packed[key + "_s"] = self.const("scale", scales.reshape(bt, nb, 1, nn))
                if not self.symmetric:
                    zp = q.zero_points.reshape(bt, nn, nb).transpose(0, 2, 1)
                    self._packed[key + "_z"] = self.const("zero_point", zp.reshape(bt, nb, 1, nn))
            p, s, z = self._packed[key], self._packed[key + "_s"], self._packed.get(key + "_z")
            d = self._packed.get(key + "_d")
            nbytes = p.values.nbytes + s.values.nbytes + sum(t.values.nbytes for t in (z, d) if t is not None)
            blocks = self._unpack(graph, p, s, z, axis=2, d=d)
            full = [*self.shape[:-2], kp, nn]
            red_axis = len(self.shape) - 2
        else:  # [N, K]
            p, s, z, nbytes = self._packed_rows()
            blocks = self._unpack(graph, p, s, z, axis=2, d=self._packed.get("rows_d"))
            full = [n, kp]
            red_axis = 1
        out_shape = self.const("shape", np.array(full, np.int64))
        w = self.node(graph, "Reshape", [blocks, out_shape], self.var("dequantized"))
        if kp != q.k:
            w = self._slice(graph, w, red_axis, q.k)
        if q.col_scale is not None:  # AWQ: multiply the columns back (2-D weights only)
            if "col" not in self._packed:
                shape = (q.k, 1) if self.red == 0 else (1, q.k)
                self._packed["col"] = self.const("channel_scale", q.col_scale.astype(np.float16).reshape(shape))
            c = self._packed["col"]
            nbytes += c.values.nbytes
            cf = self.node(graph, "Cast", [c], self.var("channel_scale_float"), to=1)
            w = self.node(graph, "Mul", [w, cf], self.var("descaled"))
        w.shape = self.shape
        return w, nbytes

    def _slice(self, graph: gs.Graph, x: gs.Tensor, axis: int, size: int) -> gs.Tensor:
        starts = self.const("starts", np.array([0], np.int64))
        ends = self.const("ends", np.array([size], np.int64))
        axes = self.const("axes", np.array([axis], np.int64))
        return self.node(graph, "Slice", [x, starts, ends, axes], self.var("sliced"))

    def _gather_load(self, use: _Use) -> tuple[str, str, int]:
        """``Gather`` of packed rows and scales, then unpack only the gathered rows."""
        graph, node = use.graph, use.node
        ids, out = node.inputs[1], node.outputs[0]
        p, s, z, nbytes = self._packed_rows()
        kp = self.q.codes.shape[1]
        rows = self.node(graph, "Gather", [p, ids], self.var("rows", np.uint8), axis=0)
        row_s = self.node(graph, "Gather", [s, ids], self.var("row_scale", s.dtype), axis=0)
        row_z = None if z is None else self.node(graph, "Gather", [z, ids], self.var("row_zero", np.uint8), axis=0)
        d = self._packed.get("rows_d")
        row_d = None if d is None else self.node(graph, "Gather", [d, ids], self.var("row_step", d.dtype), axis=0)
        blocks = self._unpack(graph, rows, row_s, row_z, axis=-1, d=row_d)
        ids_shape = self.node(graph, "Shape", [ids], self.var("ids_shape", np.int64))
        width = self.const("width", np.array([kp], np.int64))
        shape = self.node(graph, "Concat", [ids_shape, width], self.var("out_shape", np.int64), axis=0)
        if kp == self.q.k:
            node.op, node.attrs = "Reshape", {}
            _set_inputs(node, [blocks, shape])
            node.name = node.name or self.name("Reshape")
        else:
            flat = self.node(graph, "Reshape", [blocks, shape], self.var("padded"))
            starts = self.const("starts", np.array([0], np.int64))
            ends = self.const("ends", np.array([self.q.k], np.int64))
            axes = self.const("axes", np.array([-1], np.int64))
            node.op, node.attrs = "Slice", {}
            _set_inputs(node, [flat, starts, ends, axes])
        del out
        return "gather-load", p.name, nbytes

    def _hot_correction(self, use: _Use, ids: gs.Tensor | None) -> None:
        """Add the 8-bit correction of the hot rows to the rows gathered by ``use.node`` (rewritten in place)::

            out = rows + Cast(Equal(Reshape(ids, [..., 1]), hot_ids), float) @ (codes * scale)

        (negative ids wrapped first; the ``[R, D]`` correction table is computed from constants, folded at load)."""
        if self.hot is None or ids is None:
            return
        graph, node = use.graph, use.node
        if "hot" not in self._packed:
            rows, codes, scales = self.hot
            self._packed["hot"] = self.const("hot_rows", rows.astype(np.int64))
            self._packed["hot_c"] = self.const("hot_residual", codes)
            self._packed["hot_s"] = self.const("hot_scale", scales.astype(np.float16).reshape(-1, 1))
        out = node.outputs[0]
        plain = self.var("plain")
        node.outputs.clear()
        node.outputs.append(plain)
        i64 = self.node(graph, "Cast", [ids], self.var("ids64", np.int64), to=7)
        zero = self.const("zero64", np.array(0, np.int64))
        size = self.const("rows64", np.array(int(self.shape[0]), np.int64))
        neg = self.node(graph, "Less", [i64, zero], self.var("negative", np.bool_))
        up = self.node(graph, "Add", [i64, size], self.var("wrapped", np.int64))
        idx = self.node(graph, "Where", [neg, up, i64], self.var("ids_pos", np.int64))
        shape = self.node(graph, "Shape", [ids], self.var("ids_shape", np.int64))
        one = self.const("one", np.array([1], np.int64))
        col_shape = self.node(graph, "Concat", [shape, one], self.var("col_shape", np.int64), axis=0)
        col = self.node(graph, "Reshape", [idx, col_shape], self.var("ids_col", np.int64))
        hit = self.node(graph, "Equal", [col, self._packed["hot"]], self.var("hot_hit", np.bool_))
        onehot = self.node(graph, "Cast", [hit], self.var("hot_onehot"), to=1)
        c = self.node(graph, "Cast", [self._packed["hot_c"]], self.var("hot_codes"), to=1)
        sc = self.node(graph, "Cast", [self._packed["hot_s"]], self.var("hot_scale_float"), to=1)
        table = self.node(graph, "Mul", [c, sc], self.var("hot_table"))
        corr = self.node(graph, "MatMul", [onehot, table], self.var("hot_correction"))
        self.node(graph, "Add", [plain, corr], out)

    # -- onnxruntime contrib ops --------------------------------------------------------------------

    def _nbits_ok(self, use: _Use) -> bool:
        a = use.activation
        shape = getattr(a, "shape", None)
        return self.red == 0 and len(self.shape) == 2 and not (shape is not None and len(shape) < 2)

    def _matmul_nbits(self, use: _Use) -> tuple[str, str, int]:
        q = self.q
        n, kp = q.codes.shape
        nb = kp // q.block
        if "nbits" not in self._packed:
            data = pack_pairs(q.codes) if q.bits == 4 else q.codes
            self._packed["nbits"] = self.const("MatMulNBits_B", data.reshape(n, nb, q.block * q.bits // 8))
            self._packed["nbits_s"] = self.const("MatMulNBits_scales", q.scales.astype(np.float32).reshape(-1))
            if not self.symmetric:
                zp = q.zero_points
                if nb % 2:
                    zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)
                self._packed["nbits_z"] = self.const("MatMulNBits_zero_points", pack_pairs(zp))
        b, s, z = self._packed["nbits"], self._packed["nbits_s"], self._packed.get("nbits_z")
        node = use.node
        x = node.inputs[0]
        nbytes = b.values.nbytes + s.values.nbytes + (z.values.nbytes if z is not None else 0)
        if q.col_scale is not None:  # AWQ: the activation is scaled instead (one Mul per consumer)
            if "nbits_c" not in self._packed:
                self._packed["nbits_c"] = self.const("channel_scale", q.col_scale.astype(np.float32))
            c = self._packed["nbits_c"]
            x = self.node(use.graph, "Mul", [x, c], self.var("scaled_input"))
            nbytes += c.values.nbytes
        node.op, node.domain = "MatMulNBits", "com.microsoft"
        _set_inputs(node, [x, b, s] + ([z] if z is not None else []))
        node.attrs = {"K": int(q.k), "N": int(n), "bits": int(q.bits), "block_size": int(q.block)}
        return "MatMulNBits", b.name, nbytes

    def _gather_block_quantized(self, use: _Use) -> tuple[str, str, int]:
        q = self.q
        n, kp = q.codes.shape
        if "gbq" not in self._packed:
            self._packed["gbq"] = self.const("GatherBlockQuantized_data", pack_pairs(q.codes))
            self._packed["gbq_s"] = self.const("GatherBlockQuantized_scales", q.scales.astype(np.float32))
            if not self.symmetric:
                zp = q.zero_points
                if zp.shape[1] % 2:
                    zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)
                self._packed["gbq_z"] = self.const("GatherBlockQuantized_zero_points", pack_pairs(zp))
        d, s, z = self._packed["gbq"], self._packed["gbq_s"], self._packed.get("gbq_z")
        node = use.node
        node.op, node.domain = "GatherBlockQuantized", "com.microsoft"
        _set_inputs(node, [d, node.inputs[1], s] + ([z] if z is not None else []))
        node.attrs = {"bits": 4, "block_size": int(q.block), "gather_axis": 0, "quantize_axis": 1}
        nbytes = d.values.nbytes + s.values.nbytes + (z.values.nbytes if z is not None else 0)
        return "GatherBlockQuantized", d.name, nbytes


def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    out: list[gs.Node] = []
    for n in nodes:
        if not any(n is o for o in out):
            out.append(n)
    return out


def _set_inputs(node: gs.Node, inputs: list[gs.Tensor]) -> None:
    """Replace all inputs of ``node`` (keeping graphsurgeon's consumer lists in sync)."""
    node.inputs.clear()
    node.inputs.extend(inputs)
