"""Shard planning and shard reads: no Ray."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from batchrun.plan import cut_shards, make_plan
from batchrun.shards import Fragment, Shard
from batchrun.sources import open_source
from batchrun.spec import validate_spec
from tests.conftest import write_parquet

pytestmark = pytest.mark.fast


def spec_for(path, rows_per_shard, **input_extra):
    return validate_spec({"engine": {"name": "echo"}, "input": {"path": str(path), **input_extra},
                          "output": {"dir": "/tmp/unused"}, "shards": {"rows_per_shard": rows_per_shard}})


@pytest.mark.parametrize("unit_rows,per", [((10,), 3), ((5, 0, 7, 1), 4), ((100,), 100), ((3, 3), 1), ((0, 9), 20)])
def test_shards_cover_every_row_once_in_order(unit_rows, per):
    shards = cut_shards(unit_rows, per)
    covered = [(f.unit, r) for s in shards for f in s.fragments for r in range(f.start, f.stop)]
    assert covered == [(u, r) for u, n in enumerate(unit_rows) for r in range(n)]
    assert all(s.num_rows == per for s in shards[:-1]) and 0 < shards[-1].num_rows <= per
    assert [s.row_start for s in shards] == [sum(x.num_rows for x in shards[:i]) for i in range(len(shards))]


def make_input(tmp_path, files=3, rows=(37, 50, 13)):
    n = 0
    for i in range(files):
        ids = list(range(n, n + rows[i]))
        n += rows[i]
        write_parquet(tmp_path / "in" / f"f{i}.parquet",
                      pa.table({"id": ids, "prompt": [f"p {j}" for j in ids]}), row_group_size=7)
    (tmp_path / "in" / "_ignored.parquet").write_bytes(b"not parquet: internal files are skipped")
    return tmp_path / "in"


def test_plan_is_deterministic_and_reads_exact_rows(tmp_path):
    src = make_input(tmp_path)
    a, b = make_plan(spec_for(src, 11)), make_plan(spec_for(src, 11))
    assert a == b
    assert a.total_rows == 100 and len(a.shards) == 10
    source = open_source(spec_for(src, 11).input)
    got = []
    for shard in a.shards:
        t = source.read(a.units, shard.fragments, ["id", "prompt"])
        assert t.num_rows == shard.num_rows
        got += t.column("id").to_pylist()
    assert got == list(range(100))


def test_plan_same_for_glob_and_dir(tmp_path):
    src = make_input(tmp_path)
    assert make_plan(spec_for(src, 9)).shards == make_plan(spec_for(f"{src}/*.parquet", 9)).shards


def test_rows_per_file_caps_the_shard(tmp_path):
    src = make_input(tmp_path)
    spec = validate_spec({"engine": {"name": "echo"}, "input": {"path": str(src)},
                          "output": {"dir": "/tmp/x", "rows_per_file": 5}, "shards": {"rows_per_shard": 50}})
    assert max(s.num_rows for s in make_plan(spec).shards) == 5


def test_hf_save_to_disk_and_builder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"id": list(range(30)), "prompt": [f"q{i}" for i in range(30)]})
    ds.save_to_disk(str(tmp_path / "saved"))
    write_parquet(tmp_path / "pq" / "a.parquet", ds.data.table)
    for inp in ({"path": str(tmp_path / "saved"), "format": "hf"},
                {"path": "parquet", "format": "hf", "data_files": str(tmp_path / "pq" / "a.parquet")}):
        spec = validate_spec({"engine": {"name": "echo"}, "input": inp, "output": {"dir": "/tmp/x"},
                              "shards": {"rows_per_shard": 8}})
        plan = make_plan(spec)
        source = open_source(spec.input)
        ids = [i for s in plan.shards for i in source.read(plan.units, s.fragments, ["id"]).column("id").to_pylist()]
        assert ids == list(range(30))


def test_fsspec_urls_read_like_local_paths(tmp_path):
    """Inputs go through fsspec: a file:// URL (like s3://, gs://, hf:// with their packages) plans and reads the
    same."""
    src = make_input(tmp_path)
    local, url = make_plan(spec_for(src, 13)), make_plan(spec_for(f"file://{src}", 13))
    assert [s.num_rows for s in local.shards] == [s.num_rows for s in url.shards]
    source = open_source(spec_for(f"file://{src}", 13).input)
    ids = [i for s in url.shards for i in source.read(url.units, s.fragments, ["id"]).column("id").to_pylist()]
    assert ids == list(range(100))


def test_hf_streaming_is_planned_by_the_datasets_own_shards(tmp_path):
    """streaming: an IterableDataset's shards (its files) are the units; no shard spans two; every row once."""
    sizes = (23, 17, 31)
    start = 0
    for i, n in enumerate(sizes):
        write_parquet(tmp_path / "pq" / f"part-{i}.parquet",
                      pa.table({"id": list(range(start, start + n)), "prompt": [f"q{j}" for j in range(n)]}),
                      row_group_size=7)
        start += n
    spec = validate_spec({"engine": {"name": "echo"}, "output": {"dir": "/tmp/x"}, "shards": {"rows_per_shard": 10},
                          "input": {"path": "parquet", "format": "hf", "streaming": True,
                                    "data_files": str(tmp_path / "pq" / "*.parquet")}})
    plan = make_plan(spec)
    assert len(plan.units) == 3 and plan.unit_rows == sizes
    assert all(len({f.unit for f in s.fragments}) == 1 for s in plan.shards)
    assert [s.num_rows for s in plan.shards] == [10, 10, 3, 10, 7, 10, 10, 10, 1]
    source = open_source(spec.input)
    ids = [i for s in plan.shards for i in source.read(plan.units, s.fragments, ["id"]).column("id").to_pylist()]
    assert ids == list(range(sum(sizes)))
    # each unit's stream stays open between shards; shards behind it (read backwards, or skipped over by another
    # worker) restart it, and still read exactly their rows
    for order in (plan.shards[::-1], plan.shards[::2] + plan.shards[1::2]):
        source = open_source(spec.input)
        for s in order:
            got = source.read(plan.units, s.fragments, ["id", "prompt"]).column("id").to_pylist()
            assert got == list(range(s.row_start, s.row_start + s.num_rows))
    with pytest.raises(Exception, match="input.streaming is for format hf"):
        validate_spec({"engine": {"name": "echo"}, "output": {"dir": "/tmp/x"},
                       "input": {"path": str(tmp_path / "pq"), "streaming": True}})


