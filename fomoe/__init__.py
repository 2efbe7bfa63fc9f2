"""fomoe: federated Mixture-of-Experts training with partial expert replication (FoMoE).

``fomoe.MoE`` is a drop-in MoE layer backed by the fomoe op library (``torch.ops.fomoe``);
the federation layer (placement, sync manager, transports) trains it across sites.
"""

from ._extension import WITH_CUDA  # noqa: F401  (loads the op library first)
from . import ops  # noqa: F401  (fake kernels, autograd, fallbacks)
from .layer import MoE, MoEConfig, RouterStats
from .placement import Placement
from .sync import SyncManager

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "RouterStats", "Placement", "SyncManager", "ops", "WITH_CUDA", "__version__"]
