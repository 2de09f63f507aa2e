"""Change over a time series of embeddings: distance to a baseline, step to step, first persistent change.

Every function takes a ``(time, y, x, embedding)`` DataArray (an ``embed`` of a multi-date
Dataset, or :func:`terrafm.open_embedding` of such a store) and works position by position, so a
dask-backed series stays lazy: each chunk of positions is read once with all its dates.

Distances are cosine distances ``1 - cos`` in [0, 2], NaN where the date is not valid (cloud,
no data). Invalid dates are skipped, never counted as change:

- :func:`baseline_distance`: each date against the mean direction of the baseline dates;
- :func:`step_distance`: each date against the last earlier valid date of the same position;
- :func:`first_persistent_change`: the first date from which the distance stays above a
  threshold for at least ``min_steps`` valid dates in a row;
- :func:`trajectory`: the distances of one position over time, as a table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ._checks import require_int
from ._grid import EMBEDDING_DIM, check_embedding, is_lazy, lazy_parts, with_georef

__all__ = ["baseline_distance", "step_distance", "first_persistent_change", "trajectory"]


def _check_series(emb: xr.DataArray, name: str = "emb") -> xr.DataArray:
    check_embedding(emb, name)
    if "time" not in emb.dims or emb.sizes["time"] < 2:
        raise ValueError(
            f"{name} needs a 'time' dim with at least 2 dates for a series analysis (got dims {emb.dims}); "
            "embed a multi-date Dataset, or use terrafm.change(a, b) for two single dates"
        )
    return emb.transpose("time", "y", "x", EMBEDDING_DIM)


def _baseline_steps(emb: xr.DataArray, baseline) -> np.ndarray:
    """Indices of the baseline dates: the first ``n`` (int), a date slice, or explicit indices."""
    n_t = emb.sizes["time"]
    if isinstance(baseline, slice):
        times = pd.DatetimeIndex(emb["time"].values)
        start = pd.Timestamp(baseline.start) if baseline.start is not None else times.min()
        stop = pd.Timestamp(baseline.stop) if baseline.stop is not None else times.max()
        steps = np.flatnonzero((times >= start) & (times <= stop))
        if not steps.size:
            raise ValueError(
                f"baseline={baseline} selects none of the dates {times.min().date()} .. {times.max().date()}; "
                "widen the slice or pass the number of first dates (baseline=2)"
            )
        return steps
    if isinstance(baseline, (int, np.integer)) and not isinstance(baseline, bool):
        count = require_int("baseline", baseline, minimum=1,
                            fix="pass the number of first dates forming the baseline, e.g. baseline=2")
        if count >= n_t:
            raise ValueError(f"baseline={count} leaves no date after it in a series of {n_t} dates; use fewer")
        return np.arange(count)
    steps = np.asarray(list(baseline), dtype=int)
    if not steps.size or steps.min() < -n_t or steps.max() >= n_t:
        raise ValueError(f"baseline indices {steps.tolist()} are empty or outside 0..{n_t - 1}")
    return np.unique(steps % n_t)


def _unit(block: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """float64 unit vectors, zero where not valid."""
    vectors = np.where(valid[..., None], np.nan_to_num(block.astype(np.float64)), 0.0)
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 0)


def _valid_block(block: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    ok = np.isfinite(block).all(-1) & (np.abs(block).sum(-1) > 0)
    return ok if valid is None else ok & np.asarray(valid, dtype=bool)


def _baseline_block(block: np.ndarray, valid: np.ndarray | None, steps: np.ndarray) -> np.ndarray:
    ok = _valid_block(block, valid)
    unit = _unit(block, ok)
    reference = unit[steps].sum(0)
    norm = np.linalg.norm(reference, axis=-1, keepdims=True)
    has_reference = norm[..., 0] > 0
    reference = np.divide(reference, norm, out=np.zeros_like(reference), where=norm > 0)
    distance = 1.0 - (unit * reference[None]).sum(-1)
    return np.where(ok & has_reference[None], distance, np.nan).astype(np.float32)


def _step_block(block: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    ok = _valid_block(block, valid)
    unit = _unit(block, ok)
    out = np.full(ok.shape, np.nan, dtype=np.float32)
    last = unit[0].copy()
    seen = ok[0].copy()
    for t in range(1, ok.shape[0]):
        compare = ok[t] & seen
        out[t] = np.where(compare, 1.0 - (unit[t] * last).sum(-1), np.nan)
        last = np.where(ok[t][..., None], unit[t], last)
        seen |= ok[t]
    return out


def _per_position(emb: xr.DataArray, kernel, name: str, **kwargs) -> xr.DataArray:
    """Run ``kernel(values (t, y, x, D), valid (t, y, x) or None, **kwargs) -> (t, y, x)`` on the whole
    array, or chunk by chunk with every date of a chunk's positions together (dask-backed input)."""
    if is_lazy(emb):
        data, valid = lazy_parts(emb)
        data = data.rechunk({0: -1})
        if valid is not None:
            valid = valid.rechunk(data.chunks[:-1])
            values = data.map_blocks(lambda b, v: kernel(b, v[..., 0], **kwargs), valid[..., None], drop_axis=3,
                                     dtype=np.float32)
        else:
            values = data.map_blocks(lambda b: kernel(b, None, **kwargs), drop_axis=3, dtype=np.float32)
    else:
        valid = emb.coords["valid"].transpose("time", "y", "x").values if "valid" in emb.coords else None
        values = kernel(np.asarray(emb.values), valid, **kwargs)
    coords = {k: v for k, v in emb.coords.items() if set(v.dims) <= {"time", "y", "x"} and not k.startswith("valid")}
    out = xr.DataArray(values, dims=("time", "y", "x"), coords=coords, name=name)
    return with_georef(out, emb)


