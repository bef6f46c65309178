"""The job's records beside its outputs: job.json (the fingerprint of what decides the outputs, so that a re-run
that would change them is refused) and one cost record per run under `_batchrun/runs/` (cost.py)."""

from __future__ import annotations

import json
import logging

from batchrun.errors import SpecError
from batchrun.fingerprint import diff_components, fingerprint
from batchrun.store.fs import Store

log = logging.getLogger("batchrun.store")


class Runs:
    def __init__(self, store: Store):
        self.store = store

    def check(self, components: dict, has_parts: bool, may_change=None) -> None:
        """Refuse a re-run whose outputs would differ from what is committed (--overwrite clears the dir first).
        has_parts: the dir holds parts; without a job record they are another tool's. may_change(key): a changed
        key that is allowed (`run --retry-errors` after fixing a template): the job record then takes the new
        components and keeps the fingerprints it replaced."""
        job = self.store.join("_batchrun", "job.json")
        new = {"fingerprint": fingerprint(components), "components": components}
        old = self.store.read_json(job)
        if old is not None:
            if old["fingerprint"] != new["fingerprint"]:
                changes = diff_components(old["components"], components)
                refused = [c for c in changes if may_change is None or not may_change(c.split(":", 1)[0])]
                if refused:
                    allowed = "" if may_change is None else (
                        "\n--retry-errors may change how prompts are built and sampled, not these keys: they decide "
                        "which rows a shard holds or which columns the output has.")
                    raise SpecError(
                        f"output dir {self.store.root} holds a job whose outputs would differ from this one:\n  "
                        + "\n  ".join(refused) + allowed
                        + "\nUse --overwrite to discard its outputs, or choose a new output.dir.")
                log.warning("--retry-errors: the error rows are generated again with a changed spec (the rows "
                            "committed without error keep their outputs):\n  %s", "\n  ".join(changes))
                new["replaced"] = [*old.get("replaced", []), old["fingerprint"]]
        elif has_parts:
            raise SpecError(f"output dir {self.store.root} holds Parquet parts from another tool or an unknown job; "
                            "use --overwrite or a new output.dir")
        self.store.write_bytes(job, json.dumps(new, indent=2, default=str).encode())

    def job(self) -> dict:
        """The job's fingerprint and components (job.json), or {} before its first run."""
        return self.store.read_json(self.store.join("_batchrun", "job.json")) or {}

    def write(self, record: dict) -> None:
        path = self.store.join("_batchrun", "runs", f"{record['run_id']}.json")
        self.store.write_bytes(path, json.dumps(record).encode())

    def all(self) -> list[dict]:
        """Every run's cost record, oldest first."""
        found = self.store.read_all(self.store.list(self.store.runs_dir, suffix=".json"))
        records = [json.loads(d) for d in found.values()]
        return sorted(records, key=lambda r: r.get("started_at", 0))
