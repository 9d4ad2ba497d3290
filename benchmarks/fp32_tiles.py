"""Time float32 tile choices of our kernels on one GPU, forward and backward.

    PYTHONPATH=. python3 benchmarks/fp32_tiles.py

float32 inputs take IEEE matrix products (``torch.get_float32_matmul_precision()``
is "highest" by default), which Triton expands into FMA code: the compile is
about three times a bf16 one and grows with the tile, and the fuzzer compiles
anew for nearly every case. This script measures what a smaller tile costs at
run time, to weigh against the compile seconds that
``benchmarks/compile_check.py`` reports. Each variant's outputs are compared
with the first variant's (a variant that computes garbage is flagged); the
oracle checks are the property suite's job.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels  # noqa: E402
from kernels import mods  # noqa: E402

# name: kernel_options (None: the defaults of kernels.api._CONFIGS)
VARIANTS = {
    "default": None,
    "64x32/32x32 (old D128)": dict(
        fwd_BLOCK_M=64, fwd_BLOCK_N=32, fwd_num_warps=4, fwd_num_stages=3,
        bwd_BLOCK_M1=32, bwd_BLOCK_N1=32, bwd_BLOCK_M2=32, bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=1),
    "128x32/32x32 (old D64)": dict(
        fwd_BLOCK_M=128, fwd_BLOCK_N=32, fwd_num_warps=4, fwd_num_stages=3,
        bwd_BLOCK_M1=32, bwd_BLOCK_N1=32, bwd_BLOCK_M2=32, bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=1),
    "32x32/16x32": dict(
        fwd_BLOCK_M=32, fwd_BLOCK_N=32, fwd_num_warps=4, fwd_num_stages=2,
        bwd_BLOCK_M1=16, bwd_BLOCK_N1=32, bwd_BLOCK_M2=32, bwd_BLOCK_N2=16, bwd_num_warps=4, bwd_num_stages=1),
}


def main() -> int:
    from torch.nn.attention.flex_attention import create_block_mask
    from triton.testing import do_bench

    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()}")
    print(f"{'case':28s} {'variant':24s} {'fwd ms':>8s} {'bwd ms':>8s} {'max |diff|':>11s}")
    bad = 0
    # (head dim, mask, variants after the default): the former tile of that head dim, and
    # for D=128 a middle ground (16 x 32 backward tiles).
    cases = ((64, "causal", ["128x32/32x32 (old D64)"]),
             (128, "causal", ["64x32/32x32 (old D128)", "32x32/16x32"]))
    for D, mask, names in cases:
        B, H, S = 2, 8, 2048
        g = torch.Generator(device=dev).manual_seed(D)
        q, k, v = (torch.randn(B, H, S, D, device=dev, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, S, D, device=dev, generator=g)
        bm = create_block_mask(mods.causal(), B, H, S, S, device=dev) if mask == "causal" else None
        ref = None
        for name in ["default"] + names:
            opts = VARIANTS[name]
            def fwd():
                return kernels.flex_attention(q, k, v, block_mask=bm, kernel_options=opts)
            out = fwd()
            grads = torch.autograd.grad(out, (q, k, v), do)
            got = (out, *grads)
            if ref is None:
                ref, diff = got, 0.0
            else:
                diff = max((a - b).abs().max().item() for a, b in zip(got, ref))
            flag = "" if diff < 1e-3 else "  <- differs from the default"
            bad += bool(flag)
            f_ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
            out = fwd()
            b_ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                            warmup=25, rep=100, return_mode="median")
            print(f"{f'D{D} {mask} B{B} H{H} S{S}':28s} {name:24s} {f_ms:8.3f} {b_ms:8.3f} {diff:11.2e}{flag}",
                  flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
