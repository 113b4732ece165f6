"""What a measurement ran on: library versions, CPU model and capabilities, thread count.

`cpu_info()` reads the CPU's flags and the caps a user (or a benchmark) set on the kernel
libraries, and says what the fast paths can use:

- `int8`: the int8 GEMM unit oneDNN runs: `amx` (AMX tiles, signed and unsigned int8 sources),
  `avx512_vnni` / `avx_vnni` (VNNI dot products: unsigned int8 sources; a signed source needs
  weights packed with a compensation term), `avx2` (16-bit multiply-adds, unsigned int8 sources
  too) or `none`;
- `bf16`: `amx`, `avx512_bf16` (native bf16 dot products) or `none` (bf16 is converted to fp32
  around every op: slower than fp32);
- `aten`: the vector width of ATen's own kernels (`avx512`, `avx2`, `default`).

`ONEDNN_MAX_CPU_ISA` caps oneDNN (e.g. `AVX512_CORE_VNNI` hides AMX, `AVX2` hides AVX-512) and
`ATEN_CPU_CAPABILITY` caps ATen; both are read once per process, before the first kernel runs, so
a capped run starts a new process with them set (benchmarks/cpu_matrix.py does).

    >>> cpu_info()["int8"], cpu_info()["bf16"]
    ('avx512_vnni', 'avx512_bf16')

`int8_signed_native()` and `int8_gemm_exact()` are the two facts the int8 lowering is chosen by.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from functools import lru_cache
from typing import Any

from modelpress.core.errors import BadInputError

_PACKAGES = ("torch", "onnx", "onnxruntime", "transformers", "numpy", "modelpress")
# oneDNN's ISA names in increasing order; a cap hides every feature introduced after it.
_ONEDNN_ISA = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
)
# the first oneDNN ISA level at which each flag is used
_FLAG_LEVEL = {
    "avx2": "AVX2",
    "avx_vnni": "AVX2_VNNI",
    "avx512f": "AVX512_CORE",
    "avx512bw": "AVX512_CORE",
    "avx512_vnni": "AVX512_CORE_VNNI",
    "avx512_bf16": "AVX512_CORE_BF16",
    "avx512_fp16": "AVX512_CORE_FP16",
    "amx_tile": "AVX512_CORE_AMX",
    "amx_int8": "AVX512_CORE_AMX",
    "amx_bf16": "AVX512_CORE_AMX",
}
_CPU_FLAGS = tuple(_FLAG_LEVEL)  # the flags recorded, in this order
FEATURES = ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _read_cpuinfo() -> tuple[str, set[str], str]:
    """(model name, flags, "family F model M") of the first CPU in /proc/cpuinfo."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    ids: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key in ("cpu family", "model"):
                    ids[key] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                elif not line.strip() and flags:
                    break
    except OSError:
        pass
    family = f"family {ids['cpu family']} model {ids['model']}" if len(ids) == 2 else ""
    return name, flags, family


def _onednn_cap() -> str | None:
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if not value:
        return None
    value = value.strip().upper()
    return value if value in _ONEDNN_ISA else None


def _aten_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability()).lower()
    except Exception:  # pragma: no cover - torch without the query
        return os.environ.get("ATEN_CPU_CAPABILITY", "unknown").lower()


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model name, logical cores, the hardware's SIMD/matrix flags and what the kernels may use."""
    name, flags, family = _read_cpuinfo()
    hardware = [f for f in _CPU_FLAGS if f in flags]
    cap = _onednn_cap()
    limit = _ONEDNN_ISA.index(cap) if cap else len(_ONEDNN_ISA)
    usable = {f for f in hardware if _ONEDNN_ISA.index(_FLAG_LEVEL[f]) <= limit}
    if "amx_int8" in usable and "amx_tile" in usable:
        int8 = "amx"
    elif "avx512_vnni" in usable:
        int8 = "avx512_vnni"
    elif "avx_vnni" in usable:
        int8 = "avx_vnni"
    elif "avx2" in usable:
        int8 = "avx2"
    else:
        int8 = "none"
    if "amx_bf16" in usable and "amx_tile" in usable:
        bf16 = "amx"
    elif "avx512_bf16" in usable:
        bf16 = "avx512_bf16"
    else:
        bf16 = "none"
    return {
        "model": name,
        "family": family,
        "logical_cores": os.cpu_count(),
        "features": hardware,
        "onednn_max_isa": cap,
        "usable": sorted(usable),
        "int8": int8,
        "bf16": bf16,
        "aten": _aten_capability(),
    }


