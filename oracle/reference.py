"""The float64 truth for FlexAttention (SPEC sections 2-4).

``flex_attention`` computes, for every (b, h, i), the masked softmax of
``score_mod(scale * q.k)`` over the allowed key/value positions, the natural-log
LSE and, on request, the row maximum of the modified scores. It is plain
PyTorch in float64, differentiable through autograd, so every gradient (q, k,
v, the LSE's, and those of captured tensors a ``score_mod`` reads) is the
exact derivative of the forward.

Memory stays bounded: query rows are processed in chunks, and a chunk's forward
keeps none of its tensors for the backward: the backward recomputes one chunk
at a time and drops that chunk's tensors before it recomputes the next
(``_Recompute``). Peak extra memory is a few ``B x Hq x chunk x S`` tensors,
never ``L x S`` per head, whichever gradients a backward asks for.

``emulate_flex_attention`` runs the same computation the way an honest
low-precision kernel would (operands rounded to the dtype, float32
accumulation, probabilities rounded before the product with V); its error
against the truth is the baseline of ``oracle.compare``.
"""

from __future__ import annotations

import inspect
import math
import weakref
from typing import Callable, Optional

import torch

from .block_mask import block_membership, validate_block_mask

__all__ = ["flex_attention", "emulate_flex_attention", "SEMANTICS"]

SEMANTICS = ("blocks", "mask_mod")

# Elements of one chunk's score tensor. About ten tensors of this size live at
# once (scores, modified scores, mask, exponentials and their gradients), so
# 2**22 float64 elements keep the CPU peak near 300 MiB. On a GPU 2**24 keeps it
# near 1.3 GiB: the nightly job runs 16 fuzz processes on one GPU, and at 2**26
# (5 GiB a process, more with the caching allocator's fragments) they filled the
# H200's 140 GiB and four cases of 4,280 ran out of memory (18e92e6, seeds 18001-18016).
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Optional[Callable] = None,
    block_mask=None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Optional[dict] = None,
    *,
    semantics: Optional[str] = None,
    return_max: bool = False,
    chunk_size: Optional[int] = None,
):
    """Float64 FlexAttention.

    Shapes: query ``[B, Hq, L, E]``, key ``[Bk, Hkv, S, E]``, value
    ``[Bk, Hkv, S, Ev]`` with ``Bk`` in ``{B, 1}``; query head ``h`` reads
    key/value head ``h // (Hq // Hkv)``.

    Returns ``out`` ``[B, Hq, L, Ev]`` in float64 on the query's device, then
    (if asked) ``lse`` ``[B, Hq, L]`` in natural log and ``max`` ``[B, Hq, L]``
    (the largest modified score; not differentiated). A fully masked row gives
    ``out = 0``, ``lse = max = -inf`` and zero gradients.

    ``semantics`` chooses what a ``block_mask`` means (SPEC section 3):
    ``"blocks"`` (default) is what a block-sparse kernel executes; ``"mask_mod"``
    is the element-level ``block_mask.mask_mod`` alone. ``kernel_options`` is
    accepted for signature compatibility and ignored: options never change the
    mathematical result.
    """
    return _attention(
        query, key, value, score_mod, block_mask, scale, enable_gqa,
        return_lse, kernel_options, semantics, return_max, chunk_size,
        compute_dtype=torch.float64, round_to=None,
    )


def emulate_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Optional[Callable] = None,
    block_mask=None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Optional[dict] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    semantics: Optional[str] = None,
    return_max: bool = False,
    chunk_size: Optional[int] = None,
):
    """An honest low-precision FlexAttention, for error baselines.

    Matrix-product operands (q, k, v, the unnormalised probabilities, and in
    the backward the gradients that feed products) are rounded to ``dtype``
    (default: the query's dtype; float32 means TF32 unless
    ``torch.get_float32_matmul_precision() == "highest"``, as in the kernels);
    everything is accumulated in float32. Same returns as ``flex_attention``
    but in float32.
    """
    dtype = query.dtype if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(
            f"Expected dtype to be float16, bfloat16, float32 or float64, got {dtype}."
        )
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return _attention(
        query, key, value, score_mod, block_mask, scale, enable_gqa,
        return_lse, kernel_options, semantics, return_max, chunk_size,
        compute_dtype=compute,
        round_to=None if dtype == torch.float64 else _Emulation(
            dtype, bool((kernel_options or {}).get("PRESCALE_QK", False))),
    )


# --------------------------------------------------------------------------
# rounding of matrix-product operands, for the emulation


class _RoundBoth(torch.autograd.Function):
    """Round to a format in the forward and the incoming gradient in the backward.

    A kernel rounds both a product's operands and, in its backward, the
    gradients it feeds to the next product; the straight-through gradient of a
    rounding would skip the second.
    """

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.fn(grad), None


