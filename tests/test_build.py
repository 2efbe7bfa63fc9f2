"""The built extension: build facts, and the refusal of a build made for another torch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fomoe
from fomoe import _build_info, _extension, ops


def test_build_info_matches_running_torch():
    assert _build_info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    assert fomoe.WITH_CUDA == _build_info.WITH_CUDA
    assert _extension._C.torch_version == _build_info.TORCH_VERSION


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .* pip install --no-build-isolation"):
        _extension.load()


def test_every_op_has_a_cpu_kernel():
    for name in ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fomoe::{name}", "CPU"), name


@pytest.mark.skipif(fomoe.WITH_CUDA, reason="a CUDA build has CUDA kernels")
def test_cpu_only_build_registers_reference_fallbacks_for_cuda():
    assert ops.reference_fallbacks() == sorted(ops.OP_NAMES)


@pytest.mark.parametrize("version,ok", [("2.11.0", True), ("2.13.0+cpu", True), ("2.14.1", True),
                                        ("2.10.2", False), ("2.15.0", False), ("3.0.0", False)])
def test_supported_torch_range(version, ok):
    if ok:
        _extension.check_supported(version)
    else:
        with pytest.raises(ImportError, match="fomoe supports torch >=2.11,<2.15"):
            _extension.check_supported(version)


# Runs in its own process: it replaces the CPU kernels of every op for the rest of that process.
_FALLBACK_TRAINING = """
import sys, warnings, torch
sys.path.insert(0, sys.argv[1])
import federation_workers as fw
from fomoe import ops

def gradients():
    model = fw.make_model(None, 0)
    model.loss(fw.batch_for(0, 0)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}

kernels = gradients()
lib = torch.library.Library("fomoe", "IMPL")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name in ops.OP_NAMES:
        lib.impl(name, ops._fallback(name, "cpu"), "CPU")
    fallback = gradients()
for n, g in kernels.items():
    torch.testing.assert_close(fallback[n], g, rtol=1e-4, atol=1e-6, msg=n)
print("same gradients")
"""


def test_reference_fallbacks_train_like_the_kernels():
    """What a build without a device's kernels runs (every op's reference registered as its
    kernel, here on the CPU) trains: a forward + backward of a small MoE model gives the kernels'
    gradients. The backward kernels run inside the autograd engine, where grad mode is off."""
    tests = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", _FALLBACK_TRAINING, str(tests)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "same gradients" in out.stdout, out.stderr[-2000:]
