"""Bring training labels (points, polygons or a label raster) onto the embedding grid."""

from __future__ import annotations

import logging
import numbers
import warnings

import numpy as np
import xarray as xr

from ._grid import EMBEDDING_DIM, check_embedding

logger = logging.getLogger(__name__)

NODATA = -1


def _grid_2d(emb: xr.DataArray) -> xr.DataArray:
    template = emb.isel({EMBEDDING_DIM: 0}, drop=True)
    if "time" in template.dims:
        template = template.isel(time=0, drop=True)
    return template


def labels_to_grid(emb: xr.DataArray, labels, column: str = "class") -> tuple[np.ndarray, list]:
    """Rasterise labels to an integer (y, x) array of class indices (-1 = unlabelled) + class values.

    ``labels`` may be a GeoDataFrame of points or polygons (multi-parts too) with a ``column``
    (any CRS: it is reprojected; no CRS is an error) or a label raster DataArray (e.g. ESA
    WorldCover, any CRS and resolution): coarser-to-finer uses nearest, finer-to-coarser uses the
    mode of the covered pixels.

    What counts as unlabelled (ignored, never a class):

    - in a GeoDataFrame: the value -1 and missing values (NaN, None);
    - in a raster: -1, 0 (WorldCover "no data"), NaN and the raster's declared nodata.

    Any other negative value is refused (a sentinel such as -9999 must be declared as the
    raster's nodata, or replaced by -1); so are a column mixing value types (1 and "1" would be
    two classes), geometries other than points and polygons, and a raster of non-whole numbers
    (a continuous raster is not a label map). A cell given two different classes (overlapping
    polygons, two points in one cell) is left unlabelled, with a warning; a uint8/uint16 raster
    holding 255/65535 without a declared nodata warns that the value is taken as a class.

    Examples
    --------
    >>> import geopandas as gpd                                          # doctest: +SKIP
    >>> pts = gpd.GeoDataFrame({"class": ["water", "forest", -1]}, geometry=..., crs=4326)  # doctest: +SKIP
    >>> grid, classes = labels_to_grid(emb, pts)   # classes == ['forest', 'water']  # doctest: +SKIP
    """
    check_embedding(emb)
    template = _grid_2d(emb)
    shape = (template.sizes["y"], template.sizes["x"])
    if isinstance(labels, xr.DataArray):
        return _raster_to_grid(template, labels)
    import geopandas as gpd

    if not isinstance(labels, gpd.GeoDataFrame):
        hint = ""
        if hasattr(labels, "columns"):
            hint = ("; for a table of coordinates: gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df.lon, df.lat), "
                    "crs='EPSG:4326')")
        elif isinstance(labels, xr.Dataset):
            hint = f"; pick the label variable, e.g. labels[{next(iter(labels.data_vars), 'name')!r}]"
        raise TypeError(f"labels must be a GeoDataFrame (points/polygons) or a label raster xr.DataArray, got "
                        f"{type(labels).__name__}{hint}")
    if column not in labels.columns:
        raise ValueError(f"labels have no column {column!r} (columns: {list(labels.columns)}); pass column=...")
    if labels.crs is None:
        raise ValueError("labels have no CRS; set it with labels.set_crs('EPSG:4326') (or their real CRS)")
    labels = _labelled_rows(labels, column)
    if labels.crs != template.rio.crs:
        logger.info("reprojecting labels from %s to %s", labels.crs, template.rio.crs)
        labels = labels.to_crs(template.rio.crs)
    classes = sorted(labels[column].unique().tolist())
    transform = template.rio.transform(recalc=True)
    grid = np.full(shape, NODATA, dtype=np.int64)
    conflict = np.zeros(shape, dtype=bool)
    outside = 0
    for index, value in enumerate(classes):
        covered, n_outside = _coverage(labels[labels[column] == value].geometry, shape, transform)
        outside += n_outside
        conflict |= covered & (grid != NODATA) & (grid != index)
        grid[covered] = index
    if outside:
        logger.warning("%d label points fall outside the embedding area and are ignored", outside)
    if conflict.any():
        n = int(conflict.sum())
        warnings.warn(
            f"{n} {'cell' if n == 1 else 'cells'} of the embedding grid got labels of different classes "
            f"(overlapping polygons, or points of two classes in one {abs(transform.a):g} m cell); "
            f"{'it is' if n == 1 else 'they are'} left unlabelled. Resolve the overlaps to use them.",
            UserWarning, stacklevel=2)
        grid[conflict] = NODATA
    present = np.unique(grid[grid != NODATA])
    if len(present) < len(classes):   # a class whose every cell was contested: keep indices dense
        remap = np.full(len(classes), NODATA, dtype=np.int64)
        remap[present] = np.arange(len(present))
        grid = np.where(grid == NODATA, NODATA, remap[np.maximum(grid, 0)])
        classes = [classes[i] for i in present]
    return grid, classes


