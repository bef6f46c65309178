"""`batchrun export --format openai-batch` lines, validated with the `openai` package's own types (no Ray)."""

from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batchrun.export import openai_line

pytestmark = pytest.mark.fast

ROW = {"custom_id": "r1", "generated_text": "42", "finish_reason": "stop", "num_prompt_tokens": 5,
       "num_generated_tokens": 2, "error": None}


@pytest.mark.parametrize("url,kind", [("/v1/chat/completions", ChatCompletion), ("/v1/completions", Completion)])
@pytest.mark.parametrize("model", ["gpt-4o-mini", None])
def test_lines_validate_with_openai_types(url, kind, model):
    line = openai_line({**ROW, "url": url, "model": model, "finish_reason": "length"}, created=1764000000,
                       default_model="demo-model")
    body = kind.model_validate(line["response"]["body"])
    assert body.created == 1764000000 and body.model == (model or "demo-model")
    assert body.usage.total_tokens == 7 and line["custom_id"] == "r1" and line["error"] is None
    choice = body.choices[0]
    assert (choice.message.content if kind is ChatCompletion else choice.text) == "42"
    assert choice.finish_reason == "length"


def test_error_rows_are_error_lines():
    line = openai_line({**ROW, "url": "/v1/chat/completions", "model": "m", "error": "prompt too long",
                        "finish_reason": "error", "generated_text": None})
    assert line["response"] is None and line["error"] == {"code": "batchrun_error", "message": "prompt too long"}
