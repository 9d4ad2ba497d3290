"""Mask and score mods that both the oracle and the kernels run.

Each mod is an object that is callable with PyTorch FlexAttention's signature
(``mask_mod(b, h, q_idx, kv_idx)`` or ``score_mod(score, b, h, q_idx, kv_idx)``),
so the oracle and PyTorch's own ``flex_attention`` accept it, and that can emit
the Triton code the kernels inline. Each has a readable ``name`` and a
JSON-serialisable ``spec()``; ``from_spec`` rebuilds it, tensors included
(bit-identical: tensors a mod holds are drawn from a seed on the CPU).

Inside the generated Triton code the index arguments broadcast against each
other (``m`` is ``[BLOCK_M, 1]``, ``n`` is ``[1, BLOCK_N]``, ``b`` and ``h`` are
scalars or column vectors in the decode kernel) and are always in range: the
kernels clamp them before calling.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = [
    "Mod", "MaskMod", "ScoreMod", "ModProgram", "compile_mods", "from_spec", "as_mask_mod",
    "as_score_mod", "noop", "full", "causal", "sliding_window", "prefix_lm", "attention_sinks", "document",
    "dilated_sliding_window", "chunked", "and_", "or_", "not_", "by_head", "by_batch",
    "table_mask", "identity", "alibi", "relative_position", "tanh_softcap", "bias", "chain",
    "MAX_BUFFERS",
]

# Captured tensors reach the kernels through this many pointer arguments.
MAX_BUFFERS = 4

# The document mask as a range test where its ids are sorted (``_Document.ranges``): a kernel
# whose loop walks keys (forward, dQ, decode) reads its row's first kept key and their count,
# and keeps a key n where ``(n - first) < count`` unsigned: two loads that do not depend on the
# loop's index, where the id compare gathers the ids of every key of the tile on each partial
# step (sm_90, S=4k, a partial step: dQ 420 instructions against 500 at D=64, 462 against 507
# at D=128; forward 430 against 460 and 484 against 499). False: the id compare always. A
# program takes it where compile_mods' ``ranges`` says; kernels.api asks for it in the dQ
# kernel and, from a head dim of DOCUMENT_RANGES_FWD_MIN_DIM, in the forward and decode.
DOCUMENT_RANGES = True
# The same in the dK/dV kernel, whose loop walks queries: its key's first keeping query and
# count. Off: there the id compare gathers the queries' ids alone (the key's are fixed) and the
# range test's subtract a score costs about what it saves (491 instructions a partial step
# against 460 at D=64; at D=128, 584 against 571 and 28 spilled registers; on the H100 the
# backward within 2 % either way, docs/PERFORMANCE.md, fortieth session).
DOCUMENT_RANGES_DKDV = False


# --------------------------------------------------------------------------
# code generation


class _Gen:
    """Collects the statements of one generated Triton function."""

    def __init__(self, buffers: list, interpret: bool = False, gluon: bool = False, rounding: float = 0.0,
                 rcp: Optional[str] = None, loop: str = "n", ranges: bool = False):
        self.lines: list[str] = []
        self.buffers = buffers  # shared by the mask and score functions of one program
        self.interpret = interpret  # for the Triton interpreter: no inline PTX
        self.gluon = gluon  # gluon_functions: 1D row and column loads (load below)
        self.rounding = rounding  # compile_mods' rounding: what a cheaper formula may cost
        self.rcp = rcp  # compile_mods' rcp: the fast tanh's reciprocal (None: TANH_RCP)
        self.notes: dict = {}  # a mod's intermediates by its output's name, for its _emit_grad
        self.loop = loop  # the index the kernel's loop walks: "n" (keys) or "m" (queries, dK/dV)
        self.ranges = ranges  # a document mask may take its range test (DOCUMENT_RANGES)
        self.took_ranges = False  # one did
        self.loads = 0  # gathers emitted (load): whether a mod reads a captured tensor
        self._n = 0

    def tmp(self, expr: str) -> str:
        self._n += 1
        name = f"t{self._n}"
        self.lines.append(f"{name} = {expr}")
        return name

    def stmt(self, line: str) -> None:
        self.lines.append(line)

    def buffer(self, tensor: torch.Tensor) -> str:
        for k, t in enumerate(self.buffers):
            if t is tensor:
                return f"B{k}"
        if len(self.buffers) == MAX_BUFFERS:
            raise ValueError(
                f"Expected at most {MAX_BUFFERS} captured tensors across the score and mask "
                f"mods, got more. Combine tables into one tensor."
            )
        self.buffers.append(tensor)
        return f"B{len(self.buffers) - 1}"

    def load(self, tensor: torch.Tensor, *indices: str) -> str:
        """A gather from a captured contiguous tensor; strides are baked into the code."""
        name = self.buffer(tensor)
        self.loads += 1
        strides = _contiguous_strides(tensor.shape)
        offset = " + ".join(f"({ix}) * {st}" for ix, st in zip(indices, strides))
        if self.gluon:
            # Gluon keeps the broadcast [M, 1] m and [1, N] n in the score tile's layout, one
            # register (and one load) per element a thread holds: a gather indexed by the row or
            # the column alone (and b, h) is loaded on the 1D mr or nr instead, then expanded.
            names = set(re.findall(r"[A-Za-z_]\w*", offset))
            for axis, var in ((1, "m"), (0, "n")):
                if var in names and names <= {"b", "h", var}:
                    offset = re.sub(rf"\b{var}\b", f"{var}r", offset)
                    return f"tl.expand_dims(tl.load({name} + {offset}), {axis})"
        return f"tl.load({name} + {offset})"


def derived_sources(t: torch.Tensor) -> tuple:
    """The current versions of the tensors a derived table was computed from (``_Document.ranges``),
    () for a captured tensor: part of a program's state, so that a program is rebuilt when they
    change in place."""
    return tuple(src._version for src, _ in getattr(t, "_flex_sources", ()))


def _contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


_BUF_ARGS = ", ".join(f"B{k}" for k in range(MAX_BUFFERS))
_GRAD_ARGS = ", ".join(f"G{k}" for k in range(MAX_BUFFERS))


class _Scaled(str):
    """The score a chain's first mod receives: the expression ``(qk * scale)`` (a str, which any mod
    may use as it is), with its two factors, so that a mod that multiplies the score by a constant
    first can fold that constant into the scale (``_times``): one multiply per score fewer."""

    def __new__(cls, qk: str, scale: str):
        self = super().__new__(cls, f"({qk} * {scale})")
        self.qk, self.scale = qk, scale
        return self


def _times(s: str, const: float) -> str:
    """``s * const``, as ``qk * (scale * const)`` where ``s`` is a chain's ``_Scaled`` input: the
    product of the two scalars is taken once per call, not once per score."""
    if isinstance(s, _Scaled):
        return f"{s.qk} * ({s.scale} * {const!r})"
    return f"{s} * {const!r}"


def _function(name: str, args: str, body: list[str], ret: Optional[str]) -> str:
    lines = ["@triton.jit", f"def {name}({args}):"]
    lines += [f"    {line}" for line in body]
    lines.append(f"    return {ret}" if ret is not None else "    return")
    return "\n".join(lines)


@dataclass
class ModProgram:
    """The generated Triton functions for one (score_mod, mask_mod) pair.

    ``score_fn(qk, scale, b, h, m, n, B0..B3)``: the modified score (natural units) of the
    score ``qk * scale`` (the kernels pass the raw product and the scale apart, so that a mod
    can fold its own constant into the scale, ``_Scaled``).
    ``score_bwd_fn(qk, scale, dt, b, h, m, n, valid, B0..B3, G0..G3, GRAD_BUFFERS)``:
    returns the score gradient and, when ``GRAD_BUFFERS``, atomically adds the
    gradients of learnable tensors into ``G*`` at the ``valid`` elements.
    ``mask_fn(b, h, m, n, B0..B3)``: the boolean mask.
    """

    source: str
    score_fn: object
    score_bwd_fn: object
    mask_fn: object
    buffers: list  # contiguous tensors, in slot order
    learnable: list  # slot indices whose tensor requires grad
    has_score: bool
    has_mask: bool
    mask_loads: bool = False  # the mask function gathers from a captured tensor (document ids, a table)
    mask_ranges: bool = False  # the mask function takes a document mask's range test (DOCUMENT_RANGES)
    score_loads: bool = False  # the score function gathers from a captured tensor (ALiBi's slopes, a bias)


_PROGRAMS: dict = {}


def compile_mods(score_mod: Optional["ScoreMod"], mask_mod: Optional["MaskMod"], *,
                 interpret: bool = False, rounding: float = 0.0, rcp: Optional[str] = None,
                 loop: str = "n", ranges: Optional[bool] = None) -> ModProgram:
    """Generate (or fetch from the cache) the Triton functions for the two mods.

    ``interpret`` asks for functions the Triton interpreter can call (CPU tensors).

    ``rounding``: the unit roundoff of the dtype that every value computed from these
    functions is rounded to before it reaches an output, or 0 (the default: some result
    reaches a float32 output, as the forward's LSE does). A mod may then emit a cheaper
    formula whose error bound is at most ``rounding / 100`` in the modded score
    (``tanh_softcap``, ``TANH_FAST_ERR``). ``kernels.api.DTYPE_ROUNDING`` asks for it in bf16
    and fp16: in the backward, where dq, dk and dv are rounded to the inputs' dtype and P and
    dS before their products, and in a forward that returns out alone. A program with a
    learnable captured tensor ignores it: that tensor's gradient is a float32 output.

    ``rcp``: how the fast tanh takes its reciprocal on the GPU in this program, one of
    ``TANH_RCPS`` (None: ``TANH_RCP``; a softcap class's own ``RCP`` comes first). The dK/dV
    kernel's program takes ``TANH_RCP_DKDV`` here (``kernels.api``).

    ``loop``: the index the calling kernel's loop walks, ``"n"`` (the keys: forward, dQ, decode)
    or ``"m"`` (the queries: dK/dV). ``ranges``: a document mask with sorted ids may take its
    range test, which reads what does not vary along the loop (None: ``DOCUMENT_RANGES``; in
    the dK/dV kernel's loop only with ``DOCUMENT_RANGES_DKDV``). The buffers of one call's
    programs may then differ (``ModProgram.buffers``; ``kernels.api.Plan.buffer_args``).
    """
    if rcp is not None and rcp not in TANH_RCPS:
        raise ValueError(f"Expected rcp in {TANH_RCPS} or None, got rcp={rcp!r}.")
    if loop not in ("n", "m"):
        raise ValueError(f"Expected loop in ('n', 'm'), got loop={loop!r}.")
    buffers: list = []
    mask_gen = _Gen(buffers, interpret, loop=loop, ranges=DOCUMENT_RANGES if ranges is None else ranges)
    mask_out = mask_mod._emit(mask_gen) if mask_mod is not None else "True"
    mask_loads = bool(buffers)  # every captured tensor the mask reads went through _Gen.buffer
    fwd = _Gen(buffers, interpret, rounding=rounding, rcp=rcp)
    chain_vals = []
    s = _Scaled("qk", "scale")
    mods = _flatten_chain(score_mod)
    for mod in mods:
        out = mod._emit(fwd, s)
        chain_vals.append((mod, s, out))
        s = out
    score_out = s

    # Backward: recompute forward values, then sweep the chain in reverse.
    bwd = _Gen(buffers, interpret, rounding=rounding, rcp=rcp)
    vals = []
    s = _Scaled("qk", "scale")
    for mod in mods:
        out = mod._emit(bwd, s)
        vals.append((mod, s, out))
        s = out
    grad = "dt"
    for mod, s_in, out in reversed(vals):
        mod._emit_buffer_grad(bwd, s_in, out, grad)
        local = mod._emit_grad(bwd, s_in, out)
        if local != "1.0":
            grad = bwd.tmp(f"{grad} * {local}")

    learnable = [k for k, t in enumerate(buffers) if t.requires_grad]
    if learnable and rounding:
        return compile_mods(score_mod, mask_mod, interpret=interpret, loop=loop, ranges=ranges)
    fns = [
        _function("mask_fn", f"b, h, m, n, {_BUF_ARGS}", mask_gen.lines, mask_out),
        _function("score_fn", f"qk, scale, b, h, m, n, {_BUF_ARGS}", fwd.lines, score_out),
        _function(
            "score_bwd_fn",
            f"qk, scale, dt, b, h, m, n, valid, {_BUF_ARGS}, {_GRAD_ARGS}, GRAD_BUFFERS: tl.constexpr",
            bwd.lines, grad,
        ),
    ]
    source = "import triton\nimport triton.language as tl\n\n\n" + "\n\n\n".join(fns) + "\n"
    module = _PROGRAMS.get((source, interpret))
    if module is None:
        module = _load_source(source, interpret)
        _PROGRAMS[(source, interpret)] = module
    return ModProgram(
        source=source,
        score_fn=module.score_fn,
        score_bwd_fn=module.score_bwd_fn,
        mask_fn=module.mask_fn,
        buffers=buffers,
        learnable=learnable,
        has_score=bool(mods),
        has_mask=mask_mod is not None,
        mask_loads=mask_loads,
        mask_ranges=mask_gen.took_ranges,
        score_loads=fwd.loads > 0,
    )


def gluon_functions(score_mod: Optional["ScoreMod"], mask_mod: Optional["MaskMod"], *,
                    backward: bool = False) -> tuple:
    """The forward's ``mask_fn(b, h, m, n, mr, nr, B0..B3)`` and ``score_fn(score, b, h, m, n, mr, nr,
    B0..B3)`` as Gluon source (``@gluon.jit``, ``gl.`` operations), for a Gluon kernel that defines
    them in its own generated module (``benchmarks/gluon_probe.py``, ``benchmarks/gluon_probe_bwd.py``).
    The code is what ``compile_mods`` emits for the GPU, with each ``tl.`` name replaced by Gluon's
    (``tl.math.fdiv`` is ``gl.fdiv``), except that these take the score itself where
    ``compile_mods``' functions take ``qk`` and its scale (``_Scaled``). The index arguments
    carry the kernel's layouts: ``m`` [M, 1] and ``n`` [1, N] broadcast in the score tile's
    layout, ``mr`` and ``nr`` the same indices 1D in its slices (a gather by the row or the
    column alone loads on those, ``_Gen.load``). With
    ``backward``, also ``score_bwd_fn(score, dt, b, h, m, n, mr, nr, B0..B3)``: d loss / d score given
    ``dt`` = d loss / d (modded score), the chain rule of ``compile_mods`` without its scatter of
    learnable tensors' gradients (a learnable captured tensor is refused). Returns ``(source,
    buffers)``, the buffers in the slots ``compile_mods`` gives them."""
    buffers: list = []
    mask_gen = _Gen(buffers, gluon=True)
    mask_out = mask_mod._emit(mask_gen) if mask_mod is not None else "True"
    fwd = _Gen(buffers, gluon=True)
    s = "score"
    for mod in _flatten_chain(score_mod):
        s = mod._emit(fwd, s)
    fns = [
        _function("mask_fn", f"b, h, m, n, mr, nr, {_BUF_ARGS}", mask_gen.lines, mask_out),
        _function("score_fn", f"score, b, h, m, n, mr, nr, {_BUF_ARGS}", fwd.lines, s),
    ]
    if backward:
        learnable = [t for t in buffers if t.requires_grad]
        if learnable:
            raise ValueError(
                f"Expected no learnable captured tensor in the mods of a Gluon backward, got "
                f"{len(learnable)} that require grad (shapes {[tuple(t.shape) for t in learnable]}); "
                f"detach them, or use kernels.flex_attention, which returns their gradients.")
        bwd = _Gen(buffers, gluon=True)
        vals = []
        s = "score"
        for mod in _flatten_chain(score_mod):
            out = mod._emit(bwd, s)
            vals.append((mod, s, out))
            s = out
        grad = "dt"
        for mod, s_in, out in reversed(vals):
            local = mod._emit_grad(bwd, s_in, out)
            if local != "1.0":
                grad = bwd.tmp(f"{grad} * {local}")
        fns.append(_function("score_bwd_fn", f"score, dt, b, h, m, n, mr, nr, {_BUF_ARGS}", bwd.lines, grad))
    text = "\n\n\n".join(fns)
    text = text.replace("@triton.jit", "@gluon.jit").replace("tl.math.fdiv", "gl.fdiv").replace("tl.", "gl.")
    return text, buffers


def _load_source(source: str, interpret: bool):
    # Triton reads a jitted function's source through inspect, so the code
    # must live in a real file. One file per program text; written atomically
    # so parallel test workers never see half a file.
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    root = os.environ.get("FLEX_ORACLE_CACHE") or os.path.join(
        tempfile.gettempdir(), f"flex_oracle_mods_{os.getuid() if hasattr(os, 'getuid') else 0}"
    )
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"mods_{digest}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    name = f"flex_oracle_generated_mods_{digest}_{'interp' if interpret else 'jit'}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _flatten_chain(score_mod) -> list:
    if score_mod is None:
        return []
    if isinstance(score_mod, _Chain):
        out = []
        for m in score_mod.mods:
            out += _flatten_chain(m)
        return out
    if isinstance(score_mod, _Identity):
        return []
    return [score_mod]


# --------------------------------------------------------------------------
# base classes


class Mod:
    kind = ""  # "mask" or "score"

    @property
    def name(self) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError

    def tensors(self) -> list:
        """Captured tensors, for moving and for gradients."""
        return []

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name

    def to_json(self) -> str:
        return json.dumps(self.spec(), sort_keys=True)


class MaskMod(Mod):
    kind = "mask"

    def __call__(self, b, h, q_idx, kv_idx):
        raise NotImplementedError

    def _emit(self, g: _Gen) -> str:
        raise NotImplementedError

    def __and__(self, other):
        return and_(self, other)

    def __or__(self, other):
        return or_(self, other)

    def __invert__(self):
        return not_(self)


class ScoreMod(Mod):
    kind = "score"

    def __call__(self, score, b, h, q_idx, kv_idx):
        raise NotImplementedError

    def _emit(self, g: _Gen, s: str) -> str:
        raise NotImplementedError

    def _emit_grad(self, g: _Gen, s: str, out: str) -> str:
        """d out / d s as an expression name, or "1.0"."""
        return "1.0"

    def _emit_buffer_grad(self, g: _Gen, s: str, out: str, grad: str) -> None:
        """Statements adding d loss / d buffer, given grad = d loss / d out."""


def as_mask_mod(obj, arg: str = "mask_mod") -> Optional[MaskMod]:
    """Accept a MaskMod (or PyTorch's noop_mask / None); reject plain functions clearly."""
    if obj is None or isinstance(obj, MaskMod):
        return obj
    if getattr(obj, "__name__", "") == "noop_mask" and "flex_attention" in getattr(obj, "__module__", ""):
        return None
    raise TypeError(
        f"Expected {arg} to be a kernels.mods mask mod (e.g. mods.causal(), "
        f"mods.sliding_window(256), mods.and_(...)), got {getattr(obj, '__name__', type(obj).__name__)!r}. "
        f"The kernels inline each mod's Triton code, which a plain Python function does not carry; "
        f"build the mask from kernels.mods, or compare your function with the oracle alone."
    )


def as_score_mod(obj, arg: str = "score_mod") -> Optional[ScoreMod]:
    if obj is None or isinstance(obj, ScoreMod):
        return obj
    raise TypeError(
        f"Expected {arg} to be a kernels.mods score mod (e.g. mods.alibi(slopes), "
        f"mods.tanh_softcap(30.0), mods.bias(table, 'hqk')), got "
        f"{getattr(obj, '__name__', type(obj).__name__)!r}. The kernels inline each mod's Triton "
        f"code, which a plain Python function does not carry."
    )


def _device_of(*xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


# --------------------------------------------------------------------------
# tensors drawn from seeds, so that a case can be saved as JSON and replayed


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class _Table:
    """A captured tensor and how to rebuild it."""

    tensor: torch.Tensor
    recipe: dict = field(default_factory=dict)

    def spec(self) -> dict:
        if self.recipe:
            return dict(self.recipe, requires_grad=self.tensor.requires_grad)
        # Not drawn from a seed: store the values (fine for the small tables mods hold).
        return {
            "values": self.tensor.detach().cpu().tolist(),
            "dtype": _dtype_name(self.tensor.dtype),
            "requires_grad": self.tensor.requires_grad,
        }

    @staticmethod
    def from_spec(spec: dict, device) -> "_Table":
        dtype = _DTYPES[spec["dtype"]]
        if "values" in spec:
            t = torch.tensor(spec["values"], dtype=dtype)
            recipe = {}
        else:
            t = _draw(spec)
            recipe = {k: v for k, v in spec.items() if k != "requires_grad"}
        t = t.to(device)
        if spec.get("requires_grad"):
            t.requires_grad_(True)
        return _Table(t, recipe)


def _draw(recipe: dict) -> torch.Tensor:
    """Draw a tensor on the CPU from a seed: same bits on every machine."""
    gen = torch.Generator().manual_seed(int(recipe["seed"]))
    shape = tuple(recipe["shape"])
    dtype = _DTYPES[recipe["dtype"]]
    kind = recipe["kind"]
    if kind == "normal":
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * float(recipe.get("std", 1.0))
        return t.to(dtype)
    if kind == "uniform":
        lo, hi = recipe.get("low", 0.0), recipe.get("high", 1.0)
        return (torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo).to(dtype)
    if kind == "segments":
        # Sorted document ids: ``count`` documents over ``shape[-1]`` positions.
        n = shape[-1]
        count = max(1, min(int(recipe["count"]), n))
        cuts = torch.randperm(max(n - 1, 1), generator=gen)[: count - 1] + 1 if n > 1 else torch.tensor([], dtype=torch.long)
        ids = torch.zeros(n, dtype=torch.long)
        if len(cuts):
            ids[torch.sort(cuts).values] = 1
        ids = torch.cumsum(ids, 0)
        if recipe.get("shuffled"):  # the same documents, their positions permuted (no range form)
            ids = ids[torch.randperm(n, generator=gen)]
        return ids.to(dtype).expand(shape).contiguous()
    if kind == "bernoulli":
        if recipe.get("rows"):
            # One draw per row (all but the last dimension), the same along it: a row mask.
            keep = torch.rand(shape[:-1] + (1,), generator=gen) < float(recipe["p"])
            return keep.to(dtype).expand(shape).contiguous()
        return (torch.rand(shape, generator=gen) < float(recipe["p"])).to(dtype)
    raise ValueError(f"Unknown tensor recipe kind {kind!r}; expected normal, uniform, segments or bernoulli.")


def seeded(kind: str, shape: Sequence[int], seed: int, dtype=torch.float32, device="cpu",
           requires_grad: bool = False, **params) -> _Table:
    recipe = {"kind": kind, "shape": list(shape), "seed": int(seed), "dtype": _dtype_name(dtype), **params}
    t = _draw(recipe).to(device)
    if requires_grad:
        t.requires_grad_(True)
    return _Table(t, recipe)


def _as_table(x, arg: str, dtype=None) -> _Table:
    if isinstance(x, _Table):
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected {arg} to be a torch.Tensor, got {type(x).__name__}.")
    if dtype is not None and x.dtype != dtype and not (dtype == "int" and not x.is_floating_point()):
        raise TypeError(f"Expected {arg} of dtype {dtype}, got {x.dtype}.")
    if not x.is_contiguous():
        if x.requires_grad:
            raise ValueError(f"Expected a contiguous learnable {arg}; call .contiguous() on the leaf first.")
        x = x.contiguous()
    return _Table(x)


# --------------------------------------------------------------------------
# mask mods


class _Full(MaskMod):
    name = "full"

    def spec(self):
        return {"name": "full"}

    def __call__(self, b, h, q_idx, kv_idx):
        return torch.ones((), dtype=torch.bool, device=_device_of(b, h, q_idx, kv_idx))

    def _emit(self, g):
        return g.tmp("(m >= 0) & (n >= 0)")


def full() -> MaskMod:
    """Every pair allowed (PyTorch's noop mask)."""
    return _Full()


noop = full


class _Causal(MaskMod):
    name = "causal"

    def spec(self):
        return {"name": "causal"}

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def _emit(self, g):
        return g.tmp("m >= n")


def causal() -> MaskMod:
    """Key j is allowed for query i when j <= i."""
    return _Causal()


@dataclass(frozen=True, repr=False)
class _SlidingWindow(MaskMod):
    window: int

    @property
    def name(self):
        return f"sliding_window({self.window})"

    def spec(self):
        return {"name": "sliding_window", "window": self.window}

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= self.window)

    def _emit(self, g):
        return g.tmp(f"(m >= n) & (m - n <= {self.window})")


def _check_int(value, arg: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {arg} to be an int, got {type(value).__name__}.")
    if value < low:
        raise ValueError(f"Expected {arg} >= {low}, got {arg}={value}.")
    return value


def sliding_window(window: int) -> MaskMod:
    """Causal attention to at most ``window`` previous positions (``0 <= i - j <= window``)."""
    return _SlidingWindow(_check_int(window, "window"))


@dataclass(frozen=True, repr=False)
class _PrefixLM(MaskMod):
    prefix: int

    @property
    def name(self):
        return f"prefix_lm({self.prefix})"

    def spec(self):
        return {"name": "prefix_lm", "prefix": self.prefix}

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.prefix) | (q_idx >= kv_idx)

    def _emit(self, g):
        return g.tmp(f"(n < {self.prefix}) | (m >= n)")


def prefix_lm(prefix: int) -> MaskMod:
    """Bidirectional over the first ``prefix`` keys, causal after."""
    return _PrefixLM(_check_int(prefix, "prefix"))


@dataclass(frozen=True, repr=False)
class _AttentionSinks(MaskMod):
    window: int
    sinks: int

    @property
    def name(self):
        return f"attention_sinks({self.window}, {self.sinks})"

    def spec(self):
        return {"name": "attention_sinks", "window": self.window, "sinks": self.sinks}

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((kv_idx < self.sinks) | (q_idx - kv_idx <= self.window))

    def _emit(self, g):
        return g.tmp(f"(m >= n) & ((n < {self.sinks}) | (m - n <= {self.window}))")


def attention_sinks(window: int, sinks: int) -> MaskMod:
    """StreamingLLM: causal, the first ``sinks`` keys plus a sliding ``window``
    (``j <= i`` and (``j < sinks`` or ``i - j <= window``)). Its block lists have a
    gap between the sink blocks and the window's."""
    return _AttentionSinks(_check_int(window, "window"), _check_int(sinks, "sinks"))


@dataclass(frozen=True, repr=False)
class _DilatedSlidingWindow(MaskMod):
    window: int
    dilation: int

    @property
    def name(self):
        return f"dilated_sliding_window({self.window}, {self.dilation})"

    def spec(self):
        return {"name": "dilated_sliding_window", "window": self.window, "dilation": self.dilation}

    def __call__(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d <= self.window) & (d % self.dilation == 0)

    def _emit(self, g):
        return g.tmp(f"(m >= n) & (m - n <= {self.window}) & ((m - n) % {self.dilation} == 0)")


def dilated_sliding_window(window: int, dilation: int) -> MaskMod:
    """Sliding window that keeps every ``dilation``-th key: ``0 <= i-j <= window``, ``(i-j) % dilation == 0``."""
    return _DilatedSlidingWindow(_check_int(window, "window"), _check_int(dilation, "dilation", 1))


@dataclass(frozen=True, repr=False)
class _Chunked(MaskMod):
    chunk: int

    @property
    def name(self):
        return f"chunked({self.chunk})"

    def spec(self):
        return {"name": "chunked", "chunk": self.chunk}

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx // self.chunk) == (kv_idx // self.chunk)

    def _emit(self, g):
        return g.tmp(f"(m // {self.chunk}) == (n // {self.chunk})")


def chunked(chunk: int) -> MaskMod:
    """Block-local attention: i and j in the same chunk of ``chunk`` positions."""
    return _Chunked(_check_int(chunk, "chunk", 1))


class _Document(MaskMod):
    def __init__(self, q_ids: _Table, kv_ids: _Table, causal: bool):
        self.q_ids, self.kv_ids, self.causal = q_ids, kv_ids, causal

    @property
    def name(self):
        n = int(self.kv_ids.tensor.max().item()) + 1 if self.kv_ids.tensor.numel() else 0
        return f"document({n} docs{', causal' if self.causal else ''})"

    def spec(self):
        return {"name": "document", "q_ids": self.q_ids.spec(), "kv_ids": self.kv_ids.spec(),
                "causal": self.causal}

    def tensors(self):
        return [self.q_ids.tensor, self.kv_ids.tensor]

    def __call__(self, b, h, q_idx, kv_idx):
        dev = _device_of(q_idx)
        same = self.q_ids.tensor.to(dev)[q_idx] == self.kv_ids.tensor.to(dev)[kv_idx]
        return same & (q_idx >= kv_idx) if self.causal else same

    def ranges(self) -> Optional[torch.Tensor]:
        """Where both id tables are sorted, the mask as ranges: an int32 [Lq + Sk, 2] table on
        the ids' device (Lq, Sk their lengths), None where either is not sorted.

        Row i < Lq holds (first, count): query i keeps the keys first <= j < first + count
        (with ``causal``, j <= i too). Row Lq + j holds the same for key j: the queries that
        keep it. Sorted ids make each such set one run; ``torch.searchsorted`` finds its ends.
        Computed once per pair of id versions (one host sync where the ids are on a GPU, for the
        sortedness); the table carries its sources (``derived_sources``), so that a program
        built on it is rebuilt when the ids change in place (``kernels.api._table_state``)."""
        q, kv = self.q_ids.tensor, self.kv_ids.tensor
        key = (q._version, kv._version)
        hit = getattr(self, "_ranges_hit", None)
        if hit is not None and hit[0] == key:
            return hit[1]
        q64, kv64 = q.to(torch.int64), kv.to(device=q.device, dtype=torch.int64)
        ordered = bool(((q64[1:] >= q64[:-1]).all() & (kv64[1:] >= kv64[:-1]).all()).item())
        table = None
        if ordered and q64.numel() and kv64.numel():
            rows = torch.arange(q64.numel(), device=q.device)
            first = torch.searchsorted(kv64, q64)
            end = torch.searchsorted(kv64, q64, right=True)
            if self.causal:
                end = torch.minimum(end, rows + 1)
            keys = torch.arange(kv64.numel(), device=q.device)
            q_first = torch.searchsorted(q64, kv64)
            q_end = torch.searchsorted(q64, kv64, right=True)
            if self.causal:
                q_first = torch.maximum(q_first, keys)
            table = torch.cat([torch.stack([first, (end - first).clamp_min(0)], 1),
                               torch.stack([q_first, (q_end - q_first).clamp_min(0)], 1)])
            table = table.to(torch.int32).contiguous()
            table._flex_sources = ((q, q._version), (kv, kv._version))
        self._ranges_hit = (key, table)
        return table

    def _emit(self, g):
        wanted = g.ranges and not g.gluon and (g.loop == "n" or DOCUMENT_RANGES_DKDV)
        table = self.ranges() if wanted else None
        if table is not None:
            lq = self.q_ids.tensor.shape[0]
            # The loop walks keys: the row's keys (first, count); it walks queries: the key's queries.
            own, along = ("m", "n") if g.loop == "n" else (f"n + {lq}", "m")
            g.took_ranges = True
            first, count = g.load(table, own, "0"), g.load(table, own, "1")
            return g.tmp(f"({along} - {first}).to(tl.uint32, bitcast=True) < {count}.to(tl.uint32, bitcast=True)")
        qd = g.load(self.q_ids.tensor, "m")
        kd = g.load(self.kv_ids.tensor, "n")
        expr = f"{qd} == {kd}"
        if self.causal:
            expr = f"({expr}) & (m >= n)"
        return g.tmp(expr)


def document(q_ids, kv_ids=None, *, causal: bool = False) -> MaskMod:
    """Attend within a document: ``q_ids[i] == kv_ids[j]`` (1-D integer tensors, L and S long).

    ``document.from_seed(length, count, seed)`` draws sorted ids for ``count`` documents
    (``shuffled=True``: the same ids in permuted positions). Sorted ids run in the kernels as a
    range test (``DOCUMENT_RANGES``), unsorted ones as the id compare.
    """
    q = _as_table(q_ids, "q_ids")
    kv = q if kv_ids is None else _as_table(kv_ids, "kv_ids")
    for t, arg in ((q, "q_ids"), (kv, "kv_ids")):
        if t.tensor.dim() != 1 or t.tensor.is_floating_point():
            raise ValueError(f"Expected {arg} to be a 1-D integer tensor, got {t.tensor.dtype} of shape {tuple(t.tensor.shape)}.")
    return _Document(q, kv, causal)


def _document_from_seed(length: int, count: int, seed: int, *, kv_length: Optional[int] = None,
                        causal: bool = False, shuffled: bool = False, device="cpu") -> MaskMod:
    extra = {"shuffled": True} if shuffled else {}  # (absent from older recipes: sorted)
    q = seeded("segments", [length], seed, dtype=torch.int32, device=device, count=count, **extra)
    kv = q if kv_length is None or kv_length == length else seeded(
        "segments", [kv_length], seed, dtype=torch.int32, device=device, count=count, **extra)
    return _Document(q, kv, causal)


document.from_seed = _document_from_seed


class _TableMask(MaskMod):
    """A mask read from a captured boolean table indexed by (h, q, kv) (h modulo its size)."""

    def __init__(self, table: _Table):
        self.table = table

    @property
    def name(self):
        t = self.table.tensor
        rows = " rows" if (self.table.recipe or {}).get("rows") else ""
        return f"table_mask({tuple(t.shape)},{rows} density {t.float().mean().item():.2f})"

    def spec(self):
        return {"name": "table_mask", "table": self.table.spec()}

    def tensors(self):
        return [self.table.tensor]

    def __call__(self, b, h, q_idx, kv_idx):
        t = self.table.tensor.to(_device_of(q_idx))
        return t[h % t.shape[0], q_idx, kv_idx] != 0

    def _emit(self, g):
        nh = self.table.tensor.shape[0]
        return g.tmp(f"{g.load(self.table.tensor, f'h % {nh}', 'm', 'n')} != 0")


def table_mask(table: torch.Tensor) -> MaskMod:
    """Mask from a table ``[Ht, L, S]`` of 0/1 (int8/int32/bool stored as int8); head ``h`` reads ``h % Ht``."""
    if not isinstance(table, (torch.Tensor, _Table)):
        raise TypeError(f"Expected table to be a torch.Tensor, got {type(table).__name__}.")
    t = table if isinstance(table, _Table) else _Table(table.to(torch.int8).contiguous())
    if t.tensor.dim() != 3:
        raise ValueError(f"Expected table of shape [H, L, S], got {tuple(t.tensor.shape)}.")
    return _TableMask(t)


def _table_mask_from_seed(heads: int, length: int, kv_length: int, density: float, seed: int,
                          device="cpu", rows: bool = False) -> MaskMod:
    """A seeded 0/1 table: each element 1 with probability ``density``, or with ``rows`` each
    query row all 1 (kept) or all 0 (fully masked) with that probability."""
    extra = {"rows": True} if rows else {}
    return _TableMask(seeded("bernoulli", [heads, length, kv_length], seed, dtype=torch.int8,
                             device=device, p=float(density), **extra))


table_mask.from_seed = _table_mask_from_seed


class _Combine(MaskMod):
    def __init__(self, op: str, mods: tuple):
        self.op, self.mods = op, mods

    @property
    def name(self):
        if self.op == "not":
            return f"not_({self.mods[0].name})"
        return f"{self.op}_({', '.join(m.name for m in self.mods)})"

    def spec(self):
        return {"name": self.op, "mods": [m.spec() for m in self.mods]}

    def tensors(self):
        return [t for m in self.mods for t in m.tensors()]

    def __call__(self, b, h, q_idx, kv_idx):
        vals = [m(b, h, q_idx, kv_idx) for m in self.mods]
        if self.op == "not":
            return ~vals[0]
        out = vals[0]
        for v in vals[1:]:
            out = (out & v) if self.op == "and" else (out | v)
        return out

    def _emit(self, g):
        vals = [m._emit(g) for m in self.mods]
        if self.op == "not":
            return g.tmp(f"{vals[0]} == 0")
        sym = " & " if self.op == "and" else " | "
        return g.tmp(sym.join(f"({v})" for v in vals))


def _check_masks(mods, fn):
    if not mods:
        raise ValueError(f"Expected at least one mask mod for {fn}, got none.")
    for m in mods:
        if not isinstance(m, MaskMod):
            as_mask_mod(m, f"{fn} argument")
    return tuple(mods)


def and_(*mods: MaskMod) -> MaskMod:
    """Allowed where every mod allows."""
    return _Combine("and", _check_masks(mods, "and_"))


def or_(*mods: MaskMod) -> MaskMod:
    """Allowed where any mod allows."""
    return _Combine("or", _check_masks(mods, "or_"))


def not_(mod: MaskMod) -> MaskMod:
    """Allowed where ``mod`` disallows."""
    return _Combine("not", _check_masks((mod,), "not_"))


class _Select(MaskMod):
    """A different mask per head (``h % n``) or per batch (``b % n``)."""

    def __init__(self, axis: str, mods: tuple):
        self.axis, self.mods = axis, mods

    @property
    def name(self):
        return f"by_{self.axis}({', '.join(m.name for m in self.mods)})"

    def spec(self):
        return {"name": f"by_{self.axis}", "mods": [m.spec() for m in self.mods]}

    def tensors(self):
        return [t for m in self.mods for t in m.tensors()]

    def __call__(self, b, h, q_idx, kv_idx):
        sel = (h if self.axis == "head" else b) % len(self.mods)
        out = None
        for k in range(len(self.mods) - 1, -1, -1):
            val = self.mods[k](b, h, q_idx, kv_idx)
            out = val if out is None else torch.where(sel == k, val, out)
        return out

    def _emit(self, g):
        var = "h" if self.axis == "head" else "b"
        vals = [m._emit(g) for m in self.mods]
        out = vals[-1]
        for k in range(len(vals) - 2, -1, -1):
            out = g.tmp(f"tl.where(({var} % {len(vals)}) == {k}, {vals[k]}, {out})")
        return out


def by_head(*mods: MaskMod) -> MaskMod:
    """Head ``h`` uses ``mods[h % len(mods)]`` (a per-head block mask)."""
    return _Select("head", _check_masks(mods, "by_head"))


def by_batch(*mods: MaskMod) -> MaskMod:
    """Batch ``b`` uses ``mods[b % len(mods)]`` (a per-batch block mask)."""
    return _Select("batch", _check_masks(mods, "by_batch"))


# --------------------------------------------------------------------------
# score mods


class _Identity(ScoreMod):
    name = "identity"

    def spec(self):
        return {"name": "identity"}

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score

    def _emit(self, g, s):
        return s


def identity() -> ScoreMod:
    return _Identity()


class _Alibi(ScoreMod):
    def __init__(self, slopes: _Table):
        self.slopes = slopes

    @property
    def name(self):
        return f"alibi({self.slopes.tensor.numel()} heads)"

    def spec(self):
        return {"name": "alibi", "slopes": self.slopes.spec()}

    def tensors(self):
        return [self.slopes.tensor]

    def __call__(self, score, b, h, q_idx, kv_idx):
        slope = self.slopes.tensor.to(score.device)[h]
        return score + slope * (kv_idx - q_idx)

    def _emit(self, g, s):
        slope = g.load(self.slopes.tensor, "h")
        return g.tmp(f"{s} + {slope}.to(tl.float32) * (n - m).to(tl.float32)")


def alibi(slopes) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (j - i)``; ``alibi.standard(H)`` gives the paper's slopes."""
    t = _as_table(slopes, "slopes")
    if t.tensor.dim() != 1 or not t.tensor.is_floating_point():
        raise ValueError(f"Expected slopes to be a 1-D float tensor [H], got {t.tensor.dtype} {tuple(t.tensor.shape)}.")
    return _Alibi(t)


def _alibi_standard(heads: int, device="cpu") -> ScoreMod:
    slopes = torch.tensor([2.0 ** (-8.0 * (k + 1) / heads) for k in range(heads)], dtype=torch.float32)
    return _Alibi(_Table(slopes.to(device)))


alibi.standard = _alibi_standard


class _RelativePosition(ScoreMod):
    """``score + table[h, clamp(j - i, -R, R) + R]``, a learnable-or-fixed table ``[H, 2R+1]``."""

    def __init__(self, table: _Table):
        self.table = table

    @property
    def radius(self):
        return (self.table.tensor.shape[1] - 1) // 2

    @property
    def name(self):
        return f"relative_position(radius {self.radius})"

    def spec(self):
        return {"name": "relative_position", "table": self.table.spec()}

    def tensors(self):
        return [self.table.tensor]

    def __call__(self, score, b, h, q_idx, kv_idx):
        r = self.radius
        t = self.table.tensor.to(score.device)
        return score + t[h, torch.clamp(kv_idx - q_idx, -r, r) + r]

    def _index(self):
        r = self.radius
        return f"tl.minimum(tl.maximum(n - m, -{r}), {r}) + {r}"

    def _emit(self, g, s):
        val = g.load(self.table.tensor, "h", self._index())
        return g.tmp(f"{s} + {val}.to(tl.float32)")

    def _emit_buffer_grad(self, g, s, out, grad):
        if self.table.tensor.requires_grad:
            _emit_atomic(g, self.table.tensor, grad, ["h", self._index()])


def relative_position(table) -> ScoreMod:
    """Relative position bias from ``table [H, 2R+1]`` (learnable if it requires grad)."""
    t = _as_table(table, "table")
    if t.tensor.dim() != 2 or t.tensor.shape[1] % 2 != 1 or not t.tensor.is_floating_point():
        raise ValueError(f"Expected table to be a float tensor [H, 2R+1], got {t.tensor.dtype} {tuple(t.tensor.shape)}.")
    return _RelativePosition(t)


def _emit_atomic(g: _Gen, tensor, grad: str, indices: list) -> None:
    """Scatter-add ``grad`` into the learnable tensor's gradient slot at ``valid`` elements."""
    name = g.buffer(tensor)
    slot = name.replace("B", "G")
    strides = _contiguous_strides(tensor.shape)
    offset = " + ".join(f"({ix}) * {st}" for ix, st in zip(indices, strides))
    g.stmt("if GRAD_BUFFERS:")
    g.stmt(f"    ptrs_{slot} = {slot} + {offset} + (m * 0 + n * 0)")
    g.stmt(f"    tl.atomic_add(ptrs_{slot}, tl.where(valid, {grad}, 0.0), mask=valid, sem='relaxed')")


# The softcap's tanh(x) = x * num(x^2) / den(x^2) on [-TANH_CLAMP, TANH_CLAMP] (past it tanh is
# within 2.3 ulps of 1), coefficients highest power first: a 9/6 rational fitted for float32
# (benchmarks/softcap_tanh.py's fit_rational(4, 3), which tests/test_kernels.py reruns): 1.95e-7
# relative at worst in exact arithmetic. Emulated in float32 (emulated_ulps: FMAs rounded once,
# rcp.approx 1 ulp either way) it is within 6 ulps of float64 tanh over the 4 million points of
# test_gpu_softcap_tanh_accuracy (bound 8) at caps from 0.01 to 1e4. Eigen's 13/6 (the kernels'
# until the twenty-eighth session, softcap_tanh.py's EIGEN_NUM) is within 4, with 2 FMAs more
# per score in a loop that the rational makes issue-bound (sm_90 SASS, the forward that returns
# the LSE, bf16, D=128: 1,771 instructions a trip against causal's 720).
TANH_CLAMP = 7.90531110763549805
TANH_NUM = ("-6.256899214577955e-09", "7.2256124547674554e-06", "0.0027047493305529142", "0.12720476849058704",
            "0.9999998057438451")
TANH_DEN = ("0.00019782013577981366", "0.022885721621196394", "0.4605365353460156", "1.0")


def tanh_cap_folds(cap: float) -> bool:
    """Whether the rational softcap multiplies ``cap`` into num's coefficients (one multiply per
    score fewer) rather than into its result: where every coefficient times ``cap`` stays a normal
    float32 (the smallest is 6e-9, the largest 1)."""
    return 2.0 ** -64 <= cap <= 2.0 ** 64

# The fast tanh of a program compiled with a rounding (compile_mods), from exp2 and one
# reciprocal: e = exp2(2 x log2(e)), r = 1 / (1 + e), tanh(x) = 1 - 2 r and its derivative
# 1 - tanh(x)**2 = 4 r (1 - r), where 1 - r is exact for r >= 1/2 and r keeps its relative
# accuracy for r < 1/2, so that only r stays live between the two. On the GPU e is ex2.approx
# (2 ulps at most) and the reciprocal rcp.approx or Newton's method (1 ulp and 0.78 ulp,
# TANH_RCP below): with u = 2**-24, r is off by at most
# r (2 (1 - r) + 0.5 + 1) u <= 2 u, so tanh by 4 u, plus (1 - tanh**2) |x| u <= 0.45 u from the
# rounding of the exponent's argument (any formula has that one) and 0.5 u from the last
# rounding: 5 u = 3e-7 in all; the derivative by about twice that. That absolute error is far
# from x's own rounding where |x| is small (the relative error that makes it no formula for
# the forward's float32 LSE), and harmless where every result is rounded to bf16: the
# backward's 9 instructions per score against the rational's 20 (sm_90 SASS, kernels/
# backward.py). TANH_FAST_ERR bounds it with room; a softcap takes the formula when
# cap * TANH_FAST_ERR, its bound in the modded score, is at most rounding / 100: cap <= 78 in
# bf16, cap <= 9.7 in fp16. tests/test_kernels.py holds the compiled formula to the bound (the
# interpreter's 3 u and 6 u for tanh and its derivative, from 1e-9 to 200).
TANH_FAST_ERR = 5e-7
_TWO_LOG2E = 2.0 * 1.4426950408889634

# The fast tanh's reciprocal r = 1 / y, y = 1 + e, on the GPU. Its three MUFU operations per score
# (two exp2 and rcp.approx) bound the loop of a forward that returns out alone (sm_90 SASS,
# benchmarks/codegen.py --loops, bf16, D=128: 3,104 MUFU clocks a trip against 2,002 of issue and
# 2,048 of tensor). With TANH_RCP = "split", of each two adjacent elements a thread holds (inline
# PTX, pack 2) one takes rcp.approx and the other Newton's method on the FMA pipes: 2,592 MUFU
# clocks against 2,386 of issue. Newton's method: y clamped to RCP_CLAMP (a NaN kept), so that the
# seed RCP_SEED - bits(y) is a normal float (5 % from 1 / y at worst over every mantissa), then
# RCP_STEPS: "newton" (e = 1 - y r; r = r + r e: 2 FMAs, the error squared) and "cubic" (r = r + r
# (e + e e): 3 FMAs, cubed), 0.78 float32 ulps from 1 / y at worst over every mantissa
# (rcp_newton_reference, tests/test_kernels.py), against rcp.approx's 1 ulp, so TANH_FAST_ERR's
# derivation holds for either. Past the clamp (|x| > 22) tanh is 1 in float32 either way, and the
# derivative 4 r is off by under 4e-19. Measured on the H200 (docs/PERFORMANCE.md, twenty-seventh
# session, bench.py's softcap row, bf16): the forward for out alone 4 % (S=1k) and 6 % (4k) faster
# at D=128, 2 % and 7 % at D=64; the backward 1 to 2 % faster. "mufu": rcp.approx for every
# element (before); "newton": Newton's method for every element (slower than the split: the issue
# then bounds the loop); "split4": of each four adjacent elements one takes rcp.approx and three
# Newton's method (pack 4), for loops that the split leaves MUFU-bound (TANH_RCP_FWD).
TANH_RCP = "split"
TANH_RCPS = ("split", "mufu", "newton", "split4")
# The dK/dV kernel's own choice (None: TANH_RCP), read when the forward builds its plan
# (kernels.api). Its full-block loop is tensor-bound on paper either way (sm_90 SASS, bf16, D=128:
# 2,048 tensor clocks a trip against 1,534 of issue and 1,280 of MUFU with "split", 1,384 and 1,536
# with "mufu"), where the split's Newton steps are 2.3 instructions per score more; the dQ kernel's
# and the forward's loops gain from the split (MUFU-bound, or tied, on "mufu"). At D=64 the split
# is the better one on paper. Untimed: benchmarks/softcap_tanh.py's ours-dkdv-mufu is the A/B.
TANH_RCP_DKDV: Optional[str] = None
# The forward's own where it returns out alone (None: TANH_RCP; a forward that returns the LSE takes
# the rational, no reciprocal of this kind). Its full-block loop is MUFU-bound with the split (sm_90
# SASS, bf16, the twenty-ninth session: 2,592 MUFU clocks a trip against 2,134 of issue at D=128,
# 1,312 against 1,035 at D=64); with "split4" 2,336 against 2,326 and 1,184 against 1,133, 10 %
# less on paper in either, and its partial-block loop, issue-bound either way, 7 % more. The
# backward's loops lose on paper with it (tensor-bound at D=128, and dQ's at D=64 turns
# issue-bound). Measured, it gains nothing (H100, benchmarks/softcap_tanh.py's ours-out-fwd-split4
# against ours-out, bench.py's softcap row, docs/PERFORMANCE.md, twenty-ninth session): 0.306 and
# 0.305 ms at S=1k, 0.862 and 0.862 at 4k (D=128); 0.376 and 0.382, 1.179 and 1.163 (D=64). So
# the split's loop is not MUFU-bound as the clocks above count it; None stays the default.
TANH_RCP_FWD: Optional[str] = None
RCP_SEED = 0x7EF311C7
RCP_STEPS = ("newton", "cubic")
RCP_CLAMP = 2.0 ** 64


def _rcp_newton_ptx(y: str, out: str) -> str:
    """PTX for ``out = 1 / y`` by Newton's method (RCP_SEED, RCP_STEPS, RCP_CLAMP) in the
    registers ``a``, ``r``, ``e`` and the predicate ``p``, which the caller declares."""
    clamp = struct.unpack("<I", struct.pack("<f", RCP_CLAMP))[0]
    lines = [f"setp.gt.f32 p, {y}, 0f{clamp:08X};", f"selp.b32 a, 0f{clamp:08X}, {y}, p;",
             f"sub.s32 r, {RCP_SEED:#x}, a;", "neg.f32 a, a;"]
    for k, step in enumerate(RCP_STEPS):
        dst = out if k == len(RCP_STEPS) - 1 else "r"
        lines.append("fma.rn.ftz.f32 e, a, r, 0f3F800000;")
        if step == "cubic":
            lines.append("fma.rn.ftz.f32 e, e, e, e;")
        elif step != "newton":
            raise ValueError(f"Expected RCP_STEPS of 'newton' and 'cubic', got {step!r}.")
        lines.append(f"fma.rn.ftz.f32 {dst}, r, e, r;")
    return " ".join(lines)


def rcp_newton_reference(y):
    """``_rcp_newton_ptx``'s result for a float32 numpy array ``y``, step for step: each FMA
    exact in float64 and rounded once to float32 (flushing nothing: the seed of a clamped y is a
    normal float). For the tests; the GPU's own is tests/test_kernels.py's GPU test."""
    import numpy as np

    y = np.asarray(y, dtype=np.float32)

    def fma(a, b, c):
        return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)

    a = np.where(y > np.float32(RCP_CLAMP), np.float32(RCP_CLAMP), y).astype(np.float32)
    r = (np.uint32(RCP_SEED) - a.view(np.uint32)).view(np.float32)
    one = np.ones_like(a)
    for step in RCP_STEPS:
        e = fma(-a, r, one)
        if step == "cubic":
            e = fma(e, e, e)
        r = fma(r, e, r)
    return r


def _rcp_asm(how: str) -> tuple:
    """``(asm, constraints, pack)`` of ``tl.inline_asm_elementwise`` for the fast tanh's
    reciprocal (TANH_RCP)."""
    regs = "{ .reg .b32 a, r, e; .reg .pred p; "
    if how == "mufu":
        return "rcp.approx.ftz.f32 $0, $1;", "=r,r", 1
    if how == "newton":
        return regs + _rcp_newton_ptx("$1", "$0") + " }", "=r,r", 1
    if how == "split":
        return regs + "rcp.approx.ftz.f32 $0, $2; " + _rcp_newton_ptx("$3", "$1") + " }", "=r,=r,r,r", 2
    if how == "split4":
        newton = " ".join(_rcp_newton_ptx(f"${k + 4}", f"${k}") for k in (1, 2, 3))
        return regs + "rcp.approx.ftz.f32 $0, $4; " + newton + " }", "=r,=r,=r,=r,r,r,r,r", 4
    raise ValueError(f"Expected kernels.mods.TANH_RCP in {TANH_RCPS}, got {how!r}.")


def _horner(coefs, x: str) -> str:
    """The polynomial with ``coefs`` (highest power first) at ``x``, as Horner's expression."""
    out = coefs[0]
    for c in coefs[1:]:
        out = f"({out}) * {x} + {c}"
    return out


@dataclass(frozen=True, repr=False)
class _TanhSoftcap(ScoreMod):
    cap: float
    RCP = None  # the fast formula's reciprocal (TANH_RCP's choices); None: TANH_RCP

    @property
    def name(self):
        return f"tanh_softcap({self.cap:g})"

    def spec(self):
        return {"name": "tanh_softcap", "cap": self.cap}

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)

    def fast(self, rounding: float) -> bool:
        """Whether a program compiled with ``rounding`` (compile_mods) computes this softcap's
        tanh by the fast formula (TANH_FAST_ERR)."""
        return rounding > 0 and self.cap * TANH_FAST_ERR <= rounding / 100

    def _emit_fast(self, g, s):
        # No clamp: where exp2 overflows to inf, r = 0, tanh = 1 and the derivative 0, as they
        # should; where it underflows to 0, r = 1, tanh = -1 and the derivative 0.
        arg = _times(s, _TWO_LOG2E / self.cap)
        if g.interpret:  # the same values without NumPy's overflow warning (exp2(126) is 8.5e37)
            e = g.tmp(f"tl.math.exp2(tl.minimum({arg}, 126.0))")
            r = g.tmp(f"1.0 / ({e} + 1.0)")
        else:
            e = g.tmp(f"tl.math.exp2({arg})")
            asm, constraints, pack = _rcp_asm(self.RCP or g.rcp or TANH_RCP)
            r = g.tmp(f'tl.inline_asm_elementwise("{asm}", "{constraints}", [{e} + 1.0], dtype=tl.float32, '
                      f'is_pure=True, pack={pack})')
        out = g.tmp(f"{self.cap!r} - {2.0 * self.cap!r} * {r}")  # cap * (1 - 2 r)
        g.notes[out] = r
        return out

    def _emit(self, g, s):
        if self.fast(g.rounding):
            return self._emit_fast(g, s)
        # tanh as a 9/6 rational function of the clamped argument (TANH_NUM;
        # Eigen's 13/6 before): multiply-adds and one reciprocal, no library call.
        # tests/test_kernels.py::test_gpu_softcap_tanh_accuracy holds the
        # compiled function within 8 float32 ulps of float64 over 4 million
        # points (Eigen's passed on the H200 with fdiv, 2026-12-02, and with the rcp
        # form below, 2026-12-03; benchmarks/softcap_tanh.py prints the ulps).
        # The textbook 1 - 2 / (exp(2x) + 1) cancels for small x: 1e-5
        # relative error at x = 0.01, which the float32 LSE check caught.
        x = g.tmp(f"tl.minimum(tl.maximum({_times(s, 1.0 / self.cap)}, {-TANH_CLAMP!r}), {TANH_CLAMP!r})")
        x2 = g.tmp(f"{x} * {x}")
        fold = tanh_cap_folds(self.cap)  # cap * x num / den as x (cap num) / den
        num = _horner([repr(float(c) * self.cap) for c in TANH_NUM] if fold else TANH_NUM, x2)
        den = _horner(TANH_DEN, x2)
        # On the GPU the division is rcp.approx (1 ulp) and a multiply: the fast
        # division (div.full.f32, 2 ulps) that it replaced scales its operands
        # first, and the softcap is bound by these per-score instructions. On the
        # H200 (bf16, S=4096, bench.py's softcap row: tanh_softcap(30), causal) it took
        # the forward from 1.188 to 1.085 ms at D=128 and 1.828 to 1.582 at D=64,
        # the backward from 3.08 to 2.81 and 4.09 to 3.69 ms (docs/PERFORMANCE.md).
        # The IEEE division is a dozen instructions. The interpreter runs no PTX.
        if g.interpret:
            th = g.tmp(f"tl.math.fdiv({x} * ({num}), {den})")
        else:
            r = g.tmp('tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", '
                      f'[{den}], dtype=tl.float32, is_pure=True, pack=1)')
            th = g.tmp(f"{x} * ({num}) * {r}")
        return th if fold else g.tmp(f"{self.cap!r} * {th}")

    def _emit_grad(self, g, s, out):
        if out in g.notes:
            # The fast formula's: 1 - tanh**2 = 4 r (1 - r) = r (4 - 4 r), 4 - 4 r = 4 (1 - r) one FMA,
            # exact for r >= 1/2: one instruction per score fewer than (4 r) (1 - r), rounded alike.
            r = g.notes[out]
            return g.tmp(f"{r} * tl.fma({r}, -4.0, 4.0)")
        th = g.tmp(f"{out} * {1.0 / self.cap!r}")
        return g.tmp(f"1.0 - {th} * {th}")


