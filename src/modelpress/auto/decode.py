"""Auto mode's `decode` objective: a causal LM ranked by how fast its deployment decodes, one token at a time.

An LLM's users wait on decoding: each new token is one step through the KV cache, paced by the bytes of
weights it reads. `model.onnx` and `model.pt2` recompute the whole sequence for every token, so they are not
how an LLM is deployed; with `objective="decode"` (the default for a causal LM whose layout the GenAI decoder
maps) each candidate's form is its ONNX Runtime GenAI folder (`export.genai`: MatMulNBits of the candidate's
own codes, per-channel ones included, GroupQueryAttention with the KV cache), and a group-wise candidate's
GGUF (llama.cpp) is written beside the chosen one as an untimed target.

- Screening writes the folder (its own gate: the compressed model's logits over a prefill and cached decode
  steps), scores the folder's graph on the screening windows, and times `SCREEN_NEW_TOKENS` greedy tokens
  after the example prompt at batch 1, in ONNX Runtime with the cache fed back (`export.genai.decode_speed`).
- Full measurement: perplexity on the validation and test splits through the folder's graph, prefill and
  decode tokens/s at batch 1 (`FULL_NEW_TOKENS`, median of `FULL_REPEATS`), against the original's eager
  decode (transformers' `generate` with its KV cache), measured once.
- A candidate with int8 activations (per-token `int8-dynamic`) has no decoder with a KV cache here: refused,
  with the reason, before it is built.

The search ranks by milliseconds per decoded token (`KEY`), lowest first, with the latency objective's
machinery (screening, dominance, finalists, runoff).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from modelpress.auto.space import Candidate, family
from modelpress.core.errors import BadInputError
from modelpress.core.model_stats import ModelStats
from modelpress.loading import LoadedModel
from modelpress.recipes.recipe import Recipe

KEY = "decode"  # the figure forms are ranked by: ms per decoded token at batch 1
SCREEN_NEW_TOKENS = 9  # a prefill and 8 decode steps when screening
FULL_NEW_TOKENS = 33  # a prefill and 32 decode steps in full, ...
FULL_REPEATS = 3  # ... the median of this many generations
ORIGINAL_NEW_TOKENS = 17  # the original's eager decode (generate with its KV cache)


def why_not(loaded: LoadedModel) -> str | None:
    """Why `loaded` cannot be searched by decode speed (None: it can)."""
    if loaded.kind == "onnx" or family(loaded) != "causal-lm":
        return "the decode objective is for causal language models (PyTorch)"
    from modelpress.export.genai import check_tokenizer, decoder_spec
    from modelpress.export.gguf import find_causal_lm

    try:
        spec = decoder_spec(find_causal_lm(loaded.model))
        check_tokenizer(getattr(loaded.model, "tokenizer", None), spec["vocab"])
    except (BadInputError, AttributeError, TypeError) as e:
        return f"it has no GenAI decoder: {e}"
    return None


def resolve(objective: str, loaded: LoadedModel) -> tuple[str, str | None]:
    """The objective to search by: `auto` is `decode` for a causal LM the GenAI decoder maps, else `latency`;
    `decode` asked for a model that has none is refused. Returns (objective, a note for the report or None)."""
    if objective not in ("auto", "decode"):
        return objective, None
    reason = why_not(loaded)
    if objective == "decode" and reason is not None:
        raise BadInputError(f"--objective decode: {reason}; use latency or size")
    if reason is None:
        return "decode", None
    if family(loaded) == "causal-lm":
        return "latency", f"ranked by latency, not decode tokens/s: {reason}"
    return "latency", None


def as_decode(cand: Candidate) -> Candidate:
    """`cand` with its GenAI folder as its one timed form, and its GGUF as an untimed target where it has one."""
    targets = tuple(t for t in cand.targets if t == "gguf")
    rec = cand.recipe
    recipe = Recipe(rec.name, rec.description, rec.passes, ("genai", *targets), rec.order, rec.lowering)
    return dataclasses.replace(cand, recipe=recipe, targets=targets, forms=("genai",))


def build(setting: Any, trial: Any) -> None:
    """Apply the candidate's passes (`trial.model` kept) and write its GenAI folder; refused (BadInputError) for
    int8 activations, and where the folder's gate refuses it."""
    from modelpress.export.genai import export_genai
    from modelpress.pipeline import apply_recipe

    if trial.cand.int8_activations:
        raise BadInputError(
            "int8 activations: no decoder with a KV cache runs them here (the GenAI decoder's MatMulNBits takes "
            "weight-only codes; model.onnx / model.pt2 recompute the whole sequence per token)"
        )
    start = time.perf_counter()
    if trial.model is None:
        trial.model, report, trial.report["ctx"] = apply_recipe(setting.loaded, trial.cand.recipe, setting.data,
                                                                setting.options)  # fmt: skip
        trial.report["report"] = report
    trial.folder.mkdir(parents=True, exist_ok=True)
    prompt = setting.loaded.entry.example_inputs(1)[0]
    written = export_genai(trial.model, trial.folder / "genai", prompt_ids=prompt, threads=setting.options.threads)
    trial.report.setdefault("parity", {})["genai"] = written["parity"]
    trial.report["genai"] = {k: written[k] for k in ("matmul_nbits", "float", "accuracy_level", "notes")}
    trial.forms["genai"] = {"path": str(trial.folder / "genai"), "status": "built"}
    trial.build_s += time.perf_counter() - start


