"""Shared fixtures: one real local Ray cluster per test session, the demo model built once, job helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "build" / "demo-model"

# The loopback S3 server's address and credentials go into the environment before anything starts (the session's
# Ray cluster included), the way a user's AWS environment reaches batchrun: its workers inherit it. The address is a
# fault injector's in front of the server (tests/s3server.py FaultProxy), passing everything through unless a test
# sets a share of faults (the s3_faults fixture): every process of a job, its Ray workers too, then meets them.
from tests.s3server import free_port, s3_env  # noqa: E402

S3_PORT, S3_PROXY_PORT = free_port(), free_port()
os.environ.update(s3_env(S3_PROXY_PORT))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from batchrun.demo import build_model

    return build_model(DEMO_MODEL, quiet=True)  # reuses the one `make demo` built, if current


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the whole session. Subprocess drivers join it through RAY_ADDRESS."""
    import ray

    # Logical CPUs: actors here are mostly idle waiting on each other; 2 real cores run them fine.
    # tests/doubles holds the tensorrt_llm test double, the one thing that cannot run here.
    ctx = ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'doubles'}"}})
    address = ctx.address_info["gcs_address"]
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    yield address
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 API server (moto) on loopback for the session, with one bucket: its name."""
    from tests.s3server import FaultProxy, make_bucket, start_server

    proc = start_server(S3_PORT)
    _PROXY.append(FaultProxy(S3_PORT, {}, port=S3_PROXY_PORT))
    make_bucket("batchrun-test")
    yield "batchrun-test"
    _PROXY.pop().close()
    proc.terminate()
    proc.wait(timeout=30)


_PROXY: list = []


@pytest.fixture
def s3_faults(s3_bucket):
    """The session's fault injector in front of the S3 server: `set_share({"GET": 0.1, ...})`; no faults after."""
    yield _PROXY[0]
    _PROXY[0].set_share({})


def write_parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_job(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def read_output(out_dir) -> pa.Table:
    import pyarrow.dataset as ds

    return ds.dataset(str(out_dir), format="parquet").to_table()


def cli_env() -> dict:
    # ROOT first, and whatever PYTHONPATH already holds after it (the GPU machine carries its packages there)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


PYTHON = sys.executable
