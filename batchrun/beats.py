"""One heartbeat a node: a job's workers on one machine each write their latest heartbeat to a node-local directory,
and one of them, whichever holds the directory's lock, sends all the fresh ones to the queue in one call. When that
worker ends or dies the OS drops its lock and the next worker to try takes it over. At 10,000 GPUs (1,250 nodes of 8)
the queue's one thread takes one heartbeat call per node instead of one per worker (bench/RESULTS.md, scale).

A worker that dies stops writing: its last heartbeat ages out of what the sender forwards (each forwarded with its
age, so the queue dates it from when the worker wrote it), and its leases expire as if it had heartbeated itself.
The files are JSON (never pickle: the directory is under the machine's temp dir), one per worker, replaced whole.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from batchrun.records import WorkerStats

DRAINING = "draining"  # the file the sender touches when the queue answers that the job is draining
KEEP_S = 86400.0  # other runs' directories untouched for this long are removed (a long-lived node runs many jobs)


class NodeBeats:
    """This worker's side of its node's heartbeat (see the module's docstring)."""

    def __init__(self, run_id: str, worker: str, root: str | None = None):
        base = Path(root or tempfile.gettempdir()) / f"batchrun-beats-{os.getuid()}"
        self.dir = base / (run_id or "run")
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _prune(base, keep=self.dir)
        except OSError:  # a temp dir that cannot be written: post() says so, and the worker heartbeats alone
            pass
        self.worker = worker
        self._lock_fd: int | None = None

    def post(self, payload: tuple) -> bool:
        """This worker's latest heartbeat (node, pid, stats, held), for the node's sender; written whole (a reader
        never sees half of one). False if the directory cannot be written (a full or read-only temp dir): the worker
        then heartbeats the queue itself."""
        node, pid, stats, held = payload
        data = {"at": time.time(), "node": node, "pid": pid, "stats": dataclasses.asdict(stats), "held": list(held)}
        tmp = self.dir / f".{self.worker}.tmp"
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.dir / f"{self.worker}.beat")
        except OSError:
            return False
        return True

    def lead(self) -> bool:
        """Whether this worker sends the node's heartbeats: it holds the lock, or takes it now (never waits)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.dir / "sender.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def collect(self, fresh_s: float) -> list[tuple]:
        """The heartbeats written within fresh_s, as ShardQueue.heartbeats takes them: (worker, (node, pid, stats,
        held), age_s). An older one is left out: its worker stopped (it died or hangs) and its leases must lapse."""
        now, beats = time.time(), []
        for path in self.dir.glob("*.beat"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):  # removed meanwhile (its worker ended)
                continue
            age = max(0.0, now - data["at"])
            if age <= fresh_s:
                stats = WorkerStats(**data["stats"])
                beats.append((path.stem, (data["node"], data["pid"], stats, tuple(data["held"])), age))
        return beats

    def set_draining(self) -> None:
        try:
            (self.dir / DRAINING).touch()
        except OSError:  # the sender itself drains anyway; the others learn it from their next lease
            pass

    def draining(self) -> bool:
        return (self.dir / DRAINING).exists()  # False where the directory is unreadable

    def close(self) -> None:
        """This worker stops heartbeating: its file goes, and the lock if it held it (another worker takes over)."""
        try:
            (self.dir / f"{self.worker}.beat").unlink(missing_ok=True)
        except OSError:  # the directory was never there
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _prune(base: Path, keep: Path) -> None:
    """Best effort: remove the directories of runs long over (each leaves its lock file and a flag)."""
    old = time.time() - KEEP_S
    for run in base.iterdir():
        try:
            if run != keep and run.stat().st_mtime < old:
                for f in run.iterdir():
                    f.unlink()
                run.rmdir()
        except OSError:  # another worker pruned it first, or it is in use again
            continue
