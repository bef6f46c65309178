# batchrun on TensorRT-LLM. The base image carries CUDA, TensorRT, TensorRT-LLM, torch and Open MPI; pin its tag.
FROM nvcr.io/nvidia/tensorrt-llm/release:1.0.0

WORKDIR /opt/batchrun
COPY pyproject.toml README.md ./
COPY batchrun ./batchrun
COPY jobs ./jobs
# torch and tensorrt_llm come from the base image and already satisfy batchrun's open requirements.
RUN pip install --no-cache-dir ".[mpi]"

ENTRYPOINT ["batchrun"]
