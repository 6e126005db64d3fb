"""Config loading: every shipped file, inheritance, overrides, shortcuts and one-line errors."""

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import config as config_module
from config import (
    CHOICES,
    LIMITS,
    ConfigError,
    OutdatedConfigWarning,
    build_parser,
    config_from_text,
    default_config,
    dump_config,
    get_config,
    load_config,
    parse_option,
)
from utils import image_size

REPO = Path(__file__).resolve().parents[1]
# Runnable configs; files under configs/base/ are only inherited.
CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                      if p.relative_to(REPO / "configs").parts[0] != "base")

# (embed dim, layers) of the four released variants.
VARIANTS = {
    "tiny_light": (80, [2, 2, 6, 2]),
    "tiny": (80, [2, 2, 12, 2]),
    "small": (96, [2, 2, 18, 2]),
    "base": (112, [2, 2, 18, 2]),
}
DATASETS = {"imagenet1k": ("imagenet", 1000), "cifar10": ("cifar10", 10), "cifar100": ("cifar100", 100),
            "caltech101": ("caltech101", 101)}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_sixteen_released_settings_and_a_demo() -> None:
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIG_FILES}
    expected = {f"{ds}/strip_mlp_{v}.yaml" for ds in DATASETS for v in VARIANTS}
    assert expected <= names
    assert any(name.startswith("demo/") for name in names)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_setting_has_release_values(variant: str, dataset: str) -> None:
    config = load_config(str(REPO / "configs" / dataset / f"strip_mlp_{variant}.yaml"))
    embed_dim, layers = VARIANTS[variant]
    assert config.MODEL.STRIP_MLP.EMBED_DIM == embed_dim
    assert config.MODEL.STRIP_MLP.LAYERS == layers
    assert config.MODEL.STRIP_MLP.ALPHA == 3 and config.MODEL.STRIP_MLP.PATCH_SIZE == 4
    assert (config.DATA.DATASET, config.MODEL.NUM_CLASSES) == DATASETS[dataset]
    assert config.MODEL.NAME == f"strip_mlp_{variant}_{dataset}"
    assert config.DATA.IMG_SIZE == 224 and config.DATA.BATCH_SIZE == 64
    assert config.TRAIN.BASE_LR == 5e-4 and config.TRAIN.EPOCHS == 300 and config.TRAIN.WARMUP_EPOCHS == 20
    assert config.TRAIN.LR_SCALING == "none"
    assert config.MODEL.DROP_PATH_RATE == 0.1 and config.MODEL.DROP_PATH_SCHEDULE == "uniform"
    assert config.AUG.MIXUP == 0.8 and config.AUG.CUTMIX == 1.0
    assert config.MODEL.DROP_RATE == 0.0  # the release stated 0.2 (0.0 for two Caltech settings) but never applied it
    assert config.is_frozen()


def test_base_inheritance_is_relative_and_later_files_win(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "a.yaml", "DATA:\n  BATCH_SIZE: 8\n  NUM_WORKERS: 1\n")
    _write(tmp_path / "b.yaml", "BASE: a.yaml\nDATA:\n  NUM_WORKERS: 2\n")
    leaf = _write(tmp_path / "sub" / "c.yaml", "BASE: ['../b.yaml']\nTRAIN:\n  BASE_LR: 1e-3\n")
    config = load_config(leaf)
    assert (config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, config.TRAIN.BASE_LR) == (8, 2, 1e-3)


def test_opts_then_shortcuts_override_the_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", "DATA:\n  BATCH_SIZE: 8\n")
    args = build_parser().parse_args([
        "--cfg", cfg, "--opts", "DATA.BATCH_SIZE", "16", "MODEL.STRIP_MLP.LAYERS", "[1, 1, 2, 1]",
        "TRAIN.WEIGHT_DECAY", "0", "AUG.CUTMIX_MINMAX", "[0.2, 0.8]", "TRAIN.EMA.ENABLE", "true",
        "--batch-size", "32", "--data-path", "/d", "--output", "/o", "--tag", "t", "--eval", "--amp",
        "--local_rank", "5",
    ])
    config = get_config(args)
    assert config.DATA.BATCH_SIZE == 32
    assert config.MODEL.STRIP_MLP.LAYERS == [1, 1, 2, 1]
    assert config.TRAIN.WEIGHT_DECAY == 0.0 and isinstance(config.TRAIN.WEIGHT_DECAY, float)
    assert config.AUG.CUTMIX_MINMAX == [0.2, 0.8]
    assert config.TRAIN.EMA.ENABLE is True
    assert config.DATA.DATA_PATH == "/d" and config.EVAL_MODE and config.AMP.ENABLE
    assert config.AMP.DTYPE == "bfloat16"
    assert config.OUTPUT == "/o/strip_mlp_tiny/t"


