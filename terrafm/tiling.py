"""Chip grid with overlap over an odc-geo GeoBox, the 160 m patch grid, interior cropping.

A chip of ``chip_size`` pixels is cut every ``stride = chip_size - 2 * margin`` pixels, starting
``margin`` pixels before the input's top-left corner. Of each chip only the interior
``[margin, chip_size - margin)`` is kept, so the interiors tile the padded input exactly once and
every kept patch saw at least ``margin`` pixels of real context on each side (except at the
image edge, where the context is padding and masked as invalid). Pixels outside the input are
padded and marked invalid in every modality's mask.

The patch grid is ``geobox.zoom_out(16)``: its transform is derived from the input's, so patch
``(i, j)`` covers input pixels ``[16 i, 16 i + 16) x [16 j, 16 j + 16)``.

Examples
--------
>>> from odc.geo.geobox import GeoBox
>>> gbox = GeoBox.from_bbox((500000, 4000000, 504480, 4004480), "EPSG:32618", resolution=10)
>>> grid = ChipGrid(gbox, chip_size=224, margin=32)
>>> tuple(grid.patch_geobox.shape), grid.n_chips, grid.stride
((28, 28), (3, 3), 160)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from odc.geo.geobox import GeoBox

from .sensors import PATCH_SIZE

__all__ = ["ChipGrid", "Chip", "default_margin", "resolve_margin", "seam_positions", "seam_figures",
           "OVERLAP_SETTINGS"]


DEFAULT_MARGIN = 16
"""Pixels discarded per chip side by default: one patch (the overlap table of benchmarks/README.md)."""
FAST_MARGIN = 0
"""``overlap="fast"``: no overlap, the fewest chips per km², seams more visible."""


def default_margin(chip_size: int) -> int:
    """Border discarded on each side of a chip by default: :data:`DEFAULT_MARGIN` (one patch),
    chosen from the measured trade-off in benchmarks/README.md (on 224 px chips it runs 2.25x
    fewer chips per km² than the former quarter of the chip, 48 px, with neighbour differences
    across seams within 0.1 of it); 0 for chips under 64 px, where a margin would keep half
    the chip or less.

    Examples
    --------
    >>> default_margin(224), default_margin(448), default_margin(48)
    (16, 16, 0)
    """
    return DEFAULT_MARGIN if chip_size >= 4 * PATCH_SIZE else 0


def resolve_margin(chip_size: int, overlap: int | str | None) -> int:
    """Pixels discarded per chip side for ``terrafm.embed``'s ``overlap``: None for the default
    (:func:`default_margin`), a name of :data:`OVERLAP_SETTINGS` or a number of pixels (a
    multiple of 16, checked by :class:`ChipGrid`).

    Examples
    --------
    >>> resolve_margin(224, None), resolve_margin(224, "fast"), resolve_margin(224, 64)
    (16, 0, 64)
    """
    if overlap is None:
        return default_margin(chip_size)
    if isinstance(overlap, str):
        if overlap not in OVERLAP_SETTINGS:
            raise ValueError(f"overlap={overlap!r} is not a setting; use one of {sorted(OVERLAP_SETTINGS)}, "
                             f"None (default, {default_margin(chip_size)} px for a {chip_size} px chip) "
                             "or pixels per side, a multiple of 16")
        return OVERLAP_SETTINGS[overlap](chip_size)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise TypeError(f"overlap={overlap!r} must be pixels per chip side (an int, a multiple of 16), "
                        f"None or one of {sorted(OVERLAP_SETTINGS)}")
    return int(overlap)


def seam_positions(n_patches: int, chip_size: int, margin: int) -> np.ndarray:
    """Along one axis of a stitched patch grid: True for the patches next to a boundary between
    two chip interiors (the outer edge of the area is no seam).

    Examples
    --------
    >>> seam_positions(8, 96, 16).astype(int)
    array([0, 0, 0, 1, 1, 0, 0, 0])
    """
    interior = (chip_size - 2 * margin) // PATCH_SIZE
    index = np.arange(n_patches)
    return (((index % interior == 0) & (index > 0))
            | ((index % interior == interior - 1) & (index < n_patches - 1)))


def seam_figures(tiled: np.ndarray, reference: np.ndarray, chip_size: int, margin: int) -> dict[str, float]:
    """How a stitched ``(y, x, D)`` patch embedding differs from a ``reference`` computed with
    more context (one chip over the whole area), in float64.

    Returns ``relative_deviation`` (mean distance to the reference ÷ the reference's mean
    distance to its own mean vector), ``seam_metric`` (mean distance on :func:`seam_positions`
    ÷ elsewhere: 1 when seams are no worse than chip interiors) and ``step_ratio`` (mean
    distance between neighbours across a chip boundary ÷ between neighbours within a chip: how
    visible the seams are in a map, without a reference).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(8, 8, 4))
    >>> figures = seam_figures(ref + 0.1, ref, 96, 16)
    >>> round(figures["relative_deviation"], 3), round(figures["seam_metric"], 3)
    (0.105, 1.0)
    """
    tiled, reference = np.asarray(tiled, "float64"), np.asarray(reference, "float64")
    if tiled.shape != reference.shape or tiled.ndim != 3:
        raise ValueError(f"tiled {tiled.shape} and reference {reference.shape} must be the same (y, x, D) grid")
    deviation = np.linalg.norm(tiled - reference, axis=-1)
    spread = np.linalg.norm(reference - reference.mean((0, 1)), axis=-1).mean()
    seam = seam_positions(tiled.shape[0], chip_size, margin)[:, None] | seam_positions(tiled.shape[1], chip_size, margin)
    interior = (chip_size - 2 * margin) // PATCH_SIZE
    across, within = [], []
    for axis in (0, 1):
        step = np.moveaxis(np.linalg.norm(np.diff(tiled, axis=axis), axis=-1), axis, 0)  # patch i to i + 1
        boundary = np.arange(step.shape[0]) % interior == interior - 1
        across.append(step[boundary].ravel())
        within.append(step[~boundary].ravel())
    return {"relative_deviation": float(deviation.mean() / spread),
            "seam_metric": float(deviation[seam].mean() / deviation[~seam].mean()),
            "step_ratio": float(np.concatenate(across).mean() / np.concatenate(within).mean())}


@dataclass(frozen=True)
class Chip:
    """One chip: pixel window in input coordinates (may extend past the edges) and the
    patch-grid rows/cols its interior fills.

    Examples
    --------
    >>> Chip(0, 0, -32, -32, 224, 0, 0, 10, 10).patch_slices
    (slice(0, 10, None), slice(0, 10, None))
    """

    row: int
    col: int
    y0: int
    x0: int
    size: int
    py0: int
    px0: int
    ph: int
    pw: int

    @property
    def patch_slices(self) -> tuple[slice, slice]:
        return slice(self.py0, self.py0 + self.ph), slice(self.px0, self.px0 + self.pw)


@dataclass(frozen=True)
class ChipGrid:
    """Chips with overlap over ``geobox``; see the module docstring for the geometry.

    Parameters
    ----------
    geobox : odc.geo.geobox.GeoBox
        Pixel grid of the input (10 m).
    chip_size : int
        Chip side in pixels, a multiple of 16.
    margin : int
        Pixels discarded on each side of a chip, a multiple of 16, ``2 * margin < chip_size``.

    Examples
    --------
    >>> from odc.geo.geobox import GeoBox
    >>> gbox = GeoBox.from_bbox((0, 0, 3200, 3200), "EPSG:32631", resolution=10)
    >>> [c.y0 for c in ChipGrid(gbox, 128, 32).chips()][:4]
    [-32, -32, -32, -32]
    """

    geobox: GeoBox
    chip_size: int
    margin: int

    def __post_init__(self) -> None:
        if self.chip_size <= 0 or self.chip_size % PATCH_SIZE:
            raise ValueError(f"chip_size={self.chip_size} is not a positive multiple of {PATCH_SIZE} "
                             f"pixels; use e.g. {max(PATCH_SIZE, round(self.chip_size / PATCH_SIZE) * PATCH_SIZE)}")
        if self.margin < 0 or self.margin % PATCH_SIZE:
            raise ValueError(f"overlap margin={self.margin} must be a non-negative multiple of "
                             f"{PATCH_SIZE} pixels, e.g. {default_margin(self.chip_size)}")
        if 2 * self.margin >= self.chip_size:
            raise ValueError(f"overlap margin={self.margin} leaves no interior in a {self.chip_size} px "
                             f"chip; use margin < chip_size / 2, e.g. {default_margin(self.chip_size)}")

    @property
    def stride(self) -> int:
        return self.chip_size - 2 * self.margin

    @property
    def patch_geobox(self) -> GeoBox:
        """The 160 m patch grid, derived from the input GeoBox (same origin, 16x pixel size)."""
        return self.geobox.zoom_out(PATCH_SIZE)

    @property
    def n_chips(self) -> tuple[int, int]:
        ph, pw = self.patch_geobox.shape
        sp = self.stride // PATCH_SIZE
        return math.ceil(ph / sp), math.ceil(pw / sp)

    def chip(self, row: int, col: int) -> Chip:
        ph, pw = self.patch_geobox.shape
        sp = self.stride // PATCH_SIZE
        py0, px0 = row * sp, col * sp
        return Chip(row, col, row * self.stride - self.margin, col * self.stride - self.margin,
                    self.chip_size, py0, px0, min(sp, ph - py0), min(sp, pw - px0))

    def chips(self, rows: range | None = None, cols: range | None = None) -> Iterator[Chip]:
        ny, nx = self.n_chips
        for r in rows if rows is not None else range(ny):
            for c in cols if cols is not None else range(nx):
                yield self.chip(r, c)


OVERLAP_SETTINGS = {
    "default": default_margin,
    "fast": lambda chip_size: FAST_MARGIN,
}
"""Named overlap settings of ``terrafm.embed(overlap=...)``: chip size -> pixels per side."""
