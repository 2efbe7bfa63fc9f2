import os

import pytest
import torch

# Keep CPU tests fast and reproducible on small CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    """A fresh seeded generator per test: inputs are random, but a failure reproduces."""
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
