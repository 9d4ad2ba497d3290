"""Gluon kernels on the CPU: an emulator of the Hopper subset our Gluon kernels use.

Triton's interpreter (``TRITON_INTERPRET=1``) runs ``@triton.jit`` kernels on the CPU but not
``@gluon.jit`` ones, whose warp-specialized partitions meet on mbarriers, load through TMA and
multiply with asynchronous warpgroup MMAs. ``launch(kernel, grid, args)`` runs such a kernel's
Python body on CPU tensors, one program at a time, each partition of ``gl.warp_specialize`` in a
thread of its own, and checks what the GPU would not report:

* **Schedules.** Only one partition runs at a time. At every operation on shared memory, a
  barrier, a TMA copy, an MMA or global memory, a seeded random choice picks which runnable
  partition goes on, so that a seed is one reproducible interleaving and other seeds others.
* **Barriers** count arrivals and TMA bytes per phase as the hardware does (``mbarrier.expect``
  arrives once and expects the bytes; a copy's completion delivers the box's bytes, zero-filled
  rows included); ``mbarrier.wait(bar, phase)`` returns once the barrier's phase parity differs
  from ``phase``. When no partition can run and no copy is in flight, ``Deadlock`` is raised
  naming every blocked partition, the barrier (where it was allocated, which index), the phase it
  waits for and the barrier's state: a mistake that hangs the GPU fails here.
* **TMA copies land late.** A copy writes shared memory when a random later switch completes it,
  so that reading a buffer before waiting on its barrier, or refilling a stage a consumer still
  reads, gives wrong values.
* **Asynchronous MMAs read their operands when waited for** (a schedule the hardware may take),
  so that overwriting an operand before ``warpgroup_mma_wait`` gives wrong values; using an
  asynchronous result before its wait raises ``EmulationError``, as does an MMA that reads shared
  memory stored to since the storing partition's last ``fence_async_shared``.
* **Global memory**: every unmasked load, store and atomic is bounds-checked against its tensor
  argument (``EmulationError`` names the argument and the offsets); masked lanes are not read.
* **Numbers**: integer arguments and program ids are int32 (so index arithmetic overflows as on
  the GPU), floats float32, MMAs multiply the bf16/fp16 operands exactly and sum in float32, and
  unwritten shared memory holds NaN. ``inline_asm_elementwise`` knows ``rcp.approx.ftz.f32`` only
  (computed as a division). Integer ``//`` and ``%`` follow PyTorch (floor), which matches
  Triton's (truncation) for non-negative operands only.

What it does not model: layouts (every ``convert_layout`` is the identity), warps within a
partition (a partition is one sequential program), register and shared-memory limits, time.
``tests/test_gluon_emulator.py`` holds it to these rules on small kernels written to break them;
``benchmarks/gluon_probe.py`` and ``benchmarks/gluon_probe_bwd.py`` run through it on CPU tensors.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import types

import torch
import triton.language as tl
from triton.experimental.gluon import language as _gl
from triton.experimental.gluon.language.nvidia import hopper as _hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier as _mbarrier
from triton.experimental.gluon.language.nvidia.hopper import tma as _tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import ConstexprFunction, JITFunction

__all__ = ["launch", "EmulationError", "Deadlock"]


class EmulationError(RuntimeError):
    """The kernel did something the GPU would compute wrong, hang on, or fault on."""


class Deadlock(EmulationError):
    """Every partition of a program waits on a barrier that nothing can complete."""


class _Abort(BaseException):
    """Unwinds a partition's thread after another partition failed."""


_tls = threading.local()


def _site(depth: int = 2) -> str:
    f = sys._getframe(depth)
    return f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} ({f.f_code.co_name})"


# --------------------------------------------------------------------------
# partitions and their schedule


