"""Every fomoe op on CPU against fomoe.reference, plus gradcheck and opcheck."""

import itertools

import pytest
import torch

import fomoe  # noqa: F401  (loads the op library)
from fomoe import ops, reference as ref
from routing_cases import check_router_logits_from_bf16, random_ids, random_logits, random_resident, routing_problem

ROUTE_CASES = [(T, E, k) for T in (0, 1, 7, 31, 128) for E in (1, 3, 8, 64) for k in (1, 2, 3, 8) if k <= E]


@pytest.mark.parametrize("T,E,k", ROUTE_CASES)
@pytest.mark.parametrize("score,renormalize", list(itertools.product(("softmax", "sigmoid"), (True, False))))
def test_route_matches_reference(T, E, k, score, renormalize, gen):
    logits = random_logits(T, E, gen)
    w, ids = ops.route(logits, k, score, renormalize)
    w_ref, ids_ref = ref.route(logits, k, score, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    if T and renormalize:
        torch.testing.assert_close(w.sum(1), torch.ones(T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_route_dtypes_compute_in_fp32(dtype, gen):
    logits = random_logits(33, 16, gen, dtype=dtype)
    w, ids = ops.route(logits, 4)
    w_ref, ids_ref = ref.route(logits, 4)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("score,renormalize", list(itertools.product(("softmax", "sigmoid"), (True, False))))
@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (5, 3, 2), (17, 8, 3), (9, 64, 8)])
def test_route_gradients(T, E, k, score, renormalize, gen):
    logits = random_logits(T, E, gen, dtype=torch.float64).requires_grad_(True)
    torch.autograd.gradcheck(lambda z: ops.route(z, k, score, renormalize)[0], (logits,))
    w, ids = ops.route(logits, k, score, renormalize)
    grad_w = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(w, logits, grad_w)
    expected = ref.route_backward(grad_w, logits, w, ids, score, renormalize)
    torch.testing.assert_close(grad, expected)


DISPATCH_CASES = [(T, E, k, L) for T, E, k in [(0, 3, 2), (1, 1, 1), (2, 3, 3), (13, 8, 2), (97, 64, 8), (256, 16, 4)]
                  for L in sorted({0, 1, E // 2, E})]


@pytest.mark.parametrize("T,d,E", [(0, 16, 4), (1, 8, 1), (257, 96, 16), (64, 200, 64)])
def test_router_logits_from_bf16_are_within_fp32_class_error(T, d, E, gen):
    check_router_logits_from_bf16(T, d, E, gen)


def test_router_logits_other_dtypes_widen(gen):
    w = torch.randn(8, 32, generator=gen)
    for dtype, acc in ((torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)):
        x = torch.randn(5, 32, generator=gen).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast does not narrow the router
            got = ops.router_logits(x, w)
        assert got.dtype == acc
        torch.testing.assert_close(got, ref.router_logits(x, w), rtol=0, atol=0)
    # A bf16 weight (a model cast to bf16) takes the bf16-pieces path and gets a bf16 gradient.
    x = torch.randn(5, 32, generator=gen).bfloat16()
    wb = w.bfloat16().requires_grad_()
    got = ops.router_logits(x, wb)
    torch.testing.assert_close(got, ref.router_logits(x.double(), wb.double()).float(), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert wb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("T,E,k,num_local", DISPATCH_CASES)
def test_dispatch_matches_reference(T, E, k, num_local, gen):
    ids = random_ids(T, E, k, gen)
    resident_map, chosen = random_resident(E, num_local, gen)
    perm, offsets, inverse = ops.dispatch(ids, resident_map, num_local)
    perm_ref, offsets_ref, inverse_ref = ref.dispatch(ids, resident_map, num_local)
    assert torch.equal(offsets, offsets_ref)
    kept = int(offsets[-1])
    assert kept == sum(int((ids == e).sum()) for e in chosen)
    assert torch.equal(inverse, inverse_ref)
    # Per expert, the same assignments (the op also promises the stable order, checked exactly).
    for slot in range(num_local):
        a, b = int(offsets[slot]), int(offsets[slot + 1])
        assert torch.equal(perm[a:b].sort().values, perm_ref[a:b].sort().values)
        assert bool((ids.reshape(-1)[perm[a:b].long()] == chosen[slot]).all())
    assert torch.equal(perm, perm_ref)
    assert bool((perm[kept:] == -1).all())


def test_dispatch_skips_everything_and_nothing(gen):
    ids = random_ids(50, 6, 2, gen)
    none_held = torch.full((6,), -1, dtype=torch.int32)
    perm, offsets, inverse = ops.dispatch(ids, none_held, 0)
    assert offsets.tolist() == [0] and bool((perm == -1).all()) and bool((inverse == -1).all())
    all_held = torch.arange(6, dtype=torch.int32)
    perm, offsets, inverse = ops.dispatch(ids, all_held, 6)
    assert int(offsets[-1]) == 100 and bool((inverse >= 0).all())
    assert torch.equal(perm[inverse.reshape(-1).long()], torch.arange(100, dtype=torch.int32))


@pytest.mark.parametrize("T,d,E,k,L", [(0, 4, 3, 2, 2), (1, 3, 1, 1, 1), (11, 5, 4, 2, 3), (29, 16, 8, 3, 4)])
def test_gather_combine_match_reference(T, d, E, k, L, gen):
    p = routing_problem(T, d, 3, E, k, L, gen, dtype=torch.float32)
    x, perm, inv, gate = p["x"], p["permutation"], p["inverse"], p["gate"]
    for scale in (None, gate):
        torch.testing.assert_close(ops.gather(x, perm, inv, scale), ref.gather(x, perm, inv, scale))
    rows = torch.randn(T * k, d, generator=gen)
    for g in (None, gate):
        torch.testing.assert_close(ops.combine(rows, perm, inv, g), ref.combine(rows, perm, inv, g))
    gy = torch.randn(T, d, generator=gen)
    torch.testing.assert_close(torch.ops.fomoe.combine_gate_grad(gy, rows, inv), ref.combine_gate_grad(gy, rows, inv))


def test_gather_combine_gradcheck(gen):
    p = routing_problem(9, 4, 3, 5, 2, 3, gen)
    perm, inv = p["permutation"], p["inverse"]
    x = p["x"].requires_grad_(True)
    scale = p["gate"].requires_grad_(True)
    torch.autograd.gradcheck(lambda a, s: ops.gather(a, perm, inv, s), (x, scale))
    rows = torch.randn(18, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r, g: ops.combine(r, perm, inv, g), (rows, scale))


@pytest.mark.parametrize("counts", [[0], [3], [0, 5, 0, 2], [1, 0, 0], [7, 1, 4]])
def test_grouped_mm_matches_reference(counts, gen):
    E, K, M = len(counts), 6, 5
    N = sum(counts) + 3  # trailing padding rows must come out zero
    offsets = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32)
    a = torch.randn(N, K, generator=gen)
    b = torch.randn(E, K, M, generator=gen)
    out = ops.grouped_mm(a, b, offsets)
    torch.testing.assert_close(out, ref.grouped_mm(a, b, offsets))
    assert bool((out[sum(counts):] == 0).all())
    torch.testing.assert_close(ops.grouped_mm(a, b.transpose(1, 2).contiguous().transpose(1, 2), offsets), out)
    g = torch.randn(N, M, generator=gen)
    torch.testing.assert_close(ops.grouped_mm_wgrad(a, g, offsets), ref.grouped_mm_wgrad(a, g, offsets))


def test_grouped_mm_gradcheck(gen):
    offsets = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: ops.grouped_mm(x, w, offsets), (a, b))


EXPERT_FFN_CASES = [(0, 4, 3, 3, 2, 2), (1, 4, 3, 1, 1, 1), (7, 6, 5, 4, 2, 4), (23, 8, 6, 8, 3, 3),
                    (31, 16, 12, 64, 8, 32)]


@pytest.mark.parametrize("T,d,f,E,k,L", EXPERT_FFN_CASES)
def test_expert_ffn_matches_reference(T, d, f, E, k, L, gen):
    p = routing_problem(T, d, f, E, k, L, gen, dtype=torch.float32)
    args = (p["x"], p["permutation"], p["offsets"], p["inverse"], p["w13"], p["w2"], p["gate"])
    y, h = torch.ops.fomoe.expert_ffn(*args, True)
    y_ref, h_ref = ref.expert_ffn(*args, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    kept = int(p["offsets"][-1])
    torch.testing.assert_close(h[:kept], h_ref[:kept], rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape, generator=gen)
    grads = torch.ops.fomoe.expert_ffn_backward(gy, *args, h)
    grads_ref = ref.expert_ffn_backward(gy, *args, h)
    for name, g, g_ref in zip(("x", "w13", "w2", "gate"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_expert_ffn_gradcheck(gen):
    p = routing_problem(6, 4, 3, 4, 2, 3, gen)
    leaves = [p[n].requires_grad_(True) for n in ("x", "w13", "w2", "gate")]

    def fn(x, w13, w2, gate):
        return ops.expert_ffn(x, p["permutation"], p["offsets"], p["inverse"], w13, w2, gate)

    torch.autograd.gradcheck(fn, tuple(leaves))


def test_expert_ffn_with_weights_of_another_dtype(gen):
    # Activations in a lower precision than the weights (fp32 master weights under autocast):
    # the op computes in x's dtype on the weights cast to it, returns the weight gradients in
    # the weights' dtype, and autograd records no cast node for them.
    p = routing_problem(23, 8, 6, 5, 2, 4, gen, dtype=torch.float32)
    x = p["x"].to(torch.bfloat16)
    w13, w2 = p["w13"].to(torch.bfloat16).float(), p["w2"].to(torch.bfloat16).float()  # bf16-exact
    tables = (p["permutation"], p["offsets"], p["inverse"])

    def run(w13_, w2_):
        leaves = [t.clone().requires_grad_(True) for t in (x, w13_, w2_, p["gate"])]
        y = ops.expert_ffn(leaves[0], *tables, leaves[1], leaves[2], leaves[3])
        y.float().square().sum().backward()
        return y, [t.grad for t in leaves], y.grad_fn

    y, grads, node = run(w13, w2)
    y_low, grads_low, _ = run(w13.to(torch.bfloat16), w2.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_low)
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for g, g_low in zip(grads, grads_low):
        torch.testing.assert_close(g, g_low.to(g.dtype), rtol=0, atol=0)  # CPU: same bf16 arithmetic
    assert all("ToCopy" not in n.name() for n, _ in node.next_functions if n is not None)
    h = torch.ops.fomoe.expert_ffn(x, *tables, w13, w2, p["gate"], True)[1]
    gy = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    got = torch.ops.fomoe.expert_ffn_backward(gy, x, *tables, w13, w2, p["gate"], h, torch.float64)
    want = ref.expert_ffn_backward(gy, x, *tables, w13, w2, p["gate"], h, torch.float64)
    for g, g_ref in zip(got, want):
        assert g.dtype == g_ref.dtype
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-2)


def test_expert_ffn_without_saved_h_refuses_backward(gen):
    p = routing_problem(4, 4, 3, 2, 1, 2, gen)
    x = p["x"].requires_grad_(True)
    y, _ = torch.ops.fomoe.expert_ffn(x, p["permutation"], p["offsets"], p["inverse"], p["w13"], p["w2"],
                                      p["gate"], False)
    with pytest.raises(RuntimeError, match="save_for_backward"):
        y.sum().backward()


# ---- rotary ----------------------------------------------------------------------------------

def rotary_tables(S: int, D: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(S, dtype=torch.float64), 10000.0 ** (-torch.arange(0, D, 2) / D))
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,H,D", [(2, 7, 3, 8), (1, 1, 1, 2), (3, 16, 4, 64)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotary_matches_reference(B, S, H, D, dtype, inverse, gen):
    x = torch.randn(B, S, H, D, generator=gen).to(dtype)
    cos, sin = rotary_tables(S, D)
    got = ops.rotary(x, cos, sin, inverse)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, ref.rotary(x, cos, sin, inverse))
    # A rotation keeps each pair's length, and inverse undoes it.
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ops.rotary(got, cos, sin, not inverse), x)


def test_rotary_takes_strided_views(gen):
    # q and k as the projection lays them out: a [B, S, 3, H, D] tensor, two of three slices.
    qkv = torch.randn(2, 6, 3, 4, 16, generator=gen)
    qk = qkv[:, :, :2].reshape(2, 6, 8, 16)  # a view: strides of the 5-D tensor
    assert not qk.is_contiguous()
    cos, sin = rotary_tables(6, 16)
    torch.testing.assert_close(ops.rotary(qk, cos, sin), ops.rotary(qk.contiguous(), cos, sin), rtol=0, atol=0)
    t = torch.randn(2, 16, 6, 4, generator=gen).permute(0, 2, 3, 1)  # head_dim not innermost
    torch.testing.assert_close(ops.rotary(t, cos, sin), ops.rotary(t.contiguous(), cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(ops.rotary(t, cos, sin), ref.rotary(t, cos, sin))


def test_rotary_gradients(gen):
    x = torch.randn(2, 5, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_tables(5, 6, torch.float64)
    torch.autograd.gradcheck(lambda t: ops.rotary(t, cos, sin), (x,))
    torch.autograd.gradcheck(lambda t: ops.rotary(t, cos, sin, True), (x,))


def test_rotary_rejects_bad_input(gen):
    cos, sin = rotary_tables(5, 8)
    x = torch.randn(2, 5, 3, 8, generator=gen)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.rotary(x[0], cos, sin)
    with pytest.raises(RuntimeError, match="even"):
        ops.rotary(torch.randn(2, 5, 3, 7), cos, sin)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[seq=5, head_dim/2=4\]"):
        ops.rotary(x, cos[:4], sin)
    with pytest.raises(RuntimeError, match="floating"):
        ops.rotary(x.long(), cos, sin)


# ---- rms_norm / add_rms_norm --------------------------------------------------------------

NORM_DTYPES = [  # (stream, delta, out): an fp32 stream with narrower companions, or one dtype
    (torch.float32, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float32), (torch.float64, torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("x_dtype,delta_dtype,out_dtype", NORM_DTYPES)
@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 7), (1, 1), (0, 4), (4, 130)])
def test_rms_norm_matches_reference(shape, x_dtype, delta_dtype, out_dtype, gen):
    x = (torch.randn(shape, generator=gen) * 3).to(x_dtype)
    delta = torch.randn(shape, generator=gen).to(delta_dtype)
    w = torch.rand(shape[-1], generator=gen) + 0.5
    s, normed = ops.add_rms_norm(x, delta, w, 1e-5, out_dtype)
    s_ref, normed_ref = ref.rms_norm(x, delta, w, 1e-5, out_dtype)
    assert s.dtype == x_dtype and normed.dtype == out_dtype and s.shape == normed.shape == x.shape
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)  # one rounding of the same fp32 sum
    torch.testing.assert_close(normed, normed_ref)
    alone = ops.rms_norm(x, w, 1e-5, out_dtype)
    torch.testing.assert_close(alone, ref.rms_norm(x, None, w, 1e-5, out_dtype)[1])
    if x_dtype == out_dtype == torch.float32:  # what torch's own RMSNorm computes
        torch.testing.assert_close(alone, torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5))


def test_rms_norm_gradients(gen):
    x = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(9, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, w))
    # Both outputs feed the loss: the sum's gradient joins the norm's.
    torch.autograd.gradcheck(lambda a, b, c: torch.cat([t.reshape(-1) for t in ops.add_rms_norm(a, b, c, 1e-5)]),
                             (x, delta, w))
    # Only the normed output used (the last norm of a model): the sum gets no gradient of its own.
    torch.autograd.gradcheck(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-5)[1], (x, delta, w))
    # Only the sum used: the plain residual path.
    torch.autograd.gradcheck(lambda a, b: ops.add_rms_norm(a, b, w, 1e-5)[0], (x, delta))


def test_add_rms_norm_gradients_in_mixed_dtypes(gen):
    # An fp32 stream, a bf16 sublayer output, a bf16 normed copy: gradients in each input's dtype,
    # equal to the fp64 reference's up to the bf16 rounding of the incoming gradient.
    x = torch.randn(7, 16, generator=gen, requires_grad=True)
    delta = torch.randn(7, 16, generator=gen).bfloat16().requires_grad_(True)
    w = (torch.rand(16, generator=gen) + 0.5).requires_grad_(True)
    s, normed = ops.add_rms_norm(x, delta, w, 1e-5, torch.bfloat16)
    g_s, g_n = torch.randn(7, 16, generator=gen), torch.randn(7, 16, generator=gen).bfloat16()
    torch.autograd.backward([s, normed], [g_s, g_n])
    leaves = [t.detach().double().requires_grad_(True) for t in (x, delta, w)]
    total = leaves[0] + leaves[1]
    n_ref = ref.rms_norm(total, None, leaves[2], 1e-5)[1]
    torch.autograd.backward([total, n_ref], [g_s.double(), g_n.double()])
    assert x.grad.dtype == torch.float32 and delta.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, leaves[0].grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(delta.grad, leaves[1].grad.bfloat16())
    torch.testing.assert_close(w.grad, leaves[2].grad.float(), rtol=1e-4, atol=1e-4)


def test_rms_norm_backward_matches_reference(gen):
    s = torch.randn(70, 12, generator=gen)  # more rows than one weight-gradient chunk
    w = torch.rand(12, generator=gen) + 0.5
    g, g_sum = torch.randn(70, 12, generator=gen), torch.randn(70, 12, generator=gen)
    for grad_sum, delta_dtype in ((g_sum, torch.bfloat16), (None, None)):
        got = torch.ops.fomoe.rms_norm_backward(g, grad_sum, s, w, 1e-5, delta_dtype)
        want = ref.rms_norm_backward(g, grad_sum, s, w, 1e-5, delta_dtype)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_bad_input(gen):
    x, w = torch.randn(3, 4, generator=gen), torch.ones(4)
    with pytest.raises(RuntimeError, match=r"weight must be \[d=4\]"):
        ops.rms_norm(x, torch.ones(5))
    with pytest.raises(RuntimeError, match="delta must have x's shape"):
        ops.add_rms_norm(x, torch.randn(3, 5), w)
    with pytest.raises(RuntimeError, match="x must be floating"):
        ops.rms_norm(x.long(), w)
    with pytest.raises(RuntimeError, match="out_dtype must be Float, Half or BFloat16"):
        ops.rms_norm(x, w, 1e-5, torch.int32)
    with pytest.raises(RuntimeError, match="d > 0"):
        ops.rms_norm(torch.randn(3, 0), torch.ones(0))
    # Companion dtypes only: the stream's own, or 16-bit ones on an fp32 stream.
    with pytest.raises(RuntimeError, match="delta must be Float, Half or BFloat16"):
        ops.add_rms_norm(x, torch.randn(3, 4, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match=r"out_dtype must be BFloat16 \(the stream's dtype\)"):
        ops.rms_norm(x.bfloat16(), w, 1e-5, torch.float32)
    with pytest.raises(RuntimeError, match="grad_normed must be"):
        torch.ops.fomoe.rms_norm_backward(x.double(), None, x, w, 1e-5, None)


# ---- opcheck ------------------------------------------------------------------------------

def _opcheck_samples(gen):
    p = routing_problem(9, 6, 4, 5, 2, 3, gen, dtype=torch.float32)
    perm, offsets, inv, gate = p["permutation"], p["offsets"], p["inverse"], p["gate"]
    rows = torch.randn(18, 6, generator=gen)
    logits = random_logits(9, 5, gen)
    w, ids = ops.route(logits, 2)
    h = torch.ops.fomoe.expert_ffn(p["x"], perm, offsets, inv, p["w13"], p["w2"], gate, True)[1]
    a = torch.randn(18, 6, generator=gen)
    x16 = torch.randn(9, 6, generator=gen).bfloat16()
    router_w = torch.randn(5, 6, generator=gen)
    return [
        ("router_logits", (x16.clone().requires_grad_(True), router_w.clone().requires_grad_(True))),
        ("router_logits", (torch.randn(9, 6, generator=gen, requires_grad=True), router_w.clone().requires_grad_(True))),
        ("router_logits_backward", (torch.randn(9, 5, generator=gen), x16, router_w, [True, False])),
        ("route", (logits.clone().requires_grad_(True), 2, "softmax", True)),
        ("route", (logits, 3, "sigmoid", False)),
        ("route_backward", (torch.randn(9, 2, generator=gen), logits, w, ids, "softmax", True)),
        ("dispatch", (p["ids"], p["resident_map"], 3)),
        ("gather", (p["x"].clone().requires_grad_(True), perm, inv, gate.clone().requires_grad_(True))),
        ("gather", (p["x"], perm, inv, None)),
        ("combine", (rows.clone().requires_grad_(True), perm, inv, gate.clone().requires_grad_(True))),
        ("combine_gate_grad", (p["x"], rows, inv)),
        ("grouped_mm", (a.clone().requires_grad_(True), torch.randn(3, 6, 4, generator=gen, requires_grad=True),
                        offsets)),
        ("grouped_mm_wgrad", (a, torch.randn(18, 4, generator=gen), offsets)),
        ("expert_ffn", (p["x"].clone().requires_grad_(True), perm, offsets, inv, p["w13"].clone().requires_grad_(True),
                        p["w2"].clone().requires_grad_(True), gate.clone().requires_grad_(True), True)),
        ("expert_ffn", (p["x"], perm, offsets, inv, p["w13"], p["w2"], gate, False)),
        ("expert_ffn_backward", (torch.randn(9, 6, generator=gen), p["x"], perm, offsets, inv, p["w13"], p["w2"],
                                 gate, h)),
        ("rotary", (torch.randn(2, 5, 3, 8, generator=gen, requires_grad=True), *rotary_tables(5, 8), False)),
        ("expert_ffn", (p["x"].to(torch.bfloat16).requires_grad_(True), perm, offsets, inv,
                        p["w13"].clone().requires_grad_(True), p["w2"].clone().requires_grad_(True), gate, True)),
        ("expert_ffn_backward", (torch.randn(9, 6, generator=gen), p["x"], perm, offsets, inv, p["w13"], p["w2"],
                                 gate, h, torch.float64)),
        ("rms_norm", (torch.randn(3, 4, 8, generator=gen, requires_grad=True),
                      torch.randn(3, 4, 8, generator=gen).bfloat16().requires_grad_(True),
                      torch.rand(8, generator=gen).requires_grad_(True), 1e-5, torch.bfloat16)),
        ("rms_norm", (torch.randn(5, 8, generator=gen, requires_grad=True), None,
                      torch.rand(8, generator=gen).requires_grad_(True), 1e-5, None)),
        ("rms_norm_backward", (torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen),
                               torch.randn(5, 8, generator=gen), torch.rand(8, generator=gen), 1e-5, torch.bfloat16)),
    ]


def test_opcheck_covers_every_op(gen):
    assert {name for name, _ in _opcheck_samples(gen)} == set(ops.OP_NAMES)


@pytest.mark.parametrize("index", range(22))
def test_opcheck(index, gen):
    name, args = _opcheck_samples(gen)[index]
    torch.library.opcheck(getattr(torch.ops.fomoe, name).default, args)


# ---- bad input ----------------------------------------------------------------------------

def test_router_logits_rejects_bad_input(gen):
    x, w = torch.randn(4, 8, generator=gen), torch.randn(3, 8, generator=gen)
    cases = [
        ((x[None], w), "x must be 2-D"),
        ((x, w[:, :4]), r"weight must be \[experts > 0, d_model=8\]"),
        ((x, w[:0]), r"weight must be \[experts > 0"),
        ((x.long(), w), "x must be floating"),
        ((x, w.int()), "weight must be floating"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fomoe.router_logits(*args)
    with pytest.raises(RuntimeError, match=r"grad must be \[tokens=4, experts=3\]"):
        torch.ops.fomoe.router_logits_backward(torch.randn(4, 2), x, w, [True, True])


def test_route_rejects_bad_input(gen):
    logits = random_logits(4, 3, gen)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        ops.route(logits, 4)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        ops.route(logits, 0)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.route(logits.reshape(-1), 1)
    with pytest.raises(RuntimeError, match="floating"):
        ops.route(torch.ones(4, 3, dtype=torch.int64), 1)
    with pytest.raises(RuntimeError, match="score must be"):
        ops.route(logits, 1, "relu")


def test_route_handles_nan_without_crashing():
    logits = torch.tensor([[0.0, float("nan"), 1.0, -1.0]])
    w, ids = ops.route(logits, 2)
    assert ids[0, 0].item() == 1  # NaN ranks highest, as in torch.topk


def test_dispatch_rejects_bad_input(gen):
    ids = random_ids(5, 4, 2, gen)
    resident = torch.arange(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dispatch(torch.full((5, 2), 4, dtype=torch.int32), resident, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dispatch(torch.full((5, 2), -2, dtype=torch.int32), resident, 4)
    with pytest.raises(RuntimeError, match="not a local slot"):
        ops.dispatch(ids, torch.tensor([0, 1, 2, 9], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="int32"):
        ops.dispatch(ids.float(), resident, 4)
    with pytest.raises(RuntimeError, match="num_local"):
        ops.dispatch(ids, resident, 5)
    # int64 ids from torch.topk are accepted by the Python entry point.
    assert torch.equal(ops.dispatch(ids.long(), resident, 4)[0], ops.dispatch(ids, resident, 4)[0])


def test_expert_ffn_rejects_bad_input(gen):
    p = routing_problem(6, 4, 3, 4, 2, 3, gen, dtype=torch.float32)
    args = dict(x=p["x"], permutation=p["permutation"], offsets=p["offsets"], inverse=p["inverse"], w13=p["w13"],
                w2=p["w2"], gate=p["gate"])
    bad = [
        (dict(w2=p["w2"].double()), "w13 and w2 must share one floating dtype"),
        (dict(w13=p["w13"][:, :, :-1]), "inconsistent shapes"),
        (dict(offsets=p["offsets"][:-1]), "offsets must be 1-D"),
        (dict(offsets=p["offsets"].flip(0)), "non-decreasing"),
        (dict(gate=p["gate"][:, :1]), "gate weights must be"),
        (dict(permutation=p["permutation"].clamp_max(0) + 100), "routing table entry"),
        (dict(x=p["x"][:, None]), "x must be"),
    ]
    for override, message in bad:
        kwargs = {**args, **override}
        with pytest.raises(RuntimeError, match=message):
            ops.expert_ffn(**kwargs)
