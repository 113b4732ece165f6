"""Real speech for the voice-activity models: sentences spoken by espeak-ng, mixed with noise.

No recorded speech ships offline, but Debian's `espeak-ng` synthesizer does: it speaks a fixed
list of sentences in several voices, speeds and pitches. Utterances are resampled to 16 kHz,
placed between pauses of random length and mixed with white, pink or brown noise at a stated
signal-to-noise ratio. The ground truth is where speech was placed, each utterance trimmed to
its first and last frame above an energy threshold (pauses inside a sentence count as speech,
as a human annotator would mark them).

    >>> clip = synthesize_speech(seconds=20.0, seed=0, snr_db=10.0, noise="pink")
    >>> clip.wav.shape, clip.segments[:2]  # (N,) float32 at 16 kHz; speech as (start, end) samples
    >>> clip.frame_labels(512)  # (ceil(N / 512),) bool: the frames that are mostly speech

Clips are cached under `<cache dir>/speech/`, keyed by every parameter and the espeak-ng version.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelpress.core.atomic import atomic_path
from modelpress.core.context import default_cache_dir
from modelpress.core.errors import DataError

SAMPLE_RATE = 16000
NOISES = ("white", "pink", "brown")
FORMAT_VERSION = 1  # bump when the synthesis changes: cached clips of other versions are not reused

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
    "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow.",
    "The rainbow is a division of white light into many beautiful colors.",
    "A large number of people have since tried to explain the rainbow.",
    "The north wind and the sun were disputing which was the stronger.",
    "Then the north wind blew as hard as he could, but the more he blew the closer the traveller folded his cloak.",
    "Turn left at the next intersection and continue for about two kilometres.",
    "The meeting has been moved to half past three on Thursday afternoon.",
    "Set a timer for ten minutes and remind me to check the oven.",
    "What is the weather going to be like tomorrow morning?",
    "Our flight was delayed by forty minutes because of heavy fog.",
    "He read the letter twice before folding it back into the envelope.",
    "Could you repeat the last number, please? I did not catch it.",
    "The library closes at eight, so we should leave in a few minutes.",
    # Short replies and commands: brief bursts are the hard case for a detector.
    "Yes.",
    "No, thank you.",
    "Okay.",
    "Stop the music.",
    "Hello there.",
    "Turn on the lights.",
    "Sounds good to me.",
    "Next slide, please.",
)
# Voices with male and female variants, several accents.
VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-scotland+m3", "en-029+f4", "en-gb-x-rp+m7")

ESPEAK = "espeak-ng"
_TRIM_DB = 35.0  # an utterance starts and ends where its 10 ms energy is within this of its loudest frame


@dataclass(frozen=True)
class SpeechClip:
    """A 16 kHz waveform and where speech is in it."""

    wav: torch.Tensor  # (N,) float32
    segments: tuple[tuple[int, int], ...]  # speech as [start, end) sample ranges, in order
    snr_db: float | None  # None: no noise added
    noise: str
    description: str

    @property
    def seconds(self) -> float:
        return self.wav.numel() / SAMPLE_RATE

    def sample_labels(self) -> torch.Tensor:
        """(N,) bool: True on the samples inside a speech segment."""
        labels = torch.zeros(self.wav.numel(), dtype=torch.bool)
        for start, end in self.segments:
            labels[start:end] = True
        return labels

    def frame_labels(self, frame: int = 512) -> torch.Tensor:
        """(ceil(N / frame),) bool: True where at least half of the frame is speech (the tail zero-padded)."""
        labels = self.sample_labels().float()
        labels = torch.nn.functional.pad(labels, (0, -labels.numel() % frame))
        return labels.reshape(-1, frame).mean(dim=1) >= 0.5


def espeak_available() -> bool:
    """Whether `espeak-ng` is on PATH."""
    return shutil.which(ESPEAK) is not None


def _espeak_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"cannot run {exe} --version: {e}") from e
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _espeak_exe() -> str:
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise DataError(
            "real speech is synthesized with espeak-ng, which was not found on PATH; "
            "install it (Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return exe


def _speak(exe: str, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance from espeak-ng, resampled from its 22050 Hz to 16 kHz float64 in [-1, 1)."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory(prefix="modelpress-espeak-") as tmp:
        path = Path(tmp) / "utterance.wav"
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text]
        try:
            subprocess.run(cmd, capture_output=True, timeout=60, check=True)
            with wave.open(str(path), "rb") as f:
                rate, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
                frames = f.readframes(f.getnframes())
        except subprocess.CalledProcessError as e:
            raise DataError(f"espeak-ng failed for voice {voice!r}: {e.stderr.decode(errors='replace').strip()}") from e
        except (OSError, subprocess.SubprocessError, wave.Error, EOFError) as e:
            raise DataError(f"espeak-ng produced no readable audio for voice {voice!r}: {e}") from e
    if channels != 1 or width != 2 or not frames:
        raise DataError(f"espeak-ng wrote {channels} channel(s) of {8 * width}-bit audio; expected mono 16-bit")
    x = np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768.0
    g = math.gcd(SAMPLE_RATE, rate)
    return resample_poly(x, SAMPLE_RATE // g, rate // g)


def _trim(x: np.ndarray) -> tuple[int, int]:
    """[start, end) of the part of `x` between its first and last 10 ms frame within _TRIM_DB of the loudest."""
    hop = SAMPLE_RATE // 100
    n = len(x) // hop
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-20)  # (n,)
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-_TRIM_DB / 20))
    return int(loud[0] * hop), int(min(len(x), (loud[-1] + 1) * hop))


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(n,) noise of unit RMS: white (flat spectrum), pink (power 1/f) or brown (power 1/f^2)."""
    if kind not in NOISES:
        raise DataError(f"noise must be one of {', '.join(NOISES)}, got {kind!r}")
    white = rng.standard_normal(n)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        f[0] = f[1]  # no infinite gain at DC
        exponent = 0.5 if kind == "pink" else 1.0  # amplitude ~ f^-exponent
        spectrum *= (f / f[1]) ** -exponent
        spectrum[f < 20] = 0  # nothing below hearing (a brown walk would drift)
        white = np.fft.irfft(spectrum, n)
    return white / (np.sqrt(np.mean(white**2)) + 1e-20)


