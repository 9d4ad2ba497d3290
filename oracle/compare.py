"""Decide whether a low-precision result agrees with the float64 truth.

The allowed error of every element comes from what an honest implementation
in the same dtype makes, measured rather than guessed (SPEC section 7):

    tol = factor * err_scale + floor

* ``baseline`` is the same quantity from an honest emulation in the low
  precision (inputs rounded to the dtype, float32 accumulation, probabilities
  rounded to the dtype before the product with V). It is first rounded to the
  dtype of ``actual``, because an honest kernel stores its result in that
  dtype; ``e = |baseline - expected|`` is then its error, element by element.
* ``err_scale = max(e, row_rms(e), spread * max(tensor_rms(e), rel * |expected|))``
  with ``rel = tensor_rms(e) / tensor_rms(expected)``. The element's
  own term keeps elements that are hard for everyone (cancellation) generous.
  The row term covers an element where the baseline is exactly right by luck.
  The tensor term covers a row where the baseline is right by luck: the
  elements of a row are not independent samples (a row of ``out`` dominated
  by two keys has one error, the difference of two scores, times a fixed
  vector), an LSE element is a row of its own, and a head dim of 1 or 2 is
  common in fuzzing. The relative term does the same for large elements of
  a tensor whose entries span orders of magnitude and whose rows share one
  error: the gradient of a bias table, ``p * (dp - delta)``, carries the
  rounding of ``delta = rowsum(dO * O)`` along a whole row (seen on the H100:
  a bf16 bias gradient 4 % off at an element of 0.08 where the baseline's row
  happened to be right to 0.1 %, in a table mostly of zeros).
* ``floor = atol * eps(dtype) * max(row_rms(expected), |expected|)``. It
  matters where the baseline is exact everywhere (a row with one allowed key,
  a tensor of exactly representable values) and a correct kernel may still
  differ by an ulp or two, and where the baseline's unrounded value lands
  near a representable number while an honest kernel's lands past the
  midpoint: the stored results then differ by one ulp of the element itself,
  which may be several times the row's RMS.

Rows are the last dimension of tensors of rank 4 and above (``out[b, h, i, :]``,
``dk[b, h, j, :]``) and single elements for rank 3 and below (``lse[b, h, i]``);
``rows_dim`` says otherwise. The factor is applied once, to ``err_scale``.
Every statistic is taken over the positions where ``expected`` is finite (NaN
and +-inf positions must match exactly and are checked first). A fully masked
row (expected exactly 0) has no floor and only the tensor term, so a kernel
must write zeros, or something far below the typical error, there.

Constants (``TOLERANCES``, keyed by the dtype of ``actual``)
-------------------------------------------------------------
``factor``: how much larger than the baseline's error an honest kernel's error
may be. Honest kernels differ from the baseline in accumulation order (online
softmax over blocks of 16..128 keys, visited in either order), in ``exp2`` of
log2(e)-scaled scores instead of ``exp``, in PRESCALE_QK and TF32 (when the
baseline emulates them too). The needed factor, ``max (|actual - expected| -
floor) / err_scale`` over a case, was measured

* on CPU, for the flash-style emulations of tests/test_compare.py over 1000
  random cases per dtype (head dim 1..128, 1..512 keys, input std 0.5..4,
  causal / window / random masks, fully masked rows): ``out`` 3.96 (bf16),
  4.89 (fp16), 27.4 (fp32; 12.6 at the 99th percentile), 6.3 (fp32 with TF32
  in kernel and baseline); ``lse`` at most 2.7 for every dtype;
* on an H100 against PyTorch 2.11's compiled ``flex_attention`` (40 cases
  per dtype, head dim 16..128, up to 2048 keys, same std and masks), with a
  dense emulation of SPEC section 4 for the gradients: bf16 ``out`` / ``lse``
  below 0.5, ``dq`` / ``dk`` 6.1, ``dv`` 0; fp16 the same except one ``dk`` of
  23 (PyTorch rounds its ``delta = rowsum(dO * out)`` to fp16, which the
  emulation does not); fp32 ``out`` 14, gradients 35 when the emulation
  recomputes P from the stored float32 LSE as a flash backward does, 99 when
  it does not (``dv``, input std 4: P of the dominant key is ``1 / l`` in the
  emulation but ``exp2(s2 - lse2)`` with ``|lse2|`` near 100 in the kernel).

bf16 and fp16 get 8 (about twice the worst forward seen); float32 gets 64,
because a float32 kernel's error is dominated by the rounding of large scores
(``u * |s|`` in the exponent) that a natural-``exp`` baseline with a row-max
shift largely avoids, and which grows with the input spread. What the
factors still catch: a row of ``out`` scaled by ``1 + d`` fails for ``d``
above about 1.5 % (bf16), 0.2 % (fp16), 2e-5 (fp32) (B=2, H=4, 256 x 256,
D=64, std 1, median over rows; at most 2.1 %, 0.26 %, 1.9e-5 for 99 % of
rows). float64 gets 8: its baseline is another float64 computation.

``atol`` 2: the floor is two ulps of the row's RMS or of the element,
whichever is larger. Rounding moves a value by at most half an ulp of
itself, so this covers an off-by-one rounding of any element where the
baseline happens to be exact (seen: bf16 ``out`` 2.03125 against a baseline
of 2.046875, one ulp apart, on an element 3.6 times its row's RMS); an
absolute perturbation of a few ulps on an otherwise exact tensor still fails. In bf16 the floor, not the factor, sets most of the sensitivity.

``spread`` 1: the tensor's RMS baseline error is the least any element is
allowed (before the factor). 0.5 was too little for gradients: on the H100
(bf16, causal, B=4, H=16, S=4096, D=128) FlashAttention, cuDNN,
torch.compile(flex_attention) and our kernels all put the same three dq
elements of one row (query 1, two keys) at 1.2 to 1.37 times the allowance:
the row's dq is dominated by the rounding of ``delta = rowsum(dO * O)``
through a cancelling ``dp - delta``, the four share one rounded O and so one
error, and the emulation's own rounding happened to be nearly exact for that
row. With 0.25 the float32 forward needed factors up to 15, with 0.5 up to
8, with 1.0 about 6. In bf16 the floor (2 ulps) is larger than the sensitivity
this costs.

Baselines
---------
The error model is only as good as the baseline. Measured on the H100:

* TF32: when float32 matrix products use TF32 (precision other than
  ``"highest"``, SPEC section 5), the baseline must emulate it, and by
  truncating operands to 10 mantissa bits: Triton's TF32 ``tl.dot`` on the
  H100 truncates. With round-to-nearest emulation the needed factors were
  23..61 (``out``, ``lse``); with truncation 3.9 and 1.0. A TF32 kernel
  against a baseline without TF32 fails, as it should: the comparison cannot
  know which precision was asked for.
* PRESCALE_QK: PyTorch's kernels round ``q * scale * log2(e)`` to the dtype in
  the forward and the dQ pass, and ``k * scale * log2(e)`` in the dK/dV pass;
  an emulation that only prescales q needed factors of 20 (``lse``) to 390
  (``dv``, input std 4) and does not model it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import torch

__all__ = [
    "TOLERANCES",
    "CompareResult",
    "Tolerance",
    "assert_all_close",
    "assert_close",
    "compare",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The constants of the error model for one dtype (see the module docstring)."""

    factor: float
    atol: float
    spread: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.bfloat16: Tolerance(factor=8.0, atol=2.0, spread=1.0),
    torch.float16: Tolerance(factor=8.0, atol=2.0, spread=1.0),
    torch.float32: Tolerance(factor=64.0, atol=2.0, spread=1.0),
    torch.float64: Tolerance(factor=8.0, atol=64.0, spread=1.0),
}

