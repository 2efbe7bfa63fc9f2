"""Typed Python entry points of the fomoe op library, with fake kernels and autograd.

The ops themselves (``torch.ops.fomoe.*``) are defined in C++ (csrc/registration.cpp) with
CPU kernels always, CUDA kernels when the extension was built with CUDA, and their autograd
formulas (csrc/autograd.cpp). This module registers their fake (meta) kernels for
``torch.compile`` and, where a build lacks a device kernel, a fallback to ``fomoe.reference``
that warns once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (the op library must be loaded first)
from . import reference

_ops = torch.ops.fomoe
OP_NAMES = ("router_logits", "router_logits_backward", "route", "route_backward", "dispatch", "gather", "combine",
            "combine_gate_grad", "grouped_mm", "grouped_mm_wgrad", "expert_ffn", "expert_ffn_backward", "rotary",
            "rms_norm", "rms_norm_backward")


# ---- public entry points -----------------------------------------------------------------

def route(logits: Tensor, top_k: int, score: str = "softmax", renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (gate weights [T, k] fp32, expert ids [T, k] int32)."""
    return _ops.route(logits, top_k, score, renormalize)


def dispatch(ids: Tensor, resident_map: Tensor, num_local: int) -> tuple[Tensor, Tensor, Tensor]:
    """Expert ids [T, k] -> (permutation [T*k], offsets [num_local+1], inverse [T, k]), all int32.

    Assignments to experts with ``resident_map[e] == -1`` are skipped (skip-token); the kept
    count is ``offsets[-1]``. int64 ids (e.g. from ``torch.topk``) are accepted.
    """
    if ids.dtype == torch.int64:
        ids = ids.to(torch.int32)
    return _ops.dispatch(ids, resident_map, num_local)


def gather(x: Tensor, permutation: Tensor, inverse: Tensor, scale: Tensor | None = None) -> Tensor:
    """Token rows into expert order: out[j] = scale[perm[j]] * x[perm[j] // k]."""
    return _ops.gather(x, permutation, inverse, scale)


def combine(rows: Tensor, permutation: Tensor, inverse: Tensor, gate: Tensor | None = None) -> Tensor:
    """Expert-order rows back to tokens: y[t] = sum_s gate[t, s] * rows[inverse[t, s]]."""
    return _ops.combine(rows, permutation, inverse, gate)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """a [N, K] x b [E, K, M] -> [N, M], expert e on rows [offsets[e], offsets[e+1])."""
    return _ops.grouped_mm(a, b, offsets)


def grouped_mm_wgrad(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """a [N, K], b [N, M] -> [E, K, M] with out[e] = a_e^T b_e (the weight gradient)."""
    return _ops.grouped_mm_wgrad(a, b, offsets)


def expert_ffn(x: Tensor, permutation: Tensor, offsets: Tensor, inverse: Tensor, w13: Tensor, w2: Tensor,
               gate: Tensor) -> Tensor:
    """Fused gather -> x@W13 -> SwiGLU -> @W2 -> gate-weighted combine; returns y [T, d]."""
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w13, w2, gate))
    y, _ = _ops.expert_ffn(x, permutation, offsets, inverse, w13, w2, gate, save)
    return y


