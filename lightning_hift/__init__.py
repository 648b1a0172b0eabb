"""HiFT for PyTorch Lightning: full-parameter fine-tuning that trains one block of layers per optimizer step.

Importing the package registers the strategy names "hift", "hift_top2down", "hift_random" (one device) and
"hift_ddp", "hift_ddp_spawn", "hift_ddp_fork" (many processes), "hift_fsdp", "hift_fsdp_spawn" (many processes,
the model sharded) with ``lightning.pytorch`` and, when it is
installed, with ``pytorch_lightning``, so ``Trainer(strategy="hift")`` works after ``import lightning_hift``
with either package. The classes exported here are ``lightning.pytorch``'s; ``pytorch_lightning``'s are in
:mod:`lightning_hift.pytorch_lightning`.
"""

import importlib.util
import logging

from lightning_hift.blocks import Block, partition
from lightning_hift.callback import HiFTCallbackBase
from lightning_hift.errors import HiFTConfigError
from lightning_hift.fsdp import shard_by_unit
from lightning_hift.memory import estimate_memory, estimate_per_rank
from lightning_hift.pytorch import HiFTCallback, HiFTDDPStrategy, HiFTFSDPStrategy, HiFTStrategy
from lightning_hift.settings import HiFTSettings
from lightning_hift.strategy import HiFTStrategyBase
from lightning_hift.units import Unit, find_units

if importlib.util.find_spec("pytorch_lightning") is not None:
    import lightning_hift.pytorch_lightning  # noqa: F401  (registers the names with pytorch_lightning's Trainer)

# The one-line notes (which units a model was cut into, say) reach the console as Lightning's own do.
_log = logging.getLogger(__name__)
if not _log.handlers and not logging.getLogger().handlers:
    _log.setLevel(logging.INFO)
    _log.addHandler(logging.StreamHandler())
    _log.propagate = False

__all__ = [
    "Block",
    "HiFTCallback",
    "HiFTCallbackBase",
    "HiFTConfigError",
    "HiFTDDPStrategy",
    "HiFTFSDPStrategy",
    "HiFTSettings",
    "HiFTStrategy",
    "HiFTStrategyBase",
    "Unit",
    "estimate_memory",
    "estimate_per_rank",
    "find_units",
    "partition",
    "shard_by_unit",
]
__version__ = "0.1.0"  # the package's one version number; pyproject.toml reads it
