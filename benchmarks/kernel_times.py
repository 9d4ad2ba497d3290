"""Per-kernel GPU time of one training step (forward + backward), ours beside torch.compile.

    PYTHONPATH=. python3 benchmarks/kernel_times.py [--masks none,causal] [--head-dims 128] [--seqlen 4k]
                                                    [--iters 10] [--impls ours,ours-fused,torch-compile]

Where ``bench.py`` says how long a backward takes, this says which kernel took it: each
implementation runs ``--iters`` steps of the bench's shapes and mods under ``torch.profiler``
and the table lists every CUDA kernel's mean time per step (and the step's wall time between
synchronisations, which also holds the gaps between kernels, and the time the GPU ran at least one
kernel: below the kernels' sum where kernels on two streams overlapped). Not a benchmark of record:
the profiler adds a little to each launch, and no input rotation or cache flush is done.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench  # noqa: E402


def busy_ms(intervals) -> float:
    """The time at least one of ``intervals`` ((start, end) pairs) covers: their union's length.
    Kernels on two streams (the backward's dQ and dK/dV kernels, ``kernels.backward.CONCURRENT``)
    that overlap count once here and twice in the kernels' sum."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def profile_impl(name: str, case, iters: int, ncu: bool = False) -> tuple:
    """(per-kernel mean ms per step, mean wall ms per step, mean GPU-busy ms per step) for one
    implementation. With ``ncu``, one step runs between ``cudaProfilerStart`` and ``Stop`` after
    the warm-up and nothing is timed here: run the script under ``ncu --profile-from-start off``
    and ncu sees that step's kernels alone, whatever autotuning or compiling the warm-up did."""
    from torch.profiler import ProfilerActivity, profile

    score_mod, block_mask = bench.attention_args(case.mask, case.shape, "cuda")
    fn = bench.IMPLS[name].prepare(case, score_mod, block_mask)
    q, k, v, do = bench.make_inputs(case.shape, case.dtype, "cuda", 1, True)
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731

    def step():
        out = first(fn(q, k, v))
        torch.autograd.grad(out, (q, k, v), do)

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    if ncu:
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return {}, 0.0, 0.0
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - begin) * 1e3 / iters
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = busy_ms(spans) / 1e3 / iters
    times = defaultdict(float)
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None)
        if cuda_us is None:
            cuda_us = getattr(evt, "cuda_time_total", 0.0)
        if cuda_us and evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.key] += cuda_us / 1e3 / iters
    return dict(times), wall, busy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--masks", default="none,causal")
    p.add_argument("--head-dims", default="128")
    p.add_argument("--seqlen", default="4k")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--impls", default="ours,ours-fused,torch-compile")
    p.add_argument("--ncu", action="store_true",
                   help="run one step after the warm-up inside cudaProfilerStart/Stop and time "
                        "nothing (for ncu --profile-from-start off)")
    args = p.parse_args(argv)
    bench._DEVICE[0] = "cuda"
    S = bench._parse_lengths(args.seqlen)[0]
    for mask in args.masks.split(","):
        for D in bench._parse_ints(args.head_dims):
            case = bench.Case(mask, bench.train_shape(mask, S, D, "cuda"), torch.bfloat16)
            print(f"== {case.label()}")
            for name in args.impls.split(","):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        times, wall, busy = profile_impl(name, case, args.iters, args.ncu)
                    except Exception as exc:  # report and go on with the next
                        print(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                        continue
                if args.ncu:
                    print(f"  {name}: one step profiled for ncu")
                    continue
                total = sum(times.values())
                print(f"  {name}: wall {wall:.3f} ms/step, kernels {total:.3f} ms, GPU busy {busy:.3f} ms "
                      f"(kernels on two streams overlapped {total - busy:.3f} ms)")
                for key, ms in sorted(times.items(), key=lambda t: -t[1])[:8]:
                    print(f"    {ms:8.3f} ms  {key[:100]}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
