"""Weights of one input size for a model of another: resampling the size-dependent tensors of the CGSMM.

A Strip-MLP layer's strip projections mix whole rows (`proj_h`, over the W tokens of a row) and columns
(`proj_w`, over the H tokens of a column), so each of their G groups holds, per kernel tap, an L x L mixing matrix
M; the relative-position tables hold one row per offset -H..W. Everything else is independent of the input size.

A mixing matrix is carried to L' tokens so that the layer computes the same function of a resized input. With U
the linear interpolation from the shorter to the longer strip (align_corners=False, as image resizing does):
growing, M' = U M U+, so that M' (U x) = U (M x) exactly for an interpolated input; shrinking, M' = U+ M U, the
least-squares counterpart, which undoes the growing exactly. U+ (the pseudo-inverse) averages about L' / L inputs
into each, which is the weight scaling by L / L' of a continuous kernel sampled at the new token positions. Biases
follow the outputs (U b, or U+ b). Position tables are interpolated linearly over the same range of relative
offsets: offset o' maps to o' W / W' when o' >= 0 (along a row) and to o' H / H' when negative.
"""

import functools
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

_STRIP = re.compile(r"^(.*\.smlp_block\.)(proj_h|proj_w|relate_pos_h|relate_pos_w)\.(weight|bias|embeddings_table)$")


def interpolation_matrix(source: int, target: int) -> torch.Tensor:
    """The (target, source) float64 matrix of linear interpolation from ``source`` to ``target`` points, as
    ``F.interpolate(mode="linear", align_corners=False)`` resizes a signal."""
    identity = torch.eye(source, dtype=torch.float64)[None]  # (1, source, source): one unit signal per channel
    return F.interpolate(identity, size=target, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=64)
def strip_maps(source: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A (target, source) and B (source, target) such that a mixing matrix M over ``source`` tokens
    becomes A M B over ``target`` tokens (see the module docstring). Cached: a model of dynamic input size asks for
    the same few pairs at every batch; callers must not modify them."""
    if target >= source:
        grow = interpolation_matrix(source, target)
        return grow, torch.linalg.pinv(grow)
    grow = interpolation_matrix(target, source)
    return torch.linalg.pinv(grow), grow


def resample_projection(tensor: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """A strip projection's weight (G * L, L, 1, taps) or bias (G * L,) for L = ``source`` tokens, resampled to
    ``target`` tokens: (G * L', L', 1, taps) or (G * L',). Differentiable, on the tensor's device."""
    outputs, inputs = (m.to(tensor.device) for m in strip_maps(source, target))
    groups = tensor.shape[0] // source
    if tensor.ndim == 1:
        resampled = tensor.double().reshape(groups, source) @ outputs.T  # (G, L')
        return resampled.reshape(-1).to(tensor.dtype)
    taps = tensor.shape[-1]
    mixing = tensor.double().reshape(groups, source, source, taps).permute(0, 3, 1, 2)  # (G, taps, L_out, L_in)
    resampled = outputs @ mixing @ inputs  # (G, taps, L', L')
    return resampled.permute(0, 2, 3, 1).reshape(groups * target, target, 1, taps).to(tensor.dtype)


def resample_position_table(table: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """A relative-position table (H + W + 1, C) over the offsets -H..W of an H x W grid (``source``), interpolated
    linearly to the offsets -H'..W' of ``target`` over the same range of relative positions. Differentiable."""
    (height, width), (new_height, new_width) = source, target
    offsets = torch.arange(-new_height, new_width + 1, dtype=torch.float64, device=table.device)
    scaled = torch.where(offsets >= 0, offsets * width / new_width, offsets * height / new_height)
    position = scaled + height  # fractional row of the source table
    lower = position.floor().clamp(0, table.shape[0] - 2).long()
    fraction = (position - lower)[:, None]
    rows = table.double()
    return (rows[lower] * (1 - fraction) + rows[lower + 1] * fraction).to(table.dtype)


def resample_to_model(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resample the strip projections and position tables of ``state_dict`` whose shapes differ from those of the
    model's state dict ``expected``; everything else is passed through unchanged.

    Returns:
        The new state dict, and one line per resampled tensor: its name, old and new shape.
    """
    resampled = dict(state_dict)
    notes = []
    for name, tensor in state_dict.items():
        match = _STRIP.match(name)
        if not match or name not in expected:
            continue
        block = match.group(1)
        grids = [block + "proj_w.weight", block + "proj_h.weight"]  # their inputs are H and W tokens
        if not all(key in state_dict and key in expected for key in grids):
            continue
        old_grid = tuple(state_dict[key].shape[1] for key in grids)
        new_grid = tuple(expected[key].shape[1] for key in grids)
        # A table's length H + W + 1 can stay the same on another grid (16 x 16 and 24 x 8), so grids decide.
        if tensor.shape == expected[name].shape and (match.group(2).startswith("proj") or old_grid == new_grid):
            continue
        if state_dict[grids[1]].shape[0] // old_grid[1] != expected[grids[1]].shape[0] // new_grid[1]:
            continue  # another channel width: not a matter of size, so the caller reports it
        if match.group(2) == "proj_h":  # mixes the W tokens of a row
            fitted = resample_projection(tensor, old_grid[1], new_grid[1])
        elif match.group(2) == "proj_w":  # mixes the H tokens of a column
            fitted = resample_projection(tensor, old_grid[0], new_grid[0])
        else:
            fitted = resample_position_table(tensor, old_grid, new_grid)
        if fitted.shape != expected[name].shape:
            continue
        resampled[name] = fitted
        notes.append(f"{name} {tuple(tensor.shape)} -> {tuple(resampled[name].shape)}")
    return resampled, notes
