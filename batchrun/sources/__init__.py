"""Sources read one shard of the input as an Arrow table: only that shard's rows, never the whole input."""

from __future__ import annotations

from batchrun.errors import SpecError
from batchrun.sources.base import Source
from batchrun.spec import InputSpec


def open_source(spec: InputSpec) -> Source:
    if spec.format == "parquet":
        from batchrun.sources.parquet import ParquetSource

        return ParquetSource(spec.path)
    if spec.format == "hf":
        from batchrun.sources.hf_datasets import HFSource

        return HFSource(spec.path, spec.data_files, spec.split, spec.config, spec.streaming)
    if spec.format in ("jsonl", "openai-batch"):
        from batchrun.sources.jsonl import JsonlSource

        return JsonlSource(spec.path, openai_batch=spec.format == "openai-batch")
    raise SpecError(f"key 'input.format': format {spec.format!r} is not supported by this version of batchrun")


__all__ = ["Source", "open_source"]
