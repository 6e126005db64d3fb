"""The training epoch, validation and throughput measurement, each returning a dict of metrics.

Mixed precision, distributed training and EMA are one code path each, switched by their settings:
autocast is always entered (``enabled=`` decides), the gradient scaler is a no-op unless the dtype is
float16, and DDP's ``no_sync`` is used only on accumulation micro-steps of a distributed model.
"""

import contextlib
import datetime
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from yacs.config import CfgNode

from agreement import Interruptions, NonFiniteLossError, UpdateAgreement
from data import DataError, Sample, Scoring, UnreadableImages
from distributed import DistEnv, all_reduce_sum
from finetune import frozen_norms, set_frozen_norms_eval
from logger import ProgressLine
from lr_scheduler import scheduled_lr
from measure import images_per_second, peak_memory_mb, time_paired
from reports import ClassTally
from utils import position_seed, seed_everything, unwrap_model


@dataclass(frozen=True)
class StepSettings:
    """How each step runs: device and precision, accumulation, clipping, logging cadence, and evaluation's
    horizontal-flip test-time augmentation."""

    env: DistEnv
    amp_enabled: bool
    amp_dtype: torch.dtype
    channels_last: bool
    accumulation_steps: int
    clip_grad: float
    print_freq: int
    epochs: int
    seed: int = 0
    test_flip: bool = False

    @classmethod
    def from_config(cls, config: CfgNode, env: DistEnv) -> "StepSettings":
        return cls(
            env=env,
            amp_enabled=config.AMP.ENABLE,
            amp_dtype=getattr(torch, config.AMP.DTYPE),  # one of config.AMP_DTYPES
            channels_last=config.CHANNELS_LAST,
            accumulation_steps=config.TRAIN.ACCUMULATION_STEPS,
            clip_grad=config.TRAIN.CLIP_GRAD,
            print_freq=config.PRINT_FREQ,
            epochs=config.TRAIN.EPOCHS,
            seed=config.SEED,
            test_flip=config.TEST.FLIP,
        )


@dataclass
class OptimizationState:
    """The state of the optimisation: the model, its loss, and what each optimiser update moves on (optimiser,
    schedule, gradient scaler, EMA, update count). A checkpoint saves all of it but the loss.

    ``model`` is what the forward pass calls (possibly wrapped by DDP and torch.compile); the weights live
    in ``unwrap_model(model)``. ``criterion(inputs, outputs, targets)`` gives a batch's loss; under distillation it
    holds the teacher (distill.DistillationLoss), which is therefore never saved either.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: ModelEmaV3 | None = None
    global_step: int = 0


def build_criterion(config: CfgNode, mixup_active: bool) -> nn.Module:
    """Soft-target cross-entropy when mixup or cutmix mixes the targets (they carry the smoothing), else
    label-smoothing cross-entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def average_bn_statistics(state: OptimizationState, sync_bn: bool, env: DistEnv) -> None:
    """Average BatchNorm running statistics across ranks (each rank saw only its own shard), unless SyncBN
    already keeps them identical. Frozen BatchNorms (TRAIN.FREEZE) are left alone: they hold the same statistics
    on every rank, which an average over 3 or 6 ranks could still change in the last bit."""
    if not env.distributed or sync_bn:
        return
    model = unwrap_model(state.model)
    frozen = {name for name, _ in frozen_norms(model)}
    for module in (model, *([state.ema.module] if state.ema is not None else [])):
        for name, norm in module.named_modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats and name not in frozen:
                for statistic in (norm.running_mean, norm.running_var):
                    all_reduce_sum(statistic, env).div_(env.world_size)


