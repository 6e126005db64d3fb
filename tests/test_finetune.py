"""Fine-tuning controls: layer-wise learning-rate decay, freezing (with BatchNorm statistics kept), the fine-tuning
configs, and their errors."""

import copy
import logging
import re
from pathlib import Path

import conftest
import pytest
import torch
import torch.distributed as dist
from run_helpers import REPO, launch, load_weights, run_dir, sample_batch, write_config, write_image_folder
from yacs.config import CfgNode

import main
from checkpoint import load_checkpoint_file
from config import CHOICES, FREEZE_MODES, ConfigError, default_config, load_config
from distill import DistillationLoss
from distributed import DistEnv
from engine import OptimizationState, StepSettings, average_bn_statistics, train_one_epoch
from finetune import freeze, frozen_norms, layer_groups, layer_scales
from lr_scheduler import build_scheduler, effective_learning_rates, scheduled_lr
from models import StripMLPNet
from optimizer import build_optimizer, is_decayed

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOGGER = logging.getLogger("finetune-test")

# Fine groups of tiny_model(): stem, blocks1.0, blocks2.0, blocks3.0, blocks3.1, blocks4.0, head.
FINE_LABELS = ["stem", "blocks1.0", "blocks2.0", "blocks3.0", "blocks3.1", "blocks4.0", "head"]


def tiny_model(**kwargs) -> StripMLPNet:
    torch.manual_seed(0)
    return conftest.tiny_model(**kwargs)


def config_with(*opts) -> CfgNode:
    config = default_config()
    config.merge_from_list(["TRAIN.LR_SCALING", "none", "TRAIN.EPOCHS", 4, "TRAIN.WARMUP_EPOCHS", 1, *opts])
    return config


def modules_of(names: list[str]) -> set[str]:
    """'blocks3.1.token_mixing...' -> 'blocks3', 'merging2.weight' -> 'merging2'."""
    return {name.split(".")[0] for name in names}


def group_of(model: StripMLPNet) -> dict[str, int]:
    """Each parameter's fine layer group, in forward order."""
    return {name: i for i, (_, names) in enumerate(layer_groups(model)) for name in names}


# ---------------------------------------------------------------------------------------------- layer-wise decay


def test_layer_decay_scales_each_group_by_its_depth() -> None:
    model = tiny_model()
    optimizer = build_optimizer(config_with("TRAIN.LAYER_DECAY", 0.8), model, lr=1e-3)
    assert [label for label, _ in layer_groups(model)] == FINE_LABELS
    depth = group_of(model)
    held = []
    for group in optimizer.param_groups:
        assert [model.get_parameter(name) for name in group["param_names"]] == group["params"]
        depths = {depth[name] for name in group["param_names"]}
        assert len(depths) == 1, group["param_names"]  # one layer group per optimiser group
        assert group["lr_scale"] == 0.8 ** (len(FINE_LABELS) - 1 - depths.pop())
        held += group["param_names"]
    assert sorted(held) == sorted(name for name, _ in model.named_parameters())  # each exactly once
    scale = {name: group["lr_scale"] for group in optimizer.param_groups for name in group["param_names"]}
    assert scale["patch_embed.weight"] == min(scale.values()) == 0.8 ** 6
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert scale["merging1.weight"] == scale["blocks2.0.channel_mixing.fc2.weight"] == 0.8 ** 4
    assert scale["blocks3.0.channel_mixing.fc2.weight"] == 0.8 ** 3
    assert scale["blocks3.1.channel_mixing.fc2.weight"] == 0.8 ** 2
    assert layer_scales(model, optimizer) == [(label, 0.8 ** (6 - i)) for i, label in enumerate(FINE_LABELS)]


