"""Checks of a Dataset before any model work: its grid, its values, and the model's parameters.

:func:`terrafm.embed` calls :func:`check_dataset` first, so a wrong input fails in milliseconds
with the fix instead of after the compute (or, worse, gives wrong embeddings without a word).

Grid (:func:`check_grid`)
    A geographic CRS, a zero step, non-square pixels and a ground pixel size more than
    :data:`PIXEL_SIZE_ERROR` away from the model's 10 m are refused with the reprojection to
    make; between :data:`PIXEL_SIZE_TOLERANCE` and :data:`PIXEL_SIZE_ERROR` it warns. Rows stored
    south-up (ascending ``y``) or columns east-to-west are flipped to north-up (exact: rows are
    reversed, nothing is resampled) and a log line says so; the embedding is then north-up.
Values (:func:`check_values`)
    Each modality's stored values are checked against its registry entry
    (:class:`terrafm.sensors.Plausibility`: dtypes, plausible and typical ranges, recognised unit
    mistakes such as S1 in dB or S2 reflectance 0-1), its ``mask_<key>`` must be boolean, and the
    output of :func:`terrafm.prepare.normalize` must hold normalized values. Only a deterministic
    sample is read: :data:`SAMPLE_WINDOWS` windows of :data:`SAMPLE_WINDOW` pixels at up to
    :data:`SAMPLE_TIMES` dates, so the cost does not grow with the area.
Model (:func:`check_model`)
    A model with NaN or infinite parameters is refused, naming them.

The rules are tabulated in the README, "Validation rules".

Examples
--------
>>> import numpy as np, xarray as xr
>>> ds = xr.Dataset({"s1_vv": (("y", "x"), np.full((4, 4), -12.0, "float32")),
...                  "s1_vh": (("y", "x"), np.full((4, 4), -19.0, "float32"))})
>>> check_values(ds)
Traceback (most recent call last):
...
ValueError: s1 looks like dB (100% of sampled values in [-100, 0)): pass linear power (10 ** (dB / 10)): ds[v] = 10 ** (ds[v] / 10) for s1_vv and s1_vh (terrafm converts power to dB itself) (see README, 'Validation rules')
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, Sequence

import numpy as np
import xarray as xr

from . import sensors

__all__ = ["InputWarning", "check_dataset", "check_grid", "check_values", "check_model",
           "sample_windows", "sample_times", "SAMPLE_WINDOW", "SAMPLE_WINDOWS", "SAMPLE_TIMES",
           "PIXEL_SIZE_TOLERANCE", "PIXEL_SIZE_ERROR"]

logger = logging.getLogger(__name__)

SAMPLE_WINDOW = 32
"""Side in pixels of one sampled window."""

SAMPLE_WINDOWS = 5
"""Windows sampled per date: the centre and the four corners."""

SAMPLE_TIMES = 3
"""Dates sampled: the first, the middle and the last."""

PIXEL_SIZE_TOLERANCE = 0.01
"""Relative deviation of the ground pixel size from 10 m accepted without a word."""

PIXEL_SIZE_ERROR = 0.05
"""Relative deviation from 10 m (or between the two axes) beyond which a grid is refused."""


class InputWarning(UserWarning):
    """Input that is plausible but unusual (borderline values, a pixel size slightly off 10 m)."""


def _see(message: str) -> str:
    return f"{message} (see {sensors.VALIDATION_RULES})"


# =================================================================================================
# sampling
# =================================================================================================
def sample_windows(height: int, width: int, size: int = SAMPLE_WINDOW) -> list[tuple[slice, slice]]:
    """The deterministic windows sampled from a ``height x width`` grid: one from the centre and
    one in each corner (nodata markers and footprint edges show there), fewer when they
    coincide, each ``size`` pixels a side (clipped to the grid). The centre window starts at the
    centre rather than straddling it, so on dask chunks of power-of-two sizes every window reads
    one chunk.

    Examples
    --------
    >>> sample_windows(64, 64, 32)[:2]
    [(slice(32, 64, None), slice(32, 64, None)), (slice(0, 32, None), slice(0, 32, None))]
    >>> len(sample_windows(1000, 2000)), len(sample_windows(20, 20))
    (5, 1)
    """
    wy, wx = min(size, height), min(size, width)
    starts = [(min(height // 2, height - wy), min(width // 2, width - wx)),
              (0, 0), (0, width - wx), (height - wy, 0), (height - wy, width - wx)][:SAMPLE_WINDOWS]
    windows: list[tuple[slice, slice]] = []
    for y0, x0 in starts:
        window = (slice(y0, y0 + wy), slice(x0, x0 + wx))
        if window not in windows:
            windows.append(window)
    return windows


def sample_times(n: int, k: int = SAMPLE_TIMES) -> list[int]:
    """Indices of the dates sampled among ``n``: evenly spread, first and last included.

    Examples
    --------
    >>> sample_times(10), sample_times(2), sample_times(1)
    ([0, 4, 9], [0, 1], [0])
    """
    if n <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n)).astype(int)} | {n - 1})


def _pieces(da: xr.DataArray, times: list[int] | None, windows) -> list[Any]:
    """``da``'s sampled windows as (lazy or numpy) arrays ``(..., y, x)``."""
    out = []
    for t in times if times is not None else [None]:
        picked = da if t is None or "time" not in da.dims else da.isel(time=t)
        for ys, xs in windows:
            out.append(picked.isel(y=ys, x=xs).data)
    return out


