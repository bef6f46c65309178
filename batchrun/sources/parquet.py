"""Parquet input: row counts from footers; shards read through a streaming cursor per file.

Parquet can only be decoded a row group at a time, and row groups are often far larger than a shard (pyarrow writes
up to 1Mi rows per group by default). Reading each shard's row groups anew would decode a whole group for every
1,000-row shard in it: quadratic in the group's size, and the group held decoded in memory each time. Instead each
file keeps a cursor, a batch iterator positioned after the last row read: the next shard of the same file continues
from there, skipping whole row groups without decoding them, and only a batch of rows stays buffered."""

from __future__ import annotations

import bisect

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import SpecError
from batchrun.plan import Fragment
from batchrun.sources.base import Source
from batchrun.sources.files import list_files


class ParquetSource(Source):
    def __init__(self, path: str):
        self.path = path
        self.fs = None
        self._open: dict[str, pq.ParquetFile] = {}  # footers of recently read files, in use order
        self._cursors: dict[tuple, _Cursor] = {}  # (file, columns) -> where the last read of it stopped

    def describe(self):
        self.fs, files = list_files(self.path, (".parquet", ".parq", ".pq"))
        rows, columns = [], None
        for f in files:
            meta = self._file(f).metadata
            rows.append(meta.num_rows)
            names = self._file(f).schema_arrow.names
            columns = names if columns is None else [c for c in columns if c in names]
        return files, rows, columns or []

    def _file(self, name: str) -> pq.ParquetFile:
        """A worker reads consecutive shards of the same few files: keep the last 8 footers open."""
        if name in self._open:
            self._open[name] = self._open.pop(name)
            return self._open[name]
        if self.fs is None:  # a worker reads by file name: it needs the filesystem, not the listing
            self.fs, _ = fsspec.core.url_to_fs(self.path)
        try:
            # no pre-buffering, and column chunks read in 1 MiB steps: only the pages being decoded are in memory,
            # however large the row group (pyarrow's default reads whole column chunks)
            pf = pq.ParquetFile(self.fs.open(name, "rb"), pre_buffer=False, buffer_size=1 << 20)
        except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
            raise SpecError(f"input file {name}: not a readable Parquet file ({e})") from None
        self._open[name] = pf
        if len(self._open) > 8:
            self._open.pop(next(iter(self._open)))
        return pf

    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        pf = self._file(unit)
        key = (unit, tuple(columns))
        cursor = self._cursors.pop(key, None)
        if cursor is None or not cursor.can_reach(fragment.start):
            cursor = _Cursor(pf, fragment.start, columns, batch_rows=max(1024, fragment.stop - fragment.start))
        self._cursors[key] = cursor  # most recently used last
        if len(self._cursors) > 8:
            self._cursors.pop(next(iter(self._cursors)))
        return cursor.take(fragment.start, fragment.stop)


class _Cursor:
    """One file read forward in batches from a row on. `take` returns a row range at or after the cursor, decoding
    only the row groups that hold it (and the rows of its first group before it); rows past the range stay buffered
    for the next call."""

    def __init__(self, pf: pq.ParquetFile, start: int, columns: list[str], batch_rows: int):
        meta = pf.metadata
        self.starts = [0]
        for i in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(i).num_rows)
        first = max(0, bisect.bisect_right(self.starts, start) - 1)
        self.schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
        self.batches = pf.iter_batches(batch_size=batch_rows, row_groups=range(first, meta.num_row_groups),
                                       columns=columns)
        self.pos = self.starts[first]  # file row of self.pending's first row (or of the next batch)
        self.pending: pa.RecordBatch | None = None

    def can_reach(self, start: int) -> bool:
        """Worth continuing: the range is ahead, and no whole row group lies between (a new cursor skips those)."""
        group_end = self.starts[min(bisect.bisect_right(self.starts, self.pos), len(self.starts) - 1)]
        return self.pos <= start < group_end

    def take(self, start: int, stop: int) -> pa.Table:
        out = []
        while self.pos < stop:
            batch, self.pending = self.pending, None
            if batch is None:
                batch = next(self.batches, None)
                if batch is None:
                    raise RuntimeError(f"the file ended at row {self.pos}, before row {stop}: did the input change?")
            end = self.pos + batch.num_rows
            if end > start:
                lo, hi = max(start - self.pos, 0), min(stop, end) - self.pos
                out.append(batch.slice(lo, hi - lo))
                if end > stop:  # the rest of the batch belongs to the next range
                    self.pending = batch.slice(hi)
                    self.pos = stop
                    break
            self.pos = end
        return pa.Table.from_batches(out, schema=self.schema)
