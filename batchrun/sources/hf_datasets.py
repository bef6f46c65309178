"""Hugging Face datasets input: a `save_to_disk` dir, a local builder (parquet/json/csv) or a hub dataset.

Map-style datasets are memory-mapped Arrow, so slicing a shard reads only its rows. With `input.streaming`, the
dataset is an IterableDataset: its own shards (one per data file, `n_shards`) are the plan's units, counted once at
plan time, and a batchrun shard never spans two of them. Each unit's stream stays open in the worker (a RowCursor):
the worker's next shard of that unit continues it, and only a shard that lies behind the stream (another worker
read the ones between) restarts it from the unit's start.
"""

from __future__ import annotations

import os

import pyarrow as pa

from batchrun.errors import SpecError
from batchrun.shards import Fragment
from batchrun.sources.base import CursorCache, RowCursor, Source

COUNT_BATCH = 8192


class HFSource(Source):
    def __init__(self, path: str, data_files, split: str, config: str | None = None, streaming: bool = False):
        self.path, self.data_files, self.split, self.config = path, data_files, split, config
        self.streaming = self.per_unit = streaming
        self._ds = None
        self._cursors = CursorCache()  # (unit, columns) -> the open stream, where the last shard stopped

    @property
    def dataset(self):
        if self._ds is None:
            self._ds = self._load()
        return self._ds

    def _load(self):
        import datasets

        saved = any(os.path.exists(os.path.join(self.path, f)) for f in ("dataset_info.json", "dataset_dict.json"))
        try:
            if os.path.isdir(self.path) and saved:  # a save_to_disk dir
                ds = datasets.load_from_disk(self.path)
                if self.streaming:
                    ds = ds.to_iterable_dataset(num_shards=max(1, len(ds.cache_files))) \
                        if isinstance(ds, datasets.Dataset) else datasets.IterableDatasetDict(
                            {k: v.to_iterable_dataset(num_shards=max(1, len(v.cache_files))) for k, v in ds.items()})
            else:  # a local builder (parquet/json/csv + data_files) or a hub name where the hub is reachable
                ds = datasets.load_dataset(self.path, self.config, data_files=self.data_files, split=self.split,
                                           streaming=self.streaming)
        except Exception as e:
            raise SpecError(f"key 'input.path': cannot load HF dataset {self.path!r}: {e}") from None
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if self.split not in ds:
                raise SpecError(f"key 'input.split': {self.split!r} not in dataset splits {list(ds)}")
            ds = ds[self.split]
        return ds

    def describe(self):
        ds = self.dataset
        if not self.streaming:
            return [self.path], [len(ds)], list(ds.column_names)
        columns = list(ds.column_names or next(iter(ds.take(1)), {}).keys())
        if not columns:
            raise SpecError(f"key 'input.path': the streamed dataset {self.path!r} has no columns or no rows")
        units = [f"{self.path}#shard{i:05d}" for i in range(ds.num_shards)]
        rows = [self._count(i, columns[0]) for i in range(ds.num_shards)]
        return units, rows, columns

    def _stream(self, index: int, columns: list[str]):
        ds = self.dataset
        return ds.shard(num_shards=ds.num_shards, index=index, contiguous=True).select_columns(columns) \
            .with_format("arrow")

    def _count(self, index: int, column: str) -> int:
        return sum(batch.num_rows for batch in self._stream(index, [column]).iter(batch_size=COUNT_BATCH))

    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        if not self.streaming:
            table = self.dataset.with_format("arrow")[fragment.start : fragment.stop]
            return table.select(columns)
        key = (unit, tuple(columns))
        cursor = self._cursors.get(key, fragment.start)
        if cursor is None:
            stream = self._stream(int(unit.rpartition("#shard")[2]), columns)
            cursor = RowCursor(iter(stream.iter(batch_size=COUNT_BATCH)), 0,
                               pa.schema([pa.field(c, pa.null()) for c in columns]), unit)
        table = cursor.take(fragment.start, fragment.stop)
        self._cursors.put(key, cursor)
        return table
