"""``crossattn-train``: train the reference models (CPU at tiny scale, or under torchrun/DDP).

    crossattn-train --output runs/seed000                       # seed 000 model, synthetic corpus
    crossattn-train --model early --epochs 5 --output runs/early  # a fusion baseline
    crossattn-train --data mmsa --pickle mosi.pkl --model hctdmg --target acc7 --output runs/hct
    crossattn-train --data meld --meld-root MELD.Raw --output runs/meld   # MELD's train/dev/test
    crossattn-train --config run.json --resume                   # flags in JSON; continue a run
    torchrun --nproc-per-node 2 -m crossattn.train --output runs/ddp

Each epoch ends with an evaluation (accuracy, weighted F1, confusion matrix; for regression
MMSA's metrics: Has0/Non0 acc-2 and F1, acc-5, acc-7, MAE, correlation; for IEMOCAP's four
emotions MulT's per-emotion accuracy and F1) appended to ``metrics.jsonl``. ``checkpoint.pt`` is rewritten
atomically at every epoch end and every ``--save-every`` steps; ``--resume`` continues from
it at the exact batch (the epoch's order is a function of the seed and the epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._cli import ArgumentParser, check_device, existing_file, fail, require_extra

MODELS = ("emotion", "hctdmg", "late", "early", "attention")
# crossattn.data.mmsa.TARGETS, spelt out so that --help works without numpy (a test keeps them equal)
TARGETS = ("regression", "acc2", "acc2_has0", "acc7", "classification", "emotions")


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="crossattn-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of option values (flag names with _ for -); flags given "
                                    "on the command line win")
    p.add_argument("--output", required=False, help="run directory (checkpoint, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("synthetic", "meld", "mmsa"), default="synthetic")
    d.add_argument("--data-dir", help="synthetic corpus cache (default $CROSSATTN_DATA_DIR or ~/.cache/crossattn)")
    d.add_argument("--per-class", type=int, default=40, help="synthetic utterances per emotion")
    d.add_argument("--incongruent-fraction", type=float, default=0.2)
    d.add_argument("--engine", choices=("auto", "espeak", "builtin"), default="auto")
    d.add_argument("--meld-root", help="extracted MELD.Raw: {train,dev,test}_sent_emo.csv, each split with its "
                                       "own folder of diaX_uttY.wav clips")
    d.add_argument("--meld-csv", help="MELD train CSV (instead of --meld-root)")
    d.add_argument("--meld-audio", help="directory of the train CSV's diaX_uttY.wav files")
    d.add_argument("--meld-valid-csv", help="MELD dev CSV (default: 15%% of the train CSV)")
    d.add_argument("--meld-valid-audio", help="the dev CSV's own clip folder (MELD reuses names across splits)")
    d.add_argument("--pickle", help="MulT/MMSA aligned pickle")
    d.add_argument("--target", choices=TARGETS,
                   help="what to predict. mmsa: regression (MMSA metrics), acc2 (score > 0, zeros left out), "
                        "acc2_has0 (score >= 0), acc7 (default), classification (the pickle's "
                        "classification_labels), emotions (MulT IEMOCAP's four one-vs-rest labels); "
                        "synthetic and meld: classification (the emotion classes; the only one)")
    d.add_argument("--max-seconds", type=float, default=8.0, help="crop audio to this length")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=MODELS, default="emotion")
    m.add_argument("--fusion", choices=("bidirectional", "text_to_audio", "audio_to_text", "concat"),
                   default="bidirectional", help="emotion model: how text and audio interact")
    m.add_argument("--text-encoder", default="tiny", help="tiny | minilm | local path / cached HF name")
    m.add_argument("--audio-encoder", default="logmel", help="logmel | wav2vec2-tiny | local path / cached HF name")
    m.add_argument("--d-model", type=int, default=64)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--need-weights", choices=("mean", "full", "none"), default="mean")
    m.add_argument("--learnable-temperature", action="store_true")
    m.add_argument("--prune-keep", type=float, help="block pruning keep ratio (BlockPruning(keep=...))")
    m.add_argument("--diversity-weight", type=float, default=0.0, help="weight of the attention diversity loss")
    m.add_argument("--alignment-weight", type=float, default=0.0, help="weight of the text-audio alignment loss")
    m.add_argument("--backend", default="auto")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total")
    t.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            config = json.loads(Path(pre.config).read_text())
        except OSError as exc:
            parser.error(f"--config {pre.config}: {exc.strerror.lower()}")
        except ValueError as exc:
            parser.error(f"--config {pre.config}: not valid JSON ({exc})")
        if not isinstance(config, dict):
            parser.error(f"--config {pre.config}: expected a JSON object of options, got {type(config).__name__}")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(k.replace("-", "_") for k in config) - known)
        if unknown:
            parser.error(f"{pre.config}: unknown options {unknown}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in config.items()})
    args = parser.parse_args(argv)
    if not args.output:
        parser.error("--output is required (on the command line or in --config)")
    if args.data == "meld" and not (bool(args.meld_root) ^ bool(args.meld_csv and args.meld_audio)):
        parser.error("--data meld needs --meld-root, or --meld-csv with --meld-audio (not both)")
    if args.meld_valid_csv and not args.meld_valid_audio:
        parser.error("--meld-valid-csv needs --meld-valid-audio: each MELD split has its own clips under the same "
                     "diaX_uttY names")
    if args.target is None:
        args.target = "acc7" if args.data == "mmsa" else "classification"
    if args.data != "mmsa" and args.target != "classification":
        parser.error(f"--target {args.target}: the {args.data} data has emotion classes only; use --target "
                     "classification (the default)")
    if args.model == "late" and args.target in ("regression", "emotions"):
        parser.error(f"--target {args.target}: late fusion is a majority vote over one set of classes; use "
                     "--model early, attention or hctdmg")
    if args.data == "mmsa" and not args.pickle:
        parser.error("--data mmsa needs --pickle")
    if args.model == "emotion" and args.data == "mmsa":
        parser.error("the emotion model takes text and raw audio: use --data synthetic or meld")
    if args.model == "hctdmg" and args.data != "mmsa":
        parser.error("hctdmg takes text, audio and vision features: use --data mmsa")
    for name in ("epochs", "batch_size", "per_class", "d_model", "heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for option, path in (("--pickle", args.pickle), ("--meld-csv", args.meld_csv),
                         ("--meld-valid-csv", args.meld_valid_csv)):
        existing_file(parser.prog, option, path if args.data != "synthetic" else None)
    if args.data == "meld":
        for option in ("--meld-root", "--meld-audio", "--meld-valid-audio"):
            path = getattr(args, option[2:].replace("-", "_"))
            if path is not None and not Path(path).is_dir():
                parser.error(f"{option} {path}: not a directory")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output}: exists and is not a directory")
    check_device(parser.prog, args.device)
    return args


# --------------------------------------------------------------------------- data
_FEATURE_MEL = {}


def text_audio_features(item: dict, dim: int = 64, n_mels: int = 40, stack: int = 4) -> dict:
    """Fixed features for the feature-level models on the text+audio corpora: hashed
    character-trigram word vectors (a GloVe stand-in) and log-mel frames stacked by 4."""
    import hashlib

    from crossattn.models.encoders import LogMelEncoder, WordTokenizer

    words = WordTokenizer.words(item["text"]) or ["<empty>"]
    text = torch.zeros(len(words), dim)
    for i, w in enumerate(words):
        for j in range(len(w) + 2):
            gram = f"#{w}#"[j:j + 3]
            h = int(hashlib.md5(gram.encode()).hexdigest(), 16)
            text[i, h % dim] += 1.0 if (h >> 64) & 1 else -1.0
    if n_mels not in _FEATURE_MEL:  # the emotion model's front-end, without its learned layers
        _FEATURE_MEL[n_mels] = LogMelEncoder(n_mels=n_mels, layers=0)
    with torch.no_grad():
        mel = _FEATURE_MEL[n_mels].log_mel(item["waveform"][None].float())[0]
    frames = max(stack, -(-mel.shape[0] // stack) * stack)
    mel = nn.functional.pad(mel, (0, 0, 0, frames - mel.shape[0]))
    return dict(features=[text.numpy(), mel.reshape(-1, stack * n_mels).numpy()], label=torch.tensor(item["label"]))


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, base, fn):
        self.base, self.fn, self.cache = base, fn, {}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i not in self.cache:
            self.cache[i] = self.fn(self.base[i])
        return self.cache[i]


def build_data(args):
    """(train, validation, test-or-None datasets, num_outputs, extra) for the arguments."""
    from crossattn.data import AlignedPickleDataset, SyntheticEmotionCorpus
    from crossattn.models import EMOTIONS

    if args.data == "mmsa":
        sets = [AlignedPickleDataset(args.pickle, s, args.target) for s in ("train", "valid", "test")]
        labels = sets[0].labels
        if args.target == "regression":
            n_out = 1
        elif args.target == "emotions":
            n_out = 2 * labels.shape[1]  # present/absent logits per emotion, as MulT
        else:
            n_out = int(max(int(labels.max()) + 1, {"acc2": 2, "acc2_has0": 2, "acc7": 7}.get(args.target, 0)))
        return (*sets, n_out, {"dims": sets[0].dims, "texts": None})
    if args.data == "synthetic":
        corpus = SyntheticEmotionCorpus(args.data_dir, per_class=args.per_class, seed=args.seed,
                                        incongruent_fraction=args.incongruent_fraction, engine=args.engine,
                                        progress=not args.no_progress)
        train_idx, val_idx, test_idx = corpus.split((0.7, 0.15, 0.15), seed=args.seed)
        train, val, test = Subset(corpus, train_idx), Subset(corpus, val_idx), Subset(corpus, test_idx)
        texts = [corpus.samples[i]["text"] for i in train_idx]
    else:
        full, val, test = _meld(args)
        if val is None:
            g = torch.Generator().manual_seed(args.seed)
            order = torch.randperm(len(full), generator=g).tolist()
            cut = max(1, int(0.85 * len(full)))
            train, val = Subset(full, order[:cut]), Subset(full, order[cut:])
        else:
            train = full
        texts = full.texts()
    if args.model in ("late", "early", "attention"):
        train, val = _Mapped(train, text_audio_features), _Mapped(val, text_audio_features)
        test = _Mapped(test, text_audio_features) if test is not None else None
        return train, val, test, len(EMOTIONS), {"dims": (64, 160), "texts": texts}
    return train, val, test, len(EMOTIONS), {"dims": None, "texts": texts}


def _meld(args):
    """(train, dev or None, test or None) MELDDatasets; utterances without readable audio are
    skipped, and said so on stderr."""
    from crossattn.data import MELDDataset

    if getattr(args, "meld_root", None):  # checkpoints of older runs lack the newer options
        sets = [MELDDataset.from_root(args.meld_root, s) for s in ("train", "dev", "test")]
    else:
        sets = [MELDDataset(args.meld_csv, args.meld_audio),
                MELDDataset(args.meld_valid_csv, getattr(args, "meld_valid_audio", None) or args.meld_audio)
                if args.meld_valid_csv else None, None]
    for name, ds in zip(("train", "dev", "test"), sets):
        if ds is None:
            continue
        reasons = ", ".join(f"{n} {why}" for why, n in ds.skip_reasons.items() if n)
        if len(ds) == 0:
            raise ValueError(f"the MELD {name} split has no utterance with readable audio in {ds.audio_dir} "
                             f"({reasons or 'empty CSV'})")
        if ds.skipped:
            print(f"crossattn-train: MELD {name}: skipped {ds.skipped} of {ds.skipped + len(ds)} utterances "
                  f"({reasons})", file=sys.stderr)
    return sets


# --------------------------------------------------------------------------- model
def build_model(args, num_outputs: int, extra: dict, tokenizer_state=None):
    """(model, tokenizer or None) for the arguments; ``tokenizer_state`` restores a word
    tokenizer saved in a checkpoint."""
    from crossattn import BlockPruning
    from crossattn.models import HCTDMG, FusionBaseline, LogMelEncoder, TextAudioEmotionModel, WordTokenizer
    from crossattn.models.encoders import load_audio_encoder, load_text_encoder, tiny_bert, tiny_wav2vec2

    if args.model == "hctdmg":
        return HCTDMG(*extra["dims"], num_outputs, d_model=args.d_model, num_heads=args.heads,
                      dropout=args.dropout, backend=args.backend), None
    if args.model in ("late", "early", "attention"):
        return FusionBaseline(args.model, extra["dims"], num_outputs, d_model=args.d_model,
                              num_heads=args.heads, dropout=args.dropout), None
    if args.text_encoder == "tiny":
        tokenizer = (WordTokenizer.from_state_dict(tokenizer_state) if tokenizer_state
                     else WordTokenizer.from_corpus(extra["texts"]))
        text_encoder = tiny_bert(len(tokenizer), hidden=args.d_model)
    else:
        text_encoder, tokenizer = load_text_encoder(None if args.text_encoder == "minilm" else args.text_encoder)
    if args.audio_encoder == "logmel":
        audio_encoder = LogMelEncoder(hidden=args.d_model)
    elif args.audio_encoder == "wav2vec2-tiny":
        audio_encoder = tiny_wav2vec2(hidden=args.d_model)
    else:
        audio_encoder = load_audio_encoder(args.audio_encoder)
    prune = BlockPruning(block_q=16, block_k=16, keep=args.prune_keep) if args.prune_keep else None
    model = TextAudioEmotionModel(
        text_encoder, audio_encoder, d_model=args.d_model, num_heads=args.heads, hidden=args.d_model,
        num_classes=num_outputs, dropout=args.dropout, fusion=args.fusion,
        need_weights=None if args.need_weights == "none" else args.need_weights,
        learnable_temperature=args.learnable_temperature, prune=prune, backend=args.backend,
        tokenizer=tokenizer)
    return model, tokenizer


def collator(args, tokenizer):
    from crossattn.data import EmotionCollator, FeatureCollator

    if args.model == "emotion":
        return EmotionCollator(tokenizer, max_seconds=args.max_seconds)
    return FeatureCollator()


def forward(model, batch, args, device):
    """(outputs, labels) for a collated batch."""
    if args.model == "emotion":
        text_input, audio_input, metadata, labels = batch
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return model(move(text_input), move(audio_input), move(metadata)), labels.to(device)
    feats, pads, labels = batch
    feats, pads = [f.to(device) for f in feats], [p.to(device) for p in pads]
    names = ("text", "audio", "vision")[: len(feats)]
    return model(*feats, **{f"{m}_padding_mask": p for m, p in zip(names, pads)}), labels.to(device)


def _output(outputs: dict):
    """The prediction tensor: ``output`` (regression heads) or ``logits``."""
    return outputs["output"] if "output" in outputs else outputs["logits"]


def loss_fn(model, outputs, labels, args):
    core = getattr(model, "module", model)
    if args.target == "regression":
        loss = nn.functional.l1_loss(_output(outputs), labels.float())
    elif args.target == "emotions":  # MulT's IEMOCAP loss: one present/absent decision per emotion
        loss = nn.functional.cross_entropy(outputs["logits"].reshape(-1, 2), labels.reshape(-1))
    elif hasattr(core, "loss"):
        loss = core.loss(outputs, labels)
    else:
        loss = nn.functional.cross_entropy(outputs["logits"], labels)
    if args.model == "emotion" and (args.diversity_weight or args.alignment_weight):
        regs = core.regularisers(outputs)
        loss = loss + args.diversity_weight * sum(v for k, v in regs.items() if k.startswith("diversity"))
        if "alignment" in regs:
            loss = loss + args.alignment_weight * regs["alignment"]
    return loss


# --------------------------------------------------------------------------- metrics
def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, support-weighted F1 and the confusion matrix (rows: true, columns: predicted)."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((labels.long(), preds.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    tp = cm.diag().double()
    support = cm.sum(1).double()
    precision = tp / cm.sum(0).double().clamp(min=1)
    recall = tp / support.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    n = max(int(support.sum()), 1)
    return {"accuracy": float(tp.sum() / n), "weighted_f1": float((f1 * support).sum() / n),
            "confusion_matrix": cm.tolist(), "n": int(support.sum())}


def evaluate(model, dataset, args, tokenizer, num_outputs, device) -> dict:
    # Evaluation must not move the training RNG (DataLoader draws a seed from it), so that a
    # run interrupted and resumed trains exactly as one that was not.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return _evaluate(model, dataset, args, tokenizer, num_outputs, device)


def _evaluate(model, dataset, args, tokenizer, num_outputs, device) -> dict:
    model.eval()
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator(args, tokenizer))
    preds, labels = [], []
    raw = args.target in ("regression", "emotions")
    for batch in loader:
        out, y = forward(model, batch, args, device)
        preds.append(_output(out) if raw else out.get("prediction", out["logits"].argmax(-1)))
        labels.append(y)
    model.train()
    if not preds:
        return {"n": 0}
    p, y = torch.cat(preds).cpu(), torch.cat(labels).cpu()
    if args.target == "regression":
        from crossattn.data import mmsa_regression_metrics

        return {**mmsa_regression_metrics(p, y), "n": len(y)}
    if args.target == "emotions":
        from crossattn.data import iemocap_metrics

        m = iemocap_metrics(p, y)
        return {**m, "accuracy": sum(v for k, v in m.items() if k.endswith("_acc")) / 4,
                "weighted_f1": sum(v for k, v in m.items() if k.endswith("_f1")) / 4, "n": len(y)}
    metrics = classification_metrics(p, y, num_outputs)
    plain = dataset.base if isinstance(dataset, _Mapped) else dataset
    base = plain.dataset if isinstance(plain, Subset) else None
    if base is not None and hasattr(base, "samples"):  # synthetic: congruent vs incongruent accuracy
        cong = torch.tensor([base.samples[i]["congruent"] for i in plain.indices])
        for name, sel in (("congruent", cong), ("incongruent", ~cong)):
            if sel.any():
                metrics[f"accuracy_{name}"] = float((p[sel] == y[sel]).double().mean())
    return metrics


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file, then renamed over the old one: a crash never leaves a
    truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, prog: str = "crossattn-train") -> dict:
    """A checkpoint written by ``save_checkpoint``. Loaded with ``weights_only=True``: a
    checkpoint holds tensors and plain Python values only, so opening one someone sent you
    cannot run code. Unreadable files exit 2 with one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise fail(prog, f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise fail(prog, f"{path}: is a directory, expected a checkpoint file") from None
    except pickle.UnpicklingError:
        raise fail(prog, f"{path}: not a crossattn checkpoint: torch.load(weights_only=True) refused it "
                         "(a checkpoint holds tensors and plain values only)") from None
    except Exception as exc:  # a truncated or foreign file fails in many ways; the first line says which
        raise fail(prog, f"{path}: not a crossattn checkpoint ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not {"model", "args", "num_outputs"} <= set(state):
        raise fail(prog, f"{path}: not a crossattn checkpoint (expected the keys model, args, num_outputs)")
    return state


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    require_extra("crossattn-train", "models", ("numpy", "transformers") + (() if args.no_progress else ("tqdm",)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    state = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if args.resume and state is None and rank == 0:
        print(f"--resume: no {ckpt_path} yet, starting afresh", file=sys.stderr)

    try:
        train, val, test, num_outputs, extra = build_data(args)
    except (ValueError, OSError, pickle.UnpicklingError) as exc:  # the loaders say which file is wrong
        raise fail("crossattn-train", f"cannot load the {args.data} data: {exc}") from None
    model, tokenizer = build_model(args, num_outputs, extra, state and state.get("tokenizer"))
    model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    epoch, batch_in_epoch, step = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    core = model
    if world > 1:
        # Hugging Face audio encoders hold parameters some steps leave unused (masked_spec_embed).
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.audio_encoder != "logmel")
    collate = collator(args, tokenizer)

    def checkpoint(epoch_, batch_):
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": core.state_dict(), "optimizer": optimiser.state_dict(), "epoch": epoch_,
                "batch_in_epoch": batch_, "step": step, "args": vars(args), "num_outputs": num_outputs,
                "extra": {"dims": extra["dims"]}, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "tokenizer": tokenizer.state_dict() if hasattr(tokenizer, "state_dict") else None,
            })

    done = args.max_steps is not None and step >= args.max_steps
    while epoch < args.epochs and not done:
        order = _epoch_order(len(train), args.seed, epoch)[rank::world]
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        if world > 1:  # every rank takes the same number of steps
            import torch.distributed as dist

            count = torch.tensor(len(batches))
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            batches = batches[: int(count)]
        it = islice(enumerate(batches), batch_in_epoch, None)
        if not args.no_progress and rank == 0:
            from tqdm import tqdm

            it = tqdm(it, total=len(batches), initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}")
        model.train()
        b, loss = batch_in_epoch - 1, None
        for b, idx in it:
            outputs, labels = forward(model, collate([train[i] for i in idx]), args, device)
            loss = loss_fn(model, outputs, labels, args)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss.item():.4f}")
            if args.save_every and step % args.save_every == 0:
                checkpoint(epoch, b + 1)
            if args.max_steps is not None and step >= args.max_steps:
                done = True
                break
        finished_epoch = not done or b + 1 == len(batches)
        if rank == 0:
            metrics = {"epoch": epoch + 1, "step": step, "loss": None if loss is None else float(loss.detach()),
                       "validation": evaluate(core, val, args, tokenizer, num_outputs, device)}
            if test is not None:
                metrics["test"] = evaluate(core, test, args, tokenizer, num_outputs, device)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            v = metrics["validation"]
            summary = " ".join(f"{k}={v[k]:.4f}" for k in ("accuracy", "weighted_f1", "Non0_acc_2", "Has0_acc_2",
                                                            "MAE", "Corr") if k in v)
            loss_text = "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
            # Results go to stdout (one line per epoch); progress bars and notes to stderr.
            print(f"epoch {epoch + 1}/{args.epochs} step {step} loss={loss_text} validation: {summary}", flush=True)
        if finished_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            checkpoint(epoch, 0)
        else:
            checkpoint(epoch, b + 1)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {ckpt_path} and {out_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
