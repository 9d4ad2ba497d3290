"""``kernels.flex_attention``: the Triton kernels behind one autograd function.

CUDA tensors run compiled kernels; CPU tensors run the same kernels under the
Triton interpreter. The output has the query's dtype and follows the query's
memory layout; the LSE (natural log) and the row maximum are float32.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton

from . import _runtime
from . import mods as _mods
from .mods import ModProgram, as_mask_mod, as_score_mod, compile_mods

__all__ = ["flex_attention", "Options", "parse_kernel_options", "DTYPES"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------
# kernel options (SPEC section 5)

_TILE_KEYS = {
    "fwd": ("BLOCK_M", "BLOCK_N"),
    "bwd": ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"),
}
_LAUNCH_KEYS = ("num_warps", "num_stages")
_FLAG_KEYS = (
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS",
    "FORCE_USE_FLEX_ATTENTION", "OUTPUT_LOGSUMEXP",
)
_INT_KEYS = ("SPLIT_KV", "REFINE_KV_BLOCK", "REFINE_Q_BLOCK", "DKDV_NUM_WARPS", "DKDV_NUM_STAGES")


def _known_keys() -> set:
    keys = set(_FLAG_KEYS) | set(_INT_KEYS)
    for phase, tiles in _TILE_KEYS.items():
        for k in tiles + _LAUNCH_KEYS:
            keys |= {k, f"{phase}_{k}"}
    return keys


@dataclass(frozen=True)
class Launch:
    tiles: dict  # e.g. {"BLOCK_M": 128, "BLOCK_N": 64}
    num_warps: int
    num_stages: int
    # The tiles the caller's kernel_options set, by tile name: (the option as spelled, value).
    given: dict = field(default_factory=dict)

    def options_for(self, *names: str) -> dict:
        """The caller's options behind the tiles ``names`` ({spelled name: value}), for
        ``_runtime.launch``'s error when they do not fit in shared memory."""
        return dict(self.given[n] for n in names if n in self.given)


@dataclass(frozen=True)
class Options:
    fwd: Launch
    bwd: Launch
    prescale: bool = False
    rows_safe: bool = False
    contiguous: bool = False
    force_flex: bool = False
    output_lse: bool = True
    split_kv: Optional[int] = None
    # The dK/dV kernel's own (num_warps, num_stages) where DKDV_NUM_WARPS / DKDV_NUM_STAGES set
    # them; otherwise it launches as bwd (and the dQ kernel always does).
    dkdv_launch: Optional[tuple] = None


# Default tiles by (architecture, dtype, padded head dim, work): forward
# (BLOCK_M, BLOCK_N, warps, stages), backward (BLOCK_M1, BLOCK_N1, BLOCK_M2,
# BLOCK_N2, warps, stages). ``work`` is what the inner loop does besides the
# two products (``work_kind``): "dense" (no block mask), "masked" (a block
# mask, so mask_mod runs on partial blocks), "scored" (a score mod) or
# "gathered" (a score mod that reads a captured tensor: ALiBi's slopes, a bias
# table). A
# missing work entry falls back to the ``None`` one, a missing head dim to the
# arch's ``(arch, None)`` row. Tiles are then shrunk by ``_fit_tile`` to divide
# the sparse block sizes. The interpreter runs each tile as numpy work, so
# large tiles are fastest there.
#
# The sm90 bf16 rows were chosen with benchmarks/sweep.py on an H200
# (2026-12-02, S=4096, B*S=16k, Hq*D=2048; forward TFLOP/s over allowed
# elements, best tile first): D=128 dense 453 with 128x64/4 warps against 419
# with 128x128/8; masked (causal, document) and scored (softcap) favour
# 128x128/8 warps/2 stages (368 / 190 / 232); D=64 scored 151 with 128x64
# against 98 with 128x128 (the tanh's temporaries spill at 128x128 on 4 warps).
# Backward: 64x128 / 128x64 on 8 warps with 3 stages was best for every D=128
# row, 64x64 on 4 warps for D=64. A second sweep after delta moved into the dQ
# kernel (docs/perf/h200-sweep-2-2026-12-02.txt): D=128 dense backward 3.71 ms
# with 2 stages against 3.86 with 3; masked rows split (causal and block-sparse
# a little faster with 2 stages, document and GQA document with 3), so they stay.
# A third (fourteenth session, docs/perf/h200-bwd-n2-sweep-2026-12-04.txt, every D=128 row)
# found a dQ key step of 128 on 2 stages fastest. All three sweeps ran on loops whose
# tile address came from a list entry loaded in the same step, so that no num_stages
# could prefetch more than one step ahead (kernels.forward.next_listed). With the next
# entry carried in (sixteenth session, docs/perf/h200-sweep-pipelined-2026-12-04.txt,
# S=1k and 4k, D=128): the forward on 128x128 / 8 warps / 3 stages is the fastest on
# every row (none 4k 495 TFLOP/s against 358 with 128x64 / 4 warps, whose loop now
# spills; causal 428, softcap 268), and the backward on 64x128 / 128x64 / 3 stages
# (PyTorch's own sm90 tiles) on every row but causal 1k (4 stages, 0.676 against 0.972 ms
# in one noisy run): none 4k 3.32 ms against 3.57 with the former 128-key dQ step.
#
# float32 (IEEE products, which Triton expands into FMA code) takes the small
# tiles at every head dim: compiled for sm_90 on the 2-core CPU machine
# (benchmarks/compile_check.py's compiler, one process), a forward + dQ + dK/dV
# at E=72, Ev=80 takes 4.5 s with them against 12.1 s with the former 64x32 /
# 32x32 tiles, and 2.5 s against 6.0 s at E=40, Ev=24 (the former 128x32). The
# fuzzer compiles anew for nearly every case, and float32 cases were a third of
# its GPU time. Run-time cost: benchmarks/fp32_tiles.py (docs/FAULTS.md).
# D=64 without a score mod: 128 x 128 on 8 warps (forty-first session), under
# kernels.forward.fwd_maxnreg's cap of 128 registers (two programs a multiprocessor; uncapped
# they take 157 to 247 registers, one). On the H100 (ab.py --pace gpu, 3 rounds, forward ms,
# docs/perf/h100-ab-d64-long-rows-w8-2026-12-07.txt) against the former 128 x 128 on 4 warps
# (252 to 255 registers, two programs): none 4.568 against 4.908 at S=16k (7.4 % faster) and
# 1.212 against 1.294 at 4k, causal 2.370 / 2.552, GQA causal 2.374 / 2.542, prefix LM 2.506 /
# 2.662, block-sparse 1.200 / 1.268 (16k); on 2 stages 2 to 3 % slower, uncapped 24 to 27 %
# slower. fp16 takes the same row. A score mod that reads no captured tensor (a softcap)
# takes it too (forty-second session): capped, the softcap spills 72 bytes (sm_90, S=16k) and ran
# 9.9 % faster than on 128 x 64 and 4 warps (3.935 against 4.323 ms, ab.py --pace gpu --forward-only,
# docs/perf/h100-ab-atomic-and-scored-2026-12-07.txt); returning the LSE (the rational tanh) 4.6 %
# faster in bf16 and in fp16 (4.562 against 4.772 and 4.774 ms, ab.py --lse, forty-third session,
# docs/perf/h100-ab-lse-softcap-d64-2026-12-07.txt). A score mod that gathers ("gathered") keeps
# 128 x 64 on 4 warps, uncapped: ALiBi ran as fast on either (3.061 against 3.058 ms, no spills
# under the cap), but a relative-position table spills 444 / 960 bytes under the cap and a dense
# bias 148 / 156, and their gathers, pipelined through shared memory, take 245,760 bytes on 128 x
# 128 and 3 stages, more than an sm90 program may have (232,448).
# Where rows are short, SHORT_ROWS_FWD replaces the sm90 bf16 / fp16 forward tiles at D=64 and
# 128 (below, with the thirty-second session's H100 timings), as REFINED_FWD_LAUNCH and
# REFINED_BWD replace them on refined lists.
_CONFIGS = {
    ("sm90", None): ((128, 64, 4, 3), (64, 64, 64, 64, 4, 2)),
    ("sm90", torch.bfloat16, 64, None): ((128, 128, 8, 3), (64, 64, 64, 64, 4, 3)),
    ("sm90", torch.bfloat16, 64, "gathered"): ((128, 64, 4, 3), (64, 64, 64, 64, 4, 3)),
    ("sm90", torch.float16, 64, None): ((128, 128, 8, 3), (64, 64, 64, 64, 4, 3)),
    ("sm90", torch.float16, 64, "gathered"): ((128, 64, 4, 3), (64, 64, 64, 64, 4, 3)),
    ("sm90", torch.bfloat16, 128, None): ((128, 128, 8, 3), (64, 128, 128, 64, 8, 3)),
    ("sm90", torch.float16, 128, None): ((128, 128, 8, 3), (64, 128, 128, 64, 8, 3)),
    ("sm90", torch.float32, 64, None): ((32, 32, 4, 2), (16, 16, 16, 16, 4, 1)),
    ("sm90", torch.float32, 128, None): ((32, 32, 4, 2), (16, 16, 16, 16, 4, 1)),
    ("sm90", torch.float32, 256, None): ((32, 32, 4, 2), (16, 16, 16, 16, 4, 1)),
    ("sm80", None): ((64, 64, 4, 2), (32, 64, 64, 32, 4, 2)),
    ("sm80", torch.float32, 128, None): ((32, 32, 4, 2), (16, 16, 16, 16, 4, 1)),
    ("interp", None): ((128, 128, 1, 1), (128, 128, 128, 128, 1, 1)),
}

WORK_KINDS = ("dense", "masked", "scored", "gathered")


def work_kind(has_block_mask: bool, has_score: bool, score_loads: bool = False) -> str:
    """Which config row a call takes: a score mod dominates (one that reads a captured tensor,
    ``score_loads``, is "gathered"), then a block mask."""
    if has_score:
        return "gathered" if score_loads else "scored"
    return "masked" if has_block_mask else "dense"


_ARCHS: dict = {}


def _arch(device: torch.device, interpret: bool) -> str:
    if interpret:
        return "interp"
    hit = _ARCHS.get(device)
    if hit is None:
        major, _ = torch.cuda.get_device_capability(device)
        hit = _ARCHS[device] = "sm90" if major >= 9 else "sm80"
    return hit


_SMS: dict = {}


