"""torch.compile(fullgraph=True) traces the functional API on the torch backend."""
from __future__ import annotations

import pytest
import torch

import crossattn
from conftest import make_qkv, random_padding


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_with_gradients():
    q, k, v = make_qkv(2, 4, 10, 30, 16, requires_grad=True)
    t = torch.ones(4, requires_grad=True)
    kpm = random_padding(2, 30, seed=1)

    def f(q, k, v, t):
        o, w = crossattn.cross_attention(q, k, v, key_padding_mask=kpm, need_weights="mean",
                                         temperature=t, backend="torch")
        return o.sum() + w.square().sum()

    expected = f(q, k, v, t)
    expected.backward()
    grads = [x.grad.clone() for x in (q, k, v, t)]
    for x in (q, k, v, t):
        x.grad = None
    got = torch.compile(f, fullgraph=True)(q, k, v, t)
    got.backward()
    torch.testing.assert_close(got, expected)
    for x, g in zip((q, k, v, t), grads):
        torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph_traces_dropout_and_both_directions():
    qx, kx, vx = make_qkv(2, 2, 12, 12, 8, seed=1, requires_grad=True)
    qy, ky, vy = make_qkv(2, 2, 20, 20, 8, seed=2)

    def f(qx, kx, vx, p):
        r = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, dropout_p=p,
                                                    need_weights="full")
        return r.out_x, r.out_y, r.weights_xy, r.weights_yx

    out_x, out_y, w_xy, w_yx = torch.compile(f, fullgraph=True)(qx, kx, vx, 0.5)
    clean = f(qx, kx, vx, 0.0)
    # Weights are pre-dropout, so they match eager exactly; the outputs were dropped out.
    torch.testing.assert_close(w_xy, clean[2])
    torch.testing.assert_close(w_yx, clean[3])
    assert not torch.allclose(out_x, clean[0]) and not torch.allclose(out_y, clean[1])
    (out_x.sum() + out_y.sum()).backward()
    assert torch.isfinite(qx.grad).all() and qx.grad.abs().sum() > 0
