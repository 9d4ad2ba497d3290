"""The document mask's range form (``kernels.mods.DOCUMENT_RANGES``) against its definition.

Where both id tables are sorted, ``_Document.ranges`` turns ``q_ids[i] == kv_ids[j]`` (and
``i >= j`` when causal) into one run of keys per query and one run of queries per key, and the
kernels test ``(n - first) < count`` unsigned instead of gathering ids. These tests check the
table against the mask element by element, the kernels on both forms against the oracle
(sorted ids, unsorted ids, causal, L != S, GQA), and that a program is rebuilt when the ids
change in place.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import kernels
import kernels.api
from kernels import mods
from tests.test_kernels import check

DEVICE = "cpu"


def _ids(n: int, docs: int, seed: int, *, shuffled: bool = False, dtype=torch.int32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.sort(torch.randint(0, docs, (n,), generator=g)).values
    if shuffled:
        ids = ids[torch.randperm(n, generator=g)]
    return ids.to(dtype)


def _from_table(table: torch.Tensor, Lq: int, Sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two masks the table encodes, [Lq, Sk] each: by rows (first key, count) and by keys."""
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Sk)[None, :]
    rows, keys = table[:Lq].long(), table[Lq:].long()
    by_rows = ((j - rows[:, :1]) >= 0) & ((j - rows[:, :1]) < rows[:, 1:])
    by_keys = ((i - keys[:, 0][None, :]) >= 0) & ((i - keys[:, 0][None, :]) < keys[:, 1][None, :])
    return by_rows, by_keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Sk,docs", [(37, 37, 4), (20, 53, 3), (61, 9, 5), (16, 16, 1), (5, 40, 7)])
def test_ranges_table_is_the_mask(Lq, Sk, docs, causal):
    """Every element of both encodings equals the id compare, including queries whose document has
    no key (count 0) and, when causal, rows whose run ends before it starts."""
    for seed in range(3):
        q, kv = _ids(Lq, docs, seed), _ids(Sk, docs, seed + 100, dtype=torch.int64)
        doc = mods.document(q, kv, causal=causal)
        table = doc.ranges()
        assert table is not None and table.dtype == torch.int32 and table.shape == (Lq + Sk, 2)
        assert int(table[:, 1].min()) >= 0
        want = doc(0, 0, torch.arange(Lq)[:, None], torch.arange(Sk)[None, :])
        by_rows, by_keys = _from_table(table, Lq, Sk)
        assert torch.equal(by_rows, want)
        assert torch.equal(by_keys, want)


def test_ranges_need_sorted_ids():
    """Unsorted ids on either side have no range form (None: the kernels gather ids)."""
    sorted_ids, shuffled = _ids(40, 4, 0), _ids(40, 4, 0, shuffled=True)
    assert not torch.equal(sorted_ids, shuffled)
    assert mods.document(sorted_ids).ranges() is not None
    assert mods.document(shuffled).ranges() is None
    assert mods.document(sorted_ids, shuffled).ranges() is None
    assert mods.document(shuffled, sorted_ids).ranges() is None


def test_programs_take_the_form_their_loop_reads():
    """The forward's program (loop over keys) reads its row's run; the dK/dV kernel's (loop over
    queries) compares ids unless DOCUMENT_RANGES_DKDV, then reads its key's run from the same
    table; unsorted ids, or the flag off, compile the gather."""
    doc = mods.document(_ids(48, 3, 1))
    fwd = mods.compile_mods(None, doc, loop="n")
    assert "uint32" in fwd.source and "(n - tl.load(B0 + (m) * 2" in fwd.source and len(fwd.buffers) == 1
    dkdv = mods.compile_mods(None, doc, loop="m")
    assert "uint32" not in dkdv.source and dkdv.buffers == [doc.q_ids.tensor]
    saved = mods.DOCUMENT_RANGES_DKDV
    mods.DOCUMENT_RANGES_DKDV = True
    try:
        dkdv = mods.compile_mods(None, doc, loop="m")
    finally:
        mods.DOCUMENT_RANGES_DKDV = saved
    assert "(m - tl.load(B0 + (n + 48) * 2" in dkdv.source
    assert fwd.buffers[0] is dkdv.buffers[0] and len(dkdv.buffers) == 1
    gather = mods.compile_mods(None, mods.document(_ids(48, 3, 1, shuffled=True)), loop="m")
    assert "uint32" not in gather.source and " == " in gather.source
    with pytest.raises(ValueError, match="loop"):
        mods.compile_mods(None, doc, loop="k")
    saved = mods.DOCUMENT_RANGES
    mods.DOCUMENT_RANGES = False
    try:
        assert "uint32" not in mods.compile_mods(None, mods.document(_ids(48, 3, 1)), loop="n").source
    finally:
        mods.DOCUMENT_RANGES = saved


