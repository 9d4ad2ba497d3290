"""Plant catalogued faults in a copy of the kernels and check that the properties catch them.

    flex-oracle fault list
    flex-oracle fault show NAME
    flex-oracle fault run [--faults a,b | --sample] [--budget ci|nightly] [--json PATH] [--markdown PATH]

An oracle is only as good as the bugs it catches. Each ``Fault`` of the
``CATALOGUE`` is a small source patch modelled on a bug that shipped in
FlexAttention or FlashAttention. ``plant(fault)`` applies it to a *copy* of
``kernels`` (in a temporary directory, imported under its own package name;
the working tree is never touched), ``hunt(fault)`` fuzzes that copy with the
properties until the first failure and shrinks it, and ``run_faults`` hunts
many faults, each in its own subprocess, so that a fault that crashes or hangs
the interpreter cannot take the run down. A fault is *killed* when a property
fails or the copy raises; a harness error is not a kill.

The child process entry is ``python -m properties.faults hunt NAME ...``.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

__all__ = [
    "Patch", "Fault", "FaultResult", "CATALOGUE", "CI_SAMPLE", "CONTROL", "BUDGETS", "STATUSES",
    "lookup", "patched_sources", "plant", "load_copy", "fault_target", "diff", "hunt", "run_faults", "default_jobs",
    "format_table", "format_markdown", "add_arguments", "command_main", "main",
]

# The files of kernels/ that are never copied: the mods are shared with the original package, so
# that the fuzzer's mods (instances of kernels.mods classes) pass the copy's isinstance checks.
_SHARED = ("mods",)
_PACKAGE_PREFIX = "flex_oracle_fault_"
RESULT_FORMAT = 1

# Statuses of a FaultResult: killed (a property failed or the copy raised), survived (no failure in
# the budget, or a hang past it), crashed (the interpreter died: detected, but flagged), error (the
# harness or the catalogue is at fault, never the planted bug).
STATUSES = ("killed", "survived", "crashed", "error")
_DETECTED = ("killed", "crashed")

BUDGETS = {
    "ci": dict(examples=25, seconds=150.0, shrink_seconds=20.0),
    "nightly": dict(examples=500, seconds=1200.0, shrink_seconds=180.0),
}
# A hunt starts a new Hypothesis run (the next seed) every this many cases: within one run
# Hypothesis soon mostly mutates the cases it has, and a budget of 25 then sees few kinds of case.
HUNT_RESTART_EVERY = 5
# A child may run this much past seconds + shrink_seconds (start-up, the case under way when the
# search deadline passes) before it is taken for hung and killed.
HANG_GRACE_SECONDS = 120.0
# Where plant() makes its temporary directories when set: run_faults points its children at its
# own work directory, so that a child killed by a signal (no atexit) leaves nothing behind.
PLANT_DIR_ENV = "FLEX_ORACLE_FAULT_DIR"


# --------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class Patch:
    """Replace every occurrence of ``old`` in ``kernels/<module>.py`` by ``new``;
    ``old`` must occur exactly ``count`` times (checked when planted)."""

    module: str  # "forward", "backward", "decode" or "api": a file of kernels/
    old: str
    new: str
    count: int = 1


@dataclass(frozen=True)
class Fault:
    """A named bug: patches of the kernels' source, what they break and the shipped bug behind them."""

    name: str  # a Python identifier: the planted package is flex_oracle_fault_<name>
    klass: str  # the fault class, e.g. "online-softmax rescale"
    patches: tuple  # of Patch
    description: str  # one sentence: what the planted bug does
    history: str = ""  # the shipped FlexAttention / FlashAttention bug it is modelled on

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(
                f"Expected a fault name that is a Python identifier (it names the planted package "
                f"{_PACKAGE_PREFIX}<name>), got {self.name!r}. Use letters, digits and underscores."
            )
        patches = tuple(self.patches)
        object.__setattr__(self, "patches", patches)
        for k, p in enumerate(patches):
            where = f"fault {self.name!r}, patch {k}"
            if not isinstance(p, Patch):
                raise TypeError(f"Expected {where} to be a Patch, got {type(p).__name__}.")
            if not p.module.isidentifier() or p.module in _SHARED + ("__init__",):
                raise ValueError(
                    f"Expected {where} to patch a copied module of kernels/ (forward, backward, decode, "
                    f"api, ...), got module={p.module!r}; {', '.join(_SHARED)} is shared, not copied."
                )
            if not isinstance(p.old, str) or not isinstance(p.new, str) or not p.old:
                raise ValueError(f"Expected {where} to have a non-empty old text and a new text (strings).")
            if p.old == p.new:
                raise ValueError(f"Expected {where} ({p.module}) to change something: old == new.")
            if isinstance(p.count, bool) or not isinstance(p.count, int) or p.count < 1:
                raise ValueError(f"Expected {where} to have a positive count, got count={p.count!r}.")

    @property
    def modules(self) -> tuple:
        """The kernels modules the fault patches, in order of first appearance."""
        return tuple(dict.fromkeys(p.module for p in self.patches))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Fault":
        patches = tuple(Patch(**p) for p in data.get("patches", ()))
        return cls(data["name"], data["klass"], patches, data["description"], data.get("history", ""))


CONTROL = Fault(
    "control", "control", (),
    "No patch: a plain copy of the kernels, to show that planting by itself changes nothing.",
)

