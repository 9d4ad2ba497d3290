"""The benchmark's plumbing (benchmarks/bench.py) without a GPU.

One dry run on CPU (``--device cpu --quick --rounds 2``: a tiny causal case and a tiny
decode case through our kernels in Triton's interpreter and SDPA's math
backend, torch.compile skipped with its reason) checks the printed table and
the JSON; the rest checks the counting (density, FLOPs, bytes), the matrix
order and the summary in process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("flex_oracle_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _args(*argv):
    return bench.build_parser().parse_args(list(argv))


# --------------------------------------------------------------------------
# the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = out / "result.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--rounds", "2", "--json", str(path)],
        cwd=out, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"dry run exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout, json.loads(path.read_text())


def test_dry_run_of_the_gluon_probes_checks_them_against_the_oracle(tmp_path):
    """``--impls ours,gluon`` on the CPU: the Gluon probes' forward and backward run in
    kernels/gluon_emulator.py behind bench.py's gluon implementation, and the benchmark holds
    their outputs and gradients to the oracle before timing them, as it will on the GPU."""
    path = tmp_path / "result.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--no-decode", "--impls", "ours,gluon", "--json",
         str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("causal S256")]
    assert [r[5] for r in rows] == ["ours", "gluon"] and all(r[-1] == "pass" for r in rows), proc.stdout


def test_dry_run_prints_the_table_and_the_summary(dry_run):
    stdout, _ = dry_run
    lines = stdout.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("case ")))
    assert lines[top].split() == ["case", "impl", "fwd", "ms", "fwd", "TF/s", "bwd", "ms", "bwd", "TF/s", "KV",
                                  "TB/s", "check"]
    end = lines.index("", top)
    rows = [line.split() for line in lines[top + 2:end]]
    assert len(rows) == 6
    impls = {(r[0], r[5]) for r in rows}
    assert {("causal", "ours"), ("causal", "torch-compile"), ("causal", "sdpa-math"),
            ("decode", "ours"), ("decode", "torch-compile"), ("decode", "sdpa-math")} <= impls
    assert all(r[-1] in ("pass", "n/a") for r in rows), rows
    assert "torch.compile(flex_attention) runs on CUDA only" in stdout
    assert "peer time / our time" in stdout
    assert "JSON:" in stdout


def test_dry_run_json_has_the_environment(dry_run):
    _, doc = dry_run
    env = doc["environment"]
    for key in ("command", "argv", "torch", "triton", "gpu", "device", "dtype", "impls"):
        assert key in env
    assert env["device"] == "cpu" and env["gpu"] is None
    assert env["torch"] == torch.__version__
    assert "--quick" in env["command"] and env["argv"][-2:] == ["--json", env["argv"][-1]]
    assert doc["not_started"] == [] and doc["summary"]["failed_or_error"] == []
    # --rounds 2 on the CPU, where --max-rounds defaults to --rounds: no extra rounds.
    assert [c["rounds"] for c in doc["cases"]] == [2, 2]
    # GPU memory left by earlier cases: recorded on CUDA only.
    assert [c["held_gib_at_start"] for c in doc["cases"]] == [None, None]
    assert env["kernels_digest"] == bench.kernels_digest() and len(env["kernels_digest"]) == 12


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_bench_merge_makes_one_record_of_several_runs(dry_run, tmp_path, capsys):
    """``benchmarks/bench_merge.py``: the dry run split into two parts (its training case, its
    decode case) and merged back gives the run's own summary, the cases in the matrix's order,
    and the matrix's cases that neither part timed."""
    from benchmarks import bench_merge

    _, doc = dry_run
    train, decode = doc["cases"]
    parts = [_write(tmp_path / "a.json", dict(doc, cases=[decode], summary=None)),
             _write(tmp_path / "b.json", dict(doc, cases=[train], summary=None))]
    merged = bench_merge.merge(parts)
    assert [c["id"] for c in merged["cases"]] == [train["id"], decode["id"]]  # the matrix's run order
    assert json.loads(json.dumps(merged["summary"])) == doc["summary"]
    matrix = bench_merge.matrix_ids(doc["environment"])
    assert merged["matrix_cases"] == len(matrix) and train["id"] in matrix and decode["id"] in matrix
    assert merged["missing_from_matrix"] == [m for m in matrix if m not in (train["id"], decode["id"])]
    assert merged["kernels_digests"] == [doc["environment"]["kernels_digest"]]
    assert bench_merge.main([*parts, "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "2 parts, 2 cases on cpu" in out and f"of the matrix's {len(matrix)} cases" in out
    # ... and the commands that would time the missing ones, with the parts' other options.
    commands, _ = bench.rerun_commands(merged["missing_from_matrix"], doc["environment"]["argv"][1:], "cpu")
    assert commands and all(c in out for c in commands) and all("--rounds 2" in c for c in commands)
    assert "peer time / our time" in out and "warning" not in out
    assert json.loads((tmp_path / "m.json").read_text())["missing_from_matrix"] == merged["missing_from_matrix"]
    # Parts that timed other kernels are merged with a warning.
    other = dict(doc, environment=dict(doc["environment"], kernels_digest="0" * 12), cases=[decode])
    bench_merge.main([_write(tmp_path / "c.json", other), parts[1]])
    assert "2 different versions of kernels/" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"gpu": "NVIDIA H200"}, "differ in gpu: None against 'NVIDIA H200'"),
    ({"dtype": "float16"}, "differ in dtype"),
    ({"pace": "gpu"}, "differ in pace"),
    (None, "is in"),
])
def test_bench_merge_refuses_parts_that_do_not_belong_together(dry_run, tmp_path, change, message):
    """Parts of other cards, dtypes or paces are refused with the field and both values; a case
    timed in two parts is refused with both files' names."""
    from benchmarks import bench_merge

    _, doc = dry_run
    other = dict(doc, environment=dict(doc["environment"], **change)) if change else doc
    parts = [_write(tmp_path / "a.json", doc), _write(tmp_path / "b.json", other)]
    with pytest.raises(SystemExit, match=message):
        bench_merge.merge(parts)


def test_bench_merge_refuses_what_is_not_a_bench_json(tmp_path):
    from benchmarks import bench_merge

    with pytest.raises(SystemExit, match="not a bench.py JSON"):
        bench_merge.merge([_write(tmp_path / "x.json", {"cases": []})])
    with pytest.raises(SystemExit, match="cannot read"):
        bench_merge.merge([str(tmp_path / "missing.json")])


