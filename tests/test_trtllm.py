"""The trtllm adapter against the strict tensorrt_llm double (tests/doubles/tensorrt_llm, rules in its UPSTREAM.md).

One test per way the adapter used to fail on its first real run (each failed on the code before this double), the
keyword-set check, plan-time refusals, and bounded shutdown."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import yaml

from batchrun.engines.base import EngineDead, Request, Sampling
from tests.conftest import PYTHON, ROOT, cli_env, write_parquet
from tests.procs import pids_where, wait_gone

DOUBLES = str(ROOT / "tests" / "doubles")


def load_double(monkeypatch, tmp_path=None, version: str | None = None):
    """The double on sys.path, playing `version` (default: the 1.2.1 of tests/doubles/tensorrt_llm-1.2.1.dist-info,
    the Dockerfile's pin): a dist-info of that version goes first on sys.path, as a real install would read."""
    monkeypatch.syspath_prepend(DOUBLES)
    if version is not None:
        site = tmp_path / f"site-{version}"
        (site / f"tensorrt_llm-{version}.dist-info").mkdir(parents=True, exist_ok=True)
        (site / f"tensorrt_llm-{version}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
        monkeypatch.syspath_prepend(str(site))
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    import tensorrt_llm
    from tensorrt_llm._common import BaseLLM

    BaseLLM.instances.clear()
    BaseLLM.calibrations.clear()
    return tensorrt_llm


@pytest.fixture
def tllm(monkeypatch):
    return load_double(monkeypatch)


def make_engine(model, sampling=None, **options):
    from batchrun.engines.trtllm import TRTLLMEngine

    return TRTLLMEngine(str(model), sampling or Sampling(max_tokens=4), dtype="float32", **options)


def collect(engine, requests, expect: int, timeout: float = 10.0) -> list:
    for r in requests:
        engine.submit(r)
    got, deadline = [], time.time() + timeout
    while len(got) < expect and time.time() < deadline:
        got += engine.poll(0.05)
    return got


def model_with_knobs(tmp_path, demo_model, **knobs):
    """A copy of the demo model dir (links) with the double's knob file."""
    d = tmp_path / "model"
    d.mkdir()
    for f in demo_model.iterdir():
        (d / f.name).symlink_to(f)
    (d / "tllm_double.json").write_text(json.dumps(knobs))
    return d


def output(tllm, outputs, prompt_ids=(1, 2, 3)):
    from tensorrt_llm._common import GenerationResult

    result = GenerationResult(1, list(prompt_ids), None)
    result.outputs = outputs
    return tllm.RequestOutput._from_generation_result(result, "p")


# ---------------------------------------------------------------- the double keeps upstream's rules


def test_double_is_as_strict_as_upstream(tllm, demo_model, monkeypatch):
    from tensorrt_llm.llmapi import GuidedDecodingParams, SamplingParams

    with pytest.raises(ValueError, match="Greedy decoding"):  # S3: top_k=1 with n > 1, whatever the temperature
        SamplingParams(top_k=1, n=2, temperature=0.8)
    SamplingParams(top_p=0.9, n=2)  # not greedy
    monkeypatch.setenv("TLLM_ALLOW_N_GREEDY_DECODING", "1")
    SamplingParams(top_k=1, n=2)
    with pytest.raises(TypeError):  # kw_only
        SamplingParams(4)
    with pytest.raises(ValueError, match="Only one guide"):
        SamplingParams(guided_decoding=GuidedDecodingParams(regex="a", json_object=True))
    with pytest.raises(RuntimeError, match="_from_generation_result"):
        tllm.RequestOutput()
    with pytest.raises(ValueError, match="got invalid argument: max_in_flight"):  # L1: ValueError, not TypeError
        tllm.LLM(str(demo_model), max_in_flight=4)
    from tensorrt_llm.llmapi import BuildConfig

    with pytest.raises(ValueError, match="specific to TensorRT backend"):  # L3
        tllm.LLM(str(demo_model), build_config=BuildConfig())
    llm = tllm.LLM(str(demo_model))
    with pytest.raises(TypeError):  # L7: no **kwargs
        llm.generate_async([1, 2], sampling_params=SamplingParams(), priority=1)
    llm.shutdown()


# ---------------------------------------------------------------- defect 1: n > 1 with greedy decoding


def test_sampling_mapping(tllm):
    from batchrun.engines.trtllm import sampling_params

    greedy = sampling_params(tllm, Sampling(max_tokens=7, n=4))
    assert (greedy.max_tokens, greedy.top_k, greedy.n, greedy.best_of) == (7, 1, 1, 1)  # one generation, fanned out
    assert greedy._greedy_decoding and greedy.include_stop_str_in_output is False and greedy.stop is None
    sampled = sampling_params(tllm, Sampling(max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3,
                                             stop=("\n", "###"), n=4), logprobs=2)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed, sampled.n) == (0.7, 0.9, 40, 3, 4)
    assert sampled.stop is None and sampled.logprobs == 2  # R5: several samples: batchrun cuts at the stop strings
    one = sampling_params(tllm, Sampling(max_tokens=5, temperature=0.7, stop=("\n", "###")))
    assert one.stop == ["\n", "###"]
    assert not sampling_params(tllm, Sampling(max_tokens=5, temperature=1.0, n=3))._greedy_decoding


def test_greedy_n_samples_are_rows_not_a_failed_shard(tllm, demo_model):
    engine = make_engine(demo_model)
    ids = engine.encode(["12+3="])[0]
    got = collect(engine, [Request("0:0", "12+3=", ids, Sampling(max_tokens=3, n=3))], expect=3)
    engine.close()
    assert sorted(c.sample_index for c in got) == [0, 1, 2]
    assert all(c.error is None and c.token_ids == list(reversed(ids))[:3] for c in got)


def test_anything_submit_raises_is_that_requests_error_rows(tllm, demo_model, monkeypatch):
    engine = make_engine(demo_model)
    real = tllm.SamplingParams

    def picky(**kw):  # upstream validates in __post_init__ (S2): a request it refuses raises in submit()
        if kw.get("seed") == 13:
            raise ValueError("refused by SamplingParams")
        return real(**kw)

    monkeypatch.setattr(tllm, "SamplingParams", picky)
    ids = engine.encode(["1+1=", "2+2="])
    got = collect(engine, [Request("0:0", "1+1=", ids[0], Sampling(max_tokens=2, seed=13, n=2, temperature=0.5)),
                           Request("0:1", "2+2=", ids[1], Sampling(max_tokens=2))], expect=3)
    engine.close()
    bad = [c for c in got if c.request_id == "0:0"]
    assert sorted(c.sample_index for c in bad) == [0, 1] and all("refused by SamplingParams" in c.error for c in bad)
    assert [c.error for c in got if c.request_id == "0:1"] == [None]


# ---------------------------------------------------------------- defect 2: logprobs on the TensorRT backend


def test_logprobs_on_the_tensorrt_backend(tllm, demo_model, tmp_path):
    from batchrun.engines.trtllm import TRTLLMOptions, build_fingerprint

    engine = make_engine(demo_model, Sampling(max_tokens=3, logprobs=True), backend="tensorrt")
    ids = engine.encode(["12+3="])[0]
    got = collect(engine, [Request("0:0", "12+3=", ids, Sampling(max_tokens=3, logprobs=True))], expect=1)
    engine.close()
    assert got[0].error is None and got[0].logprobs == [-0.5] * 3
    llm = tllm.LLM.instances[-1]
    assert llm.args["gather_generation_logits"] is True and llm.build_config.gather_generation_logits
    opts = TRTLLMOptions(backend="tensorrt", engine_cache=str(tmp_path))
    assert build_fingerprint(str(demo_model), 1, opts, True) != build_fingerprint(str(demo_model), 1, opts, False)


# ---------------------------------------------------------------- defect 3 and 4: KV cache dtypes, calibration


def plan(tmp_path, capsys, engine: dict, sampling: dict | None = None, cmd: str = "plan") -> tuple[int, str]:
    from batchrun.cli import main

    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": ["a"]}))
    job = {"engine": {"name": "trtllm", **engine}, "input": {"path": str(tmp_path / "in.parquet")},
           "sampling": sampling or {}, "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(job))
    code = main([cmd, str(tmp_path / "j.yaml")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("options,sampling,words", [
    ({"quantization": {"kv_cache": "INT8"}}, None,
     ["engine.options.quantization.kv_cache", "INT8", "PyTorch backend", "FP8"]),
    ({"quantization": {"kv_cache": "NVFP4"}}, None, ["engine.options.quantization.kv_cache", "NVFP4"]),
    ({"quantization": {"algo": "FP8"}}, None, ["engine.options.quantization.algo", "backend: tensorrt"]),
    ({"backend": "tensorrt", "quantization": {"algo": "FP8"}}, None,
     ["engine.options.quantization.algo", "calib_dataset", "cnn_dailymail", "_requires_calibration"]),
    ({"backend": "tensorrt", "quantization": {"algo": "NO_QUANT", "kv_cache": "FP8"}}, None,
     ["engine.options.quantization.kv_cache", "calib_dataset"]),
    ({"backend": "tensorrt", "quantization": {"algo": "W4A16_AWQ", "calib_dataset": "/no/such/data"}}, None,
     ["engine.options.quantization.calib_dataset", "/no/such/data", "does not exist"]),
    ({"max_batch_size": 4}, {"n": 8, "temperature": 1.0}, ["sampling.n", "engine.options.max_batch_size"]),
    ({}, {"top_logprobs": 3, "seed": 1, "temperature": 0.5},
     ["sampling.top_logprobs", "sampling.seed", "TensorRT-LLM 1.2.1", "TRTLLMSampler", "backend: tensorrt"]),
])
def test_plan_refuses_what_upstream_refuses(tllm, demo_model, tmp_path, capsys, options, sampling, words):
    code, err = plan(tmp_path, capsys, {"model": str(demo_model), "options": options}, sampling)
    assert code == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err}"


def test_plan_accepts_what_runs(tllm, demo_model, tmp_path, capsys):
    for options in ({"quantization": {"kv_cache": "FP8"}}, {"backend": "tensorrt", "quantization": {"algo": "W8A16"}},
                    {"backend": "tensorrt", "quantization": {"algo": "FP8", "calib_dataset": str(tmp_path)}}):
        code, err = plan(tmp_path, capsys, {"model": str(demo_model), "options": options})
        assert code == 0, (options, err)


def test_kv_cache_dtypes_per_backend(tllm, demo_model):
    from batchrun.engines.trtllm import TRTLLMOptions, llm_class_and_kwargs

    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 1, "auto", False,
                                   TRTLLMOptions(quantization={"kv_cache": "FP8"}, enable_chunked_prefill=True))
    assert cls is tllm.LLM and kw["kv_cache_config"].dtype == "fp8" and "quant_config" not in kw
    cls(**kw).shutdown()  # A4: fp8 loads on the PyTorch backend
    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 1, "auto", False,
                                   TRTLLMOptions(backend="tensorrt", quantization={"kv_cache": "INT8",
                                                                                   "calib_dataset": str(demo_model)}))
    assert kw["kv_cache_config"].dtype == "auto" and kw["quant_config"].kv_cache_quant_algo.value == "INT8"
    assert kw["quant_config"].quant_algo is None  # NO_QUANT is never sent (it calibrates, A6)
    cls(**kw).shutdown()  # A3: the TensorRT backend takes the KV dtype through QuantConfig only


@pytest.mark.parametrize("quant,calibrates", [
    ({"algo": "FP8"}, True), ({"algo": "W8A8_SQ_PER_CHANNEL"}, True), ({"algo": "W4A16_AWQ"}, True),
    ({"algo": "W8A16"}, False), ({"kv_cache": "INT8"}, True), ({"algo": "NO_QUANT"}, False),
])
def test_calibration_uses_the_local_dataset(tllm, demo_model, tmp_path, quant, calibrates):
    from tensorrt_llm._common import BaseLLM
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM

    from batchrun.engines.trtllm import TRTLLMOptions, llm_class_and_kwargs

    data = tmp_path / "calib"
    data.mkdir()
    opts = TRTLLMOptions(backend="tensorrt", quantization={**quant, "calib_dataset": str(data)}, max_batch_size=64,
                         max_num_tokens=4096, max_seq_len=96, kv_cache={"free_gpu_memory_fraction": 0.8,
                                                                        "enable_block_reuse": False})
    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 2, "bfloat16", False, opts)
    assert cls is TrtLLM and kw["calib_config"].calib_dataset == str(data)
    assert "quant_config" in kw or quant.get("algo") == "NO_QUANT"
    b = kw["build_config"]
    assert (b.max_batch_size, b.max_num_tokens, b.max_seq_len, b.max_input_len) == (64, 4096, 96, 96)
    assert kw["kv_cache_config"].free_gpu_memory_fraction == 0.8 and kw["kv_cache_config"].enable_block_reuse is False
    cls(**kw).shutdown()
    assert BaseLLM.calibrations == ([(str(demo_model), str(data))] if calibrates else [])


