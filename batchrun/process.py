"""What a batchrun process knows about itself: its node, niceness, Arrow allocator and peak memory. Used by the
driver and the workers alike."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pyarrow as pa

log = logging.getLogger("batchrun.worker")


def on_stop_signals(handler) -> bool:
    """handler(signal_name) on SIGTERM and SIGINT instead of dying: a spot VM's preemption notice, Kubernetes' grace
    period, `ray job stop` and Ctrl-C all send one of them first. Python sets handlers only from the main thread (where
    Ray runs a synchronous actor's methods, and the CLI its driver); elsewhere nothing is set and False is returned."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: handler(signal.Signals(signum).name))
    return True


def node_name() -> str:
    """Host and Ray node id: several Ray nodes can share a host (and a hostname)."""
    try:
        import ray

        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:
        return socket.gethostname()


def set_niceness(value: int | None) -> int:
    """Give every thread of this process the niceness `value` (Linux niceness is per thread; threads and processes
    started afterwards, such as the engine's loop and its MPI ranks, inherit it). Returns the niceness in effect.
    Going below the current value needs CAP_SYS_NICE (root in containers); without it the worker keeps Ray's."""
    if value is not None and hasattr(os, "setpriority"):
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            tids = [0]
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, value)
            except ProcessLookupError:  # a thread that just ended
                pass
            except PermissionError:
                log.warning("cannot set the worker's niceness to %s (needs CAP_SYS_NICE); it stays at %s", value,
                            os.getpriority(os.PRIO_PROCESS, 0))
                break
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0


def _steady_pool() -> pa.MemoryPool:
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        return pa.system_memory_pool()


def steady_arrow_pool() -> str:
    """The Arrow allocator workers use unless ARROW_DEFAULT_MEMORY_POOL names one: jemalloc, else the system's.

    pyarrow's default on Linux, mimalloc, keeps the pages that Parquet decoding frees on its thread pool: a worker
    grew by ~60 MB over its first 200 shards with 4 MB live in the pool, then plateaued (bench/RESULTS.md, memory).
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
