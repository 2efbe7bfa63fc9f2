"""Property-based tests: every op against fomoe.reference on arbitrary small problems, and
hostile inputs that must raise clear errors rather than crash. A few thousand cases in all."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fomoe  # noqa: F401
from fomoe import ops, reference as ref

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def routing_problems(draw, max_T=40, max_E=16, max_d=8):
    T = draw(st.integers(0, max_T))
    E = draw(st.integers(1, max_E))
    k = draw(st.integers(1, E))
    held = draw(st.lists(st.integers(0, E - 1), unique=True, max_size=E))
    seed = draw(st.integers(0, 2**31 - 1))
    d = draw(st.integers(1, max_d))
    f = draw(st.integers(1, max_d))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    resident_map = torch.full((E,), -1, dtype=torch.int32)
    resident_map[sorted(held)] = torch.arange(len(held), dtype=torch.int32)
    return dict(T=T, E=E, k=k, d=d, f=f, logits=logits, resident_map=resident_map, num_local=len(held), gen=gen)


@settings(SETTINGS, max_examples=1000)
@given(routing_problems(), st.sampled_from(["softmax", "sigmoid"]), st.booleans(),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_route_property(p, score, renormalize, dtype):
    logits = p["logits"].to(dtype)
    w, ids = ops.route(logits, p["k"], score, renormalize)
    w_ref, ids_ref = ref.route(logits, p["k"], score, renormalize)
    if dtype == torch.bfloat16:
        # bf16 logits can tie; then only the chosen weights must agree as a multiset.
        torch.testing.assert_close(w.sort(1).values, w_ref.sort(1).values)
    else:
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref)
    assert bool(((ids >= 0) & (ids < p["E"])).all())
    if p["T"]:
        assert bool((ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all())  # distinct experts


@settings(SETTINGS, max_examples=1000)
@given(routing_problems())
def test_dispatch_property(p):
    ids = ref.route(p["logits"], p["k"])[1]
    out = ops.dispatch(ids, p["resident_map"], p["num_local"])
    expected = ref.dispatch(ids, p["resident_map"], p["num_local"])
    for a, b in zip(out, expected):
        assert torch.equal(a, b)
    perm, offsets, inverse = out
    kept = int(offsets[-1])
    # inverse and permutation are mutually inverse on the kept assignments.
    flat_inv = inverse.reshape(-1)
    assert torch.equal(flat_inv[perm[:kept].long()], torch.arange(kept, dtype=torch.int32))
    assert int((flat_inv >= 0).sum()) == kept


@SETTINGS
@given(routing_problems(max_T=12, max_E=6, max_d=6))
def test_expert_ffn_property(p):
    ids = ref.route(p["logits"], p["k"])[1]
    perm, offsets, inverse = ops.dispatch(ids, p["resident_map"], p["num_local"])
    gen, L, d, f, T = p["gen"], p["num_local"], p["d"], p["f"], p["T"]
    x = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w13 = torch.randn(L, d, 2 * f, generator=gen, dtype=torch.float64)
    w2 = torch.randn(L, f, d, generator=gen, dtype=torch.float64)
    gate = torch.rand(T, p["k"], generator=gen, dtype=torch.float64)
    args = (x, perm, offsets, inverse, w13, w2, gate)
    y, h = torch.ops.fomoe.expert_ffn(*args, True)
    y_ref, _ = ref.expert_ffn(*args, True)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn(T, d, generator=gen, dtype=torch.float64)
    for g, g_ref in zip(torch.ops.fomoe.expert_ffn_backward(gy, *args, h), ref.expert_ffn_backward(gy, *args, h)):
        torch.testing.assert_close(g, g_ref)


@SETTINGS
@given(st.integers(0, 20), st.integers(1, 8), st.integers(1, 4), st.integers(-3, 12), st.integers(0, 2**31 - 1))
def test_dispatch_hostile_ids_raise_cleanly(T, E, k, bad_id, seed):
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    if T:
        ids[T // 2, 0] = bad_id
    resident = torch.arange(E, dtype=torch.int32)
    if T and not 0 <= bad_id < E:
        with pytest.raises(RuntimeError, match="out of range"):
            ops.dispatch(ids, resident, E)
    else:
        perm, offsets, inverse = ops.dispatch(ids, resident, E)
        assert int(offsets[-1]) == T * k


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 5), st.integers(-40, 40), st.integers(0, 2**31 - 1))
def test_row_ops_hostile_tables_raise_cleanly(T, k, bad, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 3, generator=gen)
    perm = torch.randperm(T * k, generator=gen).to(torch.int32)
    inverse = torch.empty(T * k, dtype=torch.int32)
    inverse[perm.long()] = torch.arange(T * k, dtype=torch.int32)
    inverse = inverse.view(T, k)
    perm[0] = bad
    if -1 <= bad < T * k:
        ops.gather(x, perm, inverse)
    else:
        with pytest.raises(RuntimeError, match="routing table entry"):
            ops.gather(x, perm, inverse)
    rows = torch.randn(T * k, 3, generator=gen)
    inverse.view(-1)[0] = bad
    if -1 <= bad < T * k:
        ops.combine(rows, perm.clamp_min(-1), inverse)
    else:
        with pytest.raises(RuntimeError, match="routing table entry"):
            ops.combine(rows, perm.clamp_min(-1), inverse)
