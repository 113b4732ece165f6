"""Exact arithmetic on demand: where eager kernels may trade a little precision for speed, and where they may not.

A group-wise 4-bit layer in eager PyTorch runs aten's int4 GEMM with bf16 activations (`quant.kernels`): the
layer's float reference within bf16 rounding, about 0.3% of its output. That is the eager artifact a user runs,
and its quality and speed are measured that way. Two things must not depend on it:

- the passes (`registry.apply`): the codes a pass writes must not depend on whether the CPU has bf16 dot
  products (GPTQ, AWQ and the sensitivity search run quantized blocks on calibration data);
- the parity gates of the exports: an artifact is checked against the compressed model's exact arithmetic,
  what its codes define, not against one runtime's rounding of it.

    >>> with exact():
    ...     reference = model(x)   # every layer on its float reference path
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

_EXACT: ContextVar[bool] = ContextVar("modelpress_exact_arithmetic", default=False)
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def exact() -> Iterator[None]:
    """Within: kernels that round activations (aten's int4 GEMM in bf16) give way to the float reference."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def is_exact() -> bool:
    """Whether the caller asked for exact arithmetic (`exact`)."""
    return _EXACT.get()


def exactly(fn: F) -> F:
    """`fn` run within `exact()`: for the functions that check an artifact against the compressed model."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with exact():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
