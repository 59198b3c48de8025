"""The options real models use -- grouped-query heads, additive bias, causality, weight heads,
statistics of the weights, merging chunked results -- on the torch backend against the
float64 reference (the Triton backend's tests reuse ``run_case``)."""
from __future__ import annotations

import math

import pytest
import torch

import crossattn
from conftest import GRAD_TOL, assert_close, random_padding
from crossattn.reference import attention_reference, bidirectional_reference

AUX_ALL = crossattn.AuxRequest(lse=True, entropy=True, key_mass=True, top_k=3)


def inputs(B, H, Hkv, Lq, Lk, D, Dv, dtype, seed=0, bias_shape=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype).requires_grad_()
    bias = None
    if bias_shape is not None:
        bias = (torch.randn(bias_shape, generator=g) * 2).to(dtype).requires_grad_()
    return q, k, v, bias


CASES = {
    "gqa": dict(H=4, Hkv=2),
    "mqa_causal": dict(H=3, Hkv=1, is_causal=True),
    "causal_short_keys": dict(Lq=9, Lk=5, is_causal=True),  # rows 0..3 see no key
    "bias_full": dict(bias_shape=(2, 3, 7, 11)),
    "bias_2d": dict(bias_shape=(7, 11)),
    "bias_heads_keys": dict(bias_shape=(1, 3, 1, 11)),
    "bias_batch_rows": dict(bias_shape=(2, 1, 7, 1)),
    "bias_gqa_causal_padding": dict(H=4, Hkv=2, bias_shape=(4, 7, 11), is_causal=True, kpm=True, qpm=True),
    "weight_heads": dict(weight_heads=(2, 0)),
    "temperature_bias_dropout": dict(temperature="heads", bias_shape=(1, 3, 7, 11), dropout_p=0.25),
    "prune_causal_gqa": dict(H=4, Hkv=2, Lq=40, Lk=70, is_causal=True,
                             prune=crossattn.BlockPruning(block_q=16, block_k=16, keep=0.5)),
    "everything": dict(H=4, Hkv=2, bias_shape=(2, 1, 7, 11), is_causal=True, kpm=True, qpm=True,
                       temperature="heads", weight_heads=(3, 1), dropout_p=0.2),
}


