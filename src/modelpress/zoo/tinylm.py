"""`tiny-lm`: a small Llama-style causal language model trained locally on Python's documentation.

The text is `pydoc_data.topics` (shipped with CPython, ~465 KB of English prose and code), read as
UTF-8 bytes: the tokenizer is the identity on bytes (vocabulary 256), so nothing is downloaded. The
last 10% of the bytes are held out; the metric is the perplexity per byte on them (lower is better).
The architecture is transformers' `LlamaForCausalLM` (RMSNorm, rotary positions, SwiGLU), so the
weight-quantization passes meet the same layer names and block structure as on a large decoder.
Weights are trained deterministically once and cached under the cache dir by a fingerprint of the
architecture, the training recipe and the text.

    >>> entry = get_entry("tiny-lm")
    >>> model = entry.load()                          # TinyLM: input_ids (B, T) -> logits (B, T, 256)
    >>> entry.evaluate(model).value                   # held-out perplexity per byte, ~3.8
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.context import Context, default_cache_dir
from modelpress.core.errors import DataError
from modelpress.core.options import RunOptions
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, ZooEntry, register_entry
from modelpress.zoo.weights_cache import load_or_train

RECIPE_VERSION = 1  # bump when the training code changes in a way the spec does not show
HELD_OUT = 0.1  # last fraction of the text used for evaluation only
VOCAB = 256  # bytes


@dataclass(frozen=True)
class TinyLMSpec:
    """Architecture and training recipe; its fingerprint names the cached weights."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 768  # a multiple of 128, so every Linear's input width takes group size 128
    seq_len: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.05
    seed: int = 0

    def fingerprint(self) -> str:
        recipe = {"version": RECIPE_VERSION, "spec": dataclasses.asdict(self), "text": _text_digest()}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_SPEC = TinyLMSpec()
# A quicker model for tests (~10 s of training on 2 cores): same structure, half the width, two blocks.
SMALL_SPEC = TinyLMSpec(hidden=128, layers=2, heads=4, intermediate=384, steps=250)


class TinyLM(nn.Module):
    """`LlamaForCausalLM` whose forward takes `input_ids` (B, T) int64 and returns logits (B, T, 256)."""

    def __init__(self, spec: TinyLMSpec = DEFAULT_SPEC) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=max(256, spec.seq_len),
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        self.spec = spec
        self.lm = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask keeps transformers off its packed-sequence check (torch.diff), which
        # the TorchScript ONNX exporter cannot export; the causal mask it builds is the same.
        mask = torch.ones_like(input_ids)
        return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


# ---------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _text_bytes() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


@lru_cache(maxsize=1)
def _text_digest() -> str:
    return hashlib.sha256(_text_bytes()).hexdigest()[:16]


def encode(text: str) -> torch.Tensor:
    """Token ids (the UTF-8 bytes) of `text`, int64."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(int(i) for i in ids.reshape(-1)).decode("utf-8", errors="replace")


def text_tokens(split: str) -> torch.Tensor:
    """Byte ids (int64) of the "train" (first 90%) or "test" (last 10%) part of the text."""
    data = np.frombuffer(_text_bytes(), dtype=np.uint8)
    cut = int(len(data) * (1 - HELD_OUT))
    if split == "train":
        part = data[:cut]
    elif split == "test":
        part = data[cut:]
    else:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return torch.from_numpy(part.astype(np.int64))


def windows(tokens: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from the start of `tokens` (all that fit when n is None)."""
    fit = len(tokens) // seq_len
    n = fit if n is None else n
    if not 0 < n <= fit:
        raise DataError(f"{len(tokens)} tokens give 1..{fit} windows of {seq_len}, asked for {n}")
    return tokens[: n * seq_len].view(n, seq_len)


# ---------------------------------------------------------------- quality


