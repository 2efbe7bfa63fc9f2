"""Slow and lossy links: the shaping relay against its own spec, federated training whose every
connection crosses a shaped link (sync time against fomoe.plan's prediction), and transport
timeouts that follow the link instead of hand-tuning."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fomoe import plan
from fomoe.relay import SEGMENT_BYTES, Relay, Shaper, parse_address

from link_workers import lm_config, run_over_relays


# ---- a sink behind the relay: reads length-prefixed messages, answers one byte per message ----

class Sink:
    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.srv.getsockname()

    def _run(self) -> None:
        conn, _ = self.srv.accept()
        with conn:
            buf = b""
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                self.received += len(data)
                buf += data
                while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[:8], "big"):
                    buf = buf[8 + int.from_bytes(buf[:8], "big"):]
                    conn.sendall(b"k")
        self.srv.close()


def round_trip(sock: socket.socket, payload: bytes) -> float:
    """Seconds from sending ``payload`` until the sink's answer is back."""
    message = len(payload).to_bytes(8, "big") + payload
    t0 = time.monotonic()
    sock.sendall(message)
    assert sock.recv(1) == b"k"
    return time.monotonic() - t0


def relay_threads() -> int:
    return sum(t.name.startswith("fomoe-relay") for t in threading.enumerate())


# ---- the relay's timing model, without sockets --------------------------------------------------

def test_shaper_follows_its_link_model():
    # 1 MB/s, 100 ms one way: a chunk leaves the link after its serialisation, arrives 100 ms later
    s = Shaper(delay_s=0.1, rate_bps=8e6)
    assert s.deliver_at(0.0, 1000) == pytest.approx(0.001 + 0.1)
    assert s.deliver_at(0.0, 2000) == pytest.approx(0.003 + 0.1)      # queued behind the first
    assert s.deliver_at(1.0, 1000) == pytest.approx(1.001 + 0.1)      # an idle link starts afresh
    # periodic loss 1/4 over 100-byte segments: every fourth segment costs one round trip (0.2 s)
    s = Shaper(delay_s=0.1, rate_bps=None, loss=0.25, segment_bytes=100)
    t = s.deliver_at(0.0, 800)                       # segments 1..8 end here: 2 and 6 are lost
    assert s.segments_lost == 2 and t == pytest.approx(2 * 0.2 + 0.1)
    t = s.deliver_at(0.0, 150)                       # bytes 800..950 end segment 9 only: kept
    assert s.segments_lost == 2 and t == pytest.approx(0.4 + 0.1)
    t = s.deliver_at(0.0, 50)                        # segment 10, the next fourth one: lost
    assert s.segments_lost == 3 and t == pytest.approx(0.6 + 0.1)
    # random loss: independent draws, seeded, at the asked rate
    r = Shaper(loss=0.05, loss_pattern="random", segment_bytes=10, seed=3)
    r.deliver_at(0.0, 10 * 20000)
    assert 800 < r.segments_lost < 1200
    again = Shaper(loss=0.05, loss_pattern="random", segment_bytes=10, seed=3)
    again.deliver_at(0.0, 10 * 20000)
    assert again.segments_lost == r.segments_lost


@pytest.mark.parametrize("kwargs, match", [
    (dict(delay_ms=-1), "delay"), (dict(rate_mbit=0), "rate"), (dict(loss=1.0), "loss"),
    (dict(loss=-0.1), "loss"), (dict(loss_pattern="bursty"), "loss_pattern"), (dict(buffer_bytes=0), "buffer"),
])
def test_relay_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Relay(("127.0.0.1", 1), **kwargs)


def test_relay_rejects_bad_addresses():
    for text in ("localhost", "host:port", ":80", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="host:port"):
            parse_address(text)
    with pytest.raises(ValueError, match="host:port"):
        Relay("127.0.0.1")


# ---- the relay against its spec, over sockets ------------------------------------------------------

def test_relay_delay_rate_and_loss_measured():
    base = relay_threads()
    # one-way delay: a 1-byte round trip takes two delays
    sink = Sink()
    with Relay(sink.address, delay_ms=60) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            rtts = [round_trip(s, b"") for _ in range(3)]
        assert 0.12 <= min(rtts) < 0.12 + 0.06, rtts
    # rate: 3 MB at 100 Mbit/s take 0.24 s on the link
    sink = Sink()
    nbytes = 3_000_000
    with Relay(sink.address, delay_ms=20, rate_mbit=100) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            took = round_trip(s, os.urandom(nbytes))
    expect = plan.Link(bandwidth_gbps=0.1, latency_ms=20).transfer_seconds(nbytes, 2)   # there and back
    assert expect <= took < 1.3 * expect, (took, expect)
    assert sink.received == nbytes + 8
    # loss: 1% of 1448-byte segments, each a round trip, as fomoe.plan's Link models it
    sink = Sink()
    nbytes = 2_000_000
    with Relay(sink.address, delay_ms=25, rate_mbit=200, loss=0.01) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            took = round_trip(s, os.urandom(nbytes))
        lost = relay.totals()["segments_lost"]
    assert lost == round(nbytes / SEGMENT_BYTES * 0.01)
    expect = plan.Link(bandwidth_gbps=0.2, latency_ms=25, loss=0.01).transfer_seconds(nbytes, 2)
    assert expect * 0.97 <= took < 1.3 * expect, (took, expect)
    deadline = time.monotonic() + 5
    while relay_threads() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay_threads() == base


