"""ImageNet's robustness test sets (V2, A, R, Sketch, ReaL) and the evaluation settings (TEST.CROP_PCT, TEST.FLIP):
labels from folder names, A and R scored over their 200 classes, ReaL's multi-label top-1, sharding exactness and
the eval/ reports for each kind, on small generated folders."""

import csv
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from run_helpers import write_config
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torch import nn
from torchvision import transforms
from yacs.config import CfgNode

import main
from config import ConfigError, load_config
from data import DataError, Scoring, build_dataset, build_loader, build_scoring, build_transform
from data.datasets import read_image
from data.robustness import imagenet_wnids, real_label_sets, subset_columns
from distributed import DistEnv
from engine import StepSettings, eval_logits, validate
from models import StripMLPNet
from reports import ClassTally

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOGGER = logging.Logger("robustness-test")
WNIDS = imagenet_wnids()


def colour_of(label: int) -> tuple[int, int, int]:
    """A solid colour that encodes an ImageNet-1k class index; steps of 8 survive JPEG's rounding and resizing."""
    return (label // 32 * 8 + 4, label % 32 * 8 + 4, 128)


def write_images(folder: Path, labels: list[int], names: list[str] | None = None) -> None:
    """One JPEG per label, its colour encoding the label (the class an Oracle predicts for it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, label in enumerate(labels):
        name = names[number] if names else f"{number}.JPEG"
        Image.new("RGB", (40, 36), colour_of(label)).save(folder / name, format="JPEG", quality=95)


class Oracle(nn.Module):
    """1000 logits that put first the class each image's colour encodes, the others in index order below it (no
    ties, so top-5 is defined); ``distractor``, a class outside the scored subset, gets a larger logit still."""

    def __init__(self, distractor: int | None = None) -> None:
        super().__init__()
        self.distractor = distractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        pixels = ((images * std + mean) * 255).mean(dim=(2, 3))  # (B, 3)
        labels = (pixels[:, 0] // 8 * 32 + pixels[:, 1] // 8).long()  # (B,)
        logits = (-torch.arange(1000.0) / 1000).repeat(len(images), 1)  # (B, 1000)
        logits[torch.arange(len(images)), labels] = 2.0
        if self.distractor is not None:
            logits[:, self.distractor] = 3.0
        return logits


def subset_wnid(kind: str, position: int) -> str:
    return WNIDS[subset_columns(kind)[position]]


# ImageNet-A's and -R's classes at these positions of their 200; ImageNet-1k class 3 (tiger shark) is in neither.
SUBSET_POSITIONS = (0, 1, 57, 199)
OUTSIDE_BOTH = 3
# ReaL's labels of the first five validation images: [], [970, 795], [230, 231], [809], [516, 850]. Each image sits
# in the folder of its first label (the first in class 0's) and encodes the class the Oracle predicts.
REAL_PREDICTED = {1: 3, 2: 795, 3: 231, 4: 808, 5: 516}


def write_test_set(root: Path, kind: str) -> Path:
    """A few images of ``kind`` laid out as its download is, under ``root``; returns DATA.DATA_PATH."""
    if kind == "imagenet_v2":  # folders sorted as text: 0, 10, 100, 2, 999
        for label, count in ((0, 1), (2, 2), (10, 1), (100, 2), (999, 1)):
            write_images(root / str(label), [label] * count)
    elif kind in ("imagenet_a", "imagenet_r"):
        for position in SUBSET_POSITIONS:
            write_images(root / subset_wnid(kind, position), [subset_columns(kind)[position]] * 2)
    elif kind == "imagenet_sketch":
        for label in (0, 500, 999):
            write_images(root / WNIDS[label], [label] * 2)
    else:
        labels = real_label_sets()
        for number, predicted in REAL_PREDICTED.items():
            folder = root / "val" / WNIDS[(labels[number - 1] or [0])[0]]
            write_images(folder, [predicted], [f"ILSVRC2012_val_{number:08d}.JPEG"])
    return root


def write_eval_config(path: Path, data: Path, kind: str) -> Path:
    """A tiny 1000-class model's config file for evaluating ``kind`` at 32 px."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_config(path, data, path.parent / "out", {"DATA": {"DATASET": kind, "BATCH_SIZE": 4},
                                                          "MODEL": {"NUM_CLASSES": 1000}})


