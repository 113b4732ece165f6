"""Depth-pruned students: blocks ranked by their influence on data, the least influential cut, hidden
states matched to the teacher blocks the student kept, recovery by distillation."""

from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ConfigError, DataError
from modelpress.distill import DistillConfig, StudentConfig, build_student, distill
from modelpress.distill.api import _pairs
from modelpress.distill.outputs import transformer_blocks
from modelpress.distill.students import block_influence, most_influential
from modelpress.zoo.tinylm import TinyLM, TinyLMSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(layers: int = 4) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyLMSpec(hidden=32, layers=layers, heads=2, intermediate=64, seq_len=16)).eval()


def _batches(n: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (4, 16), generator=g),) for _ in range(n)]


def _silence(teacher: TinyLM, i: int) -> None:
    """Block i adds nothing to the residual stream: its output equals its input."""
    block = transformer_blocks(teacher)[i]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_a_block_that_changes_nothing_has_no_influence_and_is_cut_first():
    teacher = _teacher()
    _silence(teacher, 2)
    influence = block_influence(teacher, _batches())
    assert len(influence) == 4
    assert influence[2] < 1e-6 and min(influence[:2] + influence[3:]) > 1e-3
    assert most_influential(teacher, _batches(), 0.75) == [0, 1, 3]
    student = build_student(teacher, StudentConfig(depth_ratio=0.75), _batches())
    assert student.teacher_layers == (0, 1, 3) and len(transformer_blocks(student)) == 3
    torch.testing.assert_close(student(*_batches(1)[0]), teacher(*_batches(1)[0]))  # the cut block did nothing


def test_depth_ratio_needs_data_and_a_valid_ratio():
    with pytest.raises(DataError, match="depth_ratio ranks the teacher's blocks on data"):
        build_student(_teacher(), StudentConfig(depth_ratio=0.5))
    with pytest.raises(ConfigError, match=r"depth_ratio must be in \(0, 1\), got 1.0"):
        StudentConfig(depth_ratio=1.0)
    with pytest.raises(ConfigError, match="give one of layers .* got layers and depth_ratio"):
        StudentConfig(layers=(0, 1), depth_ratio=0.5)
    assert most_influential(_teacher(2), _batches(), 0.1) == most_influential(_teacher(2), _batches(), 0.5)


def test_hidden_states_pair_with_the_teacher_blocks_the_student_kept():
    teacher = _teacher()
    _silence(teacher, 1)
    student = build_student(teacher, StudentConfig(depth_ratio=0.5), _batches())
    kept = student.teacher_layers
    assert 1 not in kept and len(kept) == 2
    pairs, io = _pairs(teacher, student, DistillConfig(hidden_weight=1.0))
    assert pairs == [(f"hidden.{i}", f"hidden.{t}") for i, t in enumerate(kept)]
    assert io["t_layers"] == list(kept)


def test_distillation_recovers_a_depth_pruned_student():
    teacher = _teacher()
    data = torch.cat([b[0] for b in _batches(8)])
    cfg = DistillConfig(student=StudentConfig(depth_ratio=0.5), alpha=1.0, temperature=1.0, hidden_weight=1.0,
                        epochs=4, batch_size=8, lr=3e-3, warmup=0.0)  # fmt: skip
    result = distill(teacher, data=data, config=cfg)
    assert len(transformer_blocks(result.student)) == 2
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses


def test_opt_blocks_are_found_under_model_decoder_layers():
    """OPT keeps its blocks one level deeper (`model.decoder.layers`) than Llama (`model.layers`)."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=3, num_attention_heads=2,
                       max_position_embeddings=32, word_embed_proj_dim=16)  # fmt: skip
    lm = OPTForCausalLM(config).eval()
    assert transformer_blocks(lm) is lm.model.decoder.layers
    scores = block_influence(lm, [(torch.randint(0, 64, (2, 8)),)])
    assert len(scores) == 3 and all(s >= 0 for s in scores)
