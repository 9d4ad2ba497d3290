"""The block-sparse backward kernels.

Two kernels, and with ``CONCURRENT`` (the default) a third before them:

* delta (``CONCURRENT``): every row's ``delta = rowsum(dO * O) - dlse`` (the
  LSE's own gradient enters the backward only here, SPEC section 4) and, with
  PRESCALE, the rounded prescaled q; without ``CONCURRENT`` the dQ kernel
  computes both for its rows first and stores them for the dK/dV kernel;
* dQ: one program per (query tile, batch x query head), walking the row's
  kv-side block lists (partial with mask_mod, then full);
* dK/dV: one program per (key tile, batch x kv head), looping over the G query
  heads of its kv head and walking the column's q-side block lists. It also
  scatters the gradients of learnable tensors read by the score mod, so that
  each allowed element contributes exactly once.

Probabilities are recomputed from the stored LSE (base 2 inside the kernels).

The dQ kernel runs the mods as ``Plan.backward_program`` and the dK/dV kernel as
``Plan.dkdv_program``, compiled for a loop over queries: a document mask keeps its id compare
there, where the dQ kernel takes its range test (``kernels.mods.DOCUMENT_RANGES``), and each
kernel reads its own program's tables (``Plan.buffer_args``). In bf16 and fp16 both are
compiled with the rounding of ``kernels.api.DTYPE_ROUNDING`` (as the forward's are when it
returns out alone), where a
softcap's tanh comes from exp2 and one reciprocal
(``kernels.mods.TANH_FAST_ERR``; 3e-7 absolute at most, against the 2**-8 to which P, dS and the
gradients are rounded): 9 instructions per score where Eigen's rational took 20, so that on
sm_90 the softcap's dQ loop went from 982 instructions per step to 629 and the dK/dV loop from
1,103 to 746 (docs/PERFORMANCE.md, twenty-second session).

With ``DQ_ATOMIC`` (off by default) there is no dQ kernel: after delta_kernel, the dK/dV kernel
also adds each tile's dS K into a float32 dQ with atomic adds (with ``DQ_ATOMIC_TMA`` on sm90, a
TMA descriptor's reduction of each tile).

With ``CONCURRENT`` on CUDA, the dQ kernel runs on a side stream beside the
dK/dV kernel (``SIDE_KERNEL``), so that one kernel's last wave overlaps the
other's work (the interpreter runs them in turn). The backward walks the block mask's own lists
(``Plan.backward_sparse``), not the forward's refined ones; on the GPU the dQ kernel's key
lists and the dK/dV kernel's query lists may each be refined to the kernel's own step
(``Plan.dq_sparse`` / ``Plan.dkdv_sparse``, ``kernels.api.AUTO_REFINE_BWD``), tiles unchanged.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl

from . import _runtime

from .forward import (LN2, LOG2E, cast, head_pads, list_bounds, list_start, load_tile, mma, next_listed,
                      next_listed_of_two, tma_descriptor, tma_ready, tma_rule)

# delta in a kernel of its own, then (on CUDA) the dQ kernel on a side stream beside the dK/dV
# kernel (the module docstring). Measured on the H200 (S=4k, D=128, bf16; docs/PERFORMANCE.md):
# the backward 0 to 4% faster on every mask row but one (sliding window, equal), 12% on GQA
# document (the dK/dV kernel has a quarter of the programs there, so dQ's tail mattered most).
CONCURRENT = True
DELTA_ROWS = 64  # query rows a delta_kernel program reduces

# Under CONCURRENT on CUDA, which kernel goes on the side stream: "dq" (the default) puts the dQ
# kernel on a side stream of default priority, launched first, and the dK/dV kernel on the
# caller's stream; "dkdv" puts the dK/dV kernel on a side stream of the highest priority and dQ
# on the caller's, so that the multiprocessors take dK/dV programs first whenever both kernels
# have programs waiting (PyTorch's single backward grid numbers its dK/dV programs first); None
# runs both on the caller's stream, dK/dV first. Measured on the H200 (S=1k, ten mask rows at
# D=128 and 64, five interleaved rounds; docs/PERFORMANCE.md, seventeenth session): "dkdv" and
# "dq" within the rounds' spread of each other on every row, None 2-4 % slower on the dense rows.
# "dkdv" stays a choice for measurement, not the default: a stream of the highest priority
# would also take the multiprocessors ahead of the caller's own concurrent work.
# One grid with the dK/dV programs first and the dQ programs after (PyTorch's order), delta_kernel
# still before it and no wait in the grid, lost to the two streams on the H100 (ab.py, 3 rounds,
# D=128; docs/PERFORMANCE.md, thirty-eighth session): backward 1.2 % slower on document at S=4k,
# 1.8 % at 1k, 3.7 % on GQA document at 4k, 1.7 % on causal at 4k. Its code is
# docs/perf/kv-first-grid-78920e3.diff, on 78920e3's dq_dkdv_kernel.
SIDE_KERNEL: Optional[str] = "dq"
SIDE_KERNELS = ("dkdv", "dq", None)

# DQ_ATOMIC: no dQ kernel; the dK/dV kernel adds each step's dQ share, dS K, into a float32 dQ
# with atomics (FlashAttention-2's and -3's way: five matrix products per score tile where the
# two kernels run seven, the dQ kernel recomputing S and dP), after delta_kernel. Off: on the
# H200 (docs/PERFORMANCE.md, twenty-first session; document, GQA document and softcap at S=4k
# and 16k, D=128) the backward took 1.07 to 1.32 times the default's, but for softcap at 16k
# (5 % faster). The interpreter's tests hold it to the oracle. bench.py's ``ours-dq-atomic``
# times it beside the default. At D=128 its dK/dV kernel spills (document at S=4k, REFINED_BWD's
# tiles: 360/412 bytes, 132,384 bytes of shared memory, one program a multiprocessor against two);
# at D=64 it does not (252 registers, 84,480 bytes: two, as the default's dK/dV kernel; sm_90,
# benchmarks/codegen.py, forty-first session). On the H100 (forty-second session, ab.py --pace gpu,
# docs/perf/h100-ab-atomic-and-scored-2026-12-07.txt) the default backward beat it by 19 to 27 % at
# D=64 and 19 to 75 % at D=128, with pointers or the TMA reduction below.
DQ_ATOMIC = False
# DQ_ATOMIC_TMA: under DQ_ATOMIC, each step's dQ share goes to the float32 dQ through a TMA
# descriptor's reduction (``tensor_descriptor.atomic_add``: one bulk ``cp.reduce.async`` of the
# tile from shared memory, FlashAttention-3's way) instead of one ``red.global.add`` per element.
# None (the default): on sm90 where the head dim needs no padding; True or False forces it on
# compiled kernels (Triton's interpreter has no descriptor reduction: the CPU runs the pointer
# adds). sm_90, S=4k (benchmarks/codegen.py --dq-atomic tma): D=64 document 251 registers, no
# spills, 92,672 bytes (two programs); D=128 on the default 8-warp tiles 255 registers and 0 (no
# mask) or 12 bytes (causal) of spills where the pointers spill 48 and 76; D=128 document on
# REFINED_BWD's 4-warp tiles still 204 bytes. On the H100 it passed its GPU test and ran 3 to 12 %
# faster than the pointer adds, still slower than the default's two kernels (forty-second session).
DQ_ATOMIC_TMA: Optional[bool] = None

# ptxas's register cap for the dK/dV kernel on the GPU (``maxnreg``; None: none, the default). A
# knob for measurement (benchmarks/ab.py --set): no rule sets it. At D=64 the kernel's 64 x 64
# tiles on 4 warps take 233 registers, two programs a multiprocessor by registers where shared
# memory (67,584 bytes) holds three; capped at 168 (three by registers) it spills 84/72 bytes on
# document and 324/264 on causal (sm_90, benchmarks/codegen.py). On the H100 (forty-first session,
# ab.py --pace gpu, 3 rounds; docs/perf/h100-ab-bwd-d64-2026-12-07.txt) the backward was 3 %
# faster on GQA document at S=16k and slower everywhere else: document 1.0 % (16k), 1.3 % (4k),
# 1.7 % (1k), GQA document at 4k 4.8 %, causal at 4k 31 %.
DKDV_MAXNREG: Optional[int] = None

# ONE_LOOP: the dQ kernel walks a query tile's partial and then full KV blocks in one loop, as
# ``kernels.forward.ONE_LOOP`` does the forward's. Off: it made the backward 1 to 6 % slower on all
# ten rows the H100 ran (docs/PERFORMANCE.md, twenty-third session) and on 13 of the 14 the H200
# ran (twenty-fifth session; 1.0 % faster on block_sparse at S=1k). The interpreter's tests hold
# it to the two loops bit for bit. Read when the forward runs. The dK/dV kernel keeps its two
# loops: at 255 registers, one loop compiled to more spills (sm_90, bf16, D=128, S=4k: softcap
# 220/164 bytes against 136/116, 81 spill instructions per trip against 17; causal 60/40 against
# none).
ONE_LOOP = False

# HEADS_IN_LOOP: where the block mask is one for every head (its H is 1) and G > 1, the dK/dV
# kernel walks all G query heads of its kv head in each of its two loops, the heads' steps one
# after another on each listed block, where it ran two loops per head. A program then pays for
# two pipeline prologues and drains instead of 2 G. The query heads' statistics, tiles and mods'
# head move with the step. The case it is for: GQA document, where a key tile of 128 lists about
# three query blocks of 128 at S=4k, so each of the G = 4 heads' loops ran some six 64-row steps
# between prologue and drain. Off: on the H200 (docs/PERFORMANCE.md, twenty-fifth session) the GQA
# document backward was only 0.9 % faster at S=4k and 1.9 % at 1k, the other rows unchanged; its
# GPU test passed, no GPU fuzz has run. sm_90, S=4k: no spills (80 bytes before, in the loop over
# heads), 425 instructions per full step against 403. The sums into dK and dV take another order
# (all heads' partial blocks, then all full ones).
HEADS_IN_LOOP = False

# DKDV_DP_FIRST: the dK/dV kernel's dP product issued before its dV product (``dkdv_tiles``), so
# that P's exp2 runs under dP and dS's arithmetic under dV (sm_90 SASS, document and softcap at
# S=1k: 32 MUFU a trip under a product in flight, against none with dV first, PyTorch's order).
# None (the default): where G = 1, but not on kernels.api.REFINED_BWD's 4-warp tiles (``dp_first``).
# On the H100 (docs/PERFORMANCE.md, thirtieth session; ab.py, 5 rounds) the backward was 3 to 6.5 %
# faster on none, causal, alibi and softcap (1k and 4k, D=128; 1.6 to 2.6 % at D=64) and unchanged
# on document, but 7 to 10 % slower on GQA document (G = 4), although ncu timed its dK/dV kernel
# alone 1 % faster (431 against 435 us), and the profiler's steps, with a warm L2, 1 % faster too
# (thirty-first session): the loss comes with the benchmarks' cold L2, not yet explained. On
# REFINED_BWD's tiles, dP first spilled document's dK/dV kernel 116/160 bytes against 52/52 with dV
# first, sliding window's 192/228 against 44/44 (sm_90, S=4k), and the backward was 4 to 5 % slower
# on sliding window, equal on document (H100, thirty-first session).
DKDV_DP_FIRST: Optional[bool] = None

# DQ_OWN_DELTA: under CONCURRENT with the dQ kernel on the side (SIDE_KERNEL "dq"), the dQ kernel
# computes its rows' delta and base-2 LSE itself (from O and dO, as without CONCURRENT, storing
# nothing) and starts at once, while delta_kernel runs beside it on the caller's stream, for the
# dK/dV kernel alone, which follows it there. delta_kernel reads O and dO once (about 50 us on the
# H100 at B*S = 16k, Hq*D = 2048), a time in which neither gradient kernel ran; now the dQ kernel's
# programs run through it. The dQ kernel's delta is summed in its own tile's order, so the two
# kernels may see deltas a rounding apart (each gradient is computed with one delta throughout).
# Off: on the H100 (docs/PERFORMANCE.md, thirty-first session; bench.py, 3 interleaved rounds, D=128)
# the backward was slower on every row timed: 2 to 3 % on document, 7 and 11 % on GQA document (1k,
# 4k), 2 to 3 % on sliding window, 2 to 4 % with no mask (8-warp dQ programs).
DQ_OWN_DELTA = False

# TMA_DQ: the dQ kernel reads its key and value tiles through TMA descriptors over [B, Hkv, S, D]
# (as kernels.forward.TMA_KV the forward's), where the tensors allow it (``tma_ready``). None (the
# default): on sm90 (``kernels.forward.tma_rule``); True or False forces it. sm_90 (document, S=4k,
# D=128): 173 registers against 234, 507 / 311 instructions a partial / full trip against 511 / 322.
# On the H100 (docs/PERFORMANCE.md, thirty-fifth session) the backward was 0 to 2 % faster on
# document, GQA document and causal at S=1k and 4k.
TMA_DQ = None
# TMA_DKDV: the dK/dV kernel reads its query and dO tiles through TMA descriptors over [B, Hq, L, D]
# (not with PRESCALE_QK). None (the default): on sm90 where the backward takes
# kernels.api.REFINED_BWD's tiles (64 x 64, 4 warps); True or False forces it. sm_90 (S=4k, D=128):
# document's kernel no longer spills (76 bytes before), GQA document's 92 / 100 against 328 / 336.
# On the H100 (thirty-fifth session) the backward was 2 to 3 % faster on those tiles (document and
# GQA document at 1k and 4k, causal at 1k), and 3 % slower on causal at 4k's default tiles (128-key
# programs on 8 warps).
TMA_DKDV = None


@triton.jit
def base2_scores(qk, SM_SCALE, PRESCALE: tl.constexpr):
    """Scores without a score mod in base 2, as the forward's LSE saw them: one multiply by
    ``scale * log2(e)``, which the caller's subtraction of the LSE fuses into one FMA per
    element (``(qk * scale) * log2(e)`` took a multiply and an FMA, and rounded twice). With
    PRESCALE ``qk`` already is ``q * scale * log2(e)`` against k, rounded as the forward's."""
    if PRESCALE:
        return qk
    else:
        return qk * (SM_SCALE * LOG2E)