# Index names by rank; gradients of keys and values run over key positions.
_INDEX_NAMES = {3: ("b", "h", "i"), 4: ("b", "h", "i", "d")}
_KEY_SIDE_NAMES = {"dk", "dv", "grad_key", "grad_value"}


@dataclasses.dataclass
class CompareResult:
    """What `compare` found.

    ``worst_*`` describe the element with the largest ``|actual - expected| / tol``
    (or, for a NaN/inf position mismatch, the first mismatched position);
    ``worst_index`` is a named tuple (``index_names``). ``max_ratio`` is that
    largest ratio: at most 1 when ``ok``. ``message`` says what failed, or
    summarises the margin when nothing did.
    """

    ok: bool
    name: str
    mismatches: int
    total: int
    worst_index: tuple[int, ...] | None
    worst_actual: float | None
    worst_expected: float | None
    worst_baseline: float | None
    worst_error: float | None
    worst_allowed: float | None
    max_ratio: float
    message: str
    rows_with_mismatch: int = 0
    rows: int = 0


def compare(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    baseline: torch.Tensor,
    name: str = "out",
    factor: float | None = None,
    atol: float | None = None,
    index_names: Sequence[str] | None = None,
    rows_dim: int | Sequence[int] | None = None,
    precision: torch.dtype | None = None,
    reference_scale: float | torch.Tensor | None = None,
    allowance: torch.Tensor | None = None,
) -> CompareResult:
    """Compare ``actual`` with the float64 truth ``expected``, without raising.

    ``actual`` is the result under test (any floating dtype, any device),
    ``expected`` the float64 truth of the same shape, ``baseline`` the honest
    low-precision emulation of the same quantity (float32 or the low dtype).
    ``factor`` and ``atol`` override the entry of ``TOLERANCES`` for
    ``actual.dtype``. ``rows_dim`` names the dimension(s) that form a row; by
    default the last one for tensors of rank 4 and above (``out[b, h, i, :]``),
    none for rank 3 and below (an LSE ``[b, h, i]`` is a row of one element).
    ``index_names`` label the dimensions in reports; by default ``(b, h, i, d)``
    for rank 4 (``j`` instead of ``i`` for ``dk`` / ``dv``), ``(b, h, i)`` for
    rank 3. Positions where ``expected`` is NaN or +-inf must hold the same
    value in ``actual``; all others are compared by value. ``precision`` is the
    dtype whose constants (``TOLERANCES``, eps) apply, by default
    ``actual.dtype``; a float32 result computed from 16-bit inputs (the
    gradient of a float32 bias table, accumulated from bf16 products) is
    judged by the inputs' dtype. ``reference_scale`` is the typical size of the
    terms that were summed to make each element (for dq: scale * |dO| |V| |K|);
    it adds ``atol * eps(float32) * reference_scale`` to the floor, for tensors
    whose true values cancel to exactly zero (one key per row makes dq and dk
    exactly 0, and float32 accumulation leaves about eps32 of the terms). A
    tensor (broadcastable to ``expected``) gives each element its own size: the
    scores behind ``lse`` and ``max`` (``properties.check.score_scales``).
    ``allowance`` (broadcastable to ``expected``) is an error scale of a rounding
    the baseline makes too but with its own luck, so that where the baseline
    happens to be nearly exact it leaves no room (the rounding of
    ``delta = rowsum(dO * O)`` in dq and dk, ``properties.check.delta_allowances``);
    it joins the baseline's error scale before the factor.
    """
    actual, expected, baseline = (t.detach() for t in (actual, expected, baseline))
    names = _index_names(name, expected.dim(), index_names)
    row_dims = _row_dims(expected.dim(), rows_dim)

    if actual.shape != expected.shape:
        return _failure(
            name, expected.numel(),
            f"{name} ({_dtype_name(actual.dtype)}): shape mismatch: actual {tuple(actual.shape)}, "
            f"expected {tuple(expected.shape)}.",
        )
    if expected.dtype != torch.float64:
        raise ValueError(
            f"Expected `expected` ({name}) to be the float64 truth, got {expected.dtype}; "
            "compute it with the oracle on float64 inputs."
        )
    if baseline.shape != expected.shape:
        raise ValueError(
            f"Expected `baseline` ({name}) to have the shape of `expected` "
            f"{tuple(expected.shape)}, got {tuple(baseline.shape)}."
        )
    if not baseline.dtype.is_floating_point:
        raise ValueError(f"Expected a floating-point `baseline` ({name}), got {baseline.dtype}.")
    for arg, given in (("reference_scale", reference_scale), ("allowance", allowance)):
        if isinstance(given, torch.Tensor) and not _broadcasts_to(given.shape, expected.shape):
            raise ValueError(
                f"Expected `{arg}` ({name}) to broadcast to the shape of `expected` "
                f"{tuple(expected.shape)}, got {tuple(given.shape)}: give one value per element, "
                "per row (a trailing dimension of 1) or a number."
            )
    if not actual.dtype.is_floating_point:
        return _failure(
            name, expected.numel(),
            f"{name}: expected a floating-point result, got {actual.dtype}.",
        )

    dtype = precision or actual.dtype
    tolerance = _tolerance(dtype, factor, atol)
    device = expected.device
    label = f"{name} ({_dtype_name(dtype)})"
    x = expected
    a = actual.to(device=device).to(torch.float64)
    # An honest kernel stores its result in the dtype of `actual`; so does the baseline.
    base = baseline.to(device=device).to(dtype).to(torch.float64)
    total = x.numel()
    rows = total // max(1, _row_size(x.shape, row_dims)) if total else 0

    position = _position_mismatches(a, x, names, label)
    if position is not None:
        bad, text, first = position
        count = int(bad.sum())
        return CompareResult(
            ok=False, name=name, mismatches=count, total=total,
            worst_index=first,
            worst_actual=float(a[tuple(first)]), worst_expected=float(x[tuple(first)]),
            worst_baseline=float(base[tuple(first)]),
            worst_error=None, worst_allowed=None, max_ratio=float("inf"),
            message=text,
            rows_with_mismatch=int(_any_over(bad, row_dims).sum()), rows=rows,
        )

    finite = torch.isfinite(x)
    a = torch.where(finite, a, 0.0)
    x0 = torch.where(finite, x, 0.0)
    e = (base - x0).abs()
    # A baseline that overflowed where the truth is finite sets no tolerance there.
    usable = finite & torch.isfinite(e)
    e = torch.where(usable, e, 0.0)
    row_scale = _rms(e, usable, row_dims)
    tensor_scale = _rms(e, usable, tuple(range(e.dim())))
    # The tensor's typical relative error, applied to the element's own size.
    relative = tensor_scale / _rms(x0, usable, tuple(range(e.dim()))).clamp_min(torch.finfo(torch.float64).tiny)
    err_scale = torch.maximum(
        torch.maximum(e, row_scale),
        tolerance.spread * torch.maximum(tensor_scale, relative * x0.abs()),
    )
    if allowance is not None:
        err_scale = torch.maximum(err_scale, allowance.detach().to(device=device, dtype=torch.float64).abs())
    # The larger of the row's RMS and the element itself: the final rounding to
    # the dtype can land an honest result one ulp of the element away.
    magnitude = torch.maximum(_rms(x0, finite, row_dims).expand_as(x0), x0.abs())
    eps = torch.finfo(dtype).eps
    digits = 17 if dtype == torch.float64 else 9  # enough to tell actual, expected and baseline apart
    floor = tolerance.atol * eps * magnitude
    eps32 = torch.finfo(torch.float32).eps
    terms = None  # the size of the summed terms behind each element, where one is given
    if isinstance(reference_scale, torch.Tensor):
        ref = reference_scale.detach().to(device=device, dtype=torch.float64).abs()
        terms = torch.where(finite, ref, 0.0).expand_as(x0)
    elif reference_scale:
        terms = torch.full_like(x0, abs(float(reference_scale)))
    if terms is not None:
        floor = floor + tolerance.atol * eps32 * terms
    tol = tolerance.factor * err_scale + floor
    err = (a - x0).abs()
    bad = err > tol
    ratio = torch.where(err == 0, 0.0, err / tol)  # err / 0 -> inf for err > 0

    if total == 0:
        return CompareResult(
            ok=True, name=name, mismatches=0, total=0, worst_index=None,
            worst_actual=None, worst_expected=None, worst_baseline=None,
            worst_error=None, worst_allowed=None, max_ratio=0.0,
            message=f"{label}: empty.", rows=0,
        )

    flat = int(ratio.flatten().argmax())
    worst = _index(flat, x.shape, names)
    at = tuple(worst)
    count = int(bad.sum())
    max_ratio = float(ratio.flatten()[flat])
    values = dict(
        worst_actual=float(a[at]), worst_expected=float(x0[at]),
        worst_baseline=float(base[at]), worst_error=float(err[at]),
        worst_allowed=float(tol[at]),
    )
    rows_bad = int(_any_over(bad, row_dims).sum())
    where = _format_index(worst)
    if count == 0:
        message = (
            f"{label}: all {total} elements within tolerance; largest error/allowed "
            f"{max_ratio:.3g} at {where}."
        )
    else:
        message = (
            f"{label}: {count} of {total} elements ({100.0 * count / total:.3g}%) "
            f"outside tolerance, in {rows_bad} of {rows} rows.\n"
            f"  Worst at {where}: actual {values['worst_actual']:.{digits}g}, "
            f"expected {values['worst_expected']:.{digits}g}, "
            f"baseline {values['worst_baseline']:.{digits}g}; "
            f"error {values['worst_error']:.3g} > allowed {values['worst_allowed']:.3g} "
            f"({max_ratio:.3g} times).\n"
            f"  Allowed = factor {tolerance.factor:g} * baseline error scale "
            f"{float(err_scale[at]):.3g} + floor {float(floor[at]):.3g} "
            f"(atol {tolerance.atol:g} * eps {eps:.3g} * magnitude {float(magnitude[at]):.3g}"
            + (f" + atol * eps32 {eps32:.3g} * terms {float(terms[at]):.3g}" if terms is not None else "")
            + ")."
        )
    return CompareResult(
        ok=count == 0, name=name, mismatches=count, total=total, worst_index=worst,
        max_ratio=max_ratio, message=message, rows_with_mismatch=rows_bad, rows=rows,
        **values,
    )


