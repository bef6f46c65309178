"""`batchrun run | plan | status | demo-data`. Exit codes: 0 done, 1 job failed, 2 bad job file or input, 3 locked."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from batchrun.errors import BatchrunError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="batchrun", description="Distributed batch inference for LLMs on Ray.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in [("run", "run a job"), ("plan", "show shards, rows, resources and the resolved spec"),
                           ("build", "build the job's TensorRT engine once, into engine.options.engine_cache")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job", help="job file (YAML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key, e.g. --set output.dir=/tmp/x (repeatable)")
    run = sub.choices["run"]
    run.add_argument("--overwrite", action="store_true", help="discard the outputs of a different earlier job")
    run.add_argument("--break-lock", action="store_true", help="take over the output dir from a run that is gone")
    run.add_argument("--retry-errors", action="store_true",
                     help="also generate again the rows that ended in error (after a transient fault, or a fixed "
                          "template), replacing their parts atomically")
    run.add_argument("--no-progress", action="store_true")
    st = sub.add_parser("status", help="progress of a job from its output dir, during or after a run")
    st.add_argument("out_dir")
    st.add_argument("--json", action="store_true")
    st.add_argument("--plot", action="store_true",
                    help="write a shard timeline PNG (_timeline.png) next to the summary")
    ex = sub.add_parser("export", help="write a job's committed output in another format")
    ex.add_argument("out_dir")
    ex.add_argument("--format", choices=["openai-batch"], default="openai-batch")
    ex.add_argument("-o", "--output", default=None,
                    help="file to write (default: OUT_DIR/_batch_output.jsonl; '-' for stdout)")
    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks, run as batchrun jobs on the job file's engine")
    ev.add_argument("job", help="job file (YAML): engine, resources, output.dir (input and score come from the tasks)")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or groups)")
    ev.add_argument("--num_fewshot", type=int, default=None)
    ev.add_argument("--limit", type=float, default=None, help="documents per task (a fraction below 1)")
    ev.add_argument("--apply_chat_template", action="store_true")
    ev.add_argument("--include_path", default=None, help="a directory of local task configs (YAML)")
    ev.add_argument("--output_path", default=None, help="results JSON (default: OUTPUT_DIR/_lm_eval/results.json)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--no-progress", action="store_true")
    from batchrun.bench import add_parser as add_bench
    from batchrun.bench import cmd_bench

    add_bench(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "build": cmd_build,
                "export": cmd_export, "bench": cmd_bench, "eval": cmd_eval}[args.cmd](args)
    except BatchrunError as e:
        print(f"batchrun: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("batchrun: interrupted; committed shards are kept, re-run the same command to resume", file=sys.stderr)
        return 130


def cmd_plan(args) -> int:
    from batchrun.runner import JobRunner
    from batchrun.spec import load_spec

    spec = load_spec(args.job, args.overrides)

    def planned(spec) -> dict:
        plan = JobRunner(spec, show_progress=False).prepare()
        rows = plan.shards.num_rows(range(len(plan.shards)))  # computed from the ranges, not shard by shard
        return {"input": plan.summary(),
                "shards": {"count": len(plan.shards), "rows_per_shard": spec.rows_per_shard,
                           "smallest": int(rows.min()) if len(rows) else 0,
                           "largest": int(rows.max()) if len(rows) else 0},
                "resources": spec.resources.model_dump(), "spec": spec.model_dump()}

    if spec.tasks is not None:  # a suite: each task's plan, every one checked as `run` checks them
        print(json.dumps({"tasks": {name: planned(task) for name, task in spec.task_specs()}}, indent=2))
        return 0
    print(json.dumps(planned(spec), indent=2))
    return 0


def cmd_build(args) -> int:
    from batchrun.engines import check_engine
    from batchrun.errors import SpecError
    from batchrun.spec import load_spec

    spec = load_spec(args.job, args.overrides)
    if spec.engine.name != "trtllm":
        raise SpecError(f"key 'engine.name': batchrun build is for engine trtllm (given: {spec.engine.name!r})")
    check_engine(spec)
    from batchrun.engines.trtllm import build_engine

    try:
        path, built = build_engine(spec.engine.model, spec.engine.tensor_parallel_size, spec.engine.dtype,
                                   spec.engine.trust_remote_code, spec.engine.options,
                                   logprobs=bool(spec.sampling.logprobs or spec.sampling.top_logprobs),
                                   scoring=bool(spec.scoring))
    except ValueError as e:
        raise SpecError(str(e)) from None
    print(f"{'built' if built else 'already built (same fingerprint)'}: {path}")
    return 0


def cmd_eval(args) -> int:
    from batchrun.evals import require_lm_eval, run_eval

    require_lm_eval()  # says what to install, before anything else
    from lm_eval.utils import make_table

    results = run_eval(args.job, args.overrides, [t for t in args.tasks.split(",") if t], args.num_fewshot,
                       args.limit, args.apply_chat_template, args.include_path, args.output_path,
                       show_progress=not args.no_progress)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


def cmd_run(args) -> int:
    from batchrun.runner import JobRunner
    from batchrun.spec import load_spec

    spec = load_spec(args.job, args.overrides)
    kwargs = dict(overwrite=args.overwrite, break_lock=args.break_lock, show_progress=not args.no_progress,
                  retry_errors=args.retry_errors)
    if spec.tasks is not None:
        from batchrun.runner import SuiteRunner

        print_suite(SuiteRunner(spec, **kwargs).run().summary)
        return 0
    print_summary(JobRunner(spec, **kwargs).run().summary)
    return 0


def print_suite(s: dict) -> None:
    print(f"\nbatchrun: suite {s['status']}: {len(s['tasks'])} tasks, {s['rows']} rows, {s['error_rows']} error rows "
          f"in {s['wall_s']:.1f}s")
    for name, t in s["tasks"].items():
        m = t.get("metrics") or {}
        keys = ("word_perplexity", "bits_per_byte") if "word_perplexity" in m else (
            ("acc", "acc_norm") if "acc" in m else ("score_mean",))
        shown = ", ".join(f"{k} {m[k]:.4g}" for k in keys if m.get(k) is not None)
        print(f"  {name}: {t['status']}, {t.get('rows', 0)} rows" + (f", {shown}" if shown else "")
              + (" (engine reused)" if t.get("engine_reused") else "") + (f" ({t['error']})" if t.get("error") else ""))
    print(f"  output: {s['output_dir']} (one subdirectory per task; summary: _summary.json)")


def reuse_line(cached: int, prompt: int) -> str:
    """The final line about prefix reuse, for `batchrun run` and `batchrun status` alike."""
    return (f"  prefix reuse: {cached:,} of {prompt:,} prompt tokens served from cached blocks "
            f"({cached / prompt:.1%}); {prompt - cached:,} computed")


def print_summary(s: dict, samples: int = 3) -> None:
    from batchrun.cost import cost_line

    run = s["this_run"]
    print(f"\nbatchrun: {s['status']}: {s['rows']} rows in {s['shards_committed']}/{s['shards']} shards "
          f"({s['shards_skipped']} already committed), {s['error_rows']} error rows")
    print(f"  this run: {run['rows']} rows, {run['generated_tokens']} generated tokens in {run['wall_s']:.1f}s "
          f"from the command's start = {run['rows_per_s']:,.1f} rows/s, {run['generated_tokens_per_s']:,.1f} tok/s")
    if (retried := s.get("retried_error_rows") or {}).get("shards"):
        print(f"  retried: {retried['rows']} error rows in {retried['shards']} shards generated again, "
              f"{retried['still_failing']} still fail")
    print_workers(s)
    if s.get("metrics"):
        print(metrics_line(s["metrics"]))
    if (s.get("prefix_reuse") or {}).get("prompt_tokens_cached"):
        print(reuse_line(s["prefix_reuse"]["prompt_tokens_cached"], s["prompt_tokens"]))
    if s.get("cost"):
        print(cost_line(s["cost"]))
    print(f"  output: {s['output_dir']} (summary: _summary.json)")
    shards = sorted(sid for w in s["workers"].values() for sid in w["shards"])
    print_sample_rows(s["output_dir"], samples, shards[0] if shards else None)


def print_workers(s: dict) -> None:
    """Each worker's share, the start-up split of the first one, and the window each kept (one line a size)."""
    windows = s.get("worker_engine_window_s", {})
    for wid, w in sorted(s["workers"].items()):
        busy = windows.get(wid)
        rate = f", {w['generated_tokens'] / busy:,.0f} tok/s over its {busy:.1f}s engine window" if busy else ""
        print(f"  {wid} on {w['node']}: {len(w['shards'])} shards, {w['rows']} rows, "
              f"{w['generated_tokens']} tokens{rate}")
    st = s.get("startup") or {}
    if st.get("first_completion_s") is not None:
        phases = {k: v for w in list(st["workers"].values())[:1] for k, v in w.items()
                  if k.endswith("_s") and k != "first_completion_s"}
        print(f"  start-up: first completion {st['first_completion_s']:.1f}s after the command (plan "
              f"{st.get('plan_s', 0):.1f}s, Ray {st.get('ray_start_s', 0):.1f}s; first worker: "
              + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f}s" for k, v in phases.items() if v is not None) + ")")
    chosen = {}
    for v in s.get("worker_max_in_flight", {}).values():
        if v.get("window"):
            chosen.setdefault(v["window"], v["why"])  # workers sized from their own first shard: one line a size
    for window, why in sorted(chosen.items()):
        print(f"  in flight per worker: {window} ({why})")


