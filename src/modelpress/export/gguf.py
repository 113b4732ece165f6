"""GGUF export: a quantized causal LM for llama.cpp, written from our integer codes (no re-rounding).

GGML's legacy block types hold 32 consecutive values of a row (along the input width, like our groups)
with one fp16 scale, so a `QLinear` whose groups are multiples of 32 maps onto them code for code:

    ours (scheme)                               GGML   block value             codes written
    symmetric, bits <= 4                        Q4_0   d * (nibble - 8)        nibble = q + 8
    asymmetric, bits <= 4                       Q4_1   d * nibble + m          nibble = q, m = -zero_point * d
    symmetric, 5 bits                           Q5_0   d * (v - 16)            v = q + 16 (4 low bits + 1 high)
    asymmetric, 5 bits                          Q5_1   d * v + m               v = q, m = -zero_point * d
    symmetric, bits <= 8                        Q8_0   d * q                   q (int8)
    asymmetric, bits <= 7                       Q8_0   d * q                   q - zero_point (fits int8)
    anything else, widths not a multiple of 32  F16 / F32 of the dequantized weight, with the reason

`d` is our scale (per output row and group; per row for `channel`), stored in fp16: where the fp32 scale
(or Q4_1's / Q5_1's offset) is not an fp16 value, GGUF's weight differs from ours by that rounding, which the
returned report measures per tensor. `gguf_scale` gives the nearest scale GGUF stores exactly; a
quantization pass that picks it before choosing its codes makes the file bit-exact (`snap_to_gguf`
does it afterwards on a quantized layer, keeping its codes).

Names, layout and metadata follow llama.cpp's `convert_hf_to_gguf.py` for Llama (and Mistral, written
as `llama`) and Qwen2, including the row permutation of Q and K that llama.cpp's rotary embedding
expects for `llama` (rows are permuted whole, so codes stay exact).

    >>> report = export_gguf(qmodel, "model.gguf", tokenizer=tok)   # or source_gguf="original.gguf"
    >>> report["tensors"]["blk.0.attn_q.weight"]["type"]            # 'Q4_0'
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import BadInputError
from modelpress.core.numerics import exactly
from modelpress.quant.modules import QEmbedding, QLinear, QuantBase, holds_table_codes

BLOCK = 32  # values per GGML block (QK4_0 = QK4_1 = QK8_0)
FP16_MAX = 65504.0
FP16_BITS = 11  # significand bits of fp16, the implicit one included
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
# transformers model_type -> (GGUF architecture, Q/K rows permuted for llama.cpp's rotary embedding)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
_EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # our codes written block for block
_WRAPPER_ATTRS = ("hf", "lm", "model", "module")


# ---- fp16-exact scales -------------------------------------------------------------------------


def gguf_scale(scale: torch.Tensor, zero_point: torch.Tensor | int = 0) -> torch.Tensor:
    """The positive scale nearest `scale` that GGUF stores exactly (fp32 out, same shape).

    GGML blocks keep the scale in fp16; Q4_1 also keeps the offset `-zero_point * scale` in fp16, so
    for asymmetric codes the scale gets fewer significant bits (11 minus those of the zero point) and
    the product stays an fp16 value. Pass the scheme's largest code (`2**bits - 1`) when the zero
    points are chosen after the scale. With such a scale, our `(q - zero_point) * scale` and GGML's
    block value are the same fp32 number.

        >>> scale = gguf_scale(scale, 0 if scheme.symmetric else scheme.qmax)  # then choose zp and codes
    """
    s = scale.detach().float()
    if (s > FP16_MAX).any() or not torch.isfinite(s).all():
        raise ValueError(f"scales above the fp16 range ({FP16_MAX}) cannot be stored in GGUF blocks")
    zp = torch.as_tensor(zero_point, dtype=torch.float32).abs()
    zp_bits = torch.where(zp > 0, torch.floor(torch.log2(zp.clamp(min=1))) + 1, torch.zeros_like(zp))
    keep = FP16_BITS - zp_bits  # significant bits the scale may have
    _, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    ulp = torch.clamp(torch.pow(2.0, exp.float() - keep), min=FP16_TINY)
    out = torch.round(s / ulp) * ulp
    return torch.where(out > 0, out, ulp)


def _offset_bits(layer: QuantBase | QEmbedding) -> torch.Tensor | int:
    scheme = layer.weight_scheme
    if isinstance(layer, QEmbedding) or scheme.symmetric or scheme.bits > 5:
        return 0  # Q4_0 / Q5_0 / Q8_0: only the scale is stored
    return layer.weight_zero_point


def snap_to_gguf(layer: QLinear | QEmbedding) -> float:
    """Replace `layer`'s scales by `gguf_scale` of them, keeping its codes; returns the largest relative change.

    Afterwards the eager layer and its GGUF tensor hold the same weight, bit for bit. The codes were
    chosen for the old scales: a pass that calls `gguf_scale` before choosing codes loses nothing.
    """
    old = layer.weight_scale
    new = gguf_scale(old, _offset_bits(layer)).to(old.dtype)
    layer.weight_scale = new
    return float(((new - old).abs() / old.abs().clamp(min=1e-30)).max())


# ---- one tensor ----------------------------------------------------------------------------------


def _codes(layer: QLinear | QEmbedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """(codes, scale, zero point), each (rows, width), or why they cannot be read."""
    if isinstance(layer, QEmbedding):
        codes = layer.codes().to(torch.int32)
        scale = layer.weight_scale.float().repeat_interleave(layer.group_size, dim=1)
        zp = torch.zeros_like(codes)
        return codes, scale, zp
    rows, width = layer.out_features, layer.in_features
    q = layer.weight_q
    try:  # grouped storage is (out, G, group_size), a short last group padded: cut back to (out, in)
        scale = torch.broadcast_to(layer.weight_scale.float(), q.shape).reshape(rows, -1)[:, :width]
        zp = torch.broadcast_to(layer.weight_zero_point.to(torch.int32), q.shape).reshape(rows, -1)[:, :width]
        codes = q.to(torch.int32).reshape(rows, -1)[:, :width]
        if codes.shape[1] != width:
            raise RuntimeError("fewer codes than weights")
    except RuntimeError:
        return (
            f"its code layout ({tuple(q.shape)}, scales {tuple(layer.weight_scale.shape)}) is not one GGUF export reads"
        )
    if not torch.equal((codes - zp).float() * scale, layer.dequantized_weight().float().reshape(rows, width)):
        return "its codes, scales and zero points do not reproduce its weight in the layout GGUF export reads"
    return codes, scale, zp


def _block_type(layer: QLinear | QEmbedding, scale: torch.Tensor, zp: torch.Tensor) -> QType | str:
    """The GGML type holding `layer`'s codes exactly, or why there is none."""
    scheme = layer.weight_scheme
    width = scale.shape[1]
    if width % BLOCK:
        return f"its input width {width} is not a multiple of {BLOCK} (one GGML block)"
    if scheme.granularity == "group" and scheme.group_size % BLOCK and scheme.group_size < width:
        return f"group size {scheme.group_size} is not a multiple of {BLOCK}: a GGML block has one scale"
    blocks = (scale.reshape(scale.shape[0], -1, BLOCK), zp.reshape(zp.shape[0], -1, BLOCK))
    if any(not torch.equal(b, b[..., :1].expand_as(b)) for b in blocks):
        return f"its scales change inside a {BLOCK}-value block (a ragged group)"
    if scheme.symmetric and scheme.bits <= 4:
        qtype = QType.Q4_0
    elif scheme.bits <= 4:
        qtype = QType.Q4_1
    elif scheme.bits == 5:
        qtype = QType.Q5_0 if scheme.symmetric else QType.Q5_1
    elif scheme.symmetric and scheme.bits <= 8:
        qtype = QType.Q8_0
    elif scheme.bits <= 7:
        qtype = QType.Q8_0  # q - zero_point lies in [-127, 127]
    else:
        sym = "symmetric" if scheme.symmetric else "asymmetric"
        return f"{sym} {scheme.bits}-bit codes have no exact GGML block type (Q8_0 holds signed 8-bit codes)"
    if float(scale.abs().max()) > FP16_MAX:
        return "its scales exceed the fp16 range of GGML block scales"
    return qtype


