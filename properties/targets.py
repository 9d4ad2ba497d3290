"""Targets: the attention implementations the properties check.

A ``Target`` is a name, a callable with FlexAttention's signature
(``fn(query, key, value, score_mod=None, block_mask=None, scale=None,
enable_gqa=False, return_lse=False, kernel_options=None)``) and
``applicable(case, device)``, which gives the reason a target cannot run a
case (None when it can). Built-ins:

* ``kernels``: ours (``kernels.flex_attention``), on CPU under the Triton interpreter.
* ``kernels-dq-atomic``: ours with ``kernels.backward.DQ_ATOMIC`` (no dQ kernel: the dK/dV
  kernel adds dQ with atomics), a variant not yet on by default.
* ``kernels-one-loop``: ours with ``kernels.forward.ONE_LOOP`` and ``kernels.backward.ONE_LOOP``
  (one loop over a tile's partial and full blocks in the forward and dQ kernels) on every mask;
  the default takes the forward's one loop only where ``kernels.forward.one_loop_for`` says.
* ``kernels-one-loop-eager``: ours with the forward's one loop (``kernels.forward.ONE_LOOP``) and
  its mask called on every step (``kernels.forward.ONE_LOOP_EAGER_MASK``); the backward is ours.
* ``kernels-heads-in-loop``: ours with ``kernels.backward.HEADS_IN_LOOP`` (the dK/dV kernel walks
  a kv head's query heads in each of its loops where the block mask has one head), a variant not
  yet on by default.
* ``kernels-shifted``: ours with ``kernels.api.AUTO_EVERYWHERE``: the automatic refined lists,
  REFINED_BWD's tiles and the shifted windows of all three kernels wherever they can be had (block
  masks of 128 x 128 blocks), whatever they save, the interpreter included; the default takes them
  on the GPU alone, where they save enough.
* ``kernels-persistent``: ours with ``kernels.forward.PERSISTENT_FWD``: the persistent forward
  (each program walks a list of query tiles, reading the next tile's lists and queries during
  one), the interpreter included; off by default (timed on the H100 in the thirty-fourth
  session: no faster on the document rows).
* ``kernels-tma``: ours with ``kernels.forward.TMA_KV``, ``kernels.backward.TMA_DQ`` and
  ``TMA_DKDV`` forced on: every streamed tile through a TMA descriptor wherever the tensors allow
  it (``kernels.forward.tma_ready``), the interpreter included and on every tile and head dim; the
  default takes them on sm90 alone (the forward from D=128 and not on two loops whose mask loads,
  the dK/dV kernel on REFINED_BWD's tiles).
* ``gluon``: the Gluon probes (``benchmarks/gluon_flex.py``: a warp-specialized forward and
  backward, not yet part of ``kernels``), on sm_90 GPUs, or on the CPU in
  ``kernels.gluon_emulator``; bf16/fp16, head dim 64 or 128, 128 x 128 block masks. Needs a
  clone of the repository (the probes live in ``benchmarks/``).
* ``torch-compile``: ``torch.compile(flex_attention)``; needs CUDA here.
* ``torch-eager``: PyTorch's eager ``flex_attention`` (mask_mod semantics;
  forward only on CPU, where PyTorch has no backward).
* ``sdpa``: ``scaled_dot_product_attention`` for what it can express: no
  score mod, the mask as a dense boolean tensor.

``resolve_target("package.module:function")`` wraps a user's function; a
function may carry its own ``applicable(case, device)`` attribute, and a
module attribute that already is a ``Target`` is used as is.

A target raises ``NotApplicable`` for a case it cannot express, or names, in
``declines``, the exceptions of its own that mean so (ours: ``kernels.TilesTooLarge``,
raised by a forward or a backward); any other exception is a target error,
reported apart from numeric mismatches.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .case import FlexCase

__all__ = ["Target", "NotApplicable", "TargetError", "TARGETS", "resolve_target", "best_device"]


class NotApplicable(Exception):
    """The target cannot run this case; ``reason`` says why (the case is skipped, not failed)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TargetError(AssertionError):
    """The target raised on a case it declared applicable; ``original`` is its exception."""

    def __init__(self, target: str, original: BaseException):
        self.target = target
        self.original = original
        super().__init__(f"target {target!r} raised {type(original).__name__}: {original}")


