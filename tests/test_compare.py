"""The comparison: honest low-precision kernels pass, catalogued faults fail.

The truth is softmax(Q K^T * scale) V (and its LSE) in float64, the baseline
the honest emulation of SPEC section 7, and the "kernels" are flash-style
emulations that differ from the baseline the way real kernels do: online
softmax over blocks of keys, visited in either order, exp2 on log2(e)-scaled
scores, PRESCALE_QK, TF32.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from oracle.compare import (
    TOLERANCES,
    CompareResult,
    assert_all_close,
    assert_close,
    compare,
)

LOW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# --- cases: inputs, truth, baseline, honest kernels ----------------------------


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # [B, H, L, E] in the low dtype
    k: torch.Tensor  # [B, H, S, E]
    v: torch.Tensor  # [B, H, S, Ev]
    mask: torch.Tensor  # [B or 1, H or 1, L, S] bool, True = allowed
    scale: float

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


def make_case(
    seed: int,
    dtype: torch.dtype,
    *,
    shape: tuple[int, int, int, int, int, int] | None = None,
    std: float | None = None,
    mask: str | None = None,
) -> Case:
    """A random attention problem; unspecified sizes, spread and mask are drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    if shape is None:
        shape = (
            pick((1, 2)), pick((1, 2, 3)), pick((1, 7, 16, 64, 130)),
            pick((1, 5, 32, 128, 257, 512)), pick((1, 2, 3, 16, 64, 128)), pick((1, 4, 32, 64, 128)),
        )
    B, H, L, S, E, Ev = shape
    std = std if std is not None else pick((0.5, 1.0, 2.0, 4.0))
    mask = mask if mask is not None else pick(("none", "causal", "random", "masked_rows", "window"))

    def draw(*size):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * std).to(dtype)

    q, k, v = draw(B, H, L, E), draw(B, H, S, E), draw(B, H, S, Ev)
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    if mask == "none":
        allowed = torch.ones(L, S, dtype=torch.bool)
    elif mask == "causal":
        allowed = j <= i + (S - L)
    elif mask == "window":
        allowed = (j - i).abs() <= 8
    elif mask == "random":
        allowed = torch.rand(L, S, generator=g) < 0.5
    elif mask == "masked_rows":
        allowed = (torch.rand(L, 1, generator=g) < 0.8) & (torch.rand(L, S, generator=g) < 0.9)
    else:
        raise ValueError(f"Expected a known mask name, got {mask!r}.")
    return Case(q, k, v, allowed[None, None].expand(B, H, L, S), 1.0 / math.sqrt(E))