def test_dry_run_json_counts_and_checks(dry_run):
    _, doc = dry_run
    train, decode = doc["cases"]
    assert (train["kind"], train["mask"], decode["kind"]) == ("train", "causal", "decode")

    L = train["L"]
    assert train["density"] == pytest.approx((L + 1) / (2 * L), abs=1e-12)
    flops = 4 * train["B"] * train["Hq"] * L * train["S"] * train["D"] * train["density"]
    assert train["fwd_flops"] == pytest.approx(flops)
    assert train["bwd_flops"] == pytest.approx(2.5 * flops)
    assert decode["density"] == 1.0 and decode["bwd_flops"] is None
    assert decode["kv_bytes"] == 2 * decode["B"] * decode["Hkv"] * decode["S"] * decode["D"] * 2

    by_impl = {r["impl"]: r for r in train["results"]}
    ours = by_impl["ours"]
    assert ours["status"] == "ok" and ours["check"]["status"] == "pass"
    assert set(ours["check"]["tensors"]) == {"out", "lse", "dq", "dk", "dv"}
    assert ours["fwd_ms"] > 0 and ours["bwd_ms"] > 0 and ours["input_sets"] >= 2
    assert len(ours["fwd_ms_rounds"]) == len(ours["bwd_ms_rounds"]) == 2  # --rounds 2
    assert ours["fwd_ms"] == min(ours["fwd_ms_rounds"]) and ours["bwd_ms"] == min(ours["bwd_ms_rounds"])
    assert ours["fwd_tflops"] == pytest.approx(flops / (ours["fwd_ms"] * 1e-3) / 1e12)
    assert ours["bwd_tflops"] == pytest.approx(2.5 * flops / (ours["bwd_ms"] * 1e-3) / 1e12)
    assert by_impl["torch-compile"]["status"] == "n/a" and "CUDA" in by_impl["torch-compile"]["reason"]
    sdpa = by_impl["sdpa-math"]
    assert sdpa["status"] == "ok" and set(sdpa["check"]["tensors"]) == {"out", "dq", "dk", "dv"}

    dec = {r["impl"]: r for r in decode["results"]}["ours"]
    assert dec["status"] == "ok" and set(dec["check"]["tensors"]) == {"out", "lse"}
    assert "bwd_ms" not in dec
    assert dec["kv_tbs"] == pytest.approx(decode["kv_bytes"] / (dec["fwd_ms"] * 1e-3) / 1e12)

    ratios = doc["summary"]["ratios"]
    assert {(r["case"], r["peer"]) for r in ratios} == {(train["id"], "sdpa-math"), (decode["id"], "sdpa-math")}


def test_budget_spent_starts_no_case(tmp_path, capsys):
    path = tmp_path / "b.json"
    code = bench.main(["bench", "--device", "cpu", "--quick", "--budget-seconds", "0", "--json", str(path)])
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["cases"] == [] and len(doc["not_started"]) == 2
    assert "Not started (budget)" in capsys.readouterr().out


# --------------------------------------------------------------------------
# counting


@pytest.mark.parametrize("L", [384, 300])
def test_causal_density_is_exact(L):
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels import mods

    bm = create_block_mask(mods.causal(), None, None, L, L, device="cpu", BLOCK_SIZE=128)
    shape = bench.Shape(1, 1, 1, L, L, 64)
    assert bench.allowed_fraction(bm, shape, chunk_elements=L * 50) == pytest.approx((L + 1) / (2 * L), abs=1e-12)


def test_sliding_window_and_document_densities():
    shape = bench.Shape(1, 2, 2, 2048, 2048, 64)
    _, bm = bench.attention_args("sliding_window", shape, "cpu")
    i = torch.arange(2048)
    d = i[:, None] - i[None, :]
    assert bench.allowed_fraction(bm, shape) == pytest.approx(float(((d >= 0) & (d <= 1024)).double().mean()))

    _, bm = bench.attention_args("document", shape, "cpu")
    ids = bm.mask_mod.q_ids.tensor
    counts = torch.bincount(ids.long())
    assert len(counts) == bench.DOCUMENTS
    assert bench.allowed_fraction(bm, shape) == pytest.approx(float((counts.double() ** 2).sum()) / 2048**2)


def test_random_block_sparse_lists_full_blocks_only():
    bm = bench.random_block_mask(1024, 2048, 0.25, seed=3, device="cpu")
    assert int(bm.kv_num_blocks.sum()) == 0
    per_row = bm.full_kv_num_blocks[0, 0]
    assert per_row.tolist() == [4] * 8
    listed = bm.full_kv_indices[0, 0, :, :4]
    assert all(len(set(row.tolist())) == 4 for row in listed)
    shape = bench.Shape(1, 1, 1, 1024, 2048, 64)
    assert bench.allowed_fraction(bm, shape) == pytest.approx(0.25)
    again = bench.random_block_mask(1024, 2048, 0.25, seed=3, device="cpu")
    assert torch.equal(again.full_kv_indices, bm.full_kv_indices)


class _OnceBackward(torch.autograd.Function):
    """Doubles its input; its graph can be run backward only once (like a freed graph)."""

    @staticmethod
    def forward(ctx, x):
        ctx.used = False
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("Trying to backward through the graph a second time")
        ctx.used = True
        return 2 * grad


@pytest.mark.parametrize("reusable", [True, False])
def test_backward_timing_alone_or_by_difference(reusable):
    """A graph that can run backward twice is timed backward alone (retain_graph); one that
    cannot is timed backward alone too, each timed call after an untimed forward of its own
    (``timer(...).split``); only a timer without ``split`` falls back to the difference."""
    shape = bench.Shape(1, 1, 1, 16, 16, 16)
    sets = bench.input_sets(shape, torch.float32, "cpu", 0, grad=True)
    fn = (lambda q, k, v: q * k.sum() + v.sum()) if reusable else (lambda q, k, v: _OnceBackward.apply(q) + k + v)
    time_fn = bench.timer("cpu", 0, 0, 3)
    out = bench.time_impl(fn, sets, time_fn, backward=True)
    assert out["input_sets"] == 2 and out["fwd_ms"] > 0
    assert out["bwd_ms"] > 0 and out["bwd_ms_p20"] <= out["bwd_ms"] <= out["bwd_ms_p80"]
    assert out["bwd_method"].startswith(
        "autograd.grad(out, (q, k, v), grad_out, retain_graph=True)" if reusable
        else "autograd.grad(out, (q, k, v), grad_out) timed alone after an untimed forward")
    if not reusable:
        out = bench.time_impl(fn, sets, lambda f: time_fn(f), backward=True)  # no split
        assert out["bwd_method"].startswith("median(fwd + bwd) - median(fwd)")


