"""`silero-vad`: the packaged Silero VAD (16 kHz) as an eager, exportable `nn.Module`.

The `silero_vad` pip package ships a stateful TorchScript wrapper; `SileroVAD` is the same
network with its recurrent state as an explicit input and output, so it can be traced, exported
and compressed. One call scores one chunk: 64 samples of context followed by 512 new samples.

    >>> model = load_silero_vad()
    >>> probs = stream_probs(model, wav)  # wav (B, N) at 16 kHz -> (B, ceil(N / 512))

The zoo entry evaluates on real speech synthesized by espeak-ng and mixed with noise
(`zoo.speech_data`), against the fp32 model's decisions and the ground-truth speech segments;
where espeak-ng is not installed it falls back to a synthetic vowel-like signal.

The package is located without importing it: `import silero_vad` calls
`torch.set_num_threads(1)` for the whole process.
"""

from __future__ import annotations

import importlib.util
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.errors import DataError, ModelLoadError
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, ZooEntry, register_entry
from modelpress.zoo.speech_data import SpeechClip, espeak_available, synthesize_speech

SAMPLE_RATE = 16000
CHUNK = 512  # new samples per step
CONTEXT = 64  # samples carried over from the previous step
HIDDEN = 128
THRESHOLD = 0.5  # speech / non-speech decision, the package's default


class LSTMCell(nn.Module):
    """`nn.LSTMCell` as two `nn.Linear` and plain gate math (gate order i, f, g, o).

    Plain ops export to ONNX (`torch.onnx.export` cannot export `nn.LSTMCell` here) and expose
    the recurrent weights, a large part of the model, to Linear quantization and pruning.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=1)  # 4 x (B, hidden)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class SileroVAD(nn.Module):
    """Silero VAD 16 kHz: (x [B, 576], state [2, B, 128]) -> (prob [B, 1], state [2, B, 128]).

    `state` stacks the LSTM's h and c; zeros for the first chunk of a stream.
    """

    def __init__(self) -> None:
        super().__init__()
        self.n_bins = 129  # n_fft 256 -> 129 frequency bins
        self.stft_conv = nn.Conv1d(1, 2 * self.n_bins, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, stride=1, padding=1)
        self.lstm_cell = LSTMCell(HIDDEN, HIDDEN)
        self.final_conv = nn.Conv1d(HIDDEN, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(x, (0, 64), mode="reflect").unsqueeze(1)  # (B, 1, 640), as the packaged STFT pads
        x = self.stft_conv(x)  # (B, 258, 4): real and imaginary halves
        x = torch.sqrt(x[:, : self.n_bins] ** 2 + x[:, self.n_bins :] ** 2)  # (B, 129, 4) magnitude
        x = F.relu(self.conv1(x))  # (B, 128, 4)
        x = F.relu(self.conv2(x))  # (B, 64, 2)
        x = F.relu(self.conv3(x))  # (B, 64, 1)
        x = F.relu(self.conv4(x)).squeeze(-1)  # (B, 128)
        h, c = self.lstm_cell(x, state[0], state[1])
        prob = torch.sigmoid(self.final_conv(F.relu(h).unsqueeze(-1))).squeeze(-1)  # (B, 1)
        return prob, torch.stack([h, c])  # (B, 1), (2, B, 128)


def package_data_dir() -> Path:
    """The `silero_vad/data` folder, found without running the package's `__init__`."""
    spec = importlib.util.find_spec("silero_vad")  # top-level lookup: imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "silero-vad needs the silero_vad package: pip install 'modelpress[speech]' (or silero-vad)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _jit_path() -> Path:
    path = package_data_dir() / "silero_vad.jit"
    if not path.is_file():
        raise ModelLoadError(f"silero_vad is installed but {path} is missing; reinstall silero-vad")
    return path


def load_reference() -> torch.jit.ScriptModule:
    """The package's own stateful TorchScript model (the reference `SileroVAD` must match)."""
    return torch.jit.load(str(_jit_path()), map_location="cpu").eval()


