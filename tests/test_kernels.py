"""Our Triton kernels against the float64 oracle: forward, backward, options, layouts.

On the CPU the kernels run under the Triton interpreter, so sizes are small;
the ``gpu`` tests at the end repeat the grid at realistic sizes on a GPU:

    python -m pytest -m gpu -n 0 tests/test_kernels.py
"""

from __future__ import annotations


import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import kernels
import oracle
from kernels import mods
from properties.check import compare_with_oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DEVICE = "cpu"


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, device, seed=0, Bk=None):
    g = torch.Generator().manual_seed(seed)
    Bk = Bk or B

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    q, k, v = rnd(B, Hq, L, E), rnd(Bk, Hkv, S, E), rnd(Bk, Hkv, S, Ev)
    do, dl = rnd(B, Hq, L, Ev), torch.randn(B, Hq, L, generator=g).to(device)
    return [t.requires_grad_() for t in (q, k, v)], do, dl


def check(B=1, Hq=2, Hkv=None, L=64, S=64, E=32, Ev=None, dtype=torch.float16, *, score_mod=None,
          mask_mod=None, block_size=32, kernel_options=None, Bk=None, device=DEVICE, seed=0,
          grads=True, mask_B=None, mask_H=None):
    Hkv = Hkv or Hq
    Ev = Ev or E
    (q, k, v), do, dl = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, device, seed, Bk)
    bm = None
    if mask_mod is not None:
        bm = create_block_mask(mask_mod, B if mask_B is None else mask_B, Hq if mask_H is None else mask_H,
                               L, S, device=device, BLOCK_SIZE=block_size)
    return compare_with_oracle(
        kernels.flex_attention, q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
        kernel_options=kernel_options, grad_out=do if grads else None, grad_lse=dl if grads else None,
        want_max=True,
    )


# --------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("L,S", [(1, 1), (1, 17), (17, 17), (127, 129), (128, 128), (129, 77), (300, 260)])
def test_lengths(L, S):
    check(L=L, S=S, mask_mod=mods.causal(), dtype=torch.float16)


@pytest.mark.parametrize("L", [17, 129])
@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_gqa_groups(G, L):
    check(B=1, Hq=2 * G if G != 3 else 3, Hkv=2 if G != 3 else 1, L=L, S=70, mask_mod=mods.sliding_window(20),
          dtype=torch.bfloat16)


@pytest.mark.parametrize("E,Ev", [(16, 16), (40, 24), (64, 64), (128, 128), (24, 72)])
def test_head_dims(E, Ev):
    check(L=130, S=96, E=E, Ev=Ev, mask_mod=mods.causal(), dtype=torch.float32)


@pytest.mark.parametrize("L", [5, 140])
def test_broadcast_kv_batch(L):
    check(B=3, Hq=4, Hkv=2, Bk=1, L=L, S=90, mask_mod=mods.causal(), dtype=torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [9, 200])
def test_dtypes(dtype, L):
    check(B=2, Hq=2, L=L, S=150, E=64, dtype=dtype, mask_mod=mods.prefix_lm(40),
          score_mod=mods.tanh_softcap(8.0))


def test_no_block_mask():
    check(L=150, S=170, dtype=torch.bfloat16, score_mod=mods.alibi.standard(2))


# --------------------------------------------------------------------------
# block masks and mods


def test_per_head_block_mask():
    check(B=2, Hq=3, L=160, S=160, mask_mod=mods.by_head(mods.causal(), mods.sliding_window(16), mods.chunked(48)))


def test_per_batch_block_mask():
    check(B=3, Hq=2, L=150, S=140, mask_mod=mods.by_batch(mods.causal(), mods.not_(mods.causal())))


def test_broadcast_block_mask():
    check(B=2, Hq=4, Hkv=2, L=140, S=140, mask_mod=mods.causal(), mask_B=1, mask_H=1)


def test_fully_masked_rows():
    mask = mods.table_mask.from_seed(2, 150, 140, 0.01, seed=3)  # most rows have no allowed key
    results = check(B=1, Hq=2, L=150, S=140, mask_mod=mask, dtype=torch.bfloat16)
    assert results["out"].ok


@pytest.mark.parametrize("scale", [0.37, -0.37, 0.0])
@pytest.mark.parametrize("masked,alibi", [(False, False), (True, False), (True, True)])
def test_scale_signs_with_large_scores(scale, masked, alibi):
    """Without a score mod, a positive scale takes the forward's raw-maximum path (RAW_MAX:
    the tile maximum of q @ K^T, then one FMA per exponent), which is right only because a
    positive scale keeps the order of the scores. Scores of a few hundred make a wrong shift
    overflow exp2: a negative scale through that path gives inf and NaN, not a near miss, and
    a zero scale turns the masked (and past-the-end) scores' -inf into NaN. A score mod's scores
    take the raw path at any scale (their factor to base 2 is log2(e)): alibi's rows check it."""
    (q, k, v), do, dl = _inputs(1, 2, 2, 160, 140, 32, 32, torch.float32, DEVICE, seed=4)  # L >= 128: no decode
    with torch.no_grad():
        q.mul_(6.0)
        k.mul_(6.0)
    bm = create_block_mask(mods.causal(), 1, 2, 160, 140, device=DEVICE, BLOCK_SIZE=32) if masked else None
    score_mod = mods.alibi(torch.tensor([0.5, -2.0], device=DEVICE)) if alibi else None
    results = compare_with_oracle(kernels.flex_attention, q, k, v, score_mod=score_mod, block_mask=bm, scale=scale,
                                  grad_out=do, grad_lse=dl, want_max=True)
    assert all(r.ok for r in results.values())


def test_rows_a_score_mod_sends_to_minus_infinity():
    """A bias of -inf on whole query rows, without a block mask (every block full, so no mask
    select hides a NaN): those rows have lse = -inf, and the backward must shift them by 0
    (``row_lse2``), or exp2(-inf - -inf) puts NaN in every gradient."""
    B, H, L, S = 1, 2, 160, 144
    table = torch.zeros(B, H, L)
    table[0, 0, 5:40] = float("-inf")
    table[0, 1, 150:] = float("-inf")
    (q, k, v), do, dl = _inputs(B, H, H, L, S, 32, 32, torch.bfloat16, DEVICE, seed=6)
    results = compare_with_oracle(kernels.flex_attention, q, k, v, score_mod=mods.bias(table, "bhq"),
                                  grad_out=do, grad_lse=dl, want_max=True)
    assert all(r.ok for r in results.values())


def test_empty_mask():
    check(L=140, S=100, mask_mod=mods.not_(mods.full()))


MASK_MODS = [
    mods.full(), mods.causal(), mods.sliding_window(33), mods.prefix_lm(50),
    mods.document.from_seed(150, 4, seed=1), mods.document.from_seed(150, 3, seed=2, causal=True),
    mods.dilated_sliding_window(60, 3), mods.chunked(40), mods.and_(mods.causal(), mods.chunked(64)),
    mods.or_(mods.sliding_window(8), mods.prefix_lm(16)), mods.not_(mods.sliding_window(10)),
    mods.table_mask.from_seed(1, 150, 150, 0.3, seed=5), mods.attention_sinks(40, 10),
]


@pytest.mark.parametrize("mask_mod", MASK_MODS, ids=str)
def test_mask_mods(mask_mod):
    check(L=150, S=150, mask_mod=mask_mod, dtype=torch.float16)


SCORE_MODS = [
    mods.identity(), mods.alibi.standard(2), mods.tanh_softcap(5.0),
    mods.relative_position(torch.randn(2, 21, generator=torch.Generator().manual_seed(0))),
    mods.bias.from_seed([2, 130, 120], seed=1, layout="hqk"),
    mods.bias.from_seed([2, 2, 130], seed=2, layout="bhq"),
    mods.bias.from_seed([130, 120], seed=3, layout="qk"),
    mods.chain(mods.alibi.standard(2), mods.tanh_softcap(4.0)),
]


@pytest.mark.parametrize("score_mod", SCORE_MODS, ids=str)
def test_score_mods(score_mod):
    check(B=2, L=130, S=120, score_mod=score_mod, mask_mod=mods.causal(), dtype=torch.bfloat16)


LEARNABLE = [
    lambda: mods.bias.from_seed([2, 130, 120], seed=1, layout="hqk", requires_grad=True),
    lambda: mods.bias.from_seed([2, 2, 130], seed=2, layout="bhq", requires_grad=True),
    lambda: mods.bias.from_seed([130, 120], seed=3, layout="qk", requires_grad=True),
    lambda: mods.bias.from_seed([2], seed=4, layout="h", requires_grad=True),
    lambda: mods.relative_position(torch.randn(2, 31).requires_grad_()),
    lambda: mods.chain(mods.bias.from_seed([2, 2, 130], seed=2, layout="bhq", requires_grad=True),
                       mods.tanh_softcap(3.0)),
]


@pytest.mark.parametrize("make", LEARNABLE, ids=["hqk", "bhq", "qk", "h", "relpos", "bias-then-softcap"])
def test_learnable_bias_gradients(make):
    results = check(B=2, L=130, S=120, score_mod=make(), mask_mod=mods.sliding_window(50), dtype=torch.float32)
    assert "dbuffer0" in results


# --------------------------------------------------------------------------
# options


OPTIONS = [
    {"BLOCK_M": 16, "BLOCK_N": 32},
    {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 16, "bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16},
    {"PRESCALE_QK": True},
    {"ROWS_GUARANTEED_SAFE": True},
    {"FORCE_USE_FLEX_ATTENTION": True},
    {"OUTPUT_LOGSUMEXP": False},
    {"num_warps": 2, "num_stages": 1},
    {"SPLIT_KV": 3},
    {"bwd_BLOCK_N1": 16, "DKDV_NUM_WARPS": 2, "DKDV_NUM_STAGES": 1},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("L", [20, 140])
def test_kernel_options(opts, L):
    check(L=L, S=150, kernel_options=opts, mask_mod=mods.causal() if "ROWS" in str(opts) else mods.sliding_window(40),
          score_mod=mods.alibi.standard(2), dtype=torch.float16)


def test_dkdv_launch_options_reach_the_dkdv_kernel_alone(monkeypatch):
    """DKDV_NUM_WARPS / DKDV_NUM_STAGES launch the dK/dV kernel with its own warps and stages; the
    dQ and delta kernels keep theirs (bwd's, and delta's fixed 4 warps and 1 stage)."""
    from kernels import _runtime

    seen = {}
    launch = _runtime.launch

    def record(kernel, grid, *args, num_stages, **kwargs):
        seen[kernel.fn.__name__] = (kwargs.get("num_warps"), num_stages)
        return launch(kernel, grid, *args, num_stages=num_stages, **kwargs)

    monkeypatch.setattr(_runtime, "launch", record)
    q, k, v = (t.requires_grad_() for t in _qkv())
    opts = {"num_warps": 2, "bwd_num_stages": 2, "DKDV_NUM_WARPS": 4, "DKDV_NUM_STAGES": 1}
    kernels.flex_attention(q, k, v, kernel_options=opts).sum().backward()
    assert seen["dkdv_kernel"] == (4, 1) and seen["dq_kernel"] == (2, 2), seen
    seen.clear()
    kernels.flex_attention(q, k, v, kernel_options={"DKDV_NUM_STAGES": 1, "bwd_num_warps": 2}).sum().backward()
    assert seen["dkdv_kernel"] == (2, 1) and seen["dq_kernel"][0] == 2, seen


def test_blocks_are_contiguous():
    # Causal keeps every row's blocks consecutive, so the promise holds.
    check(L=160, S=160, kernel_options={"BLOCKS_ARE_CONTIGUOUS": True}, mask_mod=mods.causal())


# --------------------------------------------------------------------------
# layouts


def test_non_contiguous_inputs_and_output_layout():
    g = torch.Generator().manual_seed(0)
    # [B, L, H, E] storage viewed as [B, H, L, E], with a storage offset.
    base = torch.randn(2, 140, 3, 40 + 8, generator=g).to(torch.float16)
    q = base[..., 8:].transpose(1, 2).requires_grad_()
    k = torch.randn(2, 3, 40, 120, generator=g).to(torch.float16).transpose(-1, -2).requires_grad_()
    v = torch.randn(2, 3, 120, 64, generator=g).to(torch.float16)[..., ::2].requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = kernels.flex_attention(q, k, v)
    assert out.stride()[1] < out.stride()[2], "output should follow the query's [B, L, H, D] layout"
    bm = create_block_mask(mods.causal(), 2, 3, 140, 120, device=DEVICE, BLOCK_SIZE=32)
    do = torch.randn(2, 3, 140, 32, generator=g).to(torch.float16)
    compare_with_oracle(kernels.flex_attention, q, k, v, block_mask=bm, grad_out=do, grad_lse=None)


def test_deterministic_forward():
    (q, k, v), _, _ = _inputs(1, 2, 2, 140, 130, 32, 32, torch.bfloat16, DEVICE)
    bm = create_block_mask(mods.causal(), 1, 2, 140, 130, device=DEVICE, BLOCK_SIZE=32)
    a = kernels.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    b = kernels.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------
# errors


def _qkv(dtype=torch.float16):
    return [torch.randn(1, 2, 32, 16).to(dtype) for _ in range(3)]


def test_plain_function_score_mod_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="kernels.mods score mod"):
        kernels.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s)


def test_plain_function_mask_mod_is_rejected():
    q, k, v = _qkv()
    bm = create_block_mask(lambda b, h, i, j: i >= j, 1, 2, 32, 32, device=DEVICE, BLOCK_SIZE=16)
    with pytest.raises(TypeError, match="kernels.mods mask mod"):
        kernels.flex_attention(q, k, v, block_mask=bm)


@pytest.mark.parametrize("opts,match", [
    ({"BLOCK_Q": 16}, "Unknown kernel_options"),
    ({"BLOCK_M": 24}, "power of two"),
    ({"BLOCK_M": 64}, "divide the block mask's Q_BLOCK=32"),
    ({"num_warps": 3}, "num_warps'\\] in \\(1, 2, 4, 8, 16\\), got 3"),
    ({"bwd_num_stages": 9}, "'bwd_num_stages'\\] between 1 and 8, got 9"),
    ({"PRESCALE_QK": "yes"}, "PRESCALE_QK"),
    ({"SPLIT_KV": 0}, "SPLIT_KV"),
    ({"DKDV_NUM_WARPS": 3}, "DKDV_NUM_WARPS'\\] in \\(1, 2, 4, 8, 16\\), got 3"),
    ({"DKDV_NUM_STAGES": 0}, "DKDV_NUM_STAGES'\\] between 1 and 8, got 0"),
    ({"REFINE_KV_BLOCK": 24}, "REFINE_KV_BLOCK.*power of two"),
    ({"REFINE_KV_BLOCK": 64}, "REFINE_KV_BLOCK.*=64 to divide the block mask's KV_BLOCK=32"),
    ({"REFINE_KV_BLOCK": 16, "BLOCKS_ARE_CONTIGUOUS": True}, "without BLOCKS_ARE_CONTIGUOUS"),
    ({"REFINE_KV_BLOCK": 16, "BLOCK_N": 32}, "'BLOCK_N'\\]=32 to be at most REFINE_KV_BLOCK=16"),
    ({"REFINE_Q_BLOCK": 48}, "REFINE_Q_BLOCK.*power of two"),
    ({"REFINE_Q_BLOCK": 64}, "REFINE_Q_BLOCK.*=64 to divide the block mask's Q_BLOCK=32"),
    ({"REFINE_Q_BLOCK": 16, "BLOCKS_ARE_CONTIGUOUS": True}, "REFINE_Q_BLOCK without BLOCKS_ARE_CONTIGUOUS"),
    ({"REFINE_Q_BLOCK": 16, "BLOCK_M": 32}, "'BLOCK_M'\\]=32 to be at most REFINE_Q_BLOCK=16: the forward's query"),
])
def test_bad_options(opts, match):
    q, k, v = _qkv()
    bm = create_block_mask(mods.causal(), 1, 2, 32, 32, device=DEVICE, BLOCK_SIZE=32)
    with pytest.raises(ValueError, match=match):
        kernels.flex_attention(q, k, v, block_mask=bm, kernel_options=opts)


REFINE_MASKS = [
    pytest.param(lambda L, S: mods.document.from_seed(L, 5, 0, kv_length=S), 1, 1, id="document"),
    pytest.param(lambda L, S: mods.by_head(mods.sliding_window(40), mods.prefix_lm(70)), 1, 2, id="by-head"),
    pytest.param(lambda L, S: mods.by_batch(mods.causal(), mods.chunked(48)), 1, 1, id="by-batch-broadcast"),
]


@pytest.mark.parametrize("q_sub,kv_sub", [(None, 32), (64, None), (32, 64)])
@pytest.mark.parametrize("make,MB,MH", REFINE_MASKS)
def test_refined_block_lists_describe_the_same_relation(make, MB, MH, q_sub, kv_sub):
    """REFINE_KV_BLOCK's and REFINE_Q_BLOCK's lists (kernels.api._refine_kv): the allowed
    relation of SPEC section 3 is unchanged, for every (b, h) a broadcast list serves and
    across the tails, with fewer listed elements where mask_mod leaves whole sub-blocks empty."""
    from torch.nn.attention.flex_attention import BlockMask

    import oracle
    from kernels import api

    B, H, L, S = 2, 2, 300, 290
    mask_mod = make(L, S)
    bm = create_block_mask(mask_mod, MB, MH, L, S, device=DEVICE, BLOCK_SIZE=128)
    sp = api._cached_block_lists(bm, B, H, L, S, torch.device(DEVICE))
    rf = api._refine_kv(sp, mask_mod, B, H, L, S, kv_sub, q_sub)
    assert (rf.q_block, rf.kv_block) == (q_sub or 128, kv_sub or 128)
    fine = BlockMask.from_kv_blocks(rf.kv_num, rf.kv_idx, rf.full_kv_num, rf.full_kv_idx,
                                    BLOCK_SIZE=(rf.q_block, rf.kv_block), mask_mod=mask_mod, seq_lengths=(L, S))
    want = oracle.block_mask_to_dense(bm, B, H, L, S)
    assert torch.equal(oracle.block_mask_to_dense(fine, B, H, L, S), want)
    # The checker finds the refined lists as sound as the original (a batch-dependent mask_mod
    # under a batch-broadcast block mask is the caller's bug in both; SPEC section 3).
    errors = lambda m: {f.kind for f in oracle.check_block_mask(m, B=B, H=H, Q_LEN=L, KV_LEN=S)
                        if f.severity == "error"}
    assert errors(fine) == errors(bm)
    listed = lambda s, w: int((s.kv_num.sum() + s.full_kv_num.sum()) * w) if s.full_kv_num is not None \
        else int(s.kv_num.sum() * w)
    assert listed(rf, rf.q_block * rf.kv_block) < listed(sp, 128 * 128)