def eval_config(data: Path, output: Path, kind: str, *opts: str) -> CfgNode:
    return load_config(str(write_eval_config(output / "config.yaml", data, kind)), ["EVAL_MODE", "True", *opts])


def evaluate(config: CfgNode, model: nn.Module, scoring: Scoring | None = None, env: DistEnv = CPU
             ) -> tuple[dict, ClassTally]:
    """validate's metrics and per-class tally of ``model``, this rank evaluating its shard."""
    loaders = build_loader(config, env.rank, env.world_size, train=False)
    tally = ClassTally(len(loaders.dataset_val.classes), torch.device("cpu"))
    scoring = build_scoring(loaders.dataset_val, "cpu") if scoring is None else scoring
    metrics = validate(model, loaders.loader_val, StepSettings.from_config(config, env), LOGGER, tally=tally,
                       scoring=scoring)  # sums the tally over ranks too
    return metrics, tally


def test_class_lists_are_timms() -> None:
    assert WNIDS == ImageNetInfo().label_names() and WNIDS == sorted(WNIDS) and len(WNIDS) == 1000
    for kind in ("imagenet_a", "imagenet_r"):
        columns = subset_columns(kind)
        assert len(columns) == len(set(columns)) == 200 and columns == sorted(columns) and OUTSIDE_BOTH not in columns
    assert len(real_label_sets()) == 50_000


def test_imagenet_v2_folders_are_class_indices_sorted_as_numbers(tmp_path: Path) -> None:
    config = eval_config(write_test_set(tmp_path / "v2", "imagenet_v2"), tmp_path / "out", "imagenet_v2")
    dataset = build_dataset(False, config)
    assert dataset.classes == WNIDS
    assert [(Path(path).parent.name, target) for path, target in dataset.base.samples] == [
        ("0", 0), ("2", 2), ("2", 2), ("10", 10), ("100", 100), ("100", 100), ("999", 999)]
    metrics, tally = evaluate(config, Oracle())
    assert (metrics["acc1"], metrics["images"], metrics["unlabelled_images"]) == (100.0, 7, 0)
    assert tally.images()[[0, 2, 10, 100, 999]].tolist() == [1, 2, 1, 2, 1]


@pytest.mark.parametrize("kind", ["imagenet_a", "imagenet_r"])
def test_a_and_r_are_scored_over_the_logits_of_their_200_classes(tmp_path: Path, kind: str) -> None:
    config = eval_config(write_test_set(tmp_path / kind, kind), tmp_path / "out", kind)
    dataset = build_dataset(False, config)
    assert dataset.classes == [WNIDS[index] for index in subset_columns(kind)]
    assert sorted(set(dataset.base.targets)) == list(SUBSET_POSITIONS)
    metrics, tally = evaluate(config, Oracle(distractor=OUTSIDE_BOTH))  # it would win over all 1000 outputs
    assert (metrics["acc1"], metrics["acc5"], metrics["images"]) == (100.0, 100.0, 8)
    assert tally.confusion.shape == (200, 200)
    assert tally.confusion.diagonal()[list(SUBSET_POSITIONS)].tolist() == [2] * 4
    assert evaluate(config, Oracle(distractor=OUTSIDE_BOTH), Scoring())[0]["acc1"] == 0.0  # scored over all 1000


def test_sketch_reads_1000_wnid_folders(tmp_path: Path) -> None:
    config = eval_config(write_test_set(tmp_path / "sketch", "imagenet_sketch"), tmp_path / "out", "imagenet_sketch")
    metrics, tally = evaluate(config, Oracle())
    assert (metrics["acc1"], metrics["images"]) == (100.0, 6)
    assert tally.images()[[0, 500, 999]].tolist() == [2, 2, 2]


def test_real_counts_a_top1_among_the_labels_and_leaves_out_images_without_one(tmp_path: Path) -> None:
    config = eval_config(write_test_set(tmp_path / "imagenet", "imagenet_real"), tmp_path / "out", "imagenet_real")
    labels = real_label_sets()
    assert labels[:5] == [[], [970, 795], [230, 231], [809], [516, 850]]
    metrics, tally = evaluate(config, Oracle())
    # Image 1 has no label; 2, 3 and 5 predict one of their labels (2's is not its folder's); 4 predicts none.
    assert (metrics["images"], metrics["unlabelled_images"]) == (4, 1)
    assert metrics["acc1"] == 75.0
    # Top-5 after the prediction: classes 0, 1, 2, 3 (the Oracle's order), none of image 4's label 809.
    assert metrics["acc5"] == 75.0
    # Reports: rows are the folder's class; top-1 is ReaL's.
    assert tally.images().sum() == 4 and tally.top1_hits.sum() == 3
    assert tally.top1_hits[970] == 1 and tally.confusion[970, 795] == 1 and tally.top1_hits[809] == 0


