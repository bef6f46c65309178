#!/usr/bin/env bash
# One-command check of the whole TensorRT-LLM path on a GPU machine (inside the image built from ./Dockerfile):
# a small public model, TP = the number of visible GPUs, a few prompts, and a throughput line.
# Usage: launch/smoke-trtllm.sh [MODEL] [ROWS]     e.g. launch/smoke-trtllm.sh TinyLlama/TinyLlama-1.1B-Chat-v1.0 512
set -euo pipefail
MODEL="${1:-${SMOKE_MODEL:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}}"
ROWS="${2:-256}"
GPUS="$(nvidia-smi -L | wc -l)"
WORK="$(mktemp -d)"
if [ ! -d "$MODEL" ]; then  # a hub name: fetch it once (the only step that needs the network)
  huggingface-cli download "$MODEL" --local-dir "$WORK/model" >/dev/null
  MODEL="$WORK/model"
fi
python - "$WORK/prompts.parquet" "$ROWS" <<'PY'
import sys, pyarrow as pa, pyarrow.parquet as pq
n = int(sys.argv[2])
topics = ["the sea", "a city at night", "prime numbers", "a mountain", "coffee", "rain", "a robot", "trains"]
pq.write_table(pa.table({"id": list(range(n)), "prompt": [f"Write two sentences about {topics[i % 8]}." for i in range(n)]}), sys.argv[1])
PY
cat > "$WORK/job.yaml" <<YAML
engine: {name: trtllm, model: $MODEL, tensor_parallel_size: $GPUS}
input: {path: $WORK/prompts.parquet, id_column: id}
sampling: {max_tokens: 128, temperature: 0.0}
output: {dir: $WORK/out}
resources: {num_workers: 1, gpus_per_worker: $GPUS, cpus_per_worker: 4}
shards: {rows_per_shard: 128}
YAML
batchrun run "$WORK/job.yaml" --no-progress
python -c "import json,sys; s=json.load(open('$WORK/out/_summary.json'))['this_run']; print(f\"smoke: TP=$GPUS {s['rows']} rows, {s['generated_tokens']} tokens in {s['wall_s']:.1f}s = {s['generated_tokens_per_s']:.0f} tok/s\")"
