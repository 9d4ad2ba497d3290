"""Run an attention implementation and the oracle on the same inputs, and compare.

``compare_with_oracle`` is the core property: out, LSE, max scores and every
gradient (q, k, v and learnable tensors a score mod reads) of the system under
test against the float64 truth, each through ``oracle.assert_close`` with the
baseline of an honest emulation in the same dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import oracle

__all__ = ["Run", "run_attention", "compare_with_oracle", "oracle_run", "emulated_run", "delta_allowances",
           "reference_scales", "score_scales", "table_gradient_options"]


@dataclass
class Run:
    """What one implementation produced: tensors by name (out, lse, max, dq, dk, dv, d<buffer>)."""

    tensors: dict


def _learnables(score_mod) -> list:
    if score_mod is None or not hasattr(score_mod, "tensors"):
        return []
    return [t for t in score_mod.tensors() if t.requires_grad]


def run_attention(
    fn: Callable, query, key, value, *, score_mod=None, block_mask=None, scale=None,
    enable_gqa=False, kernel_options=None, grad_out=None, grad_lse=None, want_max=False,
    extra: Optional[dict] = None,
) -> Run:
    """Call ``fn`` with FlexAttention's signature (return_lse=True) and back-propagate
    ``sum(out * grad_out) + sum(lse * grad_lse)`` (finite LSE entries only) when the
    gradients are given."""
    extra = dict(extra or {})
    if want_max:
        extra["return_max"] = True
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                  return_lse=True, **extra)
    if kernel_options is not None:
        kwargs["kernel_options"] = kernel_options
    result = fn(query, key, value, **kwargs)
    out, lse = result[0], result[1]
    tensors = {"out": out, "lse": lse}
    if want_max:
        tensors["max"] = result[2]
    if grad_out is not None:
        inputs = [query, key, value] + _learnables(score_mod)
        finite = torch.isfinite(lse).detach()
        loss = (out * grad_out.to(out.dtype)).sum()
        if grad_lse is not None:
            loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)) * grad_lse.to(lse.dtype)).sum()
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        names = ["dq", "dk", "dv"] + [f"dbuffer{k}" for k in range(len(inputs) - 3)]
        for name, g in zip(names, grads):
            tensors[name] = g if g is not None else torch.zeros_like(inputs[names.index(name)])
    return Run({k: v.detach() for k, v in tensors.items()})


def _leaves(tensors, dtype):
    """Fresh leaves in ``dtype``, so that gradients come back in it (not cast to the inputs' dtype)."""
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


def oracle_run(query, key, value, **kw) -> Run:
    """The float64 truth for the same inputs (gradients in float64)."""
    kw.pop("kernel_options", None)
    q, k, v = _leaves((query, key, value), torch.float64)
    return run_attention(oracle.flex_attention, q, k, v, **kw)


def emulated_run(query, key, value, **kw) -> Run:
    """An honest computation in the inputs' dtype (the error baseline), in float32.
    ``kernel_options`` stay: PRESCALE_QK changes where an honest kernel rounds."""
    extra = {"dtype": query.dtype}
    q, k, v = _leaves((query, key, value), torch.float32 if query.dtype != torch.float64 else torch.float64)
    return run_attention(oracle.emulate_flex_attention, q, k, v, extra=extra, **kw)


def compare_with_oracle(
    fn: Callable, query, key, value, *, score_mod=None, block_mask=None, scale=None,
    enable_gqa=False, kernel_options=None, grad_out=None, grad_lse=None, want_max=False,
    raise_on_failure: bool = True,
):
    """Run ``fn``, the oracle and the emulation; compare every tensor. Returns the
    ``{name: CompareResult}`` mapping (and raises AssertionError on a mismatch by default)."""
    __tracebackhide__ = True
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
              kernel_options=kernel_options, grad_out=grad_out, grad_lse=grad_lse, want_max=want_max)
    actual = run_attention(fn, query, key, value, **kw).tensors
    # Gradients of captured float32 tables come back rounded to float32: a
    # relative 6e-8, far below any kernel's error, so their upcast is the truth.
    expected = {k: v.double() for k, v in oracle_run(query, key, value, **kw).tensors.items()}
    baseline = emulated_run(query, key, value, **kw).tensors
    scales = reference_scales(query, key, value, grad_out, scale, block_mask=block_mask, enable_gqa=enable_gqa)
    allow = forward_allowances(query, key, value, expected["out"], expected["lse"], score_mod=score_mod,
                               block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if grad_out is not None:
        allow.update(delta_allowances(query, key, value, expected["out"], grad_out, score_mod=score_mod,
                                      block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                                      grad_lse=grad_lse, table_grads=table_truths(expected)))
    per_key = {name: {**table_gradient_options(query.dtype), "reference_scale": scales.get("dbuffer"),
                      **({"allowance": allow[name]} if name in allow else {})}
               if name.startswith("dbuffer") else
               {"reference_scale": scales.get(name), **({"allowance": allow[name]} if name in allow else {})}
               for name in actual}
    if raise_on_failure:
        oracle.assert_all_close(actual, expected, baseline, per_key=per_key)
    return {name: oracle.compare(actual[name], expected[name], baseline=baseline[name], name=name,
                                 **per_key.get(name, {}))
            for name in actual}


def reference_scales(query, key, value, grad_out=None, scale=None, *, block_mask=None,
                     enable_gqa=False) -> dict:
    """Typical sizes of the terms summed into each output (``oracle.compare``'s
    ``reference_scale``): they set the float32 accumulation floor of tensors
    whose true values cancel to zero. ``lse`` and ``max`` get a size per row
    (``score_scales``; ``block_mask`` and ``enable_gqa`` as in the call)."""
    def rms(t):
        return float(t.detach().double().pow(2).mean().sqrt()) if t is not None and t.numel() else 0.0

    E, Ev = query.shape[-1], value.shape[-1]
    # A size: a negative scale (allowed, SPEC section 1) must not make the floor negative.
    scale = 1.0 / E ** 0.5 if scale is None else abs(scale)
    dp = rms(grad_out) * rms(value) * Ev ** 0.5  # dO . v, the size of dp - delta's terms
    rows = score_scales(query, key, scale, block_mask=block_mask, enable_gqa=enable_gqa)
    return {"out": rms(value), "dq": scale * dp * rms(key), "dk": scale * dp * rms(query),
            "dv": rms(grad_out), "dbuffer": dp, "lse": rows, "max": rows}


def score_scales(query, key, scale, *, block_mask=None, enable_gqa=False) -> torch.Tensor:
    """Per query row, the size of the terms of its largest raw score: ``|scale| * max_j
    sum_d |q[i, d]| |k[j, d]|`` over the row's listed keys (0 for a row with none).

    A score is a float32 sum of these terms, and a score mod may cancel it to something
    far smaller (ALiBi's ``-slope * |i - j|`` against ``scale * q . k``), so an honest
    kernel's ``max`` and ``lse`` can be an ulp of the terms off where the emulation,
    summing the same exact bf16 products in another order, is exact: the H200's
    false-alarm count (seed 24011, tests/cases/max-score-cancellation-bf16.json) had a
    row whose raw score 337.97 met an ALiBi bias of -338, and its ``max`` of -0.0246 was
    3.05e-5 off, one ulp of 338, against 3.0e-5 allowed (the tensor's typical baseline
    error times 64). ``lse`` moves by ``sum_j p_j err_j``, so the same size bounds it.
    Computed by the oracle's own blocked attention on ``|q|`` and ``|k|`` (its ``max``):
    no L x S tensor."""
    scale = 1.0 / query.shape[-1] ** 0.5 if scale is None else scale
    q = query.detach().double().abs()
    k = key.detach().double().abs()
    v = torch.zeros(*key.shape[:-1], 1, dtype=torch.float64, device=key.device)
    _, _, biggest = oracle.flex_attention(q, k, v, block_mask=block_mask, scale=abs(scale),
                                          enable_gqa=enable_gqa, return_lse=True, return_max=True)
    return torch.where(torch.isfinite(biggest), biggest, 0.0)


def table_truths(expected: dict) -> list:
    """The true gradients of the learnable tables (``dbuffer0``, ``dbuffer1``, ...) of a run."""
    return [expected[f"dbuffer{n}"] for n in range(len(expected)) if f"dbuffer{n}" in expected]


def forward_allowances(query, key, value, out, lse, *, score_mod=None, block_mask=None, scale=None,
                       enable_gqa=False) -> dict:
    """``out``'s error scale from the rounding of the exponent, in float32 (``{}`` otherwise).

    A flash forward takes ``p = exp2(s * log2(e) - m)`` from a float32 score, so each
    ``p[i, j]`` carries a relative error of about ``u * |s[i, j]|`` (the roundings of
    ``s`` and of ``s * log2(e)``; the row's shift ``m`` cancels in ``out = acc / l``),
    which moves ``out[i]`` by ``sum_j p[i, j] * err[i, j] * (V[j] - out[i])``. The
    emulation's ``exp(s - max)`` rounds only the small difference, so where the scores
    are large and far from each other the kernel's error has no counterpart in the
    baseline's (found by the H200 false-alarm count, seed 15007: float32, ALiBi slope
    0.157 over 950 positions, a row with two keys at scores -149.3 and -147.8; the
    kernel's -0.17666854 against the truth's -0.17667107 is what a float64 model of
    its roundings gives, 2.53e-6 against 2.39e-6 allowed, 82 times the baseline's
    error scale). The scale taken is one rounding of the score per probability,
    summed in quadrature over the keys: ``u / sqrt(12) * sqrt(sum_j p**2 s**2 (V[j] -
    out[i])**2)`` (2.75e-6 on that element). It comes from attention with the score
    ``2 * s + 2 * log|s|`` (LSE ``lse'``), whose outputs with V**2 and V, times
    ``exp(lse' - 2 * lse)``, are ``sum_j p**2 s**2 V**2`` and ``sum_j p**2 s**2 V``.
    Only float32 gets it: in bf16 and fp16 the rounding of p to the dtype before the
    product with V, which the baseline makes too, is larger by eps(dtype) / (u * |s|).
    """
    if query.dtype != torch.float32:
        return {}
    u = torch.finfo(torch.float32).eps

    def weighted(score, b, h, i, j):
        s = score_mod(score, b, h, i, j) if score_mod is not None else score
        return 2 * s + 2 * torch.log(s.abs())

    q, k, v = (t.detach().double() for t in (query, key, value))
    Ev = v.shape[-1]
    sums, lse_w = oracle.flex_attention(q, k, torch.cat([v * v, v], -1), score_mod=weighted,
                                        block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                                        return_lse=True)
    lse = lse.detach().double()
    ok = torch.isfinite(lse) & torch.isfinite(lse_w)
    ratio = torch.where(ok, torch.exp(torch.where(ok, lse_w - 2 * lse, 0.0)), 0.0).unsqueeze(-1)
    o = out.detach().double()
    # sum_j p'[i, j] = 1 on rows where ratio is not 0, so the (V - out)**2 expansion holds.
    total = ratio * (sums[..., :Ev] - 2 * o * sums[..., Ev:] + o * o)
    return {"out": u / 12 ** 0.5 * total.clamp_min(0).sqrt()}


def delta_allowances(query, key, value, out, grad_out, *, score_mod=None, block_mask=None, scale=None,
                     enable_gqa=False, grad_lse=None, table_grads=None) -> dict:
    """Error scales of dq and dk from the rounding of ``delta = rowsum(dO * O)``.

    A kernel stores ``O`` in the inputs' dtype and computes ``delta`` from it in
    float32; the rounding error ``d_i`` (standard deviation about
    ``eps / sqrt(12) * ||dO_i * O_i||`` for the stored O, the same again with
    float32's eps times ``sqrt(Ev)`` for the sum) shifts every ``ds[i, j]`` of
    row i by ``-p[i, j] * f'[i, j] * d_i`` (``f'`` the score mod's derivative,
    1 without one). So dq[i] moves by ``d_i * scale * sum_j p[i, j] f'[i, j] K[j]``,
    which is ``d_i`` times the gradient of ``lse[i]`` in ``Q[i]``, and dk[j] by at most
    ``scale * sum_i p[i, j] d_i |Q[i]|`` (``|f'| <= 1`` for the mods here): coherent errors,
    which the score gradient's own cancellation (``sum_j ds[i, j] = 0``) does not
    average away in rows with few keys. The emulation makes this error too, with
    its own rounding; where its ``d_i`` happens to be tiny it sets no tolerance
    (measured on the H200 at S=4096: dq of the second query row of a causal mask
    at 1.2 to 1.5 times the allowance for ours, torch.compile, FlashAttention and
    cuDNN alike; on the CPU: dk of a one-key row exactly 0 in the truth and
    4e-7 in float32). The same function also gives dv's scale for the rounding of P
    before the dV product and, in float32, for the rounding of the exponent from which
    a backward recomputes P (``_exponent_allowance`` for dv, ``_exponent_ds_allowance``
    for dq and dk; ``grad_lse`` enters delta there), and in bf16 and fp16 dq's and dk's
    scale for the rounding of ``ds`` before its products (``_ds_rounding_allowance``).
    dq's scale keeps ``f'``: an element where ``sum_j p K`` cancels need not cancel
    under a saturating softcap, whose ``f'`` weighs the keys unevenly (the H200's
    fuzz of the Gluon probes, seed 21006: bf16, v mean 16, ``tanh_softcap(0.5)``
    at scale 2; dq at 1.1 times an allowance of 0.0048 taken from ``|sum_j p K|``,
    where the gradient of the LSE gives 0.045; ours' largest dq error on that case
    was as large, 0.159, elsewhere in the tensor). dk's bound needs no ``f'``.
    Returns ``{"dq", "dk", "dv"}`` in float64, shaped as q, k and v, and ``"dbuffer{n}"``
    for each learnable table of the score mod (``_table_delta_allowances``), and with
    ``table_grads`` (their true gradients) also the float32 accumulation of each entry's
    terms (``_table_accumulation_allowances``), in quadrature.
    """
    eps = torch.finfo(query.dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    Ev = value.shape[-1]
    prod = (grad_out.double() * out.double()).pow(2).sum(-1).sqrt()
    d = (eps + eps32 * Ev ** 0.5) / 12 ** 0.5 * prod  # [B, Hq, L]
    size = 1.0 / query.shape[-1] ** 0.5 if scale is None else abs(scale)
    q = query.detach().double()
    k = key.detach().double()
    # Attention with V := K gives sum_j p[i, j] K[j]; its value gradient under dO := d_i |Q[i]|
    # gives sum_i p[i, j] d_i |Q[i]| (summed over a GQA group and a broadcast batch).
    kv = k.clone().requires_grad_(True)
    vv = value.detach().double().requires_grad_(True)
    qv = q.clone().requires_grad_(True)
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    with torch.enable_grad():
        mean_key, lse_q = oracle.flex_attention(qv, k, kv, return_lse=True, **kw)
        (grad_q,) = torch.autograd.grad(lse_q, qv, d, retain_graph=True)
        (grad_k,) = torch.autograd.grad(mean_key, kv, d.unsqueeze(-1) * q.abs())
        # dV = P^T dO with P rounded to the dtype first, as normalised probabilities (the
        # emulation rounds the unnormalised weights): per-term errors of eps / sqrt(12) * p dO,
        # whose root sum of squares is at most eps / sqrt(12) * sqrt(P^T dO^2) since p <= 1.
        # Measured on the CPU: fp16, E=1, L=S=128, one dv element at 1.17 times the allowance.
        out2, lse = oracle.flex_attention(q, k, vv, return_lse=True, **kw)
        do2 = grad_out.detach().double().pow(2)
        (grad_v,) = torch.autograd.grad(out2, vv, do2)
    dv = eps / 12 ** 0.5 * grad_v.clamp_min(0).sqrt()
    # A row with nothing allowed has lse = -inf and no gradient: no dq to err.
    dq = torch.nan_to_num(grad_q, nan=0.0, posinf=0.0, neginf=0.0).abs()
    dk = size * grad_k.abs()
    tables = _table_delta_allowances(q, k, vv.detach(), d, lse.detach(), **kw)
    if table_grads and tables:
        acc = _table_accumulation_allowances(q, k, value, grad_out, out, grad_lse, lse.detach(), table_grads, **kw)
        tables = {name: torch.sqrt(t.pow(2) + acc[name].pow(2)) if name in acc else t for name, t in tables.items()}
    if query.dtype == torch.float32:
        lse = lse.detach()
        dv = torch.sqrt(dv.pow(2) + _exponent_allowance(q, k, value, do2, lse, **kw).pow(2))
        eq, ek = _exponent_ds_allowance(q, k, value, grad_out, out, grad_lse, lse, size, **kw)
        dq, dk = torch.sqrt(dq.pow(2) + eq.pow(2)), torch.sqrt(dk.pow(2) + ek.pow(2))
    elif query.dtype in (torch.float16, torch.bfloat16):
        eq, ek = _ds_rounding_allowance(q, k, value, grad_out, out, grad_lse, lse.detach(), size, eps, **kw)
        dq, dk = torch.sqrt(dq.pow(2) + eq.pow(2)), torch.sqrt(dk.pow(2) + ek.pow(2))
    return {"dq": dq, "dk": dk, "dv": dv, **tables}


def _exponent_allowance(q, k, value, do2, lse, *, score_mod, block_mask, scale, enable_gqa):
    """dv's error scale from the rounding of the exponent ``s - lse`` of a recomputed P.

    A flash backward recomputes ``p = exp(s - lse)`` from a score recomputed in
    float32 (another accumulation order than the forward's, in base 2 after a
    multiplication by log2(e)) and the stored float32 LSE, so ``p`` carries a
    relative error of a few ``u * (|s| + |lse|)``: with input std 4 the scores reach
    80, and ``u * 160`` is 2e-5. dV sums these errors over the queries without the
    cancellation that dq and dk have (``sum_j ds[i, j] = 0``). The emulation makes
    them too, with its own luck, and in a row with one allowed key it has none at
    all: its ``p`` is ``exp(s - s) = 1`` exactly, where a kernel's is not (measured on
    the H200 and the CPU: float32, input std 4, a 2 % random mask, most rows with
    one key; dv at 1.21 and 1.26 times the allowance, 80 and 84 times the baseline's
    error scale, on elements that sum about 24 one-key rows with |s| up to 80).
    The scale taken is one rounding of each operand, ``u / sqrt(12) * (|s| + |lse|)``
    per probability, summed in quadrature over the queries:
    ``sqrt(sum_i p[i, j]**2 * (|s[i, j]| + |lse[i]|)**2 * dO[i]**2) * u / sqrt(12)``.
    It is the value gradient, under ``dO**2 * exp(lse' - 2 * lse)``, of attention
    with the score ``2 * s + 2 * log(|s| + |lse|)`` (whose LSE is ``lse'``). Only
    float32 gets it: in bf16 and fp16 the rounding of p to the dtype, already in dv's
    allowance, is larger by eps(dtype) / (u * (|s| + |lse|)), some 400 (bf16) or 50 (fp16)
    at the largest scores the fuzzer draws.
    """
    u = torch.finfo(torch.float32).eps
    finite = torch.isfinite(lse)
    size = torch.where(finite, lse.abs(), torch.zeros_like(lse))

    def weighted(score, b, h, i, j):
        s = score_mod(score, b, h, i, j) if score_mod is not None else score
        return 2 * s + 2 * torch.log(s.abs() + size[b, h, i])

    vv = value.detach().double().requires_grad_(True)
    with torch.enable_grad():
        out, lse_w = oracle.flex_attention(q, k, vv, score_mod=weighted, block_mask=block_mask, scale=scale,
                                           enable_gqa=enable_gqa, return_lse=True)
        ok = finite & torch.isfinite(lse_w)
        ratio = torch.where(ok, torch.exp(torch.where(ok, lse_w - 2 * lse, 0.0)), 0.0)
        (grad,) = torch.autograd.grad(out, vv, do2 * ratio.unsqueeze(-1))
    return u / 12 ** 0.5 * grad.clamp_min(0).sqrt()


def _table_delta_allowances(q, k, v, d, lse, *, score_mod, block_mask, scale, enable_gqa) -> dict:
    """The learnable tables' error scales from the same rounding of delta.

    Each ``ds[b, h, i, j]`` carries ``-p[b, h, i, j] * d_i``, and a table entry sums the
    ``ds`` of every (b, h, i, j) that reads it; the rows' errors are independent, so in
    quadrature: ``sqrt(sum p**2 d**2 dmod/dT)``. That sum is the table gradient of
    ``sum lse' * w`` with the weight ``w = d**2 exp(lse' - 2 lse) / 2`` held constant,
    where ``lse'`` is the LSE under the score ``2 * score_mod(s)`` (``d lse' / d s' =
    p**2 exp(2 lse - lse')``). For a bias ``dmod/dT`` is 1; for a table whose derivative
    changes sign (ALiBi slopes) the sum can cancel, and is clamped at 0 (an allowance
    never narrows a tolerance). ``table_gradient_options`` doubled the factor for this
    error before it was modelled; the doubling stays. Measured on the H200: bf16, a
    bias_qk table shared by 9 heads, E = Ev = 1, input std 2, scale 1, no mask; one
    entry at 1.85 times the doubled tolerance, error 0.0109 at -0.0365, where the
    rounding of the true O to bf16 gives 0.0109 through delta (one row with p = 0.998,
    |dO O| = 4.6) and this scale is 0.0103; the emulation's error there was 3.3e-4.
    """
    tables = _learnables(score_mod)
    if not tables:
        return {}

    def doubled(score, b, h, i, j):
        return 2 * score_mod(score, b, h, i, j)

    with torch.enable_grad():
        _, lse2 = oracle.flex_attention(q, k, v, score_mod=doubled, block_mask=block_mask, scale=scale,
                                        enable_gqa=enable_gqa, return_lse=True)
        fixed, lse, d = lse2.detach(), lse.detach(), d.detach()  # the weight is held constant
        ok = torch.isfinite(lse) & torch.isfinite(fixed)
        weight = torch.where(ok, d.pow(2) * torch.exp(torch.where(ok, fixed - 2 * lse, 0.0)), 0.0) / 2
        grads = torch.autograd.grad((torch.where(ok, lse2, 0.0) * weight).sum(), tables, allow_unused=True)
    return {f"dbuffer{n}": (g.double().clamp_min(0).sqrt() if g is not None
                            else torch.zeros(t.shape, dtype=torch.float64, device=t.device))
            for n, (t, g) in enumerate(zip(tables, grads))}


def _dp_minus_delta(grad_out, out, grad_lse, value, query_heads: int):
    """``g(b, h, i, j) = dO[b, h, i] . V[j] - delta[b, h, i]`` in float64 (``ds = p * g``), for
    use inside an oracle score mod; ``delta = rowsum(dO * O) - grad_lse``, V read as the kernels
    read it (a broadcast batch, the GQA group's head)."""
    do = grad_out.detach().double()
    delta = (do * out.detach().double()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.detach().double()
    v = value.detach().double()
    Bk, group = v.shape[0], query_heads // v.shape[1]

    def g(b, h, i, j):
        return torch.einsum("...e,...e->...", do[b, h, i], v[b % Bk, h // group, j]) - delta[b, h, i]
    return g


def _table_accumulation_allowances(q, k, value, grad_out, out, grad_lse, lse, table_grads, *, score_mod,
                                   block_mask, scale, enable_gqa) -> dict:
    """The learnable tables' error scales from the float32 accumulation of their terms.

    A kernel adds each ``x = ds[b, h, i, j] * dmod/dT`` into its table entry in float32, one
    atomic add at a time, in an order that changes from run to run; an entry that n terms
    read (a relative-position bucket: most of the B * L * S pairs of a head) rounds n times.
    Each rounding is ``u / sqrt(12)`` times the partial sum, so the error is
    ``u / sqrt(12) * sqrt(sum_k P_k**2)``; for terms in random order the partial sums ``P_k``
    are a bridge from 0 to the sum S with steps of ``sum x**2 / n`` variance, which gives
    ``u / sqrt(12) * sqrt(n / 3 * S**2 + n / 6 * sum x**2)``. Measured on the H200 (float32
    relative_position tables, 240 000 to 1 000 000 terms an entry, eight runs of each): the
    kernels' errors 1e-5 to 1.35e-3, run-to-run standard deviations 8e-5 to 5e-4, against
    this scale 2.3e-4 to 5.2e-4 (up to 2.6 times it, inside the tables' factor of 128), while
    the emulation's errors there were 4e-7 (it sums in another order, mostly pairwise); the
    same sums in sequential float32 on the CPU err 1e-4 to 7e-4 (docs/FAULTS.md).

    n and ``sum x**2`` come from the oracle: n is the table gradient of ``sum_i n_i lse'_i``
    under the score ``mod - mod.detach()`` (zero everywhere, so ``lse'_i = log n_i``, with the
    table's derivative); ``sum ds**2 dmod/dT`` that of ``sum_i lse''_i exp(lse''_i - 2 lse_i)``
    under the score ``2 mod + 2 log|dp - delta|`` plus the same zero with the derivative
    (weights held constant). Both are exact for tables whose derivative is 0 or 1 (biases,
    relative positions); for others (ALiBi slopes) they are sums of the derivative, clamped
    at 0 and 1. S is the true gradient (``table_grads``).
    """
    tables = _learnables(score_mod)
    if not tables:
        return {}
    u = torch.finfo(torch.float32).eps
    g = _dp_minus_delta(grad_out, out, grad_lse, value, q.shape[1])
    v = value.detach().double()
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)

    def counted(score, b, h, i, j):
        y = score_mod(score, b, h, i, j)
        return y - y.detach()

    def squared(score, b, h, i, j):
        y = score_mod(score, b, h, i, j)
        return 2 * y.detach() + 2 * torch.log(g(b, h, i, j).abs()) + (y - y.detach())

    with torch.enable_grad():
        _, lse_c = oracle.flex_attention(q, k, v, score_mod=counted, **kw)
        ok = torch.isfinite(lse_c)
        n_i = torch.where(ok, torch.exp(torch.where(ok, lse_c, 0.0)), 0.0).detach()
        counts = torch.autograd.grad((torch.where(ok, lse_c, 0.0) * n_i).sum(), tables, allow_unused=True)
        _, lse_s = oracle.flex_attention(q, k, v, score_mod=squared, **kw)
        ok = torch.isfinite(lse_s) & torch.isfinite(lse)
        w = torch.where(ok, torch.exp(torch.where(ok, lse_s - 2 * lse, 0.0)), 0.0).detach()
        squares = torch.autograd.grad((torch.where(ok, lse_s, 0.0) * w).sum(), tables, allow_unused=True)
    result = {}
    for n, (t, c, sq, truth) in enumerate(zip(tables, counts, squares, table_grads)):
        if c is None or sq is None:
            continue
        count = c.double().clamp_min(1.0)
        total = truth.detach().double().to(count.device).reshape(count.shape)
        result[f"dbuffer{n}"] = u / 12 ** 0.5 * torch.sqrt(count / 3 * total.pow(2) + count / 6 * sq.double().clamp_min(0))
    return result


def _exponent_ds_allowance(q, k, value, grad_out, out, grad_lse, lse, size, *, score_mod, block_mask,
                           scale, enable_gqa):
    """dq's and dk's error scales from the same rounding of the exponent (``_exponent_allowance``).

    The relative error ``r[i, j]`` of a recomputed ``p`` moves ``ds[i, j] = p (dp - delta)``
    by ``r * ds``, so dq[i] by ``scale * sum_j r ds[i, j] K[j]`` and dk[j] by ``scale *
    sum_i r ds[i, j] Q[i]``. The true dq and dk can be far smaller than these terms
    (``sum_j ds[i, j] = 0``: in a row dominated by a few keys, dq is a covariance of K
    and dp that cancels), so the errors are not small next to them, and the emulation,
    whose dominant ``p`` is ``exp(s - s) = 1`` exactly, does not make them (measured on
    the H200: float32, E = Ev = 1, input std 4, scale 1, no mask, GQA 16 / 2, L=240, S=43;
    dq at 1.7 times the allowance, error 2.5e-4 at 0.44, 110 times the baseline's error
    scale). The scale taken, as for dv, is one rounding of each operand of the exponent:
    ``scale * u / sqrt(12) * sqrt(sum_j ds[i, j]**2 (|s| + |lse[i]|)**2 K[j]**2)``, and the
    same over i with Q[i] for dk (``_ds_weighted_sums``).
    """
    u = torch.finfo(torch.float32).eps
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    sq, sk = _ds_weighted_sums(q, k, value, grad_out, out, grad_lse, lse, exponent=True, **kw)
    c = u / 12 ** 0.5 * size
    return c * sq, c * sk


def _ds_rounding_allowance(q, k, value, grad_out, out, grad_lse, lse, size, eps, *, score_mod, block_mask,
                           scale, enable_gqa):
    """dq's and dk's error scales from rounding ``ds`` to the inputs' dtype before the products
    ``dS @ K`` and ``dS^T @ Q`` (bf16 and fp16).

    Each term of ``dq[i] = scale * sum_j ds[i, j] K[j]`` carries the rounding of its
    ``ds[i, j]``, at most half an ulp, some ``eps / 2 * |ds|``; where two keys dominate a
    row, their ``ds`` are large and nearly opposite (``sum_j ds[i, j] = 0``), and the true
    dq, a covariance that cancels, is far smaller than the terms' rounding. The emulation
    rounds ``ds`` too, with its own luck, and its error on such an element can be ten
    times smaller than a kernel's: measured on the H200 (seed 11008 of the false-alarm
    count, bf16, scale 1, a causal row of 15 keys with ds = +2.587 and -2.554 on keys of
    2.75 and 2.91), dq at 1.04 times the allowance: -0.2969 against -0.3386 true and
    -0.3398 for the emulation, and a float64 model of the kernel's roundings (q k^T, P,
    ``ds`` to bf16) gives -0.2970 with or without PRESCALE_QK, so the kernel is honest.
    The scale taken is one rounding of each ``ds``, uniform over an ulp:
    ``scale * eps / sqrt(12) * sqrt(sum_j ds[i, j]**2 K[j]**2)`` (0.023 on that element,
    whose error 0.042 is 1.8 times it), and the same over i with Q[i] for dk.
    """
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    sq, sk = _ds_weighted_sums(q, k, value, grad_out, out, grad_lse, lse, exponent=False, **kw)
    c = eps / 12 ** 0.5 * size
    return c * sq, c * sk


def _ds_weighted_sums(q, k, value, grad_out, out, grad_lse, lse, *, exponent: bool, score_mod, block_mask,
                      scale, enable_gqa):
    """``sqrt(sum_j ds[i, j]**2 w[i, j]**2 K[j]**2)`` (shaped as q) and ``sqrt(sum_i ds[i, j]**2
    w[i, j]**2 Q[i]**2)`` (shaped as k, summed over a GQA group and a broadcast batch), with
    ``w = |s| + |lse[i]|`` when ``exponent``, else 1, and ``ds = p (dO[i] . V[j] - delta[i])``,
    ``delta = rowsum(dO * O) - dlse``. It is attention under the score ``2 s + 2 log w + 2 log|dp -
    delta|`` (``dp`` gathered in the score mod; its LSE is ``lse'``) with the value ``K**2``:
    the output times ``exp(lse' - 2 lse)`` gives the first sum, the value gradient under
    ``Q**2 exp(lse' - 2 lse)`` the second. Memory stays O(S), as the oracle's."""
    finite = torch.isfinite(lse)
    size_lse = torch.where(finite, lse.abs(), torch.zeros_like(lse))
    g = _dp_minus_delta(grad_out, out, grad_lse, value, q.shape[1])

    def weighted(score, b, h, i, j):
        s = score_mod(score, b, h, i, j) if score_mod is not None else score
        w = 2 * s + 2 * torch.log(g(b, h, i, j).abs())
        return w + 2 * torch.log(s.abs() + size_lse[b, h, i]) if exponent else w

    kk = k.pow(2).requires_grad_(True)
    with torch.enable_grad():
        out_w, lse_w = oracle.flex_attention(q, k, kk, score_mod=weighted, block_mask=block_mask, scale=scale,
                                             enable_gqa=enable_gqa, return_lse=True)
        ok = finite & torch.isfinite(lse_w)
        ratio = torch.where(ok, torch.exp(torch.where(ok, lse_w - 2 * lse, 0.0)), 0.0).unsqueeze(-1)
        (grad,) = torch.autograd.grad(out_w, kk, q.pow(2) * ratio)
    return (out_w.detach() * ratio).clamp_min(0).sqrt(), grad.clamp_min(0).sqrt()


def table_gradient_options(input_dtype) -> dict:
    """How the gradient of a captured table (a learnable bias) is judged.

    It is a float32 sum of products of the inputs' dtype, so the inputs'
    precision applies, not float32's. And it is ``p * (dp - delta)`` element by
    element, with no averaging: the rounding error of ``delta = rowsum(dO * O)``
    (O as stored, in the inputs' dtype; standard deviation about
    ``eps / 2 / sqrt(3) * ||dO * O||``) enters a whole query row with one
    value, and where ``dp - delta`` cancels it dominates. The emulation makes
    the same kind of error with its own rounding, and a row where it happens to
    be tiny leaves no tolerance. Measured on the H100: bf16, 8 x 1024 x 1024
    causal bias table, 2 of 8.4 million elements at 1.5 times the default
    allowance (error 0.0032 at 0.082, p about 0.5, delta error about 0.006
    as estimated above). Twice the default factor covers it with margin.
    """
    factor = oracle.TOLERANCES[input_dtype].factor if input_dtype in oracle.TOLERANCES else None
    return {"precision": input_dtype, **({"factor": 2 * factor} if factor else {})}
