"""`fomoe train` end to end on real worker processes (gloo), and the driver's pieces."""

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fomoe.cli import main
from fomoe.lm import LMConfig, MoELM
from fomoe.placement import Placement
from fomoe.train import RoutingMonitor, TrainConfig, learning_rate

ROOT = Path(__file__).resolve().parents[1]
# A small model and short sequences: a run of 20 steps on 2 workers takes seconds.
SMALL = ["--d-model", "32", "--layers", "2", "--heads", "2", "--experts", "4", "--top-k", "2", "--d-ff", "64",
         "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2", "--lr", "0.005", "--warmup-steps", "2",
         "--no-progress"]
REQUIRED = ("step", "tokens", "loss", "tokens_per_s", "bytes_sent", "bytes_recv")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trajectory(lines: list[dict]) -> list[tuple]:
    """What must not change when a run is interrupted and resumed (timings aside)."""
    keep = ("loss", "eval_loss", "bytes_sent", "bytes_recv", "expert_load", "router_drift", "aux_loss")
    return [(m["kind"], m["step"], tuple((k, json.dumps(m.get(k))) for k in keep)) for m in lines]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    rc = main(["train", "--workers", "2", "--placement", "partition", "--steps", "20", "--sync-every", "5",
               "--eval-every", "5", "--ckpt-every", "5", "--out", str(out), *SMALL])
    assert rc == 0
    return out


