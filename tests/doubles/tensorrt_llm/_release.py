"""Which release this double plays: its distribution's version, as a real install reports it
(`importlib.metadata`). tests/doubles/tensorrt_llm-1.2.1.dist-info makes it 1.2.1 (the Dockerfile's pin); a test
that needs another release puts its own dist-info earlier on sys.path (tests/test_trtllm.py `release`).
Each difference the double models is a flag here, named by the UPSTREAM.md fact it comes from."""

import importlib.metadata

from packaging.version import Version

VERSION = importlib.metadata.version("tensorrt_llm")
R = Version(VERSION)

SAMPLER_FLAGS = R < Version("1.1.0rc0")  # V1: enable_mixed_sampler / enable_trtllm_sampler, greedy without them
CACHE_SALT = R >= Version("1.1.0rc0")  # V4: generate_async(cache_salt=, scheduling_params=)
CACHED_TOKENS = R >= Version("1.1.0rc0")  # R4: results carry cached_tokens (absent from the older result.py)
TORCH_TOP_LOGPROBS = R >= Version("1.1.0rc0")  # V5: TorchSampler returns top-k logprobs
GREEDY_BY_TEMPERATURE = R >= Version("1.2.0rc2")  # S5: params_imply_greedy_decoding counts temperature == 0
TENSORRT_BACKEND = R < Version("1.3.0rc22")  # V6: _tensorrt_engine, BuildConfig gone
# The newest main read (modelled from 1.4 on; which 1.3 rc each arrived in was not established):
NEWEST = R >= Version("1.4.0rc0")
SAMPLER_TYPE = not SAMPLER_FLAGS and not NEWEST  # V2: sampler_type (removed on main: TorchSampler honours seeds, V3)
HEALTH_CHECK = NEWEST  # V8: BaseLLM._check_health()
KV_CACHE_CAPACITY = NEWEST  # V9: BaseLLM.get_kv_cache_capacity()
ERROR_BUDGET = NEWEST  # E7: repeated step errors go fatal; an event-loop death is broadcast to every pending result
REQUEST_ERROR_AT_SUBMIT = NEWEST  # L9: prompt_len > max_num_tokens raises RequestError from generate_async