def test_block_lists_of_128_or_more_blocks_list_the_listed_first():
    """Lists 128 or more blocks long keep the listed blocks first, in increasing order. An int8
    sort key (1 * n_cols) overflowed at 128 columns, so that the refined lists and the
    transposed query lists began with unlisted blocks: on the H200 a decode step on a causal
    mask over S=8192, refined to 64 x 64 automatically (128 sub-blocks), returned zeros."""
    from torch.nn.attention.flex_attention import BlockMask

    import oracle
    from kernels import api

    # Refined: 132 sub-blocks of 16 keys, the allowed ones (keys < 1500) first.
    B, H, L, S = 1, 2, 40, 2100
    mask_mod = mods.prefix_lm(1500)
    bm = create_block_mask(mask_mod, 1, 1, L, S, device=DEVICE, BLOCK_SIZE=32)
    sp = api._cached_block_lists(bm, B, H, L, S, torch.device(DEVICE))
    rf = api._refine_kv(sp, mask_mod, B, H, L, S, 16, None)
    assert rf.kv_idx.shape[-1] == 132
    fine = BlockMask.from_kv_blocks(rf.kv_num, rf.kv_idx, rf.full_kv_num, rf.full_kv_idx,
                                    BLOCK_SIZE=(rf.q_block, rf.kv_block), mask_mod=mask_mod, seq_lengths=(L, S))
    assert torch.equal(oracle.block_mask_to_dense(fine, B, H, L, S), oracle.block_mask_to_dense(bm, B, H, L, S))
    # The decode kernel on those lists (L < 128), against the oracle.
    check(B=B, Hq=H, L=L, S=S, E=16, mask_mod=mask_mod, block_size=32, kernel_options={"REFINE_KV_BLOCK": 16},
          grads=False)

    # Transposed: 130 query blocks, row q listing key block q % 2.
    nQ = 130
    num = torch.ones(1, 1, nQ, dtype=torch.int32)
    idx = torch.stack([torch.arange(nQ) % 2, 1 - torch.arange(nQ) % 2], dim=-1).view(1, 1, nQ, 2).to(torch.int32)
    q_num, q_idx = api._transpose_lists(num, idx, 2)
    assert q_num.tolist() == [[[65, 65]]]
    for col in (0, 1):
        assert q_idx[0, 0, col, :65].tolist() == list(range(col, nQ, 2))


@pytest.mark.parametrize("make,MB,MH", REFINE_MASKS)
def test_refined_blocks_match_the_oracle(make, MB, MH):
    """The kernels on refined lists, forward and backward, a learnable bias included."""
    L, S = 150, 140
    bias = mods.bias.from_seed([2, L, S], seed=3, layout="hqk", requires_grad=True)
    check(B=2, L=L, S=S, mask_mod=make(L, S), mask_B=MB, mask_H=MH, block_size=64, score_mod=bias,
          kernel_options={"REFINE_KV_BLOCK": 16})


@pytest.mark.parametrize("make,MB,MH", REFINE_MASKS[:2])
def test_refined_query_blocks_match_the_oracle(make, MB, MH):
    """REFINE_Q_BLOCK with and without REFINE_KV_BLOCK, forward and backward (the dK/dV
    kernel walks the refined query lists), GQA and a learnable bias included."""
    L, S = 150, 140
    bias = mods.bias.from_seed([2, L, S], seed=4, layout="hqk", requires_grad=True)
    for opts in ({"REFINE_Q_BLOCK": 32}, {"REFINE_Q_BLOCK": 16, "REFINE_KV_BLOCK": 32}):
        check(B=2, Hq=2, Hkv=1, L=L, S=S, mask_mod=make(L, S), mask_B=MB, mask_H=MH, block_size=64,
              score_mod=bias, kernel_options=opts)


def test_refinement_is_the_forwards_alone():
    """REFINE options refine the forward's lists; the backward walks the block mask's own, so
    its tiles are not bound by the refined sizes (a backward on refined lists was 30-90 %
    slower on the H200)."""
    from kernels import api

    L, S = 150, 140
    check(B=1, Hq=2, L=L, S=S, mask_mod=mods.document.from_seed(L, 4, 1, kv_length=S), block_size=64,
          kernel_options={"REFINE_Q_BLOCK": 16, "REFINE_KV_BLOCK": 16, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64})
    opts = api.parse_kernel_options({"bwd_BLOCK_N1": 64}, dtype=torch.float16, head_dim=32, q_block=16,
                                    kv_block=16, device=torch.device("cpu"), interpret=True, bwd_blocks=(64, 64))
    assert opts.fwd.tiles == {"BLOCK_M": 16, "BLOCK_N": 16} and opts.bwd.tiles["BLOCK_N1"] == 64


def test_automatic_refinement_decision():
    """On the GPU a 128 x 128 block mask is refined to 64 x 64 for the forward when that lists
    at least AUTO_REFINE_SAVING fewer elements: a document mask is, a causal one is not (the
    decision is host code, checked here on CPU lists)."""
    from kernels import api

    B, H, L, S = 1, 2, 1024, 1024
    doc = mods.document.from_seed(L, 12, 0)
    for mask_mod, refined in ((doc, True), (mods.causal(), False)):
        bm = create_block_mask(mask_mod, 1, 1, L, S, device=DEVICE, BLOCK_SIZE=128)
        sp = api._cached_block_lists(bm, B, H, L, S, torch.device(DEVICE))
        got = api._auto_refined(sp, mask_mod, B, H, L, S)
        assert (got is not None) == refined
        if refined:
            assert (got.q_block, got.kv_block) == (64, 64)
            assert api._auto_refined(sp, mask_mod, B, H, L, S) is got  # decided once
    before = api.AUTO_REFINE
    api.AUTO_REFINE = None
    try:
        assert api._auto_refined(sp, mods.causal(), B, H, L, S) is None
    finally:
        api.AUTO_REFINE = before


def _open_automatic_refinement(monkeypatch, spied: str) -> list:
    """Let the interpreter take the automatic refinement (the GPU's alone otherwise) and record
    what ``kernels.api.<spied>`` returns on each call."""
    from kernels import api

    monkeypatch.setattr(api, "_auto_refine_wanted", lambda opts, interpret: not api._refine_given(opts))
    seen = []
    original = getattr(api, spied)

    def spy(*args):
        got = original(*args)
        seen.append(got)
        return got

    monkeypatch.setattr(api, spied, spy)
    return seen


def test_automatic_refinement_end_to_end(monkeypatch):
    """The automatic path through flex_attention (on the GPU only; here with the interpreter
    let in): the forward walks the 64 x 64 lists on REFINED_FWD_LAUNCH, the backward the block
    mask's own lists and tiles, and the oracle agrees, a learnable bias included."""
    from kernels import api

    seen = _open_automatic_refinement(monkeypatch, "_auto_refined")
    L = S = 260
    mask_mod = mods.document.from_seed(L, 6, 2)
    bias = mods.bias.from_seed([2, L, S], seed=5, layout="hqk", requires_grad=True)
    check(B=2, Hq=2, Hkv=1, L=L, S=S, E=16, mask_mod=mask_mod, block_size=128, score_mod=bias)
    assert seen and all(r is not None and (r.q_block, r.kv_block) == (64, 64) for r in seen)
    opts = api.parse_kernel_options(None, dtype=torch.float16, head_dim=16, q_block=64, kv_block=64,
                                    device=torch.device("cpu"), interpret=True, bwd_blocks=(128, 128),
                                    refined_fwd=True)
    assert (opts.fwd.num_warps, opts.fwd.num_stages) == api.REFINED_FWD_LAUNCH
    assert opts.fwd.tiles == {"BLOCK_M": 64, "BLOCK_N": 64} and opts.bwd.tiles["BLOCK_N1"] == 128


@pytest.mark.parametrize("tiles", [{"BLOCK_M": 128}, {"fwd_BLOCK_N": 128}])
def test_automatic_refinement_keeps_asked_for_tiles_of_128(monkeypatch, tiles):
    """A forward tile of 128 the options ask for rules the automatic 64 x 64 refinement out, so
    the call runs on the block mask's own lists: taking it raised a ValueError (the tile does not
    divide the refined block) on the H200, false-alarm seeds 13005 and 13007 (an empty table mask
    with BLOCK_M=128, and a dense case's 128 x 128 block mask with BLOCK_N=128)."""
    seen = _open_automatic_refinement(monkeypatch, "_auto_refined")
    L = S = 260
    check(B=1, Hq=2, L=L, S=S, E=16, mask_mod=mods.document.from_seed(L, 6, 2), block_size=128,
          kernel_options=tiles)
    assert seen == []
    check(B=1, Hq=2, L=L, S=S, E=16, mask_mod=mods.document.from_seed(L, 6, 2), block_size=128,
          kernel_options={"BLOCK_M": 64, "BLOCK_N": 32})
    assert len(seen) == 1 and seen[0] is not None


def _window_relation(sp, mask_mod, B: int, H: int, L: int, S: int) -> torch.Tensor:
    """The relation a kernel computes on shifted windows, [B, H, L, S]: a full window's keys (or
    queries) for its tile's queries (keys), a partial one's where mask_mod allows them; and no
    element covered twice (it would be summed twice). Windows of keys (``_shifted_kv``: a list row
    per query tile) or of queries (``_shifted_q``: a list row per key tile)."""
    by_q = bool(sp.q_unit)
    unit = sp.q_unit if by_q else sp.kv_unit  # list entries count in these many positions
    lists = ((sp.q_num, sp.q_idx, False), (sp.full_q_num, sp.full_q_idx, True)) if by_q else (
        (sp.kv_num, sp.kv_idx, False), (sp.full_kv_num, sp.full_kv_idx, True))
    tile, window = (sp.kv_block, sp.q_block) if by_q else (sp.q_block, sp.kv_block)
    t_len, w_len = (S, L) if by_q else (L, S)
    MB, MH, n_rows, _ = lists[0][1].shape
    out = torch.zeros(B, H, L, S, dtype=torch.bool)
    q, kv = torch.arange(L).view(L, 1), torch.arange(S).view(1, S)
    for b in range(B):
        for h in range(H):
            allowed = torch.as_tensor(mask_mod(torch.tensor(b), torch.tensor(h), q, kv)).expand(L, S)
            cover = torch.zeros(L, S, dtype=torch.int32)
            for t in range(n_rows):
                tiles = slice(t * tile, min((t + 1) * tile, t_len))
                for num, idx, full in lists:
                    for k in range(int(num[b % MB, h % MH, t])):
                        w = int(idx[b % MB, h % MH, t, k]) * unit
                        wins = slice(w, min(w + window, w_len))
                        at = (wins, tiles) if by_q else (tiles, wins)
                        cover[at] += 1
                        out[(b, h) + at] = True if full else allowed[at]
            assert int(cover.max()) <= 1, (b, h)
    return out


@pytest.mark.parametrize("case", ["document", "document-per-batch-head", "kv-longer", "overrun"])
def test_shifted_windows_compute_the_block_relation(case):
    """The forward's shifted windows (kernels.api._shifted_kv) cover every row's keys of the block
    relation (SPEC section 3, semantics="blocks") once, and no other: disjoint windows, full ones
    only where every row may attend every key, the mask applied on the rest; and the dK/dV
    kernel's windows of queries (_shifted_q) every key tile's queries likewise. Broadcast lists
    (one batch and head serving all) and per-(b, h) lists; keys longer than queries; and causal
    rows of 100 keys, whose second window cannot end at S without starting before key 0, so it
    ends past S (kv_overrun), where the kernel bounds the keys."""
    from kernels import api
    from oracle.block_mask import block_mask_to_dense

    B, H = 2, 2
    L, S, mask_mod, mask_b = {
        "document": (1024, 1024, mods.document.from_seed(1024, 12, 0), None),
        "document-per-batch-head": (300, 300, mods.document.from_seed(300, 5, 3), B),
        "kv-longer": (260, 390, mods.document.from_seed(260, 4, 1, kv_length=390), None),
        "overrun": (256, 100, mods.causal(), None),
    }[case]
    bm = create_block_mask(mask_mod, mask_b, mask_b, L, S, device=DEVICE, BLOCK_SIZE=128)
    sparse = api._block_lists(bm, B, H, L, S, torch.device(DEVICE))
    shifted = api._shifted_kv(sparse, mask_mod, B, H, L, S)
    assert shifted is not None and shifted.kv_unit == api.SHIFT_UNIT_KV and (shifted.q_block, shifted.kv_block) == (64, 64)
    assert shifted.kv_overrun == (case == "overrun")
    want = block_mask_to_dense(bm, B, H, L, S, semantics="blocks")
    assert torch.equal(_window_relation(shifted, mask_mod, B, H, L, S), want)
    # The dK/dV kernel's windows of queries, one list row per tile of 64 keys.
    by_q = api._shifted_q(sparse, mask_mod, B, H, L, S)
    assert by_q is not None and by_q.q_unit == api.SHIFT_UNIT_Q and (by_q.q_block, by_q.kv_block) == (64, 64)
    assert torch.equal(_window_relation(by_q, mask_mod, B, H, L, S), want)
    if case == "document":  # fewer elements listed, and fewer of them partial, than 64 x 64 blocks
        refined = api._refined_lists(sparse, mask_mod, B, H, L, S, 64, 64)
        assert float(api._listed(shifted)) <= 0.9 * float(api._listed(refined))
        part = lambda sp: float(sp.kv_num.sum()) / float(sp.kv_num.sum() + sp.full_kv_num.sum())  # noqa: E731
        assert part(shifted) < part(refined)


_WINDOW_MASKS = {
    "document": lambda L, S, seed: mods.document.from_seed(L, 2 + seed % 9, seed, kv_length=S),
    "causal": lambda L, S, seed: mods.causal(),
    "sliding": lambda L, S, seed: mods.sliding_window(1 + seed % 200),
    "prefix": lambda L, S, seed: mods.prefix_lm(seed % 300),
    "table": lambda L, S, seed: mods.table_mask.from_seed(1, L, S, 0.02 + (seed % 7) / 10, seed),
}


@pytest.mark.parametrize("blocks_from", ["own", "other"])
def test_shifted_windows_are_the_block_relation_or_refused(blocks_from):
    """Over drawn masks and lengths (Hypothesis, derandomised), each axis's windows either give
    exactly the block relation (SPEC section 3, semantics="blocks") or are refused (None): on block
    masks built from the mask itself ("own": never refused), and on block masks built from another
    mask with this one attached ("other"), whose partial windows may hold keys the mask and the
    blocks disagree on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from torch.nn.attention.flex_attention import BlockMask

    from kernels import api
    from oracle.block_mask import block_mask_to_dense

    names = sorted(_WINDOW_MASKS)

    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(L=st.integers(64, 330), S=st.integers(64, 330), mask=st.sampled_from(names),
           other=st.sampled_from(names), seed=st.integers(0, 10_000))
    def check_one(L, S, mask, other, seed):
        mask_mod = _WINDOW_MASKS[mask](L, S, seed)
        bm = create_block_mask(mask_mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=128)
        if blocks_from == "other":
            blocks = create_block_mask(_WINDOW_MASKS[other](L, S, seed + 1), None, None, L, S, device=DEVICE,
                                       BLOCK_SIZE=128)
            bm = BlockMask.from_kv_blocks(blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks,
                                          blocks.full_kv_indices, BLOCK_SIZE=128, mask_mod=mask_mod,
                                          seq_lengths=(L, S))
        sparse = api._block_lists(bm, 1, 2, L, S, torch.device(DEVICE))
        want = block_mask_to_dense(bm, 1, 2, L, S, semantics="blocks")
        for shifted in (api._shifted_kv(sparse, mask_mod, 1, 2, L, S), api._shifted_q(sparse, mask_mod, 1, 2, L, S)):
            if blocks_from == "own":
                assert shifted is not None
            if shifted is not None:
                assert torch.equal(_window_relation(shifted, mask_mod, 1, 2, L, S), want)

    check_one()


def test_shifted_windows_at_bench_document_rows():
    """bench.py's document row at S=4k (about 12 documents): the windows list 1.22 times the
    allowed elements where 64 x 64 blocks list 1.31, 34 % of them partial against 40 %
    (AUTO_SHIFT's comment and docs/PERFORMANCE.md quote these)."""
    from kernels import api

    S = 4096
    mask_mod = mods.document.from_seed(S, 12, 0)
    bm = create_block_mask(mask_mod, None, None, S, S, device=DEVICE, BLOCK_SIZE=128)
    sparse = api._block_lists(bm, 1, 1, S, S, torch.device(DEVICE))
    shifted = api._shifted_kv(sparse, mask_mod, 1, 1, S, S)
    refined = api._refined_lists(sparse, mask_mod, 1, 1, S, S, 64, 64)
    ids = mask_mod.q_ids.tensor
    allowed = float((ids[:, None] == ids[None, :]).sum())
    assert round(float(api._listed(shifted)) / allowed, 2) == 1.22
    assert round(float(api._listed(refined)) / allowed, 2) == 1.31
    part = lambda sp: float(sp.kv_num.sum()) / float(sp.kv_num.sum() + sp.full_kv_num.sum())  # noqa: E731
    assert (round(part(shifted), 2), round(part(refined), 2)) == (0.34, 0.40)


def test_shifted_windows_refused_where_the_mask_disagrees_with_the_blocks():
    """A partial window runs mask_mod on every key it holds, so the windows are refused (None)
    where mask_mod allows a key of a block the lists leave out, or masks one of a full block;
    and where S is shorter than a window."""
    from torch.nn.attention.flex_attention import BlockMask

    from kernels import api

    L, S = 128, 384

    def lists(partial, full):
        num = torch.tensor([[[len(partial)]]], dtype=torch.int32)
        idx = torch.tensor([[[partial + [0] * (3 - len(partial))]]], dtype=torch.int32)
        fnum = torch.tensor([[[len(full)]]], dtype=torch.int32)
        fidx = torch.tensor([[[full + [0] * (3 - len(full))]]], dtype=torch.int32)
        return num, idx, fnum, fidx

    def shifted(mask_mod, partial, full):
        num, idx, fnum, fidx = lists(partial, full)
        bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=128, mask_mod=mask_mod, seq_lengths=(L, S))
        sparse = api._block_lists(bm, 1, 1, L, S, torch.device(DEVICE))
        return api._shifted_kv(sparse, mask_mod, 1, 1, L, S)

    agrees = lambda b, h, q, kv: (kv >= 100) & (kv < 230)  # noqa: E731
    assert shifted(agrees, [0, 1], []) is not None  # the same keys listed as the mask allows
    # Block 1 left out while the mask allows its keys 128 to 229: the window at key 100 would hold them.
    assert shifted(agrees, [0], []) is None
    # Block 1 full while the mask allows keys 100 to 110 alone: the window at 100 is partial (the
    # windows after it end at 292, short of S, so none moves), and the mask would drop the full
    # block's keys 128 to 163 in it.
    assert shifted(lambda b, h, q, kv: (kv >= 100) & (kv <= 110), [0], [1]) is None
    short = create_block_mask(mods.causal(), None, None, 128, 48, device=DEVICE, BLOCK_SIZE=128)
    assert api._shifted_kv(api._block_lists(short, 1, 1, 128, 48, torch.device(DEVICE)), mods.causal(),
                           1, 1, 128, 48) is None


