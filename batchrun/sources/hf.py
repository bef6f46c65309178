"""Hugging Face datasets input: a `save_to_disk` dir, or a local builder (parquet/json/csv) via load_dataset.

Datasets are memory-mapped Arrow, so slicing a shard reads only its rows.
"""

from __future__ import annotations

import os

import pyarrow as pa

from batchrun.errors import SpecError
from batchrun.plan import Fragment
from batchrun.sources.base import Source


class HFSource(Source):
    def __init__(self, path: str, data_files, split: str, config: str | None = None):
        self.path, self.data_files, self.split, self.config = path, data_files, split, config
        self._ds = None

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
            else:  # a local builder (parquet/json/csv + data_files) or a hub name where the hub is reachable
                ds = datasets.load_dataset(self.path, self.config, data_files=self.data_files, split=self.split)
        except Exception as e:
            raise SpecError(f"key 'input.path': cannot load HF dataset {self.path!r}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise SpecError(f"key 'input.split': {self.split!r} not in dataset splits {list(ds)}")
            ds = ds[self.split]
        return ds

    def describe(self):
        return [self.path], [len(self.dataset)], list(self.dataset.column_names)

    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        table = self.dataset.with_format("arrow")[fragment.start : fragment.stop]
        return table.select(columns)
