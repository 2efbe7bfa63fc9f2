"""Routing kernels against what a user would otherwise run, on one CUDA GPU, in the same process.

    python bench/bench_routing.py [--json PATH] [--quick]

For each kernel and shape it times fomoe's op and the plain-PyTorch equivalent:

  router    router logits forward + backward on a bf16 input (the copy the experts read):
            fomoe.ops.router_logits (bf16 pieces of the fp32 operands on tensor cores) vs
            F.linear(x.float(), w) (fp32 GEMMs); both logits' error vs fp64 reported
  route     torch.softmax(fp32) + torch.topk + renormalise (the usual Mixtral-style router)
  dispatch  resident-map mask + stable argsort + bincount + cumsum + inverse scatter
  gather    index_select of token rows into expert order (scaled: times a per-row weight, fp32
            then rounded, which is combine's gradient wrt its rows)
  combine   gate-weighted index_add_ back to token order
  gate grad combine's gradient wrt the gate weights: row-wise dot products of the gathered
            output gradient with the expert rows (what autograd of the index_add_ computes)
  copy      a device-to-device copy of the bytes gather/combine must move: the bandwidth ceiling

Two timings per case: "graph" replays a CUDA graph holding many calls over rotating input sets
(larger than L2 together) and reports the median device time per call; "eager" times single
calls after an L2 flush (median over many), as a user running eagerly sees them. PyTorch's
bincount reads its input's maximum on the host, so it cannot be captured: the graph timing of the
PyTorch dispatch counts with scatter_add_ instead (what a compiler would emit). Inputs are fresh
random data (never zeros). Prints a table last and writes every figure to --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys

import torch

import fomoe
from fomoe import ops
from graph_timing import graph_replay_ms

BF16 = torch.bfloat16


# ---- timing ---------------------------------------------------------------------------------

def graph_us(calls_over_sets, iters=15, calls=24):
    """Median device time per call of a CUDA graph replaying `calls` calls round-robin."""
    calls = max(calls, len(calls_over_sets))
    sequence = [calls_over_sets[i % len(calls_over_sets)] for i in range(calls)]
    return graph_replay_ms(sequence, iters) * 1e3 / calls


_flush = None


def eager_us(fn, iters=40):
    """Median time of single calls, each after an L2 flush (as triton.testing.do_bench)."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def input_sets(make, bytes_per_set):
    """Enough independent input sets that together they exceed three times the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return [make() for _ in range(max(2, min(32, math.ceil(3 * l2 / max(bytes_per_set, 1)))))]


# ---- the PyTorch equivalents ------------------------------------------------------------------

def torch_route(logits, k):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def torch_dispatch(ids, resident_map, num_local, capturable=False):
    slot = resident_map[ids.reshape(-1).long()]           # -1: expert not held here
    key = torch.where(slot >= 0, slot, num_local)         # skipped assignments sort last
    order = torch.argsort(key, stable=True)
    if capturable:
        counts = torch.zeros(num_local + 1, dtype=key.dtype, device=ids.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
    else:
        counts = torch.bincount(key, minlength=num_local + 1)
    offsets = torch.cumsum(counts[:num_local], 0)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
    return order, offsets, inverse


# ---- cases ------------------------------------------------------------------------------------

def row(kernel, shape, dtype, fomoe_graph, torch_graph, fomoe_eager, torch_eager, nbytes=None, copy_graph=None):
    r = dict(kernel=kernel, shape=shape, dtype=str(dtype).replace("torch.", ""),
             fomoe_us=fomoe_graph, torch_us=torch_graph, speedup=torch_graph / fomoe_graph,
             fomoe_eager_us=fomoe_eager, torch_eager_us=torch_eager, speedup_eager=torch_eager / fomoe_eager)
    if nbytes is not None:
        r.update(bytes=nbytes, fomoe_GBps=nbytes / fomoe_graph / 1e3, torch_GBps=nbytes / torch_graph / 1e3,
                 copy_us=copy_graph, copy_GBps=nbytes / copy_graph / 1e3, pct_of_copy=100 * copy_graph / fomoe_graph)
    print(f"  {kernel:9s} {shape:28s} {r['dtype']:9s} fomoe {fomoe_graph:8.1f} us  torch {torch_graph:8.1f} us  "
          f"x{r['speedup']:5.1f}" + (f"  {r['fomoe_GBps']:6.0f} GB/s = {r['pct_of_copy']:5.1f}% of copy"
                                    if nbytes is not None else ""), flush=True)
    return r


def bench_router_logits(T, d, E, gen):
    w = (torch.randn(E, d, generator=gen, device="cuda") * 0.02).requires_grad_(True)
    sets = input_sets(lambda: (torch.randn(T, d, generator=gen, device="cuda").to(BF16).requires_grad_(True),
                               torch.randn(T, E, generator=gen, device="cuda")), T * d * 2 + T * E * 4)

    def ours(x, g):
        return torch.autograd.grad(ops.router_logits(x, w), (x, w), g)

    def theirs(x, g):
        return torch.autograd.grad(torch.nn.functional.linear(x.float(), w), (x, w), g)

    f = graph_us([lambda s=s: ours(*s) for s in sets])
    t = graph_us([lambda s=s: theirs(*s) for s in sets])
    fe, te = eager_us(lambda: ours(*sets[0])), eager_us(lambda: theirs(*sets[0]))
    x = sets[0][0].detach()
    exact = x.double() @ w.detach().double().T
    scale = 2.0 ** -24 * (x.double().abs() @ w.detach().double().abs().T).max()
    r = row("router", f"T={T} d={d} E={E}", BF16, f, t, fe, te)
    r["logit_err_fomoe_u"] = ((ops.router_logits(x, w).double() - exact).abs().max() / scale).item()
    r["logit_err_torch_u"] = ((torch.nn.functional.linear(x.float(), w).double() - exact).abs().max() / scale).item()
    bf16_router = torch.mm(x, w.detach().to(BF16).T, out_dtype=torch.float32)  # the fast, inexact alternative
    r["logit_err_bf16_weights_u"] = ((bf16_router.double() - exact).abs().max() / scale).item()
    print(f"            max logit error vs fp64, in units of 2^-24 max|terms|: fomoe {r['logit_err_fomoe_u']:.2f}, "
          f"torch {r['logit_err_torch_u']:.2f} (a bf16 copy of the weights: {r['logit_err_bf16_weights_u']:.0f})",
          flush=True)
    return r


def bench_route(T, E, k, dtype, gen):
    sets = input_sets(lambda: (torch.randn(T, E, generator=gen, device="cuda") * 2).to(dtype),
                      T * E * torch.finfo(dtype).bits // 8)
    f = graph_us([lambda x=x: ops.route(x, k) for x in sets])
    t = graph_us([lambda x=x: torch_route(x, k) for x in sets])
    fe = eager_us(lambda: ops.route(sets[0], k))
    te = eager_us(lambda: torch_route(sets[0], k))
    # Same picks (the logits are continuous, so ties are rare; count the rows that differ).
    w_f, ids_f = ops.route(sets[0], k)
    w_t, ids_t = torch_route(sets[0], k)
    agree = (ids_f.long() == ids_t).all(1).float().mean().item()
    r = row("route", f"T={T} E={E} k={k}", dtype, f, t, fe, te)
    r["rows_with_same_ids"] = agree
    return r


def bench_dispatch(T, E, k, num_local, gen):
    resident_map = torch.full((E,), -1, dtype=torch.int32)
    held = torch.randperm(E, generator=torch.Generator().manual_seed(E))[:num_local].sort().values
    resident_map[held] = torch.arange(num_local, dtype=torch.int32)
    resident_map = resident_map.cuda()

    def make():
        return ops.route(torch.randn(T, E, generator=gen, device="cuda"), k)[1]

    sets = input_sets(make, T * k * 4)
    f = graph_us([lambda i=i: ops.dispatch(i, resident_map, num_local) for i in sets])
    t = graph_us([lambda i=i: torch_dispatch(i, resident_map, num_local, capturable=True) for i in sets])
    fe = eager_us(lambda: ops.dispatch(sets[0], resident_map, num_local))
    te = eager_us(lambda: torch_dispatch(sets[0], resident_map, num_local))
    perm, offsets, _ = ops.dispatch(sets[0], resident_map, num_local)
    order, offsets_t, _ = torch_dispatch(sets[0], resident_map, num_local)
    kept = int(offsets[-1])
    assert torch.equal(offsets[1:].long(), offsets_t) and torch.equal(perm[:kept].long(), order[:kept])
    r = row("dispatch", f"T={T} E={E} k={k} local={num_local}", torch.int32, f, t, fe, te)
    r["kept_fraction"] = kept / (T * k)
    return r


def copy_graph_us(nbytes):
    """Device copy moving nbytes (half read, half written), over rotating buffers."""
    n = nbytes // 4  # bytes per direction / 2 bytes per bf16 element
    src = [torch.randn(n, device="cuda").to(BF16) for _ in range(2)]
    dst = [torch.empty_like(s) for s in src]
    return graph_us([lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)])


def all_rows_kept(T, k, gen):
    """Dispatch tables of T tokens with k distinct experts each out of 4k, all resident."""
    E = 4 * k
    ids = torch.rand(T, E, generator=gen, device="cuda").argsort(1)[:, :k].to(torch.int32)
    return ops.dispatch(ids, torch.arange(E, dtype=torch.int32, device="cuda"), E)


def bench_gather(T, k, d, gen):
    n = T * k
    perm, _, inv = all_rows_kept(T, k, gen)
    token = (perm.long() // k)
    xs = [torch.randn(T, d, generator=gen, device="cuda").to(BF16) for _ in range(2)]
    nbytes = (T * d + n * d) * 2 + n * 4  # each token row read once, every expert row written, the table
    f = graph_us([lambda x=x: ops.gather(x, perm, inv) for x in xs])
    t = graph_us([lambda x=x: x.index_select(0, token) for x in xs])
    fe = eager_us(lambda: ops.gather(xs[0], perm, inv))
    te = eager_us(lambda: xs[0].index_select(0, token))
    assert torch.equal(ops.gather(xs[0], perm, inv), xs[0].index_select(0, token))
    return row("gather", f"rows={n} (T={T} k={k}) d={d}", BF16, f, t, fe, te, nbytes, copy_graph_us(nbytes))


def bench_scaled_gather(T, k, d, gen):
    """Gather with a per-row scale: combine's gradient wrt its rows (gate * grad_out[token])."""
    n = T * k
    perm, _, inv = all_rows_kept(T, k, gen)
    token = perm.long() // k
    gate = torch.rand(T, k, generator=gen, device="cuda")
    gate_of_row = gate.reshape(-1)[perm.long()].unsqueeze(1)
    xs = [torch.randn(T, d, generator=gen, device="cuda").to(BF16) for _ in range(2)]
    nbytes = (T * d + n * d) * 2 + n * 8  # token rows read once, expert rows written, table + scale

    def torch_scaled(x):
        return (x.index_select(0, token).float() * gate_of_row).to(BF16)

    f = graph_us([lambda x=x: ops.gather(x, perm, inv, gate) for x in xs])
    t = graph_us([lambda x=x: torch_scaled(x) for x in xs])
    fe = eager_us(lambda: ops.gather(xs[0], perm, inv, gate))
    te = eager_us(lambda: torch_scaled(xs[0]))
    r = row("gather (scaled)", f"rows={n} (T={T} k={k}) d={d}", BF16, f, t, fe, te, nbytes, copy_graph_us(nbytes))
    r["equals_torch"] = torch.equal(ops.gather(xs[0], perm, inv, gate), torch_scaled(xs[0]))  # one rounding each
    if not r["equals_torch"]:
        print("  MISMATCH: scaled gather differs from PyTorch's", flush=True)
    return r


