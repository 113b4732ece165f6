"""Save and load quantized models with sub-byte weights packed densely (safetensors).

`QLinear` / `QConv` keep one code per byte in memory (`weight_q` int8/uint8), so a plain state dict of
a 4-bit model is only 4x smaller than fp32. `save_packed` stores each quantized layer's codes with
`pack_bits` (4-bit: two per byte, 3-bit: eight per three bytes) and its scheme in the file's metadata;
`load_packed` rebuilds the layers on the float architecture. Tensors shared between modules (tied
embeddings) are stored once. Group-wise codes are stored without the padding of a short last group
(`QLinear`), which is rebuilt, as the zero point, on load.

    >>> save_packed(qmodel, "model.safetensors")          # 4-bit weights: ~1/8 of fp32
    >>> qmodel2 = load_packed(build_float_model(), "model.safetensors")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import ModelLoadError
from modelpress.core.modules import set_submodule
from modelpress.primitives.affine import QuantScheme, group_codes
from modelpress.primitives.packing import from_unsigned, pack_bits, to_unsigned, unpack_bits
from modelpress.quant.modules import ActSpec, QConv, QLinear

FORMAT = "modelpress.packed/1"
_LAYERS_KEY = "modelpress.quantized_layers"
_ALIASES_KEY = "modelpress.aliases"


def _layer_record(m: QLinear | QConv) -> dict[str, Any]:
    record = {
        "kind": type(m).__name__,
        "scheme": m.weight_scheme.to_dict(),
        "act": m.act.to_dict(),
        "codes_shape": list(m.weight_q.shape),
        "packed": m.weight_scheme.bits < 8,
    }
    if m.weight_q.numel() != m.weight_codes().numel():  # group-padded: the packed codes are (out, in) only
        record["codes_width"] = m.weight_codes().shape[-1]
    return record


def packed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) to write: quantized codes packed, shared tensors once."""
    state = model.state_dict()
    layers: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QConv)):
            record = _layer_record(m)
            layers[name] = record
            if record["packed"]:
                key = f"{name}.weight_q" if name else "weight_q"
                state[key] = pack_bits(to_unsigned(m.weight_codes(), m.weight_scheme), m.weight_scheme.bits)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, t in state.items():
        ident = (t.data_ptr(), t.numel(), tuple(t.shape))
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().clone()
    meta = {"format": FORMAT, _LAYERS_KEY: json.dumps(layers), _ALIASES_KEY: json.dumps(aliases)}
    return tensors, meta


def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Write `model` (float and quantized layers) to `path` as safetensors, low-bit codes packed; atomic."""
    tensors, meta = packed_state_dict(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _rebuild(current: nn.Module, record: dict[str, Any], name: str) -> nn.Module:
    """A quantized layer of the recorded kind, shaped like `current` (its values are overwritten after)."""
    scheme = QuantScheme.from_dict(record["scheme"])
    act = ActSpec.from_dict(record["act"])
    act_range = (0.0, 1.0) if act.mode == "static" else None  # placeholder: the stored qparams replace it
    if isinstance(current, (QLinear, QConv)):
        return current
    if record["kind"] == "QLinear" and isinstance(current, nn.Linear):
        return QLinear.from_float(current, scheme, act, act_range)
    if record["kind"] == "QConv" and isinstance(current, (nn.Conv1d, nn.Conv2d)):
        return QConv(current, scheme, act, act_range)
    raise ModelLoadError(f"layer {name!r} is a {type(current).__name__} in the model but {record['kind']} in the file")


def load_packed(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `save_packed` file into `model` (the float architecture, or the same quantized one); returns it.

    Linear/Conv layers recorded as quantized are replaced by `QLinear`/`QConv` holding the stored codes.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for unreadable files
        raise ModelLoadError(f"cannot read packed weights {path}: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a modelpress packed file (format {meta.get('format')!r})")
    layers = json.loads(meta[_LAYERS_KEY])
    aliases = json.loads(meta[_ALIASES_KEY])
    for name, record in layers.items():
        current = model.get_submodule(name)
        new = _rebuild(current, record, name)
        if new is not current:
            set_submodule(model, name, new)
        key = f"{name}.weight_q" if name else "weight_q"
        if record["packed"]:
            scheme = QuantScheme.from_dict(record["scheme"])
            shape = torch.Size(record["codes_shape"])
            if "codes_width" in record:  # (out, in) codes of a short last group: pad back to whole groups
                width = (shape[0], int(record["codes_width"]))
                codes = from_unsigned(unpack_bits(tensors[key], scheme.bits, width[0] * width[1]).view(width), scheme)
                zp_key = f"{name}.weight_zero_point" if name else "weight_zero_point"
                if zp_key not in tensors:
                    raise ModelLoadError(f"{path} holds no {zp_key} for the group-padded codes of {name!r}")
                tensors[key] = group_codes(codes, tensors[zp_key], scheme)
            else:
                codes = unpack_bits(tensors[key], scheme.bits, shape.numel()).view(shape)
                tensors[key] = from_unsigned(codes, scheme)
    for key, source in aliases.items():
        tensors[key] = tensors[source]
    for name, m in model.named_modules():  # quantized buffers take the stored shapes (group layout, qparams)
        if isinstance(m, (QLinear, QConv)):
            for buf in ("weight_q", "weight_scale", "weight_zero_point", "act_scale", "act_zero_point", "bias"):
                key = f"{name}.{buf}" if name else buf
                if key in tensors and getattr(m, buf) is not None:
                    setattr(m, buf, tensors[key].clone())
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model
