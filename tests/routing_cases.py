"""Random routing problems shared by the op and layer tests (CPU and CUDA)."""

from __future__ import annotations

import torch


def random_logits(T: int, E: int, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    # Continuous values: ties in top-k have probability zero.
    return (torch.randn(T, E, generator=gen, dtype=torch.float64) * 2).to(dtype).to(device)


def random_resident(E: int, num_local: int, gen: torch.Generator, device="cpu") -> tuple[torch.Tensor, list[int]]:
    """A resident map [E] (global id -> local slot or -1) holding num_local random experts."""
    chosen = sorted(torch.randperm(E, generator=gen)[:num_local].tolist())
    resident_map = torch.full((E,), -1, dtype=torch.int32)
    resident_map[chosen] = torch.arange(len(chosen), dtype=torch.int32)
    return resident_map.to(device), chosen


def random_ids(T: int, E: int, k: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Distinct expert ids per token, as a router produces them."""
    if T == 0:
        return torch.empty(0, k, dtype=torch.int32, device=device)
    scores = torch.rand(T, E, generator=gen)
    return scores.topk(k, dim=1).indices.to(torch.int32).to(device)


def routing_problem(T: int, d: int, f: int, E: int, k: int, num_local: int, gen: torch.Generator,
                    dtype=torch.float64, device="cpu"):
    """x, dispatch tables, weights and gate of a random problem, all on ``device``."""
    from fomoe import ops

    resident_map, chosen = random_resident(E, num_local, gen, device)
    ids = random_ids(T, E, k, gen, device)
    permutation, offsets, inverse = ops.dispatch(ids, resident_map, num_local)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    w13 = (torch.randn(num_local, d, 2 * f, generator=gen, dtype=torch.float64) / d ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(num_local, f, d, generator=gen, dtype=torch.float64) / f ** 0.5).to(dtype).to(device)
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gate = torch.rand(T, k, generator=gen, dtype=torch.float64).to(gate_dtype).to(device)
    return dict(x=x, ids=ids, resident_map=resident_map, chosen=chosen, permutation=permutation, offsets=offsets,
                inverse=inverse, w13=w13, w2=w2, gate=gate)


def check_router_logits_from_bf16(T: int, d: int, E: int, gen: torch.Generator, device="cpu") -> None:
    """fomoe.ops.router_logits on a bf16 input (the bf16-pieces path) against fp64: x's gradient
    one rounding to bf16 of its exact value; the logits and the weight's gradient within 2x an
    fp32 GEMM's error plus sqrt(K)/2 units of fp32 rounding of the largest sum of the terms'
    magnitudes (K terms per sum). The pieces' products are exact; the tensor cores' fp32
    accumulation truncates, and its error grows with K (on an H200: 5.5 units at K = 1024,
    9 at K = 4099, an fp32 GEMM 0.4-1.5). A router on bf16 weights is ~2^15 / sqrt(K) units
    off, and one piece short ~2^7 units."""
    from fomoe import ops, reference as ref

    u = 2.0 ** -24
    x = torch.randn(T, d, generator=gen).to(torch.bfloat16).to(device).requires_grad_()
    w = (torch.randn(E, d, generator=gen) * 0.05).to(device).requires_grad_()
    g = torch.randn(T, E, generator=gen).to(device)
    logits = ops.router_logits(x, w)
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    grad_x, grad_w = torch.autograd.grad(logits, (x, w), g)
    assert grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32

    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    cases = [
        (logits, ref.router_logits(x64, w64), ref.router_logits(x.detach().float(), w.detach()),
         x64.abs() @ w64.abs().T),
        (grad_w, g64.T @ x64, g.T @ x.detach().float(), g64.abs().T @ x64.abs()),
    ]
    for name, (got, exact, fp32, magnitude), K in zip(("logits", "grad_weight"), cases, (d, T)):
        if exact.numel() == 0:
            continue
        err, fp32_err = (got.double() - exact).abs().max(), (fp32.double() - exact).abs().max()
        scale = u * magnitude.max()
        assert err <= 2 * fp32_err + max(4, K ** 0.5 / 2) * scale, (
            f"{name}: error {err / scale:.2f} units of u * max|terms| (an fp32 GEMM: {fp32_err / scale:.2f})")
    if T:
        exact = g64 @ w64
        excess = (grad_x.double() - exact).abs() - exact.abs() * 2.0 ** -8   # beyond half an ulp of bf16
        scale = u * (g64.abs() @ w64.abs())
        assert (excess <= 4 * scale).all(), f"grad_x: {(excess / scale).max():.2f} units past one rounding"
