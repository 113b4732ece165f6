"""The search space of auto mode: candidate recipes generated from the model's family and this CPU.

A candidate is a `Recipe` built from pass configs (not a named YAML file) plus the coordinates that
generated it (method, bits, group size, activations, student depth, sparsity), so the report can
say what was tried and why. The family comes from the model itself:

- `encoder` (a transformer text encoder): int8 with per-token (dynamic), static and SmoothQuant
  activations, weight-only 8 / 4 bits, and students of 2/3 and 1/2 of the teacher's depth (blocks
  spread evenly, first and last kept) with int8 on top;
- `cnn` (convolutions): static int8 (MSE and min-max ranges), static int8 with the layers most
  sensitive to it kept float (`MixedPrecisionConfig`: the sensitivity analysis of quant/sensitivity.py),
  weight-only int8, half of the channels pruned (fine-tuned), and a narrower distilled student;
- `causal-lm`: RTN / GPTQ / AWQ weight-only at 4 and 8 bits in groups of 32 and 128 (and 8 bits per channel),
  mixed precision
  (a 4-bit head and embedding table, or the most sensitive layers at 8 bits), SparseGPT / Wanda, the
  GGUF and ONNX Runtime GenAI targets written for the chosen group-wise candidate;
- anything else: the int8 and weight-only candidates;
- an ONNX model (from any framework): ONNX Runtime's quantizations of its graph (`quant.onnx_ptq`) for the
  weighted op types it has, and its `.onnx` form only: see `onnx_space`.

The runtime form (`.onnx`, `.pt2`) is part of the space too; which forms are worth timing follows the
CPU's capabilities (`core.environment.cpu_info`), never its model name: see `pt2_worth_timing`.

    >>> space = candidates(loaded, cpu_info())
    >>> [c.name for c in space][:3]
    ['float', 'int8-dynamic', 'int8-static']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.loading import LoadedModel
from modelpress.recipes.recipe import Recipe, load_recipe, parse_recipe
from modelpress.zoo.base import ZooEntry

# A .pt2's per-call overhead outweighs whatever it saves on models faster than this (digits-cnn: 0.4 ms at
# batch 32; its .pt2 was slower than the original at batch 1 on every CPU measured).
PT2_MIN_MS = 5.0
# Training a student of a causal LM larger than this does not fit a search budget of minutes.
LM_STUDENT_MAX_PARAMS = 20_000_000
# build cost classes, cheapest first: the search tries cheap candidates first
FREE, PLAIN, CALIBRATED, TRAINED = 0, 1, 2, 3
TRAINING_STAGES = frozenset({"distill", "prune"})  # a recipe with a pass of these stages trains (TRAINED)


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a recipe and the coordinates that generated it."""

    name: str
    recipe: Recipe
    params: dict[str, Any] = field(default_factory=dict)
    cost: int = PLAIN  # FREE, PLAIN, CALIBRATED or TRAINED
    int8_activations: bool = False  # int8 GEMMs at run time (their .pt2 form needs VNNI or AMX)
    targets: tuple[str, ...] = ()  # untimed exports written for the chosen one (gguf, genai)
    forms: tuple[str, ...] = ("onnx", "pt2")  # the runtime forms it can have (an ONNX model's: .onnx only)


def family(loaded: LoadedModel) -> str:
    """`causal-lm`, `encoder`, `cnn` or `other`, from the zoo entry's task and the model's layers."""
    from modelpress.distill.outputs import transformer_blocks

    task = loaded.entry.task if loaded.entry is not None else ""
    model = loaded.model
    if task == "text-generation":
        return "causal-lm"
    if isinstance(model, nn.Module):
        if task == "text-embedding" or (transformer_blocks(model) is not None and task != "image-classification"):
            return "encoder"
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return "cnn"
    return "other"


def depth(model: Any) -> int | None:
    """The number of transformer blocks, None for a model without them."""
    from modelpress.distill.outputs import transformer_blocks

    blocks = transformer_blocks(model) if isinstance(model, nn.Module) else None
    return None if blocks is None else len(blocks)


