"""Time our FlexAttention kernels against torch.compile(flex_attention) and SDPA.

    PYTHONPATH=. python3 benchmarks/bench.py --budget-seconds 500     # the H100 run
    python -m benchmarks.bench --quick                                # a few cases
    python benchmarks/bench.py --device cpu --quick                   # CPU dry run

For every case (a mask or score mod, a shape, a dtype) and every
implementation (ours, ``torch.compile(flex_attention)``, SDPA with the flash
and cuDNN backends where SDPA can express the case) it

1. checks the output, the LSE where the implementation returns one, and the
   gradients of q, k and v against the float64 oracle (``oracle.compare``, the
   comparison behind ``properties.check.compare_with_oracle``; the oracle and
   the honest-emulation baseline are computed once per case and shared by the
   implementations). The check runs on the real shapes when the oracle fits in
   memory, else on a reduced case (batch 1, shorter sequences, same mods and
   head dims). A failing implementation gets no speed.
2. times the forward and, separately, the backward alone (the forward runs once
   outside the timer; the timed call is ``torch.autograd.grad(out, (q, k, v),
   grad_out, retain_graph=True)``), as medians of CUDA-event timings
   (``triton.testing.do_bench``, which also flushes the L2 cache before every
   call), rotating over several input sets. Compilation happens in the check,
   outside the timed region. A graph that cannot run backward twice
   (torch.compile's) is timed backward alone too, each timed call after an
   untimed forward of its own (``timer(...).split``). The implementations of a
   case are timed in ``--rounds`` interleaved rounds (the order reversed every
   other round), more while their rounds disagree (``--max-rounds``), and each
   reported time is the median over rounds: at S=1k a single measurement now
   and then ran 30 to 50 % slow (a different case and implementation each run
   on the H200), which one round reports as a real ratio. ``--pace gpu`` times
   the kernels alone, each call enqueued behind a GPU hold longer than its host
   work (``timer``): at S=1k the default timing runs at the host's pace.

FLOPs count allowed (b, h, i, j) only: forward ``4 * B * Hq * L * S * D *
density``, backward 2.5 times that, with the density measured exactly from the
block mask on the device. Decode cases (L = 1) also report the key/value bytes
read per second, ``2 * B * Hkv * S * D * itemsize / time``, against the HBM's
nominal 3.35 TB/s and the device-to-device copy bandwidth measured at start.

The matrix, flags and JSON layout are described in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench.py` from a checkout
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# --------------------------------------------------------------------------
# the matrix

TOKENS = 16384  # B * S for the training cases
HIDDEN = 2048  # Hq * D for the training cases
SEQLENS = (4096, 16384, 1024)  # the first is the most informative
HEAD_DIMS = (128, 64)
BLOCK = 128  # the block mask's BLOCK_SIZE, shared by ours and torch's flex
WINDOW = 1024
DOCUMENTS = 12
SOFTCAP = 30.0
SPARSE_DENSITY = 0.25
GQA_GROUP = 4
DECODE_HEADS = (32, 8)  # Hq, Hkv
DECODE_HEAD_DIM = 128
DECODE_SEQLENS = (32768, 8192, 131072)
DECODE_BATCHES = (1, 8)
NOMINAL_HBM_TBS = 3.35  # H100 SXM datasheet
BACKWARD_FLOP_FACTOR = 2.5

# Mask rows in order of interest: the summary's masks first.
MASKS = {
    "causal": "causal",
    "document": f"document mask ({DOCUMENTS} documents)",
    "softcap": f"tanh softcap {SOFTCAP:g} + causal",
    "none": "no mask",
    "sliding_window": f"sliding window {WINDOW}, causal",
    "prefix_lm": "prefix LM (prefix S/4)",
    "alibi": "ALiBi + causal",
    "block_sparse": f"random block-sparse, {SPARSE_DENSITY:.0%} of {BLOCK}x{BLOCK} blocks, all full",
    "gqa_causal": f"causal, GQA Hq/Hkv = {GQA_GROUP}",
    "gqa_document": f"document mask, GQA Hq/Hkv = {GQA_GROUP}",
}
DECODE = "decode"
QUICK_MASKS = ("causal", "document", "softcap")

# Where SDPA can express a mask row: is_causal, or no mask at all.
SDPA_CAUSAL = {"none": False, "causal": True, "gqa_causal": True, DECODE: False}

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# The CPU dry run: tiny shapes, the kernels in Triton's interpreter.
CPU_TRAIN = dict(B=1, Hq=2, S=256, D=64)
CPU_DECODE = dict(B=1, Hq=4, Hkv=2, S=512, D=64)

# The float64 oracle on the real shapes when it fits in this share of the
# device's memory and in this many score elements (B * Hq * L * S).
CHECK_MEMORY_SHARE = 0.3
CHECK_MAX_ELEMENTS = 1 << 34
CHECK_REDUCED_LEN = 2048
# Rotate among enough input sets to cover this multiple of the L2 cache.
ROTATE_L2_MULTIPLE = 4
MAX_INPUT_SETS = 16
# Start a max-autotune compile only with this much of the budget left.
MAX_AUTOTUNE_RESERVE_S = 150.0


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    def label(self) -> str:
        heads = f"H{self.Hq}" if not self.gqa else f"H{self.Hq}/{self.Hkv}"
        return f"S{_k(self.S)} D{self.D} B{self.B} {heads}"


@dataclass(frozen=True)
class Case:
    mask: str  # a key of MASKS, or DECODE
    shape: Shape
    dtype: torch.dtype

    @property
    def decode(self) -> bool:
        return self.mask == DECODE

    @property
    def id(self) -> str:
        s = self.shape
        return f"{self.mask}-S{s.S}-D{s.D}-B{s.B}-H{s.Hq}x{s.Hkv}-{_dtype_name(self.dtype)}"

    def label(self) -> str:
        return f"{self.mask} {self.shape.label()}"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _parse_lengths(text: str) -> tuple:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        scale = 1024 if item.endswith("k") else 1
        try:
            out.append(int(item[:-1] if scale > 1 else item) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"Expected lengths like 1k,4k,16384, got {text!r}.") from None
    return tuple(out)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def _parse_ints(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"Expected comma-separated integers, got {text!r}.") from None


def _parse_masks(text: str) -> tuple:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in MASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"Unknown mask rows {unknown}; expected some of {list(MASKS)}.")
    return names


def train_shape(mask: str, S: int, D: int, device: str) -> Shape:
    """Hq * D = 2048 and B * S = 16k tokens (tiny on CPU); GQA rows have Hkv = Hq / 4."""
    if device == "cpu":
        B, Hq, S = CPU_TRAIN["B"], CPU_TRAIN["Hq"] * (GQA_GROUP if mask.startswith("gqa_") else 1), CPU_TRAIN["S"]
    else:
        if HIDDEN % D or TOKENS % S:
            raise ValueError(f"Expected D to divide {HIDDEN} and S to divide {TOKENS}, got D={D}, S={S}.")
        B, Hq = TOKENS // S, HIDDEN // D
    Hkv = Hq // GQA_GROUP if mask.startswith("gqa_") else Hq
    return Shape(B, Hq, Hkv, S, S, D)


def decode_shape(S: int, B: int, device: str) -> Shape:
    if device == "cpu":
        c = CPU_DECODE
        return Shape(c["B"], c["Hq"], c["Hkv"], 1, c["S"], c["D"])
    return Shape(B, DECODE_HEADS[0], DECODE_HEADS[1], 1, S, DECODE_HEAD_DIM)


def build_matrix(args, device: str) -> list:
    """The cases in run order: S=4k D=128 for every mask, then decode, then the rest."""
    dtype = DTYPES[args.dtype]
    masks = args.masks or (QUICK_MASKS if args.quick else tuple(MASKS))
    seqlens = args.seqlens or ((4096,) if args.quick else SEQLENS)
    head_dims = args.head_dims or ((128,) if args.quick else HEAD_DIMS)
    dec_lens = args.decode_seqlens or ((32768,) if args.quick else DECODE_SEQLENS)
    dec_batches = args.decode_batches or ((1,) if args.quick else DECODE_BATCHES)
    if device == "cpu":  # tiny shapes: one length, one head dim, one decode case
        seqlens, dec_lens, dec_batches = seqlens[:1], dec_lens[:1], dec_batches[:1]
        head_dims = args.head_dims[:1] if args.head_dims else (CPU_TRAIN["D"],)
        if args.quick and not args.masks:
            masks = ("causal",)

    first_len, first_dim = seqlens[0], head_dims[0]
    train = [(S, D) for D in head_dims for S in seqlens]
    train.sort(key=lambda sd: (sd != (first_len, first_dim), sd[1] != first_dim))
    cases = []
    if not args.decode_only:
        cases += [Case(m, train_shape(m, *train[0], device), dtype) for m in masks]
    if not args.no_decode:
        cases += [Case(DECODE, decode_shape(S, B, device), dtype) for B in dec_batches for S in dec_lens]
    if not args.decode_only:
        cases += [Case(m, train_shape(m, S, D, device), dtype) for S, D in train[1:] for m in masks]
    seen, unique = set(), []
    for c in cases:  # the CPU's tiny shapes collapse some
        if c.id not in seen:
            seen.add(c.id)
            unique.append(c)
    return unique


# What picks a run's cases; rerun_commands sets these itself and keeps every other option.
_SELECTION = ("masks", "seqlens", "head_dims", "decode_seqlens", "decode_batches", "decode_only", "no_decode",
              "quick")


def rerun_hint(case_ids: list, argv: list, device: str) -> str:
    """What to run to time ``case_ids`` (``rerun_commands``), to merge with ``bench_merge.py``."""
    commands, unknown = rerun_commands(case_ids, argv, device)
    lines = ["To time them (then merge the JSONs with benchmarks/bench_merge.py):"] if commands else []
    lines += [f"  {c}" for c in commands]
    if unknown:
        lines.append(f"Not in the default matrix, so no command for: {', '.join(unknown)}")
    return "\n".join(lines)


def _length_text(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def rerun_commands(case_ids: list, argv: list, device: str) -> tuple:
    """bench.py command lines that time exactly ``case_ids`` (ids of the default matrix on
    ``device``, in its dtype), each with the other options of the run that ``argv`` (bench.py's
    arguments, without the program) started, less ``--json`` and ``--budget-seconds``. Returns
    ``(commands, unknown)``: as few commands as give exact products of masks, lengths and head
    dims (decode: of lengths and batch sizes), in the matrix's order, and the ids that are not
    in the default matrix."""
    parser = build_parser()
    try:  # a record's argv may name options of another version of bench.py: keep what parses
        args = parser.parse_known_args(argv)[0]
    except SystemExit:
        args = parser.parse_args([])
    matrix = build_matrix(parser.parse_args(["--dtype", args.dtype]), device)
    wanted = set(case_ids)
    train: dict = {}  # (S, D) -> masks, in the matrix's order
    decode: dict = {}  # S -> batch sizes
    for case in matrix:
        if case.id not in wanted:
            continue
        if case.decode:
            decode.setdefault(case.shape.S, []).append(case.shape.B)
        else:
            train.setdefault((case.shape.S, case.shape.D), []).append(case.mask)
    known = {c.id for c in matrix}
    unknown = [cid for cid in case_ids if cid not in known]

    kept = []
    for action in parser._actions:
        if not action.option_strings or action.dest in _SELECTION + ("help", "json", "budget_seconds"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse._StoreTrueAction):
            kept.append(flag)
        else:
            kept += [flag, ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]

    def command(selection: list) -> str:
        return " ".join(["PYTHONPATH=. python3 benchmarks/bench.py"] + [shlex.quote(a) for a in selection + kept])

    # Fold the groups whose products are exact: one mask list at several head dims, then one
    # (masks, head dims) at several lengths; decode lengths that want the same batch sizes.
    by_len: dict = {}
    for (S, D), masks in train.items():
        by_len.setdefault((S, tuple(masks)), []).append(D)
    folded: dict = {}
    for (S, masks), dims in by_len.items():
        folded.setdefault((masks, tuple(dims)), []).append(S)
    by_batches: dict = {}
    for S, batches in decode.items():
        by_batches.setdefault(tuple(batches), []).append(S)
    commands = [command(["--masks", ",".join(masks), "--seqlens", ",".join(map(_length_text, lens)),
                         "--head-dims", ",".join(map(str, dims)), "--no-decode"])
                for (masks, dims), lens in folded.items()]
    commands += [command(["--decode-only", "--decode-seqlens", ",".join(map(_length_text, lens)),
                          "--decode-batches", ",".join(map(str, batches))]) for batches, lens in by_batches.items()]
    return commands, unknown


# --------------------------------------------------------------------------
# the mods and the block mask, built once per case and shared by every flex


def random_block_mask(L: int, S: int, density: float, seed: int, device):
    """A BlockMask listing ``round(density * nKV)`` (at least one) seeded random KV blocks per
    query block, all as full blocks (``mask_mod`` = ``mods.full()``, never evaluated)."""
    from torch.nn.attention.flex_attention import BlockMask

    from kernels import mods

    nq, nkv = -(-L // BLOCK), -(-S // BLOCK)
    per_row = max(1, round(density * nkv))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(nq, nkv, generator=gen).argsort(dim=-1)[:, :per_row].sort(dim=-1).values
    full_idx = torch.zeros(1, 1, nq, nkv, dtype=torch.int32)
    full_idx[0, 0, :, :per_row] = picks.to(torch.int32)
    full_num = torch.full((1, 1, nq), per_row, dtype=torch.int32)
    kv_num = torch.zeros(1, 1, nq, dtype=torch.int32)
    kv_idx = torch.zeros(1, 1, nq, nkv, dtype=torch.int32)
    args = [t.to(device) for t in (kv_num, kv_idx, full_num, full_idx)]
    try:
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=BLOCK, mask_mod=mods.full(), seq_lengths=(L, S))
    except TypeError:  # a PyTorch without seq_lengths
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=BLOCK, mask_mod=mods.full())


def attention_args(mask: str, shape: Shape, device, seed: int = 0):
    """``(score_mod, block_mask)`` for a mask row; the block mask from torch's
    ``create_block_mask`` on the device (``BLOCK_SIZE=128``, broadcast over batch and heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels import mods

    L, S = shape.L, shape.S

    def blocks(mask_mod):
        return create_block_mask(mask_mod, None, None, L, S, device=device, BLOCK_SIZE=BLOCK)

    row = mask[4:] if mask.startswith("gqa_") else mask
    if row in ("none", DECODE):
        return None, None
    if row == "causal":
        return None, blocks(mods.causal())
    if row == "sliding_window":
        return None, blocks(mods.sliding_window(WINDOW))
    if row == "prefix_lm":
        return None, blocks(mods.prefix_lm(S // 4))
    if row == "document":
        return None, blocks(mods.document.from_seed(S, DOCUMENTS, seed, device=device))
    if row == "alibi":
        return mods.alibi.standard(shape.Hq, device=device), blocks(mods.causal())
    if row == "softcap":
        return mods.tanh_softcap(SOFTCAP), blocks(mods.causal())
    if row == "block_sparse":
        return None, random_block_mask(L, S, SPARSE_DENSITY, seed, device)
    raise ValueError(f"Unknown mask row {mask!r}; expected one of {list(MASKS) + [DECODE]}.")


def allowed_fraction(block_mask, shape: Shape, chunk_elements: int = 1 << 26) -> float:
    """The share of (b, h, i, j) a block-sparse kernel computes (SPEC's ``semantics="blocks"``):
    in a full block, or in a partial block where ``mask_mod`` allows. Exact, evaluated on the
    block mask's device in chunks of query rows. 1.0 without a block mask."""
    if block_mask is None:
        return 1.0
    import oracle

    partial, full = oracle.block_membership(block_mask)
    MB, MH = partial.shape[:2]
    q_block, kv_block = block_mask.BLOCK_SIZE
    device = partial.device
    L, S = shape.L, shape.S
    kv = torch.arange(S, device=device)
    kv_blocks = kv // kv_block
    rows = max(1, chunk_elements // S)
    allowed = 0
    for b in range(MB):
        for h in range(MH):
            bt = torch.tensor(b, device=device)
            ht = torch.tensor(h, device=device)
            for start in range(0, L, rows):
                q = torch.arange(start, min(L, start + rows), device=device)
                tile = (q[:, None] // q_block, kv_blocks[None, :])
                inside = partial[b, h][tile]
                if bool(inside.any()):
                    inside = inside & block_mask.mask_mod(bt, ht, q[:, None], kv[None, :])
                allowed += int((full[b, h][tile] | inside).sum())
    # A mask of batch/head size 1 stands for all of them.
    return allowed / (MB * MH * L * S)


def forward_flops(shape: Shape, density: float) -> float:
    return 4.0 * shape.B * shape.Hq * shape.L * shape.S * shape.D * density


def kv_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Key and value bytes a decode step must read once."""
    return 2 * shape.B * shape.Hkv * shape.S * shape.D * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------
# implementations


class NotApplicable(Exception):
    """The implementation cannot express the case; the message says why."""


@dataclass
class Impl:
    """``prepare(case, score_mod, block_mask)`` returns ``fn(q, k, v)`` giving ``out`` or
    ``(out, lse)``, or raises NotApplicable."""

    name: str
    prepare: Callable
    returns_lse: bool
    description: str
    slow_compile: bool = False
    refusal_is_na: bool = False  # SDPA: "No available kernel" means it cannot express the case


def _ours(case: Case, score_mod, block_mask, kernel_options=None, lse: bool = True):
    # lse=False: called for out alone, as a training step calls it. The LSE then stays inside for
    # the backward, and in bf16 and fp16 the forward takes the mods' cheaper formulas
    # (kernels.api.DTYPE_ROUNDING).
    import kernels

    gqa = case.shape.gqa

    def fn(q, k, v):
        return kernels.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                      enable_gqa=gqa, return_lse=lse, kernel_options=kernel_options)
    return fn


def _refined(options: dict):
    # Block lists refined to finer sub-blocks (kernels.api._refine_kv); the refinement runs
    # once per block mask, in the check call, so the timed calls find it cached.
    def prepare(case: Case, score_mod, block_mask):
        return _ours(case, score_mod, block_mask, dict(options) if block_mask is not None else None)
    return prepare


_ours_refined = _refined({"REFINE_KV_BLOCK": 64})


def _ours_with(module: str, flag: str, value, *more: tuple, lse: bool = True):
    # ours with ``kernels.<module>.<flag>`` set to ``value`` (and each further (module, flag, value)
    # of ``more``) around this implementation's calls alone (such flags are read when the forward
    # runs; the backward's choice is captured then); ``lse=False``: called for out alone (ours-out).
    def prepare(case: Case, score_mod, block_mask):
        import importlib

        settings = [(importlib.import_module(f"kernels.{m}"), f, v) for m, f, v in ((module, flag, value), *more)]
        inner = _ours(case, score_mod, block_mask, lse=lse)

        def fn(q, k, v):
            before = [getattr(mod, f) for mod, f, _ in settings]
            for mod, f, val in settings:
                setattr(mod, f, val)
            try:
                return inner(q, k, v)
            finally:
                for (mod, f, _), old in zip(settings, before):
                    setattr(mod, f, old)
        return fn
    return prepare


# The backward as before kernels.backward.CONCURRENT: delta computed in the dQ kernel, dQ then dK/dV
# on one stream.
_ours_fused = _ours_with("backward", "CONCURRENT", False)
# The dK/dV kernel on a side stream of the highest priority, dQ on the caller's
# (kernels.backward.SIDE_KERNEL; the default puts dQ on a side stream of default priority).
_ours_dkdv_side = _ours_with("backward", "SIDE_KERNEL", "dkdv")
# Both backward kernels on the caller's stream, dK/dV first.
_ours_one_stream = _ours_with("backward", "SIDE_KERNEL", None)
# Without the automatic backward refinement (kernels.api.AUTO_REFINE_BWD).
_ours_bwd_unrefined = _ours_with("api", "AUTO_REFINE_BWD", False)
# The forward on the refined 64 x 64 blocks where it would walk shifted windows (kernels.api.AUTO_SHIFT).
_ours_unshifted = _ours_with("api", "AUTO_SHIFT", False)
# The dQ kernel on the refined 64 x 64 blocks where it would walk the forward's shifted windows
# (kernels.api.AUTO_SHIFT_DQ); the forward is ours.
_ours_dq_unshifted = _ours_with("api", "AUTO_SHIFT_DQ", False)
# The dK/dV kernel on its refined 64 x 64 blocks where it would walk windows of queries
# (kernels.api.AUTO_SHIFT_DKDV); the forward and the dQ kernel are ours.
_ours_dkdv_unshifted = _ours_with("api", "AUTO_SHIFT_DKDV", False)
# Every shifted window on multiples of 16 positions (kernels.api.SHIFT_UNIT_KV; the dK/dV kernel's
# are by default).
_ours_shift_unit16 = _ours_with("api", "SHIFT_UNIT_KV", 16)
# No dQ kernel: the dK/dV kernel adds dQ with atomics (kernels.backward.DQ_ATOMIC).
_ours_dq_atomic = _ours_with("backward", "DQ_ATOMIC", True)
# The dK/dV kernel's dP before dV for every G, or dV first everywhere (kernels.backward.DKDV_DP_FIRST;
# the default takes dP first where G = 1, but not on kernels.api.REFINED_BWD's tiles).
_ours_dp_first = _ours_with("backward", "DKDV_DP_FIRST", True)
_ours_dv_first = _ours_with("backward", "DKDV_DP_FIRST", False)
# The dQ kernel on its own delta, beside delta_kernel (kernels.backward.DQ_OWN_DELTA).
_ours_dq_own_delta = _ours_with("backward", "DQ_OWN_DELTA", True)
# The forward's and the dQ kernel's partial and full blocks in one loop on every mask
# (kernels.forward.ONE_LOOP, kernels.backward.ONE_LOOP): the forward's time is the forward flag's,
# the backward's the other's.
_ours_one_loop = _ours_with("forward", "ONE_LOOP", True, ("backward", "ONE_LOOP", True))
# The forward's one loop alone, its mask called on every step (kernels.forward.ONE_LOOP_EAGER_MASK):
# the mask's gathers prefetched. The backward is ours.
_ours_one_loop_eager = _ours_with("forward", "ONE_LOOP", True, ("forward", "ONE_LOOP_EAGER_MASK", True))
# The forward's two loops on every mask (kernels.forward.ONE_LOOP = False): ours before the
# twenty-fifth session, where the rule (kernels.forward.one_loop_for) now takes one loop.
_ours_two_loops = _ours_with("forward", "ONE_LOOP", False)
# The forward's one loop alone (kernels.forward.ONE_LOOP = True): the backward is ours.
_ours_fwd_one_loop = _ours_with("forward", "ONE_LOOP", True)
# The persistent forward (kernels.forward.PERSISTENT_FWD): each program walks a run of query tiles,
# reading the next tile's queries, counts and first list entries while it walks one; and the same
# on one loop over a tile's partial and full blocks. The backward is ours.
_ours_persistent = _ours_with("forward", "PERSISTENT_FWD", True)
_ours_persistent_one_loop = _ours_with("forward", "PERSISTENT_FWD", True, ("forward", "ONE_LOOP", True))
# The grid's forward, a program a query tile (kernels.forward.PERSISTENT_FWD = False).
_ours_grid = _ours_with("forward", "PERSISTENT_FWD", False)
# The dK/dV kernel walking a kv head's G query heads in each of its two loops where the block mask
# has one head (kernels.backward.HEADS_IN_LOOP): the GQA rows' backward. The forward is ours.
_ours_heads_in_loop = _ours_with("backward", "HEADS_IN_LOOP", True)
# The streamed tiles through pointer loads (kernels.forward.TMA_KV, kernels.backward.TMA_DQ and TMA_DKDV
# False: ours before the thirty-fifth session), and through TMA descriptors in all three kernels
# wherever the tensors allow it (the flags True: the dK/dV kernel's on every tile, where the rule
# takes it on kernels.api.REFINED_BWD's alone).
_ours_no_tma = _ours_with("forward", "TMA_KV", False, ("backward", "TMA_DQ", False), ("backward", "TMA_DKDV", False))
_ours_tma = _ours_with("forward", "TMA_KV", True, ("backward", "TMA_DQ", True), ("backward", "TMA_DKDV", True))


_COMPILED: dict = {}


def _compiled_flex(mode: Optional[str]):
    if mode not in _COMPILED:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Every case brings new mods and shapes: without this dynamo stops
        # recompiling after a few and silently runs flex_attention eagerly.
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 1 << 20)
        for knob in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, True)
        # dynamic=False: one static graph per case. The default (automatic
        # dynamic) would switch to symbolic shapes after the first recompile.
        kwargs = {"dynamic": False} if mode is None else {"dynamic": False, "mode": mode}
        _COMPILED[mode] = torch.compile(flex_attention, **kwargs)
    return _COMPILED[mode]


def _ours_out(case: Case, score_mod, block_mask):
    return _ours(case, score_mod, block_mask, lse=False)


def _torch_flex(mode: Optional[str], lse: bool = True):
    # lse=False: called for out alone, as a training step calls it.
    def prepare(case: Case, score_mod, block_mask):
        if torch.device(_DEVICE[0]).type != "cuda":
            raise NotApplicable("torch.compile(flex_attention) runs on CUDA only here (on CPU, "
                                "Inductor's flex_attention has no backward and no LSE)")
        from torch.nn.attention import flex_attention as fa

        compiled = _compiled_flex(mode)
        gqa = case.shape.gqa
        aux = fa.AuxRequest(lse=True) if hasattr(fa, "AuxRequest") else None

        def fn(q, k, v):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not lse:
                    return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
                if aux is not None:
                    out, extra = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                          enable_gqa=gqa, return_aux=aux)
                    return out, extra.lse
                return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                return_lse=True)
        return fn
    return prepare


def wrap_mods(score_mod, block_mask):
    """The same mods behind plain closures, for a dynamo that cannot trace the mod objects."""
    wrapped_score = None
    if score_mod is not None:
        def wrapped_score(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx, kv_idx)
    wrapped_mask = None
    if block_mask is not None:
        mask_mod = block_mask.mask_mod
        wrapped_mask = copy.copy(block_mask)  # the same block lists

        def closure(b, h, q_idx, kv_idx):
            return mask_mod(b, h, q_idx, kv_idx)
        wrapped_mask.mask_mod = closure
    return wrapped_score, wrapped_mask


def _sdpa(backend_name: str):
    def prepare(case: Case, score_mod, block_mask):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        device = torch.device(_DEVICE[0]).type
        if (backend_name == "MATH") != (device == "cpu"):
            where = "CPU" if backend_name == "MATH" else "CUDA"
            raise NotApplicable(f"SDPA {backend_name.lower()} runs on {where} only in this benchmark")
        if case.mask not in SDPA_CAUSAL or score_mod is not None:
            raise NotApplicable("SDPA expresses only no mask or causal, without a score mod")
        backend = getattr(SDPBackend, backend_name)
        causal, gqa = SDPA_CAUSAL[case.mask], case.shape.gqa

        def fn(q, k, v):
            with sdpa_kernel([backend]):
                if gqa:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                            enable_gqa=True)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn
    return prepare


def _gluon(refine: bool, persistent: bool = False):
    # The Gluon probes (benchmarks/gluon_flex.py): measured beside ours, not part of kernels/.
    def prepare(case: Case, score_mod, block_mask):
        if case.decode:
            raise NotApplicable("the Gluon probes have no decode kernel")
        from benchmarks import gluon_flex

        s, gqa = case.shape, case.shape.gqa
        reason = gluon_flex.unsupported_shapes(_DEVICE[0], case.dtype, (s.B, s.Hq, s.L, s.D),
                                               (s.B, s.Hkv, s.S, s.D), score_mod, block_mask, gqa)
        if reason is not None:
            raise NotApplicable(reason)

        def fn(q, k, v):
            return gluon_flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                             refine=refine, persistent=persistent)
        return fn
    return prepare


IMPLS = {
    "ours": Impl("ours", _ours, True, "kernels.flex_attention (Triton)"),
    "gluon": Impl("gluon", _gluon(True), True, "benchmarks/gluon_flex.py: the Gluon forward and backward probes, "
                  "lists refined to 64 on an axis where that saves 5% (sm_90, or the CPU emulated; only with --impls)"),
    "gluon-persistent": Impl("gluon-persistent", _gluon(True, True), True,
                             "the Gluon probes with the persistent forward (only with --impls)"),
    "gluon-unrefined": Impl("gluon-unrefined", _gluon(False), True,
                            "the Gluon probes on the block mask's 128 x 128 lists (only with --impls)"),
    "ours-refined": Impl("ours-refined", _ours_refined, True,
                         "kernels.flex_attention with REFINE_KV_BLOCK=64 (block lists refined once per mask)"),
    "ours-unrefined": Impl("ours-unrefined", _refined({"REFINE_KV_BLOCK": 128}), True,
                           "kernels.flex_attention without the automatic refinement (REFINE_KV_BLOCK=128, "
                           "the block size)"),
    "ours-refined-q": Impl("ours-refined-q", _refined({"REFINE_Q_BLOCK": 64, "fwd_num_warps": 4}), True,
                           "kernels.flex_attention with REFINE_Q_BLOCK=64 (64 x 128 sub-blocks), 4 forward warps"),
    "ours-refined-qkv": Impl("ours-refined-qkv", _refined({"REFINE_Q_BLOCK": 64, "REFINE_KV_BLOCK": 64,
                                                           "fwd_num_warps": 4, "fwd_num_stages": 3}), True,
                             "kernels.flex_attention with 64 x 64 sub-blocks, 4 forward warps, 3 stages"),
    "ours-bwd-unrefined": Impl("ours-bwd-unrefined", _ours_bwd_unrefined, True,
                               "kernels.flex_attention without the automatic backward refinement "
                               "(AUTO_REFINE_BWD=False)"),
    "ours-unshifted": Impl("ours-unshifted", _ours_unshifted, True,
                           "kernels.flex_attention without the forward's shifted windows (AUTO_SHIFT=False): "
                           "the refined 64 x 64 blocks"),
    "ours-dq-unshifted": Impl("ours-dq-unshifted", _ours_dq_unshifted, True,
                              "kernels.flex_attention with the dQ kernel on the refined 64 x 64 blocks "
                              "(AUTO_SHIFT_DQ=False); the forward on shifted windows"),
    "ours-dkdv-unshifted": Impl("ours-dkdv-unshifted", _ours_dkdv_unshifted, True,
                                "kernels.flex_attention with the dK/dV kernel on the refined 64 x 64 blocks "
                                "(AUTO_SHIFT_DKDV=False); the forward and the dQ kernel on shifted windows"),
    "ours-shift-unit16": Impl("ours-shift-unit16", _ours_shift_unit16, True,
                              "kernels.flex_attention with the forward's and the dQ kernel's shifted windows "
                              "starting at multiples of 16 keys (SHIFT_UNIT_KV=16)"),
    "ours-fused": Impl("ours-fused", _ours_fused, True,
                       "kernels.flex_attention without backward.CONCURRENT (delta in the dQ kernel, one stream)"),
    "ours-dkdv-side": Impl("ours-dkdv-side", _ours_dkdv_side, True,
                           "kernels.flex_attention with the dK/dV kernel on a side stream of the highest "
                           "priority, dQ on the caller's"),
    "ours-one-stream": Impl("ours-one-stream", _ours_one_stream, True,
                            "kernels.flex_attention with both backward kernels on one stream, dK/dV first"),
    "ours-dq-atomic": Impl("ours-dq-atomic", _ours_dq_atomic, True,
                           "kernels.flex_attention with backward.DQ_ATOMIC (no dQ kernel: the dK/dV kernel adds "
                           "dS K into float32 dQ with atomics)"),
    "ours-one-loop": Impl("ours-one-loop", _ours_one_loop, True,
                          "kernels.flex_attention with forward.ONE_LOOP and backward.ONE_LOOP (one loop over "
                          "a tile's partial and full blocks in the forward and dQ kernels)"),
    "ours-one-loop-eager": Impl("ours-one-loop-eager", _ours_one_loop_eager, True,
                                "kernels.flex_attention with forward.ONE_LOOP and forward.ONE_LOOP_EAGER_MASK (the "
                                "forward's one loop, its mask's gathers prefetched; the backward as ours)"),
    "ours-fwd-one-loop": Impl("ours-fwd-one-loop", _ours_fwd_one_loop, True,
                              "kernels.flex_attention with forward.ONE_LOOP = True (the forward's one loop on every "
                              "mask; the backward as ours)"),
    "ours-persistent": Impl("ours-persistent", _ours_persistent, True,
                            "kernels.flex_attention with forward.PERSISTENT_FWD = True (each forward program walks "
                            "a run of query tiles, reading the next tile's queries and lists during one)"),
    "ours-persistent-one-loop": Impl("ours-persistent-one-loop", _ours_persistent_one_loop, True,
                                     "kernels.flex_attention with forward.PERSISTENT_FWD and forward.ONE_LOOP = True"),
    "ours-no-tma": Impl("ours-no-tma", _ours_no_tma, True,
                        "kernels.flex_attention with forward.TMA_KV, backward.TMA_DQ and backward.TMA_DKDV False "
                        "(every kernel's streamed tiles through pointer loads)"),
    "ours-tma": Impl("ours-tma", _ours_tma, True,
                     "kernels.flex_attention with forward.TMA_KV, backward.TMA_DQ and backward.TMA_DKDV True "
                     "(every kernel's streamed tiles through TMA descriptors, on any tiles)"),
    "ours-grid": Impl("ours-grid", _ours_grid, True,
                      "kernels.flex_attention with forward.PERSISTENT_FWD = False (a forward program per query tile)"),
    "ours-two-loops": Impl("ours-two-loops", _ours_two_loops, True,
                           "kernels.flex_attention with forward.ONE_LOOP = False (the forward's two loops on "
                           "every mask; the default's rule takes one loop for masks that load nothing)"),
    "ours-heads-in-loop": Impl("ours-heads-in-loop", _ours_heads_in_loop, True,
                               "kernels.flex_attention with backward.HEADS_IN_LOOP (the dK/dV kernel walks a kv "
                               "head's query heads in each loop where the block mask has one head)"),
    "ours-dp-first": Impl("ours-dp-first", _ours_dp_first, True,
                          "kernels.flex_attention with backward.DKDV_DP_FIRST = True (the dK/dV kernel issues dP "
                          "before dV for every G; the default does where G = 1, but not on REFINED_BWD's tiles)"),
    "ours-dv-first": Impl("ours-dv-first", _ours_dv_first, True,
                          "kernels.flex_attention with backward.DKDV_DP_FIRST = False (the dK/dV kernel issues dV "
                          "before dP, as before the thirtieth session and PyTorch's template)"),
    "ours-dq-own-delta": Impl("ours-dq-own-delta", _ours_dq_own_delta, True,
                              "kernels.flex_attention with backward.DQ_OWN_DELTA (the dQ kernel computes its "
                              "rows' delta and runs beside delta_kernel, which the dK/dV kernel then reads; slower on "
                              "the H100, thirty-first session)"),
    "torch-compile": Impl("torch-compile", _torch_flex(None), True,
                          "torch.compile(flex_attention, dynamic=False), default mode"),
    "ours-out": Impl("ours-out", _ours_out, False,
                     "kernels.flex_attention called for out alone, as a training step calls it (in bf16 the "
                     "softcap's cheaper tanh in the forward too; only with --impls)"),
    "torch-compile-out": Impl("torch-compile-out", _torch_flex(None, lse=False), False,
                              "torch.compile(flex_attention, dynamic=False) called for out alone (only with "
                              "--impls)"),
    "torch-compile-max-autotune": Impl(
        "torch-compile-max-autotune", _torch_flex("max-autotune-no-cudagraphs"), True,
        "torch.compile(flex_attention, dynamic=False, mode='max-autotune-no-cudagraphs')", slow_compile=True),
    "sdpa-flash": Impl("sdpa-flash", _sdpa("FLASH_ATTENTION"), False,
                       "scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION", refusal_is_na=True),
    "sdpa-cudnn": Impl("sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), False,
                       "scaled_dot_product_attention, SDPBackend.CUDNN_ATTENTION", refusal_is_na=True),
    "sdpa-math": Impl("sdpa-math", _sdpa("MATH"), False,
                      "scaled_dot_product_attention, SDPBackend.MATH (the CPU dry run's SDPA)",
                      refusal_is_na=True),
}
_DEVICE = ["cuda"]  # set by main; the SDPA and torch.compile preparers read it
PEER = "torch-compile"


def default_impls(device: str, max_autotune: bool) -> list:
    if device == "cpu":
        return ["ours", "torch-compile", "sdpa-math"]
    names = ["ours", "torch-compile", "sdpa-flash", "sdpa-cudnn"]
    if max_autotune:
        names.insert(2, "torch-compile-max-autotune")
    return names


# --------------------------------------------------------------------------
# inputs, the oracle check and the timers


def make_inputs(shape: Shape, dtype, device, seed: int, grad: bool):
    """q, k, v (leaves, requiring grad when ``grad``) and the upstream gradient, seeded."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    s = shape
    q = draw(s.B, s.Hq, s.L, s.D).requires_grad_(grad)
    k = draw(s.B, s.Hkv, s.S, s.D).requires_grad_(grad)
    v = draw(s.B, s.Hkv, s.S, s.D).requires_grad_(grad)
    do = draw(s.B, s.Hq, s.L, s.D) if grad else None
    return q, k, v, do


def check_shape(case: Case, device: str, mode: str) -> Shape:
    """The real shape when the float64 oracle fits (``mode="auto"``), else a reduced one:
    batch 1, sequences of at most 2048 (decode: the real length, halved until it fits)."""
    s = case.shape
    if device == "cpu" or mode == "real":
        return s
    if mode == "auto" and _oracle_fits(s, not case.decode, device):
        return s
    if case.decode:
        S = s.S
        while S > CHECK_REDUCED_LEN and not _oracle_fits(Shape(1, s.Hq, s.Hkv, 1, S, s.D), False, device):
            S //= 2
        return Shape(1, s.Hq, s.Hkv, 1, S, s.D)
    n = min(s.S, CHECK_REDUCED_LEN)
    return Shape(1, s.Hq, s.Hkv, n, n, s.D)


def _oracle_fits(s: Shape, grads: bool, device: str) -> bool:
    if s.B * s.Hq * s.L * s.S > CHECK_MAX_ELEMENTS:
        return False
    # The oracle holds q, out (and dq, dO) and the keys and values repeated to
    # Hq heads (and their gradients) in float64, the emulation the same in
    # float32, plus about ten float64 chunks of 2**26 score elements.
    rows = s.B * s.Hq * s.L * s.D * (4 if grads else 2)
    keys = s.B * s.Hq * s.S * s.D * (4 if grads else 2)
    need = (rows + keys) * (8 + 4) + 10 * (1 << 26) * 8
    return need <= CHECK_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory


def run_impl(fn, q, k, v, do, returns_lse: bool) -> dict:
    """What the implementation computes: out (and lse), and with ``do`` the gradients of
    ``out`` alone, taken the way the timed backward takes them."""
    result = fn(q, k, v)
    out, lse = (result[0], result[1]) if returns_lse else (result, None)
    tensors = {"out": out}
    if lse is not None:
        tensors["lse"] = lse
    if do is not None:
        tensors.update(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), do)))
    return {name: t.detach() for name, t in tensors.items()}


def oracle_truth(q, k, v, do, score_mod, block_mask, gqa: bool):
    """The float64 truth and the honest-emulation baseline (``properties.check``), once per case."""
    from properties.check import delta_allowances, emulated_run, oracle_run, reference_scales

    kw = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa, grad_out=do)
    expected = {n: t.double() for n, t in oracle_run(q, k, v, **kw).tensors.items()}
    baseline = emulated_run(q, k, v, **kw).tensors
    # The comparison's per-tensor options, as properties.check.compare_with_oracle sets them: the
    # float32 floor of cancelled tensors and the rounding of delta = rowsum(dO * O) in dq and dk.
    scales = reference_scales(q, k, v, do, block_mask=block_mask, enable_gqa=gqa)
    allow = delta_allowances(q, k, v, expected["out"], do, score_mod=score_mod, block_mask=block_mask,
                             enable_gqa=gqa) if do is not None else {}
    baseline["_options"] = {name: {"reference_scale": scales.get(name), **({"allowance": allow[name]}
                                                                        if name in allow else {})}
                            for name in expected}
    return expected, baseline


def compare_all(actual: dict, expected: dict, baseline: dict) -> dict:
    """``oracle.compare`` of every tensor the implementation returned."""
    import oracle

    options = baseline.get("_options", {})
    results = {name: oracle.compare(actual[name], expected[name], baseline=baseline[name], name=name,
                                    **options.get(name, {}))
               for name in actual}
    failures = [r.message for r in results.values() if not r.ok]
    return {
        "status": "pass" if not failures else "fail",
        "tensors": {n: {"ok": r.ok, "max_ratio": r.max_ratio, "mismatches": r.mismatches, "total": r.total}
                    for n, r in results.items()},
        "message": "\n".join(failures),
    }


def _quantiles(samples: list) -> tuple:
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return statistics.median(samples), q[0], q[-1]


L2_FLUSH_BYTES = 256 << 20  # as triton.testing.do_bench's


PACES = ("host", "gpu")
_CYCLES_PER_MS: list = []


def cycles_per_ms() -> float:
    """GPU clock cycles per ms, as ``torch.cuda._sleep`` counts them (measured once)."""
    if not _CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # the clock up first
        start.record()
        torch.cuda._sleep(4_000_000)
        end.record()
        torch.cuda.synchronize()
        _CYCLES_PER_MS.append(4_000_000 / start.elapsed_time(end))
    return _CYCLES_PER_MS[0]


def timer(device: str, warmup_ms: float, rep_ms: float, cpu_reps: int, pace: str = "host"):
    """``time(fn)`` -> (median, p20, p80) in ms: CUDA events through ``triton.testing.do_bench``
    (warm-up and repetitions in ms; L2 flushed before each call), host clock on CPU.

    ``time.split(pre, fn)`` times ``fn`` alone where each call needs an untimed ``pre`` first
    (a forward whose graph the timed backward then consumes): on CUDA ``pre``, the L2 flush,
    then events around ``fn``, as many calls as ``rep_ms`` holds after ``warmup_ms`` of warm-up.

    ``pace="gpu"`` (CUDA only) times the GPU's work alone: before each timed call a
    ``torch.cuda._sleep`` holds the GPU for twice the host time the call takes (measured first),
    so the host has enqueued all of the call's kernels before the start event is reached, and
    they run back to back. With ``pace="host"`` (``do_bench``'s way, the default) a call whose
    host work outlasts the L2 flush is timed at the host's pace: on the H200 our backward's
    host work was 0.4 to 1.0 ms on tiny shapes and torch.compile's 0.6 ms, against GPU times
    of 0.4 to 1.2 ms at S=1k (eighteenth session, docs/PERFORMANCE.md)."""
    if pace not in PACES:
        raise ValueError(f"Expected pace in {PACES}, got {pace!r}.")
    if device == "cuda":
        from triton.testing import do_bench

        def time_cuda(fn):
            if pace == "gpu":
                return events(None, fn)
            med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80

        def split_cuda(pre, fn):
            return events(pre, fn)

        def events(pre, fn):
            pre = pre or (lambda: None)
            flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
            pre()
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                pre()
                flush.zero_()
                fn()
            torch.cuda.synchronize()
            per_call = max(1e-3, 1e3 * (time.perf_counter() - t0) / 5)  # ms, pre and flush included
            for _ in range(max(1, int(warmup_ms / per_call))):
                pre()
                fn()
            # Under pace="gpu" each timed call waits behind a hold of twice its host time (the
            # most of 5 calls) plus 50 us: the host then has enqueued the call before the GPU
            # leaves the hold, even if the GPU was idle when the hold was enqueued.
            hold_cycles = int((2 * host_ms(pre, fn) + 0.05) * cycles_per_ms()) if pace == "gpu" else 0
            hold_ms = hold_cycles / cycles_per_ms() if hold_cycles else 0.0
            n = min(2000, max(5, int(rep_ms / (per_call + hold_ms))))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for start, end in zip(starts, ends):
                pre()
                flush.zero_()
                if hold_cycles:
                    torch.cuda._sleep(hold_cycles)
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])

        def host_ms(pre, fn) -> float:
            """The host time of ``fn`` (ms, the most of 5 calls), enqueued behind a long hold."""
            torch.cuda._sleep(int(50 * cycles_per_ms()))
            samples = []
            for _ in range(5):
                pre()
                t0 = time.perf_counter()
                fn()
                samples.append(1e3 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
            return max(samples)

        time_cuda.split = split_cuda
        return time_cuda

    def time_cpu(fn):
        fn()
        samples = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
        return _quantiles(samples)

    def split_cpu(pre, fn):
        pre()
        fn()
        samples = []
        for _ in range(cpu_reps):
            pre()
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
        return _quantiles(samples)
    time_cpu.split = split_cpu
    return time_cpu


def input_sets(shape: Shape, dtype, device, seed: int, grad: bool) -> list:
    """Enough fresh input sets to cover a few times the L2 cache (2 to 16; 2 on CPU)."""
    per_set = (2 * shape.B * shape.Hq * shape.L + 2 * shape.B * shape.Hkv * shape.S) * shape.D
    per_set *= torch.empty((), dtype=dtype).element_size()
    n = 2
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
        n = max(2, min(MAX_INPUT_SETS, math.ceil(ROTATE_L2_MULTIPLE * l2 / per_set)))
    return [make_inputs(shape, dtype, device, seed + 1 + i, grad) for i in range(n)]


def time_impl(fn, sets: list, time_fn, backward: bool) -> dict:
    """Forward and backward-alone medians over rotating input sets."""
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    turn = itertools.cycle(range(len(sets)))

    def forward():
        q, k, v, _ = sets[next(turn)]
        fn(q, k, v)

    out = {"input_sets": len(sets)}
    out["fwd_ms"], out["fwd_ms_p20"], out["fwd_ms_p80"] = time_fn(forward)
    if not backward:
        return out
    graphs = [(first(fn(q, k, v)), (q, k, v), do) for q, k, v, do in sets]
    turn_b = itertools.cycle(graphs)

    def backward_alone():
        o, inputs, do = next(turn_b)
        torch.autograd.grad(o, inputs, do, retain_graph=True)

    try:
        out["bwd_ms"], out["bwd_ms_p20"], out["bwd_ms_p80"] = time_fn(backward_alone)
        out["bwd_method"] = "autograd.grad(out, (q, k, v), grad_out, retain_graph=True)"
    except RuntimeError as e:  # a backward that cannot run twice on one graph
        del graphs
        split = getattr(time_fn, "split", None)
        if split is not None:
            # Each timed backward consumes a graph its own untimed forward made. The former
            # median(fwd + bwd) - median(fwd) let the forward's noise into the backward with the
            # opposite sign: on the H200 at S=1k, rounds whose torch.compile forward ran 0.43 to
            # 0.53 ms instead of 0.35 reported its backward 0.1 to 0.18 ms fast (seventeenth session).
            pending = []

            def forward_untimed():
                q, k, v, do = sets[next(turn)]
                pending.append((first(fn(q, k, v)), (q, k, v), do))

            def backward_once():
                o, inputs, do = pending.pop()
                torch.autograd.grad(o, inputs, do)
            out["bwd_ms"], out["bwd_ms_p20"], out["bwd_ms_p80"] = split(forward_untimed, backward_once)
            out["bwd_method"] = (f"autograd.grad(out, (q, k, v), grad_out) timed alone after an untimed forward; "
                                 f"retain_graph failed: {_first_line(e)}")
            return out

        def both():
            q, k, v, do = sets[next(turn)]
            torch.autograd.grad(first(fn(q, k, v)), (q, k, v), do)
        total = time_fn(both)[0]
        out["bwd_ms"] = total - out["fwd_ms"]
        out["bwd_method"] = f"median(fwd + bwd) - median(fwd); retain_graph failed: {_first_line(e)}"
    return out


def run_rounds(one_round: Callable, results: list, rounds: int, max_rounds: int, seconds_left: Callable) -> int:
    """``one_round(r)`` for r = 0 .. rounds - 1, then more while some result's forward or
    backward round medians are unsettled (``spread_of`` above SETTLED_SPREAD), up to
    ``max_rounds`` and while ``seconds_left() > 0``; returns the rounds run."""
    def unsettled() -> bool:
        return any(spread_of([t[key] for t in res.get("rounds", ()) if key in t]) > SETTLED_SPREAD
                   for res in results if res.get("status") != "error" for key in ("fwd_ms", "bwd_ms"))

    r = 0
    while r < rounds or (r < max_rounds and seconds_left() > 0 and unsettled()):
        one_round(r)
        r += 1
    return r


def merge_rounds(rounds: list) -> dict:
    """One implementation's timing rounds (``time_impl`` records) as one record: each time is
    the median over rounds (the lower middle one for an even count, a time that was measured),
    its percentiles those of the same round; ``*_rounds`` keep every round's median."""
    out = dict(rounds[0])
    for key in ("fwd_ms", "bwd_ms"):
        values = [r[key] for r in rounds if key in r]
        if not values:
            continue
        pick = sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]
        chosen = [r for r in rounds if key in r][pick]
        for k in (key, key + "_p20", key + "_p80"):
            if k in chosen:
                out[k] = chosen[k]
        out[key + "_rounds"] = values
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _allocated_gib(device: str) -> Optional[float]:
    """GPU memory allocated by this process, GiB; None on the CPU."""
    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# one case


