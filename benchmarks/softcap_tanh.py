"""The softcap's tanh, A/B: speed in benchmarks/bench.py's softcap rows and accuracy, per formula.

    PYTHONPATH=. python3 benchmarks/softcap_tanh.py --impls ours,ours-fdiv,ours-exp2,ours-approx,torch-compile \
        --masks softcap,causal --seqlens 4k --head-dims 128,64 --no-decode --budget-seconds 250

Every flag is bench.py's; this adds implementations that are ``ours`` with the softcap's
tanh emitted another way (``tanh_softcap(cap)`` swapped for a subclass whose ``_emit``
differs; the generated source differs, so each compiles on its own; a subclass's formula is
its forward's and its backward's alike):

| impl | tanh(x), x = score / cap |
| --- | --- |
| ``ours`` | the kernels' own: a 9/6 rational (``kernels.mods.TANH_NUM``, ``fit_rational``) with ``cap`` folded into its numerator, division by ``rcp.approx`` and a multiply; in bf16 / fp16 (the backward, and a forward that returns out alone: bench.py's ``ours-out``, not ``ours``, which asks for the LSE) ``1 - 2 r``, ``r = 1 / (exp2(2 x log2 e) + 1)`` (``kernels.mods.TANH_FAST_ERR``), half the reciprocals by ``rcp.approx`` and half by Newton's method (``kernels.mods.TANH_RCP``) |
| ``ours-eigen`` | Eigen's 13/6 rational (``EIGEN_NUM``) with ``rcp.approx``, times ``cap``: ours before the twenty-eighth session where the rational applies (2 FMAs and a multiply per score more) |
| ``ours-fdiv`` | Eigen's rational, division by ``tl.math.fdiv`` (``div.full.f32``), before 2026-12-03 |
| ``ours-exp2`` | ``1 - 2 / (exp2(2 x log2 e) + 1)`` with ``fdiv`` |
| ``ours-exp2rcp`` | the same with ``rcp.approx`` |
| ``ours-hybrid`` | ``x P(x^2)`` (degree 4 fit) for ``|x| < 0.55``, else ``(1 - e) / (1 + e)``, ``e = exp2(-2|x| log2 e)`` |
| ``ours-approx`` | ``tanh.approx.f32`` (one MUFU instruction) |
| ``ours-rational`` | ``ours``' rational everywhere, in bf16 too (``ours`` before 2026-12-05) |
| ``ours-rcp`` | ``ours`` with the fast formula's every reciprocal by ``rcp.approx`` (``ours`` before the twenty-seventh session) |
| ``ours-newton`` | ``ours`` with the fast formula's every reciprocal by Newton's method |
| ``ours-out-rcp``, ``ours-out-newton`` | the two above called for out alone (bench.py's ``ours-out``), so that the forward takes the fast formula too |
| ``ours-grad-mul`` | ``ours`` with the fast formula's derivative as ``(4 r) (1 - r)`` (before the twenty-eighth session) where ours takes ``r (4 - 4 r)`` (an FMA and a multiply), one instruction per score fewer |
| ``ours-dkdv-mufu`` | ``ours`` with ``kernels.mods.TANH_RCP_DKDV = "mufu"``: the dK/dV kernel's reciprocals all by ``rcp.approx``, the dQ kernel's and the forward's split |
| ``ours-out-fwd-split4`` | bench.py's ``ours-out`` with ``kernels.mods.TANH_RCP_FWD = "split4"``: the forward's reciprocals one in four by ``rcp.approx``, three by Newton's method (the backward's as ``ours``) |

On CUDA it first prints each formula's worst error in float32 ulps of float64 tanh over the
4 million points of tests/test_kernels.py::test_gpu_softcap_tanh_accuracy (which holds the
kernels' own within 8). bench.py's oracle check at the benchmark's shapes is no accuracy
test for these: an LSE over 2048 keys averages a per-score error away, where the fuzzer's
rows of a few keys do not (the exp2 formula's 1e-5 relative error near 0 was caught there).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench  # noqa: E402
from kernels import mods as M  # noqa: E402

_LOG2E2 = 2.0 * 1.4426950408889634
_RCP = 'tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [{}], dtype=tl.float32, is_pure=True, pack=1)'
# tanh(x) / x as a polynomial in x^2 on [0, 0.55]: a least-squares fit on Chebyshev nodes,
# 1.4e-7 relative at worst in float32 (numpy, 200001 points).
_SMALL = ("0.0163238047039211", "-0.05259439681475426", "0.13318973262595915", "-0.333328008653058",
          "0.9999999681771625")


# Eigen's fast tanh (generic_fast_tanh_float): tanh(x) = x * num(x^2) / den(x^2), a 13/6 rational
# on [-TANH_CLAMP, TANH_CLAMP], coefficients highest power first. The kernels' rational until the
# twenty-eighth session (kernels.mods.TANH_NUM, TANH_DEN now: fit_rational's 9/6).
EIGEN_NUM = ("-2.76076847742355e-16", "2.00018790482477e-13", "-8.60467152213735e-11", "5.12229709037114e-08",
             "1.48572235717979e-05", "6.37261928875436e-04", "4.89352455891786e-03")
EIGEN_DEN = ("1.19825839466702e-06", "1.18534705686654e-04", "2.26843463243900e-03", "4.89352518554385e-03")


def _rational(g, s, cap, num=EIGEN_NUM, den=EIGEN_DEN):
    x = g.tmp(f"tl.minimum(tl.maximum({s} * {1.0 / cap!r}, {-M.TANH_CLAMP!r}), {M.TANH_CLAMP!r})")
    x2 = g.tmp(f"{x} * {x}")
    return x, M._horner(num, x2), M._horner(den, x2)


def fit_rational(p: int = 4, q: int = 3, clamp: float = M.TANH_CLAMP, iters: int = 400):
    """tanh(x) / x ~ P(t) / Q(t), t = x^2, P of degree ``p`` and Q of degree ``q`` with Q(0) = 1,
    on x in [0, ``clamp``], fitted for the least worst relative error by Lawson's iteration of
    weighted linear least squares (Loeb's linearisation: P - f Q over f Q of the last step), in
    float64 on 22,000 points (Chebyshev-spaced in x, and logarithmic below 1). Returns the worst
    relative error of the fit in exact arithmetic and the coefficients in t, highest power first,
    as ``kernels.mods.TANH_NUM`` and ``TANH_DEN`` hold them (``tests/test_kernels.py`` refits them).
    The kernels' 9/6 (p=4, q=3): 1.95e-7; Eigen's 13/6 form (p=6, q=3) refits to 1.5e-9, 5/3 to
    1.7e-8, 4/2 to 9e-6; float32 evaluation adds about 3 ulps to any of them (emulated_ulps)."""
    import numpy as np

    theta = np.linspace(0.0, np.pi, 20000)
    x = np.unique(np.concatenate([clamp * (1 - np.cos(theta)) / 2, np.geomspace(1e-6, 1.0, 2000)]))
    u = (x / clamp) ** 2  # the fit's variable, in [0, 1] for conditioning
    f = np.tanh(x) / np.where(x > 0, x, 1.0)
    f[x == 0] = 1.0
    vp, vq = np.vander(u, p + 1, increasing=True), np.vander(u, q + 1, increasing=True)
    weights, q_prev, best = np.ones_like(u), np.ones_like(u), None
    for _ in range(iters):
        scale = np.sqrt(weights) / (f * q_prev)
        a = np.hstack([vp, -f[:, None] * vq[:, 1:]]) * scale[:, None]
        sol = np.linalg.lstsq(a, f * scale, rcond=None)[0]
        num, den = sol[:p + 1], np.concatenate([[1.0], sol[p + 1:]])
        q_prev = vq @ den
        err = (vp @ num / q_prev - f) / f
        worst = float(np.abs(err).max())
        if best is None or worst < best[0]:
            best = (worst, num, den)
        weights = weights * np.abs(err)
        weights *= len(weights) / weights.sum()
    worst, num, den = best
    to_t = lambda c: tuple(repr(float(c[k] / clamp ** (2 * k))) for k in reversed(range(len(c))))
    return worst, to_t(num), to_t(den)


def tanh_points():
    """tests/test_kernels.py's 4 million float32 arguments of a tanh (``_softcap_points``), in
    numpy: [-12, 12] evenly, 1e-9 to 1 logarithmically on both sides, and out to 200."""
    import numpy as np

    big = np.linspace(-12.0, 12.0, 1 << 21)
    small = np.logspace(-9, 0, 1 << 20)
    far = np.linspace(12.0, 200.0, 1 << 12)
    return np.concatenate([big, small, -small, far, -far]).astype(np.float32)


def emulated_ulps(num=None, den=None, cap: float = 1.0, rcp_ulps: float = 0.0, clamp: float = M.TANH_CLAMP):
    """Worst error of the kernels' rational softcap ``cap * tanh(s / cap)`` (``kernels.mods``' code:
    x clamped, Horner's FMAs in x^2, the reciprocal of den, x * num * r with ``cap`` folded into num)
    in float32 ulps (eps * |tanh|) of float64 over ``tanh_points`` times ``cap``, emulated
    in numpy: each FMA exact in float64 then rounded to float32 once (as sm_90's FFMA), the
    reciprocal exactly rounded and then moved by ``rcp_ulps`` ulps (rcp.approx is within 1)."""
    import numpy as np

    num = M.TANH_NUM if num is None else num
    den = M.TANH_DEN if den is None else den
    f32 = np.float32

    def horner(coefs, t):
        acc = np.full_like(t, f32(float(coefs[0])))
        for c in coefs[1:]:
            acc = (acc.astype(np.float64) * t + np.float64(f32(float(c)))).astype(f32)
        return acc

    s = (tanh_points() * f32(cap)).astype(f32)
    x = np.clip((s * f32(1.0 / cap)).astype(f32), f32(-clamp), f32(clamp))
    t2 = (x * x).astype(f32)
    fold = M.tanh_cap_folds(cap)
    r = ((1.0 / horner(den, t2).astype(np.float64)) * (1 + rcp_ulps * 2.0 ** -23)).astype(f32)
    n = horner([repr(float(c) * cap) for c in num] if fold else num, t2)
    y = ((x * n).astype(f32) * r).astype(f32)
    if not fold:
        y = (f32(cap) * y).astype(f32)
    ref = cap * np.tanh(s.astype(np.float64) / cap)
    ulp = np.finfo(f32).eps * np.maximum(np.abs(ref), np.finfo(f32).tiny)
    return float((np.abs(y.astype(np.float64) - ref) / ulp).max())


@dataclass(frozen=True, repr=False)
class TanhFdiv(M._TanhSoftcap):
    def _emit(self, g, s):
        x, num, den = _rational(g, s, self.cap)
        th = g.tmp(f"tl.math.fdiv({x} * ({num}), {den})")
        return g.tmp(f"{self.cap!r} * {th}")


@dataclass(frozen=True, repr=False)
class TanhEigen(M._TanhSoftcap):
    """Eigen's 13/6 rational with rcp.approx, then times cap (the fast formula where it applies)."""

    def _emit(self, g, s):
        if self.fast(g.rounding):
            return self._emit_fast(g, s)
        x, num, den = _rational(g, s, self.cap)
        if g.interpret:
            th = g.tmp(f"tl.math.fdiv({x} * ({num}), {den})")
        else:
            th = g.tmp(f"{x} * ({num}) * " + _RCP.format(den))
        return g.tmp(f"{self.cap!r} * {th}")


@dataclass(frozen=True, repr=False)
class TanhExp2(M._TanhSoftcap):
    RCP = False  # divide by fdiv, or by rcp.approx and a multiply

    def _emit(self, g, s):
        e = g.tmp(f"tl.math.exp2({s} * {_LOG2E2 / self.cap!r})")
        twice = "2.0 * " + _RCP.format(f"{e} + 1.0") if self.RCP else f"tl.math.fdiv(2.0, {e} + 1.0)"
        th = g.tmp(f"1.0 - {twice}")
        return g.tmp(f"{self.cap!r} * {th}")


class TanhExp2Rcp(TanhExp2):
    RCP = True


@dataclass(frozen=True, repr=False)
class TanhHybrid(M._TanhSoftcap):
    def _emit(self, g, s):
        x = g.tmp(f"{s} * {1.0 / self.cap!r}")
        x2 = g.tmp(f"{x} * {x}")
        small = g.tmp(f"{x} * ({M._horner(_SMALL, x2)})")
        e = g.tmp(f"tl.math.exp2(tl.abs({x}) * {-_LOG2E2!r})")
        big = g.tmp(f"(1.0 - {e}) * " + _RCP.format(f"1.0 + {e}"))
        th = g.tmp(f"tl.where(tl.abs({x}) < 0.55, {small}, tl.where({x} < 0, -{big}, {big}))")
        return g.tmp(f"{self.cap!r} * {th}")


@dataclass(frozen=True, repr=False)
class TanhApprox(M._TanhSoftcap):
    def _emit(self, g, s):
        x = g.tmp(f"{s} * {1.0 / self.cap!r}")
        th = g.tmp('tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", '
                   f'[{x}], dtype=tl.float32, is_pure=True, pack=1)')
        return g.tmp(f"{self.cap!r} * {th}")


@dataclass(frozen=True, repr=False)
class TanhRationalEverywhere(M._TanhSoftcap):
    """The kernels' rational everywhere, bf16 included, as before 2026-12-05 (``ours`` then)."""

    def fast(self, rounding: float) -> bool:
        return False


@dataclass(frozen=True, repr=False)
class TanhFastRcp(M._TanhSoftcap):
    """The fast formula (where it applies) with every reciprocal by rcp.approx, as before
    2026-12-05 (``kernels.mods.TANH_RCP = "mufu"``)."""
    RCP = "mufu"


@dataclass(frozen=True, repr=False)
class TanhFastNewton(M._TanhSoftcap):
    """The fast formula (where it applies) with every reciprocal by Newton's method
    (``kernels.mods.TANH_RCP = "newton"``)."""
    RCP = "newton"


@dataclass(frozen=True, repr=False)
class TanhGradMul(M._TanhSoftcap):
    """The fast formula's derivative as ``(4 r) (1 - r)``, 3 instructions per score, as before the
    twenty-eighth session; ours takes ``r (4 - 4 r)`` with an FMA, 2."""

    def _emit_grad(self, g, s, out):
        if out in g.notes:
            r = g.notes[out]
            return g.tmp(f"(4.0 * {r}) * (1.0 - {r})")
        return super()._emit_grad(g, s, out)


VARIANTS = {"ours-eigen": TanhEigen, "ours-fdiv": TanhFdiv, "ours-exp2": TanhExp2, "ours-exp2rcp": TanhExp2Rcp,
            "ours-hybrid": TanhHybrid, "ours-approx": TanhApprox, "ours-rational": TanhRationalEverywhere,
            "ours-rcp": TanhFastRcp, "ours-newton": TanhFastNewton, "ours-grad-mul": TanhGradMul}
# ours with kernels.mods.TANH_RCP_DKDV = "mufu": the dK/dV kernel's fast tanh on rcp.approx alone,
# the dQ kernel's and the forward's on TANH_RCP.
_ours_dkdv_mufu = bench._ours_with("mods", "TANH_RCP_DKDV", "mufu")
# ours-out with kernels.mods.TANH_RCP_FWD = "split4": the forward's fast tanh with one reciprocal in
# four by rcp.approx (the backward's as ours').
_ours_out_fwd_split4 = bench._ours_with("mods", "TANH_RCP_FWD", "split4", lse=False)


def _swap(mod, cls):
    if isinstance(mod, M._TanhSoftcap):
        return cls(mod.cap)
    if isinstance(mod, M._Chain):
        return M.chain(*[_swap(m, cls) for m in mod.mods])
    return mod


def _variant(cls, lse: bool = True):
    def prepare(case, score_mod, block_mask):
        return bench._ours(case, _swap(score_mod, cls), block_mask, lse=lse)
    return prepare


# The fast formula's variants called for out alone too: their forward then takes the fast
# formula as well (bench.py's ``ours-out``).
OUT_VARIANTS = {"ours-out-rcp": TanhFastRcp, "ours-out-newton": TanhFastNewton}


def accuracy() -> None:
    """Worst error of each formula in float32 ulps of float64 tanh (CUDA only)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def apply(X, Y, N, FN: tl.constexpr, B0, B1, B2, B3, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0)
        tl.store(Y + offs, FN(x, 1.0, 0, 0, offs, offs, B0, B1, B2, B3), mask=offs < N)

    x = torch.from_numpy(tanh_points()).cuda()
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    for name, cls in [("ours", M._TanhSoftcap)] + list(VARIANTS.items()):
        prog = M.compile_mods(cls(1.0), None)
        y = torch.empty_like(x)
        dummy = x[:1]
        apply[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), prog.score_fn, dummy, dummy, dummy, dummy,
                                               BLOCK=1024)
        err = (y.double() - ref).abs() / ulp
        near0 = err[x.abs() < 0.1].max().item()
        print(f"tanh accuracy  {name:13s} worst {err.max().item():12.1f} ulps; |x| < 0.1: {near0:12.1f}",
              file=sys.stderr, flush=True)
    # The fast formula (a program compiled with bf16's rounding) is bounded in absolute terms:
    # kernels.mods.TANH_FAST_ERR, 5e-7 = 8.4 units of 2^-24.
    for name, cls, rcp in (("ours", M._TanhSoftcap, None), ("ours-rcp", TanhFastRcp, None),
                           ("ours-newton", TanhFastNewton, None), ("split4", M._TanhSoftcap, "split4")):
        prog = M.compile_mods(cls(1.0), None, rounding=2.0 ** -8, rcp=rcp)
        y = torch.empty_like(x)
        dummy = x[:1]
        apply[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), prog.score_fn, dummy, dummy, dummy, dummy,
                                               BLOCK=1024)
        err = (y.double() - ref).abs().max().item() / 2.0 ** -24
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -1e30], device=x.device)
        got = torch.empty_like(special)
        apply[(1,)](special, got, special.numel(), prog.score_fn, dummy, dummy, dummy, dummy, BLOCK=1024)
        print(f"fast tanh      {name:13s} worst absolute error {err:6.2f} units of 2^-24 "
              f"(bound {M.TANH_FAST_ERR / 2.0 ** -24:.1f}); at nan, inf, -inf, 0, 1e30, -1e30: {got.tolist()}",
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    for name, cls in VARIANTS.items():
        bench.IMPLS[name] = bench.Impl(name, _variant(cls), True, f"ours with the softcap's tanh as {cls.__name__}")
    for name, cls in OUT_VARIANTS.items():
        bench.IMPLS[name] = bench.Impl(name, _variant(cls, lse=False), False,
                                       f"ours called for out alone, the softcap's tanh as {cls.__name__}")
    bench.IMPLS["ours-dkdv-mufu"] = bench.Impl("ours-dkdv-mufu", _ours_dkdv_mufu, True,
                                               "ours with kernels.mods.TANH_RCP_DKDV = 'mufu'")
    bench.IMPLS["ours-out-fwd-split4"] = bench.Impl("ours-out-fwd-split4", _ours_out_fwd_split4, False,
                                                    "ours-out with kernels.mods.TANH_RCP_FWD = 'split4'")
    argv = list(sys.argv if argv is None else argv)
    import torch

    if torch.cuda.is_available() and "--device" not in argv:
        accuracy()
    return bench.main(argv)


if __name__ == "__main__":
    sys.exit(main())
