"""Hugging Face attention implementation: registration, masks, fallbacks (the model
comparisons against eager are in test_hf_models.py)."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import crossattn.integrations.transformers as ca_hf  # noqa: E402


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = ca_hf.cross_attention
    monkeypatch.setattr(ca_hf, "cross_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.fixture(scope="module")
def name():
    return ca_hf.register()


def pair(cls, config, name):
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation=name).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == name and eager.config._attn_implementation == "eager"
    return eager, ours


def assert_all_close(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_register_returns_a_plain_name(name):
    assert name == "crossattn" and "sdpa" not in name and "flash" not in name
    with pytest.raises(ValueError, match="must not contain 'sdpa' or 'flash'"):
        ca_hf.register("my_flash")


def bert_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bert_matches_eager_with_padding_and_weights(name, kernel_calls, backend, monkeypatch):
    if backend == "triton":
        from conftest import triton_ready

        if triton_ready() is not None or torch.cuda.is_available():
            pytest.skip(f"the interpreter variant runs on CPU-only machines ({triton_ready()})")
        monkeypatch.setenv("CROSSATTN_BACKEND", "triton")  # auto picks torch on the CPU
    eager, ours = pair(transformers.BertModel, bert_config(), name)
    ids = torch.randint(0, 99, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    a = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    b = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert_all_close(b.attentions, a.attentions)
    assert len(kernel_calls) == 2  # both layers on the kernels, padding as key padding
    assert all(k["key_padding_mask"] is not None and k["need_weights"] == "full" for k in kernel_calls)
    assert (b.attentions[0][1, ..., 6:] == 0).all()


def test_from_pretrained_with_the_implementation_name(name, tmp_path, kernel_calls):
    torch.manual_seed(0)
    transformers.BertModel(bert_config()).save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation=name).eval()
    eager = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 99, (1, 5))
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                               eager(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert kernel_calls and all(k["need_weights"] is False for k in kernel_calls)


def test_mask_function_notes_the_structure_of_the_masks_it_builds():
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        sliding_window_causal_mask_function,
    )

    pad = torch.tensor([[True, True, False], [True, True, True]])  # 2-D HF mask as bool
    m = ca_hf.crossattn_mask(2, 4, 3, mask_function=bidirectional_mask_function, attention_mask=pad,
                             allow_is_bidirectional_skip=True)
    assert m.shape == (2, 1, 4, 3) and m.crossattn_structure.causal_offset is None
    assert m.crossattn_structure.key_padding.tolist() == [[False, False, True], [False, False, False]]
    # causal with a cache of 5 (bottom-right offset 5) and padding
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, :2] = False
    m = ca_hf.crossattn_mask(2, 3, 8, q_offset=5, mask_function=causal_mask_function, attention_mask=pad)
    assert m.crossattn_structure.causal_offset == 5
    assert m.crossattn_structure.key_padding[0].tolist() == [True, True] + [False] * 6
    # no padding, square: transformers skips the mask (is_causal); nothing to note
    assert ca_hf.crossattn_mask(2, 4, 4, mask_function=causal_mask_function) is None
    # a sliding window is no structure the kernels take: the dense mask goes as a bias
    m = ca_hf.crossattn_mask(1, 6, 6, mask_function=sliding_window_causal_mask_function(2),
                             attention_mask=torch.ones(1, 6, dtype=torch.bool), allow_is_causal_skip=False)
    assert not hasattr(m, "crossattn_structure")


def bert_layer():
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(bert_config(), attn_implementation="eager").eval()
    return model.encoder.layer[0].attention.self


def qkv(B=2, H=4, Lq=5, Lk=6, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk)]


def test_an_argument_it_does_not_understand_goes_to_the_models_eager_logged_once(kernel_calls, caplog, monkeypatch):
    """Never ignore an argument: an unknown one (e.g. Gemma's softcap) runs the model's own
    eager function, with the reason logged once."""
    import transformers.models.bert.modeling_bert as bert

    seen = []
    real = bert.eager_attention_forward
    monkeypatch.setattr(bert, "eager_attention_forward", lambda *a, **k: seen.append(k) or real(*a, **k))
    monkeypatch.setattr(ca_hf, "_logged", set())
    layer = bert_layer()
    q, k, v = qkv()
    with caplog.at_level("WARNING", logger=ca_hf.__name__):
        for _ in range(2):
            out, w = ca_hf.crossattn_attention_forward(layer, q, k, v, None, scaling=0.3, softcap=30.0,
                                                       output_attentions=True)
    ref, ref_w = real(layer, q, k, v, None, scaling=0.3, softcap=30.0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)
    assert kernel_calls == [] and len(seen) == 2 and seen[0]["softcap"] == 30.0
    records = [r for r in caplog.records if "softcap" in r.getMessage()]
    assert len(records) == 1 and "not understood by crossattn" in records[0].getMessage()


def test_harmless_arguments_do_not_force_the_fallback(kernel_calls):
    layer = bert_layer()
    q, k, v = qkv()
    ca_hf.crossattn_attention_forward(layer, q, k, v, None, position_ids=torch.arange(5),
                                      cache_position=torch.arange(5), softcap=None)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_eager_fallback_keeps_the_models_dtype_handling(dtype, monkeypatch):
    """BERT's eager softmax runs in the input dtype (not float32): the fallback is the
    model's function, so it matches bit for bit."""
    import transformers.models.bert.modeling_bert as bert

    monkeypatch.setattr(ca_hf, "_logged", set())
    layer = bert_layer()
    q, k, v = (t.to(dtype) for t in qkv())
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    out, w = ca_hf.crossattn_attention_forward(layer, q, k, v, mask, scaling=0.35, s_aux=torch.zeros(4),
                                               output_attentions=True)
    float_mask = torch.where(mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    ref, ref_w = bert.eager_attention_forward(layer, q, k, v, float_mask, scaling=0.35)
    assert torch.equal(out, ref) and torch.equal(w, ref_w)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_a_dense_mask_goes_to_the_kernels_as_a_bias(kind, kernel_calls):
    """A 4-D mask the integration cannot decompose (a user's float mask; a bool pattern such
    as a sliding window) is added to the logits in the kernels, as eager adds it; a row it
    masks entirely comes out uniform, as in eager."""
    import transformers.models.bert.modeling_bert as bert

    layer = bert_layer()
    q, k, v = (t.double() for t in qkv())
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 1, 5, 6, generator=g) > 0.4
    keep[1, 0, 2] = False  # a row that sees nothing
    lowest = torch.finfo(torch.float64).min
    float_mask = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64).masked_fill(~keep, lowest)
    mask = float_mask if kind == "float" else keep
    out, w = ca_hf.crossattn_attention_forward(layer, q, k, v, mask, scaling=0.35, output_attentions=True)
    eager_mask = float_mask if kind == "float" else torch.zeros(()).double().masked_fill(~keep, lowest)
    ref, ref_w = bert.eager_attention_forward(layer, q, k, v, eager_mask, scaling=0.35)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(w[1, :, 2], torch.full((4, 6), 1 / 6, dtype=torch.float64))
    assert len(kernel_calls) == 1 and kernel_calls[0]["attn_bias"] is not None