def int8_signed_native() -> bool:
    """Whether the int8 unit multiplies signed sources natively (AMX); VNNI and AVX2 take unsigned ones."""
    return cpu_info()["int8"] == "amx"


def int8_gemm_exact() -> bool:
    """Whether oneDNN's int8 GEMMs compute exact integer products on this CPU: AMX or VNNI.

    Without VNNI (AVX2's `vpmaddubsw`) each pair of uint8 x int8 products is summed in int16 with
    saturation: measured under `ONEDNN_MAX_CPU_ISA=AVX2`, errors up to 0.86 on a layer whose exact
    output agrees to 1e-5. Layers with int8 activations then run their reference path (a float GEMM
    on the dequantized weight), in eager mode and in the `.pt2`; the speed gate measures the result.
    """
    return cpu_info()["int8"] in ("amx", "avx512_vnni", "avx_vnni")


def has_feature(feature: str) -> bool:
    """Whether the kernels may use `feature` (one of FEATURES) on this CPU under the current caps."""
    if feature not in FEATURES:
        raise BadInputError(f"unknown CPU feature {feature!r}; known: {', '.join(FEATURES)}")
    return feature in cpu_info()["usable"]


def require_feature(feature: str, what: str) -> None:
    """Refuse `what` (e.g. "the AMX int8 lowering") where the CPU lacks `feature`: a clear error, exit 2."""
    if not has_feature(feature):
        info = cpu_info()
        capped = f", capped at ONEDNN_MAX_CPU_ISA={info['onednn_max_isa']}" if info["onednn_max_isa"] else ""
        usable = ", ".join(info["usable"]) or "none of " + ", ".join(FEATURES)
        raise BadInputError(
            f"{what} needs the CPU feature {feature}, which this CPU ({info['model']}{capped}) does not offer; "
            f"it has: {usable}"
        )


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS keeps one, else every CPU."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def check_threads(threads: int | None, current: int | None = None) -> int | None:
    """`threads` as given if it is None or a count in [1, usable_cpus()]; else `BadInputError` (exit 2).

    Threads beyond the CPUs only wait for each other, and make every timing meaningless. `current`,
    the count already in effect (e.g. `torch.get_num_threads()`), is accepted as it is: keeping it
    changes nothing.
    """
    if threads is None or (threads == current and not isinstance(threads, bool)):
        return threads
    cpus = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadInputError(f"threads must be a positive integer, got {threads!r} (allowed: 1..{cpus} on this machine)")
    if threads > cpus:
        raise BadInputError(
            f"threads must be at most {cpus}, the CPUs this process may use (allowed: 1..{cpus}), got {threads}"
        )
    return threads


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def environment(threads: int | None = None) -> dict[str, Any]:
    """The `environment` block of report.json."""
    import torch

    return {
        "versions": versions(),
        "cpu": cpu_info(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "platform": platform.platform(),
        "denormals": denormals(),
    }


def denormals() -> dict[str, str]:
    """How float32 denormals are treated, for the report: torch's (measured on this thread: a denormal times
    one stays non-zero unless flushed) and ONNX Runtime's (set per session, from the graph's metadata)."""
    import torch

    kept = bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() != 0.0)
    return {
        "torch": "kept (IEEE)" if kept else "flushed to zero",
        "onnxruntime": "as zero inside the sessions of graphs whose metadata asks for it "
        "(session.set_denormal_as_zero; the calling thread's setting is left as it is)",
    }
