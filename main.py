"""Train or evaluate Strip-MLP: ``python main.py --cfg FILE`` on one process, or under ``torchrun``.

This file only wires the pieces together: config, process group, data, model, optimiser, schedule,
checkpoints, and the epoch loop of ``engine.py``.
"""

import functools
import logging
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from timm.utils import ModelEmaV3
from torch import nn
from yacs.config import CfgNode

from agreement import Interruptions
from checkpoint import (
    Resume,
    ResumePoint,
    check_class_names,
    choose_resume,
    epoch_checkpoints,
    fit_state_dict,
    load_pretrained,
    read_checkpoint,
    restore_training,
    resumable_checkpoints,
    save_epoch,
    save_position,
    start_timeline,
)
from config import dump_config, parse_option
from data import Loaders, UnreadableImages, build_loader, build_scoring, check_trainable, model_classes
from distill import DistillationLoss, build_teacher, check_teacher_file
from distributed import (
    EXIT_PREEMPTED,
    PREEMPTION_SIGNALS,
    DistEnv,
    PreemptionSignal,
    RunInterrupted,
    any_rank,
    configure_backends,
    destroy_distributed,
    ignore_preemption_signals,
    init_distributed,
    on_rank0,
    requeue_slurm_job,
    set_cpu_threads,
)
from engine import (
    OptimizationState,
    StepSettings,
    average_bn_statistics,
    build_criterion,
    compile_model,
    throughput,
    train_one_epoch,
    validate,
)
from finetune import freeze, freezing_summary, layer_scales
from logger import MetricsLog, close_logger, create_logger
from lr_scheduler import build_scheduler, effective_learning_rates
from models import build_model
from optimizer import build_optimizer
from reports import PER_CLASS_MAX_CLASSES, ClassTally, sample_names, write_reports
from run_lock import hold_folder
from utils import RunError, make_folder, seed_everything, unwrap_model


def check_request(config: CfgNode, env: DistEnv) -> None:
    """Refuse, before any work, what would fail later or lose earlier work."""
    if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise RunError("--eval needs weights to evaluate: give --resume FILE (a checkpoint) or --pretrained FILE")
    if config.TRAIN.SYNC_BN and env.distributed and env.device.type != "cuda":
        raise RunError("TRAIN.SYNC_BN needs CUDA devices; on the CPU leave it False (running statistics are "
                       "averaged across ranks before validation and saving instead)")
    output_dir = Path(config.OUTPUT)

    def check_output() -> None:
        if not config.TRAIN.AUTO_RESUME and not config.MODEL.RESUME and resumable_checkpoints(output_dir):
            raise RunError(f"{output_dir} already holds checkpoints and TRAIN.AUTO_RESUME is off; resume with "
                           "--resume FILE or TRAIN.AUTO_RESUME True, or choose another --output/--tag")

    def check_pretrained() -> None:
        # A fine-tuning config names its weights by a path relative to where the run starts; missing, they would
        # stop the run only after the datasets are read.
        resuming = config.MODEL.RESUME or (training and config.TRAIN.AUTO_RESUME and resumable_checkpoints(output_dir))
        path = Path(config.MODEL.PRETRAINED)
        if not resuming and not path.is_file():
            raise RunError(f"MODEL.PRETRAINED {path} not found (looked for {path.absolute()}); put the weights there "
                           "or give --pretrained FILE")

    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if training:
        check_trainable(config.DATA.DATASET)  # the robustness test sets only evaluate
        on_rank0(check_output, env)  # rank 0's view of the output folder decides for all
    if training and config.DISTILL.TYPE != "none":
        on_rank0(lambda: check_teacher_file(config.DISTILL.TEACHER_CHECKPOINT), env)  # rank 0 reads the teacher
    if config.MODEL.PRETRAINED and (training or config.EVAL_MODE):
        on_rank0(check_pretrained, env)  # rank 0 reads the weights