@triton.jit
def dq_tiles(
    dq, q, do, lse2, delta,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    IDX, num_blocks, FIDX, num_part,
    off_z, off_h, m_mod, Q_LEN, KV_LEN, SM_SCALE,
    B0, B1, B2, B3,
    SCORE_FN: tl.constexpr, SCORE_BWD_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    IS_FULL: tl.constexpr, MIXED: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_KV: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr, CONTIGUOUS: tl.constexpr, PRESCALE: tl.constexpr,
    FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr, KV_UNIT: tl.constexpr = 0, TMA: tl.constexpr = False,
):
    """Accumulate sum_j ds[i, j] * K[j] over the row's listed KV blocks (q, do stay in SRAM).

    With PRESCALE, ``q`` is the forward's pre-scaled, rounded ``q * scale * log2(e)``,
    so that P is recomputed exactly as the forward's LSE saw it. MIXED (``ONE_LOOP``): one loop
    over the partial list and then the full one, as ``forward_tiles``. KV_UNIT: as
    ``forward_tiles``'s (the shifted windows list each window's first key).
    """
    TILES: tl.constexpr = SPARSE_KV // BLOCK_N
    UNIT: tl.constexpr = SPARSE_KV if KV_UNIT == 0 else KV_UNIT
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)
    first, f_first, kv_block = list_start(IDX, FIDX, num_part, MIXED)
    # One flat loop over every tile of every listed block (the pipeliner then
    # prefetches across block boundaries; the next block is carried, see next_listed).
    for it in range(0, num_blocks * TILES):
        offs_n = kv_block * UNIT + (it % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_block_now = kv_block
        if MIXED:
            kv_block = next_listed_of_two(IDX, FIDX, first, f_first, it, num_part, num_blocks, TILES, CONTIGUOUS)
        else:
            kv_block = next_listed(IDX, first, it, num_blocks, TILES, CONTIGUOUS)
        if TMA:
            # TMA descriptors over [B, Hkv, S, D]; stride_kn and stride_kd carry the key head's
            # batch and head (dq_kernel). Rows past S come back zero.
            start_n = kv_block_now * UNIT + (it % TILES) * BLOCK_N
            kT = tl.trans(K.load([stride_kn, stride_kd, start_n, 0]).reshape(BLOCK_N, QK_PAD))
            vT = tl.trans(V.load([stride_vn, stride_vd, start_n, 0]).reshape(BLOCK_N, V_PAD))
        else:
            kT = load_tile(K, offs_d, offs_n, stride_kd, stride_kn, QK_DIM, KV_LEN,
                           QK_DIM != QK_PAD, not KV_DIVISIBLE)
            vT = load_tile(V, offs_v, offs_n, stride_vd, stride_vn, V_DIM, KV_LEN,
                           V_DIM != V_PAD, not KV_DIVISIBLE)
        n2 = offs_n[None, :]
        if KV_DIVISIBLE:
            n_mod = n2
        else:
            n_mod = n2 % KV_LEN
        qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_PRECISION, UPCAST)
        if HAS_SCORE:
            # The mods take the score as qk and its scale (kernels.mods._Scaled).
            if PRESCALE:
                scale = LN2
            else:
                scale = SM_SCALE
            t2 = SCORE_FN(qk, scale, off_z, off_h, m_mod, n_mod, B0, B1, B2, B3) * LOG2E
        else:
            t2 = base2_scores(qk, SM_SCALE, PRESCALE)
        keep = n2 < KV_LEN
        if MIXED:
            # As a full block, then the mask behind a branch on a partial block's step alone (see
            # forward_tiles); keep takes the tile's shape first, which the branch's must match.
            if KV_DIVISIBLE:
                p = tl.math.exp2(t2 - lse2[:, None])
            else:
                p = tl.where(keep, tl.math.exp2(t2 - lse2[:, None]), 0.0)
            keep = tl.broadcast_to(keep, [BLOCK_M, BLOCK_N])
            if it < num_part * TILES:
                keep = keep & MASK_FN(off_z, off_h, m_mod, n_mod, B0, B1, B2, B3)
                p = tl.where(keep, p, 0.0)
        else:
            if not IS_FULL:
                keep = keep & MASK_FN(off_z, off_h, m_mod, n_mod, B0, B1, B2, B3)
            if IS_FULL and KV_DIVISIBLE:
                # Every element of a full block is allowed (rows past L are never stored).
                p = tl.math.exp2(t2 - lse2[:, None])
            else:
                p = tl.where(keep, tl.math.exp2(t2 - lse2[:, None]), 0.0)
        if HAS_SCORE:
            # The score mods' backward with no buffer gradients (the dK/dV kernel adds those) is
            # dt times d t / d s, linear in dt: P times that factor now, and ds = (P t') (dP -
            # delta) after the product, so that s and the mods' values (the fast tanh's r) do not
            # live across it.
            pg = SCORE_BWD_FN(qk, scale, p, off_z, off_h, m_mod, n_mod, keep, B0, B1, B2, B3,
                              B0, B1, B2, B3, False)
        else:
            pg = p
        dp = mma(do, vT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_PRECISION, UPCAST)
        ds = pg * (dp - delta[:, None])
        dq = mma(cast(ds, kT.dtype, UPCAST), tl.trans(kT), dq, FP32_PRECISION, UPCAST)
    return dq


