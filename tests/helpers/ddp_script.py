"""A training script as users write it, for torchrun: ``torchrun --nproc_per_node=2 -m tests.helpers.ddp_script OUT``.

Lightning's script launcher sees the processes torchrun started and joins them instead of starting its own.
"""

from __future__ import annotations

import sys

import torch

from tests.helpers.distributed import RankReport, ShardedTinyModule
from tests.helpers.modules import quiet_trainer

if __name__ == "__main__":
    torch.manual_seed(0)
    trainer = quiet_trainer(
        strategy="hift_ddp",
        devices=2,
        max_steps=6,
        use_distributed_sampler=False,
        callbacks=[RankReport(sys.argv[1])],
    )
    trainer.fit(ShardedTinyModule(samples=48, batch_size=4))
