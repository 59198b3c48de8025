"""Quick demo on whatever device exists: bidirectional text<->audio cross-attention that
returns its weights, checked against the float64 reference, timed against the eager
implementation of the seed model, and read out as Whisper-style token timestamps; then word
timestamps from the top-k statistics on the synthetic spoken corpus, checked against its known
word timings (``crossattn.demo_timestamps``; needs numpy, ``crossattn[models]``).

    python -m crossattn.demo [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--plot PNG]
                             [--timestamp-steps N] [--corpus-dir DIR]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import crossattn
from crossattn._cli import ArgumentParser, check_device, require_extra
from crossattn.bench.impls import eager_core
from crossattn.bench.measure import median_ms
from crossattn.reference import bidirectional_reference


def aligned_inputs(B, H, T, A, D, *, device, dtype, seed=0):
    """Text tokens and audio frames sharing a monotonic alignment (token i spans a run of
    frames), as speech does; the padding is ragged."""
    g = torch.Generator().manual_seed(seed)
    # Sinusoidal positions over normalised time: nearby times have similar codes.
    freqs = torch.exp(torch.linspace(0, math.log(64.0), D // 2))
    t_text = (torch.arange(T) + 0.5) / T
    t_audio = (torch.arange(A) + 0.5) / A

    def code(t):
        ang = t[:, None] * freqs[None, :] * math.pi
        return torch.cat([ang.sin(), ang.cos()], -1) * 2.5

    def noisy(base, L):
        return (base.expand(B, H, L, -1) + 0.3 * torch.randn(B, H, L, base.shape[-1], generator=g))

    q_x, k_x, v_x = noisy(code(t_text), T), noisy(code(t_text), T), torch.randn(B, H, T, D, generator=g)
    q_y, k_y, v_y = noisy(code(t_audio), A), noisy(code(t_audio), A), torch.randn(B, H, A, D, generator=g)
    text_len = torch.randint(T // 2, T + 1, (B,), generator=g)
    audio_len = (text_len * A + T - 1) // T  # the audio covering the real tokens
    text_pad = torch.arange(T)[None] >= text_len[:, None]
    audio_pad = torch.arange(A)[None] >= audio_len[:, None]
    tensors = [t.to(device=device, dtype=dtype) for t in (q_x, k_x, v_x, q_y, k_y, v_y)]
    return tensors, text_pad.to(device), audio_pad.to(device)


def eager_bidirectional(q_x, k_x, v_x, q_y, k_y, v_y, text_pad, audio_pad):
    """What seed 000's module computes, both ways (the benchmark's eager core)."""
    out_x, w_xy = eager_core(q_x, k_y, v_y, audio_pad, 0.0, False)
    out_y, w_yx = eager_core(q_y, k_x, v_x, text_pad, 0.0, False)
    return out_x, out_y, w_xy.mean(1), w_yx.mean(1)


def main(argv=None, prog: str = "python -m crossattn.demo") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--plot", default=None, help="write a text x audio heat map PNG here (needs matplotlib)")
    parser.add_argument("--timestamp-steps", type=int, default=80,
                        help="training steps of the word aligner (0: untrained; -1: skip word timestamps)")
    parser.add_argument("--corpus-dir", default=None,
                        help="where the synthetic corpus is generated (default: its cache directory)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.timestamp_steps < -1:
        parser.error(f"--timestamp-steps must be -1 (skip), 0 (untrained) or more, got {args.timestamp_steps}")
    if args.plot:
        require_extra(parser.prog, "bench", ("matplotlib",))
        if not Path(args.plot).resolve().parent.is_dir():
            parser.error(f"--plot {args.plot}: its directory does not exist")

    device = check_device(parser.prog, args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    # The seed workload on a GPU (B=4, T=512, A=1000, E=768, H=8); a CPU-sized one otherwise.
    B, H, T, A, D = (4, 8, 512, 1000, 96) if on_gpu else (2, 8, 64, 400, 96)
    repeats = args.repeats or (50 if on_gpu else 5)
    name = (torch.cuda.get_device_name(device) if on_gpu
            else "CPU" if torch.cuda.is_available() else "CPU (no GPU found)")
    print(f"crossattn {crossattn.__version__} | torch {torch.__version__} | device: {name}")
    for backend, why in crossattn.available_backends().items():
        print(f"  backend {backend:6s}: {'available' if why is None else 'unavailable - ' + why}")

    (q_x, k_x, v_x, q_y, k_y, v_y), text_pad, audio_pad = aligned_inputs(
        B, H, T, A, D, device=device, dtype=dtype)
    chosen = crossattn.choose_backend(q_x, k_y, v_y, key_padding_mask=audio_pad).name
    print(f"workload: B={B} H={H} text T={T} audio A={A} head dim {D} {str(dtype)[6:]} "
          f"(E={H * D}); backend 'auto' -> {chosen}")

    def fused():
        return crossattn.bidirectional_cross_attention(
            q_x, k_x, v_x, q_y, k_y, v_y, x_padding_mask=text_pad, y_padding_mask=audio_pad,
            need_weights="mean")

    res = fused()
    ref = bidirectional_reference(
        *(t.double().cpu() for t in (q_x, k_x, v_x, q_y, k_y, v_y)),
        x_padding_mask=text_pad.cpu(), y_padding_mask=audio_pad.cpu(), need_weights="mean")
    errors = {
        n: ((getattr(res, n).double().cpu() - getattr(ref, n)).abs().max().item())
        for n in res._fields
    }
    print("max |crossattn - float64 reference|: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))

    with torch.no_grad():
        t_fused = median_ms(lambda i: fused(), device, 1, repeats)
        t_eager = median_ms(lambda i: eager_bidirectional(q_x, k_x, v_x, q_y, k_y, v_y, text_pad, audio_pad),
                            device, 1, repeats)
    print(f"\n{'implementation':40s} {'median ms':>10s} {'vs eager':>9s}")
    print(f"{'eager (seed 000 module math)':40s} {t_eager:10.2f} {1.0:8.2f}x")
    print(f"{'crossattn bidirectional, weights mean':40s} {t_fused:10.2f} {t_eager / t_fused:8.2f}x")
    print("(forward only, no grad; the benchmark suite has the full comparison)")

    # Whisper-style timestamps: the audio frame each text token attends to most (head average).
    w = res.weights_xy[0].float().cpu()
    n_text = int((~text_pad[0]).sum())
    peaks = w[:n_text].argmax(-1)
    monotone = bool((peaks[1:] >= peaks[:-1] - 2).all())
    shown = ", ".join(f"t{i}->f{int(p)}" for i, p in list(enumerate(peaks.tolist()))[:: max(1, n_text // 8)])
    print(f"\ntoken -> peak audio frame (batch 0, {n_text} tokens): {shown}; monotone: {monotone}")

    ok = all(e < (1e-3 if dtype == torch.float32 else 5e-2) for e in errors.values())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_audio = int((~audio_pad[0]).sum())
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.imshow(w[:n_text, :n_audio], aspect="auto", origin="lower", cmap="magma")
        ax.set_xlabel("audio frame")
        ax.set_ylabel("text token")
        ax.set_title("text -> audio attention (head average, from the fused call)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if args.timestamp_steps >= 0:
        try:
            import numpy  # noqa: F401  (the corpus synthesises with it)
        except ImportError:
            print("\nword timestamps on the synthetic corpus skipped: they need numpy "
                  "(pip install 'crossattn[models]')")
        else:
            from crossattn import demo_timestamps

            demo_timestamps.run(args.corpus_dir, steps=args.timestamp_steps)
    verdict = "agrees with" if ok else "DOES NOT agree with"
    where = f"; heat map written to {args.plot}" if args.plot else ""
    print(f"\nresult: crossattn {verdict} the float64 reference (max error {max(errors.values()):.1e}){where}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
