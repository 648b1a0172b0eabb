"""The Lightning package the core tests drive, and HiFT's classes for it.

``lightning.pytorch`` by default; ``HIFT_TEST_LIGHTNING=pytorch_lightning pytest ...`` runs the same tests on the
older ``pytorch_lightning`` package with :mod:`lightning_hift.pytorch_lightning`'s classes (``make test`` runs both).
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import Any

PACKAGE = os.environ.get("HIFT_TEST_LIGHTNING", "lightning.pytorch")
if PACKAGE not in ("lightning.pytorch", "pytorch_lightning"):
    raise ValueError(f"HIFT_TEST_LIGHTNING={PACKAGE!r}: choose 'lightning.pytorch' or 'pytorch_lightning'.")

pl: Any = import_module(PACKAGE)
_hift: Any = import_module(
    "lightning_hift.pytorch" if PACKAGE == "lightning.pytorch" else "lightning_hift.pytorch_lightning"
)

Trainer = pl.Trainer
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Callback = pl.Callback
seed_everything = pl.seed_everything
BackboneFinetuning = pl.callbacks.BackboneFinetuning
BatchSizeFinder = pl.callbacks.BatchSizeFinder
EMAWeightAveraging = getattr(pl.callbacks, "EMAWeightAveraging", None)  # Lightning 2.6 and newer
EarlyStopping = pl.callbacks.EarlyStopping
LearningRateMonitor = pl.callbacks.LearningRateMonitor
CSVLogger = pl.loggers.CSVLogger
LearningRateFinder = pl.callbacks.LearningRateFinder
StochasticWeightAveraging = pl.callbacks.StochasticWeightAveraging
Tuner = pl.tuner.Tuner
grad_norm = pl.utilities.grad_norm
ModelCheckpoint = pl.callbacks.ModelCheckpoint
OnExceptionCheckpoint = pl.callbacks.OnExceptionCheckpoint
MixedPrecision = pl.plugins.MixedPrecision
SIGTERMException = pl.utilities.exceptions.SIGTERMException

HiFTStrategy = _hift.HiFTStrategy
HiFTDDPStrategy = _hift.HiFTDDPStrategy
HiFTFSDPStrategy = _hift.HiFTFSDPStrategy
HiFTCallback = _hift.HiFTCallback
