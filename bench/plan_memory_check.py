"""Predicted vs measured peak memory of a training step (validation of ``fomoe.plan``).

Each case builds the LM ``fomoe train`` builds (``fomoe.lm.MoELM``, bf16 autocast, AdamW with
foreach) holding some or all of its experts, trains a few steps on fresh random tokens, then
measures one steady-state step phase by phase:

- ``forward_backward``: forward and backward (activations, autocast's weight copies, logits);
- ``optimizer_step``: the inner AdamW step with every gradient alive;
- ``outer_sync``: an outer sync of a ``SyncManager`` (one worker, θ_global on the GPU), for the
  cases that run one.

Measured on CUDA as ``torch.cuda.max_memory_allocated`` per phase; on the CPU (``--smoke``) as
the C allocator's live bytes after every op (glibc ``mallinfo2``), with the composite RMSNorm
the CPU runs. Predicted by ``fomoe.plan.worker_memory`` for the same shapes. A case passes when
its overall peak is within the tolerance (15%); the exit status is 1 if any case fails.

    python bench/plan_memory_check.py [--smoke] [--json PATH] [--tolerance 0.15]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass

import torch

import fomoe
from fomoe import plan
from fomoe.lm import LMConfig, MoELM


@dataclass(frozen=True)
class Case:
    name: str
    lm: dict
    micro_batch: int
    resident_fraction: float   # share of each layer's experts this worker holds
    outer_sync: bool           # run a one-worker SyncManager (θ_global, momentum, sync buffer)


CASES = {
    # ~1.6B parameters, expert-heavy: the persistent state and the optimizer step dominate
    "16e-top2-full": Case("16e-top2-full", dict(d_model=1024, n_layers=8, n_heads=16, num_experts=16, top_k=2,
                                                d_ff=4096, max_seq_len=1024, vocab_size=256),
                          micro_batch=16, resident_fraction=1.0, outer_sync=True),
    # the '1b' preset holding half its experts, a large batch: activations dominate
    "1b-half": Case("1b-half", dict(d_model=1024, n_layers=18, n_heads=16, num_experts=16, top_k=2, d_ff=1024,
                                    max_seq_len=1024, vocab_size=256),
                    micro_batch=32, resident_fraction=0.5, outer_sync=False),
}
SMOKE_CASES = {
    "smoke-full": Case("smoke-full", dict(d_model=96, n_layers=2, n_heads=4, num_experts=8, top_k=2, d_ff=192,
                                          max_seq_len=64, vocab_size=512),
                       micro_batch=4, resident_fraction=1.0, outer_sync=True),
    "smoke-half": Case("smoke-half", dict(d_model=96, n_layers=2, n_heads=4, num_experts=8, top_k=2, d_ff=192,
                                          max_seq_len=64, vocab_size=256),
                       micro_batch=4, resident_fraction=0.5, outer_sync=False),
}


# ---- meters -------------------------------------------------------------------------------------

class CudaMeter:
    """Allocated bytes of the CUDA caching allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def live(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class CpuMeter:
    """Live bytes of glibc's allocator, sampled after every aten op (a dispatch mode), with
    large blocks mapped and unmapped on demand so freed memory leaves the count."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = MallInfo2
        except (OSError, AttributeError) as exc:
            raise RuntimeError("the CPU meter needs glibc (mallinfo2)") from exc
        libc.mallopt(-3, 65536)   # M_MMAP_THRESHOLD
        self._libc = libc
        meter = self

        class Sampler(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._peak = max(meter._peak, meter.live())
                return out

        self._mode = Sampler()
        self._peak = 0

    def live(self) -> int:
        m = self._libc.mallinfo2()
        return m.uordblks + m.hblkhd

    def start(self) -> None:
        self._peak = self.live()

    def peak(self) -> int:
        return self._peak

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


# ---- one case -------------------------------------------------------------------------------------

def run_case(case: Case, device: torch.device, warmup: int = 2, log=print) -> dict:
    """Measure one case phase by phase and predict it; returns the comparison."""
    from fomoe.sync import SyncManager

    cfg = LMConfig(**case.lm)
    resident = max(cfg.top_k, round(cfg.num_experts * case.resident_fraction))
    torch.manual_seed(0)
    model = MoELM(cfg, resident_fn=lambda layer: list(range(resident))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    manager = None
    if case.outer_sync:
        manager = SyncManager(model, opt, method="diloco", sync_every=10 ** 9, rank=0, world_size=1,
                              global_device=device)
    tokens = case.micro_batch * cfg.max_seq_len
    meter = CudaMeter(device) if device.type == "cuda" else CpuMeter()
    gen = torch.Generator(device="cpu").manual_seed(1)

    def batch():
        return torch.randint(0, cfg.vocab_size, (case.micro_batch, cfg.max_seq_len + 1), generator=gen).to(device)

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ce, aux = model.loss(batch())
        (ce + aux).backward()

    def inner_step():
        if manager is not None:
            manager.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        forward_backward()
        inner_step()
    if manager is not None:
        manager.sync()   # the outer momentum exists from the first outer step on
    gc.collect()
    measured: dict[str, int] = {}
    with meter:
        steady = meter.live()
        meter.start()
        forward_backward()
        measured["forward_backward"] = meter.peak()
        meter.start()
        inner_step()
        measured["optimizer_step"] = meter.peak()
        if manager is not None:
            meter.start()
            manager.sync()
            measured["outer_sync"] = meter.peak()

    shape = plan.ModelShape.from_lm_config(cfg)
    # fomoe's Hopper GEMMs write the fp32 weight gradients directly (the GPU this check runs on
    # is an H200); the CPU kernels compute bf16 ones and widen them.
    hardware = plan.Hardware(fp32_weight_grads=device.type == "cuda")
    training = plan.Training(micro_batch=case.micro_batch, seq_len=cfg.max_seq_len)
    local = resident * cfg.n_layers
    if manager is not None:
        footprint = plan.SyncFootprint.of(manager.buckets, 0)
        mem = plan.worker_memory(shape, "diloco", local, footprint, hardware, training)
    else:
        mem = plan.worker_memory(shape, "ddp", local, plan.SyncFootprint(), hardware, training)
    predicted = {k: v for k, v in mem.phases().items() if k in measured}
    persistent = mem.weights + mem.optimizer + (mem.outer_state if manager is not None else 0)
    if device.type == "cuda":
        # absolute bytes: the CUDA allocator counts only tensors
        cmp_measured, cmp_predicted = measured, predicted
        steady_predicted = persistent
    else:
        # the C allocator also holds the interpreter: compare growth above the steady state
        cmp_measured = {k: v - steady for k, v in measured.items()}
        cmp_predicted = {k: v - persistent for k, v in predicted.items()}
        steady_predicted = None
    ratios = {k: cmp_predicted[k] / cmp_measured[k] for k in cmp_measured}
    peak_ratio = max(cmp_predicted.values()) / max(cmp_measured.values())
    result = {
        "case": case.name, "lm": case.lm, "micro_batch": case.micro_batch, "tokens": tokens,
        "resident_experts_per_layer": resident, "outer_sync": case.outer_sync,
        "params_held": sum(p.numel() for p in model.parameters()),
        "predicted_params_held": shape.dense_params() + local * shape.expert_numel(),
        "measured": measured, "predicted": predicted, "steady_measured": steady,
        "steady_predicted": steady_predicted, "compared_as": "absolute" if device.type == "cuda" else "above steady",
        "ratio_predicted_over_measured": ratios, "peak_ratio": peak_ratio,
        "breakdown": {k: v for k, v in mem.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)},
    }
    unit, div = ("GiB", 2 ** 30) if max(measured.values()) >= 2 ** 30 else ("MiB", 2 ** 20)
    log(f"{case.name}: {result['params_held']:,} parameters held, {tokens} tokens per step "
        f"({result['compared_as']})")
    for phase in measured:
        log(f"  {phase:17s} measured {cmp_measured[phase] / div:9.3f} {unit}  predicted "
            f"{cmp_predicted[phase] / div:9.3f} {unit}  ratio {ratios[phase]:.3f}")
    if steady_predicted is not None:
        log(f"  {'steady state':17s} measured {steady / div:9.3f} {unit}  predicted "
            f"{steady_predicted / div:9.3f} {unit}")
    log(f"  peak ratio {peak_ratio:.3f}")
    del manager, opt, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny cases (on the CPU without a GPU)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--cases", help="comma-separated case names (default: all of the mode)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    table = SMOKE_CASES if args.smoke else CASES
    if not args.smoke and not cuda:
        print("plan_memory_check: no CUDA GPU; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    names = args.cases.split(",") if args.cases else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"plan_memory_check: unknown cases {unknown}; choose from {', '.join(table)}", file=sys.stderr)
        return 2
    device = torch.device("cuda") if cuda else torch.device("cpu")
    print(f"device: {torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, fomoe {fomoe.__version__}, "
          f"reference fallbacks on CUDA: {fomoe.ops.reference_fallbacks() if cuda else '-'}")
    results, ok = [], True
    for name in names:
        start = time.perf_counter()
        r = run_case(table[name], device)
        r["seconds"] = time.perf_counter() - start
        r["passed"] = abs(r["peak_ratio"] - 1) <= args.tolerance
        ok &= r["passed"]
        results.append(r)
    out = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "tolerance": args.tolerance, "smoke": args.smoke, "cases": results, "passed": ok}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print("all cases within tolerance" if ok else "SOME CASES OUTSIDE TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
