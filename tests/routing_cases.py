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
