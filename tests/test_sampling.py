"""Sampling on the demo model: batch-invariant seeds, per-row settings, the sampler's distribution, guided choices."""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter

import pyarrow as pa
import pytest

from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet
from tests.test_e2e import varied_prompts

pytestmark = pytest.mark.slow


def run_job(tmp_path, name, demo_model, sampling, workers=1, rows_per_shard=1000, **extra):
    spec = validate_spec({"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
                          "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", **extra.pop("input", {})},
                          "sampling": sampling, "output": {"dir": str(tmp_path / name)},
                          "resources": {"num_workers": workers}, "shards": {"rows_per_shard": rows_per_shard},
                          **extra})
    JobRunner(spec, show_progress=False).run()
    return {(r["id"], r.get("sample_index", 0)): r for r in read_output(tmp_path / name).to_pylist()}


def test_seeded_sampling_is_the_same_whatever_the_shard_size_and_worker_count(tmp_path, ray_cluster, demo_model):
    prompts = varied_prompts(48, seed=4)
    write_parquet(tmp_path / "in.parquet", pa.table({"id": [f"r{i}" for i in range(48)], "prompt": prompts}))
    sampling = {"max_tokens": 8, "temperature": 1.5, "top_p": 0.95, "n": 2, "seed": 1234}
    one = run_job(tmp_path, "one", demo_model, sampling, workers=1, rows_per_shard=48)
    many = run_job(tmp_path, "many", demo_model, sampling, workers=2, rows_per_shard=7)
    text = {k: r["generated_text"] for k, r in one.items()}
    assert len(text) == 96 and text == {k: r["generated_text"] for k, r in many.items()}
    other = run_job(tmp_path, "other", demo_model, {**sampling, "seed": 99}, rows_per_shard=16)
    greedy = run_job(tmp_path, "greedy", demo_model, {"max_tokens": 8}, rows_per_shard=48)
    # it does sample: another seed, the other sample of a row, and greedy decoding all differ somewhere
    assert sum(text[k] != other[k]["generated_text"] for k in text) >= 10
    assert sum(text[(f"r{i}", 0)] != text[(f"r{i}", 1)] for i in range(48)) >= 5
    assert sum(text[(f"r{i}", 0)] != greedy[(f"r{i}", 0)]["generated_text"] for i in range(48)) >= 5


def test_per_row_sampling_columns(tmp_path, ray_cluster, demo_model):
    n = 24
    prompts = varied_prompts(n, seed=6)
    temps = [0.0 if i % 2 else 2.0 for i in range(n)]
    temps[3] = -1.0  # a bad value: that row alone is an error row naming the column
    seeds = [i // 2 for i in range(n)]  # rows 0 and 1, 2 and 3, ... share a seed column value
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(n)), "prompt": prompts, "t": temps, "s": seeds,
                                                     "k": [None] * (n - 1) + [1]}))
    per_row = {"temperature": "t", "seed": "s", "top_k": "k"}
    rows = run_job(tmp_path, "rows", demo_model, {"max_tokens": 8, "per_row": per_row}, rows_per_shard=5)
    greedy = run_job(tmp_path, "greedy", demo_model, {"max_tokens": 8}, rows_per_shard=5)
    again = run_job(tmp_path, "again", demo_model, {"max_tokens": 8, "per_row": per_row}, workers=2, rows_per_shard=11)
    assert "column 't' (sampling.per_row.temperature): expected a number >= 0, got -1.0" in rows[(3, 0)]["error"]
    ok = [i for i in range(n) if i != 3]
    for i in ok:
        assert rows[(i, 0)]["error"] is None
        if temps[i] == 0:  # temperature 0 in its column: exactly the greedy output
            assert rows[(i, 0)]["generated_text"] == greedy[(i, 0)]["generated_text"]
    assert rows[(23, 0)]["generated_text"] == greedy[(23, 0)]["generated_text"]  # top_k 1 is greedy too
    assert {i: rows[(i, 0)]["generated_text"] for i in ok} == {i: again[(i, 0)]["generated_text"] for i in ok}
    hot = [i for i in ok if temps[i] > 0]
    assert sum(rows[(i, 0)]["generated_text"] != greedy[(i, 0)]["generated_text"] for i in hot) >= 3


def test_the_sampler_draws_from_the_models_distribution(demo_model):
    """Gumbel-max over a hashed noise must sample softmax(logits / T): first tokens of 800 seeds vs the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from batchrun.engines.base import Request, Sampling
    from batchrun.engines.hf import HFEngine

    prompt, temperature, draws = "3+4", 2.0, 800  # an unfinished sum: "1", end of text and "0" are all likely
    engine = HFEngine(str(demo_model), Sampling(max_tokens=1, temperature=temperature), dtype="float32")
    try:
        ids = engine.encode([prompt])[0]
        for i in range(draws):
            engine.submit(Request(f"0:{i}", prompt, ids, Sampling(max_tokens=1, temperature=temperature, seed=i)))
        got: Counter = Counter()
        while sum(got.values()) < draws:
            got.update(c.token_ids[0] if c.token_ids else -1 for c in engine.poll(5.0))
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1] / temperature, -1)
    eos = model.generation_config.eos_token_id
    got[eos] += got.pop(-1, 0)  # an EOS first token comes back as an empty completion
    likely = [t for t in torch.argsort(probs, descending=True).tolist()[:4] if probs[t] > 0.03]
    assert len(likely) >= 2, "the prompt must leave several likely tokens"
    for t in likely:
        p = probs[t].item()
        assert abs(got[t] / draws - p) < 4.5 * math.sqrt(p * (1 - p) / draws), (t, got[t] / draws, p)


def test_label_example_constrains_to_the_choices(tmp_path, ray_cluster, demo_model):
    """jobs/label.yaml: every completion is one of the ten labels, and it is the answer's leading digit."""
    from batchrun.demo import write_prompts

    data = write_prompts(tmp_path / "p.parquet", n=96, seed=8)
    results = {}
    for guided in ("true", "false"):
        out = tmp_path / f"guided-{guided}"
        proc = subprocess.run([PYTHON, "-m", "batchrun.cli", "run", str(ROOT / "jobs" / "label.yaml"), "--no-progress",
                               "--set", f"output.dir={out}", "--set", f"input.path={data}",
                               "--set", f"engine.model={demo_model}", "--set", f"output.parse.guided={guided}"],
                              cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[guided] = read_output(out).to_pylist()
    guided = results["true"]
    assert len(guided) == 96 and all(r["parse_error"] is None and r["generated_text"] == r["parsed"] for r in guided)
    assert sum(r["parsed"] == r["answer"][0] for r in guided) >= 90
    # unconstrained, the model writes the whole number: two-digit answers are not a label
    free = results["false"]
    assert sum(r["parse_error"] is not None for r in free) >= 50
    summary = json.loads((tmp_path / "guided-true" / "_summary.json").read_text())
    assert summary["rows"] == 96