def _broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing it."""
    if len(shape) > len(target):
        return False
    return all(n in (1, t) for n, t in zip(reversed(shape), reversed(target)))


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    baseline: torch.Tensor,
    name: str = "out",
    factor: float | None = None,
    atol: float | None = None,
    index_names: Sequence[str] | None = None,
    rows_dim: int | Sequence[int] | None = None,
    precision: torch.dtype | None = None,
    reference_scale: float | torch.Tensor | None = None,
) -> None:
    """Raise ``AssertionError`` unless ``actual`` agrees with ``expected``; see `compare`."""
    __tracebackhide__ = True
    result = compare(
        actual, expected, baseline=baseline, name=name, factor=factor, atol=atol,
        index_names=index_names, rows_dim=rows_dim, precision=precision,
        reference_scale=reference_scale,
    )
    if not result.ok:
        raise AssertionError(result.message)


def assert_all_close(
    actual: Mapping[str, torch.Tensor | None],
    expected: Mapping[str, torch.Tensor | None],
    baseline: Mapping[str, torch.Tensor | None],
    *,
    per_key: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> None:
    """Check every tensor of ``expected`` (``out``, ``lse``, ``dq``, ...) and report all failures at once.

    The keys of ``actual`` and ``expected`` must agree; a key whose value is
    ``None`` in both (a gradient that was not asked for) is skipped.
    ``options`` (``factor``, ``atol``, ``precision``) apply to every tensor;
    ``per_key`` overrides them for some keys (``{"dbuffer0": {"factor": 16}}``).
    """
    __tracebackhide__ = True
    failures = []
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing:
        failures.append(f"actual lacks {', '.join(missing)}.")
    if extra:
        failures.append(f"actual has {', '.join(extra)}, which expected lacks.")
    for key, truth in expected.items():
        if key in missing:
            continue
        got = actual[key]
        if truth is None or got is None:
            if truth is not got:
                which = "actual" if got is None else "expected"
                failures.append(f"{key}: {which} is None and the other is not.")
            continue
        if baseline.get(key) is None:
            raise ValueError(f"Expected a baseline for {key!r}; got keys {sorted(baseline)}.")
        result = compare(got, truth, baseline=baseline[key], name=key,
                         **{**options, **(per_key or {}).get(key, {})})
        if not result.ok:
            failures.append(result.message)
    if failures:
        raise AssertionError(f"{len(failures)} tensor(s) failed:\n" + "\n".join(failures))


# --- helpers -----------------------------------------------------------------


def _tolerance(dtype: torch.dtype, factor: float | None, atol: float | None) -> Tolerance:
    entry = TOLERANCES.get(dtype)
    if entry is None:
        if factor is None or atol is None:
            raise ValueError(
                f"No tolerance for {dtype}; pass factor= and atol=, or add {dtype} to "
                f"oracle.compare.TOLERANCES (has {sorted(map(str, TOLERANCES))})."
            )
        entry = Tolerance(factor=factor, atol=atol, spread=1.0)
    return dataclasses.replace(
        entry,
        factor=entry.factor if factor is None else float(factor),
        atol=entry.atol if atol is None else float(atol),
    )


def _row_dims(ndim: int, rows_dim: int | Sequence[int] | None) -> tuple[int, ...]:
    if rows_dim is None:
        return (ndim - 1,) if ndim >= 4 else ()
    dims = (rows_dim,) if isinstance(rows_dim, int) else tuple(rows_dim)
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"Expected rows_dim within [-{ndim}, {ndim}) for rank {ndim}, got {rows_dim}.")
        out.append(d % ndim)
    return tuple(sorted(set(out)))


def _row_size(shape: torch.Size, row_dims: tuple[int, ...]) -> int:
    size = 1
    for d in row_dims:
        size *= shape[d]
    return size


def _sum_rows(t: torch.Tensor, row_dims: tuple[int, ...]) -> torch.Tensor:
    # sum over an empty dim list reduces everything in torch; a row of one is the element.
    return t.sum(dim=row_dims, keepdim=True) if row_dims else t


def _any_over(t: torch.Tensor, row_dims: tuple[int, ...]) -> torch.Tensor:
    return _sum_rows(t.to(torch.int64), row_dims) > 0


def _rms(v: torch.Tensor, valid: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Root mean square of ``v`` over ``dims`` (kept), counting only ``valid`` positions."""
    sq = torch.where(valid, v * v, 0.0)
    count = _sum_rows(valid.to(torch.float64), dims).clamp(min=1.0)
    return (_sum_rows(sq, dims) / count).sqrt()


