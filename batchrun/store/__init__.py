"""The output directory and the exactly-once protocol, one module per kind of file, each with one writer:

    module       files                                   written by
    fs.py        (the primitives: read, replace, create)  -
    parts.py     part-000012.parquet                     workers (the commit)
    manifest.py  _batchrun/manifest/*.parquet            the queue (segments), the driver (compaction, reconcile)
    lock.py      _batchrun/lock.json | lock-NNNNNN.json  the driver
    runs.py      _batchrun/job.json, _batchrun/runs/*    the driver
Also: `_summary.json` (the driver), `_batchrun/complete.json` (manifest.py: a clean end), `_batchrun/leased.json`
(manifest.py: the queue's lease mark), `_batchrun/grouped/` (group.py: the input sorted by prompt prefix, with
`shards.group_prefixes`), `_batchrun/tmp/` (local parts being written). Everything internal starts with "_" so
that pyarrow.dataset and datasets' loader skip it.

A shard's life, and what a crash at each point leaves (every case is a test in tests/test_faults.py, test_s3.py,
test_drain.py, test_engine_death.py):
1. The driver takes the lock (lock.py), checks the fingerprint (runs.py), takes the complete mark away, compacts the
   manifest and, without a mark, reconciles it with the parts (manifest.py). Crash here: nothing was written but
   records; the next run does the same.
2. The queue leases the shard to a worker, having first written a lease mark past it (every shard it leases lies
   below the mark); the worker generates its rows. Crash of the worker or its engine: no part
   exists; the lease lapses or the pool hands the shard back; another worker redoes it.
3. The worker writes the part and creates it under its final name, exclusively (parts.publish): the commit. Two
   attempts racing: one create wins, the loser's copy is dropped and its report ignored. Crash just before: as 2.
4. The worker reports the entry to the queue, which appends it to a segment within a second. Crash between 3 and 4
   (worker, queue or driver): the part exists without an entry; the next start rebuilds the entry from the part's
   footer (manifest.reconcile), looking only below the lease mark. Readers never see a difference: they list parts.
5. At the end the driver compacts the manifest and leaves the complete mark. Crash before: the next start reconciles.
`run --retry-errors` replaces a part whole with its next revision (one os.replace or one PUT); the newest revision's
entry wins in every merge (manifest.merge).
"""
