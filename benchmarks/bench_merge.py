"""One record from several bench.py runs: the whole matrix does not fit one device call.

    python benchmarks/bench_merge.py 4k.json 16k.json 1k.json --json merged.json

Each part is a ``bench.py`` JSON. The parts must come from one kind of GPU (or all from the CPU
dry run), one torch and Triton, one dtype and one pace: a ratio is always measured within one
run, but a geomean over parts timed on different cards or paces would mix what they measure, so
such parts are refused with the field that differs. A case timed in two parts is refused too
(name the part to keep by leaving the other out). The cases are put in the matrix's run order
(``bench.build_matrix``), the summary is computed afresh over all of them (``bench.summarize``:
geomeans, minimum, document and softcap rows, decode), and the matrix's cases that no part timed
are listed, so a record says how complete it is, with the bench.py commands that would time them
(``bench.rerun_commands``, with the first part's other options). Parts that timed different
kernels (bench.py's ``kernels_digest``, a hash of kernels/'s sources) are merged with a warning
that names them. The merged JSON keeps each part's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import bench  # noqa: E402

# What every part must share; each is a field of bench.environment().
SAME = ("gpu", "device", "torch", "triton", "dtype", "pace")


def load_parts(paths: list) -> list:
    parts = []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read bench.py JSON {path!r}: {e}")
        if not isinstance(doc, dict) or not isinstance(doc.get("environment"), dict) or "cases" not in doc:
            raise SystemExit(f"error: {path!r} is not a bench.py JSON (no environment and cases)")
        parts.append((path, doc))
    if not parts:
        raise SystemExit("error: expected at least one bench.py JSON")
    return parts


def check_compatible(parts: list) -> None:
    """Refuse parts that differ in any SAME field, naming the field, the files and the values."""
    first_path, first = parts[0]
    for path, doc in parts[1:]:
        for key in SAME:
            a, b = first["environment"].get(key), doc["environment"].get(key)
            if a != b:
                raise SystemExit(
                    f"error: {first_path!r} and {path!r} differ in {key}: {a!r} against {b!r}. "
                    f"Merge only runs of one GPU kind, versions, dtype and pace; rerun the part that differs."
                )


def merge_cases(parts: list) -> list:
    """Every part's cases, each case id once (a second timing of one case is refused)."""
    seen: dict = {}
    cases = []
    for path, doc in parts:
        for case in doc["cases"]:
            if case["id"] in seen:
                raise SystemExit(
                    f"error: case {case['id']} is in {seen[case['id']]!r} and in {path!r}. "
                    f"Leave one of the two files out (or rerun without that case)."
                )
            seen[case["id"]] = path
            cases.append(case)
    return cases


def matrix_ids(env: dict) -> list:
    """The ids of bench.py's whole default matrix on this part's device and dtype, in run order."""
    args = SimpleNamespace(dtype=env.get("dtype", "bfloat16"), masks=None, seqlens=None, head_dims=None,
                           decode_seqlens=None, decode_batches=None, decode_only=False, no_decode=False,
                           quick=False)
    return [c.id for c in bench.build_matrix(args, "cpu" if env.get("device") == "cpu" else "cuda")]


def merge(paths: list) -> dict:
    parts = load_parts(paths)
    check_compatible(parts)
    cases = merge_cases(parts)
    env = parts[0][1]["environment"]
    order = {cid: k for k, cid in enumerate(matrix_ids(env))}
    cases.sort(key=lambda c: order.get(c["id"], len(order)))
    ceilings = env.get("ceilings") or {}
    timed = {c["id"] for c in cases}
    not_started = [cid for path, doc in parts for cid in doc.get("not_started") or [] if cid not in timed]
    return {
        "parts": [{"path": path, "environment": doc["environment"], "cases": [c["id"] for c in doc["cases"]]}
                  for path, doc in parts],
        "environment": env,
        "cases": cases,
        "not_started": not_started,
        "kernels_digests": sorted({str(doc["environment"].get("kernels_digest")) for _, doc in parts}),
        "matrix_cases": len(order),
        "missing_from_matrix": [cid for cid in order if cid not in timed],
        "summary": bench.summarize(cases, ceilings),
    }


def report(doc: dict) -> str:
    cases, env = doc["cases"], doc["environment"]
    lines = [bench.format_table(cases)]
    ratio_table = bench.format_ratios(cases)
    if ratio_table:
        lines.append("\nOurs against each peer (peer time / our time; above 1: ours is faster):\n" + ratio_table)
    notes = bench.format_notes(cases)
    if notes:
        lines.append("\nNotes:\n" + notes)
    lines.append("\n" + bench.format_summary(doc["summary"], env.get("ceilings") or {}))
    missing = doc["missing_from_matrix"]
    lines.append(f"\n{len(doc['parts'])} parts, {len(cases)} cases on {env.get('gpu') or 'cpu'} "
                 f"({env.get('dtype')}, {env.get('pace')} pace; torch {env.get('torch')}, triton {env.get('triton')})")
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing) - 6} more in the JSON)" if len(missing) > 6 else "")
        lines.append(f"Not in any part: {len(missing)} of the matrix's {doc['matrix_cases']} cases: {shown}")
        argv = (env.get("argv") or [None])[1:]
        lines.append(bench.rerun_hint(missing, argv, "cpu" if env.get("device") == "cpu" else "cuda"))
    else:
        lines.append("Every case of the default matrix is in the parts.")
    if len(doc["kernels_digests"]) > 1:
        lines.append(f"warning: the parts timed {len(doc['kernels_digests'])} different versions of kernels/ "
                     f"(kernels_digest; None: a part from before bench.py recorded it): the record mixes them")
    for part in doc["parts"]:
        lines.append(f"  {part['path']}: {len(part['cases'])} cases, kernels "
                     f"{part['environment'].get('kernels_digest')}; {part['environment'].get('command', '')}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_merge", description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", help="bench.py JSON files")
    p.add_argument("--json", default=None, help="write the merged record here")
    args = p.parse_args(argv)
    doc = merge(args.parts)
    print(report(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"JSON: {args.json}")
    return 1 if doc["summary"]["failed_or_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
