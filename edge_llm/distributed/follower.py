"""What every rank but 0 does once its share is loaded: run each pass rank 0 commands, until told to stop.

It keeps the real caches of its layers, by rank 0's cache id, created on first use with the KV bits rank 0
chose, trimmed to the offset each command carries, and freed when rank 0 drops them.
"""

from __future__ import annotations

import mlx.core as mx

from ..models.cache import BatchRows
from .protocol import FORWARD, NO_CACHE, STOP, receive_command
from .sharded import DTYPES, Shard


class Follower:
    def __init__(self, shard: Shard):
        self.shard = shard
        self.caches: dict[int, list] = {}

    def run(self) -> None:
        group = self.shard.group.mlx
        while True:
            command = receive_command(group)
            if command.op == STOP:
                return
            if command.op != FORWARD:
                raise RuntimeError(f"unknown command {command.op} from rank 0")
            for cache_id in command.frees:
                self.caches.pop(cache_id, None)
            cache = self._caches(command.cache_ids, command.offsets, command.kv_bits)
            if self.shard.plan.mode == "experts":
                tokens = mx.array(command.tokens, dtype=mx.int32).reshape(command.batch, command.length)
                self.shard.hidden(tokens, cache)
            else:
                hidden = self.shard.model.args.hidden_size
                shape = (command.batch, command.length, hidden)
                self.shard.follow_pipeline(shape, DTYPES[command.dtype], cache)

    def _caches(self, ids: list[int], offsets: list[int], bits: list[int]) -> list | None:
        if not ids or ids[0] == NO_CACHE:
            return None
        rows = []
        for cache_id, offset, kv_bits in zip(ids, offsets, bits, strict=True):
            cache = self.caches.get(cache_id)
            if cache is None:
                cache = self.caches[cache_id] = self.shard.model.make_cache(kv_bits or None)
            for i in range(self.shard.start, self.shard.end):
                if cache[i].offset > offset:
                    cache[i].trim(cache[i].offset - offset)
            rows.append(cache)
        if len(rows) == 1:
            return rows[0]
        return [BatchRows([r[i] for r in rows]) for i in range(len(rows[0]))]