# Parameter names of the TorchScript 16 kHz branch `_model` -> those of silero_vad_16k.safetensors.
_JIT_NAMES = {
    "stft.forward_basis_buffer": "stft_conv.weight",
    **{f"encoder.{i}.reparam_conv.{p}": f"conv{i + 1}.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"decoder.rnn.{p}": f"lstm_cell.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "decoder.decoder.2.weight": "final_conv.weight",
    "decoder.decoder.2.bias": "final_conv.bias",
}


def _our_names(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors names -> SileroVAD's; only the LSTM's differ (lstm_cell.weight_ih -> .ih.weight)."""
    out = {}
    for name, tensor in named.items():
        if name.startswith("lstm_cell."):
            kind, gate = name.removeprefix("lstm_cell.").split("_")
            name = f"lstm_cell.{gate}.{kind}"
        out[name] = tensor
    return out


def load_silero_vad(weights: Literal["jit", "safetensors"] = "jit") -> SileroVAD:
    """The 16 kHz `SileroVAD` in eval mode, with the packaged weights.

    `weights="jit"` (default) copies them from the packaged TorchScript model, which is what
    `silero_vad.load_silero_vad()` runs (the ONNX files hold the same weights).
    `"safetensors"` reads `silero_vad_16k.safetensors`, which in silero-vad 6.2 holds a
    different, older set of weights: its outputs do not match the packaged model.
    """
    model = SileroVAD()
    if weights == "jit":
        jit_state = load_reference()._model.state_dict()
        named = {flat: jit_state[theirs] for theirs, flat in _JIT_NAMES.items()}
    elif weights == "safetensors":
        from safetensors.torch import load_file

        path = package_data_dir() / "silero_vad_16k.safetensors"
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; this silero-vad version has no safetensors weights")
        named = load_file(path)
    else:
        raise ModelLoadError(f"weights must be 'jit' or 'safetensors', got {weights!r}")
    model.load_state_dict(_our_names(named), strict=True)
    return model.eval()


def _chunks(wav: torch.Tensor) -> torch.Tensor:
    """The model inputs of a stream `wav` (N,): (N // 512, 576), each with its 64 samples of context."""
    wav = F.pad(wav, (CONTEXT, 0))  # zeros before the first chunk
    usable = CONTEXT + (wav.numel() - CONTEXT) // CHUNK * CHUNK
    return wav[:usable].unfold(0, CONTEXT + CHUNK, CHUNK).contiguous()  # overlapping windows, copied


def _as_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def stream_probs(model_fn: ModelFn, wav: torch.Tensor) -> torch.Tensor:
    """Speech probability of every 512-sample chunk of `wav` (B, N) -> (B, ceil(N / 512)).

    Chunks exactly as the package's stateful wrapper (`audio_forward`): the tail is zero-padded
    to a whole chunk, each step sees the previous step's last 64 samples (zeros at first) and
    the recurrent state is threaded through. `model_fn(x, state)` returns (prob, state).
    """
    wav = _as_tensor(wav).float()
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)  # (1, N)
    batch, n = wav.shape
    wav = F.pad(wav, (CONTEXT, -n % CHUNK))  # (B, 64 + n_chunks * 512)
    state = torch.zeros(2, batch, HIDDEN)
    probs = []
    with torch.no_grad():
        for start in range(0, wav.shape[1] - CONTEXT, CHUNK):
            prob, state = model_fn(wav[:, start : start + CONTEXT + CHUNK], state)  # x: (B, 576)
            probs.append(_as_tensor(prob).reshape(batch, 1))
            state = _as_tensor(state)
    return torch.cat(probs, dim=1)  # (B, n_chunks)


# Formants (F1, F2, F3) in Hz of a few vowels (Peterson & Barney, adult male averages).
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """Second-order resonance (a formant) with unit gain at DC."""
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / SAMPLE_RATE), r * r]
    return lfilter([sum(a)], a, x)


def _syllable(rng: np.random.Generator, seconds: float, f0: float) -> np.ndarray:
    """A voiced, vowel-like burst: harmonic source with a pitch contour through three formants."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    vibrato = 1 + 0.15 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * np.pi))
    pitch = f0 * vibrato * np.linspace(1.1, 0.9, n)  # falling contour
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    source: np.ndarray = np.sum([np.sin(k * phase) / k for k in range(1, int(5000 / f0))], axis=0)  # < 5 kHz
    formants = _VOWELS[rng.integers(len(_VOWELS))]
    bands = zip(formants, (80, 100, 120), (1, 0.6, 0.3), strict=True)
    voiced: np.ndarray = np.sum([g * _resonator(source, f, bw) for f, bw, g in bands], axis=0)
    voiced = voiced * np.sin(np.pi * np.linspace(0, 1, n)) ** 0.6  # attack and decay
    return voiced / (np.abs(voiced).max() + 1e-9)


def speech_like_signal(seconds: float = 20.0, seed: int = 0) -> torch.Tensor:
    """A deterministic 16 kHz test signal (N,): utterances of vowel-like syllables between pauses.

    It stands in for real speech where espeak-ng is not installed, and feeds export and timing
    (no synthesizer needed): the packaged model scores the syllables as speech and the pauses
    (silence, low noise) as non-speech, with transitions in between.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    length = 0
    while length < total:
        parts.append(np.zeros(int(rng.uniform(0.4, 1.5) * SAMPLE_RATE)))  # pause
        f0 = rng.uniform(100, 220)  # speaker pitch
        for _ in range(rng.integers(2, 7)):
            parts.append(_syllable(rng, rng.uniform(0.12, 0.3), f0) * rng.uniform(0.3, 0.8))
            parts.append(np.zeros(int(rng.uniform(0.03, 0.08) * SAMPLE_RATE)))  # gap between syllables
        length = sum(len(p) for p in parts)
    signal = np.concatenate(parts)[:total] + 0.003 * rng.standard_normal(total)  # background noise
    return torch.from_numpy(signal.astype(np.float32))


