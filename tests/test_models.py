"""The Strip-MLP network against the release: golden outputs, names, sizes, and the fixed defects."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import RELEASE_NAMES_FILE, tiny_model
from torch.utils.flop_counter import FlopCounterMode
from yacs.config import CfgNode

import models
from models import layers
from models.layers import GRN, StripProjection, WideDepthwiseConv2d
from models.strip_mlp import ChannelMixing, StripMLPNet, checkpoint_filter_fn

# name: (parameters, MACs in G) at 224 x 224 with 1000 classes, as measured on the release.
RELEASE_SIZES = {
    "strip_mlp_tiny_light": (18_243_920, 2.52),
    "strip_mlp_tiny": (24_903_920, 3.65),
    "strip_mlp_small": (42_568_600, 6.80),
    "strip_mlp_base": (57_216_480, 9.18),
}


def assert_close_to_golden(actual: torch.Tensor, expected: torch.Tensor) -> None:
    limit = 1e-4 * expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= limit, f"max |diff| {error:.3g} exceeds {limit:.3g}"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_golden_logits_and_features(golden: dict, golden_model: StripMLPNet, memory_format) -> None:
    images = golden["input"].contiguous(memory_format=memory_format)
    with torch.no_grad():
        features = golden_model.forward_head(golden_model.forward_features(images), pre_logits=True)
        logits = golden_model(images)
    assert_close_to_golden(logits, golden["logits"])
    assert_close_to_golden(features, golden["pooled_features"])


def test_golden_with_channels_last_model(golden: dict, golden_model: StripMLPNet) -> None:
    model = copy.deepcopy(golden_model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(golden["input"].contiguous(memory_format=torch.channels_last))
    assert_close_to_golden(logits, golden["logits"])


def test_state_dict_names_and_shapes_match_release(golden_model: StripMLPNet) -> None:
    """Names and shapes as a set: the order in which modules are declared is not part of compatibility."""
    expected = {line for line in RELEASE_NAMES_FILE.read_text().splitlines() if not line.startswith("#")}
    actual = [f"{name}\t{tuple(t.shape)}" for name, t in golden_model.state_dict().items()]
    assert len(actual) == len(expected) and set(actual) == expected


@pytest.mark.parametrize("name", sorted(RELEASE_SIZES))
def test_release_parameter_counts_and_macs(name: str) -> None:
    params, gmacs = RELEASE_SIZES[name]
    with torch.device("meta"):  # shapes alone decide both numbers; no memory is filled or computed
        model = timm.create_model(name).eval()
        images = torch.randn(1, 3, 224, 224)
    assert sum(p.numel() for p in model.parameters()) == params
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert round(counter.get_total_flops() / 2 / 1e9, 2) == gmacs


def test_timm_registration_and_pretrained_config() -> None:
    model = timm.create_model("strip_mlp_tiny_light", num_classes=7, img_size=96, drop_path_rate=0.2)
    assert isinstance(model, StripMLPNet)
    assert model.head.out_features == 7 and model.img_size == (96, 96)
    assert {b.drop_path.drop_prob for b in model.blocks3} == {0.2}
    cfg = model.pretrained_cfg  # describes the model as built: 96 px, and that size only
    assert cfg["input_size"] == (3, 96, 96) and cfg["pool_size"] == (3, 3) and cfg["fixed_input_size"]
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.875 and cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert set(RELEASE_SIZES) <= set(timm.list_models("strip_mlp*"))


def test_build_model_maps_config_keys() -> None:
    config = CfgNode({
        "DATA": {"IMG_SIZE": 64},
        "MODEL": {"TYPE": "strip_mlp", "NUM_CLASSES": 5, "DROP_RATE": 0.2, "DROP_PATH_RATE": 0.3,
                  "DROP_PATH_SCHEDULE": "linear",
                  "STRIP_MLP": {"PATCH_SIZE": 4, "IN_CHANS": 3, "EMBED_DIM": 16, "LAYERS": [1, 1, 2, 1], "ALPHA": 2}},
        "TRAIN": {"USE_CHECKPOINT": True},
        "CHANNELS_LAST": False,
    })
    model = models.build_model(config)
    assert model.img_size == (64, 64) and model.head.out_features == 5 and model.grad_checkpointing
    assert model.blocks1[0].channel_mixing.fc1.out_features == 32
    assert model.blocks4[0].drop_path.drop_prob == pytest.approx(0.3) and model.head_drop.p == 0.2
    assert model.patch_embed.weight.is_contiguous()


def test_channels_last_config_gives_channels_last_weights_and_the_same_logits() -> None:
    """CHANNELS_LAST is honoured where every run and tool builds its model (build_model): each 4-D weight is laid
    out channels-last, and the outputs are those of the contiguous model."""
    from config import default_config

    config = default_config()
    config.merge_from_list(["DATA.IMG_SIZE", 64, "MODEL.NUM_CLASSES", 10, "MODEL.STRIP_MLP.EMBED_DIM", 16,
                            "MODEL.STRIP_MLP.LAYERS", [1, 1, 2, 1], "CHANNELS_LAST", True])
    torch.manual_seed(0)
    model = models.build_model(config).eval()
    four_d = [p for p in model.parameters() if p.ndim == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert not model.patch_embed.weight.is_contiguous()  # (16, 3, 4, 4): the two layouts differ
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), contiguous(x))


def test_gradients_reach_every_parameter() -> None:
    model = tiny_model(drop_path_rate=0.0).train()  # a dropped block (10% each, per sample) would get no gradient
    model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_drop_path_rate_zero_is_deterministic_and_positive_rate_is_not() -> None:
    images = torch.randn(4, 3, 64, 64)
    still = tiny_model(drop_path_rate=0.0).train()
    assert torch.equal(still(images), still(images))
    dropping = tiny_model(drop_path_rate=0.5).train()
    assert not torch.allclose(dropping(images), dropping(images))


@pytest.mark.parametrize(("schedule", "expected"), [
    ("uniform", [0.3] * 5),
    ("linear", [0.0, 0.075, 0.15, 0.225, 0.3]),
])
def test_drop_path_schedule(schedule: str, expected: list[float]) -> None:
    model = tiny_model(drop_path_rate=0.3, drop_path_schedule=schedule)
    blocks = [*model.blocks1, *model.blocks2, *model.blocks3, *model.blocks4]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx(expected)


def test_release_default_drop_path_is_uniform_point_one() -> None:
    model = timm.create_model("strip_mlp_tiny_light")
    blocks = [*model.blocks1, *model.blocks2, *model.blocks3, *model.blocks4]
    assert {b.drop_path.drop_prob for b in blocks} == {0.1}


def test_activation_checkpointing_gives_same_loss_grads_and_statistics() -> None:
    torch.manual_seed(0)
    plain = tiny_model(drop_path_rate=0.2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    images, target = torch.randn(3, 3, 64, 64), torch.tensor([1, 2, 3])

    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(images), target)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_alpha_other_than_three() -> None:
    model = tiny_model(alpha=2).train()
    grn = model.blocks2[0].channel_mixing.grn
    assert grn.gamma.shape == (1, 1, 1, 160)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_relative_position_index_is_a_non_persistent_device_buffer() -> None:
    model = tiny_model()
    assert not any(name.endswith(".index") for name in model.state_dict())
    index_buffers = [b for name, b in model.named_buffers() if name.endswith("relate_pos_h.index")]
    assert len(index_buffers) == 5 and index_buffers[0].shape == (16, 16)
    # pos[c, i, j] = T[(j - i) + H, c]: the entry for row 2, column 5 reads table row 3 + 16.
    position = model.blocks1[0].token_mixing.smlp_block.relate_pos_h
    assert torch.equal(position(torch.zeros(1, 20, 16, 16))[2, 5], position.embeddings_table[19])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"img_size": 100}, "img_size 100 must be a positive multiple of 32"),
    ({"embed_dim": 36}, "embed_dim 36 cannot be split by the strip mixing"),
    ({"layers": (1, 1, 1)}, r"layers must give 4 stage depths of at least one block, got \[1, 1, 1\]"),
    ({"patch_size": 2}, "patch_size 2 is not supported"),
    ({"drop_path_schedule": "cosine"}, "unknown drop path schedule 'cosine'; valid: uniform, linear"),
])
def test_bad_construction_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_input_of_another_size_names_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"input of size \(96, 96\) but the model was built for 64x64"):
        tiny_model().eval()(torch.randn(1, 3, 96, 96))


def test_checkpoint_filter_unwraps_and_reports_mismatches(golden: dict) -> None:
    model = tiny_model()
    wrapped = {"model": {f"module.{k}": v for k, v in golden["state_dict"].items()}, "epoch": 3}
    model.load_state_dict(checkpoint_filter_fn(wrapped, model), strict=True)
    with pytest.raises(ValueError, match=r"\(2 mismatches: head.weight: checkpoint \(10, 320\) vs model \(5, 320\)"):
        checkpoint_filter_fn(golden["state_dict"], tiny_model(num_classes=5))
    with pytest.raises(ValueError, match=r"unexpected blocks3.1.token_mixing"):
        checkpoint_filter_fn(golden["state_dict"], tiny_model(layers=(1, 1, 1, 1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_stays_close_to_float32(golden: dict, golden_model: StripMLPNet, dtype) -> None:
    with torch.no_grad():
        reference = golden_model(golden["input"])
        with torch.autocast("cpu", dtype=dtype):
            low = golden_model(golden["input"])
    assert low.dtype == dtype
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.cuda
def test_cuda_matches_cpu(golden: dict, golden_model: StripMLPNet, ieee_float32) -> None:
    model = copy.deepcopy(golden_model).cuda()
    with torch.no_grad():
        logits = model(golden["input"].cuda()).cpu()
    assert_close_to_golden(logits, golden["logits"])


def test_grn_and_channel_mixing_follow_the_specification() -> None:
    """ChannelMixing folds GRN's shift into fc2 and runs fc1/fc2 as 1x1 convolutions; it must equal
    conv_77 -> LayerNorm -> fc1 -> GELU -> GRN -> fc2 written out as the specification states it."""
    torch.manual_seed(0)
    block = ChannelMixing(channels=16, alpha=3)
    torch.nn.init.normal_(block.grn.gamma)
    torch.nn.init.normal_(block.grn.beta)
    x = torch.randn(2, 16, 8, 8)

    y = F.conv2d(x, block.conv_77.weight, padding=3, groups=16).permute(0, 2, 3, 1)  # (N, H, W, D)
    y = F.layer_norm(y, (16,), block.layer_norm.weight, block.layer_norm.bias)
    z = F.gelu(F.linear(y, block.fc1.weight, block.fc1.bias))  # (N, H, W, 3D)
    g = torch.sqrt((z ** 2).sum(dim=(1, 2), keepdim=True))  # L2 norm over H and W
    grn = block.grn.gamma * (z * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + block.grn.beta + z
    expected = F.linear(grn, block.fc2.weight, block.fc2.bias).permute(0, 3, 1, 2)  # (N, D, H, W)

    assert torch.allclose(block.grn(z), grn, atol=1e-5)
    assert torch.allclose(block(x), expected, atol=1e-5)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(block(channels_last), expected, atol=1e-5)
    assert torch.allclose(block.fc1(y), F.linear(y, block.fc1.weight, block.fc1.bias), atol=1e-5)

    # Every parameter's gradient too, GRN's shift included (it reaches fc2 as part of its bias).
    upstream = torch.randn_like(expected)
    reference = torch.autograd.grad((expected * upstream).sum(), list(block.parameters()))
    (block(x) * upstream).sum().backward()
    for (name, parameter), wanted in zip(block.named_parameters(), reference, strict=True):
        assert torch.allclose(parameter.grad, wanted, rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("kernel", [(7, 7), (3, 7), (5, 5), (3, 3)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_wide_depthwise_conv_gradients_equal_conv2d(kernel: tuple[int, int], memory_format) -> None:
    """The window-assembled weight gradient of wide depthwise kernels equals autograd through conv2d."""
    torch.manual_seed(0)
    conv = WideDepthwiseConv2d(6, kernel)
    x = torch.randn(3, 6, 9, 11).contiguous(memory_format=memory_format)
    grad = torch.randn(3, 6, 9, 11)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outputs = [conv(inputs[0]), F.conv2d(inputs[1], conv.weight, padding=(kernel[0] // 2, kernel[1] // 2), groups=6)]
    assert torch.equal(outputs[0], outputs[1])
    assert (type(outputs[0].grad_fn).__name__ == "_WideDepthwiseConvBackward") == (kernel[1] > 3)
    (ours_x, ours_w), (expected_x, expected_w) = (
        torch.autograd.grad(out, (inp, conv.weight), grad) for out, inp in zip(outputs, inputs, strict=True))
    assert torch.allclose(ours_x, expected_x, atol=1e-5)
    assert torch.allclose(ours_w, expected_w, atol=1e-4, rtol=1e-5)


def test_wide_depthwise_conv_under_autocast_keeps_parameter_and_input_dtypes() -> None:
    conv = WideDepthwiseConv2d(4, (7, 7))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    reference = F.conv2d(x.detach(), conv.weight, padding=3, groups=4).square().sum()
    reference = torch.autograd.grad(reference, conv.weight)[0]
    assert torch.allclose(conv.weight.grad, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("shift", [True, False])
def test_grn_gradients_equal_those_of_the_specification_formula(shift: bool) -> None:
    """GRN's norm has a hand-written backward; its gradients must equal autograd's through the formula (without
    the shift beta where ChannelMixing adds it through fc2)."""
    torch.manual_seed(0)
    grn = GRN(12)
    torch.nn.init.normal_(grn.gamma)
    torch.nn.init.normal_(grn.beta)
    z = torch.randn(3, 5, 4, 12, dtype=torch.float64)
    grn = grn.double()
    upstream = torch.randn_like(z)

    ours = z.clone().requires_grad_()
    (grn(ours, shift=shift) * upstream).sum().backward()
    reference = z.clone().requires_grad_()
    g = torch.sqrt((reference ** 2).sum(dim=(1, 2), keepdim=True))
    formula = grn.gamma * (reference * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + reference
    if shift:
        formula = formula + grn.beta
    expected = torch.autograd.grad((formula * upstream).sum(), (reference, grn.gamma, grn.beta), allow_unused=True)
    assert torch.allclose(ours.grad, expected[0], atol=1e-10)
    assert torch.allclose(grn.gamma.grad, expected[1], atol=1e-10)
    if shift:
        assert torch.allclose(grn.beta.grad, expected[2], atol=1e-10)
    else:
        assert grn.beta.grad is None


@pytest.mark.parametrize("along", ["rows", "columns"])
def test_strip_projection_gradients_come_back_channels_last(along: str) -> None:
    """The blocks run channels-last; a gradient in another layout sends the BatchNorm and GELU backward passes
    before each projection onto slow paths (on the CPU the columns' BatchNorm backward took 10x longer)."""
    projection = StripProjection(groups=2, length=6, along=along)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    gelu = F.gelu(x)
    gradients = []
    gelu.register_hook(gradients.append)  # the gradient as GELU's backward receives it
    out = projection(gelu, torch.randn(6, 6, 8))
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(torch.randn_like(out))
    assert gradients[0].is_contiguous(memory_format=torch.channels_last)


def test_head_dropout_acts_in_training_only_and_adds_no_weights() -> None:
    torch.manual_seed(0)
    plain = StripMLPNet(img_size=32, num_classes=5, embed_dim=8, layers=(1, 1, 1, 1))
    dropped = StripMLPNet(img_size=32, num_classes=5, embed_dim=8, layers=(1, 1, 1, 1), drop_rate=0.5)
    dropped.load_state_dict(plain.state_dict())  # the same names: dropout has no weights
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(images), plain.eval()(images))
        dropped.train()
        assert not torch.equal(dropped.forward_head(torch.ones(4, 64, 1, 1), pre_logits=True), torch.ones(4, 64))


def autograd_ops(output: torch.Tensor) -> set[str]:
    """The names of the backward nodes that produced ``output``."""
    names, pending = set(), [output.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(("device", "fast"), [("cpu", True), ("meta", False)])
def test_the_cpu_fast_paths_run_on_the_cpu_only(device: str, fast: bool) -> None:
    """They were measured on the CPU only, so any other device (here the meta device) takes the plain computation:
    autograd through conv2d, F.linear and the GRN formula."""
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    tokens = torch.randn(2, 8, 8, 12, device=device, requires_grad=True)  # (N, H, W, C)
    weight = torch.randn(4, 1, 7, 7, device=device, requires_grad=True)
    gamma, beta = torch.randn(12, device=device), torch.randn(12, device=device)
    assert ("_WideDepthwiseConvBackward" in autograd_ops(layers.depthwise_same_conv(x, weight, (3, 3)))) == fast
    linear = layers.pointwise_linear(tokens, torch.randn(6, 12, device=device), torch.randn(6, device=device))
    assert ("ConvolutionBackward0" in autograd_ops(linear)) == fast
    assert ("_GRNBackward" in autograd_ops(layers.grn(tokens, gamma, beta))) == fast
