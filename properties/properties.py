"""Properties of FlexAttention that any implementation must have.

Each property is a plain function ``prop(target, case, device)``: it returns
None when the property holds, raises ``AssertionError`` (``Mismatch`` for
numbers, ``TargetError`` when the target itself raised) when it does not, and
raises ``NotApplicable`` with a reason when the case or target cannot express
it. So they serve any test suite:

    from properties import matches_oracle, resolve_target
    matches_oracle(resolve_target("kernels"), case, "cpu")

``matches_oracle`` compares out, LSE, the row max (where the target returns
it) and every gradient with the float64 oracle through the calibrated error
model (``oracle.compare``). The metamorphic properties run the target on a
changed input that must give the same answer (full blocks listed as
partial, each row's blocks in reverse order, another block size, other tiles, two disjoint masks merged by
their LSEs, V = 1, repeated heads for GQA, a copied key/value batch, the
non-decode kernel) and hold that answer to the same error model against the
truth of the unchanged case; on a failure they run the unchanged case too,
to say whether the change is to blame.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

import oracle

from . import check
from .case import FlexCase, Materialized, build_block_mask, reverse_block_order
from .targets import NotApplicable, Target, TargetError, best_device, resolve_target

__all__ = [
    "Mismatch", "Outcome", "evaluate", "run_target", "PROPERTIES", "METAMORPHIC",
    "matches_oracle", "full_blocks_as_partial_change_nothing", "block_size_change_nothing",
    "options_change_nothing", "lse_merge_of_disjoint_masks_equals_union", "ones_value_gives_one",
    "gqa_equals_repeated_heads", "broadcast_batch_equals_expanded", "decode_equals_non_decode",
    "runs_are_bit_identical", "relabel_full_as_partial", "block_order_changes_nothing", "reverse_block_order",
]

_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
_LAUNCH_KEYS = ("num_warps", "num_stages")


class Mismatch(AssertionError):
    """Numbers that disagree; ``tensors`` names the tensors at fault (``out``, ``lse``, ``dq``, ...)."""

    def __init__(self, message: str, tensors):
        super().__init__(message)
        self.tensors = tuple(tensors)


# --------------------------------------------------------------------------
# running a target


def run_target(target: Target, m: Materialized, *, want_max: Optional[bool] = None) -> dict:
    """Call ``target`` on ``m`` and back-propagate ``sum(out * dO) + sum(lse * dLSE)``
    (finite LSE entries; the LSE term only where the target returns an LSE).

    Returns detached tensors by name: ``out``, ``lse`` (if returned), ``max`` (if
    asked), ``dq``, ``dk``, ``dv``, ``dbuffer0``... (if ``m`` has ``grad_out``).
    Any exception of the target other than ``NotApplicable`` (or one its ``declines`` names)
    becomes ``TargetError``.
    """
    want_max = target.returns_max if want_max is None else want_max
    kwargs = dict(score_mod=m.score_mod, block_mask=m.block_mask, scale=m.scale, enable_gqa=m.enable_gqa)
    if target.returns_lse:
        kwargs["return_lse"] = True
    if target.takes_kernel_options and m.kernel_options:
        kwargs["kernel_options"] = dict(m.kernel_options)
    if want_max:
        kwargs["return_max"] = True
    try:
        result = target.fn(m.query, m.key, m.value, **kwargs)
        tensors = _unpack(result, target.returns_lse, want_max)
        if m.grad_out is not None:
            tensors.update(_gradients(m, tensors))
    except NotApplicable:
        raise
    except Exception as exc:
        reason = target.declines(exc)
        if reason:
            raise NotApplicable(f"{target.name}: {reason}") from exc
        raise TargetError(target.name, exc) from exc
    return {k: v.detach() for k, v in tensors.items()}


def _unpack(result, with_lse: bool, with_max: bool) -> dict:
    names = ["out"] + (["lse"] if with_lse else []) + (["max"] if with_max else [])
    if len(names) == 1:
        if isinstance(result, (tuple, list)):
            result = result[0]
        parts = [result]
    else:
        if not isinstance(result, (tuple, list)) or len(result) != len(names):
            raise TypeError(f"expected the target to return ({', '.join(names)}), got {type(result).__name__}"
                            + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        parts = list(result)
    for name, t in zip(names, parts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected {name} to be a tensor, got {type(t).__name__}")
    return dict(zip(names, parts))


def _gradients(m: Materialized, tensors: dict) -> dict:
    inputs = [m.query, m.key, m.value] + m.learnables()
    out, lse = tensors["out"], tensors.get("lse")
    loss = (out * m.grad_out.to(out.dtype)).sum()
    if m.grad_lse is not None and lse is not None:
        finite = torch.isfinite(lse).detach()
        loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)) * m.grad_lse.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = ["dq", "dk", "dv"] + [f"dbuffer{k}" for k in range(len(inputs) - 3)]
    return {name: g if g is not None else torch.zeros_like(t) for name, g, t in zip(names, grads, inputs)}


def _truth(m: Materialized, *, with_lse: bool, want_max: bool):
    """The float64 oracle and the honest emulation (the error baseline) for ``m``."""
    kw = dict(score_mod=m.score_mod, block_mask=m.block_mask, scale=m.scale, enable_gqa=m.enable_gqa,
              grad_out=m.grad_out, grad_lse=m.grad_lse if with_lse else None, want_max=want_max)
    expected = {k: v.double() for k, v in check.oracle_run(m.query, m.key, m.value, **kw).tensors.items()}
    baseline = check.emulated_run(m.query, m.key, m.value, kernel_options=m.kernel_options or None, **kw).tensors
    baseline["_scales"] = check.reference_scales(m.query, m.key, m.value, m.grad_out, m.scale,
                                                 block_mask=m.block_mask, enable_gqa=m.enable_gqa)
    allow = check.forward_allowances(m.query, m.key, m.value, expected["out"], expected["lse"],
                                     score_mod=m.score_mod, block_mask=m.block_mask, scale=m.scale,
                                     enable_gqa=m.enable_gqa)
    if m.grad_out is not None:
        allow.update(check.delta_allowances(
            m.query, m.key, m.value, expected["out"], m.grad_out, score_mod=m.score_mod,
            block_mask=m.block_mask, scale=m.scale, enable_gqa=m.enable_gqa,
            grad_lse=m.grad_lse if with_lse else None, table_grads=check.table_truths(expected)))
    if allow:
        baseline["_scales"]["allow"] = allow
    return expected, baseline


def _compare(name: str, actual, expected, baseline, input_dtype, scales=None):
    # A learnable table's gradient is judged by the inputs' precision (properties.check).
    options = check.table_gradient_options(input_dtype) if name.startswith("dbuffer") else {}
    scale = (scales or {}).get("dbuffer" if name.startswith("dbuffer") else name)
    allowance = (scales or {}).get("allow", {}).get(name)
    return oracle.compare(actual, expected.double(), baseline=baseline, name=name,
                          reference_scale=scale, allowance=allowance, **options)


def _compare_all(prop: str, actual: dict, expected: dict, baseline: dict, headline: str, input_dtype) -> None:
    __tracebackhide__ = True
    failures, names = [], []
    for name, got in actual.items():
        if name not in expected:
            continue
        result = _compare(name, got, expected[name], baseline[name], input_dtype, baseline.get("_scales"))
        if not result.ok:
            failures.append(result.message)
            names.append(name)
    if failures:
        raise Mismatch(f"{prop}: {headline}; {', '.join(names)} disagree:\n" + "\n".join(failures), names)


def _setup(target, case: FlexCase, device):
    target = resolve_target(target)
    device = torch.device(best_device() if device is None else device)
    reason = target.applicable(case, device)
    if reason:
        raise NotApplicable(f"{target.name}: {reason}")
    return target, target.adapt(case, device), device


def _require(target: Target, case: FlexCase, device) -> None:
    reason = target.applicable(case, device)
    if reason:
        raise NotApplicable(f"{target.name}: {reason}")


def _consistent(m: Materialized) -> bool:
    return m.block_mask is None or _lists_agree(m.block_mask, m.case)


def _lists_agree(block_mask, c: FlexCase) -> bool:
    """``block_mask``'s lists agree with its mask_mod over the case's batches and heads."""
    findings = oracle.check_block_mask(block_mask, c.B, c.Hq, c.L, c.S)
    return not any(f.severity == "error" for f in findings)


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _agree(prop: str, what: str, target: Target, m: Materialized, variant: dict, reference) -> None:
    """The ``variant`` run (tensors by name) agrees with the float64 truth of ``m``, within the
    error model; ``reference()`` runs the unchanged case, only to say in a failure whether the
    change is to blame."""
    __tracebackhide__ = True
    expected, baseline = _truth(m, with_lse="lse" in variant, want_max="max" in variant)
    dtype = m.query.dtype
    failures, names = [], []
    for name, got in variant.items():
        result = _compare(name, got, expected[name], baseline[name], dtype, baseline.get("_scales"))
        if not result.ok:
            failures.append(result.message)
            names.append(name)
    if not failures:
        return
    before = reference()
    also = [n for n in names if n in before and not _compare(n, before[n], expected[n], baseline[n], dtype, baseline.get("_scales")).ok]
    blame = (f"the unchanged case fails too ({', '.join(also)}; see matches_oracle)" if also
             else "the unchanged case agrees with it, so the change is to blame")
    raise Mismatch(f"{prop}: with {what}, {', '.join(names)} disagree with the float64 truth; "
                   f"{blame}:\n" + "\n".join(failures), names)


# --------------------------------------------------------------------------
# the properties


def matches_oracle(target, case: FlexCase, device=None) -> None:
    """out, LSE, max (where returned) and all gradients agree with the float64 oracle."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    m = case.materialize(device)
    actual = run_target(target, m)
    expected, baseline = _truth(m, with_lse=target.returns_lse, want_max=target.returns_max)
    _compare_all("matches_oracle", actual, expected, baseline,
                 f"target {target.name!r} disagrees with the float64 oracle", m.query.dtype)