class _Task:
    def __init__(self, sched, name, fn, pid):
        self.sched, self.name, self.fn, self.pid = sched, name, fn, pid
        self.pred = None  # None: runnable; else runnable once pred() holds
        self.waiting = None  # what it waits for, for Deadlock's message
        self.done = False
        self.mmas: list = []  # its asynchronous MMAs, oldest first
        self.number = len(sched.tasks) + 1
        self.thread = threading.Thread(target=self._main, name=f"gluon-{name}", daemon=True)

    def _main(self):
        _tls.task = self
        # Grad mode is per thread: a kernel writes its outputs in place, whatever the caller's mode.
        with torch.no_grad():
            self._run()

    def _run(self):
        sched = self.sched
        try:
            with sched.cv:
                while sched.current is not self:
                    if sched.error is not None:
                        raise _Abort
                    sched.cv.wait()
            self.fn()
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to launch(), which re-raises it
            with sched.cv:
                if sched.error is None:
                    sched.error = e
                    e.add_note(f"in partition {self.name!r} of program {self.pid}")
        finally:
            with sched.cv:
                self.done = True
                if sched.error is None and sched.current is self:
                    try:
                        sched._hand_off()
                    except BaseException as e:  # noqa: BLE001 - a copy that failed to land
                        sched.error, sched.current = e, None
                sched.cv.notify_all()


# At a switch point where the running partition could go on, the chance that the schedule
# chooses again among all runnable ones. A blocked partition always hands over, and so does one
# whose arrival completed a barrier's phase (the waiters it released may go first: where a race
# is). Lower is faster (a hand-over to another partition is a thread switch, about 0.3 ms);
# tests/test_gluon_emulator.py finds its races at this value.
SWITCH_P = 0.25
STALL_SECONDS = 300  # launch() gives up on a program whose partitions stop handing over


class _Scheduler:
    """One program's partitions: exactly one runs at a time; at each switch point a seeded random
    choice among the runnable ones, and in-flight TMA copies complete at random switches."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.cv = threading.Condition()
        self.tasks: list = []
        self.current = None
        self.error = None
        self.copies: list = []  # in-flight TMA copies (callables that land them), oldest first
        self.roots: list = []  # the program's shared-memory allocations
        self.hand_offs = 0

    def spawn(self, name, fn, pid):
        task = _Task(self, name, fn, pid)
        self.tasks.append(task)
        task.thread.start()
        return task

    def _land_some(self):
        keep = []
        for land in self.copies:
            if self.rng.random() < 0.5:
                land()
            else:
                keep.append(land)
        self.copies = keep

    def _hand_off(self):
        # Called with cv held by the running task (or by launch to start): choose who runs next.
        self.hand_offs += 1
        self._land_some()
        while True:
            ready = [t for t in self.tasks if not t.done and (t.pred is None or t.pred())]
            if ready:
                self.current = self.rng.choice(ready)
                break
            if self.copies:  # nothing can run until a copy lands
                self.copies.pop(self.rng.randrange(len(self.copies)))()
                continue
            self.current = None
            if not all(t.done for t in self.tasks):
                self.error = Deadlock(self._describe())
            break
        self.cv.notify_all()

    def _describe(self) -> str:
        lines = ["every partition waits and no copy is in flight:"]
        for t in self.tasks:
            if not t.done:
                lines.append(f"  partition {t.name!r} (program {t.pid}) waits for {t.waiting}")
        return "\n".join(lines)

    def switch(self, task, pred=None, waiting=None, force=False):
        with self.cv:
            if pred is None and not force and self.rng.random() >= SWITCH_P:
                self._land_some()  # the running partition goes on
                return
            task.pred, task.waiting = pred, waiting
            self._hand_off()
            while self.current is not task:
                if self.error is not None:
                    raise _Abort
                self.cv.wait()
            task.pred = task.waiting = None


def _point():
    """A switch point: another runnable partition may go on before this one continues."""
    task = _tls.task
    task.sched.switch(task)


def _block_until(pred, waiting):
    task = _tls.task
    if not pred():
        task.sched.switch(task, pred, waiting)


# --------------------------------------------------------------------------
# memory


class _Ptr:
    """A pointer (tensor of pointers): a tensor argument's memory and element offsets into it."""

    def __init__(self, base, off, name):
        self.base, self.off, self.name = base, off, name

    def _moved(self, x, sign=1):
        if isinstance(x, _Ptr):
            raise EmulationError(f"pointer arithmetic between two pointers ({self.name}, {x.name})")
        x = torch.as_tensor(x)
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise EmulationError(f"a pointer ({self.name}) offset by a {x.dtype} value")
        return _Ptr(self.base, self.off + sign * x.to(torch.int64), self.name)

    def __add__(self, x):
        return self._moved(x)

    __radd__ = __add__

    def __sub__(self, x):
        return self._moved(x, -1)


