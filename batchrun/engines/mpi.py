"""Spawning an engine's tensor-parallel ranks with mpi4py from inside a Ray actor (or a container).

mpi4py's MPIPoolExecutor calls MPI_Comm_spawn from a manager thread. Inside a Ray actor that has several traps, each
handled here:
- Open MPI counts one slot per core and refuses to spawn more ranks than slots ("There are not enough slots available
  in the system to satisfy the 2 slots", MPI_ERR_SPAWN); the error is raised in the manager thread and the caller's
  futures never resolve. `OMPI_MCA_rmaps_base_oversubscribe=1` lifts the limit, and every wait here is bounded.
- Containers run as root, which Open MPI refuses without `OMPI_ALLOW_RUN_AS_ROOT{,_CONFIRM}`.
- Docker lacks the ptrace rights of vader's single-copy (CMA) path; loopback TCP is the transport that always works
  for the ranks' out-of-band channel on one node.
- Spawned ranks inherit the environment the MPI runtime captured at MPI_Init, so CUDA_VISIBLE_DEVICES and the
  variables above must be set before `mpi4py.MPI` is first imported in the actor.
- A rank runs a function by reference: it must live in an importable module (this one), never in `__main__`.
- Spawned ranks are not children of the actor (Open MPI's daemon starts them), so an actor killed with SIGKILL would
  leave them running. Each rank therefore watches its parent's pid and exits when the parent is gone; close()
  also kills any rank still alive after a bounded shutdown.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, wait

import psutil

log = logging.getLogger(__name__)


class SpawnError(RuntimeError):
    """The ranks could not be started (or did not answer) within the time allowed."""


def mpi_environment(gpu_ids: list[str] | None = None, oversubscribe: bool = True, loopback: bool = True) -> dict:
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
    if oversubscribe:
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    if loopback:
        env["OMPI_MCA_btl_tcp_if_include"] = "lo"
        env["OMPI_MCA_oob_tcp_if_include"] = "lo"
    if gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    return env


def prepare_mpi_process(gpu_ids: list[str] | None = None) -> None:
    """Before anything imports mpi4py.MPI in this process (tensorrt_llm does, at import): the spawn environment
    above, and no MPI_Finalize at exit. This process only launches ranks; finalizing would wait on ranks that a
    bounded close() may have killed (seen on the GPU machine: a TP=2 bench process never exited)."""
    os.environ.update(mpi_environment(gpu_ids))
    try:
        import mpi4py
    except ImportError:  # an engine that spawns no ranks through mpi4py
        return
    mpi4py.rc.finalize = False


def descendants() -> list[psutil.Process]:
    """Every process below this one: MPI ranks spawned in singleton mode run under the orted this process forked."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def kill_all(procs: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Terminate, wait up to grace_s, then kill what is left."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def actor_gpu_ids() -> list[str] | None:
    """The GPUs Ray gave this actor, as CUDA_VISIBLE_DEVICES values; None outside Ray or without GPUs."""
    ids = []
    try:
        import ray

        if ray.is_initialized():  # get_runtime_context() would otherwise start a local Ray instance
            ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    except ImportError:
        pass
    if ids:
        return [str(i) for i in ids]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else None


# ---------------------------------------------------------------- functions the ranks run (importable)

_WATCHDOG_STARTED = False


def _watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Exit this rank when the process that spawned it is gone (killed actor): no orphan ranks."""
    global _WATCHDOG_STARTED
    if _WATCHDOG_STARTED:
        return
    _WATCHDOG_STARTED = True

    def loop():
        while psutil.pid_exists(parent_pid):
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=loop, daemon=True, name="batchrun-parent-watch").start()


def rank_info(parent_pid: int) -> dict:
    """Runs on every rank once at start: the barrier pins one task per rank, the watchdog guards against orphans."""
    from mpi4py import MPI

    _watch_parent(parent_pid)
    MPI.COMM_WORLD.barrier()
    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(), "pid": os.getpid(),
            "host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def torch_dist_env(rank: int, world_size: int, master_port: int) -> dict:
    """What torchrun would have set: ranks come from MPI, the rendezvous is on loopback (one node per TP group)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}


# ---------------------------------------------------------------- the parent side


