"""Reports over training runs: a markdown table and PNG plots.

A run directory (written by ``fomoe train``) holds ``config.json``, ``metrics.jsonl`` (one JSON
object per line; ``kind`` is ``train``, ``sync``, ``eval`` or ``final``) and ``summary.json``.
``write_report`` compares any set of runs (``fomoe compare`` passes its ddp, diloco and fomoe
runs) and writes ``report.md``, ``report.json`` and the plots into a directory.

Modelled wall-clock under a WAN: every worker computes for its measured compute time per step,
and every sync (each step for ddp, each outer round for diloco and fomoe) adds the time of the
slowest worker's share of the run's sync schedule under ``fomoe.plan``'s communication model
(``Plan.comm_seconds``): its buckets one after another, each ring step paying the WAN latency,
the bytes over the WAN bandwidth. fomoe's holder groups are separate buckets, so it pays more
latency per sync than diloco's one all-worker bucket. Communication is not overlapped with
compute. The figures are a model of a WAN (bandwidth per worker, one-way latency per message),
not a measurement of one; the bytes themselves are the ones the run counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class WAN:
    bandwidth_mbps: float = 100.0   # per worker, megabits per second
    latency_ms: float = 50.0        # one-way, per sequential message

    def __post_init__(self) -> None:
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"WAN bandwidth must be positive, got {self.bandwidth_mbps} Mbit/s")
        if not self.latency_ms >= 0:
            raise ValueError(f"WAN latency must be >= 0, got {self.latency_ms} ms")

    def link(self):
        """The same link in ``fomoe.plan``'s terms (its communication model is the one home)."""
        from .plan import Link
        return Link(bandwidth_gbps=self.bandwidth_mbps / 1e3, latency_ms=self.latency_ms)


class Run:
    """One training run read back from its directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        metrics = self.path / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{self.path} is not a fomoe run directory (no metrics.jsonl)")
        self.lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        self.config = json.loads((self.path / "config.json").read_text()) if (self.path / "config.json").is_file() else {}
        summary = self.path / "summary.json"
        self.summary = json.loads(summary.read_text()) if summary.is_file() else {}
        train = self.config.get("train", {})
        self.method = train.get("method", self.path.name)
        self.workers = int(train.get("workers", 1))
        self.name = self.summary.get("label") or self.method
        self._comm_seconds: dict[tuple[float, float], float] = {}

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self.lines if m.get("kind") == kind]

    @property
    def evals(self) -> list[dict]:
        return self.of_kind("eval")

    @property
    def syncs(self) -> list[dict]:
        return self.of_kind("sync")

    @property
    def final(self) -> dict | None:
        finals = self.of_kind("final")
        return finals[-1] if finals else None

    def compute_seconds_per_step(self) -> float:
        return float(self.summary.get("compute_s_per_step", 0.0))

    def plan(self, wan: WAN):
        """``fomoe.plan.Plan`` of this run's model, federation and the WAN link."""
        from .lm import LMConfig
        from .placement import Placement
        from .plan import Federation, ModelShape, Plan
        train, model = self.config.get("train", {}), self.config.get("model")
        if not model:
            raise ValueError(f"{self.path}/config.json has no model configuration: cannot model its communication")
        fed = Federation(workers=self.workers, placement=train.get("placement") or "full",
                         sync_every=int(train.get("sync_every", 1)), compression=train.get("compression"),
                         weighted=bool(train.get("weighted", False)), seed=int(train.get("seed", 0)))
        p = Plan(ModelShape.from_lm_config(LMConfig.from_dict(model)), fed, link=wan.link())
        if self.method == "fomoe" and "placement" in self.config:
            # The placement the run trained with (an explicit placement file may be gone since).
            p.placement = Placement.from_dict(self.config["placement"])
        return p

    def comm_seconds_per_sync(self, wan: WAN) -> float:
        """Modelled time of one sync of the slowest worker (ddp: one step's gradient all-reduce)."""
        key = (wan.bandwidth_mbps, wan.latency_ms)
        if key not in self._comm_seconds:   # plots ask for every evaluation point
            self._comm_seconds[key] = self.plan(wan).comm_seconds(self.method)
        return self._comm_seconds[key]

    def modelled_seconds(self, wan: WAN) -> list[tuple[int, float]]:
        """(step, modelled wall-clock seconds at that step) at every sync line (and step 0)."""
        per_step, per_sync = self.compute_seconds_per_step(), self.comm_seconds_per_sync(wan)
        points = [(0, 0.0)]
        for i, s in enumerate(self.syncs, 1):
            # ddp all-reduces every step (its sync lines only pace the routing metrics); diloco
            # and fomoe sync once per line, the last, shorter round included.
            syncs = s["step"] if self.method == "ddp" else i
            points.append((s["step"], s["step"] * per_step + syncs * per_sync))
        return points

    def seconds_at_step(self, step: float, wan: WAN) -> float:
        points = self.modelled_seconds(wan)
        for (s0, t0), (s1, t1) in zip(points, points[1:]):
            if s0 <= step <= s1:
                return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
        last_step, last_t = points[-1]
        return last_t + (step - last_step) * self.compute_seconds_per_step()

    def step_reaching(self, target: float) -> float | None:
        """First (interpolated) step where the eval loss reaches ``target``."""
        evals = self.evals
        for prev, cur in zip([None] + evals, evals):
            if cur["eval_loss"] <= target:
                if prev is None or prev["eval_loss"] == cur["eval_loss"]:
                    return float(cur["step"])
                frac = (prev["eval_loss"] - target) / (prev["eval_loss"] - cur["eval_loss"])
                return prev["step"] + frac * (cur["step"] - prev["step"])
        return None


