"""Faults during federated training over the TCP transport, with real processes, sockets and
signals: a worker SIGKILLed mid-run (the others finish without it and lose no parameter, or stop
with a checkpoint when an expert would be lost), a frozen worker found by the heartbeat timeout,
a restarted worker rejoining from its peers' state, and broken updates (NaN, Inf, absurdly
large) dropped for their round. Every averaged update after a fault is checked against the mean
of the live contributions recorded by the workers themselves."""

from __future__ import annotations

import io
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from fomoe import checkpoint, launch
from fomoe.launch import DistContext, Failed
from fomoe.placement import Placement

sys.path.insert(0, str(Path(__file__).parent))
import reliability_workers as rw  # noqa: E402

TOKEN = "test-run-token"


def _spec(placement: Placement, run_dir, **kw) -> dict:
    spec = {"token": TOKEN, "placement": placement.to_json(), "steps": 16, "sync_every": 2, "peer_timeout_s": 3.0,
            "run_dir": str(run_dir), "record": True}
    spec.update(kw)
    return spec


def _run(spec: dict, world: int = 4, **kw) -> list:
    return launch.spawn(rw.ft_worker, world, backend="gloo", args=(spec,), timeout_s=150, tolerate_failures=True, **kw)


def _check_averages_against_contributions(results: list, dropped: dict | None = None) -> int:
    """Every averaged update equals the mean of the contributions its live members packed for
    that round (``reliability_workers.average_mismatches``). Returns how many were checked."""
    checked, bad = rw.average_mismatches(results, dropped)
    assert not bad, bad[:5]
    return checked


def _check_no_parameter_lost(survivors: list, placement: Placement) -> int:
    """Every expert and the dense parameters live on some survivor; holders agree bitwise."""
    seen = {}
    for res in survivors:
        for key, value in res["theta"].items():
            if key in seen:
                assert torch.equal(seen[key], value), f"holders disagree on {key}"
            seen[key] = value
    for l in range(placement.num_layers):
        for e in range(placement.num_experts):
            assert f"blocks.{l}.experts.{e}.w13" in seen, f"layer {l} expert {e} was lost"
    return sum(v.numel() for v in seen.values())


# ---- a worker killed: replication 2 continues, replication 1 stops cleanly -----------------------

@pytest.fixture(scope="module")
def killed_mid_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("killed")
    p = Placement.replicated(4, 4, 2, 2)
    # Rank 1 SIGKILLs itself after inner step index 4 (inner_step 5, between rounds 1 and 2: its
    # round-2 update is never sent, so the survivors run round 2 without it).
    results = _run(_spec(p, run_dir, kill_at={"1": 4}))
    return p, results


def test_survivors_finish_and_lose_no_parameter(killed_mid_run):
    p, results = killed_mid_run
    assert isinstance(results[1], Failed) and results[1].exitcode == -signal.SIGKILL
    survivors = [r for r in results if not isinstance(r, Failed)]
    assert [r["status"] for r in survivors] == ["finished"] * 3
    assert all(r["round"] == 8 and r["live"] == [0, 2, 3] for r in survivors)
    assert all(r["finite"] for r in survivors)
    _check_no_parameter_lost(survivors, p)


def test_survivors_agree_on_the_loss_and_detect_it_at_once(killed_mid_run):
    _, results = killed_mid_run
    survivors = [r for r in results if not isinstance(r, Failed)]
    for res in survivors:
        changes = [e for e in res["events"] if e["event"] == "membership"]
        assert len(changes) == 1 and changes[0]["lost"] == [1] and changes[0]["live"] == [0, 2, 3]
        assert changes[0]["round"] == 2       # the round it died in is run again without it
    detected = [d["detected_at"] for r in survivors for e in r["transport_events"] if e["event"] == "membership"
                for d in e["details"].values() if d["detected_at"]]
    assert detected, "no survivor saw the connection close"


