"""Helpers shared by the example scripts: command-line options, the output-folder check, bit widths, exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from modelpress.core.errors import BadInputError, ModelpressError


def positive_int(text: str) -> int:
    """An argparse type: `text` as an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def base_parser(doc: str, default_out: Path) -> argparse.ArgumentParser:
    """A parser described by `doc`'s first paragraph, with --out and --threads; add options, then `parse`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch and ONNX Runtime threads (default 1)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add --overwrite (listed last) to `parser` and parse `argv`."""
    parser.add_argument("--overwrite", action="store_true", help="replace an --out folder modelpress wrote")
    return parser.parse_args(argv)


def check_out(out: Path, overwrite: bool, marker: str) -> None:
    """Refuse an --out that would lose the user's files (see `modelpress.core.outputs`); the example's own
    earlier output (its results.json says `"example": marker`) is replaced without --overwrite."""
    from modelpress.core.outputs import check_output

    try:
        own = json.loads((out / "results.json").read_text(encoding="utf-8")).get("example") == marker
    except (OSError, ValueError, AttributeError):
        own = False
    check_output(out, kind="folder", overwrite=overwrite or own)


def layer_bits(model: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> dict[str, int]:
    """Weight bit width of every quantized layer (its own scheme) and of every float `layer_types` layer (32)."""
    bits = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "weight_scheme", None)
        if scheme is not None:
            bits[name] = int(scheme.bits)
        elif isinstance(module, layer_types):
            bits[name] = 32
    return bits


def exit_code(work: Callable[[], object]) -> int:
    """Run `work`: 0 on success; its error printed and 2 for bad input, 1 for any other modelpress error."""
    try:
        work()
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelpressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
