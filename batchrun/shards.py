"""The unit of work: a shard is a contiguous row range of the input, made of fragments of its units (files or
datasets). Plans cut them (plan.py); sources read them (sources/); the queue leases them (shard_queue.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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


@dataclass(frozen=True)
class ShardTable(Sequence):
    """A plan's shards as ranges, made when asked for: the units' row counts and how they were cut. It holds O(units)
    numbers whatever the shard count and pickles in bytes (one object per shard took ~0.7 KB each in the queue and
    17 s to ship a 1M-shard plan to it). Shards are rows_per_shard rows of the concatenated units (the last may be
    short); per_unit: a shard never spans two units (streamed datasets), each unit's last shard may be short."""

    unit_rows: tuple[int, ...]
    rows_per_shard: int
    per_unit: bool = False
    _starts: np.ndarray = field(init=False, repr=False, compare=False)  # each unit's first global row, then the total
    _firsts: np.ndarray = field(init=False, repr=False, compare=False)  # per_unit: each unit's first shard id

    def __post_init__(self):
        rows = np.asarray(self.unit_rows, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "_starts", np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))
        counts = -(-rows // self.rows_per_shard)
        object.__setattr__(self, "_firsts", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    @property
    def total_rows(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        if self.per_unit:
            return int(self._firsts[-1])
        return -(-self.total_rows // self.rows_per_shard)

    def _range(self, i: int) -> tuple[int, int]:
        """The shard's global rows [start, stop)."""
        if self.per_unit:
            unit = int(np.searchsorted(self._firsts, i, side="right")) - 1
            start = int(self._starts[unit]) + (i - int(self._firsts[unit])) * self.rows_per_shard
            return start, min(start + self.rows_per_shard, int(self._starts[unit + 1]))
        start = i * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.total_rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"shard {i} of {len(self)}")
        first, stop = self._range(i)
        start, unit = first, int(np.searchsorted(self._starts, first, side="right")) - 1
        frags = []
        while start < stop:
            end = min(stop, int(self._starts[unit + 1]))
            if end > start:
                frags.append(Fragment(unit, start - int(self._starts[unit]), end - int(self._starts[unit])))
            start, unit = end, unit + 1
        return Shard(i, first, stop - first, tuple(frags))

    def num_rows(self, ids) -> np.ndarray:
        """The row counts of these shards (an array of ids), without making them."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.per_unit:
            units = np.searchsorted(self._firsts, ids, side="right") - 1
            starts = self._starts[units] + (ids - self._firsts[units]) * self.rows_per_shard
            return np.minimum(starts + self.rows_per_shard, self._starts[units + 1]) - starts
        starts = ids * self.rows_per_shard
        return np.minimum(starts + self.rows_per_shard, self.total_rows) - starts
