"""A plain Ray actor that uses batchrun's rank launcher, for the real spawn tests (importable by Ray workers)."""

from __future__ import annotations

import os

from batchrun.engines.mpi import RankPool


class LauncherProbe:
    def __init__(self, visible: str | None = None):
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible  # as Ray sets it for an actor holding GPUs
        self.pool = None

    def spawn(self, n: int, **kw) -> list[dict]:
        gpu_ids = os.environ["CUDA_VISIBLE_DEVICES"].split(",") if os.environ.get("CUDA_VISIBLE_DEVICES") else None
        self.pool = RankPool(n, gpu_ids=gpu_ids, **kw)
        return self.pool.ranks

    def failing_task(self) -> str:
        try:
            self.pool.gather(rank_fail, "rank task exploded", timeout_s=30)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    def close(self) -> None:
        self.pool.close()

    def pid(self) -> int:
        return os.getpid()


def rank_fail(message: str) -> None:
    """Runs on a rank (ranks import it from this module: tests/ is on their PYTHONPATH through Ray's runtime env)."""
    raise RuntimeError(message)
