"""The layers behind the Strip-MLP network: strip projections and position terms of any input size, GRN, and fast
stand-ins for standard layers, with the activation-checkpointing helper of the blocks.

Each module here computes what its docstring states, with the release's parameter names, so `strip_mlp.py` reads
as the paper and the release's checkpoints load unchanged. Why each fast path exists is said in one line at it (the
measurements are in docs/performance.md). A fast path measured on the CPU only runs on the CPU; other devices
take the plain computation. Everything that depends on the input size at run time (resampling, caches) sits in
modules that torch.fx keeps whole (`register_notrace_module`), and the hand-written autograd functions sit behind
functions it keeps whole, and behind `torch.jit.is_scripting()` for TorchScript, which cannot compile them.
"""

import contextlib
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.utils.checkpoint import checkpoint

from .resample import resample_position_table, resample_projection


def channels_last_nchw(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, *C) in any layout -> (N, C, H, W) with channels-last memory (one copy at most)."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2], -1).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


class ResampledCache:
    """Tensors resampled for input sizes other than the built one, kept per size while no gradient is wanted.

    An entry is valid while the tensors it was computed from are the same: same version counter (in-place updates
    such as an optimiser step or `load_state_dict` bump it), storage, dtype and device. With gradients, every call
    recomputes, so the resampling is part of the autograd graph and trains the built weights.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()

    def get(self, key: tuple, sources: tuple[torch.Tensor, ...], compute: Callable[[], tuple[torch.Tensor, ...]]
            ) -> tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return compute()
        stamp = (torch.is_inference_mode_enabled(),
                 *((t._version, t.data_ptr(), t.dtype, t.device) for t in sources))
        hit = self.entries.get(key)
        if hit is not None and hit[0] == stamp:
            self.entries.move_to_end(key)
            return hit[1]
        value = compute()
        self.entries[key] = (stamp, value)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value


@register_notrace_module
class StripProjection(nn.Conv2d):
    """Mixes the tokens of every row (``along="rows"``, the CGSMM's `proj_h`) or column (``"columns"``, `proj_w`) of
    x + position: y[c, i, :] = M_g,0 a[c, i-1, :] + M_g,1 a[c, i, :] + M_g,2 a[c, i+1, :] + b_g for rows, channel
    c = p * G + g, with one L x L mixing matrix per group g and tap (strips outside the map read as zero).

    Stored as the release's grouped convolution over G groups whose channels are the L tokens of a strip (weight
    (G * L, L, 1, 3)), so the tokens are moved into the channel dimension and back: the copies read the activations
    through their (N, H, W, C) view and the convolution runs on channels-last layouts, so that the gradients come
    back channels-last too (element-wise backward passes that mix layouts are up to 10x slower on the CPU).

    At a strip length other than the built one (a model of dynamic input size) the weights are resampled for it
    with the mathematics of `resample.py`, differentiably, and cached while no gradient is wanted.
    """

    def __init__(self, groups: int, length: int, along: str) -> None:
        if along not in ("rows", "columns"):
            raise ValueError(f"along must be 'rows' or 'columns', got {along!r}")
        super().__init__(groups * length, groups * length, (1, 3), padding=(0, 1), groups=groups)
        self.length = length
        self.along_columns = along == "columns"
        # (N, H, W, P, G) -> (N, P, A, G, L) for A strips of L tokens, and back. The tokens are permuted straight from
        # their (N, H, W, C) view, never through a transposed copy, so that the gradient comes back channels-last.
        self.to_strips = [0, 3, 2, 4, 1] if self.along_columns else [0, 3, 1, 4, 2]
        self.from_strips = [self.to_strips.index(dim) for dim in range(5)]  # its inverse
        self.resampled_cache = ResampledCache()

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) and position (H, W, C) -> (N, C, H, W) in channels-last memory."""
        n, c, h, w = x.shape
        g = self.groups
        p = c // g
        strips, length = (w, h) if self.along_columns else (h, w)
        # Cast to the activations' dtype, so that under autocast the wide products stay in the low precision.
        pos = position.to(x.dtype).reshape(h, w, p, g).permute([i - 1 for i in self.to_strips[1:]])  # (P, A, G, L)
        a = x.permute(0, 2, 3, 1).reshape(n, h, w, p, g).permute(self.to_strips)  # (N, P, A, G, L)
        # Copy first, then add in place: an addition that reads the permuted view directly is slower.
        a = a.clone(memory_format=torch.contiguous_format).add_(pos.contiguous())
        weight, bias = self.weight, self.bias
        if length != self.length:
            weight, bias = self.resampled(length)
        y = F.conv2d(a.reshape(n, p, strips, g * length).permute(0, 3, 1, 2), weight, bias, 1, (0, 1), 1, g)
        y = y.permute(0, 2, 3, 1).reshape(n, p, strips, g, length).permute(self.from_strips)  # (N, H, W, P, G)
        return channels_last_nchw(y)

    @torch.jit.unused
    def resampled(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias for strips of ``length`` tokens (TorchScript runs the built length only)."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            return (resample_projection(self.weight, self.length, length),
                    resample_projection(self.bias, self.length, length))

        return self.resampled_cache.get((length,), (self.weight, self.bias), compute)

    def set_length(self, length: int) -> None:
        """Resample the weights in place for strips of ``length`` tokens."""
        with torch.no_grad():
            weight = resample_projection(self.weight, self.length, length)
            bias = resample_projection(self.bias, self.length, length)
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        self.in_channels = self.out_channels = self.groups * length
        self.length = length
        self.resampled_cache = ResampledCache()


