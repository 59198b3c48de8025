"""Block pruning configuration: which key blocks each query block may attend to."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BlockPruning"]

_DEFAULT_BLOCK = 64


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, eq=False)
class BlockPruning:
    """Prune whole key blocks per (batch, head, query block).

    Exactly one selection rule is given:

    * ``top_k``: keep the ``top_k`` best key blocks;
    * ``keep``: keep the best ``ceil(keep * valid_key_blocks)`` key blocks (0 < keep <= 1);
    * ``mass``: keep the fewest best blocks whose softmax(block scores) mass reaches ``mass``
      (0 < mass <= 1; a mass within 1e-6 of it has reached it, so rounding of equal block
      scores never keeps one block more; ``mass=1`` keeps every valid block);
    * ``block_mask``: a fixed bool tensor ``[B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k)]``,
      True = keep. It replaces the data-dependent selection.

    Block scores are ``Sb = mean_q . mean_k * scale / temperature``, where ``mean_q`` is the mean
    of the valid queries of a query block and ``mean_k`` the mean of the valid keys of a key
    block. Key blocks without a valid key are never kept; a data-dependent rule keeps at least
    ``min_blocks`` blocks (or all valid ones, if fewer). Ties go to the lower block index.
    Attention is then exact over the kept keys and renormalised; pruned weights are 0.

    Args:
        block_q, block_k: block sizes, powers of two from 16 to 256.
    """

    block_q: int = _DEFAULT_BLOCK
    block_k: int = _DEFAULT_BLOCK
    keep: float | None = None
    top_k: int | None = None
    mass: float | None = None
    min_blocks: int = 1
    block_mask: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"BlockPruning: {name} must be an int, got {type(value).__name__}")
            if value < 16 or value > 256 or value & (value - 1):
                raise ValueError(
                    f"BlockPruning: {name} must be a power of two from 16 to 256, got {value}"
                )
        rules = {
            name: getattr(self, name)
            for name in ("keep", "top_k", "mass", "block_mask")
            if getattr(self, name) is not None
        }
        if len(rules) != 1:
            given = ", ".join(rules) if rules else "none"
            raise ValueError(
                "BlockPruning: give exactly one of keep, top_k, mass or block_mask; "
                f"got {given}"
            )
        if self.keep is not None:
            if not _is_real(self.keep):
                raise TypeError(f"BlockPruning: keep must be a float, got {type(self.keep).__name__}")
            if not (0.0 < self.keep <= 1.0):
                raise ValueError(f"BlockPruning: keep must be in (0, 1], got {self.keep}")
        if self.top_k is not None:
            if not _is_int(self.top_k):
                raise TypeError(f"BlockPruning: top_k must be an int, got {type(self.top_k).__name__}")
            if self.top_k < 1:
                raise ValueError(f"BlockPruning: top_k must be >= 1, got {self.top_k}")
        if self.mass is not None:
            if not _is_real(self.mass):
                raise TypeError(f"BlockPruning: mass must be a float, got {type(self.mass).__name__}")
            if not (0.0 < self.mass <= 1.0):
                raise ValueError(f"BlockPruning: mass must be in (0, 1], got {self.mass}")
        if not _is_int(self.min_blocks):
            raise TypeError(
                f"BlockPruning: min_blocks must be an int, got {type(self.min_blocks).__name__}"
            )
        if self.min_blocks < 1:
            raise ValueError(f"BlockPruning: min_blocks must be >= 1, got {self.min_blocks}")
        if self.block_mask is not None:
            mask = self.block_mask
            if not isinstance(mask, torch.Tensor):
                raise TypeError(
                    f"BlockPruning: block_mask must be a bool tensor, got {type(mask).__name__}"
                )
            if mask.dtype != torch.bool:
                raise TypeError(
                    f"BlockPruning: block_mask must have dtype torch.bool (True = keep), got {mask.dtype}"
                )
            if mask.dim() != 4:
                raise ValueError(
                    "BlockPruning: block_mask must be 4-D [B|1, H|1, ceil(Lq/block_q), "
                    f"ceil(Lk/block_k)], got shape {tuple(mask.shape)}"
                )
            if self.min_blocks != 1:
                raise ValueError(
                    "BlockPruning: min_blocks applies to data-dependent selection only; "
                    f"it cannot be combined with block_mask (got min_blocks={self.min_blocks})"
                )

    @property
    def is_fixed(self) -> bool:
        return self.block_mask is not None

    def num_blocks(self, lq: int, lk: int) -> tuple[int, int]:
        """(query blocks, key blocks) for sequence lengths ``lq`` and ``lk``."""
        return math.ceil(lq / self.block_q), math.ceil(lk / self.block_k)

    def __repr__(self) -> str:
        rule = next(
            f"{n}={getattr(self, n)!r}" for n in ("keep", "top_k", "mass") if getattr(self, n) is not None
        ) if self.block_mask is None else f"block_mask=<{tuple(self.block_mask.shape)}>"
        extra = f", min_blocks={self.min_blocks}" if self.min_blocks != 1 else ""
        return f"BlockPruning(block_q={self.block_q}, block_k={self.block_k}, {rule}{extra})"
