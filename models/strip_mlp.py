"""Strip-MLP: Efficient Token Interaction for Vision MLP (Cao et al., ICCV 2023).

The network of `shared/spec/ARCHITECTURE.md`, built bottom-up: small layers, the strip mixing
block with its CGSMM (cross-strip) and LSMM (local strip) branches, token and channel mixing, the
block, the network, weight loading, then the four released variants.

Parameter and buffer names are the release's, so its checkpoints load with `strict=True`. The
release's model defects are fixed here: drop path follows the configuration (rate and schedule),
channels_last inputs work, relative-position indices are built once on the model's device, the
GRN is sized alpha x D, and the model runs on CPU as well as CUDA. Faster stand-ins for standard
layers (with the same parameter names) and the activation-checkpointing helper are in `layers.py`.
"""

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from compat import record_input_size

from .layers import GRN, PointwiseLinear, RelativePosition, StripProjection, WideDepthwiseConv2d, checkpointed
from .resample import resample_to_model

_logger = logging.getLogger(__name__)  # for weights loaded through timm, which passes no logger

DROP_PATH_SCHEDULES = ("uniform", "linear")
GLOBAL_POOLS = ("avg", "")  # the mean over H and W, or none (the head then takes the (N, C, H, W) maps)
STRIDE = 32  # the stem's 4 and three 2x downsamplings: an input side must be a multiple of it

# The layers that feed each stage (numbered 1-4 as the release's blocks1..blocks4): its merging convolution and the
# skip convolutions whose outputs are added to its input.
STAGE_INPUTS = {2: ("merging1",), 3: ("merging2", "conv_s1_28"), 4: ("merging3", "conv_s1_14", "conv_s2_14")}


def strip_chunks(channels: int) -> int:
    """Number of chunks P that the CGSMM splits its D/2 channels into (the release's rule)."""
    return 2 if channels % 80 == 0 else 4


class NormActConv(nn.Module):
    """BatchNorm, GELU, then a bias-free depthwise 3x3 convolution (the release's BN_Activ_Conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.BN = nn.BatchNorm2d(channels)
        self.act = nn.GELU()
        self.Conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv(self.act(self.BN(x)))


class DepthwiseConv(nn.Module):
    """Wrapper that keeps the release's `dwsc.conv_merge` parameter path."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_merge = NormActConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_merge(x)