def _compute(pieces: list[Any]) -> list[np.ndarray]:
    """Compute the lazy pieces together (one dask graph: shared reads), numpy as is."""
    lazy = [i for i, p in enumerate(pieces) if hasattr(p, "compute")]
    values = list(pieces)
    if lazy:
        import dask

        for i, value in zip(lazy, dask.compute(*[pieces[i] for i in lazy])):
            values[i] = value
    return [np.asarray(v) for v in values]


# =================================================================================================
# grid
# =================================================================================================
def _crs(ds: xr.Dataset):
    import odc.geo.xr  # noqa: F401  (registers .odc)

    try:
        return ds.odc.crs
    except Exception:  # no or unreadable spatial_ref: terrafm.embed's own check explains
        return None


def _centre_lonlat(ds: xr.Dataset, crs) -> tuple[float, float] | None:
    x = float(np.mean(ds["x"].values[[0, -1]]))
    y = float(np.mean(ds["y"].values[[0, -1]]))
    if crs.geographic:
        return x, y
    try:
        from pyproj import Transformer

        lon, lat = Transformer.from_crs(crs.proj, "EPSG:4326", always_xy=True).transform(x, y)
    except Exception:
        return None
    return (float(lon), float(lat)) if np.isfinite([lon, lat]).all() else None


def _utm(lonlat) -> str:
    from odc.geo.crs import CRS

    if lonlat is None:
        return "EPSG:326<zone>"
    return str(CRS.utm(*lonlat))


def _crs_name(crs) -> str:
    return f"EPSG:{crs.epsg}" if crs.epsg else crs.to_wkt()


def _scale_factors(crs, lonlat) -> tuple[float, float]:
    """Map distance / ground distance along x and y at ``lonlat`` (1 where unknown)."""
    if lonlat is None:
        return 1.0, 1.0
    try:
        from pyproj import Proj

        factors = Proj(crs.proj).get_factors(*lonlat)
        kx, ky = float(factors.parallel_scale), float(factors.meridional_scale)
    except Exception:
        return 1.0, 1.0
    return (kx, ky) if np.isfinite([kx, ky]).all() and kx > 0 and ky > 0 else (1.0, 1.0)


def _flip(ds: xr.Dataset, dim: str) -> xr.Dataset:
    flipped = ds.isel({dim: slice(None, None, -1)})
    for name in [n for n, c in flipped.coords.items() if "GeoTransform" in c.attrs]:
        # rioxarray's cached transform describes the old order; the grid is read from the coordinates
        attrs = {k: v for k, v in flipped[name].attrs.items() if k != "GeoTransform"}
        flipped = flipped.assign_coords({name: flipped[name].copy().assign_attrs(attrs)})
        flipped[name].attrs = attrs
    return flipped


