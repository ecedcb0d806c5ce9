"""What the benchmarks measure about the machine: memory, CPU time, bandwidth, GEMM, versions."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: it pins the BLAS/OpenMP thread pools before numpy loads)
import numpy as np

VERSION_PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-genai",
    "onnx",
    "torch",
    "transformers",
    "tiktoken",
)


# ---- this process -------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM, in MiB).

    Not ru_maxrss: Linux carries that across fork+exec, so a worker would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy so far, all cores (/proc/stat; steal included:
    time this VM's cores wanted to run but the host ran something else)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds used by this process's finished children (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- bandwidth and compute ----------------------------------------------------------------------


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _threaded(fn, parts: list[tuple]) -> None:
    """Run fn(*part) on one thread per part (numpy releases the GIL inside big reductions/copies)."""
    threads = [threading.Thread(target=fn, args=part) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """DRAM bandwidth in GB/s from numpy: sum (read) and copy (read + write), 1 and 2 threads.

    The array must be several times the last-level cache, so every pass streams from memory.
    Best of ``repeats``.
    """
    n = megabytes * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    half = n // 2
    halves = [(src[:half], dst[:half]), (src[half:], dst[half:])]
    nbytes = src.nbytes
    sum_1 = _best_of(lambda: src.sum(), repeats)
    copy_1 = _best_of(lambda: np.copyto(dst, src), repeats)
    sum_2 = _best_of(lambda: _threaded(lambda a, _b: a.sum(), halves), repeats)
    copy_2 = _best_of(lambda: _threaded(lambda a, b: np.copyto(b, a), halves), repeats)
    return {
        "sum_1t": nbytes / sum_1 / 1e9,
        "sum_2t": nbytes / sum_2 / 1e9,
        "copy_1t": 2 * nbytes / copy_1 / 1e9,  # bytes read + bytes written
        "copy_2t": 2 * nbytes / copy_2 / 1e9,
    }


def measure_gemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """fp32 matrix-multiply throughput of numpy's BLAS (THREADS threads), GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    return 2 * n**3 / _best_of(lambda: a @ b, repeats) / 1e9


# ---- the machine --------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    from importlib import metadata as importlib_metadata  # here: not in a worker's start

    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "simd": ", ".join(simd) or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
        "versions": package_versions(),
    }
