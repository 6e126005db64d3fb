"""Transfer: parameter groups in forward order, resampling to other input sizes, the feature API."""

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TinyRun, tiny_model
from timm.models import group_parameters

import main
from checkpoint import load_checkpoint_file
from config import ConfigError
from data import build_loader
from models import build_model, clean_state_dict
from models.resample import interpolation_matrix, resample_position_table, resample_projection
from models.strip_mlp import StripMLPNet, checkpoint_filter_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import resize_eval  # noqa: E402  (tools/ is a folder of scripts, not a package)
from model_cli import checkpoint_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------------------------------
# Resampling to another input size


def strip_weights(model: StripMLPNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if any(s in k for s in ("proj_", "relate_pos"))}


def resampled_model(source: StripMLPNet, img_size, **kwargs) -> tuple[StripMLPNet, list[str]]:
    notes = []
    target = tiny_model(img_size=img_size, **kwargs).eval()
    target.load_state_dict(checkpoint_filter_fn(source.state_dict(), target, log=notes.append))
    return target, notes


def test_resampling_to_the_same_size_is_the_identity() -> None:
    source = tiny_model()
    target, notes = resampled_model(source, 64)
    assert notes == []
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    block = source.blocks1[0].token_mixing.smlp_block
    weight, bias = block.proj_h.weight.detach(), block.proj_h.bias.detach()
    assert torch.allclose(resample_projection(weight, 16, 16), weight, atol=1e-6)
    assert torch.allclose(resample_projection(bias, 16, 16), bias, atol=1e-6)
    table = block.relate_pos_h.embeddings_table.detach()
    assert torch.allclose(resample_position_table(table, (16, 16), (16, 16)), table, atol=1e-7)


def test_resampled_tensors_are_named_with_both_shapes_and_nothing_else_changes() -> None:
    source = tiny_model()
    target, notes = resampled_model(source, 128)
    assert len(notes) == 6 * 5  # proj_h/proj_w weight and bias, two tables, in each of the 5 blocks
    assert "resampled blocks1.0.token_mixing.smlp_block.proj_h.weight (80, 16, 1, 3) -> (160, 32, 1, 3)" in notes
    assert "resampled blocks4.0.token_mixing.smlp_block.relate_pos_w.embeddings_table (5, 160) -> (9, 160)" in notes
    strip = strip_weights(source)
    for name, tensor in source.state_dict().items():
        if name not in strip:
            assert torch.equal(target.state_dict()[name], tensor), name


def test_grow_then_shrink_returns_the_weights_and_logits() -> None:
    source = tiny_model().eval()
    grown, _ = resampled_model(source, 128)
    back, _ = resampled_model(grown, 64)
    for name, tensor in strip_weights(source).items():
        assert torch.allclose(back.state_dict()[name], tensor, atol=1e-6), name
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(back(images), source(images), atol=1e-4)


def test_shrink_then_grow_stays_close_for_smooth_weights() -> None:
    """Shrinking loses what varies faster than the smaller grid holds, so the way back is close only for mixing
    matrices that vary smoothly over token positions, as trained ones do; a kernel of the relative offset is."""
    length, groups, taps = 32, 2, 3
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # (L_out, L_in)
    smooth = torch.stack([torch.exp(-(offsets / (4.0 + g)) ** 2) for g in range(groups)])  # (G, L, L)
    weight = smooth[..., None, None].expand(-1, -1, -1, 1, taps).reshape(groups * length, length, 1, taps)
    back = resample_projection(resample_projection(weight, length, 16), 16, length)
    assert ((back - weight).norm() / weight.norm()).item() < 0.05


@pytest.mark.parametrize("target", [24, 40, 48])
def test_grown_projection_maps_an_interpolated_input_to_the_interpolated_output(target: int) -> None:
    """proj_h on L tokens vs its resampling to L' tokens, applied to the input linearly interpolated along the
    strip: exactly the interpolated output (the layer computes the same function of a resized input)."""
    length, groups = 16, 3
    layer = torch.nn.Conv2d(groups * length, groups * length, (1, 3), padding=(0, 1), groups=groups)
    layer.requires_grad_(False)
    tokens = torch.randn(2, groups, length, 5, 4)  # (N, G, L tokens, P, rows)
    grow = interpolation_matrix(length, target)  # (L', L)
    output = layer(tokens.reshape(2, groups * length, 5, 4)).reshape(2, groups, length, 5, 4)
    weight, bias = resample_projection(layer.weight, length, target), resample_projection(layer.bias, length, target)
    grown_tokens = torch.einsum("tl,nglpr->ngtpr", grow.float(), tokens)
    grown_output = F.conv2d(grown_tokens.reshape(2, groups * target, 5, 4), weight, bias, padding=(0, 1),
                            groups=groups).reshape(2, groups, target, 5, 4)
    expected = torch.einsum("tl,nglpr->ngtpr", grow.float(), output)
    assert torch.allclose(grown_output, expected, atol=1e-4)
    # A kernel constant over token positions keeps its value scaled by L / L': each output sums L' inputs, not L.
    constant = resample_projection(torch.ones(groups * length, length, 1, 3), length, target)
    assert torch.allclose(constant, torch.full_like(constant, length / target), atol=1e-6)


