"""Several processes on the CPU (gloo) give the numbers one process gives: training steps and evaluation."""

import datetime
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from run_helpers import launch, run_dir, sample_batch, write_config, write_image_folder
from timm.scheduler import CosineLRScheduler
from torch import nn

from agreement import NonFiniteLossError
from checkpoint import load_checkpoint_file
from data import Sample
from distill import DistillationLoss
from distributed import DistEnv
from engine import OptimizationState, StepSettings, train_one_epoch, validate

LOGGER = logging.Logger("distributed-test")


def step_settings(env: DistEnv) -> StepSettings:
    return StepSettings(env=env, amp_enabled=False, amp_dtype=torch.bfloat16, channels_last=False,
                        accumulation_steps=2, clip_grad=0.05, print_freq=10, epochs=1)


def make_state(model: nn.Module) -> OptimizationState:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return OptimizationState(model=model, optimizer=optimizer,
                      scheduler=CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False),
                      scaler=torch.amp.GradScaler("cpu", enabled=False),
                      criterion=DistillationLoss(nn.CrossEntropyLoss()))


def problem() -> tuple[nn.Module, list, list]:
    """A BatchNorm-free model (a batch gradient is then exactly the mean of its halves), 5 training batches of
    4 and 7 validation images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4))
    train = [sample_batch(torch.randn(4, 3, 2, 2), torch.randint(0, 4, (4,))) for _ in range(5)]
    val = [sample_batch(torch.randn(7, 3, 2, 2), torch.randint(0, 4, (7,)))]
    return model, train, val


def shard(batch: Sample, rank: int) -> Sample:
    """Every other image of a batch, starting at ``rank``."""
    return sample_batch(batch.image[rank::2], batch.target[rank::2])


def ddp_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, train, val = problem()
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    state = make_state(nn.parallel.DistributedDataParallel(model))
    # Each rank gets every other image of each batch; validation shards are uneven (4 and 3 images).
    train_stats = train_one_epoch(state, [shard(batch, rank) for batch in train], 0, step_settings(env), LOGGER)
    val_stats = validate(state.model, [shard(batch, rank) for batch in val], step_settings(env), LOGGER)
    if rank == 0:
        torch.save({"model": model.state_dict(), "train": train_stats, "val": val_stats}, result_file)
    del state  # DDP's reducer before its group: freed after it, torch's gloo teardown can deadlock on the GIL
    dist.destroy_process_group()


def test_two_ddp_processes_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result.pt")), nprocs=2)
    result = torch.load(tmp_path / "result.pt", weights_only=True)

    model, train, val = problem()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = make_state(model)
    train_stats = train_one_epoch(state, train, 0, step_settings(env), LOGGER)
    val_stats = validate(model, val, step_settings(env), LOGGER)
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(result["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert result["train"]["train_loss"] == pytest.approx(train_stats["train_loss"], rel=1e-6)
    # Counts are exact; the loss sums float32 logits of weights equal to rounding.
    assert {k: result["val"][k] for k in ("acc1", "acc5", "images")} == {k: val_stats[k] for k in ("acc1", "acc5",
                                                                                                   "images")}
    assert result["val"]["loss"] == pytest.approx(val_stats["loss"], rel=1e-6)


def nan_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    """Rank 1's third batch has a NaN loss; rank 0's are all finite."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    model, train, _ = problem()
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    state = make_state(nn.parallel.DistributedDataParallel(model))
    batches = [shard(batch, rank) for batch in train]
    if rank == 1:
        batches[2].image[0, 0, 0, 0] = math.nan
    try:
        train_one_epoch(state, batches, 3, step_settings(env), LOGGER)
        outcome = "finished"
    except NonFiniteLossError as e:
        outcome = str(e)
    except RuntimeError as e:  # a collective that timed out waiting for the failed rank
        outcome = f"{type(e).__name__}: {e}"
    torch.save({"outcome": outcome, "global_step": state.global_step}, f"{result_file}.{rank}")
    del state  # DDP's reducer before its group (see ddp_worker)
    dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank_together_with_the_same_message(tmp_path: Path) -> None:
    mp.spawn(nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2)
    results = [torch.load(tmp_path / f"result.{rank}", weights_only=True) for rank in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["outcome"].startswith("loss is nan at epoch 3 step 3/5 (optimiser update 1) on rank 1;")
    assert results[0]["global_step"] == 1  # the update of steps 2-3 never happened on either rank


def summary(output: str) -> str:
    return re.findall(r" \* Acc@1 [\d.]+ Acc@5 [\d.]+", output)[-1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_evaluate_like_one(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", classes=3, train_per_class=8, val_per_class=5)  # 15 val images
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 1}})
    trained = launch(["--cfg", str(config)], nproc=2)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    out = run_dir(tmp_path / "out")
    assert (out / "log_rank0.txt").exists() and (out / "log_rank1.txt").exists()
    assert "Train: [0/1][0/3]" in (out / "log_rank1.txt").read_text()  # every rank logs to its own file
    assert trained.stdout.count("Train: [0/1][0/3]") == 1  # only rank 0 prints
    checkpoint = load_checkpoint_file(out / "ckpt_epoch_0.pth")
    assert checkpoint["world_size"] == 2 and checkpoint["global_step"] == 3  # 24 images / (2 x 4) per update

    args = ["--cfg", str(config), "--eval", "--resume", str(out / "ckpt_epoch_0.pth")]
    sharded = launch([*args, "--tag", "eval2"], nproc=2)
    single = launch([*args, "--tag", "eval1"])
    assert sharded.returncode == 0 and single.returncode == 0, sharded.stderr + single.stderr
    assert summary(sharded.stdout) == summary(single.stdout)
    assert sharded.stdout.count(" * Acc@1") == 1
    assert "over 15 images" in (out.parent / "eval2" / "eval" / "log_rank1.txt").read_text()
