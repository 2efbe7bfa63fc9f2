"""The outer loop of federated training: what is synchronised, among whom, and the manager.

Two halves with one home each:

- the **schedule** (pure, no tensors): ``ParamLayout`` (sizes of the dense parameters and of
  every expert) + a ``Placement`` + a method give ``build_schedule`` -> the list of
  ``Bucket`` s, each one sum among one holder group; ``schedule_traffic`` gives the exact
  bytes a rank sends and receives for them. The runtime executes exactly these buckets, and
  ``fomoe.plan`` uses the same functions for its predictions.
- the **manager** (``SyncManager``): wraps a model holding its resident experts and an inner
  optimizer, keeps θ_global, and every ``sync_every`` inner steps computes the
  pseudo-gradients Δ = θ_global − θ_local, averages them (dense over all workers, each expert
  over its holders, optionally weighted by the tokens each holder routed to it), takes the
  outer step on θ_global and resets θ_local ← θ_global. ``ddp`` all-reduces gradients every
  step instead. One code path runs ``ddp``, ``diloco`` and ``fomoe``.

Bucketing: parameters whose holder groups are identical share one bucket, so a round costs
one collective per distinct holder group (the dense parameters travel with the experts that
every worker holds). Inside a bucket: dense parameters in model order, then experts in
(layer, expert) order, each expert as its ``w13`` then ``w2`` flattened.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from . import comm
from .layer import MoE
from .placement import Placement

METHODS = ("fomoe", "diloco", "ddp")
HISTORY_IN_STATE = 1000   # sync records kept in state_dict (checkpoints); the full history stays in memory


# ---- the schedule ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamLayout:
    """Sizes of what a sync moves: dense numel and, per MoE layer, per global expert, numel."""

    dense_numel: int
    expert_numel: tuple[tuple[int, ...], ...]   # [layer][global expert] -> numel of w13 + w2

    @property
    def num_layers(self) -> int:
        return len(self.expert_numel)

    @property
    def num_experts(self) -> int:
        return len(self.expert_numel[0]) if self.expert_numel else 0

    def total_numel(self) -> int:
        return self.dense_numel + sum(sum(layer) for layer in self.expert_numel)

    @classmethod
    def from_sizes(cls, dense_numel: int, num_layers: int, num_experts: int, expert_numel: int) -> "ParamLayout":
        """Analytic layout: every expert of every layer has ``expert_numel`` parameters."""
        return cls(int(dense_numel), tuple((int(expert_numel),) * num_experts for _ in range(num_layers)))

    @classmethod
    def from_lm_config(cls, cfg) -> "ParamLayout":
        """Layout of a full ``fomoe.lm.MoELM`` built from ``cfg`` (an ``LMConfig``)."""
        return cls.from_sizes(cfg.dense_params(), cfg.n_layers, cfg.num_experts, 3 * cfg.d_model * cfg.d_ff)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParamLayout":
        """Layout of ``model`` (any subset of experts resident): trainable dense parameters and
        the size of every global expert of every ``fomoe.MoE`` layer."""
        moes = moe_layers(model)
        expert_ids = {id(p) for m in moes for p in (m.w13, m.w2)}
        dense = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in expert_ids)
        layers = []
        for m in moes:
            cfg = m.config
            layers.append((cfg.d_model * 2 * cfg.d_ff + cfg.d_ff * cfg.d_model,) * cfg.num_experts)
        return cls(dense, tuple(layers))

    def to_dict(self) -> dict:
        return {"dense_numel": self.dense_numel, "expert_numel": [list(l) for l in self.expert_numel]}


@dataclass(frozen=True)
class Bucket:
    """One sum among one group of ranks.

    ranks: members (global ranks, sorted). numel: fp32 elements summed (dense + experts).
    experts: (layer, global expert) carried, in bucket order. weighted: experts are averaged by
    token counts, so a second, small fp32 sum of one count per expert follows. compression:
    wire format of the data sum (None = fp32). purpose: "grads" (ddp, every step) or
    "pseudo_grads" (outer sync).
    """

    ranks: tuple[int, ...]
    numel: int
    dense_numel: int
    experts: tuple[tuple[int, int], ...]
    weighted: bool = False
    compression: str | None = None
    purpose: str = "pseudo_grads"

    @property
    def count_numel(self) -> int:
        return len(self.experts) if self.weighted else 0

    @property
    def elem_bytes(self) -> int:
        return {None: 4, "bf16": 2, "int8": 1}[self.compression]

    def traffic(self, rank: int) -> tuple[int, int]:
        """Exact (sent, received) bytes of this bucket for ``rank`` (zero if not a member)."""
        if rank not in self.ranks:
            return 0, 0
        n, pos = len(self.ranks), self.ranks.index(rank)
        sent, recv = comm.sum_bytes(self.numel, n, pos, self.compression)
        if self.count_numel:
            s, r = comm.sum_bytes(self.count_numel, n, pos, None)
            sent, recv = sent + s, recv + r
        return sent, recv


def build_schedule(layout: ParamLayout, placement: Placement | None, method: str, weighted: bool = False,
                   compression: str | None = None, num_workers: int | None = None,
                   live: Sequence[int] | None = None) -> list[Bucket]:
    """The buckets of one sync: one outer round (fomoe, diloco) or one step's gradients (ddp).

    ``placement`` may be None for ddp and diloco (full replicas of ``num_workers`` workers).
    ``live``: the workers still in the run (default all): dense parameters are averaged over
    them and each expert over its live holders (``ValueError`` if an expert has none).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    compression = comm.check_compression(compression, allow_auto=True)
    if placement is None:
        if method == "fomoe":
            raise ValueError("method 'fomoe' needs a placement")
        if num_workers is None:
            raise ValueError(f"method {method!r} without a placement needs num_workers")
        placement = Placement.full(num_workers, max(layout.num_experts, 1), max(layout.num_layers, 1))
    if num_workers is not None and num_workers != placement.num_workers:
        raise ValueError(f"placement is for {placement.num_workers} workers, the run has {num_workers}")
    if (layout.num_layers, layout.num_experts) != (placement.num_layers, placement.num_experts) and layout.num_layers:
        raise ValueError(f"the model has {layout.num_layers} MoE layers of {layout.num_experts} experts, the "
                         f"placement {placement.num_layers} layers of {placement.num_experts}")
    if method in ("ddp", "diloco") and not placement.is_full():
        raise ValueError(f"method {method!r} needs full replicas (placement 'full'); got {placement!r}")
    everyone = tuple(range(placement.num_workers))
    if live is not None:
        everyone = tuple(sorted(set(int(r) for r in live)))
        if not everyone or not set(everyone) <= set(range(placement.num_workers)):
            raise ValueError(f"live ranks {list(everyone)} are not a non-empty subset of the run's "
                             f"{placement.num_workers} workers")
        orphans = orphaned_experts(placement, everyone)
        if orphans:
            raise ValueError(f"experts (layer, expert) {orphans[:8]} have no live holder among ranks {list(everyone)}")
    if method == "ddp":
        if weighted or compression is not None:
            raise ValueError("ddp all-reduces exact gradients: weighted averaging and compression do not apply")
        experts = tuple((l, e) for l in range(layout.num_layers) for e in range(layout.num_experts))
        return [Bucket(everyone, layout.total_numel(), layout.dense_numel, experts, purpose="grads")]
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    if layout.dense_numel:
        groups[everyone] = []
    alive = set(everyone)
    for l in range(layout.num_layers):
        for e in range(layout.num_experts):
            groups.setdefault(tuple(r for r in placement.holders(l, e) if r in alive), []).append((l, e))
    order = sorted(groups, key=lambda ranks: (ranks != everyone, ranks))
    buckets = []
    for ranks in order:
        experts = tuple(groups[ranks])
        dense = layout.dense_numel if ranks == everyone else 0
        numel = dense + sum(layout.expert_numel[l][e] for l, e in experts)
        buckets.append(Bucket(ranks, numel, dense, experts, weighted=weighted and bool(experts),
                              compression=comm.bucket_compression(compression, len(ranks))))
    return buckets