# Add a fault: one entry, its patch text copied from kernels/ (tests/test_faults.py checks that every
# patch still applies to the current source), and its name in CI_SAMPLE if CI should hunt it.
CATALOGUE: tuple = (
    Fault(
        "fwd_rescale_missing", "online-softmax rescale",
        (Patch("forward", "v, acc * alpha[:, None], FP32_PRECISION, UPCAST)", "v, acc, FP32_PRECISION, UPCAST)"),),
        "The forward kernel does not rescale the running output when the row maximum grows, so "
        "earlier KV tiles keep weights relative to a stale maximum.",
        "The FlashAttention invariant (Dao et al. 2022, acc *= exp(m_old - m_new)) that hand-written "
        "kernels drop; wrong only when a later tile raises the row max.",
    ),
    Fault(
        "fwd_lse_base2", "LSE units",
        (Patch("forward", "tl.store(LSE + stat_offs, (m_i + tl.math.log2(l_safe)) * LN2",
               "tl.store(LSE + stat_offs, (m_i + tl.math.log2(l_safe))"),),
        "The forward kernel stores the LSE in base 2 (its internal units) instead of the natural log, "
        "so the LSE, and the backward pass that reads it, are off by the factor 1/ln 2.",
        "FlexAttention keeps statistics in base 2 and converts at the boundary (pytorch#133159); "
        "pytorch#181645 (FLASH backend LSE off by ln 2) and tokenspeed#571 (base-2 LSE from a "
        "gluon prefill kernel) got the conversion wrong.",
    ),
    Fault(
        "bwd_dq_scale_missing", "softmax scale",
        (Patch("backward", "dq = dq * SM_SCALE", "dq = dq"),),
        "The backward kernel leaves the softmax scale out of dQ, so dq is 1/scale times too large.",
        "Scale slips in attention backward passes: flash-sparse-attention#203 (dQ scaled twice), "
        "flash-attention#2651 (FA4's backward lost softmax_scale for dK).",
    ),
    Fault(
        "api_scale_uses_value_dim", "softmax scale",
        (Patch("api", "1.0 / math.sqrt(E)", "1.0 / math.sqrt(Ev)"),),
        "The default scale is taken from the value head dim Ev instead of the query/key head dim E; "
        "wrong only when Ev != E and no scale is given.",
        "Default scales computed from the wrong dimension: ROCm/hip-ep#621 (head size from packed "
        "QKV), vit-pytorch#65 (model dim instead of head dim).",
    ),
    # ---- forward: key/value tails ------------------------------------------------------------
    Fault(
        "fwd_kv_tail_partial_unmasked", "key/value tail",
        (Patch("forward", "keep = keep & (n2 < KV_LEN)", "keep = keep"),),
        "In partial blocks the forward kernel drops the key-length bound, so the zero-padded keys "
        "past S in the last block get score 0 wherever mask_mod allows their wrapped index.",
        "The seqlen_k bound of the last block that FlashAttention-style kernels must apply; "
        "FlexAttention relies on mask_mod never seeing kv_idx >= S.",
    ),
    Fault(
        "fwd_kv_tail_full_unmasked", "key/value tail",
        (Patch("forward", 's = tl.where(n2 < KV_LEN, s, float("-inf"))', "s = s + 0.0"),),
        "Full blocks skip the key-length bound, so padded keys of a last full block join the softmax "
        "with score score_mod(0): visible where the real scores are not far above 0.",
        "Full blocks must still be bounded by the sequence length: PyTorch flex_attention's "
        "IS_DIVISIBLE handling of the last block.",
    ),
    Fault(
        "fwd_kv_tail_off_by_one", "key/value tail",
        (Patch("forward", "s = tl.where(n2 < KV_LEN, s", "s = tl.where(n2 <= KV_LEN, s"),),
        "An off-by-one bound in full blocks lets the first padded key (index S) into the softmax.",
        "Off-by-one sequence bounds (`<=` for `<`), the commonest tail bug in hand-written kernels.",
    ),
    Fault(
        "fwd_len_swapped", "L and S swapped",
        (Patch("forward", "keep = keep & (n2 < KV_LEN)", "keep = keep & (n2 < Q_LEN)"),),
        "Partial blocks bound the key index by the query length L instead of S: keys are dropped "
        "when L < S and padded keys let in when L > S.",
        "Q_LEN / KV_LEN confusions in flex templates (cross-attention with L != S).",
    ),
    # ---- forward: which blocks are visited -----------------------------------------------------
    Fault(
        "fwd_partial_as_full", "partial block treated as full",
        (Patch("forward", "SCORE_FN, MASK_FN, HAS_SCORE, False, False,", "SCORE_FN, MASK_FN, HAS_SCORE, True, False,",
               count=2),
         Patch("forward", "return it < num_part * TILES  # a partial block's step",
               "return False  # a partial block's step")),
        "The forward kernel walks partial blocks without evaluating mask_mod, as if they were full "
        "(in either loop form: two loops, or one with the mask in a branch; the grid's kernel and the "
        "persistent one).",
        "A block classified full that is only partial: the block-mask mistake the two lists invite.",
    ),
    Fault(
        "fwd_full_blocks_skipped", "full-block pass skipped",
        (Patch("forward", "n_full = tl.load(FULL_NUM + row)", "n_full = 0 * tl.load(FULL_NUM + row)"),),
        "The forward kernel never walks the full-block lists, so every full block is left out (in "
        "either loop form, and in the persistent kernel).",
        "The second (full-block) loop of FlexAttention's kernels forgotten or misconfigured.",
    ),
    Fault(
        "fwd_block_count_overrun", "block indices past the row's count",
        (Patch("forward", "n_part = tl.load(KV_NUM + row)",
               "n_part = tl.minimum(tl.load(KV_NUM + row) + 1, NUM_KV_SPARSE)"),),
        "The forward kernel reads one entry past each row's partial-block count (within the row's "
        "capacity) and visits that block too, as a partial block.",
        "kv_indices rows are padded past kv_num_blocks with the unlisted (or fully listed) block "
        "ids; a kernel that trusts the capacity, not the count, visits them.",
    ),
    Fault(
        "fwd_one_loop_join_early", "partial block treated as full",
        (Patch("forward", "return it < num_part * TILES  # a partial block's step",
               "return it < (num_part - 1) * TILES  # a partial block's step"),),
        "The forward's one loop (kernels.forward.ONE_LOOP, the default for masks that load nothing) "
        "counts each row's last partial block to the full list, so mask_mod is not applied there.",
        "An off-by-one at the join of two block lists walked in one loop: the step where the "
        "partial list ends and the full list begins.",
    ),
    Fault(
        "fwd_contiguous_assumed", "jump between non-contiguous blocks",
        (Patch("forward", "kv_block = next_listed(IDX, first, it, num_blocks, TILES, CONTIGUOUS)",
               "kv_block = next_listed(IDX, first, it, num_blocks, TILES, True)"),
         Patch("forward", "next_listed_of_two(IDX, FIDX, first, f_first, it, num_part, num_blocks, TILES, CONTIGUOUS)",
               "next_listed_of_two(IDX, FIDX, first, f_first, it, num_part, num_blocks, TILES, True)")),
        "The forward kernel assumes each row's blocks are consecutive (first + k) even without "
        "BLOCKS_ARE_CONTIGUOUS, so it visits the wrong blocks after a gap.",
        "The seed's pointer-jump arithmetic between listed blocks (get_offset_for_next_block).",
    ),
    Fault(
        "fwd_mask_head_ignored", "per-head block-mask indexing",
        (Patch("forward", "row = ((off_z % SPARSE_Z) * SPARSE_H + off_h % SPARSE_H) * NUM_Q_SPARSE + q_block",
               "row = ((off_z % SPARSE_Z) * SPARSE_H) * NUM_Q_SPARSE + q_block"),),
        "The forward kernel reads head 0's block lists for every head of a per-head block mask.",
        "Per-head sparsity indexed with a broadcast head stride (block masks with H > 1).",
    ),
    # ---- forward: heads and batches ------------------------------------------------------------
    Fault(
        "fwd_gqa_interleaved", "GQA head mapping",
        (Patch("forward", "off_hkv = off_h // G", "off_hkv = off_h % (HQ // G)"),),
        "Query head h reads key/value head h % Hkv (repeat) instead of h // G (repeat_interleave).",
        "GQA head mappings written as h % G or h % Hkv (SPEC section 1 fixes h // G).",
    ),
    Fault(
        "fwd_kv_batch_zero", "Bk == 1 batch index",
        (Patch("forward", "off_zkv = off_z % ZKV", "off_zkv = off_z * 0"),),
        "The forward kernel always reads key/value batch 0, the broadcast path taken for every batch.",
        "Broadcast key/value batches (Bk == 1) handled by zeroing the batch index everywhere.",
    ),
    # ---- forward: the online softmax and its statistics ---------------------------------------
    Fault(
        "fwd_row_sum_not_rescaled", "online-softmax rescale",
        (Patch("forward", "l_i = l_i * alpha + tl.sum(p, 1)", "l_i = l_i + tl.sum(p, 1)"),),
        "The running row sum is not rescaled when the row maximum grows.",
        "The denominator half of the FlashAttention rescale, dropped on its own.",
    ),
    Fault(
        "fwd_lse_sign", "LSE units",
        (Patch("forward", "(m_i + tl.math.log2(l_safe)) * LN2", "(m_i - tl.math.log2(l_safe)) * LN2"),),
        "The LSE is stored as max - log(sum) instead of max + log(sum).",
        "Sign slips in the LSE epilogue; the backward then recomputes P from the wrong LSE.",
    ),
    Fault(
        "fwd_masked_row_nan", "fully masked rows",
        (Patch("forward", '    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
               "    m_use = m_new"),),
        "Without the guard for rows with nothing allowed yet, exp2(-inf - -inf) gives NaN.",
        "NaN outputs on fully masked rows, where the running max stays -inf.",
    ),
    Fault(
        "fwd_masked_row_div0", "fully masked rows",
        (Patch("forward", "out = acc / l_safe[:, None]", "out = acc / l_i[:, None]"),),
        "The output is divided by a row sum that is 0 on fully masked rows: 0 / 0 = NaN.",
        "SPEC section 2 requires out = 0 on fully masked rows; several kernels returned NaN.",
    ),
    # ---- forward: layout and precision ---------------------------------------------------------
    Fault(
        "fwd_out_stride_contiguous", "output stride",
        (Patch("forward", "*query.stride(), *key.stride(), *value.stride(), *out.stride(),",
               "*query.stride(), *key.stride(), *value.stride(), *out.new_empty(out.shape).stride(),"),),
        "The forward kernel writes the output with contiguous strides although the output follows "
        "the query's (possibly transposed) layout.",
        "Kernels that assume a contiguous [B, H, L, D] output while the caller passed another layout.",
    ),
    Fault(
        "fwd_lse_low_precision", "precision: early cast",
        (Patch("forward", "tl.store(LSE + stat_offs, (m_i + tl.math.log2(l_safe)) * LN2, mask=offs_m < Q_LEN)",
               "tl.store(LSE + stat_offs, ((m_i + tl.math.log2(l_safe)) * LN2).to(Q.dtype.element_ty)"
               ".to(tl.float32), mask=offs_m < Q_LEN)"),),
        "The LSE is rounded to the input dtype before it is stored (and the backward reads it).",
        "LSE kept in bf16/fp16 instead of float32.",
    ),
    Fault(
        "fwd_scores_early_cast", "precision: early cast",
        (Patch("forward", "qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_PRECISION, UPCAST)",
               "qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_PRECISION, UPCAST)"
               ".to(q.dtype).to(tl.float32)"),),
        "The forward kernel rounds the scores q.k to the input dtype before the softmax.",
        "Score matrices materialised in bf16 before softmax (the precision loss flash kernels avoid).",
    ),
    # ---- backward ---------------------------------------------------------------------------------
    Fault(
        "bwd_dk_scale_doubled", "softmax scale",
        (Patch("backward", "dk = dk * SM_SCALE", "dk = dk * SM_SCALE * SM_SCALE"),),
        "The backward kernel applies the softmax scale to dK twice.",
        "A softmax scale applied twice in an attention backward pass.",
    ),
    Fault(
        "bwd_delta_ignores_dlse", "delta and the LSE gradient",
        (Patch("backward", "delta = delta - tl.load(DLSE + stat, mask=offs_m < Q_LEN, other=0.0)", "delta = delta"),),
        "delta = rowsum(dO * O) leaves out the LSE's own gradient, so a loss on the LSE gives wrong "
        "dq and dk.",
        "An LSE returned to the user whose own gradient never reaches the backward.",
    ),
    Fault(
        "bwd_gqa_first_head_only", "GQA head mapping",
        (Patch("backward", "for g in range(0, G // HEADS):", "for g in range(0, 1):"),),
        "dK and dV sum over the first query head of each GQA group only.",
        "GQA backward passes that forget to reduce dK/dV over the query heads of a group.",
    ),
    Fault(
        "bwd_dq_gqa_interleaved", "GQA head mapping",
        (Patch("backward", "off_hkv = off_h // G", "off_hkv = off_h % (HQ // G)"),),
        "In the dQ kernel query head h reads key/value head h % Hkv instead of h // G.",
        "A GQA mapping fixed in the forward but not in the backward.",
    ),
    Fault(
        "bwd_broadcast_batch_grad_lost", "Bk == 1 batch index",
        (Patch("backward", "dk = dk.sum(0, keepdim=True).to(key.dtype)", "dk = dk[:1].to(key.dtype)"),),
        "With a broadcast key/value batch (Bk == 1), dK keeps query batch 0's contribution only.",
        "Gradients of broadcast inputs not reduced over the broadcast dimension.",
    ),
    Fault(
        "bwd_bias_grad_batch_lost", "captured-bias gradient",
        (Patch("backward", "dsT = SCORE_BWD_FN(qkT, scale, dtT, off_z, h, m_mod, n_mod, keep, B0, B1, B2, B3,",
               "dsT = SCORE_BWD_FN(qkT, scale, dtT, off_z, h, m_mod, n_mod, keep & (off_z == 0), B0, B1, B2, B3,"),),
        "A learnable table's gradient collects batch 0's contributions only.",
        "Captured-buffer gradients accumulated for one batch only.",
    ),
    Fault(
        "bwd_bias_grad_head_lost", "captured-bias gradient",
        (Patch("backward", "dsT = SCORE_BWD_FN(qkT, scale, dtT, off_z, h, m_mod, n_mod, keep, B0, B1, B2, B3,",
               "dsT = SCORE_BWD_FN(qkT, scale, dtT, off_z, h, m_mod, n_mod, keep & (h == 0), B0, B1, B2, B3,"),),
        "A learnable table's gradient collects query head 0's contributions only.",
        "Captured-buffer gradients accumulated for one head only.",
    ),
    Fault(
        "bwd_partial_as_full", "partial block treated as full",
        (Patch("backward", "SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, GRAD_BUFFERS, False,",
               "SCORE_FN, SCORE_BWD_FN, MASK_FN, HAS_SCORE, GRAD_BUFFERS, True,"),),
        "The dK/dV kernel walks partial blocks without mask_mod.",
        "A backward that treats the q-side partial lists as full.",
    ),
    Fault(
        "bwd_dq_full_blocks_skipped", "full-block pass skipped",
        (Patch("backward", "        if HAS_FULL:\n            full_idx = ", "        if False:\n            full_idx = "),),
        "The dQ kernel never walks the full-block lists.",
        "The full-block loop of the dQ pass forgotten.",
    ),
    Fault(
        "bwd_mask_head_uses_kv_head", "per-head block-mask indexing",
        (Patch("backward", "col = ((off_z % SPARSE_Z) * SPARSE_H + off_h % SPARSE_H) * NUM_KV_SPARSE + kv_block",
               "col = ((off_z % SPARSE_Z) * SPARSE_H + off_hkv % SPARSE_H) * NUM_KV_SPARSE + kv_block"),),
        "The dK/dV kernel indexes a per-head block mask by the key/value head instead of the query head.",
        "Per-head block masks combined with GQA, indexed by the wrong head.",
    ),
    Fault(
        "bwd_kv_tail_bias_grad", "key/value tail",
        (Patch("backward", "keep = (m2 < Q_LEN) & (offs_n[:, None] < KV_LEN)", "keep = m2 < Q_LEN"),),
        "The dK/dV kernel drops the key-length bound: padded keys' score gradients flow into a "
        "learnable table at wrapped indices (dK and dV rows past S are never stored).",
        "Tail masking that protects the stored tensors but not the captured-buffer gradients.",
    ),
    # ---- decode ---------------------------------------------------------------------------------------
    Fault(
        "decode_combine_masked_split_nan", "decode split combine",
        (Patch("decode", '        m_new = tl.maximum(m, m_t)\n        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
               "        m_new = tl.maximum(m, m_t)\n        m_use = m_new"),),
        "The split combine rescales by exp2(m_t - M) without a guard: a row whose first splits "
        "allow nothing gets NaN.",
        "Split-KV decoding's combine on splits with nothing allowed (m = -inf on both sides).",
    ),
    Fault(
        "decode_gqa_interleaved", "GQA head mapping",
        (Patch("decode", "offs_h = off_hkv * G + off_g", "offs_h = off_g * HKV + off_hkv"),),
        "The decode kernel packs query heads hkv, hkv + Hkv, ... with key/value head hkv "
        "(repeat instead of repeat_interleave).",
        "GQA packing in split-KV decode kernels (flash-decoding's head grouping).",
    ),
    Fault(
        "decode_last_tiles_dropped", "decode split",
        (Patch("decode", "tiles_per_split = _runtime.cdiv(n_tiles, splits)\n    splits = _runtime.cdiv(n_tiles, tiles_per_split)",
               "tiles_per_split = n_tiles // splits"),),
        "The split size is rounded down, so the key tiles past splits * tiles_per_split are never read.",
        "Split-KV sizes computed with floor division (flash-decoding num_splits heuristics).",
    ),
    Fault(
        "decode_partial_as_full", "partial block treated as full",
        (Patch("decode", "allowed = (member_col == 2) | ((member_col == 1) & keep)  # FULL, PARTIAL",
               "allowed = member_col > 0"),),
        "The decode kernel ignores mask_mod on partial blocks.",
        "The decode template's partial/full distinction lost.",
    ),
    Fault(
        "decode_mask_head_uses_kv_head", "per-head block-mask indexing",
        (Patch("decode", "mask_row = (((off_z % SPARSE_Z) * SPARSE_H + offs_h % SPARSE_H) * NUM_Q_SPARSE",
               "mask_row = (((off_z % SPARSE_Z) * SPARSE_H + off_hkv % SPARSE_H) * NUM_Q_SPARSE"),),
        "The decode kernel reads the block lists of the key/value head for every packed query head.",
        "Per-head block masks with GQA packing in decode.",
    ),
)

