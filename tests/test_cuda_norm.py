"""fomoe.rms_norm / add_rms_norm's CUDA kernels against the reference and the CPU kernel: dtype
combinations, the vector and the element paths, rows held in registers (2, 4 or 8 accesses a
thread) and rows read twice (past 8192 fp32 elements: the weight gradient's own pass), many rows
(grid-stride loop, one weight-gradient partial row per block), gradients, determinism, opcheck,
bad input."""

import pytest
import torch

from fomoe import ops, reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [  # (stream, delta, out)
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.float32), (torch.float64, torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16, torch.float16),
]
# One row segment in registers (d <= 1024 on the vector path), longer rows (a second read and the
# weight gradient's own pass), d not a multiple of 4 (the element path), many rows (grid-stride).
SHAPES = [(16, 1024), (3, 5, 130), (1, 4), (0, 64), (20000, 12), (37, 1028), (5, 4096), (9, 2050), (3, 8200)]


def inputs(shape, x_dtype, delta_dtype, gen):
    x = (torch.randn(shape, generator=gen) * 2).to(x_dtype).cuda()
    delta = torch.randn(shape, generator=gen).to(delta_dtype).cuda()
    w = (torch.rand(shape[-1], generator=gen) + 0.5).cuda()
    return x, delta, w


@pytest.mark.parametrize("x_dtype,delta_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference_and_cpu(shape, x_dtype, delta_dtype, out_dtype, gen):
    x, delta, w = inputs(shape, x_dtype, delta_dtype, gen)
    s, normed = ops.add_rms_norm(x, delta, w, 1e-5, out_dtype)
    s_ref, normed_ref = ref.rms_norm(x, delta, w, 1e-5, out_dtype)
    assert s.dtype == x_dtype and normed.dtype == out_dtype
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(normed, normed_ref)
    s_cpu, normed_cpu = ops.add_rms_norm(x.cpu(), delta.cpu(), w.cpu(), 1e-5, out_dtype)
    torch.testing.assert_close(s.cpu(), s_cpu, rtol=0, atol=0)
    torch.testing.assert_close(normed.cpu(), normed_cpu)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, out_dtype), ref.rms_norm(x, None, w, 1e-5, out_dtype)[1])


def test_rms_norm_writes_every_row(gen):
    # The caching allocator hands back the NaN-filled block: any row the kernels skip stays NaN.
    x, delta, w = inputs((4099, 256), torch.float32, torch.bfloat16, gen)
    torch.full((2 * 4099 * 256,), float("nan"), device="cuda")
    s, normed = ops.add_rms_norm(x, delta, w, 1e-5, torch.bfloat16)
    assert torch.isfinite(s).all() and torch.isfinite(normed).all()
    x.requires_grad_(True), delta.requires_grad_(True), w.requires_grad_(True)
    s, normed = ops.add_rms_norm(x, delta, w, 1e-5, torch.bfloat16)
    torch.full((4 * 4099 * 256,), float("nan"), device="cuda")
    torch.autograd.backward([s, normed], [torch.randn_like(s), torch.randn_like(normed)])
    assert all(torch.isfinite(t.grad).all() for t in (x, delta, w))


def test_rms_norm_misaligned_views_take_the_element_path(gen):
    storage = torch.randn(7 * 64 + 1, generator=gen).cuda()
    x = storage[1:].view(7, 64)  # 4 bytes past an aligned address
    w = torch.rand(64, generator=gen).cuda()
    torch.testing.assert_close(ops.rms_norm(x, w), ops.rms_norm(x.contiguous(), w), rtol=0, atol=0)
    strided = torch.randn(64, 7, generator=gen).cuda().t()  # not contiguous
    torch.testing.assert_close(ops.rms_norm(strided, w), ref.rms_norm(strided, None, w, 1e-6)[1])


@pytest.mark.parametrize("x_dtype,delta_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 2, 256), (2500, 24), (5, 130), (600, 1024), (40, 3000), (1500, 4096),
                                   (4, 8196), (3, 2050)])
def test_rms_norm_gradients_match_reference(shape, x_dtype, delta_dtype, out_dtype, gen):
    x, delta, w = inputs(shape, x_dtype, delta_dtype, gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, delta, w)]
    s, normed = ops.add_rms_norm(*leaves, 1e-5, out_dtype)
    g_s = torch.randn(shape, generator=gen).to(x_dtype).cuda()
    g_n = torch.randn(shape, generator=gen).to(out_dtype).cuda()
    torch.autograd.backward([s, normed], [g_s, g_n])
    # The reference backward from the same s (rounded to the stream dtype, as the op defines it).
    grad_s, grad_delta, grad_w = ref.rms_norm_backward(g_n, g_s, s.detach(), w, 1e-5, delta_dtype)
    torch.testing.assert_close(leaves[0].grad, grad_s)
    torch.testing.assert_close(leaves[1].grad, grad_delta)
    torch.testing.assert_close(leaves[2].grad, grad_w, **({} if x_dtype == torch.float64 else dict(rtol=1e-4,
                                                                                                    atol=1e-4)))


def test_rms_norm_backward_is_deterministic_and_matches_cpu(gen):
    s = torch.randn(3000, 96, generator=gen).cuda()
    w = torch.rand(96, generator=gen).cuda()
    g, g_sum = torch.randn(3000, 96, generator=gen).bfloat16().cuda(), torch.randn(3000, 96, generator=gen).cuda()
    first = torch.ops.fomoe.rms_norm_backward(g, g_sum, s, w, 1e-5, torch.bfloat16)
    second = torch.ops.fomoe.rms_norm_backward(g, g_sum, s, w, 1e-5, torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    on_cpu = torch.ops.fomoe.rms_norm_backward(g.cpu(), g_sum.cpu(), s.cpu(), w.cpu(), 1e-5, torch.bfloat16)
    for a, b in zip(first, on_cpu):  # bf16 grad_delta: within one rounding of the CPU's
        torch.testing.assert_close(a.cpu(), b, **({} if a.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))


def test_rms_norm_opcheck(gen):
    x = torch.randn(3, 4, 16, generator=gen).cuda().requires_grad_(True)
    delta = torch.randn(3, 4, 16, generator=gen).bfloat16().cuda().requires_grad_(True)
    w = torch.rand(16, generator=gen).cuda().requires_grad_(True)
    torch.library.opcheck(torch.ops.fomoe.rms_norm.default, (x, delta, w, 1e-5, torch.bfloat16))
    torch.library.opcheck(torch.ops.fomoe.rms_norm.default, (x, None, w, 1e-5, None))
    torch.library.opcheck(torch.ops.fomoe.rms_norm_backward.default,
                          (torch.randn(5, 16, device="cuda"), None, torch.randn(5, 16, device="cuda"),
                           torch.rand(16, device="cuda"), 1e-5, None))


def test_rms_norm_rejects_operands_on_another_device(gen):
    x = torch.randn(3, 8, generator=gen).cuda()
    with pytest.raises(RuntimeError, match="fomoe.rms_norm: weight is on cpu"):
        ops.rms_norm(x, torch.ones(8))
    with pytest.raises(RuntimeError, match="fomoe.rms_norm: delta is on cpu"):
        ops.add_rms_norm(x, torch.randn(3, 8), torch.ones(8, device="cuda"))