def best_device() -> str:
    """``cuda`` when a GPU is there, else ``cpu`` (kernels then run in Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _always(case: FlexCase, device: torch.device) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Target:
    """An implementation under test.

    ``fn`` has FlexAttention's signature and returns ``out`` or, with
    ``return_lse=True``, ``(out, lse)`` (natural log), and with
    ``return_max=True`` (when ``returns_max``) the row max last.
    ``check(case, device)`` returns a reason when the target cannot run the
    case. ``backward_on(device)`` says whether gradients can be taken there;
    when not, gradient checks are left out (forward only).
    """

    name: str
    fn: Callable
    check: Callable[[FlexCase, torch.device], Optional[str]] = _always
    returns_lse: bool = True
    returns_max: bool = False
    takes_kernel_options: bool = True
    backward_on: Callable[[torch.device], bool] = field(default=lambda device: True)
    description: str = ""
    # A reason when an exception the target raised, in its forward or its backward, says
    # that it cannot run the case as asked (the case is then not applicable); None: an error.
    declines: Callable[[BaseException], Optional[str]] = field(default=lambda exc: None)
    # Keyword arguments of properties.strategies.flex_cases that keep ``flex-oracle fuzz``'s
    # draws within what the target covers (say head_dims=(64, 128)); empty: the full space.
    draw_bounds: dict = field(default_factory=dict)

    def applicable(self, case: FlexCase, device=None) -> Optional[str]:
        """Why this target cannot run ``case`` on ``device`` (default: the best device), or None."""
        device = torch.device(best_device() if device is None else device)
        return self.check(case, device)

    def adapt(self, case: FlexCase, device) -> FlexCase:
        """``case`` reduced to what the target can do on ``device`` (forward only where it has no backward)."""
        if case.backward and not self.backward_on(torch.device(device)):
            return case.replace(backward=False, grad_lse=False)
        return case

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------
# ours


def _kernels_fn(*args, **kwargs):
    import kernels

    return kernels.flex_attention(*args, **kwargs)


def _kernels_with(*flags: tuple):
    """Ours with each ``kernels.<module>.<flag>`` of ``flags`` ((module, flag) pairs) on for the
    call alone. Such flags are read when the forward runs; the autograd function keeps the
    backward's for its backward (the lists and tiles it chose with them)."""
    def fn(*args, **kwargs):
        import importlib

        modules = [importlib.import_module(f"kernels.{module}") for module, _ in flags]
        before = [getattr(mod, flag) for mod, (_, flag) in zip(modules, flags)]
        for mod, (_, flag) in zip(modules, flags):
            setattr(mod, flag, True)
        try:
            return _kernels_fn(*args, **kwargs)
        finally:
            for mod, (_, flag), old in zip(modules, flags, before):
                setattr(mod, flag, old)
    return fn


_kernels_dq_atomic_fn = _kernels_with(("backward", "DQ_ATOMIC"))
_kernels_one_loop_fn = _kernels_with(("forward", "ONE_LOOP"), ("backward", "ONE_LOOP"))
_kernels_one_loop_eager_fn = _kernels_with(("forward", "ONE_LOOP"), ("forward", "ONE_LOOP_EAGER_MASK"))
_kernels_heads_in_loop_fn = _kernels_with(("backward", "HEADS_IN_LOOP"))
_kernels_shifted_fn = _kernels_with(("api", "AUTO_EVERYWHERE"))
_kernels_persistent_fn = _kernels_with(("forward", "PERSISTENT_FWD"))
_kernels_tma_fn = _kernels_with(("forward", "TMA_KV"), ("backward", "TMA_DQ"), ("backward", "TMA_DKDV"))


def _kernels_declines(exc: BaseException) -> Optional[str]:
    """The case's own kernel_options ask for tiles this GPU's shared memory cannot hold
    (float32 backward tiles of 128 x 64 at head dim 128, say; raised by the forward or, for
    the backward's tiles, by the backward): a clear input error of the caller's, so the case
    is not applicable here. Tiles of our defaults that do not fit raise Triton's
    OutOfResources instead, which stays a target error."""
    import kernels

    if isinstance(exc, kernels.TilesTooLarge):
        return ("the kernel_options' tiles do not fit in this GPU's shared memory "
                f"({', '.join(f'{k}={v}' for k, v in exc.options.items())})")
    return None


