"""HiFT for ``pytorch_lightning`` (the older package name): the strategies and the callback, and their registered names.

``import lightning_hift`` imports this module when ``pytorch_lightning`` is installed, so
``pytorch_lightning.Trainer(strategy="hift")`` works after it. Strategy objects for a ``pytorch_lightning`` Trainer
come from here: ``from lightning_hift.pytorch_lightning import HiFTStrategy``.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_hift.callback import HiFTCallbackBase
from lightning_hift.ddp import DDPHiFT
from lightning_hift.fsdp import FSDPHiFT
from lightning_hift.strategy import SingleDeviceHiFT


class HiFTCallback(HiFTCallbackBase, Callback):  # type: ignore[misc]
    __doc__ = HiFTCallbackBase.__doc__


class HiFTStrategy(SingleDeviceHiFT, SingleDeviceStrategy):  # type: ignore[misc]
    __doc__ = SingleDeviceHiFT.__doc__
    callback_class = HiFTCallback


class HiFTDDPStrategy(DDPHiFT, DDPStrategy):  # type: ignore[misc]
    __doc__ = DDPHiFT.__doc__
    callback_class = HiFTCallback


class HiFTFSDPStrategy(FSDPHiFT, ModelParallelStrategy):  # type: ignore[misc]
    __doc__ = FSDPHiFT.__doc__
    callback_class = HiFTCallback


HiFTStrategy.register_strategies(StrategyRegistry)
HiFTDDPStrategy.register_strategies(StrategyRegistry)
HiFTFSDPStrategy.register_strategies(StrategyRegistry)
