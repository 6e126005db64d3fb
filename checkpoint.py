"""Checkpoints: what a run saves, how it is written and read, which file a run resumes from, how a saved run
is restored, and how weights from elsewhere fit a model.

Files hold only tensors and plain containers (the config as YAML text, RNG states as tensors and lists), so
they load with ``torch.load(weights_only=True)``: a file from elsewhere can never run code. The release's
own checkpoints also carry its yacs config object; it is read as nested plain mappings, and nothing else
is admitted. Files are written to a temporary name and renamed, so a crash mid-write leaves the previous
file intact. Only rank 0 reads checkpoint files; every other rank receives rank 0's copy, so all ranks
resume the same epoch with the same weights whatever their view of the file system.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import pickletools
import re
import secrets
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import yaml
from safetensors import SafetensorError
from torch import nn
from yacs.config import CfgNode

from config import upgrade_saved
from distributed import DistEnv, gather_to_rank0, on_rank0
from models import checkpoint_filter_fn, clean_state_dict
from models.published import WEIGHTS_FILE, load_weights
from optimizer import is_decayed
from utils import RunError, rng_state, set_rng_state, unwrap_model

if TYPE_CHECKING:
    from engine import OptimizationState

CHECKPOINT_PATTERN = re.compile(r"ckpt_epoch_(\d+)\.pth")
LATEST_NAME = "latest.pth"
BEST_NAME = "best.pth"

# The release pickled its yacs CfgNode under "config"; it is rebuilt as an OrderedDict (a plain mapping that
# the weights-only loader can fill), so the class itself, and any code, never runs.
RELEASE_GLOBALS = [(OrderedDict, "yacs.config.CfgNode")]

# Keys whose change between the saved run and this one changes the learning rate or weight decay of an update.
SCHEDULE_KEYS = (
    "DATA.BATCH_SIZE", "TRAIN.ACCUMULATION_STEPS", "TRAIN.EPOCHS", "TRAIN.WARMUP_EPOCHS", "TRAIN.BASE_LR",
    "TRAIN.WARMUP_LR", "TRAIN.MIN_LR", "TRAIN.WEIGHT_DECAY", "TRAIN.LR_SCALING", "TRAIN.LR_REFERENCE_BATCH",
    "TRAIN.LR_SCHEDULER.NAME", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "TRAIN.LR_SCHEDULER.DECAY_RATE",
    "TRAIN.OPTIMIZER.NAME", "TRAIN.OPTIMIZER.EPS", "TRAIN.OPTIMIZER.BETAS", "TRAIN.OPTIMIZER.MOMENTUM",
    "TRAIN.LAYER_DECAY", "DATA.AUG_REPEATS",
)


class CheckpointError(RunError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------------------------------------------------
# Files


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, flushed to disk, then renamed over the target.

    The temporary name is the writer's own (process id and a random part), so two writers never write into one
    file; whatever happens, it is gone when this returns or raises.

    Raises:
        CheckpointError: the file cannot be written (a full disk, no permission): one line naming it and the
            cause; the file that ``path`` held before is intact.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's writer reports a failed write as "RuntimeError: [enforce fail ...] unexpected pos"; the
        # file's own OSError is the exception it was handling.
        cause = next((err for err in (e, e.__cause__, e.__context__) if isinstance(err, OSError)), None)
        if cause is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {path}: {type(cause).__name__}: {cause}; the checkpoints "
                              "already written are intact: free space on that disk, or choose another --output"
                              ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _pickled_globals(path: Path) -> list[str] | None:
    """The classes and functions a plain pickle file names, read opcode by opcode (nothing is run), or None when the
    file is not one whole pickle."""
    strings: list[str] = []
    names: list[str] = []
    try:
        with open(path, "rb") as file:
            for opcode, argument, _ in pickletools.genops(file):
                if opcode.name in ("GLOBAL", "INST"):  # "module name"
                    names.append(".".join(str(argument).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:  # module and name pushed just before
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
    except (ValueError, EOFError, OverflowError, UnicodeDecodeError):  # pickletools' ways of saying "not a pickle"
        return None
    return names


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, accepting only tensors, plain containers and the release's config; a
    ``.safetensors`` file (published weights) is read as its tensors.

    Raises:
        CheckpointError: the file is missing, a folder, truncated or corrupt, or holds other objects (nothing in it
            runs: a pickle that names code is reported as such).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pth"))
        pick = (WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else
                LATEST_NAME if LATEST_NAME in found else (found[-1] if found else None))
        hint = f"e.g. {path / pick}" if pick else "it holds no .pth files"
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file to --resume/--pretrained, {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path given to --resume/--pretrained")
    if path.suffix == ".safetensors":  # published weights (tools/publish.py): tensors only, no pickle to check
        try:
            return load_weights(path)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {path}: not a whole safetensors file ({e}); publish it again or "
                                  "point to another file") from None
    try:
        with torch.serialization.safe_globals(RELEASE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only loader names the class or function it refused. A plain pickle (not torch.save's format)
        # it stops at its first opcode, so what that names is read here, opcode by opcode.
        refusal = next((line.strip() for line in str(e).splitlines()
                        if any(word in line for word in ("GLOBAL", "Can only", "reduce"))), None)
        names = _pickled_globals(path) if refusal is None else None
        if names:
            named = list(dict.fromkeys(names))
            shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
            refusal = f"a plain Python pickle naming {shown}: code that loading it would run"
        elif names is not None:
            raise CheckpointError(f"cannot read {path}: it is a plain Python pickle, not a file written by torch.save; "
                                  "re-save its tensors with torch.save") from None
        if refusal is None:
            raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt (not a checkpoint's "
                                  "contents); delete it or point to another checkpoint") from None
        raise CheckpointError(
            f"refusing {path}: it holds objects other than tensors and plain containers ({refusal}); nothing in it "
            "was run; only weights-only checkpoints are loaded, re-save it as a dict of tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}); "
            "delete it or point to another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return checkpoint


def read_checkpoint(path: str | Path, env: DistEnv) -> dict[str, Any]:
    """:func:`load_checkpoint_file` on rank 0, its contents (or its error) on every rank."""
    return on_rank0(lambda: load_checkpoint_file(path), env)


def saved_config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The config a checkpoint was trained with as nested dicts: ours as YAML text, the release's as a mapping; what
    earlier versions saved is read as this version reads it (config.upgrade_saved)."""
    config = checkpoint.get("config")
    if isinstance(config, str):
        loaded = yaml.safe_load(config)
        return upgrade_saved(loaded, "the checkpoint's saved config") if isinstance(loaded, dict) else {}
    if isinstance(config, Mapping):
        return upgrade_saved(yaml.safe_load(CfgNode(config).dump()), "the checkpoint's saved config")
    return {}