def tanh_softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma-2 / Grok logit softcapping)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"Expected cap to be a positive finite number, got cap={cap!r}.")
    return _TanhSoftcap(float(cap))


_BIAS_LAYOUTS = {
    # layout: (index expressions, torch indexing)
    "hqk": ("h", "m", "n"),
    "bhq": ("b", "h", "m"),
    "qk": ("m", "n"),
    "h": ("h",),
    "bh": ("b", "h"),
}


class _Bias(ScoreMod):
    """``score + table[index]`` with the table indexed by a named layout."""

    def __init__(self, table: _Table, layout: str):
        self.table, self.layout = table, layout

    @property
    def name(self):
        grad = ", learnable" if self.table.tensor.requires_grad else ""
        return f"bias_{self.layout}({tuple(self.table.tensor.shape)}{grad})"

    def spec(self):
        return {"name": "bias", "layout": self.layout, "table": self.table.spec()}

    def tensors(self):
        return [self.table.tensor]

    def __call__(self, score, b, h, q_idx, kv_idx):
        t = self.table.tensor
        if t.device != score.device:
            t = t.to(score.device)
        names = {"b": b, "h": h, "m": q_idx, "n": kv_idx}
        return score + t[tuple(names[c] for c in _BIAS_LAYOUTS[self.layout])]

    def _emit(self, g, s):
        val = g.load(self.table.tensor, *_BIAS_LAYOUTS[self.layout])
        return g.tmp(f"{s} + {val}.to(tl.float32)")

    def _emit_buffer_grad(self, g, s, out, grad):
        if self.table.tensor.requires_grad:
            _emit_atomic(g, self.table.tensor, grad, list(_BIAS_LAYOUTS[self.layout]))