def build_network(config: CfgNode, env: DistEnv, logger: logging.Logger) -> nn.Module:
    """The model on this process's device; the same initial weights on every rank."""
    seed_everything(config.SEED)
    model = build_model(config).to(env.device)  # keeps the memory format that CHANNELS_LAST gave it
    if config.TRAIN.SYNC_BN and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    logger.info(f"{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return model


def evaluate_only(config: CfgNode, env: DistEnv, logger: logging.Logger) -> int:
    """``--eval`` (the weights must fit the model's variant and classes; another input size is resampled) or
    ``--throughput``; no training data."""
    loaders = build_loader(config, env.rank, env.world_size, train=False, device=env.device,
                           worker_init_fn=ignore_preemption_signals)
    settings = StepSettings.from_config(config, env)
    model = build_network(config, env, logger)
    if config.EVAL_MODE:
        resume = choose_resume(config, env, logger)
        source = str(resume[0]) if resume else config.MODEL.PRETRAINED
        checkpoint = resume[1] if resume else read_checkpoint(source, env)
        logger.info(check_class_names(checkpoint, model_classes(loaders.dataset_val), source))
        model.load_state_dict(fit_state_dict(checkpoint, model, source, logger))
        logger.info(f"loaded weights from {source}")
    forward_model = compile_model(model, inference_only=True) if config.COMPILE else model
    if config.EVAL_MODE:
        scoring = build_scoring(loaders.dataset_val, env.device)
        if scoring.description:
            logger.info(scoring.description)
        tally = ClassTally(len(loaders.dataset_val.classes), env.device, keep_predictions=True)  # scored classes
        validate(forward_model, loaders.loader_val, settings, logger, UnreadableImages(config.DATA.BAD_IMAGE), tally,
                 scoring)
        if env.is_main:
            written = write_reports(Path(config.OUTPUT) / "eval", tally, loaders.dataset_val.classes,
                                    sample_names(loaders.dataset_val), logger)
            logger.info(f"evaluation reports: {', '.join(str(path) for path in written)}")
    else:
        throughput(forward_model, next(iter(loaders.loader_val))[0], settings, logger)
    return 0


def training_loss(config: CfgNode, env: DistEnv, base: nn.Module, classes: list[str], logger: logging.Logger
                  ) -> DistillationLoss:
    """The label loss ``base``, mixed with a teacher's under DISTILL; the teacher is read from its file, by a resumed
    run too (no checkpoint holds it)."""
    if config.DISTILL.TYPE == "none":
        return DistillationLoss(base)
    source = config.DISTILL.TEACHER_CHECKPOINT
    teacher = build_teacher(config.DISTILL.TEACHER, read_checkpoint(source, env), source, config.MODEL.NUM_CLASSES,
                            config.DATA.IMG_SIZE, classes, env.device, logger)
    logger.info(f"{config.DISTILL.TYPE} distillation from {config.DISTILL.TEACHER}: alpha {config.DISTILL.ALPHA}, "
                f"tau {config.DISTILL.TAU}")
    return DistillationLoss(base, teacher, config.DISTILL.TYPE, config.DISTILL.ALPHA, config.DISTILL.TAU)


class TrainingSetup(NamedTuple):
    """What a training run is made of, once built."""

    loaders: Loaders
    settings: StepSettings
    state: OptimizationState
    updates_per_epoch: int


def set_up_training(config: CfgNode, env: DistEnv, logger: logging.Logger) -> TrainingSetup:
    loaders = build_loader(config, env.rank, env.world_size, device=env.device,
                           worker_init_fn=ignore_preemption_signals)
    settings = StepSettings.from_config(config, env)
    model = build_network(config, env, logger)
    lrs = effective_learning_rates(config, env.world_size)
    logger.info(f"learning rates ({config.TRAIN.LR_SCALING} scaling, x{lrs.scale:.4g}): base {lrs.base:.3g}, "
                f"warm-up {lrs.warmup:.3g}, min {lrs.minimum:.3g}")
    if config.TRAIN.FREEZE:
        freeze(model, config.TRAIN.FREEZE)  # before the optimiser, DDP and the EMA copy see the parameters
        logger.info(freezing_summary(model, config.TRAIN.FREEZE))
    optimizer = build_optimizer(config, model, lrs.base)
    if config.TRAIN.LAYER_DECAY < 1.0:
        scales = ", ".join(f"{label} {scale:.3f}" for label, scale in layer_scales(model, optimizer))
        logger.info(f"layer decay {config.TRAIN.LAYER_DECAY}: learning-rate scales {scales}")
    forward_model = model
    if env.distributed:
        # Buffers stay per rank during the epoch and are averaged at its end (average_bn_statistics).
        # Gradients as views into the all-reduce buckets: no copy in and out of them per update.
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, forward_sync_buffers=False,
            gradient_as_bucket_view=True)
    if config.COMPILE:
        forward_model = compile_model(forward_model, inference_only=False)
    updates_per_epoch = math.ceil(len(loaders.loader_train) / settings.accumulation_steps)
    state = OptimizationState(
        model=forward_model,
        optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer, updates_per_epoch, lrs),
        scaler=torch.amp.GradScaler(env.device.type, enabled=config.AMP.ENABLE and config.AMP.DTYPE == "float16"),
        criterion=training_loss(config, env, build_criterion(config, loaders.mixup_fn is not None),
                                loaders.dataset_train.classes, logger),
        ema=ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None,
    )
    return TrainingSetup(loaders, settings, state, updates_per_epoch)


