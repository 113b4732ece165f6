"""Pruning: unstructured and N:M sparsity (masks, schedules, sparse files) and structured pruning.

>>> from modelpress.prune import prune, StructuredPruneConfig, UnstructuredPruneConfig
>>> small = prune(model, StructuredPruneConfig(channel_ratio=0.5), data=batches)
"""

from modelpress.prune.api import prune
from modelpress.prune.llm import SparseGPTConfig, WandaConfig
from modelpress.prune.masking import make_permanent, set_mask
from modelpress.prune.recovery import distill_text_encoder
from modelpress.prune.schedule import PolynomialSchedule
from modelpress.prune.sparse_format import load_sparse, save_sparse
from modelpress.prune.stats import count_flops
from modelpress.prune.structured import StructuredPruneConfig
from modelpress.prune.unstructured import NMPruneConfig, UnstructuredPruneConfig

__all__ = [
    "prune",
    "UnstructuredPruneConfig", "NMPruneConfig", "StructuredPruneConfig", "PolynomialSchedule",
    "SparseGPTConfig", "WandaConfig",
    "save_sparse", "load_sparse",
    "set_mask", "make_permanent", "count_flops", "distill_text_encoder",
]  # fmt: skip
