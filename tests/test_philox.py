"""The dropout generator is standard Philox4x32-10, identical to Triton's tl.philox."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from crossattn._philox import dropout_keep_mask, dropout_threshold, philox4x32

M = 0xFFFFFFFF


def words(seed, c):
    return [w.item() for w in philox4x32(seed, *(torch.tensor(x, dtype=torch.int64) for x in c))]


def test_known_answer_vectors():
    # Random123's published known-answer tests for philox4x32_10.
    assert words(0, (0, 0, 0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words((M << 32) | M, (M, M, M, M)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x299F31D0 << 32) | 0xA4093822,
                 (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_each_call_serves_four_keys():
    seed, i, bh, d = 77, 5, 3, 1
    keep = dropout_keep_mask(seed, 0.5, batch=1, heads=bh + 1, rows=torch.tensor([i]), cols=10,
                             direction=d)[0, bh, 0]
    expected = []
    for j in range(10):
        w = words(seed, (j // 4, i, bh, d))[j % 4]
        expected.append(w >= 2**31)
    assert keep.tolist() == expected


def test_threshold():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    assert dropout_threshold(1.0) == 2**32


def test_mask_depends_only_on_coordinates():
    full = dropout_keep_mask(99, 0.5, batch=2, heads=3, rows=torch.arange(10), cols=17)
    part = dropout_keep_mask(99, 0.5, batch=2, heads=3, rows=torch.tensor([7, 2]), cols=17)
    assert torch.equal(part, full[:, :, [7, 2]])
    other_dir = dropout_keep_mask(99, 0.5, batch=2, heads=3, rows=torch.arange(10), cols=17, direction=1)
    assert not torch.equal(full, other_dir)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_matches_triton_philox_under_the_interpreter():
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from crossattn._philox import philox4x32

        @triton.jit
        def k(out, seed, i, bh, d, BLOCK: tl.constexpr):
            j = tl.arange(0, BLOCK)
            z = tl.zeros([BLOCK], dtype=tl.uint32)
            r0, r1, r2, r3 = tl.philox(seed, j.to(tl.uint32), z + i, z + bh, z + d)
            tl.store(out + j, r0.to(tl.int64))
            tl.store(out + BLOCK + j, r1.to(tl.int64))
            tl.store(out + 2 * BLOCK + j, r2.to(tl.int64))
            tl.store(out + 3 * BLOCK + j, r3.to(tl.int64))

        for seed in (0, 123456789, 2**62 + 12345):
            for i, bh, d in ((0, 0, 0), (99999, 1234, 1)):
                out = torch.zeros(4 * 32, dtype=torch.int64)
                k[(1,)](out, seed, i, bh, d, BLOCK=32)
                mine = philox4x32(seed, torch.arange(32), torch.tensor(i), torch.tensor(bh), torch.tensor(d))
                assert torch.equal(out, torch.cat(mine)), (seed, i, bh, d)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("piece", [1, 7, 1 << 17])
def test_pieces_match_the_whole_tensor_generator(monkeypatch, piece):
    """The in-place, piece-by-piece rounds give the words of ``philox4x32`` on the whole
    counter grid, whatever the piece size; ``dropped`` is the exact complement."""
    import crossattn._philox as ph

    monkeypatch.setattr(ph, "_PIECE", piece)
    rows = torch.tensor([0, 3, 2**32 - 1, 11, 5])
    for seed in (0, 2**63 - 25, torch.tensor(987654321987)):
        words = philox4x32(seed, torch.arange(5).view(1, 1, 1, 5), rows.view(1, 1, -1, 1),
                           torch.arange(6).view(2, 3, 1, 1), torch.tensor(1))
        expected = torch.stack(words, -1).flatten(-2)[..., :18] >= dropout_threshold(0.3)
        keep = dropout_keep_mask(seed, 0.3, batch=2, heads=3, rows=rows, cols=18, direction=1)
        assert torch.equal(keep, expected)
        drop = dropout_keep_mask(seed, 0.3, batch=2, heads=3, rows=rows, cols=18, direction=1, dropped=True)
        assert torch.equal(drop, ~expected)
