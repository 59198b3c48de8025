"""The torch backend skips padded and causal key work on CPU tensors (contract: ragged batches
run at the cost of their real lengths), with results equal to the unskipped path and the
float64 reference. Work is counted in matmul FLOPs (FlopCounterMode), never timed."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import crossattn
from conftest import GRAD_TOL, TOL, assert_close, make_qkv, reference
from crossattn._philox import draw_dropout_seed
from crossattn.backends import _torch_skip
from crossattn.backends import torch_backend as tb

AUX = crossattn.AuxRequest(lse=True, entropy=True, key_mass=True, top_k=3)


def _flops(fn):
    with FlopCounterMode(display=False) as fc:
        res = fn()
    return fc.get_total_flops(), res


def _attn_flops(B, H, rows_keys, D, Dv):
    """Matmul FLOPs of q.k^T and P.v over ``rows_keys``: (query rows, keys) per batch row."""
    return sum(2 * H * r * n * (D + Dv) for r, n in rows_keys) * (1 if B else 0)


@pytest.mark.parametrize("need_weights", ["full", "mean"])
def test_ragged_keys_cost_their_real_lengths(need_weights):
    B, H, Lq, Lk, D = 2, 2, 8, 1000, 8
    q, k, v = make_qkv(B, H, Lq, Lk, D, requires_grad=True)
    runs = {}
    for name, lengths in (("ragged", [1000, 250]), ("control", [1000, 1000])):
        fwd, (out, w) = _flops(lambda n=lengths: crossattn.cross_attention(
            q, k, v, kv_lengths=torch.tensor(n), need_weights=need_weights, backend="torch"))
        bwd, _ = _flops(lambda o=out, w=w: (o.square().sum() + w.square().sum()).backward())
        runs[name] = fwd, bwd
        expect = _attn_flops(B, H, [(Lq, n) for n in lengths], D, D)
        assert fwd == expect, (name, fwd, expect)
        # saved P: the backward multiplies dO.v^T, P^T.dO, dS.k and dS^T.q -- twice the forward
        assert bwd == 2 * expect, (name, bwd, 2 * expect)
    assert runs["ragged"][0] == runs["control"][0] * 1250 // 2000


def test_ragged_keys_and_queries_cost_their_real_lengths_on_the_recomputing_path():
    """Statistics take the chunked path (which recomputes the logits in backward); trailing
    query padding is skipped too, and a padding mask's trailing run counts like a length."""
    B, H, Lq, Lk, D, Dv = 3, 2, 12, 40, 8, 4
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, requires_grad=True)
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[0, 30:] = True
    kpm[1, 5:10] = True  # a hole in the middle: not skippable, the row runs to its end
    kpm[2, 10:] = True
    qpm = torch.zeros(B, Lq, dtype=torch.bool)
    qpm[2, 6:] = True
    fwd, (out, _, aux) = _flops(lambda: crossattn.cross_attention(
        q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, return_aux=crossattn.AuxRequest(lse=True),
        backend="torch"))
    bwd, _ = _flops(lambda: (out.square().sum() + aux.lse.exp().sum()).backward())
    rows_keys = [(12, 30), (12, 40), (6, 10)]
    assert fwd == _attn_flops(B, H, rows_keys, D, Dv)
    assert bwd == sum(2 * H * r * n * (2 * D + 2 * Dv + D) for r, n in rows_keys)