_CASES = {
    # name: (L, S, Hq, Hkv, shuffled, causal, block)
    "sorted": (96, 96, 2, 2, False, False, 32),
    "sorted-causal-tails": (83, 83, 2, 2, False, True, 32),
    "sorted-kv-longer-gqa": (70, 130, 4, 2, False, False, 32),
    "sorted-causal-q-longer": (130, 70, 2, 2, False, True, 64),
    "shuffled": (96, 96, 2, 2, True, False, 32),
    "shuffled-causal-gqa": (80, 112, 4, 1, True, True, 32),
}


def _case_mask(name, device):
    L, S, _, _, shuffled, causal, _ = _CASES[name]
    q = _ids(L, 5, 7, shuffled=shuffled).to(device)
    kv = q if L == S else _ids(S, 5, 8, shuffled=shuffled).to(device)
    return mods.document(q, kv, causal=causal)


def _check_case(name, device, dtype):
    L, S, Hq, Hkv, shuffled, causal, block = _CASES[name]
    mask = _case_mask(name, device)
    assert (mask.ranges() is None) == shuffled
    check(B=2, Hq=Hq, Hkv=Hkv, L=L, S=S, E=32, dtype=dtype, mask_mod=mask, block_size=block,
          device=device, seed=5)


@pytest.mark.parametrize("dkdv_ranges", [False, True])
@pytest.mark.parametrize("name", sorted(_CASES))
def test_document_forms_match_the_oracle(name, dkdv_ranges):
    """out, the LSE, the max and dq, dk, dv against the float64 oracle on both forms (and the dK/dV
    kernel's range test, off by default)."""
    saved = mods.DOCUMENT_RANGES_DKDV
    mods.DOCUMENT_RANGES_DKDV = dkdv_ranges
    try:
        _check_case(name, DEVICE, torch.float16)
    finally:
        mods.DOCUMENT_RANGES_DKDV = saved


def test_learnable_table_gradient_reaches_its_slot_in_the_dkdv_kernel():
    """A learnable bias beside a document mask: the dQ kernel's program holds [ranges, bias], the
    dK/dV kernel's [q ids, kv ids, bias], so the bias's gradient slot moves between them; the
    dK/dV kernel adds into the dQ program's slot (dbuffer against the oracle)."""
    L, S = 64, 96
    q, kv = _ids(L, 3, 4), _ids(S, 3, 5)
    bias = torch.randn(2, L, S, generator=torch.Generator().manual_seed(0)).requires_grad_()
    score = mods.bias(bias)
    check(Hq=2, L=L, S=S, E=16, dtype=torch.float32, score_mod=score, mask_mod=mods.document(q, kv),
          device=DEVICE, seed=2)


def test_ids_changed_in_place_rebuild_the_program():
    """The range table is derived from the ids: an in-place update (to other sorted ids, then to
    unsorted ones) gives a new table or the gather form, never the old table."""
    L = 96
    ids = _ids(L, 3, 2)
    doc = mods.document(ids)
    check(L=L, S=L, mask_mod=doc, device=DEVICE, seed=1)
    first = kernels.api._cached_program(None, doc, True)
    assert "uint32" in first.source
    ids.copy_(_ids(L, 6, 3))  # other documents, still sorted
    second = kernels.api._cached_program(None, doc, True)
    assert second is not first and second.buffers[0] is not first.buffers[0]
    check(L=L, S=L, mask_mod=doc, device=DEVICE, seed=1)
    ids.copy_(_ids(L, 6, 3, shuffled=True))
    third = kernels.api._cached_program(None, doc, True)
    assert "uint32" not in third.source
    check(L=L, S=L, mask_mod=doc, device=DEVICE, seed=1)