class _RoundGrad(torch.autograd.Function):
    """Identity forward; rounds the incoming gradient.

    A kernel's backward rounds the score gradient ``ds`` to the input dtype
    before the products ``ds @ K`` and ``ds^T @ Q``; the emulation must too, or
    its dQ/dK baseline is more accurate than any honest kernel.
    """

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.fn(grad), None


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    # Hopper's tensor cores read float32 operands as TF32 by dropping the low 13
    # mantissa bits (truncation, measured on the H100: a round-to-nearest
    # emulation needed tolerance factors of 23-61 against compiled kernels,
    # truncation 3.9). Truncation is biased, so its error adds up along a sum.
    bits = x.contiguous().view(torch.int32)
    out = (bits & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


class _DivideStored(torch.autograd.Function):
    """``num / total`` whose backward uses the output as stored (rounded to the dtype).

    A kernel's backward computes ``delta = rowsum(dO * O)`` from the output it
    stored, not from an exact one; the gradient of ``total`` here is exactly
    that term, so the emulated dQ/dK carry the same error.
    """

    @staticmethod
    def forward(ctx, num, total, store):
        out = num / total
        ctx.save_for_backward(out, total)
        ctx.store = store
        return out

    @staticmethod
    def backward(ctx, grad):
        out, total = ctx.saved_tensors
        grad_total = -(grad * ctx.store(out)).sum(-1, keepdim=True) / total
        return grad / total, grad_total, None


class _Emulation:
    """Where an honest kernel in ``dtype`` rounds: matrix-product operands (TF32 for
    float32 unless matmul precision is "highest"), the score gradient before its
    products, the stored output, and with PRESCALE_QK the pre-scaled query."""

    def __init__(self, dtype: torch.dtype, prescale: bool):
        self.dtype = dtype
        self.prescale = prescale
        tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
        if dtype == torch.float32:
            self._operand = (lambda x: _round_tf32(x.float())) if tf32 else None
            self._store = lambda x: x
        else:
            self._operand = lambda x: x.to(dtype).float()
            self._store = self._operand

    def __call__(self, x):
        return _RoundBoth.apply(x, self._operand) if self._operand else x

    def grad(self, x):
        return _RoundGrad.apply(x, self._operand) if self._operand else x

    def divide(self, num, total):
        return _DivideStored.apply(num, total, self._store)

    def prescaled_query(self, q, scale):
        """q as the kernel sees it with PRESCALE_QK: rounded after scaling by scale*log2(e).
        Straight-through gradient: the kernels' backward does not pre-scale."""
        if not self.prescale or self.dtype == torch.float32:
            return q
        c = scale * _LOG2E
        rounded = (q * c).to(self.dtype).to(q.dtype) / c
        return q + (rounded - q).detach()


_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------
# validation


def _check_arity(fn, n: int, name: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"Expected {name} to be callable {signature} or None, got {type(fn).__name__}.")
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        raise TypeError(
            f"Expected {name} to take {n} positional arguments {signature}, "
            f"got {getattr(fn, '__name__', fn)!r} with signature {inspect.signature(fn)}. "
            f"Write it as def {name}{signature}: ..."
        ) from None
    except ValueError:  # builtins without a signature: let the call decide
        pass


def _validate(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, semantics):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expected {name} to be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"Expected {name} to have 4 dimensions [batch, heads, seq_len, head_dim], "
                f"got shape {tuple(t.shape)}. Add the missing batch/head dimensions with unsqueeze."
            )
        if not t.is_floating_point():
            raise TypeError(f"Expected {name} to be a floating-point tensor, got {t.dtype}.")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"Expected query, key and value to share a dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}. Cast them to one dtype first."
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"Expected query, key and value on one device, got {query.device}, {key.device}, "
            f"{value.device}. Move them with .to(device)."
        )
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    Bv, Hv, Sv, Ev = value.shape
    if E != Ek:
        raise ValueError(
            f"Expected query and key to share the head dim E, got query E={E}, key E={Ek}."
        )
    if S != Sv:
        raise ValueError(
            f"Expected key and value to share the sequence length S, got key S={S}, value S={Sv}."
        )
    if Bk != Bv or Hkv != Hv:
        raise ValueError(
            f"Expected key and value to share batch and head counts, got key {tuple(key.shape[:2])}, "
            f"value {tuple(value.shape[:2])}."
        )
    if Bk not in (B, 1):
        raise ValueError(
            f"Expected the key/value batch to be the query's (B={B}) or 1 (broadcast), got Bk={Bk}."
        )
    if min(B, Hq, L, E, Hkv, S, Ev) == 0:
        raise ValueError(
            f"Expected non-empty dimensions, got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}."
        )
    if enable_gqa:
        if Hq % Hkv != 0:
            raise ValueError(
                f"Expected Hq % Hkv == 0 for enable_gqa=True, got Hq={Hq}, Hkv={Hkv}. "
                f"Use a number of query heads that is a multiple of the key/value heads."
            )
    elif Hq != Hkv:
        raise ValueError(
            f"Expected Hq == Hkv with enable_gqa=False, got Hq={Hq}, Hkv={Hkv}. "
            f"Pass enable_gqa=True for grouped-query attention."
        )
    if scale is not None:
        if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)):
            raise TypeError(f"Expected scale to be a Python float or None, got {type(scale).__name__}.")
        if not math.isfinite(scale):
            raise ValueError(f"Expected a finite scale, got scale={scale}. Pass None for 1/sqrt(E).")
    if score_mod is not None:
        _check_arity(score_mod, 5, "score_mod", "(score, b, h, q_idx, kv_idx)")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"Expected kernel_options to be a dict or None, got {type(kernel_options).__name__}.")
    if semantics is not None and semantics not in SEMANTICS:
        raise ValueError(f"Expected semantics in {SEMANTICS}, got semantics={semantics!r}.")
    if block_mask is not None:
        validate_block_mask(block_mask, B=B, H=Hq, Q_LEN=L, KV_LEN=S)
        _check_arity(block_mask.mask_mod, 4, "mask_mod", "(b, h, q_idx, kv_idx)")


