"""Where the Triton code runs: compiled for CUDA tensors, interpreted for CPU tensors.

``triton.jit`` decides at decoration time whether a function is compiled or
interpreted (``TRITON_INTERPRET``), and the two kinds cannot call each other.
So the kernel modules are loaded twice when a process needs both: once as
``kernels.forward`` etc. in the process's own mode, and once more, interpreted,
as ``kernels._interpreted.forward`` (a synthetic package over the same files,
so their relative imports resolve to interpreted siblings).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import triton

_TRITON_MODULES = ("forward", "backward", "decode")
_PACKAGE = __name__.rsplit(".", 1)[0]


def process_interprets() -> bool:
    """True when every ``triton.jit`` in this process is interpreted (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


@contextlib.contextmanager
def interpreting():
    """Decorate with ``triton.jit`` in interpreter mode inside this block."""
    knobs = triton.knobs.runtime
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved = knobs.__dict__.get("interpret", None)
    knobs.interpret = True
    try:
        yield
    finally:
        if saved is None:
            knobs.__dict__.pop("interpret", None)
        else:
            knobs.__dict__["interpret"] = saved
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


_variants: dict = {}


def module(name: str, interpret: bool) -> types.ModuleType:
    """The Triton module ``name`` (forward, backward, decode) in the requested mode."""
    if interpret == process_interprets():
        return importlib.import_module(f"{_PACKAGE}.{name}")
    if not interpret:
        raise RuntimeError(
            "This process runs Triton in interpreter mode (TRITON_INTERPRET=1), so CUDA tensors "
            "cannot use compiled kernels. Unset TRITON_INTERPRET to run on the GPU."
        )
    key = f"{_PACKAGE}._interpreted"
    if key not in _variants:
        pkg = types.ModuleType(key)
        pkg.__path__ = list(sys.modules[_PACKAGE].__path__)
        sys.modules[key] = pkg
        with interpreting():
            for mod in _TRITON_MODULES:
                importlib.import_module(f"{key}.{mod}")
        _variants[key] = pkg
    return sys.modules[f"{key}.{name}"]


def needs_interpreter(tensor) -> bool:
    return tensor.device.type == "cpu"


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
