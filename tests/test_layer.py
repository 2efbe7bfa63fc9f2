"""fomoe.MoE against a plain per-expert-loop MoE (fomoe.reference.moe_loop)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fomoe
from fomoe import reference as ref


def full_weights(layer: fomoe.MoE):
    """The layer's expert weights scattered into [E, ...] tensors (zeros for non-resident)."""
    E = layer.num_experts
    w13 = torch.zeros(E, *layer.w13.shape[1:], dtype=layer.w13.dtype)
    w2 = torch.zeros(E, *layer.w2.shape[1:], dtype=layer.w2.dtype)
    w13 = w13.index_copy(0, layer.expert_ids, layer.w13)
    w2 = w2.index_copy(0, layer.expert_ids, layer.w2)
    return w13, w2


def make_layer(dtype=torch.float64, **overrides):
    cfg = dict(d_model=12, d_ff=10, num_experts=6, top_k=2, init_seed=3, init_std=0.3)
    cfg.update(overrides)
    return fomoe.MoE(**cfg).to(dtype)


def loop_output(layer, x):
    cfg = layer.config
    w13, w2 = full_weights(layer)
    return ref.moe_loop(x, layer.router.weight, w13, w2, cfg.top_k, cfg.score, cfg.renormalize,
                        layer.resident_mask, cfg.skip_policy, cfg.renormalize_kept)


CASES = [
    dict(),
    dict(score="sigmoid", renormalize=False),
    dict(resident_experts=[1, 4]),
    dict(resident_experts=[0, 2, 3], renormalize_kept=True),
    dict(resident_experts=[5, 1, 2], skip_policy="reroute"),
    dict(resident_experts=[3], top_k=1, score="sigmoid"),
    dict(num_experts=1, top_k=1),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "full")
def test_layer_matches_per_expert_loop(overrides, gen):
    layer = make_layer(**overrides)
    x = torch.randn(3, 7, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    w13, w2 = full_weights(layer)
    w13 = w13.detach().requires_grad_(True)
    w2 = w2.detach().requires_grad_(True)
    router = layer.router.weight.detach().clone().requires_grad_(True)
    cfg = layer.config
    y_ref = ref.moe_loop(x_ref, router, w13, w2, cfg.top_k, cfg.score, cfg.renormalize, layer.resident_mask,
                         cfg.skip_policy, cfg.renormalize_kept)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.router.weight.grad, router.grad)
    torch.testing.assert_close(layer.w13.grad, w13.grad[layer.expert_ids])
    torch.testing.assert_close(layer.w2.grad, w2.grad[layer.expert_ids])


def test_reroute_never_picks_a_non_resident_expert(gen):
    layer = make_layer(dtype=torch.float32, num_experts=8, top_k=2, resident_experts=[1, 6, 7],
                       skip_policy="reroute")
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.fomoe.route.default:
                calls.append(out[1].clone())
            return out

    with Spy():
        layer(torch.randn(64, 12, generator=gen))
    ids = calls[0]
    assert set(ids.unique().tolist()) <= {1, 6, 7}
    assert float(layer.stats.skipped_fraction) == 0.0


def test_skip_statistics(gen):
    layer = make_layer(dtype=torch.float32, resident_experts=[0, 1, 2])
    x = torch.randn(40, 12, generator=gen)
    layer.train()
    layer(x)
    stats = layer.stats
    torch.testing.assert_close(stats.expert_load.sum(), torch.tensor(1.0))
    held_share = float(stats.expert_load[:3].sum())
    assert float(stats.skipped_fraction) == pytest.approx(1 - held_share, abs=1e-6)
    assert int(stats.local_tokens.sum()) == round(held_share * 80)
    assert torch.equal(layer.tokens_routed, stats.local_tokens)
    layer(x)
    assert torch.equal(layer.tokens_routed, 2 * stats.local_tokens)
    layer.reset_routing_counts()
    assert int(layer.tokens_routed.sum()) == 0


def test_aux_losses_train_the_router(gen):
    layer = make_layer(dtype=torch.float32, aux_loss_coef=0.1, z_loss_coef=0.01)
    layer(torch.randn(30, 12, generator=gen))
    assert layer.aux_loss.requires_grad
    layer.aux_loss.backward()
    assert layer.router.weight.grad is not None and float(layer.router.weight.grad.abs().sum()) > 0
    # Balanced-load value: with uniform probabilities and load the loss is exactly 1.
    uniform = make_layer(dtype=torch.float32, num_experts=4, top_k=4)
    with torch.no_grad():
        uniform.router.weight.zero_()
    uniform(torch.randn(8, 12, generator=gen))
    assert float(uniform.stats.aux_loss.detach()) == pytest.approx(1.0)


def test_router_losses_without_coefficients_are_statistics_only(gen):
    x = torch.randn(30, 12, generator=gen)
    plain = make_layer(dtype=torch.float32)
    weighted = make_layer(dtype=torch.float32, aux_loss_coef=0.1, z_loss_coef=0.01)
    plain(x), weighted(x)
    assert not plain.aux_loss.requires_grad and float(plain.aux_loss) == 0.0
    assert not plain.stats.aux_loss.requires_grad and not plain.stats.z_loss.requires_grad
    # The same values as when they train the router (same init seed, same input).
    torch.testing.assert_close(plain.stats.aux_loss, weighted.stats.aux_loss.detach())
    torch.testing.assert_close(plain.stats.z_loss, weighted.stats.z_loss.detach())
    logits = x @ plain.router.weight.t()
    torch.testing.assert_close(plain.stats.z_loss, torch.logsumexp(logits, -1).square().mean())


