"""Where a fuzz case's time goes: Triton compiles, kernel runs, the oracle and the check.

    PYTHONPATH=. python3 benchmarks/fuzz_profile.py [--out DIR] -- [flex-oracle fuzz arguments]

Runs ``flex-oracle fuzz`` in this process under cProfile with a Triton compile
listener installed, then prints the cases run, the compiles (and cache hits) with
their summed time per stage, and the functions with the largest cumulative time.
The GPU false-alarm count is compile-bound (docs/FAULTS.md); this says by how much.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fuzz_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for profile.txt (default: print only)")
    parser.add_argument("--top", type=int, default=45)
    args = parser.parse_args(own)

    import triton

    compiles = collections.Counter()
    seconds = collections.Counter()
    names = collections.Counter()

    def listener(src, metadata, metadata_group, times, cache_hit):
        kind = "hit" if cache_hit else "compile"
        compiles[kind] += 1
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        names[(name, kind)] += 1
        if not cache_hit:
            seconds["ir_initialization"] += times.ir_initialization / 1e6
            for stage, us in times.lowering_stages:
                seconds[stage] += us / 1e6
            seconds["store_results"] += times.store_results / 1e6

    triton.knobs.compilation.listener = listener

    from properties.cli import main as fuzz_main

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    try:
        rc = fuzz_main(["fuzz"] + fuzz_args)
    finally:
        profile.disable()
    wall = time.perf_counter() - started

    out = io.StringIO()
    total_compile = sum(seconds.values())
    print(f"\nwall {wall:.1f} s; Triton: {compiles['compile']} compiles ({total_compile:.1f} s summed), "
          f"{compiles['hit']} disk-cache hits", file=out)
    for stage, s in seconds.most_common():
        print(f"  {stage:<20} {s:8.1f} s", file=out)
    print("compiles by kernel:", file=out)
    for (name, kind), n in sorted(names.items()):
        print(f"  {name:<28} {kind:<8} {n}", file=out)
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(25)
    text = out.getvalue()
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