@pytest.mark.parametrize("lq,lk", [(256, 256), (200, 300), (300, 200)])
def test_causal_costs_the_keys_below_the_diagonal(lq, lk):
    B, H, D = 1, 1, 4
    q, k, v = make_qkv(B, H, lq, lk, D)
    step = _torch_skip.causal_chunk(lq)
    shift = lk - lq  # bottom-right: query i sees keys j <= i + shift
    rows_keys = [(min(lq, r0 + step) - r0, min(lk, min(lq, r0 + step) + shift))
                 for r0 in range(max(0, -shift), lq, step)]
    fwd, _ = _flops(lambda: crossattn.cross_attention(q, k, v, is_causal=True, need_weights="full", backend="torch"))
    assert fwd == _attn_flops(B, H, rows_keys, D, D)
    full, _ = _flops(lambda: crossattn.cross_attention(q, k, v, need_weights="full", backend="torch"))
    assert full == _attn_flops(B, H, [(lq, lk)], D, D)
    visible = sum(min(lk, max(0, i + shift + 1)) for i in range(lq))
    assert fwd < full and fwd <= (visible + step * lk / 2 + lq * step) / (lq * lk) * full


def test_sdpa_path_runs_each_group_at_its_length(monkeypatch):
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.shape[0], q.shape[2], k.shape[2])) or real(q, k, v, **kw))
    q, k, v = make_qkv(4, 2, 6, 20, 8, requires_grad=True)
    lengths = torch.tensor([20, 7, 20, 0])
    qpm = torch.zeros(4, 6, dtype=torch.bool)
    qpm[1, 4:] = True
    out, _ = crossattn.cross_attention(q, k, v, kv_lengths=lengths, query_padding_mask=qpm, backend="torch")
    assert sorted(seen) == [(1, 4, 7), (2, 6, 20)]  # batch rows 0 and 2 together; row 3 has no key
    ref, _ = reference(q, k, v, kv_lengths=lengths, query_padding_mask=qpm)
    assert_close(out, ref, torch.float32)
    out.square().sum().backward()
    assert (q.grad[3] == 0).all() and (k.grad[3] == 0).all() and (k.grad[1, :, 7:] == 0).all()


def _run(q, k, v, kw, skip):
    """Outputs, weights, statistics and the gradients of a loss on all of them."""
    leaves = [q, k, v] + [t for t in (kw.get("temperature"), kw.get("attn_bias")) if isinstance(t, torch.Tensor)]
    real = _torch_skip.plan
    plan = real if skip else (lambda *a: None)
    _torch_skip.plan = plan
    try:
        torch.manual_seed(5)
        res = crossattn.cross_attention(q, k, v, backend="torch", **kw)
    finally:
        _torch_skip.plan = real
    out, w, aux = res if len(res) == 3 else (*res, None)
    fields = [out, w] + ([] if aux is None else list(aux))
    # lse is -inf on empty rows: the loss weighs the finite entries (their gradient is 0)
    diff = [f.double().where(f.isfinite(), 0.0) for f in fields
            if f is not None and f.is_floating_point() and f.requires_grad]
    loss = sum((f * torch.linspace(-1, 1, f.numel(), dtype=torch.float64).view(f.shape)).sum() for f in diff)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return fields, grads


def _padding(B, L, ends, holes=()):
    m = torch.arange(L)[None, :] >= torch.tensor(ends)[:, None]
    for b, j in holes:
        m[b, j] = True
    return m


CASES = {
    # saved-P path: full weights, dropout, a learnable temperature, grouped heads, rows
    # 0 and 2 share a length (a gathered, non-contiguous group)
    "saved_p": dict(kv_lengths=[9, 4, 9, 0], temperature="H", dropout_p=0.3, need_weights="full", gqa=True),
    "mean_padding_holes": dict(key_padding_mask=([9, 6, 3, 7], [(0, 2), (3, 1)]), need_weights="mean",
                               query_padding_mask=([7, 7, 2, 0], [(1, 3)])),
    # chunked path: statistics, a broadcast bias, weight heads, dropout
    "aux_bias": dict(kv_lengths=[5, 9, 5, 2], return_aux=AUX, attn_bias=(1, 3, 1, 9), need_weights="full",
                     weight_heads=(2, 0), dropout_p=0.2, temperature="H",
                     query_padding_mask=([7, 4, 7, 7], [])),
    "causal_more_queries": dict(is_causal=True, kv_lengths=[9, 6, 3, 9], need_weights="full", lq=11,
                                attn_bias=(4, 3, 11, 9), return_aux=AUX, dropout_p=0.25),
    "causal_more_keys": dict(is_causal=True, key_padding_mask=([9, 8, 9, 4], [(1, 6)]), need_weights="mean",
                             lq=5, temperature="H", gqa=True),
    "causal_saved_p": dict(is_causal=True, need_weights="full", lq=9, dropout_p=0.4),
    # a block selection over the whole problem, read by each part at its own batch rows
    "pruned": dict(kv_lengths=[40, 20, 40, 7], lk=40, lq=20, is_causal=True, need_weights="full",
                   return_aux=AUX, prune=crossattn.BlockPruning(block_q=16, block_k=16, top_k=2)),
    "all_empty": dict(kv_lengths=[0, 0, 0, 0], need_weights="full", return_aux=AUX),
}


