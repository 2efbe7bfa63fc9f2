"""Workers of the reliability tests and of bench/reliability.py: the federation tests' tiny MoE
net trained over the fault-tolerant TCP transport, with faults injected on request.

``ft_worker(ctx, spec)`` runs under ``fomoe.launch.spawn``; ``spec`` (a dict) says what to do:

- ``token``, ``placement`` (JSON), ``steps``, ``sync_every``, ``method``, ``seed``;
- ``peer_timeout_s``, ``min_bandwidth_mbps``: the transport's options;
- ``step_s``: seconds each inner step takes at least (spreads a run over time, so a kill at a
  random moment lands anywhere: in compute, in a sync, in a recovery);
- ``kill_at``: {rank: step} — that worker SIGKILLs itself after that inner step;
- ``inject``: {rank: {"round": r, "kind": "nan" | "inf" | "huge"}} — corrupt that worker's
  update in that round (through ``SyncManager.fault_hook``);
- ``run_dir``: checkpoints go there (on ``ExpertsLost`` the survivors save one and stop);
- ``join``: this worker restarts into a running run (``TcpTransport(join=True)``);
- ``netns``: {rank: namespace}: run that worker inside a network namespace;
- ``peers``: explicit addresses instead of the store rendezvous;
- ``hash_log``: after every applied round, append a sha256 of each held expert's θ_global to
  ``run_dir/hashes-<rank>.jsonl`` (flushed at once, so a killed worker's record survives it).

It returns a dict: status ("finished" / "stopped: ..." / "excluded: ..."), losses, final
θ_global, membership events with detection times, bytes, per-round sync seconds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from federation_workers import batch_for, inner_optimizer, make_model


def _fault_hook(spec: dict, rank: int, mgr_ref: list, recorded: list):
    """Records every packed contribution (when ``spec["record"]``) and corrupts the ones
    ``spec["inject"]`` names."""
    plan = (spec.get("inject") or {}).get(str(rank))
    record = spec.get("record")
    if not plan and not record:
        return None

    def hook(bucket: int, buf: torch.Tensor) -> None:
        mgr = mgr_ref[0]
        if plan and mgr.round == plan["round"] and buf.numel():
            kind = plan["kind"]
            if kind == "nan":
                buf[buf.numel() // 2] = float("nan")
            elif kind == "inf":
                buf[0] = float("inf")
            elif kind == "huge":
                buf.mul_(1e9)
            else:
                raise ValueError(f"unknown injection {kind!r}")
        if record:
            b = mgr.buckets[bucket]
            recorded.append({"round": mgr.round, "ranks": list(b.ranks), "experts": list(b.experts),
                             "dense": b.dense_numel, "buf": buf.clone()})
    return hook


def averaged_updates(mgr) -> list[dict]:
    """θ_global's gradient of every bucket of this worker after a sync: the averaged update.
    Empty when the round was summed over other members than the schedule now holds (a worker
    that learnt of a loss only after its peers completed the round applies their result, then
    rebuilds its schedule): the buckets would be mislabelled."""
    summed = sorted(tuple(c["ranks"]) for c in mgr.history[-1]["collectives"])
    if summed != sorted(tuple(mgr.buckets[i].ranks) for i in mgr.my_buckets):
        return []
    out = []
    for i in mgr.my_buckets:
        b = mgr.buckets[i]
        out.append({"round": mgr.round - 1, "ranks": list(b.ranks), "experts": list(b.experts), "dense": b.dense_numel,
                    "avg": torch.cat([s.grad for s in mgr._segments[i]]).clone()})
    return out


def enter_netns(name: str) -> None:
    """Move this process (its future sockets) into the network namespace ``name``."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:   # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def ft_worker(ctx, spec: dict) -> dict:
    from fomoe import checkpoint, comm
    from fomoe.placement import Placement
    from fomoe.sync import ExpertsLost, SyncManager
    from fomoe.tcp import TcpOptions, TcpTransport

    rank, world = ctx.rank, ctx.world_size
    if spec.get("debug_dump_s"):
        import faulthandler, sys
        faulthandler.dump_traceback_later(spec["debug_dump_s"], exit=False, file=sys.stderr)
    netns = (spec.get("netns") or {}).get(str(rank))
    if netns:
        enter_netns(netns)
    placement = Placement.from_json(spec["placement"])
    options = TcpOptions(peer_timeout_s=spec.get("peer_timeout_s", 5.0),
                         min_bandwidth_mbps=spec.get("min_bandwidth_mbps", 10.0),
                         stall_timeout_s=spec.get("stall_timeout_s", 300.0))
    join = bool(spec.get("join"))
    peers = spec.get("peers")
    transport = TcpTransport(rank, world, token=spec["token"], options=options, join=join, peers=peers)
    model = make_model(placement, rank, spec.get("seed", 0))
    opt = inner_optimizer(model)
    mgr_ref, recorded, averages = [None], [], []
    H = spec.get("sync_every", 2)
    mgr = SyncManager(model, opt, method=spec.get("method", "fomoe"), sync_every=H, placement=placement,
                      rank=rank, world_size=world, transport=transport, joining=join,
                      fault_hook=_fault_hook(spec, rank, mgr_ref, recorded))
    mgr_ref[0] = mgr
    start = 0
    if join:
        start = mgr.rejoin()["inner_step"]
    run_dir = spec.get("run_dir")
    if run_dir:
        Path(run_dir, f"started-{rank}").write_text(str(time.time()))
    kill_at = (spec.get("kill_at") or {}).get(str(rank))
    step_s = spec.get("step_s", 0.0)
    losses, sync_s, status = {}, [], "finished"
    step = start
    try:
        for step in range(start, spec["steps"]):
            t0 = time.monotonic()
            loss = model.loss(batch_for(rank, step, spec.get("seed", 0)))
            loss.backward()
            losses[step] = loss.item()
            left = step_s - (time.monotonic() - t0)
            if left > 0:
                time.sleep(left)
            rec = mgr.step()
            if rec is not None:
                sync_s.append(rec["seconds"])
                if spec.get("hash_log") and run_dir:
                    write_hashes(Path(run_dir, f"hashes-{rank}.jsonl"), mgr)
                if spec.get("record"):
                    averages.extend(averaged_updates(mgr))
            if kill_at is not None and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        if spec.get("save_at_end") and run_dir:
            checkpoint.save(run_dir, mgr.inner_step, model=model, sync_manager=mgr, inner_optimizer=opt,
                            rank=rank, world_size=world)
    except ExpertsLost as exc:
        status = f"stopped: {exc}"
        if run_dir:
            # The survivors are consistent with each other: save them, then stop.
            for p in mgr._held_params():
                p.detach().copy_(mgr._global_of[id(p)])
            checkpoint.save(run_dir, mgr.round * H, model=model, sync_manager=mgr, inner_optimizer=opt,
                            rank=rank, world_size=world)
    except (comm.Excluded, comm.QuorumLost) as exc:
        status = f"excluded: {exc}"
    theta = {k: v.detach().clone() for k, v in mgr.global_state().items()}
    out = {"rank": rank, "status": status, "losses": losses, "theta": theta, "round": mgr.round,
           "inner_step": mgr.inner_step, "live": list(mgr.live), "events": mgr.events,
           "transport_events": transport.events, "sync_s": sync_s, "bytes": (mgr.bytes_sent, mgr.bytes_recv),
           "payload": (transport.payload_sent, transport.payload_recv),
           "overhead": (transport.overhead_sent, transport.overhead_recv),
           "expected_traffic": list(mgr.expected_traffic), "history": mgr.history, "refused": transport.refused,
           "started_at": start, "finished_at": time.time(), "recorded": recorded, "averages": averages,
           "finite": all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())}
    transport.close()
    return out


