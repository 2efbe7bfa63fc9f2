"""System model of federated MoE training: parameters, memory, bytes and wall-clock per worker.

``fomoe plan`` answers, before any hardware is rented: how many parameters does each worker
hold, how much memory does it need, how many bytes does it send per sync and per token, how
long does a round take over a given link, and how few workers (at which replication r) fit a
model into a memory budget, for ``ddp``, ``diloco`` and ``fomoe`` side by side.

One home per concept:

- **parameters**: ``ModelShape`` counts them from the architecture (attention variant, experts,
  shared experts, first-k dense layers, embeddings). For the LM presets that ``fomoe train``
  builds the counts equal ``fomoe.lm.LMConfig`` and the parameters of a built model exactly.
- **bytes**: never re-derived here. The sync schedule is ``fomoe.sync.build_schedule`` applied to
  an analytic ``ParamLayout`` and a ``fomoe.placement.Placement``; the bytes are
  ``fomoe.sync.Bucket.traffic`` (ring accounting of ``fomoe.comm``). The training runtime
  executes exactly those buckets, so prediction and measurement agree to the byte. (Full
  replicas sync everything in one all-worker bucket; their schedule is built from a one-block
  layout, which gives the same buckets without a layers x experts x W holder map.)
- **memory** (``worker_memory``): parameters, gradients and AdamW state as the runtime allocates
  them (fp32 master weights by default), the sync manager's θ_global, its gradient buffer and
  the outer Nesterov momentum, error-feedback residuals of compressed buckets, and estimates of
  the transient peaks: activations of one micro-batch under bf16 autocast (tensors saved for
  backward by ``fomoe.lm.MoELM``), autocast's bf16 weight copies, the logits, the foreach
  optimizer temporaries and the sync buffers.
- **time** (``Plan.step_seconds`` / ``Plan.comm_seconds``): compute from FLOPs per token at an
  achieved FLOP rate (or a measured tokens/s), with skip-token cutting the expert FLOPs of
  fomoe to the share of assignments a worker keeps; communication as the sync manager runs it
  (``sync_seconds``): every worker runs its buckets one after another and a bucket starts when
  all its members are free (so the time of a sync is the critical path through the schedule,
  not one worker's sum); each ring step pays the one-way link latency and its bytes over the
  link bandwidth (full duplex); on a lossy link every lost TCP segment holds the stream for one
  round trip (the model ``fomoe.relay`` shapes links with); an optional share hidden behind
  compute. ``tcp_options`` proposes the TCP transport's timeouts for a schedule and a link.

A *worker* is one memory domain: one GPU, or ``gpus_per_worker`` GPUs that shard its state
evenly (so per-GPU memory is the worker's divided by that count).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

from . import comm
from .placement import Placement, PlacementError
from .relay import SEGMENT_BYTES
from .sync import METHODS, Bucket, ParamLayout, build_schedule

GiB = 2 ** 30
ATTENTIONS = ("mha", "gqa", "mla")
QK_NORMS = ("none", "head", "full")
SCORES = ("softmax", "sigmoid")
SKIP_POLICIES = ("skip", "reroute")


class PlanError(ValueError):
    """A configuration the system model cannot describe, with the reason."""


# ---- model shape and parameter counts --------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """Architecture of a decoder-only MoE transformer, as far as sizes go.

    Every layer is pre-norm attention + FFN. The first ``dense_layers`` layers have a dense
    SwiGLU FFN of ``dense_d_ff``; the others an MoE FFN: a router over ``num_experts`` routed
    SwiGLU experts of ``expert_d_ff`` (``top_k`` per token) plus ``shared_experts`` always-on
    experts of ``shared_d_ff``. Attention: ``mha``; ``gqa`` with ``n_kv_heads``; or ``mla``
    (DeepSeek's latent attention: queries through a ``q_lora_rank`` bottleneck, keys and values
    through ``kv_lora_rank``, with ``qk_nope_head_dim`` + ``qk_rope_head_dim`` per query/key head
    and ``v_head_dim`` per value head). ``qk_norm``: RMSNorm on queries and keys per head
    (``head``) or over all heads (``full``). ``fused_qkv`` only changes how many parameter
    tensors there are (one qkv matrix, as ``fomoe.lm`` builds it).
    """

    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    num_experts: int
    top_k: int
    expert_d_ff: int
    attention: str = "mha"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    qk_norm: str = "none"
    tied_embeddings: bool = True
    shared_experts: int = 0
    shared_d_ff: int | None = None
    dense_layers: int = 0
    dense_d_ff: int = 0
    router_bias: bool = False
    score: str = "softmax"
    norms_per_layer: int = 2
    fused_qkv: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "num_experts", "top_k", "expert_d_ff"):
            _positive_int(name, getattr(self, name))
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "shared_experts", "dense_layers", "dense_d_ff", "norms_per_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PlanError(f"{name} must be an integer >= 0, got {value!r}")
        if self.attention not in ATTENTIONS:
            raise PlanError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.qk_norm not in QK_NORMS:
            raise PlanError(f"qk_norm must be one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")
        if self.score not in SCORES:
            raise PlanError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.top_k > self.num_experts:
            raise PlanError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not 0 <= self.dense_layers < self.n_layers:
            raise PlanError(f"dense_layers={self.dense_layers} must leave at least one MoE layer of "
                            f"n_layers={self.n_layers}")
        if self.dense_layers and not self.dense_d_ff:
            raise PlanError("dense_layers > 0 needs dense_d_ff (the hidden size of their dense FFN)")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if not getattr(self, name):
                    raise PlanError(f"attention='mla' needs {name} > 0")
        else:
            if self.head_dim is None and self.d_model % self.n_heads:
                raise PlanError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; give head_dim")
            kv = self.kv_heads
            if not 1 <= kv <= self.n_heads or self.n_heads % kv:
                raise PlanError(f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
            if self.attention == "mha" and kv != self.n_heads:
                raise PlanError(f"attention='mha' has n_kv_heads == n_heads; use attention='gqa' for {kv} KV heads")

    # ---- attention sizes -------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        if self.attention == "mla":
            return self.n_heads
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head width of queries and keys."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def value_head_size(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_size

    def attention_widths(self) -> tuple[int, int, int, int]:
        """(query, key, value, attention output) widths of one token."""
        h, kv = self.n_heads, self.kv_heads
        return h * self.head_size, kv * self.head_size, kv * self.value_head_size, h * self.value_head_size

    def attention_params(self) -> int:
        d = self.d_model
        q, k, v, o = self.attention_widths()
        if self.attention == "mla":
            ql, kvl, rope = self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim
            query = (d * ql + ql + ql * q) if ql else d * q        # down-projection, its norm, up-projection
            keys_values = d * (kvl + rope) + kvl + kvl * (k - self.n_heads * rope + v)
            n = query + keys_values + o * d
        else:
            n = d * q + d * k + d * v + o * d
        if self.qk_norm == "head":
            n += 2 * self.head_size
        elif self.qk_norm == "full":
            n += q + k
        return n

    def attention_tensors(self) -> int:
        if self.attention == "mla":
            n = (3 if self.q_lora_rank else 1) + 3 + 1
        else:
            n = 2 if self.fused_qkv else 4
        return n + (2 if self.qk_norm != "none" else 0)

    # ---- FFN sizes -------------------------------------------------------------------------

    @property
    def moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    @property
    def shared_ff(self) -> int:
        return self.expert_d_ff if self.shared_d_ff is None else self.shared_d_ff

    def expert_numel(self) -> int:
        """Parameters of one routed expert (SwiGLU: w13 [d, 2 d_ff] and w2 [d_ff, d])."""
        return 3 * self.d_model * self.expert_d_ff

    def router_params(self) -> int:
        return self.num_experts * self.d_model + (self.num_experts if self.router_bias else 0)

    def shared_params(self) -> int:
        return self.shared_experts * 3 * self.d_model * self.shared_ff

    def dense_ffn_params(self) -> int:
        return 3 * self.d_model * self.dense_d_ff

    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)

    # ---- totals -----------------------------------------------------------------------------

    def dense_params(self) -> int:
        """Everything except the routed experts: every worker holds these."""
        d = self.d_model
        per_layer = self.attention_params() + self.norms_per_layer * d
        moe = self.moe_layers * (per_layer + self.router_params() + self.shared_params())
        dense = self.dense_layers * (per_layer + self.dense_ffn_params())
        return moe + dense + self.embedding_params() + d   # + final norm

    def expert_params(self) -> int:
        return self.moe_layers * self.num_experts * self.expert_numel()

    def total_params(self) -> int:
        return self.dense_params() + self.expert_params()

    def active_params(self, include_input_embedding: bool = True) -> int:
        """Parameters a token uses: all dense ones and top_k routed experts per MoE layer.

        include_input_embedding=False leaves out the input embedding table (a lookup, not a
        matmul) where it is not also the output head; publishers differ on this convention.
        """
        n = self.dense_params() + self.moe_layers * self.top_k * self.expert_numel()
        if not include_input_embedding and not self.tied_embeddings:
            n -= self.vocab_size * self.d_model
        return n

    def matmul_params(self, local_experts: int) -> int:
        """Parameters used in matmuls (autocast makes a bf16 copy of each) for a worker holding
        ``local_experts`` routed experts in total: all but norms, routers (fp32) and the input
        embedding table (a lookup) unless it doubles as the head."""
        d = self.d_model
        norms_q_k = {"none": 0, "head": 2 * self.head_size, "full": sum(self.attention_widths()[:2])}[self.qk_norm]
        mla_norms = (self.q_lora_rank + self.kv_lora_rank) if self.attention == "mla" else 0
        attn = self.attention_params() - norms_q_k - mla_norms
        return (self.n_layers * attn + self.moe_layers * self.shared_params()
                + self.dense_layers * self.dense_ffn_params() + local_experts * self.expert_numel()
                + self.vocab_size * d)

    def param_tensors(self) -> int:
        """Number of parameter tensors of the implementation fomoe builds (AdamW keeps one step
        counter per tensor): experts stacked per layer (w13, w2), like ``fomoe.MoE``."""
        per_layer = self.norms_per_layer + self.attention_tensors()
        moe = per_layer + 1 + (1 if self.router_bias else 0) + 2 + (2 if self.shared_experts else 0)
        dense = per_layer + 2
        return self.moe_layers * moe + self.dense_layers * dense + (1 if self.tied_embeddings else 2) + 1

    def layout(self) -> ParamLayout:
        """What a sync moves, analytically: dense numel and every routed expert's numel."""
        return ParamLayout.from_sizes(self.dense_params(), self.moe_layers, self.num_experts, self.expert_numel())

    # ---- compute ----------------------------------------------------------------------------

    def train_flops_per_token(self, seq_len: int, kept_fraction: float = 1.0) -> float:
        """FLOPs of forward + backward per token (3x the forward): 2 per matmul parameter used,
        routed experts scaled by the share of assignments kept (skip-token), plus causal
        attention scores and values (half the sequence on average)."""
        matmul = self.moe_layers * self.top_k * self.expert_numel() * kept_fraction + self.matmul_params(0)
        q, _, _, o = self.attention_widths()
        attention = self.n_layers * 2 * (seq_len / 2) * (q + o)
        return 3.0 * (2.0 * matmul + attention)

    def describe(self) -> str:
        if self.attention == "mla":
            attn = f"MLA {self.n_heads} heads (q rank {self.q_lora_rank}, kv rank {self.kv_lora_rank})"
        elif self.attention == "gqa":
            attn = f"GQA {self.n_heads}/{self.kv_heads} heads"
        else:
            attn = f"MHA {self.n_heads} heads"
        moe = f"{self.num_experts} experts top-{self.top_k} (d_ff {self.expert_d_ff})"
        if self.shared_experts:
            moe += f" + {self.shared_experts} shared"
        if self.dense_layers:
            moe += f", first {self.dense_layers} layers dense (d_ff {self.dense_d_ff})"
        return (f"{self.n_layers} layers, d={self.d_model}, {attn}, {moe}, vocab {self.vocab_size}"
                f"{' tied' if self.tied_embeddings else ''}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_lm_config(cls, cfg) -> "ModelShape":
        """The shape of ``fomoe.lm.MoELM(cfg)``: MHA with a fused qkv, tied embeddings."""
        return cls(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                   num_experts=cfg.num_experts, top_k=cfg.top_k, expert_d_ff=cfg.d_ff, attention="mha",
                   tied_embeddings=True, score=cfg.score, fused_qkv=True)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")


# ---- federation, hardware, link, training -----------------------------------------------------

@dataclass(frozen=True)
class Federation:
    """Who holds what and how often they talk.

    placement: how fomoe places experts: ``replicated:R`` (each expert on R workers, cyclic),
    ``replicated:R:random``, ``partition`` (R = 1), ``full`` (R = W) or a placement JSON file
    (see ``fomoe.placement``). ddp and diloco always hold full replicas.
    compression: wire format of the pseudo-gradients (None = fp32, ``bf16``, ``int8``, or
    ``auto``: per holder group the one of int8 and bf16 that sends fewer bytes).
    weighted: experts averaged by the tokens each holder routed to them (one extra fp32 count
    per expert on the wire).
    """

    workers: int = 4
    placement: str = "replicated:2"
    sync_every: int = 10
    compression: str | None = None
    weighted: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("workers", self.workers)
        _positive_int("sync_every (H)", self.sync_every)
        object.__setattr__(self, "compression", comm.check_compression(self.compression, allow_auto=True))

    def placement_for(self, shape: ModelShape) -> Placement:
        return Placement.from_spec(self.placement, self.workers, shape.num_experts, shape.moe_layers, self.seed)

    def describe(self) -> str:
        wire = self.compression or "fp32"
        return (f"W={self.workers} workers, fomoe placement {self.placement}, H={self.sync_every}, "
                f"{wire} pseudo-gradients"
                f"{', token-weighted experts' if self.weighted else ''}")


@dataclass(frozen=True)
class Hardware:
    """One worker: ``gpus_per_worker`` GPUs that shard the worker's state evenly.

    tflops: achieved (not peak) training FLOP/s per GPU, in TFLOP/s. tokens_per_s: measured
    training tokens/s of one worker with every expert resident; when given it replaces the
    FLOP-rate model (fomoe's skip-token speedup is still scaled by FLOPs).
    param_bytes: bytes per parameter of weights, gradients, AdamW moments and θ_global (4 for
    fp32 master weights, as ``fomoe train`` keeps them). autocast_bf16: bf16 autocast (matmul
    inputs and autocast's weight copies in bf16). global_on: where the sync manager keeps
    θ_global, its outer momentum and sync buffers (``gpu``: with the model, as ``fomoe train``
    does; ``host``: in CPU memory). recompute: activation checkpointing of every layer.
    fp32_weight_grads: the GEMMs write the fp32 master weights' gradients straight from their
    accumulators (fomoe's Hopper kernels under autocast); False where they are computed in the
    compute dtype and widened (the CPU and portable GPU kernels: one more buffer per layer).
    """

    gpu_memory_gib: float = 140.0
    gpus_per_worker: int = 1
    tflops: float = 400.0
    tokens_per_s: float | None = None
    param_bytes: int = 4
    autocast_bf16: bool = True
    global_on: str = "gpu"
    recompute: bool = False
    fp32_weight_grads: bool = True

    def __post_init__(self) -> None:
        _positive_int("gpus_per_worker", self.gpus_per_worker)
        if not self.gpu_memory_gib > 0 or not self.tflops > 0:
            raise PlanError("gpu_memory_gib and tflops must be positive")
        if self.tokens_per_s is not None and not self.tokens_per_s > 0:
            raise PlanError("tokens_per_s must be positive")
        if self.param_bytes not in (2, 4):
            raise PlanError(f"param_bytes must be 4 (fp32) or 2 (bf16), got {self.param_bytes!r}")
        if self.global_on not in ("gpu", "host"):
            raise PlanError(f"global_on must be 'gpu' or 'host', got {self.global_on!r}")

    def describe(self) -> str:
        rate = (f"{self.tokens_per_s:,.0f} tokens/s measured" if self.tokens_per_s
                else f"{self.tflops:g} TFLOP/s achieved per GPU")
        gpus = f"{self.gpus_per_worker} x " if self.gpus_per_worker > 1 else ""
        return (f"{gpus}{self.gpu_memory_gib:g} GiB GPU per worker, {rate}, "
                f"{'fp32' if self.param_bytes == 4 else 'bf16'} weights"
                f"{' + bf16 autocast' if self.autocast_bf16 else ''}"
                f", θ_global on {self.global_on}{', activation recompute' if self.recompute else ''}")


@dataclass(frozen=True)
class Link:
    """The link of every worker: bandwidth in Gbit/s (each direction), one-way latency paid by
    every sequential message of a collective, the share of communication hidden behind
    compute (0: blocking syncs, as fomoe runs them today), and the TCP segment loss rate.

    Loss as a TCP stream sees it: no byte is lost, but each lost segment (``segment_bytes``)
    holds the stream for one round trip (``2 * latency``) until the retransmission arrives, so
    B bytes cost ``B / segment_bytes * loss * 2 * latency`` extra on average. Congestion control
    (the window halving after a loss) is not modelled: on real TCP a lossy long link is slower.
    """

    bandwidth_gbps: float = 10.0
    latency_ms: float = 30.0
    overlap: float = 0.0
    loss: float = 0.0
    segment_bytes: int = SEGMENT_BYTES

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise PlanError(f"bandwidth must be positive, got {self.bandwidth_gbps} Gbit/s")
        if not self.latency_ms >= 0:
            raise PlanError(f"latency must be >= 0, got {self.latency_ms} ms")
        if not 0 <= self.overlap <= 1:
            raise PlanError(f"overlap must be in [0, 1], got {self.overlap}")
        if not 0 <= self.loss < 1:
            raise PlanError(f"loss must be in [0, 1), got {self.loss}")
        if not isinstance(self.segment_bytes, int) or self.segment_bytes < 1:
            raise PlanError(f"segment_bytes must be a positive integer, got {self.segment_bytes!r}")

    def transfer_seconds(self, nbytes: float, messages: int, bandwidth_gbps: float | None = None) -> float:
        """Time of ``messages`` sequential messages carrying ``nbytes`` in all over this link."""
        bw = (bandwidth_gbps or self.bandwidth_gbps) * 1e9 / 8
        latency = self.latency_ms / 1e3
        return nbytes / bw + messages * latency + nbytes / self.segment_bytes * self.loss * 2 * latency

    def describe(self) -> str:
        return (f"link {_fmt_bandwidth(self.bandwidth_gbps)}, {self.latency_ms:g} ms"
                f"{f', {self.loss:.2%} segment loss' if self.loss else ''}"
                f"{f', {self.overlap:.0%} overlapped' if self.overlap else ', no overlap'}")


@dataclass(frozen=True)
class Training:
    """micro_batch: sequences per GPU per forward; grad_accum: micro-batches per inner step.
    token_budget: tokens trained by the whole federation. skip_policy: ``skip`` (fomoe drops
    assignments to non-resident experts, saving their FLOPs) or ``reroute``."""

    micro_batch: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    token_budget: float = 1e9
    skip_policy: str = "skip"

    def __post_init__(self) -> None:
        for name in ("micro_batch", "seq_len", "grad_accum"):
            _positive_int(name, getattr(self, name))
        if not self.token_budget > 0:
            raise PlanError("token_budget must be positive")
        if self.skip_policy not in SKIP_POLICIES:
            raise PlanError(f"skip_policy must be one of {', '.join(SKIP_POLICIES)}, got {self.skip_policy!r}")


# ---- activation memory ----------------------------------------------------------------------------

def layer_activation_bytes(shape: ModelShape, moe: bool, autocast_bf16: bool = True) -> int:
    """Bytes per token that one layer of ``fomoe.lm.MoELM`` keeps for backward.

    The residual stream is fp32; matmul inputs are cast to bf16 under autocast (a = 2 bytes,
    else 4). Saved: each RMSNorm's fp32 input, the residual sum (``fomoe.ops.add_rms_norm``
    recomputes 1/rms in its backward, on both devices); the qkv projection's input and output
    (rotary embedding keeps views of it); rotated queries and keys; the attention output and
    its log-sum-exp; the output projection's input; for MoE layers the layer's input (one
    tensor, read by the router and the expert op: the norm writes it in the GEMM dtype), the
    router's logits, probabilities and z-loss log-sum-exp, the routing tables, the expert op's
    pre-SwiGLU rows (allocated for all top_k assignments: skip-token does not
    shrink them); for dense FFNs and shared experts the SwiGLU input, gate|up output,
    activation and product.
    """
    a = 2 if autocast_bf16 else 4
    d = shape.d_model
    q, k, v, o = shape.attention_widths()
    norm = 4 * d
    attn = norm + a * d + a * (q + k) + a * o + 4 * shape.n_heads + a * o
    if shape.attention == "mla":
        ql, kvl, rope = shape.q_lora_rank, shape.kv_lora_rank, shape.qk_rope_head_dim
        # latent projections and their norms, then the up-projected queries, keys and values
        attn += a * (2 * ql + 2 * kvl + rope) + a * (q + k + v)
    else:
        attn += a * (q + k + v)
    swiglu = lambda f: a * (d + 4 * f)  # noqa: E731  (input, gate|up, activation, product)
    if not moe:
        return attn + norm + swiglu(shape.dense_d_ff)
    kk, E = shape.top_k, shape.num_experts
    router = 8 * E + 4 + 16 * kk
    experts = a * d + a * kk * 2 * shape.expert_d_ff
    shared = shape.shared_experts * swiglu(shape.shared_ff)
    return attn + norm + router + experts + shared


def head_activation_bytes(shape: ModelShape, autocast_bf16: bool = True) -> int:
    """Per token: the token ids and targets, the final norm and the head's input (the logits
    are counted apart)."""
    a = 2 if autocast_bf16 else 4
    d = shape.d_model
    return 16 + 4 * d + a * d


def logits_bytes(shape: ModelShape, tokens: int) -> int:
    """The loss's transient peak, at the start of backward: the log-softmax kept for backward
    and the fp32 gradients of the log-softmax and of the logits (12 bytes per vocabulary entry
    per token), plus the head's weight gradient (fp32, and its bf16 product)."""
    return 12 * shape.vocab_size * tokens + 6 * shape.vocab_size * shape.d_model


def backward_transient_bytes(shape: ModelShape, tokens: int, layer_experts: int, autocast_bf16: bool = True,
                             fp32_weight_grads: bool = True) -> int:
    """Working memory of the backward of one MoE layer while every activation is still alive:
    the gradient of the expert op's pre-SwiGLU rows, and (unless the GEMMs write the fp32
    gradients directly) the layer's expert weight gradients in the compute dtype before they
    are widened; plus the head's fp32 weight gradient, created first."""
    a = 2 if autocast_bf16 else 4
    narrow_grads = 0 if (fp32_weight_grads or not autocast_bf16) else a * layer_experts * shape.expert_numel()
    return a * tokens * shape.top_k * 2 * shape.expert_d_ff + narrow_grads + 4 * shape.vocab_size * shape.d_model


def activation_bytes(shape: ModelShape, tokens: int, autocast_bf16: bool = True, recompute: bool = False) -> int:
    """Bytes saved for backward by one forward over ``tokens`` tokens (logits not included).
    With ``recompute`` (activation checkpointing per layer) only every layer's fp32 input is
    kept, plus one layer's activations while it is recomputed."""
    dense = layer_activation_bytes(shape, moe=False, autocast_bf16=autocast_bf16) if shape.dense_layers else 0
    moe = layer_activation_bytes(shape, moe=True, autocast_bf16=autocast_bf16)
    head = head_activation_bytes(shape, autocast_bf16=autocast_bf16)
    if recompute:
        per_token = shape.n_layers * 4 * shape.d_model + max(dense, moe) + head
    else:
        per_token = shape.dense_layers * dense + shape.moe_layers * moe + head
    return per_token * tokens


# ---- memory of one worker ---------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    """Bytes of one worker (all of its GPUs together), by what holds them.

    Exact (what the runtime allocates): weights, grads (alive from backward to the inner step),
    optimizer (AdamW: two moments per parameter plus a 4-byte step counter per tensor),
    theta_global, theta_global_grad (the buffer the averaged pseudo-gradient lands in),
    outer_momentum (Nesterov SGD), compression_residual (error feedback of compressed buckets).
    Estimates of transient peaks: activations, autocast_copies, logits, backward_transient
    (one MoE layer's backward working set), optimizer_temp (the
    foreach AdamW's square-root buffer), sync_buffer (the largest flat bucket of a sync; for ddp
    the gradient all-reduce buffer).
    """

    weights: int
    grads: int
    optimizer: int
    theta_global: int
    theta_global_grad: int
    outer_momentum: int
    compression_residual: int
    activations: int
    autocast_copies: int
    logits: int
    backward_transient: int
    optimizer_temp: int
    sync_buffer: int
    global_on_gpu: bool
    method: str
    gpus: int = 1

    @property
    def outer_state(self) -> int:
        return self.theta_global + self.theta_global_grad + self.outer_momentum + self.compression_residual

    @property
    def state(self) -> int:
        """Parameters, gradients, inner optimizer state and outer state: the exact part."""
        return self.weights + self.grads + self.optimizer + self.outer_state

    def phases(self) -> dict[str, int]:
        """GPU bytes of the worker at the peak of each phase of a round."""
        outer_gpu = self.outer_state if self.global_on_gpu else 0
        base = self.weights + self.optimizer + outer_gpu
        sync_gpu = self.sync_buffer if self.global_on_gpu else 0
        return {
            # gradients of the previous step were released; activations and bf16 weight copies
            # alive, then either the loss and its gradient or the first layer backward on top
            "forward_backward": base + self.activations + self.autocast_copies
            + max(self.logits, self.backward_transient),
            # every gradient alive, then the optimizer's temporaries (ddp: its all-reduce buffer)
            "optimizer_step": base + self.grads + max(self.optimizer_temp, sync_gpu if self.method == "ddp" else 0),
            "outer_sync": base + (0 if self.method == "ddp" else sync_gpu),
        }

    @property
    def peak(self) -> int:
        """Peak GPU bytes of the worker."""
        return max(self.phases().values())

    @property
    def peak_per_gpu(self) -> int:
        return -(-self.peak // self.gpus)

    @property
    def host(self) -> int:
        """Host bytes of the sync manager when θ_global lives on the host."""
        return 0 if self.global_on_gpu else self.outer_state + self.sync_buffer

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(state=self.state, peak=self.peak, peak_per_gpu=self.peak_per_gpu, host=self.host,
                 phases=self.phases())
        return d


@dataclass(frozen=True)
class SyncFootprint:
    """What one worker's sync schedule adds to its memory: the largest flat fp32 bucket it
    packs, the numel of its compressed buckets (their error-feedback residuals persist), and
    the largest compressed bucket (its wire copies are transient)."""

    largest_numel: int = 0
    residual_numel: int = 0
    compressed_numel: int = 0
    compressed_members: int = 0
    compression: str | None = None

    @classmethod
    def of(cls, buckets: Sequence[Bucket], rank: int) -> "SyncFootprint":
        mine = [b for b in buckets if rank in b.ranks]
        compressed = [b for b in mine if b.compression is not None and len(b.ranks) > 1]
        big = max(compressed, key=lambda b: b.numel, default=None)
        return cls(largest_numel=max((b.numel for b in mine), default=0),
                   residual_numel=sum(b.numel for b in compressed),
                   compressed_numel=big.numel if big else 0, compressed_members=len(big.ranks) if big else 0,
                   compression=big.compression if big else None)


def worker_memory(shape: ModelShape, method: str, local_experts: int, footprint: SyncFootprint,
                  hardware: Hardware, training: Training) -> Memory:
    """Memory of a worker holding ``local_experts`` routed experts (over all layers) under
    ``method``, whose sync schedule leaves ``footprint``."""
    _check_method(method)
    pb = hardware.param_bytes
    held = shape.dense_params() + local_experts * shape.expert_numel()
    weights = grads = held * pb
    optimizer = 2 * held * pb + 4 * shape.param_tensors()
    outer = method != "ddp"
    f = footprint
    if method == "ddp":
        sync_buffer = 4 * f.largest_numel
    else:
        # the flat fp32 bucket, plus what compression adds: the round-trip copy for error
        # feedback and the wire copy (bf16) or every member's int8 payload
        extra = 0
        if f.compression == "bf16":
            extra = 4 * f.compressed_numel + 2 * f.compressed_numel
        elif f.compression == "int8":
            extra = 4 * f.compressed_numel + f.compressed_members * comm.int8_payload_bytes(f.compressed_numel)
        # the outer step's foreach Nesterov update makes one temporary the size of θ_global
        sync_buffer = max(4 * f.largest_numel + extra, held * pb)
    gpus = hardware.gpus_per_worker
    tokens = training.micro_batch * training.seq_len
    acts = gpus * activation_bytes(shape, tokens, hardware.autocast_bf16, hardware.recompute)
    copies = (2 * shape.matmul_params(local_experts)) if hardware.autocast_bf16 else 0
    layer_experts = -(-local_experts // shape.moe_layers)
    transient = gpus * backward_transient_bytes(shape, tokens, layer_experts, hardware.autocast_bf16,
                                                hardware.fp32_weight_grads)
    return Memory(weights=weights, grads=grads, optimizer=optimizer,
                  theta_global=held * pb if outer else 0, theta_global_grad=held * pb if outer else 0,
                  outer_momentum=held * pb if outer else 0, compression_residual=4 * f.residual_numel if outer else 0,
                  activations=acts, autocast_copies=copies, logits=gpus * logits_bytes(shape, tokens),
                  backward_transient=transient,
                  optimizer_temp=held * pb, sync_buffer=sync_buffer, global_on_gpu=hardware.global_on == "gpu",
                  method=method, gpus=gpus)


# ---- communication ----------------------------------------------------------------------------

def bucket_messages(bucket: Bucket, rank: int) -> int:
    """Sequential messages ``rank`` exchanges for ``bucket`` (each pays the link latency): the
    ring all-reduce's 2(n-1) steps, the int8 all-gather's n-1, plus the token-count sum."""
    if rank not in bucket.ranks or len(bucket.ranks) == 1 or bucket.numel == 0:
        return 0
    n, pos = len(bucket.ranks), bucket.ranks.index(rank)
    if bucket.compression == "int8":
        steps = len(comm.allgather_plan(n, pos))
    else:
        plan = comm.ring_plan(bucket.numel, n, pos)
        steps = len(plan.reduce_steps) + len(plan.gather_steps)
    if bucket.count_numel:
        plan = comm.ring_plan(bucket.count_numel, n, pos)
        steps += len(plan.reduce_steps) + len(plan.gather_steps)
    return steps


@dataclass(frozen=True)
class RankTraffic:
    """One worker's share of one sync: bytes sent and received, the bytes its link carries when
    each step's send and receive overlap, and the sequential messages."""

    sent: int
    recv: int
    link_bytes: int
    messages: int

    def seconds(self, link: Link, bandwidth_gbps: float | None = None) -> float:
        """This worker's own communication time (waiting for other workers not included)."""
        return link.transfer_seconds(self.link_bytes, self.messages, bandwidth_gbps)


def rank_traffic(buckets: Sequence[Bucket], num_workers: int) -> list[RankTraffic]:
    """Per rank, its traffic of one execution of ``buckets`` (``Bucket.traffic`` is the exact
    byte count, the one the sync manager counts at runtime)."""
    acc = [[0, 0, 0, 0] for _ in range(num_workers)]
    for b in buckets:
        for r in b.ranks:
            s, v = b.traffic(r)
            a = acc[r]
            a[0] += s
            a[1] += v
            a[2] += max(s, v)
            a[3] += bucket_messages(b, r)
    return [RankTraffic(*a) for a in acc]


@dataclass(frozen=True)
class BucketCost:
    """What one bucket costs each of its members: link bytes (each step's send and receive
    overlap) and sequential messages, in the order of ``ranks``."""

    ranks: tuple[int, ...]
    link_bytes: tuple[int, ...]
    messages: tuple[int, ...]

    @classmethod
    def of(cls, bucket: Bucket) -> "BucketCost":
        link_bytes = tuple(max(bucket.traffic(r)) for r in bucket.ranks)
        return cls(bucket.ranks, link_bytes, tuple(bucket_messages(bucket, r) for r in bucket.ranks))

    def seconds(self, link: Link, bandwidth_gbps: float | None = None) -> float:
        """The ring runs in lockstep: its slowest member sets the pace."""
        return max(link.transfer_seconds(b, m, bandwidth_gbps) for b, m in zip(self.link_bytes, self.messages))


def sync_seconds(buckets: Sequence[Bucket | BucketCost], num_workers: int, link: Link,
                 bandwidth_gbps: float | None = None, commit_barrier: bool = False) -> float:
    """Wall-clock of one sync that every worker starts at the same moment.

    Every worker runs its buckets in schedule order, so a worker may wait for a group it is not
    in to release a partner: the time is the critical path through the schedule, not one
    worker's sum. A bucket whose members start together lasts as long as its slowest member's
    ring. When they start at different times, its ring is followed step by step: a member sends
    as soon as it is ready (sends are buffered), a message reaches the next member one
    serialisation (and loss stalls) plus one latency later, and a step ends when its message
    from the previous member has arrived. ``commit_barrier``: the fault-tolerant TCP transport
    ends each round with a commit barrier on its control plane, one more one-way message.
    """
    free = [0.0] * num_workers
    latency = link.latency_ms / 1e3
    for b in buckets:
        cost = b if isinstance(b, BucketCost) else BucketCost.of(b)
        if not any(cost.messages):
            continue
        ready = [free[r] for r in cost.ranks]
        steps = cost.messages[0]
        if max(ready) == min(ready) or any(m != steps for m in cost.messages):
            end = max(ready) + cost.seconds(link, bandwidth_gbps)
            ready = [end] * len(ready)
        else:
            n = len(ready)
            busy = [link.transfer_seconds(nbytes / steps, 0, bandwidth_gbps) for nbytes in cost.link_bytes]
            link_free = [0.0] * n
            for _ in range(steps):
                arrive = [0.0] * n
                for i in range(n):
                    link_free[i] = max(ready[i], link_free[i]) + busy[i]
                    arrive[(i + 1) % n] = link_free[i] + latency
                ready = [max(t, a) for t, a in zip(ready, arrive)]
        for r, t in zip(cost.ranks, ready):
            free[r] = t
    total = max(free, default=0.0)
    if commit_barrier and num_workers > 1:
        total += latency
    return total


def tcp_options(buckets: Sequence[Bucket | BucketCost], num_workers: int, link: Link, compute_seconds: float = 0.0,
                margin: float = 4.0, floor_s: float = 30.0) -> dict:
    """Timeouts for ``fomoe.tcp.TcpOptions`` that follow the schedule and the link instead of
    hand-tuning (keyword arguments for ``TcpOptions(**...)``).

    ``peer_timeout_s``: silence after which a peer counts as lost: ``margin`` x the longest
    silence a healthy peer shows (a loss stall of one round trip, then a heartbeat's one-way
    trip; a long message is not silence, its bytes keep arriving), at least ``floor_s``
    (heartbeats go out every fifth of it, and a busy host can delay one by seconds); it is also
    the fixed part of every transfer's deadline. ``min_bandwidth_mbps``: the link's
    bandwidth divided by ``margin`` (with loss, the rate loss stalls leave), so a transfer's
    deadline allows ``margin`` x its modelled time. ``stall_timeout_s``: a live peer may send
    nothing for one compute phase between syncs (``compute_seconds``, e.g. H inner steps) plus
    a sync: ``margin`` x that, at least ten minutes.
    """
    if not margin >= 1:
        raise PlanError(f"margin must be >= 1, got {margin}")
    sync = sync_seconds(buckets, num_workers, link, commit_barrier=True)
    silence = 3 * link.latency_ms / 1e3
    rate = link.bandwidth_gbps * 1e3
    if link.loss:
        # bytes per second once loss stalls are paid: one segment every segment/rate + loss x RTT
        seg_s = link.segment_bytes * 8 / (rate * 1e6) + link.loss * 2 * link.latency_ms / 1e3
        rate = link.segment_bytes * 8 / seg_s / 1e6
    return {"peer_timeout_s": max(floor_s, margin * silence),
            "min_bandwidth_mbps": rate / margin,
            "stall_timeout_s": max(600.0, margin * (compute_seconds + sync))}


# ---- the plan ------------------------------------------------------------------------------------

class Plan:
    """Predictions for one model, federation, hardware, link and training setup.

    Per method (``ddp``, ``diloco``, ``fomoe``): the sync schedule, every rank's traffic and
    memory, step and round times. A *sync* is one step's gradient all-reduce for ddp and one
    outer round (every H inner steps) for diloco and fomoe; a *round* is H inner steps.
    """

    def __init__(self, shape: ModelShape, federation: Federation = Federation(), hardware: Hardware = Hardware(),
                 link: Link = Link(), training: Training = Training(), name: str = "custom") -> None:
        self.shape, self.federation, self.hardware = shape, federation, hardware
        self.link, self.training = link, training
        self.name = name
        self._cache: dict = {}

    def with_(self, **changes) -> "Plan":
        """A copy with fields of federation / hardware / link / training replaced by name."""
        key = ("with", tuple(sorted(changes.items())))
        if key in self._cache:   # the planning search asks for the same variants repeatedly
            return self._cache[key]
        parts = {"federation": self.federation, "hardware": self.hardware, "link": self.link,
                 "training": self.training}
        for name, value in changes.items():
            owner = next((k for k, obj in parts.items() if name in {f.name for f in fields(obj)}), None)
            if owner is None:
                raise PlanError(f"unknown plan setting {name!r}")
            parts[owner] = replace(parts[owner], **{name: value})
        self._cache[key] = Plan(self.shape, name=self.name, **parts)
        return self._cache[key]

    # ---- placement and schedules ------------------------------------------------------------

    @cached_property
    def placement(self) -> Placement:
        try:
            return self.federation.placement_for(self.shape)
        except PlacementError as exc:
            raise PlanError(f"fomoe placement: {exc}") from exc

    @property
    def workers(self) -> int:
        return self.federation.workers

    @property
    def replication(self) -> float:
        return self.placement.replication()

    def buckets(self, method: str) -> list[Bucket]:
        """The sync schedule of ``method`` (``fomoe.sync.build_schedule`` on the analytic layout)."""
        key = ("buckets", _check_method(method))
        if key not in self._cache:
            layout, fed = self.shape.layout(), self.federation
            if method == "fomoe":
                out = build_schedule(layout, self.placement, "fomoe", fed.weighted, fed.compression)
            else:
                if not (method == "diloco" and fed.weighted):
                    # Full replicas sync everything in one all-worker bucket: a layout of one dense
                    # block gives that schedule without a holder map of layers x experts x W.
                    # (Token-weighted averaging also sums one count per expert: use the real layout.)
                    layout = ParamLayout(layout.total_numel(), ())
                weighted, compression = (fed.weighted, fed.compression) if method == "diloco" else (False, None)
                out = build_schedule(layout, None, method, weighted, compression, num_workers=fed.workers)
            self._cache[key] = out
        return self._cache[key]

    def traffic(self, method: str) -> list[RankTraffic]:
        """Every rank's traffic per sync of ``method``."""
        key = ("traffic", _check_method(method))
        if key not in self._cache:
            self._cache[key] = rank_traffic(self.buckets(method), self.workers)
        return self._cache[key]

    def local_experts(self, method: str) -> list[int]:
        """Routed experts each rank holds (summed over MoE layers)."""
        if _check_method(method) != "fomoe":
            return [self.shape.moe_layers * self.shape.num_experts] * self.workers
        if "local" not in self._cache:
            self._cache["local"] = self.placement.experts_per_worker()
        return self._cache["local"]

    def params_held(self, method: str) -> list[int]:
        return [self.shape.dense_params() + n * self.shape.expert_numel() for n in self.local_experts(method)]

    # ---- memory -----------------------------------------------------------------------------

    def memory(self, method: str, rank: int) -> Memory:
        return worker_memory(self.shape, method, self.local_experts(method)[rank],
                             SyncFootprint.of(self.buckets(method), rank), self.hardware, self.training)

    def worst_memory(self, method: str) -> Memory:
        """The worker with the highest peak (the one that must fit)."""
        key = ("memory", _check_method(method))
        if key not in self._cache:
            local = self.local_experts(method)
            # the ranks with the most experts; among them the sync buffers decide
            ranks = [r for r, n in enumerate(local) if n == max(local)]
            self._cache[key] = max((self.memory(method, r) for r in ranks), key=lambda mem: mem.peak)
        return self._cache[key]

    def fits(self, method: str) -> bool:
        return self.worst_memory(method).peak_per_gpu <= self.hardware.gpu_memory_gib * GiB

    # ---- time -------------------------------------------------------------------------------

    @property
    def tokens_per_step(self) -> int:
        """Tokens one worker trains per inner step."""
        t = self.training
        return t.micro_batch * t.seq_len * t.grad_accum * self.hardware.gpus_per_worker

    def kept_fraction(self, method: str) -> float:
        """Share of expert assignments the slowest worker computes (skip-token drops the rest,
        assuming balanced routing)."""
        if method != "fomoe" or self.training.skip_policy == "reroute":
            return 1.0
        return max(self.local_experts("fomoe")) / (self.shape.moe_layers * self.shape.num_experts)

    def step_seconds(self, method: str) -> float:
        """Compute time of one inner step of the slowest worker."""
        seq = self.training.seq_len
        flops = self.shape.train_flops_per_token(seq, self.kept_fraction(method))
        hw = self.hardware
        if hw.tokens_per_s:
            return self.tokens_per_step / hw.tokens_per_s * flops / self.shape.train_flops_per_token(seq)
        return self.tokens_per_step * flops / (hw.tflops * 1e12 * hw.gpus_per_worker)

    def bucket_costs(self, method: str) -> list[BucketCost]:
        key = ("costs", _check_method(method))
        if key not in self._cache:
            self._cache[key] = [BucketCost.of(b) for b in self.buckets(method)]
        return self._cache[key]

    def comm_seconds(self, method: str, bandwidth_gbps: float | None = None, commit_barrier: bool = False) -> float:
        """Communication time of one sync (``sync_seconds``: the critical path through the
        schedule; ``commit_barrier`` for the fault-tolerant TCP transport's end-of-round barrier)."""
        return sync_seconds(self.bucket_costs(method), self.workers, self.link, bandwidth_gbps, commit_barrier)

    def _window(self, method: str) -> float:
        """Compute that one sync's communication can hide behind."""
        step = self.step_seconds(method)
        return step if method == "ddp" else self.federation.sync_every * step

    def exposed_comm_seconds(self, method: str, bandwidth_gbps: float | None = None) -> float:
        return max(0.0, self.comm_seconds(method, bandwidth_gbps) - self.link.overlap * self._window(method))

    def round_seconds(self, method: str, bandwidth_gbps: float | None = None) -> float:
        """Wall-clock of H inner steps and their communication."""
        H, step = self.federation.sync_every, self.step_seconds(method)
        syncs = H if method == "ddp" else 1
        return H * step + syncs * self.exposed_comm_seconds(method, bandwidth_gbps)

    @property
    def rounds_to_budget(self) -> float:
        return self.training.token_budget / (self.workers * self.tokens_per_step * self.federation.sync_every)

    def seconds_to_budget(self, method: str, bandwidth_gbps: float | None = None) -> float:
        return self.rounds_to_budget * self.round_seconds(method, bandwidth_gbps)

    def bandwidth_for(self, method: str, comm_share: float = 0.05) -> float:
        """Gbit/s above which exposed communication stays under ``comm_share`` of compute
        (inf when latency alone exceeds it)."""
        window = self._window(method)
        budget = comm_share * window + self.link.overlap * window
        time_at = lambda bw: self.comm_seconds(method, bw)   # noqa: E731 (decreasing in bw)
        if time_at(math.inf) >= budget:
            return math.inf if time_at(math.inf) > 0 or budget < 0 else 0.0
        if time_at(1e-12) <= budget:   # nothing crosses the link
            return 0.0
        # The critical path is piecewise linear in 1/bandwidth: bisect (in log space) for the
        # bandwidth at which it meets the budget.
        lo, hi = 1e-12, 1.0
        while time_at(hi) > budget:
            lo, hi = hi, hi * 1e3
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if time_at(mid) > budget:
                lo = mid
            else:
                hi = mid
            if hi / lo < 1 + 1e-12:
                break
        return hi

    # ---- summaries ----------------------------------------------------------------------------

    def method_summary(self, method: str, comm_share: float = 0.05) -> dict:
        traffic = self.traffic(method)
        worst = max(traffic, key=lambda t: (t.sent, t.recv))
        H = self.federation.sync_every
        syncs_per_round = H if method == "ddp" else 1
        mem = self.worst_memory(method)
        held = self.params_held(method)
        return {
            "params_held_max": max(held),
            "params_held_min": min(held),
            "dense_params_held": self.shape.dense_params(),
            "expert_params_held_max": max(held) - self.shape.dense_params(),
            "bytes_sent_per_worker_per_sync": worst.sent,
            "bytes_recv_per_worker_per_sync": worst.recv,
            "bytes_sent_per_rank_per_sync": [t.sent for t in traffic],
            "bytes_recv_per_rank_per_sync": [t.recv for t in traffic],
            "messages_per_sync": worst.messages,
            "syncs_per_round": syncs_per_round,
            "bytes_sent_per_worker_per_round": worst.sent * syncs_per_round,
            "bytes_sent_per_token": worst.sent * syncs_per_round / (H * self.tokens_per_step),
            "bytes_sent_total_per_round": sum(t.sent for t in traffic) * syncs_per_round,
            "memory_per_worker_bytes": mem.peak,
            "memory_per_gpu_bytes": mem.peak_per_gpu,
            "fits": self.fits(method),
            "memory": mem.to_dict(),
            "kept_fraction": self.kept_fraction(method),
            "step_seconds": self.step_seconds(method),
            "comm_seconds_per_sync": self.comm_seconds(method),
            "exposed_comm_seconds_per_round": self.round_seconds(method) - H * self.step_seconds(method),
            "round_seconds": self.round_seconds(method),
            "seconds_to_budget": self.seconds_to_budget(method),
            "bandwidth_gbps_for_comm_share": self.bandwidth_for(method, comm_share),
        }

    def to_dict(self, comm_share: float = 0.05, fit_budget_gib: float | None = None) -> dict:
        s = self.shape
        methods = {m: self.method_summary(m, comm_share) for m in METHODS}
        return {
            "preset": self.name,
            "model": s.to_dict(),
            "params_total": s.total_params(),
            "params_active": s.active_params(),
            "params_dense": s.dense_params(),
            "params_expert": s.expert_params(),
            "federation": asdict(self.federation) | {"replication": self.replication},
            "hardware": asdict(self.hardware),
            "link": asdict(self.link),
            "training": asdict(self.training) | {"tokens_per_step_per_worker": self.tokens_per_step},
            "comm_share": comm_share,
            "methods": methods,
            "savings": _savings(methods),
            "planning": self.fit(fit_budget_gib),
        }

    # ---- the planning question ----------------------------------------------------------------

    def fit(self, budget_gib: float | None = None, r_values: Sequence[int] = (1, 2, 3, 4)) -> dict:
        """The planning question, for a memory budget per GPU: the smallest W (>= 2) that fits
        fomoe at each replication r, the largest r that fits at this plan's W, whether diloco
        (full replicas) fits, and fomoe's comm savings vs diloco at those points."""
        budget_gib = self.hardware.gpu_memory_gib if budget_gib is None else budget_gib
        plan = self.with_(gpu_memory_gib=budget_gib)
        rows = []
        for r in r_values:
            W = plan._smallest_workers(r)
            row = {"r": r, "workers": W}
            if W is not None:
                row.update(_fit_row(plan.with_(workers=W, placement=_replicated(r, W))))
            rows.append(row)
        at_w = None
        E, W = self.shape.num_experts, self.workers
        for r in range(W, 0, -1):
            if r * E < W:
                break
            if plan._fits_replicated(W, r, estimate=True) and plan._fits_replicated(W, r):
                at_w = {"r": r, **_fit_row(plan.with_(placement=_replicated(r, W)))}
                break
        return {"budget_gib_per_gpu": budget_gib, "smallest_workers": rows, "at_workers": W,
                "largest_r_at_workers": at_w, "diloco_fits": plan.fits("diloco")}

    def _fits_replicated(self, W: int, r: int, estimate: bool = False) -> bool:
        """Whether fomoe with each expert on r of W workers (cyclic) fits the GPU memory."""
        budget = self.hardware.gpu_memory_gib * GiB
        if estimate:
            return self._estimated_memory(W, r).peak_per_gpu <= budget
        p = self.with_(workers=W, placement=_replicated(r, W))
        # a full placement is diloco's: same schedule and memory, without a W-wide holder map
        return p.fits("diloco" if r >= W else "fomoe")

    def _estimated_memory(self, W: int, r: int) -> Memory:
        """fomoe memory under a cyclic placement without building it: ceil(E r / W) experts per
        layer on the busiest worker, its sync buckets bounded by its dense block or its experts."""
        s, comp = self.shape, self.federation.compression
        if r >= W:
            local, largest = s.moe_layers * s.num_experts, s.total_params()
            residual = largest if comp and W > 1 else 0
        else:
            local = s.moe_layers * -(-s.num_experts * r // W)
            experts = local * s.expert_numel()
            largest = max(s.dense_params(), experts)
            residual = ((s.dense_params() if W > 1 else 0) + (experts if r > 1 else 0)) if comp else 0
        # the largest bucket's holder group: every worker for the dense block, r for experts
        group = W if r >= W or largest == s.dense_params() else r
        footprint = SyncFootprint(largest, residual, largest if comp else 0, group if comp else 0,
                                  comm.bucket_compression(comp, group))
        return worker_memory(s, "fomoe", local, footprint, self.hardware, self.training)

    def _smallest_workers(self, r: int) -> int | None:
        """Smallest W (2 <= W, r <= W <= E*r) at which fomoe with replication r fits, or None.
        Memory falls as W grows (fewer experts per worker): search on the estimate, then
        confirm on the real placement and step to the true boundary."""
        lo, hi = max(r, 2), self.shape.num_experts * r
        if hi < lo or not self._fits_replicated(hi, r, estimate=True):
            return None
        a, b = lo, hi
        while a < b:
            mid = (a + b) // 2
            if self._fits_replicated(mid, r, estimate=True):
                b = mid
            else:
                a = mid + 1
        W = a
        while W <= hi and not self._fits_replicated(W, r):
            W += 1
        if W > hi:
            return None
        while W - 1 >= lo and self._fits_replicated(W - 1, r):
            W -= 1
        return W

    # ---- output -------------------------------------------------------------------------------

    def table(self, comm_share: float = 0.05, fit_budget_gib: float | None = None) -> str:
        return format_table(self.to_dict(comm_share, fit_budget_gib), self)


def _replicated(r: int, W: int) -> str:
    return "full" if r == W else f"replicated:{r}"


def _fit_row(p: Plan) -> dict:
    fo, di = p.method_summary("fomoe"), p.method_summary("diloco")
    return {"memory_per_gpu_bytes": fo["memory_per_gpu_bytes"],
            "bytes_sent_per_worker_per_round": fo["bytes_sent_per_worker_per_round"],
            "diloco_bytes_sent_per_worker_per_round": di["bytes_sent_per_worker_per_round"],
            "comm_savings_vs_diloco": _ratio(di["bytes_sent_per_worker_per_round"],
                                             fo["bytes_sent_per_worker_per_round"])}


def _ratio(num: float, den: float) -> float | None:
    return None if not den else num / den


def _savings(methods: dict) -> dict:
    fo, di, dd = (methods[m] for m in ("fomoe", "diloco", "ddp"))
    key = "bytes_sent_per_worker_per_round"
    return {"fomoe_vs_diloco_bytes": _ratio(di[key], fo[key]), "fomoe_vs_ddp_bytes": _ratio(dd[key], fo[key]),
            "diloco_vs_ddp_bytes": _ratio(dd[key], di[key]),
            "fomoe_vs_diloco_memory": _ratio(di["memory_per_worker_bytes"], fo["memory_per_worker_bytes"])}


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise PlanError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


# ---- presets ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    """Parameter counts a model's authors published, with the precision they gave (the unit of
    the last digit) and whether their active count includes the input embedding table."""

    total: float
    total_unit: float
    active: float
    active_unit: float
    active_includes_input_embedding: bool = True
    source: str = ""

    @staticmethod
    def agrees(count: int, published: float, unit: float, tolerance: float = 0.01) -> bool:
        """Within ``tolerance`` of the published figure, or rounding to it at its precision."""
        return abs(count - published) <= max(tolerance * published, unit / 2)


@dataclass(frozen=True)
class Preset:
    name: str
    shape: ModelShape
    description: str
    federation: Federation = Federation()
    hardware: Hardware = Hardware()
    training: Training = Training()
    published: Published | None = None

    def plan(self, **changes) -> Plan:
        p = Plan(self.shape, self.federation, self.hardware, Link(), self.training, name=self.name)
        return p.with_(**changes) if changes else p


def _published_presets() -> dict[str, Preset]:
    big_fed = Federation(workers=8, placement="replicated:2", sync_every=100)
    node = Hardware(gpus_per_worker=8, recompute=True)
    long_run = Training(micro_batch=1, seq_len=4096, grad_accum=8, token_budget=1e12)
    presets = [
        Preset("mixtral-8x7b", ModelShape(
            n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, attention="gqa", vocab_size=32000,
            tied_embeddings=False, num_experts=8, top_k=2, expert_d_ff=14336),
            "Mixtral 8x7B (Mistral AI): 8 experts top-2, GQA",
            federation=replace(big_fed, workers=4), hardware=node, training=long_run,
            published=Published(46.7e9, 0.1e9, 12.9e9, 0.1e9, True,
                                "mistral.ai 'Mixtral of experts' (46.7B total, 12.9B per token)")),
        Preset("mixtral-8x22b", ModelShape(
            n_layers=56, d_model=6144, n_heads=48, n_kv_heads=8, attention="gqa", vocab_size=32000,
            tied_embeddings=False, num_experts=8, top_k=2, expert_d_ff=16384),
            "Mixtral 8x22B v0.1 (Mistral AI): 8 experts top-2, GQA",
            federation=replace(big_fed, workers=4), hardware=node, training=long_run,
            published=Published(141e9, 1e9, 39e9, 1e9, True, "mistral.ai 'Mixtral 8x22B' (141B total, 39B active)")),
        Preset("deepseek-v3", ModelShape(
            n_layers=61, d_model=7168, n_heads=128, attention="mla", q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280, tied_embeddings=False,
            num_experts=256, top_k=8, expert_d_ff=2048, shared_experts=1, dense_layers=3, dense_d_ff=18432,
            router_bias=True, score="sigmoid"),
            "DeepSeek-V3 main model (no MTP module): MLA, 256 routed experts top-8 + 1 shared, first 3 layers dense",
            federation=replace(big_fed, workers=16), hardware=node, training=long_run,
            published=Published(671e9, 1e9, 36.6e9, 0.1e9, False,
                                "DeepSeek-V3 README_WEIGHTS (671B main model, 36.6B activated incl. output head)")),
        Preset("qwen3-235b-a22b", ModelShape(
            n_layers=94, d_model=4096, n_heads=64, n_kv_heads=4, head_dim=128, attention="gqa", qk_norm="head",
            vocab_size=151936, tied_embeddings=False, num_experts=128, top_k=8, expert_d_ff=1536),
            "Qwen3-235B-A22B: 128 experts top-8, GQA 64/4 with per-head q/k norms",
            federation=big_fed, hardware=node, training=long_run,
            published=Published(235e9, 1e9, 22e9, 1e9, True, "Qwen3 model card (235B total, 22B activated)")),
        Preset("olmoe-1b-7b", ModelShape(
            n_layers=16, d_model=2048, n_heads=16, attention="mha", qk_norm="full", vocab_size=50304,
            tied_embeddings=False, num_experts=64, top_k=8, expert_d_ff=1024),
            "OLMoE-1B-7B (AI2): 64 experts top-8, q/k norms",
            federation=Federation(workers=8, placement="replicated:2", sync_every=100),
            training=Training(micro_batch=4, seq_len=4096, grad_accum=2, token_budget=5e12),
            published=Published(6.9e9, 0.1e9, 1.3e9, 0.1e9, True, "OLMoE paper (6.9B total, 1.3B active)")),
        Preset("fomoe-100b", ModelShape(
            n_layers=40, d_model=4096, n_heads=32, n_kv_heads=8, attention="gqa", vocab_size=65536,
            tied_embeddings=False, num_experts=64, top_k=4, expert_d_ff=3072, shared_experts=1),
            "fomoe's own 100B MoE: 64 experts top-4 + 1 shared, GQA, sized for federations of 8-64 workers",
            federation=big_fed, hardware=node, training=long_run),
    ]
    return {p.name: p for p in presets}


def _proxy_presets() -> dict[str, Preset]:
    """The LM presets ``fomoe train`` builds (``fomoe.lm.PRESETS``), mirrored one to one."""
    from . import lm
    out = {}
    for name, cfg in lm.PRESETS.items():
        out[name] = Preset(name, ModelShape.from_lm_config(cfg),
                           f"fomoe.lm preset '{name}' (what fomoe train builds)",
                           federation=Federation(workers=4, placement="replicated:2", sync_every=10),
                           training=Training(micro_batch=8, seq_len=cfg.max_seq_len, token_budget=1e9))
    return out


def presets() -> dict[str, Preset]:
    """Every preset: the trained proxies first, then the published MoE shapes."""
    out = _proxy_presets()
    for name, p in _published_presets().items():
        if name in out:
            raise RuntimeError(f"preset name {name!r} is both an LM preset and a published shape")
        out[name] = p
    return out


def preset(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise PlanError(f"unknown preset {name!r}; choose one of {', '.join(table)} (fomoe plan --list)")
    return table[name]


# ---- formatting ---------------------------------------------------------------------------------

def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{n:.3g} B"


def _fmt_seconds(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "-"
    if math.isinf(s):
        return "never"
    for unit, div in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3),
                      ("µs", 1e-6)):
        if s >= div:
            return f"{s / div:.3g} {unit}"
    return f"{s:.2g} s"


def _fmt_bandwidth(gbps: float) -> str:
    if math.isinf(gbps):
        return "never (latency-bound)"
    if gbps >= 1:
        return f"{gbps:.3g} Gbit/s"
    return f"{gbps * 1e3:.3g} Mbit/s"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def format_table(d: dict, plan: Plan) -> str:
    """The summary a user reads in a minute."""
    s, fed = plan.shape, plan.federation
    H = fed.sync_every
    lines = [
        f"fomoe plan: {d['preset']} — {_fmt_count(d['params_total'])} parameters "
        f"({_fmt_count(d['params_active'])} active), {s.describe()}",
        f"federation: {fed.describe()} (mean r = {plan.replication:.3g})",
        f"hardware: {plan.hardware.describe()}; {plan.link.describe()}",
        f"training: {plan.tokens_per_step:,} tokens per worker per step "
        f"({plan.training.micro_batch} x {plan.training.seq_len} per GPU x {plan.training.grad_accum} accumulation), "
        f"budget {_fmt_count(plan.training.token_budget)} tokens",
        "",
    ]
    head = ["method", "params/worker", "peak mem/GPU", "fits", "sent/worker/sync", f"sent/round (H={H})",
            "bytes/token", "step", "comm/round", "round", f"to {_fmt_count(plan.training.token_budget)} tok"]
    rows = [head]
    for m in METHODS:
        x = d["methods"][m]
        rows.append([m, _fmt_count(x["params_held_max"]), _fmt_bytes(x["memory_per_gpu_bytes"]),
                     "yes" if x["fits"] else "NO", _fmt_bytes(x["bytes_sent_per_worker_per_sync"]),
                     _fmt_bytes(x["bytes_sent_per_worker_per_round"]), _fmt_bytes(x["bytes_sent_per_token"]),
                     _fmt_seconds(x["step_seconds"]), _fmt_seconds(x["exposed_comm_seconds_per_round"]),
                     _fmt_seconds(x["round_seconds"]), _fmt_seconds(x["seconds_to_budget"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    sv = d["savings"]
    lines += ["",
              f"traffic per worker per round: diloco / fomoe = {_fmt_ratio(sv['fomoe_vs_diloco_bytes'])}, "
              f"ddp / fomoe = {_fmt_ratio(sv['fomoe_vs_ddp_bytes'])}; peak memory per worker: diloco / fomoe = "
              f"{_fmt_ratio(sv['fomoe_vs_diloco_memory'])}",
              f"communication stays under {d['comm_share']:.0%} of compute above: "
              + ", ".join(f"{m} {_fmt_bandwidth(d['methods'][m]['bandwidth_gbps_for_comm_share'])}" for m in METHODS)]
    fo = d["methods"]["fomoe"]["memory"]
    lines.append("fomoe worker memory: " + ", ".join(
        f"{k.replace('_', ' ')} {_fmt_bytes(fo[k])}" for k in ("weights", "grads", "optimizer", "theta_global",
                                                              "outer_momentum", "activations", "logits")
        if fo[k]) + (f"; host {_fmt_bytes(fo['host'])}" if fo["host"] else ""))
    pl = d["planning"]
    fit_parts = []
    for row in pl["smallest_workers"]:
        if row["workers"] is None:
            fit_parts.append(f"r={row['r']}: never")
        else:
            fit_parts.append(f"r={row['r']}: W={row['workers']} ({_fmt_bytes(row['memory_per_gpu_bytes'])}/GPU, "
                             f"diloco sends {_fmt_ratio(row['comm_savings_vs_diloco'])})")
    lines.append(f"planning, {pl['budget_gib_per_gpu']:g} GiB per GPU — smallest W that fits fomoe: "
                 + "; ".join(fit_parts))
    at = pl["largest_r_at_workers"]
    lines.append(f"  at W={pl['at_workers']}: " + (
        f"r up to {at['r']} fits (diloco sends {_fmt_ratio(at['comm_savings_vs_diloco'])} the bytes)"
        if at else "no replication fits")
        + f"; diloco (full replicas) {'fits' if pl['diloco_fits'] else 'does not fit'}")
    return "\n".join(lines)


def format_presets() -> str:
    rows = [["preset", "total", "active", "published", "description"]]
    for name, p in presets().items():
        pub = p.published
        rows.append([name, _fmt_count(p.shape.total_params()),
                     _fmt_count(p.shape.active_params(pub.active_includes_input_embedding if pub else True)),
                     f"{_fmt_count(pub.total)} / {_fmt_count(pub.active)}" if pub else "-", p.description])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


# ---- plots ----------------------------------------------------------------------------------------

def write_plots(plan: Plan, out_dir: str | Path, r_values: Sequence[int] = (1, 2, 4),
                comm_share: float = 0.05) -> list[Path]:
    """PNG plots: bytes per worker per round and peak memory per GPU vs W for several r;
    wall-clock to the token budget vs link bandwidth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    E, H = plan.shape.num_experts, plan.federation.sync_every
    grid = sorted({2 ** i for i in range(1, 9)} | {plan.workers})
    paths = []

    fig, (ax_b, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    full = [W for W in grid if W <= E * max(r_values) or W == plan.workers]
    per_w = {W: plan.with_(workers=W, placement="full") for W in full if W >= 1}
    ax_b.plot(full, [per_w[W].method_summary("ddp")["bytes_sent_per_worker_per_round"] for W in full],
              "k:", marker="s", label=f"ddp (x{H} steps)")
    ax_b.plot(full, [per_w[W].method_summary("diloco")["bytes_sent_per_worker_per_round"] for W in full],
              "k--", marker="o", label="diloco")
    ax_m.plot(full, [per_w[W].worst_memory("diloco").peak_per_gpu / GiB for W in full], "k--", marker="o",
              label="diloco / ddp (full replica)")
    for r in r_values:
        Ws = [W for W in grid if r <= W <= E * r and W > r]
        if not Ws:
            continue
        plans = [plan.with_(workers=W, placement=_replicated(r, W)) for W in Ws]
        ax_b.plot(Ws, [p.method_summary("fomoe")["bytes_sent_per_worker_per_round"] for p in plans], marker="^",
                  label=f"fomoe r={r}")
        ax_m.plot(Ws, [p.worst_memory("fomoe").peak_per_gpu / GiB for p in plans], marker="^", label=f"fomoe r={r}")
    ax_m.axhline(plan.hardware.gpu_memory_gib, color="red", lw=1, label="GPU memory")
    for ax, title, ylabel in ((ax_b, "bytes sent per worker per round", "bytes"),
                              (ax_m, "peak memory per GPU", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers W")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{plan.name}: {_fmt_count(plan.shape.total_params())} params, H={H}")
    fig.tight_layout()
    path = out / f"plan_{plan.name}_bytes_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bws = [10 ** (e / 8) for e in range(-24, 25)]   # 1 Mbit/s .. 1 Tbit/s
    for m, style in (("ddp", "k:"), ("diloco", "k--"), ("fomoe", "C0-")):
        ax.plot(bws, [plan.seconds_to_budget(m, bw) / 3600 for bw in bws], style, label=m)
    ax.axvline(plan.link.bandwidth_gbps, color="gray", lw=1, label=f"link ({_fmt_bandwidth(plan.link.bandwidth_gbps)})")
    compute = plan.rounds_to_budget * plan.federation.sync_every * plan.step_seconds("fomoe") / 3600
    ax.axhline(compute, color="C0", lw=0.8, alpha=0.5, label="fomoe compute only")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link bandwidth per worker (Gbit/s)")
    ax.set_ylabel(f"hours to {_fmt_count(plan.training.token_budget)} tokens")
    ax.set_title(f"{plan.name}: W={plan.workers}, {plan.federation.placement}, latency {plan.link.latency_ms:g} ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"plan_{plan.name}_wallclock.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


# ---- command line -------------------------------------------------------------------------------

def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``plan`` to a CLI's subparsers; the parsed args run with ``args.func(args)``."""
    p = subparsers.add_parser("plan", help="memory, bytes and wall-clock projections per worker",
                              description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (see --list; default tiny)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the plan as JSON to PATH ('-' or no PATH: to stdout instead of the table)")
    p.add_argument("--plot-dir", metavar="DIR", help="write PNG plots there")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set num_experts=64 (repeatable; fields: "
                        + ", ".join(f.name for f in fields(ModelShape)) + ")")
    g = p.add_argument_group("federation")
    g.add_argument("-W", "--workers", type=int)
    g.add_argument("--r", type=int, help="fomoe replication: each expert on r workers (sets --placement)")
    g.add_argument("--placement", help="fomoe placement spec: replicated:R[:random], partition, full or a JSON file")
    g.add_argument("-H", "--sync-every", type=int, help="inner steps per outer sync")
    g.add_argument("--compression", choices=("none", "bf16", "int8", "auto"),
                   help="pseudo-gradient wire format (auto: per holder group the cheaper of int8 and bf16)")
    g.add_argument("--weighted", action="store_true", default=None, help="token-weighted expert averaging")
    g = p.add_argument_group("hardware")
    g.add_argument("--gpu-memory-gib", type=float)
    g.add_argument("--gpus-per-worker", type=int)
    g.add_argument("--tflops", type=float, help="achieved training TFLOP/s per GPU")
    g.add_argument("--tokens-per-s", type=float, help="measured tokens/s per worker (all experts resident)")
    g.add_argument("--param-dtype", choices=("fp32", "bf16"), help="weights / grads / optimizer dtype")
    g.add_argument("--no-autocast", action="store_true", default=None, help="train without bf16 autocast")
    g.add_argument("--global-on", choices=("gpu", "host"), help="where θ_global and outer momentum live")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing per layer")
    g = p.add_argument_group("link")
    g.add_argument("--bandwidth-gbps", type=float, help="per-worker link bandwidth, Gbit/s")
    g.add_argument("--latency-ms", type=float)
    g.add_argument("--overlap", type=float, help="share of communication hidden behind compute (0..1)")
    g.add_argument("--loss", type=float, help="TCP segment loss rate (each loss costs one round trip)")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch", type=int, help="sequences per GPU per forward")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--tokens", type=float, help="token budget of the federation")
    g.add_argument("--skip-policy", choices=SKIP_POLICIES)
    g = p.add_argument_group("planning")
    g.add_argument("--memory-budget-gib", type=float, help="memory per GPU for the planning question "
                                                           "(default: --gpu-memory-gib)")
    g.add_argument("--comm-share", type=float, default=0.05,
                   help="communication counts as negligible below this share of compute (default 0.05)")


def _parse_value(text: str, current):
    if isinstance(current, bool) or text.lower() in ("true", "false"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise PlanError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int) or (current is None and text.lstrip("-").isdigit()):
        return int(text)
    if text.lower() == "none":
        return None
    return text


def plan_from_args(args: argparse.Namespace) -> Plan:
    base = preset(args.preset)
    shape = base.shape
    if args.set:
        changes = {}
        names = {f.name: f for f in fields(ModelShape)}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or key not in names:
                raise PlanError(f"--set expects FIELD=VALUE with FIELD one of {', '.join(names)}; got {item!r}")
            try:
                changes[key] = _parse_value(value, getattr(shape, key))
            except ValueError as exc:
                raise PlanError(f"--set {item}: {exc}") from exc
        shape = replace(shape, **changes)
    plan = Plan(shape, base.federation, base.hardware, Link(), base.training, name=base.name)
    if args.r is not None and args.placement is not None:
        raise PlanError("give --r or --placement, not both")
    changes = {}
    for key in ("workers", "sync_every", "weighted", "gpu_memory_gib", "gpus_per_worker", "tflops", "tokens_per_s",
                "global_on", "recompute", "bandwidth_gbps", "latency_ms", "overlap", "loss", "micro_batch", "seq_len",
                "grad_accum", "skip_policy", "placement"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.compression is not None:
        changes["compression"] = None if args.compression == "none" else args.compression
    if args.param_dtype is not None:
        changes["param_bytes"] = 4 if args.param_dtype == "fp32" else 2
    if args.no_autocast:
        changes["autocast_bf16"] = False
    if args.tokens is not None:
        changes["token_budget"] = args.tokens
    if args.r is not None:
        changes["placement"] = _replicated(args.r, changes.get("workers", base.federation.workers))
    return plan.with_(**changes) if changes else plan


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(format_presets())
        return 0
    try:
        plan = plan_from_args(args)
        if not 0 < args.comm_share < 1:
            raise PlanError(f"--comm-share must be in (0, 1), got {args.comm_share}")
        result = plan.to_dict(args.comm_share, args.memory_budget_gib)
    except (PlanError, PlacementError, ValueError) as exc:
        print(f"fomoe plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1, default=_json_default)
        print()
    else:
        print(format_table(result, plan))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
            print(f"\nwrote {args.json}")
    if args.plot_dir:
        for path in write_plots(plan, args.plot_dir, comm_share=args.comm_share):
            print(f"wrote {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def _json_default(x):
    if isinstance(x, float) and math.isinf(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomoe plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