def test_position_table_keeps_its_values_over_the_same_relative_offsets() -> None:
    table = torch.linspace(-1, 1, 2 * 16 + 1)[:, None].repeat(1, 4)  # linear in the offset -16..16
    grown = resample_position_table(table, (16, 16), (32, 32))
    assert grown.shape == (65, 4)
    assert torch.allclose(grown, torch.linspace(-1, 1, 65)[:, None].repeat(1, 4), atol=1e-6)
    wide = resample_position_table(table, (16, 16), (16, 32))  # offsets -16..32: rows unchanged, columns stretched
    assert wide.shape == (49, 4)
    assert torch.allclose(wide[:17], table[:17]) and torch.allclose(wide[16::2], table[16:], atol=1e-6)


def test_weights_of_another_width_are_reported_not_resampled() -> None:
    source = StripMLPNet(img_size=32, num_classes=10, embed_dim=80, layers=(1, 1, 2, 1))
    with pytest.raises(ValueError, match="mismatches"):
        tiny_model().load_state_dict(checkpoint_filter_fn(source.state_dict(), tiny_model()))


# ---------------------------------------------------------------------------------------------------------------
# Non-square inputs


def test_non_square_model_runs_and_sizes_its_strips_and_tables() -> None:
    model = tiny_model(img_size=(64, 96)).eval()
    block = model.blocks1[0].token_mixing.smlp_block  # 16 x 24 tokens
    assert block.proj_h.weight.shape == (block.chunk_channels * 24, 24, 1, 3)
    assert block.proj_w.weight.shape == (block.chunk_channels * 16, 16, 1, 3)
    assert block.relate_pos_h.embeddings_table.shape == (16 + 24 + 1, 20)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"built for 64x96"):
        model(torch.randn(2, 3, 96, 64))


def test_non_square_cgsmm_follows_the_specification() -> None:
    """The CGSMM against the specification's sums written out: proj_h mixes the W tokens of a row (with the rows
    above and below), proj_w the H tokens of a column, position terms indexed by column minus row."""
    torch.manual_seed(0)
    block = tiny_model(img_size=(64, 96)).blocks1[0].token_mixing.smlp_block.eval()
    x = torch.randn(1, 20, 16, 24)  # C = 20 channels of the branch, H = 16, W = 24
    g = block.chunk_channels
    rows_i, cols_j = torch.arange(16)[:, None], torch.arange(24)[None, :]
    pos_h = block.relate_pos_h.embeddings_table[cols_j - rows_i + 16].permute(2, 0, 1)  # (C, H, W)
    pos_w = block.relate_pos_w.embeddings_table[cols_j - rows_i + 16].permute(2, 0, 1)

    def strip(conv: torch.nn.Conv2d, a: torch.Tensor) -> torch.Tensor:  # a (C, A, B): mixes B, taps along A
        length = a.shape[2]
        kernel = conv.weight.reshape(g, length, length, 3)  # (G, B_out, B_in, taps)
        padded = F.pad(a, (0, 0, 1, 1))
        out = torch.zeros_like(a)
        for c in range(a.shape[0]):
            gi = c % g
            for t in range(3):
                out[c] += padded[c, t:t + a.shape[1]] @ kernel[gi, :, :, t].T
            out[c] += conv.bias.reshape(g, length)[gi]
        return out

    with torch.no_grad():
        y = strip(block.proj_h, x[0] + pos_h)  # rows: (C, H, W), mixing W
        b = block.act(block.BN(block.fuse_h(torch.cat([y[None], x], dim=1))))[0] + pos_w
        z = strip(block.proj_w, b.transpose(1, 2)).transpose(1, 2)  # columns: mixing H
        expected = block.fuse_w(torch.cat([x, z[None]], dim=1))
        assert torch.allclose(block.cgsmm(x), expected, atol=1e-4)


