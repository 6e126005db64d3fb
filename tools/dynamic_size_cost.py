"""The cost of running a model of dynamic input size at a size it was not built for, against a model built there.

    python tools/dynamic_size_cost.py --model strip_mlp_tiny --built 224 --size 256 --batch-size 8

Times, alternating run by run: evaluation of the model built at --size; the first evaluation of a dynamic model built
at --built (resampling its strip projections and position tables, with every cache emptied before); its later
evaluations (the resampled weights cached); and a training step (forward and backward) of each, where the dynamic
model resamples at every step, as it must for the gradients to reach its built weights. Prints a Markdown table of
medians, and the time of the resampling alone (what a first call adds).
"""

import argparse
import ast
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import timm
import torch
from cli import run_tool  # puts the checkout on the path for the imports below

from models import VARIANTS  # importing models registers the variants with timm
from models.layers import RelativePosition, ResampledCache, StripProjection
from models.resample import strip_maps
from utils import RunError


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="strip_mlp_tiny", help="registered variant")
    parser.add_argument("--built", type=int, default=224, help="input size the dynamic model is built for")
    parser.add_argument("--size", type=int, default=256, help="input size it runs at (a multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind")
    parser.add_argument("--model-kwargs", default="{}", help="extra constructor keywords, a Python dict literal")
    return parser.parse_args(argv)


def compare(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """Time the dynamic model against the one built at ``--size`` and print the table; returns its rows
    (name, seconds built at --size, seconds dynamic)."""
    if args.model not in VARIANTS:
        raise RunError(f"unknown model {args.model!r}; valid: {', '.join(VARIANTS)}")
    extra = ast.literal_eval(args.model_kwargs)
    torch.manual_seed(0)
    fixed = timm.create_model(args.model, img_size=args.size, **extra)
    dynamic = timm.create_model(args.model, img_size=args.built, dynamic_img_size=True, **extra)
    images = torch.randn(args.batch_size, 3, args.size, args.size)

    def evaluate(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model.eval()(images)
        return run

    def train_step(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            model.train().zero_grad(set_to_none=True)
            model(images).logsumexp(dim=1).sum().backward()
        return run

    def forget() -> None:
        """Drop every resampled tensor and interpolation map, as before the first call at a new size."""
        strip_maps.cache_clear()
        for module in dynamic.modules():
            if hasattr(module, "resampled_cache"):
                module.resampled_cache = ResampledCache()

    def resample_all() -> None:
        """What a first call adds: every strip projection and position table resampled for --size."""
        forget()
        with torch.no_grad():
            for module in dynamic.modules():
                if isinstance(module, StripProjection):
                    module.resampled(module.length * args.size // args.built)
                elif isinstance(module, RelativePosition):
                    module.resampled(module.height * args.size // args.built, module.width * args.size // args.built)

    times: dict[str, list[float]] = {name: [] for name in ("fixed eval", "dynamic first", "dynamic eval",
                                                           "fixed train", "dynamic train", "resampling")}
    evaluate(fixed)(), evaluate(dynamic)(), train_step(fixed)(), train_step(dynamic)()  # warm-up
    for _ in range(args.repeats):
        times["fixed eval"].append(seconds(evaluate(fixed)))
        forget()
        times["dynamic first"].append(seconds(evaluate(dynamic)))
        times["dynamic eval"].append(seconds(evaluate(dynamic)))
        times["fixed train"].append(seconds(train_step(fixed)))
        times["dynamic train"].append(seconds(train_step(dynamic)))
        times["resampling"].append(seconds(resample_all))
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        ("evaluation, first call at the new size", median["fixed eval"], median["dynamic first"]),
        ("evaluation, later calls (cached)", median["fixed eval"], median["dynamic eval"]),
        ("training step (resampled at every step)", median["fixed train"], median["dynamic train"]),
    ]
    print(f"| {args.model}, batch {args.batch_size}, {args.size} px | built for {args.size} | dynamic, built for "
          f"{args.built} | ratio |")
    print("|---|---|---|---|")
    for name, built, dyn in rows:
        print(f"| {name} | {built * 1000:.0f} ms | {dyn * 1000:.0f} ms | {dyn / built:.2f}x |")
    print(f"| resampling alone, all strip projections and position tables | | {median['resampling'] * 1000:.0f} ms | |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    compare(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
