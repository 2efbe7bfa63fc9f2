"""Fused expert FFN (fomoe.expert_ffn) against what users run instead, on one GPU.

For each MoE shape (T tokens, d_model, d_ff, E experts, top-k), in the same process:
  fomoe     dispatch tables + fomoe.expert_ffn (fused gather, grouped GEMMs, SwiGLU, combine)
  pipeline  argsort, index_select, two torch._grouped_mm, SwiGLU, weighted index_add_
  loop      per-expert loop (Hugging Face style: nonzero per expert, matmuls, index_add_)
  dense     the same FLOPs as one dense SwiGLU MLP over T*k rows: the ceiling
Times are medians of CUDA-event timings of forward (grad mode on) and forward+backward, on
fresh random bf16 inputs; effective TFLOP/s = 18*T*k*d*d_ff / (fwd+bwd time) (6*... for fwd).
Also measured: activation bytes each method keeps alive between forward and backward, the
peak bytes of a forward+backward, and skip-token scaling (half of the experts resident: time
against the ideal kept fraction), timed three ways: eager calls synchronised one by one (the
issue's measure), eager calls queued back to back, and replays of a captured CUDA graph (device
time alone, no host launch costs); plus the host time to enqueue one forward+backward and the
device time per kernel (torch.profiler) with all and with half of the experts resident.

  python bench/bench_gemm.py [--json PATH] [--shapes 8192,4096,14336,8,2 ...] [--smoke]
                             [--no-loop] [--no-gemms] [--no-portable]

--smoke runs tiny shapes (on the CPU when there is no GPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fomoe  # noqa: E402
from fomoe import ops  # noqa: E402
from graph_timing import graph_replay_ms  # noqa: E402

SHAPES = [(8192, 4096, 14336, 8, 2), (16384, 2048, 768, 128, 8), (16384, 1024, 2048, 16, 2)]
BARS = {(8192, 4096, 14336, 8, 2): 1.0, (16384, 2048, 768, 128, 8): 1.5, (16384, 1024, 2048, 16, 2): 1.3}
SMOKE_SHAPES = [(64, 32, 48, 4, 2), (96, 64, 32, 8, 3)]


# ---- the methods ----------------------------------------------------------------------------

def dispatch_tables(ids: torch.Tensor, resident_map: torch.Tensor, num_local: int):
    """fomoe's routing tables, from its dispatch kernel when this build has one on this device,
    else from PyTorch ops (the same tables, no host sync)."""
    if ids.device.type == "cpu" or "dispatch" not in ops.reference_fallbacks():
        return ops.dispatch(ids, resident_map, num_local)
    n = ids.numel()
    flat = ids.reshape(-1).long()
    slot = resident_map.long()[flat]
    key = torch.where(slot >= 0, slot, num_local)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_local + 1)[:num_local]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    perm = torch.where(key[order] < num_local, order, -1).to(torch.int32)
    inverse = torch.empty(n, dtype=torch.int32, device=ids.device)
    inverse.scatter_(0, order, torch.arange(n, dtype=torch.int32, device=ids.device))
    inverse = torch.where(slot >= 0, inverse, -1)
    return perm, offsets, inverse.view(ids.shape)


def fomoe_layer(x, ids, gate, w13, w2, resident_map):
    perm, offsets, inverse = dispatch_tables(ids, resident_map, w13.shape[0])
    return ops.expert_ffn(x, perm, offsets, inverse, w13, w2, gate)


def grouped_mm_pipeline(x, ids, gate, w13, w2):
    E, k = w13.shape[0], ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    tok = order // k
    xg = x.index_select(0, tok)
    if x.is_cuda:
        h = torch._grouped_mm(xg, w13, offs=offs)
    else:  # the smoke run on a CPU: same math, per expert
        h = torch.cat([xg[s:e] @ w13[i] for i, (s, e) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    h1, h3 = h.chunk(2, dim=-1)
    a = F.silu(h1) * h3
    if x.is_cuda:
        o = torch._grouped_mm(a, w2, offs=offs)
    else:
        o = torch.cat([a[s:e] @ w2[i] for i, (s, e) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    o = o * gate.reshape(-1)[order].unsqueeze(1).to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


def per_expert_loop(x, ids, gate, w13, w2):
    y = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h1, h3 = (x[tok] @ w13[e]).chunk(2, dim=-1)
        o = (F.silu(h1) * h3) @ w2[e]
        y.index_add_(0, tok, o * gate[tok, slot].unsqueeze(1).to(o.dtype))
    return y


def dense_mlp(xd, w1, w2d):
    h1, h3 = (xd @ w1).chunk(2, dim=-1)
    return (F.silu(h1) * h3) @ w2d


# ---- timing -----------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, budget_s=1.5, min_reps=3, max_reps=20) -> float:
    """Median milliseconds of fn() after a warm-up, with as many repetitions as fit the budget."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(budget_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def training_step(forward, leaves, grad_y):
    def fwd():
        return forward()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        forward().backward(grad_y)

    return fwd, fwd_bwd