def check_grid(ds: xr.Dataset) -> xr.Dataset:
    """Check the Dataset's grid against the model's 10 m input; returns it, flipped if needed.

    Refused (``ValueError`` with the fix): a geographic CRS (degrees), a zero step (duplicate
    coordinates, "resolution 0"), non-square pixels and a ground pixel size more than
    :data:`PIXEL_SIZE_ERROR` from 10 m, measured in metres on the ground (CRS units and the
    projection's scale factor at the centre: 10 m of Web Mercator at 60 N are 5 m). Warned
    (:class:`InputWarning`): a size between :data:`PIXEL_SIZE_TOLERANCE` and
    :data:`PIXEL_SIZE_ERROR` off. Flipped, with a log line: rows stored south-up (ascending
    ``y``) or columns east-to-west; reversing them is exact and the result is north-up.
    A Dataset without ``y``/``x`` dims, a CRS or a regular grid is returned as is
    (:func:`terrafm.embed` explains those).

    Examples
    --------
    >>> import numpy as np, xarray as xr, rioxarray
    >>> ds = xr.Dataset({"s1_vv": (("y", "x"), np.ones((3, 3)))},
    ...                 coords={"y": [5e6 + 5, 5e6 + 15, 5e6 + 25], "x": [5e5 + 5, 5e5 + 15, 5e5 + 25]})
    >>> ds = ds.rio.write_crs("EPSG:32632")
    >>> check_grid(ds).y.values.tolist()            # south-up rows come back north-up
    [5000025.0, 5000015.0, 5000005.0]
    >>> check_grid(ds.assign_coords(x=[5e5 + 5, 5e5 + 25, 5e5 + 45]))
    Traceback (most recent call last):
    ...
    ValueError: the pixels are 20 x 10 m (x by y), not square: TerraFM reads square 10 m pixels. Resample: ds = ds.odc.reproject('EPSG:32632', resolution=10) (nearest for DN and masks), or load at 10 m with terrafm.stac.load(items, aoi, resolution=10) (see README, 'Validation rules')
    """
    if "y" not in ds.dims or "x" not in ds.dims:
        return ds
    steps: dict[str, float] = {}
    for dim in ("y", "x"):
        coord = np.asarray(ds[dim].values, dtype="float64")
        if coord.size < 2:
            continue
        step = np.diff(coord)
        if (step == 0).any():
            raise ValueError(_see(
                f"the Dataset's {dim!r} coordinate repeats a value (a step, i.e. a resolution, of 0): it is not a "
                "grid. Drop the duplicates (ds = ds.drop_duplicates('%s')) or reload it with terrafm.stac.load" % dim))
        if (np.sign(step) != np.sign(step[0])).any() or np.abs(step - step[0]).max() > 1e-6 * abs(step[0]):
            return ds     # irregular: terrafm.embed's grid check names the fix
        steps[dim] = float((coord[-1] - coord[0]) / (coord.size - 1))
    crs = _crs(ds)
    if crs is None or not steps:
        return ds
    lonlat = _centre_lonlat(ds, crs)
    if crs.geographic:
        raise ValueError(_see(
            f"the Dataset is in a geographic CRS ({_crs_name(crs)}, pixels in degrees); TerraFM needs a projected 10 m grid. "
            f"Reproject it to its UTM zone: ds = ds.odc.reproject('{_utm(lonlat)}', resolution=10), or load it with "
            "terrafm.stac.load(items, aoi) (UTM, 10 m by default)"))
    if steps.get("y", -1.0) > 0:
        logger.warning("the Dataset's rows are stored south-up (y ascending): embedding its north-up flip "
                       "(rows reversed, exact); the embedding is north-up (y descending)")
        ds = _flip(ds, "y")
        steps["y"] = -steps["y"]
    if steps.get("x", 1.0) < 0:
        logger.warning("the Dataset's columns run east to west (x descending): embedding its flip "
                       "(columns reversed, exact); the embedding has x ascending")
        ds = _flip(ds, "x")
        steps["x"] = -steps["x"]

    unit = crs.proj.axis_info[0].unit_conversion_factor if crs.proj.axis_info else 1.0
    kx, ky = _scale_factors(crs, lonlat)
    distorted = abs(kx - 1) > PIXEL_SIZE_TOLERANCE or abs(ky - 1) > PIXEL_SIZE_TOLERANCE
    if not distorted:      # UTM and other conformal grids near their centre: CRS metres are ground metres
        kx = ky = 1.0
    ground = {"x": abs(steps["x"]) * unit / kx if "x" in steps else None,
              "y": abs(steps["y"]) * unit / ky if "y" in steps else None}
    sizes = [g for g in ground.values() if g is not None]
    target = _utm(lonlat) if distorted or unit != 1.0 else _crs_name(crs)
    fix = (f"Resample: ds = ds.odc.reproject('{target}', resolution={sensors.PIXEL_SIZE:g}) (nearest for DN and "
           f"masks), or load at {sensors.PIXEL_SIZE:g} m with terrafm.stac.load(items, aoi, "
           f"resolution={sensors.PIXEL_SIZE:g})")
    measured = ""
    if unit != 1.0 or distorted:
        measured = (f" on the ground ({abs(steps.get('x', steps.get('y'))):g} {crs.proj.axis_info[0].unit_name} "
                    f"of {_crs_name(crs)}, scale factor {kx:.3g} at the centre)")
    if len(sizes) == 2 and abs(sizes[0] - sizes[1]) > PIXEL_SIZE_ERROR * max(sizes):
        raise ValueError(_see(f"the pixels are {ground['x']:.3g} x {ground['y']:.3g} m (x by y){measured}, not square: "
                              f"TerraFM reads square {sensors.PIXEL_SIZE:g} m pixels. {fix}"))
    size = float(np.mean(sizes))
    off = size / sensors.PIXEL_SIZE - 1
    if abs(off) > PIXEL_SIZE_ERROR:
        raise ValueError(_see(f"the pixels are {size:.3g} m{measured}; TerraFM was trained on {sensors.PIXEL_SIZE:g} m "
                              f"pixels (a 16 px patch is 160 m). {fix}"))
    if abs(off) > PIXEL_SIZE_TOLERANCE:
        warnings.warn(_see(f"the pixels are {size:.4g} m{measured}, {off:+.1%} off TerraFM's {sensors.PIXEL_SIZE:g} m: "
                           f"embedding anyway. {fix}"), InputWarning, stacklevel=3)
    return ds


