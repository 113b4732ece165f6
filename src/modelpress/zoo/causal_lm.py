"""Causal language models: a Hugging Face `*ForCausalLM` folder or a GGUF file, measured by perplexity.

    >>> loaded = resolve("./SmolLM2-135M")           # config.json says LlamaForCausalLM: a causal LM
    >>> loaded = resolve("model.Q4_1.gguf")         # dequantized to float32; tokenizer from its metadata
    >>> entry = CausalLMEntry(loaded.model)
    >>> entry.evaluate(loaded.model).value           # held-out perplexity per token

The model (`CausalLM`) takes `input_ids` and `attention_mask` (B, T) int64 and returns the logits
(B, T, V); every compressed form (eager, ONNX, `.pt2`) has the same signature, so one metric scores
them all. The text is Python's own documentation (`pydoc_data.topics`, shipped with CPython), cut
by position: the first 80% trains and calibrates, the next 10% is the validation split (choices
while compressing), the last 10% is the test split the report shows (the same held-out part as
`tiny-lm`'s). `--eval-data FILE.txt` scores on the user's own text instead. Beside the perplexity,
the report keeps a greedy continuation of a fixed prompt: a sanity check a perplexity can hide.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress import trust
from modelpress.core.errors import DataError, ModelLoadError
from modelpress.core.registry import TrainingData, register_training_data
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, ZooEntry

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # GPT2LMHeadModel, ...
SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
TEXT_SOURCE = "Python's documentation (pydoc_data.topics)"
PROMPT = "The Python interpreter is"
# Memory a run needs beside the fp32 weights: the compressed copy, export and activations.
MEMORY_FACTOR = 3.0


class CausalLM(nn.Module):
    """A transformers causal LM whose forward takes (input_ids, attention_mask) and returns the logits."""

    def __init__(self, lm: nn.Module, tokenizer: Any, source: str = "") -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.source = source
        self.reload: Any = None  # a fresh fp32 copy from disk, where known

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def is_causal_lm_folder(folder: Path) -> bool:
    """True where `folder/config.json` names a causal-LM architecture."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith(CAUSAL_SUFFIXES) for a in archs)


def check_memory(param_count: int, what: str) -> None:
    """Refuse, before loading, a model whose fp32 run would not fit the memory available now."""
    import psutil

    need = param_count * 4 * MEMORY_FACTOR
    free = psutil.virtual_memory().available
    if need > free:
        raise ModelLoadError(
            f"{what} has about {_count(param_count)} parameters: compressing it in float32 needs about "
            f"{_gib(need)} of memory ({MEMORY_FACTOR:g}x its float32 weights), and {_gib(free)} is available; "
            "nothing was loaded"
        )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**29 else f"{n / 2**20:.1f} MiB"


def _config_params(folder: Path) -> int:
    """Parameters of the model `config.json` describes (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_causal_lm_folder(path: str | Path, *, trust_code: bool = False) -> CausalLM:
    """A Hugging Face causal-LM folder as a `CausalLM` (lm_head kept; tied embeddings stay tied)."""
    from modelpress.zoo.text import check_hf_folder, check_loaded_keys

    folder = check_hf_folder(path, trust_code)
    try:
        check_memory(_config_params(folder), str(folder))
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read the config of {folder}: {type(e).__name__}: {e}") from None
    from transformers import AutoModelForCausalLM

    try:
        lm, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, weights_only=not trust_code, trust_remote_code=trust_code,
            output_loading_info=True,
        )  # fmt: skip
    except Exception as e:
        if "weights only load failed" in str(e).lower():
            trust.require_trust(folder, trust.PICKLE, False)
        raise ModelLoadError(f"cannot load the causal LM in {folder}: {type(e).__name__}: {e}") from None
    check_loaded_keys(lm.base_model, info, folder)
    tokenizer = _tokenizer(folder, trust_code=trust_code)
    model = CausalLM(lm.eval(), tokenizer, str(folder))
    model.reload = lambda: load_causal_lm_folder(folder, trust_code=trust_code)
    return model.eval()


# Files a tokenizer is read from; a folder with none of them has no tokenizer, even where transformers would
# build an empty one for the model type (Qwen2's class does, with no vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _tokenizer(folder: Path, **kw: Any) -> Any:
    from transformers import AutoTokenizer

    where = folder / kw.get("gguf_file", "")
    hint = "a causal LM needs its tokenizer (tokenizer.json or tokenizer_config.json in the folder)"
    if "gguf_file" not in kw and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"cannot load the tokenizer of {where}: no {', '.join(TOKENIZER_FILES)}; {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kw.items() if k != "trust_code"},
                                                  trust_remote_code=kw.get("trust_code", False))  # fmt: skip
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {where}: {type(e).__name__}: {e}; {hint}") from None
    if len(tokenizer) == 0:
        raise ModelLoadError(f"cannot load the tokenizer of {where}: it has no vocabulary; {hint}")
    return tokenizer


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (read as data: the header and its key-value pairs)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


def load_gguf(path: str | Path) -> CausalLM:
    """A GGUF file (llama.cpp's format) as a float32 `CausalLM`, its tokenizer from the file's metadata."""
    path = Path(path)
    trust.check_not_special(path, "model")
    arch = gguf_architecture(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} cannot be mapped to a PyTorch model; "
            f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    # about 4.5 bits per weight in a 4-bit file: a safe over-estimate of the parameter count
    check_memory(int(path.stat().st_size * 8 / 4), str(path))
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot load the GGUF model {path}: {type(e).__name__}: {e}") from None
    # dequantized on load: from here on a plain float32 model (saved, quantized and exported as one)
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    tokenizer = _tokenizer(path.parent, gguf_file=path.name)
    model = CausalLM(lm.eval(), tokenizer, str(path))
    model.reload = lambda: load_gguf(path)
    return model.eval()


# ---------------------------------------------------------------- text


@lru_cache(maxsize=1)
def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_text(split: str, text: str | None = None) -> str:
    """The `split` ("train", "validation", "test") part of `text` (default: the documentation)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    text = corpus_text() if text is None else text
    lo, hi = SPLITS[split]
    return text[int(len(text) * lo) : int(len(text) * hi)]


def windows(tokens: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from the start of `tokens` (all that fit when n is None)."""
    fit = len(tokens) // seq_len
    n = fit if n is None else min(n, fit)
    if n < 1:
        raise DataError(f"the text holds {len(tokens)} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


def perplexity(model_fn: ModelFn, data: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per predicted token) over windows `data` (n, T)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            ids = data[i : i + batch_size]
            logits = _logits(model_fn(ids, torch.ones_like(ids)))
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def greedy(model_fn: ModelFn, tokenizer: Any, prompt: str = PROMPT, new_tokens: int = 12) -> str:
    """A greedy continuation of `prompt`, one full forward per token (any compressed form can run it)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], dtype=torch.long)
    prompt_len = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = _logits(model_fn(ids, torch.ones_like(ids)))[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt.long()], dim=1)
    return tokenizer.decode(ids[0, prompt_len:])


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