# ---------------------------------------------------------------- every keyword the adapter sends is upstream's


def test_every_keyword_the_adapter_passes_is_recorded_upstream(tllm, demo_model, tmp_path, monkeypatch):
    """L1, A1-A8, S1, S4: record what the adapter passes to each class over many option sets; compare with the
    field sets recorded from upstream (tests/doubles/tensorrt_llm/_args.py, sampling_params.py)."""
    import tensorrt_llm.llmapi as api
    import tensorrt_llm.sampling_params as sampling_params_module
    from tensorrt_llm import _args

    from batchrun.engines import trtllm
    from batchrun.engines.trtllm.options import JobNeeds
    from batchrun.spec import ParseSpec

    seen: dict[str, set] = {}

    def recording(name, cls):
        def make(*args, **kwargs):
            assert not args, f"{name} takes keywords only here"
            seen.setdefault(name, set()).update(kwargs)
            return cls(**kwargs)
        return make

    for name in ("KvCacheConfig", "BuildConfig", "QuantConfig", "CalibConfig", "GuidedDecodingParams"):
        monkeypatch.setattr(api, name, recording(name, getattr(api, name)))
    monkeypatch.setattr(tllm, "SamplingParams", recording("SamplingParams", tllm.SamplingParams))
    data = str(tmp_path)
    for opts in ({}, {"quantization": {"kv_cache": "FP8"}, "max_batch_size": 8, "max_num_tokens": 512,
                      "max_seq_len": 128, "enable_chunked_prefill": True, "pipeline_parallel_size": 2},
                 {"backend": "tensorrt", "quantization": {"algo": "FP8", "kv_cache": "INT8", "calib_dataset": data},
                  "max_batch_size": 8, "max_num_tokens": 512, "max_seq_len": 128, "max_input_len": 100}):
        for logprobs in (False, True):
            needs = JobNeeds(opts.get("backend", "pytorch"), False, 0, samples=logprobs, seeded=logprobs)
            cls, kw = trtllm.llm_class_and_kwargs(tllm, str(demo_model), 2, "auto", True,
                                                  trtllm.TRTLLMOptions(**opts), logprobs, needs=needs)
            allowed = _args.TRT_LLM_ARGS if opts.get("backend") == "tensorrt" else _args.TORCH_LLM_ARGS
            assert set(kw) | {"tokenizer", "guided_decoding_backend"} <= allowed
    for s in (Sampling(max_tokens=3), Sampling(4, 0.7, 0.9, 5, 3, ("x",), 2, True, 3)):
        trtllm.sampling_params(tllm, s, logprobs=3, guide=trtllm.guided_decoding(
            ParseSpec(kind="choice", choices=["a"], guided=True)))
    for p in (ParseSpec(kind="regex", pattern="a", guided=True), ParseSpec(kind="json", guided=True),
              ParseSpec(kind="json", guided=True, json_schema={"type": "object"})):
        trtllm.guided_decoding(p)
    fields = {
        "KvCacheConfig": set(_args.KvCacheConfig.model_fields), "QuantConfig": set(_args.QuantConfig.model_fields),
        "CalibConfig": set(_args.CalibConfig.model_fields),
        "BuildConfig": {f.name for f in dataclasses.fields(_args.BuildConfig)},
        "SamplingParams": {f.name for f in dataclasses.fields(sampling_params_module.SamplingParams)},
        "GuidedDecodingParams": {f.name for f in dataclasses.fields(sampling_params_module.GuidedDecodingParams)},
    }
    assert set(seen) == set(fields)
    for name, used in seen.items():
        assert used <= fields[name], f"{name}: {sorted(used - fields[name])} not recorded upstream"


