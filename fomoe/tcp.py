"""An authenticated, fault-tolerant TCP transport for training across sites.

``TcpTransport`` executes the same ring schedules as the other transports (``fomoe.comm``:
``ring_plan`` / ``allgather_plan``, run by ``Transport._ring_allreduce``) over its own mesh of
TCP connections, one per pair of workers, and adds what a run over ordinary internet links
needs and torch.distributed's backends do not offer:

- **Peers are authenticated.** Every connection starts with a challenge-response handshake:
  each side sends a fresh random nonce and proves knowledge of the run's secret with an HMAC
  over both nonces, both ranks and the run's size. The secret is derived (PBKDF2) from a token
  the user gives every worker (``token=`` or the environment variable ``FOMOE_RUN_TOKEN``). A
  connection that fails the proof is refused and logged; nothing else is read from it. The
  transport does **not encrypt**: traffic between sites must run inside a VPN or TLS tunnel
  (WireGuard, an SSH or stunnel tunnel); bind the listener to that tunnel's interface address
  (``bind=``), never to a public interface. Connections a worker dials leave from its bound
  address too (unless it is a wildcard).
- **A lost worker is detected, not waited for.** A worker killed outright closes its
  connections (seen at once); one that freezes or whose machine or link dies goes silent, and
  every worker sends a heartbeat on idle connections, so silence longer than
  ``peer_timeout_s`` marks the peer lost. A transfer of B bytes that makes progress must
  finish within ``peer_timeout_s + B / min_bandwidth``: deadlines follow the bytes and the
  slowest link the run accepts, no per-model tuning.
- **Survivors agree on who is left.** A collective interrupted by a loss raises
  ``comm.PeerLost``; ``recover()`` then runs a membership agreement (every survivor gossips
  the set of lost workers it knows of, with what it saw of each loss and when, until all
  survivors hold the same set) and returns the live ranks, identical on every survivor. A worker the others declared lost learns it
  (``comm.Excluded``); a side with less than half of the workers stops (``comm.QuorumLost``),
  so a network partition cannot split one run into two. A restarted worker can join again
  (``join=True``): the survivors admit it at their next collective.
- **Exact byte counts.** Payload bytes equal what the sync schedule predicts; the 24-byte frame
  headers, heartbeats and control messages are counted separately (``overhead_sent`` /
  ``overhead_recv``).

Rendezvous: an explicit list of every worker's ``host:port`` (``peers=``; rank i listens on
``peers[i]``), or a torch.distributed store (``store=``, the default process group's store
when torch.distributed is initialised): every worker publishes the address it listens on.
Once the mesh exists the store is no longer used, so losing the process that hosts it does
not stop the run. The transport also becomes the run's control plane (``comm.gather_live``,
used by configuration agreement and checkpoints).

Wire format of a frame: magic ``FM``, kind (data, heartbeat, control, bye), flags, the
membership view it belongs to (32 bits), a per-connection sequence number (64 bits) and the
payload length (64 bits), big-endian, then the payload. Data frames of an interrupted
collective are recognised by their view and discarded after recovery.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import _net, comm
from ._net import parse_address

PROTOCOL = "fomoe-tcp/1"
TOKEN_ENV = "FOMOE_RUN_TOKEN"
HEADER = struct.Struct("!2sBBIQQ")
MAGIC = b"FM"
DATA, HEARTBEAT, CONTROL, BYE = 1, 2, 3, 4
MAX_HANDSHAKE_LINE = 1 << 16
MAX_CONTROL = 1 << 26


class HandshakeError(ConnectionError):
    """A connection that could not be established as an authenticated link of this run."""


@dataclass(frozen=True)
class TcpOptions:
    """Timeouts and limits.

    peer_timeout_s: silence (no data, no heartbeat) after which a peer counts as lost; also
    the fixed part of every transfer's deadline. min_bandwidth_mbps: the slowest link (Mbit/s)
    the run accepts; a transfer of B bytes gets ``peer_timeout_s + B / min_bandwidth`` once it
    started. connect_timeout_s: forming the mesh (workers may start minutes apart).
    stall_timeout_s: the longest a collective waits for a live peer that sends heartbeats but
    no data (a peer stuck in a much longer compute phase); past it the peer counts as lost.
    """

    peer_timeout_s: float = 30.0
    min_bandwidth_mbps: float = 10.0
    connect_timeout_s: float = 300.0
    stall_timeout_s: float = 3600.0
    handshake_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("peer_timeout_s", "min_bandwidth_mbps", "connect_timeout_s", "stall_timeout_s",
                     "handshake_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def heartbeat_s(self) -> float:
        return self.peer_timeout_s / 5

    def transfer_deadline_s(self, nbytes: int) -> float:
        return self.peer_timeout_s + nbytes * 8 / (self.min_bandwidth_mbps * 1e6)


def run_key(token: str | bytes) -> bytes:
    """The run's secret, derived from the user's token (stretched: captured handshakes do not
    make a guessable token cheap to brute-force)."""
    if isinstance(token, str):
        token = token.encode()
    if not token:
        raise ValueError("the run token is empty")
    return hashlib.pbkdf2_hmac("sha256", token, b"fomoe-run-token/v1", 100_000)


def _token_from(token: str | bytes | None) -> str | bytes:
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"the TCP transport needs the run's shared token: pass token=... or set {TOKEN_ENV} on "
                         f"every worker (e.g. to the output of: python -c 'import secrets; "
                         f"print(secrets.token_hex(32))')")
    return token


def _log(msg: str) -> None:
    print(f"fomoe.tcp: {msg}", file=sys.stderr, flush=True)


# ---- handshake ----------------------------------------------------------------------------------

def _send_line(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def _recv_line(sock: socket.socket, buf: bytearray) -> dict:
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise HandshakeError("the peer closed the connection during the handshake")
        buf += chunk
        if len(buf) > MAX_HANDSHAKE_LINE:
            raise HandshakeError("handshake message too long")
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HandshakeError(f"not a fomoe handshake ({exc})") from None
    if not isinstance(obj, dict):
        raise HandshakeError("not a fomoe handshake")
    return obj


def _proof(key: bytes, role: bytes, hello_c: dict, hello_a: dict) -> str:
    fields = [PROTOCOL, hello_c["nonce"], hello_a["nonce"], hello_c["rank"], hello_a["rank"], hello_c["inc"],
              hello_a["inc"], hello_c["world"]]
    return hmac.new(key, role + json.dumps(fields).encode(), hashlib.sha256).hexdigest()


# ---- the transport ------------------------------------------------------------------------------

class _Peer:
    """One authenticated connection and what its reader thread has received."""

    def __init__(self, rank: int, incarnation: int, sock: socket.socket, address: str) -> None:
        self.rank, self.incarnation, self.sock, self.address = rank, incarnation, sock, address
        self.send_lock = threading.Lock()
        self.frames: collections.deque = collections.deque()   # (view, seq, payload) of data frames
        self.receiving: tuple[float, int] | None = None        # (start, length) of a payload being read
        self.last_heard = self.last_sent = time.monotonic()
        self.failure: str | None = None
        self.failed_at: float | None = None                    # wall clock of the detection
        self.left = False
        self.sent_seq = self.recv_seq = 0


class TcpTransport(comm.Transport):
    """Ring collectives over an authenticated mesh of TCP connections (CPU tensors).

    ``rank``/``world_size`` as in torch.distributed. ``peers``: every worker's ``host:port``
    (rank i listens on ``peers[i]``); or ``store``: a torch.distributed store for the
    rendezvous (default: the default process group's store). ``bind``: the local address to
    listen on (default: the host of ``peers[rank]``, else 127.0.0.1; use the VPN interface's
    address between sites). ``advertise``: what the others dial when rendezvousing through a
    store, ``host`` or ``host:port`` (a port forward, NAT or relay in front of this worker;
    bracket IPv6 hosts); default: ``bind`` unless it is a wildcard, else this host's name.
    ``join=True``: this worker restarts into a running run.
    """

    name = "tcp"
    device_type = "cpu"
    fault_tolerant = True

    def __init__(self, rank: int, world_size: int, *, token: str | bytes | None = None,
                 peers: Sequence[str] | None = None, store=None, bind: str | None = None, port: int = 0,
                 advertise: str | None = None, options: TcpOptions = TcpOptions(), join: bool = False,
                 control_plane: bool = True) -> None:
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.rank, self.world_size, self.options = rank, world_size, options
        self._key = run_key(_token_from(token))
        self.incarnation = int.from_bytes(os.urandom(6), "big")   # tells a restarted worker from its old self
        self._cond = threading.Condition()
        self._peers: dict[int, _Peer] = {}
        self._control: collections.deque = collections.deque()    # (rank, incarnation, message)
        self._gathered: dict[str, dict[int, str]] = collections.defaultdict(dict)
        self._gather_counter = 0
        self._closing = False
        self.payload_sent = self.payload_recv = 0      # data bytes: what the schedule predicts
        self.overhead_sent = self.overhead_recv = 0    # headers, heartbeats, control messages
        self.refused: list[str] = []                   # connections refused by the handshake
        self.events: list[dict] = []                   # membership changes, in order
        self._reasons: dict[str, tuple] = {}           # rank -> (why, when) a peer saw it lost
        # Membership: the initial members (rank -> incarnation), then monotone sets of lost and
        # joined (rank, incarnation) pairs; the live view follows from them.
        self._members: dict[int, int] = {}
        self._lost: set[tuple[int, int]] = set()
        self._joined: set[tuple[int, int]] = set()
        self._view = 0
        self._old_views: set[int] = set()

        if peers is not None:
            if len(peers) != world_size:
                raise ValueError(f"peers lists {len(peers)} addresses for a run of {world_size} workers")
            addresses = [parse_address(a) for a in peers]
            bind = bind or addresses[rank][0]
            port = addresses[rank][1]
        self._listener = _net.listen(bind or "127.0.0.1", port, who="fomoe.tcp")
        # Connections this worker dials leave from the bound address too (unless it is a
        # wildcard), so all of the run's traffic uses the interface the user chose.
        bound = self._listener.getsockname()[0]
        self._source = None if bound in ("0.0.0.0", "::") else (bound, 0)
        # advertise: what peers dial, "host" or "host:port" (a NAT, port forward or relay in front)
        host = bind if bind not in (None, "", "0.0.0.0", "::") else socket.gethostname()
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        if advertise:
            has_port = "]:" in advertise if advertise.startswith("[") else advertise.count(":") == 1
            self.address = advertise if has_port else f"{advertise}:{self._listener.getsockname()[1]}"
        if peers is None:
            store = store if store is not None else _default_store()
            addresses = self._rendezvous(store, join)
        self._addresses = addresses
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True, name="fomoe-tcp-accept")]
        self._threads[0].start()
        try:
            if join:
                self._join_mesh()
            else:
                self._form_mesh()
        except BaseException:
            self.close()
            raise
        hb = threading.Thread(target=self._heartbeat_loop, daemon=True, name="fomoe-tcp-heartbeat")
        hb.start()
        self._threads.append(hb)
        self._install_control_plane = control_plane
        if control_plane:
            comm.set_control_plane(self)

    # ---- setup -----------------------------------------------------------------------------------

    def _rendezvous(self, store, join: bool) -> list[tuple[str, int]]:
        import datetime
        key = "fomoe/tcp/address/"
        store.set(f"{key}{self.rank}", self.address)
        keys = [f"{key}{r}" for r in range(self.world_size)]
        store.wait(keys, datetime.timedelta(seconds=self.options.connect_timeout_s))
        return [parse_address(store.get(k).decode()) for k in keys]

    def _hello(self) -> dict:
        return {"protocol": PROTOCOL, "rank": self.rank, "world": self.world_size, "inc": self.incarnation,
                "nonce": os.urandom(32).hex()}

    def _connect(self, rank: int, deadline: float, retry: bool = True) -> _Peer:
        host, port = self._addresses[rank]
        last = None
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=min(10.0, max(0.1, deadline - time.monotonic())),
                                                source_address=self._source)
                break
            except OSError as exc:
                last = exc
                if not retry or time.monotonic() > deadline:
                    raise HandshakeError(f"cannot reach rank {rank} at {host}:{port}: {last}") from None
                time.sleep(0.1)
        try:
            sock.settimeout(self.options.handshake_timeout_s)
            buf = bytearray()
            mine = self._hello()
            _send_line(sock, mine)
            theirs = _recv_line(sock, buf)
            if theirs.get("protocol") != PROTOCOL:
                raise HandshakeError(f"{host}:{port} speaks {theirs.get('protocol')!r}, not {PROTOCOL}")
            if "refused" in theirs:
                raise HandshakeError(f"rank {rank} at {host}:{port} refused the connection: {theirs['refused']}")
            if theirs.get("rank") != rank or theirs.get("world") != self.world_size:
                raise HandshakeError(f"{host}:{port} is rank {theirs.get('rank')} of {theirs.get('world')} workers, "
                                     f"expected rank {rank} of {self.world_size}")
            if not hmac.compare_digest(str(theirs.get("proof")), _proof(self._key, b"A", mine, theirs)):
                raise HandshakeError(f"rank {rank} at {host}:{port} did not prove knowledge of the run token "
                                     f"(another run on that address, or a different FOMOE_RUN_TOKEN)")
            _send_line(sock, {"proof": _proof(self._key, b"C", mine, theirs)})
            verdict = _recv_line(sock, buf)
            if not verdict.get("ok"):
                raise HandshakeError(f"rank {rank} at {host}:{port} refused the connection: {verdict.get('error')}")
            if buf:
                raise HandshakeError("unexpected bytes after the handshake")
        except (OSError, HandshakeError) as exc:
            sock.close()
            raise exc if isinstance(exc, HandshakeError) else HandshakeError(
                f"handshake with rank {rank} at {host}:{port} failed: {exc}") from None
        peer = _Peer(rank, int(theirs["inc"]), sock, f"{host}:{port}")
        peer.view_info = verdict.get("view")   # the acceptor's membership (for a joining worker)
        return peer

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                r, _, _ = select.select([self._listener], [], [], 0.2)
                if not r:
                    continue
                sock, addr = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                continue
            threading.Thread(target=self._accept_one, args=(sock, addr), daemon=True,
                             name="fomoe-tcp-handshake").start()

    def _accept_one(self, sock: socket.socket, addr) -> None:
        where = f"{addr[0]}:{addr[1]}"
        try:
            sock.settimeout(self.options.handshake_timeout_s)
            buf = bytearray()
            theirs = _recv_line(sock, buf)
            if isinstance(theirs.get("protocol"), str) and theirs["protocol"] != PROTOCOL:
                _send_line(sock, {"protocol": PROTOCOL, "refused": f"this worker speaks {PROTOCOL}, the client "
                                  f"{theirs['protocol']}: run the same fomoe version on every worker"})
                raise HandshakeError(f"speaks {theirs['protocol']!r}, not {PROTOCOL}")
            if theirs.get("protocol") != PROTOCOL or not isinstance(theirs.get("nonce"), str):
                raise HandshakeError(f"not a {PROTOCOL} client")
            rank, world = theirs.get("rank"), theirs.get("world")
            mine = self._hello()
            if world != self.world_size or not isinstance(rank, int) or not 0 <= rank < self.world_size \
                    or rank == self.rank:
                _send_line(sock, {"protocol": PROTOCOL, "refused": f"this run has {self.world_size} workers and "
                                  f"this is rank {self.rank}; the client claims rank {rank} of {world}"})
                raise HandshakeError(f"claims rank {rank} of {world} workers")
            _send_line(sock, {**mine, "proof": _proof(self._key, b"A", theirs, mine)})
            answer = _recv_line(sock, buf)
            if not hmac.compare_digest(str(answer.get("proof")), _proof(self._key, b"C", theirs, mine)):
                _send_line(sock, {"ok": False, "error": "authentication failed"})
                raise HandshakeError("it did not prove knowledge of the run token")
            with self._cond:
                view = {"members": self._members, "lost": sorted(self._lost), "joined": sorted(self._joined)}
            _send_line(sock, {"ok": True, "view": view})
            if buf:
                raise HandshakeError("unexpected bytes after the handshake")
        except (OSError, HandshakeError) as exc:
            self.refused.append(f"{where}: {exc}")
            _log(f"rank {self.rank}: refused a connection from {where}: {exc}")
            try:
                sock.close()
            except OSError:
                pass
            return
        self._add_peer(_Peer(rank, int(theirs["inc"]), sock, where))

    def _add_peer(self, peer: _Peer) -> None:
        peer.sock.settimeout(0.0)
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with self._cond:
            old = self._peers.get(peer.rank)
            if old is not None and old.failure is None and old.incarnation != peer.incarnation:
                self._mark_failed(old, "it restarted (a new process connected as this rank)")
            self._peers[peer.rank] = peer
            self._cond.notify_all()
        threading.Thread(target=self._reader, args=(peer,), daemon=True, name=f"fomoe-tcp-read-{peer.rank}").start()

    def _form_mesh(self) -> None:
        """Connect to every lower rank, accept every higher one; all start as members."""
        deadline = time.monotonic() + self.options.connect_timeout_s
        for r in range(self.rank):
            self._add_peer(self._connect(r, deadline))
        with self._cond:
            while len(self._peers) < self.world_size - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(self._peers) - {self.rank})
                    raise HandshakeError(f"rank {self.rank}: ranks {missing} did not connect within "
                                         f"{self.options.connect_timeout_s:.0f} s" +
                                         (f"; refused: {self.refused}" if self.refused else ""))
                self._cond.wait(0.2)
            self._members = {r: p.incarnation for r, p in self._peers.items()}
            self._members[self.rank] = self.incarnation
            self._view = self._view_id()

    def _join_mesh(self) -> None:
        """A restarted worker: connect to every reachable rank, adopt their membership and ask to join."""
        deadline = time.monotonic() + self.options.connect_timeout_s
        views = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                peer = self._connect(r, min(deadline, time.monotonic() + self.options.peer_timeout_s))
            except HandshakeError as exc:
                if "refused the connection" in str(exc) or "did not prove" in str(exc):
                    raise
                continue   # a rank that is gone too
            views.append(peer.view_info)
            self._add_peer(peer)
        if not views:
            raise HandshakeError(f"rank {self.rank}: no worker of the run is reachable; nothing to join")
        with self._cond:
            for v in views:
                self._members.update({int(k): int(i) for k, i in v["members"].items()})
                self._lost |= {tuple(x) for x in v["lost"]}
                self._joined |= {tuple(x) for x in v["joined"]}
            old = self._members.get(self.rank)
            if old is not None and old != self.incarnation:
                self._lost.add((self.rank, old))
            reachable = {r: p.incarnation for r, p in self._peers.items()}
            for r, inc in self._live_pairs():   # members that did not answer count as lost
                if r != self.rank and reachable.get(r) != inc:
                    self._lost.add((r, inc))
            self._joined.add((self.rank, self.incarnation))
            self._view = -1   # not a member until the others agree
            self.events.append({"event": "join-requested", "rank": self.rank, "time": time.time()})
        self._broadcast_view()

    # ---- membership --------------------------------------------------------------------------------

    def _live_pairs(self) -> list[tuple[int, int]]:
        """(rank, incarnation) of the live members: initial members and joiners, minus the lost;
        per rank the newest incarnation that is not lost."""
        out = {}
        for pair in list(self._members.items()) + sorted(self._joined):
            if pair not in self._lost:
                out[pair[0]] = pair[1]
        return sorted(out.items())

    def live_ranks(self) -> tuple[int, ...]:
        with self._cond:
            return tuple(r for r, _ in self._live_pairs())

    def _view_id(self) -> int:
        # Of the whole state, not just the live set: every change of state is a new view, so frames
        # of any view this worker left behind are recognisable.
        state = [sorted(self._members.items()), sorted(self._lost), sorted(self._joined)]
        return int.from_bytes(hashlib.sha256(json.dumps(state).encode()).digest()[:4], "big")

    def _mark_failed(self, peer: _Peer, reason: str) -> None:
        # Under self._cond.
        if peer.failure is None:
            peer.failure = reason
            peer.failed_at = time.time()
            self._cond.notify_all()

    def _pending_change(self, waiting_on: Sequence[int] | None = None) -> comm.MembershipChange | None:
        """A membership change this worker must act on: a live peer it is waiting on (default: any)
        failed, or a peer proposed a view with more lost or joined workers than this one knows.
        (A failed peer nobody waits on is noticed by whoever needs it.) Under self._cond."""
        live = dict(self._live_pairs())
        failed = {r: p.failure for r, p in self._peers.items()
                  if p.failure is not None and live.get(r) == p.incarnation
                  and (waiting_on is None or r in waiting_on)}
        if failed:
            what = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
            return comm.PeerLost(f"rank {self.rank} lost contact with {what}", failed, failed)
        news = None
        keep = collections.deque()
        for sender, inc, msg in self._control:
            if msg.get("type") == "view":
                lost = {tuple(x) for x in msg["lost"]}
                joined = {tuple(x) for x in msg["joined"]}
                if lost <= self._lost and joined <= self._joined:
                    continue   # nothing this worker does not know (a late copy): drop it
                news = news or comm.MembershipChange(f"rank {sender} reports a change of the run's members")
            keep.append((sender, inc, msg))
        self._control = keep
        return news

    def _broadcast_view(self) -> None:
        with self._cond:
            # What this worker saw of each loss travels along, so every survivor can report it.
            why = {str(r): [p.failure, p.failed_at] for r, p in self._peers.items()
                   if p.failure and p.failure != "closed" and (r, p.incarnation) in self._lost}
            msg = {"type": "view", "lost": sorted(self._lost), "joined": sorted(self._joined), "why": why}
            targets = [self._peers[r] for r, inc in self._live_pairs()
                       if r != self.rank and r in self._peers and self._peers[r].incarnation == inc
                       and self._peers[r].failure is None]
        for peer in targets:
            self._send_control(peer, msg)

    def recover(self) -> tuple[int, ...]:
        """Agree with every other survivor on the live workers; returns their ranks.

        Each survivor adds the workers it saw fail (or restart) to its set of lost workers and the
        workers that asked to join to its set of joiners, sends both sets to every live peer
        whenever they grow, and merges the sets it receives. It is done when every live peer's
        latest message holds exactly its own sets: then all survivors hold the same view.
        Raises ``comm.Excluded`` if the others lost this worker, ``comm.QuorumLost`` if less
        than half of the run's workers remain.
        """
        start = time.monotonic()
        deadline = start + self.options.stall_timeout_s
        latest: dict[int, tuple[frozenset, frozenset]] = {}
        sent_state = None
        with self._cond:
            before = dict(self._live_pairs())
            if self._view != -1 and self._pending_change() is None:
                return tuple(before)   # nothing changed since the last agreement
        while True:
            with self._cond:
                live = dict(self._live_pairs())
                for r, p in self._peers.items():
                    if p.failure is not None and live.get(r) == p.incarnation:
                        self._lost.add((r, p.incarnation))
                while self._control:
                    sender, inc, msg = self._control[0]
                    if msg.get("type") != "view":
                        break
                    self._control.popleft()
                    lost, joined = frozenset(tuple(x) for x in msg["lost"]), frozenset(tuple(x) for x in msg["joined"])
                    self._lost |= lost
                    self._merge_reasons(msg)
                    self._joined |= joined
                    latest[sender] = (lost, joined, inc)
                self._drain_control_out_of_order(latest)
                if (self.rank, self.incarnation) in self._lost:
                    raise comm.Excluded(f"rank {self.rank}: the other workers lost contact with this worker and "
                                        f"continue without it; restart it (join) to take part again")
                state = (frozenset(self._lost), frozenset(self._joined))
                self._old_views.add(self._view_id())
                live = dict(self._live_pairs())
                others = [r for r in live if r != self.rank]
                # A joiner this worker has no connection to yet: wait for it to connect.
                missing = [r for r in others if r not in self._peers or self._peers[r].incarnation != live[r]]
            if state != sent_state:
                self._broadcast_view()
                sent_state = state
                continue
            with self._cond:
                done = all(r in latest and latest[r][:2] == state and latest[r][2] == live[r] for r in others)
                if done and not missing:
                    break
                if time.monotonic() > deadline:
                    waiting = [r for r in others if not (r in latest and latest[r][:2] == state)]
                    raise comm.PeerLost(f"rank {self.rank}: ranks {waiting} did not take part in the membership "
                                        f"agreement within {self.options.stall_timeout_s:.0f} s", waiting)
                self._cond.wait(0.1)
        self._install(before, time.monotonic() - start)
        return self.live_ranks()

    def _merge_reasons(self, msg: dict) -> None:
        for r, (why, at) in (msg.get("why") or {}).items():
            self._reasons.setdefault(str(r), (f"{why} (seen by a peer)", at))

    def _drain_control_out_of_order(self, latest) -> None:
        # View messages queued behind other control messages (gathers) still count.
        keep = collections.deque()
        for sender, inc, msg in self._control:
            if msg.get("type") == "view":
                lost, joined = frozenset(tuple(x) for x in msg["lost"]), frozenset(tuple(x) for x in msg["joined"])
                self._lost |= lost
                self._merge_reasons(msg)
                self._joined |= joined
                latest[sender] = (lost, joined, inc)
            else:
                keep.append((sender, inc, msg))
        self._control = keep

    def _install(self, before: dict[int, int], agreement_s: float) -> None:
        with self._cond:
            live = dict(self._live_pairs())
            self._old_views.add(self._view)
            self._view = self._view_id()
            self._old_views.discard(self._view)
            # Gather messages of this view may be here already (from peers that installed it first).
            for key in [k for k in self._gathered if int(k.split("#")[1]) in self._old_views]:
                del self._gathered[key]
            self._gather_counter = 0
            for r, p in list(self._peers.items()):
                if live.get(r) != p.incarnation:
                    p.frames.clear()
                    continue
                # Frames of interrupted collectives belong to an old view; sequence numbers restart.
                # (Frames of a view this worker has not reached yet stay.)
                p.frames = collections.deque(f for f in p.frames if f[0] not in self._old_views)
                p.sent_seq = p.recv_seq = 0
            lost = {r: before[r] for r in before if live.get(r) != before[r]}
            joined = {r: inc for r, inc in live.items() if before.get(r) != inc}
            details = {}
            for r in lost:
                p = self._peers.get(r)
                # What this worker saw itself, else what a peer saw (reason and wall-clock time).
                if p is not None and p.failure and p.failure != "closed":
                    reason, at = p.failure, p.failed_at
                else:
                    reason, at = self._reasons.get(str(r), ("reported lost by a peer", None))
                details[r] = {"reason": reason, "detected_at": at}
            for r in joined:   # a restarted worker's next loss is a new story
                self._reasons.pop(str(r), None)
            gone = [p for r, p in self._peers.items() if live.get(r) != p.incarnation]
            event = {"event": "membership", "time": time.time(), "live": sorted(live), "lost": sorted(lost),
                     "joined": sorted(joined), "details": details, "agreement_s": agreement_s}
            self.events.append(event)
        # Tell excluded-but-alive workers (e.g. one frozen for longer than the timeout) that the run
        # continues without them, then drop their connections.
        msg = {"type": "view", "lost": sorted(self._lost), "joined": sorted(self._joined)}
        for p in gone:
            if p.failure is None or p.failure.startswith("no message"):
                self._send_control(p, msg, quiet=True)
            self._close_peer(p)
        quorum = len(live) * 2 > self.world_size or (len(live) * 2 == self.world_size and 0 in live)
        if lost:
            _log(f"rank {self.rank}: continuing without ranks {sorted(lost)} (" + "; ".join(
                f"rank {r}: {d['reason']}" for r, d in sorted(details.items())) + f"); live ranks {sorted(live)}")
        if joined and self.rank not in joined:
            _log(f"rank {self.rank}: ranks {sorted(joined)} joined the run; live ranks {sorted(live)}")
        if not quorum:
            raise comm.QuorumLost(f"rank {self.rank}: only ranks {sorted(live)} of {self.world_size} workers remain "
                                  f"reachable; stopping so that a network partition cannot split the run")

    # ---- frames -----------------------------------------------------------------------------------

    def _reader(self, peer: _Peer) -> None:
        header = bytearray(HEADER.size)
        try:
            while not self._closing and peer.failure is None:
                if not self._read_into(peer, memoryview(header)):
                    return
                magic, kind, _, view, seq, length = HEADER.unpack(header)
                if magic != MAGIC or kind not in (DATA, HEARTBEAT, CONTROL, BYE):
                    raise ConnectionError(f"malformed frame (magic {bytes(magic)!r}, kind {kind})")
                if kind != DATA and length > MAX_CONTROL:
                    raise ConnectionError(f"control frame of {length} bytes")
                payload = bytearray(length)
                if length:
                    with self._cond:
                        peer.receiving = (time.monotonic(), length)
                    if not self._read_into(peer, memoryview(payload)):
                        return
                with self._cond:
                    peer.receiving = None
                    if kind == DATA:
                        self.overhead_recv += HEADER.size
                        peer.frames.append((view, seq, payload))
                    else:
                        self.overhead_recv += HEADER.size + length
                        if kind == CONTROL:
                            self._on_control(peer, json.loads(payload))
                        elif kind == BYE:
                            peer.left = True
                            self._mark_failed(peer, "it left the run (closed its transport)")
                    self._cond.notify_all()
        except (OSError, ConnectionError, ValueError) as exc:
            with self._cond:
                if not self._closing:
                    why = "its connection closed (process killed or crashed?)" if isinstance(
                        exc, (ConnectionResetError, BrokenPipeError, EOFError)) or "closed" in str(exc) else f"{exc}"
                    self._mark_failed(peer, why)

    def _read_into(self, peer: _Peer, view: memoryview) -> bool:
        """Fill ``view`` from the peer's socket; False if the transport or the peer was closed meanwhile."""
        got, n = 0, len(view)
        while got < n:
            if self._closing or peer.failure is not None:
                return False
            try:
                k = peer.sock.recv_into(view[got:], min(n - got, 1 << 22))
            except BlockingIOError:
                select.select([peer.sock], [], [], 0.2)
                continue
            except InterruptedError:
                continue
            if k == 0:
                raise ConnectionError("the connection was closed by the peer")
            got += k
            peer.last_heard = time.monotonic()
        return True

    def _on_control(self, peer: _Peer, msg: dict) -> None:
        # Under self._cond.
        if msg.get("type") == "gather":
            self._gathered[msg["tag"]][peer.rank] = msg["text"]
        else:
            self._control.append((peer.rank, peer.incarnation, msg))

    def _send_frame(self, peer: _Peer, kind: int, payload, view: int = 0, seq: int = 0,
                    deadline: float | None = None, locked: bool = False) -> None:
        """Send one frame (the caller holds ``peer.send_lock`` if ``locked``)."""
        nbytes = len(payload)
        header = HEADER.pack(MAGIC, kind, 0, view & 0xFFFFFFFF, seq, nbytes)
        if deadline is None:
            deadline = time.monotonic() + self.options.transfer_deadline_s(nbytes)
        buffers = [memoryview(header), memoryview(payload).cast("B")] if nbytes else [memoryview(header)]
        with (_NoLock() if locked else peer.send_lock):
            while buffers:
                if peer.failure is not None:
                    raise ConnectionError(peer.failure)
                try:
                    k = peer.sock.sendmsg(buffers)
                except BlockingIOError:
                    k = 0
                except InterruptedError:
                    continue
                while k and buffers:
                    if k >= len(buffers[0]):
                        k -= len(buffers[0])
                        buffers.pop(0)
                    else:
                        buffers[0] = buffers[0][k:]
                        k = 0
                if buffers:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"sending {nbytes} bytes did not finish within "
                                           f"{self.options.transfer_deadline_s(nbytes):.1f} s (the peer does not "
                                           f"read, or the link is slower than {self.options.min_bandwidth_mbps:g} "
                                           f"Mbit/s)")
                    select.select([], [peer.sock], [], 0.2)
            peer.last_sent = time.monotonic()
        if kind == DATA:
            self.payload_sent += nbytes
            self.overhead_sent += HEADER.size
        else:
            self.overhead_sent += HEADER.size + nbytes

    def _send_control(self, peer: _Peer, msg: dict, quiet: bool = False) -> None:
        try:
            self._send_frame(peer, CONTROL, json.dumps(msg, separators=(",", ":")).encode(),
                             deadline=time.monotonic() + self.options.peer_timeout_s)
        except (OSError, ConnectionError) as exc:
            if not quiet:
                with self._cond:
                    self._mark_failed(peer, f"sending to it failed: {exc}")

    def _heartbeat_loop(self) -> None:
        hb = self.options.heartbeat_s
        while not self._closing:
            time.sleep(min(hb, 0.5))
            now = time.monotonic()
            with self._cond:
                peers = [p for p in self._peers.values() if p.failure is None]
                for p in peers:
                    receiving = p.receiving is not None
                    if now - p.last_heard > self.options.peer_timeout_s and not receiving:
                        self._mark_failed(p, f"no message or heartbeat for {now - p.last_heard:.1f} s "
                                             f"(timeout {self.options.peer_timeout_s:g} s)")
                    elif receiving and now - p.receiving[0] > self.options.transfer_deadline_s(p.receiving[1]):
                        self._mark_failed(p, f"a {p.receiving[1]}-byte message from it did not arrive within "
                                             f"{self.options.transfer_deadline_s(p.receiving[1]):.1f} s (link slower "
                                             f"than {self.options.min_bandwidth_mbps:g} Mbit/s?)")
            for p in peers:
                # Never block here: a heartbeat goes out only when the connection is free and its
                # socket has room (then a 24-byte frame is written whole).
                if p.failure is not None or now - p.last_sent < hb or not p.send_lock.acquire(blocking=False):
                    continue
                try:
                    if select.select([], [p.sock], [], 0)[1]:
                        self._send_frame(p, HEARTBEAT, b"", deadline=time.monotonic() + self.options.peer_timeout_s,
                                         locked=True)
                except (OSError, ConnectionError, ValueError) as exc:
                    with self._cond:
                        self._mark_failed(p, f"sending a heartbeat failed: {exc}")
                finally:
                    p.send_lock.release()

    # ---- collectives ------------------------------------------------------------------------------

    def _check(self, waiting_on: Sequence[int] | None = None) -> None:
        with self._cond:
            change = self._pending_change(waiting_on)
        if change is not None:
            raise change

    def _member_peer(self, rank: int) -> _Peer:
        with self._cond:
            if self._view == -1:
                raise comm.MembershipChange(f"rank {self.rank} has not been admitted to the run yet")
            live = dict(self._live_pairs())
            peer = self._peers.get(rank)
            if rank not in live or peer is None or peer.incarnation != live[rank]:
                raise ValueError(f"rank {rank} is not a live member of the run (live ranks {sorted(live)})")
            return peer

    def _exchange(self, send: Tensor, dst: int, recv: Tensor, src: int) -> None:
        self._check((dst, src))
        out, into = self._member_peer(dst), self._member_peer(src)
        data = send.contiguous().view(torch.uint8).numpy()
        try:
            self._send_frame(out, DATA, data, self._view, out.sent_seq)
        except (OSError, ConnectionError) as exc:
            with self._cond:
                self._mark_failed(out, f"sending to it failed: {exc}")
                change = self._pending_change((dst,))
            raise change or comm.PeerLost(f"rank {self.rank} lost rank {dst}: {exc}", (dst,))
        out.sent_seq += 1
        nbytes = recv.numel() * recv.element_size()
        payload = self._wait_frame(into, nbytes)
        if nbytes:
            recv.view(torch.uint8).copy_(torch.frombuffer(payload, dtype=torch.uint8))

    def _wait_frame(self, peer: _Peer, nbytes: int) -> bytearray:
        stall_deadline = time.monotonic() + self.options.stall_timeout_s
        with self._cond:
            while True:
                while peer.frames and peer.frames[0][0] in self._old_views:
                    peer.frames.popleft()
                if peer.frames and peer.frames[0][0] == self._view:
                    _, seq, payload = peer.frames.popleft()
                    if seq != peer.recv_seq or len(payload) != nbytes:
                        raise ConnectionError(f"rank {self.rank}: out-of-step message from rank {peer.rank} (sequence "
                                              f"{seq}, {len(payload)} bytes; expected {peer.recv_seq}, {nbytes}): the "
                                              f"workers run different schedules")
                    peer.recv_seq += 1
                    self.payload_recv += nbytes
                    return payload
                change = self._pending_change((peer.rank,))
                if change is not None:
                    raise change
                if time.monotonic() > stall_deadline:
                    self._mark_failed(peer, f"alive but sent nothing for {self.options.stall_timeout_s:.0f} s")
                    continue
                self._cond.wait(0.2)

    def gather_text(self, tag: str, text: str) -> dict[int, str]:
        """Every live rank's ``text`` for ``tag`` (the control plane); raises ``PeerLost`` if one is lost."""
        with self._cond:
            # Keys count per view, so a worker that joined later numbers its gathers like the others.
            self._gather_counter += 1
            key = f"{tag}#{self._view}#{self._gather_counter}"
            members = [r for r, _ in self._live_pairs()]
        msg = {"type": "gather", "tag": key, "text": text}
        for r in members:
            if r != self.rank:
                self._send_control(self._member_peer(r), msg)
        with self._cond:
            while True:
                got = self._gathered[key]
                missing = [r for r in members if r != self.rank and r not in got]
                if not missing:
                    out = {r: got[r] for r in members if r != self.rank}
                    out[self.rank] = text
                    del self._gathered[key]
                    return dict(sorted(out.items()))
                change = self._pending_change(missing)
                if change is not None:
                    raise change
                self._cond.wait(0.2)

    def barrier(self) -> None:
        self.gather_text("barrier", "")

    # ---- teardown ---------------------------------------------------------------------------------

    def _close_peer(self, peer: _Peer) -> None:
        with self._cond:
            if peer.failure is None:
                peer.failure = "closed"
        try:
            peer.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        """Say goodbye to every peer (they stop counting on this worker) and close everything."""
        if self._closing:
            return
        for peer in list(self._peers.values()):
            if peer.failure is None:
                try:
                    self._send_frame(peer, BYE, b"", deadline=time.monotonic() + 2.0)
                except (OSError, ConnectionError):
                    pass
        self._closing = True
        for peer in list(self._peers.values()):
            try:
                peer.sock.close()
            except OSError:
                pass
        try:
            self._listener.close()
        except OSError:
            pass
        if comm.control_plane() is self:
            comm.set_control_plane(None)

    def __enter__(self) -> "TcpTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _default_store():
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RuntimeError("TcpTransport needs peers=[host:port, ...] or a store (torch.distributed is not "
                           "initialised, so there is no default store)")
    from torch.distributed import distributed_c10d as c10d
    return c10d._get_default_store()
