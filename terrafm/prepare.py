"""From a loaded Dataset to model-ready arrays: pairing, temporal composites, normalization.

Every sensor rule (band variables, validity, DN offset, normalization) comes from the modality
registry :mod:`terrafm.sensors`; this module loops over it.

Examples
--------
>>> import terrafm                                                          # doctest: +SKIP
>>> ds = terrafm.open_sentinel(aoi, "2023-06-01", "2023-08-31")  # doctest: +SKIP
>>> monthly = terrafm.prepare.composite(ds, "month")  # doctest: +SKIP
>>> x = terrafm.prepare.normalize(monthly)                    # s2_l2a: (time, band_s2_l2a, y, x)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import logging
from functools import partial
from typing import Any, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from . import sensors

logger = logging.getLogger(__name__)

__all__ = ["solar_day", "nearest_index", "take_time_steps", "time_gap_attrs", "pair_nearest", "composite",
           "detect_modalities", "normalize", "normalize_block", "normalized_block", "stack_bands", "FILL_VALUE"]

FILL_VALUE = sensors.FILL_VALUE
"""Normalized value written where a pixel is invalid (the band mean)."""


def solar_day(item, lon: float | None = None) -> _dt.date:
    """Local solar date of a STAC item, as odc-stac groups: UTC time + whole hours of lon / 15.

    ``lon`` defaults to the centre of the item's bbox (odc-stac's ``load`` uses the output grid's).

    Examples
    --------
    >>> class I: datetime = _dt.datetime(2021, 6, 5, 23, 30); bbox = (170, 0, 172, 1)
    >>> solar_day(I())
    datetime.date(2021, 6, 6)
    >>> solar_day(I(), lon=14.9)            # less than a whole hour east: still 5 June
    datetime.date(2021, 6, 5)
    """
    from .reading import nominal_datetime, solar_date

    if lon is None:
        lon = (item.bbox[0] + item.bbox[2]) / 2
    return solar_date(nominal_datetime(item), lon)


def nearest_index(target: np.ndarray, source: np.ndarray,
                  window: str | _dt.timedelta = "3D") -> tuple[np.ndarray, np.ndarray]:
    """For each ``target`` time, the position of the nearest ``source`` time within ``window``.

    Returns ``(index, gaps)``: ``index`` is -1 where no source time lies within the window (ties
    go to the earlier source time); ``gaps`` is source minus target time (NaT where -1).

    Examples
    --------
    >>> t = lambda *d: np.array(d, dtype="datetime64[ns]")
    >>> index, gaps = nearest_index(t("2023-06-01", "2023-06-20"), t("2023-05-30", "2023-06-02"), "3D")
    >>> index.tolist(), gaps.astype("timedelta64[D]").tolist()
    ([1, -1], [datetime.timedelta(days=1), None])
    """
    window = pd.Timedelta(window).to_timedelta64()
    target = np.asarray(target, dtype="datetime64[ns]")
    source = np.asarray(source, dtype="datetime64[ns]")
    index = np.full(len(target), -1)
    gaps = np.full(len(target), np.timedelta64("NaT"), dtype="timedelta64[ns]")
    if len(source) and len(target):
        distance = np.abs(source[None, :] - target[:, None])
        nearest = distance.argmin(axis=1)
        within = distance[np.arange(len(target)), nearest] <= window
        index[within] = nearest[within]
        gaps[within] = source[nearest[within]] - target[within]
    return index, gaps


def take_time_steps(data, index: np.ndarray, fill):
    """``data`` (time, ...) re-ordered onto the steps ``index``; -1 marks a step it lacks.

    Works on numpy and dask arrays alike; lacking steps hold ``fill`` and the dtype never
    changes.

    Examples
    --------
    >>> take_time_steps(np.array([[1, 1], [2, 2]], "uint16"), np.array([1, -1, 0]), 0).tolist()
    [[2, 2], [0, 0], [1, 1]]
    """
    if len(index) == data.shape[0] and (index == np.arange(len(index))).all():
        return data
    present = index >= 0
    if data.shape[0] == 0:
        return np.full((len(index),) + data.shape[1:], fill, dtype=data.dtype)
    picked = data[np.where(present, index, 0)]
    if present.all():
        return picked
    wide = (slice(None),) + (None,) * (data.ndim - 1)
    return np.where(present[wide], picked, np.asarray(fill, dtype=data.dtype))


def time_gap_attrs(window: str | _dt.timedelta, modality: "str | sensors.Modality") -> dict:
    """Attributes of ``<key>_time_gap`` for a pairing window (one wording for every pairing).

    Examples
    --------
    >>> time_gap_attrs("3D", "s1")["description"]
    's1 acquisition time minus the paired date; NaT if none within 3 days 00:00:00'
    """
    key = sensors.get_modality(modality).key
    return {"description": f"{key} acquisition time minus the paired date; NaT if none within {pd.Timedelta(window)}"}


def pair_nearest(primary: xr.Dataset, paired: xr.Dataset, window: str | _dt.timedelta = "3D") -> xr.Dataset:
    """Put the paired modalities of ``paired`` (S1) on the time axis of ``primary`` (S2): each date
    gets the nearest acquisition within ``window``.

    Dates without one in the window get the modality's missing value (NaN for S1), mask False and
    ``<key>_time_gap`` NaT; ``<key>_time_gap`` (time) is acquisition time minus the paired date.
    :func:`terrafm.stac.load` pairs the same way when it loads them together.

    Examples
    --------
    >>> paired = pair_nearest(ds_s2, ds_s1, window="6D")                     # doctest: +SKIP
    """
    index, gaps = nearest_index(primary.time.values, paired.time.values, window)
    new = {}
    for m in [m for m in sensors.MODALITIES.values() if m.paired and m.mask_variable in paired]:
        fills = [(v, np.dtype(m.dtype), m.missing_value) for v in m.variables] + [(m.mask_variable, np.dtype(bool), False)]
        for name, dtype, fill in fills:
            var = paired[name].transpose("time", ...)
            data = var.data if var.dtype == dtype else var.data.astype(dtype)
            new[name] = xr.Variable(var.dims, take_time_steps(data, index, fill), dict(var.attrs))
        new[m.gap_variable] = xr.Variable(("time",), gaps, time_gap_attrs(window, m))
        logger.info("paired %d of %d dates with %s within %s", int((index >= 0).sum()), len(index), m.key, window)
    if not new:
        raise ValueError(f"pair_nearest: the second Dataset holds no paired modality "
                         f"({[m.key for m in sensors.MODALITIES.values() if m.paired]}); it has {list(paired.data_vars)}")
    return primary.assign(new)


def _bins(time: xr.DataArray, freq: str | Sequence) -> tuple[np.ndarray, list]:
    t = pd.DatetimeIndex(time.values)
    if isinstance(freq, str):
        if freq == "month":
            labels = t.to_period("M").to_timestamp()
        elif freq == "season":  # DJF, MAM, JJA, SON, labelled by their first month
            start = [12 if m in (12, 1, 2) else 3 * (m // 3) for m in t.month]
            year = [y - 1 if m in (1, 2) else y for y, m in zip(t.year, t.month)]
            labels = pd.DatetimeIndex([pd.Timestamp(y, m, 1) for y, m in zip(year, start)])
        else:
            labels = t.to_period(freq).to_timestamp()
        keys = np.asarray(labels)
        return keys, sorted(set(keys))
    edges = pd.DatetimeIndex(list(freq))
    pos = np.searchsorted(edges.values, t.values, side="right") - 1
    keys = np.where((pos >= 0) & (pos < len(edges) - 1), edges.values[np.clip(pos, 0, len(edges) - 1)],
                    np.datetime64("NaT"))
    return keys, [e for e in edges.values[:-1]]


def composite(ds: xr.Dataset, freq: str | Sequence = "month") -> xr.Dataset:
    """Median of valid observations per time bin, per modality, with the count of valid ones.

    Parameters
    ----------
    ds : xr.Dataset
        Stored bands (``<key>_<band>``) on a ``time`` dimension. The bands present are
        composited, all of a modality's bands or some of them. A pixel enters the median where
        the registry's validity rule (:meth:`terrafm.sensors.Modality.pixel_valid`: nodata,
        finiteness, positivity) holds for every present band of its modality, and, when present,
        ``mask_<key>`` is True and the quality layer (``s2_l2a_SCL``) marks it usable.
    freq : "month", "season" (DJF/MAM/JJA/SON), a pandas period alias, or bin edges
        (a sequence of datetimes; bin i is [edges[i], edges[i+1])).

    Returns
    -------
    xr.Dataset on the bin time axis (bin start): band variables float32 (NaN where no valid
    observation), ``count_<key>`` (uint16) and ``mask_<key>`` = count > 0;
    ``attrs["terrafm_modalities"]`` lists the composited modalities.

    Raises
    ------
    ValueError
        No ``time`` dimension, or no band variable of any modality (e.g. only masks).

    Examples
    --------
    >>> t = pd.to_datetime(["2021-06-01", "2021-06-11", "2021-07-01"])
    >>> ds = xr.Dataset({"s1_vv": ("time", np.array([0.1, 0.3, 0.0], "float32")),
    ...                  "s1_vh": ("time", np.array([0.01, 0.02, 0.03], "float32"))}, coords={"time": t})
    >>> monthly = composite(ds, "month")           # no mask_s1: the registry's rule (power > 0)
    >>> monthly.s1_vv.values.astype(float).round(3).tolist(), monthly.count_s1.values.tolist()
    ([0.2, nan], [2, 0])
    """
    if "time" not in ds.dims:
        raise ValueError(f"composite needs a 'time' dimension to reduce; the Dataset has dims "
                         f"({', '.join(map(str, ds.dims))}). A single date has nothing to composite: use it as "
                         "it is, or give it a time axis with ds.expand_dims(time=[date])")
    detect_modalities(ds)  # old bare band names: the rename error
    present = {m.key: [v for v in m.variables if v in ds.data_vars] for m in sensors.MODALITIES.values()}
    mods = [sensors.MODALITIES[k] for k, names in present.items() if names]
    if not mods:
        raise no_modality_error(ds)
    keys, bins = _bins(ds.time, freq)
    layers = [layer.variable for layer in sensors.LAYERS.values() if layer.variable in ds]
    outs = []
    for b in bins:
        sel = ds.isel(time=np.flatnonzero(keys == b))
        step = xr.Dataset(coords={k: v for k, v in ds.coords.items() if "time" not in v.dims})
        for m in mods:
            mask = _pixel_valid(sel, m, present[m.key])
            for name in present[m.key]:
                step[name] = sel[name].astype("float32").where(mask).median("time", skipna=True)
                step[name].attrs = dict(ds[name].attrs)
            count = mask.sum("time").astype("uint16")
            step[f"count_{m.key}"] = count
            step[m.mask_variable] = count > 0
            if m.offset_coord in ds.coords:
                offs = np.unique(sel[m.offset_coord].values)
                if len(offs) > 1:
                    raise ValueError(f"a composite bin mixes {m.key} DN offsets {offs.tolist()}: load with "
                                     "s2_offset='harmonize'")
                step = step.assign_coords({m.offset_coord: int(offs[0]) if len(offs) else 0})
        outs.append(step.expand_dims(time=[b]))
    out = xr.concat(outs, dim="time", data_vars="all", coords="different", compat="equals", join="outer")
    for name in layers:
        out[name] = ds[name]
    out.attrs = dict(ds.attrs, composite=str(freq), terrafm_modalities=[m.key for m in mods])
    return out


def _pixel_valid(ds: xr.Dataset, m: sensors.Modality, names: Sequence[str]) -> xr.DataArray:
    """The registry's validity of the present bands ``names``, with ``mask_<key>`` and the
    quality layer when the Dataset has them."""
    mask = ds[m.mask_variable].astype(bool) if m.mask_variable in ds else None
    if m.quality is not None and m.quality_variable in ds:
        usable = xr.apply_ufunc(m.quality.decode, ds[m.quality_variable], dask="parallelized",
                                output_dtypes=[bool])
        mask = usable if mask is None else mask & usable
    return m.pixel_valid([ds[v] for v in names], mask=mask)


def _legacy_names(ds: xr.Dataset) -> dict[str, list[str]]:
    """Modality key -> variables named by a bare band name (``B04``, ``vv``), the pre-registry
    contract, guessing the key from a ``modality`` attribute (else every modality with that band)."""
    found: dict[str, list[str]] = {}
    for m in sensors.MODALITIES.values():
        for band in m.bands:
            var = ds.data_vars.get(band)
            if var is not None and var.attrs.get("modality", m.key) == m.key:
                found.setdefault(m.key, []).append(band)
    return found


def _legacy_error(ds: xr.Dataset, legacy: dict[str, list[str]]) -> ValueError:
    example = next(iter(legacy))
    rename = {b: sensors.MODALITIES[example].variable(b) for b in legacy[example][:3]}
    current = [m.key for m in sensors.MODALITIES.values() if any(v in ds for v in m.variables)]
    mixing = (f"mixes new variable names (of {current}) with old bare band names {sorted({b for v in legacy.values() for b in v})}"
              if current else f"names bands by the old bare names {sorted({b for v in legacy.values() for b in v})}")
    return ValueError(
        f"the Dataset {mixing}; bands are now '<modality>_<band>' so that Sentinel-2 L2A and L1C can sit side by "
        f"side (s2_l2a_B04, s2_l1c_B04, s1_vv). Rename them for the modality they are, e.g. "
        f"ds.rename({rename}) (candidates: {list(legacy)}), or load with terrafm.stac.load.")


def detect_modalities(ds: xr.Dataset) -> list[str]:
    """Modality keys present in a Dataset of stored bands, in registry order.

    Read from ``ds.attrs["terrafm_modalities"]`` (set by :func:`terrafm.stac.load`), else from the
    band variables ``<key>_<band>`` found. Bare band names of the old contract (``B04``, ``vv``)
    raise an error giving the rename, so L1C is never taken for L2A.

    Examples
    --------
    >>> ds = xr.Dataset({"s1_vv": ("x", [0.1]), "s1_vh": ("x", [0.01])})
    >>> detect_modalities(ds)
    ['s1']
    >>> detect_modalities(xr.Dataset({"vv": ("x", [0.1]), "vh": ("x", [0.01])}))
    Traceback (most recent call last):
    ...
    ValueError: the Dataset names bands by the old bare names ['vh', 'vv']; bands are now '<modality>_<band>' so that Sentinel-2 L2A and L1C can sit side by side (s2_l2a_B04, s2_l1c_B04, s1_vv). Rename them for the modality they are, e.g. ds.rename({'vv': 's1_vv', 'vh': 's1_vh'}) (candidates: ['s1']), or load with terrafm.stac.load.
    """
    legacy = _legacy_names(ds)
    if legacy:
        raise _legacy_error(ds, legacy)
    if ds.attrs.get("terrafm_modalities"):
        return [k for k in ds.attrs["terrafm_modalities"] if k in sensors.MODALITIES]
    return [m.key for m in sensors.MODALITIES.values()
            if any(v in ds.data_vars for v in m.variables) or m.key in ds.data_vars]


def no_modality_error(ds: xr.Dataset) -> ValueError:
    """The error for a Dataset in which :func:`detect_modalities` finds nothing, naming the fix."""
    expected = {m.key: f"{m.variables[0]}..{m.variables[-1]}" for m in sensors.MODALITIES.values()}
    return ValueError(
        f"no modality found in the Dataset: it needs band variables named <modality>_<band> ({expected}); "
        f"it has {list(ds.data_vars)}. Load it with terrafm.stac.load or rename the variables")


def _check_band_names(ds: xr.Dataset, m: sensors.Modality) -> list[str]:
    missing = [v for v in m.variables if v not in ds]
    if missing:
        have = [v for v in m.variables if v in ds]
        raise ValueError(f"{m.key}: the Dataset has {have} but lacks {missing} of TerraFM's {list(m.variables)}; "
                         "select or rename the bands, or fill absent ones with terrafm.sensors.fill_missing_bands")
    return list(m.variables)


def stack_bands(ds: xr.Dataset, modality: str) -> tuple[xr.DataArray, xr.DataArray]:
    """One modality's stored bands as a lazy ``([time,] band_<key>, y, x)`` stack, and its mask.

    The stack keeps the stored dtype (e.g. uint16 DN) and holds all bands in one chunk; the mask is
    ``mask_<key>`` when the Dataset has it, else all True.

    Examples
    --------
    >>> ds = xr.Dataset({"s1_vv": (("y", "x"), [[0.1]]), "s1_vh": (("y", "x"), [[0.01]])})
    >>> stack, mask = stack_bands(ds, "s1")
    >>> stack.dims, stack.band_s1.values.tolist(), mask.values.tolist()
    (('band_s1', 'y', 'x'), ['vv', 'vh'], [[True]])
    """
    m = sensors.get_modality(modality)
    names = _check_band_names(ds, m)
    stack = xr.concat([ds[v] for v in names], dim=m.band_dim).assign_coords({m.band_dim: list(m.bands)})
    stack = stack.transpose(*(("time",) if "time" in stack.dims else ()), m.band_dim, "y", "x")
    if stack.chunks is not None:
        stack = stack.chunk({m.band_dim: -1})
    if m.mask_variable in ds:
        mask = ds[m.mask_variable].astype(bool)
    else:
        mask = xr.ones_like(stack.isel({m.band_dim: 0}, drop=True), dtype=bool)
    return stack, mask


def normalize_block(raw: np.ndarray, modality: str, mask: np.ndarray | None = None,
                    offset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The numpy core of :func:`normalize`: stored values of one block -> model input and validity.

    Parameters
    ----------
    raw : numpy.ndarray
        Stored values ``(..., C, y, x)`` in registry band order (S2 DN, S1 linear power).
    modality : str
        Modality key.
    mask : numpy.ndarray, optional
        ``(..., y, x)`` bool, False where the pixel is known to be invalid (e.g. from SCL).
    offset : float or numpy.ndarray, optional
        DN offset still in the stored values, removed by the modality's harmonization rule
        (:meth:`terrafm.sensors.Modality.harmonize`), scalar or ``(..., 1, 1)``.

    Returns
    -------
    (normalized, valid)
        float32 ``(..., C, y, x)`` with :data:`FILL_VALUE` at invalid pixels, and bool
        ``(..., y, x)`` by the registry's rule (:meth:`terrafm.sensors.Modality.pixel_valid`)
        and ``mask``: :meth:`terrafm.sensors.Modality.model_input`, shared with pretraining.

    Examples
    --------
    >>> raw = np.array([[[0.1, 0.0]], [[0.01, 0.02]]], "float32")          # (C=2, y=1, x=2)
    >>> x, valid = normalize_block(raw, "s1")
    >>> valid.tolist(), bool(x[0, 0, 1] == FILL_VALUE)
    ([[True, False]], True)
    """
    off = None if offset is None else np.asarray(offset)
    if off is not None and off.ndim:
        off = np.expand_dims(off, -3)
    return sensors.get_modality(modality).model_input(raw, mask, off)