# =================================================================================================
# values
# =================================================================================================
def _inputs(ds: xr.Dataset, modalities: Sequence[str] | None) -> list[tuple[sensors.Modality, bool]]:
    """(modality, already normalized) for each modality the Dataset feeds, as embed reads them."""
    from . import prepare

    normalized = [m for m in sensors.MODALITIES.values() if m.key in ds.data_vars and m.band_dim in ds[m.key].dims]
    if normalized:
        found = [(m, True) for m in normalized]
    else:
        found = [(sensors.MODALITIES[k], False) for k in prepare.detect_modalities(ds) if k in sensors.MODALITIES]
        found = [(m, raw) for m, raw in found if all(v in ds.data_vars for v in m.variables)]
    return [(m, norm) for m, norm in found if modalities is None or m.key in modalities]


def _per_date(m: sensors.Modality, stored: np.ndarray, mask, dates, per_date: int) -> list[str]:
    """Errors of the sampled dates checked one by one (one date in another unit among many)."""
    for i, date in enumerate(dates):
        part = slice(i * per_date, (i + 1) * per_date)
        found, _ = m.check_values(stored[part], None if mask is None else mask[part])
        if found:
            return [f"on {str(date)[:10]}: {message}" for message in found]
    return []


def check_values(ds: xr.Dataset, modalities: Sequence[str] | None = None) -> None:
    """Check a deterministic sample of each modality's values against the registry.

    Stored bands (``<key>_<band>``) by :meth:`terrafm.sensors.Modality.check_values` (dtype,
    recognised unit mistakes, plausible range, typical median), ``mask_<key>`` by
    :meth:`~terrafm.sensors.Modality.check_mask`, the output of :func:`terrafm.prepare.normalize`
    by :meth:`~terrafm.sensors.Modality.check_normalized`. Reads :func:`sample_windows` at
    :func:`sample_times` only (one dask compute). Raises one ``ValueError`` listing every error;
    warns (:class:`InputWarning`) for borderline values.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"s1_vv": (("y", "x"), np.full((4, 4), 0.08, "float32")),
    ...                  "s1_vh": (("y", "x"), np.full((4, 4), 0.02, "float32"))})
    >>> check_values(ds)                       # linear power: fine
    """
    if "y" not in ds.dims or "x" not in ds.dims:
        return
    inputs = _inputs(ds, modalities)
    if not inputs:
        return
    windows = sample_windows(ds.sizes["y"], ds.sizes["x"])
    times = sample_times(ds.sizes["time"]) if "time" in ds.dims else None
    if times == [] or 0 in (ds.sizes["y"], ds.sizes["x"]):
        return
    plan: list[tuple[sensors.Modality, bool, list[str], str | None]] = []
    pieces: list[Any] = []
    for m, normalized in inputs:
        names = [m.key] if normalized else list(m.variables)
        mask = m.mask_variable if m.mask_variable in ds.data_vars or m.mask_variable in ds.coords else None
        plan.append((m, normalized, names, mask))
        for name in names + ([mask] if mask else []):
            da = ds[name]
            if normalized and name == m.key:
                da = da.transpose(..., m.band_dim, "y", "x")
            pieces.extend(_pieces(da, times, windows))
    values = iter(_compute(pieces))
    n = len(windows) * (len(times) if times is not None else 1)
    errors: list[str] = []
    for m, normalized, names, mask in plan:
        per_name = {name: [next(values) for _ in range(n)] for name in names + ([mask] if mask else [])}
        masks = np.stack(per_name[mask]) if mask else None
        if masks is not None:
            errors += m.check_mask(masks)
        if normalized:
            errors += m.check_normalized(np.stack(per_name[m.key]))
            continue
        stored = np.stack([np.stack(per_name[v]) for v in names], axis=-3)   # (pieces, C, y, x)
        usable_mask = masks if masks is not None and not m.check_mask(masks) else None
        found, warned = m.check_values(stored, usable_mask)
        if not found and times is not None and len(times) > 1:
            found = _per_date(m, stored, usable_mask, ds["time"].values[times], len(windows))
        errors += found
        for message in warned:
            warnings.warn(_see(message), InputWarning, stacklevel=3)
    if errors:
        raise ValueError(_see("; ".join(errors)))


