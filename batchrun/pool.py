"""The driver's pool of worker actors: starts them, watches them, replaces dead ones within the restart budget, and
closes them at the end. Each live worker is a LiveWorker; a retired one waits in `closing` until its close() returns.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from batchrun.engines.base import EngineDead
from batchrun.errors import JobFailed
from batchrun.plan import Plan
from batchrun.records import WorkerStats
from batchrun.spec import JobSpec
from batchrun.worker import Worker

log = logging.getLogger("batchrun")


def scheduling_options(res, tp: int) -> tuple[dict, object | None]:
    """Where a worker goes, and the placement group it needs (None if none).
    A TP group's GPUs must share a node: one placement-group bundle, STRICT_PACK."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if tp > 1 and res.gpus_per_worker > 1:
        pg = placement_group([{"GPU": res.gpus_per_worker, "CPU": res.cpus_per_worker}], strategy="STRICT_PACK")
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)}, pg
    return {"scheduling_strategy": "SPREAD" if res.placement == "spread" else "DEFAULT"}, None


@dataclass
class LiveWorker:
    """One worker actor from its spawn until it is retired or replaced."""

    actor: Any  # the Ray actor handle
    start_ref: Any  # Worker.start(): the engine load; its error is the load error
    run_ref: Any  # Worker.run(), queued behind start: returns the worker's final counters
    started_at: float = field(default_factory=time.time)
    placement_group: Any = None  # removed with the worker


def _short_error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] or [type(e).__name__]
    return f"{type(e).__name__}: {tail[0][:500]}"


def load_state(start_ref) -> tuple[bool, str | None]:
    """(the engine has loaded, the engine's own load error) without waiting. A dead process (killed, OOM, node lost)
    is neither: its run() error says so."""
    import ray

    if not ray.wait([start_ref], timeout=0)[0]:
        return False, None
    try:
        ray.get(start_ref)
    except ray.exceptions.RayActorError:
        return False, None
    except Exception as e:
        return False, f"engine load failed: {_short_error(e)}"
    return True, None


HEARTBEATS_PER_S = 250  # what the one queue actor takes from all nodes together, beside leases and commits


def heartbeat_for(spec: JobSpec, workers: int, nodes: int | None = None) -> JobSpec:
    """The spec the workers run with: faults.heartbeat_s, or longer where so many nodes heartbeat (one call a node:
    beats.py) that they would flood the queue actor (its one thread serves every call: bench/RESULTS.md, scale), at
    most a third of the lease timeout so that a live worker never loses its leases. nodes: the cluster's (None:
    as many as workers)."""
    f = spec.faults
    senders = min(workers, nodes or workers)
    every = min(max(f.heartbeat_s, senders / HEARTBEATS_PER_S), f.lease_timeout_s / 3)
    if every <= f.heartbeat_s:
        return spec
    return spec.model_copy(update={"faults": f.model_copy(update={"heartbeat_s": every})})


def _cluster_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


