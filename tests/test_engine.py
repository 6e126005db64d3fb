"""The epoch loop, validation and throughput on hand-made batches and small models."""

import copy
import inspect
import logging
import math

import pytest
import torch
from run_helpers import sample_batch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from agreement import Interruptions, NonFiniteLossError
from data import DataError, Sample, UnreadableImages
from distill import DistillationLoss
from distributed import DistEnv
from engine import OptimizationState, StepSettings, throughput, train_one_epoch, validate
from models import StripMLPNet

LOGGER = logging.Logger("engine-test")
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def settings(accumulation: int = 1, clip_grad: float = 0.0, amp_dtype: torch.dtype | None = None) -> StepSettings:
    return StepSettings(env=CPU, amp_enabled=amp_dtype is not None, amp_dtype=amp_dtype or torch.bfloat16,
                        channels_last=False, accumulation_steps=accumulation, clip_grad=clip_grad, print_freq=1,
                        epochs=1)


def linear_model() -> nn.Module:
    """Without BatchNorm, a gradient over a batch is exactly the mean of the gradients over its parts."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4))


def make_state(model: nn.Module, optimizer_cls=torch.optim.AdamW, fp16: bool = False, ema: bool = False
               ) -> OptimizationState:
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    return OptimizationState(
        model=model,
        optimizer=optimizer,
        scheduler=CosineLRScheduler(optimizer, t_initial=100, t_in_epochs=False),
        scaler=torch.amp.GradScaler("cpu", enabled=fp16),
        criterion=DistillationLoss(nn.CrossEntropyLoss()),
        ema=ModelEmaV3(model, decay=0.5) if ema else None,
    )


def batches(count: int, size: int, seed: int = 1) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    return [sample_batch(torch.randn(size, 3, 2, 2, generator=generator),
                         torch.randint(0, 4, (size,), generator=generator)) for _ in range(count)]


def merge(parts: list[Sample]) -> Sample:
    return sample_batch(torch.cat([p.image for p in parts]), torch.cat([p.target for p in parts]))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulated_micro_batches_equal_one_large_batch_with_clipping() -> None:
    data = batches(8, size=2)
    accumulated, whole = make_state(linear_model()), make_state(linear_model())
    # A threshold far below the gradient norm: clipping each micro-batch instead of the sum would differ.
    stats = train_one_epoch(accumulated, data, 0, settings(accumulation=4, clip_grad=0.01), LOGGER)
    train_one_epoch(whole, [merge(data[:4]), merge(data[4:])], 0, settings(clip_grad=0.01), LOGGER)
    assert accumulated.global_step == whole.global_step == 2
    assert stats["grad_norm"] > 0.01
    assert_same_weights(accumulated.model, whole.model)


def test_last_incomplete_group_still_updates_with_its_own_mean() -> None:
    data = batches(5, size=2)
    accumulated, reference = make_state(linear_model()), make_state(linear_model())
    train_one_epoch(accumulated, data, 0, settings(accumulation=2), LOGGER)
    train_one_epoch(reference, [merge(data[0:2]), merge(data[2:4]), data[4]], 0, settings(), LOGGER)
    assert accumulated.global_step == 3
    assert_same_weights(accumulated.model, reference.model)


def test_schedule_steps_once_per_update() -> None:
    state = make_state(linear_model())
    seen = []
    state.scheduler.step_update = seen.append
    train_one_epoch(state, batches(7, size=2), 0, settings(accumulation=3), LOGGER)
    assert seen == [1, 2, 3]


class NaNOnMarker(nn.Module):
    """A linear model whose output turns NaN for an input batch that starts with +inf."""

    def __init__(self) -> None:
        super().__init__()
        self.body = linear_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out * torch.nan if torch.isinf(x.flatten()[0]) else out


@pytest.mark.parametrize(("accumulation", "global_step", "saved"), [(1, 0, [2, 4, 6]), (3, 0, [6]), (1, 3, [1, 3, 5])])
def test_a_checkpoint_every_save_every_updates_counts_updates_of_the_run(accumulation: int, global_step: int,
                                                                         saved: list[int]) -> None:
    """TRAIN.SAVE_STEPS: after every N-th update of the run (not of the epoch), with the micro-steps done so far; none
    after the epoch's last step, which the epoch's own checkpoint covers."""
    state = make_state(linear_model())
    state.global_step = global_step
    calls: list[int] = []
    interruptions = Interruptions(stop_requested=lambda: False, save=calls.append, save_every=2)
    train_one_epoch(state, batches(7, size=2), 0, settings(accumulation=accumulation), LOGGER,
                    interruptions=interruptions)
    assert calls == saved


def test_nan_loss_stops_naming_the_step_before_touching_the_weights() -> None:
    data = batches(3, size=2)
    data[1].image[0, 0, 0, 0] = math.inf
    state = make_state(NaNOnMarker())
    after_first = make_state(NaNOnMarker())
    train_one_epoch(after_first, data[:1], 4, settings(), LOGGER)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 4 step 1/3 \(optimiser update 1\)"):
        train_one_epoch(state, data, 4, settings(), LOGGER)
    assert_same_weights(state.model, after_first.model)


def test_ema_follows_the_model() -> None:
    state = make_state(linear_model(), ema=True)
    start = copy.deepcopy(state.ema.module)
    train_one_epoch(state, batches(4, size=2), 0, settings(), LOGGER)
    ema_weight, start_weight = state.ema.module[1].weight, start[1].weight
    assert not torch.equal(ema_weight, start_weight)
    # decay 0.5 lags behind the model: strictly between the start and the trained weights on average
    model_weight = state.model[1].weight
    assert (ema_weight - model_weight).abs().mean() < (start_weight - model_weight).abs().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-scaled"])
def test_mixed_precision_trains_on_cpu(dtype: torch.dtype) -> None:
    model = StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1))
    state = make_state(model, fp16=dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    data = [sample_batch(torch.randn(4, 3, 32, 32, generator=generator),
                         torch.randint(0, 4, (4,), generator=generator))] * 6
    before = copy.deepcopy(model.state_dict())
    stats = train_one_epoch(state, data, 0, settings(amp_dtype=dtype), LOGGER)
    assert math.isfinite(stats["train_loss"]) and state.global_step == 6
    assert state.scaler.is_enabled() == (dtype == torch.float16)
    # The scaler may skip its first updates while it finds its scale (65536 overflows float16 here); not all.
    assert stats["skipped_updates"] < 6 and math.isfinite(stats["grad_norm"])
    assert not torch.equal(before["head.weight"], model.head.weight)


class Logits(nn.Module):
    """Returns its input: the 'images' of the validation batches are the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_validate_counts_exactly() -> None:
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [1, 9, 2, 3, 4, 5], [5, 4, 3, 2, 1, 9], [0, 1, 2, 3, 4, 5.0],
                           [3, 2, 9, 1, 0, 0]])
    # Target ranks per row: 1st, 6th, 3rd, 6th, 1st -> top-1 right for rows 0 and 4, top-5 also for row 2.
    targets = torch.tensor([0, 0, 1, 0, 2])
    loader = [sample_batch(logits[:2], targets[:2]), sample_batch(logits[2:], targets[2:])]
    metrics = validate(Logits(), loader, settings(), LOGGER)
    assert metrics["images"] == 5
    assert metrics["acc1"] == pytest.approx(100 * 2 / 5)
    assert metrics["acc5"] == pytest.approx(100 * 3 / 5)
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item())