def test_layer_decay_keeps_the_weight_decay_rule() -> None:
    model = tiny_model()
    optimizer = build_optimizer(config_with("TRAIN.LAYER_DECAY", 0.8, "TRAIN.WEIGHT_DECAY", 0.05), model, lr=1e-3)
    skip = model.no_weight_decay_keywords()
    decay = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            decay[name] = group["weight_decay"]
            assert group["weight_decay"] == (0.05 if is_decayed(name, model.get_parameter(name), skip) else 0.0), name
    tables = [name for name in decay if "embeddings_table" in name]
    assert tables and all(decay[name] == 0.0 and model.get_parameter(name).ndim == 2 for name in tables)
    assert decay["head.weight"] == 0.05 and decay["head.bias"] == 0.0 and decay["patch_embed.weight"] == 0.05


def test_layer_decay_off_keeps_two_groups_without_scales() -> None:
    optimizer = build_optimizer(config_with(), tiny_model(), lr=1e-3)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    assert not any("lr_scale" in group for group in optimizer.param_groups)


def test_the_schedule_applies_each_groups_scale() -> None:
    """Every update's rate of a group is the plain schedule's rate times the group's scale, in warm-up and decay."""
    config = config_with("TRAIN.BASE_LR", 1e-3, "TRAIN.WARMUP_LR", 1e-6, "TRAIN.MIN_LR", 1e-5)
    decayed = config.clone()
    decayed.merge_from_list(["TRAIN.LAYER_DECAY", 0.5])
    lrs = effective_learning_rates(config, 1)
    plain_optimizer = build_optimizer(config, tiny_model(), lrs.base)
    optimizer = build_optimizer(decayed, tiny_model(), lrs.base)
    plain = build_scheduler(config, plain_optimizer, 5, lrs)
    scheduler = build_scheduler(decayed, optimizer, 5, lrs)
    seen = set()
    for update in (0, 1, 3, 5, 9, 14, 19):
        plain.step_update(update)
        scheduler.step_update(update)
        rate = plain_optimizer.param_groups[0]["lr"]
        seen.add(rate)
        assert scheduled_lr(optimizer) == rate
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(rate * group["lr_scale"], rel=1e-12)
    assert len(seen) == 7 and {group["lr_scale"] for group in optimizer.param_groups} >= {0.5 ** 6, 1.0}


def test_an_epoch_logs_the_unscaled_rate() -> None:
    torch.manual_seed(0)
    model = StripMLPNet(img_size=32, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))
    config = config_with("TRAIN.LAYER_DECAY", 0.8)
    lrs = effective_learning_rates(config, 1)
    optimizer = build_optimizer(config, model, lrs.base)
    state = OptimizationState(model=model, optimizer=optimizer, scheduler=build_scheduler(config, optimizer, 2, lrs),
                       scaler=torch.amp.GradScaler("cpu", enabled=False),
                       criterion=DistillationLoss(torch.nn.CrossEntropyLoss()))
    settings = StepSettings(env=CPU, amp_enabled=False, amp_dtype=torch.bfloat16, channels_last=False,
                            accumulation_steps=1, clip_grad=0.0, print_freq=1, epochs=4)
    batches = [sample_batch(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(2)]
    stats = train_one_epoch(state, batches, 0, settings, LOGGER)
    head = next(group for group in optimizer.param_groups if "head.weight" in group["param_names"])
    assert stats["lr"] == head["lr"] and head["lr_scale"] == 1.0
    assert optimizer.param_groups[0]["lr"] < stats["lr"]  # the first group, the stem's, trains slower


# ---------------------------------------------------------------------------------------------- freezing

# Top-level modules each mode freezes in tiny_model(); the merging and skip layers go with the stage they feed.
FROZEN_MODULES = {
    "": set(),
    "stage1": {"patch_embed", "blocks1"},
    "stage2": {"patch_embed", "blocks1", "merging1", "blocks2"},
    "stage3": {"patch_embed", "blocks1", "merging1", "blocks2", "merging2", "conv_s1_28", "blocks3"},
    "stage4": {"patch_embed", "blocks1", "merging1", "blocks2", "merging2", "conv_s1_28", "blocks3", "merging3",
               "conv_s1_14", "conv_s2_14", "blocks4"},
    "backbone": {"patch_embed", "blocks1", "merging1", "blocks2", "merging2", "conv_s1_28", "blocks3", "merging3",
                 "conv_s1_14", "conv_s2_14", "blocks4", "norm"},
}


def test_freeze_modes_are_the_config_choices() -> None:
    assert CHOICES["TRAIN.FREEZE"] is FREEZE_MODES and set(FROZEN_MODULES) == set(FREEZE_MODES)


@pytest.mark.parametrize("layer_decay", [1.0, 0.8])
@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_freeze_leaves_only_the_rest_to_the_optimiser(mode: str, layer_decay: float) -> None:
    model = tiny_model()
    frozen = freeze(model, mode)
    assert modules_of(frozen) == FROZEN_MODULES[mode]
    assert all(not model.get_parameter(name).requires_grad for name in frozen)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable + frozen) == sorted(name for name, _ in model.named_parameters())
    assert "head.weight" in trainable and not modules_of(trainable) & FROZEN_MODULES[mode]
    optimizer = build_optimizer(config_with("TRAIN.LAYER_DECAY", layer_decay), model, lr=1e-3)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(model.get_parameter(name)) for name in trainable)
    assert {name for group in optimizer.param_groups for name in group["param_names"]} == set(trainable)
    norms = {name for name, _ in frozen_norms(model)}
    assert norms == {name for name, m in model.named_modules()
                     if isinstance(m, torch.nn.BatchNorm2d) and name.split(".")[0] in FROZEN_MODULES[mode]}
    if layer_decay < 1:  # frozen groups drop out; the others keep their scales
        labels = [label for label, _ in layer_scales(model, optimizer)]
        assert labels[-1] == "head" and ("stem" in labels) == (mode == "")


