"""A synthetic spoken-emotion corpus: sentences per emotion spoken by espeak-ng with
per-emotion prosody (pitch, pitch range, rate, volume), several voices (gender and age
metadata, a timbre vector), and a controllable fraction of *incongruent* samples whose
words contradict the voice (seed 002's case). The label is the emotion of the voice.

With ``conditions`` the corpus says where the emotion is: ``"words"`` (emotional words,
neutral voice), ``"voice"`` (neutral words, emotional voice), ``"congruent"`` (both agree)
and ``"incongruent"`` (emotional voice, words of another non-neutral emotion). The label is
the voice's emotion unless the voice is neutral, then the words' — so a model needs both
modalities. Each word is synthesised on its own and joined with short pauses, so the
manifest knows every word's start and end (``words``: ``[word, start_s, end_s]``).

Deterministic by seed and cached on disk (wav files + a JSON manifest). Without espeak-ng
on the machine (``engine="auto"``), a built-in source-filter synthesiser stands in: voiced
harmonics at the emotion's pitch and range, word-dependent formants, the emotion's rate
and volume — less speech-like, same labels and metadata; the manifest records the engine.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from crossattn.models.emotion import EMOTIONS

__all__ = ["PROSODY", "SENTENCES", "VOICES", "SyntheticEmotionCorpus", "espeak_available",
           "read_wav", "write_wav"]

_FILLERS = ("results", "weather", "party", "project", "news", "trip", "dinner", "game",
            "letter", "house", "meeting", "music")

SENTENCES = {
    "neutral": ("the {x} is on the table", "we will talk about the {x} tomorrow",
                "the {x} starts at nine", "I read about the {x} this morning"),
    "happy": ("I am so happy about the {x}", "what a wonderful {x}", "I love the {x} so much",
              "the {x} made my day, it was great"),
    "sad": ("I feel so sad about the {x}", "the {x} made me cry", "I miss the {x} so much",
            "the {x} was a terrible loss for me"),
    "angry": ("I am furious about the {x}", "the {x} is outrageous and I hate it",
              "stop ruining the {x} right now", "how dare they cancel the {x}"),
    "fear": ("I am scared of the {x}", "the {x} terrifies me", "something awful will happen at the {x}",
             "I am afraid the {x} is dangerous"),
    "surprise": ("I can not believe the {x}", "wow, the {x} is a total surprise",
                 "the {x} happened so suddenly", "no way, the {x} is here already"),
    "disgust": ("the {x} is disgusting", "the {x} smells revolting", "I am sickened by the {x}",
                "the {x} was gross and filthy"),
}

# SSML prosody per emotion: pitch shift, pitch range, rate and volume.
PROSODY = {
    "neutral": dict(pitch=0, range="medium", rate=0, volume="medium"),
    "happy": dict(pitch=25, range="x-high", rate=15, volume="loud"),
    "sad": dict(pitch=-25, range="x-low", rate=-30, volume="soft"),
    "angry": dict(pitch=10, range="high", rate=20, volume="x-loud"),
    "fear": dict(pitch=35, range="high", rate=25, volume="soft"),
    "surprise": dict(pitch=40, range="x-high", rate=0, volume="loud"),
    "disgust": dict(pitch=-15, range="low", rate=-15, volume="medium"),
}
_RANGE = {"x-low": 0.2, "low": 0.5, "medium": 1.0, "high": 1.6, "x-high": 2.2}
_VOLUME = {"soft": 0.35, "medium": 0.6, "loud": 0.85, "x-loud": 1.0}

# (espeak-ng voice, gender 0 female / 1 male, age, base f0 of the built-in synthesiser)
VOICES = (("en+m1", 1, 34, 110.0), ("en+m3", 1, 58, 95.0), ("en+f2", 0, 27, 210.0),
          ("en+f4", 0, 61, 185.0))
TIMBRE_DIM = 8
_VERSION = 2
CONDITIONS = ("words", "voice", "congruent", "incongruent")


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def read_wav(path, sample_rate: int | None = None) -> torch.Tensor:
    """A 16-bit PCM wav as float32 ``[samples]`` in [-1, 1] (channels averaged), linearly
    resampled to ``sample_rate`` when given."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM wav is supported, got {8 * w.getsampwidth()}-bit")
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    x = torch.from_numpy(data.reshape(-1, channels).mean(1).copy())
    if sample_rate is not None and rate != sample_rate and x.numel() > 1:
        n = max(1, round(x.numel() * sample_rate / rate))
        x = torch.nn.functional.interpolate(x[None, None], size=n, mode="linear", align_corners=True)[0, 0]
    return x


