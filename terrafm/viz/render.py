"""Turn georeferenced rasters into web-map overlays: reproject to Web Mercator, resample, colour, PNG.

No widget code here: :func:`render_overlay` returns an :class:`Overlay` (RGBA pixels, EPSG:4326
bounds, legend description) that :mod:`terrafm.viz.layers` puts on a leafmap map.

Leaflet draws an image overlay as a rectangle stretched linearly between its south-west and
north-east corners in Web Mercator (EPSG:3857) screen space. So the raster is warped to
EPSG:3857 first; its 3857 bounds then map exactly to a lon/lat rectangle (Mercator is separable).
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

logger = logging.getLogger(__name__)

Kind = Literal["rgb", "continuous", "categorical", "mask"]
WEB_MERCATOR = "EPSG:3857"
MIN_SIZE = 512      # small grids are upsampled (nearest) so 160 m cells stay crisp in the browser
MAX_SIZE = 1024     # large areas are downsampled: the overlay never exceeds this many pixels a side

CONTINUOUS_NAMES = {"similarity", "distance", "cosine_distance", "probability", "score"}
CATEGORICAL_NAMES = {"class", "cluster", "classes", "label"}
MASK_NAMES = {"changed", "selection", "mask"}


@dataclass
class Overlay:
    """A rendered overlay: RGBA pixels in EPSG:3857, lon/lat bounds and what the legend shows."""

    rgba: np.ndarray                      # (h, w, 4) uint8
    bounds: tuple[tuple[float, float], tuple[float, float]]  # ((south, west), (north, east))
    kind: str
    legend: dict = field(default_factory=dict)

    def png(self) -> bytes:
        """PNG bytes of :attr:`rgba`."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.rgba, mode="RGBA").save(buffer, format="PNG", optimize=False)
        return buffer.getvalue()

    def data_url(self) -> str:
        """``data:image/png;base64,...`` URL for an ipyleaflet ImageOverlay."""
        return "data:image/png;base64," + base64.b64encode(self.png()).decode("ascii")


def guess_kind(data: xr.DataArray) -> str:
    """Pick the rendering of ``data`` from its dims, name and dtype."""
    extra = [d for d in data.dims if d not in ("y", "x")]
    if extra:
        return "rgb"
    name = (data.name or "").lower()
    if name in MASK_NAMES:
        return "mask"
    if name in CATEGORICAL_NAMES or "classes" in data.attrs:
        return "categorical"
    if name in CONTINUOUS_NAMES or np.issubdtype(data.dtype, np.floating):
        return "continuous"
    return "categorical"


