"""batchrun installs into each supported TensorRT-LLM image without replacing what the image pins.

`docker build` cannot run here, so this stands in for it: batchrun's core requirements and the extras the Dockerfile
installs are checked against each release's pinned requirements (constraints/trtllm/<version>.txt, the PyPI sdist
metadata of that release) and the caps those pinned packages put on their neighbours (constraints/trtllm/
transitive.txt). A requirement that would force pip to replace a pin fails here, naming the release and the package.
In the image itself the Dockerfile installs against a constraints file made from the image's own packages."""

from __future__ import annotations

import re

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

pytestmark = pytest.mark.fast
PINS = ROOT / "constraints" / "trtllm"
RELEASES = sorted(p.stem for p in PINS.glob("*.txt") if p.stem[0].isdigit())


def lines(path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def transitive() -> list[tuple[Requirement, Requirement]]:
    return [(Requirement(a), Requirement(b)) for a, b in (ln.split(" ; ") for ln in lines(PINS / "transitive.txt"))]


def expand(reqs: list[Requirement]) -> list[Requirement]:
    """reqs plus what one of them, exactly as written there, is known to require of others (transitive.txt)."""
    out = list(reqs)
    for parent, child in transitive():
        for r in reqs:
            if canonicalize_name(r.name) == canonicalize_name(parent.name) and r.specifier == parent.specifier:
                out.append(child)
    return out


def _overlap(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Some version satisfies both: the versions either names, and each nudged past its bound, are tried."""
    candidates = set()
    for spec in (*a, *b):
        v = spec.version.rstrip(".*")
        parts = [int(p) if p.isdigit() else 0 for p in re.split(r"[.a-z+]", v)[:3] if p != ""] + [0, 0, 0]
        candidates |= {v, f"{parts[0]}.{parts[1]}.{parts[2] + 1}", f"{parts[0]}.{parts[1] + 1}.0"}
    if not candidates:
        return True
    return any(a.contains(c, prereleases=True) and b.contains(c, prereleases=True) for c in candidates)


def image_pins(release: str) -> list[Requirement]:
    return expand([Requirement(ln) for ln in lines(PINS / f"{release}.txt")])


def docker_extras() -> list[str]:
    match = re.search(r'pip install [^\n]*"\.\[([a-z0-9,]+)\]"', (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile installs batchrun with its extras"
    return match.group(1).split(",")


def batchrun_requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return expand(reqs)


def conflicts(ours: list[Requirement], pins: list[Requirement]) -> list[str]:
    out = []
    for mine in ours:
        for pin in pins:
            if canonicalize_name(mine.name) == canonicalize_name(pin.name) and \
                    not _overlap(mine.specifier, pin.specifier):
                out.append(f"{mine} against the image's {pin}")
    return out


@pytest.mark.parametrize("release", RELEASES)
def test_batchrun_installs_beside_each_releases_pins(release):
    found = conflicts(batchrun_requirements(docker_extras()), image_pins(release))
    assert not found, f"TensorRT-LLM {release}: " + "; ".join(found)


def test_the_check_fails_where_pip_would_replace_a_pin():
    """The check can fail: the requirements that broke the 1.0 image (transformers >= 5.20 in the core) and the
    object-store extra beside datasets 3.1.0 are caught, naming the package."""
    pins = image_pins("1.2.1")
    assert conflicts([Requirement("transformers>=5.20")], pins) == \
        ["transformers>=5.20 against the image's transformers==4.57.3"]
    assert any("fsspec" in c for c in conflicts(batchrun_requirements(["s3"]), pins))
    assert not conflicts(batchrun_requirements(["s3"]), image_pins("1.4.0rc1"))  # 1.4 leaves datasets open
    assert conflicts([Requirement("numpy>=2")], image_pins("1.0.0rc6")) and \
        not conflicts([Requirement("numpy>=2")], image_pins("1.4.0rc1"))


def test_the_hf_engine_names_the_transformers_it_needs(monkeypatch):
    """transformers is not forced on every install; the HF engine refuses at plan time where it is too old."""
    import importlib.metadata

    from batchrun.engines import hf
    from batchrun.errors import SpecError

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "4.57.3" if n == "transformers" else real(n))
    with pytest.raises(SpecError, match=r"transformers >= 5\.20.*has 4\.57\.3.*batchrun\[hf\]"):
        hf.options_model()  # what the registry asks first, before it imports transformers' batching API
    monkeypatch.setattr(importlib.metadata, "version", real)
    hf.require_transformers()  # this environment's (dev installs batchrun[hf])
