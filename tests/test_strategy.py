"""HiFTStrategy and HiFTCallback on a tiny model: what trains when, where optimizer state lives, the LR."""

from __future__ import annotations

import statistics

import pytest
import torch

import lightning_hift
from tests.helpers.lightning import Callback, HiFTFSDPStrategy, HiFTStrategy, Trainer, pl, seed_everything
from tests.helpers.modules import StepRecorder, TinyModule, fit, quiet_trainer, warmup_then_linear

# TinyModule has six units: embeddings, four layers, output (norm + head).
UNITS = 6


def block_names(trainer: Trainer) -> list[set[str]]:
    return [set(block.names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "order"), [("hift", "bottom2up"), ("hift_top2down", "top2down"), ("hift_random", "random")]
)
def test_registered_names_resolve_to_the_strategy(name: str, order: str) -> None:
    trainer = Trainer(accelerator="cpu", strategy=name, logger=False)
    assert isinstance(trainer.strategy, HiFTStrategy)
    assert trainer.strategy.order == order
    assert trainer.strategy.root_device == torch.device("cpu")


@pytest.mark.parametrize(("name", "start_method"), [("hift_fsdp", "popen"), ("hift_fsdp_spawn", "spawn")])
def test_the_sharded_names_resolve_to_the_fsdp_strategy_of_the_package_in_use(name: str, start_method: str) -> None:
    trainer = Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
    assert isinstance(trainer.strategy, HiFTFSDPStrategy)
    assert trainer.strategy.start_method == start_method
    assert trainer.strategy.num_processes == 2


def test_registration_is_idempotent() -> None:
    import importlib

    importlib.reload(lightning_hift)
    HiFTStrategy.register_strategies(pl.strategies.StrategyRegistry)  # what a second registration does
    assert isinstance(Trainer(strategy="hift", logger=False).strategy, HiFTStrategy)


def test_one_block_equals_plain_lightning_bit_for_bit() -> None:
    def train(strategy: object) -> dict[str, torch.Tensor]:
        seed_everything(7)
        module = TinyModule(schedule=(3, 10))
        fit(module, strategy, max_steps=10)
        return {name: p.detach().clone() for name, p in module.named_parameters()}

    plain = train("auto")
    hift = train(HiFTStrategy(layers_per_block=UNITS))
    assert plain.keys() == hift.keys()
    for name in plain:
        assert torch.equal(plain[name], hift[name]), name


@pytest.mark.parametrize("order", ["bottom2up", "top2down", "random"])
def test_each_step_changes_exactly_the_active_block_in_order(order: str) -> None:
    recorder = StepRecorder()
    steps = 2 * UNITS
    trainer = fit(TinyModule(), HiFTStrategy(order=order, seed=3), max_steps=steps, callbacks=[recorder])
    blocks = block_names(trainer)
    assert len(blocks) == UNITS
    for active, changed in zip(recorder.active, recorder.changed, strict=True):
        assert active is not None
        assert changed == blocks[active]
    cycles = [recorder.active[i : i + UNITS] for i in range(0, steps, UNITS)]
    for cycle in cycles:
        assert sorted(cycle) == list(range(UNITS))  # each block exactly once per cycle
    if order == "bottom2up":
        assert cycles[0] == list(range(UNITS))
    elif order == "top2down":
        assert cycles[0] == list(range(UNITS))[::-1]
    else:
        assert cycles[0] != cycles[1]  # a new permutation every cycle (true for this seed)


def test_random_order_depends_on_the_seed_only() -> None:
    def active(seed: int) -> list[int | None]:
        recorder = StepRecorder()
        fit(TinyModule(), HiFTStrategy(order="random", seed=seed), max_steps=UNITS, callbacks=[recorder])
        return recorder.active

    assert active(1) == active(1)
    assert active(1) != active(2)


