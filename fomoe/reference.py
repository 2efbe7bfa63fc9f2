"""Pure-PyTorch reference of every fomoe op: the semantics' source of truth and the test oracle.

Each function mirrors the op of the same name in ``torch.ops.fomoe`` (same arguments, same
outputs and dtypes) and computes in fp32 (fp64 for fp64 inputs), whatever the input dtype.
They favour clarity over speed. ``moe_loop`` is an independent formulation of a whole MoE
layer (a per-expert loop, no dispatch tables) used to check the layer end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T in the accumulation dtype (fp64 for fp64 x, else fp32)."""
    acc = _acc(x.dtype)
    return x.to(acc) @ weight.to(acc).T


def router_logits_backward(grad: Tensor, x: Tensor, weight: Tensor, output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """(grad @ weight in x's dtype, grad.T @ x in weight's), empty where output_mask is False."""
    acc = _acc(x.dtype)
    g = grad.to(acc)
    grad_x = (g @ weight.to(acc)).to(x.dtype) if output_mask[0] else x.new_empty((0,))
    grad_w = (g.T @ x.to(acc)).to(weight.dtype) if output_mask[1] else weight.new_empty((0,))
    return grad_x, grad_w


def route(logits: Tensor, top_k: int, score: str = "softmax", renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Score experts, pick the top-k by logit (ties: lower id), return (weights, int32 ids)."""
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    acc = _acc(logits.dtype)
    z = logits.to(acc)
    _, ids = torch.topk(z, top_k, dim=-1)
    if score == "softmax":
        probs = torch.softmax(z, dim=-1)
    else:
        probs = torch.sigmoid(z)
    weights = probs.gather(-1, ids)
    if renormalize:
        if score == "softmax":
            weights = torch.softmax(z.gather(-1, ids), dim=-1)
        else:
            weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def route_backward(grad_weights: Tensor, logits: Tensor, weights: Tensor, ids: Tensor, score: str,
                   renormalize: bool) -> Tensor:
    """Gradient of ``route``'s weights with respect to the logits (ids held fixed)."""
    z = logits.detach().to(_acc(logits.dtype)).requires_grad_(True)
    idx = ids.long()
    # Grad mode on: as a fallback kernel this runs inside the autograd engine's backward.
    with torch.enable_grad():
        probs = torch.softmax(z, -1) if score == "softmax" else torch.sigmoid(z)
        w = probs.gather(-1, idx)
        if renormalize:
            w = torch.softmax(z.gather(-1, idx), -1) if score == "softmax" else w / w.sum(-1, keepdim=True)
        (grad,) = torch.autograd.grad(w, z, grad_weights.to(w.dtype))
    return grad.to(logits.dtype)


def dispatch(ids: Tensor, resident_map: Tensor, num_local: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group assignments by local expert, dropping those to non-resident experts (skip-token)."""
    n = ids.numel()
    flat = ids.reshape(-1).long()
    slot = resident_map.long()[flat]  # -1 where the expert is not held here
    kept = slot >= 0
    # Stable sort by slot keeps assignments of one expert in flat order.
    order = torch.argsort(torch.where(kept, slot, num_local), stable=True)
    count = int(kept.sum())
    permutation = torch.full((n,), -1, dtype=torch.int32, device=ids.device)
    permutation[:count] = order[:count].to(torch.int32)
    counts = torch.bincount(slot[kept], minlength=num_local)[:num_local]
    offsets = torch.zeros(num_local + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    inverse = torch.full((n,), -1, dtype=torch.int32, device=ids.device)
    inverse[order[:count]] = torch.arange(count, dtype=torch.int32, device=ids.device)
    return permutation, offsets, inverse.view(ids.shape)


def gather(x: Tensor, permutation: Tensor, inverse: Tensor, scale: Tensor | None = None) -> Tensor:
    """out[j] = scale[perm[j]] * x[perm[j] // k]; zero rows where perm[j] == -1."""
    k = inverse.shape[1]
    acc = _acc(x.dtype)
    valid = permutation >= 0
    src = permutation.clamp_min(0).long()
    rows = x.to(acc)[src // k]
    if scale is not None:
        rows = rows * scale.reshape(-1).to(acc)[src].unsqueeze(1)
    return torch.where(valid.unsqueeze(1), rows, 0).to(x.dtype)


def combine(rows: Tensor, permutation: Tensor, inverse: Tensor, gate: Tensor | None = None) -> Tensor:
    """y[t] = sum_s gate[t, s] * rows[inverse[t, s]]; skipped slots (inverse == -1) add nothing."""
    acc = _acc(rows.dtype)
    valid = (inverse >= 0).unsqueeze(-1)
    picked = rows.to(acc)[inverse.clamp_min(0).long()]  # [T, k, d]
    w = torch.ones(inverse.shape, dtype=acc, device=rows.device) if gate is None else gate.to(acc)
    return torch.where(valid, picked * w.unsqueeze(-1), 0).sum(1).to(rows.dtype)


def combine_gate_grad(grad_out: Tensor, rows: Tensor, inverse: Tensor) -> Tensor:
    """grad_gate[t, s] = <grad_out[t], rows[inverse[t, s]]>, zero for skipped slots."""
    acc = _acc(rows.dtype)
    picked = rows.to(acc)[inverse.clamp_min(0).long()]
    dots = (picked * grad_out.to(acc).unsqueeze(1)).sum(-1)
    return torch.where(inverse >= 0, dots, 0)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Rows [offsets[e], offsets[e+1]) of a times b[e]; other rows are zero."""
    acc = _acc(a.dtype)
    out = torch.zeros(a.shape[0], b.shape[2], dtype=acc, device=a.device)
    off = offsets.tolist()
    for e in range(b.shape[0]):
        out[off[e]:off[e + 1]] = a[off[e]:off[e + 1]].to(acc) @ b[e].to(acc)
    return out.to(a.dtype)


def grouped_mm_wgrad(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """out[e] = a[rows_e]^T @ b[rows_e] with rows_e = [offsets[e], offsets[e+1])."""
    acc = _acc(a.dtype)
    off = offsets.tolist()
    out = torch.zeros(len(off) - 1, a.shape[1], b.shape[1], dtype=acc, device=a.device)
    for e in range(len(off) - 1):
        out[e] = a[off[e]:off[e + 1]].to(acc).T @ b[off[e]:off[e + 1]].to(acc)
    return out.to(a.dtype)


def swiglu(h: Tensor) -> Tensor:
    h1, h3 = h.chunk(2, dim=-1)
    return F.silu(h1) * h3


def expert_ffn(x: Tensor, permutation: Tensor, offsets: Tensor, inverse: Tensor, w13: Tensor, w2: Tensor,
               gate: Tensor, save_for_backward: bool) -> tuple[Tensor, Tensor]:
    """gather -> GEMM1 -> SwiGLU -> GEMM2 -> gate-weighted combine; also h (expert order) if asked.

    w13 and w2 share a dtype, which may differ from x's (the op computes in x's dtype)."""
    acc = _acc(x.dtype)
    xg = gather(x.to(acc), permutation, inverse)
    h = grouped_mm(xg, w13.to(acc), offsets)
    o = grouped_mm(swiglu(h), w2.to(acc), offsets)
    y = combine(o, permutation, inverse, gate)
    saved = h.to(x.dtype) if save_for_backward else x.new_empty(0)
    return y.to(x.dtype), saved


def expert_ffn_backward(grad_y: Tensor, x: Tensor, permutation: Tensor, offsets: Tensor, inverse: Tensor,
                        w13: Tensor, w2: Tensor, gate: Tensor, h: Tensor,
                        weight_grad_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``expert_ffn``'s y wrt (x, w13, w2, gate), by autograd through the reference;
    the weights' in ``weight_grad_dtype`` (default: the weights' dtype)."""
    acc = _acc(x.dtype)
    leaves = [t.detach().to(acc).requires_grad_(True) for t in (x, w13, w2, gate)]
    with torch.enable_grad():
        y, _ = expert_ffn(leaves[0], permutation, offsets, inverse, leaves[1], leaves[2], leaves[3], False)
        grads = torch.autograd.grad(y, leaves, grad_y.to(acc), allow_unused=True)
    dtypes = (x.dtype, weight_grad_dtype or w13.dtype, weight_grad_dtype or w2.dtype, gate.dtype)
    return tuple(torch.zeros(t.shape, dtype=dt, device=t.device) if g is None else g.to(dt)
                 for g, t, dt in zip(grads, (x, w13, w2, gate), dtypes))  # type: ignore[return-value]


def rotary(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """RoPE on channel pairs (i, i + D/2) of x [B, S, H, D]: each pair, as the complex number
    x_i + j x_{i+D/2}, is multiplied by cos + j sin (by its conjugate when ``inverse``)."""
    acc = _acc(x.dtype)
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].to(acc), x[..., half:].to(acc))
    c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]
    z = z * torch.complex(c, -s if inverse else s)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``s = x + delta`` rounded to x's dtype (an empty tensor when delta is None: s is x), and
    ``s * rsqrt(mean(s^2) + eps) * weight`` over the last dim in ``out_dtype`` (default x's)."""
    acc = _acc(x.dtype)
    s = x if delta is None else (x.to(acc) + delta.to(acc)).to(x.dtype)
    sa = s.to(acc)
    normed = sa * torch.rsqrt(sa.square().mean(-1, keepdim=True) + eps) * weight.to(acc)
    return (x.new_empty((0,)) if delta is None else s), normed.to(out_dtype or x.dtype)


def rms_norm_backward(grad_normed: Tensor, grad_sum: Tensor | None, s: Tensor, weight: Tensor, eps: float,
                      delta_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``rms_norm`` by autograd through the reference: grad_s (the norm's plus
    ``grad_sum``), the same in ``delta_dtype`` (else an empty tensor), grad_weight."""
    acc = _acc(s.dtype)
    leaves = [s.detach().to(acc).requires_grad_(True), weight.detach().to(acc).requires_grad_(True)]
    with torch.enable_grad():
        _, normed = rms_norm(leaves[0], None, leaves[1], eps)
        grad_s, grad_w = torch.autograd.grad(normed, leaves, grad_normed.to(acc))
    if grad_sum is not None:
        grad_s = grad_s + grad_sum.to(acc)
    grad_delta = grad_s.to(delta_dtype) if delta_dtype is not None else s.new_empty((0,))
    return grad_s.to(s.dtype), grad_delta, grad_w.to(weight.dtype)


def moe_loop(x: Tensor, router_weight: Tensor, w13_full: Tensor, w2_full: Tensor, top_k: int, score: str,
             renormalize: bool, resident: Tensor | None = None, policy: str = "skip",
             renormalize_kept: bool = False) -> Tensor:
    """A plain MoE layer written as a per-expert loop over *global* experts.

    ``w13_full``/``w2_full`` hold every expert; ``resident`` is a bool mask [E] of the experts
    this worker holds (None: all). ``policy='skip'`` drops assignments to non-resident experts
    (the residual carries the token); ``'reroute'`` masks their logits before top-k.
    """
    acc = _acc(x.dtype)
    E = router_weight.shape[0]
    xs = x.reshape(-1, x.shape[-1]).to(acc)
    logits = router_logits(xs, router_weight)
    held = torch.ones(E, dtype=torch.bool, device=x.device) if resident is None else resident
    if policy == "reroute":
        logits = logits.masked_fill(~held, float("-inf"))
    weights, ids = route(logits, top_k, score, renormalize)
    ids = ids.long()
    keep = held[ids]
    if renormalize_kept:
        kw = weights * keep
        weights = kw / kw.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    y = torch.zeros_like(xs)
    for e in range(E):
        if not bool(held[e]):
            continue
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        out = swiglu(xs[tok] @ w13_full[e].to(acc)) @ w2_full[e].to(acc)
        y.index_add_(0, tok, out * weights[tok, slot].unsqueeze(1))
    return y.reshape(x.shape).to(x.dtype)
