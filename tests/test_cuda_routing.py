"""The CUDA routing kernels (route, route_backward, dispatch, gather, combine, combine_gate_grad)
against the CPU kernels and fomoe.reference on fresh random inputs: integer outputs exactly,
floating outputs to rounding; gradients, opcheck, determinism, bad data, and CUDA-graph replay
of the layer's routing path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fomoe
from fomoe import ops, reference as ref
from routing_cases import random_ids, random_logits, random_resident

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROUTING_OPS = ("route", "route_backward", "dispatch", "gather", "combine", "combine_gate_grad")
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SCORES = [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]


@pytest.fixture(autouse=True)
def _cuda_routing_kernels(request, monkeypatch):
    missing = [name for name in ROUTING_OPS if name in ops.reference_fallbacks()]
    if missing and request.node.originalname != "test_cuda_build_has_routing_kernels":
        pytest.skip(f"this build has no CUDA kernels for {missing}")
    monkeypatch.delenv("FOMOE_VALIDATE", raising=False)


def cuda(t):
    return t.to("cuda") if t is not None else None


def tol(dtype):
    return {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}.get(
        dtype, dict(rtol=1e-2, atol=1e-2))


def test_cuda_build_has_routing_kernels():
    if not fomoe.WITH_CUDA:
        pytest.skip("CPU-only build")
    for name in ROUTING_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fomoe::{name}", "CUDA"), name
        assert name not in ops.reference_fallbacks()


# ---- route ----------------------------------------------------------------------------------

# (T, E, k): every kernel shape (one lane per token up to E=16, groups of 2..32 lanes, 32 logits
# per lane, streaming past E=1024), T from 0 to a full batch, k from 1 to E.
ROUTE_SHAPES = [
    (0, 8, 2), (1, 1, 1), (1, 8, 8), (7, 5, 3), (131, 16, 4), (131, 17, 8), (257, 64, 8), (1031, 128, 8),
    (16384, 128, 8), (8192, 8, 2), (97, 256, 8), (61, 256, 256), (53, 600, 24), (37, 1500, 9), (4099, 256, 8),
]
# Full batches in the dtypes routers use; every shape in every dtype.
ROUTE_CASES = [(T, E, k, dtype) for T, E, k in ROUTE_SHAPES for dtype in FLOATS
               if T < 8192 or dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("T,E,k,dtype", ROUTE_CASES, ids=str)
def test_route_matches_cpu_kernel_and_reference(T, E, k, dtype, gen):
    logits = random_logits(T, E, gen, dtype)
    for score, renorm in SCORES:
        w_gpu, ids_gpu = ops.route(cuda(logits), k, score, renorm)
        w_cpu, ids_cpu = ops.route(logits, k, score, renorm)
        assert w_gpu.dtype == w_cpu.dtype and ids_gpu.dtype == torch.int32
        assert torch.equal(ids_gpu.cpu(), ids_cpu), (score, renorm)
        torch.testing.assert_close(w_gpu.cpu(), w_cpu, **tol(torch.float64 if dtype == torch.float64 else
                                                               torch.float32))
        if dtype in (torch.float32, torch.float64):  # continuous logits: no ties, torch.topk agrees
            w_ref, ids_ref = ref.route(logits, k, score, renorm)
            assert torch.equal(ids_gpu.cpu(), ids_ref)
            torch.testing.assert_close(w_gpu.cpu(), w_ref, **tol(dtype))


@pytest.mark.parametrize("E", [6, 40, 300, 1100])
def test_route_ties_nan_inf_and_signed_zeros_rank_as_on_cpu(E, gen):
    # Heavy ties: higher logit first, NaN as +inf, -0 == +0, ties to the lower expert id.
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 2.5])
    logits = values[torch.randint(len(values), (64, E), generator=gen)]
    logits[:8] = torch.randn(8, E, generator=gen).round()  # integer-valued rows: ties without NaN
    for k in sorted({1, 3, min(8, E), E}):
        for score, renorm in SCORES:
            w_gpu, ids_gpu = ops.route(cuda(logits), k, score, renorm)
            w_cpu, ids_cpu = ops.route(logits, k, score, renorm)
            assert torch.equal(ids_gpu.cpu(), ids_cpu), (k, score, renorm)
            torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (7, 5, 3), (131, 17, 8), (1031, 128, 8), (61, 256, 256),
                                   (37, 1500, 9)])
def test_route_backward_matches_cpu_kernel_and_reference(T, E, k, dtype, gen):
    logits = random_logits(T, E, gen, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for score, renorm in SCORES:
        w, ids = ops.route(logits, k, score, renorm)
        gw = torch.randn(T, k, generator=gen, dtype=torch.float64).to(acc)
        args = (gw, logits, w, ids, score, renorm)
        g_gpu = torch.ops.fomoe.route_backward(*map(cuda, args[:4]), score, renorm)
        g_cpu = torch.ops.fomoe.route_backward(*args)
        assert g_gpu.dtype == dtype and g_gpu.shape == (T, E)
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, **tol(dtype))
        if dtype != torch.bfloat16:
            torch.testing.assert_close(g_gpu.cpu(), ref.route_backward(*args), **tol(dtype))


@pytest.mark.parametrize("score,renorm", SCORES)
def test_route_gradcheck_on_cuda(score, renorm, gen):
    logits = random_logits(5, 7, gen, torch.float64, device="cuda").requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.route(z, 3, score, renorm)[0], (logits,))


# ---- dispatch -------------------------------------------------------------------------------

# (T, E, k, resident experts): none skipped, half, one, all skipped (no local experts, or local
# slots that receive nothing), k > 8, more tiles than one scan chunk, more local experts than fit
# the default shared memory.
DISPATCH_CASES = [
    (0, 8, 2, 4), (0, 4, 1, 0), (1, 1, 1, 1), (1, 8, 2, 0), (2, 8, 8, 8), (131, 16, 4, 16), (131, 16, 4, 8),
    (1031, 128, 8, 64), (1031, 128, 8, 1), (1031, 128, 8, 0), (4099, 64, 24, 32), (16384, 128, 8, 64),
    (8192, 8, 2, 4), (16384, 256, 8, 256), (65537, 32, 8, 16), (4096, 2048, 8, 2048), (997, 256, 1, 128),
]


@pytest.mark.parametrize("T,E,k,num_local", DISPATCH_CASES)
def test_dispatch_matches_cpu_kernel_and_reference_exactly(T, E, k, num_local, gen):
    resident_map, _ = random_resident(E, num_local, gen)
    ids = random_ids(T, E, k, gen)
    out_gpu = ops.dispatch(cuda(ids), cuda(resident_map), num_local)
    out_cpu = ops.dispatch(ids, resident_map, num_local)
    out_ref = ref.dispatch(ids, resident_map, num_local)
    for name, g, c, r in zip(("permutation", "offsets", "inverse"), out_gpu, out_cpu, out_ref):
        assert g.dtype == torch.int32 and g.shape == c.shape, name
        assert torch.equal(g.cpu(), c), name
        assert torch.equal(g.cpu(), r), name


def test_dispatch_all_tokens_to_one_expert_and_empty_slots(gen):
    E, T, k = 16, 5003, 1
    resident_map = torch.full((E,), -1, dtype=torch.int32)
    resident_map[[3, 7, 11]] = torch.tensor([0, 1, 2], dtype=torch.int32)
    for expert in (7, 2):  # resident (slots 0 and 2 stay empty) and not resident (all skipped)
        ids = torch.full((T, k), expert, dtype=torch.int32)
        out_gpu = ops.dispatch(cuda(ids), cuda(resident_map), 3)
        for g, c in zip(out_gpu, ops.dispatch(ids, resident_map, 3)):
            assert torch.equal(g.cpu(), c)
    # Duplicate ids within a token are legal input: stable order still decides the rows.
    ids = torch.randint(0, 2, (777, 6), generator=gen, dtype=torch.int32)
    one = torch.tensor([0, -1], dtype=torch.int32)
    for g, c in zip(ops.dispatch(cuda(ids), cuda(one), 1), ops.dispatch(ids, one, 1)):
        assert torch.equal(g.cpu(), c)


# ---- gather / combine ------------------------------------------------------------------------

def dispatched(T, E, k, num_local, gen):
    resident_map, _ = random_resident(E, num_local, gen)
    ids = random_ids(T, E, k, gen)
    return ops.dispatch(ids, resident_map, num_local)


# (T, E, k, num_local, d). Combine's shapes: k = 1, 2, 3..4, 5..8 read 8, 4, 2, 1 vectors of each
# slot per lane per step, k > 8 passes of 8 slots; rows split into segments of 4 steps (d = 4096:
# several; d = 2056 in fp32/fp64: several, the last one partial), rows no multiple of a step long.
ROW_CASES = [(0, 4, 2, 2, 8), (1, 4, 2, 4, 1), (37, 8, 2, 4, 3), (131, 16, 4, 8, 64), (257, 8, 8, 8, 100),
             (1031, 32, 8, 16, 256), (257, 64, 4, 32, 4096), (61, 8, 1, 8, 264), (73, 16, 3, 8, 520),
             (29, 16, 5, 12, 1032), (19, 32, 12, 24, 136), (41, 8, 2, 6, 2056)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("T,E,k,num_local,d", ROW_CASES)
def test_gather_equals_cpu_kernel_bitwise(T, E, k, num_local, d, dtype, gen):
    perm, _, inv = dispatched(T, E, k, num_local, gen)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64).to(dtype)
    scale = torch.rand(T, k, generator=gen, dtype=torch.float64).to(torch.float64 if dtype == torch.float64
                                                                       else torch.float32)
    for s in (None, scale):
        out_gpu = ops.gather(cuda(x), cuda(perm), cuda(inv), cuda(s))
        out_cpu = ops.gather(x, perm, inv, s)
        assert out_gpu.dtype == dtype and torch.equal(out_gpu.cpu(), out_cpu)
        assert torch.equal(out_gpu.cpu(), ref.gather(x, perm, inv, s))


# Large batches are gathered token by token (each token row read once, written to its rows);
# the result must stay the row-by-row kernel's for any tables, also where permutation and
# inverse disagree (rows then come from permutation, as on the CPU).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("T,d", [(4096, 8), (5003, 24), (2048, 4096)])
def test_token_major_gather_equals_cpu_kernel_for_any_tables(T, d, dtype, gen):
    k = 2
    perm, _, inv = dispatched(T, 16, k, 8, gen)
    x = torch.randn(T, d, generator=gen).to(dtype)
    scale = torch.rand(T, k, generator=gen)
    kept = int((perm >= 0).sum())
    swapped = perm.clone()                       # two kept rows exchanged, a third made skipped
    swapped[0], swapped[kept - 1] = perm[kept - 1], perm[0]
    swapped[kept // 2] = -1
    junk_inv = torch.where(torch.rand(T, k, generator=gen) < 0.1, torch.randint(-5, 3 * T * k, (T, k), generator=gen,
                                                                               dtype=torch.int32), inv)
    for p, i in ((perm, inv), (swapped, inv), (perm, junk_inv)):
        for s in (None, scale):
            out_gpu = ops.gather(cuda(x), cuda(p), cuda(i), cuda(s))
            assert torch.equal(out_gpu.cpu(), ops.gather(x, p, inv, s))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("T,E,k,num_local,d", ROW_CASES)
def test_combine_and_gate_grad_match_cpu_kernel(T, E, k, num_local, d, dtype, gen):
    perm, _, inv = dispatched(T, E, k, num_local, gen)
    rows = torch.randn(T * k, d, generator=gen, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gate = torch.rand(T, k, generator=gen, dtype=torch.float64).to(acc)
    grad_out = torch.randn(T, d, generator=gen, dtype=torch.float64).to(dtype)
    close = tol(dtype) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
    for g in (None, gate):
        y_gpu = ops.combine(cuda(rows), cuda(perm), cuda(inv), cuda(g))
        assert y_gpu.dtype == dtype
        torch.testing.assert_close(y_gpu.cpu(), ops.combine(rows, perm, inv, g), **close)
        torch.testing.assert_close(y_gpu.cpu(), ref.combine(rows, perm, inv, g), **close)
    gg_gpu = torch.ops.fomoe.combine_gate_grad(cuda(grad_out), cuda(rows), cuda(inv))
    assert gg_gpu.dtype == acc
    dot_tol = dict(rtol=1e-4, atol=1e-4) if acc == torch.float32 else tol(acc)
    torch.testing.assert_close(gg_gpu.cpu(), torch.ops.fomoe.combine_gate_grad(grad_out, rows, inv), **dot_tol)
    torch.testing.assert_close(gg_gpu.cpu(), ref.combine_gate_grad(grad_out, rows, inv), **dot_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_that_are_not_16_byte_aligned_take_the_element_path(dtype, gen):
    T, k, d = 67, 2, 64
    perm, _, inv = dispatched(T, 8, k, 4, gen)
    storage = torch.randn(T * k * d + 1, generator=gen).to(dtype)
    x = storage[1:1 + T * d].view(T, d)          # contiguous, storage offset of one element
    rows = storage[1:1 + T * k * d].view(T * k, d)
    gate = torch.rand(T, k, generator=gen)
    xs = cuda(storage)[1:1 + T * d].view(T, d)
    assert xs.is_contiguous() and xs.data_ptr() % 16 != 0
    assert torch.equal(ops.gather(xs, cuda(perm), cuda(inv)).cpu(), ops.gather(x, perm, inv))
    assert torch.equal(ops.gather(xs, cuda(perm), cuda(inv), cuda(gate)).cpu(), ops.gather(x, perm, inv, gate))
    rs = cuda(storage)[1:1 + T * k * d].view(T * k, d)
    torch.testing.assert_close(ops.combine(rs, cuda(perm), cuda(inv), cuda(gate)).cpu(),
                               ops.combine(rows, perm, inv, gate), **tol(dtype))


def test_gather_and_combine_gradients_match_cpu(gen):
    T, E, k, d = 97, 16, 4, 48
    perm, _, inv = dispatched(T, E, k, 8, gen)
    x = torch.randn(T, d, generator=gen)
    rows = torch.randn(T * k, d, generator=gen)
    gate = torch.rand(T, k, generator=gen)
    probe_rows = torch.randn(T * k, d, generator=gen)
    probe_y = torch.randn(T, d, generator=gen)

    def grads(device):
        xs, rs, gs = (t.to(device).requires_grad_(True) for t in (x, rows, gate))
        tables = (perm.to(device), inv.to(device))
        loss = (ops.gather(xs, *tables, gs) * probe_rows.to(device)).sum()
        loss = loss + (ops.combine(rs, *tables, gs) * probe_y.to(device)).sum()
        return [g.cpu() for g in torch.autograd.grad(loss, (xs, rs, gs))]

    for g_gpu, g_cpu in zip(grads("cuda"), grads("cpu")):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-4, atol=1e-4)


def test_gather_and_combine_gradcheck_on_cuda(gen):
    T, k, d = 11, 3, 5
    perm, _, inv = dispatched(T, 6, k, 3, gen)
    perm, inv = cuda(perm), cuda(inv)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64, device="cpu").cuda().requires_grad_(True)
    rows = torch.randn(T * k, d, generator=gen, dtype=torch.float64).cuda().requires_grad_(True)
    gate = torch.rand(T, k, generator=gen, dtype=torch.float64).cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: ops.gather(a, perm, inv, g), (x, gate))
    assert torch.autograd.gradcheck(lambda r, g: ops.combine(r, perm, inv, g), (rows, gate))


# ---- opcheck, determinism ----------------------------------------------------------------------

def _opcheck_samples(gen):
    T, E, k, d = 9, 5, 2, 8
    resident_map, _ = random_resident(E, 3, gen, device="cuda")
    ids = random_ids(T, E, k, gen, device="cuda")
    perm, _, inv = ops.dispatch(ids, resident_map, 3)
    logits = random_logits(T, E, gen, device="cuda")
    w, rids = ops.route(logits, k)
    x = torch.randn(T, d, generator=gen).cuda()
    rows = torch.randn(T * k, d, generator=gen).cuda()
    gate = torch.rand(T, k, generator=gen).cuda()
    return [
        ("route", (logits.clone().requires_grad_(True), k, "softmax", True)),
        ("route", (logits, 3, "sigmoid", False)),
        ("route_backward", (torch.randn(T, k, generator=gen).cuda(), logits, w, rids, "softmax", True)),
        ("dispatch", (ids, resident_map, 3)),
        ("gather", (x.clone().requires_grad_(True), perm, inv, gate.clone().requires_grad_(True))),
        ("gather", (x, perm, inv, None)),
        ("combine", (rows.clone().requires_grad_(True), perm, inv, gate.clone().requires_grad_(True))),
        ("combine_gate_grad", (x, rows, inv)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck_on_cuda(index, gen):
    name, args = _opcheck_samples(gen)[index]
    torch.library.opcheck(getattr(torch.ops.fomoe, name).default, args)


def test_outputs_are_bitwise_deterministic(gen):
    T, E, k, d = 8192, 128, 8, 512
    logits = random_logits(T, E, gen, device="cuda")
    resident_map, _ = random_resident(E, 64, gen, device="cuda")
    x = torch.randn(T, d, generator=gen).cuda().to(torch.bfloat16)

    def run():
        w, ids = ops.route(logits, k)
        perm, offsets, inv = ops.dispatch(ids, resident_map, 64)
        rows = ops.gather(x, perm, inv, w)
        y = ops.combine(rows, perm, inv, w)
        gg = torch.ops.fomoe.combine_gate_grad(x, rows, inv)
        gl = torch.ops.fomoe.route_backward(gg, logits, w, ids, "softmax", True)
        return w, ids, perm, offsets, inv, rows, y, gg, gl

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---- bad data and bad input ------------------------------------------------------------------

def test_validation_mode_reports_bad_data(monkeypatch, gen):
    monkeypatch.setenv("FOMOE_VALIDATE", "1")
    T, E, k = 33, 8, 2
    resident_map, _ = random_resident(E, 4, gen, device="cuda")
    ids = random_ids(T, E, k, gen, device="cuda")
    perm, _, inv = ops.dispatch(ids, resident_map, 4)  # good data passes
    bad_ids = ids.clone()
    bad_ids[5, 1] = E + 3
    with pytest.raises(RuntimeError, match="fomoe.dispatch: an expert id is out of range"):
        ops.dispatch(bad_ids, resident_map, 4)
    bad_map = resident_map.clone()
    bad_map[0] = 4
    with pytest.raises(RuntimeError, match="resident_map entry is not a local slot"):
        ops.dispatch(ids, bad_map, 4)
    with pytest.raises(RuntimeError, match="resident_map entry is not a local slot"):
        ops.dispatch(ids[:0], bad_map, 4)
    x = torch.randn(T, 16, device="cuda")
    bad_perm = perm.clone()
    bad_perm[3] = T * k + 7
    with pytest.raises(RuntimeError, match="fomoe.gather: a routing table entry is outside"):
        ops.gather(x, bad_perm, inv)
    bad_inv = inv.clone()
    bad_inv[2, 0] = -5
    rows = torch.randn(T * k, 16, device="cuda")
    with pytest.raises(RuntimeError, match="fomoe.combine: a routing table entry is outside"):
        ops.combine(rows, perm, bad_inv)
    with pytest.raises(RuntimeError, match="fomoe.combine_gate_grad: a routing table entry is outside"):
        torch.ops.fomoe.combine_gate_grad(x, rows, bad_inv)
    logits = random_logits(T, E, gen, device="cuda")
    w, rids = ops.route(logits, k)
    rids[0, 0] = -1
    with pytest.raises(RuntimeError, match="fomoe.route_backward: an expert id is out of range"):
        torch.ops.fomoe.route_backward(torch.ones_like(w), logits, w, rids, "softmax", True)


def test_bad_data_is_skipped_and_never_read_out_of_bounds(gen):
    """Without FOMOE_VALIDATE, entries out of range act as skipped (and raise a device flag)."""
    T, E, k, d = 301, 8, 2, 32
    n = T * k
    resident_map, _ = random_resident(E, 4, gen)
    ids = random_ids(T, E, k, gen)
    bad = torch.rand(T, k, generator=gen) < 0.1
    far = torch.randint(1, 1 << 30, (T, k), generator=gen, dtype=torch.int32)
    sign = torch.rand(T, k, generator=gen) < 0.5

    def junk(limit):  # values outside [-1, limit)
        return torch.where(sign, far + limit - 1, -1 - far).to(torch.int32)

    bad_ids = torch.where(bad, junk(E), ids)
    bad_map = resident_map.clone()
    bad_map[int((resident_map < 0).nonzero()[0])] = 1000  # garbage in an entry of a non-resident expert
    bad_map[int((resident_map < 0).nonzero()[1])] = -7
    out_gpu = ops.dispatch(cuda(bad_ids), cuda(bad_map), 4)
    # Expected: a bad id or map entry behaves as an expert this worker does not hold.
    clean_map = torch.cat([torch.where((bad_map >= -1) & (bad_map < 4), bad_map, -1),
                           torch.tensor([-1], dtype=torch.int32)])
    expected = ops.dispatch(torch.where(bad, E, ids).to(torch.int32), clean_map, 4)
    for g, c in zip(out_gpu, expected):
        assert torch.equal(g.cpu(), c)

    perm, _, inv = ops.dispatch(ids, resident_map, 4)
    x = torch.randn(T, d, generator=gen)
    bad_perm = torch.where(bad.reshape(-1), junk(n).reshape(-1), perm)
    assert torch.equal(ops.gather(cuda(x), cuda(bad_perm), cuda(inv)).cpu(),
                       ops.gather(x, torch.where(bad.reshape(-1), -1, perm), inv))
    rows = torch.randn(n, d, generator=gen)
    bad_inv = torch.where(bad, junk(n), inv)
    torch.testing.assert_close(ops.combine(cuda(rows), cuda(perm), cuda(bad_inv)).cpu(),
                               ops.combine(rows, perm, torch.where(bad, -1, inv)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.ops.fomoe.combine_gate_grad(cuda(x), cuda(rows), cuda(bad_inv)).cpu(),
                               torch.ops.fomoe.combine_gate_grad(x, rows, torch.where(bad, -1, inv)),
                               rtol=1e-5, atol=1e-5)
    logits = random_logits(T, E, gen)
    w, rids = ops.route(logits, k)
    gw = torch.randn(T, k, generator=gen)
    g_gpu = torch.ops.fomoe.route_backward(cuda(gw), cuda(logits), cuda(w), cuda(torch.where(bad, junk(E), rids)),
                                           "sigmoid", True)
    assert torch.isfinite(g_gpu).all()
    torch.cuda.synchronize()  # an out-of-bounds access would surface here


def _tables(gen):
    ids = random_ids(16, 8, 2, gen, device="cuda")
    resident_map, _ = random_resident(8, 4, gen, device="cuda")
    return (ids, resident_map) + ops.dispatch(ids, resident_map, 4)


# One bad input per test: each names what is wrong, none reaches a kernel.
BAD_INPUTS = {
    "dispatch: map on another device": (
        "resident_map is on cpu", lambda ids, m, perm, off, inv: torch.ops.fomoe.dispatch(ids, m.cpu(), 4)),
    "dispatch: int64 ids": (
        "ids must be int32", lambda ids, m, perm, off, inv: torch.ops.fomoe.dispatch(ids.long(), m, 4)),
    "dispatch: num_local > num_experts": (
        "num_local must be in", lambda ids, m, perm, off, inv: torch.ops.fomoe.dispatch(ids, m, 9)),
    "route: top_k > num_experts": (
        "top_k must be in", lambda ids, m, perm, off, inv: ops.route(torch.randn(4, 3, device="cuda"), 4)),
    "gather: permutation on another device": (
        "permutation is on", lambda ids, m, perm, off, inv: ops.gather(torch.randn(16, 8, device="cuda"),
                                                                     perm.cpu(), inv)),
    "combine: rows of the wrong length": (
        "rows must be", lambda ids, m, perm, off, inv: ops.combine(torch.randn(5, 8, device="cuda"), perm, inv)),
    "combine_gate_grad: mismatched shapes": (
        "want grad_out", lambda ids, m, perm, off, inv: torch.ops.fomoe.combine_gate_grad(
            torch.randn(16, 7, device="cuda"), torch.randn(32, 8, device="cuda"), inv)),
}


# ---- CUDA graphs -------------------------------------------------------------------------------

def test_layer_routing_path_replays_from_a_cuda_graph():
    """route -> dispatch -> gather -> expert stand-in -> combine of a fomoe.MoE layer, captured once
    and replayed with new inputs, equals eager bit for bit: no host synchronisation anywhere.
    With a CUDA expert_ffn in the build, the whole layer forward is captured instead."""
    torch.manual_seed(3)
    layer = fomoe.MoE(d_model=128, d_ff=256, num_experts=16, top_k=4, resident_experts=list(range(0, 16, 2)),
                      init_seed=5).cuda()
    cfg = layer.config
    whole_layer = "expert_ffn" not in ops.reference_fallbacks()

    def routing_path(x):
        if whole_layer:
            return (layer(x),)
        logits = F.linear(x, layer.router.weight)
        w, ids = ops.route(logits, cfg.top_k, cfg.score, cfg.renormalize)
        perm, offsets, inv = ops.dispatch(ids, layer.resident_map, layer.num_local)
        rows = torch.tanh(ops.gather(x, perm, inv))  # stands in for the experts
        return ops.combine(rows, perm, inv, w), offsets, inv

    static_x = torch.randn(2048, 128, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            routing_path(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = routing_path(static_x)
    for _ in range(3):
        x = torch.randn(2048, 128, device="cuda")
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            eager = routing_path(x)
        for a, b in zip(static_out, eager):
            if whole_layer:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_input_with_a_clear_error(case, gen):
    message, call = BAD_INPUTS[case]
    tables = _tables(gen)
    with pytest.raises(RuntimeError, match=message):
        call(*tables)
