"""Block masks: an independent ``create_block_mask``, dense views, and a checker.

A ``BlockMask`` (PyTorch's container) lists, for every (batch, head, query
block), the KV blocks a block-sparse kernel visits: *partial* blocks, where
``mask_mod`` is applied, and *full* blocks, where it is skipped. SPEC section 3
defines the two ways to read such a mask ("blocks" and "mask_mod" semantics);
section 6 names the public functions here.

Everything is plain torch so that the oracle stays importable without Triton or
Hypothesis.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import numbers
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "Finding",
    "FindingKind",
    "block_mask_to_dense",
    "block_membership",
    "check_block_mask",
    "create_block_mask",
    "validate_block_mask",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# mask_mod is evaluated on at most this many elements at a time (plus int64
# prefix sums of the same size), so long sequences do not need B*H*L*S memory.
_CHUNK_ELEMENTS = 1 << 22

# How many findings of one kind check_block_mask lists before summarising.
_DEFAULT_MAX_PER_KIND = 16

_SEMANTICS = ("blocks", "mask_mod")


# --------------------------------------------------------------------------
# Findings


class FindingKind(enum.Enum):
    """What is wrong with a block mask (see ``check_block_mask``)."""

    MISSING_BLOCK = "missing block"
    FULL_NOT_FULL = "full block that is not full"
    EMPTY_PARTIAL = "empty partial block"
    OVERLAP = "block in both lists"
    DUPLICATE = "block listed twice"
    INDEX_OUT_OF_RANGE = "index out of range"
    COUNT_ABOVE_CAPACITY = "count outside capacity"
    Q_SIDE_NOT_TRANSPOSE = "q side not the transpose of the kv side"
    SIZE_DOES_NOT_COVER = "mask does not cover the lengths"
    NOT_CONTIGUOUS = "blocks not contiguous"
    ROW_NOT_SAFE = "fully masked query row"
    BROADCAST_MISMATCH = "batch or head count mismatch"
    MALFORMED_FIELD = "malformed field"
    MASK_MOD_ERROR = "mask_mod failed"


# Only wasted work is a warning; everything else changes the result or makes
# the mask unusable.
_WARNINGS = frozenset({FindingKind.EMPTY_PARTIAL})


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem of a block mask, located as precisely as it can be.

    ``b`` and ``h`` index the block mask's own batch/head dimensions for
    structural findings and the attention's batch/head for findings about
    ``mask_mod`` (which the mask broadcasts as ``b % MB``, ``h % MH``).
    ``list`` names the field at fault. ``q_idx``/``kv_idx`` give a witness
    element where one exists. A summary of findings left unlisted has no
    location and ``count`` > 1.
    """

    kind: FindingKind
    severity: str
    message: str
    b: int | None = None
    h: int | None = None
    q_block: int | None = None
    kv_block: int | None = None
    list: str | None = None
    q_idx: int | None = None
    kv_idx: int | None = None
    count: int = 1

    def location(self) -> str:
        parts = [
            f"{field}={value}"
            for field in ("b", "h", "q_block", "kv_block", "q_idx", "kv_idx")
            if (value := getattr(self, field)) is not None
        ]
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.location()
        at = f" at {where}" if where else ""
        return f"{self.severity}: {self.kind.value}{at}: {self.message}"


