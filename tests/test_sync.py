"""The sync schedule and SyncManager: real worker processes (gloo) against a single-process
simulation of the algorithm written independently here, plus exact byte accounting."""

from __future__ import annotations

import pytest
import torch

import federation_workers as fw
from fomoe import launch
from fomoe.comm import ring_chunks
from fomoe.placement import Placement
from fomoe.sync import Bucket, ParamLayout, build_schedule, schedule_traffic

LR, MU = 0.7, 0.9


# ---- the schedule (pure) ---------------------------------------------------------------------

def _independent_ring_bytes(numel: int, n: int, p: int, elem: int) -> tuple[int, int]:
    # Reduce-scatter sends every chunk but the one this rank ends up owning ((p+1) mod n);
    # all-gather sends every chunk but the one its successor owns ((p+2) mod n).
    c = [numel // n + (1 if i < numel % n else 0) for i in range(n)]
    if n == 1:
        return 0, 0
    return (2 * numel - c[(p + 1) % n] - c[(p + 2) % n]) * elem, (2 * numel - c[p] - c[(p + 1) % n]) * elem


def test_ring_chunks_cover_the_buffer():
    for numel in (0, 1, 7, 64, 1001):
        for n in (1, 2, 3, 5):
            chunks = ring_chunks(numel, n)
            assert sum(l for _, l in chunks) == numel
            assert all(chunks[i][0] + chunks[i][1] == chunks[i + 1][0] for i in range(n - 1))
            assert max(l for _, l in chunks) - min(l for _, l in chunks) <= 1


@pytest.mark.parametrize("W,r,E,L", [(2, 1, 4, 2), (4, 2, 4, 2), (4, 2, 8, 3), (3, 2, 5, 2), (5, 3, 7, 2),
                                     (4, 4, 4, 1), (6, 2, 6, 2)])
def test_schedule_groups_by_holder_set_and_counts_the_ring_formula(W, r, E, L):
    layout = ParamLayout.from_sizes(dense_numel=1000 + W, num_layers=L, num_experts=E, expert_numel=96)
    for mode in ("cyclic", "random"):
        p = Placement.replicated(W, E, L, r, mode=mode, seed=1)
        buckets = build_schedule(layout, p, "fomoe")
        # Every (layer, expert) in exactly one bucket, whose ranks are its holders.
        carried = [(l, e, b.ranks) for b in buckets for l, e in b.experts]
        assert sorted((l, e) for l, e, _ in carried) == [(l, e) for l in range(L) for e in range(E)]
        assert all(tuple(p.holders(l, e)) == ranks for l, e, ranks in carried)
        assert len({b.ranks for b in buckets}) == len(buckets)
        assert sum(b.dense_numel for b in buckets) == layout.dense_numel
        for rank in range(W):
            want_s = want_r = 0
            for b in buckets:
                if rank in b.ranks:
                    s, rr = _independent_ring_bytes(b.numel, len(b.ranks), b.ranks.index(rank), 4)
                    want_s, want_r = want_s + s, want_r + rr
            assert schedule_traffic(buckets, rank) == (want_s, want_r)
        # When every group size divides the bucket, the textbook 2(n-1)/n * bytes per rank.
        if all(b.numel % len(b.ranks) == 0 for b in buckets):
            for rank in range(W):
                mine = [b for b in buckets if rank in b.ranks]
                expect = sum(2 * (len(b.ranks) - 1) * b.numel * 4 // len(b.ranks) for b in mine)
                assert schedule_traffic(buckets, rank) == (expect, expect)


def test_full_placement_schedule_equals_diloco_and_ddp_moves_everything():
    layout = ParamLayout.from_sizes(500, 2, 4, 96)
    full = Placement.full(4, 4, 2)
    fomoe = build_schedule(layout, full, "fomoe")
    assert fomoe == build_schedule(layout, None, "diloco", num_workers=4)
    assert len(fomoe) == 1 and fomoe[0].numel == layout.total_numel()
    ddp = build_schedule(layout, None, "ddp", num_workers=4)
    assert ddp[0].purpose == "grads" and ddp[0].numel == layout.total_numel()
    # Partial replication moves fewer bytes than full replicas.
    part = build_schedule(layout, Placement.replicated(4, 4, 2, 2), "fomoe")
    assert schedule_traffic(part, 0)[0] < schedule_traffic(fomoe, 0)[0]


def test_weighted_and_compressed_buckets_count_their_bytes():
    layout = ParamLayout.from_sizes(0, 1, 4, 512)
    p = Placement.replicated(2, 4, 1, 2)
    plain = build_schedule(layout, p, "fomoe")[0]
    weighted = build_schedule(layout, p, "fomoe", weighted=True)[0]
    bf16 = build_schedule(layout, p, "fomoe", compression="bf16")[0]
    int8 = build_schedule(layout, p, "fomoe", compression="int8")[0]
    n = 4 * 512
    assert plain.traffic(0) == (n * 4, n * 4)
    assert weighted.traffic(0) == (n * 4 + 4 * 4, n * 4 + 4 * 4)   # + one fp32 count per expert
    assert bf16.traffic(1) == (n * 2, n * 2)
    assert int8.traffic(0) == (n + 4 * (n // 256),) * 2             # int8 payload + fp32 scale per 256


def test_auto_compression_picks_the_cheaper_wire_format_per_group():
    # int8 runs as an all-gather: (n-1) payloads per rank, cheaper than the bf16 ring only for
    # groups of up to 3; the dense block over all 5 workers goes bf16, expert pairs and triples int8.
    layout = ParamLayout.from_sizes(1000, 1, 6, 512)
    for r in (2, 3, 4):
        buckets = build_schedule(layout, Placement.replicated(5, 6, 1, r), "fomoe", compression="auto")
        for b in buckets:
            n = len(b.ranks)
            assert b.compression == ("int8" if n <= 3 else "bf16"), (r, b.ranks)
            if n > 1:
                other = build_schedule(layout, Placement.replicated(5, 6, 1, r), "fomoe",
                                       compression="bf16" if b.compression == "int8" else "int8")
                twin = next(o for o in other if o.ranks == b.ranks)
                assert b.traffic(b.ranks[0])[0] <= twin.traffic(b.ranks[0])[0]
    with pytest.raises(ValueError, match="none, bf16, int8, auto"):
        build_schedule(layout, Placement.replicated(5, 6, 1, 2), "fomoe", compression="int4")


def test_schedule_rejects_mismatches():
    layout = ParamLayout.from_sizes(10, 2, 4, 8)
    with pytest.raises(ValueError, match="needs full replicas"):
        build_schedule(layout, Placement.partition(2, 4, 2), "diloco")
    with pytest.raises(ValueError, match="2 MoE layers of 4 experts, the placement 3 layers"):
        build_schedule(layout, Placement.full(2, 4, 3), "fomoe")
    with pytest.raises(ValueError, match="compression do not apply"):
        build_schedule(layout, None, "ddp", compression="bf16", num_workers=2)
    with pytest.raises(ValueError, match="compression must be one of"):
        build_schedule(layout, None, "diloco", compression="fp8", num_workers=2)


def test_layout_from_model_matches_analytic_sizes():
    p = Placement.replicated(2, 4, 2, 1)
    a, b = fw.make_model(p, 0), fw.make_model(None, 0)
    la, lb = ParamLayout.from_model(a), ParamLayout.from_model(b)
    assert la == lb   # a worker's layout describes the whole federation, not its shard
    dense = sum(t.numel() for n, t in b.named_parameters() if not n.endswith(("w13", "w2")))
    assert la == ParamLayout.from_sizes(dense, 2, 4, 3 * fw.D * fw.D_FF)


# ---- the algorithm, simulated in one process ----------------------------------------------------

def simulate(placement: Placement, steps: int, H: int, weighted: bool = False, device="cpu") -> list[dict]:
    """Every worker's final state under FoMoE, written from the algorithm's definition (on the CPU)."""
    W = placement.num_workers
    models = [fw.make_model(placement, r).to(device) for r in range(W)]
    opts = [fw.inner_optimizer(m) for m in models]
    theta = {}
    for m in models:
        for k, v in m.state_dict().items():
            theta[k] = v.clone()
    momentum = {}
    for step in range(steps):
        for r, m in enumerate(models):
            m.loss(fw.batch_for(r, step).to(device)).backward()
            opts[r].step()
            opts[r].zero_grad()
        if (step + 1) % H:
            continue
        local = [m.state_dict() for m in models]
        for k in theta:
            holders = [r for r in range(W) if k in local[r]]
            deltas = [theta[k] - local[r][k] for r in holders]
            if weighted and ".experts." in k:
                layer, expert = int(k.split(".")[1]), int(k.split(".")[3])
                t = [float(models[r].blocks[layer].tokens_routed[models[r].blocks[layer].resident_map[expert]])
                     for r in holders]
                g = sum(ti * d for ti, d in zip(t, deltas)) / sum(t) if sum(t) > 0 else torch.zeros_like(theta[k])
            else:
                g = sum(deltas) / len(holders)
            buf = g.clone() if k not in momentum else MU * momentum[k] + g
            momentum[k] = buf
            theta[k] = theta[k] - LR * (g + MU * buf)
        for m in models:
            m.load_state_dict(theta)
            for moe in m.blocks:
                moe.reset_routing_counts()
    return [{k: v.cpu() for k, v in m.state_dict().items()} for m in models]


def _scenarios_w4(ctx):
    out = {}
    rep = Placement.replicated(4, 4, 2, 2)
    out["replicated"] = fw.train_worker(ctx, rep, "fomoe", 4, 2)
    rnd = Placement.replicated(4, 4, 2, 2, mode="random", seed=3)
    out["weighted"] = fw.train_worker(ctx, rnd, "fomoe", 3, 3, weighted=True)
    full = Placement.full(4, 4, 2)
    out["full"] = fw.train_worker(ctx, full, "fomoe", 4, 2)
    out["diloco"] = fw.train_worker(ctx, None, "diloco", 4, 2)
    out["ddp"] = fw.train_worker(ctx, None, "ddp", 3, 1)
    out["partition"] = fw.train_worker(ctx, Placement.partition(4, 4, 2), "fomoe", 2, 1)
    return out


@pytest.fixture(scope="module")
def w4():
    return launch.spawn(_scenarios_w4, 4, backend="gloo", timeout_s=240)


def _check_holders_identical(results, placement):
    states = [r[0] for r in results]
    keys = {k for s in states for k in s}
    for k in keys:
        have = [s[k] for s in states if k in s]
        if ".experts." in k:
            layer, expert = int(k.split(".")[1]), int(k.split(".")[3])
            assert len(have) == len(placement.holders(layer, expert)), k
        else:
            assert len(have) == len(states), k   # dense parameters on every worker
        for v in have[1:]:
            assert torch.equal(v, have[0]), f"{k} differs between workers"


def _check_matches(results, simulated):
    for r, (state, *_rest) in enumerate(results):
        assert state.keys() == simulated[r].keys()
        for k in state:
            torch.testing.assert_close(state[k], simulated[r][k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")


def _check_bytes(results, rounds):
    for state, records, expected, _losses, totals, _snapshots in results:
        assert len(records) == rounds
        for rec in records:
            assert (rec["bytes_sent"], rec["bytes_recv"]) == expected
            assert sum(c["sent"] for c in rec["collectives"]) == rec["bytes_sent"]
        assert totals == (rounds * expected[0], rounds * expected[1])


def test_replicated_holders_identical_and_equal_to_simulation(w4):
    p = Placement.replicated(4, 4, 2, 2)
    results = [w["replicated"] for w in w4]
    _check_holders_identical(results, p)
    _check_matches(results, simulate(p, 4, 2))
    _check_bytes(results, 2)
    assert results[0][2][0] > 0


def test_token_weighted_averaging_equals_simulation(w4):
    p = Placement.replicated(4, 4, 2, 2, mode="random", seed=3)
    results = [w["weighted"] for w in w4]
    _check_holders_identical(results, p)
    _check_matches(results, simulate(p, 3, 3, weighted=True))
    # Weighting changes the result (the unweighted run lands elsewhere).
    unweighted = simulate(p, 3, 3, weighted=False)
    assert any(not torch.allclose(results[0][0][k], unweighted[0][k], atol=1e-5) for k in results[0][0]
               if ".experts." in k)
    _check_bytes(results, 1)


def test_full_placement_reproduces_diloco_bitwise(w4):
    for r in range(4):
        full, diloco = w4[r]["full"], w4[r]["diloco"]
        assert full[3] == diloco[3]                       # identical loss trajectory
        assert full[0].keys() == diloco[0].keys()
        for k in full[0]:
            assert torch.equal(full[0][k], diloco[0][k]), k
        assert full[2] == diloco[2]
    _check_matches([w["diloco"] for w in w4], simulate(Placement.full(4, 4, 2), 4, 2))
    _check_bytes([w["diloco"] for w in w4], 2)


def test_partition_moves_only_dense_parameters(w4):
    results = [w["partition"] for w in w4]
    layout = ParamLayout.from_model(fw.make_model(None, 0))
    dense_only = _independent_ring_bytes(layout.dense_numel, 4, 0, 4)
    assert results[0][2] == dense_only
    _check_bytes(results, 2)
    _check_matches(results, simulate(Placement.partition(4, 4, 2), 2, 1))
    # Less than half of what diloco moves per round for this model.
    assert results[0][2][0] < w4[0]["diloco"][2][0] / 2


def test_ddp_matches_single_process_training_on_the_concatenated_batch(w4):
    results = [w["ddp"] for w in w4]
    _check_holders_identical(results, Placement.full(4, 4, 2))
    model = fw.make_model(None, 0)
    opt = fw.inner_optimizer(model)
    losses = []
    for step in range(3):
        batch = torch.cat([fw.batch_for(r, step) for r in range(4)])
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(results[0][0][k], v, rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
    mean_worker_loss = [sum(w[3][s] for w in results) / 4 for s in range(3)]
    assert mean_worker_loss == pytest.approx(losses, rel=1e-5)
    _check_bytes(results, 3)   # one gradient all-reduce per step


# ---- three workers: odd group sizes, compression ---------------------------------------------------

def _scenarios_w3(ctx):
    p = Placement.replicated(3, 5, 2, 2)
    return {"plain": fw.train_worker(ctx, p, "fomoe", 2, 1),
            "bf16": fw.train_worker(ctx, p, "fomoe", 2, 1, compression="bf16"),
            "int8": fw.train_worker(ctx, p, "fomoe", 2, 1, compression="int8")}


@pytest.fixture(scope="module")
def w3():
    return launch.spawn(_scenarios_w3, 3, backend="gloo", timeout_s=240)


def test_three_workers_uneven_chunks(w3):
    p = Placement.replicated(3, 5, 2, 2)
    results = [w["plain"] for w in w3]
    _check_holders_identical(results, p)
    _check_matches(results, simulate(p, 2, 1))
    _check_bytes(results, 2)


@pytest.mark.parametrize("compression,ratio,tol", [("bf16", 0.5, 1e-4), ("int8", 0.26, 1e-3)])
def test_compressed_sync_is_consistent_close_and_cheaper(w3, compression, ratio, tol):
    p = Placement.replicated(3, 5, 2, 2)
    results = [w[compression] for w in w3]
    _check_holders_identical(results, p)
    _check_bytes(results, 2)
    plain = w3[0]["plain"]
    assert results[0][2][0] <= ratio * plain[2][0] + 64 * 4 * 3
    # After the first round the only difference to exact averaging is the compression error
    # (later rounds amplify it through AdamW, so compare the first).
    sim = simulate(p, 1, 1)
    worst = max((results[r][5][0][k] - sim[r][k]).abs().max().item() for r in range(3) for k in sim[r])
    assert 0 < worst < tol


# ---- bad configurations fail on every worker, fast ---------------------------------------------------

def _bad_configs(ctx):
    from fomoe.sync import SyncManager
    messages = {}
    tries = {
        # rank 1 asks for a different H: caught by the agreement check on both ranks
        "mismatched_H": lambda: SyncManager(*_mo(ctx, None), method="diloco", sync_every=2 + ctx.rank,
                                            rank=ctx.rank, world_size=2),
        # only rank 1's model disagrees with the placement: both ranks fail
        "wrong_model": lambda: SyncManager(*_mo(ctx, Placement.partition(2, 4, 2) if ctx.rank == 0 else None),
                                           placement=Placement.partition(2, 4, 2), rank=ctx.rank, world_size=2),
        "world_mismatch": lambda: SyncManager(*_mo(ctx, Placement.partition(3, 4, 2), rank=0),
                                              placement=Placement.partition(3, 4, 2), rank=ctx.rank, world_size=2),
        "different_seed": lambda: SyncManager(*_mo(ctx, None, seed=ctx.rank), method="diloco", sync_every=2,
                                              rank=ctx.rank, world_size=2),
    }
    import time
    for name, make in tries.items():
        t0 = time.monotonic()
        try:
            make()
            messages[name] = None
        except ValueError as exc:
            messages[name] = (str(exc), time.monotonic() - t0)
    return messages


def _mo(ctx, placement, rank=None, seed=0):
    m = fw.make_model(placement, ctx.rank if rank is None else rank, seed=seed)
    return m, fw.inner_optimizer(m)


def _fails_in_worker(ctx):
    from fomoe.sync import SyncManager
    m = fw.make_model(None, ctx.rank)
    SyncManager(m, fw.inner_optimizer(m), method="fomoe", placement=None, rank=ctx.rank, world_size=2)


# Two workers on two GPUs over NCCL (a communicator per holder group, the CUDA pack/unpack
# kernels): holder groups of one and of two workers in both layers.
TWO_GPU_HOLDERS = [[[0, 1], [0], [1], [0, 1]], [[0], [0, 1], [1], [1]]]


def _scenarios_nccl_w2(ctx):
    from fomoe.sync import SyncManager
    p = Placement.explicit(TWO_GPU_HOLDERS, 2)
    out = {"sparse": fw.train_worker(ctx, p, "fomoe", 4, 2),
           "weighted": fw.train_worker(ctx, p, "fomoe", 3, 3, weighted=True)}
    model = fw.make_model(p, ctx.rank).to(ctx.device)
    mgr = SyncManager(model, fw.inner_optimizer(model), method="fomoe", sync_every=1, placement=p, rank=ctx.rank,
                      world_size=2, global_device=ctx.device)
    out["segment_kernels"] = mgr._use_segment_kernels()
    out["group_communicators"] = mgr.transport.group_communicators
    return out


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_over_nccl_equal_the_simulation():
    res = launch.spawn(_scenarios_nccl_w2, 2, backend="nccl", timeout_s=300)
    p = Placement.explicit(TWO_GPU_HOLDERS, 2)
    assert all(w["segment_kernels"] for w in res)
    # The two-worker group (dense parameters, shared experts) sums with ncclAllReduce on its own
    # communicator; the single-holder experts move nothing.
    assert all(w["group_communicators"] == [(0, 1)] for w in res)
    for name, steps, H, weighted in (("sparse", 4, 2, False), ("weighted", 3, 3, True)):
        results = [w[name] for w in res]
        _check_holders_identical(results, p)
        # The same kernels on the same kind of GPU: the single-process run of the algorithm
        # differs from the workers only by the order of fp32 additions in the outer step.
        _check_matches(results, simulate(p, steps, H, weighted=weighted, device="cuda"))
        _check_bytes(results, steps // H)


def test_bad_configs_fail_on_every_worker_with_a_clear_message():
    out = launch.spawn(_bad_configs, 2, backend="gloo", timeout_s=120)
    expect = {"mismatched_H": "workers disagree on the sync configuration: rank 1 has sync_every=3 where rank 0 "
                              "has sync_every=2",
              "wrong_model": "rank 1: rank 1: MoE layer 0 holds experts [0, 1, 2, 3] but the placement gives it [1, 3]",
              "world_mismatch": "the placement is for 3 workers but world_size is 2",
              "different_seed": "workers do not start from identical parameters"}
    for rank in range(2):
        for name, text in expect.items():
            got = out[rank][name]
            assert got is not None, f"{name} did not fail on rank {rank}"
            assert text in got[0], (name, got[0])
            assert got[1] < 20, f"{name} took {got[1]:.1f} s to fail"


def test_worker_errors_reach_the_caller():
    with pytest.raises(launch.WorkerError, match="method 'fomoe' needs a placement") as info:
        launch.spawn(_fails_in_worker, 2, backend="gloo", timeout_s=120)
    assert sorted(info.value.failures) == [0, 1]


def test_single_worker_needs_no_process_group():
    model = fw.make_model(None, 0)
    from fomoe.sync import SyncManager
    mgr = SyncManager(model, fw.inner_optimizer(model), method="diloco", sync_every=2)
    for step in range(4):
        model.loss(fw.batch_for(0, step)).backward()
        rec = mgr.step()
        assert (rec is not None) == (step % 2 == 1)
    assert mgr.bytes_sent == 0 and mgr.round == 2
    assert isinstance(mgr.buckets[0], Bucket)


def _dies_before_the_first_sync(ctx):
    from fomoe.sync import SyncManager
    model = fw.make_model(None, ctx.rank)
    mgr = SyncManager(model, fw.inner_optimizer(model), method="diloco", sync_every=1, rank=ctx.rank, world_size=2)
    if ctx.rank == 1:
        raise RuntimeError("worker 1 lost its data")
    model.loss(fw.batch_for(0, 0)).backward()
    mgr.step()   # rank 0 now waits in the ring for a peer that is gone


def test_a_worker_dying_mid_run_fails_the_others_instead_of_hanging():
    import time
    t0 = time.monotonic()
    with pytest.raises(launch.WorkerError, match="worker 1 lost its data") as info:
        launch.spawn(_dies_before_the_first_sync, 2, backend="gloo", timeout_s=60, grace_s=20)
    assert sorted(info.value.failures) == [0, 1]
    assert time.monotonic() - t0 < 45
