"""Parts: one Parquet file per committed shard, `part-<shard id>.parquet` at the top of the output dir, carrying
its own manifest entry in its footer. Creating a part under its final name, exclusively, is the commit: a shard is
committed once even when a stale attempt and its replacement race to finish it, and a reader sees either no part or
the whole one. The worker writes parts; nothing else does."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.records import ManifestEntry
from batchrun.store.fs import Store, name_number, retried

META_KEY = b"batchrun"  # the footer key (schema metadata) that holds the part's manifest entry


def ids_digest(ids: pa.ChunkedArray | pa.Array) -> str:
    """A digest of the id values that does not depend on how the column happens to be chunked."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_string())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("id", arr.type)])) as w:  # IPC rebases sliced buffers: canonical bytes
        w.write_batch(pa.record_batch([arr], names=["id"]))
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]


def entry_in(meta: dict | None) -> ManifestEntry | None:
    """The manifest entry a part carries in its footer (its schema metadata), or None."""
    return ManifestEntry(**json.loads(meta[META_KEY])) if meta and META_KEY in meta else None



class Parts:
    def __init__(self, store: Store):
        self.store = store

    def names(self, shards: int | None = None, only=None) -> list[str]:
        """Every part's path. shards: how many the plan has, where known: on an object store the parts are then
        listed by key prefix, a thousand shard ids each, many at once. only: these shard ids' parts alone (on a
        store, only the prefixes that hold them are listed)."""
        if only is not None and not self.store.local:
            prefixes = sorted({f"part-{sid:06d}"[:-3] for sid in only})
            names = self.store.list_prefixes(self.store.path, prefixes, suffix=".parquet") if prefixes else []
        elif self.store.local or not shards or shards <= 1000:
            names = self.store.list(self.store.path, prefix="part-", suffix=".parquet")
        else:
            prefixes = sorted({f"part-{first:06d}"[:-3] for first in range(0, shards, 1000)})
            names = self.store.list_prefixes(self.store.path, prefixes, suffix=".parquet")
        if only is None:
            return names
        wanted = set(map(int, only))
        return [p for p in names if name_number(p) in wanted]

    def path(self, shard_id: int) -> str:
        return self.store.join(f"part-{shard_id:06d}.parquet")

    def publish(self, table: pa.Table, entry: ManifestEntry, compression: str) -> bool:
        """Write a shard's part and commit it in one step. False if the shard was already committed (a stale
        attempt's copy, dropped). The entry travels in the part's footer; the queue adds it to the manifest.

        A revision (`run --retry-errors`: the same rows, error rows generated again) replaces the committed part in
        one step instead: os.replace of a complete temp file, or one PUT, which a store makes visible whole. A reader
        sees the old part or the new one, so every row exactly once at every instant. Two attempts of one revision
        both write all the shard's rows; the last one stands and the driver records its footer at the end."""
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps(asdict(entry)).encode()
        table = table.replace_schema_metadata(meta)
        compression = None if compression == "none" else compression
        final = self.path(entry.shard_id)
        if self.store.local:  # write to a temp file and link it: no copy of the part in memory
            tmp = f"{self.store.tmp}/{entry.shard_id:06d}.{entry.worker}.{entry.attempt}.{os.getpid()}.parquet"
            pq.write_table(table, tmp, compression=compression)
            if entry.revision:
                os.replace(tmp, final)
                return True
            return self.store.link(tmp, final)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression=compression)
        if entry.revision:
            self.store.write_bytes(final, buf.getvalue().to_pybytes())
            return True
        return self.store.create(final, buf.getvalue().to_pybytes())

    def read(self, shard_id: int) -> pa.Table:
        """A committed part, whole (its footer's entry in the schema metadata): what `--retry-errors` starts from."""
        path = self.path(shard_id)
        if self.store.local:
            return pq.read_table(path)
        return pq.read_table(pa.BufferReader(retried(lambda: self.store.fs.cat_file(path), f"read {path}")))

    def entry(self, shard_id: int) -> ManifestEntry | None:
        """The manifest entry a committed part carries in its footer, or None."""
        return self.footer_entry(self.path(shard_id))

    def footer_entry(self, part: str) -> ManifestEntry | None:
        def read_meta():
            with self.store.open(part) as fh:
                return pq.read_schema(fh).metadata or {}

        try:
            meta = read_meta() if self.store.local else retried(read_meta, f"read the footer of {part}")
        except FileNotFoundError:
            return None
        return entry_in(meta)
