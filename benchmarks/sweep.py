"""Sweep our kernels' launch configs on one GPU, beside torch.compile(flex_attention).

    PYTHONPATH=. python3 benchmarks/sweep.py [--jobs 12] [--masks none,causal,document,softcap]
                                             [--head-dims 128,64] [--decode] [--json PATH]
                                             [--fwd-tiles M,N,W,S/...] [--bwd-tiles M1,N1,M2,N2,W,S/...]

What it is for: choosing the rows of ``kernels.api._CONFIGS`` (and the decode
split) by measurement. It is not the benchmark of record (``bench.py`` is:
that one checks every output against the oracle before timing it); the sweep
checks each config's output only against our default config's, to catch a
config that computes garbage.

Compiling dominates a cold run, and Triton's compiles are CPU-bound and cached
on disk, so the first phase compiles every (case, config) in a pool of
``--jobs`` processes; the second phase, in this process, finds them in the
cache and times them one at a time (one GPU, nothing else running).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench  # noqa: E402

S = 4096
FWD = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 4)],
    64: [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 4)],
}
BWD = {  # (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages)
    # The last two: dK/dV tiles of 32 and 16 queries, the only ones at D=128 whose dK/dV kernel
    # does not spill registers (benchmarks/codegen.py, read on the CPU; the default spills
    # 212 bytes on causal and 508 on softcap). Timed on the H200 (docs/perf/h200-bwd-tile-sweep-2026-12-04.txt):
    # slower than the default, 309 and 237 TFLOP/s against 339 causal, 223 and 197 against 245 softcap.
    128: [(64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (64, 128, 128, 64, 8, 4), (64, 128, 128, 128, 8, 2),
          (64, 128, 64, 64, 8, 3), (64, 64, 64, 64, 4, 3), (32, 128, 128, 64, 8, 3), (16, 128, 128, 64, 8, 3)],
    64: [(64, 64, 64, 64, 4, 3), (64, 128, 128, 64, 8, 2), (64, 128, 128, 64, 4, 3), (32, 128, 128, 32, 4, 3)],
}
SPLITS = [None, 8, 16, 32, 64, 128]


def fwd_options(cfg):
    m, n, w, s = cfg
    return {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_warps": w, "fwd_num_stages": s}


def bwd_options(cfg):
    m1, n1, m2, n2, w, s = cfg
    return {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
            "bwd_num_warps": w, "bwd_num_stages": s}


def tasks(masks, head_dims, decode: bool, seqlens=(S,)):
    """(kind, mask, D, config, S) for every timing; decode rows have S=None (their own shape)."""
    out = []
    for seqlen in seqlens:
        for D in head_dims:
            for mask in masks:
                for cfg in FWD[D]:
                    out.append(("ours-fwd", mask, D, cfg, seqlen))
                for cfg in BWD[D]:
                    out.append(("ours-bwd", mask, D, cfg, seqlen))
                out.append(("torch-compile", mask, D, None, seqlen))
    if decode:
        for B in (1, 8):
            for split in SPLITS:
                out.append(("ours-decode", f"decode-B{B}", 128, split, None))
            out.append(("torch-compile-decode", f"decode-B{B}", 128, None, None))
    return out


def setup(kind, mask, D, seqlen=S):
    dtype = torch.bfloat16
    if kind.endswith("decode"):
        B = int(mask.split("B")[1])
        shape = bench.Shape(B, 32, 8, 1, 32768, 128)
        score_mod, block_mask = None, None
        grad = False
    else:
        shape = bench.train_shape(mask, seqlen, D, "cuda")
        score_mod, block_mask = bench.attention_args(mask, shape, "cuda")
        grad = kind != "ours-fwd"
    q, k, v, do = bench.make_inputs(shape, dtype, "cuda", 0, grad)
    return shape, score_mod, block_mask, q, k, v, do


def make_fn(kind, cfg, shape, score_mod, block_mask):
    import kernels

    gqa = shape.Hq != shape.Hkv
    if kind.startswith("torch-compile"):
        prep = bench._torch_flex(None)
        case = bench.Case("decode" if kind.endswith("decode") else "x", shape, torch.bfloat16)
        return prep(case, score_mod, block_mask)
    if kind == "ours-fwd":
        opts = fwd_options(cfg)
    elif kind == "ours-bwd":
        opts = bwd_options(cfg)
    else:
        opts = {} if cfg is None else {"SPLIT_KV": cfg}

    def fn(q, k, v):
        return kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                      return_lse=True, kernel_options=opts)
    return fn


def compile_one(task):
    kind, mask, D, cfg, seqlen = task
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape, score_mod, block_mask, q, k, v, do = setup(kind, mask, D, seqlen)
            fn = make_fn(kind, cfg, shape, score_mod, block_mask)
            out, lse = fn(q, k, v)
            if do is not None:
                torch.autograd.grad(out, (q, k, v), do)
            torch.cuda.synchronize()
        return task, time.perf_counter() - t0, None
    except Exception as exc:  # reported, and the config is left out of the timing
        return task, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:300]}"


def _no_donated_buffers():
    # The backward is timed with retain_graph=True, which donated buffers forbid.
    import torch._functorch.config as fconfig

    if hasattr(fconfig, "donated_buffer"):
        fconfig.donated_buffer = False


def _init_worker():
    _no_donated_buffers()
    torch.cuda.init()


def time_one(task, density_cache):
    from triton.testing import do_bench

    kind, mask, D, cfg, seqlen = task
    shape, score_mod, block_mask, q, k, v, do = setup(kind, mask, D, seqlen)
    fn = make_fn(kind, cfg, shape, score_mod, block_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = fn(q, k, v)
        row = {"kind": kind, "mask": mask, "D": D, "S": seqlen, "cfg": cfg}
        if kind.endswith("decode"):
            ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
            row["fwd_ms"] = ms
            row["kv_tbs"] = bench.kv_bytes(shape, q.dtype) / (ms * 1e-3) / 1e12
            return row, out.float()
        key = (mask, D, seqlen)
        if key not in density_cache:
            density_cache[key] = bench.allowed_fraction(block_mask, shape) if block_mask is not None else 1.0
        flops = bench.forward_flops(shape, density_cache[key])
        with torch.no_grad():
            ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
        row["fwd_ms"], row["fwd_tflops"] = ms, flops / (ms * 1e-3) / 1e12
        if do is not None:
            def bwd():
                torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
            bms = do_bench(bwd, warmup=25, rep=100, return_mode="median")
            row["bwd_ms"], row["bwd_tflops"] = bms, 2.5 * flops / (bms * 1e-3) / 1e12
        return row, out.float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--masks", default="none,causal,document,softcap")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--seqlens", type=bench._parse_lengths, default=(S,),
                   help=f"training sequence lengths, e.g. 1k,16k (default {S}; B*S stays 16k tokens)")
    p.add_argument("--decode", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--fwd-tiles", default=None, metavar="M,N,W,S/...",
                   help="forward configs to time at every head dim, in place of FWD's lists")
    p.add_argument("--bwd-tiles", default=None, metavar="M1,N1,M2,N2,W,S/...",
                   help="backward configs to time at every head dim, in place of BWD's lists")
    args = p.parse_args(argv)
    for flag, table, width in ((args.fwd_tiles, FWD, 4), (args.bwd_tiles, BWD, 6)):
        if flag is not None:
            try:
                cfgs = [tuple(int(x) for x in c.split(",")) for c in flag.split("/") if c]
            except ValueError:
                cfgs = []
            if not cfgs or any(len(c) != width for c in cfgs):
                p.error(f"expected configs of {width} integers separated by '/', got {flag!r}")
            for D in list(table):
                table[D] = cfgs
    masks = [] if args.no_train else [m for m in args.masks.split(",") if m]
    head_dims = [int(d) for d in args.head_dims.split(",")]
    todo = tasks(masks, head_dims, args.decode, args.seqlens)
    _no_donated_buffers()
    t0 = time.perf_counter()
    errors = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_init_worker) as pool:
        for task, secs, err in pool.imap_unordered(compile_one, todo):
            if err:
                errors[task] = err
                print(f"compile {task}: {err}", file=sys.stderr, flush=True)
    print(f"compiled {len(todo)} tasks in {time.perf_counter() - t0:.0f} s with {args.jobs} processes",
          file=sys.stderr, flush=True)

    rows, density, reference = [], {}, {}
    for task in todo:
        if task in errors:
            rows.append({"kind": task[0], "mask": task[1], "D": task[2], "S": task[4], "cfg": task[3],
                         "error": errors[task]})
            continue
        try:
            row, out = time_one(task, density)
        except Exception as exc:
            rows.append({"kind": task[0], "mask": task[1], "D": task[2], "S": task[4], "cfg": task[3],
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        ref_key = (task[1], task[2], task[4])
        if task[0].startswith("ours"):
            if ref_key not in reference:
                reference[ref_key] = out
            else:
                err = (out - reference[ref_key]).abs().max().item()
                row["max_diff_vs_first"] = err
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del out
        torch.cuda.empty_cache()

    print()
    print(f"{'kind':<22}{'case':<16}{'config':<34}{'fwd ms':>8}{'fwd TF':>8}{'bwd ms':>8}{'bwd TF':>8}{'TB/s':>7}")
    for r in rows:
        cfg = "-" if r["cfg"] is None else str(r["cfg"])
        case = f"{r['mask']} D{r['D']}" + (f" S{r['S']}" if r.get("S") not in (None, S) else "")
        if "error" in r:
            print(f"{r['kind']:<22}{case:<16}{cfg:<34} ERROR {r['error'][:60]}")
            continue
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['kind']:<22}{case:<16}{cfg:<34}{f('fwd_ms', '8.3f')}{f('fwd_tflops', '8.1f')}"
              f"{f('bwd_ms', '8.3f')}{f('bwd_tflops', '8.1f')}{f('kv_tbs', '7.2f')}")
    path = args.json or os.path.join(os.environ.get("OUT", "."), "sweep.json")
    with open(path, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
