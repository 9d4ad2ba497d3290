"""The block-sparse forward kernel.

One program per (query tile, batch x query head). The query tile stays in
registers/SRAM; the kernel walks the row's partial KV blocks (score_mod and
mask_mod) and then its full KV blocks (score_mod only), keeping an online
softmax in base-2 units. Output is normalised at the end; the LSE is stored
in natural log (float32), the row maximum likewise when asked for.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _runtime

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# ONE_LOOP: one loop over a query tile's partial and then full KV blocks (``forward_tiles``'s
# MIXED), where two loops, one for each list, drain Triton's pipeline between them. None (the
# default since the twenty-fifth session): ``one_loop_for``'s rule, per program and block lists;
# True or False forces it. Timed on an H200 (docs/PERFORMANCE.md, twenty-fifth session; D=128,
# bf16) for the rule's masks, forward ms against two loops: causal -6.0 % at S=1k and -1.0 % at
# 4k, sliding window -7.3 % and -5.9 %, prefix LM -5.0 % and +1.1 %, block_sparse -7.8 % and
# -1.1 %. Softcap +1.7 % at 4k, and document +0.8 % at 4k (its ids are no longer prefetched): the
# rule left both on two loops. On the shifted windows (thirty-fourth session, H100) document and
# GQA document ran the one loop 1 to 4 % faster at S=1k and 4k, and the rule now takes it for them
# (score mods stay on two loops). At S=16k on an H100 (twenty-sixth session) the join's one-time
# saving is spread over rows four times as long: prefix LM +4.0 % (D=128) and +2.0 % (D=64),
# causal -0.7 % and +1.7 %, block_sparse +0.5 % and -0.8 %, sliding window (whose rows do not
# grow) -6.8 % and -0.7 %; hence the rule's cap on the mean row, ONE_LOOP_MAX_ROW_KEYS. The
# interpreter's tests hold it to the two loops bit for bit; on the H200 its GPU tests and 971
# fuzzed cases (target ``kernels-one-loop``) passed. bench.py's ``ours-one-loop`` forces it on,
# ``ours-two-loops`` off.
ONE_LOOP = None
# The rule's cap: one loop only where the query tiles' rows list at most this many keys on average
# (partial and full blocks together; 12 blocks of 128 keys). Below it lie bench.py's S=1k rows
# (2 to 4.6 blocks), sliding window 1024 at any S (7.9 at 4k, 8.7 at 16k) and block_sparse 25 % at
# 4k (8); above it causal and prefix LM at 4k (16.5 and 17.4) and 16k (64.5 and 68.4), and
# block_sparse at 16k (32), where the one loop gained at most 1 % and lost up to 4 % (numbers
# above). A two-point model fitted to 1k and 4k put the break-even at 41 blocks for causal, 16
# for block_sparse and 11 for prefix LM; the cap sits near the lowest.
ONE_LOOP_MAX_ROW_KEYS = 1536
# ONE_LOOP_EAGER_MASK: the one loop calls the mask on every step and applies it in the branch of
# the partial steps, where ONE_LOOP alone calls it in that branch. The mask's gathers (document ids)
# are then in the loop's body, where the pipeliner prefetches them, as in the two loops' partial
# loop; its arithmetic is sunk into the branch by LLVM. sm_90 SASS per trip (document, S=4k, full /
# partial step): 415 / 489 against ONE_LOOP's 396 / 494 and the two loops' 376 / 474, with 512
# bytes more shared memory (the ids' stages). It changes only a forward that runs the one loop
# (ONE_LOOP True; the rule gives document two loops). Off: on the H200 (twenty-fifth session), with
# ONE_LOOP forced, document's forward was 2.5 % faster than two loops at S=1k and 0.6 % at 4k (GQA
# document 2.3 % and 0.6 %), and a mask that gathers a tile of a table would load it on every
# full step too. Its GPU tests and 1,049 fuzzed cases (``kernels-one-loop-eager``) passed.
ONE_LOOP_EAGER_MASK = False


def one_loop_for(program, sparse, L: int) -> bool:
    """Whether the forward walks a program's partial and full blocks in one loop: ``ONE_LOOP`` when
    it is a bool; with None (the default), the rule the H100 and H200 timings support
    (docs/PERFORMANCE.md, twenty-third, twenty-fifth, twenty-sixth and thirty-fourth sessions): on
    for a mask with no score mod whose lists (``sparse``, the forward's own) hold at most
    ``ONE_LOOP_MAX_ROW_KEYS`` keys per query tile on average. A score mod's longer step outweighed
    the join at S=4k (and on the H100 at S=1k, ALiBi's); a program without a mask has no partial
    block to join; on long rows the one loop's dearer steps outweigh the join it saves once per
    row. A mask that gathers (document ids) took two loops until the thirty-fourth session: its
    gathers sit behind the one loop's branch, where the pipeliner does not prefetch them, and on
    the H200 the 64 x 64 blocks' document rows were 0.8 % slower at S=4k; on the shifted windows
    (fewer partial steps) the H100 ran the one loop 2 to 4 % faster on the document and GQA
    document rows at S=1k and 4k, in three runs. The mean is read back to the host once per block
    lists (``Sparse.mean_row_keys``), and only where the rest of the rule holds."""
    if ONE_LOOP is not None:
        return bool(ONE_LOOP)
    if not program.has_mask or program.has_score:
        return False
    return sparse.mean_row_keys(L) <= ONE_LOOP_MAX_ROW_KEYS


# ptxas's register cap for a forward whose mask takes the document range test below a padded
# head dim of 128 (``maxnreg``; None: none). On the 64 x 64 tiles, 4 warps, the D=64 document
# forward took 152 registers a thread with the range test (122 with the id compare), which by
# registers holds three programs a multiprocessor; capped at 128 (no spills, 437 instructions a
# partial step against the id compare's 460; benchmarks/codegen.py) it holds four. On the H100
# (fortieth session, ab.py --pace gpu) that ran the D=64 document forward 4.3 % faster than the
# id compare at S=4k (GQA 4.4 %, 3.5 % at S=1k), where uncapped it was 3 to 5 % slower. With a
# score mod (softcap, ALiBi) the capped D=64 document forward also compiles to 128 registers
# without spills, where its id compare takes 168 and 158; on the H100 (forty-first session,
# do_bench, 3 interleaved rounds, B=4, Hq=32, S=4k, bf16) it ran 7.8 % (softcap) and 11.5 %
# (ALiBi) faster than the id compare, the backward unchanged
# (docs/perf/h100-document-score-mods-and-decode-host-2026-12-07.txt).
RANGES_FWD_MAXNREG = 128
# The cap holds on tiles of at most this many scores a thread (64 x 64 and 64 x 128 on 4 warps,
# kernels.api.RANGES_FWD_D64's 128 x 128 on 8): 128 x 128 on 4 warps (128 a thread) under it ran
# the D=64 document forward at S=16k in 3.41 ms, against 1.50 uncapped (H100, forty-first
# session), so a caller's tiles of that size go uncapped.
RANGES_CAP_SCORES = 64
# The cap of a D=64 forward on 128 x 128 tiles and 8 warps (the sm90 D=64 row's tiles,
# kernels.api._CONFIGS): two programs a multiprocessor, where uncapped they take 157
# (no mask) to 247 registers (causal, prefix LM), one. Under it (sm_90, S=16k, benchmarks/codegen.py)
# no mask spills 4 bytes, causal 108, prefix LM none; capped, the H100 ran those forwards 6 to 8 %
# faster than the former 4-warp tiles, uncapped 24 to 27 % slower (forty-first session). A score
# mod that reads no captured tensor takes the tiles and the cap too (a softcap spills 72 bytes, and
# ran 10 % faster than on its former 128 x 64 on 4 warps, forty-second session); one that gathers
# (``ModProgram.score_loads``) is not capped: a relative-position table spills 444 / 960 bytes
# under it (kernels.api._CONFIGS gives those mods their own tiles).
D64_W8_FWD_MAXNREG = 128
FWD_MAXNREG = None  # a cap for every forward launch (None: fwd_maxnreg's two rules alone)


def fwd_maxnreg(plan):
    """The forward's register cap: FWD_MAXNREG where set; else RANGES_FWD_MAXNREG for a program
    whose mask takes the range test below a padded head dim of 128 (on the GPU), on tiles that
    give each thread at most 64 scores (``RANGES_CAP_SCORES``); else D64_W8_FWD_MAXNREG for 128 x
    128 tiles on 8 warps at a padded head dim of 64 without a score mod that gathers."""
    if plan.interpret:
        return None
    if FWD_MAXNREG is not None:
        return FWD_MAXNREG
    fwd = plan.options.fwd
    pad = head_pad(max(plan.E, plan.Ev))
    if (plan.program.mask_ranges and pad < 128
            and fwd.tiles["BLOCK_M"] * fwd.tiles["BLOCK_N"] <= RANGES_CAP_SCORES * 32 * fwd.num_warps):
        return RANGES_FWD_MAXNREG
    if (pad == 64 and not plan.program.score_loads and fwd.num_warps == 8
            and (fwd.tiles["BLOCK_M"], fwd.tiles["BLOCK_N"]) == (128, 128)):
        return D64_W8_FWD_MAXNREG
    return None


@triton.jit
def load_tile(PTR, offs_r, offs_c, stride_r, stride_c, N_R, N_C, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    """Load PTR[offs_r, offs_c] with zero padding past N_R rows / N_C columns."""
    ptrs = PTR + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if CHECK_R and CHECK_C:
        return tl.load(ptrs, mask=(offs_r[:, None] < N_R) & (offs_c[None, :] < N_C), other=0.0)
    elif CHECK_R:
        return tl.load(ptrs, mask=offs_r[:, None] < N_R, other=0.0)
    elif CHECK_C:
        return tl.load(ptrs, mask=offs_c[None, :] < N_C, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def next_listed(IDX, first, it, num_blocks, TILES: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """The listed block of step ``it + 1`` of a flat loop over ``TILES`` steps per block,
    read one step ahead and carried into the next step.

    A step whose tile address depends on a list entry loaded in the same step cannot have
    its tiles prefetched more than one step ahead: Triton's pipeliner (3.6) must put the
    index load a stage before the tile loads, so the loop waited for every copy in flight
    (``async_wait {num = 0}`` in every sm_90 loop, whatever num_stages; PyTorch's template,
    which carries its next offset the same way, waits for all but the last step's).
    Carried in, the address is known when the step starts."""
    nxt = (it + 1) // TILES
    if CONTIGUOUS:
        return first + nxt
    else:
        return tl.load(IDX + nxt, mask=nxt < num_blocks, other=0)


@triton.jit
def list_start(IDX, FIDX, num_part, MIXED: tl.constexpr):
    """(first, f_first, the block of step 0) for a loop over the list ``IDX``, or with MIXED over
    its ``num_part`` partial blocks and then the full list ``FIDX`` (``next_listed_of_two``)."""
    first = tl.load(IDX)
    if MIXED:
        f_first = tl.load(FIDX)
        block = tl.where(num_part > 0, first, f_first)
    else:
        f_first = first
        block = first
    return first, f_first, block


@triton.jit
def next_listed_of_two(IDX, FIDX, first, f_first, it, num_part, num_blocks, TILES: tl.constexpr,
                       CONTIGUOUS: tl.constexpr):
    """``next_listed`` for one loop over two lists: the row's ``num_part`` partial blocks (``IDX``,
    starting at ``first``), then its full ones (``FIDX``, starting at ``f_first``), ``num_blocks``
    in all. Blocks ``num_part`` on are read from the full list at ``nxt - num_part``."""
    nxt = (it + 1) // TILES
    in_part = nxt < num_part
    if CONTIGUOUS:
        return tl.where(in_part, first + nxt, f_first + (nxt - num_part))
    else:
        ptr = tl.where(in_part, IDX + nxt, FIDX + (nxt - num_part))
        return tl.load(ptr, mask=nxt < num_blocks, other=0)


@triton.jit
def mma(a, b, acc, FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST (the CPU interpreter) multiplies in float32: the interpreter's
    bfloat16 dot is wrong, and products of 16-bit values are exact in float32.

    Float32 inputs sum a @ b from zero and add it to acc once. Passed as the
    dot's accumulator, acc takes the products one at a time (IEEE float32 dots
    are FMA chains on the GPU), and each product under half an ulp of acc is
    lost: with the heavy key blocks first, the forward's running sum dropped a
    tail of 8,000 small probabilities, 1.2e-5 of the row's mass with V = 1
    (the H200's nightly fuzz, seed 19008; tests/cases/fp32-small-terms-lost.json).
    The add is inline PTX: Triton folds ``acc + tl.dot(a, b)`` back into
    ``tl.dot(a, b, acc)`` (its dot-add combine; seen in the TTIR for sm_90).
    16-bit inputs keep the tensor cores' accumulate: each MMA step adds a
    16-term product sum to acc, and the output is rounded to 8 or 11 bits.
    """
    if UPCAST:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        d = tl.dot(a, b, input_precision=FP32_PRECISION)
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [acc, d],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.dot(a, b, acc, input_precision=FP32_PRECISION)


@triton.jit
def cast(x, DT: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(DT) rounding to nearest even.

    The interpreter (UPCAST) truncates float32 to bfloat16, which doubles the
    rounding error and biases it; round the bits first so the cast is exact.
    """
    if UPCAST and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def forward_tiles(
    acc, l_i, m_i,
    q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    IDX, num_blocks, FIDX, num_part,
    off_z, off_h, offs_m, m_mod, Q_LEN, KV_LEN,
    SM_SCALE,
    B0, B1, B2, B3,
    SCORE_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    IS_FULL: tl.constexpr, MIXED: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_KV: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr, ROWS_SAFE: tl.constexpr, CONTIGUOUS: tl.constexpr,
    PRESCALE: tl.constexpr, RAW_MAX: tl.constexpr, FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EAGER_MASK: tl.constexpr = False, KV_UNIT: tl.constexpr = 0, TMA: tl.constexpr = False,
):
    """Fold the row's listed KV blocks into (acc, l_i, m_i); base-2 units throughout.

    RAW_MAX (a score mod; or none, no PRESCALE and scale > 0): the tile's maximum is taken on
    the scores in natural units (the score mod's, or the raw q @ K^T) and scaled once per row, and
    each score enters its exponent by one FMA, ``t * unit - m`` with ``unit`` log2(e) after a
    score mod and ``scale * log2(e)`` without one, where the base-2 scores took a multiply and a
    subtraction (one instruction per score fewer: sm_90 SASS, benchmarks/codegen.py; after a
    score mod, measured on the H100 with benchmarks/ab.py, alibi's forward 2 % faster at S=1k and
    5 % at 4k, the softcap's within 2 %: docs/PERFORMANCE.md, twenty-ninth session). Rounding
    is monotonic and ``unit`` positive, so m is the same float as the maximum of the rounded
    base-2 scores; the FMA rounds each exponent once instead of twice (the backward's
    base2_scores likewise). Without a score mod, a negative scale reverses the order (the raw
    maximum is the smallest score), and a zero one turns a masked score's -inf into NaN: both take
    the scaled path (tests/test_kernels.py::test_scale_signs_with_large_scores fails on either
    otherwise). A score mod's unit is log2(e) whatever the scale.

    MIXED (``ONE_LOOP``): one loop over the partial list ``IDX`` (``num_part`` blocks) and then the
    full list ``FIDX``, ``num_blocks`` in all; the mask is applied on the steps of the first part.
    Two loops (IS_FULL false, then true) drain the pipeline between them, and the second one's
    first K and V tiles are loaded with nothing to hide them behind.

    KV_UNIT: the keys a list entry counts in; 0, the block's own length (SPARSE_KV). The shifted
    windows (``kernels.api._shifted_kv``) list each window's first key in units of KV_UNIT
    (``kernels.api.SHIFT_UNIT_KV``, 1): SPARSE_KV keys from there on, so that a window need not
    start at a multiple of its length.
    """
    first, f_first, kv_block = list_start(IDX, FIDX, num_part, MIXED)
    return forward_walk(
        acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        IDX, num_blocks, FIDX, num_part, first, f_first, kv_block,
        off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
        SCORE_FN, MASK_FN, HAS_SCORE, IS_FULL, MIXED, QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
        KV_DIVISIBLE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, EAGER_MASK, KV_UNIT, TMA,
    )


@triton.jit
def forward_walk(
    acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    IDX, num_blocks, FIDX, num_part, first, f_first, kv_block,
    off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
    SCORE_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    IS_FULL: tl.constexpr, MIXED: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_KV: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr, CONTIGUOUS: tl.constexpr,
    PRESCALE: tl.constexpr, RAW_MAX: tl.constexpr, FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EAGER_MASK: tl.constexpr, KV_UNIT: tl.constexpr, TMA: tl.constexpr = False,
):
    """``forward_tiles``'s loop, from a row's first entries (``list_start``'s): the persistent
    forward reads them a tile ahead."""
    TILES: tl.constexpr = SPARSE_KV // BLOCK_N
    UNIT: tl.constexpr = SPARSE_KV if KV_UNIT == 0 else KV_UNIT
    # One flat loop over every tile of every listed block, so that Triton's
    # pipeliner prefetches the next tile's K and V across block boundaries too.
    for it in range(0, num_blocks * TILES):
        start_n = kv_block * UNIT + (it % TILES) * BLOCK_N
        if MIXED:
            kv_block = next_listed_of_two(IDX, FIDX, first, f_first, it, num_part, num_blocks, TILES, CONTIGUOUS)
        else:
            kv_block = next_listed(IDX, first, it, num_blocks, TILES, CONTIGUOUS)
        acc, l_i, m_i = forward_step(
            acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            start_n, partial_step(it, num_part, TILES), off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
            SCORE_FN, MASK_FN, HAS_SCORE, IS_FULL, MIXED, QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N,
            KV_DIVISIBLE, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, EAGER_MASK, TMA,
        )
    return acc, l_i, m_i


@triton.jit
def partial_step(it, num_part, TILES: tl.constexpr):
    """Whether step ``it`` of one loop over a row's ``num_part`` partial blocks and then its full
    ones (``TILES`` steps a block) is a partial block's."""
    return it < num_part * TILES  # a partial block's step


@triton.jit
def forward_step(
    acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    start_n, partial, off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
    SCORE_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    IS_FULL: tl.constexpr, MIXED: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_DIVISIBLE: tl.constexpr, PRESCALE: tl.constexpr, RAW_MAX: tl.constexpr, FP32_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EAGER_MASK: tl.constexpr, TMA: tl.constexpr = False,
):
    """One step of ``forward_tiles`` (and of ``forward_persistent_kernel``): the keys ``start_n`` on
    (BLOCK_N of them) folded into (acc, l_i, m_i). MIXED applies the mask where ``partial``;
    otherwise IS_FULL says whether the step is a full block's (no mask)."""
    offs_d = tl.arange(0, QK_PAD)
    offs_v = tl.arange(0, V_PAD)
    tl.static_assert(RAW_MAX or not HAS_SCORE, "a score mod's scores are in natural units: RAW_MAX")
    if HAS_SCORE:
        unit = LOG2E  # RAW_MAX's factor from the scores s below to base 2
    else:
        unit = SM_SCALE * LOG2E
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # K is read transposed: [QK_PAD, BLOCK_N].
    if TMA:
        # K and V are TMA descriptors over [B, Hkv, S, D]; stride_kn and stride_kd carry the
        # key head's batch and head (``forward_kernel``). Rows past S come back zero.
        kT = tl.trans(K.load([stride_kn, stride_kd, start_n, 0]).reshape(BLOCK_N, QK_PAD))
    else:
        kT = load_tile(K, offs_d, offs_n, stride_kd, stride_kn, QK_DIM, KV_LEN,
                       QK_DIM != QK_PAD, not KV_DIVISIBLE)
    qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_PRECISION, UPCAST)
    n2 = offs_n[None, :]
    if KV_DIVISIBLE:
        n_mod = n2
    else:
        n_mod = n2 % KV_LEN  # keep mods' table reads in range
    if HAS_SCORE:
        # Natural units (RAW_MAX): with PRESCALE q holds scale * log2(e), so qk's scale is ln 2.
        if PRESCALE:
            s = SCORE_FN(qk, LN2, off_z, off_h, m_mod, n_mod, B0, B1, B2, B3)
        else:
            s = SCORE_FN(qk, SM_SCALE, off_z, off_h, m_mod, n_mod, B0, B1, B2, B3)
    elif PRESCALE:
        s = qk
    elif RAW_MAX:
        s = qk  # scaled inside the exponent's FMA below
    else:
        s = qk * (SM_SCALE * LOG2E)  # one multiply per score
    if MIXED and EAGER_MASK:
        # The mask computed on every step, applied in the branch: its loads are then in the
        # loop's body, where the pipeliner prefetches them (ONE_LOOP_EAGER_MASK).
        keep = MASK_FN(off_z, off_h, m_mod, n_mod, B0, B1, B2, B3)
        if partial:
            s = tl.where(keep, s, float("-inf"))
    elif MIXED:
        # A branch, not a select: full blocks skip the mask's work (its loads are then not
        # prefetched by the pipeliner, as the two loops' partial one prefetches them).
        if partial:
            s = tl.where(MASK_FN(off_z, off_h, m_mod, n_mod, B0, B1, B2, B3), s, float("-inf"))
    if not IS_FULL and not MIXED:
        keep = MASK_FN(off_z, off_h, m_mod, n_mod, B0, B1, B2, B3)
        if not KV_DIVISIBLE:
            keep = keep & (n2 < KV_LEN)
        s = tl.where(keep, s, float("-inf"))
    elif not KV_DIVISIBLE:
        s = tl.where(n2 < KV_LEN, s, float("-inf"))

    if RAW_MAX:
        m_new = tl.maximum(m_i, tl.max(s, 1) * unit)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing allowed so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    # ROWS_SAFE does not drop this guard: it promises an allowed key per row, not in the
    # first tile a row visits (found by the fuzzer: sliding_window(45) on 16 x 16 blocks
    # gave NaN in 70 of 635 rows; PyTorch's template drops the guard under the promise).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    if RAW_MAX:
        p = tl.math.exp2(s * unit - m_use[:, None])
    else:
        p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = V.load([stride_vn, stride_vd, start_n, 0]).reshape(BLOCK_N, V_PAD)
    else:
        v = load_tile(V, offs_n, offs_v, stride_vn, stride_vd, KV_LEN, V_DIM,
                      not KV_DIVISIBLE, V_DIM != V_PAD)
    acc = mma(cast(p, v.dtype, UPCAST), v, acc * alpha[:, None], FP32_PRECISION, UPCAST)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def forward_kernel(
    Q, K, V, OUT, LSE, MAX,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    B0, B1, B2, B3,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    SM_SCALE, HQ, Q_LEN, KV_LEN, ZKV, SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, NUM_KV_SPARSE,
    SCORE_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    HAS_FULL: tl.constexpr, G: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr,
    ROWS_SAFE: tl.constexpr, CONTIGUOUS: tl.constexpr, PRESCALE: tl.constexpr, RAW_MAX: tl.constexpr,
    OUTPUT_LSE: tl.constexpr, OUTPUT_MAX: tl.constexpr,
    FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ONE_LOOP: tl.constexpr = False,
    ONE_LOOP_EAGER_MASK: tl.constexpr = False, KV_UNIT: tl.constexpr = 0, PART_KV_DIVISIBLE: tl.constexpr = True,
    TMA: tl.constexpr = False,
):
    # Query tiles run last-first: under a causal mask the last tiles have the
    # most blocks, and starting them first leaves the short ones for the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_zh = tl.program_id(1)
    off_z, off_h, row, q_off, k_off, v_off = tile_of(
        pid_m, pid_zh, HQ, ZKV, G, stride_qz, stride_qh, stride_kz, stride_kh, stride_vz, stride_vh,
        SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, BLOCK_M, SPARSE_Q)
    Q += q_off
    if TMA:
        # The descriptors' coordinates of the key head (forward_step reads them from the strides).
        stride_kn = off_z % ZKV
        stride_kd = off_h // G
        stride_vn = stride_kn
        stride_vd = stride_kd
    else:
        K += k_off
        V += v_off

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # q stays in SRAM for the whole row walk.
    q, m_mod = query_tile(Q, offs_m, stride_qm, stride_qd, Q_LEN, SM_SCALE, QK_DIM, QK_PAD, Q_DIVISIBLE, PRESCALE, UPCAST)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_PAD], dtype=tl.float32)

    part_idx = KV_IDX + row.to(tl.int64) * NUM_KV_SPARSE
    n_part, n_full = row_counts(KV_NUM, FULL_NUM, row, HAS_FULL)
    if ONE_LOOP and HAS_FULL:
        acc, l_i, m_i = forward_tiles(
            acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            part_idx, n_part + n_full, FULL_IDX + row.to(tl.int64) * NUM_KV_SPARSE, n_part,
            off_z, off_h, offs_m, m_mod, Q_LEN, KV_LEN, SM_SCALE, B0, B1, B2, B3,
            SCORE_FN, MASK_FN, HAS_SCORE, False, True,
            QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
            PART_KV_DIVISIBLE, ROWS_SAFE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, ONE_LOOP_EAGER_MASK,
            KV_UNIT=KV_UNIT, TMA=TMA,
        )
    else:
        acc, l_i, m_i = forward_tiles(
            acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            part_idx, n_part, part_idx, n_part,
            off_z, off_h, offs_m, m_mod, Q_LEN, KV_LEN, SM_SCALE, B0, B1, B2, B3,
            SCORE_FN, MASK_FN, HAS_SCORE, False, False,
            QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
            PART_KV_DIVISIBLE, ROWS_SAFE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, KV_UNIT=KV_UNIT,
            TMA=TMA,
        )
        if HAS_FULL:
            full_idx = FULL_IDX + row.to(tl.int64) * NUM_KV_SPARSE
            acc, l_i, m_i = forward_tiles(
                acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                full_idx, n_full, full_idx, n_full,
                off_z, off_h, offs_m, m_mod, Q_LEN, KV_LEN, SM_SCALE, B0, B1, B2, B3,
                SCORE_FN, MASK_FN, HAS_SCORE, True, False,
                QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
                KV_DIVISIBLE, ROWS_SAFE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, KV_UNIT=KV_UNIT,
                TMA=TMA,
            )

    store_rows(acc, l_i, m_i, OUT, LSE, MAX, off_z, off_h, pid_zh, offs_m, stride_oz, stride_oh, stride_om, stride_od,
               Q_LEN, V_DIM, V_PAD, OUTPUT_LSE, OUTPUT_MAX, UPCAST)


@triton.jit
def tile_of(pid_m, pid_zh, HQ, ZKV, G: tl.constexpr, stride_qz, stride_qh, stride_kz, stride_kh, stride_vz, stride_vh,
            SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, BLOCK_M: tl.constexpr, SPARSE_Q: tl.constexpr):
    """A query tile's batch and head, its block-mask row (b % MB, h % MH broadcast), and the offsets
    of its queries and of its key and value head (int64)."""
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    off_zkv = off_z % ZKV
    off_hkv = off_h // G
    q_block = (pid_m * BLOCK_M) // SPARSE_Q
    row = ((off_z % SPARSE_Z) * SPARSE_H + off_h % SPARSE_H) * NUM_Q_SPARSE + q_block
    q_off = off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_off = off_zkv.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    v_off = off_zkv.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    return off_z, off_h, row, q_off, k_off, v_off


@triton.jit
def query_tile(Q, offs_m, stride_qm, stride_qd, Q_LEN, SM_SCALE, QK_DIM: tl.constexpr, QK_PAD: tl.constexpr,
               Q_DIVISIBLE: tl.constexpr, PRESCALE: tl.constexpr, UPCAST: tl.constexpr):
    """(q, m_mod): the query tile (scaled by scale * log2(e) with PRESCALE) and its rows' indices
    for the mods (wrapped into range past Q_LEN)."""
    offs_d = tl.arange(0, QK_PAD)
    q = load_tile(Q, offs_m, offs_d, stride_qm, stride_qd, Q_LEN, QK_DIM, not Q_DIVISIBLE, QK_DIM != QK_PAD)
    if PRESCALE:
        q = cast(q.to(tl.float32) * (SM_SCALE * LOG2E), Q.dtype.element_ty, UPCAST)
    return q, mod_rows(offs_m, Q_LEN, Q_DIVISIBLE)


@triton.jit
def mod_rows(offs_m, Q_LEN, Q_DIVISIBLE: tl.constexpr):
    """The rows' query indices as the mods see them: wrapped into range past Q_LEN."""
    if Q_DIVISIBLE:
        return offs_m[:, None]
    else:
        return offs_m[:, None] % Q_LEN


@triton.jit
def row_counts(KV_NUM, FULL_NUM, row, HAS_FULL: tl.constexpr):
    """(partial, full) blocks the block-mask row ``row`` lists."""
    n_part = tl.load(KV_NUM + row)
    if HAS_FULL:
        n_full = tl.load(FULL_NUM + row)
    else:
        n_full = 0
    return n_part, n_full


@triton.jit
def store_rows(acc, l_i, m_i, OUT, LSE, MAX, off_z, off_h, pid_zh, offs_m, stride_oz, stride_oh, stride_om, stride_od,
               Q_LEN, V_DIM: tl.constexpr, V_PAD: tl.constexpr, OUTPUT_LSE: tl.constexpr, OUTPUT_MAX: tl.constexpr,
               UPCAST: tl.constexpr):
    """The epilogue: out = acc / l (the caller's layout and dtype), the LSE and the maximum in
    natural units (float32, rows of ``pid_zh``)."""
    offs_v = tl.arange(0, V_PAD)
    # A fully masked row has l = 0 and m = -inf: out = 0 and lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (OUT + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_v[None, :] * stride_od)
    o_mask = (offs_m[:, None] < Q_LEN) & (offs_v[None, :] < V_DIM)
    tl.store(o_ptrs, cast(out, OUT.dtype.element_ty, UPCAST), mask=o_mask)
    stat_offs = pid_zh.to(tl.int64) * Q_LEN + offs_m
    if OUTPUT_LSE:
        tl.store(LSE + stat_offs, (m_i + tl.math.log2(l_safe)) * LN2, mask=offs_m < Q_LEN)
    if OUTPUT_MAX:
        tl.store(MAX + stat_offs, m_i * LN2, mask=offs_m < Q_LEN)



@triton.jit
def tile_at(t, N_M, HQ, ZKV, G: tl.constexpr, stride_qz, stride_qh, stride_kz, stride_kh, stride_vz, stride_vh,
            SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, BLOCK_M: tl.constexpr, SPARSE_Q: tl.constexpr):
    """``tile_of`` for the persistent forward's tile ``t``: (batch x head) ``t // N_M``, query tiles
    last-first within it as the grid's are."""
    pid_zh = t // N_M
    pid_m = N_M - 1 - t % N_M
    off_z, off_h, row, q_off, k_off, v_off = tile_of(
        pid_m, pid_zh, HQ, ZKV, G, stride_qz, stride_qh, stride_kz, stride_kh, stride_vz, stride_vh,
        SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, BLOCK_M, SPARSE_Q)
    return pid_zh, pid_m, off_z, off_h, row, q_off, k_off, v_off


@triton.jit
def forward_persistent_kernel(
    Q, K, V, OUT, LSE, MAX,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    B0, B1, B2, B3,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    SM_SCALE, HQ, Q_LEN, KV_LEN, ZKV, SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, NUM_KV_SPARSE,
    TABLE, COUNTS, K_MAX, N_M,
    SCORE_FN: tl.constexpr, MASK_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
    HAS_FULL: tl.constexpr, G: tl.constexpr,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, QK_PAD: tl.constexpr, V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr,
    ROWS_SAFE: tl.constexpr, CONTIGUOUS: tl.constexpr, PRESCALE: tl.constexpr, RAW_MAX: tl.constexpr,
    OUTPUT_LSE: tl.constexpr, OUTPUT_MAX: tl.constexpr,
    FP32_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ONE_LOOP: tl.constexpr = False,
    ONE_LOOP_EAGER_MASK: tl.constexpr = False, KV_UNIT: tl.constexpr = 0, PART_KV_DIVISIBLE: tl.constexpr = True,
):
    """``forward_kernel``'s work, each program walking a list of query tiles (``PERSISTENT_FWD``;
    one program per slot the GPU holds at once): program p takes the ``COUNTS[p]`` tiles
    ``TABLE[p, :]`` (``kernels.api.Sparse.persistent_tiles``) in turn. While it walks one tile, it
    reads the next one's coordinates, list counts, first list entries and queries, where the grid's
    programs each start on those loads with nothing to hide them behind (the ncu profile of the
    document forward at S=4k: 30 % of the warps' samples before, between and after the loops)."""
    pid = tl.program_id(0)
    n_k = tl.load(COUNTS + pid)
    mine = TABLE + pid.to(tl.int64) * K_MAX
    # The first tile's coordinates, counts, first list entries and queries; in the loop, the next
    # tile's are read while this one runs, and the id of the one after (loads issued a tile
    # before they are used; the ids past the list repeat its last).
    t2 = tl.load(mine)
    t3 = tl.load(mine + tl.minimum(1, tl.maximum(n_k - 1, 0)))
    pid_zh2, pid_m2, off_z2, off_h2, row2, q_off2, k_off2, v_off2 = tile_at(
        t2, N_M, HQ, ZKV, G, stride_qz, stride_qh, stride_kz, stride_kh, stride_vz, stride_vh,
        SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, BLOCK_M, SPARSE_Q)
    n_part2, n_full2 = row_counts(KV_NUM, FULL_NUM, row2, HAS_FULL)
    base2 = row2.to(tl.int64) * NUM_KV_SPARSE
    first2, f_first2, _ = list_start(KV_IDX + base2, FULL_IDX + base2, n_part2, HAS_FULL)
    offs_m2 = pid_m2 * BLOCK_M + tl.arange(0, BLOCK_M)
    q2, m_mod2 = query_tile(Q + q_off2, offs_m2, stride_qm, stride_qd, Q_LEN, SM_SCALE, QK_DIM, QK_PAD, Q_DIVISIBLE,
                            PRESCALE, UPCAST)
    for k in range(0, n_k):
        pid_zh, off_z, off_h, k_off, v_off = pid_zh2, off_z2, off_h2, k_off2, v_off2
        n_part, n_full, base, first, f_first = n_part2, n_full2, base2, first2, f_first2
        offs_m, q, m_mod = offs_m2, q2, m_mod2
        # The next tile, and the id of the one after it.
        t2 = t3
        t3 = tl.load(mine + tl.minimum(k + 2, n_k - 1))
        pid_zh2, pid_m2, off_z2, off_h2, row2, q_off2, k_off2, v_off2 = tile_at(
            t2, N_M, HQ, ZKV, G, stride_qz, stride_qh, stride_kz, stride_kh,
            stride_vz, stride_vh, SPARSE_Z, SPARSE_H, NUM_Q_SPARSE, BLOCK_M, SPARSE_Q)
        n_part2, n_full2 = row_counts(KV_NUM, FULL_NUM, row2, HAS_FULL)
        base2 = row2.to(tl.int64) * NUM_KV_SPARSE
        first2, f_first2, _ = list_start(KV_IDX + base2, FULL_IDX + base2, n_part2, HAS_FULL)
        offs_m2 = pid_m2 * BLOCK_M + tl.arange(0, BLOCK_M)
        q2, m_mod2 = query_tile(Q + q_off2, offs_m2, stride_qm, stride_qd, Q_LEN, SM_SCALE, QK_DIM, QK_PAD,
                                Q_DIVISIBLE, PRESCALE, UPCAST)

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, V_PAD], dtype=tl.float32)
        if ONE_LOOP and HAS_FULL:
            acc, l_i, m_i = forward_walk(
                acc, l_i, m_i, q, K + k_off, V + v_off, stride_kn, stride_kd, stride_vn, stride_vd,
                KV_IDX + base, n_part + n_full, FULL_IDX + base, n_part, first, f_first,
                tl.where(n_part > 0, first, f_first),
                off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
                SCORE_FN, MASK_FN, HAS_SCORE, False, True, QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
                PART_KV_DIVISIBLE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, ONE_LOOP_EAGER_MASK, KV_UNIT,
            )
        else:
            acc, l_i, m_i = forward_walk(
                acc, l_i, m_i, q, K + k_off, V + v_off, stride_kn, stride_kd, stride_vn, stride_vd,
                KV_IDX + base, n_part, KV_IDX + base, n_part, first, first, first,
                off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
                SCORE_FN, MASK_FN, HAS_SCORE, False, False, QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N, SPARSE_KV,
                PART_KV_DIVISIBLE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, False, KV_UNIT,
            )
            if HAS_FULL:
                acc, l_i, m_i = forward_walk(
                    acc, l_i, m_i, q, K + k_off, V + v_off, stride_kn, stride_kd, stride_vn, stride_vd,
                    FULL_IDX + base, n_full, FULL_IDX + base, n_full, f_first, f_first, f_first,
                    off_z, off_h, m_mod, KV_LEN, SM_SCALE, B0, B1, B2, B3,
                    SCORE_FN, MASK_FN, HAS_SCORE, True, False, QK_DIM, V_DIM, QK_PAD, V_PAD, BLOCK_M, BLOCK_N,
                    SPARSE_KV, KV_DIVISIBLE, CONTIGUOUS, PRESCALE, RAW_MAX, FP32_PRECISION, UPCAST, False, KV_UNIT,
                )
        store_rows(acc, l_i, m_i, OUT, LSE, MAX, off_z, off_h, pid_zh, offs_m, stride_oz, stride_oh, stride_om, stride_od,
                   Q_LEN, V_DIM, V_PAD, OUTPUT_LSE, OUTPUT_MAX, UPCAST)


def head_pad(dim: int) -> int:
    """Head dims that are not powers of two are padded (masked loads) to the next one."""
    return max(16, _runtime.next_power_of_2(dim))


def head_pads(E: int, Ev: int) -> tuple:
    """(QK_PAD, V_PAD) for the tiles: V is padded to at least the padded E.

    Triton 3.6 on sm_90 miscompiles some forwards whose V tile is narrower than
    their K tile. Measured on the H100: bf16, 64 x 64 tiles, E=40 (padded to 64)
    with Ev=24 (padded to 32) gave a garbage output and, with one stage, an
    illegal memory access. On the H200 (found by the false-alarm count, seed
    8012): E=32, Ev=2 (pads 32 and 16), 128 x 64 tiles, 1 stage: compute-sanitizer
    reports an out-of-bounds shared-memory read in a ``tl.dot`` of the forward,
    and 2 stages give NaN in a third of the output; the same case with Ev=32 is
    right, as is every case under the interpreter
    (``tests/cases/narrow-v-tile-miscompile-bf16.json``). A sweep at 4 warps
    (docs/fuzz/h200-narrow-v-tile-sweep.txt): with 1 stage, pads (32, 16),
    (64, 16), (64, 32) and (128, 16) fail (garbage or an illegal access) and
    (128, 64) passes; all pass padded. Padding V up to the K tile's width costs a
    wider P @ V only where Ev < E, and avoids that code path.
    """
    qk, v = head_pad(E), head_pad(Ev)
    return qk, max(v, qk)


def list_bounds(unit, overrun: bool, length: int, block: int) -> tuple:
    """``(UNIT, DIVISIBLE, PART_DIVISIBLE)`` of a kernel's loops over one axis's lists (keys: the
    forward and the dQ kernel; queries: the dK/dV kernel). Block numbers (``unit`` None): UNIT 0,
    and both loops bound their positions unless ``block`` divides ``length``. Shifted windows
    (``Sparse.kv_unit`` / ``q_unit``): a full window lies inside ``length``, so the full loop never
    bounds, and a partial one may end past it (``overrun``: ``Sparse.kv_overrun`` / ``q_overrun``)."""
    if not unit:
        divisible = length % block == 0
        return 0, divisible, divisible
    return unit, True, not overrun


# PERSISTENT_FWD: the forward's programs each walk a list of query tiles
# (``forward_persistent_kernel``), one program per slot the GPU holds at once, where the grid
# runs a program per tile. None: ``persistent_for``'s rule; True or False forces it.
# PERSISTENT_TILE_COST: a tile's start and
# stores, in steps, when the tiles are dealt to equal work. PERSISTENT_PROGRAMS: the programs, where
# not None (else the multiprocessors times the programs one holds, read from the compiled kernel;
# in the interpreter, 3, so that a test walks several tiles a program).
PERSISTENT_FWD = False
PERSISTENT_TILE_COST = 2
PERSISTENT_PROGRAMS = None
_per_sm: dict = {}


# TMA_KV: the grid forward reads its key and value tiles through TMA descriptors over [B, Hkv, S, D]
# (``tma_kv_for``), where the pointer loads issue a cp.async per 16 bytes and compute every address.
# None (the default): on sm90 for head dims of at least TMA_KV_MIN_DIM where the tensors allow it
# (``tma_ready``), but not on two loops whose mask loads (``tma_kv_for``: at S=16k the document
# forward lost a program a multiprocessor to the mbarriers' shared memory, 24 % slower); True forces
# it there on any arch (the interpreter too), False never. sm_90 SASS
# (document, S=4k, D=128): 499 instructions a loop trip against 531, 158 registers against 168. On
# the H100 (docs/PERFORMANCE.md, thirty-fifth session; bench.py, GPU pace, 3 rounds) the forward
# was 4 to 6 % faster on document, GQA document and causal at S=1k and 4k, and 0 to 4 % on every
# other S=4k row at D=128; at D=64 it was 3 to 5 % faster on none, prefix LM and causal but 4 to
# 5 % slower on document, sliding window and block-sparse, so D=64 keeps the pointer loads. There
# (thirty-sixth session) the short rows' 64 x 64 tiles with 3 stages take 57,344 bytes of shared
# memory with pointers, four programs' share of a multiprocessor exactly, and 57,400 to 58,368
# with TMA's mbarriers: three programs. With 2 stages TMA holds four again (40,992 to 41,984
# bytes); on the H200 that ran causal 3 % and prefix LM 8 % faster than the pointer loads, and
# document 1 to 2.5 % and block-sparse 2 % slower (sliding window equal). On the H100 (thirty-
# seventh session): causal 0.8 % and prefix LM 5.2 % faster, block-sparse 1.9 % and document at 1k
# 2.5 % slower, and 64 x 128 pointer tiles on 2 stages beat it on every short row
# (kernels.api.SHORT_ROWS_FWD_D64), so D=64 stays on pointers. The outputs equal the pointer
# loads' bit for bit (GPU and interpreter tests, tests/test_kernels.py).
TMA_KV = None
TMA_KV_MIN_DIM = 128


def tma_ready(*tensors) -> bool:
    """Whether TMA descriptors over ``tensors`` ([B, H, N, D], one tile of rows at a time) can stand
    in for their pointers: 16-bit elements, a head dim that is a power of two from 16 to 256 (no
    padding columns, a box TMA takes), contiguous rows, and the base and every other stride 16-byte
    aligned and not zero (what a descriptor requires)."""
    for t in tensors:
        shape, strides = t.shape, t.stride()
        d = shape[-1]
        if t.element_size() != 2 or strides[-1] != 1 or t.data_ptr() & 15 or not 16 <= d <= 256 or d & (d - 1):
            return False
        if 0 in shape or any(st == 0 or st & 7 for st in strides[:-1]):  # 8 elements: 16 bytes
            return False
    return True


def tma_descriptor(t, block: list):
    """A host TMA descriptor over ``t`` ([B, H, N, D], boxes of ``block``), for a tensor ``tma_ready``
    passed: Triton's ``TensorDescriptor`` without its constructor's checks, which repeat
    ``tma_ready``'s and cost about 6 us a descriptor on the host (six a training step)."""
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = t, t.shape, t.stride(), block, "zero"
    return desc


def tma_rule(flag, plan, device) -> bool:
    """A TMA flag (``TMA_KV``; ``kernels.backward.TMA_DQ``, ``TMA_DKDV``) resolved for a call: a
    bool as it is, None as on for sm90 (compiled Hopper code; the interpreter runs pointers)."""
    from .api import _arch

    if flag is not None:
        return bool(flag)
    return _arch(device, plan.interpret) == "sm90"


def tma_kv_for(plan, key, value, one_loop: bool) -> bool:
    """Whether the forward's key and value tiles come through TMA descriptors: by ``TMA_KV``
    (``tma_rule``), where ``tma_ready``. None also asks for head dims of at least
    ``TMA_KV_MIN_DIM``, and leaves out a forward on two loops whose mask loads from memory (the
    document ids): its partial loop's stages of those loads, with the mbarriers TMA adds, take more
    shared memory than two programs a multiprocessor share on 64 x 64 tiles with 3 stages (sm_90,
    D=128: 115,768 bytes against the pointer loads' 115,712, the limit). On the H100 (thirty-fifth
    session) the document forward at S=16k, which takes two loops, held one program a
    multiprocessor that way and was 24 % slower; every other row of bench.py's matrix at D=128
    keeps its programs a multiprocessor (``benchmarks/codegen.py``, 1k, 4k and 16k)."""
    if TMA_KV is None and (min(plan.E, plan.Ev) < TMA_KV_MIN_DIM or (not one_loop and plan.program.mask_loads)):
        return False
    return tma_rule(TMA_KV, plan, key.device) and tma_ready(key, value)


def persistent_for(plan, device) -> bool:
    """Whether the forward takes the persistent kernel: ``PERSISTENT_FWD`` when it is a bool (False,
    the default); with None, the rule the thirty-fourth session timed on the H100 and dropped: on
    sm90 for a mask that loads nothing, with no score mod, each tile in one loop. It ran causal and
    GQA causal 3 to 4 % faster at S=1k and 4k, prefix LM, block-sparse and sliding window within
    1 %, and the S=16k rows 6 to 8 % slower (docs/PERFORMANCE.md); document rows and score mods
    were as fast or slower on it."""
    from .api import _arch

    if PERSISTENT_FWD is not None:
        return bool(PERSISTENT_FWD)
    prog = plan.program
    return (prog.has_mask and not prog.mask_loads and not prog.has_score
            and _arch(device, plan.interpret) == "sm90")


def programs_per_sm(compiled, num_warps: int, device) -> int:
    """How many programs of ``compiled`` one multiprocessor of ``device`` holds at once, by its
    shared memory, registers and warps."""
    import torch

    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    shared = max(int(compiled.metadata.shared), 1)
    by_smem = smem // (shared + 1024)  # (each block reserves 1 KiB)
    per_warp = -(-max(int(compiled.n_regs), 1) * 32 // 256) * 256  # allocated 256 registers at a time
    by_regs = regs // (per_warp * num_warps)
    return max(1, min(by_smem, by_regs, 64 // num_warps, 32))


def run_forward(plan, query, key, value):
    """Launch the forward kernel: returns out (query's dtype and layout), lse and max (float32)."""
    import torch

    from .api import _empty_like_layout, sm_count

    B, Hq, L, Ev = plan.B, plan.Hq, plan.L, plan.Ev
    sp, opt = plan.sparse, plan.options
    out = _empty_like_layout(query, (B, Hq, L, Ev), query.dtype)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device)
    # Without return_max the kernel gets lse as a never-written stand-in pointer;
    # autograd must not see one tensor returned as two outputs, so mx is separate.
    mx = torch.empty((B, Hq, L) if plan.return_max else (0,), dtype=torch.float32, device=query.device)
    tiles = opt.fwd.tiles
    qk_pad, v_pad = head_pads(plan.E, Ev)
    grid = (_runtime.cdiv(L, tiles["BLOCK_M"]), B * Hq)
    prog = plan.program
    full_num = sp.full_kv_num if sp.has_full else sp.kv_num
    full_idx = sp.full_kv_idx if sp.has_full else sp.kv_idx
    MB, MH, nQ, nKV = sp.kv_idx.shape
    kv_unit, kv_divisible, part_kv_divisible = list_bounds(sp.kv_unit, sp.kv_overrun, plan.S, sp.kv_block)
    args = (query, key, value, out, lse, mx if plan.return_max else lse,
            sp.kv_num, sp.kv_idx, full_num, full_idx,
            *plan.buffer_args(query),
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            plan.scale, Hq, L, plan.S, plan.Bk, MB, MH, nQ, nKV)
    kernel, constexprs = forward_kernel, dict(ONE_LOOP=one_loop_for(prog, sp, L))
    if not persistent_for(plan, query.device) and tma_kv_for(plan, key, value, constexprs["ONE_LOOP"]):
        k_desc = tma_descriptor(key, [1, 1, tiles["BLOCK_N"], qk_pad])
        v_desc = tma_descriptor(value, [1, 1, tiles["BLOCK_N"], v_pad])
        args = (query, k_desc, v_desc) + args[3:]
        constexprs["TMA"] = True
    if persistent_for(plan, query.device):
        n_m = grid[0]
        per_key = (qk_pad, v_pad, tiles["BLOCK_M"], tiles["BLOCK_N"], opt.fwd.num_warps, opt.fwd.num_stages,
                   str(query.device))
        if PERSISTENT_PROGRAMS is not None:
            programs = PERSISTENT_PROGRAMS
        elif plan.interpret:
            programs = 3
        else:
            programs = sm_count(query.device) * _per_sm.get(per_key, 2)
        table, counts = sp.persistent_tiles(B, Hq, L, tiles["BLOCK_M"], sp.kv_block // tiles["BLOCK_N"], programs,
                                            PERSISTENT_TILE_COST)
        kernel = forward_persistent_kernel
        if ONE_LOOP is None and PERSISTENT_FWD is None:
            constexprs = dict(ONE_LOOP=True)
        grid = (counts.numel(),)
        args = args + (table, counts, table.shape[1], n_m)
    maxnreg = fwd_maxnreg(plan)
    cap = {} if maxnreg is None else {"maxnreg": maxnreg}
    compiled = _runtime.launch(
        kernel, grid, *args,
        SCORE_FN=prog.score_fn, MASK_FN=prog.mask_fn, HAS_SCORE=prog.has_score,
        HAS_FULL=sp.has_full, G=plan.G,
        QK_DIM=plan.E, V_DIM=Ev, QK_PAD=qk_pad, V_PAD=v_pad,
        BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"],
        SPARSE_Q=sp.q_block, SPARSE_KV=sp.kv_block,
        Q_DIVISIBLE=L % tiles["BLOCK_M"] == 0, KV_DIVISIBLE=kv_divisible,
        KV_UNIT=kv_unit, PART_KV_DIVISIBLE=part_kv_divisible,
        ROWS_SAFE=opt.rows_safe, CONTIGUOUS=opt.contiguous, PRESCALE=opt.prescale,
        RAW_MAX=prog.has_score or (not opt.prescale and plan.scale > 0),
        OUTPUT_LSE=True, OUTPUT_MAX=plan.return_max,
        FP32_PRECISION=plan.fp32_precision, UPCAST=plan.interpret,
        ONE_LOOP_EAGER_MASK=ONE_LOOP_EAGER_MASK, **constexprs,
        num_warps=opt.fwd.num_warps, num_stages=opt.fwd.num_stages,
        options=opt.fwd.options_for("BLOCK_M", "BLOCK_N"),
        **cap,
    )
    if (kernel is forward_persistent_kernel and not plan.interpret and per_key not in _per_sm
            and hasattr(compiled, "n_regs")):
        _per_sm[per_key] = programs_per_sm(compiled, opt.fwd.num_warps, query.device)
    return out, lse, mx
