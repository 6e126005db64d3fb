"""The model as timm's own tests expect every timm model to behave, each point stated in our words: a configuration
that describes the model as built, the head's width and pooling, torch.fx tracing and TorchScript."""

import pytest
import timm
import torch
from conftest import tiny_model
from timm.layers import get_notrace_functions, get_notrace_modules, set_scriptable
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models  # noqa: F401  (registers the variants)
from compat import model_input_config
from models.layers import RelativePosition, StripProjection

pytestmark = pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")

SMALL = {"embed_dim": 16, "layers": (1, 1, 1, 1), "num_classes": 5, "img_size": 64}
TRACER = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
          "param_shapes_constant": True}


def traced(model: torch.nn.Module) -> torch.nn.Module:
    """The model through torchvision's fx feature extractor, returning its output node, as timm's tests trace."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TRACER)


def test_configuration_describes_the_model_as_built() -> None:
    """A model built for one size says so (timm then feeds it that size); a dynamic one says it takes others."""
    fixed = timm.create_model("strip_mlp_tiny_light", img_size=(64, 96), num_classes=3)
    assert fixed.pretrained_cfg["input_size"] == (3, 64, 96) and fixed.pretrained_cfg["pool_size"] == (2, 3)
    assert fixed.pretrained_cfg["fixed_input_size"] and model_input_config(fixed)["fixed_input_size"]
    assert timm.data.resolve_data_config(model=fixed)["input_size"] == (3, 64, 96)
    dynamic = timm.create_model("strip_mlp_tiny_light", img_size=64, num_classes=3, dynamic_img_size=True)
    assert not dynamic.pretrained_cfg["fixed_input_size"] and not model_input_config(dynamic)["fixed_input_size"]
    assert timm.create_model("strip_mlp_tiny").pretrained_cfg["input_size"] == (3, 224, 224)


def test_head_hidden_size_is_the_width_of_pre_logits() -> None:
    model = timm.create_model("strip_mlp_tiny_light", **SMALL).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
    assert model.head_hidden_size == model.num_features == pre_logits.shape[1] == 128
    model.prune_intermediate_layers(indices=(0, 1))
    assert model.head_hidden_size == model.num_features == 32


def test_no_pooling_returns_the_final_maps_from_constructor_reset_and_head() -> None:
    model = timm.create_model("strip_mlp_tiny_light", **SMALL).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images)  # (2, 128, 2, 2)
        assert model.forward_head(features, pre_logits=True).shape == (2, 128)
        model.reset_classifier(0)
        assert model(images).shape == (2, 128)
        model.reset_classifier(0, "")
        assert torch.equal(model(images), features)
        unpooled = timm.create_model("strip_mlp_tiny_light", **{**SMALL, "num_classes": 0}, global_pool="").eval()
        unpooled.load_state_dict(model.state_dict())
        assert torch.equal(unpooled(images), features)
        assert torch.equal(unpooled.forward_head(features, pre_logits=True), features)
    model.reset_classifier(4, "avg")
    assert model.global_pool == "avg" and model.head.out_features == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"global_pool": "max"}, r"global_pool 'max' is not supported; use 'avg'"),
    ({"global_pool": ""}, r"global_pool '' \(no pooling\) returns feature maps, which a classifier of 5 classes"),
])
def test_a_pooling_the_head_cannot_follow_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model(num_classes=5, **kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_model(num_classes=5).reset_classifier(5, kwargs["global_pool"])


def test_fx_tracing_gives_the_eager_outputs_and_gradients() -> None:
    """torch.fx traces the network through; the strip projections and position terms stay whole (their weights
    depend on the input's size at run time), as do the functions with Python control flow on sizes or devices."""
    assert {StripProjection, RelativePosition} <= set(get_notrace_modules())
    model = timm.create_model("strip_mlp_tiny_light", **SMALL).eval()
    images = torch.randn(2, 3, 64, 64)
    graph = traced(model)
    with torch.no_grad():
        assert torch.equal(next(iter(graph(images).values())), model(images))
    with pytest.raises(ValueError, match=r"input of size \(96, 96\) but the model was built for 64x64"):
        graph(torch.randn(1, 3, 96, 96))  # the size check is a call in the graph, not lost to tracing

    torch.manual_seed(0)
    trained = timm.create_model("strip_mlp_tiny_light", **SMALL, drop_path_rate=0.0).train()
    graph = traced(trained).train()
    next(iter(graph(images).values())).logsumexp(dim=1).sum().backward()
    missing = [name for name, p in graph.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_gives_the_eager_outputs() -> None:
    with set_scriptable(True):
        model = timm.create_model("strip_mlp_tiny_light", **SMALL).eval()
    images = torch.randn(2, 3, 64, 64)
    scripted, scripted_graph = torch.jit.script(model), torch.jit.script(traced(model))
    with torch.no_grad():
        expected = model(images)
        assert torch.allclose(scripted(images), expected, rtol=0, atol=1e-6)
        assert torch.allclose(next(iter(scripted_graph(images).values())), expected, rtol=0, atol=1e-6)
    scripted.train()
    scripted(images).sum().backward()  # the scripted model trains too (through the plain backward passes)
    assert model.blocks1[0].channel_mixing.grn.gamma.grad is not None


@pytest.mark.slow  # compiles twice
def test_compile_finds_no_graph_break_in_evaluation_or_training() -> None:
    images = torch.randn(2, 3, 64, 64)
    for model in (tiny_model().eval(), tiny_model().train()):
        explanation = torch._dynamo.explain(model)(images)
        assert explanation.graph_break_count == 0, explanation.break_reasons
