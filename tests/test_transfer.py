"""Transfer: parameter groups in forward order, resampling to other input sizes, the feature API."""

from timm.models import group_parameters

from models.strip_mlp import StripMLPNet


def tiny_model(**kwargs) -> StripMLPNet:
    return StripMLPNet(**{"img_size": 64, "num_classes": 10, "embed_dim": 40, "layers": (1, 1, 2, 1), **kwargs})


def modules_of(names: list[str]) -> set[str]:
    """'blocks3.1.token_mixing...' -> 'blocks3.1', 'merging2.weight' -> 'merging2'."""
    return {".".join(name.split(".")[:2]) if name.startswith("blocks") else name.split(".")[0] for name in names}


def test_group_matcher_orders_stem_blocks_feeders_then_head() -> None:
    model = tiny_model()
    coarse = [modules_of(names) for names in group_parameters(model, model.group_matcher(coarse=True)).values()]
    assert coarse == [
        {"patch_embed"}, {"blocks1.0"}, {"blocks2.0", "merging1"}, {"blocks3.0", "blocks3.1", "merging2", "conv_s1_28"},
        {"blocks4.0", "merging3", "conv_s1_14", "conv_s2_14"}, {"norm", "head"}]
    fine = [modules_of(names) for names in group_parameters(model, model.group_matcher()).values()]
    assert fine == [
        {"patch_embed"}, {"blocks1.0"}, {"blocks2.0", "merging1"}, {"blocks3.0", "merging2", "conv_s1_28"},
        {"blocks3.1"}, {"blocks4.0", "merging3", "conv_s1_14", "conv_s2_14"}, {"norm", "head"}]
    grouped = [name for names in group_parameters(model, model.group_matcher()).values() for name in names]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())