def test_relay_stops_cleanly_with_open_connections_and_reports_unreachable_targets():
    base = relay_threads()
    sink = Sink()
    relay = Relay(sink.address, delay_ms=200, rate_mbit=10).start()
    client = socket.create_connection(("127.0.0.1", relay.port))
    client.sendall(os.urandom(1 << 20))          # still queued on the slow link when we stop
    time.sleep(0.1)
    assert relay.active_connections == 1
    relay.stop()
    assert relay_threads() == base and relay.active_connections == 0
    client.settimeout(5)
    assert client.recv(1) == b""                 # the relay closed its side
    client.close()
    with pytest.raises(RuntimeError, match="stopped"):
        relay.address
    with pytest.raises(RuntimeError, match="starts once"):
        relay.start()
    # a target nobody listens on: the client's connection is closed and the reason kept
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with Relay(("127.0.0.1", port)) as relay:
        c = socket.create_connection(("127.0.0.1", relay.port))
        c.settimeout(5)
        assert c.recv(1) == b""
        c.close()
        assert any(f"127.0.0.1:{port}" in e for e in relay.errors)
    assert relay_threads() == base


def test_relay_command_line(capsys):
    from fomoe.relay import main
    assert main(["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--loss", "2"]) == 2
    assert "loss must be in [0, 1)" in capsys.readouterr().err
    assert main(["--listen", "127.0.0.1", "--to", "127.0.0.1:9"]) == 2
    assert "use host:port" in capsys.readouterr().err
    sink = Sink()
    proc = subprocess.Popen([sys.executable, "-m", "fomoe.relay", "--listen", "127.0.0.1:0", "--to",
                             f"127.0.0.1:{sink.address[1]}", "--delay-ms", "40"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=interactive_sigint)
    lasting: set[int] = set()
    try:
        line = proc.stdout.readline()
        assert "40 ms one way" in line, line
        lasting = threads_of(proc.pid)
        host, port = parse_address(line.split()[1])
        with socket.create_connection((host, port)) as s:
            assert 0.08 <= round_trip(s, b"x" * 1000) < 0.5
    finally:
        interrupt_a_helper_thread(proc.pid, lasting)
        try:
            code = proc.wait(timeout=20)
        finally:
            proc.kill()
            proc.stdout.close()
    assert code == 0


def interactive_sigint() -> None:
    """In the child before exec: SIGINT as in a terminal, default and unblocked, whatever the
    test process inherited or set (an ignored SIGINT survives exec, and Python then keeps
    ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def threads_of(pid: int) -> set[int]:
    task = f"/proc/{pid}/task"
    return {int(t) for t in os.listdir(task)} if os.path.isdir(task) else set()


def takes_sigint(pid: int, tid: int) -> bool:
    """Whether thread tid of pid leaves SIGINT unblocked (the kernel may deliver it there)."""
    for line in open(f"/proc/{pid}/task/{tid}/status"):
        if line.startswith("SigBlk:"):
            return not int(line.split()[1], 16) & (1 << (signal.SIGINT - 1))
    return False


def interrupt_a_helper_thread(pid: int, lasting: set[int]) -> None:
    """Ctrl-C as the kernel may deliver it: to one of the process's other threads (Linux's
    tgkill aims it there; elsewhere the signal goes to the process). The relay must stop either
    way. ``lasting``: threads the process had before any connection; once the closed
    connection's threads are gone, the signal goes to one of those (one aimed at a thread that
    is exiting would be lost with it)."""
    tgkill = getattr(ctypes.CDLL(None), "tgkill", None) if lasting else None
    deadline = time.monotonic() + 10
    while tgkill is not None and time.monotonic() < deadline:
        if threads_of(pid) == lasting:
            targets = [t for t in sorted(lasting) if t != pid and takes_sigint(pid, t)]
            if targets and tgkill(pid, targets[0], int(signal.SIGINT)) == 0:
                return
            break
        time.sleep(0.02)
    os.kill(pid, signal.SIGINT)


# ---- federated training over shaped links -----------------------------------------------------------

CASES = {
    # (link, model): syncs of ~1.5 s where the link, not the 2-core machine, sets the time
    "100ms-100mbit": dict(delay_ms=100, rate_mbit=100, loss=0.0, model=dict(d_model=128, d_ff=256)),
    "50ms-100mbit-1%loss": dict(delay_ms=50, rate_mbit=100, loss=0.01, model=dict(d_model=64, d_ff=128)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_over_shaped_links_matches_the_system_model(name):
    case = dict(CASES[name], workers=3, placement="replicated:2", steps=6, sync_every=2)
    if name.endswith("loss"):
        # timeouts from the schedule and the link (fomoe.plan.tcp_options) instead of the defaults
        p = plan.Plan(plan.ModelShape.from_lm_config(lm_config(**case["model"])),
                      plan.Federation(workers=3, placement="replicated:2"),
                      link=plan.Link(bandwidth_gbps=0.1, latency_ms=50, loss=0.01))
        case["options"] = plan.tcp_options(p.buckets("fomoe"), 3, p.link)
    out = run_over_relays(case, timeout_s=240)
    results = out["results"]
    # training completed on every worker with finite losses and parameters
    for r in results:
        assert len(r["losses"]) == case["steps"] and len(r["syncs"]) == case["steps"] // case["sync_every"]
        assert r["finite"] and all(map(lambda x: x == x and abs(x) < 1e3, r["losses"]))
        # the schedule the workers ran is the one the system model priced, byte for byte
        assert r["buckets"] == out["plan_buckets"]
        for s in r["syncs"]:
            assert (s["wire_sent"], s["wire_recv"]) == tuple(r["expected"])
            assert s["bytes_sent"] == r["expected"][0]
    if case["loss"]:
        assert out["segments_lost"] > 0
    # measured sync wall time (last worker in -> last worker out) within 25% of the model
    assert 0.75 <= out["ratio"] <= 1.25, (out["measured"], out["predicted"])


# ---- timeouts that follow the link ---------------------------------------------------------------------

GRID = [(d, bw, loss) for d in (50, 100, 200) for bw in (100, 1000) for loss in (0.0, 0.01)]
# bench/link_experiment.py's models: lossless links, lossy links (syncs of seconds either way)
BENCH_MODELS = {False: dict(d_model=256, d_ff=512), True: dict(d_model=64, d_ff=128)}


def _message_seconds(p: plan.Plan) -> list[tuple[float, float]]:
    """(bytes, modelled seconds) of every single ring message of the schedule."""
    out = []
    for c in p.bucket_costs("fomoe"):
        for nbytes, msgs in zip(c.link_bytes, c.messages):
            if msgs:
                out.append((nbytes / msgs, p.link.transfer_seconds(nbytes / msgs, 1)))
    return out


def test_default_transport_timeouts_cover_the_rehearsal_grid():
    from fomoe.tcp import TcpOptions
    defaults = TcpOptions()
    for d, bw, loss in GRID:
        for model in [BENCH_MODELS[loss > 0]]:
            p = plan.Plan(plan.ModelShape.from_lm_config(lm_config(**model)),
                          plan.Federation(workers=3, placement="replicated:2"),
                          link=plan.Link(bandwidth_gbps=bw / 1e3, latency_ms=d, loss=loss))
            for nbytes, seconds in _message_seconds(p):
                assert 4 * seconds < defaults.transfer_deadline_s(int(nbytes)), (d, bw, loss, nbytes, seconds)
            # the longest silence of a healthy peer (one loss stall) is far below the peer timeout
            assert 2 * d / 1e3 * 4 < defaults.peer_timeout_s


def test_proposed_timeouts_scale_with_model_and_link():
    from fomoe.tcp import TcpOptions
    big = plan.preset("mixtral-8x7b").plan(workers=4, placement="replicated:2")
    for d, bw, loss in GRID:
        p = big.with_(bandwidth_gbps=bw / 1e3, latency_ms=d, loss=loss)
        options = TcpOptions(**plan.tcp_options(p.buckets("fomoe"), p.workers, p.link, compute_seconds=600))
        for nbytes, seconds in _message_seconds(p):
            assert options.transfer_deadline_s(int(nbytes)) >= 4 * seconds
        assert options.stall_timeout_s >= 4 * (600 + p.comm_seconds("fomoe"))
    # where the defaults would cut a healthy run: a big model's messages on a lossy long link
    # move at ~2.8 Mbit/s in this model, below the default 10 Mbit/s floor of the deadline
    lossy = big.with_(bandwidth_gbps=1.0, latency_ms=200, loss=0.01)
    nbytes, seconds = max(_message_seconds(lossy))
    assert seconds > TcpOptions().transfer_deadline_s(int(nbytes))
    proposed = TcpOptions(**plan.tcp_options(lossy.buckets("fomoe"), lossy.workers, lossy.link))
    assert proposed.transfer_deadline_s(int(nbytes)) >= 4 * seconds
    assert proposed.min_bandwidth_mbps == pytest.approx(
        SEGMENT_BYTES * 8 / (SEGMENT_BYTES * 8 / 1e9 + 0.01 * 0.4) / 1e6 / 4)
    with pytest.raises(plan.PlanError, match="margin"):
        plan.tcp_options(lossy.buckets("fomoe"), lossy.workers, lossy.link, margin=0.5)
