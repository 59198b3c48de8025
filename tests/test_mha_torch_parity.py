"""crossattn.nn.MultiheadAttention against torch.nn.MultiheadAttention, case by case.

Modelled on PyTorch's test/nn/test_multihead_attention.py: every case builds torch's module
and ours with one state dict, runs both on the same inputs and compares outputs, weights and
gradients -- or, for bad input, the exception type and message. A counter on the kernels
proves which calls they served.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import crossattn.nn.multihead as mh
from crossattn.nn import MultiheadAttention

D64 = torch.float64


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = mh.cross_attention
    monkeypatch.setattr(mh, "cross_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def pair(embed_dim=8, num_heads=2, dtype=D64, seed=0, **kwargs):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kwargs)
    ours = MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    if kwargs.get("add_bias_kv"):  # random biases, not the zeros a fresh module may hold
        with torch.no_grad():
            for m in (theirs, ours):
                m.bias_k.copy_(torch.linspace(-1, 1, embed_dim, dtype=dtype).view(1, 1, -1))
                m.bias_v.copy_(torch.linspace(1, -1, embed_dim, dtype=dtype).view(1, 1, -1))
    return theirs, ours


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def run_both(theirs, ours, query, key, value, *, self_attention=False, grads=True, **kw):
    """Forward both modules on copies of the inputs; compare outputs, weights and (with
    ``grads``) the gradients of the inputs and of every parameter."""
    results = []
    for m in (theirs, ours):
        m.zero_grad()
        q, k, v = leaves(query, key, value)
        if self_attention:
            k = v = q
        out, w = m(q, k, v, **kw)
        if grads:
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
            if w is not None:
                loss = loss + (w * torch.linspace(1, 2, w.numel(), dtype=w.dtype).view_as(w)).sum()
            loss.backward()
        results.append((out, w, [t.grad for t in (q, k, v)], {n: p.grad for n, p in m.named_parameters()}))
    (ref, ref_w, ref_g, ref_pg), (out, w, g, pg) = results
    torch.testing.assert_close(out, ref)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w)
    if grads:
        for a, b in zip(g, ref_g):
            if b is not None:
                torch.testing.assert_close(a, b)
        assert pg.keys() == ref_pg.keys()
        for name in ref_pg:
            if ref_pg[name] is not None:
                torch.testing.assert_close(pg[name], ref_pg[name], msg=name)
    return out, w


def same_error(theirs, ours, *args, **kw):
    """Both modules raise the same exception type with the same message."""
    with pytest.raises(Exception) as ref:
        theirs(*args, **kw)
    with pytest.raises(type(ref.value)) as got:
        ours(*args, **kw)
    assert str(got.value) == str(ref.value)
    return ref.value


def inputs(B, L, S, E, kdim=None, vdim=None, batch_first=False, seed=1, dtype=D64):
    g = torch.Generator().manual_seed(seed)

    def make(n, e):
        shape = (B, n, e) if batch_first else (n, B, e)
        return torch.randn(shape, generator=g, dtype=dtype)

    return make(L, E), make(S, kdim or E), make(S, vdim or E)


def padding(B, S, seed=2, kind="bool", dtype=D64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    pad = torch.arange(S)[None, :] >= lengths[:, None]
    return pad if kind == "bool" else torch.zeros(B, S, dtype=dtype).masked_fill(pad, float("-inf"))


# -------------------------------------------------- test_multihead_attn_* (the torch cases)
@pytest.mark.parametrize("same_embed_dim", [True, False])
@pytest.mark.parametrize("key_padding", [None, "bool", "float"])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_pytorch_cases(same_embed_dim, key_padding, average, batch_first, kernel_calls):
    """_multihead_attn_test_helper: key padding, separate kdim/vdim, head averaging, layout."""
    kdim, vdim = (None, None) if same_embed_dim else (5, 7)
    theirs, ours = pair(12, 3, kdim=kdim, vdim=vdim, batch_first=batch_first)
    q, k, v = inputs(3, 4, 6, 12, kdim, vdim, batch_first)
    kpm = None if key_padding is None else padding(3, 6, kind=key_padding)
    run_both(theirs, ours, q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("mask_dim", [2, 3])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attn_attn_mask(mask_dim, kind, with_padding, need_weights, kernel_calls):
    """test_multihead_attn_3d_attn_mask and the 2-D case: bool and additive masks, with key
    padding merged in, served by the kernels through attn_bias."""
    B, H, L, S = 2, 2, 5, 7
    theirs, ours = pair(8, H)
    q, k, v = inputs(B, L, S, 8)
    g = torch.Generator().manual_seed(3)
    shape = (L, S) if mask_dim == 2 else (B * H, L, S)
    blocked = torch.rand(shape, generator=g) < 0.3
    blocked[..., 0] = False  # every row keeps a key: torch gives NaN on empty rows
    if kind == "bool":
        mask = blocked
    else:
        mask = torch.randn(shape, generator=g, dtype=D64).masked_fill(blocked, float("-inf"))
    kpm = padding(B, S, kind=kind) if with_padding else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "mismatched mask types" deprecation
        run_both(theirs, ours, q, k, v, attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights)
    assert len(kernel_calls) == 1 and kernel_calls[0]["attn_bias"] is not None


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_is_causal_runs_causal_in_the_kernels(need_weights, with_padding, batch_first, kernel_calls):
    """test_mha_is_causal: the hint with its causal mask; the kernels apply causality
    themselves and never read the [L, L] mask."""
    theirs, ours = pair(8, 2, batch_first=batch_first)
    q, _, _ = inputs(2, 6, 6, 8, batch_first=batch_first)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=D64)
    kpm = padding(2, 6) if with_padding else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_both(theirs, ours, q, q, q, self_attention=True, attn_mask=mask, is_causal=True,
                 key_padding_mask=kpm, need_weights=need_weights)
    assert len(kernel_calls) == 1
    assert kernel_calls[0]["is_causal"] is True and kernel_calls[0]["attn_bias"] is None


def test_is_causal_with_more_keys_than_queries_is_top_left_as_torch(kernel_calls):
    """torch's SDPA path applies is_causal top-left aligned when it drops the mask."""
    theirs, ours = pair(8, 2)
    q, k, v = inputs(2, 4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.bool).triu(1)
    run_both(theirs, ours, q, k, v, attn_mask=mask, is_causal=True, need_weights=False)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("case", ["plain", "key_padding", "attn_mask_2d", "attn_mask_3d"])
