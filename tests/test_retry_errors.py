"""`batchrun run JOB --retry-errors`, on a real local Ray cluster: only the rows that ended in error are generated
again, their parts replaced whole; the other rows keep their outputs; every row stays exactly once."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchrun.cli import main
from batchrun.errors import SpecError
from batchrun.runner import JobRunner
from batchrun.spec import validate_spec
from batchrun.store.output import OutputDir
from tests.conftest import read_output, write_parquet

pytestmark = pytest.mark.slow

BAD = {3, 17, 18, 35}  # rows whose prompt the engine rejects (tests.engines.FlakyRequestEcho: "BADREQ" in it)


def rows_by_id(out) -> dict:
    rows = read_output(out).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == 40  # every row exactly once
    return {r["id"]: r for r in rows}


def run(raw, **kw) -> dict:
    return JobRunner(validate_spec(raw), show_progress=False, **kw).run().summary


def test_retry_errors_redoes_only_error_rows_and_replaces_their_parts(tmp_path, ray_cluster, capsys):
    write_parquet(tmp_path / "in.parquet", pa.table({
        "id": list(range(40)), "q": [f"row {i} {'BADREQ' if i in BAD else 'fine'} x y" for i in range(40)]}))
    raw = {"engine": {"name": "tests.engines:FlakyRequestEcho"},
           "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id", "prompt_template": "{{ q }}"},
           "sampling": {"max_tokens": 3}, "output": {"dir": str(tmp_path / "out")},
           "resources": {"num_workers": 2}, "shards": {"rows_per_shard": 10}}
    first = run(raw)
    assert first["error_rows"] == 4 and first["retried_error_rows"] == {"shards": 0, "rows": 0, "still_failing": 0}
    before = rows_by_id(tmp_path / "out")
    out = OutputDir(tmp_path / "out")
    untouched = out.parts.read(2)  # shard 2 (rows 20-29) has no error row

    # a transient fault that is not over: the rows are redone and still fail; nothing else is touched
    again = run(raw, retry_errors=True)
    assert again["retried_error_rows"] == {"shards": 3, "rows": 4, "still_failing": 4}
    assert again["this_run"]["rows"] == 4 and again["error_rows"] == 4 and again["shards_committed"] == 4
    assert {s: e.revision for s, e in out.manifest.committed().items()} == {0: 1, 1: 1, 2: 0, 3: 1}
    assert out.parts.read(2).equals(untouched)

    # the fixed template is refused for a plain re-run, accepted for the error rows
    fixed = {**raw, "input": {**raw["input"], "prompt_template": "{{ q | replace('BADREQ', 'mended') }}"}}
    with pytest.raises(SpecError, match=r"input.prompt_template[\s\S]*--overwrite"):
        run(fixed)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(fixed))
    assert main(["run", str(tmp_path / "job.yaml"), "--retry-errors", "--no-progress"]) == 0
    assert "retried: 4 error rows in 3 shards generated again, 0 still fail" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["error_rows"] == 0 and summary["retried_error_rows"]["still_failing"] == 0
    after = rows_by_id(tmp_path / "out")
    for i, row in after.items():
        assert row["error"] is None and row["finish_reason"] != "error"
        if i in BAD:
            assert row["generated_text"] == f"row {i} mended"
        else:  # committed without error: its output is the first run's, byte for byte
            assert row == before[i]
    entries = out.manifest.committed()
    assert {s: e.revision for s, e in entries.items()} == {0: 2, 1: 2, 2: 0, 3: 2}
    assert all(e.error_rows == 0 and e.rows == 10 for e in entries.values())
    part = pq.read_table(out.parts.path(1))
    assert out.parts.entry(1) == entries[1] and part.column("id").to_pylist() == list(range(10, 20))
    assert len(out.runs.job()["replaced"]) == 1  # the job record took the fixed spec and keeps the one it replaced

    # the plan and the output's columns may not change under --retry-errors
    with pytest.raises(SpecError, match=r"rows_per_shard: 10 -> 20[\s\S]*which rows a shard holds"):
        run({**fixed, "shards": {"rows_per_shard": 20}}, retry_errors=True)
    nothing = run(fixed, retry_errors=True)
    assert nothing["retried_error_rows"]["shards"] == 0 and nothing["this_run"]["rows"] == 0
    assert rows_by_id(tmp_path / "out") == after
