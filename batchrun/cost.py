"""What a job cost: GPU-seconds, generated tokens per GPU-second, the share of GPU time spent starting up, and with
`resources.gpu_hour_cost` the price, per run and over every run of the job (a resumed job adds its runs up).

Each run leaves one record in the output dir (`_batchrun/runs/<run_id>.json`), rewritten while it runs, so a run
that was killed still counts up to its last record. Two bases:
- engine: per worker, its GPUs x its engine window (first request submitted to last completion): the work itself;
- held: the job's workers x GPUs per worker x the run's wall time (command start to end): what a cluster bills.
Start-up: per worker, its GPUs x the time to its first request: from the command's start for the job's first
workers (plan, cluster start, placement, process, engine load, warm-up), from its spawn for a replacement; a worker
that never got that far counts whole. A job without GPUs counts one unit per worker.
"""

from __future__ import annotations

UNIT_GPU, UNIT_WORKER = "GPU", "worker (the job uses no GPU)"


def run_record(run_id: str, gpus_per_worker: float, workers: int, started_at: float, now: float,
               lives: dict[str, dict], generated_tokens: int, finished: bool, gpu_hour_cost: float | None = None
               ) -> dict:
    """One run's GPU time. `lives`: per worker {spawned_at, ended_at (or None: still running), first_submit_at,
    last_completion_at}."""
    units = gpus_per_worker or 1.0
    engine = startup = 0.0
    for w in lives.values():
        end = w.get("ended_at") or now
        first, last = w.get("first_submit_at") or 0.0, w.get("last_completion_at") or 0.0
        if first and last > first:
            engine += units * (last - first)
        since = started_at if w.get("initial") else w["spawned_at"]
        startup += units * max(0.0, (first or end) - since)
    wall = max(0.0, now - started_at)
    return {"run_id": run_id, "started_at": started_at, "finished": finished,
            "unit": UNIT_GPU if gpus_per_worker else UNIT_WORKER, "units_per_worker": units, "workers": workers,
            "wall_s": round(wall, 3),
            "gpu_seconds_engine": round(engine, 3), "gpu_seconds_held": round(units * workers * wall, 3),
            "gpu_seconds_startup": round(min(startup, units * workers * wall), 3),
            "generated_tokens": generated_tokens, "gpu_hour_cost": gpu_hour_cost}


def account(records: list[dict], gpu_hour_cost: float | None) -> dict:
    """Totals over runs, with rates and (given a price) the cost."""
    def rates(rs: list[dict]) -> dict:
        engine = sum(r["gpu_seconds_engine"] for r in rs)
        held = sum(r["gpu_seconds_held"] for r in rs)
        startup = sum(r["gpu_seconds_startup"] for r in rs)
        gen = sum(r["generated_tokens"] for r in rs)
        out = {"runs": len(rs), "gpu_seconds_engine": round(engine, 3), "gpu_seconds_held": round(held, 3),
               "generated_tokens": gen,
               "generated_tokens_per_gpu_second_engine": round(gen / engine, 2) if engine else None,
               "generated_tokens_per_gpu_second_held": round(gen / held, 2) if held else None,
               "startup_share": round(startup / held, 4) if held else None}
        if gpu_hour_cost is not None:
            cost = held / 3600 * gpu_hour_cost
            out["cost"] = round(cost, 6)
            out["cost_per_1m_generated_tokens"] = round(cost / gen * 1e6, 6) if gen else None
        return out

    units = {r["unit"] for r in records}
    return {"unit": units.pop() if len(units) == 1 else "mixed", "gpu_hour_cost": gpu_hour_cost,
            "this_run": rates(records[-1:]), "all_runs": rates(records)}


def cost_line(cost: dict) -> str:
    """The run's final line about cost."""
    a, unit = cost["all_runs"], cost["unit"]
    name = "GPU" if unit == UNIT_GPU else "worker"
    parts = [f"{a['gpu_seconds_held']:,.1f} {name}-s held ({a['gpu_seconds_engine']:,.1f} in engine windows)"]
    if a["generated_tokens_per_gpu_second_held"] is not None:
        parts.append(f"{a['generated_tokens_per_gpu_second_held']:,.1f} tok per {name}-s held")
    if a["startup_share"] is not None:
        parts.append(f"{a['startup_share']:.1%} starting up")
    if "cost" in a:
        per = a["cost_per_1m_generated_tokens"]
        parts.append(f"cost {a['cost']:,.4f} at {cost['gpu_hour_cost']:g}/{name}-hour"
                     + (f" = {per:,.4f} per 1M generated tokens" if per is not None else ""))
    runs = f" over {a['runs']} runs" if a["runs"] > 1 else ""
    return f"  cost{runs}: " + "; ".join(parts)
