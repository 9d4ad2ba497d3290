"""How often the fault hunts' cases trigger each planted fault: the rate behind a fault table.

    python benchmarks/trigger_rates.py --faults fwd_masked_row_div0,decode_gqa_interleaved \
                                       [--seeds 0-3] [--device cpu] [--jobs 2] [--json PATH]

What it is for: ``flex-oracle fault run`` stops each hunt at its first failure, so a
table says only whether the budget's cases held a trigger, not how many did. A hunt of
seed s draws the same cases whatever fault is planted (until one fails), so the table is
a function of the strategies: a fault whose trigger comes in fewer than about 1 case in
10 survives a 25-case hunt by luck (0.9 ** 25 = 7 %), and any change to the strategies
moves it (docs/FAULTS.md). This tool redraws the cases the hunts of the given seeds draw
(``examples`` cases each, a new Hypothesis run every ``HUNT_RESTART_EVERY``) and checks
every one against every named fault, as a hunt does (``matches_oracle``, then the drawn
metamorphic property), without stopping: the rate is the share of cases that fail.
Cases run in the Triton interpreter on a machine without CUDA (seconds each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def hunt_cases(seed: int, examples: int, bounds: str) -> list:
    """The (case, metamorphic extra) pairs a fault hunt of ``seed`` draws, in order."""
    from benchmarks.redraw_case import redraw
    from properties.faults import HUNT_RESTART_EVERY

    return redraw(seed, 1, bounds, examples, restart_every=HUNT_RESTART_EVERY, examples=examples)


def check_fault(name: str, pairs: list, device: str) -> list:
    """For each (case JSON, extra), the first failing outcome of the planted ``name`` as
    ``(property, status)``, or None when the case passes (or does not apply)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import warnings

    from properties.case import FlexCase
    from properties.faults import fault_target, lookup
    from properties.properties import evaluate

    target = fault_target(lookup(name))
    found = []
    for text, extra in pairs:
        case = FlexCase.from_json(text)
        hit = None
        for prop in ("matches_oracle",) + ((extra,) if extra else ()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcome = evaluate(prop, target, case, device)
            if outcome.status in ("failed", "target-error"):
                hit = (outcome.property, outcome.status)
                break
            if not outcome.ok:
                break
        found.append(hit)
    return found


def _seeds(text: str) -> list:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None) -> int:
    from properties.faults import BUDGETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", required=True, help="comma-separated catalogue names")
    p.add_argument("--seeds", default="0-3", help="hunt seeds, e.g. 0-3 or 0,5 (default 0-3; the table's is 0)")
    p.add_argument("--examples", type=int, default=BUDGETS["ci"]["examples"],
                   help=f"cases per hunt (default {BUDGETS['ci']['examples']}, the ci budget's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the kernels run; also the strategy's bounds (default cpu)")
    p.add_argument("--jobs", type=int, default=2, help="processes, one fault at a time each (default 2)")
    p.add_argument("--json", default=None, help="write every case's result here")
    args = p.parse_args(argv)

    from properties.faults import lookup

    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    for n in names:
        lookup(n)  # a clear error for an unknown name, before any drawing
    start = time.perf_counter()
    drawn = {s: hunt_cases(s, args.examples, args.device) for s in _seeds(args.seeds)}
    pairs = [(case.to_json(), extra) for s in drawn for case, extra in drawn[s]]
    print(f"{len(pairs)} cases from hunt seeds {','.join(map(str, drawn))} "
          f"({args.examples} each), drawn in {time.perf_counter() - start:.0f} s", flush=True)
    # spawn, not fork: the parent has run torch (its thread pools) while drawing, and forked
    # workers hung there.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip(names, pool.map(check_fault, names, [pairs] * len(names), [args.device] * len(names))))

    print(f"\n| fault | triggered | rate | first trigger in each hunt (case number or -) |")
    print("| --- | --- | --- | --- |")
    for name in names:
        hits = results[name]
        firsts, k = [], 0
        for s in drawn:
            chunk = hits[k:k + len(drawn[s])]
            k += len(drawn[s])
            firsts.append(next((str(i + 1) for i, h in enumerate(chunk) if h), "-"))
        n_hit = sum(h is not None for h in hits)
        print(f"| {name} | {n_hit} / {len(hits)} | {n_hit / max(1, len(hits)):.2f} | {' '.join(firsts)} |")
    print(f"\n{time.perf_counter() - start:.0f} s in all", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": list(drawn), "examples": args.examples, "device": args.device,
                       "cases": [json.loads(t) for t, _ in pairs], "extras": [x for _, x in pairs],
                       "results": {n: results[n] for n in names}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