def kept_activation_bytes(forward, device) -> int | None:
    """Bytes a forward keeps alive for its backward (allocated after forward, minus the output)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    y = forward()
    sync(device)
    kept = torch.cuda.memory_allocated(device) - before - y.numel() * y.element_size()
    del y
    return int(kept)


def peak_bytes(step, device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def back_to_back_ms(fn, device, reps=10) -> float:
    """Milliseconds per call of reps calls queued without synchronising in between: the host
    runs ahead of the GPU as in a training loop, so host costs hide wherever the GPU is busier."""
    fn()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def host_enqueue_ms(fn, device, reps=5, busy=True) -> float:
    """Host milliseconds to enqueue one fn() (nothing in it waits for the GPU), median. ``busy``:
    behind ~0.1 s of GPU work, as in a training loop where the host runs ahead; else right after
    the GPU went idle. On the H200 machine the same calls took 1.4-2x as long busy as idle."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if busy:
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spin: the queue never drains during fn()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        sync(device)
    return statistics.median(times)


def graph_ms(fn, reps=20) -> float | None:
    """Median milliseconds per replay of fn() captured in a CUDA graph: device time only."""
    try:
        return graph_replay_ms([fn], reps, warmups=2)
    except Exception as exc:  # report it and keep measuring the rest
        print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc})", flush=True)
        return None


def kernel_name(name: str) -> str:
    """A short label for a kernel: CUTLASS's GEMMs by kind, others by function name."""
    if "cutlass" in name and "device_kernel" in name:
        return "CUTLASS grouped GEMM (all variants)"
    base = name.split("(")[0].split("<")[0]
    return base.split("::")[-1] or name[:60]