def _no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` when ``skip_sync`` (an accumulation micro-step), so only the last micro-step all-reduces."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps DDP; no_sync lives on the DDP module
    if skip_sync and isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


def compile_model(model: nn.Module, inference_only: bool) -> nn.Module:
    """torch.compile(model). A model whose weights never change again (evaluation, throughput) is frozen:
    inductor folds the weights, and the BatchNorms, into its graph as constants, which is faster on the
    CPU; a model still being trained must not be, or its validation would see stale weights. Frozen
    graphs get static shapes: with a dynamic batch size, inductor's fused oneDNN convolutions can fail
    their stride checks. The options apply to this model's compilation only."""
    return torch.compile(model, dynamic=False if inference_only else None, options={"freezing": inference_only})


def _to_device(images: torch.Tensor, targets: torch.Tensor, settings: StepSettings
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the device, images in the configured memory format."""
    device = settings.env.device
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, targets.to(device, non_blocking=True)


def _optimizer_update(state: OptimizationState, settings: StepSettings, where: str) -> float | None:
    """Clip the accumulated gradient once, step, and move the update count, the schedule and the EMA on; returns
    the gradient norm before clipping, or None when the float16 gradient scaler found it non-finite and skipped
    the step (as it is meant to, then lowering its scale).

    Gradients are unscaled first so the norm and the clipping threshold are in true units under float16.

    Raises:
        NonFiniteLossError: a non-finite gradient without a float16 scaler to skip it; every rank holds the same
            all-reduced gradient, so every rank stops here together.
    """
    state.scaler.unscale_(state.optimizer)
    max_norm = settings.clip_grad if settings.clip_grad > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(unwrap_model(state.model).parameters(), max_norm).item()
    if not math.isfinite(grad_norm) and not state.scaler.is_enabled():
        raise NonFiniteLossError(
            f"gradient norm is {grad_norm} at {where}; training stopped before the update, checkpoints already "
            "written are intact; lower TRAIN.BASE_LR or use AMP.DTYPE bfloat16")
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.scheduler.step_update(state.global_step)
    if state.ema is not None:
        state.ema.update(unwrap_model(state.model), step=state.global_step)
    return grad_norm if math.isfinite(grad_norm) else None


def _accumulation_group(step: int, num_steps: int, accumulation: int) -> tuple[int, bool]:
    """The size of the group of micro-steps that ``step`` belongs to (an epoch's last group may be shorter), and
    whether ``step`` is its last, the one that updates."""
    group_start = step - step % accumulation
    group_size = min(accumulation, num_steps - group_start)
    return group_size, step == group_start + group_size - 1


class _EpochMeters:
    """One rank's running statistics of a training epoch, and the epoch's log lines.

    Losses stay on the device until a log line needs them, so a micro-step costs no host synchronisation.
    """

    def __init__(self, settings: StepSettings, epoch: int, num_steps: int, logger: logging.Logger) -> None:
        self.settings = settings
        self.epoch = epoch
        self.num_steps = num_steps
        self.logger = logger
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=settings.env.device)
        self.samples = 0
        self.grad_norm = math.nan  # of the last update; inf when the float16 scaler skipped it
        self.grad_norm_sum = 0.0
        self.finite_updates = self.skipped_updates = 0
        self.progress = ProgressLine(settings.env.is_main)
        self.start = time.time()

    def add_micro_step(self, loss: torch.Tensor, batch_size: int) -> None:
        self.loss_sum += loss.detach().double() * batch_size
        self.samples += batch_size

    def add_update(self, grad_norm: float | None) -> None:
        """An update's gradient norm, or None for an update that the float16 scaler skipped."""
        if grad_norm is None:
            self.skipped_updates += 1
            self.grad_norm = math.inf
        else:
            self.grad_norm_sum += grad_norm
            self.finite_updates += 1
            self.grad_norm = grad_norm

    def log_step(self, step: int, lr: float, loss: torch.Tensor) -> None:
        """The step's line: logged every PRINT_FREQ steps and at the epoch's last, shown at every step on a terminal."""
        logged = step % self.settings.print_freq == 0 or step == self.num_steps - 1
        if not (logged or self.progress.enabled):
            return
        elapsed = time.time() - self.start
        step_time = elapsed / (step + 1)
        eta = datetime.timedelta(seconds=int(step_time * (self.num_steps - step - 1)))
        mean_loss = self.loss_sum.item() / max(self.samples, 1)
        line = (f"Train: [{self.epoch}/{self.settings.epochs}][{step}/{self.num_steps}]  eta {eta}  lr {lr:.6f}  "
                f"time {elapsed:.1f}s ({step_time:.4f}s/step)  loss {loss.item():.4f} ({mean_loss:.4f})  "
                f"grad_norm {self.grad_norm:.4f}  mem {peak_memory_mb(self.settings.env.device):.0f}MB")
        self.progress.update(line)
        if logged:
            self.progress.clear()
            self.logger.info(line)

    def summary(self, unreadable: int, stopped_at: int | None, lr: float) -> dict[str, float | int | None]:
        """The epoch's metrics, logged in one line: mean loss, mean gradient norm (None if every update was
        skipped), skipped updates, unreadable images, ``stopped_at``, last lr and time. The mean loss is exact
        over all ranks (sums of losses and samples); the rest is the same on every rank (it follows all-reduced
        values)."""
        self.progress.clear()
        env = self.settings.env
        totals = all_reduce_sum(torch.stack([self.loss_sum, self.loss_sum.new_tensor(self.samples)]), env).tolist()
        epoch_time = time.time() - self.start
        skipped = f", {self.skipped_updates} updates skipped by the float16 scaler" if self.skipped_updates else ""
        passed_over = f", {unreadable} unreadable images replaced" if unreadable else ""
        self.logger.info(f"EPOCH {self.epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}"
                         f"{skipped}{passed_over}")
        return {
            "train_loss": totals[0] / max(totals[1], 1),
            "grad_norm": self.grad_norm_sum / self.finite_updates if self.finite_updates else None,
            "skipped_updates": self.skipped_updates,
            "unreadable_images": unreadable,
            "stopped_at": stopped_at,
            "lr": lr,
            "epoch_time": epoch_time,
        }


def train_one_epoch(
        state: OptimizationState,
        loader: Iterable[Sample],
        epoch: int,
        settings: StepSettings,
        logger: logging.Logger,
        mixup_fn: Callable | None = None,
        unreadable: UnreadableImages | None = None,
        start_step: int = 0,
        interruptions: Interruptions | None = None,
) -> dict[str, float | None]:
    """Train for one pass over ``loader``; returns the epoch's metrics (``_EpochMeters.summary``), where
    ``stopped_at`` counts the micro-steps done when a stop request ended the epoch early (else None).

    A resumed epoch starts at micro-step ``start_step`` (``loader`` then holds only the batches after it). Each
    step re-seeds from (seed, rank, epoch, step), so random erasing, mixup and drop path do not depend on where
    the run started. Micro-batches form updates of ``accumulation_steps`` (an epoch's last may be shorter), each
    loss divided by its group's size: an update's gradient is the mean over its images. Before each update's
    backward pass the ranks agree on non-finite losses, unreadable images and stop requests (``agreement.py``).

    Raises:
        NonFiniteLossError: a loss (or, without float16 scaling, a gradient) is NaN or infinite.
        DataError: unreadable images under DATA.BAD_IMAGE error, or too many of them.
    """
    interruptions = interruptions or Interruptions()
    num_steps = start_step + len(loader)
    agreement = UpdateAgreement(settings.env, unreadable or UnreadableImages(), interruptions, epoch, num_steps, logger)
    state.model.train()
    set_frozen_norms_eval(state.model)  # frozen BatchNorms (TRAIN.FREEZE) keep their running statistics
    state.optimizer.zero_grad(set_to_none=True)
    meters = _EpochMeters(settings, epoch, num_steps, logger)
    stopped_at = None
    batches = iter(loader)
    for step in range(start_step, num_steps):
        # Before the batch is fetched: the loader's random erasing draws when it hands the batch over.
        seed_everything(position_seed(settings.seed, settings.env.rank, epoch, step))
        batch = next(batches)
        images, targets = _to_device(batch.image, batch.target, settings)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        group_size, is_update = _accumulation_group(step, num_steps, settings.accumulation_steps)
        where = f"epoch {epoch} step {step}/{num_steps} (optimiser update {state.global_step})"
        with _no_sync(state.model, not is_update):
            with torch.autocast(settings.env.device.type, dtype=settings.amp_dtype, enabled=settings.amp_enabled):
                outputs = state.model(images)
                loss = state.criterion(images, outputs, targets)
            meters.add_micro_step(loss, images.shape[0])
            stop = agreement.before_backward(batch, loss, is_update, where)
            state.scaler.scale(loss / group_size).backward()
        lr = scheduled_lr(state.optimizer)  # the rate this update uses, before the schedule moves on
        if is_update:
            meters.add_update(_optimizer_update(state, settings, where))
            if (stop or interruptions.save_due(state.global_step)) and step + 1 < num_steps:
                interruptions.save(step + 1)
        meters.log_step(step, lr, loss)
        if stop and step + 1 < num_steps:
            logger.warning(f"stopping on request after {where}; every rank finished this update")
            stopped_at = step + 1
            break
    return meters.summary(agreement.unreadable, stopped_at, scheduled_lr(state.optimizer))


def eval_logits(model: nn.Module, images: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    """The float32 logits (B, C) of a batch as evaluation computes them: on the device, in the configured memory
    format and precision; with ``test_flip`` (TEST.FLIP), the mean of the logits of the images and of their mirror
    images (logits, not probabilities, are averaged). The tools call it too, so that they predict what ``validate``
    counts."""
    images, _ = _to_device(images, torch.zeros(0), settings)
    with torch.autocast(settings.env.device.type, dtype=settings.amp_dtype, enabled=settings.amp_enabled):
        logits = model(images).float()
        if settings.test_flip:
            logits = (logits + model(images.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable[Sample], settings: StepSettings, logger: logging.Logger,
             unreadable: UnreadableImages | None = None, tally: ClassTally | None = None,
             scoring: Scoring | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the validation images that could be read; with a
    ``tally``, also its per-class counts and the mean per-class accuracy (``mean_class_acc``). ``scoring`` says
    which outputs are scored and which labels are right (a robustness test set's rule, see ``data.build_scoring``;
    by default every output against the target); images it finds without a label are left out and counted.

    Each rank counts correct predictions, loss and images of its own shard; the counts are summed across
    ranks, so the result equals a single-process evaluation exactly (the validation shards cover each
    image once). Counting correct predictions directly (not averaging per-batch percentages) keeps them
    integers. A sample that replaces an unreadable image is left out (its replacement is counted under
    its own index), and the unreadable images are counted.

    Raises:
        DataError: unreadable images under DATA.BAD_IMAGE error, or more than 1% of them.
    """
    unreadable = unreadable or UnreadableImages()
    scoring = scoring or Scoring()
    model.eval()
    device = settings.env.device
    own_unreadable: list[str] = []
    # loss, top-1 correct, top-5 correct, images evaluated, images unreadable, images without a label
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    progress = ProgressLine(settings.env.is_main)
    for step, batch in enumerate(loader):
        progress.update(f"Test: [{step}/{len(loader)}]")
        own_unreadable += unreadable.note(batch.bad, logger)
        readable = torch.tensor([not text for text in batch.bad], device=device)  # (B,)
        scored = scoring.score(eval_logits(model, batch.image, settings)[readable],
                               batch.target.to(device, non_blocking=True)[readable], batch.index.to(device)[readable])
        if tally is not None:
            tally.add(scored.logits, scored.targets, scored.indices, scored.correct)
        sums += torch.stack([
            F.cross_entropy(scored.logits, scored.targets, reduction="sum").double(),
            scored.correct[:, 0].sum().double(),
            scored.correct.any(dim=1).sum().double(),
            sums.new_tensor(len(scored.targets)),
            (~readable).sum().double(),
            scored.unlabelled.double(),
        ])
    progress.clear()
    loss_sum, correct1, correct5, count, unreadable_count, unlabelled = all_reduce_sum(sums, settings.env).tolist()
    unreadable_count = int(unreadable_count)
    unreadable.check(own_unreadable, unreadable_count, "validation")
    unreadable.check_fraction(unreadable_count, int(count + unlabelled) + unreadable_count, "the validation set")
    if count == 0:
        raise DataError("the validation set is empty; check DATA.DATA_PATH")
    metrics = {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss_sum / count,
               "images": int(count), "unreadable_images": unreadable_count, "unlabelled_images": int(unlabelled)}
    logger.info(f" * Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f}")
    if tally is not None:
        tally.reduce(settings.env)
        metrics["mean_class_acc"] = tally.mean_class_accuracy()
        logger.info(f" * mean per-class Acc@1 {metrics['mean_class_acc']:.3f}")
    left_out = f" ({unreadable_count} unreadable images left out)" if unreadable_count else ""
    left_out += f" ({int(unlabelled)} images without a label left out)" if unlabelled else ""
    logger.info(f"validation loss {metrics['loss']:.4f} over {metrics['images']} images{left_out}")
    return metrics


def throughput(model: nn.Module, images: torch.Tensor, settings: StepSettings, logger: logging.Logger,
               warmup: int = 5, repeats: int = 10) -> dict[str, float]:
    """Images per second of the eval forward pass on one batch: the median of ``repeats`` synchronised runs
    after ``warmup`` untimed ones, measured as ``tools/benchmark.py`` does."""
    model.eval()
    images, _ = _to_device(images, torch.zeros(0), settings)
    autocast = torch.autocast(settings.env.device.type, dtype=settings.amp_dtype, enabled=settings.amp_enabled)

    def forward() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    rates = images_per_second(images.shape[0], time_paired([forward], settings.env.device, warmup, repeats)[0])
    logger.info(f"batch_size {images.shape[0]} throughput {rates['median']:.1f} images/s "
                f"(median of {repeats}; min {rates['min']:.1f}, max {rates['max']:.1f})")
    return {"images_per_s": rates["median"], "batch_size": images.shape[0]}
