"""ONNX Runtime GenAI export: a compressed causal LM as a decoder graph with a KV cache, ready for
`onnxruntime-genai` (`og.Model(folder)`), written from our integer codes (no re-quantization).

The folder holds `model.onnx` (weights in `model.onnx.data` beside it when large), `genai_config.json`
and the tokenizer files. The graph is the one onnxruntime-genai's own model builder makes for a Llama:

    inputs   input_ids (B, S) int64, attention_mask (B, P + S) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) float
    outputs  logits (B, S, V), present.{i}.key / .value (B, kv_heads, P + S, head_dim)

    embed ─► SimplifiedLayerNorm ─► q/k/v (one packed MatMulNBits where they share a scheme)
          ─► GroupQueryAttention (rotary from cos/sin caches, KV cache) ─► o_proj
          ─► SkipSimplifiedLayerNorm ─► gate, up ─► SiLU(gate) * up ─► down ─► SkipSimplifiedLayerNorm ...
          ─► lm_head

Each group-wise `QLinear` becomes a `MatMulNBits` (`onnx_nbits.nbits_tensors`: 2 to 8 bits, any group
that is a power of two >= 16, symmetric or not, bias folded in), a per-channel one too (its codes in blocks,
each carrying the row's scale: `genai_graph.writable`); a float `nn.Linear` a `MatMul`; a
quantized layer `MatMulNBits` cannot take is written as its dequantized weight (float `MatMul`, listed in
the report). A float lm_head is quantized by the export (`lm_head_bits`, 8 by default: it is a fifth of
SmolLM2's weights and read whole for every token), and a tied embedding gathers rows from the same codes
(`GatherBlockQuantized`); kept float, a tied lm_head shares one (H, V) table with the lookup.
`accuracy_level` is MatMulNBits' attribute: 4 (int8 compute of the activations, as the builder's CPU
int4 uses; several times faster than float compute at batch 1 on CPU; groups wider than 32 are then
written as blocks of 32, the same codes, so the activations are quantized as finely) unless its logits
then drift past the bar, where it is 0 (float activations) and the report says so. The graph itself is
written by `genai_graph`.

The written model is run with plain ONNX Runtime before the folder is kept: a prefill, then decode steps
feeding `present` back as `past`; its logits must match the compressed torch model's (mean cosine >=
`MIN_COSINE`), else nothing is written. In a compress run its prefill and decode tokens/s are then measured
the same way (`decode_speed`), beside the eager model's in the report's Generation table. Llama (SmolLM2,
...), Mistral and Qwen2 are mapped; anything else, and rope variants that depend on the sequence length, are
refused with `BadInputError`.

    >>> report = export_genai(qmodel, "out/genai")       # CausalLM or a transformers *ForCausalLM
    >>> report["parity"]["mean_cosine"], report["matmul_nbits"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.atomic import atomic_dir
from modelpress.core.errors import BadInputError
from modelpress.core.numerics import exactly
from modelpress.export.genai_graph import GraphBuilder
from modelpress.export.gguf import find_causal_lm
from modelpress.export.onnx_graph import compare_outputs
from modelpress.quant.modules import QLinear

ARCHITECTURES = ("llama", "mistral", "qwen2")  # transformers model_type, also genai_config's model.type
# rope types whose cos/sin depend on the position only (the caches are computed once from the model's own
# rotary module); "dynamic" and "longrope" change with the sequence length and are refused
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MIN_COSINE = 0.999  # the project's parity bar: the same codes, only float summation order and int8 activations
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf caps a file at 2 GiB)
DECODE_STEPS = 3
DEFAULT_PROMPT = "def fibonacci(n):\n    "
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@exactly
def export_genai(
    model: nn.Module,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    prompt_ids: torch.Tensor | None = None,
    accuracy_level: int | None = None,
    lm_head_bits: int | None = 8,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write `model` (a transformers Llama / Mistral / Qwen2 causal LM, possibly wrapped, its Linear layers
    possibly quantized) into `folder` for ONNX Runtime GenAI; atomic, checked with ONNX Runtime first.

    `tokenizer`: a transformers tokenizer (default: the wrapper's `.tokenizer`); genai reads its
    tokenizer.json. `prompt_ids` (B, T): the tokens of the check (default: a short prompt).
    `accuracy_level`: MatMulNBits' (None: 4, falling back to 0 where int8 activations drift past the bar).
    `lm_head_bits`: a float lm_head (most of a small LM's bytes read per token) is quantized by the export,
    symmetric, groups of 32, round to nearest (a tied embedding gathers from the same codes); None keeps
    it float. A quantized lm_head keeps its own codes. Returns a report: the layers written as
    MatMulNBits and as float (with the reason), the parity figures.
    """
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise BadInputError(f"accuracy_level must be None (auto), 0, 1, 2, 3 or 4, got {accuracy_level}")
    if lm_head_bits not in (None, 4, 8):
        raise BadInputError(f"lm_head_bits must be 4, 8 or None (float), got {lm_head_bits}")
    lm = find_causal_lm(model)
    spec = decoder_spec(lm)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    check_tokenizer(tokenizer, spec["vocab"])
    if prompt_ids is None:
        prompt_ids = torch.tensor([tokenizer(DEFAULT_PROMPT, add_special_tokens=False).input_ids], dtype=torch.long)
    prompt_ids = prompt_ids.reshape(-1, prompt_ids.shape[-1])[:2].long()
    if prompt_ids.numel() == 0 or int(prompt_ids.max()) >= spec["vocab"] or int(prompt_ids.min()) < 0:
        raise BadInputError(f"prompt_ids must be non-empty token ids below the vocabulary size {spec['vocab']}")
    if prompt_ids.shape[1] + DECODE_STEPS > spec["context"]:
        prompt_ids = prompt_ids[:, : spec["context"] - DECODE_STEPS]

    folder = Path(folder)
    drifted: list[str] = []
    with atomic_dir(folder) as tmp:
        for level in [accuracy_level] if accuracy_level is not None else [4, 0]:
            graph = GraphBuilder(level, lm_head_bits, spec["notes"])
            _save(graph.build(lm, spec), tmp / "model.onnx")
            parity = check_decoder(lm, tmp / "model.onnx", prompt_ids, spec, threads=threads)
            if parity["mean_cosine"] >= MIN_COSINE:
                break
            drifted.append(f"accuracy_level {level}: mean cosine {parity['mean_cosine']:.5f}")
        else:
            raise BadInputError(
                f"the GenAI decoder does not compute what the compressed model computes over a prefill and "
                f"{DECODE_STEPS} cached decode steps ({'; '.join(drifted)} < {MIN_COSINE})"
            )
        if drifted:
            spec["notes"].append(f"int8 activations drift ({drifted[0]}): written with float activations "
                                 "(accuracy_level 0), several times slower on CPU")  # fmt: skip
        config = genai_config(lm, spec, "model.onnx", tokenizer)
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise BadInputError("the tokenizer wrote no tokenizer.json: onnxruntime-genai reads a fast tokenizer's")
    return {
        "path": str(folder),
        "architecture": spec["kind"],
        "matmul_nbits": graph.nbits,
        "float": graph.floats,
        "accuracy_level": level,
        "parity": parity,
        "notes": spec["notes"],
    }


