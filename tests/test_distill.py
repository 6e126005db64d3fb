"""Knowledge distillation: DeiT's losses on fixed tensors, the teacher's conditions in the step (eval mode, no
gradients, the mixed batch, the step's autocast), building and loading teachers, refusals, and a run that keeps the
teacher out of its checkpoints."""

import logging
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from run_helpers import run_dir, sample_batch, write_config, write_image_folder
from timm.scheduler import CosineLRScheduler
from torch import nn

import main
from checkpoint import load_checkpoint_file
from config import ConfigError, load_config
from distill import (
    DistillationLoss,
    DistillError,
    build_teacher,
    check_teacher_file,
    hard_distillation_loss,
    soft_distillation_loss,
)
from distributed import DistEnv
from engine import OptimizationState, StepSettings, train_one_epoch
from models import StripMLPNet

LOGGER = logging.Logger("distill-test")
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CLASSES = ["class_0", "class_1", "class_2"]

# Fixed logits of 2 images over 3 classes.
STUDENT = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
TEACHER = torch.tensor([[1.0, 0.0, 3.0], [-0.5, 2.5, 0.0]])


class Fixed(nn.Module):
    """A teacher that answers every batch with the same logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_the_soft_loss_is_deits_kl_written_out(tau: float) -> None:
    student, teacher = F.softmax(STUDENT / tau, dim=1), F.softmax(TEACHER / tau, dim=1)
    kl_sum = (teacher * (teacher.log() - student.log())).sum()
    expected = kl_sum * tau * tau / STUDENT.numel()  # summed, times tau^2, over batch x classes
    torch.testing.assert_close(soft_distillation_loss(STUDENT, TEACHER, tau), expected)


def test_the_hard_loss_is_cross_entropy_against_the_teachers_top_class() -> None:
    top = [2, 1]  # TEACHER's largest logits
    expected = -(F.log_softmax(STUDENT, dim=1)[[0, 1], top]).mean()
    torch.testing.assert_close(hard_distillation_loss(STUDENT, TEACHER), expected)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_the_loss_mixes_label_and_teacher_losses_by_alpha(kind: str) -> None:
    targets = torch.tensor([0, 2])
    label = F.cross_entropy(STUDENT, targets)
    teacher = soft_distillation_loss(STUDENT, TEACHER, 2.0) if kind == "soft" else hard_distillation_loss(STUDENT,
                                                                                                          TEACHER)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), Fixed(TEACHER), kind, alpha=0.3, tau=2.0)
    torch.testing.assert_close(criterion(torch.zeros(2, 3, 4, 4), STUDENT, targets), label * 0.7 + teacher * 0.3)
    assert torch.equal(DistillationLoss(nn.CrossEntropyLoss())(torch.zeros(2), STUDENT, targets), label)
    with pytest.raises(ValueError, match="soft and hard need a teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), None, kind)
    with pytest.raises(ValueError, match="soft and hard need a teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), Fixed(TEACHER), "medium")


def test_a_teacher_identical_to_the_student_gives_zero_soft_loss() -> None:
    torch.manual_seed(0)
    model = StripMLPNet(img_size=32, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1)).eval()
    images = torch.randn(4, 3, 32, 32)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), model, "soft", alpha=1.0, tau=2.0)
    assert criterion(images, model(images), torch.tensor([0, 1, 2, 0])).item() == 0.0


class Recording(nn.Module):
    """A linear classifier over flattened 2 x 2 images that records how each call was made."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 4)
        self.calls: list[dict] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls.append({"inputs": inputs.clone(), "training": self.training, "grad": torch.is_grad_enabled(),
                           "autocast": torch.is_autocast_enabled("cpu")})
        return self.linear(inputs.flatten(1))