def _pointer(t: torch.Tensor, name: str) -> _Ptr:
    if t.device.type != "cpu":
        raise EmulationError(f"argument {name} is on {t.device}; the emulator runs on CPU tensors")
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    return _Ptr(t.as_strided((span,), (1,)), torch.zeros((), dtype=torch.int64), name)


def _lanes(ptr, mask, what):
    if not isinstance(ptr, _Ptr):
        raise EmulationError(f"gl.{what} of a {type(ptr).__name__}, not a pointer")
    off = ptr.off
    if mask is None:
        mask = torch.ones((), dtype=torch.bool)
    off, mask = torch.broadcast_tensors(off, torch.as_tensor(mask, dtype=torch.bool))
    sel = off[mask]
    n = ptr.base.numel()
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n):
        bad = sel[(sel < 0) | (sel >= n)]
        raise EmulationError(f"gl.{what} out of bounds at {_site(3)}: offsets {int(bad.min())} to {int(bad.max())} "
                             f"({bad.numel()} lanes) of {ptr.name}, which has {n} elements")
    return off, mask, sel


def _load(ptr, mask=None, other=None, **_):
    _point()
    off, mask, sel = _lanes(ptr, mask, "load")
    out = torch.zeros(off.shape, dtype=ptr.base.dtype)
    if other is not None:
        out[...] = torch.as_tensor(other).to(out.dtype)
    out[mask] = ptr.base[sel]
    return out


def _store(ptr, value, mask=None, **_):
    _point()
    off, mask, sel = _lanes(ptr, mask, "store")
    value = torch.as_tensor(value).to(ptr.base.dtype).broadcast_to(off.shape)
    ptr.base[sel] = value[mask]


def _atomic_add(ptr, value, mask=None, sem=None, scope=None):
    _point()
    off, mask, sel = _lanes(ptr, mask, "atomic_add")
    value = torch.as_tensor(value).to(ptr.base.dtype).broadcast_to(off.shape)
    old = torch.zeros(off.shape, dtype=ptr.base.dtype)
    old[mask] = ptr.base[sel]
    ptr.base.index_put_((sel, ), value[mask], accumulate=True)
    return old


class _Root:
    """One shared-memory allocation: where it was made; per element, which partition stored to it
    since that partition's last fence (0: none; else the partition's number), how many
    asynchronous MMAs in flight read it, and the latest of them."""

    def __init__(self, site, shape, tasks):
        self.site, self.tasks = site, tasks
        self.unfenced = torch.zeros(shape, dtype=torch.int32)
        self.reading = torch.zeros(shape, dtype=torch.int32)
        self.reader = torch.zeros(shape, dtype=torch.int64)
        self.incoming = torch.zeros(shape, dtype=torch.int32)  # TMA copies in flight into it
        self.stores: dict = {}  # partition number -> site of its last store
        self.pending: dict = {}  # id -> asynchronous MMA in flight that reads it
        self.copies: dict = {}  # id of an in-flight copy -> its site


