"""Compress the silero-vad voice-activity detector for a device, and check it on real speech in noise.

    python examples/speech-vad/run.py [--out DIR] [--threads N] [--snr 20,10,5,0] [--noise pink]
                                      [--seconds 60] [--repeats 3] [--overwrite]

Synthesizes the test audio with espeak-ng (sentences in several voices between pauses, one clip
per signal-to-noise ratio), applies the built-in `speech-ondevice` recipe through
`modelpress.compress`, exports the float and the compressed model to ONNX, then streams every clip
chunk by chunk (512 samples, batch 1) through the fp32 and the compressed model, in PyTorch and in
ONNX Runtime. Reports frame-level agreement with the fp32 model, F1 and accuracy against the
ground-truth speech segments, the real-time factor (processing time / audio duration) and sizes.
Writes `model.onnx` (compressed), `model-fp32.onnx`, `recipe.yaml`, `results.json` and
`results.md` into the output folder, atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import modelpress
from modelpress.core.atomic import atomic_dir
from modelpress.core.environment import environment
from modelpress.export.onnx import export_onnx
from modelpress.export.runtime import OnnxModel
from modelpress.measure.size import artifact_size_bytes
from modelpress.recipes.recipe import load_recipe
from modelpress.zoo.base import ModelFn, get_entry
from modelpress.zoo.silero import CHUNK, SAMPLE_RATE, THRESHOLD, stream_probs, vad_scores
from modelpress.zoo.speech_data import NOISES, SpeechClip, synthesize_speech

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import base_parser, check_out, exit_code, layer_bits, parse, positive_int

RECIPE = "speech-ondevice"
DEFAULT_OUT = Path("modelpress-out/speech-vad")
MARKER = "speech-vad"  # results.json "example": a folder holding it is this script's own, replaced freely
LAYERS = (nn.Linear, nn.Conv1d)  # the float layers whose bit width the results report
FIRST_SEED = 100  # the zoo entry's evaluation, validation and calibration audio use seeds 0-2
# The recipe's promise: at least this fraction of frames decided as by fp32, over all the audio and at
# each SNR (at 0 dB many frames sit near the threshold, and even 8-bit weights alone flip ~1% of them).
AGREEMENT_TOL = 0.99
AGREEMENT_TOL_PER_SNR = 0.985


def _snrs(text: str) -> tuple[float, ...]:
    """`20,10,5,0` -> (20.0, 10.0, 5.0, 0.0): distinct SNRs in dB, each in [-20, 80]."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be SNRs in dB separated by commas (e.g. 20,10,5), got {text!r}"
        ) from None
    bad = [v for v in values if not (math.isfinite(v) and -20 <= v <= 80)]
    if bad:
        raise argparse.ArgumentTypeError(f"each SNR must be in [-20, 80] dB, got {bad[0]:g}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"SNRs must be distinct, got {text!r}")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds in [10, 600], got {text!r}") from None
    if not (math.isfinite(value) and 10 <= value <= 600):
        raise argparse.ArgumentTypeError(f"must be a number of seconds in [10, 600], got {value:g}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--snr", type=_snrs, default=(20.0, 10.0, 5.0, 0.0), help="SNRs in dB, one clip each")
    parser.add_argument("--noise", choices=NOISES, default="pink", help="noise mixed with the speech (default pink)")
    parser.add_argument("--seconds", type=_seconds, default=60.0, help="length of each clip (default 60)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed passes over the audio (default 3)")
    return parse(parser, argv)


def stream(model_fns: list[ModelFn], clips: list[SpeechClip], repeats: int) -> list[tuple[list[torch.Tensor], float]]:
    """Every clip streamed at batch 1 through each model: its chunk probabilities and real-time factor.

    The models take turns within each of the `repeats` passes (a load spike on a shared machine hits
    them alike); the real-time factor is the best pass's processing time over the audio's duration.
    """
    probs: list[list[torch.Tensor]] = [[] for _ in model_fns]
    best = [math.inf for _ in model_fns]
    for r in range(repeats):
        for i, fn in enumerate(model_fns):
            start = time.perf_counter()
            out = [stream_probs(fn, clip.wav[None])[0] for clip in clips]  # (n_chunks,) each
            best[i] = min(best[i], time.perf_counter() - start)
            if r == 0:
                probs[i] = out
    duration = sum(clip.seconds for clip in clips)
    return [(p, t / duration) for p, t in zip(probs, best, strict=True)]


def row(
    label: str,
    artifact: str,
    size_bytes: int,
    probs: list[torch.Tensor],
    reference: list[torch.Tensor],
    clips: list[SpeechClip],
    rtf: float,
) -> dict[str, Any]:
    """One model's figures: pooled over every clip, and per SNR."""
    labels = [clip.frame_labels(CHUNK) for clip in clips]

    def figures(p: torch.Tensor, ref: torch.Tensor, lab: torch.Tensor) -> dict[str, Any]:
        agree = float(((p > THRESHOLD) == (ref > THRESHOLD)).float().mean())
        return {"agreement": agree, **vad_scores(p, lab), "max_abs_prob_diff": float((p - ref).abs().max())}

    per_snr = {
        f"{clip.snr_db:g}": figures(p, ref, lab)
        for clip, p, ref, lab in zip(clips, probs, reference, labels, strict=True)
    }
    pooled = figures(torch.cat(probs), torch.cat(reference), torch.cat(labels))
    n_chunks = sum(len(p) for p in probs)
    return {
        "model": label,
        "artifact": artifact,
        "size_bytes": size_bytes,
        **pooled,
        "rtf": rtf,
        "ms_per_chunk": rtf * CHUNK / SAMPLE_RATE * 1000,
        "n_frames": n_chunks,
        "per_snr": per_snr,
    }