def starting_point(config: CfgNode, env: DistEnv, setup: TrainingSetup, resume: Resume | None,
                   logger: logging.Logger) -> ResumePoint:
    """Restore the run to continue, or load the pretrained weights to start from; returns where to start.

    Checkpoints are read by rank 0 and their contents broadcast, so every rank loads the same weights.
    """
    state = setup.state
    if resume is not None:
        logger.info(check_class_names(resume[1], setup.loaders.dataset_train.classes, str(resume[0])))
        point = restore_training(state, resume[1], str(resume[0]), config, env, setup.updates_per_epoch, logger)
    else:
        point = ResumePoint(epoch=0, step=0, best_acc1=0.0)
        if config.MODEL.PRETRAINED:
            model = unwrap_model(state.model)
            load_pretrained(model, read_checkpoint(config.MODEL.PRETRAINED, env), config.MODEL.PRETRAINED, logger)
            if state.ema is not None:
                state.ema.module.load_state_dict(model.state_dict())
    state.scheduler.step_update(state.global_step)
    return point


def train_and_validate(config: CfgNode, env: DistEnv, logger: logging.Logger, preemption: PreemptionSignal) -> int:
    """Train for the remaining epochs, validating and saving after each; returns 0, or EXIT_PREEMPTED after a
    stop request was saved."""
    setup = set_up_training(config, env, logger)
    loaders, settings, state = setup.loaders, setup.settings, setup.state
    resume = choose_resume(config, env, logger)
    point = starting_point(config, env, setup, resume, logger)
    timeline = start_timeline(config, resume, env, logger)
    classes = loaders.dataset_train.classes
    best_acc1 = point.best_acc1
    unreadable = UnreadableImages(config.DATA.BAD_IMAGE)
    metrics_log = MetricsLog(Path(config.OUTPUT), enabled=env.is_main)
    timeline.history = metrics_log.reconcile(resume.checkpoint.get("history") if resume is not None else [],
                                             point.epoch - 1)
    if point.epoch < config.TRAIN.EPOCHS:
        logger.info(f"training epochs {point.epoch}..{config.TRAIN.EPOCHS - 1}, "
                    f"{setup.updates_per_epoch} updates per epoch")
    else:
        logger.info(f"all {config.TRAIN.EPOCHS} epochs are already trained; raise TRAIN.EPOCHS to train more")
    try:
        for epoch in range(point.epoch, config.TRAIN.EPOCHS):
            start_step = point.step if epoch == point.epoch else 0
            interruptions = Interruptions(
                stop_requested=lambda: preemption.received is not None,
                save=functools.partial(save_position, state, config, env, epoch, best_acc1=best_acc1, classes=classes,
                                       timeline=timeline, logger=logger),
                save_every=config.TRAIN.SAVE_STEPS)
            loaders.loader_train.sampler.set_epoch(epoch, start=start_step * config.DATA.BATCH_SIZE)
            with preemption.deferred():
                train_stats = train_one_epoch(state, loaders.loader_train, epoch, settings, logger, loaders.mixup_fn,
                                              unreadable, start_step, interruptions)
            if train_stats.pop("stopped_at") is not None:
                return stop_for_preemption(env, logger, preemption.received)
            if state.criterion.teacher is not None:
                logger.info(f"teacher {state.criterion.take_teacher_seconds() / train_stats['epoch_time']:.0%} of "
                            "step time")
            average_bn_statistics(state, config.TRAIN.SYNC_BN, env)
            tally = (ClassTally(config.MODEL.NUM_CLASSES, env.device)
                     if config.MODEL.NUM_CLASSES < PER_CLASS_MAX_CLASSES else None)
            val_stats = validate(state.model, loaders.loader_val, settings, logger, unreadable, tally)
            row = {"epoch": epoch, **train_stats, "val_loss": val_stats["loss"], "acc1": val_stats["acc1"],
                   "acc5": val_stats["acc5"], "val_images": val_stats["images"],
                   "val_unreadable_images": val_stats["unreadable_images"]}
            if tally is not None:
                row["mean_class_acc"] = val_stats["mean_class_acc"]
            if state.ema is not None:
                ema_stats = validate(state.ema.module, loaders.loader_val, settings, logger, unreadable)
                row.update(ema_acc1=ema_stats["acc1"], ema_acc5=ema_stats["acc5"], ema_val_loss=ema_stats["loss"])
            is_best = val_stats["acc1"] > best_acc1
            best_acc1 = max(best_acc1, val_stats["acc1"])
            logger.info(f"epoch {epoch}: Acc@1 {val_stats['acc1']:.3f}, best {best_acc1:.3f}")
            timeline.history.append(row)  # saved with the checkpoint first: a kill before the file's row loses none
            with preemption.deferred():
                save_epoch(state, config, env, epoch, best_acc1, is_best, classes, timeline, logger)
                metrics_log.write(row)
            if any_rank(preemption.received is not None, env) and epoch + 1 < config.TRAIN.EPOCHS:
                return stop_for_preemption(env, logger, preemption.received)
    finally:
        metrics_log.close()
    saved = [p.name for _, p in epoch_checkpoints(Path(config.OUTPUT))]
    logger.info(f"training done: best Acc@1 {best_acc1:.3f}; checkpoints {saved}")
    return 0


