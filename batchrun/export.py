"""`batchrun export`: the committed output in other formats. OpenAI Batch API output lines for openai-batch jobs.

Parquet stays the source of truth (it is what commits atomically); an export reads the committed parts in shard
order, one record batch at a time, so it never holds the whole output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TextIO

import pyarrow.parquet as pq

from batchrun.errors import SpecError
from batchrun.store.output import OutputDir
from batchrun.store.parts import META_KEY


def _request_id(custom_id: str) -> str:
    return hashlib.sha256(str(custom_id).encode()).hexdigest()[:24]


def openai_line(row: dict, created: int = 0, default_model: str = "batchrun") -> dict:
    """One output line of the OpenAI Batch API: {id, custom_id, response: {status_code, request_id, body}, error}.
    The body is a `chat.completion` or `text_completion` object as OpenAI's own client types declare it (openai
    package: types.chat.ChatCompletion, types.Completion): `created` (the shard's commit time) and `model` (the
    request's, else the job's model) are required there."""
    rid = _request_id(row["custom_id"])
    if row.get("error") is not None:
        return {"id": f"batch_req_{rid}", "custom_id": row["custom_id"], "response": None,
                "error": {"code": "batchrun_error", "message": row["error"]}}
    chat = row.get("url", "").endswith("/chat/completions")
    choice = {"index": 0, "finish_reason": row["finish_reason"], "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": row["generated_text"]}
    else:
        choice["text"] = row["generated_text"]
    usage = {"prompt_tokens": row["num_prompt_tokens"], "completion_tokens": row["num_generated_tokens"],
             "total_tokens": row["num_prompt_tokens"] + row["num_generated_tokens"]}
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": "chat.completion" if chat else "text_completion",
            "created": int(created), "model": row.get("model") or default_model, "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{rid}", "custom_id": row["custom_id"],
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def export_openai_batch(out_dir: str | Path, fh: TextIO) -> int:
    out, n = OutputDir(out_dir), 0
    model = _job_model(out)
    for part in out.parts.names():
        with out.open(part) as src:
            pf = pq.ParquetFile(src)
            if "custom_id" not in pf.schema_arrow.names:
                raise SpecError(f"{out.root}: batchrun export writes OpenAI Batch output lines, for jobs whose input "
                                "is an OpenAI Batch file (input.format: openai-batch); this output has no custom_id "
                                "column")
            entry = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
            created = int(entry.get("committed_at", 0))  # the shard's commit, from the entry its footer carries
            for batch in pf.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    fh.write(json.dumps(openai_line(row, created, model)) + "\n")
                    n += 1
    return n


def _job_model(out: OutputDir) -> str:
    """The job's model name (the last part of engine.model), for requests that named none."""
    model = out.runs.job().get("components", {}).get("engine", {}).get("model")
    return Path(model).name if model else "batchrun"
