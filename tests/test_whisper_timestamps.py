"""Whisper token timestamps from crossattn (crossattn.integrations.whisper) against transformers'
``generate(return_token_timestamps=True)`` on tiny random Whispers built from configs (nothing
downloads), and proof that the alignment heads' weights, and only theirs, came from the kernels."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import crossattn.integrations.transformers as ca_hf  # noqa: E402
import crossattn.integrations.whisper as cw  # noqa: E402
from crossattn import alignment  # noqa: E402

HEADS = [[0, 1], [1, 0], [1, 3]]  # layer 0 head 1; layer 1 heads 0 and 3


def tiny_whisper(frames: int, *, seed: int = 0, dtype=torch.float64):
    """A random 2-layer Whisper whose window is ``frames`` encoder frames (2 * frames mel)."""
    config = transformers.WhisperConfig(
        vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
        max_source_positions=frames, max_target_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.alignment_heads = HEADS
    return model


def features(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, 2 * model.config.max_source_positions, generator=g, dtype=model.dtype)


# Short (30 frames) and longer (200 frames) windows; with a feature mask, the second item's audio
# ends at two thirds of the window and is aligned to its own frames only.
@pytest.mark.parametrize("frames,seed", [(30, 0)] + [pytest.param(f, s, marks=pytest.mark.slow)
                                                   for f, s in ((30, 1), (30, 2), (200, 0))])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_transformers_token_timestamps(frames, seed, masked):
    model = tiny_whisper(frames, seed=seed)
    x = features(model, seed=seed)
    mask = None
    if masked:
        mask = torch.ones(2, x.shape[-1], dtype=torch.long)
        mask[1, x.shape[-1] * 2 // 3:] = 0
    eager = copy.deepcopy(model)  # transformers switches it to eager attention for good
    ref = eager.generate(x, attention_mask=mask, return_token_timestamps=True, max_new_tokens=8, min_new_tokens=8)
    assert eager.config._attn_implementation == "eager"
    ours = cw.generate(model, x, attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    assert model.config._attn_implementation != "eager"
    assert torch.equal(ours["sequences"], ref["sequences"])
    assert ours["token_timestamps"].dtype == ref["token_timestamps"].dtype
    torch.testing.assert_close(ours["token_timestamps"], ref["token_timestamps"], rtol=0, atol=0)
    assert ours["token_timestamps"].max() > 0  # the comparison is not between two zero maps


def test_float32_model_equals_transformers():
    model = tiny_whisper(30, seed=3, dtype=torch.float32)
    x = features(model, seed=3)
    ref = copy.deepcopy(model).generate(x, return_token_timestamps=True, max_new_tokens=8, min_new_tokens=8)
    ours = cw.generate(model, x, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(ours["sequences"], ref["sequences"])
    torch.testing.assert_close(ours["token_timestamps"], ref["token_timestamps"], rtol=0, atol=0)


@pytest.fixture
def calls(monkeypatch):
    """Every kernel call: the alignment heads' (from the whisper module) and every other
    attention's (through the transformers integration), with their kwargs and weights."""
    seen = {"whisper": [], "integration": []}

    def spy(bucket, real):
        def call(q, k, v, **kw):
            result = real(q, k, v, **kw)
            seen[bucket].append((q.shape, k.shape, kw, result[1]))
            return result
        return call

    monkeypatch.setattr(cw, "cross_attention", spy("whisper", cw.cross_attention))
    monkeypatch.setattr(ca_hf, "cross_attention", spy("integration", ca_hf.cross_attention))
    return seen