def write_hashes(path: Path, mgr) -> None:
    """One line: the rounds applied so far and a sha256 of every held expert's θ_global."""
    import hashlib
    experts = {}
    for key, value in sorted(mgr.global_state().items()):
        if ".experts." in key:
            name = key.rsplit(".", 1)[0]   # blocks.<l>.experts.<e>
            h = experts.setdefault(name, hashlib.sha256())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    line = {"round": mgr.round, "experts": {k: h.hexdigest() for k, h in experts.items()},
            "numel": {k: sum(v.numel() for kk, v in mgr.global_state().items() if kk.rsplit(".", 1)[0] == k)
                      for k in experts}}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_hashes(path: Path) -> dict[int, dict]:
    """round -> {"experts": {name: sha256}, "numel": {name: elements}} from ``write_hashes``."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out[d["round"]] = d
    return out


def average_mismatches(results: list, dropped: dict | None = None) -> tuple[int, list[str]]:
    """Checks every averaged update against the mean of the contributions its members packed for
    that round (the last attempt of each, leaving out ``dropped`` ones: {(round, ranks, experts):
    ranks}); averages with a member whose round is not in ``results`` (a killed worker before
    its loss, a restarted one before it joined) are not checked. Returns (checked, mismatches)."""
    contributions, recorded_rounds = {}, {}
    for res in results:
        for c in res["recorded"]:
            contributions[(res["rank"], c["round"], tuple(c["ranks"]), tuple(map(tuple, c["experts"])))] = c["buf"]
            recorded_rounds.setdefault(res["rank"], set()).add(c["round"])
    checked, bad = 0, []
    for res in results:
        for a in res["averages"]:
            key = (a["round"], tuple(a["ranks"]), tuple(map(tuple, a["experts"])))
            skip = (dropped or {}).get(key, set())
            if any(a["round"] not in recorded_rounds.get(r, ()) for r in a["ranks"] if r not in skip):
                continue
            parts = [contributions[(r, *key)] for r in a["ranks"] if r not in skip]
            # Every contribution dropped (a bucket of the bad worker alone): no update at all.
            want = torch.stack(parts).sum(0) / len(parts) if parts else torch.zeros_like(a["avg"])
            if not torch.allclose(a["avg"], want, rtol=1e-5, atol=1e-7):
                bad.append(f"rank {res['rank']} round {a['round']} ranks {a['ranks']}: max error "
                           f"{float((a['avg'] - want).abs().max()):.3g}")
            checked += 1
    return checked, bad


def dropped_contributions(results: list) -> dict:
    """{(round, ranks, experts): dropped ranks} from the workers' "dropped" events."""
    dropped = {}
    for res in results:
        for e in res["events"]:
            if e["event"] == "dropped":
                b = next((a for a in res["averages"] if a["round"] == e["round"] and a["ranks"] == e["ranks"]), None)
                if b is None:   # an attempt a loss interrupted, or a round not recorded
                    continue
                dropped[(e["round"], tuple(e["ranks"]), tuple(map(tuple, b["experts"])))] = {int(r) for r in e["dropped"]}
    return dropped


