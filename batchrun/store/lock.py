"""The run lock: one driver per output dir at a time.

Local (or shared) filesystem: `_batchrun/lock.json`, created with O_EXCL; it is stale when its process is gone (same
host only; another host's lock is broken with --break-lock). Object store: a lease, renewed by a thread while the
driver runs; a driver that finds the lock held watches it for a whole lease on its own clock and takes it over only
if it was never renewed meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import psutil

from batchrun.errors import OutputLocked
from batchrun.store.fs import Store, name_number

log = logging.getLogger("batchrun.store")
LOCK_LEASE_S = 120.0  # an object-store lock not renewed for this long belongs to a driver that is gone


class RunLock:
    def __init__(self, store: Store):
        self.store = store
        self._lock_path: str | None = None  # object store: the lock object this driver holds
        self._stop_renew = threading.Event()
        self.lost: str | None = None  # object store: set when another driver took the lock over

    def acquire(self, run_id: str, break_lock: bool = False) -> None:
        if not self.store.local:
            return self._acquire_remote(run_id, break_lock)
        lock = self.store.join("_batchrun", "lock.json")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(), "run_id": run_id}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.store.read_json(lock) or {}
                if break_lock or self._is_stale(holder):
                    self.store.remove([lock])
                    continue
                raise self._locked(holder) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return
        raise OutputLocked(f"could not take the lock on {self.store.root}")

    def _locked(self, holder: dict) -> OutputLocked:
        renewed = " (its lease was renewed while this driver watched it)" if "lease_s" in holder else ""
        return OutputLocked(
            f"output dir {self.store.root} is in use by another run (host {holder.get('host')}, pid "
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
    def _remote(self) -> list[str]:
        return self.store.list(self.store.meta, prefix="lock-", suffix=".json")

    def _acquire_remote(self, run_id: str, break_lock: bool) -> None:
        for _ in range(3):
            locks = self._remote()
            if locks and not break_lock:
                self._wait_for_lapse(locks[-1])  # raises OutputLocked while its driver renews it
                watched, locks = locks[-1], self._remote()
                if locks and locks[-1] != watched:  # another taker won the lapsed lease while this one watched
                    raise self._locked(self.store.read_json(locks[-1]) or {})
            number = name_number(locks[-1]) + 1 if locks else 1
            path = self.store.join("_batchrun", f"lock-{number:06d}.json")
            if self.store.create(path, self._lock_body(run_id, time.time())):
                self._lock_path = path
                self.store.remove(locks)  # older leases: lapsed or broken
                self._stop_renew.clear()
                threading.Thread(target=self._renew, args=(run_id,), name="batchrun-lock", daemon=True).start()
                return
        raise OutputLocked(f"could not take the lock on {self.store.root}: other drivers keep taking it")

    def _wait_for_lapse(self, path: str) -> None:
        """A lease has lapsed when its object stays unchanged for a whole lease, timed on this host's clock: the
        holder rewrites it every lease/6 and stops its own run once renewals have failed for half a lease. Never
        judged by comparing the holder's `renewed_at` with this clock (hosts' clocks drift). A renewal seen, or a
        newer lock, means a live holder: refused at once."""
        first = self.store.read_bytes(path)
        holder = json.loads(first) if first else {}
        lease = float(holder.get("lease_s", LOCK_LEASE_S))
        if first is not None:
            log.warning("output dir %s is locked by run %s (host %s, pid %s): watching its lease; it is taken over "
                        "if not renewed within %.0fs (--break-lock takes it now)", self.store.root,
                        holder.get("run_id"), holder.get("host"), holder.get("pid"), lease)
        watched = time.monotonic()
        while first is not None and (left := lease - (time.monotonic() - watched)) > 0:
            time.sleep(min(left, lease / 12))
            locks = self._remote()
            if not locks:
                return  # released meanwhile
            now = self.store.read_bytes(path) if locks[-1] == path else None
            if now != first:
                raise self._locked(json.loads(now) if now else self.store.read_json(locks[-1]) or holder)

    def _lock_body(self, run_id: str, started_at: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at,
                           "renewed_at": time.time(), "lease_s": LOCK_LEASE_S, "run_id": run_id}).encode()

    def _renew(self, run_id: str) -> None:
        renewed, started_at = time.monotonic(), time.time()
        while not self._stop_renew.wait(LOCK_LEASE_S / 6):
            try:
                newest = self._remote()
                if newest and newest[-1] != self._lock_path:
                    self.lost = f"another driver took the lock over ({newest[-1].rsplit('/', 1)[-1]})"
                    return
                self.store.write_bytes(self._lock_path, self._lock_body(run_id, started_at))
                renewed = time.monotonic()
            except Exception as e:  # a failed renewal is retried; the lease is long enough for several
                if time.monotonic() - renewed > LOCK_LEASE_S / 2:  # before a taker may judge it lapsed: stop
                    self.lost = (f"the lock could not be renewed for {time.monotonic() - renewed:.0f}s "
                                      f"({type(e).__name__}: {e}); another driver may take it over")
                    return

    def release(self, run_id: str) -> None:
        if not self.store.local:
            self._stop_renew.set()
            if self._lock_path and not self.lost:
                self.store.remove([self._lock_path])
            self._lock_path = None
            return
        lock = self.store.join("_batchrun", "lock.json")
        if (self.store.read_json(lock) or {}).get("run_id") == run_id:
            self.store.remove([lock])

    def holder(self) -> dict | None:
        """Who holds the run lock, or None (an object-store lease that lapsed counts as none)."""
        if self.store.local:
            holder = self.store.read_json(self.store.join("_batchrun", "lock.json"))
            return holder if holder and not self._is_stale(holder) else None  # a SIGKILLed driver's lock is left
        locks = self._remote()
        holder = self.store.read_json(locks[-1]) if locks else None
        return holder if holder and not self._is_stale(holder) else None
