"""Where a call's time goes: host work against GPU work, for the calls the benchmark times.

    PYTHONPATH=. python3 benchmarks/host_overhead.py [--json PATH] [--only "S1k,decode"] [--no-profile]

For short kernels (document masks, decode steps) ``do_bench``'s median is the
larger of the GPU time and the host time of a call (less the L2 flush that
``do_bench`` enqueues before each call, which hides that much host work). This
prints, per case:

* ``host_us``: wall time per call on tiny shapes, where the GPU work is
  negligible, so the loop runs at the host's pace (median of 5 loops of 200),
  with ``kernels._runtime.DIRECT_LAUNCH`` on and off (for ``bwd`` rows: forward and
  backward), and for ``bwd`` rows ``host_us_bwd``: the backward alone, each call on a graph
  built beforehand (``retain_graph``, as ``bench.py`` times it);
* ``bench_ms``: ``do_bench`` as ``benchmarks/bench.py`` runs it (L2 flush,
  rotating input sets) on the real shapes;
* ``queued_ms``: the GPU time alone (``queued_ms``: the call is enqueued behind a
  long ``torch.cuda._sleep``, so its kernels run back to back);

then a profile of the host's share and a check that the direct launch gives
bitwise the outputs of Triton's own dispatch, on aligned and misaligned inputs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels import _runtime, mods  # noqa: E402


def _inputs(B, Hq, Hkv, L, S, D, grad, n=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(n):
        q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        sets.append(tuple(t.requires_grad_(grad) for t in (q, k, v)))
    return sets


def _document_mask(S, B=1):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mods.document.from_seed(S, 12, 0), 1, 1, S, S, device="cuda")


def _causal_mask(S):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mods.causal(), 1, 1, S, S, device="cuda")


def cases():
    """(name, shape (B, Hq, Hkv, L, S, D), kwargs maker, grad, backward)."""
    return [
        ("document fwd", (4, 16, 16, 4096, 4096, 128), lambda S: dict(block_mask=_document_mask(S)), True, False),
        ("document bwd", (4, 16, 16, 4096, 4096, 128), lambda S: dict(block_mask=_document_mask(S)), True, True),
        ("gqa_document fwd", (4, 16, 4, 4096, 4096, 128), lambda S: dict(block_mask=_document_mask(S), enable_gqa=True), True, False),
        ("none fwd", (4, 16, 16, 4096, 4096, 128), lambda S: {}, True, False),
        # bench.py's S=1k rows, where the backward's GPU time (0.6 to 1.1 ms on the H200) is near
        # the host's: is it timed at the host's pace? (docs/PERFORMANCE.md, seventeenth session)
        ("none bwd S1k D128", (16, 16, 16, 1024, 1024, 128), lambda S: {}, True, True),
        ("causal bwd S1k D64", (16, 32, 32, 1024, 1024, 64), lambda S: dict(block_mask=_causal_mask(S)), True, True),
        ("document bwd S1k D128", (16, 16, 16, 1024, 1024, 128), lambda S: dict(block_mask=_document_mask(S)),
         True, True),
        ("decode B1 S32k", (1, 32, 8, 1, 32768, 128), lambda S: dict(enable_gqa=True), False, False),
        ("decode B8 S32k", (8, 32, 8, 1, 32768, 128), lambda S: dict(enable_gqa=True), False, False),
    ]


def _call(kw, backward):
    def fn(q, k, v, do=None):
        out, lse = kernels.flex_attention(q, k, v, return_lse=True, **kw)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)
        return out
    return fn


def host_us(shape, make_kw, grad, backward, direct: bool) -> float:
    B, Hq, Hkv, L, S, D = shape
    # Tiny shapes with the same structure: the GPU finishes each call long before the next.
    tiny_S = 256 if L > 1 else 512
    tiny = (1, Hq, Hkv, min(L, tiny_S), tiny_S, D)
    q, k, v = _inputs(*tiny, grad)[0]
    kw = make_kw(tiny_S)
    do = torch.randn_like(q) if backward else None
    fn = _call(kw, backward)
    _runtime.DIRECT_LAUNCH = direct
    for _ in range(20):
        fn(q, k, v, do)
    torch.cuda.synchronize()
    loops = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            fn(q, k, v, do)
        torch.cuda.synchronize()
        loops.append((time.perf_counter() - t0) / 200 * 1e6)
    _runtime.DIRECT_LAUNCH = True
    return statistics.median(loops)


def host_us_bwd(shape, make_kw, n: int = 200) -> float:
    """The backward alone at the host's pace: tiny shapes as ``host_us``, each timed call
    running ``torch.autograd.grad(..., retain_graph=True)`` on one of ``n`` graphs made first."""
    B, Hq, Hkv, L, S, D = shape
    tiny_S = 256
    q, k, v = _inputs(1, Hq, Hkv, min(L, tiny_S), tiny_S, D, True)[0]
    kw = make_kw(tiny_S)
    do = torch.randn_like(q)
    graphs = [kernels.flex_attention(q, k, v, return_lse=True, **kw)[0] for _ in range(n)]
    for out in graphs[:20]:
        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    torch.cuda.synchronize()
    loops = []
    for _ in range(5):
        t0 = time.perf_counter()
        for out in graphs:
            torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        torch.cuda.synchronize()
        loops.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(loops)


def profile_text(shape, make_kw, grad, backward) -> str:
    B, Hq, Hkv, L, S, D = shape
    tiny_S = 256 if L > 1 else 512
    q, k, v = _inputs(1, Hq, Hkv, min(L, tiny_S), tiny_S, D, grad)[0]
    kw = make_kw(tiny_S)
    do = torch.randn_like(q) if backward else None
    fn = _call(kw, backward)
    for _ in range(20):
        fn(q, k, v, do)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        fn(q, k, v, do)
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
    return buf.getvalue()


def queued_ms(fn, reps: int = 20) -> float:
    """GPU time alone: a long ``torch.cuda._sleep`` holds the GPU while the host enqueues the
    call, so the events around it time the kernels back to back (median of ``reps``)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(10_000_000)  # ~5 ms at 2 GHz: longer than any call's host work
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_ms(shape, make_kw, grad, backward) -> dict:
    from triton.testing import do_bench

    B, Hq, Hkv, L, S, D = shape
    sets = _inputs(*shape, grad, n=4, seed=1)
    kw = make_kw(S)
    fn = _call(kw, False)
    turn = itertools.cycle(sets)
    res = {}
    if backward:
        graphs = []
        for q, k, v in sets:
            out, _ = kernels.flex_attention(q, k, v, return_lse=True, **kw)
            graphs.append((out, (q, k, v), torch.randn_like(out)))
        gturn = itertools.cycle(graphs)

        def bwd():
            o, ins, do = next(gturn)
            torch.autograd.grad(o, ins, do, retain_graph=True)
        res["bench_ms"] = do_bench(bwd, warmup=25, rep=100, return_mode="median")
        res["queued_ms"] = queued_ms(bwd)
        return res
    res["bench_ms"] = do_bench(lambda: fn(*next(turn)), warmup=25, rep=100, return_mode="median")
    res["same_inputs_ms"] = do_bench(lambda: fn(*sets[0]), warmup=25, rep=100, return_mode="median")
    res["queued_ms"] = queued_ms(lambda: fn(*next(turn)))
    return res


