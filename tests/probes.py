"""The Gluon probes' ``--compile-only`` report, run as the tests run it: a fresh process with the
interpreter off (Triton reads TRITON_INTERPRET when a kernel is defined), the repository on the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_only_rows(script: Path) -> list:
    """The JSON rows ``script --compile-only`` prints (one per compiled variant); fails the test
    with the end of its stderr if it exits non-zero."""
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "flex-oracle-gluon-cache"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    run = subprocess.run([sys.executable, str(script), "--compile-only"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
