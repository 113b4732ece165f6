"""Recipes: YAML files that list the passes to apply, in order, and the artifacts to export.

    description: int8 weights and activations, calibrated
    passes:
      - type: StaticQuantConfig
        observer: {kind: mse}
    export: [onnx, pt2]

Every pass is a config dict whose `type` names the config class; unknown keys or bad values are
rejected with a message naming the key, the value and what is allowed.

A recipe file may come from anyone, so loading it is bounded: only regular files of at most
MAX_RECIPE_BYTES are read (a directory, FIFO or device is refused without being opened for a
blocking read), the text must be UTF-8, and the YAML may nest at most MAX_RECIPE_DEPTH levels and
hold at most MAX_RECIPE_NODES values, counted with every alias expanded (a "billion laughs" file of
nested anchors is refused as it is read, before it can grow). Loading is safe YAML: no tags that
build Python objects.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from modelpress.core.config import Config, show_value
from modelpress.core.errors import ConfigError
from modelpress.core.registry import PASSES

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: built-in recipes are under 2 KiB
MAX_RECIPE_DEPTH = 32  # nested lists / mappings; a recipe needs about 6
MAX_RECIPE_NODES = 100_000  # values in the recipe with aliases expanded; a recipe has a few dozen

# gguf (llama.cpp) and genai (onnxruntime-genai): written for causal LMs only, noted for other models
EXPORTS = ("onnx", "pt2", "gguf", "genai")
DEFAULT_EXPORTS = ("onnx", "pt2")
_KEYS = {"description", "passes", "export", "order", "lowering"}
# How the .pt2 is lowered; "auto" picks per CPU capability (core/environment.py), an explicit value the
# CPU cannot run fast is refused before any work (exit 2).
LOWERING = {
    "pt2_float": ("auto", "bf16", "fp32"),  # float ops of the .pt2: bf16 where the CPU has bf16 dot products
    "int8_sources": ("auto", "signed", "unsigned"),  # int8 GEMM source codes: signed only on AMX
}
ORDERS = ("stages", "as-written")
# Passes come in stages (`Config.stage`), prune -> distill -> quantize; a quantized layer can be neither
# pruned nor distilled, so a prune or distill pass after a quantization pass is refused unless
# `order: as-written`.
_STAGE_RANK = {"prune": 0, "distill": 0, "quantize": 1}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[Config, ...]
    export: tuple[str, ...] = DEFAULT_EXPORTS
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
    _check_bounds(data, name)
    unknown = sorted(set(data) - _KEYS, key=str)
    if unknown:
        raise ConfigError(
            f"recipe {name}: unknown key {show_value(unknown[0])}; allowed keys: {', '.join(sorted(_KEYS))}"
        )
    passes = data.get("passes")
    # `passes: []` with an explicit `export` list: the model exported as it is (auto mode's float candidate)
    if not isinstance(passes, list) or (not passes and not data.get("export")):
        raise ConfigError(
            f"recipe {name}: 'passes' must be a non-empty list of pass configs (an empty one only with an "
            "'export' list: the model exported as it is)"
        )
    configs = []
    for i, p in enumerate(passes):
        try:
            cfg = Config.from_dict(p)
        except ConfigError as e:
            raise ConfigError(f"recipe {name}, pass {i + 1}: {e}") from None
        if cfg.stage is None:
            raise ConfigError(
                f"recipe {name}, pass {i + 1}: {cfg.type_name} is not a pass (it is part of a pass's config); "
                f"passes: {', '.join(sorted(c.type_name for c in PASSES.registered()))}"
            )
        configs.append(cfg)
    export = data.get("export", list(DEFAULT_EXPORTS))
    if not isinstance(export, list) or any(e not in EXPORTS for e in export):
        raise ConfigError(f"recipe {name}: 'export' must be a list of {', '.join(EXPORTS)}, got {show_value(export)}")
    order = data.get("order", "stages")
    if order not in ORDERS:
        raise ConfigError(f"recipe {name}: 'order' must be one of {', '.join(ORDERS)}, got {show_value(order)}")
    if order == "stages":
        _check_stages(configs, name)
    lowering = _parse_lowering(data.get("lowering", {}), name)
    return Recipe(name, str(data.get("description", "")), tuple(configs), tuple(export), order, lowering)


def _parse_lowering(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"recipe {name}: 'lowering' must be a mapping of {', '.join(LOWERING)}, got {show_value(value)}"
        )
    for key, choice in value.items():
        if key not in LOWERING:
            raise ConfigError(f"recipe {name}: unknown lowering key {show_value(key)}; allowed: {', '.join(LOWERING)}")
        if choice not in LOWERING[key]:
            raise ConfigError(
                f"recipe {name}: lowering {key}: {show_value(choice)} is not allowed; "
                f"choose one of {', '.join(LOWERING[key])}"
            )
    return tuple((k, str(v)) for k, v in value.items() if v != "auto")


def _check_stages(configs: list[Config], name: str) -> None:
    for i, later in enumerate(configs):
        for j, earlier in enumerate(configs[:i]):
            a, b = earlier.stage, later.stage
            if _STAGE_RANK[a] > _STAGE_RANK[b]:  # type: ignore[index]
                raise ConfigError(
                    f"recipe {name}: pass {i + 1} ({type(later).__name__}, {b}) comes after pass {j + 1} "
                    f"({type(earlier).__name__}, {a}): quantized layers can be neither pruned nor distilled. "
                    "Put the passes in stage order (prune, distill, then quantize), or add 'order: as-written' "
                    "to run them as written"
                )


def _check_bounds(data: Any, name: str) -> None:
    """Refuse data nested deeper than MAX_RECIPE_DEPTH or holding more than MAX_RECIPE_NODES values.

    Walks without recursion and stops at the budget, so shared or cyclic lists and dicts handed to
    `parse_recipe` directly are refused too, rather than expanded.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise ConfigError(f"recipe {name}: more than {MAX_RECIPE_NODES} values; a recipe lists a few passes")
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_RECIPE_DEPTH:
                raise ConfigError(f"recipe {name}: nested deeper than {MAX_RECIPE_DEPTH} levels")
            items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


