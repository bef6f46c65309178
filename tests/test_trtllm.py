"""The trtllm adapter against the tensorrt_llm test double (tests/doubles), which follows the documented LLM API."""

from __future__ import annotations

import sys
import time

import pytest

from batchrun.engines.base import Request, Sampling
from tests.conftest import ROOT

DOUBLES = str(ROOT / "tests" / "doubles")


@pytest.fixture
def tllm(monkeypatch):
    monkeypatch.syspath_prepend(DOUBLES)
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    import tensorrt_llm

    tensorrt_llm.LLM.instances.clear()
    return tensorrt_llm


def test_sampling_mapping(tllm):
    from batchrun.engines.trtllm import sampling_params

    greedy = sampling_params(tllm, Sampling(max_tokens=7))
    assert (greedy.max_tokens, greedy.temperature, greedy.top_k, greedy.n) == (7, 0.0, 1, 1)
    assert greedy.include_stop_str_in_output is False and greedy.seed is None and greedy.stop is None
    sampled = sampling_params(tllm, Sampling(max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3,
                                             stop=("\n", "###")), n=4, logprobs=2)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed) == (0.7, 0.9, 40, 3)
    assert sampled.stop == ["\n", "###"] and sampled.n == 4 and sampled.logprobs == 2


def test_output_mapping(tllm):
    from tensorrt_llm import CompletionOutput, RequestOutput

    from batchrun.engines.trtllm import to_completion

    def out(**kw):
        o = RequestOutput(1, "p", [1, 2, 3], None)
        o.outputs = [CompletionOutput(0, **kw)]
        return o

    c = to_completion("0:1", out(text="ab", token_ids=[5, 6], finish_reason="stop"), ())
    assert (c.text, c.finish_reason, c.num_prompt_tokens, c.num_generated_tokens, c.error) == ("ab", "stop", 3, 2, None)
    assert to_completion("x", out(text="a", token_ids=[5], finish_reason="length"), ()).finish_reason == "length"
    for reason in ("timeout", "cancelled"):
        c = to_completion("x", out(text="a", token_ids=[5], finish_reason=reason), ())
        assert c.finish_reason == "error" and reason in c.error
    from tensorrt_llm.executor.result import Logprob as LP

    c = to_completion("x", out(text="a", token_ids=[5, 6], finish_reason="length",
                               logprobs=[{5: LP(-0.1), 9: LP(-2.0)}, {6: LP(-0.3)}]), ())
    assert c.logprobs == [-0.1, -0.3]


def make_engine(demo_model, **options):
    from batchrun.engines.trtllm import TRTLLMEngine

    return TRTLLMEngine(str(demo_model), Sampling(max_tokens=4), dtype="float32", max_in_flight=16, **options)


def test_windowed_async_submission_out_of_order(tllm, demo_model):
    engine = make_engine(demo_model)
    texts = [f"{i}+{i}=" for i in range(40)]
    ids = engine.encode(texts)
    pending, order, done = list(range(40)), [], {}
    while len(done) < 40:  # the worker's loop: keep at most the window submitted
        while pending and len(order) - len(done) < engine.max_in_flight:
            i = pending.pop(0)
            engine.submit(Request(f"0:{i}", texts[i], ids[i], Sampling(max_tokens=3)))
            order.append(i)
        for c in engine.poll(0.05):
            assert c.request_id not in done
            done[c.request_id] = c
    finished = [int(r.split(":")[1]) for r in done]
    assert sorted(finished) == list(range(40)) and finished != list(range(40))  # all of them, out of order
    llm = tllm.LLM.instances[-1]
    assert llm.max_in_flight_seen <= 16
    c = done["0:12"]
    assert c.token_ids == list(reversed(ids[12]))[:3] and c.finish_reason == "length"
    engine.close()
    assert llm.is_shutdown


def test_per_request_error_becomes_an_error_row(tllm, demo_model):
    engine = make_engine(demo_model)
    texts = ["1+1=", "FAILREQ", "2+2="]
    for i, (t, ids) in enumerate(zip(texts, engine.encode(texts))):
        engine.submit(Request(f"0:{i}", t, ids, Sampling(max_tokens=3)))
    got = {}
    deadline = time.time() + 10
    while len(got) < 3 and time.time() < deadline:
        got.update({c.request_id: c for c in engine.poll(0.05)})
    assert got["0:1"].finish_reason == "error" and "rejected this request" in got["0:1"].error
    assert got["0:0"].error is None and got["0:2"].error is None
    engine.close()


