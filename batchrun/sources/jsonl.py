"""JSON Lines input: one object per non-empty line; rows are counted by lines, shards parse only their lines."""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from batchrun.errors import SpecError
from batchrun.shards import Fragment
from batchrun.sources.base import CursorCache, Source
from batchrun.sources.files import list_files


class JsonlSource(Source):
    def __init__(self, path: str, openai_batch: bool = False):
        self.path = path
        self.openai_batch = openai_batch  # OpenAI Batch API request lines, flattened to rows
        self.fs, self.files = list_files(path, (".jsonl", ".json", ".ndjson"))
        # per file: the open line iterator and the line it stands at. The next shard of a file continues from the
        # last one instead of scanning the file from its start again (quadratic over a file's shards).
        self._cursors = CursorCache()

    def _lines(self, name: str) -> Iterator[tuple[int, str]]:
        """(line number, text) of each non-empty line. Bytes are decoded line by line, so a byte that is not UTF-8
        names its file and line instead of failing the job with a bare UnicodeDecodeError."""
        with self.fs.open(name, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SpecError(f"key 'input.path': {name} line {lineno}: not valid UTF-8 ({e.reason} at byte "
                                    f"{e.start} of the line: {raw[max(e.start - 10, 0):e.start + 10]!r}); "
                                    "JSON Lines files must be UTF-8") from None
                if line.strip():
                    yield lineno, line

    def describe(self):
        rows = [sum(1 for _ in self._lines(f)) for f in self.files]
        first = next((f for f, n in zip(self.files, rows) if n), None)
        columns = list(self._row(first, *next(self._lines(first)))) if first else []
        return self.files, rows, OPENAI_COLUMNS if self.openai_batch else columns

    def _row(self, name: str, lineno: int, line: str) -> dict:
        obj = self._parse(name, lineno, line)
        return openai_request_row(obj) if self.openai_batch else obj

    @staticmethod
    def _parse(name: str, lineno: int, line: str) -> dict:
        """A line that is not a JSON object is refused with its file and line (the plan's input scan meets every
        line before the cluster starts; a file changed under a running job fails that shard the same way)."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(f"key 'input.path': {name} line {lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                            f"{line.strip()[:80]!r}") from None
        if not isinstance(obj, dict):
            raise SpecError(f"key 'input.path': {name} line {lineno}: expected a JSON object, got "
                            f"{type(obj).__name__}")
        return obj

    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        cursor = self._cursors.get(unit, fragment.start) or LineCursor(self._lines(unit))
        collections.deque(itertools.islice(cursor.lines, fragment.start - cursor.pos), maxlen=0)  # skip ahead
        taken = list(itertools.islice(cursor.lines, fragment.stop - fragment.start))
        cursor.pos = fragment.start + len(taken)
        self._cursors.put(unit, cursor)  # an evicted or replaced cursor's file closes with its generator
        rows = [self._row(unit, lineno, line) for lineno, line in taken]
        if len(rows) != fragment.stop - fragment.start:
            raise SpecError(f"input file {unit} changed while the job ran: expected {fragment.stop} rows")
        return pa.table({c: _column([r.get(c) for r in rows]) for c in columns})


@dataclass
class LineCursor:
    lines: Iterator[tuple[int, str]]  # the file's non-empty lines (with their line numbers) from `pos` on
    pos: int = 0


def _column(values: list) -> pa.Array:
    """JSON has no column types: a column mixing types keeps its strings and holds other values as JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


# The columns an OpenAI Batch API request line becomes (https://platform.openai.com/docs/api-reference/batch):
# {"custom_id", "method", "url", "body": {"model", "messages" | "prompt", "max_tokens" | "max_completion_tokens", ...}}
OPENAI_COLUMNS = ["custom_id", "url", "model", "messages", "prompt", "max_tokens"]


def openai_request_row(obj: dict) -> dict:
    body = obj.get("body") if isinstance(obj.get("body"), dict) else {}
    messages = body.get("messages")
    return {
        "custom_id": obj.get("custom_id"),
        "url": obj.get("url") or ("/v1/chat/completions" if messages is not None else "/v1/completions"),
        "model": body.get("model"),
        # kept as JSON text: JSON has no column types, and a row may be a chat or a completion
        "messages": json.dumps(messages) if messages is not None else None,
        "prompt": body.get("prompt") if isinstance(body.get("prompt"), str) else None,
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
    }