def run_case(case, dtype, need_weights, backend="torch", aux=AUX_ALL, B=2, D=8, Dv=6):
    """One call with ``case``'s options, compared with the float64 reference: output, weights,
    statistics, and the gradients of a loss on all of them for every differentiable input."""
    c = dict(case)
    H, Hkv = c.pop("H", 3), c.pop("Hkv", 3)
    Lq, Lk = c.pop("Lq", 7), c.pop("Lk", 11)
    q, k, v, bias = inputs(B, H, Hkv, Lq, Lk, D, Dv, dtype, bias_shape=c.pop("bias_shape", None))
    kw = {}
    if c.pop("kpm", False):
        kw["key_padding_mask"] = random_padding(B, Lk, seed=2)
    if c.pop("qpm", False):
        kw["query_padding_mask"] = random_padding(B, Lq, seed=3)
    if c.pop("temperature", None):
        kw["temperature"] = (torch.rand(H, generator=torch.Generator().manual_seed(4)) + 0.5).requires_grad_()
    kw.update(c)
    if need_weights is False:
        kw.pop("weight_heads", None)
    if kw.get("dropout_p"):
        kw["dropout_seed"] = torch.tensor(1234)
    seed = kw.pop("dropout_seed", None)

    def call(*ts, ref):
        qq, kk, vv, bb, tt = ts
        args = dict(kw, attn_bias=bb, need_weights=need_weights, return_aux=aux)
        if tt is not None:
            args["temperature"] = tt
        if ref:
            return attention_reference(qq, kk, vv, dropout_seed=seed, **args)
        torch.manual_seed(0)
        return crossattn.cross_attention(qq, kk, vv, backend=backend, **args)

    temp = kw.get("temperature")
    leaves = [t for t in (q, k, v, bias, temp) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    ts64 = [next(it) if t is not None else None for t in (q, k, v, bias, temp)]
    if seed is not None:  # the backend draws its seed from torch's generator: make it match
        torch.manual_seed(0)
        seed = crossattn._philox.draw_dropout_seed()
    got = call(q, k, v, bias, temp, ref=False)
    want = call(*ts64, ref=True)
    out, w, a = got
    rout, rw, ra = want
    assert_close(out, rout, dtype, what="out")
    if need_weights:
        assert_close(w, rw, dtype, what="weights")
    else:
        assert w is None
    for name in a._fields:
        x, y = getattr(a, name), getattr(ra, name)
        if y is None:
            assert x is None, name
        elif name == "top_k_indices":
            assert x.dtype == torch.int64 and x.shape == y.shape
            # Ties and near-ties may order differently in low precision: compare the values.
            if dtype == torch.float64:
                assert torch.equal(x, y)
        else:
            assert torch.isfinite(x).logical_or(y == -math.inf).all(), name
            if name == "lse":
                assert torch.equal(x == -math.inf, y == -math.inf)
                x, y = x.masked_fill(y == -math.inf, 0), y.masked_fill(y == -math.inf, 0)
            assert_close(x, y, dtype, what=name)
    g = torch.Generator().manual_seed(9)

    def loss(res):
        o, ww, aa = res
        terms = [o, ww, aa.lse, aa.entropy, aa.key_mass]
        total = 0.0
        for t in terms:
            if t is None:
                continue
            t = t.double().masked_fill(t == -math.inf, 0.0) if t is aa.lse else t.double()
            total = total + (t * torch.randn(t.shape, generator=g).double()).sum()
        return total

    loss(got).backward()
    g = torch.Generator().manual_seed(9)
    loss(want).backward()
    for a_, b_ in zip(leaves, leaves64):
        assert_close(a_.grad, b_.grad, dtype, tol=GRAD_TOL[dtype] * 2, what="grad")


@pytest.mark.parametrize("need_weights", [False, "full", "mean"])
@pytest.mark.parametrize("name", list(CASES))
def test_options_float32(name, need_weights):
    run_case(CASES[name], torch.float32, need_weights)


@pytest.mark.parametrize("name", ["gqa", "bias_gqa_causal_padding", "everything"])
def test_options_half(name):
    run_case(CASES[name], torch.float16, "full")


@pytest.mark.parametrize("name", ["bias_gqa_causal_padding", "weight_heads", "prune_causal_gqa"])
def test_gradcheck_float64(name):
    """The torch backend's hand-written backward against finite differences, through every
    statistic (lse, entropy, key mass) and the weights."""
    c = dict(CASES[name])
    H, Hkv = c.pop("H", 3), c.pop("Hkv", 3)
    Lq, Lk = c.pop("Lq", 5), c.pop("Lk", 6)
    if "prune" in c:
        Lq, Lk = 20, 40
        c["prune"] = crossattn.BlockPruning(block_q=16, block_k=16, keep=0.5)
    bias_shape = c.pop("bias_shape", None)
    if bias_shape is not None:
        bias_shape = (H, Lq, Lk)
    q, k, v, bias = inputs(1 + ("kpm" in c), H, Hkv, Lq, Lk, 4, 3, torch.float64, bias_shape=bias_shape)
    B = q.shape[0]
    kw = dict(c)
    if kw.pop("kpm", False):
        kw["key_padding_mask"] = random_padding(B, Lk, seed=2)
    if kw.pop("qpm", False):
        kw["query_padding_mask"] = random_padding(B, Lq, seed=3)
    aux = crossattn.AuxRequest(lse=True, entropy=True, key_mass=True)

    def f(q, k, v, *bias):
        out, w, a = crossattn.cross_attention(q, k, v, attn_bias=bias[0] if bias else None, need_weights="full",
                                              return_aux=aux, backend="torch", **kw)
        return out, w, a.lse.masked_fill(a.lse == -math.inf, 0.0), a.entropy, a.key_mass

    args = (q, k, v) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(f, args, atol=1e-6)


def test_causal_is_bottom_right_and_decoding_matches_full():
    """Decoding the last query against a cache equals the last row of the full causal call."""
    q, k, v, _ = inputs(1, 2, 2, 6, 6, 8, 8, torch.float64)
    full, _ = crossattn.cross_attention(q, k, v, is_causal=True)
    last, _ = crossattn.cross_attention(q[:, :, -1:], k, v, is_causal=True)
    torch.testing.assert_close(last, full[:, :, -1:])
    _, w = crossattn.cross_attention(q, k, v, is_causal=True, need_weights="full")
    assert torch.equal(w[0, 0] > 0, torch.ones(6, 6, dtype=torch.bool).tril())


def test_gqa_does_not_copy_keys(monkeypatch):
    """Grouped heads read the shared kv head: no repeat_interleave / expand of k or v."""
    q, k, v, _ = inputs(1, 8, 2, 5, 9, 8, 8, torch.float32)
    for name in ("repeat_interleave", "repeat"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **kw: pytest.fail(f"k/v copied with {_n}"))
    out, _ = crossattn.cross_attention(q, k, v, backend="torch")
    monkeypatch.undo()
    ref, _ = attention_reference(q.double(), k.double(), v.double())
    assert_close(out, ref, torch.float32)


def test_bias_minus_inf_masks_and_empty_rows_are_zero():
    q, k, v, _ = inputs(1, 1, 1, 3, 4, 8, 8, torch.float32)
    bias = torch.zeros(3, 4)
    bias[0] = -math.inf  # row 0 sees nothing
    bias[1, 2:] = -math.inf
    out, w, a = crossattn.cross_attention(q, k, v, attn_bias=bias, need_weights="full",
                                          return_aux=AUX_ALL)
    assert torch.equal(out[0, 0, 0], torch.zeros(8)) and torch.equal(w[0, 0, 0], torch.zeros(4))
    assert torch.equal(w[0, 0, 1, 2:], torch.zeros(2))
    assert a.lse[0, 0, 0] == -math.inf and a.entropy[0, 0, 0] == 0
    assert a.top_k_indices[0, 0, 0].tolist() == [-1, -1, -1]
    assert a.top_k_indices[0, 0, 1, 2] == -1


def test_top_k_fewer_valid_keys_than_k_and_ties_to_lower_index():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    _, _, a = crossattn.cross_attention(q, k, v, kv_lengths=[2], return_aux=crossattn.AuxRequest(top_k=4))
    assert a.top_k_indices[0, 0, 0].tolist() == [0, 1, -1, -1]
    assert a.top_k_values[0, 0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]


def test_merge_attention_equals_one_call_over_all_keys():
    q, k, v, _ = inputs(2, 4, 2, 5, 13, 8, 6, torch.float64)
    kpm = random_padding(2, 13, seed=1)
    kpm[1] = True
    kpm[1, :3] = False  # the second chunk of batch 1 sees no key
    aux = crossattn.AuxRequest(lse=True)
    want, _, wa = crossattn.cross_attention(q, k, v, key_padding_mask=kpm, return_aux=aux)
    outs, lses = [], []
    for sl in (slice(0, 6), slice(6, 13)):
        o, _, a = crossattn.cross_attention(q, k[:, :, sl], v[:, :, sl], key_padding_mask=kpm[:, sl],
                                            return_aux=aux)
        outs.append(o)
        lses.append(a.lse)
    out, lse = crossattn.merge_attention(outs, lses)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, wa.lse)
    out.sum().backward()
    want.sum().backward()  # gradients flow through the merge (checked for finiteness)
    assert torch.isfinite(q.grad).all()


