"""Log-likelihood scoring as lm-evaluation-harness computes it (its HF backend with its defaults), without generating.

Three kinds of scoring job, each a set of (context tokens, continuation tokens) pairs per row, whose log P(continuation
| context) the engine computes (Engine.score: `Request.pairs`):
- multiple choice (`score.method: loglikelihood`): one pair per choice, all sharing the row's prompt as context;
- labels with probabilities (`output.parse: {kind: choice, probabilities: true}`): one pair per label;
- perplexity (`score.method: loglikelihood_rolling`): the row's whole text in disjoint windows of the context.

The rules, each from lm-eval 0.4.13 (lm_eval/api/model.py `TemplateLM._encode_pair`, `TemplateLM.loglikelihood`;
lm_eval/models/huggingface.py `HFLM.tok_encode`, `prefix_token_id`, `_loglikelihood_tokens`,
`loglikelihood_rolling`; lm_eval/utils.py `get_rolling_token_windows`, `make_disjoint_window`; lm_eval/api/task.py
`ConfigurableTask.process_results`, lm_eval/api/metrics.py `weighted_perplexity`, `bits_per_byte`):
- the continuation of a choice is `target_delimiter + choice` (" " by default);
- trailing whitespace of the context moves to the front of the continuation;
- context + continuation are encoded together and split where the context's own encoding ends; encoding uses the
  tokenizer's default special tokens (`add_special_tokens` left unset), except that a text starting with the BOS
  text is encoded without them;
- an empty context becomes the prefix token (BOS, else EOS), or, when the continuation starts with it, the
  continuation's first token;
- the model sees (context + continuation)[-(max_length + 1):][:-1]: too long, it is cut from the left;
- is_greedy: every continuation token is the argmax at its position;
- acc: argmax of the log-likelihoods; acc_norm: argmax of log-likelihood / len(choice) in characters; acc_bytes: per
  UTF-8 byte of the choice;
- rolling: windows of max_length tokens predicting every token once, the first conditioned on the prefix token;
  word_perplexity = exp(-sum ll / sum words), byte_perplexity = exp(-sum ll / sum bytes), bits_per_byte =
  -sum ll / sum bytes / ln 2, words counted as re.split(r"\\s+", text).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

Pair = tuple[tuple[int, ...], tuple[int, ...]]


def encode_pair(tok_encode: Callable[[str], list[int]], prefix_token: int, context: str, continuation: str) -> Pair:
    """(context tokens, continuation tokens) of one choice, as lm-eval encodes them."""
    if context == "":
        cont = tok_encode(continuation, False)
        if cont and cont[0] == prefix_token:
            return tuple(cont[:1]), tuple(cont[1:])
        return (prefix_token,), tuple(cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole, ctx = tok_encode(context + continuation, None), tok_encode(context, None)
    return tuple(ctx), tuple(whole[len(ctx):])


def rolling_pairs(tokens: list[int], prefix_token: int, max_length: int) -> list[Pair]:
    """The disjoint windows that predict each token of `tokens` once (lm-eval's rolling windows, context_len=1)."""
    windows = _rolling_windows(tokens, prefix_token, max_length)
    return [(tuple(a[: len(a) - (len(b) - 1)]), tuple(b)) for a, b in windows]


def _rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix_token] + tokens[: first - 1], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        yield tokens[end - max_len - 1: end - 1], tokens[end - n: end]
        predicted += n


