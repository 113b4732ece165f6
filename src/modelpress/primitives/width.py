"""Width pruning of transformers scored on calibration activations: attention head groups and FFN neurons.

A unit's importance is what it writes into the residual stream on real inputs, Wanda's score summed over
the unit (`||x_c||_2 * sum_r |W_rc|` for every input column `c` of the output projection it feeds, as in
Wanda and FLAP's structured variants): an FFN neuron is one input column of the down projection, a head
unit (for grouped-query attention: one K/V head with the query heads that share it) the columns of the
output projection its query heads write. Activations come from one pass over the batches, hooks on the
output projections only.

`narrow_transformer` cuts every recognized attention layer and FFN to a kept fraction, in place, and writes
the new widths into the Hugging Face config (`num_attention_heads`, `num_key_value_heads`, `head_dim`,
`intermediate_size`) when every layer has the same widths and the model reads them from there (Llama-style
decoders), so the model saves, reloads and exports at its new size. Attention layouts whose forward is not
known here (OPT's `out_proj`, Phi's `dense`, a user's `q`/`k`/`v`/`out`: `HeadBlock.verify`) keep their heads;
structured pruning tries those on the model first (`prune.blocks`).

    >>> stats = narrow_transformer(llm, heads_keep=2 / 3, ffn_keep=2 / 3, batches=calibration)
    >>> stats["config"]
    {'num_attention_heads': 6, 'num_key_value_heads': 2, 'head_dim': 64, 'intermediate_size': 1024}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelpress.core.errors import BadInputError, DataError
from modelpress.core.modules import run_hooked
from modelpress.primitives.masks import channel_keep
from modelpress.primitives.sparsegpt import column_sq_norms
from modelpress.primitives.transformer_blocks import FFNBlock, HeadBlock, find_ffns, find_heads


def input_sq_norms(model: nn.Module, layers: Sequence[nn.Linear], batches: Sequence[Any]) -> list[torch.Tensor]:
    """Per layer of `layers`: the sum over every token of `batches` of its squared inputs, one value per input."""
    if not batches:
        raise DataError("activation importance runs the model on calibration data: the data set is empty")
    sums: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i: int):  # noqa: ANN202
        def fold(_m: nn.Module, args: tuple[Any, ...]) -> None:
            sums[i] = column_sq_norms(sums[i], args[0])

        return fold

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    run_hooked(model, handles, batches)
    missing = [i for i, s in enumerate(sums) if s is None]
    if missing:
        raise DataError(f"{len(missing)} of the scored layers never ran on the calibration data")
    return [s for s in sums if s is not None]


def _column_scores(layer: nn.Linear, sq: torch.Tensor) -> torch.Tensor:
    """Wanda's `|W_rc| * ||x_c||` summed over the rows r: one score per input column c."""
    return sq.sqrt() * layer.weight.detach().float().abs().sum(dim=0)


def activation_scores(
    model: nn.Module, heads: Sequence[HeadBlock], ffns: Sequence[FFNBlock], batches: Sequence[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per head block: one score per head unit, per FFN: one score per neuron) on `batches`."""
    layers = [b.o for b in heads] + [b.down for b in ffns]
    norms = input_sq_norms(model, layers, batches)
    head_scores = []
    for block, sq in zip(heads, norms[: len(heads)], strict=True):
        cols = _column_scores(block.o, sq)  # (heads * head_dim,)
        head_scores.append(torch.zeros(block.units).index_add_(0, block.q_unit_map(), cols))
    ffn_scores = [_column_scores(b.down, sq) for b, sq in zip(ffns, norms[len(heads) :], strict=True)]
    return head_scores, ffn_scores


def _configs(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs held by `model`'s modules (a decoder's layers share its one)."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_json_string") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def sync_config(model: nn.Module) -> dict[str, Any]:
    """Write the model's current widths into its config where it is the source of them; returns what was
    written, or `{"not_written": reason}`. Llama-style attention (`o_proj`, `head_dim` read from the config) and
    gated FFNs (`intermediate_size`) are written when every layer has the same widths; BERT-style layers derive
    their head size from the hidden size, which a config cannot express with fewer heads, and are left as is."""
    configs = _configs(model)
    if len(configs) != 1:
        return {"not_written": f"the model holds {len(configs)} configs"}
    config, heads, ffns = configs[0], find_heads(model), find_ffns(model)
    written: dict[str, Any] = {}
    if heads and all(b.o_name.endswith("o_proj") for b in heads):
        counts = {(b.num_heads, b.num_kv_heads, b.head_dim) for b in heads}
        if len(counts) != 1:
            return {"not_written": f"the attention layers differ in their head counts: {sorted(counts)}"}
        n_heads, n_kv, head_dim = counts.pop()
        written.update(num_attention_heads=n_heads, head_dim=head_dim)
        if hasattr(config, "num_key_value_heads"):
            written["num_key_value_heads"] = n_kv
    if ffns and all(len(b.ups) == 2 for b in ffns) and hasattr(config, "intermediate_size"):
        widths = {b.units for b in ffns}
        if len(widths) != 1:
            return {"not_written": f"the FFNs differ in their widths: {sorted(widths)}"}
        written["intermediate_size"] = widths.pop()
    for key, value in written.items():
        setattr(config, key, value)
    return written


def kept(units: int, fraction: float, round_to: int = 1) -> int:
    """How many of `units` a kept `fraction` leaves: at least one, rounded up to a multiple of `round_to`."""
    n = max(1, round(fraction * units))
    return min(units, -(-n // round_to) * round_to)


def narrow_transformer(
    model: nn.Module, heads_keep: float, ffn_keep: float, batches: Sequence[Any], round_to: int = 1
) -> dict[str, Any]:
    """Keep `heads_keep` of every attention layer's head units and `ffn_keep` of every FFN's neurons (in place),
    the most important on `batches` (`activation_scores`); returns what was cut. 1.0 keeps that part whole."""
    for name, value in (("heads_keep", heads_keep), ("ffn_keep", ffn_keep)):
        if not 0.0 < value <= 1.0:
            raise BadInputError(f"{name} must be in (0, 1], got {value}")
    heads = [b for b in find_heads(model) if b.skipped is None and not b.verify] if heads_keep < 1 else []
    ffns = find_ffns(model) if ffn_keep < 1 else []
    if not heads and not ffns:
        raise BadInputError(
            f"{type(model).__name__} has no attention layer (Llama-, BERT-style) or FFN (gate/up/down_proj, "
            "fc1/fc2, intermediate/output.dense) that a narrower width can be cut from"
        )
    head_scores, ffn_scores = activation_scores(model, heads, ffns, batches)
    stats: dict[str, Any] = {"heads": {}, "ffn": {}}
    with torch.no_grad():
        for block, scores in zip(heads, head_scores, strict=True):
            n = kept(block.units, heads_keep)
            before = block.num_heads
            block.cut(channel_keep(scores, block.units - n))
            stats["heads"][block.name] = f"{before}->{block.num_heads}"
        for block, scores in zip(ffns, ffn_scores, strict=True):
            n = kept(block.units, ffn_keep, round_to)
            before = block.units
            block.cut(channel_keep(scores, before - n))
            stats["ffn"][block.name] = f"{before}->{block.units}"
    stats["config"] = sync_config(model)
    return stats