def test_shifted_windows_end_to_end(monkeypatch):
    """The automatic path through flex_attention (on the GPU only; here with the interpreter let
    in): a document mask's forward walks shifted windows (KV_UNIT 1), and the oracle agrees, GQA,
    a learnable bias and a query tail included; with the savings' thresholds lifted, causal rows
    whose last window ends past S (bounds on the partial windows' keys) agree too. AUTO_SHIFT
    False keeps the refined 64 x 64 blocks."""
    from kernels import api

    seen = _open_automatic_refinement(monkeypatch, "_auto_shifted")
    units = _record_launches(monkeypatch, "forward_kernel", "KV_UNIT", "KV_DIVISIBLE", "PART_KV_DIVISIBLE")
    L = S = 300
    mask_mod = mods.document.from_seed(L, 6, 2)
    bias = mods.bias.from_seed([2, L, S], seed=5, layout="hqk", requires_grad=True)
    check(B=2, Hq=2, Hkv=1, L=L - 11, S=S, E=16, mask_mod=mask_mod, block_size=128, score_mod=bias)
    assert seen and seen[-1] is not None and units[-1] == (api.SHIFT_UNIT_KV, True, True)
    monkeypatch.setattr(api, "AUTO_REFINE_SAVING", -1.0)
    monkeypatch.setattr(api, "AUTO_SHIFT_SAVING", -1.0)
    check(B=1, Hq=2, L=256, S=100, E=16, mask_mod=mods.causal(), block_size=128)
    assert seen[-1].kv_overrun and units[-1] == (api.SHIFT_UNIT_KV, True, False)
    monkeypatch.setattr(api, "AUTO_SHIFT", False)
    check(B=1, Hq=2, L=L, S=S, E=16, mask_mod=mask_mod, block_size=128, grads=False)
    assert seen[-1] is None and units[-1][0] == 0


def _forward_both_ways(monkeypatch, B, Hq, Hkv, L, S, E, mask_mod, block_size, score_mod=None, programs=None,
                       dtype=torch.float16, seed=0):
    """(out, lse, max) of the persistent forward and of the grid's on one input, and the grids of
    the persistent kernel's launches."""
    from kernels import _runtime, forward

    (q, k, v), _, _ = _inputs(B, Hq, Hkv, L, S, E, E, dtype, DEVICE, seed, None)
    bm = create_block_mask(mask_mod, B, 1, L, S, device=DEVICE, BLOCK_SIZE=block_size)
    launch, grids = _runtime.launch, []

    def record(kernel, grid, *args, **kwargs):
        if kernel.fn.__name__ == "forward_persistent_kernel":
            grids.append(grid)
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", record)
    monkeypatch.setattr(forward, "PERSISTENT_PROGRAMS", programs)
    outs = []
    for persistent in (True, False):
        monkeypatch.setattr(forward, "PERSISTENT_FWD", persistent)
        outs.append(kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                           return_lse=True, return_max=True))
    return outs[0], outs[1], grids


def test_persistent_forward_is_the_grid_bit_for_bit(monkeypatch):
    """``forward.PERSISTENT_FWD``: each program walks its tiles in turn, reading the next tile's
    coordinates, counts, first entries and queries during one; the same arithmetic per tile, so
    out, the LSE and the maximum equal the grid's bit for bit. Programs of several tiles (and one
    of all of them, and more programs than tiles), GQA, query and key tails, a score mod, the two
    loops and the one, and the shifted windows (KV_UNIT) with an overrun."""
    from kernels import api, forward

    doc = mods.document.from_seed(170, 4, 0)
    cases = [
        (False, dict(B=2, Hq=2, Hkv=1, L=170, S=170, E=16, mask_mod=doc, block_size=32)),
        (True, dict(B=1, Hq=2, Hkv=1, L=170, S=170, E=16, mask_mod=doc, block_size=32, programs=1)),
        (None, dict(B=1, Hq=2, Hkv=2, L=150, S=200, E=16, mask_mod=mods.causal(), block_size=32, programs=40)),
        (None, dict(B=1, Hq=2, Hkv=1, L=130, S=200, E=16, mask_mod=mods.sliding_window(20), block_size=16,
                    score_mod=mods.tanh_softcap(30.0), programs=5)),
    ]
    for one_loop, case in cases:
        monkeypatch.setattr(forward, "ONE_LOOP", one_loop)
        got, want, grids = _forward_both_ways(monkeypatch, **case)
        # (more programs than tiles: one a tile)
        assert grids and 1 <= grids[-1][0] <= (case.get("programs") or 3), grids
        for a, b in zip(got, want):
            assert torch.equal(a, b), (case, one_loop)
    # The shifted windows (KV_UNIT 1), whose last window ends past S.
    monkeypatch.setattr(api, "AUTO_EVERYWHERE", True)
    monkeypatch.setattr(forward, "ONE_LOOP", None)
    got, want, grids = _forward_both_ways(monkeypatch, B=1, Hq=2, Hkv=1, L=256, S=100, E=16,
                                          mask_mod=mods.causal(), block_size=128, programs=3)
    assert grids == [(3,)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _step_both_ways(monkeypatch, flags, B, Hq, Hkv, L, S, E, mask_mod, block_size, score_mod=None, layout="bhsd",
                    dtype=torch.bfloat16, seed=0, device=DEVICE):
    """(out, lse, dq, dk, dv) of one training step with the TMA flags ``flags`` (module, name) on,
    then off, on one input; and how many launches were passed a descriptor."""
    import importlib

    from kernels import _runtime
    from triton.tools.tensor_descriptor import TensorDescriptor

    (q, k, v), do, dl = _inputs(B, Hq, Hkv, L, S, E, E, dtype, device, seed, None)
    if layout == "bshd":  # the heads' rows interleaved: [B, S, H, D] viewed as [B, H, S, D]
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    bm = create_block_mask(mask_mod, B, 1, L, S, device=device, BLOCK_SIZE=block_size)
    launch, described = getattr(_runtime.launch, "unrecorded", _runtime.launch), []

    def record(kernel, grid, *args, **kwargs):
        described.extend(kernel.fn.__name__ for a in args if isinstance(a, TensorDescriptor))
        return launch(kernel, grid, *args, **kwargs)

    record.unrecorded = launch

    monkeypatch.setattr(_runtime, "launch", record)
    results = []
    for on in (True, False):
        for module, name in flags:
            monkeypatch.setattr(importlib.import_module(f"kernels.{module}"), name, on)
        for t in (q, k, v):
            t.grad = None
        out, lse = kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                          return_lse=True)
        torch.autograd.backward((out, lse), (do, dl))
        results.append([out, lse, q.grad, k.grad, v.grad])
    return results[0], results[1], described


_TMA_FLAGS = (("forward", "TMA_KV"), ("backward", "TMA_DQ"), ("backward", "TMA_DKDV"))


def test_tma_tiles_are_the_pointer_tiles_bit_for_bit(monkeypatch):
    """``forward.TMA_KV``, ``backward.TMA_DQ`` and ``backward.TMA_DKDV``: the streamed tiles come
    through TMA descriptors over [B, H, S, D] (rows past the end zero, as the masked pointer loads
    give), the arithmetic unchanged, so every output and gradient equals the pointer loads' bit for
    bit. GQA with query and key tails, interleaved heads (a [B, S, H, D] layout), a score mod, the
    dK/dV kernel's heads in one loop, and the shifted windows with an overrun."""
    from kernels import api, backward

    doc = mods.document.from_seed(170, 4, 0)
    every = {"forward_kernel", "dq_kernel", "dkdv_kernel"}
    cases = [  # (module settings, the case, the kernels that must take descriptors)
        ((), dict(B=1, Hq=2, Hkv=1, L=150, S=170, E=16, mask_mod=doc, block_size=32), every),
        ((), dict(B=1, Hq=2, Hkv=2, L=130, S=80, E=16, mask_mod=mods.sliding_window(20), block_size=32,
                  score_mod=mods.tanh_softcap(30.0), layout="bshd"), every),
        (((backward, "HEADS_IN_LOOP", True),),
         dict(B=1, Hq=2, Hkv=1, L=128, S=64, E=16, mask_mod=mods.causal(), block_size=32), every),
        # The shifted windows (KV_UNIT 1), whose last window ends past S.
        (((api, "AUTO_EVERYWHERE", True),),
         dict(B=1, Hq=2, Hkv=1, L=256, S=100, E=16, mask_mod=mods.causal(), block_size=128), {"forward_kernel"}),
    ]
    for settings, case, takes in cases:
        with monkeypatch.context() as patch:
            for module, name, value in settings:
                patch.setattr(module, name, value)
            got, want, described = _step_both_ways(patch, _TMA_FLAGS, **case)
        # two descriptors each: the forward's K and V, the dQ kernel's K and V, the dK/dV kernel's Q and dO
        assert takes <= set(described), (case, described)
        for a, b in zip(got, want):
            assert torch.equal(a, b), case


def test_tma_rule_by_arch_head_dim_and_loop(monkeypatch):
    """The default (flags None): TMA on sm90 alone; the forward's from head dim 128 on and not on two
    loops whose mask loads (``forward.tma_kv_for``); the dK/dV kernel's on REFINED_BWD's tiles alone
    (``backward.tma_dkdv_rule``); a bool flag forces either way, the interpreter included."""
    from types import SimpleNamespace

    from kernels import api, backward, forward

    k = torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16)
    plan = SimpleNamespace(E=128, Ev=128, interpret=False, refined_bwd=True, program=SimpleNamespace(mask_loads=True))
    monkeypatch.setattr(api, "_arch", lambda device, interpret: "sm90")
    assert forward.tma_kv_for(plan, k, k, one_loop=True) and not forward.tma_kv_for(plan, k, k, one_loop=False)
    assert backward.tma_dkdv_rule(None, plan, k.device) and forward.tma_rule(None, plan, k.device)
    plan.program.mask_loads = False
    assert forward.tma_kv_for(plan, k, k, one_loop=False)
    small = torch.zeros(1, 2, 64, 64, dtype=torch.bfloat16)
    assert not forward.tma_kv_for(SimpleNamespace(**{**vars(plan), "E": 64, "Ev": 64}), small, small, one_loop=True)
    assert not backward.tma_dkdv_rule(None, SimpleNamespace(**{**vars(plan), "refined_bwd": False}), k.device)
    monkeypatch.setattr(api, "_arch", lambda device, interpret: "sm80")
    assert not forward.tma_kv_for(plan, k, k, one_loop=True) and not forward.tma_rule(None, plan, k.device)
    monkeypatch.setattr(forward, "TMA_KV", True)
    assert forward.tma_kv_for(plan, k, k, one_loop=False) and backward.tma_dkdv_rule(True, plan, k.device)
    assert not backward.tma_dkdv_rule(False, plan, k.device)


def test_tma_takes_only_tensors_a_descriptor_can_describe():
    """``forward.tma_ready``: 16-bit elements, a power-of-two head dim, contiguous rows, a 16-byte
    aligned base and strides; anything else keeps the pointer loads."""
    from kernels.forward import tma_ready

    k = torch.zeros(2, 2, 64, 16, dtype=torch.bfloat16)
    assert tma_ready(k, k)
    assert not tma_ready(k.float(), k.float())  # 4-byte elements
    odd = torch.zeros(2, 2, 64, 24, dtype=torch.bfloat16)
    assert not tma_ready(odd, odd)  # a padded head dim
    assert not tma_ready(k, k.transpose(2, 3).contiguous().transpose(2, 3))  # columns not contiguous
    assert not tma_ready(k[:, :1].expand(2, 2, 64, 16), k)  # a broadcast head (stride 0)
    shifted = torch.zeros(2 * 2 * 64 * 16 + 1, dtype=torch.bfloat16)[1:].view(2, 2, 64, 16)
    assert not tma_ready(shifted, k)  # a base off 16 bytes
    rows = torch.zeros(2, 2, 64, 20, dtype=torch.bfloat16)[..., :16]
    assert not tma_ready(rows, k)  # rows 40 bytes apart


