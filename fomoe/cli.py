"""The ``fomoe`` command line (console script ``fomoe`` and ``python -m fomoe``).

    fomoe train      train an MoE LM across local workers (or one worker per torchrun process)
    fomoe compare    the same run under ddp, diloco and fomoe, and a report comparing them
    fomoe report     a report (markdown table + PNG plots) over existing run directories
    fomoe export     consolidate a run's checkpoint into one full model file
    fomoe plan       memory / communication / wall-clock projections (when fomoe.plan provides it)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .train import RESUMABLE_FIELDS, METHODS, ConfigError, TrainConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_run_flags(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """Flags shared by ``train`` and ``compare``; defaults are None so explicit flags are visible."""
    g = p.add_argument_group("federation")
    if not compare:
        g.add_argument("--method", choices=METHODS, default=None, help="fomoe (default), diloco or ddp")
    g.add_argument("--workers", type=_positive_int, default=None, help="number of workers W (default 4)")
    g.add_argument("--placement", default=None,
                   help="fomoe expert placement: full | partition | replicated(R) | replicated(R, random) | "
                        "replicated:R[:random] | a placement JSON file (default replicated(2))")
    g.add_argument("--sync-every", "-H", type=_positive_int, default=None, help="inner steps per outer sync H "
                   "(default 10)")
    g.add_argument("--outer-lr", type=_positive_float, default=None, help="outer Nesterov SGD lr (default 0.7)")
    g.add_argument("--outer-momentum", type=float, default=None, help="outer momentum (default 0.9)")
    g.add_argument("--weighted", action="store_true", default=None,
                   help="average each expert weighted by the tokens each holder routed to it")
    g.add_argument("--compression", choices=("bf16", "int8", "auto"), default=None,
                   help="compress pseudo-gradients on the wire (default: fp32); auto: per holder group the "
                        "cheaper of int8 (groups of up to 3) and bf16")
    g.add_argument("--skip-policy", choices=("skip", "reroute"), default=None,
                   help="non-resident experts: skip the assignment (default) or reroute to resident experts")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=None, help="model size: tiny (default), small, base, 1b")
    m.add_argument("--experts", type=_positive_int, default=None, help="experts per MoE layer (overrides preset)")
    m.add_argument("--top-k", type=_positive_int, default=None, help="experts per token (overrides preset)")
    m.add_argument("--d-model", type=_positive_int, default=None, help="model width (overrides preset)")
    m.add_argument("--d-ff", type=_positive_int, default=None, help="expert hidden size (overrides preset)")
    m.add_argument("--layers", type=_positive_int, default=None, help="transformer blocks (overrides preset)")
    m.add_argument("--heads", type=_positive_int, default=None, help="attention heads (overrides preset)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=_positive_int, default=None, help="inner steps per worker (default 300)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="sequences per worker per step (8)")
    t.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence (preset's context)")
    t.add_argument("--lr", type=_positive_float, default=None, help="inner AdamW peak lr (default 3e-3)")
    t.add_argument("--warmup-steps", type=int, default=None, help="linear lr warmup steps (default 20)")
    t.add_argument("--seed", type=int, default=None, help="seed of init, data split and sampling (default 0)")
    t.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (GPUs)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files/folders, or one uint8/uint16 token array (.npy, .bin); default: the Python "
                        "standard library's sources")
    d.add_argument("--iid", action="store_true", default=None, help="shuffle documents across workers (default: "
                   "non-IID, split by top-level package)")
    d.add_argument("--data-dtype", choices=("uint8", "uint16"), default=None,
                   help="element type of a .bin token array (default uint16)")
    o = p.add_argument_group("run")
    o.add_argument("--eval-every", type=_positive_int, default=None, help="steps between evaluations (multiple of H)")
    o.add_argument("--eval-batches", type=_positive_int, default=None, help="held-out batches per evaluation (8)")
    o.add_argument("--ckpt-every", type=_positive_int, default=None, help="steps between checkpoints (multiple of H)")
    o.add_argument("--log-every", type=_positive_int, default=None, help="steps between metrics lines (5)")
    o.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="cpu (default; gloo), cuda (one GPU per worker; NCCL) or auto")
    o.add_argument("--threads", type=_positive_int, default=None, help="torch threads per worker "
                   "(default: CPU cores / workers)")
    o.add_argument("--out", default=None, help="run directory (default runs/<command>-<date>-<time>)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--timeout", type=_positive_float, default=None,
                   help="seconds before a stuck run is stopped (default 7200)")


_MODEL_FLAGS = {"experts": "num_experts", "top_k": "top_k", "d_model": "d_model", "d_ff": "d_ff",
                "layers": "n_layers", "heads": "n_heads"}
_FIELD_FLAGS = {"method": "method", "workers": "workers", "placement": "placement", "sync_every": "sync_every",
                "outer_lr": "outer_lr", "outer_momentum": "outer_momentum", "weighted": "weighted",
                "compression": "compression", "skip_policy": "skip_policy", "preset": "preset", "steps": "steps",
                "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "warmup_steps": "warmup_steps",
                "seed": "seed", "bf16": "bf16", "data": "data", "iid": "iid", "data_dtype": "data_dtype",
                "eval_every": "eval_every", "eval_batches": "eval_batches", "ckpt_every": "ckpt_every",
                "log_every": "log_every", "device": "device", "threads": "threads", "timeout": "timeout_s",
                "transport": "transport", "bind": "bind", "advertise": "advertise", "peer_timeout": "peer_timeout_s",
                "link_mbps": "link_mbps", "link_latency_ms": "link_latency_ms", "link_loss": "link_loss"}


def _explicit(args) -> dict:
    """TrainConfig fields the user set on the command line."""
    out = {field: getattr(args, flag) for flag, field in _FIELD_FLAGS.items()
           if getattr(args, flag, None) is not None}
    model = {field: getattr(args, flag) for flag, field in _MODEL_FLAGS.items() if getattr(args, flag, None) is not None}
    if model:
        out["model"] = model
    return out


def _default_out(command: str) -> str:
    return os.path.join("runs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _check_fresh_run_dir(out: Path, what: str) -> None:
    if (out / "config.json").exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or another --out")


def cmd_train(args) -> int:
    from .train import load_run_config, train, train_under_torchrun
    explicit = _explicit(args)
    torchrun = _under_torchrun()
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        cfg = load_run_config(args.out)
        changed = {k: v for k, v in explicit.items() if k not in RESUMABLE_FIELDS and getattr(cfg, k) != v}
        if changed:
            raise ConfigError(f"--resume continues {args.out} with its saved configuration; these flags differ from "
                              f"it: {', '.join(sorted(changed))} (only --steps, --stop-at, --threads, --timeout and "
                              f"the transport flags may change)")
        cfg = replace(cfg, **{k: v for k, v in explicit.items() if k in RESUMABLE_FIELDS})
        cfg = replace(cfg, progress=not args.no_progress)
    else:
        if torchrun and "workers" not in explicit:
            explicit["workers"] = int(os.environ["WORLD_SIZE"])
        cfg = TrainConfig(**explicit, out=args.out or _default_out("train"), progress=not args.no_progress)
        if not torchrun or os.environ.get("RANK") == "0":
            _check_fresh_run_dir(Path(cfg.out), "train")
    if args.stop_at is not None:
        cfg = replace(cfg, stop_at=args.stop_at)
    from .train import RunStopped
    if torchrun:
        summary = train_under_torchrun(cfg, resume=args.resume, token=args.token)
        if summary is not None and "stopped" in summary:
            print(f"fomoe train: rank {summary['rank']}: {summary['stopped']}", file=sys.stderr)
            return 1
        if summary is None or "final_eval_loss" not in summary and "stopped_at" not in summary:
            return 0
    else:
        from .train import check_data
        check_data(cfg.resolved())
        print(f"fomoe train: {_describe(cfg.resolved())}", file=sys.stderr)
        try:
            summary = train(cfg, resume=args.resume, token=args.token)
        except RunStopped as exc:
            print(f"fomoe train: {exc}", file=sys.stderr)
            return 1
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} with a checkpoint; continue with: "
              f"fomoe train --out {cfg.out} --resume")
        return 0
    _print_summary(summary, cfg.out)
    if summary.get("lost_workers"):
        print(f"workers {summary['lost_workers']} were lost during the run and the others finished without them "
              f"(details: membership lines in metrics.jsonl)")
    return 0


def _describe(cfg: TrainConfig) -> str:
    model = f"preset {cfg.preset}" + (f" {cfg.model}" if cfg.model else "")
    return (f"{cfg.method}, {cfg.workers} workers on {cfg.device}, placement {cfg.placement}, H={cfg.sync_every}, "
            f"{model}, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens per worker, "
            f"data {'IID' if cfg.iid else 'non-IID'} from {', '.join(cfg.data) if cfg.data else 'the Python stdlib'}"
            f" -> {cfg.out}")


def _print_summary(summary: dict, out: str) -> None:
    mib = summary["bytes_sent_per_worker"] / 2 ** 20
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f} s "
          f"({summary['tokens_per_s']:,.0f} tokens/s); sent {mib:,.1f} MiB per worker; "
          f"held-out eval loss of the consolidated model {_initial(summary)}{summary['final_eval_loss']:.4f}")
    print(f"run directory: {out} (metrics.jsonl, summary.json, model.safetensors, checkpoints/)")


def _initial(summary: dict) -> str:
    initial = summary.get("initial_eval_loss")
    return "" if initial is None else f"{initial:.4f} at step 0 -> "


def cmd_compare(args) -> int:
    from .report import WAN, write_report
    from .train import train
    if _under_torchrun():
        raise ConfigError("fomoe compare runs its workers itself; start it without torchrun")
    explicit = _explicit(args)
    out = Path(args.out or _default_out("compare"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods takes a comma-separated subset of {', '.join(METHODS)}, got {args.methods!r}")
    wan = WAN(args.wan_mbps, args.wan_latency_ms)
    configs = []
    for m in methods:
        placement = explicit.get("placement") if m == "fomoe" else "full"
        fields = {**explicit, "method": m, "placement": placement}
        cfg = TrainConfig(**fields, out=str(out / m), label=m, progress=not args.no_progress).resolved()
        _check_fresh_run_dir(Path(cfg.out), "compare")
        configs.append(cfg)
    for i, cfg in enumerate(configs, 1):
        print(f"fomoe compare [{i}/{len(configs)}]: {_describe(cfg)}", file=sys.stderr)
        summary = train(cfg)
        print(f"  {cfg.method}: final eval loss {summary['final_eval_loss']:.4f}, "
              f"{summary['bytes_sent_per_worker'] / 2 ** 20:,.1f} MiB sent per worker", file=sys.stderr)
    report = write_report([c.out for c in configs], out, wan=wan, target_loss=args.target_loss,
                          title=f"fomoe compare: {', '.join(methods)}")
    print(report.read_text())
    print(f"report: {report}")
    return 0


def cmd_report(args) -> int:
    from .report import WAN, write_report
    report = write_report(args.runs, args.out, wan=WAN(args.wan_mbps, args.wan_latency_ms),
                          target_loss=args.target_loss, title=args.title)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def cmd_export(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    from . import checkpoint
    result = checkpoint.export_full_model(run_dir, args.out)
    print(f"exported the consolidated full model of {run_dir} to {args.out}")
    return 0 if result is None or result is not False else 1


def _add_wan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wan-mbps", type=_positive_float, default=100.0,
                   help="modelled WAN bandwidth per worker in Mbit/s (default 100)")
    p.add_argument("--wan-latency-ms", type=float, default=50.0, help="modelled WAN latency in ms (default 50)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="eval loss for the time-to-target column (default: the worst method's best loss)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fomoe", description="Federated Mixture-of-Experts training (FoMoE).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train an MoE LM across workers (default: 4 local CPU workers, tiny model)",
                       description="Train a small MoE LM across workers. Without arguments: 4 local CPU workers "
                                   "(gloo), the tiny preset, replicated(2) placement, skip-token, H=10, 300 steps on "
                                   "the Python standard library's sources. Under torchrun: one worker per process.")
    _add_run_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=_positive_int, default=None, metavar="STEP",
                   help="stop after STEP (a multiple of H) with a checkpoint; continue later with --resume")
    x = p.add_argument_group("across sites (see docs/guide.md: faults and security)")
    x.add_argument("--transport", choices=("default", "tcp"), default=None,
                   help="default: torch.distributed (gloo/NCCL); tcp: fomoe's authenticated TCP transport, which "
                        "survives lost workers (replication >= 2) and stops with a checkpoint otherwise")
    x.add_argument("--token", default=None, help="tcp: the run's shared token (prefer the FOMOE_RUN_TOKEN environment "
                   "variable: command lines are visible to other users)")
    x.add_argument("--bind", default=None, help="tcp: local address to listen on (your VPN interface's address)")
    x.add_argument("--advertise", default=None, help="tcp: host or host:port the other workers dial (default: --bind)")
    x.add_argument("--peer-timeout", type=_positive_float, default=None,
                   help="tcp: seconds of silence after which a worker counts as lost (default 30)")
    x.add_argument("--link-mbps", type=_positive_float, default=None,
                   help="tcp: the slowest link between sites, Mbit/s: transfer deadlines and the peer timeout then "
                        "follow this run's sync schedule over it (default: deadlines assume >= 10 Mbit/s)")
    x.add_argument("--link-latency-ms", type=float, default=None, help="tcp: that link's one-way latency (default 50)")
    x.add_argument("--link-loss", type=float, default=None, help="tcp: that link's TCP segment loss rate (default 0)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="the same run under ddp, diloco and fomoe, and a report",
                       description="Train the same configuration under each method and write a report directory "
                                   "(report.md table, PNG plots, report.json).")
    _add_run_flags(p, compare=True)
    p.add_argument("--methods", default="ddp,diloco,fomoe", help="comma-separated methods (default ddp,diloco,fomoe)")
    _add_wan_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="report over existing run directories",
                       description="A markdown table and PNG plots over run directories written by fomoe train.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="fomoe report")
    _add_wan_flags(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="consolidate a run's checkpoint into one full model",
                       description="Merge every expert from a run's per-worker checkpoint shards into one full "
                                   "model (safetensors) that loads into a full-placement model.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("out", help="output file (.safetensors)")
    p.set_defaults(func=cmd_export)

    _add_plan(sub)
    return parser


def _add_plan(sub) -> None:
    try:
        from . import plan
        add = getattr(plan, "add_subparser", None)
    except Exception as exc:  # noqa: BLE001 (the rest of the CLI must work without it)
        add, reason = None, f"fomoe.plan could not be imported: {exc}"
    else:
        reason = "this fomoe build has no `fomoe plan` (fomoe.plan.add_subparser is missing)"
    if add is not None:
        add(sub)
        return
    p = sub.add_parser("plan", help="(unavailable) memory / communication projections")

    def unavailable(args) -> int:
        raise ConfigError(reason)

    p.set_defaults(func=unavailable)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"the {args.command!r} command has no handler")
    try:
        result = func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Configuration and input problems: a clear one-line message, no traceback.
        print(f"fomoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fomoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from .launch import WorkerError
        if isinstance(exc, WorkerError):
            print(f"fomoe {args.command}: {exc}", file=sys.stderr)
            return 1
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
