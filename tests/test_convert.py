"""fomoe.convert on tiny randomly initialised Hugging Face MoE models, against the originals."""

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fomoe  # noqa: E402
from fomoe import convert as fc  # noqa: E402
from fomoe import reference as ref  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.2)

# name -> (config class, model class, config overrides). Routers get a large init so routing
# differs from uniform and every expert sees tokens.
MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16, num_experts=6,
                       num_experts_per_tok=2, shared_expert_intermediate_size=24, norm_topk_prob=False,
                       mlp_only_layers=[1])),
    "qwen2_moe_norm": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                       dict(num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16, num_experts=5,
                            num_experts_per_tok=3, shared_expert_intermediate_size=24, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_hidden_layers=2, intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                   norm_topk_prob=False)),
}


def make_model(name, dtype=torch.float32, **overrides):
    cfg_cls, model_cls, extra = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(sum(map(ord, name)))  # str hash() is salted per process
    return getattr(transformers, model_cls)(cfg).to(dtype).eval()


def hf_blocks(model):
    table = fc._adapter_table()
    return [(n, m) for n, m in model.named_modules() if type(m) in table]


def converted_blocks(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, fc.ConvertedMoeBlock)]


def hf_name(converted_param_name):
    """Converted parameter name -> (original name, transpose?) — the mapping fomoe.convert documents."""
    for new, old, transpose in ((".moe.router.weight", ".gate.weight", False),
                                (".moe.w13", ".experts.gate_up_proj", True),
                                (".moe.w2", ".experts.down_proj", True)):
        if converted_param_name.endswith(new):
            return converted_param_name[: -len(new)] + old, transpose
    return converted_param_name, False


def run(model, embeds, labels, **kwargs):
    embeds = embeds.detach().clone().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=labels, output_router_logits=True, **kwargs)
    out.loss.backward()
    return out, embeds.grad