def truth(case: Case, scale: float | None = None) -> dict[str, torch.Tensor]:
    """Float64 out and LSE (natural log); a fully masked row has out 0 and LSE -inf."""
    scale = case.scale if scale is None else scale
    s = (case.q.double() @ case.k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~case.mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(case.mask, torch.exp(s - lse[..., None]), 0.0)
    return {"out": p @ case.v.double(), "lse": lse}


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 explicit mantissa bits), nearest even."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def baseline(case: Case, *, tf32: bool = False, prescale: bool = False) -> dict[str, torch.Tensor]:
    """SPEC section 7's honest emulation: float32 accumulation, P rounded to the dtype before P V.

    With ``prescale`` it rounds Q * scale * log2(e) to the dtype, as PRESCALE_QK does.
    """
    mm = round_tf32 if tf32 else (lambda t: t.float())
    if prescale:
        q = (case.q.float() * (case.scale * LOG2E)).to(case.dtype)
        s = (mm(q) @ mm(case.k).transpose(-1, -2)) * LN2
    else:
        s = (mm(case.q) @ mm(case.k).transpose(-1, -2)) * case.scale
    s = s.masked_fill(~case.mask, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    l = p.sum(dim=-1, keepdim=True)
    acc = mm(p.to(case.dtype)) @ mm(case.v)
    out = torch.where(l > 0, acc / l, 0.0).to(case.dtype)
    lse = torch.where(l > 0, m + torch.log(l), -math.inf).squeeze(-1)
    return {"out": out, "lse": lse}


def flash(
    case: Case,
    *,
    block: int = 32,
    reverse: bool = False,
    prescale: bool = False,
    tf32: bool = False,
    scale: float | None = None,
    skip_block: int | None = None,
) -> dict[str, torch.Tensor]:
    """An honest flash-attention kernel: online softmax over key blocks, base 2 inside.

    ``scale`` and ``skip_block`` inject faults (a wrong scale, a key block never visited).
    """
    mm = round_tf32 if tf32 else (lambda t: t.float())
    scale = case.scale if scale is None else scale
    if prescale:
        # PRESCALE_QK: fold scale * log2(e) into Q, rounded back to the dtype.
        q, qk_scale = (case.q.float() * (scale * LOG2E)).to(case.dtype), 1.0
    else:
        q, qk_scale = case.q, scale * LOG2E
    q = mm(q)
    *lead, L, _ = case.q.shape
    m = torch.full((*lead, L), -math.inf)
    l = torch.zeros(*lead, L)
    acc = torch.zeros(*lead, L, case.v.shape[-1])
    S = case.k.shape[-2]
    starts = list(range(0, S, block))
    for start in reversed(starts) if reverse else starts:
        if start // block == skip_block:
            continue
        stop = min(start + block, S)
        # Base-2 units from here on: s2 = score * log2(e).
        s2 = (q @ mm(case.k[..., start:stop, :]).transpose(-1, -2)) * qk_scale
        s2 = s2.masked_fill(~case.mask[..., start:stop], -math.inf)
        m_new = torch.maximum(m, s2.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(s2 - m_safe[..., None])
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + mm(p.to(case.dtype)) @ mm(case.v[..., start:stop, :])
        m = m_new
    out = torch.where(l[..., None] > 0, acc / l[..., None], 0.0).to(case.dtype)
    lse = torch.where(l > 0, (m + torch.log2(l)) * LN2, -math.inf)
    return {"out": out, "lse": lse}


HONEST = {
    "flash32": dict(block=32),
    "flash128_reversed": dict(block=128, reverse=True),
    "flash16_prescale": dict(block=16, prescale=True),
}


def honest_results(case: Case, variant: str) -> tuple[dict, dict, dict]:
    """(actual, expected, baseline) for an honest kernel; TF32 in both kernel and baseline for float32."""
    tf32 = variant.endswith("_tf32")
    options = HONEST[variant.removesuffix("_tf32")]
    prescale = options.get("prescale", False)
    return flash(case, tf32=tf32, **options), truth(case), baseline(case, tf32=tf32, prescale=prescale)


# --- honest kernels pass ---------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("variant", sorted(HONEST))
def test_honest_kernels_pass_over_many_seeds(dtype, variant):
    worst = 0.0
    for seed in range(40):
        case = make_case(seed, dtype)
        actual, expected, base = honest_results(case, variant)
        for key in ("out", "lse"):
            result = compare(actual[key], expected[key], baseline=base[key], name=key)
            assert result.ok, f"seed {seed}: {result.message}"
            worst = max(worst, result.max_ratio)
    # Not merely passing: the honest error stays well inside the allowance.
    assert worst < 0.7


@pytest.mark.parametrize("variant", sorted(HONEST))
def test_tf32_kernels_pass_against_a_tf32_baseline(variant):
    for seed in range(20):
        case = make_case(seed, torch.float32)
        actual, expected, base = honest_results(case, variant + "_tf32")
        assert_all_close(actual, expected, base)


def test_tf32_kernel_fails_against_a_full_float32_baseline():
    case = make_case(0, torch.float32, shape=(1, 2, 64, 128, 64, 64), std=1.0, mask="none")
    result = compare(flash(case, tf32=True)["out"], truth(case)["out"], baseline=baseline(case)["out"])
    assert not result.ok


def test_identical_results_pass_with_zero_ratio():
    case = make_case(3, torch.bfloat16)
    base = baseline(case)
    result = compare(base["out"], truth(case)["out"], baseline=base["out"])
    assert result.ok and result.mismatches == 0


@pytest.mark.gpu
def test_cuda_tensors_compare_like_cpu_tensors():
    case = make_case(1, torch.bfloat16)
    actual, expected, base = honest_results(case, "flash32")
    device = torch.device("cuda")
    on_gpu = compare(actual["out"].to(device), expected["out"].to(device), baseline=base["out"].to(device))
    on_cpu = compare(actual["out"], expected["out"], baseline=base["out"])
    assert on_gpu.ok and on_gpu.max_ratio == pytest.approx(on_cpu.max_ratio)


# --- faults fail -----------------------------------------------------------------


def _big_case(dtype: torch.dtype) -> Case:
    # 2 * 4 * 1280 = 10240 rows of 64 elements, none of them empty.
    return make_case(7, dtype, shape=(2, 4, 1280, 128, 64, 64), std=1.0, mask="none")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_one_wrong_row_in_ten_thousand_fails(dtype):
    case = _big_case(dtype)
    actual, expected, base = honest_results(case, "flash32")
    assert compare(actual["out"], expected["out"], baseline=base["out"]).ok
    wrong = actual["out"].clone()
    off = {torch.bfloat16: 1.03, torch.float16: 1.01, torch.float32: 1.0001}[dtype]
    wrong[1, 2, 1000] = (wrong[1, 2, 1000].double() * off).to(dtype)
    result = compare(wrong, expected["out"], baseline=base["out"])
    assert not result.ok
    assert result.rows_with_mismatch == 1 and result.rows == 10240
    assert tuple(result.worst_index) == (1, 2, 1000, result.worst_index.d)
    assert result.worst_error > result.worst_allowed


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_dropped_scale_fails(dtype):
    case = make_case(11, dtype, shape=(1, 2, 64, 128, 64, 64), std=1.0, mask="causal")
    wrong = flash(case, scale=1.0)
    expected, base = truth(case), baseline(case)
    for key in ("out", "lse"):
        result = compare(wrong[key], expected[key], baseline=base[key], name=key)
        assert not result.ok
        assert result.mismatches > result.total // 2


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_missing_block_fails(dtype):
    case = make_case(12, dtype, shape=(1, 2, 64, 256, 64, 64), std=1.0, mask="none")
    wrong = flash(case, block=64, skip_block=2)
    expected, base = truth(case), baseline(case)
    for key in ("out", "lse"):
        assert not compare(wrong[key], expected[key], baseline=base[key], name=key).ok


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_tiny_perturbation_of_an_exact_tensor_fails(dtype):
    g = torch.Generator().manual_seed(5)
    exact = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64).to(dtype)
    expected = exact.double()
    eps = torch.finfo(dtype).eps
    rms = float(expected.pow(2).mean().sqrt())
    assert compare(exact, expected, baseline=exact).ok
    wrong = expected.clone()
    row_rms = float(expected[1, 0, 3].pow(2).mean().sqrt())
    # Twice the floor of that row: a few ulps, on a tensor the baseline gets exactly right.
    wrong[1, 0, 3, 4] += 2 * TOLERANCES[dtype].atol * eps * max(rms, row_rms)
    result = compare(wrong.to(dtype), expected, baseline=exact)
    assert not result.ok
    assert tuple(result.worst_index) == (1, 0, 3, 4)
    assert result.mismatches == 1


def test_nan_where_expected_is_finite_fails_with_positions():
    case = make_case(2, torch.bfloat16, shape=(1, 2, 16, 32, 8, 8), std=1.0, mask="none")
    actual, expected, base = honest_results(case, "flash32")
    wrong = actual["out"].clone()
    wrong[0, 1, 5, 2] = math.nan
    wrong[0, 1, 9, :3] = math.nan
    with pytest.raises(AssertionError) as info:
        assert_close(wrong, expected["out"], baseline=base["out"], name="out")
    message = str(info.value)
    assert "actual has NaN at 4 positions where expected is finite" in message
    assert "first at (b=0, h=1, i=5, d=2)" in message
    assert "out (bfloat16)" in message
    result = compare(wrong, expected["out"], baseline=base["out"])
    assert result.mismatches == 4 and result.rows_with_mismatch == 2


def test_lse_minus_inf_positions_must_match():
    case = make_case(4, torch.float16, shape=(1, 1, 32, 16, 8, 8), mask="masked_rows")
    actual, expected, base = honest_results(case, "flash32")
    masked = torch.isneginf(expected["lse"])
    assert masked.any() and (~masked).any()
    assert compare(actual["lse"], expected["lse"], baseline=base["lse"], name="lse").ok

    # A kernel that reports its running-max sentinel instead of -inf for a fully masked row.
    wrong = torch.where(masked, -1e30, actual["lse"])
    result = compare(wrong, expected["lse"], baseline=base["lse"], name="lse")
    first = tuple(int(t[0]) for t in masked.nonzero().T)
    assert not result.ok and result.mismatches == int(masked.sum())
    assert "expected has -inf at" in result.message and "where actual is finite" in result.message
    assert f"first at (b={first[0]}, h={first[1]}, i={first[2]})" in result.message

    # -inf where the row is not empty.
    wrong = actual["lse"].clone()
    live = (~masked).nonzero()[0].tolist()
    wrong[tuple(live)] = -math.inf
    result = compare(wrong, expected["lse"], baseline=base["lse"], name="lse")
    assert "actual has -inf at 1 position where expected is finite" in result.message


def test_inf_positions_that_match_are_not_compared():
    expected = torch.tensor([[[0.5, -math.inf, math.inf, math.nan]]], dtype=torch.float64)
    actual = expected.float()
    assert compare(actual, expected, baseline=actual, name="lse").ok


# --- the report --------------------------------------------------------------------


def test_failure_message_names_tensor_counts_and_worst_element():
    case = make_case(9, torch.bfloat16, shape=(2, 2, 50, 64, 16, 16), std=1.0, mask="none")
    actual, expected, base = honest_results(case, "flash32")
    wrong = actual["out"].clone()
    wrong[1, 0, 7, 3] += 0.5
    wrong[0, 1, 7, :] += 0.01
    with pytest.raises(AssertionError) as info:
        assert_close(wrong, expected["out"], baseline=base["out"], name="out")
    message = str(info.value)
    result = compare(wrong, expected["out"], baseline=base["out"])
    assert isinstance(result, CompareResult) and not result.ok
    assert message == result.message
    assert message.startswith("out (bfloat16): ")
    assert f"{result.mismatches} of 3200 elements" in message
    assert f"in {result.rows_with_mismatch} of 200 rows" in message
    assert result.rows_with_mismatch == 2
    assert "Worst at (b=1, h=0, i=7, d=3)" in message
    assert result.worst_index == (1, 0, 7, 3) and result.worst_index.i == 7
    assert f"actual {result.worst_actual:.9g}" in message
    assert f"expected {result.worst_expected:.9g}" in message
    assert f"baseline {result.worst_baseline:.9g}" in message
    assert f"allowed {result.worst_allowed:.3g}" in message
    assert result.worst_error == pytest.approx(abs(result.worst_actual - result.worst_expected))
    assert result.max_ratio == pytest.approx(result.worst_error / result.worst_allowed)


def test_key_side_gradients_are_indexed_by_j():
    expected = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    actual = expected.float().clone()
    actual[0, 0, 2, 1] = 1.0
    result = compare(actual, expected, baseline=expected.float(), name="dk")
    assert "(b=0, h=0, j=2, d=1)" in result.message


def test_index_names_and_rows_can_be_named_by_the_caller():
    expected = torch.zeros(2, 3, 4, dtype=torch.float64)
    actual = expected.float().clone()
    actual[1, 2, 0] = 1.0
    result = compare(
        actual, expected, baseline=expected.float(), name="max", index_names=("b", "i", "h"), rows_dim=(1, 2)
    )
    assert "(b=1, i=2, h=0)" in result.message
    assert "in 1 of 2 rows" in result.message


def test_assert_all_close_reports_every_failing_tensor():
    case = make_case(6, torch.float16, shape=(1, 2, 32, 64, 16, 16), std=1.0, mask="causal")
    actual, expected, base = honest_results(case, "flash32")
    assert_all_close(actual, expected, base)
    wrong = dict(actual, out=actual["out"] * 1.1, lse=actual["lse"] + 0.1)
    with pytest.raises(AssertionError) as info:
        assert_all_close(wrong, expected, base)
    message = str(info.value)
    assert message.startswith("2 tensor(s) failed")
    assert "out (float16)" in message and "lse (float32)" in message
    with pytest.raises(AssertionError, match="actual lacks lse"):
        assert_all_close({"out": actual["out"]}, expected, base)


def test_shape_and_dtype_are_checked_first():
    expected = torch.zeros(2, 3, dtype=torch.float64)
    result = compare(torch.zeros(3, 2), expected, baseline=expected.float())
    assert not result.ok and "shape mismatch" in result.message
    result = compare(torch.zeros(2, 3, dtype=torch.int32), expected, baseline=expected.float())
    assert not result.ok and "floating-point" in result.message
    with pytest.raises(ValueError, match="float64"):
        compare(torch.zeros(2, 3), expected.float(), baseline=expected.float())
    with pytest.raises(ValueError, match="index_names"):
        compare(torch.zeros(2, 3), expected, baseline=expected.float(), index_names=("a",))


def test_factor_is_applied_once_and_can_be_overridden():
    # Exactly representable offsets: baseline error 2**-10 everywhere, actual error 4.5 times that.
    expected = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    base = (expected + 2.0**-10).float()
    actual = (expected + 4.5 * 2.0**-10).float()
    assert not compare(actual, expected, baseline=base, factor=4.0, atol=0.0).ok
    assert compare(actual, expected, baseline=base, factor=5.0, atol=0.0).ok


def test_allowance_joins_the_error_scale_where_given():
    """``allowance`` (properties.check.delta_allowances) widens the tolerance by factor * allowance
    at the elements it covers and nowhere else."""
    expected = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    baseline = expected.float()
    actual = expected.clone().float()
    actual[0, 0, 0, 0] = 1e-3
    assert not compare(actual, expected, baseline=baseline, name="dq").ok
    allow = torch.zeros_like(expected)
    allow[0, 0, 0, 0] = 1e-3 / TOLERANCES[torch.float32].factor
    assert compare(actual, expected, baseline=baseline, name="dq", allowance=1.5 * allow).ok
    assert not compare(actual, expected, baseline=baseline, name="dq", allowance=0.5 * allow).ok
    # The same allowance elsewhere leaves the bad element bad.
    assert not compare(actual, expected, baseline=baseline, name="dq", allowance=1.5 * allow.flip(-1)).ok


def test_a_tensor_reference_scale_sets_each_elements_floor():
    """A tensor ``reference_scale`` (properties.check.score_scales for lse and max) adds
    ``atol * eps32`` times its own element to each element's floor: an error of one float32 ulp of
    338 passes where the element's terms are that large and fails where they are not."""
    expected = torch.full((1, 2, 3), -0.0245666, dtype=torch.float64)
    baseline = expected.float()
    actual = expected.float().clone()
    actual[0, 0, 1] = expected[0, 0, 1] - 2.0 ** -15
    actual[0, 1, 1] = expected[0, 1, 1] - 2.0 ** -15
    assert not compare(actual, expected, baseline=baseline, name="max").ok
    rows = torch.full((1, 2, 3), 1.0, dtype=torch.float64)
    rows[0, 0, 1] = 338.0
    result = compare(actual, expected, baseline=baseline, name="max", reference_scale=rows)
    assert not result.ok and result.mismatches == 1 and tuple(result.worst_index) == (0, 1, 1)
    assert "terms 1 " in result.message.replace(")", " ")  # the report names the element's own size
    rows[0, 1, 1] = -338.0  # a size: the sign does not matter
    assert compare(actual, expected, baseline=baseline, name="max", reference_scale=rows).ok


@pytest.mark.parametrize("arg", ["reference_scale", "allowance"])
def test_a_per_element_argument_of_the_wrong_shape_is_refused(arg):
    expected = torch.zeros(1, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"`{arg}` \(lse\).*\(1, 2, 3\).*\(2, 2\)"):
        compare(expected.float(), expected, baseline=expected.float(), name="lse", **{arg: torch.ones(2, 2)})
    # Per row (a trailing 1) and per head broadcast fine.
    assert compare(expected.float(), expected, baseline=expected.float(), name="lse", **{arg: torch.ones(2, 1)}).ok