def test_unbatched_inputs(average, case, kernel_calls):
    """test_multihead_attention batched/unbatched: 2-D query, 1-D key padding mask, a 3-D
    mask of shape [H, L, S]."""
    theirs, ours = pair(8, 2)
    q, k, v = (t[:, 0] for t in inputs(1, 4, 5, 8))
    kw = {"average_attn_weights": average}
    if case == "key_padding":
        kw["key_padding_mask"] = torch.tensor([False, False, True, False, True])
    elif case == "attn_mask_2d":
        kw["attn_mask"] = torch.eye(4, 5, dtype=torch.bool)
    elif case == "attn_mask_3d":
        kw["attn_mask"] = torch.randn(2, 4, 5, dtype=D64)
    out, w = run_both(theirs, ours, q, k, v, **kw)
    assert out.shape == (4, 8) and w.shape == ((4, 5) if average else (2, 4, 5))
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attn_in_proj_bias_none(bias, kernel_calls):
    theirs, ours = pair(8, 2, bias=bias)
    run_both(theirs, ours, *inputs(2, 3, 4, 8))
    assert (ours.in_proj_bias is None) == (not bias)


def test_batch_size_one_and_self_attention(kernel_calls):
    theirs, ours = pair(8, 2, batch_first=True)
    q, _, _ = inputs(1, 5, 5, 8, batch_first=True)
    run_both(theirs, ours, q, q, q, self_attention=True)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("key_padding", [False, True])
