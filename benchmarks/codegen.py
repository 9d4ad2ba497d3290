"""Registers, spills and shared memory of our kernels on the H100/H200 (sm_90), read without a GPU.

Triton's NVIDIA backend and the ptxas in its wheel compile ahead of time on any machine;
only running the code needs the GPU. This runs ``bench.py``'s cases through
``kernels.flex_attention`` on CPU tensors with each launch replaced by a compile for
sm_90, specialised as Triton's JIT would specialise it on the GPU (integers equal to 1
and divisibility by 16, from the same arguments), and prints what ``ptxas -v`` reports for
each kernel: a kernel that spills registers to local memory is a lead for a speed-up,
before any device time is spent. Nothing is timed and nothing runs: the outputs are garbage.

    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks causal,softcap --head-dims 128
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks softcap --options BLOCK_M1=64,BLOCK_N1=64
    TRITON_INTERPRET=0 python benchmarks/codegen.py --decode-seqlens 32k
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks softcap --loops   # + SASS per loop trip
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks document --loops --one-loop   # forward, dQ: ONE_LOOP
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks causal --loops --two-loops   # the forward's two loops
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks gqa_document --loops --heads-in-loop   # dK/dV: HEADS_IN_LOOP
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks document --head-dims 64 --dq-atomic tma   # DQ_ATOMIC, TMA reduction
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks softcap --loops --tanh-rcp-dkdv mufu   # mods.TANH_RCP_DKDV
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks softcap --loops --forward-only --tanh-rcp-fwd split4
    TRITON_INTERPRET=0 python benchmarks/codegen.py --masks causal,softcap --loops --forward-only --lse   # the rational

The interpreter must be off (``TRITON_INTERPRET=0``): under it every ``triton.jit``
function is an interpreted one, which cannot compile. ``tests/codegen.py`` (run by
``tests/test_codegen.py``) uses ``sm90_launches`` to check what the kernels compile to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "BLOCK_L")


def _ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_info(ptx: str, arch: str = "sm_90a") -> dict:
    """Registers per thread and spill bytes (stores, loads) as ``ptxas -v`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([_ptxas_path(), "-v", f"-arch={arch}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else 0,
            "spill_loads": int(spills.group(2)) if spills else 0}


# sm_90's rates per multiprocessor and clock (H100, H200): four warp schedulers issuing one
# instruction each; the multi-function unit (MUFU: ex2, rcp, ...) 16 results; dense bf16 / fp16
# tensor cores 4096 FLOP (989 TFLOP/s over 132 multiprocessors at 1.83 GHz).
ISSUE_PER_CLK = 4
MUFU_PER_CLK = 16
TENSOR_FLOP_PER_CLK = 4096


def sass(ptx: str, arch: str = "sm_90a") -> str:
    """The SASS of ``ptx`` (ptxas, then nvdisasm, both from Triton's wheel)."""
    bin_dir = os.path.dirname(_ptxas_path())
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        subprocess.run([_ptxas_path(), f"-arch={arch}", src, "-o", cubin], capture_output=True, check=True)
        return subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout


_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\S*)")
_HGMMA = re.compile(r"^\.(\d+)x(\d+)x(\d+)")


def _retry_jump(lines: list, i: int) -> bool:
    """Whether the branch on line ``i`` ends an mbarrier wait's out-of-line retry (TMA loads): ptxas
    places the retry (``SYNCS.PHASECHK`` and a branch to itself) after the function's body, and an
    unconditional branch takes it back into the loop it left. That jump is no loop's back edge."""
    if re.search(r"@!?U?P\w+\s+BRA\b", lines[i]):
        return False
    start = max((j for j in range(i) if re.match(r"^\.L_x_\d+:", lines[j])), default=0)
    return any("SYNCS.PHASECHK" in body for body in lines[start:i])


def loop_mix(sass_text: str, num_warps: int) -> list:
    """Per loop of a kernel's SASS (a label that a later branch jumps back to), what one trip
    issues per thread: ``instrs``, ``mufu``, ``fp32`` (FFMA, FMUL, FADD), ``spill`` (LDL, STL), and
    the tensor cores' FLOP of its HGMMA instructions per warpgroup; then the trip's clocks per
    multiprocessor at sm_90's rates for a CTA of ``num_warps`` warps alone on it: ``issue_clk``,
    ``mufu_clk`` and ``tensor_clk``, and ``bound``, the largest's name. A static floor, not a
    time: it leaves out latencies, dependencies and the memory system. ``skippable`` lists the
    instructions of each forward branch inside the trip (code a trip may jump over, such as
    ``kernels.forward.ONE_LOOP``'s mask of partial blocks); the counts above include them.
    ``products`` lists the trip's warpgroup matrix products in issue order (each its HGMMAs'
    M x N, a product ending at its commit), and ``mufu_under`` counts the MUFU instructions issued
    while a product is in flight (after an HGMMA, before the next ``WARPGROUP.DEPBAR``): the
    exponentials and reciprocals that overlap the tensor cores rather than take turns with them."""
    lines = sass_text.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", line)
        if not m or labels.get(m.group(1), i) >= i:
            continue
        if _retry_jump(lines, i):
            continue
        counts: dict = {}
        flop = 0
        products, open_product, in_flight, mufu_under = [], False, False, 0
        for body in lines[labels[m.group(1)]:i + 1]:
            ins = _INSTR.match(body)
            if ins is None:
                continue
            op = ins.group(1)
            counts[op] = counts.get(op, 0) + 1
            shape = _HGMMA.match(ins.group(2)) if op == "HGMMA" else None
            if shape:
                flop += 2 * int(shape.group(1)) * int(shape.group(2)) * int(shape.group(3))
                if not open_product:
                    products.append(f"{shape.group(1)}x{shape.group(2)}")
                open_product = "gsb0" not in body
                in_flight = True
            elif op == "WARPGROUP" and ins.group(2).startswith(".DEPBAR"):
                in_flight = False
            elif op == "MUFU" and in_flight:
                mufu_under += 1
        instrs = sum(counts.values())
        if instrs < 8:  # a trap or spin loop, not work
            continue
        skippable = []
        for j in range(labels[m.group(1)], i):
            jump = re.search(r"@!?U?P\w+\s+BRA\b.*?(\.L_x_\d+)", lines[j])
            if jump and j < labels.get(jump.group(1), -1) < i:
                skippable.append(sum(1 for body in lines[j + 1:labels[jump.group(1)]] if _INSTR.match(body)))
        row = {"label": m.group(1), "instrs": instrs, "mufu": counts.get("MUFU", 0), "skippable": skippable,
               "fp32": sum(counts.get(k, 0) for k in ("FFMA", "FMUL", "FADD")),
               "spill": counts.get("LDL", 0) + counts.get("STL", 0), "hgmma_flop": flop,
               "products": products, "mufu_under": mufu_under,
               "issue_clk": instrs * num_warps / ISSUE_PER_CLK,
               "mufu_clk": counts.get("MUFU", 0) * 32 * num_warps / MUFU_PER_CLK,
               "tensor_clk": flop * (num_warps / 4) / TENSOR_FLOP_PER_CLK}
        row["bound"] = max(("issue", "mufu", "tensor"), key=lambda k: row[f"{k}_clk"])
        loops.append(row)
    return loops


@contextlib.contextmanager
def sm90_launches(ptxas: bool = True):
    """Within it, ``kernels.flex_attention`` compiles each distinct launch for sm_90 instead of
    running it, and appends a record to the yielded list: kernel, dtype (of its first tensor),
    tiles, num_warps, num_stages, shared bytes, the PTX and TTGIR, and with ``ptxas`` its
    registers and spills. The API's device queries answer as an H100 would (132 SMs, sm90 configs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from kernels import _runtime, api

    if _runtime.process_interprets():
        raise RuntimeError("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    records, seen = [], set()

    def compile_only(kernel, grid, args, num_stages, kwargs, key, options=None):
        kw = dict(kwargs, num_stages=num_stages)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, opts = binder(*args, **kw)
        opts, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, opts)
        spec = repr((kernel.fn.__name__, sorted(signature.items()), sorted((k, str(v)) for k, v in constexprs.items()),
                     sorted((k, str(v)) for k, v in attrs.items()), opts.num_warps, opts.num_stages))
        if spec in seen:
            return None
        seen.add(spec)
        out = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs), target=target,
                             options=opts.__dict__)
        named = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        rec = {"kernel": kernel.fn.__name__, "dtype": str(first.dtype).replace("torch.", "") if first is not None else "",
               "tiles": {n: named[n] for n in TILE_NAMES if n in named}, "num_warps": opts.num_warps,
               "num_stages": opts.num_stages, "shared": out.metadata.shared, "ptx": out.asm["ptx"],
               "ttgir": out.asm.get("ttgir", "")}
        if ptxas:
            rec.update(ptxas_info(out.asm["ptx"]))
        records.append(rec)
        return None

    saved = (_runtime.check_device, _runtime.DIRECT_LAUNCH, _runtime._launch_retrying, api._arch, api.sm_count)
    _runtime.check_device = lambda tensor: False
    _runtime.DIRECT_LAUNCH = False
    _runtime._launch_retrying = compile_only
    api._arch = lambda device, interpret: "sm90"
    api.sm_count = lambda device: 132
    try:
        yield records
    finally:
        (_runtime.check_device, _runtime.DIRECT_LAUNCH, _runtime._launch_retrying, api._arch, api.sm_count) = saved


def run_case(mask: str, s, dtype, options: Optional[dict], grad: bool, lse: bool = False) -> None:
    """One training step (or forward) of bench.py's case ``mask`` on shape ``s`` through
    ``kernels.flex_attention`` on empty CPU tensors: inside ``sm90_launches`` it compiles. ``lse``
    asks for the LSE too (bench.py's ``ours``): a forward with a float32 result takes the exact
    mods (``kernels.api.DTYPE_ROUNDING``: the softcap's rational)."""
    from benchmarks import bench
    import kernels

    score_mod, block_mask = bench.attention_args(mask, s, "cpu")
    q = torch.empty(s.B, s.Hq, s.L, s.D, dtype=dtype, requires_grad=grad)
    k = torch.empty(s.B, s.Hkv, s.S, s.D, dtype=dtype, requires_grad=grad)
    v = torch.empty(s.B, s.Hkv, s.S, s.D, dtype=dtype, requires_grad=grad)
    out = kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                 enable_gqa=s.Hq != s.Hkv, kernel_options=options, return_lse=lse)
    if lse:
        out = out[0]
    if grad:
        # A gradient with the output's own layout, as bench.py's: out.sum().backward() would
        # pass an expanded one (stride 0), a specialization no training step runs (its dK/dV
        # kernel reported 100 to 400 bytes of spills that the real one lacks at D=128).
        out.backward(torch.empty_like(out))


def _parse_options(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--options: expected NAME=VALUE, got {item!r}")
        out[name] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
    return out


def main(argv=None) -> int:
    from benchmarks import bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", type=bench._parse_masks, default=("causal", "softcap", "document"))
    p.add_argument("--seqlens", type=bench._parse_lengths, default=(4096,))
    p.add_argument("--head-dims", type=bench._parse_ints, default=(128,))
    p.add_argument("--decode-seqlens", type=bench._parse_lengths, default=())
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bfloat16")
    p.add_argument("--options", type=_parse_options, default={}, help="kernel_options, NAME=VALUE,...")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--lse", action="store_true",
                   help="the forward also returns the LSE (bench.py's ours): the exact mods, the softcap's rational")
    p.add_argument("--loops", action="store_true",
                   help="also each kernel loop's instructions per trip and its static floor (loop_mix)")
    p.add_argument("--one-loop", action="store_true",
                   help="kernels.forward.ONE_LOOP and kernels.backward.ONE_LOOP: one loop over partial and full blocks")
    p.add_argument("--eager-mask", action="store_true",
                   help="with --one-loop, kernels.forward.ONE_LOOP_EAGER_MASK: the forward's mask called on every step")
    p.add_argument("--two-loops", action="store_true",
                   help="kernels.forward.ONE_LOOP = False: the forward's two loops on every mask (the default "
                        "takes one loop where kernels.forward.one_loop_for says)")
    p.add_argument("--heads-in-loop", action="store_true",
                   help="kernels.backward.HEADS_IN_LOOP: the dK/dV kernel walks a kv head's query heads in each loop")
    p.add_argument("--dq-atomic", choices=("tma", "pointers"),
                   help="kernels.backward.DQ_ATOMIC: no dQ kernel, the dK/dV kernel adds dQ; 'tma' through a "
                        "descriptor's reduction where the head dim needs no padding (DQ_ATOMIC_TMA), 'pointers' "
                        "one atomic add an element")
    from kernels import mods
    p.add_argument("--tanh-rcp", choices=mods.TANH_RCPS,
                   help="kernels.mods.TANH_RCP: the softcap's fast tanh's reciprocal (default: the module's)")
    p.add_argument("--tanh-rcp-dkdv", choices=mods.TANH_RCPS,
                   help="kernels.mods.TANH_RCP_DKDV: the dK/dV kernel's own (default: the module's)")
    p.add_argument("--tanh-rcp-fwd", choices=mods.TANH_RCPS,
                   help="kernels.mods.TANH_RCP_FWD: the forward's own where it returns out alone (default: the module's)")
    args = p.parse_args(argv)
    if args.tanh_rcp:
        mods.TANH_RCP = args.tanh_rcp
    if args.tanh_rcp_dkdv:
        mods.TANH_RCP_DKDV = args.tanh_rcp_dkdv
    if args.tanh_rcp_fwd:
        mods.TANH_RCP_FWD = args.tanh_rcp_fwd
    if args.two_loops and args.one_loop:
        p.error("--two-loops and --one-loop contradict each other: pass one")
    if args.two_loops:
        from kernels import forward
        forward.ONE_LOOP = False
    if args.heads_in_loop:
        from kernels import backward
        backward.HEADS_IN_LOOP = True
    if args.dq_atomic:
        from kernels import backward
        backward.DQ_ATOMIC, backward.DQ_ATOMIC_TMA = True, args.dq_atomic == "tma"
    if args.eager_mask and not args.one_loop:
        p.error("--eager-mask changes the forward's one loop: pass --one-loop with it")
    if args.one_loop:
        from kernels import backward, forward
        forward.ONE_LOOP = backward.ONE_LOOP = True
        forward.ONE_LOOP_EAGER_MASK = args.eager_mask

    dtype = bench.DTYPES[args.dtype]
    cases = [(m, bench.train_shape(m, S, D, "cuda")) for D in args.head_dims for S in args.seqlens for m in args.masks]
    cases += [(bench.DECODE, bench.decode_shape(S, 1, "cuda")) for S in args.decode_seqlens]
    print(f"sm_90 code of our kernels (Triton {triton.__version__}, ptxas of its wheel), {args.dtype}, "
          f"options {args.options or 'default'}")
    print(f"{'case':30s} {'kernel':22s} {'tiles':28s} {'warps':>5s} {'stages':>6s} {'regs':>4s} "
          f"{'spill st/ld':>11s} {'shared':>7s}")
    with sm90_launches() as records:
        for mask, s in cases:
            before = len(records)
            run_case(mask, s, dtype, args.options or None, grad=not args.forward_only and s.L > 1, lse=args.lse)
            name = f"{mask} S={s.S} D={s.D}"
            for r in records[before:]:
                tiles = ",".join(f"{k}={v}" for k, v in r["tiles"].items())
                print(f"{name:30s} {r['kernel']:22s} {tiles:28s} {r['num_warps']:5d} {r['num_stages']:6d} "
                      f"{r['regs']:4d} {r['spill_stores']:5d}/{r['spill_loads']:<5d} {r['shared']:7d}")
                if args.loops:
                    for loop in loop_mix(sass(r["ptx"]), r["num_warps"]):
                        skip = (f"; {'/'.join(map(str, loop['skippable']))} in branches a trip may skip"
                                if loop["skippable"] else "")
                        print(f"{'':30s}   loop {loop['label']:8s} {loop['instrs']:5d} instrs, {loop['mufu']:3d} MUFU, "
                              f"{loop['fp32']:4d} FP32, {loop['spill']:3d} LDL/STL per thread; clocks: issue "
                              f"{loop['issue_clk']:6.0f}  MUFU {loop['mufu_clk']:6.0f}  tensor {loop['tensor_clk']:6.0f}"
                              f"  ({loop['bound']}){skip}")
                        if loop["products"]:
                            print(f"{'':30s}     products {' '.join(loop['products'])}; "
                                  f"{loop['mufu_under']} MUFU under a product in flight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