# Quick kills on the CPU (a few cases each in the catalogue run), one or more in each kernel file.
# fwd_partial_as_full (case 3) stands for the block structure where fwd_full_blocks_skipped (case
# 11, 40 s of the twenty-sixth session's table) did: the test that hunts the sample was the CI
# run's slowest (152 s on its 2 cores).
CI_SAMPLE: tuple = ("fwd_lse_base2", "fwd_partial_as_full", "bwd_dq_scale_missing", "bwd_gqa_first_head_only",
                    "decode_partial_as_full", "api_scale_uses_value_dim")


def lookup(name: str) -> Fault:
    """The catalogued fault (or ``control``) called ``name``."""
    for fault in CATALOGUE + (CONTROL,):
        if fault.name == name:
            return fault
    raise ValueError(f"Unknown fault {name!r}. Known: {', '.join(_known_names())}.")


def _known_names() -> list:
    return [f.name for f in CATALOGUE] + [CONTROL.name]


# --------------------------------------------------------------------------
# planting


def _kernels_dir() -> str:
    """The directory of the ``kernels`` package this process imports (found without importing it)."""
    module = sys.modules.get("kernels")
    if module is not None and getattr(module, "__file__", None):
        return os.path.dirname(os.path.abspath(module.__file__))
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Expected the kernels package to be importable (pip install -e . in the checkout).")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def _original_sources() -> dict:
    """Module name -> source text of every copied module of kernels/ (all but __init__ and mods)."""
    root = _kernels_dir()
    sources = {}
    for entry in sorted(os.listdir(root)):
        name, ext = os.path.splitext(entry)
        if ext != ".py" or name == "__init__" or name in _SHARED:
            continue
        with open(os.path.join(root, entry), encoding="utf-8") as f:
            sources[name] = f.read()
    return sources