@register_notrace_module
class RelativePosition(nn.Module):
    """Learned relative-position term pos[i, j, c] = table[(j - i) + H, c] for an H x W grid.

    Column minus row runs from -(H - 1) to W - 1, so the table has H + W + 1 rows for the offsets -H..W;
    on a square L x L grid that is the release's 2L + 1 rows with the same indexing. The index is a
    non-persistent buffer: it is built once on the model's device, follows `.to()`, and stays out of the
    state dict, whose keys remain the release's. For a grid other than the built one (a model of dynamic input size)
    the table is interpolated for it as `resample.py` does, differentiably, and cached while no gradient is wanted.
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.embeddings_table = nn.Parameter(torch.empty(height + width + 1, channels))
        trunc_normal_(self.embeddings_table, std=0.02)
        self.height, self.width = height, width
        self.register_buffer("index", self.grid_index(height, width), persistent=False)
        self.resampled_cache = ResampledCache()

    @staticmethod
    def grid_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """(H, W) table rows: column minus row, plus H."""
        rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
        return cols[None, :] - rows[:, None] + height

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The position term for the grid of x (N, C, H, W): (H, W, C), row i, column j."""
        height, width = x.shape[-2], x.shape[-1]
        if height == self.height and width == self.width:
            return self.embeddings_table[self.index]
        return self.resampled(height, width)

    @torch.jit.unused
    def resampled(self, height: int, width: int) -> torch.Tensor:
        """The position term for another grid (TorchScript runs the built grid only)."""

        def compute() -> tuple[torch.Tensor]:
            table = resample_position_table(self.embeddings_table, (self.height, self.width), (height, width))
            return (table[self.grid_index(height, width, self.index.device)],)

        return self.resampled_cache.get((height, width), (self.embeddings_table,), compute)[0]

    def set_grid(self, height: int, width: int) -> None:
        """Resample the table in place for an H x W grid."""
        with torch.no_grad():
            table = resample_position_table(self.embeddings_table, (self.height, self.width), (height, width))
        self.embeddings_table = nn.Parameter(table, requires_grad=self.embeddings_table.requires_grad)
        self.index = self.grid_index(height, width, self.index.device)
        self.height, self.width = height, width
        self.resampled_cache = ResampledCache()