class _Shared:
    """A shared-memory descriptor: a view ``t`` of an allocation and the same view (``u``, ``r``,
    ``w``, ``i``) of its unfenced-store map, in-flight read count, latest reader and in-flight
    TMA copies."""

    def __init__(self, root, views):
        self.root = root
        self.t, self.u, self.r, self.w, self.i = views

    @classmethod
    def allocation(cls, t, root):
        return cls(root, (t, root.unfenced, root.reading, root.reader, root.incoming))

    def _view(self, f):
        return _Shared(self.root, tuple(f(v) for v in (self.t, self.u, self.r, self.w, self.i)))

    @property
    def shape(self):
        return list(self.t.shape)

    @property
    def dtype(self):
        return self.t.dtype

    def index(self, i):
        return self._view(lambda v: v[int(i)])

    def slice(self, start, length, dim=0):
        return self._view(lambda v: v.narrow(int(dim), int(start), int(length)))

    def permute(self, order):
        order = [int(o) for o in order]
        return self._view(lambda v: v.permute(*order))

    def load(self, layout=None):
        _point()
        self._check_landed(f"the load at {_site(2)}")
        return self.t.clone()

    def store(self, value):
        _point()
        value = _value(value, "a shared-memory store")
        if list(value.shape) != self.shape:
            raise EmulationError(f"storing a {list(value.shape)} tensor into shared memory of shape {self.shape}")
        self._check_unread(f"a store at {_site(2)}")
        self.t.copy_(value.to(self.t.dtype))
        task = _tls.task
        self.u.fill_(task.number)
        self.root.stores[task.number] = _site(2)

    def _check_landed(self, what):
        """A read of memory that a TMA copy is still writing: nothing waited on its barrier."""
        if bool(self.i.any()):
            raise EmulationError(f"{what} reads shared memory (allocated at {self.root.site}) that the TMA load at "
                                 f"{next(iter(self.root.copies.values()))} still writes: wait on its barrier first")

    def _check_unread(self, what):
        """A write to memory that an asynchronous MMA still in flight reads: on the GPU the MMA may
        read the old values or the new ones."""
        if bool(self.r.any()):
            token = self.root.pending[int(self.w.max())]
            raise EmulationError(f"{what} writes shared memory (allocated at {self.root.site}) that the asynchronous "
                                 f"warpgroup_mma at {token.site} reads and that has not been waited for")


class _Barrier:
    def __init__(self, site, i):
        self.where = f"barrier {i} of the allocation at {site}"
        self.count = None

    def __repr__(self):
        if self.count is None:
            return f"{self.where} (never initialized)"
        return (f"{self.where} (phase {self.phase} in progress, {self.pending} of {self.count} arrivals "
                f"and {self.tx} bytes outstanding)")

    def _check(self):
        if self.count is None:
            raise EmulationError(f"{self.where} used before mbarrier.init")

    def _arrive(self, n):
        self._check()
        self.pending -= n
        if self.pending < 0:
            raise EmulationError(f"{n} arrival(s) on {self.where} past its count of {self.count} in one phase")
        self._maybe_complete()

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count


class _Barriers:
    def __init__(self, n, site):
        self.bars = [_Barrier(site, i) for i in range(n)]

    def index(self, i):
        return self.bars[int(i)]


def _allocate_shared_memory(dtype, shape, layout=None, value=None):
    site = _site(2)
    shape = [int(s) for s in shape]
    if isinstance(layout, _MBarrierLayout):
        return _Barriers(shape[0], site)
    t = torch.empty(shape, dtype=dtype)
    t.fill_(float("nan") if t.dtype.is_floating_point else 0)
    if value is not None:
        t.copy_(_value(value, "an allocation's initial value"))
    root = _Root(site, shape, _tls.task.sched.tasks)
    _tls.task.sched.roots.append(root)
    return _Shared.allocation(t, root)


# --------------------------------------------------------------------------
# asynchronous MMAs


_IDS = itertools.count(1)  # asynchronous MMAs and TMA copies