# ---------------------------------------------------------------- defect 5: shutdown that never returns


def test_close_is_bounded_and_leaves_no_rank(tllm, demo_model, tmp_path):
    model = model_with_knobs(tmp_path, demo_model, shutdown_hangs=True)
    engine = make_engine(model, tensor_parallel_size=2, shutdown_timeout_s=1)
    ranks = pids_where(lambda c: "tllm-double-rank" in c)
    assert len(ranks) == 2
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 10
    assert wait_gone(ranks, 5) == []


def test_build_returns_when_shutdown_hangs(demo_model, tmp_path):
    """`batchrun build` as a user runs it: a process whose LLM.shutdown() never returns still exits 0."""
    model = model_with_knobs(tmp_path, demo_model, shutdown_hangs=True)
    job = {"engine": {"name": "trtllm", "model": str(model), "tensor_parallel_size": 2,
                      "options": {"backend": "tensorrt", "engine_cache": str(tmp_path / "engines"),
                                  "shutdown_timeout_s": 1}},
           "input": {"path": str(tmp_path / "in.parquet")}, "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(job))
    write_parquet(tmp_path / "in.parquet", pa.table({"prompt": ["a"]}))
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], DOUBLES])
    started = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "batchrun.cli", "build", str(tmp_path / "j.yaml")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 60 and "built:" in proc.stdout
    assert pids_where(lambda c: "tllm-double-rank" in c) == []