def test_split_timing_times_the_second_call_alone():
    """``timer(...).split(pre, fn)`` runs ``pre`` before every timed ``fn`` and times ``fn`` only."""
    calls = []
    split = bench.timer("cpu", 0, 0, 4).split
    med, p20, p80 = split(lambda: (calls.append("pre"), time.sleep(0.05)), lambda: calls.append("fn"))
    assert calls == ["pre", "fn"] * 5  # one untimed warm-up pair, then cpu_reps pairs
    assert med < 20 and p20 <= med <= p80  # ms: the 50 ms of pre are outside


def test_pace_flag_and_refusal():
    assert _args().pace == "host" and _args("--pace", "gpu").pace == "gpu"
    with pytest.raises(SystemExit):
        _args("--pace", "device")
    with pytest.raises(ValueError, match="Expected pace in .'host', 'gpu'., got 'fast'"):
        bench.timer("cpu", 0, 0, 1, pace="fast")


@pytest.mark.gpu
def test_gpu_pace_times_the_kernels_not_the_host():
    """A call that spends 3 ms on the host before a tiny kernel: ``do_bench``'s timing (the host
    pace) reports about the 3 ms less the L2 flush; ``pace="gpu"`` holds the GPU behind each call
    until the host has enqueued it, so only the kernel is timed, in both ``time`` and ``split``."""
    x = torch.zeros(1024, device="cuda")

    def slow_host():
        time.sleep(0.003)
        x.add_(1.0)

    host = bench.timer("cuda", 5, 60, 1, pace="host")(slow_host)[0]
    gpu = bench.timer("cuda", 5, 60, 1, pace="gpu")(slow_host)[0]
    split = bench.timer("cuda", 5, 60, 1, pace="gpu").split(lambda: x.mul_(1.0), slow_host)[0]
    assert host > 2.0, host  # ms: at the host's pace
    assert gpu < 0.3 and split < 0.3, (gpu, split)  # a 4 KB add runs in microseconds


def test_rounds_merge_to_the_median_round():
    """Each time is the median over the interleaved rounds, with that round's percentiles; an
    even count takes the lower middle round (a time that was measured, not an average)."""
    rounds = [dict(input_sets=4, fwd_ms=f, fwd_ms_p20=f - 1, fwd_ms_p80=f + 1, bwd_ms=b, bwd_method="m")
              for f, b in ((3.0, 10.0), (9.0, 7.0), (2.0, 8.0))]
    out = bench.merge_rounds(rounds)
    assert (out["fwd_ms"], out["fwd_ms_p20"], out["fwd_ms_p80"]) == (3.0, 2.0, 4.0)
    assert out["bwd_ms"] == 8.0 and out["bwd_method"] == "m" and out["input_sets"] == 4
    assert out["fwd_ms_rounds"] == [3.0, 9.0, 2.0] and out["bwd_ms_rounds"] == [10.0, 7.0, 8.0]
    assert bench.merge_rounds(rounds[:2])["fwd_ms"] == 3.0
    assert bench.merge_rounds([dict(fwd_ms=5.0)]) == dict(fwd_ms=5.0, fwd_ms_rounds=[5.0])


def test_rounds_flag():
    assert _args().rounds is None  # 3 on CUDA, 1 on CPU
    assert _args("--rounds", "5").rounds == 5
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            _args("--rounds", bad)


def test_flops_and_bytes():
    s = bench.Shape(4, 16, 16, 4096, 4096, 128)
    assert bench.forward_flops(s, 0.5) == 4 * 4 * 16 * 4096 * 4096 * 128 * 0.5
    d = bench.Shape(8, 32, 8, 1, 131072, 128)
    assert bench.kv_bytes(d, torch.bfloat16) == 2 * 8 * 8 * 131072 * 128 * 2


# --------------------------------------------------------------------------
# the matrix and the summary