@pytest.mark.gpu
def test_gpu_document_forms_match_the_oracle():
    """The same cases compiled for the GPU, bf16, ids on the GPU (the sortedness read there)."""
    for name in sorted(_CASES):
        _check_case(name, "cuda", torch.bfloat16)


def test_from_seed_shuffled_is_replayable():
    """``document.from_seed(..., shuffled=True)``: the sorted draw's ids in permuted positions, kept
    in the recipe (so a saved case replays them); recipes without the key stay sorted."""
    sorted_doc = mods.document.from_seed(200, 5, 3)
    shuffled = mods.document.from_seed(200, 5, 3, shuffled=True)
    a, b = sorted_doc.q_ids.tensor, shuffled.q_ids.tensor
    assert torch.equal(torch.sort(b).values, a) and not torch.equal(a, b)
    assert "shuffled" not in sorted_doc.spec()["q_ids"] and shuffled.spec()["q_ids"]["shuffled"] is True
    assert torch.equal(mods.from_spec(shuffled.spec()).q_ids.tensor, b)
    assert shuffled.ranges() is None and sorted_doc.ranges() is not None


@pytest.mark.parametrize("E,forward_ranges", [(32, False), (64, True), (128, True)])
def test_each_kernel_takes_its_form(E, forward_ranges, monkeypatch):
    """kernels.flex_attention compiles the dQ kernel's document mask as the range test, the
    forward's from a padded head dim of DOCUMENT_RANGES_FWD_MIN_DIM (at D=64 the range test costs
    the H100 forward a program a multiprocessor unless its registers are capped,
    kernels.forward.RANGES_FWD_MAXNREG), the dK/dV kernel's as the id compare; each kernel gets
    its own program's tables."""
    from kernels import _runtime
    from tests.test_kernels import _record_backward_plans

    seen = _record_backward_plans(monkeypatch)
    assert kernels.api.DOCUMENT_RANGES_FWD_MIN_DIM == 64
    L = 80
    check(L=L, S=L, E=E, mask_mod=mods.document(_ids(L, 4, 9)), device=DEVICE, seed=3)
    plan = seen[-1]
    assert ("uint32" in plan.program.source) == forward_ranges == plan.program.mask_ranges
    plan.interpret = False  # the cap is the GPU's: the rule, as it would read there
    cap = _runtime.module("forward").fwd_maxnreg(plan)
    assert cap == (128 if forward_ranges and E < 128 else None)
    assert "uint32" in plan.backward_program.source
    assert "uint32" not in plan.dkdv_program.source
    assert [t.shape for t in plan.buffer_args(plan.buffers[0], "dq")[:1]] == [(2 * L, 2)]
    assert [t.shape for t in plan.buffer_args(plan.buffers[0], "dkdv")[:1]] == [(L,)]
    assert [t.shape for t in plan.buffer_args(plan.buffers[0])[:1]] == [(2 * L, 2) if forward_ranges else (L,)]


def test_ranges_forward_tiles_rule(monkeypatch):
    """``RANGES_FWD_D64`` is considered on sm90, in bf16 or fp16, at a padded head dim of 64 alone,
    for blocks its tiles divide and no forward tile or launch option; parsed, it gives the forward
    its tiles, warps and stages over the short rows'. The register cap (``fwd_maxnreg``) holds on
    tiles of at most 64 scores a thread, so a caller's 128 x 128 on 4 warps goes uncapped."""
    from kernels import api

    want = lambda opts=None, arch="sm90", dtype=torch.bfloat16, d=64, qb=128, kb=128: (  # noqa: E731
        api._ranges_fwd_wanted(opts, arch, dtype, d, qb, kb))
    assert want() and want(dtype=torch.float16) and want(d=33) and want(opts={"bwd_num_warps": 8})
    assert not want(arch="sm80") and not want(arch="interp") and not want(dtype=torch.float32)
    assert not want(d=32) and not want(d=128) and not want(qb=64) and not want(kb=64)
    for key in ("BLOCK_M", "fwd_BLOCK_N", "num_warps", "fwd_num_stages"):
        assert not want(opts={key: 4 if "num" in key else 64}), key
    with monkeypatch.context() as m:
        m.setattr(api, "RANGES_FWD_D64", None)
        assert not want()
    opts = api.parse_kernel_options(None, dtype=torch.bfloat16, head_dim=64, q_block=128, kv_block=128,
                                    device=torch.device("cpu"), interpret=True, work="masked",
                                    short_fwd=True, ranges_fwd=True)
    assert (*opts.fwd.tiles.values(), opts.fwd.num_warps, opts.fwd.num_stages) == api.RANGES_FWD_D64


