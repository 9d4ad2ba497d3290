"""Per-kernel GPU time of one training step (forward + backward), ours beside torch.compile.

    PYTHONPATH=. python3 benchmarks/kernel_times.py [--masks none,causal] [--head-dims 128] [--seqlen 4k]
                                                    [--iters 10] [--impls ours,ours-fused,torch-compile]

Where ``bench.py`` says how long a backward takes, this says which kernel took it: each
implementation runs ``--iters`` steps of the bench's shapes and mods under ``torch.profiler``
and the table lists every CUDA kernel's mean time per step (and the step's wall time between
synchronisations, which also holds the gaps between kernels). Not a benchmark of record:
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


def profile_impl(name: str, case, iters: int) -> tuple:
    """(per-kernel mean ms per step, mean wall ms per step) for one implementation."""
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
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - begin) * 1e3 / iters
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None)
        if cuda_us is None:
            cuda_us = getattr(evt, "cuda_time_total", 0.0)
        if cuda_us and evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.key] += cuda_us / 1e3 / iters
    return dict(times), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--masks", default="none,causal")
    p.add_argument("--head-dims", default="128")
    p.add_argument("--seqlen", default="4k")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--impls", default="ours,ours-fused,torch-compile")
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
                        times, wall = profile_impl(name, case, args.iters)
                    except Exception as exc:  # report and go on with the next
                        print(f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                        continue
                total = sum(times.values())
                print(f"  {name}: wall {wall:.3f} ms/step, kernels {total:.3f} ms")
                for key, ms in sorted(times.items(), key=lambda t: -t[1])[:8]:
                    print(f"    {ms:8.3f} ms  {key[:100]}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
