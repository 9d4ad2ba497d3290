"""The float64 oracle against references that share none of its code.

* SDPA's math path in float64 (forward and gradients), for plain, causal,
  GQA, custom-scale, E != Ev and broadcast-batch attention;
* PyTorch's eager ``flex_attention`` in float64 on CPU (forward and LSE; it
  has no CPU backward), with mods and block masks from PyTorch's own
  ``create_block_mask``;
* ``torch.autograd.gradcheck`` (finite differences) for q, k, v, a captured
  bias and the LSE;
* a triple loop over (b, h, i) and j in Python floats, written here;
* block masks whose lists disagree with their ``mask_mod``, where SPEC section
  3's two semantics must differ exactly where the section says.

Error bounds: two float64 computations of the same attention differ only by
rounding. The unit roundoff is 1.1e-16 and each result element sums at most
a few dozen terms through one exp and one log, so the honest difference is
below ~1e-14 times the magnitude of the values. ``REL_BOUND = 1e-12`` times
``max(1, max |expected|)`` leaves two orders of magnitude of headroom while a
float32 step anywhere (error >= 1e-8), a wrong scale, head or batch mapping,
or one wrong mask element fails by many orders.

``MAX_ERRORS`` keeps the largest error seen against each reference (by
reference and quantity), for the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import oracle
from oracle import block_mask_to_dense, emulate_flex_attention, flex_attention

F64 = torch.float64
REL_BOUND = 1e-12
MAX_ERRORS: dict[str, float] = {}


# --------------------------------------------------------------------------
# comparison


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, *, reference: str, what: str) -> None:
    """Shape, then inf/NaN positions, then max abs error <= REL_BOUND * max(1, |expected|)."""
    __tracebackhide__ = True
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{what}: NaN in the oracle's result"
    assert not expected.isnan().any(), f"{what}: NaN in the {reference} result"
    assert torch.equal(actual == float("inf"), expected == float("inf")), f"{what}: +inf positions differ"
    assert torch.equal(actual == float("-inf"), expected == float("-inf")), f"{what}: -inf positions differ"
    finite = torch.isfinite(expected)
    a, e = actual[finite].double(), expected[finite].double()
    error = (a - e).abs().max().item() if e.numel() else 0.0
    bound = REL_BOUND * max(1.0, e.abs().max().item() if e.numel() else 0.0)
    key = f"{reference}: {what}"
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), error)
    assert error <= bound, f"{what} against {reference}: max abs error {error:.3e} > bound {bound:.3e}"


def randn(generator: torch.Generator, *shape: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=F64).requires_grad_(requires_grad)


def grads(outputs: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Gradients of sum(random * output) (non-finite outputs, i.e. -inf LSE, get weight 0)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for out in outputs:
        weight = torch.randn(out.shape, generator=g, dtype=F64)
        total = total + torch.where(torch.isfinite(out), out * weight, 0.0).sum()
    return torch.autograd.grad(total, inputs)


# --------------------------------------------------------------------------
# independent references


def sdpa_reference(q, k, v, *, allowed=None, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's math backend; GQA by repeat_interleave, a key/value batch of 1 by expand."""
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    if enable_gqa:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    k = k.expand(B, -1, -1, -1)
    v = v.expand(B, -1, -1, -1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal, scale=scale)


