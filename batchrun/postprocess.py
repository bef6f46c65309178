"""After generation, per shard: parse completions into typed columns (labelling) and score them (evals).

Both run in the worker on the finished shard, so their columns are committed with the shard, exactly once, and a
re-run never redoes them. A failure to parse or score is recorded in the row, never a job failure. Each shard's
score totals go into its manifest entry, so the job's metrics cover every shard, also across resumed runs.
"""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa

from batchrun.hooks import load_hook

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
PY_TYPES = {"str": (str, pa.string()), "int": (int, pa.int64()), "float": (float, pa.float64()),
            "bool": (bool, pa.bool_())}


class Parser:
    """output.parse: json (optionally typed fields) | choice | regex -> `parsed` (+ fields) and `parse_error`."""

    def __init__(self, spec):
        self.spec = spec
        self.regex = re.compile(spec.pattern) if spec.kind == "regex" else None
        self.choices = {c.strip().lower(): c for c in spec.choices}

    def columns(self, texts: list[str | None]) -> dict[str, pa.Array]:
        parsed, errors = [], []
        fields = {name: [] for name in self.spec.fields}
        for text in texts:
            value, err, obj = self._parse(text)
            parsed.append(value)
            errors.append(err)
            for name, kind in self.spec.fields.items():
                fields[name].append(_typed(obj.get(name), kind) if isinstance(obj, dict) else None)
        cols = {"parsed": pa.array(parsed, pa.string()), "parse_error": pa.array(errors, pa.string())}
        for name, kind in self.spec.fields.items():
            cols[name] = pa.array(fields[name], PY_TYPES[kind][1])
        return cols

    def _parse(self, text):
        if text is None:
            return None, "no completion to parse (error row)", None
        if self.spec.kind == "json":
            body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                return None, f"not JSON: {e.msg} at char {e.pos}", None
            missing = [f for f in self.spec.fields if not isinstance(obj, dict) or f not in obj]
            err = f"JSON lacks field(s) {', '.join(missing)}" if missing else None
            return json.dumps(obj), err, obj
        if self.spec.kind == "choice":
            hit = self.choices.get(text.strip().lower())
            if hit:
                return hit, None, None
            return None, f"{text.strip()[:80]!r} is not one of {self.spec.choices}", None
        m = self.regex.search(text)
        if not m:
            return None, f"pattern {self.spec.pattern!r} not found", None
        return m.group(self.spec.group), None, None


def _typed(value, kind: str):
    py = PY_TYPES[kind][0]
    if value is None:
        return None
    try:
        return py(value) if not isinstance(value, (dict, list)) else None
    except (TypeError, ValueError):
        return None


class Scorer:
    """score: exact | last_number | regex | choice (against a reference column) | hook -> `score` per row."""

    def __init__(self, spec):
        self.spec = spec
        self.regex = re.compile(spec.pattern) if spec.pattern else None
        self.hook = load_hook(spec.hook, "score.hook") if spec.hook else None

    def column(self, texts, parsed, table: pa.Table) -> pa.Array:
        ref = self.spec.reference_column
        references = table.column(ref).to_pylist() if ref else [None] * len(texts)
        rows = table.to_pylist() if self.hook else None
        scores = []
        for i, (text, ref) in enumerate(zip(texts, references)):
            if self.hook:
                value = self.hook(text, rows[i])
                scores.append(None if value is None else float(value))
            else:
                scores.append(None if text is None else float(self._match(text, parsed[i] if parsed else None, ref)))
        return pa.array(scores, pa.float64())

    def _match(self, text: str, parsed, ref) -> bool:
        method, ref_text = self.spec.method, "" if ref is None else str(ref).strip()
        if method == "exact":
            return text.strip() == ref_text
        if method == "last_number":
            got, want = NUMBER.findall(text), NUMBER.findall(ref_text)
            return bool(got and want) and math.isclose(float(got[-1]), float(want[-1]), rel_tol=1e-9, abs_tol=1e-9)
        if method == "regex":
            m = self.regex.search(text)
            return bool(m) and m.group(self.spec.group).strip() == ref_text
        return parsed is not None and parsed.strip().lower() == ref_text.lower()  # choice


def totals(scores: pa.Array) -> dict:
    """Per-shard sums for the manifest; error rows (null score) count as wrong."""
    values = scores.to_pylist()
    return {"sum": float(sum(v for v in values if v is not None)), "rows": len(values),
            "scored": sum(v is not None for v in values)}


def merge_totals(old: dict | None, redone: dict | None) -> dict | None:
    """A part's score totals after `--retry-errors` redid its error rows: the redone rows were error rows, which add
    nothing to the sums (only to `rows`), so the sums add up and the rows stay the part's."""
    if old is None or redone is None:
        return old or redone
    return {k: old.get(k, 0) + redone.get(k, 0) if k != "rows" else old[k] for k in {**old, **redone}}