@triton.jit
def dkdv_tiles(
    dk, dv, k, v,
    Q, QS, DO, LSE2, DELTA, stride_qm, stride_qd, stride_qsm, stride_qsd, stride_dom, stride_dod,
    stride_qh, stride_qsh, stride_doh,
    DQA, IDX, num_blocks,
    off_z, off_h, offs_n, n_mod, Q_LEN, KV_LEN, SM_SCALE,
    B0, B1, B2, B3, G0, G1, G2, G3,
    SCORE_FN: tl.constexpr, SCORE_BWD_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    GRAD_BUFFERS: tl.constexpr, IS_FULL: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, CONTIGUOUS: tl.constexpr, PRESCALE: tl.constexpr,
    FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr, DQ_ATOMIC: tl.constexpr, HEADS: tl.constexpr = 1,
    DP_FIRST: tl.constexpr = False, Q_UNIT: tl.constexpr = 0, TMA: tl.constexpr = False,
    DQ_TMA: tl.constexpr = False,
):
    """Accumulate dK and dV over one query head's listed Q blocks (k, v stay in SRAM); with
    DQ_ATOMIC also add each tile's dQ share, dS K * scale, into the float32 rows of ``DQA``
    (the head's contiguous ``[Q_LEN, QK_DIM]`` accumulator; with DQ_TMA a TMA descriptor over
    the whole ``[B, HQ, Q_LEN, QK_DIM]`` one, reduced into by the step's batch and head).

    Tiles are transposed: rows are keys ``[BLOCK_N]``, columns are queries ``[BLOCK_M]``.
    With PRESCALE, ``QS`` holds the forward's rounded ``q * scale * log2(e)`` (the dQ
    kernel writes it), loaded as a tile of its own: computing it here from the ``qT``
    tile that dK's product also reads put one loaded tile in registers and in a matrix
    product at once, which Triton 3.6's pipeliner miscompiles on Hopper (num_stages > 1:
    dK wrong by up to 100 times its tolerance, run to run different; found by the H200
    false-alarm count, ``tests/cases/prescale-dk-pipeline-race-*.json``; Triton issue 6691
    has the same pattern). Every tile this loop loads now feeds matrix products only.

    HEADS > 1 (``HEADS_IN_LOOP``): one loop over ``HEADS`` query heads that share the list, heads
    ``off_h`` to ``off_h + HEADS - 1``. Each listed block takes ``TILES`` steps for each head in
    turn; the pointers, the rows' statistics and the mods' head move with the step's head
    (``stride_qh``, ``stride_qsh``, ``stride_doh``; ``Q_LEN`` rows of statistics per head).

    Q_UNIT: the queries a list entry counts in; 0, the block's own length (SPARSE_Q). Windows of
    queries (``kernels.api._shifted_q``) list each window's first query in units of Q_UNIT
    (``kernels.api.SHIFT_UNIT_Q``, 16).
    """
    TILES: tl.constexpr = SPARSE_Q // BLOCK_M
    UNIT: tl.constexpr = SPARSE_Q if Q_UNIT == 0 else Q_UNIT
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)
    first = tl.load(IDX)
    q_block = first
    # One flat loop over every tile of every listed block (the pipeliner then
    # prefetches across block boundaries; the next block is carried, see next_listed).
    for it in range(0, num_blocks * TILES * HEADS):
        start_m = q_block * UNIT + (it % TILES) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_block = next_listed(IDX, first, it, num_blocks, TILES * HEADS, CONTIGUOUS)
        if HEADS > 1:
            g = (it // TILES) % HEADS  # the step's head, off_h + g
            h = off_h + g
            g = g.to(tl.int64)
            if TMA:
                Q_h, DO_h = Q, DO
            else:
                Q_h = Q + g * stride_qh
                DO_h = DO + g * stride_doh
            QS_h = QS + g * stride_qsh
            LSE2_h = LSE2 + g * Q_LEN
            DELTA_h = DELTA + g * Q_LEN
            if DQ_TMA:
                DQA_h = DQA
            else:
                DQA_h = DQA + g * Q_LEN * QK_DIM
        else:
            h = off_h
            Q_h, QS_h, DO_h, LSE2_h, DELTA_h, DQA_h = Q, QS, DO, LSE2, DELTA, DQA
        if TMA:
            # Q and DO are TMA descriptors over [B, Hq, L, D] (the step's head h); rows past L
            # come back zero.
            qT = tl.trans(Q.load([off_z, h, start_m, 0]).reshape(BLOCK_M, QK_PAD))
            do = DO.load([off_z, h, start_m, 0]).reshape(BLOCK_M, V_PAD)
        else:
            qT = load_tile(Q_h, offs_d, offs_m, stride_qd, stride_qm, QK_DIM, Q_LEN,
                           QK_DIM != QK_PAD, not Q_DIVISIBLE)
            do = load_tile(DO_h, offs_m, offs_v, stride_dom, stride_dod, Q_LEN, V_DIM,
                           not Q_DIVISIBLE, V_DIM != V_PAD)
        # LSE2: the LSE in base 2, a fully masked row's -inf as 0 (row_lse2), made once per
        # row rather than once per key tile here (a multiply, a compare and a select for
        # each of a thread's columns, each step: 48 of the full-block loop's 456 sm_90 instructions
        # at D=128). With base2_scores: a 3 to 8 % faster backward at D=64 on the H200 (none,
        # causal, GQA causal), no change at D=128 (docs/PERFORMANCE.md, fifteenth session).
        if Q_DIVISIBLE:
            lse2 = tl.load(LSE2_h + offs_m)
            delta = tl.load(DELTA_h + offs_m)
        else:
            lse2 = tl.load(LSE2_h + offs_m, mask=offs_m < Q_LEN, other=0.0)
            delta = tl.load(DELTA_h + offs_m, mask=offs_m < Q_LEN, other=0.0)
        m2 = offs_m[None, :]
        if Q_DIVISIBLE:
            m_mod = m2
        else:
            m_mod = m2 % Q_LEN
        if PRESCALE:
            # Scores from the forward's rounded q * scale * log2(e); dK still uses q itself.
            q_scaled = load_tile(QS_h, offs_d, offs_m, stride_qsd, stride_qsm, QK_DIM, Q_LEN,
                                 QK_DIM != QK_PAD, not Q_DIVISIBLE)
            qkT = mma(k, q_scaled, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_PRECISION, UPCAST)
        else:
            qkT = mma(k, qT, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_PRECISION, UPCAST)
        if HAS_SCORE:
            # The mods take the score as qk and its scale (kernels.mods._Scaled).
            if PRESCALE:
                scale = LN2
            else:
                scale = SM_SCALE
            tT2 = SCORE_FN(qkT, scale, off_z, h, m_mod, n_mod, B0, B1, B2, B3) * LOG2E
        else:
            tT2 = base2_scores(qkT, SM_SCALE, PRESCALE)
        keep = (m2 < Q_LEN) & (offs_n[:, None] < KV_LEN)
        if not IS_FULL:
            keep = keep & MASK_FN(off_z, h, m_mod, n_mod, B0, B1, B2, B3)
        if IS_FULL and Q_DIVISIBLE and KV_DIVISIBLE:
            # Every element of a full block is allowed; keep only guards the tables' gradients.
            pT = tl.math.exp2(tT2 - lse2[None, :])
        else:
            pT = tl.where(keep, tl.math.exp2(tT2 - lse2[None, :]), 0.0)
        if HAS_SCORE and not GRAD_BUFFERS:
            # Without buffer gradients the score mods' backward is dt times d t / d s, linear in
            # dt: P times that factor now, so that s and the mods' values die before the two
            # products rather than live across them (see dq_tiles).
            pgT = SCORE_BWD_FN(qkT, scale, pT, off_z, h, m_mod, n_mod, keep, B0, B1, B2, B3,
                               G0, G1, G2, G3, False)
        if DP_FIRST:
            # dP before dV (DKDV_DP_FIRST): on sm_90 the warpgroup products run in issue order and
            # only the accumulating ones (dV, dK) stay in flight past a wait. With dV first, dP
            # waited behind it and nothing overlapped the products; with dP first, ptxas issues
            # dP's wgmma before P's exp2 (they do not depend on each other), the exponentials run
            # under it, and dV, issued after dP's wait, runs under dS's arithmetic.
            dpT = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_PRECISION, UPCAST)
            dv = mma(cast(pT, do.dtype, UPCAST), do, dv, FP32_PRECISION, UPCAST)
        else:
            dv = mma(cast(pT, do.dtype, UPCAST), do, dv, FP32_PRECISION, UPCAST)
            dpT = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_PRECISION, UPCAST)
        if HAS_SCORE and not GRAD_BUFFERS:
            dsT = pgT * (dpT - delta[None, :])
        elif HAS_SCORE:
            dtT = pT * (dpT - delta[None, :])
            dsT = SCORE_BWD_FN(qkT, scale, dtT, off_z, h, m_mod, n_mod, keep, B0, B1, B2, B3,
                               G0, G1, G2, G3, GRAD_BUFFERS)
        else:
            dsT = pT * (dpT - delta[None, :])
        dk = mma(cast(dsT, qT.dtype, UPCAST), tl.trans(qT), dk, FP32_PRECISION, UPCAST)
        if DQ_ATOMIC:
            # dS's rows and columns past L or S are 0 (pT is, or is exp2 of a full block's
            # in-range scores); the rows past L are not added.
            dq = mma(tl.trans(cast(dsT, qT.dtype, UPCAST)), k,
                     tl.zeros([BLOCK_M, QK_PAD], dtype=tl.float32), FP32_PRECISION, UPCAST)
            if DQ_TMA:
                # Rows past Q_LEN fall outside the descriptor's shape: TMA drops them.
                DQA_h.atomic_add([off_z, h, start_m, 0], (dq * SM_SCALE).reshape(1, 1, BLOCK_M, QK_PAD))
            else:
                dq_ptrs = DQA_h + offs_m[:, None].to(tl.int64) * QK_DIM + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq * SM_SCALE,
                              mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def row_delta(do, O, DLSE, stat, offs_m, offs_v, stride_om, stride_od, Q_LEN, V_DIM: tl.constexpr,
              V_PAD: tl.constexpr, Q_DIVISIBLE: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dlse in float32 for the rows offs_m (the LSE's own gradient
    enters the backward only here, SPEC section 4)."""
    o = load_tile(O, offs_m, offs_v, stride_om, stride_od, Q_LEN, V_DIM, not Q_DIVISIBLE, V_DIM != V_PAD)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + stat, mask=offs_m < Q_LEN, other=0.0)
    return delta


@triton.jit
def row_lse2(LSE, stat, offs_m, Q_LEN):
    """The rows' LSE in base 2, as P = exp2(score2 - lse2) needs it. A fully masked row has
    lse = -inf and no allowed element: any finite shift gives p = 0, so it becomes 0."""
    lse2 = tl.load(LSE + stat, mask=offs_m < Q_LEN, other=0.0) * LOG2E
    return tl.where(lse2 == float("-inf"), 0.0, lse2)


@triton.jit
def delta_kernel(
    Q, DO, OUT, DLSE, DELTA, QS, LSE, LSE2,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_qsz, stride_qsh, stride_qsm, stride_qsd,
    SM_SCALE, HQ, Q_LEN,
    HAS_DLSE: tl.constexpr, PRESCALE: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, Q_DIVISIBLE: tl.constexpr, UPCAST: tl.constexpr,
):
    """The dQ kernel's first step on its own (``CONCURRENT``): every row's delta, its LSE in
    base 2 and, with PRESCALE, the rounded ``q * scale * log2(e)`` the dK/dV kernel reads."""
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)
    stat = pid_zh.to(tl.int64) * Q_LEN + offs_m
    do = load_tile(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh,
                   offs_m, offs_v, stride_dom, stride_dod, Q_LEN, V_DIM, not Q_DIVISIBLE, V_DIM != V_PAD)
    delta = row_delta(do, OUT + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh, DLSE, stat,
                      offs_m, offs_v, stride_om, stride_od, Q_LEN, V_DIM, V_PAD, Q_DIVISIBLE, HAS_DLSE)
    tl.store(DELTA + stat, delta, mask=offs_m < Q_LEN)
    tl.store(LSE2 + stat, row_lse2(LSE, stat, offs_m, Q_LEN), mask=offs_m < Q_LEN)
    if PRESCALE:
        q = load_tile(Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh,
                      offs_m, offs_d, stride_qm, stride_qd, Q_LEN, QK_DIM, not Q_DIVISIBLE, QK_DIM != QK_PAD)
        q = cast(q.to(tl.float32) * (SM_SCALE * LOG2E), Q.dtype.element_ty, UPCAST)
        qs_ptrs = (QS + off_z.to(tl.int64) * stride_qsz + off_h.to(tl.int64) * stride_qsh
                   + offs_m[:, None] * stride_qsm + offs_d[None, :] * stride_qsd)
        tl.store(qs_ptrs, q, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_DIM))


@triton.jit
def dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, OUT, DLSE, QS, LSE2,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    B0, B1, B2, B3,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_qsz, stride_qsh, stride_qsm, stride_qsd,
    SM_SCALE, HQ, Q_LEN, KV_LEN, ZKV, SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, NUM_KV_SPARSE,
    SCORE_FN: tl.constexpr, SCORE_BWD_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    HAS_FULL: tl.constexpr, HAS_DLSE: tl.constexpr, DELTA_READY: tl.constexpr, G: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, CONTIGUOUS: tl.constexpr,
    PRESCALE: tl.constexpr, FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ONE_LOOP: tl.constexpr = False,
    STORE_STATS: tl.constexpr = True, KV_UNIT: tl.constexpr = 0, PART_KV_DIVISIBLE: tl.constexpr = True,
    TMA: tl.constexpr = False,
):
    # Without DELTA_READY the program computes its rows' delta (and, with PRESCALE, the prescaled
    # q) and with STORE_STATS stores them, with the base-2 LSE, for the dK/dV kernel launched next;
    # without STORE_STATS (DQ_OWN_DELTA) delta_kernel does that beside it.
    # Query tiles run last-first: under a causal mask the last tiles have the
    # most blocks, and starting them first leaves the short ones for the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_zh = tl.program_id(1)
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    off_zkv = off_z % ZKV
    off_hkv = off_h // G
    Q += off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    DO += off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
    if TMA:
        # The descriptors' coordinates of the key head (dq_tiles reads them from the strides).
        stride_kn = off_zkv
        stride_kd = off_hkv
        stride_vn = off_zkv
        stride_vd = off_hkv
    else:
        K += off_zkv.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
        V += off_zkv.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)
    q = load_tile(Q, offs_m, offs_d, stride_qm, stride_qd, Q_LEN, QK_DIM, not Q_DIVISIBLE, QK_DIM != QK_PAD)
    do = load_tile(DO, offs_m, offs_v, stride_dom, stride_dod, Q_LEN, V_DIM, not Q_DIVISIBLE, V_DIM != V_PAD)
    stat = pid_zh.to(tl.int64) * Q_LEN + offs_m
    lse2 = row_lse2(LSE, stat, offs_m, Q_LEN)
    if DELTA_READY:  # delta_kernel computed delta and the prescaled q (CONCURRENT)
        delta = tl.load(DELTA + stat, mask=offs_m < Q_LEN, other=0.0)
    else:
        # delta fused here: as separate eager ops it moved ~7x the bytes of O and dO through
        # float32 temporaries (about 0.2 ms at 16k x 2048).
        delta = row_delta(do, OUT + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh, DLSE,
                          stat, offs_m, offs_v, stride_om, stride_od, Q_LEN, V_DIM, V_PAD, Q_DIVISIBLE, HAS_DLSE)
        if STORE_STATS:
            # The dK/dV kernel, launched next, reads every row's delta and base-2 LSE.
            tl.store(DELTA + stat, delta, mask=offs_m < Q_LEN)
            tl.store(LSE2 + stat, lse2, mask=offs_m < Q_LEN)
    if PRESCALE:
        q = cast(q.to(tl.float32) * (SM_SCALE * LOG2E), Q.dtype.element_ty, UPCAST)
        if not DELTA_READY and STORE_STATS:
            # For the dK/dV kernel, launched next (see dkdv_tiles).
            qs_ptrs = (QS + off_z.to(tl.int64) * stride_qsz + off_h.to(tl.int64) * stride_qsh
                       + offs_m[:, None] * stride_qsm + offs_d[None, :] * stride_qsd)
            tl.store(qs_ptrs, q, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_DIM))
    if Q_DIVISIBLE:
        m_mod = offs_m[:, None]
    else:
        m_mod = offs_m[:, None] % Q_LEN

    q_block = (pid_m * BLOCK_M) // SPARSE_Q
    row = ((off_z % SPARSE_Z) * SPARSE_H + off_h % SPARSE_H) * NUM_Q_SPARSE + q_block
    dq = tl.zeros([BLOCK_M, QK_PAD], dtype=tl.float32)
    part_idx = KV_IDX + row.to(tl.int64) * NUM_KV_SPARSE
    n_part = tl.load(KV_NUM + row)
    if ONE_LOOP and HAS_FULL:
        dq = dq_tiles(
            dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            part_idx, n_part + tl.load(FULL_NUM + row), FULL_IDX + row.to(tl.int64) * NUM_KV_SPARSE, n_part,
            off_z, off_h, m_mod, Q_LEN, KV_LEN, SM_SCALE, B0, B1, B2, B3,
            SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, False, True,
            QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
            PART_KV_DIVISIBLE, CONTIGUOUS, PRESCALE, FP32_PRECISION, UPCAST, KV_UNIT, TMA,
        )
    else:
        dq = dq_tiles(
            dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            part_idx, n_part, part_idx, n_part,
            off_z, off_h, m_mod, Q_LEN, KV_LEN, SM_SCALE, B0, B1, B2, B3,
            SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, False, False,
            QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
            PART_KV_DIVISIBLE, CONTIGUOUS, PRESCALE, FP32_PRECISION, UPCAST, KV_UNIT, TMA,
        )
        if HAS_FULL:
            full_idx = FULL_IDX + row.to(tl.int64) * NUM_KV_SPARSE
            n_full = tl.load(FULL_NUM + row)
            dq = dq_tiles(
                dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                full_idx, n_full, full_idx, n_full,
                off_z, off_h, m_mod, Q_LEN, KV_LEN, SM_SCALE, B0, B1, B2, B3,
                SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, True, False,
                QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
                KV_DIVISIBLE, CONTIGUOUS, PRESCALE, FP32_PRECISION, UPCAST, KV_UNIT, TMA,
            )
    dq = dq * SM_SCALE
    ptrs = (DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
            + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(ptrs, cast(dq, DQ.dtype.element_ty, UPCAST), mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_DIM))


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA, QS, DQA,
    Q_NUM, Q_IDX, FULL_NUM, FULL_IDX,
    B0, B1, B2, B3, G0, G1, G2, G3,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    stride_qsz, stride_qsh, stride_qsm, stride_qsd,
    SM_SCALE, HQ, HKV, Q_LEN, KV_LEN, ZKV, SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, NUM_KV_SPARSE,
    SCORE_FN: tl.constexpr, SCORE_BWD_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    GRAD_BUFFERS: tl.constexpr, HAS_FULL: tl.constexpr, G: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, CONTIGUOUS: tl.constexpr,
    PRESCALE: tl.constexpr, FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    HEADS: tl.constexpr = 1, DP_FIRST: tl.constexpr = False, Q_UNIT: tl.constexpr = 0,
    PART_Q_DIVISIBLE: tl.constexpr = True, TMA: tl.constexpr = False, DQ_TMA: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_zh = tl.program_id(1)  # (query batch, kv head)
    off_z = pid_zh // HKV
    off_hkv = pid_zh % HKV
    off_zkv = off_z % ZKV
    K += off_zkv.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    V += off_zkv.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)
    k = load_tile(K, offs_n, offs_d, stride_kn, stride_kd, KV_LEN, QK_DIM, not KV_DIVISIBLE, QK_DIM != QK_PAD)
    v = load_tile(V, offs_n, offs_v, stride_vn, stride_vd, KV_LEN, V_DIM, not KV_DIVISIBLE, V_DIM != V_PAD)
    if KV_DIVISIBLE:
        n_mod = offs_n[:, None]
    else:
        n_mod = offs_n[:, None] % KV_LEN
    kv_block = (pid_n * BLOCK_N) // SPARSE_KV

    dk = tl.zeros([BLOCK_N, QK_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, V_PAD], dtype=tl.float32)
    # k and v stay in SRAM while every query head of this kv head passes by: one head at a time,
    # or with HEADS = G (HEADS_IN_LOOP, every head on one list) all G in each loop.
    for g in range(0, G // HEADS):
        off_h = off_hkv * G + g * HEADS
        if TMA:
            q_ptr, do_ptr = Q, DO  # descriptors; dkdv_tiles reads the batch and head itself
        else:
            q_ptr = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
            do_ptr = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        qs_ptr = QS + off_z.to(tl.int64) * stride_qsz + off_h.to(tl.int64) * stride_qsh
        stat = (off_z * HQ + off_h).to(tl.int64) * Q_LEN
        if DQ_TMA:
            dqa_ptr = DQA  # a descriptor; dkdv_tiles reduces into the step's batch and head
        else:
            dqa_ptr = DQA + stat * QK_DIM  # with DQ_ATOMIC: the head's float32 dQ, [Q_LEN, QK_DIM]
        col = ((off_z % SPARSE_Z) * SPARSE_H + off_h % SPARSE_H) * NUM_KV_SPARSE + kv_block
        dk, dv = dkdv_tiles(
            dk, dv, k, v, q_ptr, qs_ptr, do_ptr, LSE2 + stat, DELTA + stat,
            stride_qm, stride_qd, stride_qsm, stride_qsd, stride_dom, stride_dod,
            stride_qh, stride_qsh, stride_doh,
            dqa_ptr, Q_IDX + col.to(tl.int64) * NUM_Q_SPARSE, tl.load(Q_NUM + col),
            off_z, off_h, offs_n, n_mod, Q_LEN, KV_LEN, SM_SCALE,
            B0, B1, B2, B3, G0, G1, G2, G3,
            SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, GRAD_BUFFERS, False,
            QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_Q,
            PART_Q_DIVISIBLE, KV_DIVISIBLE, CONTIGUOUS, PRESCALE, FP32_PRECISION, UPCAST, DQ_ATOMIC, HEADS, DP_FIRST,
            Q_UNIT, TMA, DQ_TMA,
        )
        if HAS_FULL:
            dk, dv = dkdv_tiles(
                dk, dv, k, v, q_ptr, qs_ptr, do_ptr, LSE2 + stat, DELTA + stat,
                stride_qm, stride_qd, stride_qsm, stride_qsd, stride_dom, stride_dod,
                stride_qh, stride_qsh, stride_doh,
                dqa_ptr, FULL_IDX + col.to(tl.int64) * NUM_Q_SPARSE, tl.load(FULL_NUM + col),
                off_z, off_h, offs_n, n_mod, Q_LEN, KV_LEN, SM_SCALE,
                B0, B1, B2, B3, G0, G1, G2, G3,
                SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, GRAD_BUFFERS, True,
                QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_Q,
                Q_DIVISIBLE, KV_DIVISIBLE, CONTIGUOUS, PRESCALE, FP32_PRECISION, UPCAST, DQ_ATOMIC, HEADS, DP_FIRST,
                Q_UNIT, TMA, DQ_TMA,
            )
    dk = dk * SM_SCALE
    n_ok = offs_n[:, None] < KV_LEN
    dk_ptrs = (DK + off_z.to(tl.int64) * stride_dkz + off_hkv.to(tl.int64) * stride_dkh
               + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    tl.store(dk_ptrs, cast(dk, DK.dtype.element_ty, UPCAST), mask=n_ok & (offs_d[None, :] < QK_DIM))
    dv_ptrs = (DV + off_z.to(tl.int64) * stride_dvz + off_hkv.to(tl.int64) * stride_dvh
               + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvd)
    tl.store(dv_ptrs, cast(dv, DV.dtype.element_ty, UPCAST), mask=n_ok & (offs_v[None, :] < V_DIM))


def run_backward(plan, query, key, value, out, lse, dout, dlse, *, need_buffer_grads: bool,
                 concurrent: Optional[bool] = None, side: Optional[str] = "default",
                 dq_atomic: Optional[bool] = None, one_loop: Optional[bool] = None,
                 heads_in_loop: Optional[bool] = None, dp_first_flag: Optional[bool] = "module",
                 dq_own_delta: Optional[bool] = None, tma: Optional[tuple] = None):
    """Gradients for q, k, v and the learnable tensors of the score mod (in slot order).
    ``concurrent`` (default: ``CONCURRENT``) takes delta_kernel and, on CUDA, the side stream;
    ``side`` (default: ``SIDE_KERNEL``) which kernel runs there; ``dq_atomic`` (default:
    ``DQ_ATOMIC``) replaces the dQ kernel by the dK/dV kernel's atomic adds (after delta_kernel,
    on the caller's stream); ``one_loop`` (default: ``ONE_LOOP``) walks the dQ kernel's two lists
    in one loop; ``heads_in_loop`` (default: ``HEADS_IN_LOOP``) walks a kv head's G query heads in
    the dK/dV kernel's loops together where the block mask has one head; ``dp_first_flag`` (default:
    ``DKDV_DP_FIRST`` as it is now; None: the rule, ``dp_first``) issues the dK/dV kernel's dP
    before dV; ``dq_own_delta`` (default: ``DQ_OWN_DELTA``) lets the dQ kernel compute its own
    delta and run beside delta_kernel (under ``concurrent`` with the dQ kernel on the side);
    ``tma`` (default: ``(TMA_DQ, TMA_DKDV)``) reads the dQ kernel's key and value tiles and the
    dK/dV kernel's query and dO tiles through TMA descriptors, where the tensors allow it."""
    import torch

    side = SIDE_KERNEL if side == "default" else side
    if side not in SIDE_KERNELS:
        raise ValueError(f"Expected the backward's side kernel in {SIDE_KERNELS}, got {side!r}.")
    tma_dq, tma_dkdv = (TMA_DQ, TMA_DKDV) if tma is None else tma
    tma_dq, tma_dkdv = tma_rule(tma_dq, plan, query.device), tma_dkdv_rule(tma_dkdv, plan, query.device)

    from .api import _empty_like_layout

    B, Hq, Hkv, L, S, E, Ev = plan.B, plan.Hq, plan.Hkv, plan.L, plan.S, plan.E, plan.Ev
    opt, prog = plan.options, plan.backward_program
    dev = query.device
    if dout is None:
        dout = torch.zeros_like(out)
    # Written by the dQ kernel (rowsum(dO * O) - dlse), read by the dK/dV kernel.
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    # The LSE in base 2 with -inf as 0 (row_lse2), for the dK/dV kernel; written beside delta.
    lse2 = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    dlse = dlse.float().contiguous() if dlse is not None else None
    lse = lse.contiguous()

    dq = _empty_like_layout(query, (B, Hq, L, E), query.dtype)
    # With PRESCALE the dQ kernel stores q * scale * log2(e), rounded, for the dK/dV kernel
    # (see dkdv_tiles); without, nothing reads it.
    qs = torch.empty((B, Hq, L, E), dtype=query.dtype, device=dev) if opt.prescale else query
    # Bk == 1: each query batch writes its own float32 dK/dV, summed afterwards.
    broadcast = plan.Bk == 1 and B > 1
    if broadcast:
        dk = torch.empty((B, Hkv, S, E), dtype=torch.float32, device=dev)
        dv = torch.empty((B, Hkv, S, Ev), dtype=torch.float32, device=dev)
    else:
        dk = _empty_like_layout(key, (B, Hkv, S, E), key.dtype)
        dv = _empty_like_layout(value, (B, Hkv, S, Ev), value.dtype)
    grads = [torch.zeros(t.numel(), dtype=torch.float32, device=dev) if k in prog.learnable else None
             for k, t in enumerate(prog.buffers)]
    # The dK/dV kernel adds the learnable tables' gradients, in the slots its own program gives
    # them (its tables differ from the dQ kernel's where one reads a document mask's ranges).
    kv_prog = plan.dkdv_program
    by_table = {id(t): g for t, g in zip(prog.buffers, grads) if g is not None}
    grad_args = [by_table.get(id(t), lse) for t in kv_prog.buffers] + [lse] * (4 - len(kv_prog.buffers))
    if len(by_table) != sum(id(t) in by_table for t in kv_prog.buffers):
        raise RuntimeError("The dK/dV kernel's mods lack a learnable table of the dQ kernel's; "
                           "this is a bug in kernels.mods.")

    qk_pad, v_pad = head_pads(E, Ev)
    common = dict(
        SCORE_FN=prog.score_fn, SCORE_BWD_FN=prog.score_bwd_fn, MASK_FN=prog.mask_fn,
        HAS_SCORE=prog.has_score, G=plan.G,
        QK_DIM=E, V_DIM=Ev, QK_PAD=qk_pad, V_PAD=v_pad,
        CONTIGUOUS=opt.contiguous, PRESCALE=opt.prescale,
        FP32_PRECISION=plan.fp32_precision, UPCAST=plan.interpret,
        num_warps=opt.bwd.num_warps, num_stages=opt.bwd.num_stages,
    )
    one_loop = ONE_LOOP if one_loop is None else one_loop
    heads_in_loop = HEADS_IN_LOOP if heads_in_loop is None else heads_in_loop
    # None is a choice here (the G rule), so "module" stands for the flag as it is now.
    dp_first_flag = DKDV_DP_FIRST if dp_first_flag == "module" else dp_first_flag
    tiles = opt.bwd.tiles
    bufs, kv_bufs = plan.buffer_args(query, "dq"), plan.buffer_args(query, "dkdv")

    # Under the interpreter (no streams) CONCURRENT still takes delta_kernel and DELTA_READY:
    # the CPU tests check that path against the fused one.
    concurrent = CONCURRENT if concurrent is None else concurrent
    dq_atomic = DQ_ATOMIC if dq_atomic is None else dq_atomic
    # With DQ_ATOMIC the dK/dV kernel adds dQ into float32 rows [B, Hq, L, E], zeroed here
    # (through a TMA descriptor over them with DQ_ATOMIC_TMA, where the head dim needs no padding).
    dqa = torch.zeros((B, Hq, L, E), dtype=torch.float32, device=dev) if dq_atomic else lse
    dq_tma = dq_atomic and E == qk_pad and not plan.interpret and tma_rule(DQ_ATOMIC_TMA, plan, dev)
    dqa_arg = tma_descriptor(dqa, [1, 1, tiles["BLOCK_M1"], qk_pad]) if dq_tma else dqa
    dq_own_delta = DQ_OWN_DELTA if dq_own_delta is None else dq_own_delta
    own_delta = dq_own_delta and concurrent and not dq_atomic and side == "dq"

    def launch_delta():
        _runtime.launch(
            delta_kernel, (_runtime.cdiv(L, DELTA_ROWS), B * Hq),
            query, dout, out, dlse if dlse is not None else lse, delta, qs, lse, lse2,
            *query.stride(), *dout.stride(), *out.stride(), *qs.stride(), plan.scale, Hq, L,
            HAS_DLSE=dlse is not None, PRESCALE=opt.prescale, QK_DIM=E, V_DIM=Ev, QK_PAD=qk_pad, V_PAD=v_pad,
            BLOCK_M=DELTA_ROWS, Q_DIVISIBLE=L % DELTA_ROWS == 0, UPCAST=plan.interpret, num_warps=4, num_stages=1,
        )

    if (concurrent or dq_atomic) and not own_delta:
        launch_delta()

    def launch_dq():
        # With own_delta the dQ kernel computes its rows' delta and stores nothing (STORE_STATS).
        _launch_dq(plan, tiles, common, query, key, value, dout, dq, lse, delta, out, dlse, qs, lse2, bufs,
                   concurrent and not own_delta, opt.bwd.options_for("BLOCK_M2", "BLOCK_N2"), one_loop,
                   store_stats=not own_delta, tma=tma_dq)

    # DKDV_NUM_WARPS / DKDV_NUM_STAGES: the dK/dV kernel's own launch (the dQ kernel keeps bwd's).
    dkdv_launch = ({} if opt.dkdv_launch is None
                   else dict(num_warps=opt.dkdv_launch[0], num_stages=opt.dkdv_launch[1]))

    def launch_dkdv():
        sp = plan.dkdv_sparse  # the dK/dV kernel walks its query lists
        MB, MH = sp.kv_idx.shape[:2]
        q_full_num = sp.full_q_num if sp.has_full else sp.q_num
        q_full_idx = sp.full_q_idx if sp.has_full else sp.q_idx
        fns = dict(SCORE_FN=kv_prog.score_fn, SCORE_BWD_FN=kv_prog.score_bwd_fn, MASK_FN=kv_prog.mask_fn)
        q_arg, do_arg = query, dout
        if tma_dkdv and not opt.prescale and tma_ready(query, dout):
            q_arg = tma_descriptor(query, [1, 1, tiles["BLOCK_M1"], qk_pad])
            do_arg = tma_descriptor(dout, [1, 1, tiles["BLOCK_M1"], v_pad])
            fns["TMA"] = True
        _runtime.launch(
            dkdv_kernel, (_runtime.cdiv(S, tiles["BLOCK_N1"]), B * Hkv),
            q_arg, key, value, do_arg, dk, dv, lse2, delta, qs, dqa_arg,
            sp.q_num, sp.q_idx, q_full_num, q_full_idx, *kv_bufs, *grad_args,
            *query.stride(), *key.stride(), *value.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            *qs.stride(),
            plan.scale, Hq, Hkv, L, S, plan.Bk, MB, MH, sp.q_idx.shape[-1], sp.q_idx.shape[-2],
            GRAD_BUFFERS=need_buffer_grads and bool(prog.learnable), DQ_ATOMIC=dq_atomic, DQ_TMA=dq_tma,
            HEADS=dkdv_heads(plan.G, MH, heads_in_loop), DP_FIRST=dp_first(plan.G, dp_first_flag, plan.refined_bwd),
            BLOCK_M=tiles["BLOCK_M1"], BLOCK_N=tiles["BLOCK_N1"], **dict(common, **fns, **dkdv_launch),
            **{**_sparse_consts(sp, L, S), **_window_consts(sp, L, S, "Q")},
            options=opt.bwd.options_for("BLOCK_M1", "BLOCK_N1"),
            **({} if DKDV_MAXNREG is None or plan.interpret else {"maxnreg": DKDV_MAXNREG}),
        )

    if dq_atomic:
        launch_dkdv()
        dq.copy_(dqa)
    elif not concurrent:
        launch_dq()  # it computes delta and the base-2 LSE the dK/dV kernel reads
        launch_dkdv()
    elif dev.type != "cuda" or side is None:  # one stream (or none): dQ first under "dq", as on CUDA
        for launch in ((launch_dq, launch_delta, launch_dkdv) if own_delta
                       else (launch_dq, launch_dkdv) if side == "dq" else (launch_dkdv, launch_dq)):
            launch()
    else:
        main = torch.cuda.current_stream(dev)
        stream = _side_stream(dev, high_priority=side == "dkdv")
        stream.wait_stream(main)  # delta, the prescaled q and the inputs are ready (own_delta: the inputs)
        first, second = (launch_dkdv, launch_dq) if side == "dkdv" else (launch_dq, launch_dkdv)
        with torch.cuda.stream(stream):
            first()
        if own_delta:
            launch_delta()  # beside the dQ kernel, for the dK/dV kernel that follows it here
        second()
        main.wait_stream(stream)  # the side kernel is done (and nothing it reads is freed early)
    if broadcast:
        dk = dk.sum(0, keepdim=True).to(key.dtype)
        dv = dv.sum(0, keepdim=True).to(value.dtype)
    dbufs = [grads[k].view(prog.buffers[k].shape).to(prog.buffers[k].dtype) for k in prog.learnable]
    return dq, dk, dv, dbufs


