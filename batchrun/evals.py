"""`batchrun eval JOB.yaml --tasks ...`: lm-evaluation-harness's tasks, run as batchrun jobs.

lm-eval builds every request with its own task code (`simple_evaluate`: prompts, few-shot, chat templates, filters,
metrics); `BatchrunLM`, the `LM` it is given, runs each kind of request as one batchrun job on the job file's engine,
workers and output dir, so a cluster, TensorRT-LLM, exactly-once and resume come with it:
- loglikelihood: the requests of one document that share a context become one row whose choices are their
  continuations (`score.method: loglikelihood`, no delimiter: lm-eval's continuations carry it); each request's
  (log-likelihood, is_greedy) comes from its choice;
- loglikelihood_rolling: one row per text (`score.method: loglikelihood_rolling`);
- generate_until: one job per distinct set of generation settings (until, max_gen_toks, sampling), rows greedy
  unless the task samples, stop strings and the prompt's left truncation as lm-eval's HF backend applies them.
Each row's id is (task, document, request index), so an interrupted eval re-run on the same output dir resumes:
committed shards are not computed again. The jobs live in subdirectories of output.dir (`loglikelihood/`,
`loglikelihood_rolling/`, `generate_until-<n>/`), their inputs and lm-eval's results under `_lm_eval/`.

lm-eval is an optional extra (`pip install 'batchrun[evals]'`)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from batchrun.errors import SpecError
from batchrun.spec import load_raw, validate_spec

log = logging.getLogger(__name__)
MAX_GEN_TOKS = 256  # lm-eval's HFLM default for generate_until


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise SpecError("batchrun eval needs lm-evaluation-harness: pip install 'batchrun[evals]'") from None
    return lm_eval


def make_lm(raw: dict, **runner_kwargs):
    """A batchrun `LM` for lm-eval (defined here, once lm-eval is importable)."""
    from lm_eval.api.model import LM

    class BatchrunLM(LM):
        """lm-eval's requests as batchrun jobs (module docstring)."""

        def __init__(self):
            super().__init__()
            self.raw = raw
            self.runner_kwargs = runner_kwargs
            self.summaries: dict[str, dict] = {}
            self._tokenizer = None

        # ---------------------------------------------------------------- requests

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault((r.task_name, r.doc_id, r.args[0]), []).append(i)
            rows = [{"id": row_id(task, doc, requests[idx[0]].idx), "prompt": ctx,
                     "choices": [requests[i].args[1] for i in idx]} for (task, doc, ctx), idx in groups.items()]
            out = self._run("loglikelihood", rows, {"score": {"method": "loglikelihood", "choices_column": "choices",
                                                              "target_delimiter": ""}},
                            ["choice_logprobs", "choice_greedy", "error"])
            results: list = [None] * len(requests)
            for row, idx in zip(rows, groups.values()):
                got = out[row["id"]]
                for k, i in enumerate(idx):
                    results[i] = (got["choice_logprobs"][k], bool(got["choice_greedy"][k]))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            rows = [{"id": row_id(r.task_name, r.doc_id, r.idx), "prompt": r.args[0]} for r in requests]
            out = self._run("loglikelihood_rolling", rows, {"score": {"method": "loglikelihood_rolling"}},
                            ["loglikelihood", "error"])
            return [out[row["id"]]["loglikelihood"] for row in rows]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            by_settings: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                by_settings.setdefault(json.dumps(generation(r.args[1]), sort_keys=True), []).append(i)
            results: list = [None] * len(requests)
            for n, (settings, idx) in enumerate(sorted(by_settings.items())):
                rows = [{"id": row_id(requests[i].task_name, requests[i].doc_id, requests[i].idx),
                         "prompt": requests[i].args[0]} for i in idx]
                out = self._run(f"generate_until-{n}", rows, {"sampling": json.loads(settings)},
                                ["generated_text", "error"])
                for row, i in zip(rows, idx):
                    results[i] = out[row["id"]]["generated_text"] or ""
            return results

        def _run(self, name: str, rows: list[dict], job: dict, columns: list[str]) -> dict[str, dict]:
            """One batchrun job of these rows in output.dir/<name>; its rows by id. A row that failed stops the
            eval: lm-eval has no error value for a request."""
            from batchrun.runner import JobRunner

            spec = validate_spec(sub_job(self.raw, name, write_rows(self.raw, name, rows), job), source=name)
            summary = JobRunner(spec, **self.runner_kwargs).run().summary
            self.summaries[name] = summary
            out = read_rows(spec.output.dir, ["id", *columns])
            missing = [r["id"] for r in rows if r["id"] not in out]
            failed = {k: v["error"] for k, v in out.items() if v.get("error")}
            if missing or failed:
                raise SpecError(f"batchrun eval: {len(missing)} rows missing and {len(failed)} rows failed in "
                                f"{spec.output.dir}; first: {next(iter(failed.items()), missing[:1])}")
            return out

        # ---------------------------------------------------------------- chat templates (--apply_chat_template)

        @property
        def tokenizer(self):
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                engine = self.raw["engine"]
                self._tokenizer = AutoTokenizer.from_pretrained(engine.get("tokenizer") or engine["model"],
                                                                trust_remote_code=engine.get("trust_remote_code",
                                                                                             False))
            return self._tokenizer

        @property
        def tokenizer_name(self) -> str:
            return str(self.raw["engine"].get("tokenizer") or self.raw["engine"]["model"]).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tokenizer.chat_template if chat_template else None

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

    return BatchrunLM()


