"""The fault catalogue (properties/faults.py): patches apply, planting is a faithful copy that
leaves the working tree alone, a planted fault changes results, and the CI sample is killed.

Fast tests first (text only, then one small kernel case); the subprocess runs last. The whole
file takes about two minutes on two CPU cores (half of it the CI sample).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import pytest
import torch

import kernels
import oracle
from kernels import mods
from properties import faults
from properties.cli import main
from properties.faults import BUDGETS, CATALOGUE, CI_SAMPLE, CONTROL, Fault, FaultResult, Patch

KERNELS_DIR = os.path.dirname(os.path.abspath(kernels.__file__))
FORCE_FLEX = {"FORCE_USE_FLEX_ATTENTION": True}


# --------------------------------------------------------------------------
# the catalogue, as text


@pytest.mark.parametrize("fault", CATALOGUE, ids=lambda f: f.name)
def test_every_patch_applies_to_the_current_kernels(fault):
    with open(os.path.join(KERNELS_DIR, f"{fault.patches[0].module}.py")) as f:
        assert f.read().count(fault.patches[0].old) == fault.patches[0].count
    originals = faults._original_sources()
    patched = faults.patched_sources(fault)  # raises ValueError when any patch is stale
    for p in fault.patches:
        assert originals[p.module].count(p.old) == p.count
    assert {m for m in patched if patched[m] != originals[m]} == set(fault.modules)
    assert faults.diff(fault).startswith("--- a/kernels/")


def test_catalogue_entries_are_named_and_described():
    names = [f.name for f in CATALOGUE]
    assert len(names) == len(set(names)), "fault names must be unique"
    assert CONTROL.name not in names and CONTROL not in CATALOGUE
    for f in CATALOGUE:
        assert f.klass.strip() and f.description.strip() and f.patches, f.name
    assert set(CI_SAMPLE) <= set(names)
    assert faults.diff(CONTROL) == ""


# The fault classes issue 5 asks the catalogue to cover, by the class names the catalogue uses.
REQUIRED_CLASSES = (
    "key/value tail", "partial block treated as full", "full-block pass skipped", "GQA head mapping",
    "Bk == 1 batch index", "online-softmax rescale", "LSE units", "fully masked rows", "softmax scale",
    "delta and the LSE gradient", "captured-bias gradient", "decode split combine",
    "per-head block-mask indexing", "jump between non-contiguous blocks",
    "block indices past the row's count", "L and S swapped", "output stride", "precision: early cast",
)


def test_catalogue_covers_the_required_classes_in_every_kernel():
    assert len(CATALOGUE) >= 24
    classes = {f.klass for f in CATALOGUE}
    assert set(REQUIRED_CLASSES) <= classes, sorted(set(REQUIRED_CLASSES) - classes)
    modules = {m for f in CATALOGUE for m in f.modules}
    assert {"forward", "backward", "decode"} <= modules
    # The CI sample plants at least one fault in each kernel file.
    sampled = {m for f in CATALOGUE if f.name in CI_SAMPLE for m in f.modules}
    assert {"forward", "backward", "decode"} <= sampled


def test_a_stale_patch_names_the_fault_and_the_module():
    absent = Fault("stale_probe", "test", (Patch("forward", "text that is not in forward.py", "x"),), "probe")
    with pytest.raises(ValueError, match=r"'stale_probe'.*kernels/forward\.py, found it 0 time"):
        faults.plant(absent)
    assert not any(m.startswith("flex_oracle_fault_stale_probe") for m in sys.modules)
    twice = Fault("count_probe", "test", (Patch("api", "1.0 / math.sqrt(E)", "1.0", count=2),), "probe")
    with pytest.raises(ValueError, match=r"'count_probe'.*2 time\(s\).*found it 1 time"):
        faults.patched_sources(twice)
    with pytest.raises(ValueError, match=r"'same_probe'.*old == new"):
        Fault("same_probe", "test", (Patch("api", "math", "math"),), "probe")
    with pytest.raises(ValueError, match=r"'mods_probe'.*shared"):
        Fault("mods_probe", "test", (Patch("mods", "a", "b"),), "probe")
    missing = Fault("module_probe", "test", (Patch("nowhere", "a", "b"),), "probe")
    with pytest.raises(ValueError, match=r"'module_probe'.*kernels/nowhere\.py does not exist"):
        faults.patched_sources(missing)


def test_results_round_trip_through_json():
    r = FaultResult("x", "k", "killed", examples=3, seconds=1.5, property="matches_oracle", kind="failed",
                    tensors=("out", "lse"), case={"B": 1}, case_summary="B=1", message="m")
    assert FaultResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# --------------------------------------------------------------------------
# planting


def _digests() -> dict:
    found = {}
    for root, dirs, files in os.walk(KERNELS_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, KERNELS_DIR)] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_planting_leaves_the_working_tree_alone():
    before = _digests()
    planted = [faults.plant(faults.lookup(n)) for n in ("fwd_rescale_missing", "api_scale_uses_value_dim")]
    assert _digests() == before
    for package in planted:
        assert not os.path.abspath(package.__file__).startswith(KERNELS_DIR + os.sep)
        assert package.flex_attention is not kernels.flex_attention
        assert package.mods is kernels.mods  # shared, so the fuzzer's mods pass isinstance checks
    assert kernels.flex_attention.__module__ == "kernels.api"
    assert faults.plant(faults.lookup("fwd_rescale_missing")) is planted[0]  # once per process


def _small_case(fn, kernel_options=None):
    """B=1, H=2, L=S=70, E=16, bfloat16, causal blocks of 32: out, lse, dq, dk, dv."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 70, 16, generator=g).to(torch.bfloat16)
    block_mask = oracle.create_block_mask(mods.causal(), 1, 2, 70, 70, BLOCK_SIZE=32, device="cpu")
    out, lse = fn(q, k, v, block_mask=block_mask, return_lse=True, kernel_options=kernel_options)
    dq, dk, dv = torch.autograd.grad((out * do).sum(), (q, k, v))
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.parametrize("options", [None, FORCE_FLEX], ids=["decode", "forward"])
def test_the_control_copy_is_bit_identical(options):
    copy = faults.plant(CONTROL)
    expected, got = _small_case(kernels.flex_attention, options), _small_case(copy.flex_attention, options)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_planted_fault_changes_the_result():
    planted = faults.plant(faults.lookup("fwd_lse_base2"))
    expected, got = _small_case(kernels.flex_attention, FORCE_FLEX), _small_case(planted.flex_attention, FORCE_FLEX)
    assert not torch.allclose(got["lse"], expected["lse"])
    torch.testing.assert_close(got["lse"] * math.log(2), expected["lse"], rtol=1e-6, atol=1e-6)
    assert torch.equal(got["out"], expected["out"])


