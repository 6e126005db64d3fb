"""Publish a trained model as a folder that anyone can load offline: its weights as safetensors, timm's config.json
and a model card.

    python tools/publish.py --checkpoint CKPT [--cfg FILE] [--opts KEY VALUE ...] --output DIR [--ema]

CKPT is a checkpoint of ours (it carries its config and class names) or the release's (give ``--cfg`` naming its
variant and dataset, e.g. configs/imagenet1k/strip_mlp_tiny.yaml). ``--ema`` publishes the run's exponential moving
average of the weights instead of the weights. DIR receives

- ``model.safetensors``: the weights, tensors only (no pickle: loading it runs no code);
- ``config.json``: timm's format: the architecture, its constructor arguments (``model_args``), the class names and
  ``pretrained_cfg`` (input size, normalisation, and the evaluation's crop and interpolation);
- ``README.md``: a model card: variant, parameters, MACs, input size, classes, dataset, the run's metrics (from
  ``metrics.jsonl`` and ``eval/per_class.csv`` beside CKPT, when present) and the recipe (the config).

Files already in DIR are never overwritten; each file is written under a temporary name, then renamed. The folder
loads, with the checkpoint's exact logits, as

    timm.create_model("local-dir:DIR", pretrained=True)  # once `import models` (this checkout) registered Strip-MLP
    torch.hub.load("path/to/checkout", "strip_mlp_tiny", source="local", checkpoint="DIR")
    python main.py --cfg FILE --pretrained DIR/model.safetensors  # another input size is resampled
"""

import argparse
import csv
import json
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from cli import run_tool  # puts the checkout on the path for the imports below
from model_cli import checkpoint_config
from timm.models import get_pretrained_cfg
from yacs.config import CfgNode

from checkpoint import fit_state_dict, load_checkpoint_file
from data.transforms import SMALL_IMAGE_SIDE
from logger import METRICS_FILE, read_metrics
from measure import count_macs
from models import VARIANTS, StripMLPNet, build_model
from models.published import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from models.strip_mlp import input_cfg
from utils import RunError, image_size, make_folder

# config.json must name a registered architecture; a model of another width or depth than the four variants is
# published under this one's name with its own arguments, which override the variant's.
CUSTOM_ARCHITECTURE = "strip_mlp_tiny"
EVAL_REPORT = Path("eval") / "per_class.csv"  # written by main.py --eval beside the run's checkpoints


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="checkpoint to publish: ours, or the release's with --cfg")
    parser.add_argument("--cfg", metavar="FILE",
                        help="config of the model (default: the one the checkpoint carries); needed for the "
                             "release's checkpoints, e.g. configs/imagenet1k/strip_mlp_tiny.yaml")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="override config keys as main.py does")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help=f"folder to write {WEIGHTS_FILE}, {CONFIG_FILE} and {CARD_FILE} into")
    parser.add_argument("--ema", action="store_true",
                        help="publish the EMA weights of a run trained with TRAIN.EMA.ENABLE")
    return parser


def published_weights(checkpoint: Mapping[str, Any], ema: bool, source: str) -> Mapping[str, Any]:
    """The model weights of a checkpoint, or with ``ema`` its EMA weights."""
    if not ema:
        return checkpoint
    if not checkpoint.get("model_ema"):
        raise RunError(f"{source} holds no EMA weights (its run had TRAIN.EMA.ENABLE off, or it is the release's); "
                       "publish its weights without --ema")
    return checkpoint["model_ema"]


def variant_of(config: CfgNode) -> str | None:
    """The paper's variant with the config's width and stage depths, or None for another size."""
    strip = config.MODEL.STRIP_MLP
    shape = {"embed_dim": strip.EMBED_DIM, "layers": tuple(strip.LAYERS)}
    return next((name for name, arguments in VARIANTS.items() if arguments == shape), None)


def model_arguments(config: CfgNode) -> dict[str, Any]:
    """The constructor keywords that shape the network and its weights (models/build.py's mapping, training-only
    keywords left out), as JSON values."""
    strip = config.MODEL.STRIP_MLP
    size = config.DATA.IMG_SIZE
    return {"img_size": size if isinstance(size, int) else list(size), "patch_size": strip.PATCH_SIZE,
            "in_chans": strip.IN_CHANS, "num_classes": config.MODEL.NUM_CLASSES, "embed_dim": strip.EMBED_DIM,
            "layers": list(strip.LAYERS), "alpha": strip.ALPHA}


