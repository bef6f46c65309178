"""What a job did, for `batchrun run` (the summary it writes at the end, `_summary.json`) and `batchrun status`
(read from the output dir, during or after a run). Both take their rows, tokens, prefix reuse and metrics from
`outputs`, over the committed manifest entries, so the two can never disagree about what is in the output."""

from __future__ import annotations

import time

from batchrun.cost import account
from batchrun.loglikelihood import perplexity_metrics
from batchrun.records import ManifestEntry, Snapshot, WorkerStats, committed_only


def score_metrics(entries) -> dict:
    """The job's score over every committed shard (this run's and earlier runs'): error rows count as wrong. Scoring
    jobs add lm-eval's metrics: acc, acc_norm and acc_bytes (loglikelihood), perplexities (loglikelihood_rolling)."""
    scored = [e.score for e in entries if e.score]
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


def outputs(entries) -> dict:
    """What the output holds, over committed entries (every run's): rows, tokens, prefix reuse, metrics."""
    done = committed_only(entries)
    prompt = sum(e.prompt_tokens for e in done)
    cached = sum(e.cached_prompt_tokens for e in done)
    return {"rows": sum(e.rows for e in done), "error_rows": sum(e.error_rows for e in done),
            "prompt_tokens": prompt, "generated_tokens": sum(e.generated_tokens for e in done),
            "prompt_tokens_cached": cached, "prompt_tokens_computed": prompt - cached,
            "cached_share": round(cached / prompt, 4) if prompt else 0.0, "metrics": score_metrics(done)}


def this_run(entries: list[ManifestEntry], run_id: str, wall: float) -> tuple[dict, dict]:
    """The rows and tokens this run made (a replaced part counts its redone rows only), and per worker."""
    mine = [e for e in entries if e.run_id == run_id]
    gen = sum(e.retried["generated_tokens"] if e.retried else e.generated_tokens for e in mine)
    rows = sum(e.retried["rows"] if e.retried else e.rows for e in mine)
    per_worker: dict[str, dict] = {}
    for e in mine:
        w = per_worker.setdefault(e.worker, {"node": e.node, "shards": [], "rows": 0, "generated_tokens": 0})
        w["shards"].append(e.shard_id)
        w["rows"] += e.rows
        w["generated_tokens"] += e.generated_tokens
    run = {"rows": rows, "generated_tokens": gen, "wall_s": round(wall, 3),
           "rows_per_s": round(rows / wall, 2) if wall else 0.0,
           "generated_tokens_per_s": round(gen / wall, 2) if wall else 0.0}
    return run, per_worker


def faults(snap: Snapshot, report: dict, pool, driver_retries: int, mine: list[ManifestEntry]) -> dict:
    """Everything that went wrong and how it was absorbed: failures, restarts, engine deaths, drains, retries."""
    seen = {**snap.workers, **pool.results}
    revised = [e.retried for e in mine if e.retried]
    return {
        # `--retry-errors`: error rows generated again in this run (their parts replaced), and those still failing
        "retried_error_rows": {"shards": len(revised), "rows": sum(r["rows"] for r in revised),
                               "still_failing": sum(r["still_failing"] for r in revised)},
        "shards_quarantined": report["quarantined"],
        "shard_failures": snap.shard_failures,
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
    committed = committed_only(entries.values())
    total_rows = sum(job.get("components", {}).get("input_files", {}).get("rows", []))
    done = outputs(committed)
    rows = done["rows"]
    times = [e.committed_at for e in committed]
    rate = rows / (max(times) - min(e.started_at for e in committed)) if len(times) > 1 else 0.0
    status = {
        "output_dir": str(out.root),
        "running": lock is not None,
        "lock": lock,
        "shards_committed": len(committed),
        "shards_quarantined": {e.shard_id: e.error for e in entries.values() if e.state == "quarantined"},
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