def tma_dkdv_rule(flag: Optional[bool], plan, device) -> bool:
    """``TMA_DKDV`` resolved for a call: a bool as it is; None as on where the backward takes
    kernels.api.REFINED_BWD's tiles on sm90 (``tma_rule``), where it was timed faster."""
    if flag is not None:
        return bool(flag)
    return bool(plan.refined_bwd) and tma_rule(None, plan, device)


def dp_first(G: int, flag: Optional[bool], refined_bwd: bool = False) -> bool:
    """Whether the dK/dV kernel issues dP before dV, by ``flag`` (``DKDV_DP_FIRST``): True
    everywhere, None (the default) where each program has one query head (G = 1) and the backward
    is not on ``kernels.api.REFINED_BWD``'s tiles (``refined_bwd``), False nowhere."""
    return flag if flag is not None else G == 1 and not refined_bwd


def dkdv_heads(G: int, sparse_heads: int, heads_in_loop: bool) -> int:
    """How many query heads each of the dK/dV kernel's loops walks: G with ``heads_in_loop`` where
    every head reads the same lists (the block mask's H is 1), else 1."""
    return G if heads_in_loop and sparse_heads == 1 and G > 1 else 1


def _sparse_consts(sp, L: int, S: int) -> dict:
    """A kernel's block-list constants: its lists' block sizes, whether L and S divide them,
    and whether there are full lists (the dQ and dK/dV kernels' lists may be refined apart)."""
    return dict(HAS_FULL=sp.has_full, SPARSE_Q=sp.q_block, SPARSE_KV=sp.kv_block,
                Q_DIVISIBLE=L % sp.q_block == 0, KV_DIVISIBLE=S % sp.kv_block == 0)


