"""The split-KV decode kernel (queries shorter than 128 take it).

Every case is checked twice: against the float64 oracle through
``oracle.assert_all_close`` (the calibrated error model of SPEC section 7: the
kernel may be at most 6 times as far from the truth as an honest emulation in
the same dtype, plus a floor of a few ulps of the data's magnitude), and
against the non-decode forward kernel (``FORCE_USE_FLEX_ATTENTION``), which
computes the same function with another order of accumulation.

Sizes are small: everything runs under the Triton interpreter on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import kernels
import oracle
from kernels import decode, mods

FORCE_FLEX = {"FORCE_USE_FLEX_ATTENTION": True}


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, *, seed=0, bk=None, std=1.0):
    g = torch.Generator().manual_seed(seed)
    Bk = B if bk is None else bk

    def draw(*shape):
        return (torch.randn(shape, generator=g) * std).to(dtype)

    return draw(B, Hq, L, E), draw(Bk, Hkv, S, E), draw(Bk, Hkv, S, Ev)


def _unit(dtype) -> float:
    """Relative rounding unit of the products a kernel makes in ``dtype`` (TF32 for float32 unless 'highest')."""
    if dtype == torch.float32:
        return 2.0**-11 if torch.get_float32_matmul_precision() != "highest" else 2.0**-24
    return torch.finfo(dtype).eps


def _run(q, k, v, *, score_mod=None, block_mask=None, kernel_options=None, gqa=True):
    return kernels.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
        return_lse=True, return_max=True, kernel_options=kernel_options,
    )


def _check(q, k, v, *, score_mod=None, block_mask=None, kernel_options=None, gqa=True):
    """Decode against the oracle (SPEC section 7) and against the forward kernel; returns the decode results."""
    __tracebackhide__ = True
    assert q.shape[2] < 128, "the decode kernel serves L < 128 only"
    options = dict(kernel_options or {})
    out, lse, mx = _run(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=options, gqa=gqa)
    assert out.dtype == q.dtype and lse.dtype == mx.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any() and not mx.isnan().any()

    # The truth takes the inputs as the kernel sees them (already rounded to the dtype);
    # the baseline is told about PRESCALE_QK, which rounds q * scale * log2(e) to the dtype.
    args = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa, return_lse=True, return_max=True)
    truth = oracle.flex_attention(q.double(), k.double(), v.double(), **args)
    base = oracle.emulate_flex_attention(q, k, v, kernel_options=options, **args)
    names = ("out", "lse", "max")
    oracle.assert_all_close(dict(zip(names, (out, lse, mx))), dict(zip(names, truth)), dict(zip(names, base)))

    # The forward kernel: same function, other accumulation order. Both round p to
    # the dtype before the product with V (relative error unit / 2 each, at most
    # unit / 2 * max|v| in out) and round out once (half an ulp of |out| <= max|v|),
    # so they differ by at most 2 * unit * max|v|; 4 leaves room for float32 sums.
    ref_out, ref_lse, ref_mx = _run(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                    kernel_options={**options, **FORCE_FLEX}, gqa=gqa)
    vmax = float(v.double().abs().max())
    torch.testing.assert_close(out.double(), ref_out.double(), rtol=0, atol=4 * _unit(q.dtype) * vmax)
    # Scores, maxima and LSEs are float32 in both: sums in other orders, a few float32 ulps.
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mx, ref_mx, rtol=1e-5, atol=1e-5)
    assert out.stride() == ref_out.stride(), "out follows the query's layout"
    return out, lse, mx


# --------------------------------------------------------------------------
# shapes


# Every (L, S) pair once; group size, dtype and the key/value batch broadcast
# rotate over them so that each (G, dtype) pair occurs.
SHAPES = [
    (L, S, (1, 3, 4)[k % 3], kernels.DTYPES[(k // 3) % 3], k % 2 == 1)
    for k, (L, S) in enumerate((L, S) for L in (1, 3, 17, 127) for S in (1, 17, 300))
]


@pytest.mark.parametrize(
    "L,S,G,dtype,bk1", SHAPES,
    ids=[f"L{L}-S{S}-G{G}-{str(d)[6:]}{'-Bk1' if b else ''}" for L, S, G, d, b in SHAPES],
)
def test_shapes(L, S, G, dtype, bk1):
    Hkv = 2 if G < 4 else 1
    q, k, v = _inputs(2, G * Hkv, Hkv, L, S, 40, 24, dtype, seed=L + S, bk=1 if bk1 else None)
    _check(q, k, v)


@pytest.mark.parametrize("dtype", kernels.DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 2, 5])
def test_dtypes_and_splits(dtype, split):
    q, k, v = _inputs(2, 6, 2, 5, 300, 40, 24, dtype, seed=split, bk=1)
    _check(q, k, v, score_mod=mods.bias.from_seed([6, 5, 300], seed=split), kernel_options={"SPLIT_KV": split})


@pytest.mark.parametrize("G", [1, 2, 3, 5])
def test_any_group_size(G):
    q, k, v = _inputs(1, 2 * G, 2, 7, 200, 16, 32, torch.float16, seed=G)
    _check(q, k, v, kernel_options={"SPLIT_KV": 2})


def test_more_splits_than_key_tiles_and_one_key():
    q, k, v = _inputs(1, 3, 1, 2, 1, 16, 16, torch.float32)
    _check(q, k, v, kernel_options={"SPLIT_KV": 7})


def test_results_barely_depend_on_the_split():
    q, k, v = _inputs(1, 4, 2, 9, 300, 32, 32, torch.float32, seed=3)
    one = _run(q, k, v, kernel_options={"SPLIT_KV": 1})
    for split in (2, 3, 5):
        many = _run(q, k, v, kernel_options={"SPLIT_KV": split})
        for a, b in zip(one, many):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs():
    # q in [B, L, H, E] memory order, k and v slices of wider tensors.
    B, Hq, Hkv, L, S = 2, 6, 3, 5, 100
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, L, Hq, 40, generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, Hkv, S, 80, generator=g).to(torch.bfloat16)[..., ::2]
    v = torch.randn(B, S, Hkv, 48, generator=g).to(torch.bfloat16).transpose(1, 2)[..., 8:32]
    out, _, _ = _check(q, k, v, kernel_options={"SPLIT_KV": 3})
    assert out.transpose(1, 2).is_contiguous()


def test_without_max_the_lse_is_returned_alone():
    q, k, v = _inputs(1, 2, 2, 3, 50, 16, 16, torch.float32)
    out, lse = kernels.flex_attention(q, k, v, return_lse=True, kernel_options={"SPLIT_KV": 3})
    truth, truth_lse = oracle.flex_attention(q.double(), k.double(), v.double(), return_lse=True)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), truth_lse, rtol=1e-5, atol=1e-5)


def test_membership_table():
    sparse = kernels.api._dense_sparse(1, 300, torch.device("cpu"))
    member = decode.membership(sparse)
    assert member.dtype == torch.int8 and member.shape == (1, 1, 1, 3)
    assert torch.equal(member, torch.full_like(member, decode.FULL))

    mask = mods.by_head(mods.causal(), mods.sliding_window(20))
    bm = oracle.create_block_mask(mask, 2, 4, 40, 300, BLOCK_SIZE=16)
    member = decode.membership(kernels.api._block_lists(bm, 2, 4, 40, 300, torch.device("cpu")))
    partial, full = oracle.block_membership(bm)
    assert torch.equal(member == decode.PARTIAL, partial) and torch.equal(member == decode.FULL, full)


# --------------------------------------------------------------------------
# block masks: per head, per query block, fully masked rows and splits


def test_per_head_block_mask_with_gqa():
    # G = 3: one packed tile holds rows of heads with different masks and, at
    # L = 17 and Q_BLOCK = 16, of two query blocks.
    B, Hq, Hkv, L, S = 2, 6, 2, 17, 300
    mask = mods.by_head(mods.causal(), mods.sliding_window(8))
    bm = oracle.create_block_mask(mask, B, Hq, L, S, BLOCK_SIZE=16)
    q, k, v = _inputs(B, Hq, Hkv, L, S, 40, 24, torch.bfloat16, seed=11)
    _check(q, k, v, block_mask=bm, kernel_options={"SPLIT_KV": 5})


def test_torch_block_mask_and_document_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    L, S = 33, 300
    mask = mods.document.from_seed(S, 5, seed=3)
    # Queries are the last L positions of the documents' sequence.
    mask_q = mods.document(mask.q_ids.tensor[-L:].contiguous(), mask.kv_ids.tensor)
    bm = create_block_mask(mask_q, None, None, L, S, device="cpu", BLOCK_SIZE=32)
    q, k, v = _inputs(1, 4, 4, L, S, 24, 40, torch.float16, seed=5)
    _check(q, k, v, block_mask=bm, gqa=False, kernel_options={"SPLIT_KV": 4})


def test_fully_masked_rows_and_splits():
    B, Hq, Hkv, L, S = 1, 6, 2, 17, 300
    mask = mods.table_mask.from_seed(Hq, L, S, 0.01, seed=2)
    bm = oracle.create_block_mask(mask, B, Hq, L, S, BLOCK_SIZE=16)
    q, k, v = _inputs(B, Hq, Hkv, L, S, 32, 32, torch.bfloat16, seed=2)
    score_mod = mods.bias.from_seed([Hq, L, S], seed=4)
    out, lse, mx = _check(q, k, v, block_mask=bm, score_mod=score_mod, kernel_options={"SPLIT_KV": 5})
    table = mask.table.tensor.bool()
    empty = ~table.any(-1)[None]
    # The case must hold what it claims: masked rows, and rows whose keys lie in one split of five.
    assert empty.any() and (~empty).any()
    # Key tiles of 16, 19 of them in splits of 4 tiles: the first four splits are 64 keys each.
    per_split = table[..., : 4 * 64].reshape(Hq, L, 4, 64).any(-1)
    assert (~per_split & table.any(-1)[..., None]).any()
    assert (out[empty] == 0).all()
    assert (lse[empty] == -math.inf).all() and (mx[empty] == -math.inf).all()
    assert torch.isfinite(lse[~empty]).all()


def _all_partial(mask_mod, B, H, L, S, block):
    """A block mask that lists every block as partial: the kernel evaluates mask_mod everywhere."""
    nq, nk = -(-L // block), -(-S // block)
    num = torch.full((B, H, nq), nk, dtype=torch.int32)
    idx = torch.arange(nk, dtype=torch.int32).expand(B, H, nq, nk).contiguous()
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(L, S))


def test_every_block_visited_and_every_element_masked():
    L, S = 5, 200
    bm = _all_partial(mods.not_(mods.full()), 1, 1, L, S, 32)
    q, k, v = _inputs(1, 4, 2, L, S, 16, 16, torch.float32)
    for options in ({"SPLIT_KV": 3}, {"SPLIT_KV": 3, "ROWS_GUARANTEED_SAFE": True}):
        out, lse, mx = _run(q, k, v, block_mask=bm, kernel_options=options)
        assert (out == 0).all() and (lse == -math.inf).all() and (mx == -math.inf).all()


def test_causal_decode_under_rows_guaranteed_safe():
    # Every row has keys, but later splits allow none of them: the promise does
    # not hold per split, and the kernel must still give no NaN.
    L, S = 3, 300
    bm = _all_partial(mods.causal(), 1, 1, L, S, 16)
    q, k, v = _inputs(1, 2, 1, L, S, 16, 16, torch.float32, seed=4)
    _check(q, k, v, block_mask=bm, kernel_options={"SPLIT_KV": 5, "ROWS_GUARANTEED_SAFE": True})


def test_table_mask_evaluated_in_partial_blocks():
    B, Hq, Hkv, L, S = 2, 4, 2, 9, 130
    mask = mods.table_mask.from_seed(Hq, L, S, 0.3, seed=9)
    bm = _all_partial(mask, B, Hq, L, S, 16)
    q, k, v = _inputs(B, Hq, Hkv, L, S, 16, 24, torch.float16, seed=9)
    _check(q, k, v, block_mask=bm, kernel_options={"SPLIT_KV": 3})


# --------------------------------------------------------------------------
# score mods and PRESCALE_QK


SCORE_MODS = {
    "alibi": lambda Hq, L, S: mods.alibi.standard(Hq),
    "softcap": lambda Hq, L, S: mods.tanh_softcap(5.0),
    "bias": lambda Hq, L, S: mods.bias.from_seed([Hq, L, S], seed=1),
}


@pytest.mark.parametrize("name", SCORE_MODS)
def test_score_mods(name):
    Hq, Hkv, L, S = 6, 2, 17, 100
    bm = oracle.create_block_mask(mods.sliding_window(40), 1, Hq, L, S, BLOCK_SIZE=16)
    q, k, v = _inputs(2, Hq, Hkv, L, S, 40, 24, torch.bfloat16, seed=1)
    _check(q, k, v, score_mod=SCORE_MODS[name](Hq, L, S), block_mask=bm, kernel_options={"SPLIT_KV": 2})


@pytest.mark.parametrize("score", [None, "softcap"])
def test_prescale(score):
    Hq, L, S = 4, 3, 150
    score_mod = SCORE_MODS[score](Hq, L, S) if score else None
    q, k, v = _inputs(1, Hq, 2, L, S, 32, 32, torch.float16, seed=6)
    _check(q, k, v, score_mod=score_mod, kernel_options={"SPLIT_KV": 2, "PRESCALE_QK": True})


# --------------------------------------------------------------------------
# gradients through the decode path (the backward kernel is shared with the forward path)


def _backward_available() -> bool:
    from kernels import backward

    return hasattr(backward, "run_backward")


@pytest.mark.skipif(not _backward_available(), reason="kernels/backward.py has no run_backward yet")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients(dtype):
    # The backward kernel is the forward path's; what the decode path owns is the
    # out and LSE it saves for it (natural log, -inf on masked rows).
    B, Hq, Hkv, L, S = 1, 6, 2, 17, 100
    mask = mods.by_head(mods.causal(), mods.table_mask.from_seed(Hq, L, S, 0.02, seed=3))
    bm = oracle.create_block_mask(mask, B, Hq, L, S, BLOCK_SIZE=16)
    score_mod = mods.bias.from_seed([Hq, L, S], seed=8)
    q, k, v = (t.requires_grad_() for t in _inputs(B, Hq, Hkv, L, S, 40, 24, dtype, seed=8, bk=1))
    g = torch.Generator().manual_seed(80)
    dout = torch.randn(B, Hq, L, 24, generator=g)
    dlse = torch.randn(B, Hq, L, generator=g)

    def grads(fn, q, k, v, **options):
        out, lse, _ = fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=True,
                         return_max=True, **options)
        return torch.autograd.grad((out, lse), (q, k, v), (dout.to(out.dtype), dlse.to(lse.dtype)))

    actual = grads(kernels.flex_attention, q, k, v, kernel_options={"SPLIT_KV": 3})
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = grads(oracle.flex_attention, *leaves)
    base = grads(oracle.emulate_flex_attention, q, k, v)
    names = ("dq", "dk", "dv")
    oracle.assert_all_close(dict(zip(names, actual)), dict(zip(names, truth)), dict(zip(names, base)))
    # Against the forward path: the backward sees the decode's out (a rounding
    # apart, see _check) and LSE (float32 ulps apart). Measured over 18 cases (3
    # dtypes, with and without a bias, 3 seeds): the largest difference was 2.6
    # units of the dtype times the gradient's largest element; 8 allowed.
    flex = grads(kernels.flex_attention, q, k, v, kernel_options=FORCE_FLEX)
    for a, b in zip(actual, flex):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=8 * _unit(dtype) * float(b.abs().max()))


@pytest.mark.skipif(not _backward_available(), reason="kernels/backward.py has no run_backward yet")
def test_lse_is_differentiable_without_max():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 3, 40, 16, 16, torch.float32))
    out, lse = kernels.flex_attention(q, k, v, return_lse=True)
    assert lse.requires_grad
    (dq,) = torch.autograd.grad(lse.sum(), (q,))
    leaf = q.detach().double().requires_grad_()
    _, truth = oracle.flex_attention(leaf, k.detach().double(), v.detach().double(), return_lse=True)
    (expected,) = torch.autograd.grad(truth.sum(), (leaf,))
    torch.testing.assert_close(dq.double(), expected, rtol=1e-4, atol=1e-5)
