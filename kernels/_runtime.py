"""Where the Triton code runs: compiled for CUDA tensors, interpreted for CPU tensors.

``triton.jit`` decides when a function is defined whether it is compiled or
interpreted (``TRITON_INTERPRET``), and so do Triton's own library functions
(``tl.sum``, ``tl.max``), so one process runs one way. ``kernels`` sets
``TRITON_INTERPRET=1`` on machines without CUDA; a process that compiles for a
GPU takes CUDA tensors only, and says so for CPU ones.
"""

from __future__ import annotations

import importlib
from typing import Optional

import triton
from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor

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

# Launch without Triton's per-call dispatch (set False to always go through ``kernel[grid]``).
DIRECT_LAUNCH = True
_direct: dict = {}
direct_launches = 0  # how many launches took the direct path (benchmarks/host_overhead.py reports it)


def _spec(args) -> tuple:
    """The runtime arguments as a cache key: each tensor by dtype and 16-byte alignment
    (what Triton specializes pointers on), everything else (ints, floats, bools) by value,
    which is stricter than Triton's own classes (an int's 1-ness, divisibility by 16, width).
    Values compare across types (1 == 1.0 == True); our call sites pass each position one
    type (ints for sizes and strides, a float scale), so that cannot merge two kernels."""
    import torch

    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                  else _desc_spec(a) if isinstance(a, _TensorDescriptor) else a for a in args])


def _desc_spec(d) -> tuple:
    """A TMA descriptor (kernels.forward.TMA_KV, kernels.backward.TMA_DQ / TMA_DKDV) as a cache key:
    everything it holds but the address (its base's dtype and 16-byte alignment, shape, strides,
    box and padding), finer than what Triton specializes on (the dtype and the box)."""
    return ("tensordesc", d.base.dtype, not d.base.data_ptr() & 15, tuple(d.shape), tuple(d.strides),
            tuple(d.block_shape), d.padding)


class TilesTooLarge(ValueError):
    """The tiles a caller's ``kernel_options`` set need more shared memory than the GPU has,
    even with one pipeline stage (float32 tiles at a head dim of 128 can: four bytes an
    element). ``options`` are the offending options, ``required`` and ``limit`` in bytes."""

    def __init__(self, message: str, options: dict, required: int, limit: int):
        super().__init__(message)
        self.options, self.required, self.limit = options, required, limit


def launch(kernel, grid, *args, num_stages: int, options: Optional[dict] = None, **kwargs):
    """Launch ``kernel``; if its pipeline needs more shared memory than the GPU has, retry
    with fewer stages (captured tables are pipelined too, so a score mod can tip a config over).
    ``options`` (not passed to the kernel) are the ``kernel_options`` the caller set that
    chose this launch's tiles, by name: if even one stage does not fit, ``TilesTooLarge``
    names them and the fix. Without them (our defaults) Triton's ``OutOfResources`` stands:
    a default that does not fit is our bug, never the caller's.

    Compiled launches after the first of a kind skip ``JITFunction.run``'s binding and cache
    lookup (about half of a forward call's host time on the H200, where a short kernel waits
    for the host): the compiled kernel is cached under everything Triton specializes on (the
    constexpr keywords, the launch options, the runtime arguments' classes, the device) and
    called as ``JITFunction.run`` calls it, launch hooks included.
    """
    key = None
    if _stages_that_fit:
        key = (id(kernel), tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, str, bool)))))
        num_stages = min(num_stages, _stages_that_fit.get(key, num_stages))
    if not DIRECT_LAUNCH or process_interprets():
        return _launch_retrying(kernel, grid, args, num_stages, kwargs, key, options)
    import torch

    device = torch.cuda.current_device()
    spec = (id(kernel), num_stages, device, tuple(kwargs.items()), _spec(args))
    try:
        hit = _direct.get(spec)
    except TypeError:  # an unhashable argument: Triton's own dispatch decides
        return _launch_retrying(kernel, grid, args, num_stages, kwargs, key, options)
    if hit is None:
        compiled = _launch_retrying(kernel, grid, args, num_stages, kwargs, key, options)
        if compiled is not None and hasattr(compiled, "packed_metadata"):
            # Constexprs follow the runtime arguments in the kernels' signatures; the launcher
            # takes every parameter in order and skips the constexprs itself.
            names = kernel.arg_names[len(args):]
            if all(n in kwargs for n in names):
                if len(_direct) > 512:
                    _direct.clear()
                _direct[spec] = (compiled, tuple(kwargs[n] for n in names))
        return compiled
    global direct_launches
    direct_launches += 1
    compiled, constexprs = hit
    g = tuple(grid) + (1, 1)
    stream = torch._C._cuda_getCurrentRawStream(device)
    hooks = triton.knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    meta = compiled.launch_metadata(g[:3], stream, *args, *constexprs) if enter is not None else None
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta,
                 enter, leave, *args, *constexprs)
    return compiled


def _launch_retrying(kernel, grid, args, num_stages, kwargs, key, options=None):
    stages = num_stages
    while True:
        try:
            return kernel[grid](*args, num_stages=stages, **kwargs)
        except triton.runtime.errors.OutOfResources as exc:
            if stages <= 1:
                if options and getattr(exc, "name", None) == "shared memory":
                    raise _too_large(kernel, kwargs, options, exc) from exc
                raise
            stages -= 1
            if key is None:
                key = (id(kernel), tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, str, bool)))))
            _stages_that_fit[key] = stages