def eval_crop_pct(config: CfgNode) -> float:
    """The share of the resized image that evaluation keeps, as data.transforms.build_transform evaluates."""
    cropped = config.TEST.CROP and max(image_size(config.DATA.IMG_SIZE)) > SMALL_IMAGE_SIDE
    return config.TEST.CROP_PCT if cropped else 1.0


def hub_config(config: CfgNode, model: StripMLPNet, classes: Sequence[str] | None) -> dict[str, Any]:
    """config.json as timm's local-dir loader reads it (timm.models._hub.load_model_config_from_path)."""
    architecture = variant_of(config) or CUSTOM_ARCHITECTURE
    pretrained_cfg = {key: value for key, value in get_pretrained_cfg(architecture).to_dict().items()
                      if key != "architecture"}
    pretrained_cfg.update(input_cfg(model.img_size, model.in_chans, dynamic=False), num_classes=model.num_classes,
                          crop_pct=eval_crop_pct(config), interpolation=config.DATA.INTERPOLATION)
    hub = {"architecture": architecture, "num_classes": model.num_classes, "num_features": model.num_features,
           "global_pool": model.global_pool}
    if classes:
        hub["label_names"] = list(classes)
    return {**hub, "model_args": model_arguments(config), "pretrained_cfg": pretrained_cfg}


def eval_summary(report: Path) -> dict[str, float] | None:
    """Top-1, top-5 (over all images) and mean class accuracy of an ``eval/per_class.csv``, or None without one."""
    if not report.is_file():
        return None
    with open(report, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if int(row["images"])]
    images = sum(int(row["images"]) for row in rows)
    if not images:
        return None
    return {"images": images,
            "top1": sum(int(row["images"]) * float(row["top-1"]) for row in rows) / images,
            "top5": sum(int(row["images"]) * float(row["top-5"]) for row in rows) / images,
            "mean_class_acc": sum(float(row["top-1"]) for row in rows) / len(rows)}


def number(value: float | None) -> str:
    """A loss as the card shows it; a non-finite one is logged as null."""
    return "not finite" if value is None else f"{value:.4f}"


def metrics_lines(rows: Sequence[Mapping[str, Any]], checkpoint: Mapping[str, Any], ema: bool) -> list[str]:
    """The model card's lines on a run's ``metrics.jsonl`` rows: the validation of the published weights and the
    best of the run."""
    prefix = "ema_" if ema else ""
    which = "EMA weights" if ema else "weights"
    by_epoch = {row["epoch"]: row for row in rows}  # the last row of each epoch: a resumed run rewrote the others
    lines = [f"From `{METRICS_FILE}` beside the checkpoint ({len(by_epoch)} epochs; top-1 and top-5 in %, on the "
             "validation split):", ""]
    epoch, step = checkpoint.get("epoch"), checkpoint.get("step") or 0
    row = by_epoch.get(epoch) if not step else None
    if row is not None and row.get(f"{prefix}acc1") is not None:
        lines.append(f"- these {which}, epoch {epoch}: top-1 {row[f'{prefix}acc1']:.3f}, top-5 "
                     f"{row[f'{prefix}acc5']:.3f}, loss {number(row[f'{prefix}val_loss'])}")
    elif step:
        lines.append(f"- these {which} were saved {step} steps into epoch {epoch + 1}, after its last validation")
    scored = [row for row in by_epoch.values() if row.get(f"{prefix}acc1") is not None]
    if scored:
        best = max(scored, key=lambda row: row[f"{prefix}acc1"])
        lines.append(f"- best top-1 of the run's {which}: {best[f'{prefix}acc1']:.3f} at epoch {best['epoch']}")
        last = scored[-1]
        lines.append(f"- last epoch ({last['epoch']}): top-1 {last[f'{prefix}acc1']:.3f}, train loss "
                     f"{number(last['train_loss'])}")
    return lines


