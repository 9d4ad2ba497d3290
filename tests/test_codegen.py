"""What Triton makes of our kernels for the H100/H200 (sm_90), checked without a GPU.

Triton's NVIDIA backend and its bundled ptxas compile ahead of time on any machine,
so a CPU box can read the generated TTGIR and PTX. The interpreter cannot show what
these tests pin: it runs each ``tl.dot`` as a NumPy product added afterwards.

``mma`` of float32 inputs must sum each dot from zero and add it to the running
accumulator once (``tests/cases/fp32-small-terms-lost.json``: passed as the dot's
accumulator, acc took the products one at a time in an FMA chain, and a tail of 8,000
small probabilities was lost on the H200). Triton folds ``acc + tl.dot(a, b)`` into
``tl.dot(a, b, acc)``, so the add is inline PTX, and this test checks that the fold
did not happen. 16-bit inputs keep the tensor cores' own accumulate.

Every kernel the API launches (forward, backward, decode; float32 and bf16) is also
compiled for sm_90 here (``tests/codegen.py kernels``, through ``benchmarks/codegen.py``'s
``sm90_launches``), so code that only the GPU takes (the non-interpreter branches) cannot
fail to compile unseen by CPU CI; and ``benchmarks/codegen.py``'s register report runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process with the interpreter off: under TRITON_INTERPRET=1 (how the
# CPU tests run) every @triton.jit function is an interpreted one, which cannot compile.
_SCRIPT = Path(__file__).with_name("codegen.py")


def _run(*argv: str, script: Path = _SCRIPT) -> str:
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "flex-oracle-codegen-cache"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache))
    run = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def _compile(dtype: str, precision: str) -> dict:
    return json.loads(_run("mma", dtype, precision).strip().splitlines()[-1])


def _dot_accumulator(ttgir: str) -> str:
    """The definition of the (single) dot's accumulator operand."""
    dots = [line for line in ttgir.splitlines() if re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line)]
    assert len(dots) == 1, dots
    operands = re.search(r"(?:tt\.dot|ttng\.warp_group_dot) (%[\w.]+), (%[\w.]+), (%[\w.]+)", dots[0])
    acc = operands.group(3)
    defs = [line for line in ttgir.splitlines() if line.strip().startswith(acc + " =")]
    assert len(defs) == 1, (acc, defs)
    return defs[0]


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_float32_dot_sums_from_zero(precision):
    code = _compile("fp32", precision)
    assert "arith.constant dense<0.000000e+00>" in _dot_accumulator(code["ttgir"])
    assert "add.rn.f32" in code["ptx"]


def test_bfloat16_dot_keeps_the_tensor_core_accumulate():
    code = _compile("bf16", "ieee")
    assert "arith.constant" not in _dot_accumulator(code["ttgir"])
    assert "add.rn.f32" not in code["ptx"]


def test_every_kernel_compiles_for_sm90_with_float32_sums_from_zero():
    """The forward, backward (delta, dQ, dK/dV) and decode (split, combine) kernels, float32 and
    bf16, dense and masked with a score mod, compile for sm_90; the float32 ones that fold a dot
    into a running sum carry the separate add, the bf16 ones none."""
    variants = [json.loads(line) for line in _run("kernels").splitlines() if line.startswith("{")]
    names = {"forward_kernel", "delta_kernel", "dq_kernel", "dkdv_kernel", "decode_split_kernel", "decode_combine_kernel"}
    for dtype in ("float32", "bfloat16"):
        assert {v["kernel"] for v in variants if v["dtype"] == dtype} == names, variants
    for v in variants:
        accumulates = v["kernel"] in ("forward_kernel", "dq_kernel", "dkdv_kernel", "decode_split_kernel")
        assert (v["add_rn_f32"] > 0) == (accumulates and v["dtype"] == "float32"), v