def speed(path: str | Path, setting: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill and decode tokens/s of a GenAI folder at batch 1 after the example prompt."""
    from modelpress.export.genai import decode_speed, folder_spec

    spec = folder_spec(Path(path))  # read from genai_config.json: the one session is decode_speed's
    prompt = setting.loaded.entry.example_inputs(1)[0]
    return decode_speed(Path(path) / spec["filename"], prompt, spec, threads=setting.options.threads,
                        new_tokens=new_tokens, batches=(1,), repeats=repeats)  # fmt: skip


def ms_per_token(generation: dict[str, Any] | None) -> float:
    """Milliseconds per decoded token at batch 1 of a `generation` figure (inf where there is none)."""
    rate = ((generation or {}).get("bs1") or {}).get("decode_tokens_per_s")
    return 1e3 / rate if rate else float("inf")


def screen_speed(setting: Any, trial: Any) -> None:
    """Time a few decode steps of the candidate's folder; `slower` where the original's eager decode is faster."""
    from modelpress.measure.size import artifact_size_bytes

    form = trial.forms["genai"]
    form["size_bytes"] = artifact_size_bytes(form["path"])
    try:
        ms = ms_per_token(speed(form["path"], setting, SCREEN_NEW_TOKENS, 1))
    except Exception as e:  # noqa: BLE001 - a folder ONNX Runtime cannot run is a row of the table
        form["status"], form["why"] = "refused", f"failed to decode: {type(e).__name__}: {e}"[:500]
        return
    form["ms"] = {KEY: ms}
    original = setting.original_ms[KEY]
    form["status"] = "ok" if ms <= original else "slower"
    if ms > original:
        form["why"] = f"decodes slower than the original when screened ({ms:.2f} against {original:.2f} ms/token)"


def original_ms(loaded: LoadedModel, threads: int | None, new_tokens: int = ORIGINAL_NEW_TOKENS) -> float:
    """The original's eager decode at batch 1 (transformers' generate with its KV cache), ms per token."""
    return ms_per_token(generation(loaded, threads, new_tokens))


def generation(loaded: LoadedModel, threads: int | None, new_tokens: int = FULL_NEW_TOKENS) -> dict[str, Any]:
    """The original's prefill and decode tokens/s at batch 1 as the user runs it: with its KV cache where its entry
    generates with one (`generation_speed`), else a full forward per new token (`kv_cache: False`)."""
    from modelpress.measure.latency import threads_scope

    assert loaded.entry is not None
    with threads_scope(threads):
        out = loaded.entry.generation_speed(loaded.model, new_tokens=new_tokens, batches=(1,))
        return out if out is not None else recompute_generation(loaded.model, loaded.entry.example_inputs(1)[0],
                                                                new_tokens)  # fmt: skip


def recompute_generation(model: Any, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict[str, Any]:
    """Greedy generation without a KV cache: the whole sequence through `model` for every new token (a model
    function returning logits). The median of `repeats` after a warm-up, in `generation_speed`'s format."""
    from modelpress.zoo.training import as_logits

    ids = prompt.reshape(1, -1)

    def run(steps: int) -> list[float]:
        seq, stamps = ids, [time.perf_counter()]
        with torch.inference_mode():
            for _ in range(steps):
                nxt = as_logits(model(seq))[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt.long()], dim=1)
                stamps.append(time.perf_counter())
        return stamps

    run(2)
    prefill, decoding = [], []
    for _ in range(repeats):
        stamps = run(new_tokens)
        prefill.append(stamps[1] - stamps[0])
        decoding.append(stamps[-1] - stamps[1])
    p, d = sorted(prefill)[repeats // 2], sorted(decoding)[repeats // 2]
    bs1 = {"prefill_tokens_per_s": ids.shape[1] / max(p, 1e-9), "decode_tokens_per_s": (new_tokens - 1) / max(d, 1e-9)}
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "kv_cache": False, "bs1": bs1}


def measure(setting: Any, trial: Any) -> ModelStats:
    """The folder measured in full: quality on the test and validation splits through its graph, decode and
    prefill tokens/s, against the original's decode (`speed_gate`: ok where it decodes faster)."""
    from modelpress.export.genai import DecoderModel
    from modelpress.measure.size import artifact_size_bytes

    path = trial.forms["genai"]["path"]
    entry, eval_data = setting.loaded.entry, setting.options.eval_data
    model = DecoderModel(path, setting.options.threads)
    gen = speed(path, setting, FULL_NEW_TOKENS, FULL_REPEATS)
    stats = ModelStats(name=f"{trial.cand.name} genai/", size_bytes=artifact_size_bytes(path),
                       quality=entry.evaluate(model, eval_data),
                       validation_quality=entry.validation_quality(model, eval_data),
                       throughput={"generation": gen})  # fmt: skip
    ours, base = ms_per_token(gen), ms_per_token((setting.baseline.throughput or {}).get("generation"))
    ratio = base / ours if ours else 0.0
    status = "ok" if ratio >= 1.0 else "slower"
    stats.speed_gate = {"status": status, "speedup": {KEY: round(ratio, 3)},
                        "message": f"{stats.name}: decodes {1e3 / ours:,.1f} tokens/s at batch 1, {ratio:.2f}x the "
                                   f"original's {1e3 / base:,.1f} (eager, KV cache)"}  # fmt: skip
    return stats


def baseline(setting: Any) -> ModelStats:
    """The original measured for the decode objective: its quality on both splits and its eager decode."""
    from modelpress.core.modules import count_params
    from modelpress.measure.size import artifact_size_bytes

    loaded, opts = setting.loaded, setting.options
    entry = loaded.entry
    params, nonzero = count_params(loaded.model)
    stats = ModelStats(name=f"{loaded.name} (original)", size_bytes=artifact_size_bytes(loaded.model),
                       params=params, nonzero_params=nonzero,
                       quality=entry.evaluate(loaded.model, opts.eval_data),
                       validation_quality=entry.validation_quality(loaded.model, opts.eval_data),
                       throughput={"generation": generation(loaded, opts.threads)})  # fmt: skip
    return stats