def test_release_apex_level_maps_to_float16_amp(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", "")
    on = get_config(build_parser().parse_args(["--cfg", cfg, "--amp-opt-level", "O1"]))
    off = get_config(build_parser().parse_args(["--cfg", cfg, "--amp-opt-level", "O0", "--local-rank", "0"]))
    assert (on.AMP.ENABLE, on.AMP.DTYPE) == (True, "float16")
    assert off.AMP.ENABLE is False


def test_defaults_are_untouched_and_dump_reloads(tmp_path: Path) -> None:
    config = load_config(str(REPO / "configs" / "cifar100" / "strip_mlp_small.yaml"))
    assert default_config().MODEL.STRIP_MLP.EMBED_DIM == 80
    dumped = tmp_path / "config.yaml"
    dump_config(config, str(dumped))
    again = load_config(str(dumped), ["OUTPUT", "output"])
    assert again == config


def test_img_size_is_a_side_or_height_and_width_and_round_trips(tmp_path: Path) -> None:
    """A side stays a side (as every saved config holds it), [H, W] becomes (H, W), and [S, S] becomes S; the
    dump reloads, from a file and from a checkpoint's text, to the same config."""
    pair = load_config(_write(tmp_path / "pair.yaml", "DATA:\n  IMG_SIZE: [64, 96]\n"))
    assert pair.DATA.IMG_SIZE == (64, 96) and image_size(pair.DATA.IMG_SIZE) == (64, 96)
    assert image_size(load_config(_write(tmp_path / "side.yaml", "")).DATA.IMG_SIZE) == (224, 224)
    # --opts as main.py gets it from a shell, and a later file giving a side after a base file's pair.
    assert load_config(str(tmp_path / "side.yaml"), ["DATA.IMG_SIZE", "[96, 64]"]).DATA.IMG_SIZE == (96, 64)
    assert load_config(str(tmp_path / "side.yaml"), ["DATA.IMG_SIZE", "(64, 64)"]).DATA.IMG_SIZE == 64
    leaf = _write(tmp_path / "leaf.yaml", "BASE: pair.yaml\nDATA:\n  IMG_SIZE: 32\n")
    assert load_config(leaf).DATA.IMG_SIZE == 32
    for config in (pair, load_config(str(tmp_path / "pair.yaml"), ["DATA.IMG_SIZE", "128"])):
        dumped = tmp_path / "config.yaml"
        dump_config(config, str(dumped))
        assert load_config(str(dumped), ["OUTPUT", "output"]) == config  # OUTPUT gains NAME/TAG again
        assert config_from_text(config.dump(), "checkpoint.pth") == config
    assert "IMG_SIZE: 128\n" in config.dump()  # a square size is saved as before


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[64, 96, 32]", "DATA.IMG_SIZE must be one side or [height, width], positive integers divisible by 32 (the "
                         "network's total stride), e.g. 224 or [192, 256], got [64, 96, 32]"),
        ("[64.0, 96]", "DATA.IMG_SIZE must be one side or [height, width]"),
        ("224.0", "DATA.IMG_SIZE must be one side or [height, width]"),
        ("[64]", "DATA.IMG_SIZE must be one side or [height, width]"),
        ("large", "DATA.IMG_SIZE must be one side or [height, width]"),
        ("True", "DATA.IMG_SIZE must be one side or [height, width]"),
        ("[64, 100]", "DATA.IMG_SIZE must be one side or [height, width], positive integers divisible by 32"),
        ("[100, 64]", "got [100, 64]"),
        ("[0, 64]", "positive integers divisible by 32 (the network's total stride), e.g. 224 or [192, 256], got "
                    "[0, 64]"),
        ("-64", "positive integers divisible by 32 (the network's total stride), e.g. 224 or [192, 256], got -64"),
    ],
)
def test_bad_img_size_is_one_line_naming_the_key(tmp_path: Path, value: str, message: str) -> None:
    cfg = _write(tmp_path / "c.yaml", "")
    for where in ("--opts", "c.yaml"):  # the same value from the command line and from a file
        with pytest.raises(ConfigError) as info:
            if where == "--opts":
                load_config(cfg, ["DATA.IMG_SIZE", value])
            else:
                load_config(_write(tmp_path / "c.yaml", f"DATA:\n  IMG_SIZE: {value}\n"))
        assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "opts", "message"),
    [
        ("DATA:\n  BATCH_SZE: 8\n", (), "unknown key DATA.BATCH_SZE; did you mean DATA.BATCH_SIZE?"),
        ("FOO: 1\n", (), "unknown key FOO"),
        ("DATA:\n  BATCH_SIZE: eight\n", (), "DATA.BATCH_SIZE expects type int"),
        ("DATA: 3\n", (), "DATA is a section"),
        ("DATA:\n  BATCH_SIZE: {A: 1}\n", (), "DATA.BATCH_SIZE is a single value"),
        ("MODEL:\n  STRIP_MLP:\n    LAYERS: [1, a]\n", (), "MODEL.STRIP_MLP.LAYERS[1] expects type int"),
        ("DATA:\n  DATASET: imagenet1k\n", (), "choose one of: imagenet, caltech101"),
        ("TRAIN:\n  OPTIMIZER:\n    NAME: lamb\n", (), "choose one of: adamw, sgd"),
        ("AMP:\n  DTYPE: fp8\n", (), "choose one of: bfloat16, float16"),
        ("MODEL:\n  TYPE: swin\n", (), "MODEL.TYPE 'swin' is not supported; choose one of: strip_mlp"),
        ("DATA:\n  IMG_SIZE: 100\n", (), "DATA.IMG_SIZE must be one side or [height, width], positive integers "
                                        "divisible by 32"),
        ("MODEL:\n  STRIP_MLP:\n    LAYERS: [1, 1, 1]\n", (), "MODEL.STRIP_MLP.LAYERS must be 4 stage depths of "
                                                            "at least one block each, e.g. [2, 2, 12, 2], got "
                                                            "[1, 1, 1]"),
        ("MODEL:\n  STRIP_MLP:\n    PATCH_SIZE: 2\n", (), "MODEL.STRIP_MLP.PATCH_SIZE must be 4 (the stem's patch; "
                                                        "with three 2x mergings the network downsamples by 32), got 2"),
        ("MODEL:\n  STRIP_MLP:\n    EMBED_DIM: 12\n", (), "MODEL.STRIP_MLP.EMBED_DIM must be a positive multiple of "
                                                        "8 (the strip mixing splits each stage's width into chunks), "
                                                        "got 12"),
        ("DATA: [1\n", (), "malformed YAML at line"),
        ("- 1\n- 2\n", (), "expected a mapping"),
        ("BASE: missing.yaml\n", (), "BASE file"),
        ("", ("TRAIN.EPOCHS",), "has no value"),
        ("", ("TRAIN.EPOCHS", "0"), "TRAIN.EPOCHS must be positive"),
        ("", ("AUG.CUTMIX_MINMAX", "0.5"), "AUG.CUTMIX_MINMAX must be None or [min, max]"),
        ("", ("DATA.BATCH_SIZE", "7"), "DATA.BATCH_SIZE 7 must be even while AUG.MIXUP or AUG.CUTMIX is on"),
        ("", ("MODEL.DROP_RATE", "1.5"), "MODEL.DROP_RATE must be in [0, 1), got 1.5"),
        ("", ("MODEL.DROP_PATH_RATE", "-0.1"), "MODEL.DROP_PATH_RATE must be in [0, 1), got -0.1"),
        ("", ("MODEL.STRIP_MLP.ALPHA", "0"), "MODEL.STRIP_MLP.ALPHA must be positive, got 0"),
        ("", ("MODEL.STRIP_MLP.IN_CHANS", "0"), "MODEL.STRIP_MLP.IN_CHANS must be 3 (the data loaders give RGB"),
    ],
)
def test_bad_config_raises_one_line_naming_file_and_key(tmp_path: Path, text: str, opts: tuple, message: str) -> None:
    cfg = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg, opts)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    # Checks across keys run once every file is merged, so they name keys, not a file.
    if not opts and not any(phrase in message for phrase in ("must be", "must give", "not supported", "cannot be")):
        assert "bad.yaml" in str(info.value)