def test_build_once_then_reuse(tllm, demo_model, tmp_path):
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM

    from batchrun.engines.trtllm import build_engine

    options = {"backend": "tensorrt", "engine_cache": str(tmp_path / "engines"), "quantization": {"algo": "W8A16"},
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
    assert (engine.context_length, engine.max_prompt_tokens) == (256, 256)  # read back from the engine (A9)
    engine.close()


# ---------------------------------------------------------------- truncation knows the engine's context


@pytest.mark.parametrize("options,context,prompt", [
    ({"max_seq_len": 40}, 40, 40),  # PyTorch: max_num_tokens (8192) is looser than the context
    ({"max_seq_len": 4096, "max_num_tokens": 64}, 4096, 64),
    ({"max_seq_len": 4096, "max_num_tokens": 64, "enable_chunked_prefill": True}, 4096, None),
    ({"backend": "tensorrt", "max_seq_len": 40}, 40, 40),
    ({"backend": "tensorrt", "max_seq_len": 40, "max_input_len": 16}, 40, 16),
])
def test_engine_knows_its_context(tllm, demo_model, options, context, prompt):
    engine = make_engine(demo_model, **options)
    assert (engine.context_length, engine.max_prompt_tokens) == (context, prompt)
    engine.close()
    default = make_engine(demo_model)  # nothing set: the checkpoint's max_position_embeddings
    assert default.context_length == json.loads((demo_model / "config.json").read_text())["max_position_embeddings"]
    default.close()


# ---------------------------------------------------------------- outputs


def test_output_mapping(tllm):
    from tensorrt_llm.executor.result import CompletionOutput, Logprob

    from batchrun.engines.trtllm import to_completions

    c = to_completions("0:1", output(tllm, [CompletionOutput(0, "ab", [5, 6], finish_reason="stop")]), ())[0]
    assert (c.text, c.finish_reason, c.num_prompt_tokens, c.num_generated_tokens, c.error) == ("ab", "stop", 3, 2, None)
    c = to_completions("x", output(tllm, [CompletionOutput(0, "a", [5], finish_reason="length")]), ())[0]
    assert c.finish_reason == "length"
    c = to_completions("x", output(tllm, [CompletionOutput(0, "a", [5], finish_reason="timeout")]), ())[0]
    assert c.finish_reason == "error" and "timeout" in c.error  # the request's own time ran out: an error row
    c = to_completions("x", output(tllm, [CompletionOutput(0, "a", [5], finish_reason=None)]), ())[0]
    assert c.finish_reason == "error" and "without a finish reason" in c.error  # R5: aborted with its request
    with pytest.raises(EngineDead, match="cancelled"):  # E3: only a shutting-down executor aborts batchrun's requests
        to_completions("x", output(tllm, [CompletionOutput(0, "a", [5], finish_reason="cancelled")]), ())
    c = to_completions("x", output(tllm, [CompletionOutput(0, "a", [5, 6], finish_reason="length",
                                                           logprobs=[{5: Logprob(-0.1), 9: Logprob(-2.0)},
                                                                     {6: Logprob(-0.3)}])]), ())[0]
    assert c.logprobs == [-0.1, -0.3]
    two = to_completions("3:4", output(tllm, [CompletionOutput(0, "a", [5], finish_reason="stop"),
                                              CompletionOutput(1, "b", [6, 7], finish_reason="length")]), ())
    assert [(c.sample_index, c.text, c.finish_reason) for c in two] == [(0, "a", "stop"), (1, "b", "length")]


def test_reused_prompt_tokens_come_from_the_results_cached_tokens(tllm, demo_model):
    """R4: the request's cached_tokens reaches each completion; a release whose results lack it (the older
    result.py) reads as unknown; prefix_reuse follows kv_cache.enable_block_reuse (A3, on by default)."""
    from tensorrt_llm.executor.result import CompletionOutput

    from batchrun.engines.trtllm import to_completions

    engine = make_engine(demo_model)
    assert engine.prefix_reuse is True
    rubric = "Grade the sum, digits only; no words and no spaces at all in the answer. "  # 73 tokens
    texts = [rubric + "1+2=", rubric + "30+4="]
    ids = engine.encode(texts)
    first = collect(engine, [Request("0:0", texts[0], ids[0], Sampling(max_tokens=3))], expect=1)[0]
    second = collect(engine, [Request("0:1", texts[1], ids[1], Sampling(max_tokens=3))], expect=1)[0]
    assert first.num_cached_prompt_tokens == 0 and second.num_cached_prompt_tokens == 64  # 2 whole blocks of 32
    engine.close()
    off = make_engine(demo_model, kv_cache={"enable_block_reuse": False})
    assert off.prefix_reuse is False
    got = collect(off, [Request(f"0:{i}", t, x, Sampling(max_tokens=3)) for i, (t, x) in enumerate(zip(texts, ids))],
                  expect=2)
    assert [c.num_cached_prompt_tokens for c in got] == [0, 0]
    off.close()
    old = output(tllm, [CompletionOutput(0, "a", [5], finish_reason="stop")])
    del old.cached_tokens  # 1.0's GenerationResultBase has no such attribute
    assert to_completions("x", old, ())[0].num_cached_prompt_tokens is None


def test_windowed_async_submission_out_of_order(tllm, demo_model):
    engine = make_engine(demo_model)
    texts = [f"{i}+{i}=" for i in range(40)]
    ids = engine.encode(texts)
    pending, order, done = list(range(40)), [], {}
    while len(done) < 40:  # the worker's loop: keep at most the window submitted
        while pending and len(order) - len(done) < 16:
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
    assert llm._shutdown


def test_per_request_engine_error_becomes_an_error_row(tllm, demo_model):
    engine = make_engine(demo_model)
    texts = ["1+1=", "FAILREQ", "2+2="]
    got = {c.request_id: c for c in collect(engine, [Request(f"0:{i}", t, ids, Sampling(max_tokens=3))
                                                     for i, (t, ids) in enumerate(zip(texts, engine.encode(texts)))],
                                            expect=3)}
    assert got["0:1"].finish_reason == "error" and "rejected this request" in got["0:1"].error
    assert got["0:0"].error is None and got["0:2"].error is None
    engine.close()


def test_executor_death_is_engine_dead_and_never_error_rows(tllm, demo_model, tmp_path):
    """E1-E5 on the double: the worker dies while generating request 3; its error is raised once in that request's
    result, the executor shuts down, the results still in flight end 'cancelled', later submissions are refused. The
    adapter turns all of it into EngineDead: not one error completion comes out."""
    engine = make_engine(model_with_knobs(tmp_path, demo_model, die_after=3))
    texts = [f"{i}+{i}=" for i in range(12)]
    for i, ids in enumerate(engine.encode(texts)):
        engine.submit(Request(f"0:{i}", texts[i], ids, Sampling(max_tokens=3)))
    got, deadline = [], time.time() + 10
    with pytest.raises(EngineDead, match="TensorRT-LLM executor died: RuntimeError: Executor worker died"):
        while time.time() < deadline:
            got += engine.poll(0.05)
    assert all(c.error is None for c in got) and len(got) < len(texts)
    engine.submit(Request("0:99", "1+1=", engine.encode(["1+1="])[0], Sampling(max_tokens=3)))  # refused (L7)
    with pytest.raises(EngineDead):
        engine.poll(0.05)
    engine.close()


def test_bad_options_are_refused_with_the_key(tllm, demo_model, tmp_path, capsys):
    for cmd in ("plan", "run"):  # checked before any work, without importing tensorrt_llm
        code, err = plan(tmp_path, capsys, {"model": str(demo_model), "options": {"quantization": {"algo": "FP9"}}},
                         cmd=cmd)
        assert code == 2
        assert "engine.options.quantization.algo" in err and "'FP9'" in err and "W4A16_AWQ" in err


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

    engine = make_engine(demo_model, Sampling(max_tokens=3, logprobs=True, top_logprobs=2), backend="tensorrt",
                         guide=ParseSpec(kind="choice", choices=["1", "2"], guided=True))
    assert tllm.LLM.instances[-1].args["guided_decoding_backend"] == "xgrammar"
    ids = engine.encode(["12+3="])[0]
    c = collect(engine, [Request("0:0", "12+3=", ids, Sampling(max_tokens=3, logprobs=True, top_logprobs=2,
                                                                temperature=0.5, seed=5))], expect=1)[0]
    engine.close()
    assert c.logprobs == [-0.5] * 3  # the sampled token's entry, not the likeliest other one
    assert [sorted(step) for step in c.top_logprobs] == [sorted([t, t + 1]) for t in c.token_ids]
    assert all(step[t] == -0.5 for step, t in zip(c.top_logprobs, c.token_ids))


# ---------------------------------------------------------------- through the runner, on a real Ray cluster


@pytest.mark.slow
def test_trtllm_engine_through_the_runner(tmp_path, ray_cluster, demo_model):
    """Ray workers drive the adapter (and the double behind it) like any engine: every row once, right outputs; a
    prompt past the TensorRT engine's max_seq_len is cut (input.truncation: left), not refused by the engine."""
    from transformers import AutoTokenizer

    from batchrun.runner import JobRunner
    from batchrun.spec import validate_spec
    from tests.conftest import read_output

    prompts = [f"{i}+{2 * i}=" for i in range(60)]
    prompts[7] = "FAILREQ"
    prompts[8] = "1+1=" * 20  # 80+ tokens; the engine holds 24
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(60)), "prompt": prompts}))
    spec = validate_spec({
        "engine": {"name": "trtllm", "model": str(demo_model), "max_in_flight": 8,
                   "options": {"backend": "tensorrt", "max_seq_len": 24}},
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", "truncation": "left"},
        "sampling": {"max_tokens": 3}, "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 9},
    })
    JobRunner(spec, show_progress=False).run()
    tok = AutoTokenizer.from_pretrained(demo_model)
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == list(range(60))
    assert rows[7]["finish_reason"] == "error" and "rejected" in rows[7]["error"]
    assert rows[8]["error"] is None and rows[8]["num_prompt_tokens"] == 21
    for i, p in enumerate(prompts):
        if i not in (7, 8):
            ids = tok.encode(p, add_special_tokens=False)
            assert rows[i]["generated_text"] == tok.decode(list(reversed(ids))[:3])