@pytest.mark.parametrize("quant,expect_algo,expect_kv", [
    ({"algo": "FP8"}, "FP8", None),
    ({"algo": "W8A8_SQ_PER_CHANNEL"}, "W8A8_SQ_PER_CHANNEL", None),  # SmoothQuant
    ({"algo": "W4A16_AWQ"}, "W4A16_AWQ", None),
    ({"algo": "W8A16"}, "W8A16", None),
    ({"kv_cache": "INT8"}, None, "INT8"),
    ({"algo": "FP8", "kv_cache": "FP8"}, "FP8", "FP8"),
])
def test_quantization_and_build_config_translation(tllm, demo_model, quant, expect_algo, expect_kv):
    from batchrun.engines.trtllm import TRTLLMOptions, llm_class_and_kwargs
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM

    opts = TRTLLMOptions(backend="tensorrt", quantization=quant, max_batch_size=64, max_num_tokens=4096,
                         max_seq_len=2048, kv_cache={"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False})
    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 2, "bfloat16", False, opts)
    assert cls is TrtLLM
    q = kw["quant_config"]
    assert (q.quant_algo and q.quant_algo.value) == expect_algo
    assert (q.kv_cache_quant_algo and q.kv_cache_quant_algo.value) == expect_kv
    b = kw["build_config"]
    assert (b.max_batch_size, b.max_num_tokens, b.max_seq_len) == (64, 4096, 2048)
    assert kw["kv_cache_config"].free_gpu_memory_fraction == 0.8 and kw["kv_cache_config"].enable_block_reuse is False
    assert kw["tensor_parallel_size"] == 2 and kw["dtype"] == "bfloat16"
    cls(**kw)  # the double's constructor accepts exactly the documented keyword arguments


def test_pytorch_backend_takes_kv_dtype_and_refuses_online_quantization(tllm, demo_model):
    from batchrun.engines.trtllm import TRTLLMOptions, llm_class_and_kwargs

    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 1, "auto", False,
                                   TRTLLMOptions(quantization={"kv_cache": "FP8"}, enable_chunked_prefill=True))
    assert cls is tllm.LLM and kw["kv_cache_config"].dtype == "fp8" and kw["enable_chunked_prefill"] is True
    assert "build_config" not in kw and "quant_config" not in kw
    cls(**kw)
    with pytest.raises(ValueError, match="backend: tensorrt"):
        llm_class_and_kwargs(tllm, str(demo_model), 1, "auto", False, TRTLLMOptions(quantization={"algo": "FP8"}))