def test_float16_skipped_updates_are_counted_and_left_out_of_the_mean_gradient_norm() -> None:
    """The first batch's scaled gradient overflows float32: the scaler skips that update, the others count."""
    state = make_state(linear_model(), fp16=True)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, growth_interval=1000)
    data = batches(4, size=2)
    data[0].image.mul_(1e9)
    stats = train_one_epoch(state, data, 0, settings(), LOGGER)
    assert stats["skipped_updates"] == 1 and state.global_step == 4
    assert math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0


def test_a_non_finite_gradient_without_a_scaler_stops_before_the_update() -> None:
    class InfiniteBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            return grad * math.inf

    class InfiniteGradient(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = linear_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return InfiniteBackward.apply(self.body(x))  # a finite loss whose gradient is not

    state = make_state(InfiniteGradient())
    before = copy.deepcopy(state.model.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (inf|nan) at epoch 0 step 0/2"):
        train_one_epoch(state, batches(2, size=2), 0, settings(), LOGGER)
    assert all(torch.equal(before[name], value) for name, value in state.model.state_dict().items())


def recording_logger() -> tuple[logging.Logger, list[str]]:
    """A logger of its own (outside the registry, as the run's) and the messages it receives."""
    logger, messages = logging.Logger("recorded"), []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    return logger, messages


def with_bad(batch: Sample, bad: tuple[str, ...]) -> Sample:
    return batch._replace(bad=bad)


def test_unreadable_training_images_are_trained_past_logged_once_and_counted() -> None:
    data = batches(60, size=4)  # 2 of 240 images: under 1%
    data[3] = with_bad(data[3], ("", "/d/a.jpg: OSError: truncated", "", ""))
    data[9] = with_bad(data[9], ("/d/a.jpg: OSError: truncated", "", "", ""))  # the same file, a second time
    logger, messages = recording_logger()
    stats = train_one_epoch(make_state(linear_model()), data, 0, settings(), logger, unreadable=UnreadableImages())
    assert stats["unreadable_images"] == 2
    assert sum("/d/a.jpg: OSError: truncated" in m for m in messages) == 1  # logged once
    assert "2 unreadable images replaced" in messages[-1]


def test_unreadable_images_stop_the_run_under_the_error_policy_or_beyond_one_percent() -> None:
    data = batches(4, size=4)
    data[2] = with_bad(data[2], ("", "/d/b.png: UnidentifiedImageError: cannot identify image file", "", ""))
    with pytest.raises(DataError, match=r"cannot read image /d/b.png: UnidentifiedImageError: .* at epoch 0 step 2/4"):
        train_one_epoch(make_state(linear_model()), data, 0, settings(), LOGGER, unreadable=UnreadableImages("error"))
    # 1 of 16 images is more than 1%: a broken disk is not noise, whatever the policy.
    with pytest.raises(DataError, match=r"1 of the 16 images of epoch 0 cannot be read, more than 1%"):
        train_one_epoch(make_state(linear_model()), data, 0, settings(), LOGGER, unreadable=UnreadableImages("skip"))


def test_validation_leaves_out_replaced_samples_and_counts_them() -> None:
    logits = torch.eye(4).repeat(50, 1)[:200] * 9  # every prediction right
    targets = torch.arange(4).repeat(50)[:200]
    bad = tuple("/v/x.jpg: OSError: broken" if i == 7 else "" for i in range(200))
    loader = [sample_batch(logits[:100], targets[:100], bad[:100]),
              sample_batch(logits[100:], targets[100:], bad[100:])]
    loader[0].target[7] = 3 - loader[0].target[7]  # the replacement's prediction is wrong: it must not count
    logger, messages = recording_logger()
    metrics = validate(Logits(), loader, settings(), logger)
    assert (metrics["images"], metrics["unreadable_images"], metrics["acc1"]) == (199, 1, 100.0)
    assert any("over 199 images (1 unreadable images left out)" in m for m in messages)
    with pytest.raises(DataError, match="cannot read image /v/x.jpg"):
        validate(Logits(), loader, settings(), LOGGER, UnreadableImages("error"))


def test_the_training_step_reads_in_one_screen() -> None:
    """Seed, fetch, forward, backward, update, log: the agreement across ranks, the epoch's statistics and its log
    lines sit behind one call each, so ``train_one_epoch`` stays at most 60 lines."""
    lines, _ = inspect.getsourcelines(train_one_epoch)
    assert len(lines) <= 60


def test_throughput_measures_images_per_second() -> None:
    model = StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1))
    result = throughput(model, torch.randn(2, 3, 32, 32), settings(), LOGGER, warmup=1, repeats=2)
    assert result["images_per_s"] > 0 and result["batch_size"] == 2
    assert not model.training


