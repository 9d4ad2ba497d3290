"""A probe of the backward past our Triton one: a warp-specialized Hopper attention backward in Gluon.

    TRITON_INTERPRET=0 python benchmarks/gluon_probe_bwd.py --compile-only   # any machine: sm_90 code report
    PYTHONPATH=. timeout 500 python3 benchmarks/gluon_probe_bwd.py          # on the H100/H200: checks, then times

Issue 6's document and softcap rows need a backward about 1.4x faster than ours at S=4k and 16k
(docs/PERFORMANCE.md). Our Triton backward runs seven matrix products per score tile (a dK/dV
kernel with four, a dQ kernel recomputing scores and dP with three) and Triton 3.6 does not
warp-specialize on sm_90. This is FlashAttention-3's backward structure, written in Gluon like
``benchmarks/gluon_probe.py``'s forward, to measure what it gains before any of it goes into
``kernels/``:

* one CTA per (128-row key tile, batch x kv head); two consumer warpgroups own 64 key rows each
  (240 registers after ``setmaxnreg``), a one-warp loader (24) issues TMA loads of K and V once
  and of each step's 64 query rows of Q and dO into a ring of ``NUM_BUF`` stages, freed when
  both consumers are done with them;
* a step per 64 query rows of the key tile's listed query blocks (PyTorch's q-side block lists,
  128 rows, or with ``q_block=64`` refined to 64 by ``kernels.api``: partial blocks with the
  ``mask_mod``, then full ones), for each of the kv head's G query heads (GQA sums their dK and
  dV in the accumulators);
* a step's products: S = Q K^T and dP = dO V^T (query rows by the consumer's 64 key columns) in
  flight together; P and dS written to shared memory, read back transposed as the A operands of
  dV += P^T dO and dK += dS^T Q; then dQ = dS K, added into a float32 dQ with atomics (four
  columns per thread), in one of two ways (``dq``): "warpgroup", each consumer its key half's
  share over all of dQ's columns, or "shared", FlashAttention-3's split, the consumers meeting on
  a barrier once both halves of dS are in and each adding half of dQ's columns over the whole
  key tile (half the atomics). FlashAttention-3 adds dQ with TMA bulk reductions, which Gluon
  3.6 does not expose;
* the kernel is generated around any ``kernels.mods`` program without learnable tensors
  (``kernels.mods.gluon_functions(..., backward=True)``: the mods' own code and the chain rule
  of their score mods), one module per program as in the forward probe.

Scope: contiguous (B, H, L, D) q, k, v, out, dout of one head dim (64 or 128), bf16 or fp16,
128 x 128 block masks, any L and S (tails masked: a step's query rows past L and a tile's key
rows past S count for nothing, and nothing is stored past them). The LSE is the forward's
(natural log, ``benchmarks/gluon_probe.py`` or ``kernels``), delta = rowsum(dO * O) - dlse
comes from a small Triton kernel here, and dQ's float32 sum is rounded to the inputs' dtype by
PyTorch.

Status: compiles for sm_90 (``--compile-only``: every program, both dQ modes, head dim 64 and
tails; at head dim 128 most programs spill 12 to 476 bytes, docs/PERFORMANCE.md). On the H200
(twenty-first session) its GPU tests passed, and it ran slower than our Triton backward on every
row timed: at S=16k document 278 TFLOP/s (dQ by warpgroup) and 349 (dQ shared) against ours'
353, and 609 without dQ. Run it on the GPU under ``timeout``: a barrier phase mistake hangs the
kernel rather than failing it. ``tests/test_gluon_probe_bwd.py``
checks its gradients against the float64 oracle's (``.ci/gpu-nightly`` with ``STEPS=probes``).
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.gluon_probe import (_INDEX_LINES, LOG2E, _max_err, _mma_layout, _worst, check_tma,  # noqa: E402
                                    compile_for_sm90, probe_parser, refined_lists, run_kernel, start)

BLOCK_M = 64  # query rows per step
BLOCK_N = 128  # key rows per CTA, 64 per consumer warpgroup
MASK_BLOCK = 128  # the block mask's block size, both sides
# Who computes dQ (the consumers' DQ argument): nobody (dK and dV alone, for timing); each
# consumer its key half's share, all columns; or the consumers together, half the columns each.
DQ_NONE = gl.constexpr(0)
DQ_WARPGROUP = gl.constexpr(1)
DQ_SHARED = gl.constexpr(2)
DQ_MODES = {None: 0, "warpgroup": 1, "shared": 2}


@gluon.jit
def _bwd_allocate(q_desc, k_desc, P_LAYOUT: gl.constexpr, DS_LAYOUT: gl.constexpr, NUM_BUF: gl.constexpr,
                  DQ: gl.constexpr):
    """Shared memory and barriers of one CTA: K and V (both halves), a ring of NUM_BUF Q and dO
    tiles (each ready on a barrier of its own; a stage is empty when both consumers arrived),
    each consumer's P tile, and dS (with DQ_SHARED two, and barriers on which both consumers
    meet before reading each other's half)."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = k_desc.block_type.shape[1]
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BN, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(k_desc.dtype, [BN, HEAD_D], k_desc.layout)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_BUF, BM, HEAD_D], q_desc.layout)
    do_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_BUF, BM, HEAD_D], q_desc.layout)
    p_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BM, BN // 2], P_LAYOUT)
    # dS of the step, [BM, BN], each consumer writing its key half; with DQ_SHARED two buffers
    # (steps alternate), each consumer's dQ columns reading both halves.
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [2 if DQ == DQ_SHARED else 1, BM, BN], DS_LAYOUT)
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready.index(0), count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)
    return (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem), (kv_ready, q_ready, do_ready, qdo_empty, ds_ready)