def out_alone_matches_oracle(target, case: FlexCase, device=None) -> None:
    """Asked for ``out`` alone (no LSE, no max: the call a training step makes), the target's
    out and gradients agree with the float64 oracle. A kernel may serve that call by another
    path than the one ``matches_oracle`` checks (ours: a softcap's faster tanh in bf16 and fp16,
    where no float32 result would show its error)."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case.replace(grad_lse=False), device)
    if not (target.returns_lse or target.returns_max):
        raise NotApplicable(f"{target.name} returns out alone already: matches_oracle checks that call")
    m = case.materialize(device)
    alone = dataclasses.replace(target, returns_lse=False, returns_max=False)
    _agree("out_alone_matches_oracle", "out alone asked for (no LSE, no max)", target, m,
           run_target(alone, m, want_max=False), lambda: run_target(target, m, want_max=False))


def relabel_full_as_partial(block_mask):
    """The same ``BlockMask`` with every full block listed as partial (no full lists)."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = oracle.block_membership(block_mask)
    member = partial | full
    n = member.shape[-1]
    columns = torch.arange(n, device=member.device)
    order = torch.where(member, columns, columns + n).argsort(dim=-1).to(torch.int32)
    return BlockMask.from_kv_blocks(
        member.sum(-1, dtype=torch.int32), order, None, None,
        BLOCK_SIZE=tuple(block_mask.BLOCK_SIZE), mask_mod=block_mask.mask_mod,
        seq_lengths=tuple(block_mask.seq_lengths),
    )


