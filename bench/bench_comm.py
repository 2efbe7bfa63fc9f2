"""Sparse expert all-reduce over NCCL: fomoe's transport vs ``torch.distributed.all_reduce``
(NCCL) moving the same bytes, in the same run.

Every worker holds one GPU. The transport's holder group (all workers) is prepared as a sync
prepares its schedule's groups, so an fp32 bucket is one ncclAllReduce on the group's own
communicator; the send/recv ring (the bf16 wire's path, and any unprepared group) is timed
too. For each bucket size (64 MiB .. 1 GiB of fp32) the collectives sum a fresh random buffer
over all workers, alternating iteration by iteration, timed with CUDA events on the caller's
stream two ways, median over the iterations: QUEUED calls back to back (per call; nccl-tests'
convention for bus bandwidth, and how a sync issues its buckets), and one call waited for on
its own (its host time to enqueue shows up as latency). Bus bandwidth is 2(n-1)/n * bytes /
time, so the two sides compare directly; the issue's target is fomoe >= 0.9x torch.
Before timing, both fomoe paths must return torch's exact sum for dyadic inputs (every fp32
sum exact). ``--slice-mb`` sweeps the ring's pipelining slice on the largest bucket;
``--bf16`` adds the bf16 wire (half the bytes; busbw counts fp32 bytes moved).

Needs at least two GPUs; with fewer it says so and exits cleanly (writing a JSON that says
skipped). Run through bench/device_run.sh or directly:

    python bench/bench_comm.py [--world 2] [--sizes-mb 64,128,256,512,1024] [--iters 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

SIZES_MB = (64, 128, 256, 512, 1024)
QUEUED = 5   # calls queued back to back per bus-bandwidth sample (nccl-tests' convention)


def _bus_bw(nbytes: int, n: int, seconds: float) -> float:
    return 2 * (n - 1) / n * nbytes / seconds / 1e9


def _time(fn, calls: int = 1) -> float:
    """Seconds per call of ``calls`` calls queued between two events on the caller's stream."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _worker(ctx, sizes_mb, iters, warmup, slice_mbs, bf16):
    import torch.distributed as dist

    from fomoe import comm
    torch.manual_seed(1234 + ctx.rank)
    n, ranks = ctx.world_size, tuple(range(ctx.world_size))
    transport = comm.NcclTransport(ctx.device)
    transport.prepare_groups([ranks])
    rows = []

    # Exactness first: dyadic inputs make every fp32 sum exact, so all must agree bitwise.
    x = (torch.randint(-1 << 10, 1 << 10, (3 * (1 << 20) + 7,), device=ctx.device).float() / 64)
    a, ring, b = x.clone(), x.clone(), x.clone()
    transport.sum_(a, ranks)
    transport.group_allreduce = False
    transport.sum_(ring, ranks)
    transport.group_allreduce = True
    dist.all_reduce(b)
    torch.cuda.synchronize()
    exact = bool(torch.equal(a, b)) and bool(torch.equal(ring, b))

    def measure(numel, slice_mb=None, wire=None, use_ring=False):
        transport.group_allreduce = not use_ring
        if slice_mb is not None:
            transport.slice_elems = int(slice_mb * (1 << 20)) // 4
        src = torch.randn(numel, device=ctx.device)
        buf = torch.empty_like(src)
        times = {"ours": [], "theirs": [], "ours_queued": [], "theirs_queued": []}
        ours, theirs = (lambda: transport.sum_(buf, ranks, wire)), (lambda: dist.all_reduce(buf))
        for it in range(warmup + iters):
            src.normal_()                     # fresh random input every iteration
            sample = {}
            for name, fn in (("ours", ours), ("theirs", theirs)):
                buf.copy_(src)
                sample[name] = _time(fn)
                buf.copy_(src)                # (QUEUED sums double it each time: no overflow)
                sample[name + "_queued"] = _time(fn, QUEUED)
            if it >= warmup:
                for name, t in sample.items():
                    times[name].append(t)
        return {name: statistics.median(t) for name, t in times.items()}

    def row_of(mb, numel, t, wire):
        bw = {k: _bus_bw(numel * 4, n, v) for k, v in t.items()}
        return {"bytes": numel * 4, "size_mib": mb, "wire": wire, "slice_mib": default_slice,
                "fomoe_s": t["ours"], "torch_s": t["theirs"],
                "fomoe_busbw_gbs": bw["ours_queued"], "torch_busbw_gbs": bw["theirs_queued"],
                "ratio": t["theirs_queued"] / t["ours_queued"],
                "fomoe_single_busbw_gbs": bw["ours"], "torch_single_busbw_gbs": bw["theirs"],
                "single_ratio": t["theirs"] / t["ours"]}

    default_slice = transport.slice_elems * 4 / (1 << 20)
    for mb in sizes_mb:
        numel = int(mb * (1 << 20)) // 4
        row = row_of(mb, numel, measure(numel, default_slice), "fp32")
        ring = measure(numel, default_slice, use_ring=True)
        row["ring_busbw_gbs"] = _bus_bw(numel * 4, n, ring["ours_queued"])
        row["ring_ratio"] = ring["theirs_queued"] / ring["ours_queued"]
        rows.append(row)
        if bf16:
            rows.append(row_of(mb, numel, measure(numel, default_slice, "bf16", use_ring=True), "bf16"))
        if ctx.rank == 0:
            print(f"  {mb:5d} MiB  fomoe {row['fomoe_busbw_gbs']:7.1f} GB/s  torch {row['torch_busbw_gbs']:7.1f} GB/s"
                  f"  ratio {row['ratio']:.3f}  (one call waited for: {row['single_ratio']:.3f}; send/recv ring "
                  f"{row['ring_busbw_gbs']:.1f} GB/s, {row['ring_ratio']:.3f})", flush=True)
    sweep = []
    for smb in slice_mbs:
        numel = int(max(sizes_mb) * (1 << 20)) // 4
        t = measure(numel, smb, use_ring=True)
        sweep.append({"slice_mib": smb, "bytes": numel * 4, "fomoe_busbw_gbs": _bus_bw(numel * 4, n, t["ours_queued"]),
                      "torch_busbw_gbs": _bus_bw(numel * 4, n, t["theirs_queued"])})
    transport.close()
    return {"rows": rows, "slice_sweep": sweep, "exact": exact, "versions": comm.nccl_versions(),
            "device": torch.cuda.get_device_name(ctx.device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="workers, one GPU each (default 2)")
    parser.add_argument("--sizes-mb", default=",".join(map(str, SIZES_MB)))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--slice-mb", default="8,32,128", help="slice sizes to sweep on the largest bucket ('' = none)")
    parser.add_argument("--bf16", action="store_true", help="also time fomoe's bf16 wire")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2 or args.world < 2:
        reason = f"needs at least 2 GPUs (found {gpus}); the sparse all-reduce is a multi-GPU collective"
        print(f"bench_comm: skipped: {reason}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"skipped": reason}, f, indent=1)
        return 0
    import fomoe
    from fomoe import comm, launch
    if comm.nccl_ops() is None:
        reason = "this fomoe build has no NCCL transport (build with CUDA: FOMOE_CUDA=1)"
        print(f"bench_comm: skipped: {reason}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"skipped": reason}, f, indent=1)
        return 0
    world = min(args.world, gpus)
    sizes = [int(s) for s in args.sizes_mb.split(",") if s]
    slices = [float(s) for s in args.slice_mb.split(",") if s]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    print(f"bench_comm: {world} workers x 1 GPU, buckets {sizes} MiB, {args.iters} iterations (median)", flush=True)
    out = launch.spawn(_worker, world, backend="nccl", args=(sizes, args.iters, args.warmup, slices, args.bf16),
                       timeout_s=600)[0]
    result = {"world": world, "fomoe": fomoe.__version__, "torch": torch.__version__, **out}
    if not out["exact"]:
        print("bench_comm: FAILED: fomoe's sum differs from torch.distributed.all_reduce on exact inputs")
    print("\n| bucket | fomoe busbw GB/s | torch all_reduce busbw GB/s | ratio | one call waited for: fomoe / torch "
          "GB/s (ratio) | send/recv ring GB/s (ratio) |")
    print("|---|---|---|---|---|---|")
    for r in out["rows"]:
        if r["wire"] == "fp32":
            print(f"| {r['size_mib']} MiB | {r['fomoe_busbw_gbs']:.1f} | {r['torch_busbw_gbs']:.1f} | {r['ratio']:.3f} | "
                  f"{r['fomoe_single_busbw_gbs']:.1f} / {r['torch_single_busbw_gbs']:.1f} ({r['single_ratio']:.3f}) | "
                  f"{r['ring_busbw_gbs']:.1f} ({r['ring_ratio']:.3f}) |")
    for s in out["slice_sweep"]:
        print(f"ring slice {s['slice_mib']:g} MiB: {s['fomoe_busbw_gbs']:.1f} GB/s, torch {s['torch_busbw_gbs']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ok = out["exact"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
