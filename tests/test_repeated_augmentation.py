"""Repeated augmentation (DATA.AUG_REPEATS): DeiT's sample order and epoch length, the copies of an image on other
ranks (or, where there are too few ranks, in other batches), augmentations of their own whatever the loader workers,
and a run of 2 gloo processes resumed inside an epoch that ends with the uninterrupted run's weights."""

import random
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from run_helpers import launch, run_dir, write_config, write_image_folder
from timm.data.distributed_sampler import RepeatAugSampler

from checkpoint import load_checkpoint_file
from config import ConfigError, load_config
from data import SampleKey, TrainSampler, build_loader
from data.samples import sample_seed

REPO = Path(__file__).resolve().parents[1]


def shares(num_samples: int, world_size: int, repeats: int, epoch: int, seed: int = 0) -> list[list[SampleKey]]:
    samplers = [TrainSampler(num_samples, rank, world_size, seed=seed, repeats=repeats) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


CASES = [(10, 1, 3), (10, 2, 3), (10, 3, 3), (10, 4, 3), (11, 4, 2), (300, 2, 3), (600, 4, 3), (600, 8, 3)]


@pytest.mark.parametrize(("num_samples", "world_size", "repeats"), CASES)
def test_the_epoch_holds_deits_samples_in_deits_length(num_samples: int, world_size: int, repeats: int) -> None:
    """timm's copy of DeiT's RASampler (seeded with the epoch alone, as SEED 0 seeds ours) gives each rank the same
    images; in the same order where every copy of an image has a rank of its own."""
    for epoch in (0, 5):
        for rank, share in enumerate(shares(num_samples, world_size, repeats, epoch)):
            # Below 256 images DeiT's rounding leaves no sample; timm 1.0.31 on, as ours, takes ceil(N / world)
            # there, which selected_round=0 asks of every timm version.
            deit = RepeatAugSampler(range(num_samples), num_replicas=world_size, rank=rank, num_repeats=repeats,
                                    selected_round=256 if num_samples >= 256 else 0)
            deit.set_epoch(epoch)
            expected = list(deit)
            length = num_samples // 256 * 256 // world_size if num_samples >= 256 else -(-num_samples // world_size)
            assert len(share) == len(expected) == length
            indices = [key.index for key in share]
            assert indices == expected if world_size >= repeats else sorted(indices) == sorted(expected)
            assert all(key.epoch == epoch for key in share)


@pytest.mark.parametrize(("num_samples", "world_size", "repeats"), CASES)
def test_the_copies_of_an_image_are_numbered_and_go_to_other_ranks(num_samples: int, world_size: int,
                                                                   repeats: int) -> None:
    every = [(key.index, key.repeat, rank) for rank, share in enumerate(shares(num_samples, world_size, repeats, 2))
             for key in share]
    assert len({(index, repeat) for index, repeat, _ in every}) == len(every)  # each copy once, with its own number
    assert {repeat for _, repeat, _ in every} == set(range(repeats))
    ranks_of: dict[int, list[int]] = {}
    for index, _, rank in every:
        ranks_of.setdefault(index, []).append(rank)
    for ranks in ranks_of.values():
        # As many ranks as copies, up to the world size; the rest spread evenly.
        assert len(set(ranks)) == min(len(ranks), world_size)
        assert max(Counter(ranks).values()) == -(-len(ranks) // world_size)


@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 4), (2, 4), (1, 8)])
def test_with_fewer_ranks_than_copies_the_copies_on_one_rank_go_to_other_batches(world_size: int,
                                                                                 batch_size: int) -> None:
    for share in shares(60, world_size, 3, epoch=1):
        batches = [share[start:start + batch_size] for start in range(0, len(share), batch_size)]
        assert all(len({key.index for key in batch}) == len(batch) for batch in batches)
        assert max(Counter(key.index for key in share).values()) == -(-3 // world_size)  # the copies are there


@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 1), (11, 2), (300, 4)])
def test_the_repeating_sampler_started_after_k_samples_yields_exactly_the_rest(num_samples: int,
                                                                                world_size: int) -> None:
    for rank in range(world_size):
        sampler = TrainSampler(num_samples, rank, world_size, seed=7, repeats=3)
        sampler.set_epoch(4)
        full = list(sampler)
        for start in range(len(full) + 1):
            sampler.set_epoch(4, start=start)
            assert list(sampler) == full[start:] and len(sampler) == len(full) - start
    with pytest.raises(ValueError, match="1 with fixed shards"):
        TrainSampler(num_samples, 0, world_size, fixed_shards=True, repeats=2)