def test_tma_descriptor_is_tritons_and_keys_the_direct_launch():
    """``forward.tma_descriptor`` builds what Triton's ``TensorDescriptor`` constructor builds (it
    only skips the checks ``tma_ready`` made), and the direct launch's cache key
    (``_runtime._spec``) holds a descriptor by everything but its address: two tensors of one
    layout share a key, another box or stride does not."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels import _runtime
    from kernels.forward import tma_descriptor

    k = torch.zeros(2, 2, 64, 16, dtype=torch.bfloat16)
    ours, theirs = tma_descriptor(k, [1, 1, 32, 16]), TensorDescriptor.from_tensor(k, [1, 1, 32, 16])
    assert isinstance(ours, TensorDescriptor)
    for field in ("shape", "strides", "block_shape"):
        assert tuple(getattr(ours, field)) == tuple(getattr(theirs, field)), field
    assert ours.base is theirs.base and ours.padding == theirs.padding
    spec = _runtime._spec((ours, 3))
    assert spec == _runtime._spec((tma_descriptor(torch.ones_like(k), [1, 1, 32, 16]), 3))
    assert hash(spec) is not None
    assert spec != _runtime._spec((tma_descriptor(k, [1, 1, 64, 16]), 3))
    assert spec != _runtime._spec((tma_descriptor(k.transpose(1, 2).contiguous().transpose(1, 2), [1, 1, 32, 16]), 3))


def test_persistent_tiles_deal_every_tile_once():
    """``Sparse.persistent_tiles``: every tile of the grid's order goes to one program, each
    program's in increasing order (the rest of its row repeating its last); the programs' work
    (steps plus the tile cost) within 10 % of the mean on the benchmark's document mask at S=4k
    (264 programs, as two a multiprocessor on the H100)."""
    import numpy as np

    from benchmarks import bench
    from kernels import api

    shape = bench.train_shape("document", 4096, 128, "cuda")
    _, bm = bench.attention_args("document", shape, "cpu")
    B, Hq, L = shape.B, shape.Hq, shape.L
    mask = api.as_mask_mod(bm.mask_mod, "mask_mod")
    sp = api._cached_block_lists(bm, B, Hq, L, L, "cpu")
    sp = api._auto_shifted(sp, api._auto_refined(sp, mask, B, Hq, L, L), mask, B, Hq, L, L)
    table, counts = sp.persistent_tiles(B, Hq, L, 64, 1, 264, 2)
    table, counts = table.numpy(), counts.numpy()
    dealt = np.concatenate([table[p, :c] for p, c in enumerate(counts)])
    assert sorted(dealt.tolist()) == list(range(B * Hq * (L // 64)))
    for p, c in enumerate(counts):
        assert (np.diff(table[p, :c]) > 0).all() and (table[p, c:] == table[p, c - 1]).all()
    steps = (sp.kv_num + sp.full_kv_num).reshape(-1).numpy()  # one row of lists for every (b, h)
    n_m = L // 64
    work = [sum(steps[n_m - 1 - t % n_m] + 2 for t in table[p, :c]) for p, c in enumerate(counts)]
    assert max(work) / np.mean(work) < 1.1


def test_persistent_forward_stores_tiles_that_list_nothing(monkeypatch):
    """A query tile with no block to walk: the persistent kernel's step loop runs no trip and the
    tile is stored as the grid stores it, out 0 and an LSE of -inf (the oracle agrees), between
    tiles that do walk blocks in the same program."""
    from kernels import forward

    monkeypatch.setattr(forward, "PERSISTENT_FWD", True)
    monkeypatch.setattr(forward, "PERSISTENT_PROGRAMS", 2)
    seen = _record_launches(monkeypatch, "forward_persistent_kernel", "BLOCK_M")
    # Keys more than 40 before the query (the causal mask less a sliding window of 40): rows 0 to
    # 40 allow nothing, so the first query tile (32 rows) lists no block.
    mask_mod = mods.and_(mods.causal(), mods.not_(mods.sliding_window(40)))
    check(B=1, Hq=2, L=200, S=160, E=16, mask_mod=mask_mod, block_size=32, grads=False)
    assert seen


def test_automatic_backward_refinement_end_to_end(monkeypatch):
    """The backward's automatic refinement (AUTO_REFINE_BWD; on the GPU only, here with the
    interpreter let in): the dQ kernel walks key lists refined to its BLOCK_N2, the dK/dV
    kernel query lists refined to its BLOCK_M1, and a program narrower than a block the lists
    of its own sub-block; tiles unchanged, and the oracle agrees, GQA, a learnable bias and a
    query/key tail included. Without a saving, nothing is refined."""
    seen = _open_automatic_refinement(monkeypatch, "_auto_refined_bwd")
    L, S = 250, 270
    mask_mod = mods.document.from_seed(L, 6, 2, kv_length=S)
    bias = mods.bias.from_seed([2, L, S], seed=6, layout="hqk", requires_grad=True)
    tiles = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32}
    # Then programs narrower than the blocks (64 queries in the dQ kernel, 64 keys in the dK/dV
    # kernel): they get their own sub-blocks' lists, both axes refined.
    narrow = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32}
    for options, dq_blocks, dkdv_blocks in ((tiles, (128, 32), (32, 128)), (narrow, (64, 32), (32, 64))):
        check(B=2, Hq=2, Hkv=1, L=L, S=S, E=16, mask_mod=mask_mod, block_size=128, score_mod=bias,
              kernel_options=options)
        dq, dkdv = seen[-1]
        assert dq is not None and (dq.q_block, dq.kv_block) == dq_blocks, options
        assert dkdv is not None and (dkdv.q_block, dkdv.kv_block) == dkdv_blocks, options
    # A causal mask on these tiles saves under AUTO_REFINE_BWD_SAVING: the lists stay.
    check(B=1, Hq=2, L=L, S=L, E=16, mask_mod=mods.causal(), block_size=128, kernel_options=tiles)
    assert seen[-1] == (None, None)
    # No gradient wanted: nothing is refined for a backward that cannot come.
    n = len(seen)
    q, k, v = (torch.randn(1, 2, n_, 16, dtype=torch.float16, device=DEVICE) for n_ in (L, S, S))
    bm = create_block_mask(mask_mod, 1, 1, L, S, device=DEVICE, BLOCK_SIZE=128)
    kernels.flex_attention(q, k, v, block_mask=bm, kernel_options=tiles)
    assert len(seen) == n


def _sm90_bwd_tiles(work: str = "masked") -> dict:
    """The sm90 bf16 D=128 backward tiles of ``work`` (the defaults REFINED_BWD replaces)."""
    from kernels import api

    default = api._default_config("sm90", torch.bfloat16, 128, work)[1]
    return dict(zip(api._TILE_KEYS["bwd"], default[:4]))


@pytest.mark.parametrize("row,L,taken", [
    ("document", 1024, True),  # 15 % fewer elements on 64 x 64 than on the default steps
    ("document", 4096, True),  # 10 %
    ("causal", 1024, True),  # 6 %
    ("causal", 4096, False),  # 1.5 %
    ("prefix_lm", 1024, False),  # 4 %
    ("block_sparse", 1024, False),  # every block full: 0
])
def test_refined_backward_tiles_where_the_lists_save(row, L, taken):
    """REFINED_BWD's count (on the GPU only; the rule's arithmetic runs here on CPU lists): the
    64 x 64 lists against the dQ and dK/dV kernels' own on the default sm90 D=128 tiles, taken at
    REFINED_BWD_SAVING (5 %) and more, the bench's block masks (the savings docs/PERFORMANCE.md
    gives, thirty-first session), decided once."""
    from benchmarks import bench
    from kernels import api

    shape = bench.Shape(B=1, Hq=2, Hkv=2, L=L, S=L, D=128)
    _, bm = bench.attention_args(row, shape, "cpu")
    sp = api._cached_block_lists(bm, 1, 2, L, L, torch.device("cpu"))
    mask_mod = bm.mask_mod
    tiles = _sm90_bwd_tiles()
    assert api._refined_bwd_saves(sp, mask_mod, 1, 2, L, L, tiles) is taken
    assert api._refined_bwd_saves(sp, mask_mod, 1, 2, L, L, tiles) is taken  # the cached decision
    before = api.REFINED_BWD_SAVING
    api.REFINED_BWD_SAVING = 0.0  # at no threshold a list can only shrink: always taken
    try:
        assert api._refined_bwd_saves(sp, mask_mod, 1, 2, L, L, tiles)
    finally:
        api.REFINED_BWD_SAVING = before


def test_refined_backward_tiles_only_where_the_rule_was_measured(monkeypatch):
    """REFINED_BWD is considered for a block mask without a score mod, sm90, bf16 or fp16 at a
    padded head dim of 128, blocks that 64 divides, and no backward tile or launch option; and
    then gives both kernels its tiles, warps and stages."""
    from kernels import api

    want = lambda opts=None, arch="sm90", dtype=torch.bfloat16, d=128, work="masked", qb=128, kb=128: (  # noqa: E731
        api._refined_bwd_wanted(opts, arch, dtype, d, work, qb, kb))
    assert want() and want(dtype=torch.float16) and want(d=96) and want(opts={"BLOCK_M": 64, "PRESCALE_QK": True})
    assert not want(work="scored") and not want(work="gathered") and not want(work="dense") and not want(arch="sm80")
    assert not want(dtype=torch.float32) and not want(d=64) and not want(d=256) and not want(qb=32)
    for key in ("bwd_BLOCK_M1", "BLOCK_N2", "num_warps", "bwd_num_stages", "DKDV_NUM_WARPS", "DKDV_NUM_STAGES"):
        assert not want(opts={key: 4 if "NUM" in key.upper() else 64}), key
    with monkeypatch.context() as m:
        m.setattr(api, "REFINED_BWD", None)
        assert not want()
    opts = api.parse_kernel_options(None, dtype=torch.bfloat16, head_dim=128, q_block=128, kv_block=128,
                                    device=torch.device("cpu"), interpret=True, work="masked", refined_bwd=True)
    assert tuple(opts.bwd.tiles.values()) == api.REFINED_BWD[:4]
    assert (opts.bwd.num_warps, opts.bwd.num_stages) == api.REFINED_BWD[4:] and opts.dkdv_launch is None


def test_refined_backward_tiles_end_to_end(monkeypatch):
    """The rule through flex_attention (on the GPU only; here with the interpreter let in and the
    arch taken for sm90): a document mask's backward on REFINED_BWD's tiles and the 64 x 64 lists
    in both kernels, and the oracle agrees, GQA and a key tail included; a causal mask on a block
    of 128 (at L=S=256 the 64 x 64 lists drop a quarter of each diagonal block, 17 % of the
    elements) takes it, the same mask with a
    backward launch option keeps the default tiles (on which nothing is refined). On the rule's
    tiles the dK/dV kernel issues dV first (G = 1 included), on the default ones dP first."""
    from kernels import _runtime, api

    seen = _open_automatic_refinement(monkeypatch, "_auto_refined_bwd")
    _as_sm90(monkeypatch)
    launch, dp_first = _runtime.launch, []

    def record(kernel, grid, *args, **kwargs):
        if kernel.fn.__name__ == "dkdv_kernel":
            dp_first.append(kwargs["DP_FIRST"])
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", record)
    L, S = 256, 250
    mask_mod = mods.document.from_seed(L, 5, 3, kv_length=S)
    check(B=1, Hq=2, Hkv=1, L=L, S=S, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128)
    dq, dkdv = seen[-1]
    assert dq is not None and dkdv is dq and (dq.q_block, dq.kv_block) == (64, 64)
    check(B=1, Hq=1, L=L, S=L, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128)
    dq, dkdv = seen[-1]
    assert dq is not None and dkdv is dq and (dq.q_block, dq.kv_block) == (64, 64)
    check(B=1, Hq=1, L=L, S=L, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          kernel_options={"bwd_num_warps": 8})
    assert seen[-1] == (None, None)
    assert dp_first == [False, False, True]


def _as_sm90(monkeypatch) -> None:
    """Take the arch for sm90 (the interpreter still runs the kernels), with a parsed-options
    cache of the test's own: its keys hold no arch, so options parsed for the interpreter's rows
    by an earlier test in this process would be taken here, and this test's sm90 rows there."""
    from kernels import api

    monkeypatch.setattr(api, "_arch", lambda device, interpret: "sm90")
    monkeypatch.setattr(api, "_OPTIONS_CACHE", {})


def _record_launches(monkeypatch, kernel_name: str, *keys: str) -> list:
    """Record the launch arguments ``keys`` of each launch of the kernel ``kernel_name``."""
    from kernels import _runtime

    launch, seen = _runtime.launch, []

    def record(kernel, grid, *args, **kwargs):
        if kernel.fn.__name__ == kernel_name:
            seen.append(tuple(kwargs[k] for k in keys))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", record)
    return seen