# --------------------------------------------------------------------------
# the computation


def _attention(
    query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
    kernel_options, semantics, return_max, chunk_size, *, compute_dtype, round_to,
):
    _validate(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, semantics)
    B, Hq, L, E = query.shape
    Bk, Hkv, S, _ = key.shape
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    semantics = semantics or "blocks"
    rnd = round_to or (lambda x: x)

    q = rnd(query).to(compute_dtype)
    if round_to is not None:
        q = round_to.prescaled_query(q, scale)
    # Each query head sees its key/value head; memory O(S), never O(L x S).
    kv_head = torch.arange(Hq, device=query.device) // (Hq // Hkv)
    k = rnd(key).to(compute_dtype).index_select(1, kv_head).expand(B, Hq, S, -1)
    v = rnd(value).to(compute_dtype).index_select(1, kv_head).expand(B, Hq, S, -1)

    tiles = None
    if block_mask is not None and semantics == "blocks":
        partial, full = block_membership(block_mask)
        tiles = (partial.to(query.device), full.to(query.device), block_mask.BLOCK_SIZE)
    mask_mod = block_mask.mask_mod if block_mask is not None else None

    if chunk_size is None:
        budget = _CHUNK_ELEMENTS["cuda" if query.is_cuda else "cpu"]
        chunk_size = max(1, min(L, budget // max(1, B * Hq * S)))
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size to be a positive int or None, got {chunk_size!r}.")

    def run_chunk(q_chunk, k, v, start):
        return _attend_chunk(
            q_chunk, k, v, start, scale, score_mod, mask_mod, tiles, rnd, compute_dtype,
        )

    outs, lses, maxes = [], [], []
    recompute = torch.is_grad_enabled()
    for start in range(0, L, chunk_size):
        q_chunk = q[:, :, start:start + chunk_size]
        if recompute:
            o, lse, mx = _Recompute(run_chunk, q_chunk, k, v, start).forward()
        else:
            o, lse, mx = run_chunk(q_chunk, k, v, start)
        outs.append(o)
        lses.append(lse)
        maxes.append(mx)
    out = torch.cat(outs, dim=2)
    result = [out]
    if return_lse:
        result.append(torch.cat(lses, dim=2))
    if return_max:
        result.append(torch.cat(maxes, dim=2).detach())
    return result[0] if len(result) == 1 else tuple(result)


class _Recompute:
    """One chunk's forward whose saved tensors are recomputed, not kept.

    The forward runs under saved-tensor hooks that keep only an index; the first
    time a backward unpacks one of the chunk's tensors, the chunk's forward runs
    again and its saved tensors are held until the backward moves on to another
    chunk (autograd finishes one chunk's nodes before the next: each chunk's nodes
    are numbered after the previous chunk's) or ends. So at most one chunk's
    tensors live at a time.

    ``torch.utils.checkpoint`` (non-reentrant), used before, holds a recomputed
    tensor until autograd unpacks it or frees the graph. A backward that takes only
    some gradients never unpacks the tensors of the nodes it skips, so with the graph
    still referenced every chunk's leftovers stayed: ``grad(out, v)`` after
    ``grad(lse, q, retain_graph=True)`` held one score-sized tensor per chunk, about
    ``L x S`` per head, and ran out of the H100's 80 GB at S=16k, H=32, D=64
    (``properties.check.delta_allowances``, the forty-fourth session's probe).
    """

    _held = None  # a weak reference to the chunk whose tensors are held

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
        self.versions = [a._version for a in args if isinstance(a, torch.Tensor)]
        self.metadata = []
        self.saved = None

    def forward(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.fn(*self.args)

    def _pack(self, t):
        self.metadata.append((t.shape, t.dtype, t.device))
        return self, len(self.metadata) - 1

    @staticmethod
    def _unpack(packed):
        self, index = packed
        saved = self.saved
        if saved is None:
            saved = self._recompute()
        return saved[index]

    def _recompute(self):
        if [a._version for a in self.args if isinstance(a, torch.Tensor)] != self.versions:
            raise RuntimeError(
                "Expected the oracle's inputs to be unchanged between its forward and backward, "
                "but one was modified in place. Clone q, k and v before changing them in place, "
                "or run the oracle again after the change."
            )
        held = _Recompute._held() if _Recompute._held is not None else None
        if held is not None:
            held.saved = None
        saved = []

        def keep(t):
            saved.append(t.detach() if t.requires_grad else t)

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda _: None):
            self.fn(*self.args)
        if [(t.shape, t.dtype, t.device) for t in saved] != self.metadata:
            raise RuntimeError(
                f"Expected the recomputed chunk to save the {len(self.metadata)} tensors its forward "
                f"saved, got {len(saved)} (or other shapes). score_mod and mask_mod must compute "
                f"the same way on every call: no randomness and no state changed between calls."
            )
        self.saved = saved
        _Recompute._held = weakref.ref(self)
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._release)
        except RuntimeError:  # unpacked outside a backward: held until the next chunk's recompute
            pass
        return saved

    def _release(self):
        self.saved = None


def _indices(B, Hq, start, stop, S, device):
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=device).view(1, Hq, 1, 1)
    i = torch.arange(start, stop, device=device).view(1, 1, stop - start, 1)
    j = torch.arange(S, device=device).view(1, 1, 1, S)
    return b, h, i, j


