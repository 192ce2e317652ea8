"""Rank 0's commands to the other ranks, broadcast with MLX's own collective (``all_sum``: the others add
zeros), so it works over any backend and any number of ranks. A command is a fixed header of int32 values,
then its payload (length in the header): the ids, offsets and KV bits of the caches a forward pass uses, the
cache ids rank 0 has dropped, and (expert mode, where every rank embeds) the token ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .watchdog import current_watchdog, peer_lost

FORWARD, STOP = 1, 2
_sent = [0]  # bytes this rank has sent to the others (an estimate for collectives: a ring all-sum's share)


def count_sent(nbytes: int, group=None) -> None:
    """Adds a point-to-point send of ``nbytes`` (``group`` given: an all-sum of that buffer, of which a ring
    sends 2 (n - 1) / n per rank)."""
    _sent[0] += nbytes if group is None else nbytes * 2 * (group.size() - 1) // group.size()


def bytes_sent() -> int:
    """Bytes this rank has sent to the other ranks so far (commands, activations, expert outputs)."""
    return _sent[0]

HEADER = 8  # op, batch, length, rows, frees, tokens sent, payload length, activation dtype
INLINE = 56  # payload values sent with the header (a decode step's), so most commands are one collective
NO_CACHE = -1


@dataclass
class Command:
    op: int
    batch: int = 0
    length: int = 0
    cache_ids: list[int] = field(default_factory=list)  # one per batch row; NO_CACHE: the call had no cache
    offsets: list[int] = field(default_factory=list)  # tokens each row's cache holds before this pass
    kv_bits: list[int] = field(default_factory=list)  # 0: float cache
    frees: list[int] = field(default_factory=list)  # caches rank 0 no longer holds
    tokens: list[int] = field(default_factory=list)  # [batch * length] when the followers embed too
    dtype: int = 0  # the activations' dtype (an index into sharded.DTYPES)

    def payload(self) -> list[int]:
        return [*self.cache_ids, *self.offsets, *self.kv_bits, *self.frees, *self.tokens]


def collective(fn, *args, **kwargs):
    """Runs an MLX collective (evaluated); a connection lost in it is handed to the watchdog."""
    try:
        out = fn(*args, **kwargs)
        mx.eval(out)
        return out
    except RuntimeError as e:
        if "[ring]" in str(e) or "connection" in str(e):
            peer_lost(e)
        raise


def _broadcast(values: np.ndarray, group, root: bool) -> np.ndarray:
    x = mx.array(values if root else np.zeros_like(values))
    count_sent(x.nbytes, group)
    return np.array(collective(mx.distributed.all_sum, x, group=group))


def send_command(command: Command, group) -> None:
    watchdog = current_watchdog()
    for rank in range(1, group.size()):
        watchdog.ring(rank)
    payload = command.payload()
    header = [command.op, command.batch, command.length, len(command.cache_ids), len(command.frees),
              len(command.tokens), len(payload), command.dtype]
    inline = payload if len(payload) <= INLINE else []
    _broadcast(np.array(header + inline + [0] * (INLINE - len(inline)), dtype=np.int32), group, True)
    if not inline and payload:
        _broadcast(np.array(payload, dtype=np.int32), group, True)


def receive_command(group) -> Command:
    current_watchdog().wait_bell(0)
    first = _broadcast(np.zeros(HEADER + INLINE, np.int32), group, False).tolist()
    op, batch, length, rows, frees, tokens, size, dtype = first[:HEADER]
    if size <= INLINE:
        payload = first[HEADER : HEADER + size]
    else:
        payload = _broadcast(np.zeros(size, np.int32), group, False).tolist()
    ids, offsets, bits = payload[:rows], payload[rows : 2 * rows], payload[2 * rows : 3 * rows]
    rest = payload[3 * rows :]
    return Command(op, batch, length, ids, offsets, bits, rest[:frees], rest[frees : frees + tokens], dtype)
