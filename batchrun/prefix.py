"""Prefix-aware scheduling of the worker's window (`engine.prefix_schedule: auto`).

Engines reuse the KV blocks of a prompt prefix they have already computed (transformers' continuous batching:
ContinuousBatchingConfig.allow_block_sharing; TensorRT-LLM: KvCacheConfig.enable_block_reuse), but only for a
request that reaches the engine after another with the same prefix has been prefilled. Rows that share a prefix and
arrive together are prefilled together, each computing the prefix again (measured: grouping rows by prefix gains
nothing). So the window sends one *leader* per prefix, holds its *siblings* back until the engine reports the
leader's prompt computed (or the leader finished, for engines that report only that), and fills the window
meanwhile with other work, looking ahead across the shards the worker holds. Once a prefix is warm, its rows go
straight through.

Only the order of submission changes: every request is submitted once, with its own sampling (per-row seeds), and
its completion goes back to its own row, so ids, rows and seeded outputs are the same whatever the order.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

from batchrun.engines.base import Request

# Rows whose first KEY_TOKENS prompt tokens agree count as sharing a prefix (a rubric, few-shot examples, a system
# prompt); shorter prompts are not held (their prefix is too short for reuse to pay for a wait).
KEY_TOKENS = 64
MAX_WARM = 1 << 16  # prefixes remembered as computed (least recently used go first)


def prefix_key(request: Request, key_tokens: int = KEY_TOKENS) -> Hashable | None:
    ids = request.prompt_token_ids
    if ids is None or len(ids) <= key_tokens:
        return None
    return hash(tuple(ids[:key_tokens]))


class PrefixScheduler:
    """The order the worker submits requests in. `enabled=False`: input order (what every request arrives in)."""

    def __init__(self, enabled: bool, key_tokens: int = KEY_TOKENS):
        self.enabled = enabled
        self.key_tokens = key_tokens
        self.ready: collections.deque[Request] = collections.deque()
        # prefix key -> siblings waiting for its leader: a key is here while its leader is in flight, not prefilled
        self.held: dict[Hashable, list[Request]] = {}
        self.leaders: dict[Hashable, Hashable] = {}  # leader request id -> its prefix key
        self.warm: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self.held_count = 0
        self.stats = collections.Counter()  # leaders, held (siblings that waited), direct (no wait)

    def __len__(self) -> int:
        """Requests not yet submitted (ready or held)."""
        return len(self.ready) + self.held_count

    def add(self, requests: list[Request]) -> None:
        if not self.enabled:
            self.ready.extend(requests)
            return
        for r in requests:
            key = prefix_key(r, self.key_tokens)
            if key is None or key in self.warm:
                if key is not None:
                    self.warm.move_to_end(key)
                self.stats["direct"] += 1
                self.ready.append(r)
            elif key in self.held:
                self.held[key].append(r)
                self.held_count += 1
                self.stats["held"] += 1
            else:
                self.held[key] = []
                self.leaders[r.request_id] = key
                self.stats["leaders"] += 1
                self.ready.append(r)

    def next(self) -> Request | None:
        """The next request to submit, or None while all that is left waits for a leader."""
        return self.ready.popleft() if self.ready else None

    def prefilled(self, request_id: Hashable) -> None:
        """The engine has computed this request's prompt (or finished it): its prefix is warm, its siblings go next,
        ahead of newer rows (they are older: their shard commits sooner)."""
        key = self.leaders.pop(request_id, None)
        if key is None:
            return
        self.warm[key] = None
        if len(self.warm) > MAX_WARM:
            self.warm.popitem(last=False)
        siblings = self.held.pop(key)
        self.held_count -= len(siblings)
        self.ready.extendleft(reversed(siblings))