def _build(case, dtype):
    c = dict(CASES[case])
    B, H, D = 4, 3, 8
    Lq, Lk = c.pop("lq", 7), c.pop("lk", 9)
    gqa = c.pop("gqa", False)
    q, k, v = make_qkv(B, H, Lq, Lk, D, 5, dtype=dtype, requires_grad=True)
    if gqa:
        q, _, _ = make_qkv(B, 6, Lq, Lk, D, dtype=dtype, seed=2, requires_grad=True)
        H = 6
    for name, L in (("key_padding_mask", Lk), ("query_padding_mask", Lq)):
        if name in c:
            c[name] = _padding(B, L, *c[name])
    if "kv_lengths" in c:
        c["kv_lengths"] = torch.tensor(c["kv_lengths"])
    if c.get("temperature") == "H":
        c["temperature"] = torch.linspace(0.6, 1.4, H, dtype=dtype).requires_grad_(True)
    if "attn_bias" in c:
        c["attn_bias"] = torch.randn(c["attn_bias"], generator=torch.Generator().manual_seed(4)).to(dtype)
        c["attn_bias"].requires_grad_(True)
    return q, k, v, c


@pytest.mark.parametrize("case", list(CASES))
def test_skipping_matches_the_unskipped_path_and_the_reference(case, monkeypatch):
    monkeypatch.setattr(_torch_skip, "_CAUSAL_ROWS", 2)  # several causal chunks at tiny shapes
    q, k, v, kw = _build(case, torch.float64)
    if kw.get("is_causal") or case != "all_empty":
        parts = _torch_skip.plan(_problem(q, k, v, kw), *_valid(q, k, kw))
        assert parts is not None and len(parts) > 1
    fields, grads = _run(q, k, v, kw, skip=True)
    fields0, grads0 = _run(q, k, v, kw, skip=False)
    for a, b in zip(fields + list(grads), fields0 + list(grads0)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            if not a.is_floating_point():
                assert torch.equal(a, b)
    torch.manual_seed(5)
    seed = draw_dropout_seed() if kw.get("dropout_p") else None
    ref = reference(q, k, v, dropout_seed=seed, **{n: (t.detach() if isinstance(t, torch.Tensor) and
                                                      t.is_floating_point() else t) for n, t in kw.items()})
    ref_fields = list(ref[:2]) + ([] if len(ref) == 2 else list(ref[2]))
    for a, b in zip(fields, ref_fields):
        if b is not None and a.is_floating_point():  # lse: -inf on empty rows, as the reference
            torch.testing.assert_close(a, b.to(a.dtype), rtol=TOL[torch.float64], atol=TOL[torch.float64])
        elif b is not None:
            assert torch.equal(a, b)


def _problem(q, k, v, kw):
    from crossattn._validation import AttentionProblem
    kpm = kw.get("key_padding_mask")
    return AttentionProblem(q, k, v, kpm, kw.get("kv_lengths"), kw.get("query_padding_mask"), 0.3, None, 0.0,
                            None, None, is_causal=kw.get("is_causal", False))


def _valid(q, k, kw):
    p = _problem(q, k, k, kw)
    return p.key_valid(), p.query_valid()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["saved_p", "aux_bias", "causal_more_queries"])
