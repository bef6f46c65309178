"""The output directory: Parquet parts committed atomically, the manifest, the fingerprint and the run lock.

Layout (everything internal starts with "_" so pyarrow.dataset and datasets' parquet loader skip it):
    out/part-000012.parquet          one committed shard (a file never spans two shards)
    out/_summary.json                the job summary
    out/_batchrun/job.json           fingerprint and its components, to refuse a re-run that would change outputs
    out/_batchrun/lock.json          the running driver (host, pid, start time)
    out/_batchrun/manifest/000012.json   one entry per committed or quarantined shard
    out/_batchrun/tmp/               parts being written; never visible to readers
The commit point is a hard link from the temp file to the final name: link() fails if the name exists, so a shard
is committed once even when two attempts (a stale worker and its replacement) race to finish it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import OutputLocked, SpecError
from batchrun.fingerprint import diff_components, fingerprint

META_KEY = b"batchrun"


@dataclass(slots=True)
class ManifestEntry:
    shard_id: int
    state: str  # committed | quarantined
    rows: int = 0  # output rows (input rows x samples)
    ids_digest: str = ""  # sha256 of the shard's ids, checked against the input's at commit
    attempt: int = 0  # which hand-out of the shard produced it (1 = first)
    worker: str = ""
    node: str = ""
    run_id: str = ""
    started_at: float = 0.0  # lease time, for the timeline
    committed_at: float = 0.0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    error_rows: int = 0
    error: str | None = None  # quarantined: the last error
    score: dict | None = None  # evals: {"sum", "rows", "scored"} of this shard's score column


def committed_only(entries) -> list[ManifestEntry]:
    """The entries of committed shards (not quarantined ones): the one definition of "done" for every reader."""
    return [e for e in entries if e.state == "committed"]


def committed_totals(entries) -> dict:
    """Rows and tokens over committed manifest entries: the numbers the summary and `batchrun status` report."""
    done = committed_only(entries)
    return {"rows": sum(e.rows for e in done), "error_rows": sum(e.error_rows for e in done),
            "prompt_tokens": sum(e.prompt_tokens for e in done),
            "generated_tokens": sum(e.generated_tokens for e in done)}


def ids_digest(ids: pa.ChunkedArray | pa.Array) -> str:
    """A digest of the id values that does not depend on how the column happens to be chunked."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_string())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("id", arr.type)])) as w:  # IPC rebases sliced buffers: canonical bytes
        w.write_batch(pa.record_batch([arr], names=["id"]))
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]


