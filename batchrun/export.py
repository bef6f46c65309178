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

from batchrun.sink import OutputDir


def _request_id(custom_id: str) -> str:
    return hashlib.sha256(str(custom_id).encode()).hexdigest()[:24]


def openai_line(row: dict) -> dict:
    """One output line of the OpenAI Batch API: {id, custom_id, response: {status_code, request_id, body}, error}."""
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
            "model": row.get("model"), "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{rid}", "custom_id": row["custom_id"],
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def export_openai_batch(out_dir: str | Path, fh: TextIO) -> int:
    out, n = OutputDir(out_dir), 0
    for part in out.parts():
        for batch in pq.ParquetFile(part).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                fh.write(json.dumps(openai_line(row)) + "\n")
                n += 1
    return n