def test_skipping_in_low_precision_matches_the_reference(case, dtype, monkeypatch):
    monkeypatch.setattr(_torch_skip, "_CAUSAL_ROWS", 2)
    q, k, v, kw = _build(case, dtype)
    fields, grads = _run(q, k, v, kw, skip=True)
    fields0, grads0 = _run(q, k, v, kw, skip=False)
    for a, b in zip(fields + list(grads), fields0 + list(grads0)):
        if a is not None and a.is_floating_point():  # lse: -inf on empty rows in both
            torch.testing.assert_close(a, b, rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype])
    out, w = fields[:2]
    torch.manual_seed(5)
    seed = draw_dropout_seed() if kw.get("dropout_p") else None
    ref = reference(q, k, v, dropout_seed=seed, **{n: (t.detach().double() if isinstance(t, torch.Tensor) and
                                                      t.is_floating_point() else t) for n, t in kw.items()})
    assert_close(out, ref[0], dtype, tol=TOL[dtype] * 4, what="out")
    assert_close(w, ref[1], dtype, tol=TOL[dtype] * 4, what="weights")


def test_skipped_weights_are_exact_zeros_and_dropout_mask_is_unchanged():
    q, k, v = make_qkv(3, 2, 6, 12, 8, dtype=torch.float64)
    lengths = torch.tensor([12, 3, 7])
    torch.manual_seed(1)
    _, w = crossattn.cross_attention(q, k, v, kv_lengths=lengths, need_weights="full", dropout_p=0.5,
                                     backend="torch")
    torch.manual_seed(1)
    ref, ref_w = reference(q, k, v, kv_lengths=lengths, need_weights="full", dropout_p=0.5,
                           dropout_seed=draw_dropout_seed())
    for b, n in enumerate(lengths.tolist()):
        assert (w[b, :, :, n:] == 0).all()
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)


def test_no_skipping_where_lengths_are_not_on_the_host():
    q, k, v = make_qkv(2, 1, 4, 6, 8)
    lengths = torch.tensor([6, 2])
    assert _torch_skip.plan(_problem(q, k, v, dict(kv_lengths=lengths)), *_valid(q, k, dict(kv_lengths=lengths)))
    meta = [t.to("meta") for t in (q, k, v)]
    kw = dict(kv_lengths=lengths.to("meta"))
    assert _torch_skip.plan(_problem(*meta, kw), None, None) is None
    out, w = crossattn.cross_attention(*meta, need_weights="full", backend="torch", **kw)
    assert out.shape == (2, 1, 4, 8) and w.shape == (2, 1, 4, 6)
    # nothing to skip: the whole problem runs at once
    assert _torch_skip.plan(_problem(q, k, v, {}), None, None) is None


def test_plan_groups_rows_by_their_ends():
    q, k, v = make_qkv(5, 1, 4, 10, 8)
    kw = dict(kv_lengths=torch.tensor([10, 3, 10, 3, 0]))
    parts = _torch_skip.plan(_problem(q, k, v, kw), *_valid(q, k, kw))
    assert parts == [_torch_skip.Part((0, 2), slice(0, 4), 10), _torch_skip.Part((1, 3), slice(0, 4), 3)]
    assert tb._Config(1.0, 0, 0, 0.0, 0, None, None, False, None).batch_ids is None


def test_dropout_mask_of_a_batch_subset_is_the_whole_batch_mask_at_those_rows():
    from crossattn._philox import dropout_keep_mask
    full = dropout_keep_mask(11, 0.5, batch=4, heads=3, rows=torch.arange(6), cols=10)
    part = dropout_keep_mask(11, 0.5, batch=2, heads=3, rows=torch.arange(2, 5), cols=7,
                             batch_ids=torch.tensor([3, 1]))
    assert torch.equal(part, full[[3, 1]][:, :, 2:5, :7])
