"""Issue 18's kernel defects, each against the float64 reference (interpreter: tiny shapes)."""
from __future__ import annotations

import pytest
import torch

import crossattn
from conftest import (
    DEVICE,
    GRAD_TOL,
    INTERPRETING,
    assert_close,
    check_bidirectional,
    f64,
    leaf,
    random_padding,
    reference,
    triton_ready,
)
from crossattn.reference import attention_reference, bidirectional_reference

pytestmark = pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETING else [torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_weights", ["full", "mean"])
def test_bidirectional_per_side_head_dims(dtype, need_weights):
    """#1: x->y uses D / Dv, y->x uses D' / Dv' (D' != D, Dv' != Dv): values, shapes, grads."""
    B, H, Lx, Ly, D, Dp, Dv, Dvp = 2, 2, 5, 7, 8, 16, 24, 8
    xs = [leaf(B, H, L, d, dtype=dtype, seed=i)
          for i, (L, d) in enumerate([(Lx, D), (Lx, Dp), (Lx, Dvp), (Ly, Dp), (Ly, D), (Ly, Dv)])]
    kw = dict(x_padding_mask=random_padding(B, Lx, seed=1).to(DEVICE), need_weights=need_weights,
              temperature=(torch.tensor([0.7, 1.3], device=DEVICE, requires_grad=True), 0.9))
    res = crossattn.bidirectional_cross_attention(*xs, backend="triton", **kw)
    assert res.out_x.shape == (B, H, Lx, Dv) and res.out_y.shape == (B, H, Ly, Dvp)
    ins64 = f64(*xs)
    t64 = kw["temperature"][0].detach().double().requires_grad_(True)
    ref = bidirectional_reference(*ins64, **dict(kw, temperature=(t64, 0.9)))
    check_bidirectional(res, ref, (*xs, kw["temperature"][0]), (*ins64, t64), dtype)


@pytest.mark.parametrize("dtype,logit,scale", [(torch.float32, 1e8, 1.0), (torch.float16, 6e4, 1e3)], ids=str)
def test_weights_exact_at_huge_tied_logits(dtype, logit, scale):
    """#2: identical keys at a huge logit: every weight is exactly 1/Lk (a single LSE rounds
    it away: rows of ones)."""
    q = torch.ones(1, 2, 4, 16, device=DEVICE, dtype=dtype)
    k = torch.full((1, 2, 8, 16), logit / 16, device=DEVICE, dtype=dtype)
    v = torch.randn(1, 2, 8, 16).to(device=DEVICE, dtype=dtype)
    for need_weights, shape in (("full", (1, 2, 4, 8)), ("mean", (1, 4, 8))):
        out, w = crossattn.cross_attention(q, k, v, scale=scale, need_weights=need_weights, backend="triton")
        assert_close(w, torch.full(shape, 0.125, dtype=torch.float64), dtype, what="weights")
        assert_close(out, v.double().mean(2, keepdim=True).expand(1, 2, 4, 16), dtype, what="out")


@pytest.mark.parametrize("split", [None, "3"])
def test_weights_and_gradients_at_a_tiny_temperature(split, monkeypatch):
    """#2: temperature 1e-6 (logits ~1e6): weights and gradients as accurate as at T = 1."""
    if split:
        monkeypatch.setenv("CROSSATTN_TRITON_SPLITS", split)
    q, k, v = (leaf(2, 2, L, 16, dtype=torch.float32, seed=s) for s, L in ((1, 6), (2, 40), (3, 40)))
    # Two exactly tied best keys per row in batch 0, so the weights are not merely one-hot.
    with torch.no_grad():
        k[0, :, 1] = k[0, :, 0]
    out, w = crossattn.cross_attention(q, k, v, temperature=1e-6, need_weights="full", backend="triton")
    ref_out, ref_w = reference(q, k, v, temperature=1e-6, need_weights="full")
    assert_close(w, ref_w, torch.float32, what="weights")
    assert_close(out, ref_out, torch.float32, what="out")
    (out.square().sum() + (w * torch.arange(40, device=DEVICE)).sum()).backward()
    q64, k64, v64 = f64(q, k, v)
    ro, rw = crossattn.cross_attention(q64, k64, v64, temperature=1e-6, need_weights="full", backend="torch")
    (ro.square().sum() + (rw * torch.arange(40, device=DEVICE)).sum()).backward()
    assert_close(v.grad, v64.grad, torch.float32, tol=GRAD_TOL[torch.float32], what="dv")


@pytest.mark.parametrize("B,H", [(0, 2), (2, 0)])
def test_backward_with_no_batch_or_heads_and_a_temperature(B, H):
    """#11: an empty batch or no heads with a learnable temperature: empty gradients and a zero
    temperature gradient, no reshape error."""
    q, k, v = (leaf(B, H, L, 16, dtype=torch.float32, seed=s) for s, L in ((1, 5), (2, 7), (3, 7)))
    t = torch.full((max(H, 1),), 0.8, device=DEVICE, requires_grad=True) if H else \
        torch.tensor(0.8, device=DEVICE, requires_grad=True)
    out, w = crossattn.cross_attention(q, k, v, temperature=t, need_weights="full", backend="triton")
    assert out.shape == (B, H, 5, 16) and w.shape == (B, H, 5, 7)
    (out.sum() + w.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dtype,D,Dv", [(torch.float32, 40, 24), (torch.float16, 160, 96)], ids=str)
def test_streamed_and_held_backward_operands_agree_with_the_reference(dtype, D, Dv, stream, monkeypatch):
    """The backward's q.k and dO.v with operands held in registers or streamed 32 columns at a
    time (kernels/xattn.py ``_streamed``: fp32 and head dims past 128 stream, to avoid spills):
    both paths, head dims not a multiple of 32, padding on both sides, per-head temperatures and
    a loss on the full weights, against the float64 reference."""
    from crossattn.kernels import xattn

    monkeypatch.setattr(xattn, "_streamed", lambda *a: stream)
    B, H, Lq, Lk = 2, 2, 19, 45
    kpm = random_padding(B, Lk, seed=2).to(DEVICE)
    qpm = random_padding(B, Lq, seed=3).to(DEVICE)
    q, k, v = leaf(B, H, Lq, D, dtype=dtype, seed=1), leaf(B, H, Lk, D, dtype=dtype, seed=2), \
        leaf(B, H, Lk, Dv, dtype=dtype, seed=3)
    t = torch.tensor([0.7, 1.3], device=DEVICE, requires_grad=True)
    kw = dict(key_padding_mask=kpm, query_padding_mask=qpm, need_weights="full")
    out, w = crossattn.cross_attention(q, k, v, temperature=t, backend="triton", **kw)
    q64, k64, v64 = f64(q, k, v)
    t64 = t.detach().double().requires_grad_(True)
    ref_out, ref_w = attention_reference(q64, k64, v64, temperature=t64, **kw)
    assert_close(out, ref_out, dtype, what="out")
    assert_close(w, ref_w, dtype, what="weights")
    g = torch.Generator().manual_seed(5)
    gw = torch.randn(w.shape, generator=g).to(DEVICE)
    ((out.double() ** 2).sum() + (w.double() * gw.double()).sum()).backward()
    ((ref_out ** 2).sum() + (ref_w * gw.double()).sum()).backward()
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64), ("dT", t, t64)):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * 10, what=name)