def _record_forward_launches(monkeypatch) -> list:
    """Record each forward kernel launch's (BLOCK_M, BLOCK_N, warps, stages)."""
    return _record_launches(monkeypatch, "forward_kernel", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _record_backward_plans(monkeypatch) -> list:
    """Record the Plan of each backward (``kernels.backward.run_backward``) as it runs."""
    from kernels import _runtime

    backward, seen = _runtime.module("backward"), []
    run = backward.run_backward

    def spy(plan, *args, **kwargs):
        seen.append(plan)
        return run(plan, *args, **kwargs)

    monkeypatch.setattr(backward, "run_backward", spy)
    return seen


def test_short_rows_forward_only_where_the_rule_was_measured(monkeypatch):
    """SHORT_ROWS_FWD is considered on sm90, in bf16 or fp16, at a padded head dim of 64 or 128,
    for blocks its tiles divide and no forward tile or launch option (a backward option leaves it
    be); it then gives the forward its tiles, warps and stages, and the backward keeps its own."""
    from kernels import api

    want = lambda opts=None, arch="sm90", dtype=torch.bfloat16, d=128, qb=128, kb=128: (  # noqa: E731
        api._short_fwd_wanted(opts, arch, dtype, d, qb, kb))
    assert want() and want(dtype=torch.float16) and want(d=96) and want(d=64) and want(d=33)
    assert want(opts={"bwd_num_warps": 8, "BLOCK_M1": 64, "PRESCALE_QK": True})
    assert not want(arch="sm80") and not want(arch="interp") and not want(dtype=torch.float32)
    assert not want(d=32) and not want(d=256) and not want(qb=32) and not want(kb=96)
    for key in ("BLOCK_M", "fwd_BLOCK_N", "num_warps", "fwd_num_stages", "num_stages", "fwd_num_warps"):
        assert not want(opts={key: 4 if "num" in key else 64}), key
    with monkeypatch.context() as m:
        m.setattr(api, "SHORT_ROWS_FWD", None)
        assert not want()
    for short in (False, True):
        opts = api.parse_kernel_options(None, dtype=torch.bfloat16, head_dim=128, q_block=128, kv_block=128,
                                        device=torch.device("cpu"), interpret=True, work="scored", short_fwd=short)
        default = api._default_config("interp", torch.bfloat16, 128, "scored")
        fwd = api.SHORT_ROWS_FWD if short else default[0]
        assert (*opts.fwd.tiles.values(), opts.fwd.num_warps, opts.fwd.num_stages) == fwd
        assert (*opts.bwd.tiles.values(), opts.bwd.num_warps, opts.bwd.num_stages) == default[1]
    # At a padded head dim of 64: SHORT_ROWS_FWD_D64 where its 128-key tiles divide the blocks,
    # else SHORT_ROWS_FWD (blocks of 64 keys); at 128, or with the D=64 tuple off, SHORT_ROWS_FWD.
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_D64", (64, 128, 4, 2))  # the rule, whatever the default
    tiles = api._short_rows_tiles
    assert tiles(64, 128, 128) == tiles(33, 128, 256) == api.SHORT_ROWS_FWD_D64
    assert tiles(64, 128, 64) == tiles(128, 128, 128) == tiles(65, 128, 128) == api.SHORT_ROWS_FWD
    assert want(d=64, kb=64) and not want(d=64, kb=32)
    for d, kb in ((64, 128), (64, 64), (128, 128)):
        opts = api.parse_kernel_options(None, dtype=torch.bfloat16, head_dim=d, q_block=128, kv_block=kb,
                                        device=torch.device("cpu"), interpret=True, work="masked", short_fwd=True)
        assert (*opts.fwd.tiles.values(), opts.fwd.num_warps, opts.fwd.num_stages) == tiles(d, 128, kb), (d, kb)
    with monkeypatch.context() as m:
        m.setattr(api, "SHORT_ROWS_FWD_D64", None)
        assert tiles(64, 128, 128) == api.SHORT_ROWS_FWD


def test_short_rows_forward_end_to_end(monkeypatch):
    """The rule through flex_attention (on the GPU only; here with the arch taken for sm90 under
    the interpreter): a causal mask's rows (192 keys on average at L=S=256, blocks of 128) and a
    call without a mask (S keys) take SHORT_ROWS_FWD (SHORT_ROWS_FWD_D64 at D=64), and the oracle
    agrees, GQA, a score mod, a query tail and fp16 at D=64 included; rows over the cap, or a
    forward launch option, keep the default row's tiles."""
    from kernels import api

    _as_sm90(monkeypatch)
    seen = _record_forward_launches(monkeypatch)
    short = api.SHORT_ROWS_FWD
    default = api._default_config("sm90", torch.bfloat16, 128, "masked")[0]
    run = dict(E=128, dtype=torch.bfloat16, grads=False, block_size=128)
    check(B=1, Hq=2, Hkv=1, L=250, S=256, mask_mod=mods.causal(), score_mod=mods.tanh_softcap(20.0), **run)
    check(B=1, Hq=1, L=200, S=256, **run)
    check(B=1, Hq=1, L=256, S=256, **{**run, "E": 64, "dtype": torch.float16}, mask_mod=mods.causal())
    assert seen == [short] * 2 + [api.SHORT_ROWS_FWD_D64 or short]
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_MAX_KEYS", 191)  # the causal rows' mean, 192, is over it
    check(B=1, Hq=1, L=256, S=256, mask_mod=mods.causal(), **run)
    check(B=1, Hq=1, L=256, S=256, mask_mod=mods.causal(), kernel_options={"fwd_num_warps": 8}, **run)
    assert seen[3:] == [default, default]


def test_d64_row_forward_and_its_cap(monkeypatch):
    """The D=64 row's forward (with the arch taken for sm90; the interpreter runs the kernels) on
    rows too long for SHORT_ROWS_FWD: 128 x 128 on 8 warps, capped at 128 registers
    (``kernels.forward.D64_W8_FWD_MAXNREG``), in bf16 and fp16, a softcap included; a score mod
    that gathers (ALiBi's slopes, a relative-position table) keeps its own row (128 x 64 on 4
    warps), uncapped; the caller's 128 x 128 on 4 warps goes uncapped. The oracle agrees on
    each."""
    from kernels import _runtime, api

    _as_sm90(monkeypatch)
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_MAX_KEYS", 1)  # every row long
    seen = _record_forward_launches(monkeypatch)
    plans = _record_backward_plans(monkeypatch)
    run = dict(B=1, Hq=2, Hkv=1, L=250, S=256, E=64, block_size=128)
    check(dtype=torch.bfloat16, mask_mod=mods.causal(), **run)
    check(dtype=torch.float16, **run)
    check(dtype=torch.bfloat16, mask_mod=mods.causal(), score_mod=mods.tanh_softcap(20.0), **run)
    check(dtype=torch.bfloat16, mask_mod=mods.causal(), kernel_options={"fwd_num_warps": 4}, **run)
    check(dtype=torch.float16, mask_mod=mods.causal(), score_mod=mods.alibi.standard(2), **run)
    check(dtype=torch.bfloat16, score_mod=mods.relative_position(torch.randn(2, 9)), **run)
    assert seen == [(128, 128, 8, 3)] * 3 + [(128, 128, 4, 3)] + [(128, 64, 4, 3)] * 2
    forward = _runtime.module("forward")
    for plan in plans:
        plan.interpret = False  # the cap is the GPU's: the rule, as it would read there
    assert [forward.fwd_maxnreg(p) for p in plans] == [128, 128, 128, None, None, None]


@pytest.mark.gpu
def test_gpu_short_rows_forward_matches_the_oracle(monkeypatch):
    """On the H100's arch the forward of short rows takes SHORT_ROWS_FWD (64 x 64, 4 warps, 3
    stages) at D=128 and SHORT_ROWS_FWD_D64 (64 x 128, 2 stages) at D=64: a causal softcap with GQA
    and a query tail in bf16 at D=128, no mask in fp16 and causal ALiBi with GQA 4 and a query tail
    in bf16 at D=64, each against the oracle, backward included; a forward launch option keeps the
    default."""
    from kernels import api

    if api._arch(torch.device("cuda"), False) != "sm90":
        pytest.skip("SHORT_ROWS_FWD is an sm90 rule; this GPU is older")
    seen = _record_forward_launches(monkeypatch)
    check(B=2, Hq=8, Hkv=2, L=1000, S=1024, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(),
          score_mod=mods.tanh_softcap(30.0), block_size=128, device="cuda")
    check(B=2, Hq=4, L=1024, S=1024, E=64, dtype=torch.float16, device="cuda")
    check(B=2, Hq=4, Hkv=1, L=1000, S=1024, E=64, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          score_mod=mods.alibi.standard(4), device="cuda")
    assert seen == [api.SHORT_ROWS_FWD] + [api.SHORT_ROWS_FWD_D64 or api.SHORT_ROWS_FWD] * 2
    check(B=1, Hq=4, L=1024, S=1024, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          kernel_options={"fwd_num_warps": 8}, device="cuda")
    assert seen[3] == api._default_config("sm90", torch.bfloat16, 128, "masked")[0]


@pytest.mark.gpu
def test_gpu_d64_long_rows_forward_matches_the_oracle(monkeypatch):
    """At D=64 the forward's own row (128 x 128 on 8 warps, capped at 128 registers,
    kernels.forward.D64_W8_FWD_MAXNREG) where rows are over SHORT_ROWS_FWD_MAX_KEYS: no mask in
    fp16 with a query tail, causal with GQA 4 in bf16 (108 bytes of spills under the cap at
    S=16k), a causal softcap with a query tail (72 bytes), against the oracle, backward included;
    ALiBi (a score mod that gathers) on its own row, uncapped; the cap reads as the rule says."""
    from kernels import _runtime, api

    if api._arch(torch.device("cuda"), False) != "sm90":
        pytest.skip("the D=64 row and its cap are sm90's; this GPU is older")
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_MAX_KEYS", 1)  # every row long
    seen = _record_forward_launches(monkeypatch)
    plans = _record_backward_plans(monkeypatch)
    check(B=2, Hq=4, L=1000, S=1024, E=64, dtype=torch.float16, device="cuda")
    check(B=2, Hq=8, Hkv=2, L=1024, S=1024, E=64, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          device="cuda")
    check(B=2, Hq=4, L=1000, S=1024, E=64, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          score_mod=mods.tanh_softcap(30.0), device="cuda")
    check(B=2, Hq=4, L=1024, S=1024, E=64, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          score_mod=mods.alibi.standard(4), device="cuda")
    assert seen == [(128, 128, 8, 3)] * 3 + [(128, 64, 4, 3)]
    assert [_runtime.module("forward").fwd_maxnreg(p) for p in plans] == [128, 128, 128, None]


@pytest.mark.gpu
def test_gpu_automatic_refinement_matches_the_oracle():
    """A document mask on 128 x 128 blocks takes the refined forward on the GPU, and the
    backward's one-axis refinements: the oracle's verdict on both."""
    from kernels import api

    L = S = 1024
    mask_mod = mods.document.from_seed(L, 12, 0, device="cuda")
    bm = create_block_mask(mask_mod, 1, 1, L, S, device="cuda", BLOCK_SIZE=128)
    sp = api._cached_block_lists(bm, 2, 4, L, S, torch.device("cuda"))
    assert api._auto_refined(sp, mask_mod, 2, 4, L, S) is not None
    # The backward's one-axis refinements on the default sm90 D=128 tiles (a dQ key step of 64,
    # a dK/dV query step of 64): both save work here.
    opts = api.parse_kernel_options(None, dtype=torch.bfloat16, head_dim=128, q_block=64, kv_block=64,
                                    device=torch.device("cuda"), interpret=False, work="masked",
                                    bwd_blocks=(128, 128))
    assert (opts.bwd.tiles["BLOCK_N2"], opts.bwd.tiles["BLOCK_M1"]) == (64, 64)
    assert all(r is not None for r in api._auto_refined_bwd(sp, mask_mod, 2, 4, L, S, opts.bwd.tiles))
    # And the 64 x 64 lists save enough for REFINED_BWD's tiles (4 warps, two programs a
    # multiprocessor): the backward below runs on those, GQA and fp16 included.
    assert api._refined_bwd_saves(sp, mask_mod, 2, 4, L, S, opts.bwd.tiles)
    check(B=2, Hq=4, L=L, S=S, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128, device="cuda")
    check(B=2, Hq=4, Hkv=1, L=L, S=S, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128, device="cuda")
    check(B=1, Hq=4, L=L, S=S, E=128, dtype=torch.float16, mask_mod=mask_mod, block_size=128, device="cuda")


def test_shifted_windows_in_the_backward_end_to_end(monkeypatch):
    """Where the backward runs on REFINED_BWD's 64 x 64 tiles (here with the arch taken for sm90
    under the interpreter), the dQ kernel walks the forward's shifted windows (AUTO_SHIFT_DQ) and
    the dK/dV kernel windows of queries (AUTO_SHIFT_DKDV), and the oracle agrees, GQA and a query
    tail included; with the savings' thresholds lifted, causal key tiles whose last query window
    ends past L (bounds on the partial windows' queries) agree too. Each flag False gives its
    kernel the refined blocks."""
    from kernels import api

    _as_sm90(monkeypatch)
    _open_automatic_refinement(monkeypatch, "_auto_shifted")
    seen = _open_automatic_refinement(monkeypatch, "_auto_shifted_q")
    dq = _record_launches(monkeypatch, "dq_kernel", "BLOCK_M", "BLOCK_N", "KV_UNIT")
    dkdv = _record_launches(monkeypatch, "dkdv_kernel", "BLOCK_M", "BLOCK_N", "Q_UNIT", "Q_DIVISIBLE",
                            "PART_Q_DIVISIBLE")
    L = S = 300
    mask_mod = mods.document.from_seed(L, 6, 2)
    check(B=1, Hq=2, Hkv=1, L=L - 11, S=S, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128)
    assert seen[-1] is not None and dq == [(64, 64, api.SHIFT_UNIT_KV)] and dkdv == [(64, 64, api.SHIFT_UNIT_Q, True, not seen[-1].q_overrun)]
    with monkeypatch.context() as m:
        for name in ("AUTO_REFINE_SAVING", "AUTO_SHIFT_SAVING", "REFINED_BWD_SAVING", "AUTO_REFINE_BWD_SAVING"):
            m.setattr(api, name, -1.0)
        check(B=1, Hq=2, L=150, S=150, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128)
        assert seen[-1].q_overrun and dkdv[-1] == (64, 64, api.SHIFT_UNIT_Q, True, False)
    monkeypatch.setattr(api, "AUTO_SHIFT_DQ", False)
    monkeypatch.setattr(api, "AUTO_SHIFT_DKDV", False)
    check(B=1, Hq=2, L=L, S=S, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128)
    assert dq[-1] == (64, 64, 0) and dkdv[-1][2] == 0


@pytest.mark.gpu
def test_gpu_shifted_windows_match_the_oracle(monkeypatch):
    """On the GPU a document mask's forward walks shifted windows (AUTO_SHIFT) where they save
    enough: bench.py's document row at S=1k with GQA in bf16 at D=128 (its backward on REFINED_BWD's
    tiles, the dQ kernel on the same windows and the dK/dV kernel on windows of queries), and keys
    longer than queries with a query tail in fp16 at D=64, each against the oracle, backward
    included; with the thresholds lifted, causal rows whose last window ends past S (kv_overrun)
    agree too."""
    from kernels import api

    by_q = _open_automatic_refinement(monkeypatch, "_auto_shifted_q")  # (the GPU's own gate, spied)
    seen = _open_automatic_refinement(monkeypatch, "_auto_shifted")
    mask_mod = mods.document.from_seed(1024, 12, 0, device="cuda")
    check(B=2, Hq=8, Hkv=2, L=1024, S=1024, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128,
          device="cuda")
    assert by_q and by_q[-1] is not None and by_q[-1].q_unit == api.SHIFT_UNIT_Q  # the dK/dV kernel's windows of queries
    mask_mod = mods.document.from_seed(1000, 9, 4, kv_length=1100, device="cuda")
    check(B=2, Hq=4, L=1000, S=1100, E=64, dtype=torch.float16, mask_mod=mask_mod, block_size=128, device="cuda")
    assert len(seen) == 2 and all(sp is not None and sp.kv_unit == api.SHIFT_UNIT_KV for sp in seen)
    monkeypatch.setattr(api, "AUTO_REFINE_SAVING", -1.0)
    monkeypatch.setattr(api, "AUTO_SHIFT_SAVING", -1.0)
    check(B=2, Hq=4, L=256, S=100, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128,
          device="cuda")
    assert seen[-1] is not None and seen[-1].kv_overrun


@pytest.mark.gpu
def test_gpu_persistent_forward_matches_the_oracle_and_the_grid(monkeypatch):
    """On the GPU the persistent forward (``forward.PERSISTENT_FWD`` forced on; its loop nest is
    what the interpreter cannot prove: the pipelined inner loop inside the tile loop, the next
    tile's loads in flight) agrees with the oracle, backward included, on bench.py's document row
    at S=1k with GQA in bf16 at D=128 (shifted windows, 64 x 64 tiles), keys longer than queries
    with a query tail in fp16 at D=64, and a causal softcap (the default tiles); and gives the
    grid's out and LSE bit for bit, in either loop form."""
    from kernels import forward

    monkeypatch.setattr(forward, "PERSISTENT_FWD", True)
    mask_mod = mods.document.from_seed(1024, 12, 0, device="cuda")
    check(B=2, Hq=8, Hkv=2, L=1024, S=1024, E=128, dtype=torch.bfloat16, mask_mod=mask_mod, block_size=128,
          device="cuda")
    mask_mod = mods.document.from_seed(1000, 9, 4, kv_length=1100, device="cuda")
    check(B=2, Hq=4, L=1000, S=1100, E=64, dtype=torch.float16, mask_mod=mask_mod, block_size=128, device="cuda")
    check(B=1, Hq=4, Hkv=2, L=777, S=777, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(),
          score_mod=mods.tanh_softcap(20.0), block_size=128, device="cuda")
    (q, k, v), _, _ = _inputs(2, 8, 2, 1024, 1024, 128, 128, torch.bfloat16, "cuda", 3, None)
    bm = create_block_mask(mods.document.from_seed(1024, 12, 1, device="cuda"), 2, 1, 1024, 1024, device="cuda",
                           BLOCK_SIZE=128)
    for one_loop in (None, True, False):
        monkeypatch.setattr(forward, "ONE_LOOP", one_loop)
        outs = []
        for persistent in (True, False):
            monkeypatch.setattr(forward, "PERSISTENT_FWD", persistent)
            outs.append(kernels.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), one_loop


@pytest.mark.gpu
def test_gpu_tma_tiles_are_the_pointer_tiles(monkeypatch):
    """On the GPU (sm90 takes TMA by default: ``forward.TMA_KV``, ``backward.TMA_DQ``, and
    ``backward.TMA_DKDV`` on REFINED_BWD's tiles) the default agrees with the oracle on bench.py's
    document row at S=1k with GQA in bf16 at D=128 (shifted windows, 64 x 64 tiles); and with every
    kernel's streamed tiles through TMA descriptors (the flags forced) the outputs and gradients
    equal the pointer loads' bit for bit: that row, fp16 keys longer than queries with a query
    tail and interleaved heads at D=64, and a causal softcap on the default tiles."""
    doc = mods.document.from_seed(1024, 12, 0, device="cuda")
    check(B=2, Hq=8, Hkv=2, L=1024, S=1024, E=128, dtype=torch.bfloat16, mask_mod=doc, block_size=128,
          device="cuda")
    cases = [
        (dict(B=2, Hq=8, Hkv=2, L=1024, S=1024, E=128, mask_mod=doc, block_size=128), torch.bfloat16, "bhsd"),
        (dict(B=2, Hq=4, Hkv=4, L=1000, S=1100, E=64, block_size=128,
              mask_mod=mods.document.from_seed(1000, 9, 4, kv_length=1100, device="cuda")), torch.float16, "bshd"),
        (dict(B=1, Hq=4, Hkv=2, L=777, S=777, E=128, mask_mod=mods.causal(), block_size=128,
              score_mod=mods.tanh_softcap(20.0)), torch.bfloat16, "bhsd"),
    ]
    for case, dtype, layout in cases:
        got, want, described = _step_both_ways(monkeypatch, _TMA_FLAGS, dtype=dtype, layout=layout, device="cuda",
                                               **case)
        assert set(described) == {"forward_kernel", "dq_kernel", "dkdv_kernel"}, (case, described)
        for a, b in zip(got, want):
            assert torch.equal(a, b), case

def test_refined_blocks_under_pytorchs_noop_mask():
    """PyTorch's noop mask arrives as no mask_mod; its tail blocks are partial all the same."""
    from torch.nn.attention.flex_attention import noop_mask

    (q, k, v), do, dl = _inputs(1, 2, 2, 150, 140, 16, 16, torch.float16, DEVICE)
    bm = create_block_mask(noop_mask, 1, 1, 150, 140, device=DEVICE, BLOCK_SIZE=128)
    compare_with_oracle(kernels.flex_attention, q, k, v, block_mask=bm, kernel_options={"REFINE_KV_BLOCK": 32},
                        grad_out=do, grad_lse=dl)


def test_refined_blocks_in_the_decode_kernel():
    """Short queries take the decode kernel, which reads the refined lists too."""
    check(B=2, Hq=4, Hkv=2, L=3, S=290, mask_mod=mods.prefix_lm(45), block_size=128,
          kernel_options={"REFINE_KV_BLOCK": 32})


def test_cached_options_still_reject_bad_values():
    """The options cache is keyed by value and type: True and 1 hash alike, and only 1 is a valid
    num_warps, so a cached 1 must not let True through."""
    q, k, v = _qkv()
    kernels.flex_attention(q, k, v, kernel_options={"num_warps": 1})
    with pytest.raises(ValueError, match="num_warps"):
        kernels.flex_attention(q, k, v, kernel_options={"num_warps": True})


def test_cached_options_follow_the_launch_constants(monkeypatch):
    """The options cache is also keyed by the module's launch constants that parse_kernel_options
    reads (SHORT_ROWS_FWD and _D64, REFINED_FWD_LAUNCH, REFINED_BWD): a benchmark that sets one between
    calls (benchmarks/ab.py --set) gets the tiles it set, not the first call's (before this, the
    thirty-sixth session's first A/B of SHORT_ROWS_FWD timed one config under four names)."""
    from kernels import api

    monkeypatch.setattr(api, "_arch", lambda device, interpret: "sm90")  # the H100's configs, on the CPU
    kw = dict(dtype=torch.bfloat16, head_dim=128, q_block=128, kv_block=128, device=torch.device("cpu"),
              interpret=False, work="masked", short_fwd=True)
    first = api._cached_options(None, **kw)
    assert first.fwd.num_stages == api.SHORT_ROWS_FWD[3] == 3
    monkeypatch.setattr(api, "SHORT_ROWS_FWD", (64, 64, 4, 2))
    second = api._cached_options(None, **kw)
    assert second.fwd.num_stages == 2 and second is not first
    d64 = dict(kw, head_dim=64)
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_D64", (64, 128, 4, 2))
    assert api._cached_options(None, **d64).fwd.tiles["BLOCK_N"] == 128
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_D64", None)
    assert api._cached_options(None, **d64).fwd.tiles["BLOCK_N"] == 64
    monkeypatch.setattr(api, "REFINED_BWD", (64, 64, 64, 32, 4, 3))
    third = api._cached_options(None, **dict(kw, refined_bwd=True))
    assert third.bwd.tiles["BLOCK_N2"] == 32 and third.bwd.num_stages == 3


def test_cached_program_follows_requires_grad():
    """A mod's program is cached, but a table that starts requiring grad needs the program that
    scatters its gradient: the table gets one, not None."""
    q, k, v = [t.requires_grad_(True) for t in _qkv(torch.float32)]
    table = torch.randn(2, 32, 32)
    bias = mods.bias(table, "hqk")
    kernels.flex_attention(q, k, v, score_mod=bias).sum().backward()
    table.requires_grad_(True)
    kernels.flex_attention(q, k, v, score_mod=bias).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_host_helpers_match_triton():
    import triton

    from kernels import _runtime

    for n in range(1, 2100):
        assert _runtime.next_power_of_2(n) == triton.next_power_of_2(n)
    for a in range(0, 300):
        for b in range(1, 40):
            assert _runtime.cdiv(a, b) == triton.cdiv(a, b)


def test_direct_launch_key_separates_what_triton_specializes_on():
    # The direct launch reuses a compiled kernel only for arguments Triton would have
    # compiled the same way: tensors by dtype and 16-byte alignment, the rest by value.
    from kernels import _runtime

    base = torch.zeros(64, dtype=torch.float16)
    key = _runtime._spec((base[:8], base[8:16], 3, 16, 0.5, True))
    assert key == ((torch.float16, True), (torch.float16, True), 3, 16, 0.5, True)
    assert _runtime._spec((base[1:9],)) == ((torch.float16, False),)  # a 2-byte offset
    assert _runtime._spec((base.float()[:4],)) != _runtime._spec((base[:4],))


def test_off_device_tables_are_copied_once_per_version():
    # A table that must be copied for the kernels (here: not contiguous) is copied once and
    # reused while unchanged; an in-place edit (a new version) gives a fresh copy.
    from kernels.api import _device_buffers

    table = torch.arange(12.0).view(3, 4).t()
    first = _device_buffers([table], table.device)[0]
    assert first.is_contiguous() and torch.equal(first, table)
    assert _device_buffers([table], table.device)[0] is first
    table.add_(1.0)
    second = _device_buffers([table], table.device)[0]
    assert second is not first and torch.equal(second, table)
    same = torch.ones(5)
    assert _device_buffers([same], same.device)[0] is same  # already fine: no copy


def test_config_rows_by_work_kind():
    from kernels.api import _default_config, work_kind

    assert work_kind(False, False) == "dense" and work_kind(True, False) == "masked"
    assert work_kind(True, True) == "scored" and work_kind(False, True) == "scored"
    assert work_kind(True, True, True) == "gathered" and work_kind(False, False, True) == "dense"
    # The H200 sweeps' rows: 128 x 128 on 8 warps and 3 stages at D=128 whatever the work (a
    # missing work entry falls back to the head dim's None row), 128 x 64 for D=64 with a score
    # mod that gathers, 128 x 128 on 8 warps for D=64 otherwise (the H100, forty-first and
    # forty-second sessions).
    assert _default_config("sm90", torch.bfloat16, 128, "dense")[0] == (128, 128, 8, 3)
    assert _default_config("sm90", torch.bfloat16, 128, "masked")[0] == (128, 128, 8, 3)
    assert _default_config("sm90", torch.bfloat16, 64, "dense")[0] == (128, 128, 8, 3)
    assert _default_config("sm90", torch.float16, 64, "masked")[0] == (128, 128, 8, 3)
    assert _default_config("sm90", torch.bfloat16, 64, "scored")[0] == (128, 128, 8, 3)
    assert _default_config("sm90", torch.bfloat16, 64, "gathered")[0] == (128, 64, 4, 3)
    assert _default_config("sm90", torch.float16, 128, "gathered")[0] == (128, 128, 8, 3)
    # An unknown head dim falls back to the arch's row.
    assert _default_config("sm90", torch.bfloat16, 32, "dense") == _default_config("sm90", None, 0)
    with pytest.raises(ValueError, match="work"):
        kernels.parse_kernel_options(None, dtype=torch.float16, head_dim=16, q_block=128, kv_block=128,
                                     device=torch.device("cpu"), interpret=True, work="heavy")


def test_score_loads_tells_a_gathering_score_mod():
    """``ModProgram.score_loads`` (the "gathered" config row, and no D=64 register cap): set where
    the score function reads a captured tensor, whatever the mask reads."""
    from kernels.mods import compile_mods

    doc = mods.document.from_seed(64, 3, 0)
    gathers = [mods.alibi.standard(2), mods.relative_position(torch.randn(2, 5)),
               mods.bias(torch.randn(64, 64), "qk"), mods.chain(mods.tanh_softcap(5.0), mods.alibi.standard(2))]
    for score_mod in gathers:
        assert compile_mods(score_mod, None, interpret=True).score_loads, score_mod.name
    for score_mod, mask_mod in ((mods.tanh_softcap(5.0), None), (mods.tanh_softcap(5.0), doc), (None, doc),
                                (mods.identity(), mods.causal())):
        program = compile_mods(score_mod, mask_mod, interpret=True)
        assert not program.score_loads and program.mask_loads == (mask_mod is doc)


def test_float64_is_rejected():
    q, k, v = _qkv(torch.float64)
    with pytest.raises(TypeError, match="oracle.flex_attention"):
        kernels.flex_attention(q, k, v)


def test_block_size_not_multiple_of_16():
    q, k, v = _qkv()
    bm = create_block_mask(mods.causal(), 1, 2, 32, 32, device=DEVICE, BLOCK_SIZE=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.flex_attention(q, k, v, block_mask=bm)


def test_block_mask_too_short():
    q, k, v = _qkv()
    bm = create_block_mask(mods.causal(), 1, 2, 16, 16, device=DEVICE, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="cover"):
        kernels.flex_attention(q, k, v, block_mask=bm)


# --------------------------------------------------------------------------
# the same behaviours at realistic sizes, on a GPU


GPU_CASES = [
    dict(B=2, Hq=8, Hkv=2, L=1024, S=1024, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128),
    dict(B=1, Hq=6, Hkv=2, L=1000, S=777, E=64, dtype=torch.float16, mask_mod=mods.sliding_window(256), block_size=128),
    dict(B=2, Hq=4, Hkv=4, L=513, S=1025, E=40, Ev=24, dtype=torch.bfloat16, mask_mod=mods.prefix_lm(100), block_size=64),
    dict(B=1, Hq=4, Hkv=4, L=2048, S=2048, E=64, dtype=torch.float16, block_size=128,
         mask_mod=mods.document.from_seed(2048, 12, seed=0, device="cuda" if torch.cuda.is_available() else "cpu"),
         score_mod=mods.alibi.standard(4, device="cuda" if torch.cuda.is_available() else "cpu")),
    dict(B=2, Hq=4, Hkv=1, Bk=1, L=700, S=900, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(),
         score_mod=mods.tanh_softcap(20.0), block_size=128),
    dict(B=1, Hq=8, Hkv=8, L=600, S=600, E=64, dtype=torch.float32, mask_mod=mods.by_head(mods.causal(), mods.chunked(128)),
         block_size=128),
    dict(B=2, Hq=32, Hkv=8, L=1, S=8192, E=128, dtype=torch.bfloat16, mask_mod=mods.causal(), block_size=128),
    dict(B=1, Hq=15, Hkv=5, L=77, S=4099, E=128, dtype=torch.float16, mask_mod=mods.sliding_window(1000), block_size=128),
    dict(B=1, Hq=8, Hkv=2, L=77, S=77, E=64, dtype=torch.bfloat16, block_size=128,
         kernel_options={"FORCE_USE_FLEX_ATTENTION": True}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c['B']}x{c['Hq']}/{c['Hkv']}x{c['L']}x{c['S']}x{c['E']}-{str(c['dtype'])[6:]}")
def test_gpu_cases(case):
    case = dict(case)
    if case.get("score_mod") is None and case["E"] == 128 and case["L"] > 1:
        case["score_mod"] = mods.bias.from_seed([case["Hq"], case["L"], case["S"]], seed=1, requires_grad=True,
                                                device="cuda")
    check(device="cuda", **case)


def test_mixed_kv_layouts_copy_the_odd_one_out():
    """On the GPU, K and V whose head dims differ in being unit-stride are given one layout
    (Triton 3.6 miscompiles such a forward on sm_90: kernels.api._matching_kv_layouts); the
    copy keeps the values and the gradient path, and a matching pair is passed through."""
    from kernels.api import _matching_kv_layouts

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1, 2, 129, 24, generator=g)
    upright = torch.randn(1, 2, 24, 129, generator=g).transpose(-1, -2)  # stored [B, H, E, S]
    k, v = _matching_kv_layouts(upright, flat)
    assert k.is_contiguous() and v is flat and torch.equal(k, upright)
    k, v = _matching_kv_layouts(flat, upright)
    assert k is flat and v.is_contiguous() and torch.equal(v, upright)
    for pair in ((flat, flat.clone()), (upright, upright.clone())):
        out = _matching_kv_layouts(*pair)
        assert out[0] is pair[0] and out[1] is pair[1]
    # A head dim of 1 is unit-stride whatever its stride says.
    one = torch.randn(1, 2, 1, 129, generator=g).transpose(-1, -2)
    assert _matching_kv_layouts(one, flat)[0] is one
    # The copy is differentiable: the gradient reaches the caller's tensor in its layout.
    leaf = torch.randn(1, 2, 24, 129, generator=g).transpose(-1, -2).requires_grad_(True)
    k, _ = _matching_kv_layouts(leaf, flat)
    k.sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, torch.ones_like(leaf))


class _Oversized:
    """A stand-in for a Triton kernel whose every launch needs more shared memory than the GPU
    has (Triton raises OutOfResources when it loads the compiled kernel); records the stages tried."""
    __name__ = "dkdv_kernel"

    def __init__(self):
        self.stages = []

    def __getitem__(self, grid):
        import triton

        def run(*args, num_stages, **kwargs):
            self.stages.append(num_stages)
            raise triton.runtime.errors.OutOfResources(245760, 232448, "shared memory")
        return run


def test_tiles_too_large_name_the_callers_options(monkeypatch):
    """Tiles that do not fit even with one stage: the launch retries 3, 2, 1 stages, then names
    the caller's kernel_options behind the tiles, the bytes and the fix (TilesTooLarge, a
    ValueError); with no option of the caller's behind them (our defaults) Triton's own error
    stands, since a default that does not fit is our bug. The fuzzer's kernels target counts
    the first as not applicable, never the second."""
    import triton

    from kernels import _runtime, api
    from properties.properties import evaluate
    from properties.case import FlexCase
    from properties.targets import TARGETS

    monkeypatch.setattr(_runtime, "_stages_that_fit", {})
    opts = api.parse_kernel_options({"bwd_BLOCK_M1": 32, "BLOCK_N1": 16, "BLOCK_M": 16}, dtype=torch.float32,
                                    head_dim=128, q_block=64, kv_block=64, device=torch.device("cpu"),
                                    interpret=True)
    given = opts.bwd.options_for("BLOCK_M1", "BLOCK_N1")
    assert given == {"bwd_BLOCK_M1": 32, "BLOCK_N1": 16} and opts.bwd.options_for("BLOCK_M2", "BLOCK_N2") == {}
    assert opts.fwd.options_for("BLOCK_M", "BLOCK_N") == {"BLOCK_M": 16}
    kernel = _Oversized()
    with pytest.raises(kernels.TilesTooLarge) as info:
        _runtime._launch_retrying(kernel, (1,), (), 3, dict(BLOCK_M=32, BLOCK_N=16, QK_PAD=128, V_PAD=128), None,
                                  given)
    assert kernel.stages == [3, 2, 1] and isinstance(info.value, ValueError)
    assert str(info.value) == (
        "kernel_options bwd_BLOCK_M1=32, BLOCK_N1=16 give dkdv_kernel 32x16 tiles (QK_PAD=128, V_PAD=128) that "
        "need 245760 bytes of shared memory even with num_stages=1; this GPU has 232448. Pass smaller tiles "
        "(halve one of bwd_BLOCK_M1, BLOCK_N1), or leave them out for defaults that fit.")
    assert (info.value.required, info.value.limit) == (245760, 232448)
    with pytest.raises(triton.runtime.errors.OutOfResources):
        _runtime._launch_retrying(_Oversized(), (1,), (), 2, dict(BLOCK_M=32, BLOCK_N=16), None, {})

    class _BackwardTooLarge(torch.autograd.Function):  # the backward's tiles are checked in the backward
        @staticmethod
        def forward(ctx, out):
            return out.clone()

        @staticmethod
        def backward(ctx, grad):
            raise kernels.TilesTooLarge("no room", {"BLOCK_M1": 128}, 245760, 232448)

    real = kernels.flex_attention

    def too_large(*args, **kwargs):
        out, *rest = real(*args, **kwargs)
        return (_BackwardTooLarge.apply(out), *rest)

    monkeypatch.setattr(kernels, "flex_attention", too_large)
    case = FlexCase(B=1, Hq=1, Hkv=1, Bk=1, L=16, S=16, E=16, Ev=16, dtype="float32", backward=True)
    outcome = evaluate("matches_oracle", TARGETS["kernels"], case, "cpu")
    assert outcome.status == "skipped" and "BLOCK_M1=128" in outcome.reason, outcome


def _softcap_points(device, scale: int = 1) -> torch.Tensor:
    """4 million float32 arguments for a tanh (``scale`` divides the count): [-12, 12]
    evenly, 1e-9 to 1 logarithmically on both sides, and out to 200 where exp2 overflows."""
    big = torch.linspace(-12.0, 12.0, (1 << 21) // scale, dtype=torch.float64)
    small = torch.logspace(-9, 0, (1 << 20) // scale, dtype=torch.float64)
    far = torch.linspace(12.0, 200.0, (1 << 12) // scale, dtype=torch.float64)
    return torch.cat([big, small, -small, far, -far]).to(torch.float32).to(device)


def _softcap_fns(x: torch.Tensor, cap: float, rounding: float = 0.0):
    """``tanh_softcap(cap)``'s compiled ``score_fn`` and its derivative (``score_bwd_fn`` at
    dt = 1) at the scores ``x``, by Triton on x's device (the interpreter on the CPU)."""
    import triton
    import triton.language as tl

    from kernels.mods import compile_mods

    @triton.jit
    def apply(X, Y, DY, N, FN: tl.constexpr, BWD_FN: tl.constexpr, B0, B1, B2, B3, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0)
        tl.store(Y + offs, FN(x, 1.0, 0, 0, offs, offs, B0, B1, B2, B3), mask=offs < N)
        one = tl.full([BLOCK], 1.0, tl.float32)
        grad = BWD_FN(x, 1.0, one, 0, 0, offs, offs, offs < N, B0, B1, B2, B3, B0, B1, B2, B3, False)
        tl.store(DY + offs, grad, mask=offs < N)

    prog = compile_mods(mods.tanh_softcap(cap), None, interpret=x.device.type == "cpu", rounding=rounding)
    y, dy = torch.empty_like(x), torch.empty_like(x)
    dummy = x[:1]
    block = 1024 if x.is_cuda else 1 << 16
    apply[(triton.cdiv(x.numel(), block),)](x, y, dy, x.numel(), prog.score_fn, prog.score_bwd_fn,
                                            dummy, dummy, dummy, dummy, BLOCK=block)
    return prog, y, dy


def _fast_tanh_errors(device, scale: int = 1):
    """The fast tanh (bf16's rounding, cap 1): its worst absolute errors in tanh and in
    1 - tanh**2 against float64, and the program's source."""
    x = _softcap_points(device, scale)
    prog, y, dy = _softcap_fns(x, 1.0, rounding=2.0 ** -8)
    ref = torch.tanh(x.double())
    return ((y.double() - ref).abs().max().item(), (dy.double() - (1 - ref * ref)).abs().max().item(),
            prog.source)


def test_softcap_fast_tanh_only_where_the_rounding_hides_it():
    """``compile_mods(..., rounding=...)``: a softcap computes its tanh from exp2 and one
    reciprocal when ``cap * TANH_FAST_ERR`` is at most ``rounding / 100`` (bf16's 2**-8: cap up
    to 78; fp16's 2**-11: cap up to 9.7), never without a rounding (a call that returns the
    float32 LSE, and float32 inputs) nor with a learnable table (its gradient is a float32
    output)."""
    from kernels.mods import compile_mods

    def fast(score_mod, rounding):
        return "exp2" in compile_mods(score_mod, None, rounding=rounding).source

    assert not fast(mods.tanh_softcap(30.0), 0.0)
    assert fast(mods.tanh_softcap(30.0), 2.0 ** -8) and fast(mods.tanh_softcap(78.0), 2.0 ** -8)
    assert not fast(mods.tanh_softcap(80.0), 2.0 ** -8)
    assert fast(mods.tanh_softcap(9.5), 2.0 ** -11) and not fast(mods.tanh_softcap(30.0), 2.0 ** -11)
    assert fast(mods.chain(mods.alibi.standard(2), mods.tanh_softcap(4.0)), 2.0 ** -8)
    table = mods.bias.from_seed([2], seed=4, layout="h", requires_grad=True)
    assert not fast(mods.chain(table, mods.tanh_softcap(3.0)), 2.0 ** -8)
    assert fast(mods.chain(mods.bias.from_seed([2], seed=4, layout="h"), mods.tanh_softcap(3.0)), 2.0 ** -8)


@pytest.mark.parametrize("dtype,fast", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False),
                                        ("learnable", False)], ids=str)
def test_backward_compiles_its_mods_with_the_dtypes_rounding(dtype, fast, monkeypatch):
    """``kernels.flex_attention``'s backward runs the mods compiled with
    ``kernels.api.DTYPE_ROUNDING`` of the inputs' dtype (the fast tanh in bf16 and fp16),
    its forward the exact ones; a float32 call and a learnable table keep the exact ones."""
    plans = _record_backward_plans(monkeypatch)
    score_mod = mods.tanh_softcap(5.0)
    if dtype == "learnable":
        table = mods.bias.from_seed([2], seed=4, layout="h", requires_grad=True)
        score_mod, dtype = mods.chain(table, score_mod), torch.bfloat16
    check(L=40, S=40, dtype=dtype, score_mod=score_mod, mask_mod=mods.causal())
    assert plans, "no backward ran"
    forward_source, backward_source = plans[-1].program.source, plans[-1].backward_program.source
    assert "exp2" not in forward_source
    assert ("exp2" in backward_source) == fast


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_forward_of_out_alone_takes_the_fast_tanh_and_matches_the_oracle(dtype, monkeypatch):
    """A bf16 or fp16 call that returns out alone runs its forward with the mods of
    ``kernels.api.DTYPE_ROUNDING`` (the fast tanh), the forward and the decode kernel alike, and
    its out and gradients agree with the float64 oracle (``out_alone_matches_oracle``); a
    float32 call keeps the exact mods."""
    from kernels import api
    from properties import FlexCase, out_alone_matches_oracle

    seen = []
    use_decode = api.use_decode

    def spy(plan):
        seen.append((plan.L, plan.program.source))
        return use_decode(plan)

    monkeypatch.setattr(api, "use_decode", spy)
    for L in (40, 130):  # the decode kernel (L < 128) and the forward kernel
        case = FlexCase(B=1, Hq=2, Hkv=1, Bk=1, L=L, S=70, E=16, Ev=16, dtype=dtype, seed=1,
                        score=mods.tanh_softcap(5.0).spec(), mask=mods.causal().spec(), block_size=(32, 32))
        out_alone_matches_oracle("kernels", case, "cpu")
    assert {L for L, _ in seen} == {40, 130}
    assert all(("exp2" in source) == (dtype != "float32") for _, source in seen)


def test_fast_tanh_reciprocal_by_newton_within_one_ulp(monkeypatch):
    """The Newton reciprocal of the fast tanh (``kernels.mods.rcp_newton_reference``, step for
    step the PTX of ``_rcp_newton_ptx``) is within 1 float32 ulp of 1 / y, rcp.approx's bound,
    which ``TANH_FAST_ERR``'s derivation assumes: over every mantissa in [1, 2) (the seed's and
    the steps' relative error repeats in every binade) and y = 1 + e from 1 to past the clamp,
    inf included. One Newton step fewer (two quadratic steps) would miss it."""
    import numpy as np

    from kernels import mods as M

    def worst_ulps(y):
        r = M.rcp_newton_reference(y).astype(np.float64)
        exact = 1.0 / y.astype(np.float64)
        finite = np.isfinite(y) & (y <= M.RCP_CLAMP)
        assert (r[~finite] <= 1.0 / M.RCP_CLAMP * (1 + 1e-6)).all() and (r[~finite] > 0).all()
        return (np.abs(r - exact) / np.spacing(exact.astype(np.float32)))[finite].max()

    mantissas = (1.0 + np.arange(1 << 23, dtype=np.float64) / (1 << 23)).astype(np.float32)
    assert worst_ulps(mantissas) <= 0.8
    wide = np.concatenate([np.float32(2.0) ** np.arange(0, 70, dtype=np.float32),
                           np.geomspace(1.0, 1e25, 100001).astype(np.float32), [np.float32(np.inf)]])
    assert worst_ulps(wide) <= 0.8
    ptx = M._rcp_newton_ptx("$1", "$0")
    assert f"{M.RCP_SEED:#x}" in ptx and "0f5F800000" in ptx and ptx.count("fma.rn") == 5
    monkeypatch.setattr(M, "RCP_STEPS", ("newton", "newton"))
    assert worst_ulps(mantissas) > 1.0
    # A choice the kernels do not know is refused when the softcap compiles, naming it.
    monkeypatch.setattr(M, "TANH_RCP", "fast")
    with pytest.raises(ValueError, match=r"TANH_RCP in \('split', 'mufu', 'newton', 'split4'\), got 'fast'"):
        M.compile_mods(mods.tanh_softcap(1.0), None, rounding=2.0 ** -8)


def test_dkdv_kernel_takes_its_own_reciprocal(monkeypatch):
    """``compile_mods(..., rcp=...)`` gives a program's fast tanh that reciprocal (a softcap
    class's own ``RCP`` still first, ``TANH_RCP`` where neither is set), and
    ``kernels.mods.TANH_RCP_DKDV`` gives the dK/dV kernel such a program of its own (and
    ``TANH_RCP_FWD`` a forward that returns out alone); the backward then still agrees with the
    oracle. An unknown choice is refused by name, in any of the three places.
    ``tests/test_codegen.py`` checks on sm_90 code that the dK/dV kernel alone takes it, and the
    out-alone forward ``TANH_RCP_FWD``'s (the
    interpreter runs no PTX, so here the two programs' sources are the same)."""
    from kernels import mods as M

    def source(mod=None, **kw):
        return M.compile_mods(mod or mods.tanh_softcap(1.0), None, rounding=2.0 ** -8, **kw).source

    assert "rcp.approx" in source() and "fma.rn" in source() and "pack=2" in source()
    assert "fma.rn" not in source(rcp="mufu") and "rcp.approx" not in source(rcp="newton")

    class Newton(M._TanhSoftcap):
        RCP = "newton"

    assert "rcp.approx" not in source(Newton(1.0), rcp="mufu")
    with pytest.raises(ValueError, match=r"rcp in \('split', 'mufu', 'newton', 'split4'\) or None, got rcp='fast'"):
        source(rcp="fast")
    # split4: of each four elements one by rcp.approx and three by Newton's method; split: one and one.
    four, two = source(rcp="split4"), source(rcp="split")
    assert "pack=4" in four and four.count("rcp.approx") == two.count("rcp.approx") > 0
    assert four.count("fma.rn") == 3 * two.count("fma.rn") > 0
    monkeypatch.setattr(M, "TANH_RCP_DKDV", "mufu")
    monkeypatch.setattr(M, "TANH_RCP_FWD", "split4")
    check(L=40, S=40, dtype=torch.bfloat16, score_mod=mods.tanh_softcap(5.0), mask_mod=mods.causal())
    for name in ("TANH_RCP_DKDV", "TANH_RCP_FWD"):
        monkeypatch.setattr(M, name, "fast")
        with pytest.raises(ValueError, match=rf"kernels.mods.{name} in \(None, 'split', 'mufu', 'newton', 'split4'\), "
                                             r"got 'fast'"):
            check(L=40, S=40, dtype=torch.bfloat16, score_mod=mods.tanh_softcap(5.0), mask_mod=mods.causal())
        monkeypatch.setattr(M, name, None)


def test_softcap_fast_tanh_error_bound_in_the_interpreter():
    """The fast tanh's formula, run by the interpreter (numpy's exp2 and an IEEE division
    where the GPU has ex2.approx and rcp.approx), within ``TANH_FAST_ERR`` of float64's tanh
    and its derivative within twice that, from 1e-9 to 200 (the GPU's exp2 overflows past 44,
    the interpreter's argument stops at 126). ``test_gpu_softcap_fast_tanh_error_bound`` holds
    the GPU's instructions to the same."""
    from kernels.mods import TANH_FAST_ERR

    err, derr, source = _fast_tanh_errors("cpu", scale=16)
    assert "exp2" in source
    assert err <= TANH_FAST_ERR, f"fast tanh: {err:.3g} from float64 tanh, bound {TANH_FAST_ERR:g}"
    assert derr <= 2 * TANH_FAST_ERR, f"fast tanh's derivative: {derr:.3g} from float64, bound {2 * TANH_FAST_ERR:g}"


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["split", "mufu", "newton", "split4"])
def test_gpu_softcap_fast_tanh_error_bound(how, monkeypatch):
    """The backward's fast tanh on the GPU (ex2.approx, then the reciprocal by rcp.approx, by
    Newton's method, half and half, or one in four by rcp.approx: ``kernels.mods.TANH_RCP``): within ``TANH_FAST_ERR``
    (absolute) of float64 tanh over the 4 million points, its derivative within twice that,
    the bound ``kernels.mods`` derives from the instructions' documented errors. A NaN score
    stays NaN whichever reciprocal it takes, without making its pair's other element NaN, and
    scores past the clamp saturate."""
    from kernels import mods as M
    from kernels.mods import TANH_FAST_ERR

    monkeypatch.setattr(M, "TANH_RCP", how)
    err, derr, source = _fast_tanh_errors("cuda")
    assert ("rcp.approx" in source) == (how != "newton") and ("fma.rn" in source) == (how != "mufu")
    special = torch.tensor([float("nan"), 0.5, 0.5, float("nan"), float("inf"), -float("inf"), 1e30, 0.0],
                           device="cuda")
    _, y, _ = _softcap_fns(special, 1.0, rounding=2.0 ** -8)
    assert y.isnan().tolist() == [True, False, False, True, False, False, False, False], y
    assert y[4:].tolist() == [1.0, -1.0, 1.0, 0.0], y
    assert err <= TANH_FAST_ERR, f"fast tanh: {err:.3g} from float64 tanh, bound {TANH_FAST_ERR:g}"
    assert derr <= 2 * TANH_FAST_ERR, f"fast tanh's derivative: {derr:.3g} from float64, bound {2 * TANH_FAST_ERR:g}"


def test_softcap_rational_is_its_fit_and_within_the_bound_in_float32():
    """``kernels.mods.TANH_NUM`` / ``TANH_DEN`` (the rational softcap's tanh, where a float32
    result needs it) are what ``benchmarks/softcap_tanh.py``'s ``fit_rational(4, 3)`` gives, and
    in float32 arithmetic as sm_90 runs them (FMAs rounded once, rcp.approx 1 ulp off either way,
    ``emulated_ulps``) within 6 of the 8 ulps that ``test_gpu_softcap_tanh_accuracy`` allows, at caps
    from 0.01 to 1e4 and at caps too large to fold into the numerator. One numerator coefficient
    fewer (4/2) would be 9e-6 relative at worst, 78 ulps. The generated source, run by the
    interpreter (numpy's float32, an IEEE division), is within 6 ulps as well, ``cap`` folded or not."""
    from benchmarks import softcap_tanh
    from kernels import mods as M

    worst, num, den = softcap_tanh.fit_rational(4, 3)
    assert worst < 2e-7
    assert [float(c) for c in M.TANH_NUM] == pytest.approx([float(c) for c in num], rel=1e-6)
    assert [float(c) for c in M.TANH_DEN] == pytest.approx([float(c) for c in den], rel=1e-6)
    assert softcap_tanh.fit_rational(4, 2, iters=60)[0] > 5e-6
    for cap in (1.0, 30.0, 0.01, 1e4, 2.0 ** 70):
        assert M.tanh_cap_folds(cap) == (cap < 2.0 ** 64)
        for rcp_ulps in (-1.0, 1.0):
            assert softcap_tanh.emulated_ulps(cap=cap, rcp_ulps=rcp_ulps) <= 6.0, (cap, rcp_ulps)
        if cap in (30.0, 2.0 ** 70):
            x = _softcap_points("cpu", scale=16) * cap
            prog, y, _ = _softcap_fns(x, cap)
            assert (f"{cap!r} * " in prog.source.split("def score_bwd_fn")[0]) == (cap > 2.0 ** 64)
            ref = cap * torch.tanh(x.double() / cap)
            ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
            assert ((y.double() - ref).abs() / ulp).max().item() <= 6.0, cap


@pytest.mark.gpu
def test_gpu_softcap_tanh_accuracy():
    """The softcap's compiled tanh (a rational function and rcp.approx) stays within
    8 float32 ulps of float64 tanh over 4 million points, small arguments included (the
    exp2 formula it replaced lost 1e-5 relative near 0, which a float32 LSE check catches;
    the backward takes that one in bf16 and fp16, ``test_gpu_softcap_fast_tanh_error_bound``)."""
    x = _softcap_points("cuda")
    _, y, _ = _softcap_fns(x, 1.0)
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    worst = ((y.double() - ref).abs() / ulp).max().item()
    assert worst <= 8, f"softcap tanh: {worst:.1f} float32 ulps from float64 tanh"


@pytest.mark.gpu
def test_gpu_direct_launch_matches_triton_dispatch():
    """``_runtime.launch`` calls a cached compiled kernel directly after its first launch of a
    kind. It must give bitwise what Triton's own dispatch gives, and must not reuse a kernel
    compiled for 16-byte-aligned pointers on a misaligned view (Triton specializes on it)."""
    from kernels import _runtime

    base = torch.randn(2 * 4 * 300 * 64 + 8, device="cuda", dtype=torch.bfloat16)
    n = 2 * 4 * 300 * 64
    views = {"aligned": base[:n].view(2, 4, 300, 64), "misaligned": base[1:1 + n].view(2, 4, 300, 64)}
    bm = create_block_mask(mods.document.from_seed(300, 5, seed=0, device="cuda"), 1, 1, 300, 300, device="cuda")

    def run(t):
        q, k, v = (x.detach().requires_grad_(True) for x in (t, t.flip(2).contiguous(), t * 0.5))
        out, lse = kernels.flex_attention(q, k, v, block_mask=bm, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        step = kernels.flex_attention(q[:, :, :3].detach(), k.detach(), v.detach(), return_lse=True)
        return [out, lse, *grads, *step]

    try:
        for name in ("aligned", "misaligned", "aligned"):
            _runtime.DIRECT_LAUNCH = False
            want = run(views[name])
            _runtime.DIRECT_LAUNCH = True
            for _ in range(2):  # the first may compile and fill the cache, the second launches directly
                got = run(views[name])
                for a, b in zip(want, got):
                    assert torch.equal(a, b), f"{name}: the direct launch differs from Triton's dispatch"
    finally:
        _runtime.DIRECT_LAUNCH = True
    assert _runtime._direct, "the direct-launch cache was never filled"


def test_kernels_compile_for_hopper_without_a_gpu():
    """The kernels compile for sm_90 on a CPU machine (Triton's ptxas, no launch): a change
    that only the real compiler rejects (shared memory over the H100's 227 KiB, a construct
    the interpreter accepts) fails CPU CI, not first on the GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "compile_check.py"), "--quick"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kernels compiled for sm_90, 0 failed" in done.stdout, done.stdout  # forward, delta, dQ, dK/dV


def _separate_delta_case(device, sides=("dq",), own_delta=False):
    """Backward with delta_kernel (backward.CONCURRENT) and without: gradients of a GQA case
    with a learnable table, an LSE gradient and PRESCALE_QK (delta_kernel then also writes the
    prescaled q the dK/dV kernel reads); the fused path first, then the concurrent one with each
    of ``sides`` as backward.SIDE_KERNEL, then with ``own_delta`` the concurrent one with
    backward.DQ_OWN_DELTA (the dQ kernel's own delta, delta_kernel beside it)."""
    from kernels import backward

    table = mods.bias.from_seed([4, 77, 90], seed=2, requires_grad=True, device=device)
    bm = create_block_mask(mods.causal(), 1, 1, 77, 90, device=device, BLOCK_SIZE=32)
    (q, k, v), do, dl = _inputs(2, 4, 2, 77, 90, 24, 40, torch.bfloat16, device, seed=5)
    results = []
    variants = [(False, "dq", False)] + [(True, side, False) for side in sides] + [(True, "dq", True)] * own_delta
    defaults = (backward.CONCURRENT, backward.SIDE_KERNEL, backward.DQ_OWN_DELTA)
    for concurrent, side, own in variants:
        backward.CONCURRENT, backward.SIDE_KERNEL, backward.DQ_OWN_DELTA = concurrent, side, own
        try:
            out, lse = kernels.flex_attention(q, k, v, table, bm, enable_gqa=True, return_lse=True,
                                              kernel_options={"PRESCALE_QK": True})
            grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v, *table.tensors()))
        finally:
            backward.CONCURRENT, backward.SIDE_KERNEL, backward.DQ_OWN_DELTA = defaults
        results.append(grads)
    return results


def test_separate_delta_kernel_changes_nothing(monkeypatch):
    """Under the interpreter the delta_kernel path runs without streams: bit for bit the fused one;
    and so does DQ_OWN_DELTA's: the dQ kernel first, on its own delta and storing no statistics
    (STORE_STATS off), then delta_kernel, then the dK/dV kernel on delta_kernel's."""
    from kernels import _runtime

    launch, order = _runtime.launch, []

    def record(kernel, grid, *args, **kwargs):
        order.append((kernel.fn.__name__, kwargs.get("STORE_STATS")))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", record)
    fused, separate, own = _separate_delta_case("cpu", own_delta=True)
    for a, b, c in zip(fused, separate, own):
        assert torch.equal(a, b) and torch.equal(a, c)
    backward_order = [name for name, _ in order if name in ("dq_kernel", "dkdv_kernel", "delta_kernel")]
    assert backward_order == ["dq_kernel", "dkdv_kernel", "delta_kernel", "dq_kernel", "dkdv_kernel",
                              "dq_kernel", "delta_kernel", "dkdv_kernel"]
    assert [store for name, store in order if name == "dq_kernel"] == [True, True, False]


def test_backward_side_kernel_is_checked():
    """``run_backward``'s ``side`` (kernels.backward.SIDE_KERNEL) is one of three, or refused by name."""
    from kernels import backward

    assert backward.SIDE_KERNEL == "dq" and backward.SIDE_KERNEL in backward.SIDE_KERNELS
    with pytest.raises(ValueError, match="side kernel in .*'dkdv'.*got 'dk'"):
        backward.run_backward(None, None, None, None, None, None, None, None, need_buffer_grads=False, side="dk")


_DQ_ATOMIC_CASES = {
    # GQA, a learnable table, an LSE gradient, PRESCALE_QK (delta_kernel writes the scaled q),
    # lengths that divide no block, a broadcast key batch (float32 dK/dV per query batch)
    "gqa-table-prescale": lambda device: check(
        B=2, Hq=4, Hkv=2, L=77, S=90, E=24, Ev=40, dtype=torch.bfloat16, device=device, Bk=1,
        score_mod=mods.bias.from_seed([4, 77, 90], seed=2, requires_grad=True, device=device),
        mask_mod=mods.causal(), kernel_options={"PRESCALE_QK": True}),
    # a document mask with partial and full blocks, tails on both sides, float16
    "document-tails": lambda device: check(
        B=1, Hq=2, L=300, S=300, E=64, dtype=torch.float16, device=device,
        mask_mod=mods.document.from_seed(300, 4, 1, device=device), block_size=64),
    # a score mod with a derivative, and a band: partial blocks on both of its edges
    "softcap-window": lambda device: check(
        B=1, Hq=2, L=129, S=200, E=32, dtype=torch.bfloat16, device=device,
        score_mod=mods.tanh_softcap(5.0), mask_mod=mods.sliding_window(40)),
    # D=128, GQA, query and key tails: on sm90 the descriptor's reduction (DQ_ATOMIC_TMA) drops
    # the rows past L itself
    "d128-gqa-tails": lambda device: check(
        B=2, Hq=4, Hkv=2, L=300, S=260, E=128, dtype=torch.bfloat16, device=device, mask_mod=mods.causal()),
}


@pytest.mark.parametrize("case", sorted(_DQ_ATOMIC_CASES))
def test_dq_atomic_backward_matches_the_oracle(case):
    """``kernels.backward.DQ_ATOMIC`` (no dQ kernel: the dK/dV kernel adds dS K into float32 dQ
    with atomic adds): every gradient against the oracle, under the interpreter, on the shapes and
    options that move where dQ's rows live (GQA heads, broadcast batches, tails, PRESCALE)."""
    from kernels import backward

    assert backward.DQ_ATOMIC is False  # the default: not yet timed on a GPU
    backward.DQ_ATOMIC = True
    # Forced on, the descriptor's reduction still leaves the interpreter on the pointer adds (it
    # has no descriptor reduction).
    saved, backward.DQ_ATOMIC_TMA = backward.DQ_ATOMIC_TMA, True
    try:
        _DQ_ATOMIC_CASES[case](DEVICE)
    finally:
        backward.DQ_ATOMIC, backward.DQ_ATOMIC_TMA = False, saved


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, None])
def test_gpu_dq_atomic_backward_matches_the_oracle(tma, monkeypatch):
    """The same cases on CUDA, where the atomic adds of the dK/dV kernel's programs race: one
    ``red.global.add`` an element, and (None: sm90 where the head dim needs no padding, E=32, 64
    and 128 here) the TMA descriptor's reduction of each tile, ``DQ_ATOMIC_TMA``."""
    from kernels import backward

    monkeypatch.setattr(backward, "DQ_ATOMIC", True)
    monkeypatch.setattr(backward, "DQ_ATOMIC_TMA", tma)
    for case in sorted(_DQ_ATOMIC_CASES):
        _DQ_ATOMIC_CASES[case]("cuda")