def _fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "not reached"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "-"
    return f"{num / den:.2f}x"


def compare_table(runs: Sequence[Run], wan: WAN, target_loss: float | None = None) -> tuple[str, dict]:
    """Markdown table and the same figures as a dict."""
    common_tokens = min((r.evals[-1]["tokens"] for r in runs if r.evals), default=None)

    def eval_at(run: Run, tokens) -> float | None:
        hits = [e for e in run.evals if e["tokens"] == tokens]
        return hits[-1]["eval_loss"] if hits else None

    if target_loss is None:
        reached = [min(e["eval_loss"] for e in r.evals) for r in runs if r.evals]
        target_loss = max(reached) if reached else None
    bytes_of = {r.name: r.summary.get("bytes_sent_per_worker") for r in runs}
    reference = {m: next((r for r in runs if r.method == m), None) for m in ("ddp", "diloco")}
    rows, data = [], {"wan": vars(wan), "target_loss": target_loss, "equal_tokens": common_tokens, "runs": {}}
    for r in runs:
        s = r.summary
        sent = s.get("bytes_sent_per_worker")
        step = r.step_reaching(target_loss) if target_loss is not None else None
        seconds = r.seconds_at_step(step, wan) if step is not None else None
        final = r.final or {}
        entry = {
            "method": r.method, "placement": s.get("placement"), "workers": r.workers,
            "bytes_sent_per_worker": sent, "bytes_recv_per_worker": s.get("bytes_recv_per_worker"),
            "vs_diloco": sent and reference["diloco"] and bytes_of[reference["diloco"].name] / sent,
            "vs_ddp": sent and reference["ddp"] and bytes_of[reference["ddp"].name] / sent,
            "eval_loss_equal_tokens": eval_at(r, common_tokens), "final_eval_loss": final.get("eval_loss"),
            "tokens_per_s": s.get("tokens_per_s"), "peak_rss_mib_per_worker": s.get("peak_rss_mib_max"),
            "model_state_mib_per_worker": s.get("model_state_mib_max"),
            "modelled_seconds_to_target": seconds, "steps": s.get("steps"), "tokens": s.get("tokens"),
            "syncs": len(r.syncs),
        }
        data["runs"][r.name] = entry
        rows.append(entry)
    time_header = f"modelled time to loss {target_loss:.3f}" if target_loss is not None else "modelled time"
    header = ("| method | placement | bytes sent / worker | vs diloco | vs ddp | eval loss @ equal tokens | "
              f"final full-model eval loss | tokens/s | peak RSS / worker | model state / worker | {time_header} |")
    lines = [header, "|" + "---|" * 11]
    for r, e in zip(runs, rows):
        lines.append("| " + " | ".join([
            e["method"], str(e["placement"]), _fmt_bytes(e["bytes_sent_per_worker"]),
            _ratio(bytes_of.get(reference["diloco"].name) if reference["diloco"] else None, e["bytes_sent_per_worker"]),
            _ratio(bytes_of.get(reference["ddp"].name) if reference["ddp"] else None, e["bytes_sent_per_worker"]),
            f"{e['eval_loss_equal_tokens']:.4f}" if e["eval_loss_equal_tokens"] is not None else "-",
            f"{e['final_eval_loss']:.4f}" if e["final_eval_loss"] is not None else "-",
            f"{e['tokens_per_s']:,.0f}" if e["tokens_per_s"] else "-",
            f"{e['peak_rss_mib_per_worker']:.0f} MiB" if e["peak_rss_mib_per_worker"] else "-",
            f"{e['model_state_mib_per_worker']:.1f} MiB" if e["model_state_mib_per_worker"] else "-",
            _fmt_seconds(e["modelled_seconds_to_target"]),
        ]) + " |")
    return "\n".join(lines), data


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or the 'report' extra)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_losses(runs: Sequence[Run], wan: WAN, out_dir: Path) -> list[Path]:
    plt = _plt()
    written = []
    for name, xlabel, xs_of, log in (
        ("loss_vs_tokens", "tokens (all workers)", lambda r, m: m["tokens"], False),
        ("loss_vs_bytes", "bytes sent per worker", lambda r, m: m["bytes_sent"], True),
        ("loss_vs_wallclock", f"modelled wall-clock [s] (WAN {wan.bandwidth_mbps:g} Mbit/s, "
                              f"{wan.latency_ms:g} ms)", lambda r, m: r.seconds_at_step(m["step"], wan), False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(runs):
            color = f"C{i}"
            if name == "loss_vs_tokens":
                train = r.of_kind("train")
                ax.plot([m["tokens"] for m in train], _smooth([m["loss"] for m in train]), color=color, alpha=0.35,
                        lw=1, label=f"{r.name} train (smoothed)")
            evals = [m for m in r.evals if not log or m["bytes_sent"] > 0]
            ax.plot([xs_of(r, m) for m in evals], [m["eval_loss"] for m in evals], "o-", color=color, ms=3,
                    label=f"{r.name} eval")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_expert_load(run: Run, path: Path) -> Path | None:
    """Per-expert load over syncs (share of top-k assignments x num_experts: 1 = fair share)."""
    syncs = [s for s in run.syncs if "expert_load" in s]
    if not syncs:
        return None
    plt = _plt()
    layers = len(syncs[0]["expert_load"])
    E = len(syncs[0]["expert_load"][0])
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    steps = [s["step"] for s in syncs]
    for l in range(rows * cols):
        ax = axes[l // cols][l % cols]
        if l >= layers:
            ax.axis("off")
            continue
        for e in range(E):
            ax.plot(steps, [s["expert_load"][l][e] * E for s in syncs], lw=1)
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        ax.axhline(0.1, color="r", lw=0.6, ls=":")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("load / fair share", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{run.name}: per-expert load at each sync (dashed: fair share, dotted: 10%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing(runs: Sequence[Run], path: Path) -> Path | None:
    keys = [("load_entropy", "load entropy / log E (mean over layers)"),
            ("load_entropy_min", "load entropy / log E (worst layer)"),
            ("min_load_ratio", "least-loaded expert / fair share (dotted: 10%)"),
            ("router_drift", "router drift per sync"),
            ("skipped_fraction", "assignments skipped"), ("top1_kl", "KL(top-1 || uniform) [nats]")]
    if not any(r.syncs for r in runs):
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, label) in zip(axes.flat, keys):
        for i, r in enumerate(runs):
            pts = [(s["step"], s[key]) for s in r.syncs if s.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), lw=1.2, color=f"C{i}", label=r.name)
        if key == "min_load_ratio":
            ax.axhline(0.1, color="r", lw=0.8, ls=":")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def routing_summary(run: Run, threshold: float = 0.1) -> dict:
    """Collapse check over syncs: experts whose load fell under ``threshold`` x fair share, and
    the longest run of consecutive syncs any expert stayed there."""
    syncs = [s for s in run.syncs if "expert_load" in s]
    if not syncs:
        return {}
    layers, E = len(syncs[0]["expert_load"]), len(syncs[0]["expert_load"][0])
    longest, low_events, min_ratio = 0, 0, float("inf")
    streak = [[0] * E for _ in range(layers)]
    for s in syncs:
        for l in range(layers):
            for e in range(E):
                ratio = s["expert_load"][l][e] * E
                min_ratio = min(min_ratio, ratio)
                if ratio < threshold:
                    streak[l][e] += 1
                    low_events += 1
                    longest = max(longest, streak[l][e])
                else:
                    streak[l][e] = 0
    last = syncs[-1]
    return {"syncs": len(syncs), "min_load_ratio": min_ratio, "expert_syncs_under_threshold": low_events,
            "longest_streak_under_threshold": longest, "threshold": threshold,
            "final_load_entropy": last.get("load_entropy"), "final_top1_kl": last.get("top1_kl"),
            "mean_skipped_fraction": sum(s.get("skipped_fraction", 0.0) for s in syncs) / len(syncs)}


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, wan: WAN | None = None,
                 target_loss: float | None = None, title: str = "fomoe comparison") -> Path:
    """report.md + report.json + PNG plots for ``run_dirs`` into ``out_dir``; returns report.md's path."""
    wan = wan or WAN()
    runs = [Run(p) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, data = compare_table(runs, wan, target_loss)
    plots = plot_losses(runs, wan, out)
    routing = plot_routing(runs, out / "routing.png")
    loads = [plot_expert_load(r, out / f"expert_load_{r.name}.png") for r in runs]
    data["routing"] = {r.name: routing_summary(r) for r in runs}
    cfg = runs[0].config
    lines = [f"# {title}", ""]
    if cfg:
        t, m = cfg.get("train", {}), cfg.get("model", {})
        overrides = "".join(f", {k}={v}" for k, v in (t.get("model") or {}).items())
        lines += [f"Model: preset `{t.get('preset')}`{overrides} ({cfg.get('params_total', 0) / 1e6:.2f}M parameters, "
                  f"{m.get('num_experts')} experts top-{m.get('top_k')} per layer, {m.get('n_layers')} layers, "
                  f"expert share {cfg.get('expert_share', 0):.1%}); {t.get('workers')} workers, "
                  f"H = {t.get('sync_every')}, {t.get('steps')} steps of {t.get('batch_size')}x{t.get('seq_len')} "
                  f"tokens per worker; data: {cfg.get('data_description', '')}"
                  f"{' (IID)' if t.get('iid') else ' (non-IID by package)'}.", ""]
    lines += [table, "",
              f"Bytes are counted by the sync manager per worker (mean over workers) for the whole run. "
              f"\"vs diloco\"/\"vs ddp\": how many times fewer bytes than that baseline. Eval loss is the "
              f"consolidated full model on the held-out split; \"@ equal tokens\" at {data['equal_tokens']} tokens. "
              f"Modelled time: measured compute per step plus, per sync, the slowest worker's bytes / "
              f"{wan.bandwidth_mbps:g} Mbit/s plus {wan.latency_ms:g} ms per sequential message (a ring "
              f"all-reduce among n workers: 2(n-1); fomoe's holder groups one after another), no overlap "
              f"(`fomoe.plan`'s communication model).", ""]
    rs = [(n, s) for n, s in data["routing"].items() if s]
    if rs:
        lines += ["| run | syncs | min expert load / fair share | expert-syncs under 10% | longest streak under 10% |"
                  " final load entropy | final top-1 KL | mean skipped |", "|" + "---|" * 8]
        for n, s in rs:
            lines.append(f"| {n} | {s['syncs']} | {s['min_load_ratio']:.2f} | {s['expert_syncs_under_threshold']} | "
                         f"{s['longest_streak_under_threshold']} | {s['final_load_entropy']:.3f} | "
                         f"{s['final_top1_kl']:.3f} | {s['mean_skipped_fraction']:.3f} |")
        lines.append("")
    for p in [*plots, routing, *loads]:
        if p is not None:
            lines.append(f"![{p.stem}]({p.name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(data, indent=1))
    return out / "report.md"
