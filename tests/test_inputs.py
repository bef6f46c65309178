"""Chat prompts (a messages column, or a template wrapped as a user message) and the OpenAI Batch API format."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pytest

from batchrun.cli import main
from batchrun.demo import write_openai_batch
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from tests.conftest import PYTHON, ROOT, cli_env, read_output, write_parquet

pytestmark = pytest.mark.slow


def test_messages_column_and_chat_template(tmp_path, ray_cluster, demo_model):
    msgs = [[{"role": "user", "content": "12+34"}], [{"role": "system", "content": "be right"},
                                                      {"role": "user", "content": "99-9"}],
            [{"role": "user"}], None]
    t = pa.table({"id": [0, 1, 2, 3], "conv": pa.array(msgs, pa.list_(pa.struct([("role", pa.string()),
                                                                                  ("content", pa.string())])))})
    write_parquet(tmp_path / "in.parquet", t)
    spec = validate_spec({"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
                          "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", "messages_column": "conv"},
                          "sampling": {"max_tokens": 4}, "output": {"dir": str(tmp_path / "out")}})
    JobRunner(spec, show_progress=False).run()
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert rows[0]["generated_text"] == "46" and rows[0]["num_prompt_tokens"] == len("12+34=")
    assert rows[1]["generated_text"] == "90"  # the demo template keeps user turns only
    assert "expected a non-empty list" in rows[2]["error"] and "expected a non-empty list" in rows[3]["error"]


def test_chat_example_scores_like_the_plain_prompt(tmp_path, ray_cluster, demo_model):
    from batchrun.demo import write_prompts

    data = write_prompts(tmp_path / "p.parquet", n=64, seed=5)
    results = {}
    for job in ("chat", "eval"):
        proc = subprocess.run([PYTHON, "-m", "batchrun.cli", "run", str(ROOT / "jobs" / f"{job}.yaml"), "--no-progress",
                               "--set", f"output.dir={tmp_path / job}", "--set", f"input.path={data}",
                               "--set", f"engine.model={demo_model}"],
                              cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[job] = json.loads((tmp_path / job / "_summary.json").read_text())["metrics"]["score_mean"]
    assert results["chat"] == results["eval"] > 0.9  # "a+b" through the template is the same prompt "a+b="


def test_openai_batch_round_trip(tmp_path, ray_cluster, demo_model, capsys):
    requests = write_openai_batch(tmp_path / "requests.jsonl", n=20)
    lines = requests.read_text().splitlines()
    lines.append(json.dumps({"custom_id": "req-bad", "method": "POST", "url": "/v1/chat/completions", "body": {}}))
    requests.write_text("\n".join(lines) + "\n")
    spec = validate_spec({"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
                          "input": {"path": str(requests), "format": "openai-batch"},
                          "output": {"dir": str(tmp_path / "out")}, "shards": {"rows_per_shard": 8}})
    assert spec.input.id_column == "custom_id" and spec.sampling.per_row == {"max_tokens": "max_tokens"}
    JobRunner(spec, show_progress=False).run()
    assert main(["export", str(tmp_path / "out"), "--format", "openai-batch"]) == 0
    out = [json.loads(x) for x in (tmp_path / "out" / "_batch_output.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(json.loads(x)["custom_id"] for x in lines)
    by_id = {o["custom_id"]: o for o in out}
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    for o in out:  # what OpenAI's own client accepts
        if o["response"] is not None:
            kind = ChatCompletion if o["response"]["body"]["object"] == "chat.completion" else Completion
            kind.model_validate(o["response"]["body"])
    reqs = {json.loads(x)["custom_id"]: json.loads(x) for x in lines}
    right = 0
    for cid, req in reqs.items():
        o = by_id[cid]
        if cid == "req-bad":
            assert o["response"] is None and "neither body.messages nor body.prompt" in o["error"]["message"]
            continue
        body = o["response"]["body"]
        text = req["body"].get("prompt") or req["body"]["messages"][0]["content"]
        a, b = map(int, text.rstrip("=").replace("-", "+-").split("+"))
        if "messages" in req["body"]:
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
            text = body["choices"][0]["message"]["content"]
        else:
            assert body["object"] == "text_completion"
            text = body["choices"][0]["text"]
        assert o["response"]["status_code"] == 200 and body["model"] == "batchrun-demo"
        assert body["usage"]["completion_tokens"] <= 4
        right += text == str(a + b)
    assert right >= 18  # chat and completion requests alike get the demo model's (99%-right) answers


def test_n_samples_and_logprobs(tmp_path, ray_cluster, demo_model):
    write_parquet(tmp_path / "in.parquet",
                  pa.table({"id": list(range(12)), "prompt": [f"{i}+{i}=" for i in range(12)]}))
    base = {"engine": {"name": "hf", "model": str(demo_model), "dtype": "float32"},
            "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"}, "shards": {"rows_per_shard": 5}}
    spec = validate_spec({**base, "sampling": {"max_tokens": 4, "temperature": 1.5, "n": 3, "logprobs": True,
                                               "seed": 7},
                          "output": {"dir": str(tmp_path / "sampled")}})
    JobRunner(spec, show_progress=False).run()
    out = read_output(tmp_path / "sampled").to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in out) == [(i, k) for i in range(12) for k in range(3)]
    for r in out:
        assert r["error"] is None and len(r["logprobs"]) == r["num_generated_tokens"] > 0
        assert all(lp <= 0 for lp in r["logprobs"])
    assert len({r["generated_text"] for r in out}) > 12  # temperature 1.5: samples differ
    greedy = validate_spec({**base, "sampling": {"max_tokens": 4, "n": 2}, "output": {"dir": str(tmp_path / "greedy")}})
    JobRunner(greedy, show_progress=False).run()
    rows = read_output(tmp_path / "greedy").to_pylist()
    by_id: dict = {}
    for r in rows:
        by_id.setdefault(r["id"], set()).add(r["generated_text"])
    assert len(rows) == 24 and all(len(v) == 1 for v in by_id.values())  # greedy samples agree
    assert "logprobs" not in rows[0]