@pytest.mark.cuda
@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_cuda_float16_with_scaler_channels_last(compile_model: bool) -> None:
    device = torch.device("cuda")
    model = StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1)).to(device)
    model = model.to(memory_format=torch.channels_last)
    state = make_state(torch.compile(model) if compile_model else model, fp16=False)
    state.scaler = torch.amp.GradScaler("cuda", enabled=True)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    run = StepSettings(env=env, amp_enabled=True, amp_dtype=torch.float16, channels_last=True, accumulation_steps=2,
                       clip_grad=1.0, print_freq=1, epochs=1)
    generator = torch.Generator().manual_seed(0)
    data = [sample_batch(torch.randn(4, 3, 32, 32, generator=generator),
                         torch.randint(0, 4, (4,), generator=generator))] * 4
    stats = train_one_epoch(state, data, 0, run, LOGGER)
    assert math.isfinite(stats["train_loss"]) and state.global_step == 2
    metrics = validate(state.model, data, run, LOGGER)
    assert metrics["images"] == 16


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_reaches_the_model_in_training_evaluation_and_throughput(channels_last: bool) -> None:
    """CHANNELS_LAST, read from the config, sets the layout of every input the model gets (the model's own weights
    follow it in models.build_model)."""
    from config import default_config

    config = default_config()
    config.merge_from_list(["CHANNELS_LAST", channels_last, "PRINT_FREQ", 1])
    run = StepSettings.from_config(config, CPU)
    torch.manual_seed(0)
    model = StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1), drop_path_rate=0.0)
    layouts = []
    model.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    data = [sample_batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))]  # contiguous, as a loader may give them
    train_one_epoch(make_state(model), data, 0, run, LOGGER)
    validate(model, data, run, LOGGER)
    throughput(model, data[0].image, run, LOGGER, warmup=1, repeats=1)
    assert len(layouts) >= 3 and set(layouts) == {channels_last}