def row_id(task: str, doc_id, idx) -> str:
    return f"{task}/{doc_id}/{idx}"


def generation(gen_kwargs: dict) -> dict:
    """lm-eval's generation settings (HFLM.generate_until) as batchrun's sampling section."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    samples = bool(kw.pop("do_sample", False)) and float(kw.get("temperature", 1.0) or 0) > 0
    out = {"max_tokens": int(kw.pop("max_gen_toks", MAX_GEN_TOKS)), "stop": [u for u in until if u],
           "temperature": float(kw.get("temperature", 1.0)) if samples else 0.0}
    if samples and kw.get("top_p") is not None:
        out["top_p"] = float(kw["top_p"])
    return out


def sub_job(raw: dict, name: str, input_path: str, job: dict) -> dict:
    """The job file's engine, resources and shards; this request kind's input, scoring or sampling and output."""
    sub = {k: copy.deepcopy(v) for k, v in raw.items() if k in ("engine", "resources", "shards", "faults")}
    sub["input"] = {"path": input_path, "id_column": "id", "prompt_column": "prompt", "truncation": "left"}
    sub["output"] = {**{k: v for k, v in (raw.get("output") or {}).items() if k in ("compression",)},
                     "dir": join(raw["output"]["dir"], name)}
    sub.update(copy.deepcopy(job))
    return sub


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def write_rows(raw: dict, name: str, rows: list[dict]) -> str:
    """The rows as Parquet under output.dir/_lm_eval/ (written once: a re-run finds the same rows there)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = join(join(raw["output"]["dir"], "_lm_eval"), f"{name}.parquet")
    table = pa.Table.from_pylist(rows)
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(fs_path, "wb") as fh:
        pq.write_table(table, fh)
    return path


def read_rows(out_dir: str, columns: list[str]) -> dict[str, dict]:
    import fsspec
    import pyarrow.dataset as ds

    fs, path = fsspec.core.url_to_fs(out_dir)
    return {r["id"]: r for r in ds.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=columns).to_pylist()}


def run_eval(job: str, overrides: list[str], tasks: list[str], num_fewshot: int | None = None,
             limit: float | None = None, apply_chat_template: bool = False, include_path: str | None = None,
             output_path: str | None = None, **runner_kwargs) -> dict:
    """lm-eval's simple_evaluate with batchrun's LM; returns lm-eval's results (samples left out) and writes them
    as JSON (output_path, else output.dir/_lm_eval/results.json)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    raw = load_raw(job, overrides)
    if not (raw.get("output") or {}).get("dir"):
        raise SpecError(f"job file {job}: key 'output.dir' is required (the eval's jobs and results go there)")
    raw.setdefault("input", {})
    lm = make_lm(raw, **runner_kwargs)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SpecError(f"--tasks: {', '.join(unknown)} not among lm-eval's tasks"
                        + (f" or those in {include_path}" if include_path else "") + " (lm_eval --tasks list)")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      apply_chat_template=apply_chat_template, task_manager=manager,
                                      log_samples=False)
    results["batchrun"] = {name: {"status": s["status"], "output_dir": s["output_dir"], "rows": s["rows"],
                                  "rows_this_run": s["this_run"]["rows"], "wall_s": s["this_run"]["wall_s"]}
                           for name, s in lm.summaries.items()}
    text = json.dumps(results, indent=2, default=str)
    target = output_path or join(join(raw["output"]["dir"], "_lm_eval"), "results.json")
    import fsspec

    with fsspec.open(target, "w") as fh:
        fh.write(text)
    return results
