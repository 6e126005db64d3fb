"""Restoring a saved run: release checkpoints, a changed schedule, a changed precision, and one choice for all ranks."""

import argparse
import logging
import os
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from run_helpers import release_config
from timm.utils import ModelEmaV3
from yacs.config import CfgNode

from checkpoint import (
    CheckpointError,
    Timeline,
    build_checkpoint,
    choose_resume,
    load_checkpoint_file,
    read_checkpoint,
    restore_training,
    save_checkpoint,
    save_position,
)
from config import default_config
from distributed import DistEnv
from engine import OptimizationState
from lr_scheduler import build_scheduler, effective_learning_rates
from models import StripMLPNet
from optimizer import build_optimizer, is_decayed

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
UPDATES_PER_EPOCH = 5


def config_with(**keys) -> CfgNode:
    config = default_config()
    config.merge_from_list(["TRAIN.LR_SCALING", "none", "TRAIN.EPOCHS", 4, "TRAIN.WARMUP_EPOCHS", 1,
                            *[item for key, value in keys.items() for item in (key.replace("__", "."), value)]])
    return config


def tiny() -> StripMLPNet:
    torch.manual_seed(0)
    return StripMLPNet(img_size=32, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))


def make_state(config: CfgNode, model: torch.nn.Module | None = None, fp16: bool = False) -> OptimizationState:
    model = model or tiny()
    lrs = effective_learning_rates(config, 1)
    optimizer = build_optimizer(config, model, lrs.base)
    return OptimizationState(model=model, optimizer=optimizer,
                      scheduler=build_scheduler(config, optimizer, UPDATES_PER_EPOCH, lrs),
                      scaler=torch.amp.GradScaler("cpu", enabled=fp16), criterion=torch.nn.CrossEntropyLoss())


