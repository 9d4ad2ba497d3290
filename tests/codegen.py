"""Compile our Triton kernels for the H100/H200 (sm_90) on a machine without a GPU.

``tests/test_codegen.py`` runs this in a fresh process with ``TRITON_INTERPRET=0`` (under
the interpreter every ``triton.jit`` function is an interpreted one, which cannot compile):

    TRITON_INTERPRET=0 python tests/codegen.py mma fp32 ieee   # one mma call: TTGIR and PTX, as JSON
    TRITON_INTERPRET=0 python tests/codegen.py kernels         # each kernel variant the calls below launch

``kernels`` runs ``kernels.flex_attention`` under ``benchmarks.codegen.sm90_launches``
(each launch compiled for sm_90, never run) and prints one JSON line per variant.
"""

import json
import os
import re
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.forward import mma  # noqa: E402


@triton.jit
def mma_kernel(A, B, C, P: tl.constexpr):
    r = tl.arange(0, 64)
    a = tl.load(A + r[:, None] * 64 + r[None, :])
    b = tl.load(B + r[:, None] * 64 + r[None, :])
    acc = tl.load(C + r[:, None] * 64 + r[None, :])
    acc = mma(a, b, acc * 0.5, P, False)
    tl.store(C + r[:, None] * 64 + r[None, :], acc)


def compile_mma(dtype: str, precision: str) -> dict:
    src = triton.compiler.ASTSource(
        fn=mma_kernel, signature={"A": "*" + dtype, "B": "*" + dtype, "C": "*fp32", "P": "constexpr"},
        constexprs={"P": precision})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    return {"ttgir": out.asm["ttgir"], "ptx": out.asm["ptx"]}


def compile_kernels() -> None:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import kernels
    from benchmarks.codegen import sm90_launches
    from kernels import mods

    B, H, E = 1, 4, 64
    calls = {}  # each record's index -> the dtype of the call that launched it
    with sm90_launches(ptxas=False) as records:
        for dtype in (torch.float32, torch.bfloat16):
            for L, S in ((256, 256), (1, 1024)):
                q = torch.randn(B, H, L, E, dtype=dtype, requires_grad=True)
                k = torch.randn(B, H, S, E, dtype=dtype, requires_grad=True)
                v = torch.randn(B, H, S, E, dtype=dtype, requires_grad=True)
                for score, mask in ((None, None), (mods.alibi(torch.rand(H)), mods.causal())):
                    block_mask = create_block_mask(mask, B, H, L, S, device="cpu") if mask is not None else None
                    out = kernels.flex_attention(q, k, v, score_mod=score, block_mask=block_mask)
                    if L > 1:
                        out.backward(torch.randn_like(out))  # a real gradient, not an expanded one
            calls.update({i: str(dtype).replace("torch.", "") for i in range(len(calls), len(records))})
    for i, r in enumerate(records):
        print(json.dumps({"kernel": r["kernel"], "dtype": calls[i], "shared": r["shared"],
                          "add_rn_f32": r["ptx"].count("add.rn.f32"), "num_warps": r["num_warps"],
                          "num_stages": r["num_stages"],
                          "async_waits": [int(n) for n in re.findall(r"async_wait\b[^{]*\{num = (\d+)", r["ttgir"])],
                          "tma_ahead": tma_ahead(r["ttgir"])}),
              flush=True)


def tma_ahead(ttgir: str):
    """How many steps ahead a kernel's first loop has its TMA copies issued: the copies before the
    loop over those in its body (its first ``scf.yield``); None without TMA copies."""
    copy = "ttng.async_tma_copy_global_to_local"
    head = ttgir.find("scf.for")
    body = ttgir[head:ttgir.find("scf.yield", head)]
    if head < 0 or copy not in body:
        return None
    return ttgir[:head].count(copy) / body.count(copy)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    if sys.argv[1] == "mma":
        print(json.dumps(compile_mma(sys.argv[2], sys.argv[3])))
    elif sys.argv[1] == "kernels":
        compile_kernels()
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}: mma DTYPE PRECISION, or kernels")
