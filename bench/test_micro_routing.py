"""Micro-benchmarks of the routing ops with pytest-benchmark: fomoe's kernels next to the plain
PyTorch code a user would write, per group (compare within a group). CPU cases always; small
CUDA cases (per-call latency of a tiny problem, host overhead included) when a GPU is present.

    python -m pytest bench/test_micro_routing.py --benchmark-group-by=group

Not collected by the default test run (testpaths = tests). Inputs are fresh random data.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fomoe import ops  # noqa: E402

CASES = {
    "T=1024 E=64 k=8": (1024, 64, 8),
    "T=4096 E=8 k=2": (4096, 8, 2),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synced(fn, device):
    if device == "cpu":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def torch_route(logits, k):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def torch_dispatch(ids, resident_map, num_local):
    slot = resident_map[ids.reshape(-1).long()]
    key = torch.where(slot >= 0, slot, num_local)
    order = torch.argsort(key, stable=True)
    offsets = torch.cumsum(torch.bincount(key, minlength=num_local + 1)[:num_local], 0)
    return order, offsets


def problem(T, E, k, device):
    gen = torch.Generator().manual_seed(T * 31 + E)
    logits = torch.randn(T, E, generator=gen).to(device)
    resident_map = torch.full((E,), -1, dtype=torch.int32)
    resident_map[: E // 2] = torch.arange(E // 2, dtype=torch.int32)
    resident_map = resident_map[torch.randperm(E, generator=gen)].to(device)
    ids = ops.route(logits, k)[1]
    x = torch.randn(T, 256, generator=gen).to(device)
    gate = torch.rand(T, k, generator=gen).to(device)
    return logits, resident_map, ids, x, gate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fomoe", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_route(benchmark, case, impl, device):
    T, E, k = CASES[case]
    logits = problem(T, E, k, device)[0]
    benchmark.group = f"route {case} [{device}]"
    fn = (lambda: ops.route(logits, k)) if impl == "fomoe" else (lambda: torch_route(logits, k))
    benchmark(synced(fn, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fomoe", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch(benchmark, case, impl, device):
    T, E, k = CASES[case]
    _, resident_map, ids, _, _ = problem(T, E, k, device)
    benchmark.group = f"dispatch {case} half resident [{device}]"
    if impl == "fomoe":
        fn = lambda: ops.dispatch(ids, resident_map, E // 2)  # noqa: E731
    else:
        fn = lambda: torch_dispatch(ids, resident_map, E // 2)  # noqa: E731
    benchmark(synced(fn, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fomoe", "torch"])
def test_gather_combine(benchmark, impl, device):
    T, E, k = CASES["T=1024 E=64 k=8"]
    _, resident_map, ids, x, gate = problem(T, E, k, device)
    perm, _, inv = ops.dispatch(ids, resident_map, E // 2)
    benchmark.group = f"gather+combine T={T} k={k} d=256 half resident [{device}]"
    if impl == "fomoe":
        fn = lambda: ops.combine(ops.gather(x, perm, inv), perm, inv, gate)  # noqa: E731
    else:
        kept = perm.clamp_min(0).long()
        token, valid = kept // k, (perm >= 0).unsqueeze(1)
        gate_of_row = gate.reshape(-1)[kept].unsqueeze(1)

        def fn():
            rows = x.index_select(0, token) * valid
            return torch.zeros_like(x).index_add_(0, token, rows * gate_of_row)

    benchmark(synced(fn, device))
