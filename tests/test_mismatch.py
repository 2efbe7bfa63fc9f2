"""Mismatched workers are refused at start: every worker raises, quickly, with a message that
names each differing field by its path and gives both workers' values.

Kinds of difference: code version, model configuration, expert placement, data configuration
and sync configuration; tested where users meet them (the training worker ``fomoe.train
.run_worker``, the ``SyncManager``) and in the TCP transport's handshake. Each scenario runs in
real worker processes (``fomoe.launch.spawn``, gloo); rank 1 differs from rank 0.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from fomoe import MoE, MoEConfig, launch
from fomoe.placement import Placement
from fomoe.sync import ParamLayout
from fomoe.train import TrainConfig

OTHER_CODE = "fomoe 9.9.9 (sources 0123456789ab), torch 0.0"
FAIL_WITHIN_S = 20.0   # a refused start takes well under this; a hang would take the spawn's timeout


def _assert_names(message: str, differences) -> None:
    """``message`` says rank 1 has path=value1 and rank 0 has path=value0 for every difference."""
    assert re.search(r"rank 1 has .* where rank 0 has ", message), message
    mine, theirs = message.split(" where rank 0 has ", 1)
    for path, value1, value0 in differences:
        assert f"{path}={value1!r}" in mine, (path, message)
        assert f"{path}={value0!r}" in theirs, (path, message)


def _check_every_worker(results: dict, name: str, what: str, differences=None, pattern: str | None = None):
    messages = []
    for rank, out in enumerate(results):
        got = out[name]
        assert got is not None, f"rank {rank} started the {name!r} run although rank 1 differs"
        kind, message, seconds = got
        assert seconds < FAIL_WITHIN_S, f"rank {rank} took {seconds:.1f} s to refuse"
        assert message.startswith(f"workers disagree on the {what}: ") or f"invalid {what}" in message, message
        if differences is not None:
            _assert_names(message, differences)
        if pattern is not None:
            assert re.search(pattern, message), (pattern, message)
        messages.append(message)
    assert len(set(messages)) == 1, "every worker reports the same difference"


# ---- the training entry point: fomoe.train.run_worker ---------------------------------------------------

def _corpus(root, files: int = 4, size: int = 400, letter: int = 97):
    for p in range(2):
        for f in range(files):
            path = root / f"pkg{p}" / f"mod{f}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes([letter + p + f]) * (size + 13 * f))
    return root


def _base_config(tmp, data) -> dict:
    # Tiny on purpose: a difference that slipped through would train two steps, not hang for minutes.
    cfg = TrainConfig(workers=2, preset="tiny", model={"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4,
                                                       "top_k": 2, "d_ff": 32},
                      steps=2, sync_every=1, batch_size=2, seq_len=16, eval_batches=1, data=[data],
                      out=str(tmp / "run"), progress=False, threads=1, warmup_steps=1, timeout_s=60)
    return cfg.resolved().to_dict()


@dataclass
class TrainCase:
    rank1: dict = field(default_factory=dict)     # rank 1's TrainConfig overrides (model: merged)
    patch: str | None = None                      # a difference outside the TrainConfig (see _patch)
    differences: list = field(default_factory=list)
    pattern: str | None = None


TRAIN_CASES = {
    "code_version": TrainCase(patch="code", pattern=r"rank 1 has code='fomoe 9\.9\.9 .* where rank 0 has code='fomoe "),
    "model_d_model": TrainCase({"model": {"d_model": 16}}, differences=[("train.model.d_model", 16, 32)]),
    "model_num_experts": TrainCase({"model": {"num_experts": 8}}, differences=[("train.model.num_experts", 8, 4)]),
    "model_top_k": TrainCase({"model": {"top_k": 1}}, differences=[("train.model.top_k", 1, 2)]),
    "model_preset": TrainCase({"preset": "small"}, differences=[("train.preset", "small", "tiny")]),
    "placement_spec": TrainCase({"placement": "partition"},
                                differences=[("train.placement", "partition", "replicated:2")]),
    # Same spec and seed, but rank 1 computes another map (as a different placement algorithm would).
    "placement_map": TrainCase(patch="placement", pattern=r"rank 1 has placement='[0-9a-f]{16}' where rank 0 has "
                                                          r"placement='[0-9a-f]{16}'"),
    "seed": TrainCase({"seed": 1}, differences=[("train.seed", 1, 0)]),
    "data_source": TrainCase({"data": ["elsewhere"]}, patch="data_elsewhere",
                             differences=[("train.data", ["elsewhere"], ["corpus"])]),
    "data_seq_len": TrainCase({"seq_len": 8}, differences=[("train.seq_len", 8, 16)]),
    "data_iid": TrainCase({"iid": True}, differences=[("train.iid", True, False)]),
    "data_batch_size": TrainCase({"batch_size": 3}, differences=[("train.batch_size", 3, 2)]),
    # Same (relative) path, other files behind it: what two sites with different copies see.
    "data_content": TrainCase(patch="data_content", pattern=r"rank 1 has data[.=].* where rank 0 has data[.=]"),
    "sync_every": TrainCase({"sync_every": 2, "eval_every": 2, "ckpt_every": 2},
                            differences=[("train.sync_every", 2, 1)]),
    "outer_lr": TrainCase({"outer_lr": 0.5}, differences=[("train.outer_lr", 0.5, 0.7)]),
    "method": TrainCase({"method": "diloco", "placement": "full"},
                        differences=[("train.method", "diloco", "fomoe"), ("train.placement", "full", "replicated:2")]),
    "compression": TrainCase({"compression": "int8"}, differences=[("train.compression", "int8", None)]),
}


def _patch(name: str | None, rank: int, tmp: str, cfg: dict):
    """Apply a difference that is not in the TrainConfig; returns the undo."""
    from fomoe import comm
    from fomoe.placement import Placement as P
    if name == "code" and rank == 1:
        saved = comm._code_fingerprint[0]
        comm._code_fingerprint[0] = OTHER_CODE
        return lambda: comm._code_fingerprint.__setitem__(0, saved)
    if name == "placement" and rank == 1:
        original = P.__dict__["from_spec"]

        def other_map(cls, spec, num_workers, num_experts, num_layers, seed=0):
            return P.replicated(num_workers, num_experts, num_layers, 1, mode="random", seed=seed)
        P.from_spec = classmethod(other_map)
        return lambda: setattr(P, "from_spec", original)
    if name in ("data_content", "data_elsewhere"):
        cwd = os.getcwd()
        os.chdir(os.path.join(tmp, f"site{rank}"))
        return lambda: os.chdir(cwd)
    return lambda: None


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _train_cases(ctx, base: dict, tmp: str, names):
    from fomoe.train import run_worker
    out = {}
    for name in names:
        case = TRAIN_CASES[name]
        cfg = _merge(base, case.rank1) if ctx.rank == 1 else copy.deepcopy(base)
        if case.patch == "data_content" or (case.patch == "data_elsewhere" and ctx.rank == 0):
            cfg["data"] = ["corpus"]   # relative: each rank runs in its own site directory
        undo = _patch(case.patch, ctx.rank, tmp, cfg)
        out[name] = _refusal(lambda: run_worker(ctx, cfg), undo)
    return out


def _refusal(run, undo) -> tuple | None:
    """None when ``run()`` went through, else (exception type, message, seconds until refused)."""
    t0 = time.monotonic()
    try:
        run()
        return None
    except ValueError as exc:
        return (type(exc).__name__, str(exc), time.monotonic() - t0)
    finally:
        undo()


@pytest.fixture(scope="module")
def train_refusals(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mismatch")
    for site in (0, 1):
        _corpus(tmp / f"site{site}" / "corpus", files=4 + site)   # site 1's copy has more files
    _corpus(tmp / "site1" / "elsewhere")
    base = _base_config(tmp, str(tmp / "site0" / "corpus"))
    t0 = time.monotonic()
    out = launch.spawn(_train_cases, 2, backend="gloo", timeout_s=90, args=(base, str(tmp), list(TRAIN_CASES)))
    return out, time.monotonic() - t0


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_training_workers_that_differ_are_refused_on_every_worker(train_refusals, name):
    out, _ = train_refusals
    case = TRAIN_CASES[name]
    _check_every_worker(out, name, "training configuration", case.differences or None, case.pattern)
    for rank in range(2):
        assert out[rank][name][0] == "ValueError"


def test_training_refusal_names_how_the_data_differs(train_refusals):
    out, _ = train_refusals
    for rank in range(2):
        message = out[rank]["data_content"][1]
        assert re.search(r"data\.documents=\d+", message) and re.search(r"data\.tokens=\d+", message), message


# A failure on one worker before the agreement (its data is missing, it was started with another
# worker count) must reach every worker, not leave the others waiting for the rest of the run's
# timeout. Today the others wait; spawn's grace period ends them.
LOCAL_FAILURES = {
    "missing_data": ({"data": ["no-such-corpus"]}, "no-such-corpus"),
    "worker_count": ({"workers": 3}, "configured for 3 workers but 2 were started"),
}


def _one_train_run(ctx, cfg_by_rank):
    from fomoe.train import run_worker
    run_worker(ctx, cfg_by_rank[ctx.rank])


@pytest.mark.parametrize("name", list(LOCAL_FAILURES))
def test_a_local_failure_before_the_agreement_fails_every_worker(tmp_path, name):
    _corpus(tmp_path / "corpus")
    base = _base_config(tmp_path, str(tmp_path / "corpus"))
    over, text = LOCAL_FAILURES[name]
    t0 = time.monotonic()
    with pytest.raises(launch.WorkerError) as info:
        launch.spawn(_one_train_run, 2, backend="gloo", timeout_s=60, grace_s=4, args=([base, {**base, **over}],))
    assert time.monotonic() - t0 < 30
    for rank in range(2):
        assert text in info.value.failures[rank], f"rank {rank}: {info.value.failures[rank][-300:]}"


def _resume_on_rank_1(ctx, cfg):
    from fomoe.train import run_worker
    run_worker(ctx, cfg, ctx.rank == 1)


def test_resuming_next_to_a_fresh_start_is_refused(tmp_path):
    _corpus(tmp_path / "corpus")
    cfg = _base_config(tmp_path, str(tmp_path / "corpus"))
    with pytest.raises(launch.WorkerError) as info:   # today: both wait until this timeout
        launch.spawn(_resume_on_rank_1, 2, backend="gloo", timeout_s=8, grace_s=2, args=(cfg,))
    for rank in range(2):
        assert "resume=True where rank 0 has resume=False" in info.value.failures[rank], info.value.failures[rank][-300:]


# ---- the SyncManager directly -----------------------------------------------------------------------------

class _Net(nn.Module):
    """Embedding -> two fomoe.MoE layers -> head, every worker from the same seed."""

    def __init__(self, d_model=16, num_experts=4, top_k=2, placement=None, rank=0, seed=0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, d_model)
        self.head = nn.Linear(d_model, 32)
        self.blocks = nn.ModuleList(
            MoE(MoEConfig(d_model=d_model, d_ff=8, num_experts=num_experts, top_k=top_k, init_seed=1000 * seed + l,
                          resident_experts=None if placement is None else placement.resident(rank, l)))
            for l in range(2))


BASE_PLACEMENT = Placement.replicated(2, 4, 2, 1, mode="random", seed=0)
SYNC_BASE = {"method": "fomoe", "sync_every": 4, "placement": BASE_PLACEMENT, "outer_lr": 0.7}


@dataclass
class SyncCase:
    model: dict = field(default_factory=dict)     # rank 1's model differences
    sync: dict = field(default_factory=dict)      # rank 1's SyncManager differences
    patch: str | None = None


SYNC_CASES = {
    "code_version": SyncCase(patch="code"),
    "model_d_model": SyncCase(model={"d_model": 24}),
    "model_num_experts": SyncCase(model={"num_experts": 8}),
    "model_top_k": SyncCase(model={"top_k": 1}),
    "placement_seed": SyncCase(sync={"placement": Placement.replicated(2, 4, 2, 1, mode="random", seed=3)}),
    "placement_spec": SyncCase(sync={"placement": Placement.partition(2, 4, 2)}),
    "sync_every": SyncCase(sync={"sync_every": 8}),
    "outer_lr": SyncCase(sync={"outer_lr": 0.5}),
    "method": SyncCase(sync={"method": "diloco", "placement": Placement.full(2, 4, 2)}),
    "compression": SyncCase(sync={"compression": "bf16"}),
    "identical": SyncCase(),   # the control: nothing differs, the manager starts
}


def _sync_cases(ctx, names):
    from fomoe.sync import SyncManager
    out = {}
    for name in names:
        case = SYNC_CASES[name]
        sync = {**SYNC_BASE, **(case.sync if ctx.rank == 1 else {})}
        model_kw = case.model if ctx.rank == 1 else {}
        if "num_experts" in model_kw:   # a consistent worker of its own kind: the placement fits its model
            sync["placement"] = Placement.replicated(2, model_kw["num_experts"], 2, 1, mode="random", seed=0)
        undo = _patch(case.patch, ctx.rank, "", {})

        def start(sync=sync, model_kw=model_kw):
            model = _Net(placement=sync["placement"], rank=ctx.rank, **model_kw)
            SyncManager(model, torch.optim.SGD(model.parameters(), lr=0.1), rank=ctx.rank, world_size=2, **sync)
        out[name] = _refusal(start, undo)
    return out


@pytest.fixture(scope="module")
def sync_refusals():
    return launch.spawn(_sync_cases, 2, backend="gloo", timeout_s=90, args=(list(SYNC_CASES),))


def _layout(**model_kw) -> ParamLayout:
    return ParamLayout.from_model(_Net(**model_kw))


def test_sync_manager_refuses_other_code(sync_refusals):
    _check_every_worker(sync_refusals, "code_version", "sync configuration",
                        pattern=r"rank 1 has code='fomoe 9\.9\.9 .*' where rank 0 has code='fomoe ")


def test_sync_manager_refuses_another_model_shape(sync_refusals):
    # The manager sees parameters, not the model's config: it names the sizes that differ.
    wide, base = _layout(d_model=24), _layout()
    _check_every_worker(sync_refusals, "model_d_model", "sync configuration",
                        [("dense_numel", wide.dense_numel, base.dense_numel)])
    more = Placement.replicated(2, 8, 2, 1, mode="random", seed=0)
    _check_every_worker(sync_refusals, "model_num_experts", "sync configuration",
                        [("placement", more.fingerprint(), BASE_PLACEMENT.fingerprint())])


def test_sync_manager_refuses_another_top_k(sync_refusals):
    _check_every_worker(sync_refusals, "model_top_k", "sync configuration", pattern=r"top_k=1.* where rank 0 has .*top_k=2")


def test_sync_manager_refuses_another_placement(sync_refusals):
    for name in ("placement_seed", "placement_spec"):
        other = SYNC_CASES[name].sync["placement"]
        assert other != BASE_PLACEMENT
        _check_every_worker(sync_refusals, name, "sync configuration",
                            [("placement", other.fingerprint(), BASE_PLACEMENT.fingerprint())])


def test_sync_manager_refuses_another_sync_configuration(sync_refusals):
    _check_every_worker(sync_refusals, "sync_every", "sync configuration", [("sync_every", 8, 4)])
    _check_every_worker(sync_refusals, "outer_lr", "sync configuration", [("outer_lr", 0.5, 0.7)])
    full = Placement.full(2, 4, 2)
    _check_every_worker(sync_refusals, "method", "sync configuration",
                        [("method", "diloco", "fomoe"), ("placement", full.fingerprint(), BASE_PLACEMENT.fingerprint())])
    _check_every_worker(sync_refusals, "compression", "sync configuration", [("compression", "bf16", None)])


def test_identical_workers_start(sync_refusals):
    assert [out["identical"] for out in sync_refusals] == [None, None]


def test_agreement_message_stays_short():
    from fomoe import comm
    long = {"a_holders": list(range(5000)), **{f"f{i}": i for i in range(20)}}
    other = {"a_holders": list(range(1, 5001)), **{f"f{i}": i + 1 for i in range(20)}}
    diff = comm._differences(other, long)
    assert len(diff) == 21
    with pytest.raises(ValueError) as info:
        _fake_agree(comm, {0: long, 1: other})
    message = str(info.value)
    assert len(message) < 3000 and "(and 13 more differences)" in message
    assert "f0=1" in message and "f0=0" in message and "…" in message


def _fake_agree(comm, configs: dict):
    """comm.agree over a control plane that hands back the given configurations."""
    class Plane:
        def live_ranks(self):
            return tuple(configs)

        def gather_text(self, tag, text):
            code = json.loads(text)["config"]["code"]
            return {r: json.dumps({"config": {"code": code, **c}, "error": None}) for r, c in configs.items()}
    comm.set_control_plane(Plane())
    try:
        comm.agree("test", configs[0])
    finally:
        comm.set_control_plane(None)


# ---- the TCP transport --------------------------------------------------------------------------------------

tcp = pytest.importorskip("fomoe.tcp")


def _start(fn, *args):
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 (the test inspects it)
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _addresses(n):
    return [f"127.0.0.1:{launch.free_port()}" for _ in range(n)]


def test_tcp_handshake_refuses_a_peer_with_another_world_size():
    opts = tcp.TcpOptions(connect_timeout_s=3, handshake_timeout_s=2)
    peers = _addresses(3)
    t0, r0 = _start(lambda: tcp.TcpTransport(0, 2, token="t", peers=peers[:2], options=opts, control_plane=False))
    t1, r1 = _start(lambda: tcp.TcpTransport(1, 3, token="t", peers=peers, options=opts, control_plane=False))
    t0.join(15)
    t1.join(15)
    for box in (r0, r1):
        if "value" in box:
            box["value"].close()
    assert isinstance(r1.get("error"), tcp.HandshakeError), r1
    assert "this run has 2 workers" in str(r1["error"]) and "rank 1 of 3" in str(r1["error"])
    assert isinstance(r0.get("error"), tcp.HandshakeError), r0
    assert "claims rank 1 of 3 workers" in str(r0["error"])


@pytest.fixture(scope="module")
def protocol_mismatch():
    """A real worker against a peer speaking another protocol version, both ways round."""
    opts = tcp.TcpOptions(connect_timeout_s=3, handshake_timeout_s=2)
    peers = _addresses(2)
    host, port = tcp.parse_address(peers[0])
    newer = {"protocol": "fomoe-tcp/2", "world": 2, "inc": 1, "nonce": "00" * 32, "proof": "0"}

    # A newer rank 0 listening; the real rank 1 dials it.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.recv(4096)
        conn.sendall((json.dumps({**newer, "rank": 0}) + "\n").encode())
        time.sleep(0.5)
        conn.close()
    threading.Thread(target=answer, daemon=True).start()
    t1, r1 = _start(lambda: tcp.TcpTransport(1, 2, token="t", peers=peers, options=opts, control_plane=False))
    t1.join(15)
    server.close()

    # The real rank 0 listening; a newer rank 1 dials it.
    peers = _addresses(2)
    t0, r0 = _start(lambda: tcp.TcpTransport(0, 2, token="t", peers=peers, options=opts, control_plane=False))
    time.sleep(0.3)
    with socket.create_connection(tcp.parse_address(peers[0]), timeout=5) as client:
        client.sendall((json.dumps({**newer, "rank": 1}) + "\n").encode())
        try:
            reply = client.recv(4096).decode()
        except OSError:
            reply = ""
    t0.join(15)
    return r0, r1, reply


def test_tcp_handshake_refuses_another_protocol_version(protocol_mismatch):
    r0, r1, _ = protocol_mismatch
    assert isinstance(r1.get("error"), tcp.HandshakeError), r1
    assert "speaks 'fomoe-tcp/2', not fomoe-tcp/1" in str(r1["error"])
    assert isinstance(r0.get("error"), tcp.HandshakeError), r0
    assert "ranks [1] did not connect" in str(r0["error"]) and "fomoe-tcp/1" in str(r0["error"])


def test_tcp_refusal_of_another_protocol_names_both_versions(protocol_mismatch):
    r0, _, reply = protocol_mismatch
    assert "fomoe-tcp/2" in str(r0["error"]) and "fomoe-tcp/1" in reply


def _tcp_agreement(ctx):
    from fomoe.sync import SyncManager
    transport = tcp.TcpTransport(ctx.rank, 2, token="run-token", control_plane=True)
    try:
        model = _Net()
        try:
            SyncManager(model, torch.optim.SGD(model.parameters(), lr=0.1), method="diloco", sync_every=2 + ctx.rank,
                        rank=ctx.rank, world_size=2, transport=transport)
        except ValueError as exc:
            return str(exc)
        return None
    finally:
        transport.close()


def test_agreement_over_the_tcp_control_plane():
    out = launch.spawn(_tcp_agreement, 2, backend="gloo", timeout_s=60)
    for message in out:
        assert message is not None
        _assert_names(message, [("sync_every", 3, 2)])


def test_differences_are_named_by_path():
    from fomoe.comm import _differences
    mine = {"model": {"d": 8, "layers": [{"top_k": 1}, {"top_k": 2}]}, "data": ["a"], "only_here": 1}
    ref = {"model": {"d": 8, "layers": [{"top_k": 2}, {"top_k": 2}]}, "data": ["b"]}
    assert _differences(mine, ref) == [("data", ["a"], ["b"]), ("model.layers[0].top_k", 1, 2),
                                       ("only_here", 1, "<missing>")]
    assert _differences({"layers": [{"k": 1}]}, {"layers": [{"k": 1}, {"k": 2}]}) == [
        ("layers", [{"k": 1}], [{"k": 1}, {"k": 2}])]
    assert _differences(mine, mine) == []