def test_bidirectional_gqa_weight_heads_and_aux():
    g = torch.Generator().manual_seed(0)
    qx, kx, vx = (torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g),
                  torch.randn(2, 2, 5, 6, generator=g))
    qy, ky, vy = (torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 1, 9, 8, generator=g),
                  torch.randn(2, 1, 9, 6, generator=g))
    aux = crossattn.AuxRequest(lse=True, key_mass=True)
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, need_weights="full",
                                                  weight_heads=[1], return_aux=aux)
    ref = bidirectional_reference(*(t.double() for t in (qx, kx, vx, qy, ky, vy)), need_weights="full",
                                  weight_heads=(1,), return_aux=aux)
    out_x, out_y, w_xy, w_yx = res  # still a 4-tuple
    assert w_xy.shape == (2, 1, 5, 9) and w_yx.shape == (2, 1, 9, 5)
    for got, want in zip(res, ref):
        assert_close(got, want, torch.float32)
    for got, want in ((res.aux_xy, ref.aux_xy), (res.aux_yx, ref.aux_yx)):
        assert_close(got.lse, want.lse, torch.float32)
        assert_close(got.key_mass, want.key_mass, torch.float32)
        assert got.entropy is None
    plain = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy)
    assert plain.aux_xy is None and plain.aux_yx is None


