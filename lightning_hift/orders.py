"""The order in which blocks are visited.

An order hands out block indices one slot at a time (a slot is ``switch_every`` optimizer steps). Every
cycle visits each of the ``num_blocks`` blocks exactly once. The block at any position is a pure function
of the position (and the seed), so the only state to save is how far the order has got; resuming from it
is exact.

>>> order = make_order("top2down", num_blocks=3)
>>> [order.block_at(position) for position in range(4)]
[2, 1, 0, 2]
>>> order.advance(), order.advance(), order.cycle
(1, 0, 0)
>>> order.state_dict()
{'name': 'top2down', 'num_blocks': 3, 'seed': 0, 'position': 2}
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Literal

from lightning_hift.errors import HiFTConfigError

OrderName = Literal["bottom2up", "top2down", "random"]


class BlockOrder:
    """Base class: a cycle-by-cycle sequence of block indices.

    Args:
        num_blocks: how many blocks a cycle visits.
        seed: only used by orders that draw at random.
    """

    name: ClassVar[str]
    uses_seed: ClassVar[bool] = False
    """Whether the seed changes the sequence (only then must a resumed run keep it)."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        if num_blocks < 1:
            raise HiFTConfigError(f"An order needs at least one block, got num_blocks={num_blocks}.")
        self.num_blocks = num_blocks
        self.seed = seed
        self.position = 0

    def cycle_order(self, cycle: int) -> list[int]:
        """The block indices of cycle ``cycle``, in the order they are visited."""
        raise NotImplementedError

    def block_at(self, position: int) -> int:
        cycle, offset = divmod(position, self.num_blocks)
        return self.cycle_order(cycle)[offset]

    def current(self) -> int:
        """The block of the current slot."""
        return self.block_at(self.position)

    def advance(self) -> int:
        """Move to the next slot and return its block."""
        self.position += 1
        return self.current()

    @property
    def cycle(self) -> int:
        """Index of the cycle the current slot belongs to."""
        return self.position // self.num_blocks

    @property
    def at_cycle_end(self) -> bool:
        """Whether the current slot is the last of its cycle."""
        return (self.position + 1) % self.num_blocks == 0

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_blocks": self.num_blocks, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuses a state saved for another order, block count or seed."""
        keys = ("name", "num_blocks", "seed") if self.uses_seed else ("name", "num_blocks")
        saved = {key: state.get(key) for key in keys}
        mine = {key: getattr(self, key) for key in keys}
        if saved != mine:
            raise HiFTConfigError(
                f"The checkpoint's block order {saved} does not match this run's {mine}. Resume with the same"
                " `order`, `seed` and `layers_per_block` (and the same model), or start a new run."
            )
        self.position = int(state["position"])


class BottomUp(BlockOrder):
    """Embeddings first, output end last."""

    name = "bottom2up"

    def cycle_order(self, cycle: int) -> list[int]:
        return list(range(self.num_blocks))


class TopDown(BlockOrder):
    """Output end first, embeddings last."""

    name = "top2down"

    def cycle_order(self, cycle: int) -> list[int]:
        return list(range(self.num_blocks - 1, -1, -1))


class RandomOrder(BlockOrder):
    """A new seeded permutation of the blocks every cycle."""

    name = "random"
    uses_seed = True

    def cycle_order(self, cycle: int) -> list[int]:
        # A string seed is hashed with SHA-512 by `random`, so each (seed, cycle) gets its own stream that is the
        # same in every process and on every platform: resuming and multi-process runs agree without saved RNG state.
        rng = random.Random(f"lightning_hift:{self.seed}:{cycle}")
        return rng.sample(range(self.num_blocks), self.num_blocks)


ORDERS: dict[str, type[BlockOrder]] = {cls.name: cls for cls in (BottomUp, TopDown, RandomOrder)}


def make_order(name: str, num_blocks: int, seed: int = 0) -> BlockOrder:
    """Build the order called ``name`` ("bottom2up", "top2down" or "random")."""
    check_order_name(name)
    return ORDERS[name](num_blocks, seed)


def check_order_name(name: str) -> None:
    if not isinstance(name, str) or name not in ORDERS:
        raise HiFTConfigError(f"Unknown order={name!r}. Choose one of {sorted(ORDERS)}.")
