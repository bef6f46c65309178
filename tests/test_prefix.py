"""Prefix-aware scheduling (batchrun/prefix.py), reuse reporting and cost accounting (batchrun/cost.py).

The scheduler's rules on their own; then real jobs on the demo model through the real HF engine (its cache reports
the prompt tokens it served from shared blocks): reuse happens, outputs do not depend on the schedule, the shard
size or the worker count, and a job's cost adds up over its runs."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pyarrow as pa
import pytest
import yaml

from batchrun.cost import UNIT_WORKER, account, run_record
from batchrun.engines.base import Request, Sampling
from batchrun.prefix import PrefixScheduler
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet

S = Sampling(max_tokens=4)


def req(rid, prefix, tail):
    return Request(rid, "", list(prefix) + list(tail), S)


A, B = list(range(100, 180)), list(range(200, 280))  # two 80-token prefixes


def drain(s: PrefixScheduler) -> list:
    out = []
    while (r := s.next()) is not None:
        out.append(r.request_id)
    return out


def test_scheduler_sends_one_leader_per_prefix_and_holds_siblings_until_prefilled():
    s = PrefixScheduler(True, key_tokens=16)
    s.add([req("a1", A, [1]), req("a2", A, [2]), req("b1", B, [1]), req("short", [5, 6], [7]),
           req("a3", A, [3]), req("b2", B, [2])])
    assert drain(s) == ["a1", "b1", "short"] and len(s) == 3  # siblings wait for their leader
    s.prefilled("b1")
    assert drain(s) == ["b2"]
    s.add([req("b3", B, [3]), req("a4", A, [4])])  # B is warm now: straight through; A still waits
    assert drain(s) == ["b3"]
    s.prefilled("a2")  # not a leader: nothing happens
    assert drain(s) == []
    s.prefilled("a1")
    assert drain(s) == ["a2", "a3", "a4"] and len(s) == 0
    assert s.stats == {"leaders": 2, "held": 4, "direct": 2}


def test_scheduler_off_keeps_input_order():
    s = PrefixScheduler(False, key_tokens=16)
    s.add([req("a1", A, [1]), req("a2", A, [2]), req("b1", B, [1])])
    assert drain(s) == ["a1", "a2", "b1"]


def test_tracker_on_a_transformers_without_the_cache_hooks_turns_reuse_figures_off():
    from batchrun.engines.hf_backend import PrefixTracker

    tracker = PrefixTracker(object())  # no batch_processor.cache.search_prefix_match / mark_complete_blocks
    assert tracker.info() == {"reuse": False, "block_tokens": None} and tracker.take("r") == 0


def test_run_record_and_account_add_up_runs_with_a_price():
    lives = {"w1": {"spawned_at": 100.0, "ended_at": 160.0, "first_submit_at": 110.0, "last_completion_at": 150.0,
                    "initial": True},  # the run started at 95: its first workers start up from there
             "w2": {"spawned_at": 120.0, "ended_at": None, "first_submit_at": None, "last_completion_at": None}}
    r1 = run_record("r1", 2, 2, 95.0, 165.0, lives, 8000, True, 3.0)
    assert r1["gpu_seconds_engine"] == 80.0  # 2 GPUs x 40 s window (w2 never submitted)
    assert r1["gpu_seconds_held"] == 280.0  # 2 workers x 2 GPUs x 70 s wall
    assert r1["gpu_seconds_startup"] == 2 * 15 + 2 * 45  # w1 until its first request; w2 (a replacement) whole
    r2 = run_record("r2", 2, 1, 200.0, 236.0, {"w3": {"spawned_at": 200.0, "ended_at": 236.0, "first_submit_at":
                                                      206.0, "last_completion_at": 230.0}}, 4000, True, 3.0)
    cost = account([r1, r2], 3.0)
    total = cost["all_runs"]
    assert total["runs"] == 2 and total["gpu_seconds_held"] == 280.0 + 72.0
    assert total["generated_tokens"] == 12000
    assert total["generated_tokens_per_gpu_second_engine"] == round(12000 / (80 + 48), 2)
    assert total["cost"] == pytest.approx(352 / 3600 * 3.0, rel=1e-4)
    assert total["cost_per_1m_generated_tokens"] == pytest.approx(352 / 3600 * 3.0 / 12000 * 1e6, rel=1e-4)
    assert cost["this_run"]["gpu_seconds_held"] == 72.0 and cost["this_run"]["runs"] == 1
    assert "cost" not in account([r1], None)["all_runs"]


# ---------------------------------------------------------------- jobs on the demo model


def rubric_job(tmp_path, demo_model, out="out", **extra):
    raw = yaml.safe_load((ROOT / "jobs" / "label-rubric.yaml").read_text())
    from batchrun.demo import write_rubric_items

    data = tmp_path / "rubric.parquet"
    if not data.exists():
        write_rubric_items(data, n=96)
    raw["engine"]["model"] = str(demo_model)
    raw["input"]["path"] = str(data)
    raw["output"]["dir"] = str(tmp_path / out)
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


def outputs(out_dir) -> dict:
    return {r["id"]: (r["generated_text"], r["finish_reason"], r["rubric"]) for r in read_output(out_dir).to_pylist()}


@pytest.mark.slow
def test_rubric_job_reuses_prefixes_and_outputs_match_reuse_off(tmp_path, ray_cluster, demo_model):
    on = JobRunner(validate_spec(rubric_job(tmp_path, demo_model)), show_progress=False).run().summary
    reuse = on["prefix_reuse"]
    assert set(reuse["schedule"].values()) == {"on"} and set(reuse["engine_reuses"].values()) == {True}
    assert reuse["leaders"] >= 4 and reuse["held"] > 0
    # 4 rubrics of ~100 tokens on 96 rows: most of every prompt comes from cached pages of 16 tokens
    assert reuse["prompt_tokens_cached"] > 0.5 * on["prompt_tokens"]
    assert reuse["prompt_tokens_computed"] == on["prompt_tokens"] - reuse["prompt_tokens_cached"]
    off = JobRunner(validate_spec(rubric_job(tmp_path, demo_model, "off", engine={
        "prefix_schedule": "off", "options": {"allow_block_sharing": False}})), show_progress=False).run().summary
    assert off["prefix_reuse"]["prompt_tokens_cached"] == 0 and off["prompt_tokens"] == on["prompt_tokens"]
    assert set(off["prefix_reuse"]["schedule"].values()) == {"off"}
    assert outputs(tmp_path / "out") == outputs(tmp_path / "off")  # greedy: identical with reuse on and off


@pytest.mark.slow
def test_schedule_leaves_ids_rows_and_seeded_outputs_unchanged(tmp_path, ray_cluster, demo_model):
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    runs = {}
    for name, shard_rows, workers, schedule in (("a", 32, 2, "auto"), ("b", 7, 1, "auto"), ("c", 50, 3, "off")):
        raw = rubric_job(tmp_path, demo_model, name, sampling=sampled, engine={"prefix_schedule": schedule},
                         shards={"rows_per_shard": shard_rows}, resources={"num_workers": workers})
        JobRunner(validate_spec(raw), show_progress=False).run()
        runs[name] = outputs(tmp_path / name)
    assert sorted(runs["a"]) == [f"r{i:05d}" for i in range(96)]  # every row once
    assert runs["a"] == runs["b"] == runs["c"]


@pytest.mark.slow
def test_cost_fields_with_a_price_and_a_resumed_job(tmp_path, ray_cluster):
    """Run 1 is interrupted (Ctrl-C) part-way, run 2 resumes and finishes: the cost adds both runs up."""
    n = 2000
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(n)), "prompt": [f"row {i}" for i in range(n)]}))
    raw = {"engine": {"name": "tests.engines:CountingEcho",
                      "options": {"log_path": str(tmp_path / "calls"), "delay_s": 0.3}},
           "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
           "output": {"dir": str(tmp_path / "out")}, "shards": {"rows_per_shard": 50},
           "resources": {"num_workers": 2, "gpu_hour_cost": 4.0}, "faults": {"heartbeat_s": 0.2}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    cmd = [PYTHON, "-m", "batchrun.cli", "run", str(job), "--no-progress"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "out").glob("part-*.parquet"))) < 12:
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)  # Ctrl-C: the run stops, its cost record says what it used
    assert first.wait(timeout=120) != 0
    runs_dir = tmp_path / "out" / "_batchrun" / "runs"
    (rec1,) = [json.loads(p.read_text()) for p in runs_dir.glob("*.json")]
    assert rec1["finished"] is False and rec1["gpu_seconds_held"] > 0 and rec1["gpu_seconds_engine"] > 0, rec1
    assert rec1["generated_tokens"] > 0 and rec1["gpu_hour_cost"] == 4.0

    second = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cost over 2 runs" in second.stdout and "per 1M generated tokens" in second.stdout
    s = json.loads((tmp_path / "out" / "_summary.json").read_text())
    cost, run2 = s["cost"], s["cost"]["this_run"]
    assert cost["unit"] == UNIT_WORKER and cost["gpu_hour_cost"] == 4.0
    total = cost["all_runs"]
    assert total["runs"] == 2
    assert total["gpu_seconds_held"] == pytest.approx(rec1["gpu_seconds_held"] + run2["gpu_seconds_held"], abs=0.01)
    assert total["gpu_seconds_engine"] == pytest.approx(rec1["gpu_seconds_engine"] + run2["gpu_seconds_engine"],
                                                        abs=0.01)
    assert total["generated_tokens"] == rec1["generated_tokens"] + run2["generated_tokens"]
    assert run2["generated_tokens"] == s["this_run"]["generated_tokens"] > 0
    assert 0 < run2["startup_share"] < 1 and run2["gpu_seconds_held"] >= run2["gpu_seconds_engine"] > 0
    assert total["cost"] == pytest.approx(total["gpu_seconds_held"] / 3600 * 4.0, rel=1e-3)
    assert total["cost_per_1m_generated_tokens"] == pytest.approx(total["cost"] / total["generated_tokens"] * 1e6,
                                                                  rel=1e-3)
    status = subprocess.run([PYTHON, "-m", "batchrun.cli", "status", str(tmp_path / "out"), "--json"], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert json.loads(status.stdout)["cost"]["all_runs"] == total
