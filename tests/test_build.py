"""The built extension: build facts, and the refusal of a build made for another torch."""

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
