"""The training driver behind ``fomoe train`` and ``fomoe compare``.

``train(cfg)`` starts ``cfg.workers`` local worker processes (``fomoe.launch.spawn``; gloo on
CPUs, NCCL with one GPU per worker) or, under ``torchrun``, ``run_worker`` runs in each process.
Every worker builds the ``MoELM`` it holds under the placement, reads its shard of the data,
and trains with AdamW inside a ``SyncManager`` (fomoe, diloco or ddp). Rank 0 writes the run
directory:

- ``config.json``: the run's full configuration (model, training, placement, data);
- ``metrics.jsonl``: one JSON object per line. Every line has ``kind``, ``step``, ``tokens``
  (all workers), ``loss`` (mean training loss over workers since the last line),
  ``tokens_per_s`` (all workers), ``bytes_sent`` / ``bytes_recv`` (per worker, mean over workers,
  cumulative). ``kind="eval"`` lines add ``eval_loss`` (the consolidated full model on the
  held-out split); ``kind="sync"`` lines (every H steps) add the routing-stability metrics;
  ``kind="final"`` is the exported full model's evaluation. Over ``--transport tcp``:
  ``kind="membership"`` when workers were lost (``lost``, ``live``, ``reasons``, ``detected_at``
  (wall clock), ``lost_data_shards``: the tokens and documents no longer trained on) and
  ``kind="stopped"`` when the loss took experts with it; evaluation only at the end;
- ``checkpoints/`` (``fomoe.checkpoint``), ``model.safetensors`` (the consolidated model) and
  ``summary.json``.

Routing-stability metrics, per sync round (every H steps), over all workers' tokens:
``load_entropy`` (entropy of the per-expert share of top-k assignments / log E, mean over
layers; 1 = perfectly balanced) and ``load_entropy_min`` (worst layer), ``min_load_ratio``
(smallest expert share x E: 1 = fair share), ``experts_under_10pct``, ``router_drift``
(||W_router - W_router at the previous sync|| / ||W_router at the previous sync||, mean over
layers), ``skipped_fraction`` (assignments dropped by skip-token) and ``top1_kl`` (KL divergence
of the top-1 expert distribution from uniform, nats, mean over layers), plus ``expert_load``
[layer][expert].
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import DataConfig, eval_batches, load_worker_data
from .lm import PRESETS, LMConfig, MoELM, preset

METHODS = ("fomoe", "diloco", "ddp")
TRANSPORTS = ("default", "tcp")
DEFAULT_PLACEMENT = "replicated:2"


class ConfigError(ValueError):
    """A training configuration that cannot run, with the reason."""


@dataclass
class TrainConfig:
    """Everything a run needs; ``fomoe train`` flags map onto these fields one to one."""

    method: str = "fomoe"
    workers: int = 4
    placement: str | None = None        # None: replicated:2 for fomoe, full for diloco/ddp
    sync_every: int = 10                # H: inner steps per outer sync
    preset: str = "tiny"
    model: dict = field(default_factory=dict)   # LMConfig overrides, e.g. {"num_experts": 16}
    steps: int = 300
    batch_size: int = 8                 # sequences per worker per step
    seq_len: int | None = None          # default: the preset's max_seq_len
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    weighted: bool = False
    compression: str | None = None
    skip_policy: str = "skip"
    seed: int = 0
    data: Sequence[str] = ()
    iid: bool = False
    data_dtype: str | None = None
    eval_every: int | None = None       # default: a multiple of H, ~8 evaluations per run
    eval_batches: int = 8
    ckpt_every: int | None = None       # default: a multiple of H, ~3 checkpoints per run (+ the last step)
    log_every: int = 5
    device: str = "cpu"                 # cpu | cuda | auto
    backend: str = "auto"
    threads: int | None = None          # torch threads per worker (default: cores / local workers)
    bf16: bool = False                  # bf16 autocast (on GPUs)
    out: str = "runs/fomoe"
    progress: bool = True
    label: str | None = None
    timeout_s: float = 7200.0
    stop_at: int | None = None          # stop after this step with a checkpoint (continue with --resume)
    # Between workers: "default" (gloo / NCCL through torch.distributed) or "tcp" (fomoe.tcp:
    # authenticated, survives lost workers; the token comes from FOMOE_RUN_TOKEN, never the config).
    transport: str = "default"
    bind: str | None = None             # tcp: address to listen on (a VPN interface's)
    advertise: str | None = None        # tcp: host or host:port the other workers dial
    peer_timeout_s: float = 30.0        # tcp: silence after which a worker counts as lost
    # tcp: the slowest link between the sites, if known: transfer deadlines and the peer timeout
    # then follow this run's sync schedule over that link (fomoe.plan.tcp_options).
    link_mbps: float | None = None
    link_latency_ms: float = 50.0
    link_loss: float = 0.0

    def resolved(self) -> "TrainConfig":
        """A copy with defaults filled in and everything validated (raises ConfigError)."""
        c = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        if c.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {c.method!r}")
        if c.placement is None:
            c.placement = DEFAULT_PLACEMENT if c.method == "fomoe" else "full"
        c.placement = normalize_placement_spec(c.placement)
        if c.method in ("ddp", "diloco") and c.placement != "full":
            raise ConfigError(f"--method {c.method} trains full replicas: use --placement full (or leave it out), "
                              f"not {c.placement!r}; partial placements are what --method fomoe is for")
        for name in ("workers", "sync_every", "steps", "batch_size", "eval_batches", "log_every"):
            value = getattr(c, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if c.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {c.preset!r}; choose one of {', '.join(PRESETS)}")
        model_cfg = preset(c.preset)
        if c.seq_len is None:
            c.seq_len = model_cfg.max_seq_len
        if not isinstance(c.seq_len, int) or c.seq_len < 1:
            raise ConfigError(f"--seq-len must be a positive integer, got {c.seq_len!r}")
        H = c.sync_every
        if c.eval_every is None:
            c.eval_every = H * max(1, round(c.steps / H / 8))
        if c.ckpt_every is None:
            c.ckpt_every = H * max(1, round(c.steps / H / 3))
        for name in ("eval_every", "ckpt_every"):
            value = getattr(c, name)
            if not isinstance(value, int) or value < 1 or value % H:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive multiple of --sync-every ({H}), "
                                  f"got {value!r}: models are only consistent across workers right after a sync")
        if c.stop_at is not None and (not isinstance(c.stop_at, int) or not 0 < c.stop_at < c.steps
                                      or c.stop_at % H):
            raise ConfigError(f"--stop-at must be a multiple of --sync-every ({H}) below --steps ({c.steps}), "
                              f"got {c.stop_at!r}")
        for name in ("lr", "outer_lr"):
            if not getattr(c, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(c, name)}")
        if not 0 <= c.outer_momentum < 1:
            raise ConfigError(f"--outer-momentum must be in [0, 1), got {c.outer_momentum}")
        if c.grad_clip is not None and not c.grad_clip > 0:
            raise ConfigError(f"--grad-clip must be > 0, got {c.grad_clip}")
        if c.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"--device must be cpu, cuda or auto, got {c.device!r}")
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= c.workers else "cpu"
        if c.device == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda but no CUDA GPU is visible; use --device cpu")
            if c.backend == "gloo":
                raise ConfigError("--device cuda runs with the NCCL backend (one GPU per worker); use --backend nccl "
                                  "or auto")
        elif c.backend == "nccl":
            raise ConfigError("--backend nccl needs --device cuda")
        if c.transport not in TRANSPORTS:
            raise ConfigError(f"--transport must be one of {', '.join(TRANSPORTS)}, got {c.transport!r}")
        if not (isinstance(c.peer_timeout_s, (int, float)) and c.peer_timeout_s > 0):
            raise ConfigError(f"--peer-timeout must be > 0, got {c.peer_timeout_s!r}")
        if c.transport == "default" and (c.bind or c.advertise or c.link_mbps is not None):
            raise ConfigError("--bind, --advertise and --link-mbps belong to --transport tcp")
        if c.link_mbps is not None and not (isinstance(c.link_mbps, (int, float)) and c.link_mbps > 0):
            raise ConfigError(f"--link-mbps must be > 0, got {c.link_mbps!r}")
        if not (isinstance(c.link_latency_ms, (int, float)) and c.link_latency_ms >= 0):
            raise ConfigError(f"--link-latency-ms must be >= 0, got {c.link_latency_ms!r}")
        if not (isinstance(c.link_loss, (int, float)) and 0 <= c.link_loss < 1):
            raise ConfigError(f"--link-loss must be in [0, 1), got {c.link_loss!r}")
        if c.transport == "tcp" and c.method == "ddp":
            raise ConfigError("--transport tcp runs outer-sync methods (fomoe, diloco); ddp all-reduces every step's "
                              "gradients and cannot continue without a lost worker's optimizer state")
        if c.skip_policy not in ("skip", "reroute"):
            raise ConfigError(f"--skip-policy must be skip or reroute, got {c.skip_policy!r}")
        try:
            cfg = self.model_config_for(c, vocab_size=256)
        except ValueError as exc:
            raise ConfigError(f"bad model configuration: {exc}") from exc
        if c.method == "fomoe" or c.placement != "full":
            from .placement import Placement, PlacementError
            try:
                Placement.from_spec(c.placement, c.workers, cfg.num_experts, cfg.n_layers, seed=c.seed)
            except PlacementError as exc:
                raise ConfigError(f"bad --placement: {exc}") from exc
        try:
            DataConfig(paths=tuple(c.data), iid=c.iid, seed=c.seed, token_dtype=c.data_dtype)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return c

    @staticmethod
    def model_config_for(c: "TrainConfig", vocab_size: int) -> LMConfig:
        known = {f.name for f in fields(LMConfig)}
        unknown = sorted(set(c.model) - known)
        if unknown:
            raise ValueError(f"unknown model fields {unknown}; known: {sorted(known)}")
        overrides = {"vocab_size": vocab_size, "max_seq_len": c.seq_len, "skip_policy": c.skip_policy, **c.model}
        return preset(c.preset, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def normalize_placement_spec(spec: str) -> str:
    """Accept ``replicated(2)`` / ``replicated(2, random)`` as well as ``replicated:2[:random]``."""
    text = str(spec).strip()
    if text.startswith("replicated(") and text.endswith(")"):
        inner = [p.strip() for p in text[len("replicated("):-1].split(",")]
        text = "replicated:" + ":".join(p for p in inner if p)
    return text


# ---- learning-rate schedule -------------------------------------------------------------------

def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- routing-stability monitor ------------------------------------------------------------------

class RoutingMonitor:
    """Accumulates router statistics over a round and turns them into the stability metrics."""

    def __init__(self, model: MoELM) -> None:
        self.model = model
        cfg = model.config
        dev = model.embed.weight.device
        self.L, self.E = cfg.n_layers, cfg.num_experts
        self.load = torch.zeros(self.L, self.E, dtype=torch.float64, device=dev)
        self.skipped = torch.zeros((), dtype=torch.float64, device=dev)
        self.assignments = 0
        model.count_top1(True)
        self.prev_router = self._routers()

    def _routers(self) -> list[torch.Tensor]:
        return [m.router.weight.detach().clone() for m in self.model.moe_layers()]

    def after_forward(self, tokens: int) -> None:
        """Add the last forward's statistics; ``tokens`` is the number of tokens it routed."""
        for l, moe in enumerate(self.model.moe_layers()):
            assignments = tokens * moe.config.top_k
            self.load[l] += moe.stats.expert_load.double() * assignments
            self.skipped += moe.stats.skipped_fraction.double() * assignments
            self.assignments += assignments

    def round_metrics(self, reduce=None) -> dict:
        """Metrics of the round; resets the accumulators. ``reduce(packed)`` returns the sum of
        the packed accumulators over all workers (the run's ``sum_over_workers``); without it, or
        when it returns None, the metrics are this worker's own."""
        top1 = torch.stack([b.top1_counts for b in self.model.blocks]).double()
        packed = torch.cat([self.load.reshape(-1), top1.reshape(-1), self.skipped.reshape(1),
                            self.load.new_tensor([float(self.assignments)])])
        if reduce is not None:
            summed = reduce(packed)
            packed = summed if summed is not None else packed
        n = self.L * self.E
        load = packed[:n].reshape(self.L, self.E)
        top1 = packed[n:2 * n].reshape(self.L, self.E)
        skipped, assignments = float(packed[2 * n]), float(packed[2 * n + 1])
        share = load / load.sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / math.log(self.E) if self.E > 1 else share[:, 0]
        p1 = top1 / top1.sum(-1, keepdim=True).clamp_min(1e-30)
        kl = (p1 * (p1.clamp_min(1e-30) * self.E).log()).sum(-1)
        routers = self._routers()
        drift = [float((w.double() - p.double()).norm() / p.double().norm().clamp_min(1e-30))
                 for w, p in zip(routers, self.prev_router)]
        self.prev_router = routers
        ratio = share * self.E
        metrics = {
            "load_entropy": float(entropy.mean()), "load_entropy_min": float(entropy.min()),
            "min_load_ratio": float(ratio.min()), "experts_under_10pct": int((ratio < 0.1).sum()),
            "router_drift": sum(drift) / len(drift), "skipped_fraction": skipped / max(assignments, 1.0),
            "top1_kl": float(kl.mean()), "expert_load": [[round(float(v), 6) for v in row] for row in share],
        }
        self.load.zero_()
        self.skipped.zero_()
        self.assignments = 0
        for b in self.model.blocks:
            b.top1_counts.zero_()
        return metrics