def _window_consts(sp, L: int, S: int, axis: str) -> dict:
    """A kernel's unit and its loops' bounds on the axis its lists walk (``forward.list_bounds``):
    keys for the dQ kernel (``axis="KV"``), queries for the dK/dV kernel (``"Q"``)."""
    if axis == "KV":
        unit, divisible, part = list_bounds(sp.kv_unit, sp.kv_overrun, S, sp.kv_block)
    else:
        unit, divisible, part = list_bounds(sp.q_unit, sp.q_overrun, L, sp.q_block)
    return {f"{axis}_UNIT": unit, f"{axis}_DIVISIBLE": divisible, f"PART_{axis}_DIVISIBLE": part}


def _launch_dq(plan, tiles, common, query, key, value, dout, dq, lse, delta, out, dlse, qs, lse2, bufs, delta_ready,
               options=None, one_loop=False, store_stats=True, tma=False):
    sp, B, Hq, L, S = plan.dq_sparse, plan.B, plan.Hq, plan.L, plan.S  # the dQ kernel walks its key lists
    kv_full_num = sp.full_kv_num if sp.has_full else sp.kv_num
    kv_full_idx = sp.full_kv_idx if sp.has_full else sp.kv_idx
    extra, strides_k, strides_v = {}, key.stride(), value.stride()
    if tma and tma_ready(key, value):
        key = tma_descriptor(key, [1, 1, tiles["BLOCK_N2"], common["QK_PAD"]])
        value = tma_descriptor(value, [1, 1, tiles["BLOCK_N2"], common["V_PAD"]])
        extra["TMA"] = True
    _runtime.launch(
        dq_kernel, (_runtime.cdiv(L, tiles["BLOCK_M2"]), B * Hq),
        query, key, value, dout, dq, lse, delta, out, dlse if dlse is not None else lse, qs, lse2,
        sp.kv_num, sp.kv_idx, kv_full_num, kv_full_idx, *bufs,
        *query.stride(), *strides_k, *strides_v, *dout.stride(), *dq.stride(), *out.stride(),
        *qs.stride(),
        plan.scale, Hq, L, S, plan.Bk, *sp.kv_idx.shape[:2], sp.kv_idx.shape[-2], sp.kv_idx.shape[-1],
        HAS_DLSE=dlse is not None, DELTA_READY=delta_ready, ONE_LOOP=one_loop, STORE_STATS=store_stats,
        BLOCK_M=tiles["BLOCK_M2"], BLOCK_N=tiles["BLOCK_N2"], **common, **extra,
        **{**_sparse_consts(sp, L, S), **_window_consts(sp, L, S, "KV")}, options=options,
    )


_SIDE: dict = {}


def _side_stream(device, high_priority: bool):
    """One side stream per device and priority for the concurrent kernel (``SIDE_KERNEL``):
    the highest priority the device has, or the default."""
    import torch

    hit = _SIDE.get((device, high_priority))
    if hit is None:
        priority = torch.cuda.Stream.priority_range()[1] if high_priority else 0
        hit = _SIDE[(device, high_priority)] = torch.cuda.Stream(device, priority=priority)
    return hit
