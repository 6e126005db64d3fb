"""Every path that differs on CUDA, held against the CPU or against float32 on the GPU (skipped without a GPU).

Tolerances: float32 on CUDA (TensorFloat-32 off) against the CPU, logits within 1e-4 of their largest magnitude
(relative 1e-4), gradients elementwise within relative 1e-3 plus 1e-5 of the largest gradient (sums over the batch
and the positions run in another order on each device); autocast against float32 on the GPU, as relative norms of
the difference: bfloat16 (8 significant bits) 0.1 for logits and 0.2 for gradients, float16 (11 bits) 0.02 and 0.05.
A wrong kernel or a missed cast is off by far more, or not finite.
"""

import copy
import logging
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from run_helpers import sample_batch, write_config, write_image_folder
from torch import nn

from config import default_config, load_config
from data import DeviceLoader, build_loader
from data.device import build_erasing
from distill import DistillationLoss
from distributed import DistEnv
from engine import OptimizationState, StepSettings, compile_model, train_one_epoch
from lr_scheduler import build_scheduler, effective_learning_rates
from main import build_network
from models import VARIANTS, StripMLPNet
from optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import benchmark  # noqa: E402  (tools/ is a folder of scripts, not a package)

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
LOGGER = logging.Logger("cuda-test")


def small_model() -> StripMLPNet:
    """A model whose torch.compile takes seconds, not minutes."""
    torch.manual_seed(0)
    return StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1), drop_path_rate=0.0)


def batch(size: int, img_size: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(size, 3, img_size, img_size, generator=generator),
            torch.randint(0, classes, (size,), generator=generator))


def forward_backward(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training-mode logits (float32, on the CPU) and each parameter's gradient (on the CPU) of one batch."""
    device = next(model.parameters()).device
    model.train().zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(images.to(device))
        loss = F.cross_entropy(logits.float(), targets.to(device))
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.float().cpu() for name, p in model.named_parameters()}
    return logits.float().detach().cpu(), grads


def assert_float32_close(actual: tuple[torch.Tensor, dict], expected: tuple[torch.Tensor, dict]) -> None:
    logits, grads = actual
    torch.testing.assert_close(logits, expected[0], rtol=1e-4, atol=1e-4 * expected[0].abs().max().item())
    scale = max(g.abs().max().item() for g in expected[1].values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-3, atol=1e-5 * scale, msg=name)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_forward_and_backward_match_the_cpu_in_float32(name: str, ieee_float32) -> None:
    """The four variants' layers (cuDNN's wide depthwise convolutions, the strip projections, GRN's own backward)
    against the CPU's, at 64 px."""
    torch.manual_seed(0)
    cpu = StripMLPNet(img_size=64, num_classes=10, drop_path_rate=0.0, **VARIANTS[name])
    gpu = copy.deepcopy(cpu).to(CUDA)
    images, targets = batch(4, 64, classes=10)
    assert_float32_close(forward_backward(gpu, images, targets), forward_backward(cpu, images, targets))
    with torch.no_grad():  # evaluation mode: the running statistics both just gathered from the same batch
        expected = cpu.eval()(images)
        torch.testing.assert_close(gpu.eval()(images.to(CUDA)).cpu(), expected, rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(("dtype", "logit_limit", "grad_limit"),
                         [(torch.bfloat16, 0.1, 0.2), (torch.float16, 0.02, 0.05)], ids=["bf16", "fp16"])
def test_autocast_stays_close_to_float32(dtype: torch.dtype, logit_limit: float, grad_limit: float,
                                         ieee_float32) -> None:
    model = tiny_model(drop_path_rate=0.0).to(CUDA)
    images, targets = batch(8, 64, classes=10)
    reference_logits, reference_grads = forward_backward(model, images, targets)
    logits, grads = forward_backward(model, images, targets, dtype)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
    assert relative_error(logits, reference_logits) < logit_limit
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert torch.isfinite(flat).all()
    assert relative_error(flat, torch.cat([g.flatten() for g in reference_grads.values()])) < grad_limit


def test_channels_last_gives_the_contiguous_results(ieee_float32) -> None:
    model = tiny_model(drop_path_rate=0.0).to(CUDA)
    images, targets = batch(4, 64, classes=10)
    contiguous = forward_backward(model, images, targets)
    model = model.to(memory_format=torch.channels_last)
    assert_float32_close(forward_backward(model, images.contiguous(memory_format=torch.channels_last), targets),
                         contiguous)


def test_compiled_training_and_frozen_evaluation_match_eager(ieee_float32) -> None:
    model = small_model().to(CUDA)
    images, targets = batch(4, 32)
    eager = forward_backward(model, images, targets)
    assert_float32_close(forward_backward(compile_model(model, inference_only=False), images, targets), eager)
    with torch.no_grad():
        expected = model.eval()(images.to(CUDA))
        frozen = compile_model(model, inference_only=True)(images.to(CUDA))  # BatchNorms folded into the graph
    torch.testing.assert_close(frozen, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fused_adamw_steps_as_the_cpu_optimiser_does() -> None:
    config = default_config()
    cpu = small_model()
    gpu = copy.deepcopy(cpu).to(CUDA)
    cpu_optimizer, gpu_optimizer = build_optimizer(config, cpu, 1e-3), build_optimizer(config, gpu, 1e-3)
    assert gpu_optimizer.defaults["fused"] is True and not cpu_optimizer.defaults["fused"]
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p_cpu, p_gpu in zip(cpu.parameters(), gpu.parameters(), strict=True):
            p_cpu.grad = torch.randn(p_cpu.shape, generator=generator)
            p_gpu.grad = p_cpu.grad.to(CUDA)
        cpu_optimizer.step()
        gpu_optimizer.step()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p_cpu, small_model().state_dict()[name])  # every parameter moved


def fp16_state(model: nn.Module, init_scale: float) -> OptimizationState:
    """A training state as main.py builds it on CUDA (fused AdamW), with a float16 gradient scaler."""
    config = default_config()
    optimizer = build_optimizer(config, model, 1e-3)
    return OptimizationState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer, 10, effective_learning_rates(config, 1)),
        scaler=torch.amp.GradScaler("cuda", init_scale=init_scale),
        criterion=DistillationLoss(nn.CrossEntropyLoss()),
    )


