"""Worker functions and the tiny model shared by the federation tests (test_sync, test_comm,
test_checkpoint). Spawned workers import this module by name, so it lives next to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fomoe import MoE, MoEConfig

VOCAB, D, D_FF, SEQ, BATCH = 32, 16, 8, 8, 4


class TinyMoENet(nn.Module):
    """Embedding -> ``layers`` residual fomoe.MoE blocks -> head. Every worker builds it from the
    same seed: dense parameters from the global RNG, experts from MoEConfig.init_seed."""

    def __init__(self, resident, num_experts: int = 4, layers: int = 2, top_k: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB)
        self.blocks = nn.ModuleList(
            MoE(MoEConfig(d_model=D, d_ff=D_FF, num_experts=num_experts, top_k=top_k,
                          resident_experts=None if resident is None else resident(l), init_seed=1000 * seed + l,
                          init_std=0.2))
            for l in range(layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for m in self.blocks:
            x = x + m(x)
        return self.head(x)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def batch_for(rank: int, step: int, seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    """Deterministic per-(rank, step) token batch; ranks see different (non-IID) data."""
    g = torch.Generator().manual_seed(10_000 * seed + 100 * rank + step)
    lo = 4 * rank % VOCAB
    return (torch.randint(0, VOCAB // 2, (batch, SEQ + 1), generator=g) + lo) % VOCAB


def make_model(placement, rank: int, seed: int = 0, top_k: int = 2) -> TinyMoENet:
    resident = None if placement is None else (lambda l: placement.resident(rank, l))
    E = 4 if placement is None else placement.num_experts
    L = 2 if placement is None else placement.num_layers
    return TinyMoENet(resident, num_experts=E, layers=L, top_k=top_k, seed=seed)


def inner_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_worker(ctx, placement, method: str, steps: int, sync_every: int, weighted: bool = False,
                 compression=None, seed: int = 0):
    """Train ``steps`` inner steps on the worker's device; return (final state_dict, sync records,
    expected traffic per sync, losses, (bytes sent, bytes received), state_dict after each sync),
    tensors on the CPU."""
    from fomoe.sync import SyncManager
    model = make_model(placement, ctx.rank, seed).to(ctx.device)
    opt = inner_optimizer(model)
    mgr = SyncManager(model, opt, method=method, sync_every=sync_every, placement=placement, rank=ctx.rank,
                      world_size=ctx.world_size, weighted=weighted, compression=compression,
                      global_device=ctx.device)
    records, losses, snapshots = [], [], []
    for step in range(steps):
        loss = model.loss(batch_for(ctx.rank, step, seed).to(ctx.device))
        loss.backward()
        losses.append(loss.item())
        rec = mgr.step()
        if rec is not None:
            records.append(rec)
            snapshots.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return state, records, mgr.expected_traffic, losses, (mgr.bytes_sent, mgr.bytes_recv), snapshots


def checkpointed_run(ctx, run_dir: str, placement, steps: int, save_at=(), resume: bool = False,
                     kill_after: int | None = None, sync_every: int = 2, **sync_kwargs):
    """Train to ``steps`` with checkpoints after the steps in ``save_at`` (optionally resuming
    first, optionally SIGKILLing every worker right after saving step ``kill_after``).
    Returns ({step: loss}, final state_dict, θ_global, resumed-from step)."""
    import os
    import signal

    from fomoe import checkpoint
    from fomoe.sync import SyncManager
    model = make_model(placement, ctx.rank)
    opt = inner_optimizer(model)
    mgr = SyncManager(model, opt, method="fomoe" if placement is not None else "diloco", sync_every=sync_every,
                      placement=placement, rank=ctx.rank, world_size=ctx.world_size, **sync_kwargs)
    config = {"test": "checkpointed_run", "steps": steps}
    start = 0
    if resume:
        info = checkpoint.load(run_dir, model=model, sync_manager=mgr, inner_optimizer=opt, rank=ctx.rank,
                               world_size=ctx.world_size, config=config)
        start = info["step"]
        assert info["extra_state"]["next_step"] == start
        assert info["extra_state"]["marker"] == {"rank": ctx.rank, "tuple": (1, 2.5, None)}
    losses = {}
    for step in range(start, steps):
        loss = model.loss(batch_for(ctx.rank, step))
        loss.backward()
        mgr.step()
        losses[step] = loss.item()
        if step + 1 in save_at:
            checkpoint.save(run_dir, step + 1, model=model, sync_manager=mgr, inner_optimizer=opt,
                            extra_state={"next_step": step + 1, "marker": {"rank": ctx.rank, "tuple": (1, 2.5, None)}},
                            config=config, rank=ctx.rank, world_size=ctx.world_size)
        if kill_after == step + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    theta = {k: v.clone() for k, v in mgr.global_state().items()}
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, theta, start
