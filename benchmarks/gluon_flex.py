"""FlexAttention on the Gluon probes: ``benchmarks/gluon_probe.py``'s forward and
``benchmarks/gluon_probe_bwd.py``'s backward behind one autograd function.

    PYTHONPATH=. python3 benchmarks/bench.py --impls ours,gluon,torch-compile --no-decode   # on the H100/H200

For measurement, not for use: ``bench.py``'s ``gluon`` implementation, so that the probes run
the benchmark's whole matrix with every output and gradient checked against the float64 oracle
before it is timed. ``unsupported`` names what the probes do not cover (anything but sm_90,
bf16/fp16 q, k and v of head dim 64 or 128 and one batch, 128 x 128 block masks, ``kernels.mods``
mods without learnable tensors, training shapes); ``bench.py`` reports those cases as n/a. On CPU
tensors the Gluon kernels run in ``kernels.gluon_emulator`` (and the delta kernel in Triton's
interpreter, ``TRITON_INTERPRET=1``): slow, for checking, as in ``bench.py --device cpu``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def unsupported_shapes(device, dtype, q_shape, k_shape, score_mod=None, block_mask=None,
                       enable_gqa=False) -> Optional[str]:
    """Why the probes cannot run a call on (B, H, L, D) q and k, v of these shapes, or None."""
    from kernels import mods

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9:
        return "the Gluon probes are written for sm_90 (H100/H200) only"
    if device.type not in ("cuda", "cpu"):
        return f"the Gluon probes run on sm_90 GPUs (and on the CPU in kernels.gluon_emulator), not on {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the Gluon probes take bf16 or fp16, got {dtype}"
    if q_shape[-1] not in (64, 128) or k_shape[-1] != q_shape[-1]:
        return f"the Gluon probes take q, k, v of head dim 64 or 128 alike, got {q_shape[-1]} and {k_shape[-1]}"
    if q_shape[1] != k_shape[1] and (not enable_gqa or q_shape[1] % k_shape[1]):
        return f"Hq={q_shape[1]}, Hkv={k_shape[1]} without enable_gqa"
    if block_mask is not None and tuple(block_mask.BLOCK_SIZE) != (128, 128):
        return f"the Gluon probes walk 128 x 128 block lists, got BLOCK_SIZE={tuple(block_mask.BLOCK_SIZE)}"
    if not isinstance(score_mod, (type(None), mods.ScoreMod)):
        return "the Gluon probes inline kernels.mods score mods only"
    if block_mask is not None and not isinstance(block_mask.mask_mod, (type(None), mods.MaskMod)):
        return "the Gluon probes inline kernels.mods mask mods only"
    if score_mod is not None and any(t.requires_grad for t in score_mod.tensors()):
        return "the Gluon backward returns no gradient for a learnable captured tensor"
    return None


def unsupported(q, k, v, score_mod=None, block_mask=None, enable_gqa=False) -> Optional[str]:
    """Why the probes cannot run this call, or None (any layout: ``flex_attention`` copies what a
    TMA descriptor cannot take)."""
    if not (q.dtype == k.dtype == v.dtype) or v.shape[-1] != k.shape[-1]:
        return f"the Gluon probes take q, k, v of one dtype and head dim, got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.shape[0] != q.shape[0]:
        return f"the Gluon probes take k and v of q's batch ({q.shape[0]}), got {k.shape[0]}"
    return unsupported_shapes(q.device, q.dtype, q.shape, k.shape, score_mod, block_mask, enable_gqa)


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if a TMA descriptor can take it (contiguous, its data 16-byte aligned), else a
    contiguous copy (a view at an odd storage offset, or a strided one)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


# Refine the lists to 64 rows or keys on an axis when that lists at least this share fewer
# elements (our Triton backward's threshold, kernels.api.AUTO_REFINE_BWD_SAVING; what a 64-wide
# tile costs the Gluon kernels is not measured yet).
REFINE_SAVING = 0.05
_CHOICES: dict = {}


def refine_choice(block_mask, B: int, H: int, L: int, S: int, device) -> tuple:
    """(kv_block, q_block): 64 on an axis whose refined lists hold at least REFINE_SAVING fewer
    elements than the 128 x 128 ones (the forward's key axis, the backward's query axis), else
    128; decided once per block mask."""
    from benchmarks.gluon_probe import refined_lists

    if block_mask is None:
        return 128, 128
    key = (id(block_mask), B, H, L, S, str(device))
    hit = _CHOICES.get(key)
    if hit is not None and hit[0] is block_mask:
        return hit[1]

    def listed(lists, area):
        return sum(int(n.sum()) for n in lists) * area
    base = refined_lists(block_mask, B, H, L, S, device)
    kv64 = refined_lists(block_mask, B, H, L, S, device, kv_block=64)
    q64 = refined_lists(block_mask, B, H, L, S, device, q_block=64)
    whole = listed((base[0], base[2]), 128 * 128)
    kv_block = 64 if listed((kv64[0], kv64[2]), 128 * 64) <= (1 - REFINE_SAVING) * whole else 128
    q_block = 64 if listed((q64[4], q64[6]), 64 * 128) <= (1 - REFINE_SAVING) * whole else 128
    if len(_CHOICES) > 16:
        _CHOICES.clear()
    _CHOICES[key] = (block_mask, (kv_block, q_block))
    return kv_block, q_block


class _GluonFlex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, score_mod, block_mask, scale, enable_gqa, refine, persistent):
        from benchmarks.gluon_probe import gluon_flex_attention

        B, H, L = q.shape[:3]
        kv_block, q_block = refine_choice(block_mask, B, H, L, k.shape[2], q.device) if refine else (128, 128)
        out, lse = gluon_flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                        enable_gqa=enable_gqa, kv_block=kv_block, NUM_BUF=3 if kv_block == 128 else 4,
                                        persistent=persistent)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mods = (score_mod, block_mask, scale, enable_gqa, q_block)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from benchmarks.gluon_probe_bwd import gluon_flex_backward

        q, k, v, out, lse = ctx.saved_tensors
        score_mod, block_mask, scale, enable_gqa, q_block = ctx.mods
        dq, dk, dv = gluon_flex_backward(q, k, v, out, lse, tma_ready(dout), score_mod=score_mod,
                                         block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, dlse=dlse,
                                         q_block=q_block)
        return dq, dk, dv, None, None, None, None, None, None


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   refine: bool = True, persistent: bool = False):
    """``(out, lse)`` of FlexAttention with the Gluon probes, differentiable in query, key and value
    (and through ``lse``); ValueError naming the reason for a call they do not cover. ``refine``:
    the lists refined where ``refine_choice`` says so (else 128 x 128 throughout). ``persistent``:
    the persistent forward (one CTA per SM walking the tiles)."""
    reason = unsupported(query, key, value, score_mod, block_mask, enable_gqa)
    if reason is not None:
        raise ValueError(f"benchmarks.gluon_flex cannot run this call: {reason}.")
    query, key, value = (tma_ready(t) for t in (query, key, value))
    return _GluonFlex.apply(query, key, value, score_mod, block_mask, scale, enable_gqa, refine, persistent)
