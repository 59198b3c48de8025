"""The torch backend's top-k (topk + exact tie handling, no full sort) against a stable sort:
values descending, ties to the lower key index, value 0 / index -1 past the attended keys."""
from __future__ import annotations

import math

import torch

from crossattn.backends.torch_backend import _top_k


def test_top_k_matches_a_stable_sort_on_tie_heavy_rows():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        L = int(torch.randint(1, 12, (1,), generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        p = torch.randint(0, 4, (2, 3, L), generator=g).double() / 4  # a few values: many ties
        s = torch.where(torch.rand(2, 3, L, generator=g) < 0.3, -math.inf, 0.0)  # unattended keys
        values, idx = _top_k(p, s, k, torch.float32)
        ranked = p.masked_fill(s == -math.inf, -1.0)
        if L < k:
            ranked = torch.nn.functional.pad(ranked, (0, k - L), value=-1.0)
        want_v, want_i = torch.sort(ranked, dim=-1, descending=True, stable=True)
        want_v, want_i = want_v[..., :k], want_i[..., :k]
        none = want_v < 0
        assert values.dtype == torch.float32 and idx.dtype == torch.int64
        assert torch.equal(values, want_v.masked_fill(none, 0.0).float())
        assert torch.equal(idx, want_i.masked_fill(none, -1))
