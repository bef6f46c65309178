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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.records import ManifestEntry, committed_only
from batchrun.store.fs import Store, name_number
from batchrun.store.parts import Parts

FOOTER_READS = 32  # footers read at once by reconcile on an object store

ENTRY_FIELDS = [f.name for f in fields(ManifestEntry)]
SEGMENT_SCHEMA = pa.schema([
    ("shard_id", pa.int64()), ("state", pa.string()), ("rows", pa.int64()), ("ids_digest", pa.string()),
    ("attempt", pa.int64()), ("worker", pa.string()), ("node", pa.string()), ("run_id", pa.string()),
    ("started_at", pa.float64()), ("committed_at", pa.float64()), ("generated_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()), ("error_rows", pa.int64()), ("error", pa.string()), ("score", pa.string()),
    ("cached_prompt_tokens", pa.int64()), ("revision", pa.int64()), ("retried", pa.string()),
])
JSON_FIELDS = ("score", "retried")  # dicts, stored as JSON text in segments



def merge_entries(entries, into: dict[int, ManifestEntry]) -> dict[int, ManifestEntry]:
    """Union of manifest entries, whatever order the segments are read in: a committed entry wins over a quarantined
    one; between two committed, the newer revision (`--retry-errors` replaced the part), else the one already there
    (a part is created once per revision); between two quarantined, the later."""
    for e in entries:
        old = into.get(e.shard_id)
        if old is None or (e.revision > old.revision if old.state == "committed" else
                           e.state == "committed" or e.committed_at >= old.committed_at):
            into[e.shard_id] = e
    return into


def segment_bytes(entries: list[ManifestEntry]) -> bytes:
    rows = [{**asdict(e), **{k: json.dumps(getattr(e, k)) for k in JSON_FIELDS if getattr(e, k) is not None}}
            for e in entries]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def read_segment(data: bytes) -> list[ManifestEntry]:
    table = pq.read_table(pa.BufferReader(data))
    out = []
    for row in table.to_pylist():
        row = {k: v for k, v in row.items() if k in ENTRY_FIELDS and v is not None}  # older segments: defaults
        row.update({k: json.loads(row[k]) for k in JSON_FIELDS if isinstance(row.get(k), str)})
        out.append(ManifestEntry(**row))
    return out


class Manifest:
    def __init__(self, store: Store):
        self.store = store
        self.parts = Parts(store)  # reconcile reads the footers of parts the manifest lacks

    def entries(self) -> dict[int, ManifestEntry]:
        return self._merged(self.store.list(self.store.manifest_dir, suffix=".parquet"))

    def _merged(self, segments: list[str]) -> dict[int, ManifestEntry]:
        out: dict[int, ManifestEntry] = {}
        for data in self.store.read_all(segments).values():
            merge_entries(read_segment(data), out)
        return out

    def committed(self) -> dict[int, ManifestEntry]:
        return {e.shard_id: e for e in committed_only(self.entries().values())}

    def append(self, entries: list[ManifestEntry], run_id: str, seq: int) -> None:
        """One segment of entries (the queue's batch of commits and quarantines)."""
        if entries:
            self.store.write_bytes(self.store.join("_batchrun", "manifest", f"{run_id}-{seq:06d}.parquet"),
                             segment_bytes(entries))

    def compact(self, run_id: str, keep_quarantined: bool = True, only_run: bool = False,
                override: dict[int, ManifestEntry] | None = None) -> dict[int, ManifestEntry]:
        """Merge every segment into one (under the run lock; only_run: just this run's own segments, which the queue
        does while the run goes on, so that readers never face thousands of them). A segment written meanwhile is
        not deleted: only the ones read are, after the merged one is in place. keep_quarantined=False drops
        quarantined entries: a re-run retries those shards. override: entries that replace the merged ones (the
        footers of replaced parts, read after the last writer is gone). Returns the merged entries."""
        paths = self.store.list(self.store.manifest_dir, prefix=f"{run_id}-" if only_run else "", suffix=".parquet")
        merged = self._merged(paths)
        entries = merged if keep_quarantined else {s: e for s, e in merged.items() if e.state == "committed"}
        if override:
            entries = {**entries, **override}
        if len(paths) > 1 or len(entries) != len(merged) or override:
            name = self.store.join("_batchrun", "manifest", f"{run_id}-c{time.time_ns()}.parquet")
            self.store.write_bytes(name, segment_bytes(sorted(entries.values(), key=lambda e: e.shard_id)))
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

    def reconcile(self, known: dict | set, run_id: str) -> dict[int, ManifestEntry]:
        """Add manifest entries for parts committed just before a crash (their segment was never written), from the
        parts' own footers. `known`: the shard ids the manifest has."""
        missing = [p for p in self.parts.names() if name_number(p) not in known]
        if self.store.local or len(missing) < 2:
            footers = list(map(self.parts.footer_entry, missing))
        else:  # one small ranged read each, many at once: a crash can leave thousands on a store
            with ThreadPoolExecutor(max_workers=FOOTER_READS) as pool:
                footers = list(pool.map(self.parts.footer_entry, missing))
        rebuilt = [e for e in footers if e is not None]
        self.append(rebuilt, run_id, 999999)
        return {e.shard_id: e for e in rebuilt}
