"""The mpi4py rank launcher, for real: Open MPI spawning ranks from inside a Ray actor on this 2-core machine."""

from __future__ import annotations

import time

import pytest

from tests.mpi_actor import LauncherProbe
from tests.procs import alive, pids_where, wait_gone

pytestmark = pytest.mark.slow


def probe(ray, **options):
    return ray.remote(LauncherProbe).options(num_cpus=1, **options)


def test_two_ranks_see_the_actors_devices_and_close_leaves_no_orphans(ray_cluster):
    import ray

    actor = probe(ray).remote(visible="3,5")
    ranks = ray.get(actor.spawn.remote(2, timeout_s=60), timeout=120)  # 2 ranks on 2 cores: needs oversubscribe
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["size"] == 2 for r in ranks)
    assert all(r["cuda_visible_devices"] == "3,5" for r in ranks)
    parent = ray.get(actor.pid.remote())
    assert all(r["pid"] != parent for r in ranks)
    assert "RuntimeError: rank task exploded" in ray.get(actor.failing_task.remote(), timeout=60)
    ray.get(actor.close.remote(), timeout=60)
    assert wait_gone([r["pid"] for r in ranks]) == []
    ray.kill(actor)


def test_killing_the_actor_leaves_no_orphan_ranks(ray_cluster):
    import ray

    actor = probe(ray).remote()
    ranks = ray.get(actor.spawn.remote(2, timeout_s=60), timeout=120)
    pids = [r["pid"] for r in ranks]
    assert all(alive(p) for p in pids)
    ray.kill(actor)  # SIGKILL: no close() runs; the ranks' parent watchdog must end them
    assert wait_gone(pids) == []


def test_slot_limit_failure_is_an_error_in_bounded_time(ray_cluster):
    """Without the oversubscribe fix, Open MPI refuses 2 ranks here; the launcher reports it instead of hanging."""
    import ray

    actor = probe(ray).remote()
    t0 = time.time()
    with pytest.raises(ray.exceptions.RayTaskError, match="could not start 2 MPI ranks"):
        ray.get(actor.spawn.remote(2, timeout_s=15, oversubscribe=False), timeout=120)
    assert time.time() - t0 < 60
    ray.kill(actor)


def test_failed_spawn_surfaces_as_an_error(ray_cluster):
    import ray

    actor = probe(ray).remote()
    t0 = time.time()
    with pytest.raises(ray.exceptions.RayTaskError, match="could not start 2 MPI ranks"):
        ray.get(actor.spawn.remote(2, timeout_s=15, python_exe="/nonexistent/python"), timeout=120)
    assert time.time() - t0 < 60
    ray.kill(actor)


def test_hf_tensor_parallel_2_equals_1_through_the_runner(tmp_path, ray_cluster, demo_model):
    """TP=2 over gloo, ranks spawned by the launcher from the worker actor, rank 0 driving the batch."""
    import pyarrow as pa

    from batchrun.runner import JobRunner
    from batchrun.spec import validate_spec
    from tests.conftest import read_output, write_parquet
    from tests.test_e2e import varied_prompts

    prompts = varied_prompts(40, seed=9)
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(40)), "prompt": prompts}))
    outputs = {}
    for tp in (1, 2):
        spec = validate_spec({
            "engine": {"name": "hf", "model": str(demo_model), "dtype": "float32", "tensor_parallel_size": tp},
            "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
            "sampling": {"max_tokens": 10},
            "output": {"dir": str(tmp_path / f"tp{tp}")},
            "resources": {"num_workers": 1},
            "shards": {"rows_per_shard": 16},
        })
        summary = JobRunner(spec, show_progress=False).run().summary
        assert summary["rows"] == 40 and summary["error_rows"] == 0
        kv = list(summary["worker_kv_cache_tokens"].values())  # rank 0 reports its cache through the launcher
        assert len(kv) == 1 and isinstance(kv[0], int) and kv[0] > 0, kv
        rows = read_output(tmp_path / f"tp{tp}").to_pylist()
        outputs[tp] = {r["id"]: (r["generated_text"], r["finish_reason"]) for r in rows}
    assert outputs[2] == outputs[1]
    assert wait_gone(pids_where(lambda cmd: "mpi4py.futures" in cmd)) == []


def test_hf_tensor_parallel_samples_like_one_rank(demo_model):
    """RowSampler runs on every rank from the same broadcast request states: TP=2 must draw what TP=1 draws."""
    from batchrun.engines.base import Request, Sampling, row_seed
    from batchrun.engines.hf import HFEngine

    prompts = [f"{a}+{b}=" for a in range(10, 90, 9) for b in (3, 44)]
    outputs = {}
    for tp in (1, 2):
        engine = HFEngine(str(demo_model), Sampling(max_tokens=6, temperature=1.8, seed=5), dtype="float32",
                          tensor_parallel_size=tp)
        try:
            ids = engine.encode(prompts)
            for i, p in enumerate(prompts):
                row = Sampling(max_tokens=6, temperature=1.8, seed=row_seed(5, i))
                engine.submit(Request(f"0:{i}", p, ids[i], row))
            got: dict = {}
            deadline = time.time() + 120
            while len(got) < len(prompts) and time.time() < deadline:
                got.update({c.request_id: c.text for c in engine.poll(1.0)})
        finally:
            pool = getattr(engine.backend, "pool", None)
            started = time.monotonic()
            engine.close()
            closed_in = time.monotonic() - started
        if tp > 1:  # every rank exits by itself, in seconds (the GPU check: bench/tp_close.py)
            assert pool.killed == [] and closed_in < 20, (pool.killed, closed_in)
        outputs[tp] = got
    assert len(outputs[1]) == len(prompts) and outputs[2] == outputs[1]
    assert len(set(outputs[1].values())) > len(prompts) // 2


def test_a_process_whose_rank_died_mid_task_still_exits_after_close(tmp_path):
    """The GPU machine's TP=2 bench never exited: a rank gone mid-task leaves mpi4py's manager thread waiting for its
    result, and mpi4py joins that thread at interpreter exit. close() must deregister it."""
    import subprocess

    from tests.conftest import PYTHON, ROOT, cli_env

    script = tmp_path / "dies.py"
    script.write_text(
        "import time, psutil\n"
        "from batchrun.engines.mpi import RankPool\n"
        "pool = RankPool(2, timeout_s=60)\n"
        "pool.submit_all(time.sleep, 300)\n"
        "time.sleep(1)\n"
        "psutil.Process(pool.pids[1]).kill()\n"
        "t0 = time.monotonic()\n"
        "pool.close(timeout_s=3)\n"
        "print('closed', round(time.monotonic() - t0), flush=True)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([PYTHON, str(script)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert "closed" in proc.stdout, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 120, "the process hung at exit"
