"""crossattn.nn: CrossModalAttention, BidirectionalCrossAttention, MultiheadAttention, convert."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import crossattn
from crossattn.nn import BidirectionalCrossAttention, CrossModalAttention, MultiheadAttention
from crossattn.reference import attention_reference
from conftest import random_padding, triton_ready

D64 = dict(dtype=torch.float64)


def heads(x, H):
    B, L, E = x.shape
    return x.view(B, L, H, E // H).transpose(1, 2)


def merge(x):
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


# ----------------------------------------------------------------------- CrossModalAttention
def test_cross_modal_attention_matches_the_reference_math():
    torch.manual_seed(0)
    m = CrossModalAttention(24, 4, kdim=10, vdim=6, learnable_temperature=True, **D64).eval()
    with torch.no_grad():
        m.temperature.log_temperature.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    text = torch.randn(2, 7, 24, **D64)
    image = torch.randn(2, 13, 10, **D64)
    value = torch.randn(2, 13, 6, **D64)
    pad = random_padding(2, 13, seed=1)
    out, w = m(text, image, context_padding_mask=pad, need_weights="full", value=value)
    ref_out, ref_w = attention_reference(
        heads(m.q_proj(text), 4), heads(m.k_proj(image), 4), heads(m.v_proj(value), 4),
        key_padding_mask=pad, temperature=m.temperature(), need_weights="full")
    torch.testing.assert_close(out, m.out_proj(merge(ref_out)))
    torch.testing.assert_close(w, ref_w)


def test_cross_modal_attention_seed_001_shapes_and_gradients():
    """Seed 001: 20 text tokens attend to 196 image patches, E=256, 8 heads."""
    m = CrossModalAttention(256, 8, learnable_temperature=True)
    text, patches = torch.randn(3, 20, 256), torch.randn(3, 196, 256)
    out, w = m(text, patches, need_weights="mean")
    assert out.shape == (3, 20, 256) and w.shape == (3, 20, 196)
    (out.square().mean() + w.square().sum()).backward()
    assert m.temperature.log_temperature.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


def test_cross_modal_padding_has_no_influence():
    m = CrossModalAttention(16, 2).eval()
    q, ctx = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    pad = random_padding(2, 9, seed=3)
    out, w = m(q, ctx, context_padding_mask=pad, need_weights="full")
    ctx2 = ctx.masked_fill(pad[..., None], 1e4)
    out2, w2 = m(q, ctx2, context_padding_mask=pad, need_weights="full")
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(w, w2)
    assert (w[pad[:, None, None, :].expand_as(w)] == 0).all()


def test_embed_dim_must_divide():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        CrossModalAttention(10, 3)
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by num_heads \(4\)"):
        BidirectionalCrossAttention(10, 4)


# --------------------------------------------------------------- BidirectionalCrossAttention
def test_bidirectional_module_matches_reference_math():
    torch.manual_seed(0)
    m = BidirectionalCrossAttention(32, 4, dropout=0.1, learnable_temperature=True, **D64).eval()
    with torch.no_grad():
        m.temperature.log_temperature.normal_(0, 0.3)
    text, audio = torch.randn(2, 6, 32, **D64), torch.randn(2, 15, 32, **D64)
    text_mask = (~random_padding(2, 6, seed=1)).long()  # HF: 1 = real token
    audio_mask = (~random_padding(2, 15, seed=2)).long()
    t_att, a_att, w_ta, w_at = m(text, audio, text_mask, audio_mask, need_weights="full")
    temps = m.temperature()
    o_t, ref_ta = attention_reference(
        heads(m.text_q(text), 4), heads(m.audio_k(audio), 4), heads(m.audio_v(audio), 4),
        key_padding_mask=audio_mask == 0, query_padding_mask=text_mask == 0,
        temperature=temps[0], need_weights="full")
    o_a, ref_at = attention_reference(
        heads(m.audio_q(audio), 4), heads(m.text_k(text), 4), heads(m.text_v(text), 4),
        key_padding_mask=text_mask == 0, query_padding_mask=audio_mask == 0,
        temperature=temps[1], need_weights="full")
    torch.testing.assert_close(t_att, m.text_norm(text + m.text_out(merge(o_t))))
    torch.testing.assert_close(a_att, m.audio_norm(audio + m.audio_out(merge(o_a))))
    torch.testing.assert_close(w_ta, ref_ta)
    torch.testing.assert_close(w_at, ref_at)


def test_bidirectional_module_is_one_fused_call(monkeypatch):
    import crossattn.nn.modules as modules

    calls = []
    real = modules.bidirectional_cross_attention
    monkeypatch.setattr(modules, "bidirectional_cross_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    m = BidirectionalCrossAttention(16, 2)
    m(torch.randn(1, 4, 16), torch.randn(1, 9, 16))
    assert calls == [1]


def test_bidirectional_module_padding_has_no_influence_on_valid_positions():
    m = BidirectionalCrossAttention(16, 2).eval()
    text, audio = torch.randn(2, 5, 16), torch.randn(2, 11, 16)
    tm = torch.ones(2, 5, dtype=torch.long)
    am = torch.ones(2, 11, dtype=torch.long)
    tm[1, 3:] = 0
    am[0, 7:] = 0
    t1, a1, wta1, wat1 = m(text, audio, tm, am, need_weights="mean")
    text2 = text.masked_fill(tm[..., None] == 0, 50.0)
    audio2 = audio.masked_fill(am[..., None] == 0, -50.0)
    t2, a2, wta2, wat2 = m(text2, audio2, tm, am, need_weights="mean")
    valid_t, valid_a = tm.bool(), am.bool()
    torch.testing.assert_close(t1[valid_t], t2[valid_t])
    torch.testing.assert_close(a1[valid_a], a2[valid_a])
    torch.testing.assert_close(wta1, wta2)
    torch.testing.assert_close(wat1, wat2)
    assert (wta1[0, :, 7:] == 0).all() and (wat1[1, :, 3:] == 0).all()


def test_bidirectional_module_mask_errors():
    m = BidirectionalCrossAttention(16, 2)
    with pytest.raises(ValueError, match=r"audio_mask must have shape \[B, L\] = \[1, 9\]"):
        m(torch.randn(1, 4, 16), torch.randn(1, 9, 16), audio_mask=torch.ones(1, 8))


@pytest.mark.parametrize("mask", [
    torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]]),   # additive: 0 = attend
    torch.tensor([[0.0, -1e9, 0.0, 0.0]]),
    torch.tensor([[1, 2, 1, 0]]),
    torch.tensor([[0.5, 1.0, 1.0, 1.0]]),
])
def test_bidirectional_module_refuses_masks_that_are_not_0_1(mask):
    """An additive (0 / -inf) mask read as a Hugging Face mask would turn real tokens into
    padding; it is refused, naming the argument."""
    m = BidirectionalCrossAttention(16, 2)
    with pytest.raises(ValueError, match=r"text_mask must be a Hugging Face attention mask of 0s and 1s") as e:
        m(torch.randn(1, 4, 16), torch.randn(1, 9, 16), text_mask=mask)
    assert "(text_mask == 0).long()" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.float32, torch.float16])
def test_bidirectional_module_takes_hf_masks_of_every_dtype(dtype):
    m = BidirectionalCrossAttention(16, 2, dropout=0.0).eval()
    text, audio = torch.randn(2, 4, 16), torch.randn(2, 9, 16)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 5:] = 0
    ref = m(text, audio, audio_mask=am, need_weights="full")
    got = m(text, audio, audio_mask=am.to(dtype), need_weights="full")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert (got[2][1, ..., 5:] == 0).all()


@pytest.mark.parametrize("text,audio,kw,match", [
    ((2, 4, 16), (3, 9, 16), {}, r"audio must have the batch size of text \[2, 4, 16\], got shape \[3, 9, 16\]"),
    ((2, 4, 12), (2, 9, 16), {}, r"text must have d_model = 16 features \[B, L, 16\], got shape \[2, 4, 12\]"),
    ((2, 4, 16), (2, 9, 8), {}, r"audio must have d_model = 16 features"),
    ((4, 16), (9, 16), {},
     r"text must be 3-D \[B, L, d_model\] \(batch first; unsqueeze\(0\) an unbatched input\), got 2-D"),
    ((2, 4, 16), (9, 16), {}, r"audio must be 3-D"),
    ((2, 4, 16), (2, 9, 16), {"text_mask": torch.ones(2, 5)},
     r"text_mask must have shape \[B, L\] = \[2, 4\] \(the batch and length of text\)"),
])
def test_bidirectional_module_errors_name_the_callers_arguments(text, audio, kw, match):
    m = BidirectionalCrossAttention(16, 2)
    with pytest.raises(ValueError, match=match) as e:
        m(torch.randn(text), torch.randn(audio), **kw)
    assert "k_y" not in str(e.value) and "q_x" not in str(e.value)


@pytest.mark.parametrize("query,context,kw,match", [
    ((2, 5, 16), (2, 9, 8), {"context_padding_mask": torch.zeros(2, 8, dtype=torch.bool)},
     r"context_padding_mask must have shape \[B, L\] = \[2, 9\] \(L = length of context\), got \[2, 8\]"),
    ((2, 5, 16), (2, 9, 8), {"query_padding_mask": torch.zeros(2, 9, dtype=torch.bool)},
     r"query_padding_mask must have shape \[B, L\] = \[2, 5\]"),
    ((2, 5, 16), (2, 9, 8), {"context_padding_mask": torch.zeros(2, 9)},
     r"context_padding_mask must have dtype torch.bool"),
    ((2, 5, 16), (3, 9, 8), {}, r"context must have the batch size of query \[2, 5, 16\], got shape \[3, 9, 8\]"),
    ((2, 5, 12), (2, 9, 8), {}, r"query must have embed_dim = 16 features"),
    ((2, 5, 16), (2, 9, 16), {}, r"context must have kdim = 8 features \[B, L, 8\], got shape \[2, 9, 16\]"),
    ((5, 16), (9, 8), {}, r"query must be 3-D \[B, L, embed_dim\]"),
    ((2, 5, 16), (2, 9, 8), {"value": torch.randn(2, 8, 8)},
     r"value must have the batch size and length of context \[2, 9, 8\], got shape \[2, 8, 8\]"),
])
def test_cross_modal_errors_name_the_callers_arguments(query, context, kw, match):
    m = CrossModalAttention(16, 2, kdim=8)
    with pytest.raises((ValueError, TypeError), match=match) as e:
        m(torch.randn(query), torch.randn(context), **kw)
    assert "key_padding_mask" not in str(e.value).replace("context_padding_mask", "")


def test_modules_name_a_dtype_mismatch_and_allow_autocast():
    bi, cm = BidirectionalCrossAttention(16, 2), CrossModalAttention(16, 2, kdim=8)
    x, a, c = torch.randn(2, 4, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 8)
    # nn.Linear would say "mat1 and mat2 must have the same dtype", naming no argument.
    with pytest.raises(TypeError, match=r"audio must have the dtype of the module's parameters \(torch.float32\), "
                                         r"got torch.float64"):
        bi(x, a.double())
    with pytest.raises(TypeError, match=r"text must be a floating-point tensor, got torch.int64"):
        bi(x.long(), a)
    with pytest.raises(TypeError, match=r"query must have the dtype of the module's parameters \(torch.float32\), "
                                         r"got torch.float16"):
        cm(x.half(), c)
    with pytest.raises(TypeError, match=r"context must have the dtype"):
        cm(x, c.double())
    with pytest.raises(TypeError, match=r"value must have the dtype"):
        cm(x, c, value=c.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's to resolve
        assert bi(x.bfloat16(), a)[0].shape == x.shape
        assert cm(x, c.bfloat16())[0].shape == x.shape


def test_cross_modal_needs_value_when_vdim_differs():
    m = CrossModalAttention(16, 2, kdim=8, vdim=6)
    with pytest.raises(ValueError, match=r"value must be given: vdim \(6\) differs from kdim \(8\)"):
        m(torch.randn(1, 3, 16), torch.randn(1, 4, 8))


def test_modules_run_on_meta_tensors():
    """Shape inference / deferred init: the mask value check is skipped on meta tensors."""
    m = BidirectionalCrossAttention(16, 2, device="meta")
    text, audio = torch.empty(2, 4, 16, device="meta"), torch.empty(2, 9, 16, device="meta")
    out = m(text, audio, torch.ones(2, 4, device="meta"), torch.ones(2, 9, device="meta"), need_weights="full")
    assert [tuple(t.shape) for t in out] == [(2, 4, 16), (2, 9, 16), (2, 2, 4, 9), (2, 2, 9, 4)]
    mha = MultiheadAttention(16, 2, batch_first=True, device="meta")
    out, w = mha(text, audio, audio, attn_mask=torch.zeros(4, 9, dtype=torch.bool, device="meta"))
    assert out.shape == (2, 4, 16) and w.shape == (2, 4, 9)


@pytest.mark.parametrize("factory", [dict(dtype=torch.float64), dict(device="meta")])
def test_every_parameter_honours_the_factory_arguments(factory):
    """dtype= / device= reach every parameter, the learnable temperature included."""
    for m in (CrossModalAttention(12, 3, learnable_temperature=True, **factory),
              BidirectionalCrossAttention(12, 3, learnable_temperature=True, **factory)):
        for name, p in m.named_parameters():
            for key, value in factory.items():
                assert getattr(p, key) == torch.device(value) if key == "device" else getattr(p, key) == value, name


def test_bidirectional_module_trains_temperature_and_prunes():
    m = BidirectionalCrossAttention(32, 4, learnable_temperature=True,
                                    prune=crossattn.BlockPruning(block_q=16, block_k=16, top_k=1))
    t_att, a_att, w_ta, w_at = m(torch.randn(2, 20, 32), torch.randn(2, 40, 32), need_weights="full")
    # top_k=1 of 3 key blocks: each text row attends to at most 16 audio frames.
    assert ((w_ta > 0).sum(-1) <= 16).all()
    (t_att.sum() + a_att.sum() + (w_ta * w_ta.clamp_min(1e-9).log()).sum()).backward()
    assert m.temperature.log_temperature.grad.abs().sum() > 0


def test_state_dict_round_trip():
    a = BidirectionalCrossAttention(16, 2, learnable_temperature=True)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = BidirectionalCrossAttention(16, 2, learnable_temperature=True)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    a.eval(), b.eval()
    x, y = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    for u, w in zip(a(x, y, need_weights="full"), b(x, y, need_weights="full")):
        torch.testing.assert_close(u, w)


# ----------------------------------------------------------------------- MultiheadAttention
MHA_CASES = [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(batch_first=True, kdim=12, vdim=7),
    dict(batch_first=True, bias=False),
]


@pytest.mark.parametrize("kwargs", MHA_CASES, ids=str)
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_multihead_attention_matches_torch_in_eval(kwargs, need_weights, average, mask):
    torch.manual_seed(0)
    ours = MultiheadAttention(24, 3, **kwargs, **D64).eval()
    theirs = nn.MultiheadAttention(24, 3, **kwargs, **D64).eval()
    theirs.load_state_dict(ours.state_dict())
    B, Lq, Lk = 2, 5, 9
    bf = kwargs["batch_first"]
    shape = (lambda L, E: (B, L, E)) if bf else (lambda L, E: (L, B, E))
    query = torch.randn(shape(Lq, 24), **D64)
    key = torch.randn(shape(Lk, kwargs.get("kdim", 24)), **D64)
    value = torch.randn(shape(Lk, kwargs.get("vdim", 24)), **D64)
    kpm = None
    if mask != "none":
        kpm = random_padding(B, Lk, seed=4)
        if mask == "float":
            kpm = torch.zeros(B, Lk, **D64).masked_fill(kpm, float("-inf"))
    args = dict(key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
    out, w = ours(query, key, value, **args)
    ref, ref_w = theirs(query, key, value, **args)
    torch.testing.assert_close(out, ref)
    if need_weights:
        torch.testing.assert_close(w, ref_w)
    else:
        assert w is None and ref_w is None


@pytest.mark.parametrize("average", [True, False])
def test_multihead_attention_unbatched(average):
    ours = MultiheadAttention(16, 4, **D64).eval()
    theirs = nn.MultiheadAttention(16, 4, **D64).eval()
    theirs.load_state_dict(ours.state_dict())
    q, k = torch.randn(5, 16, **D64), torch.randn(8, 16, **D64)
    kpm = torch.tensor([False] * 6 + [True] * 2)
    out, w = ours(q, k, k, key_padding_mask=kpm, average_attn_weights=average)
    ref, ref_w = theirs(q, k, k, key_padding_mask=kpm, average_attn_weights=average)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize("case", ["add_bias_kv", "add_zero_attn"])
def test_multihead_attention_falls_back_to_torch(case, monkeypatch):
    import crossattn.nn.multihead as mh

    monkeypatch.setattr(mh, "cross_attention", lambda *a, **k: pytest.fail("kernels called"))
    extra = {case: True}
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 2, batch_first=True, **extra, **D64).eval()
    theirs = nn.MultiheadAttention(16, 2, batch_first=True, **extra, **D64).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 16, **D64)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    assert ours.fallback_reason(x, x, x, attn_mask=mask) == f"{case} is not supported by the kernels"
    out, w = ours(x, x, x, attn_mask=mask)
    ref, ref_w = theirs(x, x, x, attn_mask=mask)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)


def test_multihead_attention_state_dict_is_torchs():
    ours, theirs = MultiheadAttention(16, 4, kdim=8, vdim=8), nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert isinstance(ours, nn.MultiheadAttention)
    theirs.load_state_dict(ours.state_dict())  # and back
    ours.load_state_dict(theirs.state_dict())


def test_fully_padded_rows_are_zero_not_nan():
    m = MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    kpm = torch.tensor([[True, True, True], [False, True, False]])
    out, w = m(x, x, x, key_padding_mask=kpm)
    ref, _ = nn.MultiheadAttention.forward(m, x, x, x, key_padding_mask=kpm)
    assert torch.isnan(ref[0]).all() and torch.isfinite(out).all()
    assert (w[0] == 0).all()
    torch.testing.assert_close(out[0], m.out_proj.bias.expand(3, 8))  # zero attention, then bias


def test_multihead_attention_trains_with_dropout():
    m = MultiheadAttention(16, 2, dropout=0.3, batch_first=True).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, w = m(x, x, x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and m.in_proj_weight.grad.abs().sum() > 0
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))  # pre-dropout weights


# --------------------------------------------------------------------------------- convert
class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ModuleList([nn.MultiheadAttention(16, 4, batch_first=True)]))

    def forward(self, x):
        h = self.encoder(x)
        h = self.block[0](h)
        out, w = self.block[1][0](h, h, h)
        return out, w


def test_convert_swaps_every_mha_in_place_keeping_weights_and_mode():
    torch.manual_seed(0)
    model = Nested().double()
    reference_model = copy.deepcopy(model)
    model.train()
    model.block[1][0].eval()
    params = {n: p for n, p in model.named_parameters()}
    assert crossattn.convert_multihead_attention(model) is model
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == 2 and all(type(m) is MultiheadAttention for m in mhas)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.training and not model.block[1][0].training
    model.eval(), reference_model.eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    out, w = model(x)
    ref, ref_w = reference_model(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)


def test_convert_leaves_user_subclasses_and_keeps_torchs_signature():
    import inspect

    class Custom(nn.MultiheadAttention):  # a user's own forward stays theirs
        def forward(self, *args, **kwargs):
            return "custom"

    model = nn.Sequential(Custom(8, 2), nn.MultiheadAttention(8, 2), MultiheadAttention(8, 2))
    crossattn.convert_multihead_attention(model, backend="torch")
    assert type(model[0]) is Custom and model[0](None) == "custom"
    assert type(model[1]) is MultiheadAttention and model[1].backend == "torch" and model[2].backend == "torch"
    # Without a backend a second conversion keeps the one chosen; new modules get "auto".
    model.append(nn.MultiheadAttention(8, 2))
    crossattn.convert_multihead_attention(model)
    assert [m.backend for m in model[1:]] == ["torch", "torch", "auto"]
    with pytest.raises(TypeError, match="backend must be a string"):
        crossattn.convert_multihead_attention(model, backend=1)
    ours = inspect.signature(MultiheadAttention.__init__).parameters
    theirs = inspect.signature(nn.MultiheadAttention.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()][:len(theirs)] == [(p.name, p.default) for p in theirs.values()]
    assert list(ours)[len(theirs):] == ["backend"] and ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_says_what_to_use_and_leaves_the_model_alone():
    layer = crossattn.convert_multihead_attention(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0))
    with pytest.raises(RuntimeError, match="use torch.compile or torch.export"):
        torch.jit.script(layer)
    assert type(layer.self_attn) is MultiheadAttention  # not swapped for torch's by the attempt


def test_convert_routes_the_encoder_layer_through_crossattn(monkeypatch):
    import crossattn.nn.multihead as mh

    calls = []
    real = mh.cross_attention
    monkeypatch.setattr(mh, "cross_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    crossattn.convert_multihead_attention(layer)
    layer(torch.randn(2, 5, 16))  # training mode: no native fast path
    assert calls == [1]


# ------------------------------------------------------------------------ compile and triton
@pytest.mark.slow
def test_compile_fullgraph_of_a_model_using_the_modules():
    torch.manual_seed(0)
    m = BidirectionalCrossAttention(32, 4, learnable_temperature=True).eval()
    text, audio = torch.randn(2, 6, 32), torch.randn(2, 20, 32)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, 12:] = 0
    expected = m(text, audio, audio_mask=am, need_weights="mean")
    got = torch.compile(m, fullgraph=True)(text, audio, audio_mask=am, need_weights="mean")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(triton_ready() is not None, reason=f"triton backend: {triton_ready()}")
def test_modules_on_the_triton_backend_match_the_torch_backend():
    from conftest import DEVICE

    torch.manual_seed(0)
    m = BidirectionalCrossAttention(32, 2, learnable_temperature=True, backend="triton").to(DEVICE)
    m_torch = copy.deepcopy(m)
    m_torch.backend = "torch"
    text, audio = torch.randn(2, 9, 32, device=DEVICE), torch.randn(2, 40, 32, device=DEVICE)
    am = torch.ones(2, 40, dtype=torch.long, device=DEVICE)
    am[0, 30:] = 0
    m.eval(), m_torch.eval()
    a = m(text, audio, audio_mask=am, need_weights="full")
    b = m_torch(text, audio, audio_mask=am, need_weights="full")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    sum(t.sum() for t in a).backward()
    sum(t.sum() for t in b).backward()
    for (n, p), q in zip(m.named_parameters(), m_torch.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)
    cma = CrossModalAttention(16, 2, kdim=12, backend="triton").to(DEVICE).eval()
    q, ctx = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 33, 12, device=DEVICE)
    out, w = cma(q, ctx, need_weights="mean")
    cma.backend = "torch"
    ref, ref_w = cma(q, ctx, need_weights="mean")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w, ref_w, rtol=1e-4, atol=1e-4)
    mha = MultiheadAttention(16, 2, batch_first=True, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 7, 16, device=DEVICE)
    out, w = mha(x, x, x)
    ref, ref_w = nn.MultiheadAttention.forward(mha, x, x, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w, ref_w, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_seed_workload_modules_on_gpu(dtype):
    """Seed 000 through the module (B=4, T=512, A=1000, E=768, H=8) and seed 001 (20 x 196,
    E=256): Triton against the torch backend, forward and backward."""
    torch.manual_seed(0)
    m = BidirectionalCrossAttention(768, 8, learnable_temperature=True, backend="triton")
    m = m.to("cuda", dtype).train()
    m.dropout = 0.0
    ref = copy.deepcopy(m)
    ref.backend = "torch"
    text = torch.randn(4, 512, 768, device="cuda", dtype=dtype)
    audio = torch.randn(4, 1000, 768, device="cuda", dtype=dtype)
    tm = torch.ones(4, 512, dtype=torch.long, device="cuda")
    am = torch.ones(4, 1000, dtype=torch.long, device="cuda")
    tm[1, 300:] = 0
    am[2, 640:] = 0
    a = m(text, audio, tm, am, need_weights="mean")
    b = ref(text, audio, tm, am, need_weights="mean")
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=3e-2, atol=3e-2)
    sum(t.float().square().mean() for t in a).backward()
    sum(t.float().square().mean() for t in b).backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=5e-2, atol=5e-2, msg=n)
    cma = CrossModalAttention(256, 8, backend="triton").to("cuda", dtype).eval()
    out, w = cma(torch.randn(4, 20, 256, device="cuda", dtype=dtype),
                 torch.randn(4, 196, 256, device="cuda", dtype=dtype), need_weights="full")
    assert out.shape == (4, 20, 256) and w.shape == (4, 8, 20, 196)