def test_bad_options_are_refused_with_the_key(tllm, demo_model, tmp_path, capsys):
    import pyarrow as pa
    import yaml

    from batchrun.cli import main
    from tests.conftest import write_parquet

    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": ["a"]}))
    job = {"engine": {"name": "trtllm", "model": str(demo_model), "options": {"quantization": {"algo": "FP9"}}},
           "input": {"path": str(tmp_path / "in.parquet")}, "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(job))
    for cmd in ("plan", "run"):  # checked before any work, without importing tensorrt_llm
        assert main([cmd, str(tmp_path / "j.yaml")]) == 2
        err = capsys.readouterr().err
        assert "engine.options.quantization.algo" in err and "'FP9'" in err and "W4A16_AWQ" in err


def test_build_once_then_reuse(tllm, demo_model, tmp_path, capsys):
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM

    from batchrun.engines.trtllm import build_engine

    options = {"backend": "tensorrt", "engine_cache": str(tmp_path / "engines"), "quantization": {"algo": "FP8"},
               "max_seq_len": 256}
    builds = TrtLLM.builds
    path, built = build_engine(str(demo_model), 1, "float16", False, options)
    assert built and (path / "batchrun_build.json").exists() and TrtLLM.builds == builds + 1
    path2, built2 = build_engine(str(demo_model), 1, "float16", False, options)
    assert (path2, built2) == (path, False) and TrtLLM.builds == builds + 1  # same fingerprint: a no-op
    other, built3 = build_engine(str(demo_model), 2, "float16", False, options)  # TP changes the fingerprint
    assert built3 and other != path
    engine = make_engine(demo_model, **options)  # workers load the built engine instead of building their own
    assert tllm.LLM.instances[-1].model == str(path) and TrtLLM.builds == builds + 2
    engine.close()


@pytest.mark.slow
def test_trtllm_engine_through_the_runner(tmp_path, ray_cluster, demo_model):
    """Ray workers drive the adapter (and the double behind it) like any engine: every row once, right outputs."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from batchrun.runner import JobRunner
    from batchrun.spec import validate_spec
    from tests.conftest import read_output, write_parquet

    prompts = [f"{i}+{2 * i}=" for i in range(60)]
    prompts[7] = "FAILREQ"
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(60)), "prompt": prompts}))
    spec = validate_spec({
        "engine": {"name": "trtllm", "model": str(demo_model), "max_in_flight": 8},
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
        "sampling": {"max_tokens": 3}, "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 9},
    })
    JobRunner(spec, show_progress=False).run()
    tok = AutoTokenizer.from_pretrained(demo_model)
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == list(range(60))
    assert rows[7]["finish_reason"] == "error" and "rejected" in rows[7]["error"]
    for i, p in enumerate(prompts):
        if i != 7:
            ids = tok.encode(p, add_special_tokens=False)
            assert rows[i]["generated_text"] == tok.decode(list(reversed(ids))[:3])


def test_n_samples_map_to_sample_indexes(tllm):
    from tensorrt_llm import CompletionOutput, RequestOutput

    from batchrun.engines.trtllm import to_completions

    o = RequestOutput(1, "p", [1, 2], None)
    o.outputs = [CompletionOutput(0, "a", [5], finish_reason="stop"), CompletionOutput(1, "b", [6, 7], finish_reason="length")]
    got = to_completions("3:4", o, ())
    assert [(c.request_id, c.sample_index, c.text, c.finish_reason) for c in got] == \
        [("3:4", 0, "a", "stop"), ("3:4", 1, "b", "length")]


def test_guided_decoding_and_top_logprobs(tllm, demo_model):
    """Guides map onto GuidedDecodingParams (choices: an alternation regex) with the xgrammar backend switched on;
    top-k logprobs come back per token, and the logprobs column keeps the sampled token's value."""
    import re

    from batchrun.engines.trtllm import guided_decoding
    from batchrun.spec import ParseSpec

    choice = guided_decoding(ParseSpec(kind="choice", choices=["yes", "no", "n/a (?)"], guided=True))
    assert re.fullmatch(choice.regex, "n/a (?)") and re.fullmatch(choice.regex, "no")
    assert not re.fullmatch(choice.regex, "maybe")
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    assert guided_decoding(ParseSpec(kind="json", guided=True, json_schema=schema)).json == schema
    assert guided_decoding(ParseSpec(kind="json", guided=True)).json_object is True
    assert guided_decoding(ParseSpec(kind="regex", pattern=r"\d+", guided=True)).regex == r"\d+"

    from batchrun.engines.trtllm import TRTLLMEngine

    engine = TRTLLMEngine(str(demo_model), Sampling(max_tokens=3), dtype="float32",
                          guide=ParseSpec(kind="choice", choices=["1", "2"], guided=True))
    assert tllm.LLM.instances[-1].args["guided_decoding_backend"] == "xgrammar"
    ids = engine.encode(["12+3="])[0]
    engine.submit(Request("0:0", "12+3=", ids, Sampling(max_tokens=3, logprobs=True, top_logprobs=2, seed=5)))
    got = []
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        got = engine.poll(0.1)
    engine.close()
    c = got[0]
    assert c.logprobs == [-0.5] * 3  # the sampled token's entry, not the likeliest other one
    assert [sorted(step) for step in c.top_logprobs] == [sorted([t, t + 1]) for t in c.token_ids]
    assert all(step[t] == -0.5 for step, t in zip(c.top_logprobs, c.token_ids))


def test_engine_comparison_bench(demo_model, tmp_path, capsys, monkeypatch):
    """`batchrun bench --engines hf,trtllm`: every installed engine on the same prompts, the others listed as such."""
    import json

    from batchrun.cli import main

    args = ["bench", "--engines", "hf,trtllm", "--model", str(demo_model), "--dtype", "float32", "--n", "24",
            "--max-tokens", "4", "--json", str(tmp_path / "b.json")]
    monkeypatch.setattr("batchrun.bench.installed", lambda e: e == "hf")  # this machine, whatever is on sys.path
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| trtllm | not installed |" in out and "| hf | ok | 24 |" in out
    hf = json.loads((tmp_path / "b.json").read_text())[0]
    assert hf["tokens"] > 24 and hf["tok_s"] > 0 and 0 < hf["first_output_s"] <= hf["seconds"]
    assert hf["peak_memory_mb"] > 0
    monkeypatch.undo()
    monkeypatch.syspath_prepend(DOUBLES)  # the documented-API double stands in for an installed TensorRT-LLM
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(args) == 0
    rows = {r["engine"]: r for r in json.loads((tmp_path / "b.json").read_text())}
    assert rows["trtllm"]["status"] == "ok" and rows["trtllm"]["requests"] == 24