def metrics_line(m: dict) -> str:
    if "word_perplexity" in m:
        return (f"  perplexity over {m['rows_scored']} texts: word {m['word_perplexity']:.4g}, byte "
                f"{m['byte_perplexity']:.4g}, bits per byte {m['bits_per_byte']:.4g}")
    if "acc" in m:
        return (f"  acc {m['acc']:.4f}, acc_norm {m['acc_norm']:.4f} over {m['rows']} rows "
                f"({m['rows'] - m['rows_scored']} error rows count as wrong)")
    return (f"  score: {m['score_mean']:.4f} mean over {m['rows']} rows ({m['score_sum']:g} right; "
            f"{m['rows'] - m['rows_scored']} error rows count as wrong)")


def print_sample_rows(output_dir: str, samples: int, shard_id: int | None) -> None:
    """A few rows of one part (this run's first, else the first listed): the summary never reads the whole output,
    nor lists it when this run committed a part."""
    import pyarrow.parquet as pq

    from batchrun.store.output import OutputDir

    out = OutputDir(output_dir)
    parts = [out.parts.path(shard_id)] if shard_id is not None else out.parts.names()[:1]
    if parts:
        with out.open(parts[0]) as fh:
            batch = next(pq.ParquetFile(fh).iter_batches(batch_size=samples))
        for row in batch.to_pylist():
            print("  " + json.dumps(row, default=str)[:200])