# --------------------------------------------------------------------------------------------------------------
# One timeline per output folder
#
# Every file a run saves records where it stands: ``save_seq`` orders the files of a folder by when they were
# written (each run starts above the highest it finds there), ``run_id`` names the run that wrote it (a run
# continued after a kill, a preemption or a requeue keeps its id), ``resumed_from`` the file given to
# ``--resume`` that the run started from, and ``history`` the metrics rows of the epochs it finished. A run
# continues from the file written last, never from the one with the highest number in its name or the newest
# time; files from before these fields were saved come first, in the order of their epoch and step.

TIMELINE_KEYS = ("save_seq", "run_id", "resumed_from")


def epoch_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The ``ckpt_epoch_<n>.pth`` files in ``output_dir`` as (n, path), oldest epoch first."""
    found = []
    for path in output_dir.glob("ckpt_epoch_*.pth"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def resumable_checkpoints(output_dir: Path) -> list[Path]:
    """The files a run could continue from: ``latest.pth`` and the epoch checkpoints (not ``best.pth``)."""
    latest = output_dir / LATEST_NAME
    return [p for _, p in epoch_checkpoints(output_dir)] + ([latest] if latest.is_file() else [])


class Saved(NamedTuple):
    """A checkpoint file and what it records of its place in the timeline (its tensors are not read)."""

    path: Path
    record: dict[str, Any]

    @property
    def order(self) -> tuple:
        """Later is greater: the save sequence, then (files without one) epoch and step, then latest.pth."""
        return (self.record.get("save_seq") or 0, self.record.get("epoch", -1), self.record.get("step") or 0,
                self.path.name == LATEST_NAME)


def _record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    return {key: checkpoint.get(key) for key in (*TIMELINE_KEYS, "epoch", "step")}


class _Node(dict):
    """What the state dicts' OrderedDicts become when a checkpoint is only peeked at (attributes allowed)."""


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


