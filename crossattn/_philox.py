"""Counter-based dropout masks shared by every backend.

Dropout in crossattn is defined by Philox4x32-10 (Salmon et al., SC'11), the generator
that Triton exposes as ``tl.philox`` and cuRAND as ``curand_Philox4x32_10``. Element
``(b, h, i, j)`` of direction ``d`` (0 = x->y or one-direction, 1 = y->x) is **dropped** iff

    philox(key=seed, counter=(j // 4, i, b * H + h, d))[j % 4] < floor(p * 2**32)

(each Philox call yields four words: one serves four neighbouring keys).

The mask therefore depends only on the seed and the element's coordinates -- not on
chunking, block sizes, launch order or device -- so the reference, the torch backend and
the kernels drop exactly the same elements and tests can compare them bit for bit.

Torch has no unsigned 32-bit multiply-high, so the arithmetic below runs on int64: the
product of two uint32 words needs 64 unsigned bits, and int64 multiplication wraps modulo
2**64 on every torch device, so its bits are the exact unsigned product (checked at import
against the overflow-free split form, which is used instead should a platform not wrap).
"""
from __future__ import annotations

import torch

from . import _cpu_kernels

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10


def _mulhilo_wrapping(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b from one wrapping int64 multiply (3x fewer passes)."""
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def _mulhilo_split(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a uint32 constant and a uint32 tensor held in int64,
    splitting ``b`` in 16-bit halves so that no intermediate overflows."""
    x = a * (b >> 16)  # < 2**48
    y = a * (b & 0xFFFF)  # < 2**48
    z = ((x & 0xFFFF) << 16) + y  # < 2**49
    lo = z & _MASK32
    hi = ((x >> 16) + (z >> 32)) & _MASK32
    return hi, lo


def _wraps() -> bool:
    b = torch.tensor([_MASK32, 0x89ABCDEF, 1, 0], dtype=torch.int64)
    return all(torch.equal(x, y) for a in (_ROUND_A, _ROUND_B)
               for x, y in zip(_mulhilo_wrapping(a, b), _mulhilo_split(a, b)))


_mulhilo = _mulhilo_wrapping if _wraps() else _mulhilo_split


def philox4x32(seed, c0, c1, c2, c3, n_rounds: int = N_ROUNDS, broadcast: bool = True) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32 for a 64-bit ``seed`` (int or 0-d int64 tensor)
    and broadcastable int64 counters (values in [0, 2**32)).

    Matches ``tl.philox(seed, c0, c1, c2, c3)`` with uint32 counters.
    """
    # No broadcast up front: counters that vary along one axis only (keys, rows, heads) stay
    # small for the first rounds, which then cost next to nothing.
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    # Compiled code must not overflow: Inductor's C++ makes int64 wrapping signed overflow,
    # which the C++ compiler may assume away (a different mask). The split form never overflows.
    mulhilo = _mulhilo_split if torch.compiler.is_compiling() else _mulhilo
    for _ in range(n_rounds):
        hi_b, lo_b = mulhilo(_ROUND_B, c2)
        hi_a, lo_a = mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ (c1 ^ k0), lo_b, hi_a ^ (c3 ^ k1), lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return torch.broadcast_tensors(c0, c1, c2, c3) if broadcast else (c0, c1, c2, c3)


def dropout_threshold(p: float) -> int:
    """Elements whose Philox word is below this integer are dropped."""
    return int(p * 2.0**32) if p < 1.0 else 2**32


# Counters per piece of a mask on a CPU (GPUs take the mask whole: one launch per op): its
# six int64 state words stay within a few MiB; measured on AVX-512 with one thread, 2**17
# was ~1.7x faster than whole-tensor rounds, and much smaller pieces lose to per-op overhead.
_PIECE = 1 << 17


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
    dropped: bool = False,
    batch_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bool,
    out: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Bool keep mask ``[batch, heads, len(rows), cols]`` for query rows ``rows`` (int64);
    with ``dropped`` its complement (True = dropped), for ``masked_fill`` without a negation pass.
    ``batch_ids`` (``batch`` int64 indices) names the batch rows when they are not
    ``0 .. batch-1`` (a backend that runs a subset of the batch draws that subset's mask).
    ``dtype`` other than bool gives the mask as 0/1 of that dtype, written by the comparisons
    themselves (no conversion pass over the mask). ``out``, a contiguous tensor of that shape
    and dtype, receives the mask where ``cols`` is a multiple of 4 (a dead buffer reused saves
    a fresh allocation, whose page faults cost as much as the pass); it is ignored otherwise.
    ``probs`` (that shape, ``dtype``, finite and >= 0) gives ``probs * mask`` instead of the mask.
    On a CPU the compiled kernel of :mod:`crossattn._cpu_kernels` writes the same bits in one
    pass where it can (``compiled=False`` forces the torch ops: the reference stays independent)."""
    rows = rows.to(device=device, dtype=torch.int64)
    if (compiled and torch.device(device).type == "cpu" and not torch.compiler.is_compiling()
            and _cpu_kernels.library() is not None):
        shape = (batch, heads, len(rows), cols)
        target = out if (out is not None and out.dtype == dtype and tuple(out.shape) == shape
                         and out.is_contiguous()) else None
        if target is None:
            target = torch.empty(shape, dtype=dtype, device=device)
        if probs is None or (probs.dtype == dtype and tuple(probs.shape) == shape):
            bh = _bh_counters(batch, heads, batch_ids, device).flatten()
            if _cpu_kernels.philox_mask(seed, dropout_threshold(p), bh=bh, rows=rows.contiguous(), cols=cols,
                                        direction=direction, dropped=dropped, out=target,
                                        src=None if probs is None else probs.contiguous()):
                return target
        out = target
    keep = _torch_mask(seed, p, batch, heads, rows, cols, direction, device, dropped, batch_ids, dtype, out)
    return keep if probs is None else keep.mul_(probs)


def _bh_counters(batch, heads, batch_ids, device) -> torch.Tensor:
    """Counter word 2 of every (batch row, head): ``b * H + h``, int64 ``[batch, heads]``."""
    b = (torch.arange(batch, device=device, dtype=torch.int64) if batch_ids is None
         else batch_ids.to(device=device, dtype=torch.int64))
    return b.view(batch, 1) * heads + torch.arange(heads, device=device, dtype=torch.int64)


def _torch_mask(seed, p, batch, heads, rows, cols, direction, device, dropped, batch_ids, dtype, out):
    """dropout_keep_mask with torch ops."""
    groups = -(-cols // 4)
    j4 = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, 1, groups)
    i = rows.view(1, 1, -1, 1)
    bh = _bh_counters(batch, heads, batch_ids, device).view(batch, heads, 1, 1)
    d = torch.full((), direction, device=device, dtype=torch.int64)  # a fill: no host copy to wait for
    threshold = dropout_threshold(p)
    compare = torch.lt if dropped else torch.ge
    # The in-place rounds rely on wrapping int64 products, and write through strided out=
    # views, which Dynamo cannot trace: under torch.compile the whole-tensor rounds.
    if _mulhilo is not _mulhilo_wrapping or torch.compiler.is_compiling():
        keep = torch.stack([compare(w, threshold) for w in philox4x32(seed, j4, i, bh, d)], dim=-1)
        return keep.flatten(-2)[..., :cols].to(dtype)  # key j takes word j % 4 of counter j // 4
    # The first round and most of the second on the broadcast counters (keys, rows and heads
    # vary apart, so they cost next to nothing): round 2's third word, hi_a ^ c3 ^ k1, is the
    # first full-size one, formed piece by piece in _rounds.
    c0, c1, c2, c3 = philox4x32(seed, j4, i, bh, d, n_rounds=1, broadcast=False)
    k0, k1 = _keys(seed)[1]
    hi_b, lo_b = _mulhilo(_ROUND_B, c2)
    hi_a, lo_a = _mulhilo(_ROUND_A, c0)
    c = (hi_b ^ (c1 ^ k0), lo_b, hi_a, c3 ^ k1, lo_a)
    shape = (batch, heads, len(rows), groups, 4)
    if (out is not None and cols % 4 == 0 and out.dtype == dtype and out.is_contiguous()
            and tuple(out.shape) == shape[:3] + (cols,) and out.device == torch.device(device)):
        keep = out.view(shape)
    else:
        keep = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, _PIECE // max(1, batch * heads * groups)) if keep.device.type == "cpu" else max(1, len(rows))
    # One state buffer for every piece: a fresh multi-MiB allocation per piece would be
    # mapped and page-faulted anew each time.
    buf = torch.empty(6 * batch * heads * min(step, len(rows)) * groups, dtype=torch.int64, device=device)
    for r0 in range(0, len(rows), step):
        sl = slice(r0, r0 + step)
        part = [x[:, :, sl] if x.dim() == 4 and x.shape[2] > 1 else x for x in c]
        shape = keep[:, :, sl].shape[:4]
        words = _rounds(seed, part, buf[:6 * shape.numel()].view((6,) + tuple(shape)))
        for w, word in enumerate(words):  # key j takes word j % 4 of counter j // 4
            compare(word, threshold, out=keep[:, :, sl, :, w])
    return keep.flatten(-2)[..., :cols]


def _rounds(seed, c, buf):
    """The end of round 2 and rounds 3-10 of Philox on one piece, in place on preallocated
    int64 words: 10 passes a round instead of 12 (the 32-bit mask is applied once, to the
    words that are multiplied next; the low words keep their high garbage until the end)."""
    shape = buf.shape[1:]
    x0, x2, pb_old, pa_old, pb, pa = buf
    x0.copy_(c[0].expand(shape))
    pb_old.copy_(c[1].expand(shape))
    torch.bitwise_xor(c[2].expand(shape), c[3].expand(shape), out=x2)
    pa_old.copy_(c[4].expand(shape))
    k = _keys(seed)
    for r in range(2, N_ROUNDS):
        k0, k1 = k[r]
        torch.mul(x2, _ROUND_B, out=pb)
        torch.mul(x0, _ROUND_A, out=pa)
        torch.bitwise_right_shift(pb, 32, out=x0)
        x0 ^= pb_old
        x0 &= _MASK32
        x0 ^= k0
        torch.bitwise_right_shift(pa, 32, out=x2)
        x2 ^= pa_old
        x2 &= _MASK32
        x2 ^= k1
        pb_old, pb, pa_old, pa = pb, pb_old, pa, pa_old
    pb_old &= _MASK32
    pa_old &= _MASK32
    return x0, pb_old, x2, pa_old


def _keys(seed):
    """Round keys ``(k0, k1)`` of every round: ints, or 0-d tensors for a tensor seed."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    keys = []
    for _ in range(N_ROUNDS):
        keys.append((k0, k1))
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return keys


def draw_dropout_seed() -> torch.Tensor:
    """A fresh 63-bit seed (0-d int64 CPU tensor) from torch's default CPU generator.

    Every dropout call draws exactly one seed this way, so ``torch.manual_seed`` makes
    dropout reproducible on every backend, and a test can reproduce the seed a call used
    by re-seeding and calling this function. It stays a tensor (no ``.item()``), so
    ``torch.compile(fullgraph=True)`` traces through dropout.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
