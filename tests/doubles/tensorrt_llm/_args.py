"""The LLM API's argument classes (llmapi/llm_args.py, builder.py, models/modeling_utils.py, quantization/mode.py),
as upstream declares them (UPSTREAM.md A1-A9). Pydantic models refuse unknown keys, as upstream's StrictBaseModel."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tensorrt_llm._release import SAMPLER_FLAGS, SAMPLER_TYPE


class StrictBaseModel(BaseModel):  # llmapi/utils.py: extra keys are an error
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class QuantAlgo(str, Enum):  # A5: quantization/mode.py
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"
    W4A8_QSERVE_PER_GROUP = "W4A8_QSERVE_PER_GROUP"
    W4A8_QSERVE_PER_CHANNEL = "W4A8_QSERVE_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    MIXED_PRECISION = "MIXED_PRECISION"
    NVFP4 = "NVFP4"
    NO_QUANT = "NO_QUANT"


QUANT_ALGO_LIST = list(set(QuantAlgo) - {QuantAlgo.INT8})  # A5: NO_QUANT is in it
KV_CACHE_QUANT_ALGO_LIST = [QuantAlgo.FP8, QuantAlgo.INT8, QuantAlgo.NVFP4]


class QuantConfig(StrictBaseModel):  # A6: models/modeling_utils.py
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None
    group_size: int | None = 128
    smoothquant_val: float = 0.5
    clamp_val: list[float] | None = None
    use_meta_recipe: bool = False
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None

    @property
    def _requires_calibration(self) -> bool:  # A6: every algorithm but three, NO_QUANT included; any KV quant
        return (self.quant_algo in (set(QUANT_ALGO_LIST) - {QuantAlgo.W8A16, QuantAlgo.W4A16,
                                                            QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN})
                or self.kv_cache_quant_algo in KV_CACHE_QUANT_ALGO_LIST)


class CalibConfig(StrictBaseModel):  # A7: llmapi/llm_args.py
    device: Literal["cuda", "cpu"] = "cuda"
    calib_dataset: str = "cnn_dailymail"  # a hub dataset name unless it is a local path
    calib_batches: int = 512
    calib_batch_size: int = 1
    calib_max_seq_length: int = 512
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048

    def to_dict(self) -> dict:
        return self.model_dump()


class KvCacheConfig(StrictBaseModel):  # A3: llmapi/llm_args.py (dtype: a plain str in 1.x)
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = Field(0.9, ge=0, le=1)
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: int = 0
    dtype: str = "auto"
    tokens_per_block: int = 32


@dataclass
class BuildConfig:  # A8: builder.py (a dataclass: unknown keywords are a TypeError)
    max_input_len: int = 1024
    max_seq_len: int = None
    opt_batch_size: int = 8
    max_batch_size: int = 2048
    max_beam_width: int = 1
    max_num_tokens: int = 8192
    opt_num_tokens: int | None = None
    max_prompt_embedding_table_size: int = 0
    kv_cache_type: object = None
    gather_context_logits: int = False
    gather_generation_logits: int = False
    strongly_typed: bool = True
    force_num_profiles: int | None = None
    profiling_verbosity: str = "layer_names_only"
    enable_debug_output: bool = False
    max_draft_len: int = 0
    use_refit: bool = False
    weight_sparsity: bool = False
    weight_streaming: bool = False
    use_strip_plan: bool = False
    max_encoder_input_len: int = 1024
    dry_run: bool = False
    monitor_memory: bool = False


# A1: the keyword arguments LLM(...) takes, per backend (BaseLlmArgs, TrtLlmArgs, TorchLlmArgs model_fields)
_BASE_1X = frozenset({
    "model", "tokenizer", "tokenizer_mode", "custom_tokenizer", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "model_kwargs", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size", "moe_tensor_parallel_size",
    "moe_expert_parallel_size", "enable_attention_dp", "enable_lm_head_tp_in_adp", "pp_partition", "cp_config",
    "load_format", "enable_lora", "lora_config", "kv_cache_config", "enable_chunked_prefill",
    "guided_decoding_backend", "batched_logits_processor", "iter_stats_max_iterations",
    "request_stats_max_iterations", "peft_cache_config", "scheduler_config", "cache_transceiver_config",
    "sparse_attention_config", "speculative_config", "max_batch_size", "max_input_len", "max_seq_len",
    "max_beam_width", "max_num_tokens", "gather_generation_logits", "num_postprocess_workers",
    "postprocess_tokenizer_dir", "reasoning_parser", "decoding_config", "mpi_session", "otlp_traces_endpoint",
    "backend", "return_perf_metrics", "perf_metrics_max_requests", "orchestrator_type", "env_overrides",
})
# V1: BaseLlmArgs in 1.0 (llm_args id 1520735490, read 2026-12-07): the adapter's keywords are all in it
_BASE_10 = frozenset({
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size", "dtype",
    "revision", "tokenizer_revision", "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
    "moe_cluster_parallel_size", "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp",
    "cp_config", "load_format", "fail_fast_on_attention_window_too_large", "enable_lora", "lora_config",
    "kv_cache_config", "enable_chunked_prefill", "guided_decoding_backend", "batched_logits_processor",
    "iter_stats_max_iterations", "request_stats_max_iterations", "peft_cache_config", "scheduler_config",
    "cache_transceiver_config", "speculative_config", "max_batch_size", "max_input_len", "max_seq_len",
    "max_beam_width", "max_num_tokens", "gather_generation_logits", "num_postprocess_workers",
    "postprocess_tokenizer_dir", "reasoning_parser", "decoding_config", "mpi_session", "backend",
})
BASE_LLM_ARGS = _BASE_10 if SAMPLER_FLAGS else _BASE_1X
TRT_LLM_ARGS = BASE_LLM_ARGS | {
    "enable_tqdm", "workspace", "fail_fast_on_attention_window_too_large", "enable_build_cache",
    "extended_runtime_perf_knob_config", "calib_config", "quant_config", "embedding_parallel_mode", "fast_build",
    "build_config", "enable_prompt_adapter", "max_prompt_adapter_token", "batching_type", "normalize_log_probs",
}
# TorchLlmArgs' own fields in the 1.x line (llm_args id 7019226376); the sampler's field is per release below
_TORCH_1X = {
    "garbage_collection_gen0_threshold", "cuda_graph_config", "attention_dp_config", "disable_overlap_scheduler",
    "moe_config", "nvfp4_gemm_config", "attn_backend", "sampler_force_async_worker",
    "enable_iter_perf_stats", "enable_iter_req_stats", "print_iter_log", "batch_wait_timeout_ms",
    "batch_wait_timeout_iters", "batch_wait_max_tokens_ratio", "torch_compile_config", "enable_autotuner",
    "enable_layerwise_nvtx_marker", "enable_min_latency", "stream_interval", "force_dynamic_quantization",
    "allreduce_strategy", "checkpoint_loader", "checkpoint_format", "kv_connector_config", "mm_encoder_only",
    "ray_worker_extension_cls", "ray_placement_config", "enable_sleep", "use_cute_dsl_blockscaling_mm",
    "use_cute_dsl_blockscaling_bmm", "disable_flashinfer_sampling", "max_stats_len", "layer_wise_benchmarks_config",
}
# V1: TorchLlmArgs in 1.0 (llm_args id 1520735490, read 2026-12-07): the two sampler flags, no sampler_type
_TORCH_10 = {
    "garbage_collection_gen0_threshold", "cuda_graph_config", "disable_overlap_scheduler", "moe_config",
    "attn_backend", "enable_mixed_sampler", "enable_trtllm_sampler", "enable_iter_perf_stats",
    "enable_iter_req_stats", "print_iter_log", "torch_compile_config", "enable_autotuner",
    "enable_layerwise_nvtx_marker", "load_format", "enable_min_latency", "stream_interval",
    "force_dynamic_quantization", "allreduce_strategy", "checkpoint_loader", "checkpoint_format", "connector_config",
}
TORCH_LLM_ARGS = BASE_LLM_ARGS | (_TORCH_10 if SAMPLER_FLAGS else _TORCH_1X | ({"sampler_type"} if SAMPLER_TYPE
                                                                              else set()))
# A2: _TorchLLM refuses what only the TensorRT backend takes
TRT_ONLY_ARGS = TRT_LLM_ARGS - _BASE_1X - _TORCH_1X  # the 1.x reading (L3), stricter than 1.0's
# A4: the KV cache dtypes the PyTorch backend's model loader accepts (_torch/pyexecutor: the 1.0-era list;
# later releases add "nvfp4")
VALID_TORCH_KV_CACHE_DTYPES = ("fp8", "auto")
# V2: the values sampler_type takes where it exists (SamplerType: auto | TorchSampler | TRTLLMSampler)
SAMPLER_TYPES = ("auto", "TorchSampler", "TRTLLMSampler")
