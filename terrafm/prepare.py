"""From a loaded Dataset to model-ready arrays: S1/S2 pairing, temporal composites, normalization.

Constants (band order, mu/sigma, dB conversion) come from :mod:`terrafm.sensors`.

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

__all__ = ["solar_day", "nearest_index", "take_time_steps", "time_gap_attrs", "pair_nearest", "composite", "detect_modalities", "normalize", "normalize_block",
           "stack_bands",
           "FILL_VALUE"]

FILL_VALUE = 0.5
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


def _bands(modality: str) -> list[str]:
    return list(sensors.get_modality(modality).bands)


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


def time_gap_attrs(window: str | _dt.timedelta) -> dict:
    """Attributes of ``s1_time_gap`` for a pairing window (one wording for every pairing).

    Examples
    --------
    >>> time_gap_attrs("3D")["description"]
    'S1 minus S2 acquisition time; NaT if none within 3 days 00:00:00'
    """
    return {"description": f"S1 minus S2 acquisition time; NaT if none within {pd.Timedelta(window)}"}


def pair_nearest(s2: xr.Dataset, s1: xr.Dataset, window: str | _dt.timedelta = "3D") -> xr.Dataset:
    """Put S1 on the S2 time axis: each S2 date gets the nearest S1 acquisition within ``window``.

    S2 dates without S1 in the window get NaN ``vv``/``vh``, ``mask_s1`` False and ``s1_time_gap``
    NaT. ``s1_time_gap`` (time) is S1 time minus S2 time. :func:`terrafm.stac.load` pairs the
    same way when it loads S2 and S1 together.

    Examples
    --------
    >>> paired = pair_nearest(ds_s2, ds_s1, window="6D")                     # doctest: +SKIP
    """
    index, gaps = nearest_index(s2.time.values, s1.time.values, window)
    new = {}
    for name, dtype, fill in (("vv", np.float32, np.nan), ("vh", np.float32, np.nan), ("mask_s1", bool, False)):
        var = s1[name].transpose("time", ...)
        data = var.data if var.dtype == dtype else var.data.astype(dtype)
        new[name] = xr.Variable(var.dims, take_time_steps(data, index, fill), dict(var.attrs))
    new["s1_time_gap"] = xr.Variable(("time",), gaps, time_gap_attrs(window))
    out = s2.assign(new)
    logger.info("paired %d of %d S2 dates with S1 within %s", int((index >= 0).sum()), len(index), window)
    return out


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
        Loaded Dataset with ``mask_<key>`` variables.
    freq : "month", "season" (DJF/MAM/JJA/SON), a pandas period alias, or bin edges
        (a sequence of datetimes; bin i is [edges[i], edges[i+1])).

    Returns
    -------
    xr.Dataset on the bin time axis (bin start): band variables float32 (NaN where no valid
    observation), ``count_<key>`` (uint16) and ``mask_<key>`` = count > 0.

    Examples
    --------
    >>> monthly = composite(ds, "month")                                     # doctest: +SKIP
    >>> monthly.count_s2_l2a.max().item() <= ds.sizes["time"]  # doctest: +SKIP
    True
    """
    keys, bins = _bins(ds.time, freq)
    mods = [m for m in sensors.MODALITY_KEYS if f"mask_{m}" in ds]
    outs = []
    for b in bins:
        sel = ds.isel(time=np.flatnonzero(keys == b))
        step = xr.Dataset(coords={k: v for k, v in ds.coords.items() if "time" not in v.dims})
        for m in mods:
            mask = sel[f"mask_{m}"]
            for band in _bands(m):
                if band in sel:
                    step[band] = sel[band].astype("float32").where(mask).median("time", skipna=True)
                    step[band].attrs = dict(ds[band].attrs)
            count = mask.sum("time").astype("uint16")
            step[f"count_{m}"] = count
            step[f"mask_{m}"] = count > 0
        for name in ("worldcover",):
            if name in ds:
                step[name] = ds[name]
        if "s2_offset" in ds.coords:
            offs = np.unique(sel.s2_offset.values)
            if len(offs) > 1:
                raise ValueError("a composite bin mixes S2 DN offsets: load with s2_offset='harmonize'")
            step = step.assign_coords(s2_offset=int(offs[0]) if len(offs) else 0)
        outs.append(step.expand_dims(time=[b]))
    out = xr.concat(outs, dim="time", data_vars="all", coords="different", compat="equals", join="outer")
    if "worldcover" in ds:
        out["worldcover"] = ds["worldcover"]
    out.attrs = dict(ds.attrs, composite=str(freq))
    return out