class CausalLMEntry(ZooEntry):
    """A `CausalLM` as a zoo entry: documentation windows as inputs, held-out perplexity as its metric."""

    task = "text-generation"
    input_names = ("input_ids", "attention_mask")
    example_length = 128  # tokens per example input (latency, export)
    eval_length = 256  # tokens per perplexity window
    eval_windows = 32  # windows scored per split (8192 tokens)

    def __init__(self, model: CausalLM | None = None, name: str = "causal-lm") -> None:
        self._model = model
        self.name = name
        self.description = self.description or "causal language model (held-out perplexity)"
        self._tokens: dict[str, torch.Tensor] = {}

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        if self._model is None:
            raise ModelLoadError(f"zoo entry {self.name!r} has no model")
        return self._model

    @property
    def model(self) -> CausalLM:
        return self.load()  # type: ignore[return-value]

    def tokens(self, split: str, text: str | None = None) -> torch.Tensor:
        """Token ids of a split of the documentation, or of `text` where given."""
        key = split if text is None else f"{split}:{hashlib.sha256(text.encode()).hexdigest()}"
        if key not in self._tokens:
            body = split_text(split) if text is None else text
            ids = self.model.tokenizer(body, add_special_tokens=False).input_ids
            self._tokens[key] = torch.tensor(ids, dtype=torch.long)
        return self._tokens[key]

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        ids = windows(self.tokens("test"), self.example_length, batch_size)
        if len(ids) < batch_size:
            ids = ids.repeat((batch_size + len(ids) - 1) // len(ids), 1)[:batch_size]
        return ids, torch.ones_like(ids)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """`n` windows of `eval_length` tokens spread over the train split, in batches of `batch_size`."""
        tokens = self.tokens("train")
        if len(tokens) < self.eval_length:
            raise DataError(f"the train text holds {len(tokens)} tokens, fewer than one window")
        starts = torch.linspace(0, len(tokens) - self.eval_length, n).long()
        data = tokens[starts[:, None] + torch.arange(self.eval_length)]
        return [(data[i : i + batch_size], torch.ones_like(data[i : i + batch_size])) for i in range(0, n, batch_size)]

    def _quality(self, model: ModelFn, split: str, data: Path | None) -> Quality:
        text = None
        if data is not None:
            text = _read_text(data)
        ids = windows(self.tokens(split, text), self.eval_length, self.eval_windows)
        details: dict[str, Any] = {
            "unit": "per token",
            "split": split if data is None else str(data),
            "tokens": int(ids.numel()),
            "window": self.eval_length,
            "prompt": PROMPT,
            "greedy": greedy(model, self.model.tokenizer),
        }
        return Quality("perplexity", perplexity(model, ids), higher_is_better=False, details=details)

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        return self._quality(model, "test", data)

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality | None:
        return None if data is not None else self._quality(model, "validation", None)

    def data_record(self, use: str, count: int | None = None, data: Path | None = None) -> dict[str, Any] | None:
        split = {"training": "train", "calibration": "train", "validation": "validation", "evaluation": "test"}
        if use not in split:
            return None
        if data is not None and use in ("evaluation", "validation"):
            return {"source": str(data), "split": "all", "count": int(self.tokens("test", _read_text(data)).numel()),
                    "unit": "tokens"}  # fmt: skip
        if use == "training" and count is None:  # recovery and distillation draw from every train window
            n, unit = len(windows(self.tokens("train"), self.eval_length)), f"windows of {self.eval_length} tokens"
        else:
            n = count if count is not None else self.eval_windows * self.eval_length
            unit = "windows" if count is not None else "tokens"
        return {"source": TEXT_SOURCE, "split": split[use], "count": n, "unit": unit}

    def generation_speed(
        self, model: ModelFn, new_tokens: int = 32, batches: tuple[int, ...] = (1, 8)
    ) -> dict[str, Any] | None:
        """Prefill and decode tokens/s of greedy generation with the KV cache, at batch 1 and 8 (`batches`).

        Only an eager `CausalLM` keeps a KV cache here; `model.onnx` and `model.pt2` recompute the whole
        sequence per token, so their decode speed is not comparable and is not measured (None). The GenAI
        decoder (`genai/`, with its KV cache) is measured by `export.genai.decode_speed` when it is written.
        """
        if not isinstance(model, CausalLM):
            return None
        lm, pad = model.lm, model.tokenizer.eos_token_id
        out: dict[str, Any] = {"prompt_tokens": self.example_length, "new_tokens": new_tokens}
        with torch.inference_mode():
            for batch in batches:
                ids, mask = self.example_inputs(batch)
                kw = {"do_sample": False, "pad_token_id": pad, "use_cache": True}
                lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
                prefill, total = [], []
                for _ in range(3):
                    start = time.perf_counter()
                    lm(input_ids=ids, attention_mask=mask, use_cache=True)
                    prefill.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, **kw)  # fmt: skip
                    total.append(time.perf_counter() - start)
                p, t = sorted(prefill)[1], sorted(total)[1]
                out[f"bs{batch}"] = {
                    "prefill_tokens_per_s": batch * self.example_length / p,
                    "decode_tokens_per_s": batch * (new_tokens - 1) / max(t - p, 1e-9),
                }
        return out

    # Recovery after pruning: optimizer steps of FINETUNE_BATCH train windows per epoch of a recipe's
    # `finetune_epochs` (SmolLM2-135M: about 8 s a step on 2 cores, so a minute per epoch)
    FINETUNE_STEPS = 8
    FINETUNE_BATCH = 4

    def finetune(self, model: nn.Module, epochs: int = 1, lr: float | None = None) -> nn.Module:
        """Recovery after pruning: `model` (the pruned copy) distilled from the original on windows of the train
        split (disjoint from the validation and test text): KL between their next-token distributions at T = 1
        plus 0.01 x the MSE of every block's output, as the `distill-lm-*` recipes train; FINETUNE_STEPS steps
        per epoch, AdamW at `lr` (1e-4) with a cosine decay. Pruned weights stay zero: their masks hold through
        training. Returns the model in eval mode."""
        from modelpress.core.context import Context
        from modelpress.core.options import RunOptions
        from modelpress.distill import DistillConfig, distill

        if epochs < 1:
            raise DataError(f"finetune epochs must be >= 1, got {epochs}")
        ids = windows(self.tokens("train"), self.eval_length)  # the windows `_training_data` gives distillation
        steps = epochs * self.FINETUNE_STEPS
        per_pass = -(-len(ids) // self.FINETUNE_BATCH)
        cfg = DistillConfig(alpha=1.0, temperature=1.0, hidden_weight=0.01, epochs=-(-steps // per_pass),
                            max_steps=steps, batch_size=self.FINETUNE_BATCH, lr=1e-4 if lr is None else lr,
                            warmup=0.05, weight_decay=0.0)  # fmt: skip
        ctx = Context(options=RunOptions(progress=False, threads=torch.get_num_threads()))
        return distill(self.model, student=model, data=ids, config=cfg, ctx=ctx).student.eval()

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        data = windows(self.tokens("test"), self.example_length)
        for i in range(0, len(data), batch_size):
            ids = data[i : i + batch_size]
            yield ids, torch.ones_like(ids)


def _read_text(path: Path) -> str:
    trust.check_not_special(path, "--eval-data")
    if not path.is_file() or path.suffix.lower() != ".txt":
        raise DataError(f"--eval-data {path}: a causal LM is scored on a .txt file of text")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--eval-data {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _training_data(model: nn.Module) -> TrainingData:
    """A causal LM teacher's training set (distillation): windows of the documentation's train split
    (disjoint from the test split perplexity is measured on)."""
    entry = CausalLMEntry(model)  # type: ignore[arg-type]
    ids = windows(entry.tokens("train"), entry.eval_length)
    record = {"source": "Python documentation (pydoc_data.topics)", "split": "train", "count": len(ids),
              "tokens": int(ids.numel())}  # fmt: skip
    return ids, record


register_training_data(lambda model: isinstance(model, CausalLM), _training_data)
