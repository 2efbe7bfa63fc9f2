"""Edge cases for compute-sanitizer (memcheck, racecheck): every fomoe op that has a CUDA kernel in
this build, on the inputs most likely to go out of bounds or race: no tokens, one expert, all
tokens to one expert, every assignment skipped, none skipped, k > 8, rows that are not 16-byte
aligned, more local experts than the default shared memory holds, and out-of-range routing data
(which the kernels must skip, never read).

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py

Run by `bench/device_run.sh OUT sanitizer`. The caching allocator is off so that every tensor is
its own allocation and memcheck sees any access past its end. Exits non-zero on a failed check.
"""

from __future__ import annotations

import os
import sys

os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
os.environ.pop("FOMOE_VALIDATE", None)

import torch  # noqa: E402

import fomoe  # noqa: E402
from fomoe import ops  # noqa: E402

ROUTING_OPS = ("route", "route_backward", "dispatch", "gather", "combine", "combine_gate_grad")


def resident(E, held):
    m = torch.full((E,), -1, dtype=torch.int32)
    m[list(held)] = torch.arange(len(held), dtype=torch.int32)
    return m.cuda()


def routing_round_trip(T, E, k, held, d, gen, dtype=torch.bfloat16, ids=None):
    """route -> dispatch -> gather -> combine, their backward kernels, checked against the CPU."""
    logits = (torch.randn(T, E, generator=gen) * 2).cuda()
    w, rids = ops.route(logits, k)
    for score, renorm in (("softmax", False), ("sigmoid", True)):
        ops.route(logits.to(dtype), k, score, renorm)
        torch.ops.fomoe.route_backward(torch.randn_like(w), logits, w, rids, score, renorm)
    ids = rids if ids is None else ids
    rmap = resident(E, held)
    perm, offsets, inv = ops.dispatch(ids, rmap, len(held))
    expected = ops.dispatch(ids.cpu(), rmap.cpu(), len(held))
    for got, want in zip((perm, offsets, inv), expected):
        assert torch.equal(got.cpu(), want), "dispatch differs from the CPU kernel"
    x = torch.randn(T, d, generator=gen).to(dtype).cuda()
    rows = ops.gather(x, perm, inv, w)
    y = ops.combine(rows, perm, inv, w)
    torch.ops.fomoe.combine_gate_grad(y, rows, inv)
    assert torch.equal(ops.gather(x, perm, inv).cpu(), ops.gather(x.cpu(), perm.cpu(), inv.cpu()))
    return perm, offsets, inv


