"""Token -> frame alignment (crossattn.alignment): DTW optimality, and alignments recovered from
the fused weights and from the top-k statistics alone on inputs with a known alignment."""
from __future__ import annotations

import pytest
import torch

import crossattn
from crossattn import alignment
from crossattn.demo import aligned_inputs


def brute_dtw_cost(c):
    T, F = c.shape
    inf = float("inf")
    acc = [[inf] * F for _ in range(T)]
    for i in range(T):
        for j in range(F):
            best = 0.0 if i == j == 0 else min(
                acc[i - 1][j] if i else inf, acc[i][j - 1] if j else inf, acc[i - 1][j - 1] if i and j else inf)
            acc[i][j] = best + float(c[i, j])
    return acc[-1][-1]


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (4, 9), (7, 7), (9, 4)])
@pytest.mark.parametrize("seed", range(3))
def test_dtw_finds_the_least_cost_monotonic_path(shape, seed):
    c = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tokens, frames = alignment.dtw(c)
    assert (tokens[0], frames[0]) == (0, 0) and (tokens[-1], frames[-1]) == (shape[0] - 1, shape[1] - 1)
    steps = torch.stack([tokens.diff(), frames.diff()], 1)
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(1) >= 1).all()  # right, down or diagonal
    assert c[tokens, frames].sum().item() == pytest.approx(brute_dtw_cost(c), rel=1e-12)


def test_align_recovers_a_known_alignment_from_weights_and_from_top_k():
    """Tokens whose true spans are known (token i covers frames [i*A/T, (i+1)*A/T)): the
    alignment from the fused head-subset weights and from the top-4 statistics alone put
    each token's centre frame in (or next to) its span -- far better than chance."""
    T, A, H = 24, 240, 4
    (q_x, k_x, v_x, q_y, k_y, v_y), _, _ = aligned_inputs(1, H, T, A, 32, device="cpu", dtype=torch.float32)
    heads = [0, 2]
    _, w, aux = crossattn.cross_attention(q_x, k_y, v_y, need_weights="full", weight_heads=heads,
                                          return_aux=crossattn.AuxRequest(top_k=4))
    truth_lo = torch.arange(T) * A // T
    truth_hi = (torch.arange(T) + 1) * A // T
    slack = A // T  # one token's width

    def hit_rate(al):
        centre = (al.starts + al.ends) // 2
        return ((centre >= truth_lo - slack) & (centre < truth_hi + slack)).float().mean().item()

    from_weights = alignment.align(w[0])
    from_top_k = alignment.align_top_k(aux.top_k_values[0, heads], aux.top_k_indices[0, heads], A)
    chance = 3 * slack / A
    assert hit_rate(from_weights) >= 0.9 > chance
    assert hit_rate(from_top_k) >= 0.9
    assert (from_weights.starts[1:] >= from_weights.starts[:-1]).all()


def test_scores_from_top_k_places_values_and_ignores_missing():
    values = torch.tensor([[[0.6, 0.4, 0.0]]])
    indices = torch.tensor([[[3, 1, -1]]])
    s = alignment.scores_from_top_k(values, indices, 5)
    torch.testing.assert_close(s, torch.tensor([[[0.0, 0.4, 0.0, 0.6, 0.0]]]))


def test_word_spans_merge_tokens_and_skip_special_tokens():
    al = alignment.Alignment(None, None, torch.tensor([0, 2, 5, 9]), torch.tensor([1, 4, 8, 9]))
    spans = alignment.word_spans(al, [None, "hello", "hello", "world"], frame_seconds=0.02)
    assert spans == [("hello", pytest.approx(0.04), pytest.approx(0.18)), ("world", pytest.approx(0.18),
                                                                            pytest.approx(0.2))]


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(0, 4), "x"])
def test_dtw_refuses_bad_cost(bad):
    with pytest.raises(ValueError, match="cost"):
        alignment.dtw(bad)