def test_square_weights_load_into_a_non_square_model() -> None:
    target, notes = resampled_model(tiny_model(), (64, 128))
    assert any("proj_h.weight (80, 16, 1, 3) -> (160, 32, 1, 3)" in note for note in notes)
    assert not any("proj_w.weight" in note and "blocks1" in note for note in notes)  # H stays 16 tokens
    with torch.no_grad():
        assert target(torch.randn(1, 3, 64, 128)).shape == (1, 10)


def test_timm_loads_a_checkpoint_file_at_another_size(tmp_path: Path) -> None:
    source = timm.create_model("strip_mlp_tiny_light", num_classes=10, img_size=64)
    torch.save({"model": source.state_dict()}, tmp_path / "weights.pth")
    model = timm.create_model("strip_mlp_tiny_light", num_classes=10, img_size=(96, 128), pretrained=True,
                              pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")})
    assert model.img_size == (96, 128)
    assert torch.equal(model.patch_embed.weight, source.patch_embed.weight)
    assert model.blocks1[0].token_mixing.smlp_block.proj_h.weight.shape[1] == 32


def test_a_detection_backbone_from_a_classification_checkpoint_of_another_size(tmp_path: Path) -> None:
    """docs/transfer.md's recipe, small: a 1000-class checkpoint file into a features_only backbone of another size."""
    source = timm.create_model("strip_mlp_tiny", img_size=64, **SMALL)
    torch.save({"model": source.state_dict()}, tmp_path / "weights.pth")
    overlay = {"file": str(tmp_path / "weights.pth")}
    backbone = timm.create_model("strip_mlp_tiny", features_only=True, img_size=(64, 96), pretrained=True,
                                 pretrained_cfg_overlay=overlay, **SMALL)
    assert torch.equal(backbone.model.patch_embed.weight, source.patch_embed.weight)
    assert [tuple(f.shape[-2:]) for f in backbone(torch.randn(1, 3, 64, 96))] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    pooled = timm.create_model("strip_mlp_tiny", num_classes=0, img_size=96, pretrained=True,
                               pretrained_cfg_overlay=overlay, **SMALL)
    assert pooled(torch.randn(1, 3, 96, 96)).shape == (1, 128)


# ---------------------------------------------------------------------------------------------------------------
# A backbone for dense prediction

SMALL = {"embed_dim": 16, "layers": (1, 1, 1, 1)}  # a registered variant made small, as a user may


def test_features_only_gives_four_stages_with_their_feature_info() -> None:
    backbone = timm.create_model("strip_mlp_tiny", features_only=True, out_indices=(0, 1, 2, 3), img_size=(64, 96),
                                 **SMALL)
    assert backbone.feature_info.channels() == [16, 32, 64, 128]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    features = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]


def test_features_only_with_fewer_stages_prunes_the_rest() -> None:
    backbone = timm.create_model("strip_mlp_tiny", features_only=True, out_indices=(1, 2), img_size=64, **SMALL)
    assert backbone.feature_info.channels() == [32, 64]
    names = {name.split(".")[1] for name, _ in backbone.named_parameters()}
    assert not names & {"blocks4", "merging3", "conv_s1_14", "conv_s2_14", "norm", "head"}
    features = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 32, 8, 8), (1, 64, 4, 4)]


def test_forward_intermediates_match_the_classifier_path() -> None:
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images)
        assert torch.allclose(final, model.forward_features(images))
        shapes = [(2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2)]
        assert [tuple(f.shape) for f in intermediates] == shapes
        normed = model.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
        assert len(normed) == 1 and torch.allclose(normed[0], final)
        early = model.forward_intermediates(images, indices=[0, -3], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, intermediates[:2], strict=True))


def test_a_feature_pyramid_consumes_the_maps_and_gradients_reach_the_stem() -> None:
    from torchvision.ops import FeaturePyramidNetwork

    backbone = timm.create_model("strip_mlp_tiny", features_only=True, img_size=(64, 96), drop_path_rate=0.0, **SMALL)
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=32)
    maps = fpn({f"p{i}": f for i, f in enumerate(backbone(torch.randn(2, 3, 64, 96)))})
    assert [tuple(m.shape) for m in maps.values()] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    sum(m.square().mean() for m in maps.values()).backward()
    stem = backbone.model.patch_embed.weight.grad
    assert stem is not None and stem.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# tools/resize_eval.py