def normalized_block(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An already-normalized block ``(..., C, y, x)``: float32 with :data:`FILL_VALUE` where
    ``mask`` is False or a band is not finite, and that validity.

    Examples
    --------
    >>> x, valid = normalized_block(np.array([[[0.2, np.nan]]]), np.array([[True, True]]))
    >>> x.tolist(), valid.tolist()
    ([[[0.20000000298023224, 0.5]]], [[True, False]])
    """
    x = np.asarray(x, dtype=np.float32)
    valid = np.asarray(mask, dtype=bool) & np.isfinite(x).all(axis=-3)
    return np.where(np.expand_dims(valid, -3), x, np.float32(FILL_VALUE)), valid


def _normalize_band_last(raw, ok, off=None, *, modality):
    # apply_ufunc hands the core (band) dim last; normalize_block wants it before (y, x)
    x, valid = normalize_block(np.moveaxis(raw, -1, -3), modality, ok, off)
    return np.moveaxis(x, -3, -1), valid


def normalize(ds: xr.Dataset, modalities: Sequence[str] | None = None, s2_offset: str = "raw") -> xr.Dataset:
    """Model-ready arrays: per modality a float32 ``([time,] band_<key>, y, x)`` variable, lazily.

    Values follow :func:`terrafm.sensors.normalize` (S1 in dB first). A pixel is valid by the
    registry's rule (:meth:`terrafm.sensors.Modality.pixel_valid`: every band finite and not
    nodata, S1 also > 0) and, when the Dataset has one, its ``mask_<key>``; invalid pixels are
    set to :data:`FILL_VALUE` and the combined mask is returned as ``mask_<key>``.
    ``s2_offset="harmonize"`` removes the DN offset recorded in the ``<key>_offset`` coordinate
    (baseline 04.00+) by :meth:`terrafm.sensors.Modality.harmonize` before normalizing (the same
    rule as ``terrafm.stac.load(s2_offset="harmonize")``); ``"raw"`` (default, the DN the
    statistics were computed on) uses stored values.

    Parameters
    ----------
    ds : xarray.Dataset
        Stored bands (``<key>_<band>``: ``s2_l2a_B01``..., ``s1_vv``, ``s1_vh``) on dims
        ``([time,] y, x)``, e.g. from :func:`terrafm.stac.load`.
    modalities : sequence of str, optional
        Modality keys to keep; default: every modality found (:func:`detect_modalities`).
    s2_offset : {"raw", "harmonize"}

    Examples
    --------
    >>> import numpy as np
    >>> ds = xr.Dataset({"s1_vv": (("y", "x"), [[0.1, 0.0]]), "s1_vh": (("y", "x"), [[0.01, 0.02]])})
    >>> x = normalize(ds)
    >>> x.s1.dims, x.mask_s1.values.tolist()
    (('band_s1', 'y', 'x'), [[True, False]])
    """
    if s2_offset not in ("raw", "harmonize"):
        raise ValueError(f"s2_offset must be 'raw' or 'harmonize', got {s2_offset!r}")
    mods = list(modalities) if modalities is not None else detect_modalities(ds)
    unknown = [m for m in mods if m not in sensors.MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; choose from {list(sensors.MODALITIES)}")
    if not mods:
        raise no_modality_error(ds)
    offsets = {sensors.MODALITIES[k].offset_coord for k in mods}
    out = xr.Dataset(coords={k: v for k, v in ds.coords.items() if k not in offsets})
    for key in mods:
        m = sensors.MODALITIES[key]
        stack, mask = stack_bands(ds, key)
        inputs, core = [stack, mask], [[m.band_dim], []]
        if s2_offset == "harmonize" and m.offset_coord in ds.coords:
            inputs.append(ds[m.offset_coord])
            core.append([])
        norm, valid = xr.apply_ufunc(partial(_normalize_band_last, modality=key), *inputs,
                                     input_core_dims=core, output_core_dims=[[m.band_dim], []],
                                     dask="parallelized", output_dtypes=[np.float32, bool])
        norm = norm.transpose(*stack.dims)
        norm.attrs = {"modality": key, "normalization": m.normalization}
        out[key] = norm
        out[m.mask_variable] = valid
    out.attrs = dict(ds.attrs, terrafm_modalities=list(mods), s2_offset_normalization=s2_offset)
    return out