class OutputDir:
    def __init__(self, path: str | Path):
        self.root = Path(path).absolute()
        self.meta = self.root / "_batchrun"
        self.manifest_dir = self.meta / "manifest"
        self.tmp = self.meta / "tmp"

    # ------------------------------------------------------------ setup

    def ensure(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise SpecError(f"key 'output.dir': {self.root} exists and is a file, expected a directory")
        try:
            for d in (self.root, self.meta, self.manifest_dir, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpecError(f"key 'output.dir': cannot create {self.root} ({e.strerror})") from None

    def check_fingerprint(self, components: dict, overwrite: bool) -> None:
        """Refuse a re-run whose outputs would differ from what is committed; --overwrite starts over."""
        job = self.meta / "job.json"
        new = {"fingerprint": fingerprint(components), "components": components}
        if overwrite:
            self.clear()
        elif job.exists():
            old = json.loads(job.read_text())
            if old["fingerprint"] != new["fingerprint"]:
                changes = diff_components(old["components"], components)
                raise SpecError(
                    f"output dir {self.root} holds a job whose outputs would differ from this one:\n  "
                    + "\n  ".join(changes)
                    + "\nUse --overwrite to discard its outputs, or choose a new output.dir."
                )
        elif any(self.parts()):
            raise SpecError(f"output dir {self.root} holds Parquet parts from another tool or an unknown job; "
                            "use --overwrite or a new output.dir")
        _atomic_write(job, json.dumps(new, indent=2, default=str))

    def clear(self) -> None:
        for p in self.parts():
            p.unlink()
        for d in (self.manifest_dir, self.tmp):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        (self.root / "_summary.json").unlink(missing_ok=True)

    def parts(self):
        return sorted(self.root.glob("part-*.parquet"))

    def part_path(self, shard_id: int) -> Path:
        return self.root / f"part-{shard_id:06d}.parquet"

    # ------------------------------------------------------------ lock

    def acquire_lock(self, run_id: str, break_lock: bool = False) -> None:
        lock = self.meta / "lock.json"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(), "run_id": run_id}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(lock) or {}
                if break_lock or self._is_stale(holder):
                    lock.unlink(missing_ok=True)
                    continue
                raise OutputLocked(
                    f"output dir {self.root} is in use by another run (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, started {time.ctime(holder.get('started_at', 0))}). If that run is gone, "
                    "re-run with --break-lock."
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return
        raise OutputLocked(f"could not take the lock on {self.root}")

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        """A lock from this host whose process is gone (or is another program now) is stale."""
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another host's processes: only --break-lock breaks it
        pid = holder.get("pid")
        try:
            proc = psutil.Process(pid)
            return proc.create_time() > holder.get("started_at", 0) + 1  # pid reused by a newer process
        except (psutil.NoSuchProcess, TypeError, ValueError):
            return True

    def release_lock(self, run_id: str) -> None:
        lock = self.meta / "lock.json"
        if (_read_json(lock) or {}).get("run_id") == run_id:
            lock.unlink(missing_ok=True)

    # ------------------------------------------------------------ manifest

    def entries(self) -> dict[int, ManifestEntry]:
        out = {}
        for f in self.manifest_dir.glob("*.json"):
            data = _read_json(f)
            if data:
                e = ManifestEntry(**data)
                out[e.shard_id] = e
        return out

    def committed(self) -> dict[int, ManifestEntry]:
        return {e.shard_id: e for e in committed_only(self.entries().values())}

    def job(self) -> dict:
        """The job's fingerprint and components (job.json), or {} before its first run."""
        return _read_json(self.meta / "job.json") or {}

    def lock_holder(self) -> dict | None:
        """Who holds the run lock (lock.json), or None."""
        return _read_json(self.meta / "lock.json")

    def write_entry(self, entry: ManifestEntry) -> None:
        _atomic_write(self.manifest_dir / f"{entry.shard_id:06d}.json", json.dumps(asdict(entry)))

    def drop_entry(self, shard_id: int) -> None:
        (self.manifest_dir / f"{shard_id:06d}.json").unlink(missing_ok=True)

    def reconcile(self, committed: dict | None = None) -> list[int]:
        """Rebuild manifest entries for parts committed just before a crash, from their own Parquet metadata.
        `committed`: the committed entries, where the caller has read them already (one manifest read per run)."""
        committed = self.committed() if committed is None else committed
        rebuilt = []
        for part in self.parts():
            shard_id = int(part.stem.split("-")[1])
            if shard_id in committed:
                continue
            meta = pq.read_schema(part).metadata or {}
            if META_KEY not in meta:
                continue
            self.write_entry(ManifestEntry(**json.loads(meta[META_KEY])))
            rebuilt.append(shard_id)
        return rebuilt

    def clean_tmp(self) -> None:
        """Temp files of dead attempts: safe to delete because this run holds the lock."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ parts

    def write_temp(self, table: pa.Table, entry: ManifestEntry, compression: str) -> Path:
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps(asdict(entry)).encode()
        table = table.replace_schema_metadata(meta)
        tmp = self.tmp / f"{entry.shard_id:06d}.{entry.worker}.{entry.attempt}.{os.getpid()}.parquet"
        pq.write_table(table, tmp, compression=None if compression == "none" else compression)
        return tmp

    def commit(self, tmp: Path, entry: ManifestEntry) -> bool:
        """Make the part visible in one step. False if the shard was already committed (a no-op)."""
        final = self.part_path(entry.shard_id)
        try:
            os.link(tmp, final)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if final.exists():  # filesystems without hard links: rename, guarded by the queue's single writer
                tmp.unlink(missing_ok=True)
                return False
            os.replace(tmp, final)
        tmp.unlink(missing_ok=True)
        self.write_entry(entry)
        return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
