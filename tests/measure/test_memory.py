import time

import torch

from modelpress.measure import peak_memory


def test_peak_memory_sees_a_large_temporary_allocation():
    def allocate(n: int) -> None:
        block = torch.ones(n)  # touched pages: resident
        time.sleep(1.0)  # many 1 ms sampler periods, even when other threads delay the sampler (20 ms and then
        # 200 ms holds each once saw no growth in a full suite run on 2 busy cores)
        del block

    n = 16 * 2**20  # 64 MiB of float32
    assert peak_memory(allocate, (n,), threads=1, calls=2) >= 32 * 2**20


def test_peak_memory_restores_threads_and_is_not_negative():
    before = torch.get_num_threads()
    seen: list[int] = []
    assert peak_memory(lambda: seen.append(torch.get_num_threads()), (), threads=1) >= 0
    assert seen == [1, 1, 1]
    assert torch.get_num_threads() == before