def patched_sources(fault: Fault) -> dict:
    """Module name -> source of every copied kernels module with ``fault``'s patches applied.

    Raises ValueError, naming the fault and the module, when a patch's ``old`` text does not
    occur exactly ``count`` times (the kernels changed under the catalogue: update the patch).
    """
    sources = _original_sources()
    for k, p in enumerate(fault.patches):
        if p.module not in sources:
            raise ValueError(
                f"Fault {fault.name!r}, patch {k}: kernels/{p.module}.py does not exist (copied modules: "
                f"{', '.join(sources)})."
            )
        found = sources[p.module].count(p.old)
        if found != p.count:
            raise ValueError(
                f"Fault {fault.name!r}, patch {k}: expected its old text {_clip(p.old)!r} {p.count} time(s) "
                f"in kernels/{p.module}.py, found it {found} time(s). Update the patch to the current "
                f"source (or its count)."
            )
        sources[p.module] = sources[p.module].replace(p.old, p.new)
    return sources


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


_PLANTED: dict = {}  # fault name -> (fault, package)


def plant(fault: Fault):
    """A package ``flex_oracle_fault_<name>``: a copy of ``kernels`` with ``fault`` planted.

    The copy lives in a temporary directory for the life of the process (Triton reads the
    jitted functions' source from disk) and shares ``kernels.mods`` with the original. Planted
    once per fault name and process. Raises ValueError when a patch does not apply.
    """
    cached = _PLANTED.get(fault.name)
    if cached is not None:
        if cached[0] != fault:
            raise ValueError(
                f"Another fault named {fault.name!r} is already planted in this process; give this "
                f"one its own name."
            )
        return cached[1]
    sources = patched_sources(fault)
    module = load_copy(
        _PACKAGE_PREFIX + fault.name, sources,
        f'"""flex-oracle kernels with fault {fault.name!r} planted (properties.faults). A copy: '
        f'do not edit."""\n\nfrom . import mods\nfrom .api import flex_attention\n\nFAULT = {fault.name!r}\n',
        tmp_prefix=f"flex-oracle-fault-{fault.name}-", tmp_dir=os.environ.get(PLANT_DIR_ENV) or None)
    _PLANTED[fault.name] = (fault, module)
    return module