class _Report:
    """Collects findings, listing at most ``limit`` per kind and counting the rest."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.findings: list[Finding] = []
        self.shown: Counter[FindingKind] = Counter()
        self.hidden: Counter[FindingKind] = Counter()

    def room(self, kind: FindingKind) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.shown[kind])

    def add(self, kind: FindingKind, message: str, **location) -> None:
        room = self.room(kind)
        if room is not None and room == 0:
            self.hidden[kind] += 1
            return
        severity = "warning" if kind in _WARNINGS else "error"
        self.findings.append(Finding(kind, severity, message, **location))
        self.shown[kind] += 1

    def add_each(self, kind: FindingKind, where: Tensor, build) -> None:
        """Adds ``build(*position)`` for each True position of ``where``, up to the cap.

        ``build`` returns ``(message, location)``.
        """
        positions = where.nonzero()
        room = self.room(kind)
        listed = positions if room is None else positions[:room]
        for position in listed.tolist():
            message, location = build(*position)
            self.add(kind, message, **location)
        self.hidden[kind] += positions.shape[0] - listed.shape[0]

    def has_errors(self, kinds=None) -> bool:
        return any(
            finding.severity == "error" and (kinds is None or finding.kind in kinds)
            for finding in self.findings
        )

    def finish(self) -> list[Finding]:
        findings = list(self.findings)
        for kind, count in self.hidden.items():
            if count:
                severity = "warning" if kind in _WARNINGS else "error"
                findings.append(
                    Finding(
                        kind,
                        severity,
                        f"{count} more finding(s) of this kind not listed; "
                        "pass max_per_kind=None to list them all.",
                        count=count,
                    )
                )
        return findings


# --------------------------------------------------------------------------
# Argument validation


def _int_arg(name: str, value, *, allow_none: bool = False, hint: str = "") -> int:
    if value is None and allow_none:
        return 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(
            f"Expected {name} to be {expected}, got {value!r} "
            f"(type {type(value).__name__}).{hint}"
        )
    if value <= 0:
        raise ValueError(f"Expected {name} > 0, got {name}={value}.{hint}")
    return int(value)


def _optional_int_arg(name: str, value) -> int | None:
    return None if value is None else _int_arg(name, value)


def _block_size_arg(BLOCK_SIZE) -> tuple[int, int]:
    hint = " Pass an int or a pair (Q_BLOCK, KV_BLOCK), for example 128 or (128, 64)."
    if isinstance(BLOCK_SIZE, (tuple, list)):
        if len(BLOCK_SIZE) != 2:
            raise ValueError(
                f"Expected BLOCK_SIZE to have 2 entries (Q_BLOCK, KV_BLOCK), "
                f"got {BLOCK_SIZE!r}.{hint}"
            )
        return (
            _int_arg("BLOCK_SIZE[0]", BLOCK_SIZE[0], hint=hint),
            _int_arg("BLOCK_SIZE[1]", BLOCK_SIZE[1], hint=hint),
        )
    size = _int_arg("BLOCK_SIZE", BLOCK_SIZE, hint=hint)
    return size, size


def _mask_mod_arg(mask_mod) -> None:
    if not callable(mask_mod):
        raise TypeError(
            f"Expected mask_mod to be a callable mask_mod(b, h, q_idx, kv_idx), "
            f"got {mask_mod!r} (type {type(mask_mod).__name__})."
        )
    try:
        parameters = inspect.signature(mask_mod).parameters.values()
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature to inspect
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return
    required = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is inspect.Parameter.empty
    ]
    if len(required) != 4:
        hint = (
            " A 5-argument function is a score_mod; pass it as score_mod instead."
            if len(required) == 5
            else ""
        )
        raise TypeError(
            f"Expected mask_mod to take 4 positional arguments (b, h, q_idx, kv_idx), "
            f"got {len(required)}: ({', '.join(required)}).{hint}"
        )


def _require_block_mask(block_mask, name: str) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"Expected {name} to be a torch.nn.attention.flex_attention.BlockMask, "
            f"got {type(block_mask).__name__}. Build one with create_block_mask."
        )


# --------------------------------------------------------------------------
# Evaluating mask_mod


def _call_mask_mod(mask_mod: MaskMod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """mask_mod on broadcasting index tensors, expanded to [B, H, rows, cols] bool."""
    allowed = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
        got = allowed.dtype if isinstance(allowed, Tensor) else type(allowed).__name__
        raise TypeError(
            f"Expected mask_mod to return a torch.bool tensor, got {got}. "
            "Return a comparison such as q_idx >= kv_idx."
        )
    shape = (b.shape[0], h.shape[1], q_idx.shape[2], kv_idx.shape[3])
    try:
        return allowed.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"mask_mod returned a tensor of shape {tuple(allowed.shape)}, which does not "
            f"broadcast to [B, H, q, kv] = {list(shape)}. It is called with index tensors "
            "shaped [B,1,1,1], [1,H,1,1], [1,1,q,1], [1,1,1,kv]; combine them elementwise."
        ) from None


def _index(start: int, stop: int, dim: int, device) -> Tensor:
    shape = [1, 1, 1, 1]
    shape[dim] = stop - start
    return torch.arange(start, stop, device=device).view(shape)


def _mask_chunks(
    mask_mod: MaskMod, B: int, H: int, Q_LEN: int, KV_LEN: int, q_block: int, device
) -> Iterator[tuple[int, Tensor]]:
    """Yields ``(start, allowed)``: mask_mod on query rows ``start:start + rows``,
    ``allowed`` shaped [B, H, rows, KV_LEN]. Chunks begin on query-block boundaries.
    """
    per_block = B * H * min(q_block, Q_LEN) * KV_LEN
    rows = min(Q_LEN, max(1, _CHUNK_ELEMENTS // per_block) * q_block)
    b = _index(0, B, 0, device)
    h = _index(0, H, 1, device)
    kv_idx = _index(0, KV_LEN, 3, device)
    for start in range(0, Q_LEN, rows):
        q_idx = _index(start, min(start + rows, Q_LEN), 2, device)
        yield start, _call_mask_mod(mask_mod, b, h, q_idx, kv_idx)


def _segment_sums(x: Tensor, block: int, dim: int) -> Tensor:
    """Sums of consecutive runs of ``block`` entries along ``dim`` (the last run may be short).

    Prefix sums rather than pad-and-reshape: a block may be far longer than the
    sequence (PyTorch uses 2**30 for "one block").
    """
    n = x.shape[dim]
    segments = -(-n // block)
    prefix = x.cumsum(dim, dtype=torch.int64)
    bounds = torch.arange(1, segments + 1, device=x.device) * block
    ends = prefix.index_select(dim, bounds.clamp(max=n) - 1)
    before = prefix.index_select(dim, bounds[:-1] - 1)
    zero = torch.zeros_like(ends.narrow(dim, 0, 1))
    return ends - torch.cat([zero, before], dim)


def _tile_counts(allowed: Tensor, q_block: int, kv_block: int) -> tuple[Tensor, Tensor]:
    """Allowed elements per (row, KV block) and per tile: [B,H,rows,nKV] and [B,H,nQ,nKV]."""
    per_row = _segment_sums(allowed, kv_block, dim=3)
    return per_row, _segment_sums(per_row, q_block, dim=2)


# --------------------------------------------------------------------------
# Building a BlockMask


def _ordered(member: Tensor) -> tuple[Tensor, Tensor]:
    """Row counts [..., R] and index rows [..., R, C] (int32) listing True columns.

    PyTorch lists the member columns in increasing order, then the others in
    increasing order (a stable descending argsort of the 0/1 rows); this
    reproduces that order exactly, padding included.
    """
    n = member.shape[-1]
    columns = torch.arange(n, device=member.device)
    key = torch.where(member, columns, columns + n)
    return (
        member.sum(-1, dtype=torch.int32),
        key.argsort(dim=-1).to(torch.int32),
    )


def _new_block_mask(
    seq_lengths: tuple[int, int],
    partial: Tensor,
    full: Tensor,
    block_size: tuple[int, int],
    mask_mod: MaskMod,
) -> BlockMask:
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full)
    q_num_blocks, q_indices = _ordered(partial.transpose(-2, -1))
    full_q_num_blocks, full_q_indices = _ordered(full.transpose(-2, -1))
    # Positional on purpose: these eleven parameters exist in this order in
    # torch 2.11 and 2.13; later versions added keyword-only ones.
    return BlockMask(
        seq_lengths,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
        block_size,
        mask_mod,
    )


def create_block_mask(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    device: torch.device | str | None = "cpu",
) -> BlockMask:
    """Builds the ``BlockMask`` of ``mask_mod`` for [B, H, Q_LEN, KV_LEN] attention.

    ``mask_mod(b, h, q_idx, kv_idx)`` is called with int64 index tensors shaped
    [B,1,1,1], [1,H,1,1], [1,1,q,1], [1,1,1,KV_LEN] (a chunk of query rows at a
    time) and must return a broadcasting bool tensor. ``B`` or ``H`` = None
    means 1 (the mask is broadcast). ``BLOCK_SIZE`` is an int or
    ``(Q_BLOCK, KV_BLOCK)``.

    Result: kv_num_blocks [B, H, nQ] int32, kv_indices [B, H, nQ, nKV] int32
    (nQ = ceil(Q_LEN / Q_BLOCK), nKV = ceil(KV_LEN / KV_BLOCK)), the full_kv_*
    pair alike, and the transposed q_* / full_q_* pairs. A tile is full when all
    Q_BLOCK x KV_BLOCK of its elements are allowed, partial when some but not
    all are, and listed nowhere when none is. Equal to PyTorch's
    ``create_block_mask`` on the same inputs, index order included.
    """
    _mask_mod_arg(mask_mod)
    B = _int_arg("B", B, allow_none=True)
    H = _int_arg("H", H, allow_none=True)
    Q_LEN = _int_arg("Q_LEN", Q_LEN)
    KV_LEN = _int_arg("KV_LEN", KV_LEN)
    q_block, kv_block = _block_size_arg(BLOCK_SIZE)
    device = torch.device("cpu" if device is None else device)

    n_q = -(-Q_LEN // q_block)
    n_kv = -(-KV_LEN // kv_block)
    counts = torch.empty(B, H, n_q, n_kv, dtype=torch.int64, device=device)
    for start, allowed in _mask_chunks(mask_mod, B, H, Q_LEN, KV_LEN, q_block, device):
        _, tiles = _tile_counts(allowed, q_block, kv_block)
        first = start // q_block
        counts[:, :, first : first + tiles.shape[2]] = tiles

    # PyTorch pads the sequences with disallowed elements up to whole blocks, so
    # a tile straddling Q_LEN or KV_LEN is never full, even when every in-range
    # element is allowed. Matching that keeps the two constructions identical;
    # both readings give the same attention (out-of-range elements never count).
    full = counts == min(q_block * kv_block, torch.iinfo(torch.int64).max)
    partial = (counts > 0) & ~full
    return _new_block_mask((Q_LEN, KV_LEN), partial, full, (q_block, kv_block), mask_mod)


# --------------------------------------------------------------------------
# Structure of a block mask

# (count field, index field) of each list; q-side rows are KV blocks.
_LISTS = (
    ("kv_num_blocks", "kv_indices"),
    ("full_kv_num_blocks", "full_kv_indices"),
    ("q_num_blocks", "q_indices"),
    ("full_q_num_blocks", "full_q_indices"),
)


def _fmt(index) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _row_location(q_side: bool, b: int, h: int, row: int, column: int | None = None) -> dict:
    """Location of an index-list entry: kv-side rows are query blocks, q-side rows KV blocks."""
    if q_side:
        return {"b": b, "h": h, "kv_block": row, "q_block": column}
    return {"b": b, "h": h, "q_block": row, "kv_block": column}


def _check_fields(block_mask: BlockMask, name: str, report: _Report, *, q_side: bool) -> bool:
    """Types, dims, dtypes and shapes of the fields. True when the rest can be checked."""

    def malformed(field: str, message: str) -> None:
        report.add(FindingKind.MALFORMED_FIELD, message, list=field)

    block_size = getattr(block_mask, "BLOCK_SIZE", None)
    if not (
        isinstance(block_size, (tuple, list))
        and len(block_size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in block_size)
    ):
        malformed(
            "BLOCK_SIZE",
            f"{name}.BLOCK_SIZE must be a pair of positive ints (Q_BLOCK, KV_BLOCK), "
            f"got {block_size!r}; build the mask with create_block_mask or "
            "BlockMask.from_kv_blocks, which normalise it.",
        )

    def tensor_field(field: str, dims: int, layout: str) -> Tensor | None:
        value = getattr(block_mask, field, None)
        if not isinstance(value, Tensor):
            malformed(field, f"{name}.{field} must be a {dims}-D torch.int32 tensor {layout}, got {type(value).__name__}.")
            return None
        if value.dim() != dims or value.dtype != torch.int32 or 0 in value.shape:
            malformed(
                field,
                f"{name}.{field} must be a non-empty {dims}-D torch.int32 tensor {layout}, got a "
                f"{value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}; convert it with "
                ".to(torch.int32) and give it batch and head dimensions (use size 1 to broadcast).",
            )
            return None
        return value

    kv_num = tensor_field("kv_num_blocks", 3, "[MB, MH, nQ]")
    kv_idx = tensor_field("kv_indices", 4, "[MB, MH, nQ, nKV]")
    if kv_num is None or kv_idx is None:
        return False
    mb, mh, n_q, n_kv = kv_idx.shape
    fields = {"kv_num_blocks": kv_num, "kv_indices": kv_idx}

    def pair(num_field: str, idx_field: str, num_shape: tuple, idx_shape: tuple, layout: str) -> None:
        num = getattr(block_mask, num_field, None)
        idx = getattr(block_mask, idx_field, None)
        if num is None and idx is None:
            return
        if (num is None) != (idx is None):
            present, absent = (num_field, idx_field) if idx is None else (idx_field, num_field)
            malformed(absent, f"{name}.{present} is set but {name}.{absent} is None; give both or neither.")
            return
        dims = layout.split(", ")
        num = tensor_field(num_field, 3, "[" + ", ".join(dims[:3]) + "]")
        idx = tensor_field(idx_field, 4, "[" + layout + "]")
        for field, value, shape in ((num_field, num, num_shape), (idx_field, idx, idx_shape)):
            if value is None:
                continue
            if tuple(value.shape) != shape:
                malformed(
                    field,
                    f"{name}.{field} has shape {tuple(value.shape)}, expected {shape} to match "
                    f"{name}.kv_indices of shape {tuple(kv_idx.shape)} [{layout}]; rebuild the "
                    "mask with create_block_mask or BlockMask.from_kv_blocks.",
                )
            else:
                fields[field] = value

    if tuple(kv_num.shape) != (mb, mh, n_q):
        malformed(
            "kv_num_blocks",
            f"{name}.kv_num_blocks has shape {tuple(kv_num.shape)}, expected {(mb, mh, n_q)} "
            f"to match {name}.kv_indices of shape {tuple(kv_idx.shape)}.",
        )
    pair("full_kv_num_blocks", "full_kv_indices", (mb, mh, n_q), (mb, mh, n_q, n_kv), "MB, MH, nQ, nKV")
    if q_side:
        pair("q_num_blocks", "q_indices", (mb, mh, n_kv), (mb, mh, n_kv, n_q), "MB, MH, nKV, nQ")
        pair("full_q_num_blocks", "full_q_indices", (mb, mh, n_kv), (mb, mh, n_kv, n_q), "MB, MH, nKV, nQ")
        if block_mask.q_num_blocks is None and block_mask.full_q_num_blocks is not None:
            malformed(
                "q_num_blocks",
                f"{name}.full_q_num_blocks is set but {name}.q_num_blocks is None; the q side needs "
                "both pairs (BlockMask.from_kv_blocks computes them).",
            )

    devices = {value.device for value in fields.values()}
    if len(devices) > 1:
        malformed(
            "kv_indices",
            f"{name}'s tensors live on different devices ({', '.join(sorted(map(str, devices)))}); "
            "move the mask with block_mask.to(device).",
        )
    return not report.has_errors({FindingKind.MALFORMED_FIELD})


def _list_occurrences(num: Tensor, idx: Tensor, n_cols: int) -> Tensor:
    """How often each column is named in the valid prefix of each row: [..., R, n_cols] int32.

    Tolerant of broken lists: counts are clamped to [0, capacity] and indices
    outside [0, n_cols) are ignored, so the checker can go on past them.
    """
    capacity = idx.shape[-1]
    count = num.clamp(0, capacity)
    slots = torch.arange(capacity, device=idx.device)
    valid = slots < count.unsqueeze(-1)
    named = valid & (idx >= 0) & (idx < n_cols)
    target = torch.where(named, idx.long(), n_cols)
    occurrences = torch.zeros(*idx.shape[:-1], n_cols + 1, dtype=torch.int32, device=idx.device)
    occurrences.scatter_add_(-1, target, torch.ones_like(target, dtype=torch.int32))
    return occurrences[..., :n_cols]


def _check_list(
    block_mask: BlockMask, name: str, report: _Report, num_field: str, idx_field: str, n_cols: int
) -> Tensor:
    """Counts, indices and duplicates of one list; returns its tolerant membership [MB,MH,R,n_cols]."""
    num = getattr(block_mask, num_field)
    idx = getattr(block_mask, idx_field)
    q_side = num_field.startswith(("q_", "full_q_"))
    capacity = idx.shape[-1]
    row_kind = "KV block" if q_side else "query block"
    col_kind = "query block" if q_side else "KV block"

    def count_finding(b, h, row):
        value = int(num[b, h, row])
        return (
            f"{name}.{num_field}{_fmt((b, h, row))} = {value} is outside [0, {capacity}] "
            f"({capacity} = {idx_field}.shape[-1]); set it to the number of valid entries of "
            f"{name}.{idx_field}{_fmt((b, h, row))}, or rebuild the mask with create_block_mask.",
            {**_row_location(q_side, b, h, row), "list": num_field},
        )

    report.add_each(FindingKind.COUNT_ABOVE_CAPACITY, (num < 0) | (num > capacity), count_finding)

    count = num.clamp(0, capacity)
    valid = torch.arange(capacity, device=idx.device) < count.unsqueeze(-1)
    out_of_range = valid & ((idx < 0) | (idx >= n_cols))

    def index_finding(b, h, row, slot):
        value = int(idx[b, h, row, slot])
        return (
            f"{name}.{idx_field}{_fmt((b, h, row, slot))} = {value} names a {col_kind} outside "
            f"[0, {n_cols}) within the first {name}.{num_field}{_fmt((b, h, row))} = {int(num[b, h, row])} "
            f"entries of {row_kind} {row}'s list; fix the index or lower the count.",
            {**_row_location(q_side, b, h, row, value), "list": idx_field},
        )

    report.add_each(FindingKind.INDEX_OUT_OF_RANGE, out_of_range, index_finding)

    occurrences = _list_occurrences(num, idx, n_cols)

    def duplicate_finding(b, h, row, column):
        times = int(occurrences[b, h, row, column])
        return (
            f"{name}.{idx_field}{_fmt((b, h, row))} names {col_kind} {column} {times} times within "
            f"its first {int(num[b, h, row])} entries; a kernel would visit the tile {times} times "
            "and count its elements as often. List each block once.",
            {**_row_location(q_side, b, h, row, column), "list": idx_field},
        )

    report.add_each(FindingKind.DUPLICATE, occurrences > 1, duplicate_finding)
    return occurrences > 0


def _check_structure(
    block_mask: BlockMask,
    name: str,
    report: _Report,
    *,
    B: int | None,
    H: int | None,
    Q_LEN: int | None,
    KV_LEN: int | None,
    q_side: bool = True,
) -> tuple[Tensor, Tensor] | None:
    """Reports structural problems; returns the (partial, full) membership
    [MB, MH, nQ, nKV] when the mask is usable for the semantic checks, else None.
    """
    if not _check_fields(block_mask, name, report, q_side=q_side):
        return None
    kv_idx = block_mask.kv_indices
    mb, mh, n_q, n_kv = kv_idx.shape
    usable = True

    for size, field, expected in ((mb, "batch", B), (mh, "head", H)):
        if expected is not None and size not in (1, expected):
            letter = "B" if field == "batch" else "H"
            report.add(
                FindingKind.BROADCAST_MISMATCH,
                f"{name}.kv_indices has {size} {field} entries (shape {tuple(kv_idx.shape)}), "
                f"expected 1 (broadcast) or {letter}={expected}; rebuild it with "
                f"create_block_mask(mask_mod, B, H, ...) using {letter}={expected} or {letter}=None.",
                list="kv_indices",
            )
            usable = False

    q_block, kv_block = block_mask.BLOCK_SIZE
    for blocks, size, length, label, what in (
        (n_q, q_block, Q_LEN, "Q_LEN", "query"),
        (n_kv, kv_block, KV_LEN, "KV_LEN", "KV"),
    ):
        if length is not None and blocks * size < length:
            report.add(
                FindingKind.SIZE_DOES_NOT_COVER,
                f"{name} has {blocks} {what} block(s) of {size} = {blocks * size} {what} positions "
                f"but {label}={length}: the mask does not cover the lengths. Rebuild it with "
                f"create_block_mask for these lengths (Q_LEN={Q_LEN}, KV_LEN={KV_LEN}).",
                list="kv_indices",
            )
            usable = False

    partial = _check_list(block_mask, name, report, "kv_num_blocks", "kv_indices", n_kv)
    if block_mask.full_kv_indices is not None:
        full = _check_list(block_mask, name, report, "full_kv_num_blocks", "full_kv_indices", n_kv)
    else:
        full = torch.zeros_like(partial)

    def overlap_finding(b, h, row, column):
        return (
            f"KV block {column} of query block {row} is listed both in {name}.kv_indices{_fmt((b, h, row))} "
            f"(partial) and in {name}.full_kv_indices{_fmt((b, h, row))} (full); a kernel would visit it "
            "twice. Keep it in one list: full if mask_mod allows all its elements, partial otherwise.",
            {"b": b, "h": h, "q_block": row, "kv_block": column, "list": "kv_indices/full_kv_indices"},
        )

    report.add_each(FindingKind.OVERLAP, partial & full, overlap_finding)

    if q_side and block_mask.q_num_blocks is not None:
        _check_transpose(block_mask, name, report, partial, "q_num_blocks", "q_indices", "kv_indices")
        if block_mask.full_q_num_blocks is not None or full.any():
            _check_transpose(block_mask, name, report, full, "full_q_num_blocks", "full_q_indices", "full_kv_indices")
    return (partial, full) if usable else None


def _check_transpose(
    block_mask: BlockMask,
    name: str,
    report: _Report,
    kv_member: Tensor,
    num_field: str,
    idx_field: str,
    kv_field: str,
) -> None:
    n_q = kv_member.shape[2]
    if getattr(block_mask, num_field) is None:
        q_member = torch.zeros_like(kv_member).transpose(-2, -1)
    else:
        q_member = _check_list(block_mask, name, report, num_field, idx_field, n_q)
    differs = q_member.transpose(-2, -1) != kv_member

    def transpose_finding(b, h, q_block, kv_block):
        listed, missing = (kv_field, idx_field) if kv_member[b, h, q_block, kv_block] else (idx_field, kv_field)
        return (
            f"the tile is listed in {name}.{listed} but not in {name}.{missing}, so the dK/dV pass "
            f"would see a different mask than the forward pass. Recompute the q side from the kv side "
            "with BlockMask.from_kv_blocks, or rebuild the mask with create_block_mask.",
            {"b": b, "h": h, "q_block": q_block, "kv_block": kv_block, "list": idx_field},
        )

    report.add_each(FindingKind.Q_SIDE_NOT_TRANSPOSE, differs, transpose_finding)


def _check_contiguous(block_mask: BlockMask, name: str, report: _Report) -> None:
    """BLOCKS_ARE_CONTIGUOUS lets a kernel step to block k+1 instead of reading the next index."""
    for num_field, idx_field in _LISTS:
        num = getattr(block_mask, num_field)
        idx = getattr(block_mask, idx_field)
        if num is None or idx is None or idx.shape[-1] < 2:
            continue
        q_side = num_field.startswith(("q_", "full_q_"))
        count = num.clamp(0, idx.shape[-1])
        valid_step = torch.arange(1, idx.shape[-1], device=idx.device) < count.unsqueeze(-1)
        broken = valid_step & (idx[..., 1:] - idx[..., :-1] != 1)
        first_break = broken.int().argmax(-1)

        def finding(b, h, row):
            slot = int(first_break[b, h, row]) + 1
            before, after = int(idx[b, h, row, slot - 1]), int(idx[b, h, row, slot])
            shown = idx[b, h, row, : int(count[b, h, row])].tolist()
            return (
                f"BLOCKS_ARE_CONTIGUOUS was promised, but {name}.{idx_field}{_fmt((b, h, row))} lists "
                f"{shown}: block {after} follows block {before}, and a kernel relying on the promise "
                f"visits block {before + 1} instead. Drop the promise or reorder the blocks.",
                {**_row_location(q_side, b, h, row, after), "list": idx_field},
            )

        report.add_each(FindingKind.NOT_CONTIGUOUS, broken.any(-1), finding)


# --------------------------------------------------------------------------
# Semantics


def _broadcast_members(member: Tensor, B: int, H: int) -> Tensor:
    """[MB, MH, ...] -> [B, H, ...] reading batch b % MB and head h % MH (SPEC section 3)."""
    mb, mh = member.shape[:2]
    b = torch.arange(B, device=member.device) % mb
    h = torch.arange(H, device=member.device) % mh
    return member[b][:, h]


def _witness(
    mask_mod: MaskMod, b: int, h: int, q_block: int, kv_block: int, block_size, Q_LEN: int, KV_LEN: int, want: bool, device
) -> tuple[int | None, int | None]:
    """First in-range element of a tile where mask_mod equals ``want``."""
    q0, k0 = q_block * block_size[0], kv_block * block_size[1]
    q1, k1 = min(q0 + block_size[0], Q_LEN), min(k0 + block_size[1], KV_LEN)
    allowed = _call_mask_mod(
        mask_mod, _index(b, b + 1, 0, device), _index(h, h + 1, 1, device),
        _index(q0, q1, 2, device), _index(k0, k1, 3, device),
    )[0, 0]
    hits = (allowed == want).nonzero()
    if hits.shape[0] == 0:
        return None, None
    i, j = hits[0].tolist()
    return q0 + i, k0 + j


def _check_semantics(
    block_mask: BlockMask,
    members: tuple[Tensor, Tensor],
    report: _Report,
    *,
    B: int,
    H: int,
    Q_LEN: int,
    KV_LEN: int,
    rows_guaranteed_safe: bool,
) -> None:
    mask_mod = block_mask.mask_mod
    if not callable(mask_mod):
        report.add(FindingKind.MALFORMED_FIELD, f"block_mask.mask_mod must be callable, got {mask_mod!r}.", list="mask_mod")
        return
    q_block, kv_block = block_mask.BLOCK_SIZE
    partial = _broadcast_members(members[0], B, H)
    full = _broadcast_members(members[1], B, H)
    device = partial.device
    n_q, n_kv = partial.shape[2:]

    counts = torch.zeros(B, H, n_q, n_kv, dtype=torch.int64, device=device)
    unsafe_count = torch.zeros(B, H, n_q, dtype=torch.int64, device=device)
    first_unsafe = torch.full((B, H, n_q), Q_LEN, dtype=torch.int64, device=device)
    try:
        for start, allowed in _mask_chunks(mask_mod, B, H, Q_LEN, KV_LEN, q_block, device):
            per_row, tiles = _tile_counts(allowed, q_block, kv_block)
            first, n_kv_here = start // q_block, per_row.shape[3]
            counts[:, :, first : first + tiles.shape[2], :n_kv_here] = tiles
            if rows_guaranteed_safe:
                rows = torch.arange(start, start + allowed.shape[2], device=device)
                row_blocks = rows // q_block
                # Under "blocks" semantics a row attends to every in-range column of
                # its full tiles and to the allowed ones of its partial tiles.
                safe = (
                    full[:, :, row_blocks, :n_kv_here] | (partial[:, :, row_blocks, :n_kv_here] & (per_row > 0))
                ).any(-1)
                unsafe = ~safe
                index = row_blocks.expand_as(unsafe)
                unsafe_count.scatter_add_(2, index, unsafe.long())
                first_unsafe.scatter_reduce_(2, index, torch.where(unsafe, rows, Q_LEN), "amin")
    except Exception as error:  # the checker reports a failing mask_mod instead of raising
        report.add(
            FindingKind.MASK_MOD_ERROR,
            f"block_mask.mask_mod raised {type(error).__name__}: {error} The semantic checks were "
            "skipped. (A BlockMask sliced with [] has no usable mask_mod; set it from the original.)",
            list="mask_mod",
        )
        return

    rows_in = (Q_LEN - torch.arange(n_q, device=device) * q_block).clamp(0, q_block)
    cols_in = (KV_LEN - torch.arange(n_kv, device=device) * kv_block).clamp(0, kv_block)
    in_range = rows_in[:, None] * cols_in[None, :]

    def tile_finding(want: bool, explain):
        def build(b, h, qb, kb):
            q_idx, kv_idx = _witness(mask_mod, b, h, qb, kb, (q_block, kv_block), Q_LEN, KV_LEN, want, device)
            example = f" (e.g. q_idx={q_idx}, kv_idx={kv_idx})" if q_idx is not None else ""
            message, list_name = explain(b, h, qb, kb, example)
            return message, {"b": b, "h": h, "q_block": qb, "kv_block": kb, "list": list_name, "q_idx": q_idx, "kv_idx": kv_idx}

        return build

    report.add_each(
        FindingKind.MISSING_BLOCK,
        (counts > 0) & ~partial & ~full,
        tile_finding(
            True,
            lambda b, h, qb, kb, example: (
                f"mask_mod allows {int(counts[b, h, qb, kb])} element(s) of this tile{example}, but neither "
                "kv_indices nor full_kv_indices lists it, so a block-sparse kernel skips them and its result "
                "differs from mask_mod's. Add the block to kv_indices, or rebuild with create_block_mask.",
                None,
            ),
        ),
    )
    report.add_each(
        FindingKind.FULL_NOT_FULL,
        full & (counts < in_range),
        tile_finding(
            False,
            lambda b, h, qb, kb, example: (
                f"the tile is listed in full_kv_indices, but mask_mod disallows "
                f"{int(in_range[qb, kb] - counts[b, h, qb, kb])} of its {int(in_range[qb, kb])} in-range "
                f"elements{example}; kernels skip mask_mod on full blocks and would attend to them. "
                "Move the block to kv_indices (partial).",
                "full_kv_indices",
            ),
        ),
    )
    report.add_each(
        FindingKind.EMPTY_PARTIAL,
        partial & (counts == 0),
        lambda b, h, qb, kb: (
            "the tile is listed in kv_indices (partial), but mask_mod allows none of its in-range "
            "elements: a kernel loads and masks it for nothing. Drop it from the list.",
            {"b": b, "h": h, "q_block": qb, "kv_block": kb, "list": "kv_indices"},
        ),
    )
    if rows_guaranteed_safe:
        report.add_each(
            FindingKind.ROW_NOT_SAFE,
            unsafe_count > 0,
            lambda b, h, qb: (
                f"ROWS_GUARANTEED_SAFE was promised, but {int(unsafe_count[b, h, qb])} query row(s) of this "
                f"block, first q_idx={int(first_unsafe[b, h, qb])}, attend to nothing under the block mask; "
                "a kernel relying on the promise skips the fully-masked-row guard and may return NaN where "
                "out = 0 and lse = -inf are due. Drop the promise or fix the mask.",
                {"b": b, "h": h, "q_block": qb, "q_idx": int(first_unsafe[b, h, qb])},
            ),
        )


# --------------------------------------------------------------------------
# Public: validation, membership, dense views, checker


def validate_block_mask(
    block_mask: BlockMask, *, B: int, H: int, Q_LEN: int, KV_LEN: int, name: str = "block_mask"
) -> None:
    """Raises ValueError if ``block_mask`` cannot describe [B, H, Q_LEN, KV_LEN] attention.

    Checks the structure only (SPEC section 3): field dims and dtypes, MB in
    {1, B}, MH in {1, H}, coverage of the lengths, counts within capacity,
    indices in range, no block listed twice or in both lists of a row, and a
    q side that is the transpose of the kv side (when present). Whether the
    lists agree with ``mask_mod`` is ``check_block_mask``'s business. Raises
    TypeError if ``block_mask`` is not a BlockMask.
    """
    _require_block_mask(block_mask, name)
    B, H = _int_arg("B", B), _int_arg("H", H)
    Q_LEN, KV_LEN = _int_arg("Q_LEN", Q_LEN), _int_arg("KV_LEN", KV_LEN)
    report = _Report(limit=1)
    _check_structure(block_mask, name, report, B=B, H=H, Q_LEN=Q_LEN, KV_LEN=KV_LEN)
    _raise_first_error(report)


def _raise_first_error(report: _Report) -> None:
    errors = [f for f in report.findings if f.severity == "error"]
    if not errors:
        return
    more = len(errors) - 1 + sum(report.hidden.values())
    suffix = f" ({more} more problem(s); check_block_mask lists them.)" if more else ""
    raise ValueError(str(errors[0]) + suffix)


def block_membership(block_mask: BlockMask) -> tuple[Tensor, Tensor]:
    """Which tiles the lists name: ``(partial, full)``, bool [MB, MH, nQ, nKV] each.

    Only the valid prefix of each row counts. ``full`` is all False when the
    mask has no full lists. Raises ValueError when the kv-side lists are
    malformed (wrong dims or dtype, counts outside capacity, indices out of
    range, duplicates), since membership is then not well defined.
    """
    _require_block_mask(block_mask, "block_mask")
    report = _Report(limit=1)
    if not _check_fields(block_mask, "block_mask", report, q_side=False):
        _raise_first_error(report)
    n_kv = block_mask.kv_indices.shape[-1]
    partial = _check_list(block_mask, "block_mask", report, "kv_num_blocks", "kv_indices", n_kv)
    if block_mask.full_kv_indices is None:
        full = torch.zeros_like(partial)
    else:
        full = _check_list(block_mask, "block_mask", report, "full_kv_num_blocks", "full_kv_indices", n_kv)
    _raise_first_error(report)
    return partial, full


def block_mask_to_dense(
    block_mask: BlockMask, B: int, H: int, Q_LEN: int, KV_LEN: int, *, semantics: str = "blocks"
) -> Tensor:
    """The allowed relation of SPEC section 3 as a bool tensor [B, H, Q_LEN, KV_LEN].

    ``semantics="blocks"``: allowed where the tile is full, or partial and
    ``mask_mod`` allows the element (what a block-sparse kernel computes).
    ``semantics="mask_mod"``: ``mask_mod`` alone (what the user meant).
    The mask's batch/head dimensions broadcast as ``b % MB``, ``h % MH``.
    Raises ValueError for a structurally invalid mask (see validate_block_mask).
    """
    if semantics not in _SEMANTICS:
        raise ValueError(f"Expected semantics to be one of {_SEMANTICS}, got {semantics!r}.")
    validate_block_mask(block_mask, B=B, H=H, Q_LEN=Q_LEN, KV_LEN=KV_LEN)
    _mask_mod_arg(block_mask.mask_mod)
    device = block_mask.kv_indices.device
    q_block, kv_block = block_mask.BLOCK_SIZE
    out = torch.empty(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
    if semantics == "blocks":
        partial, full = (_broadcast_members(m, B, H) for m in block_membership(block_mask))
        kv_blocks = torch.arange(KV_LEN, device=device) // kv_block
    for start, allowed in _mask_chunks(block_mask.mask_mod, B, H, Q_LEN, KV_LEN, q_block, device):
        rows = slice(start, start + allowed.shape[2])
        if semantics == "blocks":
            q_blocks = torch.arange(rows.start, rows.stop, device=device) // q_block
            tile = (slice(None), slice(None), q_blocks[:, None], kv_blocks[None, :])
            allowed = full[tile] | (partial[tile] & allowed)
        out[:, :, rows] = allowed
    return out


def check_block_mask(
    block_mask: BlockMask,
    B: int | None = None,
    H: int | None = None,
    Q_LEN: int | None = None,
    KV_LEN: int | None = None,
    *,
    rows_guaranteed_safe: bool = False,
    blocks_are_contiguous: bool = False,
    max_per_kind: int | None = _DEFAULT_MAX_PER_KIND,
) -> list[Finding]:
    """Every way in which ``block_mask`` is malformed or disagrees with its ``mask_mod``.

    Never raises on a malformed mask (only on arguments of the wrong type).
    ``B``/``H`` default to the mask's own MB/MH, the lengths to its
    ``seq_lengths``. ``rows_guaranteed_safe`` / ``blocks_are_contiguous``
    check the kernel promises of the same names. At most ``max_per_kind``
    findings of each kind are listed, then one summary with ``count``; None
    lists all. A mask built by ``create_block_mask`` (ours or PyTorch's) for
    its own ``mask_mod`` yields no findings unless a promise is checked that
    the mask does not keep.
    """
    _require_block_mask(block_mask, "block_mask")
    B, H = _optional_int_arg("B", B), _optional_int_arg("H", H)
    Q_LEN, KV_LEN = _optional_int_arg("Q_LEN", Q_LEN), _optional_int_arg("KV_LEN", KV_LEN)
    if max_per_kind is not None:
        max_per_kind = _int_arg("max_per_kind", max_per_kind)
    report = _Report(limit=max_per_kind)

    if Q_LEN is None or KV_LEN is None:
        lengths = getattr(block_mask, "seq_lengths", None)
        if (
            isinstance(lengths, (tuple, list))
            and len(lengths) == 2
            and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in lengths)
        ):
            Q_LEN = int(lengths[0]) if Q_LEN is None else Q_LEN
            KV_LEN = int(lengths[1]) if KV_LEN is None else KV_LEN
        else:
            report.add(
                FindingKind.MALFORMED_FIELD,
                f"block_mask.seq_lengths must be a pair of positive ints (Q_LEN, KV_LEN), got {lengths!r}; "
                "pass Q_LEN and KV_LEN explicitly or rebuild the mask.",
                list="seq_lengths",
            )

    members = _check_structure(block_mask, "block_mask", report, B=B, H=H, Q_LEN=Q_LEN, KV_LEN=KV_LEN)
    if members is not None and blocks_are_contiguous:
        _check_contiguous(block_mask, "block_mask", report)
    if members is not None and Q_LEN is not None and KV_LEN is not None:
        mb, mh = members[0].shape[:2]
        _check_semantics(
            block_mask,
            members,
            report,
            B=mb if B is None else B,
            H=mh if H is None else H,
            Q_LEN=Q_LEN,
            KV_LEN=KV_LEN,
            rows_guaranteed_safe=rows_guaranteed_safe,
        )
    return report.finish()
