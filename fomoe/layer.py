"""The drop-in MoE layer: router -> skip-token dispatch -> fused expert FFN -> combine."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, asdict
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import ops

SCORES = ("softmax", "sigmoid")
SKIP_POLICIES = ("skip", "reroute")


@dataclass
class MoEConfig:
    """Configuration of one ``fomoe.MoE`` layer.

    resident_experts: global ids of the experts this worker holds (None: all of them). Only
        those are materialised.
    skip_policy: ``"skip"`` drops assignments to non-resident experts (the residual carries
        the token); ``"reroute"`` masks non-resident experts' logits before top-k.
    renormalize: renormalise the top-k gate weights to sum to 1.
    renormalize_kept: after skipping, renormalise the kept gate weights of each token.
    aux_loss_coef, z_loss_coef: weights of the load-balancing and router z-losses that
        ``MoE.aux_loss`` carries after each forward.
    init_seed: if set, every expert's initial weights derive from (init_seed, global id), so
        a worker holding a subset of experts initialises them exactly as a full model would.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    score: str = "softmax"
    renormalize: bool = True
    resident_experts: Sequence[int] | None = None
    skip_policy: str = "skip"
    renormalize_kept: bool = False
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    init_std: float = 0.02
    init_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.score not in SCORES:
            raise ValueError(f"MoEConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.skip_policy not in SKIP_POLICIES:
            raise ValueError(f"MoEConfig.skip_policy must be one of {SKIP_POLICIES}, got {self.skip_policy!r}")
        if self.resident_experts is not None:
            ids = [int(e) for e in self.resident_experts]
            unknown = sorted({e for e in ids if not 0 <= e < self.num_experts})
            if unknown:
                raise ValueError(f"MoEConfig.resident_experts names unknown experts {unknown}; "
                                 f"valid ids are 0..{self.num_experts - 1}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"MoEConfig.resident_experts has duplicates: {ids}")
            self.resident_experts = tuple(sorted(ids))
            if self.skip_policy == "reroute" and len(ids) < self.top_k:
                raise ValueError(f"skip_policy='reroute' needs at least top_k={self.top_k} resident experts, "
                                 f"got {len(ids)}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0")

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(range(self.num_experts)) if self.resident_experts is None else tuple(self.resident_experts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resident_experts"] = None if self.resident_experts is None else list(self.resident_experts)
        return d


@dataclass
class RouterStats:
    """Router statistics of the last forward (detached, except the losses)."""

    expert_load: Tensor          # [E] fraction of top-k assignments per global expert (before skipping)
    local_tokens: Tensor         # [E_local] assignments kept per local expert
    skipped_fraction: Tensor     # scalar: share of assignments dropped by skip-token
    aux_loss: Tensor             # scalar: Switch-style load-balancing loss (1.0 when perfectly balanced)
    z_loss: Tensor               # scalar: mean squared log-sum-exp of the router logits
    extra: dict = field(default_factory=dict)


def _expert_generator(seed: int, expert: int, what: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{expert}/{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer with skip-token support.

    Input ``[..., d_model]``, output the same shape. Holds a router over all
    ``num_experts`` and the SwiGLU weights of the resident experts only:
    ``w13 [E_local, d_model, 2*d_ff]`` and ``w2 [E_local, d_ff, d_model]``; ``expert_ids``
    maps local slots to global ids. In ``state_dict`` each expert appears under
    ``experts.<global id>.w13`` / ``.w2``, so shards of different workers merge by key.
    After each forward, ``aux_loss`` holds the weighted auxiliary losses to add to the
    training loss and ``stats`` the router statistics. ``device`` / ``dtype`` place the
    parameters as for ``nn.Linear``; ``device="meta"`` skips allocation and initialisation
    (materialise with ``to_empty(device=...)`` then ``reset_parameters()``).
    """

    def __init__(self, config: MoEConfig | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = MoEConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a MoEConfig or keyword arguments, not both")
        self.config = config
        E, d, f = config.num_experts, config.d_model, config.d_ff
        resident = config.resident
        self.num_experts = E
        self.num_local = len(resident)
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d, E, bias=False, **factory)
        self.w13 = nn.Parameter(torch.empty(self.num_local, d, 2 * f, **factory))
        self.w2 = nn.Parameter(torch.empty(self.num_local, f, d, **factory))
        self._register_residency(self.w13.device)
        self.partial = self.num_local < E
        self.aux_loss: Tensor | None = None
        self._stats: RouterStats | None = None
        self._stats_inputs: tuple | None = None
        # Set True to keep the last forward's raw router logits [T, E] (fp32, differentiable) in
        # ``router_logits``, e.g. for a host model's own auxiliary losses; off by default (memory).
        self.keep_router_logits = False
        self.router_logits: Tensor | None = None
        if not self.w13.is_meta:   # meta: shapes only; to_empty() + reset_parameters() materialise
            self.reset_parameters()

    def _register_residency(self, device: torch.device) -> None:
        """The routing tables of the resident set (not parameters: rebuilt, never trained or saved)."""
        resident, E = self.config.resident, self.num_experts
        resident_map = torch.full((E,), -1, dtype=torch.int32)
        resident_map[list(resident)] = torch.arange(self.num_local, dtype=torch.int32)
        resident_map = resident_map.to(device)
        self.register_buffer("expert_ids", torch.tensor(resident, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("resident_map", resident_map, persistent=False)
        self.register_buffer("resident_mask", resident_map >= 0, persistent=False)
        self.register_buffer("tokens_routed", torch.zeros(self.num_local, dtype=torch.int64, device=device),
                             persistent=False)

    # ---- parameters ------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initial weights (seeded per global expert id when ``init_seed`` is set); also
        rebuilds the routing tables, which ``to_empty()`` leaves uninitialised."""
        self._register_residency(self.w13.device)
        cfg = self.config
        if cfg.init_seed is None:
            nn.init.normal_(self.router.weight, std=cfg.init_std)
            nn.init.normal_(self.w13, std=cfg.init_std)
            nn.init.normal_(self.w2, std=cfg.init_std / math.sqrt(2.0))
            return
        gen = _expert_generator(cfg.init_seed, -1, "router")
        self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=gen) * cfg.init_std)
        for slot, gid in enumerate(self.expert_ids.tolist()):
            g13 = _expert_generator(cfg.init_seed, gid, "w13")
            g2 = _expert_generator(cfg.init_seed, gid, "w2")
            self.w13[slot].copy_(torch.randn(self.w13.shape[1:], generator=g13) * cfg.init_std)
            self.w2[slot].copy_(torch.randn(self.w2.shape[1:], generator=g2) * cfg.init_std / math.sqrt(2.0))

    def expert_slices(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(global id, w13 view, w2 view) for every resident expert."""
        for slot, gid in enumerate(self.expert_ids.tolist()):
            yield gid, self.w13[slot], self.w2[slot]

    def reset_routing_counts(self) -> None:
        self.tokens_routed.zero_()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The router is saved by its own module; experts are saved one key per global id.
        for slot, gid in enumerate(self.expert_ids.tolist()):
            for name, param in (("w13", self.w13), ("w2", self.w2)):
                destination[f"{prefix}experts.{gid}.{name}"] = param[slot] if keep_vars else param.detach()[slot]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        with torch.no_grad():
            for slot, gid in enumerate(self.expert_ids.tolist()):
                for name, param in (("w13", self.w13), ("w2", self.w2)):
                    key = f"{prefix}experts.{gid}.{name}"
                    if key not in state_dict:
                        missing_keys.append(key)
                    elif state_dict[key].shape != param.shape[1:]:
                        error_msgs.append(f"size mismatch for {key}: checkpoint has {tuple(state_dict[key].shape)}, "
                                          f"this layer expects {tuple(param.shape[1:])}")
                    else:
                        param[slot].copy_(state_dict[key])
        # Keys of experts this worker does not hold are expected in a full checkpoint and skipped.
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            head, _, rest = key[len(prefix):].partition(".")
            if head == "router":
                continue
            gid, _, name = rest.partition(".")
            valid_expert = head == "experts" and gid.isdigit() and int(gid) < self.num_experts and name in ("w13", "w2")
            if not valid_expert:
                unexpected_keys.append(key)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"fomoe.MoE expects inputs [..., d_model={cfg.d_model}], got shape {tuple(x.shape)}")
        xs = x.reshape(-1, cfg.d_model)
        # fp32 logits under autocast too (fp64 for fp64 inputs, for gradcheck); a bf16 input
        # (the copy the experts read) is not widened first: see ops.router_logits.
        logits = ops.router_logits(xs, self.router.weight)
        raw_logits = logits
        if cfg.skip_policy == "reroute" and self.partial:
            logits = logits.masked_fill(~self.resident_mask, float("-inf"))
        weights, ids = ops.route(logits, cfg.top_k, cfg.score, cfg.renormalize)
        permutation, offsets, inverse = ops.dispatch(ids, self.resident_map, self.num_local)
        gate = weights
        if cfg.renormalize_kept and self.partial:
            kept = weights * (inverse >= 0)
            gate = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
        y = ops.expert_ffn(xs, permutation, offsets, inverse, self.w13, self.w2, gate)
        self._record_stats(raw_logits, logits, ids, offsets)
        if self.keep_router_logits:
            self.router_logits = raw_logits
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _record_stats(self, raw_logits: Tensor, logits: Tensor, ids: Tensor, offsets: Tensor) -> None:
        cfg = self.config
        if self.training:
            with torch.no_grad():
                self.tokens_routed.add_((offsets[1:] - offsets[:-1]).long())
        # The statistics are computed when first read (``stats``): a model that never reads
        # them, or reads them every few steps, does not pay ~20 small kernels per layer and step.
        self._stats = None
        self._stats_inputs = (raw_logits.detach(), logits.detach(), ids, offsets)
        if torch.is_grad_enabled() and (cfg.aux_loss_coef != 0 or cfg.z_loss_coef != 0):
            self._stats = self._compute_stats(raw_logits, logits, ids, offsets)
            self.aux_loss = cfg.aux_loss_coef * self._stats.aux_loss + cfg.z_loss_coef * self._stats.z_loss
        else:
            self.aux_loss = raw_logits.new_zeros(())   # nothing to train: no graph, no backward kernels

    @property
    def stats(self) -> RouterStats | None:
        """Router statistics of the last forward (None before the first)."""
        if self._stats is None and self._stats_inputs is not None:
            with torch.no_grad():
                self._stats = self._compute_stats(*self._stats_inputs)
        return self._stats

    def _compute_stats(self, raw_logits: Tensor, logits: Tensor, ids: Tensor, offsets: Tensor) -> RouterStats:
        n_assign = ids.numel()
        counts = torch.zeros(self.num_experts, dtype=torch.float32, device=ids.device)
        counts.scatter_add_(0, ids.reshape(-1).long(), torch.ones(n_assign, dtype=torch.float32, device=ids.device))
        load = counts / max(n_assign, 1)
        skipped = 1.0 - offsets[-1].float() / max(n_assign, 1)
        aux, z = self._router_losses(raw_logits, logits, load)
        return RouterStats(expert_load=load, local_tokens=(offsets[1:] - offsets[:-1]).long(),
                           skipped_fraction=skipped, aux_loss=aux, z_loss=z)

    def _router_losses(self, raw_logits: Tensor, logits: Tensor, load: Tensor) -> tuple[Tensor, Tensor]:
        """Switch-style load-balancing loss and the router z-loss."""
        cfg = self.config
        if cfg.score == "softmax":
            probs = torch.softmax(logits, dim=-1)
        else:
            s = torch.sigmoid(logits)
            probs = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        mean_prob = probs.mean(0) if probs.shape[0] > 0 else probs.sum(0)
        aux = self.num_experts * (load.detach() * mean_prob).sum()
        z = torch.logsumexp(raw_logits, dim=-1).square().mean() if raw_logits.shape[0] > 0 else raw_logits.sum()
        return aux, z

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={cfg.d_model}, d_ff={cfg.d_ff}, experts={self.num_local}/{cfg.num_experts} resident, "
                f"top_k={cfg.top_k}, score={cfg.score}, skip_policy={cfg.skip_policy}")
