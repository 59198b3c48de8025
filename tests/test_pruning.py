"""Block selection (select_blocks) and pruned attention semantics."""
from __future__ import annotations

import math

import pytest
import torch

import crossattn
from crossattn import BlockPruning
from crossattn.reference import attention_reference
from conftest import make_qkv, random_padding


def loop_select(q, k, cfg, kpm=None, qpm=None, scale=None, temperature=None):
    """Straightforward per-row selection, written independently of the reference."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    nqb, nkb = -(-Lq // cfg.block_q), -(-Lk // cfg.block_k)
    out = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            t = 1.0 if temperature is None else float(temperature[h] if torch.is_tensor(temperature) else temperature)
            kmeans, kvalid = [], []
            for j in range(nkb):
                idx = [x for x in range(j * cfg.block_k, min(Lk, (j + 1) * cfg.block_k))
                       if kpm is None or not kpm[b, x]]
                kvalid.append(bool(idx))
                kmeans.append(k[b, h, idx].mean(0) if idx else None)
            n_valid = sum(kvalid)
            for i in range(nqb):
                idx = [x for x in range(i * cfg.block_q, min(Lq, (i + 1) * cfg.block_q))
                       if qpm is None or not qpm[b, x]]
                if not idx or not n_valid:
                    continue
                qm = q[b, h, idx].mean(0)
                scores = {j: float(qm @ kmeans[j]) * scale / t for j in range(nkb) if kvalid[j]}
                ranked = sorted(scores, key=lambda j: (-scores[j], j))
                if cfg.top_k is not None:
                    n = cfg.top_k
                elif cfg.keep is not None:
                    n = math.ceil(round(cfg.keep * n_valid, 9))
                else:
                    z = max(scores.values())
                    total = sum(math.exp(s - z) for s in scores.values())
                    n, acc = 0, 0.0
                    for j in ranked:
                        if acc >= cfg.mass:
                            break
                        acc += math.exp(scores[j] - z) / total
                        n += 1
                n = min(max(n, cfg.min_blocks), n_valid)
                for j in ranked[:n]:
                    out[b, h, i, j] = True
    return out


CONFIGS = [
    BlockPruning(block_q=16, block_k=16, top_k=2),
    BlockPruning(block_q=32, block_k=16, top_k=1, min_blocks=3),
    BlockPruning(block_q=16, block_k=32, keep=0.5),
    BlockPruning(block_q=16, block_k=16, keep=0.3),
    BlockPruning(block_q=64, block_k=16, mass=0.7),
    BlockPruning(block_q=16, block_k=16, mass=1.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
@pytest.mark.parametrize("padded", [False, True])
def test_selection_matches_loop_oracle(cfg, padded):
    B, H, Lq, Lk, D = 2, 3, 45, 163, 8
    q, k, _ = make_qkv(B, H, Lq, Lk, D, dtype=torch.float64, seed=3)
    q = q * 3  # spread the block scores
    kpm = random_padding(B, Lk, seed=1) if padded else None
    qpm = random_padding(B, Lq, seed=2) if padded else None
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = crossattn.select_blocks(q, k, cfg, key_padding_mask=kpm, query_padding_mask=qpm,
                                  temperature=t)
    assert got.dtype == torch.bool and got.shape == (B, H, -(-Lq // cfg.block_q), -(-Lk // cfg.block_k))
    assert torch.equal(got, loop_select(q, k, cfg, kpm, qpm, temperature=t))


def _structured_keys(nblocks, block, D):
    """Key block j is constant e_0 * (j + 1): block scores grow with j for positive queries."""
    k = torch.zeros(1, 1, nblocks * block, D, dtype=torch.float64)
    for j in range(nblocks):
        k[0, 0, j * block:(j + 1) * block, 0] = j + 1
    return k


def test_top_k_picks_the_best_blocks():
    k = _structured_keys(5, 16, 4)
    q = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, top_k=2))
    assert sel[0, 0, 0].tolist() == [False, False, False, True, True]


def test_ties_go_to_the_lower_block_index():
    k = torch.ones(1, 1, 64, 4, dtype=torch.float64)
    q = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, top_k=2))
    assert sel[0, 0, 0].tolist() == [True, True, False, False]


def test_keep_ratio_is_not_fooled_by_float_rounding():
    k = _structured_keys(25, 16, 4)
    q = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, keep=0.28))
    assert 0.28 * 25 > 7  # the trap: a plain ceil would keep 8
    assert sel.sum().item() == 7 and sel[0, 0, 0, 18:].all()


def test_mass_keeps_the_fewest_blocks_reaching_it():
    k = _structured_keys(4, 16, 4) * 10  # scores 10, 20, 30, 40 * scale: block 3 dominates
    q = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    scale = 1.0
    sb = torch.tensor([10.0, 20, 30, 40])
    probs = torch.softmax(sb, 0)
    for mass, expected in ((0.5, 1), (probs[3].item() + 1e-5, 2), (probs[3].item() + 1e-7, 1), (1.0, 4)):
        sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, mass=mass), scale=scale)
        assert sel.sum().item() == expected, mass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nblocks, mass", [(10, 0.8), (20, 0.5), (7, 5 / 7), (3, 2 / 3)])
def test_mass_is_not_fooled_by_float_rounding(nblocks, mass, dtype):
    # Equal block scores: eight blocks of ten sum to 0.7999999999999999 in float64, which
    # a plain comparison takes for less than 0.8 (and keeps a ninth block).
    k = torch.ones(1, 1, nblocks * 16, 4, dtype=dtype)
    q = torch.ones(1, 1, 16, 4, dtype=dtype)
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, mass=mass))
    assert sel.sum().item() == round(mass * nblocks)


def test_min_blocks_and_valid_blocks_bound_the_count():
    k = _structured_keys(4, 16, 4)
    q = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, top_k=1, min_blocks=3))
    assert sel.sum().item() == 3
    kpm = torch.zeros(1, 64, dtype=torch.bool)
    kpm[0, 16:48] = True  # blocks 1 and 2 have no valid key
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, top_k=4),
                                  key_padding_mask=kpm)
    assert sel[0, 0, 0].tolist() == [True, False, False, True]


def test_fully_padded_query_blocks_keep_nothing():
    q, k, _ = make_qkv(1, 2, 40, 40, 4)
    qpm = torch.zeros(1, 40, dtype=torch.bool)
    qpm[0, 16:32] = True
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, top_k=1),
                                  query_padding_mask=qpm)
    assert not sel[0, :, 1].any() and sel[0, :, 0].sum(-1).eq(1).all()


def test_padded_values_do_not_move_the_block_means():
    q, k, _ = make_qkv(1, 2, 32, 64, 4, seed=4)
    kpm = torch.zeros(1, 64, dtype=torch.bool)
    kpm[0, 40:] = True
    cfg = BlockPruning(block_q=16, block_k=16, top_k=2)
    a = crossattn.select_blocks(q, k, cfg, key_padding_mask=kpm)
    k2 = k.clone()
    k2[:, :, 40:] = 1e3
    assert torch.equal(a, crossattn.select_blocks(q, k2, cfg, key_padding_mask=kpm))


def test_fixed_block_mask_is_returned_as_given():
    q, k, _ = make_qkv(2, 3, 70, 30, 4)
    mask = torch.rand(1, 3, 2, 1) > 0.5
    sel = crossattn.select_blocks(q, k, mask)  # a bare mask uses 64 x 64 blocks
    assert sel.shape == (2, 3, 2, 1) and torch.equal(sel, mask.expand(2, 3, 2, 1))


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=repr)
def test_pruned_attention_is_exact_over_kept_keys(cfg):
    B, H, Lq, Lk, D = 2, 2, 40, 90, 8
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype=torch.float64, seed=6)
    kpm = random_padding(B, Lk, seed=7)
    sel = crossattn.select_blocks(q, k, cfg, key_padding_mask=kpm)
    out, w = crossattn.cross_attention(q, k, v, key_padding_mask=kpm, prune=cfg, need_weights="full")
    # Build the attended pairs by hand and renormalise over them.
    allowed = sel.repeat_interleave(cfg.block_q, 2)[:, :, :Lq].repeat_interleave(cfg.block_k, 3)[..., :Lk]
    allowed = allowed & ~kpm[:, None, None, :]
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    torch.testing.assert_close(w, p)
    torch.testing.assert_close(out, p @ v)
    assert (w[~allowed] == 0).all()
    rows = allowed.any(-1)
    torch.testing.assert_close(w.sum(-1)[rows], torch.ones_like(w.sum(-1)[rows]))


def test_pruning_with_keep_everything_changes_nothing():
    q, k, v = make_qkv(2, 2, 33, 50, 8, dtype=torch.float64)
    a = attention_reference(q, k, v, need_weights="full")
    b = crossattn.cross_attention(q, k, v, need_weights="full",
                                  prune=BlockPruning(block_q=16, block_k=16, keep=1.0))
    torch.testing.assert_close(a, b)


def test_bidirectional_takes_a_pruning_pair():
    qx, kx, vx = make_qkv(1, 2, 40, 40, 8, dtype=torch.float64, seed=1)
    qy, ky, vy = make_qkv(1, 2, 70, 70, 8, dtype=torch.float64, seed=2)
    pxy = torch.zeros(1, 1, 1, 2, dtype=torch.bool)
    pxy[..., 0] = True
    res = crossattn.bidirectional_cross_attention(
        qx, kx, vx, qy, ky, vy, prune=(pxy, None), need_weights="full")
    assert (res.weights_xy[..., 64:] == 0).all() and (res.weights_yx > 0).all()
    with pytest.raises(ValueError, match=r"prune: block_mask must have shape"):
        crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, prune=pxy)


def test_causal_candidates_are_blocks_a_valid_query_can_see():
    # Rows 16-19 are padding: key block 1 is visible only to them, so query block 0 (rows
    # 0-19, block_q=32) keeps block 0 however well block 1 scores (else its 16 valid rows
    # would keep nothing they may see, and come out empty).
    k = _structured_keys(2, 16, 4)  # block 1 scores higher
    q = torch.ones(1, 1, 20, 4, dtype=torch.float64)
    qpm = torch.zeros(1, 20, dtype=torch.bool)
    qpm[0, 16:] = True
    cfg = BlockPruning(block_q=32, block_k=16, top_k=1)
    k20 = k[:, :, :20]
    sel = crossattn.select_blocks(q, k20, cfg, query_padding_mask=qpm, is_causal=True)
    assert sel[0, 0, 0].tolist() == [True, False]
    out, _ = crossattn.cross_attention(q, k20, k20, prune=cfg, query_padding_mask=qpm, is_causal=True)
    assert (out[0, 0, :16].abs().sum(-1) > 0).all()
    # Key side: keys 16-20 padded, Lq=27 and Lk=32 (offset 5): the rows of query block 0 see
    # keys <= 20, so key block 1 (valid keys from 21 on) is no candidate for it.
    k = _structured_keys(2, 16, 4)
    kpm = torch.zeros(1, 32, dtype=torch.bool)
    kpm[0, 16:21] = True
    q = torch.ones(1, 1, 27, 4, dtype=torch.float64)
    sel = crossattn.select_blocks(q, k, BlockPruning(block_q=16, block_k=16, top_k=1),
                                  key_padding_mask=kpm, is_causal=True)
    assert sel[0, 0].tolist() == [[True, False], [False, True]]
