"""Shared prompt prefixes grouped across the whole input (`shards.group_prefixes: true`).

An engine with prefix reuse computes a shared prefix once only while a row that shares it is close behind: in the
worker's window (the in-window schedule, engine_loop.py), or soon enough that the prefix's KV blocks are still
cached. Rows that share a long prefix but lie far apart in the input (questions about documents, shuffled) get none
of it. Grouping puts them next to each other before the plan is cut: the input is read a window of rows at a time,
each window's rows sorted by their prompt's first `group_key_chars` characters (stable: ties keep input order), and
written as one Parquet file under the output dir (`_batchrun/grouped/<key>/`), each window a Ray task of its own
(many at once across the cluster; in the calling process when Ray is not running). The plan's shards are then ranges of
those files, so siblings land in the same shard, on the same worker, one after another.

What the job produces is unchanged: every input row once, with its own id (a job without `input.id_column` keeps
each row's position in the input as its `row_index`), and its own seed (row_seed: derived from the id). Only which
shard holds which rows changes, so the key is part of the job's fingerprint. The copy is built once, before any
shard is leased (memory: about one window's rows a task), and reused by every rerun of the same job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.datapath import INPUT_ROW as ROW
from batchrun.datapath import read_shard
from batchrun.errors import SpecError
from batchrun.plan import Plan, cut_shards
from batchrun.prompts import PromptBuilder
from batchrun.sources import open_source
from batchrun.spec import JobSpec
from batchrun.store.fs import Store

DONE = "_done.json"  # written last: the copy is complete (a crash mid-copy leaves none, and the next start redoes it)


def grouped_plan(spec: JobSpec, plan: Plan, store: Store) -> tuple[Plan, dict]:
    """The plan over the grouped copy of the input (built now unless a complete one is there) and what it cost."""
    if spec.input.streaming:
        raise SpecError("key 'shards.group_prefixes': a streamed dataset (input.streaming) is read in its own "
                        "order; group it before, or set input.streaming: false")
    started = time.time()
    window = -(-spec.shards.group_window_rows // spec.rows_per_shard) * spec.rows_per_shard
    root = store.join("_batchrun", "grouped", _key(spec, plan, window))
    done = store.read_json(f"{root}/{DONE}")
    built = done is None
    if built:
        done = _build(spec, plan, store, root, window)
    units = tuple(f"{root}/{name}" for name in done["files"])
    grouped = Plan(units, tuple(done["rows"]), cut_shards(tuple(done["rows"]), spec.rows_per_shard), plan.columns,
                   reader=root if store.local else f"{store.protocol}://{root}")
    return grouped, {"built": built, "windows": len(units), "seconds": round(time.time() - started, 3)}


def _key(spec: JobSpec, plan: Plan, window: int) -> str:
    """The copy's name: what decides its content (the input, how prompts are built, the window, the key length)."""
    what = {"units": list(plan.units), "rows": list(plan.unit_rows), "input": spec.input.model_dump(),
            "window": window, "chars": spec.shards.group_key_chars}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(spec: JobSpec, plan: Plan, store: Store, root: str, window: int) -> dict:
    if store.local:
        os.makedirs(root, exist_ok=True)
    windows = list(cut_shards(plan.unit_rows, window))
    args = [(spec.model_dump_json(), plan.units, plan.columns, part, f"{root}/window-{part.shard_id:06d}.parquet")
            for part in windows]
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and len(windows) > 1:
        task = ray.remote(num_cpus=1, max_retries=3)(group_window)
        ray.get([task.remote(*a) for a in args])
    else:
        for a in args:
            group_window(*a)
    done = {"files": [a[-1].rsplit("/", 1)[1] for a in args], "rows": [part.num_rows for part in windows]}
    store.write_bytes(f"{root}/{DONE}", json.dumps(done).encode())
    return done


def group_window(spec_json: str, units: tuple[str, ...], columns: tuple[str, ...], part, path: str) -> None:
    """One window of the input, its rows sorted by prompt prefix, written whole to `path` (a rerun of the task
    writes the same bytes)."""
    spec = JobSpec.model_validate_json(spec_json)
    table = read_shard(open_source(spec.input), units, part, list(columns))
    table = table.append_column(ROW, pa.array(np.arange(part.row_start, part.row_start + part.num_rows)))
    keys = prompt_keys(PromptBuilder(spec.input), table, spec.shards.group_key_chars)
    order = pc.sort_indices(pa.table({"key": keys, "row": table.column(ROW)}),
                            sort_keys=[("key", "ascending"), ("row", "ascending")])
    buf = io.BytesIO()
    pq.write_table(table.take(order), buf, row_group_size=spec.rows_per_shard * 16, compression="zstd")
    Store(spec.output.dir).write_bytes(path, buf.getvalue())


def prompt_keys(builder: PromptBuilder, table: pa.Table, chars: int) -> pa.Array:
    """Each row's sort key: the first `chars` characters of its prompt (a chat's messages as JSON, in order: the
    chat template renders them in that order, so a shared first message is a shared rendered prefix). A row whose
    prompt cannot be built sorts first, with an empty key (it becomes an error row as it would have anyway)."""
    prompts = builder.build(table)
    keys = [("" if p is None else p if isinstance(p, str) else json.dumps(p, ensure_ascii=False))[:chars]
            for p in prompts.texts]
    return pa.array(keys, pa.large_string())
