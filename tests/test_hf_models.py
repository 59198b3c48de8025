"""Tiny Hugging Face models under attn_implementation="crossattn" against "eager": outputs,
every returned attention and every parameter gradient, with a count of the kernel calls
proving the fused path served each attention layer. Models are built from config objects
(nothing downloads) in float64, so any difference is a semantic one, not rounding -- except
Llama, whose eager softmax runs in float32 whatever the model dtype (its float64 eager even
gives NaN on fully masked rows: the float64 mask minimum overflows float32), so it runs in
float32 with the float32 tolerances of tests/conftest.py."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import crossattn.integrations.transformers as ca_hf  # noqa: E402
from conftest import GRAD_TOL  # noqa: E402
from conftest import TOL as DTYPE_TOL  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)
F32 = dict(tol=dict(rtol=DTYPE_TOL[torch.float32], atol=DTYPE_TOL[torch.float32]),
           grad_tol=dict(rtol=GRAD_TOL[torch.float32], atol=GRAD_TOL[torch.float32]))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every crossattn.cross_attention call the integration makes: (q, k, v, kwargs)."""
    calls = []
    real = ca_hf.cross_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ca_hf, "cross_attention", spy)
    return calls


@pytest.fixture(scope="module")
def name():
    return ca_hf.register()


def pair(cls, config, name, dtype=torch.float64):
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").to(dtype).eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation=name).to(dtype).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def attention_fields(out):
    return [f for f in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
            if getattr(out, f, None)]  # set and not empty (GPT-2 has no cross-attention)


def compare(eager, ours, inputs, *, hidden="last_hidden_state", tol=TOL, grad_tol=TOL):
    """Run both models with output_attentions; compare the hidden states, every attention map
    and the gradients of a loss over both (rows that see no key included)."""
    results = []
    for model in (eager, ours):
        model.zero_grad()
        out = model(**inputs, output_attentions=True)
        g = torch.Generator().manual_seed(7)
        h = out[hidden]
        w = torch.randn(h.shape, generator=g, dtype=h.dtype)
        loss = (h * w).sum()
        for field in attention_fields(out):
            for a in out[field]:
                c = torch.randn(a.shape, generator=g, dtype=a.dtype)
                loss = loss + (a * c).sum()
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got[hidden], ref[hidden], **tol)
    fields = attention_fields(ref)
    assert fields and fields == attention_fields(got)
    for field in fields:
        assert len(got[field]) == len(ref[field])
        for a, b in zip(got[field], ref[field]):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, f=field: f"{f}: {m}")
    assert any(g is not None for g in ref_grads.values())
    for n, g in ref_grads.items():
        if g is None:
            assert grads[n] is None, n
        else:
            torch.testing.assert_close(grads[n], g, **grad_tol, msg=lambda m, n=n: f"grad {n}: {m}")
    return ref, got


# ------------------------------------------------------------------------------- Llama
def llama_config():
    return transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def test_llama_gqa_causal_on_the_kernels(name, kernel_calls):
    """Grouped-query heads reach the kernels as they are (no repeat), causality as is_causal."""
    eager, ours = pair(transformers.LlamaModel, llama_config(), name, torch.float32)
    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: every query row still sees a key
    compare(eager, ours, dict(input_ids=ids, attention_mask=mask), **F32)
    assert len(kernel_calls) == 2
    for q_shape, k_shape, kw in kernel_calls:
        assert q_shape[1] == 4 and k_shape[1] == 2  # Hkv = 2, not repeated
        assert kw["is_causal"] is True and kw["attn_bias"] is None
        assert kw["key_padding_mask"] is not None and kw["need_weights"] == "full"


def test_llama_without_padding_is_plain_causal(name, kernel_calls):
    eager, ours = pair(transformers.LlamaModel, llama_config(), name, torch.float32)
    ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(2))
    compare(eager, ours, dict(input_ids=ids), **F32)
    assert len(kernel_calls) == 2
    assert all(kw["is_causal"] and kw["key_padding_mask"] is None for _, _, kw in kernel_calls)


def test_llama_left_padding_rows_that_see_no_key_match_eager(name, kernel_calls):
    """Left padding: a padded query sees only padded keys; eager gives it uniform weights and
    the mean of the values, and so do we (the kernels give zeros, patched for those rows)."""
    eager, ours = pair(transformers.LlamaModel, llama_config(), name, torch.float32)
    ids = torch.randint(1, 99, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    # The loss weighs the padded rows too: eager's softmax backward at their uniform rows
    # reaches the queries and keys, and so does ours.
    ref, got = compare(eager, ours, dict(input_ids=ids, attention_mask=mask), **F32)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, **F32["tol"])  # padded rows too
    torch.testing.assert_close(got.attentions[0][1, :, 0], torch.full((4, 8), 1 / 8))
    assert len(kernel_calls) == 2


