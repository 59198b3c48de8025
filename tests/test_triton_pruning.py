"""Pruning in the Triton kernels: the selection kernel and compact layout against the
reference's selection, pruned attention over several tiles per block and with split keys,
and that pruned blocks cost no matrix work. (Pruned attention for every option against the
reference is in test_triton.py.)"""
from __future__ import annotations

import pytest
import torch

import crossattn
from crossattn import BlockPruning
from crossattn.reference import attention_reference, select_blocks_reference
from conftest import (
    DEVICE, GRAD_TOL, INTERPRETING, assert_close, f64, make_qkv, random_padding, reference,
    triton_ready,
)

pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")


def _layout_matches(mask, layout):
    """The compact layout lists exactly the kept blocks of every row, ascending."""
    assert layout.dtype == torch.int32 and layout.shape == mask.shape[:-1] + (mask.shape[-1] + 1,)
    rows_m, rows_l = mask.reshape(-1, mask.shape[-1]).cpu(), layout.reshape(-1, layout.shape[-1]).cpu()
    for m, lay in zip(rows_m, rows_l):
        kept = m.nonzero().flatten()
        assert int(lay[0]) == len(kept)
        assert torch.equal(lay[1:1 + len(kept)].long(), kept)


SELECTIONS = [
    BlockPruning(block_q=16, block_k=16, top_k=3),
    BlockPruning(block_q=32, block_k=16, top_k=1, min_blocks=4),
    BlockPruning(block_q=16, block_k=16, keep=0.28),  # ceil(0.28 * 25) is 7 exactly
    BlockPruning(block_q=16, block_k=32, keep=0.5),
    BlockPruning(block_q=64, block_k=16, mass=0.7),
    BlockPruning(block_q=16, block_k=16, mass=0.95, min_blocks=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg, temperature", zip(SELECTIONS, [None, 0.6, "per-head"] * 2),
                         ids=[repr(c) for c in SELECTIONS])
@pytest.mark.parametrize("padded", [False, True])
def test_selection_kernel_matches_reference(cfg, padded, temperature):
    from crossattn.kernels.xattn_select import select_blocks_triton

    # 1 100 keys in blocks of 16 are 69 key blocks: more than one chunk of the kernel's row.
    B, H, Lq, Lk, D = 2, 3, 70, 1100, 24
    q, k, _ = make_qkv(B, H, Lq, Lk, D, D, dtype=torch.float32, device=DEVICE, seed=3)
    kv = qv = None
    if padded:
        kv = ~random_padding(B, Lk, seed=4).to(DEVICE)
        kv[1, 400:] = False  # whole key blocks without a valid key
        qv = ~random_padding(B, Lq, seed=5).to(DEVICE)
        qv[0, 16:32] = False  # a query block without a valid query
    if temperature == "per-head":
        temperature = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    want = select_blocks_reference(q, k, cfg, key_valid=kv, query_valid=qv, temperature=temperature)
    got = select_blocks_triton(q, k, cfg, key_valid=kv, query_valid=qv, temperature=temperature)
    assert got.mask.dtype == torch.bool and got.mask.shape == want.shape
    assert torch.equal(got.mask, want), f"{int((got.mask != want).sum())} blocks differ"
    _layout_matches(got.mask, got.layout)


def test_selection_of_half_inputs_matches_reference():
    from crossattn.kernels.xattn_select import select_blocks_triton

    q, k, _ = make_qkv(2, 2, 50, 300, 32, 32, dtype=torch.float16, device=DEVICE, seed=6)
    cfg = BlockPruning(block_q=16, block_k=16, keep=0.25)
    want = select_blocks_reference(q, k, cfg, scale=0.3)
    assert torch.equal(select_blocks_triton(q, k, cfg, scale=0.3).mask, want)


@pytest.mark.parametrize("nblocks, mass", [(10, 0.8), (20, 0.5), (7, 5 / 7), (3, 2 / 3)])
def test_selection_mass_at_equal_scores_matches_reference(nblocks, mass):
    from crossattn.kernels.xattn_select import select_blocks_triton

    # Equal block scores put the mass exactly on the target: float32 rounding in the kernel
    # must not keep a block more (or fewer) than the float64 reference.
    k = torch.ones(1, 2, nblocks * 16, 16, device=DEVICE)
    q = torch.ones(1, 2, 20, 16, device=DEVICE)
    cfg = BlockPruning(block_q=16, block_k=16, mass=mass)
    want = select_blocks_reference(q, k, cfg)
    assert (want.sum(-1) == round(mass * nblocks)).all()
    assert torch.equal(select_blocks_triton(q, k, cfg).mask, want)


@pytest.mark.parametrize("cfg", [BlockPruning(block_q=32, block_k=16, top_k=1),
                                 BlockPruning(block_q=16, block_k=16, keep=0.5)], ids=repr)
def test_causal_selection_with_padding_matches_reference(cfg):
    from crossattn.kernels.xattn_select import select_blocks_triton

    # Causal candidacy reads the last valid query of a block and the first valid key of a
    # block (padding in both, holes included), per batch row.
    B, H, Lq, Lk, D = 2, 2, 45, 70, 16
    q, k, _ = make_qkv(B, H, Lq, Lk, D, D, dtype=torch.float32, device=DEVICE, seed=8)
    qv = torch.ones(B, Lq, dtype=torch.bool, device=DEVICE)
    qv[0, 28:32] = False
    qv[1, 40:] = False
    kv = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    kv[0, 16:40] = False
    kv[1, 48:60] = False
    for query_valid, key_valid in ((qv, kv), (qv, None), (None, kv)):
        want = select_blocks_reference(q, k, cfg, key_valid=key_valid, query_valid=query_valid, is_causal=True)
        got = select_blocks_triton(q, k, cfg, key_valid=key_valid, query_valid=query_valid, is_causal=True)
        assert torch.equal(got.mask, want)
        _layout_matches(got.mask, got.layout)


def test_selection_ignores_what_padding_holds():
    from crossattn.kernels.xattn_select import select_blocks_triton

    q, k, _ = make_qkv(2, 2, 40, 100, 16, dtype=torch.float32, device=DEVICE, seed=9)
    kv = torch.ones(2, 100, dtype=torch.bool, device=DEVICE)
    kv[0, 30:50] = False
    qv = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    qv[1, 35:] = False
    cfg = BlockPruning(block_q=16, block_k=16, top_k=2)
    clean = select_blocks_triton(q, k, cfg, key_valid=kv, query_valid=qv).mask
    k[0, :, 30:50], q[1, :, 35:] = float("nan"), float("inf")  # padding may hold anything
    assert torch.equal(select_blocks_triton(q, k, cfg, key_valid=kv, query_valid=qv).mask, clean)
    assert torch.equal(select_blocks_reference(q, k, cfg, key_valid=kv, query_valid=qv), clean)


def test_selection_mass_one_keeps_every_valid_block():
    from crossattn.kernels.xattn_select import select_blocks_triton

    # Block scores 0, 10, 20, ...: the worst blocks carry ~1e-40 of the mass, which float32
    # rounds away; mass=1 keeps them all the same (as the reference does).
    k = torch.zeros(1, 1, 6 * 16, 16, device=DEVICE)
    k[0, 0, :, 0] = torch.arange(6, device=DEVICE).repeat_interleave(16) * 10.0
    q = torch.ones(1, 1, 16, 16, device=DEVICE)
    kv = torch.ones(1, 6 * 16, dtype=torch.bool, device=DEVICE)
    kv[0, 16:32] = False  # a block without a valid key stays out
    cfg = BlockPruning(block_q=16, block_k=16, mass=1.0)
    want = select_blocks_reference(q, k, cfg, key_valid=kv, scale=1.0)
    assert want[0, 0, 0].tolist() == [True, False, True, True, True, True]
    assert torch.equal(select_blocks_triton(q, k, cfg, key_valid=kv, scale=1.0).mask, want)


@pytest.mark.slow
def test_fixed_and_transposed_masks_convert_to_the_layout():
    from crossattn.kernels.xattn_select import compact, select_blocks_triton

    B, H, nqb, nkb = 2, 3, 5, 300  # more columns than one chunk of the compact kernel
    gen = torch.Generator().manual_seed(0)
    fixed = (torch.rand(1, H, nqb, nkb, generator=gen) > 0.7).to(DEVICE)
    fixed[0, 0, 2] = False  # an empty row
    cfg = BlockPruning(block_q=16, block_k=16, block_mask=fixed)
    q, k, _ = make_qkv(B, H, nqb * 16 - 3, nkb * 16 - 5, 16, 16, dtype=torch.float32, device=DEVICE)
    sel = select_blocks_triton(q, k, cfg)
    assert torch.equal(sel.mask, fixed.expand(B, H, nqb, nkb))
    _layout_matches(sel.mask, sel.layout)
    transposed = compact(sel.mask.transpose(-1, -2), B, H)
    _layout_matches(sel.mask.transpose(-1, -2), transposed)


def _pruned_run(q, k, v, cfg, **kw):
    return crossattn.cross_attention(q, k, v, prune=cfg, backend="triton", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_blocks_larger_than_the_tiles(dtype):
    """Pruning blocks of 64 span several kernel tiles (32 under the interpreter) in both the
    key walk (forward, dQ) and the transposed query walk (dK/dV)."""
    B, H, Lq, Lk = 2, 2, 150, 333
    q, k, v = make_qkv(B, H, Lq, Lk, 32, 24, dtype=dtype, device=DEVICE, seed=7, requires_grad=True)
    kpm = random_padding(B, Lk, seed=8).to(DEVICE)
    cfg = BlockPruning(block_q=64, block_k=64, keep=0.5)
    sel = crossattn.select_blocks(q, k, cfg, key_padding_mask=kpm)
    fixed = BlockPruning(block_q=64, block_k=64, block_mask=sel)
    out, w = _pruned_run(q, k, v, cfg, key_padding_mask=kpm, need_weights="full")
    ins64 = f64(q, k, v)
    ref_out, ref_w = attention_reference(*ins64, key_padding_mask=kpm, prune=fixed, need_weights="full")
    assert_close(out, ref_out, dtype, what="out")
    assert_close(w, ref_w, dtype, what="weights")
    g_out, g_w = torch.randn_like(ref_out), torch.randn_like(ref_w)
    torch.autograd.backward((out, w), (g_out.to(dtype), g_w.to(dtype)))
    torch.autograd.backward((ref_out, ref_w), (g_out, g_w))
    for a, b, name in zip((q, k, v), ins64, "qkv"):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * 10, what=f"d{name}")


@pytest.mark.parametrize("splits", [2, 5])
def test_pruned_split_key_forward(splits, monkeypatch):
    """Kept blocks dealt round-robin to the key splits, merged by the combine kernel."""
    monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", str(splits))
    B, H, Lq, Lk = 2, 3, 20, 500
    q, k, v = make_qkv(B, H, Lq, Lk, 16, 16, dtype=torch.float32, device=DEVICE, seed=9)
    kpm = random_padding(B, Lk, seed=10).to(DEVICE)
    cfg = BlockPruning(block_q=16, block_k=16, top_k=7)
    sel = crossattn.select_blocks(q, k, cfg, key_padding_mask=kpm)
    out, w = _pruned_run(q, k, v, cfg, key_padding_mask=kpm, need_weights="mean")
    ref_out, ref_w = reference(*f64(q, k, v), prune=BlockPruning(block_q=16, block_k=16, block_mask=sel),
                               key_padding_mask=kpm, need_weights="mean")
    assert_close(out, ref_out, torch.float32, what="out")
    assert_close(w, ref_w, torch.float32, what="weights")


@pytest.mark.skipif(not INTERPRETING, reason="counts tl.dot calls through the Triton interpreter")
def test_pruned_blocks_cost_no_matrix_work(monkeypatch):
    """Every tl.dot the kernels run belongs to a kept (query block, key block) pair: the
    forward runs 2 per kept pair, the backward 7 (dK/dV: 4, dQ: 3), whatever is pruned."""
    import triton.runtime.interpreter as interp

    calls = {"n": 0}
    real_dot = interp.InterpreterBuilder.create_dot

    def counting_dot(self, *args, **kwargs):
        calls["n"] += 1
        return real_dot(self, *args, **kwargs)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", counting_dot)
    B, H, Lq, Lk = 1, 2, 64, 256  # block = tile = 32: one tile pair per block pair
    q, k, v = make_qkv(B, H, Lq, Lk, 16, 16, dtype=torch.float32, device=DEVICE, seed=11,
                       requires_grad=True)

    def dots(cfg):
        calls["n"] = 0
        out, _ = _pruned_run(q, k, v, cfg)
        fwd = calls["n"]
        out.sum().backward()
        return fwd, calls["n"] - fwd

    dense_pairs = B * H * (Lq // 32) * (Lk // 32)
    keep_all = BlockPruning(block_q=32, block_k=32, keep=1.0)
    assert dots(keep_all) == (2 * dense_pairs, 7 * dense_pairs)
    for cfg in (BlockPruning(block_q=32, block_k=32, keep=0.25), BlockPruning(block_q=32, block_k=32, top_k=1)):
        kept = int(crossattn.select_blocks(q, k, cfg).sum())
        assert kept < dense_pairs
        assert dots(cfg) == (2 * kept, 7 * kept)


# --------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", [dict(keep=0.25), dict(mass=0.9), dict(top_k=8)], ids=str)
def test_pruned_attention_at_real_sizes_on_gpu(dtype, rule):
    from crossattn.kernels.xattn_select import select_blocks_triton

    B, H, Lq, Lk, D = 2, 4, 512, 8000, 64
    q, k, v = make_qkv(B, H, Lq, Lk, D, D, dtype=dtype, device="cuda", seed=12, requires_grad=True)
    kpm = random_padding(B, Lk, seed=13).cuda()
    cfg = BlockPruning(block_q=64, block_k=64, **rule)
    want = select_blocks_reference(q, k, cfg, key_valid=~kpm)
    got = select_blocks_triton(q, k, cfg, key_valid=~kpm)
    # fp32 block scores in another summation order: allow a rare near-tie to flip.
    assert (got.mask != want).float().mean() < 1e-3
    _layout_matches(got.mask[:1, :1], got.layout[:1, :1])
    fixed = BlockPruning(block_q=64, block_k=64, block_mask=got.mask)
    out, w = _pruned_run(q, k, v, fixed, key_padding_mask=kpm, need_weights="mean")
    ins64 = f64(q, k, v)
    ref_out, ref_w = attention_reference(*ins64, key_padding_mask=kpm, prune=fixed, need_weights="mean")
    assert_close(out, ref_out, dtype, what="out")
    assert_close(w, ref_w, dtype, what="weights")
    g = torch.randn_like(ref_out)
    out.backward(g.to(dtype))
    ref_out.backward(g)
    for a, b, name in zip((q, k, v), ins64, "qkv"):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * 10, what=f"d{name}")
