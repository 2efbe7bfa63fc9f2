"""Ring schedule, codecs and transports: the sparse expert all-reduce against a dense reference
(every worker contributes a full-size buffer, zeros where it holds nothing, divided by the
holder counts)."""

from __future__ import annotations

import pytest
import torch

from fomoe import comm, launch
from fomoe.placement import Placement
from fomoe.sync import ParamLayout, build_schedule

# ---- the plan, executed in one process --------------------------------------------------------


def _run_plan_locally(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Executes ring_plan for every member in lock-step, passing messages by hand."""
    n, numel = len(inputs), inputs[0].numel()
    bufs = [x.clone() for x in inputs]
    plans = [comm.ring_plan(numel, n, p) for p in range(n)]
    for phase in ("reduce_steps", "gather_steps"):
        for s in range(n - 1):
            msgs = []
            for p in range(n):
                send_c = getattr(plans[p], phase)[s][0]
                start, length = plans[p].chunks[send_c]
                msgs.append((plans[p].next_position, send_c, bufs[p][start:start + length].clone()))
            for dst, chunk, data in msgs:
                recv_c = getattr(plans[dst], phase)[s][1]
                assert recv_c == chunk, "sender and receiver disagree on the chunk"
                start, length = plans[dst].chunks[recv_c]
                if phase == "reduce_steps":
                    bufs[dst][start:start + length] += data
                else:
                    bufs[dst][start:start + length] = data
    return bufs


@pytest.mark.parametrize("n,numel", [(1, 5), (2, 8), (3, 10), (4, 3), (5, 17), (7, 100)])
def test_ring_plan_sums_exactly_and_counts_what_it_sends(n, numel, gen):
    inputs = [torch.randint(-64, 64, (numel,), generator=gen).float() / 8 for _ in range(n)]
    out = _run_plan_locally(inputs)
    want = sum(inputs)
    for b in out:
        assert torch.equal(b, want)
    total_sent = sum(comm.ring_allreduce_bytes(numel, 4, n, p)[0] for p in range(n))
    total_recv = sum(comm.ring_allreduce_bytes(numel, 4, n, p)[1] for p in range(n))
    assert total_sent == total_recv == 2 * (n - 1) * numel * 4
    if numel % n == 0:
        assert all(comm.ring_allreduce_bytes(numel, 4, n, p) == (2 * (n - 1) * numel * 4 // n,) * 2
                   for p in range(n))


def test_plans_reject_bad_positions():
    with pytest.raises(ValueError, match="position 3 out of range for a group of 3"):
        comm.ring_plan(10, 3, 3)
    with pytest.raises(ValueError, match="compression must be one of"):
        comm.sum_bytes(10, 2, 0, "fp8")


# ---- codecs ---------------------------------------------------------------------------------------

def test_int8_codec_error_is_half_a_step_per_block(gen):
    n = 3 * comm.INT8_BLOCK + 17
    x = torch.randn(n, generator=gen) * torch.linspace(0.01, 10, n)
    x[:comm.INT8_BLOCK] = 0.0                                   # an all-zero block decodes to zeros
    payload = comm.int8_encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == comm.int8_payload_bytes(n)
    y = comm.int8_decode(payload, n)
    assert torch.equal(y[:comm.INT8_BLOCK], x[:comm.INT8_BLOCK])
    for b in range(0, n, comm.INT8_BLOCK):
        blk = x[b:b + comm.INT8_BLOCK]
        step = blk.abs().max() / 127
        assert (y[b:b + comm.INT8_BLOCK] - blk).abs().max() <= step / 2 * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("compression", ["bf16", "int8"])
def test_error_feedback_removes_the_bias(compression, gen):
    x = torch.randn(1000, generator=gen) * 0.01
    residual, sent = None, torch.zeros_like(x)
    rounds = 64
    for _ in range(rounds):
        buf = x.clone()
        residual = comm.error_feedback_(buf, residual, compression)
        sent += comm.compress_roundtrip(buf, compression)
    biased = (comm.compress_roundtrip(x, compression) - x).abs().max()
    fed_back = (sent / rounds - x).abs().max()
    assert biased > 0
    # What was sent over the rounds equals rounds * x up to the last residual.
    assert torch.allclose(sent + residual, rounds * x, atol=1e-6)
    assert fed_back < biased / 8


# ---- transports in real processes ------------------------------------------------------------------

PLACEMENT = Placement.explicit([[[0, 1, 2, 3], [0, 2], [1, 3], [0, 1, 2], [3], [1, 2, 3], [0, 2]],
                                [[1, 2], [0], [0, 1, 2, 3], [2, 3], [0, 1, 3], [1], [2, 3]]])
LAYOUT = ParamLayout(dense_numel=1003, expert_numel=((5, 130, 77, 1, 64, 33, 9), (12, 40, 7, 300, 11, 6, 2)))


def _contribution(kind: str, rank: int, layer: int, expert: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1 + 1000 * rank + 100 * layer + expert + (7 if kind == "random" else 0))
    if kind == "dyadic":   # small multiples of 1/8: every fp32 sum is exact, in any order
        return torch.randint(-512, 512, (numel,), generator=g).float() / 8
    return torch.randn(numel, generator=g)


def _dense_contribution(kind: str, rank: int) -> torch.Tensor:
    return _contribution(kind, rank, 99, 0, LAYOUT.dense_numel)


def _transport_worker(ctx):
    buckets = build_schedule(LAYOUT, PLACEMENT, "fomoe")
    transport = comm.GlooTransport()
    out = {}
    for kind, compression in (("dyadic", None), ("random", None), ("random", "bf16"), ("random", "int8")):
        avg, traffic = {}, []
        for b in buckets:
            if ctx.rank not in b.ranks:
                continue
            parts = ([_dense_contribution(kind, ctx.rank)] if b.dense_numel else []) + [
                _contribution(kind, ctx.rank, l, e, LAYOUT.expert_numel[l][e]) for l, e in b.experts]
            buf = torch.cat(parts)
            moved = transport.sum_(buf, b.ranks, compression)
            traffic.append((moved, comm.sum_bytes(b.numel, len(b.ranks), b.ranks.index(ctx.rank), compression)))
            buf /= len(b.ranks)
            offset = 0
            if b.dense_numel:
                avg["dense"] = buf[:b.dense_numel].clone()
                offset = b.dense_numel
            for l, e in b.experts:
                n = LAYOUT.expert_numel[l][e]
                avg[(l, e)] = buf[offset:offset + n].clone()
                offset += n
        out[(kind, compression)] = (avg, traffic)
    return out


@pytest.fixture(scope="module")
def transport_results():
    return launch.spawn(_transport_worker, 4, backend="gloo", timeout_s=180)


def _dense_reference(kind: str) -> dict:
    """All workers all-reduce full-size buffers (zeros where they hold nothing), / holder counts."""
    ref = {"dense": sum(_dense_contribution(kind, r) for r in range(4)) / 4}
    for l in range(LAYOUT.num_layers):
        for e in range(LAYOUT.num_experts):
            n = LAYOUT.expert_numel[l][e]
            total = torch.zeros(n)
            for r in range(4):
                total += _contribution(kind, r, l, e, n) if r in PLACEMENT.holders(l, e) else torch.zeros(n)
            ref[(l, e)] = total / len(PLACEMENT.holders(l, e))
    return ref


def test_sparse_allreduce_equals_dense_reference_exactly_in_fp32(transport_results):
    ref = _dense_reference("dyadic")
    for rank, res in enumerate(transport_results):
        avg, _ = res[("dyadic", None)]
        expect_keys = {"dense"} | {(l, e) for l in range(2) for e in range(7) if rank in PLACEMENT.holders(l, e)}
        assert set(avg) == expect_keys
        for key, value in avg.items():
            assert torch.equal(value, ref[key]), (rank, key)


@pytest.mark.parametrize("compression,tol", [(None, 1e-6), ("bf16", 2e-2), ("int8", 4e-2)])
def test_random_inputs_identical_on_all_holders_and_close_to_reference(transport_results, compression, tol):
    ref = _dense_reference("random")
    seen = {}
    for res in transport_results:
        avg, traffic = res[("random", compression)]
        for key, value in avg.items():
            if key in seen:
                assert torch.equal(value, seen[key]), f"holders disagree on {key}"
            seen[key] = value
            torch.testing.assert_close(value, ref[key], rtol=tol, atol=tol)
        for moved, formula in traffic:
            assert moved == formula
    assert len(seen) == 1 + 14


def test_bytes_equal_the_schedule(transport_results):
    buckets = build_schedule(LAYOUT, PLACEMENT, "fomoe")
    for rank, res in enumerate(transport_results):
        _, traffic = res[("dyadic", None)]
        moved = tuple(sum(t[0][i] for t in traffic) for i in range(2))
        assert moved == tuple(sum(b.traffic(rank)[i] for b in buckets) for i in range(2))
        assert moved[0] > 0


def test_transport_checks_its_inputs():
    t = comm.LoopbackTransport()
    with pytest.raises(ValueError, match="rank 0 is not a member"):
        t.sum_(torch.zeros(3), (1, 2))
    with pytest.raises(ValueError, match="contiguous 1-D fp32"):
        t.sum_(torch.zeros(3, dtype=torch.float64), (0,))
    buf = torch.arange(4.0)
    assert t.sum_(buf, (0,)) == (0, 0) and torch.equal(buf, torch.arange(4.0))


# ---- NCCL transport and bucket kernels (one GPU) ----------------------------------------------------

def _self_ring_expected(x: torch.Tensor, n: int, bf16: bool) -> torch.Tensor:
    """Position 0 of an n-member ring whose neighbours are both this very rank: every message
    it receives is the one it sends in the same step. Executes ring_plan step by step (chunks
    of equal length), rounding each hop to bf16 on a bf16 wire. On one GPU this drives the
    NCCL transport's pipelined schedule through every step, with data flowing across steps."""
    wire = (lambda t: t.to(torch.bfloat16).float()) if bf16 else (lambda t: t)
    plan = comm.ring_plan(x.numel(), n, 0)
    acc = x.clone()
    ch = plan.chunks
    for send_c, recv_c in plan.reduce_steps:
        msg = wire(acc[ch[send_c][0]:ch[send_c][0] + ch[send_c][1]])
        acc[ch[recv_c][0]:ch[recv_c][0] + ch[recv_c][1]] += msg
    o0, ol = ch[plan.owned_chunk]
    acc[o0:o0 + ol] = wire(acc[o0:o0 + ol])
    for send_c, recv_c in plan.gather_steps:
        acc[ch[recv_c][0]:ch[recv_c][0] + ch[recv_c][1]] = acc[ch[send_c][0]:ch[send_c][0] + ch[send_c][1]].clone()
    return acc


def _nccl_worker(ctx):
    torch.manual_seed(0)
    t = comm.NcclTransport(ctx.device, slice_bytes=4096)          # 1024-element slices: several per chunk
    out = {"versions": comm.nccl_versions()}
    x = torch.randn(12_000, device=ctx.device)
    y = torch.empty_like(x)
    out["sendrecv"] = (t._ops.nccl_sendrecv(t.handle, x, 0, y, 0), torch.equal(x, y))
    for n in (2, 3, 4):
        for bf16 in (False, True):
            buf = x.clone()                                        # 12000: equal chunks for n = 2, 3, 4
            plan = comm.ring_plan(buf.numel(), n, 0)
            src = buf.clone()
            moved = t._ops.nccl_ring_allreduce(t.handle, buf, torch.tensor(plan.table(), dtype=torch.int64), 0, 0,
                                               bf16, t.slice_elems)
            out[f"ring n={n} bf16={bf16}"] = (buf.cpu(), src.cpu(), moved, plan.elements())
    # A communicator split from the world one (a member, then a non-member: no handle) and an
    # all-reduce on it: one rank sums to itself.
    child = t._ops.nccl_split(t.handle, 0, 0)
    z = x.clone()
    t._ops.nccl_allreduce(child, z)
    out["split"] = (child not in (0, t.handle), torch.equal(z, x), t._ops.nccl_split(t.handle, -1, 0))
    t._ops.nccl_destroy(child)
    try:
        t._ops.nccl_ring_allreduce(t.handle, x, torch.tensor([[0, 20_000, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0]]),
                                   0, 0, False, 1024)
        out["bad_plan"] = None
    except RuntimeError as exc:
        out["bad_plan"] = str(exc)
    t.close()
    return out


@pytest.mark.cuda
def test_nccl_transport_on_one_gpu():
    res = launch.spawn(_nccl_worker, 1, backend="nccl", timeout_s=120)[0]
    v = res["versions"]
    assert v is not None and v["runtime"] >= v["compiled"], v
    moved, same = res["sendrecv"]
    assert same and list(moved) == [48_000, 48_000]
    for n in (2, 3, 4):
        for bf16 in (False, True):
            buf, x, moved, elements = res[f"ring n={n} bf16={bf16}"]
            assert torch.equal(buf, _self_ring_expected(x, n, bf16)), (n, bf16)
            assert list(moved) == [e * (2 if bf16 else 4) for e in elements]
    assert "plan row 0 names elements [0, 20000) of a buffer of 12000" in res["bad_plan"]
    assert res["split"] == (True, True, 0)


class _RecordedSplits:
    """The extension's NCCL ops as far as group preparation and the fp32 sum use them."""

    def __init__(self):
        self.splits, self.allreduces, self.rings = [], [], []

    def nccl_split(self, handle, color, key):
        self.splits.append((handle, color, key))
        return 0 if color < 0 else 100 + len(self.splits)

    def nccl_allreduce(self, handle, buf):
        self.allreduces.append((handle, buf.numel()))

    def nccl_ring_allreduce(self, handle, buf, table, nxt, prev, bf16, slice_elems):
        self.rings.append((handle, buf.numel(), bf16))
        return [0, 0]


def _transport_without_nccl(rank: int, world: int) -> comm.NcclTransport:
    t = object.__new__(comm.NcclTransport)   # no communicator: the ops are recorded, not run
    t.rank, t.world_size, t.handle, t.device, t.slice_elems = rank, world, 7, torch.device("cpu"), 1024
    t._ops, t._group_handles, t._prepared, t.group_allreduce = _RecordedSplits(), {}, set(), True
    t.device_type = "cpu"
    return t


def test_nccl_group_preparation_is_collective_and_capped():
    groups = [(0, 1, 2, 3), (1, 0), (2,), (3, 2), (0, 1), (1, 3), (0, 2)]
    ts = [_transport_without_nccl(rank, 4) for rank in range(4)]
    for t in ts:
        t.prepare_groups(groups, max_groups=3)
    # Every rank splits the same groups in the same order, members and non-members alike (a
    # rank that skipped a split would leave the others waiting in it): the first three distinct
    # groups of two or more ranks; the rest run the ring.
    assert all([color >= 0 for _, color, _ in t._ops.splits] == [t.rank in g for g in ((0, 1, 2, 3), (0, 1), (2, 3))]
               for t in ts)
    assert ts[0].group_communicators == [(0, 1), (0, 1, 2, 3)]
    assert ts[3].group_communicators == [(0, 1, 2, 3), (2, 3)]
    # An fp32 sum among a prepared group is one all-reduce on its communicator, counted as the
    # ring's bytes; the bf16 wire and an unprepared group run the ring on the world communicator.
    t = ts[1]
    buf = torch.zeros(1000)
    assert t.sum_(buf, (0, 1)) == comm.sum_bytes(1000, 2, 1)
    assert t._ops.allreduces == [(102, 1000)]   # rank 1's second split: (0, 1)
    t.sum_(buf, (0, 1), "bf16")
    t.sum_(buf, (1, 3))
    assert [(h, bf16) for h, _, bf16 in t._ops.rings] == [(7, True), (7, False)]


@pytest.mark.cuda
def test_bucket_kernels_match_the_cpu_path_bitwise(gen):
    if comm.nccl_ops() is None:
        pytest.skip("this build has no NCCL comm ops")
    ops = comm.nccl_ops()
    dev = torch.device("cuda")
    shapes = [(3, 5000), (17,), (1,), (2, 300)]
    glob = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    local = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    local[1] = local[1].to(torch.bfloat16)
    experts = [-1, 0, 1, 0]
    counts = torch.tensor([3.0, 0.0], device=dev)
    offsets, total = [], 7                                   # a gap at the start of the bucket
    for g in glob:
        offsets.append(total)
        total += g.numel()
    rows = [[g.data_ptr(), l.data_ptr(), g.numel(), o, e, 1 if l.dtype == torch.bfloat16 else 0]
            for g, l, o, e in zip(glob, local, offsets, experts)]
    bucket = torch.zeros(total, device=dev)
    ops.pack_delta(bucket, torch.tensor(rows, dtype=torch.int64), counts)
    for g, l, o, e in zip(glob, local, offsets, experts):
        want = g - l.float()
        if e >= 0:
            want = want * counts[e]
        assert torch.equal(bucket[o:o + g.numel()], want.reshape(-1))
    grads = [torch.full_like(g, float("nan")) for g in glob]
    urows = [[gr.data_ptr(), 0, gr.numel(), o, e, 0] for gr, o, e in zip(grads, offsets, experts)]
    ops.unpack_average(bucket, torch.tensor(urows, dtype=torch.int64), counts, 4.0)
    for gr, o, e in zip(grads, offsets, experts):
        src = bucket[o:o + gr.numel()]
        want = src / 4.0 if e < 0 else (src / counts[e] if counts[e] > 0 else torch.zeros_like(src))
        assert torch.equal(gr.reshape(-1), want)
    with pytest.raises(RuntimeError, match=r"segment 0 covers \[0, 99999\) of a bucket"):
        ops.pack_delta(bucket, torch.tensor([[rows[0][0], rows[0][1], 99_999, 0, -1, 0]]), None)


@pytest.mark.cuda
def test_sync_manager_on_gpu_matches_cpu(gen):
    import federation_workers as fw
    from fomoe.sync import SyncManager
    results = []
    for device in ("cpu", "cuda"):
        model = fw.make_model(None, 0).to(device)
        mgr = SyncManager(model, torch.optim.SGD(model.parameters(), lr=0.0), method="diloco", sync_every=1,
                          global_device=device)
        g = torch.Generator().manual_seed(5)
        for _ in range(2):
            with torch.no_grad():
                for p in model.parameters():   # dyadic moves: exact on both devices
                    p.add_((torch.randint(-8, 8, p.shape, generator=g).float() / 64).to(device))
            mgr.sync()
        results.append({k: v.detach().cpu() for k, v in mgr.global_state().items()})
        for k, v in model.state_dict().items():
            assert torch.equal(v, mgr.global_state()[k]), "θ_local must equal θ_global after a sync"
    if comm.nccl_ops() is not None:
        assert mgr._use_segment_kernels()
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-6, atol=1e-7)


def test_backend_choice_and_overrides(monkeypatch):
    monkeypatch.delenv("FOMOE_BACKEND", raising=False)
    assert launch.choose_backend("auto", 1) == ("nccl" if torch.cuda.is_available() else "gloo")
    assert launch.choose_backend("auto", 10_000) == "gloo"          # more workers than GPUs
    monkeypatch.setenv("FOMOE_BACKEND", "gloo")
    assert launch.choose_backend("auto", 1) == "gloo"
    with pytest.raises(ValueError, match="backend must be auto, gloo or nccl"):
        launch.choose_backend("mpi")
    with pytest.raises(ValueError, match="needs (CUDA GPUs|one GPU per local worker)"):
        launch.choose_backend("nccl", 10_000)


def test_init_from_env_outside_torchrun(monkeypatch):
    for var in ("RANK", "FOMOE_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    ctx = launch.init_from_env("gloo")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, "gloo", "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        launch.init_from_env("gloo")
