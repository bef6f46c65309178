"""Fingerprints: what identifies a job's outputs (store/runs.py: a re-run that would change them is refused) and a built
TensorRT engine (engines/trtllm.py: the engine cache), as short sha256 digests of canonical JSON."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def model_files(path: str | None) -> dict[str, int]:
    """What identifies weights without hashing gigabytes: the model dir's config/weight/engine files and their sizes."""
    if not path or not os.path.isdir(path):
        return {}
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))
            if f.endswith((".json", ".safetensors", ".bin", ".engine", ".model"))}


def fingerprint(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_components(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, for a message that says what changed."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += diff_components(a, b, name + ".")
        elif a != b:
            changed.append(f"{name}: {a!r} -> {b!r}")
    return changed