def test_llama_decoding_with_a_cache(name, kernel_calls):
    """One step with a cache (Lq = 1 < Lk) and a chunk of 3 (bottom-right causality)."""
    eager, ours = pair(transformers.LlamaModel, llama_config(), name, torch.float32)
    ids = torch.randint(1, 99, (2, 10), generator=torch.Generator().manual_seed(4))
    # transformers 5.25 renamed past_key_values to cache (the old name deprecated)
    key = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"
    with torch.no_grad():
        for model in (eager, ours):
            cache = model(input_ids=ids[:, :6], use_cache=True)[key]
            step = model(input_ids=ids[:, 6:9], use_cache=True, **{key: cache})
            last = model(input_ids=ids[:, 9:], **{key: step[key]})
            model.result = (step.last_hidden_state, last.last_hidden_state)
    for a, b in zip(ours.result, eager.result):
        torch.testing.assert_close(a, b, **F32["tol"])
    assert len(kernel_calls) == 6


def test_mistral_sliding_window_goes_as_a_bias(name, kernel_calls):
    """A sliding window is no structure the kernels take: the dense mask becomes an additive
    attn_bias (and the sliding_window argument the mask already encodes is not a fallback)."""
    config = transformers.MistralConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=3, max_position_embeddings=64,
        pad_token_id=0)
    eager, ours = pair(transformers.MistralModel, config, name, torch.float32)
    ids = torch.randint(1, 99, (2, 8), generator=torch.Generator().manual_seed(12))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    compare(eager, ours, dict(input_ids=ids, attention_mask=mask), **F32)
    assert len(kernel_calls) == 2 and all(kw["attn_bias"] is not None for _, _, kw in kernel_calls)


# ---------------------------------------------------------------------------------- T5
def t5_config():
    return transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)


def test_t5_position_bias_goes_to_the_kernels_and_trains(name, kernel_calls):
    """T5's relative position bias is an attn_bias: attentions and hidden states equal eager,
    and relative_attention_bias gets its gradient (it was silently dropped before)."""
    eager, ours = pair(transformers.T5Model, t5_config(), name)
    g = torch.Generator().manual_seed(5)
    ids, dec = torch.randint(1, 99, (2, 7), generator=g), torch.randint(1, 99, (2, 5), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    compare(eager, ours, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec))
    assert ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0
    assert len(kernel_calls) == 6  # 2 encoder self, 2 decoder self, 2 cross
    assert all(kw["attn_bias"] is not None for _, _, kw in kernel_calls)


def test_a_fully_padded_encoder_item_matches_eager_through_cross_attention(name, kernel_calls):
    """Item 0's encoder mask is all zeros: eager attends uniformly there (encoder rows and
    every decoder cross-attention row); so must we, or every decoder position changes."""
    eager, ours = pair(transformers.T5Model, t5_config(), name)
    g = torch.Generator().manual_seed(6)
    ids, dec = torch.randint(1, 99, (2, 6), generator=g), torch.randint(1, 99, (2, 4), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0] = 0
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, **TOL)
    torch.testing.assert_close(got.encoder_last_hidden_state, ref.encoder_last_hidden_state, **TOL)
    for a, b in zip(got.cross_attentions, ref.cross_attentions):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.all(got.cross_attentions[0][0] == 1 / 6)
    assert len(kernel_calls) == 6
    # Training: the loss sees item 0 too, and eager's softmax backward at its uniform rows
    # reaches the queries, keys and the relative position bias.
    compare(eager, ours, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec))


# -------------------------------------------------------------------------------- GPT-2
def test_gpt2_causal_on_the_kernels(name, kernel_calls):
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    eager, ours = pair(transformers.GPT2Model, config, name)
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    compare(eager, ours, dict(input_ids=ids, attention_mask=mask))
    assert len(kernel_calls) == 2 and all(kw["is_causal"] for _, _, kw in kernel_calls)


# ------------------------------------------------------------------- BERT, Wav2Vec2, Whisper
@pytest.mark.parametrize("fully_padded", [False, True])
def test_bert_with_padding(name, kernel_calls, fully_padded):
    """Item 1 partly padded; with ``fully_padded`` item 0 is all padding too: eager's rows
    that see no key (uniform) and their gradients into the queries and keys, matched."""
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    eager, ours = pair(transformers.BertModel, config, name)
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    if fully_padded:
        mask[0] = 0
    compare(eager, ours, dict(input_ids=ids, attention_mask=mask))
    assert len(kernel_calls) == 2
    assert all(kw["key_padding_mask"] is not None and not kw["is_causal"] for _, _, kw in kernel_calls)


def test_wav2vec2_with_padding(name, kernel_calls):
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0)
    eager, ours = pair(transformers.Wav2Vec2Model, config, name)
    audio = torch.randn(2, 800, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 500:] = 0
    compare(eager, ours, dict(input_values=audio, attention_mask=mask))
    assert len(kernel_calls) == 2


def test_whisper_every_attention_on_the_kernels(name, kernel_calls):
    """Encoder self-attention, causal decoder self-attention and cross-attention (the word
    timestamp weights) all run fused."""
    config = transformers.WhisperConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
        max_source_positions=30, max_target_positions=20, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0)
    eager, ours = pair(transformers.WhisperModel, config, name)
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 8, 60, generator=g, dtype=torch.float64)
    dec = torch.randint(3, 99, (2, 7), generator=g)
    compare(eager, ours, dict(input_features=features, decoder_input_ids=dec))
    assert len(kernel_calls) == 6
    assert sum(kw["is_causal"] for _, _, kw in kernel_calls) == 2