@pytest.fixture
def no_eager(monkeypatch):
    """transformers' eager Whisper attention raises: nothing may take that path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the timestamp pass ran an attention on transformers' eager path")

    monkeypatch.setattr(transformers.models.whisper.modeling_whisper, "eager_attention_forward", refuse)


def test_weights_come_from_crossattn_alignment_heads_only(calls, no_eager):
    model = tiny_whisper(30)
    x = features(model)
    seq = torch.tensor([[1, 5, 9, 9, 14, 3, 7, 8], [1, 6, 6, 20, 11, 4, 2, 2]])
    ts = cw.token_timestamps(model, x, seq, num_input_ids=1)
    assert ts.shape == (2, 8) and ts.dtype == torch.float32
    # One kernel call per alignment layer, each returning its own heads' weights only.
    assert [tuple(kw["weight_heads"]) for _, _, kw, _ in calls["whisper"]] == [(1,), (0, 3)]
    for (q_shape, k_shape, kw, weights), heads in zip(calls["whisper"], (1, 2)):
        assert kw["need_weights"] == "full"
        assert q_shape == (2, 4, 7, 8) and k_shape == (2, 4, 30, 8)  # all 4 heads attend ...
        assert weights.shape == (2, heads, 7, 30)  # ... only the alignment heads' weights exist
    # Everything else ran on the kernels too (2 encoder, 2 causal decoder self-attentions, no
    # other cross-attention: both layers are alignment layers), without weights.
    assert len(calls["integration"]) == 4
    assert all(not kw["need_weights"] and w is None for _, _, kw, w in calls["integration"])
    assert sum(kw["is_causal"] for _, _, kw, _ in calls["integration"]) == 2
    assert model.config._attn_implementation == "sdpa"  # restored


def test_timestamps_are_the_dtw_of_the_alignment_heads_weights():
    """Independent check of the weights path: transformers' eager cross-attentions of the
    alignment heads, aligned by crossattn.alignment, give the same starts."""
    model = tiny_whisper(30, seed=4)
    x = features(model, seed=4)
    seq = torch.tensor([[1, 5, 9, 9, 14, 3, 7, 8, 8, 30], [1, 6, 6, 20, 11, 4, 2, 2, 2, 2]])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    att = eager(x, decoder_input_ids=seq[:, :-1], output_attentions=True).cross_attentions
    ts = cw.token_timestamps(model, x, seq, num_input_ids=2)
    for b in range(2):
        w = torch.stack([att[layer][b, head] for layer, head in HEADS])[:, 2:]
        starts = alignment.align(w, median_width=model.config.median_filter_width).starts
        expect = torch.cat([torch.zeros(2), starts * 0.02, starts[-1:] * 0.02]).float()
        torch.testing.assert_close(ts[b], expect)


def test_top_k_statistics_without_weights(calls):
    """With top_k >= the frame count the statistics hold every weight: the path equals the
    alignment of the full weights (unnormalised, as align_top_k aligns), and no weight matrix
    was returned by any kernel call."""
    model = tiny_whisper(8, seed=5)
    x = features(model, seed=5)
    seq = torch.tensor([[1, 5, 9, 9, 14, 3, 7], [1, 6, 6, 20, 11, 4, 2]])
    ts = cw.token_timestamps(model, x, seq, num_input_ids=1, top_k=8)
    assert len(calls["whisper"]) == 2
    assert all(w is None and not kw.get("need_weights") and kw["return_aux"].top_k == 8
               for _, _, kw, w in calls["whisper"])
    assert all(w is None for *_, w in calls["integration"])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    att = eager(x, decoder_input_ids=seq[:, :-1], output_attentions=True).cross_attentions
    for b in range(2):
        w = torch.stack([att[layer][b, head] for layer, head in HEADS])[:, 1:]
        starts = alignment.align(w, median_width=7, normalise=False).starts
        expect = torch.cat([torch.zeros(1), starts * 0.02, starts[-1:] * 0.02]).float()
        torch.testing.assert_close(ts[b], expect)


def test_nothing_generated_gives_zeros():
    model = tiny_whisper(30)
    seq = torch.tensor([[1, 5], [1, 6]])
    assert torch.equal(cw.token_timestamps(model, features(model), seq, num_input_ids=1), torch.zeros(2, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(alignment_heads=[[2, 0]]), "alignment_heads"),
    (dict(alignment_heads=[[0]]), "alignment_heads"),
    (dict(num_input_ids=0), "num_input_ids"),
    (dict(num_input_ids=9), "num_input_ids"),
    (dict(top_k=17), "top_k"),
    (dict(attention_mask=torch.ones(2, 59)), "attention_mask"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = tiny_whisper(30)
    seq = torch.tensor([[1, 5, 9], [1, 6, 6]])
    kwargs = {"num_input_ids": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        cw.token_timestamps(model, features(model), seq, **kwargs)


def test_bad_inputs_and_missing_heads():
    model = tiny_whisper(30)
    x = features(model)
    with pytest.raises(ValueError, match="sequences"):
        cw.token_timestamps(model, x, torch.ones(3, 4, dtype=torch.long), num_input_ids=1)
    with pytest.raises(ValueError, match="input_features"):
        cw.generate(model, x[..., :40])
    with pytest.raises(ValueError, match="encoder_outputs"):
        cw.token_timestamps(model, x, torch.ones(2, 4, dtype=torch.long), num_input_ids=1,
                            encoder_outputs=torch.zeros(2, 29, 32))
    with pytest.raises(ValueError, match="return_token_timestamps"):
        cw.generate(model, x, return_token_timestamps=True)
    del model.generation_config.alignment_heads
    with pytest.raises(ValueError, match="alignment_heads"):
        cw.token_timestamps(model, x, torch.ones(2, 4, dtype=torch.long), num_input_ids=1)