class RankPool:
    """`n_ranks` MPI processes spawned from this process, one task per rank at a time."""

    def __init__(self, n_ranks: int, *, gpu_ids: list[str] | None = None, timeout_s: float = 120.0,
                 oversubscribe: bool = True, loopback: bool = True, python_exe: str | None = None,
                 env: dict | None = None):
        self.n_ranks, self.timeout_s = n_ranks, timeout_s
        os.environ.update(mpi_environment(gpu_ids, oversubscribe, loopback))  # before mpi4py.MPI is imported
        import mpi4py

        mpi4py.rc.finalize = False  # see prepare_mpi_process
        from mpi4py.futures import MPIPoolExecutor

        kwargs = {"env": dict(env or {}), "main": False}
        if python_exe:
            kwargs["python_exe"] = python_exe
        self.pool = MPIPoolExecutor(max_workers=n_ranks, **kwargs)
        self.ranks: list[dict] = []
        self.killed: list[int] = []  # ranks close() had to kill: none in the normal case
        try:
            self.ranks = sorted(self.gather(rank_info, os.getpid(), timeout_s=timeout_s), key=lambda r: r["rank"])
        except BaseException as e:
            self.close(timeout_s=5)
            raise SpawnError(f"could not start {n_ranks} MPI ranks within {timeout_s:g}s: {e}") from None

    @property
    def pids(self) -> list[int]:
        return [r["pid"] for r in self.ranks]

    def submit_all(self, fn, *args) -> list[Future]:
        """Run fn(*args) once on each rank (a barrier inside fn keeps one task per rank)."""
        return [self.pool.submit(fn, *args) for _ in range(self.n_ranks)]

    def gather(self, fn, *args, timeout_s: float | None = None) -> list:
        futures = self.submit_all(fn, *args)
        done, pending = wait(futures, timeout=timeout_s or self.timeout_s)
        if pending:
            raise SpawnError(f"{len(pending)} of {self.n_ranks} ranks did not answer within "
                             f"{timeout_s or self.timeout_s:g}s")
        return [f.result() for f in futures]

    def close(self, timeout_s: float = 30.0) -> None:
        """Shut the ranks down; kill whichever is still alive after timeout_s. Safe to call twice."""
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            manager = getattr(pool, "_pool", None)  # taken first: shutdown(wait=True) clears it before it joins
            closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True},
                                      daemon=True)
            closer.start()
            closer.join(timeout_s)
            if closer.is_alive():
                _abandon_manager_thread(manager)
        procs = []
        for pid in self.pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=30)  # ranks tearing down NCCL/CUDA after shutdown: let them
        self.killed = [p.pid for p in alive]
        if alive:
            log.warning("killed %d rank(s) that had not exited 30s after shutdown: %s", len(alive), self.killed)
        for p in alive:
            p.kill()


def _abandon_manager_thread(manager) -> None:
    """A pool whose ranks died mid-task leaves mpi4py's manager thread waiting for their results forever
    (futures/_core.py, client_exec). That thread is not a daemon, and mpi4py also joins it at interpreter exit: the
    process would never exit (seen on the GPU machine after a TP=2 run, reproduced in tests/test_mpi.py). Take it off
    both joins: mpi4py's registry (futures/_core.py THREADS_QUEUES, as TensorRT-LLM's mpi_session.py does) and the
    interpreter's list of non-daemon threads to wait for (threading._shutdown_locks, CPython 3.11-3.12). The ranks
    themselves are killed by close()."""
    import sys

    thread = getattr(manager, "thread", None)
    if thread is None:
        return
    registry = getattr(sys.modules.get("mpi4py.futures._core"), "THREADS_QUEUES", None)
    if registry is not None:
        registry.pop(thread, None)
    _release_at_exit(thread)


def abandon_mpi_manager_threads() -> None:
    """After the ranks were killed: every mpi4py pool manager thread of this process (TensorRT-LLM's MpiPoolSession
    owns one we cannot reach by name) is taken off the exit-time joins, as _abandon_manager_thread does for one."""
    import sys

    registry = getattr(sys.modules.get("mpi4py.futures._core"), "THREADS_QUEUES", None)
    for thread in list(registry or ()):
        registry.pop(thread, None)
        _release_at_exit(thread)


def _release_at_exit(thread) -> None:
    lock, locks = getattr(thread, "_tstate_lock", None), getattr(threading, "_shutdown_locks", None)
    if lock is not None and locks is not None:
        with threading._shutdown_locks_lock:
            locks.discard(lock)
    else:
        log.warning("mpi4py's manager thread is stuck on ranks that died; this Python may wait for it at exit")
