"""Whisper token timestamps: transformers' eager path against crossattn's, on long audio features.

    python benchmarks/whisper_timestamps.py                      # CPU-sized default
    python benchmarks/whisper_timestamps.py --device cuda --frames 8000 --d-model 384 --layers 4 --heads 6

A random Whisper (built from a config: nothing downloads) whose window holds ``--frames``
encoder frames (Whisper's own is 1500 = 30 s; more frames stand in for long audio in one
window) generates ``--tokens`` tokens for a batch of features, with token timestamps:
* ``transformers eager``: ``generate(return_token_timestamps=True)``: transformers switches the
  model to eager attention, records every head of every layer at every step, and aligns with
  its Python DTW;
* ``crossattn weights``: ``crossattn.integrations.whisper.generate`` on a model under
  ``attn_implementation="crossattn"``: generation on the kernels, then one teacher-forced pass
  materialising only the alignment heads' weights (``weight_heads``), vectorised DTW;
* ``crossattn top-k``: the same from the alignment heads' top-k statistics (no weight matrix).

Median and IQR of ``torch.utils.benchmark.Timer.blocked_autorange``; the table also says
whether each path's timestamps equal transformers' (top-k is an approximation: it may not).
Timings measured on a shared or loaded machine are not results.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.utils.benchmark as tbench
import transformers

import crossattn.integrations.transformers as ca_hf
import crossattn.integrations.whisper as cw


def build(args, dtype):
    config = transformers.WhisperConfig(
        vocab_size=512, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
        encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model, num_mel_bins=80,
        max_source_positions=args.frames, max_target_positions=max(448, args.tokens + 8), pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
        suppress_tokens=None)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).to(args.device, dtype).eval()
    # Alignment heads in the upper half of the decoder, as the released checkpoints have them.
    model.generation_config.alignment_heads = [[layer, head] for layer in range(args.layers // 2, args.layers)
                                               for head in (0, args.heads - 1)]
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=3000, help="encoder frames in the window (long audio)")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per item")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per blocked_autorange")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    transformers.logging.set_verbosity_error()

    ours = build(args, dtype)
    ours.set_attn_implementation(ca_hf.register())
    eager = copy.deepcopy(ours)
    eager.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 80, 2 * args.frames, generator=g).to(args.device, dtype)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

    paths = {
        "transformers eager": lambda: eager.generate(x, return_token_timestamps=True, **gen),
        "crossattn weights": lambda: cw.generate(ours, x, **gen),
        f"crossattn top-{args.top_k}": lambda: cw.generate(ours, x, top_k=args.top_k, **gen),
    }
    with torch.no_grad():
        reference = paths["transformers eager"]()
        rows = []
        for name, fn in paths.items():
            got = fn()
            same = (torch.equal(got["sequences"].cpu(), reference["sequences"].cpu())
                    and torch.equal(got["token_timestamps"].cpu(), reference["token_timestamps"].cpu()))
            m = tbench.Timer("fn()", globals={"fn": fn}, label="whisper timestamps",
                             sub_label=name).blocked_autorange(min_run_time=args.min_run_time)
            rows.append((name, m.median, m.iqr, len(m.times), same))

    print(f"device={args.device} dtype={args.dtype} batch={args.batch} frames={args.frames} "
          f"tokens={args.tokens} d_model={args.d_model} layers={args.layers} heads={args.heads} "
          f"alignment_heads={len(ours.generation_config.alignment_heads)}")
    base = rows[0][1]
    print(f"{'path':<22}{'median ms':>11}{'IQR ms':>9}{'runs':>6}{'speedup':>9}  same timestamps")
    for name, median, iqr, runs, same in rows:
        print(f"{name:<22}{median * 1e3:>11.1f}{iqr * 1e3:>9.1f}{runs:>6}{base / median:>8.2f}x  {same}")


if __name__ == "__main__":
    main()
