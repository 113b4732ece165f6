"""Students built from the teacher: fewer transformer layers, narrower CNNs; configs."""

from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import BadInputError, ConfigError
from modelpress.distill import DistillConfig, StudentConfig, build_student, fewer_layers, narrower_cnn
from modelpress.distill.outputs import transformer_blocks
from modelpress.zoo.digits import DigitsCNN

from ._models import tiny_bert


def test_config_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match=r"temperature must be > 0, got -1.0"):
        DistillConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match=r"temperature must be > 0, got 0"):
        DistillConfig.from_dict({"temperature": 0})
    with pytest.raises(ConfigError, match="mode"):
        DistillConfig.from_dict({"mode": "sometimes"})
    with pytest.raises(ConfigError, match="needs mode='online'"):
        DistillConfig(mode="offline", attention_weight=1.0)
    with pytest.raises(ConfigError, match=r"width_ratio must be in \(0, 1\), got 1.5"):
        StudentConfig(width_ratio=1.5)
    with pytest.raises(ConfigError, match=r"DistillConfig.student: \{'layer': \[0\]\}"):
        DistillConfig.from_dict({"student": {"layer": [0]}})


def test_config_round_trips_through_a_dict() -> None:
    cfg = DistillConfig.from_dict({"mode": "offline", "student": {"layers": [0, 2, 4]}, "epochs": 2})
    assert cfg.student == StudentConfig(layers=(0, 2, 4))
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg


def test_narrower_cnn_keeps_the_largest_filters() -> None:
    torch.manual_seed(0)
    teacher = DigitsCNN().eval()
    student = narrower_cnn(teacher, 0.5).eval()
    t_conv, s_conv = teacher.features[0], student.features[0]
    keep = t_conv.weight.abs().flatten(1).sum(1).topk(8).indices.sort().values
    torch.testing.assert_close(s_conv.weight, t_conv.weight[keep])
    assert [m.out_channels for m in student.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16, 32]
    assert student.classifier.in_features == 32
    assert student(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(student) < 0.27 * n(teacher)
    assert n(narrower_cnn(teacher, 0.48)) <= n(teacher) / 4


def test_narrower_cnn_refuses_other_architectures() -> None:
    with pytest.raises(BadInputError, match="Conv2d"):
        narrower_cnn(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5)


def test_fewer_layers_copies_the_chosen_bert_layers() -> None:
    teacher = tiny_bert(layers=4)
    student = build_student(teacher, StudentConfig(layers=(0, 3)))
    t_blocks, s_blocks = transformer_blocks(teacher), transformer_blocks(student)
    assert len(s_blocks) == 2 and student.backbone.config.num_hidden_layers == 2
    for s_i, t_i in ((0, 0), (1, 3)):
        for (name, a), (_, b) in zip(
            s_blocks[s_i].state_dict().items(), t_blocks[t_i].state_dict().items(), strict=True
        ):
            torch.testing.assert_close(a, b, msg=name)
    assert len(transformer_blocks(teacher)) == 4  # the teacher is untouched
    ids, mask = torch.randint(1, 100, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    assert student(ids, mask).shape == (2, 5, 32)
    assert len(transformer_blocks(fewer_layers(teacher))) == 2  # default: every other layer


def test_fewer_layers_on_llama_renumbers_layers() -> None:
    from modelpress.zoo.tinylm import TinyLM, TinyLMSpec

    torch.manual_seed(0)
    teacher = TinyLM(TinyLMSpec(hidden=32, layers=4, heads=2, intermediate=64, seq_len=16)).eval()
    student = fewer_layers(teacher, [1, 3])
    blocks = transformer_blocks(student)
    assert len(blocks) == 2 and student.lm.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1]
    torch.testing.assert_close(blocks[1].mlp.up_proj.weight, transformer_blocks(teacher)[3].mlp.up_proj.weight)
    assert student(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)


def test_fewer_layers_errors() -> None:
    teacher = tiny_bert(layers=4)
    with pytest.raises(BadInputError, match=r"\[7\] are out of range: the teacher has 4 layers"):
        fewer_layers(teacher, [0, 7])
    with pytest.raises(BadInputError, match="fewer than the teacher's 4 layers"):
        fewer_layers(teacher, [0, 1, 2, 3])
    with pytest.raises(BadInputError, match="no transformer blocks"):
        fewer_layers(DigitsCNN(), [0])
