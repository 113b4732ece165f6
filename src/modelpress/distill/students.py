"""Students built from the teacher, so distillation starts from good weights instead of random ones.

>>> student = fewer_layers(minilm, [0, 2, 4])       # 3 of 6 BERT layers, weights copied
>>> student = narrower_cnn(digits_cnn, 0.5)          # half the channels, kept by L1 importance
>>> student = build_student(teacher, StudentConfig(layers=(0, 2, 4)))
>>> student = build_student(llm, StudentConfig(depth_ratio=0.67), data=batches)   # least influential blocks cut
>>> student = build_student(llm, StudentConfig(width_ratio=0.67), data=batches)   # 2/3 of heads and FFN neurons
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelpress.core.errors import BadInputError, DataError
from modelpress.core.modules import run_hooked
from modelpress.distill.config import StudentConfig
from modelpress.distill.outputs import hf_model, transformer_blocks
from modelpress.primitives.width import narrow_transformer


def fewer_layers(teacher: nn.Module, layers: Sequence[int] | None = None) -> nn.Module:
    """A copy of a transformer (BERT-, Llama-style) keeping only the teacher blocks `layers`, in order.

    `layers=None` keeps every other block (0, 2, 4, ...). The model config's layer count follows.
    """
    blocks = transformer_blocks(teacher)
    if blocks is None:
        raise BadInputError(
            f"{type(teacher).__name__} has no transformer blocks (looked for encoder.layer, model.layers, ...); "
            "give a student model or use width_ratio for a CNN"
        )
    n = len(blocks)
    keep = list(range(0, n, 2)) if layers is None or len(layers) == 0 else list(layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise BadInputError(f"student layers {bad} are out of range: the teacher has {n} layers (0..{n - 1})")
    if len(keep) >= n:
        raise BadInputError(f"a student must keep fewer than the teacher's {n} layers, got {keep}")
    student = copy.deepcopy(teacher)
    student_blocks = transformer_blocks(student)
    assert student_blocks is not None
    kept = nn.ModuleList([student_blocks[i] for i in keep])
    for new_idx, block in enumerate(kept):
        for m in block.modules():  # decoder attention indexes its KV cache by layer
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    _replace_blocks(student, student_blocks, kept)
    student.teacher_layers = tuple(keep)  # the teacher block each student block starts from (hidden-state pairs)
    hf = hf_model(student)
    if hf is not None:
        cfg = hf.config
        cfg.num_hidden_layers = len(keep)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return student


def _replace_blocks(model: nn.Module, old: nn.ModuleList, new: nn.ModuleList) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise BadInputError("cannot locate the transformer block list to replace")  # pragma: no cover


def _chain(model: nn.Module) -> tuple[list[tuple[nn.Conv2d, nn.BatchNorm2d | None]], nn.Linear]:
    """The convs (each with its following BatchNorm) and the final Linear of a plain conv chain."""
    convs: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]] = []
    linears: list[nn.Linear] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if linears:
                raise BadInputError(
                    f"width_ratio students need a plain conv chain and one final Linear; {linears[-1]} comes before "
                    f"{m} (Linear layers inside the network, such as a ConvNeXt block's pointwise projections)"
                )
            convs.append((m, None))
        elif isinstance(m, nn.BatchNorm2d):
            if not convs or convs[-1][1] is not None or convs[-1][0].out_channels != m.num_features:
                raise BadInputError("width_ratio students need each BatchNorm2d right after its Conv2d")
            convs[-1] = (convs[-1][0], m)
        elif isinstance(m, nn.Linear):
            linears.append(m)
    if not convs or len(linears) != 1:
        raise BadInputError(
            f"width_ratio students need a chain of Conv2d layers and one final Linear; {type(model).__name__} has "
            f"{len(convs)} Conv2d and {len(linears)} Linear"
        )
    for (a, _), (b, _) in zip(convs, convs[1:], strict=False):
        if b.groups != 1:
            kind = "a depthwise" if b.groups == b.in_channels == b.out_channels else "a grouped"
            raise BadInputError(
                f"width_ratio students need a plain conv chain; {b} is {kind} conv (groups={b.groups}), whose "
                "channels are tied group by group to the conv before it (structured channel pruning, "
                "prune-channels-50, cuts such convs with their input where the model traces)"
            )
        if a.out_channels != b.in_channels:
            raise BadInputError(
                f"width_ratio students need a plain conv chain; {a} does not feed {b} (a residual shortcut or a "
                "parallel branch; structured channel pruning, prune-channels-50, cuts across residual additions)"
            )
    if linears[0].in_features != convs[-1][0].out_channels:
        raise BadInputError("width_ratio students need the classifier to read the last conv's channels (global pool)")
    return convs, linears[0]


def narrower_cnn(teacher: nn.Module, width_ratio: float) -> nn.Module:
    """A copy of a Conv(-BN) chain + Linear classifier keeping `width_ratio` of every conv's output channels.

    The kept channels are the ones with the largest L1 filter norm, in their original order; the
    next layer's input channels, the BatchNorm statistics and the classifier columns follow.
    The input channels of the first conv and the classifier outputs stay as they are.
    """
    if not 0.0 < width_ratio < 1.0:
        raise BadInputError(f"width_ratio must be in (0, 1), got {width_ratio}")
    student = copy.deepcopy(teacher)
    convs, classifier = _chain(student)
    keep_in: torch.Tensor | None = None
    with torch.no_grad():
        for conv, bn in convs:
            w = conv.weight if keep_in is None else conv.weight[:, keep_in]  # (out, in_kept, kh, kw)
            k = max(1, round(conv.out_channels * width_ratio))
            importance = w.abs().flatten(1).sum(1)  # (out,)
            keep = importance.topk(k).indices.sort().values
            conv.weight = nn.Parameter(w[keep].clone())
            if conv.bias is not None:
                conv.bias = nn.Parameter(conv.bias[keep].clone())
            conv.in_channels, conv.out_channels = conv.weight.shape[1], k
            if bn is not None:
                bn.num_features = k
                bn.weight = nn.Parameter(bn.weight[keep].clone()) if bn.weight is not None else None
                bn.bias = nn.Parameter(bn.bias[keep].clone()) if bn.bias is not None else None
                bn.running_mean = bn.running_mean[keep].clone()  # type: ignore[index]
                bn.running_var = bn.running_var[keep].clone()  # type: ignore[index]
            keep_in = keep
        classifier.weight = nn.Parameter(classifier.weight[:, keep_in].clone())
        classifier.in_features = classifier.weight.shape[1]
    return student


def block_influence(model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> list[float]:
    """Per transformer block: `1 - cos(input, output)` of its hidden states, averaged over tokens of `batches`.

    A block whose output is nearly its input (low influence) changes the residual stream little, so
    removing it costs the least (the "block influence" of ShortGPT, Men et al., 2024).
    """
    blocks = transformer_blocks(model)
    if blocks is None:
        raise BadInputError(f"{type(model).__name__} has no transformer blocks to rank")
    if not batches:
        raise DataError("ranking blocks by influence needs data: the data set is empty")
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(i: int):  # noqa: ANN202
        def hook(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), y.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    run_hooked(model, handles, batches)
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def most_influential(model: nn.Module, batches: Sequence[tuple[Any, ...]], ratio: float) -> list[int]:
    """The `round(ratio * blocks)` blocks of highest influence on `batches`, in model order (at least one)."""
    influence = block_influence(model, batches)
    k = min(len(influence) - 1, max(1, round(ratio * len(influence))))
    if k < 1:
        raise BadInputError(f"{type(model).__name__} has a single transformer block: there is none to remove")
    return sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:k])


def narrower_transformer(
    teacher: nn.Module, width_ratio: float, heads_ratio: float | None, data: Sequence[tuple[Any, ...]] | None
) -> nn.Module:
    """A copy of a transformer keeping `width_ratio` of every FFN's neurons and `heads_ratio` (default: the same)
    of every attention layer's head groups, the ones that write the most into the residual stream on `data`
    (`primitives.width`). The config follows (Llama-style decoders), so the student saves and reloads as it is.
    """
    if not data:
        raise DataError("a transformer's width_ratio student is scored on data: give training data")
    student = copy.deepcopy(teacher).eval()
    blocks = transformer_blocks(student)
    stats = narrow_transformer(student, width_ratio if heads_ratio is None else heads_ratio, width_ratio, data)
    if blocks is not None:
        student.teacher_layers = tuple(range(len(blocks)))  # block i learns from teacher block i (hidden states)
    student.width_pruned = stats
    return student


def build_student(teacher: nn.Module, cfg: StudentConfig, data: Sequence[tuple[Any, ...]] | None = None) -> nn.Module:
    """The student `cfg` describes: `width_ratio` → `narrower_transformer` (on `data`) for a transformer,
    `narrower_cnn` otherwise; `depth_ratio` → the most influential blocks on `data` (batches of inputs), else
    `fewer_layers(layers)`."""
    if cfg.width_ratio is not None:
        if transformer_blocks(teacher) is not None:
            return narrower_transformer(teacher, cfg.width_ratio, cfg.heads_ratio, data)
        return narrower_cnn(teacher, cfg.width_ratio)
    if cfg.depth_ratio is not None:
        if not data:
            raise DataError("student.depth_ratio ranks the teacher's blocks on data: give training data")
        return fewer_layers(teacher, most_influential(teacher, data, cfg.depth_ratio))
    return fewer_layers(teacher, cfg.layers or None)
