"""A shaping TCP relay: rehearse a run over a slow, lossy WAN on one machine.

``Relay`` listens on one address and forwards every connection it accepts to a target
address, delaying and rate-limiting each direction of each connection like a WAN link would::

    python -m fomoe.relay --listen 127.0.0.1:7001 --to 127.0.0.1:6001 --delay-ms 100 --rate-mbit 100 --loss 0.01

Put one relay in front of every worker's listener and let the worker advertise the relay's
address (``fomoe.tcp.TcpTransport(..., advertise="127.0.0.1:7001")``): every connection of
the mesh then crosses one shaped link. In a program (tests, experiments)::

    with Relay(("127.0.0.1", 6001), delay_ms=100, rate_mbit=100) as relay:
        ...   # connect to relay.address

What one direction of a connection models (a FIFO link, times in seconds):

- **serialisation**: a chunk of ``n`` bytes read at time ``t`` leaves the link at
  ``d = max(t, d_prev) + n / rate`` (a token bucket with no burst allowance: the link is busy
  ``n / rate`` per chunk; ``rate_mbit=None`` is unlimited).
- **propagation**: it is delivered at ``d + delay`` (one-way delay; a round trip is twice it).
- **loss**, as TCP experiences it: a TCP stream never loses bytes, a lost segment costs time.
  The stream is cut into segments of ``segment_bytes`` (1448, an Ethernet MSS); each is lost
  with probability ``loss``, and a lost segment holds the link for one extra round trip
  (``2 * delay``: the sender learns of the loss from duplicate acknowledgements and resends;
  everything behind it waits, since TCP delivers in order). ``loss_pattern="periodic"``
  (default) loses exactly every ``1/loss``-th segment, so a transfer's cost is reproducible;
  ``"random"`` draws each segment independently (seeded).

What it does not model: TCP's congestion window (slow start, the rate halving after a loss:
real TCP over a lossy long link is slower still, see the Mathis et al. bound
``rate <= MSS / RTT * 1.22 / sqrt(loss)``), the receive window (a real long fat link needs
buffers of at least rate x RTT), retransmission timeouts of tail losses, jitter and
reordering, and sharing of one link by several connections (each connection has its own).
The relay buffers at most ``buffer_bytes`` per direction; a sender beyond that waits, as it
would on a full network path.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import select
import socket
import sys
import threading
import time
from typing import Sequence

from . import _net
from ._net import parse_address

SEGMENT_BYTES = 1448            # Ethernet MSS with TCP timestamps
READ_BYTES = 1 << 18            # largest chunk read at once (the shaping granularity at high rates)
LOSS_PATTERNS = ("periodic", "random")


class Shaper:
    """The timing of one direction of one link (no sockets): when each chunk is delivered."""

    def __init__(self, delay_s: float = 0.0, rate_bps: float | None = None, loss: float = 0.0,
                 loss_pattern: str = "periodic", segment_bytes: int = SEGMENT_BYTES, seed: int = 0) -> None:
        if not delay_s >= 0 or math.isinf(delay_s):
            raise ValueError(f"delay must be finite and >= 0, got {delay_s!r} s")
        if rate_bps is not None and not (rate_bps > 0 and math.isfinite(rate_bps)):
            raise ValueError(f"rate must be positive (or None for unlimited), got {rate_bps!r} bit/s")
        if not 0 <= loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {loss!r}")
        if loss_pattern not in LOSS_PATTERNS:
            raise ValueError(f"loss_pattern must be one of {', '.join(LOSS_PATTERNS)}, got {loss_pattern!r}")
        if not isinstance(segment_bytes, int) or segment_bytes < 1:
            raise ValueError(f"segment_bytes must be a positive integer, got {segment_bytes!r}")
        self.delay_s, self.rate_bps, self.loss = float(delay_s), rate_bps, float(loss)
        self.loss_pattern, self.segment_bytes = loss_pattern, segment_bytes
        self._rng = random.Random(seed)
        self._credit = 0.5           # periodic loss: the first loss falls mid-way through 1/loss segments
        self._busy_until = 0.0
        self.bytes = 0               # bytes carried
        self.segments_lost = 0

    def _lost_segments(self, segments: int) -> int:
        if not self.loss or not segments:
            return 0
        if self.loss_pattern == "periodic":
            self._credit += segments * self.loss
            lost = int(self._credit)
            self._credit -= lost
            return lost
        return sum(self._rng.random() < self.loss for _ in range(segments))

    def deliver_at(self, arrival: float, nbytes: int) -> float:
        """Delivery time of ``nbytes`` that reached the link at ``arrival`` (call in stream order)."""
        # segments whose last byte is in this chunk
        segments = (self.bytes + nbytes) // self.segment_bytes - self.bytes // self.segment_bytes
        self.bytes += nbytes
        lost = self._lost_segments(segments)
        self.segments_lost += lost
        busy = nbytes * 8 / self.rate_bps if self.rate_bps else 0.0
        self._busy_until = max(arrival, self._busy_until) + busy + lost * 2 * self.delay_s
        return self._busy_until + self.delay_s


class _Pipe:
    """One direction of one relayed connection: a reader that timestamps chunks and a writer
    that releases each at its delivery time."""

    def __init__(self, relay: "Relay", src: socket.socket, dst: socket.socket, shaper: Shaper, name: str) -> None:
        self.relay, self.src, self.dst, self.shaper = relay, src, dst, shaper
        self.queue: collections.deque = collections.deque()   # (deliver_at, bytes or None = end of stream)
        self.queued = 0
        self.cond = threading.Condition()
        self.done = False
        self.error: str | None = None
        self.threads = [threading.Thread(target=self._read, daemon=True, name=f"fomoe-relay-read-{name}"),
                        threading.Thread(target=self._write, daemon=True, name=f"fomoe-relay-write-{name}")]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while not self.relay._stopping:
                if not select.select([self.src], [], [], 0.2)[0]:
                    continue
                data = self.src.recv(READ_BYTES)
                now = time.monotonic()
                with self.cond:
                    if not data:
                        self.queue.append((now + self.shaper.delay_s, None))   # the FIN travels too
                        self.cond.notify_all()
                        return
                    self.queue.append((self.shaper.deliver_at(now, len(data)), data))
                    self.queued += len(data)
                    self.cond.notify_all()
                    # a full path: the sender waits until the link drains
                    while self.queued > self.relay.buffer_bytes and not self.relay._stopping and not self.done:
                        self.cond.wait(0.2)
        except (OSError, ValueError) as exc:
            self._fail(f"reading: {exc}")

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.relay._stopping and not self.done:
                        self.cond.wait(0.2)
                    if self.relay._stopping or self.done:
                        return
                    at, data = self.queue[0]
                wait = at - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 0.2))
                    continue
                with self.cond:
                    self.queue.popleft()
                    self.queued -= len(data) if data is not None else 0
                    self.cond.notify_all()
                if data is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    with self.cond:
                        self.done = True
                    return
                self.dst.sendall(data)
        except (OSError, ValueError) as exc:
            self._fail(f"writing: {exc}")
        finally:
            self.relay._pipe_finished(self)

    def _fail(self, why: str) -> None:
        with self.cond:
            if self.error is None and not self.relay._stopping:
                self.error = why
            self.done = True
            self.cond.notify_all()
        # a broken connection breaks both directions, as it would on a real link
        self.relay._abort_connection(self)


class Relay:
    """Forward connections from ``listen`` to ``target`` over a shaped link (see the module doc).

    ``target``: (host, port) or "host:port" to forward to. ``listen``: address to listen on
    (port 0: any free port; ``address`` tells which). ``delay_ms``: one-way delay per direction.
    ``rate_mbit``: each direction's bandwidth in Mbit/s (None: unlimited). ``loss``: segment loss
    rate (``loss_pattern`` periodic or random, ``seed`` for random). ``buffer_bytes``: bytes held
    per direction before the sender is made to wait. Start with ``start()`` or ``with``; ``stop()``
    closes every connection and joins every thread.
    """

    def __init__(self, target, listen="127.0.0.1:0", *, delay_ms: float = 0.0, rate_mbit: float | None = None,
                 loss: float = 0.0, loss_pattern: str = "periodic", seed: int = 0,
                 segment_bytes: int = SEGMENT_BYTES, buffer_bytes: int = 64 << 20) -> None:
        self.target = parse_address(target) if isinstance(target, str) else (str(target[0]), int(target[1]))
        self.listen_at = parse_address(listen) if isinstance(listen, str) else (str(listen[0]), int(listen[1]))
        if not isinstance(buffer_bytes, int) or buffer_bytes < 1:
            raise ValueError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}")
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be positive (or None for unlimited), got {rate_mbit!r}")
        self.delay_ms, self.rate_mbit, self.loss = delay_ms, rate_mbit, loss
        self.buffer_bytes = buffer_bytes
        self._shaper_args = dict(delay_s=delay_ms / 1e3, rate_bps=None if rate_mbit is None else rate_mbit * 1e6,
                                 loss=loss, loss_pattern=loss_pattern, segment_bytes=segment_bytes)
        Shaper(**self._shaper_args)   # validate now, not on the first connection
        self._seed = seed
        self._stopping = False
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: list[tuple[socket.socket, socket.socket, list[_Pipe]]] = []
        self.connections = 0          # accepted so far
        self.errors: list[str] = []   # connections that failed (target unreachable, reset)
        self._closed_totals = [0, 0]  # bytes carried and segments lost by closed connections

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("the relay is stopped" if self._stopping else "the relay is not started")
        host, port = self._listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def start(self) -> "Relay":
        if self._listener is not None or self._stopping:
            raise RuntimeError("a relay starts once (it is running or was stopped)")
        host, port = self.listen_at
        sock = _net.listen(host, port, who="fomoe.relay")
        self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True, name="fomoe-relay-accept")
        self._accept_thread.start()
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                if not select.select([listener], [], [], 0.2)[0]:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                if self._stopping:
                    return
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10.0)
            except OSError as exc:
                self.errors.append(f"cannot reach {self.target[0]}:{self.target[1]}: {exc}")
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping:
                    client.close()
                    upstream.close()
                    return
                n = self.connections
                self.connections += 1
                pipes = [_Pipe(self, client, upstream, Shaper(**self._shaper_args, seed=self._seed + 2 * n), f"{n}-up"),
                         _Pipe(self, upstream, client, Shaper(**self._shaper_args, seed=self._seed + 2 * n + 1),
                               f"{n}-down")]
                self._connections.append((client, upstream, pipes))
            for p in pipes:
                p.start()

    def _entry(self, pipe: _Pipe):
        with self._lock:
            return next((c for c in self._connections if pipe in c[2]), None)

    def _pipe_finished(self, pipe: _Pipe) -> None:
        """Close a connection's sockets once both directions delivered their end of stream."""
        entry = self._entry(pipe)
        if entry is None or not all(p.done for p in entry[2]):
            return
        self._close_entry(entry)

    def _abort_connection(self, pipe: _Pipe) -> None:
        entry = self._entry(pipe)
        if entry is None:
            return
        for p in entry[2]:
            with p.cond:
                if p.error is None and p is not pipe and not self._stopping:
                    p.error = "the other direction failed"
                p.done = True
                p.cond.notify_all()
        self._close_entry(entry)

    def _close_entry(self, entry) -> None:
        with self._lock:
            if entry not in self._connections:
                return
            self._connections.remove(entry)
        for p in entry[2]:
            if p.error:
                self.errors.append(p.error)
            self._closed_totals[0] += p.shaper.bytes
            self._closed_totals[1] += p.shaper.segments_lost
        for s in entry[:2]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def totals(self) -> dict:
        """Bytes carried and segments lost over every connection so far (both directions)."""
        with self._lock:
            pipes = [p for _, _, ps in self._connections for p in ps]
            return {"bytes": self._closed_totals[0] + sum(p.shaper.bytes for p in pipes),
                    "segments_lost": self._closed_totals[1] + sum(p.shaper.segments_lost for p in pipes)}

    def stop(self) -> None:
        """Close the listener and every connection; join every thread."""
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join()
        self._listener = None
        with self._lock:
            entries = list(self._connections)
        threads = []
        for entry in entries:
            for p in entry[2]:
                with p.cond:
                    p.cond.notify_all()
                threads += p.threads
            for s in entry[:2]:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join()
        for entry in entries:
            for s in entry[:2]:
                s.close()
        with self._lock:
            self._connections.clear()

    def __enter__(self) -> "Relay":
        return self if self._listener is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- command line ---------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fomoe.relay", description=__doc__.split("\n\n")[0],
                                epilog="Every direction of every connection gets its own delay, rate and loss.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any)")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="address to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction (default 0)")
    p.add_argument("--rate-mbit", type=float, default=None, help="bandwidth per direction in Mbit/s (default: "
                                                                  "unlimited)")
    p.add_argument("--loss", type=float, default=0.0, help="TCP segment loss rate, e.g. 0.01 (default 0)")
    p.add_argument("--loss-pattern", choices=LOSS_PATTERNS, default="periodic",
                   help="periodic: every 1/loss-th segment (reproducible); random: independent draws")
    p.add_argument("--seed", type=int, default=0, help="seed of random loss")
    args = p.parse_args(argv)
    try:
        relay = Relay(args.to, args.listen, delay_ms=args.delay_ms, rate_mbit=args.rate_mbit, loss=args.loss,
                      loss_pattern=args.loss_pattern, seed=args.seed)
        relay.start()
    except (ValueError, OSError) as exc:
        print(f"fomoe.relay: error: {exc}", file=sys.stderr)
        return 2
    rate = "unlimited" if args.rate_mbit is None else f"{args.rate_mbit:g} Mbit/s"
    print(f"fomoe.relay: {relay.address} -> {args.to}: {args.delay_ms:g} ms one way, {rate}, "
          f"{args.loss:g} segment loss ({args.loss_pattern}); Ctrl-C stops", flush=True)
    try:
        # Short sleeps: the kernel may hand Ctrl-C's signal to a relay thread, and then only the
        # main thread's next wake-up raises KeyboardInterrupt (a long sleep would hide it).
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
