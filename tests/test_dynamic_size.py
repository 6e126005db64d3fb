"""Any input size at run time: `dynamic_img_size`, `dynamic_img_pad` and `set_input_size`, against models built for
each size from resampled weights."""

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_timm_contract import traced

from compat import model_input_config
from models import StripMLPNet, checkpoint_filter_fn
from models.resample import resample_to_model


def built_for(model: StripMLPNet, img_size: tuple[int, int]) -> StripMLPNet:
    """A fixed tiny model of ``img_size`` holding ``model``'s weights, resampled as a checkpoint of another size is."""
    target = tiny_model(img_size=img_size, drop_path_rate=0.0).eval()
    target.load_state_dict(checkpoint_filter_fn(model.state_dict(), target, log=lambda _: None))
    return target


@pytest.fixture(scope="module")
def dynamic() -> StripMLPNet:
    torch.manual_seed(0)
    return tiny_model(dynamic_img_size=True, drop_path_rate=0.0).eval()


def test_at_the_built_size_a_dynamic_model_is_the_fixed_one(dynamic: StripMLPNet) -> None:
    fixed = tiny_model(drop_path_rate=0.0).eval()
    fixed.load_state_dict(dynamic.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dynamic(images), fixed(images))


@pytest.mark.parametrize("size", [(96, 96), (32, 32), (64, 128), (96, 32)])
def test_at_another_size_it_is_the_model_built_there_from_resampled_weights(dynamic: StripMLPNet, size) -> None:
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = built_for(dynamic, size)(images)
        assert torch.allclose(dynamic(images), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        features = dynamic.forward_intermediates(images, intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in features] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


def test_gradients_reach_the_built_weights_through_the_resampling() -> None:
    """The built weights get the gradient of the model built at the input's size, carried back through the
    resampling: a detector trained on batches of changing sizes trains one set of weights."""
    torch.manual_seed(0)
    model = tiny_model(dynamic_img_size=True, drop_path_rate=0.0).train()
    images = torch.randn(2, 3, 96, 64)
    model(images).logsumexp(dim=1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []

    target = built_for(model, (96, 64)).train()
    weights = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    resampled, _ = resample_to_model(weights, target.state_dict())  # differentiable in the built weights
    output = torch.func.functional_call(target, {**dict(target.named_buffers()), **resampled}, (images,))
    output.logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        expected = weights[name].grad
        assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item()), name


def test_without_gradients_resampled_weights_are_cached_until_the_weights_change() -> None:
    torch.manual_seed(0)
    model = tiny_model(dynamic_img_size=True).eval()
    block = model.blocks1[0].token_mixing.smlp_block
    images = torch.randn(1, 3, 96, 96)  # stage 1 at 24 x 24 tokens
    with torch.no_grad():
        logits = model(images)
        weight, bias = block.proj_h.resampled(24)
        position = block.relate_pos_h.resampled(24, 24)
        assert block.proj_h.resampled(24)[0] is weight and block.relate_pos_h.resampled(24, 24) is position
        assert torch.equal(model(images), logits)
    recomputed = block.proj_h.resampled(24)[0]  # with gradients: part of the graph, never from the cache
    assert recomputed.requires_grad and recomputed is not weight and torch.equal(recomputed, weight)

    with torch.no_grad():
        block.proj_h.weight.mul_(2)  # an in-place update, as an optimiser step makes
        assert torch.allclose(block.proj_h.resampled(24)[0], 2 * weight)
        block.relate_pos_h.embeddings_table.add_(1)
        assert torch.allclose(block.relate_pos_h.resampled(24, 24), position + 1)
        other = tiny_model(dynamic_img_size=True).eval()
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(images), other(images))
        model.double()
        assert model(images.double()).dtype == torch.float64
        assert block.proj_h.resampled(24)[0].dtype == torch.float64


def test_padding_makes_any_size_the_next_multiple_of_32() -> None:
    torch.manual_seed(0)
    model = tiny_model(dynamic_img_size=True, dynamic_img_pad=True).eval()
    images = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        assert torch.equal(model(images), model(F.pad(images, (0, 14, 0, 26))))  # as 96 x 64
        assert model.forward_features(images).shape[-2:] == (3, 2)
        fixed = tiny_model(dynamic_img_pad=True).eval()  # pads, then takes its one size only
        fixed.load_state_dict(model.state_dict())
        assert torch.equal(fixed(images[..., :40, :50]), fixed(F.pad(images[..., :40, :50], (0, 14, 0, 24))))
    with pytest.raises(ValueError, match=r"input of size \(96, 64\) but the model was built for 64x64"):
        fixed(images)


def test_sizes_a_model_cannot_take_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"input of size \(70, 64\) is not a multiple of 32 in each side .* "
                                         r"build the model with dynamic_img_pad=True$"):
        tiny_model(dynamic_img_size=True)(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"build the model with img_size=\(96, 96\) or dynamic_img_size=True"):
        tiny_model()(torch.randn(1, 3, 96, 96))


def test_set_input_size_resamples_in_place_as_a_checkpoint_is_resampled() -> None:
    torch.manual_seed(0)
    model = tiny_model(drop_path_rate=0.0).eval()
    expected = built_for(model, (96, 128))
    model.set_input_size((96, 128))
    assert model.img_size == (96, 128)
    assert model.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(t, expected.state_dict()[name]) for name, t in model.state_dict().items())
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(model(images), expected(images))
    with pytest.raises(ValueError, match=r"but the model was built for 96x128"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"img_size 100 must be a positive multiple of 32"):
        model.set_input_size(100)


def test_set_input_size_updates_what_timm_reads() -> None:
    model = timm.create_model("strip_mlp_tiny_light", embed_dim=16, layers=(1, 1, 1, 1), num_classes=5, img_size=64)
    model.set_input_size(96)
    assert model.pretrained_cfg["input_size"] == (3, 96, 96) and model.pretrained_cfg["pool_size"] == (3, 3)
    assert model_input_config(model)["input_size"] == (3, 96, 96)
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 96, 96)
    assert all(p.requires_grad for p in model.parameters())


def test_a_features_only_backbone_takes_batches_of_changing_size() -> None:
    backbone = timm.create_model("strip_mlp_tiny_light", features_only=True, img_size=64, dynamic_img_size=True,
                                 embed_dim=16, layers=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        for size in ((64, 96), (128, 64), (64, 64)):
            maps = backbone(torch.randn(1, 3, *size))
            assert [tuple(m.shape[-2:]) for m in maps] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


def test_a_traced_dynamic_model_takes_other_sizes(dynamic: StripMLPNet) -> None:
    graph = traced(dynamic)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(next(iter(graph(images).values())), dynamic(images))


@pytest.mark.slow  # trains each model a few steps
def test_the_cost_tool_times_a_dynamic_model_against_a_built_one(capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # a folder of scripts, not a package
    from dynamic_size_cost import compare, parse_args

    rows = compare(parse_args(["--built", "64", "--size", "96", "--batch-size", "1", "--repeats", "1",
                               "--model-kwargs", "{'embed_dim': 16, 'layers': (1, 1, 1, 1), 'num_classes': 5}"]))
    assert [name for name, *_ in rows] == ["evaluation, first call at the new size", "evaluation, later calls (cached)",
                                           "training step (resampled at every step)"]
    assert all(built > 0 and dynamic > 0 for _, built, dynamic in rows)
    header = "| strip_mlp_tiny, batch 1, 96 px | built for 96 | dynamic, built for 64 | ratio |"
    assert header in capsys.readouterr().out
