"""Rotary position embedding: fomoe.rotary (one fused kernel each way) against what a PyTorch
user writes, forward + backward on the LM's q and k.

Shape: the q and k of one ``fomoe.lm`` attention layer as its projection lays them out (a
strided [B, S, 2*H, D] view of the [B, S, 3, H, D] qkv tensor), bf16, fp32 tables. Peers, in
the same run on fresh random inputs:

- ``torch fp32``: halves split, four products with the fp32 tables, cat, cast back to bf16 (the
  textbook formulation; mixed-dtype products promote to fp32);
- ``torch bf16``: ``x * cos + roll(x) * sin`` with full-width bf16 tables and ``addcmul`` (the
  fewest PyTorch kernels we found).

Reported: milliseconds per forward + backward (CUDA graph replay, so the host is out), the
effective bandwidth (bytes read + written by the ideal one-pass forward and backward) and
fomoe's speedup over each peer.

    python bench/bench_rotary.py [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import sys

import torch

import fomoe
from fomoe import ops
from graph_timing import graph_replay_ms, write_rows_json


def torch_fp32(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def make_torch_bf16(cos, sin):
    cos_full = cos.repeat(1, 2)[:, None].to(torch.bfloat16)
    sin_signed = torch.cat((-sin, sin), -1)[:, None].to(torch.bfloat16)

    def fn(x, _cos, _sin):
        return torch.addcmul(x * cos_full, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="a small shape")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_rotary: needs a CUDA GPU")
        return 0
    shapes = [(2, 64, 4, 64)] if args.smoke else [(16, 1024, 16, 64), (8, 2048, 32, 128), (4, 4096, 8, 64)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"# bench_rotary on {torch.cuda.get_device_name()}, torch {torch.__version__}, fomoe CUDA kernels "
          f"{fomoe.WITH_CUDA} (rotary on the reference path: {'rotary' in ops.reference_fallbacks()})")
    print("| B, S, H, D | fomoe ms | GB/s | torch fp32 ms | torch bf16 ms | vs torch fp32 | vs torch bf16 |")
    print("|---|---|---|---|---|---|---|")
    for B, S, H, D in shapes:
        qkv = torch.randn(B, S, 3, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        x = qkv[:, :, :2].reshape(B, S, 2 * H, D).requires_grad_(False)
        leaf = x.detach().requires_grad_(True)
        grad = torch.randn(B, S, 2 * H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        angles = torch.rand(S, D // 2, device="cuda", generator=gen) * 6.3
        cos, sin = angles.cos(), angles.sin()
        peers = {"fomoe": ops.rotary, "torch fp32": lambda t, c, s: torch_fp32(t, c[:, None], s[:, None]),
                 "torch bf16": make_torch_bf16(cos, sin)}
        want = torch_fp32(x.float(), cos[:, None], sin[:, None])
        times = {}
        for name, fn in peers.items():
            err = (fn(x, cos, sin).float() - want).abs().max().item()
            assert err < 0.1, f"{name} disagrees with the fp32 formula by {err}"

            def step(fn=fn):
                leaf.grad = None
                fn(leaf, cos, sin).backward(grad)
            times[name] = graph_replay_ms([step] * 10, reps=20) / 10
        moved = 2 * 2 * x.numel() * x.element_size()  # forward and backward: read x, write out
        row = {"shape": [B, S, H, D], **{f"{k}_ms": v for k, v in times.items()},
               "fomoe_gb_per_s": moved / times["fomoe"] / 1e6,
               "vs_torch_fp32": times["torch fp32"] / times["fomoe"], "vs_torch_bf16": times["torch bf16"] / times["fomoe"]}
        rows.append(row)
        print(f"| {B}, {S}, {H}, {D} | {times['fomoe']:.3f} | {row['fomoe_gb_per_s']:,.0f} | {times['torch fp32']:.3f} | "
              f"{times['torch bf16']:.3f} | {row['vs_torch_fp32']:.2f}x | {row['vs_torch_bf16']:.2f}x |", flush=True)
    if args.json:
        write_rows_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
