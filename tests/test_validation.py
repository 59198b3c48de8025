"""Every bad input raises TypeError/ValueError naming the argument, expected and actual."""
from __future__ import annotations

import pytest
import torch

import crossattn
from conftest import make_qkv

B, H, LQ, LK, D = 2, 3, 5, 7, 8


def qkv(**over):
    q, k, v = make_qkv(B, H, LQ, LK, D)
    args = {"q": q, "k": k, "v": v}
    args.update(over)
    return args["q"], args["k"], args["v"]


def call(*, q=None, k=None, v=None, **kw):
    over = {n: t for n, t in (("q", q), ("k", k), ("v", v)) if t is not None}
    return crossattn.cross_attention(*qkv(**over), **kw)


CASES = [
    # (id, kwargs, error type, fragments the message must contain)
    ("q not a tensor", dict(q=[[1.0]]), TypeError, ["q", "torch.Tensor", "list"]),
    ("integer q", dict(q=torch.ones(B, H, LQ, D, dtype=torch.int64)), TypeError, ["q", "floating", "torch.int64"]),
    ("complex v", dict(v=torch.ones(B, H, LK, D, dtype=torch.complex64)), TypeError, ["v", "complex64"]),
    ("q rank 3", dict(q=torch.randn(B, LQ, D)), ValueError, ["q", "4-D", "[2, 5, 8]"]),
    ("k rank 5", dict(k=torch.randn(1, B, H, LK, D)), ValueError, ["k", "4-D"]),
    ("mixed dtypes", dict(k=torch.randn(B, H, LK, D, dtype=torch.float64)), TypeError, ["k", "float32", "float64"]),
    ("batch mismatch", dict(k=torch.randn(3, H, LK, D)), ValueError, ["k", "batch size 2", "[3, 3, 7, 8]"]),
    ("heads mismatch", dict(v=torch.randn(B, 1, LK, D)), ValueError, ["v", "3 heads", "[2, 1, 7, 8]", "grouped-query"]),
    ("head dim mismatch", dict(k=torch.randn(B, H, LK, D + 1)), ValueError, ["k", "head dim 8", "[2, 3, 7, 9]"]),
    ("kv length mismatch", dict(v=torch.randn(B, H, LK + 2, D)), ValueError, ["v", "as many keys as k (7)", "[2, 3, 9, 8]"]),
    ("zero head dim", dict(q=torch.randn(B, H, LQ, 0), k=torch.randn(B, H, LK, 0)), ValueError, ["head dims", ">= 1"]),
    ("float key mask", dict(key_padding_mask=torch.zeros(B, LK)), TypeError, ["key_padding_mask", "torch.bool", "torch.float32", "attention_mask == 0"]),
    ("key mask shape", dict(key_padding_mask=torch.zeros(B, LQ, dtype=torch.bool)), ValueError, ["key_padding_mask", "[2, 7]", "[2, 5]"]),
    ("key mask broadcast", dict(key_padding_mask=torch.zeros(1, LK, dtype=torch.bool)), ValueError, ["key_padding_mask", "[2, 7]", "[1, 7]"]),
    ("key mask not tensor", dict(key_padding_mask=[[0] * LK] * B), TypeError, ["key_padding_mask", "list"]),
    ("query mask shape", dict(query_padding_mask=torch.zeros(B, LK, dtype=torch.bool)), ValueError, ["query_padding_mask", "[2, 5]", "[2, 7]"]),
    ("query mask dtype", dict(query_padding_mask=torch.zeros(B, LQ, dtype=torch.int32)), TypeError, ["query_padding_mask", "torch.int32"]),
    ("both key masks", dict(key_padding_mask=torch.zeros(B, LK, dtype=torch.bool), kv_lengths=[1, 2]), ValueError, ["key_padding_mask", "kv_lengths", "not both"]),
    ("lengths too long", dict(kv_lengths=torch.tensor([3, 8])), ValueError, ["kv_lengths", "[0, 7]", "8"]),
    ("negative lengths", dict(kv_lengths=[-1, 3]), ValueError, ["kv_lengths", "[0, 7]", "-1"]),
    ("lengths shape", dict(kv_lengths=torch.tensor([3, 4, 5])), ValueError, ["kv_lengths", "[2]", "[3]"]),
    ("float lengths", dict(kv_lengths=torch.tensor([3.0, 4.0])), TypeError, ["kv_lengths", "integer", "float32"]),
    ("lengths list of floats", dict(kv_lengths=[3.0, 4.0]), TypeError, ["kv_lengths", "ints"]),
    ("scale tensor", dict(scale=torch.tensor(0.1)), TypeError, ["scale", "float", "Tensor"]),
    ("scale nan", dict(scale=float("nan")), ValueError, ["scale", "finite", "nan"]),
    ("temperature zero", dict(temperature=0.0), ValueError, ["temperature", "positive", "0.0"]),
    ("temperature string", dict(temperature="hot"), TypeError, ["temperature", "str"]),
    ("temperature shape", dict(temperature=torch.ones(H + 1)), ValueError, ["temperature", "[3]", "[4]"]),
    ("temperature int tensor", dict(temperature=torch.ones(H, dtype=torch.int64)), TypeError, ["temperature", "floating", "int64"]),
    ("temperature negative tensor", dict(temperature=torch.tensor([1.0, -1.0, 1.0])), ValueError, ["temperature", "positive", "-1.0", "exp(log_t)"]),
    ("dropout above 1", dict(dropout_p=1.5), ValueError, ["dropout_p", "[0, 1]", "1.5"]),
    ("dropout string", dict(dropout_p="0.1"), TypeError, ["dropout_p", "str"]),
    ("need_weights True", dict(need_weights=True), ValueError, ["need_weights=True", "'full'", "'mean'"]),
    ("need_weights unknown", dict(need_weights="avg"), ValueError, ["need_weights", "'avg'"]),
    ("backend unknown", dict(backend="xformers"), ValueError, ["backend", "'xformers'", "'triton'"]),
    ("backend not str", dict(backend=1), TypeError, ["backend", "int"]),
    ("prune wrong type", dict(prune=0.5), TypeError, ["prune", "BlockPruning", "float"]),
    ("prune float mask", dict(prune=torch.ones(B, H, 1, 1)), TypeError, ["prune", "bool", "float32"]),
    ("prune mask shape", dict(prune=torch.ones(B, H, 2, 1, dtype=torch.bool)), ValueError, ["prune", "[2|1, 3|1, 1, 1]", "[2, 3, 2, 1]", "BlockPruning(block_q"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_reported(case):
    _, kwargs, error, fragments = case
    with pytest.raises(error) as info:
        call(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


PRUNING_CASES = [
    (dict(keep=0.5, top_k=2), ValueError, ["exactly one", "keep, top_k"]),
    (dict(), ValueError, ["exactly one", "none"]),
    (dict(mass=0.9, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), ValueError, ["mass, block_mask"]),
    (dict(keep=0.0), ValueError, ["keep", "(0, 1]", "0.0"]),
    (dict(keep=1.5), ValueError, ["keep", "1.5"]),
    (dict(top_k=0), ValueError, ["top_k", ">= 1", "0"]),
    (dict(top_k=2.0), TypeError, ["top_k", "int", "float"]),
    (dict(mass=1.2), ValueError, ["mass", "(0, 1]"]),
    (dict(keep=0.5, min_blocks=0), ValueError, ["min_blocks", ">= 1"]),
    (dict(keep=0.5, block_q=48), ValueError, ["block_q", "power of two", "48"]),
    (dict(keep=0.5, block_k=512), ValueError, ["block_k", "16 to 256", "512"]),
    (dict(keep=0.5, block_k=8), ValueError, ["block_k", "8"]),
    (dict(block_mask=torch.ones(2, 2)), TypeError, ["block_mask", "torch.bool", "float32"]),
    (dict(block_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, ["block_mask", "4-D", "(2, 2)"]),
    (dict(block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), min_blocks=2), ValueError, ["min_blocks", "block_mask"]),
]


@pytest.mark.parametrize("kwargs,error,fragments", PRUNING_CASES)
def test_contradictory_or_bad_pruning_config(kwargs, error, fragments):
    with pytest.raises(error) as info:
        crossattn.BlockPruning(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_meta_tensors_report_device_mismatch():
    q, k, v = make_qkv(B, H, LQ, LK, D)
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\), got meta"):
        crossattn.cross_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"key_padding_mask must be on cpu, got meta"):
        crossattn.cross_attention(q, k, v, key_padding_mask=torch.zeros(B, LK, dtype=torch.bool, device="meta"))


def test_bidirectional_errors_name_the_side():
    qx, kx, vx = make_qkv(B, H, 4, 4, D, seed=1)
    qy, ky, vy = make_qkv(B, H, 6, 6, D, seed=2)
    with pytest.raises(ValueError, match=r"k_y must have head dim 8"):
        crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky[..., :4], vy)
    with pytest.raises(ValueError, match=r"y_padding_mask must have shape \[B, L\] = \[2, 6\]"):
        crossattn.bidirectional_cross_attention(
            qx, kx, vx, qy, ky, vy, y_padding_mask=torch.zeros(B, 4, dtype=torch.bool))
    # One batch across the sides (the masks are [B, Lx] / [B, Ly]): a batch of 3 x-sequences
    # and 2 y-sequences is refused up front, by name, whatever masks come along.
    qx3, kx3, vx3 = make_qkv(3, H, 4, 4, D, seed=3)
    for mask in (None, torch.zeros(3, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"q_y must have the batch size of q_x \(B = 3"):
            crossattn.bidirectional_cross_attention(qx3, kx, vx, qy, ky[:1].expand(3, -1, -1, -1),
                                                    vy[:1].expand(3, -1, -1, -1), x_padding_mask=mask)
    with pytest.raises(ValueError, match=r"k_x must have batch size 2 like q_y"):
        crossattn.bidirectional_cross_attention(qx, kx3, vx3, qy, ky, vy)
    with pytest.raises(ValueError, match=r"k_x must have as many positions as q_x \(Lx = 4\)"):
        crossattn.bidirectional_cross_attention(qx, kx[:, :, :3], vx[:, :, :3], qy, ky, vy)
    with pytest.raises(ValueError, match=r"temperature \(y->x\) must be positive"):
        crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, temperature=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"temperature as a pair must have 2 entries"):
        crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, temperature=(1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match=r"q_y must be a floating-point tensor"):
        crossattn.bidirectional_cross_attention(qx, kx, vx, qy.long(), ky, vy)


def test_select_blocks_validates():
    q, k, _ = make_qkv(B, H, LQ, LK, D)
    with pytest.raises(TypeError, match="pruning must be"):
        crossattn.select_blocks(q, k, None)
    with pytest.raises(TypeError, match="pruning must be None, a crossattn.BlockPruning"):  # the caller's name
        crossattn.select_blocks(q, k, "top2")
    with pytest.raises(TypeError, match="pruning as a tensor must be a bool block mask"):
        crossattn.select_blocks(q, k, torch.zeros(1, 1, 1, 1))
    # A mask of the wrong rank is named as the caller passed it, with the shape expected.
    with pytest.raises(ValueError, match=r"prune as a tensor must be a 4-D bool block mask .* = \[2\|1, 3\|1, 1, 1\], got \[2, 1, 1\]"):
        crossattn.cross_attention(q, k, k, prune=torch.ones(2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pruning as a tensor must be a 4-D bool block mask"):
        crossattn.select_blocks(q, k, torch.ones(1, 1, 1, 1, 1, dtype=torch.bool))


def test_zero_heads_give_empty_results_and_no_head_mean():
    q, k, v = (torch.randn(2, 0, n, 16, requires_grad=True) for n in (5, 7, 7))
    out, w = crossattn.cross_attention(q, k, v, need_weights="full", dropout_p=0.1, backend="torch")
    assert out.shape == (2, 0, 5, 16) and w.shape == (2, 0, 5, 7)
    out.sum().backward()
    assert q.grad.shape == q.shape
    with pytest.raises(ValueError, match=r"need_weights='mean' averages the query heads, but q has none"):
        crossattn.cross_attention(q, k, v, need_weights="mean")


def test_bidirectional_sides_need_the_same_query_heads():
    qx, kx, vx = make_qkv(B, 4, 6, 6, D, seed=1)
    qy, ky, vy = make_qkv(B, 2, 9, 9, D, seed=2)
    with pytest.raises(ValueError, match=r"q_y must have as many heads as q_x \(H = 4"):
        crossattn.bidirectional_cross_attention(qx, kx[:, :2], vx[:, :2], qy, ky[:, :1], vy[:, :1])


def test_value_checks_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CROSSATTN_CHECK_VALUES", "0")
    q, k, v = make_qkv(B, H, LQ, LK, D)
    # Only data-reading checks are skipped (the torch backend clamps lengths anyway) ...
    out, _ = crossattn.cross_attention(q, k, v, kv_lengths=torch.tensor([3, 8]))
    assert torch.isfinite(out).all()
    # ... shape checks stay.
    with pytest.raises(ValueError, match="kv_lengths must have shape"):
        crossattn.cross_attention(q, k, v, kv_lengths=torch.tensor([3]))