class _Pending:
    """An asynchronous warpgroup MMA's accumulator token: a value only after warpgroup_mma_wait.
    While in flight its shared-memory operands count it as a reader."""

    def __init__(self, a, b, acc, acc_shape, use_acc, site):
        self.a, self.b, self.acc, self.use_acc, self.site = a, b, acc, use_acc, site
        self.acc_shape = acc_shape
        self.value = None
        self.id = None  # set while in flight
        self.reads = [op for op in (a, b) if isinstance(op, _Shared)]

    def start(self):
        self.id = next(_IDS)
        for op in self.reads:
            op.root.pending[self.id] = self
            op.r.add_(1)
            op.w.fill_(self.id)

    def resolve(self):
        if self.value is None:
            if self.id is not None:
                for op in self.reads:
                    op.r.sub_(1)
                    op.root.pending.pop(self.id, None)
            a = self.a.t if isinstance(self.a, _Shared) else self.a
            out = a.float() @ self.b.t.float()
            if self.use_acc:
                acc = self.acc.resolve() if isinstance(self.acc, _Pending) else self.acc
                out = out + acc
            self.value = out
        return self.value

    def _unwaited(self, *_):
        raise EmulationError(f"the result of the asynchronous warpgroup_mma at {self.site} used before "
                             f"warpgroup_mma_wait")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _unwaited
    to = _unwaited


def _value(x, what):
    if isinstance(x, _Pending):
        x._unwaited()
    if isinstance(x, _Shared):
        raise EmulationError(f"a shared-memory descriptor used as a tensor in {what}")
    return torch.as_tensor(x)


def _check_fenced(op, site):
    if isinstance(op, _Shared) and bool(op.u.any()):
        number = int(op.u.max())
        task = op.root.tasks[number - 1]
        raise EmulationError(f"warpgroup_mma at {site} reads shared memory (allocated at {op.root.site}) that "
                             f"partition {task.name!r} stored to at {op.root.stores[number]} with no "
                             f"fence_async_shared since")


def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    site = _site(2)
    _point()
    if not isinstance(b, _Shared):
        raise EmulationError(f"warpgroup_mma at {site}: b must be in shared memory")
    a_shape = a.shape if isinstance(a, _Shared) else list(_value(a, "warpgroup_mma").shape)
    acc_shape = acc.acc_shape if isinstance(acc, _Pending) else list(_value(acc, "warpgroup_mma").shape)
    if len(a_shape) != 2 or a_shape[1] != b.shape[0] or acc_shape != [a_shape[0], b.shape[1]]:
        raise EmulationError(f"warpgroup_mma at {site}: shapes a {a_shape}, b {b.shape}, acc {acc_shape} do not fit")
    a_dtype = a.dtype
    if a_dtype != b.dtype:
        raise EmulationError(f"warpgroup_mma at {site}: operands of types {a_dtype} and {b.dtype}")
    for op in (a, b):
        _check_fenced(op, site)
        if isinstance(op, _Shared):
            op._check_landed(f"warpgroup_mma at {site}")
    tok = _Pending(a, b, acc, acc_shape, bool(use_acc), site)
    if not is_async:
        return tok.resolve()
    tok.start()
    _tls.task.mmas.append(tok)
    return tok


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    _point()
    task = _tls.task
    while len(task.mmas) > int(num_outstanding):
        task.mmas.pop(0).resolve()
    if deps is None:
        raise EmulationError("warpgroup_mma_wait deps must be given")
    out = []
    for d in deps:
        if isinstance(d, _Pending):
            if d.value is None:
                raise EmulationError(f"warpgroup_mma_wait(num_outstanding={num_outstanding}) returns the MMA at "
                                     f"{d.site}, which is still in flight")
            d = d.value
        out.append(d)
    return out[0] if len(out) == 1 else tuple(out)


def _fence_async_shared(cluster=False):
    _point()
    task = _tls.task
    for root in task.sched.roots:
        root.unfenced[root.unfenced == task.number] = 0


# --------------------------------------------------------------------------
# barriers and TMA


class _MBarrierLayout:
    def __init__(self, *args, **kwargs):
        pass


