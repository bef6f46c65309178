"""The output directory: Parquet parts committed atomically, the manifest, the fingerprint and the run lock.

`output.dir` is a local path or an object-store URL (s3://, gs://). Layout (everything internal starts with "_" so
pyarrow.dataset and datasets' parquet loader skip it):
    out/part-000012.parquet          one committed shard (a file never spans two shards)
    out/_summary.json                the job summary
    out/_batchrun/job.json           fingerprint and its components, to refuse a re-run that would change outputs
    out/_batchrun/lock.json          local: the running driver (host, pid, start time)
    out/_batchrun/lock-000003.json   object store: the running driver's lease, renewed while it runs (see below)
    out/_batchrun/manifest/*.parquet segments of manifest entries, one per batch of commits (the queue appends them)
    out/_batchrun/tmp/               local only: parts being written; never visible to readers

The commit point is the creation of the part under its final name, exclusive: it fails if the name exists, so a
shard is committed once even when two attempts (a stale worker and its replacement) race to finish it, and a reader
sees either no part or the whole one.
- local: a hard link from the temp file to the final name (link() refuses an existing name);
- object store: a conditional PUT of the whole part (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, through
  fsspec's `pipe_file(mode="create")`). A PUT becomes visible only when complete, so no temp object is needed and
  nothing in progress is ever listed; a second writer gets 412 and drops its copy.
`run --retry-errors` is the one replacement: a part's next revision (the same rows, its error rows generated again)
replaces it whole, and the newest revision's entry wins in the manifest (see publish).
The part's own footer carries its manifest entry, so the manifest is not a commit point: the queue appends entries
in batches (one segment per second or per thousand commits), and a crash between a commit and its segment is
repaired at the next start from the footers of the parts that have no entry (`reconcile`). A resume reads a handful
of segments, not one object per shard; the driver compacts them into one at each start and end.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import OutputLocked, SpecError
from batchrun.fingerprint import diff_components, fingerprint

log = logging.getLogger("batchrun.sink")

META_KEY = b"batchrun"
# Object stores with an exclusive create that fsspec exposes as pipe_file(mode="create"): s3fs sends
# If-None-Match: * (s3fs/core.py _pipe_file, botocore >= 1.35.20), gcsfs ifGenerationMatch=0 (gcsfs/core.py
# simple_upload). fsspec's generic fallback (exists() then write) is not atomic, so other protocols are refused.
CREATE_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}
LOCK_LEASE_S = 120.0  # an object-store lock not renewed for this long belongs to a driver that is gone


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
    cached_prompt_tokens: int = 0  # prompt tokens the engine served from reused prefix blocks
    revision: int = 0  # `run --retry-errors` replaced the part this many times (the newest revision wins)
    retried: dict | None = None  # that replacement: {"rows", "still_failing", "generated_tokens"} of its redone rows


ENTRY_FIELDS = [f.name for f in fields(ManifestEntry)]
SEGMENT_SCHEMA = pa.schema([
    ("shard_id", pa.int64()), ("state", pa.string()), ("rows", pa.int64()), ("ids_digest", pa.string()),
    ("attempt", pa.int64()), ("worker", pa.string()), ("node", pa.string()), ("run_id", pa.string()),
    ("started_at", pa.float64()), ("committed_at", pa.float64()), ("generated_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()), ("error_rows", pa.int64()), ("error", pa.string()), ("score", pa.string()),
    ("cached_prompt_tokens", pa.int64()), ("revision", pa.int64()), ("retried", pa.string()),
])
JSON_FIELDS = ("score", "retried")  # dicts, stored as JSON text in segments


_RETRIES = [0]  # store operations this process retried (worker stats, the queue's progress, the summary)


def store_retries() -> int:
    return _RETRIES[0]


def retried(op, what: str, attempts: int = 6, base_s: float = 0.2, cap_s: float = 8.0):
    """op() with retries on a store's transient errors (503 SlowDown, timeouts, resets, S3's 409
    ConditionalRequestConflict), exponential backoff with full jitter, so that a throttled fleet does not retry in
    step. "Not found" and "exists" are answers, not faults: they are raised at once, as is the last error."""
    for attempt in range(attempts):
        try:
            return op()
        except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError):
            raise
        except Exception as e:  # noqa: BLE001 - every other store error is retried, then raised
            if attempt == attempts - 1:
                raise
            delay = random.uniform(0, min(cap_s, base_s * 2 ** attempt))
            _RETRIES[0] += 1
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__, str(e)[:200],
                        attempt + 1, attempts - 1, delay)
            time.sleep(delay)


def committed_only(entries) -> list[ManifestEntry]:
    """The entries of committed shards (not quarantined ones): the one definition of "done" for every reader."""
    return [e for e in entries if e.state == "committed"]


def committed_totals(entries) -> dict:
    """Rows and tokens over committed manifest entries: the numbers the summary and `batchrun status` report."""
    done = committed_only(entries)
    return {"rows": sum(e.rows for e in done), "error_rows": sum(e.error_rows for e in done),
            "prompt_tokens": sum(e.prompt_tokens for e in done),
            "cached_prompt_tokens": sum(e.cached_prompt_tokens for e in done),
            "generated_tokens": sum(e.generated_tokens for e in done)}


def ids_digest(ids: pa.ChunkedArray | pa.Array) -> str:
    """A digest of the id values that does not depend on how the column happens to be chunked."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_string())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("id", arr.type)])) as w:  # IPC rebases sliced buffers: canonical bytes
        w.write_batch(pa.record_batch([arr], names=["id"]))
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]


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