def pretrained_file(path: Path) -> Path:
    """Weights of write_config's tiny model, with BatchNorm statistics of their own (not the fresh 0 and 1)."""
    torch.manual_seed(3)
    model = StripMLPNet(img_size=32, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
    torch.save({"model": model.state_dict()}, path)
    return path


FREEZE_RUN = {"TRAIN": {"FREEZE": "stage2", "LAYER_DECAY": 0.8, "EPOCHS": 2, "EMA": {"ENABLE": True, "DECAY": 0.9}}}
FROZEN_PREFIXES = ("patch_embed.", "blocks1.", "merging1.", "blocks2.")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def frozen_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(output folder, pretrained file) of two epochs from pretrained weights with stages 1-2 frozen and layer
    decay, through main.py."""
    root = tmp_path_factory.mktemp("frozen")
    pretrained = pretrained_file(root / "pretrained.pth")
    config = write_config(root / "config.yaml", images, root / "out", FREEZE_RUN)
    assert main.main(["--cfg", str(config), "--pretrained", str(pretrained)]) == 0
    return run_dir(root / "out"), pretrained


def test_a_frozen_part_is_bit_identical_after_training(frozen_run: tuple[Path, Path]) -> None:
    """Weights, BatchNorm running statistics and counts of the frozen stages, in the model and its EMA, are the
    pretrained ones after two epochs (each epoch calls model.train() again); the rest trained."""
    out, pretrained = frozen_run
    before = load_weights(pretrained)
    checkpoint = load_checkpoint_file(out / "latest.pth")
    assert checkpoint["epoch"] == 1
    for weights in (checkpoint["model"], checkpoint["model_ema"]):
        assert weights.keys() == before.keys()
        frozen = [name for name in before if name.startswith(FROZEN_PREFIXES)]
        assert any(name.endswith("running_var") for name in frozen)
        for name in frozen:
            assert torch.equal(weights[name], before[name]), name
        for name in ("merging2.weight", "blocks3.0.token_mixing.dwsc.conv_merge.BN.running_mean", "head.weight"):
            assert not torch.equal(weights[name], before[name]), name
    tracked = "blocks3.0.token_mixing.dwsc.conv_merge.BN.num_batches_tracked"
    assert checkpoint["model"][tracked] == 7 + 12  # two epochs of six steps, in training mode
    log = (out / "log_rank0.txt").read_text()
    assert re.search(r"TRAIN\.FREEZE stage2: [\d,]+ parameters frozen \(patch_embed, blocks1, merging1, blocks2\), "
                     r"[\d,]+ trainable; 6 frozen BatchNorm layers stay in eval mode", log)
    assert "layer decay 0.8: learning-rate scales blocks3.0 0.640, blocks4.0 0.800, head 1.000" in log


def test_resume_with_layer_decay_and_freezing_equals_the_straight_run(frozen_run: tuple[Path, Path], images: Path,
                                                                      tmp_path: Path, caplog) -> None:
    out, pretrained = frozen_run
    saved = load_checkpoint_file(out / "ckpt_epoch_0.pth")["optimizer"]["param_groups"]
    assert len(saved) > 2 and all("param_names" in group and "lr_scale" in group for group in saved)
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", FREEZE_RUN)
    with caplog.at_level(logging.WARNING):
        assert main.main(["--cfg", str(config), "--pretrained", str(pretrained),
                          "--resume", str(out / "ckpt_epoch_0.pth")]) == 0
    assert "does not fit" not in caplog.text
    resumed = load_checkpoint_file(run_dir(tmp_path / "out") / "latest.pth")
    straight = load_checkpoint_file(out / "latest.pth")
    for name, weight in straight["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name
    assert straight["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][key]), (index, key)
    assert [(g["lr"], g["lr_scale"]) for g in resumed["optimizer"]["param_groups"]] == [
        (g["lr"], g["lr_scale"]) for g in straight["optimizer"]["param_groups"]]


def average_worker(tmp_path: Path) -> tuple[StripMLPNet, StripMLPNet]:
    model = StripMLPNet(img_size=32, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(3.0)
    freeze(model, "stage1")
    before = copy.deepcopy(model)
    state = OptimizationState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), criterion=torch.nn.CrossEntropyLoss())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        # One process standing for three: the sum over "ranks" is its own value, so an average divides it by 3.
        average_bn_statistics(state, False, DistEnv(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")))
    finally:
        dist.destroy_process_group()
    return before, model


def test_averaging_statistics_across_ranks_leaves_frozen_norms_alone(tmp_path: Path) -> None:
    before, after = average_worker(tmp_path)
    frozen = {name for name, _ in frozen_norms(after)}
    assert frozen and all(name.startswith(("patch_embed", "blocks1.")) for name in frozen)
    for name, module in after.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            expected = 3.0 if name in frozen else 1.0
            assert torch.equal(module.running_mean, torch.full_like(module.running_mean, expected)), name


@pytest.mark.slow
def test_freezing_under_two_ddp_processes(images: Path, tmp_path: Path) -> None:
    pretrained = pretrained_file(tmp_path / "pretrained.pth")
    extra = {"TRAIN": {"FREEZE": "stage2", "LAYER_DECAY": 0.8, "EPOCHS": 1}}
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", extra)
    result = launch(["--cfg", str(config), "--pretrained", str(pretrained)], nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    before = load_weights(pretrained)
    after = load_weights(run_dir(tmp_path / "out") / "latest.pth")
    assert all(torch.equal(after[name], before[name]) for name in before if name.startswith(FROZEN_PREFIXES))
    assert not torch.equal(after["head.weight"], before["head.weight"])


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("opts", "message"), [
    (("TRAIN.LAYER_DECAY", "0"), "TRAIN.LAYER_DECAY must be in (0, 1], got 0.0"),
    (("TRAIN.LAYER_DECAY", "1.2"), "TRAIN.LAYER_DECAY must be in (0, 1], got 1.2"),
    (("TRAIN.LAYER_DECAY", "-0.5"), "TRAIN.LAYER_DECAY must be in (0, 1], got -0.5"),
    (("TRAIN.FREEZE", "stage5"),
     "TRAIN.FREEZE 'stage5' is not supported; choose one of: '', backbone, stage1, stage2, stage3, stage4"),
])
def test_bad_fine_tuning_keys_are_one_line_errors(tmp_path: Path, opts: tuple, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg), opts)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_valid_fine_tuning_keys_load(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("TRAIN:\n  LAYER_DECAY: 1\n  FREEZE: stage3\n")
    config = load_config(str(cfg))
    assert (config.TRAIN.LAYER_DECAY, config.TRAIN.FREEZE) == (1.0, "stage3")
    assert (default_config().TRAIN.LAYER_DECAY, default_config().TRAIN.FREEZE) == (1.0, "")


VARIANTS = ("tiny_light", "tiny", "small", "base")
TRANSFER = {"cifar10": ("cifar10", 10), "cifar100": ("cifar100", 100), "caltech101": ("caltech101", 101)}
FINETUNE_FILES = sorted((REPO / "configs" / "finetune").rglob("*.yaml"))


def test_every_variant_has_its_fine_tuning_configs() -> None:
    names = {str(path.relative_to(REPO / "configs" / "finetune")) for path in FINETUNE_FILES}
    assert names == {f"{folder}/strip_mlp_{v}.yaml" for folder in ("imagenet1k_384", *TRANSFER) for v in VARIANTS}


@pytest.mark.parametrize("path", FINETUNE_FILES, ids=lambda p: str(p.relative_to(REPO / "configs" / "finetune")))
def test_fine_tuning_config_values(path: Path) -> None:
    config = load_config(str(path))
    folder, variant = path.parent.name, path.stem.removeprefix("strip_mlp_")
    released = load_config(str(REPO / "configs" / "imagenet1k" / path.name))
    assert config.MODEL.STRIP_MLP == released.MODEL.STRIP_MLP  # the variant the weights come from
    assert config.MODEL.DROP_PATH_RATE == released.MODEL.DROP_PATH_RATE
    assert config.MODEL.PRETRAINED == f"pretrained/strip_mlp_{variant}_224.pth"
    assert config.TRAIN.LR_SCALING == "linear" and config.TRAIN.LR_REFERENCE_BATCH == 512
    assert (config.TRAIN.LAYER_DECAY, config.TRAIN.FREEZE) == (1.0, "")
    train = config.TRAIN
    if folder == "imagenet1k_384":
        assert (config.DATA.DATASET, config.MODEL.NUM_CLASSES, config.DATA.IMG_SIZE) == ("imagenet", 1000, 384)
        assert (train.EPOCHS, train.WARMUP_EPOCHS, train.WEIGHT_DECAY) == (30, 5, 1e-8)
        assert (train.BASE_LR, train.WARMUP_LR, train.MIN_LR) == (2e-5, 2e-8, 2e-7)
        assert config.TEST.CROP is False
        assert config.MODEL.NAME == f"strip_mlp_{variant}_imagenet1k_384"
    else:
        assert (config.DATA.DATASET, config.MODEL.NUM_CLASSES) == TRANSFER[folder] and config.DATA.IMG_SIZE == 224
        assert (train.EPOCHS, train.WARMUP_EPOCHS, train.WEIGHT_DECAY) == (1000, 5, 0.05)
        assert (train.BASE_LR, train.WARMUP_LR, train.MIN_LR) == (5e-6, 1e-6, 5e-8)
        assert config.TEST.CROP is True
        assert config.MODEL.NAME == f"strip_mlp_{variant}_{folder}_finetune"
    # 64 per process on 8 processes: the stated rates times 512 / 512.
    assert effective_learning_rates(config, 8).base == train.BASE_LR


def test_missing_pretrained_weights_stop_at_once_naming_the_file_and_the_flag(images: Path, tmp_path: Path,
                                                                             capsys) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out",
                          {"MODEL": {"PRETRAINED": "pretrained/none_224.pth"}})
    assert main.main(["--cfg", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert "MODEL.PRETRAINED pretrained/none_224.pth not found" in err and "--pretrained FILE" in err
    assert "\n" not in err and not (run_dir(tmp_path / "out") / "latest.pth").exists()
    assert main.main(["--cfg", str(config), "--eval"]) == 1  # evaluation would read them too
    assert "MODEL.PRETRAINED pretrained/none_224.pth not found" in capsys.readouterr().err