def timed_killer(run_dir: str, victim: int, at_s: float, signal_no: int = signal.SIGKILL, world: int = 0,
                 thaw_s: float = 30.0):
    """An ``on_start`` callback for ``fomoe.launch.spawn``: once every worker started training
    (their ``started-*`` files), send ``signal_no`` to worker ``victim`` after ``at_s`` seconds.
    The kill time lands in ``run_dir/killed`` (wall clock). A SIGSTOPped worker is thawed
    ``thaw_s`` seconds later."""
    import threading

    def run(procs) -> None:
        n = world or len(procs)
        deadline = time.time() + 120
        while time.time() < deadline and sum(Path(run_dir, f"started-{r}").exists() for r in range(n)) < n:
            time.sleep(0.01)
        time.sleep(at_s)
        pid = procs[victim].pid
        t = time.time()
        try:
            os.kill(pid, signal_no)
        except ProcessLookupError:
            return
        Path(run_dir, "killed").write_text(json.dumps({"rank": victim, "time": t, "signal": int(signal_no)}))
        if signal_no == signal.SIGSTOP:
            # A frozen worker: thaw it later so it finds out it was excluded, and exits.
            time.sleep(thaw_s)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    return lambda procs: threading.Thread(target=run, args=(procs,), daemon=True).start()