def test_huge_tied_logits_keep_exact_gradients():
    """Identical keys at logit 1e4: the softmax is uniform and d out / d q is exactly 0
    (issue 18 item 8: recomputing P from an fp32 LSE lost it)."""
    q = torch.full((1, 1, 4, 16), 1.0, requires_grad=True)
    k = torch.full((1, 1, 8, 16), 1e4 / 16)
    v = torch.randn(1, 1, 8, 16)
    out, w = crossattn.cross_attention(q, k, v, scale=1.0, need_weights="full")
    torch.testing.assert_close(w, torch.full_like(w, 0.125))
    (out * torch.randn_like(out)).sum().backward()
    assert q.grad.abs().max() < 1e-3


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(scale=1e39),
                                dict(temperature=torch.tensor([1e-40, 1.0]))])
def test_overflowing_scale_or_temperature_is_refused(kw):
    q, k, v, _ = inputs(1, 2, 2, 3, 4, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        crossattn.cross_attention(q, k, v, **kw)


def test_small_float_temperature_is_folded_on_the_host():
    """scale / temperature is representable although 1/temperature is not in float32."""
    q, k, v, _ = inputs(1, 2, 2, 3, 4, 8, 8, torch.float32)
    out, _ = crossattn.cross_attention(q, k, v, scale=1e-30, temperature=1e-39)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), scale=1e-30, temperature=1e-39)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("bad,error,fragments", [
    (dict(k=torch.randn(1, 3, 4, 8), v=torch.randn(1, 3, 4, 8)), ValueError, ["k", "4 query heads", "3 heads"]),
    (dict(attn_bias=torch.randn(2, 4, 3, 4)), ValueError, ["attn_bias", "[1, 4, 3, 4]", "[2, 4, 3, 4]"]),
    (dict(attn_bias=torch.zeros(3, 4, dtype=torch.bool)), TypeError, ["attn_bias", "torch.bool"]),
    (dict(attn_bias=[[0.0]]), TypeError, ["attn_bias", "list"]),
    (dict(is_causal=1), TypeError, ["is_causal", "int"]),
    (dict(weight_heads=[0]), ValueError, ["weight_heads", "need_weights"]),
    (dict(weight_heads=[4], need_weights="full"), ValueError, ["weight_heads", "[0, 4)", "4"]),
    (dict(weight_heads=[1, -3], need_weights="full"), ValueError, ["weight_heads", "repeat"]),
    (dict(weight_heads=["a"], need_weights="full"), TypeError, ["weight_heads"]),
    (dict(return_aux=True), TypeError, ["return_aux", "AuxRequest", "bool"]),
    (dict(kv_lengths=[2**70]), ValueError, ["kv_lengths", "[0, 4]"]),
    (dict(kv_lengths=[5]), ValueError, ["kv_lengths", "[0, 4]", "5"]),
    (dict(q=torch.randn(1, 4, 3, 8).to_sparse()), TypeError, ["q", "dense", "sparse"]),
])
def test_bad_new_options_are_refused(bad, error, fragments):
    q, k, v, _ = inputs(1, 4, 2, 3, 4, 8, 8, torch.float32)
    args = dict(q=q, k=k, v=v)
    args.update({n: bad.pop(n) for n in ("q", "k", "v") if n in bad})
    with pytest.raises(error) as info:
        crossattn.cross_attention(args["q"], args["k"], args["v"], **bad)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_query_is_refused():
    q = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)])
    k = torch.randn(2, 2, 4, 8)
    with pytest.raises(TypeError, match="q must be a dense.*nested"):
        crossattn.cross_attention(q, k, k)