@dataclass
class Context:
    device: str
    impls: list
    time_fn: Callable
    check_mode: str
    rounds: int
    seed: int
    deadline: Optional[float]
    log: Callable
    clocks: Optional[object] = None  # a benchmarks.gpu_clocks.ClockSampler on CUDA
    max_rounds: int = 0  # rounds may go on to this many while a case is unsettled (run_rounds)

    def seconds_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


def run_case(case: Case, ctx: Context) -> dict:
    """Check and time every implementation on one case; a JSON-ready record."""
    t_case = time.monotonic()
    device, shape, backward = ctx.device, case.shape, not case.decode
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # What earlier cases left allocated: the oracle check's real-shape try needs the card's memory.
    held_gib = _allocated_gib(device)
    t0 = time.monotonic()
    score_mod, block_mask = attention_args(case.mask, shape, device, ctx.seed)
    _sync(device)
    mask_s = time.monotonic() - t0
    density = allowed_fraction(block_mask, shape)
    fwd_flops = forward_flops(shape, density)
    record = {
        "id": case.id, "mask": case.mask, "description": MASKS.get(case.mask, "decode, no mask"),
        "kind": "decode" if case.decode else "train", **asdict(shape), "dtype": _dtype_name(case.dtype),
        "score_mod": getattr(score_mod, "name", None),
        "mask_mod": getattr(getattr(block_mask, "mask_mod", None), "name", None),
        "block_mask_seconds": mask_s, "density": density,
        "fwd_flops": fwd_flops, "bwd_flops": BACKWARD_FLOP_FACTOR * fwd_flops if backward else None,
        "kv_bytes": kv_bytes(shape, case.dtype), "held_gib_at_start": held_gib, "results": [],
    }

    t0 = time.monotonic()
    mode = ctx.check_mode
    while True:
        cshape = check_shape(case, device, mode)
        reduced = cshape != shape
        c_score, c_mask = (score_mod, block_mask)
        if reduced:
            c_score, c_mask = attention_args(case.mask, cshape, device, ctx.seed)
        check_inputs = make_inputs(cshape, case.dtype, device, ctx.seed, grad=backward)
        try:
            expected, baseline = oracle_truth(*check_inputs, c_score, c_mask, shape.gqa)
            _sync(device)
            break
        except torch.cuda.OutOfMemoryError:
            if mode == "reduced":
                raise
            del check_inputs
            _free(device)
            ctx.log(f"[{case.id}] the oracle ran out of memory on the real shapes (GPU memory allocated "
                    f"when the case started: {held_gib:.2f} GiB; now {_allocated_gib(device):.2f} GiB); checking a reduced case")
            mode = "reduced"
    record["check_shape"] = asdict(cshape)
    record["oracle_seconds"] = time.monotonic() - t0
    held = f", {held_gib:.2f} GiB held by earlier cases" if held_gib is not None else ""
    ctx.log(f"[{case.id}] density {density:.4f}, block mask {mask_s:.1f}s, oracle "
            f"{record['oracle_seconds']:.1f}s on {cshape.label()}{' (reduced)' if reduced else ''}{held}")

    sets, ready = None, []  # ready: (impl, result, timed fn) of each implementation that passed
    for impl in ctx.impls:
        res = {"impl": impl.name, "status": None, "check": None, "reason": None}
        record["results"].append(res)
        if impl.slow_compile and ctx.seconds_left() < MAX_AUTOTUNE_RESERVE_S:
            res.update(status="skipped", reason=f"less than {MAX_AUTOTUNE_RESERVE_S:.0f}s of the budget left")
            continue
        t0 = time.monotonic()
        try:
            fn = impl.prepare(case, c_score, c_mask)
        except NotApplicable as e:
            res.update(status="n/a", reason=str(e))
            continue
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            res.update(status="error", reason=f"while preparing: {_first_line(e)}")
            continue
        actual, err = _checked_run(fn, check_inputs, impl)
        timed_mods = (score_mod, block_mask)  # for the real shapes when the check was reduced
        if err is not None and impl.name.startswith("torch-compile"):
            # Dynamo could not take the mod objects: retry with closures around them.
            fn = impl.prepare(case, *wrap_mods(c_score, c_mask))
            actual, retry_err = _checked_run(fn, check_inputs, impl)
            res["mods_wrapped"] = f"first attempt raised {err}; retried with the mods wrapped in closures"
            err = retry_err
            timed_mods = wrap_mods(score_mod, block_mask)
        if err is not None:
            refused = impl.refusal_is_na and "No available kernel" in err
            status = "n/a" if refused else "error"
            reason = f"the backend refused: {err}" if refused else err
            res.update(status=status, reason=reason, first_call_seconds=time.monotonic() - t0)
            _free(device)
            continue
        res["check"] = compare_all(actual, expected, baseline)
        res["check"]["shape"] = "reduced" if reduced else "real"
        res["first_call_seconds"] = time.monotonic() - t0
        del actual
        if res["check"]["status"] != "pass":
            res.update(status="fail", reason=res["check"]["message"].splitlines()[0])
            continue
        try:
            timed_fn = impl.prepare(case, *timed_mods) if reduced else fn
            if sets is None:
                sets = input_sets(shape, case.dtype, device, ctx.seed, backward)
            if reduced:  # compile for the real shapes outside the timer
                t1 = time.monotonic()
                q, k, v, do = sets[0]
                run_impl(timed_fn, q, k, v, do, impl.returns_lse)
                _sync(device)
                res["real_first_call_seconds"] = time.monotonic() - t1
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            res.update(status="error", reason=f"while timing: {_first_line(e)}")
            _free(device)
            continue
        res["seconds"] = time.monotonic() - t0
        ready.append((impl, res, timed_fn))

    # Timing rounds: every checked implementation once per round, the order reversed every
    # other round, so that a transient slowdown of the machine hits one round of one
    # implementation, not its only measurement.
    t_rounds = time.monotonic()

    def one_round(r: int) -> None:
        for impl, res, timed_fn in (ready if r % 2 == 0 else ready[::-1]):
            if res["status"] == "error":
                continue
            t0 = time.monotonic()
            try:
                res.setdefault("rounds", []).append(time_impl(timed_fn, sets, ctx.time_fn, backward))
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                res.update(status="error", reason=f"while timing: {_first_line(e)}")
                _free(device)
            res["seconds"] += time.monotonic() - t0

    record["rounds"] = run_rounds(one_round, [res for _, res, _ in ready], ctx.rounds,
                                  max(ctx.rounds, ctx.max_rounds), ctx.seconds_left)
    if ctx.clocks is not None and ready:
        from benchmarks.gpu_clocks import describe

        record["gpu_clocks"] = ctx.clocks.window(t_rounds, time.monotonic())
        ctx.log(f"[{case.id}] while timing: {describe(record['gpu_clocks'])}")
    for impl, res, timed_fn in ready:
        if res["status"] == "error":
            res.pop("rounds", None)
            continue
        res.update(merge_rounds(res.pop("rounds")))
        res["status"] = "ok"
        res["fwd_tflops"] = fwd_flops / (res["fwd_ms"] * 1e-3) / 1e12
        if backward and res.get("bwd_ms", 0) > 0:
            res["bwd_tflops"] = record["bwd_flops"] / (res["bwd_ms"] * 1e-3) / 1e12
        if case.decode:
            res["kv_tbs"] = record["kv_bytes"] / (res["fwd_ms"] * 1e-3) / 1e12
        spread = "".join(f", {k} rounds {'/'.join(f'{t:.3f}' for t in res[k + '_rounds'])}"
                         for k in ("fwd_ms", "bwd_ms") if len(res.get(k + "_rounds", ())) > 1)
        ctx.log(f"[{case.id}] {impl.name}: fwd {res['fwd_ms']:.3f} ms"
                + (f", bwd {res['bwd_ms']:.3f} ms" if "bwd_ms" in res else "")
                + f" ({res['seconds']:.0f}s with compile and check{spread})")
    if device == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record["seconds"] = time.monotonic() - t_case
    del sets, expected, baseline, check_inputs
    _free(device)
    return record


