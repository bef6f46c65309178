"""A batchrun process's memory: the Arrow allocator its workers use, and its resident memory (peak, now, and the
largest seen during a phase such as the engine's load). Used by the driver and the workers alike."""

from __future__ import annotations

import os
import threading

import pyarrow as pa


def _steady_pool() -> pa.MemoryPool:
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        return pa.system_memory_pool()


def steady_arrow_pool() -> str:
    """The Arrow allocator workers use unless ARROW_DEFAULT_MEMORY_POOL names one: jemalloc, else the system's.

    pyarrow's default on Linux, mimalloc, keeps the pages that Parquet decoding frees on its thread pool: a worker
    grows far past what is live in the pool before it plateaus (bench/RESULTS.md, memory).
    jemalloc and the system allocator return them. Best set in the environment of the node's Ray processes, so that
    Arrow's C++ code, which never sees pa.set_memory_pool, uses it from the start: batchrun does that for the local
    cluster it starts, the Docker image and launch/ scripts for theirs. Elsewhere the worker switches pyarrow's pool
    itself (use_steady_arrow_pool). A runtime_env would also do it, but costs each job a fresh worker process start."""
    return os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or _steady_pool().backend_name


def use_steady_arrow_pool() -> str:
    """In a worker that started on pyarrow's default allocator with nobody choosing one: switch pyarrow's pool (the
    tables batchrun builds, the Parquet it reads and writes). Returns the pool in use."""
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL") and pa.default_memory_pool().backend_name == "mimalloc":
        pa.set_memory_pool(_steady_pool())
    return pa.default_memory_pool().backend_name


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux the high-water mark of its own address space (VmHWM):
    ru_maxrss survives exec, so a process started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def rss_now_mb() -> dict:
    """This process's resident memory now, split: anonymous (its own heap, tensors on the CPU) and file-backed
    (mapped files such as safetensors checkpoints, which the page cache can drop). VmHWM counts both."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    out[line.split(":")[0][3:].lower() + "_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


class RssSampler:
    """The largest anonymous and file-backed resident memory seen while the `with` block runs (sampled every
    `interval_s` on a thread): VmHWM alone cannot say whether a peak was the process's own memory or a checkpoint
    the page cache holds mapped."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peaks = interval_s, {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            for key, value in rss_now_mb().items():
                self.peaks[key] = max(self.peaks.get(key, 0.0), value)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