def read_wav(path: Path) -> torch.Tensor:
    """A 16 kHz mono PCM16 WAV file as float32 samples in [-1, 1), shape (N,)."""
    try:
        with wave.open(str(path), "rb") as f:
            rate, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
            frames = f.readframes(f.getnframes())
    except (OSError, wave.Error, EOFError) as e:
        raise DataError(f"cannot read WAV file {path}: {e}") from e
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise DataError(f"{path}: need 16000 Hz mono 16-bit PCM, got {rate} Hz, {channels} channel(s), {8 * width}-bit")
    return torch.from_numpy(np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0)


def vad_agreement(probs: torch.Tensor, reference: torch.Tensor) -> Quality:
    """Fraction of frames where `probs` and `reference` make the same speech decision."""
    agree = ((probs > THRESHOLD) == (reference > THRESHOLD)).float().mean()
    return Quality(
        name="vad_agreement",
        value=float(agree),
        details={
            "n_frames": int(reference.numel()),
            "max_abs_prob_diff": float((probs - reference).abs().max()),
            "speech_fraction": float((reference > THRESHOLD).float().mean()),
            "threshold": THRESHOLD,
        },
    )


def vad_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Speech decisions (`probs` > 0.5) against ground-truth frame `labels`: F1, precision, recall, accuracy."""
    pred, labels = probs > THRESHOLD, labels.bool()
    tp = int((pred & labels).sum())
    fp, fn = int((pred & ~labels).sum()), int((~pred & labels).sum())
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "accuracy": float((pred == labels).float().mean()),
    }


def _reference_probs(wav: torch.Tensor) -> torch.Tensor:
    """The packaged TorchScript model's chunk probabilities of `wav` (N,) -> (n_chunks,)."""
    return load_reference().audio_forward(wav[None], SAMPLE_RATE)[0]


_REFERENCE_CACHE: dict[tuple, torch.Tensor] = {}  # evaluation audio's parameters -> reference probabilities


def _cached_reference(key: tuple, wav: torch.Tensor) -> torch.Tensor:
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _reference_probs(wav)
    return _REFERENCE_CACHE[key]


def speech_clip(
    seconds: float, seed: int, snr_db: float | None = 10.0, noise: str = "pink", cache_dir: Path | None = None
) -> SpeechClip | None:
    """Real synthesized speech (`zoo.speech_data`, cached under `cache_dir`, default `default_cache_dir()`),
    or None when espeak-ng is not installed."""
    if not espeak_available():
        return None
    return synthesize_speech(seconds, seed, snr_db, noise, cache_dir=cache_dir)


def evaluate_clip(model: ModelFn, clip: SpeechClip, reference: torch.Tensor | None = None) -> Quality:
    """Frame agreement of `model` with the fp32 model on `clip`, with both scored against its ground truth.

    `value` is the agreement (`vad_agreement`); details add `f1`, `precision`, `recall` and
    `accuracy` of `model` against the speech segments, and the fp32 model's as `reference_*`.
    """
    if reference is None:
        reference = _reference_probs(clip.wav)
    probs = stream_probs(model, clip.wav[None])[0]
    labels = clip.frame_labels(CHUNK)
    quality = vad_agreement(probs, reference)
    quality.details.update(vad_scores(probs, labels))
    quality.details.update({f"reference_{k}": v for k, v in vad_scores(reference, labels).items()})
    quality.details["labelled_speech_fraction"] = float(labels.float().mean())
    quality.details["audio"] = clip.description
    quality.details["audio_source"] = "espeak-ng"
    return quality


