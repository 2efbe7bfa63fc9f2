"""fomoe.rotary's CUDA kernel against the reference and the CPU kernel: dtypes, strided views
(the vector and the element paths), the inverse, the gradient, opcheck, bad input."""

import pytest
import torch

from fomoe import ops, reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def tables(S, D, gen, dtype=torch.float32):
    angles = torch.rand(S, D // 2, generator=gen, dtype=torch.float64) * 6.3
    return angles.cos().to(dtype).cuda(), angles.sin().to(dtype).cuda()


def check(x, cos, sin, inverse=False):
    got = ops.rotary(x, cos, sin, inverse)
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    want = ref.rotary(x, cos, sin, inverse)
    torch.testing.assert_close(got, want)
    # Same arithmetic as the CPU kernel (fp32 products, one rounding): equal up to FMA contraction.
    torch.testing.assert_close(got.cpu(), ops.rotary(x.cpu(), cos.cpu(), sin.cpu(), inverse),
                               **({} if x.dtype in (torch.float32, torch.float64) else dict(rtol=1.6e-2, atol=1e-5)))
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("B,S,H,D", [(2, 33, 3, 64), (1, 1, 1, 2), (3, 7, 5, 6), (1, 1024, 32, 128)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotary_matches_reference(B, S, H, D, dtype, inverse, gen):
    x = torch.randn(B, S, H, D, generator=gen).to(dtype).cuda()
    check(x, *tables(S, D, gen), inverse)


def test_rotary_strided_and_misaligned_inputs(gen):
    B, S, H, D = 2, 19, 4, 64
    cos, sin = tables(S, D, gen)
    qkv = torch.randn(B, S, 3, H, D, generator=gen).to(torch.bfloat16).cuda()
    check(qkv[:, :, :2].reshape(B, S, 2 * H, D), cos, sin)                       # the LM's view: vector path
    storage = torch.randn(B * S * H * D + 1, generator=gen).to(torch.bfloat16).cuda()
    check(storage[1:].view(B, S, H, D), cos, sin)                                 # misaligned: element path
    check(torch.randn(B, D, S, H, generator=gen).cuda().permute(0, 2, 3, 1), cos, sin)  # head_dim not innermost
    check(torch.randn(0, S, H, D, device="cuda"), cos, sin)                       # empty
    check(qkv[:, :, 0], cos.double(), sin.half())                                  # tables of other dtypes


def test_rotary_gradient_is_the_inverse_rotation(gen):
    B, S, H, D = 2, 16, 4, 32
    cos, sin = tables(S, D, gen)
    x = torch.randn(B, S, H, D, generator=gen).cuda().requires_grad_(True)
    g = torch.randn(B, S, H, D, generator=gen).cuda()
    ops.rotary(x, cos, sin).backward(g)
    x_ref = x.detach().double().requires_grad_(True)
    ref.rotary(x_ref, cos.double(), sin.double()).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad)


def test_rotary_opcheck(gen):
    x = torch.randn(2, 5, 3, 8, generator=gen).cuda().requires_grad_(True)
    torch.library.opcheck(torch.ops.fomoe.rotary.default, (x, *tables(5, 8, gen), False))


def test_rotary_rejects_tables_on_another_device(gen):
    x = torch.randn(2, 5, 3, 8, generator=gen).cuda()
    cos, sin = tables(5, 8, gen)
    with pytest.raises(RuntimeError, match="fomoe.rotary: a table is on cpu"):
        ops.rotary(x, cos.cpu(), sin)
