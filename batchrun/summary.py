"""What a job did, for `batchrun run` (the summary it writes at the end, `_summary.json`) and `batchrun status`
(read from the output dir, during or after a run). Both take their rows, tokens, prefix reuse and metrics from
`outputs`, over the committed manifest entries, so the two can never disagree about what is in the output."""

from __future__ import annotations

import time

import pyarrow.compute as pc

from batchrun.cost import account
from batchrun.loglikelihood import perplexity_metrics
from batchrun.records import Snapshot, WorkerStats
from batchrun.store.manifest import Entries


def score_metrics(scored: list[dict]) -> dict:
    """The job's score over every committed shard (this run's and earlier runs'; each shard's sums, from its entry):
    error rows count as wrong. Scoring jobs add lm-eval's metrics: acc, acc_norm and acc_bytes (loglikelihood),
    perplexities (loglikelihood_rolling)."""
    scored = [s for s in scored if s]
    if not scored:
        return {}
    total, rows = sum(s["sum"] for s in scored), sum(s["rows"] for s in scored)
    out = {"score_mean": round(total / rows, 6) if rows else 0.0, "score_sum": total, "rows": rows,
           "rows_scored": sum(s["scored"] for s in scored)}
    if "norm_sum" in scored[0] and rows:
        out.update(acc=round(total / rows, 6), acc_norm=round(sum(s["norm_sum"] for s in scored) / rows, 6),
                   acc_bytes=round(sum(s["bytes_sum"] for s in scored) / rows, 6))
    if "ll_sum" in scored[0]:
        ll = sum(s["ll_sum"] for s in scored)
        out.update(loglikelihood=ll, **{k: round(v, 6) if v is not None else None for k, v in perplexity_metrics(
            ll, sum(s["words"] for s in scored), sum(s["bytes"] for s in scored)).items()})
    return out


def outputs(entries: Entries) -> dict:
    """What the output holds, over committed entries (every run's): rows, tokens, prefix reuse, metrics."""
    done = entries.committed()
    prompt, cached = done.sum("prompt_tokens"), done.sum("cached_prompt_tokens")
    return {"rows": done.sum("rows"), "error_rows": done.sum("error_rows"), "prompt_tokens": prompt,
            "generated_tokens": done.sum("generated_tokens"), "prompt_tokens_cached": cached,
            "prompt_tokens_computed": prompt - cached, "cached_share": round(cached / prompt, 4) if prompt else 0.0,
            "metrics": score_metrics(done.json("score"))}


def this_run(entries: Entries, run_id: str, wall: float) -> tuple[dict, dict, list[dict]]:
    """The rows and tokens this run made (a replaced part counts its redone rows only), per worker, and its
    replacements of parts (`--retry-errors`: each entry's `retried`)."""
    mine = entries.columns("run_id", "worker", "node", "rows", "generated_tokens", "retried").of_run(run_id)
    fresh, revised = mine.where(pc.is_null(mine.table["retried"])), mine.json("retried")
    gen = fresh.sum("generated_tokens") + sum(r["generated_tokens"] for r in revised)
    rows = fresh.sum("rows") + sum(r["rows"] for r in revised)
    per_worker = {}
    grouped = mine.table.group_by("worker").aggregate([("node", "min"), ("shard_id", "list"), ("rows", "sum"),
                                                       ("generated_tokens", "sum")])
    for g in grouped.to_pylist():
        per_worker[g["worker"]] = {"node": g["node_min"], "shards": sorted(g["shard_id_list"]),
                                   "rows": g["rows_sum"], "generated_tokens": g["generated_tokens_sum"]}
    run = {"rows": rows, "generated_tokens": gen, "wall_s": round(wall, 3),
           "rows_per_s": round(rows / wall, 2) if wall else 0.0,
           "generated_tokens_per_s": round(gen / wall, 2) if wall else 0.0}
    return run, per_worker, revised


def faults(snap: Snapshot, report: dict, pool, driver_retries: int, revised: list[dict]) -> dict:
    """Everything that went wrong and how it was absorbed: failures, restarts, engine deaths, drains, retries.
    revised: this run's replacements of parts (`--retry-errors`), as their entries' `retried` say."""
    seen = {**snap.workers, **pool.results}
    return {
        # `--retry-errors`: error rows generated again in this run (their parts replaced), and those still failing
        "retried_error_rows": {"shards": len(revised), "rows": sum(r["rows"] for r in revised),
                               "still_failing": sum(r["still_failing"] for r in revised)},
        "shards_quarantined": report["quarantined"],
        "shard_failures": snap.shard_failures,
        # Ray restarted the queue actor (its process or node died): it rebuilt from the manifest and the footers;
        # the queue's counters here (failures, refused commits, hand-backs) are the restarted one's
        "queue_restarted": snap.queue_restarted,
        # commits the queue refused because the shard was already committed (a stale worker's late copy)
        "duplicate_commits_refused": snap.duplicates,
        "worker_restarts": pool.restarts,
        # replacements allowed per hour (faults.max_worker_restarts or restarts_per_worker_hour x workers)
        "restart_budget": pool.restart_budget(),
        # workers whose engine died (EngineDead, a stall): their shards went back, charged to the engine
        "engine_deaths": pool.engine_deaths,
        "engine_deaths_charged_to_shards": snap.engine_deaths_charged,
        "workers_drained": pool.drained,  # workers that drained on a stop signal (preemption) and were replaced
        "drains": {w: {"why": pool.results[w].drain, "at": pool.results[w].drain_started_at,
                       "handed_back": pool.results[w].drained_shards_handed_back or []} for w in pool.drained},
        "shards_handed_back": snap.shards_handed_back,
        # store operations retried after a transient error (503 SlowDown, timeouts, resets), by process
        "store_retries": {"driver": driver_retries, "queue": snap.store_retries,
                          "workers": sum(i.store_retries for i in seen.values()),
                          "segment_write_failures": snap.segment_write_failures},
    }


