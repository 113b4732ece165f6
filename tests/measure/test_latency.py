import time

import pytest
import torch

from modelpress.core.errors import BadInputError
from modelpress.measure import measure_latency, measure_throughput


def test_sleeping_fn_measures_at_least_its_sleep():
    lat = measure_latency(lambda: time.sleep(0.005), (), warmup=1, repeats=5)
    assert lat.runs == 5
    assert lat.p50 >= 5.0
    assert lat.min >= 5.0
    assert lat.p90 >= lat.p50 >= lat.min
    assert lat.mean >= lat.min


def test_warmup_and_repeats_call_counts_and_inference_mode():
    calls: list[bool] = []
    lat = measure_latency(lambda x: calls.append(torch.is_inference_mode_enabled()), (1,), warmup=3, repeats=7)
    assert lat.runs == 7
    assert len(calls) == 10
    assert all(calls)
    assert not torch.is_inference_mode_enabled()


def test_threads_fixed_during_run_and_restored_even_on_error():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    seen: set[int] = set()
    measure_latency(lambda: seen.add(torch.get_num_threads()), (), warmup=1, repeats=3, threads=other)
    assert seen == {other}
    assert torch.get_num_threads() == before

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(boom, (), threads=other)
    assert torch.get_num_threads() == before


def test_min_time_keeps_sampling_until_enough_time_is_timed():
    lat = measure_latency(lambda: time.sleep(0.001), (), warmup=0, repeats=2, min_time_s=0.02)
    assert lat.runs >= 2
    assert lat.mean * lat.runs >= 20.0  # the timed calls add up to min_time_s


def test_tensor_input_is_passed_as_one_argument():
    model = torch.nn.Linear(4, 2)
    lat = measure_latency(model, torch.randn(3, 4), warmup=0, repeats=2)
    assert lat.runs == 2


def test_bad_arguments_are_rejected():
    with pytest.raises(BadInputError, match="repeats"):
        measure_latency(lambda: None, (), repeats=0)
    with pytest.raises(BadInputError, match="threads"):
        measure_latency(lambda: None, (), threads=0)


def test_throughput_counts_items_tokens_and_padding():
    # two dynamically padded text batches: (3 sentences, max len 4) and (2 sentences, max len 2)
    mask_a = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    mask_b = torch.tensor([[1, 1], [1, 1]])
    batches = [(torch.ones_like(mask_a), mask_a), (torch.ones_like(mask_b), mask_b)]
    calls: list[int] = []
    out = measure_throughput(
        lambda ids, mask: calls.append(ids.shape[0]),
        batches,
        lambda b: int(b[0].shape[0]),
        threads=1,
        warmup_batches=1,
        passes=2,
    )
    assert out["items"] == 5
    assert out["batches"] == 2
    assert out["tokens"] == 11
    assert out["padding_ratio"] == pytest.approx(1 - 11 / 16)
    assert out["items_per_s"] == pytest.approx(5 * 2 / out["seconds"])
    assert out["tokens_per_s"] == pytest.approx(11 * 2 / out["seconds"])
    assert len(calls) == 1 + 2 * 2


def test_throughput_without_mask_has_no_token_figures():
    batches = [(torch.randn(8, 4),) for _ in range(3)]
    out = measure_throughput(torch.nn.Linear(4, 2), batches, 8, threads=1)
    assert out["items"] == 24
    assert out["items_per_s"] > 0
    assert "tokens" not in out and "padding_ratio" not in out


def test_throughput_min_time_adds_passes():
    out = measure_throughput(lambda x: None, [(torch.zeros(2),)], 2, threads=1, min_time_s=0.02)
    assert out["seconds"] >= 0.02
    assert out["passes"] >= 2  # a pass is one no-op call: microseconds, far less than 20 ms
    assert out["items_per_s"] == pytest.approx(2 * out["passes"] / out["seconds"])


def test_throughput_needs_a_batch():
    with pytest.raises(BadInputError, match="at least one batch"):
        measure_throughput(lambda: None, [], 1, threads=1)


def test_max_time_stops_a_slow_model_early_after_three_timed_calls():
    calls: list[float] = []

    def slow() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.1)

    lat = measure_latency(slow, (), warmup=5, repeats=30, max_time_s=0.35)
    # warm-up stops once it passed 0.35 / 4 s (one call); timing once the timed calls add up to 0.35 s
    assert len(calls) == 1 + lat.runs
    assert lat.runs == 4
    assert lat.p50 >= 100.0
    lat = measure_latency(slow, (), warmup=0, repeats=30, max_time_s=0.01)
    assert lat.runs == 3  # never fewer than three


def test_max_time_leaves_a_fast_model_its_repeats_and_is_checked():
    lat = measure_latency(lambda: None, (), warmup=2, repeats=25, max_time_s=5.0)
    assert lat.runs == 25
    for bad in (0, -1.0):
        with pytest.raises(BadInputError, match="max_time_s"):
            measure_latency(lambda: None, (), max_time_s=bad)
