"""A small decoder-only MoE transformer language model built on ``fomoe.MoE``.

Every block is pre-norm: RMSNorm -> causal self-attention with rotary position embeddings (the
fused ``fomoe.ops.rotary``, then ``F.scaled_dot_product_attention``) -> residual, RMSNorm ->
``fomoe.MoE`` FFN -> residual.
Embeddings are tied with the output head. Each residual add runs fused with the RMSNorm after
it (``fomoe.ops.add_rms_norm``): a block takes the stream and the previous sublayer's output not
yet added, and returns the same pair. Under autocast the norm before attention and the final
norm write the autocast dtype directly (the copies the GEMMs read), and so does the norm before
the MoE layer: its router computes fp32 logits from that same bf16 copy
(``fomoe.ops.router_logits``: tensor cores, exact bf16 pieces of the fp32 router weight).

A worker builds the model with only the experts it holds (``resident_fn(layer) -> ids`` or a
placement and rank). Initialisation is deterministic per parameter name and per global expert,
independent of which experts a worker holds, so every worker starts from identical shared
parameters and every expert starts identical on all of its holders, with no broadcast.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import MoE, MoEConfig
from .ops import add_rms_norm, rms_norm, rotary, router_logits


@dataclass
class LMConfig:
    """Shape and routing options of ``MoELM``. ``d_ff`` is the hidden size of one expert."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 256
    max_seq_len: int = 128
    score: str = "softmax"
    skip_policy: str = "skip"
    renormalize_kept: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "num_experts", "top_k", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"LMConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"the head size d_model/n_heads={self.d_model // self.n_heads} must be even for "
                             f"rotary embeddings")
        if self.top_k > self.num_experts:
            raise ValueError(f"LMConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")

    def moe_config(self, layer: int, resident: Sequence[int] | None, seed: int) -> MoEConfig:
        return MoEConfig(d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts, top_k=self.top_k,
                         score=self.score, resident_experts=resident, skip_policy=self.skip_policy,
                         renormalize_kept=self.renormalize_kept, aux_loss_coef=self.aux_loss_coef,
                         z_loss_coef=self.z_loss_coef, init_std=self.init_std,
                         init_seed=expert_init_seed(seed, layer))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig fields {unknown}")
        return cls(**d)

    # Parameter counts (exact; they match ``MoELM.parameters()`` of a full model).
    def dense_params(self) -> int:
        d, L = self.d_model, self.n_layers
        per_layer = 4 * d * d + self.num_experts * d + 2 * d   # attention, router, two norms
        return L * per_layer + self.vocab_size * d + d          # + tied embedding, final norm

    def expert_params(self) -> int:
        return self.n_layers * self.num_experts * 3 * self.d_model * self.d_ff

    def total_params(self) -> int:
        return self.dense_params() + self.expert_params()

    def active_params(self) -> int:
        return self.dense_params() + self.n_layers * self.top_k * 3 * self.d_model * self.d_ff


PRESETS: dict[str, LMConfig] = {
    # ~3.4M parameters; a few hundred steps on 2 CPU cores in minutes.
    "tiny": LMConfig(),
    # ~20M parameters; a CPU run of an hour, or a minute on a GPU.
    "small": LMConfig(d_model=256, n_layers=6, n_heads=8, num_experts=8, d_ff=512, max_seq_len=256),
    # ~110M parameters.
    "base": LMConfig(d_model=512, n_layers=8, n_heads=8, num_experts=8, d_ff=1024, max_seq_len=512),
    # ~0.98B parameters (~190M active): one GPU per worker.
    "1b": LMConfig(d_model=1024, n_layers=18, n_heads=16, num_experts=16, d_ff=1024, max_seq_len=1024),
}