def test_rounds_after_the_loss_average_exactly_the_live_holders(killed_mid_run):
    _, results = killed_mid_run
    survivors = [r for r in results if not isinstance(r, Failed)]
    # Every survivor's every bucket of rounds 2..7 (after the loss) plus the earlier buckets
    # without rank 1: at least the dense bucket of each post-loss round on each survivor.
    after = sum(1 for r in survivors for a in r["averages"] if a["round"] >= 2)
    assert after >= 3 * 6 * 2
    assert _check_averages_against_contributions(survivors) >= after
    # After the loss every round moves exactly what the schedule over the live holders predicts.
    for res in survivors:
        for rec in res["history"][3:]:
            assert (rec["bytes_sent"], rec["bytes_recv"]) == tuple(res["expected_traffic"])
            assert (rec["wire_sent"], rec["wire_recv"]) == tuple(res["expected_traffic"])


def test_losing_the_only_holder_of_an_expert_stops_with_a_checkpoint(tmp_path):
    p = Placement.partition(3, 3, 2)
    results = _run(_spec(p, tmp_path, kill_at={"2": 4}, record=False), world=3)
    assert isinstance(results[2], Failed)
    for res in results[:2]:
        assert res["status"].startswith("stopped: 2 experts (layer 0 expert 2, layer 1 expert 2) were held only by "
                                        "lost workers (lost ranks [2]; live ranks [0, 1])"), res["status"]
        assert res["finite"]
    step = checkpoint.latest_step(tmp_path)
    assert step == 4
    manifest = checkpoint.read_manifest(checkpoint.checkpoints_dir(tmp_path) / f"step-{step:08d}")
    assert manifest["lost_ranks"] == [2] and sorted(manifest["shards"]) == ["0", "1"]
    with pytest.raises(checkpoint.CheckpointError, match="lacks 2 experts"):
        checkpoint.export_full_model(tmp_path, tmp_path / "full.safetensors")


# ---- a frozen worker: found by the heartbeat timeout, excluded ------------------------------------

def test_a_frozen_worker_is_detected_by_the_timeout_and_excluded(tmp_path):
    p = Placement.replicated(3, 3, 2, 2)
    spec = _spec(p, tmp_path, steps=30, step_s=0.1, peer_timeout_s=2.0, record=False)
    results = _run(spec, world=3, on_start=rw.timed_killer(str(tmp_path), 2, 0.7, signal.SIGSTOP, world=3, thaw_s=6.0))
    killed = json.loads((tmp_path / "killed").read_text())
    survivors = [r for r in results if not isinstance(r, Failed) and r["status"] == "finished"]
    assert [r["rank"] for r in survivors] == [0, 1]
    for res in survivors:
        change = next(e for e in res["transport_events"] if e["event"] == "membership")
        detail = change["details"][2]
        assert "no message or heartbeat" in detail["reason"] or "reported lost" in detail["reason"]
        assert change["time"] - killed["time"] < 2.0 + 3.0     # timeout + a heartbeat period + slack
    detected = [e["details"][2]["detected_at"] for r in survivors for e in r["transport_events"]
                if e["event"] == "membership" and e["details"][2]["detected_at"]]
    assert detected and 1.9 < min(detected) - killed["time"] < 2.0 + 1.5
    thawed = results[2]
    assert not isinstance(thawed, Failed) and thawed["status"].startswith("excluded"), thawed
    _check_no_parameter_lost(survivors, p)


# ---- a restarted worker rejoins from its peers -----------------------------------------------------

def _joiner(spec: dict, rank: int, world: int, delay_s: float, out) -> None:
    time.sleep(delay_s)
    ctx = DistContext(rank, world, rank, world, "gloo", torch.device("cpu"))
    try:
        result = rw.ft_worker(ctx, {**spec, "join": True, "kill_at": {}})
    except BaseException as exc:  # noqa: BLE001
        import traceback
        result = {"error": traceback.format_exc() + repr(exc)}
    # As bytes: tensors put on a queue as they are would be shared through this process's file
    # descriptors, which are gone once it exits (before the parent reads the queue).
    buf = io.BytesIO()
    torch.save(result, buf)
    out.put(buf.getvalue())