def _kernels_check(case: FlexCase, device: torch.device) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"our kernels run on CPU (Triton interpreter) or CUDA, not {device.type}"
    from kernels import _runtime

    # One process runs Triton one way (kernels._runtime): interpreted for CPU tensors or compiled for CUDA.
    if device.type == "cpu" and not _runtime.process_interprets():
        return "this process compiles the kernels for CUDA; CPU runs need TRITON_INTERPRET=1 from the start"
    if device.type == "cuda" and _runtime.process_interprets():
        return "this process runs Triton's interpreter (TRITON_INTERPRET=1); CUDA runs need it unset"
    if case.dtype == "float64":
        return "our kernels take float16, bfloat16 and float32 (float64 is the oracle's)"
    if case.block_size is not None and (case.block_size[0] % 16 or case.block_size[1] % 16):
        return f"our kernels need block sizes that are multiples of 16, got {case.block_size}"
    return None


# --------------------------------------------------------------------------
# the Gluon probes


class GluonDeclines(ValueError):
    """The Gluon probes cannot run a materialized case (a learnable captured tensor, say)."""


def _gluon_flex():
    import os
    import sys

    import kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
    if not os.path.exists(os.path.join(root, "benchmarks", "gluon_flex.py")):
        return None
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import gluon_flex

    return gluon_flex


def _gluon_check(case: FlexCase, device: torch.device) -> Optional[str]:
    reason = _kernels_check(case, device)  # Triton's mode: the delta kernel is plain Triton
    if reason is not None:
        return reason
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9:
        return "the Gluon probes are written for sm_90 (H100/H200)"
    if _gluon_flex() is None:
        return "the Gluon probes live in the repository's benchmarks/; run from a clone"
    if case.dtype not in ("bfloat16", "float16"):
        return f"the Gluon probes take bfloat16 or float16, got {case.dtype}"
    if case.E != case.Ev or case.E not in (64, 128):
        return f"the Gluon probes take head dims 64 or 128 alike, got E={case.E}, Ev={case.Ev}"
    if case.block_size is not None and tuple(case.block_size) != (128, 128):
        return f"the Gluon probes walk 128 x 128 block lists, got block_size={tuple(case.block_size)}"
    return None


def _gluon_fn(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False):
    gluon_flex = _gluon_flex()
    # A key batch broadcast over the queries' (Bk = 1), as the probes take it (gluon_flex copies
    # layouts a TMA descriptor cannot take).
    key, value = (t.expand(query.shape[0], *t.shape[1:]) for t in (key, value))
    q, k, v = query, key, value
    reason = gluon_flex.unsupported(q, k, v, score_mod, block_mask, enable_gqa)
    if reason is not None:
        raise GluonDeclines(reason)
    out, lse = gluon_flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                         enable_gqa=enable_gqa)
    return (out, lse) if return_lse else out


def _gluon_declines(exc: BaseException) -> Optional[str]:
    return str(exc) if isinstance(exc, GluonDeclines) else None


# --------------------------------------------------------------------------
# PyTorch's flex_attention, eager and compiled

# Flags PyTorch's flex_attention understands; tile and launch keys pass too.
_TORCH_OPTION_PREFIXES = ("BLOCK_", "fwd_", "bwd_", "num_")
_TORCH_FLAGS = {"PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "FORCE_USE_FLEX_ATTENTION",
                "OUTPUT_LOGSUMEXP"}


def _torch_options(kernel_options: Optional[dict]) -> Optional[dict]:
    if not kernel_options:
        return None
    kept = {k: v for k, v in kernel_options.items() if k in _TORCH_FLAGS or k.startswith(_TORCH_OPTION_PREFIXES)}
    return kept or None