def train_steps(state: OptimizationState, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images, targets = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        state.scaler.scale(torch.nn.functional.cross_entropy(state.model(images), targets)).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.scheduler.step_update(state.global_step)


def saved_run(config: CfgNode, fp16: bool = False) -> dict:
    """A checkpoint after one epoch of updates, read back from disk as a resumed run reads it."""
    state = make_state(config, fp16=fp16)
    train_steps(state, UPDATES_PER_EPOCH)
    return build_checkpoint(state, config, CPU, epoch=0, best_acc1=12.5, classes=["a", "b", "c"])


def rates(state: OptimizationState) -> list[tuple[float, float]]:
    return [(group["lr"], group["weight_decay"]) for group in state.optimizer.param_groups]


def test_a_changed_schedule_takes_effect_and_is_logged(caplog) -> None:
    """Lower lr, more epochs, new warm-up and weight decay: rates at update u equal a fresh run's at u."""
    checkpoint = saved_run(config_with(TRAIN__BASE_LR=1e-3))
    new = config_with(TRAIN__BASE_LR=2e-4, TRAIN__EPOCHS=8, TRAIN__WARMUP_EPOCHS=2, TRAIN__WEIGHT_DECAY=0.1,
                      TRAIN__MIN_LR=1e-6)
    resumed, fresh = make_state(new), make_state(new)
    with caplog.at_level(logging.INFO):
        point = restore_training(resumed, checkpoint, "ckpt.pth", new, CPU, UPDATES_PER_EPOCH,
                                 logging.getLogger("resume"))
    assert (*point, resumed.global_step) == (1, 0, 12.5, UPDATES_PER_EPOCH)
    for update in (UPDATES_PER_EPOCH, 7, 11, 39):
        resumed.scheduler.step_update(update)
        fresh.scheduler.step_update(update)
        assert rates(resumed) == rates(fresh)
    assert rates(resumed)[0][1] == 0.1 and rates(resumed)[1][1] == 0.0
    for change in ("TRAIN.BASE_LR: 0.001 -> 0.0002", "TRAIN.EPOCHS: 4 -> 8", "TRAIN.WARMUP_EPOCHS: 1 -> 2",
                   "TRAIN.WEIGHT_DECAY: 0.05 -> 0.1", "TRAIN.MIN_LR: 5e-06 -> 1e-06"):
        assert f"config changed since ckpt.pth: {change}" in caplog.text
    # The moments and step counts are the checkpoint's.
    for index, saved in checkpoint["optimizer"]["state"].items():
        for key, value in saved.items():
            assert torch.equal(resumed.optimizer.state_dict()["state"][index][key], value), (index, key)


def test_an_unchanged_config_logs_no_change(caplog) -> None:
    config = config_with()
    with caplog.at_level(logging.INFO):
        restore_training(make_state(config), saved_run(config), "ckpt.pth", config, CPU, UPDATES_PER_EPOCH,
                         logging.getLogger("resume"))
    assert "config changed" not in caplog.text


@pytest.mark.parametrize(("change", "step"), [
    ((), 3), (("DATA.BATCH_SIZE", 32), 0), (("TRAIN.ACCUMULATION_STEPS", 2), 0), (("TRAIN.ACCUMULATION_STEPS", 1), 3),
    (("DATA.AUG_REPEATS", 3), 0),
])
def test_a_checkpoint_inside_an_epoch_continues_there_only_with_the_same_steps(change: tuple, step: int,
                                                                                caplog) -> None:
    """The position inside an epoch counts micro-batches: another batch size or accumulation cuts the epoch into other
    steps (and a start beyond the new share used to stop the run with the sampler's ValueError)."""
    config = config_with()
    state = make_state(config)
    train_steps(state, 3)
    checkpoint = build_checkpoint(state, config, CPU, epoch=0, best_acc1=0.0, classes=["a", "b", "c"], step=3)
    new = config_with()
    new.merge_from_list(list(change))
    with caplog.at_level(logging.WARNING):
        point = restore_training(make_state(new), checkpoint, "latest.pth", new, CPU, UPDATES_PER_EPOCH,
                                 logging.getLogger("resume"))
    assert (point.epoch, point.step) == (1, step)
    assert ("trains epoch 1 from its start" in caplog.text) == (step == 0)


@pytest.mark.parametrize(("saved_fp16", "now_fp16"), [(False, True), (True, False), (True, True)])
def test_precision_may_change_between_runs(saved_fp16: bool, now_fp16: bool, caplog) -> None:
    config = config_with()
    checkpoint = saved_run(config, fp16=saved_fp16)
    state = make_state(config, fp16=now_fp16)
    with caplog.at_level(logging.INFO):
        restore_training(state, checkpoint, "ckpt.pth", config, CPU, UPDATES_PER_EPOCH, logging.getLogger("resume"))
    if now_fp16 and saved_fp16:
        assert state.scaler.get_scale() == checkpoint["scaler"]["scale"]
    elif now_fp16:
        assert "no float16 gradient-scaler state; the scaler starts fresh" in caplog.text
        assert state.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    train_steps(state, 1)  # the restored state trains


# ---------------------------------------------------------------------------------------------------------------
# The release's own checkpoints


def release_checkpoint(model: torch.nn.Module, order: list[str]) -> tuple[dict, list[str]]:
    """A release training checkpoint: weights in the order ``order`` and an AdamW state whose moments are the
    parameter's position in that order, grouped as the release grouped them (decayed, then not)."""
    weights = model.state_dict()
    parameters = dict(model.named_parameters())
    skip = model.no_weight_decay_keywords()
    names = [n for n in order if n in parameters]
    groups = [[n for n in names if is_decayed(n, parameters[n], skip)],
              [n for n in names if not is_decayed(n, parameters[n], skip)]]
    flat = [n for group in groups for n in group]
    state = {i: {"step": torch.tensor(7.0), "exp_avg": torch.full_like(parameters[n], float(i)),
                 "exp_avg_sq": torch.full_like(parameters[n], float(i) ** 2)} for i, n in enumerate(flat)}
    param_groups = [{"params": list(range(len(groups[0]))), "lr": 1e-5, "weight_decay": 0.05, "betas": (0.9, 0.999),
                     "eps": 1e-8, "amsgrad": False},
                    {"params": list(range(len(groups[0]), len(flat))), "lr": 1e-5, "weight_decay": 0.0,
                     "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}]
    return {"model": {f"module.{n}": weights[n] for n in order},
            "optimizer": {"state": state, "param_groups": param_groups}, "lr_scheduler": {"t_initial": 300},
            "max_accuracy": 81.2, "epoch": 9, "config": release_config(),
            "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}}, flat


def test_release_training_checkpoint_loads_its_config_as_plain_mappings(tmp_path: Path) -> None:
    model = tiny()
    checkpoint, _ = release_checkpoint(model, list(model.state_dict()))
    torch.save(checkpoint, tmp_path / "release.pth")  # the release saved its CfgNode this way
    loaded = load_checkpoint_file(tmp_path / "release.pth")
    assert isinstance(loaded["config"], OrderedDict) and not isinstance(loaded["config"], CfgNode)
    assert loaded["config"]["TRAIN"]["OPTIMIZER"]["NAME"] == "adamw" and loaded["epoch"] == 9


def test_other_classes_are_still_refused(tmp_path: Path) -> None:
    torch.save({"model": {}, "config": argparse.Namespace(lr=1e-3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="refusing .*other.pth: .*GLOBAL argparse.Namespace"):
        load_checkpoint_file(tmp_path / "other.pth")


def test_release_optimiser_state_is_matched_by_name_whatever_the_saved_order(caplog) -> None:
    """The release's moments are listed by position in its own parameter order; a model that declares its
    layers in another order must still give each parameter its own moments."""
    model = tiny()
    order = list(model.state_dict())
    random.Random(0).shuffle(order)
    checkpoint, flat = release_checkpoint(model, order)
    config = config_with(TRAIN__EPOCHS=300, TRAIN__WARMUP_EPOCHS=20)
    state = make_state(config, model)
    with caplog.at_level(logging.INFO):
        point = restore_training(state, checkpoint, "release.pth", config, CPU, UPDATES_PER_EPOCH,
                                 logging.getLogger("resume"))
    assert (*point, state.global_step) == (10, 0, 81.2, 10 * UPDATES_PER_EPOCH)
    assert "does not fit" not in caplog.text
    parameters = dict(model.named_parameters())
    for position, name in enumerate(flat):
        moments = state.optimizer.state[parameters[name]]
        assert torch.equal(moments["exp_avg"], torch.full_like(parameters[name], float(position))), name
        assert moments["step"].item() == 7.0
    assert [group["lr"] for group in state.optimizer.param_groups] != [1e-5, 1e-5]  # the config's rates


def test_release_checkpoint_with_an_unfitting_optimiser_state_resumes_fresh(caplog) -> None:
    model = tiny()
    checkpoint, _ = release_checkpoint(model, list(model.state_dict()))
    checkpoint["optimizer"]["param_groups"] = checkpoint["optimizer"]["param_groups"][:1]  # another grouping
    state = make_state(config_with(), model)
    with caplog.at_level(logging.WARNING):
        point = restore_training(state, checkpoint, "release.pth", config_with(), CPU, UPDATES_PER_EPOCH,
                                 logging.getLogger("resume"))
    assert point.epoch == 10
    assert "release.pth: its optimiser state does not fit" in caplog.text and "fresh optimiser state" in caplog.text
    assert not state.optimizer.state
    other = make_state(config_with(TRAIN__OPTIMIZER__NAME="sgd"), tiny())
    with caplog.at_level(logging.WARNING):
        restore_training(other, release_checkpoint(tiny(), list(model.state_dict()))[0], "release.pth",
                         config_with(TRAIN__OPTIMIZER__NAME="sgd"), CPU, UPDATES_PER_EPOCH, logging.getLogger("r"))
    assert "it is adamw's, this run uses sgd" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# One choice for all ranks


def choose_worker(rank: int, world_size: int, init_file: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    logger = logging.Logger(f"rank{rank}")
    # Node-local output folders: rank 1 sees an older epoch (a stale view), rank 0 the newest.
    own = config_with(OUTPUT=os.path.join(root, f"node{rank}"))
    found = choose_resume(own, env, logger)
    result = {"path": str(found[0]), "epoch": found[1]["epoch"], "weights": found[1]["model"]}
    broken = config_with(MODEL__RESUME=os.path.join(root, f"node{rank}", "broken.pth"))
    try:
        choose_resume(broken, env, logger)
    except CheckpointError as e:
        result["error"] = str(e)
    torch.save(result, os.path.join(root, f"result{rank}.pt"))
    dist.destroy_process_group()


def test_rank0_chooses_and_reads_the_resume_checkpoint_for_every_rank(tmp_path: Path) -> None:
    for rank, epoch in ((0, 3), (1, 1)):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        save_checkpoint({"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}, folder / "latest.pth")
    (tmp_path / "node0" / "broken.pth").write_bytes(b"not a checkpoint")  # rank 1 has no such file at all
    mp.spawn(choose_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"result{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert results[0]["epoch"] == results[1]["epoch"] == 3
    assert results[0]["path"] == results[1]["path"] == str(tmp_path / "node0" / "latest.pth")
    assert torch.equal(results[1]["weights"]["w"], torch.full((2,), 3.0))
    assert results[0]["error"] == results[1]["error"] and "broken.pth" in results[0]["error"]
    assert "truncated or corrupt" in results[1]["error"]  # rank 0's reason, not rank 1's "does not exist"


def buffers_worker(rank: int, world_size: int, init_file: str, root: str) -> None:
    """Each rank's BatchNorm statistics (model and EMA) are its own inside an epoch: saved there, each rank must get
    its own back, or a resumed run averages other statistics at the epoch's end than the uninterrupted one."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    config = config_with(OUTPUT=root)
    state = make_state(config)
    state.ema = ModelEmaV3(state.model)
    for module, value in ((state.model, rank + 1.0), (state.ema.module, rank + 10.0)):
        for norm in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.fill_(value)
            norm.running_var.fill_(value)
    save_position(state, config, env, epoch=1, step=2, best_acc1=0.0, classes=["a", "b", "c"],
                  timeline=Timeline("run", None, next_seq=1), logger=logging.Logger(f"rank{rank}"))
    resumed = make_state(config)
    resumed.ema = ModelEmaV3(resumed.model)
    restore_training(resumed, read_checkpoint(os.path.join(root, "latest.pth"), env), "latest.pth", config, env,
                     UPDATES_PER_EPOCH, logging.Logger(f"rank{rank}"))
    torch.save({"model": resumed.model.state_dict(), "ema": resumed.ema.module.state_dict()},
               os.path.join(root, f"result{rank}.pt"))
    dist.destroy_process_group()


def test_each_rank_resumes_its_own_batchnorm_statistics_inside_an_epoch(tmp_path: Path) -> None:
    mp.spawn(buffers_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"result{rank}.pt", weights_only=True)
        for key, value in (("model", rank + 1.0), ("ema", rank + 10.0)):
            statistics = {name: t for name, t in result[key].items() if name.endswith(("running_mean", "running_var"))}
            assert statistics and all(torch.all(t == value) for t in statistics.values()), (rank, key)