def _pack_blocks(qtype: QType, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> np.ndarray:
    """GGML blocks (rows, width / 32 * bytes per block) built from our codes."""
    rows, width = codes.shape
    nb = width // BLOCK
    d = scale[:, ::BLOCK].numpy().astype(np.float16).view(np.uint8).reshape(rows, nb, 2)  # (R, nb, 2)
    q = codes.reshape(rows, nb, BLOCK).numpy()
    z = zp[:, ::BLOCK].reshape(rows, nb, 1).numpy()
    if qtype == QType.Q8_0:
        qs = (q - z).astype(np.int8).view(np.uint8)  # (R, nb, 32)
        return np.ascontiguousarray(np.concatenate([d, qs], axis=-1).reshape(rows, -1))
    offset = {QType.Q4_0: 8, QType.Q5_0: 16}.get(qtype, 0)  # symmetric types store q + offset, unsigned
    v = (q + offset).astype(np.uint32)  # 0..15 (Q4_x) or 0..31 (Q5_x)
    nib = (v & 15).astype(np.uint8)
    qs = nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2 :] << np.uint8(4))  # value j low, j + 16 high
    parts = [d]
    if qtype in (QType.Q4_1, QType.Q5_1):
        m = (-(z.astype(np.float32)) * scale[:, ::BLOCK].reshape(rows, nb, 1).numpy()).astype(np.float16)
        parts.append(m.view(np.uint8).reshape(rows, nb, 2))
    if qtype in (QType.Q5_0, QType.Q5_1):  # the fifth bit of value j is bit j of a little-endian uint32
        qh = ((v >> 4) << np.arange(BLOCK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
        parts.append(qh.astype("<u4").view(np.uint8).reshape(rows, nb, 4))
    parts.append(qs)
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))