def as_layer_array(data: Any, kind: str | None = None) -> tuple[xr.DataArray, str]:
    """Normalise what the user passes into a (y, x) or (band, y, x) DataArray plus its kind.

    Accepts an embedding DataArray (coloured with :func:`terrafm.analysis.to_rgb`), an RGB
    DataArray (y, x, band), a (y, x) map, the Dataset of :func:`terrafm.analysis.change`
    (``changed`` or ``distance``) or of ``Classifier.predict`` (``class``).
    """
    if isinstance(data, xr.Dataset):
        for var in ("class", "changed", "distance", "similarity"):
            if var in data.data_vars:
                da = data[var]
                if var == "class" and "classes" in data.attrs:
                    da = da.assign_attrs(classes=list(data.attrs["classes"]))
                data = da.rio.write_crs(data.rio.crs) if data.rio.crs is not None and da.rio.crs is None else da
                break
        else:
            raise ValueError(
                f"cannot show a Dataset with variables {list(data.data_vars)}; pass one DataArray, e.g. ds['changed']"
            )
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"expected an xarray DataArray or Dataset, got {type(data).__name__}")
    if "time" in data.dims:
        if data.sizes["time"] != 1:
            raise ValueError(
                f"data has {data.sizes['time']} dates; pick one with data.isel(time=i) or data.sel(time=...)"
            )
        data = data.isel(time=0)
    missing = {"y", "x"} - set(data.dims)
    if missing:
        raise ValueError(f"data has dims {data.dims} but a map needs 'y' and 'x'; rename or select dims first")
    if data.rio.crs is None:
        raise ValueError(
            "data has no CRS, so it cannot be placed on the map; set it with data.rio.write_crs('EPSG:32633') "
            "(the real CRS of your grid; terrafm.embed() sets it)"
        )
    if "embedding" in data.dims:
        if kind not in (None, "rgb"):
            raise ValueError(f"an embedding array can only be shown as kind='rgb', not {kind!r}")
        from ..analysis import to_rgb

        data = to_rgb(data, method="pca")
        kind = "rgb"
    kind = kind or guess_kind(data)
    if kind not in ("rgb", "continuous", "categorical", "mask"):
        raise ValueError(f"kind must be 'rgb', 'continuous', 'categorical' or 'mask', got {kind!r}")
    extra = [d for d in data.dims if d not in ("y", "x")]
    if kind == "rgb":
        if len(extra) != 1 or data.sizes[extra[0]] not in (3, 4):
            raise ValueError(
                f"kind='rgb' needs a (y, x, band) array with 3 bands, got dims {dict(data.sizes)}; colour "
                "embeddings with terrafm.analysis.to_rgb(emb) or pass a single-band map with kind='continuous'"
            )
        data = data.transpose(extra[0], "y", "x")
        if data.sizes[extra[0]] == 4:
            data = data.isel({extra[0]: slice(0, 3)})
    elif extra:
        raise ValueError(
            f"kind={kind!r} needs a (y, x) array but got extra dims {extra}; select one band or use kind='rgb'"
        )
    return data, kind


def _rgb_unit(values: np.ndarray) -> np.ndarray:
    """RGB values as float in [0, 1]: uint8 divided by 255, floats must already be in [0, 1]."""
    if np.issubdtype(values.dtype, np.integer):
        if values.max(initial=0) > 255 or values.min(initial=0) < 0:
            raise ValueError("integer RGB must be 0..255; stretch it first or pass floats in [0, 1]")
        return values.astype(np.float32) / 255.0
    finite = values[np.isfinite(values)]
    if finite.size and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
        raise ValueError(
            f"RGB values span [{finite.min():.3g}, {finite.max():.3g}] but must lie in [0, 1]; this does not look "
            "like an RGB image — use terrafm.analysis.to_rgb(emb), or kind='continuous' for a single-band map"
        )
    return np.clip(values.astype(np.float32), 0, 1)


def _target_grid(src: xr.DataArray, max_size: int, min_size: int):
    """Web Mercator (transform, (height, width), shrinking) covering ``src``'s whole footprint.

    The extent is the densified envelope of the source bounds; the pixel count starts from the
    source's (same ground resolution) and is clamped to [min_size, max_size] on the longest side.
    """
    from pyproj import Transformer
    from rasterio.transform import from_bounds

    left, bottom, right, top = src.rio.bounds()
    to_merc = Transformer.from_crs(src.rio.crs, WEB_MERCATOR, always_xy=True)
    m_left, m_bottom, m_right, m_top = to_merc.transform_bounds(left, bottom, right, top, densify_pts=64)
    # ground resolution of the source expressed in Mercator metres at this latitude
    cell = max(abs(right - left) / src.sizes["x"], abs(top - bottom) / src.sizes["y"])
    scale_factor = (m_top - m_bottom) / max(top - bottom, 1e-9)
    native = max(m_right - m_left, m_top - m_bottom) / (cell * scale_factor)
    if native > max_size:
        longest = max_size
    elif native < min_size:
        longest = native * math.ceil(min_size / native)
    else:
        longest = native
    aspect = (m_top - m_bottom) / (m_right - m_left)
    if aspect <= 1:
        width, height = int(round(longest)), max(1, int(round(longest * aspect)))
    else:
        height, width = int(round(longest)), max(1, int(round(longest / aspect)))
    transform = from_bounds(m_left, m_bottom, m_right, m_top, width, height)
    return transform, (height, width), native > max_size