# ---- what the model is -------------------------------------------------------------------------


def decoder_spec(lm: nn.Module) -> dict[str, Any]:
    """Shapes and options of the decoder, checked against the layout the graph writes."""
    config = lm.config
    kind = getattr(config, "model_type", type(lm).__name__)
    if kind not in ARCHITECTURES:
        raise BadInputError(
            f"ONNX Runtime GenAI export writes {', '.join(ARCHITECTURES)} causal LMs (the Llama layout), not {kind!r}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise BadInputError(f"the GenAI decoder writes SiLU-gated MLPs; this model uses {config.hidden_act!r}")
    body = getattr(lm, "model", None)
    layers = list(getattr(body, "layers", []))
    missing = [n for n in ("embed_tokens", "norm", "rotary_emb") if not isinstance(getattr(body, n, None), nn.Module)]
    if missing or not layers:
        raise BadInputError(f"{type(lm).__name__} lacks {missing or ['layers']}: not the Llama layout")
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for parent, names in ((attn, _ATTN), (mlp, _MLP)):
            for n in names:
                m = getattr(parent, n, None)
                if not isinstance(m, (nn.Linear, QLinear)):
                    what = "missing" if m is None else f"a {type(m).__name__}"
                    raise BadInputError(f"layer {i}: {n} is {what}; the GenAI decoder maps Linear and QLinear layers")
        extra = sorted(set(dict(attn.named_children())) - set(_ATTN)) if attn is not None else []
        if extra:
            raise BadInputError(f"layer {i}: attention has {extra}, which the Llama layout does not have")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths = {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features) for layer in layers}
    (q_width, k_width), heads, kv_heads = min(widths), min(widths)[0] // head_dim, min(widths)[1] // head_dim
    if len(widths) > 1 or (heads * head_dim, kv_heads * head_dim) != (q_width, k_width) or heads % kv_heads:
        raise BadInputError(f"q/k widths {sorted(widths)}: the GenAI decoder needs whole heads of {head_dim}, the "
                            "same in every layer, query heads a multiple of the KV heads")  # fmt: skip
    rotary = body.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise BadInputError(
            f"rope type {rope_type!r} is not written (its angles change with the sequence length); "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    if rotary.inv_freq.numel() * 2 != head_dim:
        raise BadInputError(f"partial rotary embeddings ({rotary.inv_freq.numel() * 2} of {head_dim} dims) are "
                            "not written")  # fmt: skip
    notes: list[str] = []
    window = -1
    if kind == "qwen2" and getattr(config, "use_sliding_window", False):
        raise BadInputError("Qwen2 with use_sliding_window=True (per-layer windows) is not written")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        window = int(config.sliding_window)
    context = int(config.max_position_embeddings)
    if 0 < window >= context:
        window = -1
    return {
        "kind": kind, "layers": len(layers), "hidden": int(config.hidden_size), "head_dim": int(head_dim),
        "heads": int(heads), "kv_heads": int(kv_heads), "vocab": int(lm.get_input_embeddings().num_embeddings),
        "eps": float(config.rms_norm_eps), "context": context, "window": window, "notes": notes,
    }  # fmt: skip


def check_tokenizer(tokenizer: Any, vocab: int) -> None:
    if tokenizer is None or not callable(getattr(tokenizer, "save_pretrained", None)):
        got = "none" if tokenizer is None else type(tokenizer).__name__
        raise BadInputError(
            f"ONNX Runtime GenAI needs the model's Hugging Face tokenizer (tokenizer.json), got {got}; "
            "pass tokenizer= a transformers fast tokenizer"
        )
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise BadInputError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: onnxruntime-genai reads tokenizer.json"
        )
    if len(tokenizer) > vocab:
        raise BadInputError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab} rows")


