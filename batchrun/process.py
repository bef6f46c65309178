"""A batchrun process's place and priority: where it runs (node), its niceness, and its stop signals. Used by the
driver, the queue and the workers alike. (Its memory: memory.py.)"""

from __future__ import annotations

import logging
import os
import socket
import threading

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
