"""Prefix-aware scheduling (batchrun/prefix.py) and reuse reporting. (Cost accounting: test_cost.py.)

The scheduler's rules on their own; then real jobs on the demo model through the real HF engine (its cache reports
the prompt tokens it served from shared blocks): reuse happens, outputs do not depend on the schedule, the shard
size or the worker count."""

from __future__ import annotations

import pytest
import yaml

from batchrun.engines.base import Request, Sampling
from batchrun.prefix import PrefixScheduler
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from tests.conftest import ROOT, read_output

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
