"""HiFT for ``lightning.pytorch``: the strategies and the callback, and their registered names.

``import lightning_hift`` imports this module, so ``Trainer(strategy="hift")`` works after it.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_hift.callback import HiFTCallbackBase
from lightning_hift.ddp import DDPHiFT
from lightning_hift.fsdp import FSDPHiFT
from lightning_hift.strategy import SingleDeviceHiFT


class HiFTCallback(HiFTCallbackBase, Callback):
    __doc__ = HiFTCallbackBase.__doc__


class HiFTStrategy(SingleDeviceHiFT, SingleDeviceStrategy):
    __doc__ = SingleDeviceHiFT.__doc__
    callback_class = HiFTCallback


class HiFTDDPStrategy(DDPHiFT, DDPStrategy):
    __doc__ = DDPHiFT.__doc__
    callback_class = HiFTCallback


class HiFTFSDPStrategy(FSDPHiFT, ModelParallelStrategy):
    __doc__ = FSDPHiFT.__doc__
    callback_class = HiFTCallback


HiFTStrategy.register_strategies(StrategyRegistry)
HiFTDDPStrategy.register_strategies(StrategyRegistry)
HiFTFSDPStrategy.register_strategies(StrategyRegistry)
