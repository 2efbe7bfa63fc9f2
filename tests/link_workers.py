"""Federated training over shaped links: the workers of tests/test_slow_links.py and
bench/link_experiment.py.

``run_over_relays(case)`` starts one ``fomoe.relay.Relay`` per worker in front of that worker's
TCP listener (delay, rate and loss of the case), spawns the workers (``fomoe.launch.spawn``),
each of which advertises its relay's address to the others, so every connection of the mesh
crosses one shaped link, and trains a small ``fomoe.lm.MoELM`` with ``SyncManager`` over
``fomoe.tcp.TcpTransport``. It returns the workers' results and the sync times measured across
workers next to ``fomoe.plan``'s prediction for the same schedule and link.
"""

from __future__ import annotations

import statistics
import time

import torch

TOKEN = "slow-links-rehearsal"


def lm_config(d_model: int, d_ff: int, num_experts: int = 6, n_layers: int = 2, vocab: int = 256, seq: int = 32):
    from fomoe.lm import LMConfig
    return LMConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=4, num_experts=num_experts,
                    d_ff=d_ff, max_seq_len=seq)


def link_worker(ctx, spec: dict) -> dict:
    from fomoe.lm import MoELM
    from fomoe.placement import Placement
    from fomoe.sync import SyncManager, schedule_traffic
    from fomoe.tcp import TcpOptions, TcpTransport

    rank, world = ctx.rank, ctx.world_size
    cfg = lm_config(**spec["model"])
    placement = Placement.from_spec(spec["placement"], world, cfg.num_experts, cfg.n_layers, 0)
    options = TcpOptions(**spec.get("options", {}))
    # Listen on the port the relay forwards to; the others dial the relay.
    transport = TcpTransport(rank, world, token=TOKEN, bind="127.0.0.1", port=spec["ports"][rank],
                             advertise=f"127.0.0.1:{spec['relay_ports'][rank]}", options=options)
    torch.manual_seed(1234 + rank)
    model = MoELM.from_placement(cfg, placement, rank, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    H = spec["sync_every"]
    mgr = SyncManager(model, opt, method="fomoe", sync_every=H, placement=placement, rank=rank, world_size=world,
                      transport=transport)
    g = torch.Generator().manual_seed(100 + rank)
    losses, syncs = [], []
    for step in range(spec["steps"]):
        batch = torch.randint(0, cfg.vocab_size, (4, cfg.max_seq_len + 1), generator=g)
        ce, aux = model.loss(batch)
        (ce + aux).backward()
        losses.append(ce.item())
        start = time.monotonic()    # CLOCK_MONOTONIC is one clock for every process of the machine
        rec = mgr.step()
        end = time.monotonic()
        if rec is not None:
            syncs.append({"start": start, "end": end, "seconds": rec["seconds"], "wire_sent": rec["wire_sent"],
                          "wire_recv": rec["wire_recv"], "bytes_sent": rec["bytes_sent"]})
    out = {"rank": rank, "losses": losses, "syncs": syncs, "buckets": list(mgr.buckets),
           "expected": schedule_traffic(mgr.buckets, rank), "payload": (transport.payload_sent, transport.payload_recv),
           "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}
    transport.close()
    return out


def sync_wall_seconds(results: list[dict]) -> list[float]:
    """Per sync: from the moment the last worker entered it until the last worker left it (the
    system model's 'every worker starts at the same moment', measured on one clock)."""
    n = len(results[0]["syncs"])
    return [max(r["syncs"][i]["end"] for r in results) - max(r["syncs"][i]["start"] for r in results)
            for i in range(n)]


def run_over_relays(case: dict, timeout_s: float = 300.0) -> dict:
    """``case``: workers, placement, model (lm_config kwargs), steps, sync_every, delay_ms,
    rate_mbit, loss, optional loss_pattern (periodic, random) and options (TcpOptions kwargs). Returns measured and predicted
    sync seconds, the workers' results and the relays' loss counts."""
    from fomoe import plan
    from fomoe.launch import free_port, spawn
    from fomoe.relay import Relay

    W = case["workers"]
    ports = [free_port() for _ in range(W)]
    relays = [Relay(("127.0.0.1", p), delay_ms=case["delay_ms"], rate_mbit=case["rate_mbit"], loss=case["loss"],
                    loss_pattern=case.get("loss_pattern", "periodic"), seed=1000 * i)
              for i, p in enumerate(ports)]
    for r in relays:
        r.start()
    try:
        spec = {k: case[k] for k in ("placement", "model", "steps", "sync_every")}
        spec.update(ports=ports, relay_ports=[r.port for r in relays], options=case.get("options", {}))
        t0 = time.monotonic()
        results = spawn(link_worker, W, backend="gloo", args=(spec,), timeout_s=timeout_s)
        wall = time.monotonic() - t0
        lost = sum(r.totals()["segments_lost"] for r in relays)
        errors = [e for r in relays for e in r.errors]
    finally:
        for r in relays:
            r.stop()
    shape = plan.ModelShape.from_lm_config(lm_config(**case["model"]))
    unlimited = case["rate_mbit"] is None   # an unshaped baseline: no prediction
    p = plan.Plan(shape, plan.Federation(workers=W, placement=case["placement"], sync_every=case["sync_every"]),
                  link=plan.Link(bandwidth_gbps=1.0 if unlimited else case["rate_mbit"] / 1e3,
                                 latency_ms=case["delay_ms"], loss=case["loss"]))
    measured = sync_wall_seconds(results)
    predicted = None if unlimited else p.comm_seconds("fomoe", commit_barrier=True)
    steady = statistics.median(measured[1:] or measured)   # the first sync also warms up connections
    return {"case": case, "results": results, "plan_buckets": p.buckets("fomoe"), "measured": measured,
            "measured_median": steady, "predicted": predicted,
            "ratio": None if unlimited else steady / predicted, "wall_s": wall, "segments_lost": lost,
            "relay_errors": errors}
