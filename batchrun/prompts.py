"""Prompts from rows: a text column or a sandboxed Jinja2 template over columns; length checks against the context.

A row that cannot give a prompt becomes an error row with a message; it never stops the shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.types as pat
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from batchrun.errors import SpecError
from batchrun.spec import InputSpec

# The sandbox: templates can read the row, not call arbitrary methods or reach Python internals.
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True, slots=True)
class Prompts:
    texts: list[str | None]  # None where the row has an error (for chat: each row's message list instead)
    errors: list[str | None]  # the reason, for error rows
    chat: bool = False  # texts holds message lists, to render through the tokenizer's chat template


class PromptBuilder:
    def __init__(self, spec: InputSpec):
        self.openai = spec.openai_batch
        self.column = spec.prompt_source or spec.messages_column or None
        self.messages = bool(spec.messages_column)
        self.chat, self.system = spec.is_chat, spec.system_prompt
        self.template = None
        self.variables: list[str] = [self.column] if self.column else ["messages", "prompt"] if self.openai else []
        if spec.prompt_template is not None:
            try:
                parsed = _ENV.parse(spec.prompt_template)
                self.template = _ENV.from_string(spec.prompt_template)
            except TemplateSyntaxError as e:
                raise SpecError(
                    f"key 'input.prompt_template': invalid Jinja2 template: {e.message} (line {e.lineno})"
                ) from None
            self.variables = sorted(meta.find_undeclared_variables(parsed))

    def check_columns(self, columns: list[str]) -> None:
        missing = [v for v in self.variables if v not in columns]
        if missing and self.column:
            key = "input.messages_column" if self.messages else "input.prompt_column"
            raise SpecError(f"key '{key}': column {self.column!r} not in the input (columns: {', '.join(columns)})")
        if missing:
            raise SpecError(
                f"key 'input.prompt_template': template uses {', '.join(map(repr, missing))}, "
                f"not in the input (columns: {', '.join(columns)})"
            )

    def build(self, table: pa.Table) -> Prompts:
        if self.openai:
            return self._from_openai(table.column("messages").to_pylist(), table.column("prompt").to_pylist())
        if self.messages:
            prompts = self._from_messages(table.column(self.column).to_pylist())
        elif self.template is None:
            prompts = self._from_column(table.column(self.column))
        else:
            prompts = self._from_template(table)
        if not self.chat or self.messages:
            return prompts
        return Prompts([None if t is None else self._with_system([{"role": "user", "content": t}])
                        for t in prompts.texts], prompts.errors, chat=True)

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def _from_openai(self, messages: list, prompts: list) -> Prompts:
        """Chat requests (body.messages, kept as JSON text) and completion requests (body.prompt), row by row."""
        chats = self._from_messages([json.loads(m) if m is not None else None for m in messages])
        texts, errors = [], []
        for raw, chat, chat_error, prompt in zip(messages, chats.texts, chats.errors, prompts):
            if raw is not None:
                texts.append(chat)
                errors.append(chat_error)
            else:
                texts.append(prompt)
                errors.append(None if prompt is not None else "the request has neither body.messages nor body.prompt")
        return Prompts(texts, errors, chat=True)

    def _from_messages(self, values: list) -> Prompts:
        texts, errors = [], []
        for v in values:
            ok = isinstance(v, list) and v and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)
            texts.append(self._with_system([{"role": m["role"], "content": m["content"]} for m in v]) if ok else None)
            errors.append(None if ok else f"column {self.column!r}: expected a non-empty list of "
                                          f"{{role, content}} messages in this row, got {str(v)[:80]}")
        return Prompts(texts, errors, chat=True)

    def _from_column(self, col: pa.ChunkedArray) -> Prompts:
        values = col.to_pylist()
        if pat.is_string(col.type) or pat.is_large_string(col.type):
            errors = [None if v is not None else f"prompt column {self.column!r} is null in this row" for v in values]
            return Prompts(values, errors)
        texts, errors = [], []
        for v in values:  # mixed or non-string column (JSON input): only str values are prompts
            ok = isinstance(v, str)
            texts.append(v if ok else None)
            errors.append(None if ok else
                          f"prompt column {self.column!r} is not text in this row (got {type(v).__name__})")
        return Prompts(texts, errors)

    def _from_template(self, table: pa.Table) -> Prompts:
        texts, errors = [], []
        # a template that names no column (a constant prompt, e.g. to sample n synthetic examples) renders per row
        # too: a table of no columns lists no rows, so count them
        rows = table.select(self.variables).to_pylist() if self.variables else [{}] * table.num_rows
        for row in rows:
            missing = [k for k in self.variables if row.get(k) is None]
            if missing:
                texts.append(None)
                errors.append(f"template variable {', '.join(map(repr, missing))} is missing (null) in this row")
                continue
            try:
                texts.append(self.template.render(**row))
                errors.append(None)
            except (UndefinedError, SecurityError, TypeError, ValueError) as e:
                texts.append(None)
                errors.append(f"template failed for this row: {e}")
        return Prompts(texts, errors)


def fit_to_context(ids: list[int], max_tokens: int, context: int | None, policy: str,
                   max_prompt: int | None = None) -> tuple[list[int] | None, str | None]:
    """Apply the truncation policy to a prompt: prompt + max_tokens must fit the context, and the prompt alone the
    engine's prompt limit (max_prompt, e.g. a TensorRT engine's max_input_len). Returns (ids, None) or (None, why)."""
    by_context = context - max_tokens if context is not None else None
    room = min((n for n in (by_context, max_prompt) if n is not None), default=None)
    if room is None or len(ids) <= room:
        return ids, None
    if policy == "error" or room <= 0:
        if by_context is not None and by_context == room:
            why = f"with max_tokens={max_tokens} it exceeds the model's context of {context} tokens"
        else:
            why = f"it exceeds the engine's longest prompt of {max_prompt} tokens"
        return None, f"prompt has {len(ids)} tokens; {why} (input.truncation: {policy})"
    return (ids[-room:] if policy == "left" else ids[:room]), None
