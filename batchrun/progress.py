"""Driver progress: a tqdm bar on a terminal; plain periodic lines otherwise (readable under `ray job logs -f`)."""

from __future__ import annotations

import sys
import time

from batchrun.records import Snapshot


class ProgressBar:
    def __init__(self, total: int, enabled: bool = True, interval_s: float = 10.0):
        self.total, self.enabled, self.interval_s = total, enabled, interval_s
        self.tty = sys.stderr.isatty()
        self.start = time.time()
        self.last_line = 0.0
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, smoothing=0.1)
        self.done = 0

    def update(self, snap: Snapshot) -> None:
        if not self.enabled:
            return
        rows = snap.rows_done
        gen = sum(w.generated_tokens for w in snap.workers.values())
        elapsed = max(time.time() - self.start, 1e-9)
        info = (f"shards {snap.shards_done}/{snap.shards_total} running {snap.shards_running} "
                f"quarantined {snap.shards_quarantined} | {gen / elapsed:,.0f} gen tok/s")
        if self.bar is not None:
            self.bar.update(rows - self.done)
            self.bar.set_postfix_str(info, refresh=False)
        elif time.time() - self.last_line >= self.interval_s or (rows == self.total and self.done != rows):
            rate = (rows - snap.rows_skipped) / elapsed  # this run's rows: resumed shards are not throughput
            eta = f"ETA {(self.total - rows) / rate:,.0f}s" if rate > 0 else "ETA after the first shard"
            print(f"[batchrun] rows {rows}/{self.total} ({rows / max(self.total, 1):.0%}) "
                  f"{rate:,.0f} rows/s since start {eta} | {info}", file=sys.stderr, flush=True)
            self.last_line = time.time()
        self.done = rows

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
