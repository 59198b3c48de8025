"""``crossattn-attention-map``: a text-token x audio-frame heat map of the text-to-audio
attention of a trained emotion model, for one utterance, as a PNG.

    crossattn-attention-map --checkpoint runs/seed000/checkpoint.pt --index 0 --output map.png
    crossattn-attention-map --checkpoint ... --text "I am so happy" --wav hello.wav --output map.png

``--index`` takes the utterance from the run's own data (test split of the synthetic corpus);
``--text`` + ``--wav`` take any utterance (16-bit PCM wav). Word boundaries are drawn on the
time axis from the corpus's word timings (``--index``) or from ``--words``: a JSON list of
``[word, start_s, end_s]`` (the synthetic corpus's format, e.g. from a forced aligner).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ._cli import ArgumentParser, existing_file, require_extra


def render(weights: torch.Tensor, tokens: list[str], seconds_per_frame: float, title: str, path, *,
           word_spans: list | None = None, offset: float = 0.0) -> None:
    """``weights [T, A]`` -> PNG: tokens on the y axis, time on the x axis.

    The colour is each weight divided by the uniform level ``1/A`` on a fixed log2 scale
    (x1/8 .. x8, white = uniform), so a near-uniform map looks white instead of showing noise
    as structure. ``word_spans`` (per token ``(start_s, end_s)`` or None, e.g. from
    :func:`crossattn.models.alignment.token_spans`) draws the word boundaries of the corpus on
    the time axis and outlines each token's own word; ``offset`` is the first frame's start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    T, A = weights.shape
    ratio = torch.log2((weights.double() * A).clamp(min=2.0 ** -8))
    fig, ax = plt.subplots(figsize=(min(16, 3 + A * 0.08), 1.5 + 0.35 * T))
    x0, x1 = offset, offset + A * seconds_per_frame
    im = ax.imshow(ratio.numpy(), aspect="auto", origin="upper", cmap="RdBu_r", vmin=-3, vmax=3,
                   interpolation="nearest", extent=(x0, x1, T - 0.5, -0.5))
    if word_spans is not None:
        bounds = sorted({t for s in word_spans if s is not None for t in s})
        for t in bounds:
            ax.axvline(t, color="0.3", lw=0.6, ls=":")
        for i, s in enumerate(word_spans):
            if s is not None:
                ax.add_patch(Rectangle((s[0], i - 0.5), s[1] - s[0], 1.0, fill=False, ec="green", lw=1.4))
    ax.set_xlim(x0, x1)
    ax.set_yticks(range(T))
    ax.set_yticklabels(tokens)
    ax.set_xlabel("audio time (s)" + ("; green box: the token's own word, dotted: word boundaries"
                                      if word_spans is not None else ""))
    ax.set_ylabel("text token")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(im, ax=ax, ticks=[-3, -2, -1, 0, 1, 2, 3])
    bar.ax.set_yticklabels(["x1/8", "x1/4", "x1/2", "x1 = uniform", "x2", "x4", "x8"])
    bar.set_label(f"weight / uniform (1/{A}), head mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_words(path) -> list:
    """``[[word, start_s, end_s], ...]`` from a JSON file; ValueError saying what is wrong."""
    try:
        words = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(words, list) or not words:
        got = "an empty list" if words == [] else f"a JSON {type(words).__name__}"
        raise ValueError(f"expected a non-empty JSON list of [word, start_s, end_s], got {got}")
    for i, w in enumerate(words):
        ok = (isinstance(w, list) and len(w) == 3 and isinstance(w[0], str)
              and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in w[1:]))
        if not ok or not 0 <= w[1] <= w[2]:
            raise ValueError(f"entry {i} must be [word, start_s, end_s] with 0 <= start_s <= end_s, got {w!r}")
    return words


