"""End to end on a real local Ray cluster: the HF engine on the demo model, and the echo engine on larger input."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet

pytestmark = pytest.mark.slow


def varied_prompts(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(f"{rng.randrange(100)}+{rng.randrange(100)}=")
        else:
            k = rng.randrange(1, 60)
            out.append("".join(rng.choice("0123456789+-= abcxyz") for _ in range(k)))
    return out


def test_hf_runner_equals_generate_per_prompt(tmp_path, ray_cluster, demo_model):
    """In-flight batching across 2 workers and many shards must give exactly the greedy tokens of generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = varied_prompts(72)
    budgets = [1 + (i * 7) % 12 for i in range(len(prompts))]
    write_parquet(tmp_path / "in.parquet", pa.table({"id": [f"r{i}" for i in range(72)], "prompt": prompts,
                                                     "budget": budgets}), row_group_size=16)
    spec = validate_spec({
        "engine": {"name": "hf", "model": str(demo_model), "dtype": "float32", "max_in_flight": 16},
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", "passthrough_columns": ["budget"]},
        "sampling": {"max_tokens": 8, "per_row": {"max_tokens": "budget"}},
        "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 2},
        "shards": {"rows_per_shard": 10},
    })
    summary = JobRunner(spec, show_progress=False).run().summary
    assert summary["rows"] == 72 and summary["error_rows"] == 0
    assert len(summary["workers"]) == 2
    # each worker reports its engine's KV cache: on a CPU, at least the CPU default of num_blocks pages
    from transformers.generation import ContinuousBatchingConfig

    from batchrun.engines.hf_backend import CPU_CB_DEFAULTS

    least = CPU_CB_DEFAULTS["num_blocks"] * CPU_CB_DEFAULTS.get("page_size", ContinuousBatchingConfig().page_size)
    kv = summary["worker_kv_cache_tokens"]
    assert len(kv) == 2 and all(least <= t < 2 * least for t in kv.values()), kv

    got = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, (p, budget) in enumerate(zip(prompts, budgets)):
            ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=budget, do_sample=False)[0, ids.shape[1]:].tolist()
            ended = gen[-1] == tok.eos_token_id
            gen = gen[:-1] if ended else gen
            row = got[f"r{i}"]
            assert row["generated_text"] == tok.decode(gen, skip_special_tokens=True), (p, budget)
            assert row["num_generated_tokens"] == len(gen)
            assert row["num_prompt_tokens"] == ids.shape[1]
            assert row["finish_reason"] == ("stop" if ended else "length")
            assert row["budget"] == budget


def test_echo_every_row_exactly_once_with_passthrough(tmp_path, ray_cluster):
    n_files, per_file = 3, [1700, 1, 2299]
    start = 0
    expected = {}
    for f in range(n_files):
        n = per_file[f]
        ids = [f"id-{start + i}" for i in range(n)]
        t = pa.table({
            "uid": ids,
            "text": [" ".join(["w"] * (1 + (start + i) % 9)) for i in range(n)],
            "score": pa.array([(start + i) / 7 for i in range(n)], pa.float64()),
            "tags": pa.array([[str(i % 3)] * (i % 3) for i in range(n)], pa.list_(pa.string())),
        })
        write_parquet(tmp_path / "in" / f"part{f}.parquet", t, row_group_size=250)
        expected.update({r["uid"]: r for r in t.to_pylist()})
        start += n
    spec = validate_spec({
        "engine": {"name": "echo", "max_in_flight": 128},
        "input": {"path": str(tmp_path / "in"), "prompt_column": "text", "id_column": "uid",
                  "passthrough_columns": ["score", "tags"]},
        "sampling": {"max_tokens": 4},
        "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 2},
        "shards": {"rows_per_shard": 333},
    })
    summary = JobRunner(spec, show_progress=False).run().summary
    from batchrun.memory import steady_arrow_pool

    assert list(summary["worker_arrow_pool"].values()) == [steady_arrow_pool()] * 2  # set from the worker's start
    out = read_output(tmp_path / "out")
    assert out.num_rows == len(expected)
    rows = out.to_pylist()
    assert sorted(r["uid"] for r in rows) == sorted(expected)
    for r in rows:
        src = expected[r["uid"]]
        assert r["score"] == src["score"] and r["tags"] == src["tags"]
        words = src["text"].split()
        assert r["generated_text"] == " ".join(words[:4])
        assert r["finish_reason"] == ("length" if len(words) > 4 else "stop") and r["error"] is None
    # also readable by HF datasets, which skips the internal _batchrun/ files
    import datasets

    hf = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train")
    assert hf.num_rows == len(expected)