def check_direct() -> list:
    """The direct launch against Triton's dispatch, bitwise, on aligned and misaligned views."""
    lines = []
    base = torch.randn(2 * 4 * 300 * 64 + 8, device="cuda", dtype=torch.bfloat16)
    aligned = base[: 2 * 4 * 300 * 64].view(2, 4, 300, 64)
    misaligned = base[1: 1 + 2 * 4 * 300 * 64].view(2, 4, 300, 64)  # 2-byte offset
    bm = _document_mask(300)
    for name, t in (("aligned", aligned), ("misaligned", misaligned), ("aligned again", aligned)):
        results = []
        for direct in (False, True, True):
            _runtime.DIRECT_LAUNCH = direct
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (t, t.flip(2).contiguous(), t * 0.5))
            out, lse = kernels.flex_attention(qq, kk, vv, block_mask=bm, return_lse=True)
            grads = torch.autograd.grad(out, (qq, kk, vv), torch.ones_like(out))
            dec = kernels.flex_attention(qq[:, :, :3].detach(), kk.detach(), vv.detach(), return_lse=True)
            results.append([out, lse, *grads, *dec])
        _runtime.DIRECT_LAUNCH = True
        same = all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))
        lines.append(f"direct launch {name}: {'bitwise equal' if same else 'DIFFERENT'} to Triton's dispatch")
    lines.append(f"direct-launch cache entries: {len(_runtime._direct)}, direct launches so far: "
                 f"{_runtime.direct_launches}, launch hooks: {triton.knobs.runtime.launch_enter_hook!r} / "
                 f"{triton.knobs.runtime.launch_exit_hook!r}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "host_overhead.json"))
    p.add_argument("--only", default="", help="comma-separated substrings: only the cases whose names hold one")
    p.add_argument("--no-profile", action="store_true", help="skip the direct-launch check and the profiles")
    args = p.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    chosen = [c for c in cases() if not wanted or any(w in c[0] for w in wanted)]
    if not chosen:
        print(f"no case matches --only {args.only!r}; the cases: {', '.join(c[0] for c in cases())}")
        return 2
    if not torch.cuda.is_available():
        print(f"needs a CUDA GPU (for {len(chosen)} cases: {', '.join(c[0] for c in chosen)})")
        return 2
    rows = []
    print(f"{'case':22s} {'host_us direct':>15s} {'host_us triton':>15s} {'host_us bwd':>12s} {'bench_ms':>9s} "
          f"{'same_in_ms':>10s} {'queued_ms':>9s}")
    for name, shape, make_kw, grad, backward in chosen:
        r = dict(case=name)
        r["host_us_direct"] = host_us(shape, make_kw, grad, backward, True)
        r["host_us_triton"] = host_us(shape, make_kw, grad, backward, False)
        if backward:
            r["host_us_bwd"] = host_us_bwd(shape, make_kw)
        r.update(device_ms(shape, make_kw, grad, backward))
        rows.append(r)
        f = lambda x, w=".3f": "-" if x is None else format(x, w)  # noqa: E731
        print(f"{name:22s} {r['host_us_direct']:15.1f} {r['host_us_triton']:15.1f} {f(r.get('host_us_bwd'), '.1f'):>12s} "
              f"{f(r.get('bench_ms')):>9s} {f(r.get('same_inputs_ms')):>10s} {f(r.get('queued_ms')):>9s}", flush=True)
    with open(args.json, "w") as fh:
        json.dump(dict(rows=rows, gpu=torch.cuda.get_device_name(), torch=torch.__version__), fh, indent=1)
    if args.no_profile:
        return 0
    for line in check_direct():
        print(line)
    for name, shape, make_kw, grad, backward in [c for c in chosen if c[0] in ("document fwd", "document bwd", "decode B1 S32k")]:
        print(f"\n== host profile: {name} (tiny shapes, 500 calls, sorted by own time)")
        print(profile_text(shape, make_kw, grad, backward))
    return 0


if __name__ == "__main__":
    sys.exit(main())
