"""Masks, keeps, gathers and scatters: the one mask convention of the code base.

A `mask` is a bool tensor `(B, *grid)` on the backbone's mask grid, True = hidden.
A `keep` is a long tensor `(B, K)` of indices into the flattened grid (row-major), sorted
ascending. Prefix tokens (class, register, distillation) are never counted. Everything here is
vectorised over the batch: no Python loop over samples or tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange

from .errors import InputShapeError

Grid = Sequence[int]
ROUNDINGS = ("nearest", "ceil")


def _num_hidden(num_cells: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(round(num_cells * ratio))


def num_hidden(num_cells: int, ratio: float, rounding: str = "nearest") -> int:
    """How many of `num_cells` cells a mask of `ratio` hides, at least one and at most all but one.

    rounding: "nearest" (Python's round; MAE keeps `int(N * (1 - ratio))` cells, the same count on the
    usual grids) or "ceil" (SimMIM's mask generator, Xie et al. 2022: `ceil(count * ratio)`; float
    noise such as 0.7 * 10 = 7.000000000000001 is rounded away first).
    """
    if num_cells < 2:
        raise InputShapeError(f"masking needs a mask grid of at least 2 cells, got {num_cells}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if rounding == "nearest":
        hidden = round(num_cells * ratio)
    elif rounding == "ceil":
        hidden = math.ceil(round(num_cells * ratio, 9))
    else:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return min(max(int(hidden), 1), num_cells - 1)


def _rank_mask(batch: int, num_cells: int, hidden: int, generator: torch.Generator | None,
               device: torch.device | str | None) -> torch.Tensor:
    """(B, N) bool with exactly `hidden` True per row: per-sample noise plus argsort (He et al. 2021)."""
    noise = torch.rand(batch, num_cells, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each cell in its sample's noise
    return rank < hidden


def random_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random mask with exactly `round(ratio * N)` hidden cells per sample (MAE, SimMIM).

    Returns a bool tensor (B, *grid). Per-sample noise plus argsort, as in MAE (He et al. 2021).
    """
    n = math.prod(grid)
    return _rank_mask(batch, n, _num_hidden(n, ratio), generator, device).view(batch, *grid)


def block_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    *,
    min_cells: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    num_blocks: int = 32,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Blockwise mask (BEiT, Bao et al. 2021) with exactly `round(ratio * N)` hidden cells.

    Draws `num_blocks` random rectangles per sample at once, takes the union of the first m of
    them for the smallest m that reaches the target, then trims or tops up at random so every
    sample hides the same number of cells (needed for `keep`). Returns bool (B, h, w).
    """
    h, w = grid
    n = h * w
    hidden = _num_hidden(n, ratio)
    kw = dict(generator=generator, device=device)
    max_area = max(min_cells, hidden)
    area = min_cells + torch.rand(batch, num_blocks, **kw) * (max_area - min_cells)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ar = torch.exp(log_lo + torch.rand(batch, num_blocks, **kw) * (log_hi - log_lo))
    bh = (area * ar).sqrt().round().clamp(1, h)
    bw = (area / ar).sqrt().round().clamp(1, w)
    top = (torch.rand(batch, num_blocks, **kw) * (h - bh + 1)).floor()
    left = (torch.rand(batch, num_blocks, **kw) * (w - bw + 1)).floor()
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    inside = (
        (ys >= top[..., None, None]) & (ys < (top + bh)[..., None, None])
        & (xs >= left[..., None, None]) & (xs < (left + bw)[..., None, None])
    )  # (B, M, h, w)
    union = inside.flatten(2).cummax(dim=1).values  # union of the first m blocks, (B, M, N)
    reached = union.sum(-1) >= hidden  # (B, M)
    last = torch.full((batch,), num_blocks - 1, dtype=torch.long, device=reached.device)
    first = torch.where(reached.any(1), reached.float().argmax(1), last)
    chosen = union[torch.arange(batch, device=device), first]  # (B, N)
    # Cells inside the blocks rank first; ties broken at random, so trimming and topping up are random.
    score = chosen.float() + torch.rand(batch, n, **kw) * 0.5
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    return (rank < hidden).view(batch, h, w)


def tube_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Tube mask for video (VideoMAE, Tong et al. 2022): one spatial mask repeated over time.

    grid is (t, h, w); returns bool (B, t, h, w).
    """
    t, h, w = grid
    spatial = random_mask(batch, (h, w), ratio, generator=generator, device=device)
    return spatial.unsqueeze(1).expand(batch, t, h, w).contiguous()