def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count (cached: the property lookup costs microseconds)."""
    hit = _SMS.get(device)
    if hit is None:
        hit = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return hit


def _default_config(arch: str, dtype, head_pad: int, work: Optional[str] = None):
    for key in ((arch, dtype, head_pad, work), (arch, dtype, head_pad, None), (arch, None)):
        if key in _CONFIGS:
            return _CONFIGS[key]
    raise KeyError(f"no config row for {arch}")


def _fit_tile(tile: int, sparse: int) -> int:
    """The largest power of two <= tile that divides the sparse block size."""
    while tile > 16 and (sparse % tile != 0 or tile > sparse):
        tile //= 2
    return tile


def _check_bool(opts: dict, key: str) -> bool:
    val = opts.get(key, None)
    if val is None:
        return False
    if not isinstance(val, (bool, int)) or val not in (0, 1, True, False):
        raise ValueError(f"Expected kernel_options[{key!r}] to be a bool, got {val!r}.")
    return bool(val)


def _check_pow2(key: str, val, minimum: int = 16) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum or val & (val - 1):
        raise ValueError(
            f"Expected kernel_options[{key!r}] to be a power of two >= {minimum}, got {val!r}."
        )
    return val


def _check_launch(warps_key: str, warps, stages_key: str, stages) -> None:
    """A launch's warps (a power of two up to 16) and stages (1 to 8), refused by the option's name."""
    if isinstance(warps, bool) or not isinstance(warps, int) or warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"Expected kernel_options[{warps_key!r}] in (1, 2, 4, 8, 16), got {warps!r}.")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
        raise ValueError(f"Expected kernel_options[{stages_key!r}] between 1 and 8, got {stages!r}.")


def parse_kernel_options(
    kernel_options: Optional[dict], *, dtype, head_dim: int, q_block: int, kv_block: int,
    device: torch.device, interpret: bool, work: Optional[str] = None,
    bwd_blocks: Optional[tuple] = None, refined_fwd: bool = False, refined_bwd: bool = False,
    short_fwd: bool = False, ranges_fwd: bool = False,
) -> Options:
    """Validate ``kernel_options`` (PyTorch's names) and fill in the defaults
    (``work``: the config row, see ``work_kind``). Forward tiles divide ``q_block`` /
    ``kv_block``, backward tiles ``bwd_blocks`` (default the same: they differ when the
    forward walks refined lists); ``refined_fwd`` takes ``REFINED_FWD_LAUNCH``'s warps and
    stages for a forward on automatically refined lists, unless the options set them;
    ``refined_bwd`` takes ``REFINED_BWD`` for the backward's default tiles and launch;
    ``short_fwd`` takes ``SHORT_ROWS_FWD`` (``SHORT_ROWS_FWD_D64``, where set, at a padded head
    dim of 64) for the forward's (``_short_fwd_wanted``); ``ranges_fwd`` takes ``RANGES_FWD_D64``
    for them, over ``short_fwd`` (``_ranges_fwd_wanted``)."""
    opts = dict(kernel_options or {})
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"Expected kernel_options to be a dict or None, got {type(kernel_options).__name__}.")
    unknown = sorted(set(opts) - _known_keys())
    if unknown:
        raise ValueError(
            f"Unknown kernel_options {unknown}. Known: {sorted(_known_keys())}."
        )
    for sparse, name in ((q_block, "Q_BLOCK"), (kv_block, "KV_BLOCK")):
        if sparse % 16:
            raise ValueError(
                f"Expected the block mask's {name} to be a multiple of 16 for the kernels "
                f"(tl.dot tiles are at least 16), got {sparse}. Rebuild it with BLOCK_SIZE=16 or more."
            )
    head_pad = max(16, _runtime.next_power_of_2(head_dim))
    if work is not None and work not in WORK_KINDS:
        raise ValueError(f"Expected work in {WORK_KINDS} or None, got {work!r}.")
    fwd_default, bwd_default = _default_config(_arch(device, interpret), dtype, head_pad, work)
    launches = {}
    for phase, default in (("fwd", fwd_default), ("bwd", bwd_default)):
        names = _TILE_KEYS[phase]
        tiles, given_tiles = {}, {}
        qb, kb = (q_block, kv_block) if phase == "fwd" or bwd_blocks is None else bwd_blocks
        if phase == "fwd" and refined_fwd:
            default = default[:-2] + REFINED_FWD_LAUNCH
        if phase == "fwd" and short_fwd:
            default = _short_rows_tiles(head_dim, q_block, kv_block)
        if phase == "fwd" and ranges_fwd:
            default = RANGES_FWD_D64
        if phase == "bwd" and refined_bwd:
            default = REFINED_BWD
        for k, name in enumerate(names):
            sparse = qb if "M" in name else kb
            given = opts.get(f"{phase}_{name}", opts.get(name))
            if given is None:
                tiles[name] = _fit_tile(default[k], sparse)
            else:
                tile = _check_pow2(name, given)
                if sparse % tile:
                    axis = "Q_BLOCK" if "M" in name else "KV_BLOCK"
                    raise ValueError(
                        f"Expected kernel_options[{name!r}]={tile} to divide the block mask's "
                        f"{axis}={sparse}. Use a tile of {_fit_tile(tile, sparse)} or rebuild the "
                        f"block mask with a BLOCK_SIZE that is a multiple of {tile}."
                    )
                tiles[name] = tile
                given_tiles[name] = (f"{phase}_{name}" if f"{phase}_{name}" in opts else name, tile)
        warps = opts.get(f"{phase}_num_warps", opts.get("num_warps", default[-2]))
        stages = opts.get(f"{phase}_num_stages", opts.get("num_stages", default[-1]))
        _check_launch(f"{phase}_num_warps" if f"{phase}_num_warps" in opts else "num_warps", warps,
                      f"{phase}_num_stages" if f"{phase}_num_stages" in opts else "num_stages", stages)
        launches[phase] = Launch(tiles, warps, stages, given_tiles)
    for key in ("REFINE_Q_BLOCK", "REFINE_KV_BLOCK"):  # applied to the block lists (_refine_option)
        if opts.get(key) is not None:
            _check_pow2(key, opts[key])
    dkdv_launch = None
    if opts.get("DKDV_NUM_WARPS") is not None or opts.get("DKDV_NUM_STAGES") is not None:
        warps = opts.get("DKDV_NUM_WARPS", launches["bwd"].num_warps)
        stages = opts.get("DKDV_NUM_STAGES", launches["bwd"].num_stages)
        _check_launch("DKDV_NUM_WARPS", warps, "DKDV_NUM_STAGES", stages)
        dkdv_launch = (warps, stages)
    split = opts.get("SPLIT_KV")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"Expected kernel_options['SPLIT_KV'] to be a positive int, got {split!r}.")
    return Options(
        fwd=launches["fwd"],
        bwd=launches["bwd"],
        prescale=_check_bool(opts, "PRESCALE_QK"),
        rows_safe=_check_bool(opts, "ROWS_GUARANTEED_SAFE"),
        contiguous=_check_bool(opts, "BLOCKS_ARE_CONTIGUOUS"),
        force_flex=_check_bool(opts, "FORCE_USE_FLEX_ATTENTION"),
        output_lse=opts.get("OUTPUT_LOGSUMEXP", True) is not False,
        split_kv=split,
        dkdv_launch=dkdv_launch,
    )


_OPTIONS_CACHE: dict = {}


def _cached_options(kernel_options, **kw) -> Options:
    """``parse_kernel_options`` once per distinct call (and per value of the launch constants it
    reads: ``SHORT_ROWS_FWD``, ``SHORT_ROWS_FWD_D64``, ``RANGES_FWD_D64``, ``REFINED_FWD_LAUNCH``,
    ``REFINED_BWD``):
    its checks cost tens of microseconds, as much as a short decode step's kernels. Options that
    cannot be a key (a malformed dict, unhashable values) are parsed, and rejected, every time."""
    try:
        # The value's type is part of the key: True and 1 hash alike, and only one is a valid num_warps.
        # So are the module's launch constants that parse_kernel_options reads, so that setting one
        # (a benchmark's A/B, benchmarks/ab.py --set) takes effect on the next call.
        key = (tuple(sorted((k, type(v).__name__, v) for k, v in kernel_options.items()))
               if isinstance(kernel_options, dict) else kernel_options,
               tuple(sorted((k, str(v)) for k, v in kw.items())),
               SHORT_ROWS_FWD, SHORT_ROWS_FWD_D64, RANGES_FWD_D64, REFINED_FWD_LAUNCH, REFINED_BWD)
        hash(key)
    except TypeError:
        return parse_kernel_options(kernel_options, **kw)
    hit = _OPTIONS_CACHE.get(key)
    if hit is None:
        hit = parse_kernel_options(kernel_options, **kw)
        if len(_OPTIONS_CACHE) > 256:
            _OPTIONS_CACHE.clear()
        _OPTIONS_CACHE[key] = hit
    return hit


# --------------------------------------------------------------------------
# input validation (the kernels' own: they import nothing from the oracle)


def _validate(query, key, value, scale, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expected {name} to be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"Expected {name} to have 4 dimensions [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}."
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"Expected query, key and value to share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}."
        )
    if query.dtype not in DTYPES:
        raise TypeError(
            f"Expected float16, bfloat16 or float32 inputs for the kernels, got {query.dtype}. "
            f"For float64 use oracle.flex_attention."
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"Expected query, key and value on one device, got {query.device}, {key.device}, {value.device}."
        )
    if query.device.type not in ("cpu", "cuda"):
        raise ValueError(f"Expected CPU or CUDA tensors, got device {query.device}.")
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    if tuple(value.shape[:3]) != (Bk, Hkv, S):
        raise ValueError(
            f"Expected value of shape [{Bk}, {Hkv}, {S}, Ev] to match key {tuple(key.shape)}, got {tuple(value.shape)}."
        )
    if E != Ek:
        raise ValueError(f"Expected query and key to share the head dim E, got query E={E}, key E={Ek}.")
    if Bk not in (B, 1):
        raise ValueError(f"Expected the key/value batch to be B={B} or 1, got Bk={Bk}.")
    if min(query.shape) == 0 or min(key.shape) == 0 or value.shape[3] == 0:
        raise ValueError(f"Expected non-empty inputs, got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}.")
    if enable_gqa:
        if Hq % Hkv:
            raise ValueError(f"Expected Hq % Hkv == 0 for enable_gqa=True, got Hq={Hq}, Hkv={Hkv}.")
    elif Hq != Hkv:
        raise ValueError(
            f"Expected Hq == Hkv with enable_gqa=False, got Hq={Hq}, Hkv={Hkv}. Pass enable_gqa=True for GQA."
        )
    if scale is not None:
        if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)):
            raise TypeError(f"Expected scale to be a Python float or None, got {type(scale).__name__}.")
        if not math.isfinite(scale):
            raise ValueError(f"Expected a finite scale, got scale={scale}. Pass None for 1/sqrt(E).")


# --------------------------------------------------------------------------
# block-sparse metadata


@dataclass
class Sparse:
    """Block lists as contiguous int32 tensors ``[MB, MH, rows(, cols)]``.

    ``kv_unit`` (shifted windows, ``_shifted_kv``; the forward and the dQ kernel): the kv lists hold
    each window's first key, in units of ``kv_unit`` keys, where they otherwise hold block numbers
    (None), each window ``kv_block`` keys long; ``kv_overrun``, whether a partial window ends past the keys. Such lists
    have no q-side lists (empty tensors). ``q_unit`` and ``q_overrun`` likewise for the q-side lists
    (``_shifted_q``; the dK/dV kernel alone), whose kv-side lists are empty.
    """

    q_block: int
    kv_block: int
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: Optional[torch.Tensor]
    full_kv_idx: Optional[torch.Tensor]
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: Optional[torch.Tensor]
    full_q_idx: Optional[torch.Tensor]

    kv_unit: Optional[int] = None
    kv_overrun: bool = False
    q_unit: Optional[int] = None
    q_overrun: bool = False
    _row_keys: dict = field(default_factory=dict, repr=False, compare=False)
    _runs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_full(self) -> bool:
        return self.full_kv_num is not None

    def mean_row_keys(self, L: int) -> float:
        """The keys a query tile's row lists on average (partial and full blocks together), over
        the rows of ``L`` queries and every listed batch and head; read back to the host once per
        ``L`` (the lists are cached per block mask, so a training loop pays it once)."""
        hit = self._row_keys.get(L)
        if hit is None:
            rows = -(-L // self.q_block)
            listed = self.kv_num[..., :rows].sum(dtype=torch.int64)
            if self.full_kv_num is not None:
                listed = listed + self.full_kv_num[..., :rows].sum(dtype=torch.int64)
            n = self.kv_num[..., :rows].numel()
            hit = self._row_keys[L] = float(listed) * self.kv_block / max(n, 1)
        return hit

    def persistent_tiles(self, B: int, Hq: int, L: int, block_m: int, tiles: int, programs: int,
                         tile_cost: int) -> tuple:
        """The persistent forward's tiles per program (``kernels.forward.forward_persistent_kernel``):
        ``(table, counts)``, int32 tensors on the lists' device: program p walks the tiles
        ``table[p, :counts[p]]`` of the grid's order (batch x head major, query tiles last-first),
        and the rest of its row repeats its last (a tile that lists no block costs its start and
        its stores alone: the kernel stores its rows as the grid's does, out 0 and an LSE of -inf).

        The tiles are dealt in waves of ``programs`` consecutive ones, so that the programs at work
        at one time read nearby keys and values (runs of consecutive tiles per program, tried first,
        spread them over every head: twice slower on the H100 without GQA, the L2 cache missing),
        and within a wave the dearest tile goes to the program with the least work so far (a tile's
        steps, ``tiles`` a block, plus ``tile_cost`` for its start and its stores), so that the
        programs end together. Made on the host from the lists' counts, read back once per block
        lists and shape (cached)."""
        key = (B, Hq, L, block_m, tiles, programs, tile_cost)
        if key not in self._runs:
            import numpy as np

            MB, MH, nQ = self.kv_num.shape
            listed = self.kv_num.long() + (self.full_kv_num.long() if self.full_kv_num is not None else 0)
            listed = listed.reshape(-1).cpu().numpy()
            n_m = -(-L // block_m)
            zh = np.arange(B * Hq)
            rows = (((zh // Hq) % MB) * MH + (zh % Hq) % MH)[:, None] * nQ
            m = np.arange(n_m - 1, -1, -1)  # last-first, as the grid's
            steps = listed[(rows + (m * block_m) // self.q_block).reshape(-1)] * tiles
            n = steps.size
            programs = max(1, min(programs, n))
            work = np.zeros(programs)
            owner = np.empty(n, dtype=np.int64)
            for w in range(0, n, programs):
                wave = np.arange(w, min(w + programs, n))
                dear = wave[np.argsort(-steps[wave], kind="stable")]
                idle = np.argsort(work, kind="stable")[: dear.size]
                owner[dear] = idle
                work[idle] += steps[dear] + tile_cost
            order = np.argsort(owner, kind="stable")  # each program's tiles in the grid's order
            counts = np.bincount(owner, minlength=programs)
            table = np.empty((programs, counts.max()), dtype=np.int32)
            start = 0
            for p, c in enumerate(counts):
                mine = order[start:start + c]
                table[p, :c] = mine
                table[p, c:] = mine[-1] if c else 0
                start += c
            device = self.kv_num.device
            self._runs[key] = (torch.from_numpy(table).to(device), torch.from_numpy(counts.astype(np.int32)).to(device))
        return self._runs[key]


def _transpose_lists(num: torch.Tensor, idx: torch.Tensor, n_cols: int):
    """kv-side lists [MB, MH, nQ] / [MB, MH, nQ, nKV] to q-side [MB, MH, nKV] / [MB, MH, nKV, nQ]."""
    MB, MH, nQ = num.shape
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    dense = torch.zeros(MB, MH, nQ, n_cols, dtype=torch.bool, device=idx.device)
    rows = torch.nonzero(valid, as_tuple=True)
    dense[rows[0], rows[1], rows[2], idx.long()[valid]] = True
    dense_t = dense.transpose(-1, -2)  # [MB, MH, nKV, nQ]
    q_num = dense_t.sum(-1).to(torch.int32)
    # Listed q blocks first, in increasing order: a stable sort on "not listed" (an int8 key
    # times nQ overflowed at nQ >= 128, listing the unlisted blocks first).
    order = torch.sort((~dense_t).to(torch.uint8), dim=-1, stable=True).indices
    return q_num.contiguous(), order.to(torch.int32).contiguous()


_FULL_CACHE: dict = {}


def _dense_sparse(L: int, S: int, device) -> Sparse:
    """No block mask: every tile full, one sparse block of 128 x 128."""
    key = (L, S, str(device))
    if key not in _FULL_CACHE:
        nq, nk = _runtime.cdiv(L, 128), _runtime.cdiv(S, 128)
        zeros_q = torch.zeros(1, 1, nq, dtype=torch.int32, device=device)
        zeros_k = torch.zeros(1, 1, nk, dtype=torch.int32, device=device)
        kv_idx = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
        q_idx = torch.arange(nq, dtype=torch.int32, device=device).expand(1, 1, nk, nq).contiguous()
        _FULL_CACHE[key] = Sparse(
            128, 128, zeros_q, torch.zeros_like(kv_idx), torch.full_like(zeros_q, nk), kv_idx,
            zeros_k, torch.zeros_like(q_idx), torch.full_like(zeros_k, nq), q_idx,
        )
    return _FULL_CACHE[key]


def _block_lists(block_mask, B: int, Hq: int, L: int, S: int, device) -> Sparse:
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"Expected block_mask to be a BlockMask or None, got {type(block_mask).__name__}.")
    q_block, kv_block = block_mask.BLOCK_SIZE
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    if num.dim() != 3 or idx.dim() != 4:
        raise ValueError(
            f"Expected block_mask.kv_num_blocks [MB, MH, nQ] and kv_indices [MB, MH, nQ, nKV], "
            f"got {tuple(num.shape)} and {tuple(idx.shape)}."
        )
    MB, MH, nQ, nKV = idx.shape
    if MB not in (1, B) or MH not in (1, Hq):
        raise ValueError(
            f"Expected the block mask's batch/head sizes in (1, B={B}) / (1, Hq={Hq}), got {MB}, {MH}. "
            f"Rebuild it with create_block_mask(mask_mod, B, H, ...)."
        )
    if nQ * q_block < L or nKV * kv_block < S:
        raise ValueError(
            f"Expected the block mask to cover Q_LEN={L}, KV_LEN={S}; it covers "
            f"{nQ * q_block} x {nKV * kv_block}. Rebuild it with create_block_mask for these lengths."
        )

    def prep(n, i, field_name, n_cols):
        """Contiguous int32 lists; counts within capacity, valid indices in range."""
        n = n.to(device=device, dtype=torch.int32).contiguous()
        i = i.to(device=device, dtype=torch.int32).contiguous()
        cap = i.shape[-1]
        if int(n.min()) < 0 or int(n.max()) > cap:
            raise ValueError(
                f"Expected block_mask.{field_name} in [0, {cap}], got values in "
                f"[{int(n.min())}, {int(n.max())}]. The block mask is malformed; rebuild it."
            )
        valid = torch.arange(cap, device=device) < n[..., None]
        listed = i[valid]
        if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= n_cols):
            raise ValueError(
                f"Expected the listed entries for block_mask.{field_name} in [0, {n_cols}), got "
                f"values in [{int(listed.min())}, {int(listed.max())}]. The block mask is malformed."
            )
        return n, i

    kv_num, kv_idx = prep(num, idx, "kv_num_blocks", nKV)
    full_num = full_idx = None
    if block_mask.full_kv_num_blocks is not None:
        full_num, full_idx = prep(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, "full_kv_num_blocks", nKV)
    if block_mask.q_num_blocks is not None:
        q_num, q_idx = prep(block_mask.q_num_blocks, block_mask.q_indices, "q_num_blocks", nQ)
    else:
        q_num, q_idx = _transpose_lists(kv_num, kv_idx, nKV)
    full_q_num = full_q_idx = None
    if full_num is not None:
        if block_mask.full_q_num_blocks is not None:
            full_q_num, full_q_idx = prep(block_mask.full_q_num_blocks, block_mask.full_q_indices, "full_q_num_blocks", nQ)
        else:
            full_q_num, full_q_idx = _transpose_lists(full_num, full_idx, nKV)
    return Sparse(q_block, kv_block, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx)


def _refine_kv(sparse: Sparse, mask_mod, B: int, Hq: int, L: int, S: int, sub: Optional[int],
               q_sub: Optional[int] = None) -> Sparse:
    """The same block lists at a finer granularity: each listed block split into
    ``q_block // q_sub`` x ``kv_block // sub`` sub-blocks of ``q_sub`` queries and ``sub``
    keys (None: the block's own size), where a full block's are full, and a partial
    block's are dropped when ``mask_mod`` allows none of their in-range elements, full when
    it allows all of them, partial otherwise; sub-blocks wholly past L or S are dropped.
    Every (b, h) a list serves (a broadcast batch or head dimension serves several) must
    agree for a drop or a full.

    What the kernels compute is unchanged (SPEC section 3's ``semantics="blocks"``): a
    dropped sub-block holds no allowed element, and a full one no element its mask
    would remove. Dropping alone would leave the results bitwise the same (a skipped
    all-masked tile leaves the accumulators as they were); a sub-block made full moves
    to the kernels' second pass (full blocks after partial ones), which changes the order
    of the sums, so the results agree up to rounding. What changes is the work: a document
    boundary that leaves most of a 128 x 128 block masked costs only the sub-blocks it
    touches. ``mask_mod`` runs once over the partial blocks' elements, on the lists' device,
    in chunks of 2**24 elements.
    """
    MB, MH, nQ, nKV = sparse.kv_idx.shape
    qb, kb = sparse.q_block, sparse.kv_block
    sub = sub or kb
    q_sub = q_sub or qb
    r, rq = kb // sub, qb // q_sub
    device = sparse.kv_idx.device
    member = _runtime.module("decode").membership(sparse)  # [MB, MH, nQ, nKV]: 0, 1 partial, 2 full
    # [MB, MH, nQ * rq, nKV * r], sub-blocks wholly past L or S dropped
    status = member.repeat_interleave(rq, dim=-2).repeat_interleave(r, dim=-1).clone()
    status[..., -(-L // q_sub):, :] = 0
    status[..., -(-S // sub):] = 0
    part = torch.nonzero(member == 1)  # [P, 4]: mb, mh, q block, kv block
    if part.numel():
        nb, nh = (B if MB == 1 else 1), (Hq if MH == 1 else 1)
        # The batches and heads each entry serves: b = mb + MB * t (t < B / MB), likewise h.
        bs = torch.arange(nb, device=device).view(1, nb, 1) * MB
        hs = torch.arange(nh, device=device).view(1, 1, nh) * MH
        rows = torch.arange(qb, device=device)
        cols = torch.arange(kb, device=device)
        per = nb * nh * qb * kb
        step = max(1, (1 << 24) // per)
        for start in range(0, part.shape[0], step):
            ent = part[start:start + step]
            n = ent.shape[0]
            b = (ent[:, 0].view(n, 1, 1) + bs).expand(n, nb, nh).reshape(n, nb * nh, 1, 1)
            h = (ent[:, 1].view(n, 1, 1) + hs).expand(n, nb, nh).reshape(n, nb * nh, 1, 1)
            q = ent[:, 2].view(n, 1, 1, 1) * qb + rows.view(1, 1, qb, 1)
            kv = ent[:, 3].view(n, 1, 1, 1) * kb + cols.view(1, 1, 1, kb)
            inside = (q < L) & (kv < S)
            if mask_mod is None:  # PyTorch's noop mask: a partial block allows what is in range
                allowed = inside.expand(n, nb * nh, qb, kb)
            else:
                allowed = torch.as_tensor(mask_mod(b, h, q.clamp(max=L - 1), kv.clamp(max=S - 1)), device=device)
                allowed = allowed.expand(n, nb * nh, qb, kb) & inside
            cells = allowed.reshape(n, nb * nh, rq, q_sub, r, sub)
            any_ = cells.any(dim=5).any(dim=3).any(dim=1)  # [n, rq, r]
            inside_cells = inside.expand(n, 1, qb, kb).reshape(n, 1, rq, q_sub, r, sub)
            all_ = ((cells | ~inside_cells).all(dim=5).all(dim=3).all(dim=1)
                    & inside_cells.any(dim=5).any(dim=3).any(dim=1))
            new = torch.where(all_, 2, torch.where(any_, 1, 0)).to(status.dtype)  # [n, rq, r]
            sub_rows = ent[:, 2].view(n, 1, 1) * rq + torch.arange(rq, device=device).view(1, rq, 1)
            sub_cols = ent[:, 3].view(n, 1, 1) * r + torch.arange(r, device=device).view(1, 1, r)
            status[ent[:, 0].view(n, 1, 1), ent[:, 1].view(n, 1, 1), sub_rows, sub_cols] = new

    def lists(kind):
        listed = status == kind
        # Listed sub-blocks first, in increasing order (as _transpose_lists).
        order = torch.sort((~listed).to(torch.uint8), dim=-1, stable=True).indices
        return listed.sum(-1).to(torch.int32).contiguous(), order.to(torch.int32).contiguous()

    kv_num, kv_idx = lists(1)
    full_num, full_idx = lists(2)
    q_num, q_idx = _transpose_lists(kv_num, kv_idx, nKV * r)
    full_q_num, full_q_idx = _transpose_lists(full_num, full_idx, nKV * r)
    return Sparse(q_sub, sub, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx)


_REFINED: dict = {}


def _refined_lists(sparse: Sparse, mask_mod, B, Hq, L, S, sub: Optional[int], q_sub: Optional[int] = None) -> Sparse:
    """``_refine_kv`` once per block lists, mask mod and granularity (the lists come from
    ``_cached_block_lists``, which keeps them while the block mask is unchanged)."""
    key = (id(sparse), id(mask_mod), B, Hq, L, S, sub, q_sub)
    hit = _REFINED.get(key)
    if hit is not None and hit[0] is sparse and hit[1] is mask_mod:
        return hit[2]
    refined = _refine_kv(sparse, mask_mod, B, Hq, L, S, sub, q_sub)
    if len(_REFINED) > 16:
        _REFINED.clear()
    _REFINED[key] = (sparse, mask_mod, refined)
    return refined


def _served_cells(mask_mod, ent: torch.Tensor, MB: int, MH: int, B: int, Hq: int, L: int, S: int,
                  n_rows: int, n_cols: int):
    """``mask_mod`` over rectangles of ``n_rows`` queries x ``n_cols`` keys, one per row of ``ent``
    ``[n, 4]`` (list batch, list head, first query, first key), for every (b, h) the lists serve
    (b = mb + MB * t while b < B, likewise h). Returns ``(allowed [n, served, n_rows, n_cols]``,
    False out of range, ``inside [n, 1, n_rows, n_cols])``."""
    device = ent.device
    nb, nh = (B if MB == 1 else 1), (Hq if MH == 1 else 1)
    n = ent.shape[0]
    bs = torch.arange(nb, device=device).view(1, nb, 1) * MB
    hs = torch.arange(nh, device=device).view(1, 1, nh) * MH
    b = (ent[:, 0].view(n, 1, 1) + bs).expand(n, nb, nh).reshape(n, nb * nh, 1, 1)
    h = (ent[:, 1].view(n, 1, 1) + hs).expand(n, nb, nh).reshape(n, nb * nh, 1, 1)
    q = ent[:, 2].view(n, 1, 1, 1) + torch.arange(n_rows, device=device).view(1, 1, n_rows, 1)
    kv = ent[:, 3].view(n, 1, 1, 1) + torch.arange(n_cols, device=device).view(1, 1, 1, n_cols)
    inside = (q < L) & (kv < S)
    if mask_mod is None:  # PyTorch's noop mask
        return inside.expand(n, nb * nh, n_rows, n_cols), inside
    allowed = torch.as_tensor(mask_mod(b, h, q.clamp(max=L - 1), kv.clamp(max=S - 1)), device=device)
    return allowed.expand(n, nb * nh, n_rows, n_cols) & inside, inside


def _chunks(ent: torch.Tensor, per: int):
    """``ent``'s rows in chunks of about 2**24 cells, ``per`` cells a row."""
    step = max(1, (1 << 24) // max(per, 1))
    for start in range(0, ent.shape[0], step):
        yield ent[start:start + step]


def _shifted_windows(sparse: Sparse, mask_mod, B: int, Hq: int, L: int, S: int, window: int, tile: int,
                     over: str, unit: int) -> Optional[Sparse]:
    """``_shifted_kv`` (``over="kv"``: windows of keys for each tile of ``tile`` queries) and
    ``_shifted_q`` (``over="q"``: windows of queries for each tile of ``tile`` keys), on either
    axis the same way; None where they are not to be had (see ``_shifted_kv``)."""
    if sparse.kv_unit or sparse.q_unit:
        return None
    MB, MH, nQ, nKV = sparse.kv_idx.shape
    qb, kb = sparse.q_block, sparse.kv_block
    if over == "kv":  # tiles of queries, windows of keys
        tb, n_tb, t_len, pb, n_pb, p_len = qb, nQ, L, kb, nKV, S
    else:  # tiles of keys, windows of queries
        tb, n_tb, t_len, pb, n_pb, p_len = kb, nKV, S, qb, nQ, L
    if tb % tile or p_len < window or window % unit:
        return None
    rt = tb // tile
    n_rows = n_tb * rt
    if MB * MH * n_rows * p_len > SHIFT_MAX_CELLS:
        return None
    device = sparse.kv_idx.device
    member = _runtime.module("decode").membership(sparse)  # [MB, MH, nQ, nKV]: 0, 1 partial, 2 full
    by_tile = member if over == "kv" else member.transpose(-1, -2)  # [MB, MH, tile blocks, position blocks]
    # Per (list row: a tile, position): some served element of the tile's in-range lines may be
    # attended there (any_) / every one may (all_), in the block relation.
    any_ = torch.zeros(MB, MH, n_rows, n_pb, pb, dtype=torch.bool, device=device)
    all_ = torch.zeros_like(any_)
    arange_rt = torch.arange(rt, device=device)
    tile_in = torch.arange(n_rows, device=device) * tile < t_len
    pos_in = (torch.arange(n_pb * pb, device=device) < p_len).view(n_pb, pb)
    full = torch.nonzero(by_tile == 2)
    if full.numel():
        n = full.shape[0]
        sub_rows = full[:, 2].view(n, 1) * rt + arange_rt.view(1, rt)
        val = tile_in[sub_rows].view(n, rt, 1) & pos_in[full[:, 3]].view(n, 1, pb)
        at = (full[:, 0].view(n, 1), full[:, 1].view(n, 1), sub_rows, full[:, 3].view(n, 1))
        any_[at] = val
        all_[at] = val
    part = torch.nonzero(by_tile == 1)  # [P, 4]: mb, mh, tile block, position block
    nb, nh = (B if MB == 1 else 1), (Hq if MH == 1 else 1)
    for ent in _chunks(part, nb * nh * qb * kb):
        n = ent.shape[0]
        t0, p0 = ent[:, 2] * tb, ent[:, 3] * pb
        corner = torch.stack([ent[:, 0], ent[:, 1], *((t0, p0) if over == "kv" else (p0, t0))], 1)
        allowed, inside = _served_cells(mask_mod, corner, MB, MH, B, Hq, L, S, qb, kb)
        if over == "q":
            allowed, inside = allowed.transpose(-1, -2), inside.transpose(-1, -2)
        cells = allowed.reshape(n, nb * nh, rt, tile, pb)
        line_in = inside.any(-1).reshape(n, 1, rt, tile, 1)
        sub_rows = ent[:, 2].view(n, 1) * rt + arange_rt.view(1, rt)
        at = (ent[:, 0].view(n, 1), ent[:, 1].view(n, 1), sub_rows, ent[:, 3].view(n, 1))
        any_[at] = cells.any(dim=3).any(dim=1)
        all_[at] = (cells | ~line_in).all(dim=3).all(dim=1) & line_in.any(dim=3)[:, 0]
    rows = MB * MH * n_rows
    # Windows start at multiples of ``unit``: positions pooled into groups of that many (a group
    # past p_len in part is never all allowed), windows of window // unit groups.
    n_groups = -(-p_len // unit)
    pad = n_groups * unit - p_len
    any_g = torch.nn.functional.pad(any_.view(rows, n_pb * pb)[:, :p_len], (0, pad)).view(rows, n_groups, unit)
    all_g = torch.nn.functional.pad(all_.view(rows, n_pb * pb)[:, :p_len], (0, pad)).view(rows, n_groups, unit)
    w, is_full, is_part = _greedy_windows(any_g.any(-1), all_g.all(-1), n_groups, window // unit)

    # The check: on every partial window, mask_mod True on a full block's elements and False on
    # an unlisted block's (queries inside L, keys inside S).
    pw = torch.nonzero(is_part)  # [P, 2]: list row, slot
    if pw.numel():
        r = pw[:, 0]
        mb, rest = r // (MH * n_rows), r % (MH * n_rows)
        mh, t = rest // n_rows, rest % n_rows
        first = w[pw[:, 0], pw[:, 1]] * unit
        corners = torch.stack([mb, mh, *((t * tile, first) if over == "kv" else (first, t * tile))], 1)
        n_q, n_k = (tile, window) if over == "kv" else (window, tile)
        for ent in _chunks(corners, nb * nh * n_q * n_k):
            n = ent.shape[0]
            allowed, inside = _served_cells(mask_mod, ent, MB, MH, B, Hq, L, S, n_q, n_k)
            q_blocks = ((ent[:, 2].view(n, 1) + torch.arange(n_q, device=device)) // qb).clamp(max=nQ - 1)
            kv_blocks = ((ent[:, 3].view(n, 1) + torch.arange(n_k, device=device)) // kb).clamp(max=nKV - 1)
            kind = member[ent[:, 0].view(n, 1, 1), ent[:, 1].view(n, 1, 1), q_blocks.view(n, n_q, 1),
                          kv_blocks.view(n, 1, n_k)].view(n, 1, n_q, n_k)
            bad = inside & (((kind == 2) & ~allowed) | ((kind == 0) & allowed))
            if bool(bad.any()):
                return None

    def lists(sel):
        order = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices
        idx = torch.where(sel, w.clamp(min=0), 0).gather(1, order)
        return (sel.sum(-1).to(torch.int32).view(MB, MH, n_rows).contiguous(),
                idx.to(torch.int32).view(MB, MH, n_rows, -1).contiguous())

    (num, idx), (full_num, full_idx) = lists(is_part), lists(is_full)
    overrun = bool((is_part & (w * unit + window > p_len)).any())
    empty_num, empty_idx = num.new_zeros(MB, MH, 0), num.new_zeros(MB, MH, 0, 0)
    if over == "kv":
        return Sparse(tile, window, num, idx, full_num, full_idx, empty_num, empty_idx, None, None,
                      kv_unit=unit, kv_overrun=overrun)
    return Sparse(window, tile, empty_num, empty_idx, empty_num, empty_idx, num, idx, full_num, full_idx,
                  q_unit=unit, q_overrun=overrun)


def _greedy_windows(any_: torch.Tensor, all_: torch.Tensor, length: int, window: int) -> tuple:
    """Disjoint windows of ``window`` positions covering every row's ``any_`` positions
    (``[rows, length]``), each row at once: left to right, each window starts at the first
    position not yet covered that ``any_`` holds. A row whose last window ends past ``length``
    (its windows running back to back up to it) moves those windows left together, each to end
    where the next starts, while they stay clear of the one before and of position 0 (few rows:
    the last document's; on the host). Returns ``(starts [rows, K]`` (-1: none), ``full``,
    ``partial)``: full where ``all_`` holds at every position of the window, inside ``length``."""
    rows, device = any_.shape[0], any_.device
    sentinel = torch.full((rows, 1), length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)
    # next_pos[j]: the first position >= j that any_ holds (length where none).
    next_pos = torch.where(any_, positions, length).flip(-1).cummin(-1).values.flip(-1)
    next_pos = torch.cat([next_pos, sentinel], 1)
    end = torch.zeros(rows, dtype=torch.long, device=device)
    starts = []
    while True:
        w = next_pos.gather(1, end.clamp(max=length).view(rows, 1)).view(rows)
        valid = w < length
        if not bool(valid.any()):
            break
        starts.append(torch.where(valid, w, -1))
        end = torch.where(valid, w + window, length)
    if not starts:
        starts.append(torch.full((rows,), -1, dtype=torch.long, device=device))
    w = torch.stack(starts, 1)
    listed = w >= 0
    late = torch.nonzero((listed & (w + window > length)).any(1)).flatten().tolist()
    if late:
        fixed = w[late].tolist()
        for row in fixed:
            n = sum(1 for x in row if x >= 0)
            new = row[:n]
            new[-1] = length - window
            i = n - 1
            while i > 0 and new[i - 1] + window > new[i]:
                new[i - 1] = new[i] - window
                i -= 1
            if new[0] >= 0:
                row[:n] = new
        w[late] = torch.tensor(fixed, dtype=w.dtype, device=device)
    w0 = w.clamp(min=0)
    stop = (w0 + window).clamp(max=length)
    prefix = torch.cat([sentinel * 0, all_.cumsum(-1)], 1)
    is_full = listed & (w0 + window <= length) & (prefix.gather(1, stop) - prefix.gather(1, w0) == window)
    return w, is_full, listed & ~is_full


def _shifted_kv(sparse: Sparse, mask_mod, B: int, Hq: int, L: int, S: int,
                window: int = 64, q_tile: int = 64) -> Optional[Sparse]:
    """The forward's lists as shifted windows: for each tile of ``q_tile`` queries, the keys its
    rows may attend (the relation of SPEC section 3's ``semantics="blocks"``: every key of a full
    block, the keys ``mask_mod`` allows in a partial one) covered by disjoint windows of ``window``
    keys that start at any key, where refined lists (``_refine_kv``) cover them with blocks that
    start at multiples of their length. Left to right, each window starts at the first key not yet
    covered that some row of the tile (of any (b, h) the lists serve) may attend; one that would
    end past S moves left to end at S, with the windows before it that it would overlap, while
    they stay at or after key 0 (else the window ends past S: ``kv_overrun``). A window is
    full where every row of the tile inside L may attend every key of it, partial otherwise.

    A document of n keys then takes ceil(n / 64) windows from its first key, where 64-key blocks
    take one more wherever its ends fall inside blocks; at S=4k with about 12 documents the
    windows list 1.22 times the allowed elements, against 1.31 for 64 x 64 blocks, and 34 % of
    them partial against 40 % (docs/PERFORMANCE.md, thirty-third session).

    A partial window's keys run through ``mask_mod`` in the kernel, whichever block they lie in,
    so the windows hold only where ``mask_mod`` agrees with the block mask on them: True on a full
    block's elements, False on an unlisted block's (``create_block_mask``'s masks agree; a block
    mask sparser than its mask_mod, or a full block its mask_mod masks, need not). That is checked
    on every partial window's elements; where it fails, or the tables would hold more than
    ``SHIFT_MAX_CELLS`` entries, or S < window, None.

    The result's kv lists hold each window's first key (``kv_unit`` 1), partial and full lists
    padded to one width; it has no q-side lists, and only the forward walks it.
    """
    return _shifted_windows(sparse, mask_mod, B, Hq, L, S, window, q_tile, "kv", SHIFT_UNIT_KV)


def _shifted_q(sparse: Sparse, mask_mod, B: int, Hq: int, L: int, S: int,
               window: int = 64, kv_tile: int = 64) -> Optional[Sparse]:
    """``_shifted_kv`` on the other axis, for the dK/dV kernel, which walks a key tile's queries:
    for each tile of ``kv_tile`` keys, the queries that may attend some key of it, covered by
    disjoint windows of ``window`` queries from any query; full where every query of the window
    may attend every key of the tile inside S. The q-side lists hold each window's first query
    (``q_unit`` 1; ``q_overrun``: a partial window ends past L); the kv-side lists are empty (the
    full ones too, so that ``has_full`` holds) and no kernel but the dK/dV kernel walks it."""
    return _shifted_windows(sparse, mask_mod, B, Hq, L, S, window, kv_tile, "q", SHIFT_UNIT_Q)


_AUTO_DECIDED: dict = {}


def _auto_refined(sparse: Sparse, mask_mod, B, Hq, L, S) -> Optional[Sparse]:
    """The forward's automatically refined lists (``AUTO_REFINE``), or None where refining
    saves less than ``AUTO_REFINE_SAVING`` of the listed elements. Decided once per block
    lists and mask mod (the count is read back to the host once)."""
    sub = AUTO_REFINE
    if sub is None or mask_mod is None or sparse.q_block != 128 or sparse.kv_block != 128:
        return None
    return _refined_if_saving(sparse, mask_mod, B, Hq, L, S, sub, sub, AUTO_REFINE_SAVING)


def _auto_shifted(sparse: Sparse, refined: Sparse, mask_mod, B, Hq, L, S) -> Optional[Sparse]:
    """The forward's shifted windows (``AUTO_SHIFT``) in place of the automatically ``refined``
    lists of ``sparse``, or None where they save less than ``AUTO_SHIFT_SAVING`` of the refined
    lists' elements or are not to be had; decided once per block lists and mask mod."""
    if not AUTO_SHIFT or L < 128:  # (shorter queries take the decode kernel, on block lists)
        return None

    def decide():
        shifted = _shifted_kv(sparse, mask_mod, B, Hq, L, S, refined.kv_block, refined.q_block)
        return shifted if shifted is not None and _saves(refined, shifted, _saving(AUTO_SHIFT_SAVING)) else None
    key = (id(sparse), id(mask_mod), B, Hq, L, S, "shifted", SHIFT_UNIT_KV, _saving(AUTO_SHIFT_SAVING))
    return _decided_once(key, sparse, mask_mod, decide)


def _auto_shifted_q(sparse: Sparse, refined: Sparse, mask_mod, B, Hq, L, S) -> Optional[Sparse]:
    """The dK/dV kernel's windows of queries (``AUTO_SHIFT_DKDV``, ``_shifted_q``) in place of its
    ``refined`` query lists (of the same tiles), or None where they save less than
    ``AUTO_SHIFT_SAVING`` of those lists' elements or are not to be had; decided once."""
    if not AUTO_SHIFT_DKDV:
        return None

    def listed_q(sp):
        n = sp.q_num.sum() + (sp.full_q_num.sum() if sp.full_q_num is not None else 0)
        return n * sp.q_block * sp.kv_block

    def decide():
        shifted = _shifted_q(sparse, mask_mod, B, Hq, L, S, refined.q_block, refined.kv_block)
        if shifted is None:
            return None
        old, new = torch.stack([listed_q(refined), listed_q(shifted)]).tolist()
        return shifted if new <= (1.0 - _saving(AUTO_SHIFT_SAVING)) * old else None
    key = (id(sparse), id(mask_mod), B, Hq, L, S, "shifted_q", refined.q_block, refined.kv_block, SHIFT_UNIT_Q,
           _saving(AUTO_SHIFT_SAVING))
    return _decided_once(key, sparse, mask_mod, decide)


def _auto_refined_bwd(sparse: Sparse, mask_mod, B, Hq, L, S, tiles: dict) -> tuple:
    """``(dQ's lists, dK/dV's lists)`` of the automatic backward refinement
    (``AUTO_REFINE_BWD``), each None where it is not taken. Each kernel's lists are refined to
    its own tiles, so that no tile shrinks: the dQ kernel steps through a query block's keys
    BLOCK_N2 at a time, so its lists are refined to key sub-blocks of BLOCK_N2; the dK/dV kernel
    steps through a key block's queries BLOCK_M1 at a time, so its lists to query sub-blocks of
    BLOCK_M1. A program narrower than a block (BLOCK_M2 queries, BLOCK_N1 keys; the default tiles
    are as wide as the block mask's 128) gets the lists of its own sub-block too, not those of the
    whole block, whose steps its part of the block may not need. Taken where that lists at least
    ``AUTO_REFINE_BWD_SAVING`` fewer elements."""
    if not AUTO_REFINE_BWD or mask_mod is None:
        return None, None

    def refined(q_tile, kv_tile):
        sub = kv_tile if kv_tile < sparse.kv_block else None
        q_sub = q_tile if q_tile < sparse.q_block else None
        if sub is None and q_sub is None:
            return None
        return _refined_if_saving(sparse, mask_mod, B, Hq, L, S, sub, q_sub, AUTO_REFINE_BWD_SAVING)
    return (refined(tiles["BLOCK_M2"], tiles["BLOCK_N2"]), refined(tiles["BLOCK_M1"], tiles["BLOCK_N1"]))


# The options that set a phase's tiles, warps or stages, under both of their names (and the dK/dV
# kernel's own launch for the backward): where one is set, the automatic rules leave that phase's
# tiles and launch to the caller (_refined_bwd_wanted, _short_fwd_wanted).
_LAUNCH_OPTION_NAMES = {
    phase: (*(_TILE_KEYS[phase] + _LAUNCH_KEYS), *(f"{phase}_{n}" for n in _TILE_KEYS[phase] + _LAUNCH_KEYS),
            *(("DKDV_NUM_WARPS", "DKDV_NUM_STAGES") if phase == "bwd" else ()))
    for phase in ("fwd", "bwd")
}


def _launch_given(kernel_options, phase: str) -> bool:
    """Whether ``kernel_options`` sets any of ``phase``'s tiles, warps or stages."""
    if not isinstance(kernel_options, dict):
        return False
    return any(kernel_options.get(n) is not None for n in _LAUNCH_OPTION_NAMES[phase])


def _refined_bwd_wanted(kernel_options, arch: str, dtype, head_dim: int, work: Optional[str],
                        q_block: int, kv_block: int) -> bool:
    """Whether a call's backward may take ``REFINED_BWD`` (before counting what it saves): a
    block mask without a score mod (``work`` "masked"), sm90, bf16 or fp16, a padded head dim of
    128, blocks that 64 divides, and no option that sets a backward tile, warps or stages (the
    caller's choice stands, and half of it with the rule's other half would be neither)."""
    if REFINED_BWD is None or work != "masked" or (arch != "sm90" and not AUTO_EVERYWHERE):
        return False
    if dtype not in (torch.bfloat16, torch.float16) or max(16, _runtime.next_power_of_2(head_dim)) != 128:
        return False
    if q_block % REFINED_BWD[0] or kv_block % REFINED_BWD[1]:
        return False
    return not _launch_given(kernel_options, "bwd")


def _refined_bwd_saves(sparse: Sparse, mask_mod, B, Hq, L, S, tiles: dict) -> bool:
    """Whether the 64 x 64 lists of ``REFINED_BWD`` list at least ``REFINED_BWD_SAVING`` fewer
    elements than the dQ and dK/dV kernels walk on the default ``tiles`` (their lists as
    ``_auto_refined_bwd`` takes them), both kernels counted. Decided once per block lists and
    mask mod (the counts are read back to the host once)."""
    saving = _saving(REFINED_BWD_SAVING)

    def decide():
        q_tile, kv_tile = REFINED_BWD[0], REFINED_BWD[1]
        small = _refined_lists(sparse, mask_mod, B, Hq, L, S, kv_tile if kv_tile < sparse.kv_block else None,
                               q_tile if q_tile < sparse.q_block else None)
        dq, dkdv = _auto_refined_bwd(sparse, mask_mod, B, Hq, L, S, tiles)
        counts = torch.stack([_listed(small), _listed(dq or sparse), _listed(dkdv or sparse)]).tolist()
        return 2 * counts[0] <= (1.0 - saving) * (counts[1] + counts[2])
    key = ("refined_bwd", id(sparse), id(mask_mod), B, Hq, L, S, tuple(sorted(tiles.items())), REFINED_BWD, saving)
    return _decided_once(key, sparse, mask_mod, decide)


def _listed(sp: Sparse):
    """The elements a block list covers (a 0-d tensor on the lists' device): every listed
    block, partial or full, times its size."""
    n = sp.kv_num.sum() + (sp.full_kv_num.sum() if sp.full_kv_num is not None else 0)
    return n * sp.q_block * sp.kv_block


def _refined_if_saving(sparse: Sparse, mask_mod, B, Hq, L, S, sub: Optional[int], q_sub: Optional[int],
                       saving: float) -> Optional[Sparse]:
    """``_refined_lists`` where they list at least ``saving`` fewer elements, else None;
    decided once per block lists, mask mod and granularity."""
    saving = _saving(saving)

    def decide():
        refined = _refined_lists(sparse, mask_mod, B, Hq, L, S, sub, q_sub)
        return refined if _saves(sparse, refined, saving) else None
    return _decided_once((id(sparse), id(mask_mod), B, Hq, L, S, sub, q_sub, saving), sparse, mask_mod, decide)


def _saving(value: float) -> float:
    """A savings threshold as the automatic choices take it: -1 (whatever it saves) under
    ``AUTO_EVERYWHERE``."""
    return -1.0 if AUTO_EVERYWHERE else value


def _saves(before: Sparse, after: Sparse, saving: float) -> bool:
    """Whether ``after`` lists at least ``saving`` fewer elements than ``before`` (read back once)."""
    old, new = torch.stack([_listed(before), _listed(after)]).tolist()
    return new <= (1.0 - saving) * old


def _decided_once(key: tuple, sparse: Sparse, mask_mod, decide):
    """``decide()`` once per key (block lists and mask mod held by the entry, so that their ids
    are not reused while it lives)."""
    hit = _AUTO_DECIDED.get(key)
    if hit is not None and hit[0] is sparse and hit[1] is mask_mod:
        return hit[2]
    chosen = decide()
    if len(_AUTO_DECIDED) > 16:
        _AUTO_DECIDED.clear()
    _AUTO_DECIDED[key] = (sparse, mask_mod, chosen)
    return chosen


# The forward's tiles (the backward walks the block mask's own lists, so its tiles are free).
_REFINE_TILES = {
    "REFINE_KV_BLOCK": ("KV_BLOCK", ("BLOCK_N", "fwd_BLOCK_N")),
    "REFINE_Q_BLOCK": ("Q_BLOCK", ("BLOCK_M", "fwd_BLOCK_M")),
}

# Automatic refinement of the forward's lists (on the GPU, for a block mask of 128 x 128
# blocks that no REFINE option sets): to AUTO_REFINE x AUTO_REFINE sub-blocks when that
# lists at least AUTO_REFINE_SAVING fewer elements, the forward then on REFINED_FWD_LAUNCH
# (warps, stages). Measured on the H200 (S=4k, D=128, bf16, docs/PERFORMANCE.md): the forward
# on 64 x 64 refined lists, 4 warps and 3 stages, was 13-16 % faster on the document masks
# (19 % fewer listed elements) and 2-4 % slower on causal and block-sparse masks (1 % and
# 0 % fewer), while a backward on refined lists was 30-90 % slower everywhere: hence the
# forward only, and the threshold. AUTO_REFINE = None switches it off.
AUTO_REFINE: Optional[int] = 64
AUTO_REFINE_SAVING = 0.15
REFINED_FWD_LAUNCH = (4, 3)

# Shifted windows for the forward (``_shifted_kv``): where the automatic refinement is taken, the
# forward walks 64-key windows that start at any key in place of the refined 64 x 64 blocks, when
# they list at least AUTO_SHIFT_SAVING fewer elements than those blocks. On bench.py's document
# rows (about 12 documents) they list 10.8 % fewer at S=1k and 6.7 % fewer at 4k, 0.7 % at 16k
# (not taken); on the H100 (thirty-third session) the forward was 5 % faster at 1k and 2 % at 4k
# (GQA document likewise). False switches it off, and the backward's windows with it. SHIFT_MAX_CELLS bounds the host tables (list rows x keys)
# the windows are chosen on: 4M at S=16k for a block mask of one batch and head.
AUTO_SHIFT = True
AUTO_SHIFT_SAVING = 0.05
# The dQ kernel on the forward's shifted windows, where it walks tiles of theirs (REFINED_BWD's
# 64 x 64) and would walk lists refined to them (kernels.backward._window_consts). On the H100
# (thirty-third session): backward 2 to 3 % faster on the document rows at S=1k and 4k.
AUTO_SHIFT_DQ = True
# The dK/dV kernel on windows of queries (``_shifted_q``), on REFINED_BWD's tiles, where the forward
# walks shifted windows and the query windows list at least AUTO_SHIFT_SAVING fewer elements than
# its refined 64 x 64 lists. On the H100, on SHIFT_UNIT_Q's multiples of 16: backward 2 % faster on
# document at S=1k, 1 % on GQA document, within 1 % at 4k (from any query it lost 2 to 7 %).
AUTO_SHIFT_DKDV = True
# Every automatic list choice wherever it can be had: in the interpreter too, whatever it saves,
# and REFINED_BWD's tiles on any arch (its dtype, head-dim and score-mod conditions stand). For
# the fuzz target ``kernels-shifted`` (properties/targets.py), so that a CPU fuzz reaches the
# refined lists and the shifted windows of all three kernels on every block mask of 128 x 128
# blocks; never on by default (the choices are the GPU's, for speed).
AUTO_EVERYWHERE = False
SHIFT_MAX_CELLS = 1 << 26
# Windows start at multiples of these many positions (the lists hold starts in these units):
# keys for the forward and the dQ kernel (_shifted_kv), queries for the dK/dV kernel (_shifted_q).
# A unit of 16 lets Triton know the offsets' alignment. On any query (1), the dK/dV kernel's sm_90
# loop took 648 / 501 instructions a trip (partial / full) and 124 bytes of spills, against 534 /
# 404 and 52 on blocks (document, S=4k, D=128; benchmarks/codegen.py --loops), and its backward was
# 2 to 7 % slower on the H100 than on blocks; on multiples of 16, 568 / 449 and 76 (docs/
# PERFORMANCE.md, thirty-third session). Keys on 16 list more partial windows (at S=4k, 41.7 % of
# them against 34 % on 1 and 40 % on blocks).
SHIFT_UNIT_KV = 1
SHIFT_UNIT_Q = 16

# Automatic refinement of the backward's lists (on the GPU, under the same gate): one axis
# per kernel at its own step, so the tiles stay as they are (_auto_refined_bwd), where that
# lists at least AUTO_REFINE_BWD_SAVING fewer elements. A sub-block that becomes empty is a
# step skipped, one that becomes full a step without mask_mod. False switches it off.
AUTO_REFINE_BWD = True
AUTO_REFINE_BWD_SAVING = 0.05

# The backward on 64 x 64 tiles where they save work (on the GPU, under the same gate as
# AUTO_REFINE_BWD, for a block mask without a score mod, sm90 bf16 / fp16 at a padded head dim of
# 128, and no backward tile, launch or DKDV_* option set): both backward kernels then take
# REFINED_BWD, (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps, stages), and walk lists refined to
# 64 x 64, where those list at least REFINED_BWD_SAVING fewer elements than the two kernels' own
# lists on the default tiles (a dQ step of 128 queries x 64 keys, a dK/dV step of 128 keys x 64
# queries, each refined as AUTO_REFINE_BWD does). On 4 warps and 2 stages both kernels fit two
# programs a multiprocessor (sm_90, D=128: dQ 176 registers, dK/dV 255; 99 KB of shared memory
# each) where the default tiles fit one, so that one program's prologue and epilogue run under the
# other's loop; and the 64 x 64 lists skip what the 128-wide steps computed and masked. Measured on
# the H100 (docs/PERFORMANCE.md, thirty-first session; ab.py, backward, against the default tiles):
# document 7 % (S=4k, 10 % fewer elements) and 12 % (1k, 15 % fewer) faster, GQA document 8 % and
# 12 %, sliding window 3 to 4 % (6 % fewer), causal at 1k 2 % (6 % fewer); where the lists save
# under 5 % it lost 1 to 4 % (prefix LM 1k: 4 % fewer elements, 1 % slower; causal 4k, block-sparse,
# no mask), and with a score mod much more at S=4k (softcap 9 %, ALiBi 7 %), hence no score mod.
# On these tiles the dK/dV kernel issues dV before dP (kernels.backward.dp_first). None switches
# it off.
REFINED_BWD: Optional[tuple] = (64, 64, 64, 64, 4, 2)
REFINED_BWD_SAVING = 0.05


# The forward on 64 x 64 tiles, 4 warps and 3 stages (at D=64 SHORT_ROWS_FWD_D64's 64 x 128 on 2
# stages, below) where its rows are short (sm90, bf16 or fp16,
# padded head dim 64 or 128, no forward tile or launch option set): where the query tiles' rows list
# at most SHORT_ROWS_FWD_MAX_KEYS keys on average (``Sparse.mean_row_keys``, partial and full
# blocks together; S without a block mask), the forward takes SHORT_ROWS_FWD, (BLOCK_M, BLOCK_N,
# warps, stages), in place of the default row's (D=128: 128 x 128 on 8 warps, one program a
# multiprocessor, 242 to 255 registers and 229,376 bytes of shared memory; D=64: 128 x 128, or
# 128 x 64 with a score mod, on 4 warps then; since the forty-first session 128 x 128 on 8 warps
# capped (since the forty-second with a score mod too, unless it gathers), which on the H100 ran
# causal at S=4k 1.6 % faster than these short tiles and sliding window at 16k 1.2 % slower, and
# softcap and ALiBi at 4k and 1k within 2 % or slower, so the short rows keep them). On its tiles two programs fit a
# multiprocessor at D=128 (168 registers, 114,688 bytes), so that one's prologue and epilogue, which a short row pays
# once per few steps, run under the other's loop. Measured on the H100 (docs/PERFORMANCE.md,
# thirty-second session; ab.py, forward, bench.py's shapes, B*S = 16k, bf16) against the default
# tiles, D=128, the rows' mean keys in brackets:
#   faster at S=1k on every row: none 4.5 % (1024), causal 4.5 % (576), sliding window and prefix
#   LM 4.9 %, GQA causal 5.1 %, block-sparse 11 %, ALiBi 8.6 %, softcap 11 %;
#   at S=2k without a mask 2.4 % (2048); at S=4k causal 2.7 % (2112), sliding window 2.7 %, prefix
#   LM 2.0 %, GQA causal 2.9 %, block-sparse 5.2 %, ALiBi 7.8 %, softcap 6.6 %;
#   at S=8k (4160 and more) 0.5 to 3.5 %, sliding window at 16k 2.5 % (about 1100);
#   slower without a mask at S=4k, 2.1 % (4096), and at S=16k causal 4.6 % and softcap 1.6 %
#   (8256; ALiBi 1.3 % faster).
# The cap keeps the dense 4k row out, and with it the 8k rows' small gains. fp16: softcap 8 to 9 %
# faster at S=1k and 4k, causal 4.9 % at 1k. D=64 was faster on every row timed: none 2.7 % (1k)
# and 2.6 % (4k, over the cap), causal 7.2 % and 2.7 %, softcap 8.2 %, 4.4 % and 3.6 % (16k, over
# the cap), ALiBi 2.8 % and 0.2 %, block-sparse and sliding window at 4k 6.5 % and 6.9 %; its cap
# could be higher, but its long dense and causal rows are untimed. None switches it off.
SHORT_ROWS_FWD: Optional[tuple] = (64, 64, 4, 3)
SHORT_ROWS_FWD_MAX_KEYS = 3072
# The short rows at a padded head dim of 64 take these tiles instead, where the blocks allow:
# 64 x 128 on 4 warps and 2 stages (167 registers and 73,728 bytes of shared memory on sm_90
# for causal at S=4k, three programs a multiprocessor). None: SHORT_ROWS_FWD at both head dims.
# The H100 timed them faster than 64 x 64 on 3 stages (ab.py, forward, two runs;
# docs/PERFORMANCE.md, thirty-seventh session): causal 4k 2.5 and 4.3 %, prefix LM 7.6 and 5.1 %,
# block-sparse 1.9 and 2.6 %, sliding window 3.4 %. On by default since the thirty-eighth session
# (GPU suite passed on the H100); the document rows walk refined lists (REFINED_FWD_LAUNCH) and
# never take them.
SHORT_ROWS_FWD_D64: Optional[tuple] = (64, 128, 4, 2)


def _short_rows_tiles(head_dim: int, q_block: int, kv_block: int) -> Optional[tuple]:
    """The short rows' forward (BLOCK_M, BLOCK_N, warps, stages) at this head dim and these
    blocks: SHORT_ROWS_FWD_D64 at a padded head dim of 64 where its tiles divide the blocks,
    else SHORT_ROWS_FWD (None where that is off)."""
    if SHORT_ROWS_FWD is None:
        return None
    d64 = SHORT_ROWS_FWD_D64
    if (d64 is not None and max(16, _runtime.next_power_of_2(head_dim)) == 64
            and not q_block % d64[0] and not kv_block % d64[1]):
        return d64
    return SHORT_ROWS_FWD


def _short_fwd_wanted(kernel_options, arch: str, dtype, head_dim: int, q_block: int, kv_block: int) -> bool:
    """Whether a call's forward may take ``SHORT_ROWS_FWD`` (before its rows' length is read):
    sm90, bf16 or fp16, a padded head dim of 64 or 128, blocks that its tiles divide, and no
    option that sets a forward tile, warps or stages (the caller's choice stands)."""
    if SHORT_ROWS_FWD is None or arch != "sm90" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if max(16, _runtime.next_power_of_2(head_dim)) not in (64, 128):
        return False
    tiles = _short_rows_tiles(head_dim, q_block, kv_block)
    if q_block % tiles[0] or kv_block % tiles[1]:
        return False
    return not _launch_given(kernel_options, "fwd")


# The forward's tiles at a padded head dim of 64 where its program takes the document range test
# (``ModProgram.mask_ranges``, from DOCUMENT_RANGES_FWD_MIN_DIM) without a score mod, on lists that
# were not refined (refined lists keep REFINED_FWD_LAUNCH on 64 x 64): 128 x 128 on 8 warps and 3
# stages, under kernels.forward.RANGES_FWD_MAXNREG's cap of 128 registers (64 scores a thread, as the short
# rows' 64 x 128 on 4 warps). At that cap two programs fit a multiprocessor (sm_90: 112 KiB of
# shared memory each). On the H100 (forty-first session, ab.py --pace gpu, 3 rounds; document at
# S=16k, D=64, where the rows list 2,664 keys on average and took SHORT_ROWS_FWD_D64): forward
# 0.871 ms against 0.936 on 64 x 128, 4 warps, 2 stages (7 % faster; GQA document 0.870 against
# 0.925), where 64 x 64 on 3 stages took 0.892, 128 x 128 on 8 warps and 2 stages 0.892, on 4
# stages 1.141 (one program a multiprocessor), uncapped 1.130, and the id compare on these tiles
# (uncapped: it takes no cap) 1.125. Long rows (over SHORT_ROWS_FWD_MAX_KEYS) took the D=64 row's
# former 128 x 128 on 4 warps, which under the cap ran 3.41 ms (128 scores a thread: spills); the
# row is now these tiles too (_CONFIGS), so the rule's effect is to keep the short rows' tiles
# off these programs. None: the short or default tiles, as for any other mask. A score mod beside
# the mask (softcap, ALiBi) keeps those too: untimed on these tiles.
RANGES_FWD_D64: Optional[tuple] = (128, 128, 8, 3)


def _ranges_fwd_wanted(kernel_options, arch: str, dtype, head_dim: int, q_block: int, kv_block: int) -> bool:
    """Whether a forward whose program takes the document range test (on lists that were not
    refined) runs on ``RANGES_FWD_D64``: sm90, bf16 or fp16, a padded head dim of 64, blocks its
    tiles divide, and no option that sets a forward tile, warps or stages."""
    tiles = RANGES_FWD_D64
    if tiles is None or arch != "sm90" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if max(16, _runtime.next_power_of_2(head_dim)) != 64 or q_block % tiles[0] or kv_block % tiles[1]:
        return False
    return not _launch_given(kernel_options, "fwd")


def _refine_option(kernel_options, q_block: int, kv_block: int) -> tuple:
    """``(REFINE_Q_BLOCK, REFINE_KV_BLOCK)`` of ``kernel_options``, checked: each None, or a power
    of two >= 16 that divides the block mask's Q_BLOCK / KV_BLOCK (None where it equals it:
    nothing to refine)."""
    if not isinstance(kernel_options, dict):
        return None, None
    got = []
    for key, block in (("REFINE_Q_BLOCK", q_block), ("REFINE_KV_BLOCK", kv_block)):
        sub = kernel_options.get(key)
        if sub is None:
            got.append(None)
            continue
        axis, tile_names = _REFINE_TILES[key]
        _check_pow2(key, sub)
        if block % sub:
            raise ValueError(
                f"Expected kernel_options['{key}']={sub} to divide the block mask's {axis}="
                f"{block}. Use a power of two that divides it, or leave it unset."
            )
        for name in tile_names:
            tile = kernel_options.get(name)
            if isinstance(tile, int) and not isinstance(tile, bool) and tile > sub:
                what = "key" if axis == "KV_BLOCK" else "query"
                raise ValueError(
                    f"Expected kernel_options[{name!r}]={tile} to be at most {key}={sub}: the forward's "
                    f"{what} tiles must divide the refined blocks. Use a smaller tile or a larger {key}."
                )
        if _check_bool(kernel_options, "BLOCKS_ARE_CONTIGUOUS"):
            raise ValueError(
                f"Expected {key} without BLOCKS_ARE_CONTIGUOUS: refining drops masked sub-blocks, so "
                f"the promise of consecutive blocks would no longer hold. Unset one of them."
            )
        got.append(sub if sub < block else None)
    return tuple(got)


def _auto_refine_wanted(kernel_options, interpret: bool) -> bool:
    """Whether a call may take the automatic forward refinement: compiled kernels (the
    interpreter keeps the lists as given, so CPU runs and fault tables do not move), no
    REFINE option and no contiguity promise (refining can break it)."""
    return ((not interpret or AUTO_EVERYWHERE) and not _refine_given(kernel_options)
            and not _check_bool(kernel_options or {}, "BLOCKS_ARE_CONTIGUOUS"))


def _fwd_tiles_fit(kernel_options, sub: Optional[int]) -> bool:
    """Whether the forward tiles the options set (BLOCK_M, BLOCK_N and their fwd_ forms) are at
    most ``sub``, so that they divide blocks refined to it. A tile the caller asked for is kept:
    a 128 x 128 tile rules the automatic 64 x 64 refinement out (taking it anyway raised on
    the H200 where the options asked for BLOCK_M or BLOCK_N of 128; false-alarm seeds 13005
    and 13007)."""
    if sub is None or not isinstance(kernel_options, dict):
        return True
    names = _REFINE_TILES["REFINE_Q_BLOCK"][1] + _REFINE_TILES["REFINE_KV_BLOCK"][1]
    return all(not (isinstance(t, int) and not isinstance(t, bool) and t > sub)
               for t in (kernel_options.get(n) for n in names))


def _grad_wanted(query, key, value, program) -> bool:
    """Whether autograd will record the call (so a backward may follow)."""
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                        or any(t.requires_grad for t in program.buffers))


def _refine_given(kernel_options) -> bool:
    """Whether the options set a REFINE option at all (one equal to the block size asks for the
    unrefined lists, and so switches the automatic refinement off)."""
    return isinstance(kernel_options, dict) and any(
        kernel_options.get(k) is not None for k in ("REFINE_Q_BLOCK", "REFINE_KV_BLOCK"))


_LISTS_CACHE: Optional[collections.OrderedDict] = None


def _cached_block_lists(block_mask, B, Hq, L, S, device) -> Sparse:
    """``_block_lists`` once per block mask: its checks read counts back to the host,
    a synchronisation that would otherwise stall every call of a training loop.
    Keyed by the identity and version of each list tensor, so an in-place edit
    of a mask is checked again."""
    global _LISTS_CACHE
    if _LISTS_CACHE is None:
        _LISTS_CACHE = collections.OrderedDict()
    fields = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
              block_mask.full_kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
              block_mask.full_q_num_blocks, block_mask.full_q_indices)
    key = (tuple((id(t), t._version) if t is not None else None for t in fields),
           tuple(block_mask.BLOCK_SIZE), B, Hq, L, S, str(device))
    hit = _LISTS_CACHE.get(key)
    if hit is not None and hit[0] is block_mask.kv_num_blocks:
        _LISTS_CACHE.move_to_end(key)
        return hit[1]
    sparse = _block_lists(block_mask, B, Hq, L, S, device)
    _LISTS_CACHE[key] = (block_mask.kv_num_blocks, sparse)
    while len(_LISTS_CACHE) > 16:
        _LISTS_CACHE.popitem(last=False)
    return sparse


_PROGRAM_CACHE: dict = {}

# The rounding (compile_mods) of the mods where no float32 result comes of them, by the
# inputs' dtype: the unit roundoff of bf16 and fp16. The backward always: dq, dk and dv are
# rounded to it, and P and dS before their products. The forward when the call returns out
# alone: out is rounded to it, and the LSE kept for the backward is read only by the backward.
# A call that returns the LSE or the row max (float32 results) gets the exact mods, and float32
# inputs get them everywhere. On the CPU (interpreter) the same choice, so that the CPU tests
# check the code the GPU runs.
DTYPE_ROUNDING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

# The forward (and decode) take a document mask's range test (kernels.mods.DOCUMENT_RANGES) from
# this padded head dim. On the H100 (fortieth session, ab.py --pace gpu) it ran the D=128
# document forward 2.4 % and the GQA one 2.9 % faster at S=4k; at D=64 4.3 % and 4.4 % faster
# (3.5 % at S=1k) under kernels.forward.RANGES_FWD_MAXNREG's register cap, 3 to 5 % slower
# without it. Narrower heads were not timed. The dQ kernel takes it at every head dim (1 to
# 3.5 % faster backward). Decode (D=128, the last token's document of 12; forty-first session,
# GPU pace): within 1 % of the id compare at S=8k and 32k, 1.4 to 3.9 % faster at 128k
# (docs/perf/h100-decode-document-gpu-pace-2026-12-07.txt).
DOCUMENT_RANGES_FWD_MIN_DIM = 64


def _kernel_rcp(name: str) -> Optional[str]:
    """``kernels.mods.TANH_RCP_DKDV`` or ``TANH_RCP_FWD``: a kernel's own fast-tanh reciprocal
    (None: TANH_RCP), refused by name where it is none of ``TANH_RCPS``."""
    how = getattr(_mods, name)
    if how is not None and how not in _mods.TANH_RCPS:
        raise ValueError(f"Expected kernels.mods.{name} in {(None, *_mods.TANH_RCPS)}, got {how!r}.")
    return how


def _cached_program(score, mask, interpret: bool, rounding: float = 0.0, rcp: Optional[str] = None,
                    loop: str = "n", ranges: Optional[bool] = None) -> ModProgram:
    """``compile_mods`` once per pair of mod objects (and ``rounding``, ``rcp``, ``loop``, ``ranges``;
    None: ``kernels.mods.DOCUMENT_RANGES``): generating and
    hashing the Triton source costs more host time than a whole decode step's kernels.
    Mods are immutable and the entry holds them, so their ids stay theirs; the
    tables they capture are read through the program's buffers on every call,
    so in-place updates of a learnable table are still seen."""
    ranges = _mods.DOCUMENT_RANGES if ranges is None else bool(ranges)
    key = (id(score), id(mask), interpret, rounding, rcp, loop, ranges, _mods.DOCUMENT_RANGES_DKDV)
    hit = _PROGRAM_CACHE.get(key)
    # The source depends on which tables require grad and on their shapes (strides are baked in),
    # and a derived table (a document mask's ranges) on the versions of the ids it came from.
    if hit is not None and hit[0] is score and hit[1] is mask and hit[3] == _table_state(hit[2]):
        return hit[2]
    program = compile_mods(score, mask, interpret=interpret, rounding=rounding, rcp=rcp, loop=loop, ranges=ranges)
    _PROGRAM_CACHE[key] = (score, mask, program, _table_state(program))
    while len(_PROGRAM_CACHE) > 64:
        _PROGRAM_CACHE.pop(next(iter(_PROGRAM_CACHE)))
    return program


_COPIES: dict = {}


def _device_buffers(tables: list, device) -> list:
    """The mods' tables as the kernels read them: detached, contiguous, on ``device``.

    A table held elsewhere (a document-id table built on the CPU, say) is copied once
    and the copy reused while the table is unchanged (keyed by identity and version):
    a copy on every call would also synchronise the host with the GPU, since a
    pageable host-to-device copy waits for the queue (measured on the H200: document
    masks' forward went from GPU-bound to host-bound, 0.3 to 0.45 ms).
    """
    out = []
    for t in tables:
        if t.device == device and t.is_contiguous():
            out.append(t.detach() if t.requires_grad else t)
            continue
        key = (id(t), t._version, str(device))
        hit = _COPIES.get(key)
        if hit is None or hit[0] is not t:
            hit = (t, t.detach().to(device).contiguous())
            if len(_COPIES) > 64:
                _COPIES.clear()
            _COPIES[key] = hit
        out.append(hit[1])
    return out


def _own_buffers(program: ModProgram, forward: ModProgram, device) -> Optional[list]:
    """``program``'s tables on the device where they are not the forward program's, else None."""
    a, b = program.buffers, forward.buffers
    if len(a) == len(b) and all(x is y for x, y in zip(a, b)):
        return None
    return _device_buffers(a, device)


def _table_state(program: ModProgram) -> tuple:
    return tuple((t.requires_grad, tuple(t.shape), _mods.derived_sources(t)) for t in program.buffers)


# --------------------------------------------------------------------------
# the plan and the autograd function


@dataclass
class Plan:
    """Everything the kernels need besides the q, k, v tensors."""

    B: int
    Hq: int
    Hkv: int
    Bk: int
    L: int
    S: int
    E: int
    Ev: int
    scale: float
    program: ModProgram
    sparse: Sparse  # the forward's (and decode's) block lists, refined where asked
    options: Options
    interpret: bool
    fp32_precision: str
    return_max: bool = False
    buffers: list = field(default_factory=list)  # detached, contiguous, on the device
    sparse_bwd: Optional[Sparse] = None  # the backward's: the block mask's own (None: sparse)
    # The dQ kernel's key lists and the dK/dV kernel's query lists where the automatic
    # backward refinement took them (AUTO_REFINE_BWD; None: backward_sparse).
    sparse_dq: Optional[Sparse] = None
    sparse_dkdv: Optional[Sparse] = None
    # Whether the backward took REFINED_BWD's tiles (the dK/dV kernel then issues dV first:
    # kernels.backward.dp_first).
    refined_bwd: bool = False
    # The dQ kernel's mods, compiled with DTYPE_ROUNDING's rounding (None: program).
    program_bwd: Optional[ModProgram] = None
    # The dK/dV kernel's: its loop walks queries, and kernels.mods.TANH_RCP_DKDV may give it
    # its own reciprocal (None: program_bwd).
    program_dkdv: Optional[ModProgram] = None
    # program_bwd's and program_dkdv's tables where they are not program's (a document mask's
    # ids where another kernel reads its ranges), on the device; None: buffers.
    bwd_buffers: Optional[list] = None
    dkdv_buffers: Optional[list] = None

    @property
    def backward_program(self) -> ModProgram:
        return self.program_bwd if self.program_bwd is not None else self.program

    @property
    def dkdv_program(self) -> ModProgram:
        return self.program_dkdv if self.program_dkdv is not None else self.backward_program

    @property
    def backward_sparse(self) -> Sparse:
        return self.sparse_bwd if self.sparse_bwd is not None else self.sparse

    @property
    def dq_sparse(self) -> Sparse:
        return self.sparse_dq if self.sparse_dq is not None else self.backward_sparse

    @property
    def dkdv_sparse(self) -> Sparse:
        return self.sparse_dkdv if self.sparse_dkdv is not None else self.backward_sparse

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    def module(self, name: str):
        return _runtime.module(name)

    def buffer_args(self, like: torch.Tensor, kernel: str = "forward") -> list:
        """B0..B3 of a kernel ("forward" and decode, "dq", "dkdv"): its program's tables, then dummies."""
        own = {"forward": None, "dq": self.bwd_buffers, "dkdv": self.dkdv_buffers}[kernel]
        buffers = self.buffers if own is None else own
        dummy = like.new_empty(1)
        return buffers + [dummy] * (4 - len(buffers))


_LAYOUTS: dict = {}


def _empty_like_layout(ref: torch.Tensor, shape, dtype) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dimension order follows ``ref``'s strides.

    The common contiguous case is a plain ``torch.empty``; the dimension order of
    other layouts is cached by stride pattern (sorting it cost ~20 us a call, as much
    as a decode step's kernels)."""
    if ref.is_contiguous():
        return torch.empty(shape, dtype=dtype, device=ref.device)
    pattern = (ref.stride(), ref.shape)
    hit = _LAYOUTS.get(pattern)
    if hit is None:
        order = sorted(range(4), key=lambda d: (ref.stride(d), ref.shape[d]), reverse=True)
        hit = (order, [order.index(d) for d in range(4)])
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[pattern] = hit
    order, inverse = hit
    buf = torch.empty([shape[d] for d in order], dtype=dtype, device=ref.device)
    return buf.permute(inverse)


def _matching_kv_layouts(key: torch.Tensor, value: torch.Tensor):
    """``key`` and ``value``, with a contiguous copy of the one whose head dim is not
    unit-stride when the other's is (on the GPU; the copy is differentiable).

    Triton 3.6 on sm_90 miscompiles the forward for some such pairs. Found by the H200
    false-alarm count (seed 15005, ``ones_value_gives_one``, whose V of ones is contiguous
    while the case's K is stored [B, H, E, S]; ``tests/cases/mixed-kv-layout-bf16.json``):
    bf16, B=1, Hq=12, Hkv=2, L=S=129, E=Ev=24, no mask, scale 2. Replayed there on fresh
    processes, the output is garbage (max error 5.5) with K stored [B, H, E, S] and V
    contiguous, at 4 warps with 1 stage, at the default 4 warps with 3 stages and at 8
    warps, and it was an illegal memory access in the process that had run other
    configurations first; right (max error 0.008) with the two layouts swapped, with both
    contiguous or both transposed, with L=S=128 or 256, and with E=Ev=32 or 64 (padding
    of the head dim and a partial last key tile both needed). The interpreter is right on
    all of them. Not isolated further; copying the odd one out costs one pass over K or
    V, small beside attention's O(L * S) work, and leaves the layouts the kernels were
    measured on.
    """
    k_rows = key.shape[3] == 1 or key.stride(3) == 1
    v_rows = value.shape[3] == 1 or value.stride(3) == 1
    if k_rows == v_rows:
        return key, value
    return (key, value.contiguous()) if k_rows else (key.contiguous(), value)


def use_decode(plan: Plan) -> bool:
    """The seed's choice: short queries take the split-KV decode kernel."""
    return plan.L < 128 and not plan.options.force_flex


class _FlexFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan: Plan, *learnable):
        if use_decode(plan):
            out, lse, mx = plan.module("decode").run_decode(plan, query, key, value)
        else:
            out, lse, mx = plan.module("forward").run_forward(plan, query, key, value)
        if not plan.return_max:
            # Never return one tensor as two outputs: autograd would route the
            # LSE's gradient to the max slot.
            mx = lse.new_empty(0)
        ctx.plan = plan
        # The backward's CONCURRENT, SIDE_KERNEL, DQ_ATOMIC, ONE_LOOP, HEADS_IN_LOOP, DKDV_DP_FIRST,
        # DQ_OWN_DELTA, TMA_DQ and TMA_DKDV as they were when the forward ran (a benchmark toggles them per call).
        ctx.concurrent = plan.module("backward").CONCURRENT
        ctx.side = plan.module("backward").SIDE_KERNEL
        ctx.dq_atomic = plan.module("backward").DQ_ATOMIC
        ctx.one_loop = plan.module("backward").ONE_LOOP
        ctx.heads_in_loop = plan.module("backward").HEADS_IN_LOOP
        ctx.dp_first = plan.module("backward").DKDV_DP_FIRST
        ctx.dq_own_delta = plan.module("backward").DQ_OWN_DELTA
        ctx.tma = (plan.module("backward").TMA_DQ, plan.module("backward").TMA_DKDV)
        # Outputs that got no gradient arrive as None, not as materialised zeros: that saves two
        # memsets and the LSE-gradient pass of the common loss on ``out`` alone.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.mark_non_differentiable(mx)
        return out, lse, mx

    @staticmethod
    def backward(ctx, dout, dlse, dmax):
        query, key, value, out, lse = ctx.saved_tensors
        plan = ctx.plan
        dq, dk, dv, dbufs = plan.module("backward").run_backward(
            plan, query, key, value, out, lse, dout, dlse, need_buffer_grads=any(ctx.needs_input_grad[4:]),
            concurrent=ctx.concurrent, side=ctx.side, dq_atomic=ctx.dq_atomic, one_loop=ctx.one_loop,
            heads_in_loop=ctx.heads_in_loop, dp_first_flag=ctx.dp_first, dq_own_delta=ctx.dq_own_delta,
            tma=ctx.tma,
        )
        return (dq, dk, dv, None, *dbufs)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod=None,
    block_mask=None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Optional[dict] = None,
    *,
    return_max: bool = False,
):
    """Block-sparse FlexAttention in Triton (SPEC sections 2-5).

    ``score_mod`` must be a ``kernels.mods`` score mod and ``block_mask.mask_mod``
    a ``kernels.mods`` mask mod (or PyTorch's noop mask). Returns ``out``
    ``[B, Hq, L, Ev]`` in the query's dtype, then ``lse`` ``[B, Hq, L]`` (natural
    log, float32) if ``return_lse`` and the row max (float32) if ``return_max``.
    Fully masked rows give 0 and -inf, and zero gradients.

    Precision: in bf16 and fp16, the backward and a forward that returns out alone compute a
    ``tanh_softcap``'s tanh by a cheaper formula, within 3e-7 of tanh (``kernels.mods.
    TANH_FAST_ERR``: under a hundredth of the rounding the results get; ``DTYPE_ROUNDING``).
    A call that returns the LSE or the max, whose float32 values would show it, and every
    float32 call keep the float32-accurate rational.

    ``kernel_options`` takes PyTorch's names (SPEC section 5) and five of ours: ``SPLIT_KV``
    (the decode kernel's number of key splits), ``REFINE_KV_BLOCK`` and ``REFINE_Q_BLOCK``
    (powers of two dividing the block mask's KV_BLOCK / Q_BLOCK: the forward's block lists are
    refined once per block mask to sub-blocks of that many keys / queries, dropping those
    where ``mask_mod`` allows nothing and marking full those where it allows everything; the
    same function, less work where masks leave most of a block empty, results equal up to
    rounding since full blocks run after partial ones; ``_refine_kv``; the backward walks the
    block mask's own lists). On the GPU a block mask of 128 x 128 blocks with neither option
    set is refined to 64 x 64 for the forward when that lists at least 15 % fewer elements
    (``AUTO_REFINE``) and no forward tile of 128 is asked for (and then walks 64-key windows that
    start at any key, where those list at least 5 % fewer elements than the 64 x 64 blocks and the
    mask agrees with the block mask on their keys: ``AUTO_SHIFT``, ``_shifted_kv``; on REFINED_BWD's
    tiles the dQ kernel walks the same windows and the dK/dV kernel windows of 64 queries:
    ``AUTO_SHIFT_DQ``, ``AUTO_SHIFT_DKDV``), and, when a backward may follow,
    the dQ kernel's key lists and the dK/dV kernel's query lists are refined to those kernels'
    own steps when that saves at least 5 % (``AUTO_REFINE_BWD``); without a score mod, on sm90 in
    bf16 or fp16 at head dims 65 to 128, and with no backward tile, warps or stages option set,
    both backward kernels instead take 64 x 64 tiles on 4 warps (``REFINED_BWD``) and lists
    refined to 64 x 64 where those list at least 5 % fewer elements than the default tiles'
    (``REFINED_BWD_SAVING``). Setting either REFINE option to the block size keeps the lists as
    they are. On sm90 in bf16 or fp16 at head dims 33 to 128, a forward whose rows list at most
    3072 keys on average (S without a block mask) and that no forward tile, warps or stages option
    sets runs on 64 x 64 tiles, 4 warps and 3 stages (``SHORT_ROWS_FWD``; at head dims 33 to 64
    on ``SHORT_ROWS_FWD_D64``'s 64 x 128 tiles and 2 stages where they divide the blocks); the
    mean is read back once per block mask.
    ``DKDV_NUM_WARPS`` and ``DKDV_NUM_STAGES`` launch the backward's dK/dV kernel with warps and
    stages of its own (its tiles are ``BLOCK_M1`` and ``BLOCK_N1``); the dQ kernel keeps
    ``bwd_num_warps`` and ``bwd_num_stages``.
    """
    _validate(query, key, value, scale, enable_gqa)
    score = as_score_mod(score_mod)
    B, Hq, L, E = query.shape
    Bk, Hkv, S, _ = key.shape
    Ev = value.shape[3]
    device = query.device
    interpret = _runtime.check_device(query)
    auto = False
    if block_mask is None:
        sparse, mask = _dense_sparse(L, S, device), None
        sparse_bwd = sparse
    else:
        mask = as_mask_mod(block_mask.mask_mod, "block_mask.mask_mod")
        sparse = sparse_bwd = _cached_block_lists(block_mask, B, Hq, L, S, device)
        q_sub, sub = _refine_option(kernel_options, sparse.q_block, sparse.kv_block)
        if sub is not None or q_sub is not None:
            sparse = _refined_lists(sparse, mask, B, Hq, L, S, sub, q_sub)
        elif _auto_refine_wanted(kernel_options, interpret) and _fwd_tiles_fit(kernel_options, AUTO_REFINE):
            refined = _auto_refined(sparse, mask, B, Hq, L, S)
            if refined is not None:
                shifted = _auto_shifted(sparse, refined, mask, B, Hq, L, S)
                sparse, auto = (refined if shifted is None else shifted), True
    # A document mask's range test (kernels.mods.DOCUMENT_RANGES) in the dQ kernel, and in the
    # forward (and decode) from DOCUMENT_RANGES_FWD_MIN_DIM.
    ranges = _mods.DOCUMENT_RANGES
    fwd_ranges = ranges and _runtime.next_power_of_2(max(E, Ev)) >= DOCUMENT_RANGES_FWD_MIN_DIM
    program = _cached_program(score, mask, interpret, ranges=fwd_ranges)
    rcp_dkdv = rcp_fwd = None
    rounding = DTYPE_ROUNDING.get(query.dtype, 0.0)
    # The backward's mods are rounded where a score mod computes (a mask alone compiles the same
    # at any rounding); the dK/dV kernel's loop walks queries (compile_mods' loop), with its own
    # reciprocal where TANH_RCP_DKDV names one. Each kernel reads its own program's tables
    # (Plan.buffer_args), which differ where one takes a document mask's range test and one not.
    rounded = bool(rounding and program.has_score)
    bwd_rounding = rounding if rounded else 0.0
    if rounded:
        rcp_dkdv, rcp_fwd = _kernel_rcp("TANH_RCP_DKDV"), _kernel_rcp("TANH_RCP_FWD")
    program_bwd = _cached_program(score, mask, interpret, bwd_rounding, ranges=ranges)
    program_dkdv = _cached_program(score, mask, interpret, bwd_rounding, rcp=rcp_dkdv, loop="m", ranges=ranges)
    if rounded and not (return_lse or return_max):
        # A forward that returns out alone takes the rounding's mods too (with
        # kernels.mods.TANH_RCP_FWD's reciprocal where it names one).
        program = _cached_program(score, mask, interpret, rounding, rcp=rcp_fwd, ranges=fwd_ranges)
    work = work_kind(block_mask is not None, program.has_score, program.score_loads)
    option_args = dict(
        dtype=query.dtype, head_dim=max(E, Ev), q_block=sparse.q_block, kv_block=sparse.kv_block,
        device=device, interpret=interpret, work=work,
        bwd_blocks=(sparse_bwd.q_block, sparse_bwd.kv_block), refined_fwd=auto,
    )
    if (not auto and program.mask_ranges and not program.has_score
            and _ranges_fwd_wanted(kernel_options, _arch(device, interpret), query.dtype, max(E, Ev),
                                   sparse.q_block, sparse.kv_block)):
        option_args["ranges_fwd"] = True
    elif (not auto and _short_fwd_wanted(kernel_options, _arch(device, interpret), query.dtype, max(E, Ev),
                                       sparse.q_block, sparse.kv_block)
            and (S if block_mask is None else sparse.mean_row_keys(L)) <= SHORT_ROWS_FWD_MAX_KEYS):
        option_args["short_fwd"] = True
    options = _cached_options(kernel_options, **option_args)
    sparse_dq = sparse_dkdv = None
    refined_bwd = False
    if (block_mask is not None and _grad_wanted(query, key, value, program)
            and _auto_refine_wanted(kernel_options, interpret)):
        refined_bwd = (_refined_bwd_wanted(kernel_options, _arch(device, interpret), query.dtype, max(E, Ev), work,
                                           sparse_bwd.q_block, sparse_bwd.kv_block)
                       and _refined_bwd_saves(sparse_bwd, mask, B, Hq, L, S, options.bwd.tiles))
        if refined_bwd:
            options = _cached_options(kernel_options, refined_bwd=True, **option_args)
        sparse_dq, sparse_dkdv = _auto_refined_bwd(sparse_bwd, mask, B, Hq, L, S, options.bwd.tiles)
        if (AUTO_SHIFT_DQ and sparse.kv_unit and sparse_dq is not None
                and (options.bwd.tiles["BLOCK_M2"], options.bwd.tiles["BLOCK_N2"]) == (sparse.q_block, sparse.kv_block)):
            # The dQ kernel walks a query tile's keys as the forward does: on its tiles, the
            # forward's shifted windows (the refined lists it would walk, but from any key).
            sparse_dq = sparse
        if sparse.kv_unit and refined_bwd and sparse_dkdv is not None:
            # The dK/dV kernel walks a key tile's queries: windows of queries, where the forward
            # took windows of keys (a mask whose runs do not start at block boundaries).
            sparse_dkdv = _auto_shifted_q(sparse_bwd, sparse_dkdv, mask, B, Hq, L, S) or sparse_dkdv
    for t in program.buffers:
        if t.device != device and t.requires_grad:
            raise ValueError(
                f"Expected the learnable tensor a mod holds to be on {device}, got {t.device}. "
                f"Create the table on the inputs' device."
            )
    plan = Plan(
        B=B, Hq=Hq, Hkv=Hkv, Bk=Bk, L=L, S=S, E=E, Ev=Ev,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(E),
        program=program, program_bwd=program_bwd, program_dkdv=program_dkdv, sparse=sparse, sparse_bwd=sparse_bwd,
        sparse_dq=sparse_dq, sparse_dkdv=sparse_dkdv, refined_bwd=refined_bwd,
        options=options, interpret=interpret,
        fp32_precision="ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32",
        return_max=return_max,
        buffers=_device_buffers(program.buffers, device),
        bwd_buffers=_own_buffers(program_bwd, program, device),
        dkdv_buffers=_own_buffers(program_dkdv, program, device),
    )
    learnable = [program.buffers[k] for k in program.learnable]
    if not interpret:
        key, value = _matching_kv_layouts(key, value)
    out, lse, mx = _FlexFunction.apply(query, key, value, plan, *learnable)
    result = [out]
    if return_lse:
        result.append(lse)
    if return_max:
        result.append(mx)
    return result[0] if len(result) == 1 else tuple(result)
