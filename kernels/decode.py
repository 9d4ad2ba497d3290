"""The split-KV decode kernel, for short queries (L < 128).

A short query gives the forward kernel too few programs to fill a GPU, so the
work is cut along the keys instead. One program per (tile of packed rows,
batch x KV head, split): the query rows of every query head in a GQA group are
packed into one tile (packed row ``r`` of KV head ``hkv`` is query head
``hkv * G + r // L``, query index ``r % L``), so each key/value tile is read
once for the whole group. Each split walks a contiguous range of key positions
with an online softmax in base-2 units and writes its unnormalised partial
output, row max and row sum; a second kernel merges the splits the way the
online softmax merges tiles. With a single split the first kernel writes the
result directly.

The packed rows of one tile may belong to different heads and different sparse
query blocks, so the block mask is read per row: the host expands the block
lists into a dense membership table (0 = not listed, 1 = partial, 2 = full)
and each row gathers its entry for the current KV block. A tile that no row
lists is skipped.

Kernel options: SPLIT_KV sets the number of splits (capped by the number of
key tiles); PRESCALE_QK as in the forward kernel. Tiles come from this
module's own table, not from BLOCK_M / BLOCK_N (those size the forward's
query tiles). ROWS_GUARANTEED_SAFE is not used to drop the guard against rows
with nothing allowed: it promises keys per row, not per split or per packed
tile. BLOCKS_ARE_CONTIGUOUS has nothing to save here (no index lists are read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime
from .forward import LN2, LOG2E, cast, head_pads, load_tile, mma

NOT_LISTED, PARTIAL, FULL = 0, 1, 2


@triton.jit
def decode_split_kernel(
    Q, K, V, MEMBER, OUT, LSE, MAX, SUM,
    B0, B1, B2, B3,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_ot, stride_oz, stride_oh, stride_om, stride_od,
    SM_SCALE, Z, HQ, HKV, Q_LEN, KV_LEN, ZKV, SPLIT_SIZE,
    SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, NUM_KV_SPARSE,
    SCORE_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    G: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr, PRESCALE: tl.constexpr, OUTPUT_MAX: tl.constexpr,
    FINAL: tl.constexpr, FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One split of one tile of packed rows.

    FINAL (a single split): write out in its dtype, lse and max in natural log.
    Otherwise write float32 scratch for the combine: the unnormalised output
    ``acc``, the base-2 row max ``m`` (MAX) and the row sum ``l`` (SUM) of this
    split; a row that the split does not allow has acc = 0, m = -inf, l = 0.
    """
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    pid_t = tl.program_id(2)
    off_z = pid_zh // HKV
    off_hkv = pid_zh % HKV
    off_zkv = off_z % ZKV

    # Packed rows: query head hkv * G + r // L, query index r % L. Rows past
    # G * L are padding; they read head hkv * G + G - 1 (in range) and list nothing.
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < G * Q_LEN
    off_g = tl.minimum(offs_r // Q_LEN, G - 1)
    offs_h = off_hkv * G + off_g
    offs_i = offs_r % Q_LEN
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)

    q_ptrs = (Q + off_z.to(tl.int64) * stride_qz + offs_h[:, None].to(tl.int64) * stride_qh
              + offs_i[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd)
    # q stays in SRAM for the whole split.
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < QK_DIM), other=0.0)
    if PRESCALE:
        q = cast(q.to(tl.float32) * (SM_SCALE * LOG2E), Q.dtype.element_ty, UPCAST)
    K += off_zkv.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    V += off_zkv.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh

    # Each row's block-mask row (b % MB, h % MH, its own query block).
    mask_row = (((off_z % SPARSE_Z) * SPARSE_H + offs_h % SPARSE_H) * NUM_Q_SPARSE
                + offs_i // SPARSE_Q).to(tl.int64) * NUM_KV_SPARSE
    h_col = offs_h[:, None]
    m_col = offs_i[:, None]

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_PAD], dtype=tl.float32)

    split_start = pid_t * SPLIT_SIZE
    split_end = tl.minimum(split_start + SPLIT_SIZE, KV_LEN)
    for start_n in range(split_start, split_end, BLOCK_N):
        # BLOCK_N divides SPARSE_KV: the tile lies inside one sparse KV block.
        member = tl.load(MEMBER + mask_row + start_n // SPARSE_KV, mask=row_ok, other=0)
        if tl.max(member, 0) > 0:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = load_tile(K, offs_d, offs_n, stride_kd, stride_kn, QK_DIM, KV_LEN,
                           QK_DIM != QK_PAD, not KV_DIVISIBLE)
            qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_PRECISION, UPCAST)
            n_row = offs_n[None, :]
            if KV_DIVISIBLE:
                n_mod = n_row
            else:
                n_mod = n_row % KV_LEN  # keep mods' table reads in range
            if PRESCALE:
                if HAS_SCORE:
                    s = SCORE_FN(qk, LN2, off_z, h_col, m_col, n_mod, B0, B1, B2, B3) * LOG2E
                else:
                    s = qk
            elif HAS_SCORE:
                s = SCORE_FN(qk, SM_SCALE, off_z, h_col, m_col, n_mod, B0, B1, B2, B3) * LOG2E
            else:
                s = qk * (SM_SCALE * LOG2E)  # one multiply per score
            # Base-2 units from here on. Rows listing the block as full skip
            # mask_mod's verdict, partial rows take it, unlisted rows (and
            # padding) allow nothing.
            keep = MASK_FN(off_z, h_col, m_col, n_mod, B0, B1, B2, B3)
            member_col = member[:, None]
            allowed = (member_col == 2) | ((member_col == 1) & keep)  # FULL, PARTIAL
            if not KV_DIVISIBLE:
                allowed = allowed & (n_row < KV_LEN)
            s = tl.where(allowed, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row may have nothing allowed so far even under ROWS_GUARANTEED_SAFE
            # (the promise covers whole rows, not one split or the blocks of
            # another head packed in the tile): shift it by 0 so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(V, offs_n, offs_v, stride_vn, stride_vd, KV_LEN, V_DIM,
                          not KV_DIVISIBLE, V_DIM != V_PAD)
            acc = mma(cast(p, V.dtype.element_ty, UPCAST), v, acc * alpha[:, None], FP32_PRECISION, UPCAST)
            m_i = m_new

    o_ptrs = (OUT + pid_t.to(tl.int64) * stride_ot + off_z.to(tl.int64) * stride_oz
              + offs_h[:, None].to(tl.int64) * stride_oh + offs_i[:, None].to(tl.int64) * stride_om
              + offs_v[None, :] * stride_od)
    o_mask = row_ok[:, None] & (offs_v[None, :] < V_DIM)
    # Statistics are [splits, B, Hq, L] contiguous.
    stat_offs = ((pid_t.to(tl.int64) * Z + off_z) * HQ + offs_h) * Q_LEN + offs_i
    if FINAL:
        # A fully masked row has l = 0 and m = -inf: out = 0 and lse = -inf.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(o_ptrs, cast(acc / l_safe[:, None], OUT.dtype.element_ty, UPCAST), mask=o_mask)
        tl.store(LSE + stat_offs, (m_i + tl.math.log2(l_safe)) * LN2, mask=row_ok)
        if OUTPUT_MAX:
            tl.store(MAX + stat_offs, m_i * LN2, mask=row_ok)
    else:
        tl.store(o_ptrs, acc, mask=o_mask)
        tl.store(MAX + stat_offs, m_i, mask=row_ok)
        tl.store(SUM + stat_offs, l_i, mask=row_ok)