@pytest.mark.slow
def test_job_ends_in_bounded_time_when_shutdown_hangs(tmp_path, ray_cluster, demo_model):
    """3 workers whose LLM.shutdown() never returns: exit 0, every row, and the end waits once (in parallel), not
    once per worker; no rank is left behind."""
    from batchrun.runner import JobRunner
    from batchrun.spec import validate_spec
    from tests.conftest import read_output

    model = model_with_knobs(tmp_path, demo_model, shutdown_hangs=True)
    write_parquet(tmp_path / "in.parquet", pa.table({"id": list(range(90)), "prompt": [f"{i}+1=" for i in range(90)]}))
    spec = validate_spec({
        "engine": {"name": "trtllm", "model": str(model), "options": {"shutdown_timeout_s": 5}},
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
        "sampling": {"max_tokens": 2}, "output": {"dir": str(tmp_path / "out")},
        "resources": {"num_workers": 3}, "shards": {"rows_per_shard": 10},
    })
    summary = JobRunner(spec, show_progress=False).run().summary
    assert sorted(r["id"] for r in read_output(tmp_path / "out").to_pylist()) == list(range(90))
    closed = len(summary["worker_niceness"])  # workers whose run() returned and that were closed at the end
    assert summary["status"] == "succeeded" and summary["worker_restarts"] == 0 and closed >= 1
    # each close() waits its 5 s shutdown timeout; in parallel the job waits about one of them, whatever the number
    # of workers that loaded in time (one fast worker may take every shard on a busy machine: not asserted)
    assert 5 <= summary["close_wait_s"] < 9
    assert pids_where(lambda c: "tllm-double-rank" in c) == []