def inputs(model, gen, batch=2, seq=7):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    embeds = torch.randn(batch, seq, model.config.hidden_size, generator=gen)
    return embeds, ids


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_matches_original(name, gen):
    original = make_model(name)
    converted = fc.convert_model(original, inplace=False)
    n_blocks = len(hf_blocks(original))
    assert n_blocks >= 1 and len(converted_blocks(converted)) == n_blocks and not hf_blocks(converted)
    embeds, labels = inputs(original, gen)
    out0, g0 = run(original, embeds, labels)
    out1, g1 = run(converted, embeds, labels)
    torch.testing.assert_close(out1.logits, out0.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1.loss, out0.loss)
    torch.testing.assert_close(out1.aux_loss, out0.aux_loss)  # the router logits reach HF's aux loss
    assert len(out1.router_logits) == len(out0.router_logits) == n_blocks
    for r1, r0 in zip(out1.router_logits, out0.router_logits):
        assert r1.dtype == r0.dtype
        torch.testing.assert_close(r1, r0)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    original_params = dict(original.named_parameters())
    seen = set()
    for pname, p in converted.named_parameters():
        old, transpose = hf_name(pname)
        ref_grad = original_params[old].grad
        seen.add(old)
        if "embed_tokens" in pname:  # unused: the models are fed inputs_embeds
            assert p.grad is None and ref_grad is None
            continue
        assert p.grad is not None and ref_grad is not None, pname
        torch.testing.assert_close(p.grad, ref_grad.transpose(1, 2) if transpose else ref_grad,
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{pname}: {m}")
    assert seen == set(original_params)


def test_conversion_does_not_initialise_weights_it_replaces(monkeypatch, gen):
    original = make_model("mixtral")
    def fail(self):
        raise AssertionError("conversion ran a random initialisation")
    monkeypatch.setattr(fomoe.MoE, "reset_parameters", fail)
    converted = fc.convert_model(original, inplace=False)
    embeds, labels = inputs(original, gen)
    torch.testing.assert_close(run(converted, embeds, labels)[0].logits, run(original, embeds, labels)[0].logits,
                               rtol=1e-5, atol=1e-5)


def test_mixtral_router_jitter_in_training(gen):
    original = make_model("mixtral", router_jitter_noise=0.3).train()
    converted = fc.convert_model(original, inplace=False)
    assert converted.training and all(b.jitter_noise == 0.3 for _, b in converted_blocks(converted))
    embeds, labels = inputs(original, gen)
    torch.manual_seed(5)
    out0, g0 = run(original, embeds, labels)
    torch.manual_seed(5)
    out1, g1 = run(converted, embeds, labels)
    torch.testing.assert_close(out1.logits, out0.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    torch.manual_seed(6)  # a different draw gives a different output: the noise is really applied
    out2, _ = run(converted, embeds, labels)
    assert not torch.allclose(out2.logits, out1.logits)


@pytest.mark.parametrize("name,dtype", [(n, torch.float32) for n in MODELS] + [("qwen2_moe", torch.bfloat16)])
def test_round_trip_restores_state_dict_exactly(name, dtype, gen):
    model = make_model(name, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_types = {n: type(m) for n, m in hf_blocks(model)}
    embeds, _ = inputs(model, gen)
    with torch.no_grad():
        logits_before = model(inputs_embeds=embeds.to(dtype)).logits
    fc.convert_model(model)  # in place
    assert not hf_blocks(model)
    fc.revert_model(model)
    assert {n: type(m) for n, m in hf_blocks(model)} == block_types
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds.to(dtype)).logits, logits_before, rtol=0, atol=0)


def test_revert_carries_trained_weights(gen):
    model = make_model("qwen2_moe")
    converted = fc.convert_model(model, inplace=False)
    embeds, labels = inputs(model, gen)
    opt = torch.optim.SGD(converted.parameters(), lr=0.5)
    run(converted, embeds, labels)
    opt.step()
    with torch.no_grad():
        trained = converted(inputs_embeds=embeds).logits
        untrained = model(inputs_embeds=embeds).logits
    reverted = fc.revert_model(converted, inplace=False)
    assert converted_blocks(converted) and not converted_blocks(reverted)
    with torch.no_grad():
        torch.testing.assert_close(reverted(inputs_embeds=embeds).logits, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, untrained, atol=1e-3)


def skip_non_resident(model, residents):
    """Make the original HF model skip non-resident experts: zero their top-k weights (explicit masking)."""
    for (_, block), held in zip(hf_blocks(model), residents):
        mask = torch.zeros(block.gate.num_experts, dtype=torch.bool)
        mask[held] = True

        def hook(_module, _args, output, mask=mask):
            logits, scores, indices = output
            return logits, scores * mask[indices], indices

        block.gate.register_forward_hook(hook)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_resident_subset_equals_original_with_skipped_experts(name, gen):
    original = make_model(name)
    E = original.config.num_local_experts if name == "mixtral" else original.config.num_experts
    n_layers = len(hf_blocks(original))
    residents = [[(l + 2 * j) % E for j in range(E // 2)] for l in range(n_layers)]
    converted = fc.convert_model(original, resident_experts=residents, inplace=False)
    for (_, block), held in zip(converted_blocks(converted), residents):
        assert block.moe.expert_ids.tolist() == sorted(held) and block.moe.w13.shape[0] == len(held)
        keys = [k for k in block.state_dict() if ".w13" in k]
        assert keys == [f"moe.experts.{e}.w13" for e in sorted(held)]
    skip_non_resident(original, residents)
    embeds, labels = inputs(original, gen)
    out0, g0 = run(original, embeds, labels)
    out1, g1 = run(converted, embeds, labels)
    torch.testing.assert_close(out1.logits, out0.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    skipped = [b.moe.stats.skipped_fraction.item() for _, b in converted_blocks(converted)]
    assert all(0 < s < 1 for s in skipped)


@pytest.mark.parametrize("options", [dict(), dict(skip_policy="reroute"), dict(renormalize_kept=True)],
                         ids=["skip", "reroute", "renormalize_kept"])
def test_converted_block_matches_reference_loop(options, gen):
    """One Qwen2-MoE block (shared expert included) against fomoe.reference.moe_loop."""
    model = make_model("qwen2_moe_norm")
    (_, block), = hf_blocks(model)[:1]
    held = [0, 3, 4]
    router = block.gate.weight.detach().clone()
    w13_full = block.experts.gate_up_proj.detach().transpose(1, 2).clone()
    w2_full = block.experts.down_proj.detach().transpose(1, 2).clone()
    x = torch.randn(2, 9, 32, generator=gen)
    with torch.no_grad():
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    fc.convert_model(model, resident_experts=[held, held], **options)
    (_, converted), = converted_blocks(model)[:1]
    resident = torch.zeros(5, dtype=torch.bool)
    resident[held] = True
    expected = ref.moe_loop(x, router, w13_full, w2_full, top_k=3, score="softmax", renormalize=True,
                            resident=resident, policy=options.get("skip_policy", "skip"),
                            renormalize_kept=options.get("renormalize_kept", False)) + shared
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-6)


def test_router_logit_hooks_installed_before_conversion_survive(gen):
    model = make_model("olmoe")
    embeds, labels = inputs(model, gen)
    out0, _ = run(model, embeds, labels)  # installs transformers' output-capturing hooks
    fc.convert_model(model)
    out1, _ = run(model, embeds, labels)
    assert len(out1.router_logits) == len(out0.router_logits) == 2
    torch.testing.assert_close(out1.aux_loss, out0.aux_loss)
    fc.revert_model(model)
    out2, _ = run(model, embeds, labels)
    assert len(out2.router_logits) == 2
    torch.testing.assert_close(out2.aux_loss, out0.aux_loss)


def test_federated_shards_merge_into_an_exportable_model():
    """Workers' partial state dicts merge by key into a full converted model, which reverts exactly."""
    original = make_model("mixtral")
    before = {k: v.clone() for k, v in original.state_dict().items()}
    shards = [fc.convert_model(original, resident_experts=held, inplace=False).state_dict()
              for held in ([0, 1], [2, 3], [1, 3])]
    merged = {}
    for shard in shards:
        merged.update(shard)
    full = fc.convert_model(make_model("mixtral", initializer_range=0.05))
    full.load_state_dict(merged, strict=True)
    after = fc.revert_model(full).state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_clear_errors(monkeypatch):
    model = make_model("qwen3_moe")
    with pytest.raises(ValueError, match="lists 3 layers but the model has 2"):
        fc.convert_model(model, resident_experts=[[0], [1], [2]], inplace=False)
    with pytest.raises(ValueError, match=r"mlp.*unknown experts \[9\]"):
        fc.convert_model(model, resident_experts=[0, 9], inplace=False)
    with pytest.raises(TypeError, match="unknown options"):
        fc.convert_model(model, top_k=3, inplace=False)
    with pytest.raises(ValueError, match="has no fomoe-converted MoE blocks"):
        fc.revert_model(model, inplace=False)
    partial = fc.convert_model(model, resident_experts=[0, 1], inplace=False)
    with pytest.raises(ValueError, match="hold only some of their experts"):
        fc.revert_model(partial)
    with pytest.raises(ValueError, match="SwiGLU"):
        fc.convert_model(make_model("olmoe", hidden_act="gelu"))
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_hidden_layers=1,
                                                                   intermediate_size=16))
    with pytest.raises(ValueError, match="no sparse MoE block"):
        fc.convert_model(dense)
    # transformers swaps its lazy module object in sys.modules once loaded: patch the live one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(RuntimeError, match=r"transformers >= 5.6, < 6.0"):
        fc.convert_model(model)
    assert not converted_blocks(model)


def test_converted_layers_are_fomoe_layers():
    model = fc.convert_model(make_model("qwen3_moe"), resident_experts=[[1, 2, 5], [0, 7]])
    layers = [m for m in model.modules() if isinstance(m, fomoe.MoE)]
    assert [m.expert_ids.tolist() for m in layers] == [[1, 2, 5], [0, 7]]
    assert all(m.w13.is_contiguous() and m.w2.is_contiguous() for m in layers)
    # A converted model converts to itself; an original is left untouched by inplace=False.
    assert fc.convert_model(model) is model
    original = make_model("qwen3_moe")
    snapshot = copy.deepcopy(original.state_dict())
    fc.convert_model(original, inplace=False)
    assert all(torch.equal(v, snapshot[k]) for k, v in original.state_dict().items())


def test_converted_block_compiles_without_graph_breaks(gen):
    model = fc.convert_model(make_model("qwen2_moe"), resident_experts=[1, 2, 4])
    (_, block), = converted_blocks(model)[:1]
    x = torch.randn(2, 5, 32, generator=gen, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_eager = block(x)
    torch.testing.assert_close(y, y_eager)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    torch.testing.assert_close(gx, gx_eager)


def test_converted_model_pickles(gen, monkeypatch):
    """torch.save of a whole converted model loads back, even where the router tap class is not yet made."""
    import io
    model = fc.convert_model(make_model("qwen3_moe"), resident_experts=[[0, 3, 5], [1, 2]])
    embeds, _ = inputs(model, gen)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.setattr(fc, "_TAP_CLASSES", {})  # as in a fresh process
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs_embeds=embeds).logits, model(inputs_embeds=embeds).logits,
                                   rtol=0, atol=0)
    assert [b.moe.expert_ids.tolist() for _, b in converted_blocks(loaded)] == [[0, 3, 5], [1, 2]]