@triton.jit
def decode_combine_kernel(
    PART_OUT, PART_MAX, PART_SUM, OUT, LSE, MAX,
    stride_ot, stride_oz, stride_oh, stride_om, stride_od,
    stride_fz, stride_fh, stride_fm, stride_fd,
    NUM_SPLITS, HQ, Q_LEN, ROWS,
    V_DIM: tl.constexpr, V_PAD: tl.constexpr, BLOCK_L: tl.constexpr, OUTPUT_MAX: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Merge the splits of BLOCK_L rows of one (b, h), as the online softmax merges tiles.

    Split t is rescaled by exp2(m_t - M) with M the largest m_t: the scores'
    own maxima, not the splits' LSEs, so nothing is lost to rounding
    log2(l_t) near a large LSE. A split that allows nothing (m_t = -inf) gets
    factor 0 on a zero partial output, so it adds exactly nothing; a row that
    no split allows keeps out = 0, lse = max = -inf.
    """
    pid_zh = tl.program_id(0)
    pid_l = tl.program_id(1)
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_v = tl.arange(0, V_PAD)
    row_ok = offs_l < Q_LEN
    tile_ok = row_ok[:, None] & (offs_v[None, :] < V_DIM)
    stat_offs = pid_zh.to(tl.int64) * Q_LEN + offs_l
    part_ptrs = (PART_OUT + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                 + offs_l[:, None] * stride_om + offs_v[None, :] * stride_od)
    max_ptrs = PART_MAX + stat_offs
    sum_ptrs = PART_SUM + stat_offs

    m = tl.zeros([BLOCK_L], dtype=tl.float32) - float("inf")
    den = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L, V_PAD], dtype=tl.float32)
    for _ in range(0, NUM_SPLITS):
        m_t = tl.load(max_ptrs, mask=row_ok, other=float("-inf"))
        l_t = tl.load(sum_ptrs, mask=row_ok, other=0.0)
        acc_t = tl.load(part_ptrs, mask=tile_ok, other=0.0)
        m_new = tl.maximum(m, m_t)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        beta = tl.math.exp2(m_t - m_use)
        den = den * alpha + l_t * beta
        acc = acc * alpha[:, None] + acc_t * beta[:, None]
        m = m_new
        # Pointers advance one split at a time (64-bit: the scratch may pass 2**31 elements).
        part_ptrs += stride_ot
        max_ptrs += ROWS
        sum_ptrs += ROWS

    den_safe = tl.where(den == 0.0, 1.0, den)
    out = acc / den_safe[:, None]
    f_ptrs = (OUT + off_z.to(tl.int64) * stride_fz + off_h.to(tl.int64) * stride_fh
              + offs_l[:, None] * stride_fm + offs_v[None, :] * stride_fd)
    tl.store(f_ptrs, cast(out, OUT.dtype.element_ty, UPCAST), mask=tile_ok)
    tl.store(LSE + stat_offs, (m + tl.math.log2(den_safe)) * LN2, mask=row_ok)
    if OUTPUT_MAX:
        tl.store(MAX + stat_offs, m * LN2, mask=row_ok)


# Decode tiles by (architecture, dtype, padded head dim): (BLOCK_N, largest
# BLOCK_M, num_warps, num_stages). The kernel streams keys and values once, so
# it is bound by memory bandwidth: modest key tiles and few warps, as in
# PyTorch's flex decoding defaults. Under the interpreter the key tiles are
# small (32) so that the CPU's short test sequences (S <= 160) still make
# several tiles per split and splits of uneven size, which is what the split
# bookkeeping and the combine must get right. Missing entries fall back to the
# arch's ``None`` row; BLOCK_N is then shrunk to divide the sparse KV block.
_DECODE_CONFIGS = {
    ("sm90", None): (64, 64, 4, 3),
    ("sm90", torch.float32, 256): (32, 32, 4, 1),
    ("sm80", None): (64, 64, 4, 2),
    ("sm80", torch.float32, 256): (32, 32, 4, 1),
    ("interp", None): (32, 128, 1, 1),
}

# Splits per (row tile, batch x KV head) under the interpreter: few, but more
# than one, so that CPU runs exercise the combine.
_INTERPRETER_SPLITS = 3


def _decode_config(arch: str, dtype, pad: int):
    return _DECODE_CONFIGS.get((arch, dtype, pad)) or _DECODE_CONFIGS[(arch, None)]


def membership(sparse) -> torch.Tensor:
    """The block lists as a dense int8 table ``[MB, MH, nQ, nKV]``: 0 not listed, 1 partial, 2 full.

    Cached on the list tensors themselves (identity and version), so a block
    mask reused over decoding steps is expanded once.
    """
    lists = [(sparse.kv_num, sparse.kv_idx, PARTIAL)]
    if sparse.has_full:
        lists.append((sparse.full_kv_num, sparse.full_kv_idx, FULL))
    tensors = [t for num, idx, _ in lists for t in (num, idx)]
    key = tuple(id(t) for t in tensors)
    versions = tuple(t._version for t in tensors)
    hit = _MEMBERSHIP.get(key)
    # The entry holds the tensors, so their ids cannot be reused while it lives.
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors)) and hit[1] == versions:
        return hit[2]
    MB, MH, nQ, nKV = sparse.kv_idx.shape
    member = torch.zeros((MB, MH, nQ, nKV), dtype=torch.int8, device=sparse.kv_idx.device)
    for num, idx, kind in lists:
        listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        # Entries past a row's count may hold anything: point them at block 0 with value 0.
        cols = torch.where(listed, idx.long(), 0)
        member.scatter_reduce_(-1, cols, listed.to(torch.int8) * kind, reduce="amax")
    _MEMBERSHIP[key] = (tensors, versions, member)
    while len(_MEMBERSHIP) > _MEMBERSHIP_SIZE:
        _MEMBERSHIP.pop(next(iter(_MEMBERSHIP)))
    return member


_MEMBERSHIP: dict = {}
_MEMBERSHIP_SIZE = 16


def _num_splits(plan, n_tiles: int, programs_per_split: int, device) -> int:
    """How many splits to ask for: the option, else enough programs for ~4 per SM.

    Measured on an H200 (Hq=32, Hkv=8, D=128, S=32k, bf16; benchmarks/sweep.py):
    at B=1, 33 or more splits read 0.61 TB/s and 8 splits 0.49; at B=8, 8 splits
    (4 programs per SM) read 3.77 TB/s and 4 splits (2 per SM) 2.84.
    """
    if plan.options.split_kv is not None:
        want = plan.options.split_kv
    elif plan.interpret:
        want = _INTERPRETER_SPLITS
    else:
        from .api import sm_count

        sms = sm_count(device)
        want = max(1, (4 * sms) // programs_per_split)
    return max(1, min(want, n_tiles))


def run_decode(plan, query, key, value):
    """Launch the split-KV decode kernels: out (query's dtype and layout), lse and max (float32).

    Same contract as ``run_forward``: ``lse`` ``[B, Hq, L]`` in natural log,
    ``max`` the row maximum of the modified scores when ``plan.return_max``
    (else the LSE tensor again); a fully masked row gives out = 0 and
    lse = max = -inf.
    """
    from .api import _arch, _empty_like_layout, _fit_tile

    B, Hq, Hkv, L, S, Ev, G = plan.B, plan.Hq, plan.Hkv, plan.L, plan.S, plan.Ev, plan.G
    sp, opt, prog = plan.sparse, plan.options, plan.program
    device = query.device
    out = _empty_like_layout(query, (B, Hq, L, Ev), query.dtype)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=device)
    mx = torch.empty((B, Hq, L), dtype=torch.float32, device=device) if plan.return_max else lse

    # Padded head dims as the forward pads them (see head_pads: a Triton miscompile on sm_90).
    qk_pad, v_pad = head_pads(plan.E, Ev)
    block_n, max_block_m, num_warps, num_stages = _decode_config(
        _arch(device, plan.interpret), query.dtype, max(qk_pad, v_pad))
    block_n = _fit_tile(block_n, sp.kv_block)
    block_m = min(max(16, _runtime.next_power_of_2(G * L)), max_block_m)
    m_tiles = _runtime.cdiv(G * L, block_m)
    n_tiles = _runtime.cdiv(S, block_n)
    splits = _num_splits(plan, n_tiles, m_tiles * B * Hkv, device)
    # Splits cover whole key tiles; uneven division leaves fewer, fuller splits.
    tiles_per_split = _runtime.cdiv(n_tiles, splits)
    splits = _runtime.cdiv(n_tiles, tiles_per_split)
    final = splits == 1

    if final:
        part_out, part_lse, part_max, part_sum = out, lse, mx, lse
        part_strides = (0, *out.stride())
    else:
        part_out = torch.empty((splits, B, Hq, L, Ev), dtype=torch.float32, device=device)
        part_max = torch.empty((splits, B, Hq, L), dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
        part_lse = part_max  # unused: the combine writes the LSE
        part_strides = part_out.stride()

    member = membership(sp)
    MB, MH, nQ, nKV = member.shape
    _runtime.launch(
        decode_split_kernel, (m_tiles, B * Hkv, splits),
        query, key, value, member, part_out, part_lse, part_max, part_sum,
        *plan.buffer_args(query),
        *query.stride(), *key.stride(), *value.stride(), *part_strides,
        plan.scale, B, Hq, Hkv, L, S, plan.Bk, tiles_per_split * block_n,
        MB, MH, nQ, nKV,
        SCORE_FN=prog.score_fn, MASK_FN=prog.mask_fn, HAS_SCORE=prog.has_score,
        G=G, QK_DIM=plan.E, V_DIM=Ev, QK_PAD=qk_pad, V_PAD=v_pad,
        BLOCK_M=block_m, BLOCK_N=block_n, SPARSE_Q=sp.q_block, SPARSE_KV=sp.kv_block,
        KV_DIVISIBLE=S % block_n == 0, PRESCALE=opt.prescale, OUTPUT_MAX=plan.return_max,
        FINAL=final, FP32_PRECISION=plan.fp32_precision, UPCAST=plan.interpret,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not final:
        block_l = min(_runtime.next_power_of_2(L), 16)
        _runtime.launch(
            decode_combine_kernel, (B * Hq, _runtime.cdiv(L, block_l)),
            part_out, part_max, part_sum, out, lse, mx,
            *part_out.stride(), *out.stride(),
            splits, Hq, L, B * Hq * L,
            V_DIM=Ev, V_PAD=v_pad, BLOCK_L=block_l, OUTPUT_MAX=plan.return_max, UPCAST=plan.interpret,
            num_warps=4 if v_pad * block_l >= 2048 else 2, num_stages=3,
        )
    return out, lse, mx