def test_float16_skips_overflowing_updates_and_then_trains() -> None:
    """A scale of 2**30 overflows float16 gradients: the update is skipped (weights and AdamW's step count kept),
    the scale halves, and once it is low enough the updates go through."""
    model = small_model().to(CUDA)
    state = fp16_state(model, init_scale=2.0**30)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CUDA)
    settings = StepSettings(env=env, amp_enabled=True, amp_dtype=torch.float16, channels_last=False,
                            accumulation_steps=1, clip_grad=5.0, print_freq=100, epochs=2)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [sample_batch(*batch(4, 32))]
    stats = train_one_epoch(state, data, 0, settings, LOGGER)
    assert (stats["skipped_updates"], stats["grad_norm"], state.global_step) == (1, None, 1)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert all(s["step"].item() == 0 for s in state.optimizer.state.values())  # fused AdamW was called, and kept it
    assert state.scaler.get_scale() == 2.0**29

    stats = train_one_epoch(state, data * 40, 1, settings, LOGGER)
    assert 0 < stats["skipped_updates"] < 40 and stats["grad_norm"] is not None
    assert not all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def loader_config(tmp_path, reprob: float):
    data = write_image_folder(tmp_path / "images", classes=3, train_per_class=4, val_per_class=2)
    path = write_config(tmp_path / "config.yaml", data, tmp_path / "out", {"DEVICE": "cuda"})
    return load_config(str(path), ["DATA.PIN_MEMORY", "True", "AUG.REPROB", str(reprob)])


def test_the_device_loader_pins_normalises_and_erases_on_the_gpu(tmp_path) -> None:
    config = loader_config(tmp_path, reprob=1.0)
    loaders = build_loader(config, 0, 1, device=CUDA)
    loaders.loader_train.sampler.set_epoch(0)
    raw = next(iter(loaders.loader_train.loader))  # what the workers hand over: uint8, in pinned memory
    assert raw.image.dtype == torch.uint8 and raw.image.is_pinned()

    # Dividing by 255 on the GPU multiplies by its reciprocal: within one or two float32 steps of the CPU's.
    on_gpu, on_cpu = DeviceLoader([], CUDA).prepare(raw), DeviceLoader([], "cpu").prepare(raw)
    assert on_gpu.image.device.type == on_gpu.target.device.type == "cuda" and on_gpu.image.dtype == torch.float32
    torch.testing.assert_close(on_gpu.image.cpu(), on_cpu.image, rtol=1e-6, atol=1e-6)

    erasing = DeviceLoader([], CUDA, erasing=build_erasing(config, CUDA))
    erased = []
    for _ in range(2):
        random.seed(3)
        torch.manual_seed(3)  # seeds the GPU's generator too
        erased.append(erasing.prepare(raw).image)
    assert erased[0].device.type == "cuda" and torch.equal(erased[0], erased[1])  # fixed by the seeds
    changed = (erased[0] != on_gpu.image).flatten(1).any(dim=1)
    assert changed.all()  # AUG.REPROB 1: every image has an erased region

    served = next(iter(loaders.loader_train))  # the DeviceLoader that build_loader made, end to end
    assert served.image.device.type == "cuda" and served.image.shape == (4, 3, 32, 32)
    validation = next(iter(loaders.loader_val))
    assert validation.image.device.type == "cuda" and validation.image.dtype == torch.float32


def test_sync_batchnorm_conversion_keeps_names_and_outputs(tmp_path) -> None:
    config = default_config()
    config.merge_from_list(["MODEL.NUM_CLASSES", "4", "DATA.IMG_SIZE", "32", "MODEL.STRIP_MLP.EMBED_DIM", "8",
                            "MODEL.STRIP_MLP.LAYERS", "[1, 1, 1, 1]", "MODEL.DROP_PATH_RATE", "0.0",
                            "TRAIN.SYNC_BN", "True"])
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=CUDA)
    two = DistEnv(rank=0, world_size=2, local_rank=0, device=CUDA)  # converts; no process group is needed for that
    plain, synced = build_network(config, one, LOGGER), build_network(config, two, LOGGER)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())  # checkpoints keep the release's names
    images, _ = batch(4, 32)
    with torch.no_grad():  # without a process group SyncBatchNorm normalises with its own batch, as BatchNorm does
        torch.testing.assert_close(synced.train()(images.to(CUDA)), plain.train()(images.to(CUDA)))


def test_the_benchmarks_memory_child_measures_the_gpu() -> None:
    setting = benchmark.Setting("strip_mlp_tiny_light", 64, 4, "bf16", True, False, "cuda")
    parameters_mb = sum(p.numel() for p in StripMLPNet(img_size=64, **VARIANTS["strip_mlp_tiny_light"]).parameters())
    parameters_mb *= 4 / 2**20
    evaluation = benchmark.measure_peak_memory(None, setting, train=False)
    training = benchmark.measure_peak_memory(None, setting, train=True)
    assert parameters_mb <= evaluation < training < 4096  # weights; then gradients and AdamW's two moments too
    assert training >= 4 * parameters_mb
