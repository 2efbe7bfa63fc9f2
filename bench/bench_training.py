"""Skip-token training throughput: the fomoe MoE LM vs the same LM built from plain PyTorch ops.

One training step = forward + backward + AdamW step of ``fomoe.lm.MoELM`` (byte vocabulary,
RoPE attention, an MoE FFN in every block) under bf16 autocast, on fresh random tokens each
step. Each configuration is measured with all, 1/2 and 1/4 of the experts resident
(skip-token drops the assignments to the others), for two FFN implementations in the same run:

- ``fomoe``: ``fomoe.MoE`` (route -> dispatch -> fused expert_ffn ops);
- ``torch``: what a PyTorch user writes: router matmul, softmax + top-k, ``argsort`` of the
  assignments by expert, ``index_select`` of the kept rows, ``torch._grouped_mm`` twice (inputs
  cast to bf16, since ``_grouped_mm`` ignores autocast), ``index_add_`` back to tokens.

The steps run with AdamW's learning rate at 0: the optimizer does exactly the arithmetic of a
real step, but the weights stay at their initialisation (with a real learning rate the routing
drifts on random tokens within the warm-up, even with the router frozen, and the configuration
measured is no longer the one named). At initialisation the router spreads tokens unevenly
enough that one set of resident experts can keep a few points more or less than its share
(experts 0-15 of 64 kept 28% of the assignments in one run). So a residency of 1/W is measured
on every worker of a partition (worker w holds experts [w*n, (w+1)*n), all with the same router
weights) and reported as the mean step: its skipped share is the residency's, as in a
federation, where every assignment is kept by exactly one worker (here exactly in the first
MoE layer: deeper ones see each worker's own residual stream, and the mean lands within a
fraction of a point). ``--workers first`` measures worker 0 alone (quicker). Within a worker
both implementations get the same router and expert weights (and the same tokens), so they
route alike and skip the same share; each row reports that share next to the expected one.

Reported: tokens/s, speedup from skipping (vs all resident, same implementation), fomoe's
tokens/s over the torch-ops model, and where a step's time goes: the MoE layers' forward +
backward (timed alone, on random inputs of the same shape), the optimizer step, and the rest
(embedding, attention, norms, head, loss). ``--smoke`` runs tiny shapes (on the CPU when there
is no GPU) as a quick check of the script itself.

    python bench/bench_training.py [--smoke] [--json PATH] [--configs 16e-top2,64e-top8]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fomoe
from fomoe.layer import MoE, MoEConfig
from fomoe.lm import LMConfig, MoELM

CONFIGS = {
    "16e-top2": dict(d_model=1024, n_layers=8, n_heads=16, num_experts=16, top_k=2, d_ff=4096),
    "64e-top8": dict(d_model=1024, n_layers=8, n_heads=16, num_experts=64, top_k=8, d_ff=512),
    "smoke": dict(d_model=64, n_layers=2, n_heads=4, num_experts=8, top_k=2, d_ff=128),
}
# Measured on one H200 with the torch-ops model (DESIGN.md): tokens/s all resident and the
# speedups at 1/2 and 1/4 resident that fomoe's skipping must at least match.
REFERENCE = {"16e-top2": (159e3, {0.5: 1.62, 0.25: 2.27}), "64e-top8": (185e3, {0.5: 1.51, 0.25: 1.88})}
FRACTIONS = (1.0, 0.5, 0.25)
SKIP_TOLERANCE = 0.05  # measured skipped share vs 1 - resident share: flagged beyond this


class TorchOpsMoE(nn.Module):
    """The same MoE layer as ``fomoe.MoE`` (softmax top-k, renormalised, SwiGLU experts, skip-token)
    written with plain PyTorch ops, holding only the resident experts."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        resident = cfg.resident
        self.num_local = len(resident)
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(self.num_local, cfg.d_model, 2 * cfg.d_ff))
        self.w2 = nn.Parameter(torch.empty(self.num_local, cfg.d_ff, cfg.d_model))
        local = torch.full((cfg.num_experts,), -1, dtype=torch.int64)
        local[list(resident)] = torch.arange(self.num_local)
        self.register_buffer("resident_map", local, persistent=False)
        nn.init.normal_(self.router.weight, std=cfg.init_std)
        nn.init.normal_(self.w13, std=cfg.init_std)
        nn.init.normal_(self.w2, std=cfg.init_std / math.sqrt(2.0))
        self.aux_loss = None
        self.skipped_fraction = 0.0

    def forward(self, x: Tensor) -> Tensor:
        k, d = self.cfg.top_k, self.cfg.d_model
        xs = x.reshape(-1, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(xs.float(), self.router.weight.float())
        weights, ids = logits.softmax(-1).topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        # Sort assignments by local expert; non-resident ones sort last and are cut off.
        local = self.resident_map[ids.reshape(-1)]
        key = torch.where(local >= 0, local, self.num_local)
        order = torch.argsort(key, stable=True)
        ends = torch.bincount(key, minlength=self.num_local + 1)[:self.num_local].cumsum(0).to(torch.int32)
        kept = int(ends[-1])  # host sync: a plain-PyTorch layer needs the kept count to slice
        self.skipped_fraction = 1.0 - kept / max(ids.numel(), 1)
        order = order[:kept]
        token = order // k
        rows = xs.to(torch.bfloat16).index_select(0, token)
        h = torch._grouped_mm(rows, self.w13.to(torch.bfloat16), offs=ends)
        gate_h, up_h = h.chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate_h) * up_h, self.w2.to(torch.bfloat16), offs=ends)
        out = out.float() * weights.reshape(-1)[order].unsqueeze(1)
        y = torch.zeros(xs.shape, dtype=torch.float32, device=x.device).index_add_(0, token, out)
        return y.to(x.dtype).reshape(x.shape)