# =================================================================================================
# model
# =================================================================================================
def check_model(model: Any) -> None:
    """Refuse a model (``torch.nn.Module``) with NaN or infinite parameters or buffers, naming them.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> check_model(net)
    >>> with torch.no_grad():
    ...     net.bias[0] = float("nan")
    >>> check_model(net)
    Traceback (most recent call last):
    ...
    ValueError: the model has non-finite parameters: bias (1 of 2 values NaN/inf); its outputs would be NaN. Load a good checkpoint (terrafm.load_weights refuses such files) or rebuild the model with terrafm.create_model (see README, 'Validation rules')
    """
    if "torch" not in sys.modules or not isinstance(model, sys.modules["torch"].nn.Module):
        return
    from .model.weights import non_finite_tensors

    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ValueError(_see(f"the model has non-finite parameters: {bad}; its outputs would be NaN. Load a good "
                              "checkpoint (terrafm.load_weights refuses such files) or rebuild the model with "
                              "terrafm.create_model"))


def check_dataset(ds: xr.Dataset, modalities: Sequence[str] | None = None, model: Any = None) -> xr.Dataset:
    """Everything :func:`terrafm.embed` checks before any compute: :func:`check_grid` (returns the
    Dataset, flipped north-up if needed), :func:`check_values`, and :func:`check_model` when
    ``model`` is a module.

    Examples
    --------
    >>> import numpy as np, xarray as xr, rioxarray
    >>> ds = xr.Dataset({"s1_vv": (("y", "x"), np.full((2, 2), 0.1, "float32")),
    ...                  "s1_vh": (("y", "x"), np.full((2, 2), 0.02, "float32"))},
    ...                 coords={"y": [15.0, 5.0], "x": [5.0, 15.0]}).rio.write_crs("EPSG:32632")
    >>> check_dataset(ds).sizes["y"]
    2
    """
    ds = check_grid(ds)
    check_values(ds, modalities)
    check_model(model)
    return ds
