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

    # Inductor draws random numbers with its own generator (a different seed than eager's)
    # unless fallback_random; with it, the same seed must give the same Philox mask.
    import torch._inductor.config as inductor_config
    torch.manual_seed(3)
    with inductor_config.patch(fallback_random=True):
        out_x, out_y, w_xy, w_yx = torch.compile(f, fullgraph=True)(qx, kx, vx, 0.5)
    (out_x.sum() + out_y.sum()).backward()
    grad, qx.grad = qx.grad, None
    clean = f(qx, kx, vx, 0.0)
    # Weights are pre-dropout, so they match eager exactly; the outputs were dropped out.
    torch.testing.assert_close(w_xy, clean[2])
    torch.testing.assert_close(w_yx, clean[3])
    assert not torch.allclose(out_x, clean[0]) and not torch.allclose(out_y, clean[1])
    # Inductor's C++ computes the mask eager's torch ops compute (no int64 overflow in it).
    torch.manual_seed(3)
    eager = f(qx, kx, vx, 0.5)
    torch.testing.assert_close(out_x, eager[0])
    torch.testing.assert_close(out_y, eager[1])
    (eager[0].sum() + eager[1].sum()).backward()
    torch.testing.assert_close(grad, qx.grad)


@pytest.mark.slow
def test_compiled_dropout_mask_is_eagers():
    """Inductor's C++ makes int64 wrap-around signed overflow (undefined, assumed away): the
    Philox rounds must not rely on it, or the compiled mask differs from eager's."""
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)

    def f(q, k, v):
        return crossattn.cross_attention(q, k, v, dropout_p=0.3, backend="torch")[0]

    torch.manual_seed(1)
    eager = f(q, k, v)
    torch.manual_seed(1)
    with inductor_config.patch(fallback_random=True):  # the seed drawn from eager's generator
        compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
