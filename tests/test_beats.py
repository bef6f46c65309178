"""One heartbeat a node (beats.py): the node's workers write theirs, the one holding the node's lock sends them."""

from __future__ import annotations

import json
import os
import time

import pytest

from batchrun.beats import NodeBeats
from batchrun.records import WorkerStats

pytestmark = pytest.mark.fast


def test_one_worker_of_a_node_sends_and_another_takes_over_when_it_ends(tmp_path):
    a, b = NodeBeats("run1", "w000", str(tmp_path)), NodeBeats("run1", "w001", str(tmp_path))
    assert a.lead() and a.lead()  # holds it
    assert not b.lead()  # the lock is a's (two open files: as two processes)
    a.close()
    assert b.lead()
    other_run = NodeBeats("run2", "w000", str(tmp_path))
    assert other_run.lead()  # another job's workers on the node have their own sender
    b.close(), other_run.close()


def test_the_sender_forwards_each_fresh_heartbeat_with_its_age_and_leaves_stale_ones_out(tmp_path):
    a, b, c = (NodeBeats("run1", w, str(tmp_path)) for w in ("w000", "w001", "w002"))
    stats = WorkerStats(in_flight=5, rows=10, engine_startup={"load": 1.5}, drained_shards_handed_back=[3])
    a.post(("node-1", 11, stats, (4, 5)))
    b.post(("node-1", 12, WorkerStats(), ()))
    c.post(("node-1", 13, WorkerStats(), ()))
    stale = c.dir / "w002.beat"
    data = json.loads(stale.read_text())
    stale.write_text(json.dumps(data | {"at": time.time() - 10}))  # w002 stopped writing 10 s ago (it died)
    beats = {w: (payload, age) for w, payload, age in a.collect(fresh_s=4.0)}
    assert sorted(beats) == ["w000", "w001"]
    (node, pid, got, held), age = beats["w000"]
    assert (node, pid, held) == ("node-1", 11, (4, 5)) and got == stats and 0 <= age < 4.0
    b.close()
    assert sorted(w for w, _, _ in a.collect(fresh_s=4.0)) == ["w000"]  # an ended worker's file is gone
    assert not [p for p in os.listdir(a.dir) if p.endswith(".tmp")]


def test_the_draining_answer_reaches_every_worker_of_the_node(tmp_path):
    a, b = NodeBeats("run1", "w000", str(tmp_path)), NodeBeats("run1", "w001", str(tmp_path))
    assert not b.draining()
    a.set_draining()
    assert b.draining()


def test_directories_of_runs_long_over_are_removed(tmp_path):
    old = NodeBeats("old-run", "w000", str(tmp_path))
    old.set_draining()
    old.close()
    day_ago = time.time() - 2 * 86400
    os.utime(old.dir, (day_ago, day_ago))
    recent = NodeBeats("recent-run", "w000", str(tmp_path))
    recent.close()
    NodeBeats("new-run", "w000", str(tmp_path))
    assert not old.dir.exists() and recent.dir.exists()


def test_a_temp_dir_that_cannot_be_written_leaves_the_worker_to_heartbeat_alone(tmp_path):
    (tmp_path / f"batchrun-beats-{os.getuid()}").write_text("not a directory")  # as a full or broken temp dir
    beats = NodeBeats("run1", "w000", str(tmp_path))
    assert beats.post(("node-1", 1, WorkerStats(), ())) is False  # the worker then sends its own heartbeat
    assert not beats.lead() and not beats.draining() and beats.collect(4.0) == []
    beats.set_draining()
    beats.close()