def _mb_init(bar, count):
    _point()
    bar.count, bar.pending, bar.tx, bar.phase = int(count), int(count), 0, 0


def _mb_expect(bar, bytes, pred=True):
    _point()
    if pred:
        bar._check()
        bar.tx += int(bytes)
        bar._arrive(1)


def _mb_arrive(bar, *, count=1, pred=True):
    _point()
    if pred:
        phase = bar.phase
        bar._arrive(int(count))
        if bar.phase != phase:  # a phase completed: its waiters may go on now, before this partition
            task = _tls.task
            task.sched.switch(task, force=True)


def _mb_wait(bar, phase, pred=True, deps=()):
    _point()
    if not pred:
        return
    bar._check()
    parity = int(phase) & 1
    _block_until(lambda: (bar.phase & 1) != parity, f"phase parity {parity} to complete on {bar!r}")


def _mb_invalidate(bar):
    _point()
    bar.count = None


class _Desc:
    """A TMA descriptor over a 2-D (or N-D) global tensor, in boxes of ``block_shape``."""

    def __init__(self, desc: TensorDescriptor, name):
        base = desc.base
        if base.device.type != "cpu":
            raise EmulationError(f"argument {name} is on {base.device}; the emulator runs on CPU tensors")
        self.t = base.as_strided(tuple(desc.shape), tuple(desc.strides))
        self.block_shape = [int(b) for b in desc.block_shape]
        self.layout = desc.layout
        self.name = name
        self.block_type = types.SimpleNamespace(shape=self.block_shape,
                                                nbytes=base.element_size() * _prod(self.block_shape))

    @property
    def dtype(self):
        return self.t.dtype

    def box(self, coord):
        """The box at ``coord``, elements outside the tensor zero (TMA's fill)."""
        out = torch.zeros(self.block_shape, dtype=self.t.dtype)
        src, dst = [], []
        for c, b, n in zip(coord, self.block_shape, self.t.shape):
            lo, hi = max(c, 0), min(c + b, n)
            if lo >= hi:
                return out
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
        out[tuple(dst)] = self.t[tuple(src)]
        return out


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


def _tma_load(tensor_desc, coord, barrier, result, pred=True):
    site = _site(2)
    _point()
    if not pred:
        return
    if not isinstance(tensor_desc, _Desc):
        raise EmulationError(f"TMA load at {site} from a {type(tensor_desc).__name__}, not a tensor descriptor")
    coord = [int(c) for c in coord]
    if result.shape != tensor_desc.block_shape or result.dtype != tensor_desc.dtype:
        raise EmulationError(f"TMA load at {site}: a {tensor_desc.block_shape} {tensor_desc.dtype} box into shared "
                             f"memory of {result.shape} {result.dtype}")
    barrier._check()
    result._check_unread(f"the TMA load at {site}")
    nbytes = tensor_desc.block_type.nbytes

    copy_id = next(_IDS)
    result.i.add_(1)
    result.root.copies[copy_id] = site

    def land():
        result.t.copy_(tensor_desc.box(coord))
        result.i.sub_(1)
        del result.root.copies[copy_id]
        barrier.tx -= nbytes
        barrier._maybe_complete()
    _tls.task.sched.copies.append(land)


# --------------------------------------------------------------------------
# the language


class _Layout:
    def __init__(self, *args, **kwargs):
        pass

    @staticmethod
    def get_default_for(*args, **kwargs):
        return _Layout()


def _arange(start, end, layout=None):
    return torch.arange(int(start), int(end), dtype=torch.int32)


def _full(shape, value, dtype, layout=None):
    return torch.full([int(s) for s in shape], value, dtype=dtype)


def _zeros(shape, dtype, layout=None):
    return torch.zeros([int(s) for s in shape], dtype=dtype)


def _where(cond, x, y):
    cond = _value(cond, "gl.where").to(torch.bool)
    x, y = (_value(v, "gl.where") if not isinstance(v, (int, float)) else v for v in (x, y))
    return torch.where(cond, x, y)