def _checked_run(fn, inputs, impl: Impl):
    """Run once on the check inputs (this compiles); (tensors, None) or (None, error text)."""
    q, k, v, do = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            actual = run_impl(fn, q, k, v, do, impl.returns_lse)
            _sync(_DEVICE[0])
            return actual, None
        except Exception as e:  # noqa: BLE001 - an implementation's failure is a result
            notes = sorted({str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()})
            text = _first_line(e)
            if notes:
                text += " | " + " | ".join(n[:200] for n in notes[:4])
            return None, text


# --------------------------------------------------------------------------
# device ceilings, the table and the summary


def device_ceilings(device: str, time_fn) -> dict:
    """The measured device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate."""
    if device != "cuda":
        return {}
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = time_fn(lambda: dst.copy_(src))[0]
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_ms = time_fn(lambda: a @ b)[0]
    del a, b
    _free(device)
    return {
        "copy_bandwidth_tbs": 2 * n * 4 / (copy_ms * 1e-3) / 1e12,
        "copy_bytes": 2 * n * 4,
        "matmul_bf16_tflops": 2 * m**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_size": m,
    }


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if x < 100 else f"{x:.1f}"


def _check_cell(res: dict) -> str:
    status = res["status"]
    if status in ("ok", "fail"):
        word = "pass" if status == "ok" else "FAIL"
        return word + (" (reduced)" if res["check"] and res["check"].get("shape") == "reduced" else "")
    return {"n/a": "n/a", "skipped": "skipped", "error": "ERROR"}.get(status, status)