def test_tile_loads_are_prefetched_more_than_one_step_ahead():
    """With num_stages >= 3 the bf16 loops of the forward, dQ and dK/dV kernels keep copies in
    flight across a step, on a causal block mask's lists and on the dense ones alike: pointer
    loads wait with ``async_wait`` num > 0, and TMA copies (kernels.backward.TMA_DQ on sm90 by
    default; kernels.forward.TMA_KV from D=128, where these D=64 kernels keep pointers) are issued
    two steps ahead (the prologue issues two steps' copies). A tile address taken from a list entry loaded in the same step left every
    wait at num = 0, whatever num_stages (kernels.forward.next_listed): no load overlapped the
    step before it, and our backward ran 20 % slower than PyTorch's at the same tiles."""
    variants = [json.loads(line) for line in _run("kernels").splitlines() if line.startswith("{")]
    looped = [v for v in variants if v["dtype"] == "bfloat16" and v["num_stages"] >= 3
              and v["kernel"] in ("forward_kernel", "dq_kernel", "dkdv_kernel")]
    assert {v["kernel"] for v in looped} == {"forward_kernel", "dq_kernel", "dkdv_kernel"}, variants
    assert {v["kernel"] for v in looped if v["tma_ahead"] is not None} >= {"dq_kernel"}, variants
    for v in looped:
        if v["tma_ahead"] is None:
            assert max(v["async_waits"]) > 0, v
        else:
            assert v["tma_ahead"] >= 2, v


def test_forward_keeps_two_programs_a_multiprocessor_at_16k():
    """bench.py's document row at S=16k (bf16, D=128, with the LSE): the forward runs 64 x 64 tiles
    on 4 warps with 3 stages and two loops, whose partial loop pipelines the document ids; its
    shared memory (115,712 bytes) is exactly two programs' share of an H100 multiprocessor. TMA's
    mbarriers took it to 115,768, one program a multiprocessor, and the forward ran 24 % slower on
    the H100 (thirty-fifth session), so ``kernels.forward.tma_kv_for`` keeps that forward on pointer
    loads. Two programs: 2 x (shared + 1 KiB reserved) <= 233,472 bytes."""
    out = _run("--masks", "document", "--seqlens", "16k", "--head-dims", "128", "--forward-only", "--lse",
               script=ROOT / "benchmarks" / "codegen.py")
    rows = [line.split() for line in out.splitlines() if "forward_kernel" in line]
    assert len(rows) == 1, out
    assert rows[0][4:7] == ["BLOCK_M=64,BLOCK_N=64", "4", "3"], rows[0]
    assert 2 * (int(rows[0][-1]) + 1024) <= 233472, rows[0]


@pytest.mark.parametrize("argv,message", [
    (["--two-loops", "--one-loop"], "contradict"),
    (["--eager-mask"], "pass --one-loop"),
])
def test_codegen_refuses_contradicting_loop_flags(argv, message, capsys):
    """codegen.py's loop flags: --two-loops (the forward's old two loops) with --one-loop, and
    --eager-mask without --one-loop, are usage errors before anything compiles."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.codegen import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_codegen_report_prints_registers_and_spills():
    """``benchmarks/codegen.py``: bench.py's causal row at S=1k, D=64, forward, as ptxas reports it."""
    out = _run("--masks", "causal", "--seqlens", "1k", "--head-dims", "64", "--forward-only",
               script=ROOT / "benchmarks" / "codegen.py")
    rows = [line.split() for line in out.splitlines() if "forward_kernel" in line]
    assert len(rows) == 1, out
    regs, spills = int(rows[0][-3]), rows[0][-2]
    assert 0 < regs <= 255 and re.fullmatch(r"\d+/\d+", spills), rows[0]


