"""How fast `shards.group_prefixes` groups an input (group.py), on this machine: documents x questions, shuffled,
grouped a window at a time in the calling process (one core) and as Ray tasks (one a window, the machine's cores).

    python bench/group.py --rows 1048576 --doc-chars 1000 --window 262144

Reported: rows/s for each way, and what that makes 1B rows take on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from batchrun.group import grouped_plan  # noqa: E402
from batchrun.plan import make_plan  # noqa: E402
from batchrun.spec import validate_spec  # noqa: E402
from batchrun.store.output import OutputDir  # noqa: E402


def write_input(path: Path, rows: int, doc_chars: int) -> None:
    rng = np.random.default_rng(0)
    letters = rng.integers(97, 107, size=(max(1, rows // 8), doc_chars), dtype=np.uint8)
    docs = [bytes(row).decode() for row in letters]
    order = rng.permutation(rows)
    pq.write_table(pa.table({"id": order, "doc": [docs[int(i) // 8 % len(docs)] for i in order],
                             "question": [f"question {int(i) % 8}?" for i in order]}), path, row_group_size=65536)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--doc-chars", type=int, default=1000)
    ap.add_argument("--window", type=int, default=262144)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="group-"))
    write_input(work / "in.parquet", args.rows, args.doc_chars)
    results = {}
    for way in ("one process", "ray tasks"):
        if way == "ray tasks":
            import ray

            ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        spec = validate_spec({"engine": {"name": "echo"}, "output": {"dir": str(work / way.replace(" ", "-"))},
                              "input": {"path": str(work / "in.parquet"), "id_column": "id",
                                        "prompt_template": "{{ doc }}\nQ: {{ question }}"},
                              "shards": {"group_prefixes": True, "group_window_rows": args.window}})
        out = OutputDir(spec.output.dir)
        out.ensure()
        t0 = time.perf_counter()
        _, info = grouped_plan(spec, make_plan(spec), out)
        seconds = time.perf_counter() - t0
        results[way] = {"seconds": round(seconds, 2), "windows": info["windows"],
                        "rows_per_s": round(args.rows / seconds)}
        print(way, json.dumps(results[way]), flush=True)
    one = results["one process"]["rows_per_s"]
    print("\n| rows | prompt chars | window | one process s | Ray tasks s | 1B rows on one core |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.rows:,} | ~{args.doc_chars + 14:,} | {args.window:,} | {results['one process']['seconds']} | "
          f"{results['ray tasks']['seconds']} | {1e9 / one / 3600:.1f} h |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