def test_resize_eval_resampled_column_is_what_eval_at_that_size_gives(tiny_run: TinyRun, tmp_path: Path,
                                                                      capsys) -> None:
    assert resize_eval.main(["--checkpoint", str(tiny_run.checkpoint), "--sizes", "64", "[32, 64]"]) == 0
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    table = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}
    assert list(table) == ["32x32", "64x64", "32x64"]
    assert table["32x32"][0] == "1" and table["32x32"][1] == table["32x32"][2]  # nothing to resample or re-initialise
    assert table["64x64"][0] == "2" and table["32x64"][0] == "1 x 2"
    assert main.main(["--cfg", str(tiny_run.run / "config.yaml"), "--eval", "--resume", str(tiny_run.checkpoint),
                      "--output", str(tmp_path / "eval"), "--tag", "eval", "--opts", "DATA.IMG_SIZE", "64"]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if " * Acc@1 " in line][-1]
    acc1 = float(summary.split(" * Acc@1 ")[1].split()[0])  # 66.667 is printed 66.67 in the table
    assert f"{acc1:.2f}" == table["64x64"][1]


def test_resize_eval_refuses_a_bad_size(tiny_run: TinyRun) -> None:
    with pytest.raises(ConfigError, match=re.escape("DATA.IMG_SIZE must be one side or [height, width], positive")):
        resize_eval.main(["--checkpoint", str(tiny_run.checkpoint), "--sizes", "48"])


@pytest.mark.slow
def test_a_trained_model_resampled_tracks_its_logits_on_upsampled_images(tmp_path: Path) -> None:
    """A small model trained on the demo digits at 64 px (3 epochs, about 94% top-1), its logits on the validation
    images against those of its resampling to 96 px on the same images upsampled 1.5x. Measured: the resampled
    model's top-1 agrees on 60% of the images (the re-initialised alternative's on 49%), mean cosine similarity of
    the logits 0.67 (0.54). The rest of the network (stem, depthwise and strided convolutions) sees digits 1.5x as
    large as in training, so agreement is far from total; docs/transfer.md's table shows what the demo model keeps."""
    config = REPO / "configs" / "demo" / "strip_mlp_demo.yaml"
    assert main.main(["--cfg", str(config), "--output", str(tmp_path), "--tag", "run", "--opts", "DATA.DATA_PATH",
                      str(tmp_path / "digits"), "DATA.IMG_SIZE", "64", "TRAIN.EPOCHS", "3",
                      "MODEL.STRIP_MLP.EMBED_DIM", "16"]) == 0
    checkpoint = load_checkpoint_file(tmp_path / "strip_mlp_demo" / "run" / "latest.pth")
    trained = checkpoint_config(checkpoint, "latest.pth")
    source = build_model(trained).eval()
    source.load_state_dict(clean_state_dict(checkpoint))
    images = torch.cat([batch.image for batch in build_loader(trained, 0, 1, train=False).loader_val])
    upsampled = F.interpolate(images, size=96, mode="bilinear", align_corners=False)
    agreement, cosine = {}, {}
    with torch.no_grad():
        reference = source(images)
        for method in ("resampled", "re-initialised"):
            torch.manual_seed(0)
            model = build_model(checkpoint_config(checkpoint, "latest.pth", opts=["DATA.IMG_SIZE", "96"])).eval()
            model.load_state_dict(resize_eval.fitted_weights(clean_state_dict(checkpoint), model, method))
            logits = model(upsampled)
            agreement[method] = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
            cosine[method] = F.cosine_similarity(logits, reference, dim=1).mean().item()
    assert agreement["resampled"] >= 0.55 and cosine["resampled"] >= 0.6
    assert agreement["resampled"] >= agreement["re-initialised"] + 0.05
    assert cosine["resampled"] >= cosine["re-initialised"] + 0.05


def test_the_384_fine_tuning_config_takes_224_weights(tmp_path: Path) -> None:
    from config import load_config

    config = load_config(str(REPO / "configs" / "finetune" / "imagenet1k_384" / "strip_mlp_tiny_light.yaml"))
    assert config.DATA.IMG_SIZE == 384 and config.MODEL.PRETRAINED
    source = timm.create_model("strip_mlp_tiny_light", img_size=224)
    notes = []
    model = build_model(config)
    model.load_state_dict(checkpoint_filter_fn({"model": source.state_dict()}, model, log=notes.append))
    assert len(notes) == 6 * 12  # every block's strip projections and position tables
    assert "resampled blocks4.1.token_mixing.smlp_block.proj_w.weight (1120, 7, 1, 3) -> (1920, 12, 1, 3)" in notes