def load_copy(package: str, sources: dict, init_text: str, tmp_prefix: str, tmp_dir: Optional[str] = None):
    """Import ``sources`` ({module name: text}, the files of ``kernels/`` but ``mods`` and
    ``__init__``) as the package ``package``, whose ``__init__`` is ``init_text``, sharing
    ``kernels.mods``. The files live in a temporary directory for the life of the process
    (Triton reads the jitted functions' source from disk). ``benchmarks/ab.py`` loads git
    revisions of the kernels this way."""
    import kernels  # sets TRITON_INTERPRET on a machine without CUDA before the copy defines kernels
    import kernels.mods

    root = tempfile.mkdtemp(prefix=tmp_prefix, dir=tmp_dir)
    atexit.register(shutil.rmtree, root, True)
    directory = os.path.join(root, package)
    os.mkdir(directory)
    for name, text in sources.items():
        with open(os.path.join(directory, f"{name}.py"), "w", encoding="utf-8") as f:
            f.write(text)
    init = os.path.join(directory, "__init__.py")
    with open(init, "w", encoding="utf-8") as f:
        f.write(init_text)
    importlib.invalidate_caches()
    spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{package}.mods"] = kernels.mods
    sys.modules[package] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
        raise
    return module


def fault_target(fault: Fault):
    """A ``properties.targets.Target`` named ``fault:<name>`` that runs the planted copy,
    applicable where the ``kernels`` target is."""
    from . import targets

    package = plant(fault)
    return targets.Target(
        f"fault:{fault.name}", package.flex_attention, targets._kernels_check, returns_lse=True,
        returns_max=True, description=f"our kernels with fault {fault.name!r} planted ({fault.klass})",
    )


def diff(fault: Fault) -> str:
    """A unified diff of the planted modules against kernels/ (empty for the control)."""
    originals = _original_sources()
    patched = patched_sources(fault)
    lines = []
    for name in fault.modules:
        lines.extend(difflib.unified_diff(
            originals[name].splitlines(keepends=True), patched[name].splitlines(keepends=True),
            fromfile=f"a/kernels/{name}.py", tofile=f"b/kernels/{name}.py (fault {fault.name})",
        ))
    return "".join(lines)


# --------------------------------------------------------------------------
# hunting one fault


@dataclass
class FaultResult:
    """How one fault fared. ``examples`` and ``seconds`` count up to the first failure
    (all of the search when it survived; for a crash or a hang, the case under way and the
    child's wall clock). ``total_seconds`` is the whole hunt, start-up and shrinking included
    (the child process's wall clock when run by ``run_faults``). ``case`` is the shrunk
    failing case (for a crash or a hang, the case under way)."""

    name: str
    klass: str
    status: str  # one of STATUSES
    examples: int = 0
    seconds: float = 0.0
    property: str = ""
    kind: str = ""  # failed / target-error (a kill), error (the harness raised), crashed, timeout
    tensors: tuple = ()
    error_type: str = ""  # the exception's type; for a crash, the signal (SIGSEGV)
    case: Optional[dict] = None  # the shrunk case, FlexCase.to_dict()
    case_summary: str = ""
    message: str = ""  # an excerpt of the failure message or of the child's output
    total_seconds: float = 0.0
    note: str = ""
    device: str = ""
    seed: int = 0

    # A method, not a property: the field ``property`` shadows the builtin in this class body.
    def detected(self) -> bool:
        """Killed, or crashed the interpreter (which a test run notices too)."""
        return self.status in _DETECTED

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["tensors"] = list(self.tensors)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "FaultResult":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["tensors"] = tuple(kwargs.get("tensors") or ())
        return cls(**kwargs)


def _excerpt(text: str, lines: int = 8, width: int = 240) -> str:
    parts = [line if len(line) <= width else line[: width - 3] + "..." for line in text.strip().splitlines()]
    more = len(parts) - lines
    return "\n".join(parts[:lines] + ([f"... ({more} more lines)"] if more > 0 else []))


def _case_summary(case) -> str:
    """One line: shape, dtype, mask and score by name, options."""
    from kernels import mods

    mask = "none"
    if case.block_size is not None:
        mask = f"{mods.from_spec(case.mask_spec(), 'cpu').name} ({case.block_size[0]}x{case.block_size[1]}" \
               + (f", for [{case.mask_B}, {case.mask_H}]" if (case.mask_B, case.mask_H) != (case.B, case.Hq) else "") \
               + ")"
    score = mods.from_spec(case.score, "cpu").name if case.score is not None else "none"
    options = ",".join(f"{k}={v}" for k, v in sorted(case.kernel_options.items())) or "none"
    text = (f"B={case.B} Hq={case.Hq} Hkv={case.Hkv} Bk={case.Bk} L={case.L} S={case.S} E={case.E} "
            f"Ev={case.Ev} {case.dtype}, mask {mask}, score {score}, options {options}")
    if case.scale is not None:
        text += f", scale {case.scale:g}"
    return text + ("" if case.backward else ", forward only")


def _hunter_class():
    """``properties.cli._Fuzzer`` that also notes the case under way in a file, so that the
    parent can say which case a crashed or hung child was running."""
    from .cli import _Fuzzer

    @dataclass
    class _Hunter(_Fuzzer):
        progress_path: Optional[str] = None

        def check(self, case, extra):
            if self.progress_path:
                note = {"phase": self.phase, "cases": self.cases_run + (self.phase == "search"),
                        "case": case.to_dict(), "extra": extra}
                tmp = self.progress_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(note, f)
                os.replace(tmp, self.progress_path)
            return super().check(case, extra)

    return _Hunter


