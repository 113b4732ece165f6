"""Which attention heads and FFN neurons structured pruning cuts: found, verified, scored.

Recognized layouts (`primitives.transformer_blocks`) are cut as they are. An attention layer a user wrote
(`q`/`k`/`v`/`out` with a `heads` count) is tried first on a copy of the model with fewer heads: a forward
that computes the head width from the input width (`x.view(b, t, heads, d // heads)` with `d` the input's
width) does not survive the cut, and such a layer keeps its heads, with the reason. `nn.MultiheadAttention`
keeps its heads (its width is tied to `embed_dim`). Scores come from the config's weight importance, or, with
`importance: activation`, from the calibration data (`primitives.width.activation_scores`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from modelpress.core.context import Context
from modelpress.core.errors import BadInputError
from modelpress.core.modules import take_batches
from modelpress.primitives.masks import channel_keep
from modelpress.primitives.transformer_blocks import FFNBlock, HeadBlock, find_ffns, find_heads, fixed_attention
from modelpress.primitives.width import activation_scores
from modelpress.prune.stats import eval_mode

Plan = list[tuple[Any, torch.Tensor]]
Scorer = Callable[[list[tuple[Any, ...]]], torch.Tensor]


def n_prune(units: int, ratio: float) -> int:
    """How many of `units` a pruned `ratio` removes (a layer keeps at least one unit)."""
    return min(int(round(ratio * units)), units - 1)


def excluded(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(re.search(p, n) for p in patterns for n in names)


def _trial(model: nn.Module, example: tuple[Any, ...], names: list[str], ratio: float) -> str | None:
    """Cut the head blocks `names` of a copy of `model` and run it on `example`; the error, or None if it runs."""
    trial = copy.deepcopy(model)
    blocks = {b.name: b for b in find_heads(trial)}
    with torch.no_grad():
        for name in names:
            block = blocks[name]
            block.cut(torch.arange(block.units - n_prune(block.units, ratio)))
        try:
            with eval_mode(trial):
                trial(*example)
        except Exception as e:  # the user's forward, whatever it raises
            return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def head_blocks(
    model: nn.Module, ratio: float, example: tuple[Any, ...] | None, ctx: Context
) -> tuple[list[HeadBlock], list[str]]:
    """The attention layers whose heads can be cut at `ratio`, and why the others found keep theirs (warned)."""
    found = find_heads(model)
    kept: list[str] = []
    for name, reason in fixed_attention(model).items():
        ctx.warn(f"kept the heads of {name}: {reason}")
        kept.append(f"{name}: {reason}")
    unknown = [b for b in found if b.verify and b.skipped is None]
    if unknown:
        if example is None:
            for b in unknown:
                b.skipped = "its forward is not known and there is no example input to try it with fewer heads"
        elif (error := _trial(model, example, [b.name for b in unknown], ratio)) is not None:
            for b in unknown:
                b.skipped = (
                    f"{type(b.owner).__name__}'s forward no longer runs with fewer heads ({error}); it computes its "
                    "head width from its input width"
                )
    for block in found:
        if block.skipped is not None:
            ctx.warn(f"kept the heads of {block.name}: {block.skipped}")
            kept.append(str(block.skipped))
    return [b for b in found if b.skipped is None], kept


def no_blocks_error(model: nn.Module, what: str, kept: Sequence[str] = ()) -> BadInputError:
    """The refusal of a heads / FFN ratio that finds nothing to cut; `kept`: why the attention layers found keep
    their heads."""
    if kept:
        return BadInputError(
            f"{what} but no attention layer of {type(model).__name__} can be cut: {'; '.join(kept[:3])}"
        )
    return BadInputError(
        f"{what} but {type(model).__name__} has no recognized attention layer (BERT-style query/key/value, "
        "Llama-style q_proj/k_proj/v_proj/o_proj, or q/k/v/out with a head count) nor FFN "
        "(intermediate.dense/output.dense, gate_proj/up_proj/down_proj, fc1/fc2, linear1/linear2, "
        "Sequential(Linear, activation, Linear))"
    )


def plan(
    blocks: Sequence[HeadBlock] | Sequence[FFNBlock],
    ratio: float,
    round_to: int,
    exclude: Sequence[str],
    score: Scorer | Sequence[torch.Tensor],
) -> Plan:
    """(block, kept units) of every block not excluded; `score` scores a block's members, or is given per block."""
    out: Plan = []
    for i, b in enumerate(blocks):
        if excluded([b.name, *b.linear_names], exclude):
            continue
        scores = score[i] if isinstance(score, Sequence) else score(b.members())
        out.append((b, channel_keep(scores, n_prune(b.units, ratio), min_keep=1, round_to=round_to)))
    return out


def activation_plans(
    model: nn.Module,
    heads: tuple[list[HeadBlock], float],
    ffns: tuple[list[FFNBlock], float],
    ctx: Context,
    batches: int,
    settings: tuple[int, Sequence[str]],
) -> tuple[Plan, Plan]:
    """Head and FFN plans scored on `batches` calibration batches (`importance: activation`)."""
    if ctx.data is None:
        raise BadInputError("importance 'activation' scores heads and FFN neurons on calibration data: pass --data")
    data = take_batches(ctx.data, batches)
    round_to, exclude = settings
    with eval_mode(model):
        head_scores, ffn_scores = activation_scores(model, heads[0], ffns[0], data)
    return (
        plan(heads[0], heads[1], 1, exclude, head_scores),
        plan(ffns[0], ffns[1], round_to, exclude, ffn_scores),
    )


def untraced_ffns(model: nn.Module, graph: Any, taken: set[str]) -> list[FFNBlock]:
    """The FFNs channel pruning cuts by their recognized layout: those the traced graph did not cut (inside a
    leaf such as `nn.TransformerEncoderLayer`, or across untraced parts of a model traced by parts), unless one
    of their projections is in a group of the graph, or their neurons are kept whole for a reason other than
    the end of a traced part."""
    in_groups = {n for g in graph.groups for n in (*g.producers, *g.norms, *(c[0] for c in g.consumers))}
    out = []
    for block in find_ffns(model):
        names = block.linear_names
        if any(n in taken or n in in_groups for n in names):
            continue
        reasons = [r for n in names[:-1] for r in graph.blocked.get(n, [])]
        if all(r == "reaches the model output" for r in reasons):
            out.append(block)
    return out


__all__ = [
    "n_prune",
    "excluded",
    "head_blocks",
    "no_blocks_error",
    "plan",
    "activation_plans",
    "find_ffns",
    "untraced_ffns",
]