# ONE_LOOP's cases (kernels.forward and kernels.backward): (B, Hq, Hkv, L, S, E, mask_mod, score_mod,
# block size, kernel_options, dtype), each with rows of partial blocks only, of full blocks after
# partial ones, and of full ones only.
_ONE_LOOP_CASES = {
    # a document mask with tails on both sides: gathers in the mask, lists that start with either kind
    "document-tails": lambda device: (1, 2, 2, 300, 300, 64, mods.document.from_seed(300, 4, 1, device=device),
                                      None, 64, None, torch.float16),
    # a band with partial blocks on both edges and full ones between, under a score mod
    "softcap-window": lambda device: (1, 2, 2, 129, 200, 32, mods.sliding_window(80), mods.tanh_softcap(5.0),
                                      32, None, torch.bfloat16),
    # GQA, a learnable table (the mask's keep guards its gradient), PRESCALE_QK, and two key tiles
    # per listed block in the forward
    "bias-gqa-prescale": lambda device: (2, 4, 2, 256, 230, 32, mods.causal(),
                                         mods.bias.from_seed([4, 256, 230], seed=4, requires_grad=True,
                                                             device=device),
                                         128, {"BLOCK_M": 64, "BLOCK_N": 64, "PRESCALE_QK": True},
                                         torch.bfloat16),
    # BLOCKS_ARE_CONTIGUOUS: the next block is counted on from each list's first, not read. The
    # promise holds for causal lists on whole blocks only: with L=200 the last, partial query block
    # follows each key block's diagonal in its query list ([j, 6]), and the dK/dV kernel then walks
    # the wrong blocks (the first GPU run of this test, on a case of 200: the caller's broken promise)
    "causal-contiguous": lambda device: (1, 2, 2, 192, 192, 32, mods.causal(), None, 32,
                                         {"BLOCKS_ARE_CONTIGUOUS": True}, torch.float16),
}


