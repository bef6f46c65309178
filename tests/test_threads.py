"""The worker's two engine threads at once (engines/base.py): the prefetch thread encodes and renders chats while the
main loop submits and decodes, on the real HF engine and the demo model's fast tokenizer. No error, and every
result the same as when one thread does it all."""

from __future__ import annotations

import threading
import time

from batchrun.engines.base import Request, RequestKey, Sampling


def test_encode_and_render_beside_poll_and_decode(demo_model):
    from batchrun.engines.hf import HFEngine

    engine = HFEngine(str(demo_model), Sampling(max_tokens=6), dtype="float32", device="cpu")
    texts = [f"{a}+{b}=" * (1 + a % 5) for a in range(10, 74) for b in (3,)]
    chats = [[{"role": "user", "content": t}] for t in texts[:8]]
    want_ids, want_chat = engine.encode(texts), engine.render_chat(chats)
    errors, rounds = [], [0]
    stop = threading.Event()

    def prefetch():  # what Worker._prefetch does for the next shard, over and over
        while not stop.is_set():
            try:
                assert engine.encode(texts) == want_ids and engine.render_chat(chats) == want_chat
                rounds[0] += 1
            except Exception as e:  # any error here is the failure this test looks for
                errors.append(repr(e))
                return

    thread = threading.Thread(target=prefetch)
    thread.start()
    try:
        results = {}
        deadline = time.time() + 120
        for r, ids in enumerate(want_ids):
            engine.submit(Request(RequestKey(0, r), texts[r], ids, Sampling(max_tokens=6)))
        while len(results) < len(texts) and time.time() < deadline:
            for c in engine.poll(0.05):
                assert c.request_id not in results and c.error is None
                results[c.request_id] = c
    finally:
        stop.set()
        thread.join()
        engine.close()
    assert not errors and rounds[0] > 3
    assert sorted(results) == [RequestKey(0, r) for r in range(len(texts))]
    for c in results.values():  # decoded on the main loop's own tokenizer: the text of the tokens
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
