"""A float32 model of the H200's forward before 6aa23db, for ``tests/test_saved_cases.py``.

There the PV dot took the running sum as its accumulator: an IEEE float32 dot on the GPU
is a chain of FMAs, so each product was rounded against the whole running sum, and a
product under half an ulp of it was lost. The interpreter runs a dot as a NumPy product
added afterwards, so no CPU run of our kernels shows it; this model does, in NumPy's
float32: key blocks of 64 visited in reverse order (as ``block_order: reversed`` lists
them), each block's maximum, base-2 exponentials and sum as the kernel forms them, and the
products added one at a time (``lossy``) or summed from zero and added once (``fresh``, the
fix). One batch, one head, no mask: the saved case ``fp32-small-terms-lost``.
"""

import math

import numpy as np
import torch

import oracle

BLOCK_N = 64


def _run(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False,
         kernel_options=None, fresh=False):
    if query.shape[:2] != (1, 1) or key.shape[:2] != (1, 1) or key.shape[2] % BLOCK_N:
        raise ValueError("the model takes one batch, one head and whole key blocks of 64")
    q, k = query[0, 0].detach().double(), key[0, 0].detach().double()
    v = value[0, 0].detach().float().numpy()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.T) * scale
    L, S = s.shape
    if score_mod is not None:
        s = score_mod(s, torch.tensor(0), torch.tensor(0), torch.arange(L)[:, None], torch.arange(S)[None, :]).double()
    x = (s * math.log2(math.e)).float().numpy()
    m = np.full(L, -np.inf, np.float32)
    l = np.zeros(L, np.float32)
    acc = np.zeros((L, v.shape[1]), np.float32)
    for blk in reversed(range(S // BLOCK_N)):
        cols = slice(blk * BLOCK_N, (blk + 1) * BLOCK_N)
        m_new = np.maximum(m, x[:, cols].max(1)).astype(np.float32)
        alpha = np.where(np.isfinite(m), np.exp2((m - m_new).astype(np.float32)), 0).astype(np.float32)
        p = np.exp2((x[:, cols] - m_new[:, None]).astype(np.float32)).astype(np.float32)
        l = (l * alpha + p.sum(1, dtype=np.float32)).astype(np.float32)
        run = np.zeros_like(acc) if fresh else (acc * alpha[:, None]).astype(np.float32)
        for j in range(BLOCK_N):
            run = (run + p[:, j:j + 1] * v[blk * BLOCK_N + j][None, :]).astype(np.float32)
        acc = (acc * alpha[:, None] + run).astype(np.float32) if fresh else run
        m = m_new
    out = torch.from_numpy(acc / l[:, None])[None, None].to(query.dtype)
    if not return_lse:
        return out
    _, lse = oracle.flex_attention(query.detach(), key.detach(), value.detach(), score_mod=score_mod,
                                   block_mask=block_mask, scale=scale, return_lse=True)
    return out, lse.float()


def lossy(*args, **kwargs):
    """The forward before the fix: products added one at a time into the running sum."""
    return _run(*args, **kwargs)


def fresh(*args, **kwargs):
    """The forward after the fix: each block's products summed from zero, added once."""
    return _run(*args, fresh=True, **kwargs)