def draw_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    tube: bool = True,
    *,
    rounding: str = "nearest",
) -> torch.Tensor:
    """The masked-image objectives' mask: (B, *grid) bool hiding `num_hidden(N, ratio, rounding)`
    cells per sample (at least one hidden, one visible), uniformly at random (MAE, He et al. 2021;
    SimMIM, Xie et al. 2022 with rounding="ceil"; MPP; MP3).

    Video grids (t, h, w) with `tube` get tube masks (VideoMAE, Tong et al. 2022): the count is taken
    over the h * w spatial cells and the same cells are hidden in every time slice (a single
    spatial cell: nothing hidden). Draws the same random numbers as `random_mask` / `tube_mask`.
    """
    grid = tuple(int(g) for g in grid)
    n = math.prod(grid)
    if n < 2:
        raise InputShapeError(f"masking needs a mask grid of at least 2 cells, got {grid}")
    if len(grid) == 3 and tube:
        t, h, w = grid
        spatial = _rank_mask(batch, h * w, drawn_hidden(grid, ratio, tube, rounding) // t, generator, device)
        return spatial.view(batch, 1, h, w).expand(batch, t, h, w).contiguous()
    return _rank_mask(batch, n, drawn_hidden(grid, ratio, tube, rounding), generator, device).view(batch, *grid)


def drawn_hidden(grid: Grid, ratio: float, tube: bool = True, rounding: str = "nearest") -> int:
    """The cells per sample that `draw_mask(batch, grid, ratio, tube=tube, rounding=rounding)` hides."""
    grid = tuple(int(g) for g in grid)
    if len(grid) == 3 and tube:
        t, h, w = grid
        return t * (num_hidden(h * w, ratio, rounding) if h * w >= 2 else 0)
    return num_hidden(math.prod(grid), ratio, rounding)


def mask_to_keep(mask: torch.Tensor, visible: int | None = None) -> torch.Tensor:
    """Indices of the visible cells, (B, *grid) bool -> (B, K) long, ascending.

    Every sample must show the same number of cells, or the result would be ragged. `visible`: that
    number where the caller knows it (a `draw_mask` mask: N - `drawn_hidden(...)`); then the mask is not
    read on the host, so a compiled step keeps one graph here and a GPU step does not wait.
    """
    flat = mask.flatten(1)
    if visible is None:
        counts = (~flat).sum(1)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError(
                "every sample of a mask must hide the same number of cells to build `keep`; "
                f"got visible counts from {int(counts.min())} to {int(counts.max())}"
            )
        visible = int(counts[0]) if counts.numel() else 0
    # A stable sort puts visible (False) cells first, in their original order.
    return flat.to(torch.uint8).argsort(dim=1, stable=True)[:, :visible]


def keep_to_mask(keep: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, K) indices -> (B, *grid) bool mask, True where a cell is not kept."""
    n = math.prod(grid)
    mask = torch.ones(keep.shape[0], n, dtype=torch.bool, device=keep.device)
    mask.scatter_(1, keep, False)
    return mask.view(keep.shape[0], *grid)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select tokens: x (B, N, D), index (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(
    x: torch.Tensor, index: torch.Tensor, num_tokens: int, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Put tokens back on the full grid: x (B, K, D) at index (B, K) -> (B, N, D).

    Cells that receive no token hold `fill`: a scalar, a (D,) vector (e.g. a mask token), or a
    full (B, N, D) tensor.
    """
    b, _, d = x.shape
    if isinstance(fill, torch.Tensor):
        base = fill.to(x.dtype).expand(b, num_tokens, d).clone()
    else:
        base = x.new_full((b, num_tokens, d), fill)
    return base.scatter(1, index.unsqueeze(-1).expand(-1, -1, d), x)


def replace_masked(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """SimMIM-style replacement: x (B, N, D), mask (B, *grid) -> hidden tokens become `token` (D,)."""
    return torch.where(mask.flatten(1).unsqueeze(-1), token.to(x.dtype), x)


def upsample_mask(mask: torch.Tensor, factor: int | Sequence[int]) -> torch.Tensor:
    """Repeat each cell `factor` times along every grid axis: (B, h, w) -> (B, h*f, w*f)."""
    factors = [factor] * (mask.dim() - 1) if isinstance(factor, int) else list(factor)
    for axis, f in enumerate(factors, start=1):
        if f != 1:
            mask = mask.repeat_interleave(f, dim=axis)
    return mask


def hide_pixels(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pixels of hidden cells, images (B, C, [T,] H, W), mask on the mask grid.

    Backbones whose stem overlaps cells (convolutions with kernel > stride) call this first, so
    the output depends on the image only through the visible cells.
    """
    spatial = images.shape[2:]
    factor = [s // g for s, g in zip(spatial, mask.shape[1:])]
    pixel_mask = upsample_mask(mask, factor).unsqueeze(1)
    return images.masked_fill(pixel_mask, 0.0)


def patchify(images: torch.Tensor, patch: int | Sequence[int]) -> torch.Tensor:
    """Images to flattened patches, (p q c) order as in MAE.

    (B, C, H, W) -> (B, h*w, p*q*C); video (B, C, T, H, W) with patch (pt, p, q) -> (B, t*h*w, pt*p*q*C).
    """
    if images.dim() == 5:
        pt, p, q = (patch,) * 3 if isinstance(patch, int) else patch
        return rearrange(images, "b c (t u) (h p) (w q) -> b (t h w) (u p q c)", u=pt, p=p, q=q)
    p, q = (patch, patch) if isinstance(patch, int) else patch
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=q)


def unpatchify(
    patches: torch.Tensor, patch: int | Sequence[int], grid: Grid, channels: int = 3
) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*q*C) with grid (h, w) -> (B, C, h*p, w*q); 3-D likewise."""
    if len(grid) == 3:
        pt, p, q = (patch,) * 3 if isinstance(patch, int) else patch
        t, h, w = grid
        return rearrange(
            patches, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)", t=t, h=h, w=w, u=pt, p=p, q=q, c=channels
        )
    p, q = (patch, patch) if isinstance(patch, int) else patch
    h, w = grid
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=q, c=channels)