def test_a_harness_error_is_not_a_kill(monkeypatch):
    import properties.properties as props

    def broken(name, target, case, device=None):
        return props.Outcome(name, "error", message="harness raised", error_type="RuntimeError")

    monkeypatch.setattr(props, "evaluate", broken)
    result = faults.hunt(CONTROL, examples=3, seconds=60, shrink_seconds=0, device="cpu")
    assert result.status == "error" and not result.detected()
    assert (result.examples, result.kind, result.error_type) == (1, "error", "RuntimeError")


def test_the_control_survives_a_short_hunt():
    result = faults.hunt(CONTROL, examples=3, seconds=120, shrink_seconds=0, device="cpu")
    assert result.status == "survived", result.message
    assert result.examples == 3 and result.case is None


# --------------------------------------------------------------------------
# the command line


def test_fault_list_shows_every_fault(capsys):
    assert main(["fault", "list"]) == 0
    out = capsys.readouterr().out
    for fault in CATALOGUE:
        assert fault.name in out


def test_fault_show_prints_the_diff(capsys):
    assert main(["fault", "show", "bwd_dq_scale_missing"]) == 0
    out = capsys.readouterr().out
    assert "-    dq = dq * SM_SCALE" in out and "+    dq = dq\n" in out


def test_an_unknown_fault_is_a_usage_error(capsys):
    assert main(["fault", "run", "--faults", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "fwd_lse_base2" in err
    assert main(["fault", "show", "nope"]) == 2


# --------------------------------------------------------------------------
# running in subprocesses


def _signal_fault(name: str, statement: str) -> Fault:
    """A fault that runs ``statement`` at the top of flex_attention (not a catalogue entry)."""
    old = "    _validate(query, key, value, scale, enable_gqa)\n"
    return Fault(name, "test", (Patch("api", old, f"    {statement}\n" + old),), f"flex_attention runs {statement}")


def test_a_crash_is_flagged_and_a_hang_is_killed():
    crash = _signal_fault("segfault_probe", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    hang = _signal_fault("hang_probe", "import time; time.sleep(3600)")
    crashed, hung = faults.run_faults([crash, hang], examples=5, seconds=5, shrink_seconds=0, device="cpu",
                                      jobs=2, grace_seconds=25)
    assert crashed.status == "crashed" and crashed.detected(), crashed
    assert (crashed.kind, crashed.error_type) == ("crashed", "SIGSEGV") and "SIGSEGV" in crashed.note
    assert crashed.examples == 1 and crashed.case is not None
    assert "Segmentation fault" in crashed.message  # the child's faulthandler traceback
    assert hung.status == "survived" and not hung.detected(), hung
    assert hung.kind == "timeout" and hung.note.startswith("killed after")
    assert hung.examples == 1 and "matches_oracle" in hung.property


def test_the_ci_sample_is_killed():
    """Each fault of the CI sample is found within the CI budget's examples. Shrinking gets 2 s a
    fault here, not the budget's 20: what is asserted is the kill and its first case, and the
    shrinking took about half of this test's time (the CI run's slowest, 185 s on 2 cores);
    `flex-oracle fault run --sample` shrinks on the whole budget."""
    budget = dict(BUDGETS["ci"], shrink_seconds=2.0)
    results = faults.run_faults(CI_SAMPLE, **budget, seed=0, device="cpu", jobs=2)
    assert [r.name for r in results] == list(CI_SAMPLE)
    assert all(r.status == "killed" for r in results), faults.format_table(results)
    for r in results:
        assert r.kind in ("failed", "target-error") and r.case is not None and r.examples <= BUDGETS["ci"]["examples"]


def test_the_docs_list_every_fault():
    """docs/FAULTS.md carries the catalogue (``flex-oracle fault list --markdown``) and its latest table."""
    with open(os.path.join(os.path.dirname(KERNELS_DIR), "docs", "FAULTS.md")) as f:
        text = f.read()
    missing = [f.name for f in CATALOGUE if f"`{f.name}`" not in text]
    assert not missing, f"docs/FAULTS.md lacks {missing}; regenerate with flex-oracle fault list --markdown"


def test_a_patch_that_does_not_compile_is_an_error_not_a_kill():
    assert faults._broken_patch("target 'fault:x' raised InterpreterError: NameError(\"name 'G' is not defined\")")
    assert not faults._broken_patch("matches_oracle: out disagree")


def test_a_stopped_runner_kills_its_hunts(tmp_path):
    """`timeout` (SIGTERM) on `fault run` must not leave its hunts running: each runs in its own
    session, so no signal to the runner reaches them unless the runner passes it on."""
    import signal
    import subprocess
    import time

    root = os.path.dirname(KERNELS_DIR)
    env = dict(os.environ, TRITON_INTERPRET="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "properties.cli", "fault", "run", "--faults",
                             "fwd_lse_base2,bwd_dq_scale_missing", "--device", "cpu", "--jobs", "2"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)  # both hunts started
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(2)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "properties.faults hunt" in cmd and str(tmp_path) in cmd:
            left.append(cmd)
    assert not left, f"hunts left running: {left}"


def test_trigger_rates_check_every_case_against_every_fault():
    """benchmarks/trigger_rates.py: the hunts' cases are the redraw's (a hunt of seed s draws the
    same cases whatever fault is planted), and each case is judged as a hunt judges it, without
    stopping: a forward case trips fwd_lse_base2 and not a decode kernel's fault."""
    from benchmarks import redraw_case, trigger_rates
    from properties.case import FlexCase

    drawn = trigger_rates.hunt_cases(0, 4, "cpu")
    again = redraw_case.redraw(0, 1, "cpu", 4, restart_every=faults.HUNT_RESTART_EVERY, examples=4)
    assert [(c.to_json(), x) for c, x in drawn] == [(c.to_json(), x) for c, x in again]
    case = FlexCase(B=1, Hq=2, Hkv=1, Bk=1, L=20, S=20, E=8, Ev=8, dtype="float32", backward=False,
                    kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    pairs = [(case.to_json(), None)]
    assert trigger_rates.check_fault("fwd_lse_base2", pairs, "cpu")[0][0] == "matches_oracle"
    assert trigger_rates.check_fault("decode_gqa_interleaved", pairs, "cpu") == [None]