class _PeekUnpickler(pickle.Unpickler):
    """Reads a checkpoint's pickle without its tensors: every class or function it names becomes a stub that
    returns None (the state dicts' OrderedDicts, plain dicts), so nothing in the file runs and no tensor is read."""

    def find_class(self, module: str, name: str) -> Any:
        return _Node if (module, name) == ("collections", "OrderedDict") else _nothing

    def persistent_load(self, pid: Any) -> None:
        return None


def peek_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's timeline fields, epoch and step, read from its pickle alone (25x faster than loading a
    strip_mlp_tiny training checkpoint); a file that cannot be read so (another format, damaged) is loaded in full.

    Raises:
        CheckpointError: as :func:`load_checkpoint_file`.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(name) as f:
                checkpoint = _PeekUnpickler(f).load()
    except (pickle.UnpicklingError, StopIteration, EOFError, OSError, zipfile.BadZipFile, ValueError,
            AttributeError, TypeError, IndexError, KeyError):
        checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return _record(checkpoint)


def saved_checkpoints(paths: list[Path], logger: logging.Logger) -> list[Saved]:
    """The readable ones of ``paths``, written last first; each unreadable file is skipped with a warning."""
    found = []
    for path in paths:
        try:
            found.append(Saved(path, peek_checkpoint(path)))
        except CheckpointError as e:
            logger.warning(f"auto-resume skips {path.name}: {e}")
    return sorted(found, key=lambda saved: saved.order, reverse=True)


def _load_first(candidates: list[Saved], logger: logging.Logger) -> tuple[Path, dict[str, Any]] | None:
    for saved in candidates:
        try:
            return saved.path, load_checkpoint_file(saved.path)
        except CheckpointError as e:
            logger.warning(f"auto-resume skips {saved.path.name}: {e}")
    return None


def find_resume_checkpoint(output_dir: Path, logger: logging.Logger) -> tuple[Path, dict[str, Any]] | None:
    """The loadable checkpoint of ``output_dir`` written last, with its contents, or None.

    The save sequence recorded in each file decides; a rewound run (``--resume`` of an earlier epoch) wrote its
    files after the abandoned run's later epochs, so its own come first. File names and times are not used,
    so a copied output folder resumes the same way. Unreadable files are skipped with a warning.
    """
    return _load_first(saved_checkpoints(resumable_checkpoints(output_dir), logger), logger)


