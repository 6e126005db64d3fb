"""Checkpoint files: atomic writes, weights-only loading, auto-resume choice, pruning, fitting weights."""

import errno
import io
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import golden_architecture

import checkpoint
from checkpoint import (
    CheckpointError,
    Timeline,
    check_class_names,
    find_resume_checkpoint,
    fit_state_dict,
    load_checkpoint_file,
    load_pretrained,
    prune_checkpoints,
    save_checkpoint,
)
from config import OutdatedConfigWarning, load_config
from logger import create_logger
from models import StripMLPNet
from utils import rng_state, set_rng_state


class Evil:
    """Unpickling this runs a shell command; a safe loader must refuse it before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def logger() -> logging.Logger:
    return logging.Logger("test")


def tiny(num_classes: int = 3) -> StripMLPNet:
    return StripMLPNet(img_size=32, num_classes=num_classes, embed_dim=8, layers=(1, 1, 1, 1))


def test_save_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def crash_mid_write(obj, f) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint_file(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temporary file left behind


class FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes free: writes past it fail as the kernel fails them (ENOSPC)."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_gives_one_line_naming_the_file_and_keeps_earlier_checkpoints(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """torch's writer turns the disk's error into "RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos"; the user must read which file and why, and find no temporary file."""
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(checkpoint, "open", lambda name, mode: FullDisk(name, mode.replace("b", "")), raising=False)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, path)
    message = str(caught.value)
    assert message.startswith(f"cannot write checkpoint {path}: OSError: [Errno 28] No space left on device;")
    assert "\n" not in message and "enforce fail" not in message
    assert load_checkpoint_file(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_two_writers_of_one_checkpoint_never_share_a_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """A second writer saves the same file while the first is half-way through its write (two runs in one folder,
    or two processes of one): both saves succeed and the file loads."""
    path = tmp_path / "latest.pth"
    real_save = torch.save
    names = []

    def save_while_another_writes(obj, f) -> None:
        names.append(f.name)
        real_save(obj, f)
        if obj["writer"] == "first":
            save_checkpoint({"writer": "second", "w": torch.zeros(1000)}, path)

    monkeypatch.setattr(checkpoint.torch, "save", save_while_another_writes)
    save_checkpoint({"writer": "first", "w": torch.ones(1000)}, path)
    assert len(set(names)) == 2 and all(str(os.getpid()) in Path(name).name for name in names)
    assert load_checkpoint_file(path)["writer"] == "first"  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


@pytest.mark.parametrize("protocol", [None, 2, 5], ids=["torch.save", "raw-pickle-2", "raw-pickle-5"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path, protocol: int | None) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    payload = {"model": {"w": torch.ones(1)}, "extra": Evil(marker)}
    if protocol is None:
        torch.save(payload, path)
    else:  # the weights-only loader stops a protocol-5 pickle at its first opcode, before seeing what it names
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    assert str(info.value).startswith(f"refusing {path}: it holds objects other than tensors and plain containers (")
    assert "nothing in it was run" in str(info.value)
    if protocol == 5:  # what it names, read without running it, instead of "truncated or corrupt"
        assert "(a plain Python pickle naming torch._utils._rebuild_tensor_v2, " in str(info.value)
        assert f"{os.system.__module__}.system: code that loading it would run)" in str(info.value)
    assert not marker.exists()


def test_truncated_and_missing_files_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "ckpt_epoch_0.pth"
    save_checkpoint({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    path.write_bytes(pickle.dumps({"epoch": 3}))  # whole, but not torch.save's format
    with pytest.raises(CheckpointError, match="it is a plain Python pickle, not a file written by torch.save"):
        load_checkpoint_file(path)


def test_a_folder_given_as_checkpoint_is_named_with_the_file_to_give(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(tmp_path)
    assert str(info.value) == f"checkpoint {tmp_path} is a folder; give a checkpoint file to --resume/--pretrained, " \
                              "it holds no .pth files"
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "ckpt_epoch_0.pth")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "latest.pth")
    with pytest.raises(CheckpointError, match=f"is a folder; .*, e.g. {tmp_path / 'latest.pth'}$"):
        load_checkpoint_file(tmp_path)


def test_auto_resume_skips_a_truncated_newest_checkpoint(tmp_path: Path, caplog) -> None:
    logger = logging.getLogger("resume-test")
    for epoch in range(3):
        save_checkpoint({"epoch": epoch}, tmp_path / f"ckpt_epoch_{epoch}.pth")
    save_checkpoint({"epoch": 2}, tmp_path / "latest.pth")
    save_checkpoint({"epoch": 99}, tmp_path / "best.pth")  # never a resume candidate
    (tmp_path / "latest.pth.tmp").write_bytes(b"left by a killed write")  # ignored
    latest = tmp_path / "latest.pth"
    latest.write_bytes(latest.read_bytes()[:100])
    newest = tmp_path / "ckpt_epoch_2.pth"
    newest.write_bytes(newest.read_bytes()[:-10])
    os.utime(tmp_path / "ckpt_epoch_0.pth")  # file times play no part (a copied folder resumes the same way)
    with caplog.at_level(logging.WARNING, logger="resume-test"):
        path, checkpoint = find_resume_checkpoint(tmp_path, logger)
    assert path.name == "ckpt_epoch_1.pth" and checkpoint["epoch"] == 1
    assert "skips latest.pth" in caplog.text and "skips ckpt_epoch_2.pth" in caplog.text
    assert find_resume_checkpoint(tmp_path / "empty", logger) is None


def test_auto_resume_takes_an_epoch_file_written_after_latest(tmp_path: Path) -> None:
    logger = logging.Logger("resume-test")
    save_checkpoint({"epoch": 4}, tmp_path / "latest.pth")
    for epoch in (3, 4, 5):  # 5: killed after writing the epoch file, before latest.pth
        save_checkpoint({"epoch": epoch}, tmp_path / f"ckpt_epoch_{epoch}.pth")
    assert find_resume_checkpoint(tmp_path, logger)[0].name == "ckpt_epoch_5.pth"
    (tmp_path / "ckpt_epoch_5.pth").unlink()
    assert find_resume_checkpoint(tmp_path, logger)[0].name == "latest.pth"


def test_prune_keeps_the_newest_epochs(tmp_path: Path) -> None:
    timeline = Timeline("run", None, next_seq=1)
    for epoch in (0, 5, 10, 15):
        path = tmp_path / f"ckpt_epoch_{epoch}.pth"
        save_checkpoint(timeline.stamp(path, {"epoch": epoch}), path)
    save_checkpoint({}, tmp_path / "best.pth")
    assert prune_checkpoints(timeline, keep=0) == []
    removed = prune_checkpoints(timeline, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt_epoch_0.pth", "ckpt_epoch_5.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "ckpt_epoch_10.pth", "ckpt_epoch_15.pth"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    set_rng_state(load_checkpoint_file(tmp_path / "rng.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_release_checkpoint_loads_and_a_mismatched_one_is_refused(tmp_path: Path, golden: dict) -> None:
    model = StripMLPNet(**golden_architecture(golden)).eval()
    release = {"model": {f"module.{k}": v for k, v in golden["state_dict"].items()}}
    model.load_state_dict(fit_state_dict(release, model, "release.pth"))
    with torch.no_grad():
        logits = model(golden["input"])
    assert torch.allclose(logits, golden["logits"], atol=1e-4 * golden["logits"].abs().max().item())

    other = StripMLPNet(img_size=64, num_classes=7, embed_dim=48, layers=(1, 1, 2, 1))
    with pytest.raises(CheckpointError, match=r"release.pth: .*mismatches.*patch_embed.weight: checkpoint "
                                              r"\(40, 3, 4, 4\) vs model \(48, 3, 4, 4\)"):
        fit_state_dict(release, other, "release.pth")


def test_pretrained_with_another_class_count_keeps_a_fresh_head(tmp_path: Path, logger: logging.Logger) -> None:
    source = tiny(num_classes=5)
    save_checkpoint({"model": source.state_dict()}, tmp_path / "pre.pth")
    target = tiny(num_classes=3)
    fresh_head = target.head.weight.clone()
    assert load_pretrained(target, load_checkpoint_file(tmp_path / "pre.pth"), "pre.pth", logger) == [
        "head.bias", "head.weight"]
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.patch_embed.weight, source.patch_embed.weight)
    with pytest.raises(CheckpointError, match="missing|vs model"):
        load_pretrained(StripMLPNet(img_size=32, num_classes=3, embed_dim=16, layers=(1, 1, 1, 1)),
                        load_checkpoint_file(tmp_path / "pre.pth"), "pre.pth", logger)


def test_pretrained_at_another_size_and_class_count_is_resampled_and_logged(tmp_path: Path) -> None:
    save_checkpoint({"model": tiny(num_classes=5).state_dict()}, tmp_path / "pre.pth")
    target = StripMLPNet(img_size=(64, 96), num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))
    log = tmp_path / "log"
    logger = create_logger(log, 0, "test", console=io.StringIO(), errors=io.StringIO())
    assert load_pretrained(target, load_checkpoint_file(tmp_path / "pre.pth"), "pre.pth", logger) == [
        "head.bias", "head.weight"]
    text = (log / "log_rank0.txt").read_text()
    assert "pretrained checkpoint pre.pth: resampled blocks1.0.token_mixing.smlp_block.proj_h.weight " \
           "(8, 8, 1, 3) -> (24, 24, 1, 3)" in text
    assert text.count("resampled ") == 6 * 4 and "another class count" in text


def test_class_names_are_compared_in_order_and_skipped_for_release_checkpoints() -> None:
    saved = {"classes": ["ant", "bee", "cat"]}
    assert check_class_names(saved, ["ant", "bee", "cat"], "a.pth") == "a.pth: its 3 class names match the data's"
    assert check_class_names({"model": {}}, ["ant"], "release.pth") == (
        "release.pth carries no class names (the release's do not); their check against the data's is skipped")
    with pytest.raises(CheckpointError) as info:
        check_class_names(saved, ["bee", "ant", "cat", "dog"], "a.pth")
    assert str(info.value).startswith("a.pth was trained on other classes than the data holds (3 of 4 labels differ; "
                                      "label 0: 'ant' in the checkpoint, 'bee' in the data; label 1: 'bee' in the "
                                      "checkpoint, 'ant' in the data; label 3: None in the checkpoint, 'dog' in the "
                                      "data); give the data it was trained on")


def test_weights_of_another_size_are_resampled_except_for_a_resumed_run() -> None:
    weights = {"model": tiny().state_dict()}
    larger = StripMLPNet(img_size=64, num_classes=3, embed_dim=8, layers=(1, 1, 1, 1))
    larger.load_state_dict(fit_state_dict(weights, larger, "weights.pth"))
    with pytest.raises(CheckpointError, match=r"weights.pth: .*proj_h.weight: checkpoint \(8, 8, 1, 3\) vs model "
                                              r"\(16, 16, 1, 3\)"):
        fit_state_dict(weights, larger, "weights.pth", resample=False)


def test_the_saved_config_of_the_previous_version_reads_as_this_version_reads_it() -> None:
    """What resuming compares: ACCUMULATION_STEPS 0 (the previous version's no accumulation) is 1 and TEST.SEQUENTIAL
    is gone, so a checkpoint of that version resumes as saved by this one, with no schedule change to log."""
    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "strip_mlp_demo.yaml"))
    old = config.dump().replace("TEST:\n", "TEST:\n  SEQUENTIAL: false\n").replace("ACCUMULATION_STEPS: 1\n",
                                                                                  "ACCUMULATION_STEPS: 0\n")
    assert old.count("SEQUENTIAL") == 1 and old.count("ACCUMULATION_STEPS: 0\n") == 1
    with pytest.warns(OutdatedConfigWarning):
        saved = checkpoint.saved_config({"config": old})
    assert saved["TRAIN"]["ACCUMULATION_STEPS"] == 1 and "SEQUENTIAL" not in saved["TEST"]
    assert checkpoint.schedule_changes(saved, config) == []
