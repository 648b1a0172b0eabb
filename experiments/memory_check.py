"""The planner's activation bytes against what autograd saves on the real CPU forward, in one run.

For each model, full fine-tuning and every HiFT block: traced on fake tensors (``activation_bytes``) against the real
forward's saved tensors (``measure_saved_bytes``).

    python experiments/memory_check.py                    # -> experiments/results/memory_check.md
    python experiments/memory_check.py --skip-pretrained  # tiny configs only
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from run_summary import RESULTS, arguments, markdown, write_page
from torch import nn

from lightning_hift.blocks import partition
from lightning_hift.memory.activations import activation_bytes, hf_batch, measure_saved_bytes

PAGE = """# Activations: planned (fake tensors, no weights) against measured (real CPU forward)

`python experiments/memory_check.py`; torch {torch}, {machine}. Bytes autograd saves
in one training forward (loss included, weights excluded): full fine-tuning and each HiFT block trainable
alone (one unit per block). Relative error is (planned - measured) / measured.

{table}
"""


def tiny_configs() -> dict[str, Callable[[], nn.Module]]:
    import transformers as hf

    layers = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
    gpt2 = {"n_embd": 64, "n_layer": 3, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}
    t5 = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0}
    return {
        "tiny Llama (causal LM)": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=256, pad_token_id=0, **layers)),
        "tiny GPT-2 (causal LM)": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=256, **gpt2)),
        "tiny BERT (classification)": lambda: hf.BertForSequenceClassification(hf.BertConfig(vocab_size=256, **layers)),
        "tiny T5 (seq2seq)": lambda: hf.T5ForConditionalGeneration(hf.T5Config(vocab_size=256, pad_token_id=0, **t5)),
    }


class MLP(nn.Module):
    def __init__(self, width: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(4)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def real_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    spec = hf_batch(model, batch_size, seq_len)
    vocab = model.config.vocab_size
    high = {"labels": model.config.num_labels} if spec.get("labels", torch.empty(0, 0)).dim() == 1 else {}
    return {key: torch.randint(0, high.get(key, vocab), t.shape) for key, t in spec.items()}


def check(name: str, model: nn.Module, batch: Any, precision: str, loss_fn: Any = None) -> list[dict[str, Any]]:
    blocks = partition(model, 1)
    sets = [("FPFT", [p for b in blocks for p in b.params])] + [(f"block {b.index}", b.params) for b in blocks]
    start = time.perf_counter()
    predicted = activation_bytes(model, batch, [s for _, s in sets], precision, loss_fn=loss_fn)
    traced_s = time.perf_counter() - start
    model.train()
    rows = []
    for (which, group), planned in zip(sets, predicted, strict=True):
        ids = {id(p) for p in group}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        measured = measure_saved_bytes(model, batch, precision, loss_fn)
        rows.append({"model": name, "set": which, "planned": planned, "measured": measured, "traced_s": traced_s})
    for p in model.parameters():
        p.requires_grad_(True)
    return rows


def main() -> None:
    parser = arguments(__doc__, RESULTS / "memory_check.md")
    parser.add_argument("--skip-pretrained", action="store_true", help="tiny configs and the MLP only")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    if not args.skip_pretrained:
        import transformers as hf

        from lightning_hift.tasks.models import minilm_path, smollm2_path

        minilm = hf.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        for seq_len in (64, 256):
            rows += check(f"MiniLM-L6 seq {seq_len} (32-true)", minilm, real_batch(minilm, 8, seq_len), "32-true")
        smollm2 = hf.AutoModelForCausalLM.from_pretrained(smollm2_path())
        rows += check("SmolLM2-135M seq 256 (bf16-mixed)", smollm2, real_batch(smollm2, 2, 256), "bf16-mixed")
    for name, make in tiny_configs().items():
        model = make()
        rows += check(f"{name} seq 64 (32-true)", model, real_batch(model, 4, 64), "32-true")
    rows += check("nn.Module MLP, batch 64 (32-true)", MLP(), (torch.randn(64, 256),), "32-true")

    table = pd.DataFrame(rows)
    error = (table.planned - table.measured) / table.measured.clip(lower=1)
    columns = {
        "model": table.model,
        "trainable": table.set,
        "planned MiB": (table.planned / 2**20).map("{:.3f}".format),
        "measured MiB": (table.measured / 2**20).map("{:.3f}".format),
        "error": error.map("{:+.2%}".format),
    }
    page = PAGE.format(torch=torch.__version__, machine=platform.machine(), table=markdown(pd.DataFrame(columns)))
    write_page(args.out, page + f"\nLargest error: {error.abs().max():.2%} over {len(table)} rows.\n")


if __name__ == "__main__":
    main()