def _pair(f):
    def op(a, b, *args, **kwargs):
        a, b = _value(a, f.__name__), _value(b, f.__name__)
        return f(a, b)
    return op


def _inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
    if asm.strip() == "rcp.approx.ftz.f32 $0, $1;":
        return (1.0 / _value(args[0], "rcp.approx").float()).to(dtype)
    raise EmulationError(f"inline_asm_elementwise: the emulator knows rcp.approx.ftz.f32 only, not {asm!r}")


def _warp_specialize(functions_and_args, worker_num_warps, worker_num_regs):
    parent = _tls.task
    sched = parent.sched
    if len(worker_num_warps) != len(functions_and_args) - 1 or len(worker_num_regs) != len(worker_num_warps):
        raise EmulationError(f"gl.warp_specialize: {len(functions_and_args)} partitions with worker_num_warps "
                             f"{list(worker_num_warps)} and worker_num_regs {list(worker_num_regs)}")
    children = []
    with sched.cv:
        for fn, args in functions_and_args:
            name = getattr(fn, "__name__", repr(fn))
            children.append(sched.spawn(name, (lambda fn=fn, args=args: fn(*args)), parent.pid))
    _block_until(lambda: all(c.done for c in children), "its warp_specialize partitions to finish")


def _program_id(axis):
    return torch.tensor(_tls.task.pid[int(axis)], dtype=torch.int32)


def _num_programs(axis):
    return torch.tensor(_tls.task.sched.grid[int(axis)], dtype=torch.int32)


def _reduce(f):
    def op(x, axis=None, *args, **kwargs):
        x = _value(x, f.__name__)
        return f(x) if axis is None else f(x, int(axis))
    return op


GL = types.SimpleNamespace(
    constexpr=lambda x: x, static_range=lambda *a: range(*(int(x) for x in a)),
    program_id=_program_id, num_programs=_num_programs, num_warps=lambda: 4,
    arange=_arange, full=_full, zeros=_zeros, where=_where,
    expand_dims=lambda x, axis: _value(x, "gl.expand_dims").unsqueeze(int(axis)),
    convert_layout=lambda x, layout, assert_trivial=False: _value(x, "gl.convert_layout"),
    sum=_reduce(torch.sum), max=_reduce(torch.amax), min=_reduce(torch.amin),
    maximum=_pair(torch.maximum), minimum=_pair(torch.minimum), fdiv=_pair(torch.div),
    exp=torch.exp, exp2=torch.exp2, log=torch.log, log2=torch.log2, sqrt=torch.sqrt, abs=torch.abs,
    load=_load, store=_store, atomic_add=_atomic_add,
    inline_asm_elementwise=_inline_asm_elementwise,
    allocate_shared_memory=_allocate_shared_memory, warp_specialize=_warp_specialize,
    # Dtypes are PyTorch's, so that a tensor's .to(gl.float32) is torch's .to.
    int1=torch.bool, int8=torch.int8, int16=torch.int16, int32=torch.int32, int64=torch.int64,
    float16=torch.float16, bfloat16=torch.bfloat16, float32=torch.float32, float64=torch.float64,
    SliceLayout=_Layout, BlockedLayout=_Layout, NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout,
    NVMMASharedLayout=_Layout, SwizzledSharedLayout=_Layout,
)
MBARRIER = types.SimpleNamespace(init=_mb_init, expect=_mb_expect, arrive=_mb_arrive, wait=_mb_wait,
                                 invalidate=_mb_invalidate, MBarrierLayout=_MBarrierLayout)
TMA = types.SimpleNamespace(async_copy_global_to_shared=_tma_load)
HOPPER = types.SimpleNamespace(mbarrier=MBARRIER, tma=TMA, warpgroup_mma=_warpgroup_mma,
                               warpgroup_mma_wait=_warpgroup_mma_wait, fence_async_shared=_fence_async_shared)