def test_real_needs_the_official_file_names(tmp_path: Path) -> None:
    data = write_test_set(tmp_path / "imagenet", "imagenet_real")
    write_images(data / "val" / WNIDS[5], [5], ["photo.JPEG"])
    with pytest.raises(DataError, match="photo.JPEG is not one of ImageNet's validation images"):
        build_dataset(False, eval_config(data, tmp_path / "out", "imagenet_real"))


@pytest.mark.parametrize(("kind", "folder"), [("imagenet_a", "n01440764"), ("imagenet_v2", "n01440764"),
                                              ("imagenet_v2", "1000"), ("imagenet_sketch", "07")])
def test_folders_that_name_no_class_of_the_set_are_refused(tmp_path: Path, kind: str, folder: str) -> None:
    data = write_test_set(tmp_path / kind, kind)
    write_images(data / folder, [0])
    with pytest.raises(DataError, match=f"folders that name none of its classes \\({folder}\\)"):
        build_dataset(False, eval_config(data, tmp_path / "out", kind))


def test_training_on_a_test_set_is_refused_before_any_work(tmp_path: Path) -> None:
    config = load_config(str(write_config(tmp_path / "config.yaml", write_test_set(tmp_path / "a", "imagenet_a"),
                                          tmp_path / "out", {"DATA": {"DATASET": "imagenet_a"},
                                                             "MODEL": {"NUM_CLASSES": 1000}})))
    with pytest.raises(DataError, match="^DATA.DATASET imagenet_a is a test set without training images;"):
        main.check_request(config, CPU)
    with pytest.raises(DataError, match="is a test set"):
        build_dataset(True, config)
    assert main.main(["--cfg", str(tmp_path / "config.yaml")]) == 1
    assert not (tmp_path / "out" / "tiny" / "run" / "config.yaml").exists()


def test_a_test_set_needs_an_imagenet_classifier(tmp_path: Path) -> None:
    config = eval_config(write_test_set(tmp_path / "a", "imagenet_a"), tmp_path / "out", "imagenet_a",
                         "MODEL.NUM_CLASSES", "200")
    with pytest.raises(DataError, match="MODEL.NUM_CLASSES is 200; evaluate a model with 1000 outputs"):
        build_loader(config, train=False)


def test_crop_pct_sets_the_share_of_the_resized_image_kept(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy()).save(path)
    bicubic = transforms.InterpolationMode.BICUBIC
    for crop_pct, resized in ((0.875, 73), (0.5, 128), (1.0, 64)):  # floor(64 / crop_pct)
        config = eval_config(tmp_path, tmp_path / "out", "folder", "DATA.IMG_SIZE", "64", "TEST.CROP_PCT",
                             str(crop_pct))
        expected = transforms.Compose([transforms.Resize(resized, interpolation=bicubic), transforms.CenterCrop(64),
                                       transforms.PILToTensor()])
        assert torch.equal(build_transform(False, config)(read_image(str(path))),
                           expected(Image.open(path).convert("RGB"))), crop_pct
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=r"TEST.CROP_PCT must be in \(0, 1\]"):
            eval_config(tmp_path, tmp_path / "out", "folder", "TEST.CROP_PCT", bad)


