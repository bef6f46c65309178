# batchrun on TensorRT-LLM. The base image carries CUDA, TensorRT, TensorRT-LLM, torch, mpi4py and Open MPI.
# Pin its tag: TensorRT-LLM's LLM API and its Open MPI build change between releases.
FROM nvcr.io/nvidia/tensorrt-llm/release:1.0.0

# Open MPI inside containers: ranks talk over loopback/shared memory; these match batchrun/engines/mpi.py.
# Arrow on jemalloc: pyarrow's default (mimalloc) keeps the pages Parquet decoding frees (batchrun/worker.py).
ENV OMPI_MCA_btl_vader_single_copy_mechanism=none \
    ARROW_DEFAULT_MEMORY_POOL=jemalloc \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/batchrun
COPY pyproject.toml README.md ./
COPY batchrun ./batchrun
COPY jobs ./jobs
COPY launch ./launch
# torch and tensorrt_llm come from the base image and already satisfy batchrun's open requirements.
# s3, gcs: output.dir on an object store (s3fs / gcsfs, whose exclusive create is the commit point).
# DL3013: this installs the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[mpi,plot,s3,gcs]" \
    && useradd --create-home --uid 1000 batchrun \
    && chown -R batchrun /opt/batchrun

# Run as a non-root user. (Open MPI refuses root unless OMPI_ALLOW_RUN_AS_ROOT* is set, which batchrun also sets
# for images that must run as root.) Run with: --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
USER 1000
ENTRYPOINT ["batchrun"]
CMD ["--help"]