def _one_loop_results(case, device, one_loop, eager=False):
    """out, lse and every gradient of one training step, with both ONE_LOOP flags set to one_loop
    (and the forward's ONE_LOOP_EAGER_MASK to eager)."""
    from kernels import backward, forward

    B, Hq, Hkv, L, S, E, mask_mod, score_mod, block, options, dtype = case
    (q, k, v), do, dl = _inputs(B, Hq, Hkv, L, S, E, E, dtype, device, seed=3)
    bm = create_block_mask(mask_mod, B, Hq, L, S, device=device, BLOCK_SIZE=block)
    assert bm.full_kv_num_blocks is not None and int(bm.full_kv_num_blocks.sum()) > 0  # both lists walked
    if (options or {}).get("BLOCKS_ARE_CONTIGUOUS"):
        assert not oracle.check_block_mask(bm, B, Hq, L, S, blocks_are_contiguous=True)  # a promise kept
    defaults = forward.ONE_LOOP, backward.ONE_LOOP, forward.ONE_LOOP_EAGER_MASK
    forward.ONE_LOOP = backward.ONE_LOOP = one_loop
    forward.ONE_LOOP_EAGER_MASK = eager
    try:
        out, lse = kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                          return_lse=True, kernel_options=options)
    finally:
        # the backward's was read by the forward
        forward.ONE_LOOP, backward.ONE_LOOP, forward.ONE_LOOP_EAGER_MASK = defaults
    tables = [t for t in (score_mod.tensors() if score_mod is not None else []) if t.requires_grad]
    grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), [q, k, v, *tables])
    return [out, lse, *grads]


