"""Hypothesis strategies, properties and targets that check attention implementations against the oracle.

    from properties import flex_cases, matches_oracle, resolve_target

    @given(flex_cases())
    def test_my_kernel(case):
        matches_oracle(resolve_target("my_package.attention:flex_attention"), case, "cuda")

``FlexCase`` describes one case completely and replays bit-identically
(``to_json`` / ``from_json`` / ``materialize``); the properties raise
``AssertionError`` on failure and ``NotApplicable`` when a target cannot run a
case. The pytest plugin (``properties.plugin``) and the ``flex-oracle`` CLI
(``properties.cli``) live here too.

Names are imported on first use, so that loading the pytest plugin imports
neither torch nor Hypothesis's strategies.
"""

import importlib

_EXPORTS = {
    "case": ("FlexCase", "Materialized", "LAYOUTS"),
    "strategies": ("flex_cases", "shapes", "dtypes", "block_sizes", "layouts", "mask_mods", "score_mods",
                   "kernel_options", "Shape", "BlockSize"),
    "targets": ("Target", "TARGETS", "resolve_target", "best_device", "NotApplicable", "TargetError"),
    "properties": ("PROPERTIES", "METAMORPHIC", "Mismatch", "Outcome", "evaluate", "run_target",
                   "relabel_full_as_partial", "reverse_block_order", "matches_oracle", "out_alone_matches_oracle",
                   "full_blocks_as_partial_change_nothing", "block_order_changes_nothing",
                   "block_size_change_nothing", "options_change_nothing",
                   "lse_merge_of_disjoint_masks_equals_union", "ones_value_gives_one",
                   "gqa_equals_repeated_heads", "broadcast_batch_equals_expanded",
                   "decode_equals_non_decode", "runs_are_bit_identical"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'properties' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
