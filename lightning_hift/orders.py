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

import math
import random
from typing import Any, ClassVar, Literal

from lightning_hift.errors import HiFTConfigError

OrderName = Literal["bottom2up", "top2down", "random", "grad_norm"]


class BlockOrder:
    """Base class: a cycle-by-cycle sequence of block indices.

    Args:
        num_blocks: how many blocks a cycle visits.
        seed: only used by orders that draw at random.
    """

    name: ClassVar[str]
    uses_seed: ClassVar[bool] = False
    """Whether the seed changes the sequence (only then must a resumed run keep it)."""
    observes: ClassVar[bool] = False
    """Whether the order wants :meth:`observe` called with each step's gradient (the strategy skips measuring
    otherwise)."""

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

    def observe(self, block: int, grad_rms: float) -> None:
        """The root mean square of ``block``'s gradient in the step just taken (only orders that set ``observes``)."""

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


class GradNormOrder(BlockOrder):
    """Importance sampling of blocks: a block whose gradient was large when it last trained is drawn more often.

    The first cycle visits every block bottom-up, measuring each one's gradient (its root mean square, so that a
    large embedding block is not favoured for its size). Every later cycle is ``num_blocks`` draws with
    replacement, block ``i`` with probability ``(1 - explore) * g_i / sum(g) + explore / num_blocks``, where
    ``g_i`` is the block's most recent measurement: the uniform share keeps every block visited now and then, so
    its measurement cannot go stale forever. A cycle keeps its length, so the learning rate still moves once per
    ``num_blocks`` slots; unlike the other orders, a cycle may visit a block twice and skip another.

    A cycle is drawn when it is first asked for (the strategy asks for the next slot's block one slot ahead, to
    prefetch it), from the measurements known then, and kept until it is over; the measurements and the drawn
    cycles are the state a checkpoint saves, so resuming draws exactly the same blocks. In multi-process runs the
    gradients are reduced before they are measured, so every process draws the same.

    >>> order = GradNormOrder(num_blocks=3)
    >>> [order.block_at(position) for position in range(3)]
    [0, 1, 2]
    >>> for block, rms in enumerate([1e-3, 0.0, 1e-3]):
    ...     order.observe(block, rms)
    >>> [round(weight, 3) for weight in order.weights()]
    [0.417, 0.167, 0.417]
    """

    name = "grad_norm"
    uses_seed = True
    observes = True
    explore: ClassVar[float] = 0.5
    """The share of each draw made uniformly over the blocks."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        super().__init__(num_blocks, seed)
        self.grad_rms: list[float | None] = [None] * num_blocks
        self.drawn: dict[int, list[int]] = {}

    def weights(self) -> list[float]:
        """The probability of each block in a draw made now."""
        known = [g for g in self.grad_rms if g is not None]
        # A block not measured yet (a cycle cut short by a resume onto a new run) counts as the largest measured.
        fill = max(known) if known else 1.0
        scores = [fill if g is None else g for g in self.grad_rms]
        total = sum(scores)
        uniform = 1.0 / self.num_blocks
        if total <= 0.0 or not math.isfinite(total):
            return [uniform] * self.num_blocks
        return [(1.0 - self.explore) * score / total + self.explore * uniform for score in scores]

    def cycle_order(self, cycle: int) -> list[int]:
        if cycle == 0:
            return list(range(self.num_blocks))
        if cycle not in self.drawn:
            rng = random.Random(f"lightning_hift:{self.seed}:{cycle}")
            self.drawn[cycle] = rng.choices(range(self.num_blocks), weights=self.weights(), k=self.num_blocks)
        return self.drawn[cycle]

    def advance(self) -> int:
        block = super().advance()
        self.drawn = {cycle: blocks for cycle, blocks in self.drawn.items() if cycle >= self.cycle}
        return block

    def observe(self, block: int, grad_rms: float) -> None:
        if math.isfinite(grad_rms):
            self.grad_rms[block] = grad_rms

    def state_dict(self) -> dict[str, Any]:
        drawn = {str(cycle): list(blocks) for cycle, blocks in self.drawn.items()}
        return {**super().state_dict(), "grad_rms": list(self.grad_rms), "drawn": drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.grad_rms = list(state["grad_rms"])
        self.drawn = {int(cycle): list(blocks) for cycle, blocks in state["drawn"].items()}


ORDERS: dict[str, type[BlockOrder]] = {cls.name: cls for cls in (BottomUp, TopDown, RandomOrder, GradNormOrder)}


def make_order(name: str, num_blocks: int, seed: int = 0) -> BlockOrder:
    """Build the order called ``name`` ("bottom2up", "top2down", "random" or "grad_norm")."""
    check_order_name(name)
    return ORDERS[name](num_blocks, seed)


def check_order_name(name: str) -> None:
    if not isinstance(name, str) or name not in ORDERS:
        raise HiFTConfigError(f"Unknown order={name!r}. Choose one of {sorted(ORDERS)}.")
