from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import pyarrow as pa

from batchrun.shards import Fragment


class Source(ABC):
    #: shards must not span units (a unit is a stream that is read from its start)
    per_unit: bool = False

    @abstractmethod
    def describe(self) -> tuple[list[str], list[int], list[str]]:
        """(units in a fixed order, rows per unit, column names). Raises SpecError on unreadable input."""

    @abstractmethod
    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        """The fragment's rows, only the named columns, in input order."""

    def read(self, units: tuple[str, ...], fragments: tuple[Fragment, ...], columns: list[str]) -> pa.Table:
        """The fragments' rows, only `columns`. A read of no column (a constant template and no id column) still
        counts its rows: it reads the first column and keeps none."""
        wanted = columns or self._first_column()
        tables = [self.read_fragment(units[f.unit], f, wanted) for f in fragments]
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        return table if columns else table.select([])

    def _first_column(self) -> list[str]:
        if getattr(self, "_row_counter", None) is None:
            self._row_counter = self.describe()[2][:1]
        return self._row_counter


class RowCursor:
    """A stream of Arrow batches (RecordBatch or Table) read forward from row `pos` of its unit. `take` returns a row
    range at or after the cursor; rows past the range stay buffered for the next call. Sources keep one per unit so
    that consecutive shards continue the stream instead of reading it from the start again (quadratic over a unit's
    shards)."""

    def __init__(self, batches: Iterator, pos: int, schema: pa.Schema, unit: str):
        self.batches, self.pos, self.schema, self.unit = batches, pos, schema, unit
        self.pending = None  # a batch's rows from self.pos on, read but not yet returned

    def take(self, start: int, stop: int) -> pa.Table:
        if start < self.pos:
            raise ValueError(f"cursor at row {self.pos} cannot go back to {start}")
        out = []
        while self.pos < stop:
            batch, self.pending = self.pending, None
            if batch is None:
                batch = next(self.batches, None)
                if batch is None:
                    raise RuntimeError(f"input {self.unit} ended at row {self.pos}, before row {stop}: "
                                       "did the input change?")
            end = self.pos + batch.num_rows
            if end > start:
                lo, hi = max(start - self.pos, 0), min(stop, end) - self.pos
                out.append(batch.slice(lo, hi - lo))
                if end > stop:
                    self.pending, self.pos = batch.slice(hi), stop
                    break
            self.pos = end
        tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in out]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


class CursorCache:
    """The most recently used cursors of a source (anything with a `pos`: the unit's row it stands at), by key."""

    def __init__(self, size: int = 8):
        self.size, self.cursors = size, {}

    def get(self, key, start: int):
        """The cursor for `key` if it can reach `start` (it stands at or before it); removed from the cache."""
        cursor = self.cursors.pop(key, None)
        return cursor if cursor is not None and cursor.pos <= start else None

    def put(self, key, cursor) -> None:
        self.cursors[key] = cursor
        if len(self.cursors) > self.size:
            self.cursors.pop(next(iter(self.cursors)))
