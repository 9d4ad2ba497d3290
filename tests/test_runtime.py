"""kernels._runtime: the interpreter's language patches made once a launch
(``share_interpreter_patches``) change no result, and skip what they say they skip; each
interpreted launch runs on a fresh stack (``FRESH_STACK``) with the same result; and the
test run's own setup (conftest.py) shares the cores among pytest-xdist's workers."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

import pytest
import torch
from triton.runtime import interpreter as _interpreter

import kernels
from kernels import _runtime, mods

interprets = pytest.mark.skipif(not _runtime.process_interprets(),
                                reason="the interpreter's patches: a process that compiles for the GPU has none")

# Triton's own _patch_lang (each call swaps every builtin of the language's modules)
_OWN = _runtime._unshared.get("patch_lang", _interpreter._patch_lang)


def _run_both(fn):
    """``fn()`` with the patches shared and made Triton's own way, and the functions whose
    calls reached Triton's own ``_patch_lang``, each way."""
    results, swaps = [], []
    for shared in (True, False):
        calls = []

        def counted(fn_, calls=calls):
            calls.append(fn_.__name__)
            return _OWN(fn_)

        _runtime.unshare_interpreter_patches()
        _interpreter._patch_lang = counted
        if shared:
            _runtime.share_interpreter_patches()
        try:
            results.append(fn())
        finally:
            _runtime.unshare_interpreter_patches()
            _interpreter._patch_lang = _OWN
            _runtime.share_interpreter_patches()
        swaps.append(calls)
    return results, swaps


@interprets
def test_the_patches_are_shared_in_an_interpreting_process():
    assert _runtime._unshared, "kernels._runtime shares the interpreter's patches when the process interprets"
    assert _interpreter._patch_lang is not _OWN


