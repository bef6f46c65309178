"""Typed records that cross a process boundary (worker -> queue -> driver): what each field means is written once,
here, instead of being read with `.get` wherever a dict arrives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ManifestEntry:
    """A shard's commit record: written into its part's footer by the worker (the commit itself), collected into
    manifest segments by the queue, merged by the driver."""

    shard_id: int
    state: str  # committed | quarantined
    rows: int = 0  # output rows (input rows x samples)
    ids_digest: str = ""  # sha256 of the shard's ids, checked against the input's at commit
    attempt: int = 0  # which hand-out of the shard produced it (1 = first)
    worker: str = ""
    node: str = ""
    run_id: str = ""
    started_at: float = 0.0  # lease time, for the timeline
    committed_at: float = 0.0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    error_rows: int = 0
    error: str | None = None  # quarantined: the last error
    score: dict | None = None  # evals: {"sum", "rows", "scored"} of this shard's score column
    cached_prompt_tokens: int = 0  # prompt tokens the engine served from reused prefix blocks
    revision: int = 0  # `run --retry-errors` replaced the part this many times (the newest revision wins)
    retried: dict | None = None  # that replacement: {"rows", "still_failing", "generated_tokens"} of its redone rows


def committed_only(entries) -> list[ManifestEntry]:
    """The entries of committed shards (not quarantined ones): the one definition of "done" for every reader."""
    return [e for e in entries if e.state == "committed"]


@dataclass(slots=True)
class WorkerStats:
    """A worker's counters and facts: sent with each heartbeat (or carried by a commit), kept by the queue for the
    driver's progress snapshots, and returned by Worker.run when the worker ends. Times are epoch seconds."""

    created_at: float = 0.0  # the actor's process started
    niceness: int | None = None
    arrow_pool: str | None = None
    # the engine: its load, and what it can hold
    engine_start_s: float | None = None
    engine_ready_at: float | None = None
    engine_reused: bool = False  # a suite's task ran on the engine an earlier task had loaded
    engine_startup: dict | None = None  # the engine's own start-up phases (seconds)
    kv_cache_tokens: int | None = None
    rss_after_load_mb: dict | None = None  # anonymous vs file-backed (a mapped checkpoint)
    rss_during_load_max_mb: dict | None = None
    max_in_flight: int | None = None  # the window the worker keeps submitted, and why
    max_in_flight_why: str | None = None
    # the work
    rows: int = 0
    shards: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    duplicate_rows: int = 0  # rows whose completion was a copy of an identical request's
    in_flight: int = 0
    since_progress_s: float = 0.0  # no completion for this long while requests are in flight
    first_submit_at: float = 0.0  # first request .. last completion: the engine's busy window
    first_completion_at: float = 0.0
    last_completion_at: float = 0.0
    prefix_schedule: str | None = None
    prefix_leaders: int = 0
    prefix_held: int = 0
    prefix_reuse: bool = False  # the engine reuses the KV blocks of shared prefixes
    peak_rss_mb: float | None = None
    store_retries: int = 0
    # a stop signal: why, when, and the shards handed back unfinished
    drain: str | None = None
    drain_started_at: float | None = None
    drained_shards_handed_back: list | None = None
    # set by the queue
    worker: str = ""
    node: str = ""
    pid: int = 0
    heartbeat_at: float = 0.0  # the worker's last heartbeat, on the queue's clock
    heartbeat_age_s: float = 0.0  # set by the driver from the snapshot's time (Snapshot.merge_workers)
    dead: bool = False  # released by the driver (its process or engine died, or it stalled)

    @property
    def engine_window_s(self) -> float | None:
        return round(self.last_completion_at - self.first_submit_at, 3) if self.first_submit_at else None


@dataclass(slots=True)
class Snapshot:
    """The queue's snapshot, once per driver tick: what the progress bar, the stall check and the summary read."""

    finished: bool
    shards_total: int
    shards_done: int
    shards_skipped: int
    rows_skipped: int
    shards_running: int
    shards_pending: int
    shards_quarantined: int
    shard_failures: int
    engine_deaths_charged: int
    shards_handed_back: int
    segment_write_failures: int
    store_retries: int  # the queue's own (segment uploads, compaction, footer reads)
    rows_total: int
    rows_done: int
    duplicates: int  # commits refused because the shard was committed already (a stale attempt's copy)
    workers: dict[str, WorkerStats]  # from the queue: the workers changed since the driver's last snapshot
    queue_restarted: bool = False  # Ray restarted the queue actor during the run (its counters start again)
    stats_version: tuple[str, int] = ("", 0)  # (the queue actor's id, its change counter): the next call's `known`
    at: float = 0.0  # the queue's clock when taken
    heartbeat_calls: int = 0  # calls that carried heartbeats: one a node per interval, a worker's own otherwise
    worker_beats: int = 0  # the workers' heartbeats those carried (commits' included)
    commit_leases: int = 0  # leases a commit took for its worker's next shard (one call instead of two)

    def merge_workers(self, seen: dict[str, WorkerStats], known: tuple[str, int] | None) -> dict[str, WorkerStats]:
        """The driver's side of progress(): `seen` (every worker's latest) updated with this snapshot's changes
        (all afresh when the queue actor is a new one), each worker's heartbeat age set, and `workers` made the
        full view. Returns it."""
        if known is None or known[0] != self.stats_version[0]:
            seen = {}
        seen.update(self.workers)
        for w in seen.values():
            w.heartbeat_age_s = max(0.0, self.at - w.heartbeat_at)
        self.workers = seen
        return seen