class StripMixingBlock(nn.Module):
    """The strip mixing block (`smlp_block`): a 1x1 conv MLP, then half of the channels through
    the CGSMM branch and half through the LSMM branch, fused by a 1x1 convolution.

    Both branches keep their parameters directly on this module because the release's
    checkpoints name them so (`smlp_block.proj_h`, `smlp_block.fc_h`, ...).
    """

    def __init__(self, channels: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        half = channels // 2
        height, width = resolution
        self.chunk_channels = g = half // strip_chunks(channels)  # G in the specification

        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.GELU())

        # CGSMM: grouped convolutions mixing whole rows (proj_h, W tokens) and columns (proj_w, H tokens).
        self.relate_pos_h = RelativePosition(half, height, width)
        self.proj_h = StripProjection(g, width, along="rows")
        self.fuse_h = nn.Conv2d(channels, half, 1, bias=False)
        self.BN = nn.BatchNorm2d(half)
        self.act = nn.GELU()
        self.relate_pos_w = RelativePosition(half, height, width)
        self.proj_w = StripProjection(g, height, along="columns")
        self.fuse_w = nn.Conv2d(channels, half, 1, bias=False)

        # LSMM: local strips of 7x3 and 3x7, reweighted per channel by a squeeze-excite style MLP.
        self.fc_w = nn.Conv2d(half, half, (7, 3), padding=(3, 1), groups=half, bias=False)
        self.fc_h = WideDepthwiseConv2d(half, (3, 7))
        self.reweight = Mlp(half, half // 2, half * 3, use_conv=True)

        self.fuse = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x_cgsmm, x_lsmm = x.chunk(2, dim=1)  # 2 x (N, D/2, H, W)
        return self.fuse(torch.cat([self.cgsmm(x_cgsmm), self.lsmm(x_lsmm)], dim=1))

    def cgsmm(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-wise group strip mixing: every token mixes with its whole row, then its whole
        column, with the neighbouring rows (columns) contributing through 3-tap kernels."""
        rows = self.proj_h(x, self.relate_pos_h(x))  # row mixing of x + pos_h
        cols = self.act(self.BN(self.fuse_h(torch.cat([rows, x], dim=1))))  # fuse with x
        cols = self.proj_w(cols, self.relate_pos_w(x))  # column mixing of that + pos_w
        return self.fuse_w(torch.cat([x, cols], dim=1))  # fuse with x

    def set_resolution(self, height: int, width: int) -> None:
        """Resample the strip projections and position tables in place for an H x W map."""
        self.proj_h.set_length(width)
        self.proj_w.set_length(height)
        self.relate_pos_h.set_grid(height, width)
        self.relate_pos_w.set_grid(height, width)

    def lsmm(self, x: torch.Tensor) -> torch.Tensor:
        """Local strip mixing: a 7x3 and a 3x7 depthwise strip, and the identity, blended with
        per-channel softmax weights computed from their pooled sum."""
        n, c, h, w = x.shape
        tall = self.fc_w(x)  # 7 high, 3 wide
        wide = self.fc_h(x)  # 3 high, 7 wide
        # Sums, then one division on (N, C): mean's backward would materialise its broadcast gradient in
        # NCHW order, and adding that to the channels-last gradients is slow; sum's stays a broadcast view.
        pooled = (tall.sum(dim=(2, 3)) + wide.sum(dim=(2, 3)) + x.sum(dim=(2, 3))) / (h * w)  # (N, C)
        weights = self.reweight(pooled[:, :, None, None]).reshape(n, c, 3).softmax(dim=2)  # (N, C, 3)
        # Each branch's weights contiguous over channels, as the channels-last activations are: with a
        # stride of 3 the broadcast products fall off the vectorised path.
        weights = weights.transpose(1, 2).to(x.dtype).contiguous()[..., None, None]  # (N, 3, C, 1, 1)
        mixed = torch.addcmul(tall * weights[:, 0], wide, weights[:, 1])
        return torch.addcmul(mixed, x, weights[:, 2])


class TokenMixing(nn.Module):
    """Depthwise 3x3 convolution followed by the strip mixing block."""

    def __init__(self, channels: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.dwsc = DepthwiseConv(channels)
        self.smlp_block = StripMixingBlock(channels, resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.smlp_block(self.dwsc(x))


class ChannelMixing(nn.Module):
    """Depthwise 7x7 convolution, LayerNorm, then an alpha-times-wide MLP with GRN.

    As in the specification, LayerNorm and the MLP see the activations as (N, H, W, D), here a view
    of their channels-last memory; fc1 and fc2 are `PointwiseLinear` layers (1x1 convolutions on the CPU).
    """

    def __init__(self, channels: int, alpha: int) -> None:
        super().__init__()
        self.conv_77 = WideDepthwiseConv2d(channels, (7, 7))
        self.layer_norm = nn.LayerNorm(channels)
        self.fc1 = PointwiseLinear(channels, alpha * channels)
        self.act = nn.GELU()
        self.grn = GRN(alpha * channels)
        self.fc2 = PointwiseLinear(alpha * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_77(x)
        x = self.layer_norm(x.permute(0, 2, 3, 1))  # (N, H, W, D)
        x = self.fc1(x)  # (N, H, W, K)
        x = self.act(x)  # on a contiguous tensor, so that PyTorch runs oneDNN's GELU on the CPU
        x = self.grn(x, shift=False)  # GRN's shift beta joins fc2's bias, which is faster (see GRN)
        x = self.fc2(x, input_shift=self.grn.beta.flatten())  # (N, H, W, D)
        return x.permute(0, 3, 1, 2)  # (N, D, H, W)


class Stage(nn.Sequential):
    """The blocks of one stage, run in order (the release's `blocksN.i`); with `grad_checkpointing`, each is
    recomputed in the backward pass to save activation memory."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpointed(block, x)
            else:
                x = block(x)
        return x


class BasicBlock(nn.Module):
    """u = u + DropPath(TokenMixing(u)); u = u + DropPath(ChannelMixing(u))."""

    def __init__(self, channels: int, resolution: tuple[int, int], alpha: int, drop_path: float) -> None:
        super().__init__()
        self.token_mixing = TokenMixing(channels, resolution)
        self.channel_mixing = ChannelMixing(channels, alpha)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.token_mixing(x))
        return x + self.drop_path(self.channel_mixing(x))


def image_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of an input size given as one side (square) or as (H, W)."""
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def check_img_size(img_size: int | Sequence[int], name: str = "img_size") -> None:
    """Refuse an input size that is not one side, or H and W, each a positive multiple of 32."""
    sides = image_size(img_size)
    if len(sides) != 2 or not all(isinstance(side, int) and side > 0 and side % STRIDE == 0 for side in sides):
        fixed = [max(STRIDE, side // STRIDE * STRIDE) if isinstance(side, int) else 224 for side in sides[:2]]
        shown, fix = (img_size, fixed[0]) if isinstance(img_size, int) else (list(img_size), fixed)
        raise ValueError(f"{name} {shown} must be a positive multiple of 32, or [H, W] of two (the stem's "
                         f"4 x 2^3 stage downsamplings); use e.g. {fix}")


def check_architecture(names: Mapping[str, str] | None = None, **arguments: int | Sequence[int]) -> None:
    """Refuse arguments the network cannot be built with: the four stages, the stem's patch of 4, an input
    size (one side, or H and W) divisible by the total stride 32, and stage widths that the strip mixing can split.

    Args:
        names: what to call each argument in the message (the config names its keys); the keyword by default.
        arguments: ``img_size``, ``patch_size``, ``embed_dim`` and ``layers``.

    Raises:
        ValueError: naming the argument, the value and what would do.
    """
    names = {key: (names or {}).get(key, key) for key in arguments}
    img_size, patch_size, embed_dim, layers = (arguments[key] for key in ("img_size", "patch_size", "embed_dim",
                                                                           "layers"))
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"{names['layers']} must give 4 stage depths of at least one block, got {list(layers)}")
    if patch_size != 4:
        raise ValueError(f"{names['patch_size']} {patch_size} is not supported; the network downsamples by 4 x 8 = 32")
    check_img_size(img_size, names["img_size"])
    for channels in (embed_dim, 2 * embed_dim, 4 * embed_dim, 8 * embed_dim):
        if channels % (2 * strip_chunks(channels)) != 0:
            raise ValueError(
                f"{names['embed_dim']} {embed_dim} cannot be split by the strip mixing: stage width {channels} must "
                f"be divisible by {2 * strip_chunks(channels)}; use a multiple of 8 such as {embed_dim // 8 * 8 or 8}")


def check_head(num_classes: int, global_pool: str) -> None:
    """Refuse a pooling the head cannot follow: 'avg', or '' (none) for a model without a classifier."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' (the mean over H and W) or '' "
                         f"(none, with num_classes=0)")
    if global_pool == "" and num_classes > 0:
        raise ValueError(f"global_pool '' (no pooling) returns feature maps, which a classifier of {num_classes} "
                         f"classes cannot take; use num_classes=0 with it, or global_pool='avg'")


def _refuse_input_size(size: tuple[int, int], img_size: tuple[int, int], dynamic: bool) -> None:
    if dynamic and (size[0] % STRIDE or size[1] % STRIDE):
        raise ValueError(f"input of size {size} is not a multiple of 32 in each side (the network's total stride); "
                         f"pad it, or build the model with dynamic_img_pad=True")
    if not dynamic and size != img_size:
        built = "x".join(map(str, img_size))
        raise ValueError(
            f"input of size {size} but the model was built for {built}; resize the input, build the model with "
            f"img_size={size} or dynamic_img_size=True, or load its weights into such a model (resampled)")


@register_notrace_function  # torch.fx keeps it whole: its checks are Python control flow on the input's size
def fit_input_size(x: torch.Tensor, img_size: tuple[int, int], dynamic: bool, pad: bool, stride: int = STRIDE
                   ) -> torch.Tensor:
    """x, padded at the bottom and right to the next multiple of 32 when ``pad``; an input size the model cannot
    take is refused in one line (in eager mode and torch.fx graphs; TorchScript leaves it to the layers)."""
    if pad:
        height, width = x.shape[-2], x.shape[-1]
        x = F.pad(x, (0, (stride - width % stride) % stride, 0, (stride - height % stride) % stride))
    if not torch.jit.is_scripting():
        _refuse_input_size((x.shape[-2], x.shape[-1]), img_size, dynamic)
    return x


class StripMLPNet(nn.Module):
    """Strip-MLP: four stages of BasicBlocks with convolutional patch merging and cross-stage skips.

    Args:
        img_size: Input size the model is built for, one side (square) or (H, W); divisible by 32 because the
            strip projections and position tables are sized for each stage's resolution.
        patch_size: Stem convolution kernel and stride.
        in_chans: Input image channels.
        num_classes: Classifier outputs (0: none).
        embed_dim: Channels E of stage 1; stages have E, 2E, 4E, 8E.
        layers: Blocks per stage.
        alpha: Expansion ratio of the ChannelMixing MLP (the release's checkpoints need 3).
        global_pool: 'avg', the mean over H and W before the head, or '' for none (with ``num_classes=0``: the
            model returns its final (N, 8E, H/32, W/32) maps).
        drop_rate: Dropout on the pooled features before the head (timm's convention; the release has none).
        drop_path_rate: Stochastic-depth rate.
        drop_path_schedule: "uniform" gives every block `drop_path_rate` (the release's behaviour);
            "linear" rises from 0 to `drop_path_rate` over depth (timm and Swin).
        use_checkpoint: Recompute each block in the backward pass to save activation memory.
        dynamic_img_size: Take any input whose sides are multiples of 32: the strip projections and position tables
            are resampled for it at run time (as `resample.py` resamples weights), differentiably, and cached per
            size without gradients. At ``img_size`` the model computes exactly what a fixed one does.
        dynamic_img_pad: Pad inputs at the bottom and right to the next multiple of 32 first.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 80,
            layers: tuple[int, ...] = (2, 2, 12, 2),
            alpha: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            drop_path_schedule: str = "uniform",
            use_checkpoint: bool = False,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        check_architecture(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, layers=layers)
        check_head(num_classes, global_pool)
        if drop_path_schedule not in DROP_PATH_SCHEDULES:
            raise ValueError(
                f"unknown drop path schedule {drop_path_schedule!r}; valid: {', '.join(DROP_PATH_SCHEDULES)}")

        self.img_size = image_size(img_size)  # (H, W)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = 8 * embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.num_stages = len(layers)  # fewer after prune_intermediate_layers
        self.feature_info = [
            {"num_chs": embed_dim * 2 ** i, "reduction": patch_size * 2 ** i, "module": f"blocks{i + 1}"}
            for i in range(len(layers))]
        height, width = (side // patch_size for side in self.img_size)
        total = sum(layers)
        if drop_path_schedule == "linear":
            rates = torch.linspace(0, drop_path_rate, total).tolist()
        else:
            rates = [drop_path_rate] * total

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=False)
        stages = []
        for i, depth in enumerate(layers):
            start = sum(layers[:i])
            stages.append(Stage([
                BasicBlock(embed_dim * 2 ** i, (height // 2 ** i, width // 2 ** i), alpha, rates[start + j])
                for j in range(depth)]))
        self.blocks1 = stages[0]
        self.merging1 = nn.Conv2d(embed_dim, embed_dim * 2, 2, 2, bias=False)
        self.conv_s1_28 = nn.Conv2d(embed_dim * 2, embed_dim * 4, 2, 2, groups=embed_dim * 2, bias=False)
        self.conv_s1_14 = nn.Conv2d(embed_dim * 4, embed_dim * 8, 2, 2, groups=embed_dim * 4, bias=False)
        self.blocks2 = stages[1]
        self.merging2 = nn.Conv2d(embed_dim * 2, embed_dim * 4, 2, 2, bias=False)
        self.conv_s2_14 = nn.Conv2d(embed_dim * 4, embed_dim * 8, 2, 2, groups=embed_dim * 4, bias=False)
        self.blocks3 = stages[2]
        self.merging3 = nn.Conv2d(embed_dim * 4, embed_dim * 8, 2, 2, bias=False)
        self.blocks4 = stages[3]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.set_grad_checkpointing(use_checkpoint)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"embeddings_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str | list[tuple[str, tuple[int, ...] | None]]]:
        """Parameter groups in forward order, for timm's layer-wise learning-rate decay and for freezing: the stem,
        then each block (each stage when coarse), the merging and skip convolutions with the first block of the stage
        they feed; the norm and head match nothing, which puts them last."""
        return {
            "stem": r"^patch_embed",
            "blocks": [(r"^blocks(\d+)\." if coarse else r"^blocks(\d+)\.(\d+)\.", None)] + [
                (rf"^(?:{'|'.join(names)})\.", (stage,) if coarse else (stage, 0))
                for stage, names in STAGE_INPUTS.items()],
        }

    @torch.jit.ignore
    def stages(self) -> list[Stage]:
        """The stages still present (all four unless pruned)."""
        return [stage for stage in (self.blocks1, self.blocks2, self.blocks3, self.blocks4) if isinstance(stage, Stage)]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Resample the model in place for inputs of ``img_size`` (one side or (H, W), multiples of 32): the
        strip projections and position tables become what `checkpoint_filter_fn` would load into a model built at
        that size. They are new parameters, so build the optimiser afterwards. `img_size`, timm's record of the
        input size and `pretrained_cfg` follow."""
        check_img_size(img_size)
        self.img_size = image_size(img_size)
        height, width = (side // 4 for side in self.img_size)
        for i, stage in enumerate(self.stages()):
            for block in stage:
                block.token_mixing.smlp_block.set_resolution(height // 2 ** i, width // 2 ** i)
        record_input_size(self, self.img_size)
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg.update(input_cfg(self.img_size, self.in_chans, self.dynamic_img_size))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, the model returns pooled features, or the final maps when
        ``global_pool`` is '')."""
        global_pool = self.global_pool if global_pool is None else global_pool
        check_head(num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stage_outputs(self, x: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The outputs of stages 0..last (blocks1..blocks4, before the final norm), each (N, E * 2^i, H / 2^(i+2),
        W / 2^(i+2)) in channels-last memory; the skips from stages 1 and 2 enter stages 3 and 4."""
        x = fit_input_size(x, self.img_size, self.dynamic_img_size, self.dynamic_img_pad)
        # Every block computes in channels-last memory; see ChannelMixing.
        x = self.patch_embed(x).contiguous(memory_format=torch.channels_last)
        outputs = [self.blocks1(x)]
        if last == 0:
            return outputs
        x = self.merging1(outputs[0])
        skip_s1a = self.conv_s1_28(x)
        outputs.append(self.blocks2(x))
        if last == 1:
            return outputs
        x = self.merging2(outputs[1])
        skip_s2 = self.conv_s2_14(x)
        outputs.append(self.blocks3(x + skip_s1a))
        if last == 2:
            return outputs
        skip_s1b = self.conv_s1_14(skip_s1a)
        outputs.append(self.blocks4(self.merging3(outputs[2]) + skip_s1b + skip_s2))
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stages 1-4 with their skips; returns the normalised (N, 8E, H/32, W/32) feature map."""
        return self.norm(self._stage_outputs(x, last=self.num_stages - 1)[-1])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense prediction, as timm defines it for its convolutional models.

        Args:
            x: Input images (N, C, H, W) of the size the model was built for (any size it takes when dynamic).
            indices: The last n stages if an int, all if None, else the stage indices (0..3, negative from the end).
            norm: Apply the final BatchNorm to the last stage's output when it is taken.
            stop_early: Run no stage after the last one taken.
            output_fmt: Only "NCHW".
            intermediates_only: Return the stage outputs alone.

        Returns:
            The stage outputs (strides 4, 8, 16, 32; channels E, 2E, 4E, 8E), or (final features, stage outputs).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; Strip-MLP gives NCHW feature maps")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        outputs = self._stage_outputs(x, last=max_index if stop_early else self.num_stages - 1)
        last = len(outputs) - 1
        intermediates = [self.norm(outputs[i]) if norm and i == last else outputs[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return self.norm(outputs[-1]), intermediates

    def prune_intermediate_layers(
            self,
            indices: int | Sequence[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (with the merging and skip layers that feed them), and the
        norm and head when they no longer apply; returns the absolute stage indices kept."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for stage in range(max_index + 2, self.num_stages + 1):
            for name in (f"blocks{stage}", *STAGE_INPUTS[stage]):
                setattr(self, name, nn.Identity())
        prune_end = max_index < self.num_stages - 1
        self.num_stages = max_index + 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # the norm is sized for (and only applied to) the last stage
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # (N, 8E)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bare weights of a checkpoint: unwrapped from `model` / `state_dict`, without the prefixes that
    DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`) add; the saved order is kept."""
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    cleaned = {}
    for name, tensor in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        cleaned[name] = tensor
    return cleaned


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: StripMLPNet, resample: bool = True,
                         log: Callable[[str], None] = _logger.info) -> dict[str, torch.Tensor]:
    """Turn a release (or our own) checkpoint into a state dict for `model`.

    Accepts whatever `clean_state_dict` accepts; a model without a classifier (``num_classes=0``, as timm builds
    ``features_only`` backbones) leaves the checkpoint's head out. With ``resample``, weights of another input size
    are carried over to the model's (see `resample.py`), each resampled tensor named through ``log`` with its old
    and new shape. Then checks names and shapes, raising one error that lists every mismatch left, so a checkpoint
    of another variant or class count is recognised at once.
    """
    cleaned = clean_state_dict(state_dict)
    expected = model.state_dict()
    if model.num_classes == 0:  # a backbone without a classifier (features, pooled features) takes all but the head
        cleaned = {name: tensor for name, tensor in cleaned.items() if not name.startswith("head.")}
    if resample:
        cleaned, notes = resample_to_model(cleaned, expected)
        for note in notes:
            log(f"resampled {note}")
    problems = [f"missing {name} {tuple(t.shape)}" for name, t in expected.items() if name not in cleaned]
    problems += [f"unexpected {name} {tuple(t.shape)}" for name, t in cleaned.items() if name not in expected]
    problems += [
        f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(expected[name].shape)}"
        for name, t in cleaned.items() if name in expected and t.shape != expected[name].shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(
            f"checkpoint does not fit this model ({len(problems)} mismatches: {shown}); check the variant "
            f"(MODEL.STRIP_MLP), DATA.IMG_SIZE and MODEL.NUM_CLASSES it was trained with")
    return cleaned


def input_cfg(img_size: tuple[int, int], in_chans: int, dynamic: bool) -> dict:
    """The entries of `pretrained_cfg` that describe the inputs a model takes: timm's data configuration reads its
    input size from them, and its tests whether the model takes one size only."""
    return {"input_size": (in_chans, *img_size), "pool_size": (img_size[0] // STRIDE, img_size[1] // STRIDE),
            "fixed_input_size": not dynamic}


def _create_strip_mlp(variant: str, pretrained: bool = False, **kwargs) -> StripMLPNet:
    # The configuration describes the model as built: its input size, and whether it takes only that one.
    described = input_cfg(image_size(kwargs.get("img_size", 224)), kwargs.get("in_chans", 3),
                          kwargs.get("dynamic_img_size", False))
    kwargs["pretrained_cfg_overlay"] = {**described, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build_model_with_cfg(StripMLPNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3)}, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed", "classifier": "head", "license": "mit", "fixed_input_size": True,
        "paper_ids": "arXiv:2307.11458", "paper_name": "Strip-MLP: Efficient Token Interaction for Vision MLP",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "strip_mlp_tiny_light": _cfg(),
    "strip_mlp_tiny": _cfg(),
    "strip_mlp_small": _cfg(),
    "strip_mlp_base": _cfg(),
})