# ---------------------------------------------------------------- scoring: log-likelihoods from context logits


def score_all(engine, rows: list[tuple], timeout: float = 60.0) -> dict:
    for key, pairs in rows:
        engine.submit(Request(key, "", None, Sampling(max_tokens=1), pairs=tuple(pairs)))
    got, deadline = {}, time.time() + timeout
    while len(got) < len(rows):
        assert time.time() < deadline, f"{len(got)} of {len(rows)} rows scored"
        got.update({c.request_id: c for c in engine.poll(0.1)})
    return got


def test_scoring_on_trtllm_equals_the_hf_scorer(tllm, demo_model):
    """Choice log-likelihoods from TensorRT-LLM's context logits (UPSTREAM.md P1-P4) equal the HF scoring engine's,
    which equal lm-eval's (test_evals.py): the double's logits are the checkpoint's own, so a position off by one
    shows. A row's choices reuse its context's KV blocks, whose positions have no logits; choices that share their
    first tokens across a block boundary are asked again under a cache salt of their own."""
    from batchrun.engines.hf_score import HFScoreEngine
    from batchrun.engines.trtllm import TRTScoreEngine
    from batchrun.loglikelihood import encode_pair

    trt = TRTScoreEngine(str(demo_model), Sampling(max_tokens=1), dtype="float32")
    hf = HFScoreEngine(str(demo_model), Sampling(max_tokens=1), dtype="float32", device="cpu")
    assert trt.prefix_token_id == hf.prefix_token_id and trt.encode(["1+1="]) == hf.encode(["1+1="])
    boundary = "Sum:"  # a context of 31 tokens: choices sharing a first token share a whole 32-token block
    while len(trt.tok_encode(boundary)) < 31:
        boundary += "9"
    cases = [("Question: 2+2=?\nAnswer:", ["4", "5", "22"]), ("", ["hello world", "x"]),
             ("12+30=" * 8, ["42", "43", "7"]), (boundary, ["12", "13"])]
    rows = [(f"r{i}", [encode_pair(trt.tok_encode, trt.prefix_token_id, ctx, " " + c) for c in choices])
            for i, (ctx, choices) in enumerate(cases)]
    try:
        want, got = score_all(hf, rows), score_all(trt, rows)
        for key, _ in rows:
            assert got[key].error is None, got[key].error
            assert got[key].pair_greedy == want[key].pair_greedy and got[key].pair_tokens == want[key].pair_tokens
            assert all(abs(a - b) < 1e-4 for a, b in zip(got[key].pair_logprobs, want[key].pair_logprobs)), key
        assert got["r2"].num_cached_prompt_tokens >= 32  # the shared context was computed once per row
        assert trt.resubmitted >= 1  # the boundary row's second choice, asked again without reuse
        assert score_all(trt, [("bad", [((1,), ())])])["bad"].error == "choice 0 encodes to no tokens"
    finally:
        trt.close()
        hf.close()


