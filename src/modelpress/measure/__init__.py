"""Benchmark harness: size, parameters, latency, throughput, peak memory and quality, side by side."""

from modelpress.measure.latency import measure_latency, measure_throughput
from modelpress.measure.memory import peak_memory
from modelpress.measure.runner import bench, stats_table, write_json
from modelpress.measure.size import artifact_size_bytes, count_params

__all__ = [
    "bench", "stats_table", "write_json",
    "measure_latency", "measure_throughput", "peak_memory",
    "count_params", "artifact_size_bytes",
]  # fmt: skip