@interprets
def test_shared_patches_give_the_same_bits_forward_and_backward():
    """A softcapped, document-masked GQA forward and backward (nested jit calls: the tiles,
    the score mod and its derivative) equal Triton's own way bit for bit, with far fewer
    swaps of the language's builtins (at most two a launch, against one a call)."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, E = 1, 4, 2, 160, 16
    q0, k0, v0 = (torch.randn(B, h, L, E, generator=g).to(torch.bfloat16) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, Hq, L, E, generator=g).to(torch.bfloat16)
    bm = create_block_mask(mods.document(torch.tensor([0] * 70 + [1] * 90)), 1, 1, L, L, device="cpu",
                           BLOCK_SIZE=32)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out, lse = kernels.flex_attention(q, k, v, score_mod=mods.tanh_softcap(20.0), block_mask=bm,
                                          enable_gqa=True, return_lse=True)
        out.backward(do)
        return out.detach(), lse, q.grad, k.grad, v.grad

    (shared, own), (shared_swaps, own_swaps) = _run_both(run)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), shared, own):
        assert torch.equal(a, b), f"{name} differs with the shared patches"
    # Shared: each launch swaps once for the kernel's tl and once for the first call of a
    # library function (tl.zeros, tl.sum), whose module sees triton.language.core.
    launches = [name for name in shared_swaps if name.endswith("_kernel")]
    assert len(launches) >= 4 and launches == [name for name in own_swaps if name.endswith("_kernel")]
    assert len(shared_swaps) <= 2 * len(launches), shared_swaps
    assert len(own_swaps) > 20 * len(shared_swaps), (len(own_swaps), shared_swaps)


def test_on_fresh_stack_returns_and_raises_as_the_call_would():
    import threading

    caller = threading.current_thread()
    assert _runtime.on_fresh_stack(lambda a, b: (a + b, threading.current_thread()), 2, 3)[0] == 5
    assert _runtime.on_fresh_stack(lambda: threading.current_thread()) is not caller
    with pytest.raises(KeyError, match="missing"):
        _runtime.on_fresh_stack(lambda: {}["missing"])
    # The caller's context variables (Triton's allocator is one) are the worker's.
    import contextvars

    var = contextvars.ContextVar("flex_oracle_test_var", default="unset")
    token = var.set("caller's")
    try:
        assert _runtime.on_fresh_stack(var.get) == "caller's"
    finally:
        var.reset(token)


@interprets
def test_interpreted_launches_run_on_a_fresh_stack_with_the_same_bits(monkeypatch):
    """With FRESH_STACK each interpreted launch runs on a thread of its own (CPython's frame
    chunks, kernels._runtime), called from however deep, and gives the bits it gives inline."""
    import threading

    g = torch.Generator().manual_seed(5)
    q0, k0, v0 = (torch.randn(1, 2, 80, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    do = torch.randn(1, 2, 80, 16, generator=g).to(torch.bfloat16)
    threads = []
    inner = _runtime.on_fresh_stack

    def spy(fn, *args):
        return inner(lambda *a: (threads.append(threading.current_thread()), fn(*a))[1], *args)

    def run(depth):
        if depth:
            return run(depth - 1)
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = kernels.flex_attention(q, k, v, score_mod=mods.tanh_softcap(20.0))
        out.backward(do)
        return out.detach(), q.grad, k.grad, v.grad

    monkeypatch.setattr(_runtime, "on_fresh_stack", spy)
    monkeypatch.setattr(_runtime, "FRESH_STACK", True)
    fresh = run(60)
    assert len(threads) >= 3 and threading.current_thread() not in threads
    monkeypatch.setattr(_runtime, "FRESH_STACK", False)
    launched = len(threads)
    inline = run(60)
    assert len(threads) == launched
    for name, a, b in zip(("out", "dq", "dk", "dv"), fresh, inline):
        assert torch.equal(a, b), f"{name} differs on a fresh stack"


@interprets
def test_a_call_that_sees_an_unpatched_module_still_swaps(tmp_path, monkeypatch):
    """A kernel that sees ``tl`` alone calls a helper that sees ``triton.language.core`` alone:
    the launch patched ``tl``, so the helper's call patches ``core``, as Triton's own way does,
    and the two give the same result."""
    (tmp_path / "flex_oracle_core_helper.py").write_text(textwrap.dedent("""
        import triton
        import triton.language.core as core


        @triton.jit
        def clamp_low(x, low):
            return core.where(x < low, low, x)
    """))
    (tmp_path / "flex_oracle_tl_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        from flex_oracle_core_helper import clamp_low


        @triton.jit
        def clamp_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n)
            tl.store(out_ptr + offs, clamp_low(x, 0.25), mask=offs < n)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("flex_oracle_tl_kernel")
    try:
        x = torch.linspace(-1, 1, 50)

        def run():
            out = torch.empty_like(x)
            module.clamp_kernel[(2,)](x, out, 50, BLOCK=32)
            return out

        (shared, own), (shared_swaps, own_swaps) = _run_both(run)
        assert torch.equal(shared, own) and torch.equal(shared, x.clamp(min=0.25))
        assert shared_swaps == ["clamp_kernel", "clamp_low"]  # the launch, then the helper's module once
        assert own_swaps == ["clamp_kernel", "clamp_low", "clamp_low"]  # and the helper at each program
    finally:
        for name in ("flex_oracle_tl_kernel", "flex_oracle_core_helper"):
            sys.modules.pop(name, None)


@pytest.mark.skipif(not os.environ.get("PYTEST_XDIST_WORKER"), reason="checks pytest-xdist's workers: run with -n")
def test_each_worker_takes_its_share_of_the_cores():
    """conftest.py sets the thread pools' sizes to the cores over the workers, so that two
    workers on CI's two cores run one thread each (not two each, contending)."""
    import conftest

    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    share = max(1, (os.cpu_count() or 1) // workers)
    assert all(os.environ.get(name) for name in conftest.THREAD_POOLS)
    if os.environ["OMP_NUM_THREADS"] == str(share):  # not set by hand before the run
        assert torch.get_num_threads() == share
