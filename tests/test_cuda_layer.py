"""The fomoe.MoE layer on a GPU: matches the reference, compiles without graph breaks, and a
whole training step (forward, backward, optimizer) replays from a CUDA graph."""

import pytest
import torch

import fomoe
from fomoe import reference as ref
from routing_cases import check_router_logits_from_bf16

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def needs_all_cuda_kernels():
    if fomoe.ops.reference_fallbacks():
        pytest.skip(f"this build runs {fomoe.ops.reference_fallbacks()} on the reference path")


def make_layer(**kw):
    cfg = dict(d_model=256, d_ff=512, num_experts=16, top_k=2, init_seed=7, resident_experts=list(range(0, 16, 2)))
    cfg.update(kw)
    return fomoe.MoE(**cfg).cuda()


def expected_output(layer, x):
    E = layer.num_experts
    w13 = torch.zeros(E, *layer.w13.shape[1:], device=x.device).index_copy(0, layer.expert_ids, layer.w13.float())
    w2 = torch.zeros(E, *layer.w2.shape[1:], device=x.device).index_copy(0, layer.expert_ids, layer.w2.float())
    cfg = layer.config
    return ref.moe_loop(x.float(), layer.router.weight.float(), w13, w2, cfg.top_k, cfg.score, cfg.renormalize,
                        layer.resident_mask, cfg.skip_policy, cfg.renormalize_kept)


@pytest.mark.parametrize("policy", ["skip", "reroute"])
def test_layer_bf16_autocast_matches_fp32_reference(policy):
    needs_all_cuda_kernels()
    torch.manual_seed(0)
    layer = make_layer(skip_policy=policy)
    x = torch.randn(4, 512, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = expected_output(layer, x)
    err = (y.float() - expected).norm() / expected.norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("T,d,E", [(4099, 1024, 64), (3, 72, 1), (0, 256, 16), (2048, 2048, 128)])
def test_router_logits_from_bf16_on_tensor_cores_are_within_fp32_class_error(T, d, E):
    check_router_logits_from_bf16(T, d, E, torch.Generator().manual_seed(T + d + E), device="cuda")


def test_router_logits_opcheck_and_bad_input_on_cuda():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(5, 64, generator=gen).cuda().requires_grad_()
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(33, 64, generator=gen).to(dtype).cuda().requires_grad_()
        torch.library.opcheck(torch.ops.fomoe.router_logits.default, (x, w))
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.fomoe.router_logits(x, w.detach().cpu())
    with pytest.raises(RuntimeError, match=r"grad must be \[tokens=33, experts=5\]"):
        torch.ops.fomoe.router_logits_backward(torch.randn(33, 4, device="cuda"), x, w, [True, True])


# A bf16 input is what fomoe.lm passes (its norm writes the copy the GEMMs read): the router
# then runs on bf16 pieces of its weight (ops.router_logits).
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_on_cuda_matches_eager(x_dtype):
    needs_all_cuda_kernels()
    torch.manual_seed(1)
    layer = make_layer()
    x = torch.randn(2048, 256, device="cuda").to(x_dtype).requires_grad_()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager = layer(x)
        y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=2e-2, atol=2e-2)
    g_eager = torch.autograd.grad(y_eager.float().square().sum(), (x, layer.w13))
    g_comp = torch.autograd.grad(y_comp.float().square().sum(), (x, layer.w13))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_training_step_replays_from_a_cuda_graph(x_dtype):
    needs_all_cuda_kernels()
    torch.manual_seed(2)
    layer = make_layer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, capturable=True)
    static_x = torch.randn(1024, 256, device="cuda").to(x_dtype)
    static_target = torch.randn(1024, 256, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(layer(static_x).float(), static_target) + layer.aux_loss
        loss.backward()
        opt.step()
        return loss

    # Warm up on a side stream (allocations, lazy init), as CUDA graph capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)

    eager_state = {k: v.clone() for k, v in layer.state_dict().items()}
    eager_opt = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()} for k, s in opt.state.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    # Replays with new data follow the same trajectory as eager steps from the same state.
    layer.load_state_dict(eager_state)
    for k, s in eager_opt.items():
        for n, t in s.items():
            if torch.is_tensor(t):
                opt.state[k][n].copy_(t)
    xs = [torch.randn(1024, 256, device="cuda").to(x_dtype) for _ in range(3)]
    losses_graph = []
    for x in xs:
        static_x.copy_(x)
        graph.replay()
        losses_graph.append(static_loss.item())
    params_graph = [p.detach().clone() for p in layer.parameters()]

    layer.load_state_dict(eager_state)
    for k, s in eager_opt.items():
        for n, t in s.items():
            if torch.is_tensor(t):
                opt.state[k][n].copy_(t)
    losses_eager = []
    for x in xs:
        static_x.copy_(x)
        losses_eager.append(step().item())
    assert losses_graph == pytest.approx(losses_eager, rel=1e-3)
    for a, b in zip(params_graph, layer.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-3, atol=1e-4)
