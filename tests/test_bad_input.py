"""Bad job files and bad input: one clear message naming the key/file/column, exit code 2, no visible output.

All of these fail before Ray starts, so they need no cluster.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import yaml

from batchrun.cli import main
from tests.conftest import write_parquet


@pytest.fixture
def base(tmp_path):
    write_parquet(tmp_path / "in.parquet", pa.table({"id": [1, 2, 3], "prompt": ["a b", "c", "d e f"]}))
    return {
        "engine": {"name": "echo"},
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt", "id_column": "id"},
        "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 1},
    }


def set_key(job, dotted, value):
    node = job
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def run_cli(tmp_path, job_text, capsys, extra=()):
    job = tmp_path / "job.yaml"
    job.write_text(job_text)
    code = main(["run", str(job), "--no-progress", *extra])
    return code, capsys.readouterr().err


CASES = {
    # name: (how to break the job, words the message must contain)
    "bad yaml": (lambda j, t: "engine: [unclosed\n  x: :", ["not valid YAML"]),
    "unknown key": (lambda j, t: set_key(j, "sampling.max_tokenz", 5), ["unknown key 'sampling.max_tokenz'", "max_tokens"]),
    "unknown section": (lambda j, t: set_key(j, "enigne.name", "hf"), ["unknown key 'enigne'"]),
    "wrong type": (lambda j, t: set_key(j, "sampling.temperature", "hot"), ["sampling.temperature", "'hot'"]),
    "bad engine name": (lambda j, t: set_key(j, "engine.name", "vllm"), ["engine", "hf, trtllm, echo", "vllm"]),
    "missing input path key": (lambda j, t: j["input"].pop("path"), ["input.path", "required"]),
    "missing input file": (lambda j, t: set_key(j, "input.path", str(t / "nope.parquet")), ["input.path", "does not exist"]),
    "missing prompt column": (lambda j, t: set_key(j, "input.prompt_column", "text"), ["input.prompt_column", "'text'", "id, prompt"]),
    "missing id column": (lambda j, t: set_key(j, "input.id_column", "uid"), ["input.id_column", "'uid'"]),
    "missing passthrough column": (lambda j, t: set_key(j, "input.passthrough_columns", ["meta"]), ["passthrough_columns", "'meta'"]),
    "template over missing column": (lambda j, t: (j["input"].pop("prompt_column"), set_key(j, "input.prompt_template", "Q: {{ question }}")), ["prompt_template", "'question'"]),
    "bad template syntax": (lambda j, t: (j["input"].pop("prompt_column"), set_key(j, "input.prompt_template", "{{ prompt ")), ["prompt_template", "Jinja2"]),
    "empty input": (lambda j, t: (write_parquet(t / "empty.parquet", pa.table({"id": pa.array([], pa.int64()), "prompt": pa.array([], pa.string())})), set_key(j, "input.path", str(t / "empty.parquet"))), ["no rows"]),
    "unreadable parquet": (lambda j, t: ((t / "bad.parquet").write_bytes(b"PAR1 garbage"), set_key(j, "input.path", str(t / "bad.parquet"))), ["bad.parquet", "not a readable Parquet file"]),
    "output is a file": (lambda j, t: ((t / "afile").write_text("x"), set_key(j, "output.dir", str(t / "afile"))), ["output.dir", "is a file"]),
    "zero workers": (lambda j, t: set_key(j, "resources.num_workers", 0), ["resources.num_workers", "greater than or equal to 1", "0"]),
    "negative max_tokens": (lambda j, t: set_key(j, "sampling.max_tokens", -5), ["sampling.max_tokens", "-5"]),
    "hf without model": (lambda j, t: set_key(j, "engine.name", "hf"), ["engine.model is required"]),
    "model dir missing": (lambda j, t: (set_key(j, "engine.name", "hf"), set_key(j, "engine.model", str(t / "m"))), ["engine.model", "not a directory"]),
    "top_p out of range": (lambda j, t: set_key(j, "sampling.top_p", 1.5), ["sampling.top_p", "1.5"]),
    "hf top_logprobs": (lambda j, t: (set_key(j, "engine.name", "hf"), set_key(j, "engine.model", str(t)), set_key(j, "sampling.top_logprobs", 3)), ["sampling.top_logprobs", "engine trtllm"]),
    "hf guided json": (lambda j, t: (set_key(j, "engine.name", "hf"), set_key(j, "engine.model", str(t)), set_key(j, "output.parse", {"kind": "json", "guided": True})), ["output.parse.guided", "'json'", "engine trtllm"]),
    "hf option typo": (lambda j, t: (set_key(j, "engine.name", "hf"), set_key(j, "engine.model", str(t)), set_key(j, "engine.options", {"use_cuda_grap": True})), ["unknown key 'engine.options.use_cuda_grap'", "use_cuda_graph", "attn_implementation"]),
    "echo option wrong type": (lambda j, t: set_key(j, "engine.options", {"delay_s": "slow"}), ["engine.options.delay_s", "'slow'"]),
    "engine hook class typo": (lambda j, t: set_key(j, "engine.name", "tests.engines:CountingEko"), ["engine.name", "tests.engines:CountingEko", "CountingEko"]),
    "engine hook module typo": (lambda j, t: set_key(j, "engine.name", "tests.enignes:CountingEcho"), ["engine.name", "No module named 'tests.enignes'"]),
    "repeated ids": (lambda j, t: (write_parquet(t / "dup.parquet", pa.table({"id": [1, 2, 2, 3, 3], "prompt": list("abcde")})), set_key(j, "input.path", str(t / "dup.parquet"))), ["input.id_column", "repeats 2 id(s)", "2, 3"]),
    "repeated string ids": (lambda j, t: (write_parquet(t / "dup.parquet", pa.table({"id": ["a", "b", "a"], "prompt": list("xyz")})), set_key(j, "input.path", str(t / "dup.parquet"))), ["input.id_column", "'a'"]),
    "null id": (lambda j, t: (write_parquet(t / "nul.parquet", pa.table({"id": [1, None, 3], "prompt": list("xyz")})), set_key(j, "input.path", str(t / "nul.parquet"))), ["input.id_column", "null in 1 row", "row 2"]),
    "jsonl cut-off line": (lambda j, t: ((t / "cut.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prom\n{"id": 3, "prompt": "c"}\n'), set_key(j, "input.path", str(t / "cut.jsonl")), set_key(j, "input.format", "jsonl")), ["cut.jsonl line 2", "not valid JSON"]),
    "jsonl latin-1 byte": (lambda j, t: ((t / "l1.jsonl").write_bytes(b'{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "caf\xe9"}\n'), set_key(j, "input.path", str(t / "l1.jsonl")), set_key(j, "input.format", "jsonl")), ["l1.jsonl line 3", "not valid UTF-8"]),
    "openai-batch repeated custom_id": (lambda j, t: ((t / "b.jsonl").write_text("".join(json.dumps({"custom_id": f"r{i % 2}", "body": {"messages": [{"role": "user", "content": "hi"}]}}) + "\n" for i in range(3))), set_key(j, "input", {"path": str(t / "b.jsonl"), "format": "openai-batch"})), ["input.id_column", "'custom_id'", "'r0'"]),
    "template fails on every row": (lambda j, t: (j["input"].pop("prompt_column"), set_key(j, "input.prompt_template", "Q: {{ prompt.__class__ }}")), ["input.prompt_template", "failed on all of the first 3 rows"]),
    "per-row key unknown": (lambda j, t: set_key(j, "sampling.per_row", {"temprature": "t"}), ["sampling.per_row", "temprature"]),
    "per-row column missing": (lambda j, t: set_key(j, "sampling.per_row", {"max_tokens": "budget"}), ["sampling.per_row.max_tokens", "'budget'"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_before_work(name, base, tmp_path, capsys):
    breaker, words = CASES[name]
    result = breaker(base, tmp_path)
    text = result if name == "bad yaml" else yaml.safe_dump(base)
    code, err = run_cli(tmp_path, text, capsys)
    assert code == 2, err
    assert err.startswith("batchrun: error:") and err.count("batchrun: error:") == 1
    for w in words:
        assert w in err, f"{w!r} not in message: {err}"
    out = tmp_path / "out"
    assert not list(out.glob("*.parquet")) if out.is_dir() else True


def test_set_override_reaches_any_key_and_is_validated(base, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    assert main(["plan", str(job), "--set", "shards.rows_per_shard=2", "--set", "resources.num_workers=3"]) == 0
    shown = capsys.readouterr().out
    assert '"count": 2' in shown and '"num_workers": 3' in shown
    assert main(["plan", str(job), "--set", "sampling.max_tokens=-1"]) == 2
    assert "sampling.max_tokens" in capsys.readouterr().err
    assert main(["plan", str(job), "--set", "nokey"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("engine", [
    {"name": "hf", "options": {"use_cuda_grap": True}},  # the model dir is set below
    {"name": "tests.engines:CountingEko"},
])
def test_engine_mistakes_fail_at_plan_time(engine, base, tmp_path, capsys, demo_model):
    """`batchrun plan` imports hooks and validates engine options in the driver: exit 2, before any worker."""
    base["engine"] = {**engine, **({"model": str(demo_model)} if engine["name"] == "hf" else {})}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    assert main(["plan", str(job)]) == 2
    err = capsys.readouterr().err
    assert ("engine.options.use_cuda_grap" in err) if engine["name"] == "hf" else ("CountingEko" in err), err
