"""Known transformer block patterns: attention heads and FFN neurons, found without tracing.

The recognition and the cuts live in `modelpress.primitives.transformer_blocks` (distillation builds
narrower students with them too); this module keeps the names where structured pruning finds them.
"""

from modelpress.primitives.transformer_blocks import FFNBlock, HeadBlock, find_ffns, find_heads, fixed_attention

__all__ = ["HeadBlock", "FFNBlock", "find_heads", "find_ffns", "fixed_attention"]