def to_web_mercator(data: xr.DataArray, kind: str, max_size: int = MAX_SIZE,
                    min_size: int = MIN_SIZE) -> xr.DataArray:
    """Warp ``data`` to EPSG:3857 at most ``max_size`` pixels a side (NaN outside / where invalid).

    Downsampling averages (RGB, continuous) or takes the mode (classes, masks); upsampling and
    same-size warps use nearest so cells keep sharp edges.
    """
    from rasterio.enums import Resampling

    transform, shape, shrinking = _target_grid(data, max_size, min_size)
    if not shrinking:
        resampling = Resampling.nearest
    else:
        resampling = Resampling.average if kind in ("rgb", "continuous") else Resampling.mode
    src = data.astype(np.float32)
    keep = [c for c in src.coords if c in src.dims or c == "spatial_ref"]
    src = src.drop_vars([c for c in src.coords if c not in keep])
    src = src.rio.write_nodata(np.nan, encoded=False)
    out = src.rio.reproject(WEB_MERCATOR, shape=shape, transform=transform, resampling=resampling, nodata=np.nan)
    if shrinking:
        logger.info("overlay downsampled from %dx%d cells to %dx%d px", data.sizes["y"], data.sizes["x"], *shape)
    return out


def lonlat_bounds(mercator: xr.DataArray) -> tuple[tuple[float, float], tuple[float, float]]:
    """((south, west), (north, east)) of a Web Mercator raster, the form ipyleaflet expects."""
    from pyproj import Transformer

    left, bottom, right, top = mercator.rio.bounds()
    to_lonlat = Transformer.from_crs(WEB_MERCATOR, "EPSG:4326", always_xy=True)
    west, south = to_lonlat.transform(left, bottom)
    east, north = to_lonlat.transform(right, top)
    return (float(south), float(west)), (float(north), float(east))


def palette(n: int, cmap: str | Sequence[str] | None = None) -> list[str]:
    """``n`` hex colours: a list passed through, else a qualitative matplotlib colormap."""
    if cmap is not None and not isinstance(cmap, str):
        colours = list(cmap)
        if len(colours) < n:
            raise ValueError(f"{n} classes but only {len(colours)} colours given; pass at least {n}")
        return colours[:n]
    import matplotlib
    from matplotlib.colors import to_hex

    name = cmap or ("tab10" if n <= 10 else "tab20")
    cm = matplotlib.colormaps[name]
    count = getattr(cm, "N", 256)
    if count < 256:  # qualitative map: take its listed colours in order
        return [to_hex(cm(i % count)) for i in range(n)]
    return [to_hex(cm(v)) for v in np.linspace(0, 1, max(n, 2))[:n]]


