"""`batchrun eval`: lm-eval's own task code builds the requests, batchrun runs them as jobs, and the results equal
`lm_eval --model hf` on the demo model, task by task, metric by metric (local task configs over local JSON files:
a multiple-choice task, a generation task with a regex filter, a perplexity task). An interrupted eval resumes."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from batchrun.cli import main

pytestmark = pytest.mark.slow

MC = [("12+3", ["15", "14", "51", "9"], 0), ("40-8", ["23", "32", "48", "30"], 1),
      ("7+7", ["41", "77", "14", "0"], 2), ("90-45", ["45", "54", "135", "40"], 0),
      ("5+16", ["12", "61", "21", "11"], 2), ("63-21", ["42", "24", "84", "41"], 0)]
GEN = [("12+3", "15"), ("40-8", "32"), ("7+7", "14"), ("5+16", "21"), ("63-21", "42"), ("33+44", "77")]
TEXT = ["12+3=15 40-8=32", "7+7=14", "5+16=21 63-21=42 33+44=77", "90-45=45"]


def write_tasks(root):
    data = root / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC))
    (data / "gen.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in GEN))
    (data / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    tasks = root / "tasks"
    tasks.mkdir()

    def task(name, file, **cfg):
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data / file)}},
            "test_split": "test", **cfg}))

    task("br_mc", "mc.jsonl", output_type="multiple_choice", doc_to_text="{{q}}=", doc_to_choice="{{choices}}",
         doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    task("br_gen", "gen.jsonl", output_type="generate_until", doc_to_text="{{q}}=", doc_to_target="{{a}}",
         generation_kwargs={"until": [" ", "\n"], "max_gen_toks": 5, "do_sample": False},
         filter_list=[{"name": "digits", "filter": [{"function": "regex", "regex_pattern": r"(\d+)"},
                                                     {"function": "take_first"}]}],
         metric_list=[{"metric": "exact_match"}])
    task("br_ppl", "ppl.jsonl", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
         metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}])
    return tasks


def reference(demo_model, tasks_dir, names):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # lm-eval's own ~10 s index skipped
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={demo_model},dtype=float32,device=cpu",
                                   tasks=names, task_manager=manager, log_samples=False)["results"]


def test_batchrun_eval_equals_lm_eval_hf_task_by_task(tmp_path, ray_cluster, demo_model, capsys):
    tasks_dir = write_tasks(tmp_path)
    names = ["br_mc", "br_gen", "br_ppl"]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
                                   "resources": {"num_workers": 1}, "shards": {"rows_per_shard": 2},
                                   "output": {"dir": str(tmp_path / "out")}}))
    argv = ["eval", str(job), "--tasks", ",".join(names), "--include_path", str(tasks_dir), "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert all(n in table for n in names) and "exact_match" in table and "word_perplexity" in table
    got = json.loads((tmp_path / "out" / "_lm_eval" / "results.json").read_text())
    want = reference(demo_model, tasks_dir, names)
    for task in names:
        metrics = {k: v for k, v in want[task].items() if "," in k and "stderr" not in k}
        assert metrics, want[task]
        for key, value in metrics.items():
            mine = got["results"][task][key]
            if "perplexity" in key or "bits_per_byte" in key:
                assert math.isclose(mine, value, rel_tol=1e-4), (task, key, mine, value)
            else:
                assert mine == value, (task, key, mine, value)
    jobs = got["batchrun"]
    assert set(jobs) == {"loglikelihood", "loglikelihood_rolling", "generate_until-0"}
    assert jobs["loglikelihood"]["rows"] == len(MC) and jobs["generate_until-0"]["rows"] == len(GEN)
    # the same eval again on the same output dir: every job resumes, nothing is computed again
    assert main(argv) == 0
    again = json.loads((tmp_path / "out" / "_lm_eval" / "results.json").read_text())
    assert all(j["rows_this_run"] == 0 for j in again["batchrun"].values()), again["batchrun"]
    assert again["results"] == got["results"]


def test_batchrun_eval_names_what_is_missing(tmp_path, capsys, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"engine": {"name": "echo"}, "output": {"dir": str(tmp_path / "out")}}))
    assert main(["eval", str(job), "--tasks", "no_such_task_anywhere", "--include_path", str(tmp_path)]) == 2
    assert "no_such_task_anywhere" in capsys.readouterr().err
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", str(job), "--tasks", "x"]) == 2
    assert "pip install 'batchrun[evals]'" in capsys.readouterr().err
