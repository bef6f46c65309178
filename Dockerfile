# batchrun on TensorRT-LLM. The base image carries CUDA, TensorRT, TensorRT-LLM, torch, mpi4py and Open MPI.
# Pin its tag: TensorRT-LLM's LLM API and its Open MPI build change between releases. 1.2.1 is the newest stable
# release and the last with both backends (README "TensorRT-LLM releases"); 1.0.0 and later are supported.
FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.1

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
# Installed against a constraints file made from the image's own packages, so pip can add batchrun and Ray but never
# replace what TensorRT-LLM pins (transformers, datasets, numpy, torch): a conflict fails the build instead of
# breaking TensorRT-LLM (tests/test_requirements.py checks the same against each release's recorded pins).
# Not here: the hf extra (newer transformers than the image's) and s3/gcs (s3fs/gcsfs 2024.12 need fsspec 2024.12,
# which datasets==3.1.0 forbids): see README "TensorRT-LLM releases".
# DL3013: this installs the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip list --format=freeze --exclude-editable > /opt/batchrun/image-constraints.txt \
    && pip install --no-cache-dir -c /opt/batchrun/image-constraints.txt ".[mpi,plot]" \
    && useradd --create-home --uid 1000 batchrun \
    && chown -R batchrun /opt/batchrun

# Run as a non-root user. (Open MPI refuses root unless OMPI_ALLOW_RUN_AS_ROOT* is set, which batchrun also sets
# for images that must run as root.) Run with: --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
USER 1000
ENTRYPOINT ["batchrun"]
CMD ["--help"]