def _position_mismatches(
    a: torch.Tensor, x: torch.Tensor, names: tuple[str, ...], label: str
) -> tuple[torch.Tensor, str, tuple[int, ...]] | None:
    """Where NaN and +-inf positions of ``a`` and ``x`` differ, and a report."""
    kinds = (
        ("NaN", torch.isnan),
        ("+inf", lambda t: torch.isposinf(t)),
        ("-inf", lambda t: torch.isneginf(t)),
    )
    bad = torch.zeros_like(x, dtype=torch.bool)
    lines = []
    first = None
    for word, test in kinds:
        in_a, in_x = test(a), test(x)
        for owner, other, only, values in (
            ("actual", "expected", in_a & ~in_x, x),
            ("expected", "actual", in_x & ~in_a, a),
        ):
            n = int(only.sum())
            if n == 0:
                continue
            where = _index(int(only.flatten().to(torch.uint8).argmax()), x.shape, names)
            if first is None:
                first = where
            there = values[tuple(where)]
            state = _describe(values[only])
            lines.append(
                f"  {owner} has {word} at {n} position{'s' if n != 1 else ''} where {other} is {state}; "
                f"first at {_format_index(where)} ({other} {float(there):.9g})."
            )
            bad |= only
    if not lines:
        return None
    count = int(bad.sum())
    share = 100.0 * count / x.numel()
    head = f"{label}: NaN/inf positions differ at {count} of {x.numel()} elements ({share:.3g}%):"
    return bad, "\n".join([head, *lines]), first


