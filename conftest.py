"""Repository-wide pytest setup: the flex-oracle plugin, and why gpu and slow tests are skipped."""

from __future__ import annotations

import functools
import os
import sys

import pytest

# When the project is installed, the pytest11 entry point has loaded the plugin
# before any conftest is read; naming it again here would register the same
# module twice, which pytest refuses.
pytest_plugins = [] if "properties.plugin" in sys.modules else ["properties.plugin"]

GPU_SKIP_REASON = "needs a CUDA GPU; run on the H100 with: python -m pytest -m gpu"
SLOW_SKIP_REASON = "slow (minutes of CPU time); run with --run-slow"


@functools.cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # Triton reads TRITON_INTERPRET when a kernel is defined, that is when the
    # test modules import kernels; without a GPU the interpreter is the only
    # way to run them. An explicit setting is left alone.
    if not cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _share_the_cores(config)


# The thread pools that size themselves to the machine's cores when a process loads them.
THREAD_POOLS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _share_the_cores(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores for torch's and numpy's
    thread pools. Each pool otherwise takes every core, so on CI's 2 cores two workers ran
    four busy threads on the oracle's float64 products and the interpreter's numpy calls,
    and the time went to contention: the saved cases' file took 161 s on two workers and
    95 s with one thread each. The workers inherit the variables, set here in the
    controller before they start; a variable already set is left alone."""
    workers = getattr(config.option, "numprocesses", None)
    if not isinstance(workers, int) or workers < 1 or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in THREAD_POOLS:
        os.environ.setdefault(name, threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = None if cuda_available() else pytest.mark.skip(reason=GPU_SKIP_REASON)
    skip_slow = None if config.getoption("run_slow") else pytest.mark.skip(reason=SLOW_SKIP_REASON)
    for item in items:
        if skip_gpu is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
        if skip_slow is not None and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)