def test_ranges_forward_tiles_end_to_end(monkeypatch):
    """Through flex_attention with the arch taken for sm90 (the interpreter runs the kernels): a
    D=64 document mask on sorted ids (the range test) runs its forward on RANGES_FWD_D64, short
    rows or long, capped at 128 registers; shuffled ids (the id compare), a score mod beside the
    mask, D=128 and a forward launch option keep the other rules' tiles. The oracle agrees on each."""
    from kernels import _runtime, api
    from tests.test_kernels import _as_sm90, _record_backward_plans, _record_forward_launches

    _as_sm90(monkeypatch)
    seen = _record_forward_launches(monkeypatch)
    plans = _record_backward_plans(monkeypatch)
    L = 256
    doc = lambda shuffled=False: mods.document(_ids(L, 3, 5, shuffled=shuffled))  # noqa: E731
    one = dict(B=1, Hq=2, Hkv=1, L=L, S=L, E=64, dtype=torch.bfloat16, block_size=128, device=DEVICE, seed=4)
    check(mask_mod=doc(), **one)
    check(mask_mod=doc(shuffled=True), **one)
    check(mask_mod=doc(), score_mod=mods.tanh_softcap(20.0), **one)
    check(mask_mod=doc(), **{**one, "E": 128})
    short64, short = api._short_rows_tiles(64, 128, 128), api.SHORT_ROWS_FWD
    assert seen == [api.RANGES_FWD_D64, short64, short64, short]
    forward = _runtime.module("forward")
    caps = []
    for plan in plans:
        plan.interpret = False  # the cap is the GPU's: the rule, as it would read there
        caps.append(forward.fwd_maxnreg(plan))
    assert caps == [128, None, 128, None]  # the softcap's 64 x 128 on 4 warps: 64 scores a thread
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_MAX_KEYS", 1)  # every row long
    check(mask_mod=doc(), **one)
    check(mask_mod=doc(), kernel_options={"fwd_num_warps": 4}, **one)
    default = api._default_config("sm90", torch.bfloat16, 64, "masked")[0]
    assert seen[4:] == [api.RANGES_FWD_D64, default[:2] + (4, default[3])]
    plans[-1].interpret = False
    assert default[:2] == (128, 128) and forward.fwd_maxnreg(plans[-1]) is None  # 128 scores a thread


@pytest.mark.gpu
def test_gpu_ranges_forward_tiles_match_the_oracle(monkeypatch):
    """On the H100's arch a D=64 document forward on the range test, on lists left unrefined,
    runs on RANGES_FWD_D64 (128 x 128, 8 warps, capped at 128 registers): sorted ids, causal or
    not, GQA and a query tail, short rows and long, against the oracle with the backward."""
    from kernels import api
    from tests.test_kernels import _record_forward_launches

    if api._arch(torch.device("cuda"), False) != "sm90":
        pytest.skip("RANGES_FWD_D64 is an sm90 rule; this GPU is older")
    monkeypatch.setattr(api, "AUTO_REFINE", None)  # the lists as the block mask gives them
    seen = _record_forward_launches(monkeypatch)
    L, S = 2000, 2048
    q = _ids(L, 3, 11).cuda()
    kv = _ids(S, 3, 11).cuda()
    one = dict(B=2, Hq=4, Hkv=2, L=L, S=S, E=64, dtype=torch.bfloat16, block_size=128, device="cuda", seed=6)
    check(mask_mod=mods.document(q, kv), **one)
    check(mask_mod=mods.document(q, kv, causal=True), **one)
    monkeypatch.setattr(api, "SHORT_ROWS_FWD_MAX_KEYS", 1)  # every row long
    check(mask_mod=mods.document(q, kv), **one)
    assert seen == [api.RANGES_FWD_D64] * 3