def spread_layers(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` of `n_teacher` blocks spread evenly, the first and the last kept (6 -> 4: 0, 2, 3, 5)."""
    if n_student <= 1:
        return [0]
    return [int(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def pt2_worth_timing(cand: Candidate, cpu: dict[str, Any], original_ms: float) -> tuple[bool, str]:
    """Whether the `.pt2` form of `cand` can win on this CPU, and why (the report keeps the reason)."""
    if "pt2" not in cand.forms:
        return False, "an ONNX model has only its .onnx form: there is no .pt2 to compile"
    if original_ms < PT2_MIN_MS:
        return False, f"the original takes {original_ms:.2f} ms: a .pt2's per-call overhead outweighs its gain"
    if cand.int8_activations and cpu.get("int8") not in ("amx", "avx512_vnni", "avx_vnni"):
        return False, f"int8 unit {cpu.get('int8')} (no VNNI or AMX): its .pt2 would compute int8 layers in float"
    if not cand.recipe.passes and cpu.get("bf16") == "none":
        return False, "no bf16 dot products: the float .pt2 would run fp32, like the .onnx"
    return True, f"int8 unit {cpu.get('int8')}, bf16 unit {cpu.get('bf16')}"


def make(name: str, passes: list[dict[str, Any]], why: str, **kw: Any) -> Candidate:
    """A candidate whose recipe is built from pass configs (`parse_recipe` checks every field)."""
    targets = tuple(kw.pop("targets", ()))
    recipe = parse_recipe({"description": why, "passes": passes, "export": ["onnx", "pt2", *targets]}, name)
    return Candidate(name=name, recipe=recipe, targets=targets, **kw)


def named(name: str) -> Candidate:
    """A candidate from a built-in recipe name or a recipe file (`--candidates`; `recipe:NAME` forces the recipe
    where a generated candidate has the same name); "float": the model as it is."""
    name = name.removeprefix("recipe:")
    if name == "float":
        return make("float", [], "the model as it is, exported", params={"method": "float"}, cost=FREE)
    rec = load_recipe(name)
    stages = {p.stage for p in rec.passes}
    cost = TRAINED if stages & TRAINING_STAGES else CALIBRATED
    types = {type(p).__name__ for p in rec.passes}
    int8 = bool(types & {"DynamicQuantConfig", "StaticQuantConfig"})
    targets = tuple(t for t in rec.export if t in ("gguf", "genai"))
    return Candidate(name=rec.name, recipe=rec, params={"recipe": name}, cost=cost, int8_activations=int8,
                     targets=targets)  # fmt: skip


def _quant(name: str, passes: list[dict[str, Any]], why: str, cost: int, **params: Any) -> Candidate:
    int8 = any(p["type"] in ("DynamicQuantConfig", "StaticQuantConfig") for p in passes)
    return make(name, passes, why, params=params, cost=cost, int8_activations=int8)


SMOOTH = {"type": "SmoothQuantConfig", "alpha": 0.5, "calibration_batches": 16}
STATIC = {"type": "StaticQuantConfig", "observer": {"kind": "mse"}, "calibration_batches": 16}
DYNAMIC = {"type": "DynamicQuantConfig", "act_granularity": "token"}


def _int8(prefix: str, head: list[dict[str, Any]], cost: int, extra: dict[str, Any]) -> list[Candidate]:
    """Per-token dynamic, static and SmoothQuant + static int8 after the passes `head` (a student)."""
    tag = f"{prefix}-" if prefix else ""
    bert_ffn = ["layer\\.[0-2]\\.output\\.dense$"]  # GELU outputs with outliers: scaled per token at run time
    static_emb = {**STATIC, **({"embedding_bits": 4, "embedding_group_size": 64} if prefix else {})}
    return [
        _quant(f"{tag}int8-dynamic", [*head, DYNAMIC], "int8 weights, int8 activations scaled per token", cost,
               **extra, activations="per-token", bits=8),
        _quant(f"{tag}int8-static", [*head, static_emb], "int8 weights and static int8 activations (MSE ranges)",
               max(cost, CALIBRATED), **extra, activations="static", bits=8),
        _quant(f"{tag}int8-smooth", [*head, SMOOTH, {**static_emb, "dynamic_layers": bert_ffn}],
               "SmoothQuant, static int8, the first FFN outputs per token", max(cost, CALIBRATED), **extra,
               activations="static+per-token", bits=8, smooth=0.5),
    ]  # fmt: skip


def _weight_only(group_sizes: tuple[int, ...]) -> list[Candidate]:
    out = [
        _quant(
            "w8",
            [{"type": "WeightOnlyConfig", "bits": 8, "granularity": "channel", "embedding_bits": 8}],
            "int8 weights per channel, float activations",
            PLAIN,
            method="rtn",
            bits=8,
            group_size=None,
        )
    ]
    for g in group_sizes:
        cfg = {"type": "WeightOnlyConfig", "bits": 4, "granularity": "group", "group_size": g, "symmetric": False}
        out.append(_quant(f"w4-g{g}", [cfg], f"4-bit weights in groups of {g}", PLAIN, method="rtn", bits=4,
                          group_size=g))  # fmt: skip
    return out


def encoder_space(loaded: LoadedModel) -> list[Candidate]:
    out = _int8("", [], PLAIN, {}) + _weight_only((32,))
    n = depth(loaded.model)
    if n is not None and n >= 3:
        for ratio in (2 / 3, 1 / 2):
            k = max(1, round(n * ratio))
            if k >= n:
                continue
            distill = {"type": "DistillConfig", "mode": "offline", "student": {"layers": spread_layers(n, k)},
                       "freeze_embeddings": True, "bucket_by_length": True, "epochs": 3, "lr": 0.0005,
                       "batch_size": 64, "embedding_loss": "cosine"}  # fmt: skip
            extra = {"student_layers": k, "teacher_layers": n, "method": "distill"}
            out += [c for c in _int8(f"student-l{k}of{n}", [distill], TRAINED, extra) if "dynamic" not in c.name]
    return out


def cnn_space(loaded: LoadedModel) -> list[Candidate]:
    minmax = {**STATIC, "observer": {"kind": "minmax"}}
    mixed = {"type": "MixedPrecisionConfig", "base": {k: v for k, v in STATIC.items()}, "high_bits": None,
             "max_drop": 0.002}  # fmt: skip
    out = [
        _quant("int8-static", [STATIC], "int8 weights and activations (MSE ranges), Conv-BN folded", CALIBRATED,
               activations="static", bits=8, observer="mse"),
        _quant("int8-static-minmax", [minmax], "int8 weights and activations (min-max ranges)", CALIBRATED,
               activations="static", bits=8, observer="minmax"),
        _quant("int8-mixed", [mixed], "static int8, the layers most sensitive to it kept float (fidelity 0.2%)",
               CALIBRATED, activations="static", bits=8, sensitivity=True),
        _quant("w8", [{"type": "WeightOnlyConfig", "bits": 8, "granularity": "channel"}],
               "int8 weights per channel, float activations", PLAIN, method="rtn", bits=8),
    ]  # fmt: skip
    if loaded.entry is not None and type(loaded.entry).finetune is not ZooEntry.finetune:  # it has a training loop
        prune = {"type": "StructuredPruneConfig", "channel_ratio": 0.5, "importance": "magnitude",
                 "finetune_epochs": 20}  # fmt: skip
        out.append(_quant("channels-50", [prune], "half of the channels pruned, fine-tuned", TRAINED,
                          method="prune", sparsity=0.5))  # fmt: skip
        student = {"type": "DistillConfig", "student": {"width_ratio": 0.48}, "temperature": 3.0, "alpha": 0.7,
                   "epochs": 30, "lr": 0.005, "batch_size": 64}  # fmt: skip
        out.append(_quant("student-w48", [student], "a student with 48% of the channels, distilled", TRAINED,
                          method="distill", width_ratio=0.48))  # fmt: skip
        out.append(_quant("student-w48-int8-static", [student, STATIC], "the 48% student, static int8", TRAINED,
                          method="distill", width_ratio=0.48, activations="static", bits=8))  # fmt: skip
    return out


def lm_space(loaded: LoadedModel) -> list[Candidate]:
    targets = ("gguf", "genai")
    out: list[Candidate] = []
    for bits, g in ((4, 32), (4, 128), (8, 128)):  # 8 bits symmetric: llama.cpp's Q8_0 holds those codes exactly
        cfg = {"type": "WeightOnlyConfig", "bits": bits, "granularity": "group", "group_size": g,
               "symmetric": bits == 8, "embedding_bits": 8}  # fmt: skip
        out.append(make(f"rtn-w{bits}-g{g}", [cfg], f"{bits}-bit weights in groups of {g} (round to nearest)",
                        params={"method": "rtn", "bits": bits, "group_size": g}, targets=targets))  # fmt: skip
    channel = {"type": "WeightOnlyConfig", "bits": 8, "granularity": "channel", "embedding_bits": 8}
    out.append(make("rtn-w8-channel", [channel], "8-bit weights per output channel (round to nearest)",
                    params={"method": "rtn", "bits": 8, "group_size": None}, targets=targets))  # fmt: skip
    calib = {"calibration_batches": 8}  # 8 batches of 8 windows of 256 tokens: 16k calibration tokens
    for g in (32, 128):
        cfg = {"type": "GPTQConfig", "bits": 4, "group_size": g, **calib}
        out.append(make(f"gptq-w4-g{g}", [cfg], f"GPTQ 4-bit in groups of {g}", targets=targets, cost=CALIBRATED,
                        params={"method": "gptq", "bits": 4, "group_size": g}))  # fmt: skip
    head = {"type": "GPTQConfig", "bits": 4, "group_size": 128, "head_bits": 4, "embedding_group_size": 32, **calib}
    out.append(make("gptq-w4-g128-head4", [head], "GPTQ 4-bit, the head and a tied table at 4 bits too",
                    targets=targets, cost=CALIBRATED,
                    params={"method": "gptq", "bits": 4, "group_size": 128, "head_bits": 4}))  # fmt: skip
    awq = {"type": "AWQConfig", "bits": 4, "group_size": 128, "embedding_bits": 8, "embedding_group_size": 32, **calib}
    out.append(
        make(
            "awq-w4-g128",
            [awq],
            "AWQ 4-bit in groups of 128, int8 embedding table",
            targets=targets,
            cost=CALIBRATED,
            params={"method": "awq", "bits": 4, "group_size": 128, "embedding_bits": 8},
        )
    )
    mixed = {"type": "MixedPrecisionConfig", "high_bits": 8, "max_drop": 0.005,
             "base": {"type": "WeightOnlyConfig", "bits": 4, "granularity": "group", "group_size": 32,
                      "symmetric": False, "embedding_bits": 8}}  # fmt: skip
    out.append(
        make(
            "mixed-w4-g32",
            [mixed],
            "4-bit groups of 32, the most sensitive layers at 8 bits",
            targets=targets,
            cost=CALIBRATED,
            params={"method": "rtn", "bits": 4, "group_size": 32, "high_bits": 8, "sensitivity": True},
        )
    )
    out.append(make("int8-dynamic", [DYNAMIC], "int8 weights, int8 activations per token", cost=PLAIN,
                    int8_activations=True, params={"activations": "per-token", "bits": 8}))  # fmt: skip
    for kind, cfg in (("sparsegpt-50", {"type": "SparseGPTConfig", "sparsity": 0.5, **calib}),
                      ("wanda-2of4", {"type": "WandaConfig", "n": 2, "m": 4, **calib})):  # fmt: skip
        out.append(make(kind, [cfg], f"{kind} pruning, calibrated block by block", cost=CALIBRATED,
                        params={"method": kind.split("-")[0], "sparsity": 0.5}))  # fmt: skip
    params = sum(p.numel() for p in loaded.model.parameters()) if isinstance(loaded.model, nn.Module) else 0
    if params and params <= LM_STUDENT_MAX_PARAMS:
        student = load_recipe("distill-lm-depth").passes[0].to_dict()
        out.append(make("student-depth-0.67", [student], "a third of the blocks cut, distilled", cost=TRAINED,
                        params={"method": "distill", "depth_ratio": 0.667}))  # fmt: skip
    return out


def onnx_space(loaded: LoadedModel) -> list[Candidate]:
    """An ONNX model's candidates: what ONNX Runtime's quantizers (`quant.onnx_ptq`) do to the weighted op types
    the graph has: dynamic int8 (MatMul / Gemm / Attention), static int8 in QDQ form with
    min-max or entropy ranges, and with the nodes most sensitive to it kept float (MatMul / Gemm / Conv), and
    4-bit weight groups (MatMulNBits: MatMul). Every config is one `quantize_onnx` honours."""
    from modelpress.quant.onnx_ptq import DYNAMIC_OPS, QUANTIZABLE_OPS, weighted_op_types

    ops = weighted_op_types(loaded.path)  # type: ignore[arg-type]
    minmax = {"type": "StaticQuantConfig", "observer": {"kind": "minmax"}, "calibration_batches": 16}
    mixed = {"type": "MixedPrecisionConfig", "base": minmax, "high_bits": None, "max_drop": 0.002}
    out: list[Candidate] = []  # no "float": the graph as it is is the original itself, not a result
    if ops & set(DYNAMIC_OPS):
        out.append(_onnx("int8-dynamic", [{"type": "DynamicQuantConfig"}], "int8 weights, int8 activations scaled "
                         "per tensor at run time (ONNX Runtime)", PLAIN, activations="dynamic", bits=8))  # fmt: skip
    if ops & set(QUANTIZABLE_OPS):
        out += [
            _onnx("int8-static", [minmax], "int8 weights and static int8 activations (QDQ, min-max ranges)",
                  CALIBRATED, activations="static", bits=8, observer="minmax"),
            _onnx("int8-static-entropy", [{**minmax, "observer": {"kind": "kl"}}], "int8 weights and static int8 "
                  "activations (QDQ, entropy ranges)", CALIBRATED, activations="static", bits=8, observer="kl"),
            _onnx("int8-mixed", [mixed], "static int8, the nodes most sensitive to it kept float (fidelity 0.2%)",
                  CALIBRATED, activations="static", bits=8, sensitivity=True),
        ]  # fmt: skip
    if "MatMul" in ops:
        for g in (32, 128):
            cfg = {"type": "WeightOnlyConfig", "bits": 4, "granularity": "group", "group_size": g, "symmetric": False}
            out.append(_onnx(f"w4-g{g}", [cfg], f"4-bit weights in groups of {g} (MatMulNBits)", PLAIN, method="rtn",
                             bits=4, group_size=g))  # fmt: skip
    return out


def _onnx(name: str, passes: list[dict[str, Any]], why: str, cost: int, **params: Any) -> Candidate:
    recipe = parse_recipe({"description": why, "passes": passes, "export": ["onnx"]}, name)
    return onnx_only(Candidate(name=name, recipe=recipe, params={**params, "runtime": "onnxruntime"}, cost=cost,
                               int8_activations=any(p["type"] != "WeightOnlyConfig" for p in passes)))  # fmt: skip


def onnx_only(cand: Candidate) -> Candidate:
    """`cand` for an ONNX model: its `.onnx` form only (no .pt2, no GGUF or GenAI targets)."""
    rec = cand.recipe
    recipe = Recipe(rec.name, rec.description, rec.passes, ("onnx",), rec.order, rec.lowering)
    return dataclasses.replace(cand, recipe=recipe, targets=(), forms=("onnx",))


def candidates(loaded: LoadedModel, names: tuple[str, ...] | None = None) -> list[Candidate]:
    """The search space for `loaded` (cheapest first), or the candidates `names` (generated names, built-in
    recipes or recipe files) where given. The float model exported as it is always comes first. An ONNX model
    gets `onnx_space`; a named recipe is tried on its `.onnx` form (ONNX Runtime refuses what it cannot do)."""
    onnx = loaded.kind == "onnx"
    kind = "onnx" if onnx else family(loaded)
    generated = {"encoder": encoder_space, "cnn": cnn_space, "causal-lm": lm_space, "onnx": onnx_space}.get(kind)
    space = generated(loaded) if generated is not None else _int8("", [], PLAIN, {}) + _weight_only((32,))
    space = space if onnx else [named("float"), *space]
    if names is None:
        return sorted(space, key=lambda c: c.cost)  # stable: the family's order within a cost class
    by_name = {c.name: c for c in space}
    out = []
    for name in names:
        try:
            cand = by_name[name] if name in by_name else named(name)  # recipe:NAME skips the generated one
        except BadInputError as e:
            raise type(e)(f"{e}; generated candidates for this {kind} model: {', '.join(by_name)}") from None
        out.append(onnx_only(cand) if onnx else cand)
    return out
