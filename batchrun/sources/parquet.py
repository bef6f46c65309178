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
from batchrun.shards import Fragment
from batchrun.sources.base import CursorCache, RowCursor, Source
from batchrun.sources.files import list_files


class ParquetSource(Source):
    def __init__(self, path: str):
        self.path = path
        self.fs = None
        self._open: dict[str, pq.ParquetFile] = {}  # footers of recently read files, in use order
        self._cursors = CursorCache()  # (file, columns) -> where the last read of it stopped

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
        starts = [0]  # first row of each row group, and the file's row count last
        for i in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
        key = (unit, tuple(columns))
        cursor = self._cursors.get(key, fragment.start)
        group_end = starts[min(bisect.bisect_right(starts, cursor.pos), len(starts) - 1)] if cursor else 0
        if cursor is not None and fragment.start >= group_end:
            cursor = None  # whole row groups lie between: a new cursor skips them without decoding them
        if cursor is None:
            first = bisect.bisect_right(starts, fragment.start) - 1
            batches = pf.iter_batches(batch_size=max(1024, fragment.stop - fragment.start),
                                      row_groups=range(first, len(starts) - 1), columns=columns)
            cursor = RowCursor(batches, starts[first], pa.schema([pf.schema_arrow.field(c) for c in columns]), unit)
        table = cursor.take(fragment.start, fragment.stop)
        self._cursors.put(key, cursor)
        return table