def baseline_distance(emb: xr.DataArray, baseline: int | slice | Sequence[int] = 1) -> xr.DataArray:
    """Cosine distance of every date to the baseline period, position by position.

    The baseline direction of a position is the mean of its unit vectors over the valid baseline
    dates; a position with no valid baseline date is NaN throughout.

    Parameters
    ----------
    emb : xr.DataArray
        ``(time, y, x, embedding)`` with at least two dates.
    baseline : int, slice of dates or sequence of int
        The first ``n`` dates (default 1), the dates inside a label slice
        (``slice("2023-01-01", "2023-03-31")``, ends included) or explicit date indices.

    Returns
    -------
    xr.DataArray ``"baseline_distance"`` (time, y, x) float32, lazy for dask-backed input, with the
    CRS and transform of ``emb`` and ``attrs["baseline"]`` (the baseline dates).

    Examples
    --------
    >>> series = xr.DataArray(np.array([[[[1.0, 0.0]]], [[[1.0, 0.0]]], [[[0.0, 1.0]]]]),
    ...                       dims=("time", "y", "x", "embedding"),
    ...                       coords={"time": pd.date_range("2024-01-01", periods=3, freq="MS")})
    >>> baseline_distance(series.rio.write_crs("EPSG:32633")).values.ravel().tolist()
    [0.0, 0.0, 1.0]
    """
    emb = _check_series(emb)
    steps = _baseline_steps(emb, baseline)
    out = _per_position(emb, _baseline_block, "baseline_distance", steps=steps)
    out.attrs["baseline"] = [str(pd.Timestamp(t).date()) for t in emb["time"].values[steps]]
    return out


def step_distance(emb: xr.DataArray) -> xr.DataArray:
    """Cosine distance of every date to the last earlier valid date of the same position.

    A cloudy date is skipped: the next valid date is compared with the one before the cloud.
    The first valid date of a position (and every invalid date) is NaN.

    Returns
    -------
    xr.DataArray ``"step_distance"`` (time, y, x) float32, lazy for dask-backed input.

    Examples
    --------
    >>> series = xr.DataArray(np.array([[[[1.0, 0.0]]], [[[np.nan, np.nan]]], [[[0.0, 1.0]]]]),
    ...                       dims=("time", "y", "x", "embedding"),
    ...                       coords={"time": pd.date_range("2024-01-01", periods=3, freq="MS")})
    >>> step_distance(series.rio.write_crs("EPSG:32633")).values.ravel().tolist()
    [nan, nan, 1.0]
    """
    return _per_position(_check_series(emb), _step_block, "step_distance")


def _first_run_block(distance: np.ndarray, threshold: float, min_steps: int) -> np.ndarray:
    """Index of the first date of the first run of ``min_steps`` valid dates above ``threshold``, else -1."""
    run = np.zeros(distance.shape[1:], dtype=np.int32)
    start = np.full(distance.shape[1:], -1, dtype=np.int32)
    first = np.full(distance.shape[1:], -1, dtype=np.int32)
    for t in range(distance.shape[0]):
        observed = np.isfinite(distance[t])
        above = observed & (distance[t] > threshold)
        start = np.where(above & (run == 0), t, start)
        run = np.where(above, run + 1, np.where(observed, 0, run))
        first = np.where((first < 0) & (run >= min_steps), start, first)
    return first


