"""The output dir as the driver and the CLI see it (the package docstring tells the protocol)."""

from __future__ import annotations

from batchrun.store.fs import Store
from batchrun.store.lock import RunLock
from batchrun.store.manifest import Manifest
from batchrun.store.parts import Parts
from batchrun.store.runs import Runs


class OutputDir(Store):
    """An output dir as the driver and the CLI see it: the store and its records."""

    def __init__(self, url):
        super().__init__(url)
        self.parts = Parts(self)
        self.manifest = Manifest(self)
        self.lock = RunLock(self)
        self.runs = Runs(self)

    def check_fingerprint(self, components: dict, overwrite: bool, may_change=None) -> None:
        """Refuse a re-run whose outputs would differ (runs.check); --overwrite starts over."""
        if overwrite:
            self.clear()
        self.runs.check(components, has_parts=bool(self.parts.names()), may_change=may_change)

    def clear(self) -> None:
        """--overwrite: the records that name parts go first (manifest, job record, complete mark, summary), then
        the parts: an overwrite cut short never leaves a manifest that names missing parts."""
        self.remove(self.list(self.manifest_dir)
                    + [p for p in (self.join("_batchrun", "job.json"), self.join("_batchrun", "complete.json"),
                                   self.join("_summary.json")) if self.read_bytes(p) is not None])
        self.remove(self.parts.names() + self.list(self.tmp) + self.list(self.runs_dir))