def _describe(values: torch.Tensor) -> str:
    if bool(torch.isfinite(values).all()):
        return "finite"
    if bool(torch.isnan(values).all()):
        return "NaN"
    if bool(torch.isposinf(values).all()):
        return "+inf"
    if bool(torch.isneginf(values).all()):
        return "-inf"
    return "something else"


@functools.lru_cache(maxsize=None)
def _index_type(names: tuple[str, ...]) -> type:
    return collections.namedtuple("Index", names)


def _index_names(name: str, ndim: int, index_names: Sequence[str] | None) -> tuple[str, ...]:
    if index_names is None:
        names = _INDEX_NAMES.get(ndim, tuple(f"dim{k}" for k in range(ndim)))
        if ndim == 4 and name in _KEY_SIDE_NAMES:
            names = ("b", "h", "j", "d")
        return names
    names = tuple(index_names)
    if len(names) != ndim:
        raise ValueError(f"Expected {ndim} index_names for a rank-{ndim} tensor, got {names}.")
    return names


def _index(flat: int, shape: torch.Size, names: tuple[str, ...]) -> tuple[int, ...]:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat //= size
    return _index_type(names)(*reversed(coords))


def _format_index(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in index._asdict().items()) + ")"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _failure(name: str, total: int, message: str) -> CompareResult:
    return CompareResult(
        ok=False, name=name, mismatches=total, total=total, worst_index=None,
        worst_actual=None, worst_expected=None, worst_baseline=None,
        worst_error=None, worst_allowed=None, max_ratio=float("inf"), message=message,
    )
