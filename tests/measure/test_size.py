import pytest
import torch
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.measure import artifact_size_bytes, count_params


class Tied(nn.Module):
    """Embedding tied to the output head, plus a linear layer with known zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)  # 80
        self.mid = nn.Linear(8, 8)  # 64 + 8
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: same Parameter
        with torch.no_grad():
            self.mid.weight[:, :3] = 0  # 24 zeros
            self.mid.bias.zero_()  # 8 zeros


def test_count_params_counts_tied_weights_once_and_exact_zeros():
    params, nonzero = count_params(Tied())
    assert params == 80 + 64 + 8
    assert nonzero == params - 24 - 8


def test_count_params_dedupes_distinct_parameters_over_the_same_memory():
    model = nn.Module()
    model.a = nn.Linear(4, 4, bias=False)
    model.b = nn.Linear(4, 4, bias=False)
    model.b.weight = nn.Parameter(model.a.weight.data)  # another Parameter object, same data_ptr
    assert model.a.weight is not model.b.weight
    assert count_params(model) == (16, 16)


def test_module_artifact_size_is_about_four_bytes_per_param():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    params, _ = count_params(model)
    size = artifact_size_bytes(model)
    assert 4 * params <= size <= 4 * params + 4096  # fp32 data + safetensors header


def test_tied_module_is_saved_once():
    model = Tied()
    params, _ = count_params(model)
    size = artifact_size_bytes(model)
    assert 4 * params <= size <= 4 * params + 4096


def test_non_contiguous_weights_are_saved():
    model = nn.Linear(16, 8)
    model.weight = nn.Parameter(torch.randn(16, 8).t())  # a transposed view
    assert not model.weight.is_contiguous()
    assert artifact_size_bytes(model) >= 4 * (16 * 8 + 8)


def test_folder_size_sums_its_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 250)
    assert artifact_size_bytes(tmp_path) == 350
    assert artifact_size_bytes(tmp_path / "sub" / "b.bin") == 250
    assert artifact_size_bytes(str(tmp_path / "a.bin")) == 100


def test_missing_path_is_a_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        artifact_size_bytes(tmp_path / "nope.onnx")
