"""Suites: many tasks in one job file, one driver, one Ray start, the workers' engines kept from task to task; each
task a job of its own (output subdirectory, manifest, resume). On a real local Ray cluster."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import time

import pyarrow as pa
import pytest
import yaml

from batchrun.errors import SpecError
from batchrun.runner import SuiteRunner
from batchrun.spec import validate_spec
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet

pytestmark = pytest.mark.slow


def suite(tmp_path, rows=(40, 120, 40)) -> dict:
    tasks = []
    for k, n in enumerate(rows):
        write_parquet(tmp_path / f"t{k}.parquet", pa.table({"id": list(range(n)),
                                                            "prompt": [f"t{k}w{i} x y" for i in range(n)]}))
        tasks.append({"name": f"t{k}", "input": {"path": str(tmp_path / f"t{k}.parquet"), "id_column": "id"}})
    tasks[1]["sampling"] = {"max_tokens": 2}  # the same engine key as the others: sampling keys the engine
    return {"engine": {"name": "tests.engines:SlowEcho", "max_in_flight": 4,
                       "options": {"log_path": str(tmp_path / "calls"), "per_poll": 1, "delay_s": 0.05}},
            "sampling": {"max_tokens": 2}, "output": {"dir": str(tmp_path / "out")},
            "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 10},
            "faults": {"drain_s": 0.5, "heartbeat_s": 0.5}, "tasks": tasks}


def calls(tmp_path) -> collections.Counter:
    """Requests each engine process got, and which processes (pid) served each task."""
    return collections.Counter(line for f in (tmp_path / "calls").glob("*.log") for line in f.read_text().split())


def test_a_suite_interrupted_in_its_second_task_resumes_task_by_task(tmp_path, ray_cluster):
    job_file = tmp_path / "suite.yaml"
    job_file.write_text(yaml.safe_dump(suite(tmp_path)))
    proc = subprocess.Popen([PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress"], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(list((tmp_path / "out" / "t1").glob("part-*.parquet"))) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "too slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # in the second task: drain, commit what finishes, exit 143
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-2000:]
    done_t1 = {p.name for p in (tmp_path / "out" / "t1").glob("part-*.parquet")}
    assert len(read_output(tmp_path / "out" / "t0")) == 40 and 3 <= len(done_t1) < 12
    assert not (tmp_path / "out" / "t2").exists() or not list((tmp_path / "out" / "t2").glob("part-*"))
    before = calls(tmp_path)
    one_process = {f.name for f in (tmp_path / "calls").glob("*.log")}
    assert len(one_process) <= 2  # two workers served t0 and t1: their engines were kept, not restarted

    rerun = subprocess.run([PYTHON, "-m", "batchrun.cli", "run", str(job_file), "--no-progress"], cwd=ROOT,
                           env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "suite succeeded: 3 tasks, 200 rows" in rerun.stdout
    for k, n in enumerate((40, 120, 40)):  # every row of every task exactly once
        ids = read_output(tmp_path / "out" / f"t{k}").column("id").to_pylist()
        assert sorted(ids) == list(range(n)), k
    # the engines got exactly the rows not committed before the signal: t1's other shards and all of t2
    sent = sum(calls(tmp_path).values()) - sum(before.values())
    assert sent == (120 - 10 * len(done_t1)) + 40, sent
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    tasks = summary["tasks"]
    assert tasks["t0"]["rows"] == 40 and tasks["t1"]["rows"] == 120 and tasks["t2"]["rows"] == 40
    t0 = json.loads((tmp_path / "out" / "t0" / "_summary.json").read_text())
    t1 = json.loads((tmp_path / "out" / "t1" / "_summary.json").read_text())
    assert t0["shards_skipped"] == 4 and t0["this_run"]["rows"] == 0  # done before the signal: not redone
    assert t1["shards_skipped"] == len(done_t1) and t1["this_run"]["rows"] == 120 - 10 * len(done_t1)
    assert tasks["t2"]["engine_reused"] is True  # t1's engines served t2

    status = subprocess.run([PYTHON, "-m", "batchrun.cli", "status", str(tmp_path / "out"), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    st = json.loads(status.stdout)
    assert st["running"] is False and (st["rows_committed"], st["rows_total"]) == (200, 200)
    assert {k: t["rows_committed"] for k, t in st["tasks"].items()} == {"t0": 40, "t1": 120, "t2": 40}


def test_a_suite_mistake_names_the_task_and_stops_before_any_work(tmp_path, ray_cluster):
    raw = suite(tmp_path)
    raw["tasks"][2]["input"]["prompt_column"] = "nope"
    with pytest.raises(SpecError, match="nope"):
        SuiteRunner(validate_spec(raw), show_progress=False).run()
    assert not (tmp_path / "out" / "t0").exists()  # nothing ran: every task is checked first
    raw = suite(tmp_path)
    raw["tasks"][1]["sampling"] = {"max_tokenz": 3}
    with pytest.raises(SpecError, match=r"task 't1': unknown key 'sampling.max_tokenz'"):
        SuiteRunner(validate_spec(raw), show_progress=False).run()
    with pytest.raises(SpecError, match="'input' .* or 'tasks'"):
        validate_spec({**suite(tmp_path), "input": {"path": "x.parquet"}})


def test_the_example_suite_runs_on_the_demo_model(tmp_path, ray_cluster, demo_model):
    """jobs/suite.yaml as the README shows it: multiple choice, perplexity and a scored generation task on one
    engine start; the two scoring tasks share the scoring engine."""
    from batchrun.spec import load_spec

    spec = load_spec(ROOT / "jobs" / "suite.yaml", [f"output.dir={tmp_path / 'suite'}", f"engine.model={demo_model}"])
    tasks = SuiteRunner(spec, show_progress=False).run().summary["tasks"]
    assert [t["status"] for t in tasks.values()] == ["succeeded"] * 3
    assert tasks["multiple-choice"]["metrics"]["acc"] >= 0.9 and tasks["arithmetic"]["metrics"]["score_mean"] >= 0.9
    assert tasks["perplexity"]["metrics"]["bits_per_byte"] > 0
    assert tasks["perplexity"]["engine_reused"] is True and tasks["arithmetic"]["engine_reused"] is False


def test_plan_shows_each_task_of_a_suite(tmp_path, capsys):
    from batchrun.cli import main

    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite(tmp_path)))
    assert main(["plan", str(tmp_path / "suite.yaml")]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert {n: t["shards"]["count"] for n, t in tasks.items()} == {"t0": 4, "t1": 12, "t2": 4}
    assert tasks["t1"]["spec"]["output"]["dir"] == str(tmp_path / "out" / "t1")


def test_task_shorthands_prompt_parse_and_output_subdirectory(tmp_path):
    raw = suite(tmp_path)
    raw["tasks"][0] |= {"prompt": "Q: {{ prompt }}", "parse": {"kind": "choice", "choices": ["a", "b"]},
                        "output": "evals/first"}
    raw["tasks"][1] |= {"prompt": {"prompt_column": "prompt", "chat": True}, "output": {"compression": "snappy"}}
    specs = dict(validate_spec(raw).task_specs())
    first, second = specs["t0"], specs["t1"]
    assert first.input.prompt_template == "Q: {{ prompt }}" and first.output.parse.choices == ["a", "b"]
    assert first.output.dir == str(tmp_path / "out" / "evals" / "first")
    assert second.input.chat and second.output.compression == "snappy"
    assert second.output.dir == str(tmp_path / "out" / "t1")
    for task, match in [({"prompt": "x", "input": {"path": "p", "prompt_template": "y"}}, "prompt_template in prompt"),
                        ({"prompt": {"template": "x"}}, "prompt takes prompt_column"),
                        ({"output": "../elsewhere"}, "relative path inside output.dir"),
                        ({"output": "/abs"}, "relative path inside output.dir"),
                        ({"output": "a/_hidden"}, "skipped by readers"),
                        ({"parse": {"kind": "json"}, "output": {"parse": {"kind": "json"}}}, "parse or output.parse"),
                        ({"output": "t1"}, "distinct output subdirectories")]:
        bad = suite(tmp_path)
        bad["tasks"][0] = {**bad["tasks"][0], **task}
        with pytest.raises(SpecError, match=match):
            validate_spec(bad)