def test_train_end_to_end(straight_run):
    lines = read_metrics(straight_run)
    for m in lines:
        assert all(k in m for k in REQUIRED), m
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 5, 10, 15, 20]
    # The untrained model is close to a uniform guess over 256 byte values (a little better: tied
    # embeddings favour repeating the current byte); training takes the loss well below it.
    assert math.log(256) - 0.6 < evals[0]["eval_loss"] < math.log(256) + 0.1
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert evals[-1]["eval_loss"] < evals[1]["eval_loss"] - 0.2
    train = [m for m in lines if m["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    syncs = [m for m in lines if m["kind"] == "sync"]
    assert len(syncs) == 4
    for s in syncs:
        assert 0 < s["load_entropy"] <= 1 and s["top1_kl"] >= 0 and s["router_drift"] > 0
        assert 0.2 < s["skipped_fraction"] < 0.8   # each worker holds 2 of the 4 experts
        assert all(abs(sum(row) - 1) < 1e-4 for row in s["expert_load"])
    # Bytes: cumulative, equal to the schedule's prediction (rounds x bytes per sync).
    summary = json.loads((straight_run / "summary.json").read_text())
    per_sync = [w["expected_bytes_per_sync"][0] for w in summary["workers_detail"]]
    assert syncs[-1]["bytes_sent"] == pytest.approx(4 * sum(per_sync) / 2)
    assert syncs[0]["bytes_sent"] < syncs[-1]["bytes_sent"]
    # The final line evaluates the exported model: it equals the consolidated model at step 20.
    final = lines[-1]
    assert final["kind"] == "final" and final["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert (straight_run / "model.safetensors").is_file()
    assert (straight_run / "checkpoints").is_dir() and any((straight_run / "checkpoints").iterdir())
    cfg = json.loads((straight_run / "config.json").read_text())
    assert cfg["train"]["placement"] == "partition" and cfg["model"]["num_experts"] == 4
    # State per worker: fp32 weights, gradients, two AdamW moments, θ_global, its gradient buffer and
    # the outer momentum of every parameter the worker holds, plus AdamW's 4-byte step per tensor.
    model_cfg, placement = LMConfig.from_dict(cfg["model"]), Placement.from_dict(cfg["placement"])
    for rank, worker in enumerate(summary["workers_detail"]):
        params = list(MoELM.from_placement(model_cfg, placement, rank).parameters())
        held = sum(p.numel() for p in params)
        assert worker["model_state_mib"] * 2 ** 20 == 7 * 4 * held + 4 * len(params)


def test_interrupted_run_resumes_exactly(straight_run, tmp_path):
    out = tmp_path / "resumed"
    args = ["train", "--workers", "2", "--placement", "partition", "--steps", "20", "--sync-every", "5",
            "--eval-every", "5", "--ckpt-every", "5", "--out", str(out), *SMALL]
    assert main([*args, "--stop-at", "10"]) == 0
    stopped = read_metrics(out)
    assert max(m["step"] for m in stopped) == 10 and not any(m["kind"] == "final" for m in stopped)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert trajectory(read_metrics(out)) == trajectory(read_metrics(straight_run))


def test_resume_refuses_changed_configuration(straight_run, capsys):
    assert main(["train", "--out", str(straight_run), "--resume", "--lr", "0.1", "--no-progress"]) == 2
    assert "--resume continues" in capsys.readouterr().err


def test_routing_monitor_matches_router_statistics():
    cfg = LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, num_experts=4, top_k=2, d_ff=8, max_seq_len=9)
    model = MoELM(cfg, resident_fn=lambda layer: [0, 1], seed=3)
    monitor = RoutingMonitor(model)
    batches = [torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    loads, skipped, top1 = [], [], torch.zeros(2, 4)
    for b in batches:
        model.loss(b)
        monitor.after_forward(b.shape[0] * (b.shape[1] - 1))
        loads.append(torch.stack([m.stats.expert_load for m in model.moe_layers()]))
        skipped.append(sum(float(m.stats.skipped_fraction) for m in model.moe_layers()) / 2)
        with torch.no_grad():  # top-1 expert from the router logits, recomputed here
            x = model.embed(b[:, :-1])
            for l, block in enumerate(model.blocks):
                x = x + block.attn(block.attn_norm(x), model.rope_cos[:8], model.rope_sin[:8])
                h = block.ffn_norm(x)
                top1[l] += torch.bincount((h @ block.moe.router.weight.T).argmax(-1).reshape(-1), minlength=4)
                x = x + block.moe(h)
    m = monitor.round_metrics()
    share = sum(loads) / 2
    torch.testing.assert_close(torch.tensor(m["expert_load"], dtype=torch.float32), share, atol=1e-5, rtol=0)
    entropy = (-(share * share.clamp_min(1e-30).log()).sum(-1) / math.log(4)).mean()
    assert m["load_entropy"] == pytest.approx(float(entropy), abs=1e-5)
    assert m["skipped_fraction"] == pytest.approx(sum(skipped) / 2, abs=1e-6)
    p = top1 / top1.sum(-1, keepdim=True)
    kl = (p * (p.clamp_min(1e-30) * 4).log()).sum(-1).mean()
    assert m["top1_kl"] == pytest.approx(float(kl), abs=1e-5)
    assert m["router_drift"] == 0.0   # no step taken: the routers did not move
    assert m["min_load_ratio"] == pytest.approx(float(share.min() * 4), abs=1e-5)


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.55)
    assert learning_rate(cfg, 110) == pytest.approx(0.1)


def test_torchrun_runs_one_worker_per_process(tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fomoe", "train", "--steps", "10", "--sync-every", "5", "--out", str(out), "--threads", "1", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = read_metrics(out)
    assert lines[-1]["kind"] == "final"
    assert json.loads((out / "summary.json").read_text())["workers"] == 2
    assert "held-out eval loss of the consolidated model" in proc.stdout


# ---- over the fault-tolerant TCP transport ------------------------------------------------------------

TCP = ["--transport", "tcp", "--peer-timeout", "3"]


def _kill_after_line(out: Path, victim: int, step: int, checkpointed: bool = False):
    """``on_start`` for ``train``: SIGKILL worker ``victim`` as soon as metrics.jsonl has a line of
    ``step`` or later (and, if ``checkpointed``, the checkpoint of that step is complete): the run
    is then mid-way through its next round."""
    import signal
    import threading
    import time

    from fomoe import checkpoint

    def run(procs):
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if any(json.loads(line).get("step", 0) >= step for line in (out / "metrics.jsonl").read_text().splitlines()):
                    if not checkpointed or (checkpoint.latest_step(out) or 0) >= step:
                        break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.005)
        os.kill(procs[victim].pid, signal.SIGKILL)
    return lambda procs: threading.Thread(target=run, args=(procs,), daemon=True).start()


def _config(args: list[str], out: Path) -> TrainConfig:
    from fomoe.cli import _explicit, build_parser
    parsed = build_parser().parse_args(["train", *args, "--out", str(out)])
    return TrainConfig(**_explicit(parsed), out=str(out), progress=False)


def test_link_flags_make_transport_deadlines_follow_the_schedule_over_that_link(tmp_path):
    """--link-mbps/--link-latency-ms/--link-loss: a healthy transfer over that link never hits its
    deadline (4x its modelled time), where the defaults (>= 10 Mbit/s assumed) would call a slow
    2 Mbit/s lossy link's large sync a lost worker; the peer timeout is never below --peer-timeout."""
    from fomoe import plan
    from fomoe.sync import ParamLayout, build_schedule
    from fomoe.tcp import TcpOptions
    from fomoe.train import link_tcp_options
    cfg = _config([*TCP, "--link-mbps", "2", "--link-latency-ms", "500", "--link-loss", "0.01", *SMALL],
                  tmp_path / "r").resolved()
    model_cfg = TrainConfig.model_config_for(cfg, 256)
    placement = Placement.from_spec(cfg.placement, cfg.workers, model_cfg.num_experts, model_cfg.n_layers)
    buckets = build_schedule(ParamLayout.from_lm_config(model_cfg), placement, cfg.method, num_workers=cfg.workers)
    options = link_tcp_options(cfg, buckets, cfg.workers)
    link = plan.Link(bandwidth_gbps=0.002, latency_ms=500, loss=0.01)
    for nbytes in (4096, 10 ** 6, 10 ** 8):
        assert options.transfer_deadline_s(nbytes) >= 4 * link.transfer_seconds(nbytes, 1) - 1e-6
    assert TcpOptions(peer_timeout_s=3).transfer_deadline_s(10 ** 8) < link.transfer_seconds(10 ** 8, 1)
    assert options.peer_timeout_s == pytest.approx(4 * 3 * 0.5)     # the link's silences need more than 3 s
    fast = _config([*TCP, "--link-mbps", "1000", "--link-latency-ms", "1", *SMALL], tmp_path / "f").resolved()
    assert link_tcp_options(fast, buckets, fast.workers).peer_timeout_s == 3.0
    assert link_tcp_options(fast, buckets, fast.workers).stall_timeout_s >= TcpOptions().stall_timeout_s
    with pytest.raises(ValueError, match="--link-mbps"):
        _config(["--link-mbps", "10", *SMALL], tmp_path / "d").resolved()    # default transport
    with pytest.raises(ValueError, match="--link-loss"):
        _config([*TCP, "--link-mbps", "10", "--link-loss", "1.5", *SMALL], tmp_path / "l").resolved()


def test_tcp_needs_a_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FOMOE_RUN_TOKEN", raising=False)
    assert main(["train", "--out", str(tmp_path / "r"), *TCP, *SMALL]) == 2
    assert "FOMOE_RUN_TOKEN" in capsys.readouterr().err


def test_tcp_run_loses_a_worker_and_finishes_without_it(tmp_path, monkeypatch):
    """Replication 2: a worker SIGKILLed mid-round; the others finish, report the loss and its
    data shard, and the exported model holds every expert."""
    from safetensors.torch import load_file
    from fomoe.train import train
    out = tmp_path / "r2"
    cfg = _config(["--workers", "3", "--placement", "replicated(2)", "--steps", "20", "--sync-every", "5",
                   "--log-every", "1", *TCP, "--link-mbps", "1000", "--link-latency-ms", "1", *SMALL], out)
    summary = train(cfg, token="test-token", on_start=_kill_after_line(out, 1, 7))
    assert summary["lost_workers"] == [1] and "code -9" in summary["failed_workers"][1]
    lines = read_metrics(out)
    [change] = [m for m in lines if m["kind"] == "membership"]
    assert change["lost"] == [1] and change["live"] == [0, 2] and 7 <= change["step"] <= 20
    assert re.search("connection closed|reset|failed", change["reasons"]["1"]), change["reasons"]
    shard = change["lost_data_shards"]["1"]
    assert shard["tokens"] > 0 and shard["documents"] > 0
    # Every train line after the loss counts the two survivors' steps only.
    after = [m for m in lines if m["kind"] == "train" and m["step"] > change["step"]]
    assert after and all(b["tokens"] - a["tokens"] == 2 * (b["step"] - a["step"]) * 4 * 32
                         for a, b in zip(after, after[1:]))
    assert lines[-1]["kind"] == "final" and math.isfinite(lines[-1]["eval_loss"])
    assert lines[-1]["eval_loss"] < math.log(256) - 1.0
    model = load_file(str(out / "model.safetensors"))
    for l in range(2):
        for e in range(4):
            w = model[f"blocks.{l}.moe.experts.{e}.w13"]
            assert torch.isfinite(w).all()


def test_tcp_run_stops_with_a_checkpoint_when_experts_are_lost_and_resumes_exactly(straight_run, tmp_path,
                                                                                   monkeypatch, capsys):
    """Replication 1 (partition): losing a worker loses experts, so the survivor stops with a
    checkpoint; the run resumed from it ends exactly where the uninterrupted run with the default
    transport ends (the TCP transport computes the same sums)."""
    from fomoe.train import RunStopped, train
    out = tmp_path / "r1"
    args = ["--workers", "2", "--placement", "partition", "--steps", "20", "--sync-every", "5", "--eval-every", "5",
            "--ckpt-every", "5", *TCP, *SMALL]
    with pytest.raises(RunStopped, match=r"were held only by lost workers \(lost ranks \[1\]; live ranks \[0\]\)") as exc:
        train(_config(args, out), token="test-token", on_start=_kill_after_line(out, 1, 5, checkpointed=True))
    assert exc.value.lost == [1] and exc.value.checkpoint_step in (5, 10, 15)
    from fomoe import checkpoint
    assert checkpoint.latest_step(out) == exc.value.checkpoint_step
    stopped = [m for m in read_metrics(out) if m["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["checkpoint_step"] == exc.value.checkpoint_step
    monkeypatch.setenv("FOMOE_RUN_TOKEN", "test-token")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "held-out eval loss" in capsys.readouterr().out

    def same(lines):
        return [t for t in trajectory(lines) if t[0] in ("train", "sync", "final")]
    assert same(read_metrics(out)) == same(read_metrics(straight_run))