def _save(proto: Any, path: Path) -> None:
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external data file (a second try)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(proto, str(path))


# ---- genai_config.json -------------------------------------------------------------------------


def genai_config(lm: nn.Module, spec: dict[str, Any], filename: str, tokenizer: Any = None) -> dict[str, Any]:
    """The `genai_config.json` onnxruntime-genai reads: the decoder's tensor names, shapes, special tokens
    (generation_config, else config, else the tokenizer; the tokenizer's end-of-turn token also stops),
    and greedy search up to the context length (what the model's generation_config asks for, where set)."""
    config, gen = lm.config, getattr(lm, "generation_config", None)

    def token(key: str) -> Any:
        values = (getattr(source, key, None) for source in (gen, config, tokenizer) if source is not None)
        return next((v for v in values if v is not None), None)

    eos = token("eos_token_id")
    if eos is None:
        raise BadInputError("no end-of-sequence token is known (generation_config, config or tokenizer)")
    eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    turn_end = getattr(tokenizer, "eos_token_id", None)
    if turn_end is not None and int(turn_end) not in eos:
        eos.append(int(turn_end))
    pad, bos = token("pad_token_id"), token("bos_token_id")
    pad, bos = eos[0] if pad is None else pad, eos[0] if bos is None else bos
    eos = eos[0] if len(eos) == 1 else eos
    do_sample = bool(getattr(gen, "do_sample", False))
    search = {
        "diversity_penalty": 0.0, "do_sample": do_sample, "early_stopping": True, "length_penalty": 1.0,
        "max_length": spec["context"], "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": True,
        "repetition_penalty": float(getattr(gen, "repetition_penalty", None) or 1.0),
        "temperature": float(getattr(gen, "temperature", None) or 1.0) if do_sample else 1.0,
        "top_k": int(getattr(gen, "top_k", None) or 50) if do_sample else 50,
        "top_p": float(getattr(gen, "top_p", None) or 1.0) if do_sample else 1.0,
    }  # fmt: skip
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": spec["head_dim"], "hidden_size": spec["hidden"],
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": spec["heads"], "num_hidden_layers": spec["layers"],
        "num_key_value_heads": spec["kv_heads"],
    }  # fmt: skip
    model = {
        "bos_token_id": bos, "context_length": spec["context"], "decoder": decoder,
        "eos_token_id": eos, "pad_token_id": pad, "type": spec["kind"], "vocab_size": spec["vocab"],
    }  # fmt: skip
    return {"model": model, "search": search}