_REPLACE = {
    id(_gl): GL, id(_mbarrier): MBARRIER, id(_tma): TMA, id(_hopper): HOPPER,
    id(_hopper.warpgroup_mma): _warpgroup_mma, id(_hopper.warpgroup_mma_wait): _warpgroup_mma_wait,
    id(_hopper.fence_async_shared): _fence_async_shared, id(_mbarrier.MBarrierLayout): _MBarrierLayout,
}


class _Globals(dict):
    """A kernel module's globals as the emulated body sees them: Gluon's names replaced by the
    emulator's, other jitted functions by their emulated bodies, constexprs by their values."""

    def __init__(self, src):
        super().__init__()
        self.src = src
        self["__builtins__"] = src["__builtins__"]

    def __missing__(self, name):
        value = _convert(self.src[name])  # KeyError: Python then looks in the builtins
        self[name] = value
        return value


_GLOBALS: dict = {}
_BODIES: dict = {}


def _convert(value):
    replaced = _REPLACE.get(id(value))
    if replaced is not None:
        return replaced
    if isinstance(value, JITFunction):
        return _body(value)
    if isinstance(value, ConstexprFunction):
        return value.fn
    if isinstance(value, tl.constexpr):
        return value.value
    return value


def _body(kernel):
    """The emulated Python function of a jitted Gluon function (cached)."""
    body = _BODIES.get(kernel)
    if body is None:
        fn = kernel.fn
        key = id(fn.__globals__)
        g = _GLOBALS.get(key)
        if g is None or g.src is not fn.__globals__:
            g = _GLOBALS[key] = _Globals(fn.__globals__)
        body = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
        body.__kwdefaults__ = fn.__kwdefaults__
        _BODIES[kernel] = body
    return body


def _argument(param, value):
    if param.is_constexpr:
        return value.value if isinstance(value, tl.constexpr) else value
    if isinstance(value, TensorDescriptor):
        return _Desc(value, param.name)
    if isinstance(value, torch.Tensor):
        return _pointer(value, param.name)
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int32 if -2**31 <= value < 2**31 else torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    return value


def launch(kernel, grid, args, kwargs=None, seed: int = 0) -> None:
    """Run ``kernel[grid](*args, **kwargs)`` on the CPU: every program of ``grid``, one after
    another, each under a schedule drawn from ``seed`` and its program id. Tensors must be on the
    CPU; ``kwargs`` (``num_warps``, ``maxnreg``) have no effect. Raises ``Deadlock`` or
    ``EmulationError`` (module docstring) and whatever the kernel raises, with the partition and
    program named. The signature matches the probes' ``launch`` hook."""
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"Expected a @gluon.jit kernel, got {type(kernel).__name__}")
    params = kernel.params
    if len(args) != len(params):
        raise TypeError(f"{kernel.fn.__name__} takes {len(params)} arguments, got {len(args)}")
    values = [_argument(p, a) for p, a in zip(params, args)]
    body = _body(kernel)
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    for pid in itertools.product(*(range(g) for g in grid)):
        _run_program(body, values, pid, hash((seed, pid)) & 0xFFFFFFFF, grid)


def _run_program(body, values, pid, seed, grid):
    sched = _Scheduler(seed)
    sched.grid = grid
    with torch.no_grad():
        _schedule(sched, body, values, pid)


def _schedule(sched, body, values, pid):
    with sched.cv:
        sched.spawn("program", lambda: body(*values), pid)
        sched._hand_off()
    with sched.cv:
        while sched.error is None and not all(t.done for t in sched.tasks):
            seen = sched.hand_offs
            if not sched.cv.wait(timeout=STALL_SECONDS) and sched.hand_offs == seen:
                # No partition handed over for that long: a partition stuck outside the schedule
                # (an emulator bug, or a kernel looping without touching memory).
                sched.error = EmulationError(f"no progress in {STALL_SECONDS} s: {sched._describe()}")
                sched.cv.notify_all()
    for t in sched.tasks:
        t.thread.join(timeout=10)
    if sched.error is not None:
        raise sched.error