def _attention_pair(q, k, v, mask, **kw):
    """Eager (T5's eager function: no softmax upcast) and crossattn on the same bool mask."""
    from transformers.models.t5.modeling_t5 import eager_attention_forward as t5_eager

    module = torch.nn.Module()
    module.is_causal = False
    results = []
    for fn in ("eager", "crossattn"):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if fn == "eager":
            out, w = t5_eager(module, *xs, ca_hf._eager_mask(mask, xs[0], xs[1], False), scaling=None)
        else:
            out, w = ca_hf.crossattn_attention_forward(module, *xs, mask, **kw)
        if out.numel():
            out.float().sum().backward()
        results.append((out, w, [x.grad for x in xs]))
    return results


def test_rows_without_keys_in_float16_stay_finite_as_eager():
    """The eager gradient of a row that sees no key sums over the keys: in float16 that sum
    must not overflow (and poison the other rows of the item through the backward)."""
    B, H, Lq, Lk, D = 2, 1, 4, 128, 8
    sign = torch.ones(Lk)
    sign[::2] = -1
    k = (30 * sign[:, None].expand(Lk, D)).expand(B, H, Lk, D).clone()
    q = 0.01 * torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    mask[0, 0, 0] = False  # item 0, row 0 sees no key
    (ref, _, ref_g), (out, _, g) = _attention_pair(q.half(), k.half(), k.half(), mask)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in g)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)  # eager: a float16 softmax


def test_no_keys_at_all_gives_eagers_zeros():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 0, 4), torch.randn(2, 2, 0, 4)
    mask = torch.ones(2, 1, 3, 0, dtype=torch.bool)
    for output_attentions in (False, True):
        (ref, ref_w, _), (out, w, _) = _attention_pair(q, k, v, mask, output_attentions=output_attentions)
        torch.testing.assert_close(out, ref)
        assert (w is None) != output_attentions and (w is None or w.shape == ref_w.shape)