def _value_kind(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    return type(value).__name__


def _labelled_rows(labels, column: str):
    """The rows that carry a class, exploded to single points/polygons, after the checks."""
    values = labels[column]
    missing = values.isna().to_numpy()
    kinds = {_value_kind(v) for v in values[~missing]}
    families = {"number" if kind in ("int", "float") else kind for kind in kinds}
    if len(families) > 1:
        examples = {kind: next(v for v in values[~missing] if _value_kind(v) == kind) for kind in sorted(kinds)}
        raise ValueError(
            f"label column {column!r} mixes value types ({', '.join(f'{k} e.g. {v!r}' for k, v in examples.items())}); "
            f"a class is one value, so 1 and '1' would be two classes. Make them one type, e.g. "
            f"labels[{column!r}] = labels[{column!r}].astype(str)")
    unlabelled = missing.copy()
    if families == {"number"}:
        numeric = values[~missing].astype(float).to_numpy()
        sentinels = sorted(set(numeric[(numeric < 0) & (numeric != NODATA)].tolist()))
        if sentinels:
            shown = [int(v) if float(v).is_integer() else v for v in sentinels]
            raise ValueError(
                f"label column {column!r} has negative class value(s) {shown} (a nodata sentinel?); only -1 means "
                f"unlabelled: replace them with -1 (labels.loc[labels[{column!r}] < 0, {column!r}] = -1) or drop "
                "those rows")
        unlabelled[~missing] = numeric == NODATA
    if unlabelled.any():
        logger.info("%d labels are -1 or missing: unlabelled, ignored", int(unlabelled.sum()))
    labels = labels[~unlabelled]
    no_geometry = (labels.geometry.isna() | labels.geometry.is_empty).to_numpy()
    if no_geometry.any():
        warnings.warn(f"{int(no_geometry.sum())} labels have no geometry and are ignored", UserWarning, stacklevel=3)
        labels = labels[~no_geometry]
    labels = labels.explode(index_parts=False)
    kinds = set(labels.geometry.geom_type)
    unsupported = sorted(kinds - {"Point", "Polygon"})
    if unsupported:
        n = int((~labels.geometry.geom_type.isin(["Point", "Polygon"])).sum())
        raise ValueError(
            f"{n} label geometries are {unsupported}: labels are points and polygons only (a line has no "
            "area to take a class). Buffer lines into polygons (labels.geometry = labels.buffer(10) in a "
            "metric CRS) or drop them")
    return labels


def _coverage(geometries, shape: tuple[int, int], transform) -> tuple[np.ndarray, int]:
    """Cells covered by these points/polygons (polygons by cell centre), and the points outside."""
    covered = np.zeros(shape, dtype=bool)
    outside = 0
    points = geometries[geometries.geom_type == "Point"]
    if len(points):
        cols, rows = ~transform @ (points.x.to_numpy(), points.y.to_numpy())
        rows, cols = np.floor(rows).astype(int), np.floor(cols).astype(int)
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        outside = int((~inside).sum())
        covered[rows[inside], cols[inside]] = True
    areas = geometries[geometries.geom_type == "Polygon"]
    if len(areas):
        from rasterio.features import rasterize

        covered |= rasterize(list(areas), out_shape=shape, transform=transform, fill=0, default_value=1,
                             dtype="uint8").astype(bool)
    return covered, outside


def _raster_to_grid(template: xr.DataArray, raster: xr.DataArray) -> tuple[np.ndarray, list]:
    from rasterio.enums import Resampling

    if raster.rio.crs is None:
        raise ValueError("label raster has no CRS; set it with raster.rio.write_crs(...)")
    for dim in ("band", "time"):
        if dim in raster.dims:
            if raster.sizes[dim] != 1:
                raise ValueError(f"label raster has {raster.sizes[dim]} {dim}s; a label map is one layer of class "
                                 f"codes: pick it, e.g. raster.isel({dim}=0)")
            raster = raster.isel({dim: 0}, drop=True)
    if set(raster.dims) != {"y", "x"}:
        raise ValueError(f"label raster has dims {raster.dims}; it must be (y, x) (a 'band' or 'time' of size 1 "
                         "is dropped)")
    nodata = raster.rio.nodata
    if nodata is not None and not np.isfinite(nodata):
        nodata = None                        # NaN nodata: NaN is unlabelled anyway
    _check_raster_values(raster, nodata)
    src_res = abs(raster.rio.resolution()[0])
    dst_res = abs(template.rio.resolution()[0])
    if raster.rio.crs != template.rio.crs:
        src_res = abs(raster.rio.reproject(template.rio.crs).rio.resolution()[0])
    resampling = Resampling.mode if src_res < dst_res else Resampling.nearest
    raster = raster.fillna(0).astype("int32").rio.write_nodata(0 if nodata is None else int(nodata))
    on_grid = raster.rio.reproject_match(template, resampling=resampling)
    values = np.asarray(on_grid.values)
    unlabeled = (values == 0) | (values == NODATA)
    if nodata is not None:
        unlabeled |= values == int(nodata)
    classes = sorted(np.unique(values[~unlabeled]).tolist())
    index = np.full(max(int(values.max()), 0) + 2, NODATA, dtype=np.int64)
    index[classes] = np.arange(len(classes))
    grid = np.where(unlabeled, NODATA, index[np.clip(values, 0, None)])
    return grid, classes


def _check_raster_values(raster: xr.DataArray, nodata) -> None:
    """Refuse what cannot be class codes; warn about an undeclared uint nodata value."""
    dtype = np.dtype(raster.dtype)
    if dtype.kind == "f":
        values = np.asarray(raster.values)
        finite = values[np.isfinite(values)]
        fractional = finite[finite != np.round(finite)]
        if fractional.size:
            raise ValueError(
                f"label raster has values that are not whole numbers (e.g. {sorted(set(fractional[:1000].tolist()))[:3]}): "
                "labels are class codes. A continuous raster (NDVI, probabilities) is not a label map: classify it "
                "first, or convert deliberately with raster.round().astype('int32')")
        signed = finite
    elif dtype.kind == "i":
        signed = np.asarray(raster.values)
    else:
        signed = None
    if signed is not None and signed.size and signed.min() < NODATA:
        sentinels = sorted(set(np.unique(signed[signed < 0]).tolist()) - {NODATA, nodata})
        if sentinels:
            first = int(sentinels[0])
            raise ValueError(
                f"label raster has negative class value(s) {[int(v) for v in sentinels[:5]]} and no matching declared "
                f"nodata (nodata={nodata}); only -1 means unlabelled (and 0, WorldCover's no data). If {first} marks "
                f"no data, declare it: raster = raster.rio.write_nodata({first}); otherwise replace it with -1")
    if dtype.kind == "u" and dtype.itemsize <= 2 and nodata is None:
        top = np.iinfo(dtype).max
        if bool((raster == top).any()):
            warnings.warn(
                f"label raster value {top} is often nodata for {dtype} rasters, but the raster declares no nodata, "
                f"so {top} is taken as a class. If it marks no data: raster = raster.rio.write_nodata({top})",
                UserWarning, stacklevel=4)