def hunt(fault: Fault, *, examples: int, seconds: float, shrink_seconds: float, seed: int = 0,
         device: str = "cpu", quiet: bool = True, progress_path: Optional[str] = None) -> FaultResult:
    """Fuzz the planted ``fault`` (``matches_oracle`` plus a drawn metamorphic property on about
    half the cases) until the first failure, at most ``examples`` cases or ``seconds``; then
    shrink that failure for at most ``shrink_seconds``.

    On CPU the process must run Triton's interpreter (TRITON_INTERPRET=1 before kernels is
    imported). Raises ValueError when the fault's patches do not apply.
    """
    from .properties import METAMORPHIC
    from .strategies import flex_cases

    start = time.perf_counter()
    target = fault_target(fault)
    fuzzer = _hunter_class()(
        target=target, device=device, strategy=flex_cases(device=device), mode="sample",
        props=("matches_oracle",) + METAMORPHIC, examples=examples, seed=seed, max_seconds=seconds,
        shrink_seconds=shrink_seconds, max_failures=1, quiet=quiet, stop_at_first=True,
        restart_every=HUNT_RESTART_EVERY, progress_path=progress_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuzzer.run()
    result = FaultResult(fault.name, fault.klass, "survived", examples=fuzzer.cases_run,
                         seconds=fuzzer.search_seconds, device=device, seed=seed)
    if not fuzzer.failures:
        s = fuzzer.stats
        result.note = (f"no failure in {fuzzer.cases_run} case(s): {s['passed']} passed, "
                       f"{s['skipped']} not applicable")
    else:
        rec = next(iter(fuzzer.failures.values()))
        outcome = rec.outcome
        kind = rec.signature[1]
        result.status = "killed" if kind in ("failed", "target-error") else "error"
        result.examples = fuzzer.first_failure_cases or fuzzer.cases_run
        result.seconds = fuzzer.first_failure_seconds if fuzzer.first_failure_seconds is not None \
            else fuzzer.search_seconds
        result.property, result.kind = outcome.property, kind
        result.tensors, result.error_type = tuple(outcome.tensors), outcome.error_type
        result.case, result.case_summary = rec.best.to_dict(), _case_summary(rec.best)
        result.message = _excerpt(outcome.message)
        if kind == "error":
            result.note = "the harness raised (a bug of flex-oracle, not a detection of the fault)"
        elif kind == "target-error" and _broken_patch(outcome.message):
            # The copy failed to compile: the patch is broken, the oracle has shown nothing.
            result.status = "error"
            result.note = "the planted copy does not compile (a broken patch, not a detection)"
    result.total_seconds = time.perf_counter() - start
    return result


_COMPILE_ERRORS = ("NameError", "is not defined", "CompilationError", "SyntaxError", "unsupported AST node")


def _broken_patch(message: str) -> bool:
    """Whether a target error says the patched source itself is broken (an undefined name,
    a Triton compile error), which is no detection of the fault."""
    return any(marker in message for marker in _COMPILE_ERRORS)


# --------------------------------------------------------------------------
# running many faults, one subprocess each


def default_jobs(device: str) -> int:
    """Hunts at a time: 2 on CPU (the interpreter is one core each); on CUDA up to 8, one per
    core, since Triton's compiles are CPU-bound."""
    if device.startswith("cuda"):
        return max(1, min(8, os.cpu_count() or 1))
    return 2


def _budget(budget: str, examples, seconds, shrink_seconds) -> dict:
    if budget not in BUDGETS:
        raise ValueError(f"Unknown budget {budget!r}. Expected one of {', '.join(BUDGETS)}.")
    chosen = dict(BUDGETS[budget])
    for key, value in (("examples", examples), ("seconds", seconds), ("shrink_seconds", shrink_seconds)):
        if value is not None:
            chosen[key] = value
    if chosen["examples"] < 1 or chosen["seconds"] <= 0 or chosen["shrink_seconds"] < 0:
        raise ValueError(f"Expected examples >= 1, seconds > 0 and shrink_seconds >= 0, got {chosen}.")
    return chosen


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"Expected device auto, cpu, cuda or cuda:N, got {device!r}.")
    return device


@dataclass
class _Job:
    index: int
    fault: Fault
    proc: subprocess.Popen
    log: object
    log_path: str
    json_path: str
    progress_path: str
    started: float
    deadline: float


def run_faults(faults: Iterable[Union[Fault, str]], *, examples: Optional[int] = None,
               seconds: Optional[float] = None, shrink_seconds: Optional[float] = None, seed: int = 0,
               device: str = "auto", jobs: Optional[int] = None, budget: str = "ci",
               grace_seconds: float = HANG_GRACE_SECONDS,
               on_result: Optional[Callable[[FaultResult], None]] = None) -> list:
    """Hunt each fault in its own subprocess, ``jobs`` at a time; results in the order given.

    ``examples``, ``seconds`` and ``shrink_seconds`` override the ``budget`` profile
    (``BUDGETS``). A child that dies of a signal is ``crashed``; one still running
    ``seconds + shrink_seconds + grace_seconds`` after its start is killed and reported
    ``survived``, with a note. ``on_result`` is called as each fault finishes.
    """
    faults = [lookup(f) if isinstance(f, str) else f for f in faults]
    chosen = _budget(budget, examples, seconds, shrink_seconds)
    device = _resolve_device(device)
    jobs = default_jobs(device) if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Expected jobs to be a positive int, got {jobs!r}.")
    limit = chosen["seconds"] + chosen["shrink_seconds"] + grace_seconds
    workdir = tempfile.mkdtemp(prefix="flex-oracle-faults-")
    results: list = [None] * len(faults)
    pending = list(enumerate(faults))
    running: dict = {}

    def finish(index: int, result: FaultResult) -> None:
        result.device = result.device or device
        result.seed = seed
        results[index] = result
        if on_result is not None:
            on_result(result)

    def terminate(signum, frame):
        # timeout or a CI limit: leave through the finally below, which kills the children
        # (each runs in its own session, so no signal to this process reaches them).
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: the caller handles its signals
        previous = None
    try:
        # A catalogue entry whose patch no longer applies is reported at once, not spawned.
        for index, fault in list(pending):
            try:
                patched_sources(fault)
            except ValueError as exc:
                pending.remove((index, fault))
                finish(index, FaultResult(fault.name, fault.klass, "error", message=str(exc),
                                          note="the fault's patch does not apply to the current kernels"))
        while pending or running:
            while pending and len(running) < jobs:
                index, fault = pending.pop(0)
                running[index] = _spawn(index, fault, workdir, chosen, seed, device, limit)
            time.sleep(0.2)
            for index, job in list(running.items()):
                rc = job.proc.poll()
                if rc is None and time.monotonic() < job.deadline:
                    continue
                if rc is None:
                    _kill(job.proc)
                    result = _timed_out(job, limit)
                else:
                    result = _collect(job, rc)
                job.log.close()
                del running[index]
                finish(index, result)
    finally:
        for job in running.values():
            _kill(job.proc)
            job.log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


def _spawn(index: int, fault: Fault, workdir: str, budget: dict, seed: int, device: str, limit: float) -> _Job:
    stem = os.path.join(workdir, f"{index:03d}-{fault.name}")
    command = [sys.executable, "-X", "faulthandler", "-m", "properties.faults", "hunt", fault.name,
               "--examples", str(budget["examples"]), "--seconds", repr(float(budget["seconds"])),
               "--shrink-seconds", repr(float(budget["shrink_seconds"])), "--seed", str(seed),
               "--device", device, "--json-out", stem + ".json", "--progress", stem + ".progress"]
    if _catalogued(fault) is None:
        with open(stem + ".fault.json", "w") as f:
            json.dump(fault.to_dict(), f)
        command += ["--fault-json", stem + ".fault.json"]
    env = dict(os.environ)
    env[PLANT_DIR_ENV] = workdir
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels for CUDA tensors
    log = open(stem + ".log", "wb")
    # Its own session, so a hung child is killed with whatever it started (Triton's compilers).
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_project_root(),
                            start_new_session=True)
    now = time.monotonic()
    return _Job(index, fault, proc, log, stem + ".log", stem + ".json", stem + ".progress", now, now + limit)


def _catalogued(fault: Fault) -> Optional[Fault]:
    try:
        known = lookup(fault.name)
    except ValueError:
        return None
    return known if known == fault else None


