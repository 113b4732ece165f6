"""Recipes: YAML files that list the passes to apply, in order, and the artifacts to export.

    description: int8 weights and activations, calibrated
    passes:
      - type: StaticQuantConfig
        observer: {kind: mse}
    export: [onnx, pt2]

Every pass is a config dict whose `type` names the config class; unknown keys or bad values are
rejected with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from modelpress.core.config import Config
from modelpress.core.errors import ConfigError

EXPORTS = ("onnx", "pt2")
_KEYS = {"description", "passes", "export", "order", "lowering"}
# How the .pt2 is lowered; "auto" picks per CPU capability (core/environment.py), an explicit value the
# CPU cannot run fast is refused before any work (exit 2).
LOWERING = {
    "pt2_float": ("auto", "bf16", "fp32"),  # float ops of the .pt2: bf16 where the CPU has bf16 dot products
    "int8_sources": ("auto", "signed", "unsigned"),  # int8 GEMM source codes: signed only on AMX
}
ORDERS = ("stages", "as-written")
# Passes come in stages, prune -> distill -> quantize; a quantized layer can be neither pruned nor
# distilled, so a prune or distill pass after a quantization pass is refused unless `order: as-written`.
_STAGE_RANK = {"prune": 0, "distill": 0, "quant": 1}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[Config, ...]
    export: tuple[str, ...] = EXPORTS
    order: str = "stages"
    lowering: tuple[tuple[str, str], ...] = ()  # (key, value) pairs of LOWERING set by the recipe

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "description": self.description,
            "passes": [p.to_dict() for p in self.passes],
            "export": list(self.export),
        }
        if self.order != "stages":
            d["order"] = self.order
        if self.lowering:
            d["lowering"] = dict(self.lowering)
        return d

    def lowering_option(self, key: str) -> str:
        """The recipe's value for a LOWERING key, "auto" where it says nothing."""
        return dict(self.lowering).get(key, "auto")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _register_pass_types() -> None:
    # Config classes register by name on import; recipes may name any of them.
    import modelpress.distill  # noqa: F401
    import modelpress.prune  # noqa: F401
    import modelpress.quant  # noqa: F401


def builtin_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml")
    )


def parse_recipe(data: Any, name: str) -> Recipe:
    """A recipe from its parsed YAML; `ConfigError` for anything malformed."""
    _register_pass_types()
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name}: expected a mapping with keys {sorted(_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"recipe {name}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(_KEYS))}")
    passes = data.get("passes")
    if not isinstance(passes, list) or not passes:
        raise ConfigError(f"recipe {name}: 'passes' must be a non-empty list of pass configs")
    configs = []
    for i, p in enumerate(passes):
        try:
            configs.append(Config.from_dict(p))
        except ConfigError as e:
            raise ConfigError(f"recipe {name}, pass {i + 1}: {e}") from None
    export = data.get("export", list(EXPORTS))
    if not isinstance(export, list) or any(e not in EXPORTS for e in export):
        raise ConfigError(f"recipe {name}: 'export' must be a list of {', '.join(EXPORTS)}, got {export!r}")
    order = data.get("order", "stages")
    if order not in ORDERS:
        raise ConfigError(f"recipe {name}: 'order' must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "stages":
        _check_stages(configs, name)
    lowering = _parse_lowering(data.get("lowering", {}), name)
    return Recipe(name, str(data.get("description", "")), tuple(configs), tuple(export), order, lowering)


def _parse_lowering(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"recipe {name}: 'lowering' must be a mapping of {', '.join(LOWERING)}, got {value!r}")
    for key, choice in value.items():
        if key not in LOWERING:
            raise ConfigError(f"recipe {name}: unknown lowering key {key!r}; allowed: {', '.join(LOWERING)}")
        if choice not in LOWERING[key]:
            raise ConfigError(
                f"recipe {name}: lowering {key}: {choice!r} is not allowed; choose one of {', '.join(LOWERING[key])}"
            )
    return tuple((k, str(v)) for k, v in value.items() if v != "auto")


def _stage(cfg: Config) -> str:
    return type(cfg).__module__.split(".")[1]  # modelpress.<prune|distill|quant>...


def _check_stages(configs: list[Config], name: str) -> None:
    for i, later in enumerate(configs):
        for j, earlier in enumerate(configs[:i]):
            a, b = _stage(earlier), _stage(later)
            if _STAGE_RANK.get(a, 0) > _STAGE_RANK.get(b, 0):
                raise ConfigError(
                    f"recipe {name}: pass {i + 1} ({type(later).__name__}, {b}) comes after pass {j + 1} "
                    f"({type(earlier).__name__}, {a}): quantized layers can be neither pruned nor distilled. "
                    "Put the passes in stage order (prune, distill, then quantize), or add 'order: as-written' "
                    "to run them as written"
                )


def load_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name (`modelpress recipes` lists them) or a YAML file path."""
    text_spec = str(spec)
    if text_spec in builtin_names():
        text = (resources.files(__package__) / f"{text_spec}.yaml").read_text(encoding="utf-8")
        name = text_spec
    else:
        path = Path(text_spec)
        if not path.is_file():
            raise ConfigError(
                f"recipe {text_spec!r} is neither a built-in recipe ({', '.join(builtin_names())}) nor a YAML file"
            )
        text, name = path.read_text(encoding="utf-8"), path.stem
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {text_spec}: invalid YAML: {e}") from None
    return parse_recipe(data, name)
