"""The store under an output dir: a local (or shared) filesystem or an object store (s3://, gs://), through one
set of small operations. Each does one request where it can, retries a store's transient errors (`retried`), and
treats "not found" and "exists" as answers. `create` is the primitive the exactly-once commit rests on."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from batchrun.errors import SpecError

log = logging.getLogger("batchrun.store")

# Object stores with an exclusive create that fsspec exposes as pipe_file(mode="create"): s3fs sends
# If-None-Match: * (s3fs/core.py _pipe_file, botocore >= 1.35.20), gcsfs ifGenerationMatch=0 (gcsfs/core.py
# simple_upload). fsspec's generic fallback (exists() then write) is not atomic, so other protocols are refused.
CREATE_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}
LISTS = 32  # listings of key prefixes at once (list_prefixes)

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


def name_number(path: str) -> int:
    """The number in part-000012.parquet or lock-000003.json (the shard id, the lock's sequence)."""
    return int(path.rsplit("-", 1)[1].split(".")[0])



class Store:
    """An output dir's root on its filesystem. Internal names start with "_" so that readers skip them."""

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

    def join(self, *names: str) -> str:
        return "/".join([self.path, *names])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

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
            return self.link(tmp, path)
        try:
            retried(lambda: self.fs.pipe_file(path, data, mode="create"), f"create {path}")
            return True
        except FileExistsError:  # also a retry whose earlier PUT landed: the caller tells its own copy apart
            return False

    def link(self, tmp: str, final: str) -> bool:
        """Local: give a complete temp file its final name, only if no file has that name (the local commit)."""
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

    def list_prefixes(self, path: str, prefixes: list[str], suffix: str = "") -> list[str]:
        """Names directly under `path` that start with any of `prefixes`, listed LISTS at a time on an object store
        (a store lists 1,000 keys a request, one request after the other: a million keys is a thousand in a row)."""
        if self.local:
            return [p for p in self.list(path, suffix=suffix) if p.rsplit("/", 1)[-1].startswith(tuple(prefixes))]

        def one(prefix: str) -> list[str]:
            try:
                return retried(lambda: self.fs.find(path, maxdepth=1, prefix=prefix), f"list {path}/{prefix}*")
            except FileNotFoundError:
                return []

        self.fs.invalidate_cache(path)  # s3fs answers a prefix listing from a cached full one
        with ThreadPoolExecutor(max_workers=LISTS) as pool:
            found = {p.rstrip("/") for names in pool.map(one, prefixes) for p in names}
        return sorted(p for p in found if p.endswith(suffix) and p.rsplit("/", 1)[-1].startswith(tuple(prefixes)))

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

    def read_all(self, paths: list[str]) -> dict[str, bytes]:
        """Many small objects at once (concurrent GETs on a store); those not found are left out."""
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

    def write_text(self, name: str, text: str) -> str:
        """A file at the top of the output dir (the summary). Returns its path or URL."""
        return self.write_bytes_named(name, text.encode())

    def write_bytes_named(self, name: str, data: bytes) -> str:
        self.write_bytes(self.join(name), data)
        return self.join(name) if self.local else f"{self.protocol}://{self.join(name)}"

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

    def clean_tmp(self) -> None:
        """Temp files of dead attempts (local only): safe to delete because this run holds the lock."""
        if self.local:
            self.remove(self.list(self.tmp))
            os.makedirs(self.tmp, exist_ok=True)
