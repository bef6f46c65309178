"""Job metrics through Ray's metrics API: on the Ray dashboard and each node's Prometheus endpoint.

Ray exports custom metrics to Prometheus with a `ray_` prefix, e.g. `ray_batchrun_rows_done`.
Every metric carries the job's run id, so two jobs on one cluster never mix.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _metrics():
    from ray.util.metrics import Counter, Gauge, Histogram

    worker_tags = ("run_id", "worker")
    return {
        "rows": Counter("batchrun_rows_done", "Output rows committed", tag_keys=worker_tags),
        "tokens": Counter("batchrun_generated_tokens", "Tokens generated", tag_keys=worker_tags),
        "in_flight": Gauge("batchrun_requests_in_flight", "Requests submitted to the engine", tag_keys=worker_tags),
        "shard_seconds": Histogram("batchrun_shard_seconds", "Lease to commit, per shard",
                                   boundaries=[1, 5, 15, 60, 300, 1200, 3600], tag_keys=worker_tags),
        "retries": Counter("batchrun_shard_retries", "Failed shard attempts handed out again", tag_keys=("run_id",)),
        "quarantined": Counter("batchrun_shards_quarantined", "Shards quarantined", tag_keys=("run_id",)),
        "restarts": Counter("batchrun_engine_restarts", "Workers (engines) lost and replaced", tag_keys=("run_id",)),
    }


def record(name: str, value: float, **tags) -> None:
    """Never let metrics break a job: outside Ray, or without a metrics agent, this is a no-op."""
    try:
        metric = _metrics()[name]
        if hasattr(metric, "inc"):
            if value:
                metric.inc(value, tags=tags)
        elif hasattr(metric, "observe"):
            metric.observe(value, tags=tags)
        else:
            metric.set(value, tags=tags)
    except Exception:
        pass
