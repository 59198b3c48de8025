"""Token -> frame alignment from cross-attention, Whisper style: a monotonic path (dynamic
time warping) through the attention of a few alignment heads, from their weights or from the
top-k statistics alone (``return_aux=AuxRequest(top_k=...)``, no weight matrix).

Shape legend: ``T`` text tokens, ``F`` audio frames, ``h`` selected heads, ``k`` top-k.

Typical use::

    out, w = crossattn.cross_attention(text_q, audio_k, audio_v, need_weights="full",
                                       weight_heads=alignment_heads)
    al = crossattn.alignment.align(w[0], num_tokens=n_text, num_frames=n_audio)
    al.starts, al.ends                         # first / last frame of each token
    crossattn.alignment.word_spans(al, word_of_token, frame_seconds=0.02)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Alignment", "align", "align_top_k", "boundary_error", "dtw", "scores_from_top_k", "trim_to_top_k",
           "word_spans"]


class Alignment(NamedTuple):
    """A monotonic token -> frame alignment: the path (``tokens``, ``frames``, from
    ``(0, 0)`` to ``(T-1, F-1)``), and per token the first and last frame it covers ``[T]``."""

    tokens: torch.Tensor
    frames: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor


def dtw(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The monotonic path through ``cost`` ``[T, F]`` of least total cost, moving right, down
    or diagonally from ``(0, 0)`` to ``(T-1, F-1)``: ``(token indices, frame indices)``.

    Each row is one vectorised min-plus scan (``C[i, j] = S[j] + cummin(A - S)[j]`` with ``S``
    the row's prefix sums and ``A`` the best entry from the row above), so a 512 x 16 000
    alignment takes 512 tensor steps, not 8 million Python ones.
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2:
        raise ValueError(f"cost must be a 2-D tensor [T, F], got {getattr(cost, 'shape', type(cost).__name__)}")
    T, F = cost.shape
    if T == 0 or F == 0:
        raise ValueError(f"cost must have at least one token and one frame, got shape {list(cost.shape)}")
    c = cost.detach().double().cpu()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    prev = None
    starts = torch.empty(T, F, dtype=torch.int64)  # where the run along row i that ends at j began
    diag = torch.empty(T, F, dtype=torch.bool)  # that run was entered diagonally (else from above)
    for i in range(T):
        row = c[i]
        if prev is None:
            enter = torch.full((F,), inf.item(), dtype=torch.float64)
            enter[0] = row[0]
            from_diag = torch.zeros(F, dtype=torch.bool)
        else:
            up = prev
            left_up = torch.cat([inf.view(1), prev[:-1]])
            from_diag = left_up < up
            enter = row + torch.minimum(up, left_up)
        s = torch.cumsum(row, 0)
        best, idx = torch.cummin(enter - s, 0)
        prev = s + best
        starts[i], diag[i] = idx, from_diag
    # Walk back: along row i from j to its run start t, then up (or up-left) to row i - 1.
    tokens, frames = [], []
    i, j = T - 1, F - 1
    while i >= 0:
        t = int(starts[i, j])
        for jj in range(j, t - 1, -1):
            tokens.append(i)
            frames.append(jj)
        j = t - 1 if diag[i, t] else t
        i -= 1
    tokens.reverse()
    frames.reverse()
    return torch.tensor(tokens), torch.tensor(frames)


def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a window of ``width`` frames (last dim), edges reflected, as Whisper does."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = torch.nn.functional.pad(x, (pad, pad), mode="reflect")  # x is [h, T, F]
    return padded.unfold(-1, width, 1).median(-1).values


def _spans(tokens: torch.Tensor, frames: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.full((T,), -1, dtype=torch.int64).scatter_reduce(0, tokens, frames, "amin", include_self=False)
    ends = torch.full((T,), -1, dtype=torch.int64).scatter_reduce(0, tokens, frames, "amax", include_self=False)
    return starts, ends


def align(weights: torch.Tensor, *, num_tokens: int | None = None, num_frames: int | None = None,
          median_width: int = 7, normalise: bool = True) -> Alignment:
    """Align tokens to frames from attention weights ``[h, T, F]`` (selected heads of one
    example) or ``[T, F]``.

    As Whisper does: each head's weights are standardised over the tokens (per frame),
    median-filtered over ``median_width`` frames, averaged over the heads, and the alignment
    is the least-cost monotonic path through their negation. ``num_tokens`` / ``num_frames``
    crop padding away first.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() not in (2, 3):
        raise ValueError("weights must be a tensor [heads, T, F] or [T, F], got "
                         f"{getattr(weights, 'shape', type(weights).__name__)}")
    w = weights.detach().float().cpu()
    w = w[None] if w.dim() == 2 else w
    w = w[:, :num_tokens, :num_frames]  # None keeps everything
    if normalise and w.shape[1] > 1:
        w = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True).clamp(min=1e-8)
    w = _median_filter(w, median_width).mean(0)
    tokens, frames = dtw(-w)
    return Alignment(tokens, frames, *_spans(tokens, frames, w.shape[0]))