def _same_file(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class Resume(NamedTuple):
    """The checkpoint a run continues from, and whether it continues that file's run (auto-resume, or a
    requeued ``--resume`` run) rather than starting a new run from it."""

    path: Path
    checkpoint: dict[str, Any]
    continues: bool


def choose_resume(config: CfgNode, env: DistEnv, logger: logging.Logger) -> Resume | None:
    """The checkpoint this run continues from, chosen and read by rank 0 and the same on every rank.

    ``MODEL.RESUME`` names it, except for a training run whose output folder already holds checkpoints that
    it wrote after starting from that file (it was preempted, killed or requeued): it continues from the
    newest of those, so the same command never throws away what it wrote, and the log says so. Otherwise a
    training run with ``TRAIN.AUTO_RESUME`` takes the checkpoint of its output folder written last. Other ranks
    never look at their own file system, so node-local output folders or a stale network file system view cannot
    make them resume another epoch.
    """
    output_dir = Path(config.OUTPUT)
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)

    def choose() -> Resume | None:
        if config.MODEL.RESUME and training:
            quiet = logging.Logger("quiet")  # files of other runs that do not load are not this run's concern
            descendants = [saved for saved in saved_checkpoints(resumable_checkpoints(output_dir), quiet)
                           if _same_file((saved.record.get("resumed_from") or {}).get("path", ""), config.MODEL.RESUME)]
            found = _load_first(descendants, logger)
            if found is not None:
                record = _record(found[1])
                logger.info(f"{output_dir} holds checkpoints that this run wrote after --resume {config.MODEL.RESUME}: "
                            f"continuing from {found[0].name} (epoch {record['epoch']}, step {record['step'] or 0}), "
                            "not from that file")
                return Resume(*found, continues=True)
        if config.MODEL.RESUME:
            return Resume(Path(config.MODEL.RESUME), load_checkpoint_file(config.MODEL.RESUME), continues=False)
        if not (config.TRAIN.AUTO_RESUME and training):
            return None
        found = find_resume_checkpoint(output_dir, logger)
        if found is None and resumable_checkpoints(output_dir):
            raise CheckpointError(f"{output_dir} holds checkpoints but none loads; move them away to start afresh, "
                                  "or choose another --output/--tag")
        return Resume(*found, continues=True) if found is not None else None

    return on_rank0(choose, env)


