"""`batchrun status --plot`: a shard timeline per worker (lease to commit) and throughput over time, as a PNG.

Idle gaps, stragglers, retries (hatched) and restarts (a new worker row) show at a glance.
"""

from __future__ import annotations

import io
from pathlib import Path

from batchrun.records import committed_only
from batchrun.store.output import OutputDir


def plot_timeline(out: OutputDir, path: Path | None = None, bins: int = 60) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    entries = sorted(out.manifest.entries().list(), key=lambda e: e.started_at)
    if not entries:
        raise ValueError(f"{out.root}: no committed or quarantined shard to plot yet")
    t0 = min(e.started_at for e in entries)
    workers = sorted({e.worker for e in entries})
    fig, (gantt, rate) = plt.subplots(2, 1, figsize=(12, 2 + 0.35 * len(workers) + 3), sharex=True,
                                      gridspec_kw={"height_ratios": [max(2, len(workers)), 3]})
    for e, (lane, lanes) in zip(entries, _lanes(entries)):
        # A worker holds a few shards at once (in the engine, prefetched, being written): one lane each.
        height = 0.8 / lanes
        y = workers.index(e.worker) - 0.4 + height * (lane + 0.5)
        color = "tab:red" if e.state == "quarantined" else "tab:blue"
        gantt.barh(y, e.committed_at - e.started_at, left=e.started_at - t0, height=height * 0.9, color=color,
                   edgecolor="white", hatch="//" if e.attempt > 1 else None)
    gantt.set_yticks(range(len(workers)), [f"{w} ({next(e.node for e in entries if e.worker == w)})" for w in workers])
    name = out.root.rstrip("/").rsplit("/", 1)[-1]
    gantt.set_title(f"{name}: shards per worker (lease -> commit; hatched = retry, red = quarantined)")
    committed = committed_only(entries)
    end = max(e.committed_at for e in entries) - t0
    width = max(end / bins, 1e-3)
    counts = [0.0] * (bins + 1)
    for e in committed:
        counts[min(int((e.committed_at - t0) / width), bins)] += e.rows
    rate.plot([i * width for i in range(bins + 1)], [c / width for c in counts], drawstyle="steps-post")
    rate.set_ylabel("rows/s committed")
    rate.set_xlabel("seconds since the first lease")
    fig.tight_layout()
    if path is None:  # next to the output, also on an object store
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        plt.close(fig)
        return out.write_bytes_named("_timeline.png", buf.getvalue())
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _lanes(entries) -> list[tuple[int, int]]:
    """(lane, lanes of its worker) per entry: overlapping shards of one worker go to separate lanes."""
    ends: dict[str, list[float]] = {}
    lane_of = []
    for e in entries:
        lanes = ends.setdefault(e.worker, [])
        lane = next((i for i, end in enumerate(lanes) if end <= e.started_at), len(lanes))
        if lane == len(lanes):
            lanes.append(0.0)
        lanes[lane] = e.committed_at
        lane_of.append(lane)
    return [(lane, len(ends[e.worker])) for e, lane in zip(entries, lane_of)]
