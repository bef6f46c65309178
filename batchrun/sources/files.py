"""Resolving a path, directory or glob to a sorted list of files, on any fsspec filesystem."""

from __future__ import annotations

import fsspec

from batchrun.errors import SpecError


def _hidden(path: str) -> bool:
    # Same rule as pyarrow.dataset: names starting with "_" or "." are internal (e.g. a batchrun output's _batchrun/).
    return any(part.startswith(("_", ".")) for part in path.split("/") if part)


def list_files(path: str, suffixes: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, root = fsspec.core.url_to_fs(path)
    if any(ch in root for ch in "*?["):
        files = sorted(f for f in fs.glob(root) if fs.isfile(f) and not _hidden(f.rsplit("/", 1)[-1]))
    elif fs.isdir(root):
        found = fs.find(root)
        files = sorted(f for f in found if f.endswith(suffixes) and not _hidden(f[len(root.rstrip("/")) :]))
    elif fs.exists(root):
        files = [root]
    else:
        raise SpecError(f"key 'input.path': {path} does not exist")
    if not files:
        raise SpecError(f"key 'input.path': no {'/'.join(suffixes)} files found under {path}")
    return fs, files