def other_ops(gen):
    """Grouped GEMM, expert FFN, rotary and RMSNorm, where this build has CUDA kernels for them."""
    T, E, k, d, f = 37, 4, 2, 64, 32
    perm, offsets, inv = ops.dispatch(torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32).cuda(),
                                      resident(E, [0, 2, 3]), 3)
    x = torch.randn(T, d, generator=gen).to(torch.bfloat16).cuda()
    w13 = (torch.randn(3, d, 2 * f, generator=gen) / 8).to(torch.bfloat16).cuda()
    w2 = (torch.randn(3, f, d, generator=gen) / 8).to(torch.bfloat16).cuda()
    gate = torch.rand(T, k, generator=gen).cuda()
    ran = []
    if "grouped_mm" not in ops.reference_fallbacks():
        a = torch.randn(T * k, d, generator=gen).to(torch.bfloat16).cuda()
        ops.grouped_mm(a, w13, offsets)
        ran.append("grouped_mm")
    if "grouped_mm_wgrad" not in ops.reference_fallbacks():
        a = torch.randn(T * k, d, generator=gen).to(torch.bfloat16).cuda()
        ops.grouped_mm_wgrad(a, torch.randn(T * k, f, generator=gen).to(torch.bfloat16).cuda(), offsets)
        ran.append("grouped_mm_wgrad")
    if "expert_ffn" not in ops.reference_fallbacks():
        xs, w13s, w2s, gs = (t.clone().requires_grad_(True) for t in (x, w13, w2, gate))
        y = ops.expert_ffn(xs, perm, offsets, inv, w13s, w2s, gs)
        y.float().square().sum().backward()
        ran.append("expert_ffn(+backward)")
    if "rotary" not in ops.reference_fallbacks():
        B, S, H, D = 3, 17, 5, 24
        cos, sin = torch.rand(S, D // 2, generator=gen).cuda(), torch.rand(S, D // 2, generator=gen).cuda()
        qkv = torch.randn(B, S, 3, H, D, generator=gen).to(torch.bfloat16).cuda()
        ops.rotary(qkv[:, :, :2].reshape(B, S, 2 * H, D), cos, sin)           # strided view, 16-byte path
        storage = torch.randn(B * S * H * D + 1, generator=gen).cuda()
        ops.rotary(storage[1:].view(B, S, H, D), cos, sin, True)              # misaligned: element path
        ops.rotary(torch.randn(B, D, S, H, generator=gen).cuda().permute(0, 2, 3, 1), cos, sin)  # head_dim strided
        ran.append("rotary")
    if "rms_norm" not in ops.reference_fallbacks():
        # Vector path; d not a multiple of 4: element path; a row past 8192 elements: read twice,
        # with the weight gradient's own pass.
        for rows, d in ((37, 64), (9, 130), (3, 8200)):
            x = torch.randn(rows, d, generator=gen).cuda().requires_grad_(True)
            delta = torch.randn(rows, d, generator=gen).to(torch.bfloat16).cuda().requires_grad_(True)
            w = torch.rand(d, generator=gen).cuda().requires_grad_(True)
            s, normed = ops.add_rms_norm(x, delta, w, 1e-5, torch.bfloat16)
            (s.square().sum() + normed.float().square().sum()).backward()
        storage = torch.randn(37 * 64 + 1, generator=gen).cuda()
        ops.rms_norm(storage[1:].view(37, 64), torch.ones(64, device="cuda"))       # misaligned: element path
        ran.append("rms_norm(+backward)")
    if "router_logits" not in ops.reference_fallbacks():
        # bf16 pieces of the weight and of the logits' gradient; odd sizes; a bf16 weight.
        for T, d, E, w_dtype in ((37, 64, 8, torch.float32), (5, 72, 1, torch.float32), (9, 40, 3, torch.bfloat16)):
            x = torch.randn(T, d, generator=gen).to(torch.bfloat16).cuda().requires_grad_(True)
            w = torch.randn(E, d, generator=gen).to(w_dtype).cuda().requires_grad_(True)
            ops.router_logits(x, w).square().sum().backward()
        ran.append("router_logits(+backward)")
    return ran


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cases: needs a CUDA GPU")
        return 0
    missing = [n for n in ROUTING_OPS if n in ops.reference_fallbacks()]
    if missing:
        print(f"sanitize_cases: no CUDA kernels for {missing} in this build")
        return 1
    gen = torch.Generator().manual_seed(0)
    cases = {
        "no tokens": lambda: routing_round_trip(0, 8, 2, [1, 3], 64, gen),
        "one expert": lambda: routing_round_trip(33, 1, 1, [0], 64, gen),
        "all tokens to one expert": lambda: routing_round_trip(
            1500, 8, 1, [2, 5], 64, gen, ids=torch.full((1500, 1), 5, dtype=torch.int32).cuda()),
        "all skipped, no local experts": lambda: routing_round_trip(257, 16, 4, [], 64, gen),
        "all skipped, empty local experts": lambda: routing_round_trip(
            257, 16, 2, [0, 1], 64, gen, ids=torch.full((257, 2), 9, dtype=torch.int32).cuda()),
        "none skipped, fp32, d=4096": lambda: routing_round_trip(300, 16, 4, range(16), 4096, gen, torch.float32),
        "half skipped, k=24 > 8, fp16": lambda: routing_round_trip(131, 64, 24, range(0, 64, 2), 48, gen,
                                                                  torch.float16),
        "wide router (streaming top-k)": lambda: routing_round_trip(17, 1100, 9, range(0, 1100, 3), 8, gen),
        "2048 local experts (opt-in shared memory)": lambda: routing_round_trip(700, 2048, 8, range(2048), 8, gen),
        "odd d=13 (element path), fp64": lambda: routing_round_trip(77, 8, 2, [0, 4, 6], 13, gen, torch.float64),
    }
    for name, case in cases.items():
        case()
        torch.cuda.synchronize()
        print(f"ok  {name}", flush=True)

    # Rows that are not 16-byte aligned take the element path.
    T, k, d = 65, 2, 32
    perm, _, inv = ops.dispatch(torch.randint(0, 8, (T, k), generator=gen, dtype=torch.int32).cuda(),
                                resident(8, [1, 2, 6]), 3)
    storage = torch.randn(T * k * d + 1, generator=gen).to(torch.bfloat16).cuda()
    ops.gather(storage[1:1 + T * d].view(T, d), perm, inv)
    ops.combine(storage[1:1 + T * k * d].view(T * k, d), perm, inv)
    torch.cuda.synchronize()
    print("ok  misaligned rows", flush=True)

    # Out-of-range data without FOMOE_VALIDATE: skipped, never dereferenced.
    T, E, k = 129, 8, 2
    bad_ids = torch.randint(-(1 << 30), 1 << 30, (T, k), generator=gen, dtype=torch.int32).cuda()
    rmap = resident(E, [0, 5])
    rmap[3] = 1 << 20
    perm, offsets, inv = ops.dispatch(bad_ids, rmap, 2)
    bad_table = torch.randint(-(1 << 30), 1 << 30, (T * k,), generator=gen, dtype=torch.int32).cuda()
    x = torch.randn(T, 16, generator=gen).cuda()
    ops.gather(x, bad_table, inv)
    ops.combine(torch.randn(T * k, 16, generator=gen).cuda(), perm, bad_table.view(T, k))
    torch.ops.fomoe.combine_gate_grad(x, torch.randn(T * k, 16, generator=gen).cuda(), bad_table.view(T, k))
    logits = torch.randn(T, E, generator=gen).cuda()
    w, ids = ops.route(logits, k)
    for score in ("softmax", "sigmoid"):
        torch.ops.fomoe.route_backward(torch.randn_like(w), logits, w, bad_table.view(T, k), score, True)
    torch.cuda.synchronize()
    print("ok  out-of-range routing data", flush=True)

    ran = other_ops(gen)
    torch.cuda.synchronize()
    print(f"ok  other ops with CUDA kernels: {ran or 'none in this build'}", flush=True)
    print("sanitize_cases: all cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
