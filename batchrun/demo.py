"""The embedded default model and data: a tiny Llama trained on two-digit arithmetic.

Everything here runs offline on a CPU in about a minute, so `make demo` and the tests never touch a model hub.
The task has checkable answers ("47+38=" -> "85"), so the demo shows right answers rather than noise.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

CHARS = list("0123456789+-*=?:;,.!'\"()[]{}<>/ \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_#")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
# The chat template keeps only the user turns' text and asks for an answer with "=": the model knows one task.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}={% endif %}"
)
MODEL_VERSION = 1  # bump when the recipe changes, so cached demo models are rebuilt


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def arithmetic_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        if rng.random() < 0.5:
            out.append((f"{a}+{b}=", str(a + b)))
        else:
            a, b = max(a, b), min(a, b)
            out.append((f"{a}-{b}=", str(a - b)))
    return out


def build_model(path: str | Path, steps: int = 2500, seed: int = 0, quiet: bool = False) -> Path:
    """Train the demo model and save it in HF format under `path` (skipped when a current one is there)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    stamp = path / "batchrun_demo.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == MODEL_VERSION:
        return path
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    model = LlamaForCausalLM(_config(tok))
    t0 = time.time()
    _train(model, tok, rng, steps, quiet)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    acc = accuracy(model, tok, arithmetic_examples(random.Random(seed + 1), 200))
    stamp.write_text(json.dumps({"version": MODEL_VERSION, "steps": steps, "accuracy": acc}))
    if not quiet:
        print(f"demo model: saved to {path} (held-out accuracy {acc:.1%}, {time.time() - t0:.0f}s)")
    return path


def _config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=True)


def _train(model, tok, rng: random.Random, steps: int, quiet: bool) -> None:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for step in range(steps):
        batch = arithmetic_examples(rng, 128)
        ids, labels = _encode_batch(tok, batch)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if not quiet and step % 250 == 0:
            print(f"demo model: step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)


def _encode_batch(tok, batch):
    import torch

    # Loss only on the answer and its EOS: the prompt is given, the model learns to answer it.
    seqs, masks = [], []
    for prompt, answer in batch:
        p = tok.encode(prompt, add_special_tokens=False)
        a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.where(torch.tensor(m) == 1, torch.tensor(s), torch.tensor(-100))
    return ids, labels


def accuracy(model, tok, examples) -> float:
    import torch

    right = 0
    with torch.no_grad():
        for prompt, answer in examples:
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            right += tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == answer
    return right / len(examples)


def write_prompts(path: str | Path, n: int = 256, seed: int = 7) -> Path:
    """Write the demo input: arithmetic prompts with their reference answers, as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = arithmetic_examples(random.Random(seed), n)
    table = pa.table(
        {
            "id": pa.array([f"q{i:05d}" for i in range(n)]),
            "prompt": pa.array([p for p, _ in rows]),
            "answer": pa.array([a for _, a in rows]),
        }
    )
    pq.write_table(table, path, row_group_size=64)
    return path


def write_choices(path: str | Path, n: int = 128, seed: int = 13) -> Path:
    """The input of jobs/multiple-choice.yaml: each arithmetic prompt with four candidate answers (the right one and
    three near misses, shuffled) and the right one's index: a multiple-choice eval scored by log-likelihood."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng, rows = random.Random(seed), []
    for prompt, answer in arithmetic_examples(random.Random(seed), n):
        wrong = rng.sample([d for d in range(-11, 12) if d and int(answer) + d >= 0], 3)
        choices = [answer] + [str(int(answer) + d) for d in wrong]
        rng.shuffle(choices)
        rows.append((prompt, choices, choices.index(answer)))
    pq.write_table(pa.table({"id": [f"c{i:05d}" for i in range(n)], "prompt": [p for p, _, _ in rows],
                             "choices": pa.array([c for _, c, _ in rows], pa.list_(pa.string())),
                             "answer": [a for _, _, a in rows]}), path)
    return path


RUBRICS = ("strict", "lenient", "digits", "review")


def write_rubric_items(path: str | Path, n: int = 256, seed: int = 5) -> Path:
    """The input of jobs/label-rubric.yaml: short arithmetic items, each graded under one of four rubrics (the long
    shared instructions live in the job's template), rubrics interleaved row by row as real labelling queues are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = arithmetic_examples(random.Random(seed), n)
    pq.write_table(pa.table({"id": [f"r{i:05d}" for i in range(n)], "rubric": [RUBRICS[i % 4] for i in range(n)],
                             "item": [p for p, _ in rows], "answer": [a for _, a in rows]}), path)
    return path


def write_openai_batch(path: str | Path, n: int = 64, seed: int = 11) -> Path:
    """The demo's OpenAI Batch API input: half chat requests (the chat template adds the "="), half completions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, _) in enumerate(arithmetic_examples(random.Random(seed), n)):
        if i % 2 == 0:
            body = {"model": "batchrun-demo", "messages": [{"role": "user", "content": prompt[:-1]}], "max_tokens": 4}
            url = "/v1/chat/completions"
        else:
            body = {"model": "batchrun-demo", "prompt": prompt, "max_tokens": 4}
            url = "/v1/completions"
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the embedded demo model and its prompts.")
    ap.add_argument("--model", default="build/demo-model")
    ap.add_argument("--data", default="build/demo-data/prompts.parquet")
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args(argv)
    build_model(args.model)
    write_prompts(args.data, args.rows)
    write_openai_batch(Path(args.data).with_name("requests.jsonl"))
    write_rubric_items(Path(args.data).with_name("rubric.parquet"))
    write_choices(Path(args.data).with_name("choices.parquet"))
    print(f"demo data: {args.data}, {Path(args.data).with_name('requests.jsonl')}, "
          f"{Path(args.data).with_name('rubric.parquet')}, {Path(args.data).with_name('choices.parquet')}")


if __name__ == "__main__":
    main()