VARIANTS = {
    "strip_mlp_tiny_light": {"embed_dim": 80, "layers": (2, 2, 6, 2)},
    "strip_mlp_tiny": {"embed_dim": 80, "layers": (2, 2, 12, 2)},
    "strip_mlp_small": {"embed_dim": 96, "layers": (2, 2, 18, 2)},
    "strip_mlp_base": {"embed_dim": 112, "layers": (2, 2, 18, 2)},
}


@register_model
def strip_mlp_tiny_light(pretrained: bool = False, **kwargs) -> StripMLPNet:
    """Strip-MLP-T* (light tiny): 18.2 M parameters, 2.52 GMACs at 224."""
    return _create_strip_mlp("strip_mlp_tiny_light", pretrained, **{**VARIANTS["strip_mlp_tiny_light"], **kwargs})


@register_model
def strip_mlp_tiny(pretrained: bool = False, **kwargs) -> StripMLPNet:
    """Strip-MLP-T: 24.9 M parameters, 3.65 GMACs at 224."""
    return _create_strip_mlp("strip_mlp_tiny", pretrained, **{**VARIANTS["strip_mlp_tiny"], **kwargs})


@register_model
def strip_mlp_small(pretrained: bool = False, **kwargs) -> StripMLPNet:
    """Strip-MLP-S: 42.6 M parameters, 6.80 GMACs at 224."""
    return _create_strip_mlp("strip_mlp_small", pretrained, **{**VARIANTS["strip_mlp_small"], **kwargs})


@register_model
def strip_mlp_base(pretrained: bool = False, **kwargs) -> StripMLPNet:
    """Strip-MLP-B: 57.2 M parameters, 9.18 GMACs at 224."""
    return _create_strip_mlp("strip_mlp_base", pretrained, **{**VARIANTS["strip_mlp_base"], **kwargs})