# ---- the check ---------------------------------------------------------------------------------


def check_decoder(
    lm: nn.Module, path: str | Path, prompt_ids: torch.Tensor, spec: dict[str, Any], threads: int | None = None,
    steps: int = DECODE_STEPS,
) -> dict[str, float]:  # fmt: skip
    """Run the decoder in ONNX Runtime as a generator does (prefill with an empty cache, then `steps` greedy
    tokens one at a time, `present` fed back as `past`) and compare every position's logits with the torch
    model's on the whole sequence: `mean_cosine`, `max_abs`, and `greedy_agreement` of the next tokens."""
    session = _session(path, threads)
    seq, logits = _generate(session, prompt_ids.numpy().astype(np.int64), spec, steps)
    actual = torch.cat([torch.from_numpy(x) for x in logits], dim=1).float()
    full = torch.from_numpy(seq)
    with torch.inference_mode():
        expected = lm(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits.float()
    parity = compare_outputs(expected, actual)
    parity["greedy_agreement"] = float((expected.argmax(-1) == actual.argmax(-1)).float().mean())
    parity["positions"] = int(actual.shape[1])
    kl = F.kl_div(actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    parity["kl_div"] = float(kl.mean())  # per token, torch's distribution against the graph's
    return parity


def _session(path: str | Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _generate(
    session: Any, ids: np.ndarray, spec: dict[str, Any], steps: int, stamps: list[float] | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy generation as a generator runs the decoder: a prefill with an empty cache, then `steps` tokens one
    at a time, `present` fed back as `past`. Returns the whole sequence but its last token and the logits of each
    call; `stamps` (if given) receives the clock after every call."""
    import time

    empty = np.zeros((ids.shape[0], spec["kv_heads"], 0, spec["head_dim"]), dtype=np.float32)
    cache = [f"{i}.{kv}" for i in range(spec["layers"]) for kv in ("key", "value")]
    feed: dict[str, np.ndarray] = {f"past_key_values.{c}": empty for c in cache}
    names = [o.name for o in session.get_outputs()]
    step_ids, seq, logits = ids, ids, []
    for _ in range(steps + 1):
        feed |= {"input_ids": step_ids, "attention_mask": np.ones_like(seq)}
        out = dict(zip(names, session.run(None, feed), strict=True))
        if stamps is not None:
            stamps.append(time.perf_counter())
        logits.append(out["logits"])
        feed |= {f"past_key_values.{c}": out[f"present.{c}"] for c in cache}
        step_ids = out["logits"][:, -1:].argmax(-1).astype(np.int64)
        seq = np.concatenate([seq, step_ids], axis=1)
    return seq[:, :-1], logits


def decode_speed(
    path: str | Path, prompt_ids: torch.Tensor, spec: dict[str, Any], threads: int | None = None,
    new_tokens: int = 32, batches: tuple[int, ...] = (1, 8), repeats: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Prefill and decode tokens/s of the decoder in plain ONNX Runtime, greedy with the KV cache fed back, at
    each batch size of `batches` (the first prompt row repeated), the median of `repeats` after a warm-up: the
    figures `generation_speed` gives for an eager causal LM. onnxruntime-genai runs the same graph sharing one
    cache buffer between past and present, so its decode is at least this fast."""
    import time

    session = _session(path, threads)
    row = prompt_ids.reshape(-1, prompt_ids.shape[-1])[:1].numpy().astype(np.int64)
    row = row[:, : max(1, spec["context"] - new_tokens)]
    out: dict[str, Any] = {"prompt_tokens": int(row.shape[1]), "new_tokens": new_tokens, "runtime": "onnxruntime"}
    for batch in batches:
        ids = np.repeat(row, batch, axis=0)
        _generate(session, ids, spec, 2)  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):
            start, stamps = time.perf_counter(), []
            _generate(session, ids, spec, new_tokens - 1, stamps)
            prefill.append(stamps[0] - start)
            decode.append(stamps[-1] - stamps[0])
        p, d = sorted(prefill)[len(prefill) // 2], sorted(decode)[len(decode) // 2]
        out[f"bs{batch}"] = {"prefill_tokens_per_s": batch * row.shape[1] / max(p, 1e-9),
                             "decode_tokens_per_s": batch * (new_tokens - 1) / max(d, 1e-9)}  # fmt: skip
    return out


class DecoderModel:
    """A written GenAI folder as a model function: `(input_ids, attention_mask)` -> the logits of a prefill with
    an empty KV cache, run by plain ONNX Runtime (perplexity and the greedy check of the folder's own graph).
    `spec` holds what `decode_speed` needs, read from its `genai_config.json`."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.spec = folder_spec(self.folder)
        self.session = _session(self.folder / self.spec["filename"], threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.detach().cpu().numpy().astype(np.int64)
        spec = self.spec
        empty = np.zeros((ids.shape[0], spec["kv_heads"], 0, spec["head_dim"]), dtype=np.float32)
        feed = {f"past_key_values.{i}.{kv}": empty for i in range(spec["layers"]) for kv in ("key", "value")}
        out = self.session.run(["logits"], feed | {"input_ids": ids, "attention_mask": mask})
        return torch.from_numpy(out[0])


def folder_spec(folder: Path) -> dict[str, Any]:
    """The decoder's shapes from a GenAI folder's `genai_config.json` (as `decoder_spec` gives them from the model)."""
    try:
        model = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        dec = model["decoder"]
        spec = {"layers": int(dec["num_hidden_layers"]), "kv_heads": int(dec["num_key_value_heads"]),
                "head_dim": int(dec["head_size"]), "context": int(model["context_length"]),
                "filename": str(dec["filename"])}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{folder} is not a GenAI folder modelpress wrote (genai_config.json: {e})") from None
    if Path(spec["filename"]).name != spec["filename"] or spec["filename"] in ("", ".", ".."):
        raise BadInputError(f"{folder}: genai_config.json names {spec['filename']!r}, not a file in the folder")
    return spec


# ---- in a compress run -------------------------------------------------------------------------


def export_to_report(model: nn.Module, example: tuple, folder: Path, ctx: Any) -> None:
    """`genai/` of a compress run: written where the model is a causal LM the decoder maps and the check
    passes; otherwise the report says why (a warning, as for GGUF), and the other artifacts still stand."""
    import time

    from modelpress.export.onnx_float import is_causal_lm

    if not is_causal_lm(model):
        ctx.report.warn(
            f"genai/ not written: ONNX Runtime GenAI folders are written for transformers causal language "
            f"models only (a causal-LM folder, a .gguf file, smollm2-135m), not {type(model).__name__}"
        )
        return
    start = time.perf_counter()
    try:
        written = export_genai(model, folder, prompt_ids=example[0], threads=ctx.threads)
    except BadInputError as e:
        ctx.report.warn(f"genai/ not written: {e}")
        ctx.report.add_pass("export/genai", time.perf_counter() - start, refused=str(e))
        return
    parity = written["parity"]
    speed = decode_speed(folder / "model.onnx", example[0], decoder_spec(find_causal_lm(model)), threads=ctx.threads)
    stats = {"matmul_nbits": len(written["matmul_nbits"]), "float": len(written["float"]),
             "accuracy_level": written["accuracy_level"], "generation": speed} | {
             f"parity_{k}": v for k, v in parity.items()}  # fmt: skip
    ctx.report.warn(
        f"genai/ ({len(written['matmul_nbits'])} layers as MatMulNBits, GroupQueryAttention with a KV cache) is for "
        f"onnxruntime-genai: run with a KV cache in ONNX Runtime, its logits match the compressed model's (mean "
        f"cosine {parity['mean_cosine']:.6f}); it decodes {speed['bs1']['decode_tokens_per_s']:,.0f} tokens/s at "
        f"batch 1 there (the Generation table)"
    )
    ctx.report.add_pass("export/genai", time.perf_counter() - start, **stats)
