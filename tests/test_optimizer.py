"""Parameter groups and optimiser choice."""

from pathlib import Path

import pytest
import torch
from yacs.config import CfgNode

from config import ConfigError, default_config, load_config
from models import StripMLPNet
from optimizer import build_optimizer

DEMO_CFG = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "strip_mlp_demo.yaml")


def config_with(*opts) -> CfgNode:
    config = default_config()
    config.merge_from_list(list(opts))
    return config


@pytest.fixture(scope="module")
def model() -> StripMLPNet:
    return StripMLPNet(img_size=32, num_classes=10, embed_dim=8, layers=(1, 1, 1, 1))


def test_no_weight_decay_on_1d_bias_and_position_tables(model: StripMLPNet) -> None:
    optimizer = build_optimizer(config_with("TRAIN.WEIGHT_DECAY", 0.05), model, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decayed_names | plain_names == set(names.values())
    assert all(model.get_parameter(n).ndim > 1 and not n.endswith(".bias") and "embeddings_table" not in n
               for n in decayed_names)
    tables = {n for n in names.values() if "embeddings_table" in n}
    assert tables and tables <= plain_names  # 2-D, yet never decayed
    assert "head.bias" in plain_names and "head.weight" in decayed_names


def test_adamw_and_nesterov_sgd(model: StripMLPNet) -> None:
    adamw = build_optimizer(config_with("TRAIN.OPTIMIZER.EPS", 1e-6, "TRAIN.OPTIMIZER.BETAS", (0.8, 0.9)), model, 2e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["eps"] == 1e-6 and adamw.defaults["betas"] == (0.8, 0.9) and adamw.defaults["lr"] == 2e-3
    sgd = build_optimizer(config_with("TRAIN.OPTIMIZER.NAME", "sgd", "TRAIN.OPTIMIZER.MOMENTUM", 0.8), model, 0.1)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8


def test_unknown_optimizer_lists_valid_ones() -> None:
    """The config refuses it where TRAIN.OPTIMIZER.NAME is declared; build_optimizer never sees it."""
    with pytest.raises(ConfigError, match="TRAIN.OPTIMIZER.NAME 'lamb' is not supported; choose one of: adamw, sgd"):
        load_config(DEMO_CFG, ["TRAIN.OPTIMIZER.NAME", "lamb"])


def test_adamw_is_fused_exactly_when_the_parameters_are_on_cuda(model: StripMLPNet) -> None:
    assert build_optimizer(config_with(), model, 1e-3).defaults["fused"] is None  # CPU: the default kernels
    if torch.cuda.is_available():
        cuda_model = StripMLPNet(img_size=32, num_classes=10, embed_dim=8, layers=(1, 1, 1, 1)).cuda()
        assert build_optimizer(config_with(), cuda_model, 1e-3).defaults["fused"] is True