def preset(name: str, **overrides) -> LMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def _seed_from(*parts) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def expert_init_seed(seed: int, layer: int) -> int:
    """``MoEConfig.init_seed`` of MoE layer ``layer``: experts initialise from (this, global id)."""
    return _seed_from("fomoe-lm", seed, "moe", layer)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``cos``, ``sin``: [S, head_dim/2] rotary tables."""
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).unbind(2)
        # Rotated q and k come out packed [B, S, H, hd] and v stays a view of the projection:
        # layouts attention takes as they are. (q and k rotated as one strided tensor cost three
        # strided copies and a slower stack per layer: 1.85 vs 1.66 ms fwd+bwd of this module at
        # 16x1024 tokens, d 1024, on an H200.)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, d))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, moe: nn.Module) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = moe
        # Top-1 expert counts for routing-stability metrics (off unless a monitor asks).
        self.count_top1 = False
        self.register_buffer("top1_counts", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x: the residual stream; delta: the previous block's FFN output, not yet added (None
        before the first block). Returns the stream after attention and this block's FFN output."""
        x, h = residual_norm(self.attn_norm, x, delta, gemm_dtype(x))
        x, h = residual_norm(self.ffn_norm, x, self.attn(h, cos, sin), gemm_dtype(x))
        if self.count_top1 and self.training:
            with torch.no_grad():
                # The layer's stats count all top-k picks; the top-1 choice needs the logits.
                top1 = router_logits(h, self.moe.router.weight).argmax(-1)
                self.top1_counts.add_(torch.bincount(top1.reshape(-1), minlength=self.top1_counts.numel()))
        return x, self.moe(h)


def gemm_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run the next GEMM in (None: x's own, autocast is off)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def residual_norm(norm: nn.RMSNorm, x: Tensor, delta: Tensor | None,
                  out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """(x + delta, norm(x + delta)) in one pass; (x, norm(x)) when delta is None."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    if delta is None:
        return x, rms_norm(x, norm.weight, eps, out_dtype)
    return add_rms_norm(x, delta, norm.weight, eps, out_dtype)


MoEFactory = Callable[[MoEConfig], nn.Module]


class MoELM(nn.Module):
    """Decoder-only MoE transformer LM over ``cfg.vocab_size`` tokens.

    resident_fn(layer) -> global ids of the experts this worker holds in MoE layer ``layer``
    (None: all). ``moe_factory`` builds each FFN from its ``MoEConfig`` (default ``fomoe.MoE``;
    benchmarks swap in other implementations of the same layer).
    """

    def __init__(self, cfg: LMConfig, resident_fn: Callable[[int], Sequence[int]] | None = None, seed: int = 0,
                 moe_factory: MoEFactory = MoE) -> None:
        super().__init__()
        self.config = cfg
        self.seed = seed
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList()
        for layer in range(cfg.n_layers):
            resident = None if resident_fn is None else list(resident_fn(layer))
            self.blocks.append(Block(cfg, moe_factory(cfg.moe_config(layer, resident, seed))))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        head_dim = cfg.d_model // cfg.n_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.reset_dense_parameters()

    @classmethod
    def from_placement(cls, cfg: LMConfig, placement, rank: int, seed: int = 0, **kwargs) -> "MoELM":
        """The model worker ``rank`` holds under ``placement`` (anything with ``.resident(rank, layer)``)."""
        return cls(cfg, resident_fn=lambda layer: placement.resident(rank, layer), seed=seed, **kwargs)

    @torch.no_grad()
    def reset_dense_parameters(self) -> None:
        """Initialise every non-expert parameter from (seed, parameter name): identical on all workers."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(".w13") or name.endswith(".w2") or ".moe.router." in name:
                continue  # fomoe.MoE initialised its router and experts from its init_seed
            if "norm" in name:
                param.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(_seed_from("fomoe-lm", self.seed, name))
            scale = out_std if name.endswith("attn.out.weight") else std
            # Drawn on the CPU (the generator's device) so every device gets the same values.
            param.copy_(torch.randn(param.shape, generator=gen, device="cpu") * scale)

    def moe_layers(self) -> list[nn.Module]:
        return [block.moe for block in self.blocks]

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids [B, S] -> logits [B, S, vocab] (fp32)."""
        if tokens.dim() != 2:
            raise ValueError(f"MoELM expects token ids [batch, seq], got shape {tuple(tokens.shape)}")
        S = tokens.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x, delta = self.embed(tokens), None
        for block in self.blocks:
            x, delta = block(x, delta, cos, sin)
        _, h = residual_norm(self.norm, x, delta, gemm_dtype(x))
        return F.linear(h, self.embed.weight).float()

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' weighted auxiliary losses from the last forward."""
        losses = [moe.aux_loss for moe in self.moe_layers() if getattr(moe, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else self.embed.weight.new_zeros(())

    def loss(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token cross-entropy of ``batch`` [B, S+1] and the auxiliary router losses."""
        logits = self(batch[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        return ce, self.aux_loss()

    def count_top1(self, enabled: bool = True) -> None:
        for block in self.blocks:
            block.count_top1 = enabled