def test_add_bias_kv_and_add_zero_attn_fall_back_to_torch(add_bias_kv, add_zero_attn, key_padding, kernel_calls):
    """test_multihead_attn_add_bias_kv / _add_zero_attn / _add_bias_kv_zero_attn: torch's own
    implementation, so exactly torch's numbers."""
    theirs, ours = pair(8, 2, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    q, k, v = inputs(2, 3, 4, 8)
    run_both(theirs, ours, q, k, v, key_padding_mask=padding(2, 4) if key_padding else None)
    assert "not supported by the kernels" in ours.fallback_reason(q, k, v)
    assert kernel_calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_multihead_attention_dtype(dtype, kernel_calls):
    """test_multihead_attention_dtype: every float dtype runs and keeps its dtype."""
    theirs, ours = pair(8, 2, dtype=dtype, batch_first=True)
    q, k, v = inputs(2, 3, 4, 8, batch_first=True, dtype=dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    with torch.no_grad():
        theirs.train(), ours.train()  # no native fast path on either side
        ref, ref_w = theirs(q, k, v)
        out, w = ours(q, k, v)
    assert out.dtype == dtype and w.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(w, ref_w, rtol=tol, atol=tol)


def test_float_mask_of_another_dtype_goes_to_torch(kernel_calls):
    theirs, ours = pair(8, 2)
    q, k, v = inputs(2, 3, 4, 8)
    kpm = padding(2, 4, kind="float", dtype=torch.float32)
    assert ours.fallback_reason(q, k, v, key_padding_mask=kpm) == (
        "a float key_padding_mask of dtype torch.float32 with a torch.float64 query")
    try:
        ref = theirs(q, k, v, key_padding_mask=kpm)
    except Exception as e:  # torch may refuse the mix: then so do we, with its words
        same_error(theirs, ours, q, k, v, key_padding_mask=kpm)
        assert isinstance(e, Exception)
    else:
        torch.testing.assert_close(ours(q, k, v, key_padding_mask=kpm), ref)
    assert kernel_calls == []


def test_eval_mode_self_attention_matches_torchs_fast_path(kernel_calls):
    """test_multihead_attn_fast_path_small_test: where torch takes its native fast path (eval,
    no grad, batch-first self-attention) ours still runs the kernels, with the same result."""
    theirs, ours = pair(8, 2, batch_first=True)
    theirs.eval(), ours.eval()
    q, _, _ = inputs(2, 5, 5, 8, batch_first=True)
    kpm = padding(2, 5)
    with torch.no_grad():
        ref, ref_w = theirs(q, q, q, key_padding_mask=kpm)
        out, w = ours(q, q, q, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)
    assert len(kernel_calls) == 1


def test_dropout_in_training_trains(kernel_calls):
    """Dropout draws differ from torch's; the output is finite, the weights pre-dropout."""
    _, ours = pair(8, 2, dropout=0.5)
    q, k, v = leaves(*inputs(2, 3, 4, 8))
    out, w = ours(q, k, v)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, dtype=D64))
    assert kernel_calls[0]["dropout_p"] == 0.5


# ------------------------------------------------------------------------ NestedTensor
def test_nested_tensor_in_eval_falls_back_to_torchs_fast_path(kernel_calls):
    """A strided NestedTensor with need_weights=False in eval: torch's native fast path
    serves it, so ours hands it over (the kernels take no nested tensors)."""
    theirs, ours = pair(8, 2, batch_first=True, dtype=torch.float32)
    theirs.eval(), ours.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.nested.nested_tensor([torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)])
    assert ours.fallback_reason(x, x, x).startswith("NestedTensor")
    with torch.no_grad():
        ref, _ = theirs(x, x, x, need_weights=False)
        out, w = ours(x, x, x, need_weights=False)
    assert out.is_nested and w is None
    for a, b in zip(out.unbind(), ref.unbind()):
        torch.testing.assert_close(a, b)
    assert kernel_calls == []


def test_nested_tensor_outside_the_fast_path_raises_torchs_error():
    """test_multihead_attn_nested_tensor_outside_fast_path."""
    theirs, ours = pair(8, 2, batch_first=True, dtype=torch.float32)
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    err = same_error(theirs, ours, x, x, x)  # training mode: no fast path
    assert "NestedTensor" in str(err)