def fomoe_factory(cfg: MoEConfig) -> nn.Module:
    # Random init on the device (per-expert seeded init draws on the CPU: slow at this size).
    return MoE(dataclasses.replace(cfg, init_seed=None))


FACTORIES = {"fomoe": fomoe_factory, "torch": TorchOpsMoE}


def partition_workers(fraction: float) -> int:
    """Workers of a partition in which each holds ``fraction`` of the experts."""
    workers = round(1 / fraction)
    if not math.isclose(workers * fraction, 1.0):
        raise ValueError(f"resident fraction {fraction} is not 1/W")
    return workers


def build(config: dict, impl: str, fraction: float, seq_len: int, device: torch.device, worker: int = 0) -> MoELM:
    """The model of worker ``worker`` of a partition where each holds ``fraction`` of the experts:
    experts [worker * n, (worker + 1) * n) resident."""
    cfg = LMConfig(**config, max_seq_len=seq_len, aux_loss_coef=0.0, z_loss_coef=0.0)
    n_resident = max(cfg.top_k if fraction < 1 else cfg.num_experts, round(cfg.num_experts * fraction))
    if (worker + 1) * n_resident > cfg.num_experts:
        raise ValueError(f"worker {worker} of a {fraction} partition exceeds {cfg.num_experts} experts")
    resident = list(range(worker * n_resident, (worker + 1) * n_resident))
    with torch.device(device):
        return MoELM(cfg, resident_fn=lambda layer: resident, seed=0, moe_factory=FACTORIES[impl])


def skipped_fraction(model: MoELM) -> float:
    values = []
    for moe in model.moe_layers():
        if isinstance(moe, MoE):
            values.append(float(moe.stats.skipped_fraction))
        else:
            values.append(moe.skipped_fraction)
    return sum(values) / len(values)


def expected_skipped(model: MoELM) -> float:
    """Share of assignments skip-token drops under balanced routing: 1 - resident experts / E."""
    layer = model.moe_layers()[0]  # every layer holds the same experts here
    return 1.0 - layer.num_local / model.config.num_experts


class Timer:
    """Elapsed milliseconds of a region: CUDA events on a GPU (read after the final sync, so
    recording them never stalls the queue), the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pairs: list = []

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self.pairs.append([start, None])
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.pairs[-1][1] = end

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs)
        return sum(1e3 * (b - a) for a, b in self.pairs)


def training_step(model: MoELM, batch: int, seq_len: int, device: torch.device, autocast: bool = True,
                  optimizer_region=contextlib.nullcontext()):
    """The benchmarks' training step on fresh random tokens: (step() -> loss, its optimizer).

    Every parameter is in the optimizer at learning rate 0 (see the module docstring): the
    step's cost is a real training step's, the routing stays at its balanced initialisation.
    ``optimizer_region`` (a reusable context manager) wraps the optimizer step, to time it."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> Tensor:
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device, generator=gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            ce, aux = model.loss(tokens)
        (ce + aux).backward()
        with optimizer_region:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return ce

    return step, opt


def measure(model: MoELM, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device) -> dict:
    opt_timer = Timer(device)
    step, opt = training_step(model, batch, seq_len, device, optimizer_region=opt_timer)

    for _ in range(warmup):
        step()
    opt_timer.pairs.clear()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"non-finite loss {float(loss)} in the benchmark step")
    result = {"tokens_per_s": batch * seq_len * steps / elapsed, "step_ms": 1e3 * elapsed / steps,
              "skipped_fraction": skipped_fraction(model), "expected_skipped": expected_skipped(model),
              "loss": float(loss.detach()),
              "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
              "optimizer_ms": opt_timer.total_ms() / steps}
    opt.zero_grad(set_to_none=True)
    del opt
    result["moe_ms"] = moe_layers_ms(model, batch, seq_len, device)
    result["rest_ms"] = result["step_ms"] - result["moe_ms"] - result["optimizer_ms"]
    return result