def _torch_flex(fn, query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                return_lse=False, kernel_options=None):
    from torch.nn.attention import flex_attention as fa

    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                  kernel_options=_torch_options(kernel_options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not return_lse:
            return fn(query, key, value, **kwargs)
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(query, key, value, return_aux=fa.AuxRequest(lse=True), **kwargs)
            return out, aux.lse
        return fn(query, key, value, return_lse=True, **kwargs)


def _torch_eager_fn(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return _torch_flex(flex_attention, *args, **kwargs)


_COMPILED: dict = {}


def _torch_compile_fn(*args, **kwargs):
    if "fn" not in _COMPILED:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Every case has new mods and shapes; without this dynamo gives up
        # recompiling after a few and silently runs the unfused eager path.
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 1 << 20)
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _torch_flex(_COMPILED["fn"], *args, **kwargs)


def _torch_common_check(case: FlexCase) -> Optional[str]:
    if case.Bk != case.B and (case.block_size is None or case.mask_B != case.B):
        return ("PyTorch's flex_attention broadcasts a key/value batch of 1 only with a block_mask "
                "built for the whole batch (mask_B == B)")
    return None


def _torch_eager_check(case: FlexCase, device: torch.device) -> Optional[str]:
    reason = _torch_common_check(case)
    if reason:
        return reason
    if case.block_size is not None and not _block_mask_consistent(case):
        return ("eager flex_attention follows mask_mod semantics, and this case's broadcast block mask "
                "disagrees with its mask_mod (oracle.check_block_mask lists where)")
    return None


def _torch_compile_check(case: FlexCase, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return ("torch.compile(flex_attention) needs CUDA here (on CPU it would need Inductor's C++ "
                "backend); run with --device cuda")
    if min(case.E, case.Ev) < 16:
        # Documented by PyTorch 2.11's lowering: "NYI: embedding dimension of the query, key,
        # and value must be at least 16" (42 of 55 fuzz cases on the H100 before this check).
        return f"torch.compile(flex_attention) needs head dims of at least 16, got E={case.E}, Ev={case.Ev}"
    return _torch_common_check(case)


def _block_mask_consistent(case: FlexCase) -> bool:
    """Whether the case's block mask agrees with its mask_mod (only broadcasting can break that)."""
    if case.mask_B == case.B and case.mask_H == case.Hq:
        return True
    return _consistency(case.to_json())


_CONSISTENT: dict = {}


def _consistency(key: str) -> bool:
    if key not in _CONSISTENT:
        import oracle
        from kernels import mods

        from .case import build_block_mask

        case = FlexCase.from_json(key)
        mask_mod = mods.from_spec(case.mask_spec(), "cpu")
        bm = build_block_mask(mask_mod, case.mask_B, case.mask_H, case.L, case.S, case.block_size, "cpu")
        findings = oracle.check_block_mask(bm, case.B, case.Hq, case.L, case.S)
        _CONSISTENT[key] = not any(f.severity == "error" for f in findings)
        if len(_CONSISTENT) > 4096:
            _CONSISTENT.clear()
    return _CONSISTENT[key]


# --------------------------------------------------------------------------
# scaled_dot_product_attention


def _is_identity(spec: Optional[dict]) -> bool:
    if spec is None or spec.get("name") == "identity":
        return True
    return spec.get("name") == "chain" and all(_is_identity(s) for s in spec["mods"])


def _sdpa_check(case: FlexCase, device: torch.device) -> Optional[str]:
    if not _is_identity(case.score):
        return "sdpa cannot express a score_mod (it adds no function of the score)"
    return None


def _sdpa_fn(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
             return_lse=False, kernel_options=None):
    import oracle

    spec = getattr(score_mod, "spec", None)
    if score_mod is not None and not (callable(spec) and _is_identity(spec())):
        raise NotApplicable("sdpa cannot express a score_mod")
    if return_lse:
        raise NotApplicable("sdpa returns no log-sum-exp")
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    if key.shape[0] != B:  # a key/value batch of 1: expand (a view, so gradients reach the original)
        key, value = key.expand(B, *key.shape[1:]), value.expand(B, *value.shape[1:])
    mask = None
    if block_mask is not None:
        mask = oracle.block_mask_to_dense(block_mask, B, Hq, L, S, semantics="blocks").to(query.device)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


# --------------------------------------------------------------------------
# registry


TARGETS: dict = {
    "kernels": Target("kernels", _kernels_fn, _kernels_check, returns_lse=True, returns_max=True,
                      declines=_kernels_declines, description="our Triton kernels (kernels.flex_attention)"),
    "kernels-dq-atomic": Target("kernels-dq-atomic", _kernels_dq_atomic_fn, _kernels_check, returns_lse=True,
                                returns_max=True, declines=_kernels_declines,
                                description="our Triton kernels with backward.DQ_ATOMIC (dQ added by the "
                                            "dK/dV kernel with atomics)"),
    "kernels-one-loop": Target("kernels-one-loop", _kernels_one_loop_fn, _kernels_check, returns_lse=True,
                               returns_max=True, declines=_kernels_declines,
                               description="our Triton kernels with forward.ONE_LOOP and backward.ONE_LOOP "
                                           "(one loop over a tile's partial and full blocks, forward and dQ)"),
    "kernels-one-loop-eager": Target("kernels-one-loop-eager", _kernels_one_loop_eager_fn, _kernels_check,
                                     returns_lse=True, returns_max=True, declines=_kernels_declines,
                                     description="our Triton kernels with forward.ONE_LOOP and "
                                                 "forward.ONE_LOOP_EAGER_MASK (the forward's one loop, its "
                                                 "mask called on every step)"),
    "kernels-heads-in-loop": Target("kernels-heads-in-loop", _kernels_heads_in_loop_fn, _kernels_check,
                                    returns_lse=True, returns_max=True, declines=_kernels_declines,
                                    description="our Triton kernels with backward.HEADS_IN_LOOP (the dK/dV "
                                                "kernel walks a kv head's query heads in each loop)"),
    "kernels-shifted": Target("kernels-shifted", _kernels_shifted_fn, _kernels_check, returns_lse=True,
                              returns_max=True, declines=_kernels_declines,
                              description="our Triton kernels with api.AUTO_EVERYWHERE (the automatic refined "
                                          "lists and shifted windows wherever they can be had, the "
                                          "interpreter included)"),
    "kernels-persistent": Target("kernels-persistent", _kernels_persistent_fn, _kernels_check, returns_lse=True,
                                 returns_max=True, declines=_kernels_declines,
                                 description="our Triton kernels with forward.PERSISTENT_FWD (each forward "
                                             "program walks a list of query tiles)"),
    "kernels-tma": Target("kernels-tma", _kernels_tma_fn, _kernels_check, returns_lse=True, returns_max=True,
                          declines=_kernels_declines,
                          description="our Triton kernels with forward.TMA_KV, backward.TMA_DQ and backward.TMA_DKDV "
                                      "forced on (streamed tiles through TMA descriptors, the interpreter included)"),
    "gluon": Target("gluon", _gluon_fn, _gluon_check, returns_lse=True, takes_kernel_options=False,
                    declines=_gluon_declines,
                    draw_bounds=dict(dtypes=("bfloat16", "float16"), head_dims=(64, 128), equal_head_dims=True,
                                     max_head_dim=128, block_choices=(128, ), learnable=False),
                    description="the Gluon probes (benchmarks/gluon_flex.py), on CPU tensors in "
                                "kernels.gluon_emulator"),
    "torch-compile": Target("torch-compile", _torch_compile_fn, _torch_compile_check,
                            description="torch.compile(torch.nn.attention.flex_attention.flex_attention)"),
    "torch-eager": Target("torch-eager", _torch_eager_fn, _torch_eager_check,
                          backward_on=lambda device: device.type != "cpu",
                          description="PyTorch's eager flex_attention (forward only on CPU)"),
    "sdpa": Target("sdpa", _sdpa_fn, _sdpa_check, returns_lse=False, takes_kernel_options=False,
                   description="torch.nn.functional.scaled_dot_product_attention with a dense boolean mask"),
}


def resolve_target(spec) -> Target:
    """A ``Target`` from a built-in name (``kernels``, ``kernels-dq-atomic``, ``kernels-one-loop``,
    ``kernels-one-loop-eager``, ``kernels-heads-in-loop``, ``kernels-shifted``, ``kernels-persistent``,
    ``kernels-tma``, ``gluon``, ``torch-compile``,
    ``torch-eager``, ``sdpa``), from ``"module:attribute"`` (a ``Target`` or a function with FlexAttention's
    signature), or a ``Target`` itself."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"Expected a target name or 'module:function', got {spec!r}.")
    if spec in TARGETS:
        return TARGETS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"Unknown target {spec!r}. Expected one of {sorted(TARGETS)} or 'module:function' "
            f"(a function with flex_attention's signature)."
        )
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (target {spec!r}).") from None
    if isinstance(obj, Target):
        return obj
    if not callable(obj):
        raise TypeError(f"Expected {spec!r} to be a function or a Target, got {type(obj).__name__}.")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    check = getattr(obj, "applicable", None)
    return Target(
        name=spec, fn=obj,
        check=(lambda case, device: check(case, device)) if callable(check) else _always,
        returns_max="return_max" in params,
        takes_kernel_options="kernel_options" in params or takes_var_kw,
        description=f"{spec} (user function)",
    )