def rotary(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotary position embedding of x [B, S, H, D] (any strides) with tables [S, D/2]: channel
    pairs (i, i + D/2) rotated by the angle whose cos and sin the tables hold, in fp32."""
    return _ops.rotary(x, cos, sin, inverse)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm over the last dim, ``x * rsqrt(mean(x^2) + eps) * weight``, in fp32, returned in
    ``out_dtype`` (default x's): under autocast, pass the autocast dtype to get the copy the next
    GEMM reads without a separate cast."""
    return _ops.rms_norm(x, None, weight, eps, out_dtype)[1]


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float = 1e-6,
                 out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The residual add and the next RMSNorm in one pass: ``s = x + delta`` (in x's dtype; delta
    may be narrower, e.g. a bf16 sublayer output on an fp32 stream) and ``rms_norm(s)`` in
    ``out_dtype``. Returns (s, normed)."""
    return _ops.rms_norm(x, delta, weight, eps, out_dtype)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """Router logits ``x @ weight.T`` [..., E] in fp32 (fp64 for fp64 x), under autocast or not.

    A bf16 x (what an MoE layer's experts read under autocast) is not widened on a GPU: the
    fp32 weight goes in as three bf16 pieces that sum to it exactly, so every product is exact
    in a bf16 GEMM's fp32 accumulators, on tensor cores (an fp32 GEMM runs on the far slower
    FMA units). The logits then carry only the accumulators' rounding: a few units of fp32
    rounding (5.5 at d = 1024 on an H200, where an fp32 GEMM makes 1.5 and a bf16 copy of the
    weights hundreds). x's gradient comes back in x's dtype (one rounding of the fp32 sum),
    the weight's in the weight's dtype. Either way the op keeps x itself for backward, not a
    widened copy.
    """
    logits = _ops.router_logits(x.reshape(-1, x.shape[-1]), weight)
    return logits.view(*x.shape[:-1], weight.shape[0])


# ---- fake kernels (shapes and dtypes only) --------------------------------------------------

def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fomoe::router_logits")
def _router_logits_fake(x, weight):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: "fomoe.router_logits: x must be [tokens, d] and weight [experts, d]")
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=_accum(x.dtype))


@torch.library.register_fake("fomoe::router_logits_backward")
def _router_logits_backward_fake(grad, x, weight, output_mask):
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            weight.new_empty(weight.shape if output_mask[1] else (0,)))


@torch.library.register_fake("fomoe::route")
def _route_fake(logits, top_k, score="softmax", renormalize=True):
    torch._check(logits.dim() == 2, lambda: "fomoe.route: logits must be 2-D [tokens, experts]")
    torch._check(1 <= top_k <= logits.shape[1], lambda: "fomoe.route: top_k must be in [1, num_experts]")
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=_accum(logits.dtype)), logits.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("fomoe::route_backward")
def _route_backward_fake(grad_weights, logits, weights, ids, score, renormalize):
    return torch.empty_like(logits)


@torch.library.register_fake("fomoe::dispatch")
def _dispatch_fake(ids, resident_map, num_local):
    n = ids.shape[0] * ids.shape[1]
    return (ids.new_empty((n,), dtype=torch.int32), ids.new_empty((num_local + 1,), dtype=torch.int32),
            ids.new_empty(ids.shape, dtype=torch.int32))


@torch.library.register_fake("fomoe::gather")
def _gather_fake(x, permutation, inverse, scale=None):
    return x.new_empty((permutation.shape[0], x.shape[1]))


@torch.library.register_fake("fomoe::combine")
def _combine_fake(rows, permutation, inverse, gate=None):
    return rows.new_empty((inverse.shape[0], rows.shape[1]))


@torch.library.register_fake("fomoe::combine_gate_grad")
def _combine_gate_grad_fake(grad_out, rows, inverse):
    return rows.new_empty(inverse.shape, dtype=_accum(rows.dtype))


@torch.library.register_fake("fomoe::grouped_mm")
def _grouped_mm_fake(a, b, offsets):
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.register_fake("fomoe::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(a, b, offsets):
    return a.new_empty((offsets.shape[0] - 1, a.shape[1], b.shape[1]))


@torch.library.register_fake("fomoe::expert_ffn")
def _expert_ffn_fake(x, permutation, offsets, inverse, w13, w2, gate, save_for_backward):
    h = x.new_empty((permutation.shape[0], w13.shape[2])) if save_for_backward else x.new_empty((0,))
    return x.new_empty(x.shape), h


@torch.library.register_fake("fomoe::expert_ffn_backward")
def _expert_ffn_backward_fake(grad_y, x, permutation, offsets, inverse, w13, w2, gate, h, weight_grad_dtype=None):
    dtype = weight_grad_dtype or w13.dtype
    return (torch.empty_like(x), torch.empty_like(w13, dtype=dtype), torch.empty_like(w2, dtype=dtype),
            torch.empty_like(gate))


@torch.library.register_fake("fomoe::rotary")
def _rotary_fake(x, cos, sin, inverse=False):
    torch._check(x.dim() == 4 and x.shape[3] % 2 == 0, lambda: "fomoe.rotary: x must be [B, S, H, even D]")
    return x.new_empty(x.shape)


@torch.library.register_fake("fomoe::rms_norm")
def _rms_norm_fake(x, delta, weight, eps, out_dtype=None):
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1], lambda: "fomoe.rms_norm: weight must be [d]")
    s = x.new_empty(x.shape) if delta is not None else x.new_empty((0,))
    return s, x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.register_fake("fomoe::rms_norm_backward")
def _rms_norm_backward_fake(grad_normed, grad_sum, s, weight, eps, delta_dtype=None):
    grad_delta = s.new_empty(s.shape, dtype=delta_dtype) if delta_dtype is not None else s.new_empty((0,))
    return torch.empty_like(s), grad_delta, torch.empty_like(weight)


# ---- reference fallback where a build has no device kernel -----------------------------------

_fallback_lib = torch.library.Library("fomoe", "IMPL")
_warned: set[str] = set()


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fomoe::{name}", key)


def _warn_once(name: str, device: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"fomoe.{name}: this build of fomoe has no {device.upper()} kernel for it; running the "
                      f"PyTorch reference path instead (correct but slow). Rebuild with CUDA for the fast path.",
                      RuntimeWarning, stacklevel=3)


def _fallback(name: str, device: str):
    ref = getattr(reference, name)

    def kernel(*args):
        _warn_once(name, device)
        return ref(*args)

    return kernel


_registered_fallbacks: set[str] = set()
for _name in OP_NAMES:
    if not _has_kernel(_name, "CUDA"):
        _fallback_lib.impl(_name, _fallback(_name, "cuda"), "CUDA")
        _registered_fallbacks.add(_name)


def reference_fallbacks() -> list[str]:
    """Names of the ops that run the reference path on CUDA tensors in this build."""
    return sorted(_registered_fallbacks)
