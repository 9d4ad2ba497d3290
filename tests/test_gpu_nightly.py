"""``.ci/gpu-nightly``'s guards that run before anything needs a GPU."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_refuses_a_log_folder_holding_an_earlier_run(tmp_path):
    """A reused FUZZ_LOG_DIR would put an earlier run's failures into this run's tarball (a
    machine's /tmp/fz once held records three sessions old): the job stops before any fuzzing."""
    logs = tmp_path / "fz"
    (logs / "failures-1-0").mkdir(parents=True)
    (logs / "failures-1-0" / "found-matches_oracle-0.json").write_text("{}")
    env = dict(os.environ, STEPS="fuzz", FUZZ_PROCS="1", FUZZ_SECONDS="1", FUZZ_LOG_DIR=str(logs),
               OUT=str(tmp_path / "out"), PYTHON="false")
    run = subprocess.run([str(ROOT / ".ci" / "gpu-nightly")], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"FUZZ_LOG_DIR={logs} holds files of an earlier run" in run.stderr
    assert not (tmp_path / "out" / "fuzz_failures.tgz").exists()


def test_probe_tests_run_apart_from_the_gpu_tests(tmp_path):
    """The tests step leaves the probe-marked tests out; the probes step (not a default) runs them
    alone under a timeout of its own, into its own log."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, STEPS="tests probes", OUT=str(out), PYTHON=str(stub))
    run = subprocess.run([str(ROOT / ".ci" / "gpu-nightly")], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "-m pytest -m gpu and not probe -n 8" in (out / "gpu_tests.log").read_text()
    assert "-m pytest -m gpu and probe -n 8" in (out / "gpu_probe_tests.log").read_text()
    default = subprocess.run(["grep", "-n", "^STEPS=", str(ROOT / ".ci" / "gpu-nightly")], capture_output=True,
                             text=True).stdout
    assert "probes" not in default, default


def test_fuzz_target_is_chosen_by_fuzz_target(tmp_path):
    """FUZZ_TARGET picks what the fuzz processes run (default: our kernels). A slot starts a
    process while more than 20 s of FUZZ_SECONDS are left, hence 25."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    for target, want in ((None, "--target kernels --device cuda"),
                         ("kernels-dq-atomic", "--target kernels-dq-atomic --device cuda")):
        logs = tmp_path / f"fz-{target}"
        env = dict(os.environ, STEPS="fuzz", FUZZ_PROCS="1", FUZZ_SECONDS="25", FUZZ_LOG_DIR=str(logs),
                   OUT=str(tmp_path / f"out-{target}"), PYTHON=str(stub))
        if target:
            env["FUZZ_TARGET"] = target
        run = subprocess.run([str(ROOT / ".ci" / "gpu-nightly")], capture_output=True, text=True, env=env,
                             timeout=60)
        text = run.stdout + run.stderr + "".join(p.read_text() for p in logs.rglob("*") if p.is_file())
        assert want in text, text