def test_grad_norm_order_trains_the_blocks_it_draws_from_the_measured_gradients() -> None:
    recorder = StepRecorder(grads=True)
    steps = 5 * UNITS
    trainer = fit(TinyModule(), HiFTStrategy(order="grad_norm", seed=3), steps, callbacks=[recorder])
    blocks = block_names(trainer)
    for active, changed, grads in zip(recorder.active, recorder.changed, recorder.grads, strict=True):
        assert active is not None and changed == grads.keys() == blocks[active]  # the update had the active block's
    assert recorder.active[:UNITS] == list(range(UNITS))  # the first cycle measures every block, bottom-up
    hift = trainer.strategy.callback  # type: ignore[attr-defined]
    rms = [(sum(float(g.square().sum()) for g in grads.values()) / sum(g.numel() for g in grads.values())) ** 0.5
           for grads in recorder.grads]  # fmt: skip
    last = dict(zip(recorder.active, rms, strict=True))  # each block's most recent measurement
    assert hift.order.grad_rms == pytest.approx([last[block] for block in range(UNITS)], rel=1e-5)
    # Later cycles are draws with replacement, not permutations (true for this seed).
    assert any(sorted(recorder.active[i : i + UNITS]) != list(range(UNITS)) for i in range(UNITS, steps, UNITS))


def test_grad_norm_order_draws_blocks_in_proportion_to_their_gradients() -> None:
    from lightning_hift.orders import GradNormOrder

    order = GradNormOrder(num_blocks=4, seed=5)
    for block, rms in enumerate([3e-3, 1e-3, 0.0, 0.0]):
        order.observe(block, rms)
    order.observe(1, float("nan"))  # a non-finite measurement (a skipped step) keeps the last finite one
    expected = [0.5 * 3 / 4 + 0.125, 0.5 * 1 / 4 + 0.125, 0.125, 0.125]
    assert order.weights() == pytest.approx(expected)
    drawn = [order.block_at(position) for position in range(4, 4 * 2001)]
    assert [drawn.count(block) / len(drawn) for block in range(4)] == pytest.approx(expected, abs=0.02)
    # A cycle, once drawn, is kept: new measurements change only the cycles drawn after them.
    order.position = 4
    cycle_one = [order.block_at(position) for position in range(4, 8)]
    order.observe(2, 1.0)
    assert [order.block_at(position) for position in range(4, 8)] == cycle_one
    restored = GradNormOrder(num_blocks=4, seed=5)
    restored.load_state_dict(order.state_dict())
    assert [restored.block_at(p) for p in range(4, 40)] == [order.block_at(p) for p in range(4, 40)]


def test_accumulation_keeps_the_block_for_the_whole_window() -> None:
    recorder = StepRecorder()
    fit(TinyModule(), HiFTStrategy(), max_steps=4, callbacks=[recorder], accumulate_grad_batches=3)
    assert recorder.active == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert recorder.stepped == [False, False, True] * 4
    assert all(not changed for changed, stepped in zip(recorder.changed, recorder.stepped, strict=True) if not stepped)


def test_switch_every_keeps_a_block_for_several_steps() -> None:
    recorder = StepRecorder()
    fit(TinyModule(), HiFTStrategy(switch_every=2, layers_per_block=2), max_steps=8, callbacks=[recorder])
    assert recorder.active == [0, 0, 1, 1, 2, 2, 0, 0]


def test_layers_per_block_groups_consecutive_units_with_a_short_last_block() -> None:
    trainer = fit(TinyModule(num_layers=5), HiFTStrategy(layers_per_block=3), max_steps=1)
    units = [len(block.unit_names) for block in trainer.strategy.blocks]  # type: ignore[attr-defined]
    assert units == [3, 3, 1]


def test_frozen_patterns_and_user_frozen_params_never_change() -> None:
    module = TinyModule()
    module.net.norm.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = fit(module, HiFTStrategy(frozen=["net.embed.*"]), max_steps=UNITS)
    scheduled = set().union(*block_names(trainer))
    never = {"net.embed.weight", "net.norm.weight", "net.norm.bias"}
    assert not scheduled & never
    for name in never:
        assert torch.equal(dict(module.named_parameters())[name], before[name])