class SileroEntry(ZooEntry):
    name = "silero-vad"
    description = "Silero VAD 16 kHz (packaged weights), one 512-sample chunk + recurrent state per call"
    task = "voice-activity"
    input_names = ("x", "state")

    # Evaluation, validation and calibration audio: espeak-ng speech (different sentences, voices and
    # noise for each seed), or the synthetic `speech_like_signal` where espeak-ng is not installed.
    eval_seconds = 20.0
    eval_seed = 0
    eval_snr_db = 10.0
    eval_noise = "pink"
    validation_seed = 2
    calibration_seed = 1  # a different signal from evaluation
    calibration_snr_db = 20.0
    calibration_noise = "white"

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._model: SileroVAD | None = None
        self.cache_dir = cache_dir  # where the synthesized speech is kept; None: `default_cache_dir()`

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        """The packaged weights (nothing is trained or cached); a `cache_dir` given here also becomes where this
        entry keeps its synthesized speech (evaluation, validation, calibration audio)."""
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir)
        return load_silero_vad()

    def _eager(self) -> SileroVAD:
        if self._model is None:
            self._model = load_silero_vad()
        return self._model

    batch_axes = (0, 1)  # x (B, 576), state (2, B, 128)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        # The synthetic signal: export and timing need no speech synthesizer.
        chunks = _chunks(speech_like_signal(10.0, self.calibration_seed))  # (n_chunks, 576)
        x = chunks[torch.arange(batch_size) % len(chunks)]  # repeats if batch_size > n_chunks
        return x, torch.zeros(2, batch_size, HIDDEN)

    def _signal(self, seconds: float, seed: int, snr_db: float, noise: str) -> torch.Tensor:
        clip = speech_clip(seconds, seed, snr_db, noise, self.cache_dir)
        return clip.wav if clip is not None else speech_like_signal(seconds, seed)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """`n` chunks of the calibration audio with the recurrent state the model had there."""
        seconds = max(10.0, 2 * n * CHUNK / SAMPLE_RATE)
        wav = self._signal(seconds, self.calibration_seed, self.calibration_snr_db, self.calibration_noise)
        chunks = _chunks(wav)  # (n_chunks, 576)
        states = [torch.zeros(2, 1, HIDDEN)]
        with torch.no_grad():
            for chunk in chunks[:-1]:
                states.append(self._eager()(chunk[None], states[-1])[1])
        n_chunks = len(chunks)
        picks = torch.linspace(0, n_chunks - 1, n).long()
        x = chunks[picks]  # (n, 576)
        state = torch.cat([states[i] for i in picks.tolist()], dim=1)  # (2, n, 128)
        return [(x[i : i + batch_size], state[:, i : i + batch_size]) for i in range(0, n, batch_size)]

    def _quality(self, model: ModelFn, seed: int) -> Quality:
        clip = speech_clip(self.eval_seconds, seed, self.eval_snr_db, self.eval_noise, self.cache_dir)
        if clip is not None:
            key = ("espeak-ng", self.eval_seconds, seed, self.eval_snr_db, self.eval_noise)
            return evaluate_clip(model, clip, _cached_reference(key, clip.wav))
        wav = speech_like_signal(self.eval_seconds, seed)
        reference = _cached_reference(("synthetic", self.eval_seconds, seed), wav)
        quality = vad_agreement(stream_probs(model, wav[None])[0], reference)
        quality.details["audio"] = "synthetic vowel-like signal (espeak-ng is not installed)"
        quality.details["audio_source"] = "synthetic"
        return quality

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        """Frame-level agreement (threshold 0.5) with the packaged fp32 model.

        The audio is 20 s of espeak-ng speech in pink noise at 10 dB SNR, also scored against its
        ground-truth speech segments (F1, accuracy); without espeak-ng, the synthetic
        `speech_like_signal`; or the 16 kHz mono PCM16 WAV `data`. `details["audio"]` says which.
        """
        if data is None:
            return self._quality(model, self.eval_seed)
        wav = read_wav(data)
        if wav.numel() < CHUNK:
            raise DataError(f"{data}: need at least {CHUNK} samples, got {wav.numel()}")
        quality = vad_agreement(stream_probs(model, wav[None])[0], _reference_probs(wav))
        quality.details["audio"] = str(data)
        quality.details["audio_source"] = "wav"
        return quality

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality | None:
        """The same metric on other speech (another seed), for choices made while compressing."""
        return self._quality(model, self.validation_seed) if data is None else None

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Chunks of the evaluation audio, each with a zero state (throughput, not streaming)."""
        wav = self._signal(self.eval_seconds, self.eval_seed, self.eval_snr_db, self.eval_noise)
        chunks = _chunks(wav)  # (n_chunks, 576)
        for i in range(0, len(chunks), batch_size):
            x = chunks[i : i + batch_size]
            yield x, torch.zeros(2, len(x), HIDDEN)


register_entry("silero-vad", SileroEntry)