def _qk_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp expects for Q/K of `llama`: per head, (2, head_dim / 2) rows -> (head_dim / 2, 2)."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _float_array(w: torch.Tensor, float_type: str) -> tuple[np.ndarray, str | None]:
    w = w.detach().float()
    if w.dim() == 1:
        return w.numpy(), None  # norms and biases: llama.cpp reads them as F32
    if float_type == "f16":
        if float(w.abs().max()) <= FP16_MAX:
            return w.numpy().astype(np.float16), None
        return w.numpy(), "values beyond the fp16 range: written F32"
    return w.numpy(), None


# ---- the model -----------------------------------------------------------------------------------


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside `model` (itself, or held by `.hf` / `.lm` / `.model` / ...)."""
    seen: list[nn.Module] = []
    todo = [model]
    other = None  # a causal LM of another layout (GPT-2's transformer.h, OPT's model.decoder, ...)
    while todo:
        m = todo.pop(0)
        if any(m is s for s in seen):
            continue
        seen.append(m)
        if hasattr(m, "config") and hasattr(m, "lm_head") and hasattr(getattr(m, "model", None), "layers"):
            return m
        if other is None and hasattr(m, "config") and hasattr(m, "lm_head"):
            other = m
        todo += [getattr(m, a) for a in _WRAPPER_ATTRS if isinstance(getattr(m, a, None), nn.Module)]
    if other is not None:
        kind = getattr(other.config, "model_type", None) or type(other).__name__
        raise BadInputError(
            f"GGUF export writes {', '.join(ARCHITECTURES)} models (llama.cpp's llama / qwen2 layout), not {kind!r} "
            f"({type(other).__name__})"
        )
    raise BadInputError(
        f"{type(model).__name__} is not a transformers causal LM (no .config, .lm_head and .model.layers, "
        f"itself or under .{', .'.join(_WRAPPER_ATTRS)}): GGUF export writes Llama, Mistral and Qwen2 models"
    )


def _architecture(lm: nn.Module) -> tuple[str, bool, list[str]]:
    config = lm.config
    kind = getattr(config, "model_type", type(lm).__name__)
    if kind not in ARCHITECTURES:
        raise BadInputError(
            f"GGUF export writes {', '.join(ARCHITECTURES)} models (llama.cpp's llama / qwen2 layout), not {kind!r}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise BadInputError(f"llama.cpp's {kind} runs SiLU MLPs; this model uses {config.hidden_act!r}")
    notes = []
    if getattr(config, "use_sliding_window", False):
        raise BadInputError("Qwen2 with use_sliding_window=True has no llama.cpp equivalent in the qwen2 layout")
    window = getattr(config, "sliding_window", None)
    if kind == "mistral" and window and window < config.max_position_embeddings:
        notes.append(f"sliding window {window} is not written: llama.cpp attends over the whole context")
    arch, permute = ARCHITECTURES[kind]
    return arch, permute, notes


def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return float(theta), None
    if kind == "linear":
        return float(theta), {"factor": float(params["factor"])}
    raise BadInputError(f"rope scaling {kind!r} is not written to GGUF yet (default and linear are)")


def _tensors(lm: nn.Module, arch: str, permute: bool, float_type: str) -> tuple[list[tuple[str, Any]], dict]:
    """[(gguf name, (array, qtype or None))], and the per-tensor report."""
    config = lm.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    out: list[tuple[str, Any]] = []
    report: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInputError(f"{hf_name} has no place in llama.cpp's {arch} layout")
        return name

    def rows_of(hf_name: str) -> torch.Tensor | None:
        if not permute:
            return None
        if ".q_proj." in hf_name:
            return _qk_rows(heads * config.head_dim, heads)
        if ".k_proj." in hf_name:
            return _qk_rows(kv_heads * config.head_dim, kv_heads)
        return None

    def add_float(hf_name: str, w: torch.Tensor, reason: str | None) -> None:
        rows = rows_of(hf_name)
        if rows is not None:
            w = w[rows]
        array, why = _float_array(w, float_type)
        name = gguf_name(hf_name)
        qtype = QType.F16 if array.dtype == np.float16 else QType.F32
        report[name] = {"source": hf_name, "type": qtype.name, "shape": list(w.shape), "reason": why or reason}
        out.append((name, (array, None)))

    tables = [m for m in lm.modules() if isinstance(m, QEmbedding)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for mod_name, mod in lm.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if tied and isinstance(mod, QLinear) and any(holds_table_codes(mod, t) for t in tables):
            # the tied head holds the table's own codes: llama.cpp reads token_embd for the output (no `output`)
            report[gguf_name(f"{prefix}weight")] = {"source": f"{prefix}weight", "type": "tied to token_embd",
                                                    "reason": None}  # fmt: skip
            continue
        if isinstance(mod, (QLinear, QEmbedding)):
            hf_name = f"{prefix}weight"
            got = _codes(mod)
            qtype = got if isinstance(got, str) else _block_type(mod, got[1], got[2])
            if isinstance(qtype, str):
                add_float(hf_name, mod.dequantized_weight(), f"quantized, but {qtype}: dequantized")
            else:
                codes, scale, zp = got  # type: ignore[misc]
                rows = rows_of(hf_name)
                if rows is not None:
                    codes, scale, zp = codes[rows], scale[rows], zp[rows]
                blocks = _pack_blocks(qtype, codes, scale, zp)
                name = gguf_name(hf_name)
                ours = ((codes - zp).float() * scale).numpy()
                diff = np.abs(gguf.quants.dequantize(blocks, qtype) - ours)
                nonzero = ours != 0
                report[name] = {
                    "source": hf_name,
                    "type": qtype.name,
                    "shape": list(codes.shape),
                    "scheme": mod.weight_scheme.to_dict(),
                    "max_abs_diff": float(diff.max()),
                    "max_rel_diff": float((diff[nonzero] / np.abs(ours[nonzero])).max(initial=0.0)),
                    "max_step_diff": float((diff / scale.numpy()).max()),  # in quantization steps
                    "reason": None,
                }
                if isinstance(mod, QLinear) and mod.act.mode != "none":
                    report[name]["note"] = (
                        f"{mod.act.mode} activation quantization is not carried: llama.cpp quantizes activations itself"
                    )
                out.append((name, (blocks, qtype)))
            if isinstance(mod, QLinear) and mod.bias is not None:
                add_float(f"{prefix}bias", mod.bias, None)
            continue
        if isinstance(mod, QuantBase):
            raise BadInputError(f"{mod_name} is a {type(mod).__name__}: a causal LM in GGUF holds no such layer")
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied: the output projection is token_embd (`output` left out, as llama.cpp expects)
            seen.add(id(p))
            add_float(f"{prefix}{p_name}", p, "not quantized" if p.dim() > 1 else None)
    return out, report


# ---- tokenizer -----------------------------------------------------------------------------------


def _copy_tokenizer(writer: gguf.GGUFWriter, source: str | Path, n_vocab: int) -> str:
    reader = gguf.GGUFReader(source)
    keys = [k for k in reader.fields if k.startswith("tokenizer.")]
    if "tokenizer.ggml.tokens" not in keys:
        raise BadInputError(f"{source} holds no tokenizer (no tokenizer.ggml.tokens)")
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_tokens != n_vocab:
        raise BadInputError(f"{source} has {n_tokens} tokens but the model's embedding has {n_vocab} rows")
    for key in keys:
        field = reader.fields[key]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    return f"copied from {Path(source).name} ({len(keys)} tokenizer.* keys)"


# llama.cpp's pre-tokenizer name for a split regex followed by byte-level pre-tokenization without its own
# regex (the pattern transformers' Qwen2 / Llama 3 tokenizers write; llama.cpp's llama-vocab.cpp has the same)
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # up to three digits
}


def _bpe_pre(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE pre-tokenizer we recognise by structure."""

    def byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre is None:
        return None
    if byte_level(pre):
        return "gpt2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[0].get("behavior") == "Isolated"
        and not parts[0].get("invert")
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
    ):
        return _SPLIT_PATTERNS.get(parts[0].get("pattern", {}).get("Regex", ""))
    if (
        len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and byte_level(parts[1])
    ):
        return "smollm"  # single digits, then GPT-2's split
    return None


