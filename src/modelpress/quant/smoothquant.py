"""SmoothQuant: move activation outliers into the weights before int8 (W8A8) quantization.

A Linear computes `x @ W.T`; with a per-input-channel scale s, `(x / s) @ (W * s).T` is the same
product, and `s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)` flattens the few activation channels
with outliers that a per-tensor activation scale cannot hold, at the cost of a slightly harder
weight. The division by s is folded into the normalization that produces x, so the float model
computes the same function and nothing is added to the hot path:

- pre-norm blocks (Llama, Qwen, Mistral, Gemma: RMSNorm → q/k/v and → gate/up; Phi-3: → qkv and →
  gate_up; OPT; GPT-2: LayerNorm → c_attn and → c_fc; Phi, Falcon: one norm → attention and MLP in
  parallel): the norm's weight (and bias) are divided by s (Gemma's `x * (1 + w)`: `1 + w` is);
- post-LN encoders (BERT, MiniLM): the LayerNorm output is also the residual of the next sub-block,
  so after dividing the LayerNorm by s the residual input of that sub-block's output module is
  multiplied by s again (a stored `residual_scale` buffer, applied by a forward pre-hook).

Linears with no foldable normalization in front (attention output, the second FFN layer whose
input is a GELU/SiLU output) are left as they are; quantize them per token instead. Every fold is
checked on a calibration sample: one that changes the model's output (the norm feeds more than the
layers named, as Gemma 2/3's output norms or a post-LN OPT) is undone, with a warning.

    >>> model = quantize(model, SmoothQuantConfig(alpha=0.5), data=batches)   # float model, rescaled
    >>> model = quantize(model, StaticQuantConfig(), data=batches)            # then int8
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.modules import run_batch, run_hooked, take_batches
from modelpress.core.registry import register
from modelpress.quant.ptq import LayerFilter

FOLD_RTOL = 1e-3  # relative change of the model's output above which a fold is undone


@dataclass(frozen=True)
class SmoothQuantConfig(Config):
    """Fold per-channel activation scales (migration strength `alpha`) into norms and weights."""

    stage = "quantize"

    alpha: float = 0.5
    calibration_batches: int = 16
    # Round s to a power of two: the rescaling is then exact in fp32 and bf16 alike.
    power_of_two: bool = True
    layers: LayerFilter = LayerFilter()

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be >= 1, got {self.calibration_batches}")


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, power_of_two: bool = True
) -> torch.Tensor:
    """s (in_features,) = max|x|^alpha / max|W|^(1-alpha), clamped away from 0 (and rounded to 2^k)."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5, max=1e5)
    return torch.exp2(torch.round(torch.log2(s))) if power_of_two else s


@dataclass
class SmoothGroup:
    """Linears that read the output of one normalization, and how to undo the scaling elsewhere."""

    name: str  # the normalization's qualified name
    norm: nn.Module  # LayerNorm / RMSNorm with a `weight` (and maybe `bias`)
    linears: list[tuple[str, nn.Module]]  # nn.Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out))
    residual_user: nn.Module | None = None  # post-LN: the module whose residual input must be rescaled


def find_groups(model: nn.Module) -> list[SmoothGroup]:
    """Norm → Linear groups of the transformer blocks `model` contains (BERT, Llama-style, GPT-2, ...): the
    first candidate of each norm (`candidate_groups` lists them all)."""
    groups: list[SmoothGroup] = []
    for group in candidate_groups(model):
        if all(g.name != group.name for g in groups):
            groups.append(group)
    return groups


def candidate_groups(model: nn.Module) -> list[SmoothGroup]:
    """Every norm → Linear group the tables match, several per norm where block layouts differ."""
    groups: list[SmoothGroup] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_is_bert_layer(b) for b in module):
            groups += _bert_groups(model, name, module)
        elif isinstance(module, nn.ModuleList) and len(module):
            for i, block in enumerate(module):
                groups += _prenorm_groups(f"{name}.{i}", block)
    return groups


def _is_bert_layer(block: nn.Module) -> bool:
    return all(hasattr(block, a) for a in ("attention", "intermediate", "output")) and hasattr(block.attention, "self")