def detect_modalities(ds: xr.Dataset) -> list[str]:
    """Modality keys present in a Dataset of stored bands, in :data:`terrafm.sensors.MODALITY_KEYS` order.

    Read from ``ds.attrs["terrafm_modalities"]`` (set by :func:`terrafm.stac.load`), else from
    each band's ``modality`` attribute, else from the band names (``B01``… → ``s2_l2a``,
    ``vv``/``vh`` → ``s1``).

    Examples
    --------
    >>> ds = xr.Dataset({"vv": ("x", [0.1]), "vh": ("x", [0.01])})
    >>> detect_modalities(ds)
    ['s1']
    """
    if ds.attrs.get("terrafm_modalities"):
        return list(ds.attrs["terrafm_modalities"])
    found = set()
    for name, var in ds.data_vars.items():
        key = var.attrs.get("modality")
        if key is None:
            key = "s1" if name in sensors.S1_BANDS else "s2_l2a" if name in sensors.S2_BANDS else None
        if key in sensors.MODALITY_KEYS and not str(name).startswith("mask_"):
            found.add(key)
    return [k for k in sensors.MODALITY_KEYS if k in found]


def no_modality_error(ds: xr.Dataset) -> ValueError:
    """The error for a Dataset in which :func:`detect_modalities` finds nothing, naming the fix."""
    return ValueError(
        "no modality found in the Dataset: it needs Sentinel-2 bands named "
        f"{list(sensors.S2_BANDS)} (attr modality='s2_l2a' or 's2_l1c') and/or Sentinel-1 "
        f"'vv', 'vh' (attr modality='s1'); it has {list(ds.data_vars)}. Load it with "
        "terrafm.stac.load or rename the variables")


def _check_band_names(ds: xr.Dataset, modality: str) -> list[str]:
    bands = _bands(modality)
    tagged = [str(n) for n, v in ds.data_vars.items() if v.attrs.get("modality") == modality]
    wrong = [n for n in tagged if n not in bands]
    missing = [b for b in bands if b not in ds]
    if wrong or missing:
        have = sorted(set(tagged) | {b for b in bands if b in ds})
        raise ValueError(f"{modality}: bands {have} do not match TerraFM's {bands} "
                         f"(unexpected {wrong}, missing {missing}); rename or select the bands, "
                         "or fill absent ones with terrafm.sensors.fill_missing_bands")
    return bands


def stack_bands(ds: xr.Dataset, modality: str) -> tuple[xr.DataArray, xr.DataArray]:
    """One modality's stored bands as a lazy ``([time,] band_<key>, y, x)`` stack, and its mask.

    The stack keeps the stored dtype (e.g. uint16 DN) and holds all bands in one chunk; the mask is
    ``mask_<key>`` when the Dataset has it, else all True.

    Examples
    --------
    >>> ds = xr.Dataset({"vv": (("y", "x"), [[0.1]]), "vh": (("y", "x"), [[0.01]])})
    >>> stack, mask = stack_bands(ds, "s1")
    >>> stack.dims, stack.band_s1.values.tolist(), mask.values.tolist()
    (('band_s1', 'y', 'x'), ['vv', 'vh'], [[True]])
    """
    bands = _check_band_names(ds, modality)
    band_dim = f"band_{modality}"
    stack = xr.concat([ds[b] for b in bands], dim=band_dim).assign_coords({band_dim: bands})
    stack = stack.transpose(*(("time",) if "time" in stack.dims else ()), band_dim, "y", "x")
    if stack.chunks is not None:
        stack = stack.chunk({band_dim: -1})
    if f"mask_{modality}" in ds:
        mask = ds[f"mask_{modality}"].astype(bool)
    else:
        mask = xr.ones_like(stack.isel({band_dim: 0}, drop=True), dtype=bool)
    return stack, mask