class WorkerPool:
    """Starts worker actors, restarts dead ones within the budget, and hands a dead worker's shards back."""

    def __init__(self, spec: JobSpec, plan: Plan, queue, run_id: str = ""):
        import ray

        self.run_id = run_id
        res = spec.resources
        self.actor_cls = ray.remote(Worker)
        self.actor_options = dict(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_restarts=0)
        self.spec, self.plan, self.queue = spec, plan, queue
        self.spec_json = spec.model_dump_json()
        self.live: dict[str, LiveWorker] = {}
        self.closing: dict[str, tuple[LiveWorker, Any]] = {}  # retired: (worker, close ref), killed once it returns
        self.results: dict[str, WorkerStats] = {}  # final counters returned by workers' run()
        self.restarts = 0
        self.restart_times: collections.deque[float] = collections.deque()  # the budget is per hour (restart_budget)
        self.engine_deaths = 0  # workers whose engine died (EngineDead) or that stalled
        self.drained: list[str] = []  # workers that drained on a stop signal and returned
        self.draining = False  # the driver is stopping: no replacement is started
        self.generation = 0
        self.last_error = ""
        self.close_wait_s = 0.0  # how long the job's end waited for engines to close
        self.loaded_any = False  # has any worker ever loaded its engine?
        self.load_failures = 0
        self.spans: dict[str, list] = {}  # per worker [spawned_at, ended_at or None]: the GPU time it held
        self.initial: set[str] = set()
        # a suite (runner.SuiteRunner): workers that finished a task keep their engines for the next one
        self.keep = False
        self.idle: dict[str, LiveWorker] = {}

    def assign(self, spec: JobSpec, plan: Plan, queue, run_id: str) -> None:
        """The task the pool's workers run now (a suite's next task: its spec, plan, queue and run)."""
        self.spec, self.plan, self.queue, self.run_id = spec, plan, queue, run_id
        self.spec_json = spec.model_dump_json()
        self.results, self.drained, self.restarts, self.engine_deaths = {}, [], 0, 0
        self.close_wait_s, self.initial = 0.0, set()

    def retask(self, n: int) -> None:
        """Start the assigned task on up to n of the workers the last task left idle (their engines are kept where
        the task needs the same one: Worker.retask), spawning more if n is larger and retiring the rest."""
        self.spec_json = heartbeat_for(self.spec, n, _cluster_nodes()).model_dump_json()
        for wid in list(self.idle)[n:]:
            self.live[wid] = self.idle.pop(wid)
            self._retire(wid)
        for wid, w in list(self.idle.items()):
            ref = w.actor.retask.remote(self.spec_json, self.plan.units, self.queue, self.run_id, self.plan.reader)
            self.live[wid] = LiveWorker(w.actor, ref, w.actor.run.remote(), placement_group=w.placement_group)
            self.spans[wid] = [self.live[wid].started_at, None]  # this task's cost counts from here
            del self.idle[wid]
        while len(self.live) < n:
            self._spawn()
        self.initial = set(self.live)
        self.queue.set_worker_count.remote(len(self.live))

    # ------------------------------------------------------------ start

    def start(self, n: int) -> None:
        self.spec_json = heartbeat_for(self.spec, n, _cluster_nodes()).model_dump_json()
        for _ in range(n):
            self._spawn()
        self.initial = set(self.spans)  # the job's first workers: their start-up counts from the command's start

    def _spawn(self) -> None:
        self.generation += 1
        wid = f"w{self.generation:03d}"
        placement, pg = scheduling_options(self.spec.resources, self.spec.engine.tensor_parallel_size)
        actor = self.actor_cls.options(**self.actor_options, **placement).remote(
            wid, self.spec_json, self.plan.units, self.queue, self.run_id, self.plan.reader)
        start_ref = actor.start.remote()
        self.live[wid] = LiveWorker(actor, start_ref, actor.run.remote(), placement_group=pg)
        self.spans[wid] = [self.live[wid].started_at, None]
        self.queue.set_worker_count.remote(len(self.live))

    # ------------------------------------------------------------ watch

    def watch(self, timeout: float = 0.5) -> None:
        import ray

        refs = {w.run_ref: wid for wid, w in self.live.items()}
        if not refs:
            if ray.get(self.queue.finished.remote()):
                return
            raise JobFailed(f"no worker is alive and none can start (restart budget spent): {self.last_error}")
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
        for ref in ready:
            wid = refs[ref]
            try:
                self.results[wid] = ray.get(ref)
            except Exception as e:  # the actor died (killed, OOM, node lost) or the engine raised
                self.engine_deaths += isinstance(e, EngineDead) or isinstance(getattr(e, "cause", None), EngineDead)
                self.replace(wid, load_state(self.live[wid].start_ref)[1] or _short_error(e))
                continue
            self._settle(wid)
            if self.results[wid].drain:  # it drained on a stop signal (preemption): its work goes on elsewhere
                self.drained.append(wid)
                if not self.draining and self._work_left():
                    self._spawn()
        self.reap_closed()
        self._replace_slow_loaders()

    def _replace_slow_loaders(self) -> None:
        timeout = self.spec.faults.startup_timeout_s
        for wid, w in list(self.live.items()):
            if time.time() - w.started_at > timeout and not self._note_load(w)[0]:
                self.replace(wid, f"engine did not load within {timeout:g}s")

    def _note_load(self, w: LiveWorker) -> tuple[bool, str | None]:
        loaded, error = load_state(w.start_ref)
        self.loaded_any = self.loaded_any or loaded
        return loaded, error

    # ------------------------------------------------------------ replace: record, fail fast, hand back, respawn

    def replace(self, wid: str, error: str) -> None:
        log.warning("worker %s failed: %s", wid, error)
        self.last_error = f"worker {wid}: {error}"
        self._record_failure(wid)
        self._fail_fast_if_the_model_never_loads()
        if self._hand_back(wid, error):
            self._respawn()

    def _record_failure(self, wid: str) -> None:
        w = self.live.pop(wid, None)
        self.queue.set_worker_count.remote(len(self.live))
        if w is None:
            return
        if self._note_load(w)[1]:
            self.load_failures += 1  # the engine raised while loading; a killed actor does not count here
        self._kill(wid, w)

    def _fail_fast_if_the_model_never_loads(self) -> None:
        # A model that cannot load will not load on the next worker either: fail now, not after the budget.
        if not self.loaded_any and self.load_failures >= 3:
            raise JobFailed(f"the engine failed to load on {self.load_failures} workers in a row; last error: "
                            f"{self.last_error}")

    def _hand_back(self, wid: str, error: str) -> bool:
        """The dead worker's shards go back to the queue. Returns whether any work is left for a replacement."""
        import ray

        held = ray.get(self.queue.release_worker.remote(wid, error))
        if held:
            log.warning("worker %s: its shards %s go back to the queue", wid, held)
        return self._work_left()

    def _work_left(self) -> bool:
        import ray

        return not ray.get(self.queue.finished.remote())

    def restart_budget(self) -> dict:
        """Replacements allowed in any hour: max_worker_restarts, or restarts_per_worker_hour per worker of the job
        when that is more; and how many the last hour used."""
        f = self.spec.faults
        now = time.time()
        while self.restart_times and self.restart_times[0] < now - 3600:
            self.restart_times.popleft()
        per_hour = max(f.max_worker_restarts, math.ceil(f.restarts_per_worker_hour * len(self.initial)))
        return {"per_hour": per_hour, "used_last_hour": len(self.restart_times), "restarts": self.restarts}

    def _respawn(self) -> None:
        if self.draining:
            return
        budget = self.restart_budget()
        if budget["used_last_hour"] >= budget["per_hour"]:
            if not self.live:
                raise JobFailed(
                    f"no worker is alive and the restart budget ({budget['per_hour']} an hour: faults."
                    f"max_worker_restarts, or faults.restarts_per_worker_hour x {len(self.initial)} workers) is "
                    f"spent; last error: {self.last_error}"
                )
            return
        self.restarts += 1
        self.restart_times.append(time.time())
        self._spawn()

    # ------------------------------------------------------------ retire and close

    def _settle(self, wid: str) -> None:
        """A worker whose run() returned: kept for a suite's next task (unless it drained: a stop signal), else
        retired."""
        if self.keep and not (wid in self.results and self.results[wid].drain):
            self.idle[wid] = self.live.pop(wid)
        else:
            self._retire(wid)

    def _retire(self, wid: str) -> None:
        """A worker that finished its run: ask it to close its engine (free the GPU, end its ranks) without waiting
        here. The driver goes on; reap_closed() kills it once close() returns, or at the close deadline."""
        w = self.live.pop(wid)
        self.closing[wid] = (w, w.actor.close.remote())

    def reap_closed(self, timeout: float = 0.0) -> None:
        """Kill the retired workers whose close() has returned (or failed), waiting at most `timeout` seconds."""
        import ray

        refs = {ref: wid for wid, (_, ref) in self.closing.items()}
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            wid = refs[ref]
            self._kill(wid, self.closing.pop(wid)[0])

    def _kill(self, wid: str, w: LiveWorker) -> None:
        import ray
        from ray.util import remove_placement_group

        ray.kill(w.actor, no_restart=True)
        if wid in self.spans and self.spans[wid][1] is None:
            self.spans[wid][1] = time.time()
        if w.placement_group is not None:
            remove_placement_group(w.placement_group)

    def finish(self, timeout_s: float = 60.0, close_timeout_s: float = 60.0) -> None:
        """After the last commit: wait (bounded) for workers to finish run(), then close every engine in parallel
        under one deadline (a job with N workers waits once, not N times). A worker whose engine never loaded (still
        loading, or its actor still waiting for resources the others held) has no results to hand back: shutdown()
        kills it without waiting."""
        import ray

        refs = {w.run_ref: wid for wid, w in self.live.items() if ray.wait([w.start_ref], timeout=0)[0]}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        for ref in ready:
            try:
                self.results[refs[ref]] = ray.get(ref)
            except Exception:
                continue  # it died after the last commit: nothing is lost; shutdown() kills what is left
            self._settle(refs[ref])
        started = time.monotonic()
        self.reap_closed(timeout=close_timeout_s)
        if self.closing:
            log.warning("workers %s did not close their engines within %gs; killing them",
                        sorted(self.closing), close_timeout_s)
        self.close_wait_s = round(time.monotonic() - started, 3)

    def lives(self, stats: dict[str, WorkerStats]) -> dict[str, dict]:
        """Per worker: when it was spawned and ended, and its engine window (from its stats), for cost.py."""
        return {wid: {"spawned_at": spawned, "ended_at": ended, "initial": wid in self.initial,
                      "first_submit_at": stats[wid].first_submit_at if wid in stats else None,
                      "last_completion_at": stats[wid].last_completion_at if wid in stats else None}
                for wid, (spawned, ended) in self.spans.items()}

    def shutdown(self) -> None:
        """Workers still live here are mid-run (the job failed or was interrupted), and retired workers whose close()
        has not returned by now: kill them, do not wait."""
        for wid, w in list(self.live.items()):
            self._kill(wid, w)
            del self.live[wid]
        for wid, (w, _) in list(self.closing.items()):
            self._kill(wid, w)
            del self.closing[wid]

    def close_idle(self) -> None:
        """The suite's end: the workers kept between tasks close their engines, as finish() closes a job's."""
        for wid in list(self.idle):
            self.live[wid] = self.idle.pop(wid)
            self._retire(wid)
        self.reap_closed(timeout=60.0)
        for wid, (w, _) in list(self.closing.items()):
            self._kill(wid, w)
            del self.closing[wid]
