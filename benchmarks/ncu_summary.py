"""Where each kernel's warps waited, from the SASS page that ``benchmarks/ncu_stalls.sh`` writes.

    python3 benchmarks/ncu_summary.py OUT/document-4k-d128.txt [--top 20] [--kernels dkdv_kernel]

ncu samples every warp's state at a fixed interval; each sample names the reason the warp did
not issue (or ``selected`` when it did). Per kernel this prints the samples' share by reason, then
its samples by region (each loop: the instructions between a backward branch and its target;
the code before, between and after them: prologues, epilogues), then the instructions with
the most samples and the reasons behind them. A sample sits on the
instruction that waits, not on the one it waits for: a ``long_sb`` (long scoreboard: a global or
local memory load) or ``wait`` stall is charged to the consumer of the value.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import Counter


def parse(text: str) -> dict:
    """{kernel: [row dict, ...]} from the CSV block after ``==== SASS with stall samples``."""
    block = text.split("==== SASS with stall samples", 1)[-1]
    kernels, name, header = {}, None, None
    for row in csv.reader(io.StringIO(block)):
        if not row:
            continue
        if row[0] == "Kernel Name":
            name, header = row[1], None
            kernels[name] = []
        elif row[0] == "Address":
            header = row
        elif header is not None and name is not None:
            kernels[name].append(dict(zip(header, row)))
    return kernels


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except (TypeError, ValueError):
        return 0.0


def reasons(row: dict) -> Counter:
    """The row's samples by stall reason (all samples, issued or not)."""
    return Counter({k[len("stall_"):]: _num(v) for k, v in row.items()
                    if k.startswith("stall_") and "(Not Issued)" not in k and _num(v)})


def regions(rows: list) -> list:
    """[(label, rows)] in address order: each loop (a backward branch's target up to the branch)
    and the code before, between and after the loops."""
    addr = [int(r.get("Address", "0"), 16) for r in rows]
    loops = []
    for row, a in zip(rows, addr):
        m = re.search(r"BRA (0x[0-9a-f]+)", row.get("Source", ""))
        if m and int(m.group(1), 16) < a:
            loops.append((int(m.group(1), 16), a))
    loops.sort()
    spans, start = [], min(addr, default=0)
    for k, (lo, hi) in enumerate(loops):
        spans += [("outside loops" if k else "before the loops", start, lo - 1), (f"loop {k}", lo, hi)]
        start = hi + 1
    spans.append(("after the loops" if loops else "no loops", start, max(addr, default=0)))
    return [(label, [r for r, a in zip(rows, addr) if lo <= a <= hi]) for label, lo, hi in spans]


def summary(rows: list, top: int) -> str:
    total = Counter()
    for row in rows:
        total += reasons(row)
    n = sum(total.values()) or 1.0
    out = [f"  {int(n)} samples: " + ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in total.most_common(8))]
    for label, part in regions(rows):
        c = Counter()
        for row in part:
            c += reasons(row)
        t = sum(c.values())
        if t:
            out.append(f"  {label:16s} {len(part):5d} instrs {100 * t / n:5.1f}% of samples: "
                       + ", ".join(f"{k} {100 * v / t:.0f}%" for k, v in c.most_common(5)))
    ranked = sorted(rows, key=lambda r: -sum(reasons(r).values()))[:top]
    for row in ranked:
        r = reasons(row)
        s = sum(r.values())
        why = ", ".join(f"{k} {int(v)}" for k, v in r.most_common(3))
        out.append(f"  {100 * s / n:5.1f}%  {row.get('Address', ''):>8s}  {row.get('Source', '')[:64]:64s}  {why}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    args = p.parse_args(argv)
    with open(args.path) as f:
        kernels = parse(f.read())
    wanted = set(filter(None, args.kernels.split(",")))
    for name, rows in kernels.items():
        if wanted and name not in wanted:
            continue
        print(f"== {name}")
        print(summary(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