def _timbre(voice_index: int) -> list[float]:
    g = torch.Generator().manual_seed(1000 + voice_index)
    return torch.randn(TIMBRE_DIM, generator=g).tolist()


def _espeak(text: str, voice: str, prosody: dict, jitter: float, path: Path) -> None:
    pitch = prosody["pitch"] + jitter * 10
    rate = prosody["rate"] + jitter * 5
    ssml = (f'<speak><prosody pitch="{pitch:+.0f}%" range="{prosody["range"]}" rate="{100 + rate:.0f}%" '
            f'volume="{prosody["volume"]}">{text}</prosody></speak>')
    subprocess.run(["espeak-ng", "-m", "-v", voice, "-w", str(path), ssml], check=True,
                   capture_output=True, timeout=60)


def _espeak_word(word: str, voice: str, prosody: dict, jitter: float, sample_rate: int, tmp: Path) -> np.ndarray:
    raw = tmp / "raw.wav"
    _espeak(word, voice, prosody, jitter, raw)
    x = read_wav(raw, sample_rate).numpy()
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(1e-6, float(np.abs(x).max())))
    return x[loud[0]: loud[-1] + 1] if loud.size else x  # espeak pads each word with silence


def _builtin_word(word: str, position: float, base_f0: float, prosody: dict, jitter: float,
                  sample_rate: int) -> np.ndarray:
    """Source-filter stand-in for one word: harmonics of a falling/rising f0 contour (its
    height set by ``position`` in the sentence, 0..1) shaped by two word-dependent formants."""
    f0 = base_f0 * (1 + (prosody["pitch"] + jitter * 10) / 100)
    spread = 0.15 * _RANGE[prosody["range"]]
    rate = 1 + (prosody["rate"] + jitter * 5) / 100
    h = int(hashlib.sha1(word.encode()).hexdigest(), 16)
    f1, f2 = 300 + h % 600, 900 + (h >> 10) % 1500
    dur = (0.12 + 0.05 * len(word)) / rate
    t = np.arange(int(dur * sample_rate)) / sample_rate
    contour = f0 * (1 + spread * math.sin(math.pi * position) * np.cos(np.pi * t / dur))
    phase = 2 * np.pi * np.cumsum(contour) / sample_rate
    sig = np.zeros_like(t)
    for k in range(1, 30):
        fk = contour * k
        weight = np.exp(-((fk - f1) / 200) ** 2) + 0.6 * np.exp(-((fk - f2) / 300) ** 2) + 0.02
        sig += weight * np.sin(k * phase) * (fk < sample_rate / 2)
    env = np.sin(np.pi * t / dur) ** 0.5
    return (_VOLUME[prosody["volume"]] * env * sig / max(1e-6, np.abs(sig).max()) * 0.8).astype(np.float32)


def _spoken_words(text: str) -> list[str]:
    return [w.strip(".,!?") for w in text.split() if w.strip(".,!?")]