# ---- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: MoELM, batches: Sequence[torch.Tensor], device: torch.device, bf16: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def consolidated_state(model: MoELM, placement, rank: int) -> dict[str, torch.Tensor] | None:
    """The full model's state on rank 0: its own parameters plus, from every other worker, the
    experts that worker is the first holder of. Right after a sync all holders of an expert
    hold the same weights, so any holder's copy is the expert. Collective; None off rank 0."""
    own = {}
    prefixes = [f"blocks.{l}.moe." for l in range(model.config.n_layers)]
    for l, moe in enumerate(model.moe_layers()):
        for gid, w13, w2 in moe.expert_slices():
            if min(placement.holders(l, gid)) == rank and rank != 0:
                own[f"{prefixes[l]}experts.{gid}.w13"] = w13.detach().cpu()
                own[f"{prefixes[l]}experts.{gid}.w2"] = w2.detach().cpu()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {k: v.detach() for k, v in model.state_dict().items()}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(own, gathered, dst=0)
    if rank != 0:
        return None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for part in gathered:
        state.update(part)
    return state


# ---- per-worker bookkeeping --------------------------------------------------------------------

def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def model_state_bytes(model_cfg: LMConfig, placement, manager, rank: int) -> int:
    """Bytes of this worker's parameters, their gradients, the AdamW state and the sync manager's
    θ_global, its gradient buffer, outer momentum and error-feedback residuals: ``fomoe.plan``'s
    state accounting (its tests check it against the tensors workers allocate) for the worker's
    experts and sync schedule; fp32 master weights, as this driver keeps them."""
    from . import plan
    shape = plan.ModelShape.from_lm_config(model_cfg)
    local_experts = sum(len(placement.resident(rank, layer)) for layer in range(model_cfg.n_layers))
    memory = plan.worker_memory(shape, manager.method, local_experts, plan.SyncFootprint.of(manager.buckets, rank),
                                plan.Hardware(param_bytes=4), plan.Training())
    return memory.state


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (rank 0, or the lowest live rank after a loss)."""

    def __init__(self, path: Path, resume_step: int | None, append: bool = False) -> None:
        self.path = path
        if append:
            pass   # a worker that took over the log after rank 0 was lost
        elif resume_step is None:
            path.write_text("")
        elif path.exists():
            # Drop what the interrupted run logged after the checkpoint it resumes from.
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                    and json.loads(line).get("kind") != "final"]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ---- the worker ----------------------------------------------------------------------------------

def link_tcp_options(cfg: TrainConfig, buckets, world: int):
    """The TCP transport's timeouts for this run's sync schedule over the link the user named:
    never a shorter peer timeout than asked for, never a shorter stall allowance than the default."""
    from . import plan
    from .tcp import TcpOptions
    link = plan.Link(bandwidth_gbps=cfg.link_mbps / 1e3, latency_ms=cfg.link_latency_ms, loss=cfg.link_loss)
    proposed = plan.tcp_options(buckets, world, link, floor_s=cfg.peer_timeout_s)
    proposed["stall_timeout_s"] = max(proposed["stall_timeout_s"], TcpOptions.stall_timeout_s)
    return TcpOptions(**proposed)


def run_worker(ctx, cfg_dict: dict, resume: bool = False, token: str | None = None) -> dict:
    """One worker's whole run (under ``fomoe.launch.spawn`` or torchrun). Returns its summary.

    With ``transport="tcp"`` the workers sync over ``fomoe.tcp.TcpTransport`` (``token``: the
    run's shared token, default FOMOE_RUN_TOKEN) and every exchange between them goes through it:
    a lost worker is detected within ``peer_timeout_s``; the others continue without it while
    every expert keeps a live holder (the loss and its data shard land in metrics.jsonl), else
    they save a checkpoint and return {"stopped": reason, "checkpoint_step": step}."""
    from . import checkpoint, comm
    from .placement import Placement
    from .sync import ExpertsLost, SyncManager

    cfg = TrainConfig.from_dict(cfg_dict)
    rank, world = ctx.rank, ctx.world_size
    device = ctx.device if cfg.device == "cuda" else torch.device("cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transport = None
    if cfg.transport == "tcp":
        from .tcp import TcpOptions, TcpTransport
        # Rendezvous through torch.distributed's store; from then on nothing between the workers
        # uses torch.distributed (its collectives would wait forever for a lost worker).
        transport = TcpTransport(rank, world, token=token, bind=cfg.bind, advertise=cfg.advertise,
                                 options=TcpOptions(peer_timeout_s=cfg.peer_timeout_s))
    tolerant = transport is not None
    run_dir = Path(cfg.out)
    # What one worker prepares alone can fail on that worker only (its data is missing, it was
    # started with another worker count): the error travels through the agreement, so every
    # worker stops with it at once instead of waiting for the failed one until the timeout.
    agreed = {"train": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "bind", "advertise")},
              "resume": resume}
    local_error = None
    try:
        if world != cfg.workers:
            raise ConfigError(f"the run is configured for {cfg.workers} workers but {world} were started "
                              f"(under torchrun, --workers must equal the number of processes)")
        data_cfg = DataConfig(paths=tuple(cfg.data), iid=cfg.iid, seed=cfg.seed, token_dtype=cfg.data_dtype)
        data = load_worker_data(data_cfg, rank, world, cfg.seq_len, cfg.batch_size)
        model_cfg = TrainConfig.model_config_for(cfg, data.vocab_size)
        placement = Placement.from_spec(cfg.placement, world, model_cfg.num_experts, model_cfg.n_layers,
                                        seed=cfg.seed)
        agreed.update({"model": model_cfg.to_dict(), "data": data.identity, "placement": placement.fingerprint()})
    except (ValueError, OSError) as exc:   # ConfigError, DataError, PlacementError; unreadable files
        local_error = f"rank {rank}: {exc}"
    if world > 1:
        comm.agree("train-config", agreed, "training configuration", error=local_error)
    if local_error is not None:
        raise ConfigError(local_error)
    torch.manual_seed(cfg.seed * 1000 + rank)
    model = MoELM.from_placement(model_cfg, placement, rank, seed=cfg.seed).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    inner = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    manager = SyncManager(model, inner, method=cfg.method, sync_every=cfg.sync_every, placement=placement,
                          rank=rank, world_size=world, outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum,
                          weighted=cfg.weighted, global_device="cpu" if tolerant else device,
                          compression=cfg.compression, max_grad_norm=cfg.grad_clip, transport=transport,
                          on_membership_change=lambda event: on_membership(event))
    if tolerant and cfg.link_mbps is not None:
        transport.options = link_tcp_options(cfg, manager.buckets, world)
    monitor = RoutingMonitor(model)
    eval_set = eval_batches(data.eval_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    full_model = None
    if rank == 0 and not tolerant:
        full_model = MoELM(model_cfg, seed=cfg.seed).to(device) if not placement.is_full() else model
    # Over tcp: every worker's data shard, to report what a lost worker's loss leaves untrained.
    shards = {}
    if tolerant:
        shards = {int(r): json.loads(t) for r, t in manager.exchange(json.dumps(
            {"tokens": data.shard_tokens, "documents": data.shard_documents})).items()}

    start_step, prior = 0, {}
    if resume:
        start_step, prior = _restore(run_dir, model, manager, inner, data, monitor, cfg, rank, world)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            _write_config(run_dir, cfg, model_cfg, placement, data)
    log = MetricsLog(run_dir / "metrics.jsonl", start_step if resume else None) if rank == 0 else None
    tokens_seen = start_step * world * cfg.batch_size * cfg.seq_len

    def lead(live=None) -> bool:
        # Rank 0 writes the run directory; after its loss, the lowest live rank takes over.
        nonlocal log
        if not tolerant:
            return rank == 0
        if rank != min(live if live is not None else manager.live):
            return False
        if log is None:
            log = MetricsLog(run_dir / "metrics.jsonl", None, append=True)
        return True

    def on_membership(event: dict) -> None:
        if not lead(event["live"]):
            return
        lost_data = {r: shards.get(r, {}) for r in event["lost"]}
        reasons = {int(r): d.get("reason") for r, d in event.get("details", {}).items()}
        detected = {int(r): d.get("detected_at") for r, d in event.get("details", {}).items()}
        log.write({"kind": "membership", "step": manager.inner_step, "round": event["round"], "lost": event["lost"],
                   "joined": event["joined"], "live": event["live"], "reasons": reasons, "detected_at": detected,
                   "lost_data_shards": lost_data, "time": time.perf_counter() - loop_start})
        for r in event["lost"]:
            d = lost_data[r]
            print(f"fomoe train: worker {r} lost at step {manager.inner_step} ({reasons.get(r) or 'reported by a peer'});"
                  f" continuing with workers {event['live']}; its data shard ({d.get('tokens', '?')} tokens, "
                  f"{d.get('documents', '?')} documents) is no longer trained on", file=sys.stderr, flush=True)

    def sum_over_workers(packed: torch.Tensor) -> torch.Tensor | None:
        # Over tcp through the sync manager's exchange (None: interrupted by a loss; skip the line).
        if not tolerant:
            if world > 1:
                dist.all_reduce(packed)
            return packed
        got = manager.exchange(json.dumps(packed.tolist()))
        if got is None:
            return None
        return torch.tensor([json.loads(t) for _, t in sorted(got.items())], dtype=packed.dtype,
                            device=packed.device).sum(0)

    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.label or cfg.method} x{world}", unit="step",
                   dynamic_ncols=True, file=sys.stderr)

    def evaluate_global(base: dict) -> None:
        # Right after a sync every expert's holders agree: gather one copy of each on rank 0.
        state = consolidated_state(model, placement, rank) if not placement.is_full() else None
        if rank == 0:
            if state is not None:
                full_model.load_state_dict(state)
            eval_loss = evaluate(full_model, eval_set, device, cfg.bf16)
            log.write({"kind": "eval", **base, "eval_loss": eval_loss})
            message = f"step {base['step']}: eval loss {eval_loss:.4f}"
            if base["loss"] is not None:
                message += f" (train {base['loss']:.4f})"
            if bar is not None:
                bar.write(message)
            elif cfg.progress:
                print(message, file=sys.stderr, flush=True)

    if start_step == 0 and not tolerant:   # over tcp: only the final model is evaluated
        evaluate_global({"step": 0, "tokens": 0, "loss": None, "tokens_per_s": 0.0, "bytes_sent": 0.0,
                         "bytes_recv": 0.0, "lr": 0.0, "time": 0.0})
    compute_s = float(prior.get("compute_s", 0.0))
    window = {"loss": 0.0, "aux": 0.0, "n": 0, "t0": time.perf_counter()}
    loop_start = time.perf_counter()

    def final_exchange(text: str) -> dict | None:
        # After the last round the final checkpoint is complete: a loss now ends nothing.
        try:
            return manager.exchange(text)
        except ExpertsLost:
            return None

    def barrier() -> None:
        if tolerant:
            final_exchange("")
        elif world > 1:
            dist.barrier()

    def _train_loop() -> None:
        nonlocal compute_s, window, tokens_seen
        for step in range(start_step, cfg.steps):
            lr = learning_rate(cfg, step)
            for group in inner.param_groups:
                group["lr"] = lr
            batch = data.train.next_batch().to(device)
            t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                ce, aux = model.loss(batch)
            (ce + aux).backward()
            monitor.after_forward(batch.shape[0] * (batch.shape[1] - 1))
            t1 = time.perf_counter()
            record = manager.step()
            done = step + 1
            if done == cfg.steps and cfg.method != "ddp" and done % cfg.sync_every:
                record = manager.sync()  # a last, shorter round: the final model is a synchronised one
            t2 = time.perf_counter()
            comm_s = record["seconds"] if record else 0.0
            compute_s += (t1 - t0) + max(0.0, (t2 - t1) - comm_s)
            window["loss"] += float(ce.detach())
            window["aux"] += float(aux.detach())
            window["n"] += 1
            # A round ends every H steps (ddp: H only paces the routing metrics) and at the last step.
            is_round = done % cfg.sync_every == 0 or done == cfg.steps
            is_log = done % cfg.log_every == 0 or is_round or done == cfg.steps
            if is_log:
                packed = torch.tensor([window["loss"], window["aux"], window["n"], manager.bytes_sent,
                                       manager.bytes_recv, 1.0], dtype=torch.float64, device=device)
                packed = sum_over_workers(packed)
                now = time.perf_counter()
                if packed is not None:
                    workers = float(packed[5])   # those that reported (fewer after a loss)
                    # Tokens the reporting workers trained since the last line (every worker's
                    # steps unless some were lost).
                    window_tokens = int(packed[2]) * cfg.batch_size * cfg.seq_len
                    tokens_seen += window_tokens
                    last_loss = float(packed[0] / packed[2])
                    last_tps = window_tokens / max(now - window["t0"], 1e-9)
                    base = {"step": done, "tokens": tokens_seen, "loss": last_loss, "tokens_per_s": last_tps,
                            "bytes_sent": float(packed[3]) / workers, "bytes_recv": float(packed[4]) / workers,
                            "lr": lr, "time": now - loop_start + float(prior.get("elapsed_s", 0.0))}
                    if lead():
                        log.write({"kind": "train", **base, "aux_loss": float(packed[1] / packed[2])})
                        if bar is not None:
                            bar.set_postfix_str(f"loss {last_loss:.3f}  {last_tps:,.0f} tok/s  "
                                                f"comm {base['bytes_sent'] / 2 ** 20:,.1f} MiB/worker", refresh=False)
                window = {"loss": 0.0, "aux": 0.0, "n": 0, "t0": now}
                if is_round:
                    routing = monitor.round_metrics(reduce=sum_over_workers)
                    if lead() and packed is not None:
                        entry = {"kind": "sync", **base, "round": -(-done // cfg.sync_every), **routing}
                        log.write(entry)
                if is_round and not tolerant and (done % cfg.eval_every == 0 or done == cfg.steps):
                    evaluate_global(base)
                if is_round and (done % cfg.ckpt_every == 0 or done in (cfg.steps, cfg.stop_at)):
                    try:
                        _save(run_dir, done, model, manager, inner, data, monitor, cfg, rank, world,
                              {"compute_s": compute_s, "elapsed_s": now - loop_start + float(prior.get("elapsed_s", 0.0))})
                    except checkpoint.CheckpointSkipped as exc:
                        if lead():
                            print(f"fomoe train: {exc}", file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(1)
            if done == cfg.stop_at:
                break

    try:
        _train_loop()
    except ExpertsLost as exc:
        # The survivors hold the last applied round consistently: save it, then stop.
        manager.reset_to_global()
        step = manager.round * cfg.sync_every
        saved = step
        if checkpoint.latest_step(run_dir) != step:   # else the periodic one of this state is complete
            try:
                _save(run_dir, step, model, manager, inner, data, monitor, cfg, rank, world,
                      {"compute_s": compute_s, "elapsed_s": time.perf_counter() - loop_start})
            except checkpoint.CheckpointError as err:
                saved = None
                print(f"fomoe train: rank {rank}: {err}", file=sys.stderr, flush=True)
        if lead():
            log.write({"kind": "stopped", "step": step, "reason": str(exc), "checkpoint_step": saved})
        if bar is not None:
            bar.close()
        transport.close()
        return {"rank": rank, "stopped": str(exc), "checkpoint_step": saved, "lost": exc.lost}
    except (comm.QuorumLost, comm.Excluded) as exc:
        # Too few workers left to be sure this side is the run (or the others excluded this
        # worker): stop without writing; every worker resumes from the latest checkpoint.
        if bar is not None:
            bar.close()
        lost = sorted(set(range(world)) - set(transport.live_ranks()))
        transport.close()
        return {"rank": rank, "stopped": str(exc), "checkpoint_step": checkpoint.latest_step(run_dir), "lost": lost}
    if bar is not None:
        bar.close()
    if cfg.stop_at is not None and start_step < cfg.stop_at:
        barrier()
        if transport is not None:
            transport.close()
        return {"rank": rank, "stopped_at": cfg.stop_at, "out": str(run_dir)}
    elapsed = time.perf_counter() - loop_start + float(prior.get("elapsed_s", 0.0))
    mine = {"rank": rank, "bytes_sent": manager.bytes_sent, "bytes_recv": manager.bytes_recv,
            "compute_s": compute_s, "peak_mib": peak_memory_mib(device),
            "model_state_mib": model_state_bytes(model_cfg, placement, manager, rank) / 2 ** 20,
            "shard_tokens": data.shard_tokens, "shard_documents": data.shard_documents,
            "expected_bytes_per_sync": list(manager.expected_traffic)}
    if tolerant:
        got = final_exchange(json.dumps(mine))
        everyone = [json.loads(t) for _, t in sorted(got.items())] if got else [mine]
    elif world > 1:
        everyone = [None] * world if rank == 0 else None
        dist.gather_object(mine, everyone, dst=0)
    else:
        everyone = [mine]
    summary = None
    if lead():
        summary = _finish(run_dir, cfg, model_cfg, placement, everyone, elapsed, log, device, eval_set)
        if tolerant:
            summary["membership"] = [e for e in manager.events if e["event"] == "membership"]
            summary["lost_workers"] = sorted(set(range(world)) - set(manager.live))
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    barrier()
    if transport is not None:
        transport.close()
    return summary if summary is not None else mine


# Fields a resumed run may change: they do not alter what is computed.
RESUMABLE_FIELDS = ("steps", "progress", "stop_at", "threads", "timeout_s", "transport", "bind", "advertise",
                    "peer_timeout_s", "link_mbps", "link_latency_ms", "link_loss")


def _write_config(run_dir: Path, cfg: TrainConfig, model_cfg: LMConfig, placement, data) -> None:
    config = {"train": {**cfg.to_dict(), "stop_at": None}, "model": model_cfg.to_dict(), "placement": placement.to_dict(),
              "data_fingerprint": data.fingerprint, "data_description": data.description,
              "params_total": model_cfg.total_params(), "params_dense": model_cfg.dense_params(),
              "params_expert": model_cfg.expert_params(),
              "expert_share": model_cfg.expert_params() / model_cfg.total_params(),
              "torch": torch.__version__}
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(run_dir / "config.json")


def _checkpoint_config(cfg: TrainConfig) -> dict:
    # What a checkpoint must have been written with to be resumed by this run.
    return {"train": {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_FIELDS}}


def _save(run_dir, step, model, manager, inner, data, monitor, cfg, rank, world, counters) -> None:
    from . import checkpoint
    extra = {"data": data.train.state_dict(), "counters": counters,
             "router_at_last_sync": [w.cpu() for w in monitor.prev_router]}
    # Over a fault-tolerant transport the commit goes through the sync manager's exchange.
    gather = (lambda tag, text: manager.exchange(text)) if manager.transport.fault_tolerant else None
    checkpoint.save(run_dir, step, model=model, sync_manager=manager, inner_optimizer=inner, extra_state=extra,
                    config=_checkpoint_config(cfg), rank=rank, world_size=world, gather=gather)


def _restore(run_dir, model, manager, inner, data, monitor, cfg, rank, world) -> tuple[int, dict]:
    from . import checkpoint
    loaded = checkpoint.load(run_dir, model=model, sync_manager=manager, inner_optimizer=inner, rank=rank,
                             world_size=world, config=_checkpoint_config(cfg))
    step, extra = loaded["step"], loaded["extra_state"]
    data.train.load_state_dict(extra["data"])
    monitor.prev_router = [w.to(monitor.load.device) for w in extra["router_at_last_sync"]]
    return step, extra["counters"]


def _finish(run_dir: Path, cfg: TrainConfig, model_cfg: LMConfig, placement, workers: list[dict], elapsed: float,
            log: MetricsLog, device: torch.device, eval_set) -> dict:
    """Rank 0: export the consolidated model from the checkpoint, evaluate it, write the summary."""
    from . import checkpoint
    model_path = run_dir / "model.safetensors"
    checkpoint.export_full_model(run_dir, model_path)
    from safetensors.torch import load_file
    full = MoELM(model_cfg, seed=cfg.seed).to(device)
    missing, unexpected = full.load_state_dict(load_file(str(model_path)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the exported model does not match the model config: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    final_eval = evaluate(full, eval_set, device, cfg.bf16)
    evals = [json.loads(line) for line in log.path.read_text().splitlines() if '"kind": "eval"' in line]
    initial_eval = evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None
    W = len(workers)
    tokens = cfg.steps * W * cfg.batch_size * cfg.seq_len
    sent = [w["bytes_sent"] for w in workers]
    recv = [w["bytes_recv"] for w in workers]
    summary = {
        "label": cfg.label or cfg.method, "method": cfg.method, "placement": placement.strategy,
        "workers": W, "steps": cfg.steps, "tokens": tokens, "sync_every": cfg.sync_every,
        "initial_eval_loss": initial_eval, "final_eval_loss": final_eval, "elapsed_s": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
        "compute_s_per_step": sum(w["compute_s"] for w in workers) / W / cfg.steps,
        "bytes_sent_per_worker": sum(sent) / W, "bytes_recv_per_worker": sum(recv) / W,
        "bytes_sent_max": max(sent), "peak_rss_mib_max": max(w["peak_mib"] for w in workers),
        "model_state_mib_max": max(w["model_state_mib"] for w in workers), "workers_detail": workers,
        "params_total": model_cfg.total_params(), "expert_share": model_cfg.expert_params() / model_cfg.total_params(),
        "model_path": str(model_path),
    }
    log.write({"kind": "final", "step": cfg.steps, "tokens": tokens, "loss": None, "eval_loss": final_eval,
               "tokens_per_s": summary["tokens_per_s"], "bytes_sent": summary["bytes_sent_per_worker"],
               "bytes_recv": summary["bytes_recv_per_worker"]})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---- entry points ----------------------------------------------------------------------------------

def check_data(cfg: TrainConfig) -> str:
    """Fail before any worker starts if the data cannot feed every worker; returns its description."""
    from .data import Corpus, DataError
    try:
        corpus = Corpus(DataConfig(paths=tuple(cfg.data), iid=cfg.iid, seed=cfg.seed, token_dtype=cfg.data_dtype))
        shards = corpus.split(cfg.workers)
        window = cfg.seq_len + 1
        for w, shard in enumerate(shards):
            if sum(d.size + 1 for d in shard) < window:
                raise DataError(f"worker {w}'s data shard is shorter than one sequence of {window} tokens; use a "
                                f"shorter --seq-len, fewer workers or more data")
        if sum(d.size + 1 for d in corpus.eval_documents()) < window:
            raise DataError(f"the held-out split is shorter than one sequence of {window} tokens; add data or "
                            f"shorten --seq-len")
        if cfg.model.get("vocab_size") not in (None, corpus.vocab_size):
            raise DataError(f"the data has {corpus.vocab_size} token ids but the model asks for "
                            f"vocab_size={cfg.model['vocab_size']}")
    except DataError as exc:
        raise ConfigError(f"bad --data: {exc}") from exc
    return corpus.description


class RunStopped(RuntimeError):
    """Workers were lost and an expert had no live holder left (replication 1, or all holders
    lost): the survivors saved a checkpoint and stopped. ``checkpoint_step``: that checkpoint
    (None if it could not be written); ``lost``: the lost ranks."""

    def __init__(self, message: str, checkpoint_step: int | None, lost: Sequence[int]) -> None:
        super().__init__(message)
        self.checkpoint_step, self.lost = checkpoint_step, list(lost)


def run_token(cfg: TrainConfig, token: str | None = None) -> str | None:
    """The run's shared token for ``--transport tcp`` (``token`` or FOMOE_RUN_TOKEN), else None."""
    if cfg.transport != "tcp":
        return None
    from .tcp import TOKEN_ENV
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"--transport tcp needs the run's shared token on every worker: set {TOKEN_ENV} (or pass "
                          f"--token), e.g. to the output of: python -c 'import secrets; print(secrets.token_hex(32))'")
    return token


