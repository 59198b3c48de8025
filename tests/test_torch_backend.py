"""backend="torch" (chunked, recompute-in-backward) against the float64 reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import crossattn
from crossattn._philox import draw_dropout_seed
from crossattn.reference import attention_reference, bidirectional_reference
from conftest import (
    DTYPES, FEATURES, GRAD_TOL, assert_close, check_gradients, f64, make_qkv, materialise,
    random_padding, reference,
)

ALL_DTYPES = [torch.float64] + DTYPES

SHAPES = [
    # B, H, Lq, Lk, D, Dv
    (1, 1, 1, 1, 16, 16),
    (2, 3, 20, 196, 32, 32),  # seed 001: 20 text tokens x 196 image patches
    (2, 8, 17, 101, 96, 96),  # seed head dim 96, prime lengths
    (3, 2, 64, 7, 24, 40),  # Dv != D, more queries than keys
    (1, 4, 5, 259, 128, 64),
]


def run(q, k, v, **kw):
    return crossattn.cross_attention(q, k, v, backend="torch", **kw)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("need_weights", [False, "full", "mean"])
def test_forward_matches_reference(shape, dtype, need_weights):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, dtype=dtype)
    kpm = random_padding(B, Lk, seed=1)
    out, w = run(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    ref_out, ref_w = reference(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, what="out")
    if need_weights:
        assert w.dtype == dtype
        assert_close(w, ref_w, dtype, what="weights")
    else:
        assert w is None


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("need_weights", [False, "full", "mean"])
def test_gradients_match_reference(feature, dtype, need_weights):
    B, H, Lq, Lk, D, Dv = 2, 3, 37, 70, 24, 16
    q, k, v = make_qkv(B, H, Lq, Lk, D, Dv, dtype=dtype, requires_grad=True)
    kw = materialise(FEATURES[feature], B, H, Lq, Lk, dtype)
    check_gradients(run, q, k, v, kw, need_weights, dtype)


@pytest.mark.parametrize("need_weights", [False, "full", "mean"])
def test_gradcheck_custom_backward(need_weights):
    q, k, v = make_qkv(2, 2, 5, 7, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.8, 1.7], dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False] * 4 + [True] * 3, [True] * 7])  # batch 1: no valid key
    qpm = torch.tensor([[False, True, False, False, False], [False] * 5])
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)

    def fn(q, k, v, t):
        torch.manual_seed(3)  # the same dropout mask for every evaluation
        out, w = run(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, temperature=t,
                     dropout_p=0.25, need_weights=need_weights, prune=mask)
        return (out, w) if need_weights else out

    assert torch.autograd.gradcheck(fn, (q, k, v, t))


def test_gradcheck_scalar_temperature_tensor():
    q, k, v = make_qkv(1, 3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: run(q, k, v, temperature=t, need_weights="mean"), (q, k, v, t)
    )


def test_chunking_does_not_change_results(monkeypatch):
    q, k, v = make_qkv(2, 3, 29, 50, 8, dtype=torch.float64, requires_grad=True)
    kw = dict(key_padding_mask=random_padding(2, 50), dropout_p=0.3, need_weights="full",
              temperature=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
              prune=crossattn.BlockPruning(block_q=16, block_k=16, mass=0.8))
    results = []
    for budget in (None, "0.00001"):  # one chunk / one query row per chunk
        if budget is None:
            monkeypatch.delenv("CROSSATTN_TORCH_CHUNK_MB", raising=False)
        else:
            monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", budget)
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(0)
        out, w = run(q, k, v, **kw)
        (out.sum() + (w ** 2).sum()).backward()
        results.append([out, w, q.grad, k.grad, v.grad])
    from crossattn.backends.torch_backend import chunk_rows

    assert chunk_rows(2, 3, 29, 50, torch.float64, True) == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunk_budget_bounds_the_score_chunk(monkeypatch):
    from crossattn.backends.torch_backend import chunk_rows

    monkeypatch.setenv("CROSSATTN_TORCH_CHUNK_MB", "64")
    rows = chunk_rows(4, 8, 512, 100_000, torch.float32, False)
    assert rows >= 1
    assert rows * 4 * 8 * 100_000 * 4 <= 64 * 2**20  # one fp32 score chunk within budget


def test_dropout_matches_reference_mask_and_is_reproducible():
    q, k, v = make_qkv(2, 2, 30, 40, 8)
    torch.manual_seed(42)
    a, _ = run(q, k, v, dropout_p=0.4)
    torch.manual_seed(42)
    b, _ = run(q, k, v, dropout_p=0.4)
    c, _ = run(q, k, v, dropout_p=0.4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.manual_seed(42)
    ref, _ = reference(q, k, v, dropout_p=0.4, dropout_seed=draw_dropout_seed())
    assert_close(a, ref, torch.float32)


def test_dropout_rate_and_unbiasedness():
    from crossattn._philox import dropout_keep_mask

    keep = dropout_keep_mask(1234, 0.3, batch=4, heads=8, rows=torch.arange(100), cols=1000)
    n = keep.numel()
    rate = 1 - keep.float().mean().item()
    assert abs(rate - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    # E[out] equals the dropout-free output: average many seeds.
    q, k, v = make_qkv(1, 1, 4, 6, 4, dtype=torch.float64)
    clean, _ = run(q, k, v)
    outs = torch.stack([attention_reference(q, k, v, dropout_p=0.5, dropout_seed=s)[0]
                        for s in range(4000)])
    assert (outs.mean(0) - clean).abs().max() < 0.1
    assert (outs.std(0) > 0).all()


def test_returned_weights_are_pre_dropout():
    q, k, v = make_qkv(2, 2, 9, 13, 8)
    _, w_clean = run(q, k, v, need_weights="full")
    _, w_drop = run(q, k, v, need_weights="full", dropout_p=0.5)
    torch.testing.assert_close(w_clean, w_drop)


def test_empty_rows_zero_output_weights_and_gradients():
    q, k, v = make_qkv(3, 2, 6, 8, 4, requires_grad=True)
    lengths = torch.tensor([8, 0, 3])
    qpm = torch.zeros(3, 6, dtype=torch.bool)
    qpm[2, 4:] = True
    out, w = run(q, k, v, kv_lengths=lengths, query_padding_mask=qpm, need_weights="full")
    assert (out[1] == 0).all() and (w[1] == 0).all()
    assert (out[2, :, 4:] == 0).all() and (w[2, :, 4:] == 0).all()
    assert (w[2, ..., 3:] == 0).all()
    (out.sum() + w.sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert (q.grad[2, :, 4:] == 0).all() and (k.grad[2, :, 3:] == 0).all()


def test_pruned_away_rows_are_zero():
    q, k, v = make_qkv(1, 2, 40, 40, 8, requires_grad=True)
    block_mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    block_mask[0, 1, 2] = False  # head 1, query block 2 keeps nothing
    prune = crossattn.BlockPruning(block_q=16, block_k=16, block_mask=block_mask)
    out, w = run(q, k, v, prune=prune, need_weights="full")
    assert (out[0, 1, 32:] == 0).all() and (w[0, 1, 32:] == 0).all()
    out.sum().backward()
    assert (q.grad[0, 1, 32:] == 0).all()


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (4, 0), (0, 0)])
def test_empty_sequences(Lq, Lk):
    q, k, v = make_qkv(2, 2, Lq, Lk, 4, 3, requires_grad=True)
    out, w = run(q, k, v, need_weights="full")
    assert out.shape == (2, 2, Lq, 3) and w.shape == (2, 2, Lq, Lk)
    assert (out == 0).all()
    (out.sum() + w.sum()).backward()
    assert q.grad.shape == q.shape and (q.grad == 0).all()


def test_non_contiguous_inputs():
    base = torch.randn(2, 30, 4, 16 * 3)
    q = base[..., :16].transpose(1, 2)  # [B, H, L, D] strided view
    k = base[..., 16:32].transpose(1, 2)[:, :, ::2]
    v = base[..., 32:].transpose(1, 2)[:, :, ::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    out, w = run(q, k, v, need_weights="full")
    ref_out, ref_w = reference(q, k, v, need_weights="full")
    assert_close(out, ref_out, torch.float32)
    assert_close(w, ref_w, torch.float32)


def test_padded_keys_have_no_influence():
    q, k, v = make_qkv(2, 2, 7, 12, 8)
    kpm = random_padding(2, 12, seed=4)
    out, w = run(q, k, v, key_padding_mask=kpm, need_weights="full")
    k2, v2 = k.clone(), v.clone()
    k2[kpm[:, None, :, None].expand_as(k)] = 1e4
    v2[kpm[:, None, :, None].expand_as(v)] = -1e4
    out2, w2 = run(q, k2, v2, key_padding_mask=kpm, need_weights="full")
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(w, w2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("need_weights", [False, "mean"])
def test_bidirectional_matches_reference(dtype, need_weights):
    B, H, Lx, Ly = 2, 4, 19, 45
    qx, kx, vx = make_qkv(B, H, Lx, Lx, 32, 24, dtype=dtype, seed=1, requires_grad=True)
    qy, ky, vy = make_qkv(B, H, Ly, Ly, 32, 16, dtype=dtype, seed=2, requires_grad=True)
    xm, ym = random_padding(B, Lx, seed=3), random_padding(B, Ly, seed=4)
    kw = dict(x_padding_mask=xm, y_padding_mask=ym, need_weights=need_weights, dropout_p=0.1,
              temperature=(0.5, 2.0))
    torch.manual_seed(8)
    res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, backend="torch", **kw)
    torch.manual_seed(8)
    seed = draw_dropout_seed()
    ins64 = f64(qx, kx, vx, qy, ky, vy)
    ref = bidirectional_reference(*ins64, dropout_seed=seed, **kw)
    assert isinstance(res, crossattn.BidirectionalOutput)
    for name in res._fields:
        a, b = getattr(res, name), getattr(ref, name)
        if need_weights or name.startswith("out"):
            assert_close(a, b, dtype, what=name)
        else:
            assert a is None
    loss = sum((t.double() ** 2).sum() for t in res if t is not None)
    ref_loss = sum((t ** 2).sum() for t in ref if t is not None)
    loss.backward()
    ref_loss.backward()
    for a, b in zip((qx, kx, vx, qy, ky, vy), ins64):
        assert_close(a.grad, b.grad, dtype, tol=GRAD_TOL[dtype] * 10, what="grad")


def test_bidirectional_directions_use_different_dropout_streams():
    x = torch.randn(1, 2, 16, 8)
    torch.manual_seed(0)
    res = crossattn.bidirectional_cross_attention(x, x, x, x, x, x, dropout_p=0.5)
    assert not torch.allclose(res.out_x, res.out_y)
    res = crossattn.bidirectional_cross_attention(x, x, x, x, x, x)
    torch.testing.assert_close(res.out_x, res.out_y)


def test_auto_uses_torch_on_cpu():
    q, k, v = make_qkv(1, 1, 3, 4, 8)
    assert crossattn.choose_backend(q, k, v).name == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("statistics", [False, True])
def test_long_audio_memory_stays_bounded(tmp_path, statistics):
    """Lk = 100 000 keys: the full fp32 score matrix would be 819 MB; we stay far below, also
    when training through the weight statistics (entropy, key mass, top-4, lse)."""
    script = textwrap.dedent("""
        import json, resource, sys, torch, crossattn
        stats = sys.argv[1] == "1"
        B, H, Lq, Lk, D = 1, 4, 512, 100_000, 16
        q = torch.randn(B, H, Lq, D, requires_grad=True)
        k = torch.randn(B, H, Lk, D, requires_grad=True)
        v = torch.randn(B, H, Lk, D, requires_grad=True)
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        base = rss()
        if stats:
            req = crossattn.AuxRequest(lse=True, entropy=True, key_mass=True, top_k=4)
            out, _, a = crossattn.cross_attention(q, k, v, backend="torch", return_aux=req)
            assert a.top_k_indices.shape == (B, H, Lq, 4)
            (out.square().sum() + a.entropy.sum() + a.key_mass.square().sum() + a.lse.sum()).backward()
        else:
            out, _ = crossattn.cross_attention(q, k, v, backend="torch")
            out.square().sum().backward()
        # VmHWM, not ru_maxrss: the latter carries the parent's peak over fork.
        with open("/proc/self/status") as f:
            peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        ok = bool(torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all())
        print(json.dumps({"base": base, "peak": peak, "finite": ok}))
    """)
    # Big blocks straight from mmap, so that freed chunks leave the RSS and the peak RSS
    # measures live memory rather than glibc's cached heap.
    env = dict(os.environ, CROSSATTN_TORCH_CHUNK_MB="64", OMP_NUM_THREADS="2",
               MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", script, "1" if statistics else "0"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["finite"]
    score_matrix = 1 * 4 * 512 * 100_000 * 4
    grown = stats["peak"] - stats["base"]
    assert grown < score_matrix / 4, f"peak grew by {grown / 2**20:.0f} MiB"