def profile_breakdown_us(fn, device, reps=5) -> tuple[dict[str, float], dict[str, float]] | None:
    """torch.profiler over reps calls: (device microseconds per call of each kernel kind, host
    microseconds per call spent in each CPU op itself, the ten largest), or None if unavailable.
    The host figures include the profiler's own per-op overhead: read them as shares."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            sync(device)
        kernels: dict[str, float] = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:  # kernels, memsets, copies
                label = kernel_name(ev.name)
                kernels[label] = kernels.get(label, 0.0) + ev.time_range.elapsed_us() / reps
        host = sorted(((item.key, item.self_cpu_time_total / reps) for item in prof.key_averages()
                       if item.self_cpu_time_total > 0), key=lambda kv: -kv[1])
        return kernels, dict(host[:10])
    except Exception as exc:
        print(f"  (profiler breakdown failed: {type(exc).__name__}: {exc})", flush=True)
        return None


# ---- one shape ----------------------------------------------------------------------------------

def bench_shape(shape, device, with_loop=True, with_portable=True, gen_seed=0):
    T, d, f, E, k = shape
    g = torch.Generator(device=device).manual_seed(gen_seed)  # drawn where used: fast at large shapes
    dt = torch.bfloat16

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=device) * scale).to(dt)

    x = rnd(T, d).requires_grad_(True)
    w13 = rnd(E, d, 2 * f, scale=d ** -0.5).requires_grad_(True)
    w2 = rnd(E, f, d, scale=f ** -0.5).requires_grad_(True)
    scores = torch.randn(T, E, generator=g, device=device)
    top, ids = scores.topk(k, dim=1)
    gate = torch.softmax(top, dim=1).requires_grad_(True)
    ids = ids.to(torch.int32)
    grad_y = rnd(T, d)
    resident_all = torch.arange(E, dtype=torch.int32, device=device)
    flops_fb = 18.0 * T * k * d * f
    flops_f = 6.0 * T * k * d * f

    methods = {
        "fomoe": lambda: fomoe_layer(x, ids, gate, w13, w2, resident_all),
        "pipeline": lambda: grouped_mm_pipeline(x, ids.long(), gate, w13, w2),
    }
    if with_loop:
        methods["loop"] = lambda: per_expert_loop(x, ids.long(), gate, w13, w2)
    result = {"shape": dict(T=T, d=d, d_ff=f, E=E, k=k), "methods": {}}

    y_fomoe = methods["fomoe"]().detach().float()
    y_pipe = methods["pipeline"]().detach().float()
    result["fomoe_vs_pipeline_rel_diff"] = float((y_fomoe - y_pipe).norm() / y_pipe.norm())
    del y_fomoe, y_pipe

    for name, forward in methods.items():
        fwd, fwd_bwd = training_step(forward, (x, w13, w2, gate), grad_y)
        budget = 3.0 if name == "loop" else 1.5
        t_f = time_ms(fwd, device, budget)
        t_fb = time_ms(fwd_bwd, device, budget)
        result["methods"][name] = dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=flops_f / t_f / 1e9,
                                       fwd_bwd_tflops=flops_fb / t_fb / 1e9,
                                       kept_activation_bytes=kept_activation_bytes(forward, device),
                                       peak_fwd_bwd_bytes=peak_bytes(fwd_bwd, device))
        mem = result["methods"][name]
        mb = "" if mem["peak_fwd_bwd_bytes"] is None else (
            f"  kept {mem['kept_activation_bytes'] / 1e6:8.1f} MB  peak {mem['peak_fwd_bwd_bytes'] / 1e6:8.1f} MB")
        print(f"  {name:9s} fwd {t_f:9.3f} ms  fwd+bwd {t_fb:9.3f} ms  {flops_fb / t_fb / 1e9:7.1f} TFLOP/s{mb}",
              flush=True)

    # Dense ceiling: one SwiGLU MLP over T*k rows with the same FLOPs.
    xd = rnd(T * k, d).requires_grad_(True)
    w1d = rnd(d, 2 * f, scale=d ** -0.5).requires_grad_(True)
    w2d = rnd(f, d, scale=f ** -0.5).requires_grad_(True)
    gd = rnd(T * k, d)
    fwd, fwd_bwd = training_step(lambda: dense_mlp(xd, w1d, w2d), (xd, w1d, w2d), gd)
    t_f, t_fb = time_ms(fwd, device), time_ms(fwd_bwd, device)
    result["methods"]["dense"] = dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=flops_f / t_f / 1e9,
                                      fwd_bwd_tflops=flops_fb / t_fb / 1e9)
    print(f"  {'dense':9s} fwd {t_f:9.3f} ms  fwd+bwd {t_fb:9.3f} ms  {flops_fb / t_fb / 1e9:7.1f} TFLOP/s", flush=True)
    del xd, w1d, w2d, gd

    # Skip-token: the even experts resident, the rest skipped.
    resident_map = torch.full((E,), -1, dtype=torch.int32, device=device)
    held = torch.arange(0, E, 2, device=device)
    resident_map[held] = torch.arange(held.numel(), dtype=torch.int32, device=device)
    w13h = w13.detach()[held].clone().requires_grad_(True)
    w2h = w2.detach()[held].clone().requires_grad_(True)
    kept = int(dispatch_tables(ids, resident_map, held.numel())[1][-1])
    _, fwd_bwd_half = training_step(lambda: fomoe_layer(x, ids, gate, w13h, w2h, resident_map),
                                    (x, w13h, w2h, gate), grad_y)
    _, fwd_bwd_full = training_step(methods["fomoe"], (x, w13, w2, gate), grad_y)
    t_half = time_ms(fwd_bwd_half, device)
    t_full = result["methods"]["fomoe"]["fwd_bwd_ms"]
    frac = kept / (T * k)
    skip = dict(resident=int(held.numel()), kept_fraction=frac, full_ms=t_full, half_ms=t_half)
    if device.type == "cuda":
        skip.update(full_b2b_ms=back_to_back_ms(fwd_bwd_full, device), half_b2b_ms=back_to_back_ms(fwd_bwd_half, device),
                    full_graph_ms=graph_ms(fwd_bwd_full),
                    half_graph_ms=graph_ms(fwd_bwd_half),
                    full_host_ms=host_enqueue_ms(fwd_bwd_full, device),
                    half_host_ms=host_enqueue_ms(fwd_bwd_half, device),
                    full_host_idle_ms=host_enqueue_ms(fwd_bwd_full, device, busy=False),
                    half_host_idle_ms=host_enqueue_ms(fwd_bwd_half, device, busy=False),
                    full_profile_us=profile_breakdown_us(fwd_bwd_full, device),
                    half_profile_us=profile_breakdown_us(fwd_bwd_half, device))
    for how in ("", "b2b_", "graph_"):
        full, half = skip.get(f"full_{how}ms"), skip.get(f"half_{how}ms")
        if full is not None and half is not None:
            skip[f"{how}ideal_ms"] = full * frac
            skip[f"{how}saving_vs_ideal"] = (full - half) / (full - full * frac)
    result["skip_token"] = skip
    print(f"  skip-token: {held.numel()}/{E} experts, kept {frac:.3f}", flush=True)
    for how, label in (("", "eager, synchronised per call"), ("b2b_", "eager, back to back"),
                       ("graph_", "CUDA graph replay")):
        if f"{how}saving_vs_ideal" in skip:
            print(f"    {label:29s} full {skip[f'full_{how}ms']:.3f} ms, half {skip[f'half_{how}ms']:.3f} ms "
                  f"(ideal {skip[f'{how}ideal_ms']:.3f}): {skip[f'{how}saving_vs_ideal']:.1%} of the ideal saving",
                  flush=True)
    if skip.get("full_host_ms") is not None:
        print(f"    host time to enqueue one fwd+bwd behind a busy GPU: full {skip['full_host_ms']:.3f} ms, "
              f"half {skip['half_host_ms']:.3f} ms; from an idle GPU: full {skip['full_host_idle_ms']:.3f} ms, "
              f"half {skip['half_host_idle_ms']:.3f} ms", flush=True)
    if skip.get("full_profile_us") and skip.get("half_profile_us"):
        (fk, _), (hk, host) = skip["full_profile_us"], skip["half_profile_us"]
        print(f"    device time per kernel kind, us per fwd+bwd (full -> half; the ideal half is {frac:.3f}x):")
        for label in sorted(set(fk) | set(hk), key=lambda n: -fk.get(n, 0.0)):
            f_us, h_us = fk.get(label, 0.0), hk.get(label, 0.0)
            print(f"      {f_us:8.1f} -> {h_us:8.1f}  {label}")
        print(f"      {sum(fk.values()):8.1f} -> {sum(hk.values()):8.1f}  total kernel time", flush=True)
        print("    host time per CPU op (self, profiled, us per fwd+bwd), half resident, largest:")
        for name, us in host.items():
            print(f"      {us:8.1f}  {name[:90]}")

    # The portable kernels (what non-Hopper GPUs run), forward only, for the record.
    if with_portable and device.type == "cuda" and os.environ.get("FOMOE_GEMM_BACKEND") is None:
        os.environ["FOMOE_GEMM_BACKEND"] = "simt"
        try:
            with torch.no_grad():
                t_simt = time_ms(methods["fomoe"], device, budget_s=0.5, min_reps=1, max_reps=3)
            result["portable_fwd_ms"] = t_simt
        finally:
            del os.environ["FOMOE_GEMM_BACKEND"]
    del w13h, w2h
    return result


def bench_gemms(shape, device, gen_seed=1):
    """The grouped GEMMs alone, fomoe's (each Hopper tile choice) against torch._grouped_mm on
    the same operands: forward (x @ w13), dgrad (grad_h @ w13^T, a transposed view) and wgrad."""
    T, d, f, E, k = shape
    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    n = T * k
    counts = torch.bincount(torch.randint(0, E, (n,), generator=g), minlength=E)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(device)
    rnd = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device)  # noqa: E731
    xg, hg, w13 = rnd(n, d), rnd(n, 2 * f), rnd(E, d, 2 * f) * d ** -0.5
    gemms = {
        "fprop": (2.0 * n * d * 2 * f, lambda: ops.grouped_mm(xg, w13, offsets),
                  lambda: torch._grouped_mm(xg, w13, offs=offsets[1:])),
        "dgrad": (2.0 * n * d * 2 * f, lambda: ops.grouped_mm(hg, w13.transpose(1, 2), offsets),
                  lambda: torch._grouped_mm(hg, w13.transpose(1, 2), offs=offsets[1:])),
        "wgrad": (2.0 * n * d * 2 * f, lambda: ops.grouped_mm_wgrad(xg, hg, offsets),
                  lambda: torch._grouped_mm(xg.t(), hg, offs=offsets[1:])),
    }
    out = {}
    for name, (flops, ours, theirs) in gemms.items():
        row = {"torch_tflops": flops / time_ms(theirs, device, 0.3) / 1e9}
        for tile in ("auto", "large", "small"):
            if tile != "auto":
                os.environ["FOMOE_SM90_TILE"] = tile
            try:
                row[f"fomoe_{tile}_tflops"] = flops / time_ms(ours, device, 0.3) / 1e9
            finally:
                os.environ.pop("FOMOE_SM90_TILE", None)
        out[name] = row
        print(f"  {name}: torch._grouped_mm {row['torch_tflops']:.0f} TFLOP/s, fomoe auto/large/small "
              f"{row['fomoe_auto_tflops']:.0f}/{row['fomoe_large_tflops']:.0f}/{row['fomoe_small_tflops']:.0f}",
              flush=True)
    return out


def ratios(r):
    m = r["methods"]
    return dict(fwd_bwd=m["pipeline"]["fwd_bwd_ms"] / m["fomoe"]["fwd_bwd_ms"],
                fwd=m["pipeline"]["fwd_ms"] / m["fomoe"]["fwd_ms"],
                vs_loop=m["loop"]["fwd_bwd_ms"] / m["fomoe"]["fwd_bwd_ms"] if "loop" in m else None,
                of_dense=m["fomoe"]["fwd_bwd_tflops"] / m["dense"]["fwd_bwd_tflops"])


def print_table(results):
    print()
    print("| shape (T, d, d_ff, E, k) | fomoe TFLOP/s | pipeline | loop | dense | fwd+bwd vs pipeline (bar) "
          "| fwd vs pipeline | kept act. MB fomoe / pipeline | fwd+bwd peak MB fomoe / pipeline "
          "| skip-token saving eager / graph replay |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["shape"]
        key = (s["T"], s["d"], s["d_ff"], s["E"], s["k"])
        m, q = r["methods"], ratios(r)
        bar = BARS.get(key)
        mark = "" if bar is None else (f" (>= {bar}: {'met' if q['fwd_bwd'] >= bar else 'MISSED'})")
        mb = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
        loop = f"{m['loop']['fwd_bwd_tflops']:.1f}" if "loop" in m else "-"
        g = r["skip_token"].get("graph_saving_vs_ideal")
        graph_saving = "-" if g is None else f"{g:.1%}"
        print(f"| {key} | {m['fomoe']['fwd_bwd_tflops']:.1f} | {m['pipeline']['fwd_bwd_tflops']:.1f} | {loop} | "
              f"{m['dense']['fwd_bwd_tflops']:.1f} | {q['fwd_bwd']:.2f}x{mark} | {q['fwd']:.2f}x | "
              f"{mb(m['fomoe']['kept_activation_bytes'])} / {mb(m['pipeline']['kept_activation_bytes'])} | "
              f"{mb(m['fomoe']['peak_fwd_bwd_bytes'])} / {mb(m['pipeline']['peak_fwd_bwd_bytes'])} | "
              f"{r['skip_token']['saving_vs_ideal']:.1%} / {graph_saving} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--shapes", nargs="*", help="shapes as T,d,d_ff,E,k (default: the three reference shapes)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU if no GPU: checks the script")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-expert loop")
    parser.add_argument("--no-gemms", action="store_true", help="skip the GEMMs-alone comparison")
    parser.add_argument("--no-portable", action="store_true", help="skip timing the portable kernels")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA GPU: only --smoke runs on the CPU")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else (
        SMOKE_SHAPES if args.smoke else SHAPES)
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, fomoe=fomoe.__version__,
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), fallbacks=ops.reference_fallbacks(),
               dispatch="fomoe.dispatch" if "dispatch" not in ops.reference_fallbacks() else "torch ops (same tables)")
    print(f"device {env['device']}, torch {env['torch']}, routing tables via {env['dispatch']}", flush=True)
    results, failed = [], []
    for shape in shapes:
        print(f"shape T={shape[0]} d={shape[1]} d_ff={shape[2]} E={shape[3]} k={shape[4]}", flush=True)
        try:
            results.append(bench_shape(shape, device, with_loop=not args.no_loop, with_portable=not args.no_portable))
            if device.type == "cuda" and not args.no_gemms:
                results[-1]["gemms"] = bench_gemms(shape, device)
        except Exception as exc:  # keep measuring the other shapes; report the failure
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed.append(dict(shape=shape, error=f"{type(exc).__name__}: {exc}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after every shape, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(dict(env=env, results=results, failed=failed), indent=2))
    print_table(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
