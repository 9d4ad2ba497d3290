"""``FlexCase``: one attention test case, complete, as a JSON-serialisable value.

A case names shapes, dtype, memory layout, mods (as ``kernels.mods`` specs),
block mask, scale, kernel options and which gradients to take, plus the seed
the inputs are drawn from. ``materialize(device)`` turns it into tensors that
are bit-identical on every device and machine: everything is drawn on the CPU
with ``torch.Generator`` and then moved, and the mods' tables are redrawn from
their own seeds by ``kernels.mods.from_spec``. So a case saved by the fuzzer
on one machine replays exactly on another (``flex-oracle replay CASE.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["FlexCase", "Materialized", "LAYOUTS", "DTYPE_NAMES", "FORMAT"]

# Bumped when the meaning of a saved case changes; from_json refuses other versions.
FORMAT = 1

DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
BLOCK_ORDERS = ("sorted", "reversed")

LAYOUTS = {
    "contiguous": "q, k, v contiguous [B, H, L, E]",
    "bhle-transposed": "q, k, v stored [B, L, H, E] and viewed as [B, H, L, E]",
    "kv-transposed": "k and v stored [B, H, E, L] and viewed as [B, H, L, E]",
    "strided": "q, k, v are every other element of a last dimension twice as wide",
    "offset": "q, k, v start 3 elements into their storage",
    # K and V in different layouts: Triton 3.6 miscompiled such a forward on the H200 (K
    # stored [B, H, E, S] beside a contiguous V; docs/FAULTS.md, the tenth session), which
    # the fuzzer had met only through properties that replace V.
    "k-transposed": "k stored [B, H, E, L] and viewed as [B, H, L, E]; q and v contiguous",
    "v-transposed": "v stored [B, H, E, L] and viewed as [B, H, L, E]; q and k contiguous",
    # q alone stored [B, L, H, E] (a query projected in sequence order beside a key/value cache
    # kept [B, H, S, E]): the output and dq follow q's layout, k and v do not
    # (fwd_out_stride_contiguous needs such a q; one layout in seven drew it, 8 of the CPU
    # hunts' first 100 cases).
    "q-bhle-transposed": "q stored [B, L, H, E] and viewed as [B, H, L, E]; k and v contiguous",
}

# What a kernel must never read: the storage around strided and offset views.
_FILL = float("nan")
_OFFSET = 3

_BIAS_DIMS = {"hqk": "HLS", "bhq": "BHL", "qk": "LS", "h": "H", "bh": "BH"}


@dataclass(frozen=True)
class Materialized:
    """A case turned into tensors and objects on one device.

    ``query`` ``[B, Hq, L, E]``, ``key`` ``[Bk, Hkv, S, E]``, ``value``
    ``[Bk, Hkv, S, Ev]`` in the case's dtype and layout (leaves that require
    grad when the case takes gradients); ``grad_out`` ``[B, Hq, L, Ev]``,
    ``grad_lse`` ``[B, Hq, L]`` float32 or None. ``score_mod`` / ``mask_mod``
    are ``kernels.mods`` objects (or None); ``block_mask`` is PyTorch's
    ``BlockMask`` (or None).
    """

    case: "FlexCase"
    device: torch.device
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    grad_out: Optional[torch.Tensor]
    grad_lse: Optional[torch.Tensor]
    score_mod: Any
    mask_mod: Any
    block_mask: Any
    scale: Optional[float]
    enable_gqa: bool
    kernel_options: dict

    def learnables(self) -> list:
        """Tensors the score mod reads that require grad, in ``tensors()`` order."""
        if self.score_mod is None:
            return []
        return [t for t in self.score_mod.tensors() if t.requires_grad]

    def call_kwargs(self) -> dict:
        """Keyword arguments of ``properties.check.compare_with_oracle`` for this case."""
        return dict(
            score_mod=self.score_mod, block_mask=self.block_mask, scale=self.scale,
            enable_gqa=self.enable_gqa, kernel_options=dict(self.kernel_options) or None,
            grad_out=self.grad_out, grad_lse=self.grad_lse,
        )


@dataclass(frozen=True)
class FlexCase:
    """One FlexAttention test case, independent of any device.

    Shapes follow SPEC section 1: query ``[B, Hq, L, E]``, key ``[Bk, Hkv, S, E]``,
    value ``[Bk, Hkv, S, Ev]``, ``Bk`` in ``{B, 1}``, ``Hq % Hkv == 0`` (GQA when
    they differ). ``mask`` and ``score`` are ``kernels.mods`` specs (``mod.spec()``).
    ``block_size`` ``(Q_BLOCK, KV_BLOCK)`` asks for a block mask of ``mask``
    (``full`` when ``mask`` is None), built for ``mask_B`` x ``mask_H``
    (1 broadcasts); None means no block mask. ``backward`` takes dq, dk, dv
    (and learnable tables' gradients) of ``sum(out * dO)``, plus
    ``sum(lse * dLSE)`` over finite LSE entries when ``grad_lse``.
    ``input_std`` scales q, k, v; ``value_mean`` is added to v (before rounding), so that
    the output is not centred on zero. Invalid combinations raise at construction.
    """

    B: int
    Hq: int
    Hkv: int
    Bk: int
    L: int
    S: int
    E: int
    Ev: int
    dtype: str = "float16"
    seed: int = 0
    input_std: float = 1.0
    layout: str = "contiguous"
    mask: Optional[dict] = None
    block_size: Optional[tuple] = None
    mask_B: int = 1
    mask_H: int = 1
    score: Optional[dict] = None
    scale: Optional[float] = None
    kernel_options: dict = field(default_factory=dict)
    backward: bool = True
    grad_lse: bool = True
    # How each row's block list is ordered: "sorted" (create_block_mask's ascending order) or
    # "reversed" (descending; a list is a set, SPEC section 3, so the result is the same).
    block_order: str = "sorted"
    # Added to every element of v: with v centred on zero, an accumulation that loses small
    # terms loses them in both directions and the error averages out; a mean makes it one-sided
    # (the float32 FMA-chain loss, tests/cases/fp32-small-terms-lost.json, was found only by
    # ones_value_gives_one's V of ones).
    value_mean: float = 0.0

    # ------------------------------------------------------------------
    # validation

    def __post_init__(self) -> None:
        for name in ("B", "Hq", "Hkv", "Bk", "L", "S", "E", "Ev", "mask_B", "mask_H"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Expected seed to be a non-negative int, got {self.seed!r}.")
        if self.Hq % self.Hkv:
            raise ValueError(
                f"Expected Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv)), "
                f"got Hq={self.Hq}, Hkv={self.Hkv}."
            )
        if self.Bk not in (1, self.B):
            raise ValueError(f"Expected Bk to be B={self.B} or 1, got Bk={self.Bk}.")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"Expected dtype in {DTYPE_NAMES}, got {self.dtype!r}.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"Expected layout in {tuple(LAYOUTS)}, got {self.layout!r}.")
        if not isinstance(self.input_std, (int, float)) or isinstance(self.input_std, bool) \
                or not (math.isfinite(self.input_std) and self.input_std > 0):
            raise ValueError(f"Expected input_std to be a positive finite number, got {self.input_std!r}.")
        if not isinstance(self.value_mean, (int, float)) or isinstance(self.value_mean, bool) \
                or not math.isfinite(self.value_mean):
            raise ValueError(f"Expected value_mean to be a finite number, got {self.value_mean!r}.")
        if self.scale is not None and (
            isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale)
        ):
            raise ValueError(f"Expected scale to be a finite number or None, got {self.scale!r}.")
        if self.block_size is not None:
            bs = self.block_size
            if not isinstance(bs, (tuple, list)) or len(bs) != 2:
                raise ValueError(f"Expected block_size to be (Q_BLOCK, KV_BLOCK) or None, got {bs!r}.")
            _positive_int("block_size[0]", bs[0])
            _positive_int("block_size[1]", bs[1])
            object.__setattr__(self, "block_size", (int(bs[0]), int(bs[1])))
        elif self.mask is not None:
            raise ValueError(
                "Expected a block_size with a mask: the mask reaches attention through a block "
                "mask. Give block_size=(Q_BLOCK, KV_BLOCK) or drop the mask."
            )
        if self.mask_B not in (1, self.B) or self.mask_H not in (1, self.Hq):
            raise ValueError(
                f"Expected mask_B in (1, B={self.B}) and mask_H in (1, Hq={self.Hq}), "
                f"got mask_B={self.mask_B}, mask_H={self.mask_H}."
            )
        if not isinstance(self.kernel_options, dict) or not all(isinstance(k, str) for k in self.kernel_options):
            raise TypeError(f"Expected kernel_options to be a dict with str keys, got {self.kernel_options!r}.")
        if self.block_order not in BLOCK_ORDERS:
            raise ValueError(f"Expected block_order in {BLOCK_ORDERS}, got {self.block_order!r}.")
        if self.block_order != "sorted" and self.block_size is None:
            raise ValueError(f"Expected block_order='sorted' without a block mask, got {self.block_order!r}: "
                             f"only a block mask has lists to order. Give a block_size or drop block_order.")
        if self.block_order != "sorted" and self.kernel_options.get("BLOCKS_ARE_CONTIGUOUS"):
            raise ValueError(f"Expected block_order='sorted' with BLOCKS_ARE_CONTIGUOUS, got {self.block_order!r}: "
                             f"reversed lists break the promise of consecutive blocks. Unset one of them.")
        for flag in ("backward", "grad_lse"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"Expected {flag} to be a bool, got {getattr(self, flag)!r}.")
        tables = []
        if self.mask is not None:
            _check_spec(self.mask, "mask", self, tables)
        if self.score is not None:
            _check_spec(self.score, "score", self, tables)
        from kernels.mods import MAX_BUFFERS

        if len(tables) > MAX_BUFFERS:
            raise ValueError(
                f"Expected at most {MAX_BUFFERS} captured tables across mask and score mods "
                f"(the kernels' limit), got {len(tables)}."
            )
        json.dumps(self.to_dict())  # everything must be JSON

    def __hash__(self) -> int:
        return hash(self.to_json())

    # ------------------------------------------------------------------
    # derived facts

    @property
    def G(self) -> int:
        """The GQA group size Hq // Hkv."""
        return self.Hq // self.Hkv

    @property
    def enable_gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def has_block_mask(self) -> bool:
        return self.block_size is not None

    def mask_spec(self) -> Optional[dict]:
        """The mask mod's spec, ``full`` when a block mask has no mask of its own."""
        if self.block_size is None:
            return None
        return self.mask if self.mask is not None else {"name": "full"}

    def replace(self, **changes) -> "FlexCase":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def size_key(self) -> tuple:
        """Smaller is simpler: elements of the score matrix, then head dims, then spec text."""
        return (
            self.B * self.Hq * self.L * self.S,
            self.E + self.Ev,
            len(json.dumps(self.mask)) + len(json.dumps(self.score)) + len(json.dumps(self.kernel_options)),
            self.to_json(),
        )

    # ------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["block_size"] = list(self.block_size) if self.block_size is not None else None
        d["kernel_options"] = dict(self.kernel_options)
        if d["block_order"] == "sorted":  # the default stays out, so earlier case files are unchanged
            del d["block_order"]
        if d["value_mean"] == 0:  # likewise
            del d["value_mean"]
        return {"format": FORMAT, **d}

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "FlexCase":
        if not isinstance(data, dict):
            raise TypeError(f"Expected a case as a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format", FORMAT)
        if version != FORMAT:
            raise ValueError(f"Expected a case of format {FORMAT}, got format {version!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown case fields {unknown}; known: {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "FlexCase":
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------
    # tensors

    def materialize(self, device="cpu") -> Materialized:
        """Inputs, mods and block mask on ``device``, bit-identical on every device.

        q, k, v, dO, dLSE are drawn in that order from ``torch.Generator().manual_seed(seed)``
        on the CPU (float32 normal, times ``input_std`` for q, k, v, plus ``value_mean`` for v),
        rounded to the dtype,
        moved to ``device`` and given the layout; unused storage of strided and offset
        layouts holds NaN, which a correct kernel never reads.
        """
        from kernels import mods

        device = torch.device(device)
        gen = torch.Generator().manual_seed(self.seed)
        dtype = self.torch_dtype

        def draw(shape, std=1.0, dt=dtype, mean=0.0):
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
            t = t * std if std != 1.0 else t
            return (t + mean if mean else t).to(dt)

        std = float(self.input_std)
        q = draw((self.B, self.Hq, self.L, self.E), std)
        k = draw((self.Bk, self.Hkv, self.S, self.E), std)
        v = draw((self.Bk, self.Hkv, self.S, self.Ev), std, mean=float(self.value_mean))
        do = draw((self.B, self.Hq, self.L, self.Ev))
        dlse = draw((self.B, self.Hq, self.L), dt=torch.float32)

        q = _lay_out(q, self.layout, device, which="q")
        k = _lay_out(k, self.layout, device, which="k")
        v = _lay_out(v, self.layout, device, which="v")
        if self.backward:
            for t in (q, k, v):
                t.requires_grad_(True)

        score_mod = mods.from_spec(self.score, device) if self.score is not None else None
        mask_spec = self.mask_spec()
        mask_mod = mods.from_spec(mask_spec, device) if mask_spec is not None else None
        block_mask = None
        if mask_mod is not None:
            block_mask = build_block_mask(mask_mod, self.mask_B, self.mask_H, self.L, self.S,
                                          self.block_size, device)
            if self.block_order == "reversed":
                block_mask = reverse_block_order(block_mask)
        return Materialized(
            case=self, device=device, query=q, key=k, value=v,
            grad_out=do.to(device) if self.backward else None,
            grad_lse=dlse.to(device) if self.backward and self.grad_lse else None,
            score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
            scale=None if self.scale is None else float(self.scale),
            enable_gqa=self.enable_gqa, kernel_options=dict(self.kernel_options),
        )

    # ------------------------------------------------------------------
    # in words and pictures

    def describe(self) -> str:
        """The case in words, one fact per line."""
        from kernels import mods

        lines = []
        batch = f"B={self.B}"
        if self.Bk != self.B:
            batch += f" (key/value batch Bk={self.Bk}, broadcast)"
        heads = f"Hq={self.Hq} query heads"
        if self.enable_gqa:
            heads += f" over Hkv={self.Hkv} key/value heads (GQA, group G={self.G})"
        lines.append(f"shape:   {batch}, {heads}")
        lines.append(f"         L={self.L} queries, S={self.S} keys, head dims E={self.E}, Ev={self.Ev}")
        mean = f", v mean {self.value_mean:g}" if self.value_mean else ""
        lines.append(f"inputs:  {self.dtype}, seed {self.seed}, std {self.input_std:g}{mean}, "
                     f"layout {self.layout} ({LAYOUTS[self.layout]})")
        default_scale = 1.0 / math.sqrt(self.E)
        lines.append("scale:   " + (f"default 1/sqrt(E) = {default_scale:.6g}" if self.scale is None
                                    else f"{self.scale:g}"))
        if self.block_size is None:
            lines.append("mask:    none (every key attends)")
        else:
            name = mods.from_spec(self.mask_spec(), "cpu").name
            bcast = []
            if self.mask_B == 1 and self.B > 1:
                bcast.append("batch broadcast")
            if self.mask_H == 1 and self.Hq > 1:
                bcast.append("heads broadcast")
            extra = f" ({', '.join(bcast)})" if bcast else ""
            lines.append(f"mask:    {name}, block mask of {self.block_size[0]} x {self.block_size[1]} "
                         f"tiles for [{self.mask_B}, {self.mask_H}]{extra}"
                         + (", each row's blocks listed in reverse order" if self.block_order == "reversed" else ""))
        lines.append("score:   " + (mods.from_spec(self.score, "cpu").name if self.score is not None else "none"))
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.kernel_options.items()))
        lines.append(f"options: {opts or 'none'}")
        if self.backward:
            lines.append("grads:   dq, dk, dv (and learnable tables) of sum(out * dO)"
                         + (" + sum(lse * dLSE)" if self.grad_lse else ""))
        else:
            lines.append("grads:   none (forward only)")
        return "\n".join(lines)

    def mask_picture(self, max_rows: int = 32, max_cols: int = 64) -> str:
        """The mask as text, for each distinct (batch, head) pattern.

        Element picture: ``#`` allowed, ``.`` not; when L or S exceed the limits
        each character covers several elements and ``:`` means some of them are
        allowed. Tile picture: ``F`` full tile (mask_mod skipped), ``P`` partial
        (mask_mod applied), ``.`` not visited. Rows are queries, columns keys.
        """
        import oracle
        from kernels import mods

        if self.block_size is None:
            return f"no block mask: all {self.L} x {self.S} pairs allowed"
        mask_mod = mods.from_spec(self.mask_spec(), "cpu")
        bm = build_block_mask(mask_mod, self.mask_B, self.mask_H, self.L, self.S, self.block_size, "cpu")
        dense = oracle.block_mask_to_dense(bm, self.B, self.Hq, self.L, self.S, semantics="blocks")
        partial, full = oracle.block_membership(bm)
        groups: dict = {}
        for b in range(self.B):
            for h in range(self.Hq):
                key = (dense[b, h].numpy().tobytes(),
                       partial[b % partial.shape[0], h % partial.shape[1]].numpy().tobytes(),
                       full[b % full.shape[0], h % full.shape[1]].numpy().tobytes())
                groups.setdefault(key, []).append((b, h))
        out = []
        for k, members in enumerate(groups.values()):
            if k == 4:
                out.append(f"... and {len(groups) - 4} more distinct pattern(s)")
                break
            b, h = members[0]
            where = ", ".join(f"(b={x}, h={y})" for x, y in members[:6])
            if len(members) > 6:
                where += f" and {len(members) - 6} more"
            allowed = dense[b, h]
            n_allowed = int(allowed.sum())
            empty_rows = int((~allowed.any(-1)).sum())
            out.append(f"{where}: {n_allowed} of {self.L * self.S} pairs allowed, "
                       f"{empty_rows} fully masked query row(s)")
            out.append(_picture(allowed, max_rows, max_cols))
            p = partial[b % partial.shape[0], h % partial.shape[1]]
            f = full[b % full.shape[0], h % full.shape[1]]
            tiles = torch.where(f, 2, torch.where(p, 1, 0))
            out.append(f"tiles ({self.block_size[0]} x {self.block_size[1]}): "
                       f"{int(f.sum())} full, {int(p.sum())} partial, "
                       f"{int((tiles == 0).sum())} skipped")
            out.append(_tile_picture(tiles, max_rows, max_cols))
        return "\n".join(out)


