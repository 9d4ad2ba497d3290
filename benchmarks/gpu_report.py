"""Worst error per tensor of our kernels against the oracle over the GPU test cases.

    PYTHONPATH=. python3 benchmarks/gpu_report.py

Runs every case of ``tests/test_kernels.py::GPU_CASES`` (the ``gpu`` tests) and
prints, per case and per tensor, the largest error/allowed ratio of
``oracle.compare`` (at most 1 passes) and the absolute error against the
float64 oracle at that element, then the worst of each over all cases.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_kernels as T  # noqa: E402

from kernels import mods  # noqa: E402
from properties import check as C  # noqa: E402


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    worst = {}
    failures = 0
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for case in T.GPU_CASES:
        case = dict(case)
        if case.get("score_mod") is None and case["E"] == 128 and case["L"] > 1:
            case["score_mod"] = mods.bias.from_seed([case["Hq"], case["L"], case["S"]], seed=1,
                                                    requires_grad=True, device=dev)
        label = f"{case['B']}x{case['Hq']}/{case['Hkv']} L={case['L']} S={case['S']} E={case['E']} " \
                f"{str(case['dtype'])[6:]} {case.get('mask_mod')} {case.get('score_mod') or ''}"
        orig = C.compare_with_oracle
        results = {}

        def capture(*a, **kw):
            kw["raise_on_failure"] = False
            results.update(orig(*a, **kw))
            return results

        C.compare_with_oracle = capture
        T.compare_with_oracle = capture
        t0 = time.time()
        try:
            T.check(device=dev, **case)
        finally:
            C.compare_with_oracle = orig
            T.compare_with_oracle = orig
        parts = []
        for name, r in results.items():
            err = r.worst_error if r.worst_error is not None else 0.0
            parts.append(f"{name} {err:.2e} ({r.max_ratio:.2f})")
            w = worst.setdefault(name, [0.0, 0.0])
            w[0], w[1] = max(w[0], err), max(w[1], r.max_ratio)
            failures += not r.ok
        print(f"{label}  [{time.time() - t0:.1f}s]\n    " + "  ".join(parts), flush=True)
    print("worst per tensor (max abs error, max error/allowed):")
    for name, (err, ratio) in worst.items():
        print(f"  {name:9s} {err:.3e}  {ratio:.3f}")
    print(f"{failures} tensor comparisons failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
