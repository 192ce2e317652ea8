"""Faults: a rank that never joins, dies or hangs stops every rank within seconds, with one line naming it.

MLX's ring backend has no timeouts: ``init`` waits forever for a missing peer (holding the GIL) and a ``recv``
from a peer that hangs never returns; a peer that dies shows up as a ``RuntimeError`` plus a burst of
``[ring] Socket ... closed`` lines on stderr. So the ranks keep a side channel of their own, a TCP star around
rank 0 on ``Launch.side_port``: they meet there before ``init`` (with a deadline), and a thread on each rank
then beats every half second and watches the others. A closed connection (a dead process: the kernel closes
its sockets) or ``peer_timeout`` seconds of silence (a hung or unreachable one) ends this process with one
line on stderr and exit 1; rank 0 first tells the others who failed, so they end quietly and the launcher's
output holds that one line. A rank leaving normally says so first (``b"q"``), so its peers do not count it as
a fault. MLX's own ``[ring]`` lines are filtered out of stderr.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

from .launch import DistributedError, Launch

BEAT, LEAVING, FAULT, BELL = b"h", b"q", b"f", b"c"
BEAT_EVERY = 0.5
RING_NOISE = b"[ring]"

_watchdog: Watchdog | None = None


def say(line: str) -> None:
    """One line straight to the process's real stderr (past the filter, which may not get to flush)."""
    os.write(_stderr_fd(), (line.rstrip("\n") + "\n").encode(errors="replace"))


_saved_stderr: int | None = None


def _stderr_fd() -> int:
    return _saved_stderr if _saved_stderr is not None else 2


class Watchdog:
    def __init__(self, launch: Launch, peers: dict[int, socket.socket], peer_timeout: float):
        self.launch, self.peers, self.peer_timeout = launch, peers, peer_timeout
        self.last = {r: time.monotonic() for r in peers}
        self.leaving: set[int] = set()
        self.bells = {r: threading.Semaphore(0) for r in peers}
        self.closing = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="edge-llm-watchdog", daemon=True)

    def _send(self, rank: int, message: bytes) -> None:
        try:
            self.peers[rank].sendall(message)
        except OSError:
            pass  # the reader sees the closed connection

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as e:  # a watchdog that stopped would leave the ranks unguarded: say so once
            say(f"warning: the distributed watchdog stopped ({type(e).__name__}: {e}); a failed rank may go unnoticed")

    def _watch(self) -> None:
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                with self.lock:
                    for r in list(self.peers):
                        self._send(r, BEAT)
                next_beat = now + BEAT_EVERY
            ready, _, _ = select.select(list(self.peers.values()), [], [], BEAT_EVERY)
            for sock in ready:
                rank = next(r for r, s in self.peers.items() if s is sock)
                try:
                    data = sock.recv(64)
                except OSError:
                    data = b""
                if not data:
                    self._gone(rank, "its connection closed")
                    continue
                self.last[rank] = time.monotonic()
                for _ in range(data.count(BELL)):
                    self.bells[rank].release()
                if LEAVING in data:
                    self.leaving.add(rank)
                if FAULT in data:
                    at = data.index(FAULT)
                    self._relayed(data[at + 1 : at + 2])
            now = time.monotonic()
            for rank, seen in self.last.items():
                if rank in self.peers and rank not in self.leaving and now - seen > self.peer_timeout:
                    self._gone(rank, f"sent nothing for {self.peer_timeout:.0f} s (hung or unreachable)")

    def _gone(self, rank: int, why: str) -> None:
        sock = self.peers.pop(rank)
        sock.close()
        if rank in self.leaving or self.closing:
            if rank == 0 and self.launch.rank != 0:
                # rank 0 left: the command to stop is on its way; a follower still waiting after a grace ends
                threading.Timer(5.0, lambda: os._exit(0)).start()
            return
        self.fault(rank, why)

    def fault(self, rank: int, why: str) -> None:
        """Names the failed rank, tells the others (from rank 0), and ends this process."""
        me = self.launch.rank
        say(f"error: {self.launch.where(rank)} stopped: {why}; ending {self.launch.where(me)} "
            "(restart all ranks with mlx.launch)")
        if me == 0:
            with self.lock:
                for r in list(self.peers):
                    self._send(r, FAULT + bytes([rank % 256]))
        os._exit(1)

    def abort(self, what: str) -> None:
        """This rank failed inside a pass, where the others wait for its part: ends every rank."""
        self.fault(self.launch.rank, what)

    def _relayed(self, failed: bytes) -> None:
        os._exit(1)  # rank 0 has said which rank failed; one line is enough

    def check_now(self, wait: float) -> None:
        """Ends this process with the fault line if a peer's connection is closed within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while self.peers and time.monotonic() < deadline:
            ready, _, _ = select.select(list(self.peers.values()), [], [], 0.05)
            for sock in ready:
                rank = next((r for r, s in self.peers.items() if s is sock), None)
                try:
                    data = sock.recv(4096)  # beats are read past; a closed connection reads empty
                except OSError:
                    data = b""
                if rank is not None and not data and rank not in self.leaving and not self.closing:
                    self.fault(rank, "its connection closed")

    bells_on = os.environ.get("EDGE_LLM_DIST_BELLS", "1") != "0"  # 0: wait inside MLX's ring (it polls)

    def ring(self, rank: int) -> None:
        """Tells ``rank`` that a collective or a send for it follows: it waits here, asleep, instead of inside
        MLX's ring, which polls (~40% of a core while it waits: a follower idle between chat turns, or a rank
        waiting for the other's half of a pass, would take that from the ranks computing on a shared host)."""
        if self.bells_on:
            with self.lock:
                self._send(rank, BELL)

    def wait_bell(self, rank: int) -> None:
        """Sleeps until ``rank`` rings (a peer that dies meanwhile ends this process from the watchdog thread)."""
        if self.bells_on:
            self.bells[rank].acquire()

    def leave(self) -> None:
        """An orderly exit: the peers will not count this process's closing connection as a fault."""
        self.closing = True
        with self.lock:
            for r in list(self.peers):
                self._send(r, LEAVING)