def orphaned_experts(placement: Placement, live: Sequence[int]) -> list[tuple[int, int]]:
    """(layer, expert) held by none of the ``live`` ranks: their parameters survive only in checkpoints."""
    alive = set(live)
    return [(l, e) for l in range(placement.num_layers) for e in range(placement.num_experts)
            if not alive.intersection(placement.holders(l, e))]


def schedule_traffic(buckets: Sequence[Bucket], rank: int) -> tuple[int, int]:
    """Exact (sent, received) bytes of ``rank`` for one execution of ``buckets``."""
    sent = recv = 0
    for b in buckets:
        s, r = b.traffic(rank)
        sent, recv = sent + s, recv + r
    return sent, recv


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's ``fomoe.MoE`` modules; their order is the MoE layer index."""
    return [m for m in model.modules() if isinstance(m, MoE)]


# ---- the manager -----------------------------------------------------------------------------

class ExpertsLost(RuntimeError):
    """Workers were lost and some experts have no live holder left: their current parameters
    existed only on the lost workers (replication r = 1, or every holder lost). The survivors
    are consistent with each other (save a checkpoint) and must stop; resume every worker from
    the last checkpoint that holds those experts."""

    def __init__(self, lost: Sequence[int], experts: Sequence[tuple[int, int]], live: Sequence[int],
                 progress: int) -> None:
        self.lost, self.experts, self.live, self.progress = list(lost), list(experts), list(live), progress
        shown = ", ".join(f"layer {l} expert {e}" for l, e in self.experts[:6]) + (" ..." if len(self.experts) > 6 else "")
        super().__init__(f"{len(self.experts)} experts ({shown}) were held only by lost workers (lost ranks "
                         f"{self.lost or 'earlier'}; live ranks {self.live}): the run cannot continue without them. "
                         f"Save the survivors' state and resume every worker from the latest checkpoint "
                         f"(replicate experts on r >= 2 workers to survive such a loss)")


