"""Conv-BN folding: a BatchNorm after a convolution becomes part of the convolution's weight and bias.

In eval mode `bn(conv(x)) = conv'(x)` with `w' = w * gamma / sqrt(var + eps)` (per output channel)
and `b' = (b - mean) * gamma / sqrt(var + eps) + beta`, so the quantized model has one integer
layer where the float one had two, and the scale covers the folded weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from modelpress.core.modules import run_batch, set_submodule

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_into(conv: nn.Conv1d | nn.Conv2d, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Fold `bn`'s eval-mode affine transform into `conv` in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm that does not track running statistics")
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
        factor = gamma * inv_std  # (out,)
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_bias)


def fold_conv_bn(model: nn.Module, example: Any = None) -> list[str]:
    """Fold every BatchNorm that directly follows a convolution (and only it uses the conv's output).

    The pairs are found by tracing the model with torch.fx; where tracing fails, by watching one eager
    forward on `example` (a batch of inputs: each conv's output tensor followed to the BatchNorm that
    takes it), else from consecutive children of `nn.Sequential` containers. Folded BatchNorms become
    `nn.Identity`. Returns the names of the folded convolutions.
    """
    try:
        pairs = _pairs_from_graph(model)
    except Exception:  # models with data-dependent control flow do not trace
        pairs = _pairs_from_calls(model, example) if example is not None else _pairs_from_sequentials(model)
    for conv_name, bn_name in pairs:
        fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))  # type: ignore[arg-type]
        set_submodule(model, bn_name, nn.Identity())
    return [c for c, _ in pairs]


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]]:
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        src = node.args[0]
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), _CONVS)
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_from_calls(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """Conv-BN pairs seen in one eager forward on `batch`: a BatchNorm whose input is a convolution's output
    (the same tensor), where nothing else uses that output (every torch call outside the BatchNorm counted)
    and each of the two modules runs once. For models torch.fx cannot trace (data-dependent control flow,
    as in Hugging Face's)."""
    from torch.overrides import TorchFunctionMode

    names = {m: n for n, m in model.named_modules() if isinstance(m, (*_CONVS, *_BNS))}
    calls: dict[str, int] = {}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id of a conv's output -> (conv, the tensor, kept alive)
    other_uses: dict[str, int] = {}
    fed: dict[str, str] = {}  # BatchNorm -> the conv whose output it took
    inside_bn = [0]

    def producer(value: Any) -> str | None:
        hit = outputs.get(id(value)) if isinstance(value, torch.Tensor) else None
        return hit[0] if hit is not None and hit[1] is value else None

    class _CountUses(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if not inside_bn[0]:
                for value in (*args, *(kwargs or {}).values()):
                    if (conv := producer(value)) is not None:
                        other_uses[conv] = other_uses.get(conv, 0) + 1
            return func(*args, **(kwargs or {}))

    def before(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if isinstance(module, _BNS):
            inside_bn[0] += 1
            if inputs and (conv := producer(inputs[0])) is not None:
                fed[names[module]] = conv

    def after(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(module, _BNS):
            inside_bn[0] -= 1
        elif isinstance(output, torch.Tensor):
            outputs[id(output)] = (name, output)

    handles = [h for m in names for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.no_grad(), _CountUses():
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return [
        (conv, bn)
        for bn, conv in fed.items()
        if calls.get(conv) == 1 and calls.get(bn) == 1 and not other_uses.get(conv)
    ]


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
            if isinstance(a, _CONVS) and isinstance(b, _BNS):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs
