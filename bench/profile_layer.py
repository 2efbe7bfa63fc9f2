"""Where one MoE layer's training step spends its time: host (Python, dispatcher, launches) or GPU.

For ``fomoe.MoE`` and the same layer written from PyTorch ops (bench_training's ``torch``
model), at each residency: the host time to enqueue forward + backward while the GPU is kept
busy (so enqueueing never waits on the GPU), the GPU time of the same work, the kernels
launched, and the operators with the most host time. When the host time exceeds the GPU time,
a step of that layer is bound by the host, and faster kernels do not show in tokens/s.

``--whole-step`` profiles instead a whole training step of bench_training's LM (forward,
backward, AdamW) per implementation and residency: its wall time, the summed kernel time (the
difference is GPU idle time), and the kernels with the most GPU time, so the part of the step
outside the MoE layers can be read kernel by kernel; with both the all- and half-resident
steps (``--fractions 1,0.5``), each kernel's fixed share (2 x half - all: the time skipping
experts cannot remove).

    python bench/profile_layer.py [--config 16e-top2] [--json PATH] [--smoke] [--whole-step]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_training as bt  # noqa: E402  (same configurations and the same torch-ops layer)

from fomoe.layer import MoE, MoEConfig  # noqa: E402


def layer_for(config: dict, impl: str, fraction: float, device: torch.device) -> torch.nn.Module:
    n = config["num_experts"]
    cfg = MoEConfig(d_model=config["d_model"], d_ff=config["d_ff"], num_experts=n, top_k=config["top_k"],
                    resident_experts=list(range(max(1, int(n * fraction)))))
    layer = MoE(cfg) if impl == "fomoe" else bt.TorchOpsMoE(cfg)
    return layer.to(device)


def profile(layer: torch.nn.Module, x: torch.Tensor, device: torch.device, reps: int, syncs: bool) -> dict:
    """``syncs``: the layer waits for the GPU itself (torch-ops: the kept count), so its host
    time cannot be separated and equals the wall time."""
    cuda = device.type == "cuda"
    grad = torch.randn(x.shape, dtype=x.dtype, device=device)   # the output's gradient: no loss kernels

    def step() -> None:
        layer.zero_grad(set_to_none=True)   # as a training loop does: fresh gradients, no accumulation
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            y = layer(x)
        y.backward(grad)

    for _ in range(3):
        step()
    # Host time: the GPU sleeps first, so every launch returns without waiting on it (few steps:
    # past ~1000 pending launches the queue itself blocks).
    host_reps = 3
    if cuda and not syncs:
        torch.cuda.synchronize()
        torch.cuda._sleep(int(5e8))
    start = time.perf_counter()
    for _ in range(host_reps):
        step()
    host_ms = (time.perf_counter() - start) * 1e3 / host_reps
    if cuda and not syncs:
        pending = not torch.cuda.current_stream().query()   # still asleep: nothing waited on it
        host_ms = host_ms if pending else None
    if cuda and syncs:
        host_ms = None
    if cuda:
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            step()
        end.record()
        torch.cuda.synchronize()
        wall_ms = begin.elapsed_time(end) / reps
    else:
        wall_ms = host_ms
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(e.count for e in on_gpu)
    gpu_ms = sum(e.self_device_time_total for e in on_gpu) / 1e3 if cuda else None
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top_gpu = sorted(on_gpu, key=lambda e: e.self_device_time_total, reverse=True)
    return {"host_ms": host_ms, "wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms, "kernels": kernels,
            "top_host_ops": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in top],
            "gpu_kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 4)) for e in top_gpu]}


def profile_step(config: dict, impl: str, fraction: float, batch: int, seq_len: int, device: torch.device,
                 reps: int) -> dict:
    """One LM training step (bench_training's model, lr 0): wall, kernel sum, top kernels."""
    torch.manual_seed(0)
    model = bt.build(config, impl, fraction, seq_len, device)
    step, opt = bt.training_step(model, batch, seq_len, device, autocast=device.type == "cuda")

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / reps
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step()
        sync()
    events = prof.key_averages()
    # Operators with their input shapes and the GPU time of the kernels they (and their children)
    # launched: which call of which op a kernel's time belongs to.
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == torch.autograd.DeviceType.CPU and e.device_time_total > 0]
    ops.sort(key=lambda e: e.device_time_total, reverse=True)
    # Kernels only: the optimizer's annotated region also appears on the GPU timeline.
    on_gpu = [e for e in events
              if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    gpu_ms = sum(e.self_device_time_total for e in on_gpu) / 1e3
    ranked = sorted(on_gpu, key=lambda e: e.self_device_time_total, reverse=True)
    del model, opt
    return {"impl": impl, "resident": fraction, "wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms,
            "kernels": sum(e.count for e in on_gpu),
            "gpu_kernels": [(e.key, e.count, round(e.self_device_time_total / 1e3, 3)) for e in ranked],
            "ops": [(e.key, str(e.input_shapes)[:160], e.count, round(e.device_time_total / 1e3, 3))
                    for e in ops[:150]]}


def main_whole_step(args, config: dict, device: torch.device) -> int:
    batch, seq_len = (2, 64) if args.smoke else (16, 1024)
    rows = []
    print(f"{device}, {args.config if not args.smoke else 'smoke'}, {batch}x{seq_len} tokens; one training step")
    for fraction in args.fractions:
        for impl in args.impls:
            r = profile_step(config, impl, fraction, batch, seq_len, device, 2 if args.smoke else 5)
            rows.append(r)
            print(f"{impl:6s} resident {fraction:.2f}: wall {r['wall_ms']:.2f} ms, kernels {r['gpu_kernel_ms']:.2f} ms "
                  f"({r['kernels']} launches)", flush=True)
            for name, count, ms in r["gpu_kernels"][:30]:   # all of them in the JSON
                print(f"    {ms:8.3f} ms x{count:<4d} {name[:100]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fixed = {impl: fixed_share(rows, impl) for impl in args.impls}
    for impl, table in fixed.items():
        if table:
            total = sum(ms for _, ms, _, _ in table)
            print(f"{impl}: fixed kernel time (2 x half-resident - all-resident, per kernel) {total:.2f} ms; largest:")
            for name, ms, full, half in table[:25]:
                print(f"    {ms:8.3f} ms  (all {full:.3f}, half {half:.3f})  {name[:100]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "config": args.config, "rows": rows,
                                               "fixed_share": fixed}, indent=1))
    return 0


def fixed_share(rows: list[dict], impl: str) -> list[tuple[str, float, float, float]]:
    """Per kernel, the part of its time that does not shrink with the experts held: fitting
    time = fixed + kept share x proportional to the all- and half-resident steps gives
    fixed = 2 x half - all. [(kernel, fixed ms, all ms, half ms)], largest first; empty unless
    both residencies were profiled."""
    by = {r["resident"]: r for r in rows if r["impl"] == impl}
    if 1.0 not in by or 0.5 not in by:
        return []
    times = []
    for r in (by[1.0], by[0.5]):
        t: dict[str, float] = {}
        for name, _count, ms in r["gpu_kernels"]:
            t[name] = t.get(name, 0.0) + ms
        times.append(t)
    full, half = times
    table = [(name, 2 * half.get(name, 0.0) - full.get(name, 0.0), full.get(name, 0.0), half.get(name, 0.0))
             for name in set(full) | set(half)]
    return sorted(table, key=lambda row: row[1], reverse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="16e-top2", help=f"one of {', '.join(bt.CONFIGS)}")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU when there is no GPU)")
    ap.add_argument("--kernels", action="store_true", help="list every kernel with its GPU time")
    ap.add_argument("--whole-step", action="store_true", help="profile a whole LM training step instead")
    ap.add_argument("--impls", default="fomoe,torch", help="comma-separated subset of fomoe,torch")
    ap.add_argument("--fractions", default=",".join(map(str, bt.FRACTIONS)), help="resident shares to profile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.impls = args.impls.split(",")
    args.fractions = [float(f) for f in args.fractions.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bt.CONFIGS["smoke" if args.smoke else args.config]
    if args.whole_step:
        return main_whole_step(args, config, device)
    tokens = 256 if args.smoke else args.tokens
    reps = 2 if args.smoke else args.reps
    rows = []
    print(f"{device}, {args.config if not args.smoke else 'smoke'}, {tokens} tokens; per forward + backward of one layer")
    print(f"{'impl':6s} {'resident':>8s} {'host ms':>8s} {'wall ms':>8s} {'kernel ms':>9s} {'kernels':>7s}  top host ops")
    for fraction in args.fractions:
        for impl in args.impls:
            torch.manual_seed(0)
            layer = layer_for(config, impl, fraction, device)
            x = torch.randn(tokens, config["d_model"], device=device, dtype=bt.layer_input_dtype(device),
                            requires_grad=True)
            r = profile(layer, x, device, reps, syncs=impl == "torch")
            r.update(impl=impl, resident=fraction)
            rows.append(r)
            kernel = f"{r['gpu_kernel_ms']:9.3f}" if r["gpu_kernel_ms"] is not None else f"{'-':>9s}"
            ops = ", ".join(f"{k} x{c} {ms}ms" for k, c, ms in r["top_host_ops"][:5])
            host = f"{r['host_ms']:8.3f}" if r["host_ms"] is not None else f"{'(waits)':>8s}"
            print(f"{impl:6s} {fraction:8.2f} {host} {r['wall_ms']:8.3f} {kernel} {r['kernels']:7d}  {ops}",
                  flush=True)
            if args.kernels and impl == "fomoe" and fraction == min(bt.FRACTIONS):
                for name, count, ms in r["gpu_kernels"]:
                    print(f"    {ms:8.4f} ms x{count:<3d} {name}")
            del layer, x
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "config": args.config, "tokens": tokens,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