def bias(table, layout: str = "hqk") -> ScoreMod:
    """Add a captured float table: layout ``"hqk"`` ``[H, L, S]``, ``"bhq"`` ``[B, H, L]``,
    ``"qk"`` ``[L, S]``, ``"h"`` ``[H]``, ``"bh"`` ``[B, H]``. A table that requires grad is
    learnable: the kernels return its exact gradient."""
    if layout not in _BIAS_LAYOUTS:
        raise ValueError(f"Expected layout in {sorted(_BIAS_LAYOUTS)}, got layout={layout!r}.")
    t = _as_table(table, "table")
    if not t.tensor.is_floating_point():
        raise TypeError(f"Expected a floating-point bias table, got {t.tensor.dtype}.")
    if t.tensor.dim() != len(layout):
        raise ValueError(
            f"Expected a {len(layout)}-D table for layout {layout!r}, got shape {tuple(t.tensor.shape)}."
        )
    return _Bias(t, layout)


def _bias_from_seed(shape, seed: int, layout: str = "hqk", *, std: float = 1.0,
                    requires_grad: bool = False, dtype=torch.float32, device="cpu") -> ScoreMod:
    return bias(seeded("normal", shape, seed, dtype=dtype, device=device, std=std,
                       requires_grad=requires_grad), layout)


