"""Counter-based dropout masks shared by every backend.

Dropout in crossattn is defined by Philox4x32-10 (Salmon et al., SC'11), the generator
that Triton exposes as ``tl.philox`` and cuRAND as ``curand_Philox4x32_10``. Element
``(b, h, i, j)`` of direction ``d`` (0 = x->y or one-direction, 1 = y->x) is **dropped** iff

    philox(key=seed, counter=(j // 4, i, b * H + h, d))[j % 4] < floor(p * 2**32)

(each Philox call yields four words: one serves four neighbouring keys).

The mask therefore depends only on the seed and the element's coordinates -- not on
chunking, block sizes, launch order or device -- so the reference, the torch backend and
the kernels drop exactly the same elements and tests can compare them bit for bit.

Torch has no unsigned 32-bit multiply-high, so the arithmetic below runs on int64 and
splits one factor in 16-bit halves to stay clear of signed overflow.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a uint32 constant and a uint32 tensor held in int64."""
    x = a * (b >> 16)  # < 2**48
    y = a * (b & 0xFFFF)  # < 2**48
    z = ((x & 0xFFFF) << 16) + y  # < 2**49
    lo = z & _MASK32
    hi = ((x >> 16) + (z >> 32)) & _MASK32
    return hi, lo


def philox4x32(seed, c0, c1, c2, c3, n_rounds: int = N_ROUNDS) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32 for a 64-bit ``seed`` (int or 0-d int64 tensor)
    and broadcastable int64 counters (values in [0, 2**32)).

    Matches ``tl.philox(seed, c0, c1, c2, c3)`` with uint32 counters.
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Elements whose Philox word is below this integer are dropped."""
    return int(p * 2.0**32) if p < 1.0 else 2**32


def dropout_keep_mask(
    seed,
    p: float,
    *,
    batch: int,
    heads: int,
    rows: torch.Tensor,
    cols: int,
    direction: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool keep mask ``[batch, heads, len(rows), cols]`` for query rows ``rows`` (int64)."""
    rows = rows.to(device=device, dtype=torch.int64)
    groups = -(-cols // 4)
    j4 = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, 1, groups)
    i = rows.view(1, 1, -1, 1)
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    d = torch.tensor(direction, device=device, dtype=torch.int64)
    words = torch.stack(philox4x32(seed, j4, i, bh, d), dim=-1)  # [B, H, R, groups, 4]
    words = words.flatten(-2)[..., :cols]  # key j takes word j % 4 of counter j // 4
    return words >= dropout_threshold(p)


def draw_dropout_seed() -> torch.Tensor:
    """A fresh 63-bit seed (0-d int64 CPU tensor) from torch's default CPU generator.

    Every dropout call draws exactly one seed this way, so ``torch.manual_seed`` makes
    dropout reproducible on every backend, and a test can reproduce the seed a call used
    by re-seeding and calling this function. It stays a tensor (no ``.item()``), so
    ``torch.compile(fullgraph=True)`` traces through dropout.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