@dataclass
class Timeline:
    """A training run's place in its output folder's timeline: what each file it saves records, and which files
    are its own to prune.

    Attributes:
        run_id: the run's id, kept by the runs that continue it.
        resumed_from: the ``--resume`` file the run started from (path, its run id and save sequence), or None.
        next_seq: the save sequence of the next file written.
        own: this run's epoch checkpoints and their save sequences.
        protected: files never pruned: those this run, or another run of the folder, resumed from.
        history: the metrics rows of the finished epochs.
    """

    run_id: str
    resumed_from: dict[str, Any] | None
    next_seq: int
    own: dict[Path, int] = field(default_factory=dict)
    protected: set[Path] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)

    def stamp(self, path: Path, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """``checkpoint`` with this run's timeline fields and the next save sequence, to be saved as ``path``."""
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        if CHECKPOINT_PATTERN.fullmatch(path.name):
            self.own[path] = seq
        return {**checkpoint, "save_seq": seq, "run_id": self.run_id, "resumed_from": self.resumed_from,
                "history": list(self.history)}


def start_timeline(config: CfgNode, resume: Resume | None, env: DistEnv, logger: logging.Logger) -> Timeline:
    """The timeline of a training run (rank 0 reads the folder; every rank gets the same).

    A run that continues a checkpoint keeps its run id and lineage; one started afresh or from ``--resume FILE``
    is a new run. Its files come after every file of the folder (and after the file it resumed from).
    """
    output_dir = Path(config.OUTPUT)

    def start() -> Timeline:
        quiet = logging.Logger("quiet")  # auto-resume already warned of the files that do not load
        folder = saved_checkpoints(sorted(output_dir.glob("*.pth")), quiet)
        resumed = _record(resume.checkpoint) if resume is not None else {}
        last_seq = max([saved.record.get("save_seq") or 0 for saved in folder] + [resumed.get("save_seq") or 0])
        if resume is not None and resume.continues:
            run_id, resumed_from = resumed.get("run_id") or uuid.uuid4().hex, resumed.get("resumed_from")
        elif resume is not None:
            run_id = uuid.uuid4().hex
            resumed_from = {"path": os.path.realpath(resume.path), "run_id": resumed.get("run_id"),
                            "save_seq": resumed.get("save_seq")}
        else:
            run_id, resumed_from = uuid.uuid4().hex, None
        own = {saved.path: saved.record["save_seq"] for saved in folder
               if saved.record.get("run_id") == run_id and CHECKPOINT_PATTERN.fullmatch(saved.path.name)}
        # The files this run and every run of the folder started from (a rewound run's, too).
        starts = [(saved.record.get("resumed_from") or {}).get("path") for saved in folder] + [
            resume.path if resume is not None else None, (resumed_from or {}).get("path")]
        protected = {Path(os.path.realpath(p)) for p in starts if p}
        history = list(resume.checkpoint.get("history") or []) if resume is not None else []
        return Timeline(run_id, resumed_from, last_seq + 1, own, protected, history)

    timeline = on_rank0(start, env)
    logger.debug(f"run {timeline.run_id}, resumed from {timeline.resumed_from}, next save {timeline.next_seq}")
    return timeline


def prune_checkpoints(timeline: Timeline, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest epoch checkpoints of this run (``keep`` <= 0 keeps all); files of other
    runs and the files a run resumed from are never deleted. Returns what was deleted."""
    if keep <= 0:
        return []
    candidates = sorted((seq, path) for path, seq in timeline.own.items()
                        if Path(os.path.realpath(path)) not in timeline.protected)
    doomed = [path for _, path in candidates[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
        del timeline.own[path]
    return doomed


# --------------------------------------------------------------------------------------------------------------
# Saving a run


def build_checkpoint(state: OptimizationState, config: CfgNode, env: DistEnv, epoch: int, best_acc1: float,
                     classes: list[str], step: int = 0) -> dict[str, Any]:
    """Everything needed to continue exactly, as tensors and plain containers (weights_only-loadable), and the
    dataset's class names, which the tools show.

    ``epoch`` is the last finished epoch (-1 for none) and ``step`` the micro-steps already done of the next
    one (a checkpoint written inside an epoch; 0 at an epoch's end). Saving adds the timeline's fields
    (:meth:`Timeline.stamp`).

    The release's keys (``model``, ``optimizer``, ``lr_scheduler``, ``max_accuracy``, ``epoch``, ``config``)
    are kept, so the release's own code can read these files too.
    """
    return {
        "model": unwrap_model(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "model_ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": epoch,
        "step": step,
        "global_step": state.global_step,
        "max_accuracy": best_acc1,
        "rng": rng_state(),
        "world_size": env.world_size,
        "config": config.dump(),
        "classes": list(classes),
    }


def save_epoch(state: OptimizationState, config: CfgNode, env: DistEnv, epoch: int, best_acc1: float, is_best: bool,
               classes: list[str], timeline: Timeline, logger: logging.Logger) -> None:
    """Rank 0 writes the epoch's checkpoints: ``ckpt_epoch_<n>.pth`` when due, ``best.pth``, then ``latest.pth``,
    each with its place in the timeline (``timeline.history`` already holds the epoch's row)."""
    if not env.is_main:
        return
    output_dir = Path(config.OUTPUT)
    checkpoint = build_checkpoint(state, config, env, epoch, best_acc1, classes)
    if (epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS:
        path = output_dir / f"ckpt_epoch_{epoch}.pth"
        save_checkpoint(timeline.stamp(path, checkpoint), path)
        logger.info(f"saved {path}")
    if is_best:
        save_checkpoint(timeline.stamp(output_dir / BEST_NAME, checkpoint), output_dir / BEST_NAME)
    save_checkpoint(timeline.stamp(output_dir / LATEST_NAME, checkpoint), output_dir / LATEST_NAME)
    for path in prune_checkpoints(timeline, config.TRAIN.KEEP_CHECKPOINTS):
        logger.info(f"removed {path.name} (TRAIN.KEEP_CHECKPOINTS {config.TRAIN.KEEP_CHECKPOINTS})")


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (BatchNorm running statistics), on the CPU."""
    saved = module.state_dict()
    return {name: buffer.detach().cpu() for name, buffer in module.named_buffers() if name in saved}


def _load_buffers(module: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value)


def save_position(state: OptimizationState, config: CfgNode, env: DistEnv, epoch: int, step: int, best_acc1: float,
                  classes: list[str], timeline: Timeline, logger: logging.Logger) -> None:
    """Rank 0 writes ``latest.pth`` inside epoch ``epoch``, after its first ``step`` micro-steps (at an update's
    end), so that a resumed run continues with the next sample. Every rank calls it.

    Inside an epoch each rank's BatchNorm statistics (of the model and of its EMA) are its own until the
    epoch's end averages them, so with several ranks the checkpoint also holds each rank's (``rank_buffers``).
    """
    own = {"model": _persistent_buffers(unwrap_model(state.model)),
           "model_ema": _persistent_buffers(state.ema.module) if state.ema is not None else {}}
    every_rank = gather_to_rank0(own, env) if env.distributed else None
    if not env.is_main:
        return
    checkpoint = build_checkpoint(state, config, env, epoch - 1, best_acc1, classes, step)
    if every_rank is not None:
        checkpoint["rank_buffers"] = every_rank
    path = Path(config.OUTPUT) / LATEST_NAME
    save_checkpoint(timeline.stamp(path, checkpoint), path)
    logger.info(f"saved {LATEST_NAME} at epoch {epoch} step {step} (update {state.global_step})")


# --------------------------------------------------------------------------------------------------------------
# Restoring a run


def is_training_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a file holds a run to continue (ours, or the release's), not only weights."""
    return "epoch" in checkpoint and "optimizer" in checkpoint and "model" in checkpoint


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def schedule_changes(saved: Mapping[str, Any], config: CfgNode) -> list[str]:
    """``KEY: old -> new`` for every schedule-relevant key whose value differs from the saved run's."""
    current = yaml.safe_load(config.dump())
    changes = []
    for key in SCHEDULE_KEYS:
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is not None and old != new:
            changes.append(f"{key}: {old} -> {new}")
    return changes


def _saved_parameter_names(checkpoint: Mapping[str, Any], model: nn.Module) -> list[list[str]] | None:
    """The parameter names of each saved optimiser group, in the group's order.

    Our files name them (``param_names``). The release's groups (and ours from before names were saved) list
    the model's parameters in the saved model's order, split into a decayed group and one without decay; that
    split is rebuilt from the saved model's names. None when neither applies.
    """
    groups = checkpoint["optimizer"]["param_groups"]
    if all("param_names" in group for group in groups):
        return [list(group["param_names"]) for group in groups]
    parameters = dict(unwrap_model(model).named_parameters())
    order = [name for name in clean_state_dict(checkpoint) if name in parameters]
    skip = unwrap_model(model).no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else ()
    split = [[n for n in order if is_decayed(n, parameters[n], skip)],
             [n for n in order if not is_decayed(n, parameters[n], skip)]]
    if [len(group["params"]) for group in groups] != [len(names) for names in split]:
        return None
    return split


def _named_optimizer_state(checkpoint: Mapping[str, Any], model: nn.Module) -> tuple[dict[str, dict], str]:
    """The saved optimiser state per parameter name, or ({}, the reason it cannot be matched)."""
    names = _saved_parameter_names(checkpoint, model)
    if names is None:
        return {}, "its parameter groups do not match this model's"
    saved = checkpoint["optimizer"]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    flat_names = [name for group in names for name in group]
    return {name: saved["state"][i] for name, i in zip(flat_names, ids, strict=True) if i in saved["state"]}, ""


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Mapping[str, Any], model: nn.Module,
                      config: CfgNode, source: str, logger: logging.Logger) -> None:
    """Load the saved optimiser moments and step counts into ``optimizer``, matched by parameter name.

    The hyperparameters (learning rate, weight decay, betas, ...) stay those of ``optimizer``, which was built
    from this run's config. When the saved state does not fit (another optimiser, model or grouping), the
    optimiser starts fresh, with a warning saying why.
    """
    saved_name = _lookup(saved_config(checkpoint), "TRAIN.OPTIMIZER.NAME")
    reason = ""
    if saved_name is not None and str(saved_name).lower() != config.TRAIN.OPTIMIZER.NAME.lower():
        reason = f"it is {saved_name}'s, this run uses {config.TRAIN.OPTIMIZER.NAME}"
    named_state, reason = (({}, reason) if reason else _named_optimizer_state(checkpoint, model))
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    params = dict(unwrap_model(model).named_parameters())
    if not reason:
        missing = [n for n in current if n not in named_state]
        wrong = [n for n in current if n in named_state and any(
            torch.is_tensor(v) and v.ndim > 0 and v.shape != params[n].shape for v in named_state[n].values())]
        if missing or wrong:
            reason = f"no state for {(missing + wrong)[0]}" if missing else f"shapes differ at {wrong[0]}"
    if reason:
        logger.warning(f"{source}: its optimiser state does not fit ({reason}); training continues from its "
                       "weights and epoch with a fresh optimiser state")
        return
    state_dict = optimizer.state_dict()
    state_dict["state"] = {index: named_state[name] for index, name in enumerate(current)}
    optimizer.load_state_dict(state_dict)


class ResumePoint(NamedTuple):
    """Where a restored run continues: the epoch, the micro-step inside it, and the best accuracy so far."""

    epoch: int
    step: int
    best_acc1: float


def restore_training(state: OptimizationState, checkpoint: Mapping[str, Any], source: str, config: CfgNode,
                     env: DistEnv, updates_per_epoch: int, logger: logging.Logger) -> ResumePoint:
    """Load a saved run into ``state``; returns where it continues.

    The config is the truth for the schedule: the optimiser keeps this run's hyperparameters and the
    schedule is this config's, evaluated at the saved update count, so the learning rate and weight decay of
    update u equal a fresh run's with this config; the moments, step counts, weights, EMA and RNG states
    come from the checkpoint (with each rank's BatchNorm statistics when it was saved inside an epoch by as
    many ranks). Every schedule key that changed is logged as ``old -> new``. A checkpoint written inside an
    epoch continues there with the same batch size, accumulation and process count; with others, which would
    cut the epoch into other steps, the epoch is trained from its start. A release
    checkpoint (no update count) continues at (epoch + 1) x updates per epoch.
    """
    if not is_training_checkpoint(checkpoint):
        raise CheckpointError(f"{source} holds weights only (no optimiser state or epoch); "
                              "use --pretrained FILE to start a new run from it")
    model = unwrap_model(state.model)
    model.load_state_dict(fit_state_dict(checkpoint, model, source, logger, resample=False))
    saved = saved_config(checkpoint)
    for change in schedule_changes(saved, config):
        logger.info(f"config changed since {source}: {change}")
    restore_optimizer(state.optimizer, checkpoint, model, config, source, logger)
    scaler_state = checkpoint.get("scaler") or {}
    if state.scaler.is_enabled() and scaler_state:
        state.scaler.load_state_dict(scaler_state)
    elif state.scaler.is_enabled():
        logger.info(f"{source} has no float16 gradient-scaler state; the scaler starts fresh")
    if state.ema is not None:
        ema_weights = checkpoint.get("model_ema") or checkpoint["model"]
        state.ema.module.load_state_dict(fit_state_dict(ema_weights, state.ema.module, f"{source} (EMA)", logger,
                                                              resample=False))
    rank_buffers = checkpoint.get("rank_buffers")
    if rank_buffers is not None and len(rank_buffers) == env.world_size:  # saved inside an epoch: this rank's own
        _load_buffers(model, rank_buffers[env.rank]["model"])
        if state.ema is not None:
            _load_buffers(state.ema.module, rank_buffers[env.rank]["model_ema"])
    epoch = int(checkpoint["epoch"])
    state.global_step = int(checkpoint.get("global_step", (epoch + 1) * updates_per_epoch))
    if env.is_main and "rng" in checkpoint:  # every rank re-seeds from (SEED, rank, epoch) at each epoch anyway
        set_rng_state(checkpoint["rng"])
    saved_world = checkpoint.get("world_size", env.world_size)
    if saved_world != env.world_size:
        logger.warning(f"{source} was written by {saved_world} processes, this run has {env.world_size}: "
                       "training continues but will not replay the original run exactly")
    best_acc1 = float(checkpoint.get("max_accuracy", 0.0))
    step = int(checkpoint.get("step", 0))
    if step:  # a position inside an epoch, counted in micro-batches of this layout
        before = (_lookup(saved, "DATA.BATCH_SIZE"), _lookup(saved, "TRAIN.ACCUMULATION_STEPS"), saved_world,
                  _lookup(saved, "DATA.AUG_REPEATS") or 1)
        now = (config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS, env.world_size, config.DATA.AUG_REPEATS)
        if before != now:
            logger.warning(f"{source} was written {step} steps into epoch {epoch + 1} with (batch size, accumulation "
                           f"steps, processes, augmentation repeats) {before}, this run has {now}: its steps divide "
                           f"the epoch otherwise, so it trains epoch {epoch + 1} from its start")
            step = 0
    inside = f", {step} steps into epoch {epoch + 1}" if step else ""
    logger.info(f"resumed from {source}: epoch {epoch}{inside}, update {state.global_step}, "
                f"best Acc@1 {best_acc1:.3f}")
    return ResumePoint(epoch + 1, step, best_acc1)


# --------------------------------------------------------------------------------------------------------------
# Fitting weights from elsewhere


def fit_state_dict(checkpoint: Mapping[str, Any], model: nn.Module, source: str,
                   logger: logging.Logger | None = None, resample: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (ours, the release's, or a bare state dict), checked against ``model``.

    Weights of another input size are resampled to the model's (each resampled tensor logged, to ``logger`` when
    given), unless ``resample`` is off: a resumed run's optimiser state is for the saved shapes.

    Raises:
        CheckpointError: listing the mismatched names and shapes (another variant, size or class count).
    """
    log = {} if logger is None else {"log": lambda note: logger.info(f"{source}: {note}")}
    try:
        return checkpoint_filter_fn(checkpoint, model, resample=resample, **log)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_pretrained(model: nn.Module, checkpoint: Mapping[str, Any], source: str, logger: logging.Logger
                    ) -> list[str]:
    """Load weights only, to start training from; a head of another class count is skipped and keeps its fresh
    init (evaluation never does this: its weights must fit as they are).

    Returns:
        The names of the skipped keys.
    """
    weights = clean_state_dict(checkpoint)
    expected = model.state_dict()
    skipped = sorted(k for k, v in weights.items()
                     if k.startswith("head.") and k in expected and v.shape != expected[k].shape)
    weights.update({k: expected[k] for k in skipped})
    model.load_state_dict(fit_state_dict(weights, model, f"pretrained checkpoint {source}", logger))
    if skipped:
        logger.info(f"pretrained {source}: another class count, so {', '.join(skipped)} keep their fresh init")
    logger.info(f"loaded pretrained weights from {source}")
    return skipped


# --------------------------------------------------------------------------------------------------------------
# Class names a checkpoint was trained on


def check_class_names(checkpoint: Mapping[str, Any], classes: Sequence[str], source: str) -> str:
    """Refuse weights trained on other class names than the dataset's, or on the same in another order: evaluation
    would score, and a resumed run would train, permuted labels. Returns the line to log: that they match, or that
    the checkpoint carries no names to compare (the release's do not), so the check is skipped.

    Raises:
        CheckpointError: naming the first labels whose names differ.
    """
    saved = checkpoint.get("classes")
    if not saved:
        return f"{source} carries no class names (the release's do not); their check against the data's is skipped"
    saved, classes = list(saved), list(classes)
    if saved == classes:
        return f"{source}: its {len(saved)} class names match the data's"
    differing = [f"label {label}: {old!r} in the checkpoint, {new!r} in the data"
                 for label, (old, new) in enumerate(itertools.zip_longest(saved, classes)) if old != new]
    raise CheckpointError(f"{source} was trained on other classes than the data holds ({len(differing)} of "
                          f"{max(len(saved), len(classes))} labels differ; {'; '.join(differing[:3])}); give the data "
                          "it was trained on (DATA.DATA_PATH), or start a new run from its weights with --pretrained")