HEAD = ("model", "size (bytes)", "frame agreement", "F1", "accuracy", "RTF", "ms / chunk")


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["model"],
        f"{r['size_bytes']:,}",
        f"{r['agreement']:.4f}",
        f"{r['f1']:.4f}",
        f"{r['accuracy']:.4f}",
        f"{r['rtf']:.4f}",
        f"{r['ms_per_chunk']:.3f}",
    ]


def markdown(rows: list[dict[str, Any]], snrs: tuple[float, ...]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEAD) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    head = ["model", *(f"{s:g} dB: agreement / F1" for s in snrs)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(snrs)) + "|"]
    for r in rows:
        cells = [f"{r['per_snr'][f'{s:g}']['agreement']:.4f} / {r['per_snr'][f'{s:g}']['f1']:.4f}" for s in snrs]
        lines.append("| " + " | ".join([r["model"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for column in HEAD:
        t.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        t.add_row(*_cells(r))
    return t


def run(
    out: Path,
    threads: int = 1,
    snrs: tuple[float, ...] = (20.0, 10.0, 5.0, 0.0),
    noise: str = "pink",
    seconds: float = 60.0,
    repeats: int = 3,
    overwrite: bool = False,
    console: Console | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Synthesize, compress, export and measure into `out` (atomically); returns results.json's content and model."""
    check_out(out, overwrite, MARKER)
    clips = [synthesize_speech(seconds, FIRST_SEED + i, snr, noise) for i, snr in enumerate(snrs)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        entry = get_entry("silero-vad")
        model = entry.load()
        recipe = load_recipe(RECIPE)
        # Calibration: the entry's own speech (other sentences, voices and noise than the clips here).
        compressed, report = modelpress.compress(
            entry.name, recipe, options=modelpress.RunOptions(threads=threads, progress=False)
        )
        example = entry.example_inputs(2)
        with atomic_dir(out) as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fp32_onnx = export_onnx(model, example, tmp / "model-fp32.onnx", batch_axes=entry.batch_axes)
            q_onnx = export_onnx(compressed, example, tmp / "model.onnx", batch_axes=entry.batch_axes)
            (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            runs = [
                ("fp32 (PyTorch eager)", "safetensors", model, artifact_size_bytes(model)),
                ("fp32 (ONNX Runtime)", "onnx", OnnxModel(fp32_onnx, threads=threads), artifact_size_bytes(fp32_onnx)),
                (f"{RECIPE} (PyTorch eager)", "safetensors", compressed, artifact_size_bytes(compressed)),
                (f"{RECIPE} (ONNX Runtime)", "onnx", OnnxModel(q_onnx, threads=threads), artifact_size_bytes(q_onnx)),
            ]
            streamed = stream([fn for _, _, fn, _ in runs], clips, repeats)
            reference = streamed[0][0]  # the fp32 eager model's decisions, bit-identical to the package's
            rows = [
                row(label, artifact, size, probs, reference, clips, rtf)
                for (label, artifact, _, size), (probs, rtf) in zip(runs, streamed, strict=True)
            ]
            export_warnings = sorted({str(w.message) for w in caught if "modelpress" in str(w.category.__module__)})
            results = {
                "example": MARKER,
                "recipe": recipe.to_dict(),
                "audio": {
                    "clips": [clip.description for clip in clips],
                    "seconds_per_clip": seconds,
                    "snr_db": list(snrs),
                    "noise": noise,
                    "speech_fraction": [float(clip.frame_labels(CHUNK).float().mean()) for clip in clips],
                },
                "threshold": THRESHOLD,
                "agreement_tolerance": {"all": AGREEMENT_TOL, "per_snr": AGREEMENT_TOL_PER_SNR},
                "bits": {"fp32": layer_bits(model, LAYERS), RECIPE: layer_bits(compressed, LAYERS)},
                "rows": rows,
                "warnings": report.warnings + export_warnings,
                "repeats": repeats,
                "environment": environment(threads),
            }
            (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            total = sum(clip.seconds for clip in clips)
            intro = (
                f"{len(clips)} clips of espeak-ng speech, {seconds:g} s each ({total:g} s, "
                f"{rows[0]['n_frames']} frames of 32 ms), {noise} noise at {', '.join(f'{s:g}' for s in snrs)} dB SNR; "
                f"batch 1, {threads} thread(s). Agreement is with the fp32 model's decisions at threshold "
                f"{THRESHOLD}; F1 and accuracy are against the ground-truth speech segments.\n\n"
            )
            (tmp / "results.md").write_text(intro + markdown(rows, snrs), encoding="utf-8")
    finally:
        torch.set_num_threads(before)
    console = console or Console(width=max(Console().width, 112))  # the table's width, also when piped
    console.print(
        table(rows, f"silero-vad on espeak-ng speech, {noise} noise at {', '.join(map('{:g}'.format, snrs))} dB")
    )
    console.print(f"wrote {out}/ (model.onnx, model-fp32.onnx, recipe.yaml, results.json, results.md)")
    return results, compressed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad arguments: argparse prints the usage and the problem, exit 2
    return exit_code(
        lambda: run(args.out, args.threads, args.snr, args.noise, args.seconds, args.repeats, args.overwrite)
    )


if __name__ == "__main__":
    sys.exit(main())
