"""Word timestamps from cross-attention, checked against the synthetic corpus's known word
timings (the demo's last part; issue 17).

A small aligner (word embeddings -> queries; log-mel frames through two convolutions ->
keys) attends from each spoken word to the audio frames through
:class:`crossattn.nn.CrossModalAttention`. It is trained for a few steps on some utterances,
supervised by their word timings through the returned weights (which carry gradients), then
read out on held-out utterances from the **top-k statistics only** (``return_aux=
AuxRequest(top_k=16)``, no weight matrix): :func:`crossattn.alignment.align_top_k` finds the
monotonic token -> frame path, :func:`crossattn.alignment.trim_to_top_k` cuts each word to
its top-k frames on that path and :func:`crossattn.alignment.word_spans` turns it into
seconds. Untrained, the same readout shows what random attention gives; a baseline that
splits the voiced span by word length shows what no attention gives.

Needs numpy (``crossattn[models]``) for the corpus.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from crossattn import alignment
from crossattn.nn import CrossModalAttention
from crossattn.reference import AuxRequest

SAMPLE_RATE = 16000
TOP_K = 16  # a word lasts 10-40 frames: 16 of them mark its extent


def _codes(length: torch.Tensor, width: int, size: int = 16) -> torch.Tensor:
    """Sinusoidal codes of relative position ``i / length`` ``[B, width, size]``."""
    rel = (torch.arange(width)[None, :] + 0.5) / length.clamp(min=1)[:, None].float()
    freqs = torch.exp(torch.linspace(0, math.log(32.0), size // 2)) * math.pi
    ang = rel[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)


class WordAligner(nn.Module):
    """Spoken words attend to log-mel frames: ``forward(ids [B, T], text_len [B], mel [B, A,
    n_mels], audio_len [B], **attention options)`` -> what ``CrossModalAttention`` returns."""

    def __init__(self, vocab_size: int, n_mels: int = 40, d: int = 32, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.audio = nn.Sequential(nn.Conv1d(n_mels, d, 5, padding=2), nn.GELU(), nn.Conv1d(d, d, 5, padding=2))
        self.pos = nn.Linear(16, d)  # one map for both sides: the same relative time, the same code
        self.attn = CrossModalAttention(d, heads)

    def forward(self, ids, text_len, mel, audio_len, **options):
        T, A = ids.shape[1], mel.shape[1]
        text = self.embed(ids) + self.pos(_codes(text_len, T))
        audio = self.audio(mel.transpose(1, 2)).transpose(1, 2) + self.pos(_codes(audio_len, A))
        return self.attn(text, audio, context_padding_mask=torch.arange(A)[None] >= audio_len[:, None],
                         query_padding_mask=torch.arange(T)[None] >= text_len[:, None], **options)


class _Frames:
    """Log-mel frames (25 ms window, 10 ms hop, uncentred) and where they lie in time."""

    def __init__(self):
        from crossattn.models import LogMelEncoder

        self.encoder = LogMelEncoder(n_mels=40, sample_rate=SAMPLE_RATE)
        self.hop_s = self.encoder.hop / SAMPLE_RATE
        # Frame f's window starts at f * hop; it stands for the hop-wide slot about its centre.
        self.offset_s = (self.encoder.n_fft - self.encoder.hop) / 2 / SAMPLE_RATE

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.encoder.log_mel(wave[None])[0]
        return (mel - mel.mean(0)) / mel.std(0).clamp(min=1e-3)  # per-utterance normalisation

    def of_time(self, seconds: float) -> int:
        """The first frame whose slot starts at or after ``seconds``."""
        return max(0, math.ceil((seconds - self.offset_s) / self.hop_s - 1e-9))


def load_corpus(root=None, per_class: int = 6, seed: int = 0):
    """The builtin-voice synthetic corpus (deterministic, needs no espeak-ng), generated once
    under ``root`` (the corpus's default cache when None)."""
    from crossattn.data import SyntheticEmotionCorpus

    return SyntheticEmotionCorpus(root, per_class=per_class, seed=seed, engine="builtin", sample_rate=SAMPLE_RATE)


def _batch(items, vocab, frames: _Frames):
    """Padded ids, mels, lengths and the word -> frame target mask ``[B, T, A]``."""
    mels = [frames(it["waveform"]) for it in items]
    words = [it["words"] for it in items]
    B, T, A = len(items), max(len(w) for w in words), max(m.shape[0] for m in mels)
    ids = torch.zeros(B, T, dtype=torch.long)
    mel = torch.zeros(B, A, mels[0].shape[1])
    target = torch.zeros(B, T, A, dtype=torch.bool)
    for b, (m, ws) in enumerate(zip(mels, words)):
        mel[b, : m.shape[0]] = m
        for i, (word, start, end) in enumerate(ws):
            ids[b, i] = vocab.get(word.lower(), 1)
            lo, hi = frames.of_time(start), max(frames.of_time(start) + 1, frames.of_time(end))
            target[b, i, lo: min(hi, m.shape[0])] = True
    text_len = torch.tensor([len(w) for w in words])
    audio_len = torch.tensor([m.shape[0] for m in mels])
    return ids, text_len, mel, audio_len, target


def train_aligner(model: WordAligner, batch, steps: int, lr: float = 1e-2) -> list[float]:
    """Supervised attention (head average), trained through the weights' gradients.
    Returns the loss per step."""
    ids, text_len, mel, audio_len, target = batch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    valid = torch.arange(ids.shape[1])[None] < text_len[:, None]
    losses = []
    for _ in range(steps):
        _, w = model(ids, text_len, mel, audio_len, need_weights="mean")
        # Cross-entropy to a uniform spread over the word's frames: the whole word, not its
        # most distinctive frame, should draw the attention (its extent is the timestamp).
        ce = -(torch.log(w + 1e-6) * target).sum(-1) / target.sum(-1).clamp(min=1)
        loss = (ce * valid).sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict(model: WordAligner, batch, items, frames: _Frames) -> list[list]:
    """Per utterance ``[(word, start_s, end_s)]`` from the top-k statistics alone."""
    ids, text_len, mel, audio_len, _ = batch
    _, _, aux = model(ids, text_len, mel, audio_len, return_aux=AuxRequest(top_k=TOP_K))
    out = []
    for b, it in enumerate(items):
        T, A = int(text_len[b]), int(audio_len[b])
        idx = aux.top_k_indices[b, :, :T]
        al = alignment.align_top_k(aux.top_k_values[b, :, :T], idx, A, num_tokens=T, median_width=1)
        al = alignment.trim_to_top_k(al, idx)
        spans = alignment.word_spans(al, list(range(T)), frame_seconds=frames.hop_s, offset=frames.offset_s)
        out.append([(it["words"][i][0], s, e) for i, s, e in spans])
    return out


def proportional(items, frames: _Frames) -> list[list]:
    """No attention: the voiced span (frames above a loudness threshold) split among the
    words in proportion to their letters."""
    out = []
    for it in items:
        x = it["waveform"]
        hop = frames.encoder.hop
        energy = x[: len(x) // hop * hop].view(-1, hop).pow(2).mean(1)
        loud = torch.nonzero(energy > 0.01 * energy.max()).flatten()
        t0, t1 = float(loud[0]) * frames.hop_s, float(loud[-1] + 1) * frames.hop_s
        letters = torch.tensor([len(w[0]) for w in it["words"]], dtype=torch.float64)
        edges = t0 + (t1 - t0) * torch.cat([torch.zeros(1), letters.cumsum(0) / letters.sum()])
        out.append([(w[0], float(edges[i]), float(edges[i + 1])) for i, w in enumerate(it["words"])])
    return out


def mean_error_ms(predicted: list[list], items) -> float:
    """Mean absolute boundary error (ms) over every word of every utterance."""
    errs = [alignment.boundary_error(p, it["words"]) for p, it in zip(predicted, items)]
    n = [len(it["words"]) for it in items]
    return 1000 * sum(e * k for e, k in zip(errs, n)) / sum(n)


def run(root=None, *, per_class: int = 6, steps: int = 80, held_out: int = 8, seed: int = 0,
        print_fn=print) -> dict:
    """Train on part of the corpus, read word timestamps out on the rest, print the table and
    the summary; returns the errors (ms) and the table rows."""
    corpus = load_corpus(root, per_class=per_class, seed=seed)
    items = [corpus[i] for i in range(len(corpus))]
    if len(items) <= held_out:
        raise ValueError(f"the corpus has {len(items)} utterances: too few to hold {held_out} out")
    train, test = items[:-held_out], items[-held_out:]
    vocab = {"[pad]": 0, "[unk]": 1}
    for it in train:
        for w in it["words"]:
            vocab.setdefault(w[0].lower(), len(vocab))
    frames = _Frames()
    torch.manual_seed(seed)
    model = WordAligner(len(vocab))
    test_batch = _batch(test, vocab, frames)
    untrained = predict(model, test_batch, test, frames)
    losses = train_aligner(model, _batch(train, vocab, frames), steps) if steps else []
    trained = predict(model, test_batch, test, frames)
    baseline = proportional(test, frames)
    errors = {"untrained": mean_error_ms(untrained, test), "trained": mean_error_ms(trained, test),
              "proportional": mean_error_ms(baseline, test)}
    rows = [(t[0], t[1], t[2], p[1], p[2]) for t, p in zip(test[0]["words"], trained[0])]
    print_fn(f"\nword timestamps on a held-out synthetic utterance ({test[0]['text']!r}), from the "
             f"top-{TOP_K} statistics (no weight matrix) after {steps} training steps on "
             f"{len(train)} utterances (loss {losses[0]:.2f} -> {losses[-1]:.2f}):" if losses else
             f"\nword timestamps on a held-out synthetic utterance ({test[0]['text']!r}), untrained:")
    print_fn(f"  {'word':12s} {'true start':>10s} {'true end':>9s} {'pred start':>10s} {'pred end':>9s}")
    for word, ts, te, ps, pe in rows:
        print_fn(f"  {word:12s} {ts:10.3f} {te:9.3f} {ps:10.3f} {pe:9.3f}")
    print_fn(f"mean |boundary error| over {sum(len(it['words']) for it in test)} words of {len(test)} "
             f"held-out utterances: trained {errors['trained']:.0f} ms, untrained {errors['untrained']:.0f} ms, "
             f"no attention (voiced span split by letters) {errors['proportional']:.0f} ms")
    return {"errors_ms": errors, "rows": rows, "losses": losses}
