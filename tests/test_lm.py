"""fomoe.lm.MoELM against an independent fp64 reference transformer."""

import math

import pytest
import torch

from fomoe import reference as ref
from fomoe.lm import PRESETS, LMConfig, MoELM, preset

SMALL = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, num_experts=4, top_k=2, d_ff=12, max_seq_len=10,
             init_std=0.3)


def reference_logits(model: MoELM, tokens: torch.Tensor) -> torch.Tensor:
    """The same network written out in fp64 with textbook formulas (complex RoPE, masked softmax,
    per-expert loop MoE)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, S = tokens.shape
    hd = cfg.d_model // cfg.n_heads

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    freqs = torch.tensor([cfg.rope_theta ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    rot = torch.polar(torch.ones(S, hd // 2, dtype=torch.float64), torch.arange(S, dtype=torch.float64)[:, None] * freqs)

    def rope(x):  # pairs (i, i + hd/2) as complex numbers
        z = torch.complex(x[..., :hd // 2], x[..., hd // 2:]) * rot
        return torch.cat([z.real, z.imag], -1)

    x = sd["embed.weight"][tokens]
    mask = torch.triu(torch.full((S, S), float("-inf"), dtype=torch.float64), 1)
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "attn_norm.weight"])
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).view(B, S, 3, cfg.n_heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(B, S, -1) @ sd[p + "attn.out.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        moe = block.moe
        w13 = torch.zeros(cfg.num_experts, cfg.d_model, 2 * cfg.d_ff, dtype=torch.float64)
        w2 = torch.zeros(cfg.num_experts, cfg.d_ff, cfg.d_model, dtype=torch.float64)
        for gid in moe.expert_ids.tolist():
            w13[gid] = sd[f"{p}moe.experts.{gid}.w13"]
            w2[gid] = sd[f"{p}moe.experts.{gid}.w2"]
        x = x + ref.moe_loop(h, sd[p + "moe.router.weight"], w13, w2, cfg.top_k, cfg.score, True,
                             moe.resident_mask, cfg.skip_policy, cfg.renormalize_kept)
    return rms(x, sd["norm.weight"]) @ sd["embed.weight"].T


@pytest.mark.parametrize("resident", [None, [0, 3], [1]])
def test_lm_matches_reference_transformer(resident, gen):
    cfg = LMConfig(**{**SMALL, "top_k": 1 if resident == [1] else 2})
    model = MoELM(cfg, resident_fn=None if resident is None else (lambda layer: resident), seed=5).double()
    tokens = torch.randint(0, cfg.vocab_size, (3, 9), generator=gen)
    got = model(tokens).double()
    want = reference_logits(model, tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lm_is_causal(gen):
    model = MoELM(LMConfig(**SMALL), seed=1)
    a = torch.randint(0, 50, (2, 10), generator=gen)
    b = a.clone()
    b[:, 6:] = torch.randint(0, 50, (2, 4), generator=gen)
    torch.testing.assert_close(model(a)[:, :6], model(b)[:, :6])


def test_parameter_counts_match_config():
    for name in ("tiny", "small"):
        cfg = PRESETS[name]
        model = MoELM(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.total_params()
        expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".w13", ".w2")))
        assert expert == cfg.expert_params()
    assert 0.9e9 < PRESETS["1b"].total_params() < 1.1e9


def test_init_is_identical_across_workers_and_seeded():
    cfg = LMConfig(**SMALL)
    full = MoELM(cfg, seed=7).state_dict()
    part = MoELM(cfg, resident_fn=lambda layer: [layer, 3], seed=7).state_dict()
    assert set(part) < set(full)
    assert "blocks.1.moe.experts.1.w13" in part and "blocks.1.moe.experts.0.w13" not in part
    for key, value in part.items():
        assert torch.equal(value, full[key]), key
    other = MoELM(cfg, seed=8).state_dict()
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], full["blocks.0.attn.qkv.weight"])
    assert not torch.equal(other["blocks.0.moe.experts.0.w2"], full["blocks.0.moe.experts.0.w2"])
    # Layers do not share expert initialisations.
    assert not torch.equal(full["blocks.0.moe.experts.0.w2"], full["blocks.1.moe.experts.0.w2"])


def test_full_checkpoint_loads_into_partial_model():
    cfg = LMConfig(**SMALL)
    full = MoELM(cfg, seed=1)
    part = MoELM(cfg, resident_fn=lambda layer: [2], seed=2)
    part.load_state_dict(full.state_dict())
    assert torch.equal(part.blocks[0].moe.w13[0], full.blocks[0].moe.w13[2])


def test_training_reduces_loss_and_counts_top1(gen):
    cfg = LMConfig(**SMALL)
    model = MoELM(cfg, seed=0)
    model.count_top1(True)
    batch = torch.randint(0, cfg.vocab_size, (4, 10), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        ce, aux = model.loss(batch)
        first = ce.item() if first is None else first
        (ce + aux).backward()
        opt.step()
        opt.zero_grad()
    assert ce.item() < 0.5 * first
    counts = model.blocks[0].top1_counts
    assert counts.sum().item() == 30 * 4 * 9


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        LMConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    model = MoELM(LMConfig(**SMALL))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(11, dtype=torch.long))


def test_lm_compiles_fullgraph(gen):
    # The fused norm and rotary ops in a captured graph (their fake kernels), also under autocast,
    # where the norm's output dtype comes from the autocast state inside the graph.
    torch.manual_seed(0)
    model = MoELM(LMConfig(**SMALL))
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=gen)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(f(tokens).square().mean(), model.blocks[0].attn_norm.weight)[0]
             for f in (compiled, model)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 GEMMs: equal to bf16 precision
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=2e-2, atol=2e-2)
