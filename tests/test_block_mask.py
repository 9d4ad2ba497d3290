"""Block masks: construction against PyTorch's, dense views, validation, the checker."""

import itertools

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import create_mask as torch_create_mask

import oracle.block_mask as block_mask_module
from oracle.block_mask import (
    Finding,
    FindingKind,
    block_mask_to_dense,
    block_membership,
    check_block_mask,
    create_block_mask,
    validate_block_mask,
)

_LISTS = (
    ("kv_num_blocks", "kv_indices"),
    ("full_kv_num_blocks", "full_kv_indices"),
    ("q_num_blocks", "q_indices"),
    ("full_q_num_blocks", "full_q_indices"),
)


# --------------------------------------------------------------------------
# Mods


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def everything(b, h, q_idx, kv_idx):
    return torch.ones((), dtype=torch.bool)


def nothing(b, h, q_idx, kv_idx):
    return q_idx < 0


def sliding_window(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    mask_mod.__name__ = f"sliding_window_{window}"
    return mask_mod


def document(lengths):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def mask_mod(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    mask_mod.__name__ = "document"
    return mask_mod


def per_head(b, h, q_idx, kv_idx):
    # Differs by batch and head, and has all three tile kinds.
    return ((q_idx + 3 * h + 7 * b) % 5 < 2) | (q_idx - kv_idx > 10 * h + 5 * b)


# name, mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE
CASES = [
    ("causal", causal, 1, 1, 256, 256, 64),
    ("causal_default_block", causal, 1, 1, 300, 300, 128),
    ("causal_ragged", causal, 1, 1, 130, 77, 64),
    ("causal_ragged_rect", causal, 1, 1, 130, 77, (32, 64)),
    ("everything_ragged", everything, 2, 1, 130, 77, 64),
    ("nothing", nothing, 1, 1, 100, 100, 32),
    ("sliding_window", sliding_window(40), 1, 2, 300, 300, 64),
    ("document", document([50, 7, 90, 43]), 1, 1, 190, 190, (32, 64)),
    ("per_head", per_head, 2, 3, 130, 77, (32, 64)),
    ("broadcast_none", causal, None, None, 200, 200, 64),
    ("L1", causal, 1, 1, 1, 300, 64),
    ("S1", causal, 1, 1, 300, 1, 64),
    ("L1_S1", everything, 1, 1, 1, 1, 128),
    ("block_longer_than_lengths", sliding_window(9), 1, 1, 50, 60, (256, 128)),
]
CASE_IDS = [case[0] for case in CASES]


def both_constructions(case):
    _, mask_mod, B, H, L, S, block = case
    ours = create_block_mask(mask_mod, B, H, L, S, BLOCK_SIZE=block)
    theirs = torch_create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=block)
    return ours, theirs


def assert_same_block_mask(ours: BlockMask, theirs: BlockMask) -> None:
    assert ours.seq_lengths == theirs.seq_lengths
    assert tuple(ours.BLOCK_SIZE) == tuple(theirs.BLOCK_SIZE)
    for num_field, idx_field in _LISTS:
        num, ref_num = getattr(ours, num_field), getattr(theirs, num_field)
        idx, ref_idx = getattr(ours, idx_field), getattr(theirs, idx_field)
        assert num.dtype == idx.dtype == torch.int32
        assert num.shape == ref_num.shape and idx.shape == ref_idx.shape, num_field
        assert torch.equal(num, ref_num), num_field
        for row in itertools.product(*map(range, num.shape)):
            n = int(num[row])
            assert idx[row][:n].tolist() == ref_idx[row][:n].tolist(), (idx_field, row)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_pytorch_create_block_mask(case):
    ours, theirs = both_constructions(case)
    assert isinstance(ours, BlockMask)
    assert ours.mask_mod is case[1]
    assert_same_block_mask(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_membership_matches_pytorch_to_dense(case):
    ours, theirs = both_constructions(case)
    partial, full = block_membership(ours)
    assert not (partial & full).any()
    assert torch.equal(partial | full, theirs.to_dense().bool())
    ref_partial, ref_full = block_membership(theirs)
    assert torch.equal(partial, ref_partial) and torch.equal(full, ref_full)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_both_constructions_check_clean(case):
    ours, theirs = both_constructions(case)
    assert check_block_mask(ours) == []
    assert check_block_mask(theirs) == []


def test_boundary_tiles_are_partial_as_in_pytorch():
    # PyTorch pads to whole blocks with disallowed elements, so a tile that
    # straddles Q_LEN or KV_LEN is partial even if all its in-range elements are allowed.
    ours = create_block_mask(everything, 1, 1, 130, 77, BLOCK_SIZE=64)
    partial, full = block_membership(ours)
    assert full[0, 0].tolist() == [[True, False], [True, False], [False, False]]
    assert partial[0, 0].tolist() == [[False, True], [False, True], [True, True]]


@pytest.mark.parametrize("case", [CASES[7], CASES[8]], ids=["document", "per_head"])
def test_chunked_evaluation_matches(case, monkeypatch):
    monkeypatch.setattr(block_mask_module, "_CHUNK_ELEMENTS", 1)
    ours, theirs = both_constructions(case)
    assert_same_block_mask(ours, theirs)
    assert check_block_mask(ours, rows_guaranteed_safe=False) == []


def test_huge_block_size():
    # PyTorch's "one block for everything" size; padding to it would need 2**60 elements.
    ours = create_block_mask(causal, 1, 1, 5, 7, BLOCK_SIZE=1 << 30)
    assert ours.kv_num_blocks.tolist() == [[[1]]]
    assert ours.full_kv_num_blocks.tolist() == [[[0]]]
    one_block = BlockMask.from_kv_blocks(
        torch.ones(1, 1, 1, dtype=torch.int32),
        torch.zeros(1, 1, 1, 1, dtype=torch.int32),
        BLOCK_SIZE=1 << 30,
        seq_lengths=(1, 1),
    )
    assert check_block_mask(one_block, Q_LEN=100, KV_LEN=90) == []


# --------------------------------------------------------------------------
# Dense views


def brute_force_dense(block_mask, B, H, L, S, semantics):
    q_block, kv_block = block_mask.BLOCK_SIZE
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    out = torch.zeros(B, H, L, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    index = (torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j))
                    allowed = bool(block_mask.mask_mod(*index))
                    if semantics == "blocks":
                        row = (b % mb, h % mh, i // q_block)
                        kv = block_mask.kv_indices[row][: block_mask.kv_num_blocks[row]].tolist()
                        full = block_mask.full_kv_indices[row][: block_mask.full_kv_num_blocks[row]].tolist()
                        allowed = j // kv_block in full or (j // kv_block in kv and allowed)
                    out[b, h, i, j] = allowed
    return out


def faulty_broadcast_mask():
    """MB = MH = 1 over B = H = 2, a mask_mod that depends on b and h, and lists
    that disagree with it: one tile missing, one wrongly full."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx + b >= kv_idx) & ((kv_idx + h) % 3 != 0)

    partial = torch.tensor([[True, False, False], [True, True, False], [False, True, True]])
    full = torch.tensor([[False, False, False], [False, False, False], [True, False, False]])
    return from_members(partial[None, None], full[None, None], mask_mod, (10, 9), (4, 4))


@pytest.mark.parametrize("semantics", ["blocks", "mask_mod"])
def test_to_dense_matches_brute_force(semantics):
    block_mask = faulty_broadcast_mask()
    dense = block_mask_to_dense(block_mask, 2, 2, 10, 9, semantics=semantics)
    assert dense.dtype == torch.bool and dense.shape == (2, 2, 10, 9)
    assert torch.equal(dense, brute_force_dense(block_mask, 2, 2, 10, 9, semantics))


def test_to_dense_semantics_differ_on_faulty_mask():
    block_mask = faulty_broadcast_mask()
    blocks = block_mask_to_dense(block_mask, 2, 2, 10, 9, semantics="blocks")
    mask_mod = block_mask_to_dense(block_mask, 2, 2, 10, 9, semantics="mask_mod")
    assert not torch.equal(blocks, mask_mod)


@pytest.mark.parametrize("case", [CASES[3], CASES[8], CASES[12]], ids=["causal_ragged_rect", "per_head", "L1_S1"])
def test_to_dense_of_consistent_mask(case, monkeypatch):
    monkeypatch.setattr(block_mask_module, "_CHUNK_ELEMENTS", 1000)
    _, mask_mod, B, H, L, S, _ = case
    B, H = B or 1, H or 1
    ours, theirs = both_constructions(case)
    expected = torch_create_mask(mask_mod, B, H, L, S, device="cpu").expand(B, H, L, S)
    for block_mask in (ours, theirs):
        for semantics in ("blocks", "mask_mod"):
            dense = block_mask_to_dense(block_mask, B, H, L, S, semantics=semantics)
            assert torch.equal(dense, expected), semantics


def test_to_dense_rejects_unknown_semantics():
    block_mask = create_block_mask(causal, 1, 1, 8, 8, BLOCK_SIZE=4)
    with pytest.raises(ValueError, match="semantics"):
        block_mask_to_dense(block_mask, 1, 1, 8, 8, semantics="kernel")


# --------------------------------------------------------------------------
# Hand-built faulty masks: each triggers exactly one kind, at the right place


def from_members(partial, full, mask_mod, seq_lengths, block_size, **kwargs):
    def ordered(member):
        order = torch.argsort((~member).int(), dim=-1, stable=True)
        return member.sum(-1).int(), order.int()

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=seq_lengths, **kwargs,
    )


def causal_members():
    """Causal 256 x 256 in 64-blocks: diagonal tiles partial, those below full."""
    clean = create_block_mask(causal, 1, 1, 256, 256, BLOCK_SIZE=64)
    partial, full = block_membership(clean)
    return clean, partial.clone(), full.clone()


def replaced(block_mask, **fields):
    """A copy of block_mask with some fields replaced (bypassing from_kv_blocks' checks)."""
    values = {name: getattr(block_mask, name) for pair in _LISTS for name in pair}
    values.update(fields)
    return BlockMask(
        block_mask.seq_lengths, *(values[name] for pair in _LISTS for name in pair),
        block_mask.BLOCK_SIZE, fields.get("mask_mod", block_mask.mask_mod),
    )


def only(findings, kind):
    assert findings, "expected a finding"
    assert {f.kind for f in findings} == {kind}, [str(f) for f in findings]
    return findings


def test_missing_block():
    _, partial, full = causal_members()
    partial[0, 0, 2, 2] = False
    (finding,) = only(check_block_mask(from_members(partial, full, causal, (256, 256), 64)), FindingKind.MISSING_BLOCK)
    assert finding.severity == "error"
    assert (finding.b, finding.h, finding.q_block, finding.kv_block) == (0, 0, 2, 2)
    assert (finding.q_idx, finding.kv_idx) == (128, 128)


def test_full_not_full():
    _, partial, full = causal_members()
    partial[0, 0, 1, 1], full[0, 0, 1, 1] = False, True
    (finding,) = only(check_block_mask(from_members(partial, full, causal, (256, 256), 64)), FindingKind.FULL_NOT_FULL)
    assert finding.severity == "error" and finding.list == "full_kv_indices"
    assert (finding.q_block, finding.kv_block, finding.q_idx, finding.kv_idx) == (1, 1, 64, 65)


def test_empty_partial_is_a_warning():
    _, partial, full = causal_members()
    partial[0, 0, 0, 3] = True
    (finding,) = only(check_block_mask(from_members(partial, full, causal, (256, 256), 64)), FindingKind.EMPTY_PARTIAL)
    assert finding.severity == "warning"
    assert (finding.q_block, finding.kv_block, finding.list) == (0, 3, "kv_indices")


def test_overlap():
    _, partial, full = causal_members()
    partial[0, 0, 1, 0] = True
    block_mask = from_members(partial, full, causal, (256, 256), 64)
    (finding,) = only(check_block_mask(block_mask), FindingKind.OVERLAP)
    assert (finding.q_block, finding.kv_block) == (1, 0)
    with pytest.raises(ValueError, match="full_kv_indices"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256)


def test_duplicate():
    clean, _, _ = causal_members()
    kv_num, kv_idx = clean.kv_num_blocks.clone(), clean.kv_indices.clone()
    kv_num[0, 0, 2], kv_idx[0, 0, 2, :2] = 2, 2
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, clean.full_kv_num_blocks, clean.full_kv_indices, BLOCK_SIZE=64,
        mask_mod=causal, seq_lengths=(256, 256),
    )
    (finding,) = only(check_block_mask(block_mask), FindingKind.DUPLICATE)
    assert (finding.q_block, finding.kv_block, finding.list) == (2, 2, "kv_indices")
    with pytest.raises(ValueError, match=r"block_mask\.kv_indices\[0, 0, 2\]"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256)


def test_index_out_of_range():
    clean, _, _ = causal_members()
    kv_num, kv_idx = clean.kv_num_blocks.clone(), clean.kv_indices.clone()
    kv_num[0, 0, 0], kv_idx[0, 0, 0, 1] = 2, 7
    kv_num[0, 0, 3], kv_idx[0, 0, 3, 1] = 2, -1
    block_mask = replaced(clean, kv_num_blocks=kv_num, kv_indices=kv_idx)
    findings = only(check_block_mask(block_mask), FindingKind.INDEX_OUT_OF_RANGE)
    assert [(f.q_block, f.kv_block, f.list) for f in findings] == [(0, 7, "kv_indices"), (3, -1, "kv_indices")]
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 0, 1\] = 7"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256)
    with pytest.raises(ValueError, match="kv_indices"):
        block_membership(block_mask)


def test_count_outside_capacity():
    def first_three_blocks(b, h, q_idx, kv_idx):
        return q_idx < 192

    clean = create_block_mask(first_three_blocks, 1, 1, 256, 256, BLOCK_SIZE=64)
    kv_num, full_num = clean.kv_num_blocks.clone(), clean.full_kv_num_blocks.clone()
    full_num[0, 0, 0], kv_num[0, 0, 3] = 5, -1
    block_mask = replaced(clean, kv_num_blocks=kv_num, full_kv_num_blocks=full_num)
    findings = only(check_block_mask(block_mask), FindingKind.COUNT_ABOVE_CAPACITY)
    assert [(f.q_block, f.list) for f in findings] == [(3, "kv_num_blocks"), (0, "full_kv_num_blocks")]
    with pytest.raises(ValueError, match=r"kv_num_blocks\[0, 0, 3\] = -1"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256)


def test_q_side_not_transpose():
    clean, _, _ = causal_members()
    q_num = clean.q_num_blocks.clone()
    q_num[0, 0, 1] = 0
    block_mask = replaced(clean, q_num_blocks=q_num)
    (finding,) = only(check_block_mask(block_mask), FindingKind.Q_SIDE_NOT_TRANSPOSE)
    assert (finding.q_block, finding.kv_block, finding.list) == (1, 1, "q_indices")
    with pytest.raises(ValueError, match="q_indices"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256)


def test_q_side_without_full_lists():
    clean, _, _ = causal_members()
    block_mask = replaced(clean, full_q_num_blocks=None, full_q_indices=None)
    findings = only(check_block_mask(block_mask), FindingKind.Q_SIDE_NOT_TRANSPOSE)
    assert {f.list for f in findings} == {"full_q_indices"}
    assert len(findings) == 6  # the tiles below the diagonal


def test_mask_without_q_side_is_fine():
    clean, partial, full = causal_members()
    block_mask = from_members(partial, full, causal, (256, 256), 64, compute_q_blocks=False)
    assert block_mask.q_num_blocks is None
    assert check_block_mask(block_mask) == []


def test_size_does_not_cover():
    block_mask = create_block_mask(causal, 1, 1, 128, 128, BLOCK_SIZE=64)
    (finding,) = only(check_block_mask(block_mask, Q_LEN=200, KV_LEN=128), FindingKind.SIZE_DOES_NOT_COVER)
    assert "Q_LEN=200" in finding.message
    with pytest.raises(ValueError, match="does not cover.*create_block_mask"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=128, KV_LEN=129)


def test_sliced_pytorch_mask_does_not_cover_its_lengths():
    sliced = torch_create_block_mask(causal, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=64)[:, :, 1:]
    only(check_block_mask(sliced), FindingKind.SIZE_DOES_NOT_COVER)


def test_not_contiguous():
    def blocks_zero_and_two(b, h, q_idx, kv_idx):
        return (kv_idx // 64 != 1) & (q_idx % 2 == 0)

    block_mask = create_block_mask(blocks_zero_and_two, 1, 1, 64, 192, BLOCK_SIZE=64)
    assert check_block_mask(block_mask) == []
    (finding,) = only(check_block_mask(block_mask, blocks_are_contiguous=True), FindingKind.NOT_CONTIGUOUS)
    assert (finding.q_block, finding.kv_block, finding.list) == (0, 2, "kv_indices")


def test_contiguous_promise_holds_for_causal():
    block_mask = torch_create_block_mask(causal, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=64)
    assert check_block_mask(block_mask, blocks_are_contiguous=True, rows_guaranteed_safe=True) == []


def test_row_not_safe():
    def causal_but_row_70(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx != 70)

    block_mask = create_block_mask(causal_but_row_70, 1, 1, 256, 256, BLOCK_SIZE=64)
    assert check_block_mask(block_mask) == []
    (finding,) = only(check_block_mask(block_mask, rows_guaranteed_safe=True), FindingKind.ROW_NOT_SAFE)
    assert (finding.b, finding.h, finding.q_block, finding.q_idx) == (0, 0, 1, 70)


def test_broadcast_mismatch():
    block_mask = create_block_mask(causal, 2, 1, 64, 64, BLOCK_SIZE=32)
    assert check_block_mask(block_mask, B=2, H=5) == []
    only(check_block_mask(block_mask, B=3), FindingKind.BROADCAST_MISMATCH)
    with pytest.raises(ValueError, match=r"kv_indices.*B=3"):
        validate_block_mask(block_mask, B=3, H=1, Q_LEN=64, KV_LEN=64)


def test_malformed_field():
    clean, _, _ = causal_members()
    block_mask = replaced(clean, kv_indices=clean.kv_indices.long())
    (finding,) = only(check_block_mask(block_mask), FindingKind.MALFORMED_FIELD)
    assert finding.list == "kv_indices"
    with pytest.raises(ValueError, match=r"kv_indices.*torch\.int32"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256)


def test_malformed_shapes_never_raise():
    garbage = BlockMask(
        (256, 256), torch.zeros(4, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.float32),
        None, None, None, None, None, None, (64, 64), causal,
    )
    only(check_block_mask(garbage), FindingKind.MALFORMED_FIELD)
    no_lengths = replaced(create_block_mask(causal, 1, 1, 64, 64, BLOCK_SIZE=32))
    no_lengths.seq_lengths = None
    only(check_block_mask(no_lengths), FindingKind.MALFORMED_FIELD)
    assert check_block_mask(no_lengths, Q_LEN=64, KV_LEN=64) == []


@pytest.mark.parametrize("result", ["raises", "not_bool"])
def test_mask_mod_error(result):
    def broken(b, h, q_idx, kv_idx):
        if result == "raises":
            raise IndexError("no such document")
        return q_idx - kv_idx

    clean, partial, full = causal_members()
    (finding,) = only(check_block_mask(from_members(partial, full, broken, (256, 256), 64)), FindingKind.MASK_MOD_ERROR)
    assert finding.list == "mask_mod"


def test_many_findings_are_capped_without_losing_a_kind():
    partial = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    full = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    partial[0, 0, :, 0] = True  # for a diagonal mask: 15 empty partial tiles, 15 missing ones

    def diagonal(b, h, q_idx, kv_idx):
        return q_idx == kv_idx

    block_mask = from_members(partial, full, diagonal, (512, 512), 32)
    findings = check_block_mask(block_mask, max_per_kind=5)
    missing = [f for f in findings if f.kind is FindingKind.MISSING_BLOCK]
    assert len(missing) == 6 and missing[-1].count == 10 and missing[-1].b is None
    assert {f.kind for f in findings} == {FindingKind.MISSING_BLOCK, FindingKind.EMPTY_PARTIAL}
    everything_listed = check_block_mask(block_mask, max_per_kind=None)
    assert sum(f.kind is FindingKind.MISSING_BLOCK for f in everything_listed) == 15
    assert sum(f.kind is FindingKind.EMPTY_PARTIAL for f in everything_listed) == 15


def test_finding_reads_like_a_sentence():
    _, partial, full = causal_members()
    partial[0, 0, 2, 2] = False
    (finding,) = check_block_mask(from_members(partial, full, causal, (256, 256), 64))
    text = str(finding)
    assert text.startswith("error: missing block at b=0, h=0, q_block=2, kv_block=2, q_idx=128, kv_idx=128: ")
    assert text.endswith(".")
    assert isinstance(finding, Finding)
    with pytest.raises(AttributeError):
        finding.b = 1


def test_validate_uses_the_given_name():
    clean, _, _ = causal_members()
    block_mask = replaced(clean, kv_indices=clean.kv_indices.long())
    with pytest.raises(ValueError, match=r"my_mask\.kv_indices"):
        validate_block_mask(block_mask, B=1, H=1, Q_LEN=256, KV_LEN=256, name="my_mask")
    validate_block_mask(clean, B=4, H=2, Q_LEN=256, KV_LEN=200)


def test_wrong_argument_types():
    with pytest.raises(TypeError, match="BlockMask"):
        check_block_mask("causal")
    with pytest.raises(TypeError, match="BlockMask"):
        validate_block_mask(None, B=1, H=1, Q_LEN=1, KV_LEN=1)
    with pytest.raises(TypeError, match="Q_LEN"):
        check_block_mask(create_block_mask(causal, 1, 1, 8, 8, BLOCK_SIZE=4), Q_LEN=8.0)


# --------------------------------------------------------------------------
# create_block_mask's own argument checks


def three_args(b, h, q_idx):
    return q_idx >= 0


def score_mod(score, b, h, q_idx, kv_idx):
    return score


def returns_int(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def wrong_shape(b, h, q_idx, kv_idx):
    return torch.ones(3, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"mask_mod": three_args}, TypeError, "mask_mod.*4 positional", id="three_args"),
        pytest.param({"mask_mod": score_mod}, TypeError, "score_mod", id="score_mod"),
        pytest.param({"mask_mod": "causal"}, TypeError, "mask_mod", id="not_callable"),
        pytest.param({"mask_mod": returns_int}, TypeError, "torch.bool", id="returns_int"),
        pytest.param({"mask_mod": wrong_shape}, ValueError, "broadcast", id="wrong_shape"),
        pytest.param({"B": 0}, ValueError, "B > 0, got B=0", id="B=0"),
        pytest.param({"H": 2.0}, TypeError, "H", id="H=2.0"),
        pytest.param({"Q_LEN": 0}, ValueError, "Q_LEN", id="Q_LEN=0"),
        pytest.param({"KV_LEN": -3}, ValueError, "KV_LEN=-3", id="KV_LEN=-3"),
        pytest.param({"BLOCK_SIZE": 0}, ValueError, "BLOCK_SIZE", id="BLOCK_SIZE=0"),
        pytest.param({"BLOCK_SIZE": (64,)}, ValueError, "BLOCK_SIZE", id="BLOCK_SIZE=(64,)"),
        pytest.param({"BLOCK_SIZE": (64, 0)}, ValueError, r"BLOCK_SIZE\[1\]", id="BLOCK_SIZE=(64,0)"),
    ],
)
def test_create_block_mask_rejects_bad_arguments(kwargs, error, match):
    arguments = {"mask_mod": causal, "B": 1, "H": 1, "Q_LEN": 64, "KV_LEN": 64, "BLOCK_SIZE": 32}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        create_block_mask(**arguments)
