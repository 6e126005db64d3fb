"""Fast stand-ins for standard layers, and the activation-checkpointing helper of the Strip-MLP blocks.

Each module here computes exactly what the standard layer it subclasses computes, with the same
parameter names, so `strip_mlp.py` reads as the paper and the release's checkpoints load unchanged.
Why each fast path exists is said in one line at it; the measurements are in the README's speed
section.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.utils.checkpoint import checkpoint


def channels_last_nchw(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, *C) in any layout -> (N, C, H, W) with channels-last memory (one copy at most)."""
    n, h, w = x.shape[:3]
    return x.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


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


class WideDepthwiseConv2d(nn.Conv2d):
    """A bias-free depthwise convolution with "same" padding (odd kernel sizes).

    Kernels wider than 3 backpropagate through `_WideDepthwiseConv` on the CPU, where oneDNN's own
    backward for them is several times slower than its forward.
    """

    def __init__(self, channels: int, kernel_size: tuple[int, int]) -> None:
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.kernel_size[1] > 3 and torch.is_grad_enabled():
            return _WideDepthwiseConv.apply(x, self.weight, self.padding)
        return super().forward(x)


class PointwiseLinear(nn.Linear):
    """`nn.Linear` over the channels of (N, H, W, C) activations that are a view of channels-last
    (N, C, H, W) memory, run as a 1x1 convolution: on the CPU oneDNN runs it faster than `F.linear`.

    `input_shift` (C,) adds a constant to every input token at no cost over the activations:
    W (x + s) + b = W x + (W s + b), computed once per batch.
    """

    def forward(self, x: torch.Tensor, input_shift: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if input_shift is None else torch.addmv(self.bias, self.weight, input_shift.flatten())
        out = F.conv2d(x.permute(0, 3, 1, 2), self.weight[:, :, None, None], bias)  # (N, C_out, H, W)
        return out.permute(0, 2, 3, 1)  # (N, H, W, C_out)


def _grn_factor(spatial_norm: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """GRN's per-sample, per-channel factor s = 1 + gamma * r, r = ||z|| / (mean over channels + 1e-6): (N, K)."""
    relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
    return torch.addcmul(torch.ones_like(relative), gamma, relative)


def _spatial_norm(z: torch.Tensor) -> torch.Tensor:
    """||z|| over the spatial positions of z (N, H, W, K), in at least float32: (N, K)."""
    # The square root of a sum of squares, because linalg.vector_norm over these dims is slower.
    return z.square().sum(dim=(1, 2)).to(torch.promote_types(z.dtype, torch.float32)).sqrt()


class _GRNScaling(torch.autograd.Function):
    """z * s for z of shape (N, H, W, K) and GRN's factor s of z (see _grn_factor), gamma of shape (K,).

    Its backward is written out because autograd's makes five passes over z-sized tensors, and this
    one three: the reduction of g * z that gives the factor's gradient, and dz = g * s + z * c, where c,
    like every other quantity here, is a small (N, K) tensor.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        spatial_norm = _spatial_norm(z)  # (N, K)
        factor = _grn_factor(spatial_norm, gamma)
        ctx.save_for_backward(z, gamma, spatial_norm, factor)
        return z * factor.to(z.dtype)[:, None, None, :]

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, gamma, spatial_norm, factor = ctx.saved_tensors
        channels = spatial_norm.shape[-1]
        shifted_mean = spatial_norm.mean(dim=-1, keepdim=True) + 1e-6  # (N, 1)
        grad_factor = (grad * z).sum(dim=(1, 2)).to(factor.dtype)  # (N, K)
        grad_gamma = (grad_factor * spatial_norm / shifted_mean).sum(dim=0)  # (K,)
        grad_relative = grad_factor * gamma
        # r_k = n_k / (mean(n) + eps): each n_j also moves the mean.
        grad_norm = (grad_relative / shifted_mean
                     - (grad_relative * spatial_norm).sum(dim=-1, keepdim=True) / (shifted_mean ** 2 * channels))
        coefficient = torch.where(spatial_norm > 0, grad_norm / spatial_norm, 0.0)  # d||z||/dz = z / ||z||
        grad_z = torch.addcmul(grad * factor.to(grad.dtype)[:, None, None, :], z,
                               coefficient.to(z.dtype)[:, None, None, :])
        return grad_z, grad_gamma.to(gamma.dtype)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2) over channels-last input z of shape (N, H, W, K):
    out = gamma * (z * m) + beta + z, with m the spatial L2 norm of z relative to its channel mean.

    GRN is affine per sample, GRN(z) = z * s + beta, so a caller can fold beta into the layer that
    follows (see `PointwiseLinear`) and apply only `scaled`, saving a pass over z.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """z * s, GRN without its shift beta: (N, H, W, K)."""
        if torch.is_grad_enabled():
            return _GRNScaling.apply(x, self.gamma.flatten())
        # Without gradients, the same product in plain operations, which TorchScript can save (it cannot save a
        # Python autograd function).
        return x * _grn_factor(_spatial_norm(x), self.gamma.flatten()).to(x.dtype)[:, None, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x) + self.beta


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
