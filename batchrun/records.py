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


def committed_totals(entries) -> dict:
    """Rows and tokens over committed manifest entries: the numbers the summary and `batchrun status` report."""
    done = committed_only(entries)
    return {"rows": sum(e.rows for e in done), "error_rows": sum(e.error_rows for e in done),
            "prompt_tokens": sum(e.prompt_tokens for e in done),
            "cached_prompt_tokens": sum(e.cached_prompt_tokens for e in done),
            "generated_tokens": sum(e.generated_tokens for e in done)}
