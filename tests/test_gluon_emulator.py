"""kernels/gluon_emulator.py: Gluon kernels on the CPU, and the mistakes it must catch.

Each check pairs a small warp-specialized kernel written correctly, which must give the right
answer under every schedule tried, with the same kernel carrying one mistake that on a GPU hangs,
races or reads garbage, which the emulator must report (or, for a race, get wrong under some
schedule). The probes' own kernels run through it in tests/test_gluon_probe.py and
tests/test_gluon_probe_bwd.py.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import gluon_emulator as emu  # noqa: E402

BM, D = 64, 64
SEEDS = range(8)

# Mistakes, by number (the kernels' MODE argument).
OK, EMPTY_PHASE, NO_READY_WAIT, NO_ARRIVE, EARLY_RELEASE, NO_FENCE, UNWAITED, OUT_OF_BOUNDS = range(8)


@gluon.constexpr_function
def _acc_layout(n):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _ring_load(desc, bufs, bars, n_tiles, MODE):
    """The loader: tile j of ``desc`` into stage j % NUM_BUF once the stage is empty."""
    ready, empty = bars
    NUM_BUF: gl.constexpr = bufs.shape[0]
    ROWS: gl.constexpr = bufs.shape[1]
    for j in range(n_tiles):
        s = j % NUM_BUF
        phase = ((j // NUM_BUF) & 1) ^ 1  # the first pass through the ring does not wait
        if MODE == EMPTY_PHASE:
            phase = (j // NUM_BUF) & 1  # waits for a release that never comes: a hang on the GPU
        mbarrier.wait(empty.index(s), phase)
        mbarrier.expect(ready.index(s), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [j * ROWS, 0], ready.index(s), bufs.index(s))


@gluon.jit
def _ring_consume(desc, bufs, bars, n_tiles, MODE, w_smem, out_ptr):
    """The consumer: out = sum over tiles of tile_j @ W, W in shared memory (written here from
    registers), each tile's stage released once its product is done."""
    ready, empty = bars
    NUM_BUF: gl.constexpr = bufs.shape[0]
    ROWS: gl.constexpr = bufs.shape[1]
    COLS: gl.constexpr = bufs.shape[2]
    layout: gl.constexpr = _acc_layout(COLS)
    r = gl.arange(0, ROWS, gl.SliceLayout(1, layout))
    c = gl.arange(0, COLS, gl.SliceLayout(0, layout))
    eye = gl.where(gl.expand_dims(r, 1) == gl.expand_dims(c, 0), 2.0, 0.0)
    w_smem.store(eye.to(w_smem.dtype))
    if MODE != NO_FENCE:
        fence_async_shared()
    acc = gl.zeros([ROWS, COLS], gl.float32, layout)
    for j in range(n_tiles):
        s = j % NUM_BUF
        phase = (j // NUM_BUF) & 1
        if MODE != NO_READY_WAIT or j > 0:  # without it, the first tile may not have landed
            mbarrier.wait(ready.index(s), phase)
        acc = warpgroup_mma(bufs.index(s), w_smem, acc, is_async=True)
        if MODE == EARLY_RELEASE:
            mbarrier.arrive(empty.index(s), count=1)  # the stage refilled while the MMA may read it
        if MODE == UNWAITED:
            acc = acc * 1.0
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        if MODE != EARLY_RELEASE and MODE != NO_ARRIVE:
            mbarrier.arrive(empty.index(s), count=1)
    offs = gl.expand_dims(r * COLS, 1) + gl.expand_dims(c, 0)
    if MODE == OUT_OF_BOUNDS:
        offs = offs + 1
    gl.store(out_ptr + offs, acc)


@gluon.jit
def _ring_kernel(desc, out_ptr, n_tiles, MODE, NUM_BUF: gl.constexpr):
    ROWS: gl.constexpr = desc.block_type.shape[0]
    COLS: gl.constexpr = desc.block_type.shape[1]
    bufs = gl.allocate_shared_memory(desc.dtype, [NUM_BUF, ROWS, COLS], desc.layout)
    w_smem = gl.allocate_shared_memory(desc.dtype, [COLS, COLS], desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    bars = (ready, empty)
    gl.warp_specialize([(_ring_consume, (desc, bufs, bars, n_tiles, MODE, w_smem, out_ptr)),
                        (_ring_load, (desc, bufs, bars, n_tiles, MODE))], [1], [24])


def _ring(mode: int, seed: int, n_tiles: int = 6, num_buf: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tiles * BM, D, generator=g).to(torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [BM, D], layout)
    out = torch.full((BM, D), float("nan"))
    emu.launch(_ring_kernel, (1, ), (desc, out, n_tiles, mode, num_buf), dict(num_warps=4), seed=seed)
    want = 2 * x.float().reshape(n_tiles, BM, D).sum(0)
    return out, want


@pytest.mark.parametrize("seed", SEEDS)
def test_a_correct_ring_is_right_under_every_schedule(seed):
    out, want = _ring(OK, seed)
    # Powers of two times bf16 values, summed over 6 tiles in float32: exact to float32 rounding.
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_a_wrong_phase_on_the_empty_barrier_is_a_deadlock_naming_both_waits():
    with pytest.raises(emu.Deadlock) as err:
        _ring(EMPTY_PHASE, 0)
    text = str(err.value)
    # Both partitions are named with the barrier, where it was allocated and the phase awaited.
    assert "'_ring_load'" in text and "'_ring_consume'" in text, text
    assert "barrier 0 of the allocation at test_gluon_emulator.py" in text and "phase parity 0" in text, text


def test_a_consumer_that_never_releases_its_stage_deadlocks_the_loader():
    with pytest.raises(emu.Deadlock, match="'_ring_load'.*1 of 1 arrivals and 0 bytes outstanding"):
        _ring(NO_ARRIVE, 0)


def test_reading_a_stage_without_waiting_for_its_copy_is_a_race_some_schedule_loses():
    # The first tile multiplied without waiting on its barrier: under schedules where its copy
    # has not landed when the MMA reads it, the stage's unwritten shared memory (NaN) goes in.
    # The next wait on that stage then expects the wrong phase: some schedules go on a round
    # early (NaN or a stale tile), some leave both partitions waiting (a hang on the GPU).
    outcomes = []
    for seed in SEEDS:
        try:
            out, want = _ring(NO_READY_WAIT, seed)
            outcomes.append(torch.allclose(out, want, rtol=1e-6, atol=1e-6))
        except emu.Deadlock:
            outcomes.append(False)
    assert not all(outcomes) and any(outcomes), outcomes


def test_refilling_a_stage_that_an_mma_in_flight_reads_is_an_error():
    """The consumer releases its stage before waiting for the MMA that reads it: when the loader
    then issues the next copy into that stage, the emulator reports the MMA (on the GPU it may
    read either tile). The loader gets there first under most schedules: the release of a phase
    hands over at once."""
    caught = 0
    for seed in SEEDS:
        try:
            _ring(EARLY_RELEASE, seed)
        except emu.EmulationError as err:
            assert "the TMA load at test_gluon_emulator.py" in str(err) and "has not been waited for" in str(err)
            assert "warpgroup_mma at test_gluon_emulator.py" in str(err) and "(_ring_consume)" in str(err)
            caught += 1
    assert caught >= len(SEEDS) // 2, caught


def test_an_mma_reading_a_store_without_a_fence_is_an_error():
    with pytest.raises(emu.EmulationError, match="no fence_async_shared since"):
        _ring(NO_FENCE, 0)


def test_an_asynchronous_mma_result_used_before_its_wait_is_an_error():
    with pytest.raises(emu.EmulationError, match="used before warpgroup_mma_wait"):
        _ring(UNWAITED, 0)


def test_a_store_past_the_end_of_a_tensor_names_the_argument():
    with pytest.raises(emu.EmulationError, match=r"gl.store out of bounds .*offsets 4096 to 4096 \(1 lanes\) of "
                                                 r"out_ptr, which has 4096 elements"):
        _ring(OUT_OF_BOUNDS, 0)


@gluon.jit
def _tail_kernel(desc, out_ptr, row0):
    """One TMA box at row ``row0`` (past the end in part), stored as loaded."""
    ROWS: gl.constexpr = desc.block_type.shape[0]
    COLS: gl.constexpr = desc.block_type.shape[1]
    smem = gl.allocate_shared_memory(desc.dtype, [ROWS, COLS], desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    mbarrier.expect(bar.index(0), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [row0, 0], bar.index(0), smem)
    mbarrier.wait(bar.index(0), 0)
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    x = smem.load(layout)
    r = gl.arange(0, ROWS, gl.SliceLayout(1, layout))
    c = gl.arange(0, COLS, gl.SliceLayout(0, layout))
    gl.store(out_ptr + gl.expand_dims(r * COLS, 1) + gl.expand_dims(c, 0), x)


def test_a_tma_box_past_the_end_is_zero_filled_and_still_delivers_its_bytes():
    """Rows past the tensor read as zeros, and the barrier completes on the whole box's bytes
    (the expect of a full box would otherwise hang)."""
    x = torch.arange(100 * D, dtype=torch.float32).reshape(100, D).to(torch.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16))
    out = torch.full((BM, D), float("nan"), dtype=torch.bfloat16)
    emu.launch(_tail_kernel, (1, ), (desc, out, 64), dict(num_warps=4))
    assert torch.equal(out[:36], x[64:]) and (out[36:] == 0).all()


def test_launch_refuses_gpu_tensors_and_wrong_argument_counts():
    x = torch.zeros(BM, D, dtype=torch.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16))
    with pytest.raises(TypeError, match="takes 5 arguments, got 3"):
        emu.launch(_ring_kernel, (1, ), (desc, x, 1))
    with pytest.raises(TypeError, match="Expected a @gluon.jit kernel"):
        emu.launch(lambda: None, (1, ), ())
    if torch.cuda.is_available():
        with pytest.raises(emu.EmulationError, match="emulator runs on CPU tensors"):
            emu.launch(_ring_kernel, (1, ), (desc, x.cuda(), 1, OK, 2))


_RELEASE = threading.Event()


@gluon.jit
def _store_kernel(out_ptr):
    gl.store(out_ptr, 1.0)


def test_a_program_that_stops_handing_over_is_reported_not_hung(monkeypatch):
    """The safety net for a partition stuck outside the schedule (an emulator bug, or a kernel
    spinning without touching memory; here a store made to block): launch gives up after
    STALL_SECONDS with the partitions' states, instead of hanging the test run."""
    def stuck(*args, **kwargs):
        _RELEASE.wait(30)
    monkeypatch.setattr(emu, "STALL_SECONDS", 0.3)
    monkeypatch.setattr(emu.GL, "store", stuck)
    _RELEASE.clear()
    timer = threading.Timer(1.0, _RELEASE.set)  # frees the stuck thread once the error is out
    timer.start()
    try:
        with pytest.raises(emu.EmulationError, match="no progress in 0.3 s"):
            emu.launch(_store_kernel, (1, ), (torch.zeros(1), ))
    finally:
        _RELEASE.set()
        timer.cancel()