def uneven_groups(path, sizes=(7, 30, 1, 12, 50, 3)):
    """One file whose row groups have the given sizes; ids are the file's row numbers."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("other", pa.int64())])
    n = 0
    with pq.ParquetWriter(path, schema) as w:
        for size in sizes:
            ids = list(range(n, n + size))
            w.write_table(pa.table({"id": ids, "prompt": [f"p {i}" for i in ids], "other": [-i for i in ids]},
                                   schema=schema))
            n += size
    return path, n


@pytest.mark.parametrize("order", ["forward", "backward", "two workers", "shuffled"])
def test_shard_reads_are_exact_in_any_order_and_across_row_groups(tmp_path, order):
    import random

    path, total = uneven_groups(tmp_path / "in" / "f.parquet")
    plan = make_plan(spec_for(path, 5))
    source = open_source(spec_for(path, 5).input)
    shards = list(plan.shards)
    if order == "backward":
        shards.reverse()
    elif order == "two workers":  # each worker's source sees every other shard
        shards = shards[::2] + shards[1::2]
    elif order == "shuffled":
        random.Random(3).shuffle(shards)
    for k, shard in enumerate(shards):
        columns = ["id", "prompt"] if k % 3 else ["other", "id"]  # a second column set: its own cursor
        t = source.read(plan.units, shard.fragments, columns)
        want = list(range(shard.row_start, shard.row_start + shard.num_rows))
        assert t.column_names == columns and t.column("id").to_pylist() == want, (order, shard)
        if "prompt" in columns:
            assert t.column("prompt").to_pylist() == [f"p {i}" for i in want]
    assert sum(s.num_rows for s in shards) == total


def test_shards_of_one_big_row_group_read_the_file_about_once(tmp_path, monkeypatch):
    """pyarrow writes up to 1Mi rows per row group: 1,000-row shards must not each decode the whole group."""
    import io

    import pyarrow.parquet as pq

    path = tmp_path / "in" / "big.parquet"
    path.parent.mkdir(parents=True)
    ids = list(range(20_000))
    pq.write_table(pa.table({"id": ids, "prompt": [f"prompt number {i}" for i in ids]}), path, compression="none")
    source = open_source(spec_for(path, 1000).input)
    plan = make_plan(spec_for(path, 1000))
    assert pq.ParquetFile(path).metadata.num_row_groups == 1 and len(plan.shards) == 20
    read = [0]

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read[0] += len(data)
            return data

    counted = pq.ParquetFile(Counting(str(path)))
    monkeypatch.setattr(source, "_file", lambda name: counted)
    got = []
    for shard in plan.shards:
        got += source.read(plan.units, shard.fragments, ["id", "prompt"]).column("id").to_pylist()
    assert got == ids
    assert read[0] < 2 * path.stat().st_size, (read[0], path.stat().st_size)


@pytest.mark.parametrize("env,expected", [(None, {"jemalloc", "system"}), ("mimalloc", {"mimalloc"})])
def test_workers_get_an_arrow_pool_that_returns_memory_unless_told(monkeypatch, env, expected):
    """mimalloc kept ~60 MB of pages freed by Parquet decoding; workers get another pool unless the user chose one."""
    from batchrun.memory import steady_arrow_pool

    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    if env:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", env)
    assert steady_arrow_pool() in expected


@pytest.mark.parametrize("order", ["forward", "backward", "two workers"])
def test_jsonl_shard_reads_continue_instead_of_rescanning(tmp_path, monkeypatch, order):
    """Each JSONL shard used to scan its file from the first line: quadratic over a file's shards."""
    import json

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"p {i}"}) + ("\n\n" if i % 5 == 0 else "\n")
                            for i in range(103)))
    spec = spec_for(path, 10, format="jsonl")
    plan, source = make_plan(spec), open_source(spec.input)
    opened = []
    real_open = source.fs.open
    def counting_open(path, mode="rb", *a, **k):
        opened.append(path)  # the reader opens bytes (and decodes line by line)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(source.fs, "open", counting_open)
    shards = list(plan.shards)
    if order == "backward":
        shards.reverse()
    elif order == "two workers":
        shards = shards[::2] + shards[1::2]
    for shard in shards:
        t = source.read(plan.units, shard.fragments, ["id", "prompt"])
        assert t.column("id").to_pylist() == list(range(shard.row_start, shard.row_start + shard.num_rows))
    # forward: one pass over the file; backward: a new pass per shard, as any stream read backwards needs
    assert len(opened) == {"forward": 1, "backward": len(shards), "two workers": 2}[order]