# ---------------------------------------------------------- test_multihead_attn_invalid_shape
def _bad_cases():
    """(constructor kwargs, args builder, forward kwargs): each rejected by torch."""
    r = torch.randn
    E = 8
    return {
        "query_4d": ({}, lambda: (r(1, 2, 3, E), r(1, 2, E), r(1, 2, E)), {}),
        "query_1d": ({}, lambda: (r(E), r(2, E), r(2, E)), {}),
        "batched_query_2d_key": ({}, lambda: (r(5, 1, E), r(6, E), r(6, E)), {}),
        "batched_query_2d_value": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, E)), {}),
        "unbatched_query_3d_key": ({}, lambda: (r(5, E), r(6, 1, E), r(6, 1, E)), {}),
        "batched_kpm_1d": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                           {"key_padding_mask": torch.zeros(6, dtype=torch.bool)}),
        "unbatched_kpm_2d": ({}, lambda: (r(5, E), r(6, E), r(6, E)),
                             {"key_padding_mask": torch.zeros(1, 6, dtype=torch.bool)}),
        "batched_attn_mask_4d": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                                 {"attn_mask": torch.zeros(1, 4, 5, 6, dtype=torch.bool)}),
        "unbatched_attn_mask_1d": ({}, lambda: (r(5, E), r(6, E), r(6, E)),
                                   {"attn_mask": torch.zeros(6, dtype=torch.bool)}),
        "unbatched_attn_mask_3d_shape": ({}, lambda: (r(5, E), r(6, E), r(6, E)),
                                         {"attn_mask": torch.zeros(3, 5, 6, dtype=torch.bool)}),
        "attn_mask_2d_shape": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                               {"attn_mask": torch.zeros(5, 5, dtype=torch.bool)}),
        "attn_mask_3d_shape": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                               {"attn_mask": torch.zeros(2, 5, 6, dtype=torch.bool)}),
        "kpm_batch": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                      {"key_padding_mask": torch.zeros(3, 6, dtype=torch.bool)}),
        "kpm_length": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                       {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}),
        "kpm_int": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                    {"key_padding_mask": torch.zeros(2, 6, dtype=torch.long)}),
        "attn_mask_int": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                          {"attn_mask": torch.zeros(5, 6, dtype=torch.long)}),
        "is_causal_without_mask": ({}, lambda: (r(5, 2, E), r(5, 2, E), r(5, 2, E)), {"is_causal": True}),
        "query_width": ({}, lambda: (r(5, 2, E + 1), r(6, 2, E), r(6, 2, E)), {}),
        "key_width": ({}, lambda: (r(5, 2, E), r(6, 2, E + 2), r(6, 2, E + 2)), {}),
        "key_value_shapes": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(7, 2, E)), {}),
        "key_batch": ({}, lambda: (r(5, 2, E), r(6, 3, E), r(6, 3, E)), {}),
        "query_batch_1_key_batch_2": ({}, lambda: (r(5, 1, E), r(6, 2, E), r(6, 2, E)), {}),
        "kdim_width": ({"kdim": 3, "vdim": 5}, lambda: (r(5, 2, E), r(6, 2, 4), r(6, 2, 5)), {}),
        "vdim_width": ({"kdim": 3, "vdim": 5}, lambda: (r(5, 2, E), r(6, 2, 3), r(6, 2, E)), {}),
        "kdim_lengths": ({"kdim": 3, "vdim": 5}, lambda: (r(5, 2, E), r(6, 2, 3), r(7, 2, 5)), {}),
        "batch_first_query_2d_key": ({"batch_first": True}, lambda: (r(1, 5, E), r(6, E), r(6, E)), {}),
        "batch_first_key_1d": ({"batch_first": True}, lambda: (r(1, 5, E), r(E), r(E)), {}),
        "key_padding_mask_list": ({}, lambda: (r(5, 2, E), r(6, 2, E), r(6, 2, E)),
                                  {"key_padding_mask": [[False] * 6] * 2}),
        "query_list": ({}, lambda: ([[0.0] * E] * 5, r(6, E), r(6, E)), {}),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_invalid_input_raises_torchs_exception_and_message(case, kernel_calls):
    ctor, make, kw = _bad_cases()[case]
    theirs, ours = pair(8, 2, dtype=torch.float32, **ctor)
    torch.manual_seed(0)
    args = make()
    same_error(theirs, ours, *args, **kw)
    assert kernel_calls == []