def entry_in(meta: dict | None) -> ManifestEntry | None:
    """The manifest entry a part carries in its footer (its schema metadata), or None."""
    return ManifestEntry(**json.loads(meta[META_KEY])) if meta and META_KEY in meta else None


def name_number(path: str) -> int:
    """The number in part-000012.parquet or lock-000003.json (the shard id, the lock's sequence)."""
    return int(path.rsplit("-", 1)[1].split(".")[0])


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


class OutputDir:
    def __init__(self, url):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        url = str(url)
        self.fs, path = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.path = os.path.abspath(path) if self.local else path.rstrip("/")
        self.protocol = "file" if self.local else url.split("://", 1)[0]
        self.root = self.path if self.local else url.rstrip("/")  # what users see and pass on
        self.meta = self.join("_batchrun")
        self.manifest_dir = self.join("_batchrun", "manifest")
        self.tmp = self.join("_batchrun", "tmp")
        self.runs_dir = self.join("_batchrun", "runs")  # one cost record per run (cost.py)
        self._lock_path: str | None = None  # object store: the lock object this driver holds
        self._stop_renew = threading.Event()
        self.lock_lost: str | None = None  # object store: set when another driver took the lock over

    def join(self, *names: str) -> str:
        return "/".join([self.path, *names])

    def __repr__(self) -> str:
        return f"OutputDir({self.root!r})"

    # ------------------------------------------------------------ small file operations, local or object store

    def read_bytes(self, path: str) -> bytes | None:
        try:
            if self.local:
                with open(path, "rb") as fh:
                    return fh.read()
            return retried(lambda: self.fs.cat_file(path), f"read {path}")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_json(self, path: str) -> dict | None:
        data = self.read_bytes(path)
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    def write_bytes(self, path: str, data: bytes) -> None:
        """Replace an object whole: readers see the old or the new content, never a part of it."""
        if self.local:
            tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            retried(lambda: self.fs.pipe_file(path, data), f"write {path}")  # one PUT: atomic

    def create(self, path: str, data: bytes) -> bool:
        """Create `path` only if no object has that name: the commit primitive. False if it exists."""
        if self.local:
            tmp = f"{self.tmp}/{os.path.basename(path)}.{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            return self._link(tmp, path)
        try:
            retried(lambda: self.fs.pipe_file(path, data, mode="create"), f"create {path}")
            return True
        except FileExistsError:  # also a retry whose earlier PUT landed: the caller tells its own copy apart
            return False

    def _link(self, tmp: str, final: str) -> bool:
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if os.path.exists(final):  # filesystems without hard links: rename (a same-shard race keeps one copy)
                return False
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True

    def list(self, path: str, prefix: str = "", suffix: str = "") -> list[str]:
        """Names directly under `path` (full paths), fresh from the store (no listing cache)."""
        if self.local:
            try:
                with os.scandir(path) as it:
                    names = [e.name for e in it]
            except FileNotFoundError:
                return []
            return sorted(f"{path}/{n}" for n in names if n.startswith(prefix) and n.endswith(suffix))
        self.fs.invalidate_cache(path)
        try:
            names = retried(lambda: self.fs.ls(path, detail=False), f"list {path}")
        except FileNotFoundError:
            return []
        return sorted(p for p in (n.rstrip("/") for n in names)
                      if p.rsplit("/", 1)[-1].startswith(prefix) and p.endswith(suffix))

    def remove(self, paths: list[str]) -> None:
        if not paths:
            return
        if self.local:
            for p in paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        else:
            retried(lambda: self.fs.rm(paths), f"delete {len(paths)} objects")  # batched (S3: 1,000 keys a request)

    def open(self, path: str, mode: str = "rb"):
        return open(path, mode) if self.local else self.fs.open(path, mode)

    def exists(self) -> bool:
        """Whether this looks like a batchrun output dir (it has a job file)."""
        return self.read_bytes(self.join("_batchrun", "job.json")) is not None

    # ------------------------------------------------------------ setup

    def ensure(self) -> None:
        if not self.local:
            return self._ensure_remote()
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise SpecError(f"key 'output.dir': {self.root} exists and is a file, expected a directory")
        try:
            for d in (self.path, self.meta, self.manifest_dir, self.tmp, self.runs_dir):
                os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise SpecError(f"key 'output.dir': cannot create {self.root} ({e.strerror})") from None

    def _ensure_remote(self) -> None:
        if self.protocol not in CREATE_PROTOCOLS:
            raise SpecError(
                f"key 'output.dir': {self.root}: batchrun commits a part by creating it exclusively, and "
                f"{self.protocol}:// offers no atomic create-if-absent through fsspec; use a local or shared "
                f"filesystem path, s3:// or gs://")
        bucket = self.path.split("/", 1)[0]
        try:
            self.fs.invalidate_cache(bucket)
            ok = self.fs.exists(bucket)
        except Exception as e:  # credentials and endpoint problems: the error's own words (never a secret)
            raise SpecError(f"key 'output.dir': cannot reach {self.protocol}://{bucket} "
                            f"({type(e).__name__}: {e})") from None
        if not ok:
            raise SpecError(f"key 'output.dir': bucket {self.protocol}://{bucket} does not exist or is not "
                            "visible with these credentials")
        self.check_exclusive_create()

    def check_exclusive_create(self) -> None:
        """The commit relies on the store refusing a second create of the same name. Checked, not assumed: an
        endpoint (or an old botocore) that drops If-None-Match would let two attempts of a shard both "win". Done
        under the output prefix, so it also proves these credentials may write there (a prefix-scoped policy may
        refuse bucket-level calls and still allow this)."""
        probe = self.join("_batchrun", f"probe-{uuid.uuid4().hex}")
        try:
            first, second = self.create(probe, b"1"), self.create(probe, b"2")
        except Exception as e:  # noqa: BLE001 - credentials, permissions, endpoint: the store's own words
            raise SpecError(f"key 'output.dir': cannot write under {self.root} ({type(e).__name__}: {e})") from None
        finally:
            try:
                self.remove([probe])
            except Exception:  # noqa: BLE001 - a leftover probe object is harmless
                pass
        if not (first and not second):
            raise SpecError(
                f"key 'output.dir': {self.root}: the store accepted a second exclusive create of the same object "
                "(If-None-Match: * on PUT was ignored): batchrun could commit a shard twice there. Use an endpoint "
                "that honours conditional writes (AWS S3, GCS, MinIO, moto) and s3fs >= 2024.12 with botocore >= "
                "1.35.20")

    def probe_write(self) -> None:
        """A worker's start: can it write under the output prefix? (Stores only; before any generation.)"""
        if not self.local:
            self.check_exclusive_create()

    def check_fingerprint(self, components: dict, overwrite: bool, may_change=None) -> None:
        """Refuse a re-run whose outputs would differ from what is committed; --overwrite starts over.
        may_change(key): a changed key that is allowed (`run --retry-errors` after fixing a template): the job record
        then takes the new components and keeps the fingerprints it replaced."""
        job = self.join("_batchrun", "job.json")
        new = {"fingerprint": fingerprint(components), "components": components}
        old = self.read_json(job)
        if overwrite:
            self.clear()
        elif old is not None:
            if old["fingerprint"] != new["fingerprint"]:
                changes = diff_components(old["components"], components)
                refused = [c for c in changes if may_change is None or not may_change(c.split(":", 1)[0])]
                if refused:
                    allowed = "" if may_change is None else (
                        "\n--retry-errors may change how prompts are built and sampled, not these keys: they decide "
                        "which rows a shard holds or which columns the output has.")
                    raise SpecError(
                        f"output dir {self.root} holds a job whose outputs would differ from this one:\n  "
                        + "\n  ".join(refused) + allowed
                        + "\nUse --overwrite to discard its outputs, or choose a new output.dir.")
                log.warning("--retry-errors: the error rows are generated again with a changed spec (the rows "
                            "committed without error keep their outputs):\n  %s", "\n  ".join(changes))
                new["replaced"] = [*old.get("replaced", []), old["fingerprint"]]
        elif self.parts():
            raise SpecError(f"output dir {self.root} holds Parquet parts from another tool or an unknown job; "
                            "use --overwrite or a new output.dir")
        self.write_bytes(job, json.dumps(new, indent=2, default=str).encode())

    def clear(self) -> None:
        """--overwrite: the records that name parts go first (manifest, job record, complete mark, summary), then
        the parts: an overwrite cut short never leaves a manifest that names missing parts."""
        self.remove(self.list(self.manifest_dir)
                    + [p for p in (self.join("_batchrun", "job.json"), self.join("_batchrun", "complete.json"),
                                   self.join("_summary.json")) if self.read_bytes(p) is not None])
        self.remove(self.parts() + self.list(self.tmp) + self.list(self.runs_dir))

    def parts(self) -> list[str]:
        return self.list(self.path, prefix="part-", suffix=".parquet")

    def part_path(self, shard_id: int) -> str:
        return self.join(f"part-{shard_id:06d}.parquet")

    def write_text(self, name: str, text: str) -> str:
        """A file at the top of the output dir (the summary). Returns its path or URL."""
        return self.write_bytes_named(name, text.encode())

    def write_bytes_named(self, name: str, data: bytes) -> str:
        self.write_bytes(self.join(name), data)
        return self.join(name) if self.local else f"{self.protocol}://{self.join(name)}"

    # ------------------------------------------------------------ lock

    def acquire_lock(self, run_id: str, break_lock: bool = False) -> None:
        if not self.local:
            return self._acquire_remote(run_id, break_lock)
        lock = self.join("_batchrun", "lock.json")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(), "run_id": run_id}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read_json(lock) or {}
                if break_lock or self._is_stale(holder):
                    self.remove([lock])
                    continue
                raise self._locked(holder) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return
        raise OutputLocked(f"could not take the lock on {self.root}")

    def _locked(self, holder: dict) -> OutputLocked:
        renewed = " (its lease was renewed while this driver watched it)" if "lease_s" in holder else ""
        return OutputLocked(
            f"output dir {self.root} is in use by another run (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {time.ctime(holder.get('started_at', 0))}){renewed}. If that run is gone, "
            "re-run with --break-lock.")

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        """Local: a lock from this host whose process is gone (or is another program now) is stale. Object store
        (for `batchrun status` only: a driver taking the lock watches it instead, see _wait_for_lapse): a lease whose
        `renewed_at` is older than its lease time by this host's clock."""
        if "lease_s" in holder:
            return time.time() - holder.get("renewed_at", 0) > holder["lease_s"]
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another host's processes: only --break-lock breaks it
        pid = holder.get("pid")
        try:
            proc = psutil.Process(pid)
            return proc.create_time() > holder.get("started_at", 0) + 1  # pid reused by a newer process
        except (psutil.NoSuchProcess, TypeError, ValueError):
            return True

    # Object stores have no O_EXCL file that dies with its process, and an overwrite conditional on the old
    # version is not offered by every store through fsspec. So the lock is a sequence of lock-NNNNNN.json objects,
    # each created exclusively: the holder is the newest, a new driver takes a lapsed lease over by creating the
    # next number (two drivers racing for it: one create wins), and a holder that finds a newer number has lost it.
    def _remote_locks(self) -> list[str]:
        return self.list(self.meta, prefix="lock-", suffix=".json")

    def _acquire_remote(self, run_id: str, break_lock: bool) -> None:
        for _ in range(3):
            locks = self._remote_locks()
            if locks and not break_lock:
                self._wait_for_lapse(locks[-1])  # raises OutputLocked while its driver renews it
                locks = self._remote_locks()
            number = name_number(locks[-1]) + 1 if locks else 1
            path = self.join("_batchrun", f"lock-{number:06d}.json")
            if self.create(path, self._lock_body(run_id, time.time())):
                self._lock_path = path
                self.remove(locks)  # older leases: lapsed or broken
                self._stop_renew.clear()
                threading.Thread(target=self._renew, args=(run_id,), name="batchrun-lock", daemon=True).start()
                return
        raise OutputLocked(f"could not take the lock on {self.root}: other drivers keep taking it")

    def _wait_for_lapse(self, path: str) -> None:
        """A lease has lapsed when its object stays unchanged for a whole lease, timed on this host's clock: the
        holder rewrites it every lease/6 and stops its own run once renewals have failed for half a lease. Never
        judged by comparing the holder's `renewed_at` with this clock (hosts' clocks drift). A renewal seen, or a
        newer lock, means a live holder: refused at once."""
        first = self.read_bytes(path)
        holder = json.loads(first) if first else {}
        lease = float(holder.get("lease_s", LOCK_LEASE_S))
        if first is not None:
            log.warning("output dir %s is locked by run %s (host %s, pid %s): watching its lease; it is taken over "
                        "if not renewed within %.0fs (--break-lock takes it now)", self.root, holder.get("run_id"),
                        holder.get("host"), holder.get("pid"), lease)
        watched = time.monotonic()
        while first is not None and (left := lease - (time.monotonic() - watched)) > 0:
            time.sleep(min(left, lease / 12))
            locks = self._remote_locks()
            if not locks:
                return  # released meanwhile
            now = self.read_bytes(path) if locks[-1] == path else None
            if now != first:
                raise self._locked(json.loads(now) if now else self.read_json(locks[-1]) or holder)

    def _lock_body(self, run_id: str, started_at: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at,
                           "renewed_at": time.time(), "lease_s": LOCK_LEASE_S, "run_id": run_id}).encode()

    def _renew(self, run_id: str) -> None:
        renewed, started_at = time.monotonic(), time.time()
        while not self._stop_renew.wait(LOCK_LEASE_S / 6):
            try:
                newest = self._remote_locks()
                if newest and newest[-1] != self._lock_path:
                    self.lock_lost = f"another driver took the lock over ({newest[-1].rsplit('/', 1)[-1]})"
                    return
                self.write_bytes(self._lock_path, self._lock_body(run_id, started_at))
                renewed = time.monotonic()
            except Exception as e:  # a failed renewal is retried; the lease is long enough for several
                if time.monotonic() - renewed > LOCK_LEASE_S / 2:  # before a taker may judge it lapsed: stop
                    self.lock_lost = (f"the lock could not be renewed for {time.monotonic() - renewed:.0f}s "
                                      f"({type(e).__name__}: {e}); another driver may take it over")
                    return

    def release_lock(self, run_id: str) -> None:
        if not self.local:
            self._stop_renew.set()
            if self._lock_path and not self.lock_lost:
                self.remove([self._lock_path])
            self._lock_path = None
            return
        lock = self.join("_batchrun", "lock.json")
        if (self.read_json(lock) or {}).get("run_id") == run_id:
            self.remove([lock])

    def lock_holder(self) -> dict | None:
        """Who holds the run lock, or None (an object-store lease that lapsed counts as none)."""
        if self.local:
            holder = self.read_json(self.join("_batchrun", "lock.json"))
            return holder if holder and not self._is_stale(holder) else None  # a SIGKILLed driver's lock is left
        locks = self._remote_locks()
        holder = self.read_json(locks[-1]) if locks else None
        return holder if holder and not self._is_stale(holder) else None

    # ------------------------------------------------------------ manifest

    def entries(self) -> dict[int, ManifestEntry]:
        return self._merged(self.list(self.manifest_dir, suffix=".parquet"))

    def _merged(self, segments: list[str]) -> dict[int, ManifestEntry]:
        out: dict[int, ManifestEntry] = {}
        for data in self._read_all(segments).values():
            merge_entries(read_segment(data), out)
        return out

    def _read_all(self, paths: list[str]) -> dict[str, bytes]:
        if not paths:
            return {}
        if self.local:
            return {p: d for p in paths if (d := self.read_bytes(p)) is not None}
        # concurrent GETs; only "not found" (a segment merged away meanwhile) may be skipped: any other error is
        # retried, then fails the read (a manifest read that drops entries would make a clean end record too few)
        got = self.fs.cat(paths, on_error="return")
        out = {}
        for p, d in got.items():
            if isinstance(d, FileNotFoundError):
                continue
            if isinstance(d, BaseException):
                d = self.read_bytes(p)  # retried one by one
                if d is None:
                    continue
            out[p] = d
        return out

    def committed(self) -> dict[int, ManifestEntry]:
        return {e.shard_id: e for e in committed_only(self.entries().values())}

    def job(self) -> dict:
        """The job's fingerprint and components (job.json), or {} before its first run."""
        return self.read_json(self.join("_batchrun", "job.json")) or {}

    def write_run(self, record: dict) -> None:
        self.write_bytes(self.join("_batchrun", "runs", f"{record['run_id']}.json"), json.dumps(record).encode())

    def runs(self) -> list[dict]:
        """Every run's cost record, oldest first."""
        records = [json.loads(d) for d in self._read_all(self.list(self.runs_dir, suffix=".json")).values()]
        return sorted(records, key=lambda r: r.get("started_at", 0))

    def append_entries(self, entries: list[ManifestEntry], run_id: str, seq: int) -> None:
        """One segment of entries (the queue's batch of commits and quarantines)."""
        if entries:
            self.write_bytes(self.join("_batchrun", "manifest", f"{run_id}-{seq:06d}.parquet"),
                             segment_bytes(entries))

    def compact(self, run_id: str, keep_quarantined: bool = True, only_run: bool = False,
                override: dict[int, ManifestEntry] | None = None) -> dict[int, ManifestEntry]:
        """Merge every segment into one (under the run lock; only_run: just this run's own segments, which the queue
        does while the run goes on, so that readers never face thousands of them). A segment written meanwhile is
        not deleted: only the ones read are, after the merged one is in place. keep_quarantined=False drops
        quarantined entries: a re-run retries those shards. override: entries that replace the merged ones (the
        footers of replaced parts, read after the last writer is gone). Returns the merged entries."""
        paths = self.list(self.manifest_dir, prefix=f"{run_id}-" if only_run else "", suffix=".parquet")
        merged = self._merged(paths)
        entries = merged if keep_quarantined else {s: e for s, e in merged.items() if e.state == "committed"}
        if override:
            entries = {**entries, **override}
        if len(paths) > 1 or len(entries) != len(merged) or override:
            name = self.join("_batchrun", "manifest", f"{run_id}-c{time.time_ns()}.parquet")
            self.write_bytes(name, segment_bytes(sorted(entries.values(), key=lambda e: e.shard_id)))
            self.remove([p for p in paths if p != name])
        return entries

    # A run that ended cleanly leaves the number of committed shards in complete.json: every part has its manifest
    # entry then, and the next start need not list the parts (on an object store, one LIST per 1,000 of them). A
    # start takes the mark away before any work, so a run that dies leaves none and the next start reconciles.
    def mark_complete(self, committed: int) -> None:
        self.write_bytes(self.join("_batchrun", "complete.json"), json.dumps({"committed": committed}).encode())

    def take_complete_mark(self) -> int | None:
        mark = self.read_json(self.join("_batchrun", "complete.json"))
        if mark is not None:
            self.remove([self.join("_batchrun", "complete.json")])
        return (mark or {}).get("committed")

    def reconcile(self, known: dict | set, run_id: str) -> dict[int, ManifestEntry]:
        """Add manifest entries for parts committed just before a crash (their segment was never written), from the
        parts' own footers. `known`: the shard ids the manifest has."""
        missing = [p for p in self.parts() if name_number(p) not in known]
        rebuilt = [e for e in map(self._footer_entry, missing) if e is not None]
        self.append_entries(rebuilt, run_id, 999999)
        return {e.shard_id: e for e in rebuilt}

    def read_part(self, shard_id: int) -> pa.Table:
        """A committed part, whole (its footer's entry in the schema metadata): what `--retry-errors` starts from."""
        path = self.part_path(shard_id)
        if self.local:
            return pq.read_table(path)
        return pq.read_table(pa.BufferReader(retried(lambda: self.fs.cat_file(path), f"read {path}")))

    def part_entry(self, shard_id: int) -> ManifestEntry | None:
        """The manifest entry a committed part carries in its footer, or None."""
        return self._footer_entry(self.part_path(shard_id))

    def _footer_entry(self, part: str) -> ManifestEntry | None:
        def read_meta():
            with self.open(part) as fh:
                return pq.read_schema(fh).metadata or {}

        try:
            meta = read_meta() if self.local else retried(read_meta, f"read the footer of {part}")
        except FileNotFoundError:
            return None
        return entry_in(meta)

    def clean_tmp(self) -> None:
        """Temp files of dead attempts (local only): safe to delete because this run holds the lock."""
        if self.local:
            self.remove(self.list(self.tmp))
            os.makedirs(self.tmp, exist_ok=True)

    # ------------------------------------------------------------ parts

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
        final = self.part_path(entry.shard_id)
        if self.local:  # write to a temp file and link it: no copy of the part in memory
            tmp = f"{self.tmp}/{entry.shard_id:06d}.{entry.worker}.{entry.attempt}.{os.getpid()}.parquet"
            pq.write_table(table, tmp, compression=compression)
            if entry.revision:
                os.replace(tmp, final)
                return True
            return self._link(tmp, final)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression=compression)
        if entry.revision:
            self.write_bytes(final, buf.getvalue().to_pybytes())
            return True
        return self.create(final, buf.getvalue().to_pybytes())