def layer_input_dtype(device: torch.device) -> torch.dtype:
    """What an MoE layer of the LM reads: the norm before it writes the GEMM dtype (bf16 under
    the GPU's autocast), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def moe_layers_ms(model: MoELM, batch: int, seq_len: int, device: torch.device, reps: int = 3) -> float:
    """Milliseconds of forward + backward through every MoE layer of the model, one after another,
    alone: random inputs shaped and typed like the normed residual stream the blocks feed them,
    bf16 autocast."""
    layers = model.moe_layers()
    d = model.config.d_model
    gen = torch.Generator(device=device).manual_seed(1)
    dtype = layer_input_dtype(device)
    x = torch.randn(batch, seq_len, d, device=device, generator=gen, dtype=dtype).requires_grad_(True)
    grad = torch.randn(batch, seq_len, d, device=device, generator=gen, dtype=dtype)

    def run() -> None:
        for layer in layers:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                y = layer(x)
            y.backward(grad)
        x.grad = None
        model.zero_grad(set_to_none=True)

    run()  # warm-up
    timer = Timer(device)
    for _ in range(reps):
        with timer:
            run()
    return timer.total_ms() / reps


@torch.no_grad()
def copy_moe_weights(src: MoELM, dst: MoELM) -> None:
    """Give dst's MoE layers src's router and expert weights (the dense parameters are seeded
    identically already): both implementations then route the same tokens the same way."""
    for a, b in zip(src.moe_layers(), dst.moe_layers()):
        b.router.weight.copy_(a.router.weight)
        b.w13.copy_(a.w13)
        b.w2.copy_(a.w2)


def check_same_function(config: dict, device: torch.device) -> float:
    """Both implementations compute the same network: copy weights, compare losses."""
    models = {impl: build(config, impl, 0.5, 16, device) for impl in FACTORIES}
    copy_moe_weights(models["fomoe"], models["torch"])
    tokens = torch.randint(0, 256, (2, 17), device=device, generator=torch.Generator(device=device).manual_seed(1))
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        losses = {impl: float(m.loss(tokens)[0]) for impl, m in models.items()}
    gap = abs(losses["fomoe"] - losses["torch"])
    if gap > 2e-2 * abs(losses["torch"]):
        raise RuntimeError(f"the two implementations disagree: losses {losses}")
    return gap


def over_workers(results: list[dict], tokens_per_step: int) -> dict:
    """One row from the workers of a partition: the mean step (its time split alike) and the mean
    skipped share, which is the residency's exactly (every assignment is kept by one worker);
    tokens/s is a step of that mean time's, and the slowest worker's comes alongside."""
    mean = {key: sum(r[key] for r in results) / len(results)
            for key in ("step_ms", "moe_ms", "optimizer_ms", "rest_ms", "skipped_fraction", "loss")}
    peak = [r["peak_mem_gib"] for r in results if r["peak_mem_gib"] is not None]
    return {**mean, "tokens_per_s": 1e3 * tokens_per_step / mean["step_ms"],
            "expected_skipped": results[0]["expected_skipped"], "peak_mem_gib": max(peak) if peak else None,
            "slowest_tokens_per_s": min(r["tokens_per_s"] for r in results),
            "workers": [{key: r[key] for key in ("tokens_per_s", "step_ms", "skipped_fraction")} for r in results]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps (CPU when no GPU)")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; smoke 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; smoke 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    ap.add_argument("--impls", default="fomoe,torch", help="comma-separated subset of fomoe,torch")
    ap.add_argument("--workers", choices=("all", "first"), default="all",
                    help="with part of the experts resident, measure every worker of the partition (default) "
                         "or only the first (experts 0..n-1: quicker, but its share of the routing is the "
                         "router's, not the residency's)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        ap.error("no CUDA GPU: the full benchmark needs one (use --smoke for a quick CPU check)")
    names = (args.configs or ("smoke" if args.smoke else "16e-top2,64e-top8")).split(",")
    impls = args.impls.split(",")
    for name in names:
        if name not in CONFIGS:
            ap.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    for impl in impls:
        if impl not in FACTORIES:
            ap.error(f"unknown implementation {impl!r}; choose from {', '.join(FACTORIES)}")
    batch = args.batch or (2 if args.smoke else 16)
    seq_len = args.seq_len or (64 if args.smoke else 1024)
    steps = args.steps or (2 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    torch.manual_seed(0)

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "fomoe_cuda_kernels": fomoe.WITH_CUDA,
           "reference_fallbacks": fomoe.ops.reference_fallbacks() if device.type == "cuda" else [],
           "batch": batch, "seq_len": seq_len, "steps": steps, "warmup": warmup}
    print(f"# bench_training on {env['device']}, torch {env['torch']}, {batch}x{seq_len} tokens/step, "
          f"{steps} timed steps; fomoe CUDA kernels: {env['fomoe_cuda_kernels']}"
          + (f", ops on the reference fallback: {env['reference_fallbacks']}" if env["reference_fallbacks"] else ""))
    rows = []
    for name in names:
        gap = check_same_function(CONFIGS[name], device)
        print(f"## {name}: {CONFIGS[name]} (implementations agree: loss gap {gap:.2e})")
        for fraction in FRACTIONS:
            workers = partition_workers(fraction) if args.workers == "all" else 1
            per_worker: dict[str, list[dict]] = {impl: [] for impl in impls}
            routers = None  # the first worker's: every worker routes alike, each keeps its share
            for worker in range(workers):
                first = None
                for impl in impls:
                    model = build(CONFIGS[name], impl, fraction, seq_len, device, worker)
                    if routers is None:
                        routers = [moe.router.weight.detach().clone() for moe in model.moe_layers()]
                    else:
                        with torch.no_grad():
                            for moe, weight in zip(model.moe_layers(), routers):
                                moe.router.weight.copy_(weight)
                    if first is not None:  # the same weights, so the same routing and skipped share
                        copy_moe_weights(first, model)
                        first = None
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    result = measure(model, batch, seq_len, steps, warmup, device)
                    per_worker[impl].append(result)
                    label = f"resident {fraction:<4}" + (f" worker {worker}" if workers > 1 else "")
                    print(f"  {impl:5s} {label:20s} {result['tokens_per_s']:>12,.0f} tok/s "
                          f"{result['step_ms']:9.1f} ms/step (MoE layers {result['moe_ms']:.1f}, optimizer "
                          f"{result['optimizer_ms']:.1f}, rest {result['rest_ms']:.1f})  skipped "
                          f"{result['skipped_fraction']:.3f} (expected {result['expected_skipped']:.3f})", flush=True)
                    if impl == impls[0] and len(impls) > 1:
                        first = model
                    del model
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            for impl in impls:
                result = over_workers(per_worker[impl], batch * seq_len)
                rows.append({"config": name, "impl": impl, "resident_fraction": fraction, **result})
                off = abs(result["skipped_fraction"] - result["expected_skipped"]) > SKIP_TOLERANCE
                if workers > 1 or off:
                    print(f"  {impl:5s} resident {fraction:<4} mean of {workers} workers: "
                          f"{result['tokens_per_s']:>10,.0f} tok/s {result['step_ms']:9.1f} ms/step (slowest worker "
                          f"{result['slowest_tokens_per_s']:,.0f} tok/s)  skipped {result['skipped_fraction']:.3f} "
                          f"(expected {result['expected_skipped']:.3f})"
                          + ("  WARNING: the skipped share is not the residency's" if off else ""), flush=True)

    def find(config, impl, fraction):
        return next((r for r in rows if (r["config"], r["impl"], r["resident_fraction"]) == (config, impl, fraction)),
                    None)

    for r in rows:
        base = find(r["config"], r["impl"], 1.0)
        r["speedup_vs_all_resident"] = r["tokens_per_s"] / base["tokens_per_s"]
        other = find(r["config"], "torch", r["resident_fraction"])
        r["vs_torch_ops"] = r["tokens_per_s"] / other["tokens_per_s"] if other else None

    print("\n| config | resident | impl | tokens/s | skip speedup | reference skip speedup | vs torch ops "
          "| skipped (expected) | step ms = MoE layers + optimizer + rest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = REFERENCE.get(r["config"], (None, {}))[1].get(r["resident_fraction"])
        vs = f"{r['vs_torch_ops']:.2f}x" if r["vs_torch_ops"] is not None else "-"
        print(f"| {r['config']} | {r['resident_fraction']} | {r['impl']} | {r['tokens_per_s']:,.0f} | "
              f"{r['speedup_vs_all_resident']:.2f}x | {f'{ref:.2f}x' if ref else '-'} | {vs} | "
              f"{r['skipped_fraction']:.3f} ({r['expected_skipped']:.3f}) | {r['step_ms']:.1f} = "
              f"{r['moe_ms']:.1f} + {r['optimizer_ms']:.1f} + {r['rest_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "reference": {k: {"tokens_per_s": v[0], "speedups": v[1]}
                                                               for k, v in REFERENCE.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
