"""What a job cost (batchrun/cost.py): each run's record of GPU time held and in use, added up over the runs of one
output dir, with a price; through an interrupted and resumed job."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pyarrow as pa
import pytest
import yaml

from batchrun.cost import UNIT_WORKER, account, run_record
from tests.conftest import PYTHON, ROOT, cli_env, write_parquet


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
