"""The system model (fomoe.plan) against what actually runs and against published models.

- bytes: for several placements, H, compression and weighting, the bytes every worker's
  SyncManager counts in a real gloo run equal the plan's prediction exactly;
- memory: the parameter, gradient, AdamW, θ_global, outer-momentum and error-feedback bytes a
  worker allocates equal the prediction exactly; the activation-peak estimate is checked against
  a CPU run's allocator peak (within 15%);
- parameter counts: the LM presets equal ``fomoe.lm`` and a built model; the published MoE shapes
  equal an independent per-tensor count from their configuration (Hugging Face key names) and
  the publishers' totals and active counts within 1% (or their rounding);
- the planning answers and the time model obey their definitions; the CLI works end to end.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fomoe import plan
from fomoe.lm import PRESETS as LM_PRESETS, LMConfig, MoELM
from fomoe.placement import Placement
from fomoe.sync import ParamLayout, build_schedule, schedule_traffic

ROOT = Path(__file__).resolve().parents[1]

# ---- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LM_PRESETS))
def test_lm_presets_count_like_lm_config(name):
    cfg = LM_PRESETS[name]
    shape = plan.preset(name).shape
    assert shape == plan.ModelShape.from_lm_config(cfg)
    assert shape.dense_params() == cfg.dense_params()
    assert shape.expert_params() == cfg.expert_params()
    assert shape.total_params() == cfg.total_params()
    assert shape.active_params() == cfg.active_params()


@pytest.mark.parametrize("spec", ["full", "replicated:2", "partition"])
def test_counts_equal_a_built_worker_model(spec):
    cfg = LMConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, num_experts=6, d_ff=12, max_seq_len=16)
    shape = plan.ModelShape.from_lm_config(cfg)
    p = plan.Plan(shape, plan.Federation(workers=4, placement=spec))
    for rank in range(4):
        model = MoELM.from_placement(cfg, p.placement, rank)
        params = list(model.parameters())
        assert sum(t.numel() for t in params) == p.params_held("fomoe")[rank]
        assert len(params) == shape.param_tensors()
        assert sum(m.num_local for m in model.moe_layers()) == p.local_experts("fomoe")[rank]
    full = MoELM(cfg)
    assert sum(t.numel() for t in full.parameters()) == shape.total_params()
    layout = ParamLayout.from_model(full)
    assert shape.layout() == layout


# Configurations as published (Hugging Face config.json key names) and an independent count of
# the tensors a checkpoint of that architecture holds.
HF_CONFIGS = {
    "mixtral-8x7b": dict(arch="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000),
    "mixtral-8x22b": dict(arch="mixtral", hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                          num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          vocab_size=32000),
    "qwen3-235b-a22b": dict(arch="qwen3_moe", hidden_size=4096, moe_intermediate_size=1536, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
                            num_experts_per_tok=8, vocab_size=151936),
    "olmoe-1b-7b": dict(arch="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                        vocab_size=50304),
    "deepseek-v3": dict(arch="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, vocab_size=129280),
}


def checkpoint_tensors(c: dict):
    """(name, shape, routed expert id or None) of every tensor of the main model."""
    d, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    yield "embed_tokens", (V, d), None
    yield "norm", (d,), None
    yield "lm_head", (V, d), None
    for layer in range(L):
        yield "input_layernorm", (d,), None
        yield "post_attention_layernorm", (d,), None
        h = c["num_attention_heads"]
        if c["arch"] == "deepseek_v3":
            ql, kvl = c["q_lora_rank"], c["kv_lora_rank"]
            nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            yield "q_a_proj", (ql, d), None
            yield "q_a_layernorm", (ql,), None
            yield "q_b_proj", (h * (nope + rope), ql), None
            yield "kv_a_proj_with_mqa", (kvl + rope, d), None
            yield "kv_a_layernorm", (kvl,), None
            yield "kv_b_proj", (h * (nope + vd), kvl), None
            yield "o_proj", (d, h * vd), None
        else:
            kv = c["num_key_value_heads"]
            dh = c.get("head_dim", d // h)
            yield "q_proj", (h * dh, d), None
            yield "k_proj", (kv * dh, d), None
            yield "v_proj", (kv * dh, d), None
            yield "o_proj", (d, h * dh), None
            if c["arch"] == "qwen3_moe":
                yield "q_norm", (dh,), None
                yield "k_norm", (dh,), None
            if c["arch"] == "olmoe":
                yield "q_norm", (h * dh,), None
                yield "k_norm", (kv * dh,), None
        if c["arch"] == "deepseek_v3" and layer < c["first_k_dense_replace"]:
            f = c["intermediate_size"]
            for name in ("gate_proj", "up_proj"):
                yield name, (f, d), None
            yield "down_proj", (d, f), None
            continue
        E = c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"]
        f = c.get("moe_intermediate_size") or c["intermediate_size"]
        yield "gate", (E, d), None
        if c["arch"] == "deepseek_v3":
            yield "e_score_correction_bias", (E,), None
            fs = f * c["n_shared_experts"]
            yield "shared_experts.gate_proj", (fs, d), None
            yield "shared_experts.up_proj", (fs, d), None
            yield "shared_experts.down_proj", (d, fs), None
        for e in range(E):
            yield "gate_proj", (f, d), e
            yield "up_proj", (f, d), e
            yield "down_proj", (d, f), e


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_published_shapes_equal_an_independent_tensor_count(name):
    c = HF_CONFIGS[name]
    total = routed = 0
    for _, shp, expert in checkpoint_tensors(c):
        n = math.prod(shp)
        total += n
        routed += n if expert is not None else 0
    E = c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"]
    moe_layers = c["num_hidden_layers"] - c.get("first_k_dense_replace", 0)
    active = total - routed + routed // E * c["num_experts_per_tok"]
    shape = plan.preset(name).shape
    assert shape.total_params() == total
    assert shape.expert_params() == routed
    assert shape.moe_layers == moe_layers
    assert shape.active_params() == active


@pytest.mark.parametrize("name", [n for n, p in plan.presets().items() if p.published])
def test_published_presets_match_published_totals(name):
    p = plan.preset(name)
    pub = p.published
    total = p.shape.total_params()
    active = p.shape.active_params(pub.active_includes_input_embedding)
    assert plan.Published.agrees(total, pub.total, pub.total_unit), (total, pub.total)
    assert plan.Published.agrees(active, pub.active, pub.active_unit), (active, pub.active)
    assert abs(total - pub.total) <= 0.01 * pub.total
    # the rounding allowance is only ever needed for figures published to two digits
    if abs(active - pub.active) > 0.01 * pub.active:
        assert pub.active_unit / pub.active > 0.02


def test_own_100b_preset_is_about_100b():
    s = plan.preset("fomoe-100b").shape
    assert 99e9 <= s.total_params() <= 101e9
    assert s.active_params() < 0.11 * s.total_params()


def test_published_agreement_rule():
    assert plan.Published.agrees(12_879_925_248, 12.9e9, 0.1e9)
    assert plan.Published.agrees(1_282_017_280, 1.3e9, 0.1e9)       # rounds to 1.3B
    assert not plan.Published.agrees(1_240_000_000, 1.3e9, 0.1e9)
    assert not plan.Published.agrees(680e9, 671e9, 1e9)


def test_bad_shapes_are_refused_with_reasons():
    with pytest.raises(plan.PlanError, match="top_k"):
        plan.ModelShape(n_layers=2, d_model=64, n_heads=4, vocab_size=10, num_experts=2, top_k=3, expert_d_ff=8)
    with pytest.raises(plan.PlanError, match="n_kv_heads"):
        plan.ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=3, attention="gqa", vocab_size=10,
                        num_experts=4, top_k=2, expert_d_ff=8)
    with pytest.raises(plan.PlanError, match="mla"):
        plan.ModelShape(n_layers=2, d_model=64, n_heads=4, attention="mla", vocab_size=10, num_experts=4, top_k=2,
                        expert_d_ff=8)
    with pytest.raises(plan.PlanError, match="dense_d_ff"):
        plan.ModelShape(n_layers=2, d_model=64, n_heads=4, vocab_size=10, num_experts=4, top_k=2, expert_d_ff=8,
                        dense_layers=1)


# ---- bytes and memory against real workers ---------------------------------------------------

LM = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, num_experts=6, top_k=2, d_ff=12, max_seq_len=8)
W = 4
CASES = [  # (method, fomoe placement, H, compression, weighted, steps)
    ("fomoe", "replicated:2", 2, None, False, 4),
    ("fomoe", "replicated:3:random", 1, "bf16", True, 2),
    ("fomoe", "partition", 2, "int8", False, 4),
    ("diloco", "full", 2, None, False, 4),
    ("diloco", "full", 1, "int8", True, 2),
    ("fomoe", "replicated:2", 2, "auto", False, 2),   # bf16 for the dense block of 4, int8 for pairs
    ("ddp", "full", 1, None, False, 2),
]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _federation_worker(ctx, cases):
    """Train every case on this worker; return its sync records and the bytes it allocated."""
    from fomoe.sync import SyncManager
    cfg = LMConfig(**LM)
    out = []
    for method, spec, H, compression, weighted, steps in cases:
        placement = Placement.from_spec(spec, ctx.world_size, cfg.num_experts, cfg.n_layers, seed=0)
        model = MoELM.from_placement(cfg, placement, ctx.rank, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mgr = SyncManager(model, opt, method=method, sync_every=H,
                          placement=placement if method == "fomoe" else None, rank=ctx.rank,
                          world_size=ctx.world_size, weighted=weighted, compression=compression)
        gen = torch.Generator().manual_seed(100 * ctx.rank)
        records, grads = [], None
        for _ in range(steps):
            batch = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1), generator=gen)
            ce, aux = model.loss(batch)
            (ce + aux).backward()
            grads = _bytes(p.grad for p in model.parameters())
            rec = mgr.step()
            if rec is not None:
                records.append((rec["bytes_sent"], rec["bytes_recv"]))
        outer = mgr.outer_optimizer
        momenta = [] if outer is None else [s.get("momentum_buffer") for s in outer.state.values()]
        out.append({
            "records": records, "expected": tuple(mgr.expected_traffic),
            "weights": _bytes(model.parameters()), "grads": grads,
            "optimizer": _bytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
            "theta_global": _bytes(mgr.global_params), "theta_global_grad": _bytes(g.grad for g in mgr.global_params),
            "outer_momentum": _bytes(momenta),
            "compression_residual": _bytes(mgr.state_dict().get("residual", {}).values()),
        })
    return out


@pytest.fixture(scope="module")
def federation_runs():
    from fomoe.launch import spawn
    return spawn(_federation_worker, W, backend="gloo", args=(CASES,), timeout_s=240, threads_per_worker=1)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_predicted_bytes_equal_what_every_worker_counts(federation_runs, case):
    method, spec, H, compression, weighted, steps = CASES[case]
    p = plan.Plan(plan.ModelShape.from_lm_config(LMConfig(**LM)),
                  plan.Federation(workers=W, placement=spec, sync_every=H, compression=compression, weighted=weighted))
    traffic = p.traffic(method)
    syncs = steps if method == "ddp" else steps // H
    assert any(t.sent for t in traffic)
    for rank in range(W):
        got = federation_runs[rank][case]
        want = (traffic[rank].sent, traffic[rank].recv)
        assert got["records"] == [want] * syncs, f"rank {rank}"
        assert got["expected"] == want


@pytest.mark.parametrize("case", range(len(CASES)))
def test_predicted_state_memory_equals_what_every_worker_allocates(federation_runs, case):
    method, spec, H, compression, weighted, steps = CASES[case]
    p = plan.Plan(plan.ModelShape.from_lm_config(LMConfig(**LM)),
                  plan.Federation(workers=W, placement=spec, sync_every=H, compression=compression, weighted=weighted))
    for rank in range(W):
        got, mem = federation_runs[rank][case], p.memory(method, rank)
        for key in ("weights", "grads", "optimizer", "theta_global", "theta_global_grad", "outer_momentum",
                    "compression_residual"):
            assert getattr(mem, key) == got[key], f"rank {rank}: {key}"
    if compression is not None:
        assert p.memory(method, 0).compression_residual > 0


# ---- the schedule shortcut and the comm/time model ---------------------------------------------

@pytest.mark.parametrize("compression", [None, "bf16", "int8"])
@pytest.mark.parametrize("workers", [2, 3, 5])
def test_full_replica_schedule_equals_the_per_expert_schedule(workers, compression):
    shape = plan.ModelShape.from_lm_config(LMConfig(**LM))
    p = plan.Plan(shape, plan.Federation(workers=workers, placement="full", compression=compression))
    for method in ("diloco", "ddp"):
        comp = compression if method == "diloco" else None
        real = build_schedule(shape.layout(), None, method, False, comp, num_workers=workers)
        for rank in range(workers):
            assert schedule_traffic(real, rank) == (p.traffic(method)[rank].sent, p.traffic(method)[rank].recv)
    # a full fomoe placement is diloco
    assert [(t.sent, t.recv) for t in p.traffic("fomoe")] == [(t.sent, t.recv) for t in p.traffic("diloco")]


def test_ring_bytes_follow_the_textbook_volume():
    # numel divisible by W: every rank sends and receives 2 (W-1)/W of the buffer
    shape = plan.ModelShape(n_layers=2, d_model=64, n_heads=4, vocab_size=64, num_experts=8, top_k=2,
                            expert_d_ff=32)
    Wn = 4
    p = plan.Plan(shape, plan.Federation(workers=Wn, placement="replicated:2"))
    N = shape.total_params()
    assert N % Wn == 0
    for t in p.traffic("diloco"):
        assert t.sent == t.recv == 2 * (Wn - 1) * (N // Wn) * 4
        assert t.messages == 2 * (Wn - 1)
    # fomoe r=2, cyclic over 4 workers: dense over all four, each expert over a pair
    E_local = shape.num_experts * 2 // Wn
    dense, per_expert = shape.dense_params(), shape.expert_numel()
    for t in p.traffic("fomoe"):
        assert t.sent == 2 * 3 * (dense // 4) * 4 + shape.moe_layers * E_local * per_expert * 4
    assert p.traffic("ddp")[0].sent == p.traffic("diloco")[0].sent


def test_comm_time_and_break_even_bandwidth():
    p = plan.preset("mixtral-8x7b").plan(bandwidth_gbps=10.0, latency_ms=20.0)
    for method in ("ddp", "diloco", "fomoe"):
        t = max(p.traffic(method), key=lambda t: t.seconds(p.link))
        assert p.comm_seconds(method) == pytest.approx(t.link_bytes * 8 / 10e9 + t.messages * 0.020)
        bw = p.bandwidth_for(method, 0.05)
        assert math.isfinite(bw)
        at = p.with_(bandwidth_gbps=bw)
        window = at.step_seconds(method) * (1 if method == "ddp" else p.federation.sync_every)
        assert at.exposed_comm_seconds(method) == pytest.approx(0.05 * window, rel=1e-6)
        assert p.with_(bandwidth_gbps=bw * 2).exposed_comm_seconds(method) < 0.05 * window
    # latency alone above the allowance: no bandwidth is enough
    slow = p.with_(latency_ms=1e6)
    assert slow.bandwidth_for("ddp") == math.inf
    # more bandwidth never slows a run; overlap hides communication
    times = [p.seconds_to_budget("fomoe", bw) for bw in (0.1, 1, 10, 100, 1000)]
    assert times == sorted(times, reverse=True)
    assert p.with_(overlap=1.0).round_seconds("diloco") <= p.round_seconds("diloco")


def test_skip_token_cuts_fomoe_compute():
    p = plan.preset("mixtral-8x7b").plan(workers=4, placement="replicated:1")
    assert p.kept_fraction("fomoe") == pytest.approx(0.25)
    assert p.step_seconds("fomoe") < p.step_seconds("diloco")
    assert p.with_(skip_policy="reroute").step_seconds("fomoe") == pytest.approx(p.step_seconds("diloco"))
    measured = p.with_(tokens_per_s=1e5)
    assert measured.step_seconds("diloco") == pytest.approx(measured.tokens_per_step / 1e5)


def test_memory_falls_with_fewer_experts_and_theta_global_can_live_on_the_host():
    p = plan.preset("fomoe-100b").plan()
    mems = [p.with_(workers=16, placement=f"replicated:{r}").worst_memory("fomoe").peak for r in (1, 2, 4, 8)]
    assert mems == sorted(mems)
    host = p.with_(global_on="host")
    assert host.worst_memory("fomoe").peak < p.worst_memory("fomoe").peak
    assert host.worst_memory("fomoe").host == p.worst_memory("fomoe").outer_state + \
        host.worst_memory("fomoe").sync_buffer
    assert p.worst_memory("ddp").theta_global == 0


# ---- the planning question ------------------------------------------------------------------------

@pytest.mark.parametrize("name,budget", [("fomoe-100b", 140.0), ("olmoe-1b-7b", 60.0), ("qwen3-235b-a22b", 100.0)])
def test_smallest_workers_is_the_boundary(name, budget):
    p = plan.preset(name).plan()
    answer = p.fit(budget, r_values=(1, 2))
    for row in answer["smallest_workers"]:
        r, Wn = row["r"], row["workers"]
        assert Wn is not None

        def fits(w):
            q = p.with_(workers=w, placement="full" if r >= w else f"replicated:{r}", gpu_memory_gib=budget)
            return q.fits("fomoe")

        assert fits(Wn)
        if Wn - 1 >= max(r, 2):
            assert not fits(Wn - 1)
        assert row["comm_savings_vs_diloco"] == pytest.approx(
            row["diloco_bytes_sent_per_worker_per_round"] / row["bytes_sent_per_worker_per_round"])
    at = answer["largest_r_at_workers"]
    if at is not None:
        def fits_r(r):
            return p.with_(placement="full" if r >= p.workers else f"replicated:{r}",
                           gpu_memory_gib=budget).fits("fomoe")
        assert fits_r(at["r"])
        if at["r"] < p.workers:
            assert not fits_r(at["r"] + 1)


def test_a_model_that_never_fits_says_so():
    p = plan.preset("deepseek-v3").plan()
    answer = p.fit(10.0, r_values=(1,))
    assert answer["smallest_workers"][0]["workers"] is None
    assert answer["largest_r_at_workers"] is None
    assert not answer["diloco_fits"]


# ---- activation memory against a CPU run ----------------------------------------------------------

def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="needs glibc's mallinfo2")
def test_training_step_peaks_match_the_cpu_allocator():
    """bench/plan_memory_check.py's CPU cases: the forward/backward, optimizer-step and outer-sync
    peaks of a bf16-autocast training step (C allocator's live bytes after every op) against the
    estimate, within 15% per phase."""
    spec = importlib.util.spec_from_file_location("plan_memory_check", ROOT / "bench" / "plan_memory_check.py")
    check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = check   # its dataclasses look their module up
    spec.loader.exec_module(check)
    for case in check.SMOKE_CASES.values():
        r = check.run_case(case, torch.device("cpu"), warmup=1, log=lambda *a: None)
        assert r["params_held"] == r["predicted_params_held"]
        for phase, ratio in r["ratio_predicted_over_measured"].items():
            assert ratio == pytest.approx(1.0, abs=0.15), (case.name, phase)


# ---- the command line ---------------------------------------------------------------------------

def test_cli_lists_presets(capsys):
    assert plan.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in plan.presets():
        assert name in out


def test_cli_json_has_the_documented_fields(capsys):
    assert plan.main(["--preset", "mixtral-8x7b", "--json", "-", "-W", "8", "--r", "1", "--bandwidth-gbps", "1",
                      "--compression", "bf16"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params_total"] == plan.preset("mixtral-8x7b").shape.total_params()
    assert d["params_active"] == plan.preset("mixtral-8x7b").shape.active_params()
    assert d["federation"]["workers"] == 8 and d["federation"]["placement"] == "replicated:1"
    assert d["federation"]["compression"] == "bf16" and d["link"]["bandwidth_gbps"] == 1
    for m in ("ddp", "diloco", "fomoe"):
        x = d["methods"][m]
        assert isinstance(x["bytes_sent_per_worker_per_sync"], int) and x["bytes_sent_per_worker_per_sync"] > 0
        assert isinstance(x["memory_per_worker_bytes"], int) and x["memory_per_worker_bytes"] > 0
    # bf16 pseudo-gradients halve diloco's fp32 traffic; ddp stays fp32
    assert d["methods"]["diloco"]["bytes_sent_per_worker_per_sync"] * 2 == d["methods"]["ddp"][
        "bytes_sent_per_worker_per_sync"]
    assert d["savings"]["fomoe_vs_diloco_bytes"] > 1


def test_cli_table_overrides_and_plots(tmp_path, capsys):
    assert plan.main(["--preset", "tiny", "--set", "num_experts=16", "--set", "top_k=4", "-H", "5",
                      "--plot-dir", str(tmp_path), "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "16 experts top-4" in out and "H=5" in out
    assert json.loads((tmp_path / "plan.json").read_text())["model"]["num_experts"] == 16
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["plan_tiny_bytes_memory.png", "plan_tiny_wallclock.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "tiny", "--r", "9"], "exceeds the number of workers"),
    (["--preset", "tiny", "--r", "1", "--placement", "full"], "not both"),
    (["--preset", "tiny", "--set", "bogus=1"], "FIELD=VALUE"),
    (["--preset", "tiny", "--bandwidth-gbps", "0"], "bandwidth"),
])
def test_cli_errors_are_clear(argv, message, capsys):
    assert plan.main(argv) == 2
    assert message in capsys.readouterr().err


def test_add_subparser_hooks_into_a_cli(capsys):
    parser = argparse.ArgumentParser(prog="fomoe")
    sub = parser.add_subparsers(dest="command")
    plan.add_subparser(sub)
    args = parser.parse_args(["plan", "--preset", "olmoe-1b-7b", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "olmoe-1b-7b"


# ---- sync time: critical path through the schedule, loss, commit barrier -----------------------

def _chain_schedule():
    """Dense over three workers, then three pair buckets where each pair waits for the last."""
    from fomoe.sync import Bucket
    return [Bucket((0, 1, 2), 300, 300, ()), Bucket((0, 1), 100, 0, ((0, 0),)),
            Bucket((0, 2), 100, 0, ((0, 1),)), Bucket((1, 2), 100, 0, ((0, 2),))]


def test_sync_seconds_is_the_critical_path_of_the_schedule():
    buckets = _chain_schedule()
    link = plan.Link(bandwidth_gbps=8e-6, latency_ms=100)   # 1000 bytes/s
    # dense ring of 3: 4 steps of 100 fp32 (400 B) -> 1.6 s + 0.4 s; a pair: 2 steps of 200 B -> 0.4 + 0.2 s
    dense, pair = 2.0, 0.6
    # (0,1) right after the dense bucket: 2.6 s. (0,2): rank 2 is ready at 2.0, rank 0 at 2.6.
    # Rank 2's first message (sent at 2.0) is there before rank 0 starts; rank 0 sends at 2.6 and
    # 2.8 (its link is busy 0.2 s per message), they arrive at 2.9 and 3.1; rank 2 sends its second
    # at 2.9, it arrives at 3.2: rank 0 is done at 3.2, rank 2 at 3.1.
    # (1,2): rank 1 ready at 2.6 sends at 2.6 (arrives 2.9); rank 2 sends at 3.1 (arrives 3.4);
    # second messages: rank 1 at 3.4 (arrives 3.7), rank 2 at 3.3 (arrives 3.6): done at 3.7.
    assert plan.sync_seconds(buckets, 3, link) == pytest.approx(3.7)
    # a worker's own sum (what the model used to take) misses the waiting
    assert max(t.seconds(link) for t in plan.rank_traffic(buckets, 3)) == pytest.approx(dense + 2 * pair)
    # the TCP transport's commit barrier: one more one-way message
    assert plan.sync_seconds(buckets, 3, link, commit_barrier=True) == pytest.approx(3.7 + 0.1)
    # disjoint groups run side by side
    from fomoe.sync import Bucket
    side = [Bucket((0, 1), 100, 0, ((0, 0),)), Bucket((2, 3), 100, 0, ((0, 1),))]
    assert plan.sync_seconds(side, 4, link) == pytest.approx(pair)
    # a Plan's comm time is this function on its own schedule
    p = plan.preset("tiny").plan(workers=3, placement="replicated:2", latency_ms=50)
    assert p.comm_seconds("fomoe") == pytest.approx(plan.sync_seconds(p.buckets("fomoe"), 3, p.link))
    assert p.comm_seconds("fomoe") >= max(t.seconds(p.link) for t in p.traffic("fomoe"))


def test_lossy_link_pays_one_round_trip_per_lost_segment():
    link = plan.Link(bandwidth_gbps=8e-6, latency_ms=100, loss=0.1, segment_bytes=100)
    # 1600 B: 16 segments, 1.6 of them lost on average, each 0.2 s
    assert link.transfer_seconds(1600, 4) == pytest.approx(1.6 + 0.4 + 1.6 * 0.2)
    lossless = plan.Link(bandwidth_gbps=8e-6, latency_ms=100)
    buckets = _chain_schedule()
    # buckets whose members start together: each member's ring pays its own segments' stalls
    both = [buckets[0], buckets[1]]
    extra = plan.sync_seconds(both, 3, link) - plan.sync_seconds(both, 3, lossless)
    assert extra == pytest.approx((1600 + 400) / 100 * 0.1 * 0.2)
    for bad in (dict(loss=1.0), dict(loss=-0.01), dict(segment_bytes=0)):
        with pytest.raises(plan.PlanError):
            plan.Link(**bad)
    # the plan's command line takes the loss rate
    p = plan.plan_from_args(_plan_args(["--loss", "0.01", "--latency-ms", "80"]))
    assert p.link.loss == 0.01 and p.comm_seconds("fomoe") > p.with_(loss=0.0).comm_seconds("fomoe")


def _plan_args(argv):
    parser = argparse.ArgumentParser()
    plan._add_arguments(parser)
    return parser.parse_args(argv)
