"""Process lookups for tests that check nothing is left running (zombies and vanishing processes tolerated)."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil


def pids_where(match: Callable[[str], bool]) -> list[int]:
    """Live processes whose command line satisfies ``match``.

    ``process_iter(["cmdline"])`` leaves ``cmdline`` as None for a zombie, a process that exits mid-scan or one we
    may not read, instead of raising (a bare ``p.cmdline()`` raises ``ZombieProcess`` for a just-reaped child).
    """
    return [p.pid for p in psutil.process_iter(["cmdline"]) if match(" ".join(p.info["cmdline"] or []))]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout: float = 20.0) -> list[int]:
    """Wait until none of ``pids`` runs (a zombie counts as gone); return those still running at the timeout."""
    deadline = time.time() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left