def _too_large(kernel, kwargs, options: dict, exc) -> TilesTooLarge:
    given = ", ".join(f"{k}={v}" for k, v in options.items())
    tiles = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N") if k in kwargs)
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "the kernel")
    dims = ", ".join(f"{k}={kwargs[k]}" for k in ("QK_PAD", "V_PAD") if k in kwargs)
    return TilesTooLarge(
        f"kernel_options {given} give {name} {tiles} tiles" + (f" ({dims})" if dims else "")
        + f" that need {exc.required} bytes of shared memory even with num_stages=1; this GPU has "
        f"{exc.limit}. Pass smaller tiles (halve one of {', '.join(options)}), or leave them out "
        f"for defaults that fit.", dict(options), exc.required, exc.limit)



# --------------------------------------------------------------------------
# the interpreter's language patches, made once a launch

_unshared: dict = {}  # Triton's own functions while share_interpreter_patches is in place

# Each interpreted launch runs on a thread of its own (``on_fresh_stack``), while the patches above
# are in place. CPython 3.11 keeps Python frames on a data stack of 16 KiB chunks and frees a chunk
# as soon as the frame at its base returns, so a loop whose calls cross a chunk's end maps and
# unmaps a chunk on every call. How often an interpreted kernel's millions of calls do depends on
# how deep the stack was where the launch began. The saved case
# tests/cases/table-gradient-delta-rounding-bf16-broadcast.json, replayed with kernel bodies written
# as nested triton.jit functions, took 21 to 24 s when begun 0 to 40 frames deep, 53 s at 50 frames
# (2.77 million mmap and munmap pairs, strace; 0.10 million at 90), 42 s at 60, 33 s at 70, 23 s at
# 90, and 37 to 44 s under pytest; begun on a new thread, whose stack starts empty, 24 to 25 s from
# 0, 50 and 60 frames. With today's kernels: 26.6 s at 0 frames and 32.5 s at 50, and on a new
# thread 24.7 and 26.3 s (docs/PERFORMANCE.md, thirty-eighth session). A thread costs tens of
# microseconds a launch; an interpreted launch takes milliseconds to seconds.
FRESH_STACK = True


def on_fresh_stack(fn, *args):
    """``fn(*args)`` on a new thread, waited for: its result, or its exception raised here. It
    runs in a copy of the caller's context, so context variables (Triton's allocator,
    ``triton.set_allocator``) read as the caller set them."""
    import contextvars
    import threading

    box: dict = {}
    context = contextvars.copy_context()

    def body():
        try:
            box["value"] = context.run(fn, *args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=body, name="triton-interpreter-launch", daemon=True)
    worker.start()
    worker.join()
    error = box.pop("error", None)
    if error is not None:
        try:
            raise error
        finally:
            del error
    return box.get("value")


def share_interpreter_patches() -> bool:
    """Make Triton's interpreter patch ``triton.language`` once a launch, not once a call.

    A launch (``GridExecutor.__call__``) swaps every builtin of ``tl``, ``tl.core``,
    ``tl.math`` and ``tl.tensor`` for an interpreted one and restores them when the grid
    is done. Each call of a ``triton.jit`` function inside the kernel (``load_tile``,
    ``forward_step``, a score mod) swaps them all again, for the same functions, and
    never restores them: about 1.4 ms of ``inspect.getmembers`` a call, a quarter of the
    CPU time of an interpreted backward (a saved case's replay: 31 s of 129 s). Inside a
    launch, a call whose modules the launch has patched now skips the swap; a call that
    sees a module not yet patched (``tl.core`` under a kernel that imports ``tl`` alone)
    swaps as before. What runs is unchanged: the patched functions are the same, and
    ``tests/test_runtime.py`` checks kernels bit for bit against Triton's own way. It
    applies to every interpreted kernel in the process, a caller's included. triton-viz
    took the same path for its interpreter (Deep-Learning-Profiling-Tools/triton-viz#407:
    nested calls unpatched, helpers that reference ``tl.core`` patched again). With
    ``FRESH_STACK`` each launch also runs on a thread of its own (``on_fresh_stack``). Returns
    whether the patch is in place; a Triton without these internals is left alone."""
    if _unshared:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    tl = getattr(interpreter, "tl", None)
    if not (callable(original) and callable(getattr(executor, "__call__", None))
            and scope_type is not None and tl is not None):
        return False
    import threading

    state = threading.local()  # .patched: ids of the modules the running launch patched; None outside
    launch_call = executor.__call__

    def patch_lang(fn):
        patched = getattr(state, "patched", None)
        needed = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        if patched and needed <= patched:  # a call inside a launch whose modules are patched
            return scope_type()
        scope = original(fn)  # outside a launch, the launch's own patch, or a module not yet patched
        if patched is not None:
            state.patched = patched | needed
        return scope

    def run_grid(self, args, kwargs):
        outer = getattr(state, "patched", None)
        state.patched = frozenset()
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            state.patched = outer

    def call(self, *args, **kwargs):
        if FRESH_STACK:
            return on_fresh_stack(run_grid, self, args, kwargs)
        return run_grid(self, args, kwargs)

    _unshared.update(patch_lang=original, call=launch_call)
    interpreter._patch_lang = patch_lang
    executor.__call__ = call
    return True


def unshare_interpreter_patches() -> None:
    """Give Triton's interpreter its own way back (tests compare the two)."""
    if not _unshared:
        return
    from triton.runtime import interpreter

    interpreter._patch_lang = _unshared["patch_lang"]
    interpreter.GridExecutor.__call__ = _unshared["call"]
    _unshared.clear()


if process_interprets():
    share_interpreter_patches()