def test_aux_request_is_validated():
    with pytest.raises(ValueError, match="top_k"):
        crossattn.AuxRequest(top_k=-1)
    with pytest.raises(TypeError, match="lse"):
        crossattn.AuxRequest(lse=1)
    np = pytest.importorskip("numpy")
    # NumPy scalars are the bool / int they hold; other types are named in full.
    req = crossattn.AuxRequest(entropy=np.bool_(True), top_k=np.int64(3))
    assert req == crossattn.AuxRequest(entropy=True, top_k=3) and type(req.top_k) is int and req.entropy is True
    with pytest.raises(TypeError, match=r"top_k must be an int, got numpy.float32"):
        crossattn.AuxRequest(top_k=np.float32(2))
    with pytest.raises(TypeError, match=r"key_mass must be a bool, got numpy.int64"):
        crossattn.AuxRequest(key_mass=np.int64(1))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_tensors_infer_shapes(backend):
    """Every option works on meta tensors (shape inference, deferred init): no value is read."""
    q = torch.empty(2, 4, 5, 8, device="meta")
    k = torch.empty(2, 2, 7, 8, device="meta")
    v = torch.empty(2, 2, 7, 6, device="meta")
    out, w, a = crossattn.cross_attention(
        q, k, v, kv_lengths=torch.empty(2, dtype=torch.int64, device="meta"),
        temperature=torch.empty(4, device="meta"), attn_bias=torch.empty(5, 7, device="meta"),
        is_causal=True, need_weights="full", weight_heads=[0, 3], return_aux=AUX_ALL, backend=backend,
    )
    assert out.shape == (2, 4, 5, 6) and w.shape == (2, 2, 5, 7) and out.device.type == "meta"
    assert a.lse.shape == (2, 4, 5) and a.key_mass.shape == (2, 4, 7) and a.top_k_indices.shape == (2, 4, 5, 3)
    qy = torch.empty(2, 4, 7, 8, device="meta")
    res = crossattn.bidirectional_cross_attention(q, k[:, :, :5], v[:, :, :5], qy, k, v, need_weights="mean",
                                                  backend=backend)
    assert res.out_x.shape == (2, 4, 5, 6) and res.weights_yx.shape == (2, 7, 5)
    assert crossattn.select_blocks(q, k, crossattn.BlockPruning(block_q=16, block_k=16, top_k=1)).shape == (
        2, 4, 1, 1)


def test_fake_tensors_infer_shapes_without_reading_values():
    """Under ``FakeTensorMode`` (export, compile's fake propagation) CPU lengths and padding
    masks have no values: the ragged-batch planner and the value checks must not read them
    (they raised DataDependentOutputException), and shapes match a real call's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    lengths, qpad = torch.tensor([7, 3]), torch.tensor([[False] * 5, [False, False, True, True, True]])
    kwargs = dict(need_weights="full", return_aux=AUX_ALL, backend="torch", dropout_p=0.2)
    real = crossattn.cross_attention(q, k, v, kv_lengths=lengths, query_padding_mask=qpad, **kwargs)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, k, v, lengths, qpad, torch.randn(2, 4, 7, 8))]
        out, w, a = crossattn.cross_attention(*fake[:3], kv_lengths=fake[3], query_padding_mask=fake[4], **kwargs)
        res = crossattn.bidirectional_cross_attention(  # x: 5 rows, y: 7 rows
            fake[0], fake[1][:, :, :5], fake[2][:, :, :5], fake[5], fake[1], fake[2],
            x_padding_mask=fake[4], y_padding_mask=fake[3][:, None] <= torch.arange(7), need_weights="mean",
            prune=crossattn.BlockPruning(block_q=16, block_k=16, keep=0.5), dropout_p=0.1, backend="torch")
    assert out.shape == real[0].shape and w.shape == real[1].shape
    assert a.lse.shape == real[2].lse.shape and a.top_k_indices.shape == real[2].top_k_indices.shape
    assert res.out_x.shape == (2, 4, 5, 6) and res.out_y.shape == (2, 4, 7, 6) and res.weights_yx.shape == (2, 7, 5)


def test_backends_name_the_options_they_do_not_serve():
    """A module backend serving none of the new options rejects a problem that uses them,
    naming each (so auto moves on and choose_backend reports why)."""
    from crossattn._validation import check_attention
    from crossattn.backends.base import unsupported_features

    q, k, v, _ = inputs(1, 4, 2, 3, 4, 8, 8, torch.float32)
    problem = check_attention(q, k, v, attn_bias=torch.zeros(3, 4), is_causal=True, need_weights="full",
                              weight_heads=[1], return_aux=crossattn.AuxRequest(lse=True, top_k=2))
    why = unsupported_features(problem, (), "triton")
    for part in ("triton", "grouped-query", "attn_bias", "is_causal", "weight_heads", "lse", "top_k"):
        assert part in why
    assert unsupported_features(problem, ("gqa", "attn_bias", "is_causal", "weight_heads", "aux_lse",
                                          "aux_top_k"), "triton") is None