def test_is_causal_hint_skips_the_mask_check_as_torch_does(kernel_calls):
    """torch never reads (nor checks) attn_mask when is_causal goes to SDPA."""
    theirs, ours = pair(8, 2)
    q, _, _ = inputs(2, 5, 5, 8)
    wrong = torch.zeros(3, 3, dtype=torch.bool)
    run_both(theirs, ours, q, q, q, self_attention=True, attn_mask=wrong, is_causal=True, need_weights=False)
    same_error(theirs, ours, q, q, q, attn_mask=wrong, is_causal=True, need_weights=True)


def test_mismatched_mask_types_warn_as_torch(kernel_calls):
    theirs, ours = pair(8, 2)
    q, k, v = inputs(2, 5, 6, 8)
    kpm, mask = padding(2, 6), torch.zeros(5, 6, dtype=D64)
    for m in (theirs, ours):
        with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask is deprecated"):
            m(q, k, v, key_padding_mask=kpm, attn_mask=mask)


# ------------------------------------------------------------------------------ Triton
@pytest.mark.parametrize("case", ["key_padding", "unbatched_self_attention"])
def test_the_triton_kernels_serve_it_like_torch(case, kernel_calls):
    """The same parity on the Triton backend (interpreter on CPU, kernels on a GPU), in
    float32 at float32 tolerances: outputs, weights, every gradient."""
    from conftest import DEVICE, GRAD_TOL, TOL, triton_ready

    if triton_ready() is not None:
        pytest.skip(f"triton backend: {triton_ready()}")
    theirs, ours = pair(16, 2, dtype=torch.float32, batch_first=True)
    theirs.to(DEVICE), ours.to(DEVICE)
    ours.backend = "triton"
    q, k, v = (t.to(DEVICE) for t in inputs(2, 5, 7, 16, batch_first=True, dtype=torch.float32))
    kw = {}
    if case == "key_padding":
        kw["key_padding_mask"] = padding(2, 7).to(DEVICE)
    else:
        q = k = v = q[0]
    results = []
    for m in (theirs, ours):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, w = m(*x, **kw, average_attn_weights=False)
        ((out * out).sum() + (w * w).sum()).backward()
        results.append((out, w, [t.grad for t in x], [p.grad for p in m.parameters()]))
    (ref, ref_w, ref_g, ref_pg), (out, w, g, pg) = results
    tol, gtol = TOL[torch.float32], GRAD_TOL[torch.float32]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(w, ref_w, rtol=tol, atol=tol)
    for a, b in zip(g + pg, ref_g + ref_pg):
        torch.testing.assert_close(a, b, rtol=gtol, atol=gtol)
    assert len(kernel_calls) == 1 and kernel_calls[0]["backend"] == "triton"


@pytest.mark.slow
def test_compiles_fullgraph_with_masks():
    """torch's checks are replicated without torch._check closures (a graph break)."""
    theirs, ours = pair(8, 2, dtype=torch.float32, batch_first=True)
    ours.eval()
    x = inputs(2, 5, 5, 8, batch_first=True, dtype=torch.float32)[0]
    kw = dict(key_padding_mask=padding(2, 5), attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1),
              is_causal=True)
    torch._dynamo.reset()
    got = torch.compile(ours, fullgraph=True)(x, x, x, **kw)
    for a, b in zip(got, ours(x, x, x, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 2, 4), (5, 0, 4), (0, None, 4), (3, 2, 0)], ids=["no-queries", "no-batch",
                                                                                     "unbatched-no-queries", "no-keys"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_empty_queries_batch_or_keys_give_what_torch_gives(shape, need_weights, average):
    L, B, S = shape
    theirs, ours = pair()
    q = torch.randn((L, 8) if B is None else (L, B, 8), dtype=D64)
    k = torch.randn((S, 8) if B is None else (S, B, 8), dtype=D64)
    ref_out, ref_w = theirs(q, k, k, need_weights=need_weights, average_attn_weights=average)
    out, w = ours(q, k, k, need_weights=need_weights, average_attn_weights=average)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out)
    assert (w is None) == (ref_w is None)
    if w is not None:
        assert w.shape == ref_w.shape
