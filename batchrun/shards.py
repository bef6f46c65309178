"""The unit of work: a shard is a contiguous row range of the input, made of fragments of its units (files or
datasets). Plans cut them (plan.py); sources read them (sources/); the queue leases them (shard_queue.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fragment:
    unit: int  # index into Plan.units
    start: int  # first row within the unit
    stop: int  # one past the last row within the unit


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: int
    row_start: int  # global index of its first row: generated ids are row_start + offset
    num_rows: int
    fragments: tuple[Fragment, ...]
