"""Federated training over slow and lossy links on one machine: measured sync time against
fomoe.plan's prediction.

Every worker's TCP listener sits behind a ``fomoe.relay.Relay`` (one-way delay, rate and TCP
segment loss per direction of each connection) and advertises the relay's address, so every
connection of the mesh crosses one shaped link. Three workers train a small ``fomoe.lm.MoELM``
(fomoe placement replicated:2, H=2) with ``SyncManager`` over ``fomoe.tcp.TcpTransport`` with the
transport's default timeouts. Per case: the sync wall time (last worker in -> last worker out,
median of the syncs after the first) against ``fomoe.plan``'s ``comm_seconds(commit_barrier=True)``
(the critical path through the bucket schedule, with the loss term), and against the simpler
model a user might use instead (the slowest worker's own bytes / bandwidth + messages x latency,
no loss: "per-worker sum"). An unshaped run per model measures what a sync costs besides the link (packing,
sums, the outer step, Python) on this machine.

    python bench/link_experiment.py [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from link_workers import lm_config, run_over_relays  # noqa: E402

# Model sizes that make syncs take seconds on the grid (lossy links move ~10x fewer bytes/s).
MODELS = {"lossless": dict(d_model=256, d_ff=512), "lossy": dict(d_model=64, d_ff=128)}
DELAYS_MS = (50, 100, 200)
RATES_MBIT = (100, 1000)
LOSSES = (0.0, 0.01)


def naive_prediction(case: dict) -> float:
    """What a user might compute instead: the slowest worker's own bytes over the bandwidth plus
    one latency per message (no waiting on other groups, no loss, no commit barrier)."""
    from fomoe import plan
    shape = plan.ModelShape.from_lm_config(lm_config(**case["model"]))
    p = plan.Plan(shape, plan.Federation(workers=case["workers"], placement=case["placement"]),
                  link=plan.Link(bandwidth_gbps=case["rate_mbit"] / 1e3, latency_ms=case["delay_ms"]))
    return max(t.seconds(p.link) for t in p.traffic("fomoe"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every case's figures there")
    ap.add_argument("--quick", action="store_true", help="two cases only (a smoke run)")
    ap.add_argument("--steps", type=int, default=6, help="inner steps per case (H=2: steps/2 syncs; default 6)")
    ap.add_argument("--loss-pattern", choices=("periodic", "random"), default="periodic",
                    help="the relays' loss: every 1/loss-th segment (default) or independent draws")
    ap.add_argument("--lossy-only", action="store_true", help="only the cases with loss")
    args = ap.parse_args(argv)

    cases = [dict(delay_ms=d, rate_mbit=bw, loss=loss) for loss in LOSSES for d in DELAYS_MS for bw in RATES_MBIT]
    if args.quick:
        cases = [cases[2], cases[6]]
    if args.lossy_only:
        cases = [c for c in cases if c["loss"]]
    base = dict(workers=3, placement="replicated:2", steps=args.steps, sync_every=2, loss_pattern=args.loss_pattern)
    rows, start = [], time.monotonic()
    # unshaped baselines: the sync's cost besides the link
    floors = {}
    for kind, model in MODELS.items():
        if args.lossy_only and kind == "lossless":
            continue
        out = run_over_relays(dict(base, model=model, delay_ms=0.0, rate_mbit=None, loss=0.0), timeout_s=600)
        floors[kind] = out["measured_median"]
        print(f"[{time.monotonic() - start:6.1f} s] unshaped baseline, {kind} model: sync {floors[kind]:.3f} s",
              flush=True)
    for i, link in enumerate(cases):
        kind = "lossy" if link["loss"] else "lossless"
        case = dict(base, **link, model=MODELS[kind])
        out = run_over_relays(case, timeout_s=600)
        res = out["results"]
        completed = all(len(r["losses"]) == case["steps"] and r["finite"] for r in res)
        exact = all(s["wire_sent"] == r["expected"][0] and s["wire_recv"] == r["expected"][1]
                    for r in res for s in r["syncs"])
        naive = naive_prediction(case)
        row = {**link, "model": kind, "params": _params(case), "bytes_sent_per_sync": max(r["expected"][0] for r in res),
               "measured_s": out["measured"], "measured_median_s": out["measured_median"],
               "predicted_s": out["predicted"], "ratio": out["ratio"], "naive_predicted_s": naive,
               "naive_ratio": out["measured_median"] / naive, "floor_s": floors[kind],
               "segments_lost": out["segments_lost"], "completed": completed, "payload_exact": exact,
               "loss_first": sum(r["losses"][0] for r in res) / len(res),
               "loss_last": sum(r["losses"][-1] for r in res) / len(res), "wall_s": out["wall_s"]}
        rows.append(row)
        print(f"[{time.monotonic() - start:6.1f} s] {i + 1}/{len(cases)} {link['delay_ms']:g} ms, "
              f"{link['rate_mbit']:g} Mbit/s, loss {link['loss']:.0%}: sync {row['measured_median_s']:.2f} s, "
              f"model {row['predicted_s']:.2f} s (ratio {row['ratio']:.2f}; per-worker sum {row['naive_ratio']:.2f}), "
              f"{row['segments_lost']} segments lost, training {'completed' if completed else 'FAILED'}", flush=True)

    print()
    print(table(rows))
    within = sum(0.75 <= r["ratio"] <= 1.25 for r in rows)
    print(f"\n{within}/{len(rows)} cases within 25% of the model; every run completed: "
          f"{all(r['completed'] for r in rows)}; payload bytes equal the schedule: {all(r['payload_exact'] for r in rows)}")
    if args.json:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                "command": "python bench/link_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "setup": base, "models": MODELS, "floors_s": floors}
        Path(args.json).write_text(json.dumps({"meta": meta, "cases": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["completed"] and r["payload_exact"] for r in rows) else 1


def _params(case: dict) -> int:
    from fomoe import plan
    return plan.ModelShape.from_lm_config(lm_config(**case["model"])).total_params()


def table(rows: list[dict]) -> str:
    head = ["delay", "rate", "loss", "model (params)", "sent/sync", "lost seg.", "measured", "fomoe.plan", "ratio",
            "per-worker sum", "ratio", "unshaped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['delay_ms']:g} ms", f"{r['rate_mbit']:g} Mbit/s", f"{r['loss']:.0%}",
            f"{r['model']} ({r['params'] / 1e6:.2f}M)", f"{r['bytes_sent_per_sync'] / 1e6:.2f} MB",
            str(r["segments_lost"]), f"{r['measured_median_s']:.2f} s", f"{r['predicted_s']:.2f} s",
            f"{r['ratio']:.2f}", f"{r['naive_predicted_s']:.2f} s", f"{r['naive_ratio']:.2f}",
            f"{r['floor_s']:.2f} s"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
