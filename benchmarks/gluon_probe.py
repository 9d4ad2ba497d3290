"""A probe of the route past our Triton forward: a warp-specialized Hopper attention forward in Gluon.

    PYTHONPATH=. python3 benchmarks/gluon_probe.py                  # on the H100/H200: checks, then times
    TRITON_INTERPRET=0 python benchmarks/gluon_probe.py --compile-only   # any machine: sm_90 code report

Issue 6's document and softcap targets (1.5x torch.compile) need a forward faster than our own
dense Triton forward (docs/PERFORMANCE.md, seventeenth session); Triton 3.6 does not warp-specialize
on sm_90. This is FlashAttention-3's structure written in Gluon (Triton's lower-level dialect,
same wheel), to measure what it gains before any of it goes into ``kernels/``:

* per CTA 128 query rows, split between two consumer warpgroups of 64 rows (the default
  partition and a worker partition, 240 registers each after ``setmaxnreg``), and a one-warp
  loader partition (24 registers) that issues TMA loads of the Q halves once and of K and V into
  a ring of ``NUM_BUF`` stages, K and V on barriers of their own (QK^T starts before V lands);
* ``overlap``: FlashAttention-3's intra-warpgroup overlap, QK^T of block j and P V of block j-1
  in flight on the tensor cores while the warpgroup runs block j's softmax;
* ``gluon_flex_attention``: the overlapped kernel over PyTorch's 128 x 128 block lists (partial
  blocks first, then full ones), generated around any ``kernels.mods`` program
  (``kernels.mods.gluon_functions`` emits the mods' Triton code with Gluon's names; one module
  per program, since ``warp_specialize`` passes no constexpr or function to its partitions):
  ``mask_mod`` on the partial blocks, ``score_mod`` on every block, GQA, bf16 or fp16, head
  dim 64 or 128, any L and S (a tail tile's columns past S masked, its rows past L not stored).
  The dense kernel and the generated ones share one consumer (``_consume``, its softmax step
  passed in), loader (``_load``) and allocation (``_allocate``);
* ``persistent=True``: ``flex_fwd_persistent``, one CTA per SM walking the tiles (last query
  blocks first), the loader fetching the next tile's Q (handed over on ``q_empty`` barriers) and
  K/V while the consumers finish the last.

Scope: contiguous (B, H, L, D) inputs, q, k and v of one head dim; the dense kernel is bf16 at
head dim 128 with L and S multiples of 128. The generated kernel walks the 128 x 128 lists, or
(``kv_block=64``) the lists refined to 128 x 64 sub-blocks with K/V tiles of 64 keys. Out and
LSE only: the backward is ``benchmarks/gluon_probe_bwd.py``'s, and ``benchmarks/gluon_flex.py``
puts the two behind one autograd function.

Measured on the H200 (eighteenth session, ``docs/perf/h200-gluon-probe-2026-12-04.txt``): the dense
variants match the float32 reference exactly as closely as our Triton forward (the same max
errors, 9.9e-4 in out and 9.5e-7 in the LSE at S=1k; outputs not poisoned in that run, as they
now are in ``check_rows``), and with ``overlap`` and 3 stages the dense forward ran 608 to 616
TFLOP/s at S=16k against our Triton forward's 512 to 513 (+19 to 20 %), 560 to 578 against 483
to 492 at 4k, 442 to 451 against 405 to 406 at 1k. That run's dense kernel had consumers of its
own; they have since been merged into the shared ``_consume`` (the same loop; the store now also
masks rows past L and guards l = 0), re-timed in the twenty-first session at 684 TFLOP/s (S=16k).
The generated kernels compile for sm_90 without spills (``--compile-only``; the persistent
softcap's 20 / 36 spill bytes aside) and passed their GPU tests against the oracle on the H200
(twenty-first session). Against our Triton forward they won only the 16k document row (488
TFLOP/s against 410) and lost document at 4k and 1k and softcap everywhere
(docs/PERFORMANCE.md); the persistent kernel helped only short softcap rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, warpgroup_mma, warpgroup_mma_wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LOG2E = 1.4426950408889634


@gluon.constexpr_function
def _mma_layout(n):
    """The accumulator layout of a warpgroup's [64, n] products (one warpgroup, instruction N = n)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _allocate(q_desc, k_desc, v_desc, NUM_BUF: gl.constexpr, PERSISTENT: gl.constexpr):
    """Shared memory and barriers of one CTA: the two Q halves, a ring of NUM_BUF K and V tiles
    (K and V ready on barriers of their own; a stage is empty when both consumers arrived), and
    for the persistent kernel a Q half's empty barrier (its consumer is done with the tile's Q)."""
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = k_desc.block_type.shape[1]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF_M, HEAD_D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF, BLOCK_N, HEAD_D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, HEAD_D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
    if PERSISTENT:
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_empty.index(i), count=1)
    else:
        q_empty = q_ready  # a stand-in: only the persistent kernel waits on or arrives at q_empty
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    return (q_smem, k_bufs, v_bufs), (q_ready, k_ready, v_ready, kv_empty, q_empty)


