"""The README's "Adding a pass" example runs as written: a config class, a handler and a test."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Adding a pass", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_pass_registers_and_its_test_passes() -> None:
    from modelpress.core.registry import PASSES
    from modelpress.recipes.recipe import parse_recipe

    pass_code, test_code = _example_blocks()
    module = types.ModuleType("readme_example")  # dataclasses look their module up in sys.modules
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    exec(compile(pass_code, "README.md (pass)", "exec"), namespace)  # noqa: S102 - the project's own docs
    shrink_config = namespace["ShrinkConfig"]
    try:
        exec(compile(test_code, "README.md (test)", "exec"), namespace)  # noqa: S102
        namespace["test_shrink_halves_the_selected_weights"]()  # type: ignore[operator]
        recipe = parse_recipe({"passes": [{"type": "ShrinkConfig", "factor": 0.25, "layer_factor": {"0$": 1.0}}]}, "r")
        assert recipe.passes[0].stage == "prune"
    finally:
        PASSES._handlers.pop(shrink_config, None)  # type: ignore[arg-type]
        sys.modules.pop(module.__name__, None)
