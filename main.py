"""Train or evaluate Strip-MLP: ``python main.py --cfg FILE`` on one process, or under ``torchrun``.

This file only wires the pieces together: config, process group, data, model, optimiser, schedule,
checkpoints, and the epoch loop of ``engine.py``.
"""

import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from yacs.config import CfgNode

from config import dump_config, parse_option
from data import DataError, build_loader
from engine import StepSettings, TrainState, compile_model, throughput, train_one_epoch, validate
from logger import MetricsLog, close_logger, create_logger
from lr_scheduler import build_scheduler, effective_learning_rates
from models import build_model
from optimizer import build_optimizer
from utils import (
    BEST_NAME,
    LATEST_NAME,
    CheckpointError,
    DistEnv,
    RunError,
    epoch_checkpoints,
    epoch_seed,
    find_resume_checkpoint,
    fit_state_dict,
    init_distributed,
    load_checkpoint_file,
    load_pretrained,
    prune_checkpoints,
    resumable_checkpoints,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    unwrap_model,
)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def build_criterion(config: CfgNode, mixup_active: bool) -> nn.Module:
    """Soft-target cross-entropy when mixup or cutmix mixes the targets (they carry the smoothing), else
    label-smoothing cross-entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def step_settings(config: CfgNode, env: DistEnv) -> StepSettings:
    return StepSettings(
        env=env,
        amp_enabled=config.AMP.ENABLE,
        amp_dtype=AMP_DTYPES[config.AMP.DTYPE],
        channels_last=config.CHANNELS_LAST,
        accumulation_steps=max(config.TRAIN.ACCUMULATION_STEPS, 1),
        clip_grad=config.TRAIN.CLIP_GRAD,
        print_freq=config.PRINT_FREQ,
        epochs=config.TRAIN.EPOCHS,
    )


def set_cpu_threads(config: CfgNode, env: DistEnv, logger: logging.Logger) -> None:
    """On the CPU, leave a core to each data worker unless OMP_NUM_THREADS says otherwise.

    Compute threads that share cores with the workers spin while waiting for each other, which was measured to
    slow a demo step tenfold on two cores; torchrun already sets OMP_NUM_THREADS=1 for several processes.
    """
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, len(os.sched_getaffinity(0)) - config.DATA.NUM_WORKERS)
    torch.set_num_threads(threads)
    logger.info(f"CPU compute threads: {threads} (set OMP_NUM_THREADS to choose)")


def check_request(config: CfgNode, env: DistEnv, output_dir: Path) -> None:
    """Refuse, before any work, what would fail later or lose earlier work."""
    if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise RunError("--eval needs weights to evaluate: give --resume FILE (a checkpoint) or --pretrained FILE")
    if config.TRAIN.SYNC_BN and env.distributed and env.device.type != "cuda":
        raise RunError("TRAIN.SYNC_BN needs CUDA devices; on the CPU leave it False (running statistics are "
                         "averaged across ranks before validation and saving instead)")
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if training and not config.TRAIN.AUTO_RESUME and not config.MODEL.RESUME and resumable_checkpoints(output_dir):
        raise RunError(f"{output_dir} already holds checkpoints and TRAIN.AUTO_RESUME is off; resume with "
                         "--resume FILE or TRAIN.AUTO_RESUME True, or choose another --output/--tag")


def checkpoint_state(state: TrainState, config: CfgNode, env: DistEnv, epoch: int, best_acc1: float
                     ) -> dict[str, Any]:
    """Everything needed to continue exactly, as tensors and plain containers (weights_only-loadable)."""
    return {
        "model": unwrap_model(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "model_ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": epoch,
        "global_step": state.global_step,
        "max_accuracy": best_acc1,
        "rng": rng_state(),
        "world_size": env.world_size,
        "config": config.dump(),
    }


def restore_state(state: TrainState, checkpoint: dict[str, Any], source: str, env: DistEnv,
                  logger: logging.Logger) -> tuple[int, float]:
    """Load a training checkpoint into ``state``; returns (first epoch to run, best accuracy so far)."""
    if "global_step" not in checkpoint:
        raise CheckpointError(f"{source} holds weights only (no optimiser state or epoch); "
                              "use --pretrained FILE to start a new run from it")
    model = unwrap_model(state.model)
    model.load_state_dict(fit_state_dict(checkpoint, model, source))
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    if state.ema is not None:
        ema_weights = checkpoint["model_ema"] or checkpoint["model"]
        state.ema.module.load_state_dict(fit_state_dict(ema_weights, state.ema.module, f"{source} (EMA)"))
    state.global_step = checkpoint["global_step"]
    if env.is_main:  # the states are rank 0's; every rank re-seeds from (SEED, rank, epoch) at each epoch anyway
        set_rng_state(checkpoint["rng"])
    if checkpoint["world_size"] != env.world_size:
        logger.warning(f"{source} was written by {checkpoint['world_size']} processes, this run has "
                       f"{env.world_size}: training continues but will not replay the original run exactly")
    logger.info(f"resumed from {source}: epoch {checkpoint['epoch']}, update {state.global_step}, "
                f"best Acc@1 {checkpoint['max_accuracy']:.3f}")
    return checkpoint["epoch"] + 1, checkpoint["max_accuracy"]


def save_epoch(state: TrainState, config: CfgNode, env: DistEnv, output_dir: Path, epoch: int, best_acc1: float,
               is_best: bool, logger: logging.Logger) -> None:
    """Rank 0 writes the epoch's checkpoints: ``ckpt_epoch_<n>.pth`` when due, ``best.pth``, then ``latest.pth``.

    ``latest.pth`` goes last: a kill between the writes leaves an epoch file one epoch ahead of it, which
    auto-resume finds by the epoch in its name.
    """
    if not env.is_main:
        return
    checkpoint = checkpoint_state(state, config, env, epoch, best_acc1)
    if (epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS:
        path = output_dir / f"ckpt_epoch_{epoch}.pth"
        save_checkpoint(checkpoint, path)
        logger.info(f"saved {path}")
    if is_best:
        save_checkpoint(checkpoint, output_dir / BEST_NAME)
    save_checkpoint(checkpoint, output_dir / LATEST_NAME)
    for path in prune_checkpoints(output_dir, config.TRAIN.KEEP_CHECKPOINTS):
        logger.info(f"removed {path.name} (TRAIN.KEEP_CHECKPOINTS {config.TRAIN.KEEP_CHECKPOINTS})")


def average_bn_statistics(state: TrainState, config: CfgNode, env: DistEnv) -> None:
    """Average BatchNorm running statistics across ranks (each rank saw only its own shard), unless SyncBN
    already keeps them identical."""
    if env.distributed and not config.TRAIN.SYNC_BN:
        distribute_bn(unwrap_model(state.model), env.world_size, reduce=True)
        if state.ema is not None:
            distribute_bn(state.ema.module, env.world_size, reduce=True)


def run(config: CfgNode, env: DistEnv, logger: logging.Logger) -> int:
    output_dir = Path(config.OUTPUT)
    check_request(config, env, output_dir)
    if env.is_main:
        dump_config(config, str(output_dir / "config.yaml"))
    logger.debug(f"full config:\n{config.dump()}")
    logger.info(f"rank {env.rank} of {env.world_size} on {env.device}; config saved to {output_dir / 'config.yaml'}")
    set_cpu_threads(config, env, logger)
    seed_everything(config.SEED + env.rank)
    torch.backends.cudnn.benchmark = not config.DETERMINISTIC
    if config.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)

    _, _, train_loader, val_loader, mixup_fn = build_loader(config, env.rank, env.world_size)
    settings = step_settings(config, env)

    seed_everything(config.SEED)  # the same initial weights on every rank, so each rank's EMA copy agrees
    model = build_model(config).to(env.device)
    if config.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if config.TRAIN.SYNC_BN and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    logger.info(f"{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters")

    lrs = effective_learning_rates(config, env.world_size)
    logger.info(f"learning rates ({config.TRAIN.LR_SCALING} scaling, x{lrs.scale:.4g}): base {lrs.base:.3g}, "
                f"warm-up {lrs.warmup:.3g}, min {lrs.minimum:.3g}")
    optimizer = build_optimizer(config, model, lrs.base)
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    forward_model = model
    if env.distributed:
        # Buffers stay per rank during the epoch and are averaged at its end (average_bn_statistics).
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None, forward_sync_buffers=False)
    if config.COMPILE:
        forward_model = compile_model(forward_model, inference_only=config.EVAL_MODE or config.THROUGHPUT_MODE)
    updates_per_epoch = math.ceil(len(train_loader) / settings.accumulation_steps)
    state = TrainState(
        model=forward_model,
        optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer, updates_per_epoch, lrs),
        scaler=torch.amp.GradScaler(env.device.type, enabled=config.AMP.ENABLE and config.AMP.DTYPE == "float16"),
        criterion=build_criterion(config, mixup_fn is not None),
        ema=ema,
    )

    start_epoch, best_acc1 = 0, 0.0
    resume = None
    if config.MODEL.RESUME:
        resume = Path(config.MODEL.RESUME), load_checkpoint_file(config.MODEL.RESUME)
    elif config.TRAIN.AUTO_RESUME and not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        resume = find_resume_checkpoint(output_dir, logger)
        if resume is None and resumable_checkpoints(output_dir):
            raise RunError(f"{output_dir} holds checkpoints but none loads; move them away to start afresh, "
                             "or choose another --output/--tag")
    if resume is not None and config.EVAL_MODE:
        model.load_state_dict(fit_state_dict(resume[1], model, str(resume[0])))
        logger.info(f"loaded weights from {resume[0]}")
    elif resume is not None:
        start_epoch, best_acc1 = restore_state(state, resume[1], str(resume[0]), env, logger)
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())

    if config.EVAL_MODE:
        validate(state.model, val_loader, settings, logger)
        return 0
    if config.THROUGHPUT_MODE:
        throughput(state.model, next(iter(val_loader))[0], settings, logger)
        return 0

    state.scheduler.step_update(state.global_step)
    metrics_log = MetricsLog(output_dir, enabled=env.is_main)
    if start_epoch < config.TRAIN.EPOCHS:
        logger.info(f"training epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}, {updates_per_epoch} updates per epoch")
    else:
        logger.info(f"all {config.TRAIN.EPOCHS} epochs are already trained; raise TRAIN.EPOCHS to train more")
    try:
        for epoch in range(start_epoch, config.TRAIN.EPOCHS):
            seed_everything(epoch_seed(config.SEED, env.rank, epoch))
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            train_stats = train_one_epoch(state, train_loader, epoch, settings, logger, mixup_fn)
            average_bn_statistics(state, config, env)
            val_stats = validate(state.model, val_loader, settings, logger)
            row = {"epoch": epoch, **train_stats, "val_loss": val_stats["loss"], "acc1": val_stats["acc1"],
                   "acc5": val_stats["acc5"]}
            if ema is not None:
                ema_stats = validate(ema.module, val_loader, settings, logger)
                row.update(ema_acc1=ema_stats["acc1"], ema_acc5=ema_stats["acc5"], ema_val_loss=ema_stats["loss"])
            is_best = val_stats["acc1"] > best_acc1
            best_acc1 = max(best_acc1, val_stats["acc1"])
            logger.info(f"epoch {epoch}: Acc@1 {val_stats['acc1']:.3f}, best {best_acc1:.3f}")
            save_epoch(state, config, env, output_dir, epoch, best_acc1, is_best, logger)
            metrics_log.write(row)
    finally:
        metrics_log.close()
    saved = [p.name for _, p in epoch_checkpoints(output_dir)]
    logger.info(f"training done: best Acc@1 {best_acc1:.3f}; checkpoints {saved}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and turn a user-facing error into one log line and exit code 1."""
    _, config = parse_option(argv)
    try:
        env = init_distributed(config.DEVICE)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logger = create_logger(Path(config.OUTPUT), env.rank, config.MODEL.NAME)
    try:
        return run(config, env, logger)
    except (RunError, DataError) as e:
        logger.error(str(e))
        return 1
    finally:
        close_logger(logger)
        if env.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