def workers(results: dict[str, WorkerStats], seen: dict[str, WorkerStats]) -> dict:
    """Per-worker facts: memory, niceness, the window it kept and why, its engine's capacity and busy window."""
    return {
        "worker_peak_rss_mb": {w: i.peak_rss_mb for w, i in seen.items()},
        # resident memory right after the engine loaded: anonymous vs file-backed (a mapped checkpoint)
        "worker_rss_after_load_mb": {w: i.rss_after_load_mb for w, i in results.items()},
        "worker_rss_during_load_max_mb": {w: i.rss_during_load_max_mb for w, i in results.items()},
        "worker_niceness": {w: i.niceness for w, i in results.items()},
        "worker_arrow_pool": {w: i.arrow_pool for w, i in results.items()},
        # requests each worker kept submitted, and why (engine.max_in_flight, or auto from its KV cache)
        "worker_max_in_flight": {w: {"window": i.max_in_flight, "why": i.max_in_flight_why}
                                 for w, i in results.items()},
        # the batch a worker's engine can hold (HF engine): a small one caps throughput whatever max_in_flight is
        "worker_kv_cache_tokens": {w: i.kv_cache_tokens for w, i in results.items()},
        # first request submitted .. last completion, per worker: the engine's share of the wall time
        "worker_engine_window_s": {w: i.engine_window_s for w, i in results.items() if i.engine_window_s},
    }


def prefix_reuse(out: dict, results: dict[str, WorkerStats]) -> dict:
    return {**{k: out[k] for k in ("prompt_tokens_cached", "prompt_tokens_computed", "cached_share")},
            "schedule": {w: i.prefix_schedule for w, i in results.items()},
            "engine_reuses": {w: i.prefix_reuse for w, i in results.items()},
            "leaders": sum(i.prefix_leaders for i in results.values()),
            "held": sum(i.prefix_held for i in results.values())}


def startup(timings: dict, invoked_at: float, results: dict[str, WorkerStats]) -> dict:
    """Where the time from `batchrun run` to the first completion went: the driver's plan and Ray start, then
    per worker its actor start (placement, process), engine start (and its phases) and the wait for its first
    completion. Seconds; `first_completion_s` is from the command's start."""
    per_worker = {}
    for wid, r in results.items():
        if not r.created_at:
            continue
        per_worker[wid] = {"actor_start_s": round(r.created_at - invoked_at, 3),
                           "engine_start_s": r.engine_start_s, **(r.engine_startup or {})}
        if r.first_completion_at:
            per_worker[wid]["first_completion_s"] = round(r.first_completion_at - invoked_at, 3)
    firsts = [w["first_completion_s"] for w in per_worker.values() if "first_completion_s" in w]
    return {**timings, "first_completion_s": min(firsts) if firsts else None, "workers": per_worker}


def job_status(out, plot: bool = False) -> dict:
    """A job's progress from its output dir, during or after a run."""
    entries = out.manifest.entries()
    runs = out.runs.all()
    job, lock = out.runs.job(), out.lock.holder()
    committed = entries.committed()
    total_rows = sum(job.get("components", {}).get("input_files", {}).get("rows", []))
    done = outputs(committed)
    rows = done["rows"]
    span = (pc.max(committed.table["committed_at"]).as_py() - pc.min(committed.table["started_at"]).as_py()
            if len(committed) > 1 else 0.0)
    rate = rows / span if span else 0.0
    quarantined = entries.where(pc.equal(entries.table["state"], "quarantined"))
    status = {
        "output_dir": str(out.root),
        "running": lock is not None,
        "lock": lock,
        "shards_committed": len(committed),
        "shards_quarantined": dict(zip(quarantined.table["shard_id"].to_pylist(),
                                       quarantined.table["error"].to_pylist())),
        "rows_committed": rows,
        "rows_total": total_rows,
        "rows_per_s": round(rate, 2),  # processing rate: first shard leased -> last commit (no start-up)
        "rows_per_s_basis": "first lease to last commit, all runs",
        "eta_s": round((total_rows - rows) / rate, 1) if rate and lock else None,
        **{k: done[k] for k in ("generated_tokens", "error_rows", "prompt_tokens", "prompt_tokens_cached",
                                "prompt_tokens_computed", "metrics")},
        # GPU time and cost over every run so far (a running one up to its last record), at the last run's price
        "cost": account(runs, runs[-1].get("gpu_hour_cost")) if runs else None,
        "checked_at": time.time(),
    }
    if plot:
        from batchrun.plot import plot_timeline

        status["plot"] = str(plot_timeline(out))
    return status
