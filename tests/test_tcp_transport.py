"""Security of the TCP transport (in one process, threads as workers): only peers that prove
knowledge of the run's token join the mesh; impostors, garbage and silent connections are
refused and logged without disturbing a running mesh, whose sums stay exact; the listener binds
to the address it is given and nowhere else."""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time

import pytest
import torch

from fomoe import launch, tcp

FAST = tcp.TcpOptions(peer_timeout_s=5.0, connect_timeout_s=5.0, handshake_timeout_s=1.0)


def _start(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 (the test inspects it)
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _mesh(tokens, host="127.0.0.1", options=FAST, **kw):
    """Start one transport per token (rank i with tokens[i]) in threads; returns their boxes."""
    peers = [f"{host}:{launch.free_port()}" for _ in tokens]
    started = [_start(lambda r=r, t=t: tcp.TcpTransport(r, len(tokens), token=t, peers=peers, options=options,
                                                         control_plane=False, **kw))
               for r, t in enumerate(tokens)]
    for thread, _ in started:
        thread.join(30)
    return [box for _, box in started], peers


def _sum_on_all(transports, gen) -> None:
    """Each transport sums its own random buffer; all must end with the exact sum (the reference)."""
    inputs = [torch.randn(1000, generator=gen) for _ in transports]
    bufs = [x.clone() for x in inputs]
    threads = [threading.Thread(target=t.sum_, args=(b, tuple(range(len(transports)))))
               for t, b in zip(transports, bufs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    want = inputs[0].double()
    for x in inputs[1:]:
        want = want + x.double()
    for b in bufs:
        torch.testing.assert_close(b.double(), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(b, bufs[0])


@pytest.fixture
def mesh(gen):
    boxes, peers = _mesh(["the-run-token", "the-run-token"])
    transports = [box["value"] for box in boxes]
    yield transports, peers
    for t in transports:
        t.close()


def test_a_peer_with_a_wrong_token_is_refused_on_both_sides():
    boxes, _ = _mesh(["the-run-token", "another-token"],
                     options=tcp.TcpOptions(connect_timeout_s=2.0, handshake_timeout_s=1.0))
    for box in boxes:
        if "value" in box:
            box["value"].close()
    # Rank 1 dials rank 0, which proves itself first: rank 1 finds the proof wrong and hangs up.
    assert isinstance(boxes[1].get("error"), tcp.HandshakeError), boxes[1]
    assert "did not prove knowledge of the run token" in str(boxes[1]["error"])
    # Rank 0 never admits it and gives up forming the mesh, naming the refused connection.
    assert isinstance(boxes[0].get("error"), tcp.HandshakeError), boxes[0]
    assert "ranks [1] did not connect" in str(boxes[0]["error"]) and "refused" in str(boxes[0]["error"])


def _raw_hello(rank: int, world: int = 2) -> dict:
    return {"protocol": tcp.PROTOCOL, "rank": rank, "world": world, "inc": 7, "nonce": "ab" * 32}


def _read_all(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    sock.settimeout(limit_s)
    out = b""
    try:
        while chunk := sock.recv(4096):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return out


def test_impostors_garbage_and_silent_connections_are_refused_without_disturbing_the_run(mesh, gen):
    transports, peers = mesh
    _sum_on_all(transports, gen)
    before = [(t.payload_recv, dict(t._peers), t.events[:], t.overhead_recv) for t in transports]
    host, port = tcp.parse_address(peers[0])

    # An impostor claiming rank 1 with a wrong proof, a data frame queued right behind it.
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall((json.dumps(_raw_hello(1)) + "\n").encode())
        challenge = json.loads(s.recv(4096).decode().split("\n")[0])
        assert challenge["rank"] == 0 and len(challenge["proof"]) == 64
        frame = tcp.HEADER.pack(tcp.MAGIC, tcp.DATA, 0, 0, 0, 8) + b"\x00" * 8
        s.sendall((json.dumps({"proof": "0" * 64}) + "\n").encode() + frame)
        verdict = _read_all(s)
    assert json.loads(verdict.decode().split("\n")[0]) == {"ok": False, "error": "authentication failed"}
    # Garbage: an HTTP request, then random bytes with no line end (the handshake line limit).
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_all(s) == b""
    with socket.create_connection((host, port), timeout=5) as s:
        junk = torch.randint(0, 256, (tcp.MAX_HANDSHAKE_LINE + 10,), generator=gen, dtype=torch.uint8)
        junk[junk == ord("\n")] = 0
        try:
            s.sendall(bytes(junk.tolist()))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _read_all(s) == b""
    # A connection that says nothing: dropped after the handshake timeout.
    silent = socket.create_connection((host, port), timeout=5)
    t0 = time.monotonic()
    assert _read_all(silent, limit_s=FAST.handshake_timeout_s + 3) == b""
    assert time.monotonic() - t0 < FAST.handshake_timeout_s + 2
    silent.close()

    deadline = time.monotonic() + 5
    while len(transports[0].refused) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = transports[0].refused
    assert len(refused) == 4, refused
    assert "did not prove knowledge of the run token" in refused[0]
    assert "not a fomoe handshake" in refused[1]
    assert "handshake message too long" in refused[2] or "reset" in refused[2]
    assert "timed out" in refused[3]
    # Nothing of them reached the mesh: no peer replaced, no payload byte counted, no membership
    # change; the only frames received meanwhile are the peers' empty heartbeats.
    after = [(t.payload_recv, dict(t._peers), t.events[:], t.overhead_recv) for t in transports]
    assert [a[:3] for a in after] == [b[:3] for b in before]
    assert all((a[3] - b[3]) % tcp.HEADER.size == 0 for a, b in zip(after, before))
    assert transports[0]._peers[1].failure is None and transports[1].refused == []
    _sum_on_all(transports, gen)
    assert transports[0].live_ranks() == (0, 1)


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _loopback_alias_works(), reason="127.0.0.2 is not an address of this machine")
@pytest.mark.parametrize("host,other", [("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")])
def test_the_listener_binds_to_the_given_address_only(host, other, gen):
    boxes, peers = _mesh(["tok", "tok"], host=host)
    transports = [box["value"] for box in boxes]
    try:
        for t, address in zip(transports, peers):
            bound_host, bound_port = t._listener.getsockname()
            assert (bound_host, bound_port) == tcp.parse_address(address)
            # The same port on another address of this machine has nobody listening.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, bound_port), timeout=2).close()
            # The mesh runs over the given address.
            assert all(p.sock.getsockname()[0] == host for p in t._peers.values())
        _sum_on_all(transports, gen)
    finally:
        for t in transports:
            t.close()


def test_bind_and_advertise_through_a_store(gen):
    """Rendezvous through a store: ``bind`` picks the interface, ``advertise`` (host or
    host:port) is what the others dial."""
    store_port = launch.free_port()
    store = torch.distributed.TCPStore("127.0.0.1", store_port, 3, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=10))

    def client():   # one store client per worker, as in a real run
        return torch.distributed.TCPStore("127.0.0.1", store_port, 3, is_master=False,
                                          timeout=datetime.timedelta(seconds=10))
    port = launch.free_port()
    started = [_start(lambda: tcp.TcpTransport(0, 2, token="tok", store=client(), bind="127.0.0.1", port=port,
                                               options=FAST, control_plane=False)),
               _start(lambda: tcp.TcpTransport(1, 2, token="tok", store=client(), bind="127.0.0.1",
                                               advertise="127.0.0.1", options=FAST, control_plane=False))]
    for thread, _ in started:
        thread.join(30)
    transports = [box["value"] for _, box in started]
    try:
        assert transports[0].address == f"127.0.0.1:{port}"
        assert transports[1].address == f"127.0.0.1:{transports[1]._listener.getsockname()[1]}"
        assert store.get("fomoe/tcp/address/0").decode() == transports[0].address
        _sum_on_all(transports, gen)
    finally:
        for t in transports:
            t.close()


def test_a_missing_token_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(tcp.TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="FOMOE_RUN_TOKEN"):
        tcp.TcpTransport(0, 1, peers=[f"127.0.0.1:{launch.free_port()}"])
    assert tcp.run_key("a") != tcp.run_key("b") and len(tcp.run_key("a")) == 32
