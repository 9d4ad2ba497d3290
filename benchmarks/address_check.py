"""Run a flex-oracle command in the Triton interpreter with every memory access checked.

    python benchmarks/address_check.py [--cuda-bounds] [--sm90-tiles] -- replay CASE.json --device cpu
    python benchmarks/address_check.py --cuda-bounds -- fuzz --device cpu --seed 8012 --examples 40

On the GPU a load or store outside its tensor faults (an illegal memory
access, which also kills the process's CUDA context) or, within the
allocator's slack, reads garbage silently; in the interpreter it reads
whatever the host memory holds. Here every load, store and atomic of every
kernel launch is checked, lane by lane where its mask is true: the address
must lie inside the storage of one of that launch's tensor arguments, or the
access raises ``AddressError`` naming the kernel, which the fuzzer counts as
a target error (and shrinks).

``--cuda-bounds`` draws with the CUDA size bounds, so that a fuzz seed
draws the cases it drew on the GPU (the strategies depend on the device only
through them); ``--sm90-tiles`` takes the Hopper config rows (tile sizes) in
place of the interpreter's. Everything after ``--`` is ``flex-oracle``'s
command line. The check costs a few times the interpreter's own time.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402


class AddressError(RuntimeError):
    """A kernel touched memory outside every tensor argument of its launch."""


_ranges: list = []  # (start, end) of each tensor argument's storage, innermost launch last
_kernels: list = []


def _checked_call(original):
    def call(self, *args, **kwargs):
        saved = len(_ranges)
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                _ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        _kernels.append(self.fn.__name__)
        try:
            return original(self, *args, **kwargs)
        finally:
            del _ranges[saved:]
            _kernels.pop()
    return call


def _check(kind: str, ptrs, mask, width: int) -> None:
    addr = ptrs.data if mask is None else ptrs.data[mask.data.astype(bool)]
    if addr.size == 0:
        return
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _ranges:
        inside |= (addr >= lo) & (addr + width <= hi)
    if not inside.all():
        kernel = _kernels[-1] if _kernels else "?"
        raise AddressError(f"{kind} outside every tensor argument in {kernel}: {int((~inside).sum())} of "
                           f"{addr.size} active lanes")


def install() -> None:
    """Check every access of interpreted kernels from now on (idempotent)."""
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_address_checked", False):
        return
    load, store, atomic = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def masked_load(self, ptrs, mask, other, *rest):
        _check("load", ptrs, mask, interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize)
        return load(self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask, value.data.dtype.itemsize)
        return store(self, ptrs, value, mask, *rest)

    def atomic_rmw(self, op, ptr, val, mask, *rest):
        _check("atomic", ptr, mask, val.data.dtype.itemsize)
        return atomic(self, op, ptr, val, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw = atomic_rmw
    builder._address_checked = True
    interpreter.GridExecutor.__call__ = _checked_call(interpreter.GridExecutor.__call__)


def main(argv) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    ours, theirs = argv[:split], argv[split + 1:]
    unknown = [a for a in ours if a not in ("--cuda-bounds", "--sm90-tiles")]
    if unknown or not theirs:
        print(f"address_check: unknown options {unknown}" if unknown else __doc__, file=sys.stderr)
        return 2
    install()
    if "--cuda-bounds" in ours:
        from properties import strategies

        strategies.DEFAULT_BOUNDS["cpu"] = dict(strategies.DEFAULT_BOUNDS["cuda"])
    if "--sm90-tiles" in ours:
        from kernels import api

        api._arch = lambda device, interpret: "sm90"
    from properties.cli import main as flex_oracle

    return flex_oracle(theirs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