def bench_combine(T, k, d, gen):
    n = T * k
    perm, _, inv = all_rows_kept(T, k, gen)
    token = perm.long() // k
    gate = torch.rand(T, k, generator=gen, device="cuda")
    gate_of_row = gate.reshape(-1)[perm.long()]
    rows = [torch.randn(n, d, generator=gen, device="cuda").to(BF16) for _ in range(2)]
    nbytes = (n * d + T * d) * 2 + n * 8  # every expert row read once, token rows written, table + gate

    def torch_combine(r):
        y = torch.zeros(T, d, dtype=r.dtype, device=r.device)
        return y.index_add_(0, token, r * gate_of_row.unsqueeze(1).to(r.dtype))

    f = graph_us([lambda r=r: ops.combine(r, perm, inv, gate) for r in rows])
    t = graph_us([lambda r=r: torch_combine(r) for r in rows])
    fe = eager_us(lambda: ops.combine(rows[0], perm, inv, gate))
    te = eager_us(lambda: torch_combine(rows[0]))
    ours, theirs = ops.combine(rows[0], perm, inv, gate).float(), torch_combine(rows[0]).float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 2e-2  # PyTorch adds in bf16 here
    return row("combine", f"rows={n} (T={T} k={k}) d={d}", BF16, f, t, fe, te, nbytes, copy_graph_us(nbytes))


