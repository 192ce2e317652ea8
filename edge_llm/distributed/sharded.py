"""The model rank 0 drives: to the generation code, the chat and the server it is an ordinary model
(``model(tokens, cache) -> logits``, ``make_cache``), while each call is a pass over all the ranks.

Each call first broadcasts a command (``protocol``) so the other ranks (``follower``) run the same pass on
their part: the cache ids and offsets of its rows, and in expert mode the tokens. Rank 0 keeps the caches of
the layers it holds; for the layers other ranks hold it keeps ``ShadowCache`` stand-ins that only count
tokens, so trimming (the chat's prefix reuse, the server's prompt cache) stays a local operation: the other
ranks trim their real caches to the offset the next command carries. A cache rank 0 drops is freed on the
others with the next command.
"""

from __future__ import annotations

import itertools
import weakref

import mlx.core as mx
import mlx.nn as nn

from ..models.base import CausalLM
from ..models.cache import BatchRows, LayerCache
from ..models.layers import output_projection
from .group import Group
from .plan import ShardPlan
from .protocol import FORWARD, NO_CACHE, STOP, Command, collective, count_sent, send_command
from .watchdog import current_watchdog

DTYPES = (mx.float32, mx.bfloat16, mx.float16)


class ShadowCache(LayerCache):
    """Rank 0's stand-in for the cache of a layer another rank holds: how many tokens it holds (no rows, so its
    state is empty and it holds no bytes)."""

    def __init__(self, bits: int | None) -> None:
        super().__init__([])
        self.bits = bits


def row_caches(layer_cache) -> list:
    return layer_cache.rows if isinstance(layer_cache, BatchRows) else [layer_cache]


class Shard:
    """What one rank runs of a pass: its layers (pipeline) or the whole stack with its experts (experts)."""

    def __init__(self, model: CausalLM, plan: ShardPlan, group: Group):
        self.model, self.plan, self.group = model, plan, group
        self.rank, self.size = group.rank, group.size
        self.start, self.end = plan.layer_ranges[self.rank]

    def run_layers(self, h: mx.array, cache: list | None) -> mx.array:
        layers = self.model.model.layers
        for i in range(self.start, self.end):
            h = layers[i](h, cache[i] if cache is not None else None)
        return h

    def follow_pipeline(self, shape: tuple[int, ...], dtype: mx.Dtype, cache: list | None) -> None:
        """A follower's part of a pipeline pass: receive, run its layers, hand on (the last rank back to 0)."""
        g, watchdog, after = self.group.mlx, current_watchdog(), (self.rank + 1) % self.size
        if self.rank == 1:
            watchdog.wait_bell(0)
        h = collective(lambda: self.run_layers(mx.distributed.recv(shape, dtype, self.rank - 1, group=g), cache))
        count_sent(h.nbytes)
        if after == 0:
            watchdog.ring(0)
        collective(mx.distributed.send, h, after, group=g)

    def hidden(self, tokens: mx.array, cache: list | None) -> mx.array:
        """The final hidden states (normed), evaluated; on rank 0 after the whole ring in pipeline mode."""
        if self.plan.mode == "experts":
            return collective(lambda: self.model.model(tokens, cache))
        g, watchdog = self.group.mlx, current_watchdog()
        h = collective(lambda: self.run_layers(self.model.model.embed_tokens(tokens), cache))
        count_sent(h.nbytes)
        watchdog.ring(1)
        collective(mx.distributed.send, h, 1, group=g)
        watchdog.wait_bell(self.size - 1)
        h = collective(mx.distributed.recv_like, h, self.size - 1, group=g)
        return self.model.model.norm(h)


class ShardedLM:
    """Rank 0's model: the CausalLM interface over a sharded pass (other attributes are the local model's)."""

    def __init__(self, shard: Shard):
        self._shard = shard
        self._ids = itertools.count()
        self._freed: list[int] = []
        self._closed = False
        self._dtype: mx.Dtype | None = None

    def __getattr__(self, name: str):
        return getattr(self._shard.model, name)

    @property
    def plan(self) -> ShardPlan:
        return self._shard.plan

    def make_cache(self, kv_bits: int | None = None) -> list:
        shard, cache_id = self._shard, next(self._ids)
        caches = shard.model.make_cache(kv_bits)
        if shard.plan.mode == "pipeline":
            caches = [c if shard.start <= i < shard.end else ShadowCache(kv_bits) for i, c in enumerate(caches)]
        for c in caches:
            c.dist_id = cache_id
        weakref.finalize(caches[0], self._freed.append, cache_id)
        return caches

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        shard = self._shard
        batch, length = tokens.shape
        if cache is None:
            ids, offsets, bits = [NO_CACHE] * batch, [0] * batch, [0] * batch
        else:
            rows = row_caches(cache[0])
            ids, offsets, bits = [c.dist_id for c in rows], [c.offset for c in rows], [c.bits or 0 for c in rows]
        freed, self._freed[:] = list(self._freed), []
        experts = shard.plan.mode == "experts"
        dtype = self._activation_dtype()
        send_command(Command(FORWARD, batch, length, ids, offsets, bits, freed,
                             mx.array(tokens).flatten().tolist() if experts else [], DTYPES.index(dtype)),
                     shard.group.mlx)
        try:
            h = shard.hidden(tokens, cache)
        except Exception as e:  # the other ranks are inside this pass: no later command could reach them
            current_watchdog().abort(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            raise
        if cache is not None and not experts:
            for i, layer_cache in enumerate(cache):
                if not shard.start <= i < shard.end:
                    for c in row_caches(layer_cache):
                        c.offset += length
        m = shard.model
        return output_projection(m.model.embed_tokens if m.tied_embeddings else m.lm_head, h)

    def _activation_dtype(self) -> mx.Dtype:
        if self._dtype is None:  # what the embedding gives (lazy: nothing is computed)
            self._dtype = self._shard.model.model.embed_tokens(mx.array([[0]])).dtype
        return self._dtype

    def close(self) -> None:
        """Tells the other ranks to stop (once; at exit)."""
        if not self._closed:
            self._closed = True
            send_command(Command(STOP), self._shard.group.mlx)


def strip_outer(model: nn.Module) -> None:
    """A follower in a pipeline holds no embedding, final norm or output projection."""
    for parent, name in ((model.model, "embed_tokens"), (model.model, "norm"), (model, "lm_head")):
        if name in parent:
            parent.pop(name)
