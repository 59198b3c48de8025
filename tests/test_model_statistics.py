"""The emotion model's regularisers from the attention statistics (issue 17): same values and
gradients as from the weights, and no [B, H, T, A] tensor on the way (CPU, torch backend)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from crossattn import AuxRequest  # noqa: E402
from crossattn.models import (  # noqa: E402
    TextAudioEmotionModel,
    WordTokenizer,
    alignment_loss,
    attention_statistics,
    coverage_alignment_loss,
    head_entropy_loss,
)
from crossattn.nn import BidirectionalCrossAttention, CrossModalAttention  # noqa: E402

TEXTS = ["I am so happy about the party", "the news made me cry", "stop it right now"]
TOK = WordTokenizer.from_corpus(TEXTS)


def batch(lengths=(8000, 4500, 6000), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    wave = torch.zeros(len(lengths), max(lengths), dtype=dtype)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        wave[i, :n] = torch.randn(n, generator=g, dtype=dtype) * 0.1
        mask[i, :n] = 1
    return TOK(TEXTS), {"input_values": wave, "attention_mask": mask}


def model_for(need_weights, fusion="bidirectional", **kw):
    torch.manual_seed(0)
    return TextAudioEmotionModel.tiny(tokenizer=TOK, fusion=fusion, need_weights=need_weights,
                                      dropout=0.0, **kw).double().eval()


def regs_and_grads(model, need_weights):
    model.need_weights = need_weights
    model.zero_grad()
    text, audio = batch(dtype=torch.float64)
    out = model(text, audio)
    regs = model.regularisers(out)
    sum(regs.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, regs, grads


@pytest.mark.parametrize("fusion", ["bidirectional", "text_to_audio", "audio_to_text"])
def test_statistics_path_equals_weight_path(fusion):
    model = model_for("full", fusion)
    out_w, regs_w, grads_w = regs_and_grads(model, "full")
    assert out_w["text_to_audio_statistics"] is None and out_w["audio_to_text_statistics"] is None
    out_s, regs_s, grads_s = regs_and_grads(model, None)
    assert out_s["text_to_audio_attention"] is None and out_s["audio_to_text_attention"] is None
    _, regs_m, grads_m = regs_and_grads(model, "mean")  # mean weights + the entropy statistic
    want = {"bidirectional": {"diversity_text_to_audio", "diversity_audio_to_text", "alignment"},
            "text_to_audio": {"diversity_text_to_audio", "alignment"},
            "audio_to_text": {"diversity_audio_to_text"}}[fusion]
    assert set(regs_w) == set(regs_s) == set(regs_m) == want
    for k in want:
        torch.testing.assert_close(regs_s[k], regs_w[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(regs_m[k], regs_w[k], rtol=1e-10, atol=1e-12)
    assert grads_w.keys() == grads_s.keys() == grads_m.keys()
    # The regularisers reach the query projections only through the attention.
    q_proj = "cross.text_q.weight" if fusion == "bidirectional" else "cross.q_proj.weight"
    assert grads_s[q_proj].abs().sum() > 0
    for n in grads_w:
        torch.testing.assert_close(grads_s[n], grads_w[n], rtol=1e-8, atol=1e-12, msg=n)
        torch.testing.assert_close(grads_m[n], grads_w[n], rtol=1e-8, atol=1e-12, msg=n)


def test_statistics_path_never_makes_a_weight_map(monkeypatch):
    """No [B, H, T, A] (or [B, H, A, T]) tensor exists in the forward or backward of the
    statistics path; the torch backend's row chunks are made smaller than T (on the fused
    backends there are no chunks at all). The weight path, run the same way, does make one:
    the check can fail."""
    monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", "0.0005")  # a few query rows per chunk

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.add(tuple(t.shape))
            return out

    def shapes_seen(need_weights):
        torch.manual_seed(0)
        model = TextAudioEmotionModel.tiny(tokenizer=TOK, need_weights=need_weights, dropout=0.0)
        text, audio = batch()
        with Shapes() as mode:
            out = model(text, audio)
            sum(model.regularisers(out).values()).backward()
        B, T = text["input_ids"].shape
        A = out["audio_features"].shape[1]
        return mode.shapes, {(B, 4, T, A), (B, 4, A, T)}, out

    shapes, maps, out = shapes_seen(None)
    assert out["text_to_audio_statistics"].key_mass is not None
    assert not shapes & maps, f"a weight map was materialised: {shapes & maps}"
    shapes, maps, _ = shapes_seen("full")
    assert shapes & maps


def test_statistics_losses_reduce_to_the_seed_forms():
    g = torch.Generator().manual_seed(1)
    w = torch.softmax(torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64), -1)
    qmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = w * qmask[:, None, :, None]  # padded query rows carry no attention
    ent, mass = attention_statistics(w, qmask)
    want = -(w * w.log()).sum(-1)
    torch.testing.assert_close(ent[qmask[:, None].expand(2, 3, 4).bool()],
                               want[qmask[:, None].expand(2, 3, 4).bool()])
    torch.testing.assert_close(mass, w.sum(2))
    uniform = torch.full((2, 3, 4), math.log(6.0), dtype=torch.float64)
    assert math.isclose(float(head_entropy_loss(uniform, qmask)), -math.log(6.0), rel_tol=1e-12)
    # One text token: the key mass is its weight row, and the alignment is the seed's.
    text = torch.randn(2, 1, 5, generator=g, dtype=torch.float64)
    audio = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    amask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    row = torch.softmax(torch.randn(2, 3, 1, 6, generator=g, dtype=torch.float64), -1)
    seed = alignment_loss(row, text, audio, None, amask)
    torch.testing.assert_close(coverage_alignment_loss(row.sum(2), text, audio, None, amask), seed)


def test_modules_return_statistics_only_when_asked():
    torch.manual_seed(0)
    text, audio = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    bi = BidirectionalCrossAttention(16, 4, dropout=0.0).eval()
    assert len(bi(text, audio, need_weights="mean")) == 4  # unchanged without return_aux
    *_, aux_ta, aux_at = bi(text, audio, return_aux=AuxRequest(entropy=True, key_mass=True))
    assert aux_ta.entropy.shape == (2, 4, 5) and aux_ta.key_mass.shape == (2, 4, 7)
    assert aux_at.entropy.shape == (2, 4, 7) and aux_at.key_mass.shape == (2, 4, 5)
    one = CrossModalAttention(16, 4).eval()
    assert len(one(text, audio)) == 2
    out, w, aux = one(text, audio, return_aux=AuxRequest(top_k=2))
    assert out.shape == (2, 5, 16) and w is None and aux.top_k_indices.shape == (2, 4, 5, 2)
