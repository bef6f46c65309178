"""An engine that dies inside a live worker (README, failure model): its rows are never committed as error rows, its
shards go back at once and are finished by a replacement, every row exactly once. Each engine, on a real local Ray
cluster: a test engine that raises EngineDead, one that flattens its death into per-request errors (the worker's
safety net), the TensorRT-LLM double's executor death (UPSTREAM.md E1-E4), transformers' continuous batching loop
dying mid-shard, and one HF tensor-parallel rank killed mid-shard."""

from __future__ import annotations

import collections
import threading
import time

import psutil
import pyarrow as pa
import pytest

from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from batchrun.store.output import OutputDir
from tests.conftest import read_output, write_parquet
from tests.procs import pids_where

pytestmark = pytest.mark.slow


def run_job(tmp_path, engine: dict, rows: int = 100, rows_per_shard: int = 10, workers: int = 2, **extra) -> dict:
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(rows)),
                                                     "prompt": [f"{i}+{i % 7}= a b c d" for i in range(rows)]}))
    raw = {"engine": engine, "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
           "sampling": {"max_tokens": 4}, "output": {"dir": str(tmp_path / "out")},
           "resources": {"num_workers": workers}, "shards": {"rows_per_shard": rows_per_shard}, **extra}
    return JobRunner(validate_spec(raw), show_progress=False).run().summary


def assert_every_row_once_and_no_engine_error(tmp_path, rows: int = 100) -> pa.Table:
    table = read_output(tmp_path / "out")
    counts = collections.Counter(table.column("id").to_pylist())
    assert sorted(counts) == list(range(rows)) and set(counts.values()) == {1}
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    assert errors == [], errors[:3]
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    return table


def assert_one_engine_death(summary: dict) -> None:
    assert summary["status"] == "succeeded" and summary["error_rows"] == 0
    assert summary["engine_deaths"] == 1 and summary["worker_restarts"] == 1
    assert summary["shards_quarantined"] == {}
    entries = OutputDir(summary["output_dir"]).manifest.entries()
    assert all(e.error_rows == 0 for e in entries.values())


@pytest.mark.parametrize("as_error_rows", [False, True], ids=["raises", "error-rows-safety-net"])
def test_engine_death_mid_shard_commits_nothing_from_it(tmp_path, ray_cluster, as_error_rows):
    summary = run_job(tmp_path, {"name": "tests.engines:DyingEcho",
                                 "options": {"die_after": 25, "as_error_rows": as_error_rows,
                                             "once": str(tmp_path / "died")}})
    assert (tmp_path / "died").exists()
    assert_one_engine_death(summary)
    assert_every_row_once_and_no_engine_error(tmp_path)


def test_trtllm_executor_death_is_not_error_rows(tmp_path, ray_cluster, demo_model):
    """The double's executor dies as upstream's does (E1-E3: the background error raised once, then shutdown, later
    generate_async calls refused, in-flight results raise); a per-request RequestError stays an error row."""
    from tests.test_trtllm import model_with_knobs

    model = model_with_knobs(tmp_path, demo_model, die_after=23, die_once=str(tmp_path / "died"))
    prompts = ["FAILREQ" if i == 5 else f"{i}+1=" for i in range(100)]
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(100)), "prompt": prompts}))
    spec = validate_spec({
        "engine": {"name": "trtllm", "model": str(model), "max_in_flight": 8},
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
        "sampling": {"max_tokens": 3}, "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 10},
    })
    summary = JobRunner(spec, show_progress=False).run().summary
    assert (tmp_path / "died").exists()
    assert summary["engine_deaths"] == 1 and summary["error_rows"] == 1  # row 5: the request's own error
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == list(range(100))
    assert rows[5]["finish_reason"] == "error" and "rejected" in rows[5]["error"]
    assert [i for i, r in rows.items() if r["error"] is not None] == [5]


def test_hf_generation_loop_dying_mid_shard(tmp_path, ray_cluster, demo_model):
    """transformers fails every request of a dying loop with the loop's exception (_handle_critical_error): those
    are the engine's failure; the shards are finished by a replacement."""
    summary = run_job(tmp_path, {"name": "tests.engines:DyingHF", "model": str(demo_model), "dtype": "float32",
                                 "options": {"die_after": 6, "once": str(tmp_path / "died")}}, rows=60)
    assert (tmp_path / "died").exists()
    assert_one_engine_death(summary)
    assert_every_row_once_and_no_engine_error(tmp_path, rows=60)


def test_hf_tensor_parallel_rank_killed_mid_shard(tmp_path, ray_cluster, demo_model):
    """One of the two ranks of a TP=2 engine is SIGKILLed while the job runs: the engine is dead, its shards are
    finished by a replacement worker with two new ranks."""
    box: dict = {}
    done = threading.Event()

    def run():
        try:
            box["summary"] = run_job(tmp_path, {"name": "hf", "model": str(demo_model), "dtype": "float32",
                                                "tensor_parallel_size": 2}, rows=120, rows_per_shard=10, workers=1,
                                     sampling={"max_tokens": 24})
        finally:
            done.set()

    t = threading.Thread(target=run)
    t.start()
    killed = None
    deadline = time.time() + 300
    while not done.is_set() and time.time() < deadline:  # once the first part is committed, kill rank 1
        if list((tmp_path / "out").glob("part-*.parquet")):
            ranks = sorted(pids_where(lambda cmd: "mpi4py.futures" in cmd))
            if len(ranks) == 2:
                killed = ranks[-1]
                psutil.Process(killed).kill()
                break
        time.sleep(0.05)
    t.join(timeout=600)
    assert killed is not None, "the job ended before a rank could be killed"
    summary = box["summary"]
    assert summary["worker_restarts"] == 1 and summary["error_rows"] == 0, summary.get("engine_deaths")
    assert_every_row_once_and_no_engine_error(tmp_path, rows=120)
