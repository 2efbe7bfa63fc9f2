"""Loads the compiled extension fomoe._C, refusing a build made for another torch."""

from __future__ import annotations

import importlib

import torch

_REBUILD = "rebuild it from the source tree with: pip install --no-build-isolation -e ."
# The torch releases fomoe builds and runs with (setup.py reads this line for install_requires).
SUPPORTED_TORCH = ">=2.11,<2.15"


def _release_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_supported(version: str) -> None:
    lo, hi = (_release_tuple(b.lstrip("<>=")) for b in SUPPORTED_TORCH.split(","))
    if not lo <= _release_tuple(version) < hi:
        raise ImportError(f"fomoe supports torch {SUPPORTED_TORCH}, but torch {version} is installed")


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def load():
    check_supported(torch.__version__)
    try:
        info = importlib.import_module("fomoe._build_info")
    except ImportError as exc:
        raise ImportError(f"fomoe's compiled extension is not built; {_REBUILD}") from exc
    if _torch_release(info.TORCH_VERSION) != _torch_release(torch.__version__) or (
        info.TORCH_CUDA != torch.version.cuda
    ):
        raise ImportError(
            f"fomoe was built against torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA}) but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) is installed; {_REBUILD}"
        )
    try:
        return importlib.import_module("fomoe._C")
    except ImportError as exc:
        raise ImportError(f"fomoe's compiled extension failed to load ({exc}); {_REBUILD}") from exc


_C = load()
WITH_CUDA: bool = bool(_C.with_cuda)
