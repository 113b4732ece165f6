"""Factories for `package.module:factory` specs used by the loading tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def not_a_module() -> str:
    return "hello"


def raises() -> nn.Module:
    raise ValueError("no such width: 7")
