"""The training epoch, validation and throughput measurement, each returning a dict of metrics.

Mixed precision, distributed training and EMA are one code path each, switched by their settings:
autocast is always entered (``enabled=`` decides), the gradient scaler is a no-op unless the dtype is
float16, and DDP's ``no_sync`` is used only on accumulation micro-steps of a distributed model.
"""

import contextlib
import datetime
import logging
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from yacs.config import CfgNode

from data import DataError, Sample
from distributed import DistEnv, all_reduce_sum
from finetune import frozen_norms, set_frozen_norms_eval
from logger import ProgressLine
from lr_scheduler import scheduled_lr
from reports import ClassTally
from utils import RunError, position_seed, seed_everything, unwrap_model


class NonFiniteLossError(RunError):
    """The loss or the gradient became NaN or infinite; training stops before the bad update touches the
    weights, on every rank with the same message."""


@dataclass(frozen=True)
class StepSettings:
    """How each step runs: device and precision, accumulation, clipping, logging cadence."""

    env: DistEnv
    amp_enabled: bool
    amp_dtype: torch.dtype
    channels_last: bool
    accumulation_steps: int
    clip_grad: float
    print_freq: int
    epochs: int
    seed: int = 0

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
        )


@dataclass
class TrainState:
    """What an optimiser update changes; everything here is saved in a checkpoint.

    ``model`` is what the forward pass calls (possibly wrapped by DDP and torch.compile); the weights live
    in ``unwrap_model(model)``.
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


def average_bn_statistics(state: TrainState, sync_bn: bool, env: DistEnv) -> None:
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


class UnreadableImages:
    """The unreadable image files a run meets (see ``data.Sample.bad``).

    Each file is logged once, with its reason. The run stops when DATA.BAD_IMAGE is "error", or when more
    than 1% of the images of an epoch (or of the validation set) cannot be read: a broken disk is not noise.
    Decisions are taken on counts summed over ranks, so every rank stops at the same step.
    """

    MAX_FRACTION = 0.01

    def __init__(self, policy: str = "skip") -> None:
        self.policy = policy
        self.logged: set[str] = set()

    def note(self, bad: Sequence[str], logger: logging.Logger) -> list[str]:
        """The first line ("PATH: REASON" of the sample's own file) of each replaced sample of a batch; every
        file passed over that was not logged before is logged now."""
        for line in (line for text in bad for line in text.splitlines()):
            if line not in self.logged:
                self.logged.add(line)
                logger.warning(f"unreadable image passed over (DATA.BAD_IMAGE {self.policy}): {line}")
        return [text.splitlines()[0] for text in bad if text]

    def check(self, own: list[str], count: int, where: str) -> None:
        """Under DATA.BAD_IMAGE error, stop every rank when any met an unreadable image.

        Args:
            own: this rank's unreadable files since the last check.
            count: their number summed over ranks.
        """
        if self.policy == "error" and count:
            if own:
                raise DataError(f"cannot read image {own[0]} at {where}; remove or replace the file, or set "
                                "DATA.BAD_IMAGE skip to continue past unreadable images")
            raise DataError(f"{count} image(s) cannot be read at {where} (DATA.BAD_IMAGE error); the rank that "
                            "read them names each file")

    def check_fraction(self, seen: int, total: int, scope: str) -> None:
        """Stop every rank when ``seen`` of the ``total`` images of ``scope`` (sums over ranks) exceed the limit."""
        if seen > self.MAX_FRACTION * total:
            raise DataError(f"{seen} of the {total} images of {scope} cannot be read, more than "
                            f"{self.MAX_FRACTION:.0%}: check the disk and DATA.DATA_PATH (a broken disk is not noise)")


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


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, the peak resident set on the CPU.

    On Linux the CPU figure is VmHWM, which, unlike getrusage's maxrss, does not start from the parent's
    size in a process that a launcher forked and executed.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _to_device(images: torch.Tensor, targets: torch.Tensor, settings: StepSettings
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the device, images in the configured memory format."""
    device = settings.env.device
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, targets.to(device, non_blocking=True)


def _optimizer_update(state: TrainState, settings: StepSettings, where: str) -> float | None:
    """Clip the accumulated gradient once and step; returns the gradient norm before clipping, or None when the
    float16 gradient scaler found it non-finite and skipped the step (as it is meant to, then lowering its scale).

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
    return grad_norm if math.isfinite(grad_norm) else None


@dataclass(frozen=True)
class Interruptions:
    """How an epoch may pause before its end: when any rank was asked to stop (a preemption signal), every
    rank finishes its update and the epoch ends there; and a checkpoint every ``save_every`` updates.

    Attributes:
        stop_requested: whether this rank was asked to stop.
        save: writes the mid-epoch checkpoint (on rank 0) after the given number of the epoch's micro-steps.
        save_every: updates between checkpoints; 0 writes none (a stop always writes one).
    """

    stop_requested: Callable[[], bool]
    save: Callable[[int], None]
    save_every: int = 0


class _EpochTally:
    """What one rank counts during a training epoch, and the per-update agreement between ranks.

    Losses stay on the device until logging or the update's agreement needs them, so a micro-step without
    an update costs no host synchronisation.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0
        self.group_bad_loss = torch.zeros((), dtype=torch.float64, device=device)  # first non-finite loss, or 0
        self.group_unreadable: list[str] = []
        self.unreadable = 0
        self.grad_norm_sum = 0.0
        self.finite_updates = self.skipped_updates = 0

    def add_micro_step(self, loss: torch.Tensor, batch_size: int, unreadable: list[str]) -> None:
        loss = loss.detach().double()
        self.loss_sum += loss * batch_size
        self.samples += batch_size
        first_bad = torch.isfinite(loss) | (self.group_bad_loss != 0)
        self.group_bad_loss = torch.where(first_bad, self.group_bad_loss, loss)
        self.group_unreadable += unreadable

    def agree(self, settings: StepSettings, policy: "UnreadableImages", stop_requested: bool, epoch_images: int,
              where: str, epoch: int) -> bool:
        """Before the backward pass of an update (the one that all-reduces gradients): one small all-reduce of
        every rank's first non-finite loss of the group, of the group's unreadable images and of stop
        requests, so that all ranks stop together, with the same message, instead of waiting for a failed one.

        Returns:
            Whether any rank was asked to stop (after this update).

        Raises:
            NonFiniteLossError: a loss of the group was NaN or infinite on some rank.
            DataError: unreadable images that DATA.BAD_IMAGE or the 1% limit do not allow.
        """
        env = settings.env
        health = torch.zeros(env.world_size + 2, dtype=torch.float64, device=env.device)
        health[env.rank] = self.group_bad_loss
        health[-2] = len(self.group_unreadable)
        health[-1] = float(stop_requested)
        *losses, unreadable, stops = all_reduce_sum(health, env).tolist()
        bad = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
        if bad:
            raise NonFiniteLossError(
                f"loss is {losses[bad[0]]} at {where} on rank {', '.join(map(str, bad))}; training stopped, "
                "checkpoints already written are intact; lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD, or use "
                "AMP.DTYPE bfloat16")
        policy.check(self.group_unreadable, int(unreadable), where)
        self.unreadable += int(unreadable)
        policy.check_fraction(self.unreadable, epoch_images, f"epoch {epoch}")
        self.group_unreadable = []
        return stops > 0

    def add_update(self, grad_norm: float | None) -> None:
        if grad_norm is None:
            self.skipped_updates += 1
        else:
            self.grad_norm_sum += grad_norm
            self.finite_updates += 1

    def mean_loss(self) -> float:
        return self.loss_sum.item() / max(self.samples, 1)

    def summary(self, env: DistEnv) -> dict[str, float | int | None]:
        """Exact means over all ranks (sums of losses and samples); gradient norms, skipped updates and
        unreadable images are the same on every rank (they follow all-reduced values)."""
        totals = all_reduce_sum(torch.stack([self.loss_sum, self.loss_sum.new_tensor(self.samples)]), env).tolist()
        return {
            "train_loss": totals[0] / max(totals[1], 1),
            "grad_norm": self.grad_norm_sum / self.finite_updates if self.finite_updates else None,
            "skipped_updates": self.skipped_updates,
            "unreadable_images": self.unreadable,
        }


def train_one_epoch(
        state: TrainState,
        loader: Iterable,
        epoch: int,
        settings: StepSettings,
        logger: logging.Logger,
        mixup_fn: Callable | None = None,
        unreadable: UnreadableImages | None = None,
        start_step: int = 0,
        interruptions: Interruptions | None = None,
) -> dict[str, float | None]:
    """Train for one pass over ``loader``; returns mean loss, mean gradient norm (None if every update was
    skipped), skipped updates, unreadable images, last lr, time, and ``stopped_at``: the micro-steps done
    when a stop request ended the epoch early, else None.

    A resumed epoch starts at micro-step ``start_step``: ``loader`` then holds only the batches after it.
    Every step re-seeds python, numpy and torch from (seed, rank, epoch, step) before its batch is fetched, so
    random erasing, mixup and drop path do not depend on where the run was started (the loader's per-sample
    augmentation depends on (seed, epoch, index) alone).

    Micro-batches are grouped into optimiser updates of ``accumulation_steps``; the last group of an
    epoch may be shorter and still makes an update. Each micro-batch's loss is divided by the size of its
    own group, so an update's gradient is the mean over the images of its group. Before the backward pass
    of each update the ranks agree that every loss of the group was finite. Updates that the float16 scaler
    skipped are counted and left out of the mean gradient norm. Samples that replace unreadable images
    (``unreadable`` decides what they may do) are trained on and counted.

    Raises:
        NonFiniteLossError: a loss (or, without float16 scaling, a gradient) is NaN or infinite.
        DataError: unreadable images under DATA.BAD_IMAGE error, or too many of them.
    """
    unreadable = unreadable or UnreadableImages()
    interruptions = interruptions or Interruptions(stop_requested=lambda: False, save=lambda steps: None)
    env = settings.env
    device = env.device
    state.model.train()
    set_frozen_norms_eval(state.model)  # frozen BatchNorms (TRAIN.FREEZE) keep their running statistics
    state.optimizer.zero_grad(set_to_none=True)
    num_steps = start_step + len(loader)
    accumulation = settings.accumulation_steps
    tally = _EpochTally(device)
    grad_norm = math.nan
    stop = False
    progress = ProgressLine(env.is_main)
    start = time.time()
    batches = iter(loader)
    for step in range(start_step, num_steps):
        # Before the batch is fetched: the loader's random erasing draws when it hands the batch over.
        seed_everything(position_seed(settings.seed, env.rank, epoch, step))
        batch = next(batches)
        images, targets = _to_device(batch.image, batch.target, settings)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        group_start = step - step % accumulation
        group_size = min(accumulation, num_steps - group_start)
        is_update = step == group_start + group_size - 1
        where = f"epoch {epoch} step {step}/{num_steps} (optimiser update {state.global_step})"
        with _no_sync(state.model, not is_update):
            with torch.autocast(device.type, dtype=settings.amp_dtype, enabled=settings.amp_enabled):
                loss = state.criterion(state.model(images), targets)
            tally.add_micro_step(loss, images.shape[0], unreadable.note(batch.bad, logger))
            if is_update:
                stop = tally.agree(settings, unreadable, interruptions.stop_requested(),
                                   num_steps * images.shape[0] * env.world_size, where, epoch)
            state.scaler.scale(loss / group_size).backward()

        lr = scheduled_lr(state.optimizer)  # the rate this update uses, before the schedule moves on
        if is_update:
            update_norm = _optimizer_update(state, settings, where)
            state.global_step += 1
            state.scheduler.step_update(state.global_step)
            if state.ema is not None:
                state.ema.update(unwrap_model(state.model), step=state.global_step)
            tally.add_update(update_norm)
            grad_norm = math.inf if update_norm is None else update_norm
            saving_due = interruptions.save_every > 0 and state.global_step % interruptions.save_every == 0
            if (stop or saving_due) and step + 1 < num_steps:
                interruptions.save(step + 1)

        if step % settings.print_freq == 0 or step == num_steps - 1 or progress.enabled:
            elapsed = time.time() - start
            step_time = elapsed / (step + 1)
            eta = datetime.timedelta(seconds=int(step_time * (num_steps - step - 1)))
            line = (f"Train: [{epoch}/{settings.epochs}][{step}/{num_steps}]  eta {eta}  lr {lr:.6f}  "
                    f"time {elapsed:.1f}s ({step_time:.4f}s/step)  loss {loss.item():.4f} ({tally.mean_loss():.4f})  "
                    f"grad_norm {grad_norm:.4f}  mem {peak_memory_mb(device):.0f}MB")
            progress.update(line)
            if step % settings.print_freq == 0 or step == num_steps - 1:
                progress.clear()
                logger.info(line)
        if stop and step + 1 < num_steps:
            logger.warning(f"stopping on request after {where}; every rank finished this update")
            break

    progress.clear()
    stats = tally.summary(env)
    stats["stopped_at"] = step + 1 if stop and step + 1 < num_steps else None
    epoch_time = time.time() - start
    skipped = f", {stats['skipped_updates']} updates skipped by the float16 scaler" if stats["skipped_updates"] else ""
    passed_over = f", {stats['unreadable_images']} unreadable images replaced" if stats["unreadable_images"] else ""
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}{skipped}{passed_over}")
    return {**stats, "lr": scheduled_lr(state.optimizer), "epoch_time": epoch_time}