def train(cfg: TrainConfig, resume: bool = False, token: str | None = None, on_start=None) -> dict:
    """Run ``cfg`` on ``cfg.workers`` local processes; returns rank 0's summary (over tcp after a
    loss of rank 0: the lowest surviving rank's). ``token``: the run's token for
    ``transport="tcp"`` (default FOMOE_RUN_TOKEN). ``on_start(processes)``: called once the
    worker processes started (fault-injection experiments). Over tcp, raises ``RunStopped``
    when lost workers took experts with them, after the survivors saved a checkpoint."""
    from .launch import Failed, WorkerError, spawn
    cfg = cfg.resolved()
    check_data(cfg)
    token = run_token(cfg, token)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    if cfg.transport != "tcp":
        results = spawn(run_worker, cfg.workers, backend=backend, args=(cfg.to_dict(), resume),
                        timeout_s=cfg.timeout_s, threads_per_worker=threads, on_start=on_start)
        return results[0]
    # Over tcp a lost worker does not end the run: the others continue or stop on their own.
    results = spawn(run_worker, cfg.workers, backend=backend, args=(cfg.to_dict(), resume, token),
                    timeout_s=cfg.timeout_s, threads_per_worker=threads, tolerate_failures=True, on_start=on_start)
    failed = {r.rank: r.error for r in results if isinstance(r, Failed)}
    done = [r for r in results if not isinstance(r, Failed)]
    stopped = [r for r in done if "stopped" in r]
    summary = next((r for r in done if "final_eval_loss" in r or "stopped_at" in r), None)
    if stopped and summary is None:
        first = stopped[0]
        where = (f"the latest checkpoint is step {first['checkpoint_step']}"
                 if first["checkpoint_step"] is not None else "no checkpoint could be saved")
        raise RunStopped(f"{first['stopped']}. Stopped: {where}. Restart every worker with: fomoe train --out {cfg.out} "
                         f"--resume (it resumes from the newest checkpoint that holds every worker's shard)",
                         first["checkpoint_step"], first["lost"])
    if summary is None:
        raise WorkerError(failed or {0: "no worker returned a summary"}, cfg.workers)
    if failed:
        summary["failed_workers"] = {r: err.strip().splitlines()[-1] if err.strip() else "" for r, err in failed.items()}
    if stopped:   # e.g. a frozen worker that woke up to find itself excluded
        summary["excluded_workers"] = {r["rank"]: r["stopped"] for r in stopped}
    return summary


def train_under_torchrun(cfg: TrainConfig, resume: bool = False, token: str | None = None) -> dict | None:
    """This process is one torchrun worker: initialise from the environment and run it."""
    from .launch import init_from_env
    cfg = cfg.resolved()
    token = run_token(cfg, token)
    ctx = init_from_env("nccl" if cfg.device == "cuda" else "gloo", timeout_s=cfg.timeout_s)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    try:
        return run_worker(ctx, cfg.to_dict(), resume, token)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.json: not a fomoe run directory, nothing to resume")
    return TrainConfig.from_dict(json.loads(path.read_text())["train"])