def test_flip_averages_the_logits_of_each_image_and_its_mirror(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    images = torch.randn(2, 3, 4, 4)
    flipped = StepSettings.from_config(eval_config(tmp_path, tmp_path / "out", "folder", "TEST.FLIP", "True"), CPU)
    plain = StepSettings.from_config(eval_config(tmp_path, tmp_path / "out", "folder"), CPU)
    assert flipped.test_flip and not plain.test_flip
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        torch.testing.assert_close(eval_logits(model, images, flipped), expected)
        assert not torch.allclose(eval_logits(model, images, plain), expected)


KINDS = ("imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_real")


def write_all_sets(root: Path) -> Path:
    """Each kind's data and config file, and the weights of a tiny 1000-class model, under ``root``."""
    for kind in KINDS:
        write_eval_config(root / f"{kind}.yaml", write_test_set(root / kind, kind), kind)
    torch.manual_seed(0)
    model = StripMLPNet(img_size=32, num_classes=1000, embed_dim=8, layers=(1, 1, 1, 1))
    torch.save({"model": model.state_dict()}, root / "weights.pth")
    return root


class Lines(logging.Handler):
    """Keeps the messages logged."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def evaluate_kinds(root: Path, output: Path, env: DistEnv) -> dict[str, tuple]:
    """For each kind: the metric lines that ``--eval`` (main.evaluate_only) of the tiny model with TEST.FLIP logs
    (its reports go to ``output``), and the Oracle's metrics and per-class counts (which, unlike the untrained
    model's, are not all zero)."""
    results = {}
    for kind in KINDS:
        config = load_config(str(root / f"{kind}.yaml"), ["EVAL_MODE", "True", "OUTPUT", str(output / kind),
                                                          "MODEL.PRETRAINED", str(root / "weights.pth"),
                                                          "TEST.FLIP", "True"])
        logger = logging.Logger(kind)
        lines = Lines()
        logger.addHandler(lines)
        assert main.evaluate_only(config, env, logger) == 0
        logged = [line for line in lines.messages if line.startswith((" * ", "validation loss", kind))]
        metrics, tally = evaluate(config, Oracle(OUTSIDE_BOTH if kind in ("imagenet_a", "imagenet_r") else None),
                                  env=env)
        results[kind] = (logged, metrics, tally.confusion, tally.top1_hits, tally.top5_hits)
    return results


def sharded_worker(rank: int, root: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    results = evaluate_kinds(Path(root), Path(root) / "two", env)
    if rank == 0:
        torch.save(results, Path(root) / "two.pt")
    dist.destroy_process_group()


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_two_processes_evaluate_each_kind_as_one_and_write_its_reports(tmp_path: Path) -> None:
    root = write_all_sets(tmp_path)
    mp.spawn(sharded_worker, args=(str(root), str(tmp_path / "init")), nprocs=2)
    torch.set_num_threads(1)
    single = evaluate_kinds(root, root / "one", CPU)
    sharded = torch.load(root / "two.pt")
    for kind in KINDS:
        lines, metrics, *counts = single[kind]
        sharded_lines, sharded_metrics, *sharded_counts = sharded[kind]
        # Counts are exact; the loss sums float32 logits that batches of other sizes may round otherwise.
        assert [line for line in sharded_lines if not line.startswith("validation loss")] == [
            line for line in lines if not line.startswith("validation loss")]
        assert sharded_metrics == pytest.approx(metrics, rel=1e-6) and 0 < metrics["acc1"]
        for count, sharded_count in zip(counts, sharded_counts, strict=True):
            assert torch.equal(count, sharded_count), kind
        assert lines[0].startswith(f"{kind}: ") and any(line.startswith(" * Acc@1") for line in lines), lines
        one, two = root / "one" / kind / "tiny" / "run" / "eval", root / "two" / kind / "tiny" / "run" / "eval"
        for name in ("per_class.csv", "confusion_matrix.csv"):
            assert (two / name).read_bytes() == (one / name).read_bytes(), (kind, name)
        rows_one, rows_two = read_csv(one / "predictions.csv"), read_csv(two / "predictions.csv")
        assert [row[0::2] for row in rows_two] == [row[0::2] for row in rows_one]  # path, classes
        per_class = read_csv(one / "per_class.csv")[1:]
        scored = [WNIDS[index] for index in subset_columns(kind)] if kind in ("imagenet_a", "imagenet_r") else WNIDS
        assert [row[0] for row in per_class] == scored
        assert sum(int(row[1]) for row in per_class) == len(rows_one) - 1
    assert "4 of its 200 class folders, scored over the logits of its 200 classes" in single["imagenet_a"][0][0]
    real_lines, real_metrics, *_ = single["imagenet_real"]
    assert "1 images without a label are left out" in real_lines[0]
    assert any(line.endswith("over 4 images (1 images without a label left out)") for line in real_lines)
    assert (real_metrics["acc1"], real_metrics["unlabelled_images"]) == (75.0, 1)