def loop_attention(q, k, v, *, allowed=None, score_mod=None, scale=None):
    """SPEC section 2 in Python floats: loops over b, h, i, j; math.exp and math.log.

    ``allowed`` is a bool tensor [B, Hq, L, S] (None: everything). Returns
    ``(out, lse, max)`` as float64 tensors.
    """
    B, Hq, L, E = q.shape
    Bk, Hkv, S, _ = k.shape
    Ev = v.shape[-1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    Q, K, V = q.tolist(), k.tolist(), v.tolist()
    A = None if allowed is None else allowed.tolist()
    out = [[[[0.0] * Ev for _ in range(L)] for _ in range(Hq)] for _ in range(B)]
    lse = [[[-math.inf] * L for _ in range(Hq)] for _ in range(B)]
    top = [[[-math.inf] * L for _ in range(Hq)] for _ in range(B)]
    for b in range(B):
        kb = b if Bk == B else 0
        for h in range(Hq):
            kh = h // group
            for i in range(L):
                t = {}
                for j in range(S):
                    if A is not None and not A[b][h][i][j]:
                        continue
                    s = scale * sum(Q[b][h][i][e] * K[kb][kh][j][e] for e in range(E))
                    if score_mod is not None:
                        index = [torch.tensor(n) for n in (b, h, i, j)]
                        s = float(score_mod(torch.tensor(s, dtype=F64), *index))
                    t[j] = s
                if not t:
                    continue
                m = max(t.values())
                row_lse = m + math.log(sum(math.exp(x - m) for x in t.values()))
                lse[b][h][i] = row_lse
                top[b][h][i] = m
                for d in range(Ev):
                    out[b][h][i][d] = sum(math.exp(x - row_lse) * V[kb][kh][j][d] for j, x in t.items())
    return torch.tensor(out, dtype=F64), torch.tensor(lse, dtype=F64), torch.tensor(top, dtype=F64)


def dense_mask(mask_mod, B: int, H: int, L: int, S: int) -> torch.Tensor:
    """mask_mod evaluated one element at a time (no broadcasting, no chunking)."""
    out = torch.zeros(B, H, L, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    out[b, h, i, j] = bool(mask_mod(*(torch.tensor(n) for n in (b, h, i, j))))
    return out


def spec_allowed(partial, full, block_size, mask_mod, B, H, L, S, semantics):
    """SPEC section 3 element by element, from tile tables bool [MB, MH, nQ, nKV]."""
    by_mask_mod = dense_mask(mask_mod, B, H, L, S)
    if semantics == "mask_mod":
        return by_mask_mod
    MB, MH = partial.shape[:2]
    out = torch.zeros(B, H, L, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    tile = (b % MB, h % MH, i // block_size[0], j // block_size[1])
                    out[b, h, i, j] = bool(full[tile]) or (bool(partial[tile]) and bool(by_mask_mod[b, h, i, j]))
    return out


def block_mask_from_tiles(partial, full, block_size, mask_mod, seq_lengths) -> BlockMask:
    """A BlockMask listing exactly the given tiles; PyTorch computes the q side."""

    def lists(member):
        n = member.shape[-1]
        columns = torch.arange(n)
        order = torch.where(member, columns, columns + n).argsort(-1)
        return member.sum(-1, dtype=torch.int32), order.to(torch.int32)

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=seq_lengths
    )


def tiles_of(mask_mod, B, H, L, S, block_size):
    """Exact (partial, full) tile tables of mask_mod, from its dense evaluation."""
    allowed = dense_mask(mask_mod, B, H, L, S)
    n_q, n_kv = -(-L // block_size[0]), -(-S // block_size[1])
    counts = torch.zeros(B, H, n_q, n_kv, dtype=torch.int64)
    for qb in range(n_q):
        for kb in range(n_kv):
            rows = slice(qb * block_size[0], (qb + 1) * block_size[0])
            cols = slice(kb * block_size[1], (kb + 1) * block_size[1])
            counts[:, :, qb, kb] = allowed[:, :, rows, cols].sum((-1, -2))
    full = counts == block_size[0] * block_size[1]
    return (counts > 0) & ~full, full


def torch_eager(q, k, v, *, score_mod=None, block_mask=None, scale=None, enable_gqa=False):
    """PyTorch's eager flex_attention (no torch.compile): (out, natural-log lse)."""
    with warnings.catch_warnings():
        # "called without torch.compile()" (intended: eager is the reference
        # here) and return_lse's deprecation on versions with return_aux.
        warnings.simplefilter("ignore")
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:
            return torch_flex_attention(
                q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                enable_gqa=enable_gqa, return_lse=True,
            )
        out, aux = torch_flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
            enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True),
        )
        return out, aux.lse


# --------------------------------------------------------------------------
# mods


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def causal_with_empty_rows(b, h, q_idx, kv_idx):
    # Rows 1, 6, 11, ... (q_idx % 5 == 1) attend to nothing.
    return (kv_idx <= q_idx) & (q_idx % 5 != 1)


def sliding_window_3(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 3)


def per_batch_and_head(b, h, q_idx, kv_idx):
    # Head h looks 2h positions ahead; batch b drops a diagonal pattern (but
    # never kv 0, so no row is empty: SDPA cannot take empty rows).
    return (kv_idx <= q_idx + 2 * h) & (((q_idx + kv_idx + b) % 4 != 0) | (kv_idx == 0))


def softcap_20(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def relative_position(score, b, h, q_idx, kv_idx):
    return score + 0.25 * (q_idx - kv_idx) - 0.5 * h + 0.125 * b


# --------------------------------------------------------------------------
# SDPA (math backend, float64): forward and gradients


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int = 2
    Hq: int = 3
    Hkv: int = 3
    L: int = 7
    S: int = 9
    E: int = 5
    Ev: int = 5
    Bk: int | None = None  # None: B

    def tensors(self, seed: int, requires_grad: bool = True):
        g = torch.Generator().manual_seed(seed)
        Bk = self.B if self.Bk is None else self.Bk
        return (
            randn(g, self.B, self.Hq, self.L, self.E, requires_grad=requires_grad),
            randn(g, Bk, self.Hkv, self.S, self.E, requires_grad=requires_grad),
            randn(g, Bk, self.Hkv, self.S, self.Ev, requires_grad=requires_grad),
        )


SDPA_CASES = {
    "plain": dict(shape=Shape()),
    "custom_scale": dict(shape=Shape(), scale=0.37),
    "e_ne_ev": dict(shape=Shape(E=5, Ev=3)),
    "gqa_g3": dict(shape=Shape(Hq=6, Hkv=2), gqa=True),
    "bk1_broadcast": dict(shape=Shape(B=3, Bk=1)),
    "causal_is_causal": dict(shape=Shape(L=10, S=10), mask=causal, is_causal=True),
    # SDPA's is_causal is top-left aligned (tril of ones(L, S)): kv_idx <= q_idx.
    "causal_is_causal_rect": dict(shape=Shape(L=6, S=11), mask=causal, is_causal=True),
    "causal_bool_mask": dict(shape=Shape(L=12, S=12), mask=causal),
    "per_batch_and_head_bool_mask": dict(shape=Shape(L=9, S=11), mask=per_batch_and_head),
    "all_at_once": dict(shape=Shape(B=2, Bk=1, Hq=6, Hkv=3, L=5, S=13, E=4, Ev=7), mask=sliding_window_3, scale=1.7, gqa=True),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_matches_sdpa_math(name):
    case = SDPA_CASES[name]
    shape: Shape = case["shape"]
    scale, gqa, mask_mod = case.get("scale"), case.get("gqa", False), case.get("mask")
    q, k, v = shape.tensors(seed=len(name))
    block_mask = allowed = None
    if mask_mod is not None:
        block_mask = torch_create_block_mask(mask_mod, shape.B, shape.Hq, shape.L, shape.S, device="cpu", BLOCK_SIZE=4)
        if not case.get("is_causal"):
            allowed = dense_mask(mask_mod, shape.B, shape.Hq, shape.L, shape.S)
            assert allowed.any(-1).all(), "SDPA returns NaN on empty rows; pick a mask without them"
    out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    expected = sdpa_reference(q, k, v, allowed=allowed, is_causal=case.get("is_causal", False), scale=scale, enable_gqa=gqa)
    assert_matches(out, expected, reference="SDPA math", what="out")
    for what, got, want in zip(("dq", "dk", "dv"), grads((out,), (q, k, v), seed=1), grads((expected,), (q, k, v), seed=1)):
        assert_matches(got, want, reference="SDPA math", what=what)


# --------------------------------------------------------------------------
# PyTorch eager flex_attention (float64, CPU; forward only: no CPU backward)


def bias_table(H, L, S, seed=3):
    return randn(torch.Generator().manual_seed(seed), H, L, S)


EAGER_CASES = {
    "noop": dict(shape=Shape()),
    "causal_block4": dict(shape=Shape(L=12, S=12), mask=causal),
    "causal_L11_S13_block4": dict(shape=Shape(L=11, S=13), mask=causal),
    "sliding_window_block_2x3": dict(shape=Shape(L=10, S=10), mask=sliding_window_3, block=(2, 3)),
    "empty_rows": dict(shape=Shape(L=10, S=8), mask=causal_with_empty_rows),
    "per_batch_and_head": dict(shape=Shape(L=9, S=11), mask=per_batch_and_head),
    "softcap_causal": dict(shape=Shape(L=8, S=8), mask=causal, score_mod=softcap_20),
    "relative_position_scale": dict(shape=Shape(), score_mod=relative_position, scale=0.8),
    "bias_table": dict(shape=Shape(), bias=True),
    "gqa_g3_e_ne_ev": dict(shape=Shape(Hq=6, Hkv=2, E=4, Ev=6), mask=causal, gqa=True),
}


@pytest.mark.parametrize("name", list(EAGER_CASES))
def test_matches_pytorch_eager(name):
    case = EAGER_CASES[name]
    shape: Shape = case["shape"]
    q, k, v = shape.tensors(seed=len(name), requires_grad=False)
    score_mod = case.get("score_mod")
    if case.get("bias"):
        bias = bias_table(shape.Hq, shape.L, shape.S)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

    block_mask = None
    if "mask" in case:
        block_mask = torch_create_block_mask(
            case["mask"], shape.B, shape.Hq, shape.L, shape.S, device="cpu", BLOCK_SIZE=case.get("block", 4)
        )
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=case.get("scale"), enable_gqa=case.get("gqa", False))
    expected_out, expected_lse = torch_eager(q, k, v, **kwargs)
    for semantics in oracle.SEMANTICS:  # PyTorch's masks are consistent: both agree
        out, lse = flex_attention(q, k, v, return_lse=True, semantics=semantics, **kwargs)
        assert_matches(out, expected_out, reference="PyTorch eager", what="out")
        assert_matches(lse, expected_lse, reference="PyTorch eager", what="lse")


def test_pytorch_eager_lse_is_natural_log():
    """PyTorch's public LSE is log(sum(exp(s))), not log2: the oracle's convention (SPEC 2)."""
    shape = Shape(L=6, S=9)
    q, k, v = shape.tensors(seed=0, requires_grad=False)
    _, lse = torch_eager(q, k, v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(shape.E)
    natural = torch.logsumexp(scores, dim=-1)
    base2 = natural / math.log(2.0)
    assert_matches(lse, natural, reference="torch.logsumexp", what="PyTorch eager lse")
    assert (lse - base2).abs().max() > 1e-3
    assert_matches(flex_attention(q, k, v, return_lse=True)[1], natural, reference="torch.logsumexp", what="lse")


# --------------------------------------------------------------------------
# gradcheck: finite differences of the oracle itself


def _finite_lse(lse):
    # -inf (fully masked rows) minus -inf is NaN in a finite difference; those
    # entries are constant, so a constant 0 in their place checks the same.
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


@pytest.mark.parametrize("semantics", oracle.SEMANTICS)
def test_gradcheck_q_k_v_bias_and_lse_with_empty_rows(semantics):
    g = torch.Generator().manual_seed(11)
    B, H, L, S, E, Ev = 1, 2, 6, 5, 3, 2
    q, k, v = randn(g, B, H, L, E, requires_grad=True), randn(g, B, H, S, E, requires_grad=True), randn(g, B, H, S, Ev, requires_grad=True)
    bias = randn(g, H, L, S, requires_grad=True)
    block_mask = torch_create_block_mask(causal_with_empty_rows, 1, 1, L, S, device="cpu", BLOCK_SIZE=2)
    assert not dense_mask(causal_with_empty_rows, 1, 1, L, S).any(-1).all(), "the case needs an empty row"

    def fn(q, k, v, bias):
        out, lse = flex_attention(
            q, k, v, score_mod=lambda s, b, h, i, j: s + bias[h, i, j], block_mask=block_mask,
            return_lse=True, semantics=semantics, chunk_size=4,
        )
        return out, _finite_lse(lse)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_gradcheck_gqa_broadcast_batch_softcap():
    g = torch.Generator().manual_seed(12)
    q = randn(g, 2, 3, 4, 2, requires_grad=True)
    k = randn(g, 1, 1, 5, 2, requires_grad=True)
    v = randn(g, 1, 1, 5, 3, requires_grad=True)

    def fn(q, k, v):
        out, lse = flex_attention(q, k, v, score_mod=softcap_20, enable_gqa=True, scale=2.0, return_lse=True, chunk_size=3)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


# --------------------------------------------------------------------------
# the triple loop: out, lse and max


LOOP_CASES = {
    "plain": dict(shape=Shape(B=1, Hq=2, Hkv=2, L=4, S=5, E=3, Ev=3)),
    "L1": dict(shape=Shape(B=1, Hq=2, Hkv=2, L=1, S=6, E=3, Ev=2)),
    "S1": dict(shape=Shape(B=1, Hq=2, Hkv=2, L=5, S=1, E=3, Ev=2)),
    "L1_S1": dict(shape=Shape(B=2, Hq=1, Hkv=1, L=1, S=1, E=2, Ev=3)),
    "empty_rows": dict(shape=Shape(B=1, Hq=2, Hkv=2, L=8, S=6, E=2, Ev=2), mask=causal_with_empty_rows),
    "L7_S10_block4": dict(shape=Shape(B=1, Hq=2, Hkv=2, L=7, S=10, E=3, Ev=3), mask=causal, block=4),
    "L9_S5_block_4x3": dict(shape=Shape(B=1, Hq=1, Hkv=1, L=9, S=5, E=2, Ev=2), mask=sliding_window_3, block=(4, 3)),
    "gqa_g3_bk1_e_ne_ev": dict(shape=Shape(B=2, Bk=1, Hq=6, Hkv=2, L=3, S=4, E=3, Ev=5), gqa=True),
    "softcap_scale": dict(shape=Shape(B=1, Hq=2, Hkv=2, L=4, S=4, E=2, Ev=2), score_mod=softcap_20, scale=3.0),
    "relative_position_gqa_mask": dict(
        shape=Shape(B=2, Hq=3, Hkv=1, L=5, S=6, E=2, Ev=3), score_mod=relative_position, mask=per_batch_and_head, gqa=True
    ),
}


@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_matches_triple_loop(name):
    case = LOOP_CASES[name]
    shape: Shape = case["shape"]
    q, k, v = shape.tensors(seed=len(name), requires_grad=False)
    block_mask = allowed = None
    if "mask" in case:
        block = case.get("block", 4)
        block_mask = torch_create_block_mask(case["mask"], shape.B, shape.Hq, shape.L, shape.S, device="cpu", BLOCK_SIZE=block)
        allowed = dense_mask(case["mask"], shape.B, shape.Hq, shape.L, shape.S)
    expected = loop_attention(q, k, v, allowed=allowed, score_mod=case.get("score_mod"), scale=case.get("scale"))
    for semantics in oracle.SEMANTICS:
        got = flex_attention(
            q, k, v, score_mod=case.get("score_mod"), block_mask=block_mask, scale=case.get("scale"),
            enable_gqa=case.get("gqa", False), return_lse=True, return_max=True, semantics=semantics,
        )
        for what, a, e in zip(("out", "lse", "max"), got, expected):
            assert_matches(a, e, reference="triple loop", what=what)


# --------------------------------------------------------------------------
# block masks whose lists disagree with mask_mod: the two semantics


def _wrong_lists(variant: str):
    """(mask_mod, B, H, L, S, block_size, partial, full) with deliberately wrong tile lists."""
    B, H, L, S, block = 1, 2, 11, 13, (4, 3)
    mask_mod = causal
    partial, full = tiles_of(mask_mod, 1, 1, L, S, block)
    partial, full = partial.clone(), full.clone()
    if variant == "partial_tile_listed_full":
        assert partial[0, 0, 1, 2]  # rows 4..7, cols 6..8: the diagonal, half allowed
        partial[0, 0, 1, 2], full[0, 0, 1, 2] = False, True
    elif variant == "disallowed_tile_listed_full":
        assert not (partial | full)[0, 0, 0, 3]  # rows 0..3, cols 9..11: none allowed
        full[0, 0, 0, 3] = True
    elif variant == "partial_tile_missing":
        assert partial[0, 0, 2, 2]  # rows 8..10, cols 6..8
        partial[0, 0, 2, 2] = False
    elif variant == "full_tile_missing":
        assert full[0, 0, 1, 0]  # rows 4..7, cols 0..2: all allowed
        full[0, 0, 1, 0] = False
    elif variant == "empty_partial_listed":  # wasted work, same result
        partial[0, 0, 0, 4] = True
    elif variant == "straddling_tile_listed_full":
        # The last KV tile (cols 12..14, only 12 in range) of the last query
        # tile (rows 8..11, only 8..10 in range), none allowed, listed full:
        # its in-range elements become allowed, the padding never counts.
        assert not (partial | full)[0, 0, 2, 4]
        full[0, 0, 2, 4] = True
    elif variant == "per_head_lists":  # MB = B = 2, MH = H = 3, one (b, h) wrong
        B, H = 2, 3
        partial = partial.expand(B, H, -1, -1).clone()
        full = full.expand(B, H, -1, -1).clone()
        partial[1, 2, 1, 2], full[1, 2, 1, 2] = False, True
        partial[0, 1, 2, 2] = False
    elif variant == "broadcast_lists_head_mask_mod":
        # MB = MH = 1 lists built for head 0, a mask_mod that depends on the
        # head: heads 1 and 2 read head 0's tiles (SPEC 3: h % MH).
        B, H = 2, 3
        mask_mod = per_batch_and_head
        partial, full = tiles_of(mask_mod, 1, 1, L, S, block)
    else:
        raise AssertionError(variant)
    return mask_mod, B, H, L, S, block, partial, full


WRONG_LISTS = (
    "partial_tile_listed_full",
    "disallowed_tile_listed_full",
    "partial_tile_missing",
    "full_tile_missing",
    "empty_partial_listed",
    "straddling_tile_listed_full",
    "per_head_lists",
    "broadcast_lists_head_mask_mod",
)


@pytest.mark.parametrize("variant", WRONG_LISTS)
def test_semantics_differ_exactly_where_spec_says(variant):
    mask_mod, B, H, L, S, block, partial, full = _wrong_lists(variant)
    block_mask = block_mask_from_tiles(partial, full, block, mask_mod, (L, S))
    q, k, v = Shape(B=B, Hq=H, Hkv=H, L=L, S=S, E=3, Ev=2).tensors(seed=len(variant), requires_grad=False)

    results = {}
    for semantics in oracle.SEMANTICS:
        allowed = spec_allowed(partial, full, block, mask_mod, B, H, L, S, semantics)
        assert torch.equal(block_mask_to_dense(block_mask, B, H, L, S, semantics=semantics), allowed)
        expected = loop_attention(q, k, v, allowed=allowed)
        got = flex_attention(q, k, v, block_mask=block_mask, return_lse=True, return_max=True, semantics=semantics)
        for what, a, e in zip(("out", "lse", "max"), got, expected):
            assert_matches(a, e, reference="triple loop", what=f"{what} ({semantics} semantics)")
        results[semantics] = (allowed, got)

    (allowed_b, (out_b, lse_b, _)), (allowed_m, (out_m, lse_m, _)) = results["blocks"], results["mask_mod"]
    rows_differ = (allowed_b != allowed_m).any(-1)
    if variant == "empty_partial_listed":
        assert not rows_differ.any()
    else:
        assert rows_differ.any()
    # Rows whose allowed sets agree are computed by identical operations.
    assert torch.equal(out_b[~rows_differ], out_m[~rows_differ])
    assert torch.equal(lse_b[~rows_differ], lse_m[~rows_differ])
    # Rows whose sets differ give different results (random data: no ties).
    changed = ((out_b - out_m).abs().amax(-1) > 1e-6) | ~torch.isclose(lse_b, lse_m, rtol=0, atol=1e-6)
    assert torch.equal(changed, rows_differ)


@pytest.mark.parametrize("variant", [w for w in WRONG_LISTS if w != "empty_partial_listed"])
def test_pytorch_eager_follows_mask_mod_semantics(variant):
    """SPEC 8: eager flex_attention ignores the lists; the oracle's "mask_mod" reading matches it."""
    mask_mod, B, H, L, S, block, partial, full = _wrong_lists(variant)
    block_mask = block_mask_from_tiles(partial, full, block, mask_mod, (L, S))
    q, k, v = Shape(B=B, Hq=H, Hkv=H, L=L, S=S, E=3, Ev=2).tensors(seed=1, requires_grad=False)
    expected_out, expected_lse = torch_eager(q, k, v, block_mask=block_mask)
    out, lse = flex_attention(q, k, v, block_mask=block_mask, return_lse=True, semantics="mask_mod")
    assert_matches(out, expected_out, reference="PyTorch eager", what="out (wrong lists)")
    assert_matches(lse, expected_lse, reference="PyTorch eager", what="lse (wrong lists)")
    blocks_out = flex_attention(q, k, v, block_mask=block_mask, semantics="blocks")
    assert (blocks_out - expected_out).abs().max() > 1e-3


# --------------------------------------------------------------------------
# per-batch / per-head block masks, and broadcast ones


def test_per_batch_and_head_block_mask():
    B, H, L, S = 2, 3, 9, 11
    q, k, v = Shape(B=B, Hq=H, Hkv=H, L=L, S=S).tensors(seed=5)
    allowed = dense_mask(per_batch_and_head, B, H, L, S)
    assert not torch.equal(allowed[0], allowed[1]) and not torch.equal(allowed[:, 0], allowed[:, 1])
    expected = sdpa_reference(q, k, v, allowed=allowed)
    expected_grads = grads((expected,), (q, k, v), seed=2)
    for build in (torch_create_block_mask, oracle.create_block_mask):
        block_mask = build(per_batch_and_head, B, H, L, S, device="cpu", BLOCK_SIZE=(4, 2))
        assert block_mask.kv_num_blocks.shape[:2] == (B, H)
        for semantics in oracle.SEMANTICS:
            out = flex_attention(q, k, v, block_mask=block_mask, semantics=semantics)
            assert_matches(out, expected, reference="SDPA math", what="out (per-batch/head mask)")
            for what, got, want in zip(("dq", "dk", "dv"), grads((out,), (q, k, v), seed=2), expected_grads):
                assert_matches(got, want, reference="SDPA math", what=f"{what} (per-batch/head mask)")


def test_broadcast_block_mask_mb1_mh1():
    B, H, L, S = 2, 3, 10, 7
    q, k, v = Shape(B=B, Hq=H, Hkv=H, L=L, S=S).tensors(seed=6, requires_grad=False)
    narrow = torch_create_block_mask(sliding_window_3, None, None, L, S, device="cpu", BLOCK_SIZE=4)
    wide = torch_create_block_mask(sliding_window_3, B, H, L, S, device="cpu", BLOCK_SIZE=4)
    assert narrow.kv_num_blocks.shape[:2] == (1, 1)
    allowed = dense_mask(sliding_window_3, B, H, L, S)
    expected = sdpa_reference(q, k, v, allowed=allowed)
    for semantics in oracle.SEMANTICS:
        out = flex_attention(q, k, v, block_mask=narrow, semantics=semantics)
        assert_matches(out, expected, reference="SDPA math", what="out (MB=MH=1 mask)")
        assert torch.equal(out, flex_attention(q, k, v, block_mask=wide, semantics=semantics))


# --------------------------------------------------------------------------
# fully masked rows


@pytest.mark.parametrize("semantics", oracle.SEMANTICS)
@pytest.mark.parametrize("everything_masked", [False, True], ids=["some_rows", "all_rows"])
def test_fully_masked_rows(semantics, everything_masked):
    B, Hq, Hkv, L, S = 2, 4, 2, 10, 9
    q, k, v = Shape(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=3, Ev=4).tensors(seed=7)
    bias = randn(torch.Generator().manual_seed(8), Hq, L, S, requires_grad=True)
    if everything_masked:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx < 0
    else:
        mask_mod = causal_with_empty_rows
    block_mask = torch_create_block_mask(mask_mod, 1, Hq, L, S, device="cpu", BLOCK_SIZE=4)
    empty = ~dense_mask(mask_mod, B, Hq, L, S).any(-1)
    assert empty.any()

    out, lse, top = flex_attention(
        q, k, v, score_mod=lambda s, b, h, i, j: s + bias[h, i, j], block_mask=block_mask,
        enable_gqa=True, return_lse=True, return_max=True, semantics=semantics,
    )
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert (lse[empty] == float("-inf")).all() and (top[empty] == float("-inf")).all()
    assert torch.isfinite(lse[~empty]).all() and torch.isfinite(top[~empty]).all()

    dq, dk, dv, dbias = grads((out, lse), (q, k, v, bias), seed=3)
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
        assert torch.isfinite(grad).all(), f"{name} has non-finite entries"
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))
    # Bias entries of empty rows (head h, row i, for every batch) get nothing.
    empty_rows_of_bias = empty.all(0)
    assert torch.equal(dbias[empty_rows_of_bias], torch.zeros_like(dbias[empty_rows_of_bias]))
    if everything_masked:
        for grad in (dk, dv, dbias):
            assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------
# chunking must not be visible


def test_chunk_size_is_invisible():
    B, H, L, S = 2, 2, 10, 11
    q, k, v = Shape(B=B, Hq=H, Hkv=H, L=L, S=S).tensors(seed=9)
    bias = randn(torch.Generator().manual_seed(10), H, L, S, requires_grad=True)
    block_mask = torch_create_block_mask(causal_with_empty_rows, B, H, L, S, device="cpu", BLOCK_SIZE=4)

    def run(chunk_size):
        out, lse, top = flex_attention(
            q, k, v, score_mod=lambda s, b, h, i, j: s + bias[h, i, j], block_mask=block_mask,
            return_lse=True, return_max=True, chunk_size=chunk_size,
        )
        return (out, lse, top, *grads((out, lse), (q, k, v, bias), seed=4))

    names = ("out", "lse", "max", "dq", "dk", "dv", "dbias")
    expected = run(None)
    for chunk_size in (1, 3, L, L + 5):
        for what, a, e in zip(names, run(chunk_size), expected):
            assert_matches(a, e, reference="default chunking", what=f"{what} (chunk_size={chunk_size})")


# --------------------------------------------------------------------------
# the backward's memory: one chunk's tensors at a time, whichever gradients it takes


REPO_ROOT = Path(__file__).resolve().parent.parent


def _recomputes(monkeypatch):
    """Every chunk recomputation, as the chunk's ``_Recompute``."""
    from oracle import reference

    calls = []
    original = reference._Recompute._recompute

    def counted(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(reference._Recompute, "_recompute", counted)
    return calls


def test_backward_recomputes_each_chunk_once_and_keeps_nothing(monkeypatch):
    # A backward that takes some gradients (here the LSE's for q, then out's for v on
    # the same retained graph) must recompute each chunk once and hold no chunk's
    # tensors afterwards; torch.utils.checkpoint kept the tensors of the nodes a
    # partial backward skipped, one score-sized tensor per chunk.
    calls = _recomputes(monkeypatch)
    q, k, v = Shape(B=1, Hq=2, Hkv=2, L=10, S=7).tensors(seed=3)
    chunks = 4  # ceil(10 / 3)
    out, lse = flex_attention(q, k, v, score_mod=softcap_20, return_lse=True, chunk_size=3)
    torch.autograd.grad(lse, q, torch.ones_like(lse), retain_graph=True)
    assert len(calls) == chunks and len({id(c) for c in calls}) == chunks
    torch.autograd.grad(out, v, torch.ones_like(out), retain_graph=True)
    assert len(calls) == 2 * chunks
    torch.autograd.grad((out, lse), (q, k, v), (torch.ones_like(out), torch.ones_like(lse)))
    assert len(calls) == 3 * chunks
    assert all(c.saved is None for c in calls)


def test_partial_gradients_keep_the_backward_memory_bounded(tmp_path):
    # The measured form of the test above, in a fresh process: glibc serves
    # allocations over 64 KiB with mmap under this threshold and returns them on free,
    # so the peak resident size follows the live tensors. The scores of all rows
    # (H x L x S float64) are 64 MiB; a chunk's 0.5 MiB. Measured: 6 MiB of growth,
    # and 71 MiB with torch.utils.checkpoint (before the forty-fourth session).
    if not sys.platform.startswith("linux"):
        pytest.skip("needs glibc's MALLOC_MMAP_THRESHOLD_ and ru_maxrss in KiB (Linux)")
    script = tmp_path / "partial_grads.py"
    script.write_text(textwrap.dedent("""
        import resource, torch, oracle
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 2048, 16, generator=gen, dtype=torch.float64) for _ in range(3))

        def run(L):
            qv, kv, vv = (t[:, :, :L].clone().requires_grad_(True) for t in (q, k, v))
            out, lse = oracle.flex_attention(qv, kv, vv, return_lse=True, chunk_size=16)
            torch.autograd.grad(lse, qv, torch.ones_like(lse), retain_graph=True)
            torch.autograd.grad(out, vv, torch.ones_like(out))

        run(64)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(2048)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    growth_mib = float(done.stdout.split()[-1])
    assert growth_mib < 16, f"peak memory grew {growth_mib:.0f} MiB; all the scores are 64 MiB"


def test_input_changed_between_forward_and_backward_raises():
    q, k, v = Shape(B=1, Hq=1, Hkv=1, L=4, S=4).tensors(seed=5)
    q = q.detach()  # float64 and not a leaf that requires grad: the oracle works on q itself
    out = flex_attention(q, k, v)
    q.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


# --------------------------------------------------------------------------
# emulate_flex_attention: errors of the expected order


# Unit roundoff of the arithmetic each emulation rounds to. TF32 keeps 10
# explicit mantissa bits like float16 (and so rounds to the same values in
# float16's range), bfloat16 keeps 7.
EMULATIONS = {
    "bf16": (torch.bfloat16, "highest", 2.0**-8),
    "fp16": (torch.float16, "highest", 2.0**-11),
    "fp32_tf32": (torch.float32, "high", 2.0**-11),
    "fp32_highest": (torch.float32, "highest", 2.0**-24),
}


@pytest.fixture
def matmul_precision():
    """Sets torch.get_float32_matmul_precision() for the test, then restores it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("inputs", ["rounded", "float64"])
@pytest.mark.parametrize("name", list(EMULATIONS))
def test_emulation_error_is_of_the_dtype_order(name, inputs, matmul_precision):
    """The emulation's error against the float64 truth is within [u/20, 20 u] of max |out|.

    ``inputs="rounded"``: the truth is computed from the inputs already in the
    dtype, as oracle.compare uses it; only the computation's rounding counts
    (probabilities rounded before P @ V, TF32 operands, float32 sums).
    ``inputs="float64"``: the truth is of the float64 inputs, so rounding the
    inputs counts too (about 1e-2, 1e-3, 1e-3 and 1e-6 of the values).
    The lower bound shows that the emulation rounds at all, the upper one that
    it rounds no more than one step of the dtype per operand.
    """
    dtype, precision, u = EMULATIONS[name]
    g = torch.Generator().manual_seed(21)
    B, H, L, S, E = 2, 4, 64, 96, 32
    q, k, v = (randn(g, B, H, n, E) for n in (L, S, S))
    block_mask = torch_create_block_mask(causal_with_empty_rows, None, None, L, S, device="cpu", BLOCK_SIZE=16)
    if inputs == "rounded":
        q, k, v = (t.to(dtype) for t in (q, k, v))
    truth_out, truth_lse, truth_max = flex_attention(q, k, v, block_mask=block_mask, return_lse=True, return_max=True)
    matmul_precision(precision)
    got = emulate_flex_attention(q, k, v, block_mask=block_mask, return_lse=True, return_max=True, dtype=dtype)

    for value, truth in zip(got, (truth_out, truth_lse, truth_max)):
        assert value.dtype == torch.float32 and value.shape == truth.shape
        assert torch.equal(torch.isinf(value), torch.isinf(truth)) and not value.isnan().any()
    empty = torch.isinf(truth_lse)
    assert empty.any() and torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))

    relative = ((got[0] - truth_out).abs().max() / truth_out.abs().max()).item()
    MAX_ERRORS[f"emulation {name}, {inputs} inputs: out, relative to max|out|"] = relative
    assert u / 20 <= relative <= 20 * u, f"{name}: relative error {relative:.2e} outside [{u / 20:.1e}, {20 * u:.1e}]"

    # LSE: float32 sums of products that are exact for bf16/fp16 operands, so
    # float32's roundoff unless the products themselves are rounded (TF32, or
    # inputs rounded to the dtype).
    finite = torch.isfinite(truth_lse)
    lse_error = (got[1] - truth_lse)[finite].abs().max().item()
    products_u = u if (precision == "high" or inputs == "float64") else 2.0**-24
    scores_magnitude = truth_max[finite].abs().max().item()
    MAX_ERRORS[f"emulation {name}, {inputs} inputs: lse, absolute"] = lse_error
    assert lse_error <= 20 * products_u * max(1.0, scores_magnitude), f"{name}: lse error {lse_error:.2e}"
