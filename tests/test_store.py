"""batchrun/store/ on a local filesystem, without Ray: manifest segments and their merge, the ids digest a part's
entry carries. (The queue's use of them: test_queue.py; on an object store: test_s3.py.)"""

from __future__ import annotations

import pyarrow as pa
import pytest

from batchrun.records import ManifestEntry
from batchrun.store.output import OutputDir
from batchrun.store.parts import ids_digest

pytestmark = pytest.mark.fast


def test_manifest_segments_merge_in_any_order_and_compact(tmp_path):
    out = OutputDir(tmp_path / "out")
    out.ensure()
    q = ManifestEntry(0, "quarantined", committed_at=1.0, error="boom")
    c = ManifestEntry(0, "committed", rows=10, committed_at=0.5)  # a later run committed it
    out.manifest.append([c, ManifestEntry(1, "committed", rows=10)], "r2", 0)
    out.manifest.append([q, ManifestEntry(2, "quarantined", committed_at=2.0, error="bad")], "r1", 0)
    entries = out.manifest.entries()
    assert entries[0].state == "committed" and entries[2].state == "quarantined"
    merged = out.manifest.compact("r3", keep_quarantined=False)  # a re-run retries quarantined shards
    assert sorted(merged) == [0, 1] and len(out.list(out.manifest_dir)) == 1
    assert sorted(out.manifest.entries()) == [0, 1]
    assert out.manifest.compact("r4") == out.manifest.entries()  # one segment: nothing to merge, nothing written
    assert len(out.list(out.manifest_dir)) == 1


def test_ids_digest_ignores_chunking():
    a = pa.chunked_array([[1, 2, 3, 4]])
    b = pa.chunked_array([[1, 2], [3, 4]])
    assert ids_digest(a) == ids_digest(b) == ids_digest(pa.array([0, 1, 2, 3, 4]).slice(1))
    assert ids_digest(a) != ids_digest(pa.chunked_array([[1, 2, 4, 3]]))