def _bert_groups(model: nn.Module, list_name: str, layers: nn.ModuleList) -> list[SmoothGroup]:
    # The LayerNorm ahead of layer 0 is the embeddings' one: a sibling `embeddings` of the encoder.
    owner_name = list_name.rsplit(".", 2)[0] if list_name.count(".") >= 2 else ""
    owner = model.get_submodule(owner_name) if owner_name else model
    embed_ln = getattr(getattr(owner, "embeddings", None), "LayerNorm", None)
    prefix = f"{owner_name}." if owner_name else ""
    groups = []
    for i, layer in enumerate(layers):
        at = f"{list_name}.{i}"
        sa = layer.attention.self
        qkv = [(f"{at}.attention.self.{n}", getattr(sa, n)) for n in ("query", "key", "value")]
        if i > 0:
            ln_name, ln = f"{list_name}.{i - 1}.output.LayerNorm", layers[i - 1].output.LayerNorm
        else:
            ln_name, ln = f"{prefix}embeddings.LayerNorm", embed_ln
        if ln is not None:
            groups.append(SmoothGroup(ln_name, ln, qkv, layer.attention.output))
        groups.append(
            SmoothGroup(
                f"{at}.attention.output.LayerNorm",
                layer.attention.output.LayerNorm,
                [(f"{at}.intermediate.dense", layer.intermediate.dense)],
                layer.output,
            )
        )
    return groups


# (norm, its readers) in pre-norm decoder blocks. Per norm the first entry whose modules exist and whose
# fold leaves the model's output unchanged is used, so a parallel block lists every reader first.
_PRENORM = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),  # Phi
    ("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),  # Falcon (parallel)
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # Llama, Qwen, Gemma
    ("input_layernorm", ("self_attn.qkv_proj",)),  # Phi-3
    ("input_layernorm", ("self_attention.query_key_value",)),  # Falcon
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # Gemma 2/3
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),  # Phi-3
    ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),  # Falcon
    ("ln_attn", ("self_attention.query_key_value",)),  # Falcon (new decoder architecture)
    ("ln_mlp", ("mlp.dense_h_to_4h",)),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # OPT
    ("final_layer_norm", ("fc1",)),
    ("ln_1", ("attn.c_attn",)),  # GPT-2
    ("ln_2", ("mlp.c_fc",)),
)
# norm -> a sibling whose presence makes it an output norm (Gemma 2/3 normalize each sub-block's output
# before the residual add; the MLP reads `pre_feedforward_layernorm`)
OUTPUT_NORMS = {"post_attention_layernorm": "pre_feedforward_layernorm"}


def is_output_norm(block: nn.Module, norm_name: str) -> bool:
    """True where `norm_name` in `block` normalizes a sub-block's output rather than a layer's input."""
    sibling = OUTPUT_NORMS.get(norm_name)
    return sibling is not None and getattr(block, sibling, None) is not None


def _prenorm_groups(at: str, block: nn.Module) -> list[SmoothGroup]:
    """Every candidate group of `block`, in table order (several per norm where the layouts differ)."""
    groups = []
    for norm_name, consumers in _PRENORM:
        norm = getattr(block, norm_name, None)
        linears = [(f"{at}.{c}", _get(block, c)) for c in consumers]
        if norm is None or getattr(norm, "weight", None) is None or any(m is None for _, m in linears):
            continue
        if is_output_norm(block, norm_name):
            continue
        groups.append(SmoothGroup(f"{at}.{norm_name}", norm, linears))  # type: ignore[arg-type]
    return groups


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _weight_in_out(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) whatever the layer's storage (GPT-2's Conv1D keeps (in, out))."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def input_absmax(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| (in_features,) of each module's input over `batches`."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for key, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
            x = args[0].detach().flatten(0, -2).abs().amax(0).float()
            stats[key] = torch.maximum(stats[key], x) if key in stats else x

        handles.append(module.register_forward_pre_hook(hook))
    run_hooked(model, handles, batches)
    return stats