def _project_root() -> str:
    """The directory holding the ``properties`` package, so that ``-m properties.faults`` finds it."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _log_tail(job: _Job, lines: int = 12) -> str:
    """The end of the child's output; after a crash, the start of faulthandler's report instead
    (its header and the innermost frames, which name the line that died)."""
    job.log.flush()
    try:
        with open(job.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    parts = text.strip().splitlines()
    fatal = next((k for k in range(len(parts) - 1, -1, -1) if parts[k].startswith("Fatal Python error")), None)
    if fatal is not None:
        return "\n".join(parts[fatal:fatal + lines + 4])
    return "\n".join(parts[-lines:])


def _with_progress(job: _Job, result: FaultResult) -> FaultResult:
    """Fill in which case the child was running when it died or was killed."""
    note = _read_json(job.progress_path)
    if not note:
        result.note += " before its first case"
        return result
    from .case import FlexCase

    try:
        case = FlexCase.from_dict(note["case"])
        result.case, result.case_summary = note["case"], _case_summary(case)
    except Exception:  # a half-written note: the count is still worth reporting
        pass
    result.examples = int(note.get("cases") or 0)
    props = "matches_oracle" + (f" then {note['extra']}" if note.get("extra") else "")
    result.property = props
    result.note += f" while {'shrinking' if note.get('phase') == 'shrink' else 'checking'} case {result.examples} ({props})"
    return result


def _collect(job: _Job, rc: int) -> FaultResult:
    wall = time.monotonic() - job.started
    fault = job.fault
    if rc < 0:
        try:
            signame = signal.Signals(-rc).name
        except ValueError:
            signame = f"signal {-rc}"
        result = FaultResult(fault.name, fault.klass, "crashed", seconds=wall, kind="crashed",
                             error_type=signame, total_seconds=wall, note=f"the interpreter died of {signame}",
                             message=_log_tail(job))
        return _with_progress(job, result)
    data = _read_json(job.json_path)
    if data is None:
        return FaultResult(fault.name, fault.klass, "error", total_seconds=wall, message=_log_tail(job),
                           note=f"the hunt exited with code {rc} and wrote no result")
    result = FaultResult.from_dict(data)
    result.total_seconds = wall
    return result


def _timed_out(job: _Job, limit: float) -> FaultResult:
    wall = time.monotonic() - job.started
    fault = job.fault
    result = FaultResult(fault.name, fault.klass, "survived", seconds=wall, kind="timeout", total_seconds=wall,
                         note=f"killed after {wall:.0f} s, past its limit of {limit:.0f} s (hung?)",
                         message=_log_tail(job))
    return _with_progress(job, result)


# --------------------------------------------------------------------------
# tables


def _finding(r: FaultResult) -> str:
    if r.status == "killed" and r.kind == "failed":
        return f"{r.property}: {', '.join(r.tensors)}"
    if r.status == "killed":
        return f"{r.property}: raised {r.error_type}"
    if r.status == "error":
        return f"{r.property}: harness raised {r.error_type}" if r.property else "error"
    if r.status == "crashed":
        return f"the interpreter died of {r.error_type}"
    return "timed out (hung?)" if r.kind == "timeout" else "-"


_LABEL = {"killed": "killed", "survived": "SURVIVED", "crashed": "crashed", "error": "error"}
_HEADER = ("fault", "class", "result", "examples", "seconds", "found by", "shrunk case")


def _rows(results: Sequence[FaultResult]) -> list:
    rows = []
    for r in results:
        rows.append((r.name, r.klass, _LABEL.get(r.status, r.status), str(r.examples) if r.examples else "-",
                     f"{r.seconds:.1f}" if r.seconds else "-", _finding(r), r.case_summary or "-"))
    return rows


def _totals(results: Sequence[FaultResult]) -> str:
    detected = sum(r.detected() for r in results)
    crashed = sum(r.status == "crashed" for r in results)
    text = f"{detected} of {len(results)} killed"
    if crashed:
        text += f" ({crashed} by crashing the interpreter)"
    survived = [r.name for r in results if r.status == "survived"]
    errors = [r.name for r in results if r.status == "error"]
    if survived:
        text += f"; survived: {', '.join(survived)}"
    if errors:
        text += f"; errors: {', '.join(errors)}"
    return text


def format_table(results: Sequence[FaultResult]) -> str:
    """The results as an aligned text table, then the totals."""
    rows = [_HEADER] + _rows(results)
    widths = [max(len(row[k]) for row in rows) for k in range(len(_HEADER) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(_HEADER[-1]))
    return "\n".join(lines) + "\n\n" + _totals(results)


def format_markdown(results: Sequence[FaultResult], *, budget: Optional[dict] = None, device: str = "",
                    seed: int = 0) -> str:
    """The results as a Markdown table (for docs/FAULTS.md), with the budget and the totals."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = []
    if budget:
        lines.append(f"Budget: {budget['examples']} examples, {budget['seconds']:g} s of search and "
                     f"{budget['shrink_seconds']:g} s of shrinking per fault; device {device}, seed {seed}.")
        lines.append("")
    lines.append("| " + " | ".join(_HEADER) + " |")
    lines.append("|" + "|".join(" --- " for _ in _HEADER) + "|")
    for row in _rows(results):
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    lines.append("")
    lines.append(_totals(results) + ".")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# the CLI: flex-oracle fault ...


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fault`` subcommands: list, show, run (and the hidden ``hunt``, the child entry)."""
    sub = parser.add_subparsers(dest="fault_command", metavar="{list,show,run}")
    parser.set_defaults(fault_parser=parser)

    listing = sub.add_parser("list", help="the catalogue: name, class, modules, description")
    listing.add_argument("--markdown", action="store_true",
                         help="a Markdown table with each fault's history (for docs/FAULTS.md)")
    listing.set_defaults(fault_func=_cmd_list)

    show = sub.add_parser("show", help="a fault's description, history and diff")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(fault_func=_cmd_show)

    run = sub.add_parser("run", help="hunt faults under a budget; exit 0 when every one is killed",
                         description="Plant each fault in a copy of the kernels, fuzz it in its own "
                                     "subprocess and print a table. Exit 0 when every fault was killed "
                                     "(crashed counts as killed), 1 otherwise, 2 on bad arguments.")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--faults", default=None, metavar="A,B,...", help="comma-separated names (default: all)")
    which.add_argument("--sample", action="store_true", help=f"the CI sample ({len(CI_SAMPLE)} faults)")
    run.add_argument("--budget", default="ci", choices=sorted(BUDGETS),
                     help="; ".join(f"{k}: {v['examples']} examples, {v['seconds']:g} s, shrink "
                                    f"{v['shrink_seconds']:g} s" for k, v in BUDGETS.items()) + " (default ci)")
    _hunt_budget_arguments(run, required=False)
    run.add_argument("--jobs", type=_positive_int, default=None, metavar="J",
                     help="hunts at a time (default 2 on CPU, min(8, cores) on CUDA)")
    run.add_argument("--device", default="auto", metavar="D", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    run.add_argument("--markdown", default=None, metavar="PATH", help="write the table as Markdown")
    run.add_argument("--quiet", action="store_true", help="no line per finished fault")
    run.set_defaults(fault_func=_cmd_run)

    # No help=: argparse then leaves it out of the listing (help=SUPPRESS prints ==SUPPRESS== on 3.11).
    hunt_parser = sub.add_parser("hunt", description="Hunt one fault in this process (the child of fault run).")
    hunt_parser.add_argument("name", metavar="NAME")
    _hunt_budget_arguments(hunt_parser, required=True)
    hunt_parser.add_argument("--device", default="auto", metavar="D")
    hunt_parser.add_argument("--json-out", default=None, metavar="FILE", help="where the result goes (default stdout)")
    hunt_parser.add_argument("--progress", default=None, metavar="FILE", help="note the case under way here")
    hunt_parser.add_argument("--fault-json", default=None, metavar="FILE",
                             help="the fault's definition, for one not in the catalogue")
    hunt_parser.set_defaults(fault_func=_cmd_hunt)


def _hunt_budget_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    suffix = "" if required else " (overrides the budget)"
    parser.add_argument("--examples", type=_positive_int, default=None, required=required, metavar="N",
                        help="cases to draw" + suffix)
    parser.add_argument("--seconds", type=_seconds, default=None, required=required, metavar="T",
                        help="search time" + suffix)
    parser.add_argument("--shrink-seconds", type=_seconds, default=None, required=required, metavar="T",
                        help="time to shrink the first failure" + suffix)
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="Hypothesis seed (default 0)")


def command_main(args) -> int:
    """Run the ``fault`` subcommand parsed into ``args``."""
    func = getattr(args, "fault_func", None)
    if func is None:
        args.fault_parser.print_help(sys.stderr)
        return 2
    return func(args)


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table: name, class, kernel file, what it breaks, the bug behind it."""
    lines = ["| fault | class | file | what it breaks | modelled on |", "| --- | --- | --- | --- | --- |"]
    for f in CATALOGUE:
        cells = [f"`{f.name}`", f.klass, ", ".join(f"`kernels/{m}.py`" for m in f.modules), f.description,
                 f.history or "-"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cmd_list(args) -> int:
    if getattr(args, "markdown", False):
        print(catalogue_markdown(), end="")
        return 0
    rows = [("name", "class", "modules", "description")]
    rows += [(f.name, f.klass, ",".join(f.modules), f.description) for f in CATALOGUE]
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if k == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * len(row[3]))
    sample = set(CI_SAMPLE)
    print(f"\n{len(CATALOGUE)} faults; the CI sample (--sample): {', '.join(f.name for f in CATALOGUE if f.name in sample)}")
    return 0