def normalize_block(raw: np.ndarray, modality: str, mask: np.ndarray | None = None,
                    offset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The numpy core of :func:`normalize`: stored values of one block → model input and validity.

    Parameters
    ----------
    raw : numpy.ndarray
        Stored values ``(..., C, y, x)`` in TerraFM band order (S2 DN, S1 linear power).
    modality : str
        Modality key.
    mask : numpy.ndarray, optional
        ``(..., y, x)`` bool, False where the pixel is known to be invalid (e.g. from SCL).
    offset : float or numpy.ndarray, optional
        S2 DN offset to subtract (baseline 04.00+ harmonization), scalar or ``(..., 1, 1)``.

    Returns
    -------
    (normalized, valid)
        float32 ``(..., C, y, x)`` with :data:`FILL_VALUE` at invalid pixels, and bool
        ``(..., y, x)``: every band finite and not nodata (S1 also > 0), and ``mask``.

    Examples
    --------
    >>> raw = np.array([[[0.1, 0.0]], [[0.01, 0.02]]], "float32")          # (C=2, y=1, x=2)
    >>> x, valid = normalize_block(raw, "s1")
    >>> valid.tolist(), bool(x[0, 0, 1] == FILL_VALUE)
    ([[True, False]], True)
    """
    spec = sensors.get_modality(modality)
    raw = np.asarray(raw)
    valid = (raw != spec.nodata).all(axis=-3)
    if np.issubdtype(raw.dtype, np.floating):
        valid &= np.isfinite(raw).all(axis=-3)
    if spec.key == "s1":
        valid &= (raw > 0).all(axis=-3)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    x = raw.astype(np.float32)                      # a fresh buffer, normalized in place
    if offset is not None:
        off = np.asarray(offset, dtype=np.float32)
        x -= np.expand_dims(off, -3) if off.ndim else off
        np.maximum(x, 0, out=x)
    sensors.normalize(x, spec.key, channel_axis=-3, inplace=True)
    np.copyto(x, np.float32(FILL_VALUE), where=~np.expand_dims(valid, -3))
    return x, valid


def _normalize_band_last(raw, ok, off=None, *, modality):
    # apply_ufunc hands the core (band) dim last; normalize_block wants it before (y, x)
    x, valid = normalize_block(np.moveaxis(raw, -1, -3), modality, ok, off)
    return np.moveaxis(x, -3, -1), valid


def normalize(ds: xr.Dataset, modalities: Sequence[str] | None = None, s2_offset: str = "raw") -> xr.Dataset:
    """Model-ready arrays: per modality a float32 ``([time,] band_<key>, y, x)`` variable, lazily.

    Values follow :func:`terrafm.sensors.normalize` (S1 in dB first). A pixel is valid when every
    band is finite and not nodata (S2 DN 0; S1 0 or negative) and, when the Dataset has one, its
    ``mask_<key>`` is True; invalid pixels are set to :data:`FILL_VALUE` and the combined mask is
    returned as ``mask_<key>``. ``s2_offset="harmonize"`` subtracts the DN offset recorded in the
    ``s2_offset`` coordinate (baseline 04.00+) before normalizing; ``"raw"`` (default, the DN the
    statistics were computed on) uses stored values.

    Parameters
    ----------
    ds : xarray.Dataset
        Stored bands (``B01``…``B12`` and/or ``vv``, ``vh``) on dims ``([time,] y, x)``, e.g. from
        :func:`terrafm.stac.load`.
    modalities : sequence of str, optional
        Modality keys to keep; default: every modality found (:func:`detect_modalities`).
    s2_offset : {"raw", "harmonize"}

    Examples
    --------
    >>> import numpy as np
    >>> ds = xr.Dataset({"vv": (("y", "x"), [[0.1, 0.0]]), "vh": (("y", "x"), [[0.01, 0.02]])})
    >>> x = normalize(ds)
    >>> x.s1.dims, x.mask_s1.values.tolist()
    (('band_s1', 'y', 'x'), [[True, False]])
    """
    if s2_offset not in ("raw", "harmonize"):
        raise ValueError(f"s2_offset must be 'raw' or 'harmonize', got {s2_offset!r}")
    mods = list(modalities) if modalities is not None else detect_modalities(ds)
    unknown = [m for m in mods if m not in sensors.MODALITY_KEYS]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; choose from {list(sensors.MODALITY_KEYS)}")
    if not mods:
        raise no_modality_error(ds)
    out = xr.Dataset(coords={k: v for k, v in ds.coords.items() if k != "s2_offset"})
    for m in mods:
        stack, mask = stack_bands(ds, m)
        band_dim = f"band_{m}"
        inputs, core = [stack, mask], [[band_dim], []]
        if m.startswith("s2") and s2_offset == "harmonize" and "s2_offset" in ds.coords:
            inputs.append(ds.s2_offset.astype("float32"))
            core.append([])
        norm, valid = xr.apply_ufunc(partial(_normalize_band_last, modality=m), *inputs,
                                     input_core_dims=core, output_core_dims=[[band_dim], []],
                                     dask="parallelized", output_dtypes=[np.float32, bool])
        norm = norm.transpose(*stack.dims)
        norm.attrs = {"modality": m, "normalization": sensors.NORMALIZATION_FORMULA + (", x in dB" if m == "s1" else "")}
        out[m] = norm
        out[f"mask_{m}"] = valid
    out.attrs = dict(ds.attrs, terrafm_modalities=list(mods), s2_offset_normalization=s2_offset)
    return out