class _WideDepthwiseConv(torch.autograd.Function):
    """A bias-free, stride-1 depthwise convolution with "same" padding and a backward pass built from
    fast forward convolutions, because oneDNN's own backward for kernels wider than 3 is slow on the CPU.

    The input gradient is the forward convolution of the output gradient with the flipped kernel. The
    weight gradient is assembled from windows 3 kernel columns wide: column j correlates the input
    shifted by j - kw // 2 columns with the output gradient, so the window starting at column s is
    the weight gradient of a (kh, 3) convolution over the input padded by kw // 2 and cut at s.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, None, 1, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        channels, _, kh, kw = weight.shape
        # Under autocast the forward ran in the gradient's precision; so does the backward.
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            flipped = weight.to(grad.dtype).flip(2, 3)
            grad_x = F.conv2d(grad, flipped, None, 1, ctx.padding, 1, channels).to(x.dtype)
        if ctx.needs_input_grad[1]:
            padded = F.pad(x.to(grad.dtype), (kw // 2, kw // 2))  # (N, C, H, W + kw - 1)
            width = x.shape[-1] + 2  # a 3-wide window over this many columns yields W outputs
            windows = [torch.nn.grad.conv2d_weight(padded[..., start:start + width], (channels, 1, kh, 3), grad,
                                                   1, (ctx.padding[0], 0), 1, channels)
                       for start in range(0, kw - 1, 2)]  # each (C, 1, kh, 3); neighbours share one column
            grad_weight = torch.cat([windows[0]] + [w[..., 1:] for w in windows[1:]], dim=-1).to(weight.dtype)
        return grad_x, grad_weight, None


@register_notrace_function
def depthwise_same_conv(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """A bias-free depthwise convolution with "same" padding."""
    wide = weight.shape[-1] > 3
    if wide and x.device.type == "cpu" and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return _WideDepthwiseConv.apply(x, weight, padding)  # oneDNN's own backward is 4-8x slower than its forward
    return F.conv2d(x, weight, None, 1, padding, 1, x.shape[1])


class WideDepthwiseConv2d(nn.Conv2d):
    """A bias-free depthwise convolution with "same" padding (odd kernel sizes); see `depthwise_same_conv`."""

    def __init__(self, channels: int, kernel_size: tuple[int, int]) -> None:
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels, bias=False)
        self.same_padding = padding  # typed as a pair for TorchScript, which sees `padding` as possibly a string

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_same_conv(x, self.weight, self.same_padding)


@register_notrace_function
def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` over the last dimension of x (N, H, W, C_in) -> (N, H, W, C_out)."""
    if x.device.type == "cpu":  # oneDNN runs it faster as a 1x1 convolution of the channels-last memory
        out = F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias)  # (N, C_out, H, W)
        return out.permute(0, 2, 3, 1)
    return F.linear(x, weight, bias)


