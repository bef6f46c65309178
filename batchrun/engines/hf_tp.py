"""Tensor-parallel HF engine: ranks spawned through mpi4py (engines/mpi.py), rank 0 drives the batch.

Each rank sets what torchrun would have set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from its MPI rank),
initializes torch.distributed (gloo on CPU, NCCL on GPUs), loads the model with `tp_plan="auto"` and starts its
continuous batching manager. transformers' TP-aware manager takes requests on the TP driver (rank 0) only and keeps
the other ranks in step (continuous_batching/distributed.py, DistributedHelper). The worker actor talks to rank 0 over
a local authenticated connection (multiprocessing.connection): requests in, raw results out.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from concurrent.futures import wait
from multiprocessing.connection import Client, Listener

from batchrun.engines.hf_backend import (
    EngineDead,
    LaunchConfig,
    PrefixTracker,
    RawResult,
    collect_results,
    kv_cache_tokens,
    loop_failure,
    start_manager,
    warm_up,
)
from batchrun.engines.mpi import RankPool, actor_gpu_ids, torch_dist_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_rank_main(cfg: LaunchConfig, master_port: int, address: tuple, authkey: bytes) -> str:
    """Runs on every rank for the engine's lifetime (importable: ranks cannot run code from __main__)."""
    from mpi4py import MPI

    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    os.environ.update(torch_dist_env(rank, size, master_port))
    import torch
    import torch.distributed as dist

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)  # the spawned ranks see exactly the actor's GPUs, in order
    started = time.monotonic()
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    group_s = round(time.monotonic() - started, 3)
    model, manager, eos_ids, timings = start_manager(cfg, tp_plan="auto")
    timings = {"process_group_s": group_s, **timings}
    try:
        if rank == 0:
            started = time.monotonic()
            warm_up(manager, cfg.results_per_request)
            timings["warmup_s"] = round(timings["warmup_s"] + time.monotonic() - started, 3)
            tracker = PrefixTracker(manager)
            _drive(manager, tracker, Client(address, authkey=authkey),
                   ("ready", getattr(model.config, "max_position_embeddings", None), eos_ids, kv_cache_tokens(manager),
                    timings, tracker.info()))
        else:
            manager._generation_thread.join()  # follows rank 0's batches until rank 0 stops the manager
    finally:
        if manager.is_running():
            manager.stop(block=True, timeout=30)
        _teardown(dist, cuda)
    return f"rank {rank} done"


def _teardown(dist, cuda: bool) -> None:
    """Leave torch.distributed as the rank exits. On GPUs the NCCL process group is *not* destroyed: with torch 2.11
    and NCCL on 2 H200s, destroy_process_group() never returned on either rank (py-spy: both ranks in
    distributed_c10d.destroy_process_group), nor did _abort_process_group() or a barrier then destroy; close() then
    waited for its timeout and killed the ranks. Without it close() returns with no rank killed: the process exits and
    the driver frees its communicators (bench/RESULTS.md, TP close). Gloo (CPU) tears down cleanly."""
    if not cuda:
        dist.destroy_process_group()


def _drive(manager, tracker, conn, ready: tuple) -> None:
    conn.send(ready)
    stop = threading.Event()

    def send_results():
        while not stop.is_set():
            out = collect_results(manager, 0.05, tracker)
            if (why := loop_failure(manager, out)) is not None:  # a dying loop's failed requests are not results
                conn.send(("dead", why))
                return
            if out:
                conn.send(("results", out))

    sender = threading.Thread(target=send_results, daemon=True)
    sender.start()
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        for rid, ids, max_new, row_sampling in msg[1]:
            manager.add_request(input_ids=ids, request_id=rid, max_new_tokens=max_new, **row_sampling)
    stop.set()
    sender.join(5)


def preload_rank() -> float:
    """Runs on every rank right after the spawn: import torch and transformers (seconds of the start) while the
    worker loads its tokenizer, instead of after it. The barrier keeps one task per rank. Returns its seconds."""
    started = time.monotonic()
    from mpi4py import MPI
    from transformers import AutoModelForCausalLM  # noqa: F401  (imports torch and the model code)

    MPI.COMM_WORLD.barrier()
    return round(time.monotonic() - started, 3)


class TPBackend:
    """Ranks spawned at construction (and importing their libraries at once); start(cfg) loads the model on them."""

    def __init__(self, tp_size: int):
        started = time.monotonic()
        self.pool = RankPool(tp_size, gpu_ids=actor_gpu_ids())
        self.spawn_s = round(time.monotonic() - started, 3)
        self.futures = self.pool.submit_all(preload_rank)

    def start(self, cfg: LaunchConfig, timeout_s: float = 600.0) -> TPBackend:
        waited = time.monotonic()
        wait(self.futures, timeout=timeout_s)  # the ranks' imports (overlapped with the worker's own)
        preload = [f.result() for f in self.futures if f.done() and f.exception() is None]
        self.spawn_s = {"rank_spawn_s": self.spawn_s, "rank_imports_s": max(preload, default=None),
                        "rank_imports_wait_s": round(time.monotonic() - waited, 3)}
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self.futures = self.pool.submit_all(hf_rank_main, cfg, free_port(), listener.address, authkey)
        self.conn = self._accept(listener, timeout_s)
        self.pending: list[tuple] = []
        self.buffered: list[RawResult] = []
        msg = self._recv(timeout_s)
        if msg[0] != "ready":
            raise EngineDead(f"rank 0 said {msg[0]!r} instead of ready")
        _, self.context_length, self.eos_ids, self.kv_cache_tokens, timings, self.prefix = msg
        self.timings = {**self.spawn_s, **timings}
        return self

    def _accept(self, listener, timeout_s):
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("conn", listener.accept()), daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.5)
            timeout_s -= 0.5
            self._check_ranks()
            if timeout_s <= 0:
                self.close()
                raise EngineDead("rank 0 did not connect back in time")
        listener.close()
        return box["conn"]

    def _check_ranks(self) -> None:
        for f in self.futures:
            if f.done() and f.exception() is not None:
                self.close()
                raise EngineDead(f"a tensor-parallel rank failed: {f.exception()!r}")

    def _recv(self, timeout: float):
        while not self.conn.poll(min(timeout, 1.0)):
            self._check_ranks()
            timeout -= 1.0
            if timeout <= 0:
                raise EngineDead("rank 0 did not answer in time")
        return self.conn.recv()

    def check_alive(self) -> None:
        self._check_ranks()

    def add(self, request_id: str, ids: list[int], max_new_tokens: int, row_sampling: dict) -> None:
        self.pending.append((request_id, ids, max_new_tokens, row_sampling))

    def results(self, timeout: float) -> list[RawResult]:
        if self.pending:  # one message per poll, not one per request
            self.conn.send(("add", self.pending))
            self.pending = []
        out = []
        if self.conn.poll(timeout):
            while self.conn.poll(0):
                kind, payload = self.conn.recv()
                if kind == "dead":
                    raise EngineDead(f"rank 0's generation loop stopped: {payload}")
                out += payload
        else:
            self._check_ranks()
        return out

    def close(self) -> None:
        conn, self.conn = getattr(self, "conn", None), None
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            wait(self.futures, timeout=30)
            pool.close()