@gluon.jit
def _head_lists(ptrs, dims, g):
    """Query head g of the CTA's kv head: its index, its q-side lists of the CTA's key block
    (partial and full) and their lengths."""
    LSE2, DELTA, DQ_PTR, DK, DV, Q_NUM, Q_IDX, FULL_NUM, FULL_IDX = ptrs
    off_z, off_hkv, kvb, G, H, L, S, MB, MH, NKVB, NQB, QBLK, L_PAD = dims
    hq = off_hkv * G + g
    row = ((off_z % MB) * MH + hq % MH) * NKVB + kvb
    n_partial = gl.load(Q_NUM + row)
    n_listed = n_partial + gl.load(FULL_NUM + row)
    return hq, Q_IDX + row.to(gl.int64) * NQB, FULL_IDX + row.to(gl.int64) * NQB, n_partial, n_listed


@gluon.jit
def _q_start(i, part_idx, full_idx, n_partial, QBLK, BM: gl.constexpr):
    """The first query row of step i: the (i // SUB)-th listed block's (i % SUB)-th BM rows,
    partial blocks first (the lists' blocks are QBLK rows, 128 or 64: SUB = QBLK // BM steps
    per listed block)."""
    SUB = QBLK // BM
    j = i // SUB
    if j < n_partial:
        b = gl.load(part_idx + j)
    else:
        b = gl.load(full_idx + (j - n_partial))
    return b * QBLK + (i % SUB) * BM