def test_fit_restores_the_trainable_flags() -> None:
    module = TinyModule()
    module.net.norm.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    fit(module, HiFTStrategy(), max_steps=3)
    assert flags == {name: p.requires_grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adagrad", "rmsprop", "adafactor"])
@pytest.mark.parametrize("mode", ["offload", "reset", "keep"])
def test_where_optimizer_state_lives_after_every_step(optimizer: str, mode: str) -> None:
    recorder = StepRecorder()
    steps = UNITS + 2
    trainer = fit(TinyModule(optimizer=optimizer), HiFTStrategy(optimizer_state=mode), steps, callbacks=[recorder])
    eager = optimizer == "adagrad"  # Adagrad creates its state for every parameter in __init__
    for step in range(steps):
        active = (step + 1) % UNITS  # recorded after the switch to the next block
        trained = set(range(min(step + 1, UNITS)))
        for block in range(UNITS):
            has_state = eager or block in trained
            if block == active:
                expected = "device"
            elif mode == "reset" or not has_state:
                expected = "absent"
            else:
                expected = "host" if mode == "offload" else "device"
            assert recorder.places[step][block] == expected, (step, block)
            if block != active:
                assert recorder.has_state[step][block] == (has_state and mode != "reset"), (step, block)
    assert all(p.device.type == "cpu" for p in trainer.lightning_module.parameters())


@pytest.mark.parametrize(("mode", "fresh"), [("reset", True), ("offload", False)])
def test_reset_recreates_eager_state_fresh_at_the_next_turn(mode: str, fresh: bool) -> None:
    seen: list[torch.Tensor] = []

    class WatchBlockZero(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            if trainer.global_step == UNITS:  # block 0's second turn
                optimizer = trainer.optimizers[0]
                seen.extend(optimizer.state[p]["sum"].clone() for p in trainer.strategy.blocks[0].params)

    fit(TinyModule(optimizer="adagrad"), HiFTStrategy(optimizer_state=mode), UNITS + 1, callbacks=[WatchBlockZero()])
    assert seen
    assert all(bool((s == 0.1).all()) for s in seen) == fresh


@pytest.mark.parametrize("mode", ["step", "cycle", "stretched"])
def test_learning_rate_seen_by_every_step(mode: str) -> None:
    warmup, total, lr = 4, 12, 0.01
    blocks = 3  # six units, two per block
    recorder = StepRecorder()
    module = TinyModule(lr=lr, schedule=(warmup, total))
    fit(module, HiFTStrategy(layers_per_block=2, lr_update=mode), max_steps=total, callbacks=[recorder])
    factor = warmup_then_linear(warmup, total)
    if mode == "step":
        expected = [lr * factor(t) for t in range(total)]
    elif mode == "cycle":  # the mean of the schedule over each cycle's steps
        expected = [lr * statistics.mean(factor(s) for s in range(blocks * (t // blocks), blocks * (t // blocks + 1)))
                    for t in range(total)]  # fmt: skip
    else:
        expected = [lr * factor(t // blocks) for t in range(total)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)


def test_cycle_mode_ends_the_schedule_at_max_steps() -> None:
    module = TinyModule(lr=0.01, schedule=(2, 12))
    trainer = fit(module, HiFTStrategy(layers_per_block=2, lr_update="cycle"), max_steps=12)
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.last_epoch == 12  # type: ignore[union-attr]
    assert config.frequency == 1  # handed back to Lightning as configured


def test_gradient_clipping_goes_through_lightning() -> None:
    recorder = StepRecorder()
    trainer = fit(TinyModule(lr=0.5), HiFTStrategy(), max_steps=UNITS, callbacks=[recorder], gradient_clip_val=1e-3)
    blocks = block_names(trainer)
    for active, changed in zip(recorder.active, recorder.changed, strict=True):
        assert active is not None
        assert changed == blocks[active]


def test_logs_active_block_and_cycle() -> None:
    trainer = quiet_trainer(strategy="hift", max_steps=UNITS + 1)
    trainer.fit(TinyModule())
    metrics = trainer.callback_metrics
    assert metrics["hift/active_block"].item() == 0
    assert metrics["hift/cycle"].item() == 1


def test_registered_name_takes_the_accelerator_device() -> None:
    trainer = Trainer(accelerator="cpu", devices=1, strategy="hift", logger=False)
    assert isinstance(trainer.strategy, HiFTStrategy)
    assert trainer.strategy.root_device.type == "cpu"