def test_matrix_order_puts_4k_d128_then_decode_first():
    cases = bench.build_matrix(_args(), "cuda")
    masks = list(bench.MASKS)
    assert len(cases) == len(masks) * 6 + 6
    head = cases[: len(masks)]
    assert [c.mask for c in head] == masks
    assert all((c.shape.S, c.shape.D) == (4096, 128) for c in head)
    decode = cases[len(masks): len(masks) + 6]
    assert all(c.decode and c.shape.L == 1 and (c.shape.Hq, c.shape.Hkv, c.shape.D) == (32, 8, 128) for c in decode)
    assert {(c.shape.B, c.shape.S) for c in decode} == {(b, s) for b in (1, 8) for s in (8192, 32768, 131072)}
    for c in cases:
        if not c.decode:
            assert c.shape.B * c.shape.S == 16384 and c.shape.Hq * c.shape.D == 2048
            assert c.shape.Hkv == (c.shape.Hq // 4 if c.mask.startswith("gqa_") else c.shape.Hq)


def test_matrix_flags_select_subsets():
    quick = bench.build_matrix(_args("--quick"), "cuda")
    assert [c.mask for c in quick] == ["causal", "document", "softcap", "decode"]
    sub = bench.build_matrix(_args("--masks", "document,none", "--seqlens", "1k,16k", "--head-dims", "64",
                                   "--no-decode", "--dtype", "float16"), "cuda")
    assert [(c.mask, c.shape.S, c.shape.D) for c in sub] == [
        ("document", 1024, 64), ("none", 1024, 64), ("document", 16384, 64), ("none", 16384, 64)]
    assert all(c.dtype == torch.float16 for c in sub)
    dec = bench.build_matrix(_args("--decode-only", "--decode-seqlens", "8k", "--decode-batches", "8"), "cuda")
    assert [(c.mask, c.shape.B, c.shape.S) for c in dec] == [("decode", 8, 8192)]
    with pytest.raises(SystemExit):
        _args("--masks", "nonsense")


def test_reduced_check_shape():
    case = bench.Case("document", bench.train_shape("document", 16384, 64, "cuda"), torch.bfloat16)
    assert bench.check_shape(case, "cuda", "reduced") == bench.Shape(1, 32, 32, 2048, 2048, 64)
    assert bench.check_shape(case, "cuda", "real") == case.shape


def test_summary_ratios_geomean_and_minimum():
    def case(id_, mask, kind, ours, peer):
        res = [{"impl": "ours", "status": "ok", **ours}, {"impl": "torch-compile", "status": "ok", **peer}]
        return {"id": id_, "mask": mask, "kind": kind, "results": res}

    cases = [
        case("a", "causal", "train", {"fwd_ms": 1.0, "bwd_ms": 2.0}, {"fwd_ms": 2.0, "bwd_ms": 2.0}),
        case("b", "document", "train", {"fwd_ms": 2.0, "bwd_ms": 1.0}, {"fwd_ms": 1.0, "bwd_ms": 4.0}),
        case("c", "decode", "decode", {"fwd_ms": 1.0, "kv_tbs": 2.0}, {"fwd_ms": 1.5, "kv_tbs": 4 / 3}),
    ]
    s = bench.summarize(cases, {"copy_bandwidth_tbs": 3.0})
    e = s["peers"]["torch-compile"]
    assert e["train_cases"] == 2
    assert e["geomean_fwd"] == pytest.approx(1.0)  # 2 and 0.5
    assert e["geomean_bwd"] == pytest.approx(2.0)  # 1 and 4
    assert e["min"] == (0.5, "b", "fwd")
    assert e["by_mask"]["document"] == [{"case": "b", "fwd": 0.5, "bwd": 4.0}]
    assert e["decode_geomean"] == pytest.approx(1.5)
    assert s["decode_bandwidth"][0]["ours"]["share_of_nominal"] == pytest.approx(2.0 / 3.35)
    assert s["decode_bandwidth"][0]["ours"]["share_of_copy"] == pytest.approx(2.0 / 3.0)
    text = bench.format_summary(s, {})
    assert "geomean fwd 1.00x, bwd 2.00x" in text and "min 0.50x (b fwd)" in text
    assert math.isclose(bench._geomean([1.0, 4.0]), 2.0)


def test_summary_separates_ratios_whose_rounds_disagree():
    """A ratio whose implementations' round medians spread more than SETTLED_SPREAD (slowest over
    fastest) is listed as unsettled, worst first, and the minimum over the settled ratios is
    given beside the minimum over all: at S=1k on the H200 a 0.69x came from rounds of 0.61 to
    0.91 ms, and the next run measured the same case at 1.12x."""
    def res(impl, fwd, bwd):
        return {"impl": impl, "status": "ok", "fwd_ms": sorted(fwd)[(len(fwd) - 1) // 2], "fwd_ms_rounds": fwd,
                "bwd_ms": sorted(bwd)[(len(bwd) - 1) // 2], "bwd_ms_rounds": bwd}

    cases = [
        {"id": "steady", "mask": "causal", "kind": "train",
         "results": [res("ours", [1.0, 1.02, 1.01], [2.0, 2.0, 2.1]), res("torch-compile", [0.9, 0.9, 0.91], [2.2] * 3)]},
        {"id": "noisy", "mask": "block_sparse", "kind": "train",
         "results": [res("ours", [1.0, 1.0, 1.0], [0.61, 0.80, 0.91]), res("torch-compile", [1.2] * 3, [0.55] * 3)]},
    ]
    assert bench.round_spread(cases[1]["results"][0], "bwd_ms") == pytest.approx(0.91 / 0.61)
    assert bench.round_spread({"fwd_ms": 1.0, "fwd_ms_rounds": [1.0]}, "fwd_ms") == 1.0
    e = bench.summarize(cases, {})["peers"]["torch-compile"]
    assert e["min"] == (pytest.approx(0.55 / 0.80), "noisy", "bwd")
    assert e["min_settled"] == (pytest.approx(0.9 / 1.01), "steady", "fwd")
    (unsettled,) = e["unsettled"]
    assert unsettled[1:3] == ("noisy", "bwd") and unsettled[3] == pytest.approx(0.91 / 0.61)
    text = bench.format_summary(bench.summarize(cases, {}), {})
    assert "unsettled: 1 ratios whose rounds spread more than 1.10 (noisy bwd 0.69x (rounds spread 1.49))" in text
    assert "min over the settled ones 0.89x (steady fwd)" in text


def test_spread_leaves_out_the_outer_quarters_from_five_rounds_on():
    assert bench.spread_of([]) == bench.spread_of([2.0]) == 1.0
    assert bench.spread_of([1.0, 2.0]) == 2.0
    assert bench.spread_of([1.0, 1.05, 1.3]) == pytest.approx(1.3)  # under 5: all of them
    assert bench.spread_of([1.0, 1.0, 1.02, 1.0, 5.0]) == pytest.approx(1.02)  # one glitch of five
    assert bench.spread_of([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]) == 1.0  # two of eight
    assert bench.spread_of([0.5, 0.6, 1.0, 1.0, 1.0]) == pytest.approx(1 / 0.6)  # two of five count


def test_rounds_go_on_while_a_case_is_unsettled():
    """``run_rounds`` runs the rounds asked for, then more while a result's round medians are
    unsettled, up to max_rounds and while budget is left."""
    def scripted(times):
        res = {"status": "ok", "rounds": []}

        def one_round(r):
            res["rounds"].append({"fwd_ms": times[r], "bwd_ms": 2.0})
        return res, one_round

    res, one = scripted([1.0, 1.5, 1.0, 1.0, 1.02, 1.0, 1.0, 1.0, 1.0])
    assert bench.run_rounds(one, [res], 3, 9, lambda: 1.0) == 5  # settled once the 1.5 is an outer quarter
    res, one = scripted([1.0, 1.01, 1.0] + [9.0] * 6)
    assert bench.run_rounds(one, [res], 3, 9, lambda: 1.0) == 3  # settled from the start
    res, one = scripted([1.0, 2.0] * 5)
    assert bench.run_rounds(one, [res], 3, 6, lambda: 1.0) == 6  # never settles: max_rounds
    res, one = scripted([1.0, 2.0] * 5)
    assert bench.run_rounds(one, [res], 3, 9, lambda: -1.0) == 3  # no budget left: the rounds asked for
    bad = {"status": "error", "rounds": [{"fwd_ms": 1.0}, {"fwd_ms": 3.0}]}
    res, one = scripted([1.0, 1.0, 1.0])
    assert bench.run_rounds(one, [res, bad], 3, 9, lambda: 1.0) == 3  # an errored result does not count


def test_max_rounds_flag():
    assert _args().max_rounds is None  # 3 x --rounds on CUDA, --rounds on CPU
    assert _args("--max-rounds", "7").max_rounds == 7
    with pytest.raises(SystemExit):
        _args("--max-rounds", "0")


def test_ours_refined_asks_for_refined_lists_only_with_a_block_mask(monkeypatch):
    """The ``ours-refined`` implementation is ours with REFINE_KV_BLOCK=64 where there is a block
    mask to refine, and plain ours where there is none (the option would do nothing)."""
    import kernels

    seen = []
    monkeypatch.setattr(kernels, "flex_attention", lambda *a, **kw: seen.append(kw.get("kernel_options")))
    case = bench.Case("document", bench.Shape(1, 2, 2, 256, 256, 64), torch.bfloat16)
    for block_mask in ("a block mask", None):
        bench.IMPLS["ours-refined"].prepare(case, None, block_mask)(None, None, None)
    assert seen == [{"REFINE_KV_BLOCK": 64}, None]


@pytest.mark.parametrize("impl,flags", [
    ("ours-two-loops", {("forward", "ONE_LOOP"): False}),
    ("ours-one-loop", {("forward", "ONE_LOOP"): True, ("backward", "ONE_LOOP"): True}),
    ("ours-one-loop-eager", {("forward", "ONE_LOOP"): True, ("forward", "ONE_LOOP_EAGER_MASK"): True}),
    ("ours-heads-in-loop", {("backward", "HEADS_IN_LOOP"): True}),
    ("ours-dq-atomic", {("backward", "DQ_ATOMIC"): True}),
    ("ours-dp-first", {("backward", "DKDV_DP_FIRST"): True}),
    ("ours-dv-first", {("backward", "DKDV_DP_FIRST"): False}),
    ("ours-dq-own-delta", {("backward", "DQ_OWN_DELTA"): True}),
])
def test_flag_variants_set_their_flags_for_their_calls_alone(monkeypatch, impl, flags):
    """The implementations that are ours with a kernels flag set: the flags hold during the call
    (as kernels.flex_attention reads them) and are back to their defaults after it."""
    import importlib

    import kernels

    seen = []
    monkeypatch.setattr(kernels, "flex_attention", lambda *a, **kw: seen.append(
        {(m, f): getattr(importlib.import_module(f"kernels.{m}"), f) for m, f in flags}))
    before = {(m, f): getattr(importlib.import_module(f"kernels.{m}"), f) for m, f in flags}
    case = bench.Case("causal", bench.Shape(1, 2, 2, 256, 256, 64), torch.bfloat16)
    bench.IMPLS[impl].prepare(case, None, "a block mask")(None, None, None)
    assert seen == [flags]
    assert {(m, f): getattr(importlib.import_module(f"kernels.{m}"), f) for m, f in flags} == before


def test_softcap_tanh_variants_run_and_pass_the_oracle_check(tmp_path):
    """benchmarks/softcap_tanh.py: ours with the softcap's tanh emitted another way, in bench.py's
    dry run (the interpreter runs no inline PTX, so the fdiv, exp2 and rational variants
    only), and bench.py's ours-out (out alone: the forward's fast tanh), each checked against
    the oracle; every variant's generated score function differs from ours (ours-rational's,
    ours-rcp's, ours-newton's and ours-grad-mul's only where bf16 takes the fast tanh); and
    ours-dkdv-mufu (kernels.mods.TANH_RCP_DKDV) and ours-out-fwd-split4 (TANH_RCP_FWD, out alone) run.
    ours-eigen, ours-exp2 and ours-grad-mul are only compared as sources: their runs took 20 s of
    the CPU CI's time (thirty-second session), and each is a score function that the run's other
    variants show the benchmark compiles and checks the same way."""
    from kernels import mods

    spec = importlib.util.spec_from_file_location("flex_oracle_softcap_tanh", ROOT / "benchmarks" / "softcap_tanh.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    ours = mods.compile_mods(mods.tanh_softcap(30.0), None).source
    assert "rcp.approx" in ours and "fdiv" not in ours.split("def score_fn")[1].split("def score_bwd_fn")[0]
    fast_only = ("ours-rational", "ours-rcp", "ours-newton", "ours-grad-mul")
    sources = {name: mods.compile_mods(cls(30.0), None).source for name, cls in module.VARIANTS.items()
               if name not in fast_only}
    assert len(set(sources.values()) | {ours}) == len(sources) + 1
    assert "tanh.approx.f32" in sources["ours-approx"] and "fdiv" in sources["ours-fdiv"]
    # ours-rational: the rational wherever ours takes exp2 (bf16 with out alone, and the backward)
    rational = module.VARIANTS["ours-rational"](30.0)
    assert mods.compile_mods(rational, None, rounding=2.0 ** -8).source == ours
    assert mods.compile_mods(mods.tanh_softcap(30.0), None, rounding=2.0 ** -8).source != ours
    # ours-rcp and ours-newton: the fast formula's reciprocal all by rcp.approx / all by Newton's
    # method, where ours takes half of each (kernels.mods.TANH_RCP); ours-grad-mul: its derivative
    # (4 r) (1 - r), where ours takes r (4 - 4 r) with an FMA
    fast = {name: mods.compile_mods(cls(30.0), None, rounding=2.0 ** -8).source
            for name, cls in [("ours", type(mods.tanh_softcap(30.0)))] + [(n, module.VARIANTS[n]) for n in fast_only[1:]]}
    assert len(set(fast.values())) == 4
    assert "rcp.approx" in fast["ours"] and "fma.rn" in fast["ours"] and "pack=2" in fast["ours"]
    assert "fma.rn" not in fast["ours-rcp"] and "rcp.approx" not in fast["ours-newton"]
    assert "tl.fma" in fast["ours"] and "tl.fma" not in fast["ours-grad-mul"]
    assert all(mods.compile_mods(module.VARIANTS[n](30.0), None).source == ours for n in fast_only[1:])

    path = tmp_path / "tanh.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "softcap_tanh.py"), "--device", "cpu", "--quick",
         "--impls", "ours,ours-fdiv,ours-rational,ours-out,ours-dkdv-mufu,ours-out-fwd-split4", "--masks",
         "softcap", "--no-decode",
         "--json", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = json.loads(path.read_text())["cases"][0]["results"]
    assert {r["impl"]: r["status"] for r in results} == {
        "ours": "ok", "ours-fdiv": "ok", "ours-rational": "ok", "ours-out": "ok", "ours-dkdv-mufu": "ok",
        "ours-out-fwd-split4": "ok"}


# --------------------------------------------------------------------------
def test_sweep_tasks_cover_every_length_asked_for():
    """``sweep.py --seqlens``: every (config, mask, head dim) once per training length, each task
    carrying its length; decode rows keep their own shape (length None)."""
    from benchmarks import sweep

    todo = sweep.tasks(["none", "causal"], [128], True, (1024, 16384))
    train = [t for t in todo if t[4] is not None]
    per_length = len(sweep.FWD[128]) + len(sweep.BWD[128]) + 1  # + torch.compile
    assert len(train) == 2 * 2 * per_length
    assert {t[4] for t in train} == {1024, 16384}
    assert ("torch-compile", "causal", 128, None, 16384) in todo
    assert all(t[4] is None for t in todo if t[0].endswith("decode")) and len(todo) > len(train)
    assert sweep.tasks(["none"], [64], False)[0][4] == sweep.S  # the default length


# benchmarks/ab.py: revisions of our kernels side by side


def test_ab_times_a_revision_beside_the_working_tree(tmp_path):
    """``ab.py --against HEAD`` on the CPU: HEAD's kernels load as a package of their own beside
    the working tree's, both are timed in the rounds asked for, and the diffs are to the tree's
    outputs (0 for the tree itself)."""
    import shutil

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("ab.py reads revisions with git; this checkout has no git or no .git")
    path = tmp_path / "ab.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--device", "cpu", "--against", "HEAD",
         "--cases", "causal:1k:64", "--rounds", "2", "--prewarm-jobs", "2", "--json", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    doc = json.loads(path.read_text())
    assert doc["variants"][0].startswith("HEAD (") and doc["variants"][-1].startswith("tree")
    (case,) = doc["cases"]
    assert case["case"].startswith("causal S256 D64")  # the CPU's tiny shape
    head, tree = case["variants"]
    assert len(head["fwd_ms_rounds"]) == len(head["bwd_ms_rounds"]) == 2
    assert head["fwd_ms"] == min(head["fwd_ms_rounds"])  # the lower middle of two rounds
    assert head["fwd_speedup"] == 1.0 and tree["bwd_ms"] > 0
    assert tree["diffs_out_dq_dk_dv"] == [0.0, 0.0, 0.0, 0.0]
    assert all(d < 1e-2 for d in head["diffs_out_dq_dk_dv"])
    assert "diffs to the tree" in proc.stdout and "HEAD (" in proc.stdout
    # --prewarm-jobs ran both variants (the revision under its own package name) without error.
    assert "prewarmed 2 compiles" in proc.stdout and "prewarm causal" not in proc.stdout, proc.stdout


def test_ab_times_kernel_options_beside_the_defaults(tmp_path):
    """``ab.py --options NAME:KEY=VALUE,...`` on the CPU, no revision: the working tree's kernels
    with those kernel_options are a variant of their own, timed in the same rounds as the
    defaults, and a launch option leaves the outputs as they are."""
    path = tmp_path / "ab.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--device", "cpu", "--options", "one:num_stages=1",
         "--options", "small:BLOCK_M=64,bwd_BLOCK_N1=64", "--set", "noshift:api.AUTO_SHIFT=False; api.AUTO_SHIFT_DQ=False",
         "--cases", "none:1k:64", "--rounds", "1",
         "--forward-only", "--prewarm-jobs", "2", "--json", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "prewarmed 4 compiles" in proc.stdout and "prewarm none" not in proc.stdout, proc.stdout
    doc = json.loads(path.read_text())
    assert doc["variants"] == ["one", "small", "noshift", "tree"]
    assert doc["options"] == {"one": {"num_stages": 1}, "small": {"BLOCK_M": 64, "bwd_BLOCK_N1": 64}}
    assert doc["sets"] == {"noshift": ["api.AUTO_SHIFT=False", "api.AUTO_SHIFT_DQ=False"]}
    one, small, noshift, tree = doc["cases"][0]["variants"]
    assert one["diffs_out_dq_dk_dv"] == [0.0, 0.0, 0.0, 0.0] and tree["fwd_ms"] > 0
    assert noshift["diffs_out_dq_dk_dv"] == [0.0, 0.0, 0.0, 0.0] and noshift["fwd_ms"] > 0
    assert all(d < 1e-2 for d in small["diffs_out_dq_dk_dv"])


def test_ab_lse_times_the_call_that_returns_the_lse(tmp_path):
    """``ab.py --lse``: every variant's forward also returns the LSE, as bench.py's ``ours``, so a
    softcap takes the exact mods (the rational tanh), not the rounding's (``api.DTYPE_ROUNDING``).
    A variant without the rounding then computes the same output bit for bit; without ``--lse``
    it does not (the backward takes the rounding's mods in both)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("OUT", None)
    diffs = {}
    for lse in (True, False):
        path = tmp_path / f"ab-{lse}.json"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--device", "cpu", *(["--lse"] if lse else []),
             "--set", "exact:api.DTYPE_ROUNDING={}", "--cases", "softcap:1k:64", "--rounds", "1",
             "--forward-only", "--json", str(path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert ("with the LSE" in proc.stdout) == lse, proc.stdout
        doc = json.loads(path.read_text())
        assert doc["lse"] is lse
        diffs[lse] = doc["cases"][0]["variants"][0]["diffs_out_dq_dk_dv"][0]
    assert diffs[True] == 0.0 and diffs[False] > 0.0, diffs


def test_ab_set_holds_its_attributes_through_the_backward():
    """``ab.py --set``'s variant: the attributes are in force while the forward runs and while the
    output's backward runs (each time it runs: the timed backward retains the graph), and as
    they were in between and after."""
    from benchmarks import ab
    from kernels import backward

    before = backward.DELTA_ROWS
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            seen.append(("forward", backward.DELTA_ROWS))
            return q * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", backward.DELTA_ROWS))
            return grad * 2

    ((name, settings),) = ab.parse_sets([f"d:backward.DELTA_ROWS={before // 2}"], {ab.TREE})
    assert name == "d" and settings == [("backward", "DELTA_ROWS", before // 2)]
    fn = ab._set_around(lambda q, k, v: Probe.apply(q) + k + v, ab._Setting(settings))
    q, k, v = (torch.randn(3, requires_grad=True) for _ in range(3))
    out = fn(q, k, v)
    seen.append(("between", backward.DELTA_ROWS))
    for _ in range(2):
        grads = torch.autograd.grad(out, (q, k, v), torch.ones(3), retain_graph=True)
        seen.append(("after", backward.DELTA_ROWS))
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[2], torch.ones(3))
    half = before // 2
    assert seen == [("forward", half), ("between", before), ("backward", half), ("after", before),
                    ("backward", half), ("after", before)]


@pytest.mark.parametrize("argv, message", [
    (["--cases", "none:1k:64"], "nothing to compare"),
    (["--options", "stages4", "--cases", "none:1k:64"], "NAME:KEY=VALUE"),
    (["--options", "a:num_stages=1", "--options", "a:num_stages=2", "--cases", "none:1k:64"], "twice"),
])
def test_ab_refuses_bad_variants(argv, message):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--device", "cpu", *argv],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("item, taken, message", [
    ("a:api.AUTO_SHIFT=False", {"tree", "a"}, "twice"),  # a name --options took
    ("a:api.NO_SUCH_FLAG=1", {"tree"}, "no attribute 'NO_SUCH_FLAG'"),
    ("a:nosuchmodule.X=1", {"tree"}, "no module kernels.nosuchmodule"),
    ("a:api.AUTO_SHIFT=maybe", {"tree"}, "not a Python literal"),
    ("a:AUTO_SHIFT=False", {"tree"}, "MODULE.ATTR=VALUE"),
    ("a:", {"tree"}, "NAME:MODULE.ATTR=VALUE"),
])
def test_ab_refuses_bad_settings(item, taken, message):
    """``ab.py --set``'s items are refused by name, before anything runs (in process: ``parse_sets``
    is what ``main`` calls)."""
    from benchmarks import ab

    with pytest.raises(SystemExit, match=message):
        ab.parse_sets([item], taken)


def test_ab_refuses_bad_cases():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--device", "cpu",
                           "--against", "HEAD", "--cases", "causal:4k"],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "MASK:S:D" in proc.stderr


# --------------------------------------------------------------------------
# benchmarks/gpu_clocks.py: the SM clock while timing


_FAKE_SMI = '''#!{python}
import sys, time
args = " ".join(sys.argv[1:])
if "clocks_event_reasons" in args:  # an older driver: only the former name
    print("Field \\"clocks_event_reasons.active\\" is not a valid field to query.", file=sys.stderr)
    sys.exit(2)
assert "-i 0" in args and "--format=csv,noheader,nounits" in args, args
if "--loop-ms=" not in args:
    print("1980, 100.5, 30, 0x0000000000000000")
    sys.exit(0)
period = int(args.split("--loop-ms=")[1].split()[0]) / 1000
n = 0
while True:
    sm, reasons = (1500, "0x0000000000000004") if n % 4 == 2 else (1980, "0x0000000000000000")
    print(f"{{sm}}, {{400 + n % 3}}.25, 41, {{reasons}}" if n % 5 else "[N/A], [N/A], [N/A], [N/A]", flush=True)
    n += 1
    time.sleep(period)
'''


def test_clock_sampler_reads_nvidia_smi_and_summarizes_a_window(tmp_path):
    """``ClockSampler`` against a stand-in ``nvidia-smi`` that knows only the former
    ``clocks_throttle_reasons`` field and prints an unreadable sample now and then: the
    probe falls back to the field it knows, unreadable lines are skipped, and a window
    reports the clock's range, the highest power, the reasons seen and the drop."""
    from benchmarks import gpu_clocks

    smi = tmp_path / "nvidia-smi"
    smi.write_text(_FAKE_SMI.format(python=sys.executable))
    smi.chmod(0o755)
    sampler = gpu_clocks.ClockSampler("0", period_ms=10, smi=str(smi))
    try:
        assert sampler.available and sampler.error is None
        assert sampler.fields == gpu_clocks.FIELDS + ("clocks_throttle_reasons.active",)
        t0 = time.monotonic()
        deadline = t0 + 20
        while len(sampler.samples) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        w = sampler.window(t0 - 1, time.monotonic())
    finally:
        sampler.stop()
    assert w is not None and w["samples"] >= 12
    assert (w["sm_mhz_min"], w["sm_mhz_max"], w["run_peak_sm_mhz"]) == (1500, 1980, 1980)
    assert w["power_w_max"] in (401.25, 402.25) and w["temperature_c_max"] == 41
    assert w["reasons"] == ["0x4"] and w["dropped"]  # 1500 < 0.9 * 1980
    assert "SM 1980 MHz (1500-1980)" in gpu_clocks.describe(w) and gpu_clocks.describe(w).endswith("DROPPED")
    assert sampler.window(time.monotonic() + 10, time.monotonic() + 20) is None


def test_clock_sampler_without_nvidia_smi_is_unavailable_not_an_error():
    from benchmarks import gpu_clocks

    sampler = gpu_clocks.ClockSampler(smi="no-such-nvidia-smi-here")
    assert not sampler.available and "not found" in sampler.error
    assert sampler.window(0, time.monotonic()) is None and sampler.peak_sm_mhz() is None
    sampler.stop()  # nothing to stop
    assert gpu_clocks.describe(None) == "no clock samples"


def test_summary_names_the_cases_timed_under_a_dropped_clock():
    res = [{"impl": "ours", "status": "ok", "fwd_ms": 1.0}, {"impl": "torch-compile", "status": "ok", "fwd_ms": 1.0}]
    cases = [{"id": "a", "mask": "none", "kind": "train", "results": res, "gpu_clocks": {"dropped": True}},
             {"id": "b", "mask": "none", "kind": "train", "results": res, "gpu_clocks": {"dropped": False}},
             {"id": "c", "mask": "none", "kind": "train", "results": res, "gpu_clocks": None}]
    s = bench.summarize(cases, {})
    assert s["clock_drops"] == ["a"]
    assert "SM clock under 90% of the run's highest sample while timing 1 cases: a" in bench.format_summary(s, {})


def test_host_overhead_selects_cases_by_name(capsys):
    """``host_overhead.py --only``: the S=1k backward rows by substring, and a refusal that lists
    the cases when nothing matches (both decided before it looks for a GPU)."""
    spec = importlib.util.spec_from_file_location("flex_oracle_host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    names = [c[0] for c in host.cases()]
    assert {"none bwd S1k D128", "causal bwd S1k D64", "document bwd S1k D128"} <= set(names)
    assert host.main(["--only", "nothing-like-this", "--json", os.devnull]) == 2
    assert "no case matches" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert host.main(["--only", "S1k", "--json", os.devnull]) == 2
        assert "for 3 cases: none bwd S1k D128, causal bwd S1k D64, document bwd S1k D128" in capsys.readouterr().out


def test_run_case_records_the_clocks_while_its_rounds_ran(monkeypatch):
    """``run_case`` asks the clock sampler for the window of its timing rounds (after every
    implementation's check) and records it as the case's ``gpu_clocks``; the summary then names
    a case timed under a dropped clock."""
    monkeypatch.setattr(bench, "_DEVICE", ["cpu"])
    seen = []

    class Sampler:
        def window(self, t0, t1):
            seen.append((t0, t1))
            return {"samples": 3, "sm_mhz_min": 1400.0, "sm_mhz_median": 1980.0, "sm_mhz_max": 1980.0,
                    "power_w_max": 500.0, "reasons": ["0x4"], "dropped": True}

    case = bench.build_matrix(_args("--masks", "causal", "--seqlens", "1k", "--head-dims", "64", "--no-decode"),
                              "cpu")[0]
    ctx = bench.Context("cpu", [bench.IMPLS["ours"]], bench.timer("cpu", 0, 0, 1), "auto", 2, 0, None,
                        lambda msg: None, Sampler(), 2)
    t0 = time.monotonic()
    record = bench.run_case(case, ctx)
    assert record["rounds"] == 2 and record["results"][0]["status"] == "ok"
    ((start, end),) = seen
    assert t0 < start <= end <= time.monotonic()
    assert record["gpu_clocks"]["dropped"]
    assert bench.summarize([record], {})["clock_drops"] == [record["id"]]


def test_kernel_times_counts_overlapped_kernels_once():
    """kernel_times.py's GPU-busy time is the union of the kernels' spans: two kernels on two
    streams that overlap count once (the backward's dQ and dK/dV kernels, side by side), a gap
    counts not at all, and a span inside another adds nothing."""
    from benchmarks import kernel_times

    assert kernel_times.busy_ms([]) == 0.0
    assert kernel_times.busy_ms([(0.0, 4.0), (6.0, 7.0)]) == 5.0  # apart: the sum, the gap left out
    assert kernel_times.busy_ms([(2.0, 6.0), (0.0, 4.0)]) == 6.0  # overlapping, in any order
    assert kernel_times.busy_ms([(0.0, 10.0), (2.0, 3.0), (4.0, 12.0)]) == 12.0  # one inside another
    assert kernel_times.busy_ms([(0.0, 1.0), (1.0, 2.0)]) == 2.0  # end to end


def test_ncu_summary_splits_samples_by_reason_region_and_instruction():
    """benchmarks/ncu_summary.py on a page shaped as ``ncu --page source --csv --print-source sass``
    writes it (after ncu_stalls.sh's marker): samples by reason (the "(Not Issued)" columns left
    out, as they repeat a subset), by region (a loop is a backward branch's target up to the branch;
    the code before and after it its prologue and epilogue) and the instructions with the most."""
    from benchmarks import ncu_summary

    head = ('"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb","stall_wait",'
            '"stall_long_sb (Not Issued)"')
    page = "\n".join([
        "details page text", "==== SASS with stall samples",
        '"Kernel Name","dkdv_kernel",', head,
        '"0x100","LDG.E R2, desc[UR4][R2.64]","6","5","1","5"',
        '"0x110","IMAD R3, R2, 0x40, RZ","20","20","0","20"',
        '"0x120","HGMMA.64x64x16.F32.BF16 R8, gdesc[UR8], RZ","30","0","30","0"',
        '"0x130","@P0 BRA 0x120","4","0","4","0"',
        '"0x140","STG.E desc[UR4][R4.64], R8","40","0","40","0"',
        '"Kernel Name","dq_kernel",', head,
        '"0x200","EXIT","1","0","1","0"',
    ])
    kernels = ncu_summary.parse(page)
    assert list(kernels) == ["dkdv_kernel", "dq_kernel"] and len(kernels["dkdv_kernel"]) == 5
    assert ncu_summary.reasons(kernels["dkdv_kernel"][1]) == {"long_sb": 20}
    labels = [(label, [r["Address"] for r in rows]) for label, rows in ncu_summary.regions(kernels["dkdv_kernel"])]
    assert labels == [("before the loops", ["0x100", "0x110"]), ("loop 0", ["0x120", "0x130"]),
                      ("after the loops", ["0x140"])]
    text = ncu_summary.summary(kernels["dkdv_kernel"], top=2)
    assert "100 samples: wait 75.0%, long_sb 25.0%" in text
    assert "before the loops     2 instrs  26.0% of samples: long_sb 96%, wait 4%" in text
    assert "loop 0               2 instrs  34.0% of samples: wait 100%" in text
    assert text.splitlines()[-2].split()[:2] == ["40.0%", "0x140"]  # the store waited most
    assert ncu_summary.regions(kernels["dq_kernel"])[0][0] == "no loops"


def test_rerun_commands_time_exactly_the_cases_asked_for():
    """``bench.rerun_commands``: for any subset of the default matrix, the printed commands
    build exactly that subset, each case once, and keep the run's other options but its JSON
    path and budget. This is what a budget-cut run and ``bench_merge.py`` print for the cases
    a record lacks."""
    import random
    import shlex

    matrix = [c.id for c in bench.build_matrix(_args(), "cuda")]
    argv = ["--pace", "gpu", "--seqlens", "16k", "--max-rounds", "3", "--prewarm-jobs", "14",
            "--budget-seconds", "400", "--json", "x.json", "--impls", "ours,torch-compile"]
    rng = random.Random(0)
    for _ in range(200):
        share = rng.choice([0.02, 0.2, 0.6, 1.0])
        wanted = [cid for cid in matrix if rng.random() < share]
        commands, unknown = bench.rerun_commands(wanted, argv, "cuda")
        assert unknown == []
        got = []
        for command in commands:
            words = shlex.split(command)
            assert words[:3] == ["PYTHONPATH=.", "python3", "benchmarks/bench.py"], command
            args = _args(*words[3:])
            assert (args.pace, args.max_rounds, args.prewarm_jobs, args.impls) == ("gpu", 3, 14, "ours,torch-compile")
            assert args.budget_seconds is None and args.json is None
            got += [c.id for c in bench.build_matrix(args, "cuda")]
        assert sorted(got) == sorted(wanted) and len(got) == len(set(got))
    # The whole matrix folds into one training and one decode command; a case of another dtype
    # is not in the (bf16) default matrix and is named instead.
    commands, unknown = bench.rerun_commands(matrix + ["causal-S4096-D128-B4-H16x16-float16"], [], "cuda")
    assert len(commands) == 2 and unknown == ["causal-S4096-D128-B4-H16x16-float16"]
    assert "Not in the default matrix" in bench.rerun_hint(unknown, [], "cuda")