def test_base_loop_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "BASE: b.yaml\n")
    _write(tmp_path / "b.yaml", "BASE: [c.yaml]\n")
    _write(tmp_path / "c.yaml", "BASE: a.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "a.yaml"))
    assert str(info.value) == (f"{tmp_path / 'c.yaml'}: BASE files include each other in a loop "
                               "(a.yaml -> b.yaml -> c.yaml -> a.yaml)")


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Spy on config's YAML reads: a file read twice fails at once (today's recursion would take hours)."""
    reads: dict[str, int] = {}
    real_read = config_module._read_yaml

    def spy(path: str) -> dict:
        reads[path] = reads.get(path, 0) + 1
        assert reads[path] == 1, f"{path} read twice"
        return real_read(path)

    monkeypatch.setattr(config_module, "_read_yaml", spy)
    return reads


def test_base_files_are_read_once_each_and_keep_their_first_place(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A diamond of 22 files, each naming the next one twice: 2^22 merges if each naming were followed.
    for i in range(22):
        bases = f"BASE: [d{i + 1}.yaml, d{i + 1}.yaml]\n" if i < 21 else ""
        _write(tmp_path / f"d{i}.yaml", bases + f"PRINT_FREQ: {i + 1}\n")
    # a.yaml names b and c, which both name d: d's values must not come back over b's.
    _write(tmp_path / "a.yaml", "BASE: [b.yaml, c.yaml]\n")
    _write(tmp_path / "b.yaml", "BASE: d0.yaml\nTRAIN:\n  EPOCHS: 7\n")
    _write(tmp_path / "c.yaml", "BASE: [d0.yaml]\nSAVE_FREQ: 3\n")
    reads = _count_reads(monkeypatch)
    start = time.perf_counter()
    config = load_config(str(tmp_path / "a.yaml"))
    assert time.perf_counter() - start < 5
    assert len(reads) == 25 and set(reads.values()) == {1}
    assert (config.PRINT_FREQ, config.TRAIN.EPOCHS, config.SAVE_FREQ) == (1, 7, 3)


def test_a_chain_of_a_thousand_base_files_merges_without_recursion(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(1000):
        bases = f"BASE: c{i + 1}.yaml\n" if i < 999 else "TRAIN:\n  EPOCHS: 7\n"
        _write(tmp_path / f"c{i}.yaml", bases + f"PRINT_FREQ: {i + 1}\n")
    reads = _count_reads(monkeypatch)
    config = load_config(str(tmp_path / "c0.yaml"))
    assert len(reads) == 1000 and (config.PRINT_FREQ, config.TRAIN.EPOCHS) == (1, 7)


# (other keys the case needs, the key, a bad value, what the error says is allowed). The first twenty are the
# values that were accepted silently or ended in a traceback; the rest extend to the other numeric keys.
BAD_VALUES = [
    ({}, "TRAIN.WEIGHT_DECAY", -0.5, "0 or more"),
    ({}, "TRAIN.WARMUP_LR", -1, "0 or more"),
    ({}, "AUG.REPROB", 2, "in [0, 1]"),
    ({}, "AUG.RECOUNT", 0, "positive"),
    ({}, "AUG.MIXUP", -1, "0 or more"),
    ({}, "AUG.MIXUP_PROB", 5, "in [0, 1]"),
    ({}, "AUG.COLOR_JITTER", -1, "0 or more"),
    ({}, "AUG.HFLIP", 7, "in [0, 1]"),
    ({"TRAIN.LR_SCHEDULER.NAME": "step"}, "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", 0, "positive"),
    ({"TRAIN.EMA.ENABLE": True}, "TRAIN.EMA.DECAY", -3, "in [0, 1]"),
    ({}, "SEED", -1, "in [0, 4294967295]"),
    ({}, "TRAIN.BASE_LR", -1, "positive"),
    ({}, "TRAIN.BASE_LR", math.nan, "positive"),
    ({}, "TRAIN.MIN_LR", -1, "0 or more"),
    ({}, "TRAIN.OPTIMIZER.EPS", -1, "positive"),
    ({"TRAIN.OPTIMIZER.NAME": "sgd"}, "TRAIN.OPTIMIZER.MOMENTUM", -1, "in [0, 1)"),
    ({}, "TRAIN.OPTIMIZER.BETAS", [0.9], "two values in [0, 1), e.g. [0.9, 0.999]"),
    ({}, "AUG.AUTO_AUGMENT", "bogus", "'none' or a timm policy such as rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, "
                                          "original, originalr, v0, v0r or 3a"),
    ({}, "MODEL.LABEL_SMOOTHING", 1.5, "in [0, 1)"),
    ({"DATA.DATASET": "folder"}, "MODEL.STRIP_MLP.IN_CHANS", 1, "3 (the data loaders give RGB images)"),
    ({}, "TRAIN.BASE_LR", math.inf, "positive"),
    ({}, "TRAIN.OPTIMIZER.BETAS", [0.9, 1.0], "two values in [0, 1), e.g. [0.9, 0.999]"),
    ({}, "TRAIN.CLIP_GRAD", -1, "0 or more"),
    ({}, "TRAIN.LR_SCHEDULER.DECAY_RATE", 0, "positive"),
    ({}, "AUG.CUTMIX", -0.5, "0 or more"),
    ({}, "AUG.MIXUP_SWITCH_PROB", 1.5, "in [0, 1]"),
    ({}, "MODEL.STRIP_MLP.EMBED_DIM", 0, "a positive multiple of 8 (the strip mixing splits each stage's width into "
                                         "chunks)"),
    ({}, "DATA.ZIP_MAX_MEMBER_MB", 0, "positive"),
    ({}, "DATA.NUM_WORKERS", -2, "0 or more"),
]


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


@pytest.mark.parametrize(("others", "key", "value", "allowed"), BAD_VALUES,
                         ids=[f"{key}={value}" for _, key, value, _ in BAD_VALUES])
def test_a_bad_value_stops_with_the_key_the_value_and_what_is_allowed(tmp_path: Path, others: dict, key: str,
                                                                      value: object, allowed: str) -> None:
    cfg = _write(tmp_path / "bad.yaml", yaml.safe_dump(_nested({**others, key: value})))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    shown = float(value) if isinstance(_default(key), float) else value  # as the config holds it
    assert message == f"{cfg}: {key} must be {allowed}, got {shown!r}"


def _default(key: str) -> object:
    node = default_config()
    for part in key.split("."):
        node = node[part]
    return node


def test_every_numeric_key_has_its_valid_values_declared() -> None:
    def leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
        return [leaf for name, value in node.items() for leaf in (
            leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [(f"{prefix}{name}", value)])]

    numeric = {key for key, value in leaves(default_config()) if isinstance(value, int | float | tuple | list)
               and not isinstance(value, bool)}
    assert numeric == set(LIMITS) - {"AUG.AUTO_AUGMENT"}  # AUG.CUTMIX_MINMAX (None) is checked once merged
    for key in LIMITS:  # every default is valid
        assert LIMITS[key].test(_default(key)), key
    for policy in ("none", "", "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original", "v0r", "3a"):
        assert LIMITS["AUG.AUTO_AUGMENT"].test(policy), policy


def test_command_line_error_is_one_line_with_exit_code_1(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "bad.yaml", "TRAIN:\n  EPOCHS: many\n")
    result = subprocess.run([sys.executable, str(REPO / "config.py"), "--cfg", cfg],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "TRAIN.EPOCHS" in result.stderr and "bad.yaml" in result.stderr and "Traceback" not in result.stderr
    directory = subprocess.run([sys.executable, str(REPO / "config.py"), "--cfg", str(tmp_path)],
                               capture_output=True, text=True, cwd=REPO)
    assert directory.returncode == 1 and "cannot read config file" in directory.stderr
    missing = subprocess.run([sys.executable, str(REPO / "config.py"), "--cfg", str(tmp_path / "none.yaml")],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 1 and "none.yaml not found" in missing.stderr


@pytest.mark.parametrize("cfg_file", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_builds_its_model(cfg_file: Path) -> None:
    from models import build_model

    config = load_config(str(cfg_file))
    model = build_model(config)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == config.MODEL.NUM_CLASSES
    if config.DATA.IMG_SIZE <= 32:  # small enough to run a forward pass cheaply
        out = model.eval()(torch.zeros(2, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE))
        assert out.shape == (2, config.MODEL.NUM_CLASSES)


def test_release_zip_and_cache_flags_set_the_data_keys(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", "")
    _, config = parse_option(["--cfg", cfg, "--zip", "--cache-mode", "part", "--local_rank", "0"])
    assert (config.DATA.ZIP_MODE, config.DATA.CACHE_MODE) == (True, "part")
    _, plain = parse_option(["--cfg", cfg])
    assert (plain.DATA.ZIP_MODE, plain.DATA.CACHE_MODE) == (False, "no")
    assert CHOICES["DATA.CACHE_MODE"] == ("no", "part", "full")
    with pytest.raises(ConfigError, match="DATA.CACHE_MODE full caches members of packed archives; it needs "
                                          r"DATA.ZIP_MODE True \(--zip\)"):
        parse_option(["--cfg", cfg, "--cache-mode", "full"])
    with pytest.raises(ConfigError, match="DATA.CACHE_MODE 'some' is not supported; choose one of: no, part, full"):
        parse_option(["--cfg", cfg, "--zip", "--opts", "DATA.CACHE_MODE", "some"])


def _previous_version_dump() -> str:
    """A full config as the previous version dumped it, in every output folder and checkpoint: with TEST.SEQUENTIAL,
    and TRAIN.ACCUMULATION_STEPS 0 for no accumulation."""
    text = default_config().dump()
    assert text.count("TEST:\n") == 1 and text.count("ACCUMULATION_STEPS: 1\n") == 1
    return text.replace("TEST:\n", "TEST:\n  SEQUENTIAL: false\n").replace("ACCUMULATION_STEPS: 1\n",
                                                                           "ACCUMULATION_STEPS: 0\n")


def test_a_config_of_the_previous_version_loads_with_a_warning_per_outdated_key(tmp_path: Path) -> None:
    old = _previous_version_dump()
    cfg = _write(tmp_path / "config.yaml", old)
    for source, load in ((cfg, lambda: load_config(cfg)), ("ckpt.pth", lambda: config_from_text(old, "ckpt.pth"))):
        with pytest.warns(OutdatedConfigWarning) as caught:
            config = load()
        outdated = {w.message.key: str(w.message) for w in caught if isinstance(w.message, OutdatedConfigWarning)}
        assert sorted(outdated) == ["TEST.SEQUENTIAL", "TRAIN.ACCUMULATION_STEPS"]
        assert all(message.startswith(f"{source}: ") for message in outdated.values())
        assert "TEST.SEQUENTIAL was removed" in outdated["TEST.SEQUENTIAL"]
        assert config.TRAIN.ACCUMULATION_STEPS == 1 and "SEQUENTIAL" not in config.TEST
    assert config == config_from_text(default_config().dump(), "ckpt.pth")


def test_the_command_line_may_not_set_a_removed_key(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", "")
    with pytest.raises(ConfigError, match=r"--opts: TEST.SEQUENTIAL was removed \(.*\); leave it out"):
        load_config(cfg, ["TEST.SEQUENTIAL", "True"])


def test_accumulation_steps_are_one_or_more(tmp_path: Path) -> None:
    """1 is no accumulation (the default); 0 no longer means the same, and the command line may not give it."""
    cfg = _write(tmp_path / "c.yaml", "")
    assert default_config().TRAIN.ACCUMULATION_STEPS == 1
    with pytest.raises(ConfigError) as info:
        load_config(cfg, ["TRAIN.ACCUMULATION_STEPS", "0"])
    assert str(info.value) == "--opts: TRAIN.ACCUMULATION_STEPS must be 1 or more, got 0"
    with pytest.raises(ConfigError) as info:
        parse_option(["--cfg", cfg, "--accumulation-steps", "0"])
    assert str(info.value) == "--accumulation-steps: TRAIN.ACCUMULATION_STEPS must be 1 or more, got 0"
    assert load_config(cfg, ["TRAIN.ACCUMULATION_STEPS", "2"]).TRAIN.ACCUMULATION_STEPS == 2