def test_codegen_backward_gets_a_gradient_with_the_outputs_layout(monkeypatch):
    """``benchmarks/codegen.py`` compiles the backward for the gradient a training step passes:
    dense, the output's own strides. ``out.sum().backward()`` passed an expanded one (stride 0),
    a specialization no training step runs, and its dK/dV spills were reported as ours."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks import bench, codegen
    import kernels

    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad.stride())
            return grad

    monkeypatch.setattr(kernels, "flex_attention", lambda q, k, v, **kw: Record.apply(q))
    shape = bench.Shape(1, 2, 2, 32, 32, 16)
    codegen.run_case("none", shape, torch.bfloat16, None, grad=True)
    assert seen == [torch.empty(1, 2, 32, 16).stride()]


def _loop_report(out: str) -> dict:
    """``benchmarks/codegen.py --loops``' lines as {(case, kernel): (scores per thread per trip,
    [(instrs, mufu, spills), ...] per loop)}."""
    report, key = {}, None
    for line in out.splitlines():
        loop = re.search(r"loop \S+\s+(\d+) instrs,\s+(\d+) MUFU,\s+\d+ FP32,\s+(\d+) LDL/STL", line)
        if loop and key is not None:
            report[key][1].append(tuple(int(x) for x in loop.groups()))
            continue
        row = re.match(r"(\w+) S=\d+ D=\d+\s+(\w+)\s+BLOCK_M=(\d+)(?:,BLOCK_N=(\d+))?\s+(\d+)", line)
        if row:
            case, kernel, m, n, warps = row.groups()
            key = (case, kernel)
            report[key] = (int(m) * int(n or 1) / (int(warps) * 32), [])
    return report


@pytest.mark.parametrize("rcp_dkdv", [None, "mufu"])
def test_softcap_backward_loops_cost_few_instructions_per_score(rcp_dkdv):
    """``benchmarks/codegen.py --loops`` (SASS per loop trip) on bench.py's softcap row (causal
    plus ``tanh_softcap(30)``) against its causal row, bf16, D=128.

    The softcap costs the dQ and dK/dV loops at most 11.75 instructions per score, 1.5 of them
    MUFU (exp2, and a reciprocal on every other score: the backward's fast tanh,
    ``kernels.mods.TANH_FAST_ERR``, whose other reciprocals take Newton's method, ``TANH_RCP``, 6
    instructions more each): 11.1 and 11.6. Before the twenty-eighth session they were 13.1 and
    13.5: the derivative 4 r (1 - r) took 3 instructions where r (4 - 4 r) takes 2, and the score
    was multiplied by its scale and then by the softcap's constant, where the two constants now
    make one (``kernels.mods._Scaled``). With Eigen's rational there, as in the forward, it cost
    21 and 22, and those loops were issue-bound.

    The dK/dV kernel's full-block loop spills at most 4 registers a trip (3): the kernels take P
    times the mods' derivative before the dP product (``dkdv_tiles``), so that s and the fast
    tanh's r do not live across it. Before, 17 a trip (136 bytes of spill stores).

    With ``--tanh-rcp-dkdv mufu`` (``kernels.mods.TANH_RCP_DKDV``) the dK/dV kernel alone takes
    rcp.approx for every score: 2 MUFU per score there, 1.5 still in the dQ kernel."""
    argv = ["--masks", "causal,softcap", "--seqlens", "1k", "--head-dims", "128", "--loops"]
    out = _run(*argv, *(["--tanh-rcp-dkdv", rcp_dkdv] if rcp_dkdv else []),
               script=ROOT / "benchmarks" / "codegen.py")
    report = _loop_report(out)
    for kernel in ("dq_kernel", "dkdv_kernel"):
        scores, soft = report[("softcap", kernel)]
        _, plain = report[("causal", kernel)]
        assert soft and plain, out
        # The cheapest loop of each: the full blocks' (no mask), the one most trips take.
        (soft_instrs, soft_mufu, soft_spills), (plain_instrs, plain_mufu, _) = min(soft), min(plain)
        mufu = 2.0 if kernel == "dkdv_kernel" and rcp_dkdv == "mufu" else 1.5
        assert (soft_mufu - plain_mufu) / scores == mufu, (kernel, soft_mufu, plain_mufu, scores)
        if rcp_dkdv is None:
            assert (soft_instrs - plain_instrs) / scores <= 11.75, (kernel, soft_instrs, plain_instrs, scores)
        if kernel == "dkdv_kernel":
            assert soft_spills <= 4, (kernel, soft_spills, out)


def test_softcap_forward_with_the_lse_costs_few_instructions_per_score():
    """``benchmarks/codegen.py --loops --forward-only --lse`` on bench.py's softcap and causal rows
    (bf16, D=128): a forward that returns the float32 LSE takes the exact mods, the softcap's
    rational (``kernels.mods.TANH_NUM``), and costs at most 11.75 instructions per score over
    causal, one of them MUFU (its reciprocal): 11.3 on ``kernels.api.SHORT_ROWS_FWD``'s 64 x 64 /
    4 warps, which S=1k takes (833 a trip against causal's one loop, 471; 32 scores a thread), and
    an issue-bound loop (833 issue clocks a trip against 512 of tensor); 11.4 on the 128 x 128 / 8
    warps S=1k took before (1,452 against 720; 2,904 issue clocks against 2,048). Eigen's 13/6 with ``cap`` applied
    after it and the scale before it, before the twenty-eighth session, cost 16.4; the 9/6 rational
    with a multiply by log2(e) before the maximum (no RAW_MAX after a score mod), 12.4."""
    out = _run("--masks", "causal,softcap", "--seqlens", "1k", "--head-dims", "128", "--loops", "--forward-only",
               "--lse", script=ROOT / "benchmarks" / "codegen.py")
    report = _loop_report(out)
    scores, soft = report[("softcap", "forward_kernel")]
    _, plain = report[("causal", "forward_kernel")]
    assert soft and plain, out
    (soft_instrs, soft_mufu, _), (plain_instrs, plain_mufu, _) = min(soft), min(plain)
    assert (soft_instrs - plain_instrs) / scores <= 11.75, (soft_instrs, plain_instrs, scores)
    assert (soft_mufu - plain_mufu) / scores == 1, (soft_mufu, plain_mufu, scores)


def test_out_alone_forward_takes_its_own_reciprocal():
    """``benchmarks/codegen.py --loops --forward-only --tanh-rcp-fwd split4`` (bench.py's softcap
    and causal rows, bf16, D=128): a forward that returns out alone takes the fast tanh with
    ``kernels.mods.TANH_RCP_FWD``'s reciprocal, one ``rcp.approx`` in four, so the softcap costs
    it 1.25 MUFU per score over causal (its exp2, and a quarter reciprocal), where ``TANH_RCP``'s
    split costs 1.5. The interpreter runs no PTX, so only sm_90 code can show which it took."""
    out = _run("--masks", "causal,softcap", "--seqlens", "1k", "--head-dims", "128", "--loops", "--forward-only",
               "--tanh-rcp-fwd", "split4", script=ROOT / "benchmarks" / "codegen.py")
    report = _loop_report(out)
    scores, soft = report[("softcap", "forward_kernel")]
    _, plain = report[("causal", "forward_kernel")]
    assert soft and plain, out
    (_, soft_mufu, _), (_, plain_mufu, _) = min(soft), min(plain)
    assert (soft_mufu - plain_mufu) / scores == 1.25, (soft_mufu, plain_mufu, scores)


def test_dkdv_loop_runs_the_exponentials_under_the_dp_product():
    """``benchmarks/codegen.py --loops`` on bench.py's prefix LM, softcap and document rows (bf16,
    D=128, S=1k): where G = 1 on the default tiles every loop of the dK/dV kernel issues its
    products as Q K^T, dP, dV, dK (``kernels.backward.DKDV_DP_FIRST``), and at least the trip's 32
    exp2 per thread (P's) issue while a product is in flight. On sm_90 the warpgroup products run
    in issue order and only the accumulating ones (dV, dK) stay in flight past a wait: with dV
    issued first (PyTorch's order, ours before the thirtieth session) dP waited behind it and no
    MUFU instruction ran under a product (0 a trip). The document row takes
    ``kernels.api.REFINED_BWD``'s 4-warp tiles (prefix LM's lists save under 5 % and softcap has
    a score mod), on which dV stays first: dP first spilled more there and was slower on the
    H100 (docs/PERFORMANCE.md, thirty-first session)."""
    out = _run("--masks", "prefix_lm,softcap,document", "--seqlens", "1k", "--head-dims", "128", "--loops",
               script=ROOT / "benchmarks" / "codegen.py")
    kernel, seen = None, []
    for line in out.splitlines():
        row = re.match(r"(\w+) S=\d+ D=\d+\s+(\w+)\s+(\S+)\s+(\d+)\s", line)
        if row:
            kernel = row.groups()
            continue
        products = re.search(r"products ([\dx ]+); (\d+) MUFU under a product in flight", line)
        if products and kernel[1] == "dkdv_kernel":
            seen.append(kernel[0])
            issued = products.group(1).split()
            if kernel[0] == "document":  # REFINED_BWD: 64 x 64 tiles on 4 warps, dV first
                assert (kernel[2], kernel[3]) == ("BLOCK_M=64,BLOCK_N=64", "4"), (kernel, line)
                assert issued == ["64x64", "64x128", "64x64", "64x128"] * (len(issued) // 4), (kernel, line)
                continue
            assert kernel[3] == "8", (kernel, line)
            assert issued == ["64x64", "64x64", "64x128", "64x128"] * (len(issued) // 4), (kernel, line)
            assert int(products.group(2)) >= 32, (kernel, line)
    assert [seen.count(m) for m in ("prefix_lm", "softcap", "document")] == [2, 2, 2], out


def test_d64_document_forward_keeps_its_programs_a_multiprocessor():
    """bench.py's document rows at D=64 (bf16, with the LSE), whose forward takes the document
    range test (``kernels.api.DOCUMENT_RANGES_FWD_MIN_DIM``) under a cap of 128 registers a thread
    (``kernels.forward.RANGES_FWD_MAXNREG``), each without spills:

    * S=4k, refined lists, 64 x 64 on 4 warps: ptxas left the range test at 152 registers, three
      programs a multiprocessor by registers and 3 to 5 % slower than the id compare on the H100;
      capped it holds four (4.3 % faster than the id compare, fortieth session): 4 x 128 x 128
      registers fill the 65,536, and 4 x (shared + 1 KiB reserved) <= 233,472 bytes.
    * S=16k, unrefined lists, ``kernels.api.RANGES_FWD_D64``'s 128 x 128 on 8 warps: two programs
      (7 % faster than the short rows' 64 x 128 on 4 warps, which spilled 8 bytes under the cap;
      forty-first session)."""
    out = _run("--masks", "document", "--seqlens", "4k,16k", "--head-dims", "64", "--forward-only", "--lse",
               script=ROOT / "benchmarks" / "codegen.py")
    rows = [line.split() for line in out.splitlines() if "forward_kernel" in line]
    assert len(rows) == 2, out
    for row, tiles, warps, stages, programs in ((rows[0], "BLOCK_M=64,BLOCK_N=64", "4", "3", 4),
                                               (rows[1], "BLOCK_M=128,BLOCK_N=128", "8", "3", 2)):
        assert row[1] == ("S=4096" if programs == 4 else "S=16384"), row
        assert row[4:7] == [tiles, warps, stages], row
        regs, spills, shared = int(row[-3]), row[-2], int(row[-1])
        assert regs <= 128 and spills == "0/0", row
        assert programs * (shared + 1024) <= 233472 and programs * regs * 32 * int(warps) <= 65536, row


def test_d64_scored_long_rows_forward_tiles_and_cap():
    """bench.py's softcap and ALiBi rows at S=16k, D=64 (bf16, with the LSE; rows too long for
    the short rows' tiles): the softcap, which reads no captured tensor, takes the D=64 row's 128
    x 128 on 8 warps under the cap of 128 registers (two programs a multiprocessor; 9.9 % faster
    than 128 x 64 on 4 warps on the H100, forty-second session); ALiBi, which gathers its slopes,
    keeps the "gathered" row's 128 x 64 on 4 warps, uncapped and without spills."""
    out = _run("--masks", "softcap,alibi", "--seqlens", "16k", "--head-dims", "64", "--forward-only", "--lse",
               script=ROOT / "benchmarks" / "codegen.py")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "forward_kernel" in line}
    assert set(rows) == {"softcap", "alibi"}, out
    softcap, alibi = rows["softcap"], rows["alibi"]
    assert softcap[4:7] == ["BLOCK_M=128,BLOCK_N=128", "8", "3"] and int(softcap[-3]) <= 128, softcap
    assert 2 * (int(softcap[-1]) + 1024) <= 233472, softcap
    assert alibi[4:7] == ["BLOCK_M=128,BLOCK_N=64", "4", "3"] and 128 < int(alibi[-3]) <= 255, alibi
    assert alibi[-2] == "0/0", alibi


def test_dq_atomic_through_a_descriptor_compiles_for_sm90():
    """``kernels.backward.DQ_ATOMIC`` with ``DQ_ATOMIC_TMA`` (bench.py's document row at S=4k,
    D=64): no dQ kernel, and the dK/dV kernel's dQ reduction through a TMA descriptor compiles
    for sm_90 (Triton's interpreter has no descriptor reduction, so only the GPU runs it) with no
    spills, two programs a multiprocessor by shared memory and by registers. The pointers' form
    takes 84,480 bytes; the tile staged for the reduction takes more."""
    out = _run("--masks", "document", "--seqlens", "4k", "--head-dims", "64", "--lse", "--dq-atomic", "tma",
               script=ROOT / "benchmarks" / "codegen.py")
    kernels = [line.split()[3] for line in out.splitlines() if "_kernel" in line]
    assert "dq_kernel" not in kernels and kernels.count("dkdv_kernel") == 1, out
    row = next(line.split() for line in out.splitlines() if "dkdv_kernel" in line)
    regs, spills, shared = int(row[-3]), row[-2], int(row[-1])
    assert regs <= 255 and spills == "0/0", row
    assert 84480 < shared and 2 * (shared + 1024) <= 233472 and 2 * regs * 128 <= 65536, row
