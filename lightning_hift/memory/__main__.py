"""``python -m lightning_hift.memory MODEL``: the planner's table, full fine-tuning against HiFT.

python -m lightning_hift.memory llama2-7b --optimizer adamw --precision bf16-true
python -m lightning_hift.memory llama2-70b --precision bf16-true --world-size 8
python -m lightning_hift.memory llama2-7b --precision bf16-true --batch-size 1 --seq-len 2048
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_hift.errors import HiFTConfigError
from lightning_hift.memory.plan import PRECISIONS, STATE_TENSORS_PER_PARAM, estimate_memory, estimate_per_rank
from lightning_hift.optim_state import MODES as OPTIMIZER_STATE_MODES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hift.memory", description="Model-state memory of full fine-tuning vs HiFT."
    )
    parser.add_argument("model", help="'llama2-7b' (-13b, -70b), a model folder, or a hub name (its config.json)")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--optimizer", default="adamw", choices=sorted(STATE_TENSORS_PER_PARAM))
    parser.add_argument("--layers-per-block", type=_positive_int, default=1)
    parser.add_argument("--optimizer-state", default="offload", choices=OPTIMIZER_STATE_MODES)
    parser.add_argument(
        "--no-prefetch", action="store_true", help="count the active block only (as the HiFT paper does)"
    )
    parser.add_argument(
        "--world-size",
        type=_positive_int,
        help="per process of N: Lightning FSDP full fine-tuning, hift_ddp and hift_fsdp side by side",
    )
    parser.add_argument("--batch-size", type=_positive_int, help="with --seq-len: add the activations (per process)")
    parser.add_argument("--seq-len", type=_positive_int, help="tokens per sequence")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("off", "on", "reentrant"),
        default="off",
        help="Hugging Face gradient checkpointing for the activations: on (non-reentrant) or reentrant",
    )
    args = parser.parse_args(argv)
    if (args.batch_size is None) != (args.seq_len is None):
        parser.error("give --batch-size and --seq-len together")
    checkpointing = {"off": False, "on": True, "reentrant": "reentrant"}[args.gradient_checkpointing]
    settings = {
        "precision": args.precision,
        "optimizer": args.optimizer,
        "layers_per_block": args.layers_per_block,
        "optimizer_state": args.optimizer_state,
        "prefetch": not args.no_prefetch,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "gradient_checkpointing": checkpointing,
    }
    try:
        if args.world_size is not None:
            table = estimate_per_rank(args.model, args.world_size, **settings).table()
        else:
            table = estimate_memory(args.model, **settings).table()
    except (HiFTConfigError, OSError, ValueError) as err:  # a model name, folder or config it cannot read or cut
        parser.error(f"cannot plan {args.model!r}: {err}")
    print(table)


if __name__ == "__main__":
    main()