def tok_encode(tokenizer, bos_text: str | None, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """lm-eval's HFLM.tok_encode with its defaults, on a Hugging Face tokenizer: the tokenizer's own special tokens
    unless told, none when the text already starts with the BOS text."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None and bos_text and text.startswith(bos_text):
        kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def prefix_token(tokenizer) -> tuple[int | None, str | None]:
    """lm-eval's prefix_token_id (BOS, else EOS) and its text (what tok_encode looks for)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return token, tokenizer.decode(token) if token is not None else None


def pair_problem(pairs, context_length: int) -> str | None:
    """Why a row's pairs cannot be scored (an error row), or None."""
    pairs = pairs or ()
    too_long = [i for i, (_, cont) in enumerate(pairs) if len(cont) > context_length]
    empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
    if not pairs:
        return "no choice to score"
    if empty:
        return f"choice {empty[0]} encodes to no tokens"
    if too_long:
        return f"choice {too_long[0]} is longer than the model's context ({context_length} tokens)"
    return None


def model_input(pair: Pair, max_length: int) -> tuple[list[int], int]:
    """The tokens the model sees for a pair, and how many of its last positions predict the continuation."""
    ctx, cont = pair
    return list(ctx + cont)[-(max_length + 1):][:-1], len(cont)


# ---------------------------------------------------------------- per row: what the output columns hold


def choice_texts(choices: list[str], delimiter: str) -> list[str]:
    return [delimiter + c for c in choices]


def reference_index(ref, choices: list[str]) -> tuple[int | None, str | None]:
    """The right choice's index from a reference that is an index or a choice's text; or why there is none."""
    if ref is None:
        return None, "the reference is null"
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        return None, f"the reference {ref!r} is neither a choice's index nor its text"
    if isinstance(ref, int):
        return (ref, None) if 0 <= ref < len(choices) else (None, f"the reference index {ref} is outside the "
                                                                 f"{len(choices)} choices")
    if ref in choices:
        return choices.index(ref), None
    stripped = [c.strip() for c in choices]
    if ref.strip() in stripped:
        return stripped.index(ref.strip()), None
    return None, f"the reference {ref[:80]!r} is not one of the choices"


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy's argmax


def predictions(lls: list[float], choices: list[str]) -> tuple[int, int, int]:
    """(pred, pred_norm, pred_bytes): argmax of the log-likelihoods, per character and per byte of the choice."""
    chars = [max(len(c), 1) for c in choices]  # lm-eval divides by len(choice); an empty choice would divide by 0
    nbytes = [max(len(c.encode("utf-8")), 1) for c in choices]
    return (argmax(lls), argmax([ll / n for ll, n in zip(lls, chars)]),
            argmax([ll / n for ll, n in zip(lls, nbytes)]))


def label_probs(lls: list[float]) -> list[float]:
    """Each label's probability, normalised over the labels (a softmax of their log-likelihoods)."""
    top = max(lls)
    weights = [math.exp(ll - top) for ll in lls]
    total = sum(weights)
    return [w / total for w in weights]


def text_counts(text: str) -> tuple[int, int]:
    """(words, bytes) of a text, as lm-eval's perplexity tasks count them."""
    return len(re.split(r"\s+", text)), len(text.encode("utf-8"))


def perplexity_metrics(ll_sum: float, words: int, nbytes: int) -> dict:
    return {"word_perplexity": math.exp(-ll_sum / words) if words else None,
            "byte_perplexity": math.exp(-ll_sum / nbytes) if nbytes else None,
            "bits_per_byte": -ll_sum / nbytes / math.log(2) if nbytes else None}


# ---------------------------------------------------------------- a shard's rows -> output columns and score totals


def row_problem(choices, ref=None, check_ref: bool = False) -> str | None:
    """Why a row's choices (and reference) cannot be scored, or None: an error row, never a failed shard."""
    if not isinstance(choices, list):
        return f"choices must be a list of strings, got {type(choices).__name__}" if choices is not None \
            else "choices are null"
    if not choices:
        return "choices are empty"
    if not all(isinstance(c, str) for c in choices):
        return "choices must be strings"
    return reference_index(ref, choices)[1] if check_ref else None


class Likelihoods:
    """The output of a scoring job's rows, from each row's pair log-likelihoods (None: an error row):
    - loglikelihood: `choice_logprobs`, `choice_tokens`, `choice_greedy`, `prediction`, `prediction_norm` and, with
      a reference, `score` (1.0 when the prediction is the reference); generated_text is the predicted choice;
    - labels: `label_probs`; generated_text is the likeliest label (which output.parse then reads as `parsed`);
    - loglikelihood_rolling: `loglikelihood` (the whole text's) and `loglikelihood_tokens`.
    totals() are the shard's sums for the manifest, from which the job's metrics come (summary.score_metrics)."""

    def __init__(self, mode: str, with_reference: bool = False):
        self.mode, self.with_reference = mode, with_reference

    def columns(self, lls, greedy, ntok, choices, references, counts) -> tuple[list[str | None], dict, dict]:
        import pyarrow as pa

        rows = range(len(lls))
        if self.mode == "loglikelihood_rolling":
            total = [sum(v) if v is not None else None for v in lls]
            ok = [i for i in rows if total[i] is not None]
            totals = {"sum": 0.0, "rows": len(lls), "scored": len(ok), "ll_sum": sum(total[i] for i in ok),
                      "words": sum(counts[i][0] for i in ok), "bytes": sum(counts[i][1] for i in ok)}
            return [None] * len(lls), {
                "loglikelihood": pa.array(total, pa.float64()),
                "loglikelihood_tokens": pa.array([sum(t) if t is not None else None for t in ntok], pa.int32())}, totals
        preds = [predictions(lls[i], choices[i]) if lls[i] is not None else None for i in rows]
        texts = [choices[i][p[0]] if p else None for i, p in zip(rows, preds)]
        if self.mode == "labels":
            return texts, {"label_probs": pa.array([label_probs(v) if v is not None else None for v in lls],
                                                   pa.list_(pa.float64()))}, {}
        golds = [reference_index(references[i], choices[i])[0] if self.with_reference and preds[i] else None
                 for i in rows]
        cols = {"choice_logprobs": pa.array(lls, pa.list_(pa.float64())),
                "choice_tokens": pa.array(ntok, pa.list_(pa.int32())),
                "choice_greedy": pa.array(greedy, pa.list_(pa.bool_())),
                "prediction": pa.array([p[0] if p else None for p in preds], pa.int32()),
                "prediction_norm": pa.array([p[1] if p else None for p in preds], pa.int32())}
        if not self.with_reference:
            return texts, cols, {}
        right = [None if p is None else [float(k == g) for k in p] for p, g in zip(preds, golds)]
        cols["score"] = pa.array([r[0] if r else None for r in right], pa.float64())
        scored = [r for r in right if r is not None]
        return texts, cols, {"sum": sum(r[0] for r in scored), "rows": len(lls), "scored": len(scored),
                             "norm_sum": sum(r[1] for r in scored), "bytes_sum": sum(r[2] for r in scored)}