def _cmd_show(args) -> int:
    try:
        fault = lookup(args.name)
    except ValueError as exc:
        print(f"flex-oracle fault show: {exc}", file=sys.stderr)
        return 2
    print(f"{fault.name} ({fault.klass}; {', '.join(fault.modules) or 'no module'}"
          f"{', in the CI sample' if fault.name in CI_SAMPLE else ''})")
    print(f"what:    {fault.description}")
    if fault.history:
        print(f"history: {fault.history}")
    print()
    try:
        text = diff(fault)
    except ValueError as exc:
        print(f"flex-oracle fault show: {exc}", file=sys.stderr)
        return 1
    print(text.rstrip() if text else "(no change)")
    return 0


def _cmd_run(args) -> int:
    if args.sample:
        names = list(CI_SAMPLE)
    elif args.faults is not None:
        names = [n.strip() for n in args.faults.split(",") if n.strip()]
    else:
        names = [f.name for f in CATALOGUE]
    unknown = [n for n in names if n not in _known_names()]
    if unknown or not names:
        print(f"flex-oracle fault run: unknown fault(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
              f"known: {', '.join(_known_names())}", file=sys.stderr)
        return 2
    try:
        device = _resolve_device(args.device)
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda needs a CUDA GPU; this machine has none (use cpu or auto)")
        budget = _budget(args.budget, args.examples, args.seconds, args.shrink_seconds)
    except ValueError as exc:
        print(f"flex-oracle fault run: {exc}", file=sys.stderr)
        return 2
    jobs = args.jobs or default_jobs(device)
    print(f"flex-oracle fault run: {len(names)} fault(s) on {device}, budget {args.budget} "
          f"({budget['examples']} examples, {budget['seconds']:g} s, shrink {budget['shrink_seconds']:g} s), "
          f"seed {args.seed}, {jobs} at a time")
    sys.stdout.flush()
    done = [0]

    def report(r: FaultResult) -> None:
        done[0] += 1
        if not args.quiet:
            print(f"[{done[0]}/{len(names)}] {r.name}: {_LABEL.get(r.status, r.status)} "
                  f"({r.total_seconds:.0f} s)", file=sys.stderr, flush=True)

    results = run_faults(names, seed=args.seed, device=device, jobs=jobs, budget=args.budget,
                         on_result=report, **{k: budget[k] for k in ("examples", "seconds", "shrink_seconds")})
    print()
    print(format_table(results))
    notes = [r for r in results if r.status != "killed"]
    for r in notes:
        print()
        print(f"{r.name}: {_LABEL.get(r.status, r.status)}" + (f": {r.note}" if r.note else ""))
        if r.message:
            for line in _excerpt(r.message).splitlines():
                print(f"   {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flex_oracle_faults": RESULT_FORMAT, "device": device, "seed": args.seed,
                       "budget": dict(budget, name=args.budget), "results": [r.to_dict() for r in results]},
                      f, indent=2, sort_keys=True)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(results, budget=budget, device=device, seed=args.seed))
    return 0 if all(r.detected() for r in results) else 1


def _cmd_hunt(args) -> int:
    # Triton decides at definition time whether kernels are interpreted: choose before kernels loads.
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        if args.fault_json:
            with open(args.fault_json) as f:
                fault = Fault.from_dict(json.load(f))
            if fault.name != args.name:
                raise ValueError(f"--fault-json defines fault {fault.name!r}, not {args.name!r}")
        else:
            fault = lookup(args.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"flex-oracle fault hunt: {exc}", file=sys.stderr)
        return 2
    from .cli import _device

    device = _device(args.device)
    try:
        result = hunt(fault, examples=args.examples, seconds=args.seconds, shrink_seconds=args.shrink_seconds,
                      seed=args.seed, device=device, quiet=False, progress_path=args.progress)
    except Exception as exc:
        result = FaultResult(fault.name, fault.klass, "error", device=device, seed=args.seed,
                             note=f"the hunt raised {type(exc).__name__}",
                             message=_excerpt(traceback.format_exc(), lines=20))
    text = json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n"
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
        print(f"{fault.name}: {result.status} after {result.examples} case(s), {result.seconds:.1f} s"
              + (f" ({_finding(result)})" if result.status != "survived" else ""))
    else:
        sys.stdout.write(text)
    return 0 if result.detected() else 1


def main(argv: Optional[list] = None) -> int:
    """``python -m properties.faults ...``: the ``fault`` subcommands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m properties.faults",
                                     description=(__doc__ or "").strip().splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return command_main(args)


if __name__ == "__main__":
    # Run as the module's importable self, not as __main__, so there is one catalogue per process.
    from properties.faults import main as _main

    sys.exit(_main())