@gluon.jit
def _bwd_load(descs, bufs, bars, lists):
    """The loader warp: K and V of the key tile once, then Q and dO of every step into the ring."""
    q_desc, k_desc, v_desc, do_desc = descs
    k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem = bufs
    kv_ready, q_ready, do_ready, qdo_empty, ds_ready = bars
    ptrs, dims, mods, scales = lists
    off_z, off_hkv, kvb, G, H, L, S, MB, MH, NKVB, NQB, QBLK, L_PAD = dims
    NUM_BUF: gl.constexpr = q_bufs.shape[0]
    BM: gl.constexpr = q_bufs.shape[1]
    BN: gl.constexpr = k_smem.shape[0]
    kv_row = (off_z * (H // G) + off_hkv) * S + kvb * BN
    mbarrier.expect(kv_ready.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, 0], kv_ready.index(0), k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row, 0], kv_ready.index(0), v_smem)
    it = 0
    for g in range(G):
        hq, part_idx, full_idx, n_partial, n_listed = _head_lists(ptrs, dims, g)
        q_row = (off_z * H + hq) * L
        for i in range(n_listed * (QBLK // BM)):
            q0 = _q_start(i, part_idx, full_idx, n_partial, QBLK, BM)
            s = it % NUM_BUF
            mbarrier.wait(qdo_empty.index(s), ((it // NUM_BUF) & 1) ^ 1)
            mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + q0, 0], q_ready.index(s), q_bufs.index(s))
            mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [q_row + q0, 0], do_ready.index(s), do_bufs.index(s))
            it += 1


@gluon.jit
def _bwd_consume(descs, bufs, bars, lists, WG: gl.constexpr, DQ: gl.constexpr, GRADS: gl.constexpr):
    """A consumer warpgroup: dK and dV of its 64 key rows over every step, and each step's share
    of dQ: with DQ_WARPGROUP its key half's, all D columns (dS of its half times its K half);
    with DQ_SHARED half of dQ's columns from both halves (both consumers' dS, met on a barrier:
    FlashAttention-3's split, half the atomics); DQ_NONE none.

    ``GRADS(qk, dp, mr, nr, partial, hq, lists, lse2, delta)`` gives P and dS (d loss / d (q k^T *
    scale)) from the raw products Q K^T and dO V^T, query rows by key columns (mr the query and nr
    the key indices, 1D). One function for both, so that the score mod's recomputation
    needs no second copy of the scores in registers."""
    k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem = bufs
    kv_ready, q_ready, do_ready, qdo_empty, ds_ready = bars
    ptrs, dims, mods, scales = lists
    LSE2, DELTA, DQ_PTR, DK, DV, Q_NUM, Q_IDX, FULL_NUM, FULL_IDX = ptrs
    off_z, off_hkv, kvb, G, H, L, S, MB, MH, NKVB, NQB, QBLK, L_PAD = dims
    sm_scale, qk_scale = scales
    NUM_BUF: gl.constexpr = q_bufs.shape[0]
    BM: gl.constexpr = q_bufs.shape[1]
    HEAD_D: gl.constexpr = q_bufs.shape[2]
    HALF_N: gl.constexpr = p_smem.shape[2]
    DS_BUFS: gl.constexpr = ds_smem.shape[0]
    DQ_N: gl.constexpr = 64  # dQ's columns per product
    s_layout: gl.constexpr = _mma_layout(HALF_N)  # [BM, HALF_N]: S, dP
    acc_layout: gl.constexpr = _mma_layout(HEAD_D)  # [HALF_N, D]: dK, dV
    dq_layout: gl.constexpr = _mma_layout(DQ_N)  # [BM, DQ_N]: a column chunk of the step's dQ
    dtype: gl.constexpr = q_bufs.dtype

    k_half = k_smem.slice(WG * HALF_N, HALF_N)
    v_half = v_smem.slice(WG * HALF_N, HALF_N)
    p_mine = p_smem.index(WG)
    n1 = kvb * (2 * HALF_N) + WG * HALF_N + gl.arange(0, HALF_N, gl.SliceLayout(0, s_layout))
    rows_s = gl.arange(0, BM, gl.SliceLayout(1, s_layout))
    zero_s = gl.zeros([BM, HALF_N], gl.float32, s_layout)
    zero_dq = gl.zeros([BM, DQ_N], gl.float32, dq_layout)
    dk = gl.zeros([HALF_N, HEAD_D], gl.float32, acc_layout)
    dv = gl.zeros([HALF_N, HEAD_D], gl.float32, acc_layout)
    add_layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])  # [BM, DQ_N] for the atomics
    dq_rows = gl.arange(0, BM, gl.SliceLayout(1, add_layout))
    dq_cols = gl.arange(0, DQ_N, gl.SliceLayout(0, add_layout))
    mbarrier.wait(kv_ready.index(0), 0)
    it = 0
    for g in range(G):
        hq, part_idx, full_idx, n_partial, n_listed = _head_lists(ptrs, dims, g)
        q_row = (off_z * H + hq) * L
        q_pad = (off_z * H + hq) * L_PAD
        for i in range(n_listed * (QBLK // BM)):
            q0 = _q_start(i, part_idx, full_idx, n_partial, QBLK, BM)
            s = it % NUM_BUF
            ph = (it // NUM_BUF) & 1
            q_s = q_bufs.index(s)
            do_s = do_bufs.index(s)
            # LSE2 and DELTA are padded to whole blocks (rows past L hold 0; GRADS masks them).
            m1 = q0 + rows_s
            lse2 = gl.load(LSE2 + q_pad + m1)
            delta = gl.load(DELTA + q_pad + m1)
            mbarrier.wait(q_ready.index(s), ph)
            mbarrier.wait(do_ready.index(s), ph)
            qk = warpgroup_mma(q_s, k_half.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp = warpgroup_mma(do_s, v_half.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk, dp = warpgroup_mma_wait(num_outstanding=0, deps=(qk, dp))
            p, ds = GRADS(qk, dp, m1, n1, i // (QBLK // BM) < n_partial, hq, lists, lse2, delta)
            ds_all = ds_smem.index(it % DS_BUFS)
            ds_mine = ds_all.slice(WG * HALF_N, HALF_N, dim=1)
            p_mine.store(p.to(dtype))
            ds_mine.store(ds.to(dtype))
            fence_async_shared()
            # dV += P^T dO and dK += dS^T Q, P and dS read transposed from shared memory.
            dv = warpgroup_mma(p_mine.permute((1, 0)), do_s, dv, is_async=True)
            dk = warpgroup_mma(ds_mine.permute((1, 0)), q_s, dk, is_async=True)
            if DQ == DQ_WARPGROUP:
                # dQ's share of this key half, dS K, in column chunks of DQ_N, added in with atomics.
                keep = gl.expand_dims(q0 + dq_rows < L, 1)
                dq_ptr = DQ_PTR + (q_row + q0).to(gl.int64) * HEAD_D
                for c in gl.static_range(HEAD_D // DQ_N):
                    dq = warpgroup_mma(ds_mine, k_half.slice(c * DQ_N, DQ_N, dim=1), zero_dq, use_acc=False,
                                       is_async=True)
                    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
                    # Four adjacent columns per thread (vector atomics, a quarter of the addresses).
                    dq = gl.convert_layout(dq * sm_scale, add_layout)
                    offs = gl.expand_dims(dq_rows * HEAD_D, 1) + gl.expand_dims(dq_cols + c * DQ_N, 0)
                    gl.atomic_add(dq_ptr + offs, dq, mask=keep, sem="relaxed")
            if DQ == DQ_SHARED:
                # Columns WG * DQ_N.. of dQ over the whole key tile, once both halves of dS are in.
                mbarrier.arrive(ds_ready.index(it % 2), count=1)
                mbarrier.wait(ds_ready.index(it % 2), (it // 2) & 1)
                dq = warpgroup_mma(ds_all, k_smem.slice(WG * DQ_N, DQ_N, dim=1), zero_dq, use_acc=False,
                                   is_async=True)
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
                dq = gl.convert_layout(dq * sm_scale, add_layout)
                keep = gl.expand_dims(q0 + dq_rows < L, 1)
                offs = gl.expand_dims(dq_rows * HEAD_D, 1) + gl.expand_dims(dq_cols + WG * DQ_N, 0)
                gl.atomic_add(DQ_PTR + (q_row + q0).to(gl.int64) * HEAD_D + offs, dq, mask=keep, sem="relaxed")
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            mbarrier.arrive(qdo_empty.index(s), count=1)
            it += 1

    # Key rows past S (a tail tile's, the next head's rows) are not stored.
    rows = kvb * (2 * HALF_N) + WG * HALF_N + gl.arange(0, HALF_N, gl.SliceLayout(1, acc_layout))
    dcols = gl.arange(0, HEAD_D, gl.SliceLayout(0, acc_layout))
    offs = gl.expand_dims(((off_z * (H // G) + off_hkv) * S + rows).to(gl.int64) * HEAD_D, 1) + gl.expand_dims(dcols, 0)
    keep = gl.expand_dims(rows < S, 1)
    gl.store(DK + offs, (dk * sm_scale).to(dtype), mask=keep)
    gl.store(DV + offs, dv.to(dtype), mask=keep)


# The probabilities, dS and the partitions of the backward, with the mods' mask_fn, score_fn and
# score_bwd_fn (kernels.mods.gluon_functions(..., backward=True)) defined in the same generated
# module (warp_specialize passes no constexpr or function to its partitions). @@MODS@@ is replaced
# by the mods' functions, the other @@ markers by the lines that apply them.
_BWD_TEMPLATE = """
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from benchmarks.gluon_probe_bwd import _bwd_allocate, _bwd_consume, _bwd_load


@@MODS@@


@gluon.jit
def _grads(qk, dp, mr, nr, partial, hq, lists, lse2, delta):
    ptrs, dims, mods, scales = lists
    m = gl.expand_dims(mr, 1)
    n = gl.expand_dims(nr, 0)
    off_z, off_hkv, kvb, G, H, L, S, MB, MH, NKVB, NQB, QBLK, L_PAD = dims
    B0, B1, B2, B3 = mods
    sm_scale, qk_scale = scales
@@INDEX@@
@@SCORE@@
@@MASK@@
@@TAIL@@
    p = gl.exp2(t2 - gl.expand_dims(lse2, 1))
    dt = p * (dp - gl.expand_dims(delta, 1))
@@DSCORE@@
    return p, ds


@gluon.jit
def _consumer0(descs, bufs, bars, lists):
    _bwd_consume(descs, bufs, bars, lists, 0, @@DQ@@, _grads)


@gluon.jit
def _consumer1(descs, bufs, bars, lists):
    _bwd_consume(descs, bufs, bars, lists, 1, @@DQ@@, _grads)


@gluon.jit
def _loader(descs, bufs, bars, lists):
    _bwd_load(descs, bufs, bars, lists)


@gluon.jit
def flex_bwd(q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DQ_PTR, DK, DV, B0, B1, B2, B3,
             Q_NUM, Q_IDX, FULL_NUM, FULL_IDX, L, S, H, G, MB, MH, NKVB, NQB, QBLK, L_PAD, sm_scale, qk_scale,
             P_LAYOUT: gl.constexpr, DS_LAYOUT: gl.constexpr, NUM_BUF: gl.constexpr, DQ: gl.constexpr,
             CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    kvb = gl.program_id(0)
    bh = gl.program_id(1)
    Hkv = H // G
    off_z = bh // Hkv
    off_hkv = bh % Hkv
    bufs, bars = _bwd_allocate(q_desc, k_desc, P_LAYOUT, DS_LAYOUT, NUM_BUF, DQ)
    lists = ((LSE2, DELTA, DQ_PTR, DK, DV, Q_NUM, Q_IDX, FULL_NUM, FULL_IDX),
             (off_z, off_hkv, kvb, G, H, L, S, MB, MH, NKVB, NQB, QBLK, L_PAD), (B0, B1, B2, B3),
             (sm_scale, qk_scale))
    args = ((q_desc, k_desc, v_desc, do_desc), bufs, bars, lists)
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader, args)], [4, 1], [CONSUMER_REGS, LOADER_REGS])
"""

# The index lines are the forward probe's (_INDEX_LINES, imported above): the mods see indices in
# range, a tail's rows past L and columns past S wrapped around; their scores are then masked.
_SCORE_LINES = "    t2 = score_fn(qk * sm_scale, off_z, hq, m_mod, n_mod, mr_mod, nr_mod, B0, B1, B2, B3) * 1.4426950408889634"
_PLAIN_LINES = "    t2 = qk * qk_scale"
_MASK_LINES = """    if partial:
        t2 = gl.where(mask_fn(off_z, hq, m_mod, n_mod, mr_mod, nr_mod, B0, B1, B2, B3), t2, float("-inf"))"""
_Q_TAIL_LINES = """    t2 = gl.where(m < L, t2, float("-inf"))"""
_KV_TAIL_LINES = """    t2 = gl.where(n < S, t2, float("-inf"))"""
_DSCORE_LINES = "    ds = score_bwd_fn(qk * sm_scale, dt, off_z, hq, m_mod, n_mod, mr_mod, nr_mod, B0, B1, B2, B3)"
_PLAIN_DSCORE_LINES = "    ds = dt"

_BWD_MODULES: dict = {}


def bwd_module(score_mod=None, mask_mod=None, q_divisible: bool = True, kv_divisible: bool = True,
               dq="warpgroup"):
    """The generated Gluon module (``flex_bwd`` and its partitions) for one pair of kernels.mods
    mods, whether L and S are multiples of 128, and who computes dQ (``dq``, a key of DQ_MODES); and
    the mods' captured buffers in slot order."""
    from kernels import mods

    fns, buffers = mods.gluon_functions(score_mod, mask_mod, backward=True)
    index = _INDEX_LINES[(q_divisible, kv_divisible)]
    tails = ([] if q_divisible else [_Q_TAIL_LINES]) + ([] if kv_divisible else [_KV_TAIL_LINES])
    source = (_BWD_TEMPLATE.replace("@@MODS@@", fns)
              .replace("@@INDEX@@", index)
              .replace("@@SCORE@@", _SCORE_LINES if score_mod is not None else _PLAIN_LINES)
              .replace("@@MASK@@", _MASK_LINES if mask_mod is not None else "")
              .replace("@@TAIL@@", "\n".join(tails))
              .replace("@@DSCORE@@", _DSCORE_LINES if score_mod is not None else _PLAIN_DSCORE_LINES)
              .replace("@@DQ@@", str(DQ_MODES[dq])))
    module = _BWD_MODULES.get(source)
    if module is None:
        module = _BWD_MODULES[source] = mods._load_source(source, interpret=False)
    return module, buffers


@triton.jit
def _delta_kernel(O, DO, LSE, DLSE, LSE2, DELTA, L, L_PAD, D: tl.constexpr, ROWS: tl.constexpr,
                  HAS_DLSE: tl.constexpr):
    """Per (batch x head, ROWS rows): delta = rowsum(dO * O) - dlse in float32 (SPEC section 4;
    the LSE's own gradient enters only here) and the LSE in base 2 (a row with nothing allowed,
    LSE -inf, shifts by 0), both padded to L_PAD rows with zeros."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    keep = rows < L
    offs = (bh * L + rows[:, None]).to(tl.int64) * D + cols[None, :]
    o = tl.load(O + offs, mask=keep[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=keep[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + rows, mask=keep, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh * L + rows, mask=keep, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    tl.store(DELTA + bh * L_PAD + rows, delta, mask=rows < L_PAD)
    tl.store(LSE2 + bh * L_PAD + rows, lse2, mask=rows < L_PAD)


def gluon_flex_backward(q, k, v, out, lse, dout, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                        dlse=None, NUM_BUF=2, dq="warpgroup", q_block=128, maxnreg=168, consumer_regs=240,
                        loader_regs=24, launch=None, poison=False, seed=0):
    """(dq, dk, dv) of FlexAttention's backward for ``kernels.mods`` mods, from the forward's ``out``
    and ``lse`` (natural log) and the incoming ``dout`` (and ``dlse``, the LSE's, if any): the
    block mask's q-side 128 x 128 lists (partial blocks with its ``mask_mod``, then full ones),
    the ``score_mod`` and its gradient on every listed block, GQA, any L and S. bf16 or fp16,
    head dim 64 or 128, contiguous (B, H, L, D).

    ``dq``: "warpgroup" (each consumer adds its key half's share of dQ, all columns), "shared"
    (head dim 128: the consumers meet on a barrier and each adds half of dQ's columns over the
    whole key tile, half the atomics), or None (dq not computed, returned as None: the dK/dV
    work alone, for timing). ``q_block=64``: the q-side lists refined to 64 x 128 sub-blocks
    first (``kernels.api._refine_kv``, as our Triton dK/dV kernel refines them), so that a step
    whose 64 query rows the mask allows nothing of is not listed, and one it allows everything
    of skips the mask. ``poison`` fills dk and dv with NaN first, so that an element the kernel
    does not write fails a check. ``launch(kernel, grid, args, kwargs)``, if given,
    replaces the launch (``compile_for_sm90``) and its result is returned. On CPU tensors the
    delta kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) and the Gluon kernel in
    ``kernels.gluon_emulator`` under schedule ``seed``."""
    from kernels import mods as kmods

    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float16) or D not in (64, 128):
        raise ValueError(f"Expected bf16 or fp16 q with head dim 64 or 128, got {q.dtype}, D={D}.")
    if H != Hkv and not (enable_gqa and H % Hkv == 0):
        raise ValueError(f"Expected Hq == Hkv, or enable_gqa=True with Hq % Hkv == 0, got Hq={H}, Hkv={Hkv}.")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        if t.shape[-1] != D:
            raise ValueError(f"Expected {name} of head dim {D}, got shape {tuple(t.shape)}.")
        check_tma(name, t)
    if dq not in DQ_MODES or (dq == "shared" and D != 128):
        raise ValueError(f"Expected dq in {list(DQ_MODES)} (\"shared\" at head dim 128 only), got dq={dq!r}, D={D}.")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if q_block not in (64, 128):
        raise ValueError(f"Expected q_block 64 or 128, got {q_block!r}.")
    if block_mask is not None and tuple(block_mask.BLOCK_SIZE) != (MASK_BLOCK, MASK_BLOCK):
        raise ValueError(f"Expected block_mask.BLOCK_SIZE == (128, 128) (the probe's lists), got "
                         f"{tuple(block_mask.BLOCK_SIZE)}; build it with BLOCK_SIZE=128.")
    num, idx, full_num, full_idx = refined_lists(block_mask, B, H, L, S, q.device, q_block=q_block)[4:]
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    module, buffers = bwd_module(kmods.as_score_mod(score_mod), kmods.as_mask_mod(mask_mod, "block_mask.mask_mod"),
                                 L % MASK_BLOCK == 0, S % MASK_BLOCK == 0, dq)
    bufs = [t.to(q.device) for t in buffers] + [q] * (kmods.MAX_BUFFERS - len(buffers))
    elem = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], elem)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], elem)
    p_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N // 2], elem)
    ds_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], elem)
    descs = (TensorDescriptor.from_tensor(q.reshape(-1, D), [BLOCK_M, D], q_layout),
             TensorDescriptor.from_tensor(k.reshape(-1, D), [BLOCK_N, D], kv_layout),
             TensorDescriptor.from_tensor(v.reshape(-1, D), [BLOCK_N, D], kv_layout),
             TensorDescriptor.from_tensor(dout.reshape(-1, D), [BLOCK_M, D], q_layout))
    L_pad = -(-L // MASK_BLOCK) * MASK_BLOCK
    delta = torch.empty(B, H, L_pad, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    dq_acc = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device) if dq is not None else delta
    fill = torch.full_like if poison else (lambda t, _: torch.empty_like(t))
    dk, dv = fill(k, float("nan")), fill(v, float("nan"))
    MB, MH, NKVB, NQB = idx.shape
    grid = (-(-S // BLOCK_N), B * Hkv)
    args = (*descs, lse2, delta, dq_acc, dk, dv, *bufs, num, idx, full_num, full_idx, L, S, H, H // Hkv,
            MB, MH, NKVB, NQB, q_block, L_pad, scale, scale * LOG2E, p_layout, ds_layout, NUM_BUF, DQ_MODES[dq],
            consumer_regs, loader_regs)
    kwargs = dict(num_warps=4, maxnreg=maxnreg)
    if launch is not None:
        return launch(module.flex_bwd, grid, args, kwargs)
    rows = 64
    has_dlse = dlse is not None
    _delta_kernel[(L_pad // rows, B * H)](out, dout, lse.contiguous(), dlse.contiguous() if has_dlse else lse, lse2,
                                          delta, L, L_pad, D, rows, has_dlse)
    run_kernel(module.flex_bwd, grid, args, kwargs, q.device, seed)
    return (dq_acc.to(q.dtype) if dq is not None else None), dk, dv


# --------------------------------------------------------------------------
# the driver


def compile_report() -> list:
    """Every program of the forward probe's ``flex_programs`` and its edge cases (head dim 64,
    tails, GQA), and dK/dV alone, compiled for sm_90: registers, spills, shared memory."""
    from benchmarks.gluon_probe import flex_edge_cases, flex_programs

    q, k, v = (torch.empty(1, 2, 512, 128, dtype=torch.bfloat16) for _ in range(3))
    lse = torch.empty(1, 2, 512)
    rows = []
    for name, kw in flex_programs(512, "cpu"):
        rep = gluon_flex_backward(q, k, v, q, lse, q, launch=compile_for_sm90, **kw)
        rows.append(dict(variant=f"bwd {name}", **rep))
    rep = gluon_flex_backward(q, k, v, q, lse, q, dq=None, launch=compile_for_sm90)
    rows.append(dict(variant="bwd none dK/dV only", **rep))
    for name, kw in flex_programs(512, "cpu"):
        if name in ("none", "document", "softcap causal"):
            rep = gluon_flex_backward(q, k, v, q, lse, q, dq="shared", launch=compile_for_sm90, **kw)
            rows.append(dict(variant=f"bwd {name} dQ shared", **rep))
    for name, kw in flex_programs(512, "cpu"):
        if name == "document":
            for dq in ("warpgroup", "shared"):
                rep = gluon_flex_backward(q, k, v, q, lse, q, dq=dq, q_block=64, launch=compile_for_sm90, **kw)
                rows.append(dict(variant=f"bwd {name} dQ {dq} q_block=64", **rep))
    for name, (q, k, v), kw in flex_edge_cases("cpu"):
        lse = torch.empty(q.shape[:3])
        rep = gluon_flex_backward(q, k, v, q, lse, q, launch=compile_for_sm90, **kw)
        rows.append(dict(variant=f"bwd {name}", **rep))
    return rows


BWD_CASES = ("none", "causal", "sliding_window", "prefix_lm", "document", "alibi causal", "softcap causal",
             "bias hqk", "table_mask", "gqa causal", "causal D=64", "document tails L=S=1000",
             "softcap tails L=700 S=1000 GQA", "alibi causal tails D=64 L=S=333")


# The head-dim-128 masked cases, checked with the q-side lists refined to 64 rows as well.
REFINED_CASES = ("causal", "sliding_window", "document", "softcap causal", "table_mask", "document tails L=S=1000")


def check_bwd_rows(S: int = 512, seed: int = 0, only=None, dq: str = "warpgroup", q_block: int = 128,
                   device: str = "cuda", schedules=(0, )) -> list:
    """Gradients of the forward probe's programs (B=2, H=2, S=512, bf16), GQA causal (Hq=4, Hkv=2)
    and its edge cases: max errors of our Triton backward and of the Gluon one (from our forward's
    out and LSE and the same dout) against the float64 oracle's, per gradient; ``dq`` and
    ``q_block`` as ``gluon_flex_backward``'s. On ``device="cpu"`` ours runs in Triton's interpreter
    and the Gluon kernel in ``kernels.gluon_emulator`` under each of ``schedules`` (the Gluon errors
    are the largest over them; one run on the GPU), and the edge cases at a batch of one."""
    import kernels
    import oracle
    from benchmarks.gluon_probe import flex_edge_cases, flex_programs

    g = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g)
    cases = [(name, kw, draw(2, 2, S, 128), draw(2, 2, S, 128), draw(2, 2, S, 128))
             for name, kw in flex_programs(S, device)]
    causal = flex_programs(S, device)[1][1]
    cases.append(("gqa causal", dict(causal, enable_gqa=True), draw(2, 4, S, 128), draw(2, 2, S, 128),
                  draw(2, 2, S, 128)))
    # On the CPU the edge cases at a batch of one: their lengths, GQA and tails kept, at half the
    # emulated programs (the softcap tails case took 108 s of the CI run at two); the cases above
    # keep two batches.
    cpu = torch.device(device).type == "cpu"
    cases += [(name, kw, q, k, v) for name, (q, k, v), kw in flex_edge_cases(device, draw, batch=1 if cpu else 2)]
    assert tuple(c[0] for c in cases) == BWD_CASES, [c[0] for c in cases]
    rows = []
    for name, kw, q, k, v in cases:
        if only is not None and name not in only:
            continue
        dout = draw(*q.shape)
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        oracle.flex_attention(*ref, **kw).backward(dout.double())
        mine = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o, lse = kernels.flex_attention(*mine, return_lse=True, **kw)
        o.backward(dout)
        row = dict(program=name)
        for which, want, ours in zip("qkv", ref, mine):
            row[f"ours_d{which}"] = _max_err(ours.grad, want.grad)
        for seed in schedules if torch.device(device).type == "cpu" else (0, ):
            got = gluon_flex_backward(q, k, v, o.detach().contiguous(), lse.detach(), dout, dq=dq, q_block=q_block,
                                      poison=True, seed=seed, **kw)
            for which, want, gluon_grad in zip("qkv", ref, got):
                row[f"gluon_d{which}"] = _worst(row.get(f"gluon_d{which}"), _max_err(gluon_grad, want.grad))
        rows.append(row)
    return rows


def time_rows(lengths=(16384, 4096, 1024)) -> list:
    """GPU-paced medians (``bench.timer(..., pace="gpu")``) of the backward alone at bench.py's shapes
    (B * S = 16k, H=16, D=128, bf16) on the dense, document and softcap rows: ours (Triton),
    torch.compile, Gluon (both dQ modes, dK/dV only, and on the document row the q-side lists
    refined to 64 rows); each from its own forward's saved tensors."""
    import kernels
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks import bench
    from benchmarks.gluon_probe import causal_case, document_case, time_impls
    from benchmarks.sweep import _no_donated_buffers

    # torch.compile's backward is timed with retain_graph=True, which its donated buffers forbid
    # (torch 2.11 raised this at S=4k, B=4 after the 16k rows had run).
    _no_donated_buffers()
    time_fn = bench.timer("cuda", 25, 100, 1, pace="gpu")
    compiled = torch.compile(flex_attention)
    rows = []
    for S in lengths:
        B, H, D = max(1, 16384 // S), 16, 128
        q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        _, doc_bm, _, doc_density = document_case(S)
        cap_mod, cap_bm, cap_density = causal_case(S)
        for mask, density, kw in (("dense", 1.0, {}), ("document", doc_density, dict(block_mask=doc_bm)),
                                  ("softcap", cap_density, dict(block_mask=cap_bm, score_mod=cap_mod))):
            flops = 2.5 * 4 * B * H * S * S * D * density
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            o_ours, lse = kernels.flex_attention(*leaves, return_lse=True, **kw)
            o_tc = compiled(*leaves, **kw)
            o, lse = o_ours.detach().contiguous(), lse.detach()
            impls = [("ours (Triton)", lambda: torch.autograd.grad(o_ours, leaves, dout, retain_graph=True)),
                     ("torch.compile", lambda: torch.autograd.grad(o_tc, leaves, dout, retain_graph=True)),
                     ("gluon", lambda: gluon_flex_backward(q, k, v, o, lse, dout, **kw)),
                     ("gluon dQ shared", lambda: gluon_flex_backward(q, k, v, o, lse, dout, dq="shared", **kw)),
                     ("gluon dK/dV only", lambda: gluon_flex_backward(q, k, v, o, lse, dout, dq=None, **kw))]
            if mask == "document":
                impls += [(f"gluon dQ {dq} q_block=64",
                           lambda dq=dq: gluon_flex_backward(q, k, v, o, lse, dout, dq=dq, q_block=64, **kw))
                          for dq in ("warpgroup", "shared")]
            time_impls(time_fn, impls, flops, rows, S=S, B=B, H=H, D=D, mask=mask)
    return rows


def main(argv=None) -> int:
    p = probe_parser(__doc__, "gluon_probe_bwd")
    p.add_argument("--no-time", action="store_true", help="checks only")
    args = p.parse_args(argv)
    result = start(args, "gluon_probe_bwd", compile_report)
    if isinstance(result, int):
        return result
    if not args.no_check:
        d128 = set(BWD_CASES) - {"causal D=64", "alibi causal tails D=64 L=S=333"}
        result["checks"] = ([dict(r, dq="warpgroup", q_block=128) for r in check_bwd_rows()]
                            + [dict(r, dq="shared", q_block=128) for r in check_bwd_rows(only=d128, dq="shared")]
                            + [dict(r, dq=dq, q_block=64) for dq in ("warpgroup", "shared")
                               for r in check_bwd_rows(only=REFINED_CASES, dq=dq, q_block=64)])
        for r in result["checks"]:
            print(f"check bwd {r['program']:32s} dQ {r['dq']:9s} q_block {r['q_block']:3d} " + "  ".join(
                f"d{w} ours {r[f'ours_d{w}']:.3e} gluon {r[f'gluon_d{w}']:.3e}" for w in "qkv"), flush=True)
    if not args.no_time:
        result["times"] = time_rows(tuple(int(x) for x in args.lengths.split(",")))
    path = args.json or os.path.join(os.environ.get("OUT") or ".", "gluon_probe_bwd.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