class SyntheticEmotionCorpus(Dataset):
    """``SyntheticEmotionCorpus(root=None, per_class=40, seed=0, incongruent_fraction=0.2)``.

    Items are dicts: ``text`` (str), ``waveform`` (float32 ``[samples]`` at ``sample_rate``),
    ``label`` (int, index into ``crossattn.models.EMOTIONS``: the voice's emotion),
    ``text_emotion`` (the emotion of the words), ``voice_emotion``, ``congruent`` (bool),
    ``condition`` (one of CONDITIONS, or ``"congruent"``/``"incongruent"`` without
    ``conditions``), ``words`` (``[word, start_s, end_s]`` per spoken word), ``metadata``
    (``age``, ``gender``, ``timbre``). ``emotions`` restricts the classes (names from EMOTIONS;
    labels stay indices into EMOTIONS); ``conditions`` maps condition names to fractions
    (see the module docstring) and replaces ``incongruent_fraction``. Generated once into
    ``root`` (default ``$CROSSATTN_DATA_DIR`` or
    ``~/.cache/crossattn``) under a directory named by the parameters' hash, then reused.
    """

    def __init__(self, root: str | os.PathLike | None = None, per_class: int = 40, seed: int = 0,
                 incongruent_fraction: float = 0.2, engine: str = "auto", sample_rate: int = 16000,
                 progress: bool = False, emotions=None, conditions: dict | None = None):
        if not 0.0 <= incongruent_fraction <= 1.0:
            raise ValueError(f"incongruent_fraction must be in [0, 1], got {incongruent_fraction}")
        emotions = tuple(EMOTIONS if emotions is None else emotions)
        if len(emotions) < 2 or any(e not in EMOTIONS for e in emotions) or len(set(emotions)) != len(emotions):
            raise ValueError(f"emotions must be at least two distinct names from {EMOTIONS}, got {emotions}")
        if conditions is not None:
            bad = set(conditions) - set(CONDITIONS)
            if bad or not conditions or any(not (v >= 0) for v in conditions.values()) or sum(conditions.values()) <= 0:
                raise ValueError(f"conditions must map names from {CONDITIONS} to fractions >= 0 (not all 0), "
                                 f"got {conditions}")
            if "neutral" not in emotions and set(conditions) & {"words", "voice"}:
                raise ValueError("conditions 'words' and 'voice' need 'neutral' in emotions (the other "
                                 "modality is neutral)")
            conditions = {k: float(v) for k, v in sorted(conditions.items())}
        if engine not in ("auto", "espeak", "builtin"):
            raise ValueError(f"engine must be 'auto', 'espeak' or 'builtin', got {engine!r}")
        if engine == "auto":
            engine = "espeak" if espeak_available() else "builtin"
        if engine == "espeak" and not espeak_available():
            raise RuntimeError("engine='espeak' needs espeak-ng on PATH (Debian/Ubuntu: apt-get install "
                               "espeak-ng); engine='builtin' needs nothing")
        self.engine, self.sample_rate = engine, sample_rate
        root = Path(root or os.environ.get("CROSSATTN_DATA_DIR") or Path.home() / ".cache" / "crossattn")
        params = dict(per_class=per_class, seed=seed, incongruent_fraction=incongruent_fraction,
                      engine=engine, sample_rate=sample_rate, version=_VERSION)
        if conditions is not None or emotions != EMOTIONS:  # old hashes stay valid without them
            params.update(emotions=list(emotions), conditions=conditions)
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = root / f"synthetic-emotion-{key}"
        manifest = self.dir / "manifest.json"
        if not manifest.exists():
            self._generate(params, progress)
        self.samples = json.loads(manifest.read_text())["samples"]

    def _plan(self, params):
        rng = random.Random(params["seed"])
        emotions = params.get("emotions") or list(EMOTIONS)
        conditions = params.get("conditions")
        plan = []
        for label in emotions:
            for _ in range(params["per_class"]):
                voice_emotion = text_emotion = label
                if conditions is None:
                    if rng.random() < params["incongruent_fraction"]:
                        text_emotion = rng.choice([e for e in emotions if e != label])
                    condition = "congruent" if text_emotion == label else "incongruent"
                else:
                    allowed = {c: f for c, f in conditions.items() if f > 0 and not (
                        c == "incongruent" and (label == "neutral" or len([e for e in emotions if e not in (
                            "neutral", label)]) == 0))}
                    condition = (rng.choices(list(allowed), weights=list(allowed.values()))[0]
                                 if allowed else "congruent")
                    if condition == "words":
                        voice_emotion = "neutral"
                    elif condition == "voice":
                        text_emotion = "neutral"
                    elif condition == "incongruent":
                        text_emotion = rng.choice([e for e in emotions if e not in ("neutral", label)])
                template = rng.choice(SENTENCES[text_emotion])
                voice = rng.randrange(len(VOICES))
                plan.append(dict(text=template.format(x=rng.choice(_FILLERS)), label=EMOTIONS.index(label),
                                 text_emotion=text_emotion, voice_emotion=voice_emotion,
                                 congruent=text_emotion == voice_emotion, condition=condition, voice=voice,
                                 jitter=rng.choice((-1.0, 0.0, 1.0)),
                                 pauses=[rng.uniform(0.04, 0.12) for _ in range(40)]))
        rng.shuffle(plan)
        return plan

    def _generate(self, params, progress):
        plan = self._plan(params)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=self.dir.name + ".", dir=self.dir.parent))
        sr = self.sample_rate
        cache = {}  # (word, voice, emotion, jitter) -> samples: the vocabulary is small
        try:
            iterator = plan
            if progress:
                from tqdm import tqdm
                iterator = tqdm(plan, desc=f"synthesising ({self.engine})")
            samples = []
            for i, item in enumerate(iterator):
                name, gender, age, f0 = VOICES[item["voice"]]
                prosody = PROSODY[item["voice_emotion"]]
                words = _spoken_words(item["text"])
                pieces, spans, t = [np.zeros(int(0.05 * sr), np.float32)], [], 0.05
                for k, word in enumerate(words):
                    if self.engine == "espeak":
                        key = (word, name, item["voice_emotion"], item["jitter"])
                        if key not in cache:
                            cache[key] = _espeak_word(word, name, prosody, item["jitter"], sr, tmp)
                        x = cache[key]
                    else:
                        x = _builtin_word(word, (k + 1) / (len(words) + 1), f0, prosody, item["jitter"], sr)
                    spans.append([word, round(t, 4), round(t + len(x) / sr, 4)])
                    gap = np.zeros(int(item["pauses"][k % len(item["pauses"])] * sr), np.float32)
                    pieces += [x, gap]
                    t += (len(x) + len(gap)) / sr
                wav = tmp / f"{i:05d}.wav"
                write_wav(wav, np.concatenate(pieces), sr)
                samples.append(dict(file=wav.name, text=item["text"], label=item["label"],
                                    text_emotion=item["text_emotion"], voice_emotion=item["voice_emotion"],
                                    congruent=item["congruent"], condition=item["condition"], words=spans,
                                    voice=name, metadata=dict(age=age, gender=gender, timbre=_timbre(item["voice"]))))
            (tmp / "raw.wav").unlink(missing_ok=True)
            (tmp / "manifest.json").write_text(json.dumps(dict(params=params, samples=samples)))
            try:
                tmp.rename(self.dir)  # atomic: a half-written corpus is never picked up
            except OSError:
                if not (self.dir / "manifest.json").exists():  # pragma: no cover - a concurrent writer won
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return dict(text=s["text"], waveform=read_wav(self.dir / s["file"], self.sample_rate),
                    label=s["label"], text_emotion=s["text_emotion"], voice_emotion=s["voice_emotion"],
                    congruent=s["congruent"], condition=s["condition"], words=[list(w) for w in s["words"]],
                    metadata=dict(s["metadata"]))

    def texts(self) -> list[str]:
        return [s["text"] for s in self.samples]

    def split(self, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> list[list[int]]:
        """Index lists (train, validation, test, ...), stratified by label."""
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {fractions}")
        rng = random.Random(seed)
        parts = [[] for _ in fractions]
        for label in sorted({s["label"] for s in self.samples}):
            idx = [i for i, s in enumerate(self.samples) if s["label"] == label]
            rng.shuffle(idx)
            start = 0
            for p, f in enumerate(fractions):
                end = len(idx) if p == len(fractions) - 1 else start + round(f * len(idx))
                parts[p].extend(idx[start:end])
                start = end
        return [sorted(p) for p in parts]
