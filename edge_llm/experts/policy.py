"""Which expert leaves a full bank for a miss (no MLX here: the CLI reads these names at start-up).

``lru``: the least recently used. ``lfu``: the least often used so far (ties: the least recently used), which
keeps a router's favourites. Measured on a 128-expert Qwen3-MoE-shaped model under a cap of a third of its size
(benchmarks/RESULTS.md, issue 15): LFU reads 8-12% fewer bytes than LRU at the same decode speed or better.
"""

POLICIES = ("lru", "lfu")
DEFAULT_POLICY = "lfu"