def model_card(config: CfgNode, hub: Mapping[str, Any], parameters: int, macs: float, source: Path,
               checkpoint: Mapping[str, Any], ema: bool) -> str:
    """README.md: what the model is, how well it did, how to load it, and the recipe that trained it."""
    pretrained_cfg, architecture = hub["pretrained_cfg"], hub["architecture"]
    variant = variant_of(config)
    arguments = hub["model_args"]
    shape = f"embed_dim {arguments['embed_dim']}, layers {arguments['layers']}"
    channels, height, width = pretrained_cfg["input_size"]
    names = hub.get("label_names")
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "not carried by the checkpoint"
    lines = [
        "---", f"license: {pretrained_cfg['license']}", "library_name: timm",
        "tags:", "- image-classification", "- timm", "- strip-mlp", "---", "",
        f"# {config.MODEL.NAME}", "",
        f"Strip-MLP ({pretrained_cfg['paper_name']}, {pretrained_cfg['paper_ids']}): the "
        f"{'EMA weights' if ema else 'weights'} of `{source.name}`.", "",
        "| | |", "|---|---|",
        f"| variant | {variant} ({shape}) |" if variant else f"| variant | custom ({shape}) |",
        f"| parameters | {parameters / 1e6:.2f} M ({parameters:,}) |",
        f"| MACs | {macs / 1e9:.2f} G per image at {height} x {width} |" if macs >= 1e8 else
        f"| MACs | {macs / 1e6:.2f} M per image at {height} x {width} |",
        f"| input size | {channels} x {height} x {width}, {pretrained_cfg['interpolation']} resize, crop "
        f"{pretrained_cfg['crop_pct']:.3f}, mean {list(pretrained_cfg['mean'])}, std {list(pretrained_cfg['std'])} |",
        f"| classes | {hub['num_classes']}: {shown} |",
        f"| dataset | {config.DATA.DATASET} (DATA.DATASET) |",
        "", "## Metrics", "",
    ]
    rows = read_metrics(source.parent / METRICS_FILE)
    lines += metrics_lines(rows, checkpoint, ema) if rows else [f"No `{METRICS_FILE}` beside the checkpoint."]
    report = eval_summary(source.parent / EVAL_REPORT)
    if report is not None:
        lines += ["", f"From `{EVAL_REPORT.as_posix()}` (main.py --eval) over {report['images']} images: top-1 "
                      f"{report['top1']:.3f}, top-5 {report['top5']:.3f}, mean class accuracy "
                      f"{report['mean_class_acc']:.3f}."]
    lines += [
        "", "## Use", "",
        "From a checkout of the Strip-MLP repository, offline (the folder holds no code and no pickle):", "",
        "```python", "import timm", "import torch", "", "import models  # registers Strip-MLP with timm", "",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        "# or, through torch.hub:",
        f'model = torch.hub.load("PATH/TO/CHECKOUT", "{architecture}", source="local", '
        'checkpoint="PATH/TO/THIS/FOLDER").eval()', "```", "",
        f"or start a training run from it: `python main.py --cfg FILE --pretrained PATH/TO/THIS/FOLDER/{WEIGHTS_FILE}` "
        "(weights of another input size are resampled).", "",
        "## Recipe", "", "The config of the run:", "", "```yaml", config.dump().rstrip(), "```", "",
    ]
    return "\n".join(lines)


def write_new_files(folder: Path, contents: Mapping[str, bytes]) -> None:
    """Write each file of ``contents`` into ``folder`` under a temporary name, then rename them all into place, so
    a failed write leaves no partial file under a published name."""
    temporary = {name: folder / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp" for name in contents}
    try:
        for name, data in contents.items():
            with open(temporary[name], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, path in temporary.items():
            os.replace(path, folder / name)
    except OSError as err:
        raise RunError(f"cannot write into --output {folder}: {err.strerror}; free space there or give another "
                       "folder") from None
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def publish(args: argparse.Namespace) -> int:
    output, source = args.output, Path(args.checkpoint)
    names = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
    existing = [name for name in names if (output / name).exists()]
    if existing:
        raise RunError(f"--output {output} already holds {', '.join(existing)}; publishing never overwrites: give "
                       "another folder or remove them")
    checkpoint = load_checkpoint_file(source)
    config = checkpoint_config(checkpoint, str(source), args.cfg, args.opts)
    model = build_model(config).eval()
    # As trained: weights of another input size than the config's are refused, never resampled into the release.
    weights = published_weights(checkpoint, args.ema, str(source))
    model.load_state_dict(fit_state_dict(weights, model, str(source), resample=False))
    classes = checkpoint.get("classes")
    hub = hub_config(config, model, classes if classes and len(classes) == model.num_classes else None)
    parameters = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, torch.zeros(1, *hub["pretrained_cfg"]["input_size"]))
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    make_folder(output, "--output")
    write_new_files(output, {
        WEIGHTS_FILE: safetensors.torch.save(tensors, metadata={"format": "pt"}),
        CONFIG_FILE: (json.dumps(hub, indent=2) + "\n").encode(),
        CARD_FILE: model_card(config, hub, parameters, macs, source, checkpoint, args.ema).encode(),
    })
    print(f"published {'the EMA weights' if args.ema else 'the weights'} of {source} ({hub['architecture']}, "
          f"{parameters:,} parameters) to {output}: {', '.join(names)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return publish(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
