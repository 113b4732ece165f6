"""Dependency graph for structured pruning: trace -> groups of coupled channels -> per-layer handlers."""

from modelpress.prune.graph.handlers import can_cut_in, can_cut_out, cut_in, cut_out, register_in, register_out
from modelpress.prune.graph.trace import DependencyGraph, Group, build_graph, trace
from modelpress.prune.graph.transformer import FFNBlock, HeadBlock, find_ffns, find_heads

__all__ = [
    "build_graph", "trace", "DependencyGraph", "Group",
    "cut_in", "cut_out", "can_cut_in", "can_cut_out", "register_in", "register_out",
    "find_heads", "find_ffns", "HeadBlock", "FFNBlock",
]  # fmt: skip
