"""The reference itself: semantics from first principles, gradcheck, parity with torch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crossattn.reference import (
    attention_reference,
    bidirectional_reference,
)
from conftest import make_qkv, random_padding


def naive(q, k, v, scale, allowed=None):
    """Loop-free textbook formula on float64, with an explicit allowed-pairs mask."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1)
    return p @ v, p


def test_plain_attention_matches_textbook_formula():
    q, k, v = make_qkv(2, 3, 5, 11, 7, 4, dtype=torch.float64)
    out, w = attention_reference(q, k, v, need_weights="full")
    out2, w2 = naive(q, k, v, 1 / math.sqrt(7))
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


def test_matches_sdpa_on_float64():
    q, k, v = make_qkv(2, 4, 9, 13, 96, 40, dtype=torch.float64)
    out, _ = attention_reference(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_key_padding_equals_dropping_the_keys():
    q, k, v = make_qkv(1, 2, 6, 10, 8, dtype=torch.float64)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 7:] = True
    out, w = attention_reference(q, k, v, key_padding_mask=mask, need_weights="full")
    out2, w2 = naive(q, k[:, :, :7], v[:, :, :7], 1 / math.sqrt(8))
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(w[..., :7], w2)
    assert (w[..., 7:] == 0).all()


def test_kv_lengths_equal_key_padding_mask():
    q, k, v = make_qkv(3, 2, 4, 9, 8, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 0])
    mask = torch.arange(9)[None] >= lengths[:, None]
    a = attention_reference(q, k, v, kv_lengths=lengths, need_weights="full")
    b = attention_reference(q, k, v, key_padding_mask=mask, need_weights="full")
    torch.testing.assert_close(a, b)


def test_empty_rows_give_zeros_and_zero_gradients():
    q, k, v = make_qkv(2, 2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True  # batch 1 has no valid key at all
    qpm = torch.zeros(2, 5, dtype=torch.bool)
    qpm[0, 3:] = True  # two padded queries in batch 0
    out, w = attention_reference(
        q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, need_weights="full"
    )
    assert (out[1] == 0).all() and (w[1] == 0).all()
    assert (out[0, :, 3:] == 0).all() and (w[0, :, 3:] == 0).all()
    (out.sum() + (w * torch.randn_like(w)).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[0, :, 3:] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_temperature_divides_the_logits():
    q, k, v = make_qkv(1, 3, 4, 5, 8, dtype=torch.float64)
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    _, w = attention_reference(q, k, v, temperature=t, need_weights="full")
    for h in range(3):
        _, wh = naive(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], 1 / math.sqrt(8) / t[h].item())
        torch.testing.assert_close(w[:, h:h + 1], wh)
    a = attention_reference(q, k, v, temperature=2.0, need_weights="full")
    b = attention_reference(q, k, v, scale=1 / math.sqrt(8) / 2.0, need_weights="full")
    torch.testing.assert_close(a, b)


def test_mean_weights_average_the_heads():
    q, k, v = make_qkv(2, 5, 3, 7, 4, dtype=torch.float64)
    _, full = attention_reference(q, k, v, need_weights="full")
    _, mean = attention_reference(q, k, v, need_weights="mean")
    torch.testing.assert_close(mean, full.mean(1))


def test_dropout_rescales_kept_weights_and_returns_pre_dropout_weights():
    q, k, v = make_qkv(2, 2, 8, 9, 4, dtype=torch.float64)
    _, w = attention_reference(q, k, v, need_weights="full")
    out, wd = attention_reference(q, k, v, dropout_p=0.25, dropout_seed=7, need_weights="full")
    torch.testing.assert_close(wd, w)
    from crossattn._philox import dropout_keep_mask

    keep = dropout_keep_mask(7, 0.25, batch=2, heads=2, rows=torch.arange(8), cols=9)
    torch.testing.assert_close(out, (w * keep / 0.75) @ v)
    out_all_dropped, _ = attention_reference(q, k, v, dropout_p=1.0, dropout_seed=7)
    assert (out_all_dropped == 0).all()


def test_bidirectional_reference_is_two_directions():
    qx, kx, vx = make_qkv(2, 2, 5, 5, 8, 3, dtype=torch.float64, seed=1)
    qy, ky, vy = make_qkv(2, 2, 7, 7, 8, 6, dtype=torch.float64, seed=2)
    xm = random_padding(2, 5, seed=3)
    ym = random_padding(2, 7, seed=4)
    res = bidirectional_reference(
        qx, kx, vx, qy, ky, vy, x_padding_mask=xm, y_padding_mask=ym, need_weights="full"
    )
    ox, wxy = attention_reference(qx, ky, vy, key_padding_mask=ym, query_padding_mask=xm,
                                  need_weights="full")
    oy, wyx = attention_reference(qy, kx, vx, key_padding_mask=xm, query_padding_mask=ym,
                                  need_weights="full")
    torch.testing.assert_close(res.out_x, ox)
    torch.testing.assert_close(res.out_y, oy)
    torch.testing.assert_close(res.weights_xy, wxy)
    torch.testing.assert_close(res.weights_yx, wyx)
    assert res.out_x.shape == (2, 2, 5, 6) and res.weights_yx.shape == (2, 2, 7, 5)


@pytest.mark.parametrize("need_weights", ["full", "mean"])
def test_gradcheck_through_outputs_weights_and_temperature(need_weights):
    q, k, v = make_qkv(2, 2, 3, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, False, False, True, True], [False] * 5])
    qpm = torch.tensor([[False, False, True], [False, False, False]])

    def fn(q, k, v, t):
        return attention_reference(
            q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, temperature=t,
            need_weights=need_weights, dropout_p=0.3, dropout_seed=11,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, t))


def test_gradcheck_with_an_empty_row():
    q, k, v = make_qkv(1, 1, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(1, 4, dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_reference(q, k, v, key_padding_mask=kpm, need_weights="full"),
        (q, k, v),
    )


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("E,H,Lq,Lk", [(24, 3, 5, 9), (96 * 2, 2, 1, 17)])
def test_parity_with_multi_head_attention_forward(E, H, Lq, Lk, average):
    torch.manual_seed(0)
    B = 3
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
    query = torch.randn(B, Lq, E, dtype=torch.float64)
    key = torch.randn(B, Lk, E, dtype=torch.float64)
    value = torch.randn(B, Lk, E, dtype=torch.float64)
    kpm = random_padding(B, Lk, seed=1)
    expected, expected_w = F.multi_head_attention_forward(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), E, H,
        mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
        mha.out_proj.weight, mha.out_proj.bias, training=False, key_padding_mask=kpm,
        need_weights=True, average_attn_weights=average,
    )
    expected = expected.transpose(0, 1)

    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(x, w, b):
        return F.linear(x, w, b).view(B, -1, H, E // H).transpose(1, 2)

    out, w = attention_reference(
        heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv),
        key_padding_mask=kpm, need_weights="mean" if average else "full",
    )
    out = mha.out_proj(out.transpose(1, 2).reshape(B, Lq, E))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w, expected_w)


def test_fully_padded_row_is_zero_where_torch_gives_nan():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    kpm = torch.tensor([[True, True, True], [False, False, True]])
    torch_out, _ = mha(x, x, x, key_padding_mask=kpm)
    assert torch.isnan(torch_out[0]).all()
    qh = x.view(2, 3, 2, 4).transpose(1, 2)
    out, w = attention_reference(qh, qh, qh, key_padding_mask=kpm, need_weights="full")
    assert (out[0] == 0).all() and (w[0] == 0).all()