def _scale_residual(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply the second input (`input_tensor`, the residual) of a BERT output module by s."""
    if hasattr(module, "residual_scale"):
        module.residual_scale.mul_(s)
        return
    module.register_buffer("residual_scale", s.clone())
    module.register_forward_pre_hook(_residual_hook, with_kwargs=True)


def _residual_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    scale = module.residual_scale
    if len(args) >= 2:
        return (args[0], args[1] * scale.to(args[1].dtype), *args[2:]), kwargs
    residual = kwargs["input_tensor"]
    return args, {**kwargs, "input_tensor": residual * scale.to(residual.dtype)}


def norm_offset(norm: nn.Module) -> float:
    """c in `norm(x) = normalized(x) * (c + weight) + bias`: 0 for LayerNorm / RMSNorm, 1 for Gemma's RMSNorm.

    Measured, not read from the class: the norm is run with its weight set to 0 and to 1 (bias 0).
    """
    weight, bias = norm.weight, getattr(norm, "bias", None)
    saved = [t.detach().clone() for t in (weight, bias) if isinstance(t, torch.Tensor)]
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    try:
        with torch.no_grad():
            if isinstance(bias, torch.Tensor):
                bias.zero_()
            weight.zero_()
            y0 = norm(x).float()
            weight.fill_(1.0)
            slope = norm(x).float() - y0  # normalized(x)
    finally:
        with torch.no_grad():
            for t, old in zip([t for t in (weight, bias) if isinstance(t, torch.Tensor)], saved, strict=True):
                t.copy_(old)
    denom = float((slope * slope).sum())
    return round(float((y0 * slope).sum()) / denom, 4) if denom > 0 else 0.0


@torch.no_grad()
def scale_norm_output(norm: nn.Module, s: torch.Tensor) -> None:
    """Divide the output of `norm` (LayerNorm / RMSNorm, Gemma's `1 + weight` form too) by s per channel."""
    c = norm_offset(norm)
    weight = norm.weight
    s = s.to(weight.dtype)
    if c:
        weight.copy_((weight + c) / s - c)
    else:
        weight.div_(s)
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        norm.bias.div_(s.to(norm.bias.dtype))


@torch.no_grad()
def apply_smoothing(group: SmoothGroup, s: torch.Tensor) -> None:
    """Divide the norm by s, multiply the consumers' input channels by s, fix the residual (post-LN)."""
    scale_norm_output(group.norm, s)
    for _, lin in group.linears:
        if isinstance(lin, nn.Linear):
            lin.weight.mul_(s.to(lin.weight.dtype))  # (out, in) * (in,)
        else:
            lin.weight.mul_(s.to(lin.weight.dtype)[:, None])  # Conv1D: (in, out)
    if group.residual_user is not None:
        _scale_residual(group.residual_user, s)


class _OutputCheck:
    """The model's output on one calibration sample, compared after each fold (it must not move)."""

    def __init__(self, model: nn.Module, batch: Any) -> None:
        self.model = model
        self.batch = _first_sample(batch)
        self.reference = self._run()

    def _run(self) -> torch.Tensor:
        from modelpress.primitives.sequential import first_tensor

        with torch.inference_mode():
            return first_tensor(run_batch(self.model, self.batch)).float()

    def unchanged(self) -> bool:
        out = self._run()
        return bool((out - self.reference).abs().max() <= FOLD_RTOL * max(1.0, float(self.reference.abs().max())))


def _first_sample(batch: Any) -> Any:
    """The first sample of a batch (a tensor, a tuple/list or a dict of tensors), batch axis kept."""

    def first(t: Any) -> Any:
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() else t

    if isinstance(batch, dict):
        return {k: first(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(first(t) for t in batch)
    return first(batch)


def _snapshot(group: SmoothGroup) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _tensors(group)]


def _restore(group: SmoothGroup, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, old in zip(_tensors(group), saved, strict=True):
            t.copy_(old)


def _tensors(group: SmoothGroup) -> list[torch.Tensor]:
    """What `apply_smoothing` changes: the norm's weight and bias, the readers' weights, a residual scale."""
    out = [group.norm.weight]
    if isinstance(getattr(group.norm, "bias", None), torch.Tensor):
        out.append(group.norm.bias)
    out += [m.weight for _, m in group.linears]
    user = group.residual_user
    if user is not None and not hasattr(user, "residual_scale"):  # a scale of ones, so that it can be restored
        user.register_buffer("residual_scale", torch.ones(group.norm.weight.shape[0], dtype=group.norm.weight.dtype))
        user.register_forward_pre_hook(_residual_hook, with_kwargs=True)
    if user is not None:
        out.append(user.residual_scale)
    return out


@register(SmoothQuantConfig)
def smoothquant(model: nn.Module, cfg: SmoothQuantConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    if ctx.data is None:
        raise DataError("SmoothQuant needs calibration data: pass data=... (CLI: --data) or use a zoo model")
    groups = [g for g in candidate_groups(model) if all(cfg.layers.selects(n, type(m).__name__) for n, m in g.linears)]
    if not groups:  # e.g. a CNN under the int8-smooth recipe: the next pass quantizes it unsmoothed
        ctx.warn(
            "SmoothQuant found no normalization → Linear groups to rescale (it supports BERT-style post-LN "
            "encoders and Llama/Qwen/Gemma/Phi/Falcon/OPT/GPT-2-style pre-norm blocks); the model is left as it is"
        )
        ctx.report.add_pass("quantize/smoothquant", time.perf_counter() - start, alpha=cfg.alpha, groups=0)
        return model
    batches = take_batches(ctx.data, cfg.calibration_batches)
    if not batches:
        raise DataError("the calibration set is empty: SmoothQuant needs real input batches (--data)")
    firsts = {g.linears[0][0]: g.linears[0][1] for g in groups}  # the readers of one norm share one input
    act = input_absmax(model, firsts, list(ctx.progress(batches, "smoothing", total=len(batches))))
    check = _OutputCheck(model, batches[0])
    migrated: dict[str, float] = {}
    done: dict[str, SmoothGroup] = {}
    refused: dict[str, SmoothGroup] = {}
    for g in groups:
        first = g.linears[0][0]
        if g.name in done:
            continue
        if first not in act:
            ctx.warn(f"SmoothQuant: {g.name} was not reached by the calibration batches; left unscaled")
            done[g.name] = g
            continue
        w_absmax = torch.cat([_weight_in_out(m).detach().abs() for _, m in g.linears]).amax(0)
        s = smoothing_scales(act[first], w_absmax, cfg.alpha, cfg.power_of_two)
        saved = _snapshot(g)
        apply_smoothing(g, s)
        if not check.unchanged():  # the norm feeds more than these layers, or is no plain scale
            _restore(g, saved)
            refused[g.name] = g
            continue
        done[g.name] = g
        refused.pop(g.name, None)
        # How much flatter the input got: max/median of per-channel |x| before and after.
        a = act[first].clamp(min=1e-8)
        migrated[g.name] = round(float((a.max() / a.median()) / ((a / s).max() / (a / s).median())), 2)
    if unfolded := [n for n in refused if n not in done]:
        shown = ", ".join(unfolded[:4]) + (f" and {len(unfolded) - 4} more" if len(unfolded) > 4 else "")
        ctx.warn(
            f"SmoothQuant: dividing {len(unfolded)} norm(s) ({shown}) by the scales changes the model's output "
            "(each feeds more than the layers after it, e.g. a residual); left unscaled"
        )
    groups = [done[n] for n in migrated]
    ctx.report.add_pass(
        "quantize/smoothquant",
        time.perf_counter() - start,
        alpha=cfg.alpha,
        groups=len(migrated),
        layers=[n for g in groups for n, _ in g.linears],
        outlier_ratio_reduction=migrated,
    )
    return model


def smooth(model: nn.Module, config: SmoothQuantConfig, data: Iterable[Any], ctx: Context | None = None) -> nn.Module:
    """Rescale `model` in place with SmoothQuant; the float outputs stay the same up to rounding."""
    ctx = ctx or Context()
    ctx.data = data
    with ctx.threads_scope():
        return smoothquant(model.eval(), config, ctx)
