"""HiFT for PyTorch Lightning: full-parameter fine-tuning that trains one block of layers per optimizer step.

Importing the package registers the strategy names "hift", "hift_top2down", "hift_random" (one device) and
"hift_ddp", "hift_ddp_spawn", "hift_ddp_fork" (many processes) with Lightning, so ``Trainer(strategy="hift")``
works after ``import lightning_hift``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_hift.blocks import Block, partition
from lightning_hift.callback import HiFTCallback
from lightning_hift.ddp import HiFTDDPStrategy
from lightning_hift.errors import HiFTConfigError
from lightning_hift.strategy import HiFTStrategy, HiFTStrategyBase
from lightning_hift.units import Unit, find_units

HiFTStrategy.register_strategies(StrategyRegistry)
HiFTDDPStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "Block",
    "HiFTCallback",
    "HiFTConfigError",
    "HiFTDDPStrategy",
    "HiFTStrategy",
    "HiFTStrategyBase",
    "Unit",
    "find_units",
    "partition",
]
__version__ = "0.1.0"