def test_the_teacher_sees_the_mixed_batch_in_eval_mode_without_gradients_under_the_steps_autocast() -> None:
    torch.manual_seed(0)
    student, teacher = Recording(), Recording().eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.01)
    state = OptimizationState(model=student, optimizer=optimizer, scheduler=CosineLRScheduler(optimizer, t_initial=10),
                              scaler=torch.amp.GradScaler("cpu", enabled=False),
                              criterion=DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=0.5, tau=1.0))
    settings = StepSettings(env=CPU, amp_enabled=True, amp_dtype=torch.bfloat16, channels_last=False,
                            accumulation_steps=1, clip_grad=0.0, print_freq=10, epochs=1)
    batches = [sample_batch(torch.randn(4, 3, 2, 2), torch.randint(0, 4, (4,))) for _ in range(3)]

    def mix(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.flip(0) * 0.5 + images * 0.5, targets

    train_one_epoch(state, batches, 0, settings, LOGGER, mixup_fn=mix)
    assert len(teacher.calls) == len(student.calls) == 3
    for seen_by_teacher, seen_by_student, batch in zip(teacher.calls, student.calls, batches, strict=True):
        assert torch.equal(seen_by_teacher["inputs"], seen_by_student["inputs"])
        assert torch.equal(seen_by_teacher["inputs"], mix(batch.image, batch.target)[0])
        assert seen_by_teacher["autocast"] and seen_by_student["autocast"]
        assert not seen_by_teacher["training"] and not seen_by_teacher["grad"]
        assert seen_by_student["training"] and seen_by_student["grad"]
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert state.criterion.take_teacher_seconds() > 0 and state.criterion.take_teacher_seconds() == 0


# ---------------------------------------------------------------------------------------------------------------
# Building and loading teachers


def tiny_strip(num_classes: int = 3, embed_dim: int = 8) -> StripMLPNet:
    torch.manual_seed(1)
    return StripMLPNet(img_size=32, num_classes=num_classes, embed_dim=embed_dim, layers=(1, 1, 1, 1)).eval()


TINY = {"embed_dim": 8, "layers": (1, 1, 1, 1)}


@pytest.fixture
def tiny_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm builds strip_mlp_tiny with the tiny test width and depth (embed 8, one block per stage)."""
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **TINY}))


def teacher_of(name: str, checkpoint: dict, classes: list[str] = CLASSES) -> nn.Module:
    return build_teacher(name, checkpoint, "teacher.pth", 3, 32, classes, torch.device("cpu"), LOGGER)


@pytest.mark.parametrize("layout", ["plain", "ours", "release"])
def test_our_model_teaches_with_its_weights_in_any_layout(layout: str, tiny_variants: None) -> None:
    source = tiny_strip()
    weights = source.state_dict()
    checkpoint = {"plain": weights, "ours": {"model": weights, "classes": CLASSES, "epoch": 3},
                  "release": {"model": {f"module.{k}": v for k, v in weights.items()}}}[layout]
    teacher = teacher_of("strip_mlp_tiny", checkpoint)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(images), source(images))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_any_timm_model_teaches_at_the_students_input_size() -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=3, img_size=32).eval()  # takes one input size only
    teacher = teacher_of("test_vit", source.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(images), source(images))


def test_unfitting_teachers_are_refused(tiny_variants: None) -> None:
    with pytest.raises(DistillError, match="'no_such_model' is not a model timm can build"):
        teacher_of("no_such_model", {})
    with pytest.raises(DistillError, match="holds a 10-class classifier, the student has MODEL.NUM_CLASSES 3"):
        teacher_of("strip_mlp_tiny", tiny_strip(num_classes=10).state_dict())
    with pytest.raises(DistillError, match="other classes than the data holds \\(label 1: 'class_1' in the teacher"):
        teacher_of("strip_mlp_tiny", {"model": tiny_strip().state_dict(), "classes": ["class_0", "class_1", "x"]},
                   classes=["class_0", "x", "class_1"])
    with pytest.raises(DistillError, match="does not fit DISTILL.TEACHER strip_mlp_tiny: .*mismatches"):
        teacher_of("strip_mlp_tiny", tiny_strip(embed_dim=16).state_dict())


def test_a_missing_teacher_file_and_incomplete_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DistillError, match=f"DISTILL.TEACHER_CHECKPOINT {tmp_path / 'x.pth'} not found"):
        check_teacher_file(str(tmp_path / "x.pth"))
    images = tmp_path / "images"
    for opts, problem in ((["DISTILL.TYPE", "soft"], "needs DISTILL.TEACHER"),
                          (["DISTILL.TYPE", "medium"], "not supported; choose one of: none, soft, hard"),
                          (["DISTILL.ALPHA", "1.5"], "DISTILL.ALPHA must be in \\[0, 1\\]"),
                          (["DISTILL.TAU", "0"], "DISTILL.TAU must be positive")):
        with pytest.raises(ConfigError, match=problem):
            load_config(str(write_config(tmp_path / "c.yaml", images, tmp_path / "out")), opts)


def test_a_run_with_a_missing_teacher_file_stops_with_one_line(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "config.yaml", tmp_path / "images", tmp_path / "out", {
        "DISTILL": {"TYPE": "soft", "TEACHER": "strip_mlp_tiny", "TEACHER_CHECKPOINT": str(tmp_path / "gone.pth")}})
    assert main.main(["--cfg", str(config)]) == 1  # before the data (there is none) is read
    assert f"DISTILL.TEACHER_CHECKPOINT {tmp_path / 'gone.pth'} not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# A run


def tensor_names(tree: object, prefix: str = "") -> set[str]:
    """The dotted names of every tensor held anywhere in nested dicts and lists."""
    if isinstance(tree, dict):
        return {name for key, value in tree.items() for name in tensor_names(value, f"{prefix}{key}.")}
    if isinstance(tree, (list, tuple)):
        return {name for i, value in enumerate(tree) for name in tensor_names(value, f"{prefix}{i}.")}
    return {prefix.rstrip(".")} if isinstance(tree, torch.Tensor) else set()


def test_a_distilled_run_logs_the_teachers_share_and_never_saves_the_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("test_vit", num_classes=3, img_size=32)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")  # a plain state dict
    images = write_image_folder(tmp_path / "images", train_per_class=4, val_per_class=1)
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {
        "TRAIN": {"EPOCHS": 1}, "DISTILL": {"TYPE": "hard", "TEACHER": "test_vit",
                                             "TEACHER_CHECKPOINT": str(tmp_path / "teacher.pth")}})
    assert main.main(["--cfg", str(config)]) == 0
    out = run_dir(tmp_path / "out")
    assert re.search(r"teacher \d+% of step time", (out / "log_rank0.txt").read_text())
    checkpoint = load_checkpoint_file(out / "latest.pth")
    student = StripMLPNet(img_size=32, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))
    assert set(checkpoint["model"]) == set(student.state_dict())
    teacher_only = set(teacher.state_dict()) - set(student.state_dict())  # cls_token, blocks.0.attn.qkv.weight, ...
    saved = tensor_names(checkpoint)
    assert not any(name == own or name.endswith(f".{own}") for name in saved for own in teacher_only)
