"""The torch backend runs a pruned call over the kept key blocks only on CPU tensors (contract:
pruned key blocks cost no matrix work), with every output and gradient equal to the float64
reference's. Work is counted in matmul FLOPs (FlopCounterMode), never timed."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import crossattn
from conftest import GRAD_TOL, TOL, make_qkv
from crossattn import AuxRequest, BlockPruning, _cpu_kernels
from crossattn._philox import draw_dropout_seed
from crossattn.backends import _torch_pruned
from crossattn.backends._torch_saved_p import _SavedPAttention
from crossattn.reference import attention_reference

AUX = AuxRequest(lse=True, entropy=True, key_mass=True, top_k=3)


@pytest.fixture
def gathered(monkeypatch):
    """Counts the calls that took the kept-blocks path."""
    calls = []
    real = _torch_pruned.run
    monkeypatch.setattr(_torch_pruned, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def saved_p(monkeypatch):
    """Counts the gathered problems that ran on the saved-P Function."""
    calls = []
    real = _SavedPAttention.apply
    monkeypatch.setattr(_SavedPAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def _flops(fn):
    with FlopCounterMode(display=False) as fc:
        res = fn()
    return fc.get_total_flops(), res


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("rule", [dict(top_k=2), dict(keep=0.25)], ids=str)
def test_pruned_blocks_cost_no_matrix_work(rule, dropout_p, gathered):
    B, H, Lq, Lk, D, Dv = 2, 2, 100, 512, 16, 8
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, requires_grad=True)
    pruning = BlockPruning(block_q=32, block_k=64, **rule)  # 4 query blocks, 8 key blocks
    fwd, (out, w) = _flops(lambda: crossattn.cross_attention(q, k, v, prune=pruning, need_weights="full",
                                                             dropout_p=dropout_p, backend="torch"))
    assert gathered == [1]
    # Two kept key blocks per (head, query block), over the 4 x 32 padded query rows, and the
    # selection's block scores (4 x 8 block means).
    kept = 2 * 64
    assert fwd == 2 * B * H * (4 * 32) * kept * (D + Dv) + 2 * B * H * 4 * 8 * D
    dense, _ = _flops(lambda: crossattn.cross_attention(q, k, v, need_weights="full", backend="torch"))
    assert fwd < dense * 0.35
    bwd, _ = _flops(lambda: (out.square().sum() + w.square().sum()).backward())
    assert 0 < bwd <= 3 * fwd  # recomputes q.k^T, then dO.v^T, P^T.dO, dS.k, dS^T.q


CASES = {
    "plain": dict(),
    "gqa_bias_causal_padding": dict(gqa=True, bias=(1, 4, 1, 70), causal=True, key_pad=True, query_pad=True,
                                    need_weights="mean", aux=AUX),
    "temperature_heads_bias_rows": dict(temperature=True, bias=(2, 1, 45, 70), weight_heads=(3, 1),
                                        need_weights="full", aux=AUX),
    "more_queries_causal": dict(lq=90, causal=True, need_weights="full", aux=AuxRequest(lse=True, top_k=2)),
    "bias_per_row": dict(bias=(2, 4, 45, 1), key_pad=True, need_weights="mean", weight_heads=(2,)),
    "mass_rule_strided": dict(rule=dict(mass=0.5), strided=True, need_weights="full", aux=AUX),
    # dropout: the caller's Philox bits at the gathered (row, key) coordinates
    "dropout_gqa_causal": dict(dropout=0.3, gqa=True, causal=True, key_pad=True, query_pad=True,
                               need_weights="full", aux=AUX),
    "dropout_bias_mean": dict(dropout=0.5, bias=(1, 4, 1, 70), temperature=True, need_weights="mean",
                              weight_heads=(0, 2)),
    # no statistics, bias or head subset: the saved-P Function, the masks as an element mask
    "saved_p_gqa_causal_padding": dict(gqa=True, causal=True, key_pad=True, query_pad=True, need_weights="full"),
    "saved_p_dropout_temperature_strided": dict(dropout=0.3, temperature=True, key_pad=True, strided=True,
                                                need_weights="mean", rule=dict(keep=0.4)),
    "saved_p_dropout_out_only": dict(dropout=0.2, lq=90, query_pad=True),
}
SAVED_P = {c for c in CASES if c.startswith("saved_p") or c == "plain"}


def _build(case, dtype):
    c = dict(CASES[case])
    B, H, Lq, Lk, D, Dv = 2, 4, c.pop("lq", 45), 70, 8, 6
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, dtype=dtype, seed=1)
    if c.pop("gqa", False):
        k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    if c.pop("strided", False):  # head-split projections, as the modules pass them
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    kw = dict(prune=BlockPruning(block_q=16, block_k=16, **c.pop("rule", dict(top_k=2))),
              need_weights=c.pop("need_weights", None), is_causal=c.pop("causal", False))
    if c.pop("key_pad", False):
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[0, 50:] = True
        kpm[1, 20:30] = True  # a hole inside a block
        kw["key_padding_mask"] = kpm
    if c.pop("query_pad", False):
        qpm = torch.zeros(B, Lq, dtype=torch.bool)
        qpm[1, 30:] = True
        kw["query_padding_mask"] = qpm
    if c.pop("temperature", False):
        kw["temperature"] = torch.linspace(0.5, 1.5, H, dtype=dtype)
    if "bias" in c:
        bias = torch.randn(c.pop("bias"), generator=g).to(dtype)
        bias.view(-1)[::7] = -math.inf  # -inf in a bias masks
        kw["attn_bias"] = bias
    kw["weight_heads"] = c.pop("weight_heads", None)
    kw["dropout_p"] = c.pop("dropout", 0.0)
    kw["return_aux"] = c.pop("aux", None)
    assert not c, c
    return q, k, v, kw


def _outputs(res):
    fields = [res[0], res[1]]
    if len(res) == 3:
        fields += list(res[2])
    return fields


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_kept_blocks_path_matches_the_reference(case, dtype, gathered, saved_p):
    _check_against_reference(case, dtype, gathered, saved_p)


@pytest.mark.parametrize("case", sorted(SAVED_P))
def test_saved_p_route_without_the_compiled_kernels(case, gathered, saved_p, monkeypatch):
    # float32 saved-P calls take the compiled softmax kernels; where they refuse (a dispatch
    # mode, traced code), the torch-op versions must draw the same dropout bits.
    monkeypatch.setattr(_cpu_kernels, "softmax", lambda *a, **k: False)
    monkeypatch.setattr(_cpu_kernels, "softmax_backward", lambda *a, **k: False)
    _check_against_reference(case, torch.float32, gathered, saved_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(SAVED_P))
def test_saved_p_route_in_half_precision(case, dtype, gathered, saved_p, monkeypatch):
    # bfloat16 multiplies in bfloat16, float16 in float32 by row chunks (the dropper per chunk).
    # Its error against the float64 reference is at most twice the dense path's in the same
    # dtype (bfloat16's own rounding exceeds the fixed tolerance on some gradients, dense too).
    def errors():
        q, k, v, kw = _build(case, dtype)
        leaves = [t.requires_grad_() for t in (q, k, v, kw.get("temperature")) if t is not None]
        torch.manual_seed(5)
        out, w = crossattn.cross_attention(q, k, v, backend="torch", **kw)
        torch.manual_seed(5)
        kw["dropout_seed"] = draw_dropout_seed() if kw["dropout_p"] else None
        refs = [t.detach().double().requires_grad_() for t in leaves]
        if len(refs) > 3:
            kw["temperature"] = refs[3]
        ref_out, ref_w = attention_reference(*refs[:3], **kw)

        def loss(o, wt):
            return o.double().square().sum() + (0 if wt is None else (wt.double() * torch.linspace(
                -1, 1, wt.shape[-1], dtype=torch.float64)).sum())
        got = [out, w] + list(torch.autograd.grad(loss(out, w), leaves))
        want = [ref_out, ref_w] + list(torch.autograd.grad(loss(ref_out, ref_w), refs))
        return [0.0 if a is None else float((a.detach().double() - b.detach()).abs().max()) for a, b in zip(got, want)]

    ours = errors()
    assert gathered == [1] and len(saved_p) == 1
    monkeypatch.setattr(_torch_pruned, "worthwhile", lambda *a, **k: None)  # every block, masked
    dense = errors()
    assert gathered == [1] and len(saved_p) >= 2  # (by parts where rows are padded)
    for i, (name, a, b) in enumerate(zip(("out", "weights", "dq", "dk", "dv", "dtemperature"), ours, dense)):
        assert a <= max(2 * b, (TOL if i < 2 else GRAD_TOL)[dtype]), (name, a, b)


def _check_against_reference(case, dtype, gathered, saved_p):
    q, k, v, kw = _build(case, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, kw.get("temperature"), kw.get("attn_bias")) if t is not None]
    torch.manual_seed(5)  # the dropout seed drawn at dispatch
    res = crossattn.cross_attention(q, k, v, backend="torch", **kw)
    assert gathered == [1]
    assert len(saved_p) == (case in SAVED_P)
    torch.manual_seed(5)
    kw["dropout_seed"] = draw_dropout_seed() if kw["dropout_p"] else None
    ref = attention_reference(*(t.detach().double() for t in (q, k, v)), **{
        n: (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        for n, t in kw.items()})
    got, want = _outputs(res), _outputs(ref)
    for name, a, b in zip(("out", "weights", "lse", "entropy", "key_mass", "top_k_values", "top_k_indices"),
                          got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        if a.is_floating_point():
            assert a.dtype == (b.dtype if name in ("lse", "entropy", "key_mass") and dtype == torch.float64
                               else torch.float32 if name in ("lse", "entropy", "key_mass") else dtype), name
            torch.testing.assert_close(a.double(), b, rtol=TOL[dtype], atol=TOL[dtype], msg=name)
        else:
            assert torch.equal(a, b), name
    # One loss over every differentiable output: gradients as the reference's.
    def loss(fields):
        total = fields[0].square().sum()
        if fields[1] is not None:
            total = total + (fields[1].double() * torch.linspace(-1, 1, fields[1].shape[-1], dtype=torch.float64)).sum()
        for stat in fields[2:5]:
            if stat is not None:
                total = total + torch.where(torch.isinf(stat), 0.0, stat.double()).sum()
        return total

    refs = [t.detach().double().requires_grad_() for t in leaves]
    names = ["q", "k", "v"] + [n for n in ("temperature", "attn_bias") if kw.get(n) is not None]
    ref_kw = dict(kw, **{n: r for n, r in zip(names[3:], refs[3:])})  # the same dropout seed
    ref = attention_reference(*refs[:3], **ref_kw)
    got_g = torch.autograd.grad(loss(got), leaves)
    want_g = torch.autograd.grad(loss(_outputs(ref)), refs)
    for name, a, b in zip(names, got_g, want_g):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype], msg=name)


def test_padding_garbage_stays_out_of_the_gathered_problem(gathered):
    # NaN / inf in padded keys, values, query rows and in the bias at padded keys: the dense
    # path masks them by filling, so must the gathered one (an added -inf keeps a NaN).
    q, k, v = make_qkv(2, 2, 20, 256, 8)
    kpm = torch.zeros(2, 256, dtype=torch.bool)
    kpm[0, 100:140] = True
    qpm = torch.zeros(2, 20, dtype=torch.bool)
    qpm[1, 15:] = True
    bias = torch.randn(2, 1, 1, 256)
    kw = dict(key_padding_mask=kpm, query_padding_mask=qpm, need_weights="full", return_aux=AUX,
              prune=BlockPruning(block_q=16, block_k=16, top_k=3))
    clean = _outputs(crossattn.cross_attention(q, k, v, attn_bias=bias, **kw))
    k[0, :, 100:140], v[0, :, 100:140], q[1, :, 15:] = math.nan, math.inf, math.nan
    bias[0, ..., 100:140] = math.nan
    leaves = [t.requires_grad_() for t in (q, k, v)]
    dirty = _outputs(crossattn.cross_attention(q, k, v, attn_bias=bias, **kw))
    assert gathered == [1, 1]
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    grads = torch.autograd.grad(dirty[0].sum() + dirty[1].sum() + dirty[4].sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_ragged_batches_keep_the_cheaper_path(gathered):
    # One long and seven short key sequences: the kept blocks of the longest set the gathered
    # width for all, which would cost more than the ragged dense parts; the dense path runs.
    B, H, Lq, Lk, D = 8, 2, 64, 1024, 8
    q, k, v = make_qkv(B, H, Lq, Lk, D)
    lengths = torch.tensor([1024] + [64] * 7)
    aux = AuxRequest(lse=True)
    dense, _ = _flops(lambda: crossattn.cross_attention(q, k, v, kv_lengths=lengths, return_aux=aux))
    pruned, _ = _flops(lambda: crossattn.cross_attention(q, k, v, kv_lengths=lengths, return_aux=aux,
                                                         prune=BlockPruning(block_q=64, block_k=64, keep=0.25)))
    assert gathered == [] and pruned <= dense * 1.01  # the block selection's few FLOPs on top


def test_tracing_dense_selections_and_big_temporaries_keep_the_dense_path(gathered, monkeypatch):
    q, k, v = make_qkv(1, 2, 40, 128, 8)
    pruning = BlockPruning(block_q=16, block_k=16, top_k=2)
    out, _ = crossattn.cross_attention(q.to("meta"), k.to("meta"), v.to("meta"), prune=pruning)
    assert out.shape == q.shape and out.device.type == "meta"
    # Everything kept: gathering would save nothing.
    crossattn.cross_attention(q, k, v, prune=BlockPruning(block_q=16, block_k=16, keep=1.0))
    assert gathered == []
    # The gathered call's whole-call temporaries (~30 KiB here) past four chunk budgets.
    monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", str(4 / 1024))
    crossattn.cross_attention(q, k, v, prune=pruning)
    assert gathered == []
    monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", str(64 / 1024))
    crossattn.cross_attention(q, k, v, prune=pruning)
    assert gathered == [1]


def test_dropout_bits_are_drawn_within_the_chunk_budget(gathered, saved_p, monkeypatch):
    # One kept 16-key block of 64 per query block: the gathered problem is 1/64 of the dense
    # one, whose whole dropout mask ([B, H, Lq, Lk]) the draw must not allocate at once.
    B, H, L, D = 1, 2, 1024, 8
    q, k, v = make_qkv(B, H, L, L, D, requires_grad=True)
    draws = []
    real = _torch_pruned.dropout_keep_mask
    monkeypatch.setattr(_torch_pruned, "dropout_keep_mask",
                        lambda *a, **kw: draws.append(len(kw["rows"])) or real(*a, **kw))
    monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", "32")
    pruning = BlockPruning(block_q=16, block_k=16, top_k=1)
    torch.manual_seed(7)
    out, w = crossattn.cross_attention(q, k, v, prune=pruning, dropout_p=0.2, need_weights="full", backend="torch")
    assert gathered == [1] and len(saved_p) == 1
    # every row once (a row of each of the 64 query blocks per gathered row), a budget's worth at a time
    assert sum(draws) == L and len(draws) > 1 and max(draws) * B * H * L * 41 <= 32 * 2**20
    torch.manual_seed(7)
    ref_out, ref_w = attention_reference(*(t.detach().double() for t in (q, k, v)), prune=pruning, dropout_p=0.2,
                                         dropout_seed=draw_dropout_seed(), need_weights="full")
    torch.testing.assert_close(out.double(), ref_out, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    torch.testing.assert_close(w.double(), ref_w, rtol=TOL[torch.float32], atol=TOL[torch.float32])