def stop_for_preemption(env: DistEnv, logger: logging.Logger, signum: int | None) -> int:
    """After the stop request's checkpoint: requeue the SLURM job (rank 0) after a cluster's signal (not after
    Ctrl-C) and exit with EXIT_PREEMPTED. ``signum`` is this rank's signal (None: another rank's)."""
    name = signal.Signals(signum).name if signum is not None else "another rank's stop signal"
    logger.warning(f"stopped on {name} after saving where the run is; the same command resumes "
                   f"(exit status {EXIT_PREEMPTED})")
    if env.is_main and signum in PREEMPTION_SIGNALS:
        requeue_slurm_job(logger)
    return EXIT_PREEMPTED


def prepare(config: CfgNode, env: DistEnv, logger: logging.Logger, config_dir: Path) -> None:
    """Write the config to ``config_dir`` (rank 0) and set the process's threads, seeds and kernels."""
    if env.is_main:
        config_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, str(config_dir / "config.yaml"))
    logger.debug(f"full config:\n{config.dump()}")
    logger.info(f"rank {env.rank} of {env.world_size} on {env.device}; config saved to {config_dir}/config.yaml")
    threads = set_cpu_threads(config.DATA.NUM_WORKERS, env)
    if threads is not None:
        logger.info(f"CPU compute threads: {threads} (set OMP_NUM_THREADS to choose)")
    seed_everything(config.SEED + env.rank)
    configure_backends(config.DETERMINISTIC, config.TRAIN.TF32)


def own_folder(config: CfgNode) -> Path:
    """Where a run writes its config and logs: the output folder when training; for evaluation and throughput its
    ``eval/`` sub-folder, beside the evaluation's reports. An evaluation may share a training run's folder (even
    while it trains) and leaves the run's files as they are: its ``config.yaml`` stays the one it trained with."""
    return Path(config.OUTPUT) / "eval" if config.EVAL_MODE or config.THROUGHPUT_MODE else Path(config.OUTPUT)


def run(config: CfgNode, env: DistEnv, logger: logging.Logger, preemption: PreemptionSignal) -> int:
    """Evaluate (or measure throughput), or train holding the output folder's lock."""
    check_request(config, env)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        prepare(config, env, logger, own_folder(config))
        return evaluate_only(config, env, logger)
    with hold_folder(Path(config.OUTPUT), env, logger):
        prepare(config, env, logger, own_folder(config))
        return train_and_validate(config, env, logger, preemption)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run; a user-facing error becomes one line on stderr and exit status 1, a stop
    signal that cannot wait one line and 128 + its number, and an unexpected error a traceback marked with the
    rank, on stderr and in the rank's log file. Stop signals are handled from the start (see PreemptionSignal)."""
    with PreemptionSignal() as preemption:
        try:
            _, config = parse_option(argv)
            make_folder(config.OUTPUT, "--output")  # its log file comes first
            env = init_distributed(config.DEVICE)
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except RunInterrupted as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_status
        logger = create_logger(own_folder(config), env.rank, config.MODEL.NAME)
        try:
            return run(config, env, logger, preemption)
        except RunInterrupted as e:
            logger.error(str(e))
            return e.exit_status
        except RunError as e:
            logger.error(str(e))
            return 1
        except Exception as e:
            logger.exception(f"unexpected {type(e).__name__}: {e}")
            return 1
        finally:
            close_logger(logger)
            destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
