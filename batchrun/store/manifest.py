"""The manifest: every shard's entry (committed or quarantined), kept as Parquet segments under
`_batchrun/manifest/`. It is not the commit point (the part is, see parts.py): the queue appends the entries of a
batch of commits as one segment (once a second or per thousand commits), and a crash between a commit and its
segment is repaired at the next start from the footers of the parts that have no entry (`reconcile`). A resume reads
a handful of segments, not one object per shard; the driver compacts them into one at each start and end, and a run
that ended cleanly leaves a mark (complete.json) so that the next start need not list the parts."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.records import ManifestEntry
from batchrun.store.fs import Store, name_number
from batchrun.store.parts import Parts

FOOTER_READS = 32  # footers read at once by reconcile on an object store

SEGMENT_SCHEMA = pa.schema([
    ("shard_id", pa.int64()), ("state", pa.string()), ("rows", pa.int64()), ("ids_digest", pa.string()),
    ("attempt", pa.int64()), ("worker", pa.string()), ("node", pa.string()), ("run_id", pa.string()),
    ("started_at", pa.float64()), ("committed_at", pa.float64()), ("generated_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()), ("error_rows", pa.int64()), ("error", pa.string()), ("score", pa.string()),
    ("cached_prompt_tokens", pa.int64()), ("revision", pa.int64()), ("retried", pa.string()),
])
JSON_FIELDS = ("score", "retried")  # dicts, stored as JSON text in segments
KEY_COLUMNS = ("shard_id", "state", "revision", "committed_at")  # what decides which entry of a shard wins
DEFAULTS = {f.name: f.default for f in fields(ManifestEntry) if f.name not in JSON_FIELDS and f.default is not MISSING}



def segment_bytes(entries: list[ManifestEntry]) -> bytes:
    return table_bytes(pa.Table.from_pylist([entry_row(e) for e in entries], schema=SEGMENT_SCHEMA))


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def segment_table(data: bytes, columns: tuple[str, ...] | None = None) -> pa.Table:
    """A segment (or the given columns of it) as SEGMENT_SCHEMA: columns an older segment lacks get their defaults."""
    present = set(pq.read_schema(pa.BufferReader(data)).names)
    wanted = [f for f in SEGMENT_SCHEMA if columns is None or f.name in columns]
    table = pq.read_table(pa.BufferReader(data), columns=[f.name for f in wanted if f.name in present])
    arrays = []
    for f in wanted:
        col = table[f.name].cast(f.type) if f.name in present else pa.nulls(len(table), f.type)
        if DEFAULTS.get(f.name) is not None:
            col = pc.fill_null(col, DEFAULTS[f.name])
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=pa.schema(wanted))


def winners(keys: pa.Table, committed_only: bool = False) -> tuple[np.ndarray, int]:
    """Row numbers of the entries that win, one per shard: a committed entry over a quarantined one; between two
    committed, the newer revision (`--retry-errors` replaced the part; one revision's entries are the same whoever
    recorded them: a part is created once per revision); between two quarantined, the later. Whatever order the
    rows come in. committed_only: shards whose winner is quarantined are left out (returned: how many)."""
    order = pc.sort_indices(keys.append_column("_committed", pc.equal(keys["state"], "committed")),
                            [("shard_id", "ascending"), ("_committed", "descending"), ("revision", "descending"),
                             ("committed_at", "descending")])
    ids = keys["shard_id"].take(order).to_numpy()
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    dropped = 0
    if committed_only:
        keep = first & (keys["state"].take(order).to_numpy(zero_copy_only=False) == "committed")
        dropped, first = int(first.sum() - keep.sum()), keep
    return np.sort(order.to_numpy()[first]).astype(np.int64), dropped


def merge(tables: list[pa.Table]) -> pa.Table:
    """The union of entries held in tables, one row per shard (see winners)."""
    table = pa.concat_tables(tables) if tables else SEGMENT_SCHEMA.empty_table()
    return table.take(winners(table)[0])


def merge_segments(segments: list[bytes], committed_only: bool = False) -> tuple[pa.Table, int]:
    """The union of manifest segments, one row per shard (see winners), in two passes so that the segments and the
    merged table are never in memory together: the key columns of every segment, then each segment's winning rows,
    one segment at a time (each segment's bytes are let go once read). Returns the table and how many shards
    committed_only left out."""
    keys = [segment_table(d, KEY_COLUMNS) for d in segments]
    starts = np.cumsum([0] + [len(k) for k in keys])
    won, dropped = winners(pa.concat_tables(keys), committed_only) if keys else (np.zeros(0, dtype=np.int64), 0)
    del keys
    parts = []
    for i in range(len(segments)):
        lo, hi = np.searchsorted(won, starts[i]), np.searchsorted(won, starts[i + 1])
        if hi > lo:
            table = segment_table(segments[i])
            parts.append(table if hi - lo == len(table) else table.take(won[lo:hi] - starts[i]))  # all: no copy
        segments[i] = None
    return (pa.concat_tables(parts) if parts else SEGMENT_SCHEMA.empty_table()), dropped


class Entries(Mapping):
    """Merged manifest entries, one per shard id, held as one Arrow table (a million entries in ~100 MB, not a
    million objects). Reads as a mapping shard id -> ManifestEntry (made when asked for); the driver's paths use
    the columnar ones (ids, totals, where...)."""

    def __init__(self, table: pa.Table):
        self.table = table
        ids = table["shard_id"].to_numpy()
        self._order = np.argsort(ids, kind="stable")  # row numbers in shard id order
        self._ids = ids[self._order]

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        return iter(self._ids.tolist())

    def _row(self, shard_id) -> int | None:
        i = int(np.searchsorted(self._ids, shard_id))
        return int(self._order[i]) if i < len(self._ids) and self._ids[i] == shard_id else None

    def __contains__(self, shard_id) -> bool:
        return self._row(shard_id) is not None

    def __getitem__(self, shard_id: int) -> ManifestEntry:
        if (row := self._row(shard_id)) is None:
            raise KeyError(shard_id)
        return self._entry(self.table.slice(row, 1).to_pylist()[0])

    @staticmethod
    def _entry(row: dict) -> ManifestEntry:
        row = {k: v for k, v in row.items() if v is not None}
        row.update({k: json.loads(row[k]) for k in JSON_FIELDS if k in row})
        return ManifestEntry(**row)

    def list(self) -> list[ManifestEntry]:
        return [self._entry(r) for r in self.table.to_pylist()]

    def ids(self) -> set[int]:
        return set(self._ids.tolist())

    def where(self, mask) -> Entries:
        if pc.all(mask).as_py() is not False:  # every row (or none to test): no copy
            return self
        return Entries(self.table.filter(mask))

    def committed(self) -> Entries:
        return self.where(pc.equal(self.table["state"], "committed"))

    def of_run(self, run_id: str) -> Entries:
        return self.where(pc.equal(self.table["run_id"], run_id))

    def having(self, column: str) -> Entries:
        """The entries whose count `column` is above 0 (error_rows, revision)."""
        return self.where(pc.greater(self.table[column], 0))

    def columns(self, *names: str) -> Entries:
        """Only these columns (shard_id always): what a computation over many entries needs, copied smaller."""
        return Entries(self.table.select(list(dict.fromkeys(("shard_id", *names)))))

    def sum(self, column: str) -> int:
        return int(pc.sum(self.table[column]).as_py() or 0)

    def json(self, column: str) -> list[dict]:
        """The non-null dicts of a JSON column (score, retried)."""
        return [json.loads(v) for v in self.table[column].drop_null().to_pylist()]

    def replace(self, entries: dict[int, ManifestEntry]) -> Entries:
        """These entries instead of the ones with their shard ids (added where there were none)."""
        if not entries:
            return self
        keep = self.table.filter(pc.invert(pc.is_in(self.table["shard_id"], pa.array(list(entries), pa.int64()))))
        new = pa.Table.from_pylist([entry_row(e) for e in entries.values()], schema=SEGMENT_SCHEMA)
        return Entries(merge([keep, new]))


def entry_row(e: ManifestEntry) -> dict:
    return {**asdict(e), **{k: json.dumps(getattr(e, k)) for k in JSON_FIELDS if getattr(e, k) is not None}}


class Manifest:
    def __init__(self, store: Store):
        self.store = store
        self.parts = Parts(store)  # reconcile reads the footers of parts the manifest lacks

    def entries(self) -> Entries:
        return self._merged(self.store.list(self.store.manifest_dir, suffix=".parquet"))

    def _merged(self, segments: list[str]) -> Entries:
        return Entries(merge_segments(list(self.store.read_all(segments).values()))[0])

    def committed(self) -> Entries:
        return self.entries().committed()

    def append(self, entries: list[ManifestEntry], run_id: str, seq: int) -> None:
        """One segment of entries (the queue's batch of commits and quarantines)."""
        if entries:
            self.store.write_bytes(self.store.join("_batchrun", "manifest", f"{run_id}-{seq:06d}.parquet"),
                             segment_bytes(entries))

    def compact(self, run_id: str, keep_quarantined: bool = True, only_run: bool = False,
                override: dict[int, ManifestEntry] | None = None) -> Entries:
        """Merge every segment into one (under the run lock; only_run: just this run's own segments, which the queue
        does while the run goes on, so that readers never face thousands of them). A segment written meanwhile is
        not deleted: only the ones read are, after the merged one is in place. keep_quarantined=False drops
        quarantined entries: a re-run retries those shards. override: entries that replace the merged ones (the
        footers of replaced parts, read after the last writer is gone). Returns the merged entries."""
        paths = self.store.list(self.store.manifest_dir, prefix=f"{run_id}-" if only_run else "", suffix=".parquet")
        segments = list(self.store.read_all(paths).values())
        table, dropped = merge_segments(segments, committed_only=not keep_quarantined)
        entries = Entries(table).replace(override or {})
        if len(paths) > 1 or dropped or override:
            name = self.store.join("_batchrun", "manifest", f"{run_id}-c{time.time_ns()}.parquet")
            self.store.write_bytes(name, table_bytes(entries.table))
            self.store.remove([p for p in paths if p != name])
        return entries

    # A run that ended cleanly leaves the number of committed shards in complete.json: every part has its manifest
    # entry then, and the next start need not list the parts (on an object store, one LIST per 1,000 of them). A
    # start takes the mark away before any work, so a run that dies leaves none and the next start reconciles.
    def mark_complete(self, committed: int) -> None:
        data = json.dumps({"committed": committed}).encode()
        self.store.write_bytes(self.store.join("_batchrun", "complete.json"), data)

    def take_complete_mark(self) -> int | None:
        mark = self.store.read_json(self.store.join("_batchrun", "complete.json"))
        if mark is not None:
            self.store.remove([self.store.join("_batchrun", "complete.json")])
        return (mark or {}).get("committed")

    def mark_leases(self, below: int) -> None:
        """The queue's promise, written before it hands out a shard at or past the last one: every shard this run
        leases has an id below `below`. A crash can then leave parts without entries only there (lease_mark)."""
        self.store.write_bytes(self.store.join("_batchrun", "leased.json"), json.dumps({"below": below}).encode())

    def lease_mark(self) -> int | None:
        """The last run's lease mark (None: no run wrote one, e.g. an output dir of an earlier batchrun)."""
        return (self.store.read_json(self.store.join("_batchrun", "leased.json")) or {}).get("below")

    def reconcile(self, known: dict | set, run_id: str, shards: int | None = None,
                  below: int | None = None) -> dict[int, ManifestEntry]:
        """Add manifest entries for parts committed just before a crash (their segment was never written), from the
        parts' own footers. `known`: the shard ids the manifest has. below: the crashed run's lease mark: only ids
        below it that the manifest lacks can have such parts, and only their key prefixes are listed (a full listing
        was 100 LISTs at 100k shards; this is one or two)."""
        only = None
        if below is not None:
            ids = known.ids() if isinstance(known, Entries) else set(known)
            end = below if shards is None else min(below, shards)
            only = np.setdiff1d(np.arange(end), np.fromiter(ids, dtype=np.int64, count=len(ids)))
        missing = [p for p in self.parts.names(shards, only) if name_number(p) not in known]
        if self.store.local or len(missing) < 2:
            footers = list(map(self.parts.footer_entry, missing))
        else:  # one small ranged read each, many at once: a crash can leave thousands on a store
            with ThreadPoolExecutor(max_workers=FOOTER_READS) as pool:
                footers = list(pool.map(self.parts.footer_entry, missing))
        rebuilt = [e for e in footers if e is not None]
        self.append(rebuilt, run_id, 999999)
        return {e.shard_id: e for e in rebuilt}
