"""Shared prompt prefixes grouped across the whole input (`shards.group_prefixes: true`).

An engine with prefix reuse computes a shared prefix once only while a row that shares it is close behind: in the
worker's window (the in-window schedule, engine_loop.py), or soon enough that the prefix's KV blocks are still
cached. Rows that share a long prefix but lie far apart in the input (questions about documents, shuffled) get none
of it. Grouping puts them next to each other before the plan is cut: the input is read a window of rows at a time,
each window's rows sorted by their prompt's first `group_key_chars` characters (stable: ties keep input order), and
written as one Parquet file under the output dir (`_batchrun/grouped/<key>/`). The plan's shards are then ranges of
those files, so siblings land in the same shard, on the same worker, one after another.

What the job produces is unchanged: every input row once, with its own id (a job without `input.id_column` keeps
each row's position in the input as its `row_index`), and its own seed (row_seed: derived from the id). Only which
shard holds which rows changes, so the key is part of the job's fingerprint. The copy is built once, before any
work, in the driver (memory: about one window's rows), and reused by every rerun of the same job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
    source, builder = open_source(spec.input), PromptBuilder(spec.input)
    if store.local:
        os.makedirs(root, exist_ok=True)
    files, rows = [], []
    for i, part in enumerate(cut_shards(plan.unit_rows, window)):
        table = read_shard(source, plan.units, part, list(plan.columns))
        table = table.append_column(ROW, pa.array(np.arange(part.row_start, part.row_start + part.num_rows)))
        keys = prompt_keys(builder, table, spec.shards.group_key_chars)
        order = pc.sort_indices(pa.table({"key": keys, "row": table.column(ROW)}),
                                sort_keys=[("key", "ascending"), ("row", "ascending")])
        buf = io.BytesIO()
        pq.write_table(table.take(order), buf, row_group_size=spec.rows_per_shard * 16, compression="zstd")
        name = f"window-{i:06d}.parquet"
        store.write_bytes(f"{root}/{name}", buf.getvalue())
        files.append(name)
        rows.append(part.num_rows)
    done = {"files": files, "rows": rows}
    store.write_bytes(f"{root}/{DONE}", json.dumps(done).encode())
    return done


def prompt_keys(builder: PromptBuilder, table: pa.Table, chars: int) -> pa.Array:
    """Each row's sort key: the first `chars` characters of its prompt (a chat's messages as JSON, in order: the
    chat template renders them in that order, so a shared first message is a shared rendered prefix). A row whose
    prompt cannot be built sorts first, with an empty key (it becomes an error row as it would have anyway)."""
    prompts = builder.build(table)
    keys = [("" if p is None else p if isinstance(p, str) else json.dumps(p, ensure_ascii=False))[:chars]
            for p in prompts.texts]
    return pa.array(keys, pa.large_string())