def test_scoring_on_the_tensorrt_backend_builds_with_context_logits(tllm, demo_model, tmp_path):
    """The TensorRT backend returns context logits only from an engine built with gather_context_logits (P2, P4):
    batchrun builds it so for a scoring job, and refuses at plan time a prebuilt engine without it."""
    import asyncio

    from batchrun.engines import check_engine
    from batchrun.engines.trtllm import TRTLLMOptions, TRTScoreEngine, build_engine, llm_class_and_kwargs
    from batchrun.errors import SpecError
    from batchrun.spec import validate_spec

    opts = TRTLLMOptions(backend="tensorrt")
    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 1, "float32", False, opts, scoring=True)
    assert kw["build_config"].gather_context_logits
    cls, kw = llm_class_and_kwargs(tllm, str(demo_model), 1, "float32", False, opts)
    plain = cls(**kw)

    async def ask():
        return plain.generate_async([1, 2, 3], tllm.SamplingParams(max_tokens=1, return_context_logits=True))

    with pytest.raises(ValueError, match="gather_context_logits=True"):
        asyncio.run(ask())
    plain.shutdown()
    engine = TRTScoreEngine(str(demo_model), Sampling(max_tokens=1), dtype="float32", backend="tensorrt")
    try:
        (c,) = score_all(engine, [("k", [((1, 5, 6), (7, 8))])]).values()
        assert c.error is None and len(c.pair_logprobs) == 1 and c.pair_logprobs[0] < 0
    finally:
        engine.close()

    cache = tmp_path / "engines"
    built, _ = build_engine(str(demo_model), 1, "float32", False, {"backend": "tensorrt", "engine_cache": str(cache)})
    job = {"engine": {"name": "trtllm", "model": str(built), "options": {"backend": "tensorrt"}},
           "input": {"path": "x.parquet"}, "output": {"dir": str(tmp_path / "out")},
           "score": {"method": "loglikelihood", "choices_column": "c", "reference_column": "a"}}
    with pytest.raises(SpecError, match="built without gather_context_logits"):
        check_engine(validate_spec(job))