def _meet_as_root(launch: Launch, deadline: float) -> dict[int, socket.socket]:
    server = socket.create_server(("", launch.side_port), reuse_port=False)
    server.settimeout(0.5)
    peers: dict[int, socket.socket] = {}
    try:
        while len(peers) < launch.size - 1:
            if time.monotonic() > deadline:
                missing = [r for r in range(1, launch.size) if r not in peers]
                raise DistributedError(f"{launch.where(missing[0])} did not join within the "
                                       f"{JOIN_SECONDS[0]:.0f} s allowed (EDGE_LLM_JOIN_TIMEOUT); start every rank "
                                       "with the same mlx.launch command")
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(5.0)
            try:
                (rank,) = struct.unpack("!i", _recv_exactly(conn, 4))
            except (OSError, ValueError):
                conn.close()
                continue
            conn.settimeout(None)
            peers[rank] = conn
    finally:
        server.close()
    for conn in peers.values():
        conn.sendall(b"k")
    return peers


def _meet_as_follower(launch: Launch, deadline: float) -> dict[int, socket.socket]:
    address = (launch.hosts[0], launch.side_port)
    while True:
        try:
            conn = socket.create_connection(address, timeout=2.0)
            conn.sendall(struct.pack("!i", launch.rank))
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            if _recv_exactly(conn, 1) == b"k":
                conn.settimeout(None)
                return {0: conn}
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise DistributedError(f"{launch.where(launch.rank)} could not meet {launch.where(0)} on port "
                                   f"{launch.side_port} within {JOIN_SECONDS[0]:.0f} s (EDGE_LLM_JOIN_TIMEOUT); "
                                   "is rank 0 running, and the port open?")
        time.sleep(0.2)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return data


JOIN_SECONDS = [60.0]


def start_watchdog(launch: Launch, join_timeout: float, peer_timeout: float) -> Watchdog:
    """Meets the other ranks (DistributedError naming who is missing after ``join_timeout``), then watches them."""
    global _watchdog
    JOIN_SECONDS[0] = join_timeout
    deadline = time.monotonic() + join_timeout
    peers = (_meet_as_root if launch.rank == 0 else _meet_as_follower)(launch, deadline)
    for sock in peers.values():  # a bell is one byte that must go at once (Nagle would hold it ~40 ms)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _watchdog = Watchdog(launch, peers, peer_timeout)
    _watchdog.thread.start()
    _filter_ring_noise()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    if launch.rank == 0:  # rank 0 says its own errors; the others leave in order only when told to stop
        atexit.register(_watchdog.leave)
    return _watchdog


def _terminated(signum: int, _frame: object) -> None:
    """``mlx.launch`` ends the other ranks with SIGTERM as soon as one exits with an error, which can beat the
    watchdog to it: the fault line is said first if a peer is gone. Otherwise SIGTERM stops the command as
    Ctrl-C does (rank 0 then tells the others to stop)."""
    if _watchdog is not None:
        _watchdog.check_now(1.0)
    raise KeyboardInterrupt


def current_watchdog() -> Watchdog:
    assert _watchdog is not None
    return _watchdog


def peer_lost(error: BaseException) -> None:
    """Called where MLX raised for a lost connection: the watchdog names the rank (and ends this process) within
    moments; if it cannot, this says what MLX said and ends it."""
    time.sleep(3.0)
    say(f"error: the connection to another rank was lost ({' '.join(str(error).split())[:200]}); "
        "restart all ranks with mlx.launch")
    os._exit(1)


def _filter_ring_noise() -> None:
    """Routes fd 2 through a pipe that drops MLX's ``[ring]`` lines; at exit the pipe is drained first."""
    global _saved_stderr
    if _saved_stderr is not None:
        return
    sys.stderr.flush()
    _saved_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not line.startswith(RING_NOISE))
            if kept:
                os.write(_saved_stderr, kept)
        if pending and not pending.startswith(RING_NOISE):
            os.write(_saved_stderr, pending)

    thread = threading.Thread(target=pump, name="edge-llm-stderr", daemon=True)
    thread.start()

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(_saved_stderr, 2)  # the pipe's last writer goes: the pump reads to its end
        thread.join(timeout=2.0)

    atexit.register(drain)