bias.from_seed = _bias_from_seed


class _Chain(ScoreMod):
    def __init__(self, mods: tuple):
        self.mods = mods

    @property
    def name(self):
        return " then ".join(m.name for m in self.mods)

    def spec(self):
        return {"name": "chain", "mods": [m.spec() for m in self.mods]}

    def tensors(self):
        return [t for m in self.mods for t in m.tensors()]

    def __call__(self, score, b, h, q_idx, kv_idx):
        for m in self.mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    def _emit(self, g, s):  # compile_mods flattens chains; kept for completeness
        for m in _flatten_chain(self):
            s = m._emit(g, s)
        return s


def chain(*mods: ScoreMod) -> ScoreMod:
    """Apply score mods left to right: ``chain(alibi(s), tanh_softcap(30))``."""
    if not mods:
        raise ValueError("Expected at least one score mod for chain, got none.")
    for m in mods:
        as_score_mod(m, "chain argument")
    return _Chain(tuple(mods))


# --------------------------------------------------------------------------
# specs


def from_spec(spec: dict, device="cpu") -> Mod:
    """Rebuild a mod from ``mod.spec()`` (tensors redrawn from their seeds)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"Expected a mod spec dict with a 'name', got {spec!r}.")
    name = spec["name"]
    tab = lambda key: _Table.from_spec(spec[key], device)  # noqa: E731
    if name == "full":
        return full()
    if name == "causal":
        return causal()
    if name == "sliding_window":
        return sliding_window(spec["window"])
    if name == "prefix_lm":
        return prefix_lm(spec["prefix"])
    if name == "attention_sinks":
        return attention_sinks(spec["window"], spec["sinks"])
    if name == "dilated_sliding_window":
        return dilated_sliding_window(spec["window"], spec["dilation"])
    if name == "chunked":
        return chunked(spec["chunk"])
    if name == "document":
        q = tab("q_ids")
        kv = q if spec["kv_ids"] == spec["q_ids"] else tab("kv_ids")
        return _Document(q, kv, bool(spec.get("causal", False)))
    if name == "table_mask":
        return _TableMask(tab("table"))
    if name in ("and", "or"):
        return _Combine(name, tuple(from_spec(s, device) for s in spec["mods"]))
    if name == "not":
        return not_(from_spec(spec["mods"][0], device))
    if name in ("by_head", "by_batch"):
        return _Select(name[3:], tuple(from_spec(s, device) for s in spec["mods"]))
    if name == "identity":
        return identity()
    if name == "alibi":
        return _Alibi(tab("slopes"))
    if name == "relative_position":
        return _RelativePosition(tab("table"))
    if name == "tanh_softcap":
        return tanh_softcap(spec["cap"])
    if name == "bias":
        return _Bias(tab("table"), spec["layout"])
    if name == "chain":
        return chain(*(from_spec(s, device) for s in spec["mods"]))
    raise ValueError(f"Unknown mod name {name!r} in spec.")