def perplexity(
    model_fn: ModelFn,
    tokens: torch.Tensor | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    max_windows: int | None = None,
) -> float:
    """exp(mean negative log-likelihood per predicted token) of `model_fn` on `tokens` (default: held-out text).

    The text is cut into non-overlapping windows of `seq_len`; every token but each window's first is
    predicted. `model_fn(input_ids)` returns logits (B, T, V) as a tensor, numpy array or tuple.
    """
    tokens = text_tokens("test") if tokens is None else tokens
    data = windows(tokens, seq_len)
    if max_windows is not None:
        data = data[:max_windows]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = data[i : i + batch_size]  # (B, T)
            out = model_fn(batch)
            if isinstance(out, (tuple, list)):
                out = out[0]
            logits = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                   reduction="sum")  # fmt: skip
            nll += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


# ---------------------------------------------------------------- training and cache


def train_tiny_lm(model: TinyLM, spec: TinyLMSpec, progress: bool = False, threads: int | None = 1) -> TinyLM:
    """Train `model` in place: AdamW, linear warm-up then cosine decay, random windows of the train text.

    Deterministic for a given spec (seeded sampling; fixed thread count). `threads` torch threads run
    the loop (restored after): one thread is ~1.7x slower than two on idle cores, but on a busy machine
    two threads wait on each other at every op and run up to 10x slower. Returns the model in eval mode.
    """
    tokens = text_tokens("train")
    gen = torch.Generator().manual_seed(spec.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ctx = Context(options=RunOptions(threads=threads, progress=progress))
    offsets = torch.arange(spec.seq_len + 1)
    model.train()
    with ctx.threads_scope():
        for _ in ctx.progress(range(spec.steps), "training tiny-lm"):
            starts = torch.randint(0, len(tokens) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
            chunk = tokens[starts[:, None] + offsets]  # (B, T + 1)
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


def cache_path(spec: TinyLMSpec = DEFAULT_SPEC, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "tiny-lm" / f"{spec.fingerprint()}.safetensors"


def load_tiny_lm(cache_dir: Path | None = None, spec: TinyLMSpec = DEFAULT_SPEC, progress: bool = False) -> TinyLM:
    """The trained `TinyLM` for `spec`, from the cache if a valid entry exists, else trained and cached."""

    def build() -> TinyLM:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(spec.seed)
            return TinyLM(spec)

    def train(model: TinyLM) -> None:
        train_tiny_lm(model, spec, progress=progress)

    return load_or_train(cache_path(spec, cache_dir), build, train, spec.fingerprint(), "tiny-lm")


class TinyLMEntry(ZooEntry):
    name = "tiny-lm"
    description = "Llama-style byte-level LM (3.5M params) trained on Python's docs (held-out perplexity)"
    task = "text-generation"
    input_names = ("input_ids",)

    def __init__(self, spec: TinyLMSpec = DEFAULT_SPEC) -> None:
        self.spec = spec

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        return load_tiny_lm(cache_dir, self.spec)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        return (windows(text_tokens("test"), self.spec.seq_len, batch_size),)  # (B, T)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """`n` windows spread evenly over the train text, in batches of `batch_size`."""
        tokens = text_tokens("train")
        fit = len(tokens) // self.spec.seq_len
        if not 0 < n <= fit:
            raise DataError(f"the train text gives 1..{fit} calibration windows, asked for {n}")
        starts = torch.linspace(0, len(tokens) - self.spec.seq_len, n).long()
        data = tokens[starts[:, None] + torch.arange(self.spec.seq_len)]  # (n, T)
        return [(data[i : i + batch_size],) for i in range(0, n, batch_size)]

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        if data is not None:
            raise DataError(f"tiny-lm evaluates on its held-out text (pydoc_data.topics); got data={data}")
        value = perplexity(model, seq_len=self.spec.seq_len)
        details: dict[str, Any] = {"split": "last 10% of pydoc_data.topics", "unit": "per byte"}
        return Quality(name="perplexity", value=value, higher_is_better=False, details=details)

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        data = windows(text_tokens("test"), self.spec.seq_len)
        for i in range(0, len(data), batch_size):
            yield (data[i : i + batch_size],)


register_entry("tiny-lm", TinyLMEntry)
