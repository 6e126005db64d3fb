"""Learning-rate scaling and schedules stepped per optimiser update."""

import io
import math
from pathlib import Path

import pytest
import torch
from yacs.config import CfgNode

from config import ConfigError, default_config, load_config
from lr_scheduler import build_scheduler, effective_learning_rates

DEMO_CFG = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "strip_mlp_demo.yaml")


def config_with(*opts) -> CfgNode:
    config = default_config()
    config.merge_from_list(["TRAIN.LR_SCALING", "none", "TRAIN.BASE_LR", 1e-3, "TRAIN.WARMUP_LR", 1e-6,
                            "TRAIN.MIN_LR", 1e-5, *opts])
    return config


def lrs_over_run(config: CfgNode, updates_per_epoch: int) -> list[float]:
    """The learning rate used by each optimiser update of the whole run, as the engine steps the schedule."""
    lrs = effective_learning_rates(config, world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lrs.base)
    scheduler = build_scheduler(config, optimizer, updates_per_epoch, lrs)
    used = []
    for step in range(config.TRAIN.EPOCHS * updates_per_epoch):
        scheduler.step_update(step)
        used.append(optimizer.param_groups[0]["lr"])
    return used


def test_linear_scaling_uses_total_batch() -> None:
    config = config_with("TRAIN.LR_SCALING", "linear", "DATA.BATCH_SIZE", 64, "TRAIN.ACCUMULATION_STEPS", 2)
    lrs = effective_learning_rates(config, world_size=8)  # total batch 64 x 8 x 2 = 1024
    assert lrs.scale == 2.0
    assert (lrs.base, lrs.warmup, lrs.minimum) == pytest.approx((2e-3, 2e-6, 2e-5))
    single = effective_learning_rates(config_with("TRAIN.LR_SCALING", "linear", "DATA.BATCH_SIZE", 128), 1)
    assert single.base == pytest.approx(1e-3 * 128 / 512)  # no accumulation: 1 micro-batch per update


def test_no_scaling_uses_values_as_given() -> None:
    lrs = effective_learning_rates(config_with("TRAIN.LR_SCALING", "none", "DATA.BATCH_SIZE", 7), world_size=3)
    assert (lrs.base, lrs.warmup, lrs.minimum, lrs.scale) == (1e-3, 1e-6, 1e-5, 1.0)


def test_cosine_warms_up_per_update_then_decays_to_min() -> None:
    used = lrs_over_run(config_with("TRAIN.EPOCHS", 10, "TRAIN.WARMUP_EPOCHS", 2), updates_per_epoch=5)
    assert used[0] == pytest.approx(1e-6)
    warmup = used[:10]
    assert all(b > a for a, b in zip(warmup, warmup[1:], strict=False))  # rises every update, not every epoch
    assert used[10] == pytest.approx(1e-3)
    decay = used[10:]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))
    assert used[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 39 / 40)))


def test_linear_schedule_is_a_straight_line() -> None:
    used = lrs_over_run(config_with("TRAIN.EPOCHS", 4, "TRAIN.WARMUP_EPOCHS", 0,
                                    "TRAIN.LR_SCHEDULER.NAME", "linear"), updates_per_epoch=5)
    steps = [a - b for a, b in zip(used, used[1:], strict=False)]
    assert used[0] == pytest.approx(1e-3)
    assert steps == pytest.approx([(1e-3 - 1e-5) / 20] * 19)


def test_step_schedule_decays_every_decay_epochs() -> None:
    used = lrs_over_run(config_with("TRAIN.EPOCHS", 6, "TRAIN.WARMUP_EPOCHS", 1, "TRAIN.LR_SCHEDULER.NAME", "step",
                                    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", 2, "TRAIN.LR_SCHEDULER.DECAY_RATE", 0.5),
                        updates_per_epoch=3)
    assert used[0] == pytest.approx(1e-6)
    assert used[3:9] == pytest.approx([1e-3] * 6)
    assert used[9:15] == pytest.approx([5e-4] * 6)
    assert used[15:] == pytest.approx([2.5e-4] * 3)


def test_unknown_names_list_valid_ones() -> None:
    """The config refuses them where the keys are declared; the schedule is never built with them."""
    with pytest.raises(ConfigError, match="TRAIN.LR_SCALING 'sqrt' is not supported; choose one of: linear, none"):
        load_config(DEMO_CFG, ["TRAIN.LR_SCALING", "sqrt"])
    with pytest.raises(ConfigError, match="'poly' is not supported; choose one of: cosine, linear, step"):
        load_config(DEMO_CFG, ["TRAIN.LR_SCHEDULER.NAME", "poly"])


def test_scheduler_state_round_trips_through_a_weights_only_file() -> None:
    """The saved schedule state (kept in checkpoints for the release's own loader) gives the same rates."""
    config = config_with("TRAIN.EPOCHS", 3)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(config, optimizer, 4, effective_learning_rates(config, 1))
    buffer = io.BytesIO()
    torch.save({"lr_scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other_config = config_with("TRAIN.EPOCHS", 7, "TRAIN.BASE_LR", 1.0)
    other_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    restored = build_scheduler(other_config, other_optimizer, 4, effective_learning_rates(other_config, 1))
    restored.load_state_dict(loaded["lr_scheduler"])
    for update in range(12):
        scheduler.step_update(update)
        restored.step_update(update)
        assert other_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"], update
