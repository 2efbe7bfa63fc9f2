"""Residual add + RMSNorm: fomoe.add_rms_norm (one kernel forward, two backward) against what a
PyTorch user writes, forward + backward, as the LM runs it under bf16 autocast.

The residual stream is fp32 [T, d], the sublayer output added to it bf16, and the normed output
the bf16 copy the next GEMM reads. Peers, in the same run on fresh random inputs:

- ``torch``: ``s = x + delta``, ``F.rms_norm`` (PyTorch's fused RMSNorm kernels), a cast to bf16
  (the module code the LM had: a residual add, ``nn.RMSNorm``, autocast's cast);
- ``compiled``: the same function through ``torch.compile`` (Inductor fuses the add, the norm and
  the cast; where compilation fails the row says so).

Reported: milliseconds per forward + backward (CUDA graph replay, so the host is out), the
effective bandwidth (bytes of the ideal passes: forward reads x and delta and writes s and the
normed copy; backward reads s, both incoming gradients and writes both input gradients) and
fomoe's speedup over each peer.

    python bench/bench_norm.py [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import fomoe
from fomoe import ops
from graph_timing import graph_replay_ms, write_rows_json

EPS = 1e-5


def torch_add_norm(x, delta, w):
    s = x + delta
    return s, F.rms_norm(s, (s.shape[-1],), w, EPS).to(torch.bfloat16)


def fomoe_add_norm(x, delta, w):
    return ops.add_rms_norm(x, delta, w, EPS, torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="a small shape")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm: needs a CUDA GPU")
        return 0
    shapes = [(256, 128)] if args.smoke else [(16384, 1024), (8192, 4096), (32768, 2048)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    peers = {"fomoe": fomoe_add_norm, "torch": torch_add_norm}
    if not args.no_compile:
        peers["compiled"] = torch.compile(torch_add_norm, dynamic=False)
    rows = []
    print(f"# bench_norm on {torch.cuda.get_device_name()}, torch {torch.__version__}, fomoe CUDA kernels "
          f"{fomoe.WITH_CUDA} (rms_norm on the reference path: {'rms_norm' in ops.reference_fallbacks()})")
    print("| T, d | fomoe ms | GB/s | torch ms | compiled ms | vs torch | vs compiled |")
    print("|---|---|---|---|---|---|---|")
    for T, d in shapes:
        x = torch.randn(T, d, device="cuda", generator=gen)
        delta = torch.randn(T, d, device="cuda", generator=gen).bfloat16()
        w = torch.rand(d, device="cuda", generator=gen) + 0.5
        g_s = torch.randn(T, d, device="cuda", generator=gen)
        g_n = torch.randn(T, d, device="cuda", generator=gen).bfloat16()
        leaves = [t.clone().requires_grad_(True) for t in (x, delta, w)]
        want = torch_add_norm(x.double(), delta.double(), w.double())[1].double()
        times = {}
        for name, fn in peers.items():
            try:
                err = (fn(x, delta, w)[1].double() - want).abs().max().item()
                assert err < 0.1, f"{name} disagrees with the fp64 formula by {err}"

                def step(fn=fn):
                    for t in leaves:
                        t.grad = None
                    torch.autograd.backward(list(fn(*leaves)), [g_s, g_n])
                times[name] = graph_replay_ms([step] * 10, reps=20) / 10
            except Exception as e:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
                print(f"# {name} at {T}x{d} did not run: {type(e).__name__}: {str(e)[:200]}")
                times[name] = None
        moved = T * d * ((4 + 2 + 4 + 2) + (4 + 2 + 4 + 4 + 2))
        speedup = {k: (times[k] / times["fomoe"] if times.get(k) else None) for k in ("torch", "compiled")}
        row = {"shape": [T, d], **{f"{k}_ms": v for k, v in times.items()},
               "fomoe_gb_per_s": moved / times["fomoe"] / 1e6, **{f"vs_{k}": v for k, v in speedup.items()}}
        rows.append(row)
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        print(f"| {T}, {d} | {times['fomoe']:.3f} | {row['fomoe_gb_per_s']:,.0f} | {fmt(times['torch'], '{:.3f}')} | "
              f"{fmt(times.get('compiled'), '{:.3f}')} | {fmt(speedup['torch'], '{:.2f}x')} | "
              f"{fmt(speedup['compiled'], '{:.2f}x')} |", flush=True)
    if args.json:
        write_rows_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