def cmd_export(args) -> int:
    from batchrun.errors import SpecError
    from batchrun.export import export_openai_batch
    from batchrun.store.output import OutputDir

    out = OutputDir(args.out_dir)
    if not out.exists():
        raise SpecError(f"{args.out_dir} is not a batchrun output dir (no _batchrun/job.json in it)")
    if args.output == "-":
        n = export_openai_batch(args.out_dir, sys.stdout)
    else:  # by default next to the output (on an object store too); -o takes any local path or URL
        import fsspec

        target = args.output or (out.join("_batch_output.jsonl") if out.local else
                                 f"{out.protocol}://{out.join('_batch_output.jsonl')}")
        with fsspec.open(target, "w") as fh:
            n = export_openai_batch(args.out_dir, fh)
        print(f"wrote {n} lines to {target}", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from batchrun.store.output import OutputDir
    from batchrun.summary import job_status

    out = OutputDir(args.out_dir)
    suite = out.read_json(out.join("_suite.json"))
    if suite is None:
        status = job_status(out, args.plot)
        print(json.dumps(status, indent=2, default=str)) if args.json else print_status(status)
        return 0
    # a suite: each task's status, from its own output subdirectory
    subdirs = suite.get("subdirs") or {}
    tasks = {name: job_status(OutputDir(out.join(sub) if out.local else f"{out.root}/{sub}"), args.plot)
             for name in suite["tasks"] for sub in [subdirs.get(name, name)]}
    status = {"output_dir": str(out.root), "running": any(t["running"] for t in tasks.values()), "tasks": tasks,
              "rows_committed": sum(t["rows_committed"] for t in tasks.values()),
              "rows_total": sum(t["rows_total"] for t in tasks.values())}
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(f"{out.root}: suite of {len(tasks)} tasks, {'running' if status['running'] else 'not running'}; rows "
          f"{status['rows_committed']}/{status['rows_total']}")
    for name, t in tasks.items():
        print(f"- {name}: ", end="")
        print_status(t)
    return 0


def print_status(status: dict) -> None:
    from batchrun.cost import cost_line

    state = "running" if status["running"] else "not running"
    print(f"{status['output_dir']}: {state}; {status['shards_committed']} shards committed, "
          f"{len(status['shards_quarantined'])} quarantined; rows {status['rows_committed']}/{status['rows_total']}; "
          f"{status['rows_per_s']:,.1f} rows/s processing (first lease to last commit, without start-up)"
          + (f"; ETA {status['eta_s']}s" if status["eta_s"] else ""))
    if status["prompt_tokens_cached"]:
        print(reuse_line(status["prompt_tokens_cached"], status["prompt_tokens"]))
    if status["cost"]:
        print(cost_line(status["cost"]))
    for sid, err in sorted(status["shards_quarantined"].items()):
        print(f"  quarantined shard {sid}: {err}")
    if status.get("plot"):
        print(f"  timeline: {status['plot']}")


def entry() -> None:
    """The `batchrun` command. After a job on a local cluster it started, the process stops that cluster without
    waiting for it and exits at once (runner.end_local_cluster): the shell prompt is back within a fraction of a
    second of the summary; so does a command that never used Ray. main() itself, which tests and programs call,
    never exits the process."""
    code = main()
    runner = sys.modules.get("batchrun.runner")
    ray = sys.modules.get("ray")
    # A command that never joined Ray (status, plan, export) exits without the interpreter's teardown too: Arrow's
    # thread pools can abort the process there after all the output is written ("terminate called without an active
    # exception", exit -6: apache/arrow#34314; seen here about once in 60 `status` calls under load)
    if (runner is not None and runner.end_local_cluster()) or ray is None or not ray.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