def test_a_restarted_worker_rejoins_from_its_peers_state(tmp_path):
    import multiprocessing as mp
    p = Placement.replicated(4, 4, 2, 2)
    ports = [launch.free_port() for _ in range(4)]
    spec = _spec(p, tmp_path, steps=40, step_s=0.05, kill_at={"1": 5},
                 peers=[f"127.0.0.1:{port}" for port in ports])
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    joiner = ctx.Process(target=_joiner, args=(spec, 1, 4, 1.5, out))

    def start_joiner(procs):
        joiner.start()

    results = _run(spec, on_start=start_joiner)
    rejoined = torch.load(io.BytesIO(out.get(timeout=120)), weights_only=False)
    joiner.join(timeout=30)
    assert "error" not in rejoined, rejoined.get("error")
    survivors = [r for r in results if not isinstance(r, Failed)]
    everyone = survivors + [rejoined]
    assert sorted(r["rank"] for r in everyone) == [0, 1, 2, 3]
    assert all(r["status"] == "finished" and r["round"] == 20 and r["live"] == [0, 1, 2, 3] for r in everyone)
    _check_no_parameter_lost(everyone, p)          # the joiner's experts equal their co-holders', bitwise
    joined = [e for e in rejoined["events"] if e["event"] == "joined"]
    assert len(joined) == 1 and 3 < joined[0]["round"] < 20
    assert rejoined["started_at"] == joined[0]["step"]
    for res in survivors:
        changes = [e for e in res["events"] if e["event"] == "membership"]
        assert [c["lost"] for c in changes] == [[1], []] and [c["joined"] for c in changes] == [[], [1]]
    # The joiner's first round counts only the others' updates (it has none); later rounds everyone's.
    after = sum(1 for r in everyone for a in r["averages"] if a["round"] >= joined[0]["round"])
    assert after >= 4 * (20 - joined[0]["round"])
    assert _check_averages_against_contributions(everyone, _silent_rounds(everyone, rejoined)) >= after


def _silent_rounds(everyone: list, rejoined: dict) -> dict:
    """The buckets of the round the joiner sat out (it joined while the others ran it again)."""
    first = next(e for e in rejoined["events"] if e["event"] == "joined")
    if not first["silent"]:
        return {}
    assert first["step"] == (first["round"] + 1) * 2     # it trains the round's inner steps after
    return {(a["round"], tuple(a["ranks"]), tuple(map(tuple, a["experts"]))): {rejoined["rank"]}
            for res in everyone for a in res["averages"] if a["round"] == first["round"]}


# ---- broken updates --------------------------------------------------------------------------------

def test_nan_inf_and_huge_updates_are_dropped_for_their_round(tmp_path):
    p = Placement.replicated(4, 4, 2, 2)
    inject = {"2": {"round": 1, "kind": "nan"}, "1": {"round": 3, "kind": "huge"}, "3": {"round": 5, "kind": "inf"}}
    results = _run(_spec(p, tmp_path, inject=inject))
    assert all(r["status"] == "finished" and r["finite"] for r in results)
    assert all(all(torch.isfinite(torch.tensor(list(r["losses"].values())))) for r in results)
    drops = {}
    for res in results:
        for e in res["events"]:
            if e["event"] == "dropped":
                for r, why in e["dropped"].items():
                    drops.setdefault((e["round"], int(r)), set()).add((res["rank"], why.split(" (")[0].split(" ")[0]))
    # Every member of every bucket the bad worker is in saw the same drop.
    assert {k: {w for _, w in v} for k, v in drops.items()} == {(1, 2): {"non-finite"}, (3, 1): {"update"},
                                                                  (5, 3): {"non-finite"}}
    assert {r for _, v in drops.items() for r, _ in v} == {0, 1, 2, 3}
    assert _check_averages_against_contributions(results, rw.dropped_contributions(results)) > 0
    _check_no_parameter_lost(results, p)