def _build_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int, pre_name: str | None) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadInputError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: GGUF export builds byte-level BPE "
            "vocabularies only; pass source_gguf= to copy a GGUF file's tokenizer"
        )
    spec = json.loads(backend.to_str())
    model_kind = spec.get("model", {}).get("type")
    pre = spec.get("pre_tokenizer")
    is_byte_level = json.dumps(pre).find('"ByteLevel"') >= 0 or json.dumps(spec.get("decoder")).find("ByteLevel") >= 0
    if model_kind != "BPE" or not is_byte_level:
        kind = model_kind if model_kind != "BPE" else "BPE without byte-level pre-tokenization (SentencePiece-style)"
        raise BadInputError(
            f"the tokenizer is {kind}: GGUF export builds byte-level (GPT-2 style) BPE vocabularies only; "
            "pass source_gguf= to copy a GGUF file's tokenizer"
        )
    pre_name = pre_name or _bpe_pre(pre)
    if pre_name is None:
        raise BadInputError(
            f"llama.cpp needs the pre-tokenizer's name and this one is not recognised ({json.dumps(pre)[:200]}); "
            "pass tokenizer_pre= with the name llama.cpp's convert_hf_to_gguf.py gives it"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise BadInputError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # merges, special ids, add_bos, chat template: gguf reads the files
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return f"built: gpt2 BPE, pre-tokenizer {pre_name!r}, {len(vocab)} tokens"


# ---- entry point ---------------------------------------------------------------------------------


@exactly
def export_gguf(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    source_gguf: str | Path | None = None,
    name: str | None = None,
    float_type: Literal["f16", "f32"] = "f16",
    tokenizer_pre: str | None = None,
) -> dict[str, Any]:
    """Write `model` (a transformers Llama / Mistral / Qwen2 causal LM, possibly wrapped, its Linear and
    Embedding layers possibly quantized) to `path` as GGUF for llama.cpp; atomic. Returns a report: each
    tensor's GGML type, its difference from our weight, and why any weight is not a quantized block.

    The tokenizer is copied from `source_gguf` (every `tokenizer.*` key) or built from a byte-level BPE
    `tokenizer` (transformers, fast); without either, the file has no vocabulary (llama.cpp then takes
    token ids only). Float weights are written as `float_type` (norms and biases always F32).

        >>> report = export_gguf(qmodel, "out/model.gguf", source_gguf="SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    if float_type not in ("f16", "f32"):
        raise BadInputError(f"float_type must be 'f16' or 'f32', got {float_type!r}")
    lm = find_causal_lm(model)
    arch, permute, notes = _architecture(lm)
    config = lm.config
    theta, scaling = _rope(config)
    tensors, report = _tensors(lm, arch, permute, float_type)
    n_vocab = int(lm.get_input_embeddings().num_embeddings)
    counts: Counter[QType] = Counter()
    for _, (array, qtype) in tensors:  # the file type: the type most weight values are stored in
        if array.ndim == 2 and qtype is not None:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            counts[qtype] += array.size // type_size * block_size  # bytes of blocks -> values
        elif array.ndim == 2:
            counts[QType.F16 if array.dtype == np.float16 else QType.F32] += array.size
    file_type = _FILE_TYPES[counts.most_common(1)[0][0]] if counts else gguf.LlamaFileType.ALL_F32
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("model")
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "") or "modelpress")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            tok = _copy_tokenizer(writer, source_gguf, n_vocab)
        elif tokenizer is not None:
            tok = _build_tokenizer(writer, tokenizer, n_vocab, tokenizer_pre)
        else:
            tok = None
            notes.append("no tokenizer written: llama.cpp can run the file on token ids only")
        for tname, (array, qtype) in tensors:
            writer.add_tensor(tname, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    quantized = {k: v for k, v in report.items() if v["type"] in _EXACT_TYPES}
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "architecture": arch,
        "file_type": file_type.name,
        "tokenizer": tok,
        "tensors": report,
        "quantized": len(quantized),
        "not_quantized": {k: v["reason"] for k, v in report.items() if k not in quantized and v["reason"]},
        "max_abs_diff": max((v["max_abs_diff"] for v in quantized.values()), default=0.0),
        "max_rel_diff": max((v["max_rel_diff"] for v in quantized.values()), default=0.0),
        "max_step_diff": max((v["max_step_diff"] for v in quantized.values()), default=0.0),
        "notes": notes,
    }
