import mmap
import time

import torch

from modelpress.measure import peak_memory


def test_peak_memory_sees_a_large_temporary_allocation():
    def allocate(n: int) -> None:
        # fresh anonymous pages, touched: resident for sure. A malloc'd tensor can be served from memory the
        # process already holds (a full suite run saw no growth for torch.ones(64 MiB) held 20 ms, 200 ms, 1 s)
        block = mmap.mmap(-1, n)
        block.write(b"\1" * n)
        time.sleep(0.2)  # many 1 ms sampler periods
        block.close()

    n = 64 * 2**20
    assert peak_memory(allocate, (n,), threads=1, calls=2) >= 32 * 2**20


def test_peak_memory_restores_threads_and_is_not_negative():
    before = torch.get_num_threads()
    seen: list[int] = []
    assert peak_memory(lambda: seen.append(torch.get_num_threads()), (), threads=1) >= 0
    assert seen == [1, 1, 1]
    assert torch.get_num_threads() == before