def test_empty_batch(gen):
    layer = make_layer(dtype=torch.float32, resident_experts=[2, 3])
    x = torch.randn(0, 5, 12, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 12)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_init_is_placement_independent():
    full = make_layer(num_experts=6)
    part = make_layer(num_experts=6, resident_experts=[4, 1])
    for gid, w13, w2 in part.expert_slices():
        assert torch.equal(w13, full.w13[gid]) and torch.equal(w2, full.w2[gid])
    assert torch.equal(part.router.weight, full.router.weight)


def test_factory_kwargs_and_meta_construction(gen):
    seeded = {"num_experts": 6, "resident_experts": [4, 1], "init_seed": 7}
    eager = make_layer(dtype=torch.float32, **seeded)
    cfg = eager.config
    typed = fomoe.MoE(cfg, dtype=torch.float64)
    assert {p.dtype for p in typed.parameters()} == {torch.float64}
    torch.testing.assert_close(typed.w13, eager.w13.double())
    meta = fomoe.MoE(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters()) and meta.resident_map.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()   # materialises the weights and the routing tables
    assert torch.equal(meta.resident_map, eager.resident_map) and torch.equal(meta.expert_ids, eager.expert_ids)
    for a, b in zip(meta.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(3, 5, cfg.d_model, generator=gen)
    torch.testing.assert_close(meta(x), eager(x), rtol=0, atol=0)


def test_state_dict_names_experts_by_global_id(gen):
    full = make_layer(num_experts=6)
    with torch.no_grad():
        full.w13.normal_(generator=gen)
    shard_a = make_layer(num_experts=6, resident_experts=[0, 3, 5], init_seed=99)
    shard_a.load_state_dict(full.state_dict())  # a full checkpoint loads into a partial layer
    for gid, w13, _ in shard_a.expert_slices():
        assert torch.equal(w13, full.w13[gid])
    shard_b = make_layer(num_experts=6, resident_experts=[1, 2, 4], init_seed=99)
    shard_b.load_state_dict(full.state_dict())
    merged = {**shard_a.state_dict(), **shard_b.state_dict()}  # shards merge by key
    rebuilt = make_layer(num_experts=6, init_seed=5)
    rebuilt.load_state_dict(merged)
    assert torch.equal(rebuilt.w13, full.w13) and torch.equal(rebuilt.w2, full.w2)
    assert sorted(k for k in shard_a.state_dict()) == sorted(
        ["router.weight"] + [f"experts.{g}.{n}" for g in (0, 3, 5) for n in ("w13", "w2")])
    with pytest.raises(RuntimeError, match="Missing key"):
        rebuilt.load_state_dict(shard_a.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        rebuilt.load_state_dict({**merged, "experts.9.w13": full.w13[0]})


def test_compile_fullgraph_matches_eager(gen):
    layer = make_layer(dtype=torch.float32, resident_experts=[0, 2, 5])
    x = torch.randn(2, 9, 12, generator=gen, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_eager = layer(x)
    y_compiled = compiled(x)
    torch.testing.assert_close(y_compiled, y_eager)
    g_eager = torch.autograd.grad(y_eager.sum(), (x, layer.w13))
    g_compiled = torch.autograd.grad(y_compiled.sum(), (x, layer.w13))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_compile_inductor_matches_eager(gen):
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(17, 12, generator=gen)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fomoe":
            self.seen[func.__name__.split(".")[0]] = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def test_autocast_runs_experts_in_bf16_with_fp32_router(gen):
    layer = make_layer(dtype=torch.float32, resident_experts=[0, 1, 3, 4])
    x = torch.randn(32, 12, generator=gen, requires_grad=True)
    with RecordOps() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert rec.seen["route"][0] == torch.float32  # router math stays fp32
    x_dtype, *_, w13_dtype, w2_dtype, gate_dtype = rec.seen["expert_ffn"]
    assert (x_dtype, w13_dtype, w2_dtype) == (torch.bfloat16,) * 3
    assert gate_dtype == torch.float32
    assert y.dtype == torch.bfloat16
    expected = loop_output(layer, x.detach())
    err = (y.float() - expected).norm() / expected.norm()
    assert err < 2e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.w13.grad.dtype == torch.float32


def test_layer_rejects_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown experts \\[6, 7\\]"):
        fomoe.MoE(d_model=4, d_ff=4, num_experts=6, resident_experts=[0, 6, 7])
    with pytest.raises(ValueError, match="top_k=7 exceeds"):
        fomoe.MoE(d_model=4, d_ff=4, num_experts=6, top_k=7)
    with pytest.raises(ValueError, match="top_k must be a positive"):
        fomoe.MoE(d_model=4, d_ff=4, num_experts=6, top_k=0)
    with pytest.raises(ValueError, match="at least top_k=2 resident"):
        fomoe.MoE(d_model=4, d_ff=4, num_experts=6, resident_experts=[1], skip_policy="reroute")
    with pytest.raises(ValueError, match="skip_policy"):
        fomoe.MoE(d_model=4, d_ff=4, num_experts=6, skip_policy="drop")
    with pytest.raises(ValueError, match="duplicates"):
        fomoe.MoE(d_model=4, d_ff=4, num_experts=6, resident_experts=[1, 1])
    layer = fomoe.MoE(d_model=4, d_ff=4, num_experts=6)
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="x must be floating"):
        layer(torch.ones(3, 4, dtype=torch.int64))
    # Activations of another float dtype than the weights: computed in the activations' dtype.
    assert layer(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64