def block_order_changes_nothing(target, case: FlexCase, device=None) -> None:
    """Each row's listed blocks in reverse order give the same attention (a list is a set)."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    if case.block_size is None:
        raise NotApplicable("no block mask: no block lists to reorder")
    m = case.materialize(device)
    options = {k: v for k, v in case.kernel_options.items() if k != "BLOCKS_ARE_CONTIGUOUS"}
    variant = run_target(target, dataclasses.replace(
        m, block_mask=reverse_block_order(m.block_mask), kernel_options=options))
    _agree("block_order_changes_nothing", "each row's blocks listed in reverse order", target, m, variant,
           lambda: run_target(target, m))


def _with_default_block_mask(case: FlexCase) -> FlexCase:
    """A case without a block mask as the equivalent full block mask of 128 x 128 tiles."""
    return case if case.block_size is not None else case.replace(block_size=(128, 128), mask_B=1, mask_H=1)


def full_blocks_as_partial_change_nothing(target, case: FlexCase, device=None) -> None:
    """Listing every full block as partial (so mask_mod runs on it) changes nothing,
    for a block mask consistent with its mask_mod (oracle.check_block_mask finds no error).
    A case without a block mask uses the full mask's 128 x 128 block mask."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    m = case.materialize(device)
    if not _consistent(m):
        raise NotApplicable("the block mask disagrees with its mask_mod, so full and partial blocks differ")
    masked = _with_default_block_mask(case).materialize(device)
    options = {k: v for k, v in case.kernel_options.items() if k != "BLOCKS_ARE_CONTIGUOUS"}
    variant = run_target(target, dataclasses.replace(
        m, block_mask=relabel_full_as_partial(masked.block_mask), kernel_options=options))
    _agree("full_blocks_as_partial_change_nothing", "every full block listed as partial", target, m, variant,
           lambda: run_target(target, m))