@pytest.mark.parametrize("case", sorted(_ONE_LOOP_CASES))
def test_one_loop_is_the_two_loops_bit_for_bit(case):
    """``ONE_LOOP`` (``kernels.forward`` and ``kernels.backward``, whose dQ kernel it changes; off
    by default) walks a tile's partial and full blocks in one loop, the
    mask on the partial ones behind a branch. It runs the same operations in the same order as
    the two loops, so under the interpreter out, the LSE and every gradient are the same bits. A
    step counted to the wrong list (the mask left off each row's last partial block) breaks that
    on every case, planted in either kernel (checked): out off by 0.8 to 3.4, dq by 2.8 to
    11,648. ``ONE_LOOP_EAGER_MASK`` (the forward's mask called on every step, applied on the
    partial ones) must give the same bits too."""
    from kernels import backward, forward

    # the defaults: the forward's rule, the dQ kernel's two loops, no eager mask (PERFORMANCE.md)
    assert forward.ONE_LOOP is None and backward.ONE_LOOP is False
    assert forward.ONE_LOOP_EAGER_MASK is False
    args = _ONE_LOOP_CASES[case](DEVICE)
    two = _one_loop_results(args, DEVICE, False)
    one = _one_loop_results(args, DEVICE, True)
    eager = _one_loop_results(args, DEVICE, True, eager=True)  # the mask called on every step
    names = ["out", "lse", "dq", "dk", "dv", "dtable"]
    for variant, results in (("one loop", one), ("eager mask", eager)):
        for name, a, b in zip(names, results, two):
            assert torch.equal(a, b), (variant, name, (a.float() - b.float()).abs().max())


def test_one_loop_rule_picks_masks_without_score_mods(monkeypatch):
    """``kernels.forward.ONE_LOOP = None`` (the default) leaves the choice to ``one_loop_for``: one
    loop for a mask with no score mod (the rows where the H100 and the H200 timed it faster; since
    the thirty-fourth session a mask that gathers, document ids or a block table, too), two for a
    score mod or no mask; a bool forces either. What the kernel is launched with is what is
    checked, so a rule that is computed but not passed fails."""
    from kernels import _runtime, forward

    assert forward.ONE_LOOP is None

    seen = []
    real = _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda kernel, *a, **k: (
        seen.append(k["ONE_LOOP"]) if kernel is forward.forward_kernel else None) or real(kernel, *a, **k))
    # L >= 128: shorter query lengths take the decode kernel (kernels.api.use_decode)
    (q, k, v), _, _ = _inputs(1, 2, 2, 160, 160, 16, 16, torch.float16, DEVICE, seed=5)
    rows = [
        (mods.causal(), None, True),
        (mods.sliding_window(40), None, True),
        (mods.prefix_lm(30), None, True),
        (mods.causal() & mods.chunked(48), None, True),
        (mods.document.from_seed(160, 3, 0, device=DEVICE), None, True),
        (mods.causal() & mods.table_mask(torch.rand(1, 160, 160, device=DEVICE) < 0.5), None, True),
        (mods.causal(), mods.tanh_softcap(5.0), False),
        (None, None, False),
    ]
    monkeypatch.setattr(forward, "ONE_LOOP", None)
    for mask_mod, score_mod, expected in rows:
        bm = None if mask_mod is None else create_block_mask(mask_mod, 1, 2, 160, 160, device=DEVICE, BLOCK_SIZE=32)
        seen.clear()
        kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
        assert seen == [expected], (mask_mod, score_mod)
    # The cap on the mean row: causal's 5 query tiles of 32 list 1 to 5 blocks of 32 keys, 96 keys
    # on average; a cap just under it gives two loops, one at it one loop.
    causal_bm = create_block_mask(mods.causal(), 1, 2, 160, 160, device=DEVICE, BLOCK_SIZE=32)
    for cap, expected in ((95, False), (96, True)):
        monkeypatch.setattr(forward, "ONE_LOOP_MAX_ROW_KEYS", cap)
        seen.clear()
        kernels.flex_attention(q, k, v, block_mask=causal_bm)
        assert seen == [expected], cap
    for forced in (True, False):
        monkeypatch.setattr(forward, "ONE_LOOP", forced)
        seen.clear()
        kernels.flex_attention(q, k, v, block_mask=create_block_mask(
            mods.document.from_seed(160, 3, 0, device=DEVICE), 1, 2, 160, 160, device=DEVICE, BLOCK_SIZE=32))
        assert seen == [forced]


def test_one_loop_rule_counts_the_rows_it_runs():
    """``Sparse.mean_row_keys``, what the one loop's cap compares: the keys a query tile lists,
    partial and full together, averaged over the rows of L queries alone. Causal with 128-key
    blocks lists 1, 2, ..., n blocks in its n rows: (n + 1) / 2 * 128 keys on average, 576 at
    S=1k and 2112 at 4k, under and over the cap of 1536 (12 blocks)."""
    from kernels import api, forward

    assert forward.ONE_LOOP_MAX_ROW_KEYS == 1536
    bm = create_block_mask(mods.causal(), 1, 1, 4096, 4096, device=DEVICE)
    sp = api._block_lists(bm, 1, 1, 4096, 4096, DEVICE)
    assert sp.has_full
    assert sp.mean_row_keys(4096) == 2112.0
    assert sp.mean_row_keys(1024) == 576.0  # the first 8 rows: a mask built longer than the call
    assert sp.mean_row_keys(1000) == 576.0  # a tail row counts whole
    program = kernels.api._cached_program(None, bm.mask_mod, True)
    assert forward.one_loop_for(program, sp, 1024) and not forward.one_loop_for(program, sp, 4096)
    # no full list: every listed block partial, the same count
    partial = api._block_lists(create_block_mask(mods.causal(), 1, 1, 1024, 1024, device=DEVICE),
                               1, 1, 1024, 1024, DEVICE)
    partial.full_kv_num = partial.full_kv_idx = None
    assert partial.mean_row_keys(1024) == 128.0  # the diagonal alone: 8 blocks over 8 rows


@pytest.mark.gpu
def test_gpu_one_loop_matches_the_oracle():
    """The same cases compiled for the GPU, where the one loop is software-pipelined across the two
    lists: out, the LSE and every gradient against the float64 oracle."""
    from kernels import backward, forward

    for case in sorted(_ONE_LOOP_CASES):
        B, Hq, Hkv, L, S, E, mask_mod, score_mod, block, options, dtype = _ONE_LOOP_CASES[case]("cuda")
        if (options or {}).get("BLOCKS_ARE_CONTIGUOUS"):
            bm = create_block_mask(mask_mod, B, Hq, L, S, device="cuda", BLOCK_SIZE=block)
            assert not oracle.check_block_mask(bm, B, Hq, L, S, blocks_are_contiguous=True)  # a promise kept
        for eager in (False, True):
            defaults = forward.ONE_LOOP, backward.ONE_LOOP, forward.ONE_LOOP_EAGER_MASK
            forward.ONE_LOOP = backward.ONE_LOOP = True
            forward.ONE_LOOP_EAGER_MASK = eager
            try:
                check(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, dtype=dtype, score_mod=score_mod, mask_mod=mask_mod,
                      block_size=block, kernel_options=options, device="cuda", seed=3)
            finally:
                forward.ONE_LOOP, backward.ONE_LOOP, forward.ONE_LOOP_EAGER_MASK = defaults


# HEADS_IN_LOOP's cases (kernels.backward): every one with a block mask of one head (mask_H=1), so that
# the dK/dV kernel walks its kv head's G query heads in each loop; (check's keyword arguments, DQ_ATOMIC).
_HEADS_IN_LOOP_CASES = {
    # G = 4, a document mask with partial and full blocks and tails on both sides, two batches
    "document-g4": lambda device: (dict(
        B=2, Hq=4, Hkv=1, L=300, S=300, E=64, dtype=torch.float16, mask_H=1, block_size=64,
        mask_mod=mods.document.from_seed(300, 4, 1, device=device)), False),
    # a learnable table read per head (the step's head in the mods and in the table's gradient),
    # PRESCALE_QK (the prescaled q of the step's head), a broadcast key batch, tails, G = 2
    "bias-prescale-g2": lambda device: (dict(
        B=2, Hq=4, Hkv=2, L=77, S=90, E=24, Ev=40, dtype=torch.bfloat16, Bk=1, mask_H=1,
        score_mod=mods.bias.from_seed([4, 77, 90], seed=2, requires_grad=True, device=device),
        mask_mod=mods.causal(), kernel_options={"PRESCALE_QK": True}), False),
    # G = 3 (not a power of two), a score mod with a derivative, a band, and DQ_ATOMIC (the dQ rows
    # of the step's head)
    "softcap-window-g3-atomic": lambda device: (dict(
        B=1, Hq=6, Hkv=2, L=129, S=200, E=32, dtype=torch.bfloat16, mask_H=1,
        score_mod=mods.tanh_softcap(5.0), mask_mod=mods.sliding_window(40)), True),
}


def _heads_in_loop_check(case, device):
    from kernels import backward

    kwargs, dq_atomic = _HEADS_IN_LOOP_CASES[case](device)
    defaults = backward.HEADS_IN_LOOP, backward.DQ_ATOMIC
    backward.HEADS_IN_LOOP, backward.DQ_ATOMIC = True, dq_atomic
    try:
        check(device=device, **kwargs)
    finally:
        backward.HEADS_IN_LOOP, backward.DQ_ATOMIC = defaults
    return kwargs


@pytest.mark.parametrize("case", sorted(_HEADS_IN_LOOP_CASES))
def test_heads_in_loop_backward_matches_the_oracle(case, monkeypatch):
    """``kernels.backward.HEADS_IN_LOOP`` (off by default): where the block mask has one head, the
    dK/dV kernel walks all G query heads of its kv head in each of its two loops, each head's steps
    in turn on every listed block. The step's head moves its q, prescaled q and dO tiles, its rows'
    LSE and delta, the mods' head and, with DQ_ATOMIC, its dQ rows. Every gradient against the
    oracle, under the interpreter; the kernel must be launched with HEADS = G. Each of the step's
    head offsets left at the loop's first head fails a case (checked: the mods' head fails the
    table's case, dk 81 times its allowance; the LSE's fails both cases it was run on, 69 and 363
    times; the prescaled q's the PRESCALE case, 175 times)."""
    from kernels import _runtime, backward

    assert backward.HEADS_IN_LOOP is False  # the default: 1 to 2 % on GQA document alone (PERFORMANCE.md)
    heads = []
    real = _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda kernel, *a, **k: (
        heads.append(k["HEADS"]) if kernel is backward.dkdv_kernel else None) or real(kernel, *a, **k))
    kwargs = _heads_in_loop_check(case, DEVICE)
    assert heads == [kwargs["Hq"] // kwargs["Hkv"]], heads


def test_heads_in_loop_only_where_the_heads_share_their_lists(monkeypatch):
    """HEADS = G only where every query head reads the same lists: a block mask with one head and
    G > 1. A block mask with a head per query head, G = 1, or the flag off keep one head a loop."""
    from kernels import _runtime, backward

    heads = []
    real = _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda kernel, *a, **k: (
        heads.append(k["HEADS"]) if kernel is backward.dkdv_kernel else None) or real(kernel, *a, **k))
    for flag, Hq, Hkv, mask_H, expected in ((True, 4, 2, 1, 2), (True, 4, 2, 4, 1), (True, 2, 2, 1, 1),
                                            (False, 4, 2, 1, 1)):
        monkeypatch.setattr(backward, "HEADS_IN_LOOP", flag)
        heads.clear()
        check(B=1, Hq=Hq, Hkv=Hkv, L=40, S=50, E=16, dtype=torch.float16, mask_mod=mods.causal(), mask_H=mask_H)
        assert heads == [expected], (flag, Hq, Hkv, mask_H, heads)
    assert backward.dkdv_heads(8, 1, True) == 8 and backward.dkdv_heads(8, 8, True) == 1


@pytest.mark.gpu
def test_gpu_heads_in_loop_matches_the_oracle():
    """The same cases compiled for the GPU, where the heads' steps are software-pipelined as one
    loop: every gradient against the float64 oracle."""
    for case in sorted(_HEADS_IN_LOOP_CASES):
        _heads_in_loop_check(case, "cuda")


@pytest.mark.gpu
def test_gpu_concurrent_backward_matches_the_oracle():
    """On CUDA the dQ kernel runs on a side stream beside dK/dV (SIDE_KERNEL): the same
    gradients as the fused path up to the order of delta's row sums; bit for bit the same
    q, k and v gradients whichever kernel takes the side stream or none does (the same kernels
    on the same inputs; the learnable table's gradient is scattered with atomic adds, so only
    close); and the oracle's verdict on the concurrent path."""
    from kernels import backward

    fused, *separate, own = _separate_delta_case("cuda", sides=("dq", "dkdv", None), own_delta=True)
    for a, b, c in zip(fused, separate[0], own):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(a, c, rtol=1e-2, atol=1e-3)  # DQ_OWN_DELTA: delta's sums in its own order
    for other in separate[1:]:
        for k, (a, b) in enumerate(zip(separate[0], other)):
            if k < 3:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert backward.CONCURRENT and backward.SIDE_KERNEL == "dq"  # the defaults
    check(B=2, Hq=4, Hkv=2, L=300, S=260, E=64, dtype=torch.bfloat16, mask_mod=mods.causal(), device="cuda",
          kernel_options={"PRESCALE_QK": True})
    check(B=2, Hq=8, L=1024, S=1024, E=128, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("flag,G,expected", [(None, 1, True), (None, 2, False), (True, 2, True), (False, 1, False)])
def test_dkdv_dp_first_is_taken_when_the_forward_ran(monkeypatch, flag, G, expected):
    """kernels.backward.DKDV_DP_FIRST as it was when the forward ran picks the dK/dV kernel's
    product order (a benchmark sets it around the forward call alone): None takes dP first where
    G = 1 only (docs/PERFORMANCE.md, thirtieth session)."""
    from kernels import _runtime, backward

    seen = []
    launch = _runtime.launch

    def record(kernel, grid, *args, **kwargs):
        if kernel.fn.__name__ == "dkdv_kernel":
            seen.append(kwargs["DP_FIRST"])
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", record)
    q = torch.randn(1, 2 * G, 32, 16).to(torch.float16).requires_grad_()
    k, v = (torch.randn(1, 2, 32, 16).to(torch.float16).requires_grad_() for _ in range(2))
    monkeypatch.setattr(backward, "DKDV_DP_FIRST", flag)
    out = kernels.flex_attention(q, k, v, enable_gqa=G > 1)
    monkeypatch.setattr(backward, "DKDV_DP_FIRST", not expected)  # too late: the forward has run
    out.sum().backward()
    assert seen == [expected]