def test_each_copy_is_augmented_its_own_way_and_the_first_as_without_repeats(tmp_path: Path) -> None:
    high, low = np.random.SeedSequence([3, 4, 5]).generate_state(2, dtype=np.uint32)
    assert sample_seed(3, 4, 5, 0) == sample_seed(3, 4, 5) == int(high) << 32 | int(low)  # as before repeats existed
    assert len({sample_seed(0, epoch, index, repeat) for epoch in range(5) for index in range(20)
                for repeat in range(3)}) == 300
    images = write_image_folder(tmp_path / "images", classes=3, train_per_class=2, val_per_class=1, size=48)
    dataset = build_loader(load_config(str(write_config(tmp_path / "c.yaml", images, tmp_path / "out")))).dataset_train
    copies = [dataset[SampleKey(2, 1, repeat)].image for repeat in range(3)]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    assert torch.equal(copies[0], dataset[SampleKey(2, 1)].image)
    assert torch.equal(copies[2], dataset[SampleKey(2, 1, 2)].image)


def epoch_batches(config_file: Path, epoch: int) -> list:
    """An epoch's training batches of rank 1 of 2, the main process re-seeded before each fetch (random erasing
    draws from it then), as the training step does."""
    loader = build_loader(load_config(str(config_file)), rank=1, world_size=2).loader_train
    loader.sampler.set_epoch(epoch)
    batches, iterator = [], iter(loader)
    for step in range(len(loader)):
        random.seed(step)
        torch.manual_seed(step)
        batches.append(next(iterator))
    return batches


def test_repeated_batches_are_the_same_with_0_and_2_loader_workers(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", classes=3, train_per_class=8, val_per_class=1, size=32)
    runs = []
    for workers in (0, 2):
        config = write_config(tmp_path / f"w{workers}.yaml", images, tmp_path / "out",
                              {"DATA": {"NUM_WORKERS": workers, "AUG_REPEATS": 3}})
        runs.append(epoch_batches(config, epoch=1))
    assert len(runs[0]) == len(runs[1]) == 3  # 24 images over 2 ranks, batches of 4
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.index, b.index) and torch.equal(a.target, b.target)


def test_repeats_are_refused_where_they_cannot_work(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="DATA.AUG_REPEATS must be positive"):
        load_config(str(config), ["DATA.AUG_REPEATS", "0"])
    with pytest.raises(ConfigError, match="DATA.CACHE_MODE part keeps each process on its own shard"):
        load_config(str(config), ["DATA.AUG_REPEATS", "3", "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", "part"])


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "caltech101"])
def test_the_transfer_configs_repeat_three_times(dataset: str) -> None:
    for config_file in sorted((REPO / "configs" / "finetune" / dataset).glob("*.yaml")):
        assert load_config(str(config_file)).DATA.AUG_REPEATS == 3, config_file
    assert load_config(str(REPO / "configs" / dataset / "strip_mlp_tiny.yaml")).DATA.AUG_REPEATS == 1


# Runs main.py; every rank asks itself to stop (SIGTERM) during the 8th optimiser update, in the middle of epoch 1.
STOPPED_RUN = textwrap.dedent("""
    import os, runpy, signal, sys
    sys.path.insert(0, os.getcwd())
    import engine

    real_update = engine._optimizer_update
    def signalled_update(state, settings, where):
        if state.global_step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(state, settings, where)
    engine._optimizer_update = signalled_update
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
""")


@pytest.mark.slow
def test_two_gloo_processes_resumed_inside_an_epoch_end_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """AUG_REPEATS 3 on 2 ranks (48 images: 24 a rank and 6 steps an epoch), with RandAugment, mixup, erasing, drop
    path, EMA and a distilling teacher, which the resumed run reads again from its file."""
    images = write_image_folder(tmp_path / "images", classes=3, train_per_class=16, val_per_class=2)
    torch.manual_seed(3)
    teacher = timm.create_model("test_vit", num_classes=3, img_size=32)
    torch.save({"model": teacher.state_dict(), "classes": ["class_0", "class_1", "class_2"]}, tmp_path / "teacher.pth")
    extra = {"DATA": {"AUG_REPEATS": 3}, "TRAIN": {"EPOCHS": 2, "EMA": {"ENABLE": True, "DECAY": 0.9}},
             "DISTILL": {"TYPE": "soft", "TEACHER": "test_vit", "TEACHER_CHECKPOINT": str(tmp_path / "teacher.pth"),
                         "TAU": 2.0}}
    straight = write_config(tmp_path / "straight.yaml", images, tmp_path / "straight", extra)
    result = launch(["--cfg", str(straight)], nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr

    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", extra)
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_RUN)
    launch(["--cfg", str(config)], nproc=2, script=script)
    out = run_dir(tmp_path / "out")
    saved = load_checkpoint_file(out / "latest.pth")
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (0, 3, 9)
    resumed = launch(["--cfg", str(config)], nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "3 steps into epoch 1, update 9" in resumed.stdout and "teacher test_vit from" in resumed.stdout
    expected = load_checkpoint_file(run_dir(tmp_path / "straight") / "ckpt_epoch_1.pth")
    found = load_checkpoint_file(out / "ckpt_epoch_1.pth")
    assert found["global_step"] == expected["global_step"] == 12
    for key in ("model", "model_ema"):
        assert found[key].keys() == expected[key].keys()
        assert all(torch.equal(expected[key][name], found[key][name]) for name in expected[key]), key