def bench_combine_gate_grad(T, k, d, gen):
    """The gate weights' gradient of combine (its rows' gradient is a scaled gather, timed above)."""
    n = T * k
    perm, _, inv = all_rows_kept(T, k, gen)
    token = perm.long() // k
    rows = [torch.randn(n, d, generator=gen, device="cuda").to(BF16) for _ in range(2)]
    grad_out = torch.randn(T, d, generator=gen, device="cuda").to(BF16)
    nbytes = (n * d + T * d) * 2 + n * 8  # every expert row and grad_out row read once, table, gradient

    def ours(r):
        return torch.ops.fomoe.combine_gate_grad(grad_out, r, inv)

    def torch_gate_grad(r):  # what autograd of the weighted index_add_ computes, per expert-order row
        return (grad_out.index_select(0, token) * r).sum(-1, dtype=torch.float32)

    f = graph_us([lambda r=r: ours(r) for r in rows])
    t = graph_us([lambda r=r: torch_gate_grad(r) for r in rows])
    fe = eager_us(lambda: ours(rows[0]))
    te = eager_us(lambda: torch_gate_grad(rows[0]))
    expect = torch.empty(n, device="cuda").scatter_(0, perm.long(), (grad_out.float().index_select(0, token)
                                                                      * rows[0].float()).sum(-1))
    r = row("gate grad", f"rows={n} (T={T} k={k}) d={d}", BF16, f, t, fe, te, nbytes, copy_graph_us(nbytes))
    r["close_to_fp32_reference"] = torch.allclose(ours(rows[0]).reshape(-1), expect, rtol=1e-3, atol=1e-2)
    if not r["close_to_fp32_reference"]:
        print("  MISMATCH: gate gradient differs from the fp32 reference", flush=True)
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_routing: needs a CUDA GPU; nothing to measure on this machine")
        return 0
    fallbacks = [n for n in ("router_logits", "route", "dispatch", "gather", "combine") if n in ops.reference_fallbacks()]
    if fallbacks:
        print(f"bench_routing: this build has no CUDA kernels for {fallbacks}; build with CUDA first")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, torch=torch.__version__, fomoe=fomoe.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv))
    print(f"bench_routing on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}", flush=True)

    results = []
    print("router: fomoe.ops.router_logits vs F.linear(x.float(), w), bf16 x, forward + backward", flush=True)
    for T, d, E in ((16384, 1024, 64), (16384, 2048, 128), (8192, 4096, 8)):
        results.append(bench_router_logits(T, d, E, gen))
        if args.quick:
            break
    print("route: fomoe.route vs softmax + topk + renormalise", flush=True)
    route_shapes = [(16384, 128, 8), (8192, 8, 2)]
    for T, E, k in route_shapes:
        for dtype in (BF16, torch.float32):
            results.append(bench_route(T, E, k, dtype, gen))
        if args.quick:
            break
    print("dispatch: fomoe.dispatch vs mask + argsort + bincount + cumsum (half the experts resident)", flush=True)
    for T, E, k in route_shapes:
        results.append(bench_dispatch(T, E, k, E // 2, gen))
        if args.quick:
            break
    print("gather / combine (bf16, all rows kept) vs index_select / weighted index_add_; copy = ceiling",
          flush=True)
    for d in (4096, 2048):
        for T, k in ((2048, 8), (8192, 2)):
            results.append(bench_gather(T, k, d, gen))
            results.append(bench_scaled_gather(T, k, d, gen))
            results.append(bench_combine(T, k, d, gen))
            results.append(bench_combine_gate_grad(T, k, d, gen))
            if args.quick:
                break
        if args.quick:
            break

    print("\n| kernel | shape | dtype | fomoe µs | PyTorch µs | speedup | eager speedup | GB/s | % of copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bw = f"{r['fomoe_GBps']:.0f} | {r['pct_of_copy']:.0f}%" if "bytes" in r else "– | –"
        print(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['fomoe_us']:.1f} | {r['torch_us']:.1f} | "
              f"{r['speedup']:.1f}x | {r['speedup_eager']:.1f}x | {bw} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
