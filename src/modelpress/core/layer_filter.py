r"""`LayerFilter`: which layers a pass touches, by qualified module name and class.

Every pass takes one (quantization, pruning, distillation's students), so it lives below them all;
`modelpress.quant.LayerFilter` and `modelpress.quant.ptq.LayerFilter` are the same class.

    >>> LayerFilter(exclude=(r"(^|\.)lm_head$",)).selects("model.layers.0.mlp.up_proj", "Linear")
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelpress.core.config import Config, check_regex
from modelpress.core.errors import ConfigError


@dataclass(frozen=True)
class LayerFilter(Config):
    r"""Which layers a pass touches: regexes on qualified module names (`re.search`), optionally only some types.

    >>> LayerFilter(include=(r"encoder\.",), exclude=(r"classifier",), types=("Linear",))
    """

    include: tuple[str, ...] = ()  # empty: every supported layer
    exclude: tuple[str, ...] = ()  # the ignore list: never touched, whatever else matches
    types: tuple[str, ...] = ()  # module class names ("Linear", "Conv2d"; ONNX: op types); empty: every type

    def validate(self) -> None:
        for pattern in (*self.include, *self.exclude):
            check_regex(pattern, "layer")
        for kind in self.types:
            if not isinstance(kind, str) or not kind.isidentifier():
                raise ConfigError(f"layer types are class names such as 'Linear' or 'Conv2d', got {kind!r}")

    def selects(self, name: str, kind: str | None = None) -> bool:
        """Whether the layer called `name`, of class (or ONNX op type) `kind`, is selected."""
        if self.types and kind is not None and kind not in self.types:
            return False
        if self.include and not self.names(name):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    def names(self, name: str) -> bool:
        """Whether `include` names the layer `name` explicitly (an empty `include` names none)."""
        return any(re.search(p, name) for p in self.include)
