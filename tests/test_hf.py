"""Hugging Face attention implementation: BERT, Wav2Vec2 and Whisper match eager."""
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


def test_wav2vec2_matches_eager(name, kernel_calls):
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    eager, ours = pair(transformers.Wav2Vec2Model, config, name)
    audio = torch.randn(2, 800)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 500:] = 0
    a = eager(audio, attention_mask=mask, output_attentions=True)
    b = ours(audio, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert_all_close(b.attentions, a.attentions)
    assert len(kernel_calls) == 2


def test_whisper_cross_attention_on_the_kernels_matches_eager(name, kernel_calls):
    """Whisper word timestamps average decoder cross-attention heads: those weights now come
    from the fused kernel; the causal decoder self-attention takes the eager fallback."""
    config = transformers.WhisperConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
        max_source_positions=30, max_target_positions=20, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)
    eager, ours = pair(transformers.WhisperModel, config, name)
    features = torch.randn(2, 8, 60)
    decoder_ids = torch.randint(3, 99, (2, 7))
    a = eager(input_features=features, decoder_input_ids=decoder_ids, output_attentions=True)
    b = ours(input_features=features, decoder_input_ids=decoder_ids, output_attentions=True)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert_all_close(b.cross_attentions, a.cross_attentions)
    assert_all_close(b.decoder_attentions, a.decoder_attentions)
    assert_all_close(b.encoder_attentions, a.encoder_attentions)
    assert len(kernel_calls) == 4  # 2 encoder self-attention + 2 decoder cross-attention


def test_mask_reduction_rules():
    pad = torch.tensor([[True, True, False]])
    mask = pad[:, None, None, :].expand(1, 1, 4, 3)
    kp, why = ca_hf.key_padding_from_mask(mask, 4, 3, False)
    assert why is None and kp.tolist() == [[False, False, True]]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    assert ca_hf.key_padding_from_mask(causal, 3, 3, False)[1] == "a mask that differs between queries (not padding alone)"
    assert ca_hf.key_padding_from_mask(None, 3, 3, True)[1] == "causal attention"
    assert ca_hf.key_padding_from_mask(None, 1, 3, True) == (None, None)  # one decoding step