def reference_cut(unit_rows, rows_per_shard, per_unit=False):
    """The plan cut one shard object at a time (the rule ShardTable computes as ranges)."""
    shards, frags, shard_start, filled, global_row = [], [], 0, 0, 0
    for unit, n in enumerate(unit_rows):
        if per_unit and filled:
            shards.append(Shard(len(shards), shard_start, filled, tuple(frags)))
            frags, shard_start, filled = [], global_row, 0
        pos = 0
        while pos < n:
            take = min(n - pos, rows_per_shard - filled)
            frags.append(Fragment(unit, pos, pos + take))
            pos, filled, global_row = pos + take, filled + take, global_row + take
            if filled == rows_per_shard:
                shards.append(Shard(len(shards), shard_start, filled, tuple(frags)))
                frags, shard_start, filled = [], global_row, 0
    if filled:
        shards.append(Shard(len(shards), shard_start, filled, tuple(frags)))
    return tuple(shards)


def test_shards_as_ranges_are_the_shards_cut_one_by_one():
    """The plan holds its shards as ranges (O(units), whatever the shard count); each is made when asked for and
    is the shard the one-by-one cut makes, empty units, short units and per-unit cuts included."""
    import random

    rng = random.Random(1)
    for _ in range(2000):
        units = tuple(rng.choice([0, 0, 1, 2, 3, 5, 7, 10, 13, 31]) for _ in range(rng.randint(1, 6)))
        per, per_unit = rng.randint(1, 12), rng.random() < 0.5
        table, want = cut_shards(units, per, per_unit), reference_cut(units, per, per_unit)
        assert len(table) == len(want) and tuple(table) == want and table[::-1] == want[::-1]
        assert table.num_rows(range(len(table))).tolist() == [s.num_rows for s in want]
    big = cut_shards((10**9,), 1000)
    assert len(big) == 10**6 and big[999_999].row_start == 999_999_000 and len(pickle.dumps(big)) < 1000
