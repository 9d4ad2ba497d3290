"""Compile every kernel launch for Hopper (sm_90) on a machine without a GPU.

Runs a few kernels.flex_attention calls (forward, backward, decode) on CPU
tensors, but instead of launching each Triton kernel it compiles it for
``cuda:90`` and reports compiler errors, the shared memory each kernel takes and its compile
seconds (float32's IEEE products compile to FMA code, in about three times the
bf16 kernels' time). Output buffers stay uninitialised: this checks that
the code compiles for the real target, not what it computes.

    TRITON_INTERPRET=0 python benchmarks/compile_check.py [--quick]

``--quick`` compiles one bf16 forward and backward (tests/test_kernels.py runs it).
"""

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

import kernels  # noqa: E402
from kernels import _runtime, api, mods  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64", torch.int8: "i8", torch.bool: "i1", torch.float64: "fp64"}
seen = {}


def _launcher(fn: JITFunction, grid):
    def launch(*args, num_warps=4, num_stages=2, **kwargs):
        params = fn.params
        bound = dict(zip([p.name for p in params], args))
        bound.update(kwargs)
        sig, constexprs = {}, {}
        for p in params:
            val = bound[p.name] if p.name in bound else p.default  # a constexpr the call left at its default
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                constexprs[p.name] = val
            elif isinstance(val, torch.Tensor):
                sig[p.name] = "*" + _DT[val.dtype]
            elif isinstance(val, bool):
                sig[p.name] = "i1"
            elif isinstance(val, int):
                sig[p.name] = "i32"
            elif isinstance(val, float):
                sig[p.name] = "fp32"
            elif isinstance(val, TensorDescriptor):  # kernels.forward.tma_descriptor
                sig[p.name] = f"tensordesc<{_DT[val.base.dtype]}{list(val.block_shape)}>"
            else:
                raise TypeError(f"{p.name}: {type(val)}")
        key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())), num_warps, num_stages)
        if key in seen:
            return
        try:
            started = time.perf_counter()
            c = triton.compile(ASTSource(fn, signature=sig, constexprs=constexprs), target=TARGET,
                               options={"num_warps": num_warps, "num_stages": num_stages})
            seconds = time.perf_counter() - started
            md = c.metadata
            verdict = "ok  " if md.shared <= 232448 else "FAIL"  # H100: 227 KiB of shared memory per block
            dtype = next((v for v in sig.values() if v in ("*fp16", "*bf16", "*fp32")), "?")[1:]
            seen[key] = f"{verdict} {fn.__name__:14s} {dtype} warps={num_warps} stages={num_stages} " \
                        f"shared={md.shared} compile={seconds:.1f}s"
        except Exception as e:  # report and keep going
            msg = str(e).strip().splitlines()
            seen[key] = f"FAIL {fn.__name__}: " + "\n      ".join(msg[-12:])
        print(seen[key], flush=True)
    return launch


JITFunction.__getitem__ = lambda self, grid: _launcher(self, grid)
_runtime.check_device = lambda t: False
_runtime.DIRECT_LAUNCH = False  # the direct launch needs a CUDA device; compile through kernel[grid]
api._arch = lambda device, interpret: "sm90"
torch.cuda.get_device_properties = lambda device: type("P", (), {"multi_processor_count": 132})()


def run(B, Hq, Hkv, L, S, E, Ev, dtype, score=None, mask=None, bs=128, opts=None):
    q = torch.randn(B, Hq, L, E).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, E).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Ev).to(dtype).requires_grad_()
    from torch.nn.attention.flex_attention import create_block_mask
    bm = create_block_mask(mask, B, Hq, L, S, device="cpu", BLOCK_SIZE=bs) if mask is not None else None
    o, lse = kernels.flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=Hq != Hkv,
                                    return_lse=True, kernel_options=opts)
    (o.float().sum() + lse.sum()).backward()


def _verdict(expected=None) -> int:
    bad = [v for v in seen.values() if v.startswith("FAIL")]
    print(f"{len(seen)} kernels compiled for sm_90, {len(bad)} failed")
    return 1 if bad or (expected is not None and len(seen) != expected) else 0


if __name__ == "__main__":
    if "--quick" in sys.argv[1:]:  # one bf16 causal forward and backward (CPU CI): forward, delta, dQ, dK/dV
        run(1, 2, 1, 200, 190, 64, 64, torch.bfloat16, mask=mods.causal())
        sys.exit(_verdict(expected=4))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        run(1, 4, 2, 256, 256, 64, 64, dt, mask=mods.causal())
        run(1, 4, 4, 256, 256, 128, 128, dt, score=mods.tanh_softcap(20.0), mask=mods.causal())
        run(1, 4, 4, 200, 190, 40, 24, dt, score=mods.bias.from_seed([4, 200, 190], 0, requires_grad=True))
        run(1, 8, 2, 1, 4096, 128, 128, dt, mask=mods.causal())
    sys.exit(_verdict())