def _broadcast(t: torch.Tensor, shape, name: str) -> torch.Tensor:
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"Expected {name} to return a tensor that broadcasts to the scores' shape "
            f"[B, Hq, rows, S] = {list(shape)}, got shape {tuple(t.shape)}. Combine the index "
            f"arguments elementwise (they broadcast against each other) instead of reshaping them."
        ) from None


def _allowed(mask_mod, tiles, b, h, i, j, shape):
    """The allowed relation of SPEC section 3 for one chunk of rows."""
    allowed = None
    if mask_mod is not None:
        allowed = mask_mod(b, h, i, j)
        if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
            got = allowed.dtype if isinstance(allowed, torch.Tensor) else type(allowed).__name__
            raise TypeError(
                f"Expected mask_mod to return a bool tensor, got {got}. "
                f"Return a comparison such as q_idx >= kv_idx, not a number."
            )
        allowed = _broadcast(allowed, shape, "mask_mod")
    if tiles is not None:
        partial, full, (q_block, kv_block) = tiles
        MB, MH = partial.shape[:2]
        mb = b % MB
        mh = h % MH
        qb = i // q_block
        kb = j // kv_block
        in_partial = partial[mb, mh, qb, kb]
        in_full = full[mb, mh, qb, kb]
        allowed = in_full | (in_partial & allowed)
    return allowed


def _attend_chunk(q, k, v, start, scale, score_mod, mask_mod, tiles, rnd, compute_dtype):
    B, Hq, C, _ = q.shape
    S = k.shape[2]
    b, h, i, j = _indices(B, Hq, start, start + C, S, q.device)
    shape = (B, Hq, C, S)

    scores = torch.matmul(q, k.transpose(-1, -2))
    if isinstance(rnd, _Emulation):
        scores = rnd.grad(scores)
    scores = scores * scale
    if score_mod is not None:
        modded = score_mod(scores, b, h, i, j)
        if not isinstance(modded, torch.Tensor) or not modded.is_floating_point():
            raise TypeError(
                f"Expected score_mod to return a floating-point tensor, got "
                f"{modded.dtype if isinstance(modded, torch.Tensor) else type(modded).__name__}."
            )
        scores = _broadcast(modded.to(compute_dtype), shape, "score_mod")
    allowed = _allowed(mask_mod, tiles, b, h, i, j, shape)
    neg_inf = torch.tensor(float("-inf"), dtype=compute_dtype, device=q.device)
    if allowed is not None:
        scores = torch.where(allowed, scores, neg_inf)

    row_max = scores.amax(dim=-1, keepdim=True)
    # Shift by a constant (no gradient: the softmax does not depend on it);
    # 0 for empty rows so that exp gives 0, never NaN.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - shift)
    total = weights.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, shift + torch.log(safe_total), neg_inf)
    num = torch.matmul(rnd(weights), v)
    out = rnd.divide(num, safe_total) if isinstance(rnd, _Emulation) else num / safe_total
    return out, lse.squeeze(-1), row_max.squeeze(-1)