def test_generated_row_index_when_no_id_column(tmp_path, ray_cluster, capsys):
    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": [f"p{i} x" for i in range(50)]}))
    spec = validate_spec({"engine": {"name": "echo"}, "input": {"path": str(tmp_path / "in.parquet")},
                          "output": {"dir": str(tmp_path / "out")}, "shards": {"rows_per_shard": 7}})
    JobRunner(spec, show_progress=False).run()
    out = read_output(tmp_path / "out").sort_by("row_index").to_pylist()
    assert [r["row_index"] for r in out] == list(range(50))
    assert [r["generated_text"] for r in out] == [f"p{i} x" for i in range(50)]
    # status after the run, from the manifest alone, with the timeline picture
    from batchrun.cli import main

    assert main(["status", str(tmp_path / "out"), "--json", "--plot"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["running"], status["shards_committed"], status["rows_committed"], status["rows_total"]) == \
        (False, 8, 50, 50)
    png = Path(status["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.parent == tmp_path / "out"


def test_demo_job_cli(tmp_path, ray_cluster, demo_model):
    """The README's demo job through the CLI: exit 0, a summary, and right answers from the demo model."""
    from batchrun.demo import write_prompts

    data = write_prompts(tmp_path / "prompts.parquet", n=96)
    proc = subprocess.run(
        [PYTHON, "-m", "batchrun.cli", "run", str(ROOT / "jobs" / "demo.yaml"),
         "--set", f"output.dir={tmp_path / 'out'}",
         "--set", f"input.path={data}", "--set", f"engine.model={demo_model}"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "succeeded: 96 rows" in proc.stdout
    out = read_output(tmp_path / "out").to_pylist()
    right = sum(r["generated_text"] == r["answer"] for r in out)
    assert right / len(out) > 0.9


def test_the_command_on_its_own_local_cluster_prints_everything_and_leaves_no_ray_process(tmp_path, demo_model):
    """`batchrun run` with no RAY_ADDRESS starts a local cluster and, at its end, stops it without waiting and exits
    at once (runner.end_local_cluster): its output is complete and no process of that cluster outlives it."""
    import psutil

    def leftovers(since: float) -> list[str]:
        found = []
        for p in psutil.process_iter(["cmdline", "create_time"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["create_time"] < since or not any(k in cmd for k in ("ray::", "raylet", "gcs_server",
                                                                               "dashboard", "runtime_env")):
                    continue
                if any(q.create_time() < since and "raylet" in " ".join(q.cmdline()) for q in p.parents()):
                    continue  # a worker of the test session's own cluster
                found.append(cmd[:80])
            except psutil.Error:
                continue
        return found

    env = {k: v for k, v in cli_env().items() if k != "RAY_ADDRESS"}
    started = time.time()
    proc = subprocess.run(
        [str(Path(PYTHON).parent / "batchrun"), "run", str(ROOT / "jobs" / "eval.yaml"), "--no-progress",
         "--set", f"output.dir={tmp_path / 'out'}", "--set", f"engine.model={demo_model}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batchrun: succeeded" in proc.stdout and "output: " in proc.stdout  # flushed before the exit
    deadline = time.time() + 60
    while (left := leftovers(started)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, left


def test_num_workers_auto_follows_the_cluster(tmp_path, ray_cluster):
    """auto: one worker per cpus_per_worker CPUs here (8 logical CPUs in the test cluster), capped by the shards."""
    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": [f"p{i}" for i in range(300)]}))
    spec = validate_spec({"engine": {"name": "echo", "options": {"delay_s": 0.05}},
                          "input": {"path": str(tmp_path / "in.parquet")}, "output": {"dir": str(tmp_path / "out")},
                          "resources": {"num_workers": "auto", "cpus_per_worker": 2}, "shards": {"rows_per_shard": 10}})
    runner = JobRunner(spec, show_progress=False)
    summary = runner.run().summary
    assert summary["rows"] == 300
    import ray

    assert int(ray.cluster_resources()["CPU"]) // 2 == 4
    assert len(summary["worker_peak_rss_mb"]) == 4  # four workers were started


def test_eval_example_accuracy_equals_a_plain_generate_loop(tmp_path, ray_cluster, demo_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from batchrun.demo import write_prompts

    data = write_prompts(tmp_path / "prompts.parquet", n=128, seed=21)
    proc = subprocess.run(
        [PYTHON, "-m", "batchrun.cli", "run", str(ROOT / "jobs" / "eval.yaml"), "--no-progress",
         "--set", f"output.dir={tmp_path / 'out'}", "--set", f"input.path={data}",
         "--set", f"engine.model={demo_model}"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    rows = read_output(tmp_path / "out").to_pylist()
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    right = 0
    source = pq.read_table(data).to_pylist()
    with torch.no_grad():
        for r in source:
            ids = tok(r["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
            right += tok.decode(out, skip_special_tokens=True).strip() == r["answer"]
    assert summary["metrics"]["score_mean"] == pytest.approx(right / len(source))
    assert summary["metrics"]["rows"] == 128 and sum(r["score"] for r in rows) == right
    assert f"score: {right / len(source):.4f} mean over 128 rows" in proc.stdout


@pytest.mark.parametrize("niceness", [0, 7, None])
def test_worker_runs_at_the_niceness_asked_for(tmp_path, ray_cluster, niceness):
    """Ray starts workers at its own niceness (15), behind every daemon on the node; the engine worker is the job's
    critical path and runs at resources.niceness (0 by default), its threads and children with it."""
    import ray

    @ray.remote(num_cpus=0)
    def ray_default_niceness():
        import os

        return os.getpriority(os.PRIO_PROCESS, 0)

    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": [f"p{i}" for i in range(20)]}))
    spec = validate_spec({"engine": {"name": "echo"}, "input": {"path": str(tmp_path / "in.parquet")},
                          "output": {"dir": str(tmp_path / "out")}, "shards": {"rows_per_shard": 2},
                          "resources": {"num_workers": 2, "niceness": niceness}})
    summary = JobRunner(spec, show_progress=False).run().summary
    expected = ray.get(ray_default_niceness.remote()) if niceness is None else niceness
    # every worker that ran (one may finish all 10 shards before the other has loaded) ran at that niceness
    assert summary["worker_niceness"] and set(summary["worker_niceness"].values()) == {expected}
    assert niceness is not None or expected != 0  # the test cluster does nice its workers


def test_a_worker_the_cluster_cannot_place_does_not_hold_up_the_end(tmp_path, ray_cluster):
    """Three workers of 3 CPUs on the session's 8-CPU cluster: the third waits for resources the whole job. Once
    the two others have committed every shard, the job ends; it used to wait 60 s for the third."""
    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": [f"p{i}" for i in range(40)]}))
    spec = validate_spec({"engine": {"name": "echo"}, "input": {"path": str(tmp_path / "in.parquet")},
                          "output": {"dir": str(tmp_path / "out")}, "shards": {"rows_per_shard": 5},
                          "resources": {"num_workers": 3, "cpus_per_worker": 3}})
    t0 = time.monotonic()
    summary = JobRunner(spec, show_progress=False).run().summary
    assert summary["rows"] == 40 and len(summary["worker_niceness"]) == 2
    assert time.monotonic() - t0 < 45, "the job waited for a worker that never started"
