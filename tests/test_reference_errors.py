"""Bad input to the oracle raises ValueError/TypeError naming the argument and the value.

Each case matches the message against the argument's name and the offending
value, so a message that says only "invalid input" fails.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import oracle
from oracle import emulate_flex_attention, flex_attention

F64 = torch.float64


def tensors(B=1, Hq=2, Hkv=2, L=8, S=8, E=4, Ev=4, Bk=None, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    Bk = B if Bk is None else Bk

    def make(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype=dtype, device=device)

    return make(B, Hq, L, E), make(Bk, Hkv, S, E), make(Bk, Hkv, S, Ev)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def causal_mask(L=8, S=8, block=4):
    return oracle.create_block_mask(causal, 1, 1, L, S, BLOCK_SIZE=block)


# --------------------------------------------------------------------------
# shapes


def test_three_dim_query():
    q, k, v = tensors()
    with pytest.raises(ValueError, match=re.escape("Expected query to have 4 dimensions") + ".*got shape \\(2, 8, 4\\)"):
        flex_attention(q[0], k, v)


@pytest.mark.parametrize("which", ["key", "value"])
def test_three_dim_key_or_value(which):
    q, k, v = tensors()
    args = {"key": (q, k[0], v), "value": (q, k, v[0])}[which]
    with pytest.raises(ValueError, match=f"Expected {which} to have 4 dimensions.*got shape \\(2, 8, 4\\)"):
        flex_attention(*args)


def test_head_dim_mismatch_between_query_and_key():
    q, _, v = tensors()
    _, k, _ = tensors(E=6)
    with pytest.raises(ValueError, match="query E=4, key E=6"):
        flex_attention(q, k, v)


def test_sequence_length_mismatch_between_key_and_value():
    q, k, _ = tensors()
    _, _, v = tensors(S=9)
    with pytest.raises(ValueError, match="key S=8, value S=9"):
        flex_attention(q, k, v)


def test_key_value_head_count_mismatch():
    q, k, _ = tensors(Hq=2, Hkv=2)
    _, _, v = tensors(Hq=2, Hkv=1)
    with pytest.raises(ValueError, match=re.escape("got key (1, 2), value (1, 1)")):
        flex_attention(q, k, v)


def test_head_counts_without_gqa():
    q, k, v = tensors(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match="Hq == Hkv with enable_gqa=False, got Hq=4, Hkv=2.*enable_gqa=True"):
        flex_attention(q, k, v)


def test_head_counts_with_gqa_not_divisible():
    q, k, v = tensors(Hq=6, Hkv=4)
    with pytest.raises(ValueError, match=re.escape("Hq % Hkv == 0 for enable_gqa=True, got Hq=6, Hkv=4")):
        flex_attention(q, k, v, enable_gqa=True)


def test_batch_that_cannot_broadcast():
    q, _, _ = tensors(B=3)
    _, k, v = tensors(B=2)
    with pytest.raises(ValueError, match=r"\(B=3\) or 1 \(broadcast\), got Bk=2"):
        flex_attention(q, k, v)


def test_empty_dimension():
    q, k, v = tensors(S=0)
    with pytest.raises(ValueError, match="non-empty.*key \\(1, 2, 0, 4\\)"):
        flex_attention(q, k, v)


# --------------------------------------------------------------------------
# dtypes and devices


def test_mixed_dtypes():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="share a dtype, got torch.float64, torch.float32, torch.float64"):
        flex_attention(q, k.float(), v)


def test_integer_tensor():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="Expected value to be a floating-point tensor, got torch.int64"):
        flex_attention(q, k, v.long())


def test_not_a_tensor():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="Expected key to be a torch.Tensor, got list"):
        flex_attention(q, k.tolist(), v)


def test_mixed_devices():
    # The meta device exists on every build, so this needs no second real
    # device; the check must fire before anything is computed on it.
    q, k, v = tensors()
    with pytest.raises(ValueError, match="one device, got cpu, meta, cpu"):
        flex_attention(q, k.to("meta"), v)


def test_emulation_dtype():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="dtype to be float16, bfloat16, float32 or float64, got torch.int32"):
        emulate_flex_attention(q, k, v, dtype=torch.int32)


# --------------------------------------------------------------------------
# block masks


def test_block_mask_index_out_of_range():
    q, k, v = tensors()
    block_mask = causal_mask()
    block_mask.kv_indices[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=re.escape("kv_indices[0, 0, 0, 0] = 7 names a KV block outside [0, 2)")):
        flex_attention(q, k, v, block_mask=block_mask)


def test_block_mask_count_above_capacity():
    q, k, v = tensors()
    block_mask = causal_mask()
    block_mask.kv_num_blocks[0, 0, 1] = 5
    with pytest.raises(ValueError, match=re.escape("kv_num_blocks[0, 0, 1] = 5 is outside [0, 2]")):
        flex_attention(q, k, v, block_mask=block_mask)


def test_block_mask_does_not_cover_the_lengths():
    q, k, v = tensors(L=12, S=8)
    with pytest.raises(ValueError, match="does not cover the lengths.*8 query positions but Q_LEN=12"):
        flex_attention(q, k, v, block_mask=causal_mask(L=8, S=8))


def test_block_mask_of_other_batch_size():
    q, k, v = tensors(B=3)
    block_mask = oracle.create_block_mask(causal, 2, 1, 8, 8, BLOCK_SIZE=4)
    with pytest.raises(ValueError, match="2 batch entries.*expected 1 \\(broadcast\\) or B=3"):
        flex_attention(q, k, v, block_mask=block_mask)


def test_block_mask_of_wrong_type():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="Expected block_mask to be a torch.nn.attention.flex_attention.BlockMask, got Tensor"):
        flex_attention(q, k, v, block_mask=torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.parametrize("semantics", oracle.SEMANTICS)
def test_mask_mod_returning_float(semantics):
    q, k, v = tensors()
    proper = causal_mask()
    block_mask = BlockMask.from_kv_blocks(
        proper.kv_num_blocks, proper.kv_indices, proper.full_kv_num_blocks, proper.full_kv_indices,
        BLOCK_SIZE=4, mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx).float(), seq_lengths=(8, 8),
    )
    with pytest.raises(TypeError, match="mask_mod to return a bool tensor, got torch.float32"):
        flex_attention(q, k, v, block_mask=block_mask, semantics=semantics)


def test_mask_mod_with_three_arguments():
    q, k, v = tensors()
    block_mask = causal_mask()
    block_mask.mask_mod = lambda b, h, q_idx: q_idx >= 0
    with pytest.raises(TypeError, match=re.escape("mask_mod to take 4 positional arguments") + ".*\\(b, h, q_idx\\)"):
        flex_attention(q, k, v, block_mask=block_mask)


# --------------------------------------------------------------------------
# mods, scale, semantics, options


def test_score_mod_with_four_arguments():
    q, k, v = tensors()
    with pytest.raises(TypeError, match=re.escape("score_mod to take 5 positional arguments") + ".*\\(score, b, h, q_idx\\)"):
        flex_attention(q, k, v, score_mod=lambda score, b, h, q_idx: score)


def test_score_mod_not_callable():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="score_mod to be callable.*got float"):
        flex_attention(q, k, v, score_mod=0.5)


def test_score_mod_returning_bool():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="score_mod to return a floating-point tensor, got torch.bool"):
        flex_attention(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score > 0)


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scale(scale):
    q, k, v = tensors()
    with pytest.raises(ValueError, match=f"finite scale, got scale={scale}"):
        flex_attention(q, k, v, scale=scale)


def test_tensor_scale():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="scale to be a Python float or None, got Tensor"):
        flex_attention(q, k, v, scale=torch.tensor(0.5))


@pytest.mark.parametrize("semantics", ["mask", "BLOCKS", ""])
def test_unknown_semantics(semantics):
    q, k, v = tensors()
    with pytest.raises(ValueError, match=re.escape(f"got semantics={semantics!r}")):
        flex_attention(q, k, v, block_mask=causal_mask(), semantics=semantics)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_bad_chunk_size(chunk_size):
    q, k, v = tensors()
    with pytest.raises(ValueError, match=re.escape(f"chunk_size to be a positive int or None, got {chunk_size!r}")):
        flex_attention(q, k, v, chunk_size=chunk_size)


def test_kernel_options_not_a_dict():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="kernel_options to be a dict or None, got list"):
        flex_attention(q, k, v, kernel_options=["BLOCK_M", 64])