def _hex_to_rgb(colour: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.array(to_rgb(colour), dtype=np.float32)


def colourise(
    values: np.ndarray,
    kind: str,
    cmap: str | Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    classes: Sequence[str] | None = None,
    colour: str = "#ff2d2d",
) -> tuple[np.ndarray, dict]:
    """RGBA uint8 pixels plus the legend description for ``values`` (NaN -> transparent).

    ``values`` is (3, h, w) in [0, 1] for ``rgb``; (h, w) otherwise: continuous values mapped
    through ``cmap`` between ``vmin`` and ``vmax`` (default: the 2nd and 98th percentiles),
    integer class ids, or a 0/1 mask drawn in ``colour``.
    """
    if kind == "rgb":
        rgb = np.moveaxis(_rgb_unit(values), 0, -1)
        alpha = np.isfinite(rgb).all(-1)
        out = np.zeros(rgb.shape[:2] + (4,), dtype=np.uint8)
        out[..., :3] = np.round(np.nan_to_num(rgb) * 255).astype(np.uint8)
        out[..., 3] = np.where(alpha, 255, 0)
        return out, {"type": "rgb"}
    finite = np.isfinite(values)
    out = np.zeros(values.shape + (4,), dtype=np.uint8)
    if kind == "continuous":
        import matplotlib

        cm = matplotlib.colormaps[cmap or "viridis"]
        data = values[finite]
        lo = float(np.percentile(data, 2)) if vmin is None and data.size else (vmin if vmin is not None else 0.0)
        hi = float(np.percentile(data, 98)) if vmax is None and data.size else (vmax if vmax is not None else 1.0)
        span = hi - lo if hi > lo else 1.0
        scaled = np.clip((np.nan_to_num(values) - lo) / span, 0, 1)
        out[...] = np.round(cm(scaled) * 255).astype(np.uint8)
        out[..., 3] = np.where(finite, 255, 0)
        stops = [matplotlib.colors.to_hex(cm(v)) for v in np.linspace(0, 1, 11)]
        return out, {"type": "colorbar", "vmin": lo, "vmax": hi, "stops": stops, "cmap": cm.name}
    if kind == "mask":
        on = finite & (np.nan_to_num(values) > 0.5)
        out[on, :3] = np.round(_hex_to_rgb(colour) * 255).astype(np.uint8)
        out[on, 3] = 255
        return out, {"type": "categorical", "entries": [(str(classes[0]) if classes else "selected", colour)]}
    ids = np.where(finite, np.nan_to_num(values), -1).round().astype(np.int64)
    n = int(max(ids.max(initial=-1) + 1, len(classes) if classes is not None else 0))
    if n <= 0:
        return out, {"type": "categorical", "entries": []}
    colours = palette(n, cmap)
    table = np.stack([_hex_to_rgb(c) for c in colours])
    on = ids >= 0
    out[on, :3] = np.round(table[ids[on]] * 255).astype(np.uint8)
    out[on, 3] = 255
    names = list(classes) if classes is not None else [str(i) for i in range(n)]
    return out, {"type": "categorical", "entries": [(str(names[i]), colours[i]) for i in range(n)]}


def render_overlay(
    data: Any,
    kind: Kind | None = None,
    cmap: str | Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    classes: Sequence[str] | None = None,
    colour: str = "#ff2d2d",
    max_size: int = MAX_SIZE,
    min_size: int = MIN_SIZE,
) -> Overlay:
    """Render a georeferenced map as a Web Mercator RGBA overlay with lon/lat bounds and a legend.

    Parameters
    ----------
    data : xr.DataArray or xr.Dataset
        An embedding (coloured by PCA), an RGB image (y, x, band in [0, 1]), a similarity /
        distance map, a class map, a 0/1 mask, or a Dataset from ``change`` / ``predict``.
        Must carry a CRS (``data.rio.crs``).
    kind : {"rgb", "continuous", "categorical", "mask"}, optional
        How to draw it; guessed from dims, name and dtype when omitted.
    cmap, vmin, vmax
        Colormap (matplotlib name, or a list of colours for classes) and continuous range
        (default 2nd–98th percentile).
    classes : list of str, optional
        Class names for the legend (default ``data.attrs["classes"]``).
    colour : str
        Colour of a mask.
    max_size, min_size : int
        The longest overlay side is kept in [min_size, max_size] pixels: large areas are
        downsampled, small grids upsampled with nearest so cells stay sharp.

    Returns
    -------
    Overlay

    Examples
    --------
    >>> overlay = render_overlay(terrafm.analysis.similarity(emb, (13.4, 52.5)))  # doctest: +SKIP
    >>> overlay.bounds, overlay.rgba.shape                                         # doctest: +SKIP
    """
    array, kind = as_layer_array(data, kind)
    if classes is None and "classes" in array.attrs:
        classes = list(array.attrs["classes"])
    if kind == "rgb":  # refuse non-RGB before warping; uint8 becomes [0, 1] floats
        array = array.copy(data=_rgb_unit(np.asarray(array.values)))
    mercator = to_web_mercator(array, kind, max_size=max_size, min_size=min_size)
    rgba, legend = colourise(np.asarray(mercator.values), kind, cmap=cmap, vmin=vmin, vmax=vmax,
                             classes=classes, colour=colour)
    return Overlay(rgba=rgba, bounds=lonlat_bounds(mercator), kind=kind, legend=legend)
