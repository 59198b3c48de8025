"""Launch configs of the Triton passes: the surveyed defaults and opt-in autotuning.

A *pass* is the forward (forward kernel, split-K combine, weights) or the backward (delta,
dK/dV, dQ); each uses one tile for all its kernels. Every config here comes from the compile
survey (tests/_kernel_compile.py, table in benchmarks/README.md): ptxas's report for every launch
a pass makes, every option on and off, sm_80/86/89/90.

Autotuning (``CROSSATTN_AUTOTUNE=1``, CUDA only) times the candidates of a pass on the first
call of each key (pass, dtype, head-dim class, length buckets, options, device) with
``triton.testing.do_bench`` and keeps the fastest, in memory and in a JSON file
(``CROSSATTN_AUTOTUNE_CACHE``, default ``~/.cache/crossattn/autotune.json``) that later processes
read instead of timing again. Candidates are pruned by the device's shared memory and register
file before anything launches; one that still fails to load (``OutOfResources``) is dropped.
It is opt-in because timing waits for the GPU (a host sync, and no CUDA-graph capture of that
first call); under ``torch.compile`` tracing, during stream capture and under the Triton
interpreter the cached choice or the default is used, never a new timing.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def maxnreg(self) -> int:
        """All the registers a block of this size may have (64 K per SM, 255 per thread at most).
        Given explicitly because otherwise ptxas caps itself for occupancy (168 registers at 4
        warps, 128 at 8 on sm_86) and spills there: a spill costs more than the lost block."""
        return min(255, 65536 // (32 * self.num_warps))

    def capped(self, block_m: int | None = None, block_n: int | None = None) -> Config:
        return Config(min(self.block_m, block_m or self.block_m), min(self.block_n, block_n or self.block_n),
                      self.num_warps, self.num_stages)


# (block_m, block_n, num_warps, num_stages) by pass, element size and head-dim class. The first
# of each list is the default: the largest tile with which every kernel of the pass compiles
# without spills (tests/_kernel_compile.py --full: sm_80/86/89/90, every option on and off,
# Triton 3.9 and 3.6). The others are the autotuner's alternatives, spill-free in the same
# survey (``--candidates``, sm_86/90, fp16/fp32, D = 64/128; 32 x 32 backward, 16 x 32 backward
# past D = 64 and 32 x 64 forward with a running top-k spilled and were dropped); all fit 99 KB of shared memory per
# block (RTX 3060/4080 class). The backward's 64 x 64 spilled 2.3 KB per thread, 32 x 32 still
# 60 B; one pipeline stage, and 16 x 16 past D = 64, because the dK/dV kernel with the
# statistics' gradients spilled 4-20 B at 16 x 32 (Triton 3.6, sm_80/90) and with two stages.
# fp32 multiplies in full precision (FMA "ieee" dots, no tensor cores) with its
# operands in registers: only 16-row tiles fit, and its backward streams the operands of q.k and
# dO.v from memory (xattn.py ``_streamed``), as does every backward past D = 128. A forward with
# a running top-k (return_aux, int64 keys) takes at most TOPK_BLOCK_M rows: 64 spilled 1.3 KB,
# 32 24 B at D = 96/128 on sm_90 under Triton 3.6.
TOPK_BLOCK_M = 16
SPACE: dict[tuple[str, int], dict[int, list[tuple[int, int, int, int]]]] = {
    ("fwd", 2): {64: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
                 128: [(32, 32, 4, 2), (64, 32, 8, 2)],
                 256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    ("fwd", 4): {64: [(16, 16, 4, 1), (16, 32, 4, 1)], 128: [(16, 16, 8, 1), (16, 16, 4, 1)],
                 256: [(16, 16, 8, 1)]},
    ("bwd", 2): {64: [(16, 32, 4, 1), (16, 32, 4, 2)], 128: [(16, 16, 4, 1)],
                 256: [(16, 16, 4, 1)]},
    ("bwd", 4): {64: [(16, 16, 8, 1), (16, 16, 4, 1)], 128: [(16, 16, 8, 1)], 256: [(16, 16, 8, 1)]},
}
INTERPRETER_CONFIG = Config(32, 32, 1, 1)


def _table(kind: str, dtype: torch.dtype, d: int, dv: int) -> list[tuple[int, int, int, int]]:
    table = SPACE[(kind, 4 if dtype.itemsize == 4 else 2)]
    return table[next(c for c in sorted(table) if max(d, dv) <= c)]


def default_config(d: int, dv: int, dtype: torch.dtype, kind: str, top_k: int = 0) -> Config:
    """The surveyed config of a pass ("fwd": forward, combine, weights; "bwd": backward)."""
    if interpreting():
        return INTERPRETER_CONFIG
    cfg = Config(*_table(kind, dtype, d, dv)[0])
    return cfg.capped(block_m=TOPK_BLOCK_M) if top_k else cfg


# ------------------------------------------------------------------------------ pruning
@dataclass(frozen=True)
class DeviceLimits:
    """What a block may use on a device: shared memory per block (opt-in maximum) and the
    register file per SM."""
    shared_per_block: int
    regs_per_sm: int = 65536

    @staticmethod
    def of(device: torch.device) -> DeviceLimits:
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
        return DeviceLimits(int(smem), int(getattr(props, "regs_per_multiprocessor", 0) or 65536))


def shared_estimate(cfg: Config, kind: str, block_d: int, block_dv: int, itemsize: int) -> int:
    """Shared memory a pass's largest kernel needs, from the tiles its dots stage (an upper
    estimate checked against ptxas in tests/test_kernels_compile.py): the forward's K and V tiles per
    pipeline stage and the Q tile; the backward's Q, dO (per stage) and K, V tiles, plus the
    [BLOCK_M, BLOCK_N] probabilities transposed through shared memory."""
    m, n, st = cfg.block_m, cfg.block_n, max(cfg.num_stages, 1)
    if kind == "fwd":
        elems = st * n * (block_d + block_dv) + m * block_d
    else:
        elems = st * m * (block_d + block_dv) + n * (block_d + block_dv) + 2 * m * n
    return elems * max(itemsize, 2) + 4 * m * n


def candidates(kind: str, d: int, dv: int, dtype: torch.dtype, top_k: int = 0,
               limits: DeviceLimits | None = None) -> list[Config]:
    """The configs autotuning times for a pass, default first, each fitting ``limits``:
    shared memory per block, and a block's registers (``maxnreg`` x threads) within the SM's
    register file. One config under the interpreter."""
    if interpreting():
        return [INTERPRETER_CONFIG]
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    out: list[Config] = []
    for entry in _table(kind, dtype, d, dv):
        cfg = Config(*entry)
        cfg = cfg.capped(block_m=TOPK_BLOCK_M) if top_k else cfg
        if cfg in out:
            continue
        if limits is not None and out:  # the default is kept whatever the estimate says
            if shared_estimate(cfg, kind, bd, bdv, dtype.itemsize) > limits.shared_per_block:
                continue
            if cfg.maxnreg * 32 * cfg.num_warps > limits.regs_per_sm:
                continue
        out.append(cfg)
    return out


# ----------------------------------------------------------------------------- autotuning
def enabled(device: torch.device) -> bool:
    return (os.environ.get("CROSSATTN_AUTOTUNE", "0") == "1" and not interpreting()
            and device.type == "cuda")


def bucket(length: int) -> int:
    """Length bucket of a key: the next power of two, at least 64, at most 2**16."""
    return min(max(64, triton.next_power_of_2(max(length, 1))), 1 << 16)


def _cache_path() -> Path:
    given = os.environ.get("CROSSATTN_AUTOTUNE_CACHE")
    return Path(given) if given else Path.home() / ".cache" / "crossattn" / "autotune.json"


_lock = threading.Lock()
_memory: dict[str, tuple[int, int, int, int]] = {}
_loaded_from: Path | None = None


def _load(path: Path) -> None:
    global _loaded_from
    if _loaded_from == path:
        return
    _memory.clear()
    try:
        data = json.loads(path.read_text())
        _memory.update({k: tuple(v) for k, v in data.get("configs", {}).items()})
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or unreadable: time again
    _loaded_from = path


def _store(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "configs": _memory}, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home: the choice still lives in memory


def _device_tag(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{props.name}|sm_{props.major}{props.minor}|triton {triton.__version__}"


def make_key(kind: str, device: torch.device, dtype: torch.dtype, d: int, dv: int, lq: int, lk: int,
             options: Sequence) -> str:
    return "|".join(map(str, (kind, _device_tag(device), str(dtype).removeprefix("torch."), d, dv, bucket(lq),
                              bucket(lk), *options)))


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a CPU-only torch
        return False


def _time(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40))


def pick(key: Callable[[], str], options: list[Config], run: Callable[[Config], object],
         timer: Callable[[Callable[[], object]], float] | None = None) -> Config:
    """The config to launch with (autotuning on): the cached choice for ``key()`` or, on a
    first call outside tracing and stream capture, the fastest of ``options`` timed with
    ``run(config)``; ``options[0]`` (the default) when there is nothing to choose."""
    if len(options) < 2:
        return options[0]
    path = _cache_path()
    k = key()
    with _lock:
        _load(path)
        hit = _memory.get(k)
    if hit is not None:
        cfg = Config(*hit)
        return cfg if cfg in options else options[0]
    if torch.compiler.is_compiling() or _capturing():
        return options[0]
    timer = timer or _time  # looked up at call time (tests replace it)
    best, best_t = options[0], float("inf")
    for cfg in options:
        try:
            t = timer(lambda cfg=cfg: run(cfg))
        except triton.runtime.errors.OutOfResources:
            continue  # the estimate let it through; the driver did not
        if t < best_t:
            best, best_t = cfg, t
    with _lock:
        _load(path)  # another process may have written meanwhile
        _memory[k] = (best.block_m, best.block_n, best.num_warps, best.num_stages)
        _store(path)
    return best
