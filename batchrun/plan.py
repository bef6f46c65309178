"""The shard plan: contiguous row ranges over the input's units (files or datasets), in a fixed order.

The same input and spec always give the same plan, because units are sorted by name and shards are cut at fixed
row counts. A re-run therefore finds its committed shards by id, and a shard's rows never change between attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchrun.shards import ShardTable
from batchrun.sources import open_source
from batchrun.spec import JobSpec


@dataclass(frozen=True, slots=True)
class Plan:
    units: tuple[str, ...]  # files (parquet, jsonl) or one dataset; read by the source
    unit_rows: tuple[int, ...]
    shards: ShardTable  # made when asked for, one at a time
    columns: tuple[str, ...]  # the input's columns, for checks and messages
    reader: str | None = None  # the units are Parquet files at this URL, not the input's format (group.py's copy)

    @property
    def total_rows(self) -> int:
        return sum(self.unit_rows)

    def summary(self) -> dict:
        return {
            "units": len(self.units),
            "rows": self.total_rows,
            "shards": len(self.shards),
            "columns": list(self.columns),
        }


def cut_shards(unit_rows: tuple[int, ...], rows_per_shard: int, per_unit: bool = False) -> ShardTable:
    """Cut the concatenated units into shards of rows_per_shard rows (the last may be short), as ranges.

    per_unit: a shard never spans two units (streamed datasets: each shard reads from one file's stream)."""
    return ShardTable(tuple(unit_rows), rows_per_shard, per_unit)


def make_plan(spec: JobSpec) -> Plan:
    source = open_source(spec.input)
    units, unit_rows, columns = source.describe()
    shards = cut_shards(tuple(unit_rows), spec.rows_per_shard, per_unit=source.per_unit)
    return Plan(tuple(units), tuple(unit_rows), shards, tuple(columns))