# --------------------------------------------------------------------------
# helpers


def reverse_block_order(block_mask):
    """The same ``BlockMask`` with each row's listed blocks, partial and full, in reverse order.

    A row's list is a set (SPEC section 3 gives no order), so a kernel must give the same
    attention; one that assumes ascending or consecutive blocks (a pointer jump computed from
    the first block, a walk that stops at a gap) does not."""
    from torch.nn.attention.flex_attention import BlockMask

    def reverse(num, idx):
        columns = torch.arange(idx.shape[-1], device=idx.device)
        count = num[..., None].long()
        return idx.gather(-1, torch.where(columns < count, count - 1 - columns, columns)).contiguous()

    full_num = block_mask.full_kv_num_blocks
    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, reverse(block_mask.kv_num_blocks, block_mask.kv_indices),
        full_num, reverse(full_num, block_mask.full_kv_indices) if full_num is not None else None,
        BLOCK_SIZE=tuple(block_mask.BLOCK_SIZE), mask_mod=block_mask.mask_mod,
        seq_lengths=tuple(block_mask.seq_lengths),
    )


def build_block_mask(mask_mod, mask_B: int, mask_H: int, L: int, S: int, block_size, device):
    """PyTorch's ``create_block_mask`` for ``mask_mod`` on ``device`` (what users build)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, mask_B, mask_H, L, S, device=device, BLOCK_SIZE=tuple(block_size))


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, got {value!r}.")


def _lay_out(t: torch.Tensor, layout: str, device: torch.device, *, which: str) -> torch.Tensor:
    """``t`` (``which`` is "q", "k" or "v")'s values on ``device`` in ``layout`` (a leaf that
    does not require grad)."""
    if layout == "bhle-transposed" or (layout == "q-bhle-transposed" and which == "q"):
        return t.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    if (layout == "kv-transposed" and which != "q") or layout == f"{which}-transposed":
        return t.transpose(2, 3).contiguous().to(device).transpose(2, 3)
    if layout == "strided":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), _FILL, dtype=t.dtype, device=device)
        buf[..., ::2] = t.to(device)
        return buf[..., ::2]
    if layout == "offset":
        buf = torch.full((t.numel() + 2 * _OFFSET,), _FILL, dtype=t.dtype, device=device)
        view = buf[_OFFSET:_OFFSET + t.numel()].view(t.shape)
        view.copy_(t.to(device))
        return view
    return t.contiguous().to(device)


def _table_shape(spec: dict) -> tuple:
    if "shape" in spec:
        return tuple(spec["shape"])
    return tuple(torch.tensor(spec["values"]).shape)


def _check_spec(spec, kind: str, case: FlexCase, tables: list) -> None:
    """Structure and table shapes of a mods spec against the case's dimensions (no tables drawn)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"Expected the {kind} to be a kernels.mods spec dict with a 'name', got {spec!r}.")
    name = spec["name"]
    dims = {"B": case.B, "H": case.Hq, "L": case.L, "S": case.S}

    def table(key: str, need: str, count: bool = True) -> tuple:
        t = spec.get(key)
        if not isinstance(t, dict):
            raise ValueError(f"Expected {name}'s {key!r} to be a table spec, got {t!r}.")
        if count:
            tables.append(t)
        shape = _table_shape(t)
        if len(shape) != len(need) or any(d in dims and size < dims[d] for size, d in zip(shape, need)):
            want = "[" + ", ".join(f"{d}={dims[d]}" if d in dims else d for d in need) + "]"
            raise ValueError(f"Expected {name}'s {key} of shape at least {want} for this case, got {list(shape)}.")
        return shape

    mask_names = {"full", "causal", "sliding_window", "prefix_lm", "attention_sinks", "dilated_sliding_window",
                  "chunked", "document", "table_mask", "and", "or", "not", "by_head", "by_batch"}
    score_names = {"identity", "alibi", "relative_position", "tanh_softcap", "bias", "chain"}
    if name not in (mask_names if kind == "mask" else score_names):
        raise ValueError(f"Unknown {kind} mod {name!r}; expected one of {sorted(mask_names if kind == 'mask' else score_names)}.")
    if name in ("and", "or", "not", "by_head", "by_batch", "chain"):
        children = spec.get("mods")
        if not isinstance(children, list) or not children or (name == "not" and len(children) != 1):
            raise ValueError(f"Expected {name} to hold a non-empty list of mods, got {children!r}.")
        for child in children:
            _check_spec(child, kind, case, tables)
    elif name == "document":
        table("q_ids", "L")
        # from_spec shares one tensor when both id lists are the same.
        table("kv_ids", "S", count=spec.get("kv_ids") != spec.get("q_ids"))
    elif name == "table_mask":
        table("table", "hLS")
    elif name == "alibi":
        table("slopes", "H")
    elif name == "relative_position":
        shape = table("table", "Hr")
        if shape[1] % 2 != 1:
            raise ValueError(f"Expected relative_position's table [H, 2R+1], got {list(shape)}.")
    elif name == "bias":
        layout = spec.get("layout")
        if layout not in _BIAS_DIMS:
            raise ValueError(f"Expected a bias layout in {sorted(_BIAS_DIMS)}, got {layout!r}.")
        table("table", _BIAS_DIMS[layout])


def _picture(allowed: torch.Tensor, max_rows: int, max_cols: int) -> str:
    L, S = allowed.shape
    rs, cs = -(-L // max_rows), -(-S // max_cols)
    lines = []
    if rs > 1 or cs > 1:
        lines.append(f"(each character: {rs} quer{'y' if rs == 1 else 'ies'} x {cs} key{'s' if cs > 1 else ''})")
    for r0 in range(0, L, rs):
        row = []
        for c0 in range(0, S, cs):
            cell = allowed[r0:r0 + rs, c0:c0 + cs]
            n = int(cell.sum())
            row.append("#" if n == cell.numel() else "." if n == 0 else ":")
        lines.append("".join(row))
    return "\n".join(lines)


def _tile_picture(tiles: torch.Tensor, max_rows: int, max_cols: int) -> str:
    nq, nk = tiles.shape
    rows = []
    for r in range(min(nq, max_rows)):
        line = "".join(".PF"[int(x)] for x in tiles[r, :max_cols])
        rows.append(line + (" ..." if nk > max_cols else ""))
    if nq > max_rows:
        rows.append(f"... {nq - max_rows} more tile rows")
    return "\n".join(rows)