def _log(msg: str) -> None:
    print(f"fomoe.sync: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Segment:
    """One contiguous piece of a bucket: a flat view of a local parameter (a whole dense
    parameter, or one expert's slot of ``w13``/``w2``) and, for outer syncs, of θ_global and
    its gradient."""

    offset: int
    numel: int
    param: nn.Parameter
    slot: int | None               # expert slot in param, None for dense
    global_: Tensor | None = None
    grad: Tensor | None = None
    expert: int | None = None      # index into the bucket's experts (for token weights)

    @property
    def local(self) -> Tensor:
        """Flat view of the worker's parameter slice, taken afresh (the model may have moved)."""
        return (self.param.detach() if self.slot is None else self.param.detach()[self.slot]).reshape(-1)

    def param_grad(self, create: bool = False) -> Tensor | None:
        """Flat view of this segment's part of the local parameter's gradient."""
        if self.param.grad is None:
            if not create:
                return None
            self.param.grad = torch.zeros_like(self.param)
        g = self.param.grad if self.slot is None else self.param.grad[self.slot]
        return g.reshape(-1)


ROUTING_FIELDS = ("top_k", "score", "renormalize", "skip_policy", "renormalize_kept", "aux_loss_coef", "z_loss_coef")


class SyncManager:
    """Runs the inner optimizer and the federation's synchronisation.

    Call ``step()`` after ``loss.backward()`` every inner step: ``ddp`` averages the gradients
    over all workers then steps the inner optimizer; ``diloco`` / ``fomoe`` step the inner
    optimizer and every ``sync_every`` steps run an outer sync. Gradients are zeroed after the
    inner step. ``step()`` returns the round's record when it communicated, else None.

    The model is the worker's own (only its resident experts; ``placement`` must agree with
    the experts its ``fomoe.MoE`` layers hold). Expert parameters are the ``w13``/``w2`` of every
    ``fomoe.MoE`` (layer index = order in ``model.modules()``); every other trainable parameter
    is dense and averaged over all workers. θ_global lives on ``global_device`` (pinned when it
    is the CPU and the model is on a GPU); its device picks the transport (gloo for cpu, NCCL
    for cuda) unless ``transport`` is given.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, method: str = "fomoe",
                 sync_every: int = 1, placement: Placement | None = None, rank: int = 0, world_size: int = 1,
                 transport: comm.Transport | None = None, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, weighted: bool = False, global_device: str | torch.device = "cpu",
                 compression: str | None = None, max_grad_norm: float | None = None,
                 check_initial_state: bool = True, check_updates: bool = True, max_update_ratio: float | None = 100.0,
                 joining: bool = False, on_membership_change=None, fault_hook=None) -> None:
        self.model, self.inner_optimizer = model, inner_optimizer
        self.method, self.rank, self.world_size = method, rank, world_size
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.max_grad_norm, self.weighted = max_grad_norm, weighted
        if max_update_ratio is not None and not max_update_ratio > 0:
            raise ValueError(f"max_update_ratio must be positive or None, got {max_update_ratio!r}")
        self.check_updates, self.max_update_ratio = check_updates, max_update_ratio
        self.on_membership_change = on_membership_change   # called with each membership event
        self.fault_hook = fault_hook   # fault-injection tests: called with (bucket, packed update) before a sum
        self.events: list[dict] = []    # membership changes and dropped contributions, in order
        self._joining, self._contributes, self._silent = joining, not joining, set()
        self._exchanges, self._last_status = 0, {}
        self.global_device = torch.device(global_device)
        if self.global_device.type == "cuda" and self.global_device.index is None:
            self.global_device = torch.device("cuda", torch.cuda.current_device())
        # Validate locally, then make every worker learn of any worker's problem before the
        # first collective: a bad configuration fails on all workers at once, never hangs.
        try:
            self._configure(method, sync_every, placement, compression)
            local_error = None
        except ValueError as exc:
            local_error = f"{exc}"
        if world_size > 1 and not joining:   # a joiner's configuration is checked when it is admitted
            summary = self.config_summary() if local_error is None else {"method": method, "sync_every": sync_every}
            comm.agree("sync-config", summary, "sync configuration", error=local_error)
        if local_error is not None:
            raise ValueError(local_error)

        if transport is None:
            transport = comm.default_transport(self.global_device)
        if transport.world_size != world_size or transport.rank != rank:
            raise ValueError(f"transport is rank {transport.rank} of {transport.world_size}, the manager was given "
                             f"rank {rank} of {world_size}")
        if joining and not transport.fault_tolerant:
            raise ValueError(f"joining a running federation needs a fault-tolerant transport, not {transport.name}")
        self.transport = transport
        # Collective: every rank holds the whole schedule, in one order.
        transport.prepare_groups(b.ranks for b in self.buckets)
        self.live = tuple(transport.live_ranks())
        self._schedule_live = tuple(range(world_size))   # who the schedule was built for
        self._wire_mark = ((transport.payload_sent, transport.payload_recv)
                           if hasattr(transport, "payload_sent") else None)

        self._dense = self._dense_params()
        self.global_params: list[Tensor] = []
        self.outer_optimizer: torch.optim.Optimizer | None = None
        self._global_of: dict[int, Tensor] = {}
        if method != "ddp":
            pin = self.global_device.type == "cpu" and torch.cuda.is_available() and any(
                p.is_cuda for p in model.parameters())
            for p in self._held_params():
                g = p.detach().to(self.global_device, copy=True)
                g = g.pin_memory() if pin else g
                g.grad = torch.zeros_like(g)
                self.global_params.append(g)
                self._global_of[id(p)] = g
            self.outer_optimizer = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum,
                                                   nesterov=nesterov and outer_momentum > 0)
        self._segments = {i: self._bucket_segments(self.buckets[i]) for i in self.my_buckets}
        self._residual: dict[int, Tensor] = {}   # error feedback of compressed buckets
        self._segment_kernels: bool | None = None
        self._tables: dict[int, tuple] = {}
        if check_initial_state and world_size > 1 and not joining:
            self._check_identical_start()

        self.inner_step = 0
        self.round = 0
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.history: list[dict] = []
        self._reset_routing_counts()

    # ---- construction helpers ---------------------------------------------------------------

    def _configure(self, method: str, sync_every: int, placement: Placement | None, compression) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every (H) must be a positive integer, got {sync_every!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"need outer_lr > 0 and 0 <= outer_momentum < 1, got {self.outer_lr}, "
                             f"{self.outer_momentum}")
        self.sync_every = 1 if method == "ddp" else sync_every
        self.compression = comm.check_compression(compression, allow_auto=True)
        self.moes = moe_layers(self.model)
        self.layout = ParamLayout.from_model(self.model)
        if placement is None:
            if method == "fomoe":
                raise ValueError("method 'fomoe' needs a placement (fomoe.placement.Placement)")
            placement = Placement.full(self.world_size, max(self.layout.num_experts, 1),
                                       max(self.layout.num_layers, 1))
        if placement.num_workers != self.world_size:
            raise ValueError(f"the placement is for {placement.num_workers} workers but world_size is "
                             f"{self.world_size}")
        self.placement = placement
        self._check_model_matches_placement()
        self.buckets = build_schedule(self.layout, placement, method, self.weighted, self.compression)
        self.my_buckets = [i for i, b in enumerate(self.buckets) if self.rank in b.ranks]
        self.expected_traffic = schedule_traffic(self.buckets, self.rank)

    def config_summary(self) -> dict:
        """What every worker must agree on (also part of checkpoint manifests)."""
        return {"method": self.method, "sync_every": self.sync_every, "world_size": self.world_size,
                "placement": self.placement.fingerprint(), "weighted": self.weighted,
                "check_updates": self.check_updates, "max_update_ratio": self.max_update_ratio,
                "compression": self.compression, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "dense_numel": self.layout.dense_numel,
                "expert_numel": [list(l) for l in self.layout.expert_numel],
                # Routing changes what every expert learns without changing a parameter's shape.
                "routing": [{k: getattr(m.config, k) for k in ROUTING_FIELDS} for m in self.moes]}

    def _check_model_matches_placement(self) -> None:
        if len(self.moes) != self.placement.num_layers and self.moes:
            raise ValueError(f"the model has {len(self.moes)} fomoe.MoE layers, the placement "
                             f"{self.placement.num_layers}")
        for l, m in enumerate(self.moes):
            if m.num_experts != self.placement.num_experts:
                raise ValueError(f"MoE layer {l} has {m.num_experts} experts, the placement {self.placement.num_experts}")
            held = m.expert_ids.tolist()
            want = self.placement.resident(self.rank, l)
            if held != want:
                raise ValueError(f"rank {self.rank}: MoE layer {l} holds experts {held} but the placement gives it "
                                 f"{want}; build the model from the placement (e.g. MoELM.from_placement)")
            for name in ("w13", "w2"):
                if not getattr(m, name).is_contiguous():
                    raise ValueError(f"MoE layer {l}: {name} must be contiguous")

    def _dense_params(self) -> list[tuple[str, nn.Parameter]]:
        expert_ids = {id(p) for m in self.moes for p in (m.w13, m.w2)}
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in expert_ids]

    def _held_params(self) -> list[nn.Parameter]:
        return [p for _, p in self._dense] + [p for m in self.moes for p in (m.w13, m.w2)]

    def _bucket_segments(self, bucket: Bucket) -> list[_Segment]:
        segs: list[_Segment] = []
        offset = 0
        if bucket.dense_numel:
            for _, p in self._dense:
                segs.append(self._segment(offset, p, None, None))
                offset += p.numel()
        slot_of = [{gid: s for s, gid in enumerate(m.expert_ids.tolist())} for m in self.moes]
        for k, (l, e) in enumerate(bucket.experts):
            m, slot = self.moes[l], slot_of[l][e]
            for p in (m.w13, m.w2):
                segs.append(self._segment(offset, p, slot, k))
                offset += p[slot].numel()
        assert offset == bucket.numel, (offset, bucket.numel)
        return segs

    def _segment(self, offset: int, p: nn.Parameter, slot: int | None, expert: int | None) -> _Segment:
        numel = p.numel() if slot is None else p[slot].numel()
        g = self._global_of.get(id(p))
        gview = gradview = None
        if g is not None:
            gview = (g if slot is None else g[slot]).reshape(-1)
            gradview = (g.grad if slot is None else g.grad[slot]).reshape(-1)
        return _Segment(offset, numel, p, slot, gview, gradview, expert)

    def _checksums(self) -> dict[str, int]:
        # Integer sums of the raw bits: exact and order-independent, so equal tensors agree bitwise.
        def bits(t: Tensor) -> int:
            flat = t.detach().reshape(-1)
            view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
            return int(flat.view(view).sum(dtype=torch.int64).item())
        out = {"dense": sum(bits(p) for _, p in self._dense) if self._dense else 0}
        for l, m in enumerate(self.moes):
            for gid, w13, w2 in m.expert_slices():
                out[f"{l}/{gid}"] = bits(w13) + bits(w2)
        return out

    def _check_identical_start(self) -> None:
        everyone = [json.loads(t) for t in comm.gather_text("initial-state", json.dumps(self._checksums()))]
        problems = []
        if len({d["dense"] for d in everyone}) > 1:
            problems.append("dense parameters differ between workers")
        keys = sorted({k for d in everyone for k in d if k != "dense"})
        for k in keys:
            values = {r: d[k] for r, d in enumerate(everyone) if k in d}
            if len(set(values.values())) > 1:
                l, e = k.split("/")
                problems.append(f"layer {l} expert {e} differs between its holders {sorted(values)}")
        if problems:
            raise ValueError("workers do not start from identical parameters (build every worker's model with the "
                             "same seed; fomoe.MoE init_seed makes experts identical on all holders): "
                             + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> dict | None:
        """One inner step (after ``loss.backward()``); returns the sync record if it communicated."""
        record = None
        if self.method == "ddp":
            record = self._timed_round()   # this step's gradients
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        self.inner_step += 1
        if self.method != "ddp" and self.inner_step % self.sync_every == 0:
            record = self.sync()
        return record

    def sync(self) -> dict:
        """An outer round now: pseudo-gradients averaged, outer step, θ_local ← θ_global."""
        if self.method == "ddp":
            raise RuntimeError("ddp has no outer sync")
        return self._timed_round()

    def _timed_round(self) -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            pending = self._run_round()
        return self._record(pending["collectives"], start)

    # A round (ddp: one step's gradients) is summed completely before it is applied. Over a
    # fault-tolerant transport it survives the loss of workers: a commit barrier on the control
    # plane (no payload bytes) means nobody applies a round before every member completed it;
    # when a collective is interrupted, the survivors agree on who is left
    # (``Transport.recover``) and then either apply the round (some survivor already did, so all
    # of them hold its complete result) or run it again over the live holders (none did).

    def _run_round(self) -> dict:
        pending = None
        while True:
            try:
                self._follow_membership()
                if pending is None:
                    pending = self._sum_round()
                if self._fault_tolerant:
                    self.transport.gather_text("commit", str(self._progress))
                self._apply(pending)
                return pending
            except comm.MembershipChange:
                if self._recover(pending) == "applied":
                    return pending
                pending = None

    @property
    def _progress(self) -> int:
        """Rounds applied (ddp: steps), the counter every member must share."""
        return self.inner_step if self.method == "ddp" else self.round

    def _sum_round(self) -> dict:
        """Every bucket of this round summed and averaged; nothing applied yet."""
        staged = {"residual": {}, "grads": {}}
        collectives = [self._sync_bucket(i, staged) for i in self.my_buckets]
        return {"collectives": collectives, "staged": staged}

    def _apply(self, pending: dict) -> None:
        staged = pending["staged"]
        if self.method == "ddp":
            for i, buf in staged["grads"].items():
                segs = self._segments[i]
                dst = [s.param_grad(create=True) for s in segs]
                src = list(buf.split([s.numel for s in segs]))
                if all(d.device == buf.device and d.dtype == torch.float32 for d in dst):
                    torch._foreach_copy_(dst, src)
                else:
                    for d, x in zip(dst, src):
                        d.copy_(x)
        else:
            self._residual.update(staged["residual"])
            self.outer_optimizer.step()
            for p in self._held_params():
                p.detach().copy_(self._global_of[id(p)], non_blocking=True)
            self._reset_routing_counts()
            self.round += 1
        self._contributes, self._silent = True, set()

    def _sync_bucket(self, i: int, staged: dict) -> dict:
        bucket = self.buckets[i]
        t0 = time.perf_counter()
        silent = len(self._silent.intersection(bucket.ranks))
        buf, counts, sent, recv = self._sum_bucket(i, staged, self._silent)
        avg = self._average(i, buf, counts, len(bucket.ranks) - silent, staged)
        record = {"bucket": i, "ranks": list(bucket.ranks), "numel": bucket.numel, "experts": len(bucket.experts),
                  "compression": bucket.compression, "sent": sent, "recv": recv}
        if self.check_updates and self._suspicious(i, avg):
            # Only now (rare) does anyone learn whose contribution was bad: one small exchange of
            # every member's own verdict, then the sum again without the bad contributions.
            dropped, s, r = self._blame(i)
            sent, recv = sent + s, recv + r
            if dropped:
                skip = self._silent | set(dropped)
                buf, counts, s, r = self._sum_bucket(i, staged, skip)
                sent, recv = sent + s, recv + r
                self._average(i, buf, counts, len(bucket.ranks) - len(skip.intersection(bucket.ranks)), staged)
            record.update(sent=sent, recv=recv, dropped=dropped)
        record["seconds"] = time.perf_counter() - t0 if self.global_device.type == "cpu" else None
        return record

    def _sum_bucket(self, i: int, staged: dict, skip: set):
        """Pack this worker's contribution to bucket i (zeros if it is in ``skip``) and sum it."""
        bucket = self.buckets[i]
        counts = None
        if self.method != "ddp" and bucket.count_numel:
            counts = torch.stack([self.moes[l].tokens_routed[self._slot(l, e)] for l, e in bucket.experts]).to(
                device=self.global_device, dtype=torch.float32)
        buf = self._contribution(i, staged, counts)
        if self.rank in skip:
            buf.zero_()
            if counts is not None:
                counts.zero_()
            if i in staged["residual"]:
                staged["residual"][i] = torch.zeros_like(staged["residual"][i])  # a bad update's error is not kept
        sent, recv = self.transport.sum_(buf, bucket.ranks, bucket.compression)
        if counts is not None:
            s2, r2 = self.transport.sum_(counts, bucket.ranks, None)
            sent, recv = sent + s2, recv + r2
        return buf, counts, sent, recv

    def _contribution(self, i: int, staged: dict, counts: Tensor | None) -> Tensor:
        """This worker's packed contribution to bucket i before it is summed, passed through
        ``fault_hook``: ddp, its gradients (missing ones, a parameter the step did not reach,
        as zeros); outer methods, Δ = θ_global − θ_local (times ``counts`` when weighted) after
        error feedback, whose residual is staged until the round is applied (a round run again
        starts from the same residual)."""
        bucket = self.buckets[i]
        dev = self.global_device
        if self.method == "ddp":
            parts = [torch.zeros(s.numel, device=dev) if (g := s.param_grad()) is None else g.to(dev, torch.float32)
                     for s in self._segments[i]]
            buf = torch.cat(parts) if parts else torch.empty(0, device=dev)
        else:
            buf = torch.empty(bucket.numel, dtype=torch.float32, device=dev)
            self._pack(i, buf, counts)
            if bucket.compression is not None and len(bucket.ranks) > 1:
                staged["residual"][i] = comm.error_feedback_(buf, self._residual.get(i), bucket.compression)
        if self.fault_hook is not None:
            self.fault_hook(i, buf)
        return buf

    def _average(self, i: int, buf: Tensor, counts: Tensor | None, contributors: int, staged: dict) -> list[Tensor]:
        """The bucket's averaged update, in pieces (outer methods: θ_global's gradient; ddp: the
        averaged gradients, staged until the round is applied)."""
        n = float(max(contributors, 1))
        if self.method == "ddp":
            avg = buf.div_(n) if contributors else buf.zero_()
            staged["grads"][i] = avg
            return [avg]
        if contributors:
            self._unpack(i, buf, counts, n)
        else:
            for s in self._segments[i]:
                s.grad.zero_()
        return [s.grad for s in self._segments[i]]

    # ---- bad contributions ------------------------------------------------------------------
    #
    # A worker's update can be broken (NaN/Inf from a diverged step, absurd values from corrupted
    # memory or data). Every member of a bucket holds the same summed result (the ring makes it
    # bitwise identical), so a check of the *averaged* update gives the same answer on every
    # member at no communication cost: non-finite values, or an element larger than
    # ``max_update_ratio`` times the largest weight of the bucket (maxima are exact, so all
    # members decide alike). Only when it fires do the members exchange one number each, their
    # verdict on their own contribution; the bad ones are left out and the rest summed again.

    def _theta_amax(self, i: int) -> Tensor:
        """The bucket's largest weight magnitude (0-d, on the global device; 0 if it holds none)."""
        segs = [s for s in self._segments[i] if s.numel]
        if not segs:
            return torch.zeros((), device=self.global_device)
        return torch.stack([s.global_.abs().max() for s in segs]).max()

    def _suspicious(self, i: int, avg: list[Tensor]) -> bool:
        avg = [a for a in avg if a.numel()]
        if not avg:
            return False
        # Every round checks every bucket: one transfer to the host per bucket, not per parameter.
        checks = [torch.stack([torch.isfinite(a).all() for a in avg]).all().float()]
        by_ratio = self.max_update_ratio is not None and self.method != "ddp"
        if by_ratio:
            checks += [torch.stack([a.abs().max() for a in avg]).max().float(), self._theta_amax(i).float()]
        values = torch.stack(checks).tolist()
        if not values[0]:
            return True
        return by_ratio and values[1] > self.max_update_ratio * values[2]

    def _own_verdict(self, i: int) -> float:
        """NaN if this worker's contribution to bucket i is not finite, else its largest element
        relative to the bucket's largest weight (0 for ddp, where only finiteness is checked)."""
        if self.rank in self._silent:
            return 0.0
        buf = self._contribution(i, {"residual": {}, "grads": {}}, None)   # unweighted; nothing kept
        if not bool(torch.isfinite(buf).all()):
            return float("nan")
        if self.method == "ddp" or buf.numel() == 0:
            return 0.0
        theta = float(self._theta_amax(i))
        return float(buf.abs().max()) / theta if theta > 0 else 0.0

    def _blame(self, i: int) -> tuple[dict, int, int]:
        bucket = self.buckets[i]
        n, pos = len(bucket.ranks), bucket.ranks.index(self.rank)
        verdicts = torch.zeros(n, dtype=torch.float32, device=self.global_device)
        verdicts[pos] = self._own_verdict(i)
        sent, recv = self.transport.sum_(verdicts, bucket.ranks, None)   # x + 0 == x: every slot exact
        limit = math.inf if self.method == "ddp" or self.max_update_ratio is None else self.max_update_ratio
        dropped = {}
        for r, v in zip(bucket.ranks, verdicts.tolist()):
            if not math.isfinite(v):
                dropped[r] = "non-finite update"
            elif v > limit:
                dropped[r] = f"update {v:.3g}x the largest weight (limit {limit:g})"
        if dropped:
            what = f"{len(bucket.experts)} experts" + (", dense parameters" if bucket.dense_numel else "")
            self.events.append({"event": "dropped", "round": self.round, "step": self.inner_step, "bucket": i,
                                "ranks": list(bucket.ranks), "dropped": dict(dropped)})
            if self.rank == min(bucket.ranks):
                _log(f"{'step' if self.method == 'ddp' else 'round'} {self._progress}: dropped the contribution "
                     "of " + "; ".join(f"rank {r} ({why})" for r, why in sorted(dropped.items())) +
                     f" to bucket {i} (ranks {list(bucket.ranks)}: {what})")
            if dropped.get(self.rank) == "non-finite update":
                self._heal_inner_optimizer()
        return dropped, sent, recv

    def _heal_inner_optimizer(self) -> None:
        """Forget inner-optimizer state that went non-finite (it would poison every later step)."""
        for p in list(self.inner_optimizer.state):
            st = self.inner_optimizer.state[p]
            if any(isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
                   for v in st.values()):
                del self.inner_optimizer.state[p]

    # ---- membership ---------------------------------------------------------------------------

    @property
    def _fault_tolerant(self) -> bool:
        return self.transport.fault_tolerant and self.world_size > 1

    def _follow_membership(self) -> None:
        # A change the transport agreed on outside a sync (e.g. while coordinating a checkpoint).
        if self._fault_tolerant and tuple(self.transport.live_ranks()) != self.live:
            raise comm.MembershipChange("the run's members changed since the last round")

    def recover(self) -> None:
        """Bring this worker in line with the others after a ``comm.MembershipChange`` raised
        outside ``step()`` (e.g. by a checkpoint or a metrics exchange). Every live worker must
        call it (the others do so at their next collective)."""
        with torch.no_grad():
            self._recover(None)

    def _status(self) -> dict:
        return {"progress": self._progress, "joining": self._joining, "contributes": self._contributes,
                "exchanges": self._exchanges, "config": self.config_summary(), "code": comm.code_fingerprint()}

    # Small exchanges of the training loop (metrics, checkpoint commits, summaries) between
    # rounds. Over a fault-tolerant transport a loss can interrupt one on some workers after
    # others completed it; those cannot run it again (the others moved on), so after the
    # agreement a worker behind the others skips it (gets None) and all meet at the next one.

    def exchange(self, text: str) -> dict[int, str] | None:
        """Every live worker's ``text`` by rank (each live worker must call it at the same point
        of the run); None if a membership change interrupted it after other workers completed it.
        Raises ``ExpertsLost`` like ``step()``."""
        if not self._fault_tolerant:
            self._exchanges += 1
            return dict(comm.gather_live("exchange", text)) if self.world_size > 1 else {self.rank: text}
        while True:
            try:
                out = self.transport.gather_text("exchange", text)
                self._exchanges += 1
                return out
            except comm.MembershipChange:
                self.recover()
                if max(st["exchanges"] for st in self._last_status.values()) > self._exchanges:
                    self._exchanges += 1
                    return None

    def reset_to_global(self) -> None:
        """θ_local ← θ_global for every held parameter: the state every holder shares after the
        last applied round (e.g. to checkpoint the survivors when the run must stop mid-round)."""
        with torch.no_grad():
            for p in self._held_params():
                p.detach().copy_(self._global_of[id(p)])

    def _recover(self, pending: dict | None) -> str:
        """Agree on the live workers, then bring this worker's round to a state every survivor
        shares, and hand the state to joiners. Returns "applied" if this worker applied its
        pending round here, else "retry"."""
        while True:
            try:
                live = self.transport.recover()
                status = {r: json.loads(t) for r, t in self.transport.gather_text(
                    "status", json.dumps(self._status())).items()}
                self._check_statuses(status)
                self._last_status = status
                joiners = sorted(r for r, st in status.items() if st["joining"])
                members = [r for r in live if r not in joiners]
                lost, added = sorted(set(self.live) - set(live)), sorted(set(live) - set(self.live))
                if lost or added:
                    self._membership_event(live, lost, added)
                orphans = orphaned_experts(self.placement, members)
                if orphans:
                    self.live = tuple(live)   # agreed, and reported once: the run stops here
                    raise ExpertsLost(lost, orphans, members, self._progress)
                behind = min(status[r]["progress"] for r in members)
                ahead = max(status[r]["progress"] for r in members)
                outcome = "retry"
                if not self._joining and self._progress < ahead:
                    # A peer applied this round, so every member completed it (commit barrier).
                    if pending is None:
                        raise RuntimeError(f"rank {self.rank}: round {self._progress} was applied by a peer but "
                                           f"is not complete here; the workers are out of step")
                    self._apply(pending)
                    outcome = "applied"
                self._rebuild(live)
                # Workers that hold no update of their own sit out the round run again next (their
                # contribution is zero and not counted); if a peer is ahead, nothing is run again.
                quiet = {r for r in live if not status[r]["contributes"]}
                self._silent = quiet if behind == ahead else set()
                if joiners:
                    if self.method == "ddp":
                        raise RuntimeError("a ddp run cannot admit a restarted worker (its inner optimizer state "
                                           "lives on every replica); restart every worker from a checkpoint")
                    self._transfer_state(joiners, status, members, behind, ahead)
                return outcome
            except comm.MembershipChange:
                continue

    def _check_statuses(self, status: dict) -> None:
        lines = comm.disagreements({r: {"code": st["code"], **st["config"]} for r, st in status.items()})
        if lines:
            raise ValueError("a worker cannot take part in this run: " + "; ".join(lines))
        progress = {st["progress"] for st in status.values() if not st["joining"]}
        if progress and max(progress) - min(progress) > 1:
            raise RuntimeError(f"workers are more than one round apart after a membership change: {sorted(progress)}")

    def _membership_event(self, live, lost, added) -> None:
        event = {"event": "membership", "round": self.round, "step": self.inner_step, "live": list(live),
                 "lost": lost, "joined": added, "time": time.time()}
        changes = [e for e in getattr(self.transport, "events", []) if e.get("event") == "membership"]
        if changes:
            event["details"] = changes[-1].get("details", {})
            event["agreement_s"] = changes[-1].get("agreement_s")
        self.events.append(event)
        if self.on_membership_change is not None:
            self.on_membership_change(event)

    def _rebuild(self, live: Sequence[int]) -> None:
        """The schedule over the ``live`` workers; error-feedback residuals follow their parameters."""
        live = tuple(live)
        self.live = live
        if live == self._schedule_live:
            return
        pieces = {}
        for i, r in self._residual.items():
            for s in self._segments.get(i, []):
                pieces[(id(s.param), s.slot)] = r[s.offset:s.offset + s.numel]
        self.buckets = build_schedule(self.layout, self.placement, self.method, self.weighted, self.compression,
                                      live=live)
        self.my_buckets = [i for i, b in enumerate(self.buckets) if self.rank in b.ranks]
        self.expected_traffic = schedule_traffic(self.buckets, self.rank)
        self._segments = {i: self._bucket_segments(self.buckets[i]) for i in self.my_buckets}
        self._tables.clear()
        self._residual = {}
        for i in self.my_buckets:
            b = self.buckets[i]
            if pieces and b.compression is not None and len(b.ranks) > 1:
                r = torch.zeros(b.numel, dtype=torch.float32, device=self.global_device)
                for s in self._segments[i]:
                    piece = pieces.get((id(s.param), s.slot))
                    if piece is not None:
                        r[s.offset:s.offset + s.numel] = piece
                self._residual[i] = r
        self._schedule_live = live

    # A joiner (a restarted worker) holds no current state. Every bucket it is a member of is
    # copied to it from the lowest-ranked other member — θ_global, then the outer momentum — as a
    # sum in which everyone else contributes -0.0 (x + -0.0 == x, bitwise). If the survivors run
    # their round again next, the joiner takes part silently and applies the same outer step, so
    # it ends the round bitwise identical to the other holders.

    def _transfer_state(self, joiners, status, members, behind: int, ahead: int) -> None:
        for i in self.my_buckets:
            b = self.buckets[i]
            if not set(b.ranks) & set(joiners):
                continue
            source = min(r for r in b.ranks if r not in joiners)
            segs = self._segments[i]
            for part in ("theta", "momentum"):
                buf = torch.full((b.numel,), -0.0, dtype=torch.float32, device=self.global_device)
                if self.rank == source:
                    for s in segs:
                        buf[s.offset:s.offset + s.numel] = self._outer_state(s, part)
                self.transport.sum_(buf, b.ranks, None)
                if self.rank in joiners:
                    for s in segs:
                        self._outer_state(s, part, create=True).copy_(buf[s.offset:s.offset + s.numel])
        if self.rank in joiners:
            self._exchanges = max(status[r]["exchanges"] for r in members)
            self.round = ahead
            self.inner_step = (behind + 1) * self.sync_every
            self._residual = {}
            for p in self._held_params():
                p.detach().copy_(self._global_of[id(p)])
            self._reset_routing_counts()
            self._joining = False
            # Silent (no update of its own yet) when the others now run their round again.
            self._contributes = behind != ahead
            self.events.append({"event": "joined", "round": self.round, "step": self.inner_step,
                                "time": time.time(), "live": list(self.live), "silent": not self._contributes})

    def _outer_state(self, s: "_Segment", part: str, create: bool = False) -> Tensor:
        if part == "theta":
            return s.global_
        g = self._global_of[id(s.param)]
        buf = self.outer_optimizer.state.get(g, {}).get("momentum_buffer")
        if buf is None:
            if not create:
                return torch.zeros(s.numel, device=self.global_device)
            buf = self.outer_optimizer.state[g]["momentum_buffer"] = torch.zeros_like(g)
        return (buf if s.slot is None else buf[s.slot]).reshape(-1)

    def rejoin(self) -> dict:
        """Enter a running federation as a restarted worker (this manager was built with
        ``joining=True`` over a transport opened with ``join=True``).

        The survivors admit it at their next collective; it receives θ_global and the outer
        momentum of every parameter it holds from a peer (its own experts included, so nothing
        it held before is needed), then takes part in the round the survivors are running, if
        any. Returns {"round", "inner_step"}: continue training from there. The inner optimizer
        keeps whatever state the caller gave it (fresh, or restored from a checkpoint)."""
        if not self._joining:
            raise RuntimeError("rejoin() is for a SyncManager constructed with joining=True")
        with torch.no_grad():
            self._recover(None)
            if not self._contributes:
                self._run_round()
        return {"round": self.round, "inner_step": self.inner_step}


    # Pack Δ = θ_global − θ_local into a bucket (times this worker's token counts if weighted)
    # and unpack the summed bucket as the average into θ_global's gradient. On CUDA one kernel
    # each covers every slice of the bucket (segment tables); on CPU, one op per slice.

    def _pack(self, i: int, buf: Tensor, counts: Tensor | None) -> None:
        if self._use_segment_kernels():
            table, _ = self._segment_tables(i)
            torch.ops.fomoe_comm.pack_delta(buf, table, counts)
            return
        for s in self._segments[i]:
            out = buf[s.offset:s.offset + s.numel]
            torch.sub(s.global_, s.local.to(buf.device, non_blocking=True), out=out)
            if counts is not None and s.expert is not None:
                out.mul_(counts[s.expert])

    def _unpack(self, i: int, buf: Tensor, counts: Tensor | None, n: float | None = None) -> None:
        n = float(len(self.buckets[i].ranks)) if n is None else n
        if self._use_segment_kernels():
            _, table = self._segment_tables(i)
            torch.ops.fomoe_comm.unpack_average(buf, table, counts, n)
            return
        for s in self._segments[i]:
            src = buf[s.offset:s.offset + s.numel]
            if counts is not None and s.expert is not None:
                total = counts[s.expert]
                # Experts nobody routed tokens to this round get no update.
                torch.where(total > 0, src / total.clamp_min(1.0), torch.zeros((), device=buf.device), out=s.grad)
            else:
                torch.div(src, n, out=s.grad)

    def _use_segment_kernels(self) -> bool:
        if self._segment_kernels is None:
            self._segment_kernels = (self.global_device.type == "cuda" and comm.nccl_ops() is not None and all(
                s.local.device == self.global_device and s.local.dtype in (torch.float32, torch.bfloat16)
                for segs in self._segments.values() for s in segs))
        return self._segment_kernels

    def _segment_tables(self, i: int) -> tuple[Tensor, Tensor]:
        """CPU segment tables (pack, unpack) of bucket i, rebuilt if a tensor moved since."""
        segs = self._segments[i]
        locals_ = [s.local for s in segs]
        ptrs = tuple((s.global_.data_ptr(), l.data_ptr(), s.grad.data_ptr()) for s, l in zip(segs, locals_))
        cached = self._tables.get(i)
        if cached is not None and cached[0] == ptrs:
            return cached[1], cached[2]
        for l in locals_:
            if not l.is_contiguous() or l.device != self.global_device or l.dtype not in (torch.float32, torch.bfloat16):
                raise RuntimeError(f"the bucket kernels need contiguous fp32/bf16 parameters on {self.global_device}, "
                                   f"got a {l.dtype} slice on {l.device}")
        dtype_code = {torch.float32: 0, torch.bfloat16: 1}
        pack = [[g, l, s.numel, s.offset, -1 if s.expert is None else s.expert, dtype_code[t.dtype]]
                for s, t, (g, l, _) in zip(segs, locals_, ptrs)]
        unpack = [[gr, 0, s.numel, s.offset, -1 if s.expert is None else s.expert, 0] for s, (_, _, gr) in zip(segs, ptrs)]
        tables = [torch.tensor(t, dtype=torch.int64).reshape(-1, 6) for t in (pack, unpack)]
        self._tables[i] = (ptrs, tables[0], tables[1])
        return tables[0], tables[1]

    def _slot(self, layer: int, expert: int) -> int:
        return int(self.moes[layer].resident_map[expert])

    def _reset_routing_counts(self) -> None:
        for m in self.moes:
            m.reset_routing_counts()

    def _record(self, collectives: list[dict], start: float) -> dict:
        if self.global_device.type == "cuda":
            torch.cuda.synchronize(self.global_device)
        sent = sum(c["sent"] for c in collectives)
        recv = sum(c["recv"] for c in collectives)
        self.bytes_sent += sent
        self.bytes_recv += recv
        rec = {"method": self.method, "step": self.inner_step, "round": self.round, "bytes_sent": sent,
               "bytes_recv": recv, "seconds": time.perf_counter() - start, "collectives": collectives}
        dropped = {c["bucket"]: c["dropped"] for c in collectives if c.get("dropped")}
        if dropped:
            rec["dropped"] = dropped
        if self._wire_mark is not None:
            # Everything this worker's transport moved since the last record, including the bytes of
            # collectives that a membership change interrupted.
            now = (self.transport.payload_sent, self.transport.payload_recv)
            rec["wire_sent"], rec["wire_recv"] = now[0] - self._wire_mark[0], now[1] - self._wire_mark[1]
            self._wire_mark = now
        self.history.append(rec)
        return rec

    # ---- state -------------------------------------------------------------------------------

    def global_state(self) -> dict[str, Tensor]:
        """θ_global by the model's state_dict keys (experts as ``experts.<gid>.w13|w2``)."""
        out: dict[str, Tensor] = {}
        for name, p in self._dense:
            out[name] = self._global_of[id(p)]
        for prefix, m in self._moe_prefixes():
            g13, g2 = self._global_of[id(m.w13)], self._global_of[id(m.w2)]
            for slot, gid in enumerate(m.expert_ids.tolist()):
                out[f"{prefix}experts.{gid}.w13"] = g13[slot]
                out[f"{prefix}experts.{gid}.w2"] = g2[slot]
        return out

    def _moe_prefixes(self) -> list[tuple[str, MoE]]:
        names = {id(m): n for n, m in self.model.named_modules()}
        return [(names[id(m)] + "." if names[id(m)] else "", m) for m in self.moes]

    def state_dict(self) -> dict:
        """Counters, θ_global, outer optimizer momenta (by parameter key), error-feedback residuals,
        the current round's token counts and the last records of ``history``."""
        state: dict = {"method": self.method, "inner_step": self.inner_step, "round": self.round,
                       "bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv, "config": self.config_summary(),
                       "history": list(self.history[-HISTORY_IN_STATE:]),
                       # Token counts of the round in progress (they weight the next sync).
                       "tokens_routed": [m.tokens_routed.detach().clone().cpu() for m in self.moes]}
        if self.method != "ddp":
            state["theta_global"] = {k: v.detach().clone().cpu() for k, v in self.global_state().items()}
            momenta = {}
            key_of = self._param_keys()
            for g in self.global_params:
                buf = self.outer_optimizer.state.get(g, {}).get("momentum_buffer")
                if buf is not None:
                    for key, view in key_of[id(g)]:
                        momenta[key] = view(buf).detach().clone().cpu()
            state["outer_momentum"] = momenta
            state["residual"] = {str(i): r.detach().clone().cpu() for i, r in self._residual.items()}
        return state

    def _param_keys(self) -> dict[int, list[tuple[str, callable]]]:
        # For every θ_global tensor: the state_dict keys it covers and how to take that part.
        out: dict[int, list] = {}
        for name, p in self._dense:
            out[id(self._global_of[id(p)])] = [(name, lambda t: t)]
        for prefix, m in self._moe_prefixes():
            for pname in ("w13", "w2"):
                g = self._global_of[id(getattr(m, pname))]
                out[id(g)] = [(f"{prefix}experts.{gid}.{pname}", (lambda t, s=slot: t[s]))
                              for slot, gid in enumerate(m.expert_ids.tolist())]
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"sync state is for method {state.get('method')!r}, this manager runs {self.method!r}")
        mine, theirs = self.config_summary(), state.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"sync state from a different configuration (saved, now): {diff}")
        self.inner_step, self.round = int(state["inner_step"]), int(state["round"])
        self.bytes_sent, self.bytes_recv = int(state["bytes_sent"]), int(state["bytes_recv"])
        self.history = list(state.get("history", []))
        counts = state.get("tokens_routed", [])
        if len(counts) != len(self.moes):
            raise ValueError(f"sync state has token counts of {len(counts)} MoE layers, the model has {len(self.moes)}")
        for m, c in zip(self.moes, counts):
            m.tokens_routed.copy_(c)
        if self.method == "ddp":
            return
        with torch.no_grad():
            key_of = self._param_keys()
            theta, momenta = state["theta_global"], state.get("outer_momentum", {})
            for g in self.global_params:
                parts = key_of[id(g)]
                missing = [k for k, _ in parts if k not in theta]
                if missing:
                    raise ValueError(f"sync state lacks θ_global for {missing[:3]}")
                for key, view in parts:
                    view(g).copy_(theta[key])
                if parts[0][0] in momenta:
                    buf = torch.zeros_like(g)
                    for key, view in parts:
                        view(buf).copy_(momenta[key])
                    self.outer_optimizer.state[g]["momentum_buffer"] = buf
                else:
                    self.outer_optimizer.state.pop(g, None)
            self._residual = {int(i): r.to(self.global_device) for i, r in state.get("residual", {}).items()}
