"""Where the Triton code runs: compiled for CUDA tensors, interpreted for CPU tensors.

``triton.jit`` decides when a function is defined whether it is compiled or
interpreted (``TRITON_INTERPRET``), and so do Triton's own library functions
(``tl.sum``, ``tl.max``), so one process runs one way. ``kernels`` sets
``TRITON_INTERPRET=1`` on machines without CUDA; a process that compiles for a
GPU takes CUDA tensors only, and says so for CPU ones.
"""

from __future__ import annotations

import importlib

import triton

_PACKAGE = __name__.rsplit(".", 1)[0]


def process_interprets() -> bool:
    """True when every ``triton.jit`` in this process is interpreted (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def check_device(tensor) -> bool:
    """Whether ``tensor``'s kernels run interpreted; a clear error when this process cannot run them."""
    interpret = process_interprets()
    if tensor.device.type == "cpu" and not interpret:
        raise ValueError(
            "Expected CUDA tensors: this process compiles the kernels for the GPU. CPU tensors run "
            "under the Triton interpreter, which must be chosen before any kernel is defined: run "
            "the CPU work in a process started with TRITON_INTERPRET=1 (kernels sets it itself "
            "on machines without CUDA)."
        )
    if tensor.device.type == "cuda" and interpret:
        raise ValueError(
            "Expected CPU tensors: this process runs Triton in interpreter mode (TRITON_INTERPRET=1), "
            "so CUDA tensors cannot use compiled kernels. Unset TRITON_INTERPRET to run on the GPU."
        )
    return interpret


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host: ``triton.cdiv`` is a ConstexprFunction, several microseconds a call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), without ``triton.next_power_of_2``'s call cost."""
    return 1 << max(0, int(n) - 1).bit_length()


def module(name: str):
    """The Triton module ``name`` (forward, backward, decode)."""
    return importlib.import_module(f"{_PACKAGE}.{name}")


_stages_that_fit: dict = {}


def launch(kernel, grid, *args, num_stages: int, **kwargs):
    """Launch ``kernel``; if its pipeline needs more shared memory than the GPU has, retry
    with fewer stages (captured tables are pipelined too, so a score mod can tip a config over).
    """
    key = (id(kernel), tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, str, bool)))))
    stages = min(num_stages, _stages_that_fit.get(key, num_stages))
    while True:
        try:
            return kernel[grid](*args, num_stages=stages, **kwargs)
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _stages_that_fit[key] = stages