def first_persistent_change(series: xr.DataArray, threshold: float | str = "otsu", min_steps: int = 2,
                            baseline: int | slice | Sequence[int] = 1) -> xr.Dataset:
    """The first date of a change that lasts: distance above ``threshold`` for ``min_steps`` valid dates in a row.

    Parameters
    ----------
    series : xr.DataArray
        An embedding series ``(time, y, x, embedding)`` (its :func:`baseline_distance` to
        ``baseline`` is used) or a distance series ``(time, y, x)`` you computed.
    threshold : float or "otsu"
        Distance above which a date counts as changed; ``"otsu"`` picks it from the histogram of
        every finite distance after the baseline (streamed for dask-backed input).
    min_steps : int
        Valid dates in a row the distance must stay above the threshold; invalid (cloudy) dates
        neither break nor extend a run.
    baseline : int, slice or sequence of int
        The baseline dates, as in :func:`baseline_distance` (used for embedding input).

    Returns
    -------
    xr.Dataset with ``first_change`` (y, x) datetime64 (NaT: no persistent change),
    ``first_change_index`` (y, x) int32 (-1: none), the ``distance`` series, and attrs
    ``threshold`` and ``min_steps``; lazy for dask-backed input except for the threshold.

    Examples
    --------
    >>> d = xr.DataArray(np.array([0.0, 0.5, 0.0, 0.5, 0.6, 0.7])[:, None, None], dims=("time", "y", "x"),
    ...                  coords={"time": pd.date_range("2024-01-01", periods=6, freq="MS")})
    >>> out = first_persistent_change(d, threshold=0.3, min_steps=2)
    >>> str(out.first_change.values.ravel()[0])[:10], int(out.first_change_index.values.ravel()[0])
    ('2024-04-01', 3)
    """
    min_steps = require_int("min_steps", min_steps, minimum=1,
                            fix="pass how many valid dates in a row a change must last, e.g. min_steps=2")
    if EMBEDDING_DIM in series.dims:
        distance = baseline_distance(series, baseline)
        after = distance.isel(time=slice(int(max(_baseline_steps(_check_series(series), baseline))) + 1, None))
    else:
        if set(series.dims) != {"time", "y", "x"}:
            raise ValueError(
                f"series has dims {series.dims}; pass an embedding series (time, y, x, embedding) or a distance "
                "series (time, y, x) such as baseline_distance(emb)"
            )
        distance = series.transpose("time", "y", "x")
        after = distance
    if min_steps > distance.sizes["time"]:
        raise ValueError(f"min_steps={min_steps} is longer than the series ({distance.sizes['time']} dates)")
    thr = _threshold(after, threshold)
    if is_lazy(distance):
        data = distance.data.rechunk({0: -1})
        index = data.map_blocks(_first_run_block, thr, min_steps, drop_axis=0, dtype=np.int32)
    else:
        index = _first_run_block(np.asarray(distance.values), thr, min_steps)
    dates = np.append(distance["time"].values.astype("datetime64[ns]"), np.datetime64("NaT", "ns"))

    def date_of(step: np.ndarray) -> np.ndarray:
        return dates[np.where(step >= 0, step, dates.size - 1)]

    first_date = index.map_blocks(date_of, dtype=dates.dtype) if is_lazy(distance) else date_of(index)
    spatial = {k: v for k, v in distance.coords.items() if set(v.dims) <= {"y", "x"}}
    first_index = with_georef(xr.DataArray(index, dims=("y", "x"), coords=spatial, name="first_change_index"),
                              distance)
    first_date = with_georef(xr.DataArray(first_date, dims=("y", "x"), coords=spatial, name="first_change"),
                             distance)
    ds = xr.Dataset({"first_change": first_date, "first_change_index": first_index, "distance": distance})
    ds = ds.rio.write_crs(distance.rio.crs) if distance.rio.crs is not None else ds
    ds.attrs.update(threshold=thr, min_steps=min_steps)
    return ds


def _threshold(distance: xr.DataArray, threshold: float | str) -> float:
    from .change import _streamed_otsu, otsu_threshold

    if threshold != "otsu":
        if isinstance(threshold, str) or not np.isfinite(float(threshold)):
            raise ValueError(f"threshold={threshold!r}; pass a distance in [0, 2] or 'otsu'")
        return float(threshold)
    if is_lazy(distance):
        thr, low, high, count = _streamed_otsu(distance.data)
        if np.isnan(thr):
            raise ValueError("fewer than two distinct finite distances after the baseline; pass threshold= "
                             "explicitly or a longer series")
        return thr
    return otsu_threshold(np.asarray(distance.values))


def trajectory(emb: xr.DataArray, point: tuple[float, float], baseline: int | slice | Sequence[int] = 1,
               threshold: float | None = None) -> pd.DataFrame:
    """Distances over time of the position under ``point`` (lon, lat): one row per date.

    Reads only that position's vectors (one chunk of a dask-backed store).

    Returns
    -------
    pandas.DataFrame indexed by ``time`` with ``baseline_distance``, ``step_distance``, ``valid``
    and, when ``threshold`` is given, ``above`` (distance > threshold on a valid date).

    Examples
    --------
    >>> trajectory(emb, (11.57, 48.12), baseline=2).plot(y="baseline_distance")  # doctest: +SKIP
    """
    from .similarity import _lonlat_to_index

    emb = _check_series(emb)
    row, col = _lonlat_to_index(emb, float(point[0]), float(point[1]))
    pixel = emb.isel(y=slice(row, row + 1), x=slice(col, col + 1)).load()
    frame = pd.DataFrame(
        {
            "baseline_distance": baseline_distance(pixel, baseline).values[:, 0, 0],
            "step_distance": step_distance(pixel).values[:, 0, 0],
        },
        index=pd.DatetimeIndex(emb["time"].values, name="time"),
    )
    valid = pixel.coords["valid"].transpose("time", "y", "x").values if "valid" in pixel.coords else None
    frame["valid"] = _valid_block(np.asarray(pixel.values), valid)[:, 0, 0]
    if threshold is not None:
        frame["above"] = frame["valid"] & (frame["baseline_distance"] > float(threshold))
    frame.attrs.update(row=row, col=col, lon=float(point[0]), lat=float(point[1]))
    return frame