def main(argv=None) -> int:
    p = ArgumentParser(prog="crossattn-attention-map", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a crossattn-train run (emotion model)")
    p.add_argument("--output", required=True, help="PNG path")
    p.add_argument("--index", type=int, help="utterance of the run's test (or validation) split")
    p.add_argument("--text")
    p.add_argument("--wav")
    p.add_argument("--words", help="JSON list of [word, start_s, end_s]: word boundaries to draw (default: the "
                                   "corpus's own timings with --index, where it has them)")
    args = p.parse_args(argv)
    if (args.index is None) == (args.text is None):
        p.error("give either --index, or --text with --wav")
    if args.text is not None and not args.wav:
        p.error("--text needs --wav")
    existing_file(p.prog, "--checkpoint", args.checkpoint)
    existing_file(p.prog, "--wav", args.wav)
    existing_file(p.prog, "--words", args.words)
    words = None
    if args.words:
        try:
            words = read_words(args.words)
        except ValueError as exc:
            p.error(f"--words {args.words}: {exc}")
    if not Path(args.output).resolve().parent.is_dir():
        p.error(f"--output {args.output}: its directory does not exist")
    require_extra(p.prog, "models")

    from crossattn.data import EmotionCollator, read_wav
    from crossattn.models import EMOTIONS
    from crossattn.models.alignment import frame_geometry, token_spans
    from crossattn.train import build_data, build_model, load_checkpoint

    state = load_checkpoint(args.checkpoint, p.prog)
    run = argparse.Namespace(**state["args"])
    if run.model != "emotion":
        p.error(f"the checkpoint holds a {run.model!r} model; heat maps need the emotion model")
    if run.fusion in ("concat", "audio_to_text"):
        p.error(f"the checkpoint's model (fusion={run.fusion!r}) has no text-to-audio attention")
    run.need_weights = "mean"
    run.no_progress = True
    model, tokenizer = build_model(run, state["num_outputs"], {"dims": None, "texts": []}, state.get("tokenizer"))
    model.load_state_dict(state["model"])
    model.eval()
    if args.index is not None:
        _, val, test, _, _ = build_data(run)
        split = test if test is not None else val
        if not 0 <= args.index < len(split):
            p.error(f"--index must be in [0, {len(split)}), got {args.index}")
        item = split[args.index]
        words = words or item.get("words")
    else:
        try:
            waveform = read_wav(args.wav, 16000)
        except Exception as exc:  # wave.Error, EOFError, ValueError: any unreadable file is one line
            p.error(f"--wav {args.wav}: cannot read it as a PCM wav ({type(exc).__name__}: {exc})")
        item = {"text": args.text, "waveform": waveform, "label": -1, "metadata": {}}
    text_input, audio_input, metadata, _ = EmotionCollator(tokenizer, max_seconds=run.max_seconds)([item])
    with torch.no_grad():
        out = model(text_input, audio_input, metadata)
    w = out["text_to_audio_attention"][0]
    frames = int(out["audio_mask"][0].sum())
    tokens = (tokenizer.tokens(item["text"]) if hasattr(tokenizer, "tokens")
              else tokenizer.convert_ids_to_tokens(text_input["input_ids"][0]))
    w = w[: len(tokens), :frames].float()
    geometry = frame_geometry(model.audio_encoder)
    if geometry is None:  # an encoder of unknown stride: spread the frames over the audio
        per_frame, offset = audio_input["attention_mask"][0].sum().item() / 16000 / max(frames, 1), 0.0
    else:  # the time axis starts at the left edge of frame 0's cell
        per_frame, offset = geometry[0], geometry[1] - geometry[0] / 2
    spans = token_spans(tokens, words) if words else None
    label = int(out["logits"].argmax(-1))
    pred = EMOTIONS[label] if state["num_outputs"] == len(EMOTIONS) else str(label)
    truth = EMOTIONS[item["label"]] if item.get("label", -1) >= 0 else "?"
    render(w, tokens, per_frame, f"\"{item['text']}\" — predicted {pred}, label {truth}", args.output,
           word_spans=spans, offset=offset)
    timed = "" if spans is None else f"; {sum(s is not None for s in spans)} tokens placed on their words"
    print(f"predicted {pred} (label {truth}); wrote {Path(args.output)} ({len(tokens)} tokens x {frames} frames"
          f"{timed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
