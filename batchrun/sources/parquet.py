"""Parquet input: row counts from footers, shard reads by row group, sliced to the exact row range."""

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
            pf = pq.ParquetFile(self.fs.open(name, "rb"))
        except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
            raise SpecError(f"input file {name}: not a readable Parquet file ({e})") from None
        self._open[name] = pf
        if len(self._open) > 8:
            self._open.pop(next(iter(self._open)))
        return pf

    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        pf = self._file(unit)
        starts = [0]
        for i in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
        first = bisect.bisect_right(starts, fragment.start) - 1
        last = bisect.bisect_left(starts, fragment.stop)  # exclusive row-group index
        table = pf.read_row_groups(list(range(first, last)), columns=columns)
        return table.slice(fragment.start - starts[first], fragment.stop - fragment.start)