@pytest.mark.slow
def test_a_multiple_choice_job_on_trtllm_writes_the_hf_engines_numbers(tmp_path, ray_cluster, demo_model):
    """The same eval job on engine trtllm (through Ray workers and the double) and on engine hf: the same
    choice_logprobs, predictions and acc; error rows the same."""
    from batchrun.runner import JobRunner
    from batchrun.spec import validate_spec
    from tests.conftest import read_output
    from tests.test_evals import mc_job

    outs = {}
    for name in ("hf", "trtllm"):
        (tmp_path / name).mkdir()
        raw = mc_job(tmp_path / name)
        raw["engine"] = {"name": name, "model": str(demo_model), "dtype": "float32"}
        raw["resources"]["num_workers"] = 2
        summary = JobRunner(validate_spec(raw), show_progress=False).run().summary
        outs[name] = ({r["id"]: r for r in read_output(tmp_path / name / "out").to_pylist()}, summary["metrics"])
    (hf_rows, hf_metrics), (trt_rows, trt_metrics) = outs["hf"], outs["trtllm"]
    assert sorted(trt_rows) == sorted(hf_rows) and trt_metrics["acc"] == hf_metrics["acc"]
    for rid, row in hf_rows.items():
        other = trt_rows[rid]
        assert (other["error"], other["prediction"], other["choice_tokens"]) == \
            (row["error"], row["prediction"], row["choice_tokens"])
        assert all(abs(a - b) < 1e-4 for a, b in zip(other["choice_logprobs"] or [], row["choice_logprobs"] or []))


def test_a_scoring_engine_whose_executor_dies_raises_engine_dead_and_never_error_rows(tllm, demo_model, tmp_path):
    """The executor dies while pairs are being scored (E1-E3): poll raises EngineDead; no row comes back as an error
    (a row is either scored whole or not at all: its shard goes back to the queue)."""
    from batchrun.engines.trtllm import TRTScoreEngine

    engine = TRTScoreEngine(str(model_with_knobs(tmp_path, demo_model, die_after=5)), Sampling(max_tokens=1),
                            dtype="float32")
    rows = [(f"r{i}", [((1, 5, 6 + i), (7,)), ((1, 5, 6 + i), (8, 9))]) for i in range(8)]
    for key, pairs in rows:
        engine.submit(Request(key, "", None, Sampling(max_tokens=1), pairs=tuple(pairs)))
    got, deadline = [], time.time() + 30
    with pytest.raises(EngineDead, match="executor died"):
        while time.time() < deadline:
            got += engine.poll(0.1)
    assert all(c.error is None and len(c.pair_logprobs) == 2 for c in got) and len(got) < len(rows)
    engine.close()