class _RecipeLimit(Exception):
    """A recipe file over one of the loader's budgets (depth, values, recursive alias)."""


class _BoundedLoader(yaml.SafeLoader):
    """Safe YAML with a nesting limit and a budget of values counted with every alias expanded.

    Aliases share the node they name, so a file of nested anchors ("billion laughs") is small as
    parsed but exponential once anything walks it; each node's expanded size is known as soon as
    it is composed, and the load stops the moment one passes the budget.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values under it with aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None and id(target) not in self._sizes:
                raise _RecipeLimit("an alias refers to the collection that contains it (a recursive structure)")
            return super().compose_node(parent, index)
        if self._depth >= MAX_RECIPE_DEPTH:
            raise _RecipeLimit(f"nested deeper than {MAX_RECIPE_DEPTH} levels")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(v)] for v in node.value)
        else:
            size = 1
        if size > MAX_RECIPE_NODES:
            raise _RecipeLimit(
                f"more than {MAX_RECIPE_NODES} values with aliases expanded (nested anchors and aliases "
                "that multiply are refused)"
            )
        self._sizes[id(node)] = size
        return node


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_kind(mode: int) -> str:
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def _read_recipe_file(spec: str) -> str:
    """The text of the recipe file `spec`: a regular file of at most MAX_RECIPE_BYTES of UTF-8."""
    try:
        info = os.stat(spec)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL byte in the path
        raise ConfigError(
            f"recipe {spec!r} is neither a built-in recipe ({', '.join(builtin_names())}) nor a YAML file"
        ) from None
    except OSError as e:
        raise ConfigError(f"recipe {spec!r} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"recipe {spec!r} is {_file_kind(info.st_mode)}, not a YAML file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise ConfigError(
            f"recipe {spec!r} is {info.st_size} bytes; a recipe file may be at most {MAX_RECIPE_BYTES} bytes (1 MiB)"
        )
    # Non-blocking, and the type checked again on the open file: a path swapped for a FIFO after the
    # stat above still cannot block the read.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(spec, flags)
    except OSError as e:
        raise ConfigError(f"recipe {spec!r} cannot be read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"recipe {spec!r} is {_file_kind(mode)}, not a YAML file")
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {spec!r} is larger than {MAX_RECIPE_BYTES} bytes (1 MiB), the limit for a recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"recipe {spec!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "a recipe is a YAML text file"
        ) from None


def load_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name (`modelpress recipes` lists them) or a YAML file path."""
    text_spec = str(spec)
    if text_spec in builtin_names():
        text = (resources.files(__package__) / f"{text_spec}.yaml").read_text(encoding="utf-8")
        name = text_spec
    else:
        text, name = _read_recipe_file(text_spec), Path(text_spec).stem
    return parse_recipe(_load_yaml(text, text_spec), name)


def _load_yaml(text: str, spec: str) -> Any:
    """Safe YAML within the loader's budgets; `ConfigError` for malformed or oversized text."""
    try:
        loader = _BoundedLoader(text)  # a SafeLoader subclass: no tags that build Python objects
    except yaml.YAMLError as e:  # characters YAML does not allow (e.g. NUL)
        raise ConfigError(f"recipe {spec}: invalid YAML: {e}") from None
    try:
        try:
            node = loader.get_single_node()
        except _RecipeLimit as e:
            raise ConfigError(f"recipe {spec}: refused: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {spec}: invalid YAML: {e}") from None
        if node is None:  # an empty file
            return None
        try:
            return loader.construct_document(node)
        except Exception as e:  # noqa: BLE001 - PyYAML's constructors fail on odd scalars in many ways
            # (an integer of 5000 digits, `!!bool maybe`, an empty `!!timestamp`): all malformed input
            raise ConfigError(f"recipe {spec}: invalid YAML: {type(e).__name__}: {e}") from None
    finally:
        loader.dispose()
