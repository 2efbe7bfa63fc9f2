"""Reliability trials: federated runs over the TCP transport with a worker lost at a random point.

Two kinds of trial, alternating (``--trials N``, default 20):

- **r = 2** (4 workers, every expert on 2 of them; the federation tests' tiny MoE net through
  ``tests/reliability_workers.py``): a random worker is SIGKILLed (every fifth trial: frozen with
  SIGSTOP, found by the heartbeat timeout) at a random moment of the run, which lands anywhere:
  in compute, in a sync, in a recovery. Every other trial also injects a bad update (NaN, Inf
  or 1e9 times too large) from another random worker in a random round. The survivors must
  finish. Checked against independent records: every worker appends a sha256 of each of its
  experts' θ_global to its own file after every applied round (flushed, so the killed worker's
  record survives it). Parameters lost = elements of experts of the lost worker whose state at
  its last applied round no survivor holds, plus elements of experts without a surviving holder,
  plus elements on which surviving holders disagree. Every averaged update is also compared with
  the mean of the live contributions the workers recorded; the bad update must be dropped on
  every member of its buckets.
- **r = 1** (``fomoe train --transport tcp`` with 3 workers and a partition placement): a
  random worker is SIGKILLed after a random step; the survivors must stop with a checkpoint and
  a message (``RunStopped``); the run resumed from its checkpoint must end exactly where an
  uninterrupted run of the same configuration ends (every metrics line and the final held-out
  loss equal).

Detection time: from the kill (or freeze) to the first survivor marking the worker lost.
Writes a JSON file (``--out``) and prints progress and a markdown table.

    python bench/reliability_trials.py --trials 20 --out reliability.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import reliability_workers as rw  # noqa: E402
from fomoe import checkpoint, launch  # noqa: E402
from fomoe.launch import Failed  # noqa: E402
from fomoe.placement import Placement  # noqa: E402

TOKEN = "reliability-trials-token"
R2_STEPS, R2_H, R2_STEP_S, R2_TIMEOUT = 24, 2, 0.03, 2.0
R1_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 6, "top_k": 2, "d_ff": 64}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- r = 2: continue without the lost worker ------------------------------------------------------

def r2_trial(i: int, rng: random.Random, work: Path) -> dict:
    world = 4
    placement = Placement.replicated(world, 4, 2, 2)
    victim = rng.randrange(world)
    freeze = i % 5 == 4
    at_s = rng.uniform(0.05, 0.75)
    inject = {}
    if i % 2 == 0:
        bad = rng.choice([r for r in range(world) if r != victim])
        inject = {str(bad): {"round": rng.randrange(1, R2_STEPS // R2_H - 1), "kind": rng.choice(["nan", "inf", "huge"])}}
    run_dir = work / f"r2-{i}"
    run_dir.mkdir()
    spec = {"token": TOKEN, "placement": placement.to_json(), "steps": R2_STEPS, "sync_every": R2_H,
            "peer_timeout_s": R2_TIMEOUT, "run_dir": str(run_dir), "record": True, "step_s": R2_STEP_S,
            "hash_log": True, "seed": i, "inject": inject}
    sig = signal.SIGSTOP if freeze else signal.SIGKILL
    t0 = time.time()
    results = launch.spawn(rw.ft_worker, world, backend="gloo", args=(spec,), timeout_s=180, tolerate_failures=True,
                           on_start=rw.timed_killer(str(run_dir), victim, at_s, sig, world=world,
                                                    thaw_s=R2_TIMEOUT + 3.0))
    wall = time.time() - t0
    killed = json.loads((run_dir / "killed").read_text()) if (run_dir / "killed").exists() else None
    survivors = [r for r in results if not isinstance(r, Failed) and r["rank"] != victim]
    victim_result = results[victim]
    landed = killed is not None and (isinstance(victim_result, Failed) or victim_result["status"] != "finished")
    out = {"trial": i, "kind": "r2", "fault": "SIGSTOP" if freeze else "SIGKILL", "victim": victim,
           "at_s": round(at_s, 3), "inject": inject, "wall_s": round(wall, 1), "fault_landed": landed,
           "victim_status": "killed" if isinstance(victim_result, Failed) else victim_result["status"][:40]}
    finished = len(survivors) == world - 1 and all(
        r["status"] == "finished" and r["round"] == R2_STEPS // R2_H and r["finite"] for r in survivors)
    out["finished"] = finished
    out["final_loss_finite"] = all(all(torch.isfinite(torch.tensor(list(r["losses"].values())))) for r in survivors)

    # Parameters lost, against the workers' own hash records.
    hashes = {r: rw.read_hashes(run_dir / f"hashes-{r}.jsonl") for r in range(world)}
    survivor_ranks = [r["rank"] for r in survivors]
    lost_elements, missing, checked_elements = 0, [], 0
    if landed and hashes[victim]:
        last = max(hashes[victim])
        for name, digest in hashes[victim][last]["experts"].items():
            checked_elements += hashes[victim][last]["numel"][name]
            held = [hashes[s][last]["experts"].get(name) for s in survivor_ranks if last in hashes[s]]
            if digest not in held:
                lost_elements += hashes[victim][last]["numel"][name]
                missing.append(f"{name}@round{last}")
        out["victim_last_round"] = last
    seen: dict[str, torch.Tensor] = {}
    disagree = 0
    for res in survivors:
        for key, value in res["theta"].items():
            if key in seen and not torch.equal(seen[key], value):
                disagree += value.numel()
            seen.setdefault(key, value)
    orphan_elements = 0
    for l in range(placement.num_layers):
        for e in range(placement.num_experts):
            if f"blocks.{l}.experts.{e}.w13" not in seen:
                orphan_elements += 1
                missing.append(f"layer {l} expert {e} has no surviving holder")
    out["params_lost"] = lost_elements + disagree + orphan_elements
    out["victim_elements_checked"] = checked_elements
    out["lost_detail"] = missing[:5]

    # Detection: kill -> first survivor marking the victim lost.
    detected = [d["detected_at"] for r in survivors for e in r["transport_events"] if e["event"] == "membership"
                for k, d in e["details"].items() if int(k) == victim and d["detected_at"]]
    out["detect_s"] = round(min(detected) - killed["time"], 3) if landed and detected else None
    out["shard_reported"] = any(e["event"] == "membership" and victim in e["lost"] for r in survivors for e in r["events"])

    # Averages against the recorded live contributions; the bad update dropped everywhere.
    checked, bad = rw.average_mismatches(survivors, rw.dropped_contributions(survivors))
    out["averages_checked"], out["average_mismatches"] = checked, len(bad)
    if inject:
        (bad_text, plan), = inject.items()
        bad_rank = int(bad_text)
        drops = {(res["rank"], e["round"]) for res in survivors for e in res["events"]
                 if e["event"] == "dropped" and bad_rank in {int(r) for r in e["dropped"]}}
        members = {res["rank"] for res in survivors}
        bad_alive = bad_rank in members
        out["bad_update"] = plan["kind"]
        out["bad_dropped"] = bad_alive and {r for r, _ in drops} == members and {rd for _, rd in drops} == {plan["round"]}
    return out


# ---- r = 1: stop with a checkpoint, resume exactly ------------------------------------------------

def r1_config(out: Path):
    from fomoe.train import TrainConfig
    return TrainConfig(workers=3, placement="partition", steps=30, sync_every=5, ckpt_every=5, eval_every=5,
                       log_every=1, out=str(out), transport="tcp", peer_timeout_s=3.0, progress=False, batch_size=4,
                       seq_len=32, eval_batches=2, lr=0.005, warmup_steps=2, model=dict(R1_MODEL), threads=1)


def kill_after(out: Path, victim: int, step: int, record: dict):
    """``on_start``: SIGKILL ``victim`` once metrics.jsonl reaches ``step`` and a checkpoint is complete."""
    def run(procs):
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
                if any(m.get("step", 0) >= step for m in lines) and (checkpoint.latest_step(out) or 0) >= 5:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.003)
        record["time"] = time.time()
        os.kill(procs[victim].pid, signal.SIGKILL)
    return lambda procs: threading.Thread(target=run, args=(procs,), daemon=True).start()


def comparable(out: Path) -> list:
    keep = ("loss", "bytes_sent", "bytes_recv", "expert_load", "router_drift", "aux_loss", "eval_loss")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(m["kind"], m["step"], tuple(json.dumps(m.get(k)) for k in keep)) for m in lines
            if m["kind"] in ("train", "sync", "final")]


def r1_trial(i: int, rng: random.Random, work: Path, reference: list) -> dict:
    from fomoe.train import RunStopped, train
    out = work / f"r1-{i}"
    victim, step = rng.randrange(3), rng.randrange(6, 26)
    record: dict = {}
    t0 = time.time()
    result = {"trial": i, "kind": "r1", "fault": "SIGKILL", "victim": victim, "kill_after_step": step}
    try:
        train(r1_config(out), token=TOKEN, on_start=kill_after(out, victim, step, record))
        result.update(fault_landed=False, stopped_cleanly=False, finished=True)
    except RunStopped as exc:
        result.update(fault_landed=True, stopped_cleanly=exc.checkpoint_step is not None,
                      checkpoint_step=exc.checkpoint_step, finished=False)
    except Exception as exc:  # noqa: BLE001 (a trial that fails otherwise is a finding: report it)
        result.update(fault_landed="time" in record, stopped_cleanly=False, finished=False,
                      error=f"{type(exc).__name__}: {str(exc)[:300]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    change = next((m for m in lines if m["kind"] == "membership"), None)
    if change and "time" in record:
        detected = [t for t in change.get("detected_at", {}).values() if t]
        result["detect_s"] = round(min(detected) - record["time"], 3) if detected else None
        result["shard_reported"] = bool(change.get("lost_data_shards"))
    if result.get("stopped_cleanly"):
        try:
            summary = train(r1_config(out), resume=True, token=TOKEN)
            result["resumed"] = True
            result["resume_exact"] = comparable(out) == reference
            result["final_eval_loss"] = summary["final_eval_loss"]
        except Exception as exc:  # noqa: BLE001
            result.update(resumed=False, resume_exact=False, error=f"resume: {type(exc).__name__}: {str(exc)[:300]}")
    # Resumed exactly = every parameter of the uninterrupted run is restored: nothing lost.
    result["params_lost"] = 0 if result.get("resume_exact") else None
    result["wall_s"] = round(time.time() - t0, 1)
    return result


# ---- the experiment -------------------------------------------------------------------------------

def summarize(trials: list[dict], args) -> dict:
    r2 = [t for t in trials if t["kind"] == "r2"]
    r1 = [t for t in trials if t["kind"] == "r1"]
    detect = [t["detect_s"] for t in trials if t.get("detect_s") is not None and t["fault"] == "SIGKILL"]
    freeze = [t["detect_s"] for t in trials if t.get("detect_s") is not None and t["fault"] == "SIGSTOP"]
    landed = [t for t in trials if t["fault_landed"]]
    return {
        "trials": len(trials), "faults_injected": len(landed) + sum(1 for t in r2 if t.get("bad_update")),
        "worker_losses": len(landed), "bad_updates": sum(1 for t in r2 if t.get("bad_update")),
        "bad_updates_dropped": sum(1 for t in r2 if t.get("bad_dropped")),
        "r2_trials": len(r2), "r2_finished": sum(1 for t in r2 if t["finished"]),
        "r2_params_lost": sum(t["params_lost"] for t in r2),
        "r2_victim_elements_checked": sum(t.get("victim_elements_checked", 0) for t in r2),
        "r2_averages_checked": sum(t["averages_checked"] for t in r2),
        "r2_average_mismatches": sum(t["average_mismatches"] for t in r2),
        "r1_trials": len(r1), "r1_stopped_cleanly": sum(1 for t in r1 if t.get("stopped_cleanly")),
        "r1_resumed_exactly": sum(1 for t in r1 if t.get("resume_exact")),
        "loss_reported_with_shard": sum(1 for t in landed if t.get("shard_reported")),
        "detect_kill_s": {"n": len(detect), "median": statistics.median(detect) if detect else None,
                          "max": max(detect) if detect else None},
        "detect_freeze_s": {"n": len(freeze), "median": statistics.median(freeze) if freeze else None,
                            "max": max(freeze) if freeze else None, "peer_timeout_s": R2_TIMEOUT},
        "errors": [t.get("error") for t in trials if t.get("error")],
    }


def table(s: dict) -> str:
    def fmt(d):
        return "n/a" if d["median"] is None else f"{d['median'] * 1000:.0f} ms / {d['max'] * 1000:.0f} ms (n={d['n']})"
    rows = [
        ("trials", s["trials"]),
        ("faults injected (worker losses + bad updates)", f"{s['faults_injected']} ({s['worker_losses']} + {s['bad_updates']})"),
        ("r=2 runs finished without the lost worker", f"{s['r2_finished']} / {s['r2_trials']}"),
        ("r=2 parameters lost (elements, vs. the workers' hash records)",
         f"{s['r2_params_lost']} (of {s['r2_victim_elements_checked']:,} expert elements the lost workers held)"),
        ("r=2 averaged updates checked against the live contributions / mismatches",
         f"{s['r2_averages_checked']} / {s['r2_average_mismatches']}"),
        ("bad updates dropped for their round on every member", f"{s['bad_updates_dropped']} / {s['bad_updates']}"),
        ("r=1 runs stopped cleanly with a checkpoint", f"{s['r1_stopped_cleanly']} / {s['r1_trials']}"),
        ("r=1 runs resumed to the end, equal to the uninterrupted run", f"{s['r1_resumed_exactly']} / {s['r1_trials']}"),
        ("losses reported with the lost worker's data shard", f"{s['loss_reported_with_shard']} / {s['worker_losses']}"),
        ("detection after SIGKILL, median / max", fmt(s["detect_kill_s"])),
        (f"detection after SIGSTOP (peer timeout {R2_TIMEOUT:g} s), median / max", fmt(s["detect_freeze_s"])),
    ]
    return "| measure | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill points (default 0)")
    ap.add_argument("--r1-every", type=int, default=3, help="every n-th trial is an r=1 trial (default 3)")
    ap.add_argument("--out", default="reliability_trials.json", help="JSON results (default reliability_trials.json)")
    args = ap.parse_args()
    if args.trials < 1 or args.r1_every < 1:
        ap.error("--trials and --r1-every must be positive")
    rng = random.Random(args.seed)
    started = time.time()
    trials = []
    with tempfile.TemporaryDirectory(prefix="fomoe-reliability-") as tmp:
        work = Path(tmp)
        reference = None
        for i in range(args.trials):
            if (i + 1) % args.r1_every == 0:
                if reference is None:
                    from fomoe.train import train
                    log("r=1 reference: an uninterrupted run of the same configuration ...")
                    train(r1_config(work / "reference"), token=TOKEN)
                    reference = comparable(work / "reference")
                t = r1_trial(i, rng, work, reference)
                log(f"[{i + 1}/{args.trials}] r=1 kill rank {t['victim']} after step {t['kill_after_step']}: "
                    f"landed={t['fault_landed']} stopped_cleanly={t.get('stopped_cleanly')} "
                    f"checkpoint={t.get('checkpoint_step')} resume_exact={t.get('resume_exact')} "
                    f"detect={t.get('detect_s')} s ({t['wall_s']} s)" + (f" ERROR {t['error']}" if t.get("error") else ""))
            else:
                try:
                    t = r2_trial(i, rng, work)
                except Exception as exc:  # noqa: BLE001 (report it with the others; the exit code says so)
                    import traceback
                    traceback.print_exc()
                    t = {"trial": i, "kind": "r2", "fault": "SIGKILL", "victim": None, "at_s": None, "wall_s": None,
                         "fault_landed": False, "finished": False, "params_lost": 0, "averages_checked": 0,
                         "average_mismatches": 0, "detect_s": None, "error": f"{type(exc).__name__}: {exc}"}
                log(f"[{i + 1}/{args.trials}] r=2 {t['fault']} rank {t['victim']} at {t['at_s']} s"
                    + (f" + {t['bad_update']} update" if t.get("bad_update") else "")
                    + f": landed={t['fault_landed']} finished={t['finished']} params_lost={t['params_lost']} "
                    f"detect={t['detect_s']} s averages={t['averages_checked']}/{t['average_mismatches']} bad "
                    + (f"dropped={t.get('bad_dropped')}" if t.get("bad_update") else "-") + f" ({t['wall_s']} s)")
            trials.append(t)
    summary = summarize(trials, args)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine, "seconds": round(time.time() - started), "summary": summary, "trials": trials}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(summary))
    print(f"\n{len(trials)} trials in {result['seconds']} s; details in {args.out}")
    ok = (summary["r2_finished"] == summary["r2_trials"] and summary["r2_params_lost"] == 0
          and summary["r2_average_mismatches"] == 0 and summary["r1_resumed_exactly"] == summary["r1_trials"]
          and summary["bad_updates_dropped"] == summary["bad_updates"] and not summary["errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
