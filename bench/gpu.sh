#!/usr/bin/env bash
# The GPU benchmark, as run through the device tool (one command per call; see bench/RESULTS.md).
#   bash bench/gpu.sh engines   # GPU tests; bare engine per attention/CB config with profiles, batchrun, static (1 GPU)
#   bash bench/gpu.sh scale     # TP=2 vs TP=1 through the mpi4py launcher, 2 workers vs 1 (2 GPUs)
#   bash bench/gpu.sh verify    # GPU tests, a short TP=2 run that must exit by itself, `batchrun bench` on the 1B
#   bash bench/gpu.sh compile [timeout] [configs]  # bare engine without and with torch.compile levels 1-3 (1 GPU)
#   bash bench/gpu.sh overhead  # batchrun vs bare (repeated), the old measurement, py-spy GIL profiles of both (1 GPU)
#   bash bench/gpu.sh tpclose   # HF engine start and close at TP=2 and TP=1, rank stacks if close stalls (2 GPUs)
#   bash bench/gpu.sh prefix [workloads] [runs] [prefix.py args]  # shared-prefix jobs: reuse, scheduling, grouping
# Needs .devwheels/ray-py312.tar.xz (bash ../shared/device/pack-ray.sh 2.60.0 transformers==5.24.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; the image's huggingface_hub 1.33 is kept).
set -euo pipefail
mkdir -p /tmp/site && tar -xJf .devwheels/ray-py312.tar.xz -C /tmp/site
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/bench-out}"; mkdir -p "$OUT"
python3 -c "import ray, transformers, torch; print('ray', ray.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
nvidia-smi -L
COMMON=(--model llama-1b --dtype bfloat16 --n 256 --prompt-len 64 512 --out-len 16 512 --rows-per-shard 64)
QUIET="it/s\]|Loading weights"
case "${1:-engines}" in
  engines) python3 -m pytest -q -rA --tb=short -p no:cacheprovider tests/test_hf_attention.py > "$OUT/tests.log" 2>&1 || true
           grep -E "varlen kernel|passed|failed|Error|error" "$OUT/tests.log" | tail -25
           python3 bench/hf_engine.py "${COMMON[@]}" --configs "${2:-default,graphs32k,varlen,varlen-graphs,varlen-graphs32k}" \
             --batchrun-configs "${3:-varlen-graphs32k}" --profile "${4:-graphs32k,varlen-graphs32k}" --runs bare,batchrun,static \
             --json "$OUT/engines.json" 2>&1 | grep --line-buffered -v -E "$QUIET" | tee "$OUT/engines.log" ;;
  scale)   python3 bench/hf_engine.py "${COMMON[@]}" --n 1024 --configs "${2:-varlen-graphs32k}" --runs tp,workers \
             --json "$OUT/scale.json" 2>&1 | grep --line-buffered -v -E "$QUIET" | tee "$OUT/scale.log" ;;
  verify)  python3 -m pytest -q -rA --tb=short -p no:cacheprovider tests/test_hf_attention.py \
             "tests/test_mpi.py::test_a_process_whose_rank_died_mid_task_still_exits_after_close" > "$OUT/tests.log" 2>&1 || true
           grep -E "varlen kernel|passed|failed|Error" "$OUT/tests.log" | tail -25
           rc=0; timeout 300 python3 bench/hf_engine.py --model llama-1b --dtype bfloat16 --n 64 --prompt-len 64 128 \
             --out-len 16 64 --configs varlen --runs tp > "$OUT/tp.log" 2>&1 || rc=$?
           grep -E "^engine|^ratio" "$OUT/tp.log" || true; echo "TP run exit code: $rc (124: it hung at exit)"
           python3 -m batchrun.cli bench --engines hf,trtllm --model /tmp/batchrun-llama-1b --dtype bfloat16 --n 256 \
             --max-tokens 256 --max-in-flight 256 --json "$OUT/engines-cli.json" 2>&1 | grep -v -E "$QUIET" | tail -12 ;;
  prefix)  python3 bench/prefix.py --workloads "${2:-rubrics,prefixes}" --runs "${3:-bare-off,bare-on,defaults,input-order,reuse-off}" \
             --json "$OUT/prefix.json" "${@:4}" 2>&1 | grep --line-buffered -v -E "$QUIET" | tee "$OUT/prefix.log" ;;
  tpclose) for tp in 2 1; do timeout 280 python3 bench/tp_close.py --tp "$tp" --model llama-1b --spy .devwheels/py-spy \
             --out "$OUT" 2>&1 | grep -E "^result|^==|signal" || true; done ;;
  compile) timeout "${2:-540}" python3 bench/hf_engine.py "${COMMON[@]}" --runs bare --repeat 2 \
             --configs "${3:-varlen-graphs32k,varlen-graphs32k-c1,varlen-graphs32k-c2,varlen-graphs32k-c3}" \
             --json "$OUT/compile.json" 2>&1 | grep --line-buffered -E "^bare|^ratio|^cuda|^run|Error" | tee "$OUT/compile.log" || true ;;
  overhead) cfg=(--configs "${2:-varlen-graphs32k}")
           python3 bench/hf_engine.py "${COMMON[@]}" "${cfg[@]}" --runs bare,batchrun --keep-gpu-cache \
             --json "$OUT/overhead-kept.json" 2>&1 | grep -E "^(bare|batchrun|ratio)" | tee "$OUT/overhead-kept.log"
           python3 bench/hf_engine.py "${COMMON[@]}" "${cfg[@]}" --runs bare,batchrun --repeat 3 \
             --json "$OUT/overhead.json" 2>&1 | grep -v -E "$QUIET" | tee "$OUT/overhead.log"
           spy=(.devwheels/py-spy record --gil --threads --nonblocking -r 100 -f raw)
           "${spy[@]}" -o /tmp/bare.raw -- python3 bench/hf_engine.py "${COMMON[@]}" "${cfg[@]}" --runs bare \
             2>&1 | grep -E "^bare|py-spy>" | tee "$OUT/bare-spy.log" || true
           "${spy[@]}" --subprocesses -o /tmp/batchrun.raw -- python3 bench/hf_engine.py "${COMMON[@]}" "${cfg[@]}" \
             --runs batchrun 2>&1 | grep -E "^batchrun|py-spy>" | tee "$OUT/batchrun-spy.log" || true
           # GIL samples per thread over the measured window (the profiles span start-up too: read the engine's and
           # batchrun's threads, and the worker's main thread only inside its loop)
           span() { grep -oP "^$1 .*'seconds': \K[0-9.]+" "$OUT/$1-spy.log" | head -1; }
           for args in "bare.raw --seconds $(span bare)" "batchrun.raw --match default_worker --seconds $(span batchrun)" \
                       "batchrun.raw --match default_worker --frame Worker._generate --seconds $(span batchrun)"; do
             echo "== py-spy --gil: $args"; python3 bench/pyspy_raw.py /tmp/$args --top 6 | cut -c1-160 | head -50 || true
           done ;;
esac