def eval_logits(model: nn.Module, images: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    """The float32 logits (B, C) of a batch as evaluation computes them: on the device, in the configured memory
    format and precision. The tools call it too, so that they predict what ``validate`` counts."""
    images, _ = _to_device(images, torch.zeros(0), settings)
    with torch.autocast(settings.env.device.type, dtype=settings.amp_dtype, enabled=settings.amp_enabled):
        return model(images).float()


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable[Sample], settings: StepSettings, logger: logging.Logger,
             unreadable: UnreadableImages | None = None, tally: ClassTally | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the validation images that could be read; with a
    ``tally``, also its per-class counts and the mean per-class accuracy (``mean_class_acc``).

    Each rank counts correct predictions, loss and images of its own shard; the counts are summed across
    ranks, so the result equals a single-process evaluation exactly (the validation shards cover each
    image once). Counting correct predictions directly (not averaging per-batch percentages) keeps them
    integers. A sample that replaces an unreadable image is left out (its replacement is counted under
    its own index), and the unreadable images are counted.

    Raises:
        DataError: unreadable images under DATA.BAD_IMAGE error, or more than 1% of them.
    """
    unreadable = unreadable or UnreadableImages()
    model.eval()
    device = settings.env.device
    own_unreadable: list[str] = []
    # loss, top-1 correct, top-5 correct, images evaluated, images unreadable
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    progress = ProgressLine(settings.env.is_main)
    for step, batch in enumerate(loader):
        progress.update(f"Test: [{step}/{len(loader)}]")
        own_unreadable += unreadable.note(batch.bad, logger)
        readable = torch.tensor([not text for text in batch.bad], device=device)  # (B,)
        outputs = eval_logits(model, batch.image, settings)[readable]
        targets = batch.target.to(device, non_blocking=True)[readable]
        if tally is not None:
            tally.add(outputs, targets, batch.index.to(device)[readable])
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices  # (B', k)
        correct = top.eq(targets[:, None])  # (B', k)
        sums += torch.stack([
            F.cross_entropy(outputs, targets, reduction="sum").double(),
            correct[:, :1].sum().double(),
            correct.sum().double(),
            readable.sum().double(),
            (~readable).sum().double(),
        ])
    progress.clear()
    loss_sum, correct1, correct5, count, unreadable_count = all_reduce_sum(sums, settings.env).tolist()
    unreadable_count = int(unreadable_count)
    unreadable.check(own_unreadable, unreadable_count, "validation")
    unreadable.check_fraction(unreadable_count, int(count) + unreadable_count, "the validation set")
    if count == 0:
        raise DataError("the validation set is empty; check DATA.DATA_PATH")
    metrics = {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss_sum / count,
               "images": int(count), "unreadable_images": unreadable_count}
    logger.info(f" * Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f}")
    if tally is not None:
        tally.reduce(settings.env)
        metrics["mean_class_acc"] = tally.mean_class_accuracy()
        logger.info(f" * mean per-class Acc@1 {metrics['mean_class_acc']:.3f}")
    left_out = f" ({unreadable_count} unreadable images left out)" if unreadable_count else ""
    logger.info(f"validation loss {metrics['loss']:.4f} over {metrics['images']} images{left_out}")
    return metrics


def time_paired(steps: list[Callable[[], None]], device: torch.device, warmup: int, repeats: int
                ) -> list[list[float]]:
    """Seconds per run of each step, alternating between the steps run by run after ``warmup`` untimed runs,
    so that several implementations see the same machine state. Each run is synchronised."""
    for step in steps:
        for _ in range(warmup):
            step()
    synchronize(device)
    seconds: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for index, step in enumerate(steps):
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds[index].append(time.perf_counter() - start)
    return seconds


def images_per_second(batch_size: int, seconds: list[float]) -> dict[str, float]:
    """Median, min and max images/s over timed runs of one batch each."""
    rates = [batch_size / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


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