def format_table(cases: list) -> str:
    header = ("case", "impl", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "KV TB/s", "check")
    rows = []
    for c in cases:
        label = f"{c['mask']} S{_k(c['S'])} D{c['D']} B{c['B']} H{c['Hq']}" + (
            f"/{c['Hkv']}" if c["Hq"] != c["Hkv"] else "")
        for r in c["results"]:
            rows.append((label, r["impl"], _fmt(r.get("fwd_ms")), _fmt(r.get("fwd_tflops"), 1),
                         _fmt(r.get("bwd_ms")), _fmt(r.get("bwd_tflops"), 1), _fmt(r.get("kv_tbs"), 2),
                         _check_cell(r)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(  # noqa: E731
        str(x).ljust(w) if i < 2 or i == 7 else str(x).rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(x.rstrip() for x in out)


def format_ratios(cases: list) -> str:
    """Per case and peer: peer time / our time, forward and backward."""
    rs = ratios(cases)
    if not rs:
        return ""
    x = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [(r["case"], r["peer"], x(r["fwd"]), x(r.get("bwd"))) for r in rs]
    header = ("case", "peer", "fwd x", "bwd x")
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _result(case: dict, impl: str) -> Optional[dict]:
    for r in case["results"]:
        if r["impl"] == impl and r["status"] == "ok":
            return r
    return None


# A ratio is "settled" when neither implementation's round medians spread more than this
# (``round_spread``). On the H200 at S=1k two runs of the same cases disagreed by up to 1.5x on
# single ratios (docs/PERFORMANCE.md, seventeenth session), and rounds within one case spread
# up to 1.8x; the summary gives the minimum over settled ratios beside the minimum over all,
# and lists the unsettled ones. ``--max-rounds`` adds rounds to a case until it settles.
SETTLED_SPREAD = 1.10


def spread_of(values: list) -> float:
    """How far a list of round medians spreads: the slowest over the fastest, leaving out the
    fastest and the slowest quarter from 5 values on (so that one or two glitched rounds among
    five or more do not count, as they do not move the median); 1.0 for fewer than two."""
    values = sorted(v for v in values if v and v > 0)
    if len(values) < 2:
        return 1.0
    cut = len(values) // 4 if len(values) >= 5 else 0
    core = values[cut:len(values) - cut]
    return core[-1] / core[0]


def round_spread(result: dict, key: str) -> float:
    """``spread_of`` the round medians of ``key`` ("fwd_ms" or "bwd_ms") in a result record."""
    return spread_of(result.get(key + "_rounds", ()))


def ratios(cases: list, ours: str = "ours") -> list:
    """Per case and peer: peer time / our time (above 1: ours is faster), forward and backward,
    each with the larger of the two implementations' round spreads (``round_spread``)."""
    out = []
    for c in cases:
        mine = _result(c, ours)
        if mine is None:
            continue
        for r in c["results"]:
            if r["impl"] == ours or r["status"] != "ok":
                continue
            entry = {"case": c["id"], "mask": c["mask"], "kind": c["kind"], "peer": r["impl"],
                     "fwd": r["fwd_ms"] / mine["fwd_ms"],
                     "fwd_spread": max(round_spread(r, "fwd_ms"), round_spread(mine, "fwd_ms"))}
            if r.get("bwd_ms") and mine.get("bwd_ms"):
                entry["bwd"] = r["bwd_ms"] / mine["bwd_ms"]
                entry["bwd_spread"] = max(round_spread(r, "bwd_ms"), round_spread(mine, "bwd_ms"))
            out.append(entry)
    return out


def _geomean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(cases: list, ceilings: dict) -> dict:
    rs = ratios(cases)
    peers = sorted({r["peer"] for r in rs})
    summary = {"ratio_definition": "peer time / our time (above 1: ours is faster)", "peers": {}}
    for peer in peers:
        mine = [r for r in rs if r["peer"] == peer]
        train = [r for r in mine if r["kind"] == "train"]
        every = [(r[p], r["case"], p, r.get(p + "_spread", 1.0)) for r in train for p in ("fwd", "bwd") if p in r]
        settled = [e[:3] for e in every if e[3] <= SETTLED_SPREAD]
        entry = {
            "train_cases": len(train),
            "geomean_fwd": _geomean([r["fwd"] for r in train]),
            "geomean_bwd": _geomean([r.get("bwd") for r in train]),
            "min": min(e[:3] for e in every) if every else None,
            "min_settled": min(settled) if settled else None,
            "unsettled": sorted((e for e in every if e[3] > SETTLED_SPREAD), key=lambda e: -e[3]),
            "by_mask": {m: [{"case": r["case"], "fwd": r["fwd"], "bwd": r.get("bwd")} for r in train if r["mask"] == m]
                        for m in ("document", "softcap", "gqa_document")},
            "decode": [{"case": r["case"], "bandwidth_ratio": r["fwd"]} for r in mine if r["kind"] == "decode"],
        }
        entry["decode_geomean"] = _geomean([d["bandwidth_ratio"] for d in entry["decode"]])
        summary["peers"][peer] = entry
    decode = []
    for c in cases:
        if c["kind"] != "decode":
            continue
        row = {"case": c["id"]}
        for r in c["results"]:
            if r["status"] == "ok":
                row[r["impl"]] = {"kv_tbs": r["kv_tbs"], "share_of_nominal": r["kv_tbs"] / NOMINAL_HBM_TBS}
                if ceilings.get("copy_bandwidth_tbs"):
                    row[r["impl"]]["share_of_copy"] = r["kv_tbs"] / ceilings["copy_bandwidth_tbs"]
        decode.append(row)
    summary["decode_bandwidth"] = decode
    summary["clock_drops"] = [c["id"] for c in cases if (c.get("gpu_clocks") or {}).get("dropped")]
    failed = [f"{c['id']} {r['impl']}" for c in cases for r in c["results"] if r["status"] in ("fail", "error")]
    failed += [f"{c['id']} (case)" for c in cases if c.get("error")]
    summary["failed_or_error"] = failed
    summary["ratios"] = rs
    return summary


def format_summary(summary: dict, ceilings: dict) -> str:
    lines = [f"Ratios are {summary['ratio_definition']}."]
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    order = [PEER] + [p for p in summary["peers"] if p != PEER]
    for peer in order:
        e = summary["peers"].get(peer)
        if e is None:
            continue
        lines.append(f"vs {peer}: geomean fwd {x(e['geomean_fwd'])}, bwd {x(e['geomean_bwd'])} "
                     f"over {e['train_cases']} training cases"
                     + (f"; min {x(e['min'][0])} ({e['min'][1]} {e['min'][2]})" if e["min"] else ""))
        if e.get("unsettled"):
            worst = ", ".join(f"{u[1]} {u[2]} {x(u[0])} (rounds spread {u[3]:.2f})" for u in e["unsettled"][:3])
            lines.append(f"  unsettled: {len(e['unsettled'])} ratios whose rounds spread more than "
                         f"{SETTLED_SPREAD:.2f} ({worst}{', ...' if len(e['unsettled']) > 3 else ''}); "
                         + (f"min over the settled ones {x(e['min_settled'][0])} ({e['min_settled'][1]} "
                            f"{e['min_settled'][2]})" if e["min_settled"] else "none settled"))
        for mask, items in e["by_mask"].items():
            for it in items:
                lines.append(f"  {mask:13s} {it['case']}: fwd {x(it['fwd'])}, bwd {x(it['bwd'])}")
        if e["decode"]:
            lines.append(f"  decode bandwidth ratio: geomean {x(e['decode_geomean'])}")
            lines += [f"  decode        {d['case']}: {x(d['bandwidth_ratio'])}" for d in e["decode"]]
    for row in summary["decode_bandwidth"]:
        parts = [f"{impl} {v['kv_tbs']:.2f} TB/s ({100 * v['share_of_nominal']:.0f}% of {NOMINAL_HBM_TBS} nominal"
                 + (f", {100 * v['share_of_copy']:.0f}% of copy" if "share_of_copy" in v else "") + ")"
                 for impl, v in row.items() if impl != "case"]
        if parts:
            lines.append(f"decode {row['case']}: " + "; ".join(parts))
    if ceilings:
        lines.append(f"measured: device-to-device copy {ceilings['copy_bandwidth_tbs']:.2f} TB/s "
                     f"(read + write), bf16 matmul {ceilings['matmul_size']}^3 "
                     f"{ceilings['matmul_bf16_tflops']:.0f} TFLOP/s")
    if summary.get("clock_drops"):
        from benchmarks.gpu_clocks import DROP_SHARE

        lines.append(f"SM clock under {DROP_SHARE:.0%} of the run's highest sample while timing "
                     f"{len(summary['clock_drops'])} cases: " + ", ".join(summary["clock_drops"]))
    if summary["failed_or_error"]:
        lines.append("FAILED or ERROR: " + "; ".join(summary["failed_or_error"]))
    return "\n".join(lines)


def format_notes(cases: list) -> str:
    """Why each implementation was not timed, once per distinct reason."""
    seen, lines = {}, []
    for c in cases:
        if c.get("error"):
            seen.setdefault(("case", "error", c["error"]), []).append(c["id"])
        for r in c["results"]:
            if r["status"] in ("n/a", "skipped", "error", "fail") and r.get("reason"):
                seen.setdefault((r["impl"], r["status"], r["reason"]), []).append(c["id"])
            if r.get("mods_wrapped"):
                seen.setdefault((r["impl"], "note", r["mods_wrapped"]), []).append(c["id"])
    for (impl, status, reason), ids in seen.items():
        where = ids[0] if len(ids) == 1 else f"{len(ids)} cases, e.g. {ids[0]}"
        lines.append(f"{impl} {status} ({where}): {reason}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main


def kernels_digest() -> str:
    """The first 12 hex digits of a SHA-256 over kernels/'s Python sources (name and bytes, sorted):
    which kernels a run timed, where a checkout's git metadata may not say (a copy of the working
    tree on a device machine)."""
    import hashlib

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")
    h = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()[:12]


def environment(device: str, args, argv: list) -> dict:
    import triton

    env = {
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + argv),
        "argv": argv,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": _dtype_name(DTYPES[args.dtype]),
        "budget_seconds": args.budget_seconds,
        "nominal_hbm_tbs": NOMINAL_HBM_TBS,
        "block_size": BLOCK,
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "pace": args.pace if device == "cuda" else "host (the CPU dry run times on the host clock)",
        "check_mode": args.check_size,
        "kernels_digest": kernels_digest(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    else:
        env.update(gpu=None, note="CPU dry run: Triton interpreter and tiny shapes; the times mean nothing")
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Mask rows: " + ", ".join(MASKS) + ". Lengths accept 1k, 4k, 16384.",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda when a GPU is there, else cpu (a dry run: tiny shapes, Triton interpreter)")
    p.add_argument("--masks", type=_parse_masks, default=None, help="comma-separated mask rows (default: all)")
    p.add_argument("--seqlens", type=_parse_lengths, default=None, help="training sequence lengths (default 4k,16k,1k)")
    p.add_argument("--head-dims", type=_parse_ints, default=None, help="head dims (default 128,64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--decode-seqlens", type=_parse_lengths, default=None,
                   help="decode KV lengths (default 32k,8k,128k)")
    p.add_argument("--decode-batches", type=_parse_ints, default=None, help="decode batch sizes (default 1,8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--decode-only", action="store_true", help="only the decode cases")
    g.add_argument("--no-decode", action="store_true", help="no decode cases")
    p.add_argument("--quick", action="store_true",
                   help="S=4k D=128 causal, document and softcap, and decode 32k B=1 (CPU: one tiny causal "
                        "case and one tiny decode case)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated implementations (default: all that apply), of {list(IMPLS)}")
    p.add_argument("--max-autotune", action="store_true",
                   help="also torch.compile(mode='max-autotune-no-cudagraphs'), when the budget allows")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="start no new case after this many seconds since start; report what was measured")
    p.add_argument("--check-size", choices=("auto", "real", "reduced"), default="auto",
                   help="oracle check on the real shapes (auto: when they fit) or on a reduced case")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up, ms")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetitions, ms")
    p.add_argument("--pace", choices=PACES, default="host",
                   help="host: do_bench's timing, a call whose host work outlasts the L2 flush is timed at "
                        "the host's pace; gpu: each timed call is enqueued behind a GPU hold of twice its "
                        "host time, so its kernels run back to back (CUDA only)")
    p.add_argument("--rounds", type=_positive_int, default=None,
                   help="interleaved timing rounds per case; each time is the median over rounds "
                        "(default 3 on CUDA, 1 on CPU)")
    p.add_argument("--max-rounds", type=_positive_int, default=None,
                   help="more rounds, up to this many, while an implementation's round medians spread "
                        "more than 10%% (3 x --rounds on CUDA, --rounds on CPU; the budget stops them too)")
    p.add_argument("--cpu-reps", type=int, default=3, help="timed calls per measurement on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prewarm-jobs", type=int, default=0, metavar="N",
                   help="first compile every (case, implementation) in N processes (Triton's and "
                        "Inductor's disk caches then serve the timed run); 0: no prewarm")
    p.add_argument("--json", default=None,
                   help="results file (default $OUT/bench.json if OUT is set, else ./bench.json)")
    return p


def main(argv: Optional[list] = None) -> int:
    start = time.monotonic()
    argv = list(sys.argv if argv is None else argv)
    args = build_parser().parse_args(argv[1:])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        # The interpreter must be chosen before any kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _DEVICE[0] = device
    import kernels  # noqa: F401  (after the interpreter choice)

    names = [n.strip() for n in args.impls.split(",")] if args.impls else default_impls(device, args.max_autotune)
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        print(f"error: unknown implementations {unknown}; expected some of {list(IMPLS)}", file=sys.stderr)
        return 2
    impls = [IMPLS[n] for n in names]
    json_path = args.json or os.path.join(os.environ.get("OUT") or ".", "bench.json")
    cases = build_matrix(args, device)

    def log(msg: str) -> None:
        print(f"{time.monotonic() - start:6.0f}s {msg}", file=sys.stderr, flush=True)

    time_fn = timer(device, args.warmup_ms, args.rep_ms, args.cpu_reps, args.pace)
    env = environment(device, args, argv)
    env["impls"] = {i.name: i.description for i in impls}
    ceilings = device_ceilings(device, time_fn)
    env["ceilings"] = ceilings
    if ceilings:
        log(f"copy {ceilings['copy_bandwidth_tbs']:.2f} TB/s, bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s")
    log(f"{len(cases)} cases on {env.get('gpu') or 'cpu'}; implementations {names}")

    if device == "cuda" and args.prewarm_jobs > 0:
        prewarm(cases, names, args.seed, args.prewarm_jobs, log)
    deadline = None if args.budget_seconds is None else start + args.budget_seconds
    rounds = args.rounds or (3 if device == "cuda" else 1)
    clocks = None
    if device == "cuda":
        clocks = start_clock_sampler()
        env["clock_sampler"] = list(clocks.fields) if clocks.available else clocks.error
        log(f"clock sampler: {', '.join(clocks.fields) if clocks.available else clocks.error}")
        if not clocks.available:
            clocks = None
    max_rounds = args.max_rounds or (3 * rounds if device == "cuda" else rounds)
    ctx = Context(device, impls, time_fn, args.check_size, rounds, args.seed, deadline, log, clocks, max_rounds)
    try:
        return _run_matrix(cases, ctx, args, env, ceilings, json_path, start, log)
    finally:
        if clocks is not None:
            clocks.stop()


def start_clock_sampler():
    """A ``benchmarks.gpu_clocks.ClockSampler`` on the current CUDA device, named by its UUID,
    else (where nvidia-smi refused that name) by its index; check ``available``."""
    from benchmarks.gpu_clocks import ClockSampler

    sampler = ClockSampler(smi_device())
    if not sampler.available and "refused" in (sampler.error or ""):
        by_index = ClockSampler(str(torch.cuda.current_device()))
        if by_index.available:
            return by_index
    return sampler


def smi_device() -> str:
    """The current CUDA device as ``nvidia-smi -i`` names it: its UUID (right under any
    CUDA_VISIBLE_DEVICES), else its index."""
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    text = str(uuid) if uuid is not None else ""
    if not text:
        return str(index)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _run_matrix(cases, ctx, args, env, ceilings, json_path, start, log) -> int:
    deadline, device = ctx.deadline, ctx.device
    done, not_started = [], []
    for i, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            not_started = [c.id for c in cases[i:]]
            log(f"budget of {args.budget_seconds:.0f}s spent: {len(not_started)} cases not started")
            break
        try:
            done.append(run_case(case, ctx))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            log(f"[{case.id}] case failed: {_first_line(e)}")
            done.append({"id": case.id, "mask": case.mask, "kind": "decode" if case.decode else "train",
                         **asdict(case.shape), "dtype": _dtype_name(case.dtype), "error": _first_line(e),
                         "results": []})
            _free(device)
        _write_json(json_path, env, done, not_started, None, start)

    summary = summarize(done, ceilings)
    _write_json(json_path, env, done, not_started, summary, start)
    print(format_table(done))
    ratio_table = format_ratios(done)
    if ratio_table:
        print("\nOurs against each peer (peer time / our time; above 1: ours is faster):\n" + ratio_table)
    notes = format_notes(done)
    if notes:
        print("\nNotes:\n" + notes)
    print("\n" + format_summary(summary, ceilings))
    if not_started:
        more = f", ... ({len(not_started) - 4} more in the JSON)" if len(not_started) > 4 else ""
        print(f"\nNot started (budget): {len(not_started)} cases: {', '.join(not_started[:4])}{more}")
        print(rerun_hint(not_started, env["argv"][1:], device))
    print(f"\n{len(done)} cases ({env['dtype']}) in {time.monotonic() - start:.0f}s on {env.get('gpu') or 'cpu'}; "
          f"torch {env['torch']}, triton {env['triton']}; JSON: {json_path}")
    return 1 if summary["failed_or_error"] else 0


# --------------------------------------------------------------------------
# prewarm: compiles are CPU-bound and cached on disk, so do them in parallel first


def _prewarm_one(task):
    """Compile one (case, implementation) on the real shapes; nothing is timed or kept."""
    mask, shape_fields, dtype_name, impl_name, seed = task
    t0 = time.monotonic()
    try:
        case = Case(mask, Shape(**shape_fields), DTYPES[dtype_name])
        score_mod, block_mask = attention_args(case.mask, case.shape, "cuda", seed)
        fn = IMPLS[impl_name].prepare(case, score_mod, block_mask)
        q, k, v, do = make_inputs(case.shape, case.dtype, "cuda", seed, grad=not case.decode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_impl(fn, q, k, v, do, IMPLS[impl_name].returns_lse)
        torch.cuda.synchronize()
        return task, time.monotonic() - t0, None
    except NotApplicable:
        return task, time.monotonic() - t0, None
    except Exception as e:  # noqa: BLE001 - the timed run reports it properly
        return task, time.monotonic() - t0, _first_line(e)


def prewarm(cases: list, impl_names: list, seed: int, jobs: int, log) -> None:
    tasks = [(c.mask, asdict(c.shape), _dtype_name(c.dtype), name, seed) for c in cases for name in impl_names
             if not IMPLS[name].slow_compile]
    run_prewarm(_prewarm_one, tasks, jobs, log, lambda task: f"{task[0]} {task[3]}")


def run_prewarm(worker: Callable, tasks: list, jobs: int, log: Callable, label: Callable) -> list:
    """``worker(task)`` -> (task, seconds, error or None) for every task in ``jobs`` spawned
    processes (compiles are CPU-bound and land in disk caches); logs each error with
    ``label(task)`` and the total; returns the errors (the timed run reports them properly).
    ``benchmarks/ab.py`` prewarms its variants through it too."""
    import multiprocessing as mp

    t0 = time.monotonic()
    errors = []
    with mp.get_context("spawn").Pool(jobs) as pool:
        for task, _, err in pool.imap_unordered(worker, tasks):
            if err:
                errors.append(err)
                log(f"prewarm {label(task)}: {err}")
    log(f"prewarmed {len(tasks)} compiles in {time.monotonic() - t0:.0f}s with {jobs} processes")
    return errors


def _write_json(path: str, env: dict, cases: list, not_started: list, summary, start: float) -> None:
    doc = {"environment": env, "cases": cases, "not_started": not_started, "summary": summary,
           "elapsed_seconds": time.monotonic() - start}
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