@gluon.jit
def _online_softmax(t2, m_i, l_i, GUARD: gl.constexpr):
    """One block's online-softmax update from base-2 scores ``t2``: (p, m, l, alpha). With GUARD
    (masks), a row with nothing allowed so far keeps m = -inf and shifts by 0, so p = 0, not NaN."""
    m_new = gl.maximum(m_i, gl.max(t2, 1))
    if GUARD:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(t2 - gl.expand_dims(m_use, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _block_of(j, lists):
    """The KV block of step j: the row's partial blocks first, then its full ones."""
    out_ptr, lse_ptr, part_idx, full_idx, n_partial, n_blocks, off_z, off_h, B0, B1, B2, B3, L, S = lists
    if j < n_partial:
        b = gl.load(part_idx + j)
    else:
        b = gl.load(full_idx + (j - n_partial))
    return b


@gluon.jit
def _tile(t, tab, BLOCK_M: gl.constexpr):
    """Tile t of the persistent forward, as (lists, row0, kv_row0, q0) for ``_consume`` and
    ``_load``. Tiles run the last query block of every (batch, head) first, then the one before:
    under a causal mask the longest rows start first, and the short ones fill in at the end."""
    out_ptr, lse_ptr, B0, B1, B2, B3, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, L, S, H, G, MB, MH, NQ, NKV, BH = tab
    n_q = (L + BLOCK_M - 1) // BLOCK_M
    bh = t % BH
    pid_m = n_q - 1 - t // BH
    off_z = bh // H
    off_h = bh % H
    q0 = pid_m * BLOCK_M
    row = ((off_z % MB) * MH + off_h % MH) * NQ + pid_m
    n_partial = gl.load(KV_NUM + row)
    lists = (out_ptr, lse_ptr, KV_IDX + row.to(gl.int64) * NKV, FULL_IDX + row.to(gl.int64) * NKV, n_partial,
             n_partial + gl.load(FULL_NUM + row), off_z, off_h, B0, B1, B2, B3, L, S)
    return lists, bh * L + q0, (off_z * (H // G) + off_h // G) * S, q0


@gluon.jit
def _n_tiles(tab, BLOCK_M: gl.constexpr):
    """The persistent forward's tile count: query blocks times batch-heads."""
    out_ptr, lse_ptr, B0, B1, B2, B3, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, L, S, H, G, MB, MH, NQ, NKV, BH = tab
    return ((L + BLOCK_M - 1) // BLOCK_M) * BH


@gluon.jit
def _step_block(j, lists, LISTED: gl.constexpr):
    """The KV block of step j: the row's j-th listed block, or with LISTED false block j itself.
    The consumers ask for it before their barrier waits, so that the load of a listed index runs
    while they wait, not between the QK^T product and the softmax that needs it."""
    if LISTED:
        b = _block_of(j, lists)
    else:
        b = j
    return b


@gluon.jit
def _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, WG: gl.constexpr, OVERLAP: gl.constexpr,
             STEP: gl.constexpr, LISTED: gl.constexpr, it0, q_phase, RELEASE_Q: gl.constexpr):
    """A consumer warpgroup: its 64 query rows against every listed block. ``STEP(qk, j, b, lists,
    rows, cols, m_i, l_i, scales, BLOCK_N)`` turns step j's products (KV block b; ``rows`` the query
    indices, ``cols`` the block's column offsets, both 1D) into the softmax update.
    With OVERLAP, FlashAttention-3's intra-warpgroup overlap: QK^T of block j and P V of block j-1
    in flight on the tensor cores while this warpgroup runs block j's softmax. The tile's steps
    take ring slots it0, it0 + 1, ... and its Q phase is q_phase (0 and 0 for one tile per CTA);
    with RELEASE_Q the warpgroup arrives on its Q half's empty barrier once its last QK^T product
    is waited for, before the tile's last P V and its stores."""
    q_smem, k_bufs, v_bufs = bufs
    q_ready, k_ready, v_ready, kv_empty, q_empty = bars
    out_ptr, lse_ptr, part_idx, full_idx, n_partial, n_blocks, off_z, off_h, B0, B1, B2, B3, L, S = lists
    # Constexprs do not survive warp_specialize's argument tuple (Triton 3.6): read them from shapes.
    HALF_M: gl.constexpr = q_smem.shape[1]
    NUM_BUF: gl.constexpr = k_bufs.shape[0]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    HEAD_D: gl.constexpr = k_bufs.shape[2]
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_smem.index(WG)
    rows = q0 + WG * HALF_M + gl.arange(0, HALF_M, row_layout)
    cols = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    mbarrier.wait(q_ready.index(WG), q_phase)
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.full([HALF_M], 0.0, gl.float32, row_layout)
    acc = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)
    zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    if OVERLAP:
        pb = gl.zeros([HALF_M, BLOCK_N], q_smem.dtype, p_layout)
        if n_blocks > 0:
            b = _step_block(0, lists, LISTED)
            s0 = it0 % NUM_BUF
            mbarrier.wait(k_ready.index(s0), (it0 // NUM_BUF) & 1)
            qk = warpgroup_mma(q, k_bufs.index(s0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            p, m_i, l_i, alpha = STEP(qk, 0, b, lists, rows, cols, m_i, l_i, scales, BLOCK_N)
            pb = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        for j in range(1, n_blocks):
            s = (it0 + j) % NUM_BUF
            sp = (it0 + j - 1) % NUM_BUF
            b = _step_block(j, lists, LISTED)
            mbarrier.wait(k_ready.index(s), ((it0 + j) // NUM_BUF) & 1)
            qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(sp), ((it0 + j - 1) // NUM_BUF) & 1)
            acc = warpgroup_mma(pb, v_bufs.index(sp), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
            p, m_i, l_i, alpha = STEP(qk, j, b, lists, rows, cols, m_i, l_i, scales, BLOCK_N)
            acc, pb = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pb))
            mbarrier.arrive(kv_empty.index(sp), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            pb = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        if RELEASE_Q:
            mbarrier.arrive(q_empty.index(WG), count=1)
        if n_blocks > 0:
            sl = (it0 + n_blocks - 1) % NUM_BUF
            mbarrier.wait(v_ready.index(sl), ((it0 + n_blocks - 1) // NUM_BUF) & 1)
            acc = warpgroup_mma(pb, v_bufs.index(sl), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(kv_empty.index(sl), count=1)
    else:
        for j in range(n_blocks):
            s = (it0 + j) % NUM_BUF
            ph = ((it0 + j) // NUM_BUF) & 1
            b = _step_block(j, lists, LISTED)
            mbarrier.wait(k_ready.index(s), ph)
            qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            p, m_i, l_i, alpha = STEP(qk, j, b, lists, rows, cols, m_i, l_i, scales, BLOCK_N)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            pb = gl.convert_layout(p.to(q_smem.dtype), p_layout)
            mbarrier.wait(v_ready.index(s), ph)
            acc = warpgroup_mma(pb, v_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(kv_empty.index(s), count=1)
        if RELEASE_Q:
            mbarrier.arrive(q_empty.index(WG), count=1)

    # A row with nothing allowed: l = 0, m = -inf; out 0 and lse -inf (SPEC). Rows past L (a tail
    # tile) belong to the next head's rows or to nothing: not stored.
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, orow_layout), 1)
    pos = q0 + WG * HALF_M + gl.arange(0, HALF_M, orow_layout)
    ocols = gl.arange(0, HEAD_D, gl.SliceLayout(0, o_layout))
    offs = gl.expand_dims((row0 + WG * HALF_M + gl.arange(0, HALF_M, orow_layout)).to(gl.int64) * HEAD_D, 1)
    gl.store(out_ptr + offs + gl.expand_dims(ocols, 0), out.to(q_smem.dtype), mask=gl.expand_dims(pos < L, 1))
    rows_s = WG * HALF_M + gl.arange(0, HALF_M, row_layout)
    gl.store(lse_ptr + row0 + rows_s, (m_i + gl.log2(l_safe)) * 0.6931471805599453, mask=q0 + rows_s < L)


@gluon.jit
def _load(descs, bufs, bars, lists, row0, kv_row0, LISTED: gl.constexpr, it0, q_phase, WAIT_Q: gl.constexpr):
    """The loader warp: both Q halves of the tile, then K and V of each step's block into the ring
    from slot it0 on (the block is step j itself, or with LISTED the row's j-th listed block).
    With WAIT_Q (the persistent kernel) a Q half is loaded once its consumer released the last
    tile's; q_phase is the tile's parity."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_bufs, v_bufs = bufs
    q_ready, k_ready, v_ready, kv_empty, q_empty = bars
    out_ptr, lse_ptr, part_idx, full_idx, n_partial, n_blocks, off_z, off_h, B0, B1, B2, B3, L, S = lists
    HALF_M: gl.constexpr = q_smem.shape[1]
    NUM_BUF: gl.constexpr = k_bufs.shape[0]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    for w in gl.static_range(2):
        if WAIT_Q:
            mbarrier.wait(q_empty.index(w), q_phase ^ 1)
        mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row0 + w * HALF_M, 0], q_ready.index(w), q_smem.index(w))
    for j in range(n_blocks):
        s = (it0 + j) % NUM_BUF
        if LISTED:
            kv = kv_row0 + _block_of(j, lists) * BLOCK_N
        else:
            kv = kv_row0 + j * BLOCK_N
        mbarrier.wait(kv_empty.index(s), (((it0 + j) // NUM_BUF) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv, 0], k_ready.index(s), k_bufs.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv, 0], v_ready.index(s), v_bufs.index(s))


# --------------------------------------------------------------------------
# dense: the measured probe


@gluon.jit
def _dense_step(qk, j, b, lists, rows, cols, m_i, l_i, scales, BLOCK_N: gl.constexpr):
    qk_scale, sm_scale = scales
    return _online_softmax(qk * qk_scale, m_i, l_i, False)


# Constexprs (WG, OVERLAP, the step) do not pass through warp_specialize's argument tuple: each
# partition is a function of its own that passes them on.
@gluon.jit
def _dense0(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, 0, False, _dense_step, False, 0, 0, False)


@gluon.jit
def _dense1(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, 1, False, _dense_step, False, 0, 0, False)


@gluon.jit
def _dense0_overlap(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, 0, True, _dense_step, False, 0, 0, False)


@gluon.jit
def _dense1_overlap(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, 1, True, _dense_step, False, 0, 0, False)


@gluon.jit
def _dense_loader(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _load(descs, bufs, bars, lists, row0, kv_row0, False, 0, 0, False)


@gluon.jit
def gluon_attn_fwd(q_desc, k_desc, v_desc, out_ptr, lse_ptr, L, S, qk_scale,
                   NUM_BUF: gl.constexpr, OVERLAP: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q0 = pid_m * (2 * HALF_M)
    bufs, bars = _allocate(q_desc, k_desc, v_desc, NUM_BUF, False)
    # The block-list slots the dense kernel does not use hold stand-ins (out_ptr, 0).
    lists = (out_ptr, lse_ptr, out_ptr, out_ptr, 0, S // BLOCK_N, 0, 0, out_ptr, out_ptr, out_ptr, out_ptr, L, S)
    args = ((q_desc, k_desc, v_desc), bufs, bars, lists, bh * L + q0, bh * S, q0, (qk_scale, qk_scale))
    if OVERLAP:
        gl.warp_specialize([(_dense0_overlap, args), (_dense1_overlap, args), (_dense_loader, args)],
                           [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_dense0, args), (_dense1, args), (_dense_loader, args)], [4, 1], [CONSUMER_REGS, 24])


def _descriptors(q, k, v, HALF_M: int = 64, BLOCK_N: int = 128):
    """TMA descriptors over (B * H * L, D) views of contiguous q, k, v: Q in halves of HALF_M rows,
    K and V in tiles of BLOCK_N rows."""
    D = q.shape[-1]
    elem = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([HALF_M, D], elem)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], elem)
    return (TensorDescriptor.from_tensor(q.reshape(-1, D), [HALF_M, D], q_layout),
            TensorDescriptor.from_tensor(k.reshape(-1, D), [BLOCK_N, D], kv_layout),
            TensorDescriptor.from_tensor(v.reshape(-1, D), [BLOCK_N, D], kv_layout))


def check_tma(name: str, t: torch.Tensor) -> None:
    """A clear error where a TMA descriptor cannot take ``t``: not contiguous, or its data not
    16-byte aligned (a view at an odd storage offset; Triton's own check is a bare assert)."""
    if not t.is_contiguous():
        raise ValueError(f"Expected {name} contiguous (B, H, L, D), got strides {t.stride()}; pass "
                         f"{name}.contiguous().")
    if t.data_ptr() % 16:
        raise ValueError(f"Expected {name}'s data 16-byte aligned (a TMA descriptor's base), got an address "
                         f"{t.data_ptr() % 16} bytes past it (storage offset {t.storage_offset()}); pass "
                         f"{name}.clone().")


def run_kernel(kernel, grid, args, kwargs, device, seed: int = 0) -> None:
    """Launch a Gluon kernel: on the GPU as usual, on CPU tensors through
    ``kernels.gluon_emulator`` (``seed`` picks the emulated schedule of its partitions)."""
    if torch.device(device).type == "cpu":
        from kernels import gluon_emulator

        gluon_emulator.launch(kernel, grid, args, kwargs, seed=seed)
    else:
        kernel[grid](*args, **kwargs)


def _outputs(q, poison: bool):
    """out and lse; ``poison`` fills both with NaN first (checks: an element the kernel does not
    write then fails, where memory reused from an earlier result could pass)."""
    B, H, L = q.shape[:3]
    if poison:
        return torch.full_like(q, float("nan")), torch.full((B, H, L), float("nan"), device=q.device)
    return torch.empty_like(q), torch.empty((B, H, L), dtype=torch.float32, device=q.device)


def gluon_attention(q, k, v, scale=None, NUM_BUF=3, maxnreg=168, overlap=True, consumer_regs=240, launch=None,
                    poison=False, seed=0):
    """Out and LSE of dense attention (bf16, D=128, L and S multiples of 128, contiguous). On CPU
    tensors the kernel runs in ``kernels.gluon_emulator`` under schedule ``seed``."""
    B, H, L, D = q.shape
    S = k.shape[2]
    assert L % 128 == 0 and S % 128 == 0 and D == 128 and q.dtype == torch.bfloat16
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, lse = _outputs(q, poison)
    grid = (L // 128, B * H)
    args = (*_descriptors(q, k, v), out, lse, L, S, scale * LOG2E, NUM_BUF, overlap, consumer_regs)
    if launch is not None:
        return launch(gluon_attn_fwd, grid, args, dict(num_warps=4, maxnreg=maxnreg))
    run_kernel(gluon_attn_fwd, grid, args, dict(num_warps=4, maxnreg=maxnreg), q.device, seed)
    return out, lse


# --------------------------------------------------------------------------
# any kernels.mods program: the kernel generated around the mods' own code

# The step and the partitions of the block-list kernel, with the mods' mask_fn and score_fn
# (kernels.mods.gluon_functions) defined in the same generated module: warp_specialize passes no
# constexpr (nor a function) to its partitions, so each program gets a module of its own, whose
# partitions pass the step on to the shared consumer above. @@MODS@@ is replaced by the mods'
# functions, @@INDEX@@, @@SCORE@@, @@MASK@@ and @@TAIL@@ by the lines that apply them.
_FLEX_TEMPLATE = """
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from benchmarks.gluon_probe import _allocate, _block_of, _consume, _load, _n_tiles, _online_softmax, _tile


@@MODS@@


@gluon.jit
def _step(qk, j, b, lists, rows, cols, m_i, l_i, scales, BLOCK_N: gl.constexpr):
    out_ptr, lse_ptr, part_idx, full_idx, n_partial, n_blocks, off_z, off_h, B0, B1, B2, B3, L, S = lists
    qk_scale, sm_scale = scales
    mr = rows
    nr = b * BLOCK_N + cols
    n = gl.expand_dims(nr, 0)
@@INDEX@@
@@SCORE@@
@@MASK@@
@@TAIL@@
    return _online_softmax(t2, m_i, l_i, True)


@gluon.jit
def _consumer0(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, 0, True, _step, True, 0, 0, False)


@gluon.jit
def _consumer1(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, 1, True, _step, True, 0, 0, False)


@gluon.jit
def _loader(descs, bufs, bars, lists, row0, kv_row0, q0, scales):
    _load(descs, bufs, bars, lists, row0, kv_row0, True, 0, 0, False)


@gluon.jit
def flex_fwd(q_desc, k_desc, v_desc, out_ptr, lse_ptr, B0, B1, B2, B3,
             KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, L, S, H, G, MB, MH, NQ, NKV, qk_scale, sm_scale,
             NUM_BUF: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    off_z = bh // H
    off_h = bh % H
    q0 = pid_m * (2 * HALF_M)
    row = ((off_z % MB) * MH + off_h % MH) * NQ + pid_m
    n_partial = gl.load(KV_NUM + row)
    lists = (out_ptr, lse_ptr, KV_IDX + row.to(gl.int64) * NKV, FULL_IDX + row.to(gl.int64) * NKV, n_partial,
             n_partial + gl.load(FULL_NUM + row), off_z, off_h, B0, B1, B2, B3, L, S)
    bufs, bars = _allocate(q_desc, k_desc, v_desc, NUM_BUF, False)
    args = ((q_desc, k_desc, v_desc), bufs, bars, lists, bh * L + q0, (off_z * (H // G) + off_h // G) * S, q0,
            (qk_scale, sm_scale))
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_loader, args)], [4, 1], [CONSUMER_REGS, 24])


# The persistent forward: one CTA per SM walks the tiles t = pid, pid + grid, ...; the loader
# fetches the next tile's Q and K/V while the consumers finish the last one (its P V, its
# stores), so that a short row's fixed costs overlap the work of another.
@gluon.jit
def _persistent_walk(descs, bufs, bars, tab, scales, ROLE: gl.constexpr):
    # One partition's walk over the CTA's tiles: ROLE 0 and 1 the consumer warpgroups, 2 the
    # loader. Both sides count the ring slots and the tiles alike, so their phases agree.
    BLOCK_M: gl.constexpr = 2 * bufs[0].shape[1]
    it = 0
    n_done = 0
    for t in range(gl.program_id(0), _n_tiles(tab, BLOCK_M), gl.num_programs(0)):
        lists, row0, kv_row0, q0 = _tile(t, tab, BLOCK_M)
        if ROLE == 2:
            _load(descs, bufs, bars, lists, row0, kv_row0, True, it, n_done & 1, True)
        else:
            _consume(descs, bufs, bars, lists, row0, kv_row0, q0, scales, ROLE, True, _step, True, it, n_done & 1,
                     True)
        it += lists[5]
        n_done += 1


@gluon.jit
def _pconsumer0(descs, bufs, bars, tab, scales):
    _persistent_walk(descs, bufs, bars, tab, scales, 0)


@gluon.jit
def _pconsumer1(descs, bufs, bars, tab, scales):
    _persistent_walk(descs, bufs, bars, tab, scales, 1)


@gluon.jit
def _ploader(descs, bufs, bars, tab, scales):
    _persistent_walk(descs, bufs, bars, tab, scales, 2)


@gluon.jit
def flex_fwd_persistent(q_desc, k_desc, v_desc, out_ptr, lse_ptr, B0, B1, B2, B3,
                        KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, L, S, H, G, MB, MH, NQ, NKV, qk_scale, sm_scale, BH,
                        NUM_BUF: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    bufs, bars = _allocate(q_desc, k_desc, v_desc, NUM_BUF, True)
    tab = (out_ptr, lse_ptr, B0, B1, B2, B3, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, L, S, H, G, MB, MH, NQ, NKV, BH)
    args = ((q_desc, k_desc, v_desc), bufs, bars, tab, (qk_scale, sm_scale))
    gl.warp_specialize([(_pconsumer0, args), (_pconsumer1, args), (_ploader, args)], [4, 1], [CONSUMER_REGS, 24])
"""

# The mods see indices in range (as kernels/ clamps them): a tail tile's rows past L and
# columns past S wrap around; the columns past S are then masked, the rows past L not stored.
# They get them 1D (mr_mod, nr_mod: a gather by one of them loads once per index) and broadcast.
_INDEX_1D = {(True, True): "    mr_mod = mr\n    nr_mod = nr",  # key: (L, S) multiples of 128
             (True, False): "    mr_mod = mr\n    nr_mod = nr % S",
             (False, True): "    mr_mod = mr % L\n    nr_mod = nr",
             (False, False): "    mr_mod = mr % L\n    nr_mod = nr % S"}
_INDEX_LINES = {key: lines + "\n    m_mod = gl.expand_dims(mr_mod, 1)\n    n_mod = gl.expand_dims(nr_mod, 0)"
                for key, lines in _INDEX_1D.items()}
_SCORE_LINES = "    t2 = score_fn(qk * sm_scale, off_z, off_h, m_mod, n_mod, mr_mod, nr_mod, B0, B1, B2, B3) * 1.4426950408889634"
_PLAIN_LINES = "    t2 = qk * qk_scale"
_MASK_LINES = """    if j < n_partial:
        t2 = gl.where(mask_fn(off_z, off_h, m_mod, n_mod, mr_mod, nr_mod, B0, B1, B2, B3), t2, float("-inf"))"""
_TAIL_LINES = """    t2 = gl.where(n < S, t2, float("-inf"))"""

_FLEX_MODULES: dict = {}


def flex_module(score_mod=None, mask_mod=None, q_divisible: bool = True, kv_divisible: bool = True):
    """The generated Gluon module (``flex_fwd`` and its partitions) for one pair of kernels.mods
    mods and whether L and S are multiples of 128, and its captured buffers in slot order."""
    from kernels import mods

    fns, buffers = mods.gluon_functions(score_mod, mask_mod)
    source = (_FLEX_TEMPLATE.replace("@@MODS@@", fns)
              .replace("@@INDEX@@", _INDEX_LINES[(q_divisible, kv_divisible)])
              .replace("@@SCORE@@", _SCORE_LINES if score_mod is not None else _PLAIN_LINES)
              .replace("@@MASK@@", _MASK_LINES if mask_mod is not None else "")
              .replace("@@TAIL@@", "" if kv_divisible else _TAIL_LINES))
    module = _FLEX_MODULES.get(source)
    if module is None:
        module = _FLEX_MODULES[source] = mods._load_source(source, interpret=False)
    return module, buffers


_FULL_MASKS: dict = {}


def _full_lists(B: int, H: int, L: int, S: int, device):
    """No block mask: a BlockMask with every block of every row full (broadcast over B, H), one
    per lengths and device (so that the lists cached on it are found again)."""
    key = (L, S, str(device))
    if key not in _FULL_MASKS:
        _FULL_MASKS[key] = _new_full_mask(L, S, device)
    return _FULL_MASKS[key]


def _new_full_mask(L: int, S: int, device):
    from torch.nn.attention.flex_attention import BlockMask

    nq, nkv = -(-L // 128), -(-S // 128)
    zero = torch.zeros(1, 1, nq, dtype=torch.int32, device=device)
    idx = torch.arange(nkv, dtype=torch.int32, device=device).expand(1, 1, nq, nkv).contiguous()
    args = (zero, torch.zeros_like(idx), torch.full_like(zero, nkv), idx)
    try:
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=128, mask_mod=None, seq_lengths=(L, S))
    except TypeError:  # a PyTorch without seq_lengths
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=128, mask_mod=None)


def refined_lists(block_mask, B: int, H: int, L: int, S: int, device, kv_block: int = 128, q_block: int = 128):
    """The block mask's kv-side lists (num, idx, full num, full idx) and q-side ones (the same,
    transposed), refined to ``q_block`` x ``kv_block`` sub-blocks when either is 64
    (``kernels.api``'s refinement, the one our Triton kernels run); None: every block full.
    Without full blocks, the full lists are empty (counts 0)."""
    from kernels import api

    if block_mask is None:
        block_mask = _full_lists(B, H, L, S, device)
    n_q, n_kv = block_mask.kv_indices.shape[-2:]
    if (n_q, n_kv) != (-(-L // 128), -(-S // 128)):
        # The kernels mask rows past L and keys past S only inside the last block: a block mask
        # built for longer sequences would list blocks wholly past them.
        raise ValueError(f"Expected a block mask of {-(-L // 128)} x {-(-S // 128)} blocks for L={L}, S={S}, got "
                         f"{n_q} x {n_kv}; build it with create_block_mask for these lengths.")
    # Both cached in kernels.api (per block mask, and per lists, mask mod and granularity), so
    # that a timed loop does not refine again at every call.
    sparse = api._cached_block_lists(block_mask, B, H, L, S, device)
    if (q_block, kv_block) != (128, 128):
        sparse = api._refined_lists(sparse, block_mask.mask_mod, B, H, L, S, kv_block, q_block)
    full_num = sparse.full_kv_num if sparse.has_full else torch.zeros_like(sparse.kv_num)
    full_idx = sparse.full_kv_idx if sparse.has_full else sparse.kv_idx
    full_q_num = sparse.full_q_num if sparse.has_full else torch.zeros_like(sparse.q_num)
    full_q_idx = sparse.full_q_idx if sparse.has_full else sparse.q_idx
    return sparse.kv_num, sparse.kv_idx, full_num, full_idx, sparse.q_num, sparse.q_idx, full_q_num, full_q_idx


def gluon_flex_attention(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False, NUM_BUF=3,
                         kv_block=128, maxnreg=168, consumer_regs=240, launch=None, poison=False, seed=0,
                         persistent=False, programs=None):
    """FlexAttention's forward (out, lse) with the Gluon kernel, for ``kernels.mods`` mods: the
    block mask's 128 x 128 lists (partial blocks with its ``mask_mod``, then full blocks), the
    ``score_mod`` on every listed block, GQA, any L and S (tails masked). bf16 or fp16, head dim 64
    or 128 (q, k, v alike), contiguous (B, H, L, D). ``poison`` as ``_outputs``'.

    ``kv_block=64``: the lists refined to 128 x 64 sub-blocks first (``kernels.api._refine_kv``,
    as our Triton forward refines them: a sub-block the mask allows nothing of is dropped, one it
    allows everything of made full) and K/V tiles of 64 keys, so that a document boundary costs
    the sub-blocks it touches (on bench.py's 4k document row, 1.46 listed elements per allowed
    one against 1.61 at 128 x 128). On CPU tensors the kernel runs in ``kernels.gluon_emulator``
    under schedule ``seed``.

    ``persistent``: ``flex_fwd_persistent``, ``programs`` CTAs (default the GPU's SM count, 2 on
    the CPU) walking the (query block, batch and head) tiles, the last query blocks first."""
    from kernels import mods

    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if D not in (64, 128) or k.shape[-1] != D or v.shape[-1] != D or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gluon_flex_attention covers bf16/fp16 with q, k, v head dims all 64 or all 128; got "
                         f"{q.dtype}, q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H != Hkv and (not enable_gqa or H % Hkv):
        raise ValueError(f"Expected enable_gqa=True and Hq % Hkv == 0 for Hq={H}, Hkv={Hkv}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tma(name, t)
    if kv_block not in (64, 128):
        raise ValueError(f"Expected kv_block 64 or 128, got {kv_block!r}.")
    if block_mask is not None and tuple(block_mask.BLOCK_SIZE) != (128, 128):
        raise ValueError(f"Expected a BlockMask of 128 x 128 blocks, got BLOCK_SIZE={tuple(block_mask.BLOCK_SIZE)}.")
    mask_mod = mods.as_mask_mod(block_mask.mask_mod if block_mask is not None else None, "block_mask.mask_mod")
    module, buffers = flex_module(mods.as_score_mod(score_mod), mask_mod, L % 128 == 0, S % 128 == 0)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, lse = _outputs(q, poison)
    bufs = [t.to(q.device) for t in buffers] + [lse] * (4 - len(buffers))
    kv_num, kv_idx, full_num, full_idx = refined_lists(block_mask, B, H, L, S, q.device, kv_block=kv_block)[:4]
    MB, MH, NQ, NKV = kv_idx.shape
    grid = (-(-L // 128), B * H)
    args = (*_descriptors(q, k, v, BLOCK_N=kv_block), out, lse, *bufs, kv_num, kv_idx, full_num, full_idx, L, S, H,
            H // Hkv, MB, MH, NQ, NKV, scale * LOG2E, scale)
    kernel = module.flex_fwd
    if persistent:
        if programs is None:
            programs = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
        kernel, grid, args = module.flex_fwd_persistent, (max(1, min(int(programs), grid[0] * grid[1])), ), args + (B * H, )
    args += (NUM_BUF, consumer_regs)
    if launch is not None:
        return launch(kernel, grid, args, dict(num_warps=4, maxnreg=maxnreg))
    run_kernel(kernel, grid, args, dict(num_warps=4, maxnreg=maxnreg), q.device, seed)
    return out, lse


# --------------------------------------------------------------------------
# the driver

DENSE_VARIANTS = ((False, 2), (True, 2), (False, 3), (True, 3))  # (overlap, NUM_BUF)
SHARED_LIMIT = 232448  # bytes of shared memory a block may have on sm_90


def compile_for_sm90(kernel, grid, args, launch_kwargs) -> dict:
    """Compile ``kernel`` for sm_90 as its launch would (no GPU needed) and report its code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    from benchmarks.codegen import ptxas_info

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, opts = binder(*args, **launch_kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, launch_kwargs, bound, specialization, opts)
    out = triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=target, options=opts.__dict__)
    ptx = out.asm["ptx"]
    import re
    return dict(ptxas_info(ptx), shared=out.metadata.shared,
                setmaxnreg=sorted({int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
                wgmma=ptx.count("wgmma.mma_async"), tma_loads=ptx.count("cp.async.bulk.tensor"),
                rcp_approx=ptx.count("rcp.approx"), atomics=len(re.findall(r"\b(?:atom|red)\.global", ptx)))


def compile_report() -> list:
    q, k, v = (torch.empty(1, 2, 512, 128, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for overlap, bufs in DENSE_VARIANTS:
        rep = gluon_attention(q, k, v, NUM_BUF=bufs, overlap=overlap, launch=compile_for_sm90)
        rows.append(dict(variant=f"dense overlap={overlap} bufs={bufs}", **rep))
    for name, kw in flex_programs(512, "cpu"):
        rep = gluon_flex_attention(q, k, v, launch=compile_for_sm90, **kw)
        rows.append(dict(variant=f"flex {name}", **rep))
    for name, kw in flex_programs(512, "cpu"):
        if name in ("document", "softcap causal"):
            rep = gluon_flex_attention(q, k, v, kv_block=64, NUM_BUF=4, launch=compile_for_sm90, **kw)
            rows.append(dict(variant=f"flex {name} kv_block=64", **rep))
        if name in ("document", "softcap causal", "causal"):
            rep = gluon_flex_attention(q, k, v, persistent=True, launch=compile_for_sm90, **kw)
            rows.append(dict(variant=f"flex {name} persistent", **rep))
    for name, (q, k, v), kw in flex_edge_cases("cpu"):
        rep = gluon_flex_attention(q, k, v, launch=compile_for_sm90, **kw)
        rows.append(dict(variant=f"flex {name}", **rep))
    return rows


def flex_edge_cases(device, draw=None, batch: int = 2) -> list:
    """(name, (q, k, v), keyword arguments) beyond ``flex_programs``: head dim 64, tails (L and S
    not multiples of 128, with a mask, a score mod and GQA). ``batch``: the batch of the cases of
    two (the CPU backward check takes one, its emulator's time being per program)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels import mods

    draw = draw or (lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device=device))

    def blocks(mask_mod, L, S):
        return create_block_mask(mask_mod, None, None, L, S, device=device, BLOCK_SIZE=128)
    return [
        ("causal D=64", (draw(batch, 2, 512, 64), draw(batch, 2, 512, 64), draw(batch, 2, 512, 64)),
         dict(block_mask=blocks(mods.causal(), 512, 512))),
        ("document tails L=S=1000", (draw(batch, 2, 1000, 128), draw(batch, 2, 1000, 128), draw(batch, 2, 1000, 128)),
         dict(block_mask=blocks(mods.document.from_seed(1000, 5, 0, device=device), 1000, 1000))),
        ("softcap tails L=700 S=1000 GQA",
         (draw(batch, 4, 700, 128), draw(batch, 2, 1000, 128), draw(batch, 2, 1000, 128)),
         dict(score_mod=mods.tanh_softcap(30.0), enable_gqa=True)),
        ("alibi causal tails D=64 L=S=333", (draw(1, 2, 333, 64), draw(1, 2, 333, 64), draw(1, 2, 333, 64)),
         dict(score_mod=mods.alibi.standard(2, device=device), block_mask=blocks(mods.causal(), 333, 333))),
    ]


def flex_programs(S: int, device) -> list:
    """(name, gluon_flex_attention keyword arguments) for a spread of kernels.mods programs on
    (B, 2, S, 128) inputs: bench.py's mask rows and a few more mods."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels import mods

    def blocks(mask_mod):
        return create_block_mask(mask_mod, None, None, S, S, device=device, BLOCK_SIZE=128)
    causal = blocks(mods.causal())
    table = mods.seeded("normal", [2, S, S], 7, device=device).tensor
    return [
        ("none", {}),
        ("causal", dict(block_mask=causal)),
        ("sliding_window", dict(block_mask=blocks(mods.sliding_window(S // 4)))),
        ("prefix_lm", dict(block_mask=blocks(mods.prefix_lm(S // 4)))),
        ("document", dict(block_mask=blocks(mods.document.from_seed(S, 5, 0, device=device)))),
        ("alibi causal", dict(score_mod=mods.alibi.standard(2, device=device), block_mask=causal)),
        ("softcap causal", dict(score_mod=mods.tanh_softcap(30.0), block_mask=causal)),
        ("bias hqk", dict(score_mod=mods.bias(table, "hqk"))),
        ("table_mask", dict(block_mask=blocks(mods.table_mask.from_seed(2, S, S, 0.5, 3, device=device)))),
    ]


def reference(q, k, v, allowed=None, softcap=None):
    """Out and LSE in float32 (bf16 inputs are exact in it), ``allowed`` an optional [L, S] mask,
    ``softcap`` an optional cap (``cap * tanh(score / cap)``, torch's tanh)."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1)


def document_case(S: int, docs: int = 12, seed: int = 0):
    """bench.py's document row: the mod, its 128 x 128 BlockMask, the ids and the allowed share."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels import mods

    mod = mods.document.from_seed(S, docs, seed, device="cuda")
    bm = create_block_mask(mod, None, None, S, S, device="cuda", BLOCK_SIZE=128)
    ids = mod.q_ids.tensor.to(torch.int32).contiguous()
    density = float((torch.bincount(ids.long()).double() ** 2).sum()) / S / S
    return mod, bm, ids, density


SOFTCAP = 30.0  # bench.py's softcap row: tanh_softcap(30) on a causal mask


def causal_case(S: int):
    """bench.py's softcap row: tanh_softcap(SOFTCAP) on the causal mask; the mod, the 128 x 128
    causal BlockMask and the allowed share."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels import mods

    bm = create_block_mask(mods.causal(), None, None, S, S, device="cuda", BLOCK_SIZE=128)
    return mods.tanh_softcap(SOFTCAP), bm, (S + 1) / (2 * S)


def _max_err(got, want) -> float:
    """max |got - want| (equal infinities, a fully masked row's LSE, count as 0); NaN if ``got``
    holds a NaN (a poisoned element the kernel did not write)."""
    if torch.isnan(got).any():
        return float("nan")
    got = got.to(want.dtype)
    return torch.where(got == want, 0.0, got - want).abs().max().item()


def _worst(a, b) -> float:
    """The larger of two max errors, NaN (an unwritten element) if either is; ``a`` None: ``b``."""
    if a is None or math.isnan(b):
        return b
    return a if math.isnan(a) else max(a, b)


def check_rows(S: int = 1024, seed: int = 0) -> list:
    """Max errors against the float32 reference: our Triton forward and every dense variant;
    ours and the generated kernel on bench.py's document and softcap rows (B=2, H=4, D=128, bf16)."""
    import kernels

    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(2, 4, S, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = []

    def row(name, got, want):
        (o, lse), (o_ref, lse_ref) = got, want
        rows.append(dict(impl=name, out_err=_max_err(o, o_ref), lse_err=_max_err(lse, lse_ref)))
    dense_ref = reference(q, k, v)
    row("ours (Triton)", kernels.flex_attention(q, k, v, return_lse=True), dense_ref)
    for overlap, bufs in DENSE_VARIANTS:
        row(f"gluon overlap={overlap} bufs={bufs}",
            gluon_attention(q, k, v, NUM_BUF=bufs, overlap=overlap, poison=True), dense_ref)
    mod, bm, ids, _ = document_case(S)
    doc_ref = reference(q, k, v, ids[:, None] == ids[None, :])
    row("ours (Triton), document", kernels.flex_attention(q, k, v, block_mask=bm, return_lse=True), doc_ref)
    row("gluon flex, document", gluon_flex_attention(q, k, v, block_mask=bm, poison=True), doc_ref)
    mod, bm, _ = causal_case(S)
    pos = torch.arange(S, device="cuda")
    cap_ref = reference(q, k, v, pos[:, None] >= pos[None, :], softcap=SOFTCAP)
    row("ours (Triton), softcap", kernels.flex_attention(q, k, v, score_mod=mod, block_mask=bm, return_lse=True),
        cap_ref)
    row("gluon flex, softcap", gluon_flex_attention(q, k, v, score_mod=mod, block_mask=bm, poison=True), cap_ref)
    return rows


FLEX_CASES = ("none", "causal", "sliding_window", "prefix_lm", "document", "alibi causal", "softcap causal",
              "bias hqk", "table_mask", "gqa causal", "causal D=64", "document tails L=S=1000",
              "softcap tails L=700 S=1000 GQA", "alibi causal tails D=64 L=S=333")


def check_flex_rows(S: int = 512, seed: int = 0, only=None, kv_block: int = 128, device: str = "cuda",
                    schedules=(0, ), programs=None) -> list:
    """``gluon_flex_attention`` on ``flex_programs`` (B=2, H=2, S=512, bf16), a GQA causal case
    (Hq=4, Hkv=2) and ``flex_edge_cases`` (D=64, tails): max errors of ours and of the Gluon kernel
    against the float64 oracle; ``only``: the names (``FLEX_CASES``) to run; ``kv_block`` as
    ``gluon_flex_attention``'s (64: refined lists, 4 stages). On ``device="cpu"`` ours runs in
    Triton's interpreter and the Gluon kernel in ``kernels.gluon_emulator`` under each of
    ``schedules`` (the Gluon errors are the largest over them; one run on the GPU). ``programs``:
    the persistent kernel on that many CTAs (3 walks each case's tiles unevenly, several per CTA)."""
    import kernels
    import oracle

    g = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g)
    rows = []
    cases = [(name, kw, draw(2, 2, S, 128), draw(2, 2, S, 128), draw(2, 2, S, 128))
             for name, kw in flex_programs(S, device)]
    causal = flex_programs(S, device)[1][1]
    cases.append(("gqa causal", dict(causal, enable_gqa=True), draw(2, 4, S, 128), draw(2, 2, S, 128),
                  draw(2, 2, S, 128)))
    cases += [(name, kw, q, k, v) for name, (q, k, v), kw in flex_edge_cases(device, draw)]
    assert tuple(c[0] for c in cases) == FLEX_CASES, [c[0] for c in cases]
    for name, kw, q, k, v in cases:
        if only is not None and name not in only:
            continue
        o_ref, lse_ref = oracle.flex_attention(q, k, v, return_lse=True, **kw)
        o, lse = kernels.flex_attention(q, k, v, return_lse=True, **kw)
        row = dict(program=name, ours_out=_max_err(o, o_ref), ours_lse=_max_err(lse, lse_ref))
        for seed in schedules if torch.device(device).type == "cpu" else (0, ):
            og, lg = gluon_flex_attention(q, k, v, poison=True, kv_block=kv_block,
                                          NUM_BUF=3 if kv_block == 128 else 4, seed=seed,
                                          persistent=programs is not None, programs=programs, **kw)
            row["gluon_out"] = _worst(row.get("gluon_out"), _max_err(og, o_ref))
            row["gluon_lse"] = _worst(row.get("gluon_lse"), _max_err(lg, lse_ref))
        rows.append(row)
    return rows


def time_rows(lengths=(16384, 4096, 1024), document: bool = True) -> list:
    """GPU-paced medians (``bench.timer(..., pace="gpu")``) at bench.py's shapes (B * S = 16k,
    H=16, D=128): dense, ours against the Gluon variants; document and softcap, ours,
    torch.compile and Gluon."""
    import kernels
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks import bench

    time_fn = bench.timer("cuda", 25, 100, 1, pace="gpu")
    compiled = torch.compile(flex_attention)
    rows = []
    for S in lengths:
        B, H, D = max(1, 16384 // S), 16, 128
        sets = [tuple(torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)) for _ in range(2)]
        turn = [0]

        def nxt():
            turn[0] += 1
            return sets[turn[0] % 2]
        cases = [("dense", 1.0, [("ours (Triton)", lambda: kernels.flex_attention(*nxt()))]
                  + [(f"gluon overlap={o} bufs={b}", lambda o=o, b=b: gluon_attention(*nxt(), NUM_BUF=b, overlap=o))
                     for o, b in DENSE_VARIANTS])]
        if document:
            mod, bm, _, density = document_case(S)
            cases.append(("document", density, [
                ("ours (Triton)", lambda bm=bm: kernels.flex_attention(*nxt(), block_mask=bm)),
                ("torch.compile", lambda bm=bm: compiled(*nxt(), block_mask=bm)),
                ("gluon flex", lambda bm=bm: gluon_flex_attention(*nxt(), block_mask=bm)),
                ("gluon flex kv_block=64", lambda bm=bm: gluon_flex_attention(*nxt(), block_mask=bm, kv_block=64,
                                                                               NUM_BUF=4)),
                ("gluon flex persistent", lambda bm=bm: gluon_flex_attention(*nxt(), block_mask=bm, persistent=True)),
                ("gluon flex persistent kv_block=64",
                 lambda bm=bm: gluon_flex_attention(*nxt(), block_mask=bm, kv_block=64, NUM_BUF=4, persistent=True))]))
            mod, bm, density = causal_case(S)
            cases.append(("softcap", density, [
                ("ours (Triton)", lambda bm=bm, mod=mod: kernels.flex_attention(*nxt(), score_mod=mod, block_mask=bm)),
                ("torch.compile", lambda bm=bm, mod=mod: compiled(*nxt(), score_mod=mod, block_mask=bm)),
                ("gluon flex", lambda bm=bm, mod=mod: gluon_flex_attention(*nxt(), score_mod=mod, block_mask=bm)),
                ("gluon flex persistent", lambda bm=bm, mod=mod: gluon_flex_attention(*nxt(), score_mod=mod,
                                                                                     block_mask=bm, persistent=True))]))
        for mask, density, impls in cases:
            time_impls(time_fn, impls, 4 * B * H * S * S * D * density, rows, S=S, B=B, H=H, D=D, mask=mask)
    return rows


def time_impls(time_fn, impls, flops: float, rows: list, **meta) -> None:
    """Time each ``(name, fn)`` of ``impls`` (one untimed call first) and append its row: ``meta``,
    the median ms and the TFLOP/s of ``flops``; a line per row as it goes."""
    for name, fn in impls:
        fn()
        torch.cuda.synchronize()
        ms = time_fn(fn)[0]
        rows.append(dict(meta, impl=name, ms=ms, tflops=flops / ms / 1e9))
        print(f"S={meta['S']:<6d} B={meta['B']:<3d} {meta['mask']:9s} {name:28s} {ms:8.3f} ms "
              f"{flops / ms / 1e9:7.1f} TFLOP/s", flush=True)


def probe_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options both probes take: --compile-only, --lengths, --no-check, --json."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--compile-only", action="store_true", help="compile every variant for sm_90 and report (no GPU)")
    p.add_argument("--lengths", default="16384,4096,1024", help="timed sequence lengths")
    p.add_argument("--no-check", action="store_true",
                   help="time only (the probe-marked GPU tests check the same kernels, in parallel)")
    p.add_argument("--json", default=None, help=f"results file (default $OUT/{name}.json if OUT is set)")
    return p


def start(args, name: str, report):
    """A probe's main up to its checks: with ``--compile-only`` the sm_90 report (``report()``'s
    rows, one JSON line each) and exit status 0; off an sm_90 GPU status 2; else the result's
    header (GPU, versions)."""
    if args.compile_only:
        for row in report():
            print(json.dumps(row), flush=True)
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print(f"{name}: needs an sm_90 GPU (H100/H200); --compile-only runs anywhere", file=sys.stderr)
        return 2
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)


def main(argv=None) -> int:
    p = probe_parser(__doc__, "gluon_probe")
    p.add_argument("--no-document", action="store_true", help="time the dense variants only (no document, softcap)")
    args = p.parse_args(argv)
    result = start(args, "gluon_probe", compile_report)
    if isinstance(result, int):
        return result
    if not args.no_check:
        result["checks"] = check_rows()
        for r in result["checks"]:
            print(f"check {r['impl']:34s} out max err {r['out_err']:.3e}  lse max err {r['lse_err']:.3e}", flush=True)
        result["flex_checks"] = check_flex_rows()
        for r in result["flex_checks"]:
            print(f"check flex {r['program']:16s} out max err ours {r['ours_out']:.3e} gluon {r['gluon_out']:.3e}  "
                  f"lse ours {r['ours_lse']:.3e} gluon {r['gluon_lse']:.3e}", flush=True)
    result["times"] = time_rows(tuple(int(x) for x in args.lengths.split(",")), not args.no_document)
    path = args.json or os.path.join(os.environ.get("OUT") or ".", "gluon_probe.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