def _other_block_size(block_size) -> tuple:
    # Doubling small tiles and halving large ones keeps the interpreter's work bounded.
    if block_size is None:
        return (64, 128)
    return tuple(b * 2 if b <= 32 else b // 2 for b in block_size)


def _options_for_block_size(options: dict, block_size) -> dict:
    """``options`` without tiles that do not divide ``block_size`` and without the contiguity promise."""
    q_block, kv_block = block_size
    kept = {}
    for key, value in options.items():
        base = key[4:] if key.startswith(("fwd_", "bwd_")) else key
        if key == "BLOCKS_ARE_CONTIGUOUS":
            continue
        if base in _TILE_KEYS and (q_block if "M" in base else kv_block) % value:
            continue
        kept[key] = value
    return kept


def block_size_change_nothing(target, case: FlexCase, device=None) -> None:
    """Another block size of the same mask_mod gives the same attention (a case without a
    block mask gets the full mask's block mask of 64 x 128 tiles)."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    other = _other_block_size(case.block_size)
    variant_case = case.replace(block_size=other,
                                kernel_options=_options_for_block_size(case.kernel_options, other))
    _require(target, variant_case, device)
    m = case.materialize(device)
    other_mask = variant_case.materialize(device).block_mask
    # Both block masks must agree with mask_mod: a mask broadcast over heads from head 0 can
    # be all partial blocks at one size (mask_mod then decides) and full at another (it is
    # skipped), and a head whose mask allows nothing then differs (seed 22 of the CPU's
    # false-alarm run, eleventh session, once by_head gained a complement head).
    if not _consistent(m) or (other_mask is not None and not _lists_agree(other_mask, variant_case)):
        raise NotApplicable("a block mask disagrees with its mask_mod, so its blocks matter")
    variant = run_target(target, dataclasses.replace(m, block_mask=other_mask,
                                                     kernel_options=variant_case.kernel_options))
    _agree("block_size_change_nothing", f"block size {other} instead of {case.block_size or 'none'}",
           target, m, variant, lambda: run_target(target, m))


def _other_options(options: dict, block_size) -> dict:
    """The case's flags with other tiles, warps and stages: each tile given is replaced by
    16 (or 32 when it was 16), each tile not given is set to half the block size (the refined
    block size under REFINE_Q_BLOCK / REFINE_KV_BLOCK, which tiles must divide)."""
    q_block, kv_block = block_size or (128, 128)
    q_block = min(q_block, options.get("REFINE_Q_BLOCK") or q_block)
    kv_block = min(kv_block, options.get("REFINE_KV_BLOCK") or kv_block)
    kept = {k: v for k, v in options.items()
            if (k[4:] if k.startswith(("fwd_", "bwd_")) else k) not in _TILE_KEYS + _LAUNCH_KEYS}
    for key in _TILE_KEYS:
        sparse = q_block if "M" in key else kv_block
        phase = "fwd_" if key in ("BLOCK_M", "BLOCK_N") else "bwd_"
        given = options.get(phase + key, options.get(key))
        if given is None:
            tile = max(16, sparse // 2)
        else:
            tile = 16 if given != 16 else (32 if sparse % 32 == 0 else 16)
        kept[key] = tile
    kept["num_warps"] = 2 if options.get("num_warps") != 2 else 4
    kept["num_stages"] = 1 if options.get("num_stages") != 1 else 2
    return kept


def options_change_nothing(target, case: FlexCase, device=None) -> None:
    """Other tiles, warps and stages give the same result within the error model."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    if not target.takes_kernel_options:
        raise NotApplicable(f"{target.name} takes no kernel_options")
    m = case.materialize(device)
    options = _other_options(case.kernel_options, case.block_size)
    variant = run_target(target, dataclasses.replace(m, kernel_options=options))
    _agree("options_change_nothing", f"kernel_options {options}", target, m, variant,
           lambda: run_target(target, m))


def lse_merge_of_disjoint_masks_equals_union(target, case: FlexCase, device=None) -> None:
    """Split the mask M into M & causal and M & ~causal; merging the two results by their
    LSEs (``lse = logaddexp(l1, l2)``, ``out = e^(l1-lse) o1 + e^(l2-lse) o2``) gives M's."""
    __tracebackhide__ = True
    from kernels import mods

    target, case, device = _setup(target, case.replace(backward=False, grad_lse=False), device)
    if not target.returns_lse:
        raise NotApplicable(f"{target.name} returns no log-sum-exp")
    case = _with_default_block_mask(case)
    m = case.materialize(device)
    if not _consistent(m):
        raise NotApplicable("the block mask disagrees with its mask_mod, so a split of mask_mod is not a "
                            "split of the blocks")
    options = {k: v for k, v in case.kernel_options.items()
               if k not in ("ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS")}
    parts = []
    for half in (mods.causal(), mods.not_(mods.causal())):
        mask_mod = mods.and_(m.mask_mod, half)
        bm = build_block_mask(mask_mod, case.mask_B, case.mask_H, case.L, case.S, case.block_size, device)
        if not _lists_agree(bm, case):
            # A mask broadcast over heads or batches whose split is not: M & ~causal can leave
            # head 0's lists empty where head 1's must not be (by_head(causal, full), found by
            # the CPU suite), so the part gets a block mask of its own per batch and head.
            bm = build_block_mask(mask_mod, case.B, case.Hq, case.L, case.S, case.block_size, device)
        parts.append(run_target(target, dataclasses.replace(m, mask_mod=mask_mod, block_mask=bm,
                                                            kernel_options=options), want_max=False))
    l1, l2 = parts[0]["lse"].double(), parts[1]["lse"].double()
    lse = torch.logaddexp(l1, l2)
    finite = torch.isfinite(lse)
    w1 = torch.where(finite, torch.exp(l1 - lse), 0.0).unsqueeze(-1)
    w2 = torch.where(finite, torch.exp(l2 - lse), 0.0).unsqueeze(-1)
    out = w1 * parts[0]["out"].double() + w2 * parts[1]["out"].double()
    merged = {"out": out.to(parts[0]["out"].dtype), "lse": lse.to(parts[0]["lse"].dtype)}
    _agree("lse_merge_of_disjoint_masks_equals_union", "the results of M & causal and M & ~causal merged",
           target, m, merged, lambda: run_target(target, m, want_max=False))


def ones_value_gives_one(target, case: FlexCase, device=None) -> None:
    """With V = 1 every attended row of out is 1 (within the error model) and every fully
    masked row exactly 0."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case.replace(backward=False, grad_lse=False), device)
    m = case.materialize(device)
    ones = torch.ones(m.value.shape, dtype=m.value.dtype, device=device)
    m = dataclasses.replace(m, value=ones)
    actual = run_target(target, m, want_max=False)["out"]
    expected, baseline = _truth(m, with_lse=True, want_max=False)
    attended = torch.isfinite(expected["lse"]).to(actual.device)
    truth = attended.unsqueeze(-1).double().expand(expected["out"].shape)
    result = _compare("out", actual, truth.to(expected["out"].device), baseline["out"], m.query.dtype,
                      baseline.get("_scales"))
    if not result.ok:
        raise Mismatch(f"ones_value_gives_one: with V = 1, out is not 1 on attended rows and 0 on "
                       f"fully masked rows:\n{result.message}", ["out"])
    masked = ~attended
    if masked.any() and bool((actual[masked] != 0).any()):
        bad = (actual[masked] != 0).sum().item()
        raise Mismatch(f"ones_value_gives_one: {bad} elements of fully masked rows are not exactly 0 "
                       f"(SPEC section 2: out = 0 when no key is allowed)", ["out"])


def gqa_equals_repeated_heads(target, case: FlexCase, device=None) -> None:
    """GQA equals plain attention with each key/value head repeated G times (dk, dv summed over the group)."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    if case.Hq == case.Hkv:
        raise NotApplicable("no GQA in this case (Hq == Hkv)")
    m = case.materialize(device)
    G, grads = case.G, case.backward
    k = _leaf(m.key.detach().repeat_interleave(G, dim=1), grads)
    v = _leaf(m.value.detach().repeat_interleave(G, dim=1), grads)
    variant = run_target(target, dataclasses.replace(m, key=k, value=v, enable_gqa=False))
    for name in ("dk", "dv"):
        if name in variant:
            g = variant[name]
            variant[name] = g.float().view(g.shape[0], case.Hkv, G, *g.shape[2:]).sum(2).to(g.dtype)
    _agree("gqa_equals_repeated_heads", f"each of the {case.Hkv} key/value heads repeated {G} times",
           target, m, variant, lambda: run_target(target, m))


def broadcast_batch_equals_expanded(target, case: FlexCase, device=None) -> None:
    """A key/value batch of 1 broadcast over B equals the same keys/values copied B times."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    if case.B == 1:
        raise NotApplicable("B == 1: no batch to broadcast over")
    case = case.replace(Bk=1)
    _require(target, case, device)
    m = case.materialize(device)
    k = _leaf(m.key.detach().expand(case.B, *m.key.shape[1:]).contiguous(), case.backward)
    v = _leaf(m.value.detach().expand(case.B, *m.value.shape[1:]).contiguous(), case.backward)
    variant = run_target(target, dataclasses.replace(m, key=k, value=v))
    for name in ("dk", "dv"):
        if name in variant:
            g = variant[name]
            variant[name] = g.float().sum(0, keepdim=True).to(g.dtype)
    _agree("broadcast_batch_equals_expanded", f"the key/value batch of 1 copied to B={case.B}",
           target, m, variant, lambda: run_target(target, m))


def decode_equals_non_decode(target, case: FlexCase, device=None) -> None:
    """FORCE_USE_FLEX_ATTENTION (never the decode kernel) gives the same result as the
    kernel the target picks by itself."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case, device)
    if not target.takes_kernel_options:
        raise NotApplicable(f"{target.name} takes no kernel_options")
    m = case.materialize(device)
    free = {k: v for k, v in case.kernel_options.items() if k != "FORCE_USE_FLEX_ATTENTION"}
    free_m = dataclasses.replace(m, kernel_options=free)
    forced = run_target(target, dataclasses.replace(m, kernel_options={**free, "FORCE_USE_FLEX_ATTENTION": True}))
    _agree("decode_equals_non_decode", "FORCE_USE_FLEX_ATTENTION=True", target, free_m, forced,
           lambda: run_target(target, free_m))


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def runs_are_bit_identical(target, case: FlexCase, device=None) -> None:
    """Two runs on the same inputs give the same bits (out, LSE and max)."""
    __tracebackhide__ = True
    target, case, device = _setup(target, case.replace(backward=False, grad_lse=False), device)
    m = case.materialize(device)
    first, second = run_target(target, m), run_target(target, m)
    differ, names = [], []
    for name in first:
        a, b = first[name], second[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            differ.append(f"{name}: {tuple(a.shape)} {a.dtype} then {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(_bits(a), _bits(b)):
            count = int((_bits(a) != _bits(b)).sum())
            differ.append(f"{name}: {count} of {a.numel()} elements differ between two runs")
        else:
            continue
        names.append(name)
    if differ:
        raise Mismatch("runs_are_bit_identical: " + "; ".join(differ), names)


PROPERTIES: dict = {
    fn.__name__: fn for fn in (
        matches_oracle, out_alone_matches_oracle, full_blocks_as_partial_change_nothing, block_order_changes_nothing,
        block_size_change_nothing,
        options_change_nothing, lse_merge_of_disjoint_masks_equals_union, ones_value_gives_one,
        gqa_equals_repeated_heads, broadcast_batch_equals_expanded, decode_equals_non_decode,
        runs_are_bit_identical,
    )
}

METAMORPHIC = tuple(name for name in PROPERTIES if name != "matches_oracle")


# --------------------------------------------------------------------------
# outcomes, for the CLI and for test suites that want to count


@dataclass(frozen=True)
class Outcome:
    """What one property did on one case.

    ``status``: ``passed``, ``failed`` (numbers disagree), ``target-error`` (the
    target raised), ``skipped`` (not applicable; ``reason`` says why) or
    ``error`` (the harness itself raised: a bug of ours).
    """

    property: str
    status: str
    message: str = ""
    reason: str = ""
    tensors: tuple = ()
    error_type: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")

    @property
    def signature(self) -> tuple:
        """What tells two failures apart: property, kind, and the first tensor at fault or the exception type."""
        if self.status == "failed":
            # The first tensor at fault, forward before backward: a forward error that also
            # spoils the gradients is one failure, not one per subset of tensors.
            order = ("out", "lse", "max", "dq", "dk", "dv")
            detail = min(self.tensors, key=lambda t: (order.index(t) if t in order else len(order), t), default="")
        else:
            detail = self.error_type
        return (self.property, self.status, detail)


def evaluate(prop, target, case: FlexCase, device=None) -> Outcome:
    """Run ``prop`` (a function or its name) and say how it went, without raising."""
    fn = PROPERTIES[prop] if isinstance(prop, str) else prop
    name = fn.__name__
    start = time.perf_counter()

    def done(status, **kw):
        return Outcome(name, status, seconds=time.perf_counter() - start, **kw)

    try:
        fn(target, case, device)
    except NotApplicable as exc:
        return done("skipped", reason=exc.reason)
    except TargetError as exc:
        return done("target-error", message=_with_traceback(exc.original, str(exc)),
                    error_type=type(exc.original).__name__)
    except Mismatch as exc:
        return done("failed", message=str(exc), tensors=exc.tensors)
    except AssertionError as exc:
        return done("failed", message=f"{name}: {exc}", tensors=("assertion",))
    except Exception as exc:
        return done("error", message=_with_traceback(exc, f"{name}: the harness raised {type(exc).__name__}: {exc}"),
                    error_type=type(exc).__name__)
    return done("passed")


def _with_traceback(exc: BaseException, headline: str) -> str:
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-6))
    return f"{headline}\n{tb.rstrip()}"
