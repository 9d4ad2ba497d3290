"""Redraw the cases a `flex-oracle fuzz` process drew, without running any kernel.

    python benchmarks/redraw_case.py --seed 10009 --inputs-per-case 6 --bounds cuda --case 27 [--out case.json]
                                     [--examples 100000] (the process's --examples)
    python benchmarks/redraw_case.py --seed 10009 --inputs-per-case 6 --bounds cuda --list 30

What it is for: a fuzz process on the GPU whose log lost its summary (killed while
shrinking) names a failure only by its count line ("count: 27 cases, ... 1 failed"). The
fuzzer's own loop (``properties.cli._Fuzzer``) runs here with a check that passes every
case, so Hypothesis draws exactly what the process drew up to its first failure (the draws
do not depend on the machine, only on the seed, the bounds and the options below), and the
n-th case, input draws included, is written out to be replayed with ``flex-oracle replay``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def redraw(seed: int, inputs_per_case: int, bounds: str, count: int,
           restart_every: int | None = None, examples: int = 100000) -> list:
    """The first ``count`` (case, metamorphic extra) pairs the fuzz process drew, in its order.
    ``examples`` is the process's ``--examples``: each Hypothesis run's ``max_examples`` comes
    from it (the cases left, at most ``restart_every``), and Hypothesis draws differently for
    another ``max_examples``; so it must be the process's own (the nightly job's 100000), and
    the redraw stops after ``count`` cases instead. (Before this, the redraw ran with
    ``examples=count`` and named a wrong case 27 for seed 10009: docs/FAULTS.md.)"""
    from properties import cli
    from properties.properties import METAMORPHIC, Outcome
    from properties.strategies import flex_cases

    seen = []
    fz = cli._Fuzzer(target=None, device=bounds, strategy=flex_cases(device=bounds), mode="sample",
                     props=("matches_oracle",) + METAMORPHIC, examples=examples, seed=seed, max_seconds=None,
                     shrink_seconds=0, max_failures=1, quiet=True,
                     restart_every=restart_every or cli.DEFAULT_RESTART_EVERY, inputs_per_case=inputs_per_case)

    def passing(case, extra):
        if len(seen) >= count:
            raise cli._Stop()
        seen.append((case, extra))
        return [Outcome("matches_oracle", "passed")] + ([Outcome(extra, "passed")] if extra else [])

    fz.check = passing
    fz.run()
    return seen[:count]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, required=True, help="the fuzz process's --seed")
    p.add_argument("--inputs-per-case", type=int, default=1, help="its --inputs-per-case")
    p.add_argument("--restart-every", type=int, default=None, help="its --restart-every (default the fuzzer's)")
    p.add_argument("--examples", type=int, default=100000,
                   help="its --examples (default 100000, the nightly job's)")
    p.add_argument("--bounds", default="cpu", choices=("cpu", "cuda"), help="the device whose size bounds it drew")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--case", type=int, help="write the n-th case (1-based, as the count lines number them)")
    what.add_argument("--list", type=int, help="print the first n cases, one JSON line each")
    p.add_argument("--out", default=None, help="where --case writes (default: stdout)")
    args = p.parse_args(argv)
    n = args.case or args.list
    drawn = redraw(args.seed, args.inputs_per_case, args.bounds, n, args.restart_every, args.examples)
    if len(drawn) < n:
        print(f"the process drew only {len(drawn)} cases", file=sys.stderr)
        return 1
    if args.list:
        for k, (case, extra) in enumerate(drawn, 1):
            print(k, extra or "-", case.to_json())
        return 0
    case, extra = drawn[n - 1]
    text = case.to_json(indent=2) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(f"case {n}" + (f" (with the metamorphic property {extra})" if extra else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
