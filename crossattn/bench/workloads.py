"""Benchmark workloads: the seeds' layers and single-direction attention cores."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# What each kind of workload runs; the report prints it so a row says what it measures.
KINDS = {
    "layer": "seed 000's bidirectional text<->audio layer: six projections, attention both ways, "
             "residual + one shared LayerNorm, dropout 0.1 on the weights in training",
    "layer1": "seed 001's one-direction CrossModalAttention: text queries attend to image patches, "
              "q/k/v and output projections, dropout 0.1 on the weights in training",
    "core": "the attention alone on q [B, H, T, D], k/v [B, H, A, D]",
    "stats": "the attention on q [B, H, T, D], k/v [B, H, A, D] and statistics of its weights: each "
             "query's entropy, each key's received mass, each query's top-4 weights (`eager`: softmax "
             "weights, then the statistics from them)",
}


@dataclass(frozen=True)
class Workload:
    """``T`` query-side (text) length, ``A`` key-side (audio / image) length, ``E`` model width."""

    name: str
    B: int
    T: int
    A: int
    E: int
    H: int
    kind: str = "layer"
    ragged: bool = False  # padding with lengths drawn from 30-100 %
    group: str = ""  # plots draw one line per implementation within a group (the sweep)
    # Key (audio) lengths as fractions of A, one per example: ragged keys, every query valid.
    kv_fractions: tuple = ()

    @property
    def D(self) -> int:
        return self.E // self.H

    @property
    def directions(self) -> int:
        return 2 if self.kind == "layer" else 1

    def attention_flops(self) -> float:
        """Forward FLOPs of the attention matmuls (QK^T and PV), both directions for layers."""
        return 4.0 * self.B * self.H * self.T * self.A * self.D * self.directions

    def describe(self) -> dict:
        return dict(asdict(self), D=self.D)

    def kv_lengths(self) -> list[int]:
        return [max(1, round(f * self.A)) for f in self.kv_fractions]

    def title(self) -> str:
        pad = ", ragged padding (lengths 30-100 %)" if self.ragged else ""
        if self.kv_fractions:
            lengths = self.kv_lengths()
            pad += (f", ragged keys: lengths {min(lengths)}..{max(lengths)} of A (mean "
                    f"{sum(lengths) / len(lengths) / self.A:.0%}), every query valid")
        return f"B={self.B} T={self.T} A={self.A} E={self.E} H={self.H} D={self.D}{pad}; {KINDS[self.kind]}"


@dataclass
class Inputs:
    """One set of inputs for a workload (several sets rotate between timed runs)."""

    text: torch.Tensor  # [B, T, E] (layers) or q [B, H, T, D] (core)
    audio: torch.Tensor  # [B, A, E] (layers) or k [B, H, A, D] (core)
    value: torch.Tensor | None = None  # v for cores
    text_mask: torch.Tensor | None = None  # HF style, 1 = real
    audio_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.text, self.audio, self.value) if t is not None]


def make_inputs(w: Workload, device, dtype, seed: int = 0, requires_grad: bool = False) -> Inputs:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    if w.kind in ("layer", "layer1"):
        inputs = Inputs(randn(w.B, w.T, w.E), randn(w.B, w.A, w.E))
    else:
        inputs = Inputs(randn(w.B, w.H, w.T, w.D), randn(w.B, w.H, w.A, w.D), randn(w.B, w.H, w.A, w.D))
    if w.ragged:
        def mask(L):
            lengths = torch.randint(max(1, math.ceil(0.3 * L)), L + 1, (w.B,), generator=g)
            lengths[0] = L  # the longest sequence sets the padded length
            return (torch.arange(L)[None, :] < lengths[:, None]).long().to(device)

        inputs.text_mask, inputs.audio_mask = mask(w.T), mask(w.A)
    if w.kv_fractions:
        if len(w.kv_fractions) != w.B:
            raise ValueError(f"workload {w.name}: kv_fractions has {len(w.kv_fractions)} entries for B = {w.B}")
        lengths = torch.tensor(w.kv_lengths())
        inputs.audio_mask = (torch.arange(w.A)[None, :] < lengths[:, None]).long().to(device)
    return inputs


def gpu_workloads() -> list[Workload]:
    sweep = [Workload(f"audio_sweep_{a}", 4, 128, a, 768, 8, group="audio_sweep")
             for a in (250, 500, 1000, 2000, 4000, 8000, 16000)]
    return [
        Workload("seed000", 4, 512, 1000, 768, 8),
        Workload("seed001", 4, 20, 196, 256, 8, kind="layer1"),
        Workload("short_inference", 1, 32, 300, 768, 8),
        Workload("long_audio", 2, 128, 16000, 768, 8),
        Workload("compute_bound", 2, 8192, 8192, 2048, 16, kind="core"),
        Workload("ragged", 4, 512, 1000, 768, 8, ragged=True),
        *sweep,
    ]


def quick_workloads() -> list[Workload]:
    """CPU-sized: the whole quick run stays around two minutes on two cores."""
    sweep = [Workload(f"audio_sweep_{a}", 2, 32, a, 256, 4, group="audio_sweep") for a in (100, 200, 400, 800)]
    return [
        Workload("seed000_small", 2, 64, 400, 256, 4),
        Workload("seed001", 4, 20, 196, 256, 8, kind="layer1"),
        Workload("short_inference_small", 1, 32, 300, 256, 4),
        Workload("ragged_small", 2, 64, 400, 256, 4, ragged=True),
        Workload("core_small", 1, 256, 256, 256, 4, kind="core"),
        *sweep,
    ]


def cpu_workloads() -> list[Workload]:
    """Where the CPU path stands (issue 20): the seed layer at B=2, T=256, A=1000 and the seed's
    full shape B=4, T=512, A=1000 (run with ``--dtype bfloat16`` too)."""
    return [
        Workload("seed000_B2_T256", 2, 256, 1000, 768, 8),
        Workload("seed000", 4, 512, 1000, 768, 8),
    ]


def stats_workloads() -> list[Workload]:
    """Weight statistics (issue 17): the seed shape and long audio (A = 16 000 and 100 000), the
    statistics fused against full weights and against eager; CPU-sized query lengths."""
    return [
        Workload("stats_seed000", 4, 512, 1000, 768, 8, kind="stats"),
        Workload("stats_long_16000", 1, 64, 16000, 768, 8, kind="stats"),
        Workload("stats_long_100000", 1, 64, 100000, 768, 8, kind="stats"),
    ]


def ragged_workloads() -> list[Workload]:
    """Ragged key lengths (issue 16), 10 % to 100 % of A evenly spread over the batch: the padded
    call against the same batch at full length and packed (each example at its real length)."""
    fractions = tuple(round(0.1 + 0.9 * i / 7, 4) for i in range(8))
    return [
        Workload("ragged_keys", 8, 128, 2000, 768, 8, kind="core", kv_fractions=fractions),
        Workload("ragged_keys_long", 8, 64, 16000, 768, 8, kind="core", kv_fractions=fractions),
    ]


SUITES = {"quick": quick_workloads, "cpu": cpu_workloads, "gpu": gpu_workloads, "stats": stats_workloads,
          "ragged": ragged_workloads}
