"""A/B: our kernels at other git revisions against the working tree, side by side in one process.

    PYTHONPATH=. python3 benchmarks/ab.py --against HEAD --cases none:4k:128,causal:4k:64
    PYTHONPATH=. python3 benchmarks/ab.py --against HEAD~3,HEAD --cases gqa_causal:4k:128 --rounds 5 --prewarm-jobs 8
    PYTHONPATH=. python3 benchmarks/ab.py --options s4:bwd_num_stages=4 --options n128:bwd_BLOCK_N2=128,bwd_num_stages=2 \
        --cases none:1k:128,causal:1k:128
    python3 benchmarks/ab.py --device cpu --against HEAD --cases causal:256:64 --rounds 1   # dry run

``bench.py`` compares us with PyTorch, one implementation after another, and between two of
its runs the same kernel moved by several percent on the H200 (and single measurements by up
to half at S=1k). A change to our kernels is better judged against the kernels it replaces,
measured on the same inputs, interleaved, in one process: this loads ``kernels/`` as it was at
each ``--against`` revision (``git show``, into a temporary package that shares the working
tree's ``kernels.mods``, as ``properties.faults`` plants its copies) beside the working tree's,
and times forward and backward alone in ``--rounds`` rounds, the variants' order reversed
every other round, with ``bench.py``'s shapes, mods, rotating input sets and timed calls
(``bench.time_impl``); each time is the median round (``bench.merge_rounds``). It also prints how far each variant's outputs are from the working tree's (max |a - b| /
max |b| for out, dq, dk, dv): 0 where a change does not touch the rounding. It checks nothing
against the oracle (``bench.py`` does): it answers "faster or not", not "right or not".

``--options NAME:KEY=VALUE,...`` (repeatable) adds the working tree's kernels called with those
``kernel_options`` as a variant of its own, named NAME: a launch config, a tile or a flag
judged the same way, where ``sweep.py`` times each config once. The variants run in the order
revisions, options, then the working tree with its defaults (the diffs' reference); the
speedups are against the first.

A revision whose ``kernels/mods.py`` differs from the working tree's cannot take the working
tree's mods objects and is refused with that reason.

``--set NAME:MODULE.ATTR=VALUE;...`` (repeatable) adds the working tree's kernels with module
attributes of ``kernels`` set around the variant's calls (values are Python literals: ``--set
'st4:api.SHORT_ROWS_FWD=(64, 64, 4, 4)'``, ``--set 'rows32:backward.DELTA_ROWS=32'``): a rule or a
constant judged as ``--options`` judges a kernel option. The attributes are set while the
forward and the timed backward run (the flags the backward reads at its own call, such as
``backward.DELTA_ROWS``, included), and restored after each call.

``--prewarm-jobs N`` first calls every (case, variant) once in N spawned processes, so that the
timed run finds Triton's disk cache warm (on the H200: 20 forward variants in 19 s with 16
processes, 18 forward + backward variants in 22 s). On CUDA each case also records the SM clock
while it was timed (``benchmarks/gpu_clocks.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

TREE = "tree"  # the working tree's kernels


def _git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"ab: git {' '.join(args)} failed: {run.stderr.strip() or run.stdout.strip()}")
    return run.stdout


def load_revision(rev: str, index: int):
    """``kernels`` as it was at ``rev``, as a package of its own (kept on disk for the process:
    Triton reads the jitted functions' source from their files; ``properties.faults.load_copy``)."""
    from properties.faults import load_copy

    names = [p for p in _git("ls-tree", "--full-tree", "--name-only", f"{rev}:kernels").split() if p.endswith(".py")]
    if "api.py" not in names:
        raise SystemExit(f"ab: {rev} has no kernels/api.py; pass a revision of this repository's kernels")
    mods_then = _git("show", f"{rev}:kernels/mods.py") if "mods.py" in names else ""
    with open(os.path.join(ROOT, "kernels", "mods.py"), encoding="utf-8") as f:
        if mods_then != f.read():
            raise SystemExit(f"ab: kernels/mods.py at {rev} differs from the working tree's; the copies share "
                             f"the working tree's mods, so {rev} cannot be loaded beside it")
    sources = {name[:-3]: _git("show", f"{rev}:kernels/{name}") for name in names
               if name not in ("mods.py", "__init__.py")}
    return load_copy(f"flex_oracle_ab_{index}", sources,
                     f'"""kernels at {rev} (benchmarks/ab.py). A copy."""\n\nfrom . import mods\n'
                     f'from .api import flex_attention\n', tmp_prefix=f"flex-oracle-ab-{index}-")


def parse_cases(text: str, device: str) -> list:
    """``MASK:S:D,...`` (S takes 1k, 4k, 16384) as (label, bench Shape, mask) triples."""
    from benchmarks import bench

    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3:
            raise SystemExit(f"ab: --cases wants MASK:S:D items, got {item!r}")
        mask, S, D = parts
        if mask not in bench.MASKS:
            raise SystemExit(f"ab: unknown mask row {mask!r}; the rows are {', '.join(bench.MASKS)}")
        try:
            S, D = bench._parse_lengths(S)[0], int(D)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise SystemExit(f"ab: bad length or head dim in {item!r}: {e}")
        shape = bench.train_shape(mask, S, D, device)  # the CPU's tiny shape on the CPU
        out.append((f"{mask} {shape.label()}", shape, mask))
    return out


def parse_options(items: list) -> list:
    """``NAME:KEY=VALUE,...`` items as (name, kernel_options) pairs; values as in
    ``benchmarks/codegen.py --options`` (integers, true / false)."""
    from benchmarks.codegen import _parse_options

    out, seen = [], {TREE}
    for item in items:
        name, sep, text = item.partition(":")
        if not sep or not name or not text:
            raise SystemExit(f"ab: --options wants NAME:KEY=VALUE,..., got {item!r}")
        if name in seen:
            raise SystemExit(f"ab: --options names must differ from each other and from {TREE!r}, got {name!r} twice")
        seen.add(name)
        out.append((name, _parse_options(text)))
    return out


def parse_sets(items: list, taken: set) -> list:
    """``NAME:MODULE.ATTR=VALUE;...`` items as (name, [(module name, attr, value)]) pairs; each
    MODULE a module of ``kernels`` that has ATTR, each VALUE a Python literal. ``taken``: the
    names the other variants have."""
    import ast
    import importlib

    out, seen = [], set(taken)
    for item in items:
        name, sep, text = item.partition(":")
        if not sep or not name or not text:
            raise SystemExit(f"ab: --set wants NAME:MODULE.ATTR=VALUE;..., got {item!r}")
        if name in seen:
            raise SystemExit(f"ab: --set names must differ from each other, from --options and from {TREE!r}, "
                             f"got {name!r} twice")
        seen.add(name)
        settings = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            target, eq, value = part.partition("=")
            module, dot, attr = target.strip().rpartition(".")
            if not eq or not dot:
                raise SystemExit(f"ab: --set wants MODULE.ATTR=VALUE, got {part!r} in {item!r}")
            try:
                mod = importlib.import_module(f"kernels.{module}")
            except ImportError:
                raise SystemExit(f"ab: --set: no module kernels.{module} (in {item!r})")
            if not hasattr(mod, attr):
                raise SystemExit(f"ab: --set: kernels.{module} has no attribute {attr!r} (in {item!r})")
            try:
                settings.append((module, attr, ast.literal_eval(value.strip())))
            except (ValueError, SyntaxError):
                raise SystemExit(f"ab: --set: {value.strip()!r} is not a Python literal (in {item!r})")
        if not settings:
            raise SystemExit(f"ab: --set {item!r} sets nothing")
        out.append((name, settings))
    return out


class _Setting:
    """``kernels`` module attributes set for the duration of a ``with`` block."""

    def __init__(self, settings):
        import importlib

        self.settings_spec = list(settings)
        self.settings = [(importlib.import_module(f"kernels.{m}"), a, v) for m, a, v in settings]

    def __enter__(self):
        self.before = [getattr(mod, a) for mod, a, _ in self.settings]
        for mod, a, v in self.settings:
            setattr(mod, a, v)

    def __exit__(self, *exc):
        for (mod, a, _), old in zip(self.settings, self.before):
            setattr(mod, a, old)


def _set_around(fn, setting: "_Setting"):
    """``fn`` with ``setting`` in force while it runs and while its output's backward runs: an
    identity on the output whose backward enters it, and one on q, k, v whose backward (the
    graph's last) leaves it."""

    class Enter(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            setting.__enter__()
            return grad

    class Leave(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return q.view_as(q), k.view_as(k), v.view_as(v)

        @staticmethod
        def backward(ctx, dq, dk, dv):
            setting.__exit__(None, None, None)
            return dq, dk, dv

    def wrapped(q, k, v):
        with setting:
            q2, k2, v2 = Leave.apply(q, k, v) if torch.is_grad_enabled() else (q, k, v)
            out = fn(q2, k2, v2)
        return Enter.apply(out) if out.requires_grad else out
    return wrapped


def _rel(a, b) -> float:
    scale = b.float().abs().max()
    return float((a.float() - b.float()).abs().max() / scale) if scale > 0 else float((a - b).abs().max())


def run_case(label, shape, mask, variants, args, device, time_fn) -> dict:
    """Every variant on one case: outputs compared on the first input set, then ``--rounds``
    rounds of ``bench.time_impl`` (bench.py's timed calls, rotating over its input sets),
    merged as bench.py merges its rounds (``bench.merge_rounds``)."""
    from benchmarks import bench

    score_mod, block_mask = bench.attention_args(mask, shape, device, args.seed)
    density = bench.allowed_fraction(block_mask, shape)
    fwd_flops = bench.forward_flops(shape, density)
    sets = bench.input_sets(shape, bench.DTYPES[args.dtype], device, args.seed, True)
    gqa = shape.Hq != shape.Hkv

    def bound(module, options):
        def fn(q, k, v):
            out = module.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                        kernel_options=options, **({"return_lse": True} if args.lse else {}))
            return out[0] if args.lse else out
        return fn

    fns = {name: bound(module, options) if not isinstance(options, _Setting) else
           _set_around(bound(module, None), options) for name, module, options in variants}
    q, k, v, do = sets[0]
    outputs = {}
    for name, fn in fns.items():
        out = fn(q, k, v)
        outputs[name] = (out.detach(), *torch.autograd.grad(out, (q, k, v), do))
    last = variants[-1][0]
    diffs = {name: [_rel(a, b) for a, b in zip(outputs[name], outputs[last])] for name in fns}

    rounds = {name: [] for name in fns}
    t_rounds = time.monotonic()
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            rounds[name].append(bench.time_impl(fns[name], sets, time_fn, not args.forward_only))
    clocks = getattr(args, "clocks", None)
    window = clocks.window(t_rounds, time.monotonic()) if clocks is not None else None
    rows = []
    for name in fns:
        row = {"variant": name, "diffs_out_dq_dk_dv": diffs[name], **bench.merge_rounds(rounds[name])}
        row["fwd_tflops"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
        if "bwd_ms" in row:
            row["bwd_tflops"] = bench.BACKWARD_FLOP_FACTOR * fwd_flops / (row["bwd_ms"] * 1e-3) / 1e12
        rows.append(row)
    for row in rows:
        for key in ("fwd", "bwd"):
            if f"{key}_ms" in row:
                row[f"{key}_speedup"] = rows[0][f"{key}_ms"] / row[f"{key}_ms"]
    return {"case": label, "shape": dataclasses.asdict(shape), "density": density, "variants": rows,
            "gpu_clocks": window}


def _prewarm_one(task) -> tuple:
    """One (case, variant)'s forward and backward, called once on the first input set, in a
    process of its own: the compiles land in Triton's disk cache and nothing is kept. A
    revision loads under the package name the timed run gives it (``load_revision``'s index)."""
    item, spec, device, dtype, seed, forward_only, lse = task
    t0 = time.monotonic()
    try:
        if device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from benchmarks import bench
        import kernels

        bench._DEVICE[0] = device
        ((_, shape, mask),) = parse_cases(item, device)
        kind, what, index = spec
        module = load_revision(what, index) if kind == "rev" else kernels
        options = what if kind == "options" else None
        setting = _Setting(what) if kind == "set" else None
        if setting is not None:
            setting.__enter__()
        score_mod, block_mask = bench.attention_args(mask, shape, device, seed)
        q, k, v, do = bench.input_sets(shape, bench.DTYPES[dtype], device, seed, True)[0]
        out = module.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                    enable_gqa=shape.Hq != shape.Hkv, kernel_options=options,
                                    **({"return_lse": True} if lse else {}))
        out = out[0] if lse else out
        if not forward_only:
            torch.autograd.grad(out, (q, k, v), do)
        if device == "cuda":
            torch.cuda.synchronize()
        if setting is not None:
            setting.__exit__(None, None, None)
        return task, time.monotonic() - t0, None
    except BaseException as e:  # noqa: BLE001 - the timed run raises it properly
        return task, time.monotonic() - t0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def prewarm(cases_text: str, specs: list, device: str, args, jobs: int) -> list:
    """``_prewarm_one`` for every case and variant in ``jobs`` spawned processes
    (``bench.run_prewarm``); returns the errors, which are printed and left for the timed run
    to raise."""
    from benchmarks import bench

    tasks = [(item, spec, device, args.dtype, args.seed, args.forward_only, args.lse)
             for item in filter(None, cases_text.split(",")) for spec in specs]
    return bench.run_prewarm(_prewarm_one, tasks, jobs, lambda msg: print(msg, flush=True),
                             lambda task: f"{task[0]} {task[1][0]} {task[1][1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="", help="comma-separated git revisions to load beside the working tree")
    p.add_argument("--options", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="the working tree's kernels with these kernel_options, as a variant named NAME (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="NAME:MODULE.ATTR=VALUE;...",
                   help="the working tree's kernels with these kernels.MODULE attributes set around its calls "
                        "(Python literals), as a variant named NAME (repeatable)")
    p.add_argument("--cases", required=True, help="comma-separated MASK:S:D (bench.py's rows and shapes)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each time is the median round")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-only", action="store_true", help="no backward timings")
    p.add_argument("--lse", action="store_true",
                   help="every call also returns the LSE, as bench.py's ours (the exact mods: the softcap's rational)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--pace", choices=("host", "gpu"), default="host", help="as bench.py's --pace")
    p.add_argument("--json", default=None, help="results file (default $OUT/ab.json if OUT is set)")
    p.add_argument("--prewarm-jobs", type=int, default=0, metavar="N",
                   help="first compile every (case, variant) in N processes, so that the timed run finds "
                        "Triton's disk cache warm (as bench.py's); 0, the default: compile in the first call")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"ab: --rounds must be at least 1, got {args.rounds}")
    revs = [r for r in args.against.split(",") if r]
    if not revs and not args.options and not args.sets:
        raise SystemExit("ab: nothing to compare: give --against REV[,REV], --options NAME:KEY=VALUE,... "
                         "or --set NAME:MODULE.ATTR=VALUE;...")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks import bench

    bench._DEVICE[0] = device
    if args.dtype not in bench.DTYPES:
        raise SystemExit(f"ab: --dtype must be one of {sorted(bench.DTYPES)}, got {args.dtype!r}")
    import kernels

    cases = parse_cases(args.cases, device)
    variants = [(f"{rev} ({_git('rev-parse', '--short', rev).strip()})", load_revision(rev, i), None)
                for i, rev in enumerate(revs)]
    options = parse_options(args.options)
    sets = parse_sets(args.sets, {TREE} | {name for name, _ in options})
    variants += [(name, kernels, opts) for name, opts in options]
    variants += [(name, kernels, _Setting(settings)) for name, settings in sets]
    dirty = bool(revs) and bool(_git("status", "--porcelain", "--", "kernels").strip())
    variants.append((TREE + (" (modified)" if dirty else ""), kernels, None))
    if args.prewarm_jobs < 0:
        raise SystemExit(f"ab: --prewarm-jobs must be at least 0, got {args.prewarm_jobs}")
    if args.prewarm_jobs:
        specs = [("rev", rev, i) for i, rev in enumerate(revs)]
        specs += [("options", opts, None) for _, opts in options]
        specs += [("set", settings, None) for _, settings in sets] + [("tree", None, None)]
        prewarm(args.cases, specs, device, args, args.prewarm_jobs)
    time_fn = bench.timer(device, args.warmup_ms, args.rep_ms, 3, args.pace)
    args.clocks = None
    if device == "cuda":  # the SM clock while each case is timed (benchmarks/gpu_clocks.py)
        args.clocks = bench.start_clock_sampler()
        print(f"clock sampler: {', '.join(args.clocks.fields) if args.clocks.available else args.clocks.error}")
    try:
        return _run(cases, variants, args, device, time_fn)
    finally:
        if args.clocks is not None:
            args.clocks.stop()


def _run(cases, variants, args, device, time_fn) -> int:
    from benchmarks.gpu_clocks import describe

    results = []
    print(f"A/B on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: {', '.join(v[0] for v in variants)}; "
          f"{args.rounds} interleaved rounds, median round, {args.pace} pace{', with the LSE' if args.lse else ''}; "
          f"speedup against {variants[0][0]}")
    print(f"{'case':30s} {'variant':24s} {'fwd ms':>8s} {'TF/s':>6s} {'x':>6s} {'bwd ms':>8s} {'TF/s':>6s} {'x':>6s}  diffs to the tree (out, dq, dk, dv)")
    t0 = time.monotonic()
    for label, shape, mask in cases:
        res = run_case(label, shape, mask, variants, args, device, time_fn)
        results.append(res)
        for row in res["variants"]:
            cols = []
            for key in ("fwd", "bwd"):
                if f"{key}_ms" in row:
                    cols.append(f"{row[key + '_ms']:8.3f} {row[key + '_tflops']:6.1f} {row[key + '_speedup']:6.3f}")
                else:
                    cols.append(f"{'-':>8s} {'-':>6s} {'-':>6s}")
            diffs = " ".join(f"{d:.1e}" for d in row["diffs_out_dq_dk_dv"])
            print(f"{label:30s} {row['variant'][:24]:24s} {cols[0]} {cols[1]}  {diffs}", flush=True)
        if args.clocks is not None and args.clocks.available:
            print(f"{label:30s} while timing: {describe(res['gpu_clocks'])}", flush=True)
    path = args.json or (os.path.join(os.environ["OUT"], "ab.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump({"variants": [v[0] for v in variants],
                       "options": {v[0]: v[2] for v in variants if v[2] and not isinstance(v[2], _Setting)},
                       "sets": {v[0]: [f"{m}.{a}={val!r}" for m, a, val in v[2].settings_spec]
                                for v in variants if isinstance(v[2], _Setting)},
                       "rounds": args.rounds, "device": device, "lse": args.lse,
                       "clock_sampler": (list(args.clocks.fields) if args.clocks.available else args.clocks.error)
                       if args.clocks is not None else None,
                       "argv": sys.argv, "seconds": time.monotonic() - t0, "cases": results}, f, indent=1)
        print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
