"""The driver: plan, lock the output dir, start the queue and the workers, watch them, write the summary.

It holds no row data: only shard descriptors and counters. It is also the entrypoint under `ray job submit`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

from batchrun import summary
from batchrun.cost import account, run_record
from batchrun.engines import check_engine
from batchrun.errors import JobFailed, JobInterrupted, SpecError
from batchrun.fingerprint import model_files
from batchrun.group import grouped_plan
from batchrun.hooks import load_hook
from batchrun.memory import peak_rss_mb, steady_arrow_pool
from batchrun.plan import Plan, make_plan
from batchrun.pool import WorkerPool
from batchrun.process import on_stop_signals
from batchrun.progress import ProgressBar
from batchrun.prompts import PromptBuilder
from batchrun.records import Snapshot, WorkerStats
from batchrun.scan import check_choices_column, check_template_renders, scan_input
from batchrun.shard_queue import ShardQueue
from batchrun.sources import open_source
from batchrun.spec import JobSpec
from batchrun.store.fs import store_retries
from batchrun.store.manifest import Entries
from batchrun.store.output import OutputDir

log = logging.getLogger("batchrun")
QUEUE_RESTARTS = 3  # the queue actor's restarts in a run (each rebuilds from the durable state)


def check_input(spec: JobSpec, plan: Plan) -> None:
    """Every column the job reads must exist; the input must have rows. Fails before any work starts."""
    if plan.total_rows == 0:
        raise SpecError(f"key 'input.path': the input {spec.input.path} has no rows")
    columns = list(plan.columns)
    PromptBuilder(spec.input).check_columns(columns)
    named = [("input.id_column", spec.input.id_column)]
    named += [("input.passthrough_columns", c) for c in spec.input.passthrough_columns]
    named += [(f"sampling.per_row.{k}", c) for k, c in spec.sampling.per_row.items()]
    if spec.score and spec.score.reference_column:
        named.append(("score.reference_column", spec.score.reference_column))
    if spec.score and spec.score.choices_column:
        named.append(("score.choices_column", spec.score.choices_column))
    if spec.score and spec.score.hook:
        load_hook(spec.score.hook, "score.hook")  # import it now: a typo fails before any work
    for key, col in named:
        if col and col not in columns:
            raise SpecError(f"key '{key}': column {col!r} not in the input (columns: {', '.join(columns)})")


def input_signature(plan: Plan) -> dict:
    return {"units": list(plan.units), "rows": list(plan.unit_rows)}


@dataclass
class JobResult:
    out_dir: str
    summary: dict = field(default_factory=dict)


class JobRunner:
    def __init__(self, spec: JobSpec, *, overwrite: bool = False, break_lock: bool = False, show_progress: bool = True,
                 retry_errors: bool = False):
        self.spec = spec
        self.overwrite = overwrite
        self.retry_errors = retry_errors  # generate the error rows of committed shards again, replacing their parts
        # a suite's task (SuiteRunner): the workers the last task left (their engines loaded), and whether to keep
        # them for the next task instead of closing them at the end
        self.pool: WorkerPool | None = None
        self.keep_workers = False
        self.break_lock = break_lock
        self.show_progress = show_progress
        self.run_id = uuid.uuid4().hex[:12]
        self.out = OutputDir(spec.output.dir)
        self.invoked_at = time.time()
        self.timings: dict = {}  # the driver's start-up phases
        self.grouped: dict | None = None  # shards.group_prefixes: the grouped copy (built now or reused), its cost
        self.n_workers = 0  # the workers this run started with (cost.py: GPUs held over the wall time)
        self._workers_seen: dict = {}  # every worker's latest stats, from the progress snapshots
        self._stats_version: tuple[str, int] | None = None  # the last snapshot's: the queue sends what changed since
        self.stop_signal: str | None = None  # set from a signal handler: drain and stop (README, failure model)

    def stop(self, signal_name: str) -> None:
        """Drain the job: called from a signal handler, so it only sets a flag the driver's loop reads."""
        self.stop_signal = self.stop_signal or signal_name

    # ------------------------------------------------------------ preparation (no Ray, no work)

    def prepare(self) -> Plan:
        check_engine(self.spec)
        plan = make_plan(self.spec)
        check_input(self.spec, plan)
        source = open_source(self.spec.input)
        scan_input(self.spec, plan, source)
        check_template_renders(self.spec, plan, source, PromptBuilder(self.spec.input))
        check_choices_column(self.spec, plan, source)
        return plan

    def components(self, plan: Plan) -> dict:
        return dict(self.spec.output_affecting(), input_files=input_signature(plan),
                    model_files={"files": model_files(self.spec.engine.model)})

    # ------------------------------------------------------------ the run

    def run(self, plan: Plan | None = None) -> JobResult:
        """The job; `plan`: prepared already (a suite prepares every task before any runs)."""
        self.invoked_at = time.time()
        plan = plan or self.prepare()
        self.timings["plan_s"] = round(time.time() - self.invoked_at, 3)  # plan and the input scan
        self.out.ensure()
        self.out.lock.acquire(self.run_id, self.break_lock)
        try:
            self.out.check_fingerprint(self.components(plan), self.overwrite,
                                       may_change=retry_may_change if self.retry_errors else None)
            # One manifest read: the segments merged into one (a re-run retries quarantined shards, so their
            # entries go); after a run that did not end cleanly, parts committed just before it died get their
            # entries back from their footers.
            complete = self.out.manifest.take_complete_mark()
            committed = self.out.manifest.compact(self.run_id, keep_quarantined=False)
            if complete != len(committed):  # the last run did not end cleanly: list the parts (a LIST per 1,000)
                committed = committed.replace(self.out.manifest.reconcile(
                    committed, self.run_id, len(plan.shards), below=self.out.manifest.lease_mark()))
            self.out.clean_tmp()
            revise = committed.having("error_rows").ids() if self.retry_errors else set()
            return self._run(plan, committed.ids(), revise)
        finally:
            self.out.lock.release(self.run_id)

    def _run(self, plan: Plan, committed: set[int], revise: set[int]) -> JobResult:
        import ray

        ray_started = time.time()
        init_ray()
        on_stop_signals(self._on_stop_signal)  # after ray.init, which installs its own SIGTERM handler
        self.timings["ray_start_s"] = round(time.time() - ray_started, 3)  # joining (or starting) the cluster
        if self.spec.shards.group_prefixes:  # the plan over a copy sorted by prompt prefix (built once, in Ray tasks)
            plan, self.grouped = grouped_plan(self.spec, plan, self.out)  # the same shard ids, other rows in each
        spec, faults = self.spec, self.spec.faults
        # The queue needs no CPU of its own: it only moves small descriptors. It dies with the driver (not detached),
        # and so do the workers: leftovers of a killed driver cannot keep committing (see README, failure model).
        # Ray restarts it where it dies (its process or its node): it rebuilds what is done from the manifest and the
        # parts' footers, workers re-adopt their leases with their next heartbeat, and every call is retried on the
        # new one; no engine is reloaded (tests/test_faults.py).
        queue = ray.remote(ShardQueue).options(num_cpus=0, max_concurrency=1, max_restarts=QUEUE_RESTARTS,
                                               max_task_retries=-1).remote(
            str(self.out.root), plan.shards, self.run_id, faults.max_attempts, faults.lease_timeout_s,
            spec.output.compression, spec.resources.niceness, committed, revise,
        )
        pool = self.pool or WorkerPool(spec, plan, queue, self.run_id)
        pool.assign(spec, plan, queue, self.run_id)
        pool.keep, self.pool = self.keep_workers, pool
        progress = ProgressBar(total=plan.total_rows, enabled=self.show_progress)
        try:
            # Workers start loading their engines now, while the queue actor builds its state (from what the driver
            # read of the manifest): model load overlaps the queue's start.
            self._start_workers(pool, plan, len(plan.shards) - len(committed - revise))
            snap, report = self._watch(queue, pool, progress)
        except BaseException:
            self._record_run(pool, self._workers_seen, finished=False)
            raise
        finally:
            progress.close()
            pool.shutdown()
            try:  # the queue's last manifest entries (on a failure path too; else the next start reconciles them)
                ray.get(queue.flush.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the queue may be what failed
                pass
            ray.kill(queue)
        summary = self.write_summary(snap, report, pool)
        if report["quarantined"]:
            lines = [f"  shard {sid}: {q['error']}" for sid, q in report["quarantined"].items()]
            raise JobFailed(
                f"{len(report['quarantined'])} shard(s) quarantined after {faults.max_attempts} failed attempts; "
                "the other shards are committed. Re-run the same command to retry them.\n" + "\n".join(lines)
            )
        return JobResult(str(self.out.root), summary)

    def _start_workers(self, pool: WorkerPool, plan: Plan, pending: int) -> None:
        self.n_workers = min(resolve_num_workers(self.spec.resources), pending) if pending else 0
        if pool.idle and self.n_workers:
            pool.retask(self.n_workers)  # a suite's next task, on the engines the last one loaded
        elif self.n_workers:
            pool.start(self.n_workers)

    def _watch(self, queue, pool: WorkerPool, progress: ProgressBar) -> tuple[Snapshot, dict]:
        """One tick a snapshot: drain on a stop signal, progress, the cost record so far, stalls, dead or finished
        workers, a lost lock. Returns the last snapshot and the queue's report once every shard is done."""
        import ray

        recorded, drain_deadline = time.time(), None
        while not (snap := self._snapshot(queue)).finished:
            if self.stop_signal and drain_deadline is None:
                drain_deadline = self._start_drain(queue, pool)
            if drain_deadline is not None and (not pool.live or time.monotonic() > drain_deadline):
                self._end_drain(queue, pool)
            progress.update(snap)
            if time.time() - recorded > 30:  # the run's GPU time so far: a killed run still counts
                self._record_run(pool, self._workers_seen, finished=False)
                recorded = time.time()
            self._check_stall(snap, pool)
            pool.watch()
            if self.out.lock.lost:
                raise JobFailed(f"output dir {self.out.root}: {self.out.lock.lost}; stopping this run (what it "
                                "committed is kept)")
        pool.finish()  # let workers see DONE, close their engines and hand back their final counters
        snap = self._snapshot(queue)
        progress.update(snap)
        return snap, ray.get(queue.report.remote())

    def _snapshot(self, queue) -> Snapshot:
        """The queue's progress, with every worker's latest stats (it sends the ones changed since the last)."""
        import ray

        snap = ray.get(queue.progress.remote(self._stats_version))
        self._workers_seen = snap.merge_workers(self._workers_seen, self._stats_version)
        self._stats_version = snap.stats_version
        return snap

    def _on_stop_signal(self, name: str) -> None:
        """SIGTERM (`ray job stop`, a preempted VM, Kubernetes) and a first Ctrl-C drain the job: workers commit what
        finishes within faults.drain_s and hand the rest back. A second Ctrl-C interrupts at once. Set only where the
        driver runs on the main thread (the CLI, `ray job submit`); an embedding program keeps its own handlers."""
        if self.stop_signal is not None and name == "SIGINT":
            raise KeyboardInterrupt
        print(f"batchrun: {name}: draining (committing what finishes within {self.spec.faults.drain_s:g}s); "
              "Ctrl-C again to stop at once", file=sys.stderr)
        self.stop(name)

    def _start_drain(self, queue, pool: WorkerPool) -> float:
        log.warning("%s: draining: workers commit what finishes within %gs and hand the rest back",
                    self.stop_signal, self.spec.faults.drain_s)
        pool.draining = True
        queue.drain.remote()
        # the workers' own deadline, plus the heartbeat that tells them and their last commits
        return time.monotonic() + self.spec.faults.drain_s + 2 * self.spec.faults.heartbeat_s + 15

    def _end_drain(self, queue, pool: WorkerPool) -> None:

        pool.reap_closed(timeout=10)  # drained workers close their engines (and ranks) before the driver ends
        snap = self._snapshot(queue)  # (the manifest is flushed on the way out, as on every path)
        raise JobInterrupted(
            f"stopped by {self.stop_signal}: drained; {snap.shards_done} of {snap.shards_total} shards are "
            f"committed, {snap.shards_pending + snap.shards_running} are not. Re-run the same command to "
            "resume.", self.stop_signal)

    def _check_stall(self, snap: Snapshot, pool: WorkerPool) -> None:
        faults = self.spec.faults
        for wid, w in snap.workers.items():
            if w.dead or wid not in pool.live:
                continue
            if w.in_flight and w.since_progress_s > faults.stall_timeout_s:
                # one stalled engine fails its worker, not the job: replaced, its shards handed back
                pool.engine_deaths += 1
                pool.replace(wid, f"stalled: worker {wid} on {w.node} has had {w.in_flight} requests in flight "
                                  f"and no completion for {w.since_progress_s:.0f}s (faults.stall_timeout_s="
                                  f"{faults.stall_timeout_s:g}); its shards go back to the queue")
                continue
            if w.heartbeat_age_s > max(faults.stall_timeout_s, faults.lease_timeout_s):
                pool.replace(wid, f"no heartbeat for {w.heartbeat_age_s:.0f}s")

    def _record_run(self, pool: WorkerPool, stats: dict[str, WorkerStats], finished: bool,
                    generated: int | None = None) -> dict:
        """This run's cost record (cost.py), written to the output dir; best effort on a failure path."""
        stats = {**stats, **pool.results}
        if generated is None:
            generated = sum(s.generated_tokens for s in stats.values())
        record = run_record(self.run_id, self.spec.resources.gpus_per_worker, self.n_workers, self.invoked_at,
                            time.time(), pool.lives(stats), generated, finished, self.spec.resources.gpu_hour_cost)
        try:
            self.out.runs.write(record)
        except Exception as e:  # noqa: BLE001 - never fail a job over its cost record
            log.warning("could not write the run's cost record: %s", e)
        return record

    def revised_entries(self, entries: Entries) -> dict:
        """The parts this run replaced (`--retry-errors`), as their footers say now that no worker is left: when two
        attempts of a revision both wrote, the last write stands, and its entry is the one to keep."""
        mine = entries.of_run(self.run_id).having("revision")
        footers = {sid: self.out.parts.entry(sid) for sid in mine}
        return {sid: f for sid, f in footers.items() if f is not None and f != entries[sid]}

    def write_summary(self, snap: Snapshot, report: dict, pool: WorkerPool) -> dict:
        merged = self.out.manifest.compact(self.run_id)  # this run's segments merged into one
        if override := self.revised_entries(merged):
            merged = self.out.manifest.compact(self.run_id, override=override)
        entries = merged.committed()
        self.out.manifest.mark_complete(len(entries))  # no worker of this run is left: the manifest holds every part
        wall = time.time() - self.invoked_at  # the whole command: plan, Ray start, engine loads and the work
        run, per_worker, revised = summary.this_run(entries, self.run_id, wall)
        self._record_run(pool, snap.workers, finished=True, generated=run["generated_tokens"])
        done, seen = summary.outputs(entries), {**snap.workers, **pool.results}
        out = {
            "status": "quarantined" if report["quarantined"] else "succeeded",
            "run_id": self.run_id,
            "output_dir": str(self.out.root),
            "rows": done["rows"],
            "error_rows": done["error_rows"],
            "shards": snap.shards_total,
            "shards_committed": snap.shards_done,
            "shards_skipped": snap.shards_skipped,
            **summary.faults(snap, report, pool, store_retries(), revised),
            # rows whose prompt and sampling repeated another row's in their shard: generated once, written to each
            "duplicate_rows": sum(i.duplicate_rows for i in seen.values()),
            # the queue actor's calls beside leases and commits: one heartbeat call a node carries its workers'
            # (beats.py); a commit takes its worker's next lease (one call a shard in a steady run)
            "queue_calls": {"heartbeat_calls": snap.heartbeat_calls, "worker_heartbeats": snap.worker_beats,
                            "leases_taken_by_commits": snap.commit_leases},
            "grouped_input": self.grouped,  # shards.group_prefixes: the copy built (or reused) and its seconds
            "close_wait_s": pool.close_wait_s,  # the end of the job waiting for engines to close, all in parallel
            # a suite's task run on engines an earlier task had loaded (SuiteRunner)
            "engine_reused": any(i.engine_reused for i in pool.results.values()),
            "prompt_tokens": done["prompt_tokens"],
            "generated_tokens": done["generated_tokens"],
            # prompt tokens the engines served from reused prefix blocks, and what they computed (all runs)
            "prefix_reuse": summary.prefix_reuse(done, pool.results),
            "cost": account(self.out.runs.all(), self.spec.resources.gpu_hour_cost),
            "this_run": run,
            "workers": per_worker,
            "driver_peak_rss_mb": peak_rss_mb(),
            "metrics": done["metrics"],
            "startup": summary.startup(self.timings, self.invoked_at, pool.results),
            **summary.workers(pool.results, seen),
        }
        self.out.write_text("_summary.json", json.dumps(out, indent=2))
        return out


# What `run --retry-errors` may change in the job (fixing a template, a longer budget, another truncation): how
# prompts are built and sampled. Not what decides which rows a shard holds or which columns the output has.
RETRY_MAY_CHANGE = {"input.prompt_column", "input.prompt_template", "input.messages_column", "input.chat",
                    "input.system_prompt", "input.truncation", "sampling.max_tokens", "sampling.temperature",
                    "sampling.top_p", "sampling.top_k", "sampling.seed", "sampling.stop", "sampling.per_row"}


def retry_may_change(key: str) -> bool:
    return key in RETRY_MAY_CHANGE or key.startswith(("engine.", "model_files.", "sampling.per_row."))


class SuiteRunner:
    """A suite (a job file with `tasks:`): every task planned and checked before any work, then run one after the
    other by one driver on one Ray start, with the same worker actors: a worker keeps its engine from task to task
    where the tasks need the same one (worker.engine_key), else it loads the task's own in the same process. Each task
    is a whole job of its own under <output.dir>/<name> (lock, fingerprint, manifest, resume, summary), so a suite
    cut short resumes task by task; <output.dir>/_summary.json reports every task and the whole."""

    def __init__(self, spec: JobSpec, **kwargs):
        self.spec, self.kwargs = spec, kwargs
        self.out = OutputDir(spec.output.dir)

    def run(self) -> JobResult:
        started = time.time()
        tasks = self.spec.task_specs()
        runners = [(name, JobRunner(spec, **self.kwargs)) for name, spec in tasks]
        plans = [runner.prepare() for _, runner in runners]  # a mistake in any task stops the suite before any work
        self.out.ensure()
        suite = {"tasks": [n for n, _ in tasks], "subdirs": {t.name: t.subdir for t in self.spec.tasks}}
        self.out.write_bytes(self.out.join("_suite.json"), json.dumps(suite).encode())
        summaries, failed, pool = {}, {}, None
        try:
            for i, ((name, runner), plan) in enumerate(zip(runners, plans)):
                runner.pool, runner.keep_workers = pool, i < len(runners) - 1
                try:
                    summaries[name] = runner.run(plan).summary
                except JobFailed as e:  # the task's shards quarantined (or its workers could not run): next task
                    failed[name] = str(e)
                    log.error("task %s failed: %s", name, e)
                pool = runner.pool
        finally:
            if pool is not None:
                pool.close_idle()
                pool.shutdown()
        summary = self.write_summary(summaries, failed, time.time() - started)
        if failed:
            raise JobFailed(f"{len(failed)} of {len(tasks)} tasks failed; the others are done:\n"
                            + "\n".join(f"  {n}: {e.splitlines()[0]}" for n, e in failed.items()))
        return JobResult(str(self.out.root), summary)

    def write_summary(self, summaries: dict, failed: dict, wall: float) -> dict:
        keys = ("status", "rows", "error_rows", "shards", "shards_committed", "generated_tokens", "duplicate_rows",
                "metrics", "output_dir")
        tasks = {n: {k: s.get(k) for k in keys} | {"wall_s": s["this_run"]["wall_s"],
                                                   "engine_reused": s.get("engine_reused")}
                 for n, s in summaries.items()}
        tasks |= {n: {"status": "failed", "error": e} for n, e in failed.items()}
        summary = {"status": "failed" if failed else "succeeded", "output_dir": str(self.out.root), "tasks": tasks,
                   "rows": sum(t.get("rows") or 0 for t in tasks.values()),
                   "error_rows": sum(t.get("error_rows") or 0 for t in tasks.values()),
                   "generated_tokens": sum(t.get("generated_tokens") or 0 for t in tasks.values()),
                   "wall_s": round(wall, 3)}
        self.out.write_text("_summary.json", json.dumps(summary, indent=2))
        return summary


def resolve_num_workers(res) -> int:
    """`num_workers: auto` follows the cluster: one worker per gpus_per_worker GPUs (per cpus_per_worker on CPU)."""
    import ray

    if res.num_workers != "auto":
        return res.num_workers
    total = ray.cluster_resources()
    if res.gpus_per_worker:
        return max(1, int(total.get("GPU", 0) // res.gpus_per_worker))
    return max(1, int(total.get("CPU", 1) // res.cpus_per_worker))


class _AuthNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_STARTED_LOCAL = [False]  # this process started the local cluster it runs on (init_ray)


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    _STARTED_LOCAL[0] = address is None
    if address is None:  # the local cluster's processes inherit this environment: workers start on that allocator
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", steady_arrow_pool())
        # Ray >= 2.52 turns token authentication on for the local cluster it starts and warns about it on every run;
        # batchrun keeps it on and drops only that notice (RAY_AUTH_MODE still decides).
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_AuthNoticeFilter())
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING,
             include_dashboard=False if address is None else None)


def end_local_cluster() -> bool:
    """The command's end, on a local cluster this process started: SIGTERM to each of its processes (the raylet
    takes its workers down), without ray.shutdown's wait of up to a second for each, one after the other
    (bench/exit.py). Returns whether it did; the caller then exits at once."""
    import ray

    if not (_STARTED_LOCAL[0] and ray.is_initialized()):
        return False
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    processes = [info.process for infos in getattr(node, "all_processes", {}).values() for info in infos]
    if not processes:
        return False  # another Ray release: ray.shutdown() at exit, as before
    import psutil

    # The raylet's agents (dashboard, runtime env) and idle workers hold no state: killed outright (a dashboard agent
    # that got SIGTERM while starting was seen to outlive everything); Ray's own processes get SIGTERM.
    children = []
    for process in processes:
        try:
            children += psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for process in children:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        process.terminate()
    return True
