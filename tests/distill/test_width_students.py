"""Width-pruned students of transformers: FFN neurons and attention head groups scored on data (what they write
into the residual stream), the config following the cut, recovery by distillation from the original."""

from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ConfigError, DataError
from modelpress.distill import DistillConfig, StudentConfig, build_student, distill
from modelpress.distill.api import _pairs
from modelpress.distill.outputs import transformer_blocks
from modelpress.zoo.tinylm import TinyLM, TinyLMSpec

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")


def _teacher() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyLMSpec(hidden=32, layers=2, heads=4, intermediate=64, seq_len=16)).eval()


def _llama(kv_heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _batches(n: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (4, 16), generator=g),) for _ in range(n)]


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_a_width_student_drops_the_units_that_write_nothing():
    """An FFN neuron and a head group whose output-projection columns are zero write nothing: they go first,
    and the student computes what the teacher does."""
    teacher = _llama()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.down_proj.weight[:, 64:].zero_()  # the second half of the FFN neurons
            layer.self_attn.o_proj.weight[:, :32].zero_()  # query heads 0 and 1: K/V group 0
    student = build_student(teacher, StudentConfig(width_ratio=0.5), _batches())
    for layer in student.model.layers:
        assert layer.mlp.down_proj.in_features == 64 and layer.mlp.gate_proj.out_features == 64
        assert layer.self_attn.q_proj.out_features == 32 and layer.self_attn.k_proj.out_features == 16
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 1
    assert student.config.intermediate_size == 64 and student.config.head_dim == 16
    assert _params(student) < 0.75 * _params(teacher)
    x = _batches(1)[0][0]
    torch.testing.assert_close(student(x).logits, teacher(x).logits, atol=1e-4, rtol=1e-4)
    assert student.teacher_layers == (0, 1)


def test_a_width_student_saves_and_reloads_at_its_size(tmp_path):
    student = build_student(_llama(), StudentConfig(width_ratio=0.5, heads_ratio=1.0), _batches())
    assert student.model.layers[0].self_attn.q_proj.out_features == 64  # heads_ratio 1.0 keeps every head
    student.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _batches(1)[0][0]
    torch.testing.assert_close(again(x).logits, student(x).logits)


def test_width_students_need_data_and_valid_ratios():
    with pytest.raises(DataError, match="width_ratio student is scored on data"):
        build_student(_teacher(), StudentConfig(width_ratio=0.5))
    with pytest.raises(ConfigError, match=r"heads_ratio must be in \(0, 1\], got 0.0"):
        StudentConfig(width_ratio=0.5, heads_ratio=0.0)
    with pytest.raises(ConfigError, match="heads_ratio narrows .* give both"):
        StudentConfig(heads_ratio=0.5)


def test_hidden_states_pair_block_by_block():
    teacher = _teacher()
    student = build_student(teacher, StudentConfig(width_ratio=0.5), _batches())
    pairs, _ = _pairs(teacher, student, DistillConfig(hidden_weight=1.0))
    assert pairs == [("hidden.0", "hidden.0"), ("hidden.1", "hidden.1")]


def test_distillation_recovers_a_width_pruned_student():
    teacher = _teacher()
    data = torch.cat([b[0] for b in _batches(8)])
    cfg = DistillConfig(student=StudentConfig(width_ratio=0.5), alpha=1.0, temperature=1.0, hidden_weight=1.0,
                        epochs=4, batch_size=8, lr=3e-3, warmup=0.0)  # fmt: skip
    result = distill(teacher, data=data, config=cfg)
    blocks = transformer_blocks(result.student)
    assert blocks[0].mlp.down_proj.in_features == 32 and blocks[0].self_attn.q_proj.out_features == 16
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_on_tiny_lm_distillation_recovers_half_of_a_width_cut(tiny_lm):
    """The trained tiny-lm with half of its FFN neurons and head groups cut recovers at least half of its held-out
    perplexity increase by distillation from the original on the train split (disjoint from the scored text)."""
    from modelpress.zoo.tinylm import SMALL_SPEC, TinyLMEntry, perplexity

    teacher, base = tiny_lm
    data = torch.cat([b[0] for b in TinyLMEntry(SMALL_SPEC).calibration_data(128, 8)])
    student = build_student(teacher, StudentConfig(width_ratio=0.5), [(data[:16],)])
    cut = perplexity(student)
    cfg = DistillConfig(alpha=1.0, temperature=1.0, hidden_weight=0.01, epochs=3, batch_size=8, lr=1e-3, warmup=0.05)
    recovered = perplexity(distill(teacher, student, data, cfg).student)
    assert _params(student) < 0.8 * _params(teacher)
    assert cut > base and (cut - recovered) >= 0.5 * (cut - base), (base, cut, recovered)
