"""flex-oracle's float64 truth for FlexAttention.

Depends on torch alone: importable by any project's test suite without Triton
or Hypothesis.
"""

from .block_mask import (
    Finding,
    FindingKind,
    block_mask_to_dense,
    block_membership,
    check_block_mask,
    create_block_mask,
    validate_block_mask,
)
from .compare import TOLERANCES, CompareResult, assert_all_close, assert_close, compare
from .reference import SEMANTICS, emulate_flex_attention, flex_attention

__all__ = [
    "flex_attention",
    "emulate_flex_attention",
    "SEMANTICS",
    "create_block_mask",
    "block_mask_to_dense",
    "block_membership",
    "check_block_mask",
    "validate_block_mask",
    "Finding",
    "FindingKind",
    "assert_close",
    "assert_all_close",
    "compare",
    "CompareResult",
    "TOLERANCES",
]