def _check(seconds: float, snr_db: float | None, noise: str) -> None:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and 10.0 <= seconds <= 3600.0):
        raise DataError(f"seconds must be in [10, 3600], got {seconds!r}")
    if snr_db is not None and not (isinstance(snr_db, (int, float)) and -20.0 <= snr_db <= 80.0):
        raise DataError(f"snr_db must be in [-20, 80] dB (or None for no noise), got {snr_db!r}")
    if noise not in NOISES:
        raise DataError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")


def _synthesize(exe: str, seconds: float, seed: int, snr_db: float | None, noise: str) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    total = int(round(seconds * SAMPLE_RATE))
    parts: list[np.ndarray] = []
    segments: list[tuple[int, int]] = []
    length = 0
    misses = 0
    while misses < 5:  # near the end, a few draws for an utterance that still fits
        pause = np.zeros(int(rng.uniform(0.6, 2.5) * SAMPLE_RATE))
        text = SENTENCES[rng.integers(len(SENTENCES))]
        voice = VOICES[rng.integers(len(VOICES))]
        speech = _speak(exe, text, voice, speed=int(rng.integers(130, 200)), pitch=int(rng.integers(30, 71)))
        start, end = _trim(speech)
        speech = speech[start:end]
        level_db = rng.uniform(-32, -20)  # the utterance's RMS in dB full scale: quiet to moderate talkers
        speech = speech * 10 ** (level_db / 20) / (np.sqrt(np.mean(speech**2)) + 1e-20)
        offset = length + len(pause)
        if offset + len(speech) > total:
            misses += 1
            continue
        parts += [pause, speech]
        segments.append((offset, offset + len(speech)))
        length = offset + len(speech)
    if not segments:  # the first utterance drawn was longer than the clip
        raise DataError(f"seconds={seconds:g} is too short for the first utterance of seed {seed}; give more")
    wav = np.zeros(total)
    wav[:length] = np.concatenate(parts)
    if snr_db is not None:
        speech_rms = np.sqrt(np.mean(np.concatenate([wav[s:e] for s, e in segments]) ** 2))
        wav = wav + colored_noise(total, noise, rng) * speech_rms * 10 ** (-snr_db / 20)
    peak = np.abs(wav).max()
    if peak > 0.99:  # keep within full scale, as a recording would be
        wav = wav * (0.99 / peak)
    return wav.astype(np.float32), segments


def synthesize_speech(
    seconds: float = 20.0,
    seed: int = 0,
    snr_db: float | None = 10.0,
    noise: str = "pink",
    cache_dir: Path | None = None,
) -> SpeechClip:
    """`seconds` of 16 kHz audio: espeak-ng utterances between pauses, with `noise` at `snr_db`.

    The SNR is the speech RMS over the speech segments against the noise RMS. `seed` picks the
    sentences, voices, speeds, pitches, levels, pauses and the noise. Raises `DataError` when
    espeak-ng is not installed or a parameter is out of range.
    """
    _check(seconds, snr_db, noise)
    exe = _espeak_exe()
    key = {
        "format": FORMAT_VERSION,
        "espeak": _espeak_version(exe),
        "seconds": float(seconds),
        "seed": int(seed),
        "snr_db": None if snr_db is None else float(snr_db),
        "noise": noise,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache_dir or default_cache_dir()) / "speech" / f"espeak-{digest}.npz"
    wav = segments = None
    if path.is_file():
        try:
            with np.load(path) as cached:
                wav, segments = cached["wav"], [tuple(int(v) for v in s) for s in cached["segments"]]
        except (OSError, ValueError, KeyError):
            wav = None  # unreadable cache entry: synthesize again and replace it
    if wav is None or segments is None:
        wav, segments = _synthesize(exe, seconds, seed, snr_db, noise)
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, wav=wav, segments=np.asarray(segments, dtype=np.int64).reshape(-1, 2))
        except OSError:
            pass  # a read-only cache only costs the synthesis next time
    noise_text = "no noise" if snr_db is None else f"{noise} noise at {snr_db:g} dB SNR"
    return SpeechClip(
        wav=torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)),
        segments=tuple((int(s), int(e)) for s, e in segments),
        snr_db=snr_db,
        noise=noise,
        description=f"espeak-ng speech, {len(segments)} utterances in {seconds:g} s, {noise_text} (seed {seed})",
    )