class PointwiseLinear(nn.Linear):
    """`nn.Linear` over the channels of (N, H, W, C) activations that are a view of channels-last (N, C, H, W)
    memory; see `pointwise_linear`.

    `input_shift` (C,) adds a constant to every input token at no cost over the activations:
    W (x + s) + b = W x + (W s + b), computed once per batch.
    """

    def forward(self, x: torch.Tensor, input_shift: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias
        if input_shift is not None:
            shift = torch.mv(self.weight, input_shift)  # (C_out,)
            bias = shift if bias is None else bias + shift
        return pointwise_linear(x, self.weight, bias)


def _grn_factor(spatial_norm: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """GRN's per-sample, per-channel factor s = 1 + gamma * r, r = ||z|| / (mean over channels + 1e-6): (N, K)."""
    relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
    return torch.addcmul(torch.ones_like(relative), gamma, relative)


def _spatial_norm(z: torch.Tensor) -> torch.Tensor:
    """||z|| over the spatial positions of z (N, H, W, K), in at least float32: (N, K)."""
    # The square root of a sum of squares, because linalg.vector_norm over these dims is slower.
    return z.square().sum(dim=(1, 2)).to(torch.promote_types(z.dtype, torch.float32)).sqrt()


def _scale(z: torch.Tensor, factor: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """z * s (+ beta), in one pass over z (N, H, W, K), for GRN's factor s (N, K) and its shift beta (K,)."""
    factor = factor.to(z.dtype)[:, None, None, :]
    return z * factor if beta is None else torch.addcmul(beta.to(z.dtype), z, factor)


def _grn_plain(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """GRN of z (N, H, W, K) with gamma, beta (K,), its shift left out where beta is None."""
    return _scale(z, _grn_factor(_spatial_norm(z), gamma), beta)


class _GRN(torch.autograd.Function):
    """`_grn_plain` with its backward written out, because autograd's makes five passes over z-sized tensors and
    this one three: the reduction of g * z (the gradient of the factor), dz = g * s + z * c, where c, like every
    other quantity here, is a small (N, K) tensor, and with a shift beta the reduction of g that is its gradient.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        spatial_norm = _spatial_norm(z)  # (N, K)
        factor = _grn_factor(spatial_norm, gamma)
        ctx.save_for_backward(z, gamma, spatial_norm, factor)
        ctx.beta_dtype = None if beta is None else beta.dtype
        return _scale(z, factor, beta)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        z, gamma, spatial_norm, factor = ctx.saved_tensors
        channels = spatial_norm.shape[-1]
        shifted_mean = spatial_norm.mean(dim=-1, keepdim=True) + 1e-6  # (N, 1)
        grad_beta = None if ctx.beta_dtype is None else grad.sum(dim=(0, 1, 2), dtype=ctx.beta_dtype)  # (K,)
        grad_factor = (grad * z).sum(dim=(1, 2)).to(factor.dtype)  # (N, K)
        grad_gamma = (grad_factor * spatial_norm / shifted_mean).sum(dim=0)  # (K,)
        grad_relative = grad_factor * gamma
        # r_k = n_k / (mean(n) + eps): each n_j also moves the mean.
        grad_norm = (grad_relative / shifted_mean
                     - (grad_relative * spatial_norm).sum(dim=-1, keepdim=True) / (shifted_mean ** 2 * channels))
        coefficient = torch.where(spatial_norm > 0, grad_norm / spatial_norm, 0.0)  # d||z||/dz = z / ||z||
        grad_z = torch.addcmul(grad * factor.to(grad.dtype)[:, None, None, :], z,
                               coefficient.to(z.dtype)[:, None, None, :])
        return grad_z, grad_gamma.to(gamma.dtype), grad_beta


@register_notrace_function
def grn(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """GRN of z (N, H, W, K) with gamma, beta (K,), without the shift when beta is None; see `GRN`."""
    if z.device.type == "cpu" and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return _GRN.apply(z, gamma, beta)  # three passes over z in the backward instead of autograd's six
    return _grn_plain(z, gamma, beta)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2) over channels-last input z of shape (N, H, W, K):
    out = gamma * (z * m) + beta + z, with m the spatial L2 norm of z relative to its channel mean.

    GRN is affine per sample, out = z * s + beta with s = 1 + gamma * m, which is computed in one pass over z.
    With ``shift=False`` it leaves out beta, for a following `PointwiseLinear` to add as its ``input_shift``:
    a plain product is faster than one with a broadcast addend, and beta's gradient then comes from that layer's
    small bias gradient instead of a reduction over z.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor, shift: bool = True) -> torch.Tensor:
        return grn(x, self.gamma.flatten(), self.beta.flatten() if shift else None)


class _FreezeBatchNormStats:
    """Context for the recomputation of a checkpointed block: BatchNorm layers already updated
    their running statistics in the first forward, so the recomputation must leave them alone."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a block under activation checkpointing, with BatchNorm statistics updated once."""
    return checkpoint(
        block, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _FreezeBatchNormStats(block)))
