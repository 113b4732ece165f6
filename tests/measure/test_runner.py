import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.core.report import ModelStats, Quality
from modelpress.measure import bench, count_params, stats_table, write_json
from modelpress.zoo.base import ModelFn, ZooEntry


class MLPEntry(ZooEntry):
    """Stand-in: a tiny MLP; accuracy against labels made by a fixed reference MLP."""

    name = "tiny-mlp"
    task = "classification"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _mlp(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        return self._mlp(self.seed)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 16, generator=torch.Generator().manual_seed(batch_size)),)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        return [self.example_inputs(batch_size) for _ in range(n // batch_size)]

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        x = torch.randn(200, 16, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            labels = self._mlp(0)(x).argmax(-1)
            acc = (model(x).argmax(-1) == labels).float().mean().item()
        return Quality("accuracy", acc)

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(1000):  # more than the runner takes
            yield (torch.randn(batch_size, 16, generator=torch.Generator().manual_seed(i)),)


class TextEntry(MLPEntry):
    """Stand-in text encoder: (input_ids, attention_mask) with dynamic padding."""

    name = "tiny-text"

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        torch.manual_seed(self.seed)

        class Encoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(50, 8)
                self.out = nn.Linear(8, 4)

            def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                h = self.emb(ids) * mask.unsqueeze(-1)  # (B, T, 8)
                return self.out(h.sum(1) / mask.sum(1, keepdim=True))

        return Encoder().eval()

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        return torch.randint(0, 50, (batch_size, 12)), torch.ones(batch_size, 12, dtype=torch.long)

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        return Quality("constant", 0.5, details={"data": str(data)})

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(1000):
            lengths = torch.tensor([(i + k) % 10 + 1 for k in range(batch_size)])
            mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
            yield torch.randint(0, 50, mask.shape) * mask, mask


def _spec(entry: ZooEntry) -> tuple[str, nn.Module, ZooEntry]:
    return entry.name, entry.load(), entry


FAST = dict(batch_sizes=(1, 4), repeats=3, warmup=1, threads=1, progress=False)


def test_bench_two_models_measures_everything():
    before = torch.get_num_threads()
    mlp, text = MLPEntry(), TextEntry()
    stats = bench([_spec(mlp), _spec(text)], eval_data=Path("/data/here"), **FAST)
    assert torch.get_num_threads() == before
    assert [s.name for s in stats] == ["tiny-mlp", "tiny-text"]
    for s, entry in zip(stats, (mlp, text), strict=True):
        assert set(s.latency_ms) == {"1", "4"}
        assert all(lat.runs == 3 and lat.p90 >= lat.p50 > 0 for lat in s.latency_ms.values())
        assert (s.params, s.nonzero_params) == count_params(entry.load())
        assert 4 * s.params <= s.size_bytes <= 4 * s.params + 4096
        assert s.peak_memory_bytes is not None and s.peak_memory_bytes >= 0
        assert s.throughput["batch_size"] == 4
        assert s.throughput["items"] == 512  # bounded: 128 batches of 4
        assert s.throughput["passes"] >= 1
    assert stats[0].quality == Quality("accuracy", 1.0)
    assert stats[1].quality.value == 0.5 and stats[1].quality.details["data"] == "/data/here"
    assert "tokens" not in stats[0].throughput
    assert 0 < stats[1].throughput["padding_ratio"] < 1
    assert stats[1].throughput["tokens"] < 512 * 10


def test_a_different_model_scores_lower():
    stats = bench([_spec(MLPEntry(seed=0)), ("other", MLPEntry(seed=1).load(), MLPEntry())], **FAST)
    assert stats[0].quality.value == 1.0
    assert stats[1].quality.value < 1.0


def test_names_go_through_the_resolve_hook_and_switches_skip_measurements():
    asked: list[str] = []

    def resolve(name: str) -> tuple[str, nn.Module, ZooEntry]:
        asked.append(name)
        entry = MLPEntry()
        return name, entry.load(), entry

    (s,) = bench(["my-mlp"], resolve=resolve, quality=False, throughput=False, memory=False, **FAST)
    assert asked == ["my-mlp"]
    assert s.name == "my-mlp"
    assert set(s.latency_ms) == {"1", "4"}
    assert s.quality is None and s.throughput is None and s.peak_memory_bytes is None


def test_without_entry_only_size_is_measured_and_an_artifact_path_is_used(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"z" * 1234)
    model = MLPEntry().load()
    plain, with_path = bench([("plain", model, None), ("exported", model, None, artifact)], **FAST)
    assert plain.params == count_params(model)[0] and plain.size_bytes > 1234
    assert plain.latency_ms == {} and plain.quality is None
    assert with_path.size_bytes == 1234 and with_path.artifact == str(artifact)


def test_progress_bar_run_gives_the_same_fields():
    (s,) = bench([_spec(MLPEntry())], batch_sizes=(2,), repeats=2, warmup=0, threads=1, progress=True)
    assert set(s.latency_ms) == {"2"} and s.quality is not None


def test_bad_specs_and_batch_sizes_are_rejected():
    with pytest.raises(BadInputError, match="batch_sizes"):
        bench([_spec(MLPEntry())], batch_sizes=(0,), progress=False)
    with pytest.raises(BadInputError, match="model spec"):
        bench([("only-a-name",)], progress=False)  # type: ignore[list-item]


@pytest.fixture(scope="module")
def two_stats() -> list[ModelStats]:
    return bench([_spec(MLPEntry()), _spec(TextEntry())], **FAST)


def test_stats_table_has_a_row_per_model(two_stats):
    table = stats_table(two_stats)
    assert table.row_count == 2
    headers = [str(c.header) for c in table.columns]
    assert "bs1 p50/p90 ms" in headers and "bs4 p50/p90 ms" in headers
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    assert "tiny-mlp" in text and "tiny-text" in text and "accuracy 1.0000" in text
    assert f"{two_stats[0].params:,} " in text  # an exact count, not a float


def test_write_json_is_valid_and_round_trips(two_stats, tmp_path):
    path = write_json(two_stats, tmp_path / "out" / "bench.json", {"threads": 1})
    doc = json.loads(path.read_text())
    assert set(doc) == {"environment", "models"}
    assert doc["environment"] == {"threads": 1}
    assert len(doc["models"]) == 2
    for key in ("name", "size_bytes", "params", "nonzero_params", "latency_ms", "quality"):
        assert key in doc["models"][0]
    assert set(doc["models"][0]["latency_ms"]["1"]) >= {"p50", "p90"}
    assert [ModelStats.from_dict(m) for m in doc["models"]] == two_stats
    assert list((tmp_path / "out").iterdir()) == [path]  # no partial file left behind


def test_write_json_default_environment(two_stats, tmp_path):
    doc = json.loads(write_json(two_stats[:1], tmp_path / "b.json").read_text())
    assert {"versions", "cpu", "threads"} <= set(doc["environment"])


class SlowEntry(MLPEntry):
    """The MLP behind a 0.2 s call: bench's time caps must bound the calls it makes."""

    name = "slow-mlp"

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        mlp = self._mlp(0)

        class Slow(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.calls = 0
                self.mlp = mlp

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                self.calls += 1
                time.sleep(0.2)
                return self.mlp(x)

        return Slow().eval()


def test_slow_model_timing_and_throughput_are_bounded_by_max_time(monkeypatch):
    import modelpress.measure.runner as runner

    monkeypatch.setattr(runner, "THROUGHPUT_MAX_TIME_S", 0.5)
    entry = SlowEntry()
    model = entry.load()
    (s,) = bench([("slow", model, entry)], batch_sizes=(2,), repeats=30, warmup=5, threads=1, progress=False,
                 memory=False, quality=False, max_time_s=0.7)  # fmt: skip
    assert s.latency_ms["2"].runs == 4  # 0.2 s calls: timing stops once 0.7 s is passed
    assert s.throughput["batches"] == 2  # 0.5 s of 0.2 s batches
    # the input check, 1 warm-up (past 0.7 / 4 s), 4 timed; throughput: 2 warm-up batches (a batch under 1 s),
    # then 2 batches per pass for at least 0.5 s
    assert model.calls == 1 + 1 + 4 + 2 + 2 * s.throughput["passes"]
    (full,) = bench([("slow", entry.load(), entry)], batch_sizes=(2,), repeats=3, warmup=1, threads=1,
                    progress=False, memory=False, quality=False, throughput=False, max_time_s=None)  # fmt: skip
    assert full.latency_ms["2"].runs == 3