def scores_from_top_k(values: torch.Tensor, indices: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A ``[h, T, F]`` score map from the top-k statistics ``[h, T, k]`` of some heads
    (``AuxOutput.top_k_values`` / ``top_k_indices`` of one example): each token's k best
    frames keep their weight, every other frame 0 (index -1 entries are ignored)."""
    if values.shape != indices.shape or values.dim() != 3:
        raise ValueError(f"values and indices must both be [h, T, k], got {list(values.shape)} and "
                         f"{list(indices.shape)}")
    out = torch.zeros(values.shape[0], values.shape[1], num_frames + 1, dtype=torch.float32)
    idx = indices.cpu().clamp(min=-1).masked_fill(indices.cpu() < 0, num_frames)  # -1 -> a spill column
    out.scatter_(-1, idx, values.detach().float().cpu())
    return out[..., :num_frames]


def align_top_k(values: torch.Tensor, indices: torch.Tensor, num_frames: int, *, num_tokens: int | None = None,
                median_width: int = 7) -> Alignment:
    """:func:`align` from the top-k statistics alone (no weight matrix was materialised)."""
    scores = scores_from_top_k(values, indices, num_frames)
    return align(scores, num_tokens=num_tokens, median_width=median_width, normalise=False)


def trim_to_top_k(alignment: Alignment, indices: torch.Tensor) -> Alignment:
    """Each token's span cut to the frames of its top-k (``indices`` ``[h, T, k]``, any head)
    that lie on its run of the path; a token none of whose frames do keeps its run. The path
    gives every frame to some token, pauses included; the top-k frames say where the token's
    attention is, so a word stops where its attention does instead of at the next word."""
    idx = indices.detach().cpu().transpose(0, 1).reshape(indices.shape[1], -1)  # [T, h * k]
    T = min(idx.shape[0], alignment.starts.numel())
    idx = idx[:T]
    run_lo, run_hi = alignment.starts[:T, None], alignment.ends[:T, None]
    on_run = (idx >= run_lo) & (idx <= run_hi)
    big = torch.iinfo(torch.int64).max
    lo = torch.where(on_run, idx, big).amin(1)
    hi = torch.where(on_run, idx, -1).amax(1)
    found = on_run.any(1)
    starts, ends = alignment.starts.clone(), alignment.ends.clone()
    starts[:T] = torch.where(found, lo, alignment.starts[:T])
    ends[:T] = torch.where(found, hi, alignment.ends[:T])
    return alignment._replace(starts=starts, ends=ends)


def word_spans(alignment: Alignment, word_of_token, *, frame_seconds: float = 1.0, offset: float = 0.0):
    """``[(word, start, end)]`` in seconds (frames when ``frame_seconds`` is 1): each word spans
    the frames of its tokens; ``word_of_token[i]`` is token ``i``'s word id (None for tokens
    that belong to no word, e.g. special tokens). Frame ``f`` covers ``[offset + f *
    frame_seconds, offset + (f + 1) * frame_seconds)``: ``offset`` places the frames (half a
    window minus half a hop for uncentred STFT frames)."""
    spans: dict = {}
    for i, word in enumerate(word_of_token):
        if word is None or i >= len(alignment.starts):
            continue
        s, e = int(alignment.starts[i]), int(alignment.ends[i])
        lo, hi = spans.get(word, (s, e))
        spans[word] = (min(lo, s), max(hi, e))
    return [(word, offset + lo * frame_seconds, offset + (hi + 1) * frame_seconds)
            for word, (lo, hi) in spans.items()]


def boundary_error(predicted, truth) -> float:
    """Mean absolute error of word boundaries, in the unit of the inputs: ``predicted`` and
    ``truth`` are ``[(word, start, end)]`` for the same words in the same order; each word
    contributes its start and its end."""
    if len(predicted) != len(truth):
        raise ValueError(f"predicted has {len(predicted)} words, truth {len(truth)}: they must be the same words")
    if not truth:
        return float("nan")
    errors = [abs(float(p[i]) - float(t[i])) for p, t in zip(predicted, truth) for i in (1, 2)]
    return sum(errors) / len(errors)
