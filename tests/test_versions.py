"""requirements.txt's ranges, the pins CI installs and the lowest versions CI tests agree; the version shim."""

from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version
from timm.data.transforms import ResizeKeepRatio
from torchvision import transforms

from compat import timm_eval_resize

ROOT = Path(__file__).resolve().parents[1]
BICUBIC = transforms.InterpolationMode.BICUBIC


def requirements(name: str) -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return {(r := Requirement(line)).name.lower(): r for line in lines if line and not line.startswith("-")}


def lower_bound(requirement: Requirement) -> Version:
    (bound,) = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return bound


def pinned(requirement: Requirement) -> Version:
    (pin,) = [Version(spec.version) for spec in requirement.specifier if spec.operator == "=="]
    return pin


def test_every_requirement_has_a_lower_bound_and_a_pin_inside_its_range() -> None:
    ranges, pins = requirements("requirements.txt"), requirements("requirements-lock.txt")
    assert set(ranges) == set(pins)
    for name, requirement in ranges.items():
        assert lower_bound(requirement) <= pinned(pins[name]), name
        assert requirement.specifier.contains(pinned(pins[name])), name
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert dev[:2] == ["-r requirements.txt", "-c requirements-lock.txt"]


def test_the_lowest_environment_installs_the_lower_bounds_of_torch_torchvision_and_timm() -> None:
    ranges, lowest = requirements("requirements.txt"), requirements("requirements-lowest.txt")
    assert set(lowest) == {"torch", "torchvision", "timm"}
    for name, requirement in lowest.items():
        assert pinned(requirement) == lower_bound(ranges[name]), name
    assert pinned(lowest["torch"]) >= Version("2.11")
    # torchvision 0.N is built for torch 2.(N - 15): 0.26 for 2.11.
    assert pinned(lowest["torchvision"]).minor == pinned(lowest["torch"]).minor + 15
    assert pinned(lowest["torchvision"]).major == 0 and pinned(lowest["torch"]).major == 2


def test_timm_eval_resize_keeps_the_interpolation_it_is_given() -> None:
    """timm before 1.0.31 resized non-square inputs bilinearly whatever it was asked; the shim fixes that."""
    keep_ratio, crop = timm_eval_resize((64, 96), 0.875, "bicubic")
    assert isinstance(keep_ratio, ResizeKeepRatio) and keep_ratio.interpolation == BICUBIC
    assert list(keep_ratio.size) == [73, 109] and crop.size == (64, 96)
    square, _ = timm_eval_resize((64, 64), 0.875, "bicubic")
    assert isinstance(square, transforms.Resize) and square.interpolation == BICUBIC and square.size == 73
