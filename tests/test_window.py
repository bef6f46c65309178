"""`engine.max_in_flight: auto`: the window follows the engine's KV cache and the job's request sizes (no Ray)."""

from __future__ import annotations

from batchrun.engines.base import MAX_WINDOW, MIN_WINDOW, Sampling, auto_window, choose_window


def test_auto_window_rule():
    small, why_small = auto_window(kv_cache_tokens=8_192, tokens_per_request=64)
    large, _ = auto_window(kv_cache_tokens=200_000, tokens_per_request=64)
    assert (small, large) == (256, MAX_WINDOW) and "8,192" in why_small and why_small.startswith("auto:")
    assert auto_window(2_000_000, 4_000)[0] == 1_000  # long requests: fewer of them fit
    assert auto_window(1_000, 512)[0] == MIN_WINDOW and "bounded" in auto_window(1_000, 512)[1]
    assert auto_window(None, 100, batch_limit=256) == (512, "auto: 2 x the engine's batch limit of 256")


def test_hf_engine_window_follows_its_kv_cache(demo_model):
    """A small KV cache gives a small window, a large one a large window: the real HF engine on the demo model."""
    from batchrun.engines.hf import HFEngine

    windows = {}
    for num_blocks in (8, 256):
        engine = HFEngine(str(demo_model), Sampling(max_tokens=8), dtype="float32", device="cpu", num_blocks=num_blocks)
        try:
            window, why = choose_window("auto", engine, tokens_per_request=48)
            assert engine.kv_cache_tokens and f"{engine.kv_cache_tokens:,}" in why
            assert window == max(MIN_WINDOW, min(MAX_WINDOW, int(2 * engine.kv_cache_tokens / 48)))
            windows[num_blocks] = window
        finally:
            engine.close()
    assert windows[8] < windows[256]
    assert choose_window(7, engine, 24) == (7, "engine.max_in_flight")  # the job's number wins
