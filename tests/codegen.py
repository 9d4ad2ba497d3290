"""Compile our Triton kernels for the H100/H200 (sm_90) on a machine without a GPU.

Triton's NVIDIA backend and the ptxas in its wheel compile ahead of time anywhere; only
running the code needs the GPU. ``tests/test_codegen.py`` runs this in a fresh process
with ``TRITON_INTERPRET=0`` (under the interpreter every ``triton.jit`` function is an
interpreted one, which cannot compile):

    TRITON_INTERPRET=0 python tests/codegen.py mma fp32 ieee   # one mma call: TTGIR and PTX, as JSON
    TRITON_INTERPRET=0 python tests/codegen.py kernels         # each kernel variant the calls below launch

``kernels`` runs ``kernels.flex_attention`` on CPU tensors with the launch replaced by a
compile for sm_90 (and the API's device queries by an H100's answers), so the kernels
are never run and their outputs are garbage; it prints one JSON line per variant.
"""

import json
import os
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.forward import mma  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


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
    out = triton.compile(src, target=SM90)
    return {"ttgir": out.asm["ttgir"], "ptx": out.asm["ptx"]}


def compile_kernels() -> None:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import kernels
    from kernels import _runtime, api, mods

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
             torch.int64: "i64", torch.int8: "i8", torch.bool: "i1", torch.uint8: "u8"}
    seen = set()
    current = {}

    def compile_only(kernel, grid, args, num_stages, kwargs, key, options=None):
        signature, constexprs = {}, {}
        for i, param in enumerate(kernel.params):
            value = args[i] if i < len(args) else kwargs[param.name]
            if param.is_constexpr or value is None:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + types[value.dtype]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{kernel.fn.__name__}: argument {param.name} of type {type(value).__name__}")
        launch = {k: v for k, v in kwargs.items() if k not in signature}
        launch["num_stages"] = num_stages
        spec = repr((kernel.fn.__name__, sorted(signature.items()), sorted((k, str(v)) for k, v in constexprs.items()),
                     sorted(launch.items())))
        if spec in seen:
            return None
        seen.add(spec)
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        out = triton.compile(src, target=SM90, options=launch)
        print(json.dumps({"kernel": kernel.fn.__name__, "dtype": current["dtype"], "shared": out.metadata.shared,
                          "add_rn_f32": out.asm["ptx"].count("add.rn.f32"), **launch}), flush=True)
        return None

    _runtime.check_device = lambda tensor: False
    _runtime.DIRECT_LAUNCH = False
    _runtime._launch_retrying = compile_only
    api._arch = lambda device, interpret: "sm90"
    api.sm_count = lambda device: 132

    B, H, E = 1, 4, 64
    for dtype in (torch.float32, torch.bfloat16):
        current["dtype"] = types[dtype]
        for L, S in ((256, 256), (1, 1024)):
            q = torch.randn(B, H, L, E, dtype=dtype, requires_grad=True)
            k = torch.randn(B, H, S, E, dtype=dtype, requires_grad=True)
            v = torch.randn(B, H, S, E, dtype=dtype, requires_grad=True)
            for score, mask in ((None, None), (mods.alibi(torch.rand(H)), mods.causal())):
                block_mask = create_block_mask(mask, B, H, L, S, device="cpu") if mask is not None else None
                out = kernels.flex_attention(q, k, v, score_mod=score, block_mask=block_mask)
                if L > 1:
                    out.sum().backward()


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    if sys.argv[1] == "mma":
        print(json.dumps(compile_mma(sys.argv[2], sys.argv[3])))
    elif sys.argv[1] == "kernels":
        compile_kernels()
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}: mma DTYPE PRECISION, or kernels")
